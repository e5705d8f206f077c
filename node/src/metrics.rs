//! Latency histograms for `/metrics`, in a per-node `prometheus-client`
//! registry (typed families and histograms; the counters beside them in
//! `admin.rs` are still written by hand from `Services`, the replicator and
//! the store).

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Delivery and retrieval latency, as clients see them.
#[derive(Debug)]
pub struct Latencies {
    registry: Registry,
    /// End of DATA (or LMTP's) to the final reply: the message is on disk
    /// on its replicas (or refused).
    pub delivery: Histogram,
    /// One RETR's body read (from this node or another replica).
    pub retrieval: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        // 0.5 ms doubling to about 33 s.
        let delivery = Histogram::new(exponential_buckets(0.0005, 2.0, 17));
        let retrieval = Histogram::new(exponential_buckets(0.0005, 2.0, 17));
        let mut registry = Registry::default();
        registry.register(
            "quill_delivery_seconds",
            "Time from the end of a message's DATA until its final reply (stored on its replicas, or refused)",
            delivery.clone(),
        );
        registry.register(
            "quill_retrieval_seconds",
            "Time to read one message body for POP3 RETR, from this node or another replica",
            retrieval.clone(),
        );
        Latencies {
            registry,
            delivery,
            retrieval,
        }
    }
}

impl Latencies {
    pub fn observe(h: &Histogram, d: Duration) {
        h.observe(d.as_secs_f64());
    }

    /// The registry in the text exposition format (ends with `# EOF`, so
    /// it goes last on the page).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_exposed_with_their_buckets() {
        let l = Latencies::default();
        Latencies::observe(&l.delivery, Duration::from_millis(3));
        Latencies::observe(&l.delivery, Duration::from_millis(40));
        Latencies::observe(&l.retrieval, Duration::from_micros(700));
        let text = l.encode();
        assert!(text.contains("# TYPE quill_delivery_seconds histogram"), "{text}");
        assert!(text.contains("quill_delivery_seconds_count 2"), "{text}");
        assert!(text.contains("quill_retrieval_seconds_count 1"), "{text}");
        // 3 ms falls in the 4 ms bucket, not in the 2 ms one.
        assert!(text.contains("quill_delivery_seconds_bucket{le=\"0.002\"} 0"), "{text}");
        assert!(text.contains("quill_delivery_seconds_bucket{le=\"0.004\"} 1"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }
}
