//! What a session with a folder selected is told when it looks again
//! (NOOP, CHECK, IDLE): EXPUNGE for messages gone (deleted, or moved
//! away; one VANISHED for all of them once QRESYNC is enabled), FETCH
//! FLAGS for flags changed (through any node; with MODSEQ, and for a new
//! mod-sequence too, once CONDSTORE is), EXISTS for new ones, only UIDs
//! above every UID the session has shown (a UID is never shown below one
//! already seen).

use imap_next::imap_types::core::Vec1;
use imap_next::imap_types::fetch::MessageDataItem;
use imap_next::imap_types::response::Data;

use super::Message;
use super::fetch::modseq_nz;
use super::reply::{flags_of, nz};

/// What the session has enabled (RFC 7162): how changes are told.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tell {
    /// CONDSTORE: FETCH responses with FLAGS carry MODSEQ, and a message
    /// whose mod-sequence moved is told even if its flags look the same.
    pub modseq: bool,
    /// QRESYNC: expunges are one VANISHED (by UID), not EXPUNGEs.
    pub vanished: bool,
}

/// The FETCH that tells a message's flags (and mod-sequence, when `tell`
/// says so) at position `seq` (1-based).
pub fn flags_fetch<M: Message>(seq: u32, m: &M, tell: Tell) -> Data<'static> {
    let mut items = vec![MessageDataItem::Uid(nz(m.uid())), MessageDataItem::Flags(flags_of(m))];
    if tell.modseq {
        items.push(MessageDataItem::ModSeq(modseq_nz(m.modseq())));
    }
    Data::Fetch {
        seq: nz(seq),
        items: Vec1::unvalidated(items),
    }
}

/// Brings `shown` (the session's messages, by UID) to `now` (the folder
/// as listed now, sorted by UID) and returns what to tell the client, in
/// order. `uid_next` is the session's UIDNEXT, raised to `next`. One pass
/// over both lists (the EXPUNGE numbers are those of the moment each is
/// sent; a VANISHED goes first, and the FETCH numbers are then those
/// after it).
pub fn sync<M: Message>(
    shown: &mut Vec<M>,
    now: Vec<M>,
    uid_next: &mut u32,
    next: u32,
    tell: Tell,
) -> Vec<Data<'static>> {
    let mut out = Vec::new();
    let mut vanished = Vec::new();
    let mut present: std::collections::HashMap<u32, M> = now.into_iter().map(|m| (m.uid(), m)).collect();
    let high = shown.last().map_or(0, |m| m.uid()).max(uid_next.saturating_sub(1));
    let before = shown.len();
    let mut expunged = false;
    let mut kept: Vec<M> = Vec::with_capacity(shown.len());
    for old in shown.drain(..) {
        match present.remove(&old.uid()) {
            Some(fresh) => {
                if old.flags() != fresh.flags() || (tell.modseq && old.modseq() != fresh.modseq()) {
                    out.push(flags_fetch(kept.len() as u32 + 1, &fresh, tell));
                }
                kept.push(fresh);
            }
            None if tell.vanished => {
                expunged = true;
                vanished.push(old.uid());
            }
            None => {
                expunged = true;
                out.push(Data::Expunge(nz(kept.len() as u32 + 1)));
            }
        }
    }
    if let Some(known_uids) = super::sets::uid_set(&vanished) {
        out.insert(
            0,
            Data::Vanished {
                earlier: false,
                known_uids,
            },
        );
    }
    let mut new: Vec<M> = present.into_values().filter(|m| m.uid() > high).collect();
    new.sort_by_key(|m| m.uid());
    kept.extend(new);
    *shown = kept;
    *uid_next = (*uid_next).max(next);
    if shown.len() != before || expunged {
        out.push(Data::Exists(shown.len() as u32));
    }
    out
}

