//! Seeded simulation of the replica protocol: several replicators, each
//! with a real fragment store, over the in-memory network. Deliveries,
//! deletions, lost requests and replies, node crashes and restarts; then
//! the faults heal and an oracle checks that
//! * every acknowledged, undeleted message is on exactly its R replicas,
//!   and every node lists it;
//! * nothing deleted is present anywhere;
//! * no message is present that was never acknowledged.
//!
//! A failing run prints `REPRODUCE WITH: SEED=n cargo test -p replication
//! --test sim`. The seed fixes the operations and the fault schedule; the
//! order in which concurrent calls meet the network's random draws is the
//! runtime's, so a rerun is close to, not always exactly, the failing run.
//! `pure_sim.rs` drives the pure core (managers, anti-entropy plans) from a
//! seed alone, where a seed replays exactly.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use common::TempDir;
use placement::{NodeId as PNodeId, NodeInfo, NodeState, View};
use replication::mem_net::{MemNet, MemRouter, Serve};
use replication::replica::{DeliverOutcome, ReplicaConfig, Replicator};
use replication::{BodyHash, FragmentStore, MessageId, StoreConfig};
use testkit::Rng;

const N_NODES: u64 = 4;
const R: usize = 2;

type Rep = Replicator<MemNet>;

struct Node {
    id: u64,
    dir: TempDir,
    rep: Option<Arc<Rep>>,
    /// Draining (in the view as such) or removed (no longer in the view).
    draining: bool,
    removed: bool,
    /// What the node held when it last went down (healing runs), and
    /// whether its update log still had deletions to send.
    held: BTreeSet<(String, MessageId)>,
    dead_held: BTreeSet<(String, MessageId)>,
    pending_at_crash: usize,
}

struct Sim {
    router: Arc<MemRouter>,
    nodes: Vec<Node>,
    epoch: u64,
    /// (user, id) → body hash, for every acknowledged copy.
    acked: BTreeMap<(String, MessageId), BodyHash>,
    deleted: BTreeSet<(String, MessageId)>,
    /// Deliveries that failed (a temporary error to the client): a copy
    /// whose acknowledgement was lost may be visible until its tombstone
    /// arrives, never after healing.
    failed: BTreeSet<(String, MessageId)>,
}

fn open(router: &Arc<MemRouter>, id: u64, dir: &TempDir) -> Arc<Rep> {
    open_with(router, id, dir, |_| {})
}

fn open_with(router: &Arc<MemRouter>, id: u64, dir: &TempDir, tune: impl FnOnce(&mut ReplicaConfig)) -> Arc<Rep> {
    let store = FragmentStore::open(StoreConfig {
        dir: dir.path().join("store"),
        segment_bytes_max: 16 << 10,
        ..StoreConfig::new("")
    })
    .expect("store opens");
    let mut cfg = ReplicaConfig::new(dir.path().join("updates"));
    cfg.replicas = R;
    cfg.spread = 3;
    cfg.call_timeout = Duration::from_secs(5);
    // Tombstones go as soon as every replica is known to hold them, so that
    // the run exercises their removal.
    cfg.tombstone_min_age = Duration::ZERO;
    tune(&mut cfg);
    let rep = Arc::new(Replicator::new(id, Arc::new(store), router.net(id), cfg).expect("replicator"));
    let serve: Arc<dyn Serve> = rep.clone();
    router.register(id, Arc::downgrade(&serve));
    rep
}

impl Sim {
    fn new(seed: u64) -> Sim {
        Sim::sized(seed, N_NODES)
    }

    fn sized(seed: u64, n_nodes: u64) -> Sim {
        let router = MemRouter::new(seed);
        let nodes = (1..=n_nodes)
            .map(|id| {
                let dir = TempDir::new(&format!("sim-{seed}-{id}"));
                let rep = open(&router, id, &dir);
                Node {
                    id,
                    dir,
                    rep: Some(rep),
                    draining: false,
                    removed: false,
                    held: BTreeSet::new(),
                    dead_held: BTreeSet::new(),
                    pending_at_crash: 0,
                }
            })
            .collect();
        let mut sim = Sim {
            router,
            nodes,
            epoch: 0,
            acked: BTreeMap::new(),
            deleted: BTreeSet::new(),
            failed: BTreeSet::new(),
        };
        sim.publish_view();
        sim
    }

    fn live(&self) -> Vec<Arc<Rep>> {
        self.nodes.iter().filter_map(|n| n.rep.clone()).collect()
    }

    fn publish_view(&mut self) {
        self.epoch += 1;
        let infos = self
            .nodes
            .iter()
            .filter(|n| !n.removed)
            .map(|n| NodeInfo {
                id: PNodeId(n.id),
                weight: 1,
                zone: String::new(),
                state: if n.rep.is_none() {
                    NodeState::Down
                } else if n.draining {
                    NodeState::Draining
                } else {
                    NodeState::Up
                },
            })
            .collect();
        let view = Arc::new(View::with_slot_bits(self.epoch, infos, placement::MIN_SLOT_BITS).expect("view"));
        for r in self.live() {
            r.set_view(view.clone());
        }
    }

    async fn crash(&mut self, i: usize) {
        let Some(rep) = self.nodes[i].rep.take() else { return };
        self.nodes[i].held = users()
            .into_iter()
            .flat_map(|u| rep.store().list(&u).into_iter().map(move |m| (u.clone(), m.id)))
            .collect();
        self.nodes[i].dead_held = deletions_on(&rep);
        self.nodes[i].pending_at_crash = rep.pending_updates();
        self.router.set_down(self.nodes[i].id, true);
        rep.store().close();
        drop(rep);
        self.publish_view();
    }

    async fn restart(&mut self, i: usize) {
        if self.nodes[i].rep.is_some() || self.nodes[i].removed {
            return;
        }
        let rep = open(&self.router, self.nodes[i].id, &self.nodes[i].dir);
        self.nodes[i].rep = Some(rep.clone());
        self.router.set_down(self.nodes[i].id, false);
        self.publish_view();
        rep.ask_reports().await;
        for r in self.live() {
            r.report_round().await;
        }
    }

    /// Everything the oracle wants present: (user, id) → hash.
    fn expected(&self) -> BTreeMap<(String, MessageId), BodyHash> {
        self.acked
            .iter()
            .filter(|(k, _)| !self.deleted.contains(*k))
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }
}

/// Copies pulled and tombstones applied by anti-entropy, on every live node.
fn repairs(sim: &Sim) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    sim.live()
        .iter()
        .map(|r| r.counters.repairs_pulled.load(Relaxed) + r.counters.repairs_tombstones.load(Relaxed))
        .sum()
}

/// One message for one user, through `front`.
async fn deliver_one(front: &Rep, user: &str, arrival_ms: u64, body: String) -> DeliverOutcome {
    front
        .deliver(&[user.to_owned()], "INBOX", arrival_ms, body.into_bytes())
        .await
}

fn users() -> Vec<String> {
    (0..12).map(|i| format!("u{i}@example.org")).collect()
}

