//! The cluster RPC both sides use: the requests and replies (the protocol
//! cores' messages with membership's Raft and replication's replica
//! payloads), the QUIC connection pool that carries them ([`QuicTransport`];
//! membership's Raft traffic too), and what the wire needs of the replica
//! protocol ([`ReplicaService`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use membership::{BoxFuture, RaftCall, RaftMessage, RaftReply, Transport, TransportError};
use quinn::{ClientConfig, Connection, Endpoint};

pub use quill_proto::wire::{NodeDescription, NodeStats, Protocol};

use super::wire;

/// How long one ping may take; a round waits for its slowest ping, so a
/// dead node stretches a round to this. Loopback and LAN answer in well
/// under a millisecond: this is a missed ping, not yet a failure.
pub const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// How long `cluster status` waits for another node's counts.
pub const STATS_TIMEOUT: Duration = Duration::from_millis(300);

/// What nodes say to each other over the cluster wire.
pub type ClusterRequest = quill_proto::wire::ClusterRequest<RaftMessage, replication::replica::Call>;
/// What they answer.
pub type ClusterReply = quill_proto::wire::ClusterReply<RaftReply, replication::replica::Answer>;

/// What the cluster wire needs of the replica protocol: serving calls, and
/// the figures for `Stats`. Implemented by the node's
/// replicator (`crate::replica`), so that this module and the cluster need
/// not name it.
pub trait ReplicaService: Send + Sync + 'static {
    fn handle(&self, call: replication::replica::Call) -> BoxFuture<'_, replication::replica::Answer>;
    fn under_replicated(&self) -> u64;
    /// (repairs pending in the running round, copies made by repair).
    fn repair_progress(&self) -> (u64, u64);
}

/// Where the accept loop finds the replicator once the node has made it.
pub type ReplicaSlot = Arc<std::sync::OnceLock<Arc<dyn ReplicaService>>>;

/// Changes the log filter at run time; given by the binary, which owns the
/// tracing subscriber.
pub type LogLevelSetter = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
/// Where the accept loop finds the log filter setter.
pub type LogSlot = Arc<std::sync::OnceLock<LogLevelSetter>>;

/// Answers an operator's question from another node
/// (`ClusterRequest::Query`, JSON in and out); given by the node once its
/// services exist.
pub type QueryHandler =
    Arc<dyn Fn(String) -> futures::future::BoxFuture<'static, Result<String, String>> + Send + Sync>;
/// Where the accept loop finds the query handler.
pub type QuerySlot = Arc<std::sync::OnceLock<QueryHandler>>;

/// A QUIC connection pool to the other nodes, by cluster address.
pub struct QuicTransport {
    endpoint: Endpoint,
    config: ClientConfig,
    conns: Mutex<HashMap<String, Connection>>,
}

impl QuicTransport {
    pub fn new(endpoint: Endpoint, config: ClientConfig) -> Self {
        QuicTransport {
            endpoint,
            config,
            conns: Mutex::new(HashMap::new()),
        }
    }

    async fn conn(&self, addr: &str) -> anyhow::Result<Connection> {
        if let Some(c) = self.conns.lock().unwrap_or_else(|p| p.into_inner()).get(addr)
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let sock: SocketAddr = addr.parse().with_context(|| format!("bad cluster address {addr}"))?;
        let c = wire::connect(&self.endpoint, self.config.clone(), sock).await?;
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// The protocol of the connection to `addr` (connecting if needed):
    /// what the node there speaks.
    pub async fn protocol(&self, addr: &str) -> anyhow::Result<Protocol> {
        Ok(wire::protocol_of(&self.conn(addr).await?))
    }

    /// Drops the cached connection to `addr` (a failed ping: it may be stale).
    pub fn forget(&self, addr: &str) {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(addr);
    }

    /// One request to the node at `addr`.
    pub async fn request(&self, addr: &str, req: &ClusterRequest) -> anyhow::Result<ClusterReply> {
        self.request_within(addr, req, wire::RPC_TIMEOUT).await
    }

    /// [`QuicTransport::request`] with its own deadline.
    pub async fn request_within(
        &self,
        addr: &str,
        req: &ClusterRequest,
        deadline: Duration,
    ) -> anyhow::Result<ClusterReply> {
        let conn = self.conn(addr).await?;
        let speaks = wire::protocol_of(&conn);
        if req.protocol() > speaks {
            // It could not decode it: a node of an earlier release.
            anyhow::bail!(
                "the node at {addr} speaks cluster protocol {speaks:?} (release {}), too old for this request",
                speaks.oldest_release()
            );
        }
        let r = wire::call_within(&conn, req, deadline).await;
        if r.is_err() {
            self.forget(addr);
        }
        r
    }
}

impl Transport for QuicTransport {
    fn call<'a>(&'a self, target: u64, addr: &'a str, msg: RaftMessage) -> RaftCall<'a> {
        Box::pin(async move {
            let conn = self.conn(addr).await.map_err(|e| TransportError::Unreachable {
                node: target,
                addr: addr.to_owned(),
                why: format!("{e:#}"),
            })?;
            match wire::call::<_, ClusterReply>(
                &conn,
                &ClusterRequest::Raft {
                    to: target,
                    msg: Box::new(msg),
                },
            )
            .await
            {
                Ok(ClusterReply::Raft(r)) => Ok(r),
                Ok(other) => Err(TransportError::Failed {
                    node: target,
                    why: format!("unexpected reply {other:?}"),
                }),
                Err(e) => {
                    self.forget(addr);
                    Err(TransportError::Failed {
                        node: target,
                        why: format!("{e:#}"),
                    })
                }
            }
        })
    }
}

/// Runs futures concurrently and collects their outputs (no extra crate).
pub async fn join_all<F: std::future::Future + Send + 'static>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// What this node says of itself (`Describe`).
pub fn describe_here(store: &replication::FragmentStore, replica: Option<&dyn ReplicaService>) -> NodeDescription {
    NodeDescription {
        version: crate::RELEASE.to_owned(),
        feature_level_max: membership::FEATURE_LEVEL_MAX,
        stats: node_stats(store, replica),
    }
}

/// This node's figures for `cluster status`.
pub fn node_stats(store: &replication::FragmentStore, replica: Option<&dyn ReplicaService>) -> NodeStats {
    let s = store.stats();
    let (repair_pending, repairs_copied) = replica.map_or((0, 0), |r| r.repair_progress());
    NodeStats {
        messages: s.entries,
        bytes: s.body_bytes,
        under_replicated: replica.map_or(0, |r| r.under_replicated()),
        repair_pending,
        repairs_copied,
        queued: (0..quill_proto::queue::SHARDS)
            .map(|k| store.size(&quill_proto::queue::shard_mailbox(k)).0)
            .sum(),
    }
}
