//! Spread sets, replica sets for new messages, and repair plans.

use serde::{Deserialize, Serialize};

use crate::hash::{MessageKey, UserKey, rendezvous_score};
use crate::view::{NodeId, NodeState, View};

/// The load a node is treated as having when the [`LoadVector`] has no entry
/// for it: the highest, so a node nobody has heard from is used only when
/// nothing better is available.
pub const UNKNOWN_LOAD: u64 = u64::MAX;

/// Per-node load, lower is better (e.g. pending deliveries or disk queue
/// length): whatever measure the caller gossips, as long as all nodes use
/// the same one. Stored sorted by id, so lookups and results never depend
/// on the order the entries arrived in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadVector {
    /// Sorted by id, one entry per id.
    entries: Vec<(NodeId, u64)>,
}

impl LoadVector {
    /// A vector from `(node, load)` pairs in any order. When an id repeats,
    /// the highest load wins (the cautious reading, and order-independent).
    pub fn new(loads: impl IntoIterator<Item = (NodeId, u64)>) -> LoadVector {
        let mut entries: Vec<(NodeId, u64)> = loads.into_iter().collect();
        entries.sort_unstable();
        // Sorted by (id, load): the last of each run of equal ids is the max.
        entries.reverse();
        entries.dedup_by_key(|e| e.0);
        entries.reverse();
        LoadVector { entries }
    }

    /// The load of `id`, [`UNKNOWN_LOAD`] if absent.
    pub fn load(&self, id: NodeId) -> u64 {
        match self.entries.binary_search_by_key(&id, |e| e.0) {
            Ok(i) => self.entries[i].1,
            Err(_) => UNKNOWN_LOAD,
        }
    }

    /// Number of nodes with a known load.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no load is known.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl FromIterator<(NodeId, u64)> for LoadVector {
    fn from_iter<I: IntoIterator<Item = (NodeId, u64)>>(iter: I) -> LoadVector {
        LoadVector::new(iter)
    }
}

/// How much busier than the least loaded candidate the receiving node of a
/// message may be and still be preferred as one of its replicas (in the
/// units of the [`LoadVector`]: copies in flight and queued writes).
pub const NEAR_LOAD_SLACK: u64 = 4;

/// New nodes beyond `n_replicas + current replicas` that repair scores
/// before falling back to the full order: enough that the distinct-zone pass
/// almost always completes from the shortlist.
const REPAIR_SHORTLIST_SLACK: usize = 8;

/// What repair should do for one message (see [`View::repair`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairPlan {
    /// Current replicas that stay part of the target set.
    pub keep: Vec<NodeId>,
    /// Nodes that should receive a new copy, most preferred first.
    pub add: Vec<NodeId>,
    /// Current replicas outside the target set (down, draining, gone from
    /// the view, or beyond `n_replicas`); the caller may drop them once the
    /// added copies are durable.
    pub surplus: Vec<NodeId>,
}

impl View {
    /// Up-node indices ordered by weighted rendezvous score for `key`
    /// (best first, ties by id), skipping `exclude`; only the best `limit`
    /// are sorted and returned.
    fn ranked(&self, key: u64, exclude: Option<usize>, limit: usize) -> Vec<usize> {
        let mut scored: Vec<(f64, usize)> = self
            .up_indices()
            .iter()
            .map(|&i| usize::from(i))
            .filter(|&i| Some(i) != exclude)
            .map(|i| (rendezvous_score(key, self.seed(i), self.inv_weight(i)), i))
            .collect();
        // Scores are finite and non-negative; total_cmp gives a total order,
        // and the index (nodes sorted by id) breaks exact ties by id.
        let cmp = |a: &(f64, usize), b: &(f64, usize)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
        if limit < scored.len() {
            if limit == 0 {
                return Vec::new();
            }
            scored.select_nth_unstable_by(limit - 1, cmp);
            scored.truncate(limit);
        }
        scored.sort_unstable_by(cmp);
        scored.into_iter().map(|(_, i)| i).collect()
    }

