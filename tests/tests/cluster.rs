//! Membership across real processes: nodes join through a seed over QUIC
//! with mutual TLS, the leader marks dead nodes down and restarted ones up,
//! and directory writes reach every node.

mod common;

use std::time::{Duration, Instant};

use quill_harness::fresh_loopback;
use quill_harness::process::{self, NodeOptions, NodeProcess, TempDir};
use serde_json::Value;

const SECRET: &str = "cluster-test-secret";

async fn status(n: &NodeProcess) -> Option<Value> {
    n.status().await.ok()
}

async fn start_cluster(dir: &TempDir, n: usize) -> Vec<NodeProcess> {
    process::start_cluster(dir.path(), n, SECRET, "info")
        .await
        .expect("cluster starts")
}

async fn wait_converged(live: &[&NodeProcess], up: usize, deadline: Duration) -> (u64, u64) {
    process::wait_converged(live, up, deadline).await.unwrap()
}

fn node_of(nodes: &[NodeProcess], s: &Value) -> usize {
    nodes
        .iter()
        .position(|n| n.admin_addr().to_string() == s["addrs"]["admin"])
        .expect("known node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_nodes_survive_the_loss_of_their_leader() {
    let _slot = common::cluster_slot().await;
    let dir = TempDir::new("cluster5").unwrap();
    let mut nodes = start_cluster(&dir, 5).await;
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    wait_converged(&all, 5, Duration::from_secs(30)).await;
    process::wait_voters(&nodes[0], 5, Duration::from_secs(30))
        .await
        .unwrap();
    let (_, leader) = wait_converged(&all, 5, Duration::from_secs(30)).await;
    let s = status(&nodes[0]).await.unwrap();

    // A directory write on any node is visible on all.
    nodes[3].add_domain("cluster.example").await.unwrap();
    let t0 = Instant::now();
    for n in &nodes {
        common::wait_for("the new domain everywhere", Duration::from_secs(5), || async {
            n.admin(hyper::Method::GET, "/v1/domains", None)
                .await
                .is_ok_and(|d| d.to_string().contains("cluster.example"))
        })
        .await;
    }
    eprintln!("directory write visible on all 5 nodes after {:?}", t0.elapsed());

    // kill -9 the leader: a new leader, the dead node down, one epoch on all survivors.
    let lead = node_of(
        &nodes,
        s["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == leader)
            .unwrap(),
    );
    let killed_at = Instant::now();
    nodes[lead].kill9().await.unwrap();
    let survivors: Vec<&NodeProcess> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != lead)
        .map(|(_, n)| n)
        .collect();
    let (epoch, new_leader) = wait_converged(&survivors, 4, Duration::from_secs(20)).await;
    eprintln!(
        "new view (epoch {epoch}) on all survivors {:?} after kill -9 of the leader",
        killed_at.elapsed()
    );
    assert_ne!(new_leader, leader);
    let s = status(survivors[0]).await.unwrap();
    let dead = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == leader)
        .unwrap();
    assert_eq!(dead["state"], "down", "{s}");
    // No learner can take its place, so it stays a voter (4 of 5 commit).
    assert_eq!(dead["voter"], true, "{s}");

    // Restart: up again, its data intact, and writes made meanwhile reach it.
    nodes[1].add_user("zoe@cluster.example", "pw", None).await.unwrap();
    nodes[lead].restart().await.unwrap();
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    wait_converged(&all, 5, Duration::from_secs(30)).await;
    let users = nodes[lead].admin(hyper::Method::GET, "/v1/users", None).await.unwrap();
    assert!(users.to_string().contains("zoe@cluster.example"), "{users}");

    // Drain one node, then remove it for good.
    // Removing the leader itself is refused with a clear reason.
    let leader_now = status(&nodes[0]).await.unwrap()["leader"].as_u64().unwrap();
    let (code, reply) = nodes[0]
        .admin_raw(hyper::Method::DELETE, &format!("/v1/nodes/{leader_now}"), None)
        .await
        .unwrap();
    assert_eq!(code, 409, "{reply}");
    assert!(reply.to_string().contains("is the Raft leader"), "{reply}");
    // Drain a follower, then remove it for good (asking another follower).
    let mut ids = Vec::new();
    for n in &nodes {
        ids.push(status(n).await.unwrap()["self"].as_u64().unwrap());
    }
    let followers: Vec<usize> = (0..nodes.len()).filter(|&i| ids[i] != leader_now).collect();
    let (v, asker) = (followers[0], followers[1]);
    let victim = ids[v];
    let path = format!("/v1/nodes/{victim}/drain");
    nodes[0].admin(hyper::Method::POST, &path, None).await.unwrap();
    common::wait_for(
        "the node to be draining everywhere",
        Duration::from_secs(10),
        || async {
            let s = status(&nodes[2]).await.unwrap();
            s["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["id"] == victim && n["state"] == "draining")
        },
    )
    .await;
    nodes[asker]
        .admin(hyper::Method::DELETE, &format!("/v1/nodes/{victim}"), None)
        .await
        .unwrap();
    common::wait_for("the node to leave the view", Duration::from_secs(10), || async {
        let s = status(&nodes[asker]).await.unwrap();
        s["nodes"].as_array().unwrap().len() == 4 && !s.to_string().contains(&format!("\"id\":{victim},"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_join_token_is_refused() {
    let _slot = common::cluster_slot().await;
    let dir = TempDir::new("cluster-token").unwrap();
    let nodes = start_cluster(&dir, 1).await;
    let good = nodes[0].join_token().unwrap();
    let (fingerprint, _) = good.strip_prefix("quill1.").unwrap().split_once('.').unwrap();
    let cases = [
        (format!("quill1.{fingerprint}.not-the-secret"), "wrong join token"),
        (
            "quill1.00000000000000000000000000000000.x".to_owned(),
            "not in the cluster named by the join token",
        ),
        ("garbage".to_owned(), "malformed join token"),
    ];
    for (i, (token, why)) in cases.iter().enumerate() {
        let mut o = NodeOptions::new(dir.path().join(format!("bad{i}")), fresh_loopback()).unwrap();
        o.seeds = vec![nodes[0].cluster_addr()];
        o.join_token = Some(token.clone());
        let err = NodeProcess::start(o)
            .await
            .expect_err("a node with a bad token must not start");
        assert!(
            format!("{err:#}").contains(why),
            "token {token}: expected {why:?} in: {err:#}"
        );
    }
    let s = status(&nodes[0]).await.unwrap();
    assert_eq!(s["nodes"].as_array().unwrap().len(), 1, "no stranger got in: {s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_one_voter_one_learner() {
    let _slot = common::cluster_slot().await;
    let dir = TempDir::new("cluster2").unwrap();
    let mut nodes = start_cluster(&dir, 2).await;
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    wait_converged(&all, 2, Duration::from_secs(30)).await;
    // An odd number of voters: the founder votes, the other learns.
    process::wait_voters(&nodes[1], 1, Duration::from_secs(30))
        .await
        .unwrap();
    let s = status(&nodes[1]).await.unwrap();
    let founder = status(&nodes[0]).await.unwrap()["self"].clone();
    let voter = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["voter"] == true)
        .unwrap();
    assert_eq!(voter["id"], founder, "{s}");

    // The learner dies: the leader marks it down; it comes back up.
    nodes[1].kill9().await.unwrap();
    wait_converged(&[&nodes[0]], 1, Duration::from_secs(20)).await;
    nodes[1].restart().await.unwrap();
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    wait_converged(&all, 2, Duration::from_secs(30)).await;
    // Writes through the learner reach the leader.
    nodes[1].add_domain("two.example").await.unwrap();
    let d = nodes[0].admin(hyper::Method::GET, "/v1/domains", None).await.unwrap();
    assert!(d.to_string().contains("two.example"), "{d}");
}

/// `raft_state_bytes` (status JSON) and `quill_raft_state_bytes`
/// (`/metrics`): the Raft state grows with users, not with mail delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_state_size_is_shown_and_grows_with_users_not_mail() {
    let (_d, node) = common::node("raft-bytes", &[]).await;
    let size = || async {
        let s = node.status().await.expect("status");
        s["raft_state_bytes"].as_u64().expect("raft_state_bytes in the status")
    };
    let before = size().await;
    assert!(before > 0);
    let mut c = quill_harness::SmtpClient::connect(node.smtp(), false).await.unwrap();
    for i in 0..200 {
        let body = format!("Subject: m{i}\r\n\r\nhello\r\n");
        let r = c
            .send_mail("x@origin.test", &["alice@example.org"], body.as_bytes())
            .await
            .unwrap();
        assert_eq!(r[0].code, 250);
    }
    let _ = c.quit().await;
    assert_eq!(
        size().await,
        before,
        "200 messages delivered: the Raft state did not grow"
    );
    node.add_user("dave@example.org", common::PASSWORD, None).await.unwrap();
    let after = size().await;
    assert!(after > before, "a user is in the Raft state: {before} -> {after}");
    let metric = node.metric("quill_raft_state_bytes").await.unwrap();
    assert_eq!(metric as u64, after);
}

/// The failure detector's ring (`--watchers 1`: each node pings one ring
/// neighbour and the voters, and reports to the leader): a learner that
/// the leader never pings is still marked down, on its neighbour's
/// report, and up again when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_the_leader_does_not_ping_is_marked_down_and_up_on_reports() {
    use membership::watch::ring_targets;
    use std::collections::BTreeSet;
    let _slot = common::cluster_slot().await;
    let dir = TempDir::new("ring7").unwrap();
    let mut nodes = process::start_cluster_with(dir.path(), 7, SECRET, "info", &["--watchers", "1"])
        .await
        .expect("cluster starts");
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    wait_converged(&all, 7, Duration::from_secs(60)).await;
    process::wait_voters(&nodes[0], 5, Duration::from_secs(30))
        .await
        .unwrap();
    let (_, leader) = wait_converged(&all, 7, Duration::from_secs(30)).await;
    let s = status(&nodes[0]).await.unwrap();
    assert_eq!(s["feature_level"], 3, "the ring runs at feature level 3: {s}");
    let listed = s["nodes"].as_array().unwrap();
    let ids = listed
        .iter()
        .map(|n| (n["id"].as_u64().unwrap(), membership::NodeState::Up));
    let voters: BTreeSet<u64> = listed
        .iter()
        .filter(|n| n["voter"] == true)
        .map(|n| n["id"].as_u64().unwrap())
        .collect();
    let leader_pings = ring_targets(ids, leader, 1);
    // Two learners, and the leader's ring takes one node: one is left.
    let victim = listed
        .iter()
        .find(|n| {
            let id = n["id"].as_u64().unwrap();
            id != leader && !voters.contains(&id) && !leader_pings.contains(&id)
        })
        .unwrap_or_else(|| panic!("a learner outside the leader's ring targets {leader_pings:?}: {s}"));
    let (victim_id, v) = (victim["id"].as_u64().unwrap(), node_of(&nodes, victim));
    nodes[v].kill9().await.unwrap();
    let killed = Instant::now();
    let others: Vec<&NodeProcess> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != v)
        .map(|(_, n)| n)
        .collect();
    let (_, still_leader) = wait_converged(&others, 6, Duration::from_secs(20)).await;
    eprintln!(
        "node {victim_id} marked down everywhere {:?} after kill -9",
        killed.elapsed()
    );
    assert_eq!(still_leader, leader, "the test holds only while the leader stays");
    let s = status(others[0]).await.unwrap();
    let dead = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == victim_id)
        .unwrap();
    assert_eq!(dead["state"], "down", "{s}");

    nodes[v].restart().await.unwrap();
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    wait_converged(&all, 7, Duration::from_secs(30)).await;
}
