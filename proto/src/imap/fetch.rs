//! FETCH (RFC 3501 6.4.5): which items need the message's bytes, which
//! set `\Seen`, and the items themselves.

use imap_next::imap_types::IntoStatic;
use imap_next::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName};

use super::Message;
use super::mime::{body_structure, envelope};
use super::reply::{flags_of, internal_date, nstring, nz};
use super::sections::section_bytes;
use crate::message::header_end;

/// The item names of a FETCH, macros expanded; UID first for UID FETCH.
/// `Err` with the reason for items not served (BINARY).
pub fn item_names(
    names: MacroOrMessageDataItemNames<'static>,
    uid: bool,
) -> Result<Vec<MessageDataItemName<'static>>, &'static str> {
    let mut names = match names {
        MacroOrMessageDataItemNames::Macro(m) => m.expand().into_iter().map(|n| n.into_static()).collect(),
        MacroOrMessageDataItemNames::MessageDataItemNames(n) => n,
    };
    if uid && !names.contains(&MessageDataItemName::Uid) {
        names.insert(0, MessageDataItemName::Uid);
    }
    if names.iter().any(|n| {
        matches!(
            n,
            MessageDataItemName::Binary { .. } | MessageDataItemName::BinarySize { .. }
        )
    }) {
        return Err("BINARY is not served yet");
    }
    Ok(names)
}

/// Whether the items need the message's bytes.
pub fn needs_body(names: &[MessageDataItemName<'_>]) -> bool {
    names.iter().any(|n| {
        matches!(
            n,
            MessageDataItemName::BodyExt { .. }
                | MessageDataItemName::Body
                | MessageDataItemName::BodyStructure
                | MessageDataItemName::Envelope
                | MessageDataItemName::Rfc822
                | MessageDataItemName::Rfc822Header
                | MessageDataItemName::Rfc822Text
        )
    })
}

/// Whether fetching the items sets `\Seen` (a body, not its PEEK).
pub fn sets_seen(names: &[MessageDataItemName<'_>]) -> bool {
    names.iter().any(|n| {
        matches!(
            n,
            MessageDataItemName::BodyExt { peek: false, .. }
                | MessageDataItemName::Rfc822
                | MessageDataItemName::Rfc822Text
        )
    })
}

/// A mod-sequence as IMAP writes it (never 0).
pub fn modseq_nz(v: u64) -> std::num::NonZeroU64 {
    std::num::NonZeroU64::new(v.max(1)).expect("at least 1")
}

/// Whether the items ask for MODSEQ (which turns CONDSTORE on, RFC 7162
/// 3.1).
pub fn asks_modseq(names: &[MessageDataItemName<'_>]) -> bool {
    names.contains(&MessageDataItemName::ModSeq)
}

/// The items of one message (`body`: its bytes, when [`needs_body`]);
/// `flags_too`: add FLAGS if not asked for (`\Seen` was just set).
pub fn items<M: Message>(
    names: &[MessageDataItemName<'static>],
    m: &M,
    body: Option<&[u8]>,
    flags_too: bool,
) -> Vec<MessageDataItem<'static>> {
    let b = body.unwrap_or_default();
    let mut items = Vec::with_capacity(names.len() + 1);
    for n in names {
        items.push(match n {
            MessageDataItemName::Uid => MessageDataItem::Uid(nz(m.uid())),
            MessageDataItemName::ModSeq => MessageDataItem::ModSeq(modseq_nz(m.modseq())),
            MessageDataItemName::Flags => MessageDataItem::Flags(flags_of(m)),
            MessageDataItemName::Rfc822Size => MessageDataItem::Rfc822Size(m.size() as u32),
            MessageDataItemName::InternalDate => MessageDataItem::InternalDate(internal_date(m.arrival_ms())),
            MessageDataItemName::Rfc822 => MessageDataItem::Rfc822(nstring(b.to_vec())),
            MessageDataItemName::Envelope => MessageDataItem::Envelope(envelope(b)),
            MessageDataItemName::BodyStructure => MessageDataItem::BodyStructure(body_structure(b, true)),
            MessageDataItemName::Body => MessageDataItem::Body(body_structure(b, false)),
            MessageDataItemName::Rfc822Header => MessageDataItem::Rfc822Header(nstring(b[..header_end(b)].to_vec())),
            MessageDataItemName::Rfc822Text => MessageDataItem::Rfc822Text(nstring(b[header_end(b)..].to_vec())),
            MessageDataItemName::BodyExt { section, partial, .. } => {
                // A part that does not exist is empty (as Dovecot answers).
                let bytes = section_bytes(b, section.as_ref()).unwrap_or_default();
                let (origin, bytes) = match *partial {
                    Some((start, len)) => {
                        let s = (start as usize).min(bytes.len());
                        let e = s.saturating_add(len.get() as usize).min(bytes.len());
                        (Some(start), bytes[s..e].to_vec())
                    }
                    None => (None, bytes),
                };
                MessageDataItem::BodyExt {
                    section: section.clone(),
                    origin,
                    data: nstring(bytes),
                }
            }
            _ => unreachable!("refused by item_names"),
        });
    }
    if flags_too && !names.contains(&MessageDataItemName::Flags) {
        items.push(MessageDataItem::Flags(flags_of(m)));
    }
    items
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::testing::TestMsg;
    use imap_next::imap_types::fetch::Macro;

    #[test]
    fn items_of_a_message() {
        let names = item_names(MacroOrMessageDataItemNames::Macro(Macro::Fast), true).unwrap();
        assert_eq!(names[0], MessageDataItemName::Uid);
        assert!(!needs_body(&names) && !sets_seen(&names));
        let m = TestMsg::new(9, &["\\Seen"]);
        let got = items(&names, &m, None, true);
        assert!(matches!(got[0], MessageDataItem::Uid(u) if u.get() == 9));
        assert_eq!(got.len(), names.len(), "FLAGS asked for already");
        let full = item_names(MacroOrMessageDataItemNames::Macro(Macro::Full), false).unwrap();
        assert!(needs_body(&full));
    }
}
