//! mbox, as `quill admin export` writes it and `quill admin import` reads
//! it: mboxrd (a line of the message that starts with `>*From ` gets one
//! more `>`, taken off again on reading), one message after another, each
//! after a `From ` line and followed by one `\n`.
//!
//! Quill's own exports carry a block of header lines in front of each
//! message, ending with `X-Quill-Size`: the folder (`X-Quill-Folder`), the
//! flags (`Status: RO`, `X-Status: AFTD` as mutt and Dovecot write them,
//! `X-Keywords`) and the message's exact size. The reader takes the block
//! off again, so the message stored is byte for byte the one exported
//! (CRLF or LF, with or without a last line end), and a message shorter
//! than its size says (a truncated file) is refused. Other mbox files are
//! read too: their `Status`, `X-Status` and `X-Keywords` headers give the
//! flags, and their bytes are kept as they are.
//!
//! Everything read is bounded: a line at most `line_max` bytes, a message
//! at most `message_max`; the reader holds one message at a time whatever
//! the file's size.

use std::fmt::Write as _;

/// The header that ends Quill's block of added lines, with the message's
/// size.
const SIZE_HEADER: &str = "X-Quill-Size";
const FOLDER_HEADER: &str = "X-Quill-Folder";
/// Bytes Quill's added block may take at most (a folder name of 255
/// bytes, 64 keywords of 64 bytes, and the rest).
const BLOCK_BYTES_MAX: usize = 8 * 1024;
/// Keywords one message keeps at most (as `replication::marks`).
pub const KEYWORDS_MAX: usize = 64;
/// Longest keyword, in bytes.
pub const KEYWORD_BYTES_MAX: usize = 64;

/// A message's folder, flags and arrival, as exported beside its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Meta {
    /// The folder's name (`INBOX`, `Archive/2026`).
    pub folder: String,
    /// The flags set: system flags with their backslash (`\Seen`), keywords
    /// as they are.
    pub flags: Vec<String>,
    pub arrival_ms: u64,
}

/// One message read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// The folder Quill's block named (`None` for a foreign mbox).
    pub folder: Option<String>,
    pub flags: Vec<String>,
    /// From the `From ` line, when it has a date.
    pub arrival_ms: Option<u64>,
    /// The message, unquoted, as it was before export.
    pub body: Vec<u8>,
}

/// Why a file cannot be read as mbox (`line`: counted from 1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MboxError {
    #[error("not an mbox file: it must start with a \"From \" line")]
    NotMbox,
    #[error("line {line} is longer than {max} bytes")]
    LineTooLong { line: u64, max: usize },
    #[error("the message starting at line {line} is larger than {max} bytes")]
    MessageTooBig { line: u64, max: usize },
    #[error("the message starting at line {line} is truncated: {got} of its {size} bytes")]
    Truncated { line: u64, got: usize, size: usize },
    #[error("the message starting at line {line} has a bad {header} header")]
    BadHeader { line: u64, header: &'static str },
}

/// Appends one message in mboxrd form to `out`: its `From ` line, Quill's
/// block, the message quoted, and the `\n` that separates it from the next.
pub fn write(out: &mut Vec<u8>, meta: &Meta, body: &[u8]) {
    out.reserve(body.len() + 256);
    let _ = writeln!(Buf(out), "From MAILER-DAEMON {}", asctime(meta.arrival_ms));
    let mut status = String::from("O");
    let mut x_status = String::new();
    let mut keywords: Vec<&str> = Vec::new();
    for f in &meta.flags {
        match f.to_ascii_lowercase().as_str() {
            "\\seen" => status.insert(0, 'R'),
            "\\answered" => x_status.push('A'),
            "\\flagged" => x_status.push('F'),
            "\\draft" => x_status.push('T'),
            "\\deleted" => x_status.push('D'),
            _ if !f.starts_with('\\') && keyword_ok(f) => keywords.push(f),
            _ => {}
        }
    }
    let b = &mut Buf(out);
    let _ = writeln!(b, "{FOLDER_HEADER}: {}", meta.folder);
    let _ = writeln!(b, "Status: {status}");
    if !x_status.is_empty() {
        let _ = writeln!(b, "X-Status: {x_status}");
    }
    if !keywords.is_empty() {
        let _ = writeln!(b, "X-Keywords: {}", keywords.join(" "));
    }
    let _ = writeln!(b, "{SIZE_HEADER}: {}", body.len());
    let mut rest = body;
    while !rest.is_empty() {
        let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |i| i + 1);
        let (line, tail) = rest.split_at(end);
        if is_from_line(line) {
            out.push(b'>');
        }
        out.extend_from_slice(line);
        rest = tail;
    }
    out.push(b'\n');
}

