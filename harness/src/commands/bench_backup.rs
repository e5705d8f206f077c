//! `bench-backup`: one node filled with mail, then `quill admin export`
//! of one user and `quill admin backup` of all (MB/s), then deliveries
//! alone and with a backup running beside them, alternated (none,
//! backup, none, backup): msg/s and their ratio.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::bench::{self, DeliverPlan};
use crate::fresh_loopback;
use crate::process::{NodeOptions, NodeProcess};

/// `quill admin --node N --token T ARGS`, its standard output to `out`.
async fn admin(node: &NodeProcess, args: &[&str], out: Option<&Path>) -> anyhow::Result<()> {
    let mut c = tokio::process::Command::from(node.admin_command());
    c.args(args);
    c.stdout(match out {
        Some(p) => Stdio::from(std::fs::File::create(p)?),
        None => Stdio::null(),
    });
    c.stderr(Stdio::piped());
    // Not `output()`: it would capture standard output instead of `out`.
    let o = c.spawn().context("running quill admin")?.wait_with_output().await?;
    if !o.status.success() {
        bail!("quill admin {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// A process's resident memory (kB), 0 if unknown.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        n += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    n
}

pub async fn bench_backup(
    load: bench::Load,
    fill: u64,
    max_rate: Option<String>,
    dir: Option<PathBuf>,
    log: String,
) -> anyhow::Result<()> {
    let (_temp, dir) = crate::process::or_fresh(dir, "bench-backup")?;
    let mut opts = NodeOptions::new(dir.join("node"), fresh_loopback())?;
    opts.log = log;
    opts.extra_args = vec!["--replicas".into(), "1".into()];
    let mut node = NodeProcess::start(opts).await?;
    node.add_domain("example.com").await?;
    for i in 1..=load.users {
        node.add_user(&format!("user{i:04}@example.com"), &format!("pass{i:04}"), None)
            .await?;
    }
    let d = bench::deliver(DeliverPlan::bench(
        vec![node.smtp()],
        false,
        fill,
        load.connections,
        load.users,
        100,
    ))
    .await;
    let filled: usize = d.acked.iter().map(|s| s.size).sum();
    println!(
        "fill messages={} MB={:.1} users={} secs={:.1}",
        d.acked.len(),
        filled as f64 / 1e6,
        load.users,
        d.secs
    );

    // One user's export, to a file, with the node's resident memory
    // sampled meanwhile (flat: one message at a time).
    let file = dir.join("user0001.mbox");
    let pid = node.pid().context("the node's pid")?;
    let rss0 = rss_kb(pid);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(rss_kb(pid));
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            peak
        })
    };
    let t = Instant::now();
    admin(&node, &["export", "user0001@example.com"], Some(&file)).await?;
    let (secs, bytes) = (t.elapsed().as_secs_f64(), std::fs::metadata(&file)?.len());
    sampling.store(false, Ordering::Relaxed);
    let peak = sampler.await?;
    println!(
        "export user=user0001 MB={:.1} secs={secs:.2} MB_per_sec={:.1} node_rss_MB_before={:.0} peak_during={:.0}",
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs,
        rss0 as f64 / 1e3,
        peak as f64 / 1e3
    );
    std::fs::remove_file(&file)?;

    // The whole cluster.
    let out = dir.join("backup-0");
    let t = Instant::now();
    admin(&node, &["backup", &out.to_string_lossy(), "--max-rate", "0"], None).await?;
    let (secs, bytes) = (t.elapsed().as_secs_f64(), dir_bytes(&out));
    println!(
        "backup users={} MB={:.1} secs={secs:.2} MB_per_sec={:.1}",
        load.users,
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs
    );
    std::fs::remove_dir_all(&out)?;

    // Deliveries alone and beside a backup (backups one after another for
    // as long as the deliveries run), alternated.
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for (round, beside) in [false, true, false, true].into_iter().enumerate() {
        let stop = Arc::new(AtomicBool::new(false));
        let backups = if beside {
            let (stop, node_dir, max_rate) = (stop.clone(), dir.clone(), max_rate.clone());
            let n = NodeProcess::attach(node.opts.clone());
            Some(tokio::spawn(async move {
                let mut k = 0;
                while !stop.load(Ordering::Relaxed) {
                    let out = node_dir.join(format!("backup-{round}-{k}"));
                    let out = out.to_string_lossy();
                    // Unthrottled unless asked (the CLI's default is 20MB).
                    let rate = max_rate.as_deref().unwrap_or("0");
                    let args = vec!["backup", &out, "--max-rate", rate];
                    admin(&n, &args, None).await?;
                    let _ = std::fs::remove_dir_all(&*out);
                    k += 1;
                }
                anyhow::Ok(k)
            }))
        } else {
            None
        };
        let plan = DeliverPlan::for_load(vec![node.smtp()], false, load, 200 + round as u64);
        let d = bench::deliver(plan).await;
        stop.store(true, Ordering::Relaxed);
        let backups_done = match backups {
            Some(b) => b.await??,
            None => 0,
        };
        let rate = d.acked.len() as f64 / d.secs;
        rates[usize::from(beside)].push(rate);
        println!(
            "deliver beside_backup={beside} n={} ok={} failed={} secs={:.2} msgs_per_sec={rate:.1} backups={backups_done}",
            load.messages,
            d.acked.len(),
            d.unknown.len(),
            d.secs
        );
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let (none, with) = (mean(&rates[0]), mean(&rates[1]));
    println!(
        "delivery max_rate={} msgs_per_sec_without={none:.1} beside_backup={with:.1} ratio={:.2}",
        max_rate.as_deref().unwrap_or("none"),
        with / none.max(1e-9)
    );
    node.stop().await?;
    Ok(())
}
