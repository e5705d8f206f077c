//! The `quill-harness` command line as a user drives it: `up` a 3-node
//! cluster, `status`, a `load` with a kill and a restart, `verify` with
//! zero lost messages, `add`, `drain`, `down`.

mod common;

use std::process::Command;

use common::harness::{Down, harness, ok};
use quill_harness::process::TempDir;

#[test]
fn up_load_with_faults_verify_down() {
    let _slot = common::cluster_slot_blocking();
    let tmp = TempDir::new("harness-cli").expect("temp dir");
    let dir = tmp.path().join("cluster");
    // Its own 127.5.x.0/24, apart from the other tests' addresses.
    let subnet = format!("127.5.{}", 1 + std::process::id() % 250);
    let up = ok(
        &dir,
        &[
            "up",
            "--nodes",
            "3",
            "--subnet",
            &subnet,
            "--password",
            "pw",
            "--detach",
        ],
    );
    let _down = Down(dir.clone());
    assert!(up.contains("alice -> bob: 250"), "mail goes in on one node");
    assert!(
        up.contains(&format!("POP3  {subnet}.2:2110: bob has 1 message")),
        "and comes out on another"
    );
    assert!(
        up.contains("swaks --server") && up.contains("poplib.POP3"),
        "instructions printed"
    );

    let status = ok(&dir, &["status"]);
    assert_eq!(status.matches(" up ").count(), 3, "{status}");

    let out = dir.join("run1");
    let out_s = out.to_str().expect("utf-8 path");
    let summary = ok(
        &dir,
        &[
            "load",
            "--duration",
            "14s",
            "--users",
            "20",
            "--connections",
            "4",
            "--kill",
            "n2@3s",
            "--restart",
            "n2@8s",
            "--out",
            out_s,
            "--quiet",
        ],
    );
    assert!(summary.contains("| deliveries acknowledged |"), "{summary}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("load.json")).expect("load.json")).expect("json");
    let events: Vec<&str> = report["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["what"].as_str())
        .collect();
    assert_eq!(events, ["kill n2", "restart n2"], "{report}");
    assert!(report["deliveries"].as_u64().expect("deliveries") > 0);
    let seconds = report["seconds"].as_array().expect("seconds");
    assert!(seconds.len() >= 14, "one entry per second");
    assert!(
        seconds
            .iter()
            .any(|s| s["under_replicated"].as_u64().is_some_and(|u| u > 0)),
        "the kill shows as under-replicated messages"
    );
    let svg = std::fs::read_to_string(out.join("throughput.svg")).expect("svg");
    assert!(svg.starts_with("<svg") && svg.contains("kill n2") && svg.contains("time since start (s)"));
    let png = std::fs::read(out.join("throughput.png")).expect("png");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");

    ok(&dir, &["verify", "--out", out_s]);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("verify.json")).expect("verify.json")).expect("json");
    assert_eq!(v["lost"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["resurrected"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(v["present_ok"].as_u64().expect("present_ok") > 0, "{v}");

    ok(&dir, &["add"]);
    ok(&dir, &["drain", "n4"]);
    let status = ok(&dir, &["status"]);
    assert!(status.contains("n4") && status.contains("draining"), "{status}");

    ok(&dir, &["down"]);
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("harness.json")).expect("state")).expect("json");
    assert!(
        state["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .all(|n| n["pid"].is_null()),
        "{state}"
    );
}

/// A foreground `up` ended by SIGTERM (a service manager, `timeout`, a
/// closed terminal's SIGHUP) stops its nodes instead of leaving them
/// running; the commands it prints run as printed.
#[test]
fn foreground_up_stops_its_nodes_on_sigterm() {
    let _slot = common::cluster_slot_blocking();
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use quill_harness::cluster::{ClusterState, quill_alive};
    use quill_harness::process::{Signal, send_signal};

    let tmp = TempDir::new("harness-sigterm").expect("temp dir");
    let dir = tmp.path().join("cluster");
    let subnet = format!("127.6.{}", 1 + std::process::id() % 250);
    let mut child = Command::new(harness())
        .args(["up", "--nodes", "2", "--subnet", &subnet, "--password", "pw", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()
        .expect("quill-harness up runs");
    let _down = Down(dir.clone());
    // Read what it prints until it says it is running.
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("up| {line}");
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut printed = Vec::new();
    let end = Instant::now() + Duration::from_secs(120);
    while !printed.iter().any(|l: &String| l.contains("Press Ctrl-C")) {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "up did not get running: {printed:?}");
        if let Ok(l) = rx.recv_timeout(left) {
            printed.push(l);
        }
    }
    // The printed commands name a harness binary that exists.
    let status_line = printed
        .iter()
        .find(|l| l.contains(" status --dir "))
        .expect("a status command is printed");
    let program = status_line.split_whitespace().next().expect("a program");
    assert!(std::path::Path::new(program).is_file(), "{program} is not a file");
    let out = Command::new(program)
        .args(["status", "--dir"])
        .arg(&dir)
        .output()
        .expect("the printed command runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let pids: Vec<u32> = ClusterState::load(&dir)
        .expect("state")
        .nodes
        .iter()
        .filter_map(|n| n.pid)
        .collect();
    assert_eq!(pids.len(), 2);
    send_signal(child.id(), Signal::TERM).expect("SIGTERM");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(status.success(), "up exited with {status}");
            break;
        }
        assert!(Instant::now() < end, "up did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in pids {
        assert!(!quill_alive(pid), "node {pid} still runs after its harness got SIGTERM");
    }
}

/// A paused node (SIGSTOP) must not stall the whole load: every client
/// operation has a deadline (`--op-timeout`) and counts as a `timeout`
/// error past it. Before, every connection that reached the paused node
/// hung for a minute and deliveries fell to 0 a second for the pause.
#[test]
fn a_paused_node_does_not_stall_the_load() {
    let _slot = common::cluster_slot_blocking();
    let tmp = TempDir::new("harness-pause").expect("temp dir");
    let dir = tmp.path().join("cluster");
    let subnet = format!("127.6.{}", 1 + std::process::id() % 250);
    ok(
        &dir,
        &[
            "up",
            "--nodes",
            "3",
            "--subnet",
            &subnet,
            "--password",
            "pw",
            "--detach",
        ],
    );
    let _down = Down(dir.clone());
    let out = dir.join("run-pause");
    let out_s = out.to_str().expect("utf-8 path");
    ok(
        &dir,
        &[
            "load",
            "--duration",
            "16s",
            "--users",
            "20",
            "--connections",
            "4",
            "--op-timeout",
            "2s",
            "--pause",
            "n2@3s:9s",
            "--out",
            out_s,
            "--quiet",
        ],
    );
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("load.json")).expect("load.json")).expect("json");
    let events: Vec<&str> = report["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["what"].as_str())
        .collect();
    assert_eq!(events, ["pause n2 for 9s", "resume n2"], "{report}");
    let seconds = report["seconds"].as_array().expect("seconds");
    // Seconds 6..12: the node is paused, past the failure timeout and the
    // operation deadline. Deliveries go on through the other two nodes.
    let during: u64 = seconds
        .iter()
        .filter(|s| (6..12).contains(&s["t"].as_u64().unwrap_or(0)))
        .map(|s| s["deliveries"].as_u64().unwrap_or(0))
        .sum();
    assert!(during > 0, "no delivery while n2 was paused: {seconds:?}");
    let timeouts: u64 = seconds
        .iter()
        .map(|s| s["errors"]["timeout"].as_u64().unwrap_or(0))
        .sum();
    eprintln!("{during} deliveries during the pause, {timeouts} operations timed out");
    ok(&dir, &["verify", "--out", out_s]);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("verify.json")).expect("verify.json")).expect("json");
    assert_eq!(v["lost"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["resurrected"].as_array().map(Vec::len), Some(0), "{v}");
    ok(&dir, &["down"]);
}

/// `chaos` with kills, a drain (and the removal of the drained node) and a
/// node added, under load: nothing acknowledged lost, nothing deleted
/// back, and once healed exactly R copies of every message present (a
/// short run; longer ones by hand, see README).
#[test]
fn chaos_with_a_drain_and_an_add_heals_to_r_copies() {
    let _slot = common::cluster_slot_blocking();
    let tmp = TempDir::new("harness-chaos").expect("temp dir");
    let dir = tmp.path().join("cluster");
    let subnet = format!("127.6.{}", 1 + std::process::id() % 250);
    ok(
        &dir,
        &[
            "up",
            "--nodes",
            "4",
            "--subnet",
            &subnet,
            "--password",
            "pw",
            "--repair-grace",
            "3s",
            "--detach",
        ],
    );
    let _down = Down(dir.clone());
    let out_dir = tmp.path().join("chaos");
    let out = ok(
        &dir,
        &[
            "chaos",
            "--duration",
            "40s",
            "--faults",
            "3",
            "--kinds",
            "kill,drain,add",
            // quill_harness::commands::chaos::CI_SEED: an add, a drain of
            // n1 (the founder, likely the leader), a kill.
            "--seed",
            "10",
            "--users",
            "30",
            "--quiet",
            "--out",
            out_dir.to_str().expect("utf-8 path"),
        ],
    );
    assert_eq!(quill_harness::commands::chaos::CI_SEED, 10);
    assert!(out.contains("seed 10: 3 faults drawn"), "the seed is printed");
    assert!(
        out.contains("remove n1 (drained)"),
        "the drained node is removed: {out}"
    );
    assert!(
        out.contains("lost 0, duplicated 0, corrupt 0, deleted but present 0"),
        "{out}"
    );
    assert!(out.contains("copies on the nodes:"), "R copies checked: {out}");
}
