//! A seeded simulation of the replica protocol's pure core alone: user
//! managers (`replica::manager::Manager`) and anti-entropy plans
//! (`replica::plan_sync`) on in-memory fragments, with crashes, restarts,
//! lost copies and lost deletions. No runtime, no threads, no clock: every
//! step comes from the seed, so a failing seed replays exactly the same run
//! (`REPRODUCE WITH: SEED=n cargo test -p replication --test pure_sim`),
//! unlike `sim.rs`, where the seed fixes the fault schedule but the
//! scheduler orders the calls.
//!
//! After the faults everything heals (all nodes up, a report round, two
//! rounds of anti-entropy between every pair) and the oracle checks: every
//! acknowledged, undeleted message is live on every node of its replica
//! set; no deleted message is live anywhere; every user's manager says its
//! map is complete and the map names every node that holds the user's
//! mail.

use std::collections::{BTreeMap, BTreeSet};

use placement::{NodeId as PNodeId, NodeInfo, NodeState, View};
use replication::replica::manager::Manager;
use replication::replica::{NodeId, Reply, plan_sync};
use replication::{BodyHash, EntryMeta, MessageId, SyncItem, Tombstone};
use testkit::{Reproduce, Rng};

const NODES: u64 = 5;
const R: usize = 2;
const SPREAD: usize = 3;
const USERS: u64 = 12;

struct Node {
    up: bool,
    /// (user, id) → held or deleted: the fragment store, durable.
    items: BTreeMap<(String, MessageId), SyncItem>,
    /// Soft state, lost on a crash.
    manager: Manager,
}

struct Sim {
    rng: Rng,
    nodes: BTreeMap<NodeId, Node>,
    view: View,
    epoch: u64,
    next_id: u64,
    /// Acknowledged messages: (user, id) → replica set.
    acked: BTreeMap<(String, MessageId), Vec<NodeId>>,
    deleted: BTreeSet<(String, MessageId)>,
}

