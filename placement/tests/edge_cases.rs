//! Plain unit tests: view validation, empty and all-down views, R larger
//! than the cluster, zone fallback, determinism, and pinned outputs.

use placement::{
    DEFAULT_SLOT_BITS, LoadVector, MAX_SLOT_BITS, MIN_SLOT_BITS, MessageKey, NodeId, NodeInfo, NodeState, UserKey,
    View, ViewError, ViewSpec, normalize_user,
};

fn node(id: u64, zone: &str, state: NodeState) -> NodeInfo {
    NodeInfo {
        id: NodeId(id),
        weight: 1,
        zone: zone.to_owned(),
        state,
    }
}

fn small(nodes: Vec<NodeInfo>) -> View {
    View::with_slot_bits(3, nodes, MIN_SLOT_BITS + 2).expect("valid view")
}

fn ids(v: &[u64]) -> Vec<NodeId> {
    v.iter().copied().map(NodeId).collect()
}

#[test]
fn validation_rejects_bad_views() {
    let dup = vec![node(1, "a", NodeState::Up), node(1, "b", NodeState::Down)];
    assert_eq!(View::new(1, dup).unwrap_err(), ViewError::DuplicateNode(NodeId(1)));
    let zero = vec![NodeInfo {
        id: NodeId(4),
        weight: 0,
        zone: String::new(),
        state: NodeState::Up,
    }];
    assert_eq!(View::new(1, zero).unwrap_err(), ViewError::ZeroWeight(NodeId(4)));
    assert_eq!(
        View::with_slot_bits(1, vec![], MIN_SLOT_BITS - 1).unwrap_err(),
        ViewError::SlotBits(MIN_SLOT_BITS - 1)
    );
    assert_eq!(
        View::with_slot_bits(1, vec![], MAX_SLOT_BITS + 1).unwrap_err(),
        ViewError::SlotBits(MAX_SLOT_BITS + 1)
    );
    assert!(ViewError::DuplicateNode(NodeId(1)).to_string().contains("duplicate"));
}

#[test]
fn nodes_are_sorted_by_id() {
    let view = small(vec![
        node(9, "a", NodeState::Up),
        node(2, "b", NodeState::Up),
        node(5, "c", NodeState::Down),
    ]);
    let order: Vec<u64> = view.nodes().iter().map(|n| n.id.0).collect();
    assert_eq!(order, [2, 5, 9]);
    assert_eq!(view.node(NodeId(5)).map(|n| n.state), Some(NodeState::Down));
    assert!(view.node(NodeId(6)).is_none());
    assert_eq!(view.up_nodes().count(), 2);
    assert_eq!(view.epoch(), 3);
}

#[test]
fn empty_view_answers_none_and_empty() {
    let view = View::new(1, vec![]).expect("empty view is valid");
    assert_eq!(view.user_manager("alice@example.com"), None);
    assert_eq!(view.manager_of(UserKey(42)), None);
    assert!(view.spread_set(UserKey(42), 3).is_empty());
    assert!(
        view.replica_set(UserKey(42), 2, 3, &LoadVector::default(), &[])
            .is_empty()
    );
    let plan = view.repair(MessageKey(1), &ids(&[1, 2]), 2);
    assert!(plan.keep.is_empty() && plan.add.is_empty());
    assert_eq!(plan.surplus, ids(&[1, 2]));
}

#[test]
fn all_down_or_draining_is_like_empty() {
    let view = small(vec![node(1, "a", NodeState::Down), node(2, "b", NodeState::Draining)]);
    assert_eq!(view.manager_of(UserKey(7)), None);
    assert!(view.spread_set(UserKey(7), 2).is_empty());
    assert!(
        view.replica_set(UserKey(7), 2, 2, &LoadVector::default(), &ids(&[1, 2]))
            .is_empty()
    );
    let plan = view.repair(MessageKey(9), &ids(&[1, 2]), 2);
    assert!(plan.add.is_empty());
    assert_eq!(plan.surplus, ids(&[1, 2]));
}

