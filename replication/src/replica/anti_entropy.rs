//! Anti-entropy: per user and pair of replicas, a digest of the message ids
//! each holds (and whether held or deleted); where digests differ the two
//! exchange their items and repair. What to do with the other side's items
//! is a pure plan ([`plan_sync`]: deletions win over copies, a missing copy
//! is fetched by a node in its replica set); the async part here carries it
//! out. When a tombstone may be forgotten is pure too
//! ([`tombstone_expired`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use tracing::{debug, info};

use super::protocol::{DIGESTS_MAX, Network, NodeId, ReplicaError, Reply, Request};
use super::{RepairReport, Replicator, lock, wall_ms};
use crate::{BodyHash, EntryMeta, MarkChange, MessageId, Moved, SetChange, SyncItem, Tombstone};

/// How long after its start a node repairs even if no anti-entropy round
/// has reached every live peer yet (a peer that is up but failing must not
/// stop repair for good).
pub(super) const CATCH_UP_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// What [`Replicator::reconcile`] returns: what to send back, (copies
/// pulled, tombstones applied), and the newer sets held here.
pub(super) type SyncOutcome = (Vec<SyncItem>, (usize, usize), Vec<SetChange>);

/// What one side does with the other's items of one user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncPlan {
    /// This node's items the other side lacks or has wrong (only when an
    /// answer is owed), by id.
    pub back: Vec<SyncItem>,
    /// Deletions to apply here.
    pub tombstones: Vec<Tombstone>,
    /// Copies this node is meant to hold (in their replica set) and lacks.
    pub fetch: Vec<EntryMeta>,
    /// Newer replica sets to take (one that leaves this node out drops the
    /// copy here, or leaves a move marker where there is none).
    pub adopt: Vec<SetChange>,
    /// Messages the other side holds under an older replica set than this
    /// node's, with this node's (newer) set.
    pub newer_here: Vec<SetChange>,
    /// Folder and flag registers the other side holds newer versions of
    /// (its whole state, to merge here).
    pub marks: Vec<MarkChange>,
}

fn change_of(m: &EntryMeta) -> SetChange {
    SetChange {
        id: m.id,
        replicas: m.replicas.clone(),
        prior: m.prior.clone(),
        placed: m.placed,
    }
}

fn change_of_marker(mv: &Moved) -> SetChange {
    SetChange {
        id: mv.id,
        replicas: mv.to.clone(),
        prior: mv.replicas.iter().copied().filter(|n| !mv.to.contains(n)).collect(),
        placed: mv.placed,
    }
}

