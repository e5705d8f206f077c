//! The selected folder: SELECT and EXAMINE, the folder as listed now with
//! its UIDs (numbering new mail), what a session is told of changes made
//! elsewhere, and EXPUNGE.

use imap_next::imap_types::command::SelectParameter;
use imap_next::imap_types::core::Tag;
use imap_next::imap_types::flag::FlagPerm;
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Code, Data, Status};
use imap_next::imap_types::sequence::SequenceSet;
use membership::keywords::{KEYWORDS_PER_FOLDER_MAX, valid_keyword};
use quill_proto::imap::fetch::modseq_nz;
use quill_proto::imap::folders::{self, Folder};
use quill_proto::imap::reply::{bad, folder_flags, keywords_in_use, nz, ok, unavailable};
use quill_proto::imap::sets::set_contains;
use quill_proto::imap::{Message, sets, sync};
use replication::replica::Listed;
use tracing::debug;

use super::state::{Handler, Msg, Phase, Refusal, Selected};
use crate::uids::sequence_name;

/// Messages one SELECT shows at most (a folder holds at most this many).
pub const FOLDER_MESSAGES_MAX: usize = membership::sequence::IDS_PER_SEQUENCE_MAX;

/// A folder as listed now.
pub(super) struct Listing {
    pub validity: u32,
    pub next: u32,
    /// HIGHESTMODSEQ, read before the listing: every change stamped at or
    /// below it is in the listing (a flag change is on the replicas
    /// before it is stamped).
    pub highest_modseq: u64,
    /// The messages by UID, each with its mod-sequence (at most
    /// `highest_modseq`: one stamped since shows as that, and so shows
    /// again to a client that asks for changes since it).
    pub msgs: Vec<(u32, u64, Listed)>,
}

/// A listing's messages as a session holds them (none recent yet).
fn shown(listing: Vec<(u32, u64, Listed)>) -> Vec<Msg> {
    listing
        .into_iter()
        .map(|(uid, modseq, listed)| Msg {
            uid,
            modseq,
            listed,
            recent: false,
        })
        .collect()
}

impl Handler {
    /// The folder's UIDs and messages as listed now, numbering new ones;
    /// what lies above a UID numbered since the look began and not listed
    /// yet waits for the next look (`quill_proto::imap::sync::barrier`).
    ///
    /// A look that numbered new mail looks once more (a second listing),
    /// so that their mod-sequences (stamped by the numbering, after the
    /// look read HIGHESTMODSEQ) are not shown clamped below their own: a
    /// conditional STORE with the MODSEQ shown would fail though nothing
    /// changed.
    pub(super) async fn folder_now(&mut self, user: &str, folder: &Folder) -> Result<Listing, Refusal> {
        let (listing, numbered) = self.look(user, folder).await?;
        if numbered && self.services.uids.modseqs_kept() {
            return Ok(self.look(user, folder).await?.0);
        }
        Ok(listing)
    }

    /// One look at the folder (see [`Self::folder_now`]); and whether it
    /// numbered new mail.
    async fn look(&mut self, user: &str, folder: &Folder) -> Result<(Listing, bool), Refusal> {
        let name = sequence_name(user, &folder.id);
        let before = self.services.uids.numbers(&name, &[]);
        let next_before = before.as_ref().map_or(1, |n| n.next);
        let highest = before
            .as_ref()
            .map_or(membership::modseq::MODSEQ_UNSTAMPED, |n| n.highest_modseq);
        let mut listed = self.folder_messages(user, folder).await;
        listed.sort_by_key(|l| l.meta.id);
        listed.truncate(FOLDER_MESSAGES_MAX);
        let ids: Vec<[u8; 16]> = listed.iter().map(|l| l.meta.id.0).collect();
        let mut numbers = self.services.uids.numbers(&name, &ids);
        let missing: Vec<[u8; 16]> = match &numbers {
            None => ids.clone(),
            Some(n) => ids
                .iter()
                .zip(&n.uids)
                .filter(|(_, u)| u.is_none())
                .map(|(id, _)| *id)
                .collect(),
        };
        // A folder seen for the first time gets its sequence (and so its
        // UIDVALIDITY) even when it is empty.
        let mut numbered = false;
        if !missing.is_empty() || numbers.is_none() {
            numbered = !missing.is_empty();
            if let Err(e) = self.services.uids.assign(&name, missing).await {
                self.services.counters().imap_uid_failures.inc();
                debug!(user, error = %e, "UIDs for new mail: not all given now");
            }
            numbers = self.services.uids.numbers(&name, &ids);
        }
        let Some(numbers) = numbers else {
            return Err(|tag| unavailable(tag, "the folder's UIDs cannot be read now, try again"));
        };
        let mut msgs: Vec<(u32, u64, Listed)> = listed
            .into_iter()
            .zip(numbers.uids)
            .zip(numbers.modseqs)
            .filter_map(|((l, u), m)| u.map(|u| (u, m.min(highest), l)))
            .collect();
        msgs.sort_by_key(|(u, _, _)| *u);
        // Nothing numbered since the look began (the common case: no new
        // mail): no barrier, and no walk over the folder's UIDs under the
        // Raft state's lock (an IDLE looks twice a second).
        let barrier = if numbers.next > next_before {
            let listed_uids: Vec<u32> = msgs.iter().map(|(u, _, _)| *u).collect();
            sync::barrier(&listed_uids, self.services.uids.numbered_from(&name, next_before))
        } else {
            None
        };
        let mut next = numbers.next;
        if let Some(b) = barrier {
            msgs.retain(|(u, _, _)| *u < b);
            next = next.min(b);
        }
        let listing = Listing {
            validity: numbers.validity,
            next,
            highest_modseq: highest,
            msgs,
        };
        Ok((listing, numbered))
    }

