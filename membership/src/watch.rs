//! The failure detector's ring: which nodes each node pings.
//!
//! Pinging every node from every node costs `N × (N − 1)` pings a round:
//! a million at 1 000 nodes, and each node's share grows with the cluster.
//! Instead the nodes stand on a ring (ordered by a hash of their ids, so
//! that nodes that joined together, often in one rack, are not neighbours)
//! and each pings the next `watchers` nodes that are not down, plus every
//! down node it passes on the way (someone must notice it come back). A
//! node that is not down is then pinged by its `watchers` nearest
//! predecessors that are not down, each down node by at least one node,
//! and no node pings more than `watchers` plus the down nodes between it
//! and its last target: a node's cost no longer depends on the cluster's
//! size. What a node notices it reports to the leader, which checks with a
//! ping of its own and decides through Raft, as before.
//!
//! Pure: the result depends only on the arguments, so every node and the
//! simulation (`quill-harness sim`) compute the same ring.

use std::collections::BTreeSet;

use crate::NodeState;

/// Ring neighbours each node pings when not told otherwise: three, so that
/// a node is still watched when two of its watchers fail with it.
pub const WATCHERS_DEFAULT: usize = 3;

/// Where a node stands on the ring (a 64-bit mix of its id: ids are random
/// already, but tests and simulations number nodes 1, 2, 3...).
pub fn ring_position(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The nodes `me` pings, given every node of the view with its state:
/// walking the ring forward from `me`, each node until `watchers` that are
/// not down have been taken, the down ones on the way included. `me` need
/// not be in `nodes` (a node that is joining pings nothing until it is).
/// With `watchers + 1` nodes or fewer, every other node.
pub fn ring_targets(nodes: impl IntoIterator<Item = (u64, NodeState)>, me: u64, watchers: usize) -> BTreeSet<u64> {
    let mut ring: Vec<(u64, u64, NodeState)> = nodes
        .into_iter()
        .map(|(id, state)| (ring_position(id), id, state))
        .collect();
    ring.sort_unstable();
    let Some(at) = ring.iter().position(|&(_, id, _)| id == me) else {
        return BTreeSet::new();
    };
    let mut out = BTreeSet::new();
    let mut live = 0;
    for &(_, id, state) in ring[at + 1..].iter().chain(&ring[..at]) {
        if live >= watchers {
            break;
        }
        out.insert(id);
        if state != NodeState::Down {
            live += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn states(n: u64, down: &[u64]) -> Vec<(u64, NodeState)> {
        (1..=n)
            .map(|id| {
                (
                    id,
                    if down.contains(&id) {
                        NodeState::Down
                    } else {
                        NodeState::Up
                    },
                )
            })
            .collect()
    }

    /// Who pings each node.
    fn watched_by(nodes: &[(u64, NodeState)], watchers: usize) -> BTreeMap<u64, BTreeSet<u64>> {
        let mut by: BTreeMap<u64, BTreeSet<u64>> = nodes.iter().map(|&(id, _)| (id, BTreeSet::new())).collect();
        for &(me, state) in nodes {
            if state == NodeState::Down {
                continue; // a down node pings nobody
            }
            for t in ring_targets(nodes.iter().copied(), me, watchers) {
                by.get_mut(&t).expect("a view node").insert(me);
            }
        }
        by
    }

    #[test]
    fn small_clusters_ping_everyone() {
        let nodes = states(4, &[]);
        for me in 1..=4 {
            let t = ring_targets(nodes.iter().copied(), me, 3);
            assert_eq!(t, (1..=4).filter(|&i| i != me).collect(), "node {me}");
        }
    }

    #[test]
    fn every_live_node_has_exactly_its_watchers_and_pings_no_more() {
        for n in [5u64, 17, 100, 1000] {
            for watchers in [1, 2, 3] {
                let nodes = states(n, &[]);
                let by = watched_by(&nodes, watchers);
                for (id, w) in &by {
                    assert_eq!(w.len(), watchers, "n={n} node {id}");
                    assert!(!w.contains(id));
                }
                for me in 1..=n {
                    assert_eq!(ring_targets(nodes.iter().copied(), me, watchers).len(), watchers);
                }
            }
        }
    }

    #[test]
    fn down_nodes_stay_watched_and_live_ones_keep_their_count() {
        // Every third node down, and a run of consecutive ring positions.
        let mut down: Vec<u64> = (1..=300).filter(|i| i % 3 == 0).collect();
        let mut by_pos: Vec<u64> = (1..=300).collect();
        by_pos.sort_by_key(|&id| ring_position(id));
        down.extend(&by_pos[10..20]);
        let nodes = states(300, &down);
        let by = watched_by(&nodes, 3);
        for (id, w) in &by {
            if down.contains(id) {
                assert!(!w.is_empty(), "down node {id} is watched by someone");
            } else {
                assert_eq!(w.len(), 3, "live node {id}");
            }
        }
    }

    #[test]
    fn a_node_outside_the_view_pings_nothing_and_the_ring_is_stable() {
        let nodes = states(10, &[]);
        assert!(ring_targets(nodes.iter().copied(), 99, 3).is_empty());
        // The same inputs in another order give the same ring.
        let mut rev = nodes.clone();
        rev.reverse();
        for me in 1..=10 {
            assert_eq!(
                ring_targets(nodes.iter().copied(), me, 3),
                ring_targets(rev.iter().copied(), me, 3)
            );
        }
    }
}
