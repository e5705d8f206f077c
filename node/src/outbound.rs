//! Outbound delivery: every node works the queue shards it owns
//! ([`owner_of`]: rendezvous hashing of the shard over the nodes the
//! current view has up and not `--role in`), delivering each entry's pending recipients to their
//! domains' mail exchangers (MX lookup through one shared caching
//! resolver, implicit MX, null MX) or to `--relay-host`, with mail-send's
//! SMTP client (opportunistic STARTTLS), one connection per domain for all
//! of its recipients.
//!
//! Per recipient: a 2xx ends it delivered; a 5xx ends it failed; a 4xx, a
//! connection error or a timeout defers it to a retry (exponential
//! backoff from `--retry-initial` to `--retry-max`) until
//! `--queue-lifetime`, when it fails. Ends are flag registers of the
//! entry, replicated like IMAP flags, so a new owner (the old one died)
//! does not send again what was delivered: at least once, exactly once
//! unless a transaction is cut between the end of DATA and its reply
//! (counted in `quill_outbound_cut_transactions_total`). Failed
//! recipients get one DSN to the envelope sender (never to `<>`); local
//! senders get it in their mailbox directly.
//!
//! Slow destinations: a domain whose tries keep failing with timeouts or
//! deferrals moves to the slow lane, whose few slots it shares with the
//! other slow domains, so a dead domain cannot take the slots of the
//! healthy ones. Retry and lane state is soft: a new owner starts over
//! (tries at once), which costs an early retry, never a message.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::RData;
use mail_send::SmtpClient;
use replication::replica::Listed;
use replication::{FlagMark, MarkChange, MessageId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::queue::{self, Envelope, Failed, Schedule};
use crate::services::{Services, bump};

/// The folder queue entries are kept in.
pub const QUEUE_FOLDER: &str = "QUEUE";
/// How often the owner looks at its shards.
const TICK: Duration = Duration::from_millis(500);
/// Connect, greeting and each command's reply, at most.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);
/// A DATA transfer and its reply, at most.
const DATA_TIMEOUT: Duration = Duration::from_secs(300);
/// Mail exchangers tried per domain and try, at most.
const MX_TRIED_MAX: usize = 5;
/// Consecutive failed tries that put a domain in the slow lane.
const SLOW_AFTER: u32 = 3;
/// Queue entries being worked at once (each holds its body in memory).
const ENTRIES_IN_FLIGHT_MAX: usize = 256;
/// How long a domain stays in the slow lane after its last failure.
const SLOW_FOR: Duration = Duration::from_secs(600);

/// How this node delivers.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Send everything to this smarthost instead of looking up MX records.
    pub relay_host: Option<String>,
    /// The DNS server to ask (instead of the system's resolv.conf).
    pub dns: Option<SocketAddr>,
    /// The port of mail exchangers (25; tests use another).
    pub mx_port: u16,
    pub schedule: Schedule,
    /// Domains delivered to at once, and connections per domain.
    pub concurrency: usize,
    pub per_domain: usize,
    /// Slots of the slow lane (shared by every slow domain).
    pub slow_lane: usize,
    /// Transactions a second to one destination domain (0: no limit).
    pub rate_per_domain: u32,
    /// After this long in the queue, the sender is told once that the
    /// message is delayed (0: never).
    pub delay_warning_ms: u64,
    /// Queue bounds, on this node's share of the queue: past either, new
    /// mail for remote recipients gets `451 4.3.1`.
    pub max_messages: u64,
    pub max_bytes: u64,
    /// Whether this node works queue shards (`--role out` or both).
    pub works_queue: bool,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            relay_host: None,
            dns: None,
            mx_port: 25,
            schedule: Schedule {
                initial_ms: 60_000,
                max_ms: 3_600_000,
                lifetime_ms: 5 * 86_400_000,
            },
            concurrency: 100,
            per_domain: 20,
            slow_lane: 4,
            rate_per_domain: 0,
            delay_warning_ms: 0,
            max_messages: 100_000,
            max_bytes: 2 << 30,
            works_queue: true,
        }
    }
}

