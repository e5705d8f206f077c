//! Where the part a section names lies in its message (RFC 3501 6.4.5),
//! found on the message's bytes: boundaries are looked for line by line
//! within the enclosing part, so every part found is a range of the
//! message, bounded by its parent's. Only the header fields that say what
//! a part is (Content-Type, Content-Transfer-Encoding) are parsed, by
//! mail-parser.
//!
//! Numbering: the parts of a multipart are numbered from 1; a message
//! that is not multipart has one part, 1, its body. A message/rfc822 part
//! `N` encapsulates a message, whose parts are `N.1`, `N.2`, … (`N.1` its
//! body if it is not multipart); `N.HEADER` and `N.TEXT` are that
//! message's header and text, `N.MIME` the header of part `N` itself.

use std::num::NonZeroU32;
use std::ops::Range;

use mail_parser::{MessageParser, MimeHeaders};

use crate::message::header_end;

/// Part numbers followed at most (a hostile message may nest deeply).
const DEPTH_MAX: usize = 32;

/// A MIME entity: a part, or a message. `start..body` is its header (with
/// the empty line that ends it), `body..end` its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entity {
    pub start: usize,
    pub body: usize,
    pub end: usize,
}

impl Entity {
    /// The entity in `range` of `raw` (clamped to it): its header runs to
    /// the first empty line, or through all of it.
    fn new(raw: &[u8], range: Range<usize>) -> Entity {
        let end = range.end.min(raw.len());
        let start = range.start.min(end);
        Entity {
            start,
            body: start + header_end(&raw[start..end]),
            end,
        }
    }

    pub fn header(&self) -> Range<usize> {
        self.start..self.body
    }

    pub fn text(&self) -> Range<usize> {
        self.body..self.end
    }
}

/// What an entity's body is.
enum Kind {
    Multipart {
        boundary: Vec<u8>,
        digest: bool,
    },
    /// An encapsulated message (message/rfc822, not base64 or
    /// quoted-printable encoded: that one is a leaf).
    Message,
    Leaf,
}

/// The kind of `e`, by its Content-Type (a part of a multipart/digest
/// without one is a message/rfc822, RFC 2046 5.1.5).
fn kind(raw: &[u8], e: Entity, in_digest: bool) -> Kind {
    let parsed = MessageParser::default().parse_headers(&raw[e.header()]);
    let part = parsed.as_ref().and_then(|m| m.parts.first());
    let plain = || {
        part.and_then(|p| p.content_transfer_encoding()).is_none_or(|enc| {
            ["7bit", "8bit", "binary"]
                .iter()
                .any(|k| enc.trim().eq_ignore_ascii_case(k))
        })
    };
    let message = || if plain() { Kind::Message } else { Kind::Leaf };
    let Some(ct) = part.and_then(|p| p.content_type()) else {
        return if in_digest { message() } else { Kind::Leaf };
    };
    let subtype = ct.subtype().unwrap_or_default();
    if ct.ctype().eq_ignore_ascii_case("multipart") {
        match ct.attribute("boundary") {
            Some(b) if !b.is_empty() => Kind::Multipart {
                boundary: b.as_bytes().to_vec(),
                digest: subtype.eq_ignore_ascii_case("digest"),
            },
            _ => Kind::Leaf,
        }
    } else if ct.ctype().eq_ignore_ascii_case("message")
        && (subtype.eq_ignore_ascii_case("rfc822") || subtype.eq_ignore_ascii_case("global"))
    {
        message()
    } else {
        Kind::Leaf
    }
}

/// The delimiter lines of `boundary` in `range`: where each starts, where
/// the line after it starts, and whether it is the close delimiter.
/// `--boundary` may be followed by blanks (RFC 2046's transport padding).
fn delimiters<'a>(
    raw: &'a [u8],
    range: Range<usize>,
    boundary: &'a [u8],
) -> impl Iterator<Item = (usize, usize, bool)> + 'a {
    let end = range.end.min(raw.len());
    let mut pos = range.start.min(end);
    std::iter::from_fn(move || {
        while pos < end {
            let line_start = pos;
            pos = raw[pos..end]
                .iter()
                .position(|c| *c == b'\n')
                .map_or(end, |p| pos + p + 1);
            let Some(rest) = raw[line_start..pos]
                .strip_prefix(b"--")
                .and_then(|l| l.strip_prefix(boundary))
            else {
                continue;
            };
            let (close, rest) = match rest.strip_prefix(b"--") {
                Some(r) => (true, r),
                None => (false, rest),
            };
            if rest.iter().all(u8::is_ascii_whitespace) {
                return Some((line_start, pos, close));
            }
        }
        None
    })
}

