//! The commands of `quill-harness`, one module each; `main.rs` holds the
//! command line and the dispatch only.
//!
//! Cluster commands: `up`, `add`, `kill`, `restart`, `drain`, `status`,
//! `down` ([`up`](mod@up), [`nodes`]), `upgrade` ([`upgrade`](mod@upgrade)), `load` with its
//! fault schedule ([`load`](mod@load)),
//! `verify`, `scale`, `chaos`; one node: `demo`; benchmarks: `bench-node`,
//! `bench-failover`, `bench-replication`, `bench-heal`, `bench-tls`,
//! `bench-backup`, `bench-idle`, `bench-restart`.

pub mod bench_backup;
pub mod bench_checks;
pub mod bench_failover;
pub mod bench_heal;
pub mod bench_idle;
pub mod bench_node;
pub mod bench_replication;
pub mod bench_restart;
pub mod bench_tls;
pub mod chaos;
pub mod demo;
pub mod load;
pub mod nodes;
pub mod scale;
pub mod up;
pub mod upgrade;
pub mod verify;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};

use crate::cluster::ClusterState;
use crate::load::Target;
use crate::process::{ADMIN_PORT, POP3_PORT, SMTP_PORT};

pub use chaos::{ChaosArgs, chaos};
pub use load::{LoadArgs, load};
pub use nodes::{add, down, drain, kill, restart, status};
pub use scale::scale;
pub use up::{UpArgs, show_mail, up};
pub use upgrade::upgrade;
pub use verify::verify;

pub fn default_dir() -> PathBuf {
    std::env::temp_dir().join("quill-cluster")
}

pub(crate) fn random_hex(n: usize) -> anyhow::Result<String> {
    Ok(quill_node::files::random_bytes()?
        .iter()
        .take(n)
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub(crate) fn parse_subnet(s: &str) -> anyhow::Result<[u8; 3]> {
    let parts: Vec<u8> = s.split('.').map(str::parse).collect::<Result<_, _>>()?;
    match parts[..] {
        [127, b, c] => Ok([127, b, c]),
        _ => bail!("--subnet must be three octets of 127.0.0.0/8, like 127.0.0"),
    }
}

pub(crate) fn target(state: &ClusterState, k: u8) -> Target {
    let ip = state.ip(k);
    Target {
        name: format!("n{k}"),
        smtp: SocketAddr::new(ip.into(), SMTP_PORT),
        pop3: SocketAddr::new(ip.into(), POP3_PORT),
        admin: SocketAddr::new(ip.into(), ADMIN_PORT),
    }
}

/// A fault of the schedule: `kill n2@30s`, `restart n2@60s`, `add @90s`.
#[derive(Debug, Clone)]
pub enum Fault {
    Kill(u8),
    Restart(u8),
    Add,
    /// SIGSTOP for this long, then SIGCONT (a stalled machine or VM).
    Pause(u8, Duration),
    /// Cut off from the other nodes (their UDP traffic) for this long.
    Partition(u8, Duration),
    /// `node drain`: the node hands its copies off; once it holds none it
    /// is removed from the cluster (`node remove`) and stopped.
    Drain(u8),
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

pub fn hosts_or_dir(dir: PathBuf, hosts: Option<PathBuf>) -> anyhow::Result<Cluster> {
    Ok(match hosts {
        Some(h) => Cluster::Hosts(read_hosts(&h)?),
        None => Cluster::Dir(dir),
    })
}

/// A percentile of sorted milliseconds, formatted.
pub(crate) fn ms(sorted: &[f64], p: f64) -> String {
    format!("{:.1}", crate::workload::percentile(sorted, p))
}

/// A benchmark's detached cluster (started as `up` starts one): stopped by
/// [`ClusterRun::stop`], or when dropped (the benchmark ended early).
pub(crate) struct ClusterRun(Option<PathBuf>);

impl ClusterRun {
    pub(crate) fn new(dir: &Path) -> Self {
        ClusterRun(Some(dir.to_path_buf()))
    }

    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        let dir = self.0.take().expect("not stopped yet");
        ClusterState::load(&dir)?.stop_all(&dir)
    }
}

impl Drop for ClusterRun {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take()
            && let Ok(mut s) = ClusterState::load(&dir)
        {
            let _ = s.stop_all(&dir);
        }
    }
}

/// Waits (30 s at most) until every node lists `last`, the last user a
/// benchmark added.
pub(crate) async fn users_on_every_node(nodes: &[crate::NodeProcess], last: &str) -> anyhow::Result<()> {
    for node in nodes {
        let end = std::time::Instant::now() + Duration::from_secs(30);
        while !node
            .admin(hyper::Method::GET, "/v1/users", None)
            .await
            .is_ok_and(|v| v.to_string().contains(last))
        {
            if std::time::Instant::now() > end {
                bail!("users did not reach {}", node.opts.ip);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
