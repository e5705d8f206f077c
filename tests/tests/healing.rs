//! Self-healing across real processes: four nodes on their own 127.0.0.x
//! addresses, R=2, `--repair-grace 3s`. A node killed with SIGKILL has its
//! copies made again elsewhere without any command (`under_replicated`
//! back to 0, every message still readable exactly once from any node);
//! when it comes back, the copies it kept are trimmed so that each message
//! is on exactly two nodes; a drained node (the Raft leader, which hands
//! leadership over) empties and is removed with nothing lost.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use quill_harness::SmtpClient;
use quill_harness::fresh_loopback;
use quill_harness::process::{self, NodeOptions, NodeProcess, TempDir};
use serde_json::Value;

const SECRET: &str = "healing-test-secret";
const PASSWORD: &str = "correct horse";
const USERS: usize = 20;
const MESSAGES: usize = 300;
const R: u64 = 2;

async fn status(n: &NodeProcess) -> Value {
    n.status().await.expect("status")
}

/// Per node id: messages held (None: it did not answer); and the cluster's
/// under_replicated.
async fn counts(n: &NodeProcess) -> (BTreeMap<u64, Option<u64>>, u64) {
    let s = status(n).await;
    let per = s["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|x| (x["id"].as_u64().expect("id"), x["messages"].as_u64()))
        .collect();
    (per, s["under_replicated"].as_u64().expect("under_replicated"))
}

/// Each node's stored bytes, from a status (nodes that answer).
fn stored_bytes(s: &Value) -> Vec<u64> {
    s["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["bytes"].as_u64())
        .collect()
}

/// Every figure within 10% of their mean (equal weights).
fn within_10_percent(bytes: &[u64]) -> bool {
    let mean = bytes.iter().sum::<u64>() / bytes.len().max(1) as u64;
    bytes.iter().all(|b| b.abs_diff(mean) <= mean / 10)
}

fn node_id(s: &Value) -> u64 {
    s["self"].as_u64().expect("self")
}

/// Every user's mailbox, read through `node`, is exactly `expected`, each
/// message once and intact.
async fn check_all_readable(node: &NodeProcess, users: &[String], expected: &BTreeMap<String, BTreeSet<String>>) {
    for user in users {
        let got = common::read_all(node, user).await;
        let markers: BTreeSet<String> = got.values().map(|m| common::marker(m)).collect();
        assert_eq!(
            markers.len(),
            got.len(),
            "{user}: a message listed twice via {}",
            node.pop3()
        );
        let want = expected.get(user).cloned().unwrap_or_default();
        assert_eq!(markers, want, "{user} as read through {}", node.pop3());
        for m in got.values() {
            let k = common::marker(m);
            assert!(
                String::from_utf8_lossy(m).contains(&format!("body of message {k} for {user}\r\n")),
                "{user} message {k} is damaged"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_are_restored_trimmed_and_drained_without_an_operator() {
    let _slot = common::cluster_slot().await;
    let dir = TempDir::new("healing").expect("temp dir");
    let mut nodes = process::start_cluster_with(dir.path(), 4, SECRET, "info", &["--repair-grace", "3s"])
        .await
        .expect("cluster starts");
    {
        let all: Vec<&NodeProcess> = nodes.iter().collect();
        process::wait_converged(&all, 4, Duration::from_secs(60))
            .await
            .expect("cluster converges");
    }
    let users: Vec<String> = (0..USERS).map(|i| format!("heal{i:02}@example.org")).collect();
    nodes[0].add_domain("example.org").await.expect("domain");
    for u in &users {
        nodes[0].add_user(u, PASSWORD, None).await.expect("user");
    }
    let last = users.last().expect("users").clone();
    for n in &nodes {
        common::wait_for("the users on every node", Duration::from_secs(30), || async {
            n.admin(hyper::Method::GET, "/v1/users", None)
                .await
                .is_ok_and(|d| d.to_string().contains(&last))
        })
        .await;
    }

    // Mail to every user, through every node in turn.
    let mut expected: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut c = SmtpClient::connect(node.smtp(), false).await.expect("smtp");
        for k in (i..MESSAGES).step_by(nodes.len()) {
            let user = &users[k % USERS];
            let body = format!(
                "Subject: message {k}\r\nX-Test-Seq: {k}\r\n\r\nbody of message {k} for {user}\r\n{}\r\n",
                "y".repeat(k % 900)
            );
            let replies = c
                .send_mail("sender@remote.test", &[user.as_str()], body.as_bytes())
                .await
                .expect("send");
            assert!(replies.last().expect("reply").is_ok(), "message {k}: {replies:?}");
            expected.entry(user.clone()).or_default().insert(k.to_string());
        }
        c.quit().await.expect("quit");
    }
    // R copies of each. (A copy whose store answered after its caller's
    // deadline may make one too many for a moment, under load: trimmed.)
    common::wait_for("R copies of every message", Duration::from_secs(60), || async {
        let (per, under) = counts(&nodes[0]).await;
        let total: Option<u64> = per.values().copied().sum();
        (total, under) == (Some(R * MESSAGES as u64), 0)
    })
    .await;
    let (per, _) = counts(&nodes[0]).await;
    eprintln!("messages per node before the kill: {per:?}");

    // kill -9 a node that is not the leader: past the grace, the others
    // make its copies again, with no command.
    let leader = status(&nodes[0]).await["leader"].as_u64().expect("leader");
    let victim = {
        let mut v = None;
        for (i, n) in nodes.iter().enumerate() {
            if node_id(&status(n).await) != leader {
                v = Some(i);
            }
        }
        v.expect("a follower")
    };
    let victim_id = node_id(&status(&nodes[victim]).await);
    let held = per[&victim_id].expect("the victim's count");
    assert!(held > 0, "placement put copies on every node: {per:?}");
    let killed_at = std::time::Instant::now();
    nodes[victim].kill9().await.expect("kill -9");
    let observer = (victim + 1) % nodes.len();
    common::wait_for(
        "the killed node's copies made again elsewhere",
        Duration::from_secs(90),
        || async {
            let (per, under) = counts(&nodes[observer]).await;
            let live: u64 = per
                .iter()
                .filter(|(id, _)| **id != victim_id)
                .map(|(_, m)| m.unwrap_or(0))
                .sum();
            under == 0 && live == R * MESSAGES as u64
        },
    )
    .await;
    eprintln!(
        "R copies restored {:.1} s after the kill ({held} copies were on the killed node)",
        killed_at.elapsed().as_secs_f64()
    );
    for (i, node) in nodes.iter().enumerate() {
        if i != victim {
            check_all_readable(node, &users, &expected).await;
        }
    }

    // It comes back with its old copies: they are trimmed, R each.
    nodes[victim].restart().await.expect("restart");
    common::wait_for(
        "the returning node's extra copies trimmed",
        Duration::from_secs(90),
        || async {
            let (per, under) = counts(&nodes[observer]).await;
            let all: Option<u64> = per.values().copied().sum();
            under == 0 && all == Some(R * MESSAGES as u64)
        },
    )
    .await;
    check_all_readable(&nodes[victim], &users, &expected).await;

    // Drain the leader: it hands leadership over and its copies off.
    let leader_ix = {
        let mut ix = None;
        for (i, n) in nodes.iter().enumerate() {
            if node_id(&status(n).await) == leader {
                ix = Some(i);
            }
        }
        ix.expect("the leader is one of ours")
    };
    let other = (leader_ix + 1) % nodes.len();
    nodes[other]
        .admin(hyper::Method::POST, &format!("/v1/nodes/{leader}/drain"), None)
        .await
        .expect("drain");
    common::wait_for(
        "the drained leader empty, leadership moved",
        Duration::from_secs(120),
        || async {
            let s = status(&nodes[other]).await;
            let (per, under) = counts(&nodes[other]).await;
            let rest: u64 = per
                .iter()
                .filter(|(id, _)| **id != leader)
                .map(|(_, m)| m.unwrap_or(0))
                .sum();
            s["leader"].as_u64().is_some_and(|l| l != leader)
                && per.get(&leader) == Some(&Some(0))
                && under == 0
                && rest == R * MESSAGES as u64
        },
    )
    .await;
    let new_leader = status(&nodes[other]).await["leader"].as_u64().expect("leader");
    let remove = nodes[other]
        .admin(hyper::Method::DELETE, &format!("/v1/nodes/{leader}"), None)
        .await;
    assert!(remove.is_ok(), "removing the drained node: {remove:?}");
    eprintln!("leader {leader} drained and removed; node {new_leader} leads");
    nodes[leader_ix].stop().await.expect("stop");
    for (i, node) in nodes.iter().enumerate() {
        if i != leader_ix {
            check_all_readable(node, &users, &expected).await;
        }
    }
    let (per, under) = counts(&nodes[other]).await;
    assert!(!per.contains_key(&leader), "{per:?}");
    assert_eq!(under, 0);
    assert_eq!(per.values().map(|m| m.unwrap_or(0)).sum::<u64>(), R * MESSAGES as u64);

    // A new node joins: it takes new mail at once and, moved to it in the
    // background, its share of what is stored.
    let mut o = NodeOptions::new(dir.path().join("n5"), fresh_loopback()).expect("options");
    o.seeds = vec![nodes[other].cluster_addr()];
    o.join_token = Some(nodes[0].join_token().expect("join token"));
    o.extra_args = vec!["--repair-grace".into(), "3s".into()];
    let joined = NodeProcess::start(o).await.expect("the new node starts");
    let joined_id = node_id(&status(&joined).await);
    let joined_at = std::time::Instant::now();
    common::wait_for("the stored bytes even within 10%", Duration::from_secs(120), || async {
        let bytes = stored_bytes(&status(&nodes[other]).await);
        bytes.len() == 4 && within_10_percent(&bytes)
    })
    .await;
    let (per, under) = counts(&nodes[other]).await;
    eprintln!(
        "node {joined_id} joined: within 10% of the mean after {:.1} s: {per:?}",
        joined_at.elapsed().as_secs_f64()
    );
    assert_eq!(under, 0);
    assert_eq!(per.values().map(|m| m.unwrap_or(0)).sum::<u64>(), R * MESSAGES as u64);
    check_all_readable(&joined, &users, &expected).await;
    let before = counts(&joined).await.0[&joined_id].expect("its count");
    let mut c = SmtpClient::connect(joined.smtp(), false).await.expect("smtp");
    for k in MESSAGES..MESSAGES + 40 {
        let user = &users[k % USERS];
        let body = format!("Subject: after the join\r\nX-Test-Seq: {k}\r\n\r\nbody of message {k} for {user}\r\n");
        let replies = c
            .send_mail("sender@remote.test", &[user.as_str()], body.as_bytes())
            .await
            .expect("send");
        assert!(replies.last().expect("reply").is_ok());
        expected.entry(user.clone()).or_default().insert(k.to_string());
    }
    c.quit().await.expect("quit");
    let (per, _) = counts(&joined).await;
    assert!(
        per[&joined_id].expect("its count") > before,
        "the new node takes new mail: {per:?}"
    );
    let total = R * (MESSAGES as u64 + 40);

    // A replaced disk: a node comes back at its address with an empty data
    // directory. It enrolls as a new node; its old identity is removed, the
    // copies it held are made again, and it takes its share.
    let token = nodes[0].join_token().expect("join token");
    let mut nodes: Vec<NodeProcess> = nodes
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != leader_ix)
        .map(|(_, n)| n)
        .collect();
    nodes.push(joined);
    let leader = status(&nodes[0]).await["leader"].as_u64().expect("leader");
    let mut ids = Vec::new();
    for n in &nodes {
        ids.push(node_id(&status(n).await));
    }
    let lost = ids.iter().position(|id| *id != leader).expect("a follower");
    let old_id = ids[lost];
    let watcher = (lost + 1) % nodes.len();
    let seed = nodes[watcher].cluster_addr();
    nodes[lost].kill9().await.expect("kill -9");
    std::fs::remove_dir_all(&nodes[lost].opts.data).expect("the disk is lost");
    nodes[lost].opts.seeds = vec![seed];
    nodes[lost].opts.join_token = Some(token);
    let replaced_at = std::time::Instant::now();
    nodes[lost].restart().await.expect("the node starts on an empty disk");
    let new_id = node_id(&status(&nodes[lost]).await);
    assert_ne!(new_id, old_id, "an empty disk is a new identity");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let bytes = stored_bytes(&status(&nodes[watcher]).await);
        let (per, under) = counts(&nodes[watcher]).await;
        if !per.contains_key(&old_id)
            && per.len() == 4
            && under == 0
            && per.values().map(|m| m.unwrap_or(0)).sum::<u64>() == total
            && within_10_percent(&bytes)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the replaced disk not healed and filled within 120 s: {per:?} under_replicated {under}, bytes {bytes:?}, want {total} copies without {old_id}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "a replaced disk: old identity removed, R copies and its share back after {:.1} s: {:?}",
        replaced_at.elapsed().as_secs_f64(),
        counts(&nodes[watcher]).await.0
    );
    for node in &nodes {
        check_all_readable(node, &users, &expected).await;
    }
}
