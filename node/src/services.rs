//! What the protocol sessions share on one node: the store, the directory,
//! limits, authentication, mailbox locks and counters.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use membership::{Directory, Recipient, UserRecord};
use replication::FragmentStore;
use tokio::sync::Semaphore;

use crate::mail::Mail;

/// Every input bound of a node. Defaults follow the RFCs where they set a
/// number and common practice (Postfix, Dovecot) where they don't.
#[derive(Debug, Clone)]
pub struct Limits {
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
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
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
        }
    }
}

/// The memory budget for incoming messages is taken in chunks this large.
pub const DATA_BUDGET_CHUNK: usize = 64 * 1024;

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF.
pub const SMTP_COMMAND_BYTES_MAX: usize = 512;
/// RFC 2449 gives 255 octets for POP3 commands; AUTH PLAIN responses
/// (RFC 5034) may be longer, so a little room is left.
pub const POP3_LINE_BYTES_MAX: usize = 1024;
/// Cached successful logins; the cache is emptied when full.
const AUTH_CACHE_ENTRIES_MAX: usize = 100_000;
/// Addresses tracked for failed logins; the table is emptied when full.
const AUTH_FAILURE_ADDRESSES_MAX: usize = 100_000;
/// At most this many password checks at once (fewer on fewer cores).
const PASSWORD_CHECKS_MAX: usize = 8;

#[derive(Debug, Default)]
pub struct Metrics {
    pub smtp_sessions: AtomicU64,
    pub lmtp_sessions: AtomicU64,
    pub pop3_sessions: AtomicU64,
    pub imap_sessions: AtomicU64,
    pub imap_logins: AtomicU64,
    /// UIDs asked for and not given (the Raft state could not be written:
    /// new mail stays out of IMAP sessions until it can).
    pub imap_uid_failures: AtomicU64,
    /// IMAP STOREs that changed flags, and messages copied or moved.
    pub imap_stores: AtomicU64,
    pub imap_copies: AtomicU64,
    pub imap_moves: AtomicU64,
    pub messages_accepted: AtomicU64,
    pub deliveries_failed: AtomicU64,
    pub messages_retrieved: AtomicU64,
    pub messages_deleted: AtomicU64,
    pub auth_failures: AtomicU64,
    pub limit_refusals: AtomicU64,
    pub connections_refused: AtomicU64,
    /// TLS handshakes that succeeded (implicit TLS and STARTTLS).
    pub tls_handshakes: AtomicU64,
    pub tls_handshake_failures: AtomicU64,
    /// STARTTLS commands followed by plaintext before the handshake (the
    /// input was discarded).
    pub tls_injected: AtomicU64,
    /// Logins refused because they came in the clear (`--plaintext-auth`).
    pub plaintext_auth_refused: AtomicU64,
}

/// Where passwords may be sent without TLS (`--plaintext-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PlaintextAuth {
    /// Only from loopback clients (Dovecot's default).
    #[default]
    Loopback,
    /// Never: TLS first.
    Never,
    /// From anywhere (only behind a network you trust).
    Always,
}

impl PlaintextAuth {
    /// Whether a password may be sent on a session that is (or is not)
    /// encrypted, from `peer`.
    pub fn allows(self, encrypted: bool, peer: IpAddr) -> bool {
        encrypted
            || match self {
                PlaintextAuth::Always => true,
                PlaintextAuth::Loopback => peer.is_loopback(),
                PlaintextAuth::Never => false,
            }
    }
}

pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The outcome of a login attempt.
#[derive(Debug)]
pub enum Auth {
    Ok(UserRecord),
    Failed,
    /// Too many failures from this address lately.
    Blocked,
}

#[derive(Debug, Default)]
struct AuthState {
    /// keyed-blake3(user, password) -> the PHC string it verified against.
    cache: HashMap<[u8; 32], String>,
    failures: HashMap<IpAddr, (u32, Instant)>,
    /// Unknown recipients named per client address, in the same windows.
    unknown_recipients: HashMap<IpAddr, (u32, Instant)>,
}

/// Counts one event for `ip` in a fixed window; the table is emptied when
/// it holds too many addresses (memory stays bounded under many sources).
fn count_in_window(table: &mut HashMap<IpAddr, (u32, Instant)>, ip: IpAddr, window: Duration) {
    if table.len() >= AUTH_FAILURE_ADDRESSES_MAX {
        table.clear();
    }
    let e = table.entry(ip).or_insert((0, Instant::now()));
    if e.1.elapsed() >= window {
        *e = (0, Instant::now());
    }
    e.0 += 1;
}

