//! Hardening under faults: a paused leader, a partitioned node, stale
//! verdicts, locks across a heal (issue "Hardening under faults and abuse").
//! Real `quill` processes on 127.x addresses; a pause is SIGSTOP/SIGCONT.

mod common;

use std::time::{Duration, Instant};

use quill_harness::process::{self, NodeProcess, Signal, TempDir, send_signal};
use serde_json::Value;

const SECRET: &str = "faults-test-secret";

fn node_with_id(nodes: &[NodeProcess], status: &Value, id: u64) -> usize {
    let admin = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == id)
        .unwrap()["addrs"]["admin"]
        .clone();
    nodes
        .iter()
        .position(|n| n.admin_addr().to_string() == admin)
        .expect("known node")
}

/// The leader is paused long enough to be replaced and marked down; when it
/// resumes, its failure detector has not heard from anyone for that long.
/// Its verdicts from before (decided under the old term) must not be
/// committed by the new leader, and every node must be up again in every
/// view within seconds. Before the fence, the new leader stayed marked
/// down for minutes (a leader never pings itself).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_leader_does_not_mark_the_others_down_when_it_resumes() {
    let _slot = common::cluster_slot().await;
    let dir = TempDir::new("pause").unwrap();
    let nodes = process::start_cluster(dir.path(), 3, SECRET, "info").await.unwrap();
    let all: Vec<&NodeProcess> = nodes.iter().collect();
    process::wait_voters(&nodes[0], 3, Duration::from_secs(30))
        .await
        .unwrap();
    let (epoch, leader) = process::wait_converged(&all, 3, Duration::from_secs(30)).await.unwrap();
    let lead = node_with_id(&nodes, &nodes[0].status().await.unwrap(), leader);
    let pid = nodes[lead].pid().unwrap();

    send_signal(pid, Signal::STOP).unwrap();
    let others: Vec<&NodeProcess> = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != lead)
        .map(|(_, n)| n)
        .collect();
    // The survivors elect a new leader and mark the paused one down.
    let down = process::wait_converged(&others, 2, Duration::from_secs(20)).await;
    // Stay paused past QUIC's idle timeout, as the outside tester did (15 s
    // in all): the resumed node's connections are dead, so its first pings
    // fail while its timers say it has heard nothing for that long.
    tokio::time::sleep(Duration::from_secs(12)).await;
    send_signal(pid, Signal::CONT).unwrap();
    let (_, new_leader) = down.expect("the survivors agree that the paused leader is down");
    assert_ne!(new_leader, leader);

    let resumed = Instant::now();
    let (epoch_after, _) = process::wait_converged(&all, 3, Duration::from_secs(15))
        .await
        .expect("every node up in every view after the pause");
    eprintln!("views agree, all up, {:?} after SIGCONT", resumed.elapsed());
    assert!(epoch_after > epoch);
    // And it stays that way: no late stale verdict arrives.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        process::converged(&all, 3).await.is_some(),
        "a node was marked down after the views agreed: {:?}",
        nodes[0].status().await.map(|s| s["nodes"].clone())
    );
    let log = std::fs::read_to_string(nodes[lead].log_path()).unwrap_or_default();
    assert!(
        log.contains("restarting the failure timers"),
        "the resumed leader noticed its own stall"
    );
}
