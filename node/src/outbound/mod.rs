//! Outbound delivery: every node works the queue shards it owns (the
//! owner is `quill_proto::queue::owner_of` over the nodes the current
//! view has up and not `--role in`), delivering each entry's pending
//! recipients to their domains' mail exchangers (`mx`) or to
//! `--relay-host`, with one connection per domain for all of its
//! recipients (`client`). What a try's outcomes mean (ends, bounces, a
//! delay warning, the next try, the slow lane) is decided by the protocol
//! cores (`quill_proto::queue`); this module performs it.
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
//! Slow destinations: a domain whose tries keep failing moves to the slow
//! lane, whose few slots it shares with the other slow domains, so a dead
//! domain cannot take the slots of the healthy ones. Retry and lane state
//! is soft: a new owner starts over (tries at once), which costs an early
//! retry, never a message.
//!
//! DKIM: each try of an entry is signed at send time (`crate::dkim`) with
//! the newest cluster key of its `From:` domain, else of its envelope
//! sender's domain, else not at all; the signature goes in front of the
//! bytes sent, never into the stored copy, and a signing failure sends the
//! message unsigned rather than holding it.
//!
//! # Ownership, fencing and the queue's data
//! A queued message is mail like any other: it is stored with the same
//! front end and replica protocol (R copies, fsync before `250`) in one of
//! 32 **queue shards**, mailboxes `queue~K` (no user has that name: user
//! mailboxes hold an `@`), folder `QUEUE`, its body an envelope (sender,
//! recipients, time queued, submitter; JSON behind a magic) in front of the
//! message (`node/src/queue.rs`, pure: encoding, retry schedule, loop
//! checks, the RFC 3464 DSN). **Ownership**: a shard's owner is chosen by
//! rendezvous hashing (`outbound::owner_of`: the highest blake3 of shard and
//! node id) over the nodes the current view has up and that work the queue
//! (not `--role in`, which the view carries in `NodeAddrs::inbound_only`),
//! so the shards spread over every such node and move within a
//! failure-detector timeout when an owner dies; a node that comes back takes
//! only its own shards back.
//! The fence is Raft's: a node works shards only while it is in touch with
//! a majority (`Membership::in_quorum`: a follower that knows a leader, a
//! leader acknowledged by a quorum within 3 s), so the minority side of a
//! partition lets its shards go within an election timeout while the
//! majority's new view gives them to others (tested with iptables: the
//! cut-off owner stops, the others deliver everything once). Two nodes that
//! disagree about the view may still both work a shard for the moment a view
//! change takes to apply everywhere; what makes that safe is that each
//! recipient's end is a flag register of the entry (`rcpt-ok:I`, `rcpt-failed:I`), written to every
//! replica before the entry is deleted, and an owner only tries recipients
//! without an end: delivery is at least once, and exactly once unless a
//! transaction is cut between the end of DATA and the reply
//! (`quill_outbound_cut_transactions_total`). An owner never tries again
//! an entry it finished: one that a listing still shows (made before the
//! deletion reached a replica, or a copy a rebalance move left on a node
//! the deletion did not name) is deleted again, not sent. **The worker**
//! (`node/src/outbound.rs`) looks at its shards every 500 ms, works at most
//! 256 entries at once, groups an entry's pending recipients by domain and
//! sends each group over one connection (mail-send's client, opportunistic
//! STARTTLS), to `--relay-host` or to the MX hosts by preference (hickory
//! resolver; implicit MX; null MX bounces at once). Lanes: 100 connections
//! in all, 20 per domain, optionally a token bucket of
//! `--outbound-rate-per-destination` transactions a second per domain; a domain with 3 failed tries in a row takes the
//! slow lane (4 slots for all such domains, 1 per domain) for 10 minutes
//! after its last failure. Retry state (tries, next try, last errors) is
//! soft, in the owner's memory: a new owner tries at once, which costs an
//! early retry, never a message; the lifetime counts from the envelope's
//! time queued, which is replicated. A recipient that failed (5xx, or the
//! lifetime ran out) gets a DSN to the envelope sender (the sender's mailbox
//! if local; else queued with `MAIL FROM:<>`, so a bounce never bounces).
//! **Backpressure**: the bounds are on this node's stored share of the queue
//! (counted every 500 ms from the local store); past them submission answers
//! RCPT for remote recipients with `451 4.3.1`. Operators act through flag
//! registers too: `hold`/`release` set `held`, `retry` stamps `retry` with
//! an HLC newer than the owner's last try.

mod client;
mod mx;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quill_proto::queue::{self, Envelope, Failed, LaneChange, Lanes, Outcome, Retry};
use replication::replica::Listed;
use replication::{FlagMark, MarkChange, MessageId};
use tokio::sync::{Semaphore, watch};
use tracing::{debug, info, warn};

