//! The cluster view as the Raft state machine keeps it: an epoch and the
//! nodes with their names, addresses, weights, zones, states and voter
//! flags.
//!
//! This is the full record (what `cluster status` shows and what the wire
//! needs: addresses). Placement needs less; [`ClusterView::placement_view`]
//! builds its [`placement::View`] from this one.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub use placement::NodeState;

/// Longest node name, zone label or address accepted (bytes). A DNS name is
/// at most 253 octets; a `host:port` fits with room.
pub const LABEL_BYTES_MAX: usize = 255;

/// Most nodes in one view. Every node is a Raft learner at least, so the
/// leader replicates to each: a few thousand is already far past what one
/// leader should feed, and it keeps a view (and every snapshot) small.
pub const NODES_MAX: usize = 4096;

/// Where a node listens. `cluster` is required (Raft and replication
/// traffic); the service addresses are what clients and the admin CLI use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddrs {
    pub cluster: String,
    pub smtp: Option<String>,
    pub submission: Option<String>,
    pub lmtp: Option<String>,
    pub pop3: Option<String>,
    pub imap: Option<String>,
    pub admin: Option<String>,
    /// Implicit-TLS SMTP, POP3 and IMAP (`--smtps`, `--pop3s`, `--imaps`).
    pub smtps: Option<String>,
    pub pop3s: Option<String>,
    pub imaps: Option<String>,
    /// `--role in`: the node takes mail in but owns no outbound queue
    /// shards.
    pub inbound_only: bool,
}

impl NodeAddrs {
    fn all(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.cluster.as_str()).chain(
            [
                &self.smtp,
                &self.submission,
                &self.lmtp,
                &self.pop3,
                &self.imap,
                &self.admin,
                &self.smtps,
                &self.pop3s,
                &self.imaps,
            ]
            .into_iter()
            .filter_map(|a| a.as_deref()),
        )
    }
}

/// One node of the view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Stable for the node's lifetime; also its Raft node id.
    pub id: u64,
    /// Operator-facing name (defaults to the cluster address).
    pub name: String,
    pub addrs: NodeAddrs,
    /// Relative capacity for placement; > 0.
    pub weight: u32,
    /// Failure-domain label for placement ("" when there is one zone).
    pub zone: String,
    pub state: NodeState,
    /// Whether the node votes in Raft. Kept by the state machine from the
    /// committed Raft membership, never set by a command.
    pub voter: bool,
}

impl NodeInfo {
    /// A node that is up, of weight 1, in zone "", named after its cluster
    /// address.
    pub fn new(id: u64, cluster_addr: impl Into<String>) -> NodeInfo {
        let cluster = cluster_addr.into();
        NodeInfo {
            id,
            name: cluster.clone(),
            addrs: NodeAddrs {
                cluster,
                ..NodeAddrs::default()
            },
            weight: 1,
            zone: String::new(),
            state: NodeState::Up,
            voter: false,
        }
    }

    /// Checks the bounds a view enforces on every node.
    pub fn validate(&self) -> Result<(), NodeError> {
        if self.weight == 0 {
            return Err(NodeError::ZeroWeight(self.id));
        }
        if self.addrs.cluster.is_empty() {
            return Err(NodeError::NoClusterAddr(self.id));
        }
        let too_long = std::iter::once(self.name.as_str())
            .chain(std::iter::once(self.zone.as_str()))
            .chain(self.addrs.all())
            .any(|s| s.len() > LABEL_BYTES_MAX);
        if too_long {
            return Err(NodeError::LabelTooLong(self.id));
        }
        Ok(())
    }
}

/// Why a node cannot be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum NodeError {
    #[error("node {0} has weight 0")]
    ZeroWeight(u64),
    #[error("node {0} has no cluster address")]
    NoClusterAddr(u64),
    #[error("node {0}: a name, zone or address is longer than {LABEL_BYTES_MAX} bytes")]
    LabelTooLong(u64),
}

/// The membership view: what every node agrees on after applying the same
/// log. `epoch` grows by one on every change of a node or its state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    pub epoch: u64,
    /// By id.
    pub nodes: BTreeMap<u64, NodeInfo>,
}

impl ClusterView {
    pub fn node(&self, id: u64) -> Option<&NodeInfo> {
        self.nodes.get(&id)
    }

    /// Ids of the nodes flagged as Raft voters.
    pub fn voters(&self) -> BTreeSet<u64> {
        self.nodes.values().filter(|n| n.voter).map(|n| n.id).collect()
    }

    /// The nodes as placement sees them (id, weight, zone, state).
    pub fn placement_nodes(&self) -> Vec<placement::NodeInfo> {
        self.nodes
            .values()
            .map(|n| placement::NodeInfo {
                id: placement::NodeId(n.id),
                weight: n.weight,
                zone: n.zone.clone(),
                state: n.state,
            })
            .collect()
    }

    /// Builds placement's view (with its slot table) at this epoch. Building
    /// the table costs milliseconds and megabytes at the default
    /// `slot_bits`: build it once per epoch, not per lookup.
    pub fn placement_view(&self, slot_bits: u32) -> Result<placement::View, placement::ViewError> {
        placement::View::with_slot_bits(self.epoch, self.placement_nodes(), slot_bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_view_matches() {
        let mut v = ClusterView::default();
        for id in 1..=3 {
            v.nodes.insert(id, NodeInfo::new(id, format!("127.0.0.{id}:7000")));
        }
        v.nodes.get_mut(&2).unwrap().state = NodeState::Down;
        v.epoch = 7;
        let p = v.placement_view(placement::MIN_SLOT_BITS).unwrap();
        assert_eq!(p.epoch(), 7);
        assert_eq!(p.nodes().len(), 3);
        assert_eq!(p.up_nodes().count(), 2);
    }

    #[test]
    fn validate() {
        let ok = NodeInfo::new(1, "a:1");
        assert_eq!(ok.validate(), Ok(()));
        let mut n = ok.clone();
        n.weight = 0;
        assert_eq!(n.validate(), Err(NodeError::ZeroWeight(1)));
        let mut n = ok.clone();
        n.addrs.imap = Some("x".repeat(LABEL_BYTES_MAX + 1));
        assert_eq!(n.validate(), Err(NodeError::LabelTooLong(1)));
        let mut n = ok;
        n.addrs.cluster.clear();
        assert_eq!(n.validate(), Err(NodeError::NoClusterAddr(1)));
    }
}
