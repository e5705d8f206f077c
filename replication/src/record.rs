//! The on-disk record format of segment files.
//!
//! ```text
//! record  = header payload
//! header  = magic:u32le  payload_len:u32le  checksum:[u8; 32]     (40 bytes)
//! payload = kind:u8  body...
//!   kind 1 (body):   body_hash:[u8; 32]  message bytes
//!   kind 2 (entry, before replica-set versions): bincode(EntryRecord
//!                    without `placed`), read as `placed` 0; no longer written
//!   kind 3 (delete): bincode(DeleteRecord)
//!   kind 4 (commit): batch:u64le      (ends one group commit)
//!   kind 5 (entry, before marks): bincode(EntryRecord without `marks`),
//!                    read with no marks; no longer written
//!   kind 6 (moved):  bincode(DeleteRecord) with `moved` set: this node's
//!                    copy was handed to a newer replica set (kind 3 holds
//!                    the same fields but `moved`, always absent there)
//!   kind 7 (entry):  bincode(EntryRecord), with the folder's and flags'
//!                    versions (`marks`)
//!   kind 8 (body):   as kind 1, but its checksum covers the kind and the
//!                    body hash only: the body is checked against the hash
//!                    (it is its blake3), so it is hashed once when written,
//!                    not twice
//! checksum = blake3(payload); for kind 8 blake3(payload[..33]) and
//!            blake3(message bytes) = body_hash
//! ```
//! A record is valid only if its magic, length and checksum all hold. After
//! an invalid record the reader looks for the next valid one (resync), so
//! one damaged record does not hide the intact ones behind it; an invalid
//! stretch with nothing valid after it is a torn tail. A whole record of a
//! kind this release does not know (or whose content it cannot decode) is
//! not damage but a newer release's: the store refuses to open rather than
//! skip or cut it.
//!
//! # Versions
//! A kind's layout never changes: a new layout is a new kind (as 5 and 7
//! were), read by every later release through a migration to the current
//! entry (`From` below), and written only once the cluster's feature level
//! says every node reads it (membership's `formats`), so a node of the
//! previous release never meets it.
//!
//! The records of one batch take effect only once its commit record is
//! read: a delivery to several mailboxes is all or nothing.

use serde::{Deserialize, Serialize};

use crate::{BodyHash, EntryMeta, MessageId};

pub(crate) const MAGIC: u32 = 0x5155_494c; // "QUIL"
pub(crate) const HEADER_BYTES: usize = 40;
/// The largest payload a record may carry: the largest message Quill accepts
/// (`MESSAGE_BYTES_MAX`) plus room for the kind byte and the body hash. A
/// length above it in a header can only be corruption.
pub(crate) const PAYLOAD_BYTES_MAX: usize = crate::MESSAGE_BYTES_MAX + 1024;

pub(crate) const KIND_BODY: u8 = 1;
pub(crate) const KIND_ENTRY: u8 = 2;
pub(crate) const KIND_DELETE: u8 = 3;
pub(crate) const KIND_COMMIT: u8 = 4;
pub(crate) const KIND_ENTRY_PLACED: u8 = 5;
pub(crate) const KIND_MOVED: u8 = 6;
pub(crate) const KIND_ENTRY_MARKS: u8 = 7;
pub(crate) const KIND_BODY_HASHED: u8 = 8;

/// One mailbox entry: `user` holds the message `meta` describes (its id,
/// the body it names, folder, flags, replica set). Bincode writes a nested
/// struct's fields in line, so this is the same bytes as the flat record
/// kind 7 has always held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct EntryRecord {
    pub user: String,
    pub meta: EntryMeta,
}

/// Kind 5's entry, written before marks: kind 2's, then the replica set's
/// version and earlier members (in line, as bincode writes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MetaV2 {
    v1: MetaV1,
    placed: u64,
    prior: Vec<u64>,
}

/// Kind 2's entry, written before replica sets had versions: without
/// `placed` and `prior`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct MetaV1 {
    id: MessageId,
    body: BodyHash,
    size_bytes: u64,
    arrival_ms: u64,
    folder: String,
    flags: u32,
    replicas: Vec<u64>,
}

