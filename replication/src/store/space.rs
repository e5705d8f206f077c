//! Room on disk: the segment a batch goes to (a new one when the active
//! one is full), sealed segments dropped, and a full disk: a reserve file
//! given up so that the deletions that free space fit, deliveries refused
//! meanwhile, and dead bodies' space given back in place.

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::*;

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
pub(super) fn release_reserve(dir: &Path) {
    if fs::remove_file(dir.join(RESERVE_FILE)).is_ok() {
        tracing::warn!(
            bytes = RESERVE_BYTES,
            "disk full: released the store's reserve for deletions"
        );
    }
}

pub(super) fn new_segment(dir: &Path, index: &mut Index, seg: u32) -> Result<u32, StoreError> {
    let path = seg_path(dir, seg);
    let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
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

/// Bytes free for this process on the file system holding `dir` (0 when
/// it cannot be told).
fn free_bytes(dir: &Path) -> u64 {
    rustix::fs::statvfs(dir)
        .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
        .unwrap_or(0)
}

/// Whether the file system holding `dir` is nearly full: less free than a
/// sixteenth of its size, counted between 1 MiB and 1 GiB. Deleted mail's
/// space is then given back in place at once, not when a segment is
/// cleaned (which needs room to copy into).
fn low_on_disk(dir: &Path) -> bool {
    let Ok(s) = rustix::fs::statvfs(dir) else {
        return false;
    };
    let total = s.f_blocks.saturating_mul(s.f_frsize);
    let free = s.f_bavail.saturating_mul(s.f_frsize);
    free < (total / 16).clamp(4 * RESERVE_BYTES, 1 << 30)
}

impl Writer {
    /// While the disk is full, deliveries are refused up front (the room
    /// left, the reserve included, is for the deletions that free space)
    /// until deliveries fit with the reserve made again and as much beyond
    /// it: those of a batch that fit are taken, the rest refused. Only a
    /// batch with deliveries decides that, so the room the reserve leaves
    /// when it is given up does not end the full state before the deletions
    /// that follow have given their space back.
    pub(super) fn refuse_deliveries_while_full(&mut self, batch: Vec<Op>) -> Vec<Op> {
        if !self.space_short || !batch.iter().any(|op| matches!(op, Op::Deliver { .. })) {
            return batch;
        }
        let free = free_bytes(&self.shared.dir);
        let mut room = free.saturating_sub(3 * RESERVE_BYTES);
        let mut refused = Vec::new();
        let mut kept = Vec::with_capacity(batch.len());
        for op in batch {
            if !matches!(op, Op::Deliver { .. }) {
                kept.push(op);
            } else if (op.bytes() as u64) <= room {
                room -= op.bytes() as u64;
                kept.push(op);
            } else {
                refused.push(op);
            }
        }
        let taking = kept.iter().any(|op| matches!(op, Op::Deliver { .. }));
        if taking && make_reserve(&self.shared.dir) {
            self.space_short = false;
            self.shared.disk_full.store(false, Ordering::Relaxed);
            tracing::info!(free_bytes = free, "the store has room again; taking mail");
        } else if taking {
            // No room for the reserve after all: nothing is taken.
            let (deliveries, rest): (Vec<Op>, Vec<Op>) =
                kept.into_iter().partition(|op| matches!(op, Op::Deliver { .. }));
            refused.extend(deliveries);
            kept = rest;
        }
        fail_all(
            refused,
            "No space left on device: the store takes deletions only until space is freed",
        );
        kept
    }

    /// Gives the space of dead body records back to the file system in
    /// place: the record's bytes are zeroed (whole blocks punched out with
    /// fallocate, the edges written), then fdatasync. Only dead bodies
    /// (no entry refers to them; their tombstones are durable), and only
    /// when the disk is full or nearly full ([`low_on_disk`]): copying
    /// live records elsewhere, as the cleaner does, needs free space a full disk does not have, and a
    /// store with a single segment has nothing sealed to clean at all.
    /// Recovery skips zeroed records. Returns the bytes given back.
    pub(super) fn reclaim(&mut self) -> u64 {
        use std::os::unix::fs::FileExt;
        if self.shared.index().dead_bodies.is_empty() {
            return 0;
        }
        if !self.space_short && !low_on_disk(&self.shared.dir) {
            return 0;
        }
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
            tracing::info!(
                freed_bytes = freed,
                "disk (nearly) full: gave dead bodies' space back in place"
            );
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
        // The summary first: one left behind by a crash is removed at the
        // next start, a segment without one is read whole.
        let _ = fs::remove_file(summary::path(&self.shared.dir, seg));
        fs::remove_file(seg_path(&self.shared.dir, seg))?;
        sync_dir(&self.shared.dir)?;
        Ok(true)
    }

    pub(super) fn rotate(&mut self) -> Result<(), StoreError> {
        let mut index = self.shared.index();
        let entries = index.entries;
        let sealed = index.segments.get(&self.active).expect("active segment");
        if self.zeroed_to > sealed.len {
            // The zeros ahead of its end are of no use to a sealed segment.
            let _ = sealed.file.set_len(sealed.len);
            self.zeroed_to = sealed.len;
        }
        let sealed = self.active;
        let next = sealed + 1;
        self.active = new_segment(&self.shared.dir, &mut index, next)?;
        self.zeroed_to = 0;
        // Its summary, so that a start reads it quickly (off the writer).
        let dir = self.shared.dir.clone();
        let _ = std::thread::Builder::new()
            .name("quill-store-summary".into())
            .spawn(move || summary::summarize(&dir, sealed));
        // And, when enough was written since the last, a checkpoint of
        // the index.
        let since = next.saturating_sub(self.shared.checkpoint_seg.load(Ordering::Acquire));
        if super::checkpoint::due(&self.shared, since.into(), entries) {
            super::checkpoint::spawn(&self.shared);
        }
        Ok(())
    }
}
