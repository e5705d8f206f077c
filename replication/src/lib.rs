//! Replication: where a node keeps mail, and (in later issues) how copies of
//! it travel between nodes.
//!
//! Today this crate owns the **fragment store** ([`FragmentStore`]): the
//! durable, local store of the mailbox fragments a node holds. A fragment is
//! the part of one user's mailbox stored on one node; the store keeps message
//! bodies once (named by their blake3 hash) and mailbox entries `(user,
//! message id) -> metadata` that point at them.
//!
//! What it must not do: open sockets, know about SMTP/POP3, or decide
//! placement. The node calls it; the replica protocol (a later issue) will
//! call it with the same operations on each of the R replicas.
//!
//! # Durability
//! Every change is a record appended to a segment file and fsynced before the
//! caller's future resolves; concurrent callers share one fsync (group
//! commit). Records carry their length and a blake3 checksum, so a torn or
//! corrupt tail is recognised on open and cut off. In-memory state changes
//! only after the fsync: nothing half written is ever visible.
//!
//! # Backpressure
//! Writes go through a bounded queue (`WRITE_QUEUE_DEPTH`) to one writer
//! thread; a caller awaits room in the queue.
//!
//! # Shutdown
//! [`FragmentStore::close`] drains the queue, lets the writer finish its last
//! batch and joins the thread. Dropping the store does the same without
//! waiting.

#[doc(hidden)]
pub mod fuzz;
pub mod hlc;
pub mod marks;
#[cfg(feature = "testing")]
pub mod mem_net;
mod record;
pub mod replica;
mod store;

pub use marks::{FlagMark, MarkChange, Marks};
pub use store::{
    CheckpointReport, CompactReport, Delivery, FragmentStore, OpenReport, Placed, StoreConfig, StoreError, StoreStats,
    UserUsage,
};

use serde::{Deserialize, Serialize};

/// The largest message the store accepts. The node's own limit (`SIZE`,
/// default 50 MiB) is lower; this one bounds a record on disk so that a
/// corrupt length can be told from a real one.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Names one message of one mailbox. Sorting by id sorts by arrival time: the
/// first 8 bytes are the arrival time in milliseconds, big-endian; the last 8
/// make it unique. Never reused.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// Lower-case hex, 32 characters: used as the POP3 UIDL.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    pub fn arrival_ms(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The blake3 hash of a message's bytes: bodies are immutable and named by it.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BodyHash(pub [u8; 32]);

impl BodyHash {
    pub fn of(bytes: &[u8]) -> Self {
        BodyHash(*blake3::hash(bytes).as_bytes())
    }
}

impl std::fmt::Debug for BodyHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0[..8]))
    }
}

/// One mailbox entry as the store reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryMeta {
    pub id: MessageId,
    pub body: BodyHash,
    pub size_bytes: u64,
    pub arrival_ms: u64,
    pub folder: String,
    pub flags: u32,
    /// The message's replica set: the nodes meant to hold it.
    pub replicas: Vec<u64>,
    /// The version of `replicas`: the hybrid logical clock of the repair or
    /// move that chose them, 0 for the set chosen at delivery. When two
    /// copies disagree, the newer set wins.
    pub placed: u64,
    /// Earlier members that later sets left out, most recent first (at
    /// most [`PRIOR_MAX`]): they may still hold a copy of an older set, or a
    /// move marker, so anti-entropy pairs them with this copy's holders
    /// too, and a deletion is sent to them as well.
    pub prior: Vec<u64>,
    /// The folder's and the flags' versions (see [`marks`]).
    pub marks: Marks,
}

/// Earlier members an entry remembers at most.
pub const PRIOR_MAX: usize = 8;

impl EntryMeta {
    /// A message as delivered: in `folder` on `replicas`, the set chosen
    /// at delivery (version 0, no earlier members), no flag set.
    pub fn delivered(
        id: MessageId,
        body: BodyHash,
        size_bytes: u64,
        arrival_ms: u64,
        folder: String,
        replicas: Vec<u64>,
    ) -> EntryMeta {
        EntryMeta {
            id,
            body,
            size_bytes,
            arrival_ms,
            folder,
            flags: 0,
            replicas,
            placed: 0,
            prior: Vec::new(),
            marks: Marks::default(),
        }
    }

    /// Whether `node` is in the replica set or among its earlier members.
    pub fn involves(&self, node: u64) -> bool {
        self.replicas.contains(&node) || self.prior.contains(&node)
    }

    /// The replica set and the earlier members, in one sorted list.
    pub fn everyone(&self) -> Vec<u64> {
        let mut all: Vec<u64> = self.replicas.iter().chain(&self.prior).copied().collect();
        all.sort_unstable();
        all.dedup();
        all
    }
}

/// A new replica set for one message: `replicas` (sorted), the earlier
/// members it leaves out (`prior`), and its version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetChange {
    pub id: MessageId,
    pub replicas: Vec<u64>,
    pub prior: Vec<u64>,
    pub placed: u64,
}

/// A deletion: message `id` is gone from the mailbox as of `hlc` (a hybrid
/// logical clock value, see [`hlc`]); `replicas` is the message's replica
/// set when the deleting node knew it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub id: MessageId,
    pub hlc: u64,
    pub replicas: Vec<u64>,
}

/// One message of a mailbox as anti-entropy compares it: held, or deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SyncItem {
    Live(EntryMeta),
    Dead(Tombstone),
    /// Not held here any more: a newer replica set left this node out.
    Moved(Moved),
}

/// A move marker: this node dropped its copy of message `id` when the newer
/// replica set `to` (version `placed`) left it out; `replicas` are that
/// set and its earlier members (this node among them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Moved {
    pub id: MessageId,
    pub replicas: Vec<u64>,
    pub to: Vec<u64>,
    pub placed: u64,
}

impl SyncItem {
    pub fn id(&self) -> MessageId {
        match self {
            SyncItem::Live(m) => m.id,
            SyncItem::Dead(t) => t.id,
            SyncItem::Moved(m) => m.id,
        }
    }

    pub fn replicas(&self) -> &[u64] {
        match self {
            SyncItem::Live(m) => &m.replicas,
            SyncItem::Dead(t) => &t.replicas,
            SyncItem::Moved(m) => &m.replicas,
        }
    }

    /// Whether anti-entropy compares this item with `node`: a copy with
    /// the members of its set and the earlier ones, a deletion or move
    /// marker with the nodes it names.
    pub fn involves(&self, node: u64) -> bool {
        match self {
            SyncItem::Live(m) => m.involves(node),
            _ => self.replicas().contains(&node),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}
