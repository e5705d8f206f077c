//! What the queue's owner decides, with the time passed in: which node
//! owns a shard, when an entry is due, what a try's outcomes record
//! (ends, bounces, a delay warning, the deletion), when it is tried
//! again, and which destinations go to the slow lane. The node's
//! `outbound` module performs it.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use super::{Envelope, Failed, Schedule, failed_flag, ok_flag};
use crate::message::domain_of;

/// Consecutive failed tries that put a domain in the slow lane.
pub const SLOW_AFTER: u32 = 3;
/// How long a domain stays in the slow lane after its last failure.
pub const SLOW_FOR: Duration = Duration::from_secs(600);
/// Domains whose rate is tracked at once; the table is emptied when full.
const BUCKETS_MAX: usize = 100_000;

/// The owner of queue shard `shard` among `nodes` (the ids of the nodes
/// that are up and work the queue): the one with the highest blake3 of
/// (shard, node id). Rendezvous hashing: a node that goes or comes moves
/// only its own shards. None when there is no such node: the queue waits.
pub fn owner_of(shard: &str, nodes: impl Iterator<Item = u64>) -> Option<u64> {
    nodes.max_by_key(|id| {
        let mut h = blake3::Hasher::new();
        h.update(shard.as_bytes());
        h.update(&id.to_le_bytes());
        *h.finalize().as_bytes()
    })
}

/// One recipient's outcome of a try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Deferred(Failed),
    Failed(Failed),
}

impl Outcome {
    /// The outcome of a remote reply that was not a success: a 5xx fails
    /// the recipient, anything else defers it.
    pub fn of_reply(code: u16, failed: Failed) -> Outcome {
        if code / 100 == 5 {
            Outcome::Failed(failed)
        } else {
            Outcome::Deferred(failed)
        }
    }

    /// The same outcome for another recipient (one reply to DATA speaks
    /// for every recipient the server accepted).
    pub fn for_rcpt(&self, rcpt: &str) -> Outcome {
        match self {
            Outcome::Delivered => Outcome::Delivered,
            Outcome::Deferred(f) => Outcome::Deferred(Failed {
                rcpt: rcpt.to_owned(),
                ..f.clone()
            }),
            Outcome::Failed(f) => Outcome::Failed(Failed {
                rcpt: rcpt.to_owned(),
                ..f.clone()
            }),
        }
    }

    /// Every recipient deferred (`failed: false`) or failed for one reason.
    pub fn all(rcpts: &[&str], failed: bool, status: &str, why: &str, remote: Option<&str>) -> Vec<Outcome> {
        rcpts
            .iter()
            .map(|r| {
                let f = Failed {
                    rcpt: (*r).to_owned(),
                    status: status.to_owned(),
                    diagnostic: why.to_owned(),
                    remote: remote.map(str::to_owned),
                };
                if failed {
                    Outcome::Failed(f)
                } else {
                    Outcome::Deferred(f)
                }
            })
            .collect()
    }
}

/// Soft state of one entry at its owner.
#[derive(Debug, Clone, Default)]
pub struct Retry {
    pub tries: u32,
    pub next_ms: u64,
    /// When the last try started.
    pub last_try_ms: u64,
    /// The last temporary failure per pending recipient (for the DSN when
    /// the lifetime ends).
    pub last: BTreeMap<usize, Failed>,
}

impl Retry {
    /// Whether the entry is due at `now_ms`: its next try has come, or an
    /// operator's `retry` stamp (`retry_stamp_ms`, the newest set `retry`
    /// flag's time) is newer than its last try.
    pub fn due(&self, retry_stamp_ms: Option<u64>, now_ms: u64) -> bool {
        self.next_ms <= now_ms || retry_stamp_ms.is_some_and(|at| at > self.last_try_ms)
    }

    /// Counts a try that left recipients pending and schedules the next.
    pub fn defer(&mut self, schedule: &Schedule, now_ms: u64, last: BTreeMap<usize, Failed>) {
        self.tries += 1;
        self.next_ms = now_ms + schedule.backoff_ms(self.tries);
        self.last.extend(last);
    }
}

