//! `bench-restart`: how long a node holding N messages takes from being
//! started again (after `kill -9`) until it serves POP3, by what its store
//! holds; with `--before`, the same data started by another `quill`
//! binary as well, rounds alternated.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};

use crate::Pop3Client;
use crate::bench::{self, DeliverPlan};
use crate::fresh_loopback;
use crate::process::{NodeOptions, NodeProcess};

/// How long a start may take before the benchmark gives up.
const START_WITHIN: Duration = Duration::from_secs(300);

pub async fn bench_restart(
    load: bench::Load,
    rounds: u32,
    before: Option<PathBuf>,
    dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (_temp, dir) = crate::process::or_fresh(dir, "bench-restart")?;
    let mut opts = NodeOptions::new(dir.join("node"), fresh_loopback())?;
    opts.log = "warn".into();
    opts.extra_args = vec!["--replicas".into(), "1".into()];
    let this = opts.binary.clone();
    let mut node = NodeProcess::start(opts).await?;
    node.add_domain("example.com").await?;
    let (user, password) = ("user0001@example.com", "pass0001");
    for i in 1..=load.users {
        node.add_user(&format!("user{i:04}@example.com"), &format!("pass{i:04}"), None)
            .await?;
    }
    let plan = DeliverPlan::for_load(vec![node.lmtp()], true, load, 1);
    let d = bench::deliver(plan).await;
    let bytes: usize = d.acked.iter().map(|s| s.size).sum();
    println!(
        "filled messages={} MB={:.0} secs={:.1} (LMTP, {} connections)",
        d.acked.len(),
        bytes as f64 / 1e6,
        d.secs,
        load.connections
    );
    ensure!(!d.acked.is_empty(), "nothing was delivered: {:?}", d.errors.first());
    if let Some(e) = d.errors.first() {
        println!("stopped early after {} errors, the first: {e}", d.errors.len());
    }
    let mut binaries = vec![("this", this)];
    if let Some(b) = before {
        binaries.push(("before", b));
    }
    for round in 1..=rounds {
        for (name, binary) in &binaries {
            node.kill9().await?;
            node.opts.binary = binary.clone();
            let t = Instant::now();
            node.restart().await?;
            let healthy = t.elapsed().as_secs_f64();
            let count = loop {
                let stat = async {
                    let mut p = Pop3Client::connect(node.pop3()).await?;
                    p.login(user, password).await?;
                    p.stat().await
                };
                if let Ok((n, _)) = stat.await {
                    break n;
                }
                ensure!(t.elapsed() < START_WITHIN, "no POP3 within {START_WITHIN:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            println!(
                "restart round={round} binary={name} secs_to_health={healthy:.2} secs_to_pop3={:.2} user_messages={count}",
                t.elapsed().as_secs_f64()
            );
        }
    }
    node.opts.binary = binaries[0].1.clone();
    node.stop().await.context("stopping the node")?;
    Ok(())
}
