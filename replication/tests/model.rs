//! Model-based property test of the fragment store: random sequences of
//! deliveries, deletions, compactions and reopens are applied both to the
//! store and to a plain in-memory model, and every observable of the store is
//! compared with the model after every operation.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use replication::{BodyHash, Delivery, FragmentStore, MessageId, StoreError};

use common::{SMALL_SEGMENT, TempDir};

const USERS: [&str; 4] = [
    "alice@example.org",
    "bob@example.org",
    "carol@example.org",
    "dave@example.org",
];
const DEFAULT_SEGMENT: u64 = 64 << 20;
/// A compaction loop that has not reached `None` after this many rounds is
/// taken to be looping forever.
const COMPACT_ROUNDS_MAX: usize = 1000;

#[derive(Debug, Clone)]
enum Op {
    /// A new message with a new random body, to the users of the bit mask.
    Deliver { users: u8, size: usize, seed: u64 },
    /// A new message (new id) whose body is byte-for-byte one delivered
    /// earlier, alive or deleted: exercises body dedup and revival.
    Redeliver { users: u8, pick: Index },
    /// Deletes some of the user's messages, maybe plus an id the user does
    /// not hold (another user's, or one already deleted).
    Delete {
        user: usize,
        picks: Vec<Index>,
        stray: Option<Index>,
    },
    /// Deletes all of the user's messages but every `keep_every`-th: makes
    /// whole segments mostly dead, so that compaction has work.
    DeleteMost { user: usize, keep_every: usize },
    /// `compact_once` until it returns `None`.
    Compact,
    /// `close` and open again, maybe with the other segment size.
    Reopen { small: bool },
    /// Concurrent operations whose outcome does not depend on their order:
    /// for each item, delete one of the user's messages and, maybe, deliver
    /// its body anew (new id) to other users, all spawned at once so that
    /// they share writer batches; with `compact`, a compaction loop runs
    /// alongside.
    Burst {
        items: Vec<(usize, Index, Option<u8>)>,
        compact: bool,
    },
}

/// Recipients as a bit mask over `USERS`: mostly one, sometimes several.
fn users_mask() -> impl Strategy<Value = u8> + Clone {
    prop_oneof![3 => (0..4u8).prop_map(|i| 1 << i), 1 => 1u8..16]
}

/// `burst_weight` 0 leaves out concurrent bursts.
fn op(burst_weight: u32) -> impl Strategy<Value = Op> {
    let users = users_mask();
    let size = prop_oneof![1 => Just(0usize), 9 => 0usize..3000];
    prop_oneof![
        10 => (users.clone(), size, any::<u64>()).prop_map(|(users, size, seed)| Op::Deliver { users, size, seed }),
        3 => (users, any::<Index>()).prop_map(|(users, pick)| Op::Redeliver { users, pick }),
        6 => (0..USERS.len(), prop::collection::vec(any::<Index>(), 0..10), prop::option::of(any::<Index>()))
            .prop_map(|(user, picks, stray)| Op::Delete { user, picks, stray }),
        2 => (0..USERS.len(), 2usize..6).prop_map(|(user, keep_every)| Op::DeleteMost { user, keep_every }),
        3 => Just(Op::Compact),
        1 => prop::bool::weighted(0.75).prop_map(|small| Op::Reopen { small }),
        burst_weight => (
            prop::collection::vec((0..USERS.len(), any::<Index>(), prop::option::of(users_mask())), 1..6),
            any::<bool>()
        )
            .prop_map(|(items, compact)| Op::Burst { items, compact }),
    ]
}

#[derive(Default)]
struct Model {
    mailboxes: BTreeMap<&'static str, BTreeMap<MessageId, Vec<u8>>>,
    /// Every body ever delivered, for `Redeliver`.
    bodies_ever: Vec<Vec<u8>>,
    /// Every id ever delivered, for stray deletes.
    ids_ever: Vec<MessageId>,
    /// Ids deleted from every mailbox that held them: must never come back.
    gone: BTreeSet<(&'static str, MessageId)>,
    clock_ms: u64,
}

struct Harness {
    dir: TempDir,
    store: Option<Arc<FragmentStore>>,
    model: Model,
}

impl Harness {
    fn store(&self) -> &FragmentStore {
        self.store.as_deref().expect("store is open")
    }