    /// A user's preference order over up nodes: the manager, then the other
    /// up nodes by weighted rendezvous score for the user. Only the first
    /// `limit` entries are computed.
    fn user_order(&self, user: UserKey, limit: usize) -> Vec<usize> {
        let Some(manager) = self.manager_index(user) else {
            return Vec::new();
        };
        if limit == 0 {
            return Vec::new();
        }
        let mut order = Vec::with_capacity(limit.min(self.up_indices().len()));
        order.push(manager);
        order.extend(self.ranked(user.0, Some(manager), limit - 1));
        order
    }

    /// The `spread` preferred nodes for a user's mailbox fragments: the
    /// user's manager first, then the other up nodes by weighted rendezvous
    /// score. Fewer when fewer nodes are up; empty when none is.
    ///
    /// The manager leads so that spread 1 is "fragments only on the manager"
    /// (Porcupine's static placement); rendezvous for the rest means a view
    /// change moves a user's spread only where a spread member joined or
    /// left.
    pub fn spread_set(&self, user: UserKey, spread: usize) -> Vec<NodeId> {
        self.user_order(user, spread)
            .into_iter()
            .map(|i| self.nodes()[i].id)
            .collect()
    }

    /// Where to store a new message for `user`: up to `n_replicas` distinct
    /// `Up` nodes (fewer only when fewer are up), most preferred first.
    ///
    /// Candidates are ordered by, in turn:
    /// 1. the user's spread (`spread` nodes, see [`View::spread_set`]), then
    ///    nodes outside it that already hold the user's fragments, then the
    ///    rest;
    /// 2. load, least first ([`LoadVector`]; unknown counts as highest);
    /// 3. holding the user's fragments (`holders`) before not;
    /// 4. the user's preference order (manager, then rendezvous), which is
    ///    total, so the result is deterministic.
    ///
    /// Load comes before holding: ranking holders first would pin a user's
    /// mail to the first node that got any (with one replica, the first
    /// pick would hold it forever), which is static placement again. Holding
    /// still wins every load tie.
    ///
    /// Zones: the set spans `min(n_replicas, zones among up nodes)` distinct
    /// zones. Walking the order, a node joins only if its zone is new; when
    /// zones run out, remaining places are filled in order. Zone diversity
    /// therefore outranks the spread: a second replica leaves the spread
    /// rather than share the first one's zone.
    pub fn replica_set(
        &self,
        user: UserKey,
        n_replicas: usize,
        spread: usize,
        loads: &LoadVector,
        holders: &[NodeId],
    ) -> Vec<NodeId> {
        self.replica_set_near(user, n_replicas, spread, loads, holders, None)
    }

