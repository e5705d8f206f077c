//! Shared setup for the tests in this folder.
#![allow(dead_code)]

pub mod dns;
pub mod harness;
pub mod sink;

use quill_harness::fresh_loopback;
use quill_harness::process::{NodeOptions, NodeProcess, TempDir};

pub const PASSWORD: &str = "correct horse";

/// A node on its own loopback address with domain example.org and users
/// alice, bob and carol (password [`PASSWORD`]).
pub async fn node(label: &str, extra: &[&str]) -> (TempDir, NodeProcess) {
    node_with(label, extra, true).await
}

/// As [`node`], but mail from loopback is checked as mail from the
/// internet is (SPF, DKIM, DMARC: see `quill_harness::TRUST_LOOPBACK`).
pub async fn node_checked(label: &str, extra: &[&str]) -> (TempDir, NodeProcess) {
    node_with(label, extra, false).await
}

async fn node_with(label: &str, extra: &[&str], trust_loopback: bool) -> (TempDir, NodeProcess) {
    let dir = TempDir::new(label).expect("temp dir");
    let mut opts = NodeOptions::new(dir.path().join("node"), fresh_loopback()).expect("quill binary");
    opts.extra_args = extra.iter().map(|s| s.to_string()).collect();
    opts.trust_loopback = trust_loopback;
    let node = NodeProcess::start(opts).await.expect("node starts");
    node.add_domain("example.org").await.expect("domain");
    for u in ["alice", "bob", "carol"] {
        node.add_user(&format!("{u}@example.org"), PASSWORD, None)
            .await
            .expect("user");
    }
    (dir, node)
}

/// A converged cluster of `n` nodes (more `quill node` flags in `extra`)
/// with domain example.org and `users` in it (password [`PASSWORD`]).
pub async fn cluster_with_users(label: &str, n: usize, extra: &[&str], users: &[&str]) -> (TempDir, Vec<NodeProcess>) {
    use std::time::Duration;
    let dir = TempDir::new(label).expect("temp dir");
    let nodes = quill_harness::process::start_cluster_with(dir.path(), n, &format!("{label}-secret"), "info", extra)
        .await
        .expect("cluster starts");
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    quill_harness::process::wait_converged(&all, n, Duration::from_secs(60))
        .await
        .expect("converges");
    nodes[0].add_domain("example.org").await.expect("domain");
    for u in users {
        nodes[0]
            .add_user(&format!("{u}@example.org"), PASSWORD, None)
            .await
            .expect("user");
    }
    (dir, nodes)
}

// Not every test binary waits on something.
#[allow(unused_imports)]
pub use testkit::wait_for;

/// Held by every test that starts a multi-node cluster: clusters in one
/// test binary run one at a time, so that their heartbeats (200 ms) and
/// failure timeouts (2 s) do not race each other for CI's 2 cores. (Test
/// binaries already run one after the other.)
static CLUSTER_SLOT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub async fn cluster_slot() -> tokio::sync::MutexGuard<'static, ()> {
    CLUSTER_SLOT.lock().await
}

/// [`cluster_slot`] for tests that are not async.
pub fn cluster_slot_blocking() -> tokio::sync::MutexGuard<'static, ()> {
    CLUSTER_SLOT.blocking_lock()
}

/// A user's whole mailbox read over POP3 through `node` (password
/// [`PASSWORD`]), without deleting: UIDL -> message bytes.
pub async fn read_all(node: &NodeProcess, user: &str) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut p = quill_harness::Pop3Client::connect(node.pop3())
        .await
        .expect("pop3 connects");
    p.login(user, PASSWORD).await.expect("login");
    let mut out = std::collections::BTreeMap::new();
    for (n, uid) in p.uidl().await.expect("uidl") {
        out.insert(uid, p.retr(n).await.expect("retr"));
    }
    p.quit().await.expect("quit");
    out
}

/// The `X-Test-Seq:` value a test message carries.
pub fn marker(msg: &[u8]) -> String {
    String::from_utf8_lossy(msg)
        .lines()
        .find_map(|l| l.strip_prefix("X-Test-Seq: "))
        .expect("test marker header")
        .trim()
        .to_owned()
}

/// Runs a command to its end; its stdout and stderr, or a panic with them
/// if it failed.
pub fn run(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Waits until every node's directory lists `address` (it is added on
/// one node and reaches the others through Raft).
pub async fn wait_user_on_every_node(nodes: &[NodeProcess], address: &str) {
    for n in nodes {
        wait_for("the user on every node", std::time::Duration::from_secs(30), || async {
            n.admin(hyper::Method::GET, "/v1/users", None)
                .await
                .is_ok_and(|d| d.to_string().contains(address))
        })
        .await;
    }
}

/// Delivers one short message with `subject` to `to` over `node`'s SMTP;
/// panics unless it gets a 250.
pub async fn smtp_to(node: &NodeProcess, to: &str, subject: &str) {
    let mut s = quill_harness::SmtpClient::connect(node.smtp(), false)
        .await
        .expect("smtp");
    let body = format!("Subject: {subject}\r\nFrom: a@remote.test\r\n\r\nbody of {subject}\r\n");
    let r = s
        .send_mail("a@remote.test", &[to], body.as_bytes())
        .await
        .expect("delivered");
    assert_eq!(r[0].code, 250, "{r:?}");
    s.quit().await.expect("quit");
}

/// Runs a Python script (`python3 -c`) with `args`; the JSON object its
/// last line prints. A failure panics with what it printed (not the
/// script, which the test holds).
pub fn python_json(script: &str, args: Vec<String>) -> serde_json::Value {
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(&args)
        .output()
        .expect("python3 runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the script failed (args {args:?}):\n{text}");
    let last = text.lines().rfind(|l| l.starts_with('{')).unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// `quill admin ARGS` against `n`: whether it succeeded, and what it
/// printed (standard output, then standard error).
pub fn quill_admin(n: &NodeProcess, args: &[&str]) -> (bool, String) {
    let o = n.admin_command().args(args).output().expect("quill admin runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}
