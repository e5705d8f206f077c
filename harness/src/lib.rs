//! The harness: starts `quill node` processes, drives them through the public
//! protocols (SMTP, LMTP, POP3) and the admin API, and measures.
//!
//! It treats nodes as black boxes: no quill internals, only their protocols.
//! The `quill-harness` binary (`up`, `load`, `verify`, `scale`, the fault
//! commands, the benchmarks) and the tests in `tests/` are built on this
//! library.
//!
//! What it must not do: reach anything but loopback addresses, or run
//! unbounded: every load is bounded in count and time.

pub mod bench;
pub mod chart;
pub mod cli {
    //! The commands under their old name.
    pub use crate::commands::*;
}
pub mod client;
pub mod cluster;
pub mod commands;
pub mod load;
pub mod process;
pub mod workload;

pub use client::{Pop3Client, Reply, SmtpClient};
pub use process::{NodeOptions, NodeProcess, TempDir, fresh_loopback};
