//! IMAP compliance measured with Dovecot's imaptest (a tool nobody here
//! wrote): its scripted tests, every group, against one node; and its
//! stress with QRESYNC on (state tracked per client, VANISHED and MODSEQ
//! checked) by two imaptest processes on two nodes of a cluster at once,
//! the same mailbox. imaptest is
//! kept out of the repository: `.ci/run` builds it with the script in
//! `../shared/tools/imaptest/` and names it in `QUILL_IMAPTEST`; without it
//! (and without `target/imaptest/imaptest/src/imaptest`) the test says it
//! was skipped. With `QUILL_IMAPTEST` set, a missing binary fails.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{PASSWORD, node};

/// The imaptest binary: `QUILL_IMAPTEST`, else where the build script
/// puts it under `target/`.
fn imaptest() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("QUILL_IMAPTEST") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "QUILL_IMAPTEST names no file: {}", p.display());
        return Some(p);
    }
    let default = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/imaptest/imaptest/src/imaptest");
    default.is_file().then_some(default)
}

/// (failed, of) from a line of imaptest's summary: `base protocol: 0/457
/// individual commands failed`, `extensions: 0/26 ...`.
fn commands_failed(summary: &str, label: &str) -> Option<(u32, u32)> {
    let line = summary.lines().find(|l| l.starts_with(label))?;
    let (n, rest) = line[label.len()..].trim().split_once('/')?;
    Some((n.trim().parse().ok()?, rest.split_whitespace().next()?.parse().ok()?))
}

/// (failed, of) from `71 test groups: 0 failed, 0 skipped ...`.
fn groups_failed(summary: &str) -> Option<(u32, u32)> {
    let line = summary.lines().find(|l| l.contains(" test groups:"))?;
    let (of, rest) = line.split_once(" test groups:")?;
    Some((rest.split_whitespace().next()?.parse().ok()?, of.trim().parse().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaptest_scripted_suite_passes_every_group() {
    let Some(bin) = imaptest() else {
        eprintln!("SKIPPED: imaptest not built (../shared/tools/imaptest/build.sh target/imaptest)");
        return;
    };
    let tests = bin.parent().expect("the binary's folder").join("tests");
    let (_dir, n) = node("imaptest", &["--replicas", "1"]).await;
    let imap = n.imap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&bin)
            .env("LD_LIBRARY_PATH", "/usr/lib/dovecot")
            .arg(format!("host={}", imap.ip()))
            .arg(format!("port={}", imap.port()))
            .arg("user=alice@example.org")
            .arg(format!("pass={PASSWORD}"))
            .arg(format!("test={}", tests.display()))
            .output()
            .expect("imaptest runs")
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let groups = groups_failed(&text);
    let base = commands_failed(&text, "base protocol:");
    let ext = commands_failed(&text, "extensions:");
    eprintln!("imaptest: groups {groups:?}, base {base:?}, extensions {ext:?} (failed, of)");
    let tail: String = text
        .lines()
        .rev()
        .take(80)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(groups.is_some_and(|(f, of)| f == 0 && of >= 70), "{tail}");
    assert!(base.is_some_and(|(f, of)| f == 0 && of > 400), "{tail}");
    assert!(ext.is_some_and(|(f, _)| f == 0), "{tail}");
    assert!(!text.contains("Error: "), "imaptest reported errors:\n{tail}");
}

/// The counts of imaptest's `Totals:` table (the line after the
/// percentages), by column: `Logi List ... Logo`.
fn totals(text: &str) -> Vec<(String, u64)> {
    let lines: Vec<&str> = text.lines().collect();
    let Some(t) = lines.iter().rposition(|l| l.starts_with("Totals:")) else {
        return Vec::new();
    };
    let (Some(head), Some(counts)) = (lines.get(t + 1), lines.get(t + 4)) else {
        return Vec::new();
    };
    head.split_whitespace()
        .zip(counts.split_whitespace())
        .filter_map(|(h, c)| Some((h.to_owned(), c.parse().ok()?)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn imaptest_qresync_stress_on_two_nodes_at_once() {
    let Some(bin) = imaptest() else {
        eprintln!("SKIPPED: imaptest not built (../shared/tools/imaptest/build.sh target/imaptest)");
        return;
    };
    let _slot = common::cluster_slot().await;
    let mbox = bin.parent().expect("the binary's folder").join("tests/default.mbox");
    let (_dir, nodes) = common::cluster_with_users("imaptest-qresync", 2, &[], &["alice"]).await;
    common::wait_user_on_every_node(&nodes, "alice@").await;
    let runs: Vec<_> = nodes
        .iter()
        .map(|n| {
            let (bin, mbox, imap) = (bin.clone(), mbox.clone(), n.imap());
            tokio::task::spawn_blocking(move || {
                let out = Command::new(&bin)
                    .env("LD_LIBRARY_PATH", "/usr/lib/dovecot")
                    .arg(format!("host={}", imap.ip()))
                    .arg(format!("port={}", imap.port()))
                    .arg("user=alice@example.org")
                    .arg(format!("pass={PASSWORD}"))
                    .args(["clients=4", "secs=10", "qresync"])
                    .arg(format!("mbox={}", mbox.display()))
                    .output()
                    .expect("imaptest runs");
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            })
        })
        .collect();
    for (k, run) in runs.into_iter().enumerate() {
        let text = run.await.expect("imaptest task");
        let totals = totals(&text);
        eprintln!("imaptest with QRESYNC on node {}: {totals:?}", k + 1);
        let problems: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("Error") || l.starts_with("Panic") || l.starts_with("Fatal"))
            .take(20)
            .collect();
        assert!(problems.is_empty(), "node {}: {problems:#?}", k + 1);
        for op in ["Sele", "Stor", "Expu", "Appe"] {
            assert!(
                totals.iter().any(|(h, n)| h == op && *n > 0),
                "node {}: no {op} done: {totals:?}\n{text}",
                k + 1
            );
        }
    }
}
