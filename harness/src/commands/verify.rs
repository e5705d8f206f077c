//! `verify`: every acknowledged, undeleted message present once with its
//! checksum, nothing deleted back.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};

use super::{Cluster, target};
use crate::cluster::ClusterState;
use crate::load::{self, Record, Target, VerifyReport};
use crate::process::{ADMIN_PORT, POP3_PORT, SMTP_PORT};

/// `verify`: reads every load user's mailbox from one live node.
pub async fn verify(cluster: Cluster, password: Option<String>, out: PathBuf) -> anyhow::Result<VerifyReport> {
    let path = out.join("record.json");
    let record: Record = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("no load record at {}", path.display()))?,
    )?;
    let (node, password) = match cluster {
        Cluster::Dir(dir) => {
            let state = ClusterState::load(&dir)?;
            let k = *state.live().first().ok_or_else(|| anyhow!("no node is running"))?;
            (target(&state, k), state.password.clone())
        }
        Cluster::Hosts(hosts) => {
            let ip = hosts[0];
            (
                Target {
                    name: ip.to_string(),
                    smtp: SocketAddr::new(ip.into(), SMTP_PORT),
                    pop3: SocketAddr::new(ip.into(), POP3_PORT),
                    admin: SocketAddr::new(ip.into(), ADMIN_PORT),
                },
                password.context("--hosts needs --password")?,
            )
        }
    };
    let report = load::verify(&record, &node, &password).await?;
    load::write_json(&out.join("verify.json"), &report)?;
    println!(
        "verify via {}: {} users, {} messages expected, {} present once with their checksum; \
         lost {}, duplicated {}, corrupt {}, deleted but present {}, unexpected {}, \
         unacknowledged but present {} (allowed)",
        node.name,
        report.users_checked,
        report.expected_present,
        report.present_ok,
        report.lost.len(),
        report.duplicated.len(),
        report.corrupt.len(),
        report.resurrected.len(),
        report.unexpected,
        report.unknown_present,
    );
    println!("written: {}/verify.json", out.display());
    if !report.ok() {
        bail!("verification failed: {report:?}");
    }
    Ok(report)
}
