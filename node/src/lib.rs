//! The Quill node: the `quill` binary and everything that touches sockets.
//!
//! Owns the protocol front ends (SMTP, LMTP, POP3), the admin HTTP API and
//! the wiring of one node ([`run`]): it opens the fragment store
//! (replication) and the directory (membership), binds the listeners and
//! runs one task per connection.
//!
//! What it must not do: decide placement or membership itself, or keep mail
//! anywhere but in the fragment store. Only this crate opens sockets.
//!
//! # Backpressure
//! A semaphore caps connections per node and a counter caps them per client
//! address; both answer with a protocol error before closing. Every line read
//! is bounded and has an idle deadline. Store writes wait for room in the
//! store's bounded queue.
//!
//! # Shutdown
//! [`run`] takes a future; when it resolves, a watch channel tells every
//! listener and session, sessions answer `421`/`-ERR` and end, [`run`] waits
//! for all of them (bounded by `SHUTDOWN_GRACE`), then closes the store.

pub mod admin;
pub mod admin_client;
pub mod cluster;
pub mod conn;
pub mod data;
#[doc(hidden)]
pub mod fuzz;
pub mod imap;
pub mod imap_folders;
pub mod imap_mime;
pub mod mail;
pub mod metrics;
pub mod outbound;
pub mod pop3;
pub mod queue;
pub mod replica;
pub mod rpc;
pub mod services;
pub mod session;
pub mod slots;
pub mod smtp;
pub mod time;
pub mod tls;
pub mod uids;
pub mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use membership::Directory;
use replication::replica::{ReplicaConfig, Replicator};
use replication::{FragmentStore, StoreConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

pub use services::Limits;
use services::{Services, bump};

/// How long sessions get to finish after shutdown is asked for.
/// How recently a queue owner must have been in touch with a majority.
const OWNER_QUORUM_WITHIN: Duration = Duration::from_secs(3);
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often the log cleaner looks for a segment worth cleaning.
const COMPACT_INTERVAL: Duration = Duration::from_secs(30);

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub name: String,
    pub cluster_addr: SocketAddr,
    pub smtp: Option<SocketAddr>,
    pub submission: Option<SocketAddr>,
    pub lmtp: Option<SocketAddr>,
    pub pop3: Option<SocketAddr>,
    /// Implicit-TLS SMTP (RFC 8314, port 465).
    pub smtps: Option<SocketAddr>,
    /// Implicit-TLS POP3 (port 995).
    pub pop3s: Option<SocketAddr>,
    pub imap: Option<SocketAddr>,
    /// Implicit-TLS IMAP (port 993).
    pub imaps: Option<SocketAddr>,
    /// Certificate and key files (`--tls-cert`/`--tls-key`); none: a
    /// self-signed certificate made in the data directory.
    pub tls_files: Vec<tls::FilePair>,
    /// Where passwords may be sent without TLS.
    pub plaintext_auth: services::PlaintextAuth,
    pub admin: Option<SocketAddr>,
    /// The admin token; made and saved in the data directory if not given.
    pub admin_token: Option<String>,
    /// Members to join through; none: found a new cluster.
    pub seeds: Vec<SocketAddr>,
    /// First node: the join secret; joining node: the full join token.
    pub join_token: Option<String>,
    /// A node silent this long is marked down by the leader.
    pub failure_timeout: Duration,
    /// Domain appended to logins that have none.
    pub default_login_domain: Option<String>,
    /// Where postmaster mail goes for domains without a postmaster user.
    pub postmaster: Option<String>,
    pub limits: Limits,
    /// Copies of each message (R).
    pub replicas: usize,
    /// How long a node may be down before its copies are made elsewhere.
    pub repair_grace: Duration,
    /// Bytes per second of repair and move traffic this node sends.
    pub repair_rate: u64,
    /// Outbound delivery (relay host, DNS, retries, queue bounds).
    pub outbound: outbound::OutboundConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Smtp,
    Submission,
    Lmtp,
    Pop3,
    Smtps,
    Pop3s,
    Imap,
    Imaps,
}

