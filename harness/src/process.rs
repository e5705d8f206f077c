//! Starting, stopping and killing `quill node` processes.
//!
//! Each node gets its own loopback address 127.x.y.z with the standard test
//! ports, so that it looks like its own host (as behind DNS round robin) and
//! tests running side by side never share a port.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use hyper::Method;
use tokio::process::{Child, Command};

/// Ports every node uses on its own address.
pub const SMTP_PORT: u16 = 2525;
pub const LMTP_PORT: u16 = 2424;
pub const POP3_PORT: u16 = 2110;
pub const ADMIN_PORT: u16 = 8080;
/// Implicit-TLS SMTP (RFC 8314) and POP3.
pub const SMTPS_PORT: u16 = 2465;
pub const POP3S_PORT: u16 = 2995;
pub const IMAP_PORT: u16 = 2143;
pub const SUBMISSION_PORT: u16 = 2587;
pub const IMAPS_PORT: u16 = 2993;
pub const CLUSTER_PORT: u16 = 7400;

/// How long a node may take to answer its admin API after start.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a node may take to stop after SIGTERM before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(20);

/// Where the `quill` binary is: `$QUILL_BIN`, else next to the running
/// executable (or its parent, for test executables in `target/*/deps`).
pub fn quill_binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("QUILL_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join("quill");
        if candidate.is_file() {
            return Ok(candidate);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    bail!(
        "no quill binary next to {}: run `cargo build --bins` first or set QUILL_BIN",
        exe.display()
    )
}

pub use rustix::process::Signal;

/// Sends `sig` to process `pid` with kill(2) (no `kill` program spawned).
pub fn send_signal(pid: u32, sig: Signal) -> std::io::Result<()> {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("bad pid {pid}")))?;
    rustix::process::kill_process(pid, sig).map_err(std::io::Error::from)
}

/// Resolves on SIGINT, SIGTERM or SIGHUP with the signal's name: what
/// ends a foreground harness command (which then stops its nodes).
pub fn stop_signal() -> std::io::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (mut int, mut term, mut hup) = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
        signal(SignalKind::hangup())?,
    );
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
        }
    })
}

/// A loopback address no other node of this process (or, with high
/// probability, of another test process) uses: `127.<pid-derived>.<n>.1`.
pub fn fresh_loopback() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let p = std::process::id();
    Ipv4Addr::new(
        127,
        10 + (p % 240) as u8,
        (n % 250) as u8 + 1,
        1 + ((p / 240) % 250) as u8,
    )
}

#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub data: PathBuf,
    pub ip: Ipv4Addr,
    pub admin_token: String,
    /// More `quill node` flags (limits and the like).
    pub extra_args: Vec<String>,
    /// `quill` binary to run.
    pub binary: PathBuf,
    /// Start with [`crate::TRUST_LOOPBACK`] (true but for old releases).
    pub trust_loopback: bool,
    /// Log filter for the node.
    pub log: String,
    /// Cluster addresses of members to join through (none: a new cluster).
    pub seeds: Vec<SocketAddr>,
    /// The join token: for the first node the secret it makes the
    /// cluster's token from, for the others the full token.
    pub join_token: Option<String>,
    /// Run in its own process group and keep running when this handle (and
    /// the harness) goes away: for clusters that outlive the command that
    /// started them (`quill-harness up`).
    pub detached: bool,
}

impl NodeOptions {
    pub fn new(data: impl Into<PathBuf>, ip: Ipv4Addr) -> anyhow::Result<Self> {
        Ok(NodeOptions {
            data: data.into(),
            ip,
            admin_token: "harness-token".to_owned(),
            extra_args: Vec::new(),
            binary: quill_binary()?,
            trust_loopback: true,
            log: "info".to_owned(),
            seeds: Vec::new(),
            join_token: None,
            detached: false,
        })
    }

    pub fn arg(mut self, a: impl Into<String>) -> Self {
        self.extra_args.push(a.into());
        self
    }

    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.ip.into(), port)
    }
}

/// One running `quill node` process.
#[derive(Debug)]
pub struct NodeProcess {
    pub opts: NodeOptions,
    child: Option<Child>,
}

impl NodeProcess {
    /// A handle on a node started elsewhere (by another harness command):
    /// its addresses and admin API, no process to signal.
    pub fn attach(opts: NodeOptions) -> Self {
        NodeProcess { opts, child: None }
    }

    /// Starts the node and waits (with a deadline) until its admin API answers.
    pub async fn start(opts: NodeOptions) -> anyhow::Result<Self> {
        let mut node = NodeProcess { opts, child: None };
        node.spawn().await?;
        Ok(node)
    }

