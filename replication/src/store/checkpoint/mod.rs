//! Checkpoints of the index: what a start loads instead of reading every
//! segment, so that a restart costs what was written since the last
//! checkpoint, not what is stored.
//!
//! A checkpoint is written on a thread of its own while deliveries go on
//! (the index lock taken for [`CHUNK`] entries at a time, as the other
//! whole-index walks do), so it is fuzzy: it begins at a position P (the
//! active segment and its length at that moment, always the end of a
//! committed batch) and shows each mailbox as it was at some moment after
//! P. A start loads it and replays every record from P on: the rest of
//! P's segment and every later one. Each message then ends as its latest
//! record says, as in a full rebuild: an entry's or a tombstone's state is
//! that of the latest record about it, so replaying a record whose effect
//! the checkpoint already shows changes nothing. Where the replay holds a
//! record of a message, the checkpoint's view of it is not used at all.
//!
//! The log cleaner drops segments, the oldest first, after copying their
//! live records forward into the active segment. What the checkpoint
//! places in a segment that is gone was therefore dead when that segment
//! was cleaned (a live one was copied to a later segment, which the replay
//! reads, and the copy wins), so it is left out: a deleted message whose
//! tombstone expired before its segment was cleaned cannot come back.
//!
//! A checkpoint is not used, and the index is rebuilt from every segment
//! as without one (with a warning), when it is torn, damaged, of a format
//! this release does not read, or does not fit the segments found: a
//! sealed segment before P of another length than it recorded, a segment
//! before P it did not know, P's segment shorter than P, or no segment
//! from P's on. Every block is checked before it is decoded, so a damaged
//! one is never applied.
//!
//! Layout of `index.qckp`: magic `QCKP`, format `1` (u32le); then blocks,
//! each a kind byte, a length (u32le), that many bytes of bincode, and
//! blake3 over the previous block's hash (the first: over the magic and
//! format), the kind, the length and the bytes. Kinds: 1 the head (P and
//! the sealed segments' lengths, how many entries the index held), 2 a run of one mailbox's entries (the
//! entry, its record's place, its body's place), 3 a run of one mailbox's
//! tombstones, 4 the end (how many entries and tombstones), after which
//! the file ends. Written to `index.qckp.PID.N.tmp`, fsynced, renamed over
//! the last one, the directory fsynced: a kill at any moment leaves the
//! last whole checkpoint. Releases before this one leave the file alone.

mod read;
mod write;

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::index::Shared;
use crate::{EntryMeta, MessageId};

pub(super) use read::{Reader, load};
pub(super) use write::{spawn, stop, write};

const MAGIC: &[u8; 4] = b"QCKP";
const FORMAT: u32 = 1;
const FILE_NAME: &str = "index.qckp";
/// Entries (or tombstones) per lock hold and at most per block (tests
/// take fewer: [`StoreConfig::checkpoint_chunk`]).
pub(super) const CHUNK: usize = 4096;
/// The longest block a reader takes (a run of [`CHUNK`] entries of the
/// longest names is well under it).
const BLOCK_BYTES_MAX: u32 = 256 << 20;
/// A checkpoint is considered when a segment is sealed (and at open): see
/// [`due`].
pub(super) const EVERY_SEGMENTS: u32 = 1;
/// Records written between checkpoints at least (a small store's
/// checkpoints would otherwise follow each other) ...
pub(super) const RECORDS_MIN: u64 = 50_000;
/// ... and at most (a start replays at most this many, about 2 s).
const RECORDS_MAX: u64 = 1_000_000;

const HEAD: u8 = 1;
const ENTRIES: u8 = 2;
const TOMBS: u8 = 3;
const END: u8 = 4;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ BLOCK_BYTES_MAX as usize }>()
}

pub(super) fn path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Where a checkpoint's replay begins, and the segments it knew.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Head {
    /// The active segment when the checkpoint began, and its length.
    pub(super) seg: u32,
    pub(super) len: u64,
    /// Every other segment then, with its length.
    pub(super) sealed: Vec<(u32, u64)>,
    /// Entries in the index then: what a start reserves room for.
    pub(super) entries: u64,
}