/// The recipients still pending (`ended` says which are not), by domain
/// (empty for an address without one), in RCPT order within each.
pub fn pending_by_domain(rcpts: &[String], ended: impl Fn(usize) -> bool) -> BTreeMap<String, Vec<usize>> {
    let mut by_domain: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, rcpt) in rcpts.iter().enumerate() {
        if !ended(i) {
            by_domain
                .entry(domain_of(rcpt).unwrap_or_default())
                .or_default()
                .push(i);
        }
    }
    by_domain
}

/// The outcomes of an entry that outlived the queue: every pending
/// recipient fails with `4.4.7`, saying what its last try met.
pub fn expired(env: &Envelope, pending: &[usize], last: &BTreeMap<usize, Failed>) -> BTreeMap<usize, Outcome> {
    pending
        .iter()
        .map(|idx| {
            let why = last
                .get(idx)
                .map_or("no delivery within the queue lifetime".to_owned(), |f| {
                    f.diagnostic.clone()
                });
            let f = Failed {
                rcpt: env.rcpts[*idx].clone(),
                status: "4.4.7".to_owned(),
                diagnostic: format!("message expired in the queue: {why}"),
                remote: last.get(idx).and_then(|f| f.remote.clone()),
            };
            (*idx, Outcome::Failed(f))
        })
        .collect()
}

/// What a try's outcomes make of an entry.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settlement {
    /// Flags to set on the entry (recipient ends, `warned`).
    pub flags: Vec<String>,
    /// Recipients that failed now: a bounce, unless from the null sender.
    pub failed: Vec<Failed>,
    /// Recipients still pending, with why.
    pub deferred: BTreeMap<usize, Failed>,
    /// Whether a failure bounce goes to the sender.
    pub bounce: bool,
    /// Whether a delay warning goes to the sender (once per message).
    pub warn: bool,
    /// Every recipient has ended: the entry is deleted.
    pub all_ended: bool,
    pub n_delivered: u64,
}

/// Settles a try: `has(flag)` reads the entry's flags as they were,
/// `delay_warning_ms` is `--delay-warning` (0: never).
pub fn settle(
    env: &Envelope,
    outcomes: BTreeMap<usize, Outcome>,
    has: impl Fn(&str) -> bool,
    delay_warning_ms: u64,
    now_ms: u64,
) -> Settlement {
    let mut s = Settlement::default();
    for (i, o) in outcomes {
        match o {
            Outcome::Delivered => {
                s.flags.push(ok_flag(i));
                s.n_delivered += 1;
            }
            Outcome::Failed(f) => {
                s.flags.push(failed_flag(i));
                s.failed.push(f);
            }
            Outcome::Deferred(f) => {
                s.deferred.insert(i, f);
            }
        }
    }
    s.bounce = !s.failed.is_empty() && !env.from.is_empty();
    s.warn = delay_warning_ms > 0
        && !s.deferred.is_empty()
        && !env.from.is_empty()
        && now_ms.saturating_sub(env.queued_ms) >= delay_warning_ms
        && !has("warned");
    if s.warn {
        s.flags.push("warned".to_owned());
    }
    s.all_ended = (0..env.rcpts.len()).all(|i| {
        let (ok, failed) = (ok_flag(i), failed_flag(i));
        s.flags.contains(&ok) || s.flags.contains(&failed) || has(&ok) || has(&failed)
    });
    s
}

/// How a lane change reads in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LaneChange {
    ToSlow,
    BackFromSlow,
}

/// Per destination domain: failed tries in a row, and the token bucket of
/// `--outbound-rate-per-destination`. Times are since any fixed origin
/// the caller keeps.
#[derive(Debug, Default)]
pub struct Lanes {
    /// Consecutive failed tries and when the last was (ms).
    trouble: HashMap<String, (u32, u64)>,
    /// Tokens and when they were counted.
    buckets: HashMap<String, (f64, Duration)>,
}

