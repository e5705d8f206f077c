//! What every node does in the background: pings its ring neighbours
//! (`detector`), and, as leader, marks nodes down and up, keeps the voters odd and healthy,
//! and steps down while draining or before a stop; as a voter, holds the
//! CA key. (The feature level has its own: `levels::duty`.)

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use membership::NodeState;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::detector::{self, Detector, PING_INTERVAL, note_majority};
use super::node::Cluster;
use super::rpc::{ClusterReply, ClusterRequest, PING_TIMEOUT};
use super::wire::ClusterCa;
use crate::files::write_secret;

/// How often the leader checks the voter set.
const VOTER_INTERVAL: Duration = Duration::from_secs(1);
/// Raft voters at most: more only slows commits down.
pub const VOTERS_MAX: usize = 5;
/// How often a voter checks that it holds the CA key.
const CA_KEY_INTERVAL: Duration = Duration::from_secs(2);

/// Every voter holds the CA key (see the module docs): a voter without it
/// fetches it from another voter. Checked every few seconds.
pub async fn ca_key(cluster: Cluster, dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let me = cluster.id();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CA_KEY_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let view = cluster.membership.view();
        if !view.node(me).is_some_and(|n| n.voter) || dir.join("ca.key").exists() {
            continue;
        }
        for n in view.nodes.values().filter(|n| n.voter && n.id != me) {
            let r = tokio::time::timeout(
                PING_TIMEOUT * 4,
                cluster.transport.request(&n.addrs.cluster, &ClusterRequest::CaKey),
            )
            .await;
            if let Ok(Ok(ClusterReply::CaKey(pem))) = r {
                // Keep it only if it is the key of this cluster's CA.
                let ca = std::fs::read(dir.join("ca.der")).unwrap_or_default();
                if !ClusterCa::key_matches(&ca, &pem) {
                    warn!(
                        from = n.id,
                        "the CA key received does not match this cluster's CA; ignored"
                    );
                    continue;
                }
                let tmp = dir.join("ca.key.new");
                if write_secret(&tmp, pem.trim()).is_ok() && std::fs::rename(&tmp, dir.join("ca.key")).is_ok() {
                    info!(from = n.id, "fetched the CA key (this node is a voter)");
                    break;
                }
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
}

/// A leader that is leaving (draining, or stepping down before it is
/// stopped: [`Cluster::step_down`]) hands leadership over: it stops
/// sending heartbeats and standing for election (openraft 0.9 cannot
/// transfer leadership nor remove the leader), and asks an up voter to
/// call an election; the followers' leases run out without heartbeats, so
/// that voter (or another) wins, and (draining) the new leader moves the
/// vote away from the draining node. A node that stays stands for
/// election again.
async fn hand_over_if_leaving(cluster: &Cluster, view: &membership::ClusterView, leading: bool) {
    let me = cluster.id();
    let draining = view.node(me).is_some_and(|n| n.state == NodeState::Draining) || cluster.stepping_down();
    let raft = cluster.membership.raft();
    raft.runtime_config().elect(!draining);
    if !draining || !leading {
        raft.runtime_config().heartbeat(true);
        return;
    }
    let Some(target) = view
        .nodes
        .values()
        .filter(|n| n.id != me && n.voter && n.state == NodeState::Up)
        .min_by_key(|n| n.id)
    else {
        // No up voter to take over: stay leader (the voters are changed
        // first, by `desired_voters`, once learners are up).
        raft.runtime_config().heartbeat(true);
        return;
    };
    raft.runtime_config().heartbeat(false);
    info!(node = target.id, "leaving: handing leadership over");
    match cluster
        .transport
        .request(&target.addrs.cluster, &ClusterRequest::TakeLeadership)
        .await
    {
        Ok(ClusterReply::Done) => {}
        other => {
            tracing::debug!(node = target.id, reply = ?other.err(), "leadership hand-over asked; the leases decide")
        }
    }
}

/// The voters the cluster should have. Their number is odd, at most
/// `VOTERS_MAX`, and grows with the up nodes; it never shrinks because a
/// voter died: a down voter is replaced by an up learner when there is one,
/// and kept otherwise (shrinking on every failure and growing on every
/// restart would churn Raft's configuration for nothing: five voters with
/// one down still commit). The leader always votes.
pub fn desired_voters(leader: u64, current: &BTreeSet<u64>, up: &BTreeSet<u64>) -> BTreeSet<u64> {
    let odd = |n: usize| if n.is_multiple_of(2) { n.saturating_sub(1) } else { n };
    let grow_to = odd(up.len().clamp(1, VOTERS_MAX));
    let size = odd(current.len().max(grow_to).min(VOTERS_MAX)).max(1);
    let mut out = BTreeSet::from([leader]);
    let up_voters = current.iter().filter(|id| up.contains(id));
    let learners = up.iter().filter(|id| !current.contains(id));
    let down_voters = current.iter().filter(|id| !up.contains(id));
    for id in up_voters.chain(learners).chain(down_voters) {
        if out.len() >= size {
            break;
        }
        out.insert(*id);
    }
    out
}

/// Failure detection every round (see `detector`): every node pings its
/// targets; a node that is not the leader reports what it found to the
/// leader, and the leader alone acts on its own pings and the reports:
/// marks the silent nodes down and the answering ones up, and keeps the
/// voter set healthy and odd.
///
/// Verdicts are fenced three ways (a paused or partitioned leader once
/// committed stale ones through its successor): each carries the term it
/// was decided in and the state machine refuses it from any other term; a
/// node that did not run for a while restarts every timer instead of
/// judging the others by its own silence; and a `Down` verdict is
/// re-checked with one more ping right before it is committed.
pub async fn leader(cluster: Cluster, failure_timeout: Duration, watchers: usize, mut stop: watch::Receiver<bool>) {
    let me = cluster.id();
    let mut detector = Detector::new(failure_timeout, watchers);
    let mut next_voter_check = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PING_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let view = cluster.membership.view();
        let round = detector.round(&cluster, &view).await;
        if round.voters_pinged {
            note_majority(&cluster, &view, &round.results);
        }
        let leading = cluster.membership.leading_term();
        hand_over_if_leaving(&cluster, &view, leading.is_some()).await;
        let Some(term) = leading else {
            detector::report(&cluster, &view, &round);
            continue;
        };
        // Only a leader that is still a voter in the view acts (a removed
        // leader may run on briefly: it must not change anything).
        if !view.node(me).is_some_and(|n| n.voter) {
            continue;
        }
        detector::decide(&cluster, &mut detector, &view, term, &round).await;
        let now = Instant::now();
        if now >= next_voter_check {
            next_voter_check = now + VOTER_INTERVAL;
            let view = cluster.membership.view();
            let current = view.voters();
            let up: BTreeSet<u64> = view
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Up)
                .map(|n| n.id)
                .collect();
            let want = desired_voters(me, &current, &up);
            if want != current {
                info!(?current, ?want, "changing the raft voters");
                if let Err(e) = cluster.membership.change_membership(want).await {
                    warn!(error = %e, "cannot change the voters");
                }
            }
        }
    }
}

