//! The Raft state machine: the view and the directory in memory, snapshots
//! on disk.
//!
//! Applying an entry changes only memory; what is durable is the log (see
//! `log_store`) and the snapshot (`super::snapshot`: the encoded
//! [`ClusterState`] in a file of its own, named with its hash by
//! `snapshot.meta`, replaced atomically; never in memory whole). On start
//! the state is the snapshot's, and openraft re-applies the committed log
//! after it.
//! The state is encoded in the format of the feature level it runs at,
//! and read in any format this release knows ([`crate::formats`]).
//!
//! Readers (the directory, the view) take a read lock that is never held
//! across an await or any I/O.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes).
#![allow(clippy::result_large_err)]

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder};
use tokio::sync::watch;

use crate::command::{ClientId, ClusterState, Command, CommittedBy, Request, Response};
use crate::recent::RecentClaims;
use crate::store::FormatMark;
use crate::store::snapshot::{self, SnapshotData, Sum};
use crate::types::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::view::ClusterView;

/// What the state machine holds.
#[derive(Debug, Default)]
pub(crate) struct SmData {
    pub(crate) last_applied: Option<LogId>,
    pub(crate) last_membership: StoredMembership,
    pub(crate) state: ClusterState,
}

/// State shared between the state machine (writer) and local readers.
#[derive(Debug)]
pub(crate) struct Shared {
    data: RwLock<SmData>,
    view_tx: watch::Sender<Arc<ClusterView>>,
    /// Serializes snapshot file writes; holds the last written snapshot's
    /// last log id, so an older build never replaces a newer install.
    snapshot_written: Mutex<Option<LogId>>,
    /// This run's client id: entries it proposed that number messages
    /// leave their claims in `recent` (node-local, never replicated).
    claimer: Mutex<Option<ClientId>>,
    pub(crate) recent: Mutex<RecentClaims>,
}

impl Shared {
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, SmData> {
        self.data.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.view_tx.subscribe()
    }

    /// Entries of `client` (this run of this node) that number messages
    /// claim them as recent here (see [`crate::recent`]).
    pub(crate) fn set_claimer(&self, client: ClientId) {
        *self.claimer.lock().unwrap_or_else(|p| p.into_inner()) = Some(client);
    }

    pub(crate) fn recent(&self) -> std::sync::MutexGuard<'_, RecentClaims> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes the view if its epoch moved.
    fn publish(&self, view: &ClusterView) {
        self.view_tx.send_if_modified(|cur| {
            // Every change of the view moves its epoch.
            if cur.epoch == view.epoch {
                false
            } else {
                *cur = Arc::new(view.clone());
                true
            }
        });
    }
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageError::from_io_error(ErrorSubject::StateMachine, verb, io::Error::other(e.to_string()))
}

fn snap_err(meta: Option<&SnapshotMeta>, verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    StorageError::from_io_error(
        ErrorSubject::Snapshot(meta.map(|m| m.signature())),
        verb,
        io::Error::other(e.to_string()),
    )
}

/// The ids an entry asks to number that have no number yet, by sequence.
fn unnumbered(state: &ClusterState, req: &Request) -> Vec<(String, Vec<[u8; 16]>)> {
    let items: Vec<(&String, &Vec<[u8; 16]>)> = match &req.command {
        Command::AssignNumbers { name, ids, .. } => vec![(name, ids)],
        Command::AssignMany { items, .. } => items.iter().map(|(n, ids)| (n, ids)).collect(),
        _ => return Vec::new(),
    };
    items
        .into_iter()
        .map(|(name, ids)| {
            let seq = state.sequences.get(name);
            let new = ids
                .iter()
                .filter(|id| seq.is_none_or(|s| s.number(id).is_none()))
                .copied()
                .collect();
            (name.clone(), new)
        })
        .collect()
}

