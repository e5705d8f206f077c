//! IMAP's `\Recent` (RFC 3501 2.3.2): exactly one session is told that a
//! message is new. The cluster's answer: the node whose entry numbered a
//! message (gave it its UID in a [`crate::sequence`]) claims it, and one
//! of that node's sessions takes the claim. Every node applies every entry,
//! but only the proposer records what its own entry numbered, so no two
//! nodes claim one message; a node's sessions take a claim under one lock,
//! so no two sessions do.
//!
//! Claims are soft, in this node's memory only: a restart, or an entry
//! applied from a snapshot, loses them (those messages are recent to no
//! session), which RFC 3501 allows; it never makes one recent twice.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

/// Claims one node keeps at most; past it the oldest go.
pub const CLAIMS_MAX: usize = 200_000;

/// The messages this node numbered that no session of it has taken as
/// recent yet, by sequence (folder) name.
#[derive(Debug, Default)]
pub struct RecentClaims {
    held: HashSet<(Arc<str>, [u8; 16])>,
    /// In the order claimed, for the bound (entries taken meanwhile are
    /// skipped when they come up).
    order: VecDeque<(Arc<str>, [u8; 16])>,
}

impl RecentClaims {
    /// Claims `ids` of sequence `name` (this node's entry numbered them).
    pub fn claim(&mut self, name: &str, ids: impl IntoIterator<Item = [u8; 16]>) {
        let name: Arc<str> = Arc::from(name);
        for id in ids {
            let key = (name.clone(), id);
            if self.held.insert(key.clone()) {
                self.order.push_back(key);
            }
        }
        while self.held.len() > CLAIMS_MAX {
            let Some(oldest) = self.order.pop_front() else { break };
            self.held.remove(&oldest);
        }
        // Taken claims leave their place in `order` behind: compact it
        // when it is mostly such places.
        if self.order.len() > 2 * self.held.len() + 1024 {
            let held = &self.held;
            self.order.retain(|k| held.contains(k));
        }
    }

    /// Takes the claims on `ids` of `name`: those ids, which are recent
    /// to the caller and to no one else.
    pub fn take(&mut self, name: &str, ids: &[[u8; 16]]) -> Vec<[u8; 16]> {
        if self.held.is_empty() {
            return Vec::new();
        }
        let name: Arc<str> = Arc::from(name);
        ids.iter()
            .copied()
            .filter(|id| self.held.remove(&(name.clone(), *id)))
            .collect()
    }

    /// How many of `ids` of `name` are claimed and not taken (EXAMINE and
    /// STATUS count them without taking them).
    pub fn count(&self, name: &str, ids: &[[u8; 16]]) -> usize {
        if self.held.is_empty() {
            return 0;
        }
        let name: Arc<str> = Arc::from(name);
        ids.iter()
            .filter(|id| self.held.contains(&(name.clone(), **id)))
            .count()
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_taken_once_and_bounded() {
        let mut c = RecentClaims::default();
        c.claim("f", [[1; 16], [2; 16]]);
        assert_eq!(c.count("f", &[[1; 16], [2; 16], [3; 16]]), 2);
        assert_eq!(c.count("g", &[[1; 16]]), 0);
        assert_eq!(c.take("f", &[[1; 16], [3; 16]]), [[1; 16]]);
        assert!(c.take("f", &[[1; 16]]).is_empty(), "taken twice");
        assert_eq!(c.len(), 1);
        // The bound drops the oldest.
        let many = (0..CLAIMS_MAX as u32 + 10).map(|k| {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&k.to_be_bytes());
            id[15] = 9;
            id
        });
        c.claim("h", many);
        assert_eq!(c.len(), CLAIMS_MAX);
        assert_eq!(c.count("f", &[[2; 16]]), 0, "the oldest went first");
    }
}
