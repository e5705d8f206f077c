//! Healing in the simulation: repair after the grace period, the
//! rebalancer after joins, and the check that everything healed; the real
//! plans (`replication::replica::{plan_repair, Balance, plan_move}`)
//! applied to the sampled messages.

use std::collections::{BTreeMap, BTreeSet};

use placement::{NodeId as PNodeId, NodeState};
use replication::replica::{Balance, coordinator, plan_move, plan_repair};

use super::{EventRow, Sim};

impl Sim {
    /// Whether a node counts as gone for repair: out of the view,
    /// draining, or down past the grace period.
    fn gone_set(&self) -> BTreeSet<u64> {
        let mut gone: BTreeSet<u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| {
                n.state == NodeState::Draining
                    || (n.state == NodeState::Down
                        && self.clock_ms.saturating_sub(n.down_since_ms) >= self.cfg.repair_grace_ms)
            })
            .map(|(id, _)| *id)
            .collect();
        for m in &self.msgs {
            gone.extend(m.replicas.iter().filter(|r| !self.nodes.contains_key(r)));
        }
        gone
    }

    /// One repair round: each message with a gone member is repaired by
    /// its coordinator's plan.
    pub(super) fn repair(&mut self, row: &mut EventRow) {
        let gone = self.gone_set();
        if gone.is_empty() {
            return;
        }
        let is_gone = |n: u64| gone.contains(&n);
        let spreads = self.spreads();
        let (mut copies, mut lost) = (0u64, 0u64);
        for i in 0..self.msgs.len() {
            let meta = &self.msgs[i];
            let missing = meta.replicas.iter().filter(|r| gone.contains(r)).count() as u64;
            if missing == 0 {
                continue;
            }
            lost += missing;
            let Some(coord) = coordinator(&self.view, &meta.replicas) else {
                continue;
            };
            let near = &spreads[self.msg_user[i] as usize];
            if let Some(step) = plan_repair(coord, &self.view, self.cfg.replicas, &is_gone, meta, near) {
                copies += step.add.len() as u64;
                self.apply(i, step.replicas, step.prior);
            }
        }
        let scale = self.cfg.scale() * self.cfg.message_bytes as f64;
        row.bytes_moved += (copies as f64 * scale) as u64;
        row.bytes_min += (lost as f64 * scale) as u64;
    }

    /// The rebalancer until every up node is within the tolerance of its
    /// share (or a round moves nothing): each round starts from the
    /// stored bytes, as the nodes' rounds every 2 s do.
    pub(super) fn rebalance(&mut self, row: &mut EventRow) {
        let bytes = self.bytes_per_node();
        let first = Balance::new(&self.view, &bytes, 1.0);
        let min: u64 = first.deficit.values().sum();
        let mut copies = 0u64;
        // Moves go into the users' spreads until a pass moves nothing (the
        // nodes' rebalancer: until the distance below the shares stalls).
        let spreads = self.spreads();
        let mut anywhere = false;
        for _ in 0..50 {
            let mut balance = Balance::new(&self.view, &self.bytes_per_node(), 1.0);
            if !balance.open() {
                break;
            }
            let mut moved = 0;
            for i in 0..self.msgs.len() {
                let Some(coord) = coordinator(&self.view, &self.msgs[i].replicas) else {
                    continue;
                };
                let near: &[u64] = if anywhere {
                    &[]
                } else {
                    &spreads[self.msg_user[i] as usize]
                };
                if let Some(step) = plan_move(coord, &self.view, &mut balance, &self.msgs[i], near) {
                    moved += step.add.len() as u64;
                    self.apply(i, step.replicas, step.prior);
                }
                if !balance.open() {
                    break;
                }
            }
            copies += moved;
            if moved == 0 {
                if anywhere {
                    break;
                }
                anywhere = true;
            }
        }
        let scale = self.cfg.scale();
        row.bytes_moved += (copies as f64 * scale * self.cfg.message_bytes as f64) as u64;
        row.bytes_min += (min as f64 * scale) as u64;
    }

    /// Each sampled user's spread in the current view (where repairs and
    /// moves put the user's copies first).
    fn spreads(&self) -> Vec<Vec<u64>> {
        (0..self.cfg.sample_users as usize)
            .map(|u| {
                let set = self.view.spread_set(self.users[u], self.cfg.spread);
                set.into_iter().map(|n| n.0).collect()
            })
            .collect()
    }

    fn bytes_per_node(&self) -> BTreeMap<u64, u64> {
        let mut bytes: BTreeMap<u64, u64> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Up)
            .map(|(id, _)| (*id, 0))
            .collect();
        for m in &self.msgs {
            for r in &m.replicas {
                if let Some(b) = bytes.get_mut(r) {
                    *b += m.size_bytes;
                }
            }
        }
        bytes
    }

    fn apply(&mut self, i: usize, replicas: Vec<u64>, prior: Vec<u64>) {
        let u = self.msg_user[i];
        let old = std::mem::take(&mut self.msgs[i].replicas);
        for n in &old {
            self.hold(u, *n, -1);
        }
        for n in &replicas {
            self.hold(u, *n, 1);
        }
        self.msgs[i].replicas = replicas;
        self.msgs[i].prior = prior;
    }

    /// After the scenario: every sampled message has R copies, all on
    /// distinct up nodes of the last view; every user has one up manager.
    pub(super) fn check_healed(&mut self) -> anyhow::Result<u64> {
        let mut row = EventRow::default();
        self.clock_ms += self.cfg.repair_grace_ms;
        self.repair(&mut row);
        let up = self.view.up_nodes().count();
        for (i, m) in self.msgs.iter().enumerate() {
            let set: BTreeSet<u64> = m.replicas.iter().copied().collect();
            let on_up = set
                .iter()
                .filter(|r| self.view.node(PNodeId(**r)).is_some_and(|n| n.state == NodeState::Up))
                .count();
            anyhow::ensure!(
                set.len() == m.replicas.len() && on_up == self.cfg.replicas.min(up),
                "message {i} has {on_up} copies on up nodes ({:?}), not {}",
                m.replicas,
                self.cfg.replicas
            );
        }
        for (i, key) in self.users.iter().enumerate() {
            let ok = self
                .view
                .manager_of(*key)
                .and_then(|m| self.view.node(m))
                .is_some_and(|n| n.state == NodeState::Up);
            anyhow::ensure!(ok, "user {i} has no up manager at the end");
        }
        self.manager_checks += self.users.len() as u64;
        Ok(self.msgs.len() as u64)
    }
}
