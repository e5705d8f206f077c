//! How the protocol sessions reach mail: a trait over the replica protocol,
//! so that a session runs the same against the cluster (QUIC) and against
//! an in-memory network in tests, with no socket but the client's. Below
//! the protocols and the services: it uses replication only.

use std::time::Duration;

use replication::replica::watch::Subscription;
use replication::replica::{
    BoxFuture, DeliverOutcome, Listed, MailboxInUse, Network, NodeId, ReplicaError, Replicator,
};
use replication::{FlagMark, MarkChange, MessageId};

/// What SMTP, LMTP, POP3, IMAP and the outbound queue ask of the mail
/// system.
pub trait Mail: Send + Sync + 'static {
    /// A new message id (ordered by arrival).
    fn new_message_id(&self, arrival_ms: u64) -> MessageId;
    /// Stores one message for every mailbox on R nodes each.
    fn deliver_as<'a>(&'a self, m: NewMail<'a>) -> BoxFuture<'a, DeliverOutcome>;
    /// The mailbox size as the user's manager knows it (quotas).
    fn usage_bytes<'a>(&'a self, mailbox: &'a str) -> BoxFuture<'a, u64>;
    /// Every message of the mailbox across the cluster.
    fn mailbox<'a>(&'a self, mailbox: &'a str) -> BoxFuture<'a, Vec<Listed>>;
    /// One message's bytes, from any live replica.
    fn read<'a>(&'a self, msg: &'a Listed) -> BoxFuture<'a, Result<Vec<u8>, ReplicaError>>;
    /// Deletes messages on every replica.
    fn delete<'a>(&'a self, mailbox: &'a str, msgs: &'a [Listed]) -> BoxFuture<'a, Result<usize, ReplicaError>>;
    /// Whether a message of the mailbox was deleted (a replica holds its
    /// tombstone), as opposed to unreachable now.
    fn is_deleted<'a>(&'a self, mailbox: &'a str, msg: &'a Listed) -> BoxFuture<'a, bool>;
    /// A hybrid logical clock value for a folder or flag change made now.
    fn hlc_now(&self) -> u64;
    /// Changes folders and flags of messages on every replica (last
    /// writer wins per register).
    fn mark<'a>(
        &'a self,
        mailbox: &'a str,
        changes: &'a [(Listed, MarkChange)],
    ) -> BoxFuture<'a, Result<(), ReplicaError>>;
    /// Takes the mailbox for one session, cluster-wide.
    fn lock_mailbox<'a>(&'a self, mailbox: &'a str) -> BoxFuture<'a, Result<Option<(NodeId, u64)>, MailboxInUse>>;
    /// Gives a lock back at the manager that granted it.
    fn unlock_mailbox<'a>(&'a self, mailbox: &'a str, manager: NodeId, token: u64) -> BoxFuture<'a, ()>;
    /// Renews a held lock (its lease is short); false if the manager now
    /// gives the mailbox to someone else.
    fn renew_mailbox_lock<'a>(&'a self, mailbox: &'a str, manager: NodeId, token: u64) -> BoxFuture<'a, bool>;
    /// Login throttling across the cluster (see `Replicator::throttle`):
    /// `None` when no counter's manager answered.
    fn throttle<'a>(&'a self, keys: &'a [(String, u32)], window: Duration, failed: bool)
    -> BoxFuture<'a, Option<bool>>;
    /// Greylisting at the manager of `key` (see `Replicator::greylist`):
    /// whether this try passes; `None` when no manager answered.
    fn greylist<'a>(&'a self, _key: &'a str, _delay: Duration, _lifetime: Duration) -> BoxFuture<'a, Option<bool>> {
        Box::pin(async { None })
    }
    /// A session waits for changes to the mailbox (IMAP IDLE): told of
    /// them (see `replication::replica::watch`); `None` where changes are
    /// not told (the session polls).
    fn subscribe(&self, _mailbox: &str) -> Option<Subscription> {
        None
    }
}

/// A message to store: under `id`, for every one of `mailboxes`, in
/// `folder`, arrived at `arrival_ms`.
#[derive(Debug)]
pub struct NewMail<'a> {
    pub id: MessageId,
    pub mailboxes: &'a [String],
    pub folder: &'a str,
    pub arrival_ms: u64,
    pub body: Vec<u8>,
}

/// One message stored for one mailbox: its id and the nodes that hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub id: MessageId,
    pub copies: Vec<NodeId>,
}

/// Stores one new message for one mailbox (R copies, fsynced) under a new
/// id; `None` when no copy could be stored.
pub async fn store_one(mail: &dyn Mail, mailbox: &str, folder: &str, arrival_ms: u64, body: Vec<u8>) -> Option<Stored> {
    let mailboxes = [mailbox.to_owned()];
    let m = NewMail {
        id: mail.new_message_id(arrival_ms),
        mailboxes: &mailboxes,
        folder,
        arrival_ms,
        body,
    };
    store_as(mail, m).await
}

/// Stores a message (under the id given) for the one mailbox it names:
/// where its copies are, or `None` when none could be stored.
pub async fn store_as(mail: &dyn Mail, m: NewMail<'_>) -> Option<Stored> {
    debug_assert_eq!(m.mailboxes.len(), 1, "one mailbox");
    let id = m.id;
    let out = mail.deliver_as(m).await;
    out.stored.first().copied().unwrap_or(false).then(|| Stored {
        id,
        copies: out.copies.into_iter().next().unwrap_or_default(),
    })
}

