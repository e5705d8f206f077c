//! [`Membership`]: one node's Raft, wired to its storage and transport, and
//! the operations the node calls: start, initialize or join, membership
//! changes, writes (forwarded to the leader), local reads, and the server
//! side of the Raft wire ([`Membership::handle`]).
//!
//! # Backpressure
//! At most [`WRITES_IN_FLIGHT_MAX`] writes of this node wait for commit at
//! once; more wait for a slot within their deadline. Every write, join and
//! membership change has one deadline (`write_timeout_ms`) that covers
//! finding the leader, forwarding, retries and commit.
//!
//! # Shutdown
//! [`Membership::shutdown`] stops the Raft core and waits for it; the
//! storage files are closed (and the folder lock released) when it returns
//! and the last handle is dropped. The node unregisters its server side
//! first, so no message arrives at a stopped Raft.
//!
//! Files: this one (start, the API, writes); `forward.rs` (requests to the
//! leader, retried within their deadline, and the leader's side);
//! `raft_directory.rs` ([`RaftDirectory`]).

mod forward;
mod raft_directory;

pub use raft_directory::RaftDirectory;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, SnapshotPolicy};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::codec;
use crate::command::{ClientId, Command, CommandError, Request, Response};
use crate::formats::FEATURE_LEVEL_MAX;
use crate::network::{LeaderError, LeaderReply, LeaderRequest, NetworkFactory, RaftMessage, RaftReply, Transport};
use crate::store::{self, LogStore, Shared, StateMachineStore};
use crate::types::{Raft, RaftMetrics};
use crate::view::{ClusterView, NodeInfo, NodeState};

/// Largest encoded request one log entry may carry. Directory commands are
/// a few hundred bytes; this leaves room and keeps an AppendEntries of
/// [`MAX_PAYLOAD_ENTRIES`] entries within [`codec::MESSAGE_BYTES_MAX`].
pub const ENTRY_BYTES_MAX: usize = 64 << 10;
/// Entries per AppendEntries: 64 × 64 KiB = 4 MiB at most.
pub const MAX_PAYLOAD_ENTRIES: u64 = 64;
/// Snapshot chunk per InstallSnapshot message.
pub const SNAPSHOT_CHUNK_BYTES: u64 = 1 << 20;
/// Writes of this node waiting for commit at once. Below
/// `command::SESSION_RESPONSES_MAX`, so a retried write always finds its
/// answer in the leader's dedup window.
pub const WRITES_IN_FLIGHT_MAX: usize = 64;
/// Attempts of one forwarded request (besides its deadline).
const FORWARD_ATTEMPTS_MAX: u32 = 64;
/// Backoff between attempts: doubles from min to max.
const RETRY_BACKOFF_MS_MIN: u64 = 10;
const RETRY_BACKOFF_MS_MAX: u64 = 400;
/// How long one attempt waits for a leader to be known before trying again.
const LEADER_WAIT_MS_MAX: u64 = 1_000;

/// Timing and size settings. The defaults suit a LAN cluster; tests use
/// shorter timeouts.
#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub cluster_name: String,
    pub heartbeat_interval_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Deadline of a write, join or membership change, all retries included.
    pub write_timeout_ms: u64,
    /// Build a snapshot after this many entries since the last one.
    pub snapshot_logs_since_last: u64,
    /// Entries kept in the log behind a snapshot, for slow followers.
    pub logs_kept_after_snapshot: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            cluster_name: "quill".into(),
            heartbeat_interval_ms: 250,
            election_timeout_min_ms: 1_000,
            election_timeout_max_ms: 2_000,
            write_timeout_ms: 10_000,
            snapshot_logs_since_last: 5_000,
            logs_kept_after_snapshot: 1_000,
        }
    }
}

