//! Reading a checkpoint at start: its blocks checked and decoded on a
//! thread of their own while the index is filled from them.

use std::collections::hash_map::Entry as Slot;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::*;
use crate::BodyHash;
use crate::record::DeleteRecord;
use crate::store::index::{BodyLoc, Index, Loc, Tomb, now_ms};
use crate::store::recovery::ByUser;

/// One block of a checkpoint as a start reads it.
pub(in crate::store) enum Block {
    Entries(String, Vec<EntryIn>),
    Tombs(String, Vec<TombIn>),
    End,
}

/// A checkpoint being read: its head, then its blocks in order, each
/// checked before it is decoded.
pub(in crate::store) struct Reader {
    input: BufReader<File>,
    last: [u8; 32],
    buf: Vec<u8>,
    pub(in crate::store) head: Head,
    counted: End,
}

impl Reader {
    /// The checkpoint in `dir`: `None` if there is none, `Err` with why
    /// when its start is unreadable.
    pub(in crate::store) fn open(dir: &Path) -> Option<Result<Reader, String>> {
        let file = match File::open(path(dir)) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => return Some(Err(e.to_string())),
        };
        Some(Self::start(file))
    }

    fn start(file: File) -> Result<Reader, String> {
        let mut input = BufReader::with_capacity(1 << 20, file);
        let mut magic = [0u8; 8];
        input.read_exact(&mut magic).map_err(|_| "too short")?;
        if &magic[..4] != MAGIC {
            return Err("not a checkpoint".into());
        }
        if magic[4..] != FORMAT.to_le_bytes() {
            return Err("a format this release does not read".into());
        }
        let mut r = Reader {
            input,
            last: first_hash(),
            buf: Vec::new(),
            head: Head {
                seg: 0,
                len: 0,
                sealed: Vec::new(),
                entries: 0,
            },
            counted: End { entries: 0, tombs: 0 },
        };
        if r.raw()? != HEAD {
            return Err("no head".into());
        }
        r.head = decode(&r.buf)?;
        Ok(r)
    }

    /// The next block's kind, its bytes in `self.buf`, checked.
    fn raw(&mut self) -> Result<u8, String> {
        let mut top = [0u8; 5];
        self.input.read_exact(&mut top).map_err(|_| "torn: a block cut short")?;
        let len = u32::from_le_bytes(top[1..].try_into().expect("4 bytes"));
        if len > BLOCK_BYTES_MAX {
            return Err("a block over its bound".into());
        }
        self.buf.resize(len as usize, 0);
        self.input
            .read_exact(&mut self.buf)
            .map_err(|_| "torn: a block cut short")?;
        let mut sum = [0u8; 32];
        self.input.read_exact(&mut sum).map_err(|_| "torn: a block cut short")?;
        let want = chain(&self.last, top[0], &self.buf);
        if sum != want {
            return Err("checksum mismatch".into());
        }
        self.last = want;
        Ok(top[0])
    }

    fn next(&mut self) -> Result<Block, String> {
        match self.raw()? {
            ENTRIES => {
                let (user, run): (String, Vec<EntryIn>) = decode(&self.buf)?;
                self.counted.entries += run.len() as u64;
                Ok(Block::Entries(user, run))
            }
            TOMBS => {
                let (user, run): (String, Vec<TombIn>) = decode(&self.buf)?;
                self.counted.tombs += run.len() as u64;
                Ok(Block::Tombs(user, run))
            }
            END => {
                let end: End = decode(&self.buf)?;
                if end != self.counted {
                    return Err("the counts at its end do not match its blocks".into());
                }
                if self.input.read(&mut [0u8; 1]).map_err(|e| e.to_string())? != 0 {
                    return Err("bytes after its end".into());
                }
                Ok(Block::End)
            }
            kind => Err(format!("a block of unknown kind {kind}")),
        }
    }
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    match bincode::serde::decode_from_slice::<T, _>(bytes, config()) {
        Ok((v, n)) if n == bytes.len() => Ok(v),
        _ => Err("a block that does not decode".into()),
    }
}