    /// [`View::replica_set`] for a message received by `near`: within its
    /// tier, `near` counts as [`NEAR_LOAD_SLACK`] less loaded than it is, so
    /// the node that holds the message already is one of its replicas
    /// whenever it is in the user's spread (or holds the user's mail) and
    /// not much busier than the others. A copy there is a local write
    /// instead of a body sent to another node. Porcupine's delivery prefers
    /// the receiving node the same way; round-robin DNS spreads the
    /// receivers, so the load stays spread.
    pub fn replica_set_near(
        &self,
        user: UserKey,
        n_replicas: usize,
        spread: usize,
        loads: &LoadVector,
        holders: &[NodeId],
        near: Option<NodeId>,
    ) -> Vec<NodeId> {
        let Some(manager) = self.manager_index(user) else {
            return Vec::new();
        };
        if n_replicas == 0 {
            return Vec::new();
        }
        let mut holders: Vec<NodeId> = holders.to_vec();
        holders.sort_unstable();
        holders.dedup();
        let holds = |i: usize| holders.binary_search(&self.nodes()[i].id).is_ok();
        // The user's preference order as a sort key: manager first, then by
        // rendezvous score, then by id (= index).
        let rank = |i: usize| {
            (
                i != manager,
                rendezvous_score(user.0, self.seed(i), self.inv_weight(i)).to_bits(),
                i,
            )
        };
        let load = |i: usize| {
            let id = self.nodes()[i].id;
            let l = loads.load(id);
            if Some(id) == near {
                l.saturating_sub(NEAR_LOAD_SLACK)
            } else {
                l
            }
        };
        let key = |tier: u8, i: usize| (tier, load(i), Some(self.nodes()[i].id) != near, !holds(i), rank(i));

        // Tiers 0 (spread) and 1 (holders outside it) are small; tier 2 (every
        // other up node) is scored and sorted only when the first two cannot
        // fill the set with distinct zones, which is when its order matters.
        let in_spread = self.user_order(user, spread);
        let mut keyed: Vec<_> = in_spread.iter().map(|&i| (key(0, i), i)).collect();
        for &id in &holders {
            if let Some(i) = self.index_of(id)
                && self.nodes()[i].state == NodeState::Up
                && !in_spread.contains(&i)
            {
                keyed.push((key(1, i), i));
            }
        }
        keyed.sort_unstable();
        let mut ordered: Vec<usize> = keyed.iter().map(|k| k.1).collect();
        let (picked, complete) = self.pick_zone_diverse(&ordered, n_replicas);
        if complete {
            return picked.into_iter().map(|i| self.nodes()[i].id).collect();
        }
        let mut rest: Vec<_> = self
            .up_indices()
            .iter()
            .map(|&i| usize::from(i))
            .filter(|i| !ordered.contains(i))
            .map(|i| (key(2, i), i))
            .collect();
        rest.sort_unstable();
        ordered.extend(rest.iter().map(|k| k.1));
        self.pick_zone_diverse(&ordered, n_replicas)
            .0
            .into_iter()
            .map(|i| self.nodes()[i].id)
            .collect()
    }

    /// The repair plan for one message whose copies are on `current`, under
    /// this view: afterwards `keep ∪ add` holds `min(n_replicas, up nodes)`
    /// copies on `Up` nodes, spanning as many distinct zones as
    /// `min(n_replicas, zones among up nodes)`.
    ///
    /// Good current replicas (`Up` in this view) are kept in preference to
    /// new nodes, except that a good replica sharing a zone with another kept
    /// one gives way to a new node in an unused zone. Among equals, the
    /// order is the message's weighted rendezvous order (ties by id), so
    /// every node computes the same plan and repeated repairs of one message
    /// pick the same targets.
    pub fn repair(&self, message: MessageKey, current: &[NodeId], n_replicas: usize) -> RepairPlan {
        self.repair_near(message, current, n_replicas, &[])
    }

