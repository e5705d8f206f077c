//! The cluster side of a node: its identity (certificate under the cluster
//! CA), joining through a seed, the QUIC transport that carries membership
//! (Raft) traffic, and the leader's two duties: failure detection and
//! keeping an odd number of voters.
//!
//! Files in `DATA/cluster/`: `node-id`, `node.der`, `node.key`, `ca.der`,
//! `ca.key`, `token` (the join secret) and `raft/` (membership's storage).
//! The full join token is also written to `DATA/join-token`.
//!
//! Who holds the CA key (`ca.key`): the founding node and every node that
//! has been a Raft voter (a voter without it fetches it from another voter
//! over the mutually authenticated cluster wire). Voters already decide the
//! whole replicated state, so the key adds nothing to what an intruder on a
//! voter could do; learners, the bulk of a large cluster, never hold it. Any
//! member can still be a seed: one without the key checks the join secret
//! itself and asks a holder to issue the certificate (`IssueCert`).
//!
//! Enrollment fails closed: a node whose join secret is missing, unreadable
//! or empty admits nobody, and attempts are throttled per source address.
//!
//! Split by role: [`node`] (the `Cluster` a started node holds),
//! [`wire`] (QUIC, mutual TLS, the CA, framing), [`rpc`] (the messages and
//! the connection pool), [`admission`] (enrollment, both sides),
//! [`serve`] (what a node answers), [`detector`] (failure detection: the
//! ring, the reports, the leader's verdicts), [`suspects`] (the reports
//! the leader was sent), [`duties`] (the rounds,
//! voters, the CA key) and [`replica`] (the replica protocol over this wire, and
//! its background duties).
//!
//! # In more detail
//! `cluster.rs`: `Cluster::start` founds a cluster, enrolls through a seed,
//! or resumes from `DATA/cluster/`; `QuicTransport` implements membership's
//! `Transport`; every node pings its ring neighbours and the voters
//! (`detector`) and reports to the leader, which
//! marks nodes down/up and keeps the voters odd and at most 5
//! (`desired_voters`); a **draining leader steps down** (`step_down_if_draining`:
//! openraft 0.9 can neither transfer leadership nor remove its leader): it
//! stops heartbeats and standing for election and asks an up voter to call
//! one (`ClusterRequest::TakeLeadership`, served only for the view's
//! leader); the followers' leases run out and a new leader is elected, which
//! then moves the vote away from the draining node. **One address, one
//! identity**: `Pong` carries the answering node's id, Raft requests
//! (`ClusterRequest::Raft { to, .. }`) and replica envelopes name their
//! target, and another identity refuses them, so a machine back at its
//! address with an empty disk (a new identity) is never taken for the old
//! node. `Pong` carries the epoch a node has applied, and a
//! starting node serves clients only once its view is as new as its peers'
//! and has it up (`catch_up`, at most 10 s). `ClusterRequest::Stats` answers a node's `NodeStats` (entries, body
//! bytes, under-replicated count, repairs pending in its running round,
//! copies made by repair) for `cluster status`, which shows each node's
//! `activity`: serving, repairing, draining or down.
//! Failure-detector verdicts are fenced: each is a `Command::Verdict`
//! carrying the term its leader decided it in, and the state machine
//! refuses it when the entry is committed in another term (a paused or
//! partitioned leader's stale verdicts used to be forwarded to, and
//! committed by, its successor) or when it marks the committing leader
//! itself down; a node whose own rounds stalled (SIGSTOP, a starved
//! runtime) restarts every peer's timer instead of judging them by its own
//! silence; a `Down` verdict is re-pinged right before it is written; the
//! leader marks itself up if an earlier verdict left it down.
//! **Who holds the CA key**: the founder and every node that has been a
//! Raft voter (a voter without `ca.key` fetches it from another voter,
//! `CaKey`, answered only to a peer whose address is a voter's in the
//! view, and kept only if it matches `ca.der`). Voters already decide the
//! replicated state, so the key gives an intruder on one nothing more;
//! learners, most of a large cluster, never hold it. Any member is a seed:
//! one without the key checks the join secret and asks a voter to issue
//! the certificate (`IssueCert`). Enrollment fails closed: a missing,
//! unreadable or empty `cluster/token` admits nobody, and attempts are
//! limited to 10 a minute per source address (4 096 addresses tracked at
//! most; when full of live windows, new addresses are refused).

