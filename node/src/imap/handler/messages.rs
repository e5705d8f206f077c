//! The message commands of the selected state: FETCH (a body fetch sets
//! `\Seen`), STORE (flag registers on every copy) and SEARCH (bodies read
//! only where a key needs them, within a byte budget).

use imap_next::imap_types::core::{Tag, Vec1};
use imap_next::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName};
use imap_next::imap_types::flag::{Flag, StoreResponse, StoreType};
use imap_next::imap_types::response::{Code, Data, Status};
use imap_next::imap_types::search::SearchKey;
use imap_next::imap_types::sequence::SequenceSet;
use quill_proto::imap::reply::{bad, cannot, flags_of, limit, name_of_flag, no, no_code, nz, ok, unavailable};
use quill_proto::imap::search::{Position, SearchError};
use quill_proto::imap::{FLAG_BYTES_MAX, FLAGS_PER_COMMAND_MAX, SEARCH_BYTES_MAX, fetch, search, sets, store};
use replication::MarkChange;
use replication::replica::Listed;

use crate::mail::flag_change;
use tracing::debug;

use super::condstore::FetchAsk;
use super::state::{Handler, Phase};

impl Handler {
    pub(super) async fn fetch(
        &mut self,
        tag: Tag<'static>,
        set: SequenceSet,
        names: MacroOrMessageDataItemNames<'static>,
        uid: bool,
        ask: FetchAsk,
    ) -> Status<'static> {
        let mut names = match fetch::item_names(names, uid) {
            Ok(n) => n,
            Err(why) => return cannot(tag, why),
        };
        // UID FETCH ... (CHANGEDSINCE): what changed through any node
        // until now, so the session looks first (a UID command may be
        // told of expunges, RFC 3501 7.4.1).
        if uid && ask.changed_since.is_some() {
            self.tell_changes().await;
        }
        if fetch::asks_modseq(&names) {
            if !self.services.uids.modseqs_kept() {
                return bad(Some(tag), "MODSEQ needs the cluster at feature level 3");
            }
            self.condstore = true;
        }
        // CHANGEDSINCE: MODSEQ goes with each message (RFC 7162 3.1.4.1);
        // under QRESYNC every FETCH names its UID (3.2.4).
        if ask.changed_since.is_some() && !fetch::asks_modseq(&names) {
            names.push(MessageDataItemName::ModSeq);
        }
        if self.qresync && !names.contains(&MessageDataItemName::Uid) {
            names.insert(0, MessageDataItemName::Uid);
        }
        let needs_body = fetch::needs_body(&names);
        let condstore = self.condstore;
        let Phase::Selected(sel) = &self.phase else {
            unreachable!("the selected state")
        };
        let mut targets = sets::selected(&sel.msgs, &set, uid);
        if !uid && targets.is_empty() && !sel.msgs.is_empty() {
            return bad(Some(tag), "no such message");
        }
        if let Some(since) = ask.changed_since {
            targets.retain(|&i| sel.msgs[i].modseq > since);
        }
        if ask.vanished {
            let present: Vec<u32> = sel.msgs.iter().map(|m| m.uid).collect();
            let uid_next = sel.uid_next;
            self.vanished_in(&set, &present, uid_next);
        }
        let Phase::Selected(sel) = &self.phase else {
            unreachable!("the selected state")
        };
        // Fetching a body (not its PEEK) sets \Seen (RFC 3501 6.4.5),
        // stored like a STORE, and the FLAGS go with the answer.
        let mut now_seen = vec![false; sel.msgs.len()];
        if !sel.read_only && fetch::sets_seen(&names) {
            let hlc = self.services.mail.hlc_now();
            let changes: Vec<(usize, Listed, MarkChange)> = targets
                .iter()
                .filter(|i| !sel.msgs[**i].listed.meta.marks.has("\\Seen"))
                .map(|i| {
                    let l = &sel.msgs[*i].listed;
                    (*i, l.clone(), flag_change(l, &[("\\Seen".to_owned(), true)], hlc))
                })
                .collect();
            if !changes.is_empty() {
                let user = sel.user.clone();
                let send: Vec<(Listed, MarkChange)> = changes.iter().map(|(_, l, c)| (l.clone(), c.clone())).collect();
                if self.services.mail.mark(&user, &send).await.is_err() {
                    debug!(user, "imap fetch: \\Seen not stored everywhere");
                }
                let Phase::Selected(sel) = &mut self.phase else {
                    unreachable!("the selected state")
                };
                let positions: Vec<usize> = changes.iter().map(|c| c.0).collect();
                for (i, _, change) in changes {
                    sel.msgs[i].listed.meta.apply_marks(&change);
                    now_seen[i] = true;
                }
                self.stamp(&positions).await;
            }
        }
        let mut expunged = false;
        for i in targets {
            let Phase::Selected(sel) = &self.phase else {
                unreachable!("the selected state")
            };
            let body = if needs_body {
                match self.services.mail.read(&sel.msgs[i].listed).await {
                    Ok(b) => Some(b),
                    // Expunged by another session, and this one not told
                    // yet: the others' data goes out, then NO
                    // [EXPUNGEISSUED] (RFC 5530; RFC 2180 4.1.3).
                    Err(_) if self.services.mail.is_deleted(&sel.user, &sel.msgs[i].listed).await => {
                        expunged = true;
                        continue;
                    }
                    Err(e) => {
                        debug!(error = %e, "imap fetch: message unreadable now");
                        return unavailable(tag, "a message cannot be read now, try again");
                    }
                }
            } else {
                None
            };
            let Phase::Selected(sel) = &self.phase else {
                unreachable!("the selected state")
            };
            let mut items = fetch::items(&names, &sel.msgs[i], body.as_deref(), now_seen[i]);
            // Once CONDSTORE is on, FLAGS go with their MODSEQ.
            if condstore && !fetch::asks_modseq(&names) && items.iter().any(|d| matches!(d, MessageDataItem::Flags(_)))
            {
                items.push(MessageDataItem::ModSeq(fetch::modseq_nz(sel.msgs[i].modseq)));
            }
            self.data(Data::Fetch {
                seq: nz(i as u32 + 1),
                items: Vec1::unvalidated(items),
            });
        }
        if expunged {
            return no_code(
                tag,
                "EXPUNGEISSUED",
                "some of the requested messages no longer exist (expunged by another session)",
            );
        }
        ok(tag, None, "FETCH completed")
    }

    /// STORE; `unchanged_since`: CONDSTORE's UNCHANGEDSINCE (RFC 7162
    /// 3.1.3): a message changed after it is left alone and named in the
    /// tagged MODIFIED. The test reads the mod-sequences as the session
    /// last looked (a UID STORE looks first): a change committed through
    /// another node between the look and this STORE's own is not seen by
    /// it (the folder has no single writer that could make the test and
    /// the change one step).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn store(
        &mut self,
        tag: Tag<'static>,
        set: SequenceSet,
        kind: StoreType,
        response: StoreResponse,
        flags: Vec<Flag<'static>>,
        uid: bool,
        unchanged_since: Option<u64>,
    ) -> Status<'static> {
        let Phase::Selected(sel) = &self.phase else {
            unreachable!("the selected state")
        };
        if sel.read_only {
            return no(tag, Some(Code::ReadOnly), "the folder is read-only (EXAMINE)");
        }
        if flags.len() > FLAGS_PER_COMMAND_MAX {
            return limit(tag, "too many flags in one STORE");
        }
        // UID STORE (UNCHANGEDSINCE): tested against the mod-sequences of
        // now, so the session looks first.
        if uid && unchanged_since.is_some() {
            self.tell_changes().await;
        }
        let Phase::Selected(sel) = &self.phase else {
            unreachable!("the selected state")
        };
        let silent = response == StoreResponse::Silent;
        let names: Vec<String> = flags.iter().map(name_of_flag).collect();
        if names.iter().any(|n| n.len() > FLAG_BYTES_MAX) {
            return limit(tag, "a flag name is too long (at most 64 bytes)");
        }
        let hlc = self.services.mail.hlc_now();
        let mut changes: Vec<(usize, Listed, MarkChange)> = Vec::new();
        let mut modified: Vec<u32> = Vec::new();
        for i in sets::selected(&sel.msgs, &set, uid) {
            let m = &sel.msgs[i];
            if unchanged_since.is_some_and(|since| m.modseq > since) {
                modified.push(if uid { m.uid } else { i as u32 + 1 });
                continue;
            }
            let edits = match store::edits(m, kind, &names) {
                Ok(e) => e,
                Err(why) => return limit(tag, why),
            };
            changes.push((i, m.listed.clone(), flag_change(&m.listed, &edits, hlc)));
        }
        let user = sel.user.clone();
        let sel_folder = sel.folder.id.clone();
        let to_send: Vec<(Listed, MarkChange)> = changes
            .iter()
            .filter(|(_, _, c)| !c.flags.is_empty())
            .map(|(_, l, c)| (l.clone(), c.clone()))
            .collect();
        if !to_send.is_empty() && self.services.mail.mark(&user, &to_send).await.is_err() {
            return unavailable(tag, "the flags could not be stored now, try again");
        }
        self.services.counters().imap_stores.inc();
        // A keyword set here is defined for the folder before the client
        // hears of it, so every session of the folder is told of it.
        if kind != StoreType::Remove && !to_send.is_empty() {
            let seq = crate::uids::sequence_name(&user, &sel_folder);
            let keywords = names.iter().filter(|n| !n.starts_with('\\')).cloned().collect();
            self.folder_keywords(&seq, keywords).await;
        }
        let Phase::Selected(sel) = &mut self.phase else {
            unreachable!("the selected state")
        };
        let mut stamped = Vec::new();
        for (i, _, change) in &changes {
            sel.msgs[*i].listed.meta.apply_marks(change);
            if !change.flags.is_empty() {
                stamped.push(*i);
            }
        }
        self.stamp(&stamped).await;
        let (condstore, with_uid) = (self.condstore, uid || self.qresync);
        let Phase::Selected(sel) = &self.phase else {
            unreachable!("the selected state")
        };
        let mut out = Vec::new();
        for (i, _, change) in changes {
            let m = &sel.msgs[i];
            // .SILENT still tells a new MODSEQ under CONDSTORE (RFC 7162
            // 3.1.3).
            let modseq_only = silent && condstore && !change.flags.is_empty();
            if silent && !modseq_only {
                continue;
            }
            let mut items = Vec::new();
            if !silent {
                items.push(MessageDataItem::Flags(flags_of(m)));
            }
            if with_uid {
                items.push(MessageDataItem::Uid(nz(m.uid)));
            }
            if condstore {
                items.push(MessageDataItem::ModSeq(fetch::modseq_nz(m.modseq)));
            }
            out.push(Data::Fetch {
                seq: nz(i as u32 + 1),
                items: Vec1::unvalidated(items),
            });
        }
        for d in out {
            self.data(d);
        }
        match sets::uid_set(&modified) {
            Some(failed) => ok(tag, Some(Code::Modified(failed)), "conditional STORE failed for some"),
            None => ok(tag, None, "STORE completed"),
        }
    }

    pub(super) async fn search(
        &mut self,
        tag: Tag<'static>,
        criteria: &[SearchKey<'static>],
        uid: bool,
    ) -> Status<'static> {
        let key = search::one_key(criteria);
        let by_modseq = search::uses_modseq(&key);
        if by_modseq {
            if !self.services.uids.modseqs_kept() {
                return bad(Some(tag), "MODSEQ needs the cluster at feature level 3");
            }
            self.condstore = true;
        }
        let mut hits = Vec::new();
        let mut highest_hit = 0u64;
        let mut budget = SEARCH_BYTES_MAX;
        let Phase::Selected(sel) = &self.phase else {
            unreachable!("the selected state")
        };
        let (seq_largest, uid_largest) = (sets::largest(&sel.msgs, false), sets::largest(&sel.msgs, true));
        for (i, m) in sel.msgs.iter().enumerate() {
            let pos = Position {
                seq: i as u32 + 1,
                seq_largest,
                uid_largest,
            };
            let mut body = None;
            let hit = loop {
                match search::matches(&key, pos, m, body.as_deref()) {
                    Ok(hit) => break hit,
                    Err(SearchError::Unsupported(why)) => return no(tag, None, why),
                    Err(SearchError::NeedBody) => {
                        let size = m.listed.meta.size_bytes;
                        if size > budget {
                            return no(tag, None, "the search reads too many bytes: narrow it down");
                        }
                        budget -= size;
                        match self.services.mail.read(&m.listed).await {
                            Ok(b) => body = Some(b),
                            Err(_) => return no(tag, None, "a message cannot be read now"),
                        }
                    }
                }
            };
            if hit {
                hits.push(if uid { m.uid } else { i as u32 + 1 });
                highest_hit = highest_hit.max(m.modseq);
            }
        }
        // A search by MODSEQ names the highest of what it found (RFC 7162
        // 3.1.5).
        let modseq = (by_modseq && !hits.is_empty()).then(|| fetch::modseq_nz(highest_hit));
        self.data(Data::Search(hits.into_iter().map(nz).collect(), modseq));
        ok(tag, None, "SEARCH completed")
    }
}
