//! `bench-node`: one node, N messages over SMTP and/or LMTP with C
//! connections, then every message retrieved and deleted over POP3.

use std::path::PathBuf;

use anyhow::{Context, bail};

use super::ms;
use crate::bench::{self, DeliverPlan};
use crate::fresh_loopback;
use crate::process::{NodeOptions, NodeProcess, cpu_secs};

/// Which delivery protocols to measure.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Smtp,
    Lmtp,
    Both,
}

pub async fn bench_node(
    load: bench::Load,
    proto: Proto,
    dir: Option<PathBuf>,
    log: String,
    seed: u64,
) -> anyhow::Result<()> {
    let bench::Load {
        messages,
        connections,
        users,
        pipelining,
    } = load;
    let (_temp, dir) = crate::process::or_fresh(dir, "bench")?;
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
        let plan = DeliverPlan::for_load(vec![addr], lmtp, load, seed);
        let pid = node.pid().context("the node's pid")?;
        let cpu0 = cpu_secs(pid)?;
        let d = bench::deliver(plan).await;
        let cpu = cpu_secs(pid)? - cpu0;
        let fs1 = (
            node.metric("quill_store_fsyncs_total").await?,
            node.metric("quill_store_ops_total").await?,
        );
        let bytes: usize = d.acked.iter().map(|s| s.size).sum();
        println!(
            "deliver proto={} pipelining={pipelining} n={messages} c={connections} ok={} failed={} mean_size={} secs={:.2} msgs_per_sec={:.1} \
             lat_ms_p50={} p99={} fsyncs={} ops_per_fsync={:.1} server_cpu_us={:.0}",
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
            cpu / d.acked.len().max(1) as f64 * 1e6,
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