/// The lowest UID numbered since a look at the folder began (`numbered`:
/// the folder's UIDs from the value UIDNEXT had then) that the look's
/// listing does not show: a message numbered in another order than the
/// listing saw the messages. What is above it waits for the next look,
/// and UIDNEXT stays at most it; otherwise, once a higher UID is shown,
/// that message would be below a UID the session has seen and never be
/// shown to it.
pub fn barrier(listed: &[u32], numbered: impl IntoIterator<Item = u32>) -> Option<u32> {
    let listed: std::collections::HashSet<u32> = listed.iter().copied().collect();
    numbered.into_iter().filter(|u| !listed.contains(u)).min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::testing::TestMsg;

    fn kinds(d: &[Data<'static>]) -> Vec<String> {
        d.iter()
            .map(|d| match d {
                Data::Expunge(n) => format!("EXPUNGE {n}"),
                Data::Exists(n) => format!("EXISTS {n}"),
                Data::Fetch { seq, items } => {
                    let modseq = items.as_ref().iter().find_map(|i| match i {
                        MessageDataItem::ModSeq(m) => Some(format!(" MODSEQ {m}")),
                        _ => None,
                    });
                    format!("FETCH {seq}{}", modseq.unwrap_or_default())
                }
                Data::Vanished { earlier, known_uids } => {
                    format!("VANISHED{} {known_uids:?}", if *earlier { " (EARLIER)" } else { "" })
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn expunges_flag_changes_and_new_mail_in_order() {
        let mut shown: Vec<TestMsg> = (1..=5).map(|u| TestMsg::new(u, &[])).collect();
        let now = vec![
            TestMsg::new(1, &[]),
            TestMsg::new(3, &["\\Seen"]),
            TestMsg::new(5, &[]),
            TestMsg::new(6, &[]),
        ];
        let mut next = 6;
        let out = sync(&mut shown, now, &mut next, 7, Tell::default());
        // 2 goes (seq 2), 3 (now seq 2) changed flags, 4 goes (now seq 3).
        assert_eq!(kinds(&out), ["EXPUNGE 2", "FETCH 2", "EXPUNGE 3", "EXISTS 4"]);
        assert_eq!(shown.iter().map(|m| m.uid).collect::<Vec<_>>(), [1, 3, 5, 6]);
        assert_eq!(next, 7);
        // Nothing changed: nothing said.
        let again = shown.clone();
        assert!(sync(&mut shown, again, &mut next, 7, Tell::default()).is_empty());
        // A UID below one already shown is not shown (a late number).
        let mut late = shown.clone();
        late.insert(0, TestMsg::new(2, &[]));
        assert!(sync(&mut shown, late, &mut next, 7, Tell::default()).is_empty());
    }

    #[test]
    fn a_uid_numbered_meanwhile_and_not_listed_holds_the_ones_above() {
        // UIDNEXT was 30 when the look began; 31 is listed, 30 (numbered
        // since, its message not listed yet) is not: 31 waits.
        assert_eq!(barrier(&[28, 29, 31], [30, 31]), Some(30));
        let mut shown: Vec<TestMsg> = [28, 29].iter().map(|u| TestMsg::new(*u, &[])).collect();
        let mut next = 30;
        let now: Vec<TestMsg> = [28, 29].iter().map(|u| TestMsg::new(*u, &[])).collect();
        assert!(sync(&mut shown, now, &mut next, 30, Tell::default()).is_empty());
        // At the next look both are listed and shown, in order.
        assert_eq!(barrier(&[28, 29, 30, 31], [30, 31]), None);
        let now: Vec<TestMsg> = [28, 29, 30, 31].iter().map(|u| TestMsg::new(*u, &[])).collect();
        assert_eq!(
            kinds(&sync(&mut shown, now, &mut next, 32, Tell::default())),
            ["EXISTS 4"]
        );
        assert_eq!(shown.iter().map(|m| m.uid).collect::<Vec<_>>(), [28, 29, 30, 31]);
    }

    #[test]
    fn a_large_folder_emptied_in_one_pass() {
        let mut shown: Vec<TestMsg> = (1..=100_000).map(|u| TestMsg::new(u, &[])).collect();
        let mut next = 100_001;
        let out = sync(&mut shown, Vec::new(), &mut next, 100_001, Tell::default());
        assert_eq!(out.len(), 100_001);
        assert!(
            out[..100_000]
                .iter()
                .all(|d| matches!(d, Data::Expunge(n) if n.get() == 1))
        );
    }

    #[test]
    fn condstore_tells_mod_sequences_and_qresync_vanished() {
        let msg = |uid: u32, flags: &[&str], modseq: u64| TestMsg {
            modseq,
            ..TestMsg::new(uid, flags)
        };
        let mut shown: Vec<TestMsg> = (1..=5).map(|u| msg(u, &[], 2)).collect();
        // 2 and 4 expunged, 3's flags changed, 5's mod-sequence moved with
        // its flags the same (a change and its undoing through another
        // node), 6 new.
        let now = vec![msg(1, &[], 2), msg(3, &["\\Seen"], 7), msg(5, &[], 8), msg(6, &[], 9)];
        let tell = Tell {
            modseq: true,
            vanished: true,
        };
        let mut next = 6;
        let out = sync(&mut shown, now.clone(), &mut next, 7, tell);
        let k = kinds(&out);
        assert!(k[0].starts_with("VANISHED "), "{k:?}");
        assert_eq!(k[1..], ["FETCH 2 MODSEQ 7", "FETCH 3 MODSEQ 8", "EXISTS 4"]);
        match &out[0] {
            Data::Vanished { earlier, known_uids } => {
                assert!(!earlier);
                assert_eq!(
                    super::super::sets::selected(
                        &(1..=9).map(|u| msg(u, &[], 1)).collect::<Vec<_>>(),
                        known_uids,
                        true
                    ),
                    vec![1, 3],
                    "UIDs 2 and 4"
                );
            }
            other => panic!("{other:?}"),
        }
        // Without CONDSTORE a moved mod-sequence alone is not told, and
        // without QRESYNC expunges are EXPUNGEs.
        let mut shown: Vec<TestMsg> = (1..=5).map(|u| msg(u, &[], 2)).collect();
        let mut next = 6;
        let out = sync(&mut shown, now, &mut next, 7, Tell::default());
        assert_eq!(kinds(&out), ["EXPUNGE 2", "FETCH 2", "EXPUNGE 3", "EXISTS 4"]);
    }
}
