//! Where mail for an address goes, and who may send how much: recipient
//! resolution with postmaster routing, unknown recipients counted per
//! client address, the per-account sending allowance, and the outbound
//! queue's bounds.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use membership::{Directory, ExpandError, Expansion, Recipient};

use super::windows::Windows;
use crate::mail::Mail;
use crate::metrics::QueueGauge;

/// Why a recipient has nowhere to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unroutable {
    /// Not one of our domains.
    NotLocal,
    /// Ours, but nobody takes it.
    Unknown,
    /// Its aliases come back to it.
    Loop,
    /// Its aliases nest too deep or reach too many recipients.
    TooMany,
    /// An SRS address we did not make, or made too long ago.
    BadSrs,
}

/// How much one account and one client address may do: the windows and
/// queue bounds fixed at start (the allowances themselves are in the live
/// limits: `--max-submissions-per-minute`, ..., cluster settings).
#[derive(Debug, Clone, Copy)]
pub struct SendingLimits {
    /// The window of unknown recipients per address.
    pub window: Duration,
}

pub struct Routing {
    directory: Arc<dyn Directory>,
    mail: Arc<dyn Mail>,
    /// The allowances in force (cluster settings may change them).
    live: super::LiveLimits,
    /// Where postmaster mail goes when a domain has no `postmaster` user
    /// (`--postmaster`); else [`Directory::postmaster_fallback`].
    postmaster: Option<String>,
    limits: SendingLimits,
    queue: QueueGauge,
    unknown: Windows,
    /// Users' active Sieve scripts, compiled once per version of the
    /// source (user -> source, script).
    scripts: std::sync::Mutex<std::collections::HashMap<String, (String, Arc<quill_proto::sieve::Script>)>>,
}

/// Compiled scripts kept at most (all dropped past it; rebuilt as used).
const SCRIPTS_CACHED_MAX: usize = 10_000;

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing").field("limits", &self.limits).finish()
    }
}

impl Routing {
    pub fn new(
        directory: Arc<dyn Directory>,
        mail: Arc<dyn Mail>,
        live: super::LiveLimits,
        postmaster: Option<String>,
        limits: SendingLimits,
        queue: QueueGauge,
    ) -> Self {
        Routing {
            directory,
            mail,
            live,
            postmaster,
            limits,
            queue,
            unknown: Windows::default(),
            scripts: Default::default(),
        }
    }

    /// The user's active Sieve script, compiled; `None` without one (or
    /// with one that no longer compiles: it was checked when stored, so
    /// only a newer release's script could, and the mail is kept).
    pub fn sieve(&self, user: &str) -> Option<Arc<quill_proto::sieve::Script>> {
        let src = self.directory.sieve_script(user)?;
        let mut cache = self.scripts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cached, script)) = cache.get(user)
            && *cached == src
        {
            return Some(script.clone());
        }
        let script = Arc::new(quill_proto::sieve::compile(&src).ok()?);
        if cache.len() >= SCRIPTS_CACHED_MAX {
            cache.clear();
        }
        cache.insert(user.to_owned(), (src, script.clone()));
        Some(script)
    }

    /// Counts one vacation reply from `user` to `sender` under `handle`
    /// at the cluster's counter for it: true if none was sent in the last
    /// `days` (RFC 5230's rule, kept at one node for the whole cluster);
    /// false too when no counter answers (no reply rather than a storm).
    pub async fn vacation_due(&self, user: &str, sender: &str, handle: &str, days: u64) -> bool {
        let h = blake3::hash(handle.as_bytes()).to_hex();
        let key = format!("vacation/{user}/{}/{}", sender.to_ascii_lowercase(), &h[..16]);
        let window = Duration::from_secs(days.clamp(1, 365) * 86_400);
        self.mail.throttle(&[(key, 2)], window, true).await == Some(false)
    }

    /// Resolves a recipient, with postmaster (RFC 5321 §4.5.1) deliverable
    /// for every local domain, and bare `postmaster`: to the
    /// `postmaster@DOMAIN` user if there is one, else to `--postmaster`,
    /// else to the directory's fallback (the domain's first user).
    pub fn resolve(&self, address: &str) -> Recipient {
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

    /// Where mail for `address` goes (RCPT): users, aliases, domain
    /// aliases, sub-addresses and catch-alls, postmaster as [`Self::resolve`]
    /// routes it, and bounces to the SRS addresses this cluster made for
    /// forwarded mail (back to the original sender). `day` is today, in
    /// days since 1970 (SRS timestamps).
    pub fn route(&self, address: &str, day: u32) -> Result<Expansion, Unroutable> {
        let (local, domain) = address.rsplit_once('@').unwrap_or((address, ""));
        if quill_proto::srs::is_srs(local) {
            // Ours if the domain is: only an address of ours was made here.
            let ours = !matches!(
                self.directory.expand(&format!("postmaster@{domain}")),
                Err(ExpandError::NotLocal)
            );
            if ours {
                let key = self.directory.srs_key().ok_or(Unroutable::BadSrs)?;
                let back = quill_proto::srs::reverse(&key, local, day).map_err(|_| Unroutable::BadSrs)?;
                return Ok(Expansion {
                    local: vec![],
                    remote: vec![back],
                    routed: true,
                });
            }
        }
        if local.eq_ignore_ascii_case("postmaster") {
            return match self.resolve(address) {
                Recipient::Local(user) => Ok(Expansion {
                    local: vec![(user, None)],
                    remote: vec![],
                    routed: false,
                }),
                Recipient::UnknownUser => Err(Unroutable::Unknown),
                Recipient::NotLocal => Err(Unroutable::NotLocal),
            };
        }
        self.directory.expand(address).map_err(|e| match e {
            ExpandError::NotLocal => Unroutable::NotLocal,
            ExpandError::Unknown => Unroutable::Unknown,
            ExpandError::Loop(_) => Unroutable::Loop,
            ExpandError::TooDeep | ExpandError::TooMany => Unroutable::TooMany,
        })
    }

    /// Counts an unknown recipient named by `ip`.
    pub fn note_unknown_recipient(&self, ip: IpAddr) {
        self.unknown.count(ip, self.limits.window);
    }

    /// Whether `ip` has named too many unknown recipients in the window.
    pub fn unknown_recipients_exhausted(&self, ip: IpAddr) -> bool {
        self.unknown
            .full(ip, self.live.get().unknown_recipients_max, self.limits.window)
    }

    /// Counts one use of a sending allowance of `user` (messages a minute,
    /// or recipients an hour); `Err` with the reply when it is spent, or
    /// when no counter could be reached (fail closed: a temporary
    /// refusal).
    pub async fn spend_sending_allowance(&self, user: &str, per_hour: bool) -> Result<(), &'static str> {
        let (key, max, window) = if per_hour {
            (
                format!("send-rcpts/{user}"),
                self.live.get().submission_recipients_per_hour,
                Duration::from_secs(3600),
            )
        } else {
            (
                format!("send-msgs/{user}"),
                self.live.get().submission_messages_per_minute,
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
        let q = self.live.get().queue;
        self.queue.held_messages.get() >= q.max_messages || self.queue.held_bytes.get() >= q.max_bytes
    }
}
