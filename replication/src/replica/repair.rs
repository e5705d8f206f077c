//! Self-healing: restoring R copies of every message after a node is gone
//! (down longer than the grace period, removed, or draining).
//!
//! What to do with one message is a pure plan ([`plan_repair`]): only the
//! message's *coordinator* acts (the lowest-numbered member of its replica
//! set that is up; when none is, the lowest draining one, so a draining
//! node hands off what only it holds), and the new set is placement's
//! repair plan. Carrying a step out never leaves a message with fewer
//! copies than before it: the new copies are made (bodies checked against
//! their blake3 names, fsynced) before any holder learns the new set, the
//! holders that stay learn it next, and the ones it leaves out (they drop
//! their copy) last. Every step gives the new set a fresh HLC version, and
//! the newest set wins wherever two copies disagree (anti-entropy carries
//! it to holders that were away), so a node that comes back after its
//! copies were replaced trims them. A step cut short (a crash, a target
//! that does not answer) is planned again in the next round: copies are
//! idempotent and placement picks the same targets.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use placement::{NodeState, View};
use tracing::{debug, info, warn};

use super::protocol::{COPY_BATCH_BYTES, NodeId, PLACE_BATCH_MAX, ReplicaError, Reply, Request};
use super::repair_plan::{Balance, RepairStep, plan_move, plan_repair};
use super::{Replicator, lock};
use crate::{EntryMeta, MessageId, Placed, SetChange, Tombstone};

/// Rebalance rounds without progress (the total distance below the
/// shares not shrinking) after which a copy may move outside its user's
/// spread: the spreads of the users this node coordinates may not reach
/// the node that needs copies.
pub const STALLED_ROUNDS: u32 = 5;

/// Spaces repair traffic out to `rate` bytes per second.
#[derive(Debug)]
pub struct RateLimit {
    /// Bytes a second (at least 1); may change while in use.
    rate: std::sync::atomic::AtomicU64,
    next: tokio::sync::Mutex<Instant>,
}