/// Whether `ip` has counted `max` events in the current window.
fn window_full(table: &HashMap<IpAddr, (u32, Instant)>, ip: IpAddr, max: u32, window: Duration) -> bool {
    table
        .get(&ip)
        .is_some_and(|(n, since)| *n >= max && since.elapsed() < window)
}

pub struct Services {
    pub hostname: String,
    /// Appended to logins without a domain (like Dovecot's
    /// `auth_default_realm`), so `user0001` logs in as `user0001@DOMAIN`.
    pub default_login_domain: Option<String>,
    /// Where postmaster mail goes when a domain has no `postmaster` user
    /// (`--postmaster`); else [`Directory::postmaster_fallback`].
    pub postmaster: Option<String>,
    /// Client TLS; `None`: no STARTTLS offered (tests only: a node always
    /// has a certificate, its own self-signed one at least).
    pub tls: Option<crate::tls::Tls>,
    pub plaintext_auth: PlaintextAuth,
    pub store: Arc<FragmentStore>,
    /// Delivery to R nodes and mailboxes across the cluster.
    pub mail: Arc<dyn Mail>,
    /// IMAP UIDs (the Raft state's sequences; in memory in tests).
    pub uids: Arc<dyn crate::uids::Uids>,
    pub directory: Arc<dyn Directory>,
    pub limits: Limits,
    pub metrics: Metrics,
    /// The outbound queue as this node sees it (bounds, `/metrics`).
    pub queue: crate::outbound::QueueGauge,
    /// The queue's bounds (`--queue-max-messages`, `--queue-max-bytes`).
    pub queue_bounds: (u64, u64),
    /// Delivery and retrieval latency histograms.
    pub latency: crate::metrics::Latencies,
    /// The memory budget for messages being received, one permit per
    /// [`DATA_BUDGET_CHUNK`] bytes (see [`Limits::data_memory_bytes_max`]).
    pub data_budget: Arc<Semaphore>,
    /// Connection slots of every client listener (see [`crate::slots`]).
    pub slots: Arc<crate::slots::Slots>,
    /// Password checks running at once (each takes argon2's 19 MiB and a
    /// core for tens of ms): a burst of logins waits here instead of
    /// taking memory and blocking threads without bound.
    password_checks: Semaphore,
    pop3_locks: Mutex<HashSet<String>>,
    imap_users: Mutex<HashMap<String, u32>>,
    auth: Mutex<AuthState>,
    auth_key: [u8; 32],
    /// A hash of a random password with the parameters of real ones: an
    /// unknown user's login is checked against it, so that it takes as
    /// long as a known user's wrong password.
    dummy_hash: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("hostname", &self.hostname).finish()
    }
}

/// Held by a POP3 session while it owns a mailbox: on this node, and
/// (`cluster`) at the user's manager.
#[derive(Debug)]
/// An IMAP session counted against its user's limit.
pub struct ImapSession {
    services: Arc<Services>,
    user: String,
}

impl Drop for ImapSession {
    fn drop(&mut self) {
        let mut users = self.services.imap_users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
    }
}

pub struct MailboxLock {
    services: Arc<Services>,
    user: String,
    /// The manager that granted the cluster-wide lock, and its token.
    cluster: Option<(u64, u64)>,
    /// Renews the cluster-wide lock's lease while the session lives.
    renewal: Option<tokio::task::AbortHandle>,
}

impl MailboxLock {
    /// Notes the cluster-wide lock (if the manager granted one) and keeps
    /// its lease renewed until the lock goes.
    pub fn hold_cluster(&mut self, granted: Option<(u64, u64)>) {
        self.cluster = granted;
        let Some((manager, token)) = granted else { return };
        let (mail, user) = (self.services.mail.clone(), self.user.clone());
        let every = replication::replica::MAILBOX_LOCK_LEASE / 4;
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if !mail.renew_mailbox_lock(&user, manager, token).await {
                    tracing::warn!(%user, manager, "mailbox lock lost to another session (its lease ran out)");
                    return;
                }
            }
        });
        self.renewal = Some(task.abort_handle());
    }

    /// Releases the lock at the manager, waiting for it, then on this node:
    /// a session that ends with QUIT releases before it answers, so that a
    /// client reconnecting right after `+OK` never meets its own lock.
    pub async fn release(mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        if let Some((manager, token)) = self.cluster.take() {
            self.services.mail.unlock_mailbox(&self.user, manager, token).await;
        }
    }
}

impl Drop for MailboxLock {
    fn drop(&mut self) {
        if let Some(r) = self.renewal.take() {
            r.abort();
        }
        self.services
            .pop3_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.user);
        if let Some((manager, token)) = self.cluster
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (mail, user) = (self.services.mail.clone(), self.user.clone());
            rt.spawn(async move { mail.unlock_mailbox(&user, manager, token).await });
        }
    }
}

