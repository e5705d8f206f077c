//! The simulation's units: bytes measured by encoding the real Raft
//! command, view and directory; the few figures that are modelled (each
//! named here, with its reason); memory per node; the cost at rest.

use std::collections::{BTreeMap, BTreeSet};

use membership::{ClusterState, Command, DirectoryCommand, NodeInfo as MNodeInfo, NodeState};

use quill_node::cluster::detector::{LEARNER_VOTER_ROUNDS, PING_INTERVAL};
use quill_node::cluster::duties::VOTERS_MAX;
use quill_node::cluster::rpc::PING_TIMEOUT;

use super::{Sim, SimConfig};

/// One report entry, `(user, entries, bytes)` in bincode: a 24-byte
/// address with its length, two integers (modelled: the addresses here
/// are `userN@example.org`).
pub const REPORT_ENTRY_BYTES: u64 = 48;
/// A cluster message's frame and envelope, beyond its payload (modelled).
pub const MESSAGE_OVERHEAD_BYTES: u64 = 64;
/// A ping and its answer, framed (modelled on `MESSAGE_OVERHEAD_BYTES`).
const PING_BYTES: u64 = 2 * MESSAGE_OVERHEAD_BYTES;
/// Rounds of pings a minute (the node's `detector::PING_INTERVAL`).
const ROUNDS_PER_MIN: u64 = 60_000 / PING_INTERVAL.as_millis() as u64;
/// Raft heartbeats a minute from the leader to each node (200 ms).
const HEARTBEATS_PER_MIN: u64 = 300;
/// A commit: a round trip to a majority of voters and their fsync
/// (modelled: a LAN and an SSD).
const COMMIT_MS: u64 = 5;
/// The leader's link, bytes per ms (modelled: 1 Gbit/s).
const LINK_BYTES_PER_MS: u64 = 125_000;
/// A manager's soft state per (user, holder): the user's name, the
/// holder, its counts, map overhead (modelled on `replica::manager`).
const MANAGER_ENTRY_BYTES: u64 = 96;
/// Users put in a real directory to measure one user's bytes.
const DIRECTORY_SAMPLE: u64 = 20_000;

/// Sizes measured once per run.
#[derive(Debug, Clone)]
pub struct Unit {
    /// A failure verdict as a Raft entry (the command's bincode, and an
    /// entry header of 32 bytes).
    pub raft_entry_bytes: u64,
    /// The membership view of `nodes` nodes, encoded.
    pub view_bytes: u64,
    /// One user in the directory, encoded (measured over
    /// `DIRECTORY_SAMPLE` users).
    pub directory_bytes_per_user: f64,
    /// The state a joining node receives: view and directory.
    pub snapshot_bytes: u64,
}

impl Unit {
    pub fn measure(cfg: &SimConfig) -> anyhow::Result<Unit> {
        let verdict = Command::Verdict {
            id: (1 << 53) - 1,
            state: NodeState::Down,
            term: 12,
        };
        let raft_entry_bytes = membership::codec::encode_message(&verdict)?.len() as u64 + 32;
        let mut state = ClusterState::default();
        state.feature_level = membership::FEATURE_LEVEL_MAX;
        for id in 1..=cfg.nodes {
            let a = |port: u16| Some(format!("10.{}.{}.{}:{port}", id >> 16, (id >> 8) & 255, id & 255));
            let mut n = MNodeInfo::new(id * 0x1_0000_0001, a(7000).expect("an address"));
            n.addrs.smtp = a(25);
            n.addrs.submission = a(587);
            n.addrs.pop3 = a(110);
            n.addrs.imap = a(143);
            n.addrs.admin = a(8080);
            state.view.nodes.insert(n.id, n);
        }
        let empty = membership::formats::encode_state(&state)?.len() as u64;
        state.directory.apply(&DirectoryCommand::AddDomain {
            domain: "example.org".into(),
        })?;
        let with_domain = membership::formats::encode_state(&state)?.len() as u64;
        let sample = DIRECTORY_SAMPLE.min(cfg.users).max(1);
        for i in 0..sample {
            state.directory.apply(&DirectoryCommand::AddUser {
                address: format!("user{i}@example.org"),
                // An argon2id PHC string of the length the nodes write.
                password_hash: format!("$argon2id$v=19$m=19456,t=2,p=1${:022}${:043}", i, i),
                quota_bytes: Some(1 << 30),
            })?;
        }
        let full = membership::formats::encode_state(&state)?.len() as u64;
        let directory_bytes_per_user = (full - with_domain) as f64 / sample as f64;
        Ok(Unit {
            raft_entry_bytes,
            view_bytes: empty,
            directory_bytes_per_user,
            snapshot_bytes: with_domain + (directory_bytes_per_user * cfg.users as f64) as u64,
        })
    }

    /// From a node's death until the leader commits its verdict: the
    /// failure timeout, half a round on average before a watcher's ping
    /// misses, the leader's re-check (a ping that times out).
    pub fn detect_ms(&self, failure_timeout_ms: u64) -> u64 {
        failure_timeout_ms + PING_INTERVAL.as_millis() as u64 / 2 + PING_TIMEOUT.as_millis() as u64
    }

    /// A view's commit and its entry sent to every other node over the
    /// leader's link.
    pub fn commit_and_fan_out_ms(&self, nodes: u64) -> u64 {
        COMMIT_MS + (nodes - 1) * (self.raft_entry_bytes + MESSAGE_OVERHEAD_BYTES) / LINK_BYTES_PER_MS
    }
}

