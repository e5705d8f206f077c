//! Upgrades without downtime (UPGRADING.md), as an operator meets them:
//!
//! - what a 3-node cluster of release 0.1.0 left on disk
//!   (`tests/fixtures/v0.1.0`, made by `make-v0.1.0.sh`) starts on this
//!   release through its old harness state file: every folder, UID,
//!   UIDVALIDITY, flag and body as 0.1.0 showed them, the updates owed to
//!   the node that was down delivered, the queued message sent, the
//!   cluster-wide certificate served, the feature level raised once every
//!   node runs this release; then `quill-harness upgrade` restarts it node
//!   by node under a load that loses nothing;
//! - a data directory of a newer release is refused with the reason;
//! - with `QUILL_UPGRADE_TEST=1` (it builds release 0.1.0, commit 1b88f8e,
//!   unless `QUILL_OLD_BIN` names its `quill`): a running 0.1.0 cluster is
//!   upgraded node by node under load, a node of this release joins it
//!   while it is mixed, and a node rolled back to 0.1.0 before the
//!   feature level is raised rejoins (after, it is refused).

mod common;

use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::harness::{Down, harness, ok, run};
use common::sink::Sink;
use quill_harness::process::{TempDir, quill_binary};

/// The fixture's nodes listen on 127.0.26.1..3; its relay is .9.
const FIXTURE_RELAY: &str = "127.0.26.9:2525";
const FIXTURE_TOKEN: &str = "fixture-admin-token";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fixture() -> PathBuf {
    root().join("tests/fixtures/v0.1.0")
}

/// `tests/fixtures/fill.py` (Python's smtplib and imaplib).
fn fill(args: &[&str]) -> String {
    common::run(
        Command::new("python3")
            .arg(root().join("tests/fixtures/fill.py"))
            .args(args),
    )
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

fn status(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&ok(dir, &["status", "--json"])).expect("status JSON")
}

/// Waits (with a deadline) until `cond` holds.
fn wait_for(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < end, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The newest feature level this release supports: what a cluster of it
/// is raised to.
const NEWEST: u32 = membership::FEATURE_LEVEL_MAX;

/// Until every node says it runs this release and the cluster runs at
/// its newest feature level (the leader raises it by itself).
fn wait_for_this_release(dir: &Path) {
    wait_for(
        "every node on this release, at its newest feature level",
        Duration::from_secs(60),
        || {
            let s = status(dir);
            s["feature_level"] == NEWEST
                && s["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|n| n["version"] == env!("CARGO_PKG_VERSION"))
        },
    );
}

/// `quill admin` against a node.
fn admin(quill: &Path, node: &str, token: &str, args: &[&str]) -> String {
    common::run(
        Command::new(quill)
            .args(["admin", "--node", node, "--token", token])
            .args(args),
    )
}

/// The Raft folder's format mark (membership's frame: 16 header bytes,
/// then the varint).
fn raft_format(data: &Path) -> u8 {
    std::fs::read(data.join("cluster/raft/format")).expect("format file")[16]
}

/// The certificate the node at `host:2993` (IMAPS) serves for `sni`
/// equals the PEM file's.
fn serves_cert(host: &str, sni: &str, pem: &Path) -> bool {
    let script = format!(
        "import socket, ssl\n\
         ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)\n\
         ctx.check_hostname = False\n\
         ctx.verify_mode = ssl.CERT_NONE\n\
         s = ctx.wrap_socket(socket.create_connection(('{host}', 2993), timeout=10), server_hostname='{sni}')\n\
         want = ssl.PEM_cert_to_DER_cert(open('{}').read())\n\
         print('same' if s.getpeercert(True) == want else 'other')\n",
        pem.display()
    );
    common::run(Command::new("python3").args(["-c", &script])).trim() == "same"
}

/// An SMTP sink on `addr` (a node's relay), served by `rt`.
fn sink_on(rt: &tokio::runtime::Runtime, addr: &str) -> Sink {
    let _in = rt.enter();
    let l = StdListener::bind(addr).expect("the relay's address");
    l.set_nonblocking(true).unwrap();
    Sink::start_on(tokio::net::TcpListener::from_std(l).unwrap(), 0)
}

/// A `load` of `secs` seconds in the background, once its users exist.
fn start_load(dir: &Path, out: &Path, secs: u32, quill: &Path, token: &str, admin_addr: &str) -> Child {
    let child = Command::new(harness())
        .args([
            "load",
            "--duration",
            &format!("{secs}s"),
            "--users",
            "10",
            "--connections",
            "4",
        ])
        .arg("--out")
        .arg(out)
        .args(["--quiet", "--dir"])
        .arg(dir)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::piped())
        .spawn()
        .expect("load runs");
    wait_for("the load's users", Duration::from_secs(180), || {
        admin(quill, admin_addr, token, &["user", "list"]).contains("load0010@example.org")
    });
    child
}

fn finish_load(child: Child, dir: &Path, out: &Path) {
    let done = child.wait_with_output().expect("load ends");
    eprintln!("{}", String::from_utf8_lossy(&done.stdout));
    assert!(done.status.success(), "the load failed");
    let out_s = out.to_str().expect("utf-8");
    ok(dir, &["verify", "--out", out_s]);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("verify.json")).expect("verify.json")).expect("json");
    assert_eq!(v["lost"].as_array().map(Vec::len), Some(0), "{v}");
    assert_eq!(v["resurrected"].as_array().map(Vec::len), Some(0), "{v}");
    assert!(v["present_ok"].as_u64().expect("present_ok") > 0, "{v}");
}

