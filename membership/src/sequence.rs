//! Named sequences in the replicated state: each assigns ascending numbers
//! to opaque 16-byte ids, once per id, and never gives a number twice.
//!
//! The node uses one per IMAP folder (the ids are message ids, the numbers
//! UIDs), but nothing here knows about mail. Because a number is given by a
//! committed Raft entry, applied in the same order on every node, two nodes
//! that disagree about the view (a partition, a manager change, a stale
//! session) can at worst ask for the same id twice, and the second asking
//! gets the first answer: no number reaches two ids, none is given out of
//! order, and a minority side of a partition gets none at all (it cannot
//! commit), which is the fail-closed choice.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest sequence name.
pub const NAME_BYTES_MAX: usize = 512;
/// Ids one command may carry (a command must fit one Raft entry).
pub const IDS_PER_COMMAND_MAX: usize = 2048;
/// Ids one sequence holds at most (a folder of a million messages).
pub const IDS_PER_SEQUENCE_MAX: usize = 1 << 20;
/// Sequences held at most.
pub const SEQUENCES_MAX: usize = 1 << 22;

/// One sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequence {
    /// Nonzero, different for every sequence ever created under a name
    /// (IMAP's UIDVALIDITY): a sequence dropped and created again starts
    /// a new validity, so old numbers are never mistaken for new ones.
    pub validity: u32,
    /// The number the next new id gets (IMAP's UIDNEXT); starts at 1.
    pub next: u32,
    /// id → number, for the ids not forgotten.
    pub ids: BTreeMap<[u8; 16], u32>,
}

impl Sequence {
    pub fn number(&self, id: &[u8; 16]) -> Option<u32> {
        self.ids.get(id).copied()
    }
}

/// Every sequence, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sequences {
    pub spaces: BTreeMap<String, Sequence>,
    /// The highest validity given so far.
    last_validity: u32,
}

/// Why a sequence command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SequenceError {
    #[error("a sequence name must be 1 to {NAME_BYTES_MAX} bytes")]
    BadName,
    #[error("at most {IDS_PER_COMMAND_MAX} ids per command")]
    TooManyIds,
    #[error("sequence {0:?} is full ({IDS_PER_SEQUENCE_MAX} ids)")]
    Full(String),
    #[error("too many sequences ({SEQUENCES_MAX})")]
    TooManySequences,
    #[error("sequence {0:?} has run out of numbers")]
    Exhausted(String),
}

impl Sequences {
    pub fn get(&self, name: &str) -> Option<&Sequence> {
        self.spaces.get(name)
    }

    /// Gives each id not numbered yet the next number, in the order given;
    /// ids already numbered keep theirs. Creates the sequence if needed,
    /// with a validity above every earlier one and at least `now_secs`
    /// (the proposer's clock: a cluster whose state was lost and made anew
    /// still starts above the validities it gave before, as long as
    /// clocks move forward). All or nothing.
    pub fn assign(&mut self, name: &str, ids: &[[u8; 16]], now_secs: u32) -> Result<(), SequenceError> {
        check_name(name)?;
        if ids.len() > IDS_PER_COMMAND_MAX {
            return Err(SequenceError::TooManyIds);
        }
        let exists = self.spaces.contains_key(name);
        if !exists && self.spaces.len() >= SEQUENCES_MAX {
            return Err(SequenceError::TooManySequences);
        }
        let (held, next) = self.spaces.get(name).map_or((0, 1), |s| (s.ids.len(), s.next));
        let new: Vec<&[u8; 16]> = {
            let known = self.spaces.get(name);
            let mut seen = std::collections::BTreeSet::new();
            ids.iter()
                .filter(|id| known.is_none_or(|s| !s.ids.contains_key(*id)) && seen.insert(**id))
                .collect()
        };
        if held + new.len() > IDS_PER_SEQUENCE_MAX {
            return Err(SequenceError::Full(name.to_owned()));
        }
        if u64::from(next) + new.len() as u64 >= u64::from(u32::MAX) {
            return Err(SequenceError::Exhausted(name.to_owned()));
        }
        if !exists {
            let validity = now_secs.max(self.last_validity.saturating_add(1)).max(1);
            self.last_validity = validity;
            self.spaces.insert(
                name.to_owned(),
                Sequence {
                    validity,
                    next: 1,
                    ids: BTreeMap::new(),
                },
            );
        }
        let s = self.spaces.get_mut(name).expect("just made");
        for id in new {
            s.ids.insert(*id, s.next);
            s.next += 1;
        }
        Ok(())
    }

    /// Forgets ids (their messages are gone); their numbers are never given
    /// again.
    pub fn forget(&mut self, name: &str, ids: &[[u8; 16]]) -> Result<(), SequenceError> {
        check_name(name)?;
        if ids.len() > IDS_PER_COMMAND_MAX {
            return Err(SequenceError::TooManyIds);
        }
        if let Some(s) = self.spaces.get_mut(name) {
            for id in ids {
                s.ids.remove(id);
            }
        }
        Ok(())
    }

