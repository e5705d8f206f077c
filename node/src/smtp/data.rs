//! DATA: the message read line by line through the protocol cores'
//! smuggling-proof reader within the node's memory budget, checked (loops,
//! submission's `From:`), stored on R nodes per mailbox or queued for
//! remote recipients, and answered once it is on disk.

use std::time::Duration;

use quill_proto::data::{DATA_LINE_BYTES_MAX, DataReader, Refusal, Step};
use quill_proto::line::LineSplitter;
use quill_proto::message::{from_all, is_loop};
use quill_proto::smtp::{Mode, REPLY_DATA_GO_AHEAD, Rcpt, Reply, data_reply, refusal_reply, unique_recipients};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite};
use tracing::{info, warn};

use super::{Session, deliver};
use crate::edge::verify::{Action, Verdict};
use crate::metrics::Latencies;
use crate::services::DATA_BUDGET_CHUNK;
use crate::time::now_ms;

/// How a DATA section ended.
enum Body {
    /// With its share of the node's memory budget, held until delivered.
    Ok(Vec<u8>, Option<tokio::sync::OwnedSemaphorePermit>),
    Refused(Refusal),
    Closed,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// DATA; false ends the session.
    pub(super) async fn data(&mut self) -> std::io::Result<bool> {
        let rcpts = match self.state.data_check() {
            Ok(r) => r,
            Err(r) => return self.send(r).await,
        };
        if self.state.has_remote()
            && let Some(user) = self.state.authed.clone()
            && let Err(reply) = self.services.routing.spend_sending_allowance(&user, false).await
        {
            self.state.tx = None;
            return self.send(Reply::limit(reply)).await;
        }
        self.io.reply(REPLY_DATA_GO_AHEAD).await?;
        self.io.flush().await?;
        let arrival_ms = now_ms();
        let id = self.services.mail.new_message_id(arrival_ms);
        // One copy per mailbox; the header names addresses.
        let (unique, addresses) = unique_recipients(&rcpts);
        let ip = self.peer.ip().to_string();
        let received = self
            .state
            .received_header(&ip, self.io.tls(), &id.to_hex(), &addresses, arrival_ms);
        let (body, _budget) = match self.read_body(received).await? {
            Body::Ok(b, budget) => (b, budget),
            Body::Closed => return Ok(false),
            Body::Refused(why) => {
                self.state.tx = None;
                match why {
                    Refusal::BareLineEnd => warn!("message with a bare CR or LF refused"),
                    Refusal::NoMemory => {
                        warn!("message refused: the node's memory budget for messages is spent")
                    }
                    Refusal::TooBig | Refusal::LineTooLong => {}
                }
                return self.send(Reply::limit(refusal_reply(why))).await;
            }
        };
        // A message that has been through too many hops is looping (RFC
        // 5321 6.3), as is one that says it was already delivered to one
        // of its recipients here. (`body` starts with this node's own
        // `Received:`.)
        if is_loop(&body, rcpts.iter().map(|r| r.address.as_str())) {
            self.state.tx = None;
            warn!("message refused: mail loop");
            let r = Reply::limit("554 5.4.6 Too many hops or already delivered here: mail loop detected");
            return self.send(r).await;
        }
        // Checked at the edge (`--smtp`): SPF, DKIM, DMARC, ARC, iprev; a
        // claim of our own results by the sender is taken out first.
        let (body, verdict) = match self.check(body).await {
            Ok(checked) => checked,
            Err(text) => {
                self.state.tx = None;
                return self.send(Reply::ok(text)).await;
            }
        };
        // Submission: every From: address must be the authenticated user.
        if self.state.mode == Mode::Submission
            && let Some(user) = &self.state.authed
            && !from_all(&body, |a| self.state.send_as.allows(user, a))
        {
            self.state.tx = None;
            return self
                .send(Reply::ok("553 5.7.1 From: header not owned by the authenticated user"))
                .await;
        }
        let size = body.len();
        let (from, remote, forward) = self
            .state
            .tx
            .take()
            .map(|t| (t.mail_from, t.remote, t.forward))
            .unwrap_or_default();
        // For `quill admin top`: who sends, to whom, from where.
        self.services.activity.note_message(
            self.peer.ip(),
            &from,
            rcpts
                .iter()
                .map(|r| r.address.as_str())
                .chain(remote.iter().map(String::as_str)),
        );
        // Forwarded by aliases: queued with the sender rewritten (SRS).
        let forwarded = if forward.is_empty() {
            true
        } else {
            self.forward(&from, &rcpts, forward, &body, arrival_ms).await
        };
        // Remote recipients: into the outbound queue (R copies, fsynced).
        let queued = if remote.is_empty() {
            true
        } else {
            let env = quill_proto::queue::Envelope {
                from: from.clone(),
                rcpts: remote.clone(),
                queued_ms: arrival_ms,
                submitter: self.state.authed.clone(),
            };
            let ok = crate::outbound::enqueue(&self.services, &env, &body).await;
            if ok {
                info!(%id, from = %from, rcpts = remote.len(), size, "message queued for remote delivery");
            }
            ok
        };
        // What each user's copy becomes (Sieve, sub-address folders),
        // decided once, here, before any copy is stored.
        let mut plan = deliver::plan(&self.services, &rcpts, &from, &body).await;
        if verdict.as_ref().is_some_and(|v| v.action == Action::Junk) {
            deliver::into_junk(&self.services, &mut plan).await;
        }
        let mut redirected = true;
        for (user, to) in &plan.redirects {
            redirected &= self
                .forward_via(&from, &[user.as_str()], to.clone(), &body, arrival_ms)
                .await;
        }
        for (to, reply) in &plan.replies {
            let env = quill_proto::queue::Envelope {
                from: String::new(),
                rcpts: vec![to.clone()],
                queued_ms: arrival_ms,
                submitter: None,
            };
            if !crate::outbound::enqueue(&self.services, &env, reply).await {
                warn!(%id, to = %to, "vacation reply not queued");
            }
        }
        // To R nodes per copy, one body per node; each has it on disk
        // before the reply. Copies that share a folder and flags (all of
        // them, without scripts) are one delivery.
        let started = std::time::Instant::now();
        let mut groups: Vec<(&str, &[String], Vec<String>)> = Vec::new();
        for c in &plan.copies {
            match groups
                .iter_mut()
                .find(|(f, fl, _)| *f == c.folder && *fl == c.flags.as_slice())
            {
                Some(g) => g.2.push(c.mailbox.clone()),
                None => groups.push((&c.folder, &c.flags, vec![c.mailbox.clone()])),
            }
        }
        // A user whose script discarded the message has it "delivered".
        let mut stored_by: std::collections::HashMap<&str, bool> = unique.iter().map(|m| (m.as_str(), true)).collect();
        let (mut copies, mut under_replicated) = (Vec::new(), false);
        let last = groups.len().saturating_sub(1);
        let mut body = Some(body);
        for (i, (folder, flags, mailboxes)) in groups.iter().enumerate() {
            let gid = if i == 0 {
                id
            } else {
                self.services.mail.new_message_id(arrival_ms)
            };
            let b = if i == last {
                body.take().unwrap_or_default()
            } else {
                body.clone().unwrap_or_default()
            };
            let m = crate::mail::NewMail {
                id: gid,
                mailboxes,
                folder,
                arrival_ms,
                body: b,
            };
            let outcome = self.services.mail.deliver_as(m).await;
            under_replicated |= outcome.under_replicated;
            for (k, mb) in mailboxes.iter().enumerate() {
                let ok = outcome.stored.get(k).copied().unwrap_or(false);
                if let Some(s) = stored_by.get_mut(mb.as_str()) {
                    *s &= ok;
                }
                if ok && !flags.is_empty() {
                    let holders = outcome.copies.get(k).cloned().unwrap_or_default();
                    let listed = crate::mail::fresh_listed(gid, folder, arrival_ms, holders);
                    let set: Vec<(String, bool)> = flags.iter().map(|f| (f.clone(), true)).collect();
                    let change = crate::mail::flag_change(&listed, &set, self.services.mail.hlc_now());
                    if self.services.mail.mark(mb, &[(listed, change)]).await.is_err() {
                        warn!(%id, mailbox = %mb, "sieve flags not set on every copy");
                    }
                }
            }
            copies.push(outcome.copies);
        }
        Latencies::observe(&self.services.metrics.latency.delivery, started.elapsed());
        let stored = |mailbox: &str| stored_by.get(mailbox).copied().unwrap_or(false);
        let all_stored = stored_by.values().all(|s| *s) && queued && forwarded && redirected;
        if all_stored {
            self.services.counters().messages_accepted.inc();
            let auth = verdict.as_ref().map_or("-", |v| v.summary.as_str());
            info!(%id, from = %from, rcpts = unique.len(), size,
                copies = ?copies, under_replicated, auth, "message stored");
        } else {
            self.services.counters().deliveries_failed.inc();
            warn!(%id, stored = ?stored_by, "delivery failed for some recipients");
        }
        let text = data_reply(
            self.state.mode,
            &id.to_hex(),
            all_stored,
            &rcpts,
            stored,
            forwarded && redirected,
        );
        self.io.reply(&text).await?;
        Ok(true)
    }