/// Compares `theirs` (replica `from`'s items of a user) with `mine` (this
/// node's, `me`): a deletion on either side wins; a copy missing here is
/// fetched if `me` is in its replica set; where the two know a message
/// under different replica sets (a copy, or a move marker left where a copy
/// was dropped), the newer set (by version) wins on both. With `answer`,
/// what to send back: this node's deletions of messages the other still
/// holds, its newer sets, and the items the other did not list though they
/// concern it.
pub fn plan_sync(me: NodeId, from: NodeId, mine: Vec<SyncItem>, theirs: Vec<SyncItem>, answer: bool) -> SyncPlan {
    let mine: HashMap<MessageId, SyncItem> = mine.into_iter().map(|i| (i.id(), i)).collect();
    let mut plan = SyncPlan::default();
    let mut seen: BTreeSet<MessageId> = BTreeSet::new();
    for item in theirs {
        let id = item.id();
        seen.insert(id);
        // (their set, its version) against (mine, its version).
        let mut versions = |theirs: SetChange, mine: SetChange, back: SyncItem| {
            if theirs.placed > mine.placed {
                plan.adopt.push(theirs);
            } else if mine.placed > theirs.placed {
                plan.newer_here.push(mine);
                plan.back.push(back);
            }
        };
        match (item, mine.get(&id)) {
            (SyncItem::Dead(_), Some(SyncItem::Dead(_))) => {}
            (SyncItem::Dead(t), _) => plan.tombstones.push(t),
            (_, Some(m @ SyncItem::Dead(_))) => plan.back.push(m.clone()),
            (SyncItem::Live(theirs), Some(SyncItem::Live(m))) => {
                // Folder and flags: each side merges the other's registers
                // (last writer wins per register, so both end the same).
                let mut ours_back = false;
                if theirs.marks != m.marks || theirs.folder != m.folder {
                    if m.clone().apply_marks(&theirs.marks_change()) {
                        plan.marks.push(theirs.marks_change());
                    }
                    ours_back = theirs.clone().apply_marks(&m.marks_change());
                }
                versions(change_of(&theirs), change_of(m), SyncItem::Live(m.clone()));
                if ours_back && plan.back.last().map(SyncItem::id) != Some(id) {
                    plan.back.push(SyncItem::Live(m.clone()));
                }
            }
            (SyncItem::Live(theirs), Some(SyncItem::Moved(mv))) => {
                // Dropped here for a newer set: only a newer one still
                // wants a copy here; an older one learns the newer set.
                if theirs.placed > mv.placed && theirs.replicas.contains(&me) {
                    plan.fetch.push(theirs);
                } else {
                    versions(change_of(&theirs), change_of_marker(mv), SyncItem::Moved(mv.clone()));
                }
            }
            (SyncItem::Live(meta), None) => {
                if meta.replicas.contains(&me) {
                    plan.fetch.push(meta);
                } else if meta.prior.contains(&me) {
                    // Dropped here before (without a marker): note it.
                    plan.adopt.push(change_of(&meta));
                }
            }
            (SyncItem::Moved(mv), Some(SyncItem::Live(m))) => {
                versions(change_of_marker(&mv), change_of(m), SyncItem::Live(m.clone()));
            }
            (SyncItem::Moved(mv), Some(SyncItem::Moved(m))) => {
                versions(change_of_marker(&mv), change_of_marker(m), SyncItem::Moved(m.clone()));
            }
            (SyncItem::Moved(mv), None) => {
                if mv.replicas.contains(&me) && !mv.to.contains(&me) {
                    plan.adopt.push(change_of_marker(&mv));
                }
            }
        }
    }
    if answer {
        for (id, item) in &mine {
            if !seen.contains(id) && item.involves(from) {
                plan.back.push(item.clone());
            }
        }
    }
    plan.back.sort_by_key(|i| i.id());
    plan
}

/// Whether a tombstone may be forgotten at `now_ms`: older than the
/// retention (its HLC below `oldest_hlc`), or at least `min_age_ms` old and
/// every other replica of the message (`me` aside) known to hold it: an
/// anti-entropy exchange with that replica completed after the tombstone
/// was taken (`clean_since`).
pub fn tombstone_expired(
    me: NodeId,
    now_ms: u64,
    oldest_hlc: u64,
    min_age_ms: u64,
    clean_since: &HashMap<NodeId, u64>,
    (hlc, replicas, added_ms): (u64, &[NodeId], u64),
) -> bool {
    if hlc < oldest_hlc {
        return true;
    }
    now_ms.saturating_sub(added_ms) >= min_age_ms
        && replicas
            .iter()
            .filter(|r| **r != me)
            .all(|r| clean_since.get(r).is_some_and(|since| *since > added_ms))
}

impl<N: Network> Replicator<N> {
    /// Compares digests with every other live node and repairs what
    /// differs, both ways.
    pub async fn anti_entropy_round(&self) -> RepairReport {
        let mut report = RepairReport::default();
        for peer in self.live_peers() {
            report.peers += 1;
            match self.sync_with(peer, &mut report).await {
                Ok(()) => {}
                Err(e) => {
                    report.peers_failed += 1;
                    debug!(peer, error = %e, "anti-entropy with peer incomplete");
                }
            }
        }
        if report.copies_pulled + report.tombstones_applied > 0 {
            info!(?report, "anti-entropy repaired differences");
        }
        if report.peers_failed == 0 {
            self.caught_up.store(true, Ordering::Relaxed);
        }
        report
    }

