//! Sessions that exclude others: a POP3 session holds its mailbox (on this
//! node, then cluster-wide at the user's manager, RFC 1939 §8), and an IMAP
//! session counts against its user's limit on this node.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::mail::Mail;

/// The mailboxes held and the IMAP sessions counted on this node.
pub struct Locks {
    mail: Arc<dyn Mail>,
    /// The limits in force (IMAP sessions per user).
    live: super::LiveLimits,
    pop3: Mutex<HashSet<String>>,
    imap_users: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for Locks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locks").finish()
    }
}

impl Locks {
    pub fn new(mail: Arc<dyn Mail>, live: super::LiveLimits) -> Arc<Locks> {
        Arc::new(Locks {
            mail,
            live,
            pop3: Mutex::default(),
            imap_users: Mutex::default(),
        })
    }

    /// One IMAP session of `user` on this node, if under the limit; given
    /// back when the guard drops.
    pub fn imap_session(self: &Arc<Self>, user: &str) -> Option<ImapSession> {
        let mut users = self.imap_users.lock().unwrap_or_else(|p| p.into_inner());
        let n = users.entry(user.to_owned()).or_insert(0);
        if *n >= self.live.get().imap_sessions_per_user_max {
            return None;
        }
        *n += 1;
        Some(ImapSession {
            locks: self.clone(),
            user: user.to_owned(),
        })
    }

    /// Takes the POP3 lock of a mailbox on this node (RFC 1939 §8: one
    /// session at a time); the session then takes it at the user's manager.
    pub fn lock_mailbox(self: &Arc<Self>, user: &str) -> Option<MailboxLock> {
        let mut locks = self.pop3.lock().unwrap_or_else(|p| p.into_inner());
        if !locks.insert(user.to_owned()) {
            return None;
        }
        Some(MailboxLock {
            locks: self.clone(),
            user: user.to_owned(),
            cluster: None,
            renewal: None,
        })
    }
}

/// An IMAP session counted against its user's limit.
#[derive(Debug)]
pub struct ImapSession {
    locks: Arc<Locks>,
    user: String,
}

impl Drop for ImapSession {
    fn drop(&mut self) {
        let mut users = self.locks.imap_users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
    }
}

/// Held by a POP3 session while it owns a mailbox: on this node, and
/// (`cluster`) at the user's manager.
#[derive(Debug)]
pub struct MailboxLock {
    locks: Arc<Locks>,
    user: String,
    /// The manager that granted the cluster-wide lock, and its token.
    cluster: Option<(u64, u64)>,
    /// Renews the cluster-wide lock's lease while the session lives.
    renewal: Option<tokio::task::AbortHandle>,
}

impl MailboxLock {
    /// Notes the cluster-wide lock (if the manager granted one) and keeps
    /// its lease renewed until the lock goes.
    pub fn hold_cluster(&mut self, granted: Option<(u64, u64)>) {
        self.cluster = granted;
        let Some((manager, token)) = granted else { return };
        let (mail, user) = (self.locks.mail.clone(), self.user.clone());
        let every = replication::replica::MAILBOX_LOCK_LEASE / 4;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if !mail.renew_mailbox_lock(&user, manager, token).await {
                    tracing::warn!(%user, manager, "mailbox lock lost to another session (its lease ran out)");
                    return;
                }
            }
        });
        self.renewal = Some(task.abort_handle());
    }

    /// Releases the lock at the manager, waiting for it, then on this node:
    /// a session that ends with QUIT releases before it answers, so that a
    /// client reconnecting right after `+OK` never meets its own lock.
    pub async fn release(mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        if let Some((manager, token)) = self.cluster.take() {
            self.locks.mail.unlock_mailbox(&self.user, manager, token).await;
        }
    }
}

impl Drop for MailboxLock {
    fn drop(&mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        self.locks
            .pop3
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.user);
        if let Some((manager, token)) = self.cluster
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (mail, user) = (self.locks.mail.clone(), self.user.clone());
            rt.spawn(async move { mail.unlock_mailbox(&user, manager, token).await });
        }
    }
}
