//! `scale`: throughput against cluster size.

use std::path::PathBuf;
use std::time::Duration;

use super::{Cluster, LoadArgs, down, read_hosts, up};
use crate::chart::{Chart, PALETTE, Series};
use crate::load::{self, LoadConfig};

/// `scale`: the same closed-loop load on clusters of each size and R.
#[allow(clippy::too_many_arguments)]
pub async fn scale(
    dir: PathBuf,
    sizes: Vec<u8>,
    replicas: Vec<usize>,
    cfg: LoadConfig,
    warmup: Duration,
    hosts: Option<PathBuf>,
    token: Option<String>,
    password: Option<String>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir)?;
    let mut rows: Vec<(u8, usize, f64, f64)> = Vec::new();
    if let Some(h) = hosts {
        let hosts = read_hosts(&h)?;
        let n = hosts.len() as u8;
        let out = dir.join(format!("scale-hosts-{n}"));
        let r = super::load(LoadArgs {
            cluster: Cluster::Hosts(hosts),
            token,
            password,
            cfg: cfg.clone(),
            faults: Vec::new(),
            out,
            progress: false,
        })
        .await?;
        let (d, q) = r.rates_after(warmup.as_secs());
        rows.push((n, 0, d, q));
    } else {
        for (i, &r) in replicas.iter().enumerate() {
            for (j, &n) in sizes.iter().enumerate() {
                let cdir = dir.join(format!("cluster-{n}n-r{r}"));
                let _ = std::fs::remove_dir_all(&cdir);
                // A fresh subnet per cluster: no waiting on sockets of the last.
                let subnet = format!("127.77.{}", 1 + i * sizes.len() + j);
                up(super::UpArgs {
                    dir: cdir.clone(),
                    nodes: n,
                    replicas: r,
                    password: Some("scale-password".into()),
                    subnet,
                    detach: true,
                    repair_grace: None,
                    node_arg: Vec::new(),
                    binary: None,
                })
                .await?;
                let rep = super::load(LoadArgs {
                    cluster: Cluster::Dir(cdir.clone()),
                    token: None,
                    password: None,
                    cfg: cfg.clone(),
                    faults: Vec::new(),
                    out: cdir.join("load"),
                    progress: false,
                })
                .await;
                down(cdir.clone()).await?;
                let (d, q) = rep?.rates_after(warmup.as_secs());
                rows.push((n, r, d, q));
            }
        }
    }
    println!("\n| nodes | R | deliveries/s | retrievals/s |\n|---:|---:|---:|---:|");
    for (n, r, d, q) in &rows {
        println!("| {n} | {r} | {d:.0} | {q:.0} |");
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut series = Vec::new();
    let rs: Vec<usize> = {
        let mut v: Vec<usize> = rows.iter().map(|r| r.1).collect();
        v.dedup();
        v
    };
    for (i, r) in rs.iter().enumerate() {
        series.push(Series {
            name: if *r == 0 {
                "deliveries/s (hosts)".into()
            } else {
                format!("deliveries/s, R={r}")
            },
            points: rows.iter().filter(|x| x.1 == *r).map(|x| (x.0 as f64, x.2)).collect(),
            color: PALETTE[i % PALETTE.len()],
        });
    }
    let chart = Chart {
        title: "Quill: delivery throughput vs cluster size".into(),
        x_label: "nodes".into(),
        y_label: "deliveries per second".into(),
        note: Some(format!(
            "all nodes and the load generator shared this machine's {cores} cores: absolute numbers say little; \
             first {}s of each run not counted",
            warmup.as_secs()
        )),
        series,
        markers: Vec::new(),
        x_integer: true,
    };
    std::fs::write(dir.join("scale.svg"), chart.svg())?;
    std::fs::write(dir.join("scale.png"), chart.png()?)?;
    load::write_json(
        &dir.join("scale.json"),
        &rows
            .iter()
            .map(|(n, r, d, q)| serde_json::json!({"nodes": n, "replicas": r, "deliveries_per_s": d, "retrievals_per_s": q}))
            .collect::<Vec<_>>(),
    )?;
    println!("written: {0}/scale.json, {0}/scale.svg, {0}/scale.png", dir.display());
    Ok(())
}