    /// The edge's checks of a message just read (which starts with our
    /// `Received:`): the message with our `Authentication-Results:` on top
    /// and any a sender wrote in our name taken out, and the verdict; or
    /// the refusal's reply. Submission's mail is not checked, but a claim
    /// in our name is taken out of it too; LMTP's is left as it came
    /// unless `--check-lmtp`.
    async fn check(&mut self, body: Vec<u8>) -> Result<(Vec<u8>, Option<Verdict>), String> {
        let pending = self.checks.take();
        let Some(edge) = self.services.mail_auth.clone() else {
            return Ok((body, None));
        };
        let mode = self.state.mode;
        if mode != Mode::Submission && !edge.checks(self.peer.ip(), mode) {
            return Ok((body, None));
        }
        let body = quill_proto::authres::strip_ours(&body, edge.authserv_id()).unwrap_or(body);
        let Some(pending) = pending else {
            return Ok((body, None));
        };
        let verdict = edge.finish(pending, &body, self.to_postmaster).await;
        if let Action::Refuse(text) = &verdict.action {
            info!(auth = %verdict.summary, "message refused by the DMARC policy of its sender");
            return Err(text.clone());
        }
        let mut out = Vec::with_capacity(verdict.header.len() + body.len());
        out.extend_from_slice(verdict.header.as_bytes());
        out.extend_from_slice(&body);
        Ok((out, Some(verdict)))
    }

