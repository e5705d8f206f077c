//! Heavy hitters in bounded memory: the Space-Saving summary (Metwally,
//! Agrawal, El Abbadi 2005) and a sliding window of them.
//!
//! A summary keeps at most `capacity` keys. A key not kept takes the place
//! of the smallest count, inheriting it as its possible overcount
//! (`error`). Every key whose true count exceeds `total / capacity` is
//! kept, and a kept key's count is at most its true count plus `error`:
//! the leaders are exact when the stream has leaders, whatever is thrown
//! at the summary.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

/// The longest key kept; a longer one is cut (keys come from clients).
pub const KEY_BYTES_MAX: usize = 320;

/// One kept key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hitter {
    pub key: String,
    /// At least the true count, at most the true count plus `error`.
    pub count: u64,
    pub error: u64,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct SpaceSaving {
    capacity: usize,
    /// key -> (count, error)
    kept: HashMap<Arc<str>, (u64, u64)>,
    /// The kept keys by count, smallest first: the one a new key replaces
    /// is found in O(log capacity), not by a scan (a spam run with a new
    /// sender per message replaces one on every message).
    by_count: BTreeSet<(u64, Arc<str>)>,
    total: u64,
}

impl SpaceSaving {
    pub fn new(capacity: usize) -> Self {
        SpaceSaving {
            capacity: capacity.max(1),
            kept: HashMap::new(),
            by_count: BTreeSet::new(),
            total: 0,
        }
    }

    /// Everything counted, kept or not.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Counts `n` for `key`.
    pub fn add(&mut self, key: &str, n: u64) {
        self.total = self.total.saturating_add(n);
        let key = cut(key);
        if let Some((k, e)) = self.kept.get_key_value(key) {
            let (k, (count, error)) = (k.clone(), *e);
            self.by_count.remove(&(count, k.clone()));
            let count = count.saturating_add(n);
            self.by_count.insert((count, k.clone()));
            self.kept.insert(k, (count, error));
            return;
        }
        let (count, error) = if self.kept.len() < self.capacity {
            (n, 0)
        } else {
            let (min, gone) = self.by_count.pop_first().expect("full");
            self.kept.remove(&gone);
            (min.saturating_add(n), min)
        };
        let k: Arc<str> = Arc::from(key);
        self.by_count.insert((count, k.clone()));
        self.kept.insert(k, (count, error));
    }

    /// Adds another summary's counts (for a window, or the cluster).
    pub fn merge(&mut self, other: &SpaceSaving) {
        let total = self.total.saturating_add(other.total);
        for (k, (c, _)) in &other.kept {
            self.add(k, *c);
        }
        self.total = total;
    }

    /// The `n` largest counts, largest first (ties by key).
    pub fn top(&self, n: usize) -> Vec<Hitter> {
        let mut v: Vec<Hitter> = self
            .kept
            .iter()
            .map(|(k, (c, e))| Hitter {
                key: k.to_string(),
                count: *c,
                error: *e,
            })
            .collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        v.truncate(n);
        v
    }
}

fn cut(key: &str) -> &str {
    if key.len() <= KEY_BYTES_MAX {
        return key;
    }
    let mut end = KEY_BYTES_MAX;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    &key[..end]
}

/// Space-Saving summaries over a sliding window: one per `bucket_ms`,
/// `buckets` of them kept; a query merges those that start within the
/// window asked for.
#[derive(Debug, Clone)]
pub struct Windowed {
    bucket_ms: u64,
    buckets: usize,
    capacity: usize,
    /// (bucket number, summary), oldest first.
    kept: VecDeque<(u64, SpaceSaving)>,
}

impl Windowed {
    pub fn new(bucket_ms: u64, buckets: usize, capacity: usize) -> Self {
        Windowed {
            bucket_ms: bucket_ms.max(1),
            buckets: buckets.max(1),
            capacity,
            kept: VecDeque::new(),
        }
    }