    async fn sync_with(&self, peer: NodeId, report: &mut RepairReport) -> Result<(), ReplicaError> {
        let started = wall_ms();
        self.sync_digests(peer, report).await?;
        lock(&self.clean_since).insert(peer, started);
        self.synced_missing(peer, started);
        Ok(())
    }

    async fn sync_digests(&self, peer: NodeId, report: &mut RepairReport) -> Result<(), ReplicaError> {
        let digests = self.store.peer_digests_async(peer).await;
        for chunk in digests.chunks(DIGESTS_MAX) {
            let req = Request::Digests {
                digests: chunk.to_vec(),
            };
            let Reply::Differ { users } = self.call(peer, req).await? else {
                return Err(ReplicaError::UnexpectedReply("digests".into()));
            };
            for user in users {
                report.users_differing += 1;
                let items = self.store.sync_items(&user, Some(peer));
                let req = Request::Sync {
                    user: user.clone(),
                    items,
                };
                let Reply::Synced { items: back } = self.call(peer, req).await? else {
                    return Err(ReplicaError::UnexpectedReply("sync".into()));
                };
                let (_, (pulled, tombs), newer_here) = self.reconcile(peer, &user, back, false).await?;
                report.copies_pulled += pulled;
                report.tombstones_applied += tombs;
                if !newer_here.is_empty() {
                    // The other side answered with sets older than ours: it
                    // takes ours (and drops copies they leave it out of).
                    self.set_replicas_on(peer, &user, newer_here).await?;
                }
            }
        }
        Ok(())
    }

    /// Carries out [`plan_sync`] of `theirs` (another replica's items of
    /// `user`) here; returns what to send back, (copies pulled, tombstones
    /// applied), and the newer sets held here of messages the other side
    /// holds under older ones.
    pub(super) async fn reconcile(
        &self,
        from: NodeId,
        user: &str,
        theirs: Vec<SyncItem>,
        answer: bool,
    ) -> Result<SyncOutcome, ReplicaError> {
        let plan = plan_sync(self.me, from, self.store.sync_items(user, None), theirs, answer);
        let n_tombs = plan.tombstones.len();
        if n_tombs > 0 {
            self.store.apply_tombstones(user, plan.tombstones).await?;
            self.counters
                .repairs_tombstones
                .fetch_add(n_tombs as u64, Ordering::Relaxed);
        }
        if !plan.adopt.is_empty() {
            self.store.set_replicas(user, plan.adopt, self.me).await?;
        }
        if !plan.marks.is_empty() {
            let n = self.store.mark(user, plan.marks).await?;
            self.counters.repairs_marks.fetch_add(n as u64, Ordering::Relaxed);
        }
        let mut n_pulled = 0;
        let new_fragment = !plan.fetch.is_empty() && !self.store.holds(user);
        for meta in plan.fetch {
            let body = if self.store.has_body(&meta.body) {
                match self.store.read_body(meta.body).await {
                    Ok(b) => b,
                    Err(_) => self.fetch_body(from, meta.body).await?,
                }
            } else {
                self.fetch_body(from, meta.body).await?
            };
            self.store.take_copy(user, &meta, body).await?;
            n_pulled += 1;
        }
        self.counters
            .repairs_pulled
            .fetch_add(n_pulled as u64, Ordering::Relaxed);
        if new_fragment {
            self.report_new_fragments(vec![user.to_owned()]).await;
        }
        Ok((plan.back, (n_pulled, n_tombs), plan.newer_here))
    }

    async fn fetch_body(&self, from: NodeId, hash: BodyHash) -> Result<Vec<u8>, ReplicaError> {
        match self.call(from, Request::Read { body: hash }).await? {
            Reply::Body { bytes } if BodyHash::of(&bytes) == hash => Ok(bytes),
            _ => Err(ReplicaError::WrongBody(from)),
        }
    }