struct Buf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// `>*From `: a line mboxrd quotes.
fn is_from_line(line: &[u8]) -> bool {
    let start = line.iter().position(|b| *b != b'>').unwrap_or(line.len());
    line[start..].starts_with(b"From ")
}

/// A keyword that can travel in `X-Keywords` (IMAP's atom, bounded).
pub fn keyword_ok(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= KEYWORD_BYTES_MAX
        && k.bytes().all(|b| {
            b.is_ascii_graphic() && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']' | b',')
        })
}

/// The `From ` line's date: `Thu Jan  1 00:00:00 1970` (UTC).
fn asctime(ms: u64) -> String {
    let t = chrono::DateTime::from_timestamp((ms / 1000) as i64, 0).unwrap_or_default();
    t.format("%a %b %e %H:%M:%S %Y").to_string()
}

/// The date of a `From ` line (`From sender DATE`), if it has one.
fn from_line_date(line: &[u8]) -> Option<u64> {
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let words: Vec<&str> = line.split_whitespace().collect();
    // From, the sender, then five words of date (a zone may follow).
    let date = words.get(2..7)?.join(" ");
    let t = chrono::NaiveDateTime::parse_from_str(&date, "%a %b %e %H:%M:%S %Y").ok()?;
    u64::try_from(t.and_utc().timestamp_millis()).ok()
}

/// Reads mbox from bytes offered in any chunking, one message at a time.
#[derive(Debug)]
pub struct Reader {
    message_max: usize,
    line_max: usize,
    /// A line that crossed chunks.
    partial: Vec<u8>,
    /// The message being read: its lines unquoted, and where it started.
    current: Option<(Vec<u8>, u64, Option<u64>)>,
    /// Lines read so far.
    lines: u64,
    /// Any byte read at all.
    seen: bool,
}

impl Reader {
    /// A reader refusing lines over `line_max` and messages over
    /// `message_max` bytes.
    pub fn new(message_max: usize, line_max: usize) -> Self {
        Reader {
            message_max,
            line_max: line_max.max(80),
            partial: Vec::new(),
            current: None,
            lines: 0,
            seen: false,
        }
    }

