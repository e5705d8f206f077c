//! `bench-tls`: what TLS costs one node. Full handshakes per second on the
//! SMTPS port, then deliveries per second over persistent SMTP sessions,
//! plaintext beside STARTTLS, each with the node's CPU time per operation.
//! The delivery rounds run in ABBA order (plaintext, STARTTLS, STARTTLS,
//! plaintext): the store grows as the run goes on, which must favour
//! neither. The client is this harness (rustls), so that on a small
//! machine the client's own TLS cost does not hide the server's.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};

use crate::bench::{self, DeliverPlan};
use crate::client::{SmtpClient, Tls};
use crate::fresh_loopback;
use crate::process::{NodeOptions, NodeProcess, cpu_secs};

/// Totals of one kind of operation over its rounds.
#[derive(Default)]
struct Tally {
    n: u64,
    secs: f64,
    cpu: f64,
}

impl Tally {
    fn rate(&self) -> f64 {
        self.n as f64 / self.secs.max(1e-9)
    }
    fn cpu_us(&self) -> f64 {
        self.cpu / self.n.max(1) as f64 * 1e6
    }
}

pub async fn bench_tls(
    messages: u64,
    connections: usize,
    handshakes: u64,
    rounds: u32,
    dir: Option<PathBuf>,
    seed: u64,
) -> anyhow::Result<()> {
    let (_temp, dir) = crate::process::or_fresh(dir, "bench-tls")?;
    let mut opts = NodeOptions::new(dir.join("node"), fresh_loopback())?;
    opts.log = "warn".into();
    opts.extra_args = vec!["--replicas".into(), "1".into()];
    let mut node = NodeProcess::start(opts).await?;
    let pid = node.pid().context("the node's pid")?;
    let tls = Tls::trusting(&node.self_signed_cert(), &node.opts.ip.to_string())?;
    println!("node {} (pid {pid}), data in {}", node.opts.ip, dir.display());
    let users = 10;
    node.add_domain("example.com").await?;
    for i in 1..=users {
        node.add_user(&format!("user{i:04}@example.com"), &format!("pass{i:04}"), None)
            .await?;
    }

    // Handshakes: each worker connects, completes a full handshake (the
    // harness's client never resumes a session) and reads the greeting.
    let hs = {
        let next = Arc::new(AtomicU64::new(0));
        let cpu0 = cpu_secs(pid)?;
        let t0 = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let (next, tls, addr) = (next.clone(), tls.clone(), node.smtps());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < handshakes {
                    SmtpClient::connect_tls(addr, &tls).await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        Tally {
            n: handshakes,
            secs: t0.elapsed().as_secs_f64(),
            cpu: cpu_secs(pid)? - cpu0,
        }
    };
    println!(
        "handshakes (SMTPS, full, then the greeting) n={} c={connections} secs={:.2} per_sec={:.0} server_cpu_us={:.0}",
        hs.n,
        hs.secs,
        hs.rate(),
        hs.cpu_us()
    );

    let (mut plain, mut secure) = (Tally::default(), Tally::default());
    for r in 0..rounds * 2 {
        // ABBA: plaintext first in even rounds, STARTTLS first in odd ones.
        let starttls = (r % 2 == 1) != ((r / 2) % 2 == 1);
        let mut plan = DeliverPlan::bench(vec![node.smtp()], false, messages, connections, users, seed + r as u64);
        plan.starttls = starttls.then(|| tls.clone());
        let cpu0 = cpu_secs(pid)?;
        let d = bench::deliver(plan).await;
        let cpu = cpu_secs(pid)? - cpu0;
        if !d.unknown.is_empty() || d.acked.len() as u64 != messages {
            bail!(
                "round {r}: {} of {messages} acknowledged; first error: {:?}",
                d.acked.len(),
                d.errors.first()
            );
        }
        let t = if starttls { &mut secure } else { &mut plain };
        t.n += messages;
        t.secs += d.secs;
        t.cpu += cpu;
        println!(
            "deliver {} round={r} n={messages} c={connections} secs={:.2} msgs_per_sec={:.0} server_cpu_us={:.0}",
            if starttls { "starttls" } else { "plaintext" },
            d.secs,
            messages as f64 / d.secs,
            cpu / messages as f64 * 1e6
        );
    }
    for (name, t) in [("plaintext", &plain), ("starttls", &secure)] {
        println!(
            "deliver {name} total n={} msgs_per_sec={:.0} server_cpu_us={:.0}",
            t.n,
            t.rate(),
            t.cpu_us()
        );
    }
    println!(
        "starttls/plaintext msgs_per_sec={:.2} server_cpu_per_msg={:.2}",
        secure.rate() / plain.rate(),
        secure.cpu_us() / plain.cpu_us()
    );
    node.stop().await?;
    Ok(())
}
