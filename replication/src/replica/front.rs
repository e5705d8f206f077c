//! The front end: delivery to R nodes, the mailbox as the union of a
//! user's fragments, reads from any live replica, deletions to every
//! replica, and the cluster-wide mailbox lock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use placement::UserKey;
use tracing::{debug, info, warn};

use super::protocol::{
    DELETED_QUERY_MAX, MAILBOX_LOCK_LEASE, MARKS_PER_CALL_MAX, MailboxInUse, Network, NodeId, PENDING_UNLOCKS_MAX,
    ReplicaError, Reply, Request,
};
use super::updates::Owed;
use super::{DeliverOutcome, Listed, Replicator, is_live, lock, manager_of};
use crate::{BodyHash, EntryMeta, MarkChange, MessageId, Tombstone};

impl<N: Network> Replicator<N> {
    /// Stores one message for `users` on R nodes each (one body per node).
    pub async fn deliver(&self, users: &[String], folder: &str, arrival_ms: u64, body: Vec<u8>) -> DeliverOutcome {
        let id = self.store.new_message_id(arrival_ms);
        self.deliver_as(id, users, folder, arrival_ms, body).await
    }

    /// [`Replicator::deliver`] with a given message id.
    pub async fn deliver_as(
        &self,
        id: MessageId,
        users: &[String],
        folder: &str,
        arrival_ms: u64,
        body: Vec<u8>,
    ) -> DeliverOutcome {
        let view = self.view();
        let n = self.cfg.replicas.max(1);
        let size = body.len() as u64;

        // 1. Targets per user, from the users' managers.
        let mut by_manager: BTreeMap<NodeId, Vec<usize>> = BTreeMap::new();
        for (i, u) in users.iter().enumerate() {
            let m = manager_of(&view, u).unwrap_or(self.me);
            by_manager.entry(m).or_default().push(i);
        }
        let mut targets: Vec<Vec<NodeId>> = vec![Vec::new(); users.len()];
        let mut unplaced: Vec<String> = Vec::new();
        let asks = by_manager.into_iter().map(|(m, idx)| {
            let req = Request::Place {
                users: idx.iter().map(|&i| users[i].clone()).collect(),
                size,
                n_replicas: n as u32,
            };
            async move { (idx, self.call(m, req).await) }
        });
        for (idx, reply) in futures::future::join_all(asks).await {
            match reply {
                Ok(Reply::Placed { targets: t }) if t.len() == idx.len() => {
                    for (i, t) in idx.into_iter().zip(t) {
                        targets[i] = t;
                    }
                }
                other => {
                    // The manager is unreachable: delivery never waits on
                    // soft state. Place here by the view and loads alone.
                    warn!(reply = ?other.err(), "manager did not place; placing locally");
                    self.counters.manager_fallbacks.fetch_add(1, Ordering::Relaxed);
                    for i in idx {
                        targets[i] = self.place_local(&users[i], size, n, self.me);
                        unplaced.push(users[i].clone());
                    }
                }
            }
        }
        for t in &mut targets {
            t.sort_unstable();
            t.dedup();
        }

        // 2. One store per node, carrying every user that node takes.
        let mut per_node: BTreeMap<NodeId, BTreeMap<Vec<NodeId>, Vec<String>>> = BTreeMap::new();
        for (u, t) in users.iter().zip(&targets) {
            for node in t {
                per_node
                    .entry(*node)
                    .or_default()
                    .entry(t.clone())
                    .or_default()
                    .push(u.clone());
            }
        }
        let stores = per_node.into_iter().map(|(node, groups)| {
            let req = Request::Store {
                id,
                arrival_ms,
                folder: folder.to_owned(),
                groups: groups.into_iter().collect(),
                body: body.clone(),
                epoch: view.epoch(),
                unplaced: unplaced.clone(),
            };
            async move { (node, self.call(node, req).await) }
        });
        let mut acked: BTreeSet<NodeId> = BTreeSet::new();
        for (node, r) in futures::future::join_all(stores).await {
            match r {
                Ok(Reply::Stored) => {
                    acked.insert(node);
                }
                other => {
                    self.counters.copies_failed.fetch_add(1, Ordering::Relaxed);
                    warn!(%id, node, error = ?other.err(), "copy not stored");
                }
            }
        }

        // 3. The outcome per user.
        let copies: Vec<Vec<NodeId>> = targets
            .iter()
            .map(|t| t.iter().copied().filter(|n| acked.contains(n)).collect())
            .collect();
        let stored: Vec<bool> = copies.iter().map(|c| !c.is_empty()).collect();
        let under = copies.iter().any(|c| !c.is_empty() && c.len() < n);
        // Copies that failed to live targets: the lowest node that stored
        // the message counts them and makes them.
        for ((u, t), c) in users.iter().zip(&targets).zip(&copies) {
            let missing: Vec<NodeId> = t.iter().copied().filter(|x| !c.contains(x)).collect();
            let Some(&holder) = c.iter().min() else { continue };
            if missing.is_empty() {
                continue;
            }
            let req = Request::MissingCopies {
                user: u.clone(),
                id,
                missing,
            };
            if let Err(e) = self.call(holder, req).await {
                debug!(%id, holder, error = %e, "could not note the missing copies; anti-entropy will make them");
            }
        }
        self.counters.deliveries.fetch_add(1, Ordering::Relaxed);
        if under {
            self.counters
                .deliveries_under_replicated
                .fetch_add(1, Ordering::Relaxed);
        }
        // A user none of whose targets acknowledged gets a temporary
        // failure; a copy that was stored but whose reply was lost must not
        // surface later as mail nobody acknowledged: tombstone it.
        let hlc = self.clock.now();
        for ((u, t), ok) in users.iter().zip(&targets).zip(&stored) {
            if *ok {
                continue;
            }
            let tomb = Tombstone {
                id,
                hlc,
                replicas: t.clone(),
            };
            self.send_tombstones(u, t, vec![tomb]).await;
        }
        DeliverOutcome {
            id,
            stored,
            copies,
            under_replicated: under,
        }
    }

