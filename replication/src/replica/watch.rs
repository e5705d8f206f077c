//! Sessions waiting for changes (IMAP IDLE) are told of them instead of
//! polling a cluster-wide listing.
//!
//! A node with sessions waiting on `user`'s mailbox registers at the
//! user's manager ([`Request::Watch`], a lease of [`WATCH_LEASE`], renewed
//! every [`WATCH_RENEW`] and at once after a view change, one call per
//! manager for all of this node's watched users it manages: the manager's
//! watch table is soft state, like its mail maps). Once the manager took
//! the watch the sessions look once: what changed before was told to
//! nobody. The manager tells the
//! watchers ([`Request::Notify`]):
//! * when it places a message for the user ([`Request::Place`], which
//!   every delivery asks of it anyway): `soon`, since the copies are
//!   being written; the sessions look seven times over the next second
//!   and a half ([`SOON_CHECKS`]);
//! * when a node changed the user's flags, folders or messages
//!   ([`Request::Changed`], sent by [`Replicator::changed`] after
//!   `mark` and `delete`): the change is visible already.
//!
//! Nothing on the delivery path waits for any of it: notifications go out
//! from a queue that [`Replicator::run_watches`] sends. A notification
//! that is lost (a manager that changed, a dropped packet, a full table)
//! is made up by a slow safety look ([`SAFETY_LOOK`]); a node whose
//! manager did not take the watch (an older release, unreachable) polls
//! as before ([`Subscription::told`] is false).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::protocol::{Network, NodeId, ReplicaError, Reply, Request, WATCH_USERS_PER_CALL_MAX};
use super::{Replicator, lock, manager_of};

/// How long a manager keeps a watch without its renewal.
pub const WATCH_LEASE: Duration = Duration::from_secs(60);
/// How often a node renews its watches.
pub const WATCH_RENEW: Duration = Duration::from_secs(20);
/// How often a told session looks all the same (lost notifications).
pub const SAFETY_LOOK: Duration = Duration::from_secs(30);
/// After a `soon` notification: when a session looks (from the
/// notification). The copies are usually written within milliseconds, and
/// a slow disk or a loaded node takes longer: seven listings per message
/// for a mailbox someone waits on, against two a second for every idle
/// session when polling.
pub const SOON_CHECKS: [Duration; 7] = [
    Duration::from_millis(5),
    Duration::from_millis(15),
    Duration::from_millis(40),
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(600),
    Duration::from_millis(1500),
];
/// Notifications and registrations queued at most; beyond, they are
/// dropped (the safety look makes up for them).
const OUTBOX_MAX: usize = 100_000;
/// Watch calls in flight at most.
const INFLIGHT_MAX: usize = 4_096;

/// What a session is told: a count of changes, and whether a message was
/// placed among them since the session last looked (`soon`: it may not be
/// stored everywhere yet).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    pub soon: bool,
}

/// The counts a node keeps per watched user: changes, and placements
/// among them (a later change made must not hide an earlier placement).
#[derive(Debug, Clone, Copy, Default)]
struct Told {
    changes: u64,
    placed: u64,
}

/// The watches of this node's sessions, and what is to be sent.
#[derive(Default)]
pub(super) struct Watches {
    local: Mutex<HashMap<String, Local>>,
    outbox: Mutex<Vec<(NodeId, Request)>>,
    wake: tokio::sync::Notify,
}

struct Local {
    tx: watch::Sender<Told>,
    sessions: usize,
    /// The user's manager took this node's watch.
    told: Arc<AtomicBool>,
}

impl Watches {
    fn queue(&self, to: NodeId, req: Request) {
        let mut out = lock(&self.outbox);
        if out.len() < OUTBOX_MAX {
            out.push((to, req));
        }
        drop(out);
        self.wake.notify_one();
    }

    /// A session's wait on `user`, and whether it is the node's first.
    fn add(watches: &Arc<Watches>, user: &str) -> (Subscription, bool) {
        let mut local = lock(&watches.local);
        let first = !local.contains_key(user);
        let l = local.entry(user.to_owned()).or_insert_with(|| Local {
            tx: watch::Sender::new(Told::default()),
            sessions: 0,
            told: Arc::new(AtomicBool::new(false)),
        });
        l.sessions += 1;
        let rx = l.tx.subscribe();
        let placed = rx.borrow().placed;
        let sub = Subscription {
            user: user.to_owned(),
            placed,
            rx,
            told: l.told.clone(),
            watches: watches.clone(),
        };
        (sub, first)
    }