pub mod admission;
pub mod detector;
pub mod duties;
pub mod levels;
pub mod node;
pub mod replica;
pub mod rpc;
pub mod serve;
pub mod suspects;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use membership::{Membership, MembershipConfig, NodeAddrs, NodeInfo, NodeState};
use quinn::Endpoint;
use replication::FragmentStore;
use tokio::sync::watch;
use tracing::{info, warn};

pub use node::Cluster;
pub use rpc::{ClusterReply, ClusterRequest, LogLevelSetter, QueryHandler, QuicTransport};

use crate::files::write_secret;
use rpc::{LogSlot, QuerySlot, ReplicaSlot};
use wire::{ClusterCa, JoinToken, NodeIdentity};

/// How long a joining node keeps trying to be admitted.
const JOIN_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub data_dir: PathBuf,
    pub name: String,
    pub cluster_addr: SocketAddr,
    pub seeds: Vec<SocketAddr>,
    /// First node: the secret the cluster's token is made from. Joining
    /// node: the full token.
    pub join_token: Option<String>,
    /// A node silent this long is marked down.
    pub failure_timeout: Duration,
    /// How many ring neighbours each node pings (`--watchers`).
    pub watchers: usize,
    /// Who raises the feature level once every node supports more.
    pub upgrade_finish: levels::UpgradeFinish,
    /// The node's service addresses, for the view.
    pub addrs: NodeAddrs,
}

/// Raft timing: a leader is replaced within about a second of going
/// silent, with margins that a loaded 2-core machine running several nodes
/// still keeps (heartbeats every 200 ms, elections after 600-1200 ms).
fn membership_config() -> MembershipConfig {
    MembershipConfig {
        heartbeat_interval_ms: 200,
        election_timeout_min_ms: 600,
        election_timeout_max_ms: 1200,
        ..MembershipConfig::default()
    }
}

