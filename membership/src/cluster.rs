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

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, SnapshotPolicy};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::codec;
use crate::command::{ClientId, Command, CommandError, Request, Response};
use crate::directory::{
    Directory, DirectoryCommand, DirectoryError, DirectoryFuture, Recipient, UserRecord, UserSummary,
};
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
}

impl std::fmt::Debug for Membership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// What a forwarding attempt learned.
enum Attempt {
    Done(LeaderReply),
    /// Try there next (or, `None`, wherever the leader is believed to be).
    Redirect(Option<(u64, String)>),
    Fail(MembershipError),
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

    fn timeout_error(&self) -> MembershipError {
        MembershipError::Timeout {
            waited_ms: self.inner.write_timeout.as_millis() as u64,
        }
    }

    async fn to_leader(&self, req: LeaderRequest, seed: Option<&str>) -> Result<LeaderReply, MembershipError> {
        let deadline = Instant::now() + self.inner.write_timeout;
        self.to_leader_until(req, seed, deadline).await
    }

    /// Sends `req` to the leader (serving it here when this node leads),
    /// following redirects and retrying transport failures until
    /// `deadline`. Retrying is safe: writes are deduplicated by the state
    /// machine, membership requests are idempotent.
    async fn to_leader_until(
        &self,
        req: LeaderRequest,
        seed: Option<&str>,
        deadline: Instant,
    ) -> Result<LeaderReply, MembershipError> {
        let mut target: Option<(u64, String)> = None;
        let mut backoff_ms = RETRY_BACKOFF_MS_MIN;
        for attempt in 1..=FORWARD_ATTEMPTS_MAX {
            if Instant::now() >= deadline {
                break;
            }
            let to = match (target.take(), seed) {
                (Some(t), _) => Some(t),
                // A joining node may know no leader yet: ask the seed at once.
                (None, Some(seed)) => leader_of(&self.inner.raft.metrics().borrow()).or(Some((0, seed.to_owned()))),
                (None, None) => self.known_leader(deadline).await,
            };
            let outcome = match &to {
                None => Attempt::Redirect(None),
                Some((id, _)) if *id == self.inner.id => match self.serve(req.clone(), deadline).await {
                    Ok(reply) => Attempt::Done(reply),
                    Err(e) => leader_error(e),
                },
                Some((id, addr)) => {
                    let call = self.inner.transport.call(*id, addr, RaftMessage::Leader(req.clone()));
                    match tokio::time::timeout_at(deadline, call).await {
                        Err(_) => break,
                        Ok(Ok(RaftReply::Leader(Ok(reply)))) => Attempt::Done(reply),
                        Ok(Ok(RaftReply::Leader(Err(e)))) => leader_error(e),
                        Ok(Ok(other)) => {
                            tracing::warn!(node = id, "leader request answered with {other:?}");
                            Attempt::Redirect(None)
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(attempt, "forward to the leader: {e}");
                            Attempt::Redirect(None)
                        }
                    }
                }
            };
            match outcome {
                Attempt::Done(reply) => return Ok(reply),
                Attempt::Fail(e) => return Err(e),
                Attempt::Redirect(Some(t)) if Some(&t) != to.as_ref() => target = Some(t),
                Attempt::Redirect(_) => {
                    // Nobody new to ask: give the cluster time to elect.
                    let wake = (Instant::now() + Duration::from_millis(backoff_ms)).min(deadline);
                    tokio::time::sleep_until(wake).await;
                    backoff_ms = (backoff_ms * 2).min(RETRY_BACKOFF_MS_MAX);
                }
            }
        }
        Err(self.timeout_error())
    }

