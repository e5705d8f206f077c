//! The replica protocol: how the nodes of a cluster keep every message on
//! R of them, find a user's mail wherever it is, and converge after faults.
//!
//! One [`Replicator`] per node, over a [`Network`] (QUIC in the binary, an
//! in-memory router in tests). It plays three roles:
//! * **user manager** for the users placement gives it: it keeps each
//!   user's *mail map* (the nodes holding fragments, with their entry and
//!   byte counts) as soft state, never on disk, and answers where new mail
//!   for the user goes ([`Request::Place`]) and where the user's mail is
//!   ([`Request::MailMap`]). It learns from the placements it makes and from
//!   the reports every node sends after a view change ([`Request::Report`]).
//!   Until the reports are in it answers with what it knows.
//! * **replica**: it stores copies, lists fragments, serves bodies and
//!   applies deletions (tombstones) for the other nodes.
//! * **front end** of a delivery or a mailbox session: it asks managers,
//!   sends the body to the R targets in parallel and succeeds once every
//!   target that answers has it on disk ([`Replicator::deliver`]); it lists
//!   the union of a user's fragments ([`Replicator::mailbox`]), reads bodies
//!   from any live replica ([`Replicator::read`]) and sends deletions to
//!   every replica ([`Replicator::delete`]), keeping those a replica did not
//!   acknowledge in a durable update log until it does.
//!
//! Anti-entropy ([`Replicator::anti_entropy_round`]) compares, per user and
//! per pair of replicas, a digest of the message ids each holds and whether
//! each is held or deleted; where digests differ the two exchange their
//! lists and repair: a missing copy is fetched (its body only when it is not
//! already held), a deletion wins over a copy (tombstones). Deletions are
//! terminal, so "last writer wins by HLC" reduces to "deleted wins" until
//! metadata that can change back and forth (IMAP flags) exists.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use placement::{LoadVector, NodeState, UserKey, View};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::hlc::HlcClock;
use crate::{BodyHash, Delivery, EntryMeta, FragmentStore, MessageId, SyncItem, Tombstone};

pub type NodeId = u64;
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Users per report message.
pub const REPORT_USERS_MAX: usize = 2_000;
/// Digests per anti-entropy message.
pub const DIGESTS_MAX: usize = 2_000;
/// Message ids in one [`Request::Deleted`].
pub const DELETED_QUERY_MAX: usize = 10_000;
/// Updates kept in the durable log; past this, anti-entropy alone repairs.
pub const UPDATE_LOG_FILES_MAX: usize = 100_000;
/// How long a mailbox lock holds without being released (a session that
/// ends without unlocking, e.g. its node crashed and is not yet down).
pub const MAILBOX_LOCK_LEASE: Duration = Duration::from_secs(600);
/// Mailbox locks one manager holds at most.
const MAILBOX_LOCKS_MAX: usize = 100_000;

/// What a node asks of another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// To the users' manager: where should a new message of `size` bytes
    /// for each of `users` go (`n_replicas` nodes each)?
    Place {
        users: Vec<String>,
        size: u64,
        n_replicas: u32,
    },
    /// To the user's manager: which nodes hold the user's fragments?
    MailMap {
        user: String,
    },
    /// To a manager: the sender holds these `(user, entries, bytes)`,
    /// assigned to managers by view `epoch`. `last` ends a full report (every
    /// user the sender holds that the receiver manages); a report that is
    /// not `last` is a fragment just created.
    Report {
        users: Vec<(String, u64, u64)>,
        epoch: u64,
        last: bool,
    },
    /// "Report to me the users I manage" (sent by a node that starts).
    ReportTo,
    /// Store one message: one body, entries for the users of each group
    /// (a group shares one replica set).
    Store {
        id: MessageId,
        arrival_ms: u64,
        folder: String,
        groups: Vec<(Vec<NodeId>, Vec<String>)>,
        body: Vec<u8>,
        /// The view epoch the sender placed the message by, and the users
        /// whose targets it chose without their manager: the receiver tells
        /// the manager of a user's first fragment here unless that manager
        /// placed it under the receiver's own view.
        epoch: u64,
        unplaced: Vec<String>,
    },
    /// The user's entries held by the receiver.
    List {
        user: String,
    },
    /// Which of these messages of the user the receiver holds deletions
    /// of (asked of a replica that did not list a message another did).
    Deleted {
        user: String,
        ids: Vec<MessageId>,
    },
    /// A body, by hash.
    Read {
        body: BodyHash,
    },
    /// Deletions of the user's messages.
    Delete {
        user: String,
        tombs: Vec<Tombstone>,
    },
    /// Anti-entropy: the sender's digests for users it shares with the
    /// receiver; the answer names those that differ.
    Digests {
        digests: Vec<(String, [u8; 32])>,
    },
    /// Anti-entropy: the sender's items of `user` shared with the receiver;
    /// the receiver repairs itself and answers what the sender lacks.
    Sync {
        user: String,
        items: Vec<SyncItem>,
    },
    /// To the user's manager: the mailbox for one session (POP3's
    /// exclusive maildrop), under `token`.
    Lock {
        user: String,
        token: u64,
    },
    Unlock {
        user: String,
        token: u64,
    },
}

impl Request {
    fn kind(&self) -> &'static str {
        match self {
            Request::Place { .. } => "place",
            Request::MailMap { .. } => "mail-map",
            Request::Report { .. } => "report",
            Request::ReportTo => "report-to",
            Request::Store { .. } => "store",
            Request::List { .. } => "list",
            Request::Deleted { .. } => "deleted",
            Request::Read { .. } => "read",
            Request::Delete { .. } => "delete",
            Request::Digests { .. } => "digests",
            Request::Sync { .. } => "sync",
            Request::Lock { .. } => "lock",
            Request::Unlock { .. } => "unlock",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    Placed {
        targets: Vec<Vec<NodeId>>,
    },
    MailMap {
        nodes: Vec<NodeId>,
        bytes: u64,
        known: bool,
    },
    Done,
    Stored,
    Listed {
        entries: Vec<EntryMeta>,
    },
    Body {
        bytes: Vec<u8>,
    },
    Tombstoned {
        ids: Vec<MessageId>,
    },
    Deleted {
        removed: usize,
    },
    Differ {
        users: Vec<String>,
    },
    Synced {
        items: Vec<SyncItem>,
    },
    Locked {
        granted: bool,
    },
}

/// Every message carries the sender's id, its hybrid logical clock, its
/// load (piggybacked: managers place mail by these figures) and the number
/// of its current run (`boot`: a change means it restarted, so the mailbox
/// locks its earlier sessions held are released).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub from: NodeId,
    pub hlc: u64,
    pub load: u64,
    pub boot: u32,
    pub body: T,
}