/// Claims the ids of `asked` the entry just applied numbered.
fn claim_numbered(state: &ClusterState, asked: Vec<(String, Vec<[u8; 16]>)>, recent: &mut RecentClaims) {
    for (name, ids) in asked {
        let Some(seq) = state.sequences.get(&name) else {
            continue;
        };
        recent.claim(&name, ids.into_iter().filter(|id| seq.number(id).is_some()));
    }
}

fn voters_of(m: &StoredMembership) -> BTreeSet<u64> {
    m.membership().voter_ids().collect()
}

/// The state machine store of one node.
#[derive(Debug, Clone)]
pub struct StateMachineStore {
    shared: Arc<Shared>,
    dir: PathBuf,
    format: Arc<FormatMark>,
}

impl StateMachineStore {
    /// Opens the state machine in `dir`, restoring the snapshot if there is
    /// one. Blocking: call it off the async threads.
    pub fn open(dir: &Path) -> io::Result<StateMachineStore> {
        std::fs::create_dir_all(dir)?;
        let mut data = SmData::default();
        let mut written = None;
        snapshot::remove_parts(dir);
        if let Some(found) = snapshot::find(dir)? {
            let state = found.state()?;
            let meta = found.meta();
            tracing::info!(
                snapshot = %meta,
                epoch = state.view.epoch,
                feature_level = state.feature_level,
                "state restored from snapshot"
            );
            data = SmData {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
                state,
            };
            written = meta.last_log_id;
        }
        let (view_tx, _) = watch::channel(Arc::new(data.state.view.clone()));
        Ok(StateMachineStore {
            shared: Arc::new(Shared {
                data: RwLock::new(data),
                view_tx,
                snapshot_written: Mutex::new(written),
                claimer: Mutex::new(None),
                recent: Mutex::new(RecentClaims::default()),
            }),
            dir: dir.to_path_buf(),
            format: Arc::new(FormatMark::open(dir)?),
        })
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Keeps the synced state in `part` as the snapshot of `meta`, unless a
    /// newer one is already on disk; the folder's format is raised to the
    /// snapshot's first.
    async fn persist(
        &self,
        meta: SnapshotMeta,
        part: std::path::PathBuf,
        sum: Sum,
        format: u32,
    ) -> Result<(), StorageError> {
        let shared = self.shared.clone();
        let dir = self.dir.clone();
        let mark = self.format.clone();
        tokio::task::spawn_blocking(move || {
            let mut written = shared.snapshot_written.lock().unwrap_or_else(|p| p.into_inner());
            if *written > meta.last_log_id {
                return Ok(());
            }
            mark.raise_to(format)
                .map_err(|e| snap_err(Some(&meta), ErrorVerb::Write, e))?;
            snapshot::keep(&dir, &meta, &part, sum, format).map_err(|e| snap_err(Some(&meta), ErrorVerb::Write, e))?;
            *written = meta.last_log_id;
            Ok(())
        })
        .await
        .map_err(|e| snap_err(None, ErrorVerb::Write, e))?
    }
}

/// The format a state is written in (the level it runs at; 1 up to 0.1.0).
fn format_of(state: &ClusterState) -> u32 {
    state.feature_level.max(1)
}

/// Builds a snapshot of the state as of the moment it is called.
#[derive(Debug)]
pub struct SnapshotBuilder {
    store: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (shared, dir) = (self.store.shared.clone(), self.store.dir.clone());
        // Encoded into a file under the read lock (applying waits; readers
        // do not), on a blocking thread.
        let (meta, part, sum, format) = tokio::task::spawn_blocking(move || {
            let d = shared.read();
            let (part, sum) = snapshot::write_part(&dir, &d.state).map_err(|e| sm_err(ErrorVerb::Write, e))?;
            let snapshot_id = match d.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.leader_id.node_id, l.index),
                None => "empty".to_owned(),
            };
            let meta = SnapshotMeta {
                last_log_id: d.last_applied,
                last_membership: d.last_membership.clone(),
                snapshot_id,
            };
            Ok::<_, StorageError>((meta, part, sum, format_of(&d.state)))
        })
        .await
        .map_err(|e| sm_err(ErrorVerb::Write, e))??;
        // Opened before it is kept (renamed): the handle outlives names.
        let data = SnapshotData::open(part.clone(), true).map_err(|e| snap_err(Some(&meta), ErrorVerb::Read, e))?;
        self.store.persist(meta.clone(), part, sum, format).await?;
        tracing::info!(snapshot = %meta, bytes = sum.len, "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(data),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let d = self.shared.read();
        Ok((d.last_applied, d.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut d = self.shared.data.write().unwrap_or_else(|p| p.into_inner());
        let d = &mut *d;
        let claimer = *self.shared.claimer.lock().unwrap_or_else(|p| p.into_inner());
        let mut replies = Vec::new();
        for entry in entries {
            d.last_applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response {
                    result: Ok(()),
                    epoch: d.state.view.epoch,
                },
                EntryPayload::Normal(req) => {
                    let by = CommittedBy {
                        term: entry.log_id.leader_id.term,
                        leader: entry.log_id.leader_id.node_id,
                    };
                    let unnumbered = (Some(req.client) == claimer).then(|| unnumbered(&d.state, &req));
                    let response = d.state.apply_request(&req, &voters_of(&d.last_membership), by);
                    if let Some(asked) = unnumbered.filter(|a| !a.is_empty()) {
                        claim_numbered(&d.state, asked, &mut self.shared.recent());
                    }
                    response
                }
                EntryPayload::Membership(m) => {
                    d.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    d.state.set_voters(&voters_of(&d.last_membership));
                    Response {
                        result: Ok(()),
                        epoch: d.state.view.epoch,
                    }
                }
            };
            replies.push(response);
        }
        self.shared.publish(&d.state.view);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder { store: self.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        let dir = self.dir.clone();
        let data = tokio::task::spawn_blocking(move || SnapshotData::receive_into(&dir))
            .await
            .map_err(|e| snap_err(None, ErrorVerb::Write, e))?
            .map_err(|e| snap_err(None, ErrorVerb::Write, e))?;
        Ok(Box::new(data))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        mut snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        snapshot
            .sync()
            .await
            .map_err(|e| snap_err(Some(meta), ErrorVerb::Write, e))?;
        let part = snapshot.path().to_path_buf();
        let m = meta.clone();
        let (state, sum) = tokio::task::spawn_blocking(move || snapshot::read_state(&part, None))
            .await
            .map_err(|e| snap_err(Some(&m), ErrorVerb::Read, e))?
            .map_err(|e| snap_err(Some(&m), ErrorVerb::Read, e))?;
        // Durable first, then visible.
        self.persist(meta.clone(), snapshot.path().to_path_buf(), sum, format_of(&state))
            .await?;
        drop(snapshot);
        let mut d = self.shared.data.write().unwrap_or_else(|p| p.into_inner());
        *d = SmData {
            last_applied: meta.last_log_id,
            last_membership: meta.last_membership.clone(),
            state,
        };
        self.shared.publish(&d.state.view);
        tracing::info!(snapshot = %meta, epoch = d.state.view.epoch, bytes = sum.len, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let dir = self.dir.clone();
        let found = tokio::task::spawn_blocking(move || -> io::Result<Option<Snapshot<TypeConfig>>> {
            let Some(found) = snapshot::find(&dir)? else {
                return Ok(None);
            };
            let meta = found.meta().clone();
            let data = found.data(&dir)?;
            Ok(Some(Snapshot {
                meta,
                snapshot: Box::new(data),
            }))
        })
        .await
        .map_err(|e| snap_err(None, ErrorVerb::Read, e))?
        .map_err(|e| snap_err(None, ErrorVerb::Read, e))?;
        Ok(found)
    }
}
