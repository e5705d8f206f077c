//! The replica protocol on the wire: what one node asks of another
//! ([`Request`]), the answers ([`Reply`]), the envelope both travel in, the
//! [`Network`] they travel over, and the typed error of a call.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{BodyHash, EntryMeta, MessageId, SyncItem, Tombstone};

pub type NodeId = u64;
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Users per report message.
pub const REPORT_USERS_MAX: usize = 2_000;
/// Digests per anti-entropy message.
pub const DIGESTS_MAX: usize = 2_000;
/// Message ids in one [`Request::Deleted`].
pub const DELETED_QUERY_MAX: usize = 10_000;
/// Message changes in one [`Request::Mark`].
pub const MARKS_PER_CALL_MAX: usize = 10_000;
/// Updates kept in the durable log; past this, anti-entropy alone repairs.
pub const UPDATE_LOG_FILES_MAX: usize = 100_000;
/// Copies noted missing that one node keeps at most (beyond, new notes are
/// dropped with a warning: anti-entropy still makes them, uncounted).
pub const MISSING_COPIES_MAX: usize = 100_000;
/// Bytes of bodies one [`Request::Copy`] carries at most (a larger message
/// travels alone).
pub const COPY_BATCH_BYTES: usize = 8 << 20;
/// Entries in one [`Request::Copy`] or [`Request::SetReplicas`] at most.
pub const PLACE_BATCH_MAX: usize = 1_000;
/// Keys one throttle call may name (a login names two).
pub const THROTTLE_KEYS_PER_CALL_MAX: usize = 8;
/// Unlocks waiting to be retried, at most.
pub const PENDING_UNLOCKS_MAX: usize = 10_000;
/// Users one watch registration names at most.
pub const WATCH_USERS_PER_CALL_MAX: usize = 1_000;
/// How long a mailbox lock holds unless renewed (its holder renews it every
/// quarter of this while the session lives): a session that ends without
/// its unlock arriving (its node crashed, a partition ate the unlock, the
/// manager was cut off and came back with its table) blocks the mailbox
/// this long at most. Unlocks that fail are also retried until then.
pub const MAILBOX_LOCK_LEASE: Duration = Duration::from_secs(60);

