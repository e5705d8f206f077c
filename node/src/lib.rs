//! The Quill node: the `quill` binary and everything that touches sockets,
//! files and the clock.
//!
//! The protocols' rules are the protocol cores' (`quill_proto`); this crate
//! is the shell that performs them. Its folders, each with what it may use:
//!
//! - [`net`]: listeners, connection slots, the TLS accept, streams, the
//!   line-session scaffold. Uses `tls`, `metrics`.
//! - [`services`]: what sessions share (logins, routing, locks, limits,
//!   the memory budget). Uses `net`, `mail`, `uids`, `metrics`, `tls`.
//! - [`smtp`], [`pop3`], [`imap`], [`managesieve`]: the client protocols. Use `services`,
//!   `net`, `mail`, `uids` (and SMTP the outbound queue's `enqueue`).
//! - [`outbound`]: the queue's worker, MX lookup and SMTP client. Uses
//!   `services`, `mail`, `dkim`.
//! - [`cluster`]: QUIC, enrollment, failure detection, the replica
//!   protocol's transport and duties. Uses membership, replication,
//!   `files`; no protocol.
//! - [`edge`]: the checks of a client at the edge (blocklists, access
//!   rules, DNS blocklists, greylisting). Uses `dns`, `mail`.
//! - [`admin`]: the HTTP API and `quill admin`. Uses `services`,
//!   `cluster`, `tls`, `dkim`.
//! - [`run`](mod@run): the wiring of one node.
//! - [`settings`]: the cluster settings a node knows, checked and
//!   applied over its flags. Uses `services` (the limits), `units`.
//! - [`dkim`]: DKIM keys made for `quill admin dkim create`, their DNS
//!   records, and the signer of outgoing mail over the cluster's keys.
//!   Uses membership.
//! - Leaves: [`mail`], [`uids`], [`tls`], [`metrics`], [`files`],
//!   [`time`], [`units`].
//!
//! What it must not do: decide placement or membership itself, or keep mail
//! anywhere but in the fragment store. Only this crate opens sockets.
//!
//! # Backpressure
//! Connection slots cap connections per node and per client address; both
//! answer with a protocol error before closing. Every line read is bounded
//! and has an idle deadline. Store writes wait for room in the store's
//! bounded queue.
//!
//! # Shutdown
//! [`run()`] takes a future; when it resolves, a watch channel tells every
//! listener and session, sessions answer `421`/`-ERR`/`BYE` and end,
//! [`run()`] waits for all of them (bounded by a grace period), then
//! closes the store.

pub mod admin;
pub mod cluster;
pub mod dkim;
pub mod dns;
pub mod edge;
pub mod files;
pub mod imap;
pub mod mail;
pub mod managesieve;
pub mod metrics;
pub mod net;
pub mod outbound;
pub mod pop3;
pub mod run;
pub mod services;
pub mod settings;
pub mod smtp;
pub mod time;
pub mod tls;
pub mod uids;
pub mod units;

pub use run::{NodeConfig, run};

/// This build's release, as `cluster status` shows it for every node
/// (the workspace version).
pub const RELEASE: &str = env!("CARGO_PKG_VERSION");
pub use services::Limits;

// The protocol cores keep their own copies of bounds the Raft state and the
// store enforce: they must agree.
const _: () = assert!(quill_proto::imap::folders::FOLDERS_MAX == membership::names::NAMES_PER_SCOPE_MAX);
const _: () = assert!(quill_proto::imap::FLAG_BYTES_MAX == replication::marks::FLAG_BYTES_MAX);
const _: () = assert!(quill_proto::imap::FLAGS_PER_MESSAGE_MAX == replication::marks::FLAGS_PER_MESSAGE_MAX);
