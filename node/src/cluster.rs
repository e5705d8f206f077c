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

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use membership::{Membership, MembershipConfig, NodeAddrs, NodeInfo, NodeState};
use quinn::Endpoint;
use replication::FragmentStore;
use tokio::sync::watch;
use tracing::{info, warn};

pub use crate::rpc::{ClusterReply, ClusterRequest, LogSlot, QuicTransport, ReplicaSlot};
use crate::rpc::{NodeStats, ReplicaService};
use crate::wire::{self, ClusterCa, JoinToken, NodeIdentity};

/// How often every node pings every other node. With `PING_TIMEOUT` this
/// bounds how late a failure is noticed past `--failure-timeout-ms`.
const PING_INTERVAL: Duration = Duration::from_millis(250);
/// How long one ping may take; a round waits for its slowest ping, so a
/// dead node stretches a round to this. Loopback and LAN answer in well
/// under a millisecond: this is a missed ping, not yet a failure.
const PING_TIMEOUT: Duration = Duration::from_millis(500);
/// How long `cluster status` waits for another node's counts.
const STATS_TIMEOUT: Duration = Duration::from_millis(300);
/// How often the leader checks the voter set.
const VOTER_INTERVAL: Duration = Duration::from_secs(1);
/// Raft voters at most: more only slows commits down.
const VOTERS_MAX: usize = 5;
/// How often a voter checks that it holds the CA key.
const CA_KEY_INTERVAL: Duration = Duration::from_secs(2);
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
    /// The node's service addresses, for the view.
    pub addrs: NodeAddrs,
}

/// A node's place in the cluster.
#[derive(Clone)]
pub struct Cluster {
    pub membership: Membership,
    pub transport: Arc<QuicTransport>,
    /// Set by the node once its replicator exists.
    pub replica: ReplicaSlot,
    /// Set by the node at start.
    pub log_level: LogSlot,
    /// Whether this node's last ping round reached a majority of the Raft
    /// voters (itself included): without one the view and the directory
    /// cannot change here, though mail still flows (`/health` says so).
    pub majority: Arc<std::sync::atomic::AtomicBool>,
    endpoint: Endpoint,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("id", &self.membership.id()).finish()
    }
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
    Ok(crate::random_bytes()?
        .iter()
        .take(n)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn random_id() -> anyhow::Result<u64> {
    let b = crate::random_bytes()?;
    // Never 0 (membership uses 0 for "address only"), and below 2^53 so
    // that JSON readers of `cluster status` keep every digit.
    Ok((u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) & ((1 << 53) - 1)).max(1))
}

fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(format!("{text}\n").as_bytes())?;
    f.sync_all()?;
    Ok(())
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
            let (identity, seed) = enroll(&cfg, &token).await?;
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
        let cluster = Cluster {
            membership: membership.clone(),
            transport: transport.clone(),
            replica: replica.clone(),
            log_level: log_level.clone(),
            majority: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            endpoint: endpoint.clone(),
        };
        tokio::spawn(accept_loop(
            endpoint,
            Arc::new(Handler {
                dir: dir.clone(),
                membership: membership.clone(),
                transport: transport.clone(),
                store,
                replica,
                log_level,
                joins: Default::default(),
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
            Boot::Restart => info!(node = id, "rejoining the cluster with saved state"),
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
        tokio::spawn(ca_key_duty(cluster.clone(), dir.clone(), stop.clone()));
        tokio::spawn(leader_duties(cluster.clone(), cfg.failure_timeout, stop));
        Ok(cluster)
    }

    pub fn id(&self) -> u64 {
        self.membership.id()
    }

    /// Waits, at most `deadline`, until this node has applied a view at
    /// least as new as any peer that answers has, and that view has it up.
    /// A node restarted from its saved state starts with the view it died
    /// with (itself up, later changes missing); serving clients by it would
    /// pick other managers than the cluster does (a second POP3 lock for a
    /// mailbox, placement by stale loads). Returns whether it caught up.
    pub async fn catch_up(&self, deadline: Duration) -> bool {
        let me = self.id();
        let until = tokio::time::Instant::now() + deadline;
        let view = self.membership.view();
        let asks = view.nodes.values().filter(|n| n.id != me).map(|n| {
            let (t, addr) = (self.transport.clone(), n.addrs.cluster.clone());
            async move {
                match tokio::time::timeout(PING_TIMEOUT * 4, t.request(&addr, &ClusterRequest::Ping)).await {
                    Ok(Ok(ClusterReply::Pong { epoch, .. })) => epoch,
                    _ => 0,
                }
            }
        });
        let newest = futures_join_all(asks).await.into_iter().max().unwrap_or(0);
        let mut views = self.membership.subscribe();
        loop {
            let v = self.membership.view();
            let up = v.node(me).is_some_and(|n| n.state != NodeState::Down);
            if v.epoch >= newest && up {
                return true;
            }
            match tokio::time::timeout_at(until, views.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    warn!(
                        epoch = v.epoch,
                        newest, up, "not caught up with the cluster's view; serving by this node's own"
                    );
                    return false;
                }
            }
        }
    }

    /// Stops membership and closes the endpoint.
    pub async fn shutdown(&self) {
        if let Err(e) = self.membership.shutdown().await {
            warn!(error = %e, "membership shutdown");
        }
        self.endpoint.close(0u32.into(), b"shutdown");
    }

    /// Asks a node for its store figures (None if it does not answer within
    /// `STATS_TIMEOUT`: status pages must stay quick while a node dies).
    pub async fn stats_of(&self, addr: &str) -> Option<NodeStats> {
        let r = tokio::time::timeout(STATS_TIMEOUT, self.transport.request(addr, &ClusterRequest::Stats)).await;
        match r {
            Ok(Ok(ClusterReply::Stats(stats))) => Some(stats),
            _ => None,
        }
    }
}

/// First start of a joining node: proves the token to a seed and gets a
/// certificate. Tries every seed until one admits it.
async fn enroll(cfg: &ClusterConfig, token: &JoinToken) -> anyhow::Result<(NodeIdentity, SocketAddr)> {
    let endpoint = Endpoint::client(SocketAddr::new(cfg.cluster_addr.ip(), 0))?;
    let mut last = anyhow!("no seed given");
    for &seed in &cfg.seeds {
        let attempt = async {
            let conn = wire::connect(&endpoint, wire::joiner_client_config(token)?, seed)
                .await
                .with_context(|| format!("seed {seed}"))?;
            let req = ClusterRequest::Enroll {
                secret: token.secret.clone(),
                name: cfg.name.clone(),
            };
            match wire::call::<_, ClusterReply>(&conn, &req).await? {
                ClusterReply::Enrolled {
                    cert,
                    key,
                    ca_cert,
                    ca_key_pem,
                } => {
                    let identity = NodeIdentity {
                        cert: cert.into(),
                        key: rustls::pki_types::PrivatePkcs8KeyDer::from(key),
                        ca: ca_cert.into(),
                    };
                    if !ca_key_pem.is_empty() {
                        // From a seed of an earlier version.
                        let dir = cfg.data_dir.join("cluster");
                        std::fs::create_dir_all(&dir)?;
                        write_secret(&dir.join("ca.key"), &ca_key_pem)?;
                    }
                    Ok(identity)
                }
                ClusterReply::Refused(why) => bail!("seed {seed} refused to admit this node: {why}"),
                other => bail!("seed {seed} answered {other:?}"),
            }
        };
        match attempt.await {
            Ok(identity) => {
                endpoint.close(0u32.into(), b"enrolled");
                return Ok((identity, seed));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// What the server side of the cluster wire answers with.
struct Handler {
    dir: PathBuf,
    membership: Membership,
    transport: Arc<QuicTransport>,
    store: Arc<FragmentStore>,
    replica: ReplicaSlot,
    log_level: LogSlot,
    joins: std::sync::Mutex<JoinLimiter>,
}

/// Enrollment attempts allowed per source address per window.
const JOIN_ATTEMPTS_PER_WINDOW: u32 = 10;
const JOIN_WINDOW: Duration = Duration::from_secs(60);
/// Source addresses tracked at most; when full of live windows, every new
/// address is refused until one expires (fail closed).
const JOIN_SOURCES_MAX: usize = 4096;

/// Counts enrollment attempts per source address in fixed windows.
#[derive(Debug, Default)]
pub struct JoinLimiter {
    seen: HashMap<std::net::IpAddr, (Instant, u32)>,
}

impl JoinLimiter {
    /// Whether one more attempt from `ip` at `now` is allowed (and counts it).
    pub fn allow(&mut self, ip: std::net::IpAddr, now: Instant) -> bool {
        if !self.seen.contains_key(&ip) && self.seen.len() >= JOIN_SOURCES_MAX {
            self.seen
                .retain(|_, (start, _)| now.duration_since(*start) < JOIN_WINDOW);
            if self.seen.len() >= JOIN_SOURCES_MAX {
                return false;
            }
        }
        let (start, n) = self.seen.entry(ip).or_insert((now, 0));
        if now.duration_since(*start) >= JOIN_WINDOW {
            *start = now;
            *n = 0;
        }
        *n += 1;
        *n <= JOIN_ATTEMPTS_PER_WINDOW
    }
}

/// The join secret this node checks enrollments against: `None` (admit
/// nobody) when the file is missing, unreadable or empty.
fn join_secret(dir: &Path) -> Option<String> {
    let s = std::fs::read_to_string(dir.join("token")).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// A certificate for `name` from this node's CA, if it holds the key.
fn issue_here(dir: &Path, name: &str) -> anyhow::Result<ClusterReply> {
    let ca = ClusterCa::load(dir)?;
    let id = ca.issue(name)?;
    Ok(ClusterReply::Enrolled {
        cert: id.cert.to_vec(),
        key: id.key.secret_pkcs8_der().to_vec(),
        ca_cert: id.ca.to_vec(),
        ca_key_pem: String::new(),
    })
}

async fn accept_loop(endpoint: Endpoint, handler: Arc<Handler>, mut stop: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = stop.changed() => return,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    // A wrong certificate ends here (rustls refused it).
                    warn!(error = %e, "cluster connection refused");
                    return;
                }
            };
            let peer = conn.remote_address();
            wire::serve_connection(conn, move |member: bool, req: ClusterRequest| {
                let handler = handler.clone();
                async move { handle(member, req, &handler, peer).await }
            })
            .await
        });
    }
}

async fn handle(member: bool, req: ClusterRequest, h: &Handler, peer: SocketAddr) -> ClusterReply {
    let (dir, membership, store, replica) = (h.dir.as_path(), &h.membership, &h.store, &h.replica);
    match req {
        ClusterRequest::Enroll { secret, name } => enroll_request(h, peer, &secret, &name).await,
        _ if !member => ClusterReply::Refused("a cluster certificate is required".into()),
        ClusterRequest::Raft { to, .. } if to != 0 && to != membership.id() => {
            ClusterReply::Refused(format!("this address serves node {}, not node {to}", membership.id()))
        }
        ClusterRequest::Raft { msg, .. } => ClusterReply::Raft(membership.handle(*msg).await),
        ClusterRequest::Ping => ClusterReply::Pong {
            id: membership.id(),
            epoch: membership.view().epoch,
        },
        ClusterRequest::Stats => ClusterReply::Stats(node_stats(store, replica.get().map(|r| r.as_ref()))),
        ClusterRequest::Replica(call) => match replica.get() {
            Some(r) => ClusterReply::Replica(Box::new(r.handle(*call).await)),
            None => ClusterReply::Refused("this node is still starting".into()),
        },
        ClusterRequest::SetLogLevel { filter } => match h.log_level.get() {
            Some(set) => match set(&filter) {
                Ok(()) => {
                    info!(level = %filter, %peer, "log level changed (cluster-wide request)");
                    ClusterReply::Done
                }
                Err(e) => ClusterReply::Refused(e),
            },
            None => ClusterReply::Refused("this node is still starting".into()),
        },
        ClusterRequest::IssueCert { name } => match issue_here(dir, &name) {
            Ok(r) => {
                info!(%peer, %name, "issued a certificate for an enrollment through another seed");
                r
            }
            Err(e) => ClusterReply::Refused(format!("cannot issue a certificate: {e:#}")),
        },
        ClusterRequest::CaKey => {
            let view = membership.view();
            let voter = view
                .nodes
                .values()
                .any(|n| n.voter && n.addrs.cluster.parse::<SocketAddr>().ok() == Some(peer));
            if !voter {
                warn!(%peer, "CA key refused: the asking node is not a voter");
                return ClusterReply::Refused("the CA key is for voters only".into());
            }
            match std::fs::read_to_string(dir.join("ca.key")) {
                Ok(pem) if !pem.trim().is_empty() => ClusterReply::CaKey(pem),
                _ => ClusterReply::Refused("this node does not hold the CA key".into()),
            }
        }
        ClusterRequest::TakeLeadership => {
            let view = membership.view();
            let from_leader = membership
                .leader()
                .and_then(|l| view.node(l))
                .is_some_and(|n| n.addrs.cluster.parse::<SocketAddr>().ok() == Some(peer));
            let me = view.node(membership.id());
            if !from_leader || !me.is_some_and(|n| n.voter && n.state == NodeState::Up) {
                return ClusterReply::Refused("only the leader hands leadership to an up voter".into());
            }
            info!(%peer, "the leader is draining: calling an election");
            match membership.raft().trigger().elect().await {
                Ok(()) => ClusterReply::Done,
                Err(e) => ClusterReply::Refused(format!("cannot call an election: {e}")),
            }
        }
    }
}

/// A draining leader steps down: it stops sending heartbeats and standing
/// for election (openraft 0.9 cannot transfer leadership nor remove the
/// leader), and asks an up voter to call an election; the followers' leases
/// run out without heartbeats, so that voter (or another) wins, and the
/// new leader moves the vote away from the draining node. A node that is
/// up again stands for election again.
async fn step_down_if_draining(cluster: &Cluster, view: &membership::ClusterView, leading: bool) {
    let me = cluster.id();
    let draining = view.node(me).is_some_and(|n| n.state == NodeState::Draining);
    let raft = cluster.membership.raft();
    raft.runtime_config().elect(!draining);
    if !draining || !leading {
        raft.runtime_config().heartbeat(true);
        return;
    }
    let Some(target) = view
        .nodes
        .values()
        .filter(|n| n.id != me && n.voter && n.state == NodeState::Up)
        .min_by_key(|n| n.id)
    else {
        // No up voter to take over: stay leader (the voters are changed
        // first, by `desired_voters`, once learners are up).
        raft.runtime_config().heartbeat(true);
        return;
    };
    raft.runtime_config().heartbeat(false);
    info!(node = target.id, "draining: handing leadership over");
    match cluster
        .transport
        .request(&target.addrs.cluster, &ClusterRequest::TakeLeadership)
        .await
    {
        Ok(ClusterReply::Done) => {}
        other => {
            tracing::debug!(node = target.id, reply = ?other.err(), "leadership hand-over asked; the leases decide")
        }
    }
}

/// A new node asks to be admitted: throttled per source address, refused
/// outright when this node has no join secret, then the secret checked,
/// and the certificate issued here or, without the CA key, by a voter.
async fn enroll_request(h: &Handler, peer: SocketAddr, secret: &str, name: &str) -> ClusterReply {
    let allowed = h
        .joins
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .allow(peer.ip(), Instant::now());
    if !allowed {
        warn!(%peer, %name, "join refused: too many attempts from this address");
        return ClusterReply::Refused("too many join attempts from this address; try again later".into());
    }
    let Some(token) = join_secret(&h.dir) else {
        warn!(%peer, %name, "join refused: this node has no join secret (cluster/token missing, unreadable or empty)");
        return ClusterReply::Refused("this node cannot admit nodes (no join secret)".into());
    };
    let expected = JoinToken {
        ca_fingerprint: String::new(),
        secret: token,
    };
    if !expected.secret_matches(secret) {
        warn!(%peer, %name, "join refused: wrong join token");
        return ClusterReply::Refused("wrong join token".into());
    }
    if h.dir.join("ca.key").exists() {
        return match issue_here(&h.dir, name) {
            Ok(r) => {
                info!(%peer, %name, "admitted a new node");
                r
            }
            Err(e) => ClusterReply::Refused(format!("cannot issue a certificate: {e:#}")),
        };
    }
    let view = h.membership.view();
    let me = h.membership.id();
    for n in view.nodes.values().filter(|n| n.voter && n.id != me) {
        let req = ClusterRequest::IssueCert { name: name.to_owned() };
        match tokio::time::timeout(STATS_TIMEOUT * 10, h.transport.request(&n.addrs.cluster, &req)).await {
            Ok(Ok(r @ ClusterReply::Enrolled { .. })) => {
                info!(%peer, %name, issuer = n.id, "admitted a new node (certificate issued by a voter)");
                return r;
            }
            other => warn!(issuer = n.id, reply = ?other.map(|r| r.map(|_| ())), "voter did not issue a certificate"),
        }
    }
    ClusterReply::Refused("no member holding the CA key answered; try another seed".into())
}

/// Every voter holds the CA key (see the module docs): a voter without it
/// fetches it from another voter. Checked every few seconds.
async fn ca_key_duty(cluster: Cluster, dir: PathBuf, mut stop: watch::Receiver<bool>) {
    let me = cluster.id();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(CA_KEY_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let view = cluster.membership.view();
        if !view.node(me).is_some_and(|n| n.voter) || dir.join("ca.key").exists() {
            continue;
        }
        for n in view.nodes.values().filter(|n| n.voter && n.id != me) {
            let r = tokio::time::timeout(
                PING_TIMEOUT * 4,
                cluster.transport.request(&n.addrs.cluster, &ClusterRequest::CaKey),
            )
            .await;
            if let Ok(Ok(ClusterReply::CaKey(pem))) = r {
                // Keep it only if it is the key of this cluster's CA.
                let ca = std::fs::read(dir.join("ca.der")).unwrap_or_default();
                if !ClusterCa::key_matches(&ca, &pem) {
                    warn!(
                        from = n.id,
                        "the CA key received does not match this cluster's CA; ignored"
                    );
                    continue;
                }
                let tmp = dir.join("ca.key.new");
                if write_secret(&tmp, pem.trim()).is_ok() && std::fs::rename(&tmp, dir.join("ca.key")).is_ok() {
                    info!(from = n.id, "fetched the CA key (this node is a voter)");
                    break;
                }
                let _ = std::fs::remove_file(&tmp);
            }
        }
    }
}

/// The voters the cluster should have. Their number is odd, at most
/// `VOTERS_MAX`, and grows with the up nodes; it never shrinks because a
/// voter died: a down voter is replaced by an up learner when there is one,
/// and kept otherwise (shrinking on every failure and growing on every
/// restart would churn Raft's configuration for nothing: five voters with
/// one down still commit). The leader always votes.
pub fn desired_voters(leader: u64, current: &BTreeSet<u64>, up: &BTreeSet<u64>) -> BTreeSet<u64> {
    let odd = |n: usize| if n.is_multiple_of(2) { n.saturating_sub(1) } else { n };
    let grow_to = odd(up.len().clamp(1, VOTERS_MAX));
    let size = odd(current.len().max(grow_to).min(VOTERS_MAX)).max(1);
    let mut out = BTreeSet::from([leader]);
    let up_voters = current.iter().filter(|id| up.contains(id));
    let learners = up.iter().filter(|id| !current.contains(id));
    let down_voters = current.iter().filter(|id| !up.contains(id));
    for id in up_voters.chain(learners).chain(down_voters) {
        if out.len() >= size {
            break;
        }
        out.insert(*id);
    }
    out
}

/// Every node pings every other node (so that a newly elected leader
/// already knows who has been silent); the leader alone acts on it: marks
/// the silent nodes down and the answering ones up, and keeps the voter set
/// healthy and odd.
///
/// Verdicts are fenced three ways (a paused or partitioned leader once
/// committed stale ones through its successor): each carries the term it
/// was decided in and the state machine refuses it from any other term; a
/// node that did not run for a while (its own rounds stalled) restarts
/// every peer's timer instead of judging them by its own silence; and a
/// `Down` verdict is re-checked with one more ping right before it is
/// committed. The leader marks itself up if a stale verdict got through
/// before (it never pings itself).
async fn leader_duties(cluster: Cluster, failure_timeout: Duration, mut stop: watch::Receiver<bool>) {
    let me = cluster.id();
    let mut last_ok: HashMap<u64, Instant> = HashMap::new();
    let mut next_voter_check = Instant::now();
    // A gap between rounds longer than this means this node was not
    // running (SIGSTOP, a stalled VM or runtime), not that the others were.
    let stall = (failure_timeout / 2).max((PING_INTERVAL + PING_TIMEOUT) * 2);
    let mut last_round = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PING_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let view = cluster.membership.view();
        // A ping that gets through proves the node alive when it was sent.
        let round_start = Instant::now();
        if round_start.duration_since(last_round) > stall {
            warn!(
                stalled_ms = round_start.duration_since(last_round).as_millis() as u64,
                "this node did not run for a while; restarting the failure timers"
            );
            last_ok.values_mut().for_each(|t| *t = round_start);
        }
        let results = futures_join_all(
            view.nodes
                .values()
                .filter(|n| n.id != me)
                .map(|n| ping(&cluster, n.id, n.addrs.cluster.clone())),
        )
        .await;
        let now = Instant::now();
        last_round = now;
        note_majority(&cluster, &view, &results);
        last_ok.retain(|id, _| view.nodes.contains_key(id));
        let mut changes = Vec::new();
        for (id, ok) in results {
            // A node never heard from gets a full timeout from first sight.
            let seen = last_ok.entry(id).or_insert(round_start);
            if ok {
                *seen = round_start;
            }
            let Some(node) = view.node(id) else { continue };
            match (node.state, ok) {
                (NodeState::Up, false) if now.duration_since(*seen) >= failure_timeout => {
                    changes.push((id, NodeState::Down))
                }
                (NodeState::Down, true) => changes.push((id, NodeState::Up)),
                _ => {}
            }
        }
        let leading = cluster.membership.leading_term();
        step_down_if_draining(&cluster, &view, leading.is_some()).await;
        // Only a leader that is still a voter in the view acts (a removed
        // leader may run on briefly: it must not change anything).
        let Some(term) = leading else {
            continue;
        };
        if !view.node(me).is_some_and(|n| n.voter) {
            continue;
        }
        if view.node(me).is_some_and(|n| n.state == NodeState::Down) {
            changes.push((me, NodeState::Up));
        }
        for (id, state) in changes {
            if state == NodeState::Down {
                let addr = view.node(id).map(|n| n.addrs.cluster.clone()).unwrap_or_default();
                if ping(&cluster, id, addr).await.1 {
                    info!(
                        node = id,
                        "failure detector: answered the re-check; not marking it down"
                    );
                    last_ok.insert(id, Instant::now());
                    continue;
                }
            }
            info!(node = id, ?state, term, "failure detector: marking node");
            if let Err(e) = cluster.membership.set_node_verdict(id, state, term).await {
                warn!(node = id, error = %e, "cannot change node state");
            }
        }
        if now >= next_voter_check {
            next_voter_check = now + VOTER_INTERVAL;
            let view = cluster.membership.view();
            let current = view.voters();
            let up: BTreeSet<u64> = view
                .nodes
                .values()
                .filter(|n| n.state == NodeState::Up)
                .map(|n| n.id)
                .collect();
            let want = desired_voters(me, &current, &up);
            if want != current {
                info!(?current, ?want, "changing the raft voters");
                if let Err(e) = cluster.membership.change_membership(want).await {
                    warn!(error = %e, "cannot change the voters");
                }
            }
        }
    }
}

