//! What this node has seen lately, for the operator: the heaviest
//! senders, recipients and client addresses of the last minute and hour,
//! each a Space-Saving summary per time bucket (`quill_proto::topk`), so
//! memory is bounded whatever the traffic and the leaders are exact.
//! `quill admin top` merges every node's; `/metrics` shows this node's.

use std::net::IpAddr;
use std::sync::Mutex;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;
use quill_proto::admin::{TOP_KEPT, TopRow};
use quill_proto::topk::{SpaceSaving, Windowed};

/// Keys each bucket keeps.
const BUCKET_KEYS: usize = 2 * TOP_KEPT;

/// One kind's windows: 10-second buckets for the minute, 5-minute
/// buckets for the hour (one more of each, the one filling).
#[derive(Debug)]
struct Kind {
    minute: Windowed,
    hour: Windowed,
}

impl Kind {
    fn new() -> Kind {
        Kind {
            minute: Windowed::new(10_000, 7, BUCKET_KEYS),
            hour: Windowed::new(300_000, 13, BUCKET_KEYS),
        }
    }

    fn add(&mut self, now_ms: u64, key: &str) {
        self.minute.add(now_ms, key, 1);
        self.hour.add(now_ms, key, 1);
    }

    fn window(&self, now_ms: u64, window_secs: u64) -> SpaceSaving {
        if window_secs <= 60 {
            self.minute.window(now_ms, window_secs * 1000)
        } else {
            self.hour.window(now_ms, window_secs * 1000)
        }
    }
}

/// See the module docs. One per node.
#[derive(Debug)]
pub struct Activity {
    kinds: Mutex<[Kind; 3]>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            kinds: Mutex::new([Kind::new(), Kind::new(), Kind::new()]),
        }
    }
}

fn index(kind: &str) -> Option<usize> {
    quill_proto::admin::TOP_KINDS.iter().position(|k| *k == kind)
}

impl Activity {
    /// A message accepted from `client`, envelope sender `from` (`<>`
    /// for the null sender), for `rcpts`.
    pub fn note_message<'a>(&self, client: IpAddr, from: &str, rcpts: impl IntoIterator<Item = &'a str>) {
        let now = crate::time::now_ms();
        let from = if from.is_empty() { "<>" } else { from };
        let mut k = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        k[0].add(now, &from.to_ascii_lowercase());
        for r in rcpts {
            k[1].add(now, &r.to_ascii_lowercase());
        }
        k[2].add(now, &client.to_string());
    }

    /// This node's leaders of `kind` over the last `window_secs`, and
    /// everything it counted then; `None` for an unknown kind.
    pub fn top(&self, kind: &str, window_secs: u64, n: usize) -> Option<(u64, Vec<TopRow>)> {
        let i = index(kind)?;
        let s = self.kinds.lock().unwrap_or_else(|p| p.into_inner())[i].window(crate::time::now_ms(), window_secs);
        let rows = s
            .top(n)
            .into_iter()
            .map(|h| TopRow {
                key: h.key,
                count: h.count,
                error: h.error,
            })
            .collect();
        Some((s.total(), rows))
    }
}

/// This node's sessions by protocol and its leaders of the last hour, at
/// each scrape of `/metrics`.
pub struct Figures {
    pub activity: std::sync::Arc<Activity>,
    pub slots: std::sync::Arc<crate::net::slots::Slots>,
}

impl std::fmt::Debug for Figures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("activity::Figures")
    }
}

/// Leaders of each kind `/metrics` shows.
const METRICS_TOP: usize = 20;

impl Collector for Figures {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let mut by_proto: std::collections::BTreeMap<&'static str, u64> = std::collections::BTreeMap::new();
        for s in self.slots.sessions() {
            *by_proto.entry(s.protocol).or_default() += 1;
        }
        let mut m = enc.encode_descriptor(
            "quill_sessions",
            "Client sessions open on this node, by protocol.",
            None,
            MetricType::Gauge,
        )?;
        for (proto, n) in by_proto {
            ConstGauge::new(n).encode(m.encode_family(&[("protocol", proto)])?)?;
        }
        let mut m = enc.encode_descriptor(
            "quill_top_messages",
            "Messages this node took in the last hour from its heaviest senders and clients, and for its heaviest recipients (Space-Saving: at least the true count).",
            None,
            MetricType::Gauge,
        )?;
        for kind in quill_proto::admin::TOP_KINDS {
            let (_, rows) = self.activity.top(kind, 3600, METRICS_TOP).unwrap_or_default();
            for r in rows {
                let labels = [("kind", kind), ("key", r.key.as_str())];
                ConstGauge::new(r.count).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The nodes' summaries of one kind merged into the cluster's top `n`: a
/// key's counts (and possible overcounts) add up across nodes.
pub fn merge(parts: &[Vec<TopRow>], n: usize) -> Vec<TopRow> {
    let mut sum: std::collections::HashMap<&str, (u64, u64)> = std::collections::HashMap::new();
    for rows in parts {
        for r in rows {
            let e = sum.entry(&r.key).or_default();
            e.0 = e.0.saturating_add(r.count);
            e.1 = e.1.saturating_add(r.error);
        }
    }
    let mut v: Vec<TopRow> = sum
        .into_iter()
        .map(|(k, (count, error))| TopRow {
            key: k.to_owned(),
            count,
            error,
        })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
    v.truncate(n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn senders_recipients_and_clients_are_ranked() {
        let a = Activity::default();
        let ip = |n: u8| IpAddr::from([127, 0, 0, n]);
        for i in 0..50u8 {
            a.note_message(ip(i), &format!("once{i}@x.test"), ["bob@example.org"]);
        }
        for _ in 0..30 {
            a.note_message(ip(9), "Flood@Spam.test", ["alice@example.org", "carol@example.org"]);
        }
        a.note_message(ip(1), "", ["postmaster@example.org"]);
        let (total, top) = a.top("senders", 60, 3).unwrap();
        assert_eq!(total, 81);
        assert_eq!((top[0].key.as_str(), top[0].count), ("flood@spam.test", 30));
        let (_, top) = a.top("recipients", 3600, 1).unwrap();
        assert_eq!((top[0].key.as_str(), top[0].count), ("bob@example.org", 50));
        let (_, top) = a.top("clients", 60, 1).unwrap();
        assert_eq!((top[0].key.as_str(), top[0].count), ("127.0.0.9", 31));
        assert!(a.top("nothing", 60, 1).is_none());
    }

    #[test]
    fn merged_across_nodes() {
        let row = |k: &str, c: u64| TopRow {
            key: k.into(),
            count: c,
            error: 0,
        };
        let m = merge(&[vec![row("a", 5), row("b", 4)], vec![row("b", 3), row("c", 1)]], 2);
        assert_eq!(m, vec![row("b", 7), row("a", 5)]);
    }
}
