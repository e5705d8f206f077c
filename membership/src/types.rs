//! The openraft type configuration and short names for its generic types.

use crate::command::{Request, Response};

openraft::declare_raft_types!(
    /// Quill's Raft: node ids are `u64`, a node's Raft address is its
    /// cluster address, log entries carry a [`Request`].
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = crate::store::SnapshotData,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<u64>;
pub type Vote = openraft::Vote<u64>;
pub type StorageError = openraft::StorageError<u64>;
pub type StoredMembership = openraft::StoredMembership<u64, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<u64, openraft::BasicNode>;
pub type RaftMetrics = openraft::RaftMetrics<u64, openraft::BasicNode>;
