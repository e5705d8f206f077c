//! The node's side of replication: the replica protocol over the cluster's
//! QUIC transport, and the background duties that keep copies converging
//! (view changes → reports and anti-entropy; the update log; tombstone
//! expiry).

use std::sync::Arc;
use std::time::Duration;

use membership::Membership;
use replication::replica::{Answer, BoxFuture, Call, Network, NodeId, Replicator, TransportError};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::rpc::{ClusterReply, ClusterRequest, QuicTransport, ReplicaService};

/// Placement's slot table size on a node: 2^18 slots (512 KiB), so a view
/// builds in milliseconds; balance stays within a few percent up to
/// hundreds of nodes.
pub const SLOT_BITS: u32 = 18;
/// How often logged updates are offered to replicas that are back.
const UPDATE_REPLAY_INTERVAL: Duration = Duration::from_secs(1);
/// How often a manager asks for mail-map reports missing for the view.
const REPORT_CHASE_INTERVAL: Duration = Duration::from_secs(1);
/// How often replicas compare digests without a view change.
const ANTI_ENTROPY_INTERVAL: Duration = Duration::from_secs(30);
/// How often every node re-reports to the managers (mail maps drift as
/// mail is deleted) and expires old tombstones.
const REPORT_INTERVAL: Duration = Duration::from_secs(60);
/// Wire deadline of one replica call; the replicator's own (shorter,
/// size-dependent) deadline governs.
const WIRE_DEADLINE: Duration = Duration::from_secs(120);
/// How often the repair duty looks for copies to restore or hand off.
const REPAIR_INTERVAL: Duration = Duration::from_secs(1);
/// How often the rebalancer compares stored bytes with the other nodes
/// (and moves at most this long's worth of `--repair-rate` per round).
const REBALANCE_INTERVAL: Duration = Duration::from_secs(2);
/// How long a repair walk that found nothing to do is not repeated.
const REPAIR_RECHECK: Duration = Duration::from_secs(10);

pub type NodeReplicator = Replicator<QuicNet>;

impl ReplicaService for NodeReplicator {
    fn handle(&self, call: Call) -> BoxFuture<'_, Answer> {
        Box::pin(Replicator::handle(self, call))
    }

    fn under_replicated(&self) -> u64 {
        Replicator::under_replicated(self)
    }

    fn repair_progress(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.counters.repair_pending.load(Relaxed),
            self.counters.repairs_copied.load(Relaxed),
        )
    }
}

/// The replica protocol over QUIC: node ids are mapped to cluster
/// addresses through the current view.
pub struct QuicNet {
    pub transport: Arc<QuicTransport>,
    pub membership: Membership,
}

impl Network for QuicNet {
    fn call(&self, to: NodeId, call: Call) -> BoxFuture<'_, Result<Answer, TransportError>> {
        Box::pin(async move {
            let addr = self
                .membership
                .view()
                .node(to)
                .map(|n| n.addrs.cluster.clone())
                .ok_or_else(|| TransportError(format!("node {to} is not in the view")))?;
            let req = ClusterRequest::Replica(Box::new(call));
            match self.transport.request_within(&addr, &req, WIRE_DEADLINE).await {
                Ok(ClusterReply::Replica(answer)) => Ok(*answer),
                Ok(ClusterReply::Refused(why)) => Err(TransportError(format!("refused: {why}"))),
                Ok(_) => Err(TransportError("unexpected reply kind".to_owned())),
                Err(e) => Err(TransportError(format!("{e:#}"))),
            }
        })
    }
}

/// Builds placement's view from the membership view (off the executor).
pub async fn placement_view(membership: &Membership) -> Option<Arc<placement::View>> {
    let view = membership.view();
    match tokio::task::spawn_blocking(move || view.placement_view(SLOT_BITS)).await {
        Ok(Ok(v)) => Some(Arc::new(v)),
        Ok(Err(e)) => {
            warn!(error = ?e, "cannot build the placement view");
            None
        }
        Err(e) => {
            warn!(error = %e, "placement view task failed");
            None
        }
    }
}

/// Follows view changes and runs the replication duties until `stop`.
/// Two tasks: one applies each new view at once (placement must not lag
/// the membership view behind a slow round), the other does the work a
/// view change calls for (reports to the new managers, anti-entropy) and
/// the periodic duties; beside them, the repairs and the watches of
/// waiting sessions (`replication::replica::watch`).
pub async fn duties(
    replica: Arc<NodeReplicator>,
    membership: Membership,
    repair_limit: Arc<replication::replica::RateLimit>,
    stop: watch::Receiver<bool>,
) {
    let changed = Arc::new(tokio::sync::Notify::new());
    let follower = tokio::spawn(follow_views(
        replica.clone(),
        membership.clone(),
        changed.clone(),
        stop.clone(),
    ));
    let chaser = tokio::spawn(chase_reports(replica.clone(), stop.clone()));
    let repairer = tokio::spawn(repair(replica.clone(), repair_limit, stop.clone()));
    let watcher = tokio::spawn({
        let (replica, stop) = (replica.clone(), stop.clone());
        async move { replica.run_watches(stop).await }
    });
    work(replica, changed, stop).await;
    follower.abort();
    chaser.abort();
    repairer.abort();
    watcher.abort();
}

