//! `quill admin`: the admin API from the command line. Each subcommand is
//! one typed call (`quill_proto::admin::Call`) to any node's `--admin`;
//! its typed reply is printed for people (or as JSON where asked).

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use quill_proto::admin::{
    AliasBody, Call, CatchAllBody, ClusterStatus, DomainAliasBody, DomainBody, LevelBody, LevelSet, PasswordBody,
    QueueAction, QueueEntry, QuotaBody, RoutesList, SessionList, SettingBody, SettingRow, SieveBody, SieveList,
    SteppedDown, TapBody, TlsBody, TopList, UpgradeFinished, UserBody, UserInfo, UserRemoved, WatchBody,
};

use super::client::request;
use super::print;
use crate::units::parse_size;

#[derive(Args)]
pub struct AdminArgs {
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
    /// Addresses that are not users: their mail goes to other addresses,
    /// local or remote (forwarded with the sender rewritten by SRS).
    #[command(subcommand)]
    Alias(AliasCmd),
    /// A user's Sieve filter (RFC 5228: fileinto, redirect, vacation, ...),
    /// run on every message the user gets. Also over ManageSieve.
    #[command(subcommand)]
    Sieve(SieveCmd),
    /// Taps: a copy of every message accepted for a domain or an address
    /// goes to an archive user, before any filter or alias runs.
    #[command(subcommand)]
    Tap(TapCmd),
    /// Cluster settings: policy values every node applies within a second,
    /// no restart (a node's own flag still wins on that node).
    #[command(subcommand)]
    Settings(SettingsCmd),
    /// Blocklists of client addresses, cluster-wide (--smtp refuses them).
    #[command(subcommand)]
    Blocklist(super::blocklist::BlocklistCmd),
    /// Access rules: allow or deny client address ranges, over every list.
    #[command(subcommand)]
    Access(super::blocklist::AccessCmd),
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
    /// DKIM signing keys of outgoing mail, per domain, shared by the cluster.
    #[command(subcommand)]
    Dkim(super::dkim::DkimCmd),
    /// Write a user's mail to standard output, online: mbox (mboxrd, the
    /// folder and flags in added headers) or a Maildir tree as a tar
    /// stream. Exits with an error if the stream broke off.
    Export {
        address: String,
        #[arg(long, default_value = "mbox", value_parser = ["mbox", "maildir"])]
        format: String,
        /// Read at most this much a second (e.g. 20MB), leaving the node's
        /// disks and CPU to mail; as fast as it goes by default.
        #[arg(long, value_parser = crate::units::parse_size_arg)]
        max_rate: Option<u64>,
    },
    /// Store the messages of an mbox file (as export writes it, or any
    /// mbox) in a user's mailbox, with their folders and flags; a message
    /// already in its folder is skipped, so importing twice stores once.
    Import {
        address: String,
        file: PathBuf,
        /// The folder of messages whose mbox names none (INBOX by default).
        #[arg(long)]
        folder: Option<String>,
    },
    /// Back the whole cluster up into DIR (new or empty), online: the
    /// directory (users with password hashes, routes, Sieve, settings,
    /// certificates and keys, DKIM keys) and every mailbox, streamed.
    Backup {
        dir: PathBuf,
        /// Read mail at most this much a second, leaving the nodes' disks
        /// and CPU to mail (a full-speed backup halved a 2-core node's
        /// deliveries; see BENCHMARKS.md); 0: as fast as it goes.
        #[arg(long, default_value = "20MB", value_parser = crate::units::parse_size_arg)]
        max_rate: u64,
    },
    /// Restore a backup DIR into a cluster that has no user yet.
    Restore {
        dir: PathBuf,
        /// After a restore that stopped part way: import the mail again
        /// (what is there already is skipped), not the directory.
        #[arg(long)]
        resume: bool,
    },
    /// Set the log filter at once, without a restart (e.g. debug,
    /// quill_node=trace,info): on the addressed node only, or with --all on
    /// every node that is up. With --user or --client instead: log every
    /// command of that user or client address (secrets hidden) for a while,
    /// whatever the filter.
    LogLevel {
        /// A tracing EnvFilter, e.g. `debug` or `info,quill_node=trace`.
        #[arg(required_unless_present_any = ["user", "client"])]
        level: Option<String>,
        /// Every node that is not down, not only the addressed one.
        #[arg(long)]
        all: bool,
        /// Log everything this user does (their sessions' commands).
        #[arg(long, conflicts_with_all = ["level", "client"])]
        user: Option<String>,
        /// Log everything this client IP address does.
        #[arg(long, conflicts_with = "level")]
        client: Option<String>,
        /// How long the watch of --user or --client lasts (at most 24h).
        #[arg(long = "for", default_value = "1h", value_parser = crate::units::parse_duration_arg)]
        duration: std::time::Duration,
    },
    /// Live client sessions of every node: node, protocol, peer, user once
    /// logged in, since when, TLS or not.
    Sessions {
        #[arg(long)]
        json: bool,
    },
    /// The cluster's heaviest senders, recipients or client addresses (each
    /// node's summary merged; exact for the leaders).
    Top {
        #[arg(value_parser = ["senders", "recipients", "clients"])]
        kind: String,
        /// 1m or 1h.
        #[arg(long, default_value = "1h", value_parser = ["1m", "1h"])]
        window: String,
        #[arg(long)]
        json: bool,
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
    /// Stop accepting mail for a domain (refused while it has users, or
    /// aliases in it or onto it).
    Remove { domain: String },
    /// Accept mail for ALIAS as for TARGET: every address of ALIAS is the
    /// same address of TARGET. Refused if ALIAS has users of its own.
    Alias { alias: String, target: String },
    /// Stop accepting mail for an alias domain.
    Unalias { alias: String },
    /// Mail to an unknown address of DOMAIN goes to ADDRESS (an existing
    /// user or alias, or a remote address), instead of being refused.
    CatchAll {
        domain: String,
        #[arg(required_unless_present = "remove")]
        address: Option<String>,
        /// Refuse unknown addresses again (the default).
        #[arg(long, conflicts_with = "address")]
        remove: bool,
    },
}

#[derive(Subcommand)]
enum SettingsCmd {
    /// Set KEY (a `quill node` flag's name without its dashes, e.g.
    /// max-recipients) to VALUE for the whole cluster; checked first.
    Set { key: String, value: String },
    /// Back to each node's flag or the default.
    Unset { key: String },
    /// Every key with its value, default and source (cluster, flag,
    /// default) on the addressed node.
    List {
        /// Print the JSON list as is.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TapCmd {
    /// Copy mail for TARGET (a local domain or address) to ARCHIVE (a user).
    Add {
        target: String,
        archive: String,
    },
    List,
    Remove {
        target: String,
    },
}

#[derive(Subcommand)]
enum SieveCmd {
    /// Check FILE and make it the user's active script (`-`: standard
    /// input). A script with an error is refused with its line and reason.
    Set { address: String, file: PathBuf },
    /// Print the user's active script.
    Get { address: String },
    /// Remove the user's active script: no filtering from now on.
    Remove { address: String },
}

#[derive(Subcommand)]
enum AliasCmd {
    /// Mail for ADDRESS goes to each TARGET (replacing an alias of the
    /// same address). Local targets must exist; an alias that would reach
    /// itself is refused, naming the loop.
    Add {
        address: String,
        #[arg(required = true)]
        targets: Vec<String>,
    },
    /// The aliases, domain aliases and catch-alls.
    List {
        /// Print the JSON object as is.
        #[arg(long)]
        json: bool,
    },
    Remove {
        address: String,
    },
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
    /// Set a user's quota: bytes, or with a unit (10MB, 2GiB, as for
    /// `user add --quota`), or `none`. Over it, mail is refused at RCPT
    /// with 452 4.2.2 and IMAP APPEND and COPY with NO [OVERQUOTA].
    Quota { address: String, size: String },
    /// Set a new password.
    Passwd {
        address: String,
        #[command(flatten)]
        password: PasswordArgs,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Epoch, leader, feature level, nodes with their release, state and
    /// counts, under-replicated mail.
    Status {
        /// Print the JSON object as is.
        #[arg(long)]
        json: bool,
    },
    /// After every node runs the new release: raise the cluster's feature
    /// level to the newest they all support, so that data only the new
    /// release reads may be written. A rollback to the previous release is
    /// refused from then on. Refused, naming them, while some node runs an
    /// older release or does not answer.
    UpgradeFinish,
    /// The node --node names stops leading Raft, before it is stopped for
    /// an upgrade (another node takes over first, so writes do not wait
    /// for an election); nothing to do if it does not lead.
    StepDown,
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

impl AdminCmd {
    /// The call this subcommand makes (reading files and passwords).
    fn call(&self) -> anyhow::Result<Call> {
        let s = |v: &String| v.clone();
        Ok(match self {
            AdminCmd::Domain(DomainCmd::Add { domain }) => Call::AddDomain(DomainBody { domain: s(domain) }),
            AdminCmd::Domain(DomainCmd::List) => Call::ListDomains,
            AdminCmd::Domain(DomainCmd::Remove { domain }) => Call::RemoveDomain { domain: s(domain) },
            AdminCmd::Domain(DomainCmd::Alias { alias, target }) => Call::SetDomainAlias(DomainAliasBody {
                alias: s(alias),
                target: s(target),
            }),
            AdminCmd::Domain(DomainCmd::Unalias { alias }) => Call::RemoveDomainAlias { alias: s(alias) },
            AdminCmd::Domain(DomainCmd::CatchAll { domain, address, .. }) => Call::SetCatchAll {
                domain: s(domain),
                body: CatchAllBody {
                    address: address.clone(),
                },
            },
            AdminCmd::Alias(AliasCmd::Add { address, targets }) => Call::SetAlias(AliasBody {
                address: s(address),
                targets: targets.clone(),
            }),
            AdminCmd::Alias(AliasCmd::List { .. }) => Call::ListRoutes,
            AdminCmd::Sieve(SieveCmd::Set { address, file }) => {
                let script = if file.as_os_str() == "-" {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
                    s
                } else {
                    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?
                };
                Call::SetSieve {
                    address: s(address),
                    body: SieveBody { script },
                }
            }
            AdminCmd::Sieve(SieveCmd::Get { address }) => Call::GetSieve { address: s(address) },
            AdminCmd::Tap(TapCmd::Add { target, archive }) => Call::SetTap {
                target: s(target),
                body: TapBody { archive: s(archive) },
            },
            AdminCmd::Tap(TapCmd::List) => Call::ListRoutes,
            AdminCmd::Settings(SettingsCmd::Set { key, value }) => Call::SetSetting {
                key: s(key),
                body: SettingBody { value: s(value) },
            },
            AdminCmd::Settings(SettingsCmd::Unset { key }) => Call::UnsetSetting { key: s(key) },
            AdminCmd::Settings(SettingsCmd::List { .. }) => Call::ListSettings,
            AdminCmd::Tap(TapCmd::Remove { target }) => Call::RemoveTap { target: s(target) },
            AdminCmd::Sieve(SieveCmd::Remove { address }) => Call::RemoveSieve { address: s(address) },
            AdminCmd::Alias(AliasCmd::Remove { address }) => Call::RemoveAlias { address: s(address) },
            AdminCmd::User(UserCmd::Add {
                address,
                password,
                quota,
            }) => {
                let quota_bytes = quota.as_deref().map(parse_size).transpose().context("--quota")?;
                Call::AddUser(UserBody {
                    address: s(address),
                    password: read_password(password)?,
                    quota_bytes,
                })
            }
            AdminCmd::User(UserCmd::List) => Call::ListUsers,
            AdminCmd::User(UserCmd::Quota { address, size }) => {
                let quota_bytes = match size.as_str() {
                    "none" | "unlimited" => None,
                    s => Some(parse_size(s).context("SIZE")?),
                };
                Call::SetQuota {
                    address: s(address),
                    body: QuotaBody { quota_bytes },
                }
            }
            AdminCmd::User(UserCmd::Remove { address, purge }) => Call::RemoveUser {
                address: s(address),
                purge: *purge,
            },
            AdminCmd::User(UserCmd::Passwd { address, password }) => Call::SetPassword {
                address: s(address),
                body: PasswordBody {
                    password: read_password(password)?,
                },
            },
            AdminCmd::Cluster(ClusterCmd::Status { .. }) => Call::ClusterStatus,
            AdminCmd::Cluster(ClusterCmd::UpgradeFinish) => Call::UpgradeFinish,
            AdminCmd::Cluster(ClusterCmd::StepDown) => Call::StepDown,
            AdminCmd::Node(NodeCmd::Drain { node }) => Call::DrainNode { node: s(node) },
            AdminCmd::Node(NodeCmd::Remove { node }) => Call::RemoveNode { node: s(node) },
            AdminCmd::Tls(TlsCmd::Set { cert, key, name }) => {
                let read =
                    |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()));
                Call::SetTls {
                    name: s(name),
                    body: TlsBody {
                        cert_pem: read(cert)?,
                        key_pem: read(key)?,
                    },
                }
            }
            AdminCmd::Tls(TlsCmd::List) => Call::ListTls,
            AdminCmd::Tls(TlsCmd::Remove { name }) => Call::RemoveTls { name: s(name) },
            AdminCmd::Queue(QueueCmd::List) => Call::ListQueue,
            AdminCmd::Queue(QueueCmd::Show { id }) => Call::ShowQueued { id: s(id) },
            AdminCmd::Queue(QueueCmd::Remove { id }) => Call::RemoveQueued { id: s(id) },
            AdminCmd::Queue(QueueCmd::Retry { id }) => Call::ActOnQueued {
                id: s(id),
                action: QueueAction::Retry,
            },
            AdminCmd::Queue(QueueCmd::Hold { id }) => Call::ActOnQueued {
                id: s(id),
                action: QueueAction::Hold,
            },
            AdminCmd::Queue(QueueCmd::Release { id }) => Call::ActOnQueued {
                id: s(id),
                action: QueueAction::Release,
            },
            AdminCmd::Export { .. }
            | AdminCmd::Import { .. }
            | AdminCmd::Backup { .. }
            | AdminCmd::Restore { .. }
            | AdminCmd::Dkim(_)
            | AdminCmd::Blocklist(_)
            | AdminCmd::Access(_) => {
                bail!("a streamed command or one of its own file, not one call")
            }
            AdminCmd::LogLevel {
                user,
                client,
                all,
                duration,
                ..
            } if user.is_some() || client.is_some() => Call::Watch(WatchBody {
                target: user.clone().or_else(|| client.clone()).unwrap_or_default(),
                for_secs: duration.as_secs().max(1),
                all: *all,
            }),
            AdminCmd::LogLevel { level, all, .. } => Call::SetLogLevel(LevelBody {
                level: level.clone().unwrap_or_default(),
                all: *all,
            }),
            AdminCmd::Sessions { .. } => Call::ListSessions,
            AdminCmd::Top { kind, window, .. } => Call::Top {
                kind: s(kind),
                window: s(window),
            },
        })
    }
}

/// Runs one `quill admin` command and prints its answer.
pub async fn run(a: AdminArgs) -> anyhow::Result<()> {
    let (node, token) = (a.node.as_str(), a.token.as_str());
    match &a.command {
        AdminCmd::Export {
            address,
            format,
            max_rate,
        } => return super::transfer::export(node, token, address, format, *max_rate).await,
        AdminCmd::Import { address, file, folder } => {
            return super::transfer::import(node, token, address, file, folder.as_deref()).await;
        }
        AdminCmd::Backup { dir, max_rate } => {
            return super::transfer::backup(node, token, dir, Some(*max_rate)).await;
        }
        AdminCmd::Restore { dir, resume } => return super::transfer::restore(node, token, dir, *resume).await,
        AdminCmd::Dkim(c) => return super::dkim::run(node, token, c).await,
        AdminCmd::Blocklist(c) => return super::blocklist::run_blocklist(node, token, c).await,
        AdminCmd::Access(c) => return super::blocklist::run_access(node, token, c).await,
        _ => {}
    }
    let call = a.command.call()?;
    match &a.command {
        AdminCmd::Domain(DomainCmd::List) => {
            for d in request::<Vec<String>>(node, token, &call).await? {
                println!("{d}");
            }
        }
        AdminCmd::Alias(AliasCmd::List { json }) => {
            let r: RoutesList = request(node, token, &call).await?;
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print::routes(&r);
            }
        }
        AdminCmd::Settings(SettingsCmd::List { json }) => {
            let rows: Vec<SettingRow> = request(node, token, &call).await?;
            if *json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                for r in &rows {
                    println!(
                        "{} = {} ({}; default {}) from {}",
                        r.key, r.value, r.source, r.default, r.applies
                    );
                }
            }
        }
        AdminCmd::Tap(TapCmd::List) => {
            let r: RoutesList = request(node, token, &call).await?;
            for (target, archive) in &r.taps {
                println!("{target} -> {archive}");
            }
        }
        AdminCmd::Sieve(SieveCmd::Get { address }) => {
            let list: SieveList = request(node, token, &call).await?;
            match list.active.as_ref().and_then(|n| list.scripts.get(n)) {
                Some(src) => print!("{src}"),
                None => bail!("{address} has no active script"),
            }
        }
        AdminCmd::User(UserCmd::List) => {
            for u in request::<Vec<UserInfo>>(node, token, &call).await? {
                let quota = u.quota_bytes.map(|q| format!("quota {q} bytes")).unwrap_or_default();
                println!("{} {quota}", u.address);
            }
        }
        AdminCmd::Cluster(ClusterCmd::Status { json }) => {
            let status: ClusterStatus = request(node, token, &call).await?;
            if *json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                print::status(&status);
            }
        }
        AdminCmd::Cluster(ClusterCmd::UpgradeFinish) => {
            let r: UpgradeFinished = request(node, token, &call).await?;
            if r.feature_level > r.before {
                println!("feature level raised from {} to {}", r.before, r.feature_level);
            } else {
                println!(
                    "feature level {}: already the newest every node supports",
                    r.feature_level
                );
            }
        }
        AdminCmd::Cluster(ClusterCmd::StepDown) => {
            let r: SteppedDown = request(node, token, &call).await?;
            let leader = r.leader.map_or("none yet".to_owned(), |l| l.to_string());
            if r.was_leader {
                println!("stepped down; leader now {leader}");
            } else {
                println!("not the leader (leader {leader}): nothing to do");
            }
        }
        AdminCmd::Queue(QueueCmd::List) => print::queue(&request(node, token, &call).await?),
        AdminCmd::Queue(QueueCmd::Show { .. }) => {
            let e: QueueEntry = request(node, token, &call).await?;
            println!("{}", serde_json::to_string_pretty(&e)?);
        }
        AdminCmd::Tls(TlsCmd::List) => print::certs(&request(node, token, &call).await?)?,
        AdminCmd::User(UserCmd::Remove { purge: true, .. }) => {
            let r: UserRemoved = request(node, token, &call).await?;
            println!("ok ({} message(s) purged)", r.purged);
        }
        AdminCmd::Sessions { json } => {
            let r: SessionList = request(node, token, &call).await?;
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print::sessions(&r);
            }
        }
        AdminCmd::Top { json, .. } => {
            let r: TopList = request(node, token, &call).await?;
            if *json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print::top(&r);
            }
        }
        AdminCmd::LogLevel { .. } => {
            let r: LevelSet = request(node, token, &call).await?;
            for (name, said) in &r.nodes {
                println!("{name}: {said}");
            }
            if r.scope == "this node" {
                println!("(this node only; --all sets it on every node that is up)");
            }
            if !r.ok {
                bail!("the log level was not set on every node");
            }
        }
        _ => {
            let _: serde_json::Value = request(node, token, &call).await?;
            println!("ok");
        }
    }
    Ok(())
}
