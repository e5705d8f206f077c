//! Sieve (RFC 5228), the per-user mail filter: a script is checked when it
//! is uploaded ([`compile`], with the line and reason of an error) and run
//! once per message and recipient ([`run`]: the message and envelope in,
//! the [`Actions`] out), by the node that takes the message, before its
//! copies are stored.
//!
//! Pure: no I/O, no clock. Bounded: a script's size, its nesting, its
//! lists and strings when parsed; its steps, redirects, actions and the
//! bytes it looks at when run. Nothing here loops: Sieve has no loops, and
//! every step is counted anyway.
//!
//! Supported: the base language (`require`, `if`/`elsif`/`else`, `stop`,
//! `keep`, `discard`, `redirect`; `address`, `header`, `envelope`, `size`,
//! `exists`, `allof`, `anyof`, `not`, `true`, `false`; `:is`,
//! `:contains`, `:matches`; `:localpart`, `:domain`, `:all`; the
//! comparators `i;ascii-casemap`, `i;octet`, `i;ascii-numeric`),
//! `fileinto` (with `:create`, RFC 5490 `mailbox`, and `:copy`, RFC
//! 3894), `imap4flags` (RFC 5232: `setflag`, `addflag`, `removeflag`,
//! `hasflag`, `:flags` on `keep` and `fileinto`; no variables), `vacation`
//! (RFC 5230), `body` (RFC 5173) and `relational` (RFC 5231: `:value`,
//! `:count`).
//!
//! The complete Sieve implementations among Rust crates are AGPL, which
//! Quill's licence cannot take; this one is written here and fuzzed.

mod ast;
mod lex;
mod parse;
mod run;
pub mod vacation;

pub use parse::{Script, compile};
pub use run::{Actions, Envelope, FileInto, Vacation, run};

/// The largest script, in bytes (it travels in one Raft entry:
/// `membership::routes::SIEVE_SCRIPT_BYTES_MAX` is the same).
pub const SCRIPT_BYTES_MAX: usize = 32 * 1024;
/// Blocks nested in blocks, and tests in tests, at most.
pub const NESTING_MAX: usize = 16;
/// Strings in one list, at most.
pub const LIST_MAX: usize = 1024;
/// Commands and tests evaluated for one message, at most.
pub const STEPS_MAX: usize = 4096;
/// `redirect`s one message may make (the rest are refused).
pub const REDIRECTS_MAX: usize = 4;
/// Folders one message may be filed into.
pub const FILEINTO_MAX: usize = 32;
/// Bytes of a message's body the `body` test reads.
pub const BODY_BYTES_MAX: usize = 1024 * 1024;

/// The extensions a script may `require`.
pub const EXTENSIONS: &[&str] = &[
    "fileinto",
    "copy",
    "imap4flags",
    "vacation",
    "body",
    "relational",
    "envelope",
    "mailbox",
    "comparator-i;ascii-numeric",
    "comparator-i;octet",
    "comparator-i;ascii-casemap",
];

/// What ManageSieve's capability response lists as `SIEVE`.
pub fn capability() -> String {
    EXTENSIONS
        .iter()
        .filter(|e| !e.starts_with("comparator-"))
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Why a script was refused: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct SieveError {
    pub line: usize,
    pub reason: String,
}

impl SieveError {
    pub(crate) fn at(line: usize, reason: impl Into<String>) -> SieveError {
        SieveError {
            line,
            reason: reason.into(),
        }
    }
}