    /// Forgets the tombstones [`tombstone_expired`] allows (a walk of the
    /// whole store, on a blocking thread).
    pub async fn expire_tombstones(&self) -> usize {
        let now = wall_ms();
        let retention = self.cfg.tombstone_retention.as_millis() as u64;
        let min_age = self.cfg.tombstone_min_age.as_millis() as u64;
        let oldest_hlc = crate::hlc::from_ms(now.saturating_sub(retention));
        let clean = lock(&self.clean_since).clone();
        let me = self.me;
        self.store
            .forget_tombstones_async(move |_, hlc, replicas, added_ms| {
                tombstone_expired(me, now, oldest_hlc, min_age, &clean, (hlc, replicas, added_ms))
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u64) -> MessageId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(1_000 + n).to_be_bytes());
        b[8..].copy_from_slice(&n.to_be_bytes());
        MessageId(b)
    }

    fn live(n: u64, replicas: &[NodeId]) -> SyncItem {
        SyncItem::Live(EntryMeta::delivered(
            id(n),
            BodyHash::of(&n.to_le_bytes()),
            8,
            1_000 + n,
            "INBOX".into(),
            replicas.to_vec(),
        ))
    }

    fn dead(n: u64, replicas: &[NodeId]) -> SyncItem {
        SyncItem::Dead(Tombstone {
            id: id(n),
            hlc: n,
            replicas: replicas.to_vec(),
        })
    }

    #[test]
    fn a_deletion_wins_and_a_missing_copy_is_fetched_by_its_replicas_only() {
        let mine = vec![live(1, &[1, 2]), dead(2, &[1, 2]), live(3, &[1, 2]), live(5, &[1, 2])];
        let theirs = vec![
            dead(1, &[1, 2]),
            live(2, &[1, 2]),
            live(3, &[1, 2]),
            live(4, &[1, 2]),
            live(6, &[2, 3]),
        ];
        let plan = plan_sync(1, 2, mine, theirs, true);
        assert_eq!(plan.tombstones.iter().map(|t| t.id).collect::<Vec<_>>(), vec![id(1)]);
        assert_eq!(
            plan.fetch.iter().map(|m| m.id).collect::<Vec<_>>(),
            vec![id(4)],
            "6 is not ours"
        );
        // Back: our deletion of 2 (they still hold it) and 5 (they lack it).
        assert_eq!(plan.back, vec![dead(2, &[1, 2]), live(5, &[1, 2])]);
        // Without an answer owed, only the deletion they must learn.
        let plan = plan_sync(
            1,
            2,
            vec![dead(2, &[1, 2]), live(5, &[1, 2])],
            vec![live(2, &[1, 2])],
            false,
        );
        assert_eq!(plan.back, vec![dead(2, &[1, 2])]);
    }

    #[test]
    fn tombstones_go_when_every_other_replica_is_clean_since_or_retention_passed() {
        let clean: HashMap<NodeId, u64> = [(2, 500), (3, 100)].into();
        let t = |replicas: &'static [NodeId], added| (1_000, replicas, added);
        assert!(tombstone_expired(1, 1_000, 0, 0, &clean, t(&[1, 2], 400)));
        assert!(
            !tombstone_expired(1, 1_000, 0, 0, &clean, t(&[1, 2, 3], 400)),
            "3 not clean since"
        );
        assert!(
            !tombstone_expired(1, 1_000, 0, 700, &clean, t(&[1, 2], 400)),
            "too young"
        );
        assert!(
            !tombstone_expired(1, 1_000, 0, 0, &clean, t(&[1, 4], 400)),
            "4 never synced"
        );
        assert!(
            tombstone_expired(1, 1_000, 2_000, 0, &clean, t(&[1, 4], 400)),
            "past retention"
        );
    }