use crate::mail::{NewMail, store_as, store_one};
use crate::metrics::QueueGauge;
use crate::services::Services;
use crate::time::now_ms;
use client::Sender;
use mx::{MX_TRIED_MAX, Mx, Target};

/// The folder queue entries are kept in.
pub const QUEUE_FOLDER: &str = "QUEUE";
/// How often the owner looks at its shards.
const TICK: Duration = Duration::from_millis(500);
/// Queue entries being worked at once (each holds its body in memory).
const ENTRIES_IN_FLIGHT_MAX: usize = 256;

/// How this node delivers.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Send everything to this smarthost instead of looking up MX records.
    pub relay_host: Option<String>,
    /// The port of mail exchangers (25; tests use another).
    pub mx_port: u16,
    /// Domains delivered to at once. (Connections per domain, retries and
    /// the queue's bounds are cluster settings: `Limits::queue`.)
    pub concurrency: usize,
    /// Slots of the slow lane (shared by every slow domain).
    pub slow_lane: usize,
    /// Whether this node works queue shards (`--role out` or both).
    pub works_queue: bool,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            relay_host: None,
            mx_port: 25,
            concurrency: 100,
            slow_lane: 4,
            works_queue: true,
        }
    }
}

#[derive(Default)]
struct State {
    retry: HashMap<MessageId, Retry>,
    busy: HashSet<MessageId>,
    /// Entries this node finished (every recipient ended, the entry
    /// deleted), kept while a listing still shows them: a listing made
    /// before the deletion reached a replica, or a copy that a move left on
    /// a node the deletion did not name, must not be sent again.
    done: HashMap<MessageId, Instant>,
    lanes: Lanes,
    /// Per domain: its own connection slots.
    domains: HashMap<String, Arc<Semaphore>>,
}

/// Whether this node owns a queue shard (now).
pub type Owner = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// The owner of queue shard `shard` under `view`: of the nodes that are up
/// and work the queue, see `quill_proto::queue::owner_of`.
pub fn owner_of(view: &membership::ClusterView, shard: &str) -> Option<u64> {
    let candidates = view
        .nodes
        .values()
        .filter(|n| n.state == membership::NodeState::Up && !n.addrs.inbound_only)
        .map(|n| n.id);
    queue::owner_of(shard, candidates)
}

pub struct Outbound {
    services: Arc<Services>,
    owner: Owner,
    cfg: OutboundConfig,
    mx: Mx,
    sender: Sender,
    state: Mutex<State>,
    lane: Arc<Semaphore>,
    slow: Arc<Semaphore>,
    /// Entries being worked (see [`ENTRIES_IN_FLIGHT_MAX`]).
    work: Arc<Semaphore>,
    /// Told when an entry is done while others wait for a slot.
    freed: tokio::sync::Notify,
    /// The origin of the monotonic times the rate buckets are kept in.
    started: Instant,
    /// DKIM signatures with the cluster's keys (`crate::dkim`).
    dkim: Arc<crate::dkim::Signer>,
}

impl Outbound {
    /// The queue's policy in force now (a cluster setting may change it).
    fn policy(&self) -> crate::services::QueuePolicy {
        self.services.limits().queue
    }

    pub fn new(
        services: Arc<Services>,
        cfg: OutboundConfig,
        owner: Owner,
        dkim: Arc<crate::dkim::Signer>,
    ) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Outbound {
            mx: Mx::new(cfg.relay_host.clone(), &services.dns, cfg.mx_port)?,
            sender: Sender::new(services.queue.cut_transactions.clone()),
            services,
            owner,
            lane: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            slow: Arc::new(Semaphore::new(cfg.slow_lane.max(1))),
            work: Arc::new(Semaphore::new(ENTRIES_IN_FLIGHT_MAX)),
            freed: tokio::sync::Notify::new(),
            cfg,
            state: Mutex::new(State::default()),
            started: Instant::now(),
            dkim,
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
        self.gauge().held_messages.set(n);
        self.gauge().held_bytes.set(bytes);
    }