/// A body's place, as [`super::index::BodyLoc`] without its count.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) struct Place {
    pub(super) seg: u32,
    pub(super) body_offset: u64,
    pub(super) body_len: u64,
    pub(super) record_len: u64,
}

/// One entry as written (borrowed from the index) ...
#[derive(Serialize)]
struct EntryOut<'a> {
    meta: &'a EntryMeta,
    seg: u32,
    record_len: u64,
    body: Place,
}

/// ... and as read.
#[derive(Deserialize)]
pub(super) struct EntryIn {
    pub(super) meta: EntryMeta,
    pub(super) seg: u32,
    pub(super) record_len: u64,
    pub(super) body: Place,
}

#[derive(Serialize)]
struct TombOut<'a> {
    id: MessageId,
    hlc: u64,
    replicas: &'a [u64],
    moved: &'a Option<(Vec<u64>, u64)>,
    seg: u32,
    record_len: u64,
}

#[derive(Deserialize)]
pub(super) struct TombIn {
    pub(super) id: MessageId,
    pub(super) hlc: u64,
    pub(super) replicas: Vec<u64>,
    pub(super) moved: Option<(Vec<u64>, u64)>,
    pub(super) seg: u32,
    pub(super) record_len: u64,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct End {
    entries: u64,
    tombs: u64,
}

/// What a checkpoint written holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointReport {
    /// The segment whose rest (and every later one) a start replays.
    pub segment: u32,
    pub entries: u64,
    pub tombstones: u64,
    pub bytes: u64,
}
fn first_hash() -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(MAGIC);
    h.update(&FORMAT.to_le_bytes());
    *h.finalize().as_bytes()
}

fn chain(prev: &[u8; 32], kind: u8, payload: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(prev);
    h.update(&[kind]);
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    *h.finalize().as_bytes()
}

/// Whether a checkpoint is due, `sealed` segments after the last one
/// began, for an index of `entries`: at least
/// [`crate::StoreConfig::checkpoint_every`] segments apart (never at 0),
/// and once the records written since are a quarter of the entries (at
/// least `checkpoint_records_min`, at most [`RECORDS_MAX`]). A checkpoint
/// costs 0.7–2.2 µs an entry (BENCHMARKS); taken every `entries / 4`
/// records it costs each record about four times that, and a start
/// replays at most that many records.
pub(super) fn due(shared: &Shared, sealed: u64, entries: u64) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    let every = shared.checkpoint_every;
    let since = shared
        .records
        .load(Relaxed)
        .saturating_sub(shared.checkpoint_records.load(Relaxed));
    let least = shared.checkpoint_records_min;
    every > 0 && sealed >= u64::from(every) && since >= (entries / 4).clamp(least, RECORDS_MAX.max(least))
}

/// Removes checkpoints left half written by a process that ended.
pub(super) fn remove_temporaries(dir: &Path) {
    let Ok(read) = fs::read_dir(dir) else { return };
    for e in read.filter_map(|e| e.ok()) {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(FILE_NAME) && name.ends_with(".tmp") {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Whether the checkpoint `head` fits the segments found (`lens`: every
/// segment's id and length, sorted): `Err` with why not.
pub(super) fn fits(head: &Head, lens: &[(u32, u64)]) -> Result<(), String> {
    if !lens.iter().any(|(s, _)| *s >= head.seg) {
        return Err(format!("no segment from its segment {} on", head.seg));
    }
    for (seg, len) in lens.iter().filter(|(s, _)| *s < head.seg) {
        match head.sealed.iter().find(|(s, _)| s == seg) {
            Some((_, was)) if was == len => {}
            Some((_, was)) => return Err(format!("segment {seg} is {len} bytes, was {was}")),
            None => return Err(format!("segment {seg} is not one it knew")),
        }
    }
    Ok(())
}