    async fn deliver(&mut self, users: u8, body: Vec<u8>) -> Result<(), TestCaseError> {
        let users = Self::users_of(users);
        self.model.clock_ms += 1;
        let arrival_ms = 1_700_000_000_000 + self.model.clock_ms;
        let id = self.store().new_message_id(arrival_ms);
        let delivery = Delivery {
            id,
            arrival_ms,
            users: users.iter().map(|u| u.to_string()).collect(),
            folder: "INBOX".into(),
            body: body.clone(),
            replicas: vec![],
        };
        let got = self.store().deliver(delivery).await;
        prop_assert!(
            matches!(&got, Ok(h) if *h == BodyHash::of(&body)),
            "deliver to {users:?} of {} bytes should resolve Ok(hash of body), got {got:?}",
            body.len()
        );
        for u in users {
            self.model.mailboxes.entry(u).or_default().insert(id, body.clone());
        }
        self.model.bodies_ever.push(body);
        self.model.ids_ever.push(id);
        Ok(())
    }

    fn users_of(mask: u8) -> Vec<&'static str> {
        (0..USERS.len())
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| USERS[i])
            .collect()
    }

    async fn burst(&mut self, items: &[(usize, Index, Option<u8>)], compact: bool) -> Result<(), TestCaseError> {
        let store = self.store.clone().expect("store is open");
        let mut tasks = tokio::task::JoinSet::new();
        let compaction = compact.then(|| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..COMPACT_ROUNDS_MAX {
                    match store.compact_once().await {
                        Ok(Some(_)) => {}
                        Ok(None) => return Ok(()),
                        Err(e) => return Err(format!("compact_once failed: {e:?}")),
                    }
                }
                Err(format!(
                    "compact_once did not reach None in {COMPACT_ROUNDS_MAX} rounds"
                ))
            })
        });
        let mut deletes: BTreeMap<(&'static str, MessageId), usize> = BTreeMap::new();
        let mut deliveries = Vec::new();
        for (user, pick, redeliver) in items {
            let held = self.held(*user);
            if held.is_empty() {
                continue;
            }
            let user = USERS[*user];
            let id = *pick.get(&held);
            deletes.entry((user, id)).or_insert(0);
            let store1 = store.clone();
            tasks.spawn(async move {
                (
                    Some((user, id)),
                    None,
                    store1.delete(user, vec![id]).await.map(|n| n as u64),
                )
            });
            if let Some(mask) = redeliver {
                let body = self.model.mailboxes[user][&id].clone();
                self.model.clock_ms += 1;
                let arrival_ms = 1_700_000_000_000 + self.model.clock_ms;
                let new_id = store.new_message_id(arrival_ms);
                let users = Self::users_of(*mask);
                deliveries.push((users.clone(), new_id, body.clone()));
                let delivery = Delivery {
                    id: new_id,
                    arrival_ms,
                    users: users.iter().map(|u| u.to_string()).collect(),
                    folder: "INBOX".into(),
                    body,
                    replicas: vec![],
                };
                let store2 = store.clone();
                tasks.spawn(async move { (None, Some(new_id), store2.deliver(delivery).await.map(|_| 0)) });
            }
        }
        drop(store);
        while let Some(joined) = tasks.join_next().await {
            let (delete, delivery, result) = joined.expect("a burst task should not panic");
            match (delete, delivery) {
                (Some((user, id)), _) => {
                    prop_assert!(
                        result.is_ok(),
                        "concurrent delete({user}, [{id}]) should succeed, got {result:?}"
                    );
                    *deletes.get_mut(&(user, id)).expect("planned") += result.unwrap_or(0) as usize;
                }
                (None, Some(id)) => prop_assert!(
                    result.is_ok(),
                    "concurrent delivery {id} (a body being deleted elsewhere) should succeed, got {result:?}"
                ),
                (None, None) => unreachable!("every task is a delete or a delivery"),
            }
        }
        if let Some(compaction) = compaction {
            let r = compaction.await.expect("the compaction task should not panic");
            prop_assert!(r.is_ok(), "compaction alongside the burst should succeed: {r:?}");
        }
        for ((user, id), n) in deletes {
            prop_assert_eq!(
                n,
                1,
                "concurrent deletes of {} of {} should delete it exactly once in all",
                id,
                user
            );
            self.model.mailboxes.get_mut(user).expect("held").remove(&id);
            self.model.gone.insert((user, id));
        }
        for (users, id, body) in deliveries {
            for u in users {
                self.model.mailboxes.entry(u).or_default().insert(id, body.clone());
            }
            self.model.bodies_ever.push(body);
            self.model.ids_ever.push(id);
        }
        Ok(())
    }

    fn held(&self, user: usize) -> Vec<MessageId> {
        self.model
            .mailboxes
            .get(USERS[user])
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    async fn delete(&mut self, user: usize, ids: Vec<MessageId>) -> Result<(), TestCaseError> {
        let user = USERS[user];
        let mailbox = self.model.mailboxes.entry(user).or_default();
        let mut expected = 0;
        for id in &ids {
            if mailbox.remove(id).is_some() {
                expected += 1;
                self.model.gone.insert((user, *id));
            }
        }
        let got = self.store().delete(user, ids.clone()).await;
        prop_assert!(
            matches!(got, Ok(n) if n == expected),
            "delete({user}, {ids:?}) should return Ok({expected}) (distinct ids the user held), got {got:?}"
        );
        Ok(())
    }

    async fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match op {
            Op::Deliver { users, size, seed } => self.deliver(*users, common::bytes(*seed, *size)).await?,
            Op::Redeliver { users, pick } => {
                if self.model.bodies_ever.is_empty() {
                    return Ok(());
                }
                let body = pick.get(&self.model.bodies_ever).clone();
                self.deliver(*users, body).await?;
            }
            Op::Delete { user, picks, stray } => {
                let held = self.held(*user);
                let mut ids: Vec<MessageId> = if held.is_empty() {
                    Vec::new()
                } else {
                    picks.iter().map(|p| *p.get(&held)).collect()
                };
                if let Some(s) = stray
                    && !self.model.ids_ever.is_empty()
                {
                    ids.push(*s.get(&self.model.ids_ever));
                }
                self.delete(*user, ids).await?;
            }
            Op::DeleteMost { user, keep_every } => {
                let ids = self
                    .held(*user)
                    .into_iter()
                    .enumerate()
                    .filter(|(i, _)| i % keep_every != 0)
                    .map(|(_, id)| id)
                    .collect();
                self.delete(*user, ids).await?;
            }
            Op::Compact => {
                let mut rounds = 0;
                loop {
                    let report = self.store().compact_once().await;
                    match report {
                        Ok(Some(_)) => rounds += 1,
                        Ok(None) => break,
                        Err(e) => prop_assert!(false, "compact_once should not fail, got Err({e:?})"),
                    }
                    prop_assert!(
                        rounds < COMPACT_ROUNDS_MAX,
                        "compact_once should reach None within {COMPACT_ROUNDS_MAX} rounds"
                    );
                }
                let s = self.store().stats();
                prop_assert!(
                    s.segments < 2 || 2 * s.live_bytes >= s.disk_bytes,
                    "after compaction reached None the store should be at least half live (or hold one segment), got {s:?}"
                );
            }
            Op::Burst { items, compact } => self.burst(items, *compact).await?,
            Op::Reopen { small } => {
                let before = self.store().stats();
                let store = self.store.take().expect("open");
                let store = Arc::into_inner(store).expect("no task holds the store between operations");
                store.close();
                drop(store);
                let segment = if *small { SMALL_SEGMENT } else { DEFAULT_SEGMENT };
                let store = FragmentStore::open(common::config(self.dir.path(), segment));
                prop_assert!(store.is_ok(), "reopening should succeed, got {store:?}");
                self.store = store.ok().map(Arc::new);
                let after = self.store().stats();
                prop_assert_eq!(
                    (
                        before.entries,
                        before.bodies,
                        before.body_bytes,
                        before.live_bytes,
                        before.disk_bytes
                    ),
                    (
                        after.entries,
                        after.bodies,
                        after.body_bytes,
                        after.live_bytes,
                        after.disk_bytes
                    ),
                    "(entries, bodies, body_bytes, live_bytes, disk_bytes) should be the same after a clean reopen; before {:?}, after {:?}",
                    before,
                    after
                );
            }
        }
        Ok(())
    }

    /// Compares everything the store shows with the model.
    async fn check(&self) -> Result<(), TestCaseError> {
        let store = self.store();
        let mut live: BTreeMap<BodyHash, &Vec<u8>> = BTreeMap::new();
        let mut entries = 0u64;
        for user in USERS {
            let want = self.model.mailboxes.get(user);
            let want_ids: Vec<MessageId> = want.map(|m| m.keys().copied().collect()).unwrap_or_default();
            let listed = store.list(user);
            let got_ids: Vec<MessageId> = listed.iter().map(|e| e.id).collect();
            prop_assert_eq!(
                &got_ids,
                &want_ids,
                "list({}) should show the model's ids, oldest first",
                user
            );
            let mut usage = 0u64;
            for meta in &listed {
                let body = &want.expect("listed ids match the model")[&meta.id];
                let hash = BodyHash::of(body);
                prop_assert_eq!(
                    meta.body,
                    hash,
                    "entry {} of {} should name the hash of its body",
                    meta.id,
                    user
                );
                prop_assert_eq!(
                    meta.size_bytes,
                    body.len() as u64,
                    "entry {} of {} should have its body's size",
                    meta.id,
                    user
                );
                prop_assert_eq!(
                    meta.arrival_ms,
                    meta.id.arrival_ms(),
                    "arrival_ms should match the id's"
                );
                usage += body.len() as u64;
                live.insert(hash, body);
            }
            entries += listed.len() as u64;
            prop_assert_eq!(
                store.usage_bytes(user),
                usage,
                "usage_bytes({}) should be the sum of its sizes",
                user
            );
        }
        for (user, id) in &self.model.gone {
            prop_assert!(
                !store.list(user).iter().any(|e| e.id == *id),
                "deleted message {id} of {user} should never come back"
            );
        }
        for (hash, body) in &live {
            let got = store.read_body(*hash).await;
            prop_assert!(
                matches!(&got, Ok(b) if b == *body),
                "read_body({hash:?}) should return the {} delivered bytes, got {:?}",
                body.len(),
                got.map(|b| b.len())
            );
        }
        let dead: Vec<BodyHash> = self
            .model
            .bodies_ever
            .iter()
            .map(|b| BodyHash::of(b))
            .filter(|h| !live.contains_key(h))
            .collect();
        for hash in dead {
            let got = store.read_body(hash).await;
            prop_assert!(
                matches!(got, Err(StoreError::NoSuchBody)),
                "read_body of an unreferenced body {hash:?} should be Err(NoSuchBody), got {:?}",
                got.map(|b| b.len())
            );
        }
        let s = store.stats();
        prop_assert_eq!(
            s.entries,
            entries,
            "stats().entries should be the model's entry count; {:?}",
            s
        );
        prop_assert_eq!(
            s.bodies,
            live.len() as u64,
            "stats().bodies should be the number of distinct bodies referenced; {:?}",
            s
        );
        let body_bytes: u64 = live.values().map(|b| b.len() as u64).sum();
        prop_assert_eq!(
            s.body_bytes,
            body_bytes,
            "stats().body_bytes should be the sizes of the distinct live bodies; {:?}",
            s
        );
        prop_assert!(
            s.live_bytes <= s.disk_bytes,
            "live_bytes should not exceed disk_bytes; {s:?}"
        );
        let segs = common::segment_files(self.dir.path()).len() as u64;
        prop_assert_eq!(
            s.segments,
            segs,
            "stats().segments should be the number of segment files"
        );
        Ok(())
    }
}

