//! Requests to the leader: a write, join or membership change is served
//! here when this node leads, else forwarded to the leader (found from the
//! metrics, a seed, or a redirect), retried with backoff within one
//! deadline; the leader's side commits it ([`Membership::handle`] calls
//! `serve`).

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers};
use tokio::time::Instant;

use super::*;
use crate::command::{Command, Request, Response};

/// What a forwarding attempt learned.
enum Attempt {
    Done(LeaderReply),
    /// Try there next (or, `None`, wherever the leader is believed to be).
    Redirect(Option<(u64, String)>),
    Fail(MembershipError),
}

impl Membership {
    pub(super) fn timeout_error(&self) -> MembershipError {
        MembershipError::Timeout {
            waited_ms: self.inner.write_timeout.as_millis() as u64,
        }
    }

    pub(super) async fn to_leader(
        &self,
        req: LeaderRequest,
        seed: Option<&str>,
    ) -> Result<LeaderReply, MembershipError> {
        let deadline = Instant::now() + self.inner.write_timeout;
        self.to_leader_until(req, seed, deadline).await
    }

    /// Sends `req` to the leader (serving it here when this node leads),
    /// following redirects and retrying transport failures until
    /// `deadline`. Retrying is safe: writes are deduplicated by the state
    /// machine, membership requests are idempotent.
    pub(super) async fn to_leader_until(
        &self,
        req: LeaderRequest,
        seed: Option<&str>,
        deadline: Instant,
    ) -> Result<LeaderReply, MembershipError> {
        let mut target: Option<(u64, String)> = None;
        let mut backoff_ms = RETRY_BACKOFF_MS_MIN;
        for attempt in 1..=FORWARD_ATTEMPTS_MAX {
            if Instant::now() >= deadline {
                break;
            }
            let to = match (target.take(), seed) {
                (Some(t), _) => Some(t),
                // A joining node may know no leader yet: ask the seed at once.
                (None, Some(seed)) => leader_of(&self.inner.raft.metrics().borrow()).or(Some((0, seed.to_owned()))),
                (None, None) => self.known_leader(deadline).await,
            };
            let outcome = match &to {
                None => Attempt::Redirect(None),
                Some((id, _)) if *id == self.inner.id => match self.serve(req.clone(), deadline).await {
                    Ok(reply) => Attempt::Done(reply),
                    Err(e) => leader_error(e),
                },
                Some((id, addr)) => {
                    let call = self.inner.transport.call(*id, addr, RaftMessage::Leader(req.clone()));
                    match tokio::time::timeout_at(deadline, call).await {
                        Err(_) => break,
                        Ok(Ok(RaftReply::Leader(Ok(reply)))) => Attempt::Done(reply),
                        Ok(Ok(RaftReply::Leader(Err(e)))) => leader_error(e),
                        Ok(Ok(other)) => {
                            tracing::warn!(node = id, "leader request answered with {other:?}");
                            Attempt::Redirect(None)
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(attempt, "forward to the leader: {e}");
                            Attempt::Redirect(None)
                        }
                    }
                }
            };
            match outcome {
                Attempt::Done(reply) => return Ok(reply),
                Attempt::Fail(e) => return Err(e),
                Attempt::Redirect(Some(t)) if Some(&t) != to.as_ref() => target = Some(t),
                Attempt::Redirect(_) => {
                    // Nobody new to ask: give the cluster time to elect.
                    let wake = (Instant::now() + Duration::from_millis(backoff_ms)).min(deadline);
                    tokio::time::sleep_until(wake).await;
                    backoff_ms = (backoff_ms * 2).min(RETRY_BACKOFF_MS_MAX);
                }
            }
        }
        Err(self.timeout_error())
    }

