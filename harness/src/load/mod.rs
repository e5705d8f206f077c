//! Porcupine's synthetic workload against a cluster (this file), and the
//! check of what it left behind (`verify.rs`).
//!
//! Every operation connects to a random node (as clients behind DNS round
//! robin do): an SMTP session that delivers one message to a user drawn
//! from a Zipf distribution, or a POP3 session that fetches the user's mail
//! and deletes it. Open loop at a target rate or closed loop with C
//! connections; bounded by time and by count. Every second is recorded
//! (deliveries, retrievals, errors by reply code, latency percentiles, each
//! node's stored entries, under-replicated messages), and so is every
//! message acknowledged or deleted, so that [`verify`] can check the cluster
//! afterwards.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::client::{Pop3Client, SmtpClient, strip_received};
use crate::workload::{Rng, message, message_size, percentile, seq_of};

mod verify;

pub use verify::{VerifyReport, verify};

/// Messages one POP3 session fetches at most.
const POP3_FETCH_MAX: usize = 50;

/// One node as the load sees it.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub smtp: SocketAddr,
    pub pop3: SocketAddr,
    pub admin: SocketAddr,
}

/// Users `load0001@example.org` … drawn by Zipf's law: user i (1-based)
/// with weight 1/i^s.
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u32, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n as usize);
        for i in 1..=n.max(1) {
            acc += 1.0 / (i as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    /// A user number in 1..=n.
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        self.cdf.partition_point(|c| *c < u) as u32 + 1
    }
}

/// An error key: `RETR -ERR [SYS/TEMP]` for a refusal, `RETR io` when
/// the connection failed.
fn pop3_error(cmd: &str, e: &anyhow::Error) -> String {
    let text = e.to_string();
    match text.find("-ERR") {
        Some(i) => {
            let words: Vec<&str> = text[i..].split_whitespace().take(2).collect();
            format!("{cmd} {}", words.join(" "))
        }
        None => format!("{cmd} io"),
    }
}