/// The queue as this node sees it (for the bounds, `/metrics` and admin).
#[derive(Debug, Default)]
pub struct QueueGauge {
    /// Entries and bytes of queue shards held on this node's disk.
    pub held_messages: AtomicU64,
    pub held_bytes: AtomicU64,
    /// Entries in the shards this node owns, and the oldest one's age.
    pub owned_messages: AtomicU64,
    pub oldest_ms: AtomicU64,
    pub delivered: AtomicU64,
    pub deferred: AtomicU64,
    pub failed: AtomicU64,
    pub bounces: AtomicU64,
    pub cut_transactions: AtomicU64,
    pub slow_domains: AtomicU64,
}

/// Soft state of one entry at its owner.
#[derive(Debug, Clone, Default)]
struct Retry {
    tries: u32,
    next_ms: u64,
    /// When the last try started.
    last_try_ms: u64,
    /// The last temporary failure per pending recipient (for the DSN when
    /// the lifetime ends).
    last: BTreeMap<usize, Failed>,
}

#[derive(Default)]
struct State {
    retry: HashMap<MessageId, Retry>,
    busy: HashSet<MessageId>,
    /// Per domain: consecutive failed tries and when the last was.
    trouble: HashMap<String, (u32, u64)>,
    domains: HashMap<String, Arc<Semaphore>>,
    /// Per domain: the token bucket of `rate_per_domain` (tokens, when).
    buckets: HashMap<String, (f64, std::time::Instant)>,
}

/// Whether this node owns a queue shard (now).
pub type Owner = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The owner of queue shard `shard` under `view`: of the nodes that are up
/// and work the queue, the one with the highest blake3 of (shard, node id)
/// (rendezvous hashing: a node that goes or comes moves only its own
/// shards). None when no such node is up: the queue waits.
pub fn owner_of(view: &membership::ClusterView, shard: &str) -> Option<u64> {
    view.nodes
        .values()
        .filter(|n| n.state == membership::NodeState::Up && !n.addrs.inbound_only)
        .max_by_key(|n| {
            let mut h = blake3::Hasher::new();
            h.update(shard.as_bytes());
            h.update(&n.id.to_le_bytes());
            *h.finalize().as_bytes()
        })
        .map(|n| n.id)
}

pub struct Outbound {
    services: Arc<Services>,
    owner: Owner,
    cfg: OutboundConfig,
    resolver: Option<TokioResolver>,
    state: Mutex<State>,
    lane: Arc<Semaphore>,
    slow: Arc<Semaphore>,
    /// Entries being worked (see [`ENTRIES_IN_FLIGHT_MAX`]).
    work: Arc<Semaphore>,
    /// Told when an entry is done while others wait for a slot.
    freed: tokio::sync::Notify,
    /// Idle connections, per remote address, for the next transaction.
    pool: Mutex<HashMap<SocketAddr, Vec<(std::time::Instant, Client)>>>,
}

/// A connection to a remote server, after EHLO (and STARTTLS if offered).
enum Client {
    Plain(SmtpClient<tokio::net::TcpStream>),
    Tls(Box<SmtpClient<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>),
}

/// How long an idle connection is kept, and how many per address.
const POOL_IDLE: Duration = Duration::from_secs(5);
const POOL_PER_ADDRESS_MAX: usize = 20;

/// One recipient's outcome of a try.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Delivered,
    Deferred(Failed),
    Failed(Failed),
}

