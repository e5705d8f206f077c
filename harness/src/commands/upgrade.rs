//! `upgrade`: replaces the nodes of a running harness cluster with another
//! `quill` binary one at a time, the way an operator upgrades a cluster
//! without a maintenance window (UPGRADING.md): for each node, leadership
//! moves off it (`quill admin cluster step-down`; a node of release 0.1.0
//! has no such call and the others elect a leader once it stops), it is
//! stopped, started on the new binary with its data, and the next node
//! waits until it serves and the cluster's copies are in sync again. The
//! leader goes last. While a node is being replaced, logins on the other
//! nodes are tried every 200 ms: they must all work.
//!
//! Run a `load` beside it, and `verify` afterwards: nothing acknowledged
//! may be lost.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;

use crate::client::Pop3Client;
use crate::cluster::{ClusterState, parse_node};
use crate::process::NodeProcess;

/// How often the login prober tries each other node.
const PROBE_EVERY: Duration = Duration::from_millis(200);

/// What replacing one node took.
#[derive(Debug)]
struct Replaced {
    k: u8,
    from: String,
    to: String,
    stepped_down: String,
    /// Stop asked → the new process answers `/health`.
    down: Duration,
    /// Ready → every node up, answering, nothing under-replicated.
    sync: Duration,
    logins_ok: u64,
    logins_failed: u64,
    first_failure: Option<String>,
}

