//! The fragment store: append-only segments, an in-memory index rebuilt from
//! them on open, one writer thread doing group commit, and a log cleaner.
//!
//! Files in the store directory: `seg-NNNNNNNN.qseg`, numbered upwards. The
//! highest-numbered segment is the active one; the others are sealed. Each
//! sealed one gets a summary, `seg-NNNNNNNN.qidx` (its records without the
//! bodies); `index.qckp` is a checkpoint of the index, so that a start
//! reads only what was written since (see `checkpoint`).
//!
//! # Invariants
//! - Only the writer thread changes the index, and only after the records
//!   that justify the change are fsynced.
//! - A tombstone always follows, in log order, the entry record it kills:
//!   the cleaner copies forward only entries that are live when the writer
//!   copies them, so a copy never lands after a tombstone of the same entry.
//! - The cleaner only ever cleans the *oldest* segment. Every tombstone in
//!   it kills an entry in it or in a segment already gone, so tombstones can
//!   be dropped there and never resurrect anything.
//!
//! # Layout
//! `index` (the in-memory index and what it counts), `recovery` (opening:
//! the index rebuilt from the segments, a torn tail cut), `writer` (the one
//! writer thread: group commit in steps, effects applied after the fsync),
//! `plan` (a commit's first step: what a batch writes, decided under the
//! index lock), `space` (segments, and a full disk), `cleaner` (the log
//! cleaner), `queries` (reads of the index, and the whole-index walks),
//! `summary` (the sealed segments' summaries), `checkpoint` (checkpoints
//! of the index: written in the background now and then, loaded at
//! start before the records written since are replayed).
//!
//! # In more detail
//! `store/`: `FragmentStore`. Files `store/seg-NNNNNNNN.qseg`; the highest
//! is active. `writer.rs`: one writer thread takes operations from a bounded
//! queue, decides a whole batch under the index lock (which bodies, entries
//! and tombstones it writes), encodes it after releasing the lock, writes it
//! with one `write` and one `fdatasync`, and only then updates the
//! in-memory index and answers every caller (group commit). `index.rs`: mailboxes → entries and tombstones,
//! bodies → location and reference count, segments → live bytes, entry
//! counts per replica set. `recovery.rs`: the index rebuilt by scanning the
//! segments on open; a bad record in the last segment is a torn tail and is
//! cut off (logged), one in a sealed segment ends what is read of that
//! segment (logged as an error). `cleaner.rs`: `compact_once` copies the
//! live records of the *oldest* sealed segment forward through the writer
//! and then deletes the file. **A full disk** (a write gets ENOSPC; not an
//! fsync error, which stops the store for good): copying needs free space a
//! full disk lacks, and a single segment has nothing sealed, so the writer
//! gives dead bodies' space back *in place*: the whole dead record is zeroed
//! (blocks punched out with `fallocate(PUNCH_HOLE)`, edges written) and
//! fdatasynced; recovery skips zero runs (a record never starts with a zero
//! byte). A 256 KiB `reserve` file in the store directory is given up at the
//! first ENOSPC, so the deletions that free space fit; until a delivery
//! fits with room for the reserve again and as much beyond, deliveries are
//! refused up front (451) and deletions taken, each freeing its bodies at
//! once (`FragmentStore::disk_full`, a `/health` warning). On a nearly full
//! disk (less free than a sixteenth of it) deletions give their bodies'
//! space back in place too, before any delivery has failed. `queries.rs`: reads (`list`, `sync_items`,
//! `digest`, `usage`, `under_replicated` from the per-replica-set counts)
//! and the **whole-index walks** (`peer_digests`, `forget_tombstones`,
//! `usage`, the cleaner's plan): they take the index lock 256 mailboxes at a
//! time with a short pause between chunks (the lock is not fair; without the
//! pause a walk starves the writer), and have `*_async` forms that run on a
//! blocking thread, which the replicator uses. Bodies are stored once and
//! named by blake3; entries point at them and carry their replica set. A
//! deletion is a tombstone (HLC stamp, replica set) that stays in the index
//! and is copied forward by the cleaner until it expires, so a late copy of
//! a deleted message is refused.