pub type Call = Envelope<Request>;
pub type Answer = Envelope<Result<Reply, String>>;

/// How a replicator reaches the others. The implementation bounds message
/// sizes; the replicator puts a deadline on every call.
pub trait Network: Send + Sync + 'static {
    fn call(&self, to: NodeId, call: Call) -> BoxFuture<'_, Result<Answer, String>>;
}

#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// Copies of each message (R).
    pub replicas: usize,
    /// Nodes a user's fragments prefer (Porcupine's spread).
    pub spread: usize,
    /// Deadline of one call to another node.
    pub call_timeout: Duration,
    /// Where unacknowledged updates are kept.
    pub update_dir: PathBuf,
    /// How long a deletion is remembered at most (when a replica never
    /// confirms it, e.g. a node that left for good).
    pub tombstone_retention: Duration,
    /// How long a deletion is remembered at least, even once every replica
    /// holds it (covers copies still in flight).
    pub tombstone_min_age: Duration,
}

impl ReplicaConfig {
    pub fn new(update_dir: impl Into<PathBuf>) -> Self {
        ReplicaConfig {
            replicas: 2,
            spread: 4,
            call_timeout: Duration::from_secs(2),
            update_dir: update_dir.into(),
            tombstone_retention: Duration::from_secs(14 * 24 * 3600),
            tombstone_min_age: Duration::from_secs(600),
        }
    }
}

/// The result of one delivery.
#[derive(Debug, Clone)]
pub struct DeliverOutcome {
    pub id: MessageId,
    /// Per user (in the order given): stored on at least one node.
    pub stored: Vec<bool>,
    /// Per user: the nodes that acknowledged the copy.
    pub copies: Vec<Vec<NodeId>>,
    /// Some stored user got fewer than R copies.
    pub under_replicated: bool,
}

/// One message of a mailbox as retrieval sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub meta: EntryMeta,
    /// The nodes that listed it.
    pub holders: Vec<NodeId>,
}

/// What one anti-entropy round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairReport {
    pub peers: usize,
    pub peers_failed: usize,
    pub users_differing: usize,
    pub copies_pulled: usize,
    pub tombstones_applied: usize,
}

#[derive(Debug, Default)]
pub struct ReplicaCounters {
    pub deliveries: AtomicU64,
    pub deliveries_under_replicated: AtomicU64,
    pub copies_failed: AtomicU64,
    pub updates_logged: AtomicU64,
    pub updates_replayed: AtomicU64,
    pub repairs_pulled: AtomicU64,
    pub repairs_tombstones: AtomicU64,
    pub manager_fallbacks: AtomicU64,
    /// Calls ended because a new view had their node down.
    pub calls_cut_by_view: AtomicU64,
}

#[derive(Debug, Default, Clone)]
struct MailMap {
    /// node → (entries, bytes)
    nodes: BTreeMap<NodeId, (u64, u64)>,
}

/// A deletion some replica has not acknowledged yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingUpdate {
    node: NodeId,
    user: String,
    tombs: Vec<Tombstone>,
}

pub struct Replicator<N: Network> {
    me: NodeId,
    store: Arc<FragmentStore>,
    net: N,
    cfg: ReplicaConfig,
    view: RwLock<Arc<View>>,
    /// The epoch of each view taken: calls in flight to a node that a new
    /// view has down end at once instead of at their deadline.
    view_epoch: tokio::sync::watch::Sender<u64>,
    maps: Mutex<HashMap<String, MailMap>>,
    loads: Mutex<HashMap<NodeId, u64>>,
    inflight: AtomicU64,
    clock: HlcClock,
    update_seq: AtomicU64,
    /// Tells this run's mailbox locks from those of earlier runs.
    boot: u32,
    /// The run number each other node last showed.
    boots: Mutex<HashMap<NodeId, u32>>,
    lock_seq: AtomicU64,
    /// Per peer: wall-clock ms at the start of the last anti-entropy
    /// exchange that completed without error (the peer then held every
    /// tombstone this node held at that moment, for the messages they share).
    clean_since: Mutex<HashMap<NodeId, u64>>,
    /// As manager: per peer, the view epoch of its last full report. The
    /// mail maps are complete once every live peer has reported at the
    /// current epoch; until then a mail map answers with every live node.
    reported: Mutex<HashMap<NodeId, u64>>,
    /// As manager: user → (holding node, token, lease end).
    locks: Mutex<HashMap<String, (NodeId, u64, std::time::Instant)>>,
    pub counters: ReplicaCounters,
}

impl<N: Network> std::fmt::Debug for Replicator<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator").field("me", &self.me).finish()
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 16 << 20 }>()
}

/// One copy being stored here, counted in the load placement reads;
/// released when dropped, whichever way the handler ends.
struct Inflight<'a>(&'a AtomicU64);

impl<'a> Inflight<'a> {
    fn take(counter: &'a AtomicU64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Inflight(counter)
    }
}