/// What a node asks of another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// To the users' manager: where should a new message of `size` bytes
    /// for each of `users` go (`n_replicas` nodes each)?
    Place {
        users: Vec<String>,
        size: u64,
        n_replicas: u32,
    },
    /// To the user's manager: which nodes hold the user's fragments?
    MailMap {
        user: String,
    },
    /// To a manager: the sender holds these `(user, entries, bytes)`,
    /// assigned to managers by view `epoch`. `last` ends a full report (every
    /// user the sender holds that the receiver manages); a report that is
    /// not `last` is a fragment just created.
    Report {
        users: Vec<(String, u64, u64)>,
        epoch: u64,
        last: bool,
    },
    /// "Report to me the users I manage" (sent by a node that starts).
    ReportTo,
    /// Store one message: one body, entries for the users of each group
    /// (a group shares one replica set).
    Store {
        id: MessageId,
        arrival_ms: u64,
        folder: String,
        groups: Vec<(Vec<NodeId>, Vec<String>)>,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
        /// The view epoch the sender placed the message by, and the users
        /// whose targets it chose without their manager: the receiver tells
        /// the manager of a user's first fragment here unless that manager
        /// placed it under the receiver's own view.
        epoch: u64,
        unplaced: Vec<String>,
    },
    /// The user's entries held by the receiver.
    List {
        user: String,
    },
    /// Which of these messages of the user the receiver holds deletions
    /// of (asked of a replica that did not list a message another did).
    Deleted {
        user: String,
        ids: Vec<MessageId>,
    },
    /// A body, by hash.
    Read {
        body: BodyHash,
    },
    /// Deletions of the user's messages.
    Delete {
        user: String,
        tombs: Vec<Tombstone>,
    },
    /// Folder and flag changes of the user's messages (merged last writer
    /// wins per register, see [`crate::marks`]).
    Mark {
        user: String,
        changes: Vec<crate::MarkChange>,
    },
    /// Anti-entropy: the sender's digests for users it shares with the
    /// receiver; the answer names those that differ.
    Digests {
        digests: Vec<(String, [u8; 32])>,
    },
    /// Anti-entropy: the sender's items of `user` shared with the receiver;
    /// the receiver repairs itself and answers what the sender lacks.
    Sync {
        user: String,
        items: Vec<SyncItem>,
    },
    /// To the user's manager: the mailbox for one session (POP3's
    /// exclusive maildrop), under `token`.
    Lock {
        user: String,
        token: u64,
    },
    Unlock {
        user: String,
        token: u64,
    },
    /// From a delivering node to the lowest node that stored a message: its
    /// copies to `missing` failed though they were live. The holder counts
    /// them as under-replicated and makes them (see
    /// [`super::Replicator::make_missing_copies`]).
    MissingCopies {
        user: String,
        id: MessageId,
        missing: Vec<NodeId>,
    },
    /// Repair and moves: store these copies of `user`'s entries (each with
    /// its replica set and that set's version) and their bodies, checked
    /// against the entries' hashes.
    Copy {
        user: String,
        entries: Vec<(EntryMeta, Vec<u8>)>,
    },
    /// Repair and moves: new replica sets for `user`'s entries; the newest
    /// set wins, and a receiver the new set leaves out drops its copy.
    SetReplicas {
        user: String,
        changes: Vec<crate::SetChange>,
    },
    /// The bytes of mail the receiver stores (for rebalancing).
    Usage,
    /// Login throttling, cluster-wide, at the manager of each key: count a
    /// failure on `keys` (when `failed`) and say whether any is used up.
    Throttle {
        keys: Vec<(String, u32)>,
        window_ms: u64,
        failed: bool,
    },
    /// Greylisting, cluster-wide, at the manager of `key` (a hash of the
    /// client network, sender and recipient): whether this try passes.
    Greylist {
        key: String,
        delay_ms: u64,
        lifetime_ms: u64,
    },
    /// To the manager of `users`: the sender has sessions waiting for
    /// changes to their mailboxes (IMAP IDLE); tell it of them for
    /// [`super::watch::WATCH_LEASE`] (see [`super::watch`]). At most
    /// [`WATCH_USERS_PER_CALL_MAX`] users.
    Watch {
        users: Vec<String>,
    },
    /// To `user`'s manager: the sender changed the user's mailbox (flags,
    /// folders, deletions); tell the other watchers.
    Changed {
        user: String,
    },
    /// From `user`'s manager to a watcher: the user's mailbox changed, or
    /// (`soon`) a message for it was just placed and is being stored.
    Notify {
        user: String,
        soon: bool,
    },
}

impl Request {
    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Place { .. } => "place",
            Request::MailMap { .. } => "mail-map",
            Request::Report { .. } => "report",
            Request::ReportTo => "report-to",
            Request::Store { .. } => "store",
            Request::List { .. } => "list",
            Request::Deleted { .. } => "deleted",
            Request::Read { .. } => "read",
            Request::Delete { .. } => "delete",
            Request::Mark { .. } => "mark",
            Request::Digests { .. } => "digests",
            Request::Sync { .. } => "sync",
            Request::Lock { .. } => "lock",
            Request::Unlock { .. } => "unlock",
            Request::MissingCopies { .. } => "missing-copies",
            Request::Throttle { .. } => "throttle",
            Request::Copy { .. } => "copy",
            Request::SetReplicas { .. } => "set-replicas",
            Request::Usage => "usage",
            Request::Greylist { .. } => "greylist",
            Request::Watch { .. } => "watch",
            Request::Changed { .. } => "changed",
            Request::Notify { .. } => "notify",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Placed {
        targets: Vec<Vec<NodeId>>,
    },
    MailMap {
        nodes: Vec<NodeId>,
        bytes: u64,
        known: bool,
    },
    Done,
    Stored,
    Listed {
        entries: Vec<EntryMeta>,
    },
    Body {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    Tombstoned {
        ids: Vec<MessageId>,
    },
    Deleted {
        removed: usize,
    },
    Marked {
        changed: usize,
    },
    Differ {
        users: Vec<String>,
    },
    Synced {
        items: Vec<SyncItem>,
    },
    Locked {
        granted: bool,
    },
    Throttled {
        blocked: bool,
    },
    /// To [`Request::Copy`]: the copies refused because the receiver holds
    /// a deletion of the message.
    Copied {
        deleted: Vec<Tombstone>,
    },
    /// To [`Request::Usage`].
    Usage {
        bytes: u64,
    },
    /// To [`Request::SetReplicas`]: one outcome per change.
    ReplicasSet {
        outcomes: Vec<crate::Placed>,
    },
    /// To [`Request::Greylist`].
    Greylisted {
        pass: bool,
    },
}

/// Every message carries the sender's id, its hybrid logical clock, its
/// load (piggybacked: managers place mail by these figures) and the number
/// of its current run (`boot`: a change means it restarted, so the mailbox
/// locks its earlier sessions held are released).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub from: NodeId,
    /// The node the message is for: a call that reaches another identity
    /// (a machine back at the same address with an empty disk) is refused
    /// there, and an answer from another identity is not taken.
    pub to: NodeId,
    pub hlc: u64,
    pub load: u64,
    pub boot: u32,
    pub body: T,
}

