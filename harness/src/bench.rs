//! Bounded load: deliver N messages over C concurrent sessions, then fetch
//! (and optionally delete) them over POP3, recording what was acknowledged
//! so that a test can check it afterwards.

use mail_auth::common::crypto::Ed25519Key;
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::client::{Pop3Client, SmtpClient, Tls, strip_received};
use crate::workload::{Rng, message, message_size, seq_of};

/// A message the load generator sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub seq: u64,
    pub user: String,
    /// blake3 of the bytes sent (before dot-stuffing).
    pub hash: [u8; 32],
    pub size: usize,
}

#[derive(Debug, Default)]
pub struct DeliverOutcome {
    /// Got a positive final reply.
    pub acked: Vec<Sent>,
    /// DATA was sent but no final reply came (the node may or may not have
    /// it); or a negative final reply came.
    pub unknown: Vec<Sent>,
    pub errors: Vec<String>,
    pub latencies_ms: Vec<f64>,
    pub secs: f64,
}

#[derive(Debug, Clone)]
pub struct DeliverPlan {
    pub addrs: Vec<SocketAddr>,
    pub lmtp: bool,
    pub messages: u64,
    pub connections: usize,
    /// Recipients are `{prefix}{i:04}@{domain}`, i in 1..=users.
    pub users: u32,
    pub prefix: String,
    pub domain: String,
    pub seed: u64,
    /// Stop after this many errors (the node may be down on purpose).
    pub max_errors: usize,
    /// Stop at this time whatever is left.
    pub max_duration: Duration,
    /// STARTTLS at the start of every session.
    pub starttls: Option<Tls>,
    /// MAIL, RCPT and DATA in one write (RFC 2920), as Postfix sends.
    pub pipelining: bool,
    /// Every message DKIM-signed with this key (`bench-checks`).
    pub dkim: Option<Arc<Signer>>,
}

/// A DKIM signer for the generator's mail.
pub struct Signer(pub DkimSigner<Ed25519Key, Done>);

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer")
    }
}

/// How much a benchmark delivers, over how many connections, to whom, and
/// how.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub messages: u64,
    pub connections: usize,
    pub users: u32,
    pub pipelining: bool,
}

impl DeliverPlan {
    /// The benchmarks' plan: users user0001..@example.com, stop after 50
    /// errors or 15 minutes.
    pub fn bench(addrs: Vec<SocketAddr>, lmtp: bool, messages: u64, connections: usize, users: u32, seed: u64) -> Self {
        DeliverPlan {
            addrs,
            lmtp,
            messages,
            connections,
            users,
            prefix: "user".into(),
            domain: "example.com".into(),
            seed,
            max_errors: 50,
            max_duration: Duration::from_secs(900),
            starttls: None,
            pipelining: false,
            dkim: None,
        }
    }

    /// The benchmarks' plan for `load`.
    pub fn for_load(addrs: Vec<SocketAddr>, lmtp: bool, load: Load, seed: u64) -> Self {
        DeliverPlan {
            pipelining: load.pipelining,
            ..DeliverPlan::bench(addrs, lmtp, load.messages, load.connections, load.users, seed)
        }
    }

    pub fn user(&self, i: u32) -> String {
        format!("{}{:04}@{}", self.prefix, i, self.domain)
    }

    /// The message with sequence number `seq`: recipient, bytes.
    pub fn message(&self, seq: u64) -> (String, Vec<u8>) {
        let mut rng = Rng::new(self.seed.wrapping_mul(1_000_003) ^ seq);
        let user = self.user(rng.range(1, self.users as u64 + 1) as u32);
        let size = message_size(&mut rng);
        let mut body = message(&mut rng, seq, "loadgen@remote.test", &user, size);
        if let Some(signature) = self.dkim.as_ref().and_then(|k| k.0.sign(&body).ok()) {
            let mut signed = signature.to_header().into_bytes();
            signed.extend_from_slice(&body);
            body = signed;
        }
        (user, body)
    }
}