/// Restores R copies after a node is gone and hands a draining node's
/// copies off: a round whenever a replica set held here names a gone node
/// (or is short of R while more nodes are up), at most every
/// [`REPAIR_INTERVAL`]; and every [`REBALANCE_INTERVAL`], when nothing
/// needs repair, moves copies from nodes above their share of the stored
/// bytes to nodes below it (a node that joined). Copies at most `rate`
/// bytes a second, both together. In a task of its own: a long repair does
/// not hold up reports or anti-entropy.
async fn repair(
    replica: Arc<NodeReplicator>,
    limit: Arc<replication::replica::RateLimit>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(REPAIR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // After a round that found nothing for this node to do (another member
    // coordinates those messages), the walk is not repeated until the view
    // or the store changes, or REPAIR_RECHECK passes.
    let mut idle: Option<((u64, u64, usize), std::time::Instant)> = None;
    let mut rebalance = tokio::time::interval(REBALANCE_INTERVAL);
    rebalance.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {
                if !replica.repair_wanted() {
                    idle = None;
                    continue;
                }
                let sig = (replica.view().epoch(), replica.store().stats().entries, replica.store().replica_sets().len());
                if idle.is_some_and(|(s, at)| s == sig && at.elapsed() < REPAIR_RECHECK) {
                    continue;
                }
                let round = replica.repair_round(&limit).await;
                if round.failed > 0 {
                    debug!(?round, "repair round left work for the next");
                }
                idle = (round.planned == 0).then(|| (sig, std::time::Instant::now()));
            }
            _ = rebalance.tick() => {
                // Repairs this node has to make come first (R copies, then
                // evenness); messages that need repair are never moved.
                if idle.is_some() || !replica.repair_wanted() {
                    let budget = limit.rate().saturating_mul(REBALANCE_INTERVAL.as_secs());
                    replica.rebalance_round(&limit, budget).await;
                }
            }
        }
    }
}

async fn follow_views(
    replica: Arc<NodeReplicator>,
    membership: Membership,
    changed: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let mut views = membership.subscribe();
    let mut epoch = None;
    // The feature level is no view change: looked at every few seconds.
    let mut levels = tokio::time::interval(LEVEL_LOOK);
    levels.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Bodies hashed once (record kind 8) once every node reads them.
        replica
            .store()
            .write_hashed_bodies(membership.feature_level() >= HASHED_BODIES_LEVEL);
        let current = membership.view().epoch;
        if epoch != Some(current)
            && let Some(v) = placement_view(&membership).await
        {
            epoch = Some(current);
            replica.set_view(v);
            debug!(epoch = current, "placement view applied");
            changed.notify_one();
            continue;
        }
        tokio::select! {
            _ = stop.changed() => return,
            r = views.changed() => if r.is_err() { return },
            _ = levels.tick() => {}
        }
    }
}

/// The feature level from which every node reads body records of kind 8
/// (release 0.3.0's).
const HASHED_BODIES_LEVEL: u32 = 3;
/// How often the store's record kinds follow the feature level.
const LEVEL_LOOK: std::time::Duration = std::time::Duration::from_secs(5);

/// Mail maps answer with every live node until each has reported for the
/// current view: every second, ask those whose report is missing. A task of
/// its own, so that a peer slow to answer does not hold up the other duties.
async fn chase_reports(replica: Arc<NodeReplicator>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(REPORT_CHASE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {
                let asked = replica.chase_reports().await;
                if asked > 0 {
                    debug!(asked, "asked for missing mail-map reports");
                }
            }
        }
    }
}

async fn work(replica: Arc<NodeReplicator>, changed: Arc<tokio::sync::Notify>, mut stop: watch::Receiver<bool>) {
    let mut replay = tokio::time::interval(UPDATE_REPLAY_INTERVAL);
    let mut anti_entropy = tokio::time::interval(ANTI_ENTROPY_INTERVAL);
    let mut report = tokio::time::interval(REPORT_INTERVAL);
    for t in [&mut replay, &mut anti_entropy, &mut report] {
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t.reset();
    }
    // This node's mail maps start empty: ask the others for theirs.
    replica.ask_reports().await;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = changed.notified() => {
                let epoch = replica.view().epoch();
                let sent = replica.report_round().await;
                debug!(epoch, users_reported = sent, "reported to the users' managers");
                let r = replica.anti_entropy_round().await;
                if r.users_differing > 0 {
                    info!(epoch, report = ?r, "anti-entropy after a view change");
                }
            }
            _ = replay.tick() => {
                if replica.pending_updates() > 0 {
                    let n = replica.replay_updates().await;
                    if n > 0 {
                        info!(updates = n, "logged updates delivered to returning replicas");
                    }
                }
                replica.make_missing_copies().await;
                replica.retry_unlocks().await;
            }
            _ = anti_entropy.tick() => {
                replica.anti_entropy_round().await;
            }
            _ = report.tick() => {
                replica.report_round().await;
                let n = replica.expire_tombstones().await;
                if n > 0 {
                    info!(tombstones = n, "tombstones every replica holds forgotten");
                }
            }
        }
    }
}