    /// One look at the owned shards; whether due entries were left for
    /// want of a slot.
    async fn tick(self: Arc<Self>) -> bool {
        let now = now_ms();
        let started = Instant::now();
        let mut backlog = false;
        self.sender.prune();
        let (mut owned, mut oldest) = (0u64, 0u64);
        let mut seen: HashSet<MessageId> = HashSet::new();
        for k in 0..queue::SHARDS {
            let shard = queue::shard_mailbox(k);
            if !(self.owner)(&shard) {
                continue;
            }
            let mut finished: Vec<Listed> = Vec::new();
            for entry in self.services.mail.mailbox(&shard).await {
                let id = entry.meta.id;
                seen.insert(id);
                if self.state().done.contains_key(&id) {
                    finished.push(entry);
                    continue;
                }
                owned += 1;
                oldest = oldest.max(now.saturating_sub(entry.meta.arrival_ms));
                if entry.meta.marks.has("held") {
                    continue;
                }
                // `quill admin queue retry` stamps a flag: newer than the
                // last try, it makes the entry due now.
                let retry_stamp = entry
                    .meta
                    .marks
                    .flags
                    .iter()
                    .filter(|f| f.name == "retry" && f.set)
                    .map(|f| replication::hlc::to_ms(f.hlc))
                    .max();
                let due = {
                    let st = self.state();
                    let due = st.retry.get(&id).is_none_or(|r| r.due(retry_stamp, now));
                    due && !st.busy.contains(&id)
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
            self.delete_again(&shard, &finished).await;
        }
        self.gauge().owned_messages.set(owned);
        self.gauge().oldest_ms.set(oldest);
        let slow = {
            let mut st = self.state();
            // Retry state of entries no longer here (done through another
            // owner, removed, or in a shard this node gave up) goes.
            let State { retry, busy, done, .. } = &mut *st;
            retry.retain(|id, _| seen.contains(id) || busy.contains(id));
            // A finished entry is forgotten once a listing made after its
            // deletion no longer shows it.
            done.retain(|id, at| seen.contains(id) || *at >= started);
            st.lanes.slow_count(now)
        };
        self.gauge().slow_domains.set(slow as u64);
        backlog
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
        let (env, message) = match queue::decode(&body) {
            Ok(d) => d,
            Err(queue::EnvelopeError::Newer) => {
                // A newer release's entry (a node of it owns the shard
                // once this one is upgraded): left as it is.
                debug!(id = %entry.meta.id, "queue entry of a newer release: left alone");
                self.defer(entry.meta.id, BTreeMap::new());
                return;
            }
            Err(queue::EnvelopeError::Invalid) => {
                warn!(id = %entry.meta.id, "queue entry without an envelope: removed");
                let _ = self.services.mail.delete(shard, std::slice::from_ref(&entry)).await;
                return;
            }
        };
        let marks = &entry.meta.marks;
        let ended = |i: usize| marks.has(&queue::ok_flag(i)) || marks.has(&queue::failed_flag(i));
        let by_domain = queue::pending_by_domain(&env.rcpts, ended);
        let outcomes: BTreeMap<usize, Outcome> = if self.policy().schedule.expired(env.queued_ms, now_ms()) {
            let last = self
                .state()
                .retry
                .get(&entry.meta.id)
                .map(|r| r.last.clone())
                .unwrap_or_default();
            let pending: Vec<usize> = by_domain.values().flatten().copied().collect();
            queue::expired(&env, &pending, &last)
        } else {
            // Signed at send time, once per try of the entry: the stored
            // copy stays as it came (a key added or removed meanwhile
            // applies to the next try), and bounces quote it unsigned.
            let signed: Option<Vec<u8>> = self.dkim.signature(&env.from, message).map(|sig| {
                let mut m = Vec::with_capacity(sig.len() + message.len());
                m.extend_from_slice(sig.as_bytes());
                m.extend_from_slice(message);
                m
            });
            let sent: &[u8] = signed.as_deref().unwrap_or(message);
            let tries = by_domain.iter().map(|(domain, idxs)| {
                let env = &env;
                async move {
                    let rcpts: Vec<&str> = idxs.iter().map(|i| env.rcpts[*i].as_str()).collect();
                    let results = self.deliver_domain(domain, &env.from, &rcpts, sent).await;
                    idxs.iter().copied().zip(results).collect::<Vec<_>>()
                }
            });
            futures::future::join_all(tries).await.into_iter().flatten().collect()
        };
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
        let marks = &entry.meta.marks;
        let s = queue::settle(
            env,
            outcomes,
            |f| marks.has(f),
            self.policy().delay_warning_ms,
            now_ms(),
        );
        let g = self.gauge();
        g.delivered.inc_by(s.n_delivered);
        g.failed.inc_by(s.failed.len() as u64);
        g.deferred.inc_by(s.deferred.len() as u64);
        if s.bounce {
            self.bounce(env, message, &s.failed, false, &entry.meta.id).await;
        }
        if s.warn {
            let delayed: Vec<Failed> = s.deferred.values().cloned().collect();
            self.bounce(env, message, &delayed, true, &entry.meta.id).await;
        }
        // Every recipient ended: the deletion (a tombstone on every replica,
        // durable like a flag) is the record; no flags first.
        if s.all_ended
            && self
                .services
                .mail
                .delete(shard, std::slice::from_ref(entry))
                .await
                .is_ok()
        {
            let mut st = self.state();
            st.retry.remove(&entry.meta.id);
            st.done.insert(entry.meta.id, Instant::now());
            debug!(id = %entry.meta.id, "queue entry done");
            return;
        }
        if !s.flags.is_empty() {
            let change = MarkChange {
                id: entry.meta.id,
                folder: None,
                flags: s
                    .flags
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
        self.defer(entry.meta.id, s.deferred);
    }

    /// Deletes again, without a try, entries this node already finished
    /// that a listing still shows: from the holders that showed them.
    async fn delete_again(&self, shard: &str, finished: &[Listed]) {
        let stale: Vec<Listed> = {
            let st = self.state();
            finished
                .iter()
                .filter(|e| !st.busy.contains(&e.meta.id))
                .cloned()
                .collect()
        };
        if stale.is_empty() {
            return;
        }
        info!(
            shard,
            entries = stale.len(),
            "finished queue entries seen again (a late replica or a moved copy): deleted again, not sent"
        );
        if let Err(e) = self.services.mail.delete(shard, &stale).await {
            warn!(shard, error = %e, "finished queue entries not deleted again; tried at the next look");
        }
    }

    fn defer(&self, id: MessageId, last: BTreeMap<usize, Failed>) {
        let schedule = self.policy().schedule;
        self.state()
            .retry
            .entry(id)
            .or_default()
            .defer(&schedule, now_ms(), last);
    }

    /// A DSN to the envelope sender: into the sender's mailbox if local,
    /// else queued (with the null sender, so it never bounces again).
    async fn bounce(&self, env: &Envelope, message: &[u8], failed: &[Failed], delayed: bool, id: &MessageId) {
        let now = now_ms();
        let report = queue::dsn(&self.helo_name(), env, message, failed, delayed, now, &id.to_hex());
        self.gauge().bounces.inc();
        let stored = match self.services.routing.resolve(&env.from) {
            membership::Recipient::Local(user) => {
                store_one(&*self.services.mail, &user.mailbox(), "INBOX", now, report)
                    .await
                    .is_some()
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
        if domain.is_empty() {
            return Outcome::all(rcpts, true, "5.1.3", "the recipient address has no domain", None);
        }
        // A lane slot (the slow lane for domains in trouble), then one of
        // the domain's own.
        let (slow, domain_sem) = {
            let mut st = self.state();
            let slow = st.lanes.is_slow(domain, now_ms());
            let per = if slow { 1 } else { self.policy().per_destination.max(1) };
            let sem = st
                .domains
                .entry(domain.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(per)))
                .clone();
            (slow, sem)
        };
        let lane = if slow { self.slow.clone() } else { self.lane.clone() };
        let (Ok(_lane), Ok(_slot)) = (lane.acquire_owned().await, domain_sem.acquire_owned().await) else {
            return Outcome::all(rcpts, false, "4.3.2", "shutting down", None);
        };
        let wait = self
            .state()
            .lanes
            .rate_wait(domain, self.policy().rate_per_destination, self.started.elapsed());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        let targets = match self.mx.targets(domain).await {
            Ok(t) => t,
            Err(Target::Permanent(why)) => return Outcome::all(rcpts, true, "5.1.10", &why, None),
            Err(Target::Temporary(why)) => {
                info!(domain, %why, "no mail exchanger found now; deferred");
                self.note_trouble(domain, true);
                return Outcome::all(rcpts, false, "4.4.3", &why, None);
            }
        };
        let mut last = "no mail exchanger answered".to_owned();
        let helo = self.helo_name();
        for (host, addr) in targets.into_iter().take(MX_TRIED_MAX) {
            match self.sender.transaction(&helo, &host, addr, from, rcpts, message).await {
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
        Outcome::all(rcpts, false, "4.4.1", &last, None)
    }

    fn note_trouble(&self, domain: &str, bad: bool) {
        let mut st = self.state();
        match st.lanes.note(domain, bad, now_ms()) {
            Some(LaneChange::ToSlow) => {
                info!(domain, "destination keeps failing: moved to the slow lane");
                // Its own slots shrink to one (made again on next use).
                st.domains.remove(domain);
            }
            Some(LaneChange::BackFromSlow) => {
                info!(domain, "destination answers again: back from the slow lane");
                st.domains.remove(domain);
            }
            None => {}
        }
    }
}

/// Puts a message for remote recipients in the queue (R copies, fsynced);
/// whether it was stored.
pub async fn enqueue(services: &Services, env: &Envelope, message: &[u8]) -> bool {
    let now = now_ms();
    // The shard is the id's: an entry is found again by its id alone.
    let id = services.mail.new_message_id(now);
    let shard = queue::shard_mailbox(queue::shard_of(&id.0));
    let m = NewMail {
        id,
        mailboxes: &[shard],
        folder: QUEUE_FOLDER,
        arrival_ms: now,
        body: queue::encode(env, message),
    };
    store_as(&*services.mail, m).await.is_some()
}
