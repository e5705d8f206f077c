//! Blocklists and access rules (feature level 3), kept once for the whole
//! cluster: every node refuses mail from a listed client address within
//! seconds of a load, no restart.
//!
//! A list is parsed and merged where it is loaded (`quill admin blocklist
//! load`) into a [`RangeTable`], encoded compactly, and committed in
//! chunks that each fit a Raft entry: [`BlocklistCommand::Begin`] opens a
//! staging under an upload id (replacing any earlier staging of that
//! name: an abandoned load costs nothing more), [`BlocklistCommand::Chunk`]s
//! append in order, and [`BlocklistCommand::Commit`] checks the whole
//! table and makes it the list, in one step: nodes never see half a list.
//! The access rules are the operator's own: `allow` wins over every list
//! (and DNS blocklists and greylisting), `deny` refuses like a listing.

pub mod table;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use table::{LineError, Range, RangeTable, parse_range};

/// The level that brought blocklists (release 0.3.0).
pub const BLOCKLIST_FEATURE_LEVEL: u32 = 3;
/// Lists at once, at most (staged ones count apart).
pub const LISTS_MAX: usize = 64;
/// Ranges of one list, at most.
pub const RANGES_MAX: usize = 4 << 20;
/// Bytes of one encoded list, at most (4 Mi scattered IPv4 ranges take
/// about 13 MB; IPv6 ones more).
pub const LIST_BYTES_MAX: u64 = 48 << 20;
/// Bytes of all lists and stagings together, at most: the Raft state is
/// in every snapshot.
pub const TOTAL_BYTES_MAX: u64 = 256 << 20;
/// One chunk's bytes, at most (a Raft entry is at most 64 KiB).
pub const CHUNK_BYTES_MAX: usize = 48 * 1024;
// A chunk and its request's other fields fit one Raft entry.
const _: () = assert!(CHUNK_BYTES_MAX + 4096 <= crate::cluster::ENTRY_BYTES_MAX);
pub const NAME_BYTES_MAX: usize = 64;
/// Access rules, at most.
pub const ACCESS_RULES_MAX: usize = 10_000;

/// A change to the blocklists or access rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlocklistCommand {
    /// Opens a staging of list `name` that will hold `total_bytes`.
    Begin {
        name: String,
        upload: u64,
        total_bytes: u64,
    },
    /// Appends to the staging; `offset` must be what it holds so far.
    Chunk {
        name: String,
        upload: u64,
        offset: u64,
        data: Vec<u8>,
    },
    /// The staging, complete and checked, becomes list `name`.
    Commit {
        name: String,
        upload: u64,
        loaded_at_ms: u64,
    },
    Remove {
        name: String,
    },
    /// An access rule for a CIDR range: allow (`true`) or deny.
    SetAccess {
        cidr: String,
        allow: bool,
    },
    RemoveAccess {
        cidr: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum BlocklistError {
    #[error("a list's name is 1 to {NAME_BYTES_MAX} characters a-z, A-Z, 0-9, '.', '_' and '-'")]
    BadName,
    #[error("at most {LISTS_MAX} lists; remove one first")]
    TooManyLists,
    #[error("a list of {0} bytes: at most {LIST_BYTES_MAX} a list and {TOTAL_BYTES_MAX} all together")]
    TooLarge(u64),
    #[error("no load {upload} of list {name} is staged (another load of it began since?)")]
    NoStaging { name: String, upload: u64 },
    #[error("chunk at offset {offset}: the staging holds {held} bytes")]
    OutOfOrder { offset: u64, held: u64 },
    #[error("a chunk over {CHUNK_BYTES_MAX} bytes, or past the {total} bytes the load began with")]
    PastTotal { total: u64 },
    #[error("the load is incomplete: {held} of {total} bytes")]
    Incomplete { held: u64, total: u64 },
    #[error("a bad table: {0}")]
    BadTable(String),
    #[error("no list named {0}")]
    NoSuchList(String),
    #[error("{0}")]
    BadRule(String),
    #[error("at most {ACCESS_RULES_MAX} access rules")]
    TooManyRules,
    #[error("no access rule for {0}")]
    NoSuchRule(String),
}

/// A committed list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredList {
    /// The [`Blocklists::version`] that committed it: a node rebuilds its
    /// lookup table when this changes.
    pub version: u64,
    pub loaded_at_ms: u64,
    pub ranges: u64,
    /// The [`RangeTable`], encoded.
    pub data: Vec<u8>,
}

/// A load in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staging {
    pub upload: u64,
    pub total_bytes: u64,
    pub data: Vec<u8>,
}

/// The lists, the stagings and the access rules, and a counter moved by
/// every change nodes act on (a commit, a removal, a rule).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocklists {
    pub version: u64,
    pub lists: BTreeMap<String, StoredList>,
    pub staging: BTreeMap<String, Staging>,
    /// CIDR (as [`canonical_cidr`] writes it) -> allow.
    pub access: BTreeMap<String, bool>,
}

