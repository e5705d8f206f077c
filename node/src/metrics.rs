//! `/metrics`: one `prometheus-client` registry per node. The counters and
//! gauges the node keeps are typed metrics registered here; what the store
//! and the replicator count themselves is read at each scrape by
//! collectors. Names are those dashboards already use
//! (`quill_smtp_sessions_total`, `quill_queue_messages_held`, ...).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use replication::FragmentStore;
use replication::replica::{Network, Replicator};

/// A gauge of whole numbers that are never negative.
pub type U64Gauge = Gauge<u64, AtomicU64>;

/// What the protocol sessions count.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub smtp_sessions: Counter,
    pub lmtp_sessions: Counter,
    pub pop3_sessions: Counter,
    pub imap_sessions: Counter,
    pub imap_logins: Counter,
    /// UIDs asked for and not given (the Raft state could not be written:
    /// new mail stays out of IMAP sessions until it can).
    pub imap_uid_failures: Counter,
    /// IMAP STOREs that changed flags, and messages copied or moved.
    pub imap_stores: Counter,
    pub imap_copies: Counter,
    pub imap_moves: Counter,
    pub messages_accepted: Counter,
    pub deliveries_failed: Counter,
    pub messages_retrieved: Counter,
    pub messages_deleted: Counter,
    pub auth_failures: Counter,
    pub limit_refusals: Counter,
    pub connections_refused: Counter,
    /// TLS handshakes that succeeded (implicit TLS and STARTTLS).
    pub tls_handshakes: Counter,
    pub tls_handshake_failures: Counter,
    /// STARTTLS commands followed by plaintext before the handshake (the
    /// input was discarded).
    pub tls_injected: Counter,
    /// Logins refused because they came in the clear (`--plaintext-auth`).
    pub plaintext_auth_refused: Counter,
}

/// The outbound queue as this node sees it (for the bounds, `/metrics`
/// and admin).
#[derive(Debug, Default, Clone)]
pub struct QueueGauge {
    /// Entries and bytes of queue shards held on this node's disk.
    pub held_messages: U64Gauge,
    pub held_bytes: U64Gauge,
    /// Entries in the shards this node owns, and the oldest one's age.
    pub owned_messages: U64Gauge,
    pub oldest_ms: U64Gauge,
    pub slow_domains: U64Gauge,
    pub delivered: Counter,
    pub deferred: Counter,
    pub failed: Counter,
    pub bounces: Counter,
    pub cut_transactions: Counter,
}

/// Delivery and retrieval latency, as clients see them.
#[derive(Debug, Clone)]
pub struct Latencies {
    /// End of DATA (or LMTP's) to the final reply: the message is on disk
    /// on its replicas (or refused).
    pub delivery: Histogram,
    /// One RETR's body read (from this node or another replica).
    pub retrieval: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        // 0.5 ms doubling to about 33 s.
        Latencies {
            delivery: Histogram::new(exponential_buckets(0.0005, 2.0, 17)),
            retrieval: Histogram::new(exponential_buckets(0.0005, 2.0, 17)),
        }
    }
}

impl Latencies {
    pub fn observe(h: &Histogram, d: Duration) {
        h.observe(d.as_secs_f64());
    }
}

/// One node's metrics and the registry that shows them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub counters: Counters,
    pub queue: QueueGauge,
    pub latency: Latencies,
}

