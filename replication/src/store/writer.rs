//! The writer thread: takes operations from the bounded queue, writes a
//! batch, fsyncs once (group commit), then applies the effects to the
//! index and answers every caller.

use std::os::unix::fs::FileExt;
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
        copy: CopyOf,
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

/// What a copy of another node's entry carries beyond a delivery (all
/// zero and empty for a new delivery).
#[derive(Debug, Default)]
pub(super) struct CopyOf {
    /// The replica set's version and earlier members (see
    /// `EntryMeta::placed`, `EntryMeta::prior`).
    pub(super) placed: u64,
    pub(super) prior: Vec<u64>,
    /// The copy's folder and flag versions.
    pub(super) marks: crate::Marks,
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

/// Appends one record to a batch (`encode` writes it) and says where it
/// is: in segment `seg`, and how long.
fn record_at(buf: &mut Vec<u8>, seg: u32, encode: impl FnOnce(&mut Vec<u8>)) -> Loc {
    let start = buf.len();
    encode(buf);
    Loc {
        seg,
        record_len: (buf.len() - start) as u64,
    }
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
    /// The active segment's file holds zeros from its end up to here (see
    /// [`Writer::zero_ahead`]).
    pub(super) zeroed_to: u64,
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
        // Closed: the zeros ahead of the end go, so that a store closed
        // cleanly holds its records and nothing else.
        let index = self.shared.index();
        if let Some(active) = index.segments.get(&self.active)
            && self.zeroed_to > active.len
        {
            let _ = active.file.set_len(active.len);
        }
    }

    /// One batch, in its steps: room in the active segment; what it
    /// writes, decided under the index lock ([`Plan::decide`]); the records
    /// encoded without the lock; written with one `write` and made durable
    /// with one `fdatasync`; only then applied to the index; and every
    /// caller answered.
    pub(super) fn commit(&mut self, batch: Vec<Op>) {
        let n_ops = batch.len() as u64;
        let Some(batch) = self.room_for(batch) else {
            return;
        };
        let seg = self.active;
        let base = self.shared.index().segments.get(&seg).expect("active").len;
        let plan = Plan::decide(&self.shared.index(), batch);
        let Plan {
            pieces,
            dones,
            drops,
            carry,
            delivered,
            ..
        } = plan;
        self.carry = carry;
        // Encoding needs no index: readers (listings, status) go on meanwhile.
        let hashed = self.shared.hashed_bodies.load(Ordering::Relaxed);
        let (mut buf, effects) = encode(pieces, seg, base, hashed);
        if !buf.is_empty() {
            // A commit record ends the batch (numbered, for reading a
            // segment by eye).
            self.batch_seq += 1;
            record::encode_commit(&mut buf, self.batch_seq);
        }
        if let Err(why) = self.write_durably(seg, base, buf.as_slice()) {
            fail_dones(dones, &why);
            fail_drops(drops, &why);
            return;
        }
        self.shared.ops.fetch_add(n_ops, Ordering::Relaxed);
        self.apply(seg, base + buf.len() as u64, effects);
        // A full or nearly full disk gets deleted mail's space back with
        // the deletions (before they are answered), not when a delivery
        // next fails for want of it.
        if !delivered {
            self.reclaim();
        }
        answer(dones);
        for (seg, reply) in drops {
            let _ = reply.send(self.drop_segment(seg).map_err(|e| e.to_string()));
        }
    }

    /// Starts a new segment when the active one is full; the batch back,
    /// or `None` when it was failed (no segment could be made).
    fn room_for(&mut self, batch: Vec<Op>) -> Option<Vec<Op>> {
        let full = {
            let index = self.shared.index();
            index.segments.get(&self.active).expect("active segment").len >= self.segment_bytes_max
        };
        if !full {
            return Some(batch);
        }
        if let Err(e) = self.rotate() {
            error!(error = %e, "cannot start a new segment");
            let disk_full = matches!(&e, StoreError::Io(io) if matches!(io.raw_os_error(), Some(28 | 122)));
            if !disk_full {
                self.shared.fail(format!("starting a new segment failed: {e}"));
            }
            fail_all(batch, &e.to_string());
            return None;
        }
        Some(batch)
    }

