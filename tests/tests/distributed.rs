//! Distributed mail across real processes: three nodes on their own
//! 127.0.0.x addresses with R=2. Clients connect to any node (as with DNS
//! round robin); every message is on exactly two nodes, readable from
//! every node, and a deletion on one node removes it everywhere.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::Duration;

use quill_harness::process::{self, NodeProcess, TempDir};
use quill_harness::{Pop3Client, SmtpClient};
use serde_json::Value;

const SECRET: &str = "distributed-test-secret";
const PASSWORD: &str = "correct horse";

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}

async fn cluster(label: &str, n: usize, users: &[String]) -> (TempDir, Vec<NodeProcess>) {
    let dir = TempDir::new(label).expect("temp dir");
    let nodes = process::start_cluster(dir.path(), n, SECRET, "info")
        .await
        .expect("cluster starts");
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    process::wait_converged(&all, n, Duration::from_secs(60))
        .await
        .expect("cluster converges");
    nodes[0].add_domain("example.org").await.expect("domain");
    for u in users {
        nodes[0].add_user(u, PASSWORD, None).await.expect("user");
    }
    // The directory reaches every node through Raft.
    let last = users.last().expect("users").clone();
    for n in &nodes {
        common::wait_for("the users on every node", Duration::from_secs(30), || async {
            n.admin(hyper::Method::GET, "/v1/users", None)
                .await
                .is_ok_and(|d| d.to_string().contains(&last))
        })
        .await;
    }
    (dir, nodes)
}

async fn status(n: &NodeProcess) -> Value {
    n.status().await.expect("status")
}

