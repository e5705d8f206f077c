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
//!
//! # Layout
//! * [`protocol`]: the messages, the [`Network`] trait and [`ReplicaError`];
//! * `calls`: one call with its deadline (cut when a view has its node
//!   down) and the serving of calls from others;
//! * [`manager`]: the user manager as a pure state machine;
//! * `reports`: the reports that rebuild managers' maps after view changes;
//! * `front`: delivery, mailbox listing, reads and deletions;
//! * `updates`: the durable log of updates a replica has not acknowledged;
//! * [`anti_entropy`]: the pure repair plan and the rounds that carry it out;
//! * [`repair_plan`] (pure) and [`repair`]: restoring R copies, handing a
//!   draining node's copies off, evening out stored bytes;
//! * [`watch`]: sessions waiting for changes (IMAP IDLE) told of them.
//!
//! # In more detail
//! `replica/`: the replica protocol, by role. `protocol.rs`: `Request`/
//! `Reply` in an `Envelope` that names sender and target and piggybacks the
//! sender's HLC, load and run number (a call reaching another identity is
//! refused there, an answer from another identity is not taken); the
//! `Network` trait; `ReplicaError` (typed: unreachable, timeout,
//! marked down, remote failure, store, wrong body, update log).
//! `calls.rs`: every call has a deadline (2 s, longer for bodies) and also
//! ends when a view arrives that has its node down; serving calls.
//! `manager.rs`: the user manager as a **pure state machine** (`Manager`:
//! mail maps, reports, mailbox locks with leases, loads and run numbers;
//! time is an argument, no I/O): `Place`, `MailMap` (trusted only once every
//! live node, this one included, has sent its full report for the current
//! view epoch; until then it answers with every live node, so a listing is
//! never partial; a report from a node ahead of this one is voided by an
//! intermediate view), `Report`, `Lock`/`Unlock`; unit and property tests.
//! `reports.rs`: the full reports after a view change and the first-fragment
//! report. `front.rs`: `deliver` (a manager that does not answer is replaced
//! by local placement; a delivery none of whose copies was acknowledged is
//! answered `451` and tombstoned on its targets), `mailbox` (asks a live
//! replica that did not list a message another listed whether it deleted
//! it), `read`, `delete`, the cluster-wide mailbox lock. `updates.rs`: the
//! durable update log (one fsynced file per unacknowledged deletion in
//! `DATA/updates/`; `upd-` deletions, `upm-` folder and flag changes).
//! `anti_entropy.rs`: `plan_sync` (pure: deletions win, a copy missing here
//! is fetched by a node in its replica set, folder and flag registers merge
//! both ways, what to send back) and `tombstone_expired` (pure), with a convergence property test;
//! the async round carries the plan out. Where two copies of a message
//! disagree about its replica set, the newer set (by version) wins on both,
//! and a copy dropped for a newer set leaves a **move marker**
//! (`SyncItem::Moved`) that refuses older sets and tells older holders the
//! newer one. A node repairs and moves nothing until one anti-entropy round
//! of its run has reached every live peer (or 10 minutes passed), so a node
//! back from an absence cannot move a copy that was deleted or re-placed
//! while it was away. `repair.rs`: **self-healing**. `plan_repair` (pure):
//! only a message's coordinator acts (the lowest member of its set that is
//! up, else the lowest draining one, so a draining node hands off what only
//! it holds), when a member is gone (removed, draining, down past the grace)
//! or the set is short of R with more nodes up; the new set is placement's
//! `repair`, never smaller than the copies there are now. `plan_move` (pure)
//! for rebalancing: once any node is more than 5% from its weighted share of
//! the stored bytes (`Balance`, from `Request::Usage` of every up node), a
//! member above its share gives its copy to the node furthest below, each
//! coordinator taking 1/N of each distance. A step is carried out in this
//! order, so that no message ever has fewer copies than before it: the new
//! copies (`Request::Copy`, bodies checked against their hash, fsynced),
//! the new set on the members that stay, then on those it leaves out (they
//! drop their copies), this node last (`Request::SetReplicas`); each step
//! gives the set a fresh version (an HLC with the node's id in its low
//! bits). A step cut short is planned again next round (copies are
//! idempotent, placement picks the same targets). `settle_sets` lists a
//! repaired user's fragments and tells holders of older sets the newest
//! (two repairs made apart, by coordinators that each saw the other's
//! members gone, leave sets with no member in common, which anti-entropy
//! would never compare). `drained()`: no copy, no pending update, every
//! deletion synced with its other replicas. `tests/pure_sim.rs` drives the
//! manager and the plan alone from a seed (no runtime, no threads), so a
//! failing seed replays the same run; `tests/sim.rs` drives whole
//! replicators over the seeded in-memory network.