    /// Queues a copy for the remote addresses aliases forward to (R
    /// copies, fsynced, before the reply): the message as received, with a
    /// `Delivered-To:` for each alias that forwards (so that it is known
    /// as a loop if it comes back), from the original sender rewritten by
    /// SRS in the first forwarding alias's domain (so the destination's
    /// SPF check passes and a bounce comes back through us).
    async fn forward(&self, from: &str, rcpts: &[Rcpt], to: Vec<String>, body: &[u8], arrival_ms: u64) -> bool {
        let aliases: Vec<&str> = rcpts
            .iter()
            .filter(|r| r.forwards)
            .map(|r| r.address.as_str())
            .collect();
        self.forward_via(from, &aliases, to, body, arrival_ms).await
    }

    /// Queues a copy for `to`, forwarded by the local addresses `aliases`
    /// (aliases, or a user whose Sieve script redirects): see
    /// [`Self::forward`].
    async fn forward_via(&self, from: &str, aliases: &[&str], to: Vec<String>, body: &[u8], arrival_ms: u64) -> bool {
        let forwarder = aliases.first().and_then(|a| a.rsplit_once('@')).map_or("", |(_, d)| d);
        let sender = match self.services.directory.srs_key() {
            Some(key) => quill_proto::srs::forward(&key, from, forwarder, (arrival_ms / 86_400_000) as u32),
            // No alias was ever made with the key (an SRS bounce needs
            // none: its sender is null).
            None => from.to_owned(),
        };
        let mut copy = Vec::with_capacity(body.len() + aliases.len() * 64);
        for a in aliases {
            copy.extend_from_slice(format!("Delivered-To: {a}\r\n").as_bytes());
        }
        copy.extend_from_slice(body);
        let env = quill_proto::queue::Envelope {
            from: sender.clone(),
            rcpts: to,
            queued_ms: arrival_ms,
            submitter: None,
        };
        let ok = crate::outbound::enqueue(&self.services, &env, &copy).await;
        if ok {
            info!(from = %from, sender = %sender, rcpts = env.rcpts.len(), via = ?aliases, "message forwarded");
        }
        ok
    }

