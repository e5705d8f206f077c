//! A node's place in the cluster once it has started: its membership, the
//! transport to the other nodes, and what it asks of them (are they as new
//! as it is, their figures).

use std::sync::Arc;
use std::time::Duration;

use membership::{Membership, NodeState};
use quinn::Endpoint;
use tracing::warn;

use super::rpc::{
    ClusterReply, ClusterRequest, LogSlot, NodeStats, PING_TIMEOUT, QuicTransport, ReplicaSlot, STATS_TIMEOUT, join_all,
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
    /// Whether this node's last ping round reached a majority of the Raft
    /// voters (itself included): without one the view and the directory
    /// cannot change here, though mail still flows (`/health` says so).
    pub majority: Arc<std::sync::atomic::AtomicBool>,
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

    /// Asks a node for its store figures (None if it does not answer within
    /// `STATS_TIMEOUT`: status pages must stay quick while a node dies).
    pub async fn stats_of(&self, addr: &str) -> Option<NodeStats> {
        let r = tokio::time::timeout(STATS_TIMEOUT, self.transport.request(addr, &ClusterRequest::Stats)).await;
        match r {
            Ok(Ok(ClusterReply::Stats(stats))) => Some(stats),
            _ => None,
        }
    }
}
