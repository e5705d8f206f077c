//! `quill-harness`: start Quill nodes and put load on them.

use anyhow::bail;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use quill_harness::commands::bench_failover::{Victim, bench_failover};
use quill_harness::commands::bench_node::{Proto, bench_node};
use quill_harness::commands::bench_replication::bench_replication;
use quill_harness::commands::bench_tls::bench_tls;
use quill_harness::commands::demo::demo;
use quill_harness::commands::{self as cli};
use quill_harness::load::LoadConfig;

#[derive(Parser)]
#[command(
    name = "quill-harness",
    version,
    about = "Start Quill nodes, drive load through the public protocols, measure"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local cluster: node k on SUBNET.k (127.0.0.k) with SMTP 2525,
    /// LMTP 2424, POP3 2110, IMAP 2143, SMTPS 2465, POP3S 2995, IMAPS 2993
    /// (each node's self-signed certificate) and admin 8080; domain
    /// example.org with users
    /// alice and bob; send a mail on one node and read it on another; print
    /// how to connect; run until Ctrl-C (or `down`). With an existing
    /// cluster in DIR, start its nodes again.
    Up(cli::UpArgs),
    /// Replace the nodes of the cluster in DIR with another quill binary,
    /// one at a time, the leader last: leadership moves off a node
    /// (step-down), it stops, starts on the new binary with its data, and
    /// the next waits until it serves and every copy is in sync again.
    /// Logins on the other nodes are tried throughout and must all work.
    /// Run a `load` beside it and `verify` afterwards (UPGRADING.md).
    Upgrade {
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
        /// The `quill` binary to run from now on (a newer release, or the
        /// previous one to roll back before the feature level is raised).
        #[arg(long)]
        to: PathBuf,
        /// Only these nodes (e.g. n1,n3) [default: every running node].
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// How long a replaced node may take to be in sync again.
        #[arg(long, default_value = "120s", value_parser = cli::parse_duration)]
        sync_timeout: Duration,
    },
    /// Start one more node, joining the cluster in DIR.
    Add {
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
        /// The `quill` binary the new node runs [default: the cluster's]:
        /// a node of another release joining (mid-upgrade).
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// kill -9 a node (NODE: 2 or n2).
    Kill {
        node: String,
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
    },
    /// Stop a node if it runs, then start it again on its data.
    Restart {
        node: String,
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
    },
    /// Mark a node draining: it takes no new mail.
    Drain {
        node: String,
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
    },
    /// The cluster's status as any live node reports it.
    Status {
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Stop every node of the cluster in DIR (SIGTERM, in order).
    Down {
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
    },
    /// Porcupine's synthetic workload: SMTP deliveries to Zipf-skewed users
    /// and POP3 fetch-and-delete sessions, each to a random node; optional
    /// faults; per-second figures (JSON), a throughput picture (SVG, PNG)
    /// and the record `verify` checks, all in --out.
    Load {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        load: LoadArgs,
        /// kill -9 a node at a moment of the run, e.g. n2@30s (repeatable).
        #[arg(long)]
        kill: Vec<String>,
        /// (Re)start a node at a moment, e.g. n2@60s (repeatable).
        #[arg(long)]
        restart: Vec<String>,
        /// Add a node at a moment, e.g. @90s (repeatable).
        #[arg(long)]
        add: Vec<String>,
        /// Pause a node (SIGSTOP, then SIGCONT) at a moment for a while,
        /// e.g. n1@10s:15s (repeatable).
        #[arg(long)]
        pause: Vec<String>,
        /// Cut a node off from the others (their UDP/QUIC traffic, with
        /// iptables on loopback: needs root) at a moment for a while, e.g.
        /// n1@10s:20s (repeatable). Its clients still reach it.
        #[arg(long)]
        partition: Vec<String>,
        /// Where the figures, pictures and record go.
        #[arg(long)]
        out: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Check the cluster against the record a load run left in --out: every
    /// acknowledged, undeleted message present once with its checksum,
    /// nothing deleted present.
    Verify {
        #[command(flatten)]
        target: TargetArgs,
        #[arg(long)]
        out: PathBuf,
    },
    /// A load with faults drawn from --seed (kill -9 and restart, pauses,
    /// partitions; one at a time, the last fifth of the run to heal), then
    /// verify; fails if anything acknowledged was lost or deleted mail came
    /// back. The schedule is printed; the same seed draws it again.
    Chaos {
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
        #[command(flatten)]
        load: LoadArgs,
        /// How many faults.
        #[arg(long, default_value_t = 4)]
        faults: usize,
        /// Which kinds to draw from (partitions need root and iptables;
        /// left out with a note otherwise).
        #[arg(long, value_delimiter = ',', default_value = "kill,pause,partition")]
        kinds: Vec<cli::chaos::Kind>,
        #[arg(long)]
        out: PathBuf,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Run the same closed-loop load on clusters of each size and R, and
    /// draw throughput vs nodes (scale.json, scale.svg, scale.png in --dir).
    Scale {
        /// Cluster sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
        nodes: Vec<u8>,
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        replicas: Vec<usize>,
        /// Where the clusters and results go.
        #[arg(long, default_value_os_t = std::env::temp_dir().join("quill-scale"))]
        dir: PathBuf,
        /// Measure already running nodes instead.
        #[command(flatten)]
        remote: RemoteArgs,
        /// Seconds at the start of each run left out of the figure.
        #[arg(long, default_value = "5s", value_parser = cli::parse_duration)]
        warmup: Duration,
        #[command(flatten)]
        load: LoadArgs,
    },
    /// Start one node on 127.0.0.1 with domain example.org and users alice and
    /// bob, send a message and fetch it, print how to do the same, and keep
    /// running until Ctrl-C.
    Demo {
        /// Data directory [default: a fresh one under /tmp].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Password for alice and bob [default: generated and printed].
        #[arg(long)]
        password: Option<String>,
        /// Stop after showing that mail goes in and out (for scripts).
        #[arg(long)]
        exit: bool,
    },
    /// Benchmark one node: deliver N messages with C connections over SMTP
    /// and/or LMTP, then retrieve and delete them all over POP3.
    BenchNode {
        #[command(flatten)]
        amount: Amount,
        #[arg(long, value_enum, default_value_t = Proto::Both)]
        proto: Proto,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Log filter of the node.
        #[arg(long, default_value = "info")]
        log: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Deliver also with a Sieve script of this many rules on every
        /// user, alternated with none (none, script, none, script), and
        /// print both rates and their ratio.
        #[arg(long, default_value_t = 0)]
        sieve_rules: usize,
    },
    /// The checks of incoming mail: SMTP deliveries (DKIM-signed, SPF and
    /// DMARC records served by a dnsmasq it starts) to a node that checks
    /// every one beside a node that checks none, rounds alternated (off,
    /// on, off, on): msg/s, node CPU per delivery and the ratio.
    BenchChecks {
        #[command(flatten)]
        amount: Amount,
        /// Rounds of each (off and on).
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Backup and export on one node: fill it with --fill messages, time
    /// `quill admin export` of one user and `quill admin backup` of all
    /// (MB/s), then --messages deliveries alone and beside backups run one
    /// after another, alternated: msg/s and the ratio.
    BenchBackup {
        #[command(flatten)]
        amount: Amount,
        /// Messages delivered before the export and backup are timed.
        #[arg(long, default_value_t = 20_000)]
        fill: u64,
        /// The backups beside deliveries read at most this a second
        /// (`quill admin backup --max-rate`, e.g. 20MB); unlimited by default.
        #[arg(long)]
        max_rate: Option<String>,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value = "info")]
        log: String,
    },
    /// Porcupine's failure figure: fill a cluster with mail, run a steady
    /// open-loop load, kill -9 one node at 20 s and a second one later;
    /// throughput before, during and after each repair, time to full
    /// service, time until under_replicated is 0, p99 during repair, then
    /// the rebalancing rate after a join (heal.svg, heal.png in --out).
    BenchHeal {
        #[arg(long, default_value_t = 5)]
        nodes: u8,
        /// Mail to fill the cluster with before the load (one copy; R = 2).
        #[arg(long, default_value = "1GB", value_parser = quill_node::units::parse_size_arg)]
        fill: u64,
        /// Size of each fill message.
        #[arg(long, default_value = "100KB", value_parser = quill_node::units::parse_size_arg)]
        message_size: u64,
        /// Operations started per second (open loop).
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value = "5s")]
        repair_grace: String,
        /// Seconds into the load of the second kill (the first is at 20 s).
        #[arg(long, default_value_t = 90.0)]
        second_kill: f64,
        /// Seconds the load runs.
        #[arg(long, default_value_t = 160.0)]
        duration: f64,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure failure handling: start a cluster, then repeatedly kill -9 a
    /// node and time until every survivor has applied the view that marks
    /// it down (one epoch and leader on all); restart it between trials.
    BenchFailover {
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Trials per kind of victim.
        #[arg(long, default_value_t = 20)]
        trials: usize,
        #[arg(long, value_enum, default_value_t = Victim::Both)]
        victim: Victim,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// What TLS costs one node: full TLS handshakes/s on SMTPS, then
    /// deliveries/s over persistent SMTP sessions, plaintext beside
    /// STARTTLS (rounds in ABBA order), with the node's CPU time per
    /// operation and the ratios.
    BenchTls {
        /// Messages per delivery round.
        #[arg(long, default_value_t = 20_000)]
        messages: u64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 5_000)]
        handshakes: u64,
        /// Rounds of each kind (plaintext and STARTTLS).
        #[arg(long, default_value_t = 2)]
        rounds: u32,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Delivery throughput with replication: for each NODES:R pair, start a
    /// cluster of NODES with `--replicas R`, deliver the same load over SMTP
    /// with the connections spread over every node, and print msgs/s.
    BenchReplication {
        /// NODES:R pairs, run one after the other in this order.
        #[arg(long, value_delimiter = ',', default_value = "1:1,3:1,3:2,3:3")]
        configs: Vec<String>,
        #[command(flatten)]
        amount: Amount,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// A node's restart: fill one node with --messages over LMTP, then
    /// ROUNDS times kill -9 it and time its start until POP3 answers (STAT
    /// of user0001); with --before, the same data is started by that
    /// quill binary too, alternated
    BenchRestart {
        #[command(flatten)]
        amount: Amount,
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Another quill binary to start the same data with (an earlier build).
        #[arg(long)]
        before: Option<PathBuf>,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// IMAP IDLE on a three-node cluster: how soon a session idling on node
    /// 2 hears of a message delivered through node 1 (from the sender's
    /// 250) and of a flag set through node 3, ROUNDS times (p50, p99, max);
    /// then the CPU of SESSIONS idle sessions on node 1 while nothing
    /// happens (percent of one core)
    BenchIdle {
        #[arg(long, default_value_t = 200)]
        rounds: usize,
        #[arg(long, default_value_t = 1_000)]
        sessions: usize,
        /// How long the idle sessions' CPU is measured.
        #[arg(long, default_value = "30s", value_parser = cli::parse_duration)]
        settle: std::time::Duration,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// A seeded simulation of a large cluster in one process (the real
    /// placement, repair and rebalance plans, failure detector ring and
    /// encodings; network and time modelled): joins, kills, a drain, a
    /// split and a rolling restart; prints per node memory, the cost at
    /// rest, and per event the view change traffic, time to converge,
    /// data moved and snapshot transfer; writes OUT-converge.png and
    /// OUT-moved.png
    Sim {
        #[arg(long, default_value_t = 1_000)]
        nodes: u64,
        #[arg(long, default_value_t = 10_000_000)]
        users: u64,
        /// Users whose messages are kept (figures about mail are scaled up).
        #[arg(long, default_value_t = 10_000)]
        sample_users: u64,
        #[arg(long, default_value_t = 100)]
        messages_per_user: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value = "sim")]
        out: PathBuf,
    },
}

/// How much a benchmark delivers, over how many connections, to whom.
#[derive(clap::Args, Clone, Copy)]
struct Amount {
    #[arg(long, default_value_t = 10_000)]
    messages: u64,
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Users user0001..userNNNN@example.com, password passNNNN (as the Dovecot baseline).
    #[arg(long, default_value_t = 100)]
    users: u32,
    /// Send MAIL, RCPT and DATA in one write (RFC 2920 PIPELINING), as
    /// Postfix does; without it every command waits for its reply.
    #[arg(long)]
    pipelining: bool,
}

impl Amount {
    fn load(self) -> quill_harness::bench::Load {
        quill_harness::bench::Load {
            messages: self.messages,
            connections: self.connections,
            users: self.users,
            pipelining: self.pipelining,
        }
    }
}

/// Which cluster a command talks to.
#[derive(clap::Args, Clone)]
struct TargetArgs {
    /// The harness cluster's directory.
    #[arg(long, default_value_os_t = cli::default_dir())]
    dir: PathBuf,
    #[command(flatten)]
    remote: RemoteArgs,
}

/// Nodes the harness did not start.
#[derive(clap::Args, Clone)]
struct RemoteArgs {
    /// A file with one IP per line (standard ports); needs --admin-token
    /// and --password.
    #[arg(long)]
    hosts: Option<PathBuf>,
    #[arg(long)]
    admin_token: Option<String>,
    #[arg(long)]
    password: Option<String>,
}

#[derive(clap::Args, Clone)]
struct LoadArgs {
    /// Users load0001..loadNNNN@example.org (created if missing).
    #[arg(long, default_value_t = 100)]
    users: u32,
    /// Zipf exponent of the users' popularity (0: uniform).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Share of operations that are POP3 fetch-and-delete sessions.
    #[arg(long, default_value_t = 0.2)]
    pop_ratio: f64,
    /// Open loop: operations started per second (else closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Closed loop: concurrent sessions; open loop: most in flight.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// How long the load runs (e.g. 60s, 2m).
    #[arg(long, default_value = "30s", value_parser = cli::parse_duration)]
    duration: Duration,
    /// At most this many operations.
    #[arg(long, default_value_t = 1_000_000)]
    max_ops: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Each operation (a delivery, a POP3 session) must end within this,
    /// else it counts as a `timeout` error and the client moves on.
    #[arg(long, default_value = "10s", value_parser = cli::parse_duration)]
    op_timeout: Duration,
}

impl LoadArgs {
    fn config(&self) -> anyhow::Result<LoadConfig> {
        if !(0.0..=1.0).contains(&self.pop_ratio) {
            bail!("--pop-ratio must be within 0..=1");
        }
        if self.users == 0 || self.users > 9999 {
            bail!("--users must be 1..=9999");
        }
        Ok(LoadConfig {
            users: self.users,
            zipf: self.zipf,
            pop_ratio: self.pop_ratio,
            rate: self.rate,
            connections: self.connections.clamp(1, 1024),
            duration_s: self.duration.as_secs_f64(),
            max_ops: self.max_ops,
            seed: self.seed,
            password: String::new(),
            op_timeout_s: self.op_timeout.as_secs_f64(),
        })
    }
}

fn main() -> anyhow::Result<()> {
    // The state file (admin token, passwords), the nodes' data and logs
    // are private whatever the caller's umask.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Cmd::Up(a) => cli::up(a).await,
            Cmd::Upgrade {
                dir,
                to,
                nodes,
                sync_timeout,
            } => cli::upgrade(dir, to, nodes, sync_timeout).await,
            Cmd::Add { dir, binary } => cli::add(dir, binary).await,
            Cmd::Kill { node, dir } => cli::kill(dir, node).await,
            Cmd::Restart { node, dir } => cli::restart(dir, node).await,
            Cmd::Drain { node, dir } => cli::drain(dir, node).await,
            Cmd::Status { dir, json } => cli::status(dir, json).await,
            Cmd::Down { dir } => cli::down(dir).await,
            Cmd::Load {
                target,
                load,
                kill,
                restart,
                add,
                pause,
                partition,
                out,
                quiet,
            } => cli::load(cli::LoadArgs {
                cluster: cli::hosts_or_dir(target.dir, target.remote.hosts)?,
                token: target.remote.admin_token,
                password: target.remote.password,
                cfg: load.config()?,
                faults: cli::load::parse_faults(&kill, &restart, &add, &pause, &partition)?,
                out,
                progress: !quiet,
            })
            .await
            .map(drop),
            Cmd::Chaos {
                dir,
                load,
                faults,
                kinds,
                out,
                quiet,
            } => {
                cli::chaos(cli::ChaosArgs {
                    dir,
                    cfg: load.config()?,
                    faults,
                    kinds,
                    out,
                    progress: !quiet,
                })
                .await
            }
            Cmd::Verify { target, out } => cli::verify(
                cli::hosts_or_dir(target.dir, target.remote.hosts)?,
                target.remote.password,
                out,
            )
            .await
            .map(drop),
            Cmd::Scale {
                nodes,
                replicas,
                dir,
                remote,
                warmup,
                load,
            } => {
                cli::scale(
                    dir,
                    nodes,
                    replicas,
                    load.config()?,
                    warmup,
                    remote.hosts,
                    remote.admin_token,
                    remote.password,
                )
                .await
            }
            Cmd::Demo { dir, password, exit } => demo(dir, password, exit).await,
            Cmd::BenchFailover {
                nodes,
                trials,
                victim,
                dir,
            } => bench_failover(nodes, trials, victim, dir).await,
            Cmd::BenchHeal {
                nodes,
                fill,
                message_size,
                rate,
                repair_grace,
                second_kill,
                duration,
                dir,
                out,
            } => {
                quill_harness::commands::bench_heal::bench_heal(quill_harness::commands::bench_heal::BenchHealArgs {
                    nodes,
                    fill_bytes: fill,
                    message_bytes: message_size as usize,
                    rate,
                    repair_grace,
                    second_kill_s: second_kill,
                    duration_s: duration,
                    dir,
                    out,
                })
                .await
            }
            Cmd::BenchNode {
                amount: a,
                proto,
                dir,
                log,
                seed,
                sieve_rules,
            } => bench_node(a.load(), proto, dir, log, seed, sieve_rules).await,
            Cmd::BenchChecks {
                amount,
                rounds,
                dir,
                seed,
            } => quill_harness::commands::bench_checks::bench_checks(amount.load(), rounds.max(1), dir, seed).await,
            Cmd::BenchBackup {
                amount,
                fill,
                max_rate,
                dir,
                log,
            } => quill_harness::commands::bench_backup::bench_backup(amount.load(), fill, max_rate, dir, log).await,
            Cmd::BenchTls {
                messages,
                connections,
                handshakes,
                rounds,
                dir,
                seed,
            } => bench_tls(messages, connections, handshakes, rounds, dir, seed).await,
            Cmd::BenchReplication {
                configs,
                amount: a,
                dir,
                seed,
            } => bench_replication(configs, a.load(), dir, seed).await,
            Cmd::BenchRestart {
                amount,
                rounds,
                before,
                dir,
            } => quill_harness::commands::bench_restart::bench_restart(amount.load(), rounds, before, dir).await,
            Cmd::BenchIdle {
                rounds,
                sessions,
                settle,
                dir,
            } => quill_harness::commands::bench_idle::bench_idle(rounds, sessions, settle, dir).await,
            Cmd::Sim {
                nodes,
                users,
                sample_users,
                messages_per_user,
                seed,
                out,
            } => {
                use quill_harness::sim;
                let mut cfg = sim::SimConfig::new(nodes, users, seed);
                cfg.sample_users = sample_users.min(users);
                cfg.messages_per_user = messages_per_user;
                let report = tokio::task::spawn_blocking(move || {
                    sim::run(cfg, |row| eprintln!("done: {} ({} views)", row.event, row.views))
                })
                .await??;
                sim::print_table(&report);
                sim::write_chart(&report, &out)?;
                eprintln!("pictures: {0}-converge.png, {0}-moved.png", out.display());
                Ok(())
            }
        }
    })
}
