//! What other nodes' failure detectors told the leader (`detector`):
//! kept apart from the detector so that the wire's server side and the
//! node's `Cluster` hold it without depending on the detector.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use membership::ClusterView;

/// A report older than this is not acted on (a leader's round that
/// stalled, or one from before this node led).
const REPORT_FRESH: Duration = Duration::from_secs(2);

/// What the leader was told by the other nodes, by node reported: whether
/// it was reported silent (else: answering while down), when, by whom.
#[derive(Default)]
pub struct Reports {
    by_node: Mutex<BTreeMap<u64, (bool, Instant, u64)>>,
}

impl Reports {
    /// Takes a report from node `from`, which connected from `peer`; only
    /// a node of the view, from its own address, about nodes of the view.
    pub fn note(
        &self,
        view: &ClusterView,
        peer: SocketAddr,
        from: u64,
        silent: &[u64],
        answered: &[u64],
    ) -> Result<(), String> {
        let sender = view.node(from).ok_or("the reporting node is not in the view")?;
        if sender.addrs.cluster.parse::<SocketAddr>().ok() != Some(peer) {
            return Err("a report comes from the reporting node's own address".into());
        }
        if silent.len() + answered.len() > membership::view::NODES_MAX {
            return Err("a report names more nodes than a view holds".into());
        }
        let now = Instant::now();
        let mut by_node = self.by_node.lock().unwrap_or_else(|p| p.into_inner());
        let known = |id: &&u64| view.nodes.contains_key(*id);
        for &id in silent.iter().filter(known) {
            by_node.insert(id, (true, now, from));
        }
        for &id in answered.iter().filter(known) {
            by_node.insert(id, (false, now, from));
        }
        Ok(())
    }

    /// The fresh reports, emptied: (reported silent, reported answering).
    pub(super) fn take(&self) -> (BTreeMap<u64, u64>, BTreeMap<u64, u64>) {
        let taken = std::mem::take(&mut *self.by_node.lock().unwrap_or_else(|p| p.into_inner()));
        let (mut silent, mut answered) = (BTreeMap::new(), BTreeMap::new());
        for (id, (is_silent, at, from)) in taken {
            if at.elapsed() < REPORT_FRESH {
                if is_silent { &mut silent } else { &mut answered }.insert(id, from);
            }
        }
        (silent, answered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use membership::NodeInfo;

    fn view() -> ClusterView {
        let mut v = ClusterView::default();
        for id in 1..=3 {
            v.nodes.insert(id, NodeInfo::new(id, format!("127.0.0.{id}:7000")));
        }
        v
    }

    fn addr(id: u64) -> SocketAddr {
        format!("127.0.0.{id}:7000").parse().unwrap()
    }

    #[test]
    fn only_a_member_from_its_own_address_about_members_is_heard() {
        let (v, r) = (view(), Reports::default());
        // Not in the view, or from another node's address: refused.
        assert!(r.note(&v, addr(9), 9, &[2], &[]).is_err());
        assert!(r.note(&v, addr(3), 1, &[2], &[]).is_err());
        // More names than a view can hold: refused whole.
        let many = vec![2u64; membership::view::NODES_MAX + 1];
        assert!(r.note(&v, addr(1), 1, &many, &[]).is_err());
        assert_eq!(r.take(), (BTreeMap::new(), BTreeMap::new()));
        // A member about members (and a stranger, ignored).
        r.note(&v, addr(1), 1, &[2, 77], &[3]).unwrap();
        let (silent, answered) = r.take();
        assert_eq!(silent, BTreeMap::from([(2, 1)]));
        assert_eq!(answered, BTreeMap::from([(3, 1)]));
        // Taken once: the next round starts empty.
        assert_eq!(r.take(), (BTreeMap::new(), BTreeMap::new()));
    }
}
