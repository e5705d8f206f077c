//! Failure detection: each node pings its ring neighbours (membership's
//! `watch` module: `--watchers` of them, 3 by default) and the Raft voters,
//! and reports to the leader the neighbours silent for the failure timeout
//! and the down ones that answer; the leader pings each reported node
//! itself and decides through Raft. A node's pings a round no longer grow
//! with the cluster (every node pinged every node until 0.3.0: a million
//! pings a round at 1 000 nodes); the leader's work grows only with the
//! nodes that changed.
//!
//! The ring is used once the cluster runs at feature level 3, when every
//! node reads the reports; below it every node pings every node and the
//! leader decides by its own pings, as 0.2.0 did. The voters (at most
//! five) are pinged by every node, by the voters every round and by the
//! others once a second: that is how a node knows whether it reaches a
//! majority (`/health`, `cluster status`).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use membership::{ClusterView, NodeState};
use tracing::{debug, info, warn};

use super::node::Cluster;
use super::rpc::{ClusterReply, ClusterRequest, PING_TIMEOUT, join_all};

/// How often every node pings its targets. With `PING_TIMEOUT` this bounds
/// how late a failure is noticed past `--failure-timeout-ms`.
pub const PING_INTERVAL: Duration = Duration::from_millis(250);
/// The feature level from which the ring is used.
const RING_LEVEL: u32 = 3;
/// A node that does not vote pings the voters (for its majority note)
/// every this many rounds (once a second), not every round: every node
/// pings the voters, so each voter's share grows with the cluster.
pub const LEARNER_VOTER_ROUNDS: u64 = 4;

/// What one round of pings found.
pub struct Round {
    /// Every node pinged, and whether it answered.
    pub results: Vec<(u64, bool)>,
    /// Up nodes silent for the failure timeout.
    pub silent: Vec<u64>,
    /// Down nodes that answered.
    pub answered: Vec<u64>,
    /// Whether the voters were among the pinged (the majority note is
    /// taken only then).
    pub voters_pinged: bool,
}

/// One node's failure detector: whom it pings, and when each last answered.
pub struct Detector {
    failure_timeout: Duration,
    watchers: usize,
    last_ok: HashMap<u64, Instant>,
    last_round: Instant,
    rounds: u64,
}

impl Detector {
    pub fn new(failure_timeout: Duration, watchers: usize) -> Detector {
        Detector {
            failure_timeout,
            watchers: watchers.max(1),
            last_ok: HashMap::new(),
            last_round: Instant::now(),
            rounds: 0,
        }
    }

    /// The nodes this node pings this round, and whether the voters are
    /// among them: every other node below the ring's level, else its ring
    /// targets and the voters (by a node that does not vote, every
    /// [`LEARNER_VOTER_ROUNDS`] rounds).
    pub fn targets(&self, cluster: &Cluster, view: &ClusterView) -> (BTreeSet<u64>, bool) {
        let me = cluster.id();
        let (mut out, voters_pinged) = if cluster.membership.feature_level() >= RING_LEVEL {
            let mut t =
                membership::watch::ring_targets(view.nodes.values().map(|n| (n.id, n.state)), me, self.watchers);
            let voter = view.node(me).is_some_and(|n| n.voter);
            let now = voter || self.rounds.is_multiple_of(LEARNER_VOTER_ROUNDS);
            if now {
                t.extend(view.voters());
            }
            (t, now)
        } else {
            (view.nodes.keys().copied().collect(), true)
        };
        out.remove(&me);
        (out, voters_pinged)
    }

    /// Pings the targets once. A node first pinged gets a full timeout
    /// from then; a node that did not run for a while (its own rounds
    /// stalled: SIGSTOP, a stalled VM) restarts every timer instead of
    /// judging the others by its own silence.
    pub async fn round(&mut self, cluster: &Cluster, view: &ClusterView) -> Round {
        let stall = (self.failure_timeout / 2).max((PING_INTERVAL + PING_TIMEOUT) * 2);
        let start = Instant::now();
        if start.duration_since(self.last_round) > stall {
            warn!(
                stalled_ms = start.duration_since(self.last_round).as_millis() as u64,
                "this node did not run for a while; restarting the failure timers"
            );
            self.last_ok.values_mut().for_each(|t| *t = start);
        }
        let (targets, voters_pinged) = self.targets(cluster, view);
        self.rounds += 1;
        let results = join_all(
            targets
                .iter()
                .filter_map(|id| view.node(*id))
                .map(|n| ping(cluster, n.id, n.addrs.cluster.clone())),
        )
        .await;
        let now = Instant::now();
        self.last_round = now;
        // Only the current targets: one that comes back later starts afresh.
        self.last_ok.retain(|id, _| targets.contains(id));
        let (mut silent, mut answered) = (Vec::new(), Vec::new());
        for &(id, ok) in &results {
            let seen = self.last_ok.entry(id).or_insert(start);
            if ok {
                *seen = start;
            }
            match (view.node(id).map(|n| n.state), ok) {
                (Some(NodeState::Up), false) if now.duration_since(*seen) >= self.failure_timeout => silent.push(id),
                (Some(NodeState::Down), true) => answered.push(id),
                _ => {}
            }
        }
        Round {
            results,
            silent,
            answered,
            voters_pinged,
        }
    }