/// Runs the plan; each session goes to `addrs[worker % len]`.
pub async fn deliver(plan: DeliverPlan) -> DeliverOutcome {
    let plan = Arc::new(plan);
    let next = Arc::new(AtomicU64::new(0));
    let out = Arc::new(Mutex::new(DeliverOutcome::default()));
    let start = Instant::now();
    let deadline = start + plan.max_duration;
    let mut tasks = Vec::new();
    for w in 0..plan.connections {
        let (plan, next, out) = (plan.clone(), next.clone(), out.clone());
        tasks.push(tokio::spawn(async move {
            let addr = plan.addrs[w % plan.addrs.len()];
            let mut session: Option<SmtpClient> = None;
            loop {
                if Instant::now() > deadline || out.lock().expect("lock").errors.len() >= plan.max_errors {
                    break;
                }
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= plan.messages {
                    break;
                }
                let (user, body) = plan.message(seq);
                let sent = Sent {
                    seq,
                    user: user.clone(),
                    hash: *blake3::hash(&body).as_bytes(),
                    size: body.len(),
                };
                let t0 = Instant::now();
                let mut result = Err(anyhow::anyhow!("not sent"));
                // A session the server ends (421 at MAIL: it has served
                // enough commands) is opened again and the message sent
                // once more, as an MTA does.
                for attempt in 0..2 {
                    result = async {
                        if session.is_none() {
                            let s = SmtpClient::connect(addr, plan.lmtp).await?;
                            session = Some(match &plan.starttls {
                                Some(tls) => s.starttls(tls).await?,
                                None => s,
                            });
                        }
                        let s = session.as_mut().expect("connected");
                        if plan.pipelining {
                            s.send_mail_pipelined("loadgen@remote.test", &[&user], &body).await
                        } else {
                            s.send_mail("loadgen@remote.test", &[&user], &body).await
                        }
                    }
                    .await;
                    let closed = matches!(&result, Err(e) if e.is::<crate::client::SessionClosed>());
                    if !closed {
                        break;
                    }
                    session = None;
                    if attempt == 0 {
                        continue;
                    }
                }
                let mut o = out.lock().expect("lock");
                match result {
                    Ok(replies) if replies.iter().all(|r| r.code == 250) => {
                        o.latencies_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                        o.acked.push(sent);
                    }
                    Ok(replies) => {
                        o.errors.push(format!("seq {seq}: {replies:?}"));
                        o.unknown.push(sent);
                    }
                    Err(e) => {
                        o.errors.push(format!("seq {seq}: {e:#}"));
                        o.unknown.push(sent);
                        session = None;
                    }
                }
            }
            if let Some(s) = session {
                let _ = tokio::time::timeout(Duration::from_secs(5), s.quit()).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut o = Arc::try_unwrap(out).expect("workers done").into_inner().expect("lock");
    o.secs = start.elapsed().as_secs_f64();
    o.latencies_ms.sort_by(|a, b| a.total_cmp(b));
    o
}

/// One message as read back over POP3.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub user: String,
    pub uidl: String,
    /// Sequence number from the Message-ID, if it is a harness message.
    pub seq: Option<u64>,
    /// blake3 of the message without the `Received:` header the node added
    /// (None if it had none).
    pub hash: Option<[u8; 32]>,
    pub size: usize,
}

#[derive(Debug, Default)]
pub struct RetrieveOutcome {
    pub fetched: Vec<Fetched>,
    pub errors: Vec<String>,
    /// Per RETR.
    pub latencies_ms: Vec<f64>,
    pub secs: f64,
}

/// Logs in as each user (C sessions at a time), RETRs every message and,
/// if `delete`, DELEs them all and QUITs (which commits the deletions).
pub async fn retrieve(
    addrs: Vec<SocketAddr>,
    users: Vec<(String, String)>,
    connections: usize,
    delete: bool,
) -> RetrieveOutcome {
    let users = Arc::new(Mutex::new(users));
    let out = Arc::new(Mutex::new(RetrieveOutcome::default()));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..connections {
        let (users, out, addrs) = (users.clone(), out.clone(), addrs.clone());
        tasks.push(tokio::spawn(async move {
            let addr = addrs[w % addrs.len()];
            loop {
                let Some((user, pw)) = users.lock().expect("lock").pop() else {
                    break;
                };
                let result = async {
                    let mut p = Pop3Client::connect(addr).await?;
                    p.login(&user, &pw).await?;
                    let list = p.uidl().await?;
                    let mut got = Vec::with_capacity(list.len());
                    let mut lats = Vec::with_capacity(list.len());
                    for (n, uidl) in list {
                        let t0 = Instant::now();
                        let msg = p.retr(n).await?;
                        lats.push(t0.elapsed().as_secs_f64() * 1000.0);
                        let stripped = strip_received(&msg);
                        got.push(Fetched {
                            user: user.clone(),
                            uidl,
                            seq: seq_of(stripped.unwrap_or(&msg)),
                            hash: stripped.map(|s| *blake3::hash(s).as_bytes()),
                            size: msg.len(),
                        });
                        if delete {
                            p.dele(n).await?;
                        }
                    }
                    p.quit().await?;
                    Ok::<_, anyhow::Error>((got, lats))
                }
                .await;
                let mut o = out.lock().expect("lock");
                match result {
                    Ok((got, lats)) => {
                        o.fetched.extend(got);
                        o.latencies_ms.extend(lats);
                    }
                    Err(e) => o.errors.push(format!("{user}: {e:#}")),
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut o = Arc::try_unwrap(out).expect("workers done").into_inner().expect("lock");
    o.secs = start.elapsed().as_secs_f64();
    o.latencies_ms.sort_by(|a, b| a.total_cmp(b));
    o
}

/// Indexes sent messages by sequence number.
pub fn by_seq(sent: &[Sent]) -> HashMap<u64, &Sent> {
    sent.iter().map(|s| (s.seq, s)).collect()
}
