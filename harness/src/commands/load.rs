//! `load`: the Porcupine workload against a cluster, with a fault schedule,
//! per-second figures, pictures and the record `verify` checks.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;

use super::{Cluster, Fault, target};
use crate::chart::{Chart, PALETTE, Series};
use crate::cluster::{ClusterState, NodeEntry};
use crate::load::{self, LoadConfig, LoadReport, Record, Run, Target};
use crate::process::{ADMIN_PORT, POP3_PORT, SMTP_PORT};

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
            let r = quill_node::admin::client::call(&t.admin.to_string(), &token, Method::GET, "/v1/users", None).await;
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
                Fault::Pause(k, how_long) => {
                    state.pause_node(k, true)?;
                    let (run, dir) = (run.clone(), dir.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(how_long).await;
                        let r = ClusterState::load(&dir).and_then(|s| s.pause_node(k, false));
                        run.event(match r {
                            Ok(()) => format!("resume n{k}"),
                            Err(e) => format!("fault failed: resume n{k}: {e:#}"),
                        });
                    });
                    format!("pause n{k} for {how_long:?}")
                }
                Fault::Partition(k, how_long) => {
                    let mut cut = crate::process::Partition::cut(state.ip(k))?;
                    let run = run.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(how_long).await;
                        cut.heal();
                        run.event(format!("heal n{k}"));
                    });
                    format!("partition n{k} for {how_long:?}")
                }
                Fault::Drain(k) => {
                    state.drain(&dir, k).await?;
                    let id = state.node_id(&dir, k).await?;
                    let (run, dir) = (run.clone(), dir.clone());
                    tokio::spawn(async move {
                        let r = remove_when_drained(&run, &dir, k, id).await;
                        run.event(match r {
                            Ok(()) => format!("remove n{k} (drained)"),
                            Err(e) => format!("fault failed: remove n{k}: {e:#}"),
                        });
                    });
                    format!("drain n{k}")
                }
                Fault::Add => {
                    let k = state.nodes.iter().map(|n| n.k).max().unwrap_or(0) + 1;
                    state.nodes.push(NodeEntry::new(k));
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

/// Waits (at most 5 minutes) until draining node `k` holds nothing, then
/// removes it through another node, stops it and takes it out of the
/// harness state.
async fn remove_when_drained(run: &Arc<Run>, dir: &Path, k: u8, id: u64) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let state = ClusterState::load(dir)?;
        if let Ok(s) = state.any_status(dir).await {
            let empty = s["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|n| n["id"].as_u64() == Some(id) && n["messages"].as_u64() == Some(0));
            if empty {
                for other in state.live().into_iter().filter(|o| *o != k) {
                    let h = state.handle(dir, other)?;
                    if h.admin(Method::DELETE, &format!("/v1/nodes/{id}"), None).await.is_ok() {
                        let mut state = ClusterState::load(dir)?;
                        state.stop_node(k)?;
                        state.nodes.retain(|n| n.k != k);
                        state.save(dir)?;
                        let name = format!("n{k}");
                        run.targets.write().expect("lock").retain(|t| t.name != name);
                        return Ok(());
                    }
                }
            }
        }
        if Instant::now() > end {
            bail!("n{k} still holds copies after 5 minutes of draining");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn timeline_chart(r: &LoadReport) -> Chart {
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
        op_timeout_s: crate::load::default_op_timeout_s(),
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
            r.deliveries_series(),
            Series {
                name: "messages retrieved/s".into(),
                points: r.points(|s| s.retrievals as f64),
                color: PALETTE[1],
            },
            r.errors_series(),
        ],
        markers: r.markers(),
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

/// The fault schedule from `--kill n2@30s`, `--restart n2@60s`, `--add @90s`.
pub fn parse_faults(
    kill: &[String],
    restart: &[String],
    add: &[String],
    pause: &[String],
    partition: &[String],
) -> anyhow::Result<Vec<(Duration, Fault)>> {
    let mut out = Vec::new();
    let window = |p: &str| -> anyhow::Result<(u8, Duration, Duration)> {
        let (spec, how_long) = p
            .rsplit_once(':')
            .ok_or_else(|| anyhow::anyhow!("bad fault {p:?}: want NODE@AT:FOR, e.g. n1@10s:15s"))?;
        let (n, at) = super::parse_at(spec)?;
        Ok((crate::cluster::parse_node(&n)?, at, super::parse_duration(how_long)?))
    };
    for p in pause {
        let (k, at, how_long) = window(p)?;
        out.push((at, Fault::Pause(k, how_long)));
    }
    for p in partition {
        let (k, at, how_long) = window(p)?;
        out.push((at, Fault::Partition(k, how_long)));
    }
    for k in kill {
        let (n, at) = super::parse_at(k)?;
        out.push((at, Fault::Kill(crate::cluster::parse_node(&n)?)));
    }
    for r in restart {
        let (n, at) = super::parse_at(r)?;
        out.push((at, Fault::Restart(crate::cluster::parse_node(&n)?)));
    }
    for a in add {
        let (_, at) = super::parse_at(a)?;
        out.push((at, Fault::Add));
    }
    Ok(out)
}
