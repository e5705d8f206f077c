//! The in-memory index: mailboxes (entries and tombstones by id), bodies
//! with their reference counts, segments, and the counts status needs.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{BodyHash, EntryMeta, MessageId};

#[derive(Debug, Clone, Copy)]
pub(super) struct Loc {
    pub(super) seg: u32,
    pub(super) record_len: u64,
}

#[derive(Debug)]
pub(super) struct BodyLoc {
    pub(super) seg: u32,
    pub(super) body_offset: u64,
    pub(super) body_len: u64,
    pub(super) record_len: u64,
    /// Live entries pointing at this body; at 0 the body is dead.
    pub(super) refs: u32,
}

#[derive(Debug)]
pub(super) struct Entry {
    pub(super) meta: EntryMeta,
    pub(super) loc: Loc,
}

#[derive(Debug)]
pub(super) struct Tomb {
    pub(super) hlc: u64,
    pub(super) replicas: Vec<u64>,
    pub(super) loc: Loc,
    /// Wall-clock ms when this store took it (the open time for those
    /// read back on open): replication drops a tombstone only once every
    /// replica has shown it holds the tombstone after this moment.
    pub(super) added_ms: u64,
    /// A move marker, not a deletion: the newer `(set, version)` this
    /// node's copy was dropped for (see `DeleteRecord::moved`).
    pub(super) moved: Option<(Vec<u64>, u64)>,
}

impl Tomb {
    pub(super) fn is_deletion(&self) -> bool {
        self.moved.is_none()
    }
}

pub(super) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Default)]
pub(super) struct Mailbox {
    pub(super) entries: BTreeMap<MessageId, Entry>,
    pub(super) tombstones: BTreeMap<MessageId, Tomb>,
    pub(super) usage_bytes: u64,
}

#[derive(Debug)]
pub(super) struct Segment {
    pub(super) file: Arc<File>,
    pub(super) len: u64,
    pub(super) live_bytes: u64,
}

/// Dead body records remembered for reclaiming at most.
pub(super) const DEAD_BODIES_MAX: usize = 1_000_000;

#[derive(Debug, Default)]
pub(super) struct Index {
    /// Dead body records not yet given back: (segment, record start,
    /// record length). See [`Index::note_dead_body`].
    pub(super) dead_bodies: Vec<(u32, u64, u64)>,
    pub(super) mailboxes: HashMap<String, Mailbox>,
    pub(super) bodies: HashMap<BodyHash, BodyLoc>,
    pub(super) segments: BTreeMap<u32, Segment>,
    pub(super) entries: u64,
    pub(super) tombstones: u64,
    pub(super) body_bytes: u64,
    /// Entries per replica set (sorted node ids): what the under-replicated
    /// count needs, without walking every entry.
    pub(super) replica_sets: HashMap<Vec<u64>, u64>,
}