impl Lanes {
    /// Whether `domain` is in the slow lane at `now_ms`.
    pub fn is_slow(&self, domain: &str, now_ms: u64) -> bool {
        self.trouble.get(domain).is_some_and(|t| slow(t, now_ms))
    }

    /// Domains in the slow lane at `now_ms`.
    pub fn slow_count(&self, now_ms: u64) -> usize {
        self.trouble.values().filter(|t| slow(t, now_ms)).count()
    }

    /// Notes a try of `domain` that failed (`bad`) or went through; says
    /// when that moves it into or out of the slow lane.
    pub fn note(&mut self, domain: &str, bad: bool, now_ms: u64) -> Option<LaneChange> {
        if bad {
            let e = self.trouble.entry(domain.to_owned()).or_insert((0, 0));
            e.0 += 1;
            e.1 = now_ms;
            return (e.0 == SLOW_AFTER).then_some(LaneChange::ToSlow);
        }
        self.trouble
            .remove(domain)
            .is_some_and(|(n, _)| n >= SLOW_AFTER)
            .then_some(LaneChange::BackFromSlow)
    }

    /// How long to wait before the next transaction to `domain` at `rate`
    /// a second (a bucket of one second's worth; a waiter reserves its
    /// token, so waiters go one after another). Zero when `rate` is 0.
    pub fn rate_wait(&mut self, domain: &str, rate: u32, now: Duration) -> Duration {
        let rate = f64::from(rate);
        if rate <= 0.0 {
            return Duration::ZERO;
        }
        if self.buckets.len() > BUCKETS_MAX {
            self.buckets.clear();
        }
        let b = self.buckets.entry(domain.to_owned()).or_insert((rate, now));
        b.0 = (b.0 + now.saturating_sub(b.1).as_secs_f64() * rate).min(rate);
        b.1 = now;
        b.0 -= 1.0;
        if b.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.0 / rate)
        }
    }
}

/// Whether a trouble record `(failed tries in a row, when the last was)`
/// puts its domain in the slow lane at `now_ms`.
fn slow(&(n, at): &(u32, u64), now_ms: u64) -> bool {
    n >= SLOW_AFTER && now_ms.saturating_sub(at) < SLOW_FOR.as_millis() as u64
}

