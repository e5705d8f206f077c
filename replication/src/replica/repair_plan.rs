//! What self-healing decides, pure: which member of a replica set
//! coordinates its repair ([`coordinator`]), the repair of one message
//! ([`plan_repair`]), and the moves that even out stored bytes when a node
//! joins ([`Balance`], [`plan_move`]). The rounds that carry these out are
//! in `repair`.

use std::collections::BTreeMap;

use placement::{MessageKey, NodeState, View};

use super::protocol::NodeId;
use crate::{EntryMeta, MessageId, PRIOR_MAX};

/// One message's repair, as its coordinator plans it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairStep {
    pub id: MessageId,
    /// The new replica set, sorted.
    pub replicas: Vec<NodeId>,
    /// Nodes that get a new copy (not in the old set).
    pub add: Vec<NodeId>,
    /// Old members the new set leaves out.
    pub surplus: Vec<NodeId>,
    /// The new set's earlier members: the old set and its earlier members
    /// that the new set leaves out, most recent first, at most
    /// [`PRIOR_MAX`].
    pub prior: Vec<NodeId>,
}

/// The member of `replicas` that repairs the message: the lowest one the
/// view has up; when none is, the lowest draining one.
pub fn coordinator(view: &View, replicas: &[NodeId]) -> Option<NodeId> {
    let state = |n: NodeId| view.node(placement::NodeId(n)).map(|i| i.state);
    let lowest = |want: NodeState| replicas.iter().copied().filter(|n| state(*n) == Some(want)).min();
    lowest(NodeState::Up).or_else(|| lowest(NodeState::Draining))
}

/// What `me` does with `meta`, a message it holds: `None` unless `me` is
/// its coordinator and its replica set needs a change: a member is `gone`
/// (removed, draining, or down past the grace period), or the set has
/// fewer than `n_replicas` members that are not gone while more nodes are
/// up. A member down for less than the grace period counts as present, so
/// a quick restart costs nothing.
///
/// `near` (the user's spread, or empty) is where new copies go first
/// ([`View::repair_near`]).
pub fn plan_repair(
    me: NodeId,
    view: &View,
    n_replicas: usize,
    gone: &dyn Fn(NodeId) -> bool,
    meta: &EntryMeta,
    near: &[NodeId],
) -> Option<RepairStep> {
    let current = &meta.replicas;
    if !current.contains(&me) || coordinator(view, current) != Some(me) {
        return None;
    }
    let present = current.iter().filter(|n| !gone(**n)).count();
    let up = view.up_nodes().count();
    if !current.iter().any(|n| gone(*n)) && (present >= n_replicas || present >= up) {
        return None;
    }
    let ids: Vec<placement::NodeId> = current.iter().map(|n| placement::NodeId(*n)).collect();
    let near: Vec<placement::NodeId> = near.iter().map(|n| placement::NodeId(*n)).collect();
    let plan = view.repair_near(MessageKey::from_id(&meta.id.0), &ids, n_replicas, &near);
    let mut replicas: Vec<NodeId> = plan.keep.iter().chain(&plan.add).map(|n| n.0).collect();
    replicas.sort_unstable();
    let mut old = current.clone();
    old.sort_unstable();
    // Nothing up to copy to, or nothing would change: leave it as it is.
    // Never trade a copy for nothing: the new set is at least as large as
    // the copies there are now on reachable members (a draining node's
    // included), up to R.
    let reachable = current.iter().filter(|n| super::is_live(view, **n)).count();
    if replicas.is_empty() || replicas == old || replicas.len() < present.max(reachable).min(n_replicas) {
        return None;
    }
    let mut prior: Vec<NodeId> = Vec::new();
    for n in old.iter().chain(&meta.prior) {
        if !replicas.contains(n) && !prior.contains(n) {
            prior.push(*n);
        }
    }
    prior.truncate(PRIOR_MAX);
    Some(RepairStep {
        id: meta.id,
        replicas,
        add: plan.add.iter().map(|n| n.0).collect(),
        surplus: plan.surplus.iter().map(|n| n.0).collect(),
        prior,
    })
}

/// How far from its weighted share a node's stored bytes may be before the
/// rebalancer moves copies to or from it (each side of the target: the
/// spread it leaves is within twice this).
pub const REBALANCE_TOLERANCE: f64 = 0.05;

