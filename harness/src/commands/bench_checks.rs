//! `bench-checks`: SMTP deliveries with every check of incoming mail on
//! (SPF of HELO and MAIL FROM, DKIM, ARC, DMARC, iprev) beside the same
//! deliveries with none, in one run, on two nodes alike but for that:
//! rounds alternate (off, on, off, on) and the mean rates are compared.
//!
//! The answers come from a dnsmasq the benchmark starts on loopback
//! (`--dns`): SPF, DMARC and an Ed25519 DKIM key for the generator's
//! domain, which signs every message (both nodes get the same signed
//! mail). Answers are cached by the node's resolver after the first.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use mail_auth::common::crypto::Ed25519Key;
use mail_auth::dkim::DkimSigner;
use mail_auth::dkim::generate::DkimKeyPair;

use super::ms;
use crate::bench::{self, DeliverPlan, Signer};
use crate::fresh_loopback;
use crate::process::{NodeOptions, NodeProcess, cpu_secs};

/// The records of the generator's domain (SPF, DMARC, its DKIM key) and
/// of its HELO name.
fn records(public_key: &str) -> Vec<String> {
    vec![
        "--local=/test/".to_owned(),
        // Answers with a TTL, as real zones give (dnsmasq's own is 0:
        // nothing would be cached).
        "--local-ttl=300".to_owned(),
        "--txt-record=remote.test,v=spf1 ip4:127.0.0.0/8 -all".to_owned(),
        "--txt-record=harness.quill.test,v=spf1 ip4:127.0.0.0/8 -all".to_owned(),
        "--txt-record=_dmarc.remote.test,v=DMARC1; p=reject".to_owned(),
        format!("--txt-record=bench._domainkey.remote.test,v=DKIM1; k=ed25519; p={public_key}"),
    ]
}

pub async fn bench_checks(load: bench::Load, rounds: usize, dir: Option<PathBuf>, seed: u64) -> anyhow::Result<()> {
    let keys = DkimKeyPair::generate_ed25519().map_err(|e| anyhow::anyhow!("{e}"))?;
    let key = Ed25519Key::from_pkcs8_der(keys.private_key()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let signer = Arc::new(Signer(
        DkimSigner::from_key(key)
            .domain("remote.test")
            .selector("bench")
            .headers(["From", "To", "Subject", "Date", "Message-ID"]),
    ));
    let dns = crate::dns::Dnsmasq::start(&records(&keys.encoded_public_key()))?;
    let dns_addr = dns.addr.to_string();
    let (_temp, dir) = crate::process::or_fresh(dir, "bench-checks")?;
    let mut nodes = Vec::new();
    for checked in [false, true] {
        let mut opts = NodeOptions::new(dir.join(if checked { "on" } else { "off" }), fresh_loopback())?;
        opts.trust_loopback = !checked;
        opts.extra_args = ["--replicas", "1", "--hostname", "mx.bench.test", "--dns", &dns_addr]
            .map(str::to_owned)
            .to_vec();
        let node = NodeProcess::start(opts).await?;
        node.add_domain("example.com").await?;
        for i in 1..=load.users {
            node.add_user(&format!("user{i:04}@example.com"), &format!("pass{i:04}"), None)
                .await?;
        }
        nodes.push(node);
    }
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut cpus: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..rounds * 2 {
        let checked = round % 2 == 1;
        let node = &nodes[usize::from(checked)];
        let mut plan = DeliverPlan::for_load(vec![node.smtp()], false, load, seed.wrapping_add(round as u64));
        plan.dkim = Some(signer.clone());
        let pid = node.pid().context("the node's pid")?;
        let cpu0 = cpu_secs(pid)?;
        let d = bench::deliver(plan).await;
        let cpu_us = (cpu_secs(pid)? - cpu0) / d.acked.len().max(1) as f64 * 1e6;
        let rate = d.acked.len() as f64 / d.secs;
        println!(
            "deliver checks={} n={} c={} ok={} failed={} secs={:.2} msgs_per_sec={rate:.1} lat_ms_p50={} p99={} server_cpu_us={cpu_us:.0}",
            if checked { "on" } else { "off" },
            load.messages,
            load.connections,
            d.acked.len(),
            d.unknown.len(),
            d.secs,
            ms(&d.latencies_ms, 50.0),
            ms(&d.latencies_ms, 99.0),
        );
        if let Some(e) = d.errors.first() {
            println!("  first error: {e}");
        }
        if d.acked.len() as u64 != load.messages {
            bail!("{} of {} messages taken", d.acked.len(), load.messages);
        }
        rates[usize::from(checked)].push(rate);
        cpus[usize::from(checked)].push(cpu_us);
    }
    // Every message on the checked node passed every check (or the
    // comparison would be of a node that skipped work).
    let checked = &nodes[1];
    for method in ["spf", "dkim", "dmarc"] {
        let pass = checked
            .metric(&format!(
                "quill_mail_auth_results_total{{method=\"{method}\",result=\"pass\"}}"
            ))
            .await
            .unwrap_or(0.0);
        let want = (load.messages * rounds as u64) as f64;
        println!("checked node: {method}=pass for {pass} of {want} messages");
        if pass < want {
            bail!("{method} did not pass for every message: the records or the signer are wrong");
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "checks msgs_per_sec_off={:.1} on={:.1} ratio={:.2} server_cpu_us_off={:.0} on={:.0}",
        mean(&rates[0]),
        mean(&rates[1]),
        mean(&rates[1]) / mean(&rates[0]).max(1e-9),
        mean(&cpus[0]),
        mean(&cpus[1]),
    );
    for mut n in nodes {
        n.stop().await?;
    }
    Ok(())
}
