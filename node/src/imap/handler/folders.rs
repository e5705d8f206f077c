//! The folder commands: NAMESPACE, LIST and LSUB, STATUS, CREATE, DELETE,
//! RENAME, SUBSCRIBE and UNSUBSCRIBE. Folders and subscriptions are names
//! in the Raft state (see `quill_proto::imap::folders`); every change
//! names the id it expects, so a stale session cannot undo a newer one.

use std::borrow::Cow;

use imap_next::imap_types::core::{IString, Tag};
use imap_next::imap_types::extensions::namespace::Namespace;
use imap_next::imap_types::flag::FlagNameAttribute;
use imap_next::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_next::imap_types::response::{Data, Status};
use imap_next::imap_types::status::{StatusDataItem, StatusDataItemName};
use quill_proto::imap::folders;
use quill_proto::imap::reply::{children, delimiter, list_data, mailbox_as_bytes, no, no_code, nz, ok, special};
use quill_proto::imap::sets::wildcard_match;
use replication::replica::Listed;
use tracing::debug;

use super::state::{Handler, Phase};
use crate::uids::sequence_name;

impl Handler {
    pub(super) fn namespace(&mut self, tag: Tag<'static>) -> Status<'static> {
        let personal = vec![Namespace {
            prefix: IString::try_from("").expect("valid"),
            delimiter: delimiter(),
            extensions: vec![],
        }];
        self.data(Data::Namespace {
            personal,
            other: vec![],
            shared: vec![],
        });
        ok(tag, None, "NAMESPACE completed")
    }

    /// LIST or LSUB.
    pub(super) fn list(
        &mut self,
        tag: Tag<'static>,
        user: &str,
        reference: &Mailbox<'_>,
        mailbox_wildcard: &ListMailbox<'_>,
        lsub: bool,
    ) -> Status<'static> {
        let pattern = match mailbox_wildcard {
            ListMailbox::Token(t) => String::from_utf8_lossy(t.as_ref()).into_owned(),
            ListMailbox::String(s) => String::from_utf8_lossy(s.as_ref()).into_owned(),
        };
        let reference = String::from_utf8_lossy(mailbox_as_bytes(reference)).into_owned();
        let done = if lsub { "LSUB completed" } else { "LIST completed" };
        if pattern.is_empty() {
            // The hierarchy delimiter and root.
            let mailbox = Mailbox::try_from("").unwrap_or(Mailbox::Inbox);
            self.data(list_data(lsub, vec![FlagNameAttribute::Noselect], mailbox));
            return ok(tag, None, done);
        }
        let full = format!("{reference}{pattern}");
        let names = self.services.uids.names(&folders::scope(user));
        let found = folders::list(&names, |n| wildcard_match(&full, n));
        let subscribed = lsub.then(|| self.services.uids.names(&folders::subscriptions(user)));
        let mut shown = 0usize;
        for l in found {
            if let Some(subs) = &subscribed
                && l.name != folders::INBOX
                && !subs.contains_key(&l.name)
            {
                continue;
            }
            let mut items = Vec::new();
            if l.noselect {
                items.push(FlagNameAttribute::Noselect);
            }
            items.push(children(l.children));
            if let Some(attr) = folders::special_use(&l.name) {
                items.push(special(attr));
            }
            let Ok(mailbox) = Mailbox::try_from(l.name) else {
                continue;
            };
            self.data(list_data(lsub, items, mailbox));
            shown += 1;
        }
        if let Some(subs) = subscribed {
            // Subscriptions to folders that do not exist (any more), and
            // (RFC 3501 6.3.9) a level above a subscribed folder that the
            // pattern matches where it does not match the folder itself
            // (`%` stops at the delimiter), the level not subscribed:
            // both \Noselect.
            let mut extra: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
            for name in subs.keys() {
                if !names.contains_key(name) && wildcard_match(&full, name) {
                    extra.insert(name.clone());
                }
                if !wildcard_match(&full, name) {
                    extra.extend(
                        folders::superiors(name)
                            .into_iter()
                            .filter(|p| !subs.contains_key(p) && wildcard_match(&full, p)),
                    );
                }
            }
            for name in extra {
                let Ok(mailbox) = Mailbox::try_from(name) else {
                    continue;
                };
                self.data(list_data(true, vec![FlagNameAttribute::Noselect], mailbox));
                shown += 1;
            }
        }
        debug!(user, shown, "imap list");
        ok(tag, None, done)
    }

