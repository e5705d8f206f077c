//! `bench-replication`: delivery throughput for NODES:R pairs, each on a
//! fresh cluster started the way `up` starts one.

use std::path::PathBuf;

use anyhow::Context;

use super::ms;
use crate::bench::{self, DeliverPlan};
use crate::cluster::ClusterState;
use crate::workload::percentile;

/// One NODES:R run's figures.
struct Row {
    n: usize,
    r: usize,
    rate: f64,
    p50: f64,
    p99: f64,
    entries: u64,
    under: u64,
    /// The nodes' CPU per acknowledged delivery, all nodes together.
    cpu_us: f64,
}

pub async fn bench_replication(
    configs: Vec<String>,
    load: bench::Load,
    dir: Option<PathBuf>,
    seed: u64,
) -> anyhow::Result<()> {
    let users = load.users;
    let (_temp, dir) = crate::process::or_fresh(dir, "bench-repl")?;
    let mut pairs = Vec::new();
    for c in &configs {
        let (n, r) = c
            .split_once(':')
            .with_context(|| format!("bad config {c:?}: want NODES:R"))?;
        pairs.push((n.parse::<usize>()?, r.parse::<usize>()?));
    }
    let mut rows: Vec<Row> = Vec::new();
    for (i, &(n, r)) in pairs.iter().enumerate() {
        // Each run on a subnet of its own, started the way `up` starts a
        // cluster; the nodes are stopped at the end of the run, or when
        // the benchmark fails.
        let base = dir.join(format!("run{i}-{n}n-r{r}"));
        let subnet = [127, 4, 1 + (std::process::id() % 50) as u8 * 5 + i as u8];
        let mut state = ClusterState::new(subnet, n as u8, r, "unused".into())?;
        state.log = "warn".into();
        let run = super::ClusterRun::new(&base);
        let nodes = state.start_all(&base, false).await?;
        nodes[0].add_domain("example.com").await?;
        for u in 1..=users {
            nodes[0]
                .add_user(&format!("user{u:04}@example.com"), &format!("pass{u:04}"), None)
                .await?;
        }
        // Every node must know every user before the load starts.
        super::users_on_every_node(&nodes, &format!("user{users:04}@example.com")).await?;
        let addrs = nodes.iter().map(|x| x.smtp()).collect();
        let plan = DeliverPlan::for_load(addrs, false, load, seed);
        let pids: Vec<u32> = ClusterState::load(&base)?.nodes.iter().filter_map(|n| n.pid).collect();
        anyhow::ensure!(pids.len() == n, "the pids of {n} nodes");
        let cpu0 = crate::process::pids_cpu_secs(&pids)?;
        let d = bench::deliver(plan).await;
        // Every node's CPU per acknowledged delivery (R copies each).
        let cpu_us = (crate::process::pids_cpu_secs(&pids)? - cpu0) / d.acked.len().max(1) as f64 * 1e6;
        let s = nodes[0].status().await?;
        let entries: u64 = s["nodes"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["messages"].as_u64()).sum())
            .unwrap_or(0);
        let under = s["under_replicated"].as_u64().unwrap_or(0);
        let rate = d.acked.len() as f64 / d.secs;
        println!(
            "nodes={n} replicas={r} ok={} failed={} secs={:.2} msgs_per_sec={rate:.1} lat_ms_p50={} p99={} \
             entries={entries} under_replicated={under} server_cpu_us={cpu_us:.0}",
            d.acked.len(),
            d.unknown.len(),
            d.secs,
            ms(&d.latencies_ms, 50.0),
            ms(&d.latencies_ms, 99.0),
        );
        rows.push(Row {
            n,
            r,
            rate,
            p50: percentile(&d.latencies_ms, 50.0),
            p99: percentile(&d.latencies_ms, 99.0),
            entries,
            under,
            cpu_us,
        });
        run.stop()?;
    }
    println!();
    println!(
        "| nodes | R | msgs/s | vs first | p50 ms | p99 ms | entries stored | under-replicated | CPU µs/msg (all nodes) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let first = rows.first().map_or(1.0, |r| r.rate);
    for Row {
        n,
        r,
        rate,
        p50,
        p99,
        entries,
        under,
        cpu_us,
    } in rows
    {
        println!(
            "| {n} | {r} | {rate:.0} | {:.0} % | {p50:.1} | {p99:.1} | {entries} | {under} | {cpu_us:.0} |",
            100.0 * rate / first
        );
    }
    Ok(())
}
