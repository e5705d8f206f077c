//! Property tests of spreads, replica sets and repair plans over random small
//! views (small slot tables keep them fast; these properties do not depend
//! on the table size).

use std::collections::BTreeSet;

use placement::{LoadVector, MIN_SLOT_BITS, MessageKey, NodeId, NodeInfo, NodeState, UserKey, View};
use proptest::prelude::*;

fn arb_state() -> impl Strategy<Value = NodeState> {
    prop_oneof![6 => Just(NodeState::Up), 1 => Just(NodeState::Down), 1 => Just(NodeState::Draining)]
}

/// Random node lists: ids from a small pool (so holders and replicas often
/// name real nodes), weights 1..=3, up to 5 zones.
fn arb_nodes() -> impl Strategy<Value = Vec<NodeInfo>> {
    prop::collection::btree_map(0u64..48, (1u32..=3, 0u8..5, arb_state()), 0..28).prop_map(|nodes| {
        nodes
            .into_iter()
            .map(|(id, (weight, zone, state))| NodeInfo {
                id: NodeId(id),
                weight,
                zone: format!("zone-{zone}"),
                state,
            })
            .collect()
    })
}

fn build(nodes: Vec<NodeInfo>) -> View {
    View::with_slot_bits(7, nodes, MIN_SLOT_BITS).expect("valid view")
}

fn up(view: &View) -> Vec<&NodeInfo> {
    view.up_nodes().collect()
}

fn zone_of(view: &View, id: NodeId) -> &str {
    &view.node(id).expect("node in view").zone
}

fn distinct_zones(view: &View, ids: &[NodeId]) -> usize {
    ids.iter().map(|&id| zone_of(view, id)).collect::<BTreeSet<_>>().len()
}

fn up_zone_count(view: &View) -> usize {
    view.up_nodes().map(|n| n.zone.as_str()).collect::<BTreeSet<_>>().len()
}

fn to_loads(loads: &[(u64, u64)]) -> LoadVector {
    LoadVector::new(loads.iter().map(|&(id, l)| (NodeId(id), l)))
}

