//! `quill-harness sim`: a seeded, deterministic simulation of a large
//! cluster, to see which costs grow with the whole cluster rather than with
//! one node's share.
//!
//! What runs is the real code, pure and in one process: placement's views
//! (`placement::View`, the slot table every node builds on each view
//! change), the replica managers' choice of user manager, the repair and
//! rebalance plans (`replication::replica::{plan_repair, Balance,
//! plan_move}`), the failure detector's ring (`membership::watch`), and the
//! encodings of the Raft commands and snapshots (`membership`). What is
//! modelled, and said so in the table: the network (messages are counted
//! and their bytes added up, not sent), time (virtual: the failure
//! timeout, the ping round, a fixed commit time and the measured view
//! build), and the store (a message is its metadata).
//!
//! Sampling: every user is hashed and placed (the manager of each of the
//! `users` is looked up in every view), but messages are kept for a
//! sample of users only (`--sample-users` × `--messages-per-user`), each
//! the average size; figures about mail (copies moved, reports) are
//! scaled by users / sampled users.
//!
//! The nodes stand in racks of 1% of the cluster (at least 2), each rack
//! a placement zone, so that a message's copies are in distinct racks.
//! The scenario, in order: the cluster starts; 5% more nodes join one by
//! one, then the rebalancer runs; one node is killed, then a whole rack
//! at once, each repaired after the grace period; one node is drained and
//! removed; a split cuts 10% off, which is marked down and heals before
//! the grace period; every node is restarted, in batches of 2%. Then the
//! invariants are checked (`Sim::check_healed`).
//!
//! Files: this one (the scenario, the view changes and what each costs),
//! `heal` (repair, rebalance, the final check), `costs` (the measured and
//! modelled units, memory per node, the cost at rest), `table` (the
//! printed table and the pictures).

mod costs;
mod heal;
mod table;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Instant;

use placement::{LoadVector, NodeId as PNodeId, NodeInfo, NodeState, UserKey, View};
use replication::{BodyHash, EntryMeta, MessageId};
use testkit::Rng;

pub use costs::{AtRest, Memory};
pub use table::{print_table, write_chart};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub nodes: u64,
    pub users: u64,
    /// Users whose messages are kept (the rest are placed, not filled).
    pub sample_users: u64,
    pub messages_per_user: u64,
    /// The average message's size, bytes.
    pub message_bytes: u64,
    pub replicas: usize,
    pub spread: usize,
    pub watchers: usize,
    pub failure_timeout_ms: u64,
    pub repair_grace_ms: u64,
    pub seed: u64,
    /// log2 of placement's slot table (22 in a node).
    pub slot_bits: u32,
    /// Check every user's manager in every view (the tests), not only
    /// count them.
    pub check_every_view: bool,
}

impl SimConfig {
    /// A node's defaults, for `nodes` nodes and `users` users.
    pub fn new(nodes: u64, users: u64, seed: u64) -> SimConfig {
        SimConfig {
            nodes,
            users,
            sample_users: users.min(10_000),
            messages_per_user: 100,
            message_bytes: 64 * 1024,
            replicas: 2,
            spread: 4,
            watchers: membership::watch::WATCHERS_DEFAULT,
            failure_timeout_ms: 2_000,
            repair_grace_ms: 30_000,
            seed,
            slot_bits: placement::DEFAULT_SLOT_BITS,
            check_every_view: false,
        }
    }

    /// Nodes per rack (zone): 1% of the cluster, at least 2.
    fn rack(&self) -> u64 {
        (self.nodes / 100).max(2)
    }

    fn scale(&self) -> f64 {
        self.users as f64 / self.sample_users.max(1) as f64
    }
}

