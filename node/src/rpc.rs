//! The cluster RPC: what nodes say to each other over the cluster wire
//! ([`ClusterRequest`], [`ClusterReply`]) and the QUIC connection pool that
//! carries it ([`QuicTransport`]; membership's Raft traffic too). Both the
//! cluster side (`crate::cluster`) and the replica protocol
//! (`crate::replica`) use it; neither uses the other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use membership::{BoxFuture, RaftMessage, RaftReply, Transport, TransportError};
use quinn::{ClientConfig, Connection, Endpoint};
use serde::{Deserialize, Serialize};

use crate::wire;

/// What nodes say to each other over the cluster wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClusterRequest {
    /// A new node proves the join secret and asks for a certificate. The
    /// only request a peer without a cluster certificate may send.
    Enroll {
        secret: String,
        name: String,
    },
    /// Raft traffic for node `to` (0: whichever node answers, for a leader
    /// request sent to a seed): refused by any other identity, e.g. the
    /// new one of a machine that came back at the same address with an
    /// empty disk (its empty log would otherwise look like the old
    /// follower's log going backwards).
    Raft {
        to: u64,
        msg: Box<RaftMessage>,
    },
    Ping,
    Stats,
    /// The replica protocol (see `replication::replica`).
    Replica(Box<replication::replica::Call>),
    /// `quill admin log-level --all`: set this node's log filter.
    SetLogLevel {
        filter: String,
    },
    /// A seed without the CA key asks a member that holds it to issue a
    /// certificate for an enrollment the seed has already checked.
    IssueCert {
        name: String,
    },
    /// A Raft voter without the CA key asks another for it (answered only
    /// to a voter of the answering node's view).
    CaKey,
    /// A draining leader hands leadership over: the receiving voter calls
    /// an election (answered only to the leader of the receiver's view).
    TakeLeadership,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ClusterReply {
    /// `ca_key_pem` is empty: joiners no longer get the CA key (voters
    /// fetch it with `CaKey`). Kept for the wire layout.
    Enrolled {
        cert: Vec<u8>,
        key: Vec<u8>,
        ca_cert: Vec<u8>,
        ca_key_pem: String,
    },
    Refused(String),
    Raft(RaftReply),
    /// With the epoch of the view the answering node has applied, and its
    /// id: a ping answered at a node's address by another identity (the
    /// machine came back with an empty disk) is not that node alive.
    Pong {
        epoch: u64,
        id: u64,
    },
    Stats(NodeStats),
    Replica(Box<replication::replica::Answer>),
    /// A request that needs no more than "done".
    Done,
    /// The CA key, PEM.
    CaKey(String),
}

/// One node's figures for `cluster status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// Entries (message copies) and body bytes in its store.
    pub messages: u64,
    pub bytes: u64,
    /// Messages it counts as having fewer than R live copies.
    pub under_replicated: u64,
    /// Repairs and hand-offs it coordinates that its running round has not
    /// done yet, and the copies it has made since it started.
    pub repair_pending: u64,
    pub repairs_copied: u64,
    /// Outbound queue entries stored here (copies: each entry is on R
    /// nodes).
    pub queued: u64,
}

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
        let r = wire::call_within(&conn, req, deadline).await;
        if r.is_err() {
            self.forget(addr);
        }
        r
    }
}

impl Transport for QuicTransport {
    fn call<'a>(
        &'a self,
        target: u64,
        addr: &'a str,
        msg: RaftMessage,
    ) -> BoxFuture<'a, Result<RaftReply, TransportError>> {
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