    /// Tells this node's sessions waiting on `user` (if any).
    fn bump(&self, user: &str, soon: bool) {
        if let Some(l) = lock(&self.local).get(user) {
            l.tx.send_modify(|t| {
                t.changes += 1;
                t.placed += u64::from(soon);
            });
        }
    }
}

/// One session's wait on a mailbox; dropping it ends the wait.
pub struct Subscription {
    user: String,
    rx: watch::Receiver<Told>,
    /// Placements counted when the session last looked.
    placed: u64,
    told: Arc<AtomicBool>,
    watches: Arc<Watches>,
}

impl Subscription {
    /// Waits for the next change told (pending forever if the node's
    /// watches are gone).
    pub async fn changed(&mut self) -> Change {
        if self.rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.seen()
    }

    /// The change told since the session last asked, if any (without
    /// waiting).
    pub fn take_change(&mut self) -> Option<Change> {
        self.rx.has_changed().unwrap_or(false).then(|| self.seen())
    }

    fn seen(&mut self) -> Change {
        let t = *self.rx.borrow_and_update();
        let soon = t.placed != self.placed;
        self.placed = t.placed;
        Change { seq: t.changes, soon }
    }

    /// Whether changes are told (the user's manager took the watch); if
    /// not, the session should poll.
    pub fn told(&self) -> bool {
        self.told.load(Ordering::Relaxed)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut local = lock(&self.watches.local);
        if let Some(l) = local.get_mut(&self.user) {
            l.sessions -= 1;
            if l.sessions == 0 {
                local.remove(&self.user);
            }
        }
    }
}

impl<N: Network> Replicator<N> {
    /// A session starts waiting for changes to `user`'s mailbox. The
    /// first on this node registers at the user's manager.
    pub fn subscribe(&self, user: &str) -> Subscription {
        let (sub, first) = Watches::add(&self.watches, user);
        if first {
            self.register(vec![user.to_owned()]);
        }
        sub
    }

    /// This node changed `user`'s mailbox (flags, folders, deletions):
    /// its own sessions are told, and the user's manager tells the other
    /// watchers.
    pub fn changed(&self, user: &str) {
        self.watches.bump(user, false);
        match manager_of(&self.view(), user) {
            Some(m) if m == self.me => self.notify_watchers(user, self.me, false),
            Some(m) => self.watches.queue(m, Request::Changed { user: user.to_owned() }),
            None => {}
        }
    }

    /// As `user`'s manager: tell the nodes watching the user (but `from`,
    /// which knows).
    pub(super) fn notify_watchers(&self, user: &str, from: NodeId, soon: bool) {
        let now = self.now_ms();
        let nodes = lock(&self.manager).watchers(user, now);
        for n in nodes.into_iter().filter(|n| *n != from) {
            if n == self.me {
                self.watches.bump(user, soon);
            } else {
                self.watches.queue(
                    n,
                    Request::Notify {
                        user: user.to_owned(),
                        soon,
                    },
                );
            }
        }
    }

    /// Serves `Watch`, `Changed` and `Notify`.
    pub(super) fn serve_watch(&self, from: NodeId, req: Request) -> Result<Reply, ReplicaError> {
        let refused = |why: &str| ReplicaError::Remote {
            node: self.me,
            kind: "watch".to_owned(),
            error: why.to_owned(),
        };
        Ok(match req {
            Request::Watch { mut users } => {
                users.truncate(WATCH_USERS_PER_CALL_MAX);
                let now = self.now_ms();
                let until = now + WATCH_LEASE.as_millis() as u64;
                let mut manager = lock(&self.manager);
                if !users.iter().all(|u| manager.watch(u, from, now, until)) {
                    return Err(refused("the watch table is full"));
                }
                Reply::Done
            }
            Request::Changed { user } => {
                self.notify_watchers(&user, from, false);
                Reply::Done
            }
            Request::Notify { user, soon } => {
                self.watches.bump(&user, soon);
                Reply::Done
            }
            _ => return Err(refused("not a watch request")),
        })
    }

