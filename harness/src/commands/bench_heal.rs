//! `bench-heal`: Porcupine's failure figure on a Quill cluster. Fills the
//! cluster with mail, runs a steady open-loop load (deliveries and POP3
//! sessions to random nodes) and kills -9 one node and later a second one;
//! then restarts them and adds a node. Prints throughput before, during and
//! after each failure, the time from a kill to full service (no failed
//! operation any more), the time until `under_replicated` is 0 again (the
//! grace period included), client p99 delivery latency before and during
//! repair, and the rebalancing rate after the join; draws throughput and
//! `under_replicated` over time with the fault moments.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hyper::Method;

use super::{Cluster, Fault, LoadArgs, load};
use crate::chart::{Chart, PALETTE, Series};
use crate::cluster::{ClusterState, NodeEntry};
use crate::load::{LoadConfig, LoadReport, Second};
use crate::{SmtpClient, workload};

pub struct BenchHealArgs {
    pub nodes: u8,
    pub fill_bytes: u64,
    pub message_bytes: usize,
    pub rate: f64,
    pub repair_grace: String,
    pub second_kill_s: f64,
    pub duration_s: f64,
    pub dir: Option<PathBuf>,
    pub out: PathBuf,
}

pub async fn bench_heal(a: BenchHealArgs) -> anyhow::Result<()> {
    if a.nodes < 4 {
        bail!("--nodes must be at least 4 (two kills, R = 2, a majority left)");
    }
    std::fs::create_dir_all(&a.out)?;
    let (_temp, dir) = crate::process::or_fresh(a.dir.clone(), "bench-heal")?;
    let mut state = ClusterState::new([127, 0, 93], a.nodes, 2, "bench-heal-pw".into())?;
    state.repair_grace = Some(a.repair_grace.clone());
    state.log = std::env::var("QUILL_LOG").unwrap_or_else(|_| "warn".into());
    let handles = state.start_all(&dir, false).await?;
    let _down = Down(dir.clone());
    let users = 100;
    crate::load::ensure_users(handles[0].admin_addr(), &state.admin_token, users, &state.password).await?;
    // Fill users of their own: the load's POP3 sessions fetch and delete
    // the load users' mail, and must not empty what repair is measured on.
    for i in 0..FILL_USERS {
        let body = serde_json::json!({ "address": fill_user(i), "password": state.password });
        handles[0].admin(Method::POST, "/v1/users", Some(body)).await?;
    }
    // Written after the load users (one Raft log): the last fill user on
    // every node means all the users are there.
    let last_fill = fill_user(FILL_USERS - 1);
    for h in &handles {
        let end = Instant::now() + Duration::from_secs(30);
        while !h
            .admin(Method::GET, "/v1/users", None)
            .await
            .is_ok_and(|v| v.to_string().contains(&last_fill))
        {
            if Instant::now() > end {
                bail!("the users did not reach every node");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Fill: fill_bytes of mail in message_bytes messages, 8 connections
    // spread over the nodes.
    let n_msgs = (a.fill_bytes / a.message_bytes as u64).max(1);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..8u64 {
        let smtp = handles[c as usize % handles.len()].smtp();
        let size = a.message_bytes;
        tasks.spawn(async move {
            let mut rng = workload::Rng::new(c + 1);
            let mut client = SmtpClient::connect(smtp, false).await?;
            for seq in (c..n_msgs).step_by(8) {
                let to = fill_user(seq);
                let msg = workload::message(&mut rng, 1_000_000 + seq, "fill@remote.test", &to, size);
                let r = client.send_mail("fill@remote.test", &[to.as_str()], &msg).await?;
                if !r.last().is_some_and(|r| r.is_ok()) {
                    bail!("fill message {seq}: {r:?}");
                }
            }
            client.quit().await?;
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let fill_s = started.elapsed().as_secs_f64();
    let filled = n_msgs * a.message_bytes as u64;
    println!(
        "filled {} messages, {:.0} MB ({:.0} MB of copies with R = 2) in {fill_s:.1} s ({:.1} MB/s)",
        n_msgs,
        filled as f64 / 1e6,
        2.0 * filled as f64 / 1e6,
        filled as f64 / 1e6 / fill_s
    );

    // The victims: two nodes that do not lead.
    let status = state.any_status(&dir).await?;
    let leader = status["leader"].as_u64();
    let mut victims = Vec::new();
    for k in (1..=a.nodes).rev() {
        if victims.len() < 2 && Some(state.node_id(&dir, k).await?) != leader {
            victims.push(k);
        }
    }
    let first_kill = 20.0;
    let faults = vec![
        (Duration::from_secs_f64(first_kill), Fault::Kill(victims[0])),
        (Duration::from_secs_f64(a.second_kill_s), Fault::Kill(victims[1])),
    ];
    let cfg = LoadConfig {
        users,
        zipf: 1.0,
        pop_ratio: 0.2,
        rate: Some(a.rate),
        connections: 64,
        duration_s: a.duration_s,
        max_ops: u64::MAX,
        seed: 11,
        password: state.password.clone(),
        op_timeout_s: crate::load::default_op_timeout_s(),
    };
    let report = load(LoadArgs {
        cluster: Cluster::Dir(dir.clone()),
        token: None,
        password: None,
        cfg,
        faults,
        out: a.out.clone(),
        progress: false,
    })
    .await?;
    let kills: Vec<f64> = report
        .events
        .iter()
        .filter(|e| e.what.starts_with("kill"))
        .map(|e| e.t)
        .collect();
    if kills.len() != 2 {
        bail!("the two kills did not both happen: {:?}", report.events);
    }
    let secs = &report.seconds;
    let repaired: Vec<Option<f64>> = kills.iter().map(|&k| repaired_at(secs, k)).collect();
    let window = |from: f64, to: f64| -> Vec<&Second> {
        secs.iter()
            .filter(|s| (s.t as f64) >= from && ((s.t + 1) as f64) <= to)
            .collect()
    };
    let rate = |w: &[&Second]| -> f64 {
        if w.is_empty() {
            return f64::NAN;
        }
        w.iter().map(|s| s.deliveries as f64).sum::<f64>() / w.len() as f64
    };
    let p99 = |w: &[&Second]| -> (f64, f64) {
        let mut v: Vec<f64> = w.iter().map(|s| s.delivery_p99_ms).filter(|x| *x > 0.0).collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        (v[v.len() / 2], v[v.len() - 1])
    };
    let end = report.elapsed_s.floor();
    let r1 = repaired[0].unwrap_or(kills[1]);
    let r2 = repaired[1].unwrap_or(end);
    let before = window(5.0, kills[0]);
    let during1 = window(kills[0], r1);
    let after1 = window(r1, kills[1]);
    let during2 = window(kills[1], r2);
    let after2 = window(r2, end);
    println!("\n| figure | value |\n|---|---:|");
    println!("| offered load (open loop) | {:.0} ops/s, 20% POP3 sessions |", a.rate);
    println!("| deliveries/s before the first kill | {:.0} |", rate(&before));
    println!(
        "| during the first repair / after it | {:.0} / {:.0} |",
        rate(&during1),
        rate(&after1)
    );
    println!(
        "| during the second repair / after it | {:.0} / {:.0} |",
        rate(&during2),
        rate(&after2)
    );
    for (i, &k) in kills.iter().enumerate() {
        println!(
            "| kill {}: last failed operation after | {} |",
            i + 1,
            match full_service_at(secs, k) {
                Some(t) => format!("{:.1} s", t - k),
                None => "none failed".into(),
            }
        );
        println!(
            "| kill {}: under_replicated back to 0 after | {} |",
            i + 1,
            match repaired[i] {
                Some(t) => format!("{:.1} s (grace {} included)", t - k, a.repair_grace),
                None => "not within the run".into(),
            }
        );
    }
    let (b50, b99) = p99(&before);
    let (d50, d99) = p99(&during1);
    println!("| delivery p99 before: median / worst second | {b50:.1} / {b99:.1} ms |");
    println!("| delivery p99 during the first repair: median / worst second | {d50:.1} / {d99:.1} ms |");

    // Both back (their extra copies trimmed), then a join.
    let mut state = ClusterState::load(&dir)?;
    for &k in &victims {
        state.start_node(&dir, k).await?;
    }
    state.save(&dir)?;
    let k = state.nodes.iter().map(|n| n.k).max().unwrap_or(0) + 1;
    state.nodes.push(NodeEntry::new(k));
    let joined_at = Instant::now();
    state.start_node(&dir, k).await?;
    state.save(&dir)?;
    let id = state.node_id(&dir, k).await?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let moved = loop {
        let per = bytes_per_node(&state, &dir).await?;
        let mean = per.iter().map(|x| x.1).sum::<u64>() / per.len().max(1) as u64;
        let mine = per.iter().find(|x| x.0 == id).map_or(0, |x| x.1);
        if per.len() == state.nodes.len() && per.iter().all(|x| x.1.abs_diff(mean) <= mean / 10) {
            break mine;
        }
        if Instant::now() > deadline {
            bail!("the new node did not reach its share within 10 minutes: {per:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let join_s = joined_at.elapsed().as_secs_f64();
    println!(
        "| rebalancing after a join: {:.0} MB moved to the new node | {join_s:.1} s, {:.1} MB/s |",
        moved as f64 / 1e6,
        moved as f64 / 1e6 / join_s
    );
    let chart = heal_chart(&report, a.rate);
    std::fs::write(a.out.join("heal.svg"), chart.svg())?;
    std::fs::write(a.out.join("heal.png"), chart.png()?)?;
    println!(
        "\nwritten: {0}/heal.svg, {0}/heal.png (and the load's files)",
        a.out.display()
    );
    Ok(())
}

/// Users that only the fill writes to.
const FILL_USERS: u64 = 100;

fn fill_user(i: u64) -> String {
    format!("fill{:03}@example.org", 1 + i % FILL_USERS)
}

/// The first second after `kill` at which `under_replicated` is 0 again,
/// having been above 0 after the kill.
fn repaired_at(secs: &[Second], kill: f64) -> Option<f64> {
    let mut seen = false;
    for s in secs.iter().filter(|s| s.t as f64 >= kill) {
        match s.under_replicated {
            Some(u) if u > 0 => seen = true,
            Some(0) if seen => return Some(s.t as f64),
            _ => {}
        }
    }
    None
}

/// The end of the last second with a failed operation within 30 s after
/// `kill` (None: nothing failed). A POP3 login refused because another
/// session of the load holds the mailbox (`-ERR in-use`) is the load's own
/// contention, there with no fault, and does not count; operations the
/// load generator could not even start (`shed`: too many in flight) do.
fn full_service_at(secs: &[Second], kill: f64) -> Option<f64> {
    secs.iter()
        .filter(|s| s.t as f64 >= kill.floor() && (s.t as f64) < kill + 30.0)
        .filter(|s| s.errors.iter().any(|(k, v)| *v > 0 && k != "-ERR in-use"))
        .map(|s| (s.t + 1) as f64)
        .next_back()
}

async fn bytes_per_node(state: &ClusterState, dir: &std::path::Path) -> anyhow::Result<Vec<(u64, u64)>> {
    let s = state.any_status(dir).await?;
    Ok(s["nodes"]
        .as_array()
        .context("nodes")?
        .iter()
        .filter(|n| n["state"] == "up")
        .filter_map(|n| Some((n["id"].as_u64()?, n["bytes"].as_u64()?)))
        .collect())
}

fn heal_chart(r: &LoadReport, offered: f64) -> Chart {
    let max_under = r
        .seconds
        .iter()
        .filter_map(|s| s.under_replicated)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    // under_replicated drawn on the throughput scale: its peak at the
    // offered rate (the legend gives the peak).
    let scale = offered / max_under;
    Chart {
        title: "Quill: throughput and re-replication around two node failures".into(),
        x_label: "time since start (s)".into(),
        y_label: "deliveries per second".into(),
        note: Some(format!(
            "open loop {offered:.0} ops/s; dashed red lines: kill -9; under-replicated messages scaled: peak {max_under:.0}"
        )),
        series: vec![
            r.deliveries_series(),
            Series {
                name: format!("under-replicated (peak {max_under:.0})"),
                points: r.points(|s| s.under_replicated.unwrap_or(0) as f64 * scale),
                color: PALETTE[2],
            },
            r.errors_series(),
        ],
        markers: r.markers(),
        x_integer: false,
    }
}

/// Stops the cluster when the benchmark ends, however it ends.
struct Down(PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        if let Ok(mut s) = ClusterState::load(&self.0) {
            let _ = s.stop_all(&self.0);
        }
    }
}
