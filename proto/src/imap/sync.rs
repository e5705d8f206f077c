//! What a session with a folder selected is told when it looks again
//! (NOOP, CHECK, IDLE): EXPUNGE for messages gone (deleted, or moved
//! away), FETCH FLAGS for flags changed (through any node), EXISTS for new
//! ones, only UIDs above every UID the session has shown (a UID is never
//! shown below one already seen).

use imap_next::imap_types::core::Vec1;
use imap_next::imap_types::fetch::MessageDataItem;
use imap_next::imap_types::response::Data;

use super::Message;
use super::reply::{flags_of, nz};

/// Brings `shown` (the session's messages, by UID) to `now` (the folder
/// as listed now, sorted by UID) and returns what to tell the client, in
/// order. `uid_next` is the session's UIDNEXT, raised to `next`. One pass
/// over both lists (the EXPUNGE numbers are those of the moment each is
/// sent).
pub fn sync<M: Message>(shown: &mut Vec<M>, now: Vec<M>, uid_next: &mut u32, next: u32) -> Vec<Data<'static>> {
    let mut out = Vec::new();
    let mut present: std::collections::HashMap<u32, M> = now.into_iter().map(|m| (m.uid(), m)).collect();
    let high = shown.last().map_or(0, |m| m.uid()).max(uid_next.saturating_sub(1));
    let before = shown.len();
    let mut expunged = false;
    let mut kept: Vec<M> = Vec::with_capacity(shown.len());
    for old in shown.drain(..) {
        match present.remove(&old.uid()) {
            Some(fresh) => {
                if old.flags() != fresh.flags() {
                    out.push(Data::Fetch {
                        seq: nz(kept.len() as u32 + 1),
                        items: Vec1::unvalidated(vec![
                            MessageDataItem::Uid(nz(fresh.uid())),
                            MessageDataItem::Flags(flags_of(&fresh)),
                        ]),
                    });
                }
                kept.push(fresh);
            }
            None => {
                expunged = true;
                out.push(Data::Expunge(nz(kept.len() as u32 + 1)));
            }
        }
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
                Data::Fetch { seq, .. } => format!("FETCH {seq}"),
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
        let out = sync(&mut shown, now, &mut next, 7);
        // 2 goes (seq 2), 3 (now seq 2) changed flags, 4 goes (now seq 3).
        assert_eq!(kinds(&out), ["EXPUNGE 2", "FETCH 2", "EXPUNGE 3", "EXISTS 4"]);
        assert_eq!(shown.iter().map(|m| m.uid).collect::<Vec<_>>(), [1, 3, 5, 6]);
        assert_eq!(next, 7);
        // Nothing changed: nothing said.
        let again = shown.clone();
        assert!(sync(&mut shown, again, &mut next, 7).is_empty());
        // A UID below one already shown is not shown (a late number).
        let mut late = shown.clone();
        late.insert(0, TestMsg::new(2, &[]));
        assert!(sync(&mut shown, late, &mut next, 7).is_empty());
    }

    #[test]
    fn a_uid_numbered_meanwhile_and_not_listed_holds_the_ones_above() {
        // UIDNEXT was 30 when the look began; 31 is listed, 30 (numbered
        // since, its message not listed yet) is not: 31 waits.
        assert_eq!(barrier(&[28, 29, 31], [30, 31]), Some(30));
        let mut shown: Vec<TestMsg> = [28, 29].iter().map(|u| TestMsg::new(*u, &[])).collect();
        let mut next = 30;
        let now: Vec<TestMsg> = [28, 29].iter().map(|u| TestMsg::new(*u, &[])).collect();
        assert!(sync(&mut shown, now, &mut next, 30).is_empty());
        // At the next look both are listed and shown, in order.
        assert_eq!(barrier(&[28, 29, 30, 31], [30, 31]), None);
        let now: Vec<TestMsg> = [28, 29, 30, 31].iter().map(|u| TestMsg::new(*u, &[])).collect();
        assert_eq!(kinds(&sync(&mut shown, now, &mut next, 32)), ["EXISTS 4"]);
        assert_eq!(shown.iter().map(|m| m.uid).collect::<Vec<_>>(), [28, 29, 30, 31]);
    }

    #[test]
    fn a_large_folder_emptied_in_one_pass() {
        let mut shown: Vec<TestMsg> = (1..=100_000).map(|u| TestMsg::new(u, &[])).collect();
        let mut next = 100_001;
        let out = sync(&mut shown, Vec::new(), &mut next, 100_001);
        assert_eq!(out.len(), 100_001);
        assert!(
            out[..100_000]
                .iter()
                .all(|d| matches!(d, Data::Expunge(n) if n.get() == 1))
        );
    }
}
