//! A node's place in the cluster once it has started: its membership, the
//! transport to the other nodes, and what it asks of them (are they as new
//! as it is, their figures).

use std::sync::Arc;
use std::time::{Duration, Instant};

use membership::{Membership, NodeState};
use quinn::Endpoint;
use tracing::warn;

use super::rpc::{
    ClusterReply, ClusterRequest, LogSlot, NodeDescription, PING_TIMEOUT, Protocol, QuerySlot, QuicTransport,
    ReplicaSlot, STATS_TIMEOUT, join_all,
};

/// A node's place in the cluster.
#[derive(Clone)]
pub struct Cluster {
    pub membership: Membership,
    pub transport: Arc<QuicTransport>,
    /// Set by the node once its replicator exists.
    pub replica: ReplicaSlot,
    /// Set by the node at start.
    pub log_level: LogSlot,
    /// Set by the node once its services exist.
    pub queries: QuerySlot,
    /// Whether this node's last ping round reached a majority of the Raft
    /// voters (itself included): without one the view and the directory
    /// cannot change here, though mail still flows (`/health` says so).
    pub majority: Arc<std::sync::atomic::AtomicBool>,
    /// Until when this node hands leadership over and stands for no
    /// election (`step_down`: before it is stopped for an upgrade).
    pub(super) stepping_down_until: Arc<std::sync::Mutex<Option<Instant>>>,
    /// What other nodes' failure detectors told this node while it leads.
    pub(super) reports: Arc<super::suspects::Reports>,
    pub(super) endpoint: Endpoint,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("id", &self.membership.id()).finish()
    }
}

impl Cluster {
    pub fn id(&self) -> u64 {
        self.membership.id()
    }

    /// Waits, at most `deadline`, until this node has applied a view at
    /// least as new as any peer that answers has, and that view has it up.
    /// A node restarted from its saved state starts with the view it died
    /// with (itself up, later changes missing); serving clients by it would
    /// pick other managers than the cluster does (a second POP3 lock for a
    /// mailbox, placement by stale loads). Returns whether it caught up.
    pub async fn catch_up(&self, deadline: Duration) -> bool {
        let me = self.id();
        let until = tokio::time::Instant::now() + deadline;
        let view = self.membership.view();
        let asks = view.nodes.values().filter(|n| n.id != me).map(|n| {
            let (t, addr) = (self.transport.clone(), n.addrs.cluster.clone());
            async move {
                match tokio::time::timeout(PING_TIMEOUT * 4, t.request(&addr, &ClusterRequest::Ping)).await {
                    Ok(Ok(ClusterReply::Pong { epoch, .. })) => epoch,
                    _ => 0,
                }
            }
        });
        let newest = join_all(asks).await.into_iter().max().unwrap_or(0);
        let mut views = self.membership.subscribe();
        loop {
            let v = self.membership.view();
            let up = v.node(me).is_some_and(|n| n.state != NodeState::Down);
            if v.epoch >= newest && up {
                return true;
            }
            match tokio::time::timeout_at(until, views.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    warn!(
                        epoch = v.epoch,
                        newest, up, "not caught up with the cluster's view; serving by this node's own"
                    );
                    return false;
                }
            }
        }
    }

    /// Stops membership and closes the endpoint.
    pub async fn shutdown(&self) {
        if let Err(e) = self.membership.shutdown().await {
            warn!(error = %e, "membership shutdown");
        }
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    /// Asks every other node that is not down, all at once (a dead node
    /// not yet marked down costs one timeout, not one per node): each
    /// node with what `ask` got from it at its cluster address.
    pub async fn ask_others<T, F, Fut>(&self, ask: F) -> Vec<(membership::NodeInfo, T)>
    where
        T: Send + 'static,
        F: Fn(Cluster, String) -> Fut,
        Fut: std::future::Future<Output = T> + Send + 'static,
    {
        let view = self.membership.view();
        let me = self.id();
        let asks: Vec<_> = view
            .nodes
            .values()
            .filter(|n| n.id != me && n.state != NodeState::Down)
            .map(|n| (n.clone(), tokio::spawn(ask(self.clone(), n.addrs.cluster.clone()))))
            .collect();
        let mut out = Vec::with_capacity(asks.len());
        for (n, a) in asks {
            if let Ok(v) = a.await {
                out.push((n, v));
            }
        }
        out
    }

    /// Whether this node is handing leadership over ([`Cluster::step_down`]).
    pub fn stepping_down(&self) -> bool {
        let until = *self.stepping_down_until.lock().unwrap_or_else(|p| p.into_inner());
        until.is_some_and(|t| Instant::now() < t)
    }

    /// Moves Raft leadership off this node, before it is stopped (an
    /// upgrade, node by node): for `within`, it stands for no election and,
    /// while it leads, sends no heartbeats and asks an up voter to call an
    /// election (the duty loop does it: `hand_over_if_leaving`). Returns
    /// the leader once another node leads (or `None` if this one did not
    /// lead), or an error if none took over in time.
    pub async fn step_down(&self, within: Duration) -> anyhow::Result<Option<u64>> {
        let me = self.id();
        if self.membership.leader() != Some(me) {
            return Ok(None);
        }
        let until = Instant::now() + within;
        *self.stepping_down_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
        let mut metrics = self.membership.metrics();
        let taken = tokio::time::timeout_at(
            until.into(),
            metrics.wait_for(|m| m.current_leader.is_some_and(|l| l != me)),
        )
        .await;
        match taken {
            Ok(Ok(m)) => Ok(m.current_leader),
            _ => {
                *self.stepping_down_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                anyhow::bail!("no other node took over leadership within {within:?} (is another voter up?)")
            }
        }
    }

    /// Asks a node for its release, the feature levels it supports and its
    /// store figures (None if it does not answer within `STATS_TIMEOUT`:
    /// status pages must stay quick while a node dies). A node of release
    /// 0.1.0 (cluster protocol V1) has no `Describe`: its figures come from
    /// `Stats`, and it supports level 1 only.
    pub async fn describe(&self, addr: &str) -> Option<NodeDescription> {
        let ask = async {
            match self.transport.protocol(addr).await.ok()? {
                Protocol::V1 => match self.transport.request(addr, &ClusterRequest::Stats).await {
                    Ok(ClusterReply::Stats(stats)) => Some(NodeDescription {
                        version: Protocol::V1.oldest_release().to_owned(),
                        feature_level_max: 1,
                        stats,
                    }),
                    _ => None,
                },
                _ => match self.transport.request(addr, &ClusterRequest::Describe).await {
                    Ok(ClusterReply::Described(d)) => Some(d),
                    _ => None,
                },
            }
        };
        tokio::time::timeout(STATS_TIMEOUT, ask).await.ok().flatten()
    }
}