    /// A node the leader's own re-check found alive.
    fn saw(&mut self, id: u64) {
        self.last_ok.insert(id, Instant::now());
    }
}

/// A node that is not the leader tells the leader what its round found
/// (nothing when there is nothing to tell); in the background, so that an
/// unreachable leader does not stretch the rounds.
pub fn report(cluster: &Cluster, view: &ClusterView, round: &Round) {
    if round.silent.is_empty() && round.answered.is_empty() {
        return;
    }
    if cluster.membership.feature_level() < RING_LEVEL {
        return; // the leader pings everyone itself
    }
    let Some(leader) = cluster.membership.leader().and_then(|l| view.node(l)) else {
        return;
    };
    let (t, addr) = (cluster.transport.clone(), leader.addrs.cluster.clone());
    let req = ClusterRequest::Suspects {
        from: cluster.id(),
        silent: round.silent.clone(),
        answered: round.answered.clone(),
    };
    tokio::spawn(async move {
        match tokio::time::timeout(PING_TIMEOUT, t.request(&addr, &req)).await {
            Ok(Ok(ClusterReply::Done)) => {}
            other => debug!(?other, "failure report not taken by the leader"),
        }
    });
}

/// The leader's decisions for this round, from its own pings and the
/// reports: a node silent (by either) is pinged once more, concurrently,
/// right before it is marked down; a down node that answered another
/// node is pinged before it is marked up; one that answered the leader is
/// marked up. Each verdict carries the leader's `term` (the state machine
/// refuses it from any other). The leader marks itself up if a stale
/// verdict got through before (it never pings itself).
pub async fn decide(cluster: &Cluster, detector: &mut Detector, view: &ClusterView, term: u64, own: &Round) {
    let me = cluster.id();
    let (reported_silent, reported_answered) = cluster.reports.take();
    let state = |id: &u64| view.node(*id).map(|n| n.state);
    let mut changes: Vec<(u64, NodeState)> = own.answered.iter().map(|&id| (id, NodeState::Up)).collect();
    if state(&me) == Some(NodeState::Down) {
        changes.push((me, NodeState::Up));
    }
    let check_down: BTreeSet<u64> = own
        .silent
        .iter()
        .chain(reported_silent.keys())
        .copied()
        .filter(|id| *id != me && state(id) == Some(NodeState::Up))
        .collect();
    let check_up: BTreeSet<u64> = reported_answered
        .keys()
        .copied()
        .filter(|id| state(id) == Some(NodeState::Down) && !own.answered.contains(id))
        .collect();
    let rechecks = join_all(
        check_down
            .iter()
            .chain(&check_up)
            .filter_map(|id| view.node(*id))
            .map(|n| ping(cluster, n.id, n.addrs.cluster.clone())),
    )
    .await;
    for (id, ok) in rechecks {
        let by = reported_silent.get(&id).or(reported_answered.get(&id));
        match (check_down.contains(&id), ok) {
            (true, true) => {
                info!(node = id, reported_by = ?by, "failure detector: answered the re-check; not marking it down");
                detector.saw(id);
            }
            (true, false) => changes.push((id, NodeState::Down)),
            (false, true) => changes.push((id, NodeState::Up)),
            (false, false) => {}
        }
    }
    for (id, state) in changes {
        let by = reported_silent.get(&id).or(reported_answered.get(&id));
        info!(node = id, ?state, term, reported_by = ?by, "failure detector: marking node");
        if let Err(e) = cluster.membership.set_node_verdict(id, state, term).await {
            warn!(node = id, error = %e, "cannot change node state");
        }
    }
}

/// Notes whether the voters that answered this round (and this node, if it
/// votes) are a majority; says so in the log when that changes.
pub fn note_majority(cluster: &Cluster, view: &ClusterView, results: &[(u64, bool)]) {
    use std::sync::atomic::Ordering;
    let me = cluster.id();
    let voters = view.voters();
    if voters.is_empty() {
        return;
    }
    let answered =
        results.iter().filter(|(id, ok)| *ok && voters.contains(id)).count() + usize::from(voters.contains(&me));
    let majority = answered * 2 > voters.len();
    let before = cluster.majority.swap(majority, Ordering::Relaxed);
    if before && !majority {
        warn!(
            answered,
            voters = voters.len(),
            "cannot reach a majority of the voters: the view and the directory cannot change here; serving mail by the last view"
        );
    } else if !before && majority {
        info!(
            answered,
            voters = voters.len(),
            "a majority of the voters is reachable again"
        );
    }
}

/// One ping within `PING_TIMEOUT`: whether node `id` answered.
fn ping(cluster: &Cluster, id: u64, addr: String) -> impl std::future::Future<Output = (u64, bool)> + Send + 'static {
    let t = cluster.transport.clone();
    async move {
        let r = tokio::time::timeout(PING_TIMEOUT, t.request(&addr, &ClusterRequest::Ping)).await;
        let ok = matches!(r, Ok(Ok(ClusterReply::Pong { id: who, .. })) if who == id);
        if !ok {
            // Maybe a stale connection to a restarted peer: start afresh.
            t.forget(&addr);
        }
        (id, ok)
    }
}
