//! The harness: starts `quill node` processes, drives them through the public
//! protocols (SMTP, LMTP, POP3) and the admin API, and measures.
//!
//! It treats nodes as black boxes: no quill internals, only their protocols.
//! The `quill-harness` binary (demo, bench-node) and the tests in `tests/`
//! are built on this library.
//!
//! What it must not do: reach anything but loopback addresses, or run
//! unbounded: every load is bounded in count and time.

pub mod bench;
pub mod client;
pub mod process;
pub mod workload;

pub use client::{Pop3Client, Reply, SmtpClient};
pub use process::{NodeOptions, NodeProcess, TempDir, fresh_loopback};
