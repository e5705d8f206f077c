//! QUOTA (RFC 9208): a user's storage, its usage and limit, as the root
//! `""` of every folder of the user (no root when the user has no quota),
//! and the check APPEND and COPY make before they store (`NO
//! [OVERQUOTA]`). Quotas are set by the operator (`quill admin user
//! quota`), never over IMAP.

use imap_next::imap_types::core::{AString, Tag, Vec1};
use imap_next::imap_types::extensions::quota::{QuotaGet, Resource};
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Code, Data, Status};
use quill_proto::imap::reply::{no, ok};

use super::state::Handler;

/// The name of a user's one quota root.
const ROOT: &str = "";

impl Handler {
    /// The user's quota in bytes, if any (`mailbox` is the user's mailbox
    /// name: the address, or `address#N` for a later user of it).
    pub(super) fn quota_of(&self, mailbox: &str) -> Option<u64> {
        let address = mailbox.split('#').next().unwrap_or(mailbox);
        self.services
            .directory
            .user(address)
            .filter(|u| u.mailbox() == mailbox)
            .and_then(|u| u.quota_bytes)
    }

    /// Whether `adding` more bytes would take the user over quota: the
    /// refusal to send, if so.
    pub(super) async fn over_quota(&self, tag: &Tag<'static>, mailbox: &str, adding: u64) -> Option<Status<'static>> {
        let quota = self.quota_of(mailbox)?;
        let over = crate::mail::over_quota(&*self.services.mail, mailbox, quota, adding).await;
        over.then(|| {
            no(
                tag.clone(),
                Some(Code::OverQuota),
                "the mailbox is over its quota: delete some mail first",
            )
        })
    }

    async fn quota_data(&mut self, mailbox: &str, quota: u64) {
        let used = crate::mail::exact_usage(&*self.services.mail, mailbox).await;
        let q = QuotaGet::new(Resource::Storage, used.div_ceil(1024), quota.div_ceil(1024));
        self.data(Data::Quota {
            root: AString::try_from(ROOT).expect("valid"),
            quotas: Vec1::from(q),
        });
    }

    pub(super) async fn get_quota_root(
        &mut self,
        tag: Tag<'static>,
        user: &str,
        mailbox: Mailbox<'static>,
    ) -> Status<'static> {
        let quota = self.quota_of(user);
        let roots = match quota {
            Some(_) => vec![AString::try_from(ROOT).expect("valid")],
            None => vec![],
        };
        self.data(Data::QuotaRoot { mailbox, roots });
        if let Some(q) = quota {
            self.quota_data(user, q).await;
        }
        ok(tag, None, "GETQUOTAROOT completed")
    }

    pub(super) async fn get_quota(&mut self, tag: Tag<'static>, user: &str, root: &AString<'_>) -> Status<'static> {
        let is_root = AsRef::<[u8]>::as_ref(root).is_empty();
        match (self.quota_of(user), is_root) {
            (Some(q), true) => {
                self.quota_data(user, q).await;
                ok(tag, None, "GETQUOTA completed")
            }
            _ => no(tag, None, "no such quota root"),
        }
    }
}