impl MembershipConfig {
    fn raft_config(&self) -> Result<openraft::Config, MembershipError> {
        let c = openraft::Config {
            cluster_name: self.cluster_name.clone(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            // One chunk per message; allow a slow link a second for it.
            install_snapshot_timeout: self.election_timeout_min_ms.max(1_000),
            max_payload_entries: MAX_PAYLOAD_ENTRIES,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_logs_since_last),
            snapshot_max_chunk_size: SNAPSHOT_CHUNK_BYTES,
            max_in_snapshot_log_to_keep: self.logs_kept_after_snapshot,
            ..openraft::Config::default()
        };
        c.validate().map_err(|e| MembershipError::Config(e.to_string()))
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("raft storage in {}: {source}", path.display())]
    Storage { path: PathBuf, source: std::io::Error },
    #[error("raft config: {0}")]
    Config(String),
    #[error("raft stopped: {0}")]
    Fatal(String),
    #[error("not committed within {waited_ms} ms (no leader or no quorum)")]
    Timeout { waited_ms: u64 },
    #[error("request of {bytes} bytes; at most {ENTRY_BYTES_MAX}")]
    TooLarge { bytes: usize },
    #[error("refused: {0}")]
    Refused(String),
    #[error("node id {0} does not match this node")]
    WrongId(u64),
}

/// One node's membership: its Raft, storage and transport. Cheap to clone.
#[derive(Clone)]
pub struct Membership {
    inner: Arc<Inner>,
}

struct Inner {
    id: u64,
    raft: Raft,
    transport: Arc<dyn Transport>,
    shared: Arc<Shared>,
    view_rx: watch::Receiver<Arc<ClusterView>>,
    client: ClientId,
    next_serial: AtomicU64,
    writes: Semaphore,
    write_timeout: Duration,
    /// `state_bytes`' last count.
    state_size: std::sync::Mutex<Option<StateSize>>,
}