fn name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// A CIDR range (or one address) in one spelling: `1.2.3.0/24`,
/// `2001:db8::/32`, `1.2.3.4/32`.
pub fn canonical_cidr(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.contains('-') {
        return Err(format!("{s:?}: an access rule takes an address or a CIDR range"));
    }
    Ok(match parse_range(s)? {
        Range::V4(a, b) => format!("{}/{}", std::net::Ipv4Addr::from(a), 32 - (b - a).count_ones()),
        Range::V6(a, b) => format!("{}/{}", std::net::Ipv6Addr::from(a), 128 - (b - a).count_ones()),
    })
}

impl Blocklists {
    fn bytes_held(&self) -> u64 {
        let lists: usize = self.lists.values().map(|l| l.data.len()).sum();
        let staged: u64 = self.staging.values().map(|s| s.total_bytes).sum();
        lists as u64 + staged
    }

    pub fn apply(&mut self, c: &BlocklistCommand) -> Result<(), BlocklistError> {
        match c {
            BlocklistCommand::Begin {
                name,
                upload,
                total_bytes,
            } => {
                if !name_ok(name) {
                    return Err(BlocklistError::BadName);
                }
                self.staging.remove(name);
                let others = self.bytes_held() - self.lists.get(name).map_or(0, |l| l.data.len() as u64);
                if *total_bytes > LIST_BYTES_MAX || others + total_bytes > TOTAL_BYTES_MAX {
                    return Err(BlocklistError::TooLarge(*total_bytes));
                }
                if !self.lists.contains_key(name) && self.lists.len() + self.staging.len() >= LISTS_MAX {
                    return Err(BlocklistError::TooManyLists);
                }
                self.staging.insert(
                    name.clone(),
                    Staging {
                        upload: *upload,
                        total_bytes: *total_bytes,
                        data: Vec::new(),
                    },
                );
            }
            BlocklistCommand::Chunk {
                name,
                upload,
                offset,
                data,
            } => {
                let s = self.staged(name, *upload)?;
                let held = s.data.len() as u64;
                if data.len() > CHUNK_BYTES_MAX || held + data.len() as u64 > s.total_bytes {
                    return Err(BlocklistError::PastTotal { total: s.total_bytes });
                }
                if *offset != held {
                    return Err(BlocklistError::OutOfOrder { offset: *offset, held });
                }
                s.data.extend_from_slice(data);
            }
            BlocklistCommand::Commit {
                name,
                upload,
                loaded_at_ms,
            } => {
                let s = self.staged(name, *upload)?;
                let (held, total) = (s.data.len() as u64, s.total_bytes);
                if held != total {
                    return Err(BlocklistError::Incomplete { held, total });
                }
                let checked = RangeTable::decode(&s.data, RANGES_MAX);
                let s = self.staging.remove(name).expect("staged");
                let t = checked.map_err(BlocklistError::BadTable)?;
                if !self.lists.contains_key(name) && self.lists.len() >= LISTS_MAX {
                    return Err(BlocklistError::TooManyLists);
                }
                self.version += 1;
                self.lists.insert(
                    name.clone(),
                    StoredList {
                        version: self.version,
                        loaded_at_ms: *loaded_at_ms,
                        ranges: t.len() as u64,
                        data: s.data,
                    },
                );
            }
            BlocklistCommand::Remove { name } => {
                let staged = self.staging.remove(name).is_some();
                if self.lists.remove(name).is_none() && !staged {
                    return Err(BlocklistError::NoSuchList(name.clone()));
                }
                self.version += 1;
            }
            BlocklistCommand::SetAccess { cidr, allow } => {
                let key = canonical_cidr(cidr).map_err(BlocklistError::BadRule)?;
                if !self.access.contains_key(&key) && self.access.len() >= ACCESS_RULES_MAX {
                    return Err(BlocklistError::TooManyRules);
                }
                self.access.insert(key, *allow);
                self.version += 1;
            }
            BlocklistCommand::RemoveAccess { cidr } => {
                let key = canonical_cidr(cidr).map_err(BlocklistError::BadRule)?;
                if self.access.remove(&key).is_none() {
                    return Err(BlocklistError::NoSuchRule(key));
                }
                self.version += 1;
            }
        }
        Ok(())
    }

    fn staged(&mut self, name: &str, upload: u64) -> Result<&mut Staging, BlocklistError> {
        match self.staging.get_mut(name) {
            Some(s) if s.upload == upload => Ok(s),
            _ => Err(BlocklistError::NoStaging {
                name: name.to_owned(),
                upload,
            }),
        }
    }
}

