//! The durable update log: a deletion a replica did not acknowledge is
//! kept in a file of its own (`DIR/updates/upd-*`, fsynced) and sent again
//! once the replica is live, until it acknowledges.

use std::path::Path;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::protocol::{Network, NodeId, ReplicaError, Request, UPDATE_LOG_FILES_MAX};
use super::{Replicator, is_live};
use crate::Tombstone;

/// A deletion some replica has not acknowledged yet.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct PendingUpdate {
    pub(super) node: NodeId,
    pub(super) user: String,
    pub(super) tombs: Vec<Tombstone>,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ 16 << 20 }>()
}

impl<N: Network> Replicator<N> {
    pub(super) fn log_deletion(&self, node: NodeId, user: &str, tombs: Vec<Tombstone>) -> Result<(), ReplicaError> {
        self.log_update(PendingUpdate {
            node,
            user: user.to_owned(),
            tombs,
        })
        .map_err(|e| ReplicaError::UpdateLog(e.to_string()))
    }

    pub(super) fn log_update(&self, u: PendingUpdate) -> std::io::Result<()> {
        let dir = &self.cfg.update_dir;
        let n_files = std::fs::read_dir(dir)?.count();
        if n_files >= UPDATE_LOG_FILES_MAX {
            warn!(node = u.node, "update log full; anti-entropy will repair this replica");
            return Ok(());
        }
        let seq = self.update_seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("upd-{:016x}-{seq:08}-{}", self.clock.now(), u.node);
        let bytes = bincode::serde::encode_to_vec(&u, bincode_config()).map_err(std::io::Error::other)?;
        write_durable(dir, &name, &bytes)?;
        self.counters.updates_logged.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Updates still waiting for a replica.
    pub fn pending_updates(&self) -> usize {
        std::fs::read_dir(&self.cfg.update_dir).map_or(0, |d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("upd-"))
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
            .filter(|n| n.starts_with("upd-"))
            .collect();
        names.sort();
        let view = self.view();
        let mut done = 0;
        for name in names {
            let path = dir.join(&name);
            let Ok(bytes) = std::fs::read(&path) else { continue };
            let u: PendingUpdate = match bincode::serde::decode_from_slice(&bytes, bincode_config()) {
                Ok((u, _)) => u,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "unreadable update dropped");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            if view.node(placement::NodeId(u.node)).is_none() && view.epoch() > 0 {
                // The node left the cluster, and its copies may have moved
                // on meanwhile (repair, drain): the deletions go to whoever
                // holds those messages now (logged again for them if they
                // do not answer), then this entry goes.
                if self.redirect_deletions(&u.user, u.tombs).await {
                    let _ = std::fs::remove_file(&path);
                    done += 1;
                }
                continue;
            }
            if !is_live(&view, u.node) {
                continue;
            }
            let req = Request::Delete {
                user: u.user.clone(),
                tombs: u.tombs,
            };
            if self.call(u.node, req).await.is_ok() {
                let _ = std::fs::remove_file(&path);
                done += 1;
                self.counters.updates_replayed.fetch_add(1, Ordering::Relaxed);
            }
        }
        done
    }
}

impl<N: Network> Replicator<N> {
    /// Sends deletions meant for a node that left to the nodes that hold
    /// those messages now; whether each of them took them or logged them
    /// for later. Every live node is asked for its listing (not only those
    /// the user's mail map names: a copy moved while the map was being
    /// rebuilt must not keep a deleted message alive); this is rare, only
    /// when a node leaves with deletions still owed to it.
    async fn redirect_deletions(&self, user: &str, tombs: Vec<Tombstone>) -> bool {
        let ids: std::collections::BTreeSet<_> = tombs.iter().map(|t| t.id).collect();
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
            let req = Request::Delete {
                user: user.to_owned(),
                tombs: tombs.clone(),
            };
            if self.call(node, req).await.is_err()
                && self
                    .log_update(PendingUpdate {
                        node,
                        user: user.to_owned(),
                        tombs: tombs.clone(),
                    })
                    .is_err()
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