/// The `n`th part (from 1) of the multipart entity `e`: from the line
/// after its delimiter to the line break before the next delimiter (or
/// the end of `e`, the close delimiter missing).
fn child(raw: &[u8], e: Entity, boundary: &[u8], n: usize) -> Option<Entity> {
    let mut found = delimiters(raw, e.text(), boundary);
    let mut k = 0;
    while let Some((_, start, close)) = found.next() {
        if close {
            return None;
        }
        k += 1;
        if k == n {
            let end = match found.next() {
                Some((line, _, _)) => {
                    let mut end = line;
                    if end > start && raw[end - 1] == b'\n' {
                        end -= 1;
                        if end > start && raw[end - 1] == b'\r' {
                            end -= 1;
                        }
                    }
                    end
                }
                None => e.end,
            };
            return Some(Entity::new(raw, start..end.max(start)));
        }
    }
    None
}

/// The part `path` names in the message `raw`, and the message it
/// encapsulates if it is a message/rfc822 part. `None`: no such part.
pub fn find(raw: &[u8], path: &[NonZeroU32]) -> Option<(Entity, Option<Entity>)> {
    if path.is_empty() || path.len() > DEPTH_MAX {
        return None;
    }
    // What the next number counts in: a message, or a multipart part.
    let mut within = Entity::new(raw, 0..raw.len());
    let mut within_kind = kind(raw, within, false);
    for (i, n) in path.iter().enumerate() {
        let n = n.get() as usize;
        let (part, part_kind) = match within_kind {
            Kind::Multipart { ref boundary, digest } => {
                let c = child(raw, within, boundary, n)?;
                (c, kind(raw, c, digest))
            }
            // A message that is not multipart: its one part is itself.
            _ if n == 1 => (within, within_kind),
            _ => return None,
        };
        let inner = matches!(part_kind, Kind::Message).then(|| Entity::new(raw, part.text()));
        if i + 1 == path.len() {
            return Some((part, inner));
        }
        (within, within_kind) = match (part_kind, inner) {
            (k @ Kind::Multipart { .. }, _) => (part, k),
            (_, Some(m)) => (m, kind(raw, m, false)),
            _ => return None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &[u32]) -> Vec<NonZeroU32> {
        p.iter().map(|n| NonZeroU32::new(*n).unwrap()).collect()
    }

    fn part<'a>(raw: &'a [u8], p: &[u32]) -> Option<&'a [u8]> {
        find(raw, &path(p)).map(|(e, _)| &raw[e.text()])
    }

    #[test]
    fn parts_of_nested_multiparts() {
        let m = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n\r\none\r\n--a\r\nContent-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n\r\ntwo.one\r\n--b\r\n\r\ntwo.two\r\n--b--\r\n--a--\r\n";
        assert_eq!(part(m, &[1]), Some(&b"one"[..]));
        assert_eq!(part(m, &[2, 1]), Some(&b"two.one"[..]));
        assert_eq!(part(m, &[2, 2]), Some(&b"two.two"[..]));
        assert_eq!(part(m, &[2, 3]), None);
        assert_eq!(part(m, &[3]), None);
        assert_eq!(part(m, &[1, 1]), None);
    }

    #[test]
    fn a_missing_close_delimiter_ends_at_the_parent_and_junk_is_no_part() {
        let m = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n\r\none\r\n--a\r\n\r\ntwo\r\n";
        assert_eq!(part(m, &[2]), Some(&b"two\r\n"[..]));
        // A boundary that only begins a longer word is no delimiter.
        let m = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n\r\none\r\n--ab\r\n--a--";
        assert_eq!(part(m, &[1]), Some(&b"one\r\n--ab"[..]));
        // Delimiters next to each other: an empty part.
        let m = b"Content-Type: multipart/mixed; boundary=a\r\n\r\n--a\r\n--a\r\n";
        assert_eq!(part(m, &[1]), Some(&b""[..]));
        for junk in [
            &b""[..],
            b"\r\n",
            b"--",
            b"Content-Type: multipart/x; boundary=\"\"\r\n\r\n--\r\n",
        ] {
            for p in [&[1][..], &[1, 1], &[2, 1, 1]] {
                if let Some((e, inner)) = find(junk, &path(p)) {
                    assert!(e.start <= e.body && e.body <= e.end && e.end <= junk.len());
                    assert!(inner.is_none_or(|i| i.end <= junk.len()));
                }
            }
        }
    }

    #[test]
    fn an_encoded_message_is_a_leaf() {
        let m =
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nU3ViamVjdDogeA0KDQp4DQo=\r\n";
        let (e, inner) = find(m, &path(&[1])).unwrap();
        assert!(inner.is_none());
        assert_eq!(&m[e.text()], b"U3ViamVjdDogeA0KDQp4DQo=\r\n");
        assert!(find(m, &path(&[1, 1])).is_none());
    }

    #[test]
    fn deep_nesting_is_followed_only_so_far() {
        let mut m = Vec::new();
        for _ in 0..200 {
            m.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
        }
        m.extend_from_slice(b"Subject: x\r\n\r\nbottom\r\n");
        let ones = path(&[1; DEPTH_MAX]);
        let (e, inner) = find(&m, &ones).unwrap();
        assert!(inner.is_some() && e.end == m.len());
        assert!(find(&m, &path(&[1; DEPTH_MAX + 1])).is_none());
        crate::imap::sections::check_sections(&m);
    }
}