    /// Takes the user's mailbox for one session, cluster-wide, from the
    /// user's manager: `Ok(Some((manager, token)))` when granted,
    /// `Err(MailboxInUse)` when another session holds it, `Ok(None)` when the
    /// manager does not answer (the session goes on: availability before
    /// exclusivity).
    pub async fn lock_mailbox(&self, user: &str) -> Result<Option<(NodeId, u64)>, MailboxInUse> {
        let mut tried: Option<NodeId> = None;
        for _ in 0..3 {
            let view = self.view();
            let Some(m) = manager_of(&view, user) else {
                return Ok(None);
            };
            if tried == Some(m) {
                // The manager did not answer and the view still names it.
                return Ok(None);
            }
            let token = (u64::from(self.boot) << 32) | (self.lock_seq.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff);
            let req = Request::Lock {
                user: user.to_owned(),
                token,
            };
            match self.call(m, req).await {
                Ok(Reply::Locked { granted: true }) => return Ok(Some((m, token))),
                Ok(Reply::Locked { granted: false }) => return Err(MailboxInUse),
                other => {
                    warn!(user, manager = m, reply = ?other.err(), "mailbox lock not taken");
                    // It may have been granted with the answer lost: give it back.
                    self.unlock_mailbox(user, m, token).await;
                    // A view that has the manager down names another: ask it
                    // (once); otherwise go on without the lock.
                    tried = Some(m);
                }
            }
        }
        Ok(None)
    }

    /// Releases a lock [`Replicator::lock_mailbox`] took, at the manager
    /// that granted it (the view may have moved the user since). If the
    /// manager does not answer (down, cut off), the unlock is retried every
    /// second until the lease would have ended anyway
    /// ([`Replicator::retry_unlocks`]): a manager cut off by a partition
    /// keeps its lock table and manages the user again after the heal.
    pub async fn unlock_mailbox(&self, user: &str, manager: NodeId, token: u64) {
        let req = Request::Unlock {
            user: user.to_owned(),
            token,
        };
        let sent = is_live(&self.view(), manager) && matches!(self.call(manager, req).await, Ok(Reply::Done));
        if !sent {
            let until = self.now_ms() + MAILBOX_LOCK_LEASE.as_millis() as u64;
            let mut p = lock(&self.pending_unlocks);
            if p.len() < PENDING_UNLOCKS_MAX {
                p.push((user.to_owned(), manager, token, until));
            }
        }
    }

    /// Login throttling across the cluster: each key (a client address, an
    /// account) is counted at its own manager (placement by the key, as for
    /// users). With `failed`, counts a failure first. `Some(true)` when any
    /// key is used up; `None` when no manager answered (the caller falls
    /// back to its own counters).
    pub async fn throttle(&self, keys: &[(String, u32)], window: std::time::Duration, failed: bool) -> Option<bool> {
        let view = self.view();
        let mut by_manager: BTreeMap<NodeId, Vec<(String, u32)>> = BTreeMap::new();
        for (k, max) in keys {
            let m = manager_of(&view, k).unwrap_or(self.me);
            by_manager.entry(m).or_default().push((k.clone(), *max));
        }
        let window_ms = window.as_millis() as u64;
        let asks = by_manager.into_iter().map(|(m, keys)| async move {
            let req = Request::Throttle {
                keys,
                window_ms,
                failed,
            };
            match self.call(m, req).await {
                Ok(Reply::Throttled { blocked }) => Some(blocked),
                other => {
                    debug!(manager = m, error = ?other.err(), "no throttle answer");
                    None
                }
            }
        });
        let answers: Vec<Option<bool>> = futures::future::join_all(asks).await;
        if answers.contains(&Some(true)) {
            return Some(true);
        }
        if answers.iter().all(Option::is_none) {
            return None;
        }
        Some(false)
    }

