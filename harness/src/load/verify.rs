//! `verify`: the cluster checked against the record a load run left.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{Record, Target};
use crate::client::{Pop3Client, strip_received};
use crate::workload::seq_of;

/// What [`verify`] found.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    pub users_checked: usize,
    /// Messages listed in the checked mailboxes (whatever they are).
    #[serde(default)]
    pub listed: usize,
    pub expected_present: usize,
    pub present_ok: usize,
    /// Acknowledged, not deleted, not found.
    pub lost: Vec<u64>,
    /// Found more than once.
    pub duplicated: Vec<u64>,
    /// Found with other bytes than acknowledged.
    pub corrupt: Vec<u64>,
    /// Deleted (QUIT +OK), found again.
    pub resurrected: Vec<u64>,
    /// Found, not sent by this run (earlier runs' mail, or other mail).
    pub unexpected: usize,
    /// Sent without a final positive reply, found anyway (allowed).
    pub unknown_present: usize,
    /// Read with wrong bytes during the run.
    pub corrupt_reads: Vec<u64>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.corrupt.is_empty()
            && self.resurrected.is_empty()
            && self.corrupt_reads.is_empty()
    }
}

/// Checks the cluster against a load run's record: reads every user's
/// mailbox over POP3 from `node` (without deleting) and compares.
pub async fn verify(record: &Record, node: &Target, password: &str) -> anyhow::Result<VerifyReport> {
    let mut report = VerifyReport {
        corrupt_reads: record.corrupt_reads.clone(),
        ..VerifyReport::default()
    };
    let mut by_user: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (seq, (user, _)) in &record.acked {
        by_user.entry(user.as_str()).or_default().push(*seq);
    }
    let mut found: HashMap<u64, u32> = HashMap::new();
    for user in by_user.keys() {
        // The last sessions of a load may still be releasing their locks.
        let end = Instant::now() + Duration::from_secs(15);
        let mut p = loop {
            let mut p = Pop3Client::connect(node.pop3).await.context("pop3 connect")?;
            match p.login(user, password).await {
                Ok(_) => break p,
                Err(e) if e.to_string().contains("[IN-USE]") && Instant::now() < end => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).with_context(|| format!("login {user}")),
            }
        };
        for (n, _) in p.uidl().await? {
            report.listed += 1;
            let msg = p.retr(n).await?;
            let original = strip_received(&msg).unwrap_or(&msg);
            let Some(seq) = seq_of(original) else {
                report.unexpected += 1;
                continue;
            };
            *found.entry(seq).or_default() += 1;
            match record.acked.get(&seq) {
                Some((_, h)) if *h != blake3::hash(original).to_hex().to_string() => report.corrupt.push(seq),
                Some(_) => {}
                None if record.unknown.contains(&seq) => report.unknown_present += 1,
                None => report.unexpected += 1,
            }
        }
        p.quit().await?;
        report.users_checked += 1;
    }
    for seq in record.acked.keys() {
        let n = found.get(seq).copied().unwrap_or(0);
        if record.deleted.contains(seq) {
            if n > 0 {
                report.resurrected.push(*seq);
            }
            continue;
        }
        if record.maybe_deleted.contains(seq) {
            continue;
        }
        report.expected_present += 1;
        match n {
            0 => report.lost.push(*seq),
            1 => report.present_ok += 1,
            _ => report.duplicated.push(*seq),
        }
    }
    Ok(report)
}
