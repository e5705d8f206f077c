//! Load through real sockets, and `kill -9` in the middle of it.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use quill_harness::bench::{self, DeliverPlan, Fetched};
use quill_harness::fresh_loopback;
use quill_harness::process::{NodeOptions, NodeProcess, TempDir};

const USERS: u32 = 50;

async fn bench_node(label: &str) -> (TempDir, NodeProcess, Vec<(String, String)>) {
    let dir = TempDir::new(label).unwrap();
    let mut opts = NodeOptions::new(dir.path().join("node"), fresh_loopback()).unwrap();
    opts.log = "warn".into();
    let node = NodeProcess::start(opts).await.unwrap();
    node.add_domain("example.com").await.unwrap();
    let accounts: Vec<(String, String)> = (1..=USERS)
        .map(|i| (format!("user{i:04}@example.com"), format!("pass{i:04}")))
        .collect();
    for (u, p) in &accounts {
        node.add_user(u, p, None).await.unwrap();
    }
    (dir, node, accounts)
}

fn plan(node: &NodeProcess, messages: u64, seed: u64) -> DeliverPlan {
    DeliverPlan {
        dkim: None,
        addrs: vec![node.smtp()],
        lmtp: false,
        messages,
        connections: 16,
        users: USERS,
        prefix: "user".into(),
        domain: "example.com".into(),
        seed,
        max_errors: 64,
        max_duration: Duration::from_secs(600),
        starttls: None,
        pipelining: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_messages_come_back_byte_exact_and_go_after_dele() {
    let (_d, node, accounts) = bench_node("10k").await;
    let d = bench::deliver(plan(&node, 10_000, 1)).await;
    assert!(
        d.errors.is_empty(),
        "delivery errors: {:?}",
        &d.errors[..d.errors.len().min(3)]
    );
    assert_eq!(d.acked.len(), 10_000);

    let r = bench::retrieve(vec![node.pop3()], accounts.clone(), 16, true).await;
    assert!(r.errors.is_empty(), "retrieval errors: {:?}", r.errors);
    let sent = bench::by_seq(&d.acked);
    let mut seen = HashMap::new();
    for f in &r.fetched {
        let seq = f.seq.expect("a harness message");
        let s = sent.get(&seq).unwrap_or_else(|| panic!("message {seq} was never sent"));
        assert_eq!(f.user, s.user, "message {seq} in the wrong mailbox");
        assert_eq!(f.hash, Some(s.hash), "message {seq} differs from what was sent");
        assert!(seen.insert(seq, ()).is_none(), "message {seq} twice");
    }
    assert_eq!(seen.len(), 10_000, "every acknowledged message comes back");

    let again = bench::retrieve(vec![node.pop3()], accounts, 16, false).await;
    assert!(again.errors.is_empty());
    assert_eq!(again.fetched.len(), 0, "DELE+QUIT removed everything");
    assert_eq!(node.metric("quill_store_entries").await.unwrap(), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_load_loses_no_acknowledged_message() {
    let (_d, mut node, accounts) = bench_node("kill9").await;
    let load = tokio::spawn(bench::deliver(plan(&node, 20_000, 2)));
    common::wait_for("1500 messages accepted", Duration::from_secs(120), || async {
        node.metric("quill_messages_accepted_total").await.unwrap_or(0.0) >= 1500.0
    })
    .await;
    node.kill9().await.unwrap();
    let d = load.await.unwrap();
    assert!(d.acked.len() >= 1500, "acked {}", d.acked.len());
    assert!(d.acked.len() < 20_000, "the kill came before the end of the load");

    node.restart().await.unwrap();
    let r = bench::retrieve(vec![node.pop3()], accounts, 8, false).await;
    assert!(r.errors.is_empty(), "retrieval errors after restart: {:?}", r.errors);
    let acked = bench::by_seq(&d.acked);
    let unknown = bench::by_seq(&d.unknown);
    let mut present: HashMap<u64, &Fetched> = HashMap::new();
    for f in &r.fetched {
        let seq = f.seq.expect("a harness message");
        assert!(present.insert(seq, f).is_none(), "message {seq} twice after recovery");
        let s = acked
            .get(&seq)
            .or_else(|| unknown.get(&seq))
            .unwrap_or_else(|| panic!("message {seq} is present but was never sent to completion of DATA"));
        assert_eq!(
            f.hash,
            Some(s.hash),
            "message {seq} is present but not intact (half written?)"
        );
        assert_eq!(f.user, s.user);
    }
    for seq in acked.keys() {
        assert!(present.contains_key(seq), "acknowledged message {seq} lost by kill -9");
    }
    eprintln!(
        "kill -9 after {} acknowledged ({} in flight): all {} present after restart, {} in-flight ones too",
        d.acked.len(),
        d.unknown.len(),
        acked.len(),
        present.len() - acked.len()
    );
}
