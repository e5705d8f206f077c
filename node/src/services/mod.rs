//! What the protocol sessions of one node share: the mail and the
//! directory, the limits, logins ([`auth`]), where mail goes and who may
//! send how much ([`routing`]), sessions that exclude others ([`locks`]),
//! the memory budget of messages being received, and the metrics. It may
//! use `net`, `mail`, `uids`, `metrics` and `tls`; never a protocol.

pub mod activity;
pub mod auth;
pub mod limits;
pub mod locks;
pub mod routing;
mod windows;

use std::sync::Arc;

use membership::Directory;
use prometheus_client::collector::Collector;
use replication::FragmentStore;
use tokio::sync::Semaphore;

pub use auth::{Auth, AuthLimits, Authenticator};
pub use limits::{DATA_BUDGET_CHUNK, Limits, LiveLimits, QueuePolicy};
pub use locks::{ImapSession, Locks, MailboxLock};
pub use routing::{Routing, SendingLimits};

use crate::mail::Mail;
use crate::metrics::{Metrics, QueueGauge};
use crate::net::Env;
use crate::net::slots::Slots;
use crate::tls::Tls;
use crate::uids::Uids;

/// What a node's services are made of: everything a node and a test
/// must both give, and [`Options`] (the `quill node` flags' defaults).
pub struct Parts {
    pub hostname: String,
    pub store: Arc<FragmentStore>,
    /// Delivery to R nodes and mailboxes across the cluster.
    pub mail: Arc<dyn Mail>,
    /// IMAP UIDs and folder names (the Raft state's; in memory in tests).
    pub uids: Arc<dyn Uids>,
    pub directory: Arc<dyn Directory>,
    pub limits: Limits,
    /// Client TLS; `None`: no STARTTLS or implicit TLS offered.
    pub tls: Option<Tls>,
    /// Keys the login cache (random per process).
    pub auth_key: [u8; 32],
    pub options: Options,
}

/// What has a default (that of `quill node`'s flag).
#[derive(Default)]
pub struct Options {
    pub default_login_domain: Option<String>,
    pub postmaster: Option<String>,
    /// The DNS server to ask (see [`crate::dns`]).
    pub dns: Option<std::net::SocketAddr>,
    /// The checks of mail arriving on `--smtp` (none: not checked).
    pub mail_auth: Option<crate::edge::MailAuthConfig>,
    /// Blocklists, DNS blocklists, greylisting (see [`crate::edge`]).
    pub edge: crate::edge::EdgeOptions,
    /// Figures other parts count, read at each scrape of `/metrics`.
    pub metric_sources: Vec<Box<dyn Collector>>,
}

pub struct Services {
    pub hostname: String,
    /// The limits in force (flags and cluster settings): see [`Services::limits`].
    pub live: LiveLimits,
    /// What the connection layer needs (bounds, TLS, counters); its idle
    /// timeout is the one at start: see [`Services::env`].
    pub env: Env,
    /// Users and domains, and their mail (as in [`Parts`]).
    pub directory: Arc<dyn Directory>,
    pub mail: Arc<dyn Mail>,
    pub uids: Arc<dyn Uids>,
    pub store: Arc<FragmentStore>,
    pub auth: Authenticator,
    pub routing: Routing,
    pub locks: Arc<Locks>,
    pub metrics: Arc<Metrics>,
    /// The outbound queue as this node sees it (bounds, `/metrics`).
    pub queue: QueueGauge,
    /// The memory budget for messages being received, one permit per
    /// [`DATA_BUDGET_CHUNK`] bytes (see [`Limits::data_memory_bytes_max`]).
    pub data_budget: Arc<Semaphore>,
    /// Connection slots of every client listener (see [`crate::net::slots`]).
    pub slots: Arc<Slots>,
    /// The heaviest senders, recipients and clients lately.
    pub activity: Arc<activity::Activity>,
    /// The node's caching resolver.
    pub dns: Arc<crate::dns::Dns>,
    /// The checks of mail arriving on `--smtp` (see [`crate::edge`]).
    pub mail_auth: Option<Arc<crate::edge::MailAuth>>,
    /// The checks of a client at the edge (`--smtp` only).
    pub edge: Arc<crate::edge::Edge>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").field("hostname", &self.hostname).finish()
    }
}

impl Services {
    pub fn new(p: Parts) -> Services {
        let o = p.options;
        let l = &p.limits;
        let activity = Arc::new(activity::Activity::default());
        let slots = Slots::new(l.connections_max, l.connections_per_address_max);
        let dns = Arc::new(crate::dns::Dns::new(o.dns));
        let mail_auth = o
            .mail_auth
            .map(|cfg| Arc::new(crate::edge::MailAuth::new(cfg, p.hostname.clone(), dns.clone())));
        let mut sources = o.metric_sources;
        sources.extend(mail_auth.as_ref().map(|e| e.figures()));
        let edge = Arc::new(crate::edge::Edge::new(o.edge));
        sources.push(Box::new(crate::edge::check::Figures(edge.stats.clone())));
        sources.push(Box::new(activity::Figures {
            activity: activity.clone(),
            slots: slots.clone(),
        }));
        let metrics = Arc::new(Metrics::new(sources));
        let counters = metrics.counters.clone();
        let queue = metrics.queue.clone();
        let env = Env {
            idle_timeout: l.idle_timeout,
            commands_max: l.commands_max,
            bad_commands_max: l.bad_commands_max,
            tls: p.tls,
            plaintext_auth: l.plaintext_auth,
            counters: counters.clone(),
        };
        let auth = Authenticator::new(
            p.directory.clone(),
            p.mail.clone(),
            counters,
            AuthLimits {
                per_address: l.auth_failures_max,
                per_account: l.auth_failures_per_account_max,
                window: l.auth_window,
            },
            o.default_login_domain,
            p.auth_key,
        );
        let live = LiveLimits::new(p.limits.clone());
        let routing = Routing::new(
            p.directory.clone(),
            p.mail.clone(),
            live.clone(),
            o.postmaster,
            SendingLimits { window: l.auth_window },
            queue.clone(),
        );
        Services {
            hostname: p.hostname,
            env,
            store: p.store,
            locks: Locks::new(p.mail.clone(), live.clone()),
            mail: p.mail,
            uids: p.uids,
            directory: p.directory,
            auth,
            routing,
            data_budget: Arc::new(Semaphore::new(
                l.data_memory_bytes_max.div_ceil(DATA_BUDGET_CHUNK).max(1),
            )),
            slots,
            activity,
            dns,
            edge,
            mail_auth,
            metrics,
            queue,
            live,
        }
    }

    /// The limits in force now (a setting may change them while the node
    /// runs).
    pub fn limits(&self) -> std::sync::Arc<Limits> {
        self.live.get()
    }

    /// What a new session's connection layer needs, with the idle timeout
    /// and the plaintext-password rule in force now.
    pub fn env(&self) -> Env {
        let mut env = self.env.clone();
        let live = self.live.get();
        env.idle_timeout = live.idle_timeout;
        env.plaintext_auth = live.plaintext_auth;
        env
    }

    /// The counters the sessions bump.
    pub fn counters(&self) -> &crate::metrics::Counters {
        &self.metrics.counters
    }
}
