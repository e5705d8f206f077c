//! What a Raft log entry carries and the deterministic state machine that
//! applies it: the view and the directory, plus a small table that answers a
//! retried request with its first answer instead of applying it twice.
//!
//! Nothing here does I/O or reads a clock: the same entries give the same
//! state and the same responses on every node.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::directory::{DirectoryCommand, DirectoryError, DirectoryState};
use crate::view::{ClusterView, NODES_MAX, NodeError, NodeInfo, NodeState};

/// A change to the replicated state.
// Short-lived (built, encoded, applied): the size of the largest variant
// costs nothing worth a Box in every constructor.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// A directory write; refused ones are committed no-ops whose response
    /// carries the [`DirectoryError`].
    Directory(DirectoryCommand),
    /// A node joins (state up), or a known node rejoins with new details
    /// (name, addresses, weight, zone; its state becomes up). The voter flag
    /// in the argument is ignored: it follows the Raft membership.
    AddNode(NodeInfo),
    /// Failure detection (down / up) and drain (draining).
    SetNodeState {
        id: u64,
        state: NodeState,
    },
    /// The node leaves the view. Refused while it is still a Raft voter.
    RemoveNode {
        id: u64,
    },
    /// The failure detector's verdict on node `id` (up or down), decided by
    /// the leader of `term` from its own pings and the reports it checked
    /// with a ping of its own. Applied only if committed
    /// in that same term: a leader deposed between deciding and committing
    /// (paused, partitioned) would otherwise have its stale verdicts
    /// forwarded to, and committed by, the next leader. A `Down` verdict on
    /// the leader that commits it is refused too (it is alive: it is
    /// committing). Kept after the earlier variants so that they keep
    /// their tags.
    Verdict {
        id: u64,
        state: NodeState,
        term: u64,
    },
    /// Stores (or replaces) a client TLS certificate under `name`, served
    /// by every node (`quill admin tls set`). The node checked the pair
    /// before proposing it; every node checks it again before serving.
    SetTlsCert {
        name: String,
        cert: StoredCert,
    },
    RemoveTlsCert {
        name: String,
    },
    /// Numbers for ids in a named sequence (IMAP UIDs for message ids):
    /// see [`crate::sequence`]. `now_secs` is the proposer's clock, for a
    /// new sequence's validity.
    AssignNumbers {
        name: String,
        ids: Vec<[u8; 16]>,
        now_secs: u32,
    },
    ForgetNumbers {
        name: String,
        ids: Vec<[u8; 16]>,
    },
    DropSequence {
        name: String,
    },
    /// Several [`Command::AssignNumbers`] in one entry (a node batches the
    /// requests of its sessions): each is applied on its own, one refused
    /// does not stop the others; callers read their numbers back.
    AssignMany {
        items: Vec<(String, Vec<[u8; 16]>)>,
        now_secs: u32,
    },
    /// Named bindings (IMAP folders): see [`crate::names`].
    BindNames {
        scope: String,
        items: Vec<(String, [u8; 16])>,
    },
    UnbindNames {
        scope: String,
        items: Vec<(String, [u8; 16])>,
    },
    RenameNames {
        scope: String,
        moves: Vec<(String, [u8; 16], String)>,
    },
    /// Feature level 2: the cluster runs at `level` from this entry on
    /// (see [`crate::formats`]). Proposed once every node of the view runs
    /// a release that supports it (`quill admin cluster upgrade-finish`,
    /// or the leader by itself); never lowers the level.
    SetFeatureLevel {
        level: u32,
    },
    /// Feature level 3: IMAP keywords folder (sequence) `name` defines
    /// from now on (see [`crate::keywords`]); ignored for a sequence that
    /// does not exist.
    DefineKeywords {
        name: String,
        keywords: Vec<String>,
    },
    /// Feature level 3: aliases, domain aliases and catch-alls (see
    /// [`crate::routes`]).
    Routes(crate::routes::RoutesCommand),
    /// Feature level 3: a cluster setting set (`Some`) or unset (see
    /// [`crate::settings`]); the node checked the value.
    SetSetting {
        key: String,
        value: Option<String>,
    },
    /// Feature level 3: DKIM signing keys of the cluster's domains (see
    /// [`crate::dkim`]); the node generated the key.
    Dkim(crate::dkim::DkimCommand),
    /// Feature level 3: blocklists (loaded in chunks) and access rules
    /// (see [`crate::blocklist`]).
    Blocklist(crate::blocklist::BlocklistCommand),
    /// Feature level 3: one change each to the messages `ids` of folder
    /// (sequence) `name`, after their flags were written to their
    /// replicas: the folder's mod-sequence goes up and they take it (see
    /// [`crate::modseq`]). Ids not numbered, and sequences that do not
    /// exist, are skipped. Several folders in one entry (a node batches
    /// its sessions' changes).
    Touch {
        items: Vec<(String, Vec<[u8; 16]>)>,
    },
}

