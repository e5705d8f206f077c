//! `quill-harness`: start Quill nodes and put load on them.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use quill_harness::bench::{self, DeliverPlan};
use quill_harness::cli;
use quill_harness::fresh_loopback;
use quill_harness::load::LoadConfig;
use quill_harness::process::{NodeOptions, NodeProcess, TempDir};
use quill_harness::workload::percentile;

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
    /// LMTP 2424, POP3 2110 and admin 8080; domain example.org with users
    /// alice and bob; send a mail on one node and read it on another; print
    /// how to connect; run until Ctrl-C (or `down`). With an existing
    /// cluster in DIR, start its nodes again.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: u8,
        #[arg(long, default_value_t = 2)]
        replicas: usize,
        /// The cluster's directory (state, node data, logs).
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
        /// Password of alice, bob and the load users [default: generated, printed].
        #[arg(long)]
        password: Option<String>,
        /// First three octets of the nodes' addresses.
        #[arg(long, default_value = "127.0.0")]
        subnet: String,
        /// Leave the cluster running and return (stop it with `down`).
        #[arg(long)]
        detach: bool,
    },
    /// Start one more node, joining the cluster in DIR.
    Add {
        #[arg(long, default_value_os_t = cli::default_dir())]
        dir: PathBuf,
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
        /// Measure already running nodes instead (one IP per line,
        /// standard ports); needs --admin-token and --password.
        #[arg(long)]
        hosts: Option<PathBuf>,
        #[arg(long)]
        admin_token: Option<String>,
        #[arg(long)]
        password: Option<String>,
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
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Users user0001..userNNNN@example.com, password passNNNN (as the Dovecot baseline).
        #[arg(long, default_value_t = 100)]
        users: u32,
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
    /// Delivery throughput with replication: for each NODES:R pair, start a
    /// cluster of NODES with `--replicas R`, deliver the same load over SMTP
    /// with the connections spread over every node, and print msgs/s.
    BenchReplication {
        /// NODES:R pairs, run one after the other in this order.
        #[arg(long, value_delimiter = ',', default_value = "1:1,3:1,3:2,3:3")]
        configs: Vec<String>,
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        #[arg(long, default_value_t = 16)]
        connections: usize,
        #[arg(long, default_value_t = 100)]
        users: u32,
        /// Data directory [default: a fresh one under /tmp, removed afterwards].
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// Which cluster a command talks to.
#[derive(clap::Args, Clone)]
struct TargetArgs {
    /// The harness cluster's directory.
    #[arg(long, default_value_os_t = cli::default_dir())]
    dir: PathBuf,
    /// Nodes not started by the harness: a file with one IP per line
    /// (standard ports); needs --admin-token and --password.
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
        })
    }
}

