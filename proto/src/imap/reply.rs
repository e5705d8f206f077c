//! IMAP replies as imap-types values: statuses with their response codes,
//! capabilities, LIST lines, flags, dates and the UIDPLUS codes.

use std::num::NonZeroU32;

use imap_next::imap_types::auth::AuthMechanism;
use imap_next::imap_types::core::{Atom, IString, Literal, NString, QuotedChar, Tag, Text, Vec1};
use imap_next::imap_types::datetime::DateTime;
use imap_next::imap_types::extensions::uidplus::{UidElement, UidSet};
use imap_next::imap_types::flag::{Flag, FlagFetch, FlagNameAttribute};
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Capability, Code, CodeOther, Data, Status};

use super::Message;

pub fn text(s: &str) -> Text<'static> {
    Text::try_from(s.to_owned()).unwrap_or_else(|_| Text::unvalidated("..."))
}

pub fn ok(tag: Tag<'static>, code: Option<Code<'static>>, t: &str) -> Status<'static> {
    Status::ok(Some(tag), code, text(t)).expect("valid status")
}

pub fn no(tag: Tag<'static>, code: Option<Code<'static>>, t: &str) -> Status<'static> {
    Status::no(Some(tag), code, text(t)).expect("valid status")
}

pub fn bad(tag: Option<Tag<'static>>, t: &str) -> Status<'static> {
    Status::bad(tag, None, text(t)).expect("valid status")
}

/// An untagged OK carrying a response code.
pub fn untagged_ok(code: Code<'static>, t: &str) -> Status<'static> {
    Status::ok(None, Some(code), text(t)).expect("valid status")
}

pub fn bye(t: &str) -> Status<'static> {
    Status::bye(None, text(t)).expect("valid status")
}

/// A response code imap-types has no variant for (RFC 5530's and others).
pub fn code(s: &'static str) -> Code<'static> {
    Code::Other(CodeOther::unvalidated(s.as_bytes()))
}

/// `NO [name] t`.
pub fn no_code(tag: Tag<'static>, name: &'static str, t: &str) -> Status<'static> {
    no(tag, Some(code(name)), t)
}

pub fn cannot(tag: Tag<'static>, t: &str) -> Status<'static> {
    no_code(tag, "CANNOT", t)
}

pub fn nonexistent(tag: Tag<'static>) -> Status<'static> {
    no_code(tag, "NONEXISTENT", "no such folder")
}

pub fn limit(tag: Tag<'static>, t: &str) -> Status<'static> {
    no_code(tag, "LIMIT", t)
}

pub fn unavailable(tag: Tag<'static>, t: &str) -> Status<'static> {
    no_code(tag, "UNAVAILABLE", t)
}

/// A refused change of the folder names (a limit, or a race with another
/// session), by what the Raft state said.
pub fn refused(tag: Tag<'static>, why: &str) -> Status<'static> {
    if why.contains("already exists") {
        no_code(tag, "ALREADYEXISTS", "that folder already exists")
    } else if why.contains("at most") {
        limit(tag, "too many folders")
    } else if why.contains("does not exist") {
        nonexistent(tag)
    } else {
        unavailable(tag, "the change could not be made now, try again")
    }
}

pub fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).expect("nonzero")
}

pub fn nstring(bytes: Vec<u8>) -> NString<'static> {
    match Literal::try_from(bytes) {
        Ok(l) => NString(Some(IString::Literal(l))),
        // A NUL byte cannot travel in an IMAP4rev1 literal.
        Err(_) => NString(None),
    }
}

/// The capabilities to announce now: STARTTLS while it can be started,
/// AUTH=PLAIN and SASL-IR where a password may be sent (else
/// LOGINDISABLED), none of these once authenticated.
/// The capabilities to announce; `modseqs`: the cluster keeps
/// mod-sequences (CONDSTORE and QRESYNC, RFC 7162).
pub fn capabilities(
    starttls: bool,
    password_ok: bool,
    authenticated: bool,
    modseqs: bool,
) -> Vec1<Capability<'static>> {
    let mut c = vec![Capability::Imap4Rev1];
    if !authenticated {
        if starttls {
            c.push(Capability::StartTls);
        }
        if password_ok {
            c.push(Capability::Auth(AuthMechanism::Plain));
            c.push(Capability::SaslIr);
        } else {
            c.push(Capability::LoginDisabled);
        }
    }
    c.extend([
        Capability::LiteralPlus,
        Capability::Idle,
        Capability::UidPlus,
        Capability::Move,
        Capability::Unselect,
        Capability::Id,
        Capability::Namespace,
        Capability::Enable,
    ]);
    if modseqs {
        c.extend([Capability::CondStore, Capability::QResync]);
    }
    if authenticated {
        // RFC 6154: LIST marks Sent, Drafts, Trash, Junk and Archive.
        c.push(Capability::from(Atom::unvalidated("SPECIAL-USE")));
        // RFC 9208: usage and limit of the user's storage.
        c.push(Capability::Quota);
        c.push(Capability::QuotaRes(
            imap_next::imap_types::extensions::quota::Resource::Storage,
        ));
    }
    Vec1::unvalidated(c)
}

/// The hierarchy delimiter as LIST shows it.
pub fn delimiter() -> Option<QuotedChar> {
    Some(QuotedChar::try_from(super::folders::DELIMITER).expect("valid"))
}

/// One LIST or LSUB answer.
pub fn list_data(lsub: bool, items: Vec<FlagNameAttribute<'static>>, mailbox: Mailbox<'static>) -> Data<'static> {
    let delimiter = delimiter();
    if lsub {
        Data::Lsub {
            items,
            delimiter,
            mailbox,
        }
    } else {
        Data::List {
            items,
            delimiter,
            mailbox,
        }
    }
}

/// A special-use attribute (`\Sent`, ..., RFC 6154).
pub fn special(attribute: &'static str) -> FlagNameAttribute<'static> {
    FlagNameAttribute::from(Atom::unvalidated(attribute))
}

/// `\HasChildren` or `\HasNoChildren` (RFC 3348).
pub fn children(has: bool) -> FlagNameAttribute<'static> {
    FlagNameAttribute::from(Atom::unvalidated(if has { "HasChildren" } else { "HasNoChildren" }))
}

pub fn mailbox_as_bytes<'a>(m: &'a Mailbox<'_>) -> &'a [u8] {
    match m {
        Mailbox::Inbox => b"INBOX",
        Mailbox::Other(o) => o.as_ref(),
    }
}

/// The first bytes of a discarded command, if they look like a tag.
pub fn parse_tag(discarded: &[u8]) -> Option<Tag<'static>> {
    let end = discarded.iter().position(|b| *b == b' ')?;
    Tag::try_from(String::from_utf8(discarded[..end].to_vec()).ok()?).ok()
}

