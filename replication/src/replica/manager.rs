//! The user manager as a pure state machine: mail maps, reports, mailbox
//! locks and the loads and run numbers other nodes show. Every operation is
//! a plain function of this state, the view, the time (an argument, in
//! milliseconds of a monotonic clock) and the message; none does I/O or
//! reads a clock, so tests (and the simulation) drive it directly and a
//! seed replays the same run.
//!
//! All of it is soft state: never on disk, rebuilt after a restart from
//! the reports every node sends after a view change.

use std::collections::{BTreeMap, HashMap};

use placement::{LoadVector, UserKey, View};

use super::protocol::{MAILBOX_LOCK_LEASE, NodeId, REPORT_USERS_MAX, Reply};
use super::{is_live, live_nodes, manager_of};

/// Mailbox locks one manager holds at most.
pub const MAILBOX_LOCKS_MAX: usize = 100_000;
/// Login-failure counters (per client address, per account) one manager
/// keeps at most; past it expired windows go first, then a tenth of the
/// rest (an attacker with many addresses can at worst reset some counters,
/// never grow the table).
pub const THROTTLE_KEYS_MAX: usize = 100_000;
/// Greylisting triplets a manager keeps, at most (expired ones go first,
/// then a tenth of the rest).
pub const GREYLIST_KEYS_MAX: usize = 1_000_000;

/// Which nodes hold one user's fragments, with their entry and byte counts.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MailMap {
    /// node → (entries, bytes)
    pub nodes: BTreeMap<NodeId, (u64, u64)>,
}

/// A mailbox held by one session (POP3's exclusive maildrop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MailboxLock {
    holder: NodeId,
    /// The holder's run number in the high 32 bits, a sequence below.
    token: u64,
    until_ms: u64,
}

/// What a manager knows; see the module docs.
#[derive(Debug, Clone)]
pub struct Manager {
    me: NodeId,
    maps: HashMap<String, MailMap>,
    /// Per peer, the view epoch of its last full report. The maps are
    /// complete once every live node has reported at the current epoch;
    /// until then a mail map answers with every live node.
    reported: HashMap<NodeId, u64>,
    locks: HashMap<String, MailboxLock>,
    /// The load each other node showed last (piggybacked on every message).
    loads: HashMap<NodeId, u64>,
    /// The run number each other node showed last.
    boots: HashMap<NodeId, u32>,
    lease_ms: u64,
    locks_max: usize,
    /// Failed logins per key ("addr:IP", "user:MAILBOX") in fixed windows:
    /// (window start ms, count). Soft state: a new manager starts afresh.
    throttle: HashMap<String, (u64, u32)>,
    /// Greylisting per triplet key: (first try ms, last pass ms or 0).
    /// Soft state like the throttles: a new manager defers afresh.
    greylist: HashMap<String, (u64, u64)>,
    /// Per user, the nodes whose sessions wait for changes to the user's
    /// mailbox (IMAP IDLE), and until when (ms): see [`super::watch`].
    /// Soft state: watchers register again with a new manager.
    watchers: HashMap<String, Vec<(NodeId, u64)>>,
}

/// Users with watchers a manager keeps at most (each entry holds at most
/// one record per node).
pub const WATCHED_USERS_MAX: usize = 1_000_000;

impl Manager {
    pub fn new(me: NodeId) -> Self {
        Manager {
            me,
            maps: HashMap::new(),
            reported: HashMap::new(),
            locks: HashMap::new(),
            loads: HashMap::new(),
            boots: HashMap::new(),
            lease_ms: MAILBOX_LOCK_LEASE.as_millis() as u64,
            locks_max: MAILBOX_LOCKS_MAX,
            throttle: HashMap::new(),
            greylist: HashMap::new(),
            watchers: HashMap::new(),
        }
    }

    /// With other bounds (tests).
    pub fn with_limits(me: NodeId, lease_ms: u64, locks_max: usize) -> Self {
        Manager {
            lease_ms,
            locks_max,
            ..Manager::new(me)
        }
    }