fn user(i: u64) -> String {
    format!("u{i}@example.org")
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let nodes = (1..=NODES)
            .map(|id| {
                (
                    id,
                    Node {
                        up: true,
                        items: BTreeMap::new(),
                        manager: Manager::new(id),
                    },
                )
            })
            .collect();
        let mut sim = Sim {
            rng: Rng::new(seed),
            nodes,
            view: View::with_slot_bits(0, Vec::new(), placement::MIN_SLOT_BITS).expect("view"),
            epoch: 0,
            next_id: 0,
            acked: BTreeMap::new(),
            deleted: BTreeSet::new(),
        };
        sim.publish_view();
        sim
    }

    fn publish_view(&mut self) {
        self.epoch += 1;
        let infos = self
            .nodes
            .iter()
            .map(|(id, n)| NodeInfo {
                id: PNodeId(*id),
                weight: 1,
                zone: String::new(),
                state: if n.up { NodeState::Up } else { NodeState::Down },
            })
            .collect();
        self.view = View::with_slot_bits(self.epoch, infos, placement::MIN_SLOT_BITS).expect("view");
        for n in self.nodes.values_mut().filter(|n| n.up) {
            n.manager.take_view(&self.view);
        }
    }

    fn up(&self) -> Vec<NodeId> {
        self.nodes.iter().filter(|(_, n)| n.up).map(|(id, _)| *id).collect()
    }

    fn pick_up(&mut self) -> Option<NodeId> {
        let up = self.up();
        (!up.is_empty()).then(|| up[self.rng.below(up.len() as u64) as usize])
    }

    fn manager_of(&self, u: &str) -> Option<NodeId> {
        self.view.user_manager(u).map(|n| n.0)
    }

    /// A delivery from a random front end: the user's manager places it
    /// (the front end does, when the manager is down); each copy may be
    /// lost; acknowledged when one copy lands.
    fn deliver(&mut self) {
        let Some(front) = self.pick_up() else { return };
        let u = user(self.rng.below(USERS));
        let placer = match self.manager_of(&u) {
            Some(m) if self.nodes[&m].up => m,
            _ => front,
        };
        let view = self.view.clone();
        let targets = self
            .nodes
            .get_mut(&placer)
            .expect("placer")
            .manager
            .place(&view, &u, 100, R, SPREAD, 0, None);
        self.next_id += 1;
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.next_id.to_be_bytes());
        let meta = EntryMeta::delivered(
            MessageId(id),
            BodyHash::of(&self.next_id.to_le_bytes()),
            100,
            self.next_id,
            "INBOX".into(),
            targets.clone(),
        );
        let mut stored = false;
        for t in &targets {
            let lost = self.rng.chance(0.15);
            let n = self.nodes.get_mut(t).expect("target");
            if n.up && !lost {
                n.items.insert((u.clone(), meta.id), SyncItem::Live(meta.clone()));
                stored = true;
            }
        }
        if stored {
            self.acked.insert((u, meta.id), targets);
        }
    }

    /// A deletion of one acknowledged message, sent to each replica (each
    /// may be lost); it counts once one replica has it.
    fn delete(&mut self) {
        let live: Vec<_> = self
            .acked
            .keys()
            .filter(|k| !self.deleted.contains(*k))
            .cloned()
            .collect();
        if live.is_empty() {
            return;
        }
        let key = live[self.rng.below(live.len() as u64) as usize].clone();
        let replicas = self.acked[&key].clone();
        let tomb = Tombstone {
            id: key.1,
            hlc: self.next_id,
            replicas: replicas.clone(),
        };
        let mut reached = false;
        for r in &replicas {
            let lost = self.rng.chance(0.2);
            let n = self.nodes.get_mut(r).expect("replica");
            if n.up && !lost {
                n.items.insert(key.clone(), SyncItem::Dead(tomb.clone()));
                reached = true;
            }
        }
        if reached {
            self.deleted.insert(key);
        }
    }

    fn crash_or_restart(&mut self) {
        let id = 1 + self.rng.below(NODES);
        let others_up = self.up().len() > 1;
        let n = self.nodes.get_mut(&id).expect("node");
        if n.up && others_up {
            n.up = false;
            n.manager = Manager::new(id); // soft state goes with the process
        } else {
            n.up = true;
        }
        self.publish_view();
    }

    /// Every up node sends each up node its full report for the view.
    fn report_round(&mut self) {
        let view = self.view.clone();
        let up = self.up();
        for &from in &up {
            let mut by_manager: BTreeMap<NodeId, BTreeMap<String, (u64, u64)>> =
                up.iter().map(|m| (*m, BTreeMap::new())).collect();
            for ((u, _), item) in &self.nodes[&from].items {
                if let (SyncItem::Live(m), Some(mgr)) = (item, self.manager_of(u)) {
                    let e = by_manager.entry(mgr).or_default().entry(u.clone()).or_default();
                    e.0 += 1;
                    e.1 += m.size_bytes;
                }
            }
            for (mgr, users) in by_manager {
                if self.rng.chance(0.1) {
                    continue; // a lost report: chased later
                }
                let users = users.into_iter().map(|(u, (e, b))| (u, e, b)).collect();
                if let Some(n) = self.nodes.get_mut(&mgr).filter(|n| n.up) {
                    n.manager.report(&view, from, users, view.epoch(), true);
                }
            }
        }
    }

    /// One anti-entropy exchange between `a` and `b` for every user.
    fn exchange(&mut self, a: NodeId, b: NodeId) {
        if !(self.nodes[&a].up && self.nodes[&b].up) || a == b {
            return;
        }
        let users: BTreeSet<String> = self.nodes[&a].items.keys().map(|(u, _)| u.clone()).collect();
        let users: BTreeSet<String> = users
            .union(&self.nodes[&b].items.keys().map(|(u, _)| u.clone()).collect())
            .cloned()
            .collect();
        for u in users {
            let of = |n: NodeId, peer: Option<NodeId>| -> Vec<SyncItem> {
                self.nodes[&n]
                    .items
                    .iter()
                    .filter(|((uu, _), i)| *uu == u && peer.is_none_or(|p| i.replicas().contains(&p)))
                    .map(|(_, i)| i.clone())
                    .collect()
            };
            // a sends what it shares with b; b plans and answers; a plans the answer.
            let plan_b = plan_sync(b, a, of(b, None), of(a, Some(b)), true);
            let plan_a = plan_sync(a, b, of(a, None), plan_b.back.clone(), false);
            for (n, plan) in [(b, plan_b), (a, plan_a)] {
                let items = &mut self.nodes.get_mut(&n).expect("node").items;
                for t in plan.tombstones {
                    items.insert((u.clone(), t.id), SyncItem::Dead(t));
                }
                for m in plan.fetch {
                    items.entry((u.clone(), m.id)).or_insert(SyncItem::Live(m));
                }
            }
        }
    }

    fn step(&mut self) {
        match self.rng.below(100) {
            0..=44 => self.deliver(),
            45..=59 => self.delete(),
            60..=69 => self.crash_or_restart(),
            70..=84 => self.report_round(),
            _ => {
                let (a, b) = (1 + self.rng.below(NODES), 1 + self.rng.below(NODES));
                self.exchange(a, b);
            }
        }
    }

    fn heal(&mut self) {
        for n in self.nodes.values_mut() {
            n.up = true;
        }
        self.publish_view();
        for _ in 0..2 {
            for a in 1..=NODES {
                for b in 1..=NODES {
                    self.exchange(a, b);
                }
            }
        }
        // Reports until none is missing (lost ones are chased).
        for _ in 0..20 {
            self.report_round();
            let missing = (1..=NODES).any(|m| !self.nodes[&m].manager.reports_missing(&self.view).is_empty());
            if !missing {
                break;
            }
        }
    }

    fn check(&self) {
        for (key, replicas) in &self.acked {
            for r in replicas {
                let item = self.nodes[r].items.get(key);
                if self.deleted.contains(key) {
                    assert!(
                        !matches!(item, Some(SyncItem::Live(_))),
                        "{key:?}: deleted, but live on node {r}"
                    );
                } else {
                    assert!(
                        matches!(item, Some(SyncItem::Live(_))),
                        "{key:?}: acknowledged, but node {r} of {replicas:?} has {item:?}"
                    );
                }
            }
        }
        for i in 0..USERS {
            let u = user(i);
            let m = self.manager_of(&u).expect("a manager");
            let Reply::MailMap { nodes, known, .. } = self.nodes[&m].manager.mail_map(&self.view, &u, R) else {
                panic!("not a mail map");
            };
            assert!(known, "{u}: the map at node {m} is not complete after healing");
            for (id, n) in &self.nodes {
                let holds = n
                    .items
                    .iter()
                    .any(|((uu, _), it)| *uu == u && matches!(it, SyncItem::Live(_)));
                if holds {
                    assert!(nodes.contains(id), "{u}: node {id} holds mail, the map says {nodes:?}");
                }
            }
        }
    }
}