/// One event of the scenario and what it cost the cluster.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EventRow {
    pub event: String,
    /// Views committed (each a Raft entry, each a slot table built on
    /// every node).
    pub views: u64,
    /// Users whose manager changed, and the least that could have (the
    /// sum of the increases of the nodes' user counts).
    pub managers_moved: u64,
    pub managers_min: u64,
    /// Raft: entries sent to every other node.
    pub raft_messages: u64,
    pub raft_bytes: u64,
    /// The managers' soft state rebuilt: report messages and bytes (as the
    /// nodes do it today: every live node to every live node, every user
    /// it holds), and the bytes if only the moved users' holders reported.
    pub report_messages: u64,
    pub report_bytes: u64,
    pub report_bytes_min: u64,
    /// Failure reports sent to the leader.
    pub detector_reports: u64,
    /// Bytes of mail copied (repair, rebalance, drain), and the least that
    /// would do (the copies lost, or the new nodes' shortfall).
    pub bytes_moved: u64,
    pub bytes_min: u64,
    /// Snapshot bytes sent to joining nodes.
    pub snapshot_bytes: u64,
    /// From the event until every node has the last view (virtual ms).
    pub converge_ms: u64,
    /// The slot table's build, measured here (one node's CPU per view).
    pub build_ms: f64,
    /// Nodes holding a sampled user's mail after the event, on average
    /// (a listing asks each; a report names each).
    pub holders_mean: f64,
}

/// The simulation's whole output.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub config: SimConfig,
    pub rows: Vec<EventRow>,
    pub memory: Memory,
    pub at_rest: AtRest,
    /// Invariants checked (counts), for the record.
    pub manager_checks: u64,
    pub messages_checked: u64,
    pub wall_s: f64,
}

#[derive(Debug, Clone)]
struct SimNode {
    weight: u32,
    /// Its rack: nodes `rack` ids apart share one (a failure domain).
    zone: u64,
    state: NodeState,
    down_since_ms: u64,
}

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    nodes: BTreeMap<u64, SimNode>,
    next_id: u64,
    epoch: u64,
    view: View,
    clock_ms: u64,
    users: Vec<UserKey>,
    /// The sampled users' messages (`msg_user[i]` is the sample user of
    /// `msgs[i]`; the sample users are `users[..sample_users]`).
    msgs: Vec<EntryMeta>,
    msg_user: Vec<u32>,
    /// (sample user, node) → copies there; users held per node.
    pairs: HashMap<(u32, u64), u32>,
    users_held: BTreeMap<u64, u64>,
    /// Nodes holding each sample user's mail.
    holders: Vec<u16>,
    costs: costs::Unit,
    manager_checks: u64,
}