pub type Call = Envelope<Request>;
pub type Answer = Envelope<Result<Reply, ReplicaError>>;

/// Why a [`Network`] could not carry a call or its answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

/// How a replicator reaches the others. The implementation bounds message
/// sizes; the replicator puts a deadline on every call.
pub trait Network: Send + Sync + 'static {
    fn call(&self, to: NodeId, call: Call) -> BoxFuture<'_, Result<Answer, TransportError>>;
}

/// Why a replica operation failed. Travels in [`Answer`] when the failure
/// is the serving node's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ReplicaError {
    /// The network could not carry the call or its answer.
    #[error("node {node}: {kind}: {why}")]
    Unreachable { node: NodeId, kind: String, why: String },
    /// No answer within the call's deadline.
    #[error("node {node}: no answer to {kind} within {deadline_ms} ms")]
    Timeout {
        node: NodeId,
        kind: String,
        deadline_ms: u64,
    },
    /// A new view has the node down: the call was ended, not waited out.
    #[error("node {node}: marked down during {kind}")]
    MarkedDown { node: NodeId, kind: String },
    /// The other node served the call and it failed there.
    #[error("node {node}: {kind}: {error}")]
    Remote { node: NodeId, kind: String, error: String },
    /// A fragment store failed (on the node that answers).
    #[error("store: {0}")]
    Store(String),
    /// An answer of the wrong kind.
    #[error("unexpected reply to {0}")]
    UnexpectedReply(String),
    /// A body that does not match its hash.
    #[error("node {0} sent a body that does not match its hash")]
    WrongBody(NodeId),
    /// No live node holds what was asked for.
    #[error("no live replica")]
    NoLiveReplica,
    /// The durable update log could not take an update.
    #[error("cannot log an update: {0}")]
    UpdateLog(String),
}

impl From<crate::StoreError> for ReplicaError {
    fn from(e: crate::StoreError) -> Self {
        ReplicaError::Store(e.to_string())
    }
}

/// The mailbox is held by another session (the manager said so).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the mailbox is locked by another session")]
pub struct MailboxInUse;

#[cfg(test)]
mod wire_tests {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Plain {
        a: u32,
        body: Vec<u8>,
    }

    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct AsBytes {
        a: u32,
        #[serde(with = "serde_bytes")]
        body: Vec<u8>,
    }

    /// A body sent as one byte string is the same bytes on the wire as the
    /// sequence of u8 a release before sent: either side reads the other.
    #[test]
    fn bodies_as_byte_strings_keep_the_wire() {
        let body: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let cfg = bincode::config::standard();
        let plain = bincode::serde::encode_to_vec(
            Plain {
                a: 7,
                body: body.clone(),
            },
            cfg,
        )
        .unwrap();
        let bytes = bincode::serde::encode_to_vec(
            AsBytes {
                a: 7,
                body: body.clone(),
            },
            cfg,
        )
        .unwrap();
        assert_eq!(plain, bytes);
        let (back, _): (AsBytes, usize) = bincode::serde::decode_from_slice(&plain, cfg).unwrap();
        assert_eq!(back.body, body);
        let (back, _): (Plain, usize) = bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back.body, body);
    }
}
