//! Framing of every record membership writes: magic, length, checksum,
//! payload. A reader trusts nothing it has not checked: a short or bad
//! frame ends what is read (a torn tail after a crash).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// `Q`uill `R`aft, format 1.
const MAGIC: [u8; 4] = *b"QRF1";
/// magic (4) + payload length (4, LE) + checksum (8: blake3 prefix).
pub(crate) const HEADER_BYTES: usize = 16;

fn checksum(payload: &[u8]) -> [u8; 8] {
    let mut c = [0u8; 8];
    c.copy_from_slice(&blake3::hash(payload).as_bytes()[..8]);
    c
}

/// Appends one frame holding `payload` to `out`.
pub(crate) fn push_frame(out: &mut Vec<u8>, payload: &[u8]) {
    let len = u32::try_from(payload.len()).expect("payloads are bounded far below 4 GiB");
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&checksum(payload));
    out.extend_from_slice(payload);
}

/// What is at one offset of a buffer of frames.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame<'a> {
    /// A whole, checked frame; the next one starts at `next`.
    Whole { payload: &'a [u8], next: usize },
    /// The buffer ends here.
    End,
    /// A short, oversized or corrupt frame.
    Bad(&'static str),
}

pub(crate) fn read_frame(buf: &[u8], at: usize, payload_bytes_max: usize) -> Frame<'_> {
    let rest = &buf[at.min(buf.len())..];
    if rest.is_empty() {
        return Frame::End;
    }
    if rest.len() < HEADER_BYTES {
        return Frame::Bad("short header");
    }
    if rest[..4] != MAGIC {
        return Frame::Bad("bad magic");
    }
    let len = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes")) as usize;
    if len > payload_bytes_max {
        return Frame::Bad("length over the limit");
    }
    let Some(payload) = rest.get(HEADER_BYTES..HEADER_BYTES + len) else {
        return Frame::Bad("short payload");
    };
    if rest[8..16] != checksum(payload) {
        return Frame::Bad("bad checksum");
    }
    Frame::Whole {
        payload,
        next: at + HEADER_BYTES + len,
    }
}

/// fsyncs a folder, so that a create or rename in it is durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `dir/name` with one frame of `payload`, atomically: write a
/// temporary file, fsync it, rename it over the old one, fsync the folder.
pub(crate) fn write_file_atomic(dir: &Path, name: &str, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(HEADER_BYTES + payload.len());
    push_frame(&mut buf, payload);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(&buf)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir)
}

/// Reads a file written by [`write_file_atomic`]: `None` if it does not
/// exist, an error if it is not exactly one good frame.
pub(crate) fn read_file(path: &Path, payload_bytes_max: usize) -> io::Result<Option<Vec<u8>>> {
    let buf = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    match read_frame(&buf, 0, payload_bytes_max) {
        Frame::Whole { payload, next } if next == buf.len() => Ok(Some(payload.to_vec())),
        Frame::Whole { .. } => Err(bad_data(path, "trailing bytes")),
        Frame::End => Err(bad_data(path, "empty")),
        Frame::Bad(why) => Err(bad_data(path, why)),
    }
}

pub(crate) fn bad_data(path: &Path, why: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("{}: {why}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_tears_are_found() {
        let mut buf = Vec::new();
        push_frame(&mut buf, b"hello");
        push_frame(&mut buf, b"");
        push_frame(&mut buf, &[7u8; 100]);
        let mut at = 0;
        let mut got = Vec::new();
        while let Frame::Whole { payload, next } = read_frame(&buf, at, 1000) {
            got.push(payload.to_vec());
            at = next;
        }
        assert_eq!(got, vec![b"hello".to_vec(), Vec::new(), vec![7u8; 100]]);
        assert_eq!(read_frame(&buf, at, 1000), Frame::End);
        // Every cut inside the last frame is found.
        let last = at - HEADER_BYTES - 100;
        for cut in last + 1..at {
            assert!(
                matches!(read_frame(&buf[..cut], last, 1000), Frame::Bad(_)),
                "cut {cut}"
            );
        }
        // A flipped payload bit is found.
        let mut bad = buf.clone();
        bad[at - 1] ^= 1;
        assert_eq!(read_frame(&bad, last, 1000), Frame::Bad("bad checksum"));
        // The limit holds.
        assert_eq!(read_frame(&buf, last, 99), Frame::Bad("length over the limit"));
    }
}
