//! The membership view placement computes from, and the user-manager lookup.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::hash::{UserKey, node_seed};
use crate::table::{self, BLOCK_BITS, Racer};

/// A cluster node's identity, stable for the node's lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}

/// What a node may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Manages users and receives new fragments and copies.
    Up,
    /// Unreachable: holds nothing placement can count on.
    Down,
    /// Leaving on purpose: still serves what it holds, takes nothing new and
    /// manages no user.
    Draining,
}

/// One node of a view.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's id; unique within a view.
    pub id: NodeId,
    /// Relative capacity: a node of weight 2 manages twice the users of a
    /// node of weight 1 and appears in twice as many spreads. Must be > 0.
    pub weight: u32,
    /// Failure-domain label (rack, room, site); replicas go to distinct zones
    /// while there are enough of them. Compared as exact bytes.
    pub zone: String,
    /// Whether the node is usable.
    pub state: NodeState,
}

/// Why a list of nodes is not a valid view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ViewError {
    /// The same id appears twice.
    DuplicateNode(NodeId),
    /// A node has weight 0 (a node that should get nothing is `Draining`).
    ZeroWeight(NodeId),
    /// More nodes than a slot-table entry can name ([`MAX_NODES`]).
    TooManyNodes(usize),
    /// `slot_bits` outside [`MIN_SLOT_BITS`]`..=`[`MAX_SLOT_BITS`].
    SlotBits(u32),
}

impl fmt::Display for ViewError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ViewError::DuplicateNode(id) => write!(f, "duplicate node id {}", id.0),
            ViewError::ZeroWeight(id) => write!(f, "node {} has weight 0", id.0),
            ViewError::TooManyNodes(n) => write!(f, "{n} nodes in a view; at most {MAX_NODES}"),
            ViewError::SlotBits(b) => {
                write!(f, "slot_bits {b} outside {MIN_SLOT_BITS}..={MAX_SLOT_BITS}")
            }
        }
    }
}

impl std::error::Error for ViewError {}

/// Most nodes in one view: slot-table entries are `u16` indices (one value
/// is reserved), which keeps the default table at 8 MiB.
pub const MAX_NODES: usize = u16::MAX as usize;

/// log2 of the slot count every node of a cluster uses unless configured
/// otherwise: 2^22 = 4 194 304 slots (8 MiB of `u16`).
///
/// Slots set the grain of balance: a node of weight share `p` owns
/// `Binomial(2^22, p)` slots, a relative spread of `sqrt(1 / (p 2^22))`:
/// 0.5 % at 100 equal nodes, 1.5 % at 1 000. With 1 000 000 users over 100
/// nodes, user sampling alone adds 1 %, so the busiest manager sits ~3 %
/// above the mean, inside the 5 % budget with room; 2^20 slots would double
/// the slot term and make a 5 % miss a percent-level event.
///
/// Changing it re-places every user: all nodes of a cluster must agree.
pub const DEFAULT_SLOT_BITS: u32 = 22;
/// Smallest accepted `slot_bits`: one race block.
pub const MIN_SLOT_BITS: u32 = BLOCK_BITS;
/// Largest accepted `slot_bits` (a 512 MiB table).
pub const MAX_SLOT_BITS: u32 = 28;

/// A membership view: an epoch and the nodes, with the precomputed slot
/// table that answers "who manages this user" in one memory access.
///
/// Built only through [`View::new`] / [`View::with_slot_bits`] (or
/// deserialized, which runs the same validation and build), so the table
/// always matches the nodes. Cloning shares the table.
#[derive(Clone, Serialize, Deserialize)]
#[serde(try_from = "ViewSpec", into = "ViewSpec")]
pub struct View {
    epoch: u64,
    /// Sorted by id, ids unique.
    nodes: Vec<NodeInfo>,
    slot_bits: u32,
    /// Per node (same order as `nodes`): seed and `1 / weight`, for
    /// rendezvous scores.
    seeds: Vec<u64>,
    inv_weights: Vec<f64>,
    /// Indices into `nodes` of the `Up` nodes, ascending.
    up: Vec<u16>,
    /// Slot -> index into `nodes`; empty when no node is up.
    table: Arc<[u16]>,
}

/// The serialized form of a [`View`]: what membership stores and ships.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewSpec {
    /// View epoch.
    pub epoch: u64,
    /// Nodes, any order.
    pub nodes: Vec<NodeInfo>,
    /// See [`DEFAULT_SLOT_BITS`].
    #[serde(default = "default_slot_bits")]
    pub slot_bits: u32,
}

fn default_slot_bits() -> u32 {
    DEFAULT_SLOT_BITS
}

impl TryFrom<ViewSpec> for View {
    type Error = ViewError;
    fn try_from(spec: ViewSpec) -> Result<View, ViewError> {
        View::with_slot_bits(spec.epoch, spec.nodes, spec.slot_bits)
    }
}

impl From<View> for ViewSpec {
    fn from(view: View) -> ViewSpec {
        ViewSpec {
            epoch: view.epoch,
            nodes: view.nodes,
            slot_bits: view.slot_bits,
        }
    }
}

