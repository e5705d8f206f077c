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

/// The calendar day of an instant (ms since the epoch), in UTC.
fn day_of(ms: u64) -> chrono::NaiveDate {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .date_naive()
}

/// The day of the message's `Date:` header as written, disregarding time
/// and zone (RFC 3501 6.4.4, SENTBEFORE/SENTON/SENTSINCE); `None` without
/// a readable one (INTERNALDATE's day is used then, as Dovecot does).
fn sent_date(message: &[u8]) -> Option<chrono::NaiveDate> {
    let m = mail_parser::MessageParser::default().parse_headers(message)?;
    let d = m.date()?;
    chrono::NaiveDate::from_ymd_opt(i32::from(d.year), u32::from(d.month), u32::from(d.day))
}

#[derive(Clone, Copy)]
enum Field {
    From,
    To,
    Cc,
    Bcc,
}

/// Whether an address of the field (its address or its display name, as
/// parsed: comments and quoting gone) contains `needle`, without regard
/// to case. Beside the substring of the raw field, this finds
/// `user@domain` in `<user (comment)@ (comment) domain>`.
fn in_addresses(message: &[u8], which: Field, needle: &[u8]) -> bool {
    let Some(m) = mail_parser::MessageParser::default().parse_headers(message) else {
        return false;
    };
    let field = match which {
        Field::From => m.from(),
        Field::To => m.to(),
        Field::Cc => m.cc(),
        Field::Bcc => m.bcc(),
    };
    let Some(field) = field else { return false };
    let hit = |s: Option<&str>| s.is_some_and(|s| contains_ci(s.as_bytes(), needle));
    field
        .iter()
        .any(|a| hit(a.address.as_deref()) || hit(a.name.as_deref()))
}

/// Whether `key` searches by mod-sequence (which turns CONDSTORE on and
/// makes the answer name the highest found, RFC 7162 3.1.5).
pub fn uses_modseq(key: &SearchKey<'_>) -> bool {
    match key {
        SearchKey::ModSequence { .. } => true,
        SearchKey::And(keys) => keys.as_ref().iter().any(uses_modseq),
        SearchKey::Or(a, b) => uses_modseq(a) || uses_modseq(b),
        SearchKey::Not(k) => uses_modseq(k),
        _ => false,
    }
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
        SearchKey::Recent => m.recent(),
        SearchKey::New => m.recent() && !m.has("\\Seen"),
        SearchKey::Old => !m.recent(),
        // Flags have no mod-sequences of their own: the message's counts
        // for each (RFC 7162 3.1.5 allows it).
        SearchKey::ModSequence { modseq, .. } => m.modseq() >= *modseq,
        SearchKey::SentBefore(_) | SearchKey::SentOn(_) | SearchKey::SentSince(_) => {
            let b = body.ok_or(SearchError::NeedBody)?;
            let sent = sent_date(b).unwrap_or_else(|| day_of(arrival));
            match key {
                SearchKey::SentBefore(d) => sent < *d.as_ref(),
                SearchKey::SentOn(d) => sent == *d.as_ref(),
                SearchKey::SentSince(d) => sent >= *d.as_ref(),
                _ => unreachable!("the keys above"),
            }
        }
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
                SearchKey::From(v) => field(b"from", v.as_ref()) || in_addresses(b, Field::From, v.as_ref()),
                SearchKey::To(v) => field(b"to", v.as_ref()) || in_addresses(b, Field::To, v.as_ref()),
                SearchKey::Cc(v) => field(b"cc", v.as_ref()) || in_addresses(b, Field::Cc, v.as_ref()),
                SearchKey::Bcc(v) => field(b"bcc", v.as_ref()) || in_addresses(b, Field::Bcc, v.as_ref()),
                SearchKey::Body(v) => contains_ci(text, v.as_ref()),
                SearchKey::Text(v) => contains_ci(b, v.as_ref()),
                _ => unreachable!("the keys above"),
            }
        }
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

    fn date(s: &str) -> NaiveDate {
        NaiveDate::try_from(chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").unwrap()).unwrap()
    }

    #[test]
    fn sent_dates_are_the_date_header_s_day_as_written() {
        let m = TestMsg::new(7, &[]);
        // 23:00 at +0200 is the 24th as written (the 24th at 21:00 UTC);
        // 00:00 at +0200 is the 25th (the 24th at 22:00 UTC).
        let late = b"Date: Sat, 24 Mar 2007 23:00:00 +0200\r\n\r\nx\r\n";
        let midnight = b"Date: Sun, 25 Mar 2007 00:00:00 +0200\r\n\r\nx\r\n";
        let on = |d: &str| SearchKey::SentOn(date(d));
        assert_eq!(matches(&on("2007-03-24"), POS, &m, None), Err(SearchError::NeedBody));
        assert_eq!(matches(&on("2007-03-24"), POS, &m, Some(late)), Ok(true));
        assert_eq!(matches(&on("2007-03-25"), POS, &m, Some(midnight)), Ok(true));
        let before = SearchKey::SentBefore(date("2007-03-25"));
        assert_eq!(matches(&before, POS, &m, Some(late)), Ok(true));
        assert_eq!(matches(&before, POS, &m, Some(midnight)), Ok(false));
        let since = SearchKey::SentSince(date("2007-03-25"));
        assert_eq!(matches(&since, POS, &m, Some(midnight)), Ok(true));
        assert_eq!(matches(&since, POS, &m, Some(late)), Ok(false));
    }

    #[test]
    fn addresses_match_as_parsed_and_as_written() {
        let m = TestMsg::new(7, &[]);
        let from = |v: &str| SearchKey::From(AString::try_from(v.to_owned()).unwrap());
        let commented = b"From: <user-from (comment)@ (comment) domain.org>\r\n\r\nx\r\n";
        assert_eq!(
            matches(&from("user-from@domain.org"), POS, &m, Some(commented)),
            Ok(true)
        );
        let two = b"From: user-from1@domain.org, user-from2@domain.org\r\n\r\nx\r\n";
        assert_eq!(matches(&from("user-from@domain.org"), POS, &m, Some(two)), Ok(false));
        assert_eq!(matches(&from("ser-fro"), POS, &m, Some(two)), Ok(true));
        let named = b"From: user-from@domain.org (RealFrom)\r\n\r\nx\r\n";
        assert_eq!(matches(&from("ealfro"), POS, &m, Some(named)), Ok(true));
    }

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