    pub(super) async fn select(
        &mut self,
        tag: Tag<'static>,
        user: String,
        mailbox: Mailbox<'static>,
        read_only: bool,
        params: Vec<SelectParameter>,
    ) -> Status<'static> {
        let resync = match self.select_parameters(params) {
            Ok(r) => r,
            Err(why) => return bad(Some(tag), why),
        };
        // A folder selected before is closed (RFC 7162 3.2.11: said once
        // CONDSTORE and QRESYNC are announced), and a failed SELECT leaves
        // none selected (RFC 3501 6.3.1).
        if matches!(self.phase, Phase::Selected(_)) && self.services.uids.modseqs_kept() {
            self.untagged_ok(Code::Closed, "the folder selected before is closed");
        }
        self.phase = Phase::Authenticated { user: user.clone() };
        let folder = match self.folder(&user, &mailbox) {
            Ok(f) => f,
            Err(s) => return s(tag),
        };
        let Listing {
            validity,
            next: uid_next,
            highest_modseq,
            msgs,
        } = match self.folder_now(&user, &folder).await {
            Ok(v) => v,
            Err(s) => return s(tag),
        };
        let mut msgs = shown(msgs);
        let n = msgs.len() as u32;
        // \Recent (RFC 3501 2.3.2): SELECT takes this node's claims on the
        // folder's messages; EXAMINE counts them and leaves them. What was
        // recent to this session before stays so.
        let seq = sequence_name(&user, &folder.id);
        let ids: Vec<[u8; 16]> = msgs.iter().map(|m| m.listed.meta.id.0).collect();
        let present: std::collections::HashSet<[u8; 16]> = ids.iter().copied().collect();
        let mut held = self.recent_held.remove(&folder.id).unwrap_or_default();
        held.retain(|id| present.contains(id));
        let unclaimed = if read_only {
            self.services.uids.count_recent(&seq, &ids)
        } else {
            held.extend(self.services.uids.take_recent(&seq, &ids));
            0
        };
        let mut recent = std::collections::HashSet::new();
        for m in msgs.iter_mut().filter(|m| held.contains(&m.listed.meta.id.0)) {
            m.recent = true;
            recent.insert(m.uid);
        }
        let n_recent = recent.len() + unclaimed;
        self.recent_held.insert(folder.id.clone(), held);
        let defined = self.folder_keywords(&seq, keywords_in_use(&msgs)).await;
        let flags = folder_flags(&msgs, &defined);
        let mut permanent: Vec<FlagPerm<'static>> = flags.iter().cloned().map(Into::into).collect();
        permanent.push(FlagPerm::Asterisk);
        self.data(Data::Flags(flags));
        self.data(Data::Exists(n));
        self.data(Data::Recent(n_recent as u32));
        if let Some(first) = msgs.iter().position(|m| !m.has("\\Seen")) {
            self.untagged_ok(Code::Unseen(nz(first as u32 + 1)), "first unseen");
        }
        self.untagged_ok(Code::PermanentFlags(permanent), "flags are stored");
        self.untagged_ok(Code::UidValidity(nz(validity)), "UIDs valid");
        self.untagged_ok(Code::UidNext(nz(uid_next)), "predicted next UID");
        if self.services.uids.modseqs_kept() {
            self.untagged_ok(Code::HighestModSeq(modseq_nz(highest_modseq)), "highest mod-sequence");
        }
        if let Some(r) = resync {
            self.resync(&r, validity, uid_next, &msgs);
        }
        let user_for_watch = user.clone();
        self.phase = Phase::Selected(Box::new(Selected {
            user,
            folder,
            read_only,
            validity,
            uid_next,
            highest_modseq,
            msgs,
            keywords: Default::default(),
            // EXAMINE counts claims it does not take: none is this
            // session's to tell of later.
            told_recent: recent.len(),
            recent,
            watch: self.services.mail.subscribe(&user_for_watch),
            looked: std::time::Instant::now(),
            coming_until: None,
        }));
        if read_only {
            ok(tag, Some(Code::ReadOnly), "EXAMINE completed")
        } else {
            ok(tag, Some(Code::ReadWrite), "SELECT completed")
        }
    }

    /// What changed in the selected folder since the session last looked
    /// (see `quill_proto::imap::sync`). A folder deleted by another
    /// session loses every message (and its sequence is not made again by
    /// a listing); one made anew (another UIDVALIDITY) says nothing: the
    /// client must start over.
    pub async fn sync(&mut self) -> Vec<Data<'static>> {
        let Phase::Selected(sel) = &self.phase else {
            return vec![];
        };
        let (user, folder) = (sel.user.clone(), sel.folder.clone());
        if !folder.is_inbox()
            && !self
                .services
                .uids
                .names(&folders::scope(&user))
                .values()
                .any(|id| *id == folder.raw)
        {
            let Phase::Selected(sel) = &mut self.phase else {
                return vec![];
            };
            let n = sel.msgs.len();
            sel.msgs.clear();
            return (0..n).map(|_| Data::Expunge(nz(1))).collect();
        }
        let Ok(listing) = self.folder_now(&user, &folder).await else {
            return vec![];
        };
        let tell = self.tell();
        let Phase::Selected(sel) = &mut self.phase else {
            return vec![];
        };
        sel.looked = std::time::Instant::now();
        if listing.validity != sel.validity {
            return vec![];
        }
        let mut now = shown(listing.msgs);
        // A mod-sequence shown is never shown lower later (a look shows
        // one stamped after it began as its HIGHESTMODSEQ).
        if tell.modseq {
            let shown_before: std::collections::HashMap<u32, u64> =
                sel.msgs.iter().map(|m| (m.uid, m.modseq)).collect();
            for m in &mut now {
                if let Some(&old) = shown_before.get(&m.uid) {
                    m.modseq = m.modseq.max(old);
                }
            }
        }
        let before = sel.msgs.last().map_or(0, |m| m.uid);
        sel.highest_modseq = sel.highest_modseq.max(listing.highest_modseq);
        let mut out = sync::sync(&mut sel.msgs, now, &mut sel.uid_next, listing.next, tell);
        // New messages whose claim this session takes are \Recent to it.
        if !sel.read_only {
            let fresh: Vec<[u8; 16]> = sel
                .msgs
                .iter()
                .filter(|m| m.uid > before)
                .map(|m| m.listed.meta.id.0)
                .collect();
            if !fresh.is_empty() {
                let seq = sequence_name(&user, &folder.id);
                let taken: std::collections::HashSet<[u8; 16]> =
                    self.services.uids.take_recent(&seq, &fresh).into_iter().collect();
                sel.recent.extend(
                    sel.msgs
                        .iter()
                        .filter(|m| taken.contains(&m.listed.meta.id.0))
                        .map(|m| m.uid),
                );
            }
        }
        let news = sel.recent_news();
        let recent_now = sel.recent.len() as u32;
        let in_use = keywords_in_use(&sel.msgs);
        for m in &mut sel.msgs {
            m.recent = sel.recent.contains(&m.uid);
        }
        let held = sel
            .msgs
            .iter()
            .filter(|m| m.recent)
            .map(|m| m.listed.meta.id.0)
            .collect();
        self.recent_held.insert(folder.id.clone(), held);
        // Keywords defined for the folder elsewhere (RFC 3501 7.2.6: every
        // session of a folder is told the same keywords, a keyword no
        // message carries any more too), announced before the changes.
        let seq = sequence_name(&user, &folder.id);
        let defined = self.folder_keywords(&seq, in_use).await;
        if let Phase::Selected(sel) = &mut self.phase
            && !sel.keywords.defined(&defined).is_empty()
        {
            let (flags, permanent) = sel.keywords.announcement();
            self.data(flags);
            self.status(permanent);
        }
        // RECENT goes with EXISTS, and follows EXPUNGE when the count
        // moved (RFC 3501 7.3.2); a client that counts on it sees no other
        // sign of it.
        match (out.iter().rposition(|d| matches!(d, Data::Exists(_))), news) {
            (Some(i), _) => out.insert(i + 1, Data::Recent(recent_now)),
            (None, Some(news)) => out.push(news),
            (None, None) => {}
        }
        out
    }

    /// The keywords folder `seq` defines, after defining those of
    /// `in_use` it did not (`membership::keywords`): a session that uses or
    /// first sees a keyword makes it known to every session of the folder.
    pub(super) async fn folder_keywords(&self, seq: &str, in_use: Vec<String>) -> Vec<String> {
        let defined = self.services.uids.keywords(seq);
        if defined.len() >= KEYWORDS_PER_FOLDER_MAX {
            return defined;
        }
        let missing: Vec<String> = in_use
            .into_iter()
            .filter(|k| valid_keyword(k) && !defined.iter().any(|d| d.eq_ignore_ascii_case(k)))
            .collect();
        if missing.is_empty() {
            return defined;
        }
        if let Err(e) = self.services.uids.define_keywords(seq, missing).await {
            debug!(seq, error = %e, "keywords not defined for the folder now");
        }
        self.services.uids.keywords(seq)
    }

    /// Whether `folder` is the one selected.
    pub(super) fn is_selected(&self, folder: &Folder) -> bool {
        matches!(&self.phase, Phase::Selected(sel) if sel.folder.id == folder.id)
    }

    /// Tells the session what changed in its folder ([`Self::sync`]) among
    /// the command's responses: after a command that added to the folder
    /// itself (APPEND, COPY or MOVE into it).
    pub(super) async fn tell_changes(&mut self) {
        for d in self.sync().await {
            self.data(d);
        }
    }

    /// Deletes the folder's `\Deleted` messages (in `only`, if given) on
    /// every replica, then tells the client (when `tell`).
    pub(super) async fn expunge(&mut self, only: Option<SequenceSet>, tell: bool) -> Result<(), &'static str> {
        let Phase::Selected(sel) = &mut self.phase else {
            return Ok(());
        };
        if sel.read_only {
            return Ok(());
        }
        let largest = sets::largest(&sel.msgs, true);
        let victims: Vec<usize> = sel
            .msgs
            .iter()
            .enumerate()
            .filter(|(_, m)| m.has("\\Deleted") && only.as_ref().is_none_or(|s| set_contains(s, m.uid, largest)))
            .map(|(i, _)| i)
            .collect();
        if victims.is_empty() {
            return Ok(());
        }
        let listed: Vec<Listed> = victims.iter().map(|i| sel.msgs[*i].listed.clone()).collect();
        let user = sel.user.clone();
        let seq = sequence_name(&user, &sel.folder.id);
        if self.services.mail.delete(&user, &listed).await.is_err() {
            return Err("the messages could not be deleted now, try again");
        }
        let ids: Vec<[u8; 16]> = listed.iter().map(|l| l.meta.id.0).collect();
        let _ = self.services.uids.forget(&seq, ids).await;
        self.remove_shown(victims, tell);
        Ok(())
    }

    /// Takes messages (positions, ascending) out of the selected folder in
    /// one pass, telling the client each EXPUNGE (when `tell`), last first
    /// so that the numbers stay right.
    pub(super) fn remove_shown(&mut self, positions: Vec<usize>, tell: bool) {
        let vanished = self.qresync;
        let Phase::Selected(sel) = &mut self.phase else {
            return;
        };
        let uids: Vec<u32> = positions.iter().map(|&i| sel.msgs[i].uid).collect();
        let mut gone = vec![false; sel.msgs.len()];
        for &i in &positions {
            gone[i] = true;
        }
        let mut i = 0;
        sel.msgs.retain(|_| {
            i += 1;
            !gone[i - 1]
        });
        let news = sel.recent_news();
        if tell {
            // QRESYNC: one VANISHED by UID (RFC 7162 3.2.10).
            match sets::uid_set(&uids) {
                Some(known_uids) if vanished => self.data(Data::Vanished {
                    earlier: false,
                    known_uids,
                }),
                _ => {
                    for i in positions.into_iter().rev() {
                        self.data(Data::Expunge(nz(i as u32 + 1)));
                    }
                }
            }
            if let Some(news) = news {
                self.data(news);
            }
        }
    }
}