impl Drop for Inflight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<N: Network> Replicator<N> {
    /// A replicator for node `me` over `store`. The view starts empty (every
    /// delivery stays local) until [`Replicator::set_view`].
    pub fn new(me: NodeId, store: Arc<FragmentStore>, net: N, cfg: ReplicaConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(&cfg.update_dir)?;
        let empty = View::with_slot_bits(0, Vec::new(), placement::MIN_SLOT_BITS).expect("an empty view is valid");
        Ok(Replicator {
            me,
            store,
            net,
            cfg,
            view: RwLock::new(Arc::new(empty)),
            view_epoch: tokio::sync::watch::Sender::new(0),
            maps: Mutex::new(HashMap::new()),
            loads: Mutex::new(HashMap::new()),
            inflight: AtomicU64::new(0),
            clock: HlcClock::default(),
            update_seq: AtomicU64::new(0),
            boot: {
                let mut h = blake3::Hasher::new();
                h.update(&crate::hlc::wall_hlc().to_le_bytes());
                h.update(&std::process::id().to_le_bytes());
                h.update(&me.to_le_bytes());
                u32::from_le_bytes(h.finalize().as_bytes()[..4].try_into().expect("4 bytes"))
            },
            lock_seq: AtomicU64::new(0),
            boots: Mutex::new(HashMap::new()),
            clean_since: Mutex::new(HashMap::new()),
            locks: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashMap::new()),
            counters: ReplicaCounters::default(),
        })
    }

    pub fn id(&self) -> NodeId {
        self.me
    }

    pub fn store(&self) -> &Arc<FragmentStore> {
        &self.store
    }

    pub fn config(&self) -> &ReplicaConfig {
        &self.cfg
    }

    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Takes a new view. Mail maps of users this node no longer manages are
    /// dropped (their new managers rebuild them from reports); the caller
    /// then runs [`Replicator::report_round`] and an anti-entropy round.
    pub fn set_view(&self, view: Arc<View>) {
        let me = self.me;
        let epoch = view.epoch();
        {
            let mut maps = lock(&self.maps);
            maps.retain(|user, _| view.user_manager(user).map(|n| n.0) == Some(me));
            // A report from a node ahead of this one was kept whole, and the
            // maps just dropped may have held part of it: it no longer
            // vouches for complete maps when its view comes (until then
            // maps answer with every live node, and the report is chased).
            lock(&self.reported).retain(|_, e| *e <= epoch);
        }
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = view;
        self.view_epoch.send_replace(epoch);
    }

    /// Waits, at most `deadline`, until a view of `epoch` or newer is taken.
    pub async fn wait_for_view(&self, epoch: u64, deadline: Duration) -> bool {
        let mut epochs = self.view_epoch.subscribe();
        tokio::time::timeout(deadline, epochs.wait_for(|e| *e >= epoch))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Returns once the view has `node` down.
    async fn marked_down(&self, node: NodeId) {
        let mut epochs = self.view_epoch.subscribe();
        while Self::is_live(&self.view(), node) {
            if epochs.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// This node's load as it tells the others: copies being written.
    pub fn load(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// The other nodes the view does not have down.
    fn live_peers(&self) -> Vec<NodeId> {
        let view = self.view();
        Self::live_nodes(&view).filter(|&n| n != self.me).collect()
    }

    fn is_live(view: &View, node: NodeId) -> bool {
        view.node(placement::NodeId(node))
            .is_some_and(|n| n.state != NodeState::Down)
    }

    fn manager(view: &View, user: &str) -> Option<NodeId> {
        view.user_manager(user).map(|n| n.0)
    }

    // ---- calls -------------------------------------------------------

    /// One request to `to` (served in place when `to` is this node), with
    /// the deadline.
    fn call(&self, to: NodeId, req: Request) -> BoxFuture<'_, Result<Reply, String>> {
        Box::pin(async move {
            if to == self.me {
                return self.serve(self.me, req).await;
            }
            let kind = req.kind();
            // Bodies take longer than the base deadline allows at size.
            let deadline = self.cfg.call_timeout
                + match &req {
                    Request::Store { body, .. } => Duration::from_millis(body.len() as u64 / 4096),
                    Request::Read { .. } | Request::Sync { .. } | Request::ReportTo => Duration::from_secs(10),
                    _ => Duration::ZERO,
                };
            let env = Envelope {
                from: self.me,
                hlc: self.clock.now(),
                load: self.load(),
                boot: self.boot,
                body: req,
            };
            // A node the view has down when the call starts is tried all the
            // same (the caller chose it); one marked down meanwhile ends it.
            let live = Self::is_live(&self.view(), to);
            let answer = tokio::select! {
                a = tokio::time::timeout(deadline, self.net.call(to, env)) => a,
                () = self.marked_down(to), if live => {
                    self.counters.calls_cut_by_view.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("node {to}: marked down during {kind}"));
                }
            };
            match answer {
                Err(_) => Err(format!("node {to}: no answer to {kind} within {deadline:?}")),
                Ok(Err(e)) => Err(format!("node {to}: {kind}: {e}")),
                Ok(Ok(answer)) => {
                    self.clock.observe(answer.hlc);
                    lock(&self.loads).insert(to, answer.load);
                    self.note_boot(to, answer.boot);
                    answer.body
                }
            }
        })
    }

    /// Serves a request from another node.
    pub async fn handle(&self, call: Call) -> Answer {
        self.clock.observe(call.hlc);
        if call.from != self.me {
            lock(&self.loads).insert(call.from, call.load);
            self.note_boot(call.from, call.boot);
        }
        let body = self.serve(call.from, call.body).await;
        Envelope {
            from: self.me,
            hlc: self.clock.now(),
            load: self.load(),
            boot: self.boot,
            body,
        }
    }

    /// A node seen with a new run number restarted: the mailbox locks of
    /// its earlier sessions go.
    fn note_boot(&self, node: NodeId, boot: u32) {
        let changed = lock(&self.boots).insert(node, boot).is_some_and(|old| old != boot);
        if changed {
            let mut locks = lock(&self.locks);
            let before = locks.len();
            locks.retain(|_, l| l.0 != node || (l.1 >> 32) as u32 == boot);
            if locks.len() < before {
                info!(
                    node,
                    released = before - locks.len(),
                    "a node restarted: its mailbox locks released"
                );
            }
        }
    }

    fn serve(&self, from: NodeId, req: Request) -> BoxFuture<'_, Result<Reply, String>> {
        Box::pin(async move {
            match req {
                Request::Place {
                    users,
                    size,
                    n_replicas,
                } => {
                    let n = (n_replicas as usize).clamp(1, 16);
                    let targets = users.iter().map(|u| self.place_local(u, size, n)).collect();
                    Ok(Reply::Placed { targets })
                }
                Request::MailMap { user } => Ok(self.mail_map_local(&user)),
                Request::Report { users, epoch, last } => {
                    let view = self.view();
                    // A sender ahead of this node assigned the users by a view
                    // this node will take soon: keep them all (the view change
                    // then drops those it does not manage).
                    let ahead = epoch > view.epoch();
                    let mut maps = lock(&self.maps);
                    if last {
                        lock(&self.reported).insert(from, epoch);
                    }
                    for (user, entries, bytes) in users.into_iter().take(REPORT_USERS_MAX) {
                        if !ahead && Self::manager(&view, &user) != Some(self.me) {
                            continue;
                        }
                        let map = maps.entry(user).or_default();
                        if entries == 0 {
                            map.nodes.remove(&from);
                        } else {
                            map.nodes.insert(from, (entries, bytes));
                        }
                    }
                    Ok(Reply::Done)
                }
                Request::ReportTo => {
                    self.report_to(Some(from)).await;
                    Ok(Reply::Done)
                }
                Request::Store {
                    id,
                    arrival_ms,
                    folder,
                    groups,
                    body,
                    epoch,
                    unplaced,
                } => {
                    // Released on every path, a handler cut by its deadline too.
                    let inflight = Inflight::take(&self.inflight);
                    let same_view = epoch == self.view().epoch();
                    let new_users: Vec<String> = groups
                        .iter()
                        .flat_map(|(_, users)| users)
                        .filter(|u| (!same_view || unplaced.contains(u)) && !self.store.holds(u))
                        .cloned()
                        .collect();
                    let stores = groups.into_iter().map(|(replicas, users)| {
                        self.store.deliver(Delivery {
                            id,
                            arrival_ms,
                            users,
                            folder: folder.clone(),
                            body: body.clone(),
                            replicas,
                        })
                    });
                    let results = futures::future::join_all(stores).await;
                    drop(inflight);
                    for r in results {
                        r.map_err(|e| e.to_string())?;
                    }
                    self.report_new_fragments(new_users).await;
                    Ok(Reply::Stored)
                }
                Request::List { user } => Ok(Reply::Listed {
                    entries: self.store.list(&user),
                }),
                Request::Deleted { user, ids } => {
                    let mut ids = ids;
                    ids.truncate(DELETED_QUERY_MAX);
                    Ok(Reply::Tombstoned {
                        ids: self.store.tombstoned(&user, &ids),
                    })
                }
                Request::Read { body } => match self.store.read_body(body).await {
                    Ok(bytes) => Ok(Reply::Body { bytes }),
                    Err(e) => Err(e.to_string()),
                },
                Request::Delete { user, tombs } => match self.store.apply_tombstones(&user, tombs).await {
                    Ok(removed) => Ok(Reply::Deleted { removed }),
                    Err(e) => Err(e.to_string()),
                },
                Request::Digests { digests } => {
                    let users = digests
                        .into_iter()
                        .take(DIGESTS_MAX)
                        .filter(|(user, d)| self.store.digest(user, from) != *d)
                        .map(|(user, _)| user)
                        .collect();
                    Ok(Reply::Differ { users })
                }
                Request::Sync { user, items } => {
                    let (back, _) = self.reconcile(from, &user, items, true).await?;
                    Ok(Reply::Synced { items: back })
                }
                Request::Lock { user, token } => {
                    let view = self.view();
                    let now = std::time::Instant::now();
                    let mut locks = lock(&self.locks);
                    if locks.len() >= MAILBOX_LOCKS_MAX {
                        // Locks whose unlock never came: their leases are over.
                        locks.retain(|_, l| l.2 > now);
                    }
                    let free = match locks.get(&user) {
                        None => true,
                        Some((holder, t, until)) => *t == token || *until <= now || !Self::is_live(&view, *holder),
                    };
                    if free && (locks.len() < MAILBOX_LOCKS_MAX || locks.contains_key(&user)) {
                        locks.insert(user, (from, token, now + MAILBOX_LOCK_LEASE));
                        Ok(Reply::Locked { granted: true })
                    } else {
                        Ok(Reply::Locked { granted: false })
                    }
                }
                Request::Unlock { user, token } => {
                    let mut locks = lock(&self.locks);
                    if locks.get(&user).is_some_and(|l| l.1 == token) {
                        locks.remove(&user);
                    }
                    Ok(Reply::Done)
                }
            }
        })
    }

    // ---- the manager -------------------------------------------------

    /// Picks the nodes for a new message of `user` and notes them in the
    /// user's mail map.
    fn place_local(&self, user: &str, size: u64, n: usize) -> Vec<NodeId> {
        let view = self.view();
        let key = UserKey::from_address(user);
        let mut maps = lock(&self.maps);
        let map = maps.entry(user.to_owned()).or_default();
        let holders: Vec<placement::NodeId> = map.nodes.keys().map(|&n| placement::NodeId(n)).collect();
        let loads = {
            let mut l = lock(&self.loads).clone();
            l.insert(self.me, self.load());
            LoadVector::new(l.into_iter().map(|(n, v)| (placement::NodeId(n), v)))
        };
        let mut targets: Vec<NodeId> = view
            .replica_set(key, n, self.cfg.spread, &loads, &holders)
            .into_iter()
            .map(|n| n.0)
            .collect();
        if targets.is_empty() {
            // No view yet (or nothing up in it): keep the mail here.
            targets.push(self.me);
        }
        for t in &targets {
            let e = map.nodes.entry(*t).or_default();
            e.0 += 1;
            e.1 += size;
        }
        targets
    }

    fn mail_map_local(&self, user: &str) -> Reply {
        let view = self.view();
        let complete = self.reports_complete(&view);
        let maps = lock(&self.maps);
        let (mut nodes, held): (Vec<NodeId>, Vec<(u64, u64)>) = match maps.get(user) {
            Some(map) => (
                map.nodes.keys().copied().collect(),
                map.nodes.values().copied().collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        drop(maps);
        // Each message is counted once per copy, and a message has R copies
        // when R nodes hold the user's mail (fewer only while it is
        // under-replicated).
        let copies = self.cfg.replicas.clamp(1, held.len().max(1)) as u64;
        let bytes = held.iter().map(|v| v.1).sum::<u64>() / copies;
        if !complete {
            // Reports since the last view change are still coming in: any
            // live node may hold fragments the map does not show yet.
            nodes.extend(Self::live_nodes(&view));
            nodes.sort_unstable();
            nodes.dedup();
        }
        Reply::MailMap {
            nodes,
            bytes,
            known: complete,
        }
    }

    /// Whether every live node (this one too: its own fragments placed by
    /// a former manager) has sent its full report for this view.
    fn reports_complete(&self, view: &View) -> bool {
        self.reports_missing(view).is_empty()
    }

    /// The live nodes whose full report for this view has not arrived.
    fn reports_missing(&self, view: &View) -> Vec<NodeId> {
        let reported = lock(&self.reported);
        Self::live_nodes(view)
            .filter(|n| reported.get(n) != Some(&view.epoch()))
            .collect()
    }

    fn live_nodes(view: &View) -> impl Iterator<Item = NodeId> + '_ {
        view.nodes().iter().map(|n| n.id.0).filter(|&n| Self::is_live(view, n))
    }

    /// Asks the live peers whose full report for this view is missing to
    /// send it (their own report round may have run on another view, or
    /// failed). Returns how many were asked.
    pub async fn chase_reports(&self) -> usize {
        let missing = self.reports_missing(&self.view());
        let calls = missing.iter().map(|&p| self.call(p, Request::ReportTo));
        futures::future::join_all(calls).await;
        missing.len()
    }

    /// Tells the managers of `users`, of whom this node held no fragment
    /// before, that it now does: a full report taken before the fragment
    /// landed (or sent to a former manager) would not show it.
    async fn report_new_fragments(&self, users: Vec<String>) {
        if users.is_empty() {
            return;
        }
        let view = self.view();
        let mut by_manager: BTreeMap<NodeId, Vec<(String, u64, u64)>> = BTreeMap::new();
        for u in users {
            if let Some(m) = Self::manager(&view, &u) {
                let bytes = self.store.usage_bytes(&u);
                by_manager.entry(m).or_default().push((u, 1, bytes));
            }
        }
        let calls = by_manager.into_iter().map(|(m, users)| {
            let req = Request::Report {
                users,
                epoch: view.epoch(),
                last: false,
            };
            self.call(m, req)
        });
        for r in futures::future::join_all(calls).await {
            if let Err(e) = r {
                debug!(error = %e, "new fragment not reported; the next report round carries it");
            }
        }
    }

    /// Sends this node's `(user, entries, bytes)` to the users' managers
    /// (only to `only` when given). Called after a view change.
    pub async fn report_to(&self, only: Option<NodeId>) -> usize {
        let view = self.view();
        let epoch = view.epoch();
        // Every live peer gets a full report, empty or not: it tells the
        // manager that its map has all of this node's fragments.
        let mut by_manager: BTreeMap<NodeId, Vec<(String, u64, u64)>> = match only {
            Some(m) => [(m, Vec::new())].into(),
            None => Self::live_nodes(&view).map(|p| (p, Vec::new())).collect(),
        };
        for u in self.store.usage() {
            if let Some(m) = Self::manager(&view, &u.user)
                && only.is_none_or(|o| o == m)
            {
                by_manager.entry(m).or_default().push((u.user, u.entries, u.bytes));
            }
        }
        let mut sent = 0;
        let calls = by_manager.into_iter().map(|(m, users)| async move {
            let mut n = 0;
            let n_chunks = users.len().div_ceil(REPORT_USERS_MAX).max(1);
            for (i, chunk) in users
                .chunks(REPORT_USERS_MAX)
                .chain(users.is_empty().then_some(&[][..]))
                .enumerate()
            {
                let req = Request::Report {
                    users: chunk.to_vec(),
                    epoch,
                    last: i + 1 == n_chunks,
                };
                match self.call(m, req).await {
                    Ok(_) => n += chunk.len(),
                    Err(e) => {
                        debug!(manager = m, error = %e, "report not delivered");
                        break;
                    }
                }
            }
            n
        });
        for n in futures::future::join_all(calls).await {
            sent += n;
        }
        sent
    }

    /// Reports to every manager.
    pub async fn report_round(&self) -> usize {
        self.report_to(None).await
    }

    /// Asks every other live node to report what it holds of the users this
    /// node manages (after a start, when this node's maps are empty).
    pub async fn ask_reports(&self) {
        let calls = self.live_peers().into_iter().map(|p| self.call(p, Request::ReportTo));
        futures::future::join_all(calls).await;
    }

    // ---- delivery ----------------------------------------------------

    /// Stores one message for `users` on R nodes each (one body per node).
    pub async fn deliver(&self, users: &[String], folder: &str, arrival_ms: u64, body: Vec<u8>) -> DeliverOutcome {
        let id = self.store.new_message_id(arrival_ms);
        self.deliver_as(id, users, folder, arrival_ms, body).await
    }

    /// [`Replicator::deliver`] with a given message id.
    pub async fn deliver_as(
        &self,
        id: MessageId,
        users: &[String],
        folder: &str,
        arrival_ms: u64,
        body: Vec<u8>,
    ) -> DeliverOutcome {
        let view = self.view();
        let n = self.cfg.replicas.max(1);
        let size = body.len() as u64;

        // 1. Targets per user, from the users' managers.
        let mut by_manager: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
        for (i, u) in users.iter().enumerate() {
            let m = Self::manager(&view, u).unwrap_or(self.me);
            by_manager.entry(m).or_default().push(i);
        }
        let mut targets: Vec<Vec<NodeId>> = vec![Vec::new(); users.len()];
        let mut unplaced: Vec<String> = Vec::new();
        let asks = by_manager.into_iter().map(|(m, idx)| {
            let req = Request::Place {
                users: idx.iter().map(|&i| users[i].clone()).collect(),
                size,
                n_replicas: n as u32,
            };
            async move { (idx, self.call(m, req).await) }
        });
        for (idx, reply) in futures::future::join_all(asks).await {
            match reply {
                Ok(Reply::Placed { targets: t }) if t.len() == idx.len() => {
                    for (i, t) in idx.into_iter().zip(t) {
                        targets[i] = t;
                    }
                }
                other => {
                    // The manager is unreachable: delivery never waits on
                    // soft state. Place here by the view and loads alone.
                    warn!(reply = ?other.err(), "manager did not place; placing locally");
                    self.counters.manager_fallbacks.fetch_add(1, Ordering::Relaxed);
                    for i in idx {
                        targets[i] = self.place_local(&users[i], size, n);
                        unplaced.push(users[i].clone());
                    }
                }
            }
        }
        for t in &mut targets {
            t.sort_unstable();
            t.dedup();
        }

        // 2. One store per node, carrying every user that node takes.
        let mut per_node: BTreeMap<NodeId, BTreeMap<Vec<NodeId>, Vec<String>>> = BTreeMap::new();
        for (u, t) in users.iter().zip(&targets) {
            for node in t {
                per_node
                    .entry(*node)
                    .or_default()
                    .entry(t.clone())
                    .or_default()
                    .push(u.clone());
            }
        }
        let stores = per_node.into_iter().map(|(node, groups)| {
            let req = Request::Store {
                id,
                arrival_ms,
                folder: folder.to_owned(),
                groups: groups.into_iter().collect(),
                body: body.clone(),
                epoch: view.epoch(),
                unplaced: unplaced.clone(),
            };
            async move { (node, self.call(node, req).await) }
        });
        let mut acked: BTreeSet<NodeId> = BTreeSet::new();
        for (node, r) in futures::future::join_all(stores).await {
            match r {
                Ok(Reply::Stored) => {
                    acked.insert(node);
                }
                other => {
                    self.counters.copies_failed.fetch_add(1, Ordering::Relaxed);
                    warn!(%id, node, error = ?other.err(), "copy not stored");
                }
            }
        }

        // 3. The outcome per user.
        let copies: Vec<Vec<NodeId>> = targets
            .iter()
            .map(|t| t.iter().copied().filter(|n| acked.contains(n)).collect())
            .collect();
        let stored: Vec<bool> = copies.iter().map(|c| !c.is_empty()).collect();
        let under = copies.iter().any(|c| !c.is_empty() && c.len() < n);
        self.counters.deliveries.fetch_add(1, Ordering::Relaxed);
        if under {
            self.counters
                .deliveries_under_replicated
                .fetch_add(1, Ordering::Relaxed);
        }
        // A user none of whose targets acknowledged gets a temporary
        // failure; a copy that was stored but whose reply was lost must not
        // surface later as mail nobody acknowledged: tombstone it.
        let hlc = self.clock.now();
        for ((u, t), ok) in users.iter().zip(&targets).zip(&stored) {
            if *ok {
                continue;
            }
            let tomb = Tombstone {
                id,
                hlc,
                replicas: t.clone(),
            };
            self.send_tombstones(u, t, vec![tomb]).await;
        }
        DeliverOutcome {
            id,
            stored,
            copies,
            under_replicated: under,
        }
    }

    // ---- retrieval ---------------------------------------------------

    /// Takes the user's mailbox for one session, cluster-wide, from the
    /// user's manager: `Ok(Some((manager, token)))` when granted, `Err(())`
    /// when another session holds it, `Ok(None)` when the manager does not
    /// answer (the session goes on: availability before exclusivity).
    pub async fn lock_mailbox(&self, user: &str) -> Result<Option<(NodeId, u64)>, ()> {
        let mut tried: Option<NodeId> = None;
        for _ in 0..3 {
            let view = self.view();
            let Some(m) = Self::manager(&view, user) else {
                return Ok(None);
            };
            if tried == Some(m) {
                // The manager did not answer and the view still names it.
                return Ok(None);
            }
            let token = (u64::from(self.boot) << 32) | (self.lock_seq.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff);
            let req = Request::Lock {
                user: user.to_owned(),
                token,
            };
            match self.call(m, req).await {
                Ok(Reply::Locked { granted: true }) => return Ok(Some((m, token))),
                Ok(Reply::Locked { granted: false }) => return Err(()),
                other => {
                    warn!(user, manager = m, reply = ?other.err(), "mailbox lock not taken");
                    // It may have been granted with the answer lost: give it back.
                    self.unlock_mailbox(user, m, token).await;
                    // A view that has the manager down names another: ask it
                    // (once); otherwise go on without the lock.
                    tried = Some(m);
                }
            }
        }
        Ok(None)
    }

    /// Releases a lock [`Replicator::lock_mailbox`] took, at the manager
    /// that granted it (the view may have moved the user since).
    pub async fn unlock_mailbox(&self, user: &str, manager: NodeId, token: u64) {
        if !Self::is_live(&self.view(), manager) {
            // Down: its locks went with it (and its lease ends anyway).
            return;
        }
        let req = Request::Unlock {
            user: user.to_owned(),
            token,
        };
        let _ = self.call(manager, req).await;
    }

    /// The nodes that may hold the user's fragments, from the manager (or
    /// the user's spread if the manager does not answer), with this node.
    pub async fn mail_map(&self, user: &str) -> (Vec<NodeId>, u64, bool) {
        let view = self.view();
        let m = Self::manager(&view, user).unwrap_or(self.me);
        let (mut nodes, bytes, known) = match self.call(m, Request::MailMap { user: user.to_owned() }).await {
            Ok(Reply::MailMap { nodes, bytes, known }) => (nodes, bytes, known),
            other => {
                debug!(user, error = ?other.err(), "no mail map from the manager; using the spread");
                self.counters.manager_fallbacks.fetch_add(1, Ordering::Relaxed);
                let spread = view
                    .spread_set(UserKey::from_address(user), self.cfg.spread)
                    .into_iter()
                    .map(|n| n.0)
                    .collect();
                (spread, 0, false)
            }
        };
        nodes.push(self.me);
        nodes.sort_unstable();
        nodes.dedup();
        (nodes, bytes, known)
    }

    /// The mailbox size the manager knows (for quotas), or this node's share.
    pub async fn usage_bytes(&self, user: &str) -> u64 {
        match self.mail_map(user).await {
            (_, bytes, true) => bytes,
            _ => self.store.usage_bytes(user),
        }
    }

    /// The union of the user's fragments on the live nodes of the mail map,
    /// by message id, oldest first. Nodes that do not answer are skipped
    /// (one live replica per message suffices).
    pub async fn mailbox(&self, user: &str) -> Vec<Listed> {
        let view = self.view();
        let (nodes, _, _) = self.mail_map(user).await;
        let lists = nodes
            .into_iter()
            .filter(|&n| n == self.me || Self::is_live(&view, n))
            .map(|n| async move { (n, self.call(n, Request::List { user: user.to_owned() }).await) });
        let mut union: BTreeMap<MessageId, Listed> = BTreeMap::new();
        for (node, r) in futures::future::join_all(lists).await {
            let entries = match r {
                Ok(Reply::Listed { entries }) => entries,
                other => {
                    debug!(node, user, error = ?other.err(), "fragment not listed");
                    continue;
                }
            };
            for meta in entries {
                union
                    .entry(meta.id)
                    .or_insert_with(|| Listed {
                        meta,
                        holders: Vec::new(),
                    })
                    .holders
                    .push(node);
            }
        }
        // A live replica that did not list a message another one listed
        // has either not got its copy yet or deleted it while the other was
        // away (a node back from a crash, before the update log or
        // anti-entropy reach it): ask, and leave out what it deleted.
        let mut suspects: BTreeMap<NodeId, Vec<MessageId>> = BTreeMap::new();
        for l in union.values() {
            for r in &l.meta.replicas {
                if !l.holders.contains(r) && (*r == self.me || Self::is_live(&view, *r)) {
                    suspects.entry(*r).or_default().push(l.meta.id);
                }
            }
        }
        let asks = suspects.into_iter().map(|(node, ids)| async move {
            let mut dead = Vec::new();
            for chunk in ids.chunks(DELETED_QUERY_MAX) {
                let req = Request::Deleted {
                    user: user.to_owned(),
                    ids: chunk.to_vec(),
                };
                if let Ok(Reply::Tombstoned { ids }) = self.call(node, req).await {
                    dead.extend(ids);
                }
            }
            dead
        });
        for dead in futures::future::join_all(asks).await {
            for id in dead {
                union.remove(&id);
            }
        }
        union.into_values().collect()
    }

    /// A message's bytes from a live replica, this node first; checked
    /// against the body hash.
    pub async fn read(&self, msg: &Listed) -> Result<Vec<u8>, String> {
        let view = self.view();
        let mut order: Vec<NodeId> = Vec::new();
        if msg.holders.contains(&self.me) {
            order.push(self.me);
        }
        for n in msg.holders.iter().chain(&msg.meta.replicas) {
            if !order.contains(n) && Self::is_live(&view, *n) {
                order.push(*n);
            }
        }
        let mut last = String::from("no live replica");
        for n in order {
            match self.call(n, Request::Read { body: msg.meta.body }).await {
                Ok(Reply::Body { bytes }) if BodyHash::of(&bytes) == msg.meta.body => return Ok(bytes),
                Ok(_) => last = format!("node {n}: wrong body"),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Deletes the user's messages on every replica. Replicas that do not
    /// acknowledge get the deletion from the durable update log later.
    /// Fails only if this node cannot record the deletion at all.
    pub async fn delete(&self, user: &str, msgs: &[Listed]) -> Result<usize, String> {
        let hlc = self.clock.now();
        let mut per_node: BTreeMap<NodeId, Vec<Tombstone>> = BTreeMap::new();
        for m in msgs {
            let mut replicas: Vec<NodeId> = m.meta.replicas.clone();
            replicas.extend(&m.holders);
            replicas.sort_unstable();
            replicas.dedup();
            let tomb = Tombstone {
                id: m.meta.id,
                hlc,
                replicas: m.meta.replicas.clone(),
            };
            for n in replicas {
                per_node.entry(n).or_default().push(tomb.clone());
            }
        }
        let mut failed = 0;
        // A replica the view has down gets it from the log when it returns
        // (a call to it would only wait out its deadline).
        let view = self.view();
        let (per_node, down): (BTreeMap<_, _>, BTreeMap<_, _>) = per_node
            .into_iter()
            .partition(|(n, _)| *n == self.me || Self::is_live(&view, *n));
        for (n, tombs) in down {
            self.log_deletion(n, user, tombs)?;
            failed += 1;
        }
        let sends = per_node.into_iter().map(|(n, tombs)| async move {
            let r = self
                .call(
                    n,
                    Request::Delete {
                        user: user.to_owned(),
                        tombs: tombs.clone(),
                    },
                )
                .await;
            (n, tombs, r)
        });
        for (n, tombs, r) in futures::future::join_all(sends).await {
            if let Err(e) = r {
                debug!(node = n, user, error = %e, "deletion not acknowledged; logged for later");
                self.log_deletion(n, user, tombs)?;
                failed += 1;
            }
        }
        if failed > 0 {
            info!(
                user,
                replicas_missed = failed,
                "deletions logged until the replicas return"
            );
        }
        Ok(msgs.len())
    }

    /// Best effort: tombstones to `nodes`, logged where not acknowledged.
    async fn send_tombstones(&self, user: &str, nodes: &[NodeId], tombs: Vec<Tombstone>) {
        let view = self.view();
        for &n in nodes {
            let req = Request::Delete {
                user: user.to_owned(),
                tombs: tombs.clone(),
            };
            let live = n == self.me || Self::is_live(&view, n);
            if (!live || self.call(n, req).await.is_err())
                && let Err(e) = self.log_update(PendingUpdate {
                    node: n,
                    user: user.to_owned(),
                    tombs: tombs.clone(),
                })
            {
                warn!(error = %e, "cannot log a tombstone");
            }
        }
    }

    // ---- the update log ----------------------------------------------

    fn log_deletion(&self, node: NodeId, user: &str, tombs: Vec<Tombstone>) -> Result<(), String> {
        self.log_update(PendingUpdate {
            node,
            user: user.to_owned(),
            tombs,
        })
        .map_err(|e| format!("cannot log a deletion: {e}"))
    }

    fn log_update(&self, u: PendingUpdate) -> std::io::Result<()> {
        let dir = &self.cfg.update_dir;
        let n_files = std::fs::read_dir(dir)?.count();
        if n_files >= UPDATE_LOG_FILES_MAX {
            warn!(node = u.node, "update log full; anti-entropy will repair this replica");
            return Ok(());
        }
        let seq = self.update_seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("upd-{:016x}-{seq:08}-{}", self.clock.now(), u.node);
        let bytes = bincode::serde::encode_to_vec(&u, bincode_config()).map_err(std::io::Error::other)?;
        write_durable(dir, &name, &bytes)?;
        self.counters.updates_logged.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Updates still waiting for a replica.
    pub fn pending_updates(&self) -> usize {
        std::fs::read_dir(&self.cfg.update_dir).map_or(0, |d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("upd-"))
                .count()
        })
    }

    /// Sends logged updates to the replicas that are live again; removes
    /// each once acknowledged. Returns how many were acknowledged.
    pub async fn replay_updates(&self) -> usize {
        let dir = self.cfg.update_dir.clone();
        let Ok(rd) = std::fs::read_dir(&dir) else { return 0 };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("upd-"))
            .collect();
        names.sort();
        let view = self.view();
        let mut done = 0;
        for name in names {
            let path = dir.join(&name);
            let Ok(bytes) = std::fs::read(&path) else { continue };
            let u: PendingUpdate = match bincode::serde::decode_from_slice(&bytes, bincode_config()) {
                Ok((u, _)) => u,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "unreadable update dropped");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            if view.node(placement::NodeId(u.node)).is_none() && view.epoch() > 0 {
                // The node left the cluster: nothing to tell it.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if !Self::is_live(&view, u.node) {
                continue;
            }
            let req = Request::Delete {
                user: u.user.clone(),
                tombs: u.tombs,
            };
            if self.call(u.node, req).await.is_ok() {
                let _ = std::fs::remove_file(&path);
                done += 1;
                self.counters.updates_replayed.fetch_add(1, Ordering::Relaxed);
            }
        }
        done
    }

    // ---- anti-entropy ------------------------------------------------

    /// Compares digests with every other live node and repairs what
    /// differs, both ways.
    pub async fn anti_entropy_round(&self) -> RepairReport {
        let mut report = RepairReport::default();
        for peer in self.live_peers() {
            report.peers += 1;
            match self.sync_with(peer, &mut report).await {
                Ok(()) => {}
                Err(e) => {
                    report.peers_failed += 1;
                    debug!(peer, error = %e, "anti-entropy with peer incomplete");
                }
            }
        }
        if report.copies_pulled + report.tombstones_applied > 0 {
            info!(?report, "anti-entropy repaired differences");
        }
        report
    }

    async fn sync_with(&self, peer: NodeId, report: &mut RepairReport) -> Result<(), String> {
        let started = wall_ms();
        self.sync_digests(peer, report).await?;
        lock(&self.clean_since).insert(peer, started);
        Ok(())
    }

    async fn sync_digests(&self, peer: NodeId, report: &mut RepairReport) -> Result<(), String> {
        let digests = self.store.peer_digests(peer);
        for chunk in digests.chunks(DIGESTS_MAX) {
            let users = match self
                .call(
                    peer,
                    Request::Digests {
                        digests: chunk.to_vec(),
                    },
                )
                .await?
            {
                Reply::Differ { users } => users,
                other => return Err(format!("unexpected reply {other:?}")),
            };
            for user in users {
                report.users_differing += 1;
                let items = self.store.sync_items(&user, Some(peer));
                let back = match self
                    .call(
                        peer,
                        Request::Sync {
                            user: user.clone(),
                            items,
                        },
                    )
                    .await?
                {
                    Reply::Synced { items } => items,
                    other => return Err(format!("unexpected reply {other:?}")),
                };
                let (_, (pulled, tombs)) = self.reconcile(peer, &user, back, false).await?;
                report.copies_pulled += pulled;
                report.tombstones_applied += tombs;
            }
        }
        Ok(())
    }

    /// Applies `theirs` (another replica's items of `user`) here: deletions
    /// win over copies, a copy missing here is fetched if this node is in
    /// its replica set. With `answer`, returns what the other side lacks or
    /// has wrong (this node's items shared with it that differ).
    async fn reconcile(
        &self,
        from: NodeId,
        user: &str,
        theirs: Vec<SyncItem>,
        answer: bool,
    ) -> Result<(Vec<SyncItem>, (usize, usize)), String> {
        let mine: HashMap<MessageId, SyncItem> = self
            .store
            .sync_items(user, None)
            .into_iter()
            .map(|i| (i.id(), i))
            .collect();
        let mut back = Vec::new();
        let mut tombs = Vec::new();
        let mut pulls: Vec<EntryMeta> = Vec::new();
        let mut seen: BTreeSet<MessageId> = BTreeSet::new();
        for item in theirs {
            seen.insert(item.id());
            match (item, mine.get(&seen.last().copied().expect("just inserted"))) {
                (SyncItem::Dead(_), Some(SyncItem::Dead(_))) => {}
                (SyncItem::Dead(t), _) => tombs.push(t),
                (SyncItem::Live(_), Some(mine @ SyncItem::Dead(_))) => back.push(mine.clone()),
                (SyncItem::Live(_), Some(SyncItem::Live(_))) => {}
                (SyncItem::Live(meta), None) => {
                    if meta.replicas.contains(&self.me) {
                        pulls.push(meta);
                    }
                }
            }
        }
        if answer {
            for (id, item) in &mine {
                if !seen.contains(id) && item.replicas().contains(&from) {
                    back.push(item.clone());
                }
            }
            back.sort_by_key(|i| i.id());
        }
        let n_tombs = if tombs.is_empty() {
            0
        } else {
            let n = tombs.len();
            self.store
                .apply_tombstones(user, tombs)
                .await
                .map_err(|e| e.to_string())?;
            self.counters.repairs_tombstones.fetch_add(n as u64, Ordering::Relaxed);
            n
        };
        let mut n_pulled = 0;
        let new_fragment = !pulls.is_empty() && !self.store.holds(user);
        for meta in pulls {
            let body = if self.store.has_body(&meta.body) {
                match self.store.read_body(meta.body).await {
                    Ok(b) => b,
                    Err(_) => self.fetch_body(from, meta.body).await?,
                }
            } else {
                self.fetch_body(from, meta.body).await?
            };
            self.store
                .deliver(Delivery {
                    id: meta.id,
                    arrival_ms: meta.arrival_ms,
                    users: vec![user.to_owned()],
                    folder: meta.folder.clone(),
                    body,
                    replicas: meta.replicas.clone(),
                })
                .await
                .map_err(|e| e.to_string())?;
            n_pulled += 1;
        }
        self.counters
            .repairs_pulled
            .fetch_add(n_pulled as u64, Ordering::Relaxed);
        if new_fragment {
            self.report_new_fragments(vec![user.to_owned()]).await;
        }
        Ok((back, (n_pulled, n_tombs)))
    }

    async fn fetch_body(&self, from: NodeId, hash: BodyHash) -> Result<Vec<u8>, String> {
        match self.call(from, Request::Read { body: hash }).await? {
            Reply::Body { bytes } if BodyHash::of(&bytes) == hash => Ok(bytes),
            _ => Err(format!("node {from} sent a wrong body")),
        }
    }

    // ---- housekeeping -------------------------------------------------

    /// Messages held here with fewer than R live replicas (each counted by
    /// one node only; see [`FragmentStore::under_replicated`]).
    pub fn under_replicated(&self) -> u64 {
        let view = self.view();
        if view.nodes().is_empty() {
            return 0;
        }
        self.store
            .under_replicated(self.me, self.cfg.replicas, |n| Self::is_live(&view, n))
    }

    /// Forgets deletions every other replica of the message is known to
    /// hold (an anti-entropy exchange with each completed after this node
    /// took the tombstone, and it is at least `tombstone_min_age` old), and
    /// any older than the retention.
    pub fn expire_tombstones(&self) -> usize {
        let now = wall_ms();
        let retention = self.cfg.tombstone_retention.as_millis() as u64;
        let min_age = self.cfg.tombstone_min_age.as_millis() as u64;
        let oldest_hlc = crate::hlc::from_ms(now.saturating_sub(retention));
        let clean = lock(&self.clean_since).clone();
        let me = self.me;
        self.store.forget_tombstones(|_, hlc, replicas, added_ms| {
            if hlc < oldest_hlc {
                return true;
            }
            now.saturating_sub(added_ms) >= min_age
                && replicas
                    .iter()
                    .filter(|r| **r != me)
                    .all(|r| clean.get(r).is_some_and(|since| *since > added_ms))
        })
    }
}

fn wall_ms() -> u64 {
    crate::hlc::to_ms(crate::hlc::wall_hlc())
}

/// Writes `name` in `dir` so that it is either whole or absent after a
/// crash: temporary file, fsync, rename, fsync of the directory.
fn write_durable(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