mod checkpoint;
mod cleaner;
mod index;
mod plan;
mod queries;
mod recovery;
mod space;
mod summary;
mod writer;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tracing::error;

use crate::record::EntryRecord;
use crate::{BodyHash, EntryMeta, MESSAGE_BYTES_MAX, MessageId, SetChange, Tombstone};

use index::*;
use plan::Plan;
use space::*;
use writer::*;

pub use checkpoint::CheckpointReport;

/// Writes waiting for the writer thread. Bounded so that a slow disk pushes
/// back on the protocol sessions instead of growing memory; 1024 deliveries of
/// the 4.7 KB mean is under 5 MiB.
const WRITE_QUEUE_DEPTH: usize = 1024;
/// At most this many operations share one fsync, so one batch cannot hold
/// the others' acknowledgements for long.
const BATCH_OPS_MAX: usize = 512;
/// At most this many bytes share one fsync (a batch's buffer is in memory).
const BATCH_BYTES_MAX: usize = 16 << 20;
/// Zeros kept written ahead of the active segment's end (see
/// `Writer::zero_ahead`): a batch's sync then need not grow the file.
const ZERO_AHEAD_BYTES: u64 = 1 << 20;
/// The cleaner rewrites the oldest segment when less than this share of it
/// is live, or when the store as a whole is more than half dead.
const CLEAN_LIVE_RATIO_MAX: f64 = 0.5;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("message too large for the store: {0} bytes")]
    TooLarge(usize),
    #[error("no such message body")]
    NoSuchBody,
    #[error("corrupt body {0:?}: checksum mismatch on read")]
    Corrupt(BodyHash),
    #[error("store is closed")]
    Closed,
    /// The store stopped taking writes for good (see
    /// [`FragmentStore::failure`]).
    #[error("store stopped taking writes: {0}")]
    Stopped(String),
    /// A mailbox name, folder or replica list longer than any the store
    /// writes (a record must fit its encoding limit): refused before it
    /// reaches the writer.
    #[error("refused: {0}")]
    Refused(String),
    /// A whole record this release cannot read (a newer release's): the
    /// store does not open rather than lose it.
    #[error("{0}")]
    Unreadable(String),
}

/// The longest mailbox name or folder name the store takes (an address is
/// at most 320 octets, `#N` aside).
pub const NAME_BYTES_MAX: usize = 1024;
/// The most nodes a replica set may name (`--replicas` is at most 16).
pub const REPLICAS_MAX: usize = 16;
/// The most nodes a deletion may name (a set and its earlier members).
pub const TOMB_NODES_MAX: usize = REPLICAS_MAX + crate::PRIOR_MAX;

/// Checks what a peer (or a bug) could make too long for a record.
fn check_names(user: &str, folder: &str) -> Result<(), StoreError> {
    if user.len() > NAME_BYTES_MAX || folder.len() > NAME_BYTES_MAX {
        return Err(StoreError::Refused(format!(
            "a mailbox or folder name over {NAME_BYTES_MAX} bytes"
        )));
    }
    Ok(())
}

fn check_nodes(replicas: &[u64], prior: &[u64]) -> Result<(), StoreError> {
    if replicas.len() > REPLICAS_MAX || prior.len() > crate::PRIOR_MAX {
        return Err(StoreError::Refused(format!(
            "a replica set of {} nodes with {} earlier ones (at most {REPLICAS_MAX} and {})",
            replicas.len(),
            prior.len(),
            crate::PRIOR_MAX
        )));
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// A segment is sealed and a new one started once it is this large.
    pub segment_bytes_max: u64,
    /// A checkpoint of the index is written this many entries (or
    /// tombstones) per hold of the index lock. Tests make it small, so
    /// that deliveries interleave with the walk of a small store.
    pub checkpoint_chunk: usize,
    /// A checkpoint of the index is begun by itself, when a segment is
    /// sealed or at open, once at least this many segments were sealed
    /// since the last one began and the records written since are a
    /// quarter of the entries (between `checkpoint_records_min` and 1 000 000); 0: only
    /// when [`FragmentStore::checkpoint`] is called.
    pub checkpoint_every: u32,
    /// Records written between checkpoints begun by themselves, at least
    /// (50 000; tests take fewer).
    pub checkpoint_records_min: u64,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            segment_bytes_max: 64 << 20,
            checkpoint_chunk: checkpoint::CHUNK,
            checkpoint_every: checkpoint::EVERY_SEGMENTS,
            checkpoint_records_min: checkpoint::RECORDS_MIN,
        }
    }
}

