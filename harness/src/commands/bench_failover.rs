//! `bench-failover`: kill -9 a node again and again and time until every
//! survivor has applied the view that marks it down.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::process::NodeProcess;
use crate::workload::percentile;

/// Which node a trial kills.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Victim {
    Leader,
    Follower,
    Both,
}

pub async fn bench_failover(n: usize, trials: usize, victim: Victim, dir: Option<PathBuf>) -> anyhow::Result<()> {
    use crate::process::{start_cluster, wait_converged, wait_voters};
    if n < 3 {
        bail!("--nodes must be at least 3 (a majority must survive a kill)");
    }
    let (_temp, dir) = crate::process::or_fresh(dir, "failover")?;
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
