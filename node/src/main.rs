//! `quill`: run a node, or administer one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hyper::Method;
use quill_node::admin_client::{call, path_segment};
use quill_node::{Limits, NodeConfig};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt, reload, util::SubscriberInitExt};

#[derive(Parser)]
#[command(
    name = "quill",
    version,
    about = "Quill: a clustered mail service (SMTP, LMTP, POP3; STARTTLS and implicit TLS)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node in the foreground until SIGINT or SIGTERM.
    Node(Box<NodeArgs>),
    /// Talk to a running node's admin API.
    Admin(AdminArgs),
}

#[derive(Args)]
struct NodeArgs {
    /// Data directory (store, directory, tokens). Created if missing.
    #[arg(long)]
    data: PathBuf,
    /// Address for node-to-node traffic (QUIC, UDP).
    #[arg(long)]
    cluster_addr: SocketAddr,
    /// Cluster address of an existing member to join through (repeatable).
    /// Without it, the first start founds a new cluster.
    #[arg(long)]
    seed: Vec<SocketAddr>,
    /// Founding node: the secret the cluster's join token is made from
    /// [default: random]; the full token is written to DATA/join-token.
    /// Joining node: that full token (quill1.<ca fingerprint>.<secret>).
    #[arg(long, env = "QUILL_JOIN_TOKEN")]
    join_token: Option<String>,
    /// Milliseconds without an answer after which the leader marks a node down.
    #[arg(long, default_value_t = 2000)]
    failure_timeout_ms: u64,
    /// Node name shown in status and in Received headers [default: quill-<cluster address>].
    #[arg(long)]
    name: Option<String>,
    #[arg(long)]
    smtp: Option<SocketAddr>,
    /// Mail submission address (RFC 6409, port 587 by convention): AUTH
    /// required; mail for other domains goes to the outbound queue.
    #[arg(long)]
    submission: Option<SocketAddr>,
    #[arg(long)]
    lmtp: Option<SocketAddr>,
    #[arg(long)]
    pop3: Option<SocketAddr>,
    /// IMAP address (port 143 by convention; STARTTLS offered).
    #[arg(long)]
    imap: Option<SocketAddr>,
    /// Implicit-TLS IMAP address (port 993 by convention).
    #[arg(long)]
    imaps: Option<SocketAddr>,
    /// Implicit-TLS SMTP address (RFC 8314; port 465 by convention).
    #[arg(long)]
    smtps: Option<SocketAddr>,
    /// Implicit-TLS POP3 address (port 995 by convention).
    #[arg(long)]
    pop3s: Option<SocketAddr>,
    /// TLS certificate chain, PEM (repeatable, each with its --tls-key; the
    /// client's SNI chooses, the first is the default). Re-read when the
    /// file changes; a bad pair is refused and the one before kept.
    /// Without any: a self-signed certificate kept in DATA/tls-self-signed.crt.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Vec<PathBuf>,
    /// The private key of the --tls-cert at the same position, PEM.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Vec<PathBuf>,
    /// Where passwords (POP3 USER/PASS, AUTH) may be sent without TLS:
    /// loopback (only from loopback clients), never, or always.
    #[arg(long, value_enum, default_value = "loopback")]
    plaintext_auth: quill_node::services::PlaintextAuth,
    /// Admin HTTP API address.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Admin API token [default: read from, or created in, DATA/admin-token].
    #[arg(long, env = "QUILL_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Domain appended to POP3 logins given without one (`user` -> `user@DOMAIN`).
    #[arg(long)]
    default_login_domain: Option<String>,
    /// Mailbox that takes postmaster@DOMAIN (and bare <Postmaster>) for every
    /// local domain without a postmaster user [default: that domain's first
    /// user in address order]. Give every node the same value.
    #[arg(long, value_name = "ADDRESS")]
    postmaster: Option<String>,
    /// Copies of each message (R): each is on disk on R nodes before `250`.
    /// With fewer nodes up it is stored on those up and counted as
    /// under-replicated.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=16))]
    replicas: u64,
    /// How long a node may be down before the copies it held are made again
    /// on other nodes (a quick restart costs nothing): e.g. 30s, 500ms, 5m.
    /// A removed or draining node's copies are moved at once.
    #[arg(long, default_value = "30s", value_parser = parse_duration_arg)]
    repair_grace: Duration,
    /// Bytes per second this node sends when it restores or moves copies
    /// (same units as --max-message-size), so that client traffic keeps
    /// its share of disk and network.
    #[arg(long, default_value = "32MiB", value_parser = parse_size_arg)]
    repair_rate: u64,
    /// Largest message accepted (advertised in EHLO SIZE): bytes, or with a
    /// unit: KB, MB, GB (powers of 1000), K/KiB, M/MiB, G/GiB (powers of 1024).
    #[arg(long, default_value = "50MiB", value_parser = parse_size_arg)]
    max_message_size: u64,
    /// Memory all sessions together may hold for messages being received
    /// (same units); past it a message gets 452 4.3.1 and the sender retries.
    #[arg(long, default_value = "512MiB", value_parser = parse_size_arg)]
    max_data_memory: u64,
    /// Recipients per message.
    #[arg(long, default_value_t = 100)]
    max_recipients: usize,
    /// Open connections per client address (the share shrinks once half of
    /// --max-connections is taken).
    #[arg(long, default_value_t = 64)]
    max_connections_per_ip: u32,
    /// IMAP sessions one user may have open on this node at once.
    #[arg(long, default_value_t = 20)]
    max_imap_sessions_per_user: u32,
    /// Unknown recipients one client address may name per minute; past it
    /// every RCPT from that address gets 450 4.7.1 until the minute ends.
    /// (In one session, each unknown recipient after the third waits 1 s
    /// and the tenth ends the session with 421.)
    #[arg(long, default_value_t = 50)]
    max_unknown_recipients: u32,
    /// Open client connections per node, all protocols; a tenth is kept for
    /// addresses holding none, and when full the longest-idle session (10 s
    /// or more since its last line) is closed to make room.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a session may stay silent before it is closed.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// What this node does: `in` takes mail in and works no outbound queue
    /// shard, `out` works the queue and takes no mail from other servers
    /// (no --smtp or --lmtp), `both`. Taken when the node first joins.
    #[arg(long, value_enum, default_value = "both")]
    role: Role,
    /// Send all outbound mail to this smarthost (HOST:PORT) instead of
    /// looking up the recipients' MX records.
    #[arg(long, value_name = "HOST:PORT")]
    relay_host: Option<String>,
    /// The DNS server for MX lookups (an IP address and port); default:
    /// the system's (/etc/resolv.conf).
    #[arg(long, value_name = "IP:PORT")]
    dns: Option<SocketAddr>,
    /// The port mail exchangers are reached on (25; another for tests).
    #[arg(long, default_value_t = 25)]
    mx_port: u16,
    /// First wait before an outbound delivery that failed temporarily is
    /// tried again; it doubles each time up to --retry-max.
    #[arg(long, default_value = "1m", value_parser = parse_duration_arg)]
    retry_initial: Duration,
    /// The longest wait between two tries of an outbound delivery.
    #[arg(long, default_value = "1h", value_parser = parse_duration_arg)]
    retry_max: Duration,
    /// How long a message stays in the outbound queue before it bounces
    /// (units: ms, s, m, h; 5 days = 120h).
    #[arg(long, default_value = "120h", value_parser = parse_duration_arg)]
    queue_lifetime: Duration,
    /// Tell the sender once when a message has waited this long in the
    /// outbound queue (a DSN with Action: delayed); 0s: never.
    #[arg(long, default_value = "0s", value_parser = parse_duration_arg)]
    delay_warning: Duration,
    /// Submissions with remote recipients one account may make a minute,
    /// cluster-wide (then `451 4.7.1`).
    #[arg(long, default_value_t = 120)]
    max_submissions_per_minute: u32,
    /// Remote recipients one account may submit to an hour, cluster-wide.
    #[arg(long, default_value_t = 2000)]
    max_submission_recipients_per_hour: u32,
    /// Outbound SMTP connections of this node at once, all destinations.
    #[arg(long, default_value_t = 100)]
    outbound_concurrency: usize,
    /// Outbound SMTP connections to one destination domain at once (one
    /// for a destination in the slow lane).
    #[arg(long, default_value_t = 20)]
    outbound_per_destination: usize,
    /// Outbound transactions a second to one destination domain (0: no
    /// limit).
    #[arg(long, default_value_t = 0)]
    outbound_rate_per_destination: u32,
    /// Outbound queue messages held on this node above which new mail for
    /// remote recipients gets `451 4.3.1`.
    #[arg(long, default_value_t = 100_000)]
    queue_max_messages: u64,
    /// Outbound queue bytes held on this node above which new mail for
    /// remote recipients gets `451 4.3.1`.
    #[arg(long, default_value = "2GiB", value_parser = parse_size_arg)]
    queue_max_bytes: u64,
    /// Initial log filter (tracing EnvFilter syntax); change it later with `quill admin log-level`.
    #[arg(long, env = "QUILL_LOG", default_value = "info,openraft=warn")]
    log: String,
}

