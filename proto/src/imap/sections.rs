//! The bytes of a FETCH section: `[]`, `HEADER`, `HEADER.FIELDS (..)`,
//! `HEADER.FIELDS.NOT (..)`, `TEXT`, and MIME parts (through
//! [`super::mime`]). Every section is a slice of its message, or (header
//! fields) a copy no larger than the header.

use std::num::NonZeroU32;

use imap_next::imap_types::core::{AString, Vec1};
use imap_next::imap_types::fetch::{Part, Section};

use super::parts::{Entity, find};
use crate::message::{header_end, header_fields};

/// A section's bytes: `[]`, `HEADER`, `HEADER.FIELDS (..)`,
/// `HEADER.FIELDS.NOT (..)`, `TEXT`, and those of the parts (`1.2`,
/// `2.MIME`, `3.HEADER`, `3.HEADER.FIELDS (..)`, `3.TEXT`, `3.1`, ...,
/// found by [`super::parts`]). `None`: no such part, or (`HEADER`, `TEXT`
/// of a part) one that is no message/rfc822.
pub fn section_bytes(b: &[u8], section: Option<&Section<'_>>) -> Option<Vec<u8>> {
    let whole = || Entity {
        start: 0,
        body: header_end(b),
        end: b.len(),
    };
    // The message a HEADER, HEADER.FIELDS or TEXT section is of.
    let message = |part: &Option<Part>| match part {
        None => Some(whole()),
        Some(p) => find(b, p.0.as_ref())?.1,
    };
    let slice = |r: std::ops::Range<usize>| b.get(r).map(<[u8]>::to_vec);
    match section {
        None => Some(b.to_vec()),
        Some(Section::Header(p)) => slice(message(p)?.header()),
        Some(Section::HeaderFields(p, names)) => Some(pick(b.get(message(p)?.header())?, names, true)),
        Some(Section::HeaderFieldsNot(p, names)) => Some(pick(b.get(message(p)?.header())?, names, false)),
        Some(Section::Text(p)) => slice(message(p)?.text()),
        Some(Section::Part(p)) => slice(find(b, p.0.as_ref())?.0.text()),
        Some(Section::Mime(p)) => slice(find(b, p.0.as_ref())?.0.header()),
    }
}

/// The fields of `header` named in `names` (`keep`) or not named there,
/// and the empty line that ends a header.
fn pick(header: &[u8], names: &Vec1<AString<'_>>, keep: bool) -> Vec<u8> {
    let wanted: Vec<&[u8]> = names.as_ref().iter().map(|n| n.as_ref()).collect();
    let mut out: Vec<u8> = header_fields(header)
        .into_iter()
        .filter(|(name, _)| wanted.iter().any(|w| w.eq_ignore_ascii_case(name.trim_ascii())) == keep)
        .flat_map(|(_, f)| f.iter().copied())
        .collect();
    out.extend_from_slice(b"\r\n");
    out
}

/// For the fuzz target: every kind of section of `message`, each of which
/// must be a slice of it (or the header fields' copy, bounded by it).
pub fn check_sections(message: &[u8]) {
    let n = |k: u32| NonZeroU32::new(k).expect("nonzero");
    let names = Vec1::unvalidated(vec![AString::try_from("Subject").expect("valid")]);
    let part = |p: &[u32]| Part(Vec1::unvalidated(p.iter().map(|k| n(*k)).collect()));
    let nested = [&[1][..], &[2], &[1, 1], &[2, 1], &[2, 2], &[1, 1, 1], &[2, 1, 2]];
    let sections = [
        None,
        Some(Section::Header(None)),
        Some(Section::Text(None)),
        Some(Section::HeaderFields(None, names.clone())),
        Some(Section::HeaderFieldsNot(None, names.clone())),
        Some(Section::Part(part(&[1]))),
        Some(Section::Part(part(&[2, 1]))),
        Some(Section::Mime(part(&[1]))),
        Some(Section::Header(Some(part(&[1])))),
        Some(Section::Text(Some(part(&[2])))),
    ]
    .into_iter()
    .chain(nested.iter().flat_map(|p| {
        [
            Some(Section::Part(part(p))),
            Some(Section::Mime(part(p))),
            Some(Section::Header(Some(part(p)))),
            Some(Section::HeaderFields(Some(part(p)), names.clone())),
            Some(Section::HeaderFieldsNot(Some(part(p)), names.clone())),
            Some(Section::Text(Some(part(p)))),
        ]
    }));
    for s in sections {
        if let Some(b) = section_bytes(message, s.as_ref()) {
            assert!(b.len() <= message.len() + 2, "a section larger than its message");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_of_a_message() {
        let m = b"Subject: hi\r\nFrom: a@b\r\n x\r\nTo: c@d\r\n\r\nbody\r\n";
        assert_eq!(section_bytes(m, None).unwrap(), m.to_vec());
        assert_eq!(section_bytes(m, Some(&Section::Text(None))).unwrap(), b"body\r\n");
        assert_eq!(
            section_bytes(m, Some(&Section::Header(None))).unwrap(),
            b"Subject: hi\r\nFrom: a@b\r\n x\r\nTo: c@d\r\n\r\n"
        );
        let names = Vec1::unvalidated(vec![AString::try_from("FROM").unwrap()]);
        assert_eq!(
            section_bytes(m, Some(&Section::HeaderFields(None, names.clone()))).unwrap(),
            b"From: a@b\r\n x\r\n\r\n"
        );
        assert_eq!(
            section_bytes(m, Some(&Section::HeaderFieldsNot(None, names))).unwrap(),
            b"Subject: hi\r\nTo: c@d\r\n\r\n"
        );
        assert_eq!(header_end(b"no header end"), 13);
        check_sections(m);
    }
}