/// Notes whether the voters that answered this round (and this node, if it
/// votes) are a majority; says so in the log when that changes.
fn note_majority(cluster: &Cluster, view: &membership::ClusterView, results: &[(u64, bool)]) {
    use std::sync::atomic::Ordering;
    let me = cluster.id();
    let voters = view.voters();
    if voters.is_empty() {
        return;
    }
    let answered =
        results.iter().filter(|(id, ok)| *ok && voters.contains(id)).count() + usize::from(voters.contains(&me));
    let majority = answered * 2 > voters.len();
    let before = cluster.majority.swap(majority, Ordering::Relaxed);
    if before && !majority {
        warn!(
            answered,
            voters = voters.len(),
            "cannot reach a majority of the voters: the view and the directory cannot change here; serving mail by the last view"
        );
    } else if !before && majority {
        info!(
            answered,
            voters = voters.len(),
            "a majority of the voters is reachable again"
        );
    }
}

/// One ping within `PING_TIMEOUT`: whether node `id` answered.
fn ping(cluster: &Cluster, id: u64, addr: String) -> impl std::future::Future<Output = (u64, bool)> + Send + 'static {
    let t = cluster.transport.clone();
    async move {
        let r = tokio::time::timeout(PING_TIMEOUT, t.request(&addr, &ClusterRequest::Ping)).await;
        let ok = matches!(r, Ok(Ok(ClusterReply::Pong { id: who, .. })) if who == id);
        if !ok {
            // Maybe a stale connection to a restarted peer: start afresh.
            t.forget(&addr);
        }
        (id, ok)
    }
}