/// The commands that load `table` as list `name`: a begin, chunks of at
/// most [`CHUNK_BYTES_MAX`], a commit.
pub fn load_commands(name: &str, upload: u64, bytes: &[u8], loaded_at_ms: u64) -> Vec<BlocklistCommand> {
    let mut out = vec![BlocklistCommand::Begin {
        name: name.to_owned(),
        upload,
        total_bytes: bytes.len() as u64,
    }];
    let mut offset = 0;
    for chunk in bytes.chunks(CHUNK_BYTES_MAX) {
        out.push(BlocklistCommand::Chunk {
            name: name.to_owned(),
            upload,
            offset,
            data: chunk.to_vec(),
        });
        offset += chunk.len() as u64;
    }
    out.push(BlocklistCommand::Commit {
        name: name.to_owned(),
        upload,
        loaded_at_ms,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(n: u32) -> Vec<u8> {
        RangeTable::from_ranges((0..n).map(|i| (i * 1000, i * 1000 + 3)).collect(), vec![]).encode()
    }

    #[test]
    fn a_list_is_visible_only_once_committed_and_a_new_load_replaces_a_staging() {
        let mut b = Blocklists::default();
        let bytes = table(40_000);
        let cmds = load_commands("spam", 7, &bytes, 99);
        assert!(cmds.len() > 3, "more than one chunk");
        for c in &cmds[..cmds.len() - 1] {
            b.apply(c).unwrap();
            assert!(b.lists.is_empty());
        }
        // Another load of the same name abandons this one.
        b.apply(&BlocklistCommand::Begin {
            name: "spam".into(),
            upload: 8,
            total_bytes: 10,
        })
        .unwrap();
        let last = cmds.last().unwrap();
        assert!(matches!(b.apply(last), Err(BlocklistError::NoStaging { .. })));
        for c in &cmds {
            b.apply(c).unwrap();
        }
        assert!(b.staging.is_empty());
        let l = &b.lists["spam"];
        assert_eq!((l.ranges, l.loaded_at_ms, l.version), (40_000, 99, b.version));
        assert_eq!(RangeTable::decode(&l.data, RANGES_MAX).unwrap().len(), 40_000);
        b.apply(&BlocklistCommand::Remove { name: "spam".into() }).unwrap();
        assert!(b.lists.is_empty());
    }

    #[test]
    fn out_of_order_incomplete_or_bad_loads_are_refused() {
        let mut b = Blocklists::default();
        let bytes = table(30_000);
        let cmds = load_commands("x", 1, &bytes, 0);
        b.apply(&cmds[0]).unwrap();
        assert!(matches!(b.apply(&cmds[2]), Err(BlocklistError::OutOfOrder { .. })));
        b.apply(&cmds[1]).unwrap();
        assert!(matches!(
            b.apply(cmds.last().unwrap()),
            Err(BlocklistError::Incomplete { .. })
        ));
        let mut junk = bytes.clone();
        junk[0] = 9;
        for c in load_commands("y", 2, &junk, 0) {
            let r = b.apply(&c);
            if matches!(c, BlocklistCommand::Commit { .. }) {
                assert!(matches!(r, Err(BlocklistError::BadTable(_))), "{r:?}");
            }
        }
        assert!(!b.lists.contains_key("y") && !b.staging.contains_key("y"));
        for bad in ["", "a b", "ü", &"n".repeat(65)] {
            let c = BlocklistCommand::Begin {
                name: bad.into(),
                upload: 1,
                total_bytes: 1,
            };
            assert_eq!(b.apply(&c), Err(BlocklistError::BadName));
        }
        let huge = BlocklistCommand::Begin {
            name: "big".into(),
            upload: 1,
            total_bytes: LIST_BYTES_MAX + 1,
        };
        assert!(matches!(b.apply(&huge), Err(BlocklistError::TooLarge(_))));
    }

    #[test]
    fn access_rules_are_kept_in_one_spelling() {
        let mut b = Blocklists::default();
        b.apply(&BlocklistCommand::SetAccess {
            cidr: "127.0.0.1".into(),
            allow: true,
        })
        .unwrap();
        b.apply(&BlocklistCommand::SetAccess {
            cidr: "2001:DB8::/32".into(),
            allow: false,
        })
        .unwrap();
        assert_eq!(
            b.access.keys().collect::<Vec<_>>(),
            vec!["127.0.0.1/32", "2001:db8::/32"]
        );
        b.apply(&BlocklistCommand::RemoveAccess {
            cidr: "127.0.0.1/32".into(),
        })
        .unwrap();
        assert!(
            b.apply(&BlocklistCommand::RemoveAccess {
                cidr: "127.0.0.1".into()
            })
            .is_err()
        );
        for bad in ["1.2.3.4/24", "1.2.3.4-1.2.3.5", "x"] {
            let c = BlocklistCommand::SetAccess {
                cidr: bad.into(),
                allow: true,
            };
            assert!(matches!(b.apply(&c), Err(BlocklistError::BadRule(_))), "{bad}");
        }
    }
}
