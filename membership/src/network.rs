//! What travels between nodes, the [`Transport`] trait the node implements
//! over its wire (QUIC), and openraft's network traits on top of it.
//!
//! One request, one reply: the node's client side sends a [`RaftMessage`]
//! to a node's cluster address and returns its [`RaftReply`]; its server
//! side hands every received message to [`crate::Membership::handle`].
//! Both are serde types; [`crate::codec::encode_message`] /
//! [`crate::codec::decode_message`] turn them into bounded bytes.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::command::{Request, Response};
use crate::types::TypeConfig;
use crate::view::NodeInfo;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a call got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum TransportError {
    /// Could not reach the node (connect refused, no route, not
    /// registered): openraft backs off before it tries that node again.
    #[error("node {node} at {addr} is unreachable: {why}")]
    Unreachable { node: u64, addr: String, why: String },
    /// Sent, but no reply came (reset, lost, malformed): retried at once.
    #[error("call to node {node} failed: {why}")]
    Failed { node: u64, why: String },
}

/// How a node sends Raft messages to another node. `target` is the Raft
/// node id, or 0 when only the address is known (a join through a seed);
/// `addr` is the target's cluster address. The implementation bounds
/// message sizes (see [`crate::codec::MESSAGE_BYTES_MAX`]); callers put a
/// deadline on every call.
pub trait Transport: Send + Sync + 'static {
    fn call<'a>(&'a self, target: u64, addr: &'a str, msg: RaftMessage) -> RaftCall<'a>;
}

/// A Raft message on its way: the reply, or why there is none.
pub type RaftCall<'a> = BoxFuture<'a, Result<RaftReply, TransportError>>;

/// A request only the leader can serve. Any node may receive one: a node
/// that is not the leader answers [`LeaderError::NotLeader`] with the leader
/// it knows, and the sender tries there (never forwarded on, so no loops).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderRequest {
    /// Commit this request; reply when applied.
    Write(Request),
    /// Add the node as a Raft learner and to the view (idempotent).
    Join(NodeInfo),
    /// Make exactly these nodes the Raft voters (they must be members);
    /// voters left out stay learners.
    SetVoters(BTreeSet<u64>),
    /// Take the node out of the voters, of Raft and of the view.
    RemoveNode(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaderReply {
    /// The committed entry's response and its log index (the sender waits
    /// until it has applied that far itself, so it reads its own write).
    Written { response: Response, log_index: u64 },
    /// A membership change was committed.
    Done,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LeaderError {
    /// Not the leader; `leader` is who this node believes leads (id and
    /// cluster address), if anyone.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<(u64, String)> },
    /// The leader refused (a membership change in progress, an unknown
    /// learner, the last voter).
    #[error("refused: {0}")]
    Refused(String),
    /// Not committed within the leader's deadline (no quorum).
    #[error("not committed within {waited_ms} ms")]
    Timeout { waited_ms: u64 },
    /// The leader's Raft stopped.
    #[error("raft stopped: {0}")]
    Fatal(String),
}

/// A message from one node's Raft to another's.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[allow(clippy::large_enum_variant)]
pub enum RaftMessage {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<u64>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    Leader(LeaderRequest),
}

/// The reply to a [`RaftMessage`] of the same kind.
#[derive(Debug, Serialize, Deserialize)]
pub enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<u64>, RaftError<u64>>),
    Vote(Result<VoteResponse<u64>, RaftError<u64>>),
    InstallSnapshot(Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>>),
    Leader(Result<LeaderReply, LeaderError>),
}

impl RaftMessage {
    pub fn kind(&self) -> &'static str {
        match self {
            RaftMessage::AppendEntries(_) => "append_entries",
            RaftMessage::Vote(_) => "vote",
            RaftMessage::InstallSnapshot(_) => "install_snapshot",
            RaftMessage::Leader(_) => "leader",
        }
    }
}

/// openraft's network factory over a [`Transport`].
pub(crate) struct NetworkFactory {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) self_id: u64,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Connection {
        Connection {
            transport: self.transport.clone(),
            self_id: self.self_id,
            target,
            addr: node.addr.clone(),
        }
    }
}

/// openraft's view of one peer.
pub(crate) struct Connection {
    transport: Arc<dyn Transport>,
    self_id: u64,
    target: u64,
    addr: String,
}

type RpcResult<T, E> = Result<T, RPCError<u64, BasicNode, E>>;

impl Connection {
    async fn rpc<E: std::error::Error>(
        &self,
        msg: RaftMessage,
        action: RPCTypes,
        ttl: Duration,
    ) -> RpcResult<RaftReply, E> {
        match tokio::time::timeout(ttl, self.transport.call(self.target, &self.addr, msg)).await {
            Err(_) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.self_id,
                target: self.target,
                timeout: ttl,
            })),
            Ok(Err(e @ TransportError::Unreachable { .. })) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Ok(Err(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Ok(reply)) => Ok(reply),
        }
    }

    fn unexpected<E: std::error::Error>(&self, reply: &RaftReply) -> RPCError<u64, BasicNode, E> {
        let e = TransportError::Failed {
            node: self.target,
            why: format!("reply of the wrong kind: {reply:?}"),
        };
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, RaftError<u64>> {
        let reply = self
            .rpc(
                RaftMessage::AppendEntries(rpc),
                RPCTypes::AppendEntries,
                option.hard_ttl(),
            )
            .await?;
        match reply {
            RaftReply::AppendEntries(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        let reply = self
            .rpc(
                RaftMessage::InstallSnapshot(rpc),
                RPCTypes::InstallSnapshot,
                option.hard_ttl(),
            )
            .await?;
        match reply {
            RaftReply::InstallSnapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(&mut self, rpc: VoteRequest<u64>, option: RPCOption) -> RpcResult<VoteResponse<u64>, RaftError<u64>> {
        let reply = self
            .rpc(RaftMessage::Vote(rpc), RPCTypes::Vote, option.hard_ttl())
            .await?;
        match reply {
            RaftReply::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(&other)),
        }
    }
}
