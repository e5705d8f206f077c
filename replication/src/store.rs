//! The fragment store: append-only segments, an in-memory index rebuilt from
//! them on open, one writer thread doing group commit, and a log cleaner.
//!
//! Files in the store directory: `seg-NNNNNNNN.qseg`, numbered upwards. The
//! highest-numbered segment is the active one; the others are sealed.
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use crate::record::{self, Decoded, DeleteRecord, EntryRecord};
use crate::{BodyHash, EntryMeta, MESSAGE_BYTES_MAX, MessageId, SyncItem, Tombstone};

/// Writes waiting for the writer thread. Bounded so that a slow disk pushes
/// back on the protocol sessions instead of growing memory; 1024 deliveries of
/// the 4.7 KB mean is under 5 MiB.
const WRITE_QUEUE_DEPTH: usize = 1024;
/// At most this many operations share one fsync, so one batch cannot hold
/// the others' acknowledgements for long.
const BATCH_OPS_MAX: usize = 512;
/// At most this many bytes share one fsync (a batch's buffer is in memory).
const BATCH_BYTES_MAX: usize = 16 << 20;
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
}

#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub dir: PathBuf,
    /// A segment is sealed and a new one started once it is this large.
    pub segment_bytes_max: u64,
}

impl StoreConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            dir: dir.into(),
            segment_bytes_max: 64 << 20,
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactReport {
    pub segment: u32,
    pub copied_records: u64,
    pub freed_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Loc {
    seg: u32,
    record_len: u64,
}

#[derive(Debug)]
struct BodyLoc {
    seg: u32,
    body_offset: u64,
    body_len: u64,
    record_len: u64,
    /// Live entries pointing at this body; at 0 the body is dead.
    refs: u32,
}

#[derive(Debug)]
struct Entry {
    meta: EntryMeta,
    loc: Loc,
}

#[derive(Debug)]
struct Tomb {
    hlc: u64,
    replicas: Vec<u64>,
    loc: Loc,
    /// Wall-clock ms when this store took it (the open time for those
    /// read back on open): replication drops a tombstone only once every
    /// replica has shown it holds the tombstone after this moment.
    added_ms: u64,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, Default)]
struct Mailbox {
    entries: BTreeMap<MessageId, Entry>,
    tombstones: BTreeMap<MessageId, Tomb>,
    usage_bytes: u64,
}

#[derive(Debug)]
struct Segment {
    file: Arc<File>,
    len: u64,
    live_bytes: u64,
}

#[derive(Debug, Default)]
struct Index {
    mailboxes: HashMap<String, Mailbox>,
    bodies: HashMap<BodyHash, BodyLoc>,
    segments: BTreeMap<u32, Segment>,
    entries: u64,
    tombstones: u64,
    body_bytes: u64,
    /// Entries per replica set (sorted node ids): what the under-replicated
    /// count needs, without walking every entry.
    replica_sets: HashMap<Vec<u64>, u64>,
}