impl Services {
    pub fn new(
        hostname: String,
        store: Arc<FragmentStore>,
        mail: Arc<dyn Mail>,
        directory: Arc<dyn Directory>,
        limits: Limits,
        auth_key: [u8; 32],
    ) -> Self {
        Services {
            hostname,
            default_login_domain: None,
            postmaster: None,
            tls: None,
            plaintext_auth: PlaintextAuth::default(),
            store,
            mail,
            uids: Arc::new(crate::uids::LocalUids::default()),
            directory,
            data_budget: Arc::new(Semaphore::new(
                limits.data_memory_bytes_max.div_ceil(DATA_BUDGET_CHUNK).max(1),
            )),
            slots: crate::slots::Slots::new(limits.connections_max, limits.connections_per_address_max),
            password_checks: Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, PASSWORD_CHECKS_MAX)),
            ),
            limits,
            metrics: Metrics::default(),
            queue: Default::default(),
            queue_bounds: (100_000, 2 << 30),
            latency: crate::metrics::Latencies::default(),
            pop3_locks: Mutex::new(HashSet::new()),
            imap_users: Mutex::new(HashMap::new()),
            auth: Mutex::new(AuthState::default()),
            auth_key,
            dummy_hash: tokio::sync::OnceCell::new(),
        }
    }

    /// Counts one use of a sending allowance of `user` (`what`: messages
    /// a minute or recipients an hour); `Err` with the reply when it is
    /// spent, or when no counter could be reached (fail closed: a
    /// temporary refusal).
    pub async fn spend_sending_allowance(&self, user: &str, per_hour: bool) -> Result<(), &'static str> {
        let (key, max, window) = if per_hour {
            (
                format!("send-rcpts/{user}"),
                self.limits.submission_recipients_per_hour,
                Duration::from_secs(3600),
            )
        } else {
            (
                format!("send-msgs/{user}"),
                self.limits.submission_messages_per_minute,
                Duration::from_secs(60),
            )
        };
        match self.mail.throttle(&[(key, max.saturating_add(1))], window, true).await {
            Some(false) => Ok(()),
            Some(true) if per_hour => {
                Err("451 4.7.1 This account has sent to too many recipients this hour, try again later")
            }
            Some(true) => Err("451 4.7.1 This account is sending too fast, try again in a minute"),
            None => Err("451 4.3.0 Sending limits cannot be checked now, try again later"),
        }
    }

    /// Whether the outbound queue's share on this node is over a bound
    /// (new mail for remote recipients is then refused with `451 4.3.1`).
    pub fn queue_full(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let (max_messages, max_bytes) = self.queue_bounds;
        self.queue.held_messages.load(Relaxed) >= max_messages || self.queue.held_bytes.load(Relaxed) >= max_bytes
    }

    /// One IMAP session of `user` on this node, if under the limit; given
    /// back when the guard drops.
    pub fn imap_session(self: &Arc<Self>, user: &str) -> Option<ImapSession> {
        let mut users = self.imap_users.lock().unwrap_or_else(|p| p.into_inner());
        let n = users.entry(user.to_owned()).or_insert(0);
        if *n >= self.limits.imap_sessions_per_user_max {
            return None;
        }
        *n += 1;
        Some(ImapSession {
            services: self.clone(),
            user: user.to_owned(),
        })
    }

    /// Takes the POP3 lock of a mailbox on this node (RFC 1939 §8: one
    /// session at a time); the session then takes it at the user's manager.
    pub fn lock_mailbox(self: &Arc<Self>, user: &str) -> Option<MailboxLock> {
        let mut locks = self.pop3_locks.lock().unwrap_or_else(|p| p.into_inner());
        if !locks.insert(user.to_owned()) {
            return None;
        }
        Some(MailboxLock {
            services: self.clone(),
            user: user.to_owned(),
            cluster: None,
            renewal: None,
        })
    }

    /// Checks a login. Argon2 runs on a blocking thread; a success is cached
    /// (keyed by a per-process secret, never the password itself) until the
    /// user's hash changes, so that frequent POP3 logins don't each pay it.
    /// An unknown user costs the same argon2 check as a wrong password, so
    /// the time taken does not tell who exists.
    pub async fn authenticate(&self, ip: IpAddr, user: &str, password: &str) -> Auth {
        if self.blocked(ip) {
            return Auth::Blocked;
        }
        let qualified;
        let user = match &self.default_login_domain {
            Some(d) if !user.contains('@') => {
                qualified = format!("{user}@{d}");
                qualified.as_str()
            }
            _ => user,
        };
        // Failures are counted cluster-wide, per address and per account, at
        // each key's manager (every node's own 10 used to add up); this
        // node's counters stay as the fallback when no manager answers.
        let keys = [
            (format!("addr:{ip}"), self.limits.auth_failures_max),
            (
                format!("user:{}", user.to_lowercase()),
                self.limits.auth_failures_per_account_max,
            ),
        ];
        if self.mail.throttle(&keys, self.limits.auth_window, false).await == Some(true) {
            return Auth::Blocked;
        }
        let record = self.directory.user(user);
        let cached_ok = record.as_ref().is_some_and(|r| {
            let key = self.auth_cache_key(&r.address, password);
            let st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
            st.cache.get(&key) == Some(&r.password_hash)
        });
        let ok = if cached_ok {
            true
        } else {
            let phc = match &record {
                Some(r) => r.password_hash.clone(),
                None => self.dummy_hash().await,
            };
            let pw = password.to_owned();
            let _permit = self.password_checks.acquire().await;
            // Failures counted while this one waited may block it.
            if self.blocked(ip) {
                return Auth::Blocked;
            }
            let verified = tokio::task::spawn_blocking(move || membership::password::verify(&pw, &phc))
                .await
                .unwrap_or(false);
            match &record {
                Some(r) if verified => {
                    let key = self.auth_cache_key(&r.address, password);
                    let mut st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
                    if st.cache.len() >= AUTH_CACHE_ENTRIES_MAX {
                        st.cache.clear();
                    }
                    st.cache.insert(key, r.password_hash.clone());
                    true
                }
                _ => false,
            }
        };
        if ok {
            return Auth::Ok(record.expect("verified user exists"));
        }
        bump(&self.metrics.auth_failures);
        {
            let mut st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
            count_in_window(&mut st.failures, ip, self.limits.auth_window);
        }
        self.mail.throttle(&keys, self.limits.auth_window, true).await;
        Auth::Failed
    }

    /// The dummy hash, made on first use (on a blocking thread: it is one
    /// argon2 run).
    async fn dummy_hash(&self) -> String {
        self.dummy_hash
            .get_or_init(|| async {
                let pw = crate::hex(&crate::random_bytes().unwrap_or([7; 32]));
                tokio::task::spawn_blocking(move || membership::password::hash(&pw))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default()
            })
            .await
            .clone()
    }

    /// Whether the address has used up its failed logins for the window.
    fn blocked(&self, ip: IpAddr) -> bool {
        let st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        window_full(&st.failures, ip, self.limits.auth_failures_max, self.limits.auth_window)
    }

    /// Counts an unknown recipient named by `ip`.
    pub fn note_unknown_recipient(&self, ip: IpAddr) {
        let mut st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        count_in_window(&mut st.unknown_recipients, ip, self.limits.auth_window);
    }

    /// Whether `ip` has named too many unknown recipients in the window.
    pub fn unknown_recipients_exhausted(&self, ip: IpAddr) -> bool {
        let st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        window_full(
            &st.unknown_recipients,
            ip,
            self.limits.unknown_recipients_max,
            self.limits.auth_window,
        )
    }

    /// Resolves a recipient, with postmaster (RFC 5321 §4.5.1) deliverable
    /// for every local domain, and bare `postmaster`: to the
    /// `postmaster@DOMAIN` user if there is one, else to `--postmaster`,
    /// else to the directory's fallback (the domain's first user).
    pub fn resolve_recipient(&self, address: &str) -> Recipient {
        let dir = &self.directory;
        let (local, domain) = match address.rsplit_once('@') {
            Some((l, d)) => (l, Some(d)),
            None => (address, None),
        };
        if !local.eq_ignore_ascii_case("postmaster") {
            return dir.resolve(address);
        }
        // A postmaster user, or a domain that is not ours, decides; a
        // local domain without a postmaster user is routed below.
        if domain.is_some() {
            match dir.resolve(address) {
                Recipient::UnknownUser => {}
                other => return other,
            }
        }
        let configured = self.postmaster.as_deref().and_then(|a| dir.user(a));
        match configured.or_else(|| dir.postmaster_fallback(domain)) {
            Some(u) => Recipient::Local(u),
            // No user anywhere to take it: an unknown user, not relaying.
            None => Recipient::UnknownUser,
        }
    }

    fn auth_cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.auth_key);
        h.update(user.as_bytes());
        h.update(&[0]);
        h.update(password.as_bytes());
        *h.finalize().as_bytes()
    }
}