    /// Drops a whole sequence (a deleted folder): created again, it gets a
    /// new validity.
    pub fn drop_sequence(&mut self, name: &str) -> Result<(), SequenceError> {
        check_name(name)?;
        self.spaces.remove(name);
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), SequenceError> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(SequenceError::BadName);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SplitMix64;

    fn id(n: u64) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&n.to_be_bytes());
        b
    }

    #[test]
    fn numbers_ascend_from_one_and_an_id_keeps_its_number() {
        let mut s = Sequences::default();
        s.assign("u/INBOX", &[id(5), id(3)], 1000).unwrap();
        let q = s.get("u/INBOX").unwrap();
        assert_eq!((q.validity, q.next), (1000, 3));
        assert_eq!((q.number(&id(5)), q.number(&id(3))), (Some(1), Some(2)));
        s.assign("u/INBOX", &[id(3), id(9), id(9)], 1001).unwrap();
        let q = s.get("u/INBOX").unwrap();
        assert_eq!((q.number(&id(3)), q.number(&id(9)), q.next), (Some(2), Some(3), 4));
    }

    #[test]
    fn forgotten_numbers_are_not_given_again_and_a_new_sequence_has_a_new_validity() {
        let mut s = Sequences::default();
        s.assign("a", &[id(1), id(2)], 50).unwrap();
        s.forget("a", &[id(2)]).unwrap();
        s.assign("a", &[id(2)], 50).unwrap();
        assert_eq!(s.get("a").unwrap().number(&id(2)), Some(3));
        let v = s.get("a").unwrap().validity;
        s.drop_sequence("a").unwrap();
        // The clock went backwards: the validity still moves up.
        s.assign("a", &[id(1)], 10).unwrap();
        assert!(s.get("a").unwrap().validity > v);
        assert_eq!(s.get("a").unwrap().number(&id(1)), Some(1));
    }

    #[test]
    fn limits_refuse_the_whole_command() {
        let mut s = Sequences::default();
        assert_eq!(s.assign("", &[id(1)], 1), Err(SequenceError::BadName));
        let many: Vec<_> = (0..IDS_PER_COMMAND_MAX as u64 + 1).map(id).collect();
        assert_eq!(s.assign("a", &many, 1), Err(SequenceError::TooManyIds));
        assert!(s.get("a").is_none());
    }

    /// The simulation of UID assignment: sessions on nodes with different,
    /// stale or partitioned views each list a folder at some moment (seeing
    /// some subset of the messages delivered so far, in any order, some
    /// twice) and ask for numbers; some requests are lost before commit,
    /// some committed twice (a retry after a lost answer). Whatever the
    /// interleaving, the committed log applied in order on every replica
    /// gives: the same state everywhere, no number to two ids, every id one
    /// number for good, numbers ascending in the order of commits.
    #[test]
    fn seeded_interleavings_never_give_one_number_to_two_ids() {
        for seed in 0..200u64 {
            let mut rng = SplitMix64::new(seed);
            let mut delivered = 0u64;
            let mut log: Vec<Vec<[u8; 16]>> = Vec::new();
            for _ in 0..60 {
                delivered += rng.next_u64() % 4;
                // A session's listing: a random subset (views differ, some
                // copies unreachable), shuffled, with repeats.
                let mut seen: Vec<[u8; 16]> = (0..delivered)
                    .filter(|_| !rng.next_u64().is_multiple_of(3))
                    .map(id)
                    .collect();
                for i in (1..seen.len()).rev() {
                    seen.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
                }
                if let Some(&first) = seen.first()
                    && rng.next_u64().is_multiple_of(4)
                {
                    seen.push(first);
                }
                match rng.next_u64() % 5 {
                    0 => {}                                // lost before commit
                    1 => log.extend([seen.clone(), seen]), // committed twice
                    _ => log.push(seen),
                }
            }
            let replay = |log: &[Vec<[u8; 16]>]| {
                let mut s = Sequences::default();
                let mut first_seen: BTreeMap<[u8; 16], u32> = BTreeMap::new();
                let mut high = 0;
                for (i, ids) in log.iter().enumerate() {
                    let before = s.get("f").map_or(1, |q| q.next);
                    s.assign("f", ids, 7).unwrap();
                    let q = s.get("f").unwrap();
                    for x in ids {
                        let n = q.number(x).expect("numbered");
                        let was = *first_seen.entry(*x).or_insert(n);
                        assert_eq!(was, n, "seed {seed} entry {i}: an id changed number");
                        if n >= before {
                            // Newly given in this entry: above all before.
                            assert!(n > high, "seed {seed}: number {n} not above {high}");
                        }
                    }
                    high = high.max(q.next - 1);
                }
                let q = s.get("f").cloned().unwrap_or_default();
                let mut numbers: Vec<u32> = q.ids.values().copied().collect();
                numbers.sort_unstable();
                numbers.dedup();
                assert_eq!(numbers.len(), q.ids.len(), "seed {seed}: a number given to two ids");
                s
            };
            assert_eq!(replay(&log), replay(&log), "seed {seed}: replicas diverge");
        }
    }
}