    /// Takes `chunk`, adding the messages it completes to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<Parsed>) -> Result<(), MboxError> {
        self.seen |= !chunk.is_empty();
        while !chunk.is_empty() {
            match memchr::memchr(b'\n', chunk) {
                Some(i) => {
                    let (line, rest) = chunk.split_at(i + 1);
                    chunk = rest;
                    if self.partial.is_empty() {
                        self.check_line(line.len())?;
                        self.line(line, out)?;
                    } else {
                        self.check_line(self.partial.len() + line.len())?;
                        let mut whole = std::mem::take(&mut self.partial);
                        whole.extend_from_slice(line);
                        self.line(&whole, out)?;
                    }
                }
                None => {
                    self.check_line(self.partial.len() + chunk.len())?;
                    self.partial.extend_from_slice(chunk);
                    chunk = &[];
                }
            }
        }
        Ok(())
    }

    /// The end of the file: adds the last message, if any, to `out`.
    pub fn finish(&mut self, out: &mut Vec<Parsed>) -> Result<(), MboxError> {
        if !self.partial.is_empty() {
            let last = std::mem::take(&mut self.partial);
            self.line(&last, out)?;
        }
        if self.seen {
            out.extend(self.end_message()?);
        }
        Ok(())
    }

    fn check_line(&self, len: usize) -> Result<(), MboxError> {
        if len > self.line_max {
            return Err(MboxError::LineTooLong {
                line: self.lines + 1,
                max: self.line_max,
            });
        }
        Ok(())
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Parsed>) -> Result<(), MboxError> {
        self.lines += 1;
        if line.starts_with(b"From ") {
            if self.current.is_some() {
                out.extend(self.end_message()?);
            }
            self.current = Some((Vec::new(), self.lines, from_line_date(line)));
            return Ok(());
        }
        let Some((msg, start, _)) = self.current.as_mut() else {
            return Err(MboxError::NotMbox);
        };
        let line = if line.starts_with(b">") && is_from_line(line) {
            &line[1..]
        } else {
            line
        };
        if msg.len() + line.len() > self.message_max + BLOCK_BYTES_MAX {
            return Err(MboxError::MessageTooBig {
                line: *start,
                max: self.message_max,
            });
        }
        msg.extend_from_slice(line);
        Ok(())
    }

    fn end_message(&mut self) -> Result<Option<Parsed>, MboxError> {
        let Some((mut raw, start, arrival_ms)) = self.current.take() else {
            return Err(MboxError::NotMbox);
        };
        // The separator after the message.
        if raw.last() == Some(&b'\n') {
            raw.pop();
        }
        let mut p = match own_block(&raw, start)? {
            Some((folder, flags, size, skip)) => {
                let got = raw.len() - skip;
                if got != size {
                    return Err(MboxError::Truncated { line: start, got, size });
                }
                raw.drain(..skip);
                Parsed {
                    folder: Some(folder),
                    flags,
                    arrival_ms,
                    body: raw,
                }
            }
            // A foreign message with nothing in it: what is left of a
            // file cut just after a `From ` line.
            None if raw.is_empty() => {
                return Err(MboxError::Truncated {
                    line: start,
                    got: 0,
                    size: 0,
                });
            }
            None => Parsed {
                folder: None,
                flags: foreign_flags(&raw),
                arrival_ms,
                body: raw,
            },
        };
        if p.body.len() > self.message_max {
            return Err(MboxError::MessageTooBig {
                line: start,
                max: self.message_max,
            });
        }
        p.flags.truncate(KEYWORDS_MAX + 5);
        Ok(Some(p))
    }
}

/// Quill's block of added headers: the folder, flags, the message's size
/// and the block's own length.
type OwnBlock = (String, Vec<String>, usize, usize);

/// Quill's block at the start of `raw`; `None` if `raw` does not start
/// with one.
fn own_block(raw: &[u8], start: u64) -> Result<Option<OwnBlock>, MboxError> {
    if !raw.starts_with(FOLDER_HEADER.as_bytes()) {
        return Ok(None);
    }
    let mut at = 0;
    let (mut folder, mut flags) = (None, Vec::new());
    for _ in 0..6 {
        let Some(end) = memchr::memchr(b'\n', &raw[at..]).map(|i| at + i) else {
            return Err(MboxError::Truncated {
                line: start,
                got: raw.len(),
                size: 0,
            });
        };
        let line = std::str::from_utf8(&raw[at..end]).map_err(|_| MboxError::BadHeader {
            line: start,
            header: FOLDER_HEADER,
        })?;
        at = end + 1;
        let Some((name, value)) = line.split_once(": ") else {
            break;
        };
        match name {
            FOLDER_HEADER => folder = Some(value.to_owned()),
            "Status" => flags.extend(status_flags(value)),
            "X-Status" => flags.extend(x_status_flags(value)),
            "X-Keywords" => flags.extend(keywords(value)),
            SIZE_HEADER => {
                let size = value.parse().map_err(|_| MboxError::BadHeader {
                    line: start,
                    header: SIZE_HEADER,
                })?;
                let folder = folder.ok_or(MboxError::BadHeader {
                    line: start,
                    header: FOLDER_HEADER,
                })?;
                return Ok(Some((folder, flags, size, at)));
            }
            _ => break,
        }
    }
    Err(MboxError::BadHeader {
        line: start,
        header: SIZE_HEADER,
    })
}

