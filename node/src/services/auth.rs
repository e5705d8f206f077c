//! Logins: the password check (argon2id on a blocking thread, a bounded
//! number at once), a keyed cache of verified passwords, and failures
//! counted per address and per account across the cluster.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use membership::{Directory, UserRecord};
use tokio::sync::Semaphore;

use super::windows::Windows;
use crate::mail::Mail;
use crate::metrics::Counters;

/// Cached successful logins; the cache is emptied when full.
const AUTH_CACHE_ENTRIES_MAX: usize = 100_000;
/// At most this many password checks at once (fewer on fewer cores).
const PASSWORD_CHECKS_MAX: usize = 8;

/// The outcome of a login attempt.
#[derive(Debug)]
pub enum Auth {
    Ok(UserRecord),
    Failed,
    /// Too many failures from this address lately.
    Blocked,
}

/// How many failures refuse a login, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct AuthLimits {
    pub per_address: u32,
    pub per_account: u32,
    pub window: Duration,
}

pub struct Authenticator {
    directory: Arc<dyn Directory>,
    mail: Arc<dyn Mail>,
    counters: Counters,
    limits: AuthLimits,
    /// Appended to logins without a domain (like Dovecot's
    /// `auth_default_realm`), so `user0001` logs in as `user0001@DOMAIN`.
    default_login_domain: Option<String>,
    /// Password checks running at once (each takes argon2's 19 MiB and a
    /// core for tens of ms): a burst of logins waits here instead of
    /// taking memory and blocking threads without bound.
    password_checks: Semaphore,
    /// keyed-blake3(user, password) -> the PHC string it verified against.
    cache: Mutex<HashMap<[u8; 32], String>>,
    failures: Windows,
    key: [u8; 32],
    /// A hash of a random password with the parameters of real ones: an
    /// unknown user's login is checked against it, so that it takes as
    /// long as a known user's wrong password.
    dummy_hash: tokio::sync::OnceCell<String>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("limits", &self.limits).finish()
    }
}

impl Authenticator {
    /// `key` keys the cache (a per-process secret: the cache never holds a
    /// password or anything a password can be found from without it).
    pub fn new(
        directory: Arc<dyn Directory>,
        mail: Arc<dyn Mail>,
        counters: Counters,
        limits: AuthLimits,
        default_login_domain: Option<String>,
        key: [u8; 32],
    ) -> Self {
        Authenticator {
            directory,
            mail,
            counters,
            limits,
            default_login_domain,
            password_checks: Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, PASSWORD_CHECKS_MAX)),
            ),
            cache: Mutex::default(),
            failures: Windows::default(),
            key,
            dummy_hash: tokio::sync::OnceCell::new(),
        }
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
            (format!("addr:{ip}"), self.limits.per_address),
            (format!("user:{}", user.to_lowercase()), self.limits.per_account),
        ];
        if self.mail.throttle(&keys, self.limits.window, false).await == Some(true) {
            return Auth::Blocked;
        }
        let record = self.directory.user(user);
        let cached_ok = record.as_ref().is_some_and(|r| {
            let key = self.cache_key(&r.address, password);
            self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) == Some(&r.password_hash)
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
                    let key = self.cache_key(&r.address, password);
                    let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                    if cache.len() >= AUTH_CACHE_ENTRIES_MAX {
                        cache.clear();
                    }
                    cache.insert(key, r.password_hash.clone());
                    true
                }
                _ => false,
            }
        };
        if ok {
            let record = record.expect("verified user exists");
            crate::net::slots::note_user(&record.address);
            return Auth::Ok(record);
        }
        self.counters.auth_failures.inc();
        self.failures.count(ip, self.limits.window);
        self.mail.throttle(&keys, self.limits.window, true).await;
        Auth::Failed
    }

    /// The dummy hash, made on first use (on a blocking thread: it is one
    /// argon2 run).
    async fn dummy_hash(&self) -> String {
        self.dummy_hash
            .get_or_init(|| async {
                let pw = crate::files::hex(&crate::files::random_bytes().unwrap_or([7; 32]));
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
        self.failures.full(ip, self.limits.per_address, self.limits.window)
    }

    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(user.as_bytes());
        h.update(&[0]);
        h.update(password.as_bytes());
        *h.finalize().as_bytes()
    }
}
