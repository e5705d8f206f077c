//! What changes on a message after delivery: the folder it is in and its
//! flags (IMAP's `\Seen`, `\Flagged`, keywords). Each is a register of its
//! own, last writer wins by hybrid logical clock (see [`crate::hlc`]): a
//! change carries the HLC of the session that made it, every replica keeps
//! the newest value it has seen of each register, and two replicas that
//! merge each other's state in any order end with the same state. Ties
//! (two changes with one HLC, from two nodes) are broken by the value
//! (a set flag wins; the greater folder id wins), so they converge too.
//!
//! A cleared flag is kept (with the HLC that cleared it) so that an older
//! "set" arriving later cannot bring it back, as a tombstone does for a
//! deletion.
//!
//! # How the registers travel
//! A message's folder and each of its flags are **registers**
//! (`replication/src/marks.rs`): a value and the HLC of the change that wrote
//! it; merging keeps, per register, the newer write (ties broken by value: a
//! set flag wins, the greater folder id wins), so any two replicas that have
//! seen the same changes agree, whatever the order (a proptest checks it).
//! A cleared flag stays as a register with its HLC, as a tombstone does for a
//! deletion, so an older "set" arriving late cannot bring it back. They ride
//! the paths deletions take: entry records of kind 7 carry them (kinds 2 and
//! 5 read with none), `Request::Mark` sends a change to every replica and
//! holder, the update log keeps what a replica did not acknowledge (`upm-`
//! files beside `upd-`), anti-entropy's digest includes a copy's registers
//! (only towards peers meant to hold a copy: an earlier member keeps at most a
//! move marker) and `plan_sync` merges them both ways, and a listing shows
//! the newest of each register across holders. A STORE is stamped with the
//! session node's HLC: two nodes flagging one message at once converge to the
//! same flags; a STORE and a concurrent opposite STORE through another node
//! end with the later one (by HLC), like any last-writer-wins register.
//!
//! **CONDSTORE** does not use the registers' HLCs as MODSEQs: MODSEQ must
//! grow for every change a client can observe, and a change made through a
//! node whose clock is behind could be stamped below a HIGHESTMODSEQ the
//! client already read from another node, and CHANGEDSINCE would miss it.
//! Mod-sequences are a per-folder counter in the Raft state instead
//! (`membership::modseq`), stamped after the register change is on the
//! replicas.

use serde::{Deserialize, Serialize};

use crate::MessageId;

/// Flags (set or cleared) one message keeps at most.
pub const FLAGS_PER_MESSAGE_MAX: usize = 64;
/// Longest flag name, in bytes.
pub const FLAG_BYTES_MAX: usize = 64;

/// One flag's register.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlagMark {
    pub name: String,
    pub set: bool,
    pub hlc: u64,
}

/// The registers of one message besides its folder (which is
/// [`crate::EntryMeta::folder`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marks {
    /// The HLC of the move that put the message in its folder (0: it was
    /// delivered there).
    pub folder_hlc: u64,
    /// Sorted by name, one register per name.
    pub flags: Vec<FlagMark>,
}

/// A change of marks for one message, or a whole copy's marks (as
/// anti-entropy sends them): every register it names is merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarkChange {
    pub id: MessageId,
    /// A new folder, with the HLC of the move.
    pub folder: Option<(String, u64)>,
    pub flags: Vec<FlagMark>,
}

impl Marks {
    pub fn is_empty(&self) -> bool {
        self.folder_hlc == 0 && self.flags.is_empty()
    }

    /// Whether flag `name` is set.
    pub fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|f| f.set && f.name.eq_ignore_ascii_case(name))
    }

    /// The names of the flags that are set.
    pub fn set_flags(&self) -> impl Iterator<Item = &str> {
        self.flags.iter().filter(|f| f.set).map(|f| f.name.as_str())
    }

    /// Merges one register; whether it changed.
    fn merge_flag(&mut self, new: &FlagMark) -> bool {
        if new.name.is_empty() || new.name.len() > FLAG_BYTES_MAX {
            return false;
        }
        match self.flags.binary_search_by(|f| f.name.as_str().cmp(&new.name)) {
            Ok(i) => {
                let old = &mut self.flags[i];
                if (new.hlc, new.set) > (old.hlc, old.set) {
                    *old = new.clone();
                    true
                } else {
                    false
                }
            }
            Err(i) => {
                if self.flags.len() >= FLAGS_PER_MESSAGE_MAX {
                    return false;
                }
                self.flags.insert(i, new.clone());
                true
            }
        }
    }

    /// A fingerprint of the registers (for anti-entropy digests); 0 for
    /// none.
    pub fn fingerprint(&self, folder: &str) -> u64 {
        if self.is_empty() {
            return 0;
        }
        let mut h = blake3::Hasher::new();
        h.update(folder.as_bytes());
        h.update(&[0]);
        h.update(&self.folder_hlc.to_le_bytes());
        for f in &self.flags {
            h.update(f.name.as_bytes());
            h.update(&[0, f.set as u8]);
            h.update(&f.hlc.to_le_bytes());
        }
        u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes")) | 1
    }
}