/// Runs futures concurrently and collects their outputs (no extra crate).
async fn futures_join_all<F: std::future::Future + Send + 'static>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// This node's figures for `cluster status`.
pub fn node_stats(store: &replication::FragmentStore, replica: Option<&dyn ReplicaService>) -> NodeStats {
    let s = store.stats();
    let (repair_pending, repairs_copied) = replica.map_or((0, 0), |r| r.repair_progress());
    NodeStats {
        messages: s.entries,
        bytes: s.body_bytes,
        under_replicated: replica.map_or(0, |r| r.under_replicated()),
        repair_pending,
        repairs_copied,
        queued: (0..crate::queue::SHARDS)
            .map(|k| store.size(&crate::queue::shard_mailbox(k)).0)
            .sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::{JOIN_ATTEMPTS_PER_WINDOW, JOIN_SOURCES_MAX, JOIN_WINDOW, JoinLimiter, desired_voters, join_secret};
    use std::collections::BTreeSet;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::Instant;

    #[test]
    fn join_secret_is_none_when_missing_unreadable_or_empty() {
        let dir = testkit::TempDir::new("join-secret").unwrap();
        assert_eq!(join_secret(dir.path()), None, "missing");
        std::fs::write(dir.path().join("token"), " \n").unwrap();
        assert_eq!(join_secret(dir.path()), None, "empty");
        std::fs::write(dir.path().join("token"), [0xff, 0xfe]).unwrap();
        assert_eq!(join_secret(dir.path()), None, "not UTF-8");
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        assert_eq!(join_secret(dir.path()).as_deref(), Some("s3cret"));
    }

    #[test]
    fn join_attempts_are_limited_per_address_with_bounded_memory() {
        let mut l = JoinLimiter::default();
        let t0 = Instant::now();
        let a = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
        for _ in 0..JOIN_ATTEMPTS_PER_WINDOW {
            assert!(l.allow(a, t0));
        }
        assert!(!l.allow(a, t0), "over the limit");
        assert!(
            l.allow(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)), t0),
            "others unaffected"
        );
        assert!(l.allow(a, t0 + JOIN_WINDOW), "a new window");
        // Many addresses: full means refused (fail closed) until windows end.
        for i in 0..JOIN_SOURCES_MAX as u32 {
            l.allow(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), t0);
        }
        assert!(l.seen.len() <= JOIN_SOURCES_MAX);
        assert!(!l.allow(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), t0 + JOIN_WINDOW / 2));
        assert!(l.allow(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), t0 + JOIN_WINDOW * 2));
        assert!(l.seen.len() <= JOIN_SOURCES_MAX);
    }

    fn s(ids: &[u64]) -> BTreeSet<u64> {
        ids.iter().copied().collect()
    }

    #[test]
    fn voters_stay_odd_and_healthy() {
        // One node: itself.
        assert_eq!(desired_voters(1, &s(&[1]), &s(&[1])), s(&[1]));
        // Two up nodes: one voter.
        assert_eq!(desired_voters(1, &s(&[1]), &s(&[1, 2])), s(&[1]));
        // Three: all vote.
        assert_eq!(desired_voters(1, &s(&[1]), &s(&[1, 2, 3])), s(&[1, 2, 3]));
        // Six up: five voters, keeping current ones first.
        assert_eq!(
            desired_voters(4, &s(&[4, 5, 6]), &s(&[1, 2, 3, 4, 5, 6])),
            s(&[1, 2, 4, 5, 6])
        );
        // A down voter is replaced by an up learner.
        assert_eq!(desired_voters(1, &s(&[1, 2, 3]), &s(&[1, 2, 4])), s(&[1, 2, 4]));
        // Five voters, one dies, no learner to take its place: keep five.
        assert_eq!(
            desired_voters(1, &s(&[1, 2, 3, 4, 5]), &s(&[1, 2, 3, 4])),
            s(&[1, 2, 3, 4, 5])
        );
        // ... with a learner up: it replaces the dead voter.
        assert_eq!(
            desired_voters(1, &s(&[1, 2, 3, 4, 5]), &s(&[1, 2, 3, 4, 6])),
            s(&[1, 2, 3, 4, 6])
        );
        // Three voters, one down, nothing else: unchanged.
        assert_eq!(desired_voters(1, &s(&[1, 2, 3]), &s(&[1, 2])), s(&[1, 2, 3]));
    }
}