impl Command {
    /// The feature level that brought this command: a node of a release
    /// before it cannot decode it, so it is refused until the cluster runs
    /// at that level (by the proposer, and by the state machine, which
    /// makes it a committed no-op). `SetFeatureLevel` is what raises the
    /// level, so it is allowed at any.
    pub fn feature_level(&self) -> u32 {
        match self {
            Command::SetFeatureLevel { .. } => 2,
            Command::DefineKeywords { .. } => crate::keywords::KEYWORDS_FEATURE_LEVEL,
            Command::Routes(_) => crate::routes::ROUTES_FEATURE_LEVEL,
            Command::SetSetting { .. } => crate::settings::SETTINGS_FEATURE_LEVEL,
            Command::Dkim(_) => crate::dkim::DKIM_FEATURE_LEVEL,
            Command::Blocklist(_) => crate::blocklist::BLOCKLIST_FEATURE_LEVEL,
            Command::Touch { .. } => crate::modseq::MODSEQ_FEATURE_LEVEL,
            Command::Directory(DirectoryCommand::SetQuota { .. }) => crate::routes::ROUTES_FEATURE_LEVEL,
            _ => 1,
        }
    }
}

/// A client TLS certificate chain and its private key, PEM, as stored in
/// the replicated state (on every node's disk, like the rest of the state:
/// private to the node's data directory).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Certificates stored cluster-wide, at most.
pub const TLS_CERTS_MAX: usize = 32;
/// Longest certificate chain or key PEM (both fit one Raft entry).
pub const TLS_PEM_BYTES_MAX: usize = 24 * 1024;
/// Longest certificate name.
pub const TLS_NAME_BYTES_MAX: usize = 253;

/// The cluster-wide certificates and a counter moved by every change, so
/// that nodes notice a change without comparing them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsCerts {
    pub version: u64,
    pub certs: BTreeMap<String, StoredCert>,
}

/// Who committed a log entry: the term and leader of its log id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommittedBy {
    pub term: u64,
    pub leader: u64,
}

/// Who sent a request: a node, in one run of its process. `incarnation`
/// grows on every start of the node (it is kept in the node's Raft folder),
/// so serials of an earlier run are never mistaken for new ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ClientId {
    pub node: u64,
    pub incarnation: u64,
}

/// One log entry's application data: a command and who sent it, so that a
/// request retried after a lost answer is answered, not applied, again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub client: ClientId,
    /// Unique per client; need not arrive in order.
    pub serial: u64,
    pub command: Command,
}