#[derive(Args)]
struct AdminArgs {
    /// Admin API address of any node (its --admin), host:port.
    #[arg(long)]
    node: String,
    /// Admin token.
    #[arg(long, env = "QUILL_ADMIN_TOKEN")]
    token: String,
    #[command(subcommand)]
    command: AdminCmd,
}

#[derive(Subcommand)]
enum AdminCmd {
    /// Mail domains this service accepts.
    #[command(subcommand)]
    Domain(DomainCmd),
    /// Mailbox users.
    #[command(subcommand)]
    User(UserCmd),
    /// The cluster as this node sees it.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Cluster nodes, by id or name.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Client TLS certificates stored cluster-wide: every node serves them
    /// (before its own --tls-cert files), renewed without a restart.
    #[command(subcommand)]
    Tls(TlsCmd),
    /// The outbound queue, cluster-wide (any node answers for all).
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Set the log filter at once, without a restart (e.g. debug,
    /// quill_node=trace,info): on the addressed node only, or with --all on
    /// every node that is up.
    LogLevel {
        /// A tracing EnvFilter, e.g. `debug` or `info,quill_node=trace`.
        level: String,
        /// Every node that is not down, not only the addressed one.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand)]
enum TlsCmd {
    /// Store a certificate chain and its key (PEM files); checked first: a
    /// key that does not match, an expired or unparsable certificate is
    /// refused with the reason.
    Set {
        #[arg(long, value_name = "PEM")]
        cert: PathBuf,
        #[arg(long, value_name = "PEM")]
        key: PathBuf,
        /// The name it is stored under (replacing one of the same name);
        /// `default` is served to clients whose SNI matches no certificate.
        #[arg(long, default_value = "default")]
        name: String,
    },
    /// The certificates this node serves: cluster-wide, then its own.
    List,
    /// Stop serving a cluster-wide certificate.
    Remove { name: String },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    In,
    Out,
    Both,
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Every queued message: id, age, sender, recipients and their state.
    List,
    /// One queued message: its envelope, recipients and header.
    Show {
        id: String,
    },
    /// Try it again now (at its owner's next look, within a second).
    Retry {
        id: String,
    },
    /// Take it out of the queue without a bounce.
    Remove {
        id: String,
    },
    /// Keep it queued but do not try it until released.
    Hold {
        id: String,
    },
    Release {
        id: String,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Mark a node draining: placement stops choosing it.
    Drain { node: String },
    /// Take a node out of the cluster for good.
    Remove { node: String },
}

#[derive(Subcommand)]
enum DomainCmd {
    /// Accept mail for a domain.
    Add { domain: String },
    /// List the domains.
    List,
    /// Stop accepting mail for a domain (refused while it has users).
    Remove { domain: String },
}

/// Where a password comes from: `--password` (visible to `ps`),
/// `--password-file FILE` (`-` for standard input), else a prompt on a
/// terminal, else one line of standard input.
#[derive(Args)]
struct PasswordArgs {
    /// The password itself (other users of this machine can see it in `ps`;
    /// prefer --password-file or the prompt).
    #[arg(long, conflicts_with = "password_file")]
    password: Option<String>,
    /// Read the password from the first line of FILE (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    password_file: Option<PathBuf>,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Create a mailbox user.
    Add {
        address: String,
        #[command(flatten)]
        password: PasswordArgs,
        /// Mailbox quota: bytes, or with a unit: KB, MB, GB (powers of
        /// 1000), K/KiB, M/MiB, G/GiB (powers of 1024); none by default.
        #[arg(long)]
        quota: Option<String>,
    },
    /// List the users and their quotas.
    List,
    /// Remove a user. Refused while the mailbox holds mail, unless --purge.
    Remove {
        address: String,
        /// Delete the user's mail on every replica too.
        #[arg(long)]
        purge: bool,
    },
    /// Set a new password.
    Passwd {
        address: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Epoch, leader, nodes with their state and counts, under-replicated mail.
    Status {
        /// Print the JSON object as is.
        #[arg(long)]
        json: bool,
    },
}

/// A size to bytes: `123`, `10KB`/`10MB`/`10GB`/`1TB` (powers of 1000),
/// `10K`/`10KiB`, `500M`/`500MiB`, `2G`/`2GiB`, `1T`/`1TiB` (powers of 1024);
/// units in any case, a space before them allowed.
fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        other => bail!("not a size: {s:?} (unknown unit {other:?}; use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("not a size: {s:?} (a whole number, then an optional unit such as MB or MiB)"))?;
    n.checked_mul(mult).with_context(|| format!("size too large: {s:?}"))
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A duration: a number and a unit, ms, s, m or h (`30s`, `500ms`, `5m`).
fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (ms, s, m, h)"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// The password of a `user add` or `user passwd`, from wherever it was given.
fn read_password(p: &PasswordArgs) -> anyhow::Result<String> {
    use std::io::{BufRead, IsTerminal};
    let first_line = |r: &mut dyn BufRead| -> anyhow::Result<String> {
        let mut line = String::new();
        r.read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    let pw = if let Some(pw) = &p.password {
        pw.clone()
    } else if let Some(f) = &p.password_file {
        if f.as_os_str() == "-" {
            first_line(&mut std::io::stdin().lock())?
        } else {
            let file = std::fs::File::open(f).with_context(|| format!("cannot read {}", f.display()))?;
            first_line(&mut std::io::BufReader::new(file))?
        }
    } else if std::io::stdin().is_terminal() {
        let pw = rpassword::prompt_password("Password: ")?;
        if rpassword::prompt_password("Again: ")? != pw {
            bail!("the two passwords differ");
        }
        pw
    } else {
        first_line(&mut std::io::stdin().lock())?
    };
    if pw.is_empty() {
        bail!("empty password");
    }
    Ok(pw)
}

/// glibc raises its mmap threshold to the size of each large block freed
/// (up to 32 MiB), after which argon2's 19 MiB working memory (one per
/// concurrent login) comes from per-thread arenas that keep it: a node grew
/// to ~700 MB after a load with 1 000 logins. A fixed threshold sends every
/// block of 1 MiB or more to mmap, which returns it at once.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn fix_malloc_mmap_threshold() {
    // SAFETY: mallopt only sets an allocator parameter; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn fix_malloc_mmap_threshold() {}

fn main() -> std::process::ExitCode {
    fix_malloc_mmap_threshold();
    // Mail, keys, tokens and logs are private, whatever the umask this was
    // started with: files 0600, directories 0700 at most.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| match cli.command {
            Cmd::Node(args) => rt.block_on(node(*args)),
            Cmd::Admin(args) => rt.block_on(admin(args)),
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with the whole chain of causes.
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn node(a: NodeArgs) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(&a.log).with_context(|| format!("bad --log filter {:?}", a.log))?;
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    tracing_subscriber::registry().with(filter).with(fmt).init();
    let set_log_level: quill_node::admin::LogLevelSetter = Arc::new(move |level: &str| {
        // An empty filter parses, and turns every log line off: refused,
        // like any filter that does not parse; the old one stays.
        if level.trim().is_empty() {
            return Err("empty log filter (it would turn off all logging); give e.g. info or debug".to_owned());
        }
        let f = EnvFilter::try_new(level).map_err(|e| format!("bad log filter {level:?}: {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    });
    let limits = Limits {
        message_bytes_max: usize::try_from(a.max_message_size).unwrap_or(usize::MAX),
        data_memory_bytes_max: usize::try_from(a.max_data_memory).unwrap_or(usize::MAX),
        recipients_max: a.max_recipients,
        unknown_recipients_max: a.max_unknown_recipients,
        connections_per_address_max: a.max_connections_per_ip,
        imap_sessions_per_user_max: a.max_imap_sessions_per_user,
        connections_max: a.max_connections,
        idle_timeout: Duration::from_secs(a.idle_timeout),
        submission_messages_per_minute: a.max_submissions_per_minute,
        submission_recipients_per_hour: a.max_submission_recipients_per_hour,
        ..Limits::default()
    };
    if limits.message_bytes_max > replication::MESSAGE_BYTES_MAX - 64 * 1024 {
        bail!(
            "--max-message-size may be at most {} bytes",
            replication::MESSAGE_BYTES_MAX - 64 * 1024
        );
    }
    if a.role == Role::Out && (a.smtp.is_some() || a.lmtp.is_some() || a.smtps.is_some()) {
        bail!("--role out takes no mail from other servers: drop --smtp, --smtps and --lmtp, or use --role both");
    }
    if a.tls_cert.len() != a.tls_key.len() {
        bail!("give one --tls-key for each --tls-cert, in the same order");
    }
    let tls_files = a
        .tls_cert
        .into_iter()
        .zip(a.tls_key)
        .map(|(cert, key)| quill_node::tls::FilePair { cert, key })
        .collect();
    let config = NodeConfig {
        data_dir: a.data,
        name: a.name.unwrap_or_else(|| format!("quill-{}", a.cluster_addr)),
        cluster_addr: a.cluster_addr,
        smtp: a.smtp,
        submission: a.submission,
        lmtp: a.lmtp,
        pop3: a.pop3,
        smtps: a.smtps,
        pop3s: a.pop3s,
        imap: a.imap,
        imaps: a.imaps,
        tls_files,
        plaintext_auth: a.plaintext_auth,
        admin: a.admin,
        admin_token: a.admin_token,
        seeds: a.seed,
        join_token: a.join_token,
        failure_timeout: Duration::from_millis(a.failure_timeout_ms),
        default_login_domain: a.default_login_domain,
        postmaster: a.postmaster,
        replicas: a.replicas as usize,
        repair_grace: a.repair_grace,
        repair_rate: a.repair_rate,
        limits,
        outbound: quill_node::outbound::OutboundConfig {
            relay_host: a.relay_host,
            dns: a.dns,
            mx_port: a.mx_port,
            schedule: quill_node::queue::Schedule {
                initial_ms: a.retry_initial.as_millis() as u64,
                max_ms: a.retry_max.as_millis() as u64,
                lifetime_ms: a.queue_lifetime.as_millis() as u64,
            },
            concurrency: a.outbound_concurrency.max(1),
            per_domain: a.outbound_per_destination.max(1),
            rate_per_domain: a.outbound_rate_per_destination,
            delay_warning_ms: a.delay_warning.as_millis() as u64,
            works_queue: a.role != Role::In,
            max_messages: a.queue_max_messages,
            max_bytes: a.queue_max_bytes,
            ..Default::default()
        },
    };
    quill_node::run(config, set_log_level, shutdown_signal()).await
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn admin(a: AdminArgs) -> anyhow::Result<()> {
    let (method, path, body) = match &a.command {
        AdminCmd::Domain(DomainCmd::Add { domain }) => (
            Method::POST,
            "/v1/domains".to_owned(),
            Some(serde_json::json!({ "domain": domain })),
        ),
        AdminCmd::Domain(DomainCmd::List) => (Method::GET, "/v1/domains".to_owned(), None),
        AdminCmd::Domain(DomainCmd::Remove { domain }) => {
            (Method::DELETE, format!("/v1/domains/{}", path_segment(domain)), None)
        }
        AdminCmd::User(UserCmd::Add {
            address,
            password,
            quota,
        }) => {
            let quota_bytes = quota.as_deref().map(parse_size).transpose().context("--quota")?;
            let password = read_password(password)?;
            let body = serde_json::json!({ "address": address, "password": password, "quota_bytes": quota_bytes });
            (Method::POST, "/v1/users".to_owned(), Some(body))
        }
        AdminCmd::User(UserCmd::List) => (Method::GET, "/v1/users".to_owned(), None),
        AdminCmd::User(UserCmd::Remove { address, purge }) => {
            let query = if *purge { "?purge=true" } else { "" };
            (
                Method::DELETE,
                format!("/v1/users/{}{query}", path_segment(address)),
                None,
            )
        }
        AdminCmd::User(UserCmd::Passwd { address, password }) => (
            Method::PUT,
            format!("/v1/users/{}/password", path_segment(address)),
            Some(serde_json::json!({ "password": read_password(password)? })),
        ),
        AdminCmd::Cluster(ClusterCmd::Status { .. }) => (Method::GET, "/v1/cluster/status".to_owned(), None),
        AdminCmd::Node(NodeCmd::Drain { node }) => {
            (Method::POST, format!("/v1/nodes/{}/drain", path_segment(node)), None)
        }
        AdminCmd::Node(NodeCmd::Remove { node }) => (Method::DELETE, format!("/v1/nodes/{}", path_segment(node)), None),
        AdminCmd::Tls(TlsCmd::Set { cert, key, name }) => {
            let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
            let body = serde_json::json!({ "cert_pem": read(cert)?, "key_pem": read(key)? });
            (Method::PUT, format!("/v1/tls/{}", path_segment(name)), Some(body))
        }
        AdminCmd::Tls(TlsCmd::List) => (Method::GET, "/v1/tls".to_owned(), None),
        AdminCmd::Queue(QueueCmd::List) => (Method::GET, "/v1/queue".to_owned(), None),
        AdminCmd::Queue(QueueCmd::Show { id }) => (Method::GET, format!("/v1/queue/{}", path_segment(id)), None),
        AdminCmd::Queue(QueueCmd::Remove { id }) => (Method::DELETE, format!("/v1/queue/{}", path_segment(id)), None),
        AdminCmd::Queue(QueueCmd::Retry { id }) => {
            (Method::POST, format!("/v1/queue/{}/retry", path_segment(id)), None)
        }
        AdminCmd::Queue(QueueCmd::Hold { id }) => (Method::POST, format!("/v1/queue/{}/hold", path_segment(id)), None),
        AdminCmd::Queue(QueueCmd::Release { id }) => {
            (Method::POST, format!("/v1/queue/{}/release", path_segment(id)), None)
        }
        AdminCmd::Tls(TlsCmd::Remove { name }) => (Method::DELETE, format!("/v1/tls/{}", path_segment(name)), None),
        AdminCmd::LogLevel { level, all } => (
            Method::PUT,
            "/v1/log-level".to_owned(),
            Some(serde_json::json!({ "level": level, "all": all })),
        ),
    };
    let (status, reply) = call(&a.node, &a.token, method, &path, body).await?;
    if !(200..300).contains(&status) {
        let msg = reply
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| reply.to_string());
        bail!("{msg} (HTTP {status})");
    }
    match &a.command {
        AdminCmd::Domain(DomainCmd::List) => {
            for d in reply.as_array().into_iter().flatten() {
                println!("{}", d.as_str().unwrap_or_default());
            }
        }
        AdminCmd::User(UserCmd::List) => {
            for u in reply.as_array().into_iter().flatten() {
                let quota = u["quota_bytes"]
                    .as_u64()
                    .map(|q| format!("quota {q} bytes"))
                    .unwrap_or_default();
                println!("{} {quota}", u["address"].as_str().unwrap_or_default());
            }
        }
        AdminCmd::Cluster(ClusterCmd::Status { json: true }) => println!("{reply}"),
        AdminCmd::Queue(QueueCmd::List) => {
            let entries = reply["entries"].as_array().cloned().unwrap_or_default();
            for e in &entries {
                let rcpts: Vec<String> = e["rcpts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        format!(
                            "{}={}",
                            r["address"].as_str().unwrap_or("?"),
                            r["state"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                println!(
                    "{} age={}s size={} from=<{}> {}{}",
                    e["id"].as_str().unwrap_or("?"),
                    e["age_s"],
                    e["size"],
                    e["from"].as_str().unwrap_or(""),
                    rcpts.join(" "),
                    if e["held"] == true { " HELD" } else { "" }
                );
            }
            println!("{} queued", entries.len());
        }
        AdminCmd::Queue(QueueCmd::Show { .. }) => println!("{}", serde_json::to_string_pretty(&reply)?),
        AdminCmd::Tls(TlsCmd::List) => {
            for (source, list) in [("cluster", &reply["cluster"]), ("local", &reply["local"])] {
                for c in list.as_array().into_iter().flatten() {
                    println!(
                        "{source} {} names={} not_after={} fingerprint={}",
                        c["name"].as_str().unwrap_or("-"),
                        c["names"],
                        c["not_after"],
                        c["fingerprint"].as_str().unwrap_or_default()
                    );
                }
            }
        }
        AdminCmd::User(UserCmd::Remove { purge: true, .. }) => {
            println!("ok ({} message(s) purged)", reply["purged"]);
        }
        AdminCmd::LogLevel { .. } => {
            let nodes = reply["nodes"].as_object().cloned().unwrap_or_default();
            for (name, said) in &nodes {
                println!("{name}: {}", said.as_str().unwrap_or_default());
            }
            if reply["scope"] == "this node" {
                println!("(this node only; --all sets it on every node that is up)");
            }
            if reply["ok"] != true {
                bail!("the log level was not set on every node");
            }
        }
        AdminCmd::Cluster(ClusterCmd::Status { json: false }) => {
            println!(
                "epoch {}  leader {}  self {}  under-replicated {}",
                reply["epoch"], reply["leader"], reply["self"], reply["under_replicated"]
            );
            for n in reply["nodes"].as_array().into_iter().flatten() {
                let activity = match n["activity"].as_str().unwrap_or_default() {
                    "repairing" => format!("repairing({} left)", n["repair_pending"]),
                    other => other.to_owned(),
                };
                println!(
                    "  node {} {:<16} {:<9} voter={} messages={} bytes={} {activity} smtp={} pop3={} admin={}",
                    n["id"],
                    n["name"].as_str().unwrap_or_default(),
                    n["state"].as_str().unwrap_or_default(),
                    n["voter"],
                    n["messages"],
                    n["bytes"],
                    n["addrs"]["smtp"].as_str().unwrap_or("-"),
                    n["addrs"]["pop3"].as_str().unwrap_or("-"),
                    n["addrs"]["admin"].as_str().unwrap_or("-"),
                );
            }
        }
        _ => println!("ok"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        use super::parse_size;
        for (s, want) in [
            ("123", 123),
            ("10K", 10240),
            ("2g", 2 << 30),
            ("10MB", 10_000_000),
            ("10 MB", 10_000_000),
            ("10mb", 10_000_000),
            ("10MiB", 10 << 20),
            ("1GB", 1_000_000_000),
            ("1GiB", 1 << 30),
            ("5KB", 5_000),
            ("5KiB", 5 << 10),
            ("7B", 7),
        ] {
            assert_eq!(parse_size(s).unwrap(), want, "{s}");
        }
        for bad in ["x", "", "MB", "10XB", "1.5G", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("10XB").unwrap_err().to_string().contains("unknown unit"));
    }
}