    /// Takes a new view: maps of users this node no longer manages go
    /// (their new managers rebuild them from reports). A report from a node
    /// that was ahead of this one was kept whole and may just have lost
    /// part of itself: it no longer vouches for complete maps when its view
    /// comes (until then maps answer with every live node, and the report
    /// is asked for again).
    pub fn take_view(&mut self, view: &View) {
        let me = self.me;
        self.maps.retain(|user, _| manager_of(view, user) == Some(me));
        self.watchers.retain(|user, _| manager_of(view, user) == Some(me));
        let epoch = view.epoch();
        self.reported.retain(|_, e| *e <= epoch);
    }

    /// Notes what another node showed on a message: its load and its run
    /// number. A node seen with a new run number restarted: the mailbox
    /// locks its earlier sessions held are released; returns how many.
    pub fn observe(&mut self, node: NodeId, load: u64, boot: u32) -> usize {
        self.loads.insert(node, load);
        let restarted = self.boots.insert(node, boot).is_some_and(|old| old != boot);
        if !restarted {
            return 0;
        }
        let before = self.locks.len();
        self.locks
            .retain(|_, l| l.holder != node || (l.token >> 32) as u32 == boot);
        before - self.locks.len()
    }

    /// Picks `n` nodes for a new message of `size` bytes of `user`, least
    /// loaded first among the user's spread (the receiving node `near`
    /// preferred, then holders, to break near-ties: see
    /// [`View::replica_set_near`]), and notes them in the user's mail map.
    /// With no view (or nothing up) the mail stays on this node.
    #[allow(clippy::too_many_arguments)]
    pub fn place(
        &mut self,
        view: &View,
        user: &str,
        size: u64,
        n: usize,
        spread: usize,
        own_load: u64,
        near: Option<NodeId>,
    ) -> Vec<NodeId> {
        let key = UserKey::from_address(user);
        let mut loads = self.loads.clone();
        loads.insert(self.me, own_load);
        let loads = LoadVector::new(loads.into_iter().map(|(n, v)| (placement::NodeId(n), v)));
        let map = self.maps.entry(user.to_owned()).or_default();
        let holders: Vec<placement::NodeId> = map.nodes.keys().map(|&n| placement::NodeId(n)).collect();
        let mut targets: Vec<NodeId> = view
            .replica_set_near(key, n, spread, &loads, &holders, near.map(placement::NodeId))
            .into_iter()
            .map(|n| n.0)
            .collect();
        if targets.is_empty() {
            targets.push(self.me);
        }
        for t in &targets {
            let e = map.nodes.entry(*t).or_default();
            e.0 += 1;
            e.1 += size;
        }
        targets
    }