/// A node that restarts with other details than the view has for it (a
/// new `--name`, listener address or `--role`) puts them in the view
/// (`AddNode`, which a known node's new details go through), retrying
/// until it is committed: otherwise the cluster would go on sending it
/// queue shards it no longer works, or clients to addresses it no longer
/// serves. A draining node is left as it is (`AddNode` would make it up
/// again and end the operator's drain).
pub async fn announce(cluster: Cluster, me: membership::NodeInfo, mut stop: watch::Receiver<bool>) {
    let deadline = Instant::now() + ANNOUNCE_WITHIN;
    loop {
        let view = cluster.membership.view();
        match view.node(me.id) {
            Some(n) if n.name == me.name && n.addrs == me.addrs => return,
            Some(n) if n.state == membership::NodeState::Draining => {
                warn!(
                    "this node's details changed while it drains: the view keeps the old ones until it is added again"
                );
                return;
            }
            _ => {}
        }
        match cluster.membership.write(membership::Command::AddNode(me.clone())).await {
            Ok(r) if r.result.is_ok() => {
                info!(name = %me.name, "this node's new details are in the view");
                return;
            }
            Ok(r) => debug!(result = ?r.result, "new details not taken yet"),
            Err(e) => debug!(error = %e, "new details not written yet"),
        }
        if Instant::now() > deadline {
            warn!("this node's new details did not reach the view; the old ones stay until it restarts");
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How long a restarted node keeps trying to put its new details in the
/// view.
const ANNOUNCE_WITHIN: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::desired_voters;
    use std::collections::BTreeSet;

    fn s(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn voters_stay_odd_and_healthy() {
        // One node: itself.
        assert_eq!(desired_voters(1, &s(&[1]), &s(&[1])), s(&[1]));
        // Two up nodes: one voter.
        assert_eq!(desired_voters(1, &s(&[1]), &s(&[1, 2])), s(&[1]));
        // Three: all vote.
        assert_eq!(desired_voters(1, &s(&[1]), &s(&[1, 2, 3])), s(&[1, 2, 3]));
        // Six up: five voters, keeping current ones first.
        assert_eq!(
            desired_voters(4, &s(&[4, 5, 6]), &s(&[1, 2, 3, 4, 5, 6])),
            s(&[1, 2, 4, 5, 6])
        );
        // A down voter is replaced by an up learner.
        assert_eq!(desired_voters(1, &s(&[1, 2, 3]), &s(&[1, 2, 4])), s(&[1, 2, 4]));
        // Five voters, one dies, no learner to take its place: keep five.
        assert_eq!(
            desired_voters(1, &s(&[1, 2, 3, 4, 5]), &s(&[1, 2, 3, 4])),
            s(&[1, 2, 3, 4, 5])
        );
        // ... with a learner up: it replaces the dead voter.
        assert_eq!(
            desired_voters(1, &s(&[1, 2, 3, 4, 5]), &s(&[1, 2, 3, 4, 6])),
            s(&[1, 2, 3, 4, 6])
        );
        // Three voters, one down, nothing else: unchanged.
        assert_eq!(desired_voters(1, &s(&[1, 2, 3]), &s(&[1, 2])), s(&[1, 2, 3]));
    }
}
