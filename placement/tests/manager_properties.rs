//! Property tests of the user-manager mapping at full size: balance over
//! 1 000 000 users, weight proportionality, and minimal movement.
//!
//! These build default-size views (2^22 slots, a few seconds each in a debug
//! build), so each property runs only a few cases.

use std::sync::OnceLock;

use placement::{NodeId, NodeInfo, NodeState, UserKey, View};
use proptest::collection::btree_set;
use proptest::prelude::*;

/// Users in the balance, weight and movement properties.
const N_USERS: usize = 1_000_000;

/// The shared population for the weight and movement properties: keys of
/// `user{i}@example.com`, hashed once per test binary.
fn population() -> &'static [UserKey] {
    static KEYS: OnceLock<Vec<UserKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        (0..N_USERS)
            .map(|i| UserKey::from_address(&format!("user{i}@example.com")))
            .collect()
    })
}

fn node(id: u64, weight: u32) -> NodeInfo {
    NodeInfo {
        id: NodeId(id),
        weight,
        zone: format!("zone-{}", id % 3),
        state: NodeState::Up,
    }
}

/// Users per node, in the view's node order.
fn users_per_node(view: &View, keys: &[UserKey]) -> Vec<u64> {
    let mut counts = vec![0u64; view.nodes().len()];
    for &key in keys {
        let manager = view.manager_of(key).expect("view has up nodes");
        let index = view
            .nodes()
            .binary_search_by_key(&manager, |n| n.id)
            .expect("manager is in the view");
        counts[index] += 1;
    }
    counts
}

fn heavy_config(cases: u32) -> ProptestConfig {
    // Shrinking rebuilds views; a handful of steps is all a failure needs to
    // be readable.
    ProptestConfig {
        cases,
        max_shrink_iters: 4,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(heavy_config(2))]

    /// 1 000 000 users over 100 equal nodes: the busiest manager has at most
    /// 5 % more users than the mean.
    #[test]
    fn balance_max_over_mean_at_most_1_05(
        ids in btree_set(any::<u64>(), 100),
        domain_salt in any::<u32>(),
    ) {
        let view = View::new(1, ids.iter().map(|&id| node(id, 1)).collect()).expect("valid view");
        let keys: Vec<UserKey> = (0..N_USERS)
            .map(|i| UserKey::from_address(&format!("u{i}@d{domain_salt}.example")))
            .collect();
        let counts = users_per_node(&view, &keys);
        let mean = N_USERS as f64 / 100.0;
        let max = *counts.iter().max().expect("100 nodes") as f64;
        prop_assert!(max / mean <= 1.05, "max/mean = {:.4}", max / mean);
    }

    /// A node of weight 2 gets twice the users of a node of weight 1, ±5 %.
    #[test]
    fn weight_two_gets_twice_the_users(
        ids in btree_set(any::<u64>(), 4..=12),
        heavy_mask in any::<u16>(),
    ) {
        let ids: Vec<u64> = ids.into_iter().collect();
        // At least one node of each weight.
        let is_heavy = |i: usize| i == 0 || (i != 1 && heavy_mask & (1 << i) != 0);
        let nodes = ids.iter().enumerate().map(|(i, &id)| node(id, if is_heavy(i) { 2 } else { 1 })).collect();
        let view = View::new(1, nodes).expect("valid view");
        let counts = users_per_node(&view, population());
        let light: Vec<u64> =
            counts.iter().zip(view.nodes()).filter(|(_, n)| n.weight == 1).map(|(&c, _)| c).collect();
        let heavy: Vec<u64> =
            counts.iter().zip(view.nodes()).filter(|(_, n)| n.weight == 2).map(|(&c, _)| c).collect();
        let light_mean = light.iter().sum::<u64>() as f64 / light.len() as f64;
        for count in heavy {
            let ratio = count as f64 / light_mean;
            prop_assert!((1.9..=2.1).contains(&ratio), "weight-2 node / weight-1 mean = {ratio:.4}");
        }
    }

    /// Adding a node to N moves at most 1.1/N of the users, all to the new
    /// node; removing it again (one node among N + 1) moves at most
    /// 1.1/(N + 1), all from it.
    #[test]
    fn one_node_change_moves_at_most_1_1_over_n(
        ids in btree_set(any::<u64>(), 10..=100),
        newcomer_index in any::<prop::sample::Index>(),
    ) {
        let mut ids: Vec<u64> = ids.into_iter().collect();
        let newcomer = ids.remove(newcomer_index.index(ids.len()));
        let n = ids.len();
        let small = View::new(1, ids.iter().map(|&id| node(id, 1)).collect()).expect("valid view");
        let large = View::new(2, ids.iter().chain([&newcomer]).map(|&id| node(id, 1)).collect())
            .expect("valid view");
        let mut moved = 0usize;
        for &key in population() {
            let before = small.manager_of(key).expect("up nodes");
            let after = large.manager_of(key).expect("up nodes");
            if before != after {
                prop_assert_eq!(after, NodeId(newcomer), "a user moved between old nodes");
                moved += 1;
            }
        }
        let fraction = moved as f64 / N_USERS as f64;
        prop_assert!(fraction <= 1.1 / n as f64, "adding to {} moved {:.5}", n, fraction);
        prop_assert!(fraction <= 1.1 / (n + 1) as f64, "removing from {} moved {:.5}", n + 1, fraction);
    }
}
