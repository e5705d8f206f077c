//! Seeing the cluster work, on real processes: the live sessions of every
//! node listed through one, a flooding sender ranked first by `top`, and
//! a watched user's and client's commands in the node's log with their
//! secrets hidden.

mod common;

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use quill_harness::process::NodeProcess;
use quill_harness::{Pop3Client, SmtpClient};

/// `quill admin` against `n`: success and what it printed.
fn admin(n: &NodeProcess, args: &[&str]) -> (bool, String) {
    common::quill_admin(n, args)
}

fn json(n: &NodeProcess, args: &[&str]) -> serde_json::Value {
    let (ok, out) = admin(n, args);
    assert!(ok, "{args:?}: {out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_top_senders_and_a_watch_across_the_cluster() {
    let _slot = common::cluster_slot().await;
    let (_dir, nodes) = common::cluster_with_users("activity", 3, &[], &["alice", "bob"]).await;

    // A POP3 session of alice's on node 2, an SMTP session on node 3.
    let mut pop = Pop3Client::connect(nodes[1].pop3()).await.expect("pop3");
    pop.login("alice@example.org", common::PASSWORD).await.expect("login");
    let smtp = SmtpClient::connect(nodes[2].smtp(), false).await.expect("smtp");
    // And bob's IMAP session on node 1 (LOGIN, plain loopback).
    let imap = tokio::net::TcpStream::connect(nodes[0].imap()).await.expect("imap");
    let mut imap = tokio::io::BufReader::new(imap);
    let mut line = String::new();
    imap.read_line(&mut line).await.expect("greeting");
    imap.get_mut()
        .write_all(format!("a LOGIN bob@example.org \"{}\"\r\n", common::PASSWORD).as_bytes())
        .await
        .expect("login");
    loop {
        line.clear();
        imap.read_line(&mut line).await.expect("reply");
        if line.starts_with("a ") {
            assert!(line.starts_with("a OK"), "{line}");
            break;
        }
    }
    let list = json(&nodes[0], &["sessions", "--json"]);
    let rows = list["sessions"].as_array().expect("sessions").clone();
    assert!(list["missing"].as_array().unwrap().is_empty(), "{list}");
    let pop_row = rows
        .iter()
        .find(|r| r["protocol"] == "pop3" && r["user"] == "alice@example.org")
        .unwrap_or_else(|| panic!("alice's POP3 session listed: {list}"))
        .clone();
    let smtp_row = rows
        .iter()
        .find(|r| r["protocol"] == "smtp")
        .unwrap_or_else(|| panic!("the SMTP session listed: {list}"));
    assert_ne!(pop_row["node"], smtp_row["node"], "each on its own node");
    assert!(
        rows.iter()
            .any(|r| r["protocol"] == "imap" && r["user"] == "bob@example.org"),
        "bob's IMAP session listed: {list}"
    );
    assert_eq!(pop_row["tls"], false);
    let (_, table) = admin(&nodes[2], &["sessions"]);
    assert!(table.contains("alice@example.org") && table.contains("pop3"), "{table}");
    drop(smtp);

    // A flood from one sender through node 3, a trickle from others
    // through node 1: the flooder leads the cluster's top, counted whole.
    for (node, from, n) in [
        (&nodes[2], "flood@spam.test", 30),
        (&nodes[0], "one@origin.test", 3),
        (&nodes[1], "two@origin.test", 2),
    ] {
        let mut c = SmtpClient::connect(node.smtp(), false).await.expect("smtp");
        for i in 0..n {
            let body = format!("Subject: {i}\r\n\r\nhello\r\n");
            let r = c
                .send_mail(from, &["bob@example.org"], body.as_bytes())
                .await
                .expect("sent");
            assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
        }
        c.quit().await.ok();
    }
    let top = json(&nodes[1], &["top", "senders", "--window", "1m", "--json"]);
    let first = &top["top"][0];
    assert_eq!(first["key"], "flood@spam.test", "{top}");
    assert_eq!(first["count"], 30, "{top}");
    assert_eq!(top["top"][1]["key"], "one@origin.test", "{top}");
    assert_eq!(top["total"], 35, "{top}");
    let top = json(&nodes[0], &["top", "recipients", "--json"]);
    assert_eq!(
        (top["top"][0]["key"].as_str(), top["top"][0]["count"].as_u64()),
        (Some("bob@example.org"), Some(35))
    );
    let (ok, out) = admin(&nodes[0], &["top", "everything"]);
    assert!(!ok && out.contains("senders"), "{out}");
    let metrics = reqwest_text(&nodes[2]).await;
    assert!(
        metrics.contains("quill_top_messages{kind=\"senders\",key=\"flood@spam.test\"} 30"),
        "node 3's /metrics: {metrics}"
    );

    // Watch alice (on every node): her running session's commands are
    // logged on node 2.
    let (ok, out) = admin(
        &nodes[0],
        &["log-level", "--user", "alice@example.org", "--for", "10m", "--all"],
    );
    assert!(ok, "{out}");
    pop.command("STAT").await.expect("stat");
    common::wait_for("alice's STAT in node 2's log", Duration::from_secs(5), || async {
        let log = std::fs::read_to_string(nodes[1].log_path()).unwrap_or_default();
        log.lines()
            .any(|l| l.contains("watched session") && l.contains("alice@example.org") && l.contains("STAT"))
    })
    .await;
    // Watch her client address: a new session's password stays hidden.
    let peer_ip = pop_row["peer"].as_str().unwrap().rsplit_once(':').unwrap().0.to_owned();
    let (ok, out) = admin(&nodes[1], &["log-level", "--client", &peer_ip, "--for", "5m"]);
    assert!(ok, "{out}");
    let mut bob = Pop3Client::connect(nodes[1].pop3()).await.expect("pop3");
    bob.login("bob@example.org", common::PASSWORD).await.expect("login");
    common::wait_for("bob's PASS in node 2's log", Duration::from_secs(5), || async {
        let log = std::fs::read_to_string(nodes[1].log_path()).unwrap_or_default();
        log.contains("PASS (credentials hidden)")
    })
    .await;
    let log = std::fs::read_to_string(nodes[1].log_path()).unwrap();
    assert!(!log.contains(common::PASSWORD), "a password in the log");
    let (ok, out) = admin(&nodes[0], &["log-level", "--user", "nobody", "--for", "1m"]);
    assert!(!ok && out.contains("watch a user's address"), "{out}");
    let (ok, out) = admin(&nodes[0], &["log-level", "--user", "a@b.test", "--for", "48h"]);
    assert!(!ok && out.contains("1 to 86400 seconds"), "{out}");
}

/// `GET /metrics` of `n`.
async fn reqwest_text(n: &NodeProcess) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(n.admin_addr()).await.expect("admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