impl Proto {
    fn implicit_tls(self) -> bool {
        matches!(self, Proto::Smtps | Proto::Pop3s | Proto::Imaps)
    }
}

/// Reads 32 random bytes from the kernel.
pub fn random_bytes() -> std::io::Result<[u8; 32]> {
    use std::io::Read;
    let mut out = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut out)?;
    Ok(out)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The admin token: the one given, else the one saved in the data directory,
/// else a new random one saved there (mode 0600).
fn admin_token(config: &NodeConfig) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = config.data_dir.join("admin-token");
    if let Some(t) = &config.admin_token {
        return Ok(t.clone());
    }
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_owned());
    }
    let token = hex(&random_bytes()?);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::io::Write::write_all(&mut f, format!("{token}\n").as_bytes())?;
    f.sync_all()?;
    println!("admin token created: {}", path.display());
    Ok(token)
}

/// How long a starting node waits to catch up with the cluster's view
/// before it serves clients anyway.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(10);

/// Runs a node until `shutdown` resolves. Binds every listener before it
/// reports ready, so an address in use is an error at start, not later.
pub async fn run(
    config: NodeConfig,
    set_log_level: admin::LogLevelSetter,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    // Private, also when made by an earlier version or by hand (the binary
    // sets umask 077 for everything it creates below).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot make {} private", config.data_dir.display()))?;
    }
    let store_dir = config.data_dir.join("store");
    let store = tokio::task::spawn_blocking(move || FragmentStore::open(StoreConfig::new(store_dir)))
        .await?
        .context("cannot open the fragment store")?;
    let store = Arc::new(store);
    let token = admin_token(&config)?;
    // A bad certificate pair fails the start, with its reason.
    let ips: Vec<std::net::IpAddr> = [
        config.smtp,
        config.submission,
        config.lmtp,
        config.pop3,
        config.smtps,
        config.pop3s,
        config.imap,
        config.imaps,
    ]
    .into_iter()
    .flatten()
    .map(|a| a.ip())
    .filter(|ip| !ip.is_unspecified())
    .collect();
    let tls = tls::Tls::load(config.tls_files.clone(), &config.data_dir, &config.name, &ips)?;
    let (stop_tx, stop_rx) = watch::channel(false);

    // Bind every listener first: an address in use fails the start, and the
    // view records the addresses actually bound.
    let mut addrs = admin::Addrs {
        cluster: Some(config.cluster_addr),
        ..Default::default()
    };
    let mut listeners = Vec::new();
    for (addr, proto) in [
        (config.smtp, Proto::Smtp),
        (config.submission, Proto::Submission),
        (config.lmtp, Proto::Lmtp),
        (config.pop3, Proto::Pop3),
        (config.smtps, Proto::Smtps),
        (config.pop3s, Proto::Pop3s),
        (config.imap, Proto::Imap),
        (config.imaps, Proto::Imaps),
    ] {
        let Some(addr) = addr else { continue };
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} ({proto:?})"))?;
        let bound = listener.local_addr()?;
        match proto {
            Proto::Smtp => addrs.smtp = Some(bound),
            Proto::Submission => addrs.submission = Some(bound),
            Proto::Lmtp => addrs.lmtp = Some(bound),
            Proto::Pop3 => addrs.pop3 = Some(bound),
            Proto::Smtps => addrs.smtps = Some(bound),
            Proto::Pop3s => addrs.pop3s = Some(bound),
            Proto::Imap => addrs.imap = Some(bound),
            Proto::Imaps => addrs.imaps = Some(bound),
        }
        info!(addr = %bound, ?proto, "listening");
        listeners.push((listener, proto));
    }
    let admin_listener = match config.admin {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (admin)"))?;
            addrs.admin = Some(l.local_addr()?);
            Some(l)
        }
        None => None,
    };

    let s = |a: Option<SocketAddr>| a.map(|a| a.to_string());
    let cluster = cluster::Cluster::start(
        cluster::ClusterConfig {
            data_dir: config.data_dir.clone(),
            name: config.name.clone(),
            cluster_addr: config.cluster_addr,
            seeds: config.seeds.clone(),
            join_token: config.join_token.clone(),
            failure_timeout: config.failure_timeout,
            addrs: membership::NodeAddrs {
                cluster: config.cluster_addr.to_string(),
                smtp: s(addrs.smtp),
                submission: s(addrs.submission),
                lmtp: s(addrs.lmtp),
                pop3: s(addrs.pop3),
                imap: s(addrs.imap),
                imaps: s(addrs.imaps),
                admin: s(addrs.admin),
                smtps: s(addrs.smtps),
                pop3s: s(addrs.pop3s),
                inbound_only: !config.outbound.works_queue,
            },
        },
        store.clone(),
        stop_rx.clone(),
    )
    .await
    .context("cannot take this node's place in the cluster")?;
    let directory: Arc<dyn Directory> = Arc::new(cluster.membership.directory());
    let mut replica_cfg = ReplicaConfig::new(config.data_dir.join("updates"));
    replica_cfg.replicas = config.replicas.max(1);
    replica_cfg.repair_grace = config.repair_grace;
    let replica = Arc::new(Replicator::new(
        cluster.id(),
        store.clone(),
        replica::QuicNet {
            transport: cluster.transport.clone(),
            membership: cluster.membership.clone(),
        },
        replica_cfg,
    )?);
    // Place mail by the current view from the first message on.
    if let Some(v) = replica::placement_view(&cluster.membership).await {
        replica.set_view(v);
    }
    let _ = cluster.replica.set(replica.clone() as Arc<dyn rpc::ReplicaService>);
    let _ = cluster.log_level.set(set_log_level.clone());
    let mut services = Services::new(
        config.name.clone(),
        store.clone(),
        replica.clone() as Arc<dyn mail::Mail>,
        directory,
        config.limits.clone(),
        random_bytes()?,
    );
    services.default_login_domain = config.default_login_domain.clone();
    services.postmaster = config.postmaster.clone();
    services.tls = Some(tls.clone());
    services.plaintext_auth = config.plaintext_auth;
    services.uids = Arc::new(uids::RaftUids::new(cluster.membership.clone()));
    services.queue_bounds = (config.outbound.max_messages, config.outbound.max_bytes);
    let services = Arc::new(services);
    let owner: outbound::Owner = {
        let (membership, me) = (cluster.membership.clone(), cluster.id());
        // Fenced: a node out of touch with a majority (a partition's
        // minority side) works no shard, while the majority's view gives
        // its shards to others.
        Arc::new(move |shard: &str| {
            membership.in_quorum(OWNER_QUORUM_WITHIN) && outbound::owner_of(&membership.view(), shard) == Some(me)
        })
    };
    let outbound = outbound::Outbound::new(services.clone(), config.outbound.clone(), owner)
        .context("cannot set up outbound delivery (DNS resolver)")?;

    let mut tasks = JoinSet::new();
    tasks.spawn(outbound.run(stop_rx.clone()));
    tasks.spawn(tls.clone().watch_files(stop_rx.clone()));
    tasks.spawn(tls::watch_cluster(
        tls.certs.clone(),
        cluster.membership.clone(),
        stop_rx.clone(),
    ));
    tasks.spawn(replica::duties(
        replica.clone(),
        cluster.membership.clone(),
        config.repair_rate,
        stop_rx.clone(),
    ));
    if let Some(listener) = admin_listener {
        info!(addr = %addrs.admin.expect("bound"), "admin API listening");
        let state = admin::AdminState {
            services: services.clone(),
            replica: replica.clone(),
            token: Arc::new(token),
            cluster: cluster.clone(),
            name: config.name.clone(),
            addrs: addrs.clone(),
            set_log_level,
        };
        tasks.spawn(admin::serve(listener, admin::router(state), stop_rx.clone()));
    }
    {
        let store = store.clone();
        let mut stop = stop_rx.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(COMPACT_INTERVAL) => {}
                    _ = stop.changed() => return,
                }
                // Clean as many segments as are worth it, one at a time.
                loop {
                    match store.compact_once().await {
                        Ok(Some(_)) => continue,
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "log cleaner failed");
                            break;
                        }
                    }
                }
            }
        });
    }
    // Clients are served by the cluster's current view, not by the one
    // this node may have died with (bounded: a cluster without a quorum
    // still gets served).
    if cluster.catch_up(CATCH_UP_DEADLINE).await
        && replica
            .wait_for_view(cluster.membership.view().epoch, CATCH_UP_DEADLINE)
            .await
    {
        info!(
            epoch = cluster.membership.view().epoch,
            "caught up with the cluster's view"
        );
    }
    for (listener, proto) in listeners {
        tasks.spawn(accept_loop(listener, proto, services.clone(), stop_rx.clone()));
    }
    info!(name = %config.name, data = %config.data_dir.display(), "quill node ready");
    println!(
        "quill node ready: {}",
        serde_json::to_string(&addrs).unwrap_or_default()
    );

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        warn!("sessions still open after the grace period; aborting them");
        tasks.abort_all();
    }
    cluster.shutdown().await;
    tokio::task::spawn_blocking(move || store.close()).await?;
    info!("stopped");
    Ok(())
}

