//! `quill`: run a node, or administer one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use quill_node::admin::cli::AdminArgs;
use quill_node::cluster::levels::UpgradeFinish;
use quill_node::units::{parse_duration_arg, parse_size_arg};
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
    /// Read flags from a TOML file: each key a flag's name without its
    /// dashes (`max-recipients = 50`, `smtp = "127.0.0.1:2525"`, `seed =
    /// ["..."]`, `subaddress-folders = true`). Flags on the command line
    /// win over the file's; a repeatable flag takes both.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
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
    /// Ring neighbours each node pings and reports on to the leader (the
    /// failure detector; the voters are pinged as well). More notice a
    /// failure of several neighbours at once sooner; each costs a ping a
    /// round. Give every node the same.
    #[arg(long, default_value_t = membership::watch::WATCHERS_DEFAULT as u16, value_parser = clap::value_parser!(u16).range(1..=64))]
    watchers: u16,
    /// Who raises the cluster's feature level once every node runs a
    /// release that supports a newer one (see UPGRADING.md): `auto`, the
    /// leader by itself; `manual`, only `quill admin cluster
    /// upgrade-finish` (a rollback to the previous release stays possible
    /// until then). Give every node the same.
    #[arg(long, value_enum, default_value = "auto")]
    upgrade_finish: UpgradeFinishArg,
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
    /// Implicit-TLS message submission address (RFC 8314; port 465 by
    /// convention): AUTH required, the same sender checks as --submission.
    /// Mail from other servers comes over --smtp (STARTTLS offered).
    #[arg(long)]
    smtps: Option<SocketAddr>,
    /// Implicit-TLS POP3 address (port 995 by convention).
    #[arg(long)]
    pop3s: Option<SocketAddr>,
    /// ManageSieve address (RFC 5804, port 4190 by convention; STARTTLS
    /// offered): users upload and activate their Sieve filters.
    #[arg(long)]
    managesieve: Option<SocketAddr>,
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
    plaintext_auth: quill_node::net::PlaintextAuth,
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
    /// Submission (and --smtps): lets users send as addresses other than
    /// their own, in the envelope and in From: (repeatable). WHO:PATTERN,
    /// WHO a user's address or @DOMAIN (its users), PATTERN an address,
    /// @DOMAIN (any of its addresses) or * (any): e.g.
    /// --allow-from @example.org:@example.org. Without one, a user sends
    /// only as their own address (553 5.7.1 otherwise).
    #[arg(long = "allow-from", value_name = "WHO:PATTERN")]
    allow_from: Vec<quill_proto::send_as::Rule>,
    /// Mail to user+TAG@domain is filed into the user's folder named TAG
    /// where it exists (RFC 5233), else into INBOX (as without this flag).
    /// A user's Sieve script, if any, decides instead.
    #[arg(long)]
    subaddress_folders: bool,
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
    /// The DNS server for MX lookups and the checks of incoming mail (an
    /// IP address and port); default: the system's (/etc/resolv.conf).
    #[arg(long, value_name = "IP:PORT")]
    dns: Option<SocketAddr>,
    /// A DNS blocklist zone asked about every client of --smtp (e.g.
    /// zen.spamhaus.org); repeat for several. A lookup that fails or takes
    /// over 1.5 s is not a listing: the mail is taken.
    #[arg(long, value_name = "ZONE")]
    dnsbl: Vec<String>,
    /// Where a client of --smtp that a DNS blocklist or a cluster
    /// blocklist lists is refused: at `rcpt` (554 to every recipient but
    /// postmaster) or at `connect` (554 instead of the greeting).
    #[arg(long, default_value = "rcpt", value_parser = ["connect", "rcpt"])]
    dnsbl_at: String,
    /// Greylist mail on --smtp: the first try of a (client /24 or /64,
    /// sender, recipient) gets 451 and a retry after this long (within
    /// 36h) passes, through any node; off by default (e.g. 5m).
    #[arg(long, value_parser = parse_duration_arg)]
    greylist: Option<Duration>,
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
    /// The name this node gives itself: its SMTP greeting, the EHLO name it
    /// delivers out with (receivers check it against the sending
    /// address's reverse DNS), and the authserv-id of the
    /// Authentication-Results it adds [default: --name].
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// Mail from these networks on --smtp is taken as it is: no SPF, DKIM,
    /// DMARC, ARC or iprev check (relays that checked it already).
    /// Repeatable. None by default, loopback included.
    #[arg(long = "trusted-networks", value_name = "CIDR")]
    trusted_networks: Vec<ipnet::IpNet>,
    /// What the checks of mail arriving on --smtp do: `enforce` refuses a
    /// DMARC p=reject failure and files a p=quarantine one in Junk; `tag`
    /// only adds the Authentication-Results header.
    #[arg(long, value_enum, default_value = "enforce")]
    auth_policy: AuthPolicyArg,
    /// Check mail arriving over LMTP as --smtp's is (by default the MTA
    /// in front of it has).
    #[arg(long)]
    check_lmtp: bool,
    /// Initial log filter (tracing EnvFilter syntax); change it later with `quill admin log-level`.
    #[arg(long, env = "QUILL_LOG", default_value = "info,openraft=warn")]
    log: String,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum UpgradeFinishArg {
    Auto,
    Manual,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AuthPolicyArg {
    Enforce,
    Tag,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    In,
    Out,
    Both,
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
    let args = match with_config_file(std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("Error: {e:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let matches = <Cli as clap::CommandFactory>::command()
        .args_override_self(true)
        .get_matches_from(args);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // The settings a node was given a flag for: its own, over the cluster's.
    let explicit: std::collections::BTreeSet<String> = matches
        .subcommand_matches("node")
        .map(|m| {
            quill_node::settings::KEYS
                .iter()
                .filter(|k| {
                    let id = k.name.replace('-', "_");
                    m.value_source(&id) == Some(clap::parser::ValueSource::CommandLine)
                })
                .map(|k| k.name.to_owned())
                .collect()
        })
        .unwrap_or_default();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| match cli.command {
            Cmd::Node(args) => rt.block_on(node(*args, explicit)),
            Cmd::Admin(args) => rt.block_on(quill_node::admin::cli::run(args)),
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

/// `quill node --config FILE ...`: the file's keys as flags, put before
/// the command line's so that those win (clap takes the last of a
/// single-valued flag). Other commands pass through unchanged.
fn with_config_file(args: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    if args.get(1).is_none_or(|a| a != "node") {
        return Ok(args);
    }
    let mut file = None;
    for (i, a) in args.iter().enumerate().skip(2) {
        let a = a.to_string_lossy();
        if a == "--config" {
            file = args.get(i + 1).map(PathBuf::from);
        } else if let Some(f) = a.strip_prefix("--config=") {
            file = Some(PathBuf::from(f));
        }
    }
    let Some(file) = file else { return Ok(args) };
    let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read --config {}", file.display()))?;
    let flags = config_flags(&text).with_context(|| format!("--config {}", file.display()))?;
    let mut out = args[..2].to_vec();
    out.extend(flags.into_iter().map(std::ffi::OsString::from));
    out.extend(args[2..].iter().cloned());
    Ok(out)
}

/// The flags a TOML config file stands for: `key = value` gives
/// `--key=value`; `true` gives `--key` and `false` nothing; a list
/// repeats the flag. Tables are refused (there are no sections).
fn config_flags(text: &str) -> anyhow::Result<Vec<String>> {
    let table: toml::Table = toml::from_str(text).context("not a TOML file")?;
    let mut out = Vec::new();
    for (key, value) in &table {
        if key == "config"
            || !key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            bail!("{key:?} is not a flag's name (lower case and dashes, e.g. max-recipients)");
        }
        let one = |v: &toml::Value| -> anyhow::Result<Option<String>> {
            Ok(match v {
                toml::Value::String(s) => Some(format!("--{key}={s}")),
                toml::Value::Integer(n) => Some(format!("--{key}={n}")),
                toml::Value::Float(f) => Some(format!("--{key}={f}")),
                toml::Value::Boolean(true) => Some(format!("--{key}")),
                toml::Value::Boolean(false) => None,
                _ => bail!("{key}: takes a string, a number, true/false or a list of them"),
            })
        };
        match value {
            toml::Value::Array(items) => {
                for v in items {
                    out.extend(one(v)?);
                }
            }
            v => out.extend(one(v)?),
        }
    }
    Ok(out)
}

async fn node(a: NodeArgs, explicit: std::collections::BTreeSet<String>) -> anyhow::Result<()> {
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
        send_as: std::sync::Arc::new(
            quill_proto::send_as::SendAs::new(a.allow_from.clone()).map_err(anyhow::Error::msg)?,
        ),
        unknown_recipients_max: a.max_unknown_recipients,
        subaddress_folders: a.subaddress_folders,
        connections_per_address_max: a.max_connections_per_ip,
        imap_sessions_per_user_max: a.max_imap_sessions_per_user,
        connections_max: a.max_connections,
        idle_timeout: Duration::from_secs(a.idle_timeout),
        submission_messages_per_minute: a.max_submissions_per_minute,
        submission_recipients_per_hour: a.max_submission_recipients_per_hour,
        plaintext_auth: a.plaintext_auth,
        queue: quill_node::services::QueuePolicy {
            schedule: quill_proto::queue::Schedule {
                initial_ms: a.retry_initial.as_millis() as u64,
                max_ms: a.retry_max.as_millis() as u64,
                lifetime_ms: a.queue_lifetime.as_millis() as u64,
            },
            per_destination: a.outbound_per_destination.max(1),
            rate_per_destination: a.outbound_rate_per_destination,
            delay_warning_ms: a.delay_warning.as_millis() as u64,
            max_messages: a.queue_max_messages,
            max_bytes: a.queue_max_bytes,
        },
        repair_grace: a.repair_grace,
        repair_rate: a.repair_rate,
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
        managesieve: a.managesieve,
        explicit_settings: explicit,
        imap: a.imap,
        imaps: a.imaps,
        tls_files,
        admin: a.admin,
        admin_token: a.admin_token,
        seeds: a.seed,
        join_token: a.join_token,
        failure_timeout: Duration::from_millis(a.failure_timeout_ms),
        watchers: usize::from(a.watchers),
        upgrade_finish: match a.upgrade_finish {
            UpgradeFinishArg::Auto => UpgradeFinish::Auto,
            UpgradeFinishArg::Manual => UpgradeFinish::Manual,
        },
        default_login_domain: a.default_login_domain,
        postmaster: a.postmaster,
        dns: a.dns,
        hostname: a.hostname,
        mail_auth: quill_node::edge::MailAuthConfig {
            trusted: a.trusted_networks,
            lmtp: a.check_lmtp,
            policy: match a.auth_policy {
                AuthPolicyArg::Enforce => quill_node::edge::AuthPolicy::Enforce,
                AuthPolicyArg::Tag => quill_node::edge::AuthPolicy::Tag,
            },
        },
        edge: quill_node::edge::EdgeOptions {
            dnsbl: check_zones(a.dnsbl)?,
            dnsbl_at: a.dnsbl_at.parse().map_err(anyhow::Error::msg)?,
            greylist: a.greylist.filter(|d| !d.is_zero()),
        },
        replicas: a.replicas as usize,
        limits,
        outbound: quill_node::outbound::OutboundConfig {
            relay_host: a.relay_host,
            mx_port: a.mx_port,
            concurrency: a.outbound_concurrency.max(1),
            works_queue: a.role != Role::In,
            ..Default::default()
        },
    };
    quill_node::run(config, set_log_level, shutdown_signal()?).await
}

/// DNS blocklist zones as names (letters, digits, '-', '.').
fn check_zones(zones: Vec<String>) -> anyhow::Result<Vec<String>> {
    for z in &zones {
        let ok =
            !z.is_empty() && z.len() <= 200 && z.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            bail!("--dnsbl {z:?} is not a DNS zone name");
        }
    }
    Ok(zones
        .into_iter()
        .map(|z| z.trim_end_matches('.').to_ascii_lowercase())
        .collect())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed here, before
/// the node starts, not when `run` first waits on the future: a SIGTERM
/// that arrives while the node is still starting (its `/health` may
/// already answer) then stops it cleanly instead of killing it.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}
