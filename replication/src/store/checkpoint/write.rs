//! Writing a checkpoint: the index walked a chunk at a time, written to a
//! temporary file block by block, fsynced and renamed over the last one.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::ops::Bound;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tracing::{info, warn};

use super::*;
use crate::store::index::Shared;
use crate::store::{StoreError, sync_dir};

/// Begins a checkpoint on a thread of its own, unless one is being
/// written.
pub(in crate::store) fn spawn(shared: &Arc<Shared>) {
    // Not on a full disk: deliveries need the room more.
    if shared.closing.load(Ordering::Acquire)
        || shared.disk_full.load(Ordering::Relaxed)
        || shared.checkpointing.swap(true, Ordering::AcqRel)
    {
        return;
    }
    let s = shared.clone();
    let started = std::thread::Builder::new()
        .name("quill-store-checkpoint".into())
        .spawn(move || {
            let t = std::time::Instant::now();
            match write(&s) {
                Ok(r) => info!(
                    segment = r.segment,
                    entries = r.entries,
                    tombstones = r.tombstones,
                    bytes = r.bytes,
                    secs = t.elapsed().as_secs_f64(),
                    "store checkpoint written"
                ),
                Err(StoreError::Closed) => {}
                Err(e) => warn!(error = %e, "store checkpoint not written; a start reads more segments"),
            }
            s.checkpointing.store(false, Ordering::Release);
        });
    match started {
        Ok(h) => *thread_slot(shared) = Some(h),
        Err(_) => shared.checkpointing.store(false, Ordering::Release),
    }
}

fn thread_slot(shared: &Shared) -> std::sync::MutexGuard<'_, Option<std::thread::JoinHandle<()>>> {
    shared.checkpoint_thread.lock().unwrap_or_else(|p| p.into_inner())
}

/// Stops a checkpoint being written (it is given up, its file removed)
/// and waits for its thread.
pub(in crate::store) fn stop(shared: &Shared) {
    shared.closing.store(true, Ordering::Release);
    if let Some(h) = thread_slot(shared).take() {
        let _ = h.join();
    }
}

/// Writes a checkpoint now (blocking, while deliveries go on).
pub(in crate::store) fn write(shared: &Shared) -> Result<CheckpointReport, StoreError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = shared.dir.join(format!("{FILE_NAME}.{}.{n}.tmp", std::process::id()));
    // Counted before it begins: a record written meanwhile counts as after.
    let records = shared.records.load(Ordering::Relaxed);
    let written = write_to(shared, &tmp);
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    let report = written?;
    shared.checkpoint_seg.store(report.segment, Ordering::Release);
    shared.checkpoint_records.store(records, Ordering::Relaxed);
    Ok(report)
}

fn write_to(shared: &Shared, tmp: &Path) -> Result<CheckpointReport, StoreError> {
    let (head, users) = {
        let index = shared.index();
        let Some((&seg, active)) = index.segments.last_key_value() else {
            return Err(StoreError::Io(std::io::Error::other("a store without segments")));
        };
        let sealed = index
            .segments
            .iter()
            .filter(|(s, _)| **s != seg)
            .map(|(s, x)| (*s, x.len))
            .collect();
        let head = Head {
            seg,
            len: active.len,
            sealed,
            entries: index.entries,
        };
        (head, index.mailboxes.keys().cloned().collect::<Vec<String>>())
    };
    let mut out = BlockWriter::new(File::create(tmp)?)?;
    out.block(HEAD, &encode(&head)?)?;
    // Where the walk is: a mailbox, entries or tombstones, after which id.
    let (mut i, mut tombs, mut from) = (0usize, false, None::<MessageId>);
    let mut end = End { entries: 0, tombs: 0 };
    while i < users.len() {
        if shared.closing.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        let mut staged: Vec<(u8, Vec<u8>)> = Vec::new();
        {
            let index = shared.index();
            let mut budget = shared.checkpoint_chunk.min(CHUNK);
            while budget > 0 && i < users.len() {
                let user = &users[i];
                let Some(m) = index.mailboxes.get(user) else {
                    (i, tombs, from) = (i + 1, false, None);
                    continue;
                };
                let after = (from.map_or(Bound::Unbounded, Bound::Excluded), Bound::Unbounded);
                let (taken, last) = if tombs {
                    let run: Vec<TombOut> = m
                        .tombstones
                        .range(after)
                        .take(budget)
                        .map(|(id, t)| TombOut {
                            id: *id,
                            hlc: t.hlc,
                            replicas: &t.replicas,
                            moved: &t.moved,
                            seg: t.loc.seg,
                            record_len: t.loc.record_len,
                        })
                        .collect();
                    if !run.is_empty() {
                        staged.push((TOMBS, encode(&(user, &run))?));
                    }
                    end.tombs += run.len() as u64;
                    (run.len(), run.last().map(|t| t.id))
                } else {
                    let mut run: Vec<EntryOut> = Vec::new();
                    for (id, e) in m.entries.range(after).take(budget) {
                        // A live entry's body is always indexed; if not, no
                        // checkpoint rather than one that loses the entry.
                        let Some(b) = index.bodies.get(&e.meta.body) else {
                            return Err(StoreError::Io(std::io::Error::other(format!(
                                "entry {id} of {user} without its body in the index"
                            ))));
                        };
                        run.push(EntryOut {
                            meta: &e.meta,
                            seg: e.loc.seg,
                            record_len: e.loc.record_len,
                            body: Place {
                                seg: b.seg,
                                body_offset: b.body_offset,
                                body_len: b.body_len,
                                record_len: b.record_len,
                            },
                        });
                    }
                    if !run.is_empty() {
                        staged.push((ENTRIES, encode(&(user, &run))?));
                    }
                    end.entries += run.len() as u64;
                    (run.len(), run.last().map(|e| e.meta.id))
                };
                if taken < budget {
                    // This mailbox's entries (or tombstones) are all out.
                    if tombs {
                        i += 1;
                    }
                    (tombs, from) = (!tombs, None);
                } else {
                    from = last;
                }
                budget -= taken;
            }
        }
        for (kind, payload) in staged {
            out.block(kind, &payload)?;
        }
        // The lock is not fair: let the writer in between chunks.
        std::thread::sleep(crate::store::queries::WALK_PAUSE);
    }
    out.block(END, &encode(&end)?)?;
    let bytes = out.bytes;
    let file = out.out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path(&shared.dir))?;
    sync_dir(&shared.dir)?;
    Ok(CheckpointReport {
        segment: head.seg,
        entries: end.entries,
        tombstones: end.tombs,
        bytes,
    })
}

fn encode(value: &impl Serialize) -> Result<Vec<u8>, StoreError> {
    bincode::serde::encode_to_vec(value, config()).map_err(|e| StoreError::Io(std::io::Error::other(e)))
}

struct BlockWriter {
    out: BufWriter<File>,
    last: [u8; 32],
    bytes: u64,
}

impl BlockWriter {
    fn new(file: File) -> std::io::Result<Self> {
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT.to_le_bytes())?;
        Ok(BlockWriter {
            out,
            last: first_hash(),
            bytes: 8,
        })
    }

    fn block(&mut self, kind: u8, payload: &[u8]) -> Result<(), StoreError> {
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|n| *n <= BLOCK_BYTES_MAX)
            .ok_or_else(|| StoreError::Io(std::io::Error::other("a checkpoint block over its bound")))?;
        self.last = chain(&self.last, kind, payload);
        self.out.write_all(&[kind])?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(payload)?;
        self.out.write_all(&self.last)?;
        self.bytes += 1 + 4 + payload.len() as u64 + 32;
        Ok(())
    }
}