/// The migration from kind 2 to kind 5: the set chosen at delivery
/// (version 0), no earlier members.
impl From<MetaV1> for MetaV2 {
    fn from(v1: MetaV1) -> MetaV2 {
        MetaV2 {
            v1,
            placed: 0,
            prior: Vec::new(),
        }
    }
}

/// The migration from kind 5 to kind 7: no folder or flag changes yet.
impl From<MetaV2> for EntryMeta {
    fn from(m: MetaV2) -> EntryMeta {
        let v1 = m.v1;
        EntryMeta {
            id: v1.id,
            body: v1.body,
            size_bytes: v1.size_bytes,
            arrival_ms: v1.arrival_ms,
            folder: v1.folder,
            flags: v1.flags,
            replicas: v1.replicas,
            placed: m.placed,
            prior: m.prior,
            marks: crate::Marks::default(),
        }
    }
}

/// A tombstone: `user` no longer holds message `id`, deleted at hybrid
/// logical clock `hlc`; kept (and copied forward by the cleaner) so that a
/// replica that missed the deletion cannot bring the message back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DeleteRecord {
    pub user: String,
    pub id: MessageId,
    pub hlc: u64,
    pub replicas: Vec<u64>,
    /// Not a deletion but a *move marker*: this node's copy was dropped
    /// because a newer replica set `(set, version)` leaves it out (the
    /// message lives on there). `replicas` are then that set and its
    /// earlier members, the nodes anti-entropy compares it with; `hlc` is
    /// the version. It keeps a copy of an older set from coming back here
    /// and tells older holders the newer set.
    pub moved: Option<(Vec<u64>, u64)>,
}

/// Kind 3: a deletion as written before move markers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DeleteRecordV1 {
    user: String,
    id: MessageId,
    hlc: u64,
    replicas: Vec<u64>,
}

/// What one record says, as read back (and as a segment's summary keeps
/// it: `store::summary`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Decoded {
    Body {
        hash: BodyHash,
        body_offset: u64,
        body_len: u64,
    },
    Entry(EntryRecord),
    Delete(DeleteRecord),
    Commit,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 64 * 1024 }>()
}

/// Appends one complete record (header and payload) to `out`.
fn push_record(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) {
    push_record_summed(out, kind, parts, parts.len());
}

