//! One call to another node, with its deadline, and the serving of calls
//! from the others.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::info;

use super::protocol::{
    Answer, BoxFuture, Call, DELETED_QUERY_MAX, DIGESTS_MAX, Envelope, MARKS_PER_CALL_MAX, Network, NodeId,
    PLACE_BATCH_MAX, ReplicaError, Reply, Request, THROTTLE_KEYS_PER_CALL_MAX,
};
use super::{Inflight, Replicator, is_live, lock};
use crate::Delivery;

impl<N: Network> Replicator<N> {
    /// The deadline of a call: the base, plus time for bodies by size.
    fn deadline(&self, req: &Request) -> Duration {
        self.cfg.call_timeout
            + match req {
                Request::Store { body, .. } => Duration::from_millis(body.len() as u64 / 4096),
                Request::Copy { entries, .. } => {
                    Duration::from_millis(entries.iter().map(|(_, b)| b.len() as u64).sum::<u64>() / 4096)
                        + Duration::from_secs(2)
                }
                Request::Read { .. } | Request::Sync { .. } | Request::ReportTo => Duration::from_secs(10),
                _ => Duration::ZERO,
            }
    }

    /// Returns once the view has `node` down.
    async fn marked_down(&self, node: NodeId) {
        let mut epochs = self.view_epoch.subscribe();
        while is_live(&self.view(), node) {
            if epochs.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// One request to `to` (served in place when `to` is this node), with
    /// its deadline.
    pub(super) fn call(&self, to: NodeId, req: Request) -> BoxFuture<'_, Result<Reply, ReplicaError>> {
        Box::pin(async move {
            if to == self.me {
                return self.serve(self.me, req).await;
            }
            let kind = req.kind();
            let deadline = self.deadline(&req);
            let env = Envelope {
                from: self.me,
                to,
                hlc: self.clock.now(),
                load: self.load(),
                boot: self.boot,
                body: req,
            };
            // A node the view has down when the call starts is tried all the
            // same (the caller chose it); one marked down meanwhile ends it.
            let live = is_live(&self.view(), to);
            let answer = tokio::select! {
                a = tokio::time::timeout(deadline, self.net.call(to, env)) => a,
                () = self.marked_down(to), if live => {
                    self.counters.calls_cut_by_view.fetch_add(1, Ordering::Relaxed);
                    return Err(ReplicaError::MarkedDown { node: to, kind: kind.to_owned() });
                }
            };
            match answer {
                Err(_) => Err(ReplicaError::Timeout {
                    node: to,
                    kind: kind.to_owned(),
                    deadline_ms: deadline.as_millis() as u64,
                }),
                Ok(Err(e)) => Err(ReplicaError::Unreachable {
                    node: to,
                    kind: kind.to_owned(),
                    why: e.0,
                }),
                Ok(Ok(answer)) if answer.from != to => Err(ReplicaError::Unreachable {
                    node: to,
                    kind: kind.to_owned(),
                    why: format!("node {} answers at its address", answer.from),
                }),
                Ok(Ok(answer)) => {
                    self.clock.observe(answer.hlc);
                    self.observe(to, answer.load, answer.boot);
                    answer.body.map_err(|e| ReplicaError::Remote {
                        node: to,
                        kind: kind.to_owned(),
                        error: e.to_string(),
                    })
                }
            }
        })
    }

    /// What another node showed: its load and run number (a new run
    /// releases the mailbox locks of its earlier sessions).
    fn observe(&self, node: NodeId, load: u64, boot: u32) {
        let released = lock(&self.manager).observe(node, load, boot);
        if released > 0 {
            info!(node, released, "a node restarted: its mailbox locks released");
        }
    }

    /// Serves a request from another node.
    pub async fn handle(&self, call: Call) -> Answer {
        self.clock.observe(call.hlc);
        let body = if call.to != self.me {
            Err(ReplicaError::Remote {
                node: self.me,
                kind: call.body.kind().to_owned(),
                error: format!("this is node {}, not node {}", self.me, call.to),
            })
        } else {
            if call.from != self.me {
                self.observe(call.from, call.load, call.boot);
            }
            self.serve(call.from, call.body).await
        };
        Envelope {
            from: self.me,
            to: call.from,
            hlc: self.clock.now(),
            load: self.load(),
            boot: self.boot,
            body,
        }
    }

    fn serve(&self, from: NodeId, req: Request) -> BoxFuture<'_, Result<Reply, ReplicaError>> {
        Box::pin(async move {
            match req {
                Request::Place {
                    users,
                    size,
                    n_replicas,
                } => {
                    let n = (n_replicas as usize).clamp(1, 16);
                    let targets = users.iter().map(|u| self.place_local(u, size, n, from)).collect();
                    // Sessions waiting on these mailboxes look soon.
                    for u in &users {
                        self.notify_watchers(u, NodeId::MAX, true);
                    }
                    Ok(Reply::Placed { targets })
                }
                Request::MailMap { user } => Ok(lock(&self.manager).mail_map(&self.view(), &user, self.cfg.replicas)),
                Request::Report { users, epoch, last } => {
                    let view = self.view();
                    lock(&self.manager).report(&view, from, users, epoch, last);
                    Ok(Reply::Done)
                }
                Request::ReportTo => {
                    self.report_to(Some(from)).await;
                    Ok(Reply::Done)
                }
                Request::Store {
                    id,
                    arrival_ms,
                    folder,
                    groups,
                    body,
                    epoch,
                    unplaced,
                } => {
                    // Released on every path, a handler cut by its deadline too.
                    let inflight = Inflight::take(&self.inflight);
                    let same_view = epoch == self.view().epoch();
                    let new_users: Vec<String> = groups
                        .iter()
                        .flat_map(|(_, users)| users)
                        .filter(|u| (!same_view || unplaced.contains(u)) && !self.store.holds(u))
                        .cloned()
                        .collect();
                    let stores = groups.into_iter().map(|(replicas, users)| {
                        self.store.deliver(Delivery {
                            id,
                            arrival_ms,
                            users,
                            folder: folder.clone(),
                            body: body.clone(),
                            replicas,
                        })
                    });
                    let results = futures::future::join_all(stores).await;
                    drop(inflight);
                    for r in results {
                        r?;
                    }
                    self.report_new_fragments(new_users).await;
                    Ok(Reply::Stored)
                }
                Request::List { user } => Ok(Reply::Listed {
                    entries: self.store.list(&user),
                }),
                Request::Deleted { user, ids } => {
                    let mut ids = ids;
                    ids.truncate(DELETED_QUERY_MAX);
                    Ok(Reply::Tombstoned {
                        ids: self.store.tombstoned(&user, &ids),
                    })
                }
                Request::Read { body } => Ok(Reply::Body {
                    bytes: self.store.read_body(body).await?,
                }),
                Request::Delete { user, tombs } => Ok(Reply::Deleted {
                    removed: self.store.apply_tombstones(&user, tombs).await?,
                }),
                Request::Mark { user, mut changes } => {
                    changes.truncate(MARKS_PER_CALL_MAX);
                    Ok(Reply::Marked {
                        changed: self.store.mark(&user, changes).await?,
                    })
                }
                Request::Digests { digests } => {
                    let users = digests
                        .into_iter()
                        .take(DIGESTS_MAX)
                        .filter(|(user, d)| self.store.digest(user, from) != *d)
                        .map(|(user, _)| user)
                        .collect();
                    Ok(Reply::Differ { users })
                }
                Request::Sync { user, items } => {
                    let (back, _, _) = self.reconcile(from, &user, items, true).await?;
                    Ok(Reply::Synced { items: back })
                }
                Request::Lock { user, token } => {
                    let (view, now) = (self.view(), self.now_ms());
                    let granted = lock(&self.manager).lock(&view, from, &user, token, now);
                    Ok(Reply::Locked { granted })
                }
                Request::Unlock { user, token } => {
                    lock(&self.manager).unlock(&user, token);
                    Ok(Reply::Done)
                }
                Request::Throttle {
                    keys,
                    window_ms,
                    failed,
                } => {
                    let now = self.now_ms();
                    let mut keys = keys;
                    keys.truncate(THROTTLE_KEYS_PER_CALL_MAX);
                    let blocked = lock(&self.manager).throttle(&keys, window_ms, failed, now);
                    Ok(Reply::Throttled { blocked })
                }
                Request::Greylist {
                    key,
                    delay_ms,
                    lifetime_ms,
                } => {
                    let now = self.now_ms();
                    let pass = lock(&self.manager).greylist(&key, delay_ms, lifetime_ms, now);
                    Ok(Reply::Greylisted { pass })
                }
                Request::MissingCopies { user, id, missing } => {
                    self.note_missing(user, id, missing);
                    Ok(Reply::Done)
                }
                Request::Copy { user, entries } => {
                    let _inflight = Inflight::take(&self.inflight);
                    let deleted = self.take_copies(&user, entries, PLACE_BATCH_MAX).await?;
                    Ok(Reply::Copied { deleted })
                }
                Request::Usage => Ok(Reply::Usage {
                    bytes: self.store.stats().body_bytes,
                }),
                req @ (Request::Watch { .. } | Request::Changed { .. } | Request::Notify { .. }) => {
                    self.serve_watch(from, req)
                }
                Request::SetReplicas { user, mut changes } => {
                    changes.truncate(PLACE_BATCH_MAX);
                    let outcomes = self.store.set_replicas(&user, changes, self.me).await?;
                    Ok(Reply::ReplicasSet { outcomes })
                }
            }
        })
    }

    /// Picks the nodes for a new message of `user` that node `near`
    /// received, and notes them in the user's mail map (as the user's
    /// manager, or in its stead; see [`super::manager::Manager::place`]).
    pub(super) fn place_local(&self, user: &str, size: u64, n: usize, near: NodeId) -> Vec<NodeId> {
        let view = self.view();
        let load = self.load();
        lock(&self.manager).place(&view, user, size, n, self.cfg.spread, load, Some(near))
    }
}