    /// Reads the DATA section (see `quill_proto::data`): past a limit it
    /// keeps reading (and dropping) until the end so that the session
    /// stays in step with the client.
    async fn read_body(&mut self, head: Vec<u8>) -> std::io::Result<Body> {
        let limits = self.services.limits();
        let (idle, grace, rate) = (
            limits.idle_timeout,
            limits.transfer_grace,
            limits.transfer_bytes_per_sec_min.max(1),
        );
        let mut reader = DataReader::new(head, limits.message_bytes_max);
        let start = tokio::time::Instant::now();
        let mut received: u64 = 0;
        // The node-wide budget for message bytes held in memory, taken in
        // chunks as the message grows (see `Services::data_budget`).
        let mut budget: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut budget_bytes: usize = 0;
        // Every line the last read holds is taken at once, lent from the
        // read buffer: one timer per read, no copy or allocation per line.
        let mut splitter = LineSplitter::new(DATA_LINE_BYTES_MAX);
        loop {
            // The transfer as a whole must keep up the minimum rate: the
            // next bytes are due when the bytes so far stop paying for the
            // time taken (and within the idle timeout in any case).
            let allowed = grace + Duration::from_secs_f64(received as f64 / rate as f64);
            let left = allowed.saturating_sub(start.elapsed());
            let wait = left.min(idle);
            let available = match tokio::time::timeout(wait, self.io.r.fill_buf()).await {
                Ok(r) => r?,
                Err(_) if left <= idle => {
                    self.services.counters().limit_refusals.inc();
                    self.io
                        .reply("421 4.4.2 Message transfer too slow, closing connection")
                        .await?;
                    self.io.flush().await?;
                    return Ok(Body::Closed);
                }
                Err(_) => {
                    self.io.reply("421 4.4.2 Idle timeout, closing connection").await?;
                    self.io.flush().await?;
                    return Ok(Body::Closed);
                }
            };
            if available.is_empty() {
                return Ok(Body::Closed);
            }
            let mut used = 0;
            let mut ended = None;
            while used < available.len() {
                let (n, line) = splitter.next_in(&available[used..]);
                used += n;
                received += n as u64;
                let Some(line) = line else { break };
                let step = reader.line_ref(line);
                while reader.held() > budget_bytes {
                    match self.services.data_budget.clone().try_acquire_owned() {
                        Ok(p) => {
                            match budget.as_mut() {
                                Some(b) => b.merge(p),
                                None => budget = Some(p),
                            }
                            budget_bytes += DATA_BUDGET_CHUNK;
                        }
                        Err(_) => {
                            self.services.counters().limit_refusals.inc();
                            reader.refuse(Refusal::NoMemory);
                            budget = None;
                            budget_bytes = 0;
                        }
                    }
                }
                if let Step::End(outcome) = step {
                    ended = Some(outcome);
                    break;
                }
            }
            // What follows the end of the message stays for the commands.
            self.io.r.consume(used);
            if let Some(outcome) = ended {
                return Ok(match outcome {
                    Ok(body) => Body::Ok(body, budget),
                    Err(r) => Body::Refused(r),
                });
            }
        }
    }
}