    pub fn smtp(&self) -> SocketAddr {
        self.opts.addr(SMTP_PORT)
    }
    pub fn lmtp(&self) -> SocketAddr {
        self.opts.addr(LMTP_PORT)
    }
    pub fn pop3(&self) -> SocketAddr {
        self.opts.addr(POP3_PORT)
    }
    pub fn smtps(&self) -> SocketAddr {
        self.opts.addr(SMTPS_PORT)
    }
    pub fn pop3s(&self) -> SocketAddr {
        self.opts.addr(POP3S_PORT)
    }
    pub fn imap(&self) -> SocketAddr {
        self.opts.addr(IMAP_PORT)
    }
    pub fn submission(&self) -> SocketAddr {
        self.opts.addr(SUBMISSION_PORT)
    }
    pub fn imaps(&self) -> SocketAddr {
        self.opts.addr(IMAPS_PORT)
    }
    /// The certificate a node serves when given none (self-signed).
    pub fn self_signed_cert(&self) -> PathBuf {
        self.opts.data.join("tls-self-signed.crt")
    }
    pub fn admin_addr(&self) -> SocketAddr {
        self.opts.addr(ADMIN_PORT)
    }
    pub fn cluster_addr(&self) -> SocketAddr {
        self.opts.addr(CLUSTER_PORT)
    }

    /// The cluster's full join token, as the founding node wrote it.
    pub fn join_token(&self) -> anyhow::Result<String> {
        let path = self.opts.data.join("join-token");
        Ok(std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .trim()
            .to_owned())
    }

    /// `cluster status --json` of this node.
    pub async fn status(&self) -> anyhow::Result<serde_json::Value> {
        self.admin(Method::GET, "/v1/cluster/status", None).await
    }
    pub fn log_path(&self) -> PathBuf {
        self.opts.data.join("node.log")
    }
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let o = &self.opts;
        std::fs::create_dir_all(&o.data)?;
        // Private: a node's log names users and addresses.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.log_path())?;
        let mut cmd = Command::new(&o.binary);
        cmd.arg("node")
            .arg("--data")
            .arg(&o.data)
            .arg("--cluster-addr")
            .arg(o.addr(CLUSTER_PORT).to_string())
            .arg("--smtp")
            .arg(o.addr(SMTP_PORT).to_string())
            .arg("--lmtp")
            .arg(o.addr(LMTP_PORT).to_string())
            .arg("--pop3")
            .arg(o.addr(POP3_PORT).to_string())
            .arg("--smtps")
            .arg(o.addr(SMTPS_PORT).to_string())
            .arg("--pop3s")
            .arg(o.addr(POP3S_PORT).to_string())
            .arg("--imap")
            .arg(o.addr(IMAP_PORT).to_string())
            .arg("--submission")
            .arg(o.addr(SUBMISSION_PORT).to_string())
            .arg("--imaps")
            .arg(o.addr(IMAPS_PORT).to_string())
            .arg("--admin")
            .arg(o.addr(ADMIN_PORT).to_string())
            .arg("--admin-token")
            .arg(&o.admin_token)
            .arg("--log")
            .arg(&o.log)
            .args(o.seeds.iter().flat_map(|s| ["--seed".to_owned(), s.to_string()]))
            .args(o.join_token.iter().flat_map(|t| ["--join-token".to_owned(), t.clone()]))
            .args(&crate::TRUST_LOOPBACK[..if o.trust_loopback { 2 } else { 0 }])
            .args(&o.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(!o.detached);
        if o.detached {
            // Ctrl-C in the harness's terminal must not reach the nodes:
            // the harness stops them in order.
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", o.binary.display()))?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let error = log
                    .lines()
                    .find(|l| l.starts_with("Error: "))
                    .unwrap_or("(no error line)");
                bail!(
                    "quill node exited at start ({status}): {error}\nlog:\n{}",
                    self.log_tail(30)
                );
            }
            let health = tokio::time::timeout(Duration::from_secs(2), async {
                let mut s = tokio::net::TcpStream::connect(self.admin_addr()).await?;
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                s.write_all(b"GET /health HTTP/1.0\r\n\r\n").await?;
                let mut buf = Vec::new();
                s.read_to_end(&mut buf).await?;
                Ok::<_, std::io::Error>(buf)
            })
            .await;
            // Ready: `/health` answers 200 (the store takes writes).
            if let Ok(Ok(buf)) = health
                && (buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200"))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "quill node not ready within {START_DEADLINE:?}; log:\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of the node's log, for error messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// SIGKILL, as a crash: nothing gets to flush or clean up.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.start_kill()?;
            c.wait().await?;
        }
        Ok(())
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after a deadline).
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else { return Ok(()) };
        if let Some(pid) = c.id() {
            let _ = send_signal(pid, Signal::TERM);
        }
        match tokio::time::timeout(STOP_DEADLINE, c.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    bail!("quill node exited with {status}; log:\n{}", self.log_tail(20));
                }
            }
            Err(_) => {
                c.start_kill()?;
                c.wait().await?;
                bail!("quill node did not stop within {STOP_DEADLINE:?}");
            }
        }
        Ok(())
    }

    /// Starts the node again on the same data directory and addresses.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.stop().await?;
        }
        self.spawn().await
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// One admin API call; an error status is an error.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let (status, reply) = self.admin_raw(method, path, body).await?;
        if !(200..300).contains(&status) {
            return Err(anyhow!("admin {path}: HTTP {status}: {reply}"));
        }
        Ok(reply)
    }

    pub async fn admin_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        quill_node::admin::client::call(
            &self.admin_addr().to_string(),
            &self.opts.admin_token,
            method,
            path,
            body,
        )
        .await
    }

    pub async fn add_domain(&self, domain: &str) -> anyhow::Result<()> {
        self.admin(
            Method::POST,
            "/v1/domains",
            Some(serde_json::json!({ "domain": domain })),
        )
        .await
        .map(drop)
    }

    pub async fn add_user(&self, address: &str, password: &str, quota_bytes: Option<u64>) -> anyhow::Result<()> {
        let body = serde_json::json!({ "address": address, "password": password, "quota_bytes": quota_bytes });
        self.admin(Method::POST, "/v1/users", Some(body)).await.map(drop)
    }

    /// The node's Prometheus metrics as (name, value) pairs.
    /// The users' addresses, as `GET /v1/users` lists them.
    pub async fn user_list(&self) -> anyhow::Result<Vec<String>> {
        let users = self.admin(Method::GET, "/v1/users", None).await?;
        Ok(users
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u["address"].as_str().map(str::to_owned))
            .collect())
    }

    pub async fn metrics(&self) -> anyhow::Result<Vec<(String, f64)>> {
        let (_, body) = self.admin_raw(Method::GET, "/metrics", None).await?;
        let text = body.as_str().unwrap_or_default().to_owned();
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect())
    }

    pub async fn metric(&self, name: &str) -> anyhow::Result<f64> {
        self.metrics()
            .await?
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
            .ok_or_else(|| anyhow!("no metric {name}"))
    }
}