mod anti_entropy;
mod calls;
mod front;
pub mod manager;
pub mod protocol;
pub mod repair;
pub mod repair_plan;
mod reports;
mod updates;
pub mod watch;

pub use anti_entropy::{SyncPlan, plan_sync, tombstone_expired};
pub use protocol::*;
pub use repair::{RateLimit, RepairRound, STALLED_ROUNDS};
pub use repair_plan::{Balance, RepairStep, coordinator, plan_move, plan_repair};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use placement::{NodeState, View};

use crate::hlc::HlcClock;
use crate::{EntryMeta, FragmentStore, MessageId};
use manager::Manager;

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
    /// How long a node may be down before its copies are made elsewhere
    /// (a quick restart costs nothing).
    pub repair_grace: Duration,
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
            repair_grace: Duration::from_secs(30),
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
    /// Copies whose folder or flags anti-entropy brought up to date.
    pub repairs_marks: AtomicU64,
    pub manager_fallbacks: AtomicU64,
    /// Calls ended because a new view had their node down.
    pub calls_cut_by_view: AtomicU64,
    /// Copies made on other nodes by repair (and the bytes).
    pub repairs_copied: AtomicU64,
    pub repairs_bytes: AtomicU64,
    /// Repairs (or moves) this node coordinates that the running round has
    /// not done yet (0 between rounds).
    pub repair_pending: AtomicU64,
    /// Copies moved to even out the stored bytes (rebalancing).
    pub rebalance_moves: AtomicU64,
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
    /// The user manager's soft state (pure; see [`manager`]).
    manager: Mutex<Manager>,
    /// Copies being written here (part of the load other nodes see).
    inflight: AtomicU64,
    clock: HlcClock,
    /// The origin of the monotonic milliseconds the manager is given.
    started: Instant,
    update_seq: AtomicU64,
    /// Tells this run's mailbox locks from those of earlier runs.
    boot: u32,
    lock_seq: AtomicU64,
    /// Per peer: wall-clock ms at the start of the last anti-entropy
    /// exchange that completed without error (the peer then held every
    /// tombstone this node held at that moment, for the messages they share).
    clean_since: Mutex<HashMap<NodeId, u64>>,
    /// Copies of messages held here that failed to reach live members of
    /// their replica set at delivery (see [`Request::MissingCopies`]):
    /// counted as under-replicated until made.
    /// Per message, the nodes missing a copy and when that was noted (wall
    /// ms): an anti-entropy exchange with the node that completes after the
    /// note made the copy (the node fetches what its set says it holds).
    missing: Mutex<BTreeMap<(String, MessageId), BTreeMap<NodeId, u64>>>,
    /// Unlocks whose manager did not answer: (user, manager, token, until
    /// ms of this replicator's clock).
    pending_unlocks: Mutex<Vec<(String, NodeId, u64, u64)>>,
    /// When this node first saw each node down (for the repair grace).
    down_since: Mutex<HashMap<NodeId, Instant>>,
    /// The repair grace in force, in milliseconds (`cfg.repair_grace` at
    /// start; a cluster setting may change it while the node runs).
    repair_grace_ms: AtomicU64,
    /// Whether an anti-entropy round of this run reached every live peer:
    /// a node back from an absence may hold sets (or copies) the others
    /// changed or deleted meanwhile, so it repairs and moves nothing until
    /// it has compared notes with them.
    caught_up: std::sync::atomic::AtomicBool,
    /// Sessions waiting for changes, and what to tell others (see [`watch`]).
    watches: Arc<watch::Watches>,
    /// The rebalancer's progress: the total distance below the shares at
    /// its last round, and the rounds since it last shrank (moves go to
    /// the users' spreads until it stalls: see `rebalance_round`).
    rebalance_stall: Mutex<(Option<u64>, u32)>,
    pub counters: ReplicaCounters,
}