#[test]
fn more_replicas_than_nodes_gives_every_up_node() {
    let view = small(vec![
        node(1, "a", NodeState::Up),
        node(2, "a", NodeState::Up),
        node(3, "b", NodeState::Draining),
        node(4, "c", NodeState::Up),
    ]);
    let mut set = view.replica_set(UserKey(5), 10, 2, &LoadVector::default(), &[]);
    set.sort_unstable();
    assert_eq!(set, ids(&[1, 2, 4]));
    assert_eq!(view.spread_set(UserKey(5), 10).len(), 3);
    let plan = view.repair(MessageKey(5), &ids(&[3]), 10);
    let mut after = plan.add.clone();
    after.sort_unstable();
    assert_eq!(after, ids(&[1, 2, 4]));
    assert_eq!(plan.surplus, ids(&[3]));
    assert!(
        view.replica_set(UserKey(5), 0, 2, &LoadVector::default(), &[])
            .is_empty()
    );
}

#[test]
fn zones_are_distinct_while_there_are_enough() {
    // Four nodes in zone a, one in b: R = 2 must use b even when it is the
    // most loaded node and outside the spread.
    let mut nodes: Vec<NodeInfo> = (1..=4).map(|i| node(i, "a", NodeState::Up)).collect();
    nodes.push(node(9, "b", NodeState::Up));
    let view = small(nodes);
    let loads = LoadVector::new([
        (NodeId(1), 0),
        (NodeId(2), 0),
        (NodeId(3), 0),
        (NodeId(4), 0),
        (NodeId(9), 100),
    ]);
    for user in 0..200u64 {
        let set = view.replica_set(UserKey(user.wrapping_mul(0x9E37_79B9_7F4A_7C15)), 2, 2, &loads, &[]);
        assert_eq!(set.len(), 2);
        assert!(set.contains(&NodeId(9)), "user {user}: {set:?}");
        // R = 3 > 2 zones: both zones, then the best remaining zone-a node.
        let set = view.replica_set(UserKey(user.wrapping_mul(0x9E37_79B9_7F4A_7C15)), 3, 2, &loads, &[]);
        assert_eq!(set.len(), 3);
        assert!(set.contains(&NodeId(9)));
    }
}

#[test]
fn least_loaded_first_and_holders_break_ties() {
    let view = small((1..=6).map(|i| node(i, &format!("z{i}"), NodeState::Up)).collect());
    let user = UserKey(0xfeed_beef);
    let spread = view.spread_set(user, 4);
    // Give the last spread member the lowest load: it must come first.
    let loads = LoadVector::new(
        view.nodes()
            .iter()
            .map(|n| (n.id, if n.id == spread[3] { 1 } else { 5 })),
    );
    let set = view.replica_set(user, 1, 4, &loads, &[]);
    assert_eq!(set, vec![spread[3]]);
    // Equal loads: a holder in the spread beats the manager.
    let flat = LoadVector::new(view.nodes().iter().map(|n| (n.id, 2)));
    assert_eq!(view.replica_set(user, 1, 4, &flat, &[spread[2]]), vec![spread[2]]);
    // Equal loads, no holders: the manager (spread order) wins.
    assert_eq!(view.replica_set(user, 1, 4, &flat, &[]), vec![spread[0]]);
    // Unknown loads count as the highest.
    let partial = LoadVector::new([(spread[1], 1_000_000)]);
    assert_eq!(view.replica_set(user, 1, 4, &partial, &[]), vec![spread[1]]);
}