fn random_hex(n: usize) -> anyhow::Result<String> {
    Ok(crate::files::random_bytes()?
        .iter()
        .take(n)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn random_id() -> anyhow::Result<u64> {
    let b = crate::files::random_bytes()?;
    // Never 0 (membership uses 0 for "address only"), and below 2^53 so
    // that JSON readers of `cluster status` keep every digit.
    Ok((u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) & ((1 << 53) - 1)).max(1))
}

/// How this start relates to the cluster.
enum Boot {
    /// Known identity and Raft state: carry on.
    Restart,
    /// A new cluster, this node its first member.
    Found,
    /// Admitted through `seed`: ask the leader to add us.
    Join(SocketAddr),
}

impl Cluster {
    /// Sets up identity (creating the cluster or enrolling through a seed
    /// on first start), binds the cluster endpoint, starts membership and
    /// the leader duties. `stop` ends the background tasks.
    pub async fn start(
        cfg: ClusterConfig,
        store: Arc<FragmentStore>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Cluster> {
        let dir = cfg.data_dir.join("cluster");
        std::fs::create_dir_all(&dir)?;
        let (identity, id, boot) = if dir.join("node.der").exists() {
            let id: u64 = std::fs::read_to_string(dir.join("node-id"))?
                .trim()
                .parse()
                .context("bad node-id file")?;
            (NodeIdentity::load(&dir)?, id, Boot::Restart)
        } else if cfg.seeds.is_empty() {
            let ca = ClusterCa::create()?;
            ca.save(&dir)?;
            let secret = match &cfg.join_token {
                Some(s) if s.starts_with("quill1.") => {
                    bail!("--join-token for a new cluster is a secret, not a full token")
                }
                Some(s) => s.clone(),
                None => random_hex(16)?,
            };
            let identity = ca.issue(&cfg.name)?;
            identity.save(&dir)?;
            write_secret(&dir.join("token"), &secret)?;
            let token = JoinToken::new(&ca, secret);
            write_secret(&cfg.data_dir.join("join-token"), &token.to_string())?;
            println!(
                "new cluster; join token written to {}",
                cfg.data_dir.join("join-token").display()
            );
            let id = random_id()?;
            write_secret(&dir.join("node-id"), &id.to_string())?;
            (identity, id, Boot::Found)
        } else {
            let token = JoinToken::parse(
                cfg.join_token
                    .as_deref()
                    .ok_or_else(|| anyhow!("--seed needs --join-token"))?,
            )?;
            let (identity, seed) =
                admission::enroll(&cfg.data_dir, &cfg.name, cfg.cluster_addr, &cfg.seeds, &token).await?;
            identity.save(&dir)?;
            write_secret(&dir.join("token"), &token.secret)?;
            write_secret(&cfg.data_dir.join("join-token"), &token.to_string())?;
            let id = random_id()?;
            write_secret(&dir.join("node-id"), &id.to_string())?;
            (identity, id, Boot::Join(seed))
        };

        let endpoint = Endpoint::server(wire::server_config(&identity)?, cfg.cluster_addr)
            .with_context(|| format!("cannot listen on {} (cluster, UDP)", cfg.cluster_addr))?;
        let transport = Arc::new(QuicTransport::new(
            endpoint.clone(),
            wire::member_client_config(&identity)?,
        ));
        let membership = Membership::start(id, &dir.join("raft"), membership_config(), transport.clone()).await?;
        let replica: ReplicaSlot = Arc::default();
        let log_level: LogSlot = Arc::default();
        let queries: QuerySlot = Arc::default();
        let reports: Arc<suspects::Reports> = Arc::default();
        let cluster = Cluster {
            membership: membership.clone(),
            transport: transport.clone(),
            replica: replica.clone(),
            log_level: log_level.clone(),
            queries: queries.clone(),
            majority: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            stepping_down_until: Arc::default(),
            reports: reports.clone(),
            endpoint: endpoint.clone(),
        };
        tokio::spawn(serve::accept_loop(
            endpoint,
            Arc::new(serve::Handler {
                dir: dir.clone(),
                membership: membership.clone(),
                transport: transport.clone(),
                store,
                replica,
                log_level,
                queries,
                joins: Default::default(),
                reports,
            }),
            stop.clone(),
        ));

        let me = NodeInfo {
            id,
            name: cfg.name.clone(),
            addrs: cfg.addrs.clone(),
            weight: 1,
            zone: String::new(),
            state: NodeState::Up,
            voter: false,
        };
        match boot {
            Boot::Restart => {
                info!(node = id, "rejoining the cluster with saved state");
                tokio::spawn(duties::announce(cluster.clone(), me.clone(), stop.clone()));
            }
            Boot::Found => membership.initialize(me).await?,
            Boot::Join(seed) => {
                let deadline = Instant::now() + JOIN_DEADLINE;
                loop {
                    match membership.join(&seed.to_string(), me.clone()).await {
                        Ok(()) => break,
                        Err(e) if Instant::now() < deadline => {
                            warn!(error = %e, "join not done yet; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => return Err(e).context("the cluster did not add this node"),
                    }
                }
                info!(node = id, %seed, "joined the cluster");
            }
        }
        tokio::spawn(duties::ca_key(cluster.clone(), dir.clone(), stop.clone()));
        tokio::spawn(levels::duty(cluster.clone(), cfg.upgrade_finish, stop.clone()));
        tokio::spawn(duties::leader(cluster.clone(), cfg.failure_timeout, cfg.watchers, stop));
        Ok(cluster)
    }
}