pub fn load_user(i: u32) -> String {
    format!("load{i:04}@example.org")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadConfig {
    pub users: u32,
    pub zipf: f64,
    /// Share of operations that are POP3 sessions (fetch and delete).
    pub pop_ratio: f64,
    /// Open loop: operations started per second; closed loop when absent.
    pub rate: Option<f64>,
    /// Closed loop: concurrent sessions; open loop: most in flight.
    pub connections: usize,
    pub duration_s: f64,
    pub max_ops: u64,
    pub seed: u64,
    pub password: String,
    /// Every operation (a delivery, a POP3 session) must end within this
    /// many seconds, else it counts as a `timeout` error: a paused or
    /// partitioned node must not stall the load.
    #[serde(default = "default_op_timeout_s")]
    pub op_timeout_s: f64,
}

pub fn default_op_timeout_s() -> f64 {
    10.0
}

/// What a load run got acknowledged and deleted, for [`verify`].
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Record {
    /// seq → (user, blake3 of the bytes sent, hex).
    pub acked: BTreeMap<u64, (String, String)>,
    /// DATA sent, no positive final reply: may or may not be stored.
    pub unknown: HashSet<u64>,
    /// Deleted by a POP3 QUIT that answered +OK.
    pub deleted: HashSet<u64>,
    /// Marked for deletion, QUIT without an answer: either state is right.
    pub maybe_deleted: HashSet<u64>,
    /// Fetched with bytes that differ from what was acknowledged.
    pub corrupt_reads: Vec<u64>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Second {
    pub t: u64,
    pub deliveries: u64,
    pub retrievals: u64,
    pub pop3_sessions: u64,
    /// Failed operations by reply code (`451`, `-ERR`, `connect`, …).
    pub errors: BTreeMap<String, u64>,
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
    /// Mailbox entries each node stored, polled once a second.
    pub node_messages: BTreeMap<String, Option<u64>>,
    pub under_replicated: Option<u64>,
    #[serde(skip)]
    latencies: Vec<f64>,
}

/// A moment in the run (a fault injected).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub t: f64,
    pub what: String,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct LoadReport {
    pub config: Option<LoadConfig>,
    pub seconds: Vec<Second>,
    pub events: Vec<Event>,
    pub elapsed_s: f64,
    pub deliveries: u64,
    pub retrievals: u64,
    pub errors: u64,
    pub delivery_p50_ms: f64,
    pub delivery_p99_ms: f64,
}

impl LoadReport {
    /// `(t, f(second))` for every whole second (the last, partial one
    /// would look like a drop), each at its middle.
    pub fn points(&self, f: impl Fn(&Second) -> f64) -> Vec<(f64, f64)> {
        let whole = self.elapsed_s.floor() as u64;
        self.seconds
            .iter()
            .filter(|s| s.t < whole)
            .map(|s| (s.t as f64 + 0.5, f(s)))
            .collect()
    }

    /// Deliveries a second, as a chart draws them.
    pub fn deliveries_series(&self) -> crate::chart::Series {
        crate::chart::Series {
            name: "deliveries/s".into(),
            points: self.points(|s| s.deliveries as f64),
            color: crate::chart::PALETTE[0],
        }
    }

    /// Errors a second, as a chart draws them.
    pub fn errors_series(&self) -> crate::chart::Series {
        crate::chart::Series {
            name: "errors/s".into(),
            points: self.points(|s| s.errors.values().sum::<u64>() as f64),
            color: crate::chart::PALETTE[5],
        }
    }

    /// The faults injected, as chart markers.
    pub fn markers(&self) -> Vec<crate::chart::Marker> {
        self.events
            .iter()
            .map(|e| crate::chart::Marker {
                x: e.t,
                label: e.what.clone(),
            })
            .collect()
    }

    /// Deliveries and retrievals per second over the whole seconds after
    /// the first `warmup` (first logins pay the password hash on every
    /// node; a scaling comparison leaves that out).
    pub fn rates_after(&self, warmup: u64) -> (f64, f64) {
        let whole = self.elapsed_s.floor() as u64;
        let span: Vec<&Second> = self.seconds.iter().filter(|s| s.t >= warmup && s.t < whole).collect();
        if span.is_empty() {
            return (0.0, 0.0);
        }
        let n = span.len() as f64;
        (
            span.iter().map(|s| s.deliveries).sum::<u64>() as f64 / n,
            span.iter().map(|s| s.retrievals).sum::<u64>() as f64 / n,
        )
    }
}

/// Shared state of a running load.
pub struct Run {
    pub cfg: LoadConfig,
    pub targets: RwLock<Vec<Target>>,
    start: Instant,
    seconds: Mutex<Vec<Second>>,
    record: Mutex<Record>,
    events: Mutex<Vec<Event>>,
    next_seq: AtomicU64,
    ops: AtomicU64,
    stop: AtomicBool,
    zipf: Zipf,
    all_latencies: Mutex<Vec<f64>>,
}

impl Run {
    pub fn new(cfg: LoadConfig, targets: Vec<Target>) -> Arc<Run> {
        let zipf = Zipf::new(cfg.users, cfg.zipf);
        Arc::new(Run {
            cfg,
            targets: RwLock::new(targets),
            start: Instant::now(),
            seconds: Mutex::new(Vec::new()),
            record: Mutex::new(Record::default()),
            events: Mutex::new(Vec::new()),
            // Sequence numbers unique across runs (messages of earlier runs
            // may still be in the mailboxes): the start time in ms, × 1000.
            next_seq: AtomicU64::new(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64)
                    * 1000,
            ),
            ops: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            zipf,
            all_latencies: Mutex::new(Vec::new()),
        })
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn event(&self, what: impl Into<String>) {
        let t = self.elapsed().as_secs_f64();
        self.events.lock().expect("lock").push(Event { t, what: what.into() });
    }

    pub fn add_target(&self, t: Target) {
        self.targets.write().expect("lock").push(t);
    }

    fn second<T>(&self, f: impl FnOnce(&mut Second) -> T) -> T {
        let t = self.elapsed().as_secs();
        let mut s = self.seconds.lock().expect("lock");
        while s.len() as u64 <= t {
            let n = s.len() as u64;
            s.push(Second {
                t: n,
                ..Second::default()
            });
        }
        f(&mut s[t as usize])
    }

    fn error(&self, code: impl Into<String>) {
        let code = code.into();
        self.second(|s| *s.errors.entry(code).or_default() += 1);
    }

    fn pick_target(&self, rng: &mut Rng) -> Option<Target> {
        let t = self.targets.read().expect("lock");
        if t.is_empty() {
            return None;
        }
        Some(t[rng.range(0, t.len() as u64) as usize].clone())
    }

    /// Whether another operation may start (time and count bounds).
    fn more(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && self.elapsed().as_secs_f64() < self.cfg.duration_s
            && self.ops.fetch_add(1, Ordering::Relaxed) < self.cfg.max_ops
    }

    pub fn ops_done(&self) -> u64 {
        self.ops.load(Ordering::Relaxed).min(self.cfg.max_ops)
    }

    pub fn counts(&self) -> (u64, u64, u64) {
        let s = self.seconds.lock().expect("lock");
        let d = s.iter().map(|x| x.deliveries).sum();
        let r = s.iter().map(|x| x.retrievals).sum();
        let e = s.iter().map(|x| x.errors.values().sum::<u64>()).sum();
        (d, r, e)
    }

    async fn one_op(&self, rng: &mut Rng) {
        let Some(target) = self.pick_target(rng) else { return };
        let user = load_user(self.zipf.sample(rng));
        let pop = (rng.next_u64() % 10_000) as f64 / 10_000.0 < self.cfg.pop_ratio;
        let deadline = Duration::from_secs_f64(self.cfg.op_timeout_s.max(0.001));
        if pop {
            if tokio::time::timeout(deadline, self.pop_session(&target, &user))
                .await
                .is_err()
            {
                // Marked deletions were not confirmed: the session never
                // answered QUIT, so the server keeps them (RFC 1939).
                self.error("timeout");
            }
        } else {
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            if tokio::time::timeout(deadline, self.deliver(&target, &user, seq, rng))
                .await
                .is_err()
            {
                // Cut anywhere: maybe stored, maybe not.
                self.record.lock().expect("lock").unknown.insert(seq);
                self.error("timeout");
            }
        }
    }

    async fn deliver(&self, target: &Target, user: &str, seq: u64, rng: &mut Rng) {
        let mut mrng = Rng::new(self.cfg.seed.wrapping_mul(1_000_003) ^ seq);
        let body = message(&mut mrng, seq, "loadgen@remote.test", user, message_size(rng));
        let hash = blake3::hash(&body).to_hex().to_string();
        let t0 = Instant::now();
        let mut client = match SmtpClient::connect(target.smtp, false).await {
            Ok(c) => c,
            Err(_) => {
                self.error("connect");
                return;
            }
        };
        match client.send_mail("loadgen@remote.test", &[user], &body).await {
            Ok(replies) if replies.iter().all(|r| r.is_ok()) => {
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                self.record
                    .lock()
                    .expect("lock")
                    .acked
                    .insert(seq, (user.to_owned(), hash));
                self.second(|s| {
                    s.deliveries += 1;
                    s.latencies.push(ms);
                });
                self.all_latencies.lock().expect("lock").push(ms);
                let _ = client.quit().await;
            }
            Ok(replies) => {
                let code = replies.iter().find(|r| !r.is_ok()).map_or(0, |r| r.code);
                self.record.lock().expect("lock").unknown.insert(seq);
                self.error(code.to_string());
            }
            Err(_) => {
                self.record.lock().expect("lock").unknown.insert(seq);
                self.error("smtp-io");
            }
        }
    }

    async fn pop_session(&self, target: &Target, user: &str) {
        let mut p = match Pop3Client::connect(target.pop3).await {
            Ok(p) => p,
            Err(_) => return self.error("connect"),
        };
        if let Err(e) = p.login(user, &self.cfg.password).await {
            // Why, as the other commands say it: a node shutting down
            // answers `-ERR [SYS/TEMP]`, a refused password `-ERR [AUTH]`.
            let code = if e.to_string().contains("IN-USE") {
                "-ERR in-use".to_owned()
            } else {
                pop3_error("login", &e)
            };
            return self.error(code);
        }
        let list = match p.uidl().await {
            Ok(l) => l,
            Err(e) => return self.error(pop3_error("UIDL", &e)),
        };
        let mut marked = Vec::new();
        for (n, _) in list.into_iter().take(POP3_FETCH_MAX) {
            let msg = match p.retr(n).await {
                Ok(m) => m,
                Err(e) => return self.error(pop3_error("RETR", &e)),
            };
            let original = strip_received(&msg).unwrap_or(&msg);
            if let Some(seq) = seq_of(original) {
                let hash = blake3::hash(original).to_hex().to_string();
                let mut r = self.record.lock().expect("lock");
                if r.acked.get(&seq).is_some_and(|(_, h)| *h != hash) {
                    r.corrupt_reads.push(seq);
                }
                marked.push(seq);
            }
            self.second(|s| s.retrievals += 1);
            if let Err(e) = p.dele(n).await {
                return self.error(pop3_error("DELE", &e));
            }
        }
        // Either state is right until QUIT answers (the session may also be
        // cut here by the operation deadline, after the server deleted).
        self.record
            .lock()
            .expect("lock")
            .maybe_deleted
            .extend(marked.iter().copied());
        if p.quit().await.is_ok() {
            let mut r = self.record.lock().expect("lock");
            for seq in &marked {
                r.maybe_deleted.remove(seq);
            }
            r.deleted.extend(marked);
        }
        self.second(|s| s.pop3_sessions += 1);
    }

    /// Runs the operations until the bounds; returns when all have ended.
    pub async fn drive(self: &Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        match self.cfg.rate {
            None => {
                for w in 0..self.cfg.connections.max(1) {
                    let run = self.clone();
                    tasks.spawn(async move {
                        let mut rng = Rng::new(run.cfg.seed ^ ((w as u64 + 1) << 32));
                        while run.more() {
                            run.one_op(&mut rng).await;
                        }
                    });
                }
            }
            Some(rate) => {
                let limit = Arc::new(tokio::sync::Semaphore::new(self.cfg.connections.max(1)));
                let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut n = 0u64;
                loop {
                    tick.tick().await;
                    if !self.more() {
                        break;
                    }
                    n += 1;
                    // Open loop: an operation that finds every slot busy is
                    // not started late; it counts as shed load.
                    let Ok(permit) = limit.clone().try_acquire_owned() else {
                        self.error("shed");
                        continue;
                    };
                    let run = self.clone();
                    tasks.spawn(async move {
                        let mut rng = Rng::new(run.cfg.seed ^ (n << 20));
                        run.one_op(&mut rng).await;
                        drop(permit);
                    });
                    while tasks.try_join_next().is_some() {}
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Polls the cluster's status once a second (through any node that
    /// answers) into the per-second figures, until `stop`.
    pub async fn poll_status(self: Arc<Self>, token: String) {
        while !self.stop.load(Ordering::Relaxed) {
            let targets = self.targets.read().expect("lock").clone();
            for t in targets {
                let r = tokio::time::timeout(
                    Duration::from_millis(800),
                    quill_node::admin::client::call(
                        &t.admin.to_string(),
                        &token,
                        hyper::Method::GET,
                        "/v1/cluster/status",
                        None,
                    ),
                )
                .await;
                if let Ok(Ok((200, s))) = r {
                    let nodes: BTreeMap<String, Option<u64>> = s["nodes"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|n| (n["name"].as_str().unwrap_or("?").to_owned(), n["messages"].as_u64()))
                                .collect()
                        })
                        .unwrap_or_default();
                    let under = s["under_replicated"].as_u64();
                    self.second(|sec| {
                        sec.node_messages = nodes;
                        sec.under_replicated = under;
                    });
                    break;
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    pub fn report(&self) -> LoadReport {
        let mut seconds = self.seconds.lock().expect("lock").clone();
        for s in &mut seconds {
            s.latencies.sort_by(|a, b| a.total_cmp(b));
            s.delivery_p50_ms = percentile(&s.latencies, 50.0);
            s.delivery_p99_ms = percentile(&s.latencies, 99.0);
            if s.latencies.is_empty() {
                (s.delivery_p50_ms, s.delivery_p99_ms) = (0.0, 0.0);
            }
        }
        let mut all = self.all_latencies.lock().expect("lock").clone();
        all.sort_by(|a, b| a.total_cmp(b));
        let (deliveries, retrievals, errors) = self.counts();
        LoadReport {
            config: Some(self.cfg.clone()),
            seconds,
            events: self.events.lock().expect("lock").clone(),
            elapsed_s: self.elapsed().as_secs_f64(),
            deliveries,
            retrievals,
            errors,
            delivery_p50_ms: percentile(&all, 50.0),
            delivery_p99_ms: percentile(&all, 99.0),
        }
    }

    pub fn record(&self) -> Record {
        self.record.lock().expect("lock").clone()
    }
}

/// Creates the load users (those missing) through one node's admin API.
pub async fn ensure_users(admin: SocketAddr, token: &str, users: u32, password: &str) -> anyhow::Result<()> {
    let addr = admin.to_string();
    let call = |m, path: String, body| {
        let addr = addr.clone();
        async move { quill_node::admin::client::call(&addr, token, m, &path, body).await }
    };
    let (_, existing) = call(hyper::Method::GET, "/v1/users".into(), None).await?;
    let have: HashSet<String> = existing
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u["address"].as_str().or(u.as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let (_, domains) = call(hyper::Method::GET, "/v1/domains".into(), None).await?;
    if !domains.to_string().contains("\"example.org\"") {
        let (code, body) = call(
            hyper::Method::POST,
            "/v1/domains".into(),
            Some(serde_json::json!({ "domain": "example.org" })),
        )
        .await?;
        if !(200..300).contains(&code) {
            anyhow::bail!("cannot create domain example.org: HTTP {code} {body}");
        }
    }
    for i in 1..=users {
        let u = load_user(i);
        if have.contains(&u) {
            continue;
        }
        let (code, body) = call(
            hyper::Method::POST,
            "/v1/users".into(),
            Some(serde_json::json!({ "address": u, "password": password })),
        )
        .await?;
        if !(200..300).contains(&code) {
            anyhow::bail!("cannot create {u}: HTTP {code} {body}");
        }
    }
    Ok(())
}

pub fn write_json(path: &Path, v: &impl Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_vec_pretty(v)?).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(100, 1.0);
        let mut rng = Rng::new(3);
        let mut counts = vec![0u32; 101];
        for _ in 0..100_000 {
            let u = z.sample(&mut rng);
            assert!((1..=100).contains(&u));
            counts[u as usize] += 1;
        }
        // Weight 1/i: user 1 about twice user 2 and ten times user 10.
        let r2 = counts[1] as f64 / counts[2] as f64;
        let r10 = counts[1] as f64 / counts[10] as f64;
        assert!((1.8..2.2).contains(&r2), "{r2}");
        assert!((8.5..11.5).contains(&r10), "{r10}");
        let flat = Zipf::new(10, 0.0);
        let mut c = [0u32; 11];
        for _ in 0..50_000 {
            c[flat.sample(&mut rng) as usize] += 1;
        }
        assert!(c[1..].iter().all(|&n| (4_500..5_500).contains(&n)), "{c:?}");
    }
}