#[test]
fn a_cluster_release_0_1_0_left_on_disk_runs_here_and_upgrades_in_place() {
    let _slot = common::cluster_slot_blocking();
    let quill = quill_binary().expect("quill binary");
    let quill_s = quill.to_str().expect("utf-8");
    let tmp = TempDir::new("upgrade-fixture").expect("temp dir");
    let dir = tmp.path().join("cluster");
    copy_tree(&fixture(), &dir);
    let manifest = fixture().join("manifest.json");
    let manifest_s = manifest.to_str().expect("utf-8");
    // The relay its queued message waits for, up at last.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = sink_on(&rt, FIXTURE_RELAY);

    // The old harness state file (no version) drives this release's nodes.
    ok(
        &dir,
        &[
            "up",
            "--binary",
            quill_s,
            &format!("--node-arg=--relay-host={FIXTURE_RELAY}"),
            // The fixture ages; its queued message must not expire here.
            "--node-arg=--queue-lifetime=87600h",
            "--detach",
        ],
    );
    let _down = Down(dir.clone());
    for k in 1..=3 {
        fill(&["check", &format!("127.0.26.{k}"), manifest_s]);
    }
    // Every node runs this release: the leader raises the feature level,
    // and each Raft folder is marked with the new format.
    wait_for_this_release(&dir);
    for k in 1..=3 {
        let data = dir.join(format!("n{k}"));
        wait_for("the format mark", Duration::from_secs(30), || {
            u32::from(raft_format(&data)) == NEWEST
        });
    }
    // The updates n1 and n2 owed n3 are delivered.
    wait_for("the update log replayed", Duration::from_secs(60), || {
        (1..=3).all(|k| {
            std::fs::read_dir(dir.join(format!("n{k}/updates")))
                .map(|d| d.count() == 0)
                .unwrap_or(true)
        })
    });
    // The queued message goes out.
    wait_for("the queued message delivered", Duration::from_secs(60), || {
        sink.got()
            .iter()
            .any(|g| g.rcpts.contains(&"friend@remote.test".to_owned()))
    });
    wait_for("the queue empty", Duration::from_secs(30), || {
        admin(&quill, "127.0.26.1:8080", FIXTURE_TOKEN, &["queue", "list"]).contains("0 queued")
    });
    let finished = admin(&quill, "127.0.26.3:8080", FIXTURE_TOKEN, &["cluster", "upgrade-finish"]);
    assert!(
        finished.contains(&format!("feature level {NEWEST}: already the newest")),
        "{finished}"
    );
    // The cluster-wide certificate 0.1.0 stored is served.
    let crt = fixture().join("tls-mail.example.org.crt");
    assert!(serves_cert("127.0.26.2", "mail.example.org", &crt));

    // A rolling restart under load (step-down, stop, start, in sync).
    let out = dir.join("load1");
    let load = start_load(&dir, &out, 25, &quill, FIXTURE_TOKEN, "127.0.26.1:8080");
    let up = ok(&dir, &["upgrade", "--to", quill_s]);
    assert_eq!(up.matches("logins elsewhere").count(), 3, "{up}");
    assert!(up.contains("leadership handed to"), "the leader went last: {up}");
    finish_load(load, &dir, &out);
    for k in 1..=3 {
        fill(&["check", &format!("127.0.26.{k}"), manifest_s]);
    }
    // The harness state file is now of this release's layout.
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("harness.json")).unwrap()).unwrap();
    assert_eq!(state["version"], 2, "{state}");
    assert_eq!(state["binary"].as_str(), Some(quill_s));
}