/// Puts the checkpoint's mailboxes into `index`, which holds every
/// segment and the bodies the replay found: what the replay has a record
/// of (`entries`, `tombs`) is left to it, and what lies in a segment that
/// is gone was dead when that segment was cleaned. `Err` with why when
/// the checkpoint is damaged or does not fit (the caller then drops the
/// index and rebuilds it from every segment).
///
/// Three threads share the work, in a pipeline: one reads, checks and
/// decodes the blocks; one sorts out what is used and keeps the bodies'
/// table (a look-up per entry in a table of millions, the costliest
/// step); this one fills the mailboxes.
pub(in crate::store) fn load(
    ck: Reader,
    index: &mut Index,
    entries: &ByUser<EntryMeta>,
    tombs: &ByUser<DeleteRecord>,
) -> Result<(), String> {
    let mut bodies = std::mem::take(&mut index.bodies);
    // Trusted only as far as a hint: its blocks are checked, not it.
    bodies.reserve(ck.head.entries.min(1 << 26) as usize);
    let segments: BTreeSet<u32> = index.segments.keys().copied().collect();
    let sorter = Sorter {
        bodies,
        segments,
        entries,
        tombs,
        opened_ms: now_ms(),
        body_live: BTreeMap::new(),
        body_bytes: 0,
        later: Vec::new(),
    };
    let sorted = std::thread::scope(|scope| {
        let (blocks_tx, blocks) = std::sync::mpsc::sync_channel(8);
        let (parts_tx, parts) = std::sync::mpsc::sync_channel(8);
        let thread = |name: &str| std::thread::Builder::new().name(name.into());
        thread("quill-store-ckpt")
            .spawn_scoped(scope, move || {
                let mut ck = ck;
                loop {
                    let block = ck.next();
                    let more = matches!(block, Ok(Block::Entries(..) | Block::Tombs(..)));
                    if blocks_tx.send(block).is_err() || !more {
                        break;
                    }
                }
            })
            .map_err(|e| format!("no thread to read it: {e}"))?;
        let sorting = thread("quill-store-sort")
            .spawn_scoped(scope, move || sorter.run(blocks, parts_tx))
            .map_err(|e| format!("no thread to sort it: {e}"))?;
        for part in parts {
            match part {
                Part::Entries(user, run) => index.put_fresh_entries(user, run),
                Part::Tombs(user, run) => {
                    for (id, tomb) in run {
                        index.put_tomb(&user, id, tomb);
                    }
                }
            }
        }
        sorting.join().map_err(|_| "its sorting thread panicked".to_owned())?
    })?;
    index.bodies = sorted.bodies;
    index.body_bytes += sorted.body_bytes;
    for (seg, live) in sorted.body_live {
        index.add_live(seg, live);
    }
    for (user, e) in sorted.later {
        if !index.bodies.contains_key(&e.meta.body) {
            // A live entry's body in a segment gone and not copied: not
            // what the cleaner does.
            return Err(format!("entry {} of {user} without its body", e.meta.id));
        }
        let loc = Loc {
            seg: e.seg,
            record_len: e.record_len,
        };
        index.put_entry(&user, e.meta, loc);
    }
    Ok(())
}

/// What the reading thread hands on: a mailbox's entries and tombstones
/// to put, their bodies already counted.
enum Part {
    Entries(String, Vec<(EntryMeta, Loc)>),
    Tombs(String, Vec<(MessageId, Tomb)>),
}

/// The reading thread's side: the bodies' table and what it adds up.
struct Sorter<'a> {
    bodies: HashMap<BodyHash, BodyLoc>,
    segments: BTreeSet<u32>,
    entries: &'a ByUser<EntryMeta>,
    tombs: &'a ByUser<DeleteRecord>,
    opened_ms: u64,
    /// Live bytes of the bodies now referenced, by segment.
    body_live: BTreeMap<u32, u64>,
    body_bytes: u64,
    /// Entries whose body the checkpoint places in a segment that is
    /// gone: a later block or the replay may place it anew.
    later: Vec<(String, EntryIn)>,
}

/// Whether the replay has a record of `user`'s message `id`.
fn newer<'m>(
    entries: &'m ByUser<EntryMeta>,
    tombs: &'m ByUser<DeleteRecord>,
    user: &str,
) -> impl Fn(&MessageId) -> bool + use<'m> {
    let (e, t) = (entries.get(user), tombs.get(user));
    move |id| e.is_some_and(|m| m.contains_key(id)) || t.is_some_and(|m| m.contains_key(id))
}

impl<'a> Sorter<'a> {
    fn run(
        mut self,
        blocks: std::sync::mpsc::Receiver<Result<Block, String>>,
        tx: std::sync::mpsc::SyncSender<Part>,
    ) -> Result<Sorter<'a>, String> {
        for block in blocks {
            let part = match block? {
                Block::Entries(user, run) => self.entries(user, run),
                Block::Tombs(user, run) => self.tombs(user, run),
                Block::End => return Ok(self),
            };
            if tx.send(part).is_err() {
                return Err("its filling stopped".into());
            }
        }
        Err("its reading stopped".into())
    }

    fn entries(&mut self, user: String, run: Vec<EntryIn>) -> Part {
        let newer = newer(self.entries, self.tombs, &user);
        let mut fresh = Vec::with_capacity(run.len());
        for e in run {
            let used = !newer(&e.meta.id) && self.segments.contains(&e.seg);
            // Its body, even for an entry the replay has (a change of its
            // replicas or flags writes no body again).
            let body = match self.bodies.entry(e.meta.body) {
                Slot::Occupied(o) => Some(o.into_mut()),
                Slot::Vacant(slot) if self.segments.contains(&e.body.seg) => Some(slot.insert(BodyLoc {
                    seg: e.body.seg,
                    body_offset: e.body.body_offset,
                    body_len: e.body.body_len,
                    record_len: e.body.record_len,
                    refs: 0,
                })),
                Slot::Vacant(_) => None,
            };
            if !used {
                continue;
            }
            let Some(body) = body else {
                self.later.push((user.clone(), e));
                continue;
            };
            // As `Index::ref_body`.
            body.refs += 1;
            if body.refs == 1 {
                *self.body_live.entry(body.seg).or_default() += body.record_len;
                self.body_bytes += body.body_len;
            }
            let loc = Loc {
                seg: e.seg,
                record_len: e.record_len,
            };
            fresh.push((e.meta, loc));
        }
        Part::Entries(user, fresh)
    }

    fn tombs(&mut self, user: String, run: Vec<TombIn>) -> Part {
        let newer = newer(self.entries, self.tombs, &user);
        let kept = run
            .into_iter()
            .filter(|t| !newer(&t.id) && self.segments.contains(&t.seg))
            .map(|t| {
                let tomb = Tomb {
                    hlc: t.hlc,
                    replicas: t.replicas,
                    loc: Loc {
                        seg: t.seg,
                        record_len: t.record_len,
                    },
                    added_ms: self.opened_ms,
                    moved: t.moved,
                };
                (t.id, tomb)
            })
            .collect();
        Part::Tombs(user, kept)
    }
}