impl Outbound {
    pub fn new(services: Arc<Services>, cfg: OutboundConfig, owner: Owner) -> anyhow::Result<Arc<Self>> {
        let resolver = if cfg.relay_host.is_some() {
            None
        } else {
            Some(resolver(cfg.dns)?)
        };
        Ok(Arc::new(Outbound {
            services,
            owner,
            lane: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            slow: Arc::new(Semaphore::new(cfg.slow_lane.max(1))),
            work: Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT_MAX)),
            freed: tokio::sync::Notify::new(),
            pool: Mutex::new(HashMap::new()),
            cfg,
            resolver,
            state: Mutex::new(State::default()),
        }))
    }

    /// The node's name as a host name (EHLO, the DSN's reporting MTA): the
    /// default name holds the cluster address's colon.
    fn helo_name(&self) -> String {
        self.services
            .hostname
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gauge(&self) -> &QueueGauge {
        &self.services.queue
    }

    /// Works the owned shards until `stop`.
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut backlog = false;
        loop {
            // With a backlog (due entries that found no slot), look again
            // as soon as one is done rather than at the next tick.
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = self.freed.notified(), if backlog => {}
                _ = stop.changed() => return,
            }
            self.count_held();
            if self.cfg.works_queue {
                backlog = self.clone().tick().await;
            }
        }
    }

    /// The queue's share held on this disk (the bounds apply to it).
    fn count_held(&self) {
        let (mut n, mut bytes) = (0u64, 0u64);
        for k in 0..queue::SHARDS {
            let (entries, b) = self.services.store.size(&queue::shard_mailbox(k));
            n += entries;
            bytes += b;
        }
        self.gauge().held_messages.store(n, Ordering::Relaxed);
        self.gauge().held_bytes.store(bytes, Ordering::Relaxed);
    }

    /// One look at the owned shards; whether due entries were left for
    /// want of a slot.
    async fn tick(self: Arc<Self>) -> bool {
        let now = crate::time::now_ms();
        let mut backlog = false;
        self.prune_pool();
        let (mut owned, mut oldest) = (0u64, 0u64);
        let mut seen: HashSet<MessageId> = HashSet::new();
        for k in 0..queue::SHARDS {
            let shard = queue::shard_mailbox(k);
            if !(self.owner)(&shard) {
                continue;
            }
            for entry in self.services.mail.mailbox(&shard).await {
                owned += 1;
                oldest = oldest.max(now.saturating_sub(entry.meta.arrival_ms));
                let id = entry.meta.id;
                seen.insert(id);
                if entry.meta.marks.has("held") {
                    continue;
                }
                let due = {
                    let st = self.state();
                    let (next_ms, last_try_ms) = st.retry.get(&id).map_or((0, 0), |r| (r.next_ms, r.last_try_ms));
                    // `quill admin queue retry` stamps a flag: newer than the
                    // last try, it makes the entry due now.
                    let forced = entry
                        .meta
                        .marks
                        .flags
                        .iter()
                        .any(|f| f.name == "retry" && f.set && replication::hlc::to_ms(f.hlc) > last_try_ms);
                    (next_ms <= now || forced) && !st.busy.contains(&id)
                };
                if !due {
                    continue;
                }
                let Ok(permit) = self.work.clone().try_acquire_owned() else {
                    // Enough in flight: the rest waits for a later look.
                    backlog = true;
                    continue;
                };
                {
                    let mut st = self.state();
                    st.busy.insert(id);
                    st.retry.entry(id).or_default().last_try_ms = now;
                }
                let me = self.clone();
                let shard = shard.clone();
                tokio::spawn(async move {
                    me.work(&shard, entry).await;
                    me.state().busy.remove(&id);
                    drop(permit);
                    me.freed.notify_one();
                });
            }
        }
        self.gauge().owned_messages.store(owned, Ordering::Relaxed);
        self.gauge().oldest_ms.store(oldest, Ordering::Relaxed);
        let slow = {
            let mut st = self.state();
            // Retry state of entries no longer here (done through another
            // owner, removed, or in a shard this node gave up) goes.
            let State { retry, busy, .. } = &mut *st;
            retry.retain(|id, _| seen.contains(id) || busy.contains(id));
            st.trouble.values().filter(|t| is_slow(t, now)).count()
        };
        self.gauge().slow_domains.store(slow as u64, Ordering::Relaxed);
        backlog
    }

    fn prune_pool(&self) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        pool.retain(|_, conns| {
            conns.retain(|(at, _)| at.elapsed() < POOL_IDLE);
            !conns.is_empty()
        });
    }

    fn pooled(&self, addr: SocketAddr) -> Option<Client> {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.get_mut(&addr)?;
        while let Some((at, c)) = conns.pop() {
            if at.elapsed() < POOL_IDLE {
                return Some(c);
            }
        }
        None
    }

    fn give_back(&self, addr: SocketAddr, c: Client) {
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let conns = pool.entry(addr).or_default();
        if conns.len() < POOL_PER_ADDRESS_MAX {
            conns.push((std::time::Instant::now(), c));
        }
    }

    /// One try of one entry: its pending recipients, domain by domain.
    async fn work(self: &Arc<Self>, shard: &str, entry: Listed) {
        let body = match self.services.mail.read(&entry).await {
            Ok(b) => b,
            Err(e) => {
                debug!(id = %entry.meta.id, error = %e, "queue entry unreadable now");
                self.defer(entry.meta.id, BTreeMap::new());
                return;
            }
        };
        let Some((env, message)) = queue::decode(&body) else {
            warn!(id = %entry.meta.id, "queue entry without an envelope: removed");
            let _ = self.services.mail.delete(shard, std::slice::from_ref(&entry)).await;
            return;
        };
        let ended = |i: usize| entry.meta.marks.has(&queue::ok_flag(i)) || entry.meta.marks.has(&queue::failed_flag(i));
        let now = crate::time::now_ms();
        let expired = self.cfg.schedule.expired(env.queued_ms, now);
        let mut by_domain: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (i, rcpt) in env.rcpts.iter().enumerate() {
            if !ended(i) {
                let domain = queue::domain_of(rcpt).unwrap_or_default();
                by_domain.entry(domain).or_default().push(i);
            }
        }
        let mut outcomes: BTreeMap<usize, Outcome> = BTreeMap::new();
        if expired {
            let last = self
                .state()
                .retry
                .get(&entry.meta.id)
                .map(|r| r.last.clone())
                .unwrap_or_default();
            for idx in by_domain.values().flatten() {
                let why = last
                    .get(idx)
                    .map_or("no delivery within the queue lifetime".to_owned(), |f| {
                        f.diagnostic.clone()
                    });
                outcomes.insert(
                    *idx,
                    Outcome::Failed(Failed {
                        rcpt: env.rcpts[*idx].clone(),
                        status: "4.4.7".to_owned(),
                        diagnostic: format!("message expired in the queue: {why}"),
                        remote: last.get(idx).and_then(|f| f.remote.clone()),
                    }),
                );
            }
        } else {
            let tries = by_domain.iter().map(|(domain, idxs)| {
                let env = &env;
                async move {
                    let rcpts: Vec<&str> = idxs.iter().map(|i| env.rcpts[*i].as_str()).collect();
                    let results = self.deliver_domain(domain, &env.from, &rcpts, message).await;
                    idxs.iter().copied().zip(results).collect::<Vec<_>>()
                }
            });
            for per in futures::future::join_all(tries).await {
                outcomes.extend(per);
            }
        }
        self.settle(shard, &entry, &env, message, outcomes).await;
    }

    /// Records a try's outcomes: ends as flags, bounces for failures, the
    /// entry deleted once every recipient has ended, a retry otherwise.
    async fn settle(
        &self,
        shard: &str,
        entry: &Listed,
        env: &Envelope,
        message: &[u8],
        outcomes: BTreeMap<usize, Outcome>,
    ) {
        let hlc = self.services.mail.hlc_now();
        let mut flags = Vec::new();
        let mut failed = Vec::new();
        let mut deferred = BTreeMap::new();
        for (i, o) in outcomes {
            match o {
                Outcome::Delivered => {
                    flags.push(queue::ok_flag(i));
                    bump(&self.gauge().delivered);
                }
                Outcome::Failed(f) => {
                    flags.push(queue::failed_flag(i));
                    bump(&self.gauge().failed);
                    failed.push(f);
                }
                Outcome::Deferred(f) => {
                    bump(&self.gauge().deferred);
                    deferred.insert(i, f);
                }
            }
        }
        if !failed.is_empty() && !env.from.is_empty() {
            self.bounce(env, message, &failed, false, &entry.meta.id).await;
        }
        // A delay warning, once per message (a flag says it was sent).
        let warn_after = self.cfg.delay_warning_ms;
        if warn_after > 0
            && !deferred.is_empty()
            && !env.from.is_empty()
            && crate::time::now_ms().saturating_sub(env.queued_ms) >= warn_after
            && !entry.meta.marks.has("warned")
        {
            let delayed: Vec<Failed> = deferred.values().cloned().collect();
            self.bounce(env, message, &delayed, true, &entry.meta.id).await;
            flags.push("warned".to_owned());
        }
        let all_ended = (0..env.rcpts.len()).all(|i| {
            flags.contains(&queue::ok_flag(i))
                || flags.contains(&queue::failed_flag(i))
                || entry.meta.marks.has(&queue::ok_flag(i))
                || entry.meta.marks.has(&queue::failed_flag(i))
        });
        // Every recipient ended: the deletion (a tombstone on every replica,
        // durable like a flag) is the record; no flags first.
        if all_ended
            && self
                .services
                .mail
                .delete(shard, std::slice::from_ref(entry))
                .await
                .is_ok()
        {
            self.state().retry.remove(&entry.meta.id);
            debug!(id = %entry.meta.id, "queue entry done");
            return;
        }
        if !flags.is_empty() {
            let change = MarkChange {
                id: entry.meta.id,
                folder: None,
                flags: flags
                    .iter()
                    .map(|name| FlagMark {
                        name: name.clone(),
                        set: true,
                        hlc,
                    })
                    .collect(),
            };
            if let Err(e) = self.services.mail.mark(shard, &[(entry.clone(), change)]).await {
                warn!(id = %entry.meta.id, error = %e, "recipient ends not recorded; they may be tried again");
            }
        }
        self.defer(entry.meta.id, deferred);
    }

    fn defer(&self, id: MessageId, last: BTreeMap<usize, Failed>) {
        let mut st = self.state();
        let r = st.retry.entry(id).or_default();
        r.tries += 1;
        r.next_ms = crate::time::now_ms() + self.cfg.schedule.backoff_ms(r.tries);
        r.last.extend(last);
    }

    /// A DSN to the envelope sender: into the sender's mailbox if local,
    /// else queued (with the null sender, so it never bounces again).
    async fn bounce(&self, env: &Envelope, message: &[u8], failed: &[Failed], delayed: bool, id: &MessageId) {
        let now = crate::time::now_ms();
        let report = queue::dsn(&self.helo_name(), env, message, failed, delayed, now, &id.to_hex());
        bump(&self.gauge().bounces);
        let stored = match self.services.resolve_recipient(&env.from) {
            membership::Recipient::Local(user) => {
                let new = self.services.mail.new_message_id(now);
                let out = self
                    .services
                    .mail
                    .deliver_as(new, &[user.mailbox()], "INBOX", now, report)
                    .await;
                out.stored.first().copied().unwrap_or(false)
            }
            membership::Recipient::NotLocal => {
                let bounce_env = Envelope {
                    from: String::new(),
                    rcpts: vec![env.from.clone()],
                    queued_ms: now,
                    submitter: None,
                };
                enqueue(&self.services, &bounce_env, &report).await
            }
            membership::Recipient::UnknownUser => {
                info!(to = %env.from, "bounce to an unknown local sender dropped");
                true
            }
        };
        if !stored {
            warn!(to = %env.from, "the bounce could not be stored now");
        }
    }

    /// Tries the recipients of one domain; one outcome per recipient.
    async fn deliver_domain(&self, domain: &str, from: &str, rcpts: &[&str], message: &[u8]) -> Vec<Outcome> {
        let defer_all = |status: &str, why: String, remote: Option<String>| -> Vec<Outcome> {
            rcpts
                .iter()
                .map(|r| {
                    Outcome::Deferred(Failed {
                        rcpt: (*r).to_owned(),
                        status: status.to_owned(),
                        diagnostic: why.clone(),
                        remote: remote.clone(),
                    })
                })
                .collect()
        };
        let fail_all = |status: &str, why: String| -> Vec<Outcome> {
            rcpts
                .iter()
                .map(|r| {
                    Outcome::Failed(Failed {
                        rcpt: (*r).to_owned(),
                        status: status.to_owned(),
                        diagnostic: why.clone(),
                        remote: None,
                    })
                })
                .collect()
        };
        if domain.is_empty() {
            return fail_all("5.1.3", "the recipient address has no domain".into());
        }
        // A lane slot (the slow lane for domains in trouble), then one of
        // the domain's own.
        let now = crate::time::now_ms();
        let (slow, domain_sem) = {
            let mut st = self.state();
            let slow = st.trouble.get(domain).is_some_and(|t| is_slow(t, now));
            let per = if slow { 1 } else { self.cfg.per_domain.max(1) };
            let sem = st
                .domains
                .entry(domain.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(per)))
                .clone();
            (slow, sem)
        };
        let lane = if slow { self.slow.clone() } else { self.lane.clone() };
        let Ok(_lane) = lane.acquire_owned().await else {
            return defer_all("4.3.2", "shutting down".into(), None);
        };
        let Ok(_slot) = domain_sem.acquire_owned().await else {
            return defer_all("4.3.2", "shutting down".into(), None);
        };
        let wait = self.rate_wait(domain);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let targets = match self.targets(domain).await {
            Ok(t) => t,
            Err(Target::Permanent(why)) => return fail_all("5.1.10", why),
            Err(Target::Temporary(why)) => {
                info!(domain, %why, "no mail exchanger found now; deferred");
                self.note_trouble(domain, true);
                return defer_all("4.4.3", why, None);
            }
        };
        let mut last = "no mail exchanger answered".to_owned();
        for (host, addr) in targets.into_iter().take(MX_TRIED_MAX) {
            match self.transaction(&host, addr, from, rcpts, message).await {
                Ok(outcomes) => {
                    let troubled = outcomes.iter().all(|o| matches!(o, Outcome::Deferred(_)));
                    self.note_trouble(domain, troubled);
                    return outcomes;
                }
                Err(why) => {
                    debug!(%host, %addr, %why, "mail exchanger failed; next one");
                    last = format!("{host} ({addr}): {why}");
                }
            }
        }
        self.note_trouble(domain, true);
        defer_all("4.4.1", last, None)
    }

    /// How long to wait before the next transaction to `domain` under
    /// `--outbound-rate-per-destination` (a token bucket of one second's
    /// worth; waiters reserve their token, so they go one after another).
    fn rate_wait(&self, domain: &str) -> Duration {
        let rate = f64::from(self.cfg.rate_per_domain);
        if rate <= 0.0 {
            return Duration::ZERO;
        }
        let now = std::time::Instant::now();
        let mut st = self.state();
        if st.buckets.len() > 100_000 {
            st.buckets.clear();
        }
        let b = st.buckets.entry(domain.to_owned()).or_insert((rate, now));
        b.0 = (b.0 + now.duration_since(b.1).as_secs_f64() * rate).min(rate);
        b.1 = now;
        b.0 -= 1.0;
        if b.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.0 / rate)
        }
    }

    fn note_trouble(&self, domain: &str, bad: bool) {
        let mut st = self.state();
        if bad {
            let e = st.trouble.entry(domain.to_owned()).or_insert((0, 0));
            e.0 += 1;
            e.1 = crate::time::now_ms();
            if e.0 == SLOW_AFTER {
                info!(domain, "destination keeps failing: moved to the slow lane");
                // Its own slots shrink to one (made again on next use).
                st.domains.remove(domain);
            }
        } else if st.trouble.remove(domain).is_some_and(|(n, _)| n >= SLOW_AFTER) {
            info!(domain, "destination answers again: back from the slow lane");
            st.domains.remove(domain);
        }
    }

    /// Where mail for `domain` goes, in order: the relay host, or the MX
    /// hosts by preference (the domain itself without MX records; none
    /// for a null MX), each host's addresses.
    async fn targets(&self, domain: &str) -> Result<Vec<(String, SocketAddr)>, Target> {
        if let Some(relay) = &self.cfg.relay_host {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host(relay.as_str())
                .await
                .map_err(|e| Target::Temporary(format!("relay host {relay}: {e}")))?
                .collect();
            let host = relay
                .rsplit_once(':')
                .map_or(relay.as_str(), |(h, _)| h)
                .trim_matches(['[', ']']);
            return Ok(addrs.into_iter().map(|a| (host.to_owned(), a)).collect());
        }
        let resolver = self.resolver.as_ref().expect("a resolver without --relay-host");
        let fqdn = format!("{domain}.");
        let mut hosts: Vec<(u16, String)> = match resolver.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                    _ => None,
                })
                .collect(),
            Err(e) if no_records(&e) => Vec::new(),
            Err(e) => return Err(Target::Temporary(format!("MX lookup of {domain}: {e}"))),
        };
        if hosts.len() == 1 && (hosts[0].1 == "." || hosts[0].1.is_empty()) {
            return Err(Target::Permanent(format!(
                "{domain} accepts no mail (null MX, RFC 7505)"
            )));
        }
        hosts.retain(|(_, h)| h != "." && !h.is_empty());
        if hosts.is_empty() {
            // Implicit MX (RFC 5321 5.1): the domain's own address.
            hosts.push((0, fqdn.clone()));
        }
        hosts.sort();
        let mut out = Vec::new();
        for (_, host) in hosts.into_iter().take(MX_TRIED_MAX) {
            match resolver.lookup_ip(host.as_str()).await {
                Ok(ips) => out.extend(ips.iter().map(|ip| {
                    (
                        host.trim_end_matches('.').to_owned(),
                        SocketAddr::new(ip, self.cfg.mx_port),
                    )
                })),
                Err(e) => debug!(%host, error = %e, "mail exchanger has no address"),
            }
        }
        if out.is_empty() {
            return Err(Target::Temporary(format!(
                "no address for the mail exchangers of {domain}"
            )));
        }
        Ok(out)
    }

    /// One SMTP transaction, over an idle connection to the host if there
    /// is one (a fresh one if that fails before DATA); `Err` when this host
    /// could not take it at all (the next one is tried).
    async fn transaction(
        &self,
        host: &str,
        addr: SocketAddr,
        from: &str,
        rcpts: &[&str],
        message: &[u8],
    ) -> Result<Vec<Outcome>, String> {
        if let Some(mut c) = self.pooled(addr) {
            let r = match &mut c {
                Client::Plain(c) => self.send(c, host, from, rcpts, message).await,
                Client::Tls(c) => self.send(c, host, from, rcpts, message).await,
            };
            if let Ok(outcomes) = r {
                self.give_back(addr, c);
                return Ok(outcomes);
            }
        }
        let mut c = self.connect(host, addr).await?;
        let r = match &mut c {
            Client::Plain(c) => self.send(c, host, from, rcpts, message).await,
            Client::Tls(c) => self.send(c, host, from, rcpts, message).await,
        };
        if r.is_ok() {
            self.give_back(addr, c);
        }
        r
    }

    /// A new connection: greeting, EHLO, and STARTTLS when offered.
    async fn connect(&self, host: &str, addr: SocketAddr) -> Result<Client, String> {
        let mut client = SmtpClient::connect(addr, SMTP_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        // mail-send writes a message and its final dot in separate writes:
        // with Nagle's algorithm the dot waits for the peer's delayed ACK
        // (40 ms a message).
        let _ = client.stream.set_nodelay(true);
        let greeting = client.read().await.map_err(|e| e.to_string())?;
        if greeting.code / 100 != 2 {
            return Err(format!("greeting {} {}", greeting.code, one_line(&greeting.message)));
        }
        let ehlo = client.ehlo(&self.helo_name()).await.map_err(|e| e.to_string())?;
        if !ehlo.has_capability(smtp_proto::EXT_START_TLS) {
            return Ok(Client::Plain(client));
        }
        // Opportunistic TLS does not fall back to plain text on the same
        // connection: a failed handshake spends it (the next host, or the
        // retry, goes on).
        let mut tls = client
            .start_tls(&tls_connector(), host)
            .await
            .map_err(|e| format!("STARTTLS: {e}"))?;
        tls.ehlo(&self.helo_name()).await.map_err(|e| e.to_string())?;
        Ok(Client::Tls(Box::new(tls)))
    }

    async fn send<T: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut SmtpClient<T>,
        host: &str,
        from: &str,
        rcpts: &[&str],
        message: &[u8],
    ) -> Result<Vec<Outcome>, String> {
        let remote = Some(host.to_owned());
        let reply_of = |e: mail_send::Error| -> Result<smtp_proto::Response<String>, String> {
            match e {
                mail_send::Error::UnexpectedReply(r) => Ok(r),
                other => Err(other.to_string()),
            }
        };
        let failed = |rcpt: &str, r: &smtp_proto::Response<String>| {
            let esc = (r.esc[0] != 0).then(|| format!("{}.{}.{}", r.esc[0], r.esc[1], r.esc[2]));
            let status = esc.clone().unwrap_or_else(|| queue::status_of(r.code, &r.message));
            let diagnostic = match &esc {
                Some(e) => format!("{} {e} {}", r.code, one_line(&r.message)),
                None => format!("{} {}", r.code, one_line(&r.message)),
            };
            Failed {
                rcpt: rcpt.to_owned(),
                status,
                diagnostic,
                remote: remote.clone(),
            }
        };
        let outcome = |rcpt: &str, r: &smtp_proto::Response<String>| {
            if r.code / 100 == 5 {
                Outcome::Failed(failed(rcpt, r))
            } else {
                Outcome::Deferred(failed(rcpt, r))
            }
        };
        if let Err(e) = client
            .mail_from(from, &mail_send::smtp::message::Parameters::new())
            .await
        {
            let r = reply_of(e)?;
            return Ok(rcpts.iter().map(|rc| outcome(rc, &r)).collect());
        }
        let mut out: Vec<Option<Outcome>> = Vec::with_capacity(rcpts.len());
        let mut accepted = Vec::new();
        for (i, rcpt) in rcpts.iter().enumerate() {
            match client.rcpt_to(rcpt, &mail_send::smtp::message::Parameters::new()).await {
                Ok(()) => {
                    accepted.push(i);
                    out.push(None);
                }
                Err(e) => {
                    let r = reply_of(e)?;
                    out.push(Some(outcome(rcpt, &r)));
                }
            }
        }
        let accepted_none = accepted.is_empty();
        if !accepted.is_empty() {
            // mail-send ends the data with CRLF.CRLF itself.
            let body = message.strip_suffix(b"\r\n").unwrap_or(message);
            let sent = tokio::time::timeout(DATA_TIMEOUT, client.data(body)).await;
            let per_accepted: Outcome = match sent {
                Ok(Ok(_)) => Outcome::Delivered,
                Ok(Err(mail_send::Error::UnexpectedReply(r))) => outcome(rcpts[accepted[0]], &r),
                Ok(Err(e)) => {
                    bump(&self.gauge().cut_transactions);
                    Outcome::Deferred(Failed {
                        rcpt: String::new(),
                        status: "4.4.2".into(),
                        diagnostic: format!("connection lost during DATA: {e}"),
                        remote: remote.clone(),
                    })
                }
                Err(_) => {
                    bump(&self.gauge().cut_transactions);
                    Outcome::Deferred(Failed {
                        rcpt: String::new(),
                        status: "4.4.2".into(),
                        diagnostic: "timed out during DATA".into(),
                        remote: remote.clone(),
                    })
                }
            };
            for i in accepted {
                let o = match &per_accepted {
                    Outcome::Delivered => Outcome::Delivered,
                    Outcome::Deferred(f) => Outcome::Deferred(Failed {
                        rcpt: rcpts[i].to_owned(),
                        ..f.clone()
                    }),
                    Outcome::Failed(f) => Outcome::Failed(Failed {
                        rcpt: rcpts[i].to_owned(),
                        ..f.clone()
                    }),
                };
                out[i] = Some(o);
            }
        }
        if accepted_none {
            // MAIL was taken: clear it for the next transaction.
            client.rset().await.map_err(|e| e.to_string())?;
        }
        Ok(out.into_iter().map(|o| o.expect("every recipient answered")).collect())
    }
}