    /// Where the user's mail is, and the mailbox size (each message counted
    /// once, with `replicas` copies). `known` is false while reports for
    /// the view are missing; the nodes are then every live node, since any
    /// of them may hold fragments the map does not show yet.
    pub fn mail_map(&self, view: &View, user: &str, replicas: usize) -> Reply {
        let complete = self.reports_missing(view).is_empty();
        let (mut nodes, held): (Vec<NodeId>, Vec<(u64, u64)>) = match self.maps.get(user) {
            Some(map) => (
                map.nodes.keys().copied().collect(),
                map.nodes.values().copied().collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        // A message has R copies when R nodes hold the user's mail (fewer
        // only while it is under-replicated).
        let copies = replicas.clamp(1, held.len().max(1)) as u64;
        let bytes = held.iter().map(|v| v.1).sum::<u64>() / copies;
        if !complete {
            nodes.extend(live_nodes(view));
            nodes.sort_unstable();
            nodes.dedup();
        }
        Reply::MailMap {
            nodes,
            bytes,
            known: complete,
        }
    }

    /// A report from `from`: it holds `(user, entries, bytes)`, assigned
    /// to managers by view `epoch`; `last` ends a full report.
    pub fn report(&mut self, view: &View, from: NodeId, users: Vec<(String, u64, u64)>, epoch: u64, last: bool) {
        // A sender ahead of this node assigned the users by a view this
        // node will take soon: keep them all (the view change then drops
        // those it does not manage).
        let ahead = epoch > view.epoch();
        if last {
            self.reported.insert(from, epoch);
        }
        for (user, entries, bytes) in users.into_iter().take(REPORT_USERS_MAX) {
            if !ahead && manager_of(view, &user) != Some(self.me) {
                continue;
            }
            let map = self.maps.entry(user).or_default();
            if entries == 0 {
                map.nodes.remove(&from);
            } else {
                map.nodes.insert(from, (entries, bytes));
            }
        }
    }

    /// The live nodes (this one too) whose full report for this view has
    /// not arrived.
    pub fn reports_missing(&self, view: &View) -> Vec<NodeId> {
        live_nodes(view)
            .filter(|n| self.reported.get(n) != Some(&view.epoch()))
            .collect()
    }

    /// `from` asks for `user`'s mailbox under `token`: granted when free,
    /// already its own, its lease is over or its holder is down. A full
    /// table first sheds expired leases; still full, new locks are refused.
    pub fn lock(&mut self, view: &View, from: NodeId, user: &str, token: u64, now_ms: u64) -> bool {
        if self.locks.len() >= self.locks_max {
            self.locks.retain(|_, l| l.until_ms > now_ms);
        }
        let free = match self.locks.get(user) {
            None => true,
            Some(l) => l.token == token || l.until_ms <= now_ms || !is_live(view, l.holder),
        };
        if free && (self.locks.len() < self.locks_max || self.locks.contains_key(user)) {
            self.locks.insert(
                user.to_owned(),
                MailboxLock {
                    holder: from,
                    token,
                    until_ms: now_ms + self.lease_ms,
                },
            );
            true
        } else {
            false
        }
    }

    /// Releases `user`'s lock if `token` holds it.
    pub fn unlock(&mut self, user: &str, token: u64) {
        if self.locks.get(user).is_some_and(|l| l.token == token) {
            self.locks.remove(user);
        }
    }

    /// Login throttling for `keys` (each with its most failures per window):
    /// with `failed`, counts one failure on each first. True when any key
    /// has used up its failures in the current window.
    pub fn throttle(&mut self, keys: &[(String, u32)], window_ms: u64, failed: bool, now_ms: u64) -> bool {
        let live = |start: u64| now_ms.saturating_sub(start) < window_ms;
        if failed {
            for (key, _) in keys {
                if !self.throttle.contains_key(key) && self.throttle.len() >= THROTTLE_KEYS_MAX {
                    self.throttle.retain(|_, (start, _)| live(*start));
                    if self.throttle.len() >= THROTTLE_KEYS_MAX {
                        let drop: Vec<String> = self.throttle.keys().take(THROTTLE_KEYS_MAX / 10).cloned().collect();
                        for k in drop {
                            self.throttle.remove(&k);
                        }
                    }
                }
                let e = self.throttle.entry(key.clone()).or_insert((now_ms, 0));
                if !live(e.0) {
                    *e = (now_ms, 0);
                }
                e.1 = e.1.saturating_add(1);
            }
        }
        keys.iter().any(|(key, max)| {
            self.throttle
                .get(key)
                .is_some_and(|(start, n)| live(*start) && *n >= *max)
        })
    }

    /// Greylisting: a triplet first tried now is deferred (false); tried
    /// again `delay_ms` or more after its first try, and within
    /// `lifetime_ms` of it, it passes (true), and keeps passing while it
    /// comes back within `lifetime_ms` of its last pass.
    pub fn greylist(&mut self, key: &str, delay_ms: u64, lifetime_ms: u64, now_ms: u64) -> bool {
        if let Some(e) = self.greylist.get_mut(key) {
            let (first, passed) = *e;
            if passed != 0 && now_ms.saturating_sub(passed) <= lifetime_ms {
                e.1 = now_ms;
                return true;
            }
            if passed == 0 && now_ms.saturating_sub(first) <= lifetime_ms {
                if now_ms.saturating_sub(first) >= delay_ms {
                    e.1 = now_ms;
                    return true;
                }
                return false;
            }
        } else if self.greylist.len() >= GREYLIST_KEYS_MAX {
            let live = |(first, passed): (u64, u64)| now_ms.saturating_sub(first.max(passed)) <= lifetime_ms;
            self.greylist.retain(|_, e| live(*e));
            if self.greylist.len() >= GREYLIST_KEYS_MAX {
                let drop: Vec<String> = self.greylist.keys().take(GREYLIST_KEYS_MAX / 10).cloned().collect();
                for k in drop {
                    self.greylist.remove(&k);
                }
            }
        }
        self.greylist.insert(key.to_owned(), (now_ms, 0));
        false
    }

    /// `node` waits for changes to `user`'s mailbox until `until_ms`;
    /// false when the table is full of live watches (the node then polls).
    pub fn watch(&mut self, user: &str, node: NodeId, now_ms: u64, until_ms: u64) -> bool {
        if !self.watchers.contains_key(user) && self.watchers.len() >= WATCHED_USERS_MAX {
            self.watchers.retain(|_, w| {
                w.retain(|(_, until)| *until > now_ms);
                !w.is_empty()
            });
            if self.watchers.len() >= WATCHED_USERS_MAX {
                return false;
            }
        }
        let w = self.watchers.entry(user.to_owned()).or_default();
        match w.iter_mut().find(|(n, _)| *n == node) {
            Some(e) => e.1 = until_ms,
            None => w.push((node, until_ms)),
        }
        true
    }

    /// The nodes waiting for changes to `user`'s mailbox now (expired
    /// watches go).
    pub fn watchers(&mut self, user: &str, now_ms: u64) -> Vec<NodeId> {
        let Some(w) = self.watchers.get_mut(user) else {
            return Vec::new();
        };
        w.retain(|(_, until)| *until > now_ms);
        let nodes: Vec<NodeId> = w.iter().map(|(n, _)| *n).collect();
        if nodes.is_empty() {
            self.watchers.remove(user);
        }
        nodes
    }

    /// The user's mail map as held (tests and status).
    pub fn map(&self, user: &str) -> Option<&MailMap> {
        self.maps.get(user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use placement::{NodeInfo, NodeState};

    fn view(epoch: u64, states: &[NodeState]) -> View {
        let infos = states
            .iter()
            .enumerate()
            .map(|(i, s)| NodeInfo {
                id: placement::NodeId(i as u64 + 1),
                weight: 1,
                zone: String::new(),
                state: *s,
            })
            .collect();
        View::with_slot_bits(epoch, infos, placement::MIN_SLOT_BITS).expect("view")
    }

    const UP: NodeState = NodeState::Up;
    const DOWN: NodeState = NodeState::Down;

    /// Users that node `me` manages in `v`.
    fn managed(v: &View, me: NodeId) -> Vec<String> {
        (0..200)
            .map(|i| format!("u{i}@example.org"))
            .filter(|u| manager_of(v, u) == Some(me))
            .collect()
    }

    #[test]
    fn a_map_is_complete_only_once_every_live_node_reported_for_the_view() {
        let v = view(3, &[UP, UP, UP]);
        let mut m = Manager::new(1);
        let user = managed(&v, 1).remove(0);
        m.report(&v, 2, vec![(user.clone(), 4, 400)], 3, true);
        let Reply::MailMap { nodes, known, .. } = m.mail_map(&v, &user, 2) else {
            panic!()
        };
        assert!(!known, "nodes 1 and 3 have not reported");
        assert_eq!(nodes, vec![1, 2, 3], "every live node while incomplete");
        m.report(&v, 1, vec![(user.clone(), 4, 400)], 3, true);
        m.report(&v, 3, vec![], 3, true);
        let Reply::MailMap { nodes, known, bytes } = m.mail_map(&v, &user, 2) else {
            panic!()
        };
        assert!(known);
        assert_eq!(nodes, vec![1, 2]);
        assert_eq!(bytes, 400, "each message counted once over its two copies");
        // A report for another epoch does not count for this one.
        let v4 = view(4, &[UP, UP, UP]);
        m.take_view(&v4);
        assert_eq!(m.reports_missing(&v4), vec![1, 2, 3]);
    }

    #[test]
    fn a_report_from_ahead_is_voided_by_an_intermediate_view() {
        let (old, down, up) = (view(1, &[UP, UP]), view(2, &[UP, DOWN]), view(3, &[UP, UP]));
        let mut m = Manager::new(2);
        m.take_view(&old);
        let user = managed(&up, 2).remove(0);
        // Node 1, already on view 3, reports while node 2 is on view 1.
        m.report(&old, 1, vec![(user.clone(), 5, 500)], 3, true);
        assert!(m.map(&user).is_some(), "kept whole: the sender is ahead");
        m.take_view(&down);
        assert!(m.map(&user).is_none(), "node 2 manages nothing while down");
        m.take_view(&up);
        m.report(&up, 2, vec![], 3, true);
        let Reply::MailMap { nodes, known, .. } = m.mail_map(&up, &user, 2) else {
            panic!()
        };
        assert!(!known, "node 1's report no longer vouches for the map");
        assert!(nodes.contains(&1), "so node 1 is asked: {nodes:?}");
    }

    #[test]
    fn reports_for_users_managed_elsewhere_are_ignored() {
        let v = view(1, &[UP, UP, UP]);
        let mut m = Manager::new(1);
        let theirs = managed(&v, 2).remove(0);
        m.report(&v, 3, vec![(theirs.clone(), 1, 10)], 1, true);
        assert!(m.map(&theirs).is_none());
        // An empty entry removes the node from the map.
        let mine = managed(&v, 1).remove(0);
        m.report(&v, 3, vec![(mine.clone(), 1, 10)], 1, false);
        m.report(&v, 3, vec![(mine.clone(), 0, 0)], 1, true);
        assert!(m.map(&mine).unwrap().nodes.is_empty());
    }

    #[test]
    fn placement_prefers_the_least_loaded_and_counts_what_it_placed() {
        let v = view(1, &[UP, UP, UP, UP]);
        let mut m = Manager::new(1);
        m.observe(2, 50, 7);
        m.observe(3, 0, 7);
        m.observe(4, 0, 7);
        let user = managed(&v, 1).remove(0);
        let t = m.place(&v, &user, 100, 2, 4, 0, None);
        assert_eq!(t.len(), 2);
        assert!(!t.contains(&2), "the busy node is not chosen: {t:?}");
        let map = m.map(&user).unwrap();
        assert_eq!(map.nodes.values().map(|e| e.0).sum::<u64>(), 2);
        // No view: the mail stays here.
        let empty = View::with_slot_bits(0, Vec::new(), placement::MIN_SLOT_BITS).unwrap();
        assert_eq!(Manager::new(9).place(&empty, "x@y", 1, 2, 4, 0, None), vec![9]);
    }

    #[test]
    fn locks_are_exclusive_until_released_expired_or_their_holder_is_gone() {
        let v = view(1, &[UP, UP, UP]);
        let mut m = Manager::with_limits(1, 1_000, 2);
        let t2 = (7u64 << 32) | 1;
        assert!(m.lock(&v, 2, "a", t2, 0));
        assert!(m.lock(&v, 2, "a", t2, 10), "the holder may ask again");
        assert!(!m.lock(&v, 3, "a", 99, 10), "held by another");
        assert!(!m.lock(&v, 3, "a", 99, 1_009), "asking again renewed the lease");
        assert!(m.lock(&v, 3, "a", 99, 1_010), "the lease is over");
        m.unlock("a", t2);
        assert!(!m.lock(&v, 2, "a", t2, 1_011), "an old token unlocks nothing");
        m.unlock("a", 99);
        assert!(m.lock(&v, 2, "a", t2, 1_012));
        // Its holder down in the view: free.
        assert!(m.lock(&view(2, &[UP, DOWN, UP]), 3, "a", 5, 1_013));
        // Its holder restarted (a new run number): released.
        let mut m = Manager::new(1);
        m.observe(2, 0, 7);
        assert!(m.lock(&v, 2, "b", t2, 0));
        assert_eq!(m.observe(2, 0, 7), 0);
        assert_eq!(m.observe(2, 0, 8), 1, "a new run releases its old locks");
        assert!(m.lock(&v, 3, "b", 5, 1));
    }

    #[test]
    fn watches_last_their_lease_are_renewed_and_go_with_the_user() {
        let mut m = Manager::new(1);
        assert!(m.watch("a@x", 2, 0, 1_000));
        assert!(m.watch("a@x", 3, 0, 500));
        assert!(m.watch("a@x", 2, 100, 2_000), "renewed, not doubled");
        assert_eq!(m.watchers("a@x", 400), vec![2, 3]);
        assert_eq!(m.watchers("a@x", 600), vec![2], "3's lease ran out");
        assert_eq!(m.watchers("a@x", 2_000), Vec::<NodeId>::new());
        assert!(m.watchers.is_empty(), "a user without watchers is forgotten");
        assert_eq!(m.watchers("b@x", 0), Vec::<NodeId>::new());
    }

    #[test]
    fn greylisting_defers_a_first_try_and_passes_a_retry_after_the_delay() {
        let mut m = Manager::new(1);
        let (delay, life) = (300, 10_000);
        assert!(!m.greylist("t", delay, life, 1_000), "first try");
        assert!(!m.greylist("t", delay, life, 1_200), "too soon");
        assert!(!m.greylist("u", delay, life, 1_300), "another triplet");
        assert!(m.greylist("t", delay, life, 1_300), "after the delay");
        assert!(m.greylist("t", delay, life, 11_000), "kept while it comes back");
        assert!(!m.greylist("t", delay, life, 30_000), "forgotten after the lifetime");
        assert!(!m.greylist("u", delay, life, 20_000), "a retry too late starts again");
        assert!(m.greylist("u", delay, life, 20_300));
    }

    #[test]
    fn login_failures_are_throttled_per_key_in_windows_with_bounded_memory() {
        let mut m = Manager::new(1);
        let keys = |ip: &str, user: &str| vec![(format!("addr:{ip}"), 3), (format!("user:{user}"), 5)];
        let w = 1_000;
        for _ in 0..3 {
            assert!(!m.throttle(&keys("a", "x"), w, false, 0));
            m.throttle(&keys("a", "x"), w, true, 0);
        }
        assert!(m.throttle(&keys("a", "x"), w, false, 10), "address a used its 3");
        assert!(!m.throttle(&keys("b", "y"), w, false, 10), "others are not affected");
        // Account x from other addresses: 2 more failures use up its 5.
        assert!(!m.throttle(&keys("c", "x"), w, false, 10));
        m.throttle(&keys("c", "x"), w, true, 10);
        m.throttle(&keys("d", "x"), w, true, 10);
        assert!(
            m.throttle(&keys("e", "x"), w, false, 20),
            "account x throttled from anywhere"
        );
        // ... for the window only: its owner gets back in after it.
        assert!(!m.throttle(&keys("e", "x"), w, false, 1_001), "the window is over");
        // Many addresses: the table stays bounded.
        for i in 0..(THROTTLE_KEYS_MAX + 50) {
            m.throttle(&[(format!("addr:{i}"), 3)], w, true, 2_000);
        }
        assert!(m.throttle.len() <= THROTTLE_KEYS_MAX);
    }

    #[test]
    fn a_full_lock_table_sheds_expired_leases_then_refuses() {
        let v = view(1, &[UP, UP]);
        let mut m = Manager::with_limits(1, 100, 2);
        assert!(m.lock(&v, 2, "a", 1, 0));
        assert!(m.lock(&v, 2, "b", 2, 50));
        assert!(!m.lock(&v, 2, "c", 3, 60), "full");
        assert!(m.lock(&v, 2, "c", 3, 120), "'a' expired and was shed");
        assert!(!m.lock(&v, 2, "d", 4, 130), "'b' and 'c' still hold");
    }

    proptest::proptest! {
        /// Whatever order reports and views come in, a map that says it is
        /// complete lists every node that reported entries for the user
        /// under the current view (and nothing a node withdrew).
        #[test]
        fn complete_maps_are_never_partial(
            ops in proptest::collection::vec((0u8..4, 1u64..4, 1u64..5, 0u64..3), 1..60),
        ) {
            let views: Vec<View> = (1..=4).map(|e| view(e, &[UP, UP, UP])).collect();
            let user = managed(&views[0], 1).remove(0);
            let mut m = Manager::new(1);
            let mut cur = 0usize;
            m.take_view(&views[cur]);
            // What each node holds of the user (the truth).
            let mut holds: BTreeMap<NodeId, u64> = BTreeMap::new();
            for (kind, node, epoch, entries) in ops {
                match kind {
                    0 => { cur = (epoch as usize - 1).min(3).max(cur); m.take_view(&views[cur]); }
                    1 => {
                        // A full report by a node on view `epoch` (never behind the truth).
                        holds.insert(node, entries);
                        let e = epoch.max(views[cur].epoch());
                        m.report(&views[cur], node, vec![(user.clone(), entries, entries * 10)], e, true);
                    }
                    _ => {}
                }
                if let Reply::MailMap { nodes, known: true, .. } = m.mail_map(&views[cur], &user, 2) {
                    for (n, e) in &holds {
                        if *e > 0 {
                            proptest::prop_assert!(nodes.contains(n), "{nodes:?} lacks {n}: {holds:?}");
                        }
                    }
                }
            }
        }
    }
}