#[test]
fn the_receiving_node_is_preferred_within_its_tier_and_slack() {
    let view = small((1..=6).map(|i| node(i, &format!("z{i}"), NodeState::Up)).collect());
    let user = UserKey(0xfeed_beef);
    let spread = view.spread_set(user, 4);
    let outside = view
        .nodes()
        .iter()
        .map(|n| n.id)
        .find(|id| !spread.contains(id))
        .unwrap();
    let flat = LoadVector::new(view.nodes().iter().map(|n| (n.id, 2)));
    // Equal loads: the receiver in the spread beats the manager and holders.
    let near = Some(spread[2]);
    assert_eq!(
        view.replica_set_near(user, 1, 4, &flat, &[spread[1]], near),
        vec![spread[2]]
    );
    // With R=2 the receiver is one of the two, the other is who it would be
    // without it.
    let two = view.replica_set_near(user, 2, 4, &flat, &[], near);
    assert_eq!(two.len(), 2);
    assert!(two.contains(&spread[2]) && two.contains(&spread[0]), "{two:?}");
    // Busier by up to the slack: still preferred; by more: not.
    let busier = |by: u64| {
        LoadVector::new(
            view.nodes()
                .iter()
                .map(|n| (n.id, if n.id == spread[2] { 2 + by } else { 2 })),
        )
    };
    let slack = placement::NEAR_LOAD_SLACK;
    assert_eq!(
        view.replica_set_near(user, 1, 4, &busier(slack), &[], near),
        vec![spread[2]]
    );
    assert_eq!(
        view.replica_set_near(user, 1, 4, &busier(slack + 1), &[], near),
        vec![spread[0]]
    );
    // A receiver outside the spread that holds nothing of the user's is no
    // candidate before the spread.
    assert_eq!(
        view.replica_set_near(user, 1, 4, &flat, &[], Some(outside)),
        vec![spread[0]]
    );
    // Without a receiver: as before.
    assert_eq!(
        view.replica_set_near(user, 1, 4, &flat, &[], None),
        view.replica_set(user, 1, 4, &flat, &[])
    );
}

#[test]
fn draining_nodes_keep_serving_but_get_nothing_new() {
    let view = small(vec![
        node(1, "a", NodeState::Up),
        node(2, "b", NodeState::Draining),
        node(3, "c", NodeState::Up),
        node(4, "d", NodeState::Up),
    ]);
    for user in 0..500u64 {
        let key = UserKey(user.wrapping_mul(0xD6E8_FEB8_6659_FD93));
        assert_ne!(view.manager_of(key), Some(NodeId(2)));
        let set = view.replica_set(key, 3, 3, &LoadVector::default(), &ids(&[2]));
        assert!(!set.contains(&NodeId(2)));
    }
    // A copy on the draining node is replaced and reported surplus.
    let plan = view.repair(MessageKey(77), &ids(&[1, 2]), 2);
    assert_eq!(plan.keep, ids(&[1]));
    assert_eq!(plan.add.len(), 1);
    assert_ne!(plan.add[0], NodeId(2));
    assert_eq!(plan.surplus, ids(&[2]));
}

#[test]
fn repair_prefers_zone_diversity_over_keeping_a_same_zone_copy() {
    let view = small(vec![
        node(1, "a", NodeState::Up),
        node(2, "a", NodeState::Up),
        node(3, "b", NodeState::Up),
    ]);
    let plan = view.repair(MessageKey(3), &ids(&[1, 2]), 2);
    assert_eq!(plan.add, ids(&[3]));
    assert_eq!(plan.keep.len(), 1);
    assert_eq!(plan.surplus.len(), 1);
    // Already good: nothing to do.
    let plan = view.repair(MessageKey(3), &ids(&[1, 3]), 2);
    assert!(plan.add.is_empty() && plan.surplus.is_empty());
}

#[test]
fn repair_choice_is_deterministic_per_message() {
    let view = small(
        (1..=20)
            .map(|i| node(i, &format!("z{}", i % 5), NodeState::Up))
            .collect(),
    );
    let first = view.repair(MessageKey(123), &ids(&[1]), 3);
    for _ in 0..10 {
        assert_eq!(view.repair(MessageKey(123), &ids(&[1]), 3), first);
    }
    // Different messages spread their new copies over different nodes.
    let targets: std::collections::BTreeSet<NodeId> = (0..100)
        .flat_map(|m| view.repair(MessageKey(m * 7919), &ids(&[1]), 3).add)
        .collect();
    assert!(targets.len() > 10, "{targets:?}");
}

#[test]
fn repair_near_puts_new_copies_in_the_users_spread_zones_first() {
    let view = small(
        (1..=20)
            .map(|i| node(i, &format!("z{}", i % 5), NodeState::Up))
            .collect(),
    );
    // Whatever the message, the new copy goes to the spread's node when
    // its zone is free.
    for m in 0..50 {
        let plan = view.repair_near(MessageKey(m * 7919), &ids(&[1]), 2, &ids(&[1, 7, 12]));
        assert_eq!(plan.keep, ids(&[1]));
        assert!(plan.add == ids(&[7]) || plan.add == ids(&[12]), "{plan:?}");
    }
    // A spread node in the kept copy's zone (6: z1, like 1) gives way to
    // a node of another zone outside the spread.
    let plan = view.repair_near(MessageKey(5), &ids(&[1]), 2, &ids(&[1, 6]));
    assert_eq!(plan.keep, ids(&[1]));
    assert_eq!(plan.add.len(), 1);
    assert_ne!(plan.add[0], NodeId(6));
    // An empty spread is the plain repair.
    assert_eq!(
        view.repair_near(MessageKey(9), &ids(&[1]), 3, &[]),
        view.repair(MessageKey(9), &ids(&[1]), 3)
    );
}