/// A remote reply as one line, at most 400 characters (a hostile server's
/// reply is kept in memory for the DSN).
pub fn reply_line(s: &str) -> String {
    let mut line = s
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if let Some((cut, _)) = line.char_indices().nth(400) {
        line.truncate(cut);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(rcpt: &str) -> Failed {
        Failed {
            rcpt: rcpt.into(),
            status: "4.0.0".into(),
            diagnostic: "451 later".into(),
            remote: None,
        }
    }

    fn env(from: &str) -> Envelope {
        Envelope {
            from: from.into(),
            rcpts: vec!["a@x.test".into(), "b@y.test".into()],
            queued_ms: 1_000,
            submitter: None,
        }
    }

    #[test]
    fn owners_spread_and_move_only_their_own_shards() {
        let shards: Vec<String> = (0..32).map(super::super::shard_mailbox).collect();
        let before: Vec<Option<u64>> = shards.iter().map(|s| owner_of(s, [1, 2, 3].into_iter())).collect();
        assert!((1..=3).all(|n| before.contains(&Some(n))), "{before:?}");
        let after: Vec<Option<u64>> = shards.iter().map(|s| owner_of(s, [1, 3].into_iter())).collect();
        for (b, a) in before.iter().zip(&after) {
            if *b != Some(2) {
                assert_eq!(a, b, "a shard of a live node moved");
            }
        }
        assert_eq!(owner_of("queue~1", std::iter::empty()), None);
    }

    #[test]
    fn settling_records_ends_and_deletes_when_all_ended() {
        let mut o = BTreeMap::new();
        o.insert(0, Outcome::Delivered);
        o.insert(1, Outcome::Deferred(failed("b@y.test")));
        let s = settle(&env("s@example.org"), o, |_| false, 0, 2_000);
        assert_eq!(s.flags, vec![ok_flag(0)]);
        assert!(!s.all_ended && !s.bounce && !s.warn);
        // The second ends later as failed: a bounce, and the entry goes.
        let mut o = BTreeMap::new();
        o.insert(1, Outcome::Failed(failed("b@y.test")));
        let s = settle(&env("s@example.org"), o, |f| f == ok_flag(0), 0, 3_000);
        assert!(s.all_ended && s.bounce);
        // From the null sender: never a bounce.
        let mut o = BTreeMap::new();
        o.insert(1, Outcome::Failed(failed("b@y.test")));
        assert!(!settle(&env(""), o, |_| false, 0, 3_000).bounce);
    }

    #[test]
    fn a_delay_warning_goes_once() {
        let pending = || {
            let mut o = BTreeMap::new();
            o.insert(0, Outcome::Deferred(failed("a@x.test")));
            o
        };
        assert!(
            !settle(&env("s@e.test"), pending(), |_| false, 5_000, 3_000).warn,
            "not yet"
        );
        let s = settle(&env("s@e.test"), pending(), |_| false, 5_000, 6_000);
        assert!(s.warn && s.flags.contains(&"warned".to_owned()));
        assert!(!settle(&env("s@e.test"), pending(), |f| f == "warned", 5_000, 6_000).warn);
    }

    #[test]
    fn retries_come_due_or_are_forced() {
        let schedule = Schedule {
            initial_ms: 100,
            max_ms: 1_000,
            lifetime_ms: 10_000,
        };
        let mut r = Retry::default();
        assert!(r.due(None, 0));
        r.last_try_ms = 50;
        r.defer(&schedule, 50, BTreeMap::new());
        assert!(!r.due(None, 100));
        assert!(r.due(None, 150));
        assert!(r.due(Some(60), 100), "an operator's retry newer than the last try");
        assert!(!r.due(Some(40), 100), "an older stamp is used up");
    }

    #[test]
    fn failing_domains_take_the_slow_lane_and_leave_it() {
        let mut l = Lanes::default();
        assert_eq!(l.note("d.test", true, 0), None);
        assert_eq!(l.note("d.test", true, 1), None);
        assert_eq!(l.note("d.test", true, 2), Some(LaneChange::ToSlow));
        assert!(l.is_slow("d.test", 3) && l.slow_count(3) == 1);
        assert!(
            !l.is_slow("d.test", 2 + SLOW_FOR.as_millis() as u64),
            "ten minutes after"
        );
        assert_eq!(l.note("d.test", false, 4), Some(LaneChange::BackFromSlow));
        assert!(!l.is_slow("d.test", 5));
    }

    #[test]
    fn a_rate_spaces_transactions() {
        let mut l = Lanes::default();
        let t0 = Duration::from_secs(100);
        assert_eq!(l.rate_wait("d", 0, t0), Duration::ZERO, "no limit");
        assert_eq!(l.rate_wait("d", 2, t0), Duration::ZERO);
        assert_eq!(l.rate_wait("d", 2, t0), Duration::ZERO);
        assert_eq!(l.rate_wait("d", 2, t0), Duration::from_millis(500));
        assert_eq!(l.rate_wait("d", 2, t0), Duration::from_secs(1));
    }

    #[test]
    fn expiry_fails_what_is_pending_with_its_last_reason() {
        let mut last = BTreeMap::new();
        last.insert(1, failed("b@y.test"));
        let o = expired(&env("s@e.test"), &[0, 1], &last);
        let Outcome::Failed(f) = &o[&1] else { panic!() };
        assert_eq!(f.status, "4.4.7");
        assert!(f.diagnostic.contains("451 later"));
        let Outcome::Failed(f) = &o[&0] else { panic!() };
        assert!(f.diagnostic.contains("no delivery within the queue lifetime"));
        let by = pending_by_domain(&env("").rcpts, |i| i == 0);
        assert_eq!(by.into_iter().collect::<Vec<_>>(), vec![("y.test".to_owned(), vec![1])]);
        assert_eq!(reply_line("a\r\nb\nc"), "a b c");
    }
}
