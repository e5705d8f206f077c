//! Membership: who is in the cluster, and the user directory, kept by Raft.
//!
//! Owns the hard state every node keeps a full local copy of, replicated by
//! Raft (openraft 0.9) and applied by one deterministic state machine:
//! * the **view** ([`ClusterView`]): epoch, and the nodes with their names,
//!   addresses, weights, zones, states (up, down, draining) and voter flags;
//!   [`ClusterView::placement_view`] turns it into placement's view;
//! * the **directory** ([`DirectoryState`]): domains, users, password
//!   hashes, quotas.
//!
//! Map:
//! * [`command`]: [`Command`] (what a log entry carries) and
//!   [`ClusterState::apply_request`], the whole write logic, with the dedup
//!   table that makes retried writes safe;
//! * [`store`]: the Raft log, vote and snapshots in a folder (append-only
//!   framed files, fsync before acknowledging);
//! * [`formats`]: feature levels, and the state's encodings by level, so
//!   that a cluster is upgraded node by node and reads what an earlier
//!   release wrote;
//! * [`network`]: the [`Transport`] trait the node implements over its wire
//!   (QUIC), the [`RaftMessage`] / [`RaftReply`] it carries, and openraft's
//!   network traits over it; `mem_transport` (feature `testing`): an in-memory, fault-injecting
//!   implementation for tests;
//! * [`cluster`]: [`Membership`], one node's Raft (start, initialize, join,
//!   membership changes, writes forwarded to the leader, the server side
//!   [`Membership::handle`], the view and its watch channel) and
//!   [`RaftDirectory`], the [`Directory`] over it;
//! * [`keywords`]: the IMAP keywords each folder defines;
//! * [`settings`]: cluster settings, changed at runtime;
//! * [`dkim`]: the DKIM signing keys of the cluster's domains;
//! * [`routes`]: aliases, domain aliases, catch-alls and sub-addressing,
//!   and the expansion of an address to the users and remote addresses
//!   that get its mail;
//! * [`watch`]: the failure detector's ring (which nodes each node pings);
//! * [`directory`]: the directory state machine, the [`Directory`] trait the
//!   node's services use, and [`LocalDirectory`] (one node, a JSON file).
//!
//! What it must not do: know about mail (messages, SMTP, POP3), or open
//! sockets: bytes between nodes go through the [`Transport`] the node gives
//! it. Reads are local and synchronous; writes return a future that resolves
//! when the entry is committed and applied.
//!
//! # Backpressure
//! A node has at most [`cluster::WRITES_IN_FLIGHT_MAX`] writes waiting for
//! commit; every write, join and membership change has one deadline.
//! Entries, messages, snapshot chunks and decoded files all have size limits
//! (see [`codec`] and [`cluster`]).
//!
//! # Shutdown
//! [`Membership::shutdown`] stops the Raft core and waits for it; the
//! storage folder's lock is released when the last handle is dropped.

pub mod blocklist;
pub mod cluster;
pub mod codec;
pub mod command;
pub mod directory;
pub mod dkim;
pub mod formats;
pub mod keywords;
#[cfg(feature = "testing")]
pub mod mem_transport;
pub mod modseq;
pub mod names;
pub mod network;
pub mod password;
pub mod recent;
pub mod routes;
pub mod sequence;
pub mod settings;
pub mod store;
pub mod types;
pub mod view;
pub mod watch;

#[cfg(test)]
mod test_dir;

pub use cluster::{Membership, MembershipConfig, MembershipError, RaftDirectory};
pub use command::{
    ClientId, ClusterState, Command, CommandError, CommittedBy, Request, Response, StoredCert, TlsCerts,
};
pub use directory::{
    Directory, DirectoryCommand, DirectoryError, DirectoryState, LocalDirectory, Recipient, RoutesWriteError,
    UserRecord, UserSummary, mailbox_name, needs_smtputf8, normalize_address,
};
pub use formats::{FEATURE_LEVEL_MAX, FEATURE_LEVEL_MIN};
#[cfg(feature = "testing")]
pub use mem_transport::{MemRouter, SplitMix64};
pub use network::{
    BoxFuture, LeaderError, LeaderReply, LeaderRequest, RaftCall, RaftMessage, RaftReply, Transport, TransportError,
};
pub use routes::{ExpandError, Expansion, RouteError, Routes, RoutesCommand, SieveScripts};
pub use view::{ClusterView, NodeAddrs, NodeInfo, NodeState};