pub async fn upgrade(dir: PathBuf, to: PathBuf, only: Vec<String>, sync_timeout: Duration) -> anyhow::Result<()> {
    let to = to
        .canonicalize()
        .with_context(|| format!("no quill binary at {}", to.display()))?;
    let mut state = ClusterState::load(&dir)?;
    let live = state.live();
    if live.is_empty() {
        bail!("no node of the cluster in {} is running", dir.display());
    }
    let mut order: Vec<u8> = if only.is_empty() {
        live.clone()
    } else {
        only.iter().map(|n| parse_node(n)).collect::<anyhow::Result<_>>()?
    };
    if let Some(k) = order.iter().find(|k| state.entry(**k).is_err()) {
        bail!("the cluster has no n{k}");
    }
    // The leader last: every other replacement keeps it.
    let status = state.any_status(&dir).await?;
    let leader = status["leader"].as_u64();
    let leader_k = match leader {
        Some(id) => name_of(&status, id).and_then(|n| parse_node(&n).ok()),
        None => None,
    };
    if let Some(l) = leader_k {
        order.sort_by_key(|k| (*k == l, *k));
    }
    println!(
        "upgrading {} to {} ({}), one node at a time: {}",
        dir.display(),
        to.display(),
        release_of(&to),
        order.iter().map(|k| format!("n{k}")).collect::<Vec<_>>().join(", ")
    );
    let mut done = Vec::new();
    for k in order {
        let r = replace(&dir, &mut state, k, &to, sync_timeout).await;
        state.save(&dir)?;
        let r = r.with_context(|| format!("replacing n{k}"))?;
        println!(
            "n{k}: {} -> {}; {}; back in {:.1} s, in sync {:.1} s later; logins elsewhere {} ok, {} failed",
            r.from,
            r.to,
            r.stepped_down,
            r.down.as_secs_f64(),
            r.sync.as_secs_f64(),
            r.logins_ok,
            r.logins_failed
        );
        done.push(r);
    }
    // Every node runs it now: it is the cluster's binary.
    if state
        .nodes
        .iter()
        .all(|n| n.binary.as_deref() == Some(to.as_path()) || n.pid.is_none())
    {
        state.binary = to.clone();
        for n in &mut state.nodes {
            if n.binary.as_deref() == Some(to.as_path()) {
                n.binary = None;
            }
        }
        state.save(&dir)?;
    }
    let status = state.any_status(&dir).await?;
    match status["feature_level"].as_u64() {
        Some(level) => println!(
            "done: feature level {level} (raised by the leader once every node supports more, or by `quill admin cluster upgrade-finish`)"
        ),
        None => println!("done (the node that answered runs release 0.1.0, which does not show the feature level)"),
    }
    let failed: Vec<&Replaced> = done.iter().filter(|r| r.logins_failed > 0).collect();
    if let Some(r) = failed.first() {
        bail!(
            "logins failed on other nodes while n{} was replaced ({} of {}), first: {}",
            r.k,
            r.logins_failed,
            r.logins_ok + r.logins_failed,
            r.first_failure.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

/// The release a `quill` binary says it is (`quill --version`).
pub(crate) fn release_of(binary: &Path) -> String {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().trim_start_matches("quill ").to_owned())
        .unwrap_or_else(|| "?".to_owned())
}

fn name_of(status: &serde_json::Value, id: u64) -> Option<String> {
    status["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["id"].as_u64() == Some(id))
        .and_then(|n| n["name"].as_str())
        .map(str::to_owned)
}

async fn replace(
    dir: &Path,
    state: &mut ClusterState,
    k: u8,
    to: &Path,
    sync_timeout: Duration,
) -> anyhow::Result<Replaced> {
    let h = state.handle(dir, k)?;
    let from = release_of(&state.binary_of(k));
    let running = state.live().contains(&k);
    // Leadership off it first, so that writes do not wait for an election.
    let stepped_down = if !running {
        "it was not running: started on the new binary".to_owned()
    } else {
        match h.admin_raw(Method::POST, "/v1/cluster/step-down", None).await {
            Ok((200, v)) if v["was_leader"] == true => format!("leadership handed to {}", v["leader"]),
            Ok((200, _)) => "not the leader".to_owned(),
            Ok((404, _)) => "no step-down in its release: the others elect a leader once it stops".to_owned(),
            Ok((code, v)) => format!("step-down refused ({code}: {}): stopping it anyway", v["error"]),
            Err(e) => format!("step-down not answered ({e:#}): stopping it anyway"),
        }
    };
    let others: Vec<SocketAddr> = state
        .live()
        .into_iter()
        .filter(|o| *o != k)
        .map(|o| state.handle(dir, o).map(|h| h.pop3()))
        .collect::<anyhow::Result<_>>()?;
    let probe = Prober::start(others, "alice@example.org".into(), state.password.clone());
    let t0 = Instant::now();
    state.stop_node(k)?;
    state.entry_mut(k)?.binary = Some(to.to_path_buf());
    state.save(dir)?;
    let started = state.start_node(dir, k).await;
    let down = t0.elapsed();
    let synced = match started {
        Ok(()) => wait_in_sync(&state.handle(dir, k)?, sync_timeout).await,
        Err(e) => Err(e),
    };
    let (logins_ok, logins_failed, first_failure) = probe.stop().await;
    let sync = synced?;
    Ok(Replaced {
        k,
        from,
        to: release_of(to),
        stepped_down,
        down,
        sync,
        logins_ok,
        logins_failed,
        first_failure,
    })
}

/// Until the node knows a Raft leader, its view has every node up and
/// answering, and nothing is under-replicated (the copies it missed while
/// it was away are back: a copy that failed to reach it is counted until
/// anti-entropy has made it).
async fn wait_in_sync(h: &NodeProcess, within: Duration) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let mut last = String::from("no status yet");
    while t0.elapsed() < within {
        if let Ok(s) = h.status().await {
            let nodes = s["nodes"].as_array().cloned().unwrap_or_default();
            let all_up = nodes.iter().all(|n| n["state"] == "up" && !n["messages"].is_null());
            let under = s["under_replicated"].as_u64().unwrap_or(u64::MAX);
            let leader = !s["leader"].is_null();
            if leader && all_up && under == 0 && !nodes.is_empty() {
                return Ok(t0.elapsed());
            }
            last = format!(
                "{} nodes, leader known: {leader}, all up and answering: {all_up}, under-replicated: {under}",
                nodes.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    bail!("not in sync within {within:?}: {last}")
}

/// Logs in (POP3) on each of some nodes, over and over, counting.
struct Prober {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    first_failure: Arc<std::sync::Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Prober {
    fn start(nodes: Vec<SocketAddr>, user: String, password: String) -> Prober {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let first_failure = Arc::new(std::sync::Mutex::new(None));
        let task = tokio::spawn({
            let (stop, ok, failed, first_failure) = (stop.clone(), ok.clone(), failed.clone(), first_failure.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    for addr in &nodes {
                        let tried = tokio::time::timeout(Duration::from_secs(10), async {
                            let mut c = Pop3Client::connect(*addr).await?;
                            c.login(&user, &password).await?;
                            c.quit().await
                        })
                        .await;
                        match tried {
                            Ok(Ok(_)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                let why = match other {
                                    Ok(Err(e)) => format!("{addr}: {e:#}"),
                                    _ => format!("{addr}: no answer within 10 s"),
                                };
                                first_failure
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .get_or_insert(why);
                            }
                        }
                    }
                    tokio::time::sleep(PROBE_EVERY).await;
                }
            }
        });
        Prober {
            stop,
            ok,
            failed,
            first_failure,
            task,
        }
    }

    async fn stop(self) -> (u64, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let first = self.first_failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            first,
        )
    }
}