    /// The leader this node knows of, waiting a little (bounded by
    /// `deadline`) for one to be elected.
    async fn known_leader(&self, deadline: Instant) -> Option<(u64, String)> {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(LEADER_WAIT_MS_MAX));
        let m = self
            .inner
            .raft
            .wait(Some(wait))
            .metrics(|m| m.current_leader.is_some(), "a known leader")
            .await
            .ok()?;
        leader_of(&m)
    }

    /// Serves a leader request here, if this node leads.
    async fn serve(&self, req: LeaderRequest, deadline: Instant) -> Result<LeaderReply, LeaderError> {
        let allowed_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        match tokio::time::timeout_at(deadline, self.serve_now(req)).await {
            Ok(r) => r,
            Err(_) => Err(LeaderError::Timeout { waited_ms: allowed_ms }),
        }
    }

    async fn serve_now(&self, req: LeaderRequest) -> Result<LeaderReply, LeaderError> {
        let raft = &self.inner.raft;
        match req {
            LeaderRequest::Write(r) => {
                let (response, log_index) = self.commit_at(r).await?;
                Ok(LeaderReply::Written { response, log_index })
            }
            LeaderRequest::Join(node) => {
                node.validate().map_err(|e| LeaderError::Refused(e.to_string()))?;
                // A new identity at the cluster address of a node that is
                // down: that machine came back with an empty (replaced)
                // disk. Its old identity is gone for good, and is removed
                // first, so that its copies are made again at once and no
                // ping to the address is taken for the old node's. (Only a
                // down one: a member naming a live node's address must not
                // push it out.)
                let view = self.view();
                let old: Vec<u64> = view
                    .nodes
                    .values()
                    .filter(|n| n.id != node.id && n.addrs.cluster == node.addrs.cluster)
                    .map(|n| n.id)
                    .collect();
                for id in old {
                    if view.node(id).is_some_and(|n| n.state != NodeState::Down) {
                        return Err(LeaderError::Refused(format!(
                            "node {id} at {} is not down: one address, one node",
                            node.addrs.cluster
                        )));
                    }
                    tracing::warn!(old = id, new = node.id, addr = %node.addrs.cluster, "a new identity at a down node's address (a replaced disk): removing the old one");
                    Box::pin(self.serve_now(LeaderRequest::RemoveNode(id))).await?;
                }
                raft.add_learner(node.id, BasicNode::new(&node.addrs.cluster), false)
                    .await
                    .map_err(|e| self.raft_error(e))?;
                let r = self.commit(self.own_request(Command::AddNode(node))).await?;
                r.result.map_err(|e| LeaderError::Refused(e.to_string()))?;
                Ok(LeaderReply::Done)
            }
            LeaderRequest::SetVoters(voters) => {
                raft.change_membership(voters, true)
                    .await
                    .map_err(|e| self.raft_error(e))?;
                Ok(LeaderReply::Done)
            }
            LeaderRequest::RemoveNode(id) => {
                let m = raft.metrics().borrow().clone();
                let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
                if voters.contains(&id) {
                    let rest: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != id).collect();
                    if rest.is_empty() {
                        return Err(LeaderError::Refused(format!("node {id} is the last voter")));
                    }
                    raft.change_membership(rest, false)
                        .await
                        .map_err(|e| self.raft_error(e))?;
                }
                if m.membership_config.membership().get_node(&id).is_some() {
                    raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await
                        .map_err(|e| self.raft_error(e))?;
                }
                let r = self.commit(self.own_request(Command::RemoveNode { id })).await?;
                match r.result {
                    Ok(()) | Err(CommandError::NoSuchNode(_)) => Ok(LeaderReply::Done),
                    Err(e) => Err(LeaderError::Refused(e.to_string())),
                }
            }
        }
    }

    async fn commit(&self, req: Request) -> Result<Response, LeaderError> {
        Ok(self.commit_at(req).await?.0)
    }

    /// Commits and applies `req`; returns its response and log index.
    async fn commit_at(&self, req: Request) -> Result<(Response, u64), LeaderError> {
        match self.inner.raft.client_write(req).await {
            Ok(resp) => Ok((resp.data, resp.log_id.index)),
            Err(e) => Err(self.raft_error(e)),
        }
    }

    fn own_request(&self, command: Command) -> Request {
        Request {
            client: self.inner.client,
            serial: self.inner.next_serial.fetch_add(1, Ordering::Relaxed),
            command,
        }
    }

    fn raft_error(&self, e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> LeaderError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => LeaderError::NotLeader {
                leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => LeaderError::Refused(e.to_string()),
            RaftError::Fatal(e) => LeaderError::Fatal(e.to_string()),
        }
    }
}

fn leader_of(m: &RaftMetrics) -> Option<(u64, String)> {
    let id = m.current_leader?;
    let node = m.membership_config.membership().get_node(&id)?;
    Some((id, node.addr.clone()))
}

fn leader_error(e: LeaderError) -> Attempt {
    match e {
        LeaderError::NotLeader { leader } => Attempt::Redirect(leader),
        // The leader's own deadline ran out: ours covers the retry.
        LeaderError::Timeout { .. } => Attempt::Redirect(None),
        LeaderError::Refused(s) => Attempt::Fail(MembershipError::Refused(s)),
        LeaderError::Fatal(s) => Attempt::Fail(MembershipError::Fatal(s)),
    }
}

fn expect_ok(r: Response) -> Result<(), MembershipError> {
    r.result.map_err(|e| MembershipError::Refused(e.to_string()))
}

/// The user directory kept by Raft: the same [`Directory`] trait as
/// [`crate::LocalDirectory`]. Reads are local (this node's applied state);
/// a write is forwarded to the leader when this node does not lead and
/// resolves once committed and applied there.
#[derive(Debug, Clone)]
pub struct RaftDirectory {
    m: Membership,
}

impl RaftDirectory {
    /// Commits a directory command. A refused command (unknown domain, user
    /// exists, …) is a committed no-op and returns its [`DirectoryError`];
    /// when no leader commits it in time: [`DirectoryError::Storage`].
    pub async fn write(&self, cmd: DirectoryCommand) -> Result<(), DirectoryError> {
        match self.m.write(Command::Directory(cmd)).await {
            Ok(Response { result: Ok(()), .. }) => Ok(()),
            Ok(Response {
                result: Err(CommandError::Directory(e)),
                ..
            }) => Err(e),
            Ok(Response { result: Err(e), .. }) => Err(DirectoryError::Storage(e.to_string())),
            Err(e) => Err(DirectoryError::Storage(format!("raft: {e}"))),
        }
    }
}

impl Directory for RaftDirectory {
    fn resolve(&self, address: &str) -> Recipient {
        self.m.inner.shared.read().state.directory.resolve(address)
    }

    fn user(&self, address: &str) -> Option<UserRecord> {
        self.m.inner.shared.read().state.directory.user(address)
    }

    fn domains(&self) -> Vec<String> {
        self.m.inner.shared.read().state.directory.domain_list()
    }

    fn users(&self) -> Vec<UserSummary> {
        self.m.inner.shared.read().state.directory.user_summaries()
    }

    fn postmaster_fallback(&self, domain: Option<&str>) -> Option<UserRecord> {
        self.m.inner.shared.read().state.directory.postmaster_fallback(domain)
    }

    fn apply(&self, cmd: DirectoryCommand) -> DirectoryFuture<'_> {
        Box::pin(self.write(cmd))
    }
}