impl fmt::Debug for View {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("View")
            .field("epoch", &self.epoch)
            .field("nodes", &self.nodes)
            .field("slot_bits", &self.slot_bits)
            .finish_non_exhaustive()
    }
}

impl PartialEq for View {
    fn eq(&self, other: &View) -> bool {
        // Everything else is derived from these three.
        self.epoch == other.epoch && self.slot_bits == other.slot_bits && self.nodes == other.nodes
    }
}

impl Eq for View {}

impl View {
    /// Validates and builds a view with [`DEFAULT_SLOT_BITS`]. Node order in
    /// `nodes` does not matter.
    pub fn new(epoch: u64, nodes: Vec<NodeInfo>) -> Result<View, ViewError> {
        View::with_slot_bits(epoch, nodes, DEFAULT_SLOT_BITS)
    }

    /// As [`View::new`] with an explicit table size. Every node of a cluster
    /// must use the same `slot_bits`; smaller tables build faster and balance
    /// worse (tests of non-balance properties use them to stay fast).
    pub fn with_slot_bits(epoch: u64, mut nodes: Vec<NodeInfo>, slot_bits: u32) -> Result<View, ViewError> {
        if !(MIN_SLOT_BITS..=MAX_SLOT_BITS).contains(&slot_bits) {
            return Err(ViewError::SlotBits(slot_bits));
        }
        if nodes.len() > MAX_NODES {
            return Err(ViewError::TooManyNodes(nodes.len()));
        }
        nodes.sort_by_key(|n| n.id);
        for pair in nodes.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(ViewError::DuplicateNode(pair[0].id));
            }
        }
        if let Some(n) = nodes.iter().find(|n| n.weight == 0) {
            return Err(ViewError::ZeroWeight(n.id));
        }
        let seeds: Vec<u64> = nodes.iter().map(|n| node_seed(n.id.0)).collect();
        let inv_weights: Vec<f64> = nodes.iter().map(|n| 1.0 / f64::from(n.weight)).collect();
        // Indices fit: nodes.len() <= MAX_NODES = u16::MAX.
        let up: Vec<u16> = (0..nodes.len())
            .filter(|&i| nodes[i].state == NodeState::Up)
            .map(|i| i as u16)
            .collect();
        let racers: Vec<Racer> = up
            .iter()
            .map(|&i| Racer {
                index: i,
                seed: seeds[usize::from(i)],
                weight: nodes[usize::from(i)].weight,
            })
            .collect();
        let table: Arc<[u16]> = if racers.is_empty() {
            Arc::from(Vec::new())
        } else {
            Arc::from(table::build(&racers, slot_bits))
        };
        Ok(View {
            epoch,
            nodes,
            slot_bits,
            seeds,
            inv_weights,
            up,
            table,
        })
    }

    /// The view's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// All nodes, sorted by id.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// The node with this id, if it is in the view.
    pub fn node(&self, id: NodeId) -> Option<&NodeInfo> {
        self.index_of(id).map(|i| &self.nodes[i])
    }

    /// The `Up` nodes, by id.
    pub fn up_nodes(&self) -> impl Iterator<Item = &NodeInfo> + '_ {
        self.up.iter().map(|&i| &self.nodes[usize::from(i)])
    }

    /// log2 of the slot count.
    pub fn slot_bits(&self) -> u32 {
        self.slot_bits
    }

    /// Heap bytes the view holds (node list, zone labels, seeds, the slot
    /// table), for capacity planning. Excludes allocator overhead.
    pub fn heap_bytes(&self) -> usize {
        let nodes =
            self.nodes.capacity() * size_of::<NodeInfo>() + self.nodes.iter().map(|n| n.zone.capacity()).sum::<usize>();
        let per_node = self.seeds.capacity() * size_of::<u64>()
            + self.inv_weights.capacity() * size_of::<f64>()
            + self.up.capacity() * size_of::<u16>();
        nodes + per_node + std::mem::size_of_val(&*self.table)
    }

    /// The manager of `user` (a raw address; normalized and hashed here), or
    /// `None` when no node is up.
    pub fn user_manager(&self, user: &str) -> Option<NodeId> {
        self.manager_of(UserKey::from_address(user))
    }

    /// The manager of a user by key: the owner of the key's slot, i.e. the
    /// weighted rendezvous winner among `Up` nodes. `None` when no node is up.
    #[inline]
    pub fn manager_of(&self, user: UserKey) -> Option<NodeId> {
        self.manager_index(user).map(|i| self.nodes[i].id)
    }

    #[inline]
    pub(crate) fn manager_index(&self, user: UserKey) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let slot = (user.0 >> (64 - self.slot_bits)) as usize;
        Some(usize::from(self.table[slot]))
    }

    pub(crate) fn index_of(&self, id: NodeId) -> Option<usize> {
        self.nodes.binary_search_by_key(&id, |n| n.id).ok()
    }

    pub(crate) fn up_indices(&self) -> &[u16] {
        &self.up
    }

    pub(crate) fn seed(&self, index: usize) -> u64 {
        self.seeds[index]
    }

    pub(crate) fn inv_weight(&self, index: usize) -> f64 {
        self.inv_weights[index]
    }
}
