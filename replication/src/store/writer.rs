//! The writer thread: takes operations from the bounded queue, writes a
//! batch, fsyncs once (group commit), then applies the effects to the
//! index and answers every caller.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::{mpsc, oneshot};
use tracing::error;

use super::*;
use crate::record::{self, DeleteRecord, EntryRecord};
use crate::{BodyHash, MessageId, SetChange, Tombstone};

pub(super) type Reply<T> = oneshot::Sender<Result<T, String>>;

pub(super) enum Op {
    Deliver {
        delivery: Delivery,
        hash: BodyHash,
        /// The replica set's version and earlier members (see
        /// `EntryRecord::placed`, `EntryRecord::prior`).
        placed: u64,
        prior: Vec<u64>,
        /// The copy's folder and flag versions (none for a new delivery).
        marks: crate::Marks,
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
    /// New replica sets for entries of `user` (see
    /// `FragmentStore::set_replicas`).
    Place {
        user: String,
        changes: Vec<SetChange>,
        me: u64,
        reply: Reply<Vec<Placed>>,
    },
    /// Folder and flag changes of entries of `user` (see
    /// `FragmentStore::mark`).
    Mark {
        user: String,
        changes: Vec<crate::MarkChange>,
        reply: Reply<usize>,
    },
}

impl Op {
    pub(super) fn bytes(&self) -> usize {
        match self {
            Op::Deliver { delivery, .. } => delivery.body.len(),
            Op::Relocate { items, .. } => items.iter().map(|r| r.bytes()).sum(),
            _ => 64,
        }
    }
}

pub(super) enum Relocation {
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
    pub(super) fn bytes(&self) -> usize {
        match self {
            Relocation::Body { bytes, .. } => bytes.len(),
            Relocation::Entry(_) | Relocation::Tomb(_) | Relocation::Lost { .. } => 128,
        }
    }
}

/// A file of `RESERVE_BYTES` kept in the store directory and given up
/// when the disk fills, so that the deletions that free space fit even
/// then (a tombstone needs room before the space it frees comes back).
const RESERVE_FILE: &str = "reserve";
const RESERVE_BYTES: u64 = 256 * 1024;

/// Makes the reserve if it is missing (and there is room for it);
/// whether it is there now.
pub(super) fn make_reserve(dir: &Path) -> bool {
    let path = dir.join(RESERVE_FILE);
    if path.exists() {
        return true;
    }
    let made = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|f| {
            rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, RESERVE_BYTES)
                .map_err(std::io::Error::from)?;
            f.sync_all()
        });
    if made.is_err() {
        let _ = fs::remove_file(&path);
        return false;
    }
    true
}

/// Gives the reserve up (the disk is full).
fn release_reserve(dir: &Path) {
    if fs::remove_file(dir.join(RESERVE_FILE)).is_ok() {
        tracing::warn!(
            bytes = RESERVE_BYTES,
            "disk full: released the store's reserve for deletions"
        );
    }
}