impl Metrics {
    /// The node's own metrics, and `sources` read at each scrape (the
    /// store's and the replicator's figures: [`StoreFigures`],
    /// [`ReplicaFigures`]).
    pub fn new(sources: Vec<Box<dyn Collector>>) -> Metrics {
        let (counters, queue, latency) = (Counters::default(), QueueGauge::default(), Latencies::default());
        let mut r = Registry::default();
        let c = &counters;
        for (name, help, m) in [
            ("quill_smtp_sessions", "SMTP sessions accepted.", &c.smtp_sessions),
            ("quill_lmtp_sessions", "LMTP sessions accepted.", &c.lmtp_sessions),
            ("quill_pop3_logins", "Successful POP3 logins.", &c.pop3_sessions),
            ("quill_imap_sessions", "IMAP sessions accepted.", &c.imap_sessions),
            ("quill_imap_logins", "Successful IMAP logins.", &c.imap_logins),
            (
                "quill_imap_uid_failures",
                "Times UIDs could not be given to new mail (Raft state not writable).",
                &c.imap_uid_failures,
            ),
            (
                "quill_imap_stores",
                "IMAP STORE commands that changed flags.",
                &c.imap_stores,
            ),
            ("quill_imap_copies", "Messages copied by IMAP COPY.", &c.imap_copies),
            ("quill_imap_moves", "Messages moved by IMAP MOVE.", &c.imap_moves),
            (
                "quill_messages_accepted",
                "Messages stored and acknowledged.",
                &c.messages_accepted,
            ),
            (
                "quill_deliveries_failed",
                "Deliveries refused by a storage error.",
                &c.deliveries_failed,
            ),
            (
                "quill_messages_retrieved",
                "Messages sent by RETR.",
                &c.messages_retrieved,
            ),
            (
                "quill_messages_deleted",
                "Messages deleted at POP3 QUIT.",
                &c.messages_deleted,
            ),
            ("quill_auth_failures", "Failed logins.", &c.auth_failures),
            (
                "quill_limit_refusals",
                "Requests refused by a limit.",
                &c.limit_refusals,
            ),
            (
                "quill_connections_refused",
                "Connections refused by a limit.",
                &c.connections_refused,
            ),
            (
                "quill_tls_handshakes",
                "Client TLS handshakes completed (implicit TLS and STARTTLS).",
                &c.tls_handshakes,
            ),
            (
                "quill_tls_handshake_failures",
                "Client TLS handshakes that failed or timed out.",
                &c.tls_handshake_failures,
            ),
            (
                "quill_starttls_injections",
                "STARTTLS commands followed by plaintext before the handshake (discarded).",
                &c.tls_injected,
            ),
            (
                "quill_plaintext_auth_refused",
                "Logins refused because the session was not encrypted (--plaintext-auth).",
                &c.plaintext_auth_refused,
            ),
            (
                "quill_outbound_delivered",
                "Recipients delivered to a remote server.",
                &queue.delivered,
            ),
            (
                "quill_outbound_deferred",
                "Recipient tries that failed temporarily (retried).",
                &queue.deferred,
            ),
            (
                "quill_outbound_failed",
                "Recipients that failed for good (bounced).",
                &queue.failed,
            ),
            (
                "quill_outbound_bounces",
                "Delivery status notifications made.",
                &queue.bounces,
            ),
            (
                "quill_outbound_cut_transactions",
                "Transactions cut after DATA was sent (a duplicate is possible).",
                &queue.cut_transactions,
            ),
        ] {
            r.register(name, help, m.clone());
        }
        for (name, help, g) in [
            (
                "quill_queue_messages_held",
                "Outbound queue entries stored on this node (the bounds apply to these).",
                &queue.held_messages,
            ),
            (
                "quill_queue_bytes_held",
                "Outbound queue bytes stored on this node.",
                &queue.held_bytes,
            ),
            (
                "quill_queue_messages_owned",
                "Outbound queue entries in the shards this node works.",
                &queue.owned_messages,
            ),
            (
                "quill_queue_oldest_age_ms",
                "Age of the oldest entry in the shards this node works.",
                &queue.oldest_ms,
            ),
            (
                "quill_queue_slow_domains",
                "Destinations in the slow lane.",
                &queue.slow_domains,
            ),
        ] {
            r.register(name, help, g.clone());
        }
        r.register(
            "quill_delivery_seconds",
            "Time from the end of a message's DATA until its final reply (stored on its replicas, or refused)",
            latency.delivery.clone(),
        );
        r.register(
            "quill_retrieval_seconds",
            "Time to read one message body for POP3 RETR, from this node or another replica",
            latency.retrieval.clone(),
        );
        for s in sources {
            r.register_collector(s);
        }
        Metrics {
            registry: r,
            counters,
            queue,
            latency,
        }
    }

    /// The registry in the text exposition format (OpenMetrics; it ends
    /// with `# EOF`).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(enc.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(v);
    g.encode(enc.encode_descriptor(name, help, None, g.metric_type())?)
}

/// The Raft state's size, read at each scrape.
pub struct RaftFigures(pub membership::Membership);

impl std::fmt::Debug for RaftFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RaftFigures")
    }
}

impl Collector for RaftFigures {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        gauge(
            &mut enc,
            "quill_raft_state_bytes",
            "Bytes of the Raft state as a snapshot would hold it (grows with users, folders and nodes, not with mail).",
            self.0.state_bytes(),
        )
    }
}

/// The store's figures, read at each scrape.
#[derive(Debug)]
pub struct StoreFigures(pub Arc<FragmentStore>);

impl Collector for StoreFigures {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let st = self.0.stats();
        let e = &mut enc;
        gauge(
            e,
            "quill_store_entries",
            "Mailbox entries stored on this node.",
            st.entries,
        )?;
        gauge(e, "quill_store_bodies", "Distinct message bodies stored.", st.bodies)?;
        gauge(
            e,
            "quill_store_body_bytes",
            "Bytes of the bodies stored.",
            st.body_bytes,
        )?;
        gauge(
            e,
            "quill_store_disk_bytes",
            "Bytes of all segment files.",
            st.disk_bytes,
        )?;
        gauge(
            e,
            "quill_store_live_bytes",
            "Bytes of segment files still in use.",
            st.live_bytes,
        )?;
        gauge(e, "quill_store_segments", "Segment files.", st.segments)?;
        counter(
            e,
            "quill_store_fsyncs",
            "Fsyncs of the store (group commits).",
            st.fsyncs,
        )?;
        counter(e, "quill_store_ops", "Store writes covered by those fsyncs.", st.ops)?;
        gauge(
            e,
            "quill_store_tombstones",
            "Deletions remembered so that missed replicas cannot resurrect mail.",
            st.tombstones,
        )
    }
}

