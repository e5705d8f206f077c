//! Opening a store: the index rebuilt by reading every segment, a torn or
//! corrupt tail cut off, the writer started.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use super::*;
use crate::record::{self, Decoded, DeleteRecord, EntryRecord};
use crate::{BodyHash, EntryMeta, MessageId};

impl FragmentStore {
    /// Opens (or creates) the store in `config.dir`, rebuilding the index
    /// from the last checkpoint and the segments written since (or from
    /// every segment, without a usable checkpoint) and cutting off a torn
    /// tail. Blocking: call it before serving, or from a blocking thread.
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
        summary::remove_orphans(&config.dir, &seg_ids);
        checkpoint::remove_temporaries(&config.dir);
        let dir = &config.dir;
        let lens = seg_ids
            .iter()
            .map(|&s| Ok((s, fs::metadata(seg_path(dir, s))?.len())))
            .collect::<Result<Vec<(u32, u64)>, StoreError>>()?;
        let ck = match checkpoint::Reader::open(dir) {
            None => None,
            Some(read) => match read.and_then(|r| checkpoint::fits(&r.head, &lens).map(|()| r)) {
                Ok(r) => Some(r),
                Err(why) => {
                    warn!(
                        why,
                        "store checkpoint not used; the index is rebuilt from every segment"
                    );
                    None
                }
            },
        };
        let from = ck.as_ref().map(|c| c.head.seg);
        let (
            index,
            Replayed {
                segments: replayed,
                records,
            },
            from,
        ) = match rebuild(dir, &seg_ids, ck)? {
            Ok((index, replayed)) => (index, replayed, from),
            Err(why) => {
                warn!(
                    why,
                    "store checkpoint not used; the index is rebuilt from every segment"
                );
                let (index, replayed) =
                    rebuild(dir, &seg_ids, None)?.map_err(|why| StoreError::Io(std::io::Error::other(why)))?;
                (index, replayed, None)
            }
        };
        let mut index = index;

        // The active segment: the last one if there is room, else a new one.
        let active = match index.segments.last_key_value() {
            Some((&seg, s)) if s.len < config.segment_bytes_max => seg,
            Some((&seg, _)) => new_segment(&config.dir, &mut index, seg + 1)?,
            None => new_segment(&config.dir, &mut index, 1)?,
        };
        let active_len = index.segments.get(&active).expect("active segment").len;
        let entries = index.entries;
        info!(
            dir = %config.dir.display(),
            segments = index.segments.len(),
            entries = index.entries,
            tombstones = index.tombstones,
            bodies = index.bodies.len(),
            from_checkpoint = from.is_some(),
            replayed_segments = replayed,
            "fragment store opened"
        );

        let shared = Arc::new(Shared {
            dir: config.dir.clone(),
            index: Mutex::new(index),
            fsyncs: AtomicU64::new(0),
            ops: AtomicU64::new(0),
            id_nonce: random_bytes(),
            id_counter: AtomicU64::new(0),
            failed: Default::default(),
            disk_full: Default::default(),
            fail_next_sync: Default::default(),
            hashed_bodies: Default::default(),
            opened: OpenReport {
                checkpoint_segment: from,
                segments_read: replayed as u64,
            },
            checkpoint_chunk: config.checkpoint_chunk.max(1),
            checkpoint_every: config.checkpoint_every,
            checkpoint_records_min: config.checkpoint_records_min,
            closing: Default::default(),
            checkpointing: Default::default(),
            checkpoint_seg: AtomicU32::new(from.unwrap_or(0)),
            records: AtomicU64::new(records),
            checkpoint_records: AtomicU64::new(0),
            checkpoint_thread: Default::default(),
        });
        let has_reserve = super::space::make_reserve(&config.dir);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE_DEPTH);
        let writer = Writer {
            shared: shared.clone(),
            active,
            segment_bytes_max: config.segment_bytes_max,
            batch_seq: 0,
            carry: Vec::new(),
            // Opened on a full disk: deletions first (see the writer).
            space_short: !has_reserve,
            // Recovery cut any zeros after the last record.
            zeroed_to: active_len,
        };
        shared.disk_full.store(!has_reserve, Ordering::Relaxed);
        let handle = std::thread::Builder::new()
            .name("quill-store-writer".into())
            .spawn(move || writer.run(rx))?;
        // Much read: the next start should not read it again.
        if checkpoint::due(&shared, replayed.saturating_sub(1) as u64, entries) {
            checkpoint::spawn(&shared);
        }
        Ok(FragmentStore {
            shared,
            tx: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
        })
    }
}

