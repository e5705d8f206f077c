//! Membership: who is in the cluster, and the user directory.
//!
//! Owns the hard state every node keeps a full local copy of: the directory
//! (domains, users, password hashes, quotas) and, in a later issue, the view
//! (nodes and their states) — both applied from a Raft log.
//!
//! Today the directory of a single node lives here: [`DirectoryState`] is the
//! pure state machine (commands in, state out), [`LocalDirectory`] keeps it in
//! a JSON file in the data directory. Callers see only the [`Directory`]
//! trait, so the Raft-managed directory replaces the storage, not the callers.
//!
//! What it must not do: know about mail (messages, SMTP, POP3), or open
//! sockets. Reads are local and synchronous; writes return a future because
//! in a cluster they are committed through Raft.

pub mod directory;
pub mod password;

pub use directory::{
    Directory, DirectoryCommand, DirectoryError, DirectoryState, LocalDirectory, Recipient, UserRecord, UserSummary,
    normalize_address,
};