#[test]
fn user_manager_normalizes_the_domain_only() {
    let view = small((1..=8).map(|i| node(i, "z", NodeState::Up)).collect());
    assert_eq!(
        view.user_manager("Carol@Example.ORG"),
        view.user_manager("Carol@example.org")
    );
    assert_eq!(
        view.user_manager("Carol@example.org"),
        view.manager_of(UserKey::from_normalized("Carol@example.org"))
    );
    assert_eq!(normalize_user("Carol@Example.ORG"), "Carol@example.org");
    // The local part is the directory's business: different bytes, different users.
    let differ = (0..50).any(|i| {
        view.user_manager(&format!("Dave{i}@example.org")) != view.user_manager(&format!("dave{i}@example.org"))
    });
    assert!(differ);
}

#[test]
fn spec_round_trip_rebuilds_the_same_view() {
    let view = small(vec![node(3, "a", NodeState::Up), node(1, "b", NodeState::Draining)]);
    let spec = ViewSpec::from(view.clone());
    assert_eq!(spec.slot_bits, MIN_SLOT_BITS + 2);
    let back = View::try_from(spec).expect("valid spec");
    assert_eq!(back, view);
    for k in 0..100u64 {
        assert_eq!(back.manager_of(UserKey(k << 50)), view.manager_of(UserKey(k << 50)));
    }
}

/// Every slot's owner, folded into one number.
fn table_digest(view: &View) -> u64 {
    let bits = view.slot_bits();
    (0..1u64 << bits).fold(0xcbf2_9ce4_8422_2325, |h, slot| {
        let owner = view
            .manager_of(UserKey(slot << (64 - bits)))
            .map_or(u64::MAX, |id| id.0);
        (h ^ owner).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn node_order_does_not_change_the_table() {
    let nodes: Vec<NodeInfo> = (0..9)
        .map(|i| NodeInfo {
            id: NodeId(i * 31 + 5),
            weight: 1 + (i % 3) as u32,
            zone: String::new(),
            state: NodeState::Up,
        })
        .collect();
    let mut reversed = nodes.clone();
    reversed.reverse();
    let a = View::with_slot_bits(1, nodes, 14).expect("valid");
    let b = View::with_slot_bits(1, reversed, 14).expect("valid");
    assert_eq!(table_digest(&a), table_digest(&b));
}

/// Pinned placement: a change here means every node of a mixed-version
/// cluster would disagree about where users live. Change only on purpose.
#[test]
fn placement_is_pinned() {
    let nodes: Vec<NodeInfo> = (1..=5)
        .map(|i| NodeInfo {
            id: NodeId(i),
            weight: if i == 3 { 2 } else { 1 },
            zone: format!("z{i}"),
            state: NodeState::Up,
        })
        .collect();
    let view = View::with_slot_bits(1, nodes, 12).expect("valid");
    assert_eq!(
        table_digest(&view),
        PINNED_DIGEST,
        "table digest {:#x}",
        table_digest(&view)
    );
    let key = UserKey::from_address("alice@example.com");
    assert_eq!(key, UserKey(PINNED_ALICE_KEY), "alice key {:#x}", key.0);
    assert_eq!(view.spread_set(key, 5), ids(&PINNED_ALICE_SPREAD), "alice spread");
    assert_eq!(DEFAULT_SLOT_BITS, 22);
}

const PINNED_DIGEST: u64 = 0xbd0a_18e9_4799_49a5;
const PINNED_ALICE_KEY: u64 = 0x5b6b_5b1d_382e_59b0;
const PINNED_ALICE_SPREAD: [u64; 5] = [2, 3, 1, 4, 5];