fn status_flags(v: &str) -> Vec<String> {
    if v.contains('R') {
        vec!["\\Seen".to_owned()]
    } else {
        Vec::new()
    }
}

fn x_status_flags(v: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (c, f) in [
        ('A', "\\Answered"),
        ('F', "\\Flagged"),
        ('T', "\\Draft"),
        ('D', "\\Deleted"),
    ] {
        if v.contains(c) {
            out.push(f.to_owned());
        }
    }
    out
}

fn keywords(v: &str) -> Vec<String> {
    v.split([' ', ',', '\t'])
        .filter(|k| keyword_ok(k))
        .take(KEYWORDS_MAX)
        .map(str::to_owned)
        .collect()
}

/// The flags a foreign mbox's `Status`, `X-Status` and `X-Keywords`
/// headers give (in the header section only).
fn foreign_flags(raw: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(end) = memchr::memchr(b'\n', &raw[at..]).map(|i| at + i) {
        let line = &raw[at..end];
        at = end + 1;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Ok(line) = std::str::from_utf8(line) else { continue };
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.to_ascii_lowercase().as_str() {
            "status" => out.extend(status_flags(value)),
            "x-status" => out.extend(x_status_flags(value)),
            "x-keywords" => out.extend(keywords(value)),
            _ => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn read_all(bytes: &[u8], chunk: usize) -> Result<Vec<Parsed>, MboxError> {
        let mut r = Reader::new(1 << 20, 1 << 16);
        let mut out = Vec::new();
        for c in bytes.chunks(chunk.max(1)) {
            r.push(c, &mut out)?;
        }
        r.finish(&mut out)?;
        Ok(out)
    }

    fn meta(folder: &str, flags: &[&str]) -> Meta {
        Meta {
            folder: folder.to_owned(),
            flags: flags.iter().map(|s| s.to_string()).collect(),
            arrival_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn round_trip_keeps_bytes_folder_and_flags() {
        let msgs: Vec<(Meta, &[u8])> = vec![
            (
                meta("INBOX", &["\\Seen", "\\Flagged", "$Forwarded"]),
                b"Subject: a\r\n\r\nFrom here\r\n>From there\r\nbye\r\n",
            ),
            (meta("Archive/2026", &[]), b"Subject: b\n\nno end"),
            (meta("Drafts", &["\\Draft", "\\Answered", "\\Deleted"]), b""),
            (meta("Sent", &["\\Seen"]), b"Subject: c\n\n\n\n"),
        ];
        let mut file = Vec::new();
        for (m, b) in &msgs {
            write(&mut file, m, b);
        }
        for chunk in [1, 3, 7, 4096] {
            let got = read_all(&file, chunk).unwrap();
            assert_eq!(got.len(), msgs.len());
            for (p, (m, b)) in got.iter().zip(&msgs) {
                assert_eq!(p.body, *b);
                assert_eq!(p.folder.as_deref(), Some(m.folder.as_str()));
                let mut want = m.flags.clone();
                want.sort();
                let mut flags = p.flags.clone();
                flags.sort();
                assert_eq!(flags, want);
                assert_eq!(p.arrival_ms, Some(1_700_000_000_000));
            }
        }
    }

    #[test]
    fn from_lines_are_quoted() {
        let mut file = Vec::new();
        write(&mut file, &meta("INBOX", &[]), b"a\nFrom x\n>From y\nFromage\n");
        let text = String::from_utf8(file).unwrap();
        assert!(text.contains("\n>From x\n>>From y\nFromage\n"), "{text}");
    }

    #[test]
    fn foreign_mbox_gives_flags_and_keeps_bytes() {
        let file = b"From a@b Thu Jan  1 00:00:00 1970\nStatus: RO\nX-Status: F\nX-Keywords: Junk $Label1\nSubject: x\n\n>From me\n\nFrom c@d Sat Jan  3 00:00:00 1970\nSubject: y\n\nhi\n\n";
        let got = read_all(file, 5).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].folder, None);
        assert_eq!(got[0].flags, vec!["$Label1", "Junk", "\\Flagged", "\\Seen"]);
        assert!(got[0].body.ends_with(b"\nFrom me\n"));
        assert_eq!(got[0].arrival_ms, Some(0));
        assert_eq!(got[1].body, b"Subject: y\n\nhi\n");
        assert_eq!(got[1].arrival_ms, Some(2 * 86_400_000));
    }

    #[test]
    fn not_mbox_is_refused() {
        assert_eq!(read_all(b"Subject: hi\n\nbody\n", 64), Err(MboxError::NotMbox));
        assert_eq!(read_all(b"\x00\x01\x02", 64), Err(MboxError::NotMbox));
        assert_eq!(read_all(b"", 64), Ok(vec![]));
    }

    #[test]
    fn truncated_file_is_refused() {
        let mut file = Vec::new();
        write(&mut file, &meta("INBOX", &[]), b"Subject: a\n\nline one\nline two\n");
        for cut in [file.len() - 1, file.len() - 5, file.len() - 20] {
            match read_all(&file[..cut], 64) {
                Err(MboxError::Truncated { .. }) => {}
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn long_line_and_big_message_are_refused() {
        let mut file = b"From x Thu Jan  1 00:00:00 1970\n".to_vec();
        file.extend(std::iter::repeat_n(b'a', 100_000));
        assert!(matches!(
            read_all(&file, 4096),
            Err(MboxError::LineTooLong { line: 2, .. })
        ));
        let mut file = b"From x Thu Jan  1 00:00:00 1970\n".to_vec();
        for _ in 0..40_000 {
            file.extend_from_slice(b"a line of forty bytes, and some more...\n");
        }
        assert!(matches!(
            read_all(&file, 4096),
            Err(MboxError::MessageTooBig { line: 1, .. })
        ));
    }

    #[test]
    fn bad_size_header_is_refused() {
        let file = b"From x Thu Jan  1 00:00:00 1970\nX-Quill-Folder: INBOX\nX-Quill-Size: lots\n\nhi\n";
        assert!(matches!(read_all(file, 64), Err(MboxError::BadHeader { .. })));
    }

    proptest! {
        #[test]
        fn any_messages_round_trip(
            bodies in proptest::collection::vec(
                proptest::collection::vec(
                    prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'>'), Just(b'F'), Just(b'r'), Just(b'o'),
                                Just(b'm'), Just(b' '), any::<u8>()],
                    0..200),
                1..6),
            chunk in 1usize..64,
        ) {
            let mut file = Vec::new();
            for b in &bodies {
                write(&mut file, &meta("INBOX", &["\\Seen"]), b);
            }
            let got = read_all(&file, chunk).unwrap();
            prop_assert_eq!(got.len(), bodies.len());
            for (p, b) in got.iter().zip(&bodies) {
                prop_assert_eq!(&p.body, b);
            }
        }

        #[test]
        fn the_fuzz_entry_holds_on_mbox_like_input(
            bytes in proptest::collection::vec(
                prop_oneof![Just(b'\n'), Just(b'\r'), Just(b'>'), Just(b':'), Just(b' '), any::<u8>(),
                            Just(b'F'), Just(b'X'), Just(b'R')],
                0..400),
        ) {
            let mut input = b"From x Thu Jan  1 00:00:00 1970\nX-Quill-Folder: INBOX\nStatus: R\n".to_vec();
            input.extend_from_slice(&bytes);
            crate::fuzz::mbox(&input);
            crate::fuzz::mbox(&input[32..]);
        }

        #[test]
        fn any_input_is_read_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512), chunk in 1usize..64) {
            let _ = read_all(&bytes, chunk);
        }
    }
}
