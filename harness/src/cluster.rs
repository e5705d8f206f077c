//! A local cluster that outlives the command that started it: `up` starts
//! the nodes in their own process groups and records them in
//! `DIR/harness.json`; `add`, `kill`, `restart`, `drain`, `status`, `down`,
//! `load` and `verify` find them there. Node k listens on `SUBNET.k`
//! (127.0.0.k by default) with the standard ports, so every node looks like
//! its own host, as behind DNS round robin.
//!
//! Processes are only ever signalled by the PIDs recorded here, and only
//! after checking that the PID still runs a `quill` binary.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hyper::Method;
use serde::{Deserialize, Serialize};

use crate::process::{CLUSTER_PORT, NodeOptions, NodeProcess, Signal, send_signal};

pub const STATE_FILE: &str = "harness.json";
/// The layout of `harness.json` this release writes. 1: release 0.1.0's
/// (no `version` field); 2: `version`, `node_args` and each node's
/// `binary` (all read with defaults from a version 1 file).
pub const STATE_VERSION: u32 = 2;
const STOP_DEADLINE: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeEntry {
    /// The node's number: it listens on SUBNET.k.
    pub k: u8,
    /// The running process, if any.
    pub pid: Option<u32>,
    /// The `quill` binary this node runs when it is not the cluster's
    /// (mid-`upgrade`).
    #[serde(default)]
    pub binary: Option<PathBuf>,
}

impl NodeEntry {
    /// Node `k`, not running, on the cluster's binary.
    pub fn new(k: u8) -> NodeEntry {
        NodeEntry {
            k,
            pid: None,
            binary: None,
        }
    }
}

fn state_version_1() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    /// The layout of the file ([`STATE_VERSION`] when written).
    #[serde(default = "state_version_1")]
    pub version: u32,
    /// The first three octets of the nodes' addresses.
    pub subnet: [u8; 3],
    pub admin_token: String,
    /// Password of alice and bob (and of the load users).
    pub password: String,
    pub replicas: usize,
    /// The secret the founding node made the join token from.
    pub secret: String,
    pub binary: PathBuf,
    pub log: String,
    pub nodes: Vec<NodeEntry>,
    /// The nodes' `--repair-grace` (None: the node's default).
    #[serde(default)]
    pub repair_grace: Option<String>,
    /// More `quill node` flags for every node (`up --node-arg`).
    #[serde(default)]
    pub node_args: Vec<String>,
}

impl ClusterState {
    /// A new cluster of `nodes` nodes on SUBNET.1..=SUBNET.nodes (not
    /// started; see [`ClusterState::start_all`]).
    pub fn new(subnet: [u8; 3], nodes: u8, replicas: usize, password: String) -> anyhow::Result<Self> {
        Ok(ClusterState {
            version: STATE_VERSION,
            subnet,
            admin_token: crate::commands::random_hex(16)?,
            password,
            replicas,
            secret: crate::commands::random_hex(16)?,
            binary: crate::process::quill_binary()?,
            log: "info".into(),
            nodes: (1..=nodes).map(NodeEntry::new).collect(),
            repair_grace: None,
            node_args: Vec::new(),
        })
    }

