//! Cluster settings on real processes: a limit set through node 1 refuses
//! on node 3 within 2 s with no restart, a node that was down gets the
//! newest on its return, bad values and keys are refused with the reason,
//! and a node's own flag holds over the cluster's.

mod common;

use std::process::Command;
use std::time::Duration;

use common::node;
use quill_harness::SmtpClient;
use quill_harness::process::NodeProcess;

/// `quill admin` against `n`: success and what it printed.
fn admin(n: &NodeProcess, args: &[&str]) -> (bool, String) {
    common::quill_admin(n, args)
}

/// How many of three recipients `n` takes in one transaction.
async fn recipients_taken(n: &NodeProcess) -> usize {
    let Ok(mut c) = SmtpClient::connect(n.smtp(), false).await else {
        return 0;
    };
    let _ = c.command("MAIL FROM:<x@origin.test>").await;
    let mut taken = 0;
    for u in ["alice", "bob", "carol"] {
        if c.command(&format!("RCPT TO:<{u}@example.org>"))
            .await
            .is_ok_and(|r| r.code == 250)
        {
            taken += 1;
        }
    }
    let _ = c.quit().await;
    taken
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setting_made_through_one_node_holds_on_every_node() {
    let _slot = common::cluster_slot().await;
    let (_dir, mut nodes) = common::cluster_with_users("settings", 3, &[], &["alice", "bob", "carol"]).await;
    assert_eq!(recipients_taken(&nodes[2]).await, 3);
    // Checked at set, with the reason.
    let (ok, out) = admin(&nodes[0], &["settings", "set", "max-recipients", "0"]);
    assert!(!ok && out.contains("max-recipients must be 1 to 10000"), "{out}");
    let (ok, out) = admin(&nodes[0], &["settings", "set", "max-everything", "1"]);
    assert!(!ok && out.contains("unknown setting"), "{out}");
    let (ok, out) = admin(&nodes[0], &["settings", "set", "max-recipients", "2"]);
    assert!(ok, "{out}");
    // Node 3 refuses the third recipient within 2 s, with no restart.
    common::wait_for("the limit on node 3", Duration::from_secs(2), || async {
        recipients_taken(&nodes[2]).await == 2
    })
    .await;
    let (_, json) = admin(&nodes[1], &["settings", "list", "--json"]);
    let rows: serde_json::Value = serde_json::from_str(json.trim()).expect("JSON");
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "max-recipients")
        .expect("listed")
        .clone();
    assert_eq!(
        (row["value"].as_str(), row["default"].as_str(), row["source"].as_str()),
        (Some("2"), Some("100"), Some("cluster"))
    );
    // A node down during a change has it when it returns.
    nodes[2].stop().await.unwrap();
    let (ok, out) = admin(&nodes[0], &["settings", "set", "max-message-size", "64KiB"]);
    assert!(ok, "{out}");
    nodes[2].restart().await.unwrap();
    common::wait_for(
        "the size on node 3 after its restart",
        Duration::from_secs(30),
        || async {
            SmtpClient::connect(nodes[2].smtp(), false)
                .await
                .is_ok_and(|c| c.ehlo.text.contains("SIZE 65536"))
        },
    )
    .await;
    // Unset: back to the default everywhere.
    let (ok, out) = admin(&nodes[2], &["settings", "unset", "max-recipients"]);
    assert!(ok, "{out}");
    common::wait_for("the default on node 1", Duration::from_secs(2), || async {
        recipients_taken(&nodes[0]).await == 3
    })
    .await;
    let (ok, out) = admin(&nodes[0], &["settings", "unset", "max-recipients"]);
    assert!(!ok && out.contains("is not set"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_own_flag_holds_over_the_cluster_setting() {
    let (_d, n) = node("settings-flag", &["--max-recipients", "3"]).await;
    let (ok, out) = admin(&n, &["settings", "set", "max-recipients", "1"]);
    assert!(ok, "{out}");
    let (ok, out) = admin(&n, &["settings", "set", "idle-timeout", "2m"]);
    assert!(ok, "{out}");
    let (_, list) = admin(&n, &["settings", "list"]);
    assert!(list.contains("max-recipients = 3 (flag; default 100)"), "{list}");
    assert!(
        list.contains("idle-timeout = 120 (cluster; default 300) from new sessions"),
        "{list}"
    );
    assert_eq!(recipients_taken(&n).await, 3);
}

/// The first line a server sends on a new plain connection to `addr`.
async fn greeting(addr: std::net::SocketAddr) -> String {
    use tokio::io::AsyncBufReadExt;
    let Ok(s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
    line
}

/// What a node answers to POP3 `USER` on a plain loopback connection.
async fn pop3_user_reply(n: &NodeProcess) -> String {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let s = tokio::net::TcpStream::connect(n.pop3()).await.expect("connect");
    let mut r = tokio::io::BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.expect("greeting");
    r.get_mut()
        .write_all(b"USER alice@example.org\r\n")
        .await
        .expect("write");
    line.clear();
    r.read_line(&mut line).await.expect("reply");
    line
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_settings_reach_a_running_node() {
    let (_d, n) = node("settings-policy", &[]).await;
    // Passwords in the clear from loopback: allowed by default, refused
    // once the cluster says never.
    assert!(pop3_user_reply(&n).await.starts_with("+OK"));
    let (ok, out) = admin(&n, &["settings", "set", "plaintext-auth", "never"]);
    assert!(ok, "{out}");
    common::wait_for("plaintext-auth never in force", Duration::from_secs(2), || async {
        pop3_user_reply(&n).await.starts_with("-ERR")
    })
    .await;
    // Connections per address: the third of two gets the protocol's refusal.
    let (ok, out) = admin(&n, &["settings", "set", "max-connections-per-ip", "2"]);
    assert!(ok, "{out}");
    common::wait_for("two connections per address", Duration::from_secs(2), || async {
        let a = tokio::net::TcpStream::connect(n.smtp()).await;
        let b = tokio::net::TcpStream::connect(n.smtp()).await;
        let third = greeting(n.smtp()).await;
        drop((a, b));
        third.starts_with("421 4.7.0 Too many connections")
    })
    .await;
    // Durations are shown as given; bad ones refused with the reason.
    let (ok, out) = admin(&n, &["settings", "set", "retry-initial", "90s"]);
    assert!(ok, "{out}");
    let (ok, out) = admin(&n, &["settings", "set", "repair-grace", "forever"]);
    assert!(!ok && out.contains("repair-grace"), "{out}");
    let (_, list) = admin(&n, &["settings", "list"]);
    assert!(list.contains("retry-initial = 90s (cluster; default 1m)"), "{list}");
    assert!(
        list.contains("plaintext-auth = never (cluster; default loopback)"),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_gives_the_flags_keys() {
    let files = quill_harness::process::TempDir::new("settings-config-file").expect("temp dir");
    let config = files.path().join("quill.toml");
    std::fs::write(
        &config,
        "# as the flags, without their dashes\nmax-recipients = 2\nidle-timeout = 120\nsubaddress-folders = true\n",
    )
    .unwrap();
    let (_d, n) = node("settings-config", &["--config", config.to_str().unwrap()]).await;
    assert_eq!(recipients_taken(&n).await, 2);
    let (_, list) = admin(&n, &["settings", "list"]);
    assert!(list.contains("max-recipients = 2 (flag; default 100)"), "{list}");
    assert!(
        list.contains("subaddress-folders = true (flag; default false)"),
        "{list}"
    );
    // A key that is no flag, a table, and a file that is not TOML: the
    // node does not start, and says why.
    for (body, says) in [
        ("max-everything = 3\n", "--max-everything"),
        ("[limits]\nmax-recipients = 3\n", "takes a string, a number"),
        ("max-recipients = = 3\n", "not a TOML file"),
    ] {
        std::fs::write(&config, body).unwrap();
        let o = Command::new(&n.opts.binary)
            .args(["node", "--config", config.to_str().unwrap()])
            .args(["--data", files.path().join("never").to_str().unwrap()])
            .args(["--cluster-addr", "127.0.0.1:1"])
            .output()
            .expect("quill runs");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(says), "{body:?}: {err}");
    }
}
