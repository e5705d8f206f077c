//! The wiring of one node: opens the store, takes the node's place in the
//! cluster, builds the replicator and the services, binds every listener
//! (from one table), runs the background duties and the sessions, and
//! stops them all on one signal.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use membership::Directory;
use replication::replica::{ReplicaConfig, Replicator};
use replication::{FragmentStore, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::admin::{self, Addrs, AdminState};
use crate::cluster::{self, replica};
use crate::metrics::{RaftFigures, ReplicaFigures, StoreFigures};
use crate::net::{self, Client, Proto};
use crate::services::{Limits, Options, Parts, Services};
use crate::{files, mail, outbound, tls, uids};

/// How recently a queue owner must have been in touch with a majority.
const OWNER_QUORUM_WITHIN: Duration = Duration::from_secs(3);
/// How long sessions get to finish after shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often the log cleaner looks for a segment worth cleaning.
const COMPACT_INTERVAL: Duration = Duration::from_secs(30);
/// How long a starting node waits to catch up with the cluster's view
/// before it serves clients anyway.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(10);

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
    /// ManageSieve (RFC 5804, port 4190).
    pub managesieve: Option<SocketAddr>,
    /// The cluster settings this node was given a flag for: its own value
    /// holds over the cluster's (`crate::settings`).
    pub explicit_settings: std::collections::BTreeSet<String>,
    pub imap: Option<SocketAddr>,
    /// Implicit-TLS IMAP (port 993).
    pub imaps: Option<SocketAddr>,
    /// Certificate and key files (`--tls-cert`/`--tls-key`); none: a
    /// self-signed certificate made in the data directory.
    pub tls_files: Vec<tls::FilePair>,
    pub admin: Option<SocketAddr>,
    /// The admin token; made and saved in the data directory if not given.
    pub admin_token: Option<String>,
    /// Members to join through; none: found a new cluster.
    pub seeds: Vec<SocketAddr>,
    /// First node: the join secret; joining node: the full join token.
    pub join_token: Option<String>,
    /// A node silent this long is marked down by the leader.
    pub failure_timeout: Duration,
    /// Ring neighbours each node pings (the failure detector).
    pub watchers: usize,
    /// Who raises the cluster's feature level once every node supports more.
    pub upgrade_finish: crate::cluster::levels::UpgradeFinish,
    /// Domain appended to logins that have none.
    pub default_login_domain: Option<String>,
    /// Where postmaster mail goes for domains without a postmaster user.
    pub postmaster: Option<String>,
    /// The DNS server to ask (the system's resolv.conf without).
    pub dns: Option<SocketAddr>,
    /// The node's name for the outside world (`--hostname`; `name` without).
    pub hostname: Option<String>,
    /// The checks of mail arriving on `--smtp`.
    pub mail_auth: crate::edge::MailAuthConfig,
    /// Blocklists, DNS blocklists, greylisting (`crate::edge`).
    pub edge: crate::edge::EdgeOptions,
    /// The limits and policies a cluster setting may change (the node's
    /// flags, defaults filled in).
    pub limits: Limits,
    /// Copies of each message (R).
    pub replicas: usize,
    /// Outbound delivery (relay host, concurrency).
    pub outbound: outbound::OutboundConfig,
}

impl NodeConfig {
    /// The client listeners asked for, one row a protocol.
    fn listeners(&self) -> Vec<(Proto, SocketAddr)> {
        [
            (Proto::Smtp, self.smtp),
            (Proto::Submission, self.submission),
            (Proto::Lmtp, self.lmtp),
            (Proto::Pop3, self.pop3),
            (Proto::Smtps, self.smtps),
            (Proto::Pop3s, self.pop3s),
            (Proto::Imap, self.imap),
            (Proto::Imaps, self.imaps),
            (Proto::ManageSieve, self.managesieve),
        ]
        .into_iter()
        .filter_map(|(p, a)| a.map(|a| (p, a)))
        .collect()
    }
}