    /// Greylisting of triplet `key` at its manager: whether this try
    /// passes; `None` when the manager did not answer.
    pub async fn greylist(&self, key: &str, delay: std::time::Duration, lifetime: std::time::Duration) -> Option<bool> {
        let m = manager_of(&self.view(), key).unwrap_or(self.me);
        let req = Request::Greylist {
            key: key.to_owned(),
            delay_ms: delay.as_millis() as u64,
            lifetime_ms: lifetime.as_millis() as u64,
        };
        match self.call(m, req).await {
            Ok(Reply::Greylisted { pass }) => Some(pass),
            other => {
                debug!(manager = m, error = ?other.err(), "no greylist answer");
                None
            }
        }
    }

    /// Renews a lock this node holds (the same token at the same manager):
    /// whether the manager still grants it. A manager that does not answer
    /// counts as granting (availability before exclusivity, as at first).
    pub async fn renew_mailbox_lock(&self, user: &str, manager: NodeId, token: u64) -> bool {
        let req = Request::Lock {
            user: user.to_owned(),
            token,
        };
        !matches!(self.call(manager, req).await, Ok(Reply::Locked { granted: false }))
    }

    /// Sends the unlocks that failed before, to managers that answer now;
    /// drops those whose lease has ended. Returns how many were delivered.
    pub async fn retry_unlocks(&self) -> usize {
        let now = self.now_ms();
        let due: Vec<(String, NodeId, u64, u64)> = {
            let mut p = lock(&self.pending_unlocks);
            p.retain(|u| u.3 > now);
            p.clone()
        };
        let mut sent = 0;
        for (user, manager, token, _) in due {
            if !is_live(&self.view(), manager) {
                continue;
            }
            let req = Request::Unlock {
                user: user.clone(),
                token,
            };
            if matches!(self.call(manager, req).await, Ok(Reply::Done)) {
                lock(&self.pending_unlocks).retain(|u| !(u.0 == user && u.2 == token));
                sent += 1;
            }
        }
        if sent > 0 {
            info!(sent, "mailbox unlocks delivered late");
        }
        sent
    }

    /// The nodes that may hold the user's fragments, from the manager (or
    /// the user's spread if the manager does not answer), with this node.
    pub async fn mail_map(&self, user: &str) -> (Vec<NodeId>, u64, bool) {
        let view = self.view();
        let m = manager_of(&view, user).unwrap_or(self.me);
        let (mut nodes, bytes, known) = match self.call(m, Request::MailMap { user: user.to_owned() }).await {
            Ok(Reply::MailMap { nodes, bytes, known }) => (nodes, bytes, known),
            other => {
                debug!(user, error = ?other.err(), "no mail map from the manager; using the spread");
                self.counters.manager_fallbacks.fetch_add(1, Ordering::Relaxed);
                let spread = view
                    .spread_set(UserKey::from_address(user), self.cfg.spread)
                    .into_iter()
                    .map(|n| n.0)
                    .collect();
                (spread, 0, false)
            }
        };
        nodes.push(self.me);
        nodes.sort_unstable();
        nodes.dedup();
        (nodes, bytes, known)
    }

    /// The mailbox size the manager knows (for quotas), or this node's share.
    pub async fn usage_bytes(&self, user: &str) -> u64 {
        match self.mail_map(user).await {
            (_, bytes, true) => bytes,
            _ => self.store.usage_bytes(user),
        }
    }

    /// The union of the user's fragments on the live nodes of the mail map,
    /// by message id, oldest first. Nodes that do not answer are skipped
    /// (one live replica per message suffices).
    /// Each fragment of the user's mailbox, from every live node its mail
    /// map names (those that do not answer are left out).
    pub(super) async fn fragments(&self, user: &str) -> Vec<(NodeId, Vec<EntryMeta>)> {
        let view = self.view();
        let (nodes, _, _) = self.mail_map(user).await;
        let lists = nodes
            .into_iter()
            .filter(|&n| n == self.me || is_live(&view, n))
            .map(|n| async move { (n, self.call(n, Request::List { user: user.to_owned() }).await) });
        let mut out = Vec::new();
        for (node, r) in futures::future::join_all(lists).await {
            match r {
                Ok(Reply::Listed { entries }) => out.push((node, entries)),
                other => debug!(node, user, error = ?other.err(), "fragment not listed"),
            }
        }
        out
    }

