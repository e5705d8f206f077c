//! Summaries of sealed segments: what recovery reads from a sealed
//! segment (every valid record's place and content, bodies left out),
//! written once beside it as `seg-N.qidx`, so that opening a store reads a
//! few bytes per record instead of every body, and hashes none.
//!
//! A sealed segment never changes but for dead records zeroed to give
//! their space back (a summary still lists them: they are dead either
//! way). A summary is written for a segment whose scan found nothing
//! damaged, so that damage is reported at every start as before.
//!
//! Layout: magic `QIDX`, format `1` (u32le), the segment's length (u64le),
//! bincode of the records (`(offset, length, Decoded)`, in order), then
//! blake3 of everything before. A summary that is torn, damaged, of a
//! format this release does not know, or of another length than its
//! segment is not used (the segment is read whole, as without one, and a
//! new summary written); one whose segment is gone is removed. Releases
//! before 0.3.0 do not read summaries and leave them alone.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

use crate::record::{self, Decoded};

const MAGIC: &[u8; 4] = b"QIDX";
const FORMAT: u32 = 1;
const HEAD_BYTES: usize = 4 + 4 + 8;
const SUM_BYTES: usize = 32;

/// One valid record of a segment: its offset, its length, what it says.
pub(super) type Item = (u64, u64, Decoded);

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 1 << 30 }>()
}

pub(super) fn path(dir: &Path, seg: u32) -> PathBuf {
    dir.join(format!("seg-{seg:08}.qidx"))
}

/// Reads segment `seg`'s records: from its summary when one is there for
/// a segment of `seg_len` bytes, else `None`.
pub(super) fn read(dir: &Path, seg: u32, seg_len: u64) -> Option<Vec<Item>> {
    let data = fs::read(path(dir, seg)).ok()?;
    match parse(&data, seg_len) {
        Ok(items) => Some(items),
        Err(why) => {
            warn!(
                segment = seg,
                why, "segment summary not used; reading the segment whole"
            );
            None
        }
    }
}

fn parse(data: &[u8], seg_len: u64) -> Result<Vec<Item>, &'static str> {
    if data.len() < HEAD_BYTES + SUM_BYTES {
        return Err("too short");
    }
    let (body, sum) = data.split_at(data.len() - SUM_BYTES);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch");
    }
    if &body[..4] != MAGIC {
        return Err("not a summary");
    }
    if u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")) != FORMAT {
        return Err("a format this release does not read");
    }
    if u64::from_le_bytes(body[8..16].try_into().expect("8 bytes")) != seg_len {
        return Err("of a segment of another length");
    }
    match bincode::serde::decode_from_slice::<Vec<Item>, _>(&body[HEAD_BYTES..], config()) {
        Ok((items, n)) if n == body.len() - HEAD_BYTES => Ok(items),
        _ => Err("undecodable"),
    }
}

/// Writes segment `seg`'s summary (temporary file, fsync, rename): its
/// `items` as a scan of its `seg_len` bytes found them.
pub(super) fn write(dir: &Path, seg: u32, seg_len: u64, items: &[Item]) -> std::io::Result<()> {
    let mut data = Vec::with_capacity(HEAD_BYTES + items.len() * 96 + SUM_BYTES);
    data.extend_from_slice(MAGIC);
    data.extend_from_slice(&FORMAT.to_le_bytes());
    data.extend_from_slice(&seg_len.to_le_bytes());
    bincode::serde::encode_into_std_write(items, &mut data, config()).map_err(std::io::Error::other)?;
    let sum = blake3::hash(&data);
    data.extend_from_slice(sum.as_bytes());
    let final_path = path(dir, seg);
    let tmp = final_path.with_extension("qidx.tmp");
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&data)?;
    f.sync_data()?;
    fs::rename(&tmp, &final_path)
}