impl RateLimit {
    pub fn new(bytes_per_s: u64) -> Self {
        RateLimit {
            rate: std::sync::atomic::AtomicU64::new(bytes_per_s.max(1)),
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    /// Bytes a second now.
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the rate from the next [`RateLimit::take`] on.
    pub fn set_rate(&self, bytes_per_s: u64) {
        self.rate.store(bytes_per_s.max(1), Ordering::Relaxed);
    }

    /// Waits until `bytes` more may be sent.
    pub async fn take(&self, bytes: u64) {
        let mut next = self.next.lock().await;
        let now = Instant::now();
        // At most a second of credit builds up while idle.
        let floor = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        let start = (*next).max(floor);
        let end = start + Duration::from_secs_f64(bytes as f64 / self.rate.load(Ordering::Relaxed) as f64);
        *next = end;
        if end > now {
            tokio::time::sleep(end - now).await;
        }
    }
}

/// What one repair round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepairRound {
    /// Messages found needing a repair this node coordinates.
    pub planned: u64,
    /// Of those, repaired (new set on every holder that answered).
    pub repaired: u64,
    /// Copies made on other nodes.
    pub copies: u64,
    pub bytes: u64,
    /// Steps left for a later round (a target or holder did not answer).
    pub failed: u64,
    /// Messages found deleted on a holder meanwhile (deleted here too).
    pub deleted: u64,
    /// Holders told a newer set when the repaired users were listed.
    pub settled: u64,
}

impl<N: super::Network> Replicator<N> {
    /// Changes the repair grace (see [`super::ReplicaConfig::repair_grace`]) from
    /// now on.
    pub fn set_repair_grace(&self, grace: Duration) {
        self.repair_grace_ms.store(grace.as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether `node` counts as gone for repair: not in the view, draining,
    /// or down for at least the grace period (as this node saw it).
    pub fn gone_nodes(&self) -> impl Fn(NodeId) -> bool + use<N> {
        let view = self.view();
        let since = lock(&self.down_since).clone();
        let grace = Duration::from_millis(self.repair_grace_ms.load(Ordering::Relaxed));
        move |n| match view.node(placement::NodeId(n)).map(|i| i.state) {
            None | Some(NodeState::Draining) => true,
            Some(NodeState::Up) => false,
            Some(NodeState::Down) => since.get(&n).is_none_or(|t| t.elapsed() >= grace),
        }
    }

    /// Whether this run has compared notes with the other nodes (an
    /// anti-entropy round that reached every live peer, or ten minutes):
    /// until then it neither repairs nor moves, since a node back from an
    /// absence may hold replica sets, or copies, that the others changed
    /// or deleted while it was away.
    pub fn caught_up(&self) -> bool {
        self.caught_up.load(Ordering::Relaxed) || self.started.elapsed() >= super::anti_entropy::CATCH_UP_AFTER
    }

    /// Notes when each node was first seen down (for the grace period).
    pub(super) fn note_down(&self, view: &View) {
        let mut since = lock(&self.down_since);
        since.retain(|n, _| {
            view.node(placement::NodeId(*n))
                .is_some_and(|i| i.state == NodeState::Down)
        });
        for n in view.nodes() {
            if n.state == NodeState::Down {
                since.entry(n.id.0).or_insert_with(Instant::now);
            }
        }
    }

    /// Whether a draining node may be removed without loss: it holds no
    /// copy, its update log is empty, and every other replica of each
    /// deletion it holds (still in the view) has synced with it since it
    /// took the deletion. A node down meanwhile holds the drain up until it
    /// returns or is removed: otherwise its stale copy could come back.
    pub fn drained(&self) -> bool {
        if self.store.stats().entries > 0 || self.pending_updates() > 0 {
            return false;
        }
        let view = self.view();
        let clean = lock(&self.clean_since).clone();
        let me = self.me;
        self.store.every_deletion(|replicas, added_ms| {
            replicas.iter().filter(|r| **r != me).all(|r| {
                view.node(placement::NodeId(*r)).is_none() || clean.get(r).is_some_and(|since| *since > added_ms)
            })
        })
    }

    /// Whether a repair round may find something: a replica set held here
    /// names a node that is gone, or has fewer than R members while more
    /// nodes are up (from the per-set counts, without a walk).
    pub fn repair_wanted(&self) -> bool {
        let view = self.view();
        let gone = self.gone_nodes();
        let want = self.cfg.replicas.min(view.up_nodes().count());
        self.store
            .replica_sets()
            .iter()
            .any(|set| set.len() < want || set.iter().any(|n| gone(*n)))
    }

    /// Walks every message held here and carries out the repairs this node
    /// coordinates, at most `rate` bytes a second of copies.
    pub async fn repair_round(&self, rate: &RateLimit) -> RepairRound {
        let mut round = RepairRound::default();
        if !self.caught_up() {
            return round;
        }
        let users: Vec<String> = self.store.usage_async().await.into_iter().map(|u| u.user).collect();
        let mut plans: Vec<(String, Vec<(EntryMeta, RepairStep)>)> = Vec::new();
        {
            let view = self.view();
            let gone = self.gone_nodes();
            for user in users {
                let spread = self.spread_of(&view, &user);
                let steps: Vec<(EntryMeta, RepairStep)> = self
                    .store
                    .list(&user)
                    .into_iter()
                    .filter_map(|m| plan_repair(self.me, &view, self.cfg.replicas, &gone, &m, &spread).map(|s| (m, s)))
                    .collect();
                if !steps.is_empty() {
                    round.planned += steps.len() as u64;
                    plans.push((user, steps));
                }
            }
        }
        self.carry_out(plans, rate, &mut round, true).await;
        if round.planned > 0 {
            info!(?round, "repair round");
        }
        round
    }

    /// A new replica-set version: an HLC value with this node's id in its
    /// low 8 bits, so that two nodes never give one version to two sets.
    fn set_version(&self) -> u64 {
        let h = self.clock.now();
        let v = (((h >> 8) + 1) << 8) | (self.me & 0xFF);
        self.clock.observe(v);
        v
    }

    /// Lists every fragment of `user` and, where holders of one message
    /// disagree about its replica set, tells the older ones the newest set
    /// (they drop their copies if it leaves them out). Two repairs of one
    /// message made apart (overlapping failures: each coordinator saw the
    /// other's members gone) leave two sets with no member in common, which
    /// anti-entropy, pairing replicas by set, would never compare; the
    /// listing does. Returns how many holders were told.
    pub async fn settle_sets(&self, user: &str) -> u64 {
        let mut by_id: BTreeMap<MessageId, Vec<(NodeId, EntryMeta)>> = BTreeMap::new();
        for (node, entries) in self.fragments(user).await {
            for m in entries {
                by_id.entry(m.id).or_default().push((node, m));
            }
        }
        let mut tell: BTreeMap<NodeId, Vec<SetChange>> = BTreeMap::new();
        for copies in by_id.into_values() {
            let Some((_, newest)) = copies.iter().max_by_key(|c| c.1.placed).cloned() else {
                continue;
            };
            for (node, _) in copies.into_iter().filter(|c| c.1.placed < newest.placed) {
                tell.entry(node).or_default().push(SetChange {
                    id: newest.id,
                    replicas: newest.replicas.clone(),
                    prior: newest.prior.clone(),
                    placed: newest.placed,
                });
            }
        }
        let mut told = 0;
        for (node, changes) in tell {
            for chunk in changes.chunks(PLACE_BATCH_MAX) {
                let n = chunk.len() as u64;
                match self.set_replicas_on(node, user, chunk.to_vec()).await {
                    Ok(_) => told += n,
                    Err(e) => debug!(node, error = %e, "settling sets: holder not told"),
                }
            }
        }
        told
    }

    /// Moves copies towards every up node's share of the stored bytes
    /// (weighted), as the coordinator of the messages it moves: asks every
    /// up node what it stores (no figures from one of them: no moves), then
    /// walks the messages it coordinates whose sets are healthy and plans
    /// moves from nodes above their share to nodes below it, this
    /// coordinator's part of each excess (`1 / up nodes`, since all of
    /// them move at once on the same figures), at most `budget` bytes in
    /// this round. Each move is carried out like a repair: copy, new set on
    /// the staying member, the giving node drops its copy last. A copy
    /// moves into its user's spread (so a user's mail stays on a few
    /// nodes) while that fills the shares; once the total distance below
    /// them has not shrunk for [`STALLED_ROUNDS`] rounds, to any node
    /// until every node is within the tolerance again.
    pub async fn rebalance_round(&self, rate: &RateLimit, budget: u64) -> RepairRound {
        let mut round = RepairRound::default();
        if !self.caught_up() {
            return round;
        }
        let view = self.view();
        let up: Vec<NodeId> = view.up_nodes().map(|n| n.id.0).collect();
        if up.len() < 2 || !up.contains(&self.me) {
            return round;
        }
        let mut bytes: BTreeMap<NodeId, u64> = BTreeMap::new();
        bytes.insert(self.me, self.store.stats().body_bytes);
        let asks = up
            .iter()
            .filter(|n| **n != self.me)
            .map(|&n| async move { (n, self.call(n, Request::Usage).await) });
        for (n, r) in futures::future::join_all(asks).await {
            if let Ok(Reply::Usage { bytes: b }) = r {
                bytes.insert(n, b);
            }
        }
        if bytes.len() < up.len() {
            return round;
        }
        let mut balance = Balance::new(&view, &bytes, 1.0 / up.len() as f64);
        if !balance.open() {
            // Balanced: the next imbalance starts its count afresh.
            *lock(&self.rebalance_stall) = (None, 0);
            return round;
        }
        let anywhere = {
            let below: u64 = balance.deficit.values().sum();
            let mut stall = lock(&self.rebalance_stall);
            // Once stalled, anywhere until the shares are met.
            if stall.1 < STALLED_ROUNDS {
                stall.1 = if stall.0.is_some_and(|b| below >= b) {
                    stall.1 + 1
                } else {
                    0
                };
            }
            stall.0 = Some(below);
            stall.1 >= STALLED_ROUNDS
        };
        let gone = self.gone_nodes();
        let users: Vec<String> = self.store.usage_async().await.into_iter().map(|u| u.user).collect();
        let mut planned_bytes = 0u64;
        let mut plans: Vec<(String, Vec<(EntryMeta, RepairStep)>)> = Vec::new();
        'walk: for user in users {
            let mut steps = Vec::new();
            let spread = self.spread_of(&view, &user);
            let near: &[NodeId] = if anywhere { &[] } else { &spread };
            for m in self.store.list(&user) {
                if plan_repair(self.me, &view, self.cfg.replicas, &gone, &m, &spread).is_some() {
                    continue;
                }
                if let Some(step) = plan_move(self.me, &view, &mut balance, &m, near) {
                    planned_bytes += m.size_bytes;
                    steps.push((m, step));
                }
                if planned_bytes >= budget || !balance.open() {
                    if !steps.is_empty() {
                        plans.push((user, steps));
                    }
                    break 'walk;
                }
            }
            if !steps.is_empty() {
                plans.push((user, steps));
            }
        }
        round.planned = plans.iter().map(|(_, s)| s.len() as u64).sum();
        self.carry_out(plans, rate, &mut round, false).await;
        if round.planned > 0 {
            self.counters
                .rebalance_moves
                .fetch_add(round.repaired, Ordering::Relaxed);
            info!(?round, "rebalance round");
        }
        round
    }

    /// The user's spread: where repairs and moves put the user's copies
    /// first (the same on every node for a view).
    fn spread_of(&self, view: &View, user: &str) -> Vec<NodeId> {
        view.spread_set(placement::UserKey::from_address(user), self.cfg.spread)
            .into_iter()
            .map(|n| n.0)
            .collect()
    }

    /// Carries out planned steps user by user (batches of at most
    /// [`PLACE_BATCH_MAX`]), keeping `repair_pending` at what is left; with
    /// `settle`, then lists each user's fragments ([`Self::settle_sets`]).
    async fn carry_out(
        &self,
        plans: Vec<(String, Vec<(EntryMeta, RepairStep)>)>,
        rate: &RateLimit,
        round: &mut RepairRound,
        settle: bool,
    ) {
        self.counters.repair_pending.store(round.planned, Ordering::Relaxed);
        for (user, steps) in plans {
            for chunk in steps.chunks(PLACE_BATCH_MAX) {
                self.repair_user(&user, chunk, rate, round).await;
                let left = round
                    .planned
                    .saturating_sub(round.repaired + round.failed + round.deleted);
                self.counters.repair_pending.store(left, Ordering::Relaxed);
            }
            if settle {
                round.settled += self.settle_sets(&user).await;
            }
        }
        self.counters.repair_pending.store(0, Ordering::Relaxed);
    }

    /// New replica sets for `user`'s entries on `node`; its outcomes.
    pub(super) async fn set_replicas_on(
        &self,
        node: NodeId,
        user: &str,
        changes: Vec<SetChange>,
    ) -> Result<Vec<Placed>, ReplicaError> {
        let req = Request::SetReplicas {
            user: user.to_owned(),
            changes,
        };
        match self.call(node, req).await? {
            Reply::ReplicasSet { outcomes } => Ok(outcomes),
            _ => Err(ReplicaError::UnexpectedReply("set-replicas".into())),
        }
    }

    /// Carries out the steps of one user's messages, batched per node.
    async fn repair_user(
        &self,
        user: &str,
        steps: &[(EntryMeta, RepairStep)],
        rate: &RateLimit,
        round: &mut RepairRound,
    ) {
        let version = self.set_version();
        let mut failed: BTreeSet<MessageId> = BTreeSet::new();
        let mut deleted: Vec<Tombstone> = Vec::new();
        // 1. The new copies, per target, bodies read here.
        let mut by_target: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
        for (i, (_, step)) in steps.iter().enumerate() {
            for t in &step.add {
                by_target.entry(*t).or_default().push(i);
            }
        }
        // Bodies are read per target (a step mostly adds one node), so that
        // at most one batch of them is in memory.
        for (target, idx) in by_target {
            let mut batch: Vec<(EntryMeta, Vec<u8>)> = Vec::new();
            let mut bytes = 0usize;
            for i in idx {
                let (meta, step) = &steps[i];
                if failed.contains(&meta.id) {
                    continue;
                }
                let body = match self.store.read_body(meta.body).await {
                    Ok(b) => b,
                    Err(e) => {
                        warn!(%user, id = %meta.id, error = %e, "cannot read a body to repair");
                        failed.insert(meta.id);
                        continue;
                    }
                };
                bytes += body.len();
                let mut copy = meta.clone();
                copy.replicas = step.replicas.clone();
                copy.prior = step.prior.clone();
                copy.placed = version;
                batch.push((copy, body));
                if bytes >= COPY_BATCH_BYTES {
                    self.send_copies(
                        user,
                        target,
                        std::mem::take(&mut batch),
                        rate,
                        round,
                        &mut failed,
                        &mut deleted,
                    )
                    .await;
                    bytes = 0;
                }
            }
            if !batch.is_empty() {
                self.send_copies(user, target, batch, rate, round, &mut failed, &mut deleted)
                    .await;
            }
        }
        // 2. The new set, on the members that stay, then on those it leaves
        // out, this node last (it may be one of them when it drains).
        let good: Vec<&RepairStep> = steps
            .iter()
            .map(|(_, s)| s)
            .filter(|s| !failed.contains(&s.id) && !deleted.iter().any(|t| t.id == s.id))
            .collect();
        let mut stay: BTreeMap<NodeId, Vec<SetChange>> = BTreeMap::new();
        let mut leave: BTreeMap<NodeId, Vec<SetChange>> = BTreeMap::new();
        let view = self.view();
        let change = |s: &RepairStep| SetChange {
            id: s.id,
            replicas: s.replicas.clone(),
            prior: s.prior.clone(),
            placed: version,
        };
        for s in &good {
            let change = change(s);
            for n in s.replicas.iter().filter(|n| **n != self.me && !s.add.contains(n)) {
                stay.entry(*n).or_default().push(change.clone());
            }
            for n in s
                .surplus
                .iter()
                .filter(|n| **n != self.me && super::is_live(&view, **n))
            {
                leave.entry(*n).or_default().push(change.clone());
            }
        }
        let mut unsettled: BTreeSet<MessageId> = BTreeSet::new();
        for (node, changes) in stay {
            let ids: Vec<MessageId> = changes.iter().map(|c| c.id).collect();
            match self.set_replicas_on(node, user, changes).await {
                Ok(outcomes) => {
                    for (id, o) in ids.iter().zip(outcomes) {
                        if let Placed::Deleted(t) = o {
                            deleted.push(t);
                        } else if o == Placed::Absent {
                            // It will fetch the copy its new set names.
                            debug!(%id, node, "a staying member lacked the copy");
                        }
                    }
                }
                Err(e) => {
                    debug!(node, error = %e, "repair: set not taken by a staying member");
                    unsettled.extend(ids);
                }
            }
        }
        // A message a staying member did not confirm keeps its old holders
        // until the next round.
        for (node, changes) in leave {
            let changes: Vec<_> = changes.into_iter().filter(|c| !unsettled.contains(&c.id)).collect();
            if changes.is_empty() {
                continue;
            }
            match self.set_replicas_on(node, user, changes).await {
                Ok(outcomes) => {
                    deleted.extend(outcomes.into_iter().filter_map(|o| match o {
                        Placed::Deleted(t) => Some(t),
                        _ => None,
                    }));
                }
                // It learns the new set from anti-entropy when it answers.
                Err(e) => debug!(node, error = %e, "repair: a left-out holder not told yet"),
            }
        }
        // Deletions found on the way win: applied here, and those
        // messages keep their old sets (anti-entropy spreads the deletion).
        deleted.sort_by_key(|t| t.id);
        deleted.dedup_by_key(|t| t.id);
        let dead: BTreeSet<MessageId> = deleted.iter().map(|t| t.id).collect();
        if !deleted.is_empty() {
            round.deleted += deleted.len() as u64;
            if let Err(e) = self.store.apply_tombstones(user, deleted).await {
                warn!(%user, error = %e, "repair: cannot apply deletions found");
            }
        }
        let mine: Vec<SetChange> = good
            .iter()
            .filter(|s| !unsettled.contains(&s.id) && !dead.contains(&s.id))
            .map(|s| change(s))
            .collect();
        let n_mine = mine.len() as u64;
        match self.store.set_replicas(user, mine, self.me).await {
            Ok(_) => round.repaired += n_mine,
            Err(e) => {
                warn!(%user, error = %e, "repair: cannot record the new sets");
                round.failed += n_mine;
            }
        }
        round.failed += failed.union(&unsettled).filter(|id| !dead.contains(id)).count() as u64;
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_copies(
        &self,
        user: &str,
        target: NodeId,
        batch: Vec<(EntryMeta, Vec<u8>)>,
        rate: &RateLimit,
        round: &mut RepairRound,
        failed: &mut BTreeSet<MessageId>,
        deleted: &mut Vec<Tombstone>,
    ) {
        let bytes: u64 = batch.iter().map(|(_, b)| b.len() as u64).sum();
        let ids: Vec<MessageId> = batch.iter().map(|(m, _)| m.id).collect();
        rate.take(bytes).await;
        let req = Request::Copy {
            user: user.to_owned(),
            entries: batch,
        };
        match self.call(target, req).await {
            Ok(Reply::Copied { deleted: tombs }) => {
                let n = (ids.len() - tombs.len()) as u64;
                round.copies += n;
                round.bytes += bytes;
                self.counters.repairs_copied.fetch_add(n, Ordering::Relaxed);
                self.counters.repairs_bytes.fetch_add(bytes, Ordering::Relaxed);
                deleted.extend(tombs);
            }
            other => {
                debug!(%user, target, error = ?other.err(), "repair copies not made");
                failed.extend(ids);
            }
        }
    }

    /// Serves [`Request::Copy`]: stores each copy (its body checked against
    /// its hash); answers the deletions held here for those refused.
    pub(super) async fn take_copies(
        &self,
        user: &str,
        mut entries: Vec<(EntryMeta, Vec<u8>)>,
        max: usize,
    ) -> Result<Vec<Tombstone>, ReplicaError> {
        entries.truncate(max);
        let new_fragment = !self.store.holds(user);
        let ids: Vec<MessageId> = entries.iter().map(|(m, _)| m.id).collect();
        let stores = entries
            .iter()
            .map(|(meta, body)| self.store.take_copy(user, meta, body.clone()));
        for r in futures::future::join_all(stores).await {
            r?;
        }
        let dead = self.store.tombstoned(user, &ids);
        let deleted = self
            .store
            .sync_items(user, None)
            .into_iter()
            .filter_map(|i| match i {
                crate::SyncItem::Dead(t) if dead.contains(&t.id) => Some(t),
                _ => None,
            })
            .collect();
        if new_fragment && self.store.holds(user) {
            self.report_new_fragments(vec![user.to_owned()]).await;
        }
        Ok(deleted)
    }
}