/// Runs the scenario; `on_row` sees each event as it ends (progress).
pub fn run(cfg: SimConfig, mut on_row: impl FnMut(&EventRow)) -> anyhow::Result<SimReport> {
    let started = Instant::now();
    let mut sim = Sim::new(cfg.clone())?;
    let mut rows = Vec::new();
    let mut push = |row: EventRow| {
        on_row(&row);
        rows.push(row);
    };
    let memory = sim.memory();
    push(sim.finish(sim.start_row()));

    let joins = (cfg.nodes / 20).max(1);
    let rack = cfg.rack();
    let mut row = sim.event(&format!("join {joins} nodes (5%), one by one"));
    for _ in 0..joins {
        let id = sim.next_id;
        sim.next_id += 1;
        sim.change(&mut row, 0, 1, |n| {
            n.insert(id, SimNode::up(id, rack));
        })?;
        row.snapshot_bytes += sim.costs.snapshot_bytes;
    }
    sim.rebalance(&mut row);
    push(sim.finish(row));

    let victim = sim.pick_up_node();
    let mut row = sim.event("kill 1 node; repair after the grace period");
    sim.fail(&mut row, &[victim])?;
    push(sim.finish(row));

    let racked = sim.pick_zone();
    let mut row = sim.event(&format!(
        "kill a rack (a zone) of {} nodes at once; repair",
        racked.len()
    ));
    sim.fail(&mut row, &racked)?;
    push(sim.finish(row));

    let drained = sim.pick_up_node();
    let mut row = sim.event("drain 1 node, then remove it");
    sim.change(&mut row, 0, 1, |n| {
        n.get_mut(&drained).expect("a node").state = NodeState::Draining
    })?;
    sim.repair(&mut row);
    sim.change(&mut row, 0, 1, |n| {
        n.remove(&drained);
    })?;
    push(sim.finish(row));

    let cut = sim.pick_rack((cfg.nodes / 10).max(1));
    let mut row = sim.event(&format!("split: {} nodes cut off, healed within the grace", cut.len()));
    sim.down(&mut row, &cut, sim.costs.detect_ms(cfg.failure_timeout_ms))?;
    sim.clock_ms += cfg.repair_grace_ms / 2;
    sim.repair(&mut row);
    sim.up(&mut row, &cut)?;
    push(sim.finish(row));

    let batch = (cfg.nodes / 50).max(1) as usize;
    let mut row = sim.event(&format!("rolling restart of every node, {batch} at a time"));
    let all: Vec<u64> = sim
        .nodes
        .iter()
        .filter(|(_, n)| n.state == NodeState::Up)
        .map(|(id, _)| *id)
        .collect();
    for group in all.chunks(batch) {
        // A planned stop: the node says so; no failure timeout to wait.
        sim.down(&mut row, group, 0)?;
        sim.clock_ms += 10_000;
        sim.repair(&mut row);
        sim.up(&mut row, group)?;
    }
    push(sim.finish(row));

    let messages_checked = sim.check_healed()?;
    let at_rest = sim.at_rest();
    Ok(SimReport {
        config: cfg,
        rows,
        memory,
        at_rest,
        manager_checks: sim.manager_checks,
        messages_checked,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

impl SimNode {
    fn up(id: u64, rack: u64) -> SimNode {
        SimNode {
            weight: 1,
            zone: (id - 1) / rack,
            state: NodeState::Up,
            down_since_ms: 0,
        }
    }
}

impl Sim {
    fn new(cfg: SimConfig) -> anyhow::Result<Sim> {
        anyhow::ensure!(cfg.nodes >= 3, "at least 3 nodes");
        anyhow::ensure!(cfg.sample_users <= cfg.users, "more sampled users than users");
        let nodes: BTreeMap<u64, SimNode> = (1..=cfg.nodes).map(|id| (id, SimNode::up(id, cfg.rack()))).collect();
        let view = build(1, &nodes, cfg.slot_bits)?;
        let users = (0..cfg.users)
            .map(|i| UserKey::from_normalized(&format!("user{i}@example.org")))
            .collect();
        let costs = costs::Unit::measure(&cfg)?;
        let sample = cfg.sample_users as usize;
        let mut sim = Sim {
            rng: Rng::new(cfg.seed),
            next_id: cfg.nodes + 1,
            cfg,
            nodes,
            epoch: 1,
            view,
            clock_ms: 0,
            users,
            msgs: Vec::new(),
            msg_user: Vec::new(),
            pairs: HashMap::new(),
            users_held: BTreeMap::new(),
            holders: vec![0; sample],
            costs,
            manager_checks: 0,
        };
        sim.deliver();
        Ok(sim)
    }

    /// The sampled users' mail, placed as a node places a delivery (no
    /// loads known: the spread and the user's holders decide).
    fn deliver(&mut self) {
        let loads = LoadVector::new(std::iter::empty());
        for u in 0..self.cfg.sample_users as u32 {
            let key = self.users[u as usize];
            let mut holders: Vec<PNodeId> = Vec::new();
            for _ in 0..self.cfg.messages_per_user {
                let set = self
                    .view
                    .replica_set(key, self.cfg.replicas, self.cfg.spread, &loads, &holders);
                for n in &set {
                    if !holders.contains(n) {
                        holders.push(*n);
                    }
                }
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&self.rng.next_u64().to_le_bytes());
                id[8..].copy_from_slice(&self.rng.next_u64().to_le_bytes());
                let meta = EntryMeta {
                    id: MessageId(id),
                    body: BodyHash([0; 32]),
                    size_bytes: self.cfg.message_bytes,
                    arrival_ms: 0,
                    folder: String::new(),
                    flags: 0,
                    replicas: set.iter().map(|n| n.0).collect(),
                    placed: 0,
                    prior: Vec::new(),
                    marks: Default::default(),
                };
                for n in &meta.replicas {
                    self.hold(u, *n, 1);
                }
                self.msgs.push(meta);
                self.msg_user.push(u);
            }
        }
    }

    fn hold(&mut self, user: u32, node: u64, delta: i32) {
        let c = self.pairs.entry((user, node)).or_insert(0);
        let before = *c;
        *c = c.saturating_add_signed(delta);
        let after = *c;
        let held = self.users_held.entry(node).or_insert(0);
        match (before, after) {
            (0, 1..) => {
                *held += 1;
                self.holders[user as usize] += 1;
            }
            (1.., 0) => {
                *held = held.saturating_sub(1);
                self.holders[user as usize] -= 1;
            }
            _ => {}
        }
        if after == 0 {
            self.pairs.remove(&(user, node));
        }
    }

    fn event(&self, name: &str) -> EventRow {
        EventRow {
            event: name.to_owned(),
            ..EventRow::default()
        }
    }

    fn finish(&self, mut row: EventRow) -> EventRow {
        let held: u64 = self.holders.iter().map(|h| u64::from(*h)).sum();
        row.holders_mean = held as f64 / self.holders.len().max(1) as f64;
        row
    }

    fn start_row(&self) -> EventRow {
        let mut row = self.event("start (a snapshot to every node but the first)");
        row.snapshot_bytes = self.costs.snapshot_bytes * (self.cfg.nodes - 1);
        row
    }

    fn pick_up_node(&mut self) -> u64 {
        let up: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Up)
            .map(|(id, _)| *id)
            .collect();
        up[self.rng.below(up.len() as u64) as usize]
    }

    /// The up nodes of a zone that has no down node.
    fn pick_zone(&mut self) -> Vec<u64> {
        let zones: BTreeSet<u64> = self.nodes.values().map(|n| n.zone).collect();
        let whole: Vec<u64> = zones
            .into_iter()
            .filter(|z| self.nodes.values().all(|n| n.zone != *z || n.state == NodeState::Up))
            .collect();
        let z = whole[self.rng.below(whole.len() as u64) as usize];
        self.nodes
            .iter()
            .filter(|(_, n)| n.zone == z)
            .map(|(id, _)| *id)
            .collect()
    }

    /// `n` up nodes with consecutive ids (a stretch of racks).
    fn pick_rack(&mut self, n: u64) -> Vec<u64> {
        let up: Vec<u64> = self
            .nodes
            .iter()
            .filter(|(_, x)| x.state == NodeState::Up)
            .map(|(id, _)| *id)
            .collect();
        let n = (n as usize).min(up.len() / 2);
        let start = self.rng.below((up.len() - n) as u64) as usize;
        up[start..start + n].to_vec()
    }

    /// Nodes fail: noticed by their ring neighbours, reported, marked down
    /// one verdict each; repaired once down past the grace period.
    fn fail(&mut self, row: &mut EventRow, ids: &[u64]) -> anyhow::Result<()> {
        self.down(row, ids, self.costs.detect_ms(self.cfg.failure_timeout_ms))?;
        self.clock_ms += self.cfg.repair_grace_ms;
        self.repair(row);
        Ok(())
    }

    fn down(&mut self, row: &mut EventRow, ids: &[u64], detect_ms: u64) -> anyhow::Result<()> {
        if detect_ms > 0 {
            // Each silent node's live watchers report it once a round
            // until the verdict (about two rounds).
            let states: Vec<(u64, NodeState)> = self.nodes.iter().map(|(id, n)| (*id, n.state)).collect();
            let failing: BTreeSet<u64> = ids.iter().copied().collect();
            for &(w, state) in &states {
                if state == NodeState::Down || failing.contains(&w) {
                    continue;
                }
                let targets = membership::watch::ring_targets(states.iter().copied(), w, self.cfg.watchers);
                row.detector_reports += 2 * targets.intersection(&failing).count() as u64;
            }
        }
        let now = self.clock_ms;
        self.change(row, detect_ms, ids.len() as u64, |n| {
            for id in ids {
                let node = n.get_mut(id).expect("a node");
                node.state = NodeState::Down;
                node.down_since_ms = now;
            }
        })
    }

    fn up(&mut self, row: &mut EventRow, ids: &[u64]) -> anyhow::Result<()> {
        self.change(row, 0, ids.len() as u64, |n| {
            for id in ids {
                n.get_mut(id).expect("a node").state = NodeState::Up;
            }
        })
    }

    /// One view change of `entries` Raft entries (verdicts committed
    /// together are applied together: a node builds the view they make
    /// once): the nodes change, the view is built (timed), and what it
    /// costs is added to `row`.
    fn change(
        &mut self,
        row: &mut EventRow,
        detect_ms: u64,
        entries: u64,
        f: impl FnOnce(&mut BTreeMap<u64, SimNode>),
    ) -> anyhow::Result<()> {
        f(&mut self.nodes);
        self.epoch += 1;
        let t = Instant::now();
        let new = build(self.epoch, &self.nodes, self.cfg.slot_bits)?;
        let build_ms = t.elapsed().as_secs_f64() * 1e3;
        let (moved, min, moved_sampled) = self.managers_moved(&new)?;
        self.view = new;
        let n = self.nodes.len() as u64;
        let live = self.nodes.values().filter(|x| x.state != NodeState::Down).count() as u64;
        row.views += 1;
        row.managers_moved += moved;
        row.managers_min += min;
        row.raft_messages += entries * (n - 1);
        row.raft_bytes += entries * (n - 1) * self.costs.raft_entry_bytes;
        row.report_messages += live * live.saturating_sub(1);
        let held: u64 = self
            .users_held
            .iter()
            .filter(|(id, _)| self.nodes.get(id).is_some_and(|x| x.state != NodeState::Down))
            .map(|(_, c)| *c)
            .sum();
        row.report_bytes += (held as f64 * self.cfg.scale()) as u64 * costs::REPORT_ENTRY_BYTES
            + live * live.saturating_sub(1) * costs::MESSAGE_OVERHEAD_BYTES;
        row.report_bytes_min += (moved_sampled as f64 * self.cfg.scale()) as u64 * costs::REPORT_ENTRY_BYTES;
        row.build_ms = row.build_ms.max(build_ms);
        row.converge_ms += detect_ms + self.costs.commit_and_fan_out_ms(n) * entries + build_ms.ceil() as u64;
        Ok(())
    }

    /// Users whose manager differs between the views; the least that
    /// could (the increases of the per-node counts); and the sampled
    /// moved users' holders (who would report them). Checks that every
    /// user's manager is an up node of the new view.
    fn managers_moved(&mut self, new: &View) -> anyhow::Result<(u64, u64, u64)> {
        let old = &self.view;
        let mut moved = 0u64;
        // Node ids are small here (1, 2, 3...): counts by id.
        let slots = (self.next_id + 1) as usize;
        let (mut before, mut after) = (vec![0i64; slots], vec![0i64; slots]);
        let mut moved_holders = 0u64;
        for (i, key) in self.users.iter().enumerate() {
            let a = old.manager_of(*key).map(|n| n.0);
            let b = new.manager_of(*key).map(|n| n.0);
            if self.cfg.check_every_view {
                let ok = b
                    .and_then(|b| new.node(PNodeId(b)))
                    .is_some_and(|n| n.state == NodeState::Up);
                anyhow::ensure!(ok, "user {i} has no up manager in view {}", new.epoch());
                self.manager_checks += 1;
            }
            if a != b {
                moved += 1;
                if let Some(h) = self.holders.get(i) {
                    moved_holders += u64::from(*h);
                }
            }
            before[a.unwrap_or(0) as usize] += 1;
            after[b.unwrap_or(0) as usize] += 1;
        }
        let min = after.iter().zip(&before).map(|(a, b)| (a - b).max(0) as u64).sum();
        Ok((moved, min, moved_holders))
    }
}

/// Placement's view of the simulated nodes.
fn build(epoch: u64, nodes: &BTreeMap<u64, SimNode>, slot_bits: u32) -> anyhow::Result<View> {
    let list = nodes
        .iter()
        .map(|(id, n)| NodeInfo {
            id: PNodeId(*id),
            weight: n.weight,
            zone: format!("rack{}", n.zone),
            state: n.state,
        })
        .collect();
    View::with_slot_bits(epoch, list, slot_bits).map_err(|e| anyhow::anyhow!("{e:?}"))
}