impl Addrs {
    fn set(&mut self, proto: Proto, addr: SocketAddr) {
        let slot = match proto {
            Proto::Smtp => &mut self.smtp,
            Proto::Submission => &mut self.submission,
            Proto::Lmtp => &mut self.lmtp,
            Proto::Pop3 => &mut self.pop3,
            Proto::Smtps => &mut self.smtps,
            Proto::Pop3s => &mut self.pop3s,
            Proto::Imap => &mut self.imap,
            Proto::Imaps => &mut self.imaps,
            // Not in the view's addresses (a frozen layout): the flag says
            // where it is.
            Proto::ManageSieve => return,
        };
        *slot = Some(addr);
    }
}

/// The admin token: the one given, else the one saved in the data directory,
/// else a new random one saved there (mode 0600).
fn admin_token(config: &NodeConfig) -> anyhow::Result<String> {
    let path = config.data_dir.join("admin-token");
    if let Some(t) = &config.admin_token {
        return Ok(t.clone());
    }
    if let Ok(t) = std::fs::read_to_string(&path) {
        return Ok(t.trim().to_owned());
    }
    let token = files::hex(&files::random_bytes()?);
    files::write_secret(&path, &token)?;
    println!("admin token created: {}", path.display());
    Ok(token)
}

/// How often a node looks for a change of the cluster settings (a change
/// is in force on every node within about this long of its commit).
const SETTINGS_POLL: Duration = Duration::from_millis(250);

/// What a settings change reaches besides the services' limits.
struct Applied {
    replica: Arc<replica::NodeReplicator>,
    repair_limit: Arc<replication::replica::RateLimit>,
}

