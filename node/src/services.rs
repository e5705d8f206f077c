//! What the protocol sessions share on one node: the store, the directory,
//! limits, authentication, mailbox locks and counters.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use membership::{Directory, UserRecord};
use replication::FragmentStore;
use tokio::sync::Semaphore;

use crate::conn::PerAddress;
use crate::replica::NodeReplicator;

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
    /// RFC 5321 §4.5.3.2.7 suggests 5 minutes for the server.
    pub idle_timeout: Duration,
    /// All connections of all protocols on this node.
    pub connections_max: usize,
    pub connections_per_address_max: u32,
    /// Failed logins from one address within `auth_window` before it is
    /// refused for the rest of the window.
    pub auth_failures_max: u32,
    pub auth_window: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            message_bytes_max: 50 << 20,
            recipients_max: 100,
            commands_max: 10_000,
            bad_commands_max: 20,
            idle_timeout: Duration::from_secs(300),
            connections_max: 1024,
            connections_per_address_max: 64,
            auth_failures_max: 10,
            auth_window: Duration::from_secs(60),
        }
    }
}

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF.
pub const SMTP_COMMAND_BYTES_MAX: usize = 512;
/// RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with CRLF; one
/// more for the dot that transparency may add.
pub const SMTP_TEXT_LINE_BYTES_MAX: usize = 1001;
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
    pub messages_accepted: AtomicU64,
    pub deliveries_failed: AtomicU64,
    pub messages_retrieved: AtomicU64,
    pub messages_deleted: AtomicU64,
    pub auth_failures: AtomicU64,
    pub limit_refusals: AtomicU64,
    pub connections_refused: AtomicU64,
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
}

pub struct Services {
    pub hostname: String,
    /// Appended to logins without a domain (like Dovecot's
    /// `auth_default_realm`), so `user0001` logs in as `user0001@DOMAIN`.
    pub default_login_domain: Option<String>,
    pub store: Arc<FragmentStore>,
    /// Delivery to R nodes and mailboxes across the cluster.
    pub replica: Arc<NodeReplicator>,
    pub directory: Arc<dyn Directory>,
    pub limits: Limits,
    pub metrics: Metrics,
    pub per_address: Arc<PerAddress>,
    pub connections: Arc<Semaphore>,
    /// Password checks running at once (each takes argon2's 19 MiB and a
    /// core for tens of ms): a burst of logins waits here instead of
    /// taking memory and blocking threads without bound.
    password_checks: Semaphore,
    pop3_locks: Mutex<HashSet<String>>,
    auth: Mutex<AuthState>,
    auth_key: [u8; 32],
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("hostname", &self.hostname).finish()
    }
}

/// Held by a POP3 session while it owns a mailbox: on this node, and
/// (`cluster`) at the user's manager.
#[derive(Debug)]
pub struct MailboxLock {
    services: Arc<Services>,
    user: String,
    /// The manager that granted the cluster-wide lock, and its token.
    pub cluster: Option<(u64, u64)>,
}

impl MailboxLock {
    /// Releases the lock at the manager, waiting for it, then on this node:
    /// a session that ends with QUIT releases before it answers, so that a
    /// client reconnecting right after `+OK` never meets its own lock.
    pub async fn release(mut self) {
        if let Some((manager, token)) = self.cluster.take() {
            self.services.replica.unlock_mailbox(&self.user, manager, token).await;
        }
    }
}

impl Drop for MailboxLock {
    fn drop(&mut self) {
        self.services
            .pop3_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.user);
        if let Some((manager, token)) = self.cluster
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let (replica, user) = (self.services.replica.clone(), self.user.clone());
            rt.spawn(async move { replica.unlock_mailbox(&user, manager, token).await });
        }
    }
}

impl Services {
    pub fn new(
        hostname: String,
        store: Arc<FragmentStore>,
        replica: Arc<NodeReplicator>,
        directory: Arc<dyn Directory>,
        limits: Limits,
        auth_key: [u8; 32],
    ) -> Self {
        Services {
            hostname,
            default_login_domain: None,
            store,
            replica,
            directory,
            connections: Arc::new(Semaphore::new(limits.connections_max)),
            password_checks: Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, PASSWORD_CHECKS_MAX)),
            ),
            limits,
            metrics: Metrics::default(),
            per_address: Arc::new(PerAddress::default()),
            pop3_locks: Mutex::new(HashSet::new()),
            auth: Mutex::new(AuthState::default()),
            auth_key,
        }
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
        })
    }

    /// Checks a login. Argon2 runs on a blocking thread; a success is cached
    /// (keyed by a per-process secret, never the password itself) until the
    /// user's hash changes, so that frequent POP3 logins don't each pay it.
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
        let record = self.directory.user(user);
        let ok = match &record {
            None => false,
            Some(r) => {
                let key = self.auth_cache_key(&r.address, password);
                let cached = self
                    .auth
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .cache
                    .get(&key)
                    .cloned();
                if cached.as_deref() == Some(r.password_hash.as_str()) {
                    true
                } else {
                    let (pw, phc) = (password.to_owned(), r.password_hash.clone());
                    let _permit = self.password_checks.acquire().await;
                    // Failures counted while this one waited may block it.
                    if self.blocked(ip) {
                        return Auth::Blocked;
                    }
                    let ok = tokio::task::spawn_blocking(move || membership::password::verify(&pw, &phc))
                        .await
                        .unwrap_or(false);
                    if ok {
                        let mut st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
                        if st.cache.len() >= AUTH_CACHE_ENTRIES_MAX {
                            st.cache.clear();
                        }
                        st.cache.insert(key, r.password_hash.clone());
                    }
                    ok
                }
            }
        };
        if ok {
            return Auth::Ok(record.expect("verified user exists"));
        }
        bump(&self.metrics.auth_failures);
        let mut st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        if st.failures.len() >= AUTH_FAILURE_ADDRESSES_MAX {
            st.failures.clear();
        }
        let window = self.limits.auth_window;
        let e = st.failures.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
        Auth::Failed
    }

    /// Whether the address has used up its failed logins for the window.
    fn blocked(&self, ip: IpAddr) -> bool {
        let st = self.auth.lock().unwrap_or_else(|p| p.into_inner());
        st.failures
            .get(&ip)
            .is_some_and(|(n, since)| *n >= self.limits.auth_failures_max && since.elapsed() < self.limits.auth_window)
    }

    fn auth_cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.auth_key);
        h.update(user.as_bytes());
        h.update(&[0]);
        h.update(password.as_bytes());
        *h.finalize().as_bytes()
    }
}