fn to_ids(ids: &[u64]) -> Vec<NodeId> {
    ids.iter().copied().map(NodeId).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Replica sets never hold a down or draining node, never a duplicate,
    /// have min(R, up nodes) members, and span min(R, zones) distinct zones.
    #[test]
    fn replica_sets_are_up_distinct_and_zone_diverse(
        nodes in arb_nodes(),
        user in any::<u64>(),
        n_replicas in 0usize..8,
        spread in 0usize..7,
        loads in prop::collection::vec((0u64..48, 0u64..5), 0..48),
        holders in prop::collection::vec(0u64..48, 0..8),
    ) {
        let view = build(nodes);
        let set = view.replica_set(UserKey(user), n_replicas, spread, &to_loads(&loads), &to_ids(&holders));
        let unique: BTreeSet<NodeId> = set.iter().copied().collect();
        prop_assert_eq!(unique.len(), set.len(), "duplicate in {:?}", set);
        for id in &set {
            prop_assert_eq!(view.node(*id).map(|n| n.state), Some(NodeState::Up));
        }
        prop_assert_eq!(set.len(), n_replicas.min(up(&view).len()));
        prop_assert_eq!(distinct_zones(&view, &set), n_replicas.min(up_zone_count(&view)));
    }

    /// Results depend only on the arguments' contents: not on the order of
    /// the node list, the holder list (or repeats in it), or the load entries.
    #[test]
    fn results_ignore_argument_order(
        nodes in arb_nodes().prop_flat_map(|n| (Just(n.clone()), Just(n).prop_shuffle())),
        user in any::<u64>(),
        n_replicas in 0usize..6,
        spread in 0usize..6,
        loads in prop::collection::vec((0u64..48, 0u64..5), 0..48)
            .prop_flat_map(|l| (Just(l.clone()), Just(l).prop_shuffle())),
        holders in prop::collection::vec(0u64..48, 0..8)
            .prop_flat_map(|h| (Just(h.clone()), Just(h).prop_shuffle())),
        current in prop::collection::vec(0u64..48, 0..6),
    ) {
        let (a, b) = (build(nodes.0), build(nodes.1));
        prop_assert_eq!(&a, &b);
        let key = UserKey(user);
        prop_assert_eq!(a.manager_of(key), b.manager_of(key));
        prop_assert_eq!(a.spread_set(key, spread), b.spread_set(key, spread));
        let mut doubled = holders.1.clone();
        doubled.extend(&holders.1);
        prop_assert_eq!(
            a.replica_set(key, n_replicas, spread, &to_loads(&loads.0), &to_ids(&holders.0)),
            b.replica_set(key, n_replicas, spread, &to_loads(&loads.1), &to_ids(&doubled))
        );
        let mut reversed = to_ids(&current);
        reversed.reverse();
        prop_assert_eq!(
            a.repair(MessageKey(user), &to_ids(&current), n_replicas),
            b.repair(MessageKey(user), &reversed, n_replicas)
        );
    }

    /// The spread starts with the manager, holds only up nodes, no repeats,
    /// min(S, up) of them, and a smaller spread is a prefix of a larger one.
    #[test]
    fn spread_is_a_prefix_ordered_set_led_by_the_manager(
        nodes in arb_nodes(),
        user in any::<u64>(),
        small in 0usize..6,
        extra in 0usize..6,
    ) {
        let view = build(nodes);
        let key = UserKey(user);
        let large = view.spread_set(key, small + extra);
        prop_assert_eq!(large.len(), (small + extra).min(up(&view).len()));
        prop_assert_eq!(large.iter().collect::<BTreeSet<_>>().len(), large.len());
        prop_assert!(large.iter().all(|&id| view.node(id).map(|n| n.state) == Some(NodeState::Up)));
        if let Some(first) = large.first() {
            prop_assert_eq!(Some(*first), view.manager_of(key));
        }
        let short = view.spread_set(key, small);
        prop_assert_eq!(&large[..short.len()], &short[..]);
    }

    /// With every node in its own zone, the replicas are the least loaded
    /// members of the spread; among equal loads, holders come first.
    #[test]
    fn least_loaded_spread_members_then_holders(
        ids in prop::collection::btree_set(0u64..48, 1..20),
        user in any::<u64>(),
        n_replicas in 1usize..5,
        spread in 1usize..7,
        load_seed in prop::collection::vec(0u64..3, 48),
        holders in prop::collection::vec(0u64..48, 0..10),
    ) {
        let nodes = ids.iter().map(|&id| NodeInfo {
            id: NodeId(id), weight: 1, zone: format!("own-{id}"), state: NodeState::Up,
        }).collect();
        let view = build(nodes);
        let key = UserKey(user);
        let loads = LoadVector::new(ids.iter().map(|&id| (NodeId(id), load_seed[id as usize])));
        let holders = to_ids(&holders);
        let in_spread = view.spread_set(key, spread);
        let set = view.replica_set(key, n_replicas, spread, &loads, &holders);
        if n_replicas <= in_spread.len() {
            prop_assert!(set.iter().all(|id| in_spread.contains(id)), "left the spread: {:?}", set);
            let rank = |id: &NodeId| (loads.load(*id), !holders.contains(id));
            let mut ranks: Vec<_> = in_spread.iter().map(rank).collect();
            ranks.sort_unstable();
            let mut chosen: Vec<_> = set.iter().map(rank).collect();
            chosen.sort_unstable();
            prop_assert_eq!(&chosen[..], &ranks[..set.len()]);
        }
    }

    /// Repair ends with min(R, up) copies on up nodes over min(R, zones)
    /// zones, keeps only current replicas, adds only new ones, and is
    /// idempotent: repairing the repaired set adds nothing.
    #[test]
    fn repair_restores_r_up_zone_diverse_copies(
        nodes in arb_nodes(),
        message in any::<u64>(),
        current in prop::collection::vec(0u64..52, 0..7),
        n_replicas in 1usize..6,
        near in prop::collection::vec(0u64..52, 0..5),
    ) {
        // With or without a spread to prefer (`repair_near`): the same
        // guarantees.
        let view = build(nodes);
        let current = to_ids(&current);
        let near = to_ids(&near);
        let plan = view.repair_near(MessageKey(message), &current, n_replicas, &near);
        let after: Vec<NodeId> = plan.keep.iter().chain(&plan.add).copied().collect();
        prop_assert_eq!(after.iter().collect::<BTreeSet<_>>().len(), after.len());
        prop_assert!(after.iter().all(|&id| view.node(id).map(|n| n.state) == Some(NodeState::Up)));
        prop_assert_eq!(after.len(), n_replicas.min(up(&view).len()));
        prop_assert_eq!(distinct_zones(&view, &after), n_replicas.min(up_zone_count(&view)));
        prop_assert!(plan.keep.iter().all(|id| current.contains(id)));
        prop_assert!(plan.add.iter().all(|id| !current.contains(id)));
        prop_assert!(plan.surplus.iter().all(|id| current.contains(id) && !plan.keep.contains(id)));

        // Good replicas are kept, one per zone at least, up to R.
        let good: Vec<NodeId> = current.iter().copied()
            .filter(|&id| view.node(id).map(|n| n.state) == Some(NodeState::Up))
            .collect::<BTreeSet<_>>().into_iter().collect();
        prop_assert!(plan.keep.len() >= distinct_zones(&view, &good).min(n_replicas));

        let again = view.repair_near(MessageKey(message), &after, n_replicas, &near);
        prop_assert!(again.add.is_empty(), "second repair adds {:?}", again.add);
        prop_assert!(again.surplus.is_empty());
    }

    /// A draining or down node is never a user's manager nor in a spread.
    #[test]
    fn only_up_nodes_manage(nodes in arb_nodes(), users in prop::collection::vec(any::<u64>(), 1..50)) {
        let view = build(nodes);
        for user in users {
            match view.manager_of(UserKey(user)) {
                Some(id) => prop_assert_eq!(view.node(id).map(|n| n.state), Some(NodeState::Up)),
                None => prop_assert!(up(&view).is_empty()),
            }
        }
    }

    /// Marking a node down moves exactly the users it managed, and the same
    /// way as removing it from the view.
    #[test]
    fn down_is_the_same_as_absent(
        ids in prop::collection::btree_set(any::<u64>(), 2..12),
        victim in any::<prop::sample::Index>(),
        users in prop::collection::vec(any::<u64>(), 200),
    ) {
        let ids: Vec<u64> = ids.into_iter().collect();
        let victim = ids[victim.index(ids.len())];
        let node = |id: u64, state| NodeInfo { id: NodeId(id), weight: 1, zone: String::new(), state };
        let all = build(ids.iter().map(|&id| node(id, NodeState::Up)).collect());
        let down = build(ids.iter().map(|&id| node(id, if id == victim { NodeState::Down } else { NodeState::Up })).collect());
        let gone = build(ids.iter().filter(|&&id| id != victim).map(|&id| node(id, NodeState::Up)).collect());
        for user in users {
            let key = UserKey(user);
            prop_assert_eq!(down.manager_of(key), gone.manager_of(key));
            if all.manager_of(key) != Some(NodeId(victim)) {
                prop_assert_eq!(all.manager_of(key), down.manager_of(key));
            }
        }
    }
}