/// Keeps the limits in force equal to the node's flags with the cluster's
/// settings over them (`crate::settings`), from start to shutdown.
async fn apply_settings(
    services: Arc<Services>,
    also: Applied,
    membership: membership::Membership,
    flags: Limits,
    explicit: std::collections::BTreeSet<String>,
    mut stop: watch::Receiver<bool>,
) {
    let mut seen = None;
    loop {
        let version = membership.settings_version();
        if seen != Some(version) {
            let settings = membership.settings();
            let now = crate::settings::effective(&flags, &explicit, &settings.values);
            services.slots.set_per_address_max(now.connections_per_address_max);
            also.replica.set_repair_grace(now.repair_grace);
            also.repair_limit.set_rate(now.repair_rate);
            services.live.set(now);
            if seen.is_some() {
                info!(version, "cluster settings applied");
            }
            seen = Some(version);
        }
        tokio::select! {
            _ = tokio::time::sleep(SETTINGS_POLL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Serves one client connection with its protocol.
async fn serve_client(proto: Proto, c: Client, services: Arc<Services>) {
    use crate::{imap, managesieve, pop3, smtp};
    match proto {
        Proto::Smtp => smtp::serve_on(c.stream, c.peer, services, smtp::Mode::Smtp, c.stop).await,
        // RFC 8314: port 465 is message submission over implicit TLS
        // (AUTH required); mail between servers uses STARTTLS on 25.
        Proto::Submission | Proto::Smtps => {
            smtp::serve_on(c.stream, c.peer, services, smtp::Mode::Submission, c.stop).await
        }
        Proto::Lmtp => smtp::serve_on(c.stream, c.peer, services, smtp::Mode::Lmtp, c.stop).await,
        Proto::Pop3 | Proto::Pop3s => pop3::serve_on(c.stream, c.peer, services, c.stop).await,
        Proto::Imap | Proto::Imaps => imap::serve_on(c.stream, c.peer, services, c.stop).await,
        Proto::ManageSieve => managesieve::serve_on(c.stream, c.peer, services, c.stop).await,
    }
}

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
    let table = config.listeners();
    let ips: Vec<std::net::IpAddr> = table
        .iter()
        .map(|(_, a)| a.ip())
        .filter(|ip| !ip.is_unspecified())
        .collect();
    let tls = tls::Tls::load(config.tls_files.clone(), &config.data_dir, &config.name, &ips)?;
    let (stop_tx, stop_rx) = watch::channel(false);

    // Bind every listener first: an address in use fails the start, and the
    // view records the addresses actually bound.
    let mut addrs = Addrs {
        cluster: Some(config.cluster_addr),
        ..Default::default()
    };
    let listeners = net::bind(&table).await?;
    for l in &listeners {
        addrs.set(l.proto, l.addr);
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
            watchers: config.watchers,
            upgrade_finish: config.upgrade_finish,
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
    replica_cfg.repair_grace = config.limits.repair_grace;
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
    let _ = cluster
        .replica
        .set(replica.clone() as Arc<dyn cluster::rpc::ReplicaService>);
    let _ = cluster.log_level.set(set_log_level.clone());
    let services = Arc::new(Services::new(Parts {
        hostname: config.hostname.clone().unwrap_or_else(|| config.name.clone()),
        store: store.clone(),
        mail: replica.clone() as Arc<dyn mail::Mail>,
        uids: Arc::new(uids::RaftUids::new(cluster.membership.clone())),
        directory,
        limits: config.limits.clone(),
        tls: Some(tls.clone()),
        auth_key: files::random_bytes()?,
        options: Options {
            default_login_domain: config.default_login_domain.clone(),
            postmaster: config.postmaster.clone(),
            dns: config.dns,
            mail_auth: Some(config.mail_auth.clone()),
            edge: config.edge.clone(),
            metric_sources: vec![
                Box::new(StoreFigures(store.clone())),
                Box::new(ReplicaFigures(replica.clone())),
                Box::new(RaftFigures(cluster.membership.clone())),
            ],
        },
    }));
    let _ = cluster
        .queries
        .set(admin::query_handler(services.clone(), config.name.clone()));

    let owner: outbound::Owner = {
        let (membership, me) = (cluster.membership.clone(), cluster.id());
        // Fenced: a node out of touch with a majority (a partition's
        // minority side) works no shard, while the majority's view gives
        // its shards to others.
        Arc::new(move |shard: &str| {
            membership.in_quorum(OWNER_QUORUM_WITHIN) && outbound::owner_of(&membership.view(), shard) == Some(me)
        })
    };
    let dkim = Arc::new(crate::dkim::Signer::new(Arc::new(cluster.membership.clone())));
    let outbound = outbound::Outbound::new(services.clone(), config.outbound.clone(), owner, dkim)
        .context("cannot set up outbound delivery (DNS resolver)")?;

    let mut tasks = JoinSet::new();
    tasks.spawn(outbound.run(stop_rx.clone()));
    tasks.spawn(tls.clone().watch_files(stop_rx.clone()));
    tasks.spawn(tls::watch_cluster(
        tls.certs.clone(),
        cluster.membership.clone(),
        stop_rx.clone(),
    ));
    let repair_limit = Arc::new(replication::replica::RateLimit::new(config.limits.repair_rate));
    tasks.spawn(replica::duties(
        replica.clone(),
        cluster.membership.clone(),
        repair_limit.clone(),
        stop_rx.clone(),
    ));
    tasks.spawn(apply_settings(
        services.clone(),
        Applied {
            replica: replica.clone(),
            repair_limit,
        },
        cluster.membership.clone(),
        config.limits.clone(),
        config.explicit_settings.clone(),
        stop_rx.clone(),
    ));
    if let Some(listener) = admin_listener {
        info!(addr = %addrs.admin.expect("bound"), "admin API listening");
        let state = AdminState {
            services: services.clone(),
            replica: replica.clone(),
            token: Arc::new(token),
            cluster: cluster.clone(),
            name: config.name.clone(),
            set_log_level,
            flags: Arc::new(config.limits.clone()),
            explicit_settings: Arc::new(config.explicit_settings.clone()),
        };
        tasks.spawn(admin::serve(listener, admin::router(state), stop_rx.clone()));
    }
    tasks.spawn(clean_log(store.clone(), stop_rx.clone()));
    tasks.spawn(crate::edge::blocklist::follow(
        services.edge.lists.clone(),
        cluster.membership.clone(),
        stop_rx.clone(),
    ));
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
    crate::edge::blocklist::refresh(&services.edge.lists, &cluster.membership).await;
    for l in listeners {
        let serve = {
            let services = services.clone();
            move |proto, c| serve_client(proto, c, services.clone())
        };
        tasks.spawn(net::serve_clients(
            l,
            services.env(),
            services.slots.clone(),
            stop_rx.clone(),
            serve,
        ));
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

/// The log cleaner: as many segments as are worth it, one at a time,
/// every [`COMPACT_INTERVAL`].
async fn clean_log(store: Arc<FragmentStore>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(COMPACT_INTERVAL) => {}
            _ = stop.changed() => return,
        }
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
}
