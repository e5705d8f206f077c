//! The cluster simulation at a small size (`quill-harness sim` runs it at
//! 1 000 nodes): its invariants hold through joins, kills of a node and of
//! a rack, a drain, a split and a rolling restart, and a seed gives the
//! same run.

use quill_harness::sim::{EventRow, SimConfig, run};

/// 50 nodes, 100 000 users, 100 000 sampled messages; every user's manager
/// checked in every view.
#[test]
fn fifty_nodes_keep_one_manager_per_user_and_r_copies() {
    let mut cfg = SimConfig::new(50, 100_000, 7);
    cfg.sample_users = 2_000;
    cfg.messages_per_user = 50;
    cfg.check_every_view = true;
    let r = run(cfg.clone(), |_| {}).expect("the invariants hold");
    // Every view checked every user: the start, then each view change.
    let views: u64 = r.rows.iter().map(|e| e.views).sum();
    assert!(views > 100, "{views} views");
    assert_eq!(r.manager_checks, cfg.users * (views + 1));
    assert_eq!(r.messages_checked, cfg.sample_users * cfg.messages_per_user);
    // Memory within its bounds: no node manages far more than its share
    // (the slot table balances to a few percent), and the failure
    // detector's targets are the ring and the voters, not the cluster.
    let m = &r.memory;
    assert!(m.managed_max as f64 <= m.managed_mean * 1.25, "{m:?}");
    assert!(m.pinged_max <= (cfg.watchers + 5) as u64, "{m:?}");
    assert!(r.at_rest.pings_ring * 4 < r.at_rest.pings_all, "{:?}", r.at_rest);
    for e in &r.rows {
        // Placement moves no more managers than the counts require, and
        // repair and rebalance copy within 5% of the least that would do.
        assert_eq!(e.managers_moved, e.managers_min, "{e:?}");
        assert!(e.bytes_moved as f64 <= e.bytes_min as f64 * 1.05 + 1.0, "{e:?}");
    }
    let copied = |name: &str| {
        r.rows
            .iter()
            .find(|e| e.event.starts_with(name))
            .expect(name)
            .bytes_moved
    };
    assert!(copied("kill 1 node") > 0 && copied("join") > 0 && copied("drain") > 0);
    // The rebalancer moves copies into their users' spreads: a join
    // leaves each user's mail on about as many nodes as before (it once
    // scattered it over a node per move).
    let start = r.rows[0].holders_mean;
    let joined = r
        .rows
        .iter()
        .find(|e| e.event.starts_with("join"))
        .unwrap()
        .holders_mean;
    assert!(joined <= start + 1.0, "{start} -> {joined} nodes per user");
    // Repairs put new copies in the user's spread too: after a kill, a
    // rack, a drain and the rest, still about as many nodes per user.
    let end = r.rows.last().unwrap().holders_mean;
    assert!(end <= start + 1.0, "{start} -> {end} nodes per user");
    // A split that heals within the grace period and a rolling restart
    // copy nothing.
    assert_eq!(copied("split"), 0);
    assert_eq!(copied("rolling restart"), 0);
}

/// The same seed gives the same run (all but the measured build times and
/// the convergence times that include them); another seed another run.
#[test]
fn a_seed_replays_the_same_run() {
    let counts = |seed: u64| -> Vec<EventRow> {
        let mut cfg = SimConfig::new(12, 5_000, seed);
        cfg.sample_users = 500;
        cfg.messages_per_user = 20;
        cfg.slot_bits = 16;
        run(cfg, |_| {})
            .expect("the invariants hold")
            .rows
            .into_iter()
            .map(|e| EventRow {
                build_ms: 0.0,
                converge_ms: 0,
                ..e
            })
            .collect()
    };
    let a = counts(3);
    assert_eq!(a, counts(3));
    assert_ne!(a, counts(4));
}
