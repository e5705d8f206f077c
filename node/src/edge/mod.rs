//! Checks at the edge: what a server taking mail from the Internet (the
//! `--smtp` listener, not submission or LMTP) asks about a client and its
//! mail before it takes it. Each check is a module; the SMTP session calls
//! them through a few hook lines.
//!
//! - [`blocklist`]: the cluster's blocklists and access rules (Raft
//!   state), looked up on every node in microseconds.
//! - [`dnsbl`]: DNS blocklists (`--dnsbl ZONE`), asked once a connection.
//! - [`greylist`]: `--greylist DURATION`, kept at each triplet's manager.
//! - [`check`]: the options, the per-connection verdict and the counters.
//! - [`verify`]: who may send as whom (SPF, DKIM, DMARC, ARC, iprev) and
//!   the policy that acts on it, with [`cache`] of the parsed answers;
//!   skipped for `--trusted-networks`.

pub mod blocklist;
pub mod cache;
pub mod check;
pub mod dnsbl;
pub mod greylist;
pub mod verify;

pub use check::{Check, Edge, EdgeOptions, Stage};
pub use verify::{AuthPolicy, MailAuth, MailAuthConfig};