/// A count of the state's encoded bytes: applied up to, when, how long it
/// took, the bytes.
type StateSize = (Option<crate::types::LogId>, std::time::Instant, Duration, u64);

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl Membership {
    /// Opens the Raft folder `dir` (log, vote, snapshot) and starts this
    /// node's Raft. A node with state rejoins its cluster by itself; a new
    /// one waits for [`Membership::initialize`] (first node) or to be added
    /// by the leader ([`Membership::join`]).
    pub async fn start(
        id: u64,
        dir: &Path,
        config: MembershipConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Membership, MembershipError> {
        let raft_config = Arc::new(config.raft_config()?);
        let d = dir.to_path_buf();
        let opened = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            let format = store::check_format(&d)?;
            tracing::info!(format, "raft folder opened");
            let log = LogStore::open(&d)?;
            let sm = StateMachineStore::open(&d)?;
            // After the log's folder lock: no other process bumps it too.
            let incarnation = store::next_incarnation(&d)?;
            Ok((log, sm, incarnation))
        })
        .await
        .map_err(|e| MembershipError::Fatal(e.to_string()))?;
        let (log, sm, incarnation) = opened.map_err(|source| MembershipError::Storage {
            path: dir.to_path_buf(),
            source,
        })?;
        let shared = sm.shared();
        // Before Raft replays the log: entries of an earlier run claim
        // nothing (their sessions are gone).
        shared.set_claimer(ClientId { node: id, incarnation });
        let view_rx = shared.subscribe();
        let network = NetworkFactory {
            transport: transport.clone(),
            self_id: id,
        };
        let raft = Raft::new(id, raft_config, network, log, sm)
            .await
            .map_err(|e| MembershipError::Fatal(e.to_string()))?;
        tracing::info!(node = id, incarnation, "membership started");
        Ok(Membership {
            inner: Arc::new(Inner {
                id,
                raft,
                transport,
                shared,
                view_rx,
                client: ClientId { node: id, incarnation },
                next_serial: AtomicU64::new(0),
                writes: Semaphore::new(WRITES_IN_FLIGHT_MAX),
                write_timeout: config.write_timeout(),
                state_size: std::sync::Mutex::new(None),
            }),
        })
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The openraft handle, for metrics and tests.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    pub fn metrics(&self) -> watch::Receiver<RaftMetrics> {
        self.inner.raft.metrics()
    }

    /// The leader this node believes in.
    pub fn leader(&self) -> Option<u64> {
        self.inner.raft.metrics().borrow().current_leader
    }

    /// Whether this node has been in touch with a majority lately: as
    /// leader, a quorum acknowledged it within `within`; as follower, it
    /// knows a leader (a follower cut off from the leader stops knowing
    /// one when its election timer fires). Work that must not run on two
    /// nodes at once (an outbound queue shard) stops on a node that fails
    /// this: a node on the minority side of a partition, or a deposed
    /// leader that has not heard of it yet.
    pub fn in_quorum(&self, within: std::time::Duration) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        match m.current_leader {
            Some(l) if l == self.inner.id => m
                .millis_since_quorum_ack
                .is_some_and(|ms| u128::from(ms) < within.as_millis()),
            Some(_) => true,
            None => false,
        }
    }

    /// The local view (as of the last applied entry).
    pub fn view(&self) -> Arc<ClusterView> {
        self.inner.view_rx.borrow().clone()
    }

    /// Every new view, as it is applied on this node.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.inner.view_rx.clone()
    }

    /// The directory over this Raft: local reads, writes through the leader.
    pub fn directory(&self) -> RaftDirectory {
        RaftDirectory { m: self.clone() }
    }

    /// Starts a new cluster with this node as its only voter (once; a no-op
    /// when this node already has Raft state), and puts `me` in the view.
    pub async fn initialize(&self, me: NodeInfo) -> Result<(), MembershipError> {
        if me.id != self.inner.id {
            return Err(MembershipError::WrongId(me.id));
        }
        let members = BTreeMap::from([(me.id, BasicNode::new(&me.addrs.cluster))]);
        match self.inner.raft.initialize(members).await {
            Ok(()) => tracing::info!(node = me.id, "new cluster initialized"),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
            Err(e) => return Err(MembershipError::Refused(e.to_string())),
        }
        if self.view().node(me.id).is_none() {
            expect_ok(self.write(Command::AddNode(me)).await?)?;
        }
        // A cluster this release founds has never had a node of an older
        // release: it runs at the newest level from the start.
        if self.feature_level() < FEATURE_LEVEL_MAX && self.view().nodes.len() == 1 {
            self.raise_feature_level(FEATURE_LEVEL_MAX).await?;
        }
        Ok(())
    }

    /// The feature level the cluster runs at, as applied here.
    pub fn feature_level(&self) -> u32 {
        self.inner.shared.read().state.feature_level
    }

    /// The cluster settings as applied here.
    pub fn settings(&self) -> crate::settings::Settings {
        self.inner.shared.read().state.settings.clone()
    }

    /// The settings' change counter (cheap: to notice a change).
    pub fn settings_version(&self) -> u64 {
        self.inner.shared.read().state.settings.version
    }

    /// Commits a setting (`None`: unset); the refusal if the cluster does
    /// not take it.
    pub async fn set_setting(&self, key: String, value: Option<String>) -> Result<(), String> {
        match self.write(crate::command::Command::SetSetting { key, value }).await {
            Ok(crate::command::Response { result: Ok(()), .. }) => Ok(()),
            Ok(crate::command::Response { result: Err(e), .. }) => Err(e.to_string()),
            Err(e) => Err(format!("not committed: {e}")),
        }
    }

    /// The cluster's DKIM keys as applied here (with their private keys:
    /// for signing, never for showing).
    pub fn dkim_keys(&self) -> crate::dkim::DkimKeys {
        self.inner.shared.read().state.dkim.clone()
    }

    /// The DKIM keys' change counter (cheap: to notice a change).
    pub fn dkim_version(&self) -> u64 {
        self.inner.shared.read().state.dkim.version
    }

    /// Commits a change to the DKIM keys; the refusal if the cluster does
    /// not take it.
    pub async fn write_dkim(&self, c: crate::dkim::DkimCommand) -> Result<(), String> {
        match self.write(Command::Dkim(c)).await {
            Ok(crate::command::Response { result: Ok(()), .. }) => Ok(()),
            Ok(crate::command::Response { result: Err(e), .. }) => Err(e.to_string()),
            Err(e) => Err(format!("not committed: {e}")),
        }
    }

    /// The blocklists' change counter (cheap: to notice a change).
    pub fn blocklists_version(&self) -> u64 {
        self.inner.shared.read().state.blocklists.version
    }

    /// Reads the blocklists and access rules as applied here, under the
    /// state's read lock (keep `f` short: it holds up applying entries).
    pub fn with_blocklists<R>(&self, f: impl FnOnce(&crate::blocklist::Blocklists) -> R) -> R {
        f(&self.inner.shared.read().state.blocklists)
    }

    /// Commits a blocklist or access-rule change; the refusal if the
    /// cluster does not take it.
    pub async fn blocklist_write(&self, c: crate::blocklist::BlocklistCommand) -> Result<(), String> {
        match self.write(Command::Blocklist(c)).await {
            Ok(crate::command::Response { result: Ok(()), .. }) => Ok(()),
            Ok(crate::command::Response { result: Err(e), .. }) => Err(e.to_string()),
            Err(e) => Err(format!("not committed: {e}")),
        }
    }

    /// The size of the replicated state as a snapshot of it would be (the
    /// same on every node that has applied the same entries): what must
    /// stay bounded by the cluster's size, not its mail. Encodes the state
    /// into a counter (under the read lock, nothing kept): for status and
    /// scrapes, not hot paths. Counted again only when entries were
    /// applied since, and then no sooner than ten times the last count's
    /// own time after it (a directory of 10 million users takes seconds to
    /// count: scrapes must not keep a core busy and applying waiting).
    pub fn state_bytes(&self) -> u64 {
        struct Count(u64);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len() as u64;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut cached = self.inner.state_size.lock().unwrap_or_else(|p| p.into_inner());
        let shared = self.inner.shared.read();
        if let Some((applied, at, took, bytes)) = *cached
            && (applied == shared.last_applied || at.elapsed() < took * 10)
        {
            return bytes;
        }
        let started = std::time::Instant::now();
        let mut n = Count(0);
        let bytes = crate::formats::encode_state_into(&shared.state, &mut n).map_or(0, |()| n.0);
        *cached = Some((shared.last_applied, started, started.elapsed(), bytes));
        bytes
    }

    /// Raises the cluster's feature level to `level` (at most
    /// [`FEATURE_LEVEL_MAX`]; never lowers it). The caller has checked
    /// that every node runs a release that supports it: a node that does
    /// not cannot read what is written from then on.
    pub async fn raise_feature_level(&self, level: u32) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::SetFeatureLevel { level }).await?)?;
        tracing::info!(level, "cluster feature level raised");
        Ok(())
    }

    /// Joins a running cluster through any member's cluster address: the
    /// leader adds this node as a learner and to the view. Idempotent.
    pub async fn join(&self, seed_addr: &str, me: NodeInfo) -> Result<(), MembershipError> {
        if me.id != self.inner.id {
            return Err(MembershipError::WrongId(me.id));
        }
        self.to_leader(LeaderRequest::Join(me), Some(seed_addr))
            .await
            .map(|_| ())
    }

    /// Adds a node as a learner and to the view (from any member).
    pub async fn add_learner(&self, node: NodeInfo) -> Result<(), MembershipError> {
        self.to_leader(LeaderRequest::Join(node), None).await.map(|_| ())
    }

    /// Makes exactly `voters` the Raft voters; the others stay learners.
    pub async fn change_membership(&self, voters: BTreeSet<u64>) -> Result<(), MembershipError> {
        self.to_leader(LeaderRequest::SetVoters(voters), None).await.map(|_| ())
    }

    /// Takes a node out of the voters, of Raft and of the view.
    pub async fn remove_node(&self, id: u64) -> Result<(), MembershipError> {
        self.to_leader(LeaderRequest::RemoveNode(id), None).await.map(|_| ())
    }

    /// Marks a node up, down or draining (an operator's decision).
    pub async fn set_node_state(&self, id: u64, state: NodeState) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::SetNodeState { id, state }).await?)
    }

    /// Commits the failure detector's verdict, decided while this node led
    /// in `term` (see [`Command::Verdict`]: refused if committed in another
    /// term).
    pub async fn set_node_verdict(&self, id: u64, state: NodeState, term: u64) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::Verdict { id, state, term }).await?)
    }

    /// The cluster-wide TLS certificates, as of the last applied entry.
    pub fn tls_certs(&self) -> crate::command::TlsCerts {
        self.inner.shared.read().state.tls.clone()
    }

    /// What [`Membership::tls_certs`] holds moved when this did.
    pub fn tls_version(&self) -> u64 {
        self.inner.shared.read().state.tls.version
    }

    /// Stores a client TLS certificate cluster-wide (checked by the caller).
    pub async fn set_tls_cert(&self, name: String, cert: crate::command::StoredCert) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::SetTlsCert { name, cert }).await?)
    }

    pub async fn remove_tls_cert(&self, name: String) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::RemoveTlsCert { name }).await?)
    }

    /// Numbers `ids` in sequence `name` (those numbered keep theirs) and
    /// returns once the entry is applied here: read them with
    /// [`Membership::with_sequence`].
    pub async fn assign_numbers(&self, name: String, ids: Vec<[u8; 16]>) -> Result<(), MembershipError> {
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs().min(u64::from(u32::MAX)) as u32);
        expect_ok(self.write(Command::AssignNumbers { name, ids, now_secs }).await?)
    }

    /// Several assignments in one entry (see [`Command::AssignMany`]): the
    /// error, if any, is the first item's that was refused; the others are
    /// applied all the same.
    pub async fn assign_many(&self, items: Vec<(String, Vec<[u8; 16]>)>) -> Result<(), MembershipError> {
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs().min(u64::from(u32::MAX)) as u32);
        expect_ok(self.write(Command::AssignMany { items, now_secs }).await?)
    }

    pub async fn forget_numbers(&self, name: String, ids: Vec<[u8; 16]>) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::ForgetNumbers { name, ids }).await?)
    }

    pub async fn drop_sequence(&self, name: String) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::DropSequence { name }).await?)
    }

    /// Binds names to ids in `scope` (see [`crate::names::Names::bind`]).
    pub async fn bind_names(&self, scope: String, items: Vec<(String, [u8; 16])>) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::BindNames { scope, items }).await?)
    }

    /// Removes names bound to the ids given (see [`crate::names::Names::unbind`]).
    pub async fn unbind_names(&self, scope: String, items: Vec<(String, [u8; 16])>) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::UnbindNames { scope, items }).await?)
    }

    /// Renames at once (see [`crate::names::Names::rename`]).
    pub async fn rename_names(
        &self,
        scope: String,
        moves: Vec<(String, [u8; 16], String)>,
    ) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::RenameNames { scope, moves }).await?)
    }

    /// The names of `scope` as of the last entry applied here.
    pub fn names(&self, scope: &str) -> std::collections::BTreeMap<String, [u8; 16]> {
        self.inner
            .shared
            .read()
            .state
            .names
            .get(scope)
            .cloned()
            .unwrap_or_default()
    }

    /// Reads sequence `name` as of the last entry applied here (under the
    /// state's lock: keep `f` short).
    pub fn with_sequence<R>(&self, name: &str, f: impl FnOnce(Option<&crate::sequence::Sequence>) -> R) -> R {
        f(self.inner.shared.read().state.sequences.get(name))
    }

    /// Reads sequence `name` and its mod-sequences together, as of the
    /// last entry applied here (under the state's lock: keep `f` short).
    pub fn with_numbers<R>(
        &self,
        name: &str,
        f: impl FnOnce(Option<&crate::sequence::Sequence>, Option<&crate::modseq::FolderModSeqs>) -> R,
    ) -> R {
        let d = self.inner.shared.read();
        f(d.state.sequences.get(name), d.state.modseqs.get(name))
    }

    /// One change each to the messages of several folders (see
    /// [`Command::Touch`]); refused below feature level 3.
    pub async fn touch_many(&self, items: Vec<(String, Vec<[u8; 16]>)>) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::Touch { items }).await?)
    }

    /// Defines IMAP keywords for folder (sequence) `name` (see
    /// [`crate::keywords`]); refused below feature level 3.
    pub async fn define_keywords(&self, name: String, keywords: Vec<String>) -> Result<(), MembershipError> {
        expect_ok(self.write(Command::DefineKeywords { name, keywords }).await?)
    }

    /// The keywords folder (sequence) `name` defines, as of the last entry
    /// applied here.
    pub fn folder_keywords(&self, name: &str) -> Vec<String> {
        let d = self.inner.shared.read();
        d.state
            .keywords
            .get(name)
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Takes this node's `\Recent` claims on `ids` of sequence `name`
    /// (see [`crate::recent`]): the ids returned are recent to the caller
    /// alone.
    pub fn take_recent(&self, name: &str, ids: &[[u8; 16]]) -> Vec<[u8; 16]> {
        self.inner.shared.recent().take(name, ids)
    }

    /// How many of `ids` of `name` this node claims as recent, untaken.
    pub fn count_recent(&self, name: &str, ids: &[[u8; 16]]) -> usize {
        self.inner.shared.recent().count(name, ids)
    }

    /// The term this node leads in, if it is the leader now.
    pub fn leading_term(&self) -> Option<u64> {
        let m = self.inner.raft.metrics();
        let m = m.borrow();
        (m.current_leader == Some(self.inner.id)).then_some(m.current_term)
    }

    /// Commits a command through the leader and returns its response once
    /// it is applied there (refused commands are committed no-ops: see
    /// [`Response::result`]).
    pub async fn write(&self, command: Command) -> Result<Response, MembershipError> {
        let (needs, runs) = (command.feature_level(), self.feature_level());
        if needs > runs && !matches!(command, Command::SetFeatureLevel { .. }) {
            return Err(MembershipError::Refused(format!(
                "this change needs feature level {needs}, the cluster runs at {runs}: once every node runs \
                 a release that has it, `quill admin cluster upgrade-finish` raises the level"
            )));
        }
        let deadline = Instant::now() + self.inner.write_timeout;
        let _slot = tokio::time::timeout_at(deadline, self.inner.writes.acquire())
            .await
            .map_err(|_| self.timeout_error())?
            .map_err(|e| MembershipError::Fatal(e.to_string()))?;
        let req = Request {
            client: self.inner.client,
            serial: self.inner.next_serial.fetch_add(1, Ordering::Relaxed),
            command,
        };
        let bytes = codec::encode(&req)
            .map_err(|e| MembershipError::Fatal(e.to_string()))?
            .len();
        if bytes > ENTRY_BYTES_MAX {
            return Err(MembershipError::TooLarge { bytes });
        }
        let (response, log_index) = match self.to_leader_until(LeaderRequest::Write(req), None, deadline).await? {
            LeaderReply::Written { response, log_index } => (response, log_index),
            LeaderReply::Done => return Err(MembershipError::Fatal("a write answered as a membership change".into())),
        };
        // Committed. Wait (within the deadline) until applied here too, so
        // a read on this node right after sees the write.
        let left = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = self
            .inner
            .raft
            .wait(Some(left))
            .applied_index_at_least(Some(log_index), "the write applied locally")
            .await
        {
            tracing::warn!(node = self.inner.id, log_index, "committed, not yet applied here: {e}");
        }
        Ok(response)
    }

    /// The server side of the Raft wire: the node's listener calls this for
    /// every message received from another node and sends back the reply.
    pub async fn handle(&self, msg: RaftMessage) -> RaftReply {
        let raft = &self.inner.raft;
        match msg {
            RaftMessage::AppendEntries(r) => RaftReply::AppendEntries(raft.append_entries(r).await),
            RaftMessage::Vote(r) => RaftReply::Vote(raft.vote(r).await),
            RaftMessage::InstallSnapshot(r) => RaftReply::InstallSnapshot(raft.install_snapshot(r).await),
            RaftMessage::Leader(req) => {
                let deadline = Instant::now() + self.inner.write_timeout;
                RaftReply::Leader(self.serve(req, deadline).await)
            }
        }
    }

    /// Stops this node's Raft and waits for it.
    pub async fn shutdown(&self) -> Result<(), MembershipError> {
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| MembershipError::Fatal(e.to_string()))
    }
}

fn expect_ok(r: Response) -> Result<(), MembershipError> {
    r.result.map_err(|e| MembershipError::Refused(e.to_string()))
}