    /// Starts every node in order (the first founds the cluster or they
    /// resume), saving the state after each, and waits until all agree on
    /// one view (what `up` and `bench-replication` do).
    pub async fn start_all(&mut self, dir: &Path, verbose: bool) -> anyhow::Result<Vec<NodeProcess>> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        self.save(dir)?;
        let ks: Vec<u8> = self.nodes.iter().map(|n| n.k).collect();
        for k in ks {
            if verbose {
                println!("starting n{k} on {} ...", self.ip(k));
            }
            let r = self.start_node(dir, k).await;
            self.save(dir)?;
            r?;
        }
        let handles = self.live_handles(dir)?;
        let refs: Vec<&NodeProcess> = handles.iter().collect();
        crate::process::wait_converged(&refs, refs.len(), Duration::from_secs(60)).await?;
        Ok(handles)
    }

    /// Stops every live node (SIGTERM, then SIGKILL past the deadline).
    pub fn stop_all(&mut self, dir: &Path) -> anyhow::Result<()> {
        let ks: Vec<u8> = self.live();
        for k in ks {
            self.stop_node(k)?;
        }
        self.save(dir)
    }

    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no harness cluster in {} (start one with `{} up --dir {}`)",
                dir.display(),
                crate::harness_command(),
                dir.display()
            )
        })?;
        let state: ClusterState = serde_json::from_str(&text).with_context(|| format!("bad {}", path.display()))?;
        if state.version > STATE_VERSION {
            bail!(
                "{} is of layout {} (a newer quill-harness); this one reads layouts 1 to {STATE_VERSION}",
                path.display(),
                state.version
            );
        }
        Ok(state)
    }

    /// Written whole or not at all, and private: it holds the admin token
    /// and the users' password.
    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        // Read with defaults, written in this release's layout.
        let current = ClusterState {
            version: STATE_VERSION,
            ..self.clone()
        };
        Ok(quill_node::files::write_private(
            &Self::path(dir),
            &serde_json::to_vec_pretty(&current)?,
        )?)
    }

    pub fn ip(&self, k: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.subnet[0], self.subnet[1], self.subnet[2], k)
    }

    pub fn data(dir: &Path, k: u8) -> PathBuf {
        dir.join(format!("n{k}"))
    }

    /// Options to run node `k` (its data directory under `dir`).
    pub fn options(&self, dir: &Path, k: u8) -> anyhow::Result<NodeOptions> {
        let mut o = NodeOptions::new(Self::data(dir, k), self.ip(k))?;
        o.binary = self.binary_of(k);
        o.admin_token = self.admin_token.clone();
        o.log = self.log.clone();
        o.detached = true;
        // Releases before 0.3.0 check no incoming mail (and know no
        // --trusted-networks).
        let checks = !["0.1.", "0.2."]
            .iter()
            .any(|r| crate::commands::upgrade::release_of(&o.binary).starts_with(r));
        o.trust_loopback = checks;
        o.extra_args = vec![
            "--replicas".into(),
            self.replicas.to_string(),
            "--name".into(),
            format!("n{k}"),
        ];
        if let Some(g) = &self.repair_grace {
            o.extra_args.extend(["--repair-grace".into(), g.clone()]);
        }
        o.extra_args.extend(self.node_args.iter().cloned());
        Ok(o)
    }

    /// The binary node `k` runs: its own (mid-`upgrade`) or the cluster's.
    pub fn binary_of(&self, k: u8) -> PathBuf {
        self.entry(k)
            .ok()
            .and_then(|e| e.binary.clone())
            .unwrap_or_else(|| self.binary.clone())
    }

    /// A handle on node `k` (whether or not it runs).
    pub fn handle(&self, dir: &Path, k: u8) -> anyhow::Result<NodeProcess> {
        Ok(NodeProcess::attach(self.options(dir, k)?))
    }

    pub fn entry(&self, k: u8) -> anyhow::Result<&NodeEntry> {
        self.nodes
            .iter()
            .find(|n| n.k == k)
            .ok_or_else(|| anyhow!("no node n{k} in this cluster"))
    }

    pub fn entry_mut(&mut self, k: u8) -> anyhow::Result<&mut NodeEntry> {
        self.nodes
            .iter_mut()
            .find(|n| n.k == k)
            .ok_or_else(|| anyhow!("no node n{k} in this cluster"))
    }

    /// The nodes whose recorded process still runs.
    pub fn live(&self) -> Vec<u8> {
        self.nodes
            .iter()
            .filter(|n| n.pid.is_some_and(quill_alive))
            .map(|n| n.k)
            .collect()
    }

    /// Handles on the live nodes.
    pub fn live_handles(&self, dir: &Path) -> anyhow::Result<Vec<NodeProcess>> {
        self.live().into_iter().map(|k| self.handle(dir, k)).collect()
    }

    /// Starts node `k`: the first node founds the cluster, a new node joins
    /// through a live member, a node with data resumes.
    pub async fn start_node(&mut self, dir: &Path, k: u8) -> anyhow::Result<()> {
        if self.entry(k).is_ok_and(|e| e.pid.is_some_and(quill_alive)) {
            bail!("n{k} is already running");
        }
        let mut o = self.options(dir, k)?;
        let has_data = Self::data(dir, k).join("cluster").join("node.der").exists();
        if !has_data {
            match self.live().into_iter().find(|&l| l != k) {
                Some(seed_k) => {
                    let seed = self.handle(dir, seed_k)?;
                    o.seeds = vec![SocketAddr::new(self.ip(seed_k).into(), CLUSTER_PORT)];
                    o.join_token = Some(seed.join_token()?);
                }
                // Nobody has joined anything yet: this node founds the cluster.
                None if !self
                    .nodes
                    .iter()
                    .any(|n| Self::data(dir, n.k).join("cluster").join("node.der").exists()) =>
                {
                    o.join_token = Some(self.secret.clone())
                }
                None => bail!("no live node to join through"),
            }
        }
        let node = NodeProcess::start(o).await.with_context(|| format!("starting n{k}"))?;
        let pid = node.pid().ok_or_else(|| anyhow!("n{k} has no pid"))?;
        match self.entry_mut(k) {
            Ok(e) => e.pid = Some(pid),
            Err(_) => self.nodes.push(NodeEntry {
                pid: Some(pid),
                ..NodeEntry::new(k)
            }),
        }
        Ok(())
    }

    /// SIGKILL, as a crash.
    pub fn kill_node(&mut self, k: u8) -> anyhow::Result<()> {
        let e = self.entry_mut(k)?;
        let pid = e
            .pid
            .filter(|p| quill_alive(*p))
            .ok_or_else(|| anyhow!("n{k} is not running"))?;
        signal(pid, Signal::KILL)?;
        wait_gone(pid, STOP_DEADLINE)?;
        e.pid = None;
        Ok(())
    }

    /// SIGSTOP (`stop`) or SIGCONT: a node that is alive but does not run.
    pub fn pause_node(&self, k: u8, stop: bool) -> anyhow::Result<()> {
        let pid = self
            .entry(k)?
            .pid
            .filter(|p| quill_alive(*p))
            .ok_or_else(|| anyhow!("n{k} is not running"))?;
        signal(pid, if stop { Signal::STOP } else { Signal::CONT })
    }

    /// SIGTERM and wait (SIGKILL past the deadline).
    pub fn stop_node(&mut self, k: u8) -> anyhow::Result<()> {
        let e = self.entry_mut(k)?;
        let Some(pid) = e.pid.filter(|p| quill_alive(*p)) else {
            e.pid = None;
            return Ok(());
        };
        signal(pid, Signal::TERM)?;
        if wait_gone(pid, STOP_DEADLINE).is_err() {
            signal(pid, Signal::KILL)?;
            wait_gone(pid, STOP_DEADLINE)?;
        }
        e.pid = None;
        Ok(())
    }

    /// The node id the cluster knows node `k` by (from `cluster status`).
    pub async fn node_id(&self, dir: &Path, k: u8) -> anyhow::Result<u64> {
        let status = self.any_status(dir).await?;
        let name = format!("n{k}");
        status["nodes"]
            .as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == name.as_str()))
            .and_then(|n| n["id"].as_u64())
            .ok_or_else(|| anyhow!("the cluster does not know n{k}"))
    }

    /// `cluster status --json` from the first live node that answers.
    pub async fn any_status(&self, dir: &Path) -> anyhow::Result<serde_json::Value> {
        let mut last = anyhow!("no node is running");
        for h in self.live_handles(dir)? {
            match h.status().await {
                Ok(s) => return Ok(s),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub async fn drain(&self, dir: &Path, k: u8) -> anyhow::Result<()> {
        let id = self.node_id(dir, k).await?;
        let live = self.live_handles(dir)?;
        let h = live.first().ok_or_else(|| anyhow!("no node is running"))?;
        h.admin(Method::POST, &format!("/v1/nodes/{id}/drain"), None).await?;
        Ok(())
    }
}

/// Parses `3` or `n3`.
pub fn parse_node(s: &str) -> anyhow::Result<u8> {
    s.trim_start_matches('n')
        .parse()
        .map_err(|_| anyhow!("bad node {s:?}: want a number like 2 or n2"))
}

/// Whether `pid` is a running (not zombie) `quill` process.
pub fn quill_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
    if matches!(state, Some("Z") | Some("X") | None) {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|b| *b == 0).next().is_some_and(|exe| exe.ends_with(b"quill")))
}

fn signal(pid: u32, sig: Signal) -> anyhow::Result<()> {
    // It may have exited between the check and the signal.
    if let Err(e) = send_signal(pid, sig)
        && quill_alive(pid)
    {
        bail!("cannot signal process {pid} ({sig:?}): {e}");
    }
    Ok(())
}

fn wait_gone(pid: u32, deadline: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    while quill_alive(pid) {
        if Instant::now() > end {
            bail!("process {pid} still running after {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
