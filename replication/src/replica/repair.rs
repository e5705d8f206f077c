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

use placement::{MessageKey, NodeState, View};
use tracing::{debug, info, warn};

use super::protocol::{COPY_BATCH_BYTES, NodeId, PLACE_BATCH_MAX, ReplicaError, Reply, Request};
use super::{Replicator, lock};
use crate::{EntryMeta, MessageId, PRIOR_MAX, Placed, SetChange, Tombstone};

/// One message's repair, as its coordinator plans it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairStep {
    pub id: MessageId,
    /// The new replica set, sorted.
    pub replicas: Vec<NodeId>,
    /// Nodes that get a new copy (not in the old set).
    pub add: Vec<NodeId>,
    /// Old members the new set leaves out.
    pub surplus: Vec<NodeId>,
    /// The new set's earlier members: the old set and its earlier members
    /// that the new set leaves out, most recent first, at most
    /// [`PRIOR_MAX`].
    pub prior: Vec<NodeId>,
}

/// The member of `replicas` that repairs the message: the lowest one the
/// view has up; when none is, the lowest draining one.
pub fn coordinator(view: &View, replicas: &[NodeId]) -> Option<NodeId> {
    let state = |n: NodeId| view.node(placement::NodeId(n)).map(|i| i.state);
    let lowest = |want: NodeState| replicas.iter().copied().filter(|n| state(*n) == Some(want)).min();
    lowest(NodeState::Up).or_else(|| lowest(NodeState::Draining))
}

/// What `me` does with `meta`, a message it holds: `None` unless `me` is
/// its coordinator and its replica set needs a change: a member is `gone`
/// (removed, draining, or down past the grace period), or the set has
/// fewer than `n_replicas` members that are not gone while more nodes are
/// up. A member down for less than the grace period counts as present, so
/// a quick restart costs nothing.
pub fn plan_repair(
    me: NodeId,
    view: &View,
    n_replicas: usize,
    gone: &dyn Fn(NodeId) -> bool,
    meta: &EntryMeta,
) -> Option<RepairStep> {
    let current = &meta.replicas;
    if !current.contains(&me) || coordinator(view, current) != Some(me) {
        return None;
    }
    let present = current.iter().filter(|n| !gone(**n)).count();
    let up = view.up_nodes().count();
    if !current.iter().any(|n| gone(*n)) && (present >= n_replicas || present >= up) {
        return None;
    }
    let ids: Vec<placement::NodeId> = current.iter().map(|n| placement::NodeId(*n)).collect();
    let plan = view.repair(MessageKey::from_id(&meta.id.0), &ids, n_replicas);
    let mut replicas: Vec<NodeId> = plan.keep.iter().chain(&plan.add).map(|n| n.0).collect();
    replicas.sort_unstable();
    let mut old = current.clone();
    old.sort_unstable();
    // Nothing up to copy to, or nothing would change: leave it as it is.
    // Never trade a copy for nothing: the new set is at least as large as
    // the copies there are now on reachable members (a draining node's
    // included), up to R.
    let reachable = current.iter().filter(|n| super::is_live(view, **n)).count();
    if replicas.is_empty() || replicas == old || replicas.len() < present.max(reachable).min(n_replicas) {
        return None;
    }
    let mut prior: Vec<NodeId> = Vec::new();
    for n in old.iter().chain(&meta.prior) {
        if !replicas.contains(n) && !prior.contains(n) {
            prior.push(*n);
        }
    }
    prior.truncate(PRIOR_MAX);
    Some(RepairStep {
        id: meta.id,
        replicas,
        add: plan.add.iter().map(|n| n.0).collect(),
        surplus: plan.surplus.iter().map(|n| n.0).collect(),
        prior,
    })
}

/// How far from its weighted share a node's stored bytes may be before the
/// rebalancer moves copies to or from it (each side of the target: the
/// spread it leaves is within twice this).
pub const REBALANCE_TOLERANCE: f64 = 0.05;