    /// Writes the batch's records with one `write` and one `fdatasync`;
    /// `Err` with why when that failed (the batch is then refused). The
    /// tail may be half written: it is cut back so that what follows
    /// starts at a record boundary. A full disk at write time is the one
    /// error taken again later (the cleaner frees space); a failed fsync
    /// or any other i/o error stops the store for good.
    fn write_durably(&mut self, seg: u32, base: u64, buf: &[u8]) -> Result<(), String> {
        if buf.is_empty() {
            return Ok(());
        }
        let file = self.shared.index().segments.get(&seg).expect("active").file.clone();
        let end = base + buf.len() as u64;
        let written = file.write_all_at(buf, base).map_err(|e| (e, false)).and_then(|()| {
            self.zero_ahead(&file, end);
            if self.shared.fail_next_sync.swap(false, Ordering::SeqCst) {
                return Err((std::io::Error::other("injected fsync failure"), true));
            }
            file.sync_data().map_err(|e| (e, true))
        });
        let Err((e, in_sync)) = written else {
            self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let full = !in_sync && matches!(e.raw_os_error(), Some(28 | 122)); // ENOSPC, EDQUOT
        error!(error = %e, in_sync, "segment write failed; batch refused");
        // Whatever this batch wrote goes, the zeros ahead of it too: no
        // record that was not acknowledged may be found at the next start.
        let _ = file.set_len(base);
        self.zeroed_to = base;
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
        Err(e.to_string())
    }

    /// Keeps zeros written ahead of the active segment's end (up to
    /// `ZERO_AHEAD_BYTES`), so that a batch overwrites blocks the file
    /// already has: its `fdatasync` then writes the data alone, not the
    /// file's size and block map as well (on this project's ext4 that
    /// halves the CPU of a sync and nearly doubles the syncs per second;
    /// databases preallocate their logs for the same reason). The zeros
    /// become durable with the batch's sync. Recovery reads a zero run at
    /// the end of a segment as the torn tail it would be anyway and cuts
    /// it, as every earlier release does. Nothing is zeroed while the disk
    /// is short of room; a zero write that fails is taken back and left
    /// for the next batch.
    fn zero_ahead(&mut self, file: &std::fs::File, end: u64) {
        let chunk = ZERO_AHEAD_BYTES.min(self.segment_bytes_max);
        if self.space_short || self.zeroed_to >= end + chunk / 4 {
            return;
        }
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let from = self.zeroed_to.max(end);
        let to = (end + chunk).next_multiple_of(4096);
        let mut at = from;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64);
            if let Err(e) = file.write_all_at(&ZEROS[..n as usize], at) {
                tracing::debug!(error = %e, "zeros ahead of the segment's end not written");
                let _ = file.set_len(from);
                self.zeroed_to = from;
                return;
            }
            at += n;
        }
        self.zeroed_to = to;
    }

    /// Durable: now the index may show it. `end` is the active segment's
    /// new length.
    fn apply(&mut self, seg: u32, end: u64, effects: Vec<Effect>) {
        let records = effects
            .iter()
            .filter(|e| matches!(e, Effect::Entry { .. } | Effect::Tomb { .. }))
            .count();
        self.shared.records.fetch_add(records as u64, Ordering::Relaxed);
        let mut index = self.shared.index();
        index.segments.get_mut(&seg).expect("active").len = end;
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
                    let (user, id) = (rec.user, rec.meta.id);
                    index.put_entry(&user, rec.meta, loc);
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
        // batch's bodies can be unreferenced here (every batch ends so),
        // so there is no need to walk the whole body table, which made
        // each commit cost O(bodies stored).
        for hash in written {
            if index.bodies.get(&hash).is_some_and(|b| b.refs == 0) {
                index.bodies.remove(&hash);
            }
        }
    }
}

/// The batch's records as bytes, starting at `base` in segment `seg`,
/// and what each does to the index once durable.
fn encode(pieces: Vec<Piece>, seg: u32, base: u64, hashed_bodies: bool) -> (Vec<u8>, Vec<Effect>) {
    let mut buf = Vec::new();
    let mut effects = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match piece {
            Piece::Body { hash, bytes } => {
                let start = buf.len() as u64;
                let body_rel = record::encode_body(&mut buf, &hash, &bytes, hashed_bodies);
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
            Piece::Entry(rec) => {
                let loc = record_at(&mut buf, seg, |b| record::encode_entry(b, &rec));
                effects.push(Effect::Entry { rec, loc });
            }
            Piece::Tomb(rec) => {
                let loc = record_at(&mut buf, seg, |b| record::encode_delete(b, &rec));
                effects.push(Effect::Tomb { rec, loc });
            }
            Piece::Forget { user, id } => effects.push(Effect::Forget { user, id }),
        }
    }
    (buf, effects)
}

/// Every caller of a durable batch gets its answer.
fn answer(dones: Vec<Done>) {
    for done in dones {
        match done {
            Done::Deliver(r) => drop(r.send(Ok(()))),
            Done::Delete(r, n) => drop(r.send(Ok(n))),
            Done::Relocate(r, n) => drop(r.send(Ok(n))),
            Done::Place(r, out) => drop(r.send(Ok(out))),
            Done::Mark(r, n) => drop(r.send(Ok(n))),
        }
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