/// (messages, bytes) per node id, and the cluster's under_replicated.
async fn counts(n: &NodeProcess) -> (BTreeMap<u64, (u64, u64)>, u64) {
    let s = status(n).await;
    let per = s["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|x| {
            (
                x["id"].as_u64().expect("id"),
                (
                    x["messages"].as_u64().expect("every node answers"),
                    x["bytes"].as_u64().expect("bytes"),
                ),
            )
        })
        .collect();
    (per, s["under_replicated"].as_u64().expect("under_replicated"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_two_copies_any_node_serves_any_mailbox() {
    let _slot = common::cluster_slot().await;
    let users: Vec<String> = (0..200).map(|i| format!("user{i:03}@example.org")).collect();
    let (_dir, nodes) = cluster("dist3", 3, &users).await;

    // 5 000 messages to 200 users, each connection to a random node.
    const MESSAGES: usize = 5_000;
    const CONNS: usize = 8;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CONNS {
        let smtps: Vec<_> = nodes.iter().map(|n| n.smtp()).collect();
        let users = users.clone();
        tasks.spawn(async move {
            let mut rng = Rng(c as u64 + 1);
            let mut sent: Vec<(String, usize)> = Vec::new();
            let mut client: Option<SmtpClient> = None;
            for k in (c..MESSAGES).step_by(CONNS) {
                // A new connection, to a random node, every 25 messages.
                if k % 25 < CONNS || client.is_none() {
                    if let Some(old) = client.take() {
                        old.quit().await.expect("quit");
                    }
                    let to = smtps[rng.below(smtps.len() as u64) as usize];
                    client = Some(SmtpClient::connect(to, false).await.expect("smtp connects"));
                }
                let user = &users[rng.below(users.len() as u64) as usize];
                let body = format!(
                    "Subject: message {k}\r\nX-Test-Seq: {k}\r\n\r\nbody of message {k} for {user}\r\n{}\r\n",
                    "x".repeat(k % 700)
                );
                let replies = client
                    .as_mut()
                    .expect("connected")
                    .send_mail("load@remote.test", &[user.as_str()], body.as_bytes())
                    .await
                    .expect("send");
                let last = replies.last().expect("a reply");
                assert!(last.is_ok(), "message {k}: {last:?}");
                sent.push((user.clone(), k));
            }
            if let Some(c) = client {
                c.quit().await.expect("quit");
            }
            sent
        });
    }
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        for (user, k) in r.expect("sender task") {
            expected.entry(user).or_default().insert(k.to_string());
        }
    }
    assert_eq!(expected.values().map(|s| s.len()).sum::<usize>(), MESSAGES);

    // Exactly two copies of each: 2 × 5 000 entries over the nodes, none
    // under-replicated.
    let (per, under) = counts(&nodes[0]).await;
    let total: u64 = per.values().map(|c| c.0).sum();
    assert_eq!(total, 2 * MESSAGES as u64, "entries per node: {per:?}");
    assert_eq!(under, 0, "under-replicated messages with every node up");
    eprintln!("entries per node after {MESSAGES} deliveries: {per:?}");

    // Every message readable from every node, byte-exact, exactly once.
    for node in &nodes {
        for user in &users {
            let got = common::read_all(node, user).await;
            let markers: BTreeSet<String> = got.values().map(|m| common::marker(m)).collect();
            assert_eq!(markers.len(), got.len(), "{user}: a message listed twice");
            let want = expected.get(user).cloned().unwrap_or_default();
            assert_eq!(markers, want, "{user} as read from {}", node.pop3());
            for m in got.values() {
                let k = common::marker(m);
                let text = String::from_utf8_lossy(m);
                assert!(
                    text.contains(&format!("body of message {k} for {user}\r\n")),
                    "{user} message {k} is damaged"
                );
            }
        }
    }

    // DELE+QUIT on one node removes the messages from every node.
    let victims: Vec<&String> = users.iter().take(20).collect();
    let mut removed = 0;
    for (i, user) in victims.iter().enumerate() {
        let node = &nodes[i % nodes.len()];
        let mut p = Pop3Client::connect(node.pop3()).await.expect("pop3");
        p.login(user, PASSWORD).await.expect("login");
        let (n, _) = p.stat().await.expect("stat");
        for k in 1..=n {
            p.dele(k as u32).await.expect("dele");
        }
        p.quit().await.expect("quit");
        removed += n;
    }
    for node in &nodes {
        for user in &victims {
            let mut p = Pop3Client::connect(node.pop3()).await.expect("pop3");
            p.login(user, PASSWORD).await.expect("login");
            assert_eq!(p.stat().await.expect("stat").0, 0, "{user} on {}", node.pop3());
            p.quit().await.expect("quit");
        }
    }
    let (per, _) = counts(&nodes[1]).await;
    let total: u64 = per.values().map(|c| c.0).sum();
    assert_eq!(
        total,
        2 * (MESSAGES - removed) as u64,
        "both copies of each deleted message went"
    );

    // One message for three users is stored once per node: each node's
    // body bytes grow by the body's size or not at all.
    let (before, _) = counts(&nodes[2]).await;
    let body = format!(
        "Subject: to three\r\n\r\n{}",
        format!("{}\r\n", "m".repeat(98)).repeat(200)
    );
    let three = [&users[100], &users[101], &users[102]];
    let mut c = SmtpClient::connect(nodes[2].smtp(), false).await.expect("smtp");
    let replies = c
        .send_mail(
            "many@remote.test",
            &three.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
            body.as_bytes(),
        )
        .await
        .expect("send");
    assert!(replies.last().expect("reply").is_ok(), "{replies:?}");
    c.quit().await.expect("quit");
    let (after, _) = counts(&nodes[2]).await;
    let mut new_entries = 0;
    for (id, (m, b)) in &after {
        let (m0, b0) = before[id];
        new_entries += m - m0;
        let grew = b - b0;
        assert!(
            grew == 0 || (grew > 20_000 && grew < 21_000),
            "node {id}: body bytes grew by {grew}, want one body or none"
        );
        assert!(m - m0 <= 3);
    }
    assert_eq!(new_entries, 6, "three recipients × two copies");
}

const PY: &str = r#"
import poplib, smtplib, sys
def addr(a):
    host, port = a.rsplit(":", 1)
    return host, int(port)
(smtp_host, smtp_port), (pop1_host, pop1_port), (pop2_host, pop2_port), (pop3_host, pop3_port) = map(addr, sys.argv[1:5])
password = sys.argv[5]
body = b"Subject: across nodes\r\n\r\nwritten on one node\r\n.read on another\r\n"
with smtplib.SMTP(smtp_host, smtp_port, timeout=30) as s:
    refused = s.sendmail("py@remote.test", ["alice@example.org"], body)
    assert refused == {}, refused
def mailbox(host, port):
    p = poplib.POP3(host, port, timeout=30)
    p.user("alice@example.org"); p.pass_(password)
    return p
p = mailbox(pop2_host, pop2_port)
count, _ = p.stat()
assert count == 1, count
_, lines, _ = p.retr(1)
assert lines[-2:] == [b"written on one node", b".read on another"], lines
uid = p.uidl(1).split()[-1]
p.quit()
p = mailbox(pop3_host, pop3_port)
assert p.uidl(1).split()[-1] == uid, "same message id on every node"
p.dele(1)
p.quit()
p = mailbox(pop1_host, pop1_port)
assert p.stat()[0] == 0, "deleted on the third node, gone on the first"
p.quit()
print("python across nodes ok")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_clients_against_different_nodes() {
    let _slot = common::cluster_slot().await;
    if !testkit::program("python3") {
        return;
    }
    let (_dir, nodes) = cluster("distpy", 3, &["alice@example.org".to_owned()]).await;
    let addrs = [nodes[0].smtp(), nodes[0].pop3(), nodes[1].pop3(), nodes[2].pop3()].map(|a| a.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .args(["-c", PY, &addrs[0], &addrs[1], &addrs[2], &addrs[3], PASSWORD])
            .output()
            .expect("python runs")
    })
    .await
    .expect("join");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("python across nodes ok"),
        "{text}"
    );

    // One POP3 session per mailbox across the cluster (RFC 1939's
    // exclusive maildrop): a second login on another node is refused
    // while the first session lasts, and admitted once it has quit.
    let mut first = Pop3Client::connect(nodes[0].pop3()).await.expect("pop3");
    first.login("alice@example.org", PASSWORD).await.expect("first login");
    let mut second = Pop3Client::connect(nodes[1].pop3()).await.expect("pop3");
    let refused = second.login("alice@example.org", PASSWORD).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.to_string().contains("[IN-USE]")),
        "{refused:?}"
    );
    first.quit().await.expect("quit");
    // The lock is released before `+OK` to QUIT (RFC 1939 §6), so a client
    // that logs in again at once, on any node, is admitted: no retry here.
    for round in 0..30 {
        let node = &nodes[round % 3];
        let mut p = Pop3Client::connect(node.pop3()).await.expect("pop3");
        let login = p.login("alice@example.org", PASSWORD).await;
        assert!(login.is_ok(), "round {round}: {login:?}");
        p.quit().await.expect("quit");
    }
}