fn run(seed: u64, steps: usize) -> (usize, usize) {
    let mut sim = Sim::new(seed);
    for _ in 0..steps {
        sim.step();
    }
    sim.heal();
    sim.check();
    (sim.acked.len(), sim.deleted.len())
}

#[test]
fn the_pure_core_converges_after_faults() {
    let steps: usize = std::env::var("SIM_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    for seed in testkit::seeds(&[1, 2, 3, 4, 5, 6, 7, 8]) {
        let _r = Reproduce::new(
            seed,
            format!("SIM_OPS={steps} cargo test -p replication --test pure_sim"),
        );
        let (acked, deleted) = run(seed, steps);
        assert!(
            acked > 100 && deleted > 10,
            "seed {seed}: a run that tests something ({acked}, {deleted})"
        );
    }
}

#[test]
fn a_seed_replays_the_same_run() {
    let once = |seed| {
        let mut sim = Sim::new(seed);
        for _ in 0..500 {
            sim.step();
        }
        let state: Vec<_> = sim
            .nodes
            .values()
            .map(|n| (n.up, n.items.keys().cloned().collect::<Vec<_>>()))
            .collect();
        (state, sim.acked.clone(), sim.deleted.clone())
    };
    assert_eq!(once(11), once(11));
    assert_ne!(once(11).1, once(12).1);
}