/// Starts `n` nodes one after another under `base/n1..nN`, each on its own
/// loopback address; the first founds the cluster with join secret
/// `secret`, the others join through it.
pub async fn start_cluster(base: &Path, n: usize, secret: &str, log: &str) -> anyhow::Result<Vec<NodeProcess>> {
    start_cluster_with(base, n, secret, log, &[]).await
}

/// [`start_cluster`] with more `quill node` flags for every node.
pub async fn start_cluster_with(
    base: &Path,
    n: usize,
    secret: &str,
    log: &str,
    extra: &[&str],
) -> anyhow::Result<Vec<NodeProcess>> {
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    let mut first = NodeOptions::new(base.join("n1"), crate::fresh_loopback())?;
    first.join_token = Some(secret.to_owned());
    first.log = log.to_owned();
    first.extra_args = extra.clone();
    let first = NodeProcess::start(first).await.context("first node")?;
    let token = first.join_token()?;
    let seed = first.cluster_addr();
    let mut nodes = vec![first];
    for k in 2..=n {
        let mut o = NodeOptions::new(base.join(format!("n{k}")), crate::fresh_loopback())?;
        o.seeds = vec![seed];
        o.join_token = Some(token.clone());
        o.log = log.to_owned();
        o.extra_args = extra.clone();
        nodes.push(NodeProcess::start(o).await.with_context(|| format!("node {k}"))?);
    }
    Ok(nodes)
}

/// Whether every node in `live` reports the same epoch and leader, with
/// exactly `up` nodes up; then (epoch, leader).
pub async fn converged(live: &[&NodeProcess], up: usize) -> Option<(u64, u64)> {
    let mut seen = std::collections::BTreeSet::new();
    // All at once: the figure is how soon every node agrees.
    let mut asks = Vec::new();
    for n in live {
        let (addr, token) = (n.admin_addr().to_string(), n.opts.admin_token.clone());
        asks.push(tokio::spawn(async move {
            quill_node::admin::client::call(&addr, &token, Method::GET, "/v1/cluster/status", None).await
        }));
    }
    for a in asks {
        let (code, s) = a.await.ok()?.ok()?;
        if code != 200 {
            return None;
        }
        let n_up = s["nodes"].as_array()?.iter().filter(|x| x["state"] == "up").count();
        if n_up != up {
            return None;
        }
        seen.insert((s["epoch"].as_u64()?, s["leader"].as_u64()?));
    }
    (seen.len() == 1).then(|| *seen.iter().next().expect("one"))
}