async fn run(seed: u64, ops: usize) {
    let mut rng = Rng::new(seed);
    let mut sim = Sim::new(seed);
    let users = users();
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    for step in 0..ops {
        let live: Vec<usize> = (0..sim.nodes.len()).filter(|&i| sim.nodes[i].rep.is_some()).collect();
        let front = sim.nodes[live[rng.below(live.len() as u64) as usize]]
            .rep
            .clone()
            .expect("live");
        match rng.below(100) {
            0..=49 => {
                let n = 1 + rng.below(3) as usize;
                let mut rcpts: Vec<String> = (0..n)
                    .map(|_| users[rng.below(users.len() as u64) as usize].clone())
                    .collect();
                rcpts.sort();
                rcpts.dedup();
                // Some bodies repeat, to exercise bodies shared by messages.
                let body = if !bodies.is_empty() && rng.below(4) == 0 {
                    bodies[rng.below(bodies.len() as u64) as usize].clone()
                } else {
                    let len = 50 + rng.below(3000) as usize;
                    let b: Vec<u8> = (0..len).map(|_| b'a' + rng.below(26) as u8).collect();
                    bodies.push(b.clone());
                    b
                };
                let hash = BodyHash::of(&body);
                let out = front.deliver(&rcpts, "INBOX", 1_000 + step as u64, body).await;
                for (u, ok) in rcpts.iter().zip(&out.stored) {
                    if *ok {
                        sim.acked.insert((u.clone(), out.id), hash);
                    } else {
                        sim.failed.insert((u.clone(), out.id));
                    }
                }
            }
            50..=69 => {
                let user = &users[rng.below(users.len() as u64) as usize];
                let mailbox = front.mailbox(user).await;
                let victims: Vec<_> = mailbox.into_iter().filter(|_| rng.below(2) == 0).collect();
                if victims.is_empty() {
                    continue;
                }
                // Every listed message was acknowledged, or is a failed
                // delivery's copy whose tombstone is still on its way.
                for v in &victims {
                    let key = (user.clone(), v.meta.id);
                    assert!(
                        sim.acked.contains_key(&key) || sim.failed.contains(&key),
                        "seed {seed} step {step}: listed a message never acknowledged: {user} {}",
                        v.meta.id
                    );
                }
                if front.delete(user, &victims).await.is_ok() {
                    for v in victims {
                        sim.deleted.insert((user.clone(), v.meta.id));
                    }
                }
            }
            70..=74 => {
                let down = sim.nodes.iter().filter(|n| n.rep.is_none()).count();
                // Keep at least R + 1 nodes up: a delivery still finds R.
                if down < (N_NODES as usize - R - 1) {
                    let i = rng.below(sim.nodes.len() as u64) as usize;
                    sim.crash(i).await;
                }
            }
            75..=82 => {
                let i = rng.below(sim.nodes.len() as u64) as usize;
                sim.restart(i).await;
            }
            83..=87 => {
                let on = rng.below(3) != 0;
                let (a, b) = if on {
                    (rng.below(200) as u32, rng.below(200) as u32)
                } else {
                    (0, 0)
                };
                sim.router.set_loss(a, b);
            }
            88..=92 => {
                front.anti_entropy_round().await;
            }
            93..=95 => {
                front.replay_updates().await;
            }
            96 => {
                front.expire_tombstones().await;
            }
            97 => {
                front.chase_reports().await;
            }
            _ => {
                front.report_round().await;
            }
        }
    }

    // Heal: no loss, every node back, then rounds until nothing changes.
    sim.router.set_loss(0, 0);
    for i in 0..sim.nodes.len() {
        sim.restart(i).await;
    }
    let mut quiet = false;
    for _ in 0..10 {
        let before = repairs(&sim);
        let mut changed = 0;
        for r in sim.live() {
            changed += r.replay_updates().await;
            r.report_round().await;
            let rep = r.anti_entropy_round().await;
            assert_eq!(rep.peers_failed, 0, "seed {seed}: no faults left, yet a peer failed");
        }
        // Repairs happen on both sides of an exchange: count them all.
        changed += (repairs(&sim) - before) as usize;
        let pending: usize = sim.live().iter().map(|r| r.pending_updates()).sum();
        if changed == 0 && pending == 0 {
            quiet = true;
            break;
        }
    }
    assert!(quiet, "seed {seed}: repairs did not converge within 10 rounds");

    // Every replica now holds every tombstone: one more exchange (started
    // after they were all taken) lets every node forget them all, and
    // nothing comes back afterwards.
    tokio::time::sleep(Duration::from_millis(5)).await;
    for r in sim.live() {
        let rep = r.anti_entropy_round().await;
        assert_eq!(
            rep.copies_pulled + rep.tombstones_applied,
            0,
            "seed {seed}: converged, yet repaired"
        );
    }
    let mut forgotten = 0;
    for r in sim.live() {
        forgotten += r.expire_tombstones().await;
    }
    let left: u64 = sim.live().iter().map(|r| r.store().stats().tombstones).sum();
    assert_eq!(
        left, 0,
        "seed {seed}: tombstones kept although every replica holds them"
    );
    let before = repairs(&sim);
    for r in sim.live() {
        r.anti_entropy_round().await;
    }
    assert_eq!(
        repairs(&sim),
        before,
        "seed {seed}: anti-entropy changed something after tombstones went"
    );

    // The oracle.
    let expected = sim.expected();
    let reps = sim.live();
    let mut held: BTreeMap<(String, MessageId), Vec<u64>> = BTreeMap::new();
    for r in &reps {
        for u in &users {
            for m in r.store().list(u) {
                let key = (u.clone(), m.id);
                assert!(
                    sim.acked.contains_key(&key),
                    "seed {seed}: node {} holds {u} {} that was never acknowledged",
                    r.id(),
                    m.id
                );
                assert!(
                    !sim.deleted.contains(&key),
                    "seed {seed}: node {} still holds deleted {u} {}",
                    r.id(),
                    m.id
                );
                assert_eq!(
                    m.replicas.len(),
                    R,
                    "seed {seed}: replica set of {u} {} is {:?}",
                    m.id,
                    m.replicas
                );
                assert!(
                    m.replicas.contains(&r.id()),
                    "seed {seed}: node {} holds a copy outside its set",
                    r.id()
                );
                assert_eq!(
                    Some(&m.body),
                    expected.get(&key),
                    "seed {seed}: wrong body for {u} {}",
                    m.id
                );
                held.entry(key).or_default().push(r.id());
            }
        }
    }
    for (key, hash) in &expected {
        let holders = held.get(key).cloned().unwrap_or_default();
        assert_eq!(
            holders.len(),
            R,
            "seed {seed}: {} {} ({hash:?}) is on {holders:?}, want {R} copies",
            key.0,
            key.1
        );
    }
    // Every node's view of every mailbox is the whole mailbox.
    for r in &reps {
        for u in &users {
            let listed: BTreeSet<MessageId> = r.mailbox(u).await.into_iter().map(|l| l.meta.id).collect();
            let want: BTreeSet<MessageId> = expected.keys().filter(|k| &k.0 == u).map(|k| k.1).collect();
            assert_eq!(listed, want, "seed {seed}: node {} lists {u} wrongly", r.id());
        }
    }
    // Under-replication is gone once every copy is back.
    let under: u64 = reps.iter().map(|r| r.under_replicated()).sum();
    assert_eq!(under, 0, "seed {seed}: under-replicated messages after healing");
    eprintln!(
        "seed {seed}: {} acknowledged, {} deleted, {} present, {} calls lost, {forgotten} tombstones forgotten at the end",
        sim.acked.len(),
        sim.deleted.len(),
        expected.len(),
        sim.router.lost()
    );
    for r in reps {
        r.store().close();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn replicas_converge_after_faults() {
    let ops: usize = std::env::var("SIM_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(250);
    for seed in testkit::seeds(&[1, 2, 3, 4]) {
        let _reproduce = testkit::Reproduce::new(seed, format!("SIM_OPS={ops} cargo test -p replication --test sim"));
        run(seed, ops).await;
    }
}

/// A deletion that reaches only one replica (the other is down) is not
/// undone by anti-entropy when that replica returns with its copy.
#[tokio::test(flavor = "current_thread")]
async fn deletion_survives_a_replica_that_missed_it() {
    let mut sim = Sim::new(99);
    let user = "zoe@example.org".to_owned();
    let front = sim.live()[0].clone();
    let out = front
        .deliver(std::slice::from_ref(&user), "INBOX", 5, b"hello\r\n".to_vec())
        .await;
    assert_eq!(out.copies[0].len(), R);
    // Take down one replica that is not the front end.
    let victim = *out.copies[0]
        .iter()
        .find(|&&n| n != front.id())
        .expect("a remote replica");
    let vi = sim.nodes.iter().position(|n| n.id == victim).expect("node");
    sim.crash(vi).await;
    let front = sim.live().into_iter().find(|r| r.id() != victim).expect("front");
    let mailbox = front.mailbox(&user).await;
    assert_eq!(mailbox.len(), 1, "one live replica still serves the message");
    front.delete(&user, &mailbox).await.expect("delete is accepted");
    assert!(front.pending_updates() >= 1, "the missed replica's deletion is logged");
    // The tombstone must outlive any cleanup while a replica lacks it.
    tokio::time::sleep(Duration::from_millis(5)).await;
    for r in sim.live() {
        r.anti_entropy_round().await;
        r.expire_tombstones().await;
    }
    assert!(
        front.store().stats().tombstones >= 1,
        "a tombstone went before every replica had it"
    );
    sim.restart(vi).await;
    // Back, but neither the update log nor anti-entropy has reached it: it
    // still holds the copy. No listing shows the message (the others hold
    // its deletion), on any node.
    assert_eq!(sim.nodes[vi].rep.as_ref().expect("up").store().list(&user).len(), 1);
    for r in sim.live() {
        let listed = r.mailbox(&user).await;
        assert!(listed.is_empty(), "node {} lists a deleted message: {listed:?}", r.id());
    }
    // Anti-entropy first (before the update log): the tombstone must win.
    for r in sim.live() {
        r.anti_entropy_round().await;
    }
    for r in sim.live() {
        assert!(
            r.store().list(&user).is_empty(),
            "node {} brought the deleted message back",
            r.id()
        );
    }
    for r in sim.live() {
        r.replay_updates().await;
    }
    assert_eq!(sim.live().iter().map(|r| r.pending_updates()).sum::<usize>(), 0);
}

/// A flag change or a move made while a replica is down reaches it when it
/// is back (by the update log, or by anti-entropy when the log is lost),
/// and changes made through two nodes at once merge to one state on every
/// replica (last writer wins per flag).
#[tokio::test(flavor = "current_thread")]
async fn flags_and_moves_reach_a_replica_that_missed_them() {
    use replication::{FlagMark, MarkChange};
    let mut sim = Sim::new(7);
    let user = "flo@example.org".to_owned();
    let front = sim.live()[0].clone();
    let out = front
        .deliver(std::slice::from_ref(&user), "INBOX", 5, b"hello\r\n".to_vec())
        .await;
    assert_eq!(out.copies[0].len(), R);
    let victim = *out.copies[0]
        .iter()
        .find(|&&n| n != front.id())
        .expect("a remote replica");
    let vi = sim.nodes.iter().position(|n| n.id == victim).expect("node");
    sim.crash(vi).await;
    let front = sim.live().into_iter().find(|r| r.id() != victim).expect("front");
    let listed = front.mailbox(&user).await;
    assert_eq!(listed.len(), 1);
    let hlc = front.hlc_now();
    let change = MarkChange {
        id: listed[0].meta.id,
        folder: Some(("f-archive".into(), hlc)),
        flags: vec![FlagMark {
            name: "\\Seen".into(),
            set: true,
            hlc,
        }],
    };
    front.mark(&user, &[(listed[0].clone(), change)]).await.expect("mark");
    assert!(
        front.pending_updates() >= 1,
        "the change owed to the down replica is logged"
    );
    sim.restart(vi).await;
    let back = sim.nodes[vi].rep.as_ref().expect("up").clone();
    assert!(!back.store().list(&user)[0].marks.has("\\Seen"), "not reached yet");
    // Every listing already shows the newest state (merged across holders).
    for r in sim.live() {
        let l = r.mailbox(&user).await;
        assert!(
            l[0].meta.marks.has("\\Seen") && l[0].meta.folder == "f-archive",
            "node {}",
            r.id()
        );
    }
    for r in sim.live() {
        r.replay_updates().await;
    }
    let m = &back.store().list(&user)[0];
    assert!(
        m.marks.has("\\Seen") && m.folder == "f-archive",
        "the update log delivered it"
    );

    // Two nodes change the same message's flags at once, with the victim
    // down for one of them: anti-entropy alone makes every copy agree.
    sim.crash(vi).await;
    let lives = sim.live();
    let (x, y) = (&lives[0], &lives[1]);
    let l = x.mailbox(&user).await;
    let (hx, hy) = (x.hlc_now(), y.hlc_now());
    let flag = |name: &str, set, hlc| FlagMark {
        name: name.into(),
        set,
        hlc,
    };
    let cx = MarkChange {
        id: l[0].meta.id,
        folder: None,
        flags: vec![flag("\\Seen", false, hx), flag("$A", true, hx)],
    };
    let cy = MarkChange {
        id: l[0].meta.id,
        folder: None,
        flags: vec![flag("$B", true, hy)],
    };
    let (x_holds, y_holds) = (!x.store().list(&user).is_empty(), !y.store().list(&user).is_empty());
    assert!(x_holds || y_holds, "seed 7: one of them holds a copy");
    x.store().mark(&user, vec![cx]).await.expect("mark x");
    y.store().mark(&user, vec![cy]).await.expect("mark y");
    sim.restart(vi).await;
    for _ in 0..2 {
        for r in sim.live() {
            r.anti_entropy_round().await;
        }
    }
    let holders: Vec<_> = sim
        .live()
        .into_iter()
        .filter(|r| !r.store().list(&user).is_empty())
        .collect();
    assert_eq!(holders.len(), R);
    let states: Vec<_> = holders.iter().map(|r| r.store().list(&user)[0].marks.clone()).collect();
    for s in &states {
        assert_eq!(s, &states[0], "replicas disagree after anti-entropy: {states:?}");
    }
    // Where x or y hold a copy, their change is in; the cleared \Seen is newer.
    if x_holds {
        assert!(!states[0].has("\\Seen") && states[0].has("$A"));
    }
    if y_holds {
        assert!(states[0].has("$B"));
    }
}

/// Right after a view change, before the reports reach the users' new
/// managers, every node still lists every mailbox in full: a map answers
/// with every live node until each has reported for the view.
#[tokio::test(flavor = "current_thread")]
async fn listings_are_whole_while_reports_are_in_flight() {
    // More nodes than the spread, so that a map can miss some.
    let mut sim = Sim::sized(11, 8);
    let users = users();
    for r in sim.live() {
        r.report_round().await;
    }
    let front = sim.live()[0].clone();
    let mut want: BTreeMap<String, BTreeSet<MessageId>> = BTreeMap::new();
    let mut deliver = async |front: &Arc<Rep>, u: &String, k: u64| {
        let out = front
            .deliver(std::slice::from_ref(u), "INBOX", k, format!("m{k}\r\n").into_bytes())
            .await;
        assert!(out.stored[0], "{u} {k} stored");
        want.entry(u.clone()).or_default().insert(out.id);
    };
    // Each node down in turn while mail arrives: every mailbox ends up in
    // fragments on more nodes than one delivery's targets.
    for down in 0..sim.nodes.len() {
        sim.crash(down).await;
        for r in sim.live() {
            r.report_round().await;
        }
        let front = sim.live()[0].clone();
        for (i, u) in users.iter().enumerate() {
            deliver(&front, u, (down * 100 + i) as u64).await;
        }
        sim.restart(down).await;
    }
    assert!(front.mail_map(&users[0]).await.2, "reports are in: the map is complete");
    // The node that manages most users goes: those users get new managers,
    // which learn of the other nodes' fragments only from reports not sent
    // yet; a delivery meanwhile gives them a map with its targets alone.
    let view = front.view();
    let vi = (0..sim.nodes.len())
        .max_by_key(|&i| {
            let id = sim.nodes[i].id;
            users
                .iter()
                .filter(|u| view.user_manager(u).map(|n| n.0) == Some(id))
                .count()
        })
        .expect("nodes");
    sim.crash(vi).await;
    let front = sim.live()[0].clone();
    for (i, u) in users.iter().enumerate() {
        deliver(&front, u, (1000 + i) as u64).await;
    }
    for r in sim.live() {
        assert!(
            !r.mail_map(&users[0]).await.2,
            "node {}: reports are not in yet",
            r.id()
        );
        for u in &users {
            let listed: BTreeSet<MessageId> = r.mailbox(u).await.into_iter().map(|l| l.meta.id).collect();
            assert_eq!(&listed, &want[u], "node {} lists {u} in part", r.id());
        }
    }
    // Managers ask for the missing reports; then the maps are complete.
    for r in sim.live() {
        r.chase_reports().await;
    }
    for r in sim.live() {
        assert!(r.mail_map(&users[0]).await.2, "node {}: reports are in", r.id());
        for u in &users {
            let listed: BTreeSet<MessageId> = r.mailbox(u).await.into_iter().map(|l| l.meta.id).collect();
            assert_eq!(&listed, &want[u], "node {} lists {u} in part", r.id());
        }
    }
}

/// A fragment that lands after its node's full report (the sender placed it
/// by an older view) is reported to the user's manager by the node that
/// stores it, so the manager's map, once complete, still shows it. The new
/// view either loses a node (its users' manager is gone, so the front end
/// places them itself) or gains one (the old manager places them and the
/// new one never hears of it from the sender).
#[tokio::test(flavor = "current_thread")]
async fn a_fragment_placed_by_an_old_view_reaches_the_map() {
    late_fragments(false).await;
    late_fragments(true).await;
}

async fn late_fragments(join: bool) {
    let mut sim = Sim::sized(12, 8);
    let users = users();
    let vi = sim.nodes.len() - 1;
    if join {
        sim.crash(vi).await;
    }
    for r in sim.live() {
        r.report_round().await;
    }
    let front = sim.live()[0].clone();
    let old_view = front.view();
    // Everyone takes the new view and reports under it, but the front end
    // is still on the old view when mail arrives.
    if join {
        sim.restart(vi).await;
    } else {
        sim.crash(vi).await;
    }
    let new_view = front.view();
    front.set_view(old_view);
    for r in sim.live() {
        if r.id() != front.id() {
            r.report_round().await;
        }
    }
    let mut want: BTreeMap<String, BTreeSet<MessageId>> = BTreeMap::new();
    for (i, u) in users.iter().enumerate() {
        let out = deliver_one(&front, u, i as u64, format!("late {i}\r\n")).await;
        assert!(out.stored[0], "{u} stored");
        want.entry(u.clone()).or_default().insert(out.id);
    }
    // The front end catches up and reports: every map is complete again.
    front.set_view(new_view);
    front.report_round().await;
    for r in sim.live() {
        for u in &users {
            assert!(
                r.mail_map(u).await.2,
                "join={join} node {}: the map of {u} is complete",
                r.id()
            );
            let listed: BTreeSet<MessageId> = r.mailbox(u).await.into_iter().map(|l| l.meta.id).collect();
            assert_eq!(&listed, &want[u], "join={join} node {} lists {u} in part", r.id());
        }
    }
}

/// A replica that lost its disk gets its copies back from the others, and
/// only the copies it lacks travel.
#[tokio::test(flavor = "current_thread")]
async fn lost_disk_is_rebuilt_by_anti_entropy() {
    let mut sim = Sim::new(7);
    let users = users();
    let front = sim.live()[0].clone();
    for (i, u) in users.iter().enumerate() {
        let out = deliver_one(&front, u, i as u64, format!("body {i}\r\n")).await;
        assert!(out.stored[0]);
        sim.acked
            .insert((u.clone(), out.id), BodyHash::of(format!("body {i}\r\n").as_bytes()));
    }
    let before: u64 = sim.nodes[1].rep.as_ref().expect("up").store().stats().entries;
    assert!(before > 0, "node 2 holds some copies");
    sim.crash(1).await;
    std::fs::remove_dir_all(sim.nodes[1].dir.path().join("store")).expect("wipe the disk");
    sim.restart(1).await;
    assert_eq!(sim.nodes[1].rep.as_ref().expect("up").store().stats().entries, 0);
    for r in sim.live() {
        r.anti_entropy_round().await;
    }
    let pulled: u64 = sim
        .live()
        .iter()
        .map(|r| r.counters.repairs_pulled.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert_eq!(pulled, before, "exactly the lost copies come back");
    assert_eq!(sim.nodes[1].rep.as_ref().expect("up").store().stats().entries, before);
}

/// A network on which every call to another node goes unanswered (a node
/// killed with its connections left half-open).
struct Silent;

impl replication::replica::Network for Silent {
    fn call(
        &self,
        _to: u64,
        _call: replication::replica::Call,
    ) -> replication::replica::BoxFuture<'_, Result<replication::replica::Answer, replication::replica::TransportError>>
    {
        Box::pin(std::future::pending())
    }
}

/// Node 1 of two (R=2), on a network where node 2 never answers; calls
/// have a 600 s deadline.
fn silent_node(dir: &TempDir) -> Arc<Replicator<Silent>> {
    let store = FragmentStore::open(StoreConfig {
        dir: dir.path().join("store"),
        segment_bytes_max: 16 << 10,
        ..StoreConfig::new("")
    })
    .expect("store opens");
    let mut cfg = ReplicaConfig::new(dir.path().join("updates"));
    cfg.replicas = 2;
    cfg.call_timeout = Duration::from_secs(600);
    Arc::new(Replicator::new(1, Arc::new(store), Silent, cfg).expect("replicator"))
}

/// Nodes 1 (up) and 2 (`other`).
fn view(epoch: u64, other: NodeState) -> Arc<View> {
    let infos = [(1, NodeState::Up), (2, other)]
        .into_iter()
        .map(|(id, state)| NodeInfo {
            id: PNodeId(id),
            weight: 1,
            zone: String::new(),
            state,
        })
        .collect();
    Arc::new(View::with_slot_bits(epoch, infos, placement::MIN_SLOT_BITS).expect("view"))
}

/// A call in flight to a node that the next view has down ends when that
/// view arrives, not at its deadline: a delivery waiting on a dead node's
/// copy finishes with the copies it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_with_the_target_down_ends_calls_to_it() {
    let dir = TempDir::new("silent");
    let rep = silent_node(&dir);
    rep.set_view(view(1, NodeState::Up));
    // Two nodes, R=2: node 2 gets a copy (and may be the user's manager).
    let delivery = tokio::spawn({
        let rep = rep.clone();
        async move {
            rep.deliver(&["ann@example.org".to_owned()], "INBOX", 1, b"hi\r\n".to_vec())
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!delivery.is_finished(), "node 2 never answers, yet the delivery ended");
    rep.set_view(view(2, NodeState::Down));
    let out = tokio::time::timeout(Duration::from_secs(30), delivery)
        .await
        .expect("the delivery ends once node 2 is down (its calls are 600 s long)")
        .expect("join");
    assert_eq!(out.stored, [true], "the local copy is stored");
    assert_eq!(out.copies[0], [1]);
    assert!(out.under_replicated);
    assert!(
        rep.counters
            .calls_cut_by_view
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    rep.store().close();
}

/// A POP3 lock asked of a manager that a new view has down is asked of the
/// user's new manager instead of being given up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_follows_the_manager_when_it_goes_down() {
    let dir = TempDir::new("silent-lock");
    let rep = silent_node(&dir);
    let first = view(1, NodeState::Up);
    // A user that node 2 (silent) manages.
    let user = (0..1000)
        .map(|i| format!("p{i}@example.org"))
        .find(|u| first.user_manager(u).map(|n| n.0) == Some(2))
        .expect("some user managed by node 2");
    rep.set_view(first);
    let lock = tokio::spawn({
        let (rep, user) = (rep.clone(), user.clone());
        async move { rep.lock_mailbox(&user).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!lock.is_finished(), "node 2 never answers, yet the lock call ended");
    rep.set_view(view(2, NodeState::Down));
    let got = tokio::time::timeout(Duration::from_secs(30), lock)
        .await
        .expect("the lock call ends once node 2 is down")
        .expect("join");
    assert!(
        matches!(got, Ok(Some((1, _)))),
        "the lock comes from the new manager, node 1: {got:?}"
    );
    // The new manager holds it: a second session is refused.
    assert_eq!(rep.lock_mailbox(&user).await, Err(replication::replica::MailboxInUse));
    rep.store().close();
}

/// A node back from a crash takes the views it missed one by one, while
/// the others, already on the newest, report to it: a report from a node
/// ahead of it is kept whole, then the intermediate view (with it down)
/// drops those maps. Its listings must still be whole (they were missing
/// the mail that arrived while it was down: a multi-process test saw 56
/// of 60 messages).
#[tokio::test(flavor = "current_thread")]
async fn a_report_from_ahead_survives_an_intermediate_view() {
    let mut sim = Sim::sized(21, 4);
    let users = users();
    let vi = sim.nodes.len() - 1;
    let mut want: BTreeMap<String, BTreeSet<MessageId>> = BTreeMap::new();
    let old_view = sim.live()[0].view();
    sim.crash(vi).await;
    let down_view = sim.live()[0].view();
    for (i, u) in users.iter().enumerate() {
        let out = deliver_one(&sim.live()[0], u, i as u64, format!("while down {i}\r\n")).await;
        assert!(out.stored[0], "{u} stored");
        want.entry(u.clone()).or_default().insert(out.id);
    }
    // The node returns; the others take the view with it up at once.
    let id = sim.nodes[vi].id;
    let rep = open(&sim.router, id, &sim.nodes[vi].dir);
    sim.nodes[vi].rep = Some(rep.clone());
    sim.router.set_down(id, false);
    sim.publish_view();
    let up_view = rep.view();
    // It is still on the view it died with when their reports arrive.
    rep.set_view(old_view);
    for r in sim.live() {
        if r.id() != id {
            r.report_round().await;
        }
    }
    rep.set_view(down_view);
    rep.set_view(up_view);
    rep.report_round().await;
    for u in &users {
        let listed: BTreeSet<MessageId> = rep.mailbox(u).await.into_iter().map(|l| l.meta.id).collect();
        assert_eq!(&listed, &want[u], "the returned node lists {u} in part");
    }
    // Chasing the reports the intermediate view voided makes the maps
    // complete again, and still whole.
    rep.chase_reports().await;
    for u in &users {
        assert!(rep.mail_map(u).await.2, "the map of {u} is complete");
        let listed: BTreeSet<MessageId> = rep.mailbox(u).await.into_iter().map(|l| l.meta.id).collect();
        assert_eq!(&listed, &want[u], "after chasing, {u} in part");
    }
}

/// A Store handler dropped midway (its deadline cut it at the server)
/// gives back the in-flight count that placement reads as load.
#[tokio::test(flavor = "current_thread")]
async fn a_cancelled_store_handler_releases_its_load() {
    use replication::replica::{Envelope, Request};
    let sim = Sim::new(31);
    let rep = sim.live()[0].clone();
    assert_eq!(rep.copies_in_flight(), 0);
    let call = |i: u64| Envelope {
        from: 2,
        to: rep.id(),
        hlc: 0,
        load: 0,
        boot: 1,
        body: Request::Store {
            id: rep.store().new_message_id(1000 + i),
            arrival_ms: 1000 + i,
            folder: "INBOX".into(),
            groups: vec![(vec![rep.id(), 2], vec!["u1@example.org".into()])],
            body: format!("cancelled {i}\r\n").into_bytes(),
            epoch: rep.view().epoch(),
            unplaced: Vec::new(),
        },
    };
    for i in 0..20 {
        // Polled until it waits on the store's writer, then dropped.
        let mut handler = Box::pin(rep.handle(call(i)));
        let polled = futures::poll!(&mut handler);
        if polled.is_pending() {
            assert_eq!(rep.copies_in_flight(), 1, "the copy in flight counts as load");
        }
        drop(handler);
        assert_eq!(
            rep.copies_in_flight(),
            0,
            "round {i}: a dropped handler left its load behind"
        );
    }
    // A handler that runs to the end releases it too.
    let answer = rep.handle(call(99)).await;
    assert!(answer.body.is_ok(), "{:?}", answer.body);
    assert_eq!(rep.copies_in_flight(), 0);
}

/// The node that received a message keeps one of its copies when it is in
/// the user's spread (spread 3 of 4 nodes here, so some receivers are not):
/// a local write instead of a body sent away. The managers of the users
/// are other nodes for most deliveries, so the preference travels with the
/// placement call.
#[tokio::test(flavor = "current_thread")]
async fn the_receiving_node_keeps_a_copy_when_it_is_in_the_spread() {
    let sim = Sim::new(41);
    let view = sim.live()[0].view();
    let (mut near, mut in_spread) = (0, 0);
    for (n, user) in users().iter().enumerate() {
        let spread = view.spread_set(placement::UserKey::from_address(user), 3);
        for (i, front) in sim.live().iter().enumerate() {
            let out = deliver_one(front, user, 1000 + (n * 10 + i) as u64, format!("near {n} {i}\r\n")).await;
            assert_eq!(out.copies[0].len(), R, "{out:?}");
            if spread.contains(&PNodeId(front.id())) {
                in_spread += 1;
                near += usize::from(out.copies[0].contains(&front.id()));
            }
        }
    }
    assert!(in_spread > 0);
    assert_eq!(near, in_spread, "every receiver in the spread kept a copy");
}

/// A copy that fails to a node the view still has up (cut off, not yet
/// marked down) counts as under-replicated until it is made, and is made
/// once the node answers again. (It used to count 0: the replica set named
/// only live nodes.)
#[tokio::test(flavor = "current_thread")]
async fn a_copy_that_failed_to_a_live_node_counts_until_it_is_made() {
    let sim = Sim::new(123);
    let cut = sim.nodes[3].id;
    let front = sim.live()[0].clone();
    // The front end has heard from every node (their loads are known), so
    // its own placements may choose the node about to be cut off.
    front.anti_entropy_round().await;
    sim.router.set_down(cut, true);
    let mut short = Vec::new();
    for i in 0..60 {
        let user = format!("u{i}@example.org");
        let out = front
            .deliver(
                std::slice::from_ref(&user),
                "INBOX",
                10 + i,
                format!("m{i}\r\n").into_bytes(),
            )
            .await;
        assert!(out.stored[0], "stored on a live node");
        if out.copies[0].len() < R {
            short.push((user, out.id));
        }
    }
    assert!(!short.is_empty(), "some copies went to the cut-off node");
    let total = |sim: &Sim| sim.live().iter().map(|r| r.under_replicated()).sum::<u64>();
    assert_eq!(
        total(&sim),
        short.len() as u64,
        "each message short of a copy counts once"
    );
    // Still cut off: nothing made, still counted.
    for r in sim.live() {
        assert_eq!(r.make_missing_copies().await, 0);
    }
    assert_eq!(total(&sim), short.len() as u64);
    sim.router.set_down(cut, false);
    let made: usize = {
        let mut n = 0;
        for r in sim.live() {
            n += r.make_missing_copies().await;
        }
        n
    };
    assert_eq!(made, short.len());
    assert_eq!(total(&sim), 0, "every copy made");
    let back = sim.nodes[3].rep.as_ref().expect("up");
    for (user, id) in &short {
        assert!(
            back.store().list(user).iter().any(|e| e.id == *id),
            "{user} {id} on the returning node"
        );
    }
}

// ---------------------------------------------------------------------------
// Self-healing: nodes lost for good, removed, drained, joined, disks lost.

fn healing_open(router: &Arc<MemRouter>, id: u64, dir: &TempDir) -> Arc<Rep> {
    // No grace: a node down is gone at once (the grace is tested on its own).
    open_with(router, id, dir, |cfg| cfg.repair_grace = Duration::ZERO)
}

impl Sim {
    fn healing(seed: u64, n_nodes: u64) -> Sim {
        let mut sim = Sim::sized(seed, 0);
        for _ in 0..n_nodes {
            sim.join_node();
        }
        sim.publish_view();
        sim
    }

    /// A new node with a fresh id and an empty disk.
    fn join_node(&mut self) -> usize {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let dir = TempDir::new(&format!("heal-{}-{id}", self.router.seed()));
        let rep = healing_open(&self.router, id, &dir);
        self.nodes.push(Node {
            id,
            dir,
            rep: Some(rep),
            draining: false,
            removed: false,
            held: BTreeSet::new(),
            dead_held: BTreeSet::new(),
            pending_at_crash: 0,
        });
        self.nodes.len() - 1
    }

    async fn heal_restart(&mut self, i: usize) {
        if self.nodes[i].rep.is_some() || self.nodes[i].removed {
            return;
        }
        let rep = healing_open(&self.router, self.nodes[i].id, &self.nodes[i].dir);
        self.nodes[i].rep = Some(rep.clone());
        self.router.set_down(self.nodes[i].id, false);
        self.publish_view();
        rep.ask_reports().await;
        for r in self.live() {
            r.report_round().await;
        }
    }

    /// Removes node `i` from the cluster for good (`node remove`).
    async fn remove(&mut self, i: usize) {
        if let Some(rep) = self.nodes[i].rep.take() {
            rep.store().close();
        }
        self.router.set_down(self.nodes[i].id, true);
        self.nodes[i].removed = true;
        self.publish_view();
    }

    /// Whether every acknowledged, undeleted message keeps a copy on some
    /// node other than `i` that is not removed (up, or down with its disk),
    /// and `i` has no deletions left in its update log (the log is the one
    /// durable record of a deletion no replica acknowledged): losing `i`
    /// for good then loses nothing.
    fn safe_to_lose(&self, i: usize) -> bool {
        let (pending, dead_here) = match &self.nodes[i].rep {
            Some(rep) => (rep.pending_updates(), deletions_on(rep)),
            None => (self.nodes[i].pending_at_crash, self.nodes[i].dead_held.clone()),
        };
        if pending > 0 {
            return false;
        }
        let mut kept: BTreeSet<(String, MessageId)> = BTreeSet::new();
        let mut dead: BTreeSet<(String, MessageId)> = BTreeSet::new();
        for (j, n) in self.nodes.iter().enumerate() {
            if j == i || n.removed {
                continue;
            }
            match &n.rep {
                Some(rep) => {
                    for u in users() {
                        kept.extend(rep.store().list(&u).into_iter().map(|m| (u.clone(), m.id)));
                    }
                    dead.extend(deletions_on(rep));
                }
                None => {
                    kept.extend(n.held.iter().cloned());
                    dead.extend(n.dead_held.iter().cloned());
                }
            }
        }
        // A deletion only `i` holds, of a message still held elsewhere,
        // would be lost with it.
        self.expected().keys().all(|k| kept.contains(k))
            && dead_here.iter().all(|k| !kept.contains(k) || dead.contains(k))
    }

    fn members(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| !n.removed && !n.draining && n.rep.is_some())
            .count()
    }

    /// Every live node: a repair round, update replay, reports and an
    /// anti-entropy round; whether anything changed.
    async fn heal_round(&self, rate: &replication::replica::RateLimit) -> bool {
        let before = repairs(self);
        let mut changed = 0;
        for r in self.live() {
            // Notes compared first: a node repairs nothing before.
            r.anti_entropy_round().await;
            let round = r.repair_round(rate).await;
            changed += round.repaired + round.failed + round.deleted + round.settled;
            let moved = r.rebalance_round(rate, u64::MAX).await;
            changed += moved.repaired + moved.failed + moved.deleted;
            changed += r.replay_updates().await as u64;
            r.report_round().await;
        }
        changed += repairs(self) - before;
        changed > 0
    }
}

/// Every up node's stored bytes within 10% of the mean (weights are equal
/// here), give or take `slack` bytes (moves go a message at a time).
fn assert_balanced(sim: &Sim, slack: u64, seed: u64) {
    let bytes: Vec<(u64, u64)> = sim
        .nodes
        .iter()
        .filter(|n| !n.removed && !n.draining)
        .filter_map(|n| n.rep.as_ref().map(|r| (n.id, r.store().stats().body_bytes)))
        .collect();
    let mean = bytes.iter().map(|b| b.1).sum::<u64>() / bytes.len().max(1) as u64;
    for (id, b) in &bytes {
        assert!(
            b.abs_diff(mean) <= mean / 10 + slack,
            "seed {seed}: node {id} stores {b} bytes, the mean is {mean}: {bytes:?}"
        );
    }
}

/// The deletions a node holds (move markers aside).
fn deletions_on(rep: &Rep) -> BTreeSet<(String, MessageId)> {
    users()
        .into_iter()
        .flat_map(|u| {
            rep.store()
                .sync_items(&u, None)
                .into_iter()
                .filter_map(move |i| matches!(i, replication::SyncItem::Dead(_)).then(|| (u.clone(), i.id())))
        })
        .collect()
}

/// Holders of every message present, by (user, id), with their sets.
type Holders = BTreeMap<(String, MessageId), Vec<(u64, Vec<u64>)>>;

fn holders(sim: &Sim) -> Holders {
    let mut held = Holders::new();
    for r in sim.live() {
        for u in users() {
            for m in r.store().list(&u) {
                let mut set = m.replicas.clone();
                set.sort_unstable();
                held.entry((u.clone(), m.id)).or_default().push((r.id(), set));
            }
        }
    }
    held
}

/// `HISTORY=1`: keeps how each message's copies change, step by step, and
/// prints the history of a message the oracle finds wrong.
#[derive(Default)]
struct History {
    on: bool,
    last: BTreeMap<MessageId, String>,
    lines: BTreeMap<MessageId, Vec<String>>,
}

impl History {
    fn note(&mut self, sim: &Sim, step: usize, what: &str) {
        if !self.on {
            return;
        }
        let mut now: BTreeMap<MessageId, String> = BTreeMap::new();
        for n in &sim.nodes {
            let Some(r) = &n.rep else { continue };
            for u in users() {
                for item in r.store().sync_items(&u, None) {
                    let s = match &item {
                        replication::SyncItem::Live(m) => {
                            format!("live{:?}@{}p{:?}", m.replicas, m.placed & 0xffff, m.prior)
                        }
                        replication::SyncItem::Dead(t) => format!("dead{:?}", t.replicas),
                        replication::SyncItem::Moved(m) => {
                            format!("moved{:?}->{:?}@{}", m.replicas, m.to, m.placed & 0xffff)
                        }
                    };
                    now.entry(item.id()).or_default().push_str(&format!(
                        " {}{}:{s}",
                        n.id,
                        if n.draining { "d" } else { "" }
                    ));
                }
            }
        }
        let down: Vec<String> = sim
            .nodes
            .iter()
            .filter(|n| n.rep.is_none())
            .map(|n| format!("{}{}", n.id, if n.removed { "x" } else { "v" }))
            .collect();
        for (id, state) in now {
            if self.last.get(&id) != Some(&state) {
                self.lines
                    .entry(id)
                    .or_default()
                    .push(format!("step {step} {what} (down {down:?}):{state}"));
                self.last.insert(id, state);
            }
        }
    }

    fn of(&self, id: &MessageId) -> String {
        self.lines.get(id).map(|l| l.join("\n")).unwrap_or_default()
    }
}

async fn healing_run(seed: u64, ops: usize) {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut sim = Sim::healing(seed, 5);
    let rate = replication::replica::RateLimit::new(1 << 40);
    let users = users();
    let mut history = History {
        on: std::env::var_os("HISTORY").is_some(),
        ..History::default()
    };
    let mut what = String::new();
    for step in 0..ops {
        history.note(&sim, step, &what);
        let live: Vec<usize> = (0..sim.nodes.len()).filter(|&i| sim.nodes[i].rep.is_some()).collect();
        let front = sim.nodes[live[rng.below(live.len() as u64) as usize]]
            .rep
            .clone()
            .expect("live");
        let pick = |rng: &mut Rng, sim: &Sim| -> Option<usize> {
            let c: Vec<usize> = (0..sim.nodes.len()).filter(|&i| !sim.nodes[i].removed).collect();
            (!c.is_empty()).then(|| c[rng.below(c.len() as u64) as usize])
        };
        let roll = rng.below(100);
        what = format!("roll {roll} at {}", front.id());
        match roll {
            0..=54 => {
                let user = users[rng.below(users.len() as u64) as usize].clone();
                let len = 50 + rng.below(2000) as usize;
                let body: Vec<u8> = (0..len).map(|_| b'a' + rng.below(26) as u8).collect();
                let hash = BodyHash::of(&body);
                let out = front
                    .deliver(std::slice::from_ref(&user), "INBOX", 1_000 + step as u64, body)
                    .await;
                if out.stored[0] {
                    sim.acked.insert((user, out.id), hash);
                } else {
                    sim.failed.insert((user, out.id));
                }
            }
            55..=66 => {
                let user = &users[rng.below(users.len() as u64) as usize];
                let victims: Vec<_> = front
                    .mailbox(user)
                    .await
                    .into_iter()
                    .filter(|_| rng.below(3) == 0)
                    .collect();
                for v in &victims {
                    let key = (user.clone(), v.meta.id);
                    assert!(
                        sim.acked.contains_key(&key) || sim.failed.contains(&key),
                        "seed {seed} step {step}: listed a message never acknowledged"
                    );
                }
                if !victims.is_empty() && front.delete(user, &victims).await.is_ok() {
                    for v in victims {
                        if history.on {
                            history.lines.entry(v.meta.id).or_default().push(format!(
                                "step {step}: DELETED through {} listing holders {:?} set {:?} prior {:?}",
                                front.id(),
                                v.holders,
                                v.meta.replicas,
                                v.meta.prior
                            ));
                        }
                        sim.deleted.insert((user.clone(), v.meta.id));
                    }
                }
            }
            67..=71 => {
                // A crash (down, past the grace at once), while R + 1 stay.
                if sim.members() > R + 1
                    && let Some(i) = pick(&mut rng, &sim)
                {
                    sim.crash(i).await;
                }
            }
            72..=76 => {
                if let Some(i) = pick(&mut rng, &sim) {
                    sim.heal_restart(i).await;
                }
            }
            77..=78 => {
                // Gone for good: a down node removed.
                let down: Vec<usize> = (0..sim.nodes.len())
                    .filter(|&i| !sim.nodes[i].removed && sim.nodes[i].rep.is_none())
                    .collect();
                if !down.is_empty() {
                    let i = down[rng.below(down.len() as u64) as usize];
                    if sim.safe_to_lose(i) {
                        sim.remove(i).await;
                    }
                }
            }
            79..=80 => {
                if sim.nodes.iter().filter(|n| !n.removed).count() < 8 {
                    sim.join_node();
                    sim.publish_view();
                    for r in sim.live() {
                        r.report_round().await;
                    }
                }
            }
            81..=82 => {
                // Drain a member (while R + 1 others stay).
                if sim.members() > R + 1
                    && let Some(i) = pick(&mut rng, &sim)
                    && sim.nodes[i].rep.is_some()
                {
                    sim.nodes[i].draining = true;
                    sim.publish_view();
                }
            }
            83 => {
                // A replaced disk: the node comes back empty, as a new node;
                // its old identity is removed.
                if sim.members() > R + 1
                    && let Some(i) = pick(&mut rng, &sim)
                    && sim.safe_to_lose(i)
                {
                    sim.crash(i).await;
                    sim.remove(i).await;
                    sim.join_node();
                    sim.publish_view();
                }
            }
            84..=89 => {
                front.repair_round(&rate).await;
            }
            90..=93 => {
                let on = rng.below(3) != 0;
                let (a, b) = if on {
                    (rng.below(100) as u32, rng.below(100) as u32)
                } else {
                    (0, 0)
                };
                sim.router.set_loss(a, b);
            }
            94..=96 => {
                front.anti_entropy_round().await;
            }
            _ => {
                front.replay_updates().await;
            }
        }
        // A drained node that holds nothing more is removed.
        for i in 0..sim.nodes.len() {
            let n = &sim.nodes[i];
            if n.draining && !n.removed && n.rep.as_ref().is_some_and(|r| r.drained()) {
                sim.remove(i).await;
            }
        }
    }

    // Heal: no loss, every node that is not removed back, rounds until
    // quiet; drained nodes are removed once empty.
    sim.router.set_loss(0, 0);
    for i in 0..sim.nodes.len() {
        sim.heal_restart(i).await;
    }
    // Quiet: no change for longer than the rebalancer keeps its moves in
    // the users' spreads without progress (then it moves anywhere).
    let (mut quiet, mut still) = (false, 0);
    for _ in 0..60 {
        let changed = sim.heal_round(&rate).await;
        history.note(&sim, ops, "a heal round");
        let mut removed = false;
        for i in 0..sim.nodes.len() {
            let n = &sim.nodes[i];
            if n.draining && !n.removed && n.rep.as_ref().is_some_and(|r| r.drained()) {
                sim.remove(i).await;
                removed = true;
            }
        }
        let pending: usize = sim.live().iter().map(|r| r.pending_updates()).sum();
        still = if !changed && !removed && pending == 0 {
            still + 1
        } else {
            0
        };
        if still > replication::replica::STALLED_ROUNDS {
            quiet = true;
            break;
        }
    }
    assert!(quiet, "seed {seed}: healing did not converge within 60 rounds");
    assert!(
        sim.nodes.iter().all(|n| !n.draining || n.removed),
        "seed {seed}: a draining node still holds copies"
    );

    // The oracle: every acknowledged, undeleted message on exactly R live
    // nodes, all agreeing on the set, which is those nodes; nothing deleted
    // anywhere; nothing never acknowledged.
    let expected = sim.expected();
    let held = holders(&sim);
    for ((user, id), copies) in &held {
        let key = (user.clone(), *id);
        assert!(
            sim.acked.contains_key(&key),
            "seed {seed}: {user} {id} never acknowledged"
        );
        assert!(
            !sim.deleted.contains(&key),
            "seed {seed}: deleted {user} {id} is on {copies:?}\n{}",
            history.of(id)
        );
    }
    for key in expected.keys() {
        let copies = held.get(key).cloned().unwrap_or_default();
        let nodes: Vec<u64> = copies.iter().map(|c| c.0).collect();
        assert_eq!(
            nodes.len(),
            R,
            "seed {seed}: {} {} is on {copies:?}, want {R} copies",
            key.0,
            key.1
        );
        for (_, set) in &copies {
            let mut sorted = nodes.clone();
            sorted.sort_unstable();
            assert_eq!(
                set, &sorted,
                "seed {seed}: {} {}: set {set:?}, holders {nodes:?}",
                key.0, key.1
            );
        }
    }
    for r in sim.live() {
        for u in &users {
            let listed: BTreeSet<MessageId> = r.mailbox(u).await.into_iter().map(|l| l.meta.id).collect();
            let want: BTreeSet<MessageId> = expected.keys().filter(|k| &k.0 == u).map(|k| k.1).collect();
            assert_eq!(listed, want, "seed {seed}: node {} lists {u} wrongly", r.id());
        }
    }
    let under: u64 = sim.live().iter().map(|r| r.under_replicated()).sum();
    assert_eq!(under, 0, "seed {seed}: under-replicated after healing");
    assert_balanced(&sim, 2_100, seed);
    let removed = sim.nodes.iter().filter(|n| n.removed).count();
    eprintln!(
        "seed {seed}: {} acknowledged, {} present, {removed} nodes removed, {} in the cluster",
        sim.acked.len(),
        expected.len(),
        sim.nodes.len() - removed
    );
    for r in sim.live() {
        r.store().close();
    }
}

#[tokio::test(flavor = "current_thread")]
async fn copies_are_restored_after_losses_joins_drains_and_lost_disks() {
    let ops: usize = std::env::var("SIM_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    for seed in testkit::seeds(&[11, 12, 13, 14]) {
        let _reproduce = testkit::Reproduce::new(
            seed,
            format!("SIM_OPS={ops} cargo test -p replication --test sim copies_are_restored"),
        );
        healing_run(seed, ops).await;
    }
}

/// A node down for less than the grace period is waited for: nothing is
/// copied; past it (here: a shorter grace), its copies are made elsewhere,
/// and when it comes back its extra copies are trimmed.
#[tokio::test(flavor = "current_thread")]
async fn the_grace_period_is_waited_out_and_a_returning_node_is_trimmed() {
    let router = MemRouter::new(7);
    let dirs: Vec<TempDir> = (1..=3).map(|i| TempDir::new(&format!("grace-{i}"))).collect();
    let grace = Duration::from_millis(300);
    let open_node = |i: usize| open_with(&router, i as u64 + 1, &dirs[i], |cfg| cfg.repair_grace = grace);
    let mut reps: Vec<Option<Arc<Rep>>> = (0..3).map(|i| Some(open_node(i))).collect();
    let view_of = |epoch: u64, down: Option<u64>| {
        let infos = (1..=3)
            .map(|id| NodeInfo {
                id: PNodeId(id),
                weight: 1,
                zone: String::new(),
                state: if Some(id) == down {
                    NodeState::Down
                } else {
                    NodeState::Up
                },
            })
            .collect();
        Arc::new(View::with_slot_bits(epoch, infos, placement::MIN_SLOT_BITS).expect("view"))
    };
    for r in reps.iter().flatten() {
        r.set_view(view_of(1, None));
    }
    let front = reps[0].clone().expect("up");
    let mut ids = Vec::new();
    for i in 0..30 {
        let out = deliver_one(&front, "u1@example.org", 1_000 + i, format!("message {i}")).await;
        assert!(out.stored[0] && !out.under_replicated);
        ids.push(out.id);
    }
    // Node 3 goes down: the others wait while the grace lasts.
    let on3: usize = reps[2].as_ref().expect("up").store().stats().entries as usize;
    assert!(on3 > 0, "placement put some copies on node 3");
    let r3 = reps[2].take().expect("up");
    r3.store().close();
    drop(r3);
    router.set_down(3, true);
    for r in reps.iter().flatten() {
        r.set_view(view_of(2, Some(3)));
    }
    let rate = replication::replica::RateLimit::new(1 << 40);
    let mut made = 0;
    for r in reps.iter().flatten() {
        assert_eq!(
            r.repair_round(&rate).await.planned,
            0,
            "no repair before notes are compared"
        );
        r.anti_entropy_round().await;
        made += r.repair_round(&rate).await.copies;
    }
    assert_eq!(made, 0, "nothing is copied within the grace period");
    assert!(reps.iter().flatten().map(|r| r.under_replicated()).sum::<u64>() > 0);
    tokio::time::sleep(grace).await;
    assert!(reps.iter().flatten().any(|r| r.repair_wanted()));
    for r in reps.iter().flatten() {
        made += r.repair_round(&rate).await.copies;
    }
    assert_eq!(made as usize, on3, "every copy node 3 held is made again");
    assert_eq!(reps.iter().flatten().map(|r| r.under_replicated()).sum::<u64>(), 0);
    for r in reps.iter().flatten() {
        assert_eq!(r.store().stats().entries, 30, "nodes 1 and 2 hold everything");
    }
    // Node 3 returns with its old copies: anti-entropy trims them.
    reps[2] = Some(open_node(2));
    router.set_down(3, false);
    for r in reps.iter().flatten() {
        r.set_view(view_of(3, None));
    }
    assert_eq!(reps[2].as_ref().expect("up").store().stats().entries as usize, on3);
    for r in reps.iter().flatten() {
        r.anti_entropy_round().await;
    }
    assert_eq!(
        reps[2].as_ref().expect("up").store().stats().entries,
        0,
        "extra copies trimmed"
    );
    for r in reps.iter().take(2).flatten() {
        assert_eq!(r.store().stats().entries, 30, "never below R");
        assert!(!r.repair_wanted());
    }
    for r in reps.iter().flatten() {
        let listed = r.mailbox("u1@example.org").await;
        assert_eq!(listed.len(), 30);
        r.store().close();
    }
}

/// A node that joins takes its share of the mail already stored: moves
/// (copy, new set, old copy dropped) until every node is within 10% of the
/// mean, never below R copies, nothing lost.
#[tokio::test(flavor = "current_thread")]
async fn joined_nodes_take_their_share_of_stored_mail() {
    let mut sim = Sim::healing(21, 3);
    let rate = replication::replica::RateLimit::new(1 << 40);
    let front = sim.live()[0].clone();
    for i in 0..600u64 {
        let user = format!("u{}@example.org", i % 12);
        let body = format!("{i:06} {}", "m".repeat(1_000));
        let out = front
            .deliver(
                std::slice::from_ref(&user),
                "INBOX",
                1_000 + i,
                body.clone().into_bytes(),
            )
            .await;
        assert!(out.stored[0] && !out.under_replicated);
        sim.acked.insert((user, out.id), BodyHash::of(body.as_bytes()));
    }
    sim.join_node();
    sim.join_node();
    sim.publish_view();
    for r in sim.live() {
        r.report_round().await;
    }
    let before: Vec<u64> = sim.live().iter().map(|r| r.store().stats().entries).collect();
    assert_eq!(&before[3..], &[0, 0], "new nodes start empty");
    // Until nothing has changed for longer than the rebalancer keeps its
    // moves in the users' spreads without progress (then it moves
    // anywhere): with 12 users the spreads alone cannot even out 5 nodes.
    let (mut rounds, mut quiet) = (0, 0);
    while quiet <= replication::replica::STALLED_ROUNDS {
        quiet = if sim.heal_round(&rate).await { 0 } else { quiet + 1 };
        rounds += 1;
        assert!(rounds < 80, "rebalancing did not settle");
        // Never below R: every message keeps two copies after each round.
        let held = holders(&sim);
        for key in sim.expected().keys() {
            assert!(held.get(key).is_some_and(|c| c.len() >= R), "{key:?} below R");
        }
    }
    assert_balanced(&sim, 0, 21);
    let held = holders(&sim);
    for key in sim.expected().keys() {
        assert_eq!(held.get(key).map(|c| c.len()), Some(R), "{key:?}");
    }
    for r in sim.live() {
        for u in users() {
            let listed = r.mailbox(&u).await.len();
            assert_eq!(listed, 50, "node {} lists {u}", r.id());
        }
    }
    let after: Vec<u64> = sim.live().iter().map(|r| r.store().stats().entries).collect();
    eprintln!("entries per node before {before:?}, after {rounds} rounds {after:?}");
    for r in sim.live() {
        r.store().close();
    }
}

/// Sessions waiting on a mailbox (IMAP IDLE) are told, not polling: a
/// watch registered at the user's manager from another node hears of a
/// delivery made through a third node (`soon`, when the manager places it)
/// and of a deletion made through the third node (after it), each within
/// a deadline, and nothing else meanwhile; when the manager takes the
/// watch, the session is told to look once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_sessions_are_told_of_deliveries_and_changes() {
    let sim = Sim::new(11);
    let reps = sim.live();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    for r in &reps {
        let (r, stop) = (r.clone(), stop.clone());
        tokio::spawn(async move { r.run_watches(stop).await });
    }
    let user = users()[0].clone();
    let manager = reps[0].view().user_manager(&user).expect("a manager").0;
    let others: Vec<&Arc<Rep>> = reps.iter().filter(|r| r.id() != manager).collect();
    let (watcher, front) = (others[0], others[1]);
    let mut sub = watcher.subscribe(&user);
    let deadline = Duration::from_secs(10);
    let t0 = std::time::Instant::now();
    while !sub.told() {
        assert!(t0.elapsed() < deadline, "the manager took the watch");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Once the watch is taken the session looks once (a change before it
    // was told to nobody).
    let change = tokio::time::timeout(deadline, sub.changed())
        .await
        .expect("told to look once the watch is taken");
    assert!(change.soon, "{change:?}");
    assert!(sub.take_change().is_none(), "nothing else yet");

    let out = deliver_one(front, &user, 1, "told".into()).await;
    assert_eq!(out.stored, vec![true]);
    let change = tokio::time::timeout(deadline, sub.changed())
        .await
        .expect("told of the delivery");
    assert!(change.soon, "a placement is told as soon: {change:?}");

    let listed = front.mailbox(&user).await;
    assert_eq!(listed.len(), 1);
    front.delete(&user, &listed).await.expect("deleted");
    let change = tokio::time::timeout(deadline, sub.changed())
        .await
        .expect("told of the deletion");
    assert!(!change.soon, "a change made is told as made: {change:?}");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sub.changed())
            .await
            .is_err(),
        "nothing else happened"
    );

    drop(sub);
    stop_tx.send(true).expect("stop");
    for r in &reps {
        r.store().close();
    }
}