    /// The leader this node knows of, waiting a little (bounded by
    /// `deadline`) for one to be elected.
    pub(super) async fn known_leader(&self, deadline: Instant) -> Option<(u64, String)> {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(LEADER_WAIT_MS_MAX));
        let m = self
            .inner
            .raft
            .wait(Some(wait))
            .metrics(|m| m.current_leader.is_some(), "a known leader")
            .await
            .ok()?;
        leader_of(&m)
    }

    /// Serves a leader request here, if this node leads.
    pub(super) async fn serve(&self, req: LeaderRequest, deadline: Instant) -> Result<LeaderReply, LeaderError> {
        let allowed_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
        match tokio::time::timeout_at(deadline, self.serve_now(req)).await {
            Ok(r) => r,
            Err(_) => Err(LeaderError::Timeout { waited_ms: allowed_ms }),
        }
    }

    pub(super) async fn serve_now(&self, req: LeaderRequest) -> Result<LeaderReply, LeaderError> {
        let raft = &self.inner.raft;
        match req {
            LeaderRequest::Write(r) => {
                let (response, log_index) = self.commit_at(r).await?;
                Ok(LeaderReply::Written { response, log_index })
            }
            LeaderRequest::Join(node) => {
                node.validate().map_err(|e| LeaderError::Refused(e.to_string()))?;
                // A new identity at the cluster address of a node that is
                // down: that machine came back with an empty (replaced)
                // disk. Its old identity is gone for good, and is removed
                // first, so that its copies are made again at once and no
                // ping to the address is taken for the old node's. (Only a
                // down one: a member naming a live node's address must not
                // push it out.)
                let view = self.view();
                let old: Vec<u64> = view
                    .nodes
                    .values()
                    .filter(|n| n.id != node.id && n.addrs.cluster == node.addrs.cluster)
                    .map(|n| n.id)
                    .collect();
                for id in old {
                    if view.node(id).is_some_and(|n| n.state != NodeState::Down) {
                        return Err(LeaderError::Refused(format!(
                            "node {id} at {} is not down: one address, one node",
                            node.addrs.cluster
                        )));
                    }
                    tracing::warn!(old = id, new = node.id, addr = %node.addrs.cluster, "a new identity at a down node's address (a replaced disk): removing the old one");
                    Box::pin(self.serve_now(LeaderRequest::RemoveNode(id))).await?;
                }
                raft.add_learner(node.id, BasicNode::new(&node.addrs.cluster), false)
                    .await
                    .map_err(|e| self.raft_error(e))?;
                let r = self.commit(self.own_request(Command::AddNode(node))).await?;
                r.result.map_err(|e| LeaderError::Refused(e.to_string()))?;
                Ok(LeaderReply::Done)
            }
            LeaderRequest::SetVoters(voters) => {
                raft.change_membership(voters, true)
                    .await
                    .map_err(|e| self.raft_error(e))?;
                Ok(LeaderReply::Done)
            }
            LeaderRequest::RemoveNode(id) => {
                let m = raft.metrics().borrow().clone();
                let voters: BTreeSet<u64> = m.membership_config.membership().voter_ids().collect();
                if voters.contains(&id) {
                    let rest: BTreeSet<u64> = voters.iter().copied().filter(|v| *v != id).collect();
                    if rest.is_empty() {
                        return Err(LeaderError::Refused(format!("node {id} is the last voter")));
                    }
                    raft.change_membership(rest, false)
                        .await
                        .map_err(|e| self.raft_error(e))?;
                }
                if m.membership_config.membership().get_node(&id).is_some() {
                    raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await
                        .map_err(|e| self.raft_error(e))?;
                }
                let r = self.commit(self.own_request(Command::RemoveNode { id })).await?;
                match r.result {
                    Ok(()) | Err(CommandError::NoSuchNode(_)) => Ok(LeaderReply::Done),
                    Err(e) => Err(LeaderError::Refused(e.to_string())),
                }
            }
        }
    }

    pub(super) async fn commit(&self, req: Request) -> Result<Response, LeaderError> {
        Ok(self.commit_at(req).await?.0)
    }

    /// Commits and applies `req`; returns its response and log index.
    pub(super) async fn commit_at(&self, req: Request) -> Result<(Response, u64), LeaderError> {
        match self.inner.raft.client_write(req).await {
            Ok(resp) => Ok((resp.data, resp.log_id.index)),
            Err(e) => Err(self.raft_error(e)),
        }
    }

    pub(super) fn own_request(&self, command: Command) -> Request {
        Request {
            client: self.inner.client,
            serial: self.inner.next_serial.fetch_add(1, Ordering::Relaxed),
            command,
        }
    }

    pub(super) fn raft_error(&self, e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> LeaderError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => LeaderError::NotLeader {
                leader: f.leader_id.zip(f.leader_node.map(|n| n.addr)),
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => LeaderError::Refused(e.to_string()),
            RaftError::Fatal(e) => LeaderError::Fatal(e.to_string()),
        }
    }
}

fn leader_of(m: &RaftMetrics) -> Option<(u64, String)> {
    let id = m.current_leader?;
    let node = m.membership_config.membership().get_node(&id)?;
    Some((id, node.addr.clone()))
}

fn leader_error(e: LeaderError) -> Attempt {
    match e {
        LeaderError::NotLeader { leader } => Attempt::Redirect(leader),
        // The leader's own deadline ran out: ours covers the retry.
        LeaderError::Timeout { .. } => Attempt::Redirect(None),
        LeaderError::Refused(s) => Attempt::Fail(MembershipError::Refused(s)),
        LeaderError::Fatal(s) => Attempt::Fail(MembershipError::Fatal(s)),
    }
}