/// A data directory a newer release wrote: its Raft folder's format, or a
/// store record of a kind this release does not know. The node refuses to
/// start, with the reason, and changes nothing.
#[test]
fn a_data_directory_of_a_newer_release_is_refused_with_the_reason() {
    let _slot = common::cluster_slot_blocking();
    let quill = quill_binary().expect("quill binary");
    let tmp = TempDir::new("upgrade-newer").expect("temp dir");
    let data = tmp.path().join("n1");
    copy_tree(&fixture().join("n1"), &data);
    let start = || {
        Command::new(&quill)
            .args(["node", "--data"])
            .arg(&data)
            .args(["--cluster-addr", "127.0.26.1:7400", "--admin", "127.0.26.1:8080"])
            .args(["--admin-token", FIXTURE_TOKEN, "--log", "warn"])
            .output()
            .expect("quill node runs")
    };
    // The Raft folder marked with format 9 (membership's frame of it).
    let format = data.join("cluster/raft/format");
    let original = std::fs::read(&format).unwrap();
    let payload = [9u8];
    let mut frame = b"QRF1".to_vec();
    frame.extend_from_slice(&1u32.to_le_bytes());
    frame.extend_from_slice(&blake3::hash(&payload).as_bytes()[..8]);
    frame.extend_from_slice(&payload);
    std::fs::write(&format, &frame).unwrap();
    let out = start();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("format 9 by a newer release"), "{err}");
    assert_eq!(std::fs::read(&format).unwrap(), frame, "left as it was");

    // Its own format again, and a store record of kind 99 at the end.
    std::fs::write(&format, original).unwrap();
    let seg = data.join("store/seg-00000001.qseg");
    let rec_payload = [&[99u8][..], b"a later release's record"].concat();
    let mut rec = 0x5155_494cu32.to_le_bytes().to_vec();
    rec.extend_from_slice(&(rec_payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(blake3::hash(&rec_payload).as_bytes());
    rec.extend_from_slice(&rec_payload);
    let mut segment = std::fs::read(&seg).unwrap();
    segment.extend_from_slice(&rec);
    std::fs::write(&seg, &segment).unwrap();
    let out = start();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("kind 99") && err.contains("newer release"), "{err}");
    assert_eq!(std::fs::read(&seg).unwrap(), segment, "not cut off");
}

