//! The durable update log: a deletion (or a folder or flag change) a
//! replica did not acknowledge is kept in a file of its own
//! (`DIR/updates/upd-*` for deletions, `upm-*` for changes, fsynced) and
//! sent again once the replica is live, until it acknowledges.
//!
//! # Versions
//! A file's prefix names what it holds and in which layout (bincode of
//! [`PendingUpdate`] for `upd-`, of `PendingMarks` for `upm-`, both since
//! release 0.1.0). A layout never changes: a new one gets a new prefix,
//! written only once the cluster's feature level says every node reads it
//! (membership's `formats`). A file of a prefix this release does not know
//! is left alone, neither replayed nor removed (release 0.1.0 does the
//! same), so a newer release finds it after an upgrade; one of a known
//! prefix that does not decode is damage (files are written whole:
//! temporary file, fsync, rename) and is removed with a warning.

use std::path::Path;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::protocol::{Network, NodeId, ReplicaError, Request, UPDATE_LOG_FILES_MAX};
use super::{Replicator, is_live};
use crate::{MarkChange, MessageId, Tombstone};

/// A deletion some replica has not acknowledged yet (an `upd-` file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PendingUpdate {
    pub(super) node: NodeId,
    pub(super) user: String,
    pub(super) tombs: Vec<Tombstone>,
}

/// Folder and flag changes some replica has not acknowledged yet (an
/// `upm-` file).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PendingMarks {
    node: NodeId,
    user: String,
    changes: Vec<MarkChange>,
}

/// What is owed to a replica.
#[derive(Debug, Clone)]
pub(super) enum Owed {
    Tombs(Vec<Tombstone>),
    Marks(Vec<MarkChange>),
}

impl Owed {
    fn request(&self, user: &str) -> Request {
        match self {
            Owed::Tombs(tombs) => Request::Delete {
                user: user.to_owned(),
                tombs: tombs.clone(),
            },
            Owed::Marks(changes) => Request::Mark {
                user: user.to_owned(),
                changes: changes.clone(),
            },
        }
    }

    fn ids(&self) -> std::collections::BTreeSet<MessageId> {
        match self {
            Owed::Tombs(tombs) => tombs.iter().map(|t| t.id).collect(),
            Owed::Marks(changes) => changes.iter().map(|c| c.id).collect(),
        }
    }
}

const PREFIXES: [&str; 2] = ["upd-", "upm-"];

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 16 << 20 }>()
}

impl<N: Network> Replicator<N> {
    pub(super) fn log_deletion(&self, node: NodeId, user: &str, tombs: Vec<Tombstone>) -> Result<(), ReplicaError> {
        self.log_update(node, user, Owed::Tombs(tombs))
            .map_err(|e| ReplicaError::UpdateLog(e.to_string()))
    }

    pub(super) fn log_update(&self, node: NodeId, user: &str, owed: Owed) -> std::io::Result<()> {
        let dir = &self.cfg.update_dir;
        let n_files = std::fs::read_dir(dir)?.count();
        if n_files >= UPDATE_LOG_FILES_MAX {
            warn!(node, "update log full; anti-entropy will repair this replica");
            return Ok(());
        }
        let seq = self.update_seq.fetch_add(1, Ordering::Relaxed);
        let user = user.to_owned();
        let (prefix, bytes) = match owed {
            Owed::Tombs(tombs) => (
                PREFIXES[0],
                bincode::serde::encode_to_vec(PendingUpdate { node, user, tombs }, bincode_config()),
            ),
            Owed::Marks(changes) => (
                PREFIXES[1],
                bincode::serde::encode_to_vec(PendingMarks { node, user, changes }, bincode_config()),
            ),
        };
        let bytes = bytes.map_err(std::io::Error::other)?;
        let name = format!("{prefix}{:016x}-{seq:08}-{node}", self.clock.now());
        write_durable(dir, &name, &bytes)?;
        self.counters.updates_logged.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Updates still waiting for a replica.
    pub fn pending_updates(&self) -> usize {
        std::fs::read_dir(&self.cfg.update_dir).map_or(0, |d| {
            d.filter_map(|e| e.ok())
                .filter(|e| PREFIXES.iter().any(|p| e.file_name().to_string_lossy().starts_with(p)))
                .count()
        })
    }

    /// Sends logged updates to the replicas that are live again; removes
    /// each once acknowledged. Returns how many were acknowledged.
    pub async fn replay_updates(&self) -> usize {
        let dir = self.cfg.update_dir.clone();
        let Ok(rd) = std::fs::read_dir(&dir) else { return 0 };
        let mut names: Vec<String> = rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| PREFIXES.iter().any(|p| n.starts_with(p)))
            .collect();
        // In the order they were logged (the HLC after the prefix).
        names.sort_by(|a, b| a[4..].cmp(&b[4..]));
        let view = self.view();
        let mut done = 0;
        for name in names {
            let path = dir.join(&name);
            let Ok(bytes) = std::fs::read(&path) else { continue };
            let decoded = if name.starts_with(PREFIXES[0]) {
                bincode::serde::decode_from_slice::<PendingUpdate, _>(&bytes, bincode_config())
                    .map(|(u, _)| (u.node, u.user, Owed::Tombs(u.tombs)))
            } else {
                bincode::serde::decode_from_slice::<PendingMarks, _>(&bytes, bincode_config())
                    .map(|(u, _)| (u.node, u.user, Owed::Marks(u.changes)))
            };
            let (node, user, owed) = match decoded {
                Ok(u) => u,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "unreadable update dropped");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            if view.node(placement::NodeId(node)).is_none() && view.epoch() > 0 {
                // The node left the cluster, and its copies may have moved
                // on meanwhile (repair, drain): the deletions go to whoever
                // holds those messages now (logged again for them if they
                // do not answer), then this entry goes.
                if self.redirect(&user, owed).await {
                    let _ = std::fs::remove_file(&path);
                    done += 1;
                }
                continue;
            }
            if !is_live(&view, node) {
                continue;
            }
            if self.call(node, owed.request(&user)).await.is_ok() {
                let _ = std::fs::remove_file(&path);
                done += 1;
                self.counters.updates_replayed.fetch_add(1, Ordering::Relaxed);
            }
        }
        done
    }
}

impl<N: Network> Replicator<N> {
    /// Sends deletions (or changes) meant for a node that left to the
    /// nodes that hold those messages now; whether each of them took them
    /// or logged them for later. Every live node is asked for its listing (not only those
    /// the user's mail map names: a copy moved while the map was being
    /// rebuilt must not keep a deleted message alive); this is rare, only
    /// when a node leaves with deletions still owed to it.
    async fn redirect(&self, user: &str, owed: Owed) -> bool {
        let ids = owed.ids();
        let view = self.view();
        let mut holders: Vec<NodeId> = Vec::new();
        for node in super::live_nodes(&view).collect::<Vec<_>>() {
            match self.call(node, Request::List { user: user.to_owned() }).await {
                Ok(super::Reply::Listed { entries }) => {
                    if entries.iter().any(|e| ids.contains(&e.id)) {
                        holders.push(node);
                    }
                }
                // Not answered: the entry stays for the next replay.
                _ => return false,
            }
        }
        for node in holders {
            if self.call(node, owed.request(user)).await.is_err() && self.log_update(node, user, owed.clone()).is_err()
            {
                return false;
            }
        }
        true
    }
}

/// Writes `name` in `dir` so that it is either whole or absent after a
/// crash: temporary file, fsync, rename, fsync of the directory.
fn write_durable(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}