/// The rebalancer's figures, once some up node is further than the
/// tolerance from its share of the stored bytes (its weight's part of the
/// total): how far each is above or below its share, and this
/// coordinator's budget of that distance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Balance {
    /// Bytes above the share (nodes past the tolerance), and below it.
    pub excess: BTreeMap<NodeId, u64>,
    pub deficit: BTreeMap<NodeId, u64>,
    /// What this coordinator may still move from (to) each node: its part
    /// of the excess (deficit), since every coordinator moves at once on
    /// the same figures.
    pub give: BTreeMap<NodeId, u64>,
    pub take: BTreeMap<NodeId, u64>,
}

impl Balance {
    /// From the bytes each up node stores (`bytes`) and the view's
    /// weights; `share` is this coordinator's part of each excess and
    /// deficit (1 / the number of coordinators).
    pub fn new(view: &View, bytes: &BTreeMap<NodeId, u64>, share: f64) -> Balance {
        let weights: BTreeMap<NodeId, f64> = view
            .up_nodes()
            .filter(|n| bytes.contains_key(&n.id.0))
            .map(|n| (n.id.0, f64::from(n.weight.max(1))))
            .collect();
        let total: f64 = weights.keys().map(|id| bytes[id] as f64).sum();
        let weight: f64 = weights.values().sum();
        let mut out = Balance::default();
        if weights.len() < 2 {
            return out;
        }
        let mut outside = false;
        for (id, w) in &weights {
            let target = total * w / weight;
            let b = bytes[id] as f64;
            outside |= (b - target).abs() > target * REBALANCE_TOLERANCE;
            if b > target {
                out.excess.insert(*id, (b - target) as u64);
                out.give.insert(*id, ((b - target) * share).ceil() as u64);
            } else if b < target {
                out.deficit.insert(*id, (target - b) as u64);
                out.take.insert(*id, ((target - b) * share).ceil() as u64);
            }
        }
        // Every node within the tolerance: nothing to move.
        if !outside {
            return Balance::default();
        }
        out
    }

    /// Whether any move is left in this coordinator's budget.
    pub fn open(&self) -> bool {
        self.give.values().any(|g| *g > 0) && self.take.values().any(|t| *t > 0)
    }
}

/// A move that brings stored bytes closer to every node's share: for a
/// message `me` coordinates whose set is healthy, one member above its
/// share gives its copy to the node furthest below its share that is not
/// in the set (in a zone the rest of the set does not use, or the giver's
/// own), if the move helps both (each is at least half the message away
/// from its share) and both budgets have room; the figures are updated.
/// `None` when no move is due.
pub fn plan_move(me: NodeId, view: &View, balance: &mut Balance, meta: &EntryMeta) -> Option<RepairStep> {
    let current = &meta.replicas;
    if !current.contains(&me) || coordinator(view, current) != Some(me) || !balance.open() {
        return None;
    }
    let size = meta.size_bytes.max(1);
    let helps = |m: &BTreeMap<NodeId, u64>, n: &NodeId| m.get(n).is_some_and(|d| *d >= size / 2);
    let zone = |n: NodeId| view.node(placement::NodeId(n)).map(|i| i.zone.as_str());
    let from = current
        .iter()
        .copied()
        .filter(|m| helps(&balance.excess, m) && balance.give.get(m).is_some_and(|g| *g > 0))
        .max_by_key(|m| balance.excess[m])?;
    let rest_zones: Vec<Option<&str>> = current.iter().filter(|n| **n != from).map(|n| zone(*n)).collect();
    let to = balance
        .deficit
        .iter()
        .filter(|(n, _)| !current.contains(n) && helps(&balance.deficit, n))
        .filter(|(n, _)| balance.take.get(n).is_some_and(|t| *t > 0))
        .filter(|(n, _)| zone(**n) == zone(from) || !rest_zones.contains(&zone(**n)))
        .max_by_key(|(n, d)| (**d, std::cmp::Reverse(**n)))
        .map(|(n, _)| *n)?;
    for (map, n) in [
        (&mut balance.excess, from),
        (&mut balance.give, from),
        (&mut balance.deficit, to),
        (&mut balance.take, to),
    ] {
        if let Some(v) = map.get_mut(&n) {
            *v = v.saturating_sub(size);
        }
    }
    let mut replicas: Vec<NodeId> = current.iter().copied().filter(|n| *n != from).chain([to]).collect();
    replicas.sort_unstable();
    let mut prior = vec![from];
    prior.extend(meta.prior.iter().copied().filter(|n| *n != from && *n != to));
    prior.truncate(PRIOR_MAX);
    Some(RepairStep {
        id: meta.id,
        replicas,
        add: vec![to],
        surplus: vec![from],
        prior,
    })
}