/// What a start read besides a checkpoint.
struct Replayed {
    segments: usize,
    /// Entry and tombstone records (the latest of each message).
    records: u64,
}

/// The index as the segments in `dir` (`seg_ids`, sorted) give it, with
/// what was read: from every segment, or with `ck` from the checkpoint
/// and the records written since it began. `Ok(Err(why))` when the
/// checkpoint turns out unusable (the caller rebuilds without it).
fn rebuild(
    dir: &Path,
    seg_ids: &[u32],
    ck: Option<checkpoint::Reader>,
) -> Result<Result<(Index, Replayed), String>, StoreError> {
    let (from_seg, from_len) = ck.as_ref().map_or((0, 0), |c| (c.head.seg, c.head.len));
    let with_checkpoint = ck.is_some();
    let mut index = Index::default();
    // Latest record of each kind wins; tombstones remove earlier entries.
    let mut bodies: HashMap<BodyHash, BodyLoc> = HashMap::new();
    // By user, then id: no key copied per record, and the index is
    // filled in order at the end.
    let mut entries: ByUser<EntryMeta> = HashMap::new();
    let mut tombs: ByUser<DeleteRecord> = HashMap::new();
    let last = seg_ids.last().copied();
    // Segments before the checkpoint's: all they say is in it.
    for &seg in seg_ids.iter().filter(|s| **s < from_seg) {
        let file = Arc::new(OpenOptions::new().read(true).write(true).open(seg_path(dir, seg))?);
        let len = file.metadata()?.len();
        let live_bytes = 0;
        index.segments.insert(seg, Segment { file, len, live_bytes });
    }
    let replay: Vec<u32> = seg_ids.iter().copied().filter(|s| *s >= from_seg).collect();
    std::thread::scope(|scope| -> Result<(), StoreError> {
        // The next segment is read (or its summary decoded) on a thread of
        // its own while this one applies the one before.
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let ids = &replay;
        scope.spawn(move || {
            for &seg in ids {
                if tx.send((seg, read_segment(dir, seg, Some(seg) != last))).is_err() {
                    break;
                }
            }
        });
        for (seg, read) in rx {
            let path = seg_path(dir, seg);
            let SegmentRead { mut items, found, data } = read?;
            if seg == from_seg {
                // What came before the checkpoint began is in it.
                items.retain(|i| i.0 >= from_len);
            }
            bodies.reserve(items.iter().filter(|i| matches!(i.2, Decoded::Body { .. })).count());
            // Records take effect batch by batch, at each commit record.
            let mut pending: Vec<(u64, u64, Decoded)> = Vec::new();
            for (offset, record_len, decoded) in items {
                if !matches!(decoded, Decoded::Commit) {
                    pending.push((offset, record_len, decoded));
                    continue;
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
                        Decoded::Entry(EntryRecord { user, meta }) => {
                            // An entry after a tombstone of the same id can
                            // only follow that tombstone's expiry: it wins.
                            if let Some(t) = tombs.get_mut(&user) {
                                t.remove(&meta.id);
                            }
                            let id = meta.id;
                            of_user(&mut entries, user).insert(id, (meta, Loc { seg, record_len }));
                        }
                        Decoded::Delete(d) => {
                            if let Some(e) = entries.get_mut(&d.user) {
                                e.remove(&d.id);
                            }
                            let (user, id) = (d.user.clone(), d.id);
                            of_user(&mut tombs, user).insert(id, (d, Loc { seg, record_len }));
                        }
                        Decoded::Commit => unreachable!("commits are not pending"),
                    }
                }
            }
            if let Some((offset, kind, why)) = found.unreadable {
                return Err(StoreError::Unreadable(format!(
                    "{}: the record at offset {offset} (kind {kind}) is whole but unreadable here ({why}): \
                     written by a newer release; run that release (this one reads kinds 1 to 8)",
                    path.display()
                )));
            }
            for (start, end, why) in &found.corrupt {
                error!(segment = seg, start, end, why, "damaged records skipped on recovery");
            }
            let mut len = fs::metadata(&path)?.len();
            // An unfinished batch (no commit record) or a torn record at the
            // end: the tail from there on was never acknowledged.
            let cut = pending.first().map(|p| p.0).or(found.torn.map(|t| t.0));
            if let Some(offset) = cut {
                let why = found.torn.map_or("batch without commit record", |t| t.1);
                // Zeros the writer wrote ahead of the segment's end (see
                // `Writer::zero_ahead`): room, not damage.
                let zeros = data
                    .as_ref()
                    .is_some_and(|d| d[offset as usize..].iter().all(|b| *b == 0));
                if zeros {
                    debug!(segment = seg, offset, "zeros after the segment's end cut off");
                    OpenOptions::new().write(true).open(&path)?.set_len(offset)?;
                    len = offset;
                } else if Some(seg) == last {
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
            let file = Arc::new(OpenOptions::new().read(true).write(true).open(&path)?);
            index.segments.insert(
                seg,
                Segment {
                    file,
                    len,
                    live_bytes: 0,
                },
            );
        }
        Ok(())
    })?;
    if with_checkpoint && index.segments.get(&from_seg).is_some_and(|s| s.len < from_len) {
        return Ok(Err(format!(
            "segment {from_seg} ends before where the checkpoint began"
        )));
    }
    index.bodies = bodies;
    if let Some(ck) = ck
        && let Err(why) = checkpoint::load(ck, &mut index, &entries, &tombs)
    {
        return Ok(Err(why));
    }
    let entries_n: usize = entries.values().map(|m| m.len()).sum();
    for (user, found) in entries {
        for (id, (meta, loc)) in found {
            if !index.bodies.contains_key(&meta.body) {
                if with_checkpoint {
                    // Its body was written before the checkpoint began,
                    // which shows it nowhere (its other entries deleted
                    // before their mailboxes were walked): rare, and
                    // only the segments before have it.
                    return Ok(Err(format!("entry {id} of {user} written since has its body before")));
                }
                error!(%user, %id, "entry without its body on recovery; dropped");
                continue;
            }
            index.put_entry(&user, meta, loc);
        }
    }
    let replayed = Replayed {
        segments: replay.len(),
        records: (entries_n + tombs.values().map(|m| m.len()).sum::<usize>()) as u64,
    };
    let opened_ms = now_ms();
    for (user, found) in tombs {
        for (id, (d, loc)) in found {
            index.put_tomb(
                &user,
                id,
                Tomb {
                    hlc: d.hlc,
                    replicas: d.replicas,
                    loc,
                    added_ms: opened_ms,
                    moved: d.moved,
                },
            );
        }
    }
    // Bodies nobody references are dead space for the cleaner (and for
    // reclaiming in place when the disk fills).
    let dead: Vec<BodyLoc> = index.bodies.extract_if(|_, b| b.refs == 0).map(|(_, b)| b).collect();
    for b in &dead {
        index.note_dead_body(b);
    }
    Ok(Ok((index, replayed)))
}

/// What recovery found of one kind, by user, then message id.
pub(super) type ByUser<T> = HashMap<String, std::collections::BTreeMap<MessageId, (T, Loc)>>;

/// `user`'s part of `map` (the record's own name is the key: no copy).
fn of_user<T>(map: &mut ByUser<T>, user: String) -> &mut std::collections::BTreeMap<MessageId, (T, Loc)> {
    map.entry(user).or_default()
}

/// One segment as recovery reads it: its valid records in order, what
/// reading found besides them, and its bytes when it was read whole.
struct SegmentRead {
    items: Vec<summary::Item>,
    found: record::Scan,
    data: Option<Vec<u8>>,
}

/// Reads a segment: a sealed one from its summary when it has a good one;
/// otherwise whole, and a sealed one found undamaged gets its summary for
/// the next start.
fn read_segment(dir: &Path, seg: u32, sealed: bool) -> Result<SegmentRead, StoreError> {
    let path = seg_path(dir, seg);
    if sealed && let Some(items) = summary::read(dir, seg, fs::metadata(&path)?.len()) {
        return Ok(SegmentRead {
            items,
            found: record::Scan::default(),
            data: None,
        });
    }
    let data = fs::read(&path)?;
    let mut items = Vec::new();
    let found = record::scan(&data, |offset, record_len, decoded| {
        items.push((offset, record_len, decoded))
    });
    if sealed
        && found == record::Scan::default()
        && let Err(e) = summary::write(dir, seg, data.len() as u64, &items)
    {
        warn!(segment = seg, error = %e, "segment summary not written");
    }
    Ok(SegmentRead {
        items,
        found,
        data: Some(data),
    })
}