/// The replicator's figures, read at each scrape.
pub struct ReplicaFigures<N: Network>(pub Arc<Replicator<N>>);

impl<N: Network> std::fmt::Debug for ReplicaFigures<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaFigures").finish()
    }
}

impl<N: Network> Collector for ReplicaFigures<N> {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let r = &self.0;
        let e = &mut enc;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            e,
            "quill_under_replicated",
            "Messages held here with fewer than R live replicas (each counted on one node).",
            r.under_replicated(),
        )?;
        gauge(
            e,
            "quill_replica_pending_updates",
            "Deletions waiting in the update log for a replica to return.",
            r.pending_updates() as u64,
        )?;
        let rc = &r.counters;
        gauge(
            e,
            "quill_repair_pending",
            "Copies this node's running repair round has yet to restore or hand off.",
            get(&rc.repair_pending),
        )?;
        for (name, help, v) in [
            (
                "quill_replica_deliveries",
                "Deliveries this node sent to replicas.",
                &rc.deliveries,
            ),
            (
                "quill_replica_deliveries_under_replicated",
                "Deliveries stored on fewer than R nodes.",
                &rc.deliveries_under_replicated,
            ),
            (
                "quill_replica_copies_failed",
                "Copies a target node did not acknowledge.",
                &rc.copies_failed,
            ),
            (
                "quill_replica_updates_logged",
                "Deletions logged for a replica that did not acknowledge.",
                &rc.updates_logged,
            ),
            (
                "quill_replica_updates_replayed",
                "Logged deletions delivered later.",
                &rc.updates_replayed,
            ),
            (
                "quill_replica_repairs_pulled",
                "Copies fetched by anti-entropy.",
                &rc.repairs_pulled,
            ),
            (
                "quill_repair_copies",
                "Copies this node made on other nodes to restore R or hand off a draining node's copies.",
                &rc.repairs_copied,
            ),
            ("quill_repair_bytes", "Bytes of those copies.", &rc.repairs_bytes),
            (
                "quill_replica_repairs_tombstones",
                "Deletions applied by anti-entropy.",
                &rc.repairs_tombstones,
            ),
            (
                "quill_replica_manager_fallbacks",
                "Times a user manager did not answer and placement was done locally.",
                &rc.manager_fallbacks,
            ),
            (
                "quill_replica_calls_cut_by_view",
                "Calls in flight ended because a new view had their node down.",
                &rc.calls_cut_by_view,
            ),
        ] {
            counter(e, name, help, get(v))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_are_exposed_by_their_names() {
        let m = Metrics::new(vec![]);
        m.counters.limit_refusals.inc();
        m.queue.held_messages.set(3);
        Latencies::observe(&m.latency.delivery, Duration::from_millis(3));
        Latencies::observe(&m.latency.delivery, Duration::from_millis(40));
        Latencies::observe(&m.latency.retrieval, Duration::from_micros(700));
        let text = m.encode();
        assert!(text.contains("\nquill_limit_refusals_total 1\n"), "{text}");
        assert!(text.contains("\nquill_smtp_sessions_total 0\n"), "{text}");
        assert!(text.contains("\nquill_queue_messages_held 3\n"), "{text}");
        assert!(text.contains("# TYPE quill_delivery_seconds histogram"), "{text}");
        assert!(text.contains("quill_delivery_seconds_count 2"), "{text}");
        assert!(text.contains("quill_retrieval_seconds_count 1"), "{text}");
        // 3 ms falls in the 4 ms bucket, not in the 2 ms one.
        assert!(text.contains("quill_delivery_seconds_bucket{le=\"0.002\"} 0"), "{text}");
        assert!(text.contains("quill_delivery_seconds_bucket{le=\"0.004\"} 1"), "{text}");
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn the_store_is_read_at_each_scrape() {
        let dir = testkit::TempDir::new("metrics").unwrap();
        let store = Arc::new(FragmentStore::open(replication::StoreConfig::new(dir.path().join("s"))).unwrap());
        let m = Metrics::new(vec![Box::new(StoreFigures(store.clone()))]);
        let text = m.encode();
        assert!(text.contains("\nquill_store_entries 0\n"), "{text}");
        assert!(text.contains("\nquill_store_fsyncs_total "), "{text}");
        store.close();
    }
}