/// Spaces repair traffic out to `rate` bytes per second.
#[derive(Debug)]
pub struct RateLimit {
    rate: u64,
    next: tokio::sync::Mutex<Instant>,
}

impl RateLimit {
    pub fn new(bytes_per_s: u64) -> Self {
        RateLimit {
            rate: bytes_per_s.max(1),
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    /// Waits until `bytes` more may be sent.
    pub async fn take(&self, bytes: u64) {
        let mut next = self.next.lock().await;
        let now = Instant::now();
        // At most a second of credit builds up while idle.
        let floor = now.checked_sub(Duration::from_secs(1)).unwrap_or(now);
        let start = (*next).max(floor);
        let end = start + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
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
    /// Whether `node` counts as gone for repair: not in the view, draining,
    /// or down for at least the grace period (as this node saw it).
    pub fn gone_nodes(&self) -> impl Fn(NodeId) -> bool + use<N> {
        let view = self.view();
        let since = lock(&self.down_since).clone();
        let grace = self.cfg.repair_grace;
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
                let steps: Vec<(EntryMeta, RepairStep)> = self
                    .store
                    .list(&user)
                    .into_iter()
                    .filter_map(|m| plan_repair(self.me, &view, self.cfg.replicas, &gone, &m).map(|s| (m, s)))
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
    /// the staying member, the giving node drops its copy last.
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
            return round;
        }
        let gone = self.gone_nodes();
        let users: Vec<String> = self.store.usage_async().await.into_iter().map(|u| u.user).collect();
        let mut planned_bytes = 0u64;
        let mut plans: Vec<(String, Vec<(EntryMeta, RepairStep)>)> = Vec::new();
        'walk: for user in users {
            let mut steps = Vec::new();
            for m in self.store.list(&user) {
                if plan_repair(self.me, &view, self.cfg.replicas, &gone, &m).is_some() {
                    continue;
                }
                if let Some(step) = plan_move(self.me, &view, &mut balance, &m) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BodyHash;
    use placement::NodeInfo;

    fn view(states: &[(u64, NodeState)]) -> View {
        let nodes = states
            .iter()
            .map(|(id, state)| NodeInfo {
                id: placement::NodeId(*id),
                weight: 1,
                zone: String::new(),
                state: *state,
            })
            .collect();
        View::with_slot_bits(1, nodes, placement::MIN_SLOT_BITS).expect("view")
    }

    fn meta(n: u8, replicas: &[NodeId]) -> EntryMeta {
        EntryMeta {
            id: MessageId([n; 16]),
            body: BodyHash::of(&[n]),
            size_bytes: 1,
            arrival_ms: 1,
            folder: "INBOX".into(),
            flags: 0,
            replicas: replicas.to_vec(),
            placed: 0,
            prior: Vec::new(),
            marks: Default::default(),
        }
    }

    const UP: NodeState = NodeState::Up;
    const DOWN: NodeState = NodeState::Down;
    const DRAINING: NodeState = NodeState::Draining;

    #[test]
    fn only_the_lowest_up_member_repairs_a_gone_member() {
        let v = view(&[(1, UP), (2, UP), (3, DOWN), (4, UP)]);
        let gone = |n: NodeId| n == 3;
        let m = meta(1, &[2, 3]);
        let step = plan_repair(2, &v, 2, &gone, &m).expect("2 repairs");
        assert_eq!(step.surplus, vec![3]);
        assert_eq!(step.add.len(), 1);
        assert!(step.replicas.contains(&2) && !step.replicas.contains(&3));
        assert_eq!(step.replicas.len(), 2);
        assert_eq!(plan_repair(1, &v, 2, &gone, &m), None, "1 holds no copy");
        let m = meta(1, &[1, 2, 3]);
        assert_eq!(plan_repair(2, &v, 3, &gone, &m), None, "1 is the coordinator");
        assert!(plan_repair(1, &v, 3, &gone, &m).is_some());
    }

    #[test]
    fn a_member_down_within_the_grace_period_is_waited_for() {
        let v = view(&[(1, UP), (2, DOWN), (3, UP)]);
        let m = meta(1, &[1, 2]);
        assert_eq!(plan_repair(1, &v, 2, &|_| false, &m), None);
        assert!(plan_repair(1, &v, 2, &|n| n == 2, &m).is_some());
    }

    #[test]
    fn a_draining_node_hands_off_what_only_it_holds() {
        let v = view(&[(1, DRAINING), (2, UP), (3, UP)]);
        let gone = |n: NodeId| n == 1;
        let step = plan_repair(1, &v, 1, &gone, &meta(7, &[1])).expect("1 coordinates");
        assert_eq!(step.surplus, vec![1]);
        assert_eq!(step.replicas.len(), 1);
        // With an up member, that member coordinates.
        assert_eq!(plan_repair(1, &v, 2, &gone, &meta(7, &[1, 3])), None);
        let step = plan_repair(3, &v, 2, &gone, &meta(7, &[1, 3])).expect("3 coordinates");
        assert_eq!(step.replicas, vec![2, 3]);
        assert_eq!(step.add, vec![2]);
    }

    #[test]
    fn a_set_short_of_r_grows_once_nodes_join_and_never_shrinks_for_nothing() {
        let v = view(&[(1, UP)]);
        assert_eq!(
            plan_repair(1, &v, 2, &|_| false, &meta(1, &[1])),
            None,
            "no one to copy to"
        );
        let v = view(&[(1, UP), (2, UP)]);
        let step = plan_repair(1, &v, 2, &|_| false, &meta(1, &[1])).expect("grows");
        assert_eq!((step.replicas, step.add), (vec![1, 2], vec![2]));
        // The only other node draining: nowhere to go, the copy stays.
        let v = view(&[(1, UP), (2, DRAINING)]);
        assert_eq!(plan_repair(1, &v, 2, &|n| n == 2, &meta(1, &[1, 2])), None);
        // A removed member (not in the view) with enough others: just dropped.
        let v = view(&[(1, UP), (2, UP)]);
        let step = plan_repair(1, &v, 2, &|n| n == 9, &meta(1, &[1, 2, 9])).expect("trim");
        assert_eq!((step.replicas, step.add, step.surplus), (vec![1, 2], vec![], vec![9]));
    }

    proptest::proptest! {
        /// Whatever the view, a step keeps at least as many copies as the
        /// message had on members that are not gone (up to R), only on up
        /// nodes, and is planned by one member at most.
        #[test]
        fn a_step_never_loses_a_copy_and_has_one_coordinator(
            states in proptest::collection::vec(0u8..3, 1..8),
            set in proptest::sample::subsequence((1u64..=8).collect::<Vec<_>>(), 1..4),
            grace_over in proptest::collection::vec(proptest::bool::ANY, 8),
            r in 1usize..4,
        ) {
            let states: Vec<(u64, NodeState)> = states.iter().enumerate()
                .map(|(i, s)| (i as u64 + 1, [UP, DOWN, DRAINING][*s as usize])).collect();
            let v = view(&states);
            let state = |n: u64| states.iter().find(|s| s.0 == n).map(|s| s.1);
            let gone = |n: u64| match state(n) {
                None | Some(NodeState::Draining) => true,
                Some(NodeState::Down) => grace_over[n as usize - 1],
                Some(NodeState::Up) => false,
            };
            let m = meta(3, &set);
            let planners: Vec<RepairStep> = set.iter().filter_map(|me| plan_repair(*me, &v, r, &gone, &m)).collect();
            proptest::prop_assert!(planners.len() <= 1);
            if let Some(step) = planners.first() {
                let present = set.iter().filter(|n| !gone(**n)).count();
                let reachable = set.iter().filter(|n| matches!(state(**n), Some(UP | DRAINING))).count();
                proptest::prop_assert!(step.replicas.len() >= present.max(reachable).min(r));
                proptest::prop_assert!(step.add.iter().all(|n| state(*n) == Some(UP) && !set.contains(n)));
                proptest::prop_assert!(step.replicas.iter().all(|n| state(*n) == Some(UP)));
            }
        }
    }
}