impl Index {
    pub(super) fn count_replica_set(&mut self, replicas: &[u64], added: bool) {
        // Sets are kept sorted: look a sorted one up without a copy (once
        // per entry put or taken, at start a million times).
        if added
            && replicas.is_sorted()
            && let Some(n) = self.replica_sets.get_mut(replicas)
        {
            *n += 1;
            return;
        }
        let mut key = replicas.to_vec();
        key.sort_unstable();
        if added {
            *self.replica_sets.entry(key).or_default() += 1;
        } else if let Some(n) = self.replica_sets.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.replica_sets.remove(&key);
            }
        }
    }

    pub(super) fn seg_mut(&mut self, seg: u32) -> &mut Segment {
        self.segments.get_mut(&seg).expect("segment of a live record exists")
    }

    pub(super) fn entry(&self, user: &str, id: &MessageId) -> Option<&Entry> {
        self.mailboxes.get(user)?.entries.get(id)
    }

    pub(super) fn tomb(&self, user: &str, id: &MessageId) -> Option<&Tomb> {
        self.mailboxes.get(user)?.tombstones.get(id)
    }

    /// Adds a tombstone, or moves an existing one to a new location.
    pub(super) fn put_tomb(&mut self, user: &str, id: MessageId, mut tomb: Tomb) {
        let (seg, len) = (tomb.loc.seg, tomb.loc.record_len);
        let mailbox = self.mailboxes.entry(user.to_owned()).or_default();
        if let Some(old) = mailbox.tombstones.get(&id) {
            // Moved by the cleaner: still the same tombstone.
            tomb.added_ms = old.added_ms;
        }
        match mailbox.tombstones.insert(id, tomb) {
            Some(old) => self.sub_live(old.loc.seg, old.loc.record_len),
            None => self.tombstones += 1,
        }
        self.add_live(seg, len);
    }

    pub(super) fn remove_tomb(&mut self, user: &str, id: &MessageId) {
        let Some(mailbox) = self.mailboxes.get_mut(user) else {
            return;
        };
        let Some(old) = mailbox.tombstones.remove(id) else {
            return;
        };
        if mailbox.entries.is_empty() && mailbox.tombstones.is_empty() {
            self.mailboxes.remove(user);
        }
        self.tombstones -= 1;
        self.sub_live(old.loc.seg, old.loc.record_len);
    }

    pub(super) fn add_live(&mut self, seg: u32, bytes: u64) {
        self.seg_mut(seg).live_bytes += bytes;
    }

    pub(super) fn sub_live(&mut self, seg: u32, bytes: u64) {
        let s = self.seg_mut(seg);
        assert!(s.live_bytes >= bytes, "live bytes underflow in segment {seg}");
        s.live_bytes -= bytes;
    }

    /// Places a body record; keeps its reference count if it was known.
    pub(super) fn put_body(&mut self, hash: BodyHash, new: BodyLoc) {
        let record_len = new.record_len;
        let seg = new.seg;
        if let Some(old) = self.bodies.insert(hash, new) {
            let refs = old.refs;
            if refs > 0 {
                self.sub_live(old.seg, old.record_len);
                self.add_live(seg, record_len);
            }
            self.bodies.get_mut(&hash).expect("just inserted").refs = refs;
        }
    }

    pub(super) fn ref_body(&mut self, hash: &BodyHash) {
        let b = self.bodies.get_mut(hash).expect("entry's body is indexed");
        b.refs += 1;
        if b.refs == 1 {
            let (seg, len, body_len) = (b.seg, b.record_len, b.body_len);
            self.add_live(seg, len);
            self.body_bytes += body_len;
        }
    }

    pub(super) fn unref_body(&mut self, hash: &BodyHash) {
        let b = self.bodies.get_mut(hash).expect("entry's body is indexed");
        assert!(b.refs > 0, "body refcount underflow");
        b.refs -= 1;
        if b.refs == 0 {
            let b = self.bodies.remove(hash).expect("present");
            self.sub_live(b.seg, b.record_len);
            self.body_bytes -= b.body_len;
            self.note_dead_body(&b);
        }
    }

    /// Remembers where a dead body record lies, so that its space can be
    /// given back in place when the disk is full (bounded: past the bound
    /// only compaction frees it).
    pub(super) fn note_dead_body(&mut self, b: &BodyLoc) {
        if self.dead_bodies.len() < DEAD_BODIES_MAX {
            let start = b.body_offset - crate::record::BODY_PREFIX_BYTES;
            self.dead_bodies.push((b.seg, start, b.record_len));
        }
    }

    /// Adds an entry, or moves an existing one to a new location.
    pub(super) fn put_entry(&mut self, user: &str, meta: EntryMeta, loc: Loc) {
        self.count_replica_set(&meta.replicas, true);
        let mailbox = match self.mailboxes.get_mut(user) {
            Some(m) => m,
            None => self.mailboxes.entry(user.to_owned()).or_default(),
        };
        let size = meta.size_bytes;
        let body = meta.body;
        let old = mailbox.entries.insert(meta.id, Entry { meta, loc });
        if old.is_none() {
            mailbox.usage_bytes += size;
        }
        match old {
            Some(old) => {
                self.count_replica_set(&old.meta.replicas, false);
                self.sub_live(old.loc.seg, old.loc.record_len);
                self.add_live(loc.seg, loc.record_len);
            }
            None => {
                self.entries += 1;
                self.add_live(loc.seg, loc.record_len);
                self.ref_body(&body);
            }
        }
    }

    /// Adds a run of one mailbox's entries whose bodies the caller has
    /// indexed and counted a reference to, each (a checkpoint's, at start):
    /// as [`Index::put_entry`] for each but the bodies, with the mailbox
    /// looked up once and each run of equal replica sets counted once (a
    /// start puts millions).
    pub(super) fn put_fresh_entries(&mut self, user: String, run: Vec<(EntryMeta, Loc)>) {
        if run.is_empty() {
            return;
        }
        let mut mailbox = self.mailboxes.remove(&user).unwrap_or_default();
        let (mut set, mut same): (Vec<u64>, u64) = (Vec::new(), 0);
        for (meta, loc) in run {
            if meta.replicas != set {
                self.count_replica_sets(&set, same);
                (set, same) = (meta.replicas.clone(), 0);
            }
            same += 1;
            let size = meta.size_bytes;
            match mailbox.entries.insert(meta.id, Entry { meta, loc }) {
                Some(old) => {
                    self.count_replica_set(&old.meta.replicas, false);
                    self.sub_live(old.loc.seg, old.loc.record_len);
                    self.add_live(loc.seg, loc.record_len);
                }
                None => {
                    mailbox.usage_bytes += size;
                    self.entries += 1;
                    self.add_live(loc.seg, loc.record_len);
                }
            }
        }
        self.count_replica_sets(&set, same);
        self.mailboxes.insert(user, mailbox);
    }

    /// Counts `n` more entries of replica set `replicas`.
    fn count_replica_sets(&mut self, replicas: &[u64], n: u64) {
        if n == 0 {
            return;
        }
        let mut key = replicas.to_vec();
        key.sort_unstable();
        *self.replica_sets.entry(key).or_default() += n;
    }

    pub(super) fn remove_entry(&mut self, user: &str, id: &MessageId) -> bool {
        let Some(mailbox) = self.mailboxes.get_mut(user) else {
            return false;
        };
        let Some(old) = mailbox.entries.remove(id) else {
            return false;
        };
        mailbox.usage_bytes -= old.meta.size_bytes;
        if mailbox.entries.is_empty() && mailbox.tombstones.is_empty() {
            self.mailboxes.remove(user);
        }
        self.count_replica_set(&old.meta.replicas, false);
        self.entries -= 1;
        self.sub_live(old.loc.seg, old.loc.record_len);
        self.unref_body(&old.meta.body);
        true
    }
}