    /// Counts `n` for `key` at `now_ms`.
    pub fn add(&mut self, now_ms: u64, key: &str, n: u64) {
        let b = now_ms / self.bucket_ms;
        if self.kept.back().is_none_or(|(last, _)| *last != b) {
            self.kept.push_back((b, SpaceSaving::new(self.capacity)));
        }
        while self.kept.len() > self.buckets {
            self.kept.pop_front();
        }
        self.kept.back_mut().expect("pushed").1.add(key, n);
    }

    /// The summary of the last `window_ms` (whole buckets, the current one
    /// included) at `now_ms`.
    pub fn window(&self, now_ms: u64, window_ms: u64) -> SpaceSaving {
        let now_b = now_ms / self.bucket_ms;
        let span = window_ms.div_ceil(self.bucket_ms).max(1);
        let mut out = SpaceSaving::new(self.capacity);
        for (b, s) in &self.kept {
            if *b + span > now_b && *b <= now_b {
                out.merge(s);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_flooder_leads_among_many_small_senders() {
        let mut s = SpaceSaving::new(20);
        for i in 0..10_000u64 {
            s.add(&format!("one-off-{i}@spam.test"), 1);
            if i % 4 == 0 {
                s.add("flood@bad.test", 1);
            }
            if i % 10 == 0 {
                s.add("busy@ok.test", 1);
            }
        }
        let top = s.top(3);
        assert_eq!(top[0].key, "flood@bad.test");
        assert_eq!(top[1].key, "busy@ok.test");
        assert!(top[0].count >= 2_500 && top[0].count - top[0].error <= 2_500);
        assert_eq!(s.total(), 10_000 + 2_500 + 1_000);
    }

    #[test]
    fn exact_while_under_capacity_and_keys_are_cut() {
        let mut s = SpaceSaving::new(8);
        s.add("a", 3);
        s.add("b", 5);
        s.add("a", 1);
        assert_eq!(
            s.top(5),
            vec![
                Hitter {
                    key: "b".into(),
                    count: 5,
                    error: 0
                },
                Hitter {
                    key: "a".into(),
                    count: 4,
                    error: 0
                }
            ]
        );
        let long = "é".repeat(KEY_BYTES_MAX);
        s.add(&long, 1);
        assert!(s.top(5).iter().all(|h| h.key.len() <= KEY_BYTES_MAX));
    }

    #[test]
    fn the_window_forgets_old_buckets() {
        let mut w = Windowed::new(10_000, 7, 16);
        w.add(0, "old", 100);
        w.add(65_000, "new", 1);
        assert_eq!(w.window(65_000, 60_000).top(5)[0].key, "new");
        assert_eq!(w.window(65_000, 3_600_000).top(5)[0].key, "old");
        // Bounded: never more buckets than asked for.
        for t in 0..100 {
            w.add(t * 10_000, "x", 1);
        }
        assert!(w.kept.len() <= 7);
    }

    proptest! {
        /// Space-Saving's guarantees, for any stream: a kept count is never
        /// below the true one nor above it by more than its error, and any
        /// key above total/capacity is kept.
        #[test]
        fn guarantees_hold(stream in proptest::collection::vec(0u8..40, 0..2_000), cap in 1usize..20) {
            let mut s = SpaceSaving::new(cap);
            let mut truth: HashMap<String, u64> = HashMap::new();
            for k in &stream {
                let key = format!("k{k}");
                s.add(&key, 1);
                *truth.entry(key).or_default() += 1;
            }
            let kept = s.top(usize::MAX);
            prop_assert!(kept.len() <= cap);
            for h in &kept {
                let t = truth.get(&h.key).copied().unwrap_or(0);
                prop_assert!(h.count >= t && h.count - h.error <= t);
            }
            for (k, t) in &truth {
                if *t > stream.len() as u64 / cap as u64 {
                    prop_assert!(kept.iter().any(|h| &h.key == k), "{} with {} not kept", k, t);
                }
            }
        }
    }
}