    /// Queues the registration of this node's watches on `users`, one
    /// call per manager (and per [`WATCH_USERS_PER_CALL_MAX`] users).
    fn register(&self, users: Vec<String>) {
        let view = self.view();
        let mut by_manager: HashMap<NodeId, Vec<String>> = HashMap::new();
        for u in users {
            match manager_of(&view, &u) {
                Some(m) => by_manager.entry(m).or_default().push(u),
                None => self.watches.bump(&u, false),
            }
        }
        for (m, users) in by_manager {
            for chunk in users.chunks(WATCH_USERS_PER_CALL_MAX) {
                self.watches.queue(m, Request::Watch { users: chunk.to_vec() });
            }
        }
    }

    /// Sends what is queued (registrations, changes, notifications) and
    /// renews this node's watches every [`WATCH_RENEW`] and after each
    /// view change, until `stop`. One task per node.
    pub async fn run_watches(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        use futures::StreamExt;
        let mut epochs = self.view_epoch.subscribe();
        let mut renew = tokio::time::interval(WATCH_RENEW);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Calls in flight: a slow or silent node holds up only its own.
        let mut inflight = futures::stream::FuturesUnordered::new();
        loop {
            tokio::select! {
                _ = self.watches.wake.notified() => {}
                _ = renew.tick() => self.renew_all(),
                r = epochs.changed() => {
                    if r.is_err() {
                        return;
                    }
                    // The manager may be another now, which knows nothing of
                    // this node's watches: untold until it took them.
                    for l in lock(&self.watches.local).values() {
                        l.told.store(false, Ordering::Relaxed);
                    }
                    self.renew_all();
                }
                Some(()) = inflight.next(), if !inflight.is_empty() => continue,
                _ = stop.changed() => return,
            }
            let batch = std::mem::take(&mut *lock(&self.watches.outbox));
            let view = self.view();
            for (to, req) in batch {
                // Dropped beyond the bound, or to a node down: the safety
                // look makes up for it (a registration is renewed).
                if inflight.len() < INFLIGHT_MAX && super::is_live(&view, to) {
                    inflight.push(self.send_watch(to, req));
                }
            }
        }
    }

    /// One watch call; a registration's answer says whether changes are
    /// told to this node's sessions on the user.
    async fn send_watch(&self, to: NodeId, req: Request) {
        let users = match &req {
            Request::Watch { users } => users.clone(),
            _ => Vec::new(),
        };
        let r = self.call(to, req).await;
        let told = matches!(r, Ok(Reply::Done));
        for user in users {
            let was = lock(&self.watches.local)
                .get(&user)
                .map(|l| l.told.swap(told, Ordering::Relaxed));
            if told && was == Some(false) {
                // What changed before the manager took the watch was told
                // to nobody: the sessions look (a message placed meanwhile
                // may still be being written).
                self.watches.bump(&user, true);
            }
        }
    }

    fn renew_all(&self) {
        let users: Vec<String> = lock(&self.watches.local).keys().cloned().collect();
        self.register(users);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_placement_is_not_hidden_by_a_later_change_and_the_last_session_ends_the_watch() {
        let w = Arc::new(Watches::default());
        let (mut a, first) = Watches::add(&w, "u@x");
        let (mut b, again) = Watches::add(&w, "u@x");
        assert!(first && !again);
        assert_eq!(a.take_change(), None);
        w.bump("u@x", true);
        w.bump("u@x", false);
        assert_eq!(
            a.take_change(),
            Some(Change { seq: 2, soon: true }),
            "the placement shows"
        );
        assert_eq!(a.take_change(), None);
        w.bump("u@x", false);
        assert_eq!(a.take_change(), Some(Change { seq: 3, soon: false }));
        assert_eq!(
            b.take_change(),
            Some(Change { seq: 3, soon: true }),
            "b has not looked since"
        );
        w.bump("v@x", true);
        assert_eq!(a.take_change(), None, "another user's change");
        drop(a);
        assert!(lock(&w.local).contains_key("u@x"));
        drop(b);
        assert!(lock(&w.local).is_empty(), "the last session ends the watch");
    }
}