/// Release 0.1.0's `quill`, or `None` (the test is skipped) unless
/// `QUILL_UPGRADE_TEST=1`: from `QUILL_OLD_BIN`, else built by
/// `tests/fixtures/old-release.sh` (a worktree of 1b88f8e under target/).
fn old_release() -> Option<PathBuf> {
    if std::env::var("QUILL_UPGRADE_TEST").as_deref() != Ok("1") {
        eprintln!("skipped: set QUILL_UPGRADE_TEST=1 to build release 0.1.0 and upgrade a running cluster of it");
        return None;
    }
    if let Ok(p) = std::env::var("QUILL_OLD_BIN") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("bash")
        .arg(root().join("tests/fixtures/old-release.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("old-release.sh runs");
    assert!(out.status.success(), "building release 0.1.0 failed");
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// A running cluster of release 0.1.0 with users, mail, folders, flags,
/// queued outbound mail and a cluster-wide certificate, upgraded node by
/// node under load; a node rolled back before the feature level rises.
#[test]
fn a_running_release_0_1_0_cluster_is_upgraded_node_by_node_under_load() {
    let Some(old) = old_release() else { return };
    let _slot = common::cluster_slot_blocking();
    let new = quill_binary().expect("quill binary");
    let (old_s, new_s) = (old.to_str().unwrap(), new.to_str().unwrap());
    let tmp = TempDir::new("upgrade-live").expect("temp dir");
    let dir = tmp.path().join("cluster");
    let subnet = format!("127.26.{}", 1 + std::process::id() % 250);
    let host = |k: u8| format!("{subnet}.{k}");
    let relay = format!("{subnet}.9:2525");
    ok(
        &dir,
        &[
            "up",
            "--nodes",
            "3",
            "--subnet",
            &subnet,
            "--password",
            "fixture-password",
            "--binary",
            old_s,
            // The relay is down until the upgrade is over: the message
            // for it stays queued across the upgrade, tried every 5-10 s.
            &format!("--node-arg=--relay-host={relay}"),
            "--node-arg=--retry-initial=5s",
            "--node-arg=--retry-max=10s",
            "--detach",
        ],
    );
    let _down = Down(dir.clone());
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("harness.json")).unwrap()).unwrap();
    let token = state["admin_token"].as_str().unwrap().to_owned();
    let admin_addr = format!("{}:8080", host(1));
    let a = |args: &[&str]| admin(&old, &admin_addr, &token, args);
    a(&["user", "add", "carol@example.org", "--password", "fixture-password"]);
    let crt = tmp.path().join("tls.crt");
    let key = tmp.path().join("tls.key");
    common::run(Command::new("openssl").args([
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        "/CN=mail.example.org",
        "-addext",
        "subjectAltName=DNS:mail.example.org",
        "-keyout",
        key.to_str().unwrap(),
        "-out",
        crt.to_str().unwrap(),
    ]));
    a(&[
        "tls",
        "set",
        "--name",
        "mail.example.org",
        "--cert",
        crt.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    wait_for("carol on every node", Duration::from_secs(30), || {
        (1..=3).all(|k| admin(&old, &format!("{}:8080", host(k)), &token, &["user", "list"]).contains("carol@"))
    });
    fill(&["mail", &host(1)]);
    assert!(a(&["queue", "list"]).contains("friend@remote.test"), "queued");
    let manifest = tmp.path().join("manifest.json");
    let manifest_s = manifest.to_str().unwrap();
    fill(&["manifest", &host(1), manifest_s]);

    // n1 to the new release, then back: a rollback before the feature
    // level is raised. It rejoins and serves what it took meanwhile.
    ok(&dir, &["upgrade", "--to", new_s, "--nodes", "n1"]);
    let s = status(&dir);
    assert_eq!(s["feature_level"], 1, "held back by the nodes of 0.1.0: {s}");
    let finish = Command::new(&new)
        .args([
            "admin",
            "--node",
            &admin_addr,
            "--token",
            &token,
            "cluster",
            "upgrade-finish",
        ])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&finish.stderr);
    assert!(!finish.status.success());
    assert!(said.contains("n2 (release 0.1.0, supports level 1)"), "{said}");
    fill(&["check", &host(1), manifest_s]);
    ok(&dir, &["upgrade", "--to", old_s, "--nodes", "n1"]);
    for k in 1..=3 {
        fill(&["check", &host(k), manifest_s]);
    }
    // A node of the new release joins the cluster of 0.1.0 and serves;
    // it tells each node's release (a node of 0.1.0 does not).
    ok(&dir, &["add", "--binary", new_s]);
    fill(&["check", &host(4), manifest_s]);
    let n4_admin = format!("{}:8080", host(4));
    let s: serde_json::Value =
        serde_json::from_str(&admin(&new, &n4_admin, &token, &["cluster", "status", "--json"])).unwrap();
    let versions: Vec<(String, String)> = s["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["version"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    for (name, version) in &versions {
        let want = if name == "n4" {
            env!("CARGO_PKG_VERSION")
        } else {
            "0.1.0"
        };
        assert_eq!(version, want, "{name}: {s}");
    }
    assert_eq!(s["feature_level"], 1, "{s}");

    // The whole cluster, node by node, under load.
    let out = dir.join("load1");
    let load = start_load(&dir, &out, 40, &old, &token, &admin_addr);
    let up = ok(&dir, &["upgrade", "--to", new_s]);
    assert_eq!(up.matches("logins elsewhere").count(), 4, "{up}");
    finish_load(load, &dir, &out);
    for k in 1..=4 {
        fill(&["check", &host(k), manifest_s]);
    }
    wait_for_this_release(&dir);
    // The relay is back: the message queued under 0.1.0 goes out.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = sink_on(&rt, &relay);
    wait_for("the queued message delivered", Duration::from_secs(120), || {
        sink.got()
            .iter()
            .any(|g| g.rcpts.contains(&"friend@remote.test".to_owned()))
    });
    assert!(serves_cert(&host(3), "mail.example.org", &crt));
    // After the raise, release 0.1.0 is refused, with the reason.
    let back = run(&dir, &["upgrade", "--to", old_s, "--nodes", "n2"]);
    assert!(!back.status.success());
    let said = String::from_utf8_lossy(&back.stderr);
    assert!(said.contains("format 2"), "{said}");
    // n2 back on the new release: the cluster is whole again.
    ok(&dir, &["upgrade", "--to", new_s, "--nodes", "n2"]);
    for k in 1..=4 {
        fill(&["check", &host(k), manifest_s]);
    }
}
