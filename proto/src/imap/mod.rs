//! IMAP4rev1 (RFC 3501) rules that need no I/O: folder names, sequence
//! sets and LIST patterns, what FETCH makes of a message (ENVELOPE,
//! BODYSTRUCTURE, sections), SEARCH matching, the STORE edits of a
//! message's flag registers, what a session is told of changes made
//! elsewhere (`sync`), and the replies. The grammar and the protocol
//! flows are imap-next's; the node's `imap` module drives them over a
//! socket and reaches the mail.

pub mod fetch;
pub mod folders;
#[cfg(test)]
mod imaptest;
pub mod keywords;
pub mod mime;
pub mod parts;
pub mod reply;
pub mod search;
pub mod sections;
pub mod sets;
pub mod store;
pub mod sync;

/// Longest command line (without literals): Dovecot's 64 KiB.
pub const COMMAND_BYTES_MAX: u32 = 64 * 1024;
/// Failed logins in one session before it is closed.
pub const SESSION_AUTH_FAILURES_MAX: u32 = 3;
/// Bytes a SEARCH on text may read (bodies), after which it fails.
pub const SEARCH_BYTES_MAX: u64 = 256 << 20;
/// Flags one STORE or APPEND names at most.
pub const FLAGS_PER_COMMAND_MAX: usize = 32;
/// Messages one COPY copies at most (each is a new message on R nodes).
pub const COPY_MESSAGES_MAX: usize = 10_000;
/// Longest flag name, in bytes (`replication::marks::FLAG_BYTES_MAX`,
/// checked equal by the node).
pub const FLAG_BYTES_MAX: usize = 64;
/// Flag registers one message keeps at most, set or cleared
/// (`replication::marks::FLAGS_PER_MESSAGE_MAX`, checked equal by the node).
pub const FLAGS_PER_MESSAGE_MAX: usize = 64;

/// One message of a selected folder, as these rules see it.
pub trait Message {
    fn uid(&self) -> u32;
    fn size(&self) -> u64;
    /// INTERNALDATE, ms since the epoch.
    fn arrival_ms(&self) -> u64;
    /// The flags set, as stored (`\Seen` for system flags, keywords as
    /// first given).
    fn flags(&self) -> Vec<&str>;
    /// Every flag register, set or cleared: (name, set).
    fn registers(&self) -> Vec<(&str, bool)>;
    /// Whether `flag` is set (flag names compare without case).
    fn has(&self, flag: &str) -> bool {
        self.flags().iter().any(|f| f.eq_ignore_ascii_case(flag))
    }
    /// Whether the message is `\Recent` to this session (RFC 3501 2.3.2:
    /// to one session only; not a stored flag).
    fn recent(&self) -> bool {
        false
    }
    /// Its mod-sequence (RFC 7162): raised by every change of its flags,
    /// at least 1.
    fn modseq(&self) -> u64;
}

/// The options of imap-next's server for a node whose largest message is
/// `message_bytes_max`: a literal at most that (refused with a reason
/// before it is sent), a command line at most that plus
/// [`COMMAND_BYTES_MAX`].
pub fn server_options(message_bytes_max: usize) -> imap_next::server::Options {
    let mut o = imap_next::server::Options::default();
    o.max_literal_size = message_bytes_max.min(u32::MAX as usize / 2) as u32;
    o.max_command_size = o.max_literal_size.saturating_add(COMMAND_BYTES_MAX);
    o.set_literal_reject_text("literal larger than the message size limit".into())
        .expect("valid text");
    o
}

#[cfg(test)]
pub(crate) mod testing {
    /// A message for the rules' tests.
    #[derive(Debug, Clone, Default, PartialEq, Eq)]
    pub struct TestMsg {
        pub uid: u32,
        pub size: u64,
        pub arrival_ms: u64,
        pub registers: Vec<(String, bool)>,
        pub modseq: u64,
    }

    impl TestMsg {
        pub fn new(uid: u32, flags: &[&str]) -> TestMsg {
            TestMsg {
                uid,
                size: 100,
                arrival_ms: 0,
                registers: flags.iter().map(|f| ((*f).to_owned(), true)).collect(),
                modseq: 1,
            }
        }
    }

    impl super::Message for TestMsg {
        fn uid(&self) -> u32 {
            self.uid
        }
        fn size(&self) -> u64 {
            self.size
        }
        fn arrival_ms(&self) -> u64 {
            self.arrival_ms
        }
        fn flags(&self) -> Vec<&str> {
            self.registers
                .iter()
                .filter(|(_, s)| *s)
                .map(|(n, _)| n.as_str())
                .collect()
        }
        fn registers(&self) -> Vec<(&str, bool)> {
            self.registers.iter().map(|(n, s)| (n.as_str(), *s)).collect()
        }
        fn modseq(&self) -> u64 {
            self.modseq
        }
    }
}