    /// [`View::repair`], with new copies going first to the `Up` nodes of
    /// `near` (the user's spread, [`View::spread_set`]), in the message's
    /// rendezvous order, then to the rest: a user's mail stays on a few
    /// nodes after repairs instead of spreading over a new node per lost
    /// copy. Zones still come first. `near` must be computed the same way
    /// on every node (from the view and the user) for plans to agree.
    pub fn repair_near(
        &self,
        message: MessageKey,
        current: &[NodeId],
        n_replicas: usize,
        near: &[NodeId],
    ) -> RepairPlan {
        let mut current: Vec<NodeId> = current.to_vec();
        current.sort_unstable();
        current.dedup();
        let is_current = |i: usize| current.binary_search(&self.nodes()[i].id).is_ok();
        let score = |i: usize| rendezvous_score(message.0, self.seed(i), self.inv_weight(i));
        let mut good: Vec<usize> = current
            .iter()
            .filter_map(|&id| self.index_of(id))
            .filter(|&i| self.nodes()[i].state == NodeState::Up)
            .collect();
        good.sort_unstable_by(|&a, &b| score(a).total_cmp(&score(b)).then(a.cmp(&b)));
        // Only the best few new nodes can matter unless zones run short:
        // try those first and fall back to the full order when the distinct
        // zone pass does not fill the set from them.
        let shortlist = n_replicas
            .saturating_add(current.len())
            .saturating_add(REPAIR_SHORTLIST_SLACK);
        let mut nearby: Vec<usize> = near
            .iter()
            .filter_map(|&id| self.index_of(id))
            .filter(|&i| self.nodes()[i].state == NodeState::Up && !is_current(i))
            .collect();
        nearby.sort_unstable_by(|&a, &b| score(a).total_cmp(&score(b)).then(a.cmp(&b)));
        nearby.dedup();
        let mut chosen = None;
        for limit in [shortlist, usize::MAX] {
            let fresh = self
                .ranked(message.0, None, limit)
                .into_iter()
                .filter(|&i| !is_current(i) && !nearby.contains(&i));
            let ordered: Vec<usize> = good.iter().chain(&nearby).copied().chain(fresh).collect();
            let (picked, complete) = self.pick_zone_diverse(&ordered, n_replicas);
            if complete || limit == usize::MAX {
                chosen = Some(picked);
                break;
            }
        }
        let mut plan = RepairPlan::default();
        for i in chosen.unwrap_or_default() {
            let id = self.nodes()[i].id;
            if is_current(i) {
                plan.keep.push(id);
            } else {
                plan.add.push(id);
            }
        }
        // Down, draining and departed replicas never reach `keep` (only `Up`
        // nodes are candidates), so they land here too.
        plan.surplus = current.into_iter().filter(|id| !plan.keep.contains(id)).collect();
        plan
    }