/// Waits (bounded) for [`converged`].
pub async fn wait_converged(live: &[&NodeProcess], up: usize, deadline: Duration) -> anyhow::Result<(u64, u64)> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(x) = converged(live, up).await {
            return Ok(x);
        }
        if Instant::now() > end {
            let mut seen = Vec::new();
            for n in live {
                seen.push(match n.status().await {
                    Ok(s) => format!(
                        "{}: epoch {} leader {} states {:?}",
                        n.opts.ip,
                        s["epoch"],
                        s["leader"],
                        s["nodes"]
                            .as_array()
                            .map(|a| a.iter().map(|x| x["state"].to_string()).collect::<Vec<_>>())
                    ),
                    Err(e) => format!("{}: {e:#}", n.opts.ip),
                });
            }
            bail!("no agreement on a view with {up} nodes up within {deadline:?}: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (bounded) until `node` reports exactly `want` Raft voters.
pub async fn wait_voters(node: &NodeProcess, want: usize, deadline: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + deadline;
    loop {
        let s = node.status().await?;
        let voters = s["nodes"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|x| x["voter"] == true).count());
        if voters == want {
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{voters} voters instead of {want} after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A temporary directory removed on drop (see [`testkit::TempDir`]); with
/// [`or_fresh`] for commands given an optional `--dir`.
pub use testkit::TempDir;

/// `dir` if given, else a fresh temporary directory (removed when the
/// returned guard goes).
pub fn or_fresh(dir: Option<PathBuf>, label: &str) -> anyhow::Result<(Option<TempDir>, PathBuf)> {
    Ok(match dir {
        Some(d) => (None, d),
        None => {
            let t = TempDir::new(label)?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    })
}

/// Cuts `ip` off from the cluster's QUIC traffic (UDP, both ways) with
/// iptables rules on the loopback interface, until the returned guard is
/// dropped or [`Partition::heal`]ed. The node's client ports (TCP) stay
/// reachable: it is the link between nodes that breaks, and the cut-off
/// node goes on serving what it can. Needs root and `iptables`; the rules
/// match only this loopback address and carry a `quill-harness` comment.
#[derive(Debug)]
pub struct Partition {
    ip: Ipv4Addr,
    active: bool,
}

fn partition_rules(ip: Ipv4Addr) -> [Vec<String>; 2] {
    let ip = ip.to_string();
    let rule = |dir: &str| {
        [
            "INPUT",
            "-i",
            "lo",
            "-p",
            "udp",
            dir,
            &ip,
            "-m",
            "comment",
            "--comment",
            "quill-harness",
            "-j",
            "DROP",
        ]
        .map(str::to_owned)
        .to_vec()
    };
    [rule("-s"), rule("-d")]
}

fn iptables(op: &str, rule: &[String]) -> anyhow::Result<()> {
    let out = std::process::Command::new("iptables")
        .arg("-w")
        .arg(op)
        .args(rule)
        .output()
        .context("cannot run iptables (install it; partitions need root)")?;
    if !out.status.success() {
        bail!("iptables {op} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl Partition {
    /// Only 127.0.0.0/8 may be cut (tests and the harness never touch other
    /// traffic).
    pub fn cut(ip: Ipv4Addr) -> anyhow::Result<Partition> {
        if !ip.is_loopback() {
            bail!("refusing to partition {ip}: only loopback addresses");
        }
        let mut p = Partition { ip, active: true };
        for r in partition_rules(ip) {
            if let Err(e) = iptables("-A", &r) {
                p.heal();
                return Err(e);
            }
        }
        Ok(p)
    }

    /// Removes the rules (idempotent).
    pub fn heal(&mut self) {
        if std::mem::take(&mut self.active) {
            for r in partition_rules(self.ip) {
                // Delete every copy, should one have been added twice.
                while iptables("-D", &r).is_ok() {}
            }
        }
    }

    /// Whether partitions can be made here (iptables present and usable).
    pub fn available() -> bool {
        std::process::Command::new("iptables")
            .args(["-w", "-S", "INPUT"])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        self.heal();
    }
}

/// User plus system CPU time of process `pid` so far (Linux /proc), for
/// the benchmarks' `server_cpu_us` (node CPU per delivery).
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    use anyhow::Context;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    Ok(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// The CPU seconds of processes `pids` so far, summed.
pub fn pids_cpu_secs(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|p| cpu_secs(*p)).sum()
}