fn faults(kill: &[String], restart: &[String], add: &[String]) -> anyhow::Result<Vec<(Duration, cli::Fault)>> {
    let mut out = Vec::new();
    for k in kill {
        let (n, at) = cli::parse_at(k)?;
        out.push((at, cli::Fault::Kill(quill_harness::cluster::parse_node(&n)?)));
    }
    for r in restart {
        let (n, at) = cli::parse_at(r)?;
        out.push((at, cli::Fault::Restart(quill_harness::cluster::parse_node(&n)?)));
    }
    for a in add {
        let (_, at) = cli::parse_at(a)?;
        out.push((at, cli::Fault::Add));
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Victim {
    Leader,
    Follower,
    Both,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Proto {
    Smtp,
    Lmtp,
    Both,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Cmd::Up {
                nodes,
                replicas,
                dir,
                password,
                subnet,
                detach,
            } => cli::up(dir, nodes, replicas, password, subnet, detach).await,
            Cmd::Add { dir } => cli::add(dir).await,
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
                out,
                quiet,
            } => cli::load(cli::LoadArgs {
                cluster: cli::hosts_or_dir(target.dir, target.hosts)?,
                token: target.admin_token,
                password: target.password,
                cfg: load.config()?,
                faults: faults(&kill, &restart, &add)?,
                out,
                progress: !quiet,
            })
            .await
            .map(drop),
            Cmd::Verify { target, out } => {
                cli::verify(cli::hosts_or_dir(target.dir, target.hosts)?, target.password, out)
                    .await
                    .map(drop)
            }
            Cmd::Scale {
                nodes,
                replicas,
                dir,
                hosts,
                admin_token,
                password,
                warmup,
                load,
            } => {
                cli::scale(
                    dir,
                    nodes,
                    replicas,
                    load.config()?,
                    warmup,
                    hosts,
                    admin_token,
                    password,
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
            Cmd::BenchNode {
                messages,
                connections,
                users,
                proto,
                dir,
                log,
                seed,
            } => bench_node(messages, connections, users, proto, dir, log, seed).await,
            Cmd::BenchReplication {
                configs,
                messages,
                connections,
                users,
                dir,
                seed,
            } => bench_replication(configs, messages, connections, users, dir, seed).await,
        }
    })
}

async fn demo(dir: Option<PathBuf>, password: Option<String>, exit: bool) -> anyhow::Result<()> {
    let dir = dir.unwrap_or_else(|| std::env::temp_dir().join(format!("quill-demo-{}", std::process::id())));
    let password = match password {
        Some(p) => p,
        None => quill_node::random_bytes()?
            .iter()
            .take(6)
            .map(|b| format!("{b:02x}"))
            .collect(),
    };
    let mut opts = NodeOptions::new(&dir, Ipv4Addr::LOCALHOST)?;
    opts.admin_token = quill_node::random_bytes()?
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    opts.extra_args = vec!["--replicas".into(), "1".into()];
    println!("starting a Quill node in {} ...", dir.display());
    let mut node = NodeProcess::start(opts)
        .await
        .context("the demo node did not start (ports 2525, 2424, 2110, 8080 and 7400 on 127.0.0.1 must be free)")?;
    let result = demo_steps(&node, &password).await;
    if let Err(e) = &result {
        println!("demo failed: {e:#}\nnode log:\n{}", node.log_tail(20));
    }
    if result.is_ok() && !exit {
        println!("\nRunning. Press Ctrl-C to stop the node.");
        let sig = quill_harness::process::stop_signal()?.await;
        println!("{sig}: stopping the node");
    }
    node.stop().await?;
    println!("node stopped; its data stays in {}", dir.display());
    result
}

async fn demo_steps(node: &NodeProcess, password: &str) -> anyhow::Result<()> {
    if !node
        .admin(hyper::Method::GET, "/v1/domains", None)
        .await?
        .to_string()
        .contains("\"example.org\"")
    {
        node.add_domain("example.org").await?;
    }
    let users = node.admin(hyper::Method::GET, "/v1/users", None).await?.to_string();
    for u in ["alice@example.org", "bob@example.org"] {
        if users.contains(&format!("\"{u}\"")) {
            // A rerun on the same data directory: give them this run's password.
            let body = serde_json::json!({ "password": password });
            node.admin(hyper::Method::PUT, &format!("/v1/users/{u}/password"), Some(body))
                .await?;
        } else {
            node.add_user(u, password, None).await?;
        }
    }
    cli::show_mail(node, node, password).await?;
    let token = &node.opts.admin_token;
    let quill = node.opts.binary.display();
    println!(
        r#"
Quill is serving on 127.0.0.1:
  SMTP 127.0.0.1:2525   LMTP 127.0.0.1:2424   POP3 127.0.0.1:2110   admin 127.0.0.1:8080
  users alice@example.org and bob@example.org, password {password}

Send a message (swaks, or Python's smtplib):
  swaks --server 127.0.0.1:2525 --from alice@example.org --to bob@example.org
  python3 -c "import smtplib; smtplib.SMTP('127.0.0.1', 2525).sendmail('alice@example.org', ['bob@example.org'], 'Subject: hi\r\n\r\nhello\r\n')"
Read it (Python's poplib):
  python3 -c "import poplib; p = poplib.POP3('127.0.0.1', 2110); p.user('bob@example.org'); p.pass_('{password}'); print(p.stat()); print(b'\n'.join(p.retr(len(p.list()[1]))[1]).decode())"
Administer it:
  {quill} admin --node 127.0.0.1:8080 --token {token} cluster status
  {quill} admin --node 127.0.0.1:8080 --token {token} user add carol@example.org --password secret"#
    );
    Ok(())
}

fn ms(sorted: &[f64], p: f64) -> String {
    format!("{:.1}", percentile(sorted, p))
}

async fn bench_node(
    messages: u64,
    connections: usize,
    users: u32,
    proto: Proto,
    dir: Option<PathBuf>,
    log: String,
    seed: u64,
) -> anyhow::Result<()> {
    let temp;
    let dir = match dir {
        Some(d) => d,
        None => {
            temp = TempDir::new("bench")?;
            temp.path().to_path_buf()
        }
    };
    let mut opts = NodeOptions::new(dir.join("node"), fresh_loopback())?;
    opts.log = log;
    // One node holds one copy: nothing to count as under-replicated.
    opts.extra_args = vec!["--replicas".into(), "1".into()];
    let mut node = NodeProcess::start(opts).await?;
    println!(
        "node {} ({}), data in {}",
        node.opts.ip,
        node.opts.binary.display(),
        dir.display()
    );
    node.add_domain("example.com").await?;
    let accounts: Vec<(String, String)> = (1..=users)
        .map(|i| (format!("user{i:04}@example.com"), format!("pass{i:04}")))
        .collect();
    for (u, p) in &accounts {
        node.add_user(u, p, None).await?;
    }
    let protos: &[bool] = match proto {
        Proto::Smtp => &[false],
        Proto::Lmtp => &[true],
        Proto::Both => &[false, true],
    };
    for &lmtp in protos {
        let addr = if lmtp { node.lmtp() } else { node.smtp() };
        let fs0 = (
            node.metric("quill_store_fsyncs_total").await?,
            node.metric("quill_store_ops_total").await?,
        );
        let plan = DeliverPlan::bench(vec![addr], lmtp, messages, connections, users, seed);
        let d = bench::deliver(plan).await;
        let fs1 = (
            node.metric("quill_store_fsyncs_total").await?,
            node.metric("quill_store_ops_total").await?,
        );
        let bytes: usize = d.acked.iter().map(|s| s.size).sum();
        println!(
            "deliver proto={} n={messages} c={connections} ok={} failed={} mean_size={} secs={:.2} msgs_per_sec={:.1} \
             lat_ms_p50={} p99={} fsyncs={} ops_per_fsync={:.1}",
            if lmtp { "lmtp" } else { "smtp" },
            d.acked.len(),
            d.unknown.len(),
            bytes / d.acked.len().max(1),
            d.secs,
            d.acked.len() as f64 / d.secs,
            ms(&d.latencies_ms, 50.0),
            ms(&d.latencies_ms, 99.0),
            fs1.0 - fs0.0,
            (fs1.1 - fs0.1) / (fs1.0 - fs0.0).max(1.0),
        );
        if let Some(e) = d.errors.first() {
            println!("  first error: {e}");
        }
        let r = bench::retrieve(vec![node.pop3()], accounts.clone(), connections, true).await;
        let fetched_bytes: usize = r.fetched.iter().map(|f| f.size).sum();
        println!(
            "pop3 retr+dele users={users} c={connections} msgs={} MB={:.1} errors={} secs={:.2} msgs_per_sec={:.1} \
             retr_lat_ms_p50={} p99={}",
            r.fetched.len(),
            fetched_bytes as f64 / 1e6,
            r.errors.len(),
            r.secs,
            r.fetched.len() as f64 / r.secs,
            ms(&r.latencies_ms, 50.0),
            ms(&r.latencies_ms, 99.0),
        );
        if let Some(e) = r.errors.first() {
            println!("  first error: {e}");
        }
        if r.fetched.len() != d.acked.len() {
            bail!(
                "fetched {} messages but {} were acknowledged",
                r.fetched.len(),
                d.acked.len()
            );
        }
    }
    node.stop().await?;
    Ok(())
}

async fn bench_failover(n: usize, trials: usize, victim: Victim, dir: Option<PathBuf>) -> anyhow::Result<()> {
    use quill_harness::process::{start_cluster, wait_converged, wait_voters};
    if n < 3 {
        bail!("--nodes must be at least 3 (a majority must survive a kill)");
    }
    let temp;
    let dir = match dir {
        Some(d) => d,
        None => {
            temp = TempDir::new("failover")?;
            temp.path().to_path_buf()
        }
    };
    let log = std::env::var("QUILL_LOG").unwrap_or_else(|_| "warn".into());
    let mut nodes = start_cluster(&dir, n, "bench-failover", &log).await?;
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    wait_converged(&all, n, Duration::from_secs(60)).await?;
    // The leader promotes learners to voters once a second; a kill before
    // that would measure a cluster that cannot elect anyone.
    let voters_wanted = if n.min(5).is_multiple_of(2) {
        n.min(5) - 1
    } else {
        n.min(5)
    };
    wait_voters(&nodes[0], voters_wanted, Duration::from_secs(60)).await?;
    println!("{n} nodes up, {voters_wanted} voters; {trials} trials per victim kind");
    let kinds: &[bool] = match victim {
        Victim::Leader => &[true],
        Victim::Follower => &[false],
        Victim::Both => &[true, false],
    };
    for &kill_leader in kinds {
        let mut times = Vec::with_capacity(trials);
        for trial in 0..trials {
            let all: Vec<&NodeProcess> = nodes.iter().collect();
            let (_, leader) = wait_converged(&all, n, Duration::from_secs(60)).await?;
            // Let the voter set heal after the last restart, too.
            wait_voters(&nodes[0], voters_wanted, Duration::from_secs(60)).await?;
            let mut idx = None;
            for (i, node) in nodes.iter().enumerate() {
                let me = node.status().await?["self"].as_u64();
                if (me == Some(leader)) == kill_leader {
                    idx = Some(i);
                    if !kill_leader && trial % (n - 1) == 0 {
                        break;
                    }
                }
            }
            let i = idx.context("no node of that kind")?;
            let t0 = std::time::Instant::now();
            nodes[i].kill9().await?;
            let survivors: Vec<&NodeProcess> = nodes
                .iter()
                .enumerate()
                .filter(|(k, _)| *k != i)
                .map(|(_, x)| x)
                .collect();
            wait_converged(&survivors, n - 1, Duration::from_secs(60)).await?;
            let secs = t0.elapsed().as_secs_f64();
            times.push(secs);
            println!(
                "  kill -9 {} (trial {}): new view on all {} survivors after {:.2} s",
                if kill_leader { "leader" } else { "follower" },
                trial + 1,
                n - 1,
                secs
            );
            nodes[i].restart().await?;
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "failover victim={} nodes={n} trials={trials} median_s={:.2} max_s={:.2} min_s={:.2}",
            if kill_leader { "leader" } else { "follower" },
            percentile(&times, 50.0),
            times.last().copied().unwrap_or(f64::NAN),
            times.first().copied().unwrap_or(f64::NAN),
        );
    }
    for node in &mut nodes {
        node.stop().await?;
    }
    Ok(())
}

async fn bench_replication(
    configs: Vec<String>,
    messages: u64,
    connections: usize,
    users: u32,
    dir: Option<PathBuf>,
    seed: u64,
) -> anyhow::Result<()> {
    let temp;
    let dir = match dir {
        Some(d) => d,
        None => {
            temp = TempDir::new("bench-repl")?;
            temp.path().to_path_buf()
        }
    };
    let mut pairs = Vec::new();
    for c in &configs {
        let (n, r) = c
            .split_once(':')
            .with_context(|| format!("bad config {c:?}: want NODES:R"))?;
        pairs.push((n.parse::<usize>()?, r.parse::<usize>()?));
    }
    let mut rows: Vec<(usize, usize, f64, f64, f64, u64, u64)> = Vec::new();
    for (i, &(n, r)) in pairs.iter().enumerate() {
        let base = dir.join(format!("run{i}-{n}n-r{r}"));
        let mut nodes = Vec::new();
        for k in 1..=n {
            let mut o = NodeOptions::new(base.join(format!("n{k}")), fresh_loopback())?;
            o.log = "warn".into();
            o.extra_args = vec!["--replicas".into(), r.to_string()];
            if let Some(first) = nodes.first() {
                let first: &NodeProcess = first;
                o.seeds = vec![first.cluster_addr()];
                o.join_token = Some(first.join_token()?);
            } else {
                o.join_token = Some("bench-replication".into());
            }
            nodes.push(NodeProcess::start(o).await?);
        }
        let all: Vec<&NodeProcess> = nodes.iter().collect();
        quill_harness::process::wait_converged(&all, n, Duration::from_secs(60)).await?;
        nodes[0].add_domain("example.com").await?;
        for u in 1..=users {
            nodes[0]
                .add_user(&format!("user{u:04}@example.com"), &format!("pass{u:04}"), None)
                .await?;
        }
        // Every node must know every user before the load starts.
        let last = format!("user{users:04}@example.com");
        for node in &nodes {
            let end = std::time::Instant::now() + Duration::from_secs(30);
            while !node
                .admin(hyper::Method::GET, "/v1/users", None)
                .await
                .is_ok_and(|v| v.to_string().contains(&last))
            {
                if std::time::Instant::now() > end {
                    bail!("users did not reach {}", node.opts.ip);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let addrs = nodes.iter().map(|x| x.smtp()).collect();
        let plan = DeliverPlan::bench(addrs, false, messages, connections, users, seed);
        let d = bench::deliver(plan).await;
        let s = nodes[0].status().await?;
        let entries: u64 = s["nodes"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["messages"].as_u64()).sum())
            .unwrap_or(0);
        let under = s["under_replicated"].as_u64().unwrap_or(0);
        let rate = d.acked.len() as f64 / d.secs;
        println!(
            "nodes={n} replicas={r} ok={} failed={} secs={:.2} msgs_per_sec={rate:.1} lat_ms_p50={} p99={} \
             entries={entries} under_replicated={under}",
            d.acked.len(),
            d.unknown.len(),
            d.secs,
            ms(&d.latencies_ms, 50.0),
            ms(&d.latencies_ms, 99.0),
        );
        rows.push((
            n,
            r,
            rate,
            percentile(&d.latencies_ms, 50.0),
            percentile(&d.latencies_ms, 99.0),
            entries,
            under,
        ));
        for node in &mut nodes {
            node.stop().await?;
        }
    }
    println!();
    println!("| nodes | R | msgs/s | vs first | p50 ms | p99 ms | entries stored | under-replicated |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    let first = rows.first().map_or(1.0, |r| r.2);
    for (n, r, rate, p50, p99, entries, under) in rows {
        println!(
            "| {n} | {r} | {rate:.0} | {:.0} % | {p50:.1} | {p99:.1} | {entries} | {under} |",
            100.0 * rate / first
        );
    }
    Ok(())
}