async fn run_case(small: bool, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = TempDir::new("model");
    let segment = if small { SMALL_SEGMENT } else { DEFAULT_SEGMENT };
    let store = FragmentStore::open(common::config(dir.path(), segment)).expect("open a fresh store");
    let mut h = Harness {
        dir,
        store: Some(Arc::new(store)),
        model: Model::default(),
    };
    h.check().await?;
    for (i, op) in ops.iter().enumerate() {
        h.apply(op)
            .await
            .map_err(|e| TestCaseError::fail(format!("op #{i} {op:?}: {e}")))?;
        h.check()
            .await
            .map_err(|e| TestCaseError::fail(format!("after op #{i} {op:?}: {e}")))?;
    }
    // Whatever the sequence, a final reopen must show the same.
    h.apply(&Op::Reopen { small }).await?;
    h.check()
        .await
        .map_err(|e| TestCaseError::fail(format!("after the final reopen: {e}")))?;
    if let Some(store) = h.store.take().and_then(Arc::into_inner) {
        store.close();
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        max_shrink_iters: 4000,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("proptest-regressions"))),
        ..ProptestConfig::default()
    })]

    /// Sequential operations: every op completes before the next starts.
    #[test]
    fn store_matches_model(small in prop::bool::weighted(0.75), ops in prop::collection::vec(op(0), 1..60)) {
        runtime().block_on(run_case(small, ops))?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        max_shrink_iters: 500,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// The same with concurrent bursts mixed in (their timing is not
    /// reproducible, so failures are not persisted and shrink poorly).
    /// Currently fails: a batch that deletes a body's last reference and
    /// then delivers the same body panics the writer thread (see `store.rs`,
    /// `delete_of_last_reference_and_redelivery_in_one_batch`).
    #[test]
    fn store_matches_model_with_concurrent_bursts(
        small in prop::bool::weighted(0.75),
        ops in prop::collection::vec(op(3), 1..60),
    ) {
        runtime().block_on(run_case(small, ops))?;
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