async fn accept_loop(listener: TcpListener, proto: Proto, services: Arc<Services>, mut stop: watch::Receiver<bool>) {
    let mut sessions = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let slot = match services.slots.acquire(peer.ip(), std::time::Instant::now()) {
            Ok(slot) => slot,
            Err(why) => {
                bump(&services.metrics.connections_refused);
                tracing::debug!(%peer, ?why, "connection refused: no slot");
                sessions.spawn(refuse(stream, proto));
                continue;
            }
        };
        let services = services.clone();
        let stream = slots::Tracked::new(stream, &services.slots, &slot);
        sessions.spawn(async move {
            let stop = slot.close.clone();
            let _held = slot;
            let stream = if proto.implicit_tls() {
                // The handshake first, within its deadline, holding the slot.
                let Some(tls) = services.tls.clone() else { return };
                match tokio::time::timeout(tls::handshake_deadline(&services.limits), tls.acceptor.accept(stream)).await
                {
                    Ok(Ok(t)) => {
                        bump(&services.metrics.tls_handshakes);
                        session::Stream::Tls(Box::new(t))
                    }
                    Ok(Err(e)) => {
                        bump(&services.metrics.tls_handshake_failures);
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        bump(&services.metrics.tls_handshake_failures);
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                }
            } else {
                session::Stream::Plain(stream)
            };
            match proto {
                Proto::Smtp | Proto::Smtps => {
                    bump(&services.metrics.smtp_sessions);
                    smtp::serve_on(stream, peer, services, smtp::Mode::Smtp, stop).await
                }
                Proto::Submission => {
                    bump(&services.metrics.smtp_sessions);
                    smtp::serve_on(stream, peer, services, smtp::Mode::Submission, stop).await
                }
                Proto::Lmtp => {
                    bump(&services.metrics.lmtp_sessions);
                    smtp::serve_on(stream, peer, services, smtp::Mode::Lmtp, stop).await
                }
                Proto::Pop3 | Proto::Pop3s => pop3::serve_on(stream, peer, services, stop).await,
                Proto::Imap | Proto::Imaps => {
                    bump(&services.metrics.imap_sessions);
                    imap::serve_on(stream, peer, services, stop, Some(fd)).await
                }
            }
        });
    }
    // The node stops: every session of every listener is told.
    services.slots.close_all();
    while sessions.join_next().await.is_some() {}
}

/// Tells a client it is one connection too many, then closes.
async fn refuse(mut stream: TcpStream, proto: Proto) {
    use tokio::io::AsyncWriteExt;
    let text: &[u8] = match proto {
        Proto::Smtp | Proto::Submission | Proto::Lmtp => b"421 4.7.0 Too many connections, try again later\r\n",
        Proto::Pop3 => b"-ERR [SYS/TEMP] too many connections, try again later\r\n",
        Proto::Imap => b"* BYE [UNAVAILABLE] too many connections, try again later\r\n",
        // A TLS client cannot read plaintext: just close.
        Proto::Smtps | Proto::Pop3s | Proto::Imaps => b"",
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(text)).await;
    let _ = stream.shutdown().await;
}