impl<N: Network> std::fmt::Debug for Replicator<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replicator").field("me", &self.me).finish()
    }
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

/// Whether the view has `node` (and not down).
fn is_live(view: &View, node: NodeId) -> bool {
    view.node(placement::NodeId(node))
        .is_some_and(|n| n.state != NodeState::Down)
}

/// The user's manager in the view.
fn manager_of(view: &View, user: &str) -> Option<NodeId> {
    view.user_manager(user).map(|n| n.0)
}

/// The nodes the view does not have down, this one included.
fn live_nodes(view: &View) -> impl Iterator<Item = NodeId> + '_ {
    view.nodes().iter().map(|n| n.id.0).filter(|&n| is_live(view, n))
}

fn wall_ms() -> u64 {
    crate::hlc::to_ms(crate::hlc::wall_hlc())
}

impl<N: Network> Replicator<N> {
    /// A replicator for node `me` over `store`. The view starts empty (every
    /// delivery stays local) until [`Replicator::set_view`].
    pub fn new(me: NodeId, store: Arc<FragmentStore>, net: N, cfg: ReplicaConfig) -> std::io::Result<Self> {
        std::fs::create_dir_all(&cfg.update_dir)?;
        let empty = View::with_slot_bits(0, Vec::new(), placement::MIN_SLOT_BITS).expect("an empty view is valid");
        let repair_grace_ms = cfg.repair_grace.as_millis() as u64;
        Ok(Replicator {
            me,
            store,
            net,
            cfg,
            view: RwLock::new(Arc::new(empty)),
            view_epoch: tokio::sync::watch::Sender::new(0),
            manager: Mutex::new(Manager::new(me)),
            inflight: AtomicU64::new(0),
            clock: HlcClock::default(),
            started: Instant::now(),
            update_seq: AtomicU64::new(0),
            boot: {
                let mut h = blake3::Hasher::new();
                h.update(&crate::hlc::wall_hlc().to_le_bytes());
                h.update(&std::process::id().to_le_bytes());
                h.update(&me.to_le_bytes());
                u32::from_le_bytes(h.finalize().as_bytes()[..4].try_into().expect("4 bytes"))
            },
            lock_seq: AtomicU64::new(0),
            clean_since: Mutex::new(HashMap::new()),
            missing: Mutex::new(BTreeMap::new()),
            pending_unlocks: Mutex::new(Vec::new()),
            down_since: Mutex::new(HashMap::new()),
            repair_grace_ms: AtomicU64::new(repair_grace_ms),
            caught_up: std::sync::atomic::AtomicBool::new(false),
            watches: Default::default(),
            rebalance_stall: Mutex::new((None, 0)),
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

    /// Takes a new view (see [`Manager::take_view`]); the caller then runs
    /// [`Replicator::report_round`] and an anti-entropy round.
    pub fn set_view(&self, view: Arc<View>) {
        let epoch = view.epoch();
        lock(&self.manager).take_view(&view);
        self.note_down(&view);
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

    /// This node's load as it tells the others: copies being written, plus
    /// the writes waiting in its store's queue, so that managers place new
    /// mail elsewhere while this store falls behind (slow fsyncs, a repair
    /// or move taking its disk).
    pub fn load(&self) -> u64 {
        self.copies_in_flight() + self.store.queued() as u64
    }

    /// Copies being written here (handlers in flight; released when they
    /// end, however they end).
    pub fn copies_in_flight(&self) -> u64 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Milliseconds of this replicator's monotonic clock (the manager's
    /// time).
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The other nodes the view does not have down.
    fn live_peers(&self) -> Vec<NodeId> {
        let view = self.view();
        live_nodes(&view).filter(|&n| n != self.me).collect()
    }

    /// Messages held here with fewer than R live replicas (each counted by
    /// one node only; see [`FragmentStore::under_replicated`]), plus those
    /// whose replica set is live but a copy to one of its members failed
    /// and is not made yet (counted here, the one holder told of it).
    pub fn under_replicated(&self) -> u64 {
        let view = self.view();
        if view.nodes().is_empty() {
            return 0;
        }
        let by_set = self
            .store
            .under_replicated(self.me, self.cfg.replicas, |n| is_live(&view, n));
        by_set + self.missing_counted(&view)
    }

    /// Notes copies that failed to reach live nodes (bounded).
    pub(super) fn note_missing(&self, user: String, id: MessageId, missing: Vec<NodeId>) {
        let mut m = lock(&self.missing);
        if m.len() >= MISSING_COPIES_MAX && !m.contains_key(&(user.clone(), id)) {
            tracing::warn!(%id, "too many missing copies noted; this one is left to anti-entropy");
            return;
        }
        let now = wall_ms();
        m.entry((user, id))
            .or_default()
            .extend(missing.into_iter().filter(|n| *n != self.me).map(|n| (n, now)));
    }

    /// An anti-entropy exchange with `peer` that started at `started` (wall
    /// ms) completed: copies noted missing there before it are made.
    pub(super) fn synced_missing(&self, peer: NodeId, started: u64) {
        let mut m = lock(&self.missing);
        m.retain(|_, targets| {
            targets.retain(|n, noted| !(*n == peer && *noted < started));
            !targets.is_empty()
        });
    }

    /// The noted messages that the replica-set count does not already
    /// count (their sets have R live members) and that miss a copy on a
    /// live node.
    fn missing_counted(&self, view: &View) -> u64 {
        let notes: Vec<((String, MessageId), Vec<NodeId>)> = lock(&self.missing)
            .iter()
            .map(|(k, v)| (k.clone(), v.keys().copied().collect()))
            .collect();
        let mut n = 0;
        for ((user, id), targets) in notes {
            let Some(e) = self.store.list(&user).into_iter().find(|e| e.id == id) else {
                continue;
            };
            let live = e.replicas.iter().filter(|r| is_live(view, **r)).count();
            if live >= self.cfg.replicas && targets.iter().any(|t| is_live(view, *t)) {
                n += 1;
            }
        }
        n
    }

    /// Makes the copies noted missing on the members of their sets that are
    /// live now (copied from here: entry and body, the same replica set);
    /// forgets notes whose message is gone here or whose targets left the
    /// set. Returns how many copies were made.
    pub async fn make_missing_copies(&self) -> usize {
        let view = self.view();
        let notes: Vec<((String, MessageId), Vec<NodeId>)> = lock(&self.missing)
            .iter()
            .map(|(k, v)| (k.clone(), v.keys().copied().collect()))
            .collect();
        let mut made = 0;
        // A target that failed once is not tried again this round (each try
        // costs a call deadline).
        let mut failing: BTreeSet<NodeId> = BTreeSet::new();
        for ((user, id), targets) in notes {
            let entry = self.store.list(&user).into_iter().find(|e| e.id == id);
            let Some(e) = entry else {
                lock(&self.missing).remove(&(user, id));
                continue;
            };
            let mut done: Vec<NodeId> = targets.iter().copied().filter(|t| !e.replicas.contains(t)).collect();
            let live: Vec<NodeId> = targets
                .iter()
                .copied()
                .filter(|t| e.replicas.contains(t) && is_live(&view, *t) && !failing.contains(t))
                .collect();
            if !live.is_empty() {
                let body = match self.store.read_body(e.body).await {
                    Ok(b) => b,
                    Err(err) => {
                        tracing::warn!(%id, error = %err, "cannot read a body to copy");
                        continue;
                    }
                };
                for t in live {
                    let req = Request::Store {
                        id,
                        arrival_ms: e.arrival_ms,
                        folder: e.folder.clone(),
                        groups: vec![(e.replicas.clone(), vec![user.clone()])],
                        body: body.clone(),
                        epoch: view.epoch(),
                        unplaced: Vec::new(),
                    };
                    match self.call(t, req).await {
                        Ok(Reply::Stored) => {
                            made += 1;
                            done.push(t);
                        }
                        other => {
                            failing.insert(t);
                            tracing::debug!(%id, node = t, error = ?other.err(), "missing copy not made yet");
                        }
                    }
                }
            }
            let mut m = lock(&self.missing);
            if let Some(left) = m.get_mut(&(user.clone(), id)) {
                for d in done {
                    left.remove(&d);
                }
                if left.is_empty() {
                    m.remove(&(user, id));
                }
            }
        }
        if made > 0 {
            tracing::info!(made, "made copies that failed at delivery");
        }
        made
    }
}