/// Reads a sealed segment whole and writes its summary, unless the scan
/// finds damage or a record this release cannot read (then every start
/// reads it whole and says so). Off the writer: called on a thread of its
/// own once a segment is sealed.
///
/// Bodies are not hashed again here (a third of this thread's work, 3 %
/// of a node's CPU per delivery): each was hashed as it came in and
/// written and synced whole before the segment was sealed (a record torn
/// by a crash is cut off by the recovery after it, which checks every
/// body it reads), and every read of a body checks it against its hash.
/// Headers and the other records' checksums are checked.
///
/// The segment is read in chunks of [`SCAN_CHUNK_BYTES`], not whole: a
/// 64 MiB buffer made for each segment cost the node more in page faults
/// than the scan itself.
pub(super) fn summarize(dir: &Path, seg: u32) {
    let seg_path = super::seg_path(dir, seg);
    let Ok(mut file) = fs::File::open(&seg_path) else {
        return; // Dropped by the cleaner meanwhile.
    };
    let mut items = Vec::new();
    let seg_len = match scan_clean(&mut file, SCAN_CHUNK_BYTES, |at, len, d| items.push((at, len, d))) {
        Ok(Some(len)) => len,
        Ok(None) => {
            debug!(segment = seg, "a sealed segment with damage: no summary");
            return;
        }
        Err(e) => {
            debug!(segment = seg, error = %e, "a sealed segment not read: no summary");
            return;
        }
    };
    match write(dir, seg, seg_len, &items) {
        // Dropped while this was written: the summary goes with it.
        Ok(()) if !seg_path.exists() => drop(fs::remove_file(path(dir, seg))),
        Ok(()) => {}
        Err(e) => warn!(segment = seg, error = %e, "segment summary not written"),
    }
}

/// Bytes a summary's scan reads at a time (a record longer than that is
/// read whole).
const SCAN_CHUNK_BYTES: usize = 4 << 20;

/// Scans the records `r` holds, `chunk` bytes at a time, bodies trusted
/// (see [`summarize`]): its length, or `None` where [`record::scan`] would
/// find damage, a torn tail or a record it cannot read. Zero runs (records
/// zeroed to give space back) are skipped as the scan skips them.
fn scan_clean(r: &mut impl Read, chunk: usize, mut f: impl FnMut(u64, u64, Decoded)) -> std::io::Result<Option<u64>> {
    use record::{HEADER_BYTES, PAYLOAD_BYTES_MAX};
    let (mut buf, mut base, mut pos, mut eof) = (Vec::with_capacity(chunk), 0u64, 0usize, false);
    // Zeros run to the end of what was read: a torn tail if the file ends.
    let mut in_zeros = false;
    loop {
        let avail = buf.len() - pos;
        if avail > 0 && buf[pos] != 0 {
            in_zeros = false;
        }
        if avail == 0 && eof {
            return Ok((!in_zeros).then_some(base + pos as u64));
        }
        // Bytes needed at `pos` to know what is there.
        let need = if avail > 0 && buf[pos] == 0 {
            match buf[pos..].iter().position(|b| *b != 0) {
                Some(n) => {
                    pos += n;
                    continue;
                }
                None if eof => return Ok(None), // zeros to the end: torn
                None => {
                    pos = buf.len();
                    in_zeros = true;
                    1
                }
            }
        } else if avail < HEADER_BYTES {
            HEADER_BYTES
        } else {
            let payload = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().expect("4 bytes")) as usize;
            if payload == 0 || payload > PAYLOAD_BYTES_MAX {
                return Ok(None);
            }
            HEADER_BYTES + payload
        };
        if buf.len() - pos < need {
            if eof {
                return Ok(None); // torn tail
            }
            buf.drain(..pos);
            base += pos as u64;
            pos = 0;
            let want = need.max(chunk);
            if r.by_ref().take((want - buf.len()) as u64).read_to_end(&mut buf)? == 0 {
                eof = true;
            }
            continue;
        }
        match record::parse_at(&buf, pos, record::Bodies::Trust) {
            Ok((len, mut d)) => {
                if let Decoded::Body { body_offset, .. } = &mut d {
                    *body_offset += base;
                }
                f(base + pos as u64, len as u64, d);
                pos += len;
            }
            Err(_) => return Ok(None),
        }
    }
}