    #[test]
    fn copies_with_different_flags_merge_both_ways() {
        let flag = |name: &str, set, hlc| crate::FlagMark {
            name: name.into(),
            set,
            hlc,
        };
        let with = |flags: Vec<crate::FlagMark>| {
            let SyncItem::Live(mut m) = live(1, &[1, 2]) else {
                unreachable!()
            };
            m.marks.flags = flags;
            m
        };
        // A saw \Seen set at 5; B saw it cleared at 7 and $Work set at 3.
        let a = with(vec![flag("\\Seen", true, 5)]);
        let b = with(vec![flag("$Work", true, 3), flag("\\Seen", false, 7)]);
        let plan_b = plan_sync(
            2,
            1,
            vec![SyncItem::Live(b.clone())],
            vec![SyncItem::Live(a.clone())],
            true,
        );
        assert!(plan_b.marks.is_empty(), "A has nothing newer for B");
        assert_eq!(
            plan_b.back,
            vec![SyncItem::Live(b.clone())],
            "B's newer registers go back"
        );
        let plan_a = plan_sync(1, 2, vec![SyncItem::Live(a.clone())], plan_b.back, false);
        assert_eq!(plan_a.marks, vec![b.marks_change()]);
        let mut a2 = a.clone();
        a2.apply_marks(&plan_a.marks[0]);
        assert_eq!(a2.marks, b.marks);
        // Equal copies plan nothing.
        let same = plan_sync(1, 2, vec![SyncItem::Live(b.clone())], vec![SyncItem::Live(b)], true);
        assert_eq!(same, SyncPlan::default());
    }

    fn item() -> impl Strategy<Value = (u64, bool, Vec<NodeId>)> {
        (
            0u64..12,
            any::<bool>(),
            proptest::sample::subsequence(vec![1u64, 2, 3], 1..=3),
        )
    }

    proptest! {
        /// Two replicas that each carry out the other's plan end up
        /// agreeing: every message deleted on one side is deleted on both,
        /// and a copy both are meant to hold is held (or deleted) by both.
        #[test]
        fn an_exchange_converges(
            a in proptest::collection::btree_map(0u64..12, item(), 0..12),
            b in proptest::collection::btree_map(0u64..12, item(), 0..12),
        ) {
            let side = |m: &std::collections::BTreeMap<u64, (u64, bool, Vec<NodeId>)>, me: NodeId| -> Vec<SyncItem> {
                m.values()
                    .filter(|(_, _, r)| r.contains(&me))
                    .map(|(n, alive, r)| if *alive { live(*n, r) } else { dead(*n, r) })
                    .collect()
            };
            let mut mine_a: HashMap<MessageId, SyncItem> = side(&a, 1).into_iter().map(|i| (i.id(), i)).collect();
            let mut mine_b: HashMap<MessageId, SyncItem> = side(&b, 2).into_iter().map(|i| (i.id(), i)).collect();
            // A sends what it shares with B; B plans (and answers); A plans the answer.
            let to_b: Vec<SyncItem> = mine_a.values().filter(|i| i.replicas().contains(&2)).cloned().collect();
            let plan_b = plan_sync(2, 1, mine_b.values().cloned().collect(), to_b, true);
            let plan_a = plan_sync(1, 2, mine_a.values().cloned().collect(), plan_b.back.clone(), false);
            let apply = |mine: &mut HashMap<MessageId, SyncItem>, plan: &SyncPlan| {
                for t in &plan.tombstones {
                    mine.insert(t.id, SyncItem::Dead(t.clone()));
                }
                for m in &plan.fetch {
                    mine.entry(m.id).or_insert(SyncItem::Live(m.clone()));
                }
            };
            apply(&mut mine_b, &plan_b);
            apply(&mut mine_a, &plan_a);
            for (id, ia) in &mine_a {
                if !ia.replicas().contains(&2) {
                    continue;
                }
                let ib = mine_b.get(id);
                match (ia, ib) {
                    (SyncItem::Dead(_), Some(SyncItem::Live(_))) => prop_assert!(false, "{id}: deleted on A, live on B"),
                    (SyncItem::Live(_), Some(SyncItem::Dead(_))) => prop_assert!(false, "{id}: live on A, deleted on B"),
                    (SyncItem::Live(m), None) if m.replicas.contains(&2) => prop_assert!(false, "{id}: B lacks a copy it should hold"),
                    _ => {}
                }
            }
        }
    }
}