/// Memory per node after the start.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Placement's view: the slot table and the node list (measured).
    pub placement_view_bytes: u64,
    /// The membership view, encoded (measured).
    pub membership_view_bytes: u64,
    /// The directory every node keeps, encoded (measured per user, times
    /// the users).
    pub directory_bytes: u64,
    /// Users a node manages: the most and the mean.
    pub managed_max: u64,
    pub managed_mean: f64,
    /// The managers' soft state of the busiest node (modelled bytes per
    /// (user, holder), holders per user from the sample).
    pub manager_bytes_max: u64,
    /// The nodes one node pings, at most (ring and voters), and with every
    /// node pinging every node.
    pub pinged_max: u64,
    pub pinged_all: u64,
    /// What a joining node receives (snapshot).
    pub snapshot_bytes: u64,
}

/// The cluster at rest, per minute.
#[derive(Debug, Clone, Default)]
pub struct AtRest {
    /// Pings sent in the cluster, with the ring and with every node
    /// pinging every node.
    pub pings_ring: u64,
    pub pings_all: u64,
    /// Most pings one node sends, and receives (a voter: every node pings
    /// the voters).
    pub pings_out_max: u64,
    pub pings_in_max: u64,
    /// Raft heartbeats the leader sends.
    pub heartbeats: u64,
    /// Bytes of pings and heartbeats.
    pub bytes: u64,
    /// The managers' report round every node runs each minute (every live
    /// node to every live node, every user it holds): messages, bytes in
    /// the cluster, and the most one node sends.
    pub report_messages: u64,
    pub report_bytes: u64,
    pub report_bytes_node_max: u64,
}

impl Sim {
    /// Every node's ping targets: ring neighbours and the voters (the
    /// lowest up ids stand for them).
    fn voters(&self) -> BTreeSet<u64> {
        let up = self.nodes.iter().filter(|(_, n)| n.state == NodeState::Up);
        up.map(|(id, _)| *id).take(VOTERS_MAX).collect()
    }

    fn ping_targets(&self) -> BTreeMap<u64, BTreeSet<u64>> {
        let states: Vec<(u64, NodeState)> = self.nodes.iter().map(|(id, n)| (*id, n.state)).collect();
        let voters = self.voters();
        states
            .iter()
            .filter(|(_, s)| *s != NodeState::Down)
            .map(|&(me, _)| {
                let mut t = membership::watch::ring_targets(states.iter().copied(), me, self.cfg.watchers);
                t.extend(&voters);
                t.remove(&me);
                (me, t)
            })
            .collect()
    }

    pub(super) fn memory(&self) -> Memory {
        let mut managed: BTreeMap<u64, u64> = BTreeMap::new();
        for key in &self.users {
            if let Some(m) = self.view.manager_of(*key) {
                *managed.entry(m.0).or_default() += 1;
            }
        }
        let managed_max = managed.values().copied().max().unwrap_or(0);
        let holders: u64 = self.holders.iter().map(|h| u64::from(*h)).sum();
        let holders_per_user = holders as f64 / self.holders.len().max(1) as f64;
        let targets = self.ping_targets();
        Memory {
            placement_view_bytes: self.view.heap_bytes() as u64,
            membership_view_bytes: self.costs.view_bytes,
            directory_bytes: (self.costs.directory_bytes_per_user * self.cfg.users as f64) as u64,
            managed_max,
            managed_mean: self.cfg.users as f64 / self.nodes.len() as f64,
            manager_bytes_max: (managed_max as f64 * holders_per_user) as u64 * MANAGER_ENTRY_BYTES,
            pinged_max: targets.values().map(|t| t.len() as u64).max().unwrap_or(0),
            pinged_all: self.nodes.len() as u64 - 1,
            snapshot_bytes: self.costs.snapshot_bytes,
        }
    }

    pub(super) fn at_rest(&self) -> AtRest {
        let targets = self.ping_targets();
        let voters = self.voters();
        // Per minute: ring neighbours every round; the voters every round
        // by a voter, every fourth by the others (`detector`).
        let rate = |me: u64, to: u64, ring: &BTreeSet<u64>| {
            if ring.contains(&to) || voters.contains(&me) {
                ROUNDS_PER_MIN
            } else {
                ROUNDS_PER_MIN / LEARNER_VOTER_ROUNDS
            }
        };
        let states: Vec<(u64, NodeState)> = self.nodes.iter().map(|(id, n)| (*id, n.state)).collect();
        let mut received: BTreeMap<u64, u64> = BTreeMap::new();
        let mut sent: BTreeMap<u64, u64> = BTreeMap::new();
        for (&me, t) in &targets {
            let ring = membership::watch::ring_targets(states.iter().copied(), me, self.cfg.watchers);
            for &to in t {
                let r = rate(me, to, &ring);
                *received.entry(to).or_default() += r;
                *sent.entry(me).or_default() += r;
            }
        }
        let n = self.nodes.len() as u64;
        let pings_ring: u64 = sent.values().sum();
        let heartbeats = (n - 1) * HEARTBEATS_PER_MIN;
        let live = targets.len() as u64;
        let per_entry = |users: u64| (users as f64 * self.cfg.scale()) as u64 * REPORT_ENTRY_BYTES;
        let held = self.users_held.values().copied();
        AtRest {
            report_messages: live * live.saturating_sub(1),
            report_bytes: per_entry(held.clone().sum()) + live * live.saturating_sub(1) * MESSAGE_OVERHEAD_BYTES,
            report_bytes_node_max: held.map(per_entry).max().unwrap_or(0) + live * MESSAGE_OVERHEAD_BYTES,
            pings_ring,
            pings_all: n * (n - 1) * ROUNDS_PER_MIN,
            pings_out_max: sent.values().copied().max().unwrap_or(0),
            pings_in_max: received.values().copied().max().unwrap_or(0),
            heartbeats,
            bytes: pings_ring * PING_BYTES + heartbeats * PING_BYTES,
        }
    }
}