/// kill -9 of one node: its messages stay readable from the survivors and
/// count as under-replicated; mail still goes in; deletions made while it
/// is down reach it from the update log when it returns, and nothing
/// deleted comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_misses_nothing_once_it_returns() {
    let _slot = common::cluster_slot().await;
    let users: Vec<String> = (0..10).map(|i| format!("k{i}@example.org")).collect();
    let (_dir, mut nodes) = cluster("distkill", 3, &users).await;
    let smtp: Vec<_> = nodes.iter().map(|n| n.smtp()).collect();
    let send = |node: usize, k: usize| {
        let (addr, user) = (smtp[node], users[k % users.len()].clone());
        async move {
            let mut c = SmtpClient::connect(addr, false).await.expect("smtp");
            let body = format!("Subject: {k}\r\nX-Test-Seq: {k}\r\n\r\nmessage {k}\r\n");
            let r = c
                .send_mail("a@remote.test", &[user.as_str()], body.as_bytes())
                .await
                .expect("send");
            assert!(r.last().expect("reply").is_ok(), "{r:?}");
            c.quit().await.expect("quit");
        }
    };
    for k in 0..100 {
        send(k % 3, k).await;
    }
    let victim = 2;
    let victim_id = status(&nodes[victim]).await["self"].as_u64().expect("id");
    nodes[victim].kill9().await.expect("kill");
    let survivors: Vec<&NodeProcess> = nodes[..victim].iter().collect();
    process::wait_converged(&survivors, 2, Duration::from_secs(30))
        .await
        .expect("the victim is marked down");
    common::wait_for(
        "messages with a copy on the dead node to count as under-replicated",
        Duration::from_secs(30),
        || async { counts_live(&nodes[0]).await.1 > 0 },
    )
    .await;

    // Everything is still readable, and new mail still goes in.
    let mut total = 0;
    for u in &users {
        total += common::read_all(&nodes[0], u).await.len();
    }
    assert_eq!(total, 100, "every message readable with one node down");
    for k in 100..120 {
        send(k % 2, k).await;
    }
    // Delete the whole mailbox of half the users while the node is down.
    let mut deleted = 0;
    for u in &users[..5] {
        let mut p = Pop3Client::connect(nodes[1].pop3()).await.expect("pop3");
        p.login(u, PASSWORD).await.expect("login");
        let (n, _) = p.stat().await.expect("stat");
        for k in 1..=n {
            p.dele(k as u32).await.expect("dele");
        }
        p.quit().await.expect("quit");
        deleted += n;
    }
    assert!(deleted > 0);

    // The victim comes back with the view it died with (itself up); it
    // serves clients only once it has the survivors' view, which has it
    // down, or a newer one.
    let epoch_down = status(&nodes[0]).await["epoch"].as_u64().expect("epoch");
    nodes[victim].restart().await.expect("restart");
    let greeting = Pop3Client::connect(nodes[victim].pop3()).await;
    assert!(greeting.is_ok(), "{:?}", greeting.err());
    let epoch_back = status(&nodes[victim]).await["epoch"].as_u64().expect("epoch");
    assert!(
        epoch_back >= epoch_down,
        "the returned node serves by view {epoch_back}, older than the cluster's {epoch_down}"
    );
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    process::wait_converged(&all, 3, Duration::from_secs(30))
        .await
        .expect("the victim is back up");
    // Every copy the victim holds is live mail, the deletions it missed
    // reached it, and nothing is under-replicated any more.
    let left = 120 - deleted;
    common::wait_for("the victim to catch up", Duration::from_secs(60), || async {
        let s = status(&nodes[0]).await;
        let entries: Option<u64> = s["nodes"]
            .as_array()
            .and_then(|a| a.iter().map(|x| x["messages"].as_u64()).sum());
        entries == Some(2 * left as u64) && s["under_replicated"] == 0
    })
    .await;
    for u in &users[..5] {
        assert!(
            common::read_all(&nodes[victim], u).await.is_empty(),
            "{u}: deleted mail came back on node {victim_id}"
        );
    }
    let mut total = 0;
    for u in &users {
        total += common::read_all(&nodes[victim], u).await.len();
    }
    assert_eq!(total, left, "the returned node serves every mailbox");
}

/// Like [`counts`], tolerating nodes that do not answer.
async fn counts_live(n: &NodeProcess) -> (u64, u64) {
    let s = status(n).await;
    let entries = s["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|x| x["messages"].as_u64())
        .sum();
    (entries, s["under_replicated"].as_u64().expect("under_replicated"))
}