/// One message to store: one body, one entry per user.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: MessageId,
    pub arrival_ms: u64,
    pub users: Vec<String>,
    pub folder: String,
    pub body: Vec<u8>,
    /// The message's replica set, recorded with every entry.
    pub replicas: Vec<u64>,
}

/// What [`FragmentStore::set_replicas`] did with one change.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Placed {
    /// The entry has the new set now.
    Updated,
    /// The new set leaves this node out: the copy is gone from here.
    Dropped,
    /// The entry's own set is as new or newer: it is kept.
    Kept { placed: u64 },
    /// The message is deleted here.
    Deleted(Tombstone),
    /// No such entry here.
    Absent,
}

/// One user's share of this store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserUsage {
    pub user: String,
    pub entries: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Mailbox entries `(user, message)` held.
    pub entries: u64,
    /// Deletions remembered (see [`FragmentStore::apply_tombstones`]).
    pub tombstones: u64,
    /// Distinct message bodies held.
    pub bodies: u64,
    /// Bytes of the message bodies held, each counted once.
    pub body_bytes: u64,
    pub segments: u64,
    /// Bytes on disk over all segments.
    pub disk_bytes: u64,
    /// Bytes on disk that live records use.
    pub live_bytes: u64,
    /// Fsyncs done, and operations they covered: their ratio is the group
    /// commit's batch size.
    pub fsyncs: u64,
    pub ops: u64,
}

/// How a store's index was built when it opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenReport {
    /// From a checkpoint, whose replay began at this segment (`None`: from
    /// the segments alone).
    pub checkpoint_segment: Option<u32>,
    /// Segments read (from their summaries or whole).
    pub segments_read: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    pub segment: u32,
    pub copied_records: u64,
    pub freed_bytes: u64,
}

/// The durable local store of mailbox fragments. Cheap to share: wrap it in
/// an `Arc`.
pub struct FragmentStore {
    shared: Arc<Shared>,
    tx: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for FragmentStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FragmentStore").field("dir", &self.shared.dir).finish()
    }
}

