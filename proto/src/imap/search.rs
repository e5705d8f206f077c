//! SEARCH (RFC 3501 6.4.4): whether a search key matches one message. The
//! keys on a message's text need its bytes, which the session reads only
//! when evaluation reaches such a key ([`SearchError::NeedBody`]), within
//! a byte budget for the whole search.

use imap_next::imap_types::datetime::NaiveDate;
use imap_next::imap_types::search::SearchKey;

use super::Message;
use super::sets::set_contains;
use crate::message::{header_end, header_fields};

/// Where the message stands in its folder.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    /// Its message number.
    pub seq: u32,
    /// What `*` means for message numbers and for UIDs.
    pub seq_largest: u32,
    pub uid_largest: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchError {
    /// Evaluation reached a key on the message's text: read the body and
    /// evaluate again.
    NeedBody,
    /// A key not served; the reason is the reply.
    Unsupported(&'static str),
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w.eq_ignore_ascii_case(needle))
}

fn day(d: &NaiveDate) -> u64 {
    d.as_ref()
        .and_hms_opt(0, 0, 0)
        .map_or(0, |t| t.and_utc().timestamp_millis() as u64)
}

/// Evaluates `key` on `m` at `pos`; `body` is the message's bytes once
/// read. Keys are evaluated left to right and stop as soon as the answer
/// is known, so a body is needed only where it decides.
pub fn matches<M: Message>(
    key: &SearchKey<'_>,
    pos: Position,
    m: &M,
    body: Option<&[u8]>,
) -> Result<bool, SearchError> {
    let arrival = m.arrival_ms();
    Ok(match key {
        SearchKey::And(keys) => {
            for k in keys.as_ref() {
                if !matches(k, pos, m, body)? {
                    return Ok(false);
                }
            }
            true
        }
        SearchKey::Or(a, b) => matches(a, pos, m, body)? || matches(b, pos, m, body)?,
        SearchKey::Not(k) => !matches(k, pos, m, body)?,
        SearchKey::All => true,
        SearchKey::SequenceSet(s) => set_contains(s, pos.seq, pos.seq_largest),
        SearchKey::Uid(s) => set_contains(s, m.uid(), pos.uid_largest),
        SearchKey::Larger(n) => m.size() > u64::from(*n),
        SearchKey::Smaller(n) => m.size() < u64::from(*n),
        SearchKey::Before(d) => arrival < day(d),
        SearchKey::Since(d) => arrival >= day(d),
        SearchKey::On(d) => arrival >= day(d) && arrival < day(d) + 86_400_000,
        SearchKey::Deleted => m.has("\\Deleted"),
        SearchKey::Undeleted => !m.has("\\Deleted"),
        SearchKey::Answered => m.has("\\Answered"),
        SearchKey::Unanswered => !m.has("\\Answered"),
        SearchKey::Flagged => m.has("\\Flagged"),
        SearchKey::Unflagged => !m.has("\\Flagged"),
        SearchKey::Draft => m.has("\\Draft"),
        SearchKey::Undraft => !m.has("\\Draft"),
        SearchKey::Seen => m.has("\\Seen"),
        SearchKey::Unseen => !m.has("\\Seen"),
        SearchKey::Keyword(k) => m.has(k.as_ref()),
        SearchKey::Unkeyword(k) => !m.has(k.as_ref()),
        // No session is told of a message as recent (\Recent is per
        // session, and no node owns a folder's sessions).
        SearchKey::Recent | SearchKey::New => false,
        SearchKey::Old => true,
        SearchKey::Header(..)
        | SearchKey::Subject(_)
        | SearchKey::From(_)
        | SearchKey::To(_)
        | SearchKey::Cc(_)
        | SearchKey::Bcc(_)
        | SearchKey::Body(_)
        | SearchKey::Text(_) => {
            let b = body.ok_or(SearchError::NeedBody)?;
            let (header, text) = b.split_at(header_end(b));
            let field = |name: &[u8], value: &[u8]| {
                header_fields(header)
                    .iter()
                    .any(|(n, f)| n.trim_ascii().eq_ignore_ascii_case(name) && contains_ci(&f[n.len() + 1..], value))
            };
            match key {
                SearchKey::Header(name, value) => field(name.as_ref(), value.as_ref()),
                SearchKey::Subject(v) => field(b"subject", v.as_ref()),
                SearchKey::From(v) => field(b"from", v.as_ref()),
                SearchKey::To(v) => field(b"to", v.as_ref()),
                SearchKey::Cc(v) => field(b"cc", v.as_ref()),
                SearchKey::Bcc(v) => field(b"bcc", v.as_ref()),
                SearchKey::Body(v) => contains_ci(text, v.as_ref()),
                SearchKey::Text(v) => contains_ci(b, v.as_ref()),
                _ => unreachable!("the keys above"),
            }
        }
        _ => return Err(SearchError::Unsupported("that search key is not supported yet")),
    })
}

/// The criteria of a SEARCH command as one key.
pub fn one_key(criteria: &[SearchKey<'static>]) -> SearchKey<'static> {
    match criteria {
        [one] => one.clone(),
        _ => SearchKey::And(imap_next::imap_types::core::Vec1::unvalidated(criteria.to_vec())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::testing::TestMsg;
    use imap_next::imap_types::core::AString;

    const POS: Position = Position {
        seq: 1,
        seq_largest: 1,
        uid_largest: 7,
    };

    #[test]
    fn flags_sets_and_text() {
        let m = TestMsg::new(7, &["\\Seen", "work"]);
        assert_eq!(matches(&SearchKey::Seen, POS, &m, None), Ok(true));
        assert_eq!(matches(&SearchKey::Unseen, POS, &m, None), Ok(false));
        let kw = SearchKey::Keyword(imap_next::imap_types::core::Atom::try_from("WORK").unwrap());
        assert_eq!(matches(&kw, POS, &m, None), Ok(true));
        let subject = SearchKey::Subject(AString::try_from("hello").unwrap());
        assert_eq!(matches(&subject, POS, &m, None), Err(SearchError::NeedBody));
        let body = b"Subject: Hello there\r\n\r\ntext\r\n";
        assert_eq!(matches(&subject, POS, &m, Some(body)), Ok(true));
        // Short-circuit: a decided OR never asks for the body.
        let or = SearchKey::Or(Box::new(SearchKey::Seen), Box::new(subject));
        assert_eq!(matches(&or, POS, &m, None), Ok(true));
        assert_eq!(
            matches(
                &SearchKey::Text(AString::try_from("TEXT").unwrap()),
                POS,
                &m,
                Some(body)
            ),
            Ok(true)
        );
    }
}
