//! `Authentication-Results:` (RFC 8601) as the edge writes it: a sender
//! must not be able to claim a pass, so every such field that names our
//! authserv-id is taken out of an arriving message before ours is added
//! (RFC 8601 5). Fields of other authserv-ids are kept: they are some
//! other host's word, and a reader trusts only ours.

use crate::message::{header_end, header_fields};

/// The authserv-id a field's value names: its first token, past
/// whitespace and comments; `None` if there is none.
pub fn authserv_id(field: &[u8]) -> Option<&[u8]> {
    let colon = field.iter().position(|c| *c == b':')?;
    let mut v = &field[colon + 1..];
    loop {
        let trimmed = v.trim_ascii_start();
        if let Some(rest) = trimmed.strip_prefix(b"(") {
            // A comment, nested ones included; an unclosed one: no id.
            let mut depth = 1usize;
            let mut i = 0;
            while depth > 0 {
                match rest.get(i)? {
                    b'\\' => i += 1,
                    b'(' => depth += 1,
                    b')' => depth -= 1,
                    _ => {}
                }
                i += 1;
            }
            v = &rest[i..];
        } else {
            v = trimmed;
            break;
        }
    }
    let end = v
        .iter()
        .position(|c| *c == b';' || *c == b'(' || c.is_ascii_whitespace())
        .unwrap_or(v.len());
    (end > 0).then(|| &v[..end])
}

/// `message` without the `Authentication-Results:` fields of its header
/// that name `id` (compared without regard to case); `None` when it has
/// none, so that the common case copies nothing.
pub fn strip_ours(message: &[u8], id: &str) -> Option<Vec<u8>> {
    let end = header_end(message);
    let header = &message[..end];
    let base = header.as_ptr() as usize;
    let cut: Vec<(usize, usize)> = header_fields(header)
        .into_iter()
        .filter(|(name, field)| {
            name.trim_ascii().eq_ignore_ascii_case(b"Authentication-Results")
                && authserv_id(field).is_some_and(|a| a.eq_ignore_ascii_case(id.as_bytes()))
        })
        .map(|(_, field)| {
            let start = field.as_ptr() as usize - base;
            (start, start + field.len())
        })
        .collect();
    if cut.is_empty() {
        return None;
    }
    let mut out = Vec::with_capacity(message.len());
    let mut at = 0;
    for (start, stop) in cut {
        out.extend_from_slice(&message[at..start]);
        at = stop;
    }
    out.extend_from_slice(&message[at..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_found_past_comments_and_folding() {
        assert_eq!(
            authserv_id(b"Authentication-Results: mx.example; spf=pass"),
            Some(&b"mx.example"[..])
        );
        assert_eq!(
            authserv_id(b"Authentication-Results:\r\n (a (nested) comment)\r\n\tMX.Example 1; none"),
            Some(&b"MX.Example"[..])
        );
        assert_eq!(authserv_id(b"Authentication-Results: (never closed"), None);
        assert_eq!(authserv_id(b"Authentication-Results:   ; none"), None);
    }

    #[test]
    fn only_ours_are_taken_out_of_the_header() {
        let m = b"Received: from x\r\n\
            Authentication-Results: mx.example;\r\n dkim=pass header.d=bank.example\r\n\
            Subject: hi\r\n\
            authentication-results: other.example; spf=pass\r\n\
            AUTHENTICATION-RESULTS : (c) MX.EXAMPLE; dmarc=pass\r\n\
            \r\n\
            Authentication-Results: mx.example; in the body, kept\r\n";
        let out = strip_ours(m, "mx.example").expect("something removed");
        assert_eq!(
            out,
            b"Received: from x\r\n\
            Subject: hi\r\n\
            authentication-results: other.example; spf=pass\r\n\
            \r\n\
            Authentication-Results: mx.example; in the body, kept\r\n"
                .to_vec()
        );
        assert_eq!(strip_ours(b"Subject: x\r\n\r\nbody", "mx.example"), None);
        // A look-alike id is not ours.
        assert_eq!(
            strip_ours(b"Authentication-Results: mx.example.evil; x\r\n\r\n", "mx.example"),
            None
        );
    }

    #[test]
    fn a_huge_folded_header_is_handled_in_one_pass() {
        let mut m = b"Authentication-Results: mx.example;".to_vec();
        for _ in 0..100_000 {
            m.extend_from_slice(b"\r\n spf=pass");
        }
        m.extend_from_slice(b"\r\nSubject: s\r\n\r\nbody");
        let out = strip_ours(&m, "mx.example").unwrap();
        assert_eq!(out, b"Subject: s\r\n\r\nbody".to_vec());
    }
}