/// Whether a domain's trouble record `(failed tries in a row, when the
/// last was)` puts it in the slow lane at `now_ms`.
fn is_slow(&(n, at): &(u32, u64), now_ms: u64) -> bool {
    n >= SLOW_AFTER && now_ms.saturating_sub(at) < SLOW_FOR.as_millis() as u64
}

enum Target {
    Permanent(String),
    Temporary(String),
}

fn no_records(e: &hickory_resolver::net::NetError) -> bool {
    matches!(
        e,
        hickory_resolver::net::NetError::Dns(hickory_resolver::net::DnsError::NoRecordsFound(_))
    )
}

/// A remote reply as one line, at most 400 characters (a hostile server's
/// reply is kept in memory for the DSN).
fn one_line(s: &str) -> String {
    let mut line = s
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    if let Some((cut, _)) = line.char_indices().nth(400) {
        line.truncate(cut);
    }
    line
}

/// Opportunistic TLS: encryption against passive listeners, with no
/// certificate check (RFC 7435; MX hosts rarely have certificates for
/// their names, and refusing them would bounce mail: DANE/MTA-STS are not
/// built).
fn tls_connector() -> tokio_rustls::TlsConnector {
    mail_send::smtp::tls::build_tls_connector(true).expect("a TLS client config")
}

fn resolver(dns: Option<SocketAddr>) -> anyhow::Result<TokioResolver> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    let builder = match dns {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            TokioResolver::builder_with_config(
                ResolverConfig::from_parts(None, vec![], vec![ns]),
                hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
            )
        }
        None => TokioResolver::builder_tokio()?,
    };
    Ok(builder.build()?)
}

/// Puts a message for remote recipients in the queue (R copies, fsynced);
/// whether it was stored.
pub async fn enqueue(services: &Services, env: &Envelope, message: &[u8]) -> bool {
    let now = crate::time::now_ms();
    let id = services.mail.new_message_id(now);
    let shard = queue::shard_mailbox(queue::shard_of(&id.0));
    let out = services
        .mail
        .deliver_as(
            id,
            std::slice::from_ref(&shard),
            QUEUE_FOLDER,
            now,
            queue::encode(env, message),
        )
        .await;
    out.stored.first().copied().unwrap_or(false)
}