fn seg_path(dir: &Path, seg: u32) -> PathBuf {
    dir.join(format!("seg-{seg:08}.qseg"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn random_bytes() -> [u8; 32] {
    use std::io::Read;
    let mut out = [0u8; 32];
    if let Ok(mut f) = File::open("/dev/urandom")
        && f.read_exact(&mut out).is_ok()
    {
        return out;
    }
    // No /dev/urandom: fall back to what differs between processes.
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&format!("{:?}", std::time::SystemTime::now()).into_bytes());
    *h.finalize().as_bytes()
}

impl FragmentStore {
    /// A new message id, unique on this node and (with overwhelming
    /// probability) across nodes; ordered by arrival time.
    pub fn new_message_id(&self, arrival_ms: u64) -> MessageId {
        let n = self.shared.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut h = blake3::Hasher::new();
        h.update(&self.shared.id_nonce);
        h.update(&n.to_le_bytes());
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&arrival_ms.to_be_bytes());
        id[8..].copy_from_slice(&h.finalize().as_bytes()[..8]);
        MessageId(id)
    }

    async fn submit<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, StoreError> {
        if let Some(why) = self.shared.failed.get() {
            return Err(StoreError::Stopped(why.clone()));
        }
        let tx = self
            .tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(StoreError::Closed)?;
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply)).await.map_err(|_| StoreError::Closed)?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(msg)) => Err(StoreError::Io(std::io::Error::other(msg))),
            Err(_) => Err(match self.shared.failed.get() {
                Some(why) => StoreError::Stopped(why.clone()),
                None => StoreError::Closed,
            }),
        }
    }

    /// Why the store stopped taking writes, if it did: a failed fsync or
    /// i/o error, or a panic in the writer. Sticky until restart; `/health`
    /// reports it.
    pub fn failure(&self) -> Option<String> {
        if let Some(why) = self.shared.failed.get() {
            return Some(why.clone());
        }
        let open = self.tx.lock().unwrap_or_else(|p| p.into_inner()).is_some();
        let writer_gone = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|h| h.is_finished());
        (open && writer_gone).then(|| "the store writer thread is gone".to_owned())
    }

    /// Whether the disk is full: deliveries are refused (451) and deletions
    /// taken, their space given back in place, until there is room again.
    pub fn disk_full(&self) -> bool {
        self.shared.disk_full.load(Ordering::Relaxed)
    }

    /// Tests: the next fsync of a segment fails as if the disk had.
    #[cfg(feature = "testing")]
    pub fn inject_sync_failure(&self) {
        self.shared.fail_next_sync.store(true, Ordering::SeqCst);
    }

    /// Stores one message for every user in `delivery.users`, the body once.
    /// Resolves only once everything is fsynced.
    pub async fn deliver(&self, delivery: Delivery) -> Result<BodyHash, StoreError> {
        if delivery.body.len() > MESSAGE_BYTES_MAX {
            return Err(StoreError::TooLarge(delivery.body.len()));
        }
        assert!(!delivery.users.is_empty(), "a delivery has at least one user");
        for u in &delivery.users {
            check_names(u, &delivery.folder)?;
        }
        check_nodes(&delivery.replicas, &[])?;
        let hash = BodyHash::of(&delivery.body);
        self.submit(|reply| Op::Deliver {
            delivery,
            hash,
            copy: CopyOf::default(),
            reply,
        })
        .await?;
        Ok(hash)
    }

    /// Stores a copy of an entry another node holds (`meta`, its replica
    /// set and that set's version included) with its body, checked
    /// against the entry's body hash. Like a delivery: idempotent, and a
    /// deleted id stays deleted ([`FragmentStore::tombstoned`] tells).
    pub async fn take_copy(&self, user: &str, meta: &EntryMeta, body: Vec<u8>) -> Result<(), StoreError> {
        if body.len() > MESSAGE_BYTES_MAX {
            return Err(StoreError::TooLarge(body.len()));
        }
        check_names(user, &meta.folder)?;
        check_nodes(&meta.replicas, &meta.prior)?;
        let hash = BodyHash::of(&body);
        if hash != meta.body {
            return Err(StoreError::Corrupt(meta.body));
        }
        let delivery = Delivery {
            id: meta.id,
            arrival_ms: meta.arrival_ms,
            users: vec![user.to_owned()],
            folder: meta.folder.clone(),
            body,
            replicas: meta.replicas.clone(),
        };
        let copy = CopyOf {
            placed: meta.placed,
            prior: meta.prior.clone(),
            marks: meta.marks.clone(),
        };
        self.submit(|reply| Op::Deliver {
            delivery,
            hash,
            copy,
            reply,
        })
        .await
    }

    /// Merges folder and flag changes into entries of `user` (last writer
    /// wins per register, see [`crate::marks`]); entries not held here or
    /// deleted are left alone. Fsynced before it resolves; returns how
    /// many entries changed.
    pub async fn mark(&self, user: &str, changes: Vec<crate::MarkChange>) -> Result<usize, StoreError> {
        if changes.is_empty() {
            return Ok(0);
        }
        check_names(user, "")?;
        for c in &changes {
            if let Some((folder, _)) = &c.folder {
                check_names(user, folder)?;
            }
            if c.flags.len() > crate::marks::FLAGS_PER_MESSAGE_MAX {
                return Err(StoreError::Refused(format!(
                    "a change of {} flags (at most {})",
                    c.flags.len(),
                    crate::marks::FLAGS_PER_MESSAGE_MAX
                )));
            }
        }
        let user = user.to_owned();
        self.submit(|reply| Op::Mark { user, changes, reply }).await
    }

    /// Gives entries of `user` new replica sets: each change replaces the
    /// entry's set if its version is newer than the set's own (the newest
    /// set wins); an entry whose new set leaves this node (`me`) out is
    /// dropped here, durably, leaving a move marker instead of a tombstone
    /// (the message lives on in the set), as does a change that names this
    /// node among the earlier members of a message it does not hold.
    /// Fsynced before it resolves; one answer per change.
    pub async fn set_replicas(&self, user: &str, changes: Vec<SetChange>, me: u64) -> Result<Vec<Placed>, StoreError> {
        if changes.is_empty() {
            return Ok(Vec::new());
        }
        check_names(user, "")?;
        for c in &changes {
            check_nodes(&c.replicas, &c.prior)?;
        }
        let user = user.to_owned();
        self.submit(|reply| Op::Place {
            user,
            changes,
            me,
            reply,
        })
        .await
    }

    /// Deletes messages of one user (tombstones, fsynced). Returns how many
    /// were there to delete; ids not present are ignored (idempotent).
    pub async fn delete(&self, user: &str, ids: Vec<MessageId>) -> Result<usize, StoreError> {
        let hlc = crate::hlc::wall_hlc();
        let tombs = ids
            .into_iter()
            .map(|id| Tombstone {
                id,
                hlc,
                replicas: Vec::new(),
            })
            .collect();
        self.apply_tombstones(user, tombs).await
    }

    /// Records deletions (tombstones, fsynced), whether or not the messages
    /// are here: a tombstone keeps a late copy from coming back. A
    /// tombstone's replica set is the entry's when the entry is here, else
    /// the one given. Returns how many entries were removed; ids already
    /// tombstoned are ignored (idempotent).
    pub async fn apply_tombstones(&self, user: &str, tombs: Vec<Tombstone>) -> Result<usize, StoreError> {
        if tombs.is_empty() {
            return Ok(0);
        }
        check_names(user, "")?;
        if let Some(t) = tombs.iter().find(|t| t.replicas.len() > TOMB_NODES_MAX) {
            return Err(StoreError::Refused(format!(
                "a deletion naming {} nodes (at most {TOMB_NODES_MAX})",
                t.replicas.len()
            )));
        }
        let user = user.to_owned();
        self.submit(|reply| Op::Delete { user, tombs, reply }).await
    }

    /// Operations waiting in the writer's queue (a store that falls behind,
    /// e.g. slow fsyncs, shows it here first).
    pub fn queued(&self) -> usize {
        self.tx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }

    /// Stops the writer after the operations already queued, and waits.
    /// Writes body records as kind 8 from now on (`on`), whose checksum
    /// leaves the body to its hash, so that a delivery hashes its body
    /// once instead of twice; or as kind 1, which every release reads.
    /// Only once the cluster's feature level says every node reads kind 8
    /// (level 3, release 0.3.0): the node calls it when the level rises.
    pub fn write_hashed_bodies(&self, on: bool) {
        self.shared.hashed_bodies.store(on, Ordering::Relaxed);
    }

    /// How the index was built when the store opened.
    pub fn open_report(&self) -> OpenReport {
        self.shared.opened
    }

    /// Writes a checkpoint of the index now (blocking; deliveries go on
    /// meanwhile), after any being written in the background: the next
    /// start loads it and replays only what was written since. The store
    /// also writes one by itself (see [`StoreConfig::checkpoint_every`]).
    pub fn checkpoint(&self) -> Result<CheckpointReport, StoreError> {
        while self.shared.checkpointing.swap(true, Ordering::AcqRel) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let written = checkpoint::write(&self.shared);
        self.shared.checkpointing.store(false, Ordering::Release);
        written
    }

    pub fn close(&self) {
        checkpoint::stop(&self.shared);
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = h.join();
        }
    }
}

impl Drop for FragmentStore {
    fn drop(&mut self) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

pub(super) fn read_checked(file: &File, offset: u64, len: u64, hash: BodyHash) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    if BodyHash::of(&buf) != hash {
        error!(?hash, offset, len, "body failed its checksum on read");
        return Err(StoreError::Corrupt(hash));
    }
    Ok(buf)
}

pub(super) fn record_of(user: &str, m: &EntryMeta) -> EntryRecord {
    EntryRecord {
        user: user.to_owned(),
        meta: m.clone(),
    }
}
