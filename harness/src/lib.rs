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
pub mod dns;
pub mod load;
pub mod process;
pub mod sim;
pub mod workload;

pub use client::{Pop3Client, Reply, SmtpClient};
pub use process::{NodeOptions, NodeProcess, TempDir, fresh_loopback};

/// The flags every harness node starts with (unless its
/// `NodeOptions::trust_loopback` is unset): mail from loopback is taken without the
/// checks of incoming mail (SPF, DKIM, DMARC would ask the system's DNS
/// about test domains). A node never trusts loopback by itself; the tests
/// and benchmarks of those checks unset it.
pub const TRUST_LOOPBACK: [&str; 2] = ["--trusted-networks", "127.0.0.0/8"];

/// How to run this very harness binary again from the current directory:
/// `./target/release/quill-harness` after `cargo build --release`, or its
/// absolute path when it lies elsewhere (a bare `quill-harness` is not on
/// the PATH after a build).
pub fn harness_command() -> String {
    let Ok(exe) = std::env::current_exe() else {
        return "quill-harness".to_owned();
    };
    match std::env::current_dir()
        .ok()
        .and_then(|cwd| exe.strip_prefix(cwd).ok().map(std::path::Path::to_path_buf))
    {
        Some(rel) => format!("./{}", rel.display()),
        None => exe.display().to_string(),
    }
}
