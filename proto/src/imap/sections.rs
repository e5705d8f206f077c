//! The bytes of a FETCH section: `[]`, `HEADER`, `HEADER.FIELDS (..)`,
//! `HEADER.FIELDS.NOT (..)`, `TEXT`, and MIME parts (through
//! [`super::mime`]). Every section is a slice of its message, or (header
//! fields) a copy no larger than the header.

use std::num::NonZeroU32;

use imap_next::imap_types::core::{AString, Vec1};
use imap_next::imap_types::fetch::Section;

use crate::message::{header_end, header_fields};

/// A section's bytes: `[]`, `HEADER`, `HEADER.FIELDS (..)`,
/// `HEADER.FIELDS.NOT (..)`, `TEXT`, `1` of a single-part message, and the
/// MIME parts (`1.2`, `2.MIME`, `3.HEADER`, ..., from mail-parser's tree).
/// `None`: no such part.
pub fn section_bytes(b: &[u8], section: Option<&Section<'_>>) -> Option<Vec<u8>> {
    let end = header_end(b);
    let (header, rest) = b.split_at(end);
    let pick = |names: &Vec1<AString<'_>>, keep: bool| {
        let wanted: Vec<&[u8]> = names.as_ref().iter().map(|n| n.as_ref()).collect();
        let mut out: Vec<u8> = header_fields(header)
            .into_iter()
            .filter(|(name, _)| wanted.iter().any(|w| w.eq_ignore_ascii_case(name.trim_ascii())) == keep)
            .flat_map(|(_, f)| f.iter().copied())
            .collect();
        out.extend_from_slice(b"\r\n");
        out
    };
    Some(match section {
        None => b.to_vec(),
        Some(Section::Header(None)) => header.to_vec(),
        Some(Section::HeaderFields(None, names)) => pick(names, true),
        Some(Section::HeaderFieldsNot(None, names)) => pick(names, false),
        Some(Section::Text(None)) => rest.to_vec(),
        Some(Section::Part(p)) if p.0.as_ref() == [NonZeroU32::MIN] && !is_multipart(header) => rest.to_vec(),
        Some(s) => return super::mime::part_section(b, s),
    })
}

fn is_multipart(header: &[u8]) -> bool {
    header_fields(header).iter().any(|(name, f)| {
        name.trim_ascii().eq_ignore_ascii_case(b"content-type")
            && String::from_utf8_lossy(f).to_ascii_lowercase().contains("multipart/")
    })
}

/// For the fuzz target: every kind of section of `message`, each of which
/// must be a slice of it (or the header fields' copy, bounded by it).
pub fn check_sections(message: &[u8]) {
    use imap_next::imap_types::fetch::Part;
    let n = |k: u32| NonZeroU32::new(k).expect("nonzero");
    let names = Vec1::unvalidated(vec![AString::try_from("Subject").expect("valid")]);
    let part = |p: &[u32]| Part(Vec1::unvalidated(p.iter().map(|k| n(*k)).collect()));
    let sections = [
        None,
        Some(Section::Header(None)),
        Some(Section::Text(None)),
        Some(Section::HeaderFields(None, names.clone())),
        Some(Section::HeaderFieldsNot(None, names)),
        Some(Section::Part(part(&[1]))),
        Some(Section::Part(part(&[2, 1]))),
        Some(Section::Mime(part(&[1]))),
        Some(Section::Header(Some(part(&[1])))),
        Some(Section::Text(Some(part(&[2])))),
    ];
    for s in &sections {
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