pub(super) fn new_segment(dir: &Path, index: &mut Index, seg: u32) -> Result<u32, StoreError> {
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
pub(super) enum Effect {
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

/// One record a batch will write (or, `Forget`, an effect without one), in
/// the order it is written.
pub(super) enum Piece {
    Body { hash: BodyHash, bytes: Vec<u8> },
    Entry(EntryRecord),
    Tomb(DeleteRecord),
    Forget { user: String, id: MessageId },
}

/// Appends an entry record to a batch and notes its effect.
pub(super) fn write_entry(buf: &mut Vec<u8>, effects: &mut Vec<Effect>, seg: u32, rec: EntryRecord) {
    let start = buf.len();
    record::encode_entry(buf, &rec);
    let record_len = (buf.len() - start) as u64;
    effects.push(Effect::Entry {
        rec,
        loc: Loc { seg, record_len },
    });
}

/// Appends a tombstone record to a batch and notes its effect.
pub(super) fn write_tomb(buf: &mut Vec<u8>, effects: &mut Vec<Effect>, seg: u32, rec: DeleteRecord) {
    let start = buf.len();
    record::encode_delete(buf, &rec);
    let record_len = (buf.len() - start) as u64;
    effects.push(Effect::Tomb {
        rec,
        loc: Loc { seg, record_len },
    });
}

pub(super) enum Done {
    Deliver(Reply<()>),
    Delete(Reply<usize>, usize),
    Relocate(Reply<u64>, u64),
    Place(Reply<Vec<Placed>>, Vec<Placed>),
    Mark(Reply<usize>, usize),
}

pub(super) struct Writer {
    pub(super) shared: Arc<Shared>,
    pub(super) active: u32,
    pub(super) segment_bytes_max: u64,
    /// Numbers the commit records (for reading a segment by eye).
    pub(super) batch_seq: u64,
    /// A write found the disk full: dead bodies are given back in place
    /// after every batch that deletes, until a delivery fits again.
    pub(super) space_short: bool,
    /// Operations a batch put off to the next one: a change of an entry
    /// another operation of the batch already changes (one change per
    /// entry and batch).
    pub(super) carry: Vec<Op>,
}

impl Writer {
    pub(super) fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        loop {
            let mut batch = std::mem::take(&mut self.carry);
            if batch.is_empty() {
                match rx.blocking_recv() {
                    Some(first) => batch.push(first),
                    None => break,
                }
            }
            if let Some(why) = self.shared.failed.get() {
                let why = format!("store stopped taking writes: {why}");
                fail_all(batch, &why);
                continue;
            }
            let mut bytes: usize = batch.iter().map(Op::bytes).sum();
            while batch.len() < BATCH_OPS_MAX && bytes < BATCH_BYTES_MAX {
                match rx.try_recv() {
                    Ok(op) => {
                        bytes += op.bytes();
                        batch.push(op);
                    }
                    Err(_) => break,
                }
            }
            // A panic here (a bug) must not leave sessions waiting: their
            // replies drop with the batch, and every later write is refused.
            let batch = self.refuse_deliveries_while_full(batch);
            if batch.is_empty() {
                continue;
            }
            let shared = self.shared.clone();
            let commit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.commit(batch)));
            if commit.is_err() {
                shared.fail("the store writer panicked".to_owned());
            }
        }
    }

    pub(super) fn commit(&mut self, batch: Vec<Op>) {
        let n_ops = batch.len() as u64;
        let mut buf = Vec::new();
        // What the batch writes, decided under the index lock; encoded
        // (bodies copied, records checksummed) after it is released.
        let mut pieces: Vec<Piece> = Vec::new();
        let mut effects = Vec::new();
        let mut dones = Vec::with_capacity(batch.len());
        let mut drops = Vec::new();
        let mut delivered = false;
        let rotate;
        {
            let index = self.shared.index();
            let active = index.segments.get(&self.active).expect("active segment");
            rotate = active.len >= self.segment_bytes_max;
        }
        if rotate && let Err(e) = self.rotate() {
            error!(error = %e, "cannot start a new segment");
            let full = matches!(&e, StoreError::Io(io) if matches!(io.raw_os_error(), Some(28 | 122)));
            if !full {
                self.shared.fail(format!("starting a new segment failed: {e}"));
            }
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
            // Entries this batch marks (a later Place of one waits for the
            // next batch, and a later Mark merges into the same record).
            let mut marked: HashSet<(String, MessageId)> = HashSet::new();
            let mut carry: Vec<Op> = Vec::new();
            for op in batch {
                match op {
                    Op::Deliver {
                        delivery,
                        hash,
                        placed,
                        prior,
                        marks,
                        reply,
                    } => {
                        delivered = true;
                        let size = delivery.body.len() as u64;
                        let live = index.bodies.get(&hash).is_some_and(|b| b.refs > 0);
                        let mut delivery = delivery;
                        if !live && new_bodies.insert(hash) {
                            pieces.push(Piece::Body {
                                hash,
                                bytes: std::mem::take(&mut delivery.body),
                            });
                        }
                        for user in delivery.users {
                            // Delivering the same id again is a no-op
                            // (idempotent); a deleted id stays deleted.
                            let key = (user.clone(), delivery.id);
                            // A move marker refuses only copies of sets as
                            // old as the one it was dropped for.
                            let refused = index
                                .tomb(&user, &delivery.id)
                                .is_some_and(|t| t.moved.as_ref().is_none_or(|(_, v)| placed <= *v));
                            if index.entry(&user, &delivery.id).is_some()
                                || refused
                                || deleted.contains(&key)
                                || !new_entries.insert(key)
                            {
                                continue;
                            }
                            let rec = EntryRecord {
                                user,
                                id: delivery.id,
                                body: hash,
                                size_bytes: size,
                                arrival_ms: delivery.arrival_ms,
                                folder: delivery.folder.clone(),
                                flags: 0,
                                replicas: delivery.replicas.clone(),
                                placed,
                                prior: prior.clone(),
                                marks: marks.clone(),
                            };
                            pieces.push(Piece::Entry(rec));
                        }
                        dones.push(Done::Deliver(reply));
                    }
                    Op::Delete { user, tombs, reply } => {
                        let mut n = 0;
                        for t in tombs {
                            let key = (user.clone(), t.id);
                            // A deletion replaces a move marker.
                            if index.tomb(&user, &t.id).is_some_and(Tomb::is_deletion) || !deleted.insert(key.clone()) {
                                continue;
                            }
                            let entry = index.entry(&user, &t.id);
                            // Sent to the earlier members too: one may still
                            // hold a copy of an older set.
                            let replicas = match (entry, index.tomb(&user, &t.id)) {
                                (Some(e), _) => e.meta.everyone(),
                                // Over a move marker: to the nodes it names
                                // too (the new set among them).
                                (None, Some(marker)) => {
                                    let mut all: Vec<u64> =
                                        marker.replicas.iter().chain(&t.replicas).copied().collect();
                                    all.sort_unstable();
                                    all.dedup();
                                    all
                                }
                                (None, None) => t.replicas,
                            };
                            if entry.is_some() || new_entries.contains(&key) {
                                n += 1;
                            }
                            let rec = DeleteRecord {
                                user: user.clone(),
                                id: t.id,
                                hlc: t.hlc,
                                replicas,
                                moved: None,
                            };
                            pieces.push(Piece::Tomb(rec));
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
                                        pieces.push(Piece::Body { hash, bytes });
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
                                            pieces.push(Piece::Forget { user, id });
                                        }
                                    }
                                }
                                Relocation::Tomb(rec) => {
                                    let still = index.tomb(&rec.user, &rec.id).is_some_and(|t| t.loc.seg == from)
                                        && !deleted.contains(&(rec.user.clone(), rec.id));
                                    if still {
                                        pieces.push(Piece::Tomb(rec));
                                        n += 1;
                                    }
                                }
                                Relocation::Entry(rec) => {
                                    let still = index.entry(&rec.user, &rec.id).is_some_and(|e| e.loc.seg == from)
                                        && !deleted.contains(&(rec.user.clone(), rec.id));
                                    if still {
                                        pieces.push(Piece::Entry(rec));
                                        n += 1;
                                    }
                                }
                            }
                        }
                        dones.push(Done::Relocate(reply, n));
                    }
                    Op::DropSegment { seg, reply } => drops.push((seg, reply)),
                    Op::Place {
                        user,
                        changes,
                        me,
                        reply,
                    } if changes.iter().any(|c| marked.contains(&(user.clone(), c.id))) => {
                        carry.push(Op::Place {
                            user,
                            changes,
                            me,
                            reply,
                        });
                    }
                    Op::Mark { user, changes, reply }
                        if changes.iter().any(|c| {
                            let key = (user.clone(), c.id);
                            new_entries.contains(&key) && !marked.contains(&key)
                        }) =>
                    {
                        carry.push(Op::Mark { user, changes, reply });
                    }
                    Op::Mark { user, changes, reply } => {
                        let mut n = 0;
                        for c in changes {
                            let key = (user.clone(), c.id);
                            if deleted.contains(&key) {
                                continue;
                            }
                            if marked.contains(&key) {
                                // Marked twice in this batch: merged into
                                // the record the first one wrote.
                                let Some(Piece::Entry(rec)) = pieces
                                    .iter_mut()
                                    .rev()
                                    .find(|p| matches!(p, Piece::Entry(r) if r.id == c.id && r.user == user))
                                else {
                                    continue;
                                };
                                let mut meta = meta_of(rec.clone());
                                if meta.apply_marks(&c) {
                                    *rec = record_of(&user, &meta);
                                    n += 1;
                                }
                                continue;
                            }
                            // Not held: nothing to mark (a copy made later
                            // gets the marks of the copy it is made from,
                            // and anti-entropy merges the rest).
                            let Some(e) = index.entry(&user, &c.id) else {
                                continue;
                            };
                            let mut meta = e.meta.clone();
                            if meta.apply_marks(&c) {
                                marked.insert(key.clone());
                                new_entries.insert(key);
                                pieces.push(Piece::Entry(record_of(&user, &meta)));
                                n += 1;
                            }
                        }
                        dones.push(Done::Mark(reply, n));
                    }
                    Op::Place {
                        user,
                        changes,
                        me,
                        reply,
                    } => {
                        let mut out = Vec::with_capacity(changes.len());
                        for change in changes {
                            let SetChange {
                                id,
                                replicas,
                                prior,
                                placed,
                            } = change;
                            let key = (user.clone(), id);
                            let tomb = index.tomb(&user, &id);
                            if let Some(t) = tomb.filter(|t| t.is_deletion()) {
                                out.push(Placed::Deleted(Tombstone {
                                    id,
                                    hlc: t.hlc,
                                    replicas: t.replicas.clone(),
                                }));
                                continue;
                            }
                            // A move marker naming the set and its earlier
                            // members, this node among them.
                            let marker = |old: &[u64]| {
                                let mut all: Vec<u64> = replicas.iter().chain(&prior).chain(old).copied().collect();
                                all.push(me);
                                all.sort_unstable();
                                all.dedup();
                                DeleteRecord {
                                    user: user.clone(),
                                    id,
                                    hlc: placed,
                                    replicas: all,
                                    moved: Some((replicas.clone(), placed)),
                                }
                            };
                            // Decided against the index as it was before
                            // this batch: one change per entry and batch.
                            let entry = index.entry(&user, &id);
                            let fresh = !deleted.contains(&key) && new_entries.insert(key.clone());
                            if !fresh {
                                out.push(Placed::Absent);
                                continue;
                            }
                            let Some(e) = entry else {
                                // Not held: a marker if this node is among
                                // the earlier members (so that it refuses a
                                // copy of an older set and agrees with the
                                // holders in anti-entropy); a member of the
                                // new set fetches its copy instead.
                                let older = tomb.is_none_or(|t| t.moved.as_ref().is_some_and(|(_, v)| *v < placed));
                                if !replicas.contains(&me) && prior.contains(&me) && older {
                                    deleted.insert(key.clone());
                                    pieces.push(Piece::Tomb(marker(&[])));
                                }
                                out.push(Placed::Absent);
                                continue;
                            };
                            if e.meta.placed >= placed {
                                out.push(Placed::Kept { placed: e.meta.placed });
                            } else if replicas.contains(&me) {
                                let mut meta = e.meta.clone();
                                meta.replicas = replicas;
                                meta.prior = prior;
                                meta.placed = placed;
                                pieces.push(Piece::Entry(record_of(&user, &meta)));
                                out.push(Placed::Updated);
                            } else {
                                // Dropped here, with a marker naming the new set.
                                deleted.insert(key.clone());
                                pieces.push(Piece::Tomb(marker(&e.meta.replicas)));
                                out.push(Placed::Dropped);
                            }
                        }
                        dones.push(Done::Place(reply, out));
                    }
                }
            }
            self.carry = carry;
        }

        // Encoding needs no index: readers (listings, status) go on meanwhile.
        for piece in pieces {
            match piece {
                Piece::Body { hash, bytes } => {
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
                }
                Piece::Entry(rec) => write_entry(&mut buf, &mut effects, seg, rec),
                Piece::Tomb(rec) => write_tomb(&mut buf, &mut effects, seg, rec),
                Piece::Forget { user, id } => effects.push(Effect::Forget { user, id }),
            }
        }

        if !buf.is_empty() {
            self.batch_seq += 1;
            record::encode_commit(&mut buf, self.batch_seq);
            let file = self.shared.index().segments.get(&seg).expect("active").file.clone();
            let written = (&*file).write_all(&buf).map_err(|e| (e, false)).and_then(|()| {
                if self.shared.fail_next_sync.swap(false, Ordering::SeqCst) {
                    return Err((std::io::Error::other("injected fsync failure"), true));
                }
                file.sync_data().map_err(|e| (e, true))
            });
            if let Err((e, in_sync)) = written {
                // The tail may be half written: cut it back so that what
                // follows starts at a record boundary, then fail the batch.
                // A full disk at write time is the one error taken again
                // later (the cleaner frees space); a failed fsync or any
                // other i/o error stops the store for good.
                let full = !in_sync && matches!(e.raw_os_error(), Some(28 | 122)); // ENOSPC, EDQUOT
                error!(error = %e, in_sync, "segment write failed; batch refused");
                let _ = file.set_len(base);
                if full {
                    let _ = file.sync_data();
                    self.space_short = true;
                    self.shared.disk_full.store(true, Ordering::Relaxed);
                    // Room for the deletions that will free space.
                    release_reserve(&self.shared.dir);
                    self.reclaim();
                } else {
                    self.shared.fail(format!(
                        "{} failed: {e}",
                        if in_sync { "fsync" } else { "segment write" }
                    ));
                }
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
            let mut written = Vec::new();
            for effect in effects {
                match effect {
                    Effect::Body { hash, loc } => {
                        index.put_body(hash, loc);
                        written.push(hash);
                    }
                    Effect::Entry { rec, loc } => {
                        let (user, id) = (rec.user.clone(), rec.id);
                        index.put_entry(&user, meta_of(rec), loc);
                        // A copy of a newer set replaces a move marker.
                        if index.tomb(&user, &id).is_some_and(|t| !t.is_deletion()) {
                            index.remove_tomb(&user, &id);
                        }
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
                    moved: rec.moved,
                };
                index.put_tomb(&rec.user, rec.id, tomb);
            }
            // A body written by this batch that no entry references (only
            // possible for relocation races) is dead: forget it. Only this
            // batch's bodies can be unreferenced here (every batch ends
            // so), so there is no need to walk the whole body table, which
            // made each commit cost O(bodies stored).
            for hash in written {
                if index.bodies.get(&hash).is_some_and(|b| b.refs == 0) {
                    index.bodies.remove(&hash);
                }
            }
        }
        for done in dones {
            match done {
                Done::Deliver(r) => drop(r.send(Ok(()))),
                Done::Delete(r, n) => drop(r.send(Ok(n))),
                Done::Relocate(r, n) => drop(r.send(Ok(n))),
                Done::Place(r, out) => drop(r.send(Ok(out))),
                Done::Mark(r, n) => drop(r.send(Ok(n))),
            }
        }
        for (seg, reply) in drops {
            let _ = reply.send(self.drop_segment(seg).map_err(|e| e.to_string()));
        }
        if self.space_short && !delivered {
            self.reclaim();
        }
    }

    /// While the disk is full, deliveries are refused up front (the room
    /// left, the reserve included, is for the deletions that free space)
    /// until the reserve can be made again: then there is room beyond it.
    fn refuse_deliveries_while_full(&mut self, batch: Vec<Op>) -> Vec<Op> {
        if !self.space_short {
            return batch;
        }
        // Room again: enough for the reserve and as much again beyond it
        // (the reserve just released would otherwise be taken back at once).
        let free = rustix::fs::statvfs(&self.shared.dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(0);
        if free >= 3 * RESERVE_BYTES && make_reserve(&self.shared.dir) {
            self.space_short = false;
            self.shared.disk_full.store(false, Ordering::Relaxed);
            tracing::info!(free_bytes = free, "the store has room again; taking mail");
            return batch;
        }
        let (deliveries, rest): (Vec<Op>, Vec<Op>) = batch.into_iter().partition(|op| matches!(op, Op::Deliver { .. }));
        fail_all(
            deliveries,
            "No space left on device: the store takes deletions only until space is freed",
        );
        rest
    }

    /// Gives the space of dead body records back to the file system in
    /// place: the record's bytes are zeroed (whole blocks punched out with
    /// fallocate, the edges written), then fdatasync. Only dead bodies
    /// (no entry refers to them; their tombstones are durable), and only
    /// when the disk is full: copying live records elsewhere, as the
    /// cleaner does, needs free space a full disk does not have, and a
    /// store with a single segment has nothing sealed to clean at all.
    /// Recovery skips zeroed records. Returns the bytes given back.
    pub(super) fn reclaim(&mut self) -> u64 {
        use std::os::unix::fs::FileExt;
        let dead = std::mem::take(&mut self.shared.index().dead_bodies);
        if dead.is_empty() {
            return 0;
        }
        let mut by_seg: std::collections::BTreeMap<u32, Vec<(u64, u64)>> = Default::default();
        for (seg, start, len) in dead {
            by_seg.entry(seg).or_default().push((start, len));
        }
        let mut freed = 0;
        for (seg, ranges) in by_seg {
            if !self.shared.index().segments.contains_key(&seg) {
                continue; // Cleaned away meanwhile.
            }
            // Not the append handle: pwrite on an O_APPEND file appends.
            let file = match OpenOptions::new().write(true).open(seg_path(&self.shared.dir, seg)) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(segment = seg, error = %e, "cannot open a segment to reclaim space");
                    continue;
                }
            };
            const BLOCK: u64 = 4096;
            for (start, len) in ranges {
                let end = start + len;
                let (a, b) = (start.div_ceil(BLOCK) * BLOCK, end / BLOCK * BLOCK);
                let zero = |from: u64, to: u64| -> std::io::Result<()> {
                    if to > from {
                        file.write_all_at(&vec![0u8; (to - from) as usize], from)?;
                    }
                    Ok(())
                };
                let done = if a < b {
                    zero(start, a)
                        .and_then(|()| zero(b, end))
                        .and_then(|()| {
                            rustix::fs::fallocate(
                                &file,
                                rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                                a,
                                b - a,
                            )
                            .map_err(std::io::Error::from)
                        })
                        .map(|()| b - a)
                } else {
                    zero(start, end).map(|()| 0)
                };
                match done {
                    Ok(n) => freed += n,
                    Err(e) => {
                        tracing::warn!(segment = seg, error = %e, "cannot reclaim a dead body's space");
                        break;
                    }
                }
            }
            // Only these zeros are unsynced here (live data was synced before
            // it was acknowledged), so a failure here loses nothing.
            if let Err(e) = file.sync_data() {
                tracing::warn!(segment = seg, error = %e, "fdatasync after reclaiming failed");
            }
        }
        if freed > 0 {
            tracing::info!(freed_bytes = freed, "disk full: gave dead bodies' space back in place");
        }
        freed
    }

    /// Removes a sealed segment that holds nothing live any more.
    pub(super) fn drop_segment(&mut self, seg: u32) -> std::io::Result<bool> {
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

    pub(super) fn rotate(&mut self) -> Result<(), StoreError> {
        let mut index = self.shared.index();
        let next = self.active + 1;
        self.active = new_segment(&self.shared.dir, &mut index, next)?;
        Ok(())
    }
}

pub(super) fn fail_all(batch: Vec<Op>, msg: &str) {
    for op in batch {
        match op {
            Op::Deliver { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
            Op::Delete { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
            Op::Relocate { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
            Op::DropSegment { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
            Op::Place { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
            Op::Mark { reply, .. } => drop(reply.send(Err(msg.to_owned()))),
        }
    }
}

pub(super) fn fail_dones(dones: Vec<Done>, msg: &str) {
    for done in dones {
        match done {
            Done::Deliver(r) => drop(r.send(Err(msg.to_owned()))),
            Done::Delete(r, _) => drop(r.send(Err(msg.to_owned()))),
            Done::Relocate(r, _) => drop(r.send(Err(msg.to_owned()))),
            Done::Place(r, _) => drop(r.send(Err(msg.to_owned()))),
            Done::Mark(r, _) => drop(r.send(Err(msg.to_owned()))),
        }
    }
}

pub(super) fn fail_drops(drops: Vec<(u32, Reply<bool>)>, msg: &str) {
    for (_, r) in drops {
        let _ = r.send(Err(msg.to_owned()));
    }
}