    /// Picks up to `n` of `ordered` (node indices, most preferred first):
    /// first one node per zone not yet used, in order, then, if zones ran
    /// out, the rest in order. Returned most preferred first, with whether
    /// the distinct-zone pass alone filled all `n` places (then nothing after
    /// `ordered` could have changed the result).
    fn pick_zone_diverse(&self, ordered: &[usize], n: usize) -> (Vec<usize>, bool) {
        let mut taken = vec![false; ordered.len()];
        let mut zones: Vec<&str> = Vec::new();
        let mut count = 0;
        for (pos, &i) in ordered.iter().enumerate() {
            if count == n {
                break;
            }
            let zone = self.nodes()[i].zone.as_str();
            if !zones.contains(&zone) {
                zones.push(zone);
                taken[pos] = true;
                count += 1;
            }
        }
        let complete = count == n;
        for t in taken.iter_mut() {
            if count == n {
                break;
            }
            if !*t {
                *t = true;
                count += 1;
            }
        }
        let picked = ordered
            .iter()
            .zip(&taken)
            .filter(|(_, t)| **t)
            .map(|(&i, _)| i)
            .collect();
        (picked, complete)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::view::{MIN_SLOT_BITS, NodeInfo};

    /// The obvious full-order versions, kept as oracles for the shortcuts
    /// taken above.
    fn reference_replica_set(
        view: &View,
        user: UserKey,
        n_replicas: usize,
        spread: usize,
        loads: &LoadVector,
        holders: &[NodeId],
    ) -> Vec<NodeId> {
        if n_replicas == 0 {
            return Vec::new();
        }
        let order = view.user_order(user, usize::MAX);
        let mut candidates: Vec<(u8, u64, bool, usize, usize)> = order
            .iter()
            .enumerate()
            .map(|(rank, &i)| {
                let id = view.nodes()[i].id;
                let holds = holders.contains(&id);
                let tier = if rank < spread {
                    0
                } else if holds {
                    1
                } else {
                    2
                };
                (tier, loads.load(id), !holds, rank, i)
            })
            .collect();
        candidates.sort_unstable();
        let ordered: Vec<usize> = candidates.iter().map(|c| c.4).collect();
        view.pick_zone_diverse(&ordered, n_replicas)
            .0
            .into_iter()
            .map(|i| view.nodes()[i].id)
            .collect()
    }

    fn reference_repair(view: &View, message: MessageKey, current: &[NodeId], n_replicas: usize) -> Vec<NodeId> {
        let ranked = view.ranked(message.0, None, usize::MAX);
        let (good, fresh): (Vec<usize>, Vec<usize>) =
            ranked.into_iter().partition(|&i| current.contains(&view.nodes()[i].id));
        let ordered: Vec<usize> = good.iter().chain(&fresh).copied().collect();
        view.pick_zone_diverse(&ordered, n_replicas)
            .0
            .into_iter()
            .map(|i| view.nodes()[i].id)
            .collect()
    }

    fn arb_view() -> impl Strategy<Value = View> {
        let state = prop_oneof![6 => Just(NodeState::Up), 1 => Just(NodeState::Down), 1 => Just(NodeState::Draining)];
        prop::collection::btree_map(0u64..40, (1u32..=3, 0u8..4, state), 0..24).prop_map(|nodes| {
            let nodes = nodes
                .into_iter()
                .map(|(id, (weight, zone, state))| NodeInfo {
                    id: NodeId(id),
                    weight,
                    zone: format!("z{zone}"),
                    state,
                })
                .collect();
            View::with_slot_bits(1, nodes, MIN_SLOT_BITS).expect("valid view")
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn replica_set_shortcut_matches_full_order(
            view in arb_view(),
            user in any::<u64>(),
            n_replicas in 0usize..7,
            spread in 0usize..6,
            loads in prop::collection::vec((0u64..40, 0u64..4), 0..40),
            holders in prop::collection::vec(0u64..40, 0..6),
        ) {
            let loads = LoadVector::new(loads.into_iter().map(|(id, l)| (NodeId(id), l)));
            let mut holders: Vec<NodeId> = holders.into_iter().map(NodeId).collect();
            holders.sort_unstable();
            holders.dedup();
            let fast = view.replica_set(UserKey(user), n_replicas, spread, &loads, &holders);
            let slow = reference_replica_set(&view, UserKey(user), n_replicas, spread, &loads, &holders);
            prop_assert_eq!(fast, slow);
        }

        #[test]
        fn repair_shortcut_matches_full_order(
            view in arb_view(),
            message in any::<u64>(),
            current in prop::collection::vec(0u64..45, 0..6),
            n_replicas in 0usize..7,
        ) {
            let mut current: Vec<NodeId> = current.into_iter().map(NodeId).collect();
            current.sort_unstable();
            current.dedup();
            let plan = view.repair(MessageKey(message), &current, n_replicas);
            let chosen: Vec<NodeId> = {
                // keep and add interleaved back into preference order
                let reference = reference_repair(&view, MessageKey(message), &current, n_replicas);
                let mut mine: Vec<NodeId> = plan.keep.iter().chain(&plan.add).copied().collect();
                mine.sort_unstable_by_key(|id| reference.iter().position(|r| r == id));
                prop_assert_eq!(&mine, &reference);
                reference
            };
            prop_assert!(plan.add.iter().all(|id| !current.contains(id)));
            prop_assert!(plan.keep.iter().all(|id| current.contains(id)));
            prop_assert_eq!(plan.keep.len() + plan.surplus.len(), current.len());
            prop_assert!(chosen.len() <= n_replicas);
        }
    }

    #[test]
    fn load_vector_is_order_independent_and_keeps_the_highest() {
        let a = LoadVector::new([(NodeId(2), 5), (NodeId(1), 3), (NodeId(2), 9)]);
        let b = LoadVector::new([(NodeId(2), 9), (NodeId(2), 5), (NodeId(1), 3)]);
        assert_eq!(a, b);
        assert_eq!(a.load(NodeId(2)), 9);
        assert_eq!(a.load(NodeId(1)), 3);
        assert_eq!(a.load(NodeId(7)), UNKNOWN_LOAD);
        assert_eq!(a.len(), 2);
        assert!(LoadVector::default().is_empty());
    }
}