/// [`push_record`] with the checksum over the kind and the first `summed`
/// parts only.
fn push_record_summed(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]], summed: usize) {
    let payload_len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    assert!(
        payload_len <= PAYLOAD_BYTES_MAX,
        "record payload too large: {payload_len}"
    );
    let mut hasher = blake3::Hasher::new();
    hasher.update(&[kind]);
    for p in &parts[..summed] {
        hasher.update(p);
    }
    out.reserve(HEADER_BYTES + payload_len);
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(hasher.finalize().as_bytes());
    out.push(kind);
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Bytes of a body record before its body: header, kind, hash.
pub(crate) const BODY_PREFIX_BYTES: u64 = (HEADER_BYTES + 1 + 32) as u64;

/// Encodes a body record; returns the offset of the message bytes from the
/// start of the record. `hashed`: kind 8, whose checksum leaves the body to
/// its hash (`hash` must be the body's blake3); else kind 1.
pub(crate) fn encode_body(out: &mut Vec<u8>, hash: &BodyHash, body: &[u8], hashed: bool) -> u64 {
    if hashed {
        debug_assert!(BodyHash::of(body) == *hash, "a body record names its body's hash");
        push_record_summed(out, KIND_BODY_HASHED, &[&hash.0, body], 1);
    } else {
        push_record(out, KIND_BODY, &[&hash.0, body]);
    }
    BODY_PREFIX_BYTES
}

pub(crate) fn encode_entry(out: &mut Vec<u8>, entry: &EntryRecord) {
    let bytes = bincode::serde::encode_to_vec(entry, bincode_config()).expect("entry encodes");
    push_record(out, KIND_ENTRY_MARKS, &[&bytes]);
}

pub(crate) fn encode_delete(out: &mut Vec<u8>, delete: &DeleteRecord) {
    if delete.moved.is_some() {
        let bytes = bincode::serde::encode_to_vec(delete, bincode_config()).expect("move encodes");
        push_record(out, KIND_MOVED, &[&bytes]);
        return;
    }
    let v1 = DeleteRecordV1 {
        user: delete.user.clone(),
        id: delete.id,
        hlc: delete.hlc,
        replicas: delete.replicas.clone(),
    };
    let bytes = bincode::serde::encode_to_vec(&v1, bincode_config()).expect("delete encodes");
    push_record(out, KIND_DELETE, &[&bytes]);
}

pub(crate) fn encode_commit(out: &mut Vec<u8>, batch: u64) {
    push_record(out, KIND_COMMIT, &[&batch.to_le_bytes()]);
}

/// What reading a whole segment found besides its valid records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Scan {
    /// Damaged stretches `[start, end)` with valid records after them.
    pub corrupt: Vec<(u64, u64, &'static str)>,
    /// The offset of an invalid stretch that runs to the end of the data
    /// (a torn tail), and why.
    pub torn: Option<(u64, &'static str)>,
    /// A whole record (its checksum holds) this release cannot read: a
    /// kind it does not know, or one whose content does not decode. Not
    /// damage: written by a newer release. Reading stops there; the store
    /// must not open (cutting it off would lose what that release wrote).
    pub unreadable: Option<(u64, u8, &'static str)>,
}

/// Why there is no valid record at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    /// Torn, damaged, or not a record at all.
    Damaged(&'static str),
    /// Whole (its checksum holds), but of a kind or content this release
    /// does not read.
    Unreadable { kind: u8, why: &'static str },
}

/// Reads every valid record of a segment held in `data`, calling `f(offset,
/// record_len, decoded)` for each, skipping damaged stretches.
pub(crate) fn scan(data: &[u8], f: impl FnMut(u64, u64, Decoded)) -> Scan {
    scan_with(data, Bodies::Check, f)
}

/// Whether a scan checks each body against its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bodies {
    Check,
    /// Not hashed again: for a sealed segment, whose records were all
    /// written and synced whole (its summary); every read of a body still
    /// checks it.
    Trust,
}

/// [`scan`], checking bodies or not.
pub(crate) fn scan_with(data: &[u8], bodies: Bodies, mut f: impl FnMut(u64, u64, Decoded)) -> Scan {
    let mut out = Scan::default();
    let mut pos = 0usize;
    let parse_at = |data: &[u8], pos: usize| parse_at(data, pos, bodies);
    while pos < data.len() {
        match parse_at(data, pos) {
            Ok((len, decoded)) => {
                f(pos as u64, len as u64, decoded);
                pos += len;
            }
            Err(Invalid::Unreadable { kind, why }) => {
                out.unreadable = Some((pos as u64, kind, why));
                break;
            }
            Err(_) if data[pos] == 0 && data[pos..].iter().any(|b| *b != 0) => {
                // A dead record the store zeroed to give its space back
                // (`FragmentStore` reclaims dead bodies when the disk is
                // full): skip the zeros to the next record. (A record
                // never starts with a zero byte: the magic does not.) A
                // zero run to the end is a torn tail like any other.
                pos += data[pos..].iter().position(|b| *b != 0).expect("a non-zero byte");
            }
            Err(Invalid::Damaged(why)) => {
                // Resync: the next offset holding the magic and a valid record.
                let next = (pos + 1..data.len().saturating_sub(HEADER_BYTES - 1))
                    .filter(|&q| data[q..q + 4] == MAGIC.to_le_bytes())
                    .find(|&q| !matches!(parse_at(data, q), Err(Invalid::Damaged(_))));
                match next {
                    Some(q) => {
                        out.corrupt.push((pos as u64, q as u64, why));
                        pos = q;
                    }
                    None => {
                        out.torn = Some((pos as u64, why));
                        break;
                    }
                }
            }
        }
    }
    out
}

/// An entry record of an earlier or the current kind: the user, then the
/// entry as that kind wrote it, brought to the current one by `migrate`.
fn entry<M: serde::de::DeserializeOwned>(
    bytes: &[u8],
    migrate: impl Fn(M) -> EntryMeta,
) -> Result<Decoded, &'static str> {
    #[derive(Deserialize)]
    struct Record<M> {
        user: String,
        meta: M,
    }
    match bincode::serde::decode_from_slice::<Record<M>, _>(bytes, bincode_config()) {
        Ok((r, _)) => Ok(Decoded::Entry(EntryRecord {
            user: r.user,
            meta: migrate(r.meta),
        })),
        Err(_) => Err("undecodable entry"),
    }
}

/// Parses the record at `pos`: its length and content, or why it is invalid.
pub(crate) fn parse_at(data: &[u8], pos: usize, bodies: Bodies) -> Result<(usize, Decoded), Invalid> {
    let damaged = Invalid::Damaged;
    {
        if data.len() - pos < HEADER_BYTES {
            return Err(damaged("truncated header"));
        }
        let header = &data[pos..pos + HEADER_BYTES];
        let magic = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(damaged("bad magic"));
        }
        let payload_len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes")) as usize;
        if payload_len == 0 || payload_len > PAYLOAD_BYTES_MAX {
            return Err(damaged("impossible length"));
        }
        if data.len() - pos - HEADER_BYTES < payload_len {
            return Err(damaged("truncated payload"));
        }
        let payload = &data[pos + HEADER_BYTES..pos + HEADER_BYTES + payload_len];
        // A kind 8 body's checksum covers its kind and hash; the body is
        // checked against the hash. (A damaged kind byte fails either way:
        // the sum was taken over another stretch.)
        let summed = if payload[0] == KIND_BODY_HASHED && payload_len >= 33 {
            &payload[..33]
        } else {
            payload
        };
        if blake3::hash(summed).as_bytes() != &header[8..40] {
            return Err(damaged("checksum mismatch"));
        }
        if bodies == Bodies::Check
            && summed.len() < payload.len()
            && blake3::hash(&payload[33..]).as_bytes() != &payload[1..33]
        {
            return Err(damaged("body does not match its hash"));
        }
        let record_len = (HEADER_BYTES + payload_len) as u64;
        let kind = payload[0];
        let unreadable = |why| Invalid::Unreadable { kind, why };
        let decoded = match kind {
            KIND_BODY | KIND_BODY_HASHED if payload.len() >= 33 => Decoded::Body {
                hash: BodyHash(payload[1..33].try_into().expect("32 bytes")),
                body_offset: (pos + HEADER_BYTES + 33) as u64,
                body_len: (payload_len - 33) as u64,
            },
            KIND_ENTRY => entry::<MetaV1>(&payload[1..], |m| EntryMeta::from(MetaV2::from(m))).map_err(unreadable)?,
            KIND_ENTRY_PLACED => entry::<MetaV2>(&payload[1..], EntryMeta::from).map_err(unreadable)?,
            KIND_ENTRY_MARKS => entry::<EntryMeta>(&payload[1..], |m| m).map_err(unreadable)?,
            KIND_MOVED => match bincode::serde::decode_from_slice::<DeleteRecord, _>(&payload[1..], bincode_config()) {
                Ok((d, _)) if d.moved.is_some() => Decoded::Delete(d),
                _ => return Err(unreadable("undecodable move")),
            },
            KIND_DELETE => {
                match bincode::serde::decode_from_slice::<DeleteRecordV1, _>(&payload[1..], bincode_config()) {
                    Ok((d, _)) => Decoded::Delete(DeleteRecord {
                        user: d.user,
                        id: d.id,
                        hlc: d.hlc,
                        replicas: d.replicas,
                        moved: None,
                    }),
                    Err(_) => return Err(unreadable("undecodable delete")),
                }
            }
            KIND_COMMIT if payload.len() == 9 => Decoded::Commit,
            KIND_BODY | KIND_BODY_HASHED | KIND_COMMIT => return Err(unreadable("too short for its kind")),
            _ => return Err(unreadable("a kind this release does not know")),
        };
        Ok((record_len as usize, decoded))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> EntryRecord {
        EntryRecord {
            user: "alice@example.org".into(),
            meta: EntryMeta::delivered(MessageId([7; 16]), BodyHash([9; 32]), 5, 1, "INBOX".into(), vec![1, 2]),
        }
    }

    #[test]
    fn a_trusting_scan_skips_only_the_body_check() {
        let mut buf = Vec::new();
        let body = b"a body of some length";
        let hash = BodyHash(*blake3::hash(body).as_bytes());
        let off = encode_body(&mut buf, &hash, body, true) as usize;
        encode_entry(&mut buf, &entry());
        let count = |data: &[u8], b: Bodies| {
            let mut n = 0;
            let found = scan_with(data, b, |_, _, _| n += 1);
            (n, found == Scan::default())
        };
        assert_eq!(count(&buf, Bodies::Check), (2, true));
        assert_eq!(count(&buf, Bodies::Trust), (2, true));
        // A body byte flipped: the checking scan finds it, the trusting
        // one does not (a read of that body would).
        let mut flipped = buf.clone();
        flipped[off] ^= 1;
        assert!(!count(&flipped, Bodies::Check).1);
        assert_eq!(count(&flipped, Bodies::Trust), (2, true));
        // A header byte flipped: both find it.
        let mut header = buf.clone();
        header[10] ^= 1;
        assert!(!count(&header, Bodies::Check).1);
        assert!(!count(&header, Bodies::Trust).1);
    }

    #[test]
    fn round_trip_and_torn_tail() {
        let mut buf = Vec::new();
        let body = b"hello";
        let hash = BodyHash(*blake3::hash(body).as_bytes());
        let off = encode_body(&mut buf, &hash, body, false);
        encode_entry(&mut buf, &entry());
        let full = buf.len();
        encode_delete(
            &mut buf,
            &DeleteRecord {
                user: "alice@example.org".into(),
                id: MessageId([7; 16]),
                hlc: 1 << 16,
                replicas: vec![1, 2],
                moved: None,
            },
        );
        let mut seen = Vec::new();
        assert_eq!(
            scan(&buf, |o, l, d| seen.push((o, l, format!("{d:?}")))),
            Scan::default()
        );
        assert_eq!(seen.len(), 3);
        assert_eq!(&buf[off as usize..off as usize + 5], body);
        // Every cut inside the last record stops exactly at its start.
        for cut in full + 1..buf.len() {
            let mut n = 0;
            let stop = scan(&buf[..cut], |_, _, _| n += 1);
            assert_eq!(n, 2);
            assert!(
                matches!(stop.torn, Some((offset, _)) if offset == full as u64),
                "{stop:?}"
            );
            assert!(stop.corrupt.is_empty());
        }
        // A flipped bit anywhere in the last record is detected.
        for i in full..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            let mut n = 0;
            assert!(scan(&bad, |_, _, _| n += 1).torn.is_some());
            assert_eq!(n, 2);
        }
        // A damaged record in the middle is skipped; the ones after it are read.
        let mut bad = buf.clone();
        bad[off as usize + 1] ^= 0x01;
        let mut kinds = Vec::new();
        let found = scan(&bad, |_, _, d| kinds.push(format!("{d:?}")));
        assert_eq!(kinds.len(), 2, "{kinds:?}");
        assert!(kinds[0].starts_with("Entry") && kinds[1].starts_with("Delete"));
        assert_eq!(found.corrupt.len(), 1);
        assert_eq!(found.torn, None);
    }

    /// A kind 8 body (checksum over kind and hash, the body checked against
    /// its hash) reads as a kind 1 body does; a flipped bit anywhere in it,
    /// the body included, and every cut inside it are found.
    #[test]
    fn a_body_hashed_once_reads_back_and_any_damage_is_found() {
        let body = b"a message body long enough to span a few bytes of checks";
        let hash = BodyHash::of(body);
        let mut buf = Vec::new();
        let off = encode_body(&mut buf, &hash, body, true);
        let full = buf.len();
        encode_entry(&mut buf, &entry());
        assert_eq!(buf[HEADER_BYTES], KIND_BODY_HASHED);
        let mut seen = Vec::new();
        assert_eq!(scan(&buf, |_, l, d| seen.push((l, format!("{d:?}")))), Scan::default());
        assert_eq!(seen.len(), 2);
        let mut plain = Vec::new();
        encode_body(&mut plain, &hash, body, false);
        let mut plain_seen = Vec::new();
        scan(&plain, |_, l, d| plain_seen.push((l, format!("{d:?}"))));
        assert_eq!(seen[0], plain_seen[0], "the same record length and content as kind 1");
        assert_eq!(&buf[off as usize..off as usize + body.len()], body);
        for i in 0..full {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            let mut bodies = 0;
            scan(&bad, |_, _, d| bodies += usize::from(matches!(d, Decoded::Body { .. })));
            assert_eq!(bodies, 0, "a flipped bit at {i} is found");
        }
        for cut in 1..full {
            let mut n = 0;
            let stop = scan(&buf[..cut], |_, _, _| n += 1);
            assert_eq!((n, stop.torn.map(|t| t.0)), (0, Some(0)), "cut at {cut}");
        }
    }

    /// A whole record of a kind this release does not know (a newer
    /// release's) is neither skipped as damage nor cut as a torn tail:
    /// reading stops there and says so.
    #[test]
    fn a_newer_kind_stops_the_scan_instead_of_being_skipped_or_cut() {
        let mut buf = Vec::new();
        encode_entry(&mut buf, &entry());
        let at = buf.len();
        push_record(&mut buf, 42, &[b"a record of a later release"]);
        encode_entry(&mut buf, &entry());
        let mut n = 0;
        let found = scan(&buf, |_, _, _| n += 1);
        assert_eq!(n, 1, "the records before it are read");
        assert_eq!(
            found.unreadable,
            Some((at as u64, 42, "a kind this release does not know"))
        );
        assert!(found.corrupt.is_empty() && found.torn.is_none(), "{found:?}");
        // The same at the very end: not a torn tail either.
        let mut tail = Vec::new();
        encode_entry(&mut tail, &entry());
        push_record(&mut tail, 8, &[b"x"]);
        let found = scan(&tail, |_, _, _| {});
        assert!(found.torn.is_none() && found.unreadable.is_some(), "{found:?}");
        // A known kind whose content does not decode, checksum intact.
        let mut odd = Vec::new();
        push_record(&mut odd, KIND_ENTRY_MARKS, &[&[0xff; 3]]);
        assert!(scan(&odd, |_, _, _| {}).unreadable.is_some());
    }

    #[test]
    fn old_entries_read_as_placed_zero_and_move_markers_round_trip() {
        let e = entry();
        let m = &e.meta;
        // Kind 2 as an earlier build wrote it: the user, then the entry
        // without `placed`, `prior` or `marks`.
        let old = (
            e.user.clone(),
            MetaV1 {
                id: m.id,
                body: m.body,
                size_bytes: m.size_bytes,
                arrival_ms: m.arrival_ms,
                folder: m.folder.clone(),
                flags: m.flags,
                replicas: m.replicas.clone(),
            },
        );
        let mut buf = Vec::new();
        let bytes = bincode::serde::encode_to_vec(&old, bincode_config()).expect("encodes");
        push_record(&mut buf, KIND_ENTRY, &[&bytes]);
        // Kind 5 (before marks) reads with no marks.
        let v2 = (
            e.user.clone(),
            MetaV2 {
                placed: 77,
                prior: vec![4],
                ..MetaV2::from(old.1.clone())
            },
        );
        let bytes = bincode::serde::encode_to_vec(&v2, bincode_config()).expect("encodes");
        push_record(&mut buf, KIND_ENTRY_PLACED, &[&bytes]);
        let placed = EntryRecord {
            meta: EntryMeta {
                placed: 77,
                prior: vec![4],
                ..entry().meta
            },
            ..entry()
        };
        let marked = EntryRecord {
            meta: EntryMeta {
                folder: "f1".into(),
                marks: crate::Marks {
                    folder_hlc: 5,
                    flags: vec![crate::FlagMark {
                        name: "\\Seen".into(),
                        set: true,
                        hlc: 6,
                    }],
                },
                ..placed.meta.clone()
            },
            ..placed.clone()
        };
        encode_entry(&mut buf, &marked);
        let moved = DeleteRecord {
            user: e.user.clone(),
            id: m.id,
            hlc: 99,
            replicas: vec![2],
            moved: Some((vec![1, 3], 99)),
        };
        encode_delete(&mut buf, &moved);
        let mut seen = Vec::new();
        assert_eq!(scan(&buf, |_, _, d| seen.push(d)), Scan::default());
        assert!(matches!(&seen[0], Decoded::Entry(r) if *r == e), "{:?}", seen[0]);
        assert!(matches!(&seen[1], Decoded::Entry(r) if *r == placed), "{:?}", seen[1]);
        assert!(matches!(&seen[2], Decoded::Entry(r) if *r == marked), "{:?}", seen[2]);
        assert!(matches!(&seen[3], Decoded::Delete(d) if *d == moved), "{:?}", seen[3]);
    }
}
