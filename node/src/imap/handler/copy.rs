//! COPY and MOVE (with COPYUID), and APPEND (with APPENDUID): new
//! messages in a folder. MOVE changes the folder register of the messages
//! (they keep their id and body) after numbering them in the destination;
//! COPY stores new messages, all or nothing.

use imap_next::imap_types::core::Tag;
use imap_next::imap_types::flag::Flag;
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Code, Status};
use imap_next::imap_types::sequence::SequenceSet;
use quill_proto::imap::folders::Folder;
use quill_proto::imap::reply::{bad, copy_uid, limit, name_of_flag, no, nz, ok, unavailable};
use quill_proto::imap::{COPY_MESSAGES_MAX, FLAG_BYTES_MAX, FLAGS_PER_COMMAND_MAX, sets};
use replication::MarkChange;
use replication::replica::Listed;
use tracing::debug;

use super::state::{Handler, Phase};
use crate::mail::store_one;
use crate::mail::{flag_change, fresh_listed};
use crate::uids::sequence_name;

impl Handler {
    /// COPY or MOVE (and their UID forms) to `mailbox`.
    pub(super) async fn copy_or_move(
        &mut self,
        tag: Tag<'static>,
        set: SequenceSet,
        mailbox: Mailbox<'static>,
        uid: bool,
        is_move: bool,
    ) -> Status<'static> {
        let Phase::Selected(sel) = &self.phase else {
            unreachable!("the selected state")
        };
        let user = sel.user.clone();
        if is_move && sel.read_only {
            return no(tag, Some(Code::ReadOnly), "the folder is read-only (EXAMINE)");
        }
        let source = sel.folder.clone();
        let dest = match self.folder(&user, &mailbox) {
            Ok(f) => f,
            Err(_) => return no(tag, Some(Code::TryCreate), "no such folder: CREATE it first"),
        };
        let Phase::Selected(sel) = &self.phase else {
            unreachable!("the selected state")
        };
        let targets = sets::selected(&sel.msgs, &set, uid);
        let verb = if is_move { "MOVE" } else { "COPY" };
        if targets.is_empty() {
            if !uid && !sel.msgs.is_empty() {
                return bad(Some(tag), "no such message");
            }
            return ok(tag, None, &format!("{verb} completed (no message)"));
        }
        // A COPY adds the messages' size again (a MOVE within the user's
        // mailbox adds nothing).
        if !is_move || same_folder(&dest, &source) {
            let adding: u64 = targets.iter().map(|i| sel.msgs[*i].listed.meta.size_bytes).sum();
            if let Some(refusal) = self.over_quota(&tag, &user, adding).await {
                return refusal;
            }
        }
        // A MOVE within one folder (RFC 6851 allows it) is a COPY there
        // and the originals expunged: a message keeps one UID per folder.
        let same = dest.id == source.id;
        if (!is_move || same) && targets.len() > COPY_MESSAGES_MAX {
            return limit(tag, "too many messages in one COPY (at most 10 000)");
        }
        let src_uids: Vec<u32> = targets.iter().map(|i| sel.msgs[*i].uid).collect();
        let listed: Vec<Listed> = targets.iter().map(|i| sel.msgs[*i].listed.clone()).collect();
        let dest_seq = sequence_name(&user, &dest.id);
        let made = if is_move && !same {
            self.move_to(&user, &source, &dest, &listed).await
        } else {
            self.copy_to(&user, &dest, &listed).await
        };
        let Some(new_ids) = made else {
            return unavailable(tag, "the messages could not be copied now, try again");
        };
        // COPYUID (RFC 4315): source UIDs and their UIDs in the destination.
        let code = self.services.uids.numbers(&dest_seq, &new_ids).and_then(|n| {
            let pairs: Vec<(u32, u32)> = src_uids
                .iter()
                .zip(&n.uids)
                .filter_map(|(s, d)| d.map(|d| (*s, d)))
                .collect();
            (pairs.len() == src_uids.len()).then(|| copy_uid(n.validity, &pairs))
        });
        if !is_move {
            if same {
                self.tell_changes().await;
            }
            return ok(tag, code, "COPY completed");
        }
        if same {
            // The originals go once their copies are made.
            if self.services.mail.delete(&user, &listed).await.is_err() {
                return unavailable(tag, "the messages could not be moved now, try again");
            }
            let ids: Vec<[u8; 16]> = listed.iter().map(|l| l.meta.id.0).collect();
            let _ = self.services.uids.forget(&dest_seq, ids).await;
        }
        // MOVE (RFC 6851): COPYUID untagged, then the expunges (and, within
        // one folder, the copies' EXISTS).
        if let Some(code) = code {
            self.untagged_ok(code, "moved");
        }
        self.remove_shown(targets, true);
        if same {
            self.tell_changes().await;
        }
        ok(tag, None, "MOVE completed")
    }

    /// MOVE: UIDs in the destination first (a session there numbers the
    /// messages the same once they show up in it), then the folder
    /// registers, then the source forgets their UIDs. The ids moved.
    async fn move_to(&self, user: &str, source: &Folder, dest: &Folder, listed: &[Listed]) -> Option<Vec<[u8; 16]>> {
        let ids: Vec<[u8; 16]> = listed.iter().map(|l| l.meta.id.0).collect();
        self.services
            .uids
            .assign(&sequence_name(user, &dest.id), ids.clone())
            .await
            .ok()?;
        let hlc = self.services.mail.hlc_now();
        let changes: Vec<(Listed, MarkChange)> = listed
            .iter()
            .map(|l| {
                let change = MarkChange {
                    id: l.meta.id,
                    folder: Some((dest.id.clone(), hlc)),
                    flags: vec![],
                };
                (l.clone(), change)
            })
            .collect();
        self.services.mail.mark(user, &changes).await.ok()?;
        let _ = self
            .services
            .uids
            .forget(&sequence_name(user, &source.id), ids.clone())
            .await;
        self.services.counters().imap_moves.inc_by(ids.len() as u64);
        Some(ids)
    }

    /// COPY: new messages in the destination with the source's flags, all
    /// or nothing (RFC 3501 6.4.7: the copies made before a failure are
    /// deleted). The new ids.
    async fn copy_to(&self, user: &str, dest: &Folder, listed: &[Listed]) -> Option<Vec<[u8; 16]>> {
        let mut made: Vec<Listed> = Vec::new();
        for l in listed {
            let stored = match self.services.mail.read(l).await {
                Ok(body) => store_one(&*self.services.mail, user, &dest.id, l.meta.arrival_ms, body).await,
                Err(_) => None,
            };
            let Some(stored) = stored else {
                let _ = self.services.mail.delete(user, &made).await;
                return None;
            };
            let mut copy = fresh_listed(stored.id, &dest.id, l.meta.arrival_ms, stored.copies);
            copy.meta.marks = l.meta.marks.clone();
            made.push(copy);
        }
        let hlc = self.services.mail.hlc_now();
        let changes: Vec<(Listed, MarkChange)> = made
            .iter()
            .filter(|c| c.meta.marks.set_flags().next().is_some())
            .map(|c| {
                let flags: Vec<(String, bool)> = c.meta.marks.set_flags().map(|n| (n.to_owned(), true)).collect();
                (c.clone(), flag_change(c, &flags, hlc))
            })
            .collect();
        if !changes.is_empty() && self.services.mail.mark(user, &changes).await.is_err() {
            debug!(user, "imap copy: flags of the copies not recorded everywhere");
        }
        let ids: Vec<[u8; 16]> = made.iter().map(|c| c.meta.id.0).collect();
        let _ = self
            .services
            .uids
            .assign(&sequence_name(user, &dest.id), ids.clone())
            .await;
        self.services.counters().imap_copies.inc_by(ids.len() as u64);
        Some(ids)
    }

    pub(super) async fn append(
        &mut self,
        tag: Tag<'static>,
        user: String,
        folder: Folder,
        bytes: Vec<u8>,
        flags: Vec<Flag<'static>>,
        arrival: Option<u64>,
    ) -> Status<'static> {
        if bytes.len() > self.services.limits().message_bytes_max {
            return no(tag, Some(Code::TooBig), "message larger than the size limit");
        }
        if flags.len() > FLAGS_PER_COMMAND_MAX || flags.iter().any(|f| name_of_flag(f).len() > FLAG_BYTES_MAX) {
            return limit(tag, "too many flags, or a flag name over 64 bytes");
        }
        if let Some(refusal) = self.over_quota(&tag, &user, bytes.len() as u64).await {
            return refusal;
        }
        let arrival = arrival.unwrap_or_else(crate::time::now_ms);
        let Some(stored) = store_one(&*self.services.mail, &user, &folder.id, arrival, bytes).await else {
            return unavailable(tag, "could not store the message, try again");
        };
        let id = stored.id;
        if !flags.is_empty() {
            // The copies are where the delivery put them: mark them there.
            let listed = fresh_listed(id, &folder.id, arrival, stored.copies);
            let names: Vec<(String, bool)> = flags.iter().map(|f| (name_of_flag(f), true)).collect();
            let change = flag_change(&listed, &names, self.services.mail.hlc_now());
            if self.services.mail.mark(&user, &[(listed, change)]).await.is_err() {
                debug!(user, "imap append: flags not recorded everywhere");
            }
        }
        let name = sequence_name(&user, &folder.id);
        let _ = self.services.uids.assign(&name, vec![id.0]).await;
        let uid = self.services.uids.numbers(&name, &[id.0]);
        if self.is_selected(&folder) {
            // The session that appended is told of its message (EXISTS)
            // before the tagged OK, so its next FETCH can name it.
            self.tell_changes().await;
        }
        match uid.and_then(|n| n.uids[0].map(|u| (n.validity, u))) {
            Some((validity, uid)) => ok(
                tag,
                Some(Code::AppendUid {
                    uid_validity: nz(validity),
                    uid: nz(uid),
                }),
                "APPEND completed",
            ),
            None => ok(tag, None, "APPEND completed"),
        }
    }
}

fn same_folder(a: &Folder, b: &Folder) -> bool {
    a.id == b.id
}