impl<N: Network> Mail for Replicator<N> {
    fn new_message_id(&self, arrival_ms: u64) -> MessageId {
        self.store().new_message_id(arrival_ms)
    }

    fn deliver_as<'a>(&'a self, m: NewMail<'a>) -> BoxFuture<'a, DeliverOutcome> {
        Box::pin(Replicator::deliver_as(
            self,
            m.id,
            m.mailboxes,
            m.folder,
            m.arrival_ms,
            m.body,
        ))
    }

    fn usage_bytes<'a>(&'a self, mailbox: &'a str) -> BoxFuture<'a, u64> {
        Box::pin(Replicator::usage_bytes(self, mailbox))
    }

    fn mailbox<'a>(&'a self, mailbox: &'a str) -> BoxFuture<'a, Vec<Listed>> {
        Box::pin(Replicator::mailbox(self, mailbox))
    }

    fn read<'a>(&'a self, msg: &'a Listed) -> BoxFuture<'a, Result<Vec<u8>, ReplicaError>> {
        Box::pin(Replicator::read(self, msg))
    }

    fn is_deleted<'a>(&'a self, mailbox: &'a str, msg: &'a Listed) -> BoxFuture<'a, bool> {
        Box::pin(Replicator::is_deleted(self, mailbox, msg))
    }

    fn delete<'a>(&'a self, mailbox: &'a str, msgs: &'a [Listed]) -> BoxFuture<'a, Result<usize, ReplicaError>> {
        Box::pin(Replicator::delete(self, mailbox, msgs))
    }

    fn hlc_now(&self) -> u64 {
        Replicator::hlc_now(self)
    }

    fn mark<'a>(
        &'a self,
        mailbox: &'a str,
        changes: &'a [(Listed, MarkChange)],
    ) -> BoxFuture<'a, Result<(), ReplicaError>> {
        Box::pin(Replicator::mark(self, mailbox, changes))
    }

    fn lock_mailbox<'a>(&'a self, mailbox: &'a str) -> BoxFuture<'a, Result<Option<(NodeId, u64)>, MailboxInUse>> {
        Box::pin(Replicator::lock_mailbox(self, mailbox))
    }

    fn unlock_mailbox<'a>(&'a self, mailbox: &'a str, manager: NodeId, token: u64) -> BoxFuture<'a, ()> {
        Box::pin(Replicator::unlock_mailbox(self, mailbox, manager, token))
    }

    fn renew_mailbox_lock<'a>(&'a self, mailbox: &'a str, manager: NodeId, token: u64) -> BoxFuture<'a, bool> {
        Box::pin(Replicator::renew_mailbox_lock(self, mailbox, manager, token))
    }

    fn throttle<'a>(
        &'a self,
        keys: &'a [(String, u32)],
        window: Duration,
        failed: bool,
    ) -> BoxFuture<'a, Option<bool>> {
        Box::pin(Replicator::throttle(self, keys, window, failed))
    }

    fn greylist<'a>(&'a self, key: &'a str, delay: Duration, lifetime: Duration) -> BoxFuture<'a, Option<bool>> {
        Box::pin(Replicator::greylist(self, key, delay, lifetime))
    }

    fn subscribe(&self, mailbox: &str) -> Option<Subscription> {
        Some(Replicator::subscribe(self, mailbox))
    }
}

/// A message just stored, as a listing would show it (enough to send
/// changes to its copies).
pub fn fresh_listed(id: replication::MessageId, folder: &str, arrival_ms: u64, replicas: Vec<u64>) -> Listed {
    Listed {
        meta: replication::EntryMeta::delivered(
            id,
            replication::BodyHash([0; 32]),
            0,
            arrival_ms,
            folder.to_owned(),
            replicas,
        ),
        holders: Vec::new(),
    }
}

/// The change that sets (or clears) flags of a listed message, stamped
/// `hlc`.
pub fn flag_change(l: &Listed, flags: &[(String, bool)], hlc: u64) -> MarkChange {
    MarkChange {
        id: l.meta.id,
        folder: None,
        flags: flags
            .iter()
            .map(|(name, set)| FlagMark {
                name: name.clone(),
                set: *set,
                hlc,
            })
            .collect(),
    }
}

/// A mailbox's size, exactly: the sizes of its messages as the replicas
/// list them, each message once whatever its copies (a listing across
/// the cluster).
pub async fn exact_usage(mail: &dyn Mail, mailbox: &str) -> u64 {
    mail.mailbox(mailbox).await.iter().map(|l| l.meta.size_bytes).sum()
}

/// Whether `adding` bytes would take the mailbox past `quota`. The
/// manager's figure (cheap, kept from the replicas' reports) answers when
/// it is well below the quota; near it, the exact count decides, so mail
/// is never refused on an estimate.
pub async fn over_quota(mail: &dyn Mail, mailbox: &str, quota: u64, adding: u64) -> bool {
    let estimate = mail.usage_bytes(mailbox).await;
    if estimate.saturating_add(adding) < quota - quota / 10 {
        return false;
    }
    exact_usage(mail, mailbox).await.saturating_add(adding) > quota
}