    pub async fn mailbox(&self, user: &str) -> Vec<Listed> {
        let view = self.view();
        let mut union: BTreeMap<MessageId, Listed> = BTreeMap::new();
        for (node, entries) in self.fragments(user).await {
            for meta in entries {
                match union.entry(meta.id) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(Listed {
                            meta,
                            holders: vec![node],
                        });
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        // Copies that have not merged each other's folder
                        // and flag changes yet: the newest of each shows.
                        let l = o.get_mut();
                        if l.meta.marks != meta.marks || l.meta.folder != meta.folder {
                            l.meta.apply_marks(&meta.marks_change());
                        }
                        l.holders.push(node);
                    }
                }
            }
        }
        // A live replica that did not list a message another one listed
        // has either not got its copy yet or deleted it while the other was
        // away (a node back from a crash, before the update log or
        // anti-entropy reach it): ask, and leave out what it deleted.
        let mut suspects: BTreeMap<NodeId, Vec<MessageId>> = BTreeMap::new();
        for l in union.values() {
            for r in &l.meta.replicas {
                if !l.holders.contains(r) && (*r == self.me || is_live(&view, *r)) {
                    suspects.entry(*r).or_default().push(l.meta.id);
                }
            }
        }
        let asks = suspects.into_iter().map(|(node, ids)| async move {
            let mut dead = Vec::new();
            for chunk in ids.chunks(DELETED_QUERY_MAX) {
                let req = Request::Deleted {
                    user: user.to_owned(),
                    ids: chunk.to_vec(),
                };
                if let Ok(Reply::Tombstoned { ids }) = self.call(node, req).await {
                    dead.extend(ids);
                }
            }
            dead
        });
        for dead in futures::future::join_all(asks).await {
            for id in dead {
                union.remove(&id);
            }
        }
        union.into_values().collect()
    }

    /// Whether a message was deleted: a live replica of it (this node
    /// first) holds its tombstone. A FETCH that cannot read a message
    /// tells "expunged meanwhile" from "unreachable now" with it.
    pub async fn is_deleted(&self, user: &str, msg: &Listed) -> bool {
        let view = self.view();
        let mut order: Vec<NodeId> = vec![self.me];
        for n in msg.holders.iter().chain(&msg.meta.replicas) {
            if !order.contains(n) && is_live(&view, *n) {
                order.push(*n);
            }
        }
        for n in order {
            let req = Request::Deleted {
                user: user.to_owned(),
                ids: vec![msg.meta.id],
            };
            if let Ok(Reply::Tombstoned { ids }) = self.call(n, req).await
                && ids.contains(&msg.meta.id)
            {
                return true;
            }
        }
        false
    }

    /// A message's bytes from a live replica, this node first; checked
    /// against the body hash.
    pub async fn read(&self, msg: &Listed) -> Result<Vec<u8>, ReplicaError> {
        let view = self.view();
        let mut order: Vec<NodeId> = Vec::new();
        if msg.holders.contains(&self.me) {
            order.push(self.me);
        }
        for n in msg.holders.iter().chain(&msg.meta.replicas) {
            if !order.contains(n) && is_live(&view, *n) {
                order.push(*n);
            }
        }
        let mut last = ReplicaError::NoLiveReplica;
        for n in order {
            match self.call(n, Request::Read { body: msg.meta.body }).await {
                Ok(Reply::Body { bytes }) if BodyHash::of(&bytes) == msg.meta.body => return Ok(bytes),
                Ok(_) => last = ReplicaError::WrongBody(n),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Deletes the user's messages on every replica, and tells the
    /// sessions waiting on the mailbox ([`super::watch`]). Replicas that do not
    /// acknowledge get the deletion from the durable update log later.
    /// Fails only if this node cannot record the deletion at all.
    pub async fn delete(&self, user: &str, msgs: &[Listed]) -> Result<usize, ReplicaError> {
        let deleted = self.delete_everywhere(user, msgs).await;
        if !msgs.is_empty() {
            self.changed(user);
        }
        deleted
    }

    async fn delete_everywhere(&self, user: &str, msgs: &[Listed]) -> Result<usize, ReplicaError> {
        let hlc = self.clock.now();
        let mut per_node: BTreeMap<NodeId, Vec<Tombstone>> = BTreeMap::new();
        for m in msgs {
            let mut replicas: Vec<NodeId> = m.meta.replicas.clone();
            replicas.extend(&m.holders);
            replicas.sort_unstable();
            replicas.dedup();
            let tomb = Tombstone {
                id: m.meta.id,
                hlc,
                replicas: m.meta.replicas.clone(),
            };
            for n in replicas {
                per_node.entry(n).or_default().push(tomb.clone());
            }
        }
        let mut failed = 0;
        // A replica the view has down gets it from the log when it returns
        // (a call to it would only wait out its deadline).
        let view = self.view();
        let (per_node, down): (BTreeMap<_, _>, BTreeMap<_, _>) = per_node
            .into_iter()
            .partition(|(n, _)| *n == self.me || is_live(&view, *n));
        for (n, tombs) in down {
            self.log_deletion(n, user, tombs)?;
            failed += 1;
        }
        let sends = per_node.into_iter().map(|(n, tombs)| async move {
            let r = self
                .call(
                    n,
                    Request::Delete {
                        user: user.to_owned(),
                        tombs: tombs.clone(),
                    },
                )
                .await;
            (n, tombs, r)
        });
        for (n, tombs, r) in futures::future::join_all(sends).await {
            if let Err(e) = r {
                debug!(node = n, user, error = %e, "deletion not acknowledged; logged for later");
                self.log_deletion(n, user, tombs)?;
                failed += 1;
            }
        }
        if failed > 0 {
            info!(
                user,
                replicas_missed = failed,
                "deletions logged until the replicas return"
            );
        }
        Ok(msgs.len())
    }

    /// A hybrid logical clock value for a change made now (a session
    /// stamps a flag change or a move with it).
    pub fn hlc_now(&self) -> u64 {
        self.clock.now()
    }

    /// Sends folder and flag changes of the user's messages to every
    /// replica of each (and every node that listed it). A replica that
    /// does not acknowledge gets them from the durable update log when it
    /// is back, and anti-entropy merges whatever both miss. Fails only if
    /// this node cannot record a change owed to a replica.
    pub async fn mark(&self, user: &str, changes: &[(Listed, MarkChange)]) -> Result<(), ReplicaError> {
        let marked = self.mark_everywhere(user, changes).await;
        if !changes.is_empty() {
            self.changed(user);
        }
        marked
    }

    async fn mark_everywhere(&self, user: &str, changes: &[(Listed, MarkChange)]) -> Result<(), ReplicaError> {
        let mut per_node: BTreeMap<NodeId, Vec<MarkChange>> = BTreeMap::new();
        for (m, change) in changes {
            let mut nodes: Vec<NodeId> = m.meta.replicas.clone();
            nodes.extend(&m.holders);
            nodes.sort_unstable();
            nodes.dedup();
            for n in nodes {
                per_node.entry(n).or_default().push(change.clone());
            }
        }
        let view = self.view();
        let (per_node, down): (BTreeMap<_, _>, BTreeMap<_, _>) = per_node
            .into_iter()
            .partition(|(n, _)| *n == self.me || is_live(&view, *n));
        let log = |n: NodeId, changes: Vec<MarkChange>| {
            self.log_update(n, user, Owed::Marks(changes))
                .map_err(|e| ReplicaError::UpdateLog(e.to_string()))
        };
        for (n, changes) in down {
            log(n, changes)?;
        }
        let sends = per_node.into_iter().map(|(n, changes)| async move {
            let mut missed = Vec::new();
            for chunk in changes.chunks(MARKS_PER_CALL_MAX) {
                let req = Request::Mark {
                    user: user.to_owned(),
                    changes: chunk.to_vec(),
                };
                if let Err(e) = self.call(n, req).await {
                    debug!(node = n, user, error = %e, "flag change not acknowledged; logged for later");
                    missed.extend_from_slice(chunk);
                }
            }
            (n, missed)
        });
        for (n, missed) in futures::future::join_all(sends).await {
            if !missed.is_empty() {
                log(n, missed)?;
            }
        }
        Ok(())
    }

    /// Best effort: tombstones to `nodes`, logged where not acknowledged.
    async fn send_tombstones(&self, user: &str, nodes: &[NodeId], tombs: Vec<Tombstone>) {
        let view = self.view();
        for &n in nodes {
            let req = Request::Delete {
                user: user.to_owned(),
                tombs: tombs.clone(),
            };
            let live = n == self.me || is_live(&view, n);
            if (!live || self.call(n, req).await.is_err())
                && let Err(e) = self.log_update(n, user, Owed::Tombs(tombs.clone()))
            {
                warn!(error = %e, "cannot log a tombstone");
            }
        }
    }
}
