//! What each user's copy of a message becomes, decided once by the node
//! that takes it, before any copy is stored: the user's Sieve script
//! (folders with their flags, redirects, a vacation reply, discard), or
//! else the sub-address's folder (`--subaddress-folders`), or else INBOX.

use quill_proto::imap::folders;
use quill_proto::sieve::{self, Envelope};
use quill_proto::smtp::Rcpt;
use tracing::{debug, info, warn};

use crate::services::Services;

/// One stored copy: a user's mailbox, the folder (INBOX or a folder's
/// id) and the flags it starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Copy {
    pub mailbox: String,
    pub folder: String,
    pub flags: Vec<String>,
}

/// What a message becomes for all its local users.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub copies: Vec<Copy>,
    /// Sieve redirects: the user who redirects, and where to.
    pub redirects: Vec<(String, Vec<String>)>,
    /// Vacation replies to queue: recipient, message.
    pub replies: Vec<(String, Vec<u8>)>,
}

/// Decides every local user's copy of `body` (envelope sender `from`).
pub(super) async fn plan(services: &Services, rcpts: &[Rcpt], from: &str, body: &[u8]) -> Plan {
    let mut plan = Plan::default();
    let mut done: Vec<&str> = Vec::new();
    for r in rcpts {
        for d in &r.dests {
            if done.contains(&d.mailbox.as_str()) {
                continue;
            }
            done.push(&d.mailbox);
            let inbox = |flags: Vec<String>| Copy {
                mailbox: d.mailbox.clone(),
                folder: folders::INBOX.to_owned(),
                flags,
            };
            let script = if d.tap { None } else { services.routing.sieve(&d.user) };
            let Some(script) = script else {
                let folder = match (&d.tag, services.limits().subaddress_folders) {
                    (Some(tag), true) if !d.tap => folder_id(services, &d.mailbox, tag, false).await,
                    _ => folders::INBOX.to_owned(),
                };
                plan.copies.push(Copy {
                    folder,
                    ..inbox(vec![])
                });
                continue;
            };
            let env = Envelope { from, to: &r.address };
            let actions = sieve::run(&script, body, env);
            for e in &actions.errors {
                warn!(user = %d.user, "sieve: {e}; the message is kept");
            }
            if let Some(flags) = actions.keep {
                plan.copies.push(inbox(flags));
            }
            for f in actions.fileinto {
                let folder = folder_id(services, &d.mailbox, &f.folder, f.create).await;
                let copy = Copy {
                    mailbox: d.mailbox.clone(),
                    folder,
                    flags: f.flags,
                };
                // A folder that does not exist is INBOX: once there.
                if !plan
                    .copies
                    .iter()
                    .any(|c| c.mailbox == copy.mailbox && c.folder == copy.folder)
                {
                    plan.copies.push(copy);
                }
            }
            if !actions.redirect.is_empty() {
                plan.redirects.push((d.user.clone(), actions.redirect));
            }
            if let Some(v) = actions.vacation
                && sieve::vacation::may_reply(body, from, &d.user, &v.addresses)
                && services.routing.vacation_due(&d.user, from, &v.handle, v.days).await
            {
                let now = quill_proto::message::rfc5322_date(crate::time::now_ms() / 1000);
                let id = format!(
                    "{}.vacation@{}",
                    services.mail.new_message_id(crate::time::now_ms()).to_hex(),
                    services.hostname
                );
                let reply = sieve::vacation::compose(&v, body, &d.user, from, &now, &id);
                info!(user = %d.user, to = %from, "sieve: vacation reply");
                plan.replies.push((from.to_owned(), reply));
            }
        }
    }
    plan
}

/// A message the sender's DMARC policy quarantines: every copy bound for
/// INBOX goes to the user's `Junk` folder (RFC 6154 `\Junk`) instead,
/// made if missing.
pub(super) async fn into_junk(services: &Services, plan: &mut Plan) {
    for c in plan.copies.iter_mut().filter(|c| c.folder == folders::INBOX) {
        c.folder = folder_id(services, &c.mailbox, "Junk", true).await;
    }
}

/// The id of the user's folder `name` (INBOX if it is INBOX, or does not
/// exist and may not be made, or cannot be made now).
async fn folder_id(services: &Services, mailbox: &str, name: &str, create: bool) -> String {
    let Ok(name) = folders::canonical(name.as_bytes()) else {
        return folders::INBOX.to_owned();
    };
    if name == folders::INBOX {
        return name;
    }
    let scope = folders::scope(mailbox);
    let names = services.uids.names(&scope);
    if let Some(f) = folders::resolve(&names, &name) {
        return f.id;
    }
    if !create {
        return folders::INBOX.to_owned();
    }
    if names.len() >= folders::FOLDERS_MAX {
        warn!(
            mailbox,
            "sieve: fileinto :create refused, the user has too many folders"
        );
        return folders::INBOX.to_owned();
    }
    // The folder, and each missing level above it (as IMAP CREATE does).
    let mut items = Vec::new();
    let mut prefix = String::new();
    for part in name.split(folders::DELIMITER) {
        if !prefix.is_empty() {
            prefix.push(folders::DELIMITER);
        }
        prefix.push_str(part);
        if !names.contains_key(&prefix) && prefix != folders::INBOX {
            items.push((prefix.clone(), services.mail.new_message_id(crate::time::now_ms()).0));
        }
    }
    match services.uids.bind(&scope, items).await {
        Ok(()) => {
            folders::resolve(&services.uids.names(&scope), &name).map_or_else(|| folders::INBOX.to_owned(), |f| f.id)
        }
        Err(e) => {
            debug!(mailbox, "sieve: fileinto :create failed ({e}); into INBOX");
            folders::INBOX.to_owned()
        }
    }
}