/// Removes the summaries (and summaries half written) of segments that
/// are not in `segs`.
pub(super) fn remove_orphans(dir: &Path, segs: &[u32]) {
    let Ok(read) = fs::read_dir(dir) else { return };
    for e in read.filter_map(|e| e.ok()) {
        let Ok(name) = e.file_name().into_string() else {
            continue;
        };
        let Some(rest) = name.strip_prefix("seg-") else {
            continue;
        };
        let orphan = if let Some(n) = rest.strip_suffix(".qidx") {
            n.parse::<u32>().is_ok_and(|n| segs.binary_search(&n).is_err())
        } else {
            rest.ends_with(".qidx.tmp")
        };
        if orphan {
            let _ = fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BodyHash;

    #[test]
    fn a_summary_reads_back_and_any_damage_or_other_length_is_refused() {
        let dir = testkit::TempDir::new("summary-unit").expect("temp dir");
        let items: Vec<Item> = vec![
            (
                0,
                100,
                Decoded::Body {
                    hash: BodyHash([7; 32]),
                    body_offset: 73,
                    body_len: 27,
                },
            ),
            (100, 9, Decoded::Commit),
        ];
        write(dir.path(), 3, 109, &items).expect("write");
        let got = read(dir.path(), 3, 109).expect("read back");
        assert_eq!(format!("{got:?}"), format!("{items:?}"));
        assert!(read(dir.path(), 3, 110).is_none(), "another length");
        let data = fs::read(path(dir.path(), 3)).expect("summary");
        for cut in 0..data.len() {
            assert!(parse(&data[..cut], 109).is_err(), "torn at {cut}");
        }
        for at in 0..data.len() {
            let mut bad = data.clone();
            bad[at] ^= 0x10;
            assert!(parse(&bad, 109).is_err(), "flipped at {at}");
        }
    }

    /// The chunked scan finds what the whole scan finds, at every chunk
    /// size (records longer than a chunk, zero runs across chunks), and
    /// nothing where the whole scan finds damage, a torn tail or zeros to
    /// the end.
    #[test]
    fn the_chunked_scan_agrees_with_the_whole_scan() {
        use crate::record::{Bodies, Scan, encode_body, encode_entry, scan_with};
        use crate::{EntryMeta, MessageId};
        let mut rng = testkit::Rng::new(7);
        let mut data = Vec::new();
        let mut zeroed = None;
        for i in 0..40u8 {
            let body: Vec<u8> = (0..rng.below(3000) as usize).map(|k| (k as u8) ^ i).collect();
            let hash = BodyHash(*blake3::hash(&body).as_bytes());
            let start = data.len();
            encode_body(&mut data, &hash, &body, true);
            if i == 17 {
                zeroed = Some(start..data.len());
            }
            let meta = EntryMeta::delivered(MessageId([i; 16]), hash, body.len() as u64, 1, "INBOX".into(), vec![1]);
            encode_entry(
                &mut data,
                &record::EntryRecord {
                    user: format!("u{i}@example.org"),
                    meta,
                },
            );
        }
        // A record zeroed to give its space back.
        let z = zeroed.expect("zeroed");
        data[z].fill(0);
        let whole = |d: &[u8]| {
            let mut items = Vec::new();
            let found = scan_with(d, Bodies::Trust, |a, l, x| items.push(format!("{a} {l} {x:?}")));
            (found == Scan::default()).then_some(items)
        };
        let chunked = |d: &[u8], chunk: usize| {
            let mut items = Vec::new();
            let len = scan_clean(&mut &d[..], chunk, |a, l, x| items.push(format!("{a} {l} {x:?}"))).expect("reads");
            len.map(|len| {
                assert_eq!(len, d.len() as u64);
                items
            })
        };
        let want = whole(&data).expect("clean");
        assert_eq!(want.len(), 79, "40 entries, 39 bodies");
        for chunk in [1, 7, 40, 41, 100, 999, 4096, 1 << 20] {
            assert_eq!(chunked(&data, chunk), Some(want.clone()), "chunk {chunk}");
        }
        // Torn at every length: exactly where the whole scan says so.
        for cut in (0..data.len()).step_by(97) {
            let w = whole(&data[..cut]);
            assert_eq!(chunked(&data[..cut], 64), w, "cut at {cut}");
        }
        // Damage in a header, zeros to the end.
        let mut bad = data.clone();
        bad[45] ^= 0x40;
        assert_eq!(chunked(&bad, 64), None);
        let mut tail = data.clone();
        tail.extend_from_slice(&[0; 100]);
        assert_eq!(whole(&tail), None);
        assert_eq!(chunked(&tail, 64), None);
    }
}
