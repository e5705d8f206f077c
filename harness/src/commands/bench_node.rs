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

/// A Sieve script of `rules` rules as a user might write them: each
/// tests a header, an address or the size (none matches the benchmark's
/// mail), the message is kept.
pub fn sieve_script(rules: usize) -> String {
    let mut s = String::from("require [\"fileinto\", \"imap4flags\", \"mailbox\"];\n");
    for i in 0..rules {
        let rule = match i % 4 {
            0 => format!(
                "if header :contains \"subject\" \"project-{i}\" {{ fileinto :create \"Projects/{i}\"; stop; }}\n"
            ),
            1 => format!("if address :domain :is \"from\" \"list{i}.example\" {{ fileinto \"Lists\"; stop; }}\n"),
            2 => format!("if header :matches \"list-id\" \"*news{i}*\" {{ addflag \"$News\"; }}\n"),
            _ => format!("if allof(size :over 10M, header :contains \"x-tag\" \"t{i}\") {{ discard; stop; }}\n"),
        };
        s.push_str(&rule);
    }
    s.push_str("keep;\n");
    s
}

pub async fn bench_node(
    load: bench::Load,
    proto: Proto,
    dir: Option<PathBuf>,
    log: String,
    seed: u64,
    sieve_rules: usize,
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
    // With --sieve-rules: the same deliveries to the same users without
    // and with a script, alternated (none, script, none, script), one run.
    let rounds: Vec<(bool, bool)> = if sieve_rules == 0 {
        protos.iter().map(|&l| (l, false)).collect()
    } else {
        protos
            .iter()
            .flat_map(|&l| [(l, false), (l, true), (l, false), (l, true)])
            .collect()
    };
    let script = sieve_script(sieve_rules);
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for (lmtp, with_sieve) in rounds {
        if sieve_rules > 0 {
            for (u, _) in &accounts {
                let path = format!("/v1/sieve/{u}");
                if with_sieve {
                    let body = serde_json::json!({ "script": script });
                    node.admin(hyper::Method::PUT, &path, Some(body)).await?;
                } else {
                    let _ = node.admin(hyper::Method::DELETE, &path, None).await;
                }
            }
        }
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
        rates[usize::from(with_sieve)].push(d.acked.len() as f64 / d.secs);
        println!(
            "deliver proto={} sieve_rules={} pipelining={pipelining} n={messages} c={connections} ok={} failed={} mean_size={} secs={:.2} msgs_per_sec={:.1} \
             lat_ms_p50={} p99={} fsyncs={} ops_per_fsync={:.1} server_cpu_us={:.0}",
            if lmtp { "lmtp" } else { "smtp" },
            if with_sieve { sieve_rules } else { 0 },
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
    if sieve_rules > 0 {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let (none, with) = (mean(&rates[0]), mean(&rates[1]));
        println!(
            "sieve rules={sieve_rules} msgs_per_sec_without={none:.1} with={with:.1} ratio={:.2}",
            with / none.max(1e-9)
        );
    }
    node.stop().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_benchmark_script_is_valid_sieve() {
        for rules in [0, 1, 20, 100] {
            let src = super::sieve_script(rules);
            assert!(quill_proto::sieve::compile(&src).is_ok(), "{rules}: {src}");
        }
    }
}
