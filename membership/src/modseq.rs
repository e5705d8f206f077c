//! Mod-sequences (IMAP CONDSTORE and QRESYNC, RFC 7162): per folder
//! sequence, a counter raised by every change a client can see (a message
//! numbered, its flags changed, a message expunged), and per message the
//! value of the last change to it.
//!
//! The counter moves only when a committed entry applies, in the log's
//! order, on every node: a change made through one node is stamped above
//! every value any node has shown before it (a node shows what it has
//! applied, which is a prefix of the same log). This is what makes a
//! HIGHESTMODSEQ read through one node safe to pass to another: an HLC
//! could be stamped below it by a node whose clock is behind.
//!
//! The node writes a flag change to the message's replicas first, then
//! commits [`crate::command::Command::Touch`] for it: a session that reads
//! the counter and then lists the folder sees the change with it (or a
//! newer one), never the counter without the change.
//!
//! Kept from feature level 3 ([`MODSEQ_FEATURE_LEVEL`]); a message
//! numbered before then has mod-sequence 1 until it changes. Costs: a
//! counter per folder and a number per message (as the UIDs: see
//! `node/src/uids.rs` for why these live in the Raft state for now).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The feature level that brought mod-sequences.
pub const MODSEQ_FEATURE_LEVEL: u32 = 3;

/// The mod-sequence of a message (or folder) nothing has stamped.
pub const MODSEQ_UNSTAMPED: u64 = 1;

/// One folder's mod-sequences.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderModSeqs {
    /// The highest value given (HIGHESTMODSEQ); 0 until the first.
    pub highest: u64,
    /// id → the value of its last change, for the ids stamped.
    pub ids: BTreeMap<[u8; 16], u64>,
}

impl FolderModSeqs {
    /// HIGHESTMODSEQ: at least [`MODSEQ_UNSTAMPED`].
    pub fn highest(&self) -> u64 {
        self.highest.max(MODSEQ_UNSTAMPED)
    }

    /// The mod-sequence of `id` (a numbered message).
    pub fn of(&self, id: &[u8; 16]) -> u64 {
        self.ids.get(id).copied().unwrap_or(MODSEQ_UNSTAMPED)
    }
}

/// Every folder's mod-sequences, by sequence name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModSeqs {
    folders: BTreeMap<String, FolderModSeqs>,
}

impl ModSeqs {
    pub fn get(&self, name: &str) -> Option<&FolderModSeqs> {
        self.folders.get(name)
    }

    /// One change to `ids` (all numbered in sequence `name`): the counter
    /// goes up by one and each id takes the new value. Nothing for no ids.
    pub fn stamp(&mut self, name: &str, ids: &[[u8; 16]]) {
        if let Some(f) = self.change(name, ids) {
            for id in ids {
                f.ids.insert(*id, f.highest);
            }
        }
    }

    /// `ids` expunged (those that were numbered): the counter goes up by
    /// one (a QRESYNC client is told of the expunge by it) and their
    /// values are dropped. Nothing for no ids.
    pub fn forget(&mut self, name: &str, ids: &[[u8; 16]]) {
        if let Some(f) = self.change(name, ids) {
            for id in ids {
                f.ids.remove(id);
            }
        }
    }

    /// The folder's counter, raised by one, for a change to `ids` (none
    /// for no ids).
    fn change(&mut self, name: &str, ids: &[[u8; 16]]) -> Option<&mut FolderModSeqs> {
        if ids.is_empty() {
            return None;
        }
        let f = self.folders.entry(name.to_owned()).or_default();
        f.highest = f.highest.max(MODSEQ_UNSTAMPED) + 1;
        Some(f)
    }

    /// The folder's sequence was dropped: its counter goes with it (a
    /// folder made anew has a new UIDVALIDITY, and counts from 1).
    pub fn drop_folder(&mut self, name: &str) {
        self.folders.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_change_raises_the_counter_and_stamps_its_ids() {
        let mut m = ModSeqs::default();
        assert!(m.get("f").is_none());
        m.stamp("f", &[[1; 16], [2; 16]]);
        let f = m.get("f").unwrap();
        assert_eq!((f.highest(), f.of(&[1; 16]), f.of(&[2; 16])), (2, 2, 2));
        m.stamp("f", &[[2; 16]]);
        let f = m.get("f").unwrap();
        assert_eq!((f.highest(), f.of(&[1; 16]), f.of(&[2; 16])), (3, 2, 3));
        // An id never stamped (numbered before level 3) reads as 1.
        assert_eq!(f.of(&[9; 16]), MODSEQ_UNSTAMPED);
        m.forget("f", &[[1; 16]]);
        let f = m.get("f").unwrap();
        assert_eq!((f.highest(), f.ids.len()), (4, 1));
        // No ids: no change.
        m.stamp("f", &[]);
        m.forget("f", &[]);
        assert_eq!(m.get("f").unwrap().highest(), 4);
        m.drop_folder("f");
        assert!(m.get("f").is_none());
    }
}