    pub(super) async fn status_of(
        &mut self,
        tag: Tag<'static>,
        user: &str,
        mailbox: Mailbox<'static>,
        item_names: &[StatusDataItemName],
    ) -> Status<'static> {
        let folder = match self.folder(user, &mailbox) {
            Ok(f) => f,
            Err(s) => return s(tag),
        };
        let super::mailbox::Listing {
            validity,
            next,
            highest_modseq,
            msgs,
        } = match self.folder_now(user, &folder).await {
            Ok(v) => v,
            Err(s) => return s(tag),
        };
        let msgs: Vec<(u32, Listed)> = msgs.into_iter().map(|(u, _, l)| (u, l)).collect();
        let count = |flag: &str| msgs.iter().filter(|(_, l)| l.meta.marks.has(flag)).count() as u32;
        // Claimed on this node and taken by no session yet (see
        // `membership::recent`).
        let ids: Vec<[u8; 16]> = msgs.iter().map(|(_, l)| l.meta.id.0).collect();
        let recent = self
            .services
            .uids
            .count_recent(&crate::uids::sequence_name(user, &folder.id), &ids);
        let deleted_bytes = |msgs: &[(u32, Listed)]| {
            msgs.iter()
                .filter(|(_, l)| l.meta.marks.has("\\Deleted"))
                .map(|(_, l)| l.meta.size_bytes)
                .sum()
        };
        let items: Vec<StatusDataItem> = item_names
            .iter()
            .map(|name| match name {
                StatusDataItemName::Messages => StatusDataItem::Messages(msgs.len() as u32),
                StatusDataItemName::Recent => StatusDataItem::Recent(recent as u32),
                StatusDataItemName::UidNext => StatusDataItem::UidNext(nz(next)),
                StatusDataItemName::UidValidity => StatusDataItem::UidValidity(nz(validity)),
                StatusDataItemName::Unseen => StatusDataItem::Unseen(msgs.len() as u32 - count("\\Seen")),
                StatusDataItemName::Deleted => StatusDataItem::Deleted(count("\\Deleted")),
                StatusDataItemName::DeletedStorage => StatusDataItem::DeletedStorage(deleted_bytes(&msgs)),
                // RFC 7162 3.1.6 (0 where mod-sequences are not kept).
                StatusDataItemName::HighestModSeq => {
                    StatusDataItem::HighestModSeq(if self.services.uids.modseqs_kept() {
                        highest_modseq
                    } else {
                        0
                    })
                }
            })
            .collect();
        self.data(Data::Status {
            mailbox,
            items: Cow::Owned(items),
        });
        ok(tag, None, "STATUS completed")
    }

    pub(super) async fn subscribe(&mut self, tag: Tag<'static>, user: &str, mailbox: &Mailbox<'_>) -> Status<'static> {
        let name = match folders::canonical(mailbox_as_bytes(mailbox)) {
            Ok(n) => n,
            Err(why) => return no(tag, None, why),
        };
        if name == folders::INBOX {
            return ok(tag, None, "SUBSCRIBE completed");
        }
        // Subscribing to a folder that does not exist (yet) is allowed
        // (RFC 3501 6.3.6 lets a server refuse; clients subscribe before
        // or after CREATE).
        match self
            .services
            .uids
            .bind(&folders::subscriptions(user), vec![(name, [0; 16])])
            .await
        {
            Ok(()) => ok(tag, None, "SUBSCRIBE completed"),
            Err(e) => self.refused(tag, &e),
        }
    }

    pub(super) async fn unsubscribe(
        &mut self,
        tag: Tag<'static>,
        user: &str,
        mailbox: &Mailbox<'_>,
    ) -> Status<'static> {
        let name = match folders::canonical(mailbox_as_bytes(mailbox)) {
            Ok(n) => n,
            Err(why) => return no(tag, None, why),
        };
        let scope = folders::subscriptions(user);
        if !self.services.uids.names(&scope).contains_key(&name) {
            return no_code(tag, "NONEXISTENT", "not subscribed");
        }
        match self.services.uids.unbind(&scope, vec![(name, [0; 16])]).await {
            Ok(()) => ok(tag, None, "UNSUBSCRIBE completed"),
            Err(e) => self.refused(tag, &e),
        }
    }

    pub(super) async fn create(&mut self, tag: Tag<'static>, user: &str, mailbox: &Mailbox<'_>) -> Status<'static> {
        let (name, names) = match self.free_name(&tag, user, mailbox) {
            Ok(v) => v,
            Err(s) => return s,
        };
        let scope = folders::scope(user);
        let mut items = self.missing_superiors(&name, &names);
        items.push((name, self.new_folder_id()));
        if names.len() + items.len() > folders::FOLDERS_MAX {
            return no_code(tag, "LIMIT", "too many folders (at most 1000)");
        }
        match self.services.uids.bind(&scope, items).await {
            Ok(()) => ok(tag, None, "CREATE completed"),
            Err(e) => self.refused(tag, &e),
        }
    }

    pub(super) async fn delete_folder(
        &mut self,
        tag: Tag<'static>,
        user: &str,
        mailbox: &Mailbox<'_>,
    ) -> Status<'static> {
        let folder = match self.folder(user, mailbox) {
            Ok(f) => f,
            Err(s) => return s(tag),
        };
        if folder.is_inbox() {
            return no_code(tag, "CANNOT", "INBOX cannot be deleted");
        }
        if let Phase::Selected(sel) = &self.phase
            && sel.folder.id == folder.id
        {
            self.phase = Phase::Authenticated { user: user.to_owned() };
        }
        let scope = folders::scope(user);
        if let Err(e) = self
            .services
            .uids
            .unbind(&scope, vec![(folder.name.clone(), folder.raw)])
            .await
        {
            return self.refused(tag, &e);
        }
        // Gone from every listing now; its messages and UIDs follow.
        let msgs = self.folder_messages(user, &folder).await;
        if !msgs.is_empty() && self.services.mail.delete(user, &msgs).await.is_err() {
            debug!(user, "imap: a deleted folder's messages are not all deleted yet");
        }
        let _ = self.services.uids.drop_folder(&sequence_name(user, &folder.id)).await;
        ok(tag, None, "DELETE completed")
    }

    pub(super) async fn rename(
        &mut self,
        tag: Tag<'static>,
        user: &str,
        from: &Mailbox<'_>,
        to: &Mailbox<'_>,
    ) -> Status<'static> {
        let folder = match self.folder(user, from) {
            Ok(f) => f,
            Err(s) => return s(tag),
        };
        if folder.is_inbox() {
            return no_code(
                tag,
                "CANNOT",
                "renaming INBOX is not supported: MOVE its messages instead",
            );
        }
        let (new, names) = match self.free_name(&tag, user, to) {
            Ok(v) => v,
            Err(s) => return s,
        };
        let scope = folders::scope(user);
        if new.starts_with(&format!("{}{}", folder.name, folders::DELIMITER)) {
            return no_code(tag, "CANNOT", "a folder cannot go below itself");
        }
        let moves = folders::renames(&names, &folder.name, &new);
        if moves
            .iter()
            .any(|(_, _, to)| folders::canonical(to.as_bytes()).is_err())
        {
            return no(tag, None, "a folder below would get a name too long or too deep");
        }
        if let Err(e) = self.services.uids.rename(&scope, moves).await {
            return self.refused(tag, &e);
        }
        // The levels above the new name, as CREATE makes them.
        let names = self.services.uids.names(&scope);
        let missing = self.missing_superiors(&new, &names);
        if !missing.is_empty() {
            let _ = self.services.uids.bind(&scope, missing).await;
        }
        if let Phase::Selected(sel) = &mut self.phase
            && sel.folder.id == folder.id
        {
            sel.folder.name = new;
        }
        ok(tag, None, "RENAME completed")
    }
}