pub(super) struct Shared {
    pub(super) dir: PathBuf,
    pub(super) index: Mutex<Index>,
    pub(super) fsyncs: AtomicU64,
    pub(super) ops: AtomicU64,
    /// Makes message ids unique across nodes and restarts.
    pub(super) id_nonce: [u8; 32],
    pub(super) id_counter: AtomicU64,
    /// Set once, forever, when a write can no longer be trusted (a failed
    /// fsync, an i/o error other than a full disk, a panic in the writer):
    /// every later write is refused with it. An fsync is never retried on
    /// the same pages: after a failure the kernel may already have dropped
    /// them and a second fsync would report success over lost data.
    pub(super) failed: std::sync::OnceLock<String>,
    /// The disk is full: deliveries are refused until space is freed (the
    /// writer's own flag, mirrored for `FragmentStore::disk_full`).
    pub(super) disk_full: std::sync::atomic::AtomicBool,
    /// Tests: make the next fsync fail (see `FragmentStore::inject_sync_failure`).
    pub(super) fail_next_sync: std::sync::atomic::AtomicBool,
    /// Body records are written as kind 8 (the body hashed once): see
    /// `FragmentStore::write_hashed_bodies`.
    pub(super) hashed_bodies: std::sync::atomic::AtomicBool,
    /// How the index was built at open.
    pub(super) opened: super::OpenReport,
    /// Entries per lock hold when a checkpoint is written.
    pub(super) checkpoint_chunk: usize,
    /// Sealed segments between checkpoints begun by themselves (0: none).
    pub(super) checkpoint_every: u32,
    pub(super) checkpoint_records_min: u64,
    /// The store is closing: a checkpoint being written gives up.
    pub(super) closing: std::sync::atomic::AtomicBool,
    /// A checkpoint is being written (one at a time).
    pub(super) checkpointing: std::sync::atomic::AtomicBool,
    /// The segment where the replay of the last checkpoint written begins.
    pub(super) checkpoint_seg: std::sync::atomic::AtomicU32,
    /// Entry and tombstone records made durable since open, and replayed
    /// at open ...
    pub(super) records: AtomicU64,
    /// ... and what `records` was when the last checkpoint written began.
    pub(super) checkpoint_records: AtomicU64,
    /// The thread writing one in the background, for `close` to wait on.
    pub(super) checkpoint_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Shared {
    /// Stops the store taking writes, for good (the first reason stays).
    pub(super) fn fail(&self, why: String) {
        if self.failed.set(why.clone()).is_ok() {
            tracing::error!(reason = %why, "the store stopped taking writes; deliveries get 451 until the node is restarted on a working disk");
        }
    }

    pub(super) fn index(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock is a bug that already took the
        // writer down; readers may still read.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
}