/// Why a committed command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CommandError {
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error(transparent)]
    BadNode(#[from] NodeError),
    #[error("no such node: {0}")]
    NoSuchNode(u64),
    #[error("node {0} is a raft voter; remove it from the voters first")]
    NodeIsVoter(u64),
    #[error("the view is full ({NODES_MAX} nodes)")]
    TooManyNodes,
    /// A failure-detector verdict from an earlier term (its leader was
    /// deposed before it committed), or a `Down` verdict on the leader
    /// committing it.
    #[error("verdict on node {node} decided in term {decided}, committed in term {committed}: fenced")]
    StaleVerdict { node: u64, decided: u64, committed: u64 },
    /// A retry older than the dedup window, or from an earlier run of the
    /// client: it may have been applied, so it is not applied again.
    #[error("request {serial} of node {node} is too old to be answered")]
    Stale { node: u64, serial: u64 },
    #[error("bad TLS certificate: {0}")]
    BadTls(String),
    #[error("no TLS certificate named {0:?}")]
    NoSuchTlsCert(String),
    #[error(transparent)]
    Sequence(#[from] crate::sequence::SequenceError),
    #[error(transparent)]
    Name(#[from] crate::names::NameError),
    #[error(transparent)]
    Route(#[from] crate::routes::RouteError),
    #[error(transparent)]
    Setting(#[from] crate::settings::SettingsError),
    #[error(transparent)]
    Dkim(#[from] crate::dkim::DkimError),
    #[error(transparent)]
    Blocklist(#[from] crate::blocklist::BlocklistError),
    /// A command of a feature level the cluster does not run at, or a
    /// level this release does not know or that would lower it.
    #[error("feature level {asked}: the cluster runs at {current}, this release supports up to {supported}")]
    FeatureLevel { asked: u32, current: u32, supported: u32 },
}

/// The answer to one log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// `Err`: the command was committed but changed nothing.
    pub result: Result<(), CommandError>,
    /// The view epoch after this entry.
    pub epoch: u64,
}

/// How many answers are kept per client. A node keeps at most this many
/// writes in flight (see `WRITES_IN_FLIGHT_MAX`), so every retry of a live
/// request finds its answer.
pub const SESSION_RESPONSES_MAX: usize = 128;
/// How many clients are remembered; the lowest node id is dropped beyond.
/// One per node of the view is enough.
pub const SESSIONS_MAX: usize = NODES_MAX;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Session {
    incarnation: u64,
    /// Serials below this were answered and forgotten.
    floor_serial: u64,
    responses: BTreeMap<u64, Response>,
}

/// The whole replicated state: what a snapshot holds. Its encoding is
/// versioned by feature level: see [`crate::formats`] before adding a
/// field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub view: ClusterView,
    pub directory: DirectoryState,
    pub(crate) sessions: BTreeMap<u64, Session>,
    pub tls: TlsCerts,
    pub sequences: crate::sequence::Sequences,
    pub names: crate::names::Names,
    /// What the cluster's data may use: every node can read what is
    /// written at this level ([`crate::formats`]). 1 for a cluster
    /// founded by release 0.1.0, raised by [`Command::SetFeatureLevel`].
    pub feature_level: u32,
    /// Level 3: the IMAP keywords each folder defines.
    pub keywords: crate::keywords::FolderKeywords,
    /// Level 3: aliases, domain aliases, catch-alls, the SRS key.
    pub routes: crate::routes::Routes,
    /// Level 3: cluster settings.
    pub settings: crate::settings::Settings,
    /// Level 3: the DKIM signing keys of the cluster's domains.
    pub dkim: crate::dkim::DkimKeys,
    /// Level 3: blocklists and access rules.
    pub blocklists: crate::blocklist::Blocklists,
    /// Level 3: the IMAP folders' mod-sequences.
    pub modseqs: crate::modseq::ModSeqs,
}

impl Default for ClusterState {
    fn default() -> Self {
        ClusterState {
            view: ClusterView::default(),
            directory: DirectoryState::default(),
            sessions: BTreeMap::new(),
            tls: TlsCerts::default(),
            sequences: Default::default(),
            names: Default::default(),
            feature_level: crate::formats::FEATURE_LEVEL_MIN,
            keywords: Default::default(),
            routes: Default::default(),
            settings: Default::default(),
            dkim: Default::default(),
            blocklists: Default::default(),
            modseqs: Default::default(),
        }
    }
}

impl ClusterState {
    /// Applies one request, deduplicating retries. On error the view and
    /// directory are unchanged.
    pub fn apply_request(&mut self, req: &Request, voters: &BTreeSet<u64>, by: CommittedBy) -> Response {
        let ClientId { node, incarnation } = req.client;
        if let Some(s) = self.sessions.get(&node) {
            let stale = Response {
                result: Err(CommandError::Stale {
                    node,
                    serial: req.serial,
                }),
                epoch: self.view.epoch,
            };
            if incarnation < s.incarnation {
                return stale;
            }
            if incarnation == s.incarnation {
                if let Some(r) = s.responses.get(&req.serial) {
                    return r.clone();
                }
                if req.serial < s.floor_serial {
                    return stale;
                }
            }
        }
        let response = self.apply(&req.command, voters, by);
        if !self.sessions.contains_key(&node) && self.sessions.len() >= SESSIONS_MAX {
            self.sessions.pop_first();
        }
        let s = self.sessions.entry(node).or_default();
        if s.incarnation != incarnation {
            *s = Session {
                incarnation,
                ..Session::default()
            };
        }
        s.responses.insert(req.serial, response.clone());
        while s.responses.len() > SESSION_RESPONSES_MAX {
            let (oldest, _) = s.responses.pop_first().expect("non-empty");
            s.floor_serial = s.floor_serial.max(oldest + 1);
        }
        response
    }

    /// Applies one command. `voters` is the committed Raft voter set (for
    /// the voter flag of a joining node and the voter check on removal);
    /// `by` is the entry's term and leader (for the verdict fence).
    pub fn apply(&mut self, cmd: &Command, voters: &BTreeSet<u64>, by: CommittedBy) -> Response {
        let result = self.apply_inner(cmd, voters, by);
        Response {
            result,
            epoch: self.view.epoch,
        }
    }

    fn apply_inner(&mut self, cmd: &Command, voters: &BTreeSet<u64>, by: CommittedBy) -> Result<(), CommandError> {
        let refused = |asked| CommandError::FeatureLevel {
            asked,
            current: self.feature_level,
            supported: crate::formats::FEATURE_LEVEL_MAX,
        };
        if cmd.feature_level() > self.feature_level && !matches!(cmd, Command::SetFeatureLevel { .. }) {
            return Err(refused(cmd.feature_level()));
        }
        match cmd {
            Command::SetFeatureLevel { level } => {
                if *level < self.feature_level || *level > crate::formats::FEATURE_LEVEL_MAX {
                    return Err(refused(*level));
                }
                self.feature_level = *level;
            }
            Command::Directory(c) => self.apply_directory(c)?,
            Command::Routes(c) => self.routes.apply(c, &mut self.directory)?,
            Command::SetSetting { key, value } => self.settings.set(key, value.as_deref())?,
            Command::Dkim(c) => self.dkim.apply(c)?,
            Command::Blocklist(c) => self.blocklists.apply(c)?,
            Command::Touch { items } => self.touch(items)?,
            Command::AddNode(info) => {
                info.validate()?;
                if !self.view.nodes.contains_key(&info.id) && self.view.nodes.len() >= NODES_MAX {
                    return Err(CommandError::TooManyNodes);
                }
                let next = NodeInfo {
                    state: NodeState::Up,
                    voter: voters.contains(&info.id),
                    ..info.clone()
                };
                if self.view.nodes.get(&info.id) != Some(&next) {
                    self.view.nodes.insert(info.id, next);
                    self.view.epoch += 1;
                }
            }
            Command::SetNodeState { id, state } => self.set_state(*id, *state)?,
            Command::SetTlsCert { name, cert } => {
                let bad = |why: String| Err(CommandError::BadTls(why));
                if name.is_empty() || name.len() > TLS_NAME_BYTES_MAX || name.chars().any(|c| c.is_control()) {
                    return bad(format!("a name must be 1 to {TLS_NAME_BYTES_MAX} printable characters"));
                }
                if cert.cert_pem.len() > TLS_PEM_BYTES_MAX || cert.key_pem.len() > TLS_PEM_BYTES_MAX {
                    return bad(format!(
                        "certificate and key must each be at most {TLS_PEM_BYTES_MAX} bytes"
                    ));
                }
                if !self.tls.certs.contains_key(name) && self.tls.certs.len() >= TLS_CERTS_MAX {
                    return bad(format!(
                        "at most {TLS_CERTS_MAX} certificates are stored; remove one first"
                    ));
                }
                self.tls.certs.insert(name.clone(), cert.clone());
                self.tls.version += 1;
            }
            Command::RemoveTlsCert { name } => {
                if self.tls.certs.remove(name).is_none() {
                    return Err(CommandError::NoSuchTlsCert(name.clone()));
                }
                self.tls.version += 1;
            }
            Command::AssignNumbers { name, ids, now_secs } => self.assign_numbers(name, ids, *now_secs)?,
            Command::ForgetNumbers { name, ids } => self.forget_numbers(name, ids)?,
            Command::DropSequence { name } => {
                self.sequences.drop_sequence(name)?;
                self.keywords.drop_folder(name);
                self.modseqs.drop_folder(name);
            }
            Command::DefineKeywords { name, keywords } => {
                if self.sequences.get(name).is_some() {
                    self.keywords.define(name, keywords);
                }
            }
            Command::BindNames { scope, items } => self.names.bind(scope, items)?,
            Command::UnbindNames { scope, items } => self.names.unbind(scope, items)?,
            Command::RenameNames { scope, moves } => self.names.rename(scope, moves)?,
            Command::AssignMany { items, now_secs } => {
                let mut first = Ok(());
                for (name, ids) in items {
                    if let Err(e) = self.assign_numbers(name, ids, *now_secs)
                        && first.is_ok()
                    {
                        first = Err(e);
                    }
                }
                first?
            }
            Command::Verdict { id, state, term } => {
                if *term != by.term || (*state == NodeState::Down && *id == by.leader) {
                    return Err(CommandError::StaleVerdict {
                        node: *id,
                        decided: *term,
                        committed: by.term,
                    });
                }
                self.set_state(*id, *state)?
            }
            Command::RemoveNode { id } => {
                let n = self.view.nodes.get(id).ok_or(CommandError::NoSuchNode(*id))?;
                if n.voter || voters.contains(id) {
                    return Err(CommandError::NodeIsVoter(*id));
                }
                self.view.nodes.remove(id);
                self.sessions.remove(id);
                self.view.epoch += 1;
            }
        }
        Ok(())
    }

    /// A directory write, kept consistent with the routes: an alias
    /// domain is not added as a domain of its own, and a domain that
    /// aliases point into stays until they go.
    /// Whether numbering and expunges stamp mod-sequences (from the level
    /// that brought them: below it a node of the previous release applies
    /// the same entries without them).
    fn stamps(&self) -> bool {
        self.feature_level >= crate::modseq::MODSEQ_FEATURE_LEVEL
    }

    /// [`crate::sequence::Sequences::assign`], the ids it numbers stamped.
    fn assign_numbers(&mut self, name: &str, ids: &[[u8; 16]], now_secs: u32) -> Result<(), CommandError> {
        let new: Vec<[u8; 16]> = match self.sequences.get(name) {
            _ if !self.stamps() => Vec::new(),
            Some(seq) => ids.iter().filter(|id| seq.number(id).is_none()).copied().collect(),
            None => ids.to_vec(),
        };
        self.sequences.assign(name, ids, now_secs)?;
        self.modseqs.stamp(name, &new);
        Ok(())
    }

    /// [`crate::sequence::Sequences::forget`]; an expunge is a change.
    fn forget_numbers(&mut self, name: &str, ids: &[[u8; 16]]) -> Result<(), CommandError> {
        let numbered: Vec<[u8; 16]> = match self.sequences.get(name) {
            Some(seq) if self.stamps() => ids.iter().filter(|id| seq.number(id).is_some()).copied().collect(),
            _ => Vec::new(),
        };
        self.sequences.forget(name, ids)?;
        self.modseqs.forget(name, &numbered);
        Ok(())
    }

    /// [`Command::Touch`]: at most a command's worth of ids in all.
    fn touch(&mut self, items: &[(String, Vec<[u8; 16]>)]) -> Result<(), CommandError> {
        let total: usize = items.iter().map(|(_, ids)| ids.len()).sum();
        if total > crate::sequence::IDS_PER_COMMAND_MAX {
            return Err(crate::sequence::SequenceError::TooManyIds.into());
        }
        for (name, ids) in items {
            let Some(seq) = self.sequences.get(name) else { continue };
            let numbered: Vec<[u8; 16]> = ids.iter().filter(|id| seq.number(id).is_some()).copied().collect();
            self.modseqs.stamp(name, &numbered);
        }
        Ok(())
    }

    fn apply_directory(&mut self, c: &DirectoryCommand) -> Result<(), CommandError> {
        match c {
            DirectoryCommand::AddDomain { domain } if self.routes.is_domain_alias(domain) => {
                Err(DirectoryError::DomainExists(domain.to_ascii_lowercase()).into())
            }
            DirectoryCommand::RemoveDomain { domain } if self.routes.blocks_domain_removal(domain) => {
                Err(DirectoryError::DomainNotEmpty(domain.to_ascii_lowercase()).into())
            }
            DirectoryCommand::RemoveDomain { domain } => {
                self.directory.apply(c)?;
                self.routes.domain_removed(domain);
                Ok(())
            }
            DirectoryCommand::RemoveUser { address } => {
                self.directory.apply(c)?;
                self.routes.user_removed(address);
                Ok(())
            }
            c => Ok(self.directory.apply(c)?),
        }
    }

    fn set_state(&mut self, id: u64, state: NodeState) -> Result<(), CommandError> {
        let n = self.view.nodes.get_mut(&id).ok_or(CommandError::NoSuchNode(id))?;
        if n.state != state {
            n.state = state;
            self.view.epoch += 1;
        }
        Ok(())
    }

    /// Follows a committed Raft membership: sets the voter flags.
    pub fn set_voters(&mut self, voters: &BTreeSet<u64>) {
        let mut changed = false;
        for n in self.view.nodes.values_mut() {
            let v = voters.contains(&n.id);
            if n.voter != v {
                n.voter = v;
                changed = true;
            }
        }
        if changed {
            self.view.epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests;
