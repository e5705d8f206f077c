//! The cluster commands of `quill-harness`: `up`, `add`, `kill`, `restart`,
//! `drain`, `status`, `down`, `load`, `verify`, `scale`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hyper::Method;

use crate::chart::{Chart, Marker, PALETTE, Series};
use crate::client::{Pop3Client, SmtpClient};
use crate::cluster::{ClusterState, NodeEntry, parse_node};
use crate::load::{self, LoadConfig, LoadReport, Record, Run, Target, VerifyReport};
use crate::process::{ADMIN_PORT, NodeProcess, POP3_PORT, SMTP_PORT, quill_binary};

pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("quill-cluster")
}

fn random_hex(n: usize) -> anyhow::Result<String> {
    Ok(quill_node::random_bytes()?
        .iter()
        .take(n)
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn parse_subnet(s: &str) -> anyhow::Result<[u8; 3]> {
    let parts: Vec<u8> = s.split('.').map(str::parse).collect::<Result<_, _>>()?;
    match parts[..] {
        [127, b, c] => Ok([127, b, c]),
        _ => bail!("--subnet must be three octets of 127.0.0.0/8, like 127.0.0"),
    }
}

fn target(state: &ClusterState, k: u8) -> Target {
    let ip = state.ip(k);
    Target {
        name: format!("n{k}"),
        smtp: SocketAddr::new(ip.into(), SMTP_PORT),
        pop3: SocketAddr::new(ip.into(), POP3_PORT),
        admin: SocketAddr::new(ip.into(), ADMIN_PORT),
    }
}

/// `up`: starts (or resumes) the cluster in `dir` and shows mail going in
/// on one node and out on another.
pub async fn up(
    dir: PathBuf,
    nodes: u8,
    replicas: usize,
    password: Option<String>,
    subnet: String,
    detach: bool,
) -> anyhow::Result<()> {
    if nodes == 0 || nodes > 250 {
        bail!("--nodes must be 1..=250");
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut state = match ClusterState::load(&dir) {
        Ok(s) => {
            if !s.live().is_empty() {
                bail!(
                    "a cluster is already running from {} (nodes {:?}); `{} down --dir {}` stops it",
                    dir.display(),
                    s.live(),
                    crate::process::harness_command(),
                    dir.display()
                );
            }
            println!("resuming the cluster in {} ({} nodes)", dir.display(), s.nodes.len());
            s
        }
        Err(_) => ClusterState {
            subnet: parse_subnet(&subnet)?,
            admin_token: random_hex(16)?,
            password: match password {
                Some(p) => p,
                None => random_hex(6)?,
            },
            replicas,
            secret: random_hex(16)?,
            binary: quill_binary()?,
            log: "info".into(),
            nodes: (1..=nodes).map(|k| NodeEntry { k, pid: None }).collect(),
        },
    };
    state.save(&dir)?;
    let ks: Vec<u8> = state.nodes.iter().map(|n| n.k).collect();
    for k in ks {
        println!("starting n{k} on {} ...", state.ip(k));
        let r = state.start_node(&dir, k).await;
        state.save(&dir)?;
        r?;
    }
    let handles = state.live_handles(&dir)?;
    let refs: Vec<&NodeProcess> = handles.iter().collect();
    crate::process::wait_converged(&refs, refs.len(), Duration::from_secs(60)).await?;
    let first = &handles[0];
    let domains = first.admin(Method::GET, "/v1/domains", None).await?.to_string();
    if !domains.contains("\"example.org\"") {
        first.add_domain("example.org").await?;
    }
    let users = first.admin(Method::GET, "/v1/users", None).await?.to_string();
    for u in ["alice@example.org", "bob@example.org"] {
        if !users.contains(&format!("\"{u}\"")) {
            first.add_user(u, &state.password, None).await?;
        }
    }
    // The directory reaches every node through Raft.
    for h in &handles {
        let end = Instant::now() + Duration::from_secs(30);
        while !h
            .admin(Method::GET, "/v1/users", None)
            .await
            .is_ok_and(|v| v.to_string().contains("bob@example.org"))
        {
            if Instant::now() > end {
                bail!("the users did not reach {}", h.opts.ip);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let reader = handles.get(1).unwrap_or(first);
    show_mail(first, reader, &state.password).await?;
    print_instructions(&state, &dir);
    if detach {
        println!(
            "\nThe nodes keep running; `{} down --dir {}` stops them.",
            crate::process::harness_command(),
            dir.display()
        );
        return Ok(());
    }
    println!("\nRunning. Press Ctrl-C to stop the cluster.");
    // Until Ctrl-C, SIGTERM or SIGHUP (the nodes are stopped: none is left
    // running without its harness), or until `down` (from elsewhere) has
    // stopped every node.
    let stop = crate::process::stop_signal()?;
    tokio::pin!(stop);
    loop {
        tokio::select! {
            sig = &mut stop => { println!("{sig}: stopping the cluster"); break; }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if ClusterState::load(&dir).is_ok_and(|s| s.live().is_empty()) {
                    println!("every node has stopped");
                    return Ok(());
                }
            }
        }
    }
    down(dir).await
}

/// Sends alice -> bob through `writer`'s SMTP and prints what `reader`'s
/// POP3 gives back.
pub async fn show_mail(writer: &NodeProcess, reader: &NodeProcess, password: &str) -> anyhow::Result<()> {
    let body = b"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: Hello from Quill\r\n\r\nIt works.\r\n";
    let mut smtp = SmtpClient::connect(writer.smtp(), false).await?;
    let replies = smtp.send_mail("alice@example.org", &["bob@example.org"], body).await?;
    smtp.quit().await?;
    println!("\nSMTP  {}: alice -> bob: {}", writer.smtp(), replies[0].text.trim());
    let mut pop = Pop3Client::connect(reader.pop3()).await?;
    pop.login("bob@example.org", password).await?;
    let list = pop.uidl().await?;
    let (n, _) = list.last().context("bob's mailbox is empty")?;
    let msg = pop.retr(*n).await?;
    pop.quit().await?;
    println!(
        "POP3  {}: bob has {} message(s); the newest one reads:\n",
        reader.pop3(),
        list.len()
    );
    for line in String::from_utf8_lossy(&msg).lines() {
        println!("    | {line}");
    }
    Ok(())
}

fn print_instructions(state: &ClusterState, dir: &Path) {
    let pw = &state.password;
    println!(
        "\nQuill cluster of {} nodes (R={}), data and logs in {}:",
        state.nodes.len(),
        state.replicas,
        dir.display()
    );
    for n in &state.nodes {
        let ip = state.ip(n.k);
        println!(
            "  n{}: SMTP {ip}:2525  LMTP {ip}:2424  POP3 {ip}:2110  admin {ip}:8080",
            n.k
        );
    }
    let a = state.ip(state.nodes[0].k);
    let b = state.ip(state.nodes.get(1).unwrap_or(&state.nodes[0]).k);
    let d = dir.display();
    let h = crate::process::harness_command();
    println!(
        r#"  users alice@example.org and bob@example.org, password {pw}; admin token {token}

Send a message to one node (swaks, or Python's smtplib):
  swaks --server {a}:2525 --from alice@example.org --to bob@example.org
  python3 -c "import smtplib; smtplib.SMTP('{a}', 2525).sendmail('alice@example.org', ['bob@example.org'], 'Subject: hi\r\n\r\nhello\r\n')"
Read it from another (Python's poplib):
  python3 -c "import poplib; p = poplib.POP3('{b}', 2110); p.user('bob@example.org'); p.pass_('{pw}'); print(p.stat()); print(b'\n'.join(p.retr(len(p.list()[1]))[1]).decode())"
Drive it:
  {h} status --dir {d}
  {h} load --dir {d} --duration 60s --kill n2@20s --restart n2@40s --out {d}/run1
  {h} verify --dir {d} --out {d}/run1
  {h} add|kill|restart|drain NODE --dir {d};  {h} down --dir {d}"#,
        token = state.admin_token
    );
}

pub async fn add(dir: PathBuf) -> anyhow::Result<()> {
    let mut state = ClusterState::load(&dir)?;
    let k = state.nodes.iter().map(|n| n.k).max().unwrap_or(0) + 1;
    state.nodes.push(NodeEntry { k, pid: None });
    let r = state.start_node(&dir, k).await;
    if r.is_err() {
        state.nodes.retain(|n| n.k != k);
    }
    state.save(&dir)?;
    r?;
    println!("n{k} joined on {}", state.ip(k));
    Ok(())
}

pub async fn kill(dir: PathBuf, node: String) -> anyhow::Result<()> {
    let mut state = ClusterState::load(&dir)?;
    let k = parse_node(&node)?;
    state.kill_node(k)?;
    state.save(&dir)?;
    println!("n{k} killed (SIGKILL)");
    Ok(())
}

pub async fn restart(dir: PathBuf, node: String) -> anyhow::Result<()> {
    let mut state = ClusterState::load(&dir)?;
    let k = parse_node(&node)?;
    state.stop_node(k)?;
    let r = state.start_node(&dir, k).await;
    state.save(&dir)?;
    r?;
    println!("n{k} running again");
    Ok(())
}

pub async fn drain(dir: PathBuf, node: String) -> anyhow::Result<()> {
    let state = ClusterState::load(&dir)?;
    let k = parse_node(&node)?;
    state.drain(&dir, k).await?;
    println!("n{k} is draining: it takes no new mail");
    Ok(())
}

pub async fn status(dir: PathBuf, json: bool) -> anyhow::Result<()> {
    let state = ClusterState::load(&dir)?;
    let s = state.any_status(&dir).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "epoch {}  leader {}  under_replicated {}",
        s["epoch"], s["leader"], s["under_replicated"]
    );
    println!(
        "{:<5} {:<18} {:<9} {:<6} {:>9} {:>12}  addr",
        "node", "id", "state", "voter", "messages", "bytes"
    );
    for n in s["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:<5} {:<18} {:<9} {:<6} {:>9} {:>12}  {}",
            n["name"].as_str().unwrap_or("?"),
            n["id"].to_string(),
            n["state"].as_str().unwrap_or("?"),
            n["voter"].to_string(),
            n["messages"].to_string(),
            n["bytes"].to_string(),
            n["addrs"]["smtp"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

pub async fn down(dir: PathBuf) -> anyhow::Result<()> {
    let mut state = ClusterState::load(&dir)?;
    let live = state.live();
    for k in &live {
        state.stop_node(*k)?;
        state.save(&dir)?;
        println!("n{k} stopped");
    }
    if live.is_empty() {
        println!("no node was running");
    }
    Ok(())
}

/// A fault of the schedule: `kill n2@30s`, `restart n2@60s`, `add @90s`.
#[derive(Debug, Clone)]
pub enum Fault {
    Kill(u8),
    Restart(u8),
    Add,
}

pub fn parse_at(s: &str) -> anyhow::Result<(String, Duration)> {
    let (node, at) = s
        .rsplit_once('@')
        .ok_or_else(|| anyhow!("bad fault {s:?}: want NODE@30s"))?;
    Ok((node.to_owned(), parse_duration(at)?))
}

pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let v: f64 = num.parse().map_err(|_| anyhow!("bad duration {s:?}"))?;
    let secs = match unit {
        "" | "s" => v,
        "ms" => v / 1000.0,
        "m" => v * 60.0,
        _ => bail!("bad duration unit in {s:?} (s, ms or m)"),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Where a load goes: the harness cluster in a directory, or nodes listed
/// in a hosts file (one IP per line, standard ports).
pub enum Cluster {
    Dir(PathBuf),
    Hosts(Vec<Ipv4Addr>),
}

fn read_hosts(path: &Path) -> anyhow::Result<Vec<Ipv4Addr>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let hosts: Vec<Ipv4Addr> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().with_context(|| format!("bad host {l:?}")))
        .collect::<anyhow::Result<_>>()?;
    if hosts.is_empty() {
        bail!("{} lists no hosts", path.display());
    }
    Ok(hosts)
}

pub struct LoadArgs {
    pub cluster: Cluster,
    pub token: Option<String>,
    pub password: Option<String>,
    pub cfg: LoadConfig,
    pub faults: Vec<(Duration, Fault)>,
    pub out: PathBuf,
    pub progress: bool,
}

/// Runs a load (with its fault schedule) and writes its figures, picture
/// and record into `out`.
pub async fn load(args: LoadArgs) -> anyhow::Result<LoadReport> {
    std::fs::create_dir_all(&args.out)?;
    let (targets, token, password, dir) = match &args.cluster {
        Cluster::Dir(dir) => {
            let state = ClusterState::load(dir)?;
            let live = state.live();
            if live.is_empty() {
                bail!("no node of {} is running", dir.display());
            }
            let t: Vec<Target> = live.iter().map(|k| target(&state, *k)).collect();
            (t, state.admin_token.clone(), state.password.clone(), Some(dir.clone()))
        }
        Cluster::Hosts(hosts) => {
            let t = hosts
                .iter()
                .map(|ip| Target {
                    name: ip.to_string(),
                    smtp: SocketAddr::new((*ip).into(), SMTP_PORT),
                    pop3: SocketAddr::new((*ip).into(), POP3_PORT),
                    admin: SocketAddr::new((*ip).into(), ADMIN_PORT),
                })
                .collect();
            let token = args.token.clone().context("--hosts needs --admin-token")?;
            let pw = args.password.clone().context("--hosts needs --password")?;
            (t, token, pw, None)
        }
    };
    if dir.is_none() && !args.faults.is_empty() {
        bail!("faults need a harness cluster (--dir), not --hosts");
    }
    let mut cfg = args.cfg.clone();
    cfg.password = password;
    println!("creating {} load users (if missing) ...", cfg.users);
    load::ensure_users(targets[0].admin, &token, cfg.users, &cfg.password).await?;
    // Every node must know them before the first session.
    let last = load::load_user(cfg.users);
    for t in &targets {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let r = quill_node::admin_client::call(&t.admin.to_string(), &token, Method::GET, "/v1/users", None).await;
            if r.is_ok_and(|(_, v)| v.to_string().contains(&last)) {
                break;
            }
            if Instant::now() > end {
                bail!("the load users did not reach {}", t.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let run = Run::new(cfg.clone(), targets);
    let poller = tokio::spawn(run.clone().poll_status(token.clone()));
    let faults = dir.map(|dir| tokio::spawn(run_faults(run.clone(), dir, args.faults.clone())));
    let bar = if args.progress {
        let bar = indicatif::ProgressBar::new(cfg.duration_s.ceil() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} s  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        Some(bar)
    } else {
        None
    };
    let ticker = bar.clone().map(|bar| {
        let run = run.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let (d, r, e) = run.counts();
                bar.set_position(run.elapsed().as_secs());
                bar.set_message(format!(
                    "delivered {d}  retrieved {r}  errors {e}  ops {}",
                    run.ops_done()
                ));
            }
        })
    });
    run.drive().await;
    run.stop();
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(f) = faults {
        f.abort();
    }
    let _ = poller.await;
    let report = run.report();
    let record = run.record();
    load::write_json(&args.out.join("load.json"), &report)?;
    load::write_json(&args.out.join("record.json"), &record)?;
    let chart = timeline_chart(&report);
    std::fs::write(args.out.join("throughput.svg"), chart.svg())?;
    std::fs::write(args.out.join("throughput.png"), chart.png()?)?;
    print_summary(&report, &record, &args.out);
    Ok(report)
}

async fn run_faults(run: Arc<Run>, dir: PathBuf, mut faults: Vec<(Duration, Fault)>) {
    faults.sort_by_key(|f| f.0);
    for (at, fault) in faults {
        let wait = at.saturating_sub(run.elapsed());
        tokio::time::sleep(wait).await;
        let result = async {
            let mut state = ClusterState::load(&dir)?;
            let what = match fault {
                Fault::Kill(k) => {
                    state.kill_node(k)?;
                    let name = format!("n{k}");
                    run.targets.write().expect("lock").retain(|t| t.name != name);
                    format!("kill n{k}")
                }
                Fault::Restart(k) => {
                    state.stop_node(k)?;
                    state.start_node(&dir, k).await?;
                    let t = target(&state, k);
                    if !run.targets.read().expect("lock").iter().any(|x| x.name == t.name) {
                        run.add_target(t);
                    }
                    format!("restart n{k}")
                }
                Fault::Add => {
                    let k = state.nodes.iter().map(|n| n.k).max().unwrap_or(0) + 1;
                    state.nodes.push(NodeEntry { k, pid: None });
                    state.start_node(&dir, k).await?;
                    run.add_target(target(&state, k));
                    format!("add n{k}")
                }
            };
            state.save(&dir)?;
            anyhow::Ok(what)
        }
        .await;
        match result {
            Ok(what) => run.event(what),
            Err(e) => run.event(format!("fault failed: {e:#}")),
        }
    }
}

fn timeline_chart(r: &LoadReport) -> Chart {
    // Whole seconds only: the last, partial one would look like a drop.
    let whole = r.elapsed_s.floor() as u64;
    let pts = |f: &dyn Fn(&load::Second) -> f64| -> Vec<(f64, f64)> {
        r.seconds
            .iter()
            .filter(|s| s.t < whole)
            .map(|s| (s.t as f64 + 0.5, f(s)))
            .collect()
    };
    let cfg = r.config.clone().unwrap_or_else(|| LoadConfig {
        users: 0,
        zipf: 0.0,
        pop_ratio: 0.0,
        rate: None,
        connections: 0,
        duration_s: 0.0,
        max_ops: 0,
        seed: 0,
        password: String::new(),
    });
    Chart {
        title: "Quill under load: throughput over time".into(),
        x_label: "time since start (s)".into(),
        y_label: "operations per second".into(),
        note: Some(format!(
            "{} users, Zipf s={}, {:.0}% POP3 sessions, {}; dashed red lines: faults injected",
            cfg.users,
            cfg.zipf,
            cfg.pop_ratio * 100.0,
            match cfg.rate {
                Some(r) => format!("open loop {r}/s"),
                None => format!("closed loop, {} connections", cfg.connections),
            }
        )),
        series: vec![
            Series {
                name: "deliveries/s".into(),
                points: pts(&|s| s.deliveries as f64),
                color: PALETTE[0],
            },
            Series {
                name: "messages retrieved/s".into(),
                points: pts(&|s| s.retrievals as f64),
                color: PALETTE[1],
            },
            Series {
                name: "errors/s".into(),
                points: pts(&|s| s.errors.values().sum::<u64>() as f64),
                color: PALETTE[5],
            },
        ],
        markers: r
            .events
            .iter()
            .map(|e| Marker {
                x: e.t,
                label: e.what.clone(),
            })
            .collect(),
        x_integer: false,
    }
}

fn print_summary(r: &LoadReport, rec: &Record, out: &Path) {
    let mut errors: std::collections::BTreeMap<&str, u64> = Default::default();
    for s in &r.seconds {
        for (k, v) in &s.errors {
            *errors.entry(k.as_str()).or_default() += v;
        }
    }
    println!("\n| figure | value |\n|---|---:|");
    println!("| elapsed | {:.1} s |", r.elapsed_s);
    println!(
        "| deliveries acknowledged | {} ({:.0}/s) |",
        r.deliveries,
        r.deliveries as f64 / r.elapsed_s
    );
    println!(
        "| messages retrieved | {} ({:.0}/s) |",
        r.retrievals,
        r.retrievals as f64 / r.elapsed_s
    );
    println!(
        "| delivery latency p50 / p99 | {:.1} / {:.1} ms |",
        r.delivery_p50_ms, r.delivery_p99_ms
    );
    println!("| deleted (QUIT +OK) | {} |", rec.deleted.len());
    println!("| deliveries without a final reply | {} |", rec.unknown.len());
    for (k, v) in &errors {
        println!("| errors {k} | {v} |");
    }
    let under = r.seconds.iter().rev().find_map(|s| s.under_replicated);
    println!(
        "| under-replicated at the end | {} |",
        under.map_or("?".into(), |u| u.to_string())
    );
    for e in &r.events {
        println!("| event at {:.1} s | {} |", e.t, e.what);
    }
    println!(
        "\nwritten: {0}/load.json, {0}/record.json, {0}/throughput.svg, {0}/throughput.png",
        out.display()
    );
}

/// `verify`: reads every load user's mailbox from one live node.
pub async fn verify(cluster: Cluster, password: Option<String>, out: PathBuf) -> anyhow::Result<VerifyReport> {
    let path = out.join("record.json");
    let record: Record = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("no load record at {}", path.display()))?,
    )?;
    let (node, password) = match cluster {
        Cluster::Dir(dir) => {
            let state = ClusterState::load(&dir)?;
            let k = *state.live().first().ok_or_else(|| anyhow!("no node is running"))?;
            (target(&state, k), state.password.clone())
        }
        Cluster::Hosts(hosts) => {
            let ip = hosts[0];
            (
                Target {
                    name: ip.to_string(),
                    smtp: SocketAddr::new(ip.into(), SMTP_PORT),
                    pop3: SocketAddr::new(ip.into(), POP3_PORT),
                    admin: SocketAddr::new(ip.into(), ADMIN_PORT),
                },
                password.context("--hosts needs --password")?,
            )
        }
    };
    let report = load::verify(&record, &node, &password).await?;
    load::write_json(&out.join("verify.json"), &report)?;
    println!(
        "verify via {}: {} users, {} messages expected, {} present once with their checksum; \
         lost {}, duplicated {}, corrupt {}, deleted but present {}, unexpected {}, \
         unacknowledged but present {} (allowed)",
        node.name,
        report.users_checked,
        report.expected_present,
        report.present_ok,
        report.lost.len(),
        report.duplicated.len(),
        report.corrupt.len(),
        report.resurrected.len(),
        report.unexpected,
        report.unknown_present,
    );
    println!("written: {}/verify.json", out.display());
    if !report.ok() {
        bail!("verification failed: {report:?}");
    }
    Ok(report)
}

pub fn hosts_or_dir(dir: PathBuf, hosts: Option<PathBuf>) -> anyhow::Result<Cluster> {
    Ok(match hosts {
        Some(h) => Cluster::Hosts(read_hosts(&h)?),
        None => Cluster::Dir(dir),
    })
}

/// `scale`: the same closed-loop load on clusters of each size and R.
#[allow(clippy::too_many_arguments)]
pub async fn scale(
    dir: PathBuf,
    sizes: Vec<u8>,
    replicas: Vec<usize>,
    cfg: LoadConfig,
    warmup: Duration,
    hosts: Option<PathBuf>,
    token: Option<String>,
    password: Option<String>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir)?;
    let mut rows: Vec<(u8, usize, f64, f64)> = Vec::new();
    if let Some(h) = hosts {
        let hosts = read_hosts(&h)?;
        let n = hosts.len() as u8;
        let out = dir.join(format!("scale-hosts-{n}"));
        let r = load(LoadArgs {
            cluster: Cluster::Hosts(hosts),
            token,
            password,
            cfg: cfg.clone(),
            faults: Vec::new(),
            out,
            progress: false,
        })
        .await?;
        let (d, q) = r.rates_after(warmup.as_secs());
        rows.push((n, 0, d, q));
    } else {
        for (i, &r) in replicas.iter().enumerate() {
            for (j, &n) in sizes.iter().enumerate() {
                let cdir = dir.join(format!("cluster-{n}n-r{r}"));
                let _ = std::fs::remove_dir_all(&cdir);
                // A fresh subnet per cluster: no waiting on sockets of the last.
                let subnet = format!("127.77.{}", 1 + i * sizes.len() + j);
                up(cdir.clone(), n, r, Some("scale-password".into()), subnet, true).await?;
                let rep = load(LoadArgs {
                    cluster: Cluster::Dir(cdir.clone()),
                    token: None,
                    password: None,
                    cfg: cfg.clone(),
                    faults: Vec::new(),
                    out: cdir.join("load"),
                    progress: false,
                })
                .await;
                down(cdir.clone()).await?;
                let (d, q) = rep?.rates_after(warmup.as_secs());
                rows.push((n, r, d, q));
            }
        }
    }
    println!("\n| nodes | R | deliveries/s | retrievals/s |\n|---:|---:|---:|---:|");
    for (n, r, d, q) in &rows {
        println!("| {n} | {r} | {d:.0} | {q:.0} |");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut series = Vec::new();
    let rs: Vec<usize> = {
        let mut v: Vec<usize> = rows.iter().map(|r| r.1).collect();
        v.dedup();
        v
    };
    for (i, r) in rs.iter().enumerate() {
        series.push(Series {
            name: if *r == 0 {
                "deliveries/s (hosts)".into()
            } else {
                format!("deliveries/s, R={r}")
            },
            points: rows.iter().filter(|x| x.1 == *r).map(|x| (x.0 as f64, x.2)).collect(),
            color: PALETTE[i % PALETTE.len()],
        });
    }
    let chart = Chart {
        title: "Quill: delivery throughput vs cluster size".into(),
        x_label: "nodes".into(),
        y_label: "deliveries per second".into(),
        note: Some(format!(
            "all nodes and the load generator shared this machine's {cores} cores: absolute numbers say little; \
             first {}s of each run not counted",
            warmup.as_secs()
        )),
        series,
        markers: Vec::new(),
        x_integer: true,
    };
    std::fs::write(dir.join("scale.svg"), chart.svg())?;
    std::fs::write(dir.join("scale.png"), chart.png()?)?;
    load::write_json(
        &dir.join("scale.json"),
        &rows
            .iter()
            .map(|(n, r, d, q)| serde_json::json!({"nodes": n, "replicas": r, "deliveries_per_s": d, "retrievals_per_s": q}))
            .collect::<Vec<_>>(),
    )?;
    println!("written: {0}/scale.json, {0}/scale.svg, {0}/scale.png", dir.display());
    Ok(())
}
