//! Every input bound of a node's client sessions.

use std::time::Duration;

/// Every input bound of a node. Defaults follow the RFCs where they set a
/// number and common practice (Postfix, Dovecot) where they don't.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Submission: the addresses users may send as besides their own
    /// (`--allow-from`).
    pub send_as: std::sync::Arc<quill_proto::send_as::SendAs>,
    /// `user+tag@` is filed into the user's folder `tag` where it exists
    /// (`--subaddress-folders`); else into INBOX.
    pub subaddress_folders: bool,
    /// Largest message accepted (advertised in `SIZE`).
    pub message_bytes_max: usize,
    /// RFC 5321 §4.5.3.1.8: at least 100 must be accepted.
    pub recipients_max: usize,
    /// Commands in one session before it is closed (stops endless sessions).
    pub commands_max: u32,
    /// Unknown or malformed commands in one session before it is closed.
    pub bad_commands_max: u32,
    /// RFC 5321 §4.5.3.2.7 suggests 5 minutes for the server. Also the
    /// longest a command line may take to arrive, byte by byte.
    pub idle_timeout: Duration,
    /// A message (DATA, or a POP3 client reading one) must move at least
    /// this many bytes a second on average once `transfer_grace` is over:
    /// a trickle cannot hold a session (and a slot) for hours.
    pub transfer_bytes_per_sec_min: u64,
    pub transfer_grace: Duration,
    /// Bytes of incoming messages all sessions together may hold in memory;
    /// past it a message gets `452 4.3.1` (read to its end, dropped).
    pub data_memory_bytes_max: usize,
    /// All connections of all protocols on this node.
    pub connections_max: usize,
    pub connections_per_address_max: u32,
    /// IMAP sessions of one user on this node at once.
    pub imap_sessions_per_user_max: u32,
    /// Failed logins from one address within `auth_window` before it is
    /// refused for the rest of the window.
    pub auth_failures_max: u32,
    /// Failed logins on one account, from all addresses together, within
    /// `auth_window` before the account is refused for the rest of it.
    pub auth_failures_per_account_max: u32,
    pub auth_window: Duration,
    /// Submissions with remote recipients one account may make a minute,
    /// and remote recipients it may name an hour (cluster-wide, counted
    /// at each account's manager): one compromised account cannot flood
    /// the queue.
    pub submission_messages_per_minute: u32,
    pub submission_recipients_per_hour: u32,
    /// Unknown recipients one client address may name within
    /// `auth_window` before every RCPT from it gets `450 4.7.1`.
    pub unknown_recipients_max: u32,
    /// Where passwords may be sent without TLS (`--plaintext-auth`).
    pub plaintext_auth: crate::net::PlaintextAuth,
    /// The outbound queue's retries and bounds (`--retry-*`,
    /// `--queue-*`, `--outbound-*-per-destination`, `--delay-warning`).
    pub queue: QueuePolicy,
    /// How long a node may be down before its copies are made again
    /// elsewhere (`--repair-grace`), and the bytes a second a node sends
    /// when it restores or moves copies (`--repair-rate`).
    pub repair_grace: Duration,
    pub repair_rate: u64,
}

/// The outbound queue's policy: the same on every node through the
/// cluster's settings (the node-specific parts, such as its relay host,
/// its DNS server and how many connections it opens, stay in
/// `OutboundConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuePolicy {
    pub schedule: quill_proto::queue::Schedule,
    /// Connections to one destination domain at once.
    pub per_destination: usize,
    /// Transactions a second to one destination domain (0: no limit).
    pub rate_per_destination: u32,
    /// After this long in the queue, the sender is told once that the
    /// message is delayed (0: never).
    pub delay_warning_ms: u64,
    /// Bounds on this node's share of the queue: past either, new mail
    /// for remote recipients gets `451 4.3.1`.
    pub max_messages: u64,
    pub max_bytes: u64,
}

impl Default for QueuePolicy {
    fn default() -> Self {
        QueuePolicy {
            schedule: quill_proto::queue::Schedule {
                initial_ms: 60_000,
                max_ms: 3_600_000,
                lifetime_ms: 5 * 86_400_000,
            },
            per_destination: 20,
            rate_per_destination: 0,
            delay_warning_ms: 0,
            max_messages: 100_000,
            max_bytes: 2 << 30,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            send_as: Default::default(),
            subaddress_folders: false,
            message_bytes_max: 50 << 20,
            recipients_max: 100,
            commands_max: 10_000,
            bad_commands_max: 20,
            idle_timeout: Duration::from_secs(300),
            transfer_bytes_per_sec_min: 1024,
            transfer_grace: Duration::from_secs(60),
            data_memory_bytes_max: 512 << 20,
            connections_max: 1024,
            connections_per_address_max: 64,
            imap_sessions_per_user_max: 20,
            auth_failures_max: 10,
            auth_failures_per_account_max: 30,
            auth_window: Duration::from_secs(60),
            unknown_recipients_max: 50,
            submission_messages_per_minute: 120,
            submission_recipients_per_hour: 2000,
            plaintext_auth: Default::default(),
            queue: QueuePolicy::default(),
            repair_grace: Duration::from_secs(30),
            repair_rate: 32 << 20,
        }
    }
}

/// The memory budget for incoming messages is taken in chunks this large.
pub const DATA_BUDGET_CHUNK: usize = 64 * 1024;

/// The limits in force now: the node's flags, and over them the cluster's
/// settings for the keys no flag gave (`crate::settings`). Replaced whole
/// when a setting changes; sessions read it as they start and commands as
/// they run, so a change reaches new sessions at once and the running ones
/// at their next command.
#[derive(Debug, Clone)]
pub struct LiveLimits(std::sync::Arc<std::sync::RwLock<std::sync::Arc<Limits>>>);

impl LiveLimits {
    pub fn new(l: Limits) -> LiveLimits {
        LiveLimits(std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(l))))
    }

    pub fn get(&self) -> std::sync::Arc<Limits> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, l: Limits) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = std::sync::Arc::new(l);
    }
}