/// The rebalancer's figures, once some up node is further than the
/// tolerance from its share of the stored bytes (its weight's part of the
/// total): how far each is above or below its share, and this
/// coordinator's budget of that distance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Balance {
    /// Bytes above the share (nodes past the tolerance), and below it.
    pub excess: BTreeMap<NodeId, u64>,
    pub deficit: BTreeMap<NodeId, u64>,
    /// What this coordinator may still move from (to) each node: its part
    /// of the excess (deficit), since every coordinator moves at once on
    /// the same figures.
    pub give: BTreeMap<NodeId, u64>,
    pub take: BTreeMap<NodeId, u64>,
}

impl Balance {
    /// From the bytes each up node stores (`bytes`) and the view's
    /// weights; `share` is this coordinator's part of each excess and
    /// deficit (1 / the number of coordinators).
    pub fn new(view: &View, bytes: &BTreeMap<NodeId, u64>, share: f64) -> Balance {
        let weights: BTreeMap<NodeId, f64> = view
            .up_nodes()
            .filter(|n| bytes.contains_key(&n.id.0))
            .map(|n| (n.id.0, f64::from(n.weight.max(1))))
            .collect();
        let total: f64 = weights.keys().map(|id| bytes[id] as f64).sum();
        let weight: f64 = weights.values().sum();
        let mut out = Balance::default();
        if weights.len() < 2 {
            return out;
        }
        let mut outside = false;
        for (id, w) in &weights {
            let target = total * w / weight;
            let b = bytes[id] as f64;
            outside |= (b - target).abs() > target * REBALANCE_TOLERANCE;
            if b > target {
                out.excess.insert(*id, (b - target) as u64);
                out.give.insert(*id, ((b - target) * share).ceil() as u64);
            } else if b < target {
                out.deficit.insert(*id, (target - b) as u64);
                out.take.insert(*id, ((target - b) * share).ceil() as u64);
            }
        }
        // Every node within the tolerance: nothing to move.
        if !outside {
            return Balance::default();
        }
        out
    }

    /// Whether any move is left in this coordinator's budget.
    pub fn open(&self) -> bool {
        self.give.values().any(|g| *g > 0) && self.take.values().any(|t| *t > 0)
    }
}