impl Index {
    fn count_replica_set(&mut self, replicas: &[u64], added: bool) {
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

    fn seg_mut(&mut self, seg: u32) -> &mut Segment {
        self.segments.get_mut(&seg).expect("segment of a live record exists")
    }

    fn entry(&self, user: &str, id: &MessageId) -> Option<&Entry> {
        self.mailboxes.get(user)?.entries.get(id)
    }

    fn tomb(&self, user: &str, id: &MessageId) -> Option<&Tomb> {
        self.mailboxes.get(user)?.tombstones.get(id)
    }

    /// Adds a tombstone, or moves an existing one to a new location.
    fn put_tomb(&mut self, user: &str, id: MessageId, mut tomb: Tomb) {
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

    fn remove_tomb(&mut self, user: &str, id: &MessageId) {
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

    fn add_live(&mut self, seg: u32, bytes: u64) {
        self.seg_mut(seg).live_bytes += bytes;
    }

    fn sub_live(&mut self, seg: u32, bytes: u64) {
        let s = self.seg_mut(seg);
        assert!(s.live_bytes >= bytes, "live bytes underflow in segment {seg}");
        s.live_bytes -= bytes;
    }

    /// Places a body record; keeps its reference count if it was known.
    fn put_body(&mut self, hash: BodyHash, new: BodyLoc) {
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

    fn ref_body(&mut self, hash: &BodyHash) {
        let b = self.bodies.get_mut(hash).expect("entry's body is indexed");
        b.refs += 1;
        if b.refs == 1 {
            let (seg, len, body_len) = (b.seg, b.record_len, b.body_len);
            self.add_live(seg, len);
            self.body_bytes += body_len;
        }
    }

    fn unref_body(&mut self, hash: &BodyHash) {
        let b = self.bodies.get_mut(hash).expect("entry's body is indexed");
        assert!(b.refs > 0, "body refcount underflow");
        b.refs -= 1;
        if b.refs == 0 {
            let b = self.bodies.remove(hash).expect("present");
            self.sub_live(b.seg, b.record_len);
            self.body_bytes -= b.body_len;
        }
    }

    /// Adds an entry, or moves an existing one to a new location.
    fn put_entry(&mut self, user: &str, meta: EntryMeta, loc: Loc) {
        let mailbox = self.mailboxes.entry(user.to_owned()).or_default();
        let size = meta.size_bytes;
        let body = meta.body;
        let replicas = meta.replicas.clone();
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
        self.count_replica_set(&replicas, true);
    }

    fn remove_entry(&mut self, user: &str, id: &MessageId) -> bool {
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

struct Shared {
    dir: PathBuf,
    index: Mutex<Index>,
    fsyncs: AtomicU64,
    ops: AtomicU64,
    /// Makes message ids unique across nodes and restarts.
    id_nonce: [u8; 32],
    id_counter: AtomicU64,
}

impl Shared {
    fn index(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock is a bug that already took the
        // writer down; readers may still read.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

enum Op {
    Deliver {
        delivery: Delivery,
        hash: BodyHash,
        reply: Reply<()>,
    },
    Delete {
        user: String,
        tombs: Vec<Tombstone>,
        reply: Reply<usize>,
    },
    Relocate {
        seg: u32,
        items: Vec<Relocation>,
        reply: Reply<u64>,
    },
    DropSegment {
        seg: u32,
        reply: Reply<bool>,
    },
}

impl Op {
    fn bytes(&self) -> usize {
        match self {
            Op::Deliver { delivery, .. } => delivery.body.len(),
            Op::Relocate { items, .. } => items.iter().map(|r| r.bytes()).sum(),
            _ => 64,
        }
    }
}

enum Relocation {
    Body {
        hash: BodyHash,
        bytes: Vec<u8>,
    },
    Entry(EntryRecord),
    Tomb(DeleteRecord),
    /// A body that failed its checksum while being copied: the messages
    /// that use it are unreadable here, and are deleted (logged) so that
    /// the segment can still be cleaned.
    Lost {
        hash: BodyHash,
    },
}

impl Relocation {
    fn bytes(&self) -> usize {
        match self {
            Relocation::Body { bytes, .. } => bytes.len(),
            Relocation::Entry(_) | Relocation::Tomb(_) | Relocation::Lost { .. } => 128,
        }
    }
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
    /// Opens (or creates) the store in `config.dir`, rebuilding the index
    /// from the segments and cutting off a torn tail. Blocking: call it
    /// before serving, or from a blocking thread.
    pub fn open(config: StoreConfig) -> Result<Self, StoreError> {
        fs::create_dir_all(&config.dir)?;
        let mut seg_ids: Vec<u32> = fs::read_dir(&config.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?.strip_suffix(".qseg")?.parse().ok()
            })
            .collect();
        seg_ids.sort_unstable();

        let mut index = Index::default();
        // Latest record of each kind wins; tombstones remove earlier entries.
        let mut bodies: HashMap<BodyHash, BodyLoc> = HashMap::new();
        let mut entries: HashMap<(String, MessageId), (EntryRecord, Loc)> = HashMap::new();
        let mut tombs: HashMap<(String, MessageId), (DeleteRecord, Loc)> = HashMap::new();
        let last = seg_ids.last().copied();
        for &seg in &seg_ids {
            let path = seg_path(&config.dir, seg);
            let data = fs::read(&path)?;
            // Records take effect batch by batch, at each commit record.
            let mut pending: Vec<(u64, u64, Decoded)> = Vec::new();
            let found = record::scan(&data, |offset, record_len, decoded| {
                if !matches!(decoded, Decoded::Commit) {
                    pending.push((offset, record_len, decoded));
                    return;
                }
                for (_, record_len, decoded) in pending.drain(..) {
                    match decoded {
                        Decoded::Body {
                            hash,
                            body_offset,
                            body_len,
                        } => {
                            let loc = BodyLoc {
                                seg,
                                body_offset,
                                body_len,
                                record_len,
                                refs: 0,
                            };
                            bodies.insert(hash, loc);
                        }
                        Decoded::Entry(e) => {
                            // An entry after a tombstone of the same id can
                            // only follow that tombstone's expiry: it wins.
                            let key = (e.user.clone(), e.id);
                            tombs.remove(&key);
                            entries.insert(key, (e, Loc { seg, record_len }));
                        }
                        Decoded::Delete(d) => {
                            let key = (d.user.clone(), d.id);
                            entries.remove(&key);
                            tombs.insert(key, (d, Loc { seg, record_len }));
                        }
                        Decoded::Commit => unreachable!("commits are not pending"),
                    }
                }
            });
            for (start, end, why) in &found.corrupt {
                error!(segment = seg, start, end, why, "damaged records skipped on recovery");
            }
            let mut len = data.len() as u64;
            // An unfinished batch (no commit record) or a torn record at the
            // end: the tail from there on was never acknowledged.
            let cut = pending.first().map(|p| p.0).or(found.torn.map(|t| t.0));
            if let Some(offset) = cut {
                let why = found.torn.map_or("batch without commit record", |t| t.1);
                if Some(seg) == last {
                    warn!(
                        segment = seg,
                        offset,
                        why,
                        cut_bytes = len - offset,
                        "torn tail cut off on recovery"
                    );
                    let f = OpenOptions::new().write(true).open(&path)?;
                    f.set_len(offset)?;
                    f.sync_all()?;
                    len = offset;
                } else {
                    error!(
                        segment = seg,
                        offset,
                        why,
                        lost_bytes = len - offset,
                        "unreadable tail inside a sealed segment; skipped"
                    );
                }
            }
            let file = Arc::new(OpenOptions::new().read(true).append(true).open(&path)?);
            index.segments.insert(
                seg,
                Segment {
                    file,
                    len,
                    live_bytes: 0,
                },
            );
        }
        index.bodies = bodies;
        let mut sorted: Vec<_> = entries.into_values().collect();
        sorted.sort_by(|a, b| (&a.0.user, a.0.id).cmp(&(&b.0.user, b.0.id)));
        for (e, loc) in sorted {
            if !index.bodies.contains_key(&e.body) {
                error!(user = %e.user, id = %e.id, "entry without its body on recovery; dropped");
                continue;
            }
            let user = e.user.clone();
            index.put_entry(&user, meta_of(e), loc);
        }
        for ((user, id), (d, loc)) in tombs {
            index.put_tomb(
                &user,
                id,
                Tomb {
                    hlc: d.hlc,
                    replicas: d.replicas,
                    loc,
                    added_ms: now_ms(),
                },
            );
        }
        // Bodies nobody references are dead space for the cleaner.
        index.bodies.retain(|_, b| b.refs > 0);

        // The active segment: the last one if there is room, else a new one.
        let active = match index.segments.last_key_value() {
            Some((&seg, s)) if s.len < config.segment_bytes_max => seg,
            Some((&seg, _)) => new_segment(&config.dir, &mut index, seg + 1)?,
            None => new_segment(&config.dir, &mut index, 1)?,
        };
        info!(
            dir = %config.dir.display(),
            segments = index.segments.len(),
            entries = index.entries,
            tombstones = index.tombstones,
            bodies = index.bodies.len(),
            "fragment store opened"
        );

        let shared = Arc::new(Shared {
            dir: config.dir.clone(),
            index: Mutex::new(index),
            fsyncs: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            id_nonce: random_bytes(),
            id_counter: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_DEPTH);
        let writer = Writer {
            shared: shared.clone(),
            active,
            segment_bytes_max: config.segment_bytes_max,
            batch_seq: 0,
        };
        let handle = std::thread::Builder::new()
            .name("quill-store-writer".into())
            .spawn(move || writer.run(rx))?;
        Ok(FragmentStore {
            shared,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
        })
    }

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
            Err(_) => Err(StoreError::Closed),
        }
    }

    /// Stores one message for every user in `delivery.users`, the body once.
    /// Resolves only once everything is fsynced.
    pub async fn deliver(&self, delivery: Delivery) -> Result<BodyHash, StoreError> {
        if delivery.body.len() > MESSAGE_BYTES_MAX {
            return Err(StoreError::TooLarge(delivery.body.len()));
        }
        assert!(!delivery.users.is_empty(), "a delivery has at least one user");
        let hash = BodyHash::of(&delivery.body);
        self.submit(|reply| Op::Deliver { delivery, hash, reply }).await?;
        Ok(hash)
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
        let user = user.to_owned();
        self.submit(|reply| Op::Delete { user, tombs, reply }).await
    }

    /// The user's mailbox entries, oldest first.
    pub fn list(&self, user: &str) -> Vec<EntryMeta> {
        let index = self.shared.index();
        index
            .mailboxes
            .get(user)
            .map(|m| m.entries.values().map(|e| e.meta.clone()).collect())
            .unwrap_or_default()
    }

    /// Every message of the user held here or deleted here (tombstones),
    /// restricted to those whose replica set includes `peer` when given.
    pub fn sync_items(&self, user: &str, peer: Option<u64>) -> Vec<SyncItem> {
        let index = self.shared.index();
        let Some(m) = index.mailboxes.get(user) else {
            return Vec::new();
        };
        let wanted = |replicas: &[u64]| peer.is_none_or(|p| replicas.contains(&p));
        let mut out: Vec<SyncItem> = m
            .entries
            .values()
            .filter(|e| wanted(&e.meta.replicas))
            .map(|e| SyncItem::Live(e.meta.clone()))
            .chain(m.tombstones.iter().filter(|(_, t)| wanted(&t.replicas)).map(|(id, t)| {
                SyncItem::Dead(Tombstone {
                    id: *id,
                    hlc: t.hlc,
                    replicas: t.replicas.clone(),
                })
            }))
            .collect();
        out.sort_by_key(|i| i.id());
        out
    }

    /// For every user with messages (or tombstones) whose replica set
    /// includes `peer`: a digest of those messages' ids and whether each is
    /// held or deleted. Two replicas that agree compute the same digest.
    pub fn peer_digests(&self, peer: u64) -> Vec<(String, [u8; 32])> {
        let index = self.shared.index();
        let mut out = Vec::new();
        for (user, m) in &index.mailboxes {
            if let Some(d) = mailbox_digest(m, peer) {
                out.push((user.clone(), d));
            }
        }
        out.sort();
        out
    }

    /// The digest [`FragmentStore::peer_digests`] computes for one user
    /// (all zeros when nothing of the user concerns `peer`).
    pub fn digest(&self, user: &str, peer: u64) -> [u8; 32] {
        let index = self.shared.index();
        index
            .mailboxes
            .get(user)
            .and_then(|m| mailbox_digest(m, peer))
            .unwrap_or([0; 32])
    }

    /// Those of `ids` that the user's tombstones here name (deleted here).
    pub fn tombstoned(&self, user: &str, ids: &[MessageId]) -> Vec<MessageId> {
        let index = self.shared.index();
        let Some(m) = index.mailboxes.get(user) else {
            return Vec::new();
        };
        ids.iter().copied().filter(|id| m.tombstones.contains_key(id)).collect()
    }

    /// Whether any entry of the user is held here.
    pub fn holds(&self, user: &str) -> bool {
        let index = self.shared.index();
        index.mailboxes.get(user).is_some_and(|m| !m.entries.is_empty())
    }

    /// Entries and bytes per user held here (users with entries only).
    pub fn usage(&self) -> Vec<UserUsage> {
        let index = self.shared.index();
        let mut out: Vec<UserUsage> = index
            .mailboxes
            .iter()
            .filter(|(_, m)| !m.entries.is_empty())
            .map(|(user, m)| UserUsage {
                user: user.clone(),
                entries: m.entries.len() as u64,
                bytes: m.usage_bytes,
            })
            .collect();
        out.sort_by(|a, b| a.user.cmp(&b.user));
        out
    }

    /// Whether a body is held here (so a copy need not travel).
    pub fn has_body(&self, hash: &BodyHash) -> bool {
        self.shared.index().bodies.contains_key(hash)
    }

    /// Entries held here whose replica set has fewer than `n_replicas`
    /// nodes that `up` accepts, counted only where this node (`me`) is the
    /// lowest up holder, so that summing over nodes counts each message
    /// once.
    pub fn under_replicated(&self, me: u64, n_replicas: usize, up: impl Fn(u64) -> bool) -> u64 {
        let index = self.shared.index();
        // By replica set (few of them), not by entry.
        index
            .replica_sets
            .iter()
            .filter(|(replicas, _)| {
                let mut live = replicas.iter().filter(|r| up(**r));
                live.clone().count() < n_replicas && live.all(|r| *r >= me)
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// Forgets tombstones older than `hlc_before`: after that a copy that
    /// shows up again is taken as new mail. Returns how many went.
    pub fn expire_tombstones(&self, hlc_before: u64) -> usize {
        self.forget_tombstones(|_, hlc, _, _| hlc < hlc_before)
    }

    /// Forgets the tombstones for which `drop(user, hlc, replicas,
    /// added_ms)` holds (see [`FragmentStore::expire_tombstones`]).
    pub fn forget_tombstones(&self, drop: impl Fn(&str, u64, &[u64], u64) -> bool) -> usize {
        let mut index = self.shared.index();
        let old: Vec<(String, MessageId)> = index
            .mailboxes
            .iter()
            .flat_map(|(user, m)| {
                m.tombstones
                    .iter()
                    .filter(|(_, t)| drop(user, t.hlc, &t.replicas, t.added_ms))
                    .map(|(id, _)| (user.clone(), *id))
            })
            .collect();
        for (user, id) in &old {
            index.remove_tomb(user, id);
        }
        old.len()
    }

    /// Bytes of the user's messages (for quotas).
    pub fn usage_bytes(&self, user: &str) -> u64 {
        self.shared.index().mailboxes.get(user).map_or(0, |m| m.usage_bytes)
    }

    /// Reads a body back and checks it against its hash.
    pub async fn read_body(&self, hash: BodyHash) -> Result<Vec<u8>, StoreError> {
        let (file, offset, len) = {
            let index = self.shared.index();
            let b = index.bodies.get(&hash).ok_or(StoreError::NoSuchBody)?;
            let seg = index.segments.get(&b.seg).ok_or(StoreError::NoSuchBody)?;
            (seg.file.clone(), b.body_offset, b.body_len)
        };
        tokio::task::spawn_blocking(move || read_checked(&file, offset, len, hash))
            .await
            .map_err(|e| StoreError::Io(std::io::Error::other(e)))?
    }

    pub fn stats(&self) -> StoreStats {
        let index = self.shared.index();
        StoreStats {
            entries: index.entries,
            tombstones: index.tombstones,
            bodies: index.bodies.len() as u64,
            body_bytes: index.body_bytes,
            segments: index.segments.len() as u64,
            disk_bytes: index.segments.values().map(|s| s.len).sum(),
            live_bytes: index.segments.values().map(|s| s.live_bytes).sum(),
            fsyncs: self.shared.fsyncs.load(Ordering::Relaxed),
            ops: self.shared.ops.load(Ordering::Relaxed),
        }
    }

    /// One step of the log cleaner: if the oldest sealed segment is worth
    /// cleaning, copies its live records forward (through the writer, so
    /// deliveries go on meanwhile) and removes it. Returns what it did.
    pub async fn compact_once(&self) -> Result<Option<CompactReport>, StoreError> {
        let (seg, file, plan) = {
            let index = self.shared.index();
            if index.segments.len() < 2 {
                return Ok(None);
            }
            let (&seg, oldest) = index.segments.first_key_value().expect("non-empty");
            let total_disk: u64 = index.segments.values().map(|s| s.len).sum();
            let total_live: u64 = index.segments.values().map(|s| s.live_bytes).sum();
            let ratio = |live: u64, len: u64| if len == 0 { 0.0 } else { live as f64 / len as f64 };
            let worth = ratio(oldest.live_bytes, oldest.len) < CLEAN_LIVE_RATIO_MAX
                || ratio(total_live, total_disk) < CLEAN_LIVE_RATIO_MAX;
            if !worth {
                return Ok(None);
            }
            let mut plan: Vec<(u64, u64, Option<BodyHash>)> = Vec::new();
            for (hash, b) in &index.bodies {
                if b.seg == seg {
                    plan.push((b.body_offset, b.body_len, Some(*hash)));
                }
            }
            let entries: Vec<EntryRecord> = index
                .mailboxes
                .iter()
                .flat_map(|(user, m)| {
                    m.entries
                        .values()
                        .filter(|e| e.loc.seg == seg)
                        .map(|e| record_of(user, &e.meta))
                })
                .collect();
            let tombs: Vec<DeleteRecord> = index
                .mailboxes
                .iter()
                .flat_map(|(user, m)| {
                    m.tombstones
                        .iter()
                        .filter(|(_, t)| t.loc.seg == seg)
                        .map(|(id, t)| DeleteRecord {
                            user: user.clone(),
                            id: *id,
                            hlc: t.hlc,
                            replicas: t.replicas.clone(),
                        })
                })
                .collect();
            (seg, oldest.file.clone(), (plan, entries, tombs))
        };
        let freed_bytes = self.shared.index().segments.get(&seg).map_or(0, |s| s.len);
        let (bodies, entries, tombs) = plan;
        let items = tokio::task::spawn_blocking(move || -> Result<Vec<Relocation>, StoreError> {
            let mut items = Vec::with_capacity(bodies.len() + entries.len());
            for (offset, len, hash) in bodies {
                let hash = hash.expect("body plan has a hash");
                match read_checked(&file, offset, len, hash) {
                    Ok(bytes) => items.push(Relocation::Body { hash, bytes }),
                    Err(StoreError::Corrupt(_)) => items.push(Relocation::Lost { hash }),
                    Err(e) => return Err(e),
                }
            }
            items.extend(entries.into_iter().map(Relocation::Entry));
            items.extend(tombs.into_iter().map(Relocation::Tomb));
            Ok(items)
        })
        .await
        .map_err(|e| StoreError::Io(std::io::Error::other(e)))??;
        let copied_records = self.submit(|reply| Op::Relocate { seg, items, reply }).await?;
        if !self.submit(|reply| Op::DropSegment { seg, reply }).await? {
            // Something in it came alive again meanwhile (a delivery of an
            // identical body); the next round will copy it.
            return Ok(None);
        }
        info!(segment = seg, copied_records, freed_bytes, "segment cleaned");
        Ok(Some(CompactReport {
            segment: seg,
            copied_records,
            freed_bytes,
        }))
    }

    /// Stops the writer after the operations already queued, and waits.
    pub fn close(&self) {
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

fn read_checked(file: &File, offset: u64, len: u64, hash: BodyHash) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    if BodyHash::of(&buf) != hash {
        error!(?hash, offset, len, "body failed its checksum on read");
        return Err(StoreError::Corrupt(hash));
    }
    Ok(buf)
}

fn meta_of(e: EntryRecord) -> EntryMeta {
    EntryMeta {
        id: e.id,
        body: e.body,
        size_bytes: e.size_bytes,
        arrival_ms: e.arrival_ms,
        folder: e.folder,
        flags: e.flags,
        replicas: e.replicas,
    }
}

fn record_of(user: &str, m: &EntryMeta) -> EntryRecord {
    EntryRecord {
        user: user.to_owned(),
        id: m.id,
        body: m.body,
        size_bytes: m.size_bytes,
        arrival_ms: m.arrival_ms,
        folder: m.folder.clone(),
        flags: m.flags,
        replicas: m.replicas.clone(),
    }
}

fn new_segment(dir: &Path, index: &mut Index, seg: u32) -> Result<u32, StoreError> {
    let path = seg_path(dir, seg);
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(&path)?;
    file.sync_all()?;
    // The new name must survive a crash, or records in it would vanish.
    sync_dir(dir)?;
    index.segments.insert(
        seg,
        Segment {
            file: Arc::new(file),
            len: 0,
            live_bytes: 0,
        },
    );
    Ok(seg)
}

/// What a batch does to the index once its records are durable.
enum Effect {
    Body {
        hash: BodyHash,
        loc: BodyLoc,
    },
    Entry {
        rec: EntryRecord,
        loc: Loc,
    },
    /// A tombstone written (or moved): removes the entry if there is one.
    Tomb {
        rec: DeleteRecord,
        loc: Loc,
    },
    /// An entry whose body is lost: removed without a tombstone.
    Forget {
        user: String,
        id: MessageId,
    },
}

/// Appends an entry record to a batch and notes its effect.
fn write_entry(buf: &mut Vec<u8>, effects: &mut Vec<Effect>, seg: u32, rec: EntryRecord) {
    let start = buf.len();
    record::encode_entry(buf, &rec);
    let record_len = (buf.len() - start) as u64;
    effects.push(Effect::Entry {
        rec,
        loc: Loc { seg, record_len },
    });
}

/// Appends a tombstone record to a batch and notes its effect.
fn write_tomb(buf: &mut Vec<u8>, effects: &mut Vec<Effect>, seg: u32, rec: DeleteRecord) {
    let start = buf.len();
    record::encode_delete(buf, &rec);
    let record_len = (buf.len() - start) as u64;
    effects.push(Effect::Tomb {
        rec,
        loc: Loc { seg, record_len },
    });
}

enum Done {
    Deliver(Reply<()>),
    Delete(Reply<usize>, usize),
    Relocate(Reply<u64>, u64),
}

struct Writer {
    shared: Arc<Shared>,
    active: u32,
    segment_bytes_max: u64,
    /// Numbers the commit records (for reading a segment by eye).
    batch_seq: u64,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        while let Some(first) = rx.blocking_recv() {
            let mut bytes = first.bytes();
            let mut batch = vec![first];
            while batch.len() < BATCH_OPS_MAX && bytes < BATCH_BYTES_MAX {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op.bytes();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            self.commit(batch);
        }
    }

    fn commit(&mut self, batch: Vec<Op>) {
        let n_ops = batch.len() as u64;
        let mut buf = Vec::new();
        let mut effects = Vec::new();
        let mut dones = Vec::with_capacity(batch.len());
        let mut drops = Vec::new();
        let rotate;
        {
            let index = self.shared.index();
            let active = index.segments.get(&self.active).expect("active segment");
            rotate = active.len >= self.segment_bytes_max;
        }
        if rotate && let Err(e) = self.rotate() {
            error!(error = %e, "cannot start a new segment");
            fail_all(batch, &e.to_string());
            return;
        }
        let seg = self.active;
        let base = self.shared.index().segments.get(&seg).expect("active").len;
        {
            let index = self.shared.index();
            let mut new_bodies: HashSet<BodyHash> = HashSet::new();
            let mut deleted: HashSet<(String, MessageId)> = HashSet::new();
            let mut moved_bodies: HashSet<BodyHash> = HashSet::new();
            let mut new_entries: HashSet<(String, MessageId)> = HashSet::new();
            for op in batch {
                match op {
                    Op::Deliver { delivery, hash, reply } => {
                        let live = index.bodies.get(&hash).is_some_and(|b| b.refs > 0);
                        if !live && new_bodies.insert(hash) {
                            let start = buf.len() as u64;
                            let body_rel = record::encode_body(&mut buf, &hash, &delivery.body);
                            let record_len = buf.len() as u64 - start;
                            effects.push(Effect::Body {
                                hash,
                                loc: BodyLoc {
                                    seg,
                                    body_offset: base + start + body_rel,
                                    body_len: delivery.body.len() as u64,
                                    record_len,
                                    refs: 0,
                                },
                            });
                        }
                        for user in delivery.users {
                            // Delivering the same id again is a no-op
                            // (idempotent); a deleted id stays deleted.
                            let key = (user.clone(), delivery.id);
                            if index.entry(&user, &delivery.id).is_some()
                                || index.tomb(&user, &delivery.id).is_some()
                                || deleted.contains(&key)
                                || !new_entries.insert(key)
                            {
                                continue;
                            }
                            let rec = EntryRecord {
                                user,
                                id: delivery.id,
                                body: hash,
                                size_bytes: delivery.body.len() as u64,
                                arrival_ms: delivery.arrival_ms,
                                folder: delivery.folder.clone(),
                                flags: 0,
                                replicas: delivery.replicas.clone(),
                            };
                            write_entry(&mut buf, &mut effects, seg, rec);
                        }
                        dones.push(Done::Deliver(reply));
                    }
                    Op::Delete { user, tombs, reply } => {
                        let mut n = 0;
                        for t in tombs {
                            let key = (user.clone(), t.id);
                            if index.tomb(&user, &t.id).is_some() || !deleted.insert(key.clone()) {
                                continue;
                            }
                            let entry = index.entry(&user, &t.id);
                            let replicas = match entry {
                                Some(e) => e.meta.replicas.clone(),
                                None => t.replicas,
                            };
                            if entry.is_some() || new_entries.contains(&key) {
                                n += 1;
                            }
                            let rec = DeleteRecord {
                                user: user.clone(),
                                id: t.id,
                                hlc: t.hlc,
                                replicas,
                            };
                            write_tomb(&mut buf, &mut effects, seg, rec);
                        }
                        dones.push(Done::Delete(reply, n));
                    }
                    Op::Relocate {
                        seg: from,
                        items,
                        reply,
                    } => {
                        let mut n = 0;
                        for item in items {
                            match item {
                                Relocation::Body { hash, bytes } => {
                                    let still = index.bodies.get(&hash).is_some_and(|b| b.seg == from && b.refs > 0);
                                    if still && moved_bodies.insert(hash) && new_bodies.insert(hash) {
                                        let start = buf.len() as u64;
                                        let body_rel = record::encode_body(&mut buf, &hash, &bytes);
                                        let record_len = buf.len() as u64 - start;
                                        effects.push(Effect::Body {
                                            hash,
                                            loc: BodyLoc {
                                                seg,
                                                body_offset: base + start + body_rel,
                                                body_len: bytes.len() as u64,
                                                record_len,
                                                refs: 0,
                                            },
                                        });
                                        n += 1;
                                    }
                                }
                                Relocation::Lost { hash } => {
                                    let victims: Vec<(String, MessageId)> = index
                                        .mailboxes
                                        .iter()
                                        .flat_map(|(user, m)| {
                                            m.entries
                                                .values()
                                                .filter(|e| e.meta.body == hash)
                                                .map(|e| (user.clone(), e.meta.id))
                                        })
                                        .collect();
                                    for (user, id) in victims {
                                        if deleted.insert((user.clone(), id)) {
                                            // Not a deletion, so no tombstone (it would
                                            // spread to the other replicas): the entry
                                            // is forgotten here, and stays forgotten
                                            // after a restart because its body record
                                            // goes with this segment. Anti-entropy
                                            // brings a good copy back from a replica.
                                            error!(%user, %id, "message body corrupt on disk; copy removed here");
                                            effects.push(Effect::Forget { user, id });
                                        }
                                    }
                                }
                                Relocation::Tomb(rec) => {
                                    let still = index.tomb(&rec.user, &rec.id).is_some_and(|t| t.loc.seg == from)
                                        && !deleted.contains(&(rec.user.clone(), rec.id));
                                    if still {
                                        write_tomb(&mut buf, &mut effects, seg, rec);
                                        n += 1;
                                    }
                                }
                                Relocation::Entry(rec) => {
                                    let still = index.entry(&rec.user, &rec.id).is_some_and(|e| e.loc.seg == from)
                                        && !deleted.contains(&(rec.user.clone(), rec.id));
                                    if still {
                                        write_entry(&mut buf, &mut effects, seg, rec);
                                        n += 1;
                                    }
                                }
                            }
                        }
                        dones.push(Done::Relocate(reply, n));
                    }
                    Op::DropSegment { seg, reply } => drops.push((seg, reply)),
                }
            }
        }

        if !buf.is_empty() {
            self.batch_seq += 1;
            record::encode_commit(&mut buf, self.batch_seq);
            let file = self.shared.index().segments.get(&seg).expect("active").file.clone();
            let written = (|| -> std::io::Result<()> {
                (&*file).write_all(&buf)?;
                file.sync_data()
            })();
            if let Err(e) = written {
                // The tail may be half written: cut it back so that what
                // follows starts at a record boundary, then fail the batch.
                error!(error = %e, "segment write failed; batch refused");
                let _ = file.set_len(base).and_then(|_| file.sync_data());
                fail_dones(dones, &e.to_string());
                fail_drops(drops, &e.to_string());
                return;
            }
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        self.shared.ops.fetch_add(n_ops, Ordering::Relaxed);

        // Durable: now the index may show it.
        {
            let mut index = self.shared.index();
            index.segments.get_mut(&seg).expect("active").len = base + buf.len() as u64;
            // Deletions last: a body whose last reference this batch deletes
            // may be referenced again by a delivery in the same batch, which
            // wrote no new copy of it because it was live when planned.
            let mut deletes = Vec::new();
            let mut forgets = Vec::new();
            for effect in effects {
                match effect {
                    Effect::Body { hash, loc } => index.put_body(hash, loc),
                    Effect::Entry { rec, loc } => {
                        let user = rec.user.clone();
                        index.put_entry(&user, meta_of(rec), loc);
                    }
                    Effect::Tomb { rec, loc } => deletes.push((rec, loc)),
                    Effect::Forget { user, id } => forgets.push((user, id)),
                }
            }
            for (user, id) in forgets {
                index.remove_entry(&user, &id);
            }
            for (rec, loc) in deletes {
                index.remove_entry(&rec.user, &rec.id);
                let tomb = Tomb {
                    hlc: rec.hlc,
                    replicas: rec.replicas,
                    loc,
                    added_ms: now_ms(),
                };
                index.put_tomb(&rec.user, rec.id, tomb);
            }
            // A body written by this batch that no entry references (only
            // possible for relocation races) is dead: forget it.
            index.bodies.retain(|_, b| b.refs > 0);
        }
        for done in dones {
            match done {
                Done::Deliver(r) => drop(r.send(Ok(()))),
                Done::Delete(r, n) => drop(r.send(Ok(n))),
                Done::Relocate(r, n) => drop(r.send(Ok(n))),
            }
        }
        for (seg, reply) in drops {
            let _ = reply.send(self.drop_segment(seg).map_err(|e| e.to_string()));
        }
    }

    /// Removes a sealed segment that holds nothing live any more.
    fn drop_segment(&mut self, seg: u32) -> std::io::Result<bool> {
        if seg == self.active {
            return Ok(false);
        }
        {
            let mut index = self.shared.index();
            match index.segments.get(&seg) {
                Some(s) if s.live_bytes == 0 => {}
                Some(_) => return Ok(false),
                None => return Ok(true),
            }
            index.segments.remove(&seg);
        }
        fs::remove_file(seg_path(&self.shared.dir, seg))?;
        sync_dir(&self.shared.dir)?;
        Ok(true)
    }

    fn rotate(&mut self) -> Result<(), StoreError> {
        let mut index = self.shared.index();
        let next = self.active + 1;
        self.active = new_segment(&self.shared.dir, &mut index, next)?;
        Ok(())
    }
}

fn fail_all(batch: Vec<Op>, msg: &str) {
    for op in batch {
        match op {
            Op::Deliver { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
            Op::Delete { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
            Op::Relocate { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
            Op::DropSegment { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
        }
    }
}

fn fail_dones(dones: Vec<Done>, msg: &str) {
    for done in dones {
        match done {
            Done::Deliver(r) => drop(r.send(Err(msg.to_owned()))),
            Done::Delete(r, _) => drop(r.send(Err(msg.to_owned()))),
            Done::Relocate(r, _) => drop(r.send(Err(msg.to_owned()))),
        }
    }
}

fn fail_drops(drops: Vec<(u32, Reply<bool>)>, msg: &str) {
    for (_, r) in drops {
        let _ = r.send(Err(msg.to_owned()));
    }
}

fn mailbox_digest(m: &Mailbox, peer: u64) -> Option<[u8; 32]> {
    // Both maps are sorted by id; merge them so the digest follows id order.
    let live = m
        .entries
        .iter()
        .filter(|(_, e)| e.meta.replicas.contains(&peer))
        .map(|(id, _)| (*id, 0u8));
    let dead = m
        .tombstones
        .iter()
        .filter(|(_, t)| t.replicas.contains(&peer))
        .map(|(id, _)| (*id, 1u8));
    let mut all: Vec<(MessageId, u8)> = live.chain(dead).collect();
    if all.is_empty() {
        return None;
    }
    all.sort_unstable();
    let mut h = blake3::Hasher::new();
    for (id, state) in all {
        h.update(&id.0);
        h.update(&[state]);
    }
    Some(*h.finalize().as_bytes())
}