impl crate::EntryMeta {
    /// Merges `change` into this entry's folder and flags (last writer
    /// wins per register); whether anything changed.
    pub fn apply_marks(&mut self, change: &MarkChange) -> bool {
        let mut changed = false;
        if let Some((folder, hlc)) = &change.folder {
            let newer = (*hlc, folder.as_str()) > (self.marks.folder_hlc, self.folder.as_str());
            if newer && !folder.is_empty() {
                self.folder = folder.clone();
                self.marks.folder_hlc = *hlc;
                changed = true;
            }
        }
        for f in &change.flags {
            changed |= self.marks.merge_flag(f);
        }
        changed
    }

    /// This entry's whole state as a change (what anti-entropy sends).
    pub fn marks_change(&self) -> MarkChange {
        MarkChange {
            id: self.id,
            folder: Some((self.folder.clone(), self.marks.folder_hlc)),
            flags: self.marks.flags.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BodyHash, EntryMeta};
    use proptest::prelude::*;

    fn meta() -> EntryMeta {
        EntryMeta::delivered(MessageId([1; 16]), BodyHash([2; 32]), 1, 1, "INBOX".into(), vec![1, 2])
    }

    fn flag(name: &str, set: bool, hlc: u64) -> FlagMark {
        FlagMark {
            name: name.into(),
            set,
            hlc,
        }
    }

    fn change(folder: Option<(&str, u64)>, flags: Vec<FlagMark>) -> MarkChange {
        MarkChange {
            id: MessageId([1; 16]),
            folder: folder.map(|(f, h)| (f.to_owned(), h)),
            flags,
        }
    }

    #[test]
    fn the_newest_write_of_each_register_wins() {
        let mut m = meta();
        assert!(m.apply_marks(&change(None, vec![flag("\\Seen", true, 10)])));
        assert!(m.marks.has("\\seen"));
        // An older clear loses; a newer one wins and is kept as a cleared register.
        assert!(!m.apply_marks(&change(None, vec![flag("\\Seen", false, 5)])));
        assert!(m.apply_marks(&change(None, vec![flag("\\Seen", false, 11)])));
        assert!(!m.marks.has("\\Seen"));
        assert!(
            !m.apply_marks(&change(None, vec![flag("\\Seen", true, 10)])),
            "older set stays out"
        );
        // Registers are independent.
        assert!(m.apply_marks(&change(Some(("f1", 20)), vec![flag("$Work", true, 3)])));
        assert_eq!(m.folder, "f1");
        assert!(m.marks.has("$Work"));
        assert!(!m.apply_marks(&change(Some(("f2", 19)), vec![])), "older move loses");
        // A tie is broken by value, the same way everywhere.
        assert!(m.apply_marks(&change(Some(("f9", 20)), vec![flag("$Work", false, 3)])));
        assert_eq!(m.folder, "f9");
        assert!(m.marks.has("$Work"), "at one HLC, set wins");
        // Bounds.
        for i in 0..FLAGS_PER_MESSAGE_MAX + 5 {
            m.apply_marks(&change(None, vec![flag(&format!("k{i}"), true, 1)]));
        }
        assert_eq!(m.marks.flags.len(), FLAGS_PER_MESSAGE_MAX);
        assert!(!m.apply_marks(&change(None, vec![flag(&"x".repeat(FLAG_BYTES_MAX + 1), true, 99)])));
    }

    fn any_change() -> impl Strategy<Value = MarkChange> {
        (
            proptest::option::of((0u8..3, 0u64..6)),
            proptest::collection::vec((0u8..4, any::<bool>(), 0u64..6), 0..4),
        )
            .prop_map(|(folder, flags)| MarkChange {
                id: MessageId([1; 16]),
                folder: folder.map(|(f, h)| (format!("f{f}"), h)),
                flags: flags
                    .into_iter()
                    .map(|(n, s, h)| flag(&format!("k{n}"), s, h))
                    .collect(),
            })
    }

    proptest! {
        /// Replicas that receive the same changes in any order, or merge
        /// each other's whole state, end the same.
        #[test]
        fn merging_converges_in_any_order(changes in proptest::collection::vec(any_change(), 0..12), cut in 0usize..12) {
            let mut a = meta();
            for c in &changes {
                a.apply_marks(c);
            }
            let mut b = meta();
            for c in changes.iter().rev() {
                b.apply_marks(c);
            }
            prop_assert_eq!(&a, &b);
            // Two halves merged through whole-state changes.
            let cut = cut.min(changes.len());
            let (mut x, mut y) = (meta(), meta());
            changes[..cut].iter().for_each(|c| { x.apply_marks(c); });
            changes[cut..].iter().for_each(|c| { y.apply_marks(c); });
            let (sx, sy) = (x.marks_change(), y.marks_change());
            x.apply_marks(&sy);
            y.apply_marks(&sx);
            prop_assert_eq!(&x, &a);
            prop_assert_eq!(&y, &a);
            prop_assert_eq!(x.marks.fingerprint(&x.folder), a.marks.fingerprint(&a.folder));
        }
    }
}
