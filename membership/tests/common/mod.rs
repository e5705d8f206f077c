//! A cluster of in-memory nodes for the membership tests.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use membership::{ClusterView, Directory, MemRouter, Membership, MembershipConfig, NodeInfo};
use openraft::ServerState;

/// A folder under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TestDir(testkit::TempDir);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        TestDir(testkit::TempDir::new(&format!("membership-{name}")).expect("create test dir"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// The seed: `SEED` from the environment, else the test's own default.
pub fn seed(default: u64) -> u64 {
    testkit::seeds(&[default])[0]
}

/// Prints how to rerun the test with its seed when the test fails.
pub fn reproduce(seed: u64, test: &str) -> testkit::Reproduce {
    testkit::Reproduce::new(seed, format!("cargo test -p membership --test cluster {test}"))
}

/// Short timeouts, but loose enough for a loaded 2-core machine.
pub fn test_config() -> MembershipConfig {
    MembershipConfig {
        cluster_name: "test".into(),
        heartbeat_interval_ms: 60,
        election_timeout_min_ms: 300,
        election_timeout_max_ms: 600,
        write_timeout_ms: 5_000,
        snapshot_logs_since_last: 5_000,
        logs_kept_after_snapshot: 1_000,
    }
}

/// How long any condition may take to hold.
pub const CONVERGE: Duration = Duration::from_secs(10);

pub fn addr(id: u64) -> String {
    format!("10.0.0.{id}:7000")
}

pub fn info(id: u64) -> NodeInfo {
    NodeInfo {
        name: format!("node-{id}"),
        zone: format!("zone-{}", id % 2),
        ..NodeInfo::new(id, addr(id))
    }
}

pub struct Cluster {
    pub router: Arc<MemRouter>,
    pub config: MembershipConfig,
    pub nodes: BTreeMap<u64, Membership>,
    root: TestDir,
}

impl Cluster {
    /// Starts `n` nodes (ids 1..=n): node 1 initializes, the others join
    /// through it, then all become voters.
    pub async fn start(seed: u64, n: u64, config: MembershipConfig) -> Cluster {
        let mut c = Cluster::empty(seed, config);
        let first = c.start_node(1).await;
        first.initialize(info(1)).await.expect("initialize");
        for id in 2..=n {
            let m = c.start_node(id).await;
            m.join(&addr(1), info(id)).await.expect("join");
        }
        let all: BTreeSet<u64> = (1..=n).collect();
        c.nodes[&1]
            .change_membership(all.clone())
            .await
            .expect("change membership");
        for m in c.nodes.values() {
            wait_view(m, "every node a voter", |v| {
                v.voters() == all && v.nodes.len() == all.len()
            })
            .await;
        }
        c
    }

    /// No node yet: the caller fills folders ([`Cluster::dir`]) and starts
    /// nodes on them.
    pub fn empty(seed: u64, config: MembershipConfig) -> Cluster {
        Cluster {
            router: MemRouter::new(seed),
            config,
            nodes: BTreeMap::new(),
            root: TestDir::new(&format!("cluster-{seed}")),
        }
    }

    pub fn dir(&self, id: u64) -> PathBuf {
        self.root.path().join(format!("node-{id}"))
    }

    /// Starts node `id` from its folder and puts it on the network.
    pub async fn start_node(&mut self, id: u64) -> Membership {
        let m = self.start_isolated(id).await;
        self.router.register(m.clone());
        m
    }

    /// Starts node `id` from its folder without putting it on the network.
    pub async fn start_isolated(&mut self, id: u64) -> Membership {
        let m = Membership::start(id, &self.dir(id), self.config.clone(), self.router.transport(id))
            .await
            .expect("start");
        self.nodes.insert(id, m.clone());
        m
    }

    /// Takes node `id` off the network and stops it.
    pub async fn stop(&mut self, id: u64) {
        self.router.unregister(id);
        let m = self.nodes.remove(&id).expect("running");
        m.shutdown().await.expect("shutdown");
    }

    pub fn node(&self, id: u64) -> &Membership {
        &self.nodes[&id]
    }

    /// Waits until every running node in `ids` follows one leader; returns it.
    pub async fn leader_of(&self, ids: &[u64]) -> u64 {
        let first = &self.nodes[&ids[0]];
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            let m = first
                .raft()
                .wait(Some(CONVERGE))
                .metrics(|m| m.current_leader.is_some_and(|l| ids.contains(&l)), "a leader")
                .await
                .expect("a leader among the nodes");
            let leader = m.current_leader.expect("checked");
            let mut agreed = true;
            for id in ids {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let r = self.nodes[id]
                    .raft()
                    .wait(Some(left.min(Duration::from_secs(2))))
                    .metrics(|m| m.current_leader == Some(leader), "the same leader")
                    .await;
                agreed &= r.is_ok();
            }
            let state = self.nodes[&leader].metrics().borrow().state;
            if agreed && state == ServerState::Leader {
                return leader;
            }
            assert!(tokio::time::Instant::now() < deadline, "no agreed leader among {ids:?}");
        }
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop(id).await;
        }
    }
}

/// Waits (re-checking on every Raft metrics change, i.e. after every apply)
/// until `pred` holds for node `m`.
pub async fn wait_until(m: &Membership, what: &str, pred: impl Fn(&Membership) -> bool + Send) {
    let m2 = m.clone();
    m.raft()
        .wait(Some(CONVERGE))
        .metrics(move |_| pred(&m2), what)
        .await
        .unwrap_or_else(|e| panic!("node {}: {what}: {e}", m.id()));
}

/// Waits until the view of node `m` satisfies `pred`.
pub async fn wait_view(m: &Membership, what: &str, pred: impl Fn(&ClusterView) -> bool) {
    let mut rx = m.subscribe();
    let r = tokio::time::timeout(CONVERGE, rx.wait_for(|v| pred(v))).await;
    match r {
        Ok(Ok(_)) => {}
        _ => panic!("node {}: {what}; view: {:?}", m.id(), m.view()),
    }
}

/// Waits until node `m`'s directory has exactly these domains.
pub async fn wait_domains(m: &Membership, want: &BTreeSet<String>) {
    let d = m.directory();
    let want2 = want.clone();
    wait_until(m, &format!("domains {want:?}"), move |_| {
        d.domains().into_iter().collect::<BTreeSet<_>>() == want2
    })
    .await;
}