/// A move that brings stored bytes closer to every node's share: for a
/// message `me` coordinates whose set is healthy, one member above its
/// share gives its copy to the node furthest below its share that is not
/// in the set (in a zone the rest of the set does not use, or the giver's
/// own), if the move helps both (each is at least half the message away
/// from its share) and both budgets have room; the figures are updated.
/// `None` when no move is due.
///
/// `near`, when not empty, is the user's spread ([`View::spread_set`]):
/// the receiving node must be in it. A join then takes the copies of the
/// users whose spread it entered, and a user's mail stays on a few nodes
/// (moving to whichever node is furthest below its share scattered each
/// user's mail over a node per move: after 5% more nodes joined a
/// 1 000-node cluster, ten times as many nodes held each user's mail, and
/// every listing and report grew with them; `quill-harness sim`).
pub fn plan_move(
    me: NodeId,
    view: &View,
    balance: &mut Balance,
    meta: &EntryMeta,
    near: &[NodeId],
) -> Option<RepairStep> {
    let current = &meta.replicas;
    if !current.contains(&me) || coordinator(view, current) != Some(me) || !balance.open() {
        return None;
    }
    let size = meta.size_bytes.max(1);
    let helps = |m: &BTreeMap<NodeId, u64>, n: &NodeId| m.get(n).is_some_and(|d| *d >= size / 2);
    let zone = |n: NodeId| view.node(placement::NodeId(n)).map(|i| i.zone.as_str());
    let from = current
        .iter()
        .copied()
        .filter(|m| helps(&balance.excess, m) && balance.give.get(m).is_some_and(|g| *g > 0))
        .max_by_key(|m| balance.excess[m])?;
    let rest_zones: Vec<Option<&str>> = current.iter().filter(|n| **n != from).map(|n| zone(*n)).collect();
    let to = balance
        .deficit
        .iter()
        .filter(|(n, _)| !current.contains(n) && helps(&balance.deficit, n))
        .filter(|(n, _)| near.is_empty() || near.contains(n))
        .filter(|(n, _)| balance.take.get(n).is_some_and(|t| *t > 0))
        .filter(|(n, _)| zone(**n) == zone(from) || !rest_zones.contains(&zone(**n)))
        .max_by_key(|(n, d)| (**d, std::cmp::Reverse(**n)))
        .map(|(n, _)| *n)?;
    for (map, n) in [
        (&mut balance.excess, from),
        (&mut balance.give, from),
        (&mut balance.deficit, to),
        (&mut balance.take, to),
    ] {
        if let Some(v) = map.get_mut(&n) {
            *v = v.saturating_sub(size);
        }
    }
    let mut replicas: Vec<NodeId> = current.iter().copied().filter(|n| *n != from).chain([to]).collect();
    replicas.sort_unstable();
    let mut prior = vec![from];
    prior.extend(meta.prior.iter().copied().filter(|n| *n != from && *n != to));
    prior.truncate(PRIOR_MAX);
    Some(RepairStep {
        id: meta.id,
        replicas,
        add: vec![to],
        surplus: vec![from],
        prior,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BodyHash;
    use placement::NodeInfo;

    fn view(states: &[(u64, NodeState)]) -> View {
        let nodes = states
            .iter()
            .map(|(id, state)| NodeInfo {
                id: placement::NodeId(*id),
                weight: 1,
                zone: String::new(),
                state: *state,
            })
            .collect();
        View::with_slot_bits(1, nodes, placement::MIN_SLOT_BITS).expect("view")
    }

    fn meta(n: u8, replicas: &[NodeId]) -> EntryMeta {
        EntryMeta::delivered(
            MessageId([n; 16]),
            BodyHash::of(&[n]),
            1,
            1,
            "INBOX".into(),
            replicas.to_vec(),
        )
    }

    const UP: NodeState = NodeState::Up;
    const DOWN: NodeState = NodeState::Down;
    const DRAINING: NodeState = NodeState::Draining;

    #[test]
    fn only_the_lowest_up_member_repairs_a_gone_member() {
        let v = view(&[(1, UP), (2, UP), (3, DOWN), (4, UP)]);
        let gone = |n: NodeId| n == 3;
        let m = meta(1, &[2, 3]);
        let step = plan_repair(2, &v, 2, &gone, &m, &[]).expect("2 repairs");
        assert_eq!(step.surplus, vec![3]);
        assert_eq!(step.add.len(), 1);
        assert!(step.replicas.contains(&2) && !step.replicas.contains(&3));
        assert_eq!(step.replicas.len(), 2);
        assert_eq!(plan_repair(1, &v, 2, &gone, &m, &[]), None, "1 holds no copy");
        let m = meta(1, &[1, 2, 3]);
        assert_eq!(plan_repair(2, &v, 3, &gone, &m, &[]), None, "1 is the coordinator");
        assert!(plan_repair(1, &v, 3, &gone, &m, &[]).is_some());
    }

    #[test]
    fn a_member_down_within_the_grace_period_is_waited_for() {
        let v = view(&[(1, UP), (2, DOWN), (3, UP)]);
        let m = meta(1, &[1, 2]);
        assert_eq!(plan_repair(1, &v, 2, &|_| false, &m, &[]), None);
        assert!(plan_repair(1, &v, 2, &|n| n == 2, &m, &[]).is_some());
    }

    #[test]
    fn a_draining_node_hands_off_what_only_it_holds() {
        let v = view(&[(1, DRAINING), (2, UP), (3, UP)]);
        let gone = |n: NodeId| n == 1;
        let step = plan_repair(1, &v, 1, &gone, &meta(7, &[1]), &[]).expect("1 coordinates");
        assert_eq!(step.surplus, vec![1]);
        assert_eq!(step.replicas.len(), 1);
        // With an up member, that member coordinates.
        assert_eq!(plan_repair(1, &v, 2, &gone, &meta(7, &[1, 3]), &[]), None);
        let step = plan_repair(3, &v, 2, &gone, &meta(7, &[1, 3]), &[]).expect("3 coordinates");
        assert_eq!(step.replicas, vec![2, 3]);
        assert_eq!(step.add, vec![2]);
    }

    #[test]
    fn a_set_short_of_r_grows_once_nodes_join_and_never_shrinks_for_nothing() {
        let v = view(&[(1, UP)]);
        assert_eq!(
            plan_repair(1, &v, 2, &|_| false, &meta(1, &[1]), &[]),
            None,
            "no one to copy to"
        );
        let v = view(&[(1, UP), (2, UP)]);
        let step = plan_repair(1, &v, 2, &|_| false, &meta(1, &[1]), &[]).expect("grows");
        assert_eq!((step.replicas, step.add), (vec![1, 2], vec![2]));
        // The only other node draining: nowhere to go, the copy stays.
        let v = view(&[(1, UP), (2, DRAINING)]);
        assert_eq!(plan_repair(1, &v, 2, &|n| n == 2, &meta(1, &[1, 2]), &[]), None);
        // A removed member (not in the view) with enough others: just dropped.
        let v = view(&[(1, UP), (2, UP)]);
        let step = plan_repair(1, &v, 2, &|n| n == 9, &meta(1, &[1, 2, 9]), &[]).expect("trim");
        assert_eq!((step.replicas, step.add, step.surplus), (vec![1, 2], vec![], vec![9]));
    }

    #[test]
    fn a_move_goes_into_the_users_spread_when_one_is_given() {
        let v = view(&[(1, UP), (2, UP), (3, UP), (4, UP)]);
        // 1 and 2 hold everything; 3 and 4 nothing.
        let bytes = BTreeMap::from([(1, 1000), (2, 1000), (3, 0), (4, 0)]);
        let m = EntryMeta {
            size_bytes: 100,
            ..meta(1, &[1, 2])
        };
        // Anywhere: the node furthest below its share (ties: the lowest).
        let mut b = Balance::new(&v, &bytes, 1.0);
        assert_eq!(plan_move(1, &v, &mut b, &m, &[]).expect("a move").add, vec![3]);
        // Into the spread: the spread's node below its share.
        let mut b = Balance::new(&v, &bytes, 1.0);
        assert_eq!(plan_move(1, &v, &mut b, &m, &[1, 2, 4]).expect("a move").add, vec![4]);
        // A spread with no node below its share: no move.
        let mut b = Balance::new(&v, &bytes, 1.0);
        assert_eq!(plan_move(1, &v, &mut b, &m, &[1, 2]), None);
    }

    proptest::proptest! {
        /// Whatever the view, a step keeps at least as many copies as the
        /// message had on members that are not gone (up to R), only on up
        /// nodes, and is planned by one member at most.
        #[test]
        fn a_step_never_loses_a_copy_and_has_one_coordinator(
            states in proptest::collection::vec(0u8..3, 1..8),
            set in proptest::sample::subsequence((1u64..=8).collect::<Vec<_>>(), 1..4),
            grace_over in proptest::collection::vec(proptest::bool::ANY, 8),
            r in 1usize..4,
        ) {
            let states: Vec<(u64, NodeState)> = states.iter().enumerate()
                .map(|(i, s)| (i as u64 + 1, [UP, DOWN, DRAINING][*s as usize])).collect();
            let v = view(&states);
            let state = |n: u64| states.iter().find(|s| s.0 == n).map(|s| s.1);
            let gone = |n: u64| match state(n) {
                None | Some(NodeState::Draining) => true,
                Some(NodeState::Down) => grace_over[n as usize - 1],
                Some(NodeState::Up) => false,
            };
            let m = meta(3, &set);
            let planners: Vec<RepairStep> = set.iter().filter_map(|me| plan_repair(*me, &v, r, &gone, &m, &[])).collect();
            proptest::prop_assert!(planners.len() <= 1);
            if let Some(step) = planners.first() {
                let present = set.iter().filter(|n| !gone(**n)).count();
                let reachable = set.iter().filter(|n| matches!(state(**n), Some(UP | DRAINING))).count();
                proptest::prop_assert!(step.replicas.len() >= present.max(reachable).min(r));
                proptest::prop_assert!(step.add.iter().all(|n| state(*n) == Some(UP) && !set.contains(n)));
                proptest::prop_assert!(step.replicas.iter().all(|n| state(*n) == Some(UP)));
            }
        }
    }
}