/// A message's flags as FETCH shows them.
pub fn flags_of<M: Message>(m: &M) -> Vec<FlagFetch<'static>> {
    let mut out: Vec<FlagFetch<'static>> = m
        .flags()
        .into_iter()
        .filter_map(flag_of_name)
        .map(FlagFetch::Flag)
        .collect();
    if m.recent() {
        out.push(FlagFetch::Recent);
    }
    out
}

/// A stored flag name as IMAP shows it.
pub fn flag_of_name(name: &str) -> Option<Flag<'static>> {
    match name.strip_prefix('\\') {
        Some(system) => Atom::try_from(system.to_owned()).ok().map(Flag::system),
        None => Atom::try_from(name.to_owned()).ok().map(Flag::Keyword),
    }
}

/// How a flag is stored: `\Seen`-style for system flags (their canonical
/// case), the keyword as given otherwise.
pub fn name_of_flag(flag: &Flag<'_>) -> String {
    flag.to_string()
}

/// The FLAGS of a folder: the system flags, and the keywords it defines
/// (`defined`) and its messages carry (at most 256 of them).
pub fn folder_flags<M: Message>(msgs: &[M], defined: &[String]) -> Vec<Flag<'static>> {
    let mut out = vec![Flag::Answered, Flag::Flagged, Flag::Deleted, Flag::Seen, Flag::Draft];
    let mut keywords: std::collections::BTreeMap<String, &str> = std::collections::BTreeMap::new();
    let in_use = msgs.iter().flat_map(|m| m.flags()).filter(|f| !f.starts_with('\\'));
    for k in defined.iter().map(String::as_str).chain(in_use) {
        keywords.entry(k.to_ascii_lowercase()).or_insert(k);
    }
    out.extend(keywords.into_values().take(256).filter_map(flag_of_name));
    out
}

/// The keywords `msgs` carry, once each (keywords match without regard
/// to case).
pub fn keywords_in_use<M: Message>(msgs: &[M]) -> Vec<String> {
    let mut keywords: std::collections::BTreeMap<String, &str> = std::collections::BTreeMap::new();
    for k in msgs.iter().flat_map(|m| m.flags()).filter(|f| !f.starts_with('\\')) {
        keywords.entry(k.to_ascii_lowercase()).or_insert(k);
    }
    keywords.into_values().map(str::to_owned).collect()
}

pub fn internal_date(arrival_ms: u64) -> DateTime {
    let t = chrono::DateTime::from_timestamp((arrival_ms / 1000) as i64, 0).unwrap_or_default();
    DateTime::unvalidated(t.fixed_offset())
}

/// COPYUID (RFC 4315): the source UIDs and their UIDs in the destination,
/// pair by pair.
pub fn copy_uid(validity: u32, pairs: &[(u32, u32)]) -> Code<'static> {
    let single = |u: u32| UidElement::Single(nz(u));
    Code::CopyUid {
        uid_validity: nz(validity),
        source: UidSet(Vec1::unvalidated(pairs.iter().map(|(s, _)| single(*s)).collect())),
        destination: UidSet(Vec1::unvalidated(pairs.iter().map(|(_, d)| single(*d)).collect())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::testing::TestMsg;

    #[test]
    fn tags_of_bad_commands() {
        assert_eq!(
            parse_tag(b"a1 FOO\r\n").map(|t| t.inner().to_owned()),
            Some("a1".to_owned())
        );
        assert!(parse_tag(b"\r\n").is_none());
    }

    #[test]
    fn flags_as_shown() {
        let msgs = vec![TestMsg::new(1, &["\\Seen", "$Junk"]), TestMsg::new(2, &["work"])];
        let shown: Vec<String> = folder_flags(&msgs, &[]).iter().map(|f| f.to_string()).collect();
        assert_eq!(
            shown,
            [
                "\\Answered",
                "\\Flagged",
                "\\Deleted",
                "\\Seen",
                "\\Draft",
                "$Junk",
                "work"
            ]
        );
        assert_eq!(flags_of(&msgs[0]).len(), 2);
        assert_eq!(name_of_flag(&flag_of_name("\\Seen").unwrap()), "\\Seen");
        let caps = capabilities(true, false, false, true);
        assert!(caps.as_ref().contains(&Capability::LoginDisabled));
        assert!(caps.as_ref().contains(&Capability::StartTls));
        assert!(
            !capabilities(true, true, true, true)
                .as_ref()
                .contains(&Capability::StartTls)
        );
        assert!(
            capabilities(true, true, true, true)
                .as_ref()
                .contains(&Capability::QResync)
        );
        assert!(
            !capabilities(true, true, true, false)
                .as_ref()
                .contains(&Capability::CondStore)
        );
    }
}
