//! Checkpoints of the store's index: a store opened from its checkpoint
//! and the records written since holds exactly what the same store read
//! from every segment holds, whatever ran while the checkpoint was
//! written; a checkpoint torn at any byte or damaged is not used; and a
//! kill -9 while one is written loses nothing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replication::{FlagMark, FragmentStore, MarkChange, MessageId, SetChange, StoreConfig, Tombstone};

use common::{SMALL_SEGMENT, TempDir, bytes, deliver};
use testkit::Rng;

const T0: u64 = 1_700_000_000_000;
const USERS: [&str; 5] = ["alice", "bob", "carol", "dave", "erin"];

/// What a store shows ([`common::state_of`]) and its replica sets.
fn state_of(store: &FragmentStore) -> String {
    let mut sets = store.replica_sets();
    sets.sort();
    let under = store.under_replicated(1, 2, |n| n != 3);
    format!(
        "{}replica sets: {sets:?} under-replicated: {under}\n",
        common::state_of(store, &USERS)
    )
}

/// Asserts that two states are the same, showing the first line that is
/// not (a state is long).
#[track_caller]
fn assert_same(got: &str, want: &str, what: &str) {
    if got == want {
        return;
    }
    let short = |l: Option<&str>| l.map(|l| l.chars().take(400).collect::<String>());
    let at = got.lines().zip(want.lines()).position(|(g, w)| g != w);
    let line = at.unwrap_or(got.lines().count().min(want.lines().count()));
    panic!(
        "{what}: states differ at line {line}\n got: {:?}\nwant: {:?}",
        short(got.lines().nth(line)),
        short(want.lines().nth(line))
    );
}

fn open_chunked(dir: &Path, chunk: usize) -> FragmentStore {
    FragmentStore::open(StoreConfig {
        checkpoint_chunk: chunk,
        ..common::config(dir, SMALL_SEGMENT)
    })
    .expect("the store opens")
}

/// One random change of the store: a delivery (sometimes of a body
/// delivered before, to other users), a deletion, a tombstone from a
/// peer, a new replica set (sometimes one without this node: the copy
/// goes), a folder or flag change, or a step of the log cleaner.
async fn step(store: &FragmentStore, rng: &mut Rng, held: &mut Vec<(&'static str, MessageId, u64)>, n: u64) {
    let roll = rng.below(100);
    if held.is_empty() || roll < 45 {
        let seed = if roll < 8 && n > 0 { n / 2 } else { n };
        let to: Vec<&'static str> = (0..1 + rng.below(3))
            .map(|_| USERS[rng.below(USERS.len() as u64) as usize])
            .collect();
        let mut to = to;
        to.sort_unstable();
        to.dedup();
        let (id, _) = deliver(store, &to, T0 + n, bytes(seed, 200 + (seed as usize * 37) % 900)).await;
        held.extend(to.into_iter().map(|u| (u, id, seed)));
        return;
    }
    let (user, id, _) = held[rng.below(held.len() as u64) as usize];
    match roll {
        45..=59 => {
            store.delete(user, vec![id]).await.expect("delete");
            held.retain(|h| !(h.0 == user && h.1 == id));
        }
        60..=64 => {
            let tomb = Tombstone {
                id,
                hlc: (T0 + n) << 16,
                replicas: vec![1, 2],
            };
            store.apply_tombstones(user, vec![tomb]).await.expect("tombstone");
            held.retain(|h| !(h.0 == user && h.1 == id));
        }
        65..=79 => {
            let replicas = if rng.below(4) == 0 { vec![2, 3] } else { vec![1, 2] };
            let change = SetChange {
                id,
                replicas,
                prior: vec![],
                placed: (T0 + n) << 16,
            };
            store.set_replicas(user, vec![change], 1).await.expect("set replicas");
            if !store.list(user).iter().any(|e| e.id == id) {
                held.retain(|h| !(h.0 == user && h.1 == id));
            }
        }
        80..=94 => {
            let hlc = (T0 + n) << 16;
            let change = MarkChange {
                id,
                folder: (rng.below(2) == 0).then(|| ("Archive".to_owned(), hlc)),
                flags: vec![FlagMark {
                    name: "\\Seen".into(),
                    set: rng.below(3) != 0,
                    hlc,
                }],
            };
            store.mark(user, vec![change]).await.expect("mark");
        }
        _ => {
            store.compact_once().await.expect("a cleaner step");
        }
    }
}

/// Seeded runs: changes of every kind, with checkpoints written while
/// they go on (the index walked a few entries per lock hold, so that
/// changes land between its steps), then the store closed. Opened from
/// its last checkpoint, it is the store read from every segment: the same
/// entries, places, flags, replica sets, tombstones and counts. It goes
/// on working, and opens the same again after more changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_opened_from_its_checkpoint_is_the_store_read_whole() {
    let (mut used, mut interleaved) = (0, 0);
    for seed in 1..=8u64 {
        let dir = TempDir::new(&format!("ckpt-same-{seed}"));
        let mut rng = Rng::new(seed);
        let store = Arc::new(open_chunked(dir.path(), 1 + rng.below(6) as usize));
        let mut held = Vec::new();
        let mut n = 0u64;
        for _ in 0..4 {
            for _ in 0..60 {
                step(&store, &mut rng, &mut held, n).await;
                n += 1;
            }
            let s = store.clone();
            let ck = tokio::task::spawn_blocking(move || s.checkpoint());
            for _ in 0..200 {
                if ck.is_finished() {
                    break;
                }
                step(&store, &mut rng, &mut held, n).await;
                n += 1;
                interleaved += 1;
            }
            let report = ck.await.expect("joined").expect("checkpoint written");
            assert!(
                report.entries > 0,
                "seed {seed}: the checkpoint holds entries: {report:?}"
            );
        }
        for _ in 0..30 {
            step(&store, &mut rng, &mut held, n).await;
            n += 1;
        }
        store.close();
        drop(store);

        let whole = TempDir::new(&format!("ckpt-whole-{seed}"));
        common::copy_store(dir.path(), whole.path());
        let store = common::open(whole.path(), SMALL_SEGMENT);
        assert_eq!(store.open_report().checkpoint_segment, None, "no checkpoint was copied");
        let want = state_of(&store);
        store.close();

        let store = common::open(dir.path(), SMALL_SEGMENT);
        let report = store.open_report();
        let segments = common::segment_files(dir.path()).len() as u64;
        if report.checkpoint_segment.is_some() {
            used += 1;
            assert!(
                report.segments_read < segments,
                "seed {seed}: from a checkpoint fewer segments are read: {report:?} of {segments}"
            );
        }
        assert_eq!(
            state_of(&store),
            want,
            "seed {seed}: opened from its checkpoint ({report:?})"
        );
        for (user, id, body) in &held {
            let listed = store.list(user);
            let e = listed.iter().find(|e| e.id == *id);
            let e = e.unwrap_or_else(|| panic!("seed {seed}: {user}'s message {id} is held"));
            let got = store.read_body(e.body).await.expect("its body reads back");
            assert_eq!(
                got,
                bytes(*body, got.len()),
                "seed {seed}: {user}'s message {id} reads back"
            );
        }
        // It goes on: more changes, a checkpoint, and the same again.
        let store = Arc::new(store);
        for _ in 0..40 {
            step(&store, &mut rng, &mut held, n).await;
            n += 1;
        }
        store.checkpoint().expect("checkpoint");
        step(&store, &mut rng, &mut held, n).await;
        store.close();
        drop(store);
        let whole = TempDir::new(&format!("ckpt-whole-again-{seed}"));
        common::copy_store(dir.path(), whole.path());
        let store = common::open(whole.path(), SMALL_SEGMENT);
        let want = state_of(&store);
        store.close();
        let store = common::open(dir.path(), SMALL_SEGMENT);
        assert!(
            store.open_report().checkpoint_segment.is_some(),
            "seed {seed}: from the new checkpoint"
        );
        assert_same(
            &state_of(&store),
            &want,
            &format!("seed {seed}: reopened after more changes"),
        );
        store.close();
    }
    // A checkpoint is set aside only when a body written before it began
    // is needed by an entry written since and it shows that body nowhere:
    // rare, and the state above is right either way.
    assert!(used >= 6, "most seeds open from their checkpoint: {used} of 8");
    assert!(
        interleaved >= 32,
        "changes landed while checkpoints were written: {interleaved}"
    );
}

/// Messages in a checkpoint, deleted after it, their tombstones then
/// forgotten (expired) and their segments cleaned: nothing in the log
/// speaks of them any more. Opened from that checkpoint, the store does
/// not bring them back (what the checkpoint places in a segment that is
/// gone was dead when it was cleaned), and keeps what is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_deleted_and_forgotten_after_a_checkpoint_stay_gone() {
    let dir = TempDir::new("ckpt-forgotten");
    // Only the checkpoint this test writes.
    let config = StoreConfig {
        checkpoint_every: 0,
        ..common::config(dir.path(), SMALL_SEGMENT)
    };
    let store = FragmentStore::open(config.clone()).expect("opens");
    let mut ids = Vec::new();
    for i in 0..12u64 {
        ids.push(deliver(&store, &["alice"], T0 + i, bytes(i, 900)).await.0);
    }
    let kept = deliver(&store, &["bob"], T0 + 50, bytes(50, 900)).await.0;
    store.checkpoint().expect("checkpoint");
    let first_segments = common::segment_files(dir.path());
    assert_eq!(store.delete("alice", ids.clone()).await.expect("delete"), ids.len());
    // More mail, most of it deleted too, so that the checkpoint's own
    // segment is sealed and cleaned as well; every tombstone forgotten.
    let mut later = Vec::new();
    for i in 100..112u64 {
        later.push(deliver(&store, &["carol"], T0 + i, bytes(i, 900)).await.0);
    }
    let gone = later.split_off(4);
    assert_eq!(store.delete("carol", gone.clone()).await.expect("delete"), gone.len());
    let forgotten = store.expire_tombstones(u64::MAX);
    assert_eq!(forgotten, ids.len() + gone.len(), "the tombstones are forgotten");
    while store.compact_once().await.expect("cleaner").is_some() {}
    let now = common::segment_files(dir.path());
    assert!(
        first_segments.iter().all(|s| !now.contains(s)),
        "the cleaner dropped every segment the checkpoint knew: {first_segments:?} then {now:?}"
    );
    store.close();
    drop(store);
    let store = FragmentStore::open(config).expect("opens");
    assert!(
        store.open_report().checkpoint_segment.is_some(),
        "opened from the checkpoint"
    );
    assert!(
        store.list("alice").is_empty(),
        "deleted messages came back: {:?}",
        store.list("alice")
    );
    assert_eq!(store.list("bob").iter().map(|e| e.id).collect::<Vec<_>>(), vec![kept]);
    assert_eq!(store.list("carol").iter().map(|e| e.id).collect::<Vec<_>>(), later);
    assert_eq!(
        store.read_body(store.list("bob")[0].body).await.expect("reads"),
        bytes(50, 900)
    );
    store.close();
}

/// The store writes a checkpoint by itself once enough records were
/// written since the last (here at least 40; looked at when a segment is
/// sealed), and the next start uses it and holds what reading every
/// segment gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_written_by_itself_once_enough_was_written() {
    let dir = TempDir::new("ckpt-auto");
    let config = StoreConfig {
        checkpoint_records_min: 40,
        ..common::config(dir.path(), SMALL_SEGMENT)
    };
    let store = FragmentStore::open(config.clone()).expect("opens");
    for i in 0..30u64 {
        deliver(&store, &["alice"], T0 + i, bytes(i, 500)).await;
    }
    let path = common::checkpoint_path(dir.path());
    assert!(!path.exists(), "no checkpoint before 40 records");
    for i in 30..90u64 {
        deliver(&store, &["bob"], T0 + i, bytes(i, 500)).await;
    }
    testkit::wait_for("a checkpoint written by itself", Duration::from_secs(20), || {
        let there = path.exists();
        async move { there }
    })
    .await;
    store.close();
    drop(store);
    let whole = TempDir::new("ckpt-auto-whole");
    common::copy_store(dir.path(), whole.path());
    let store = common::open(whole.path(), SMALL_SEGMENT);
    let want = state_of(&store);
    store.close();
    let store = FragmentStore::open(config).expect("opens");
    assert!(store.open_report().checkpoint_segment.is_some(), "opened from it");
    assert_same(&state_of(&store), &want, "opened from a checkpoint written by itself");
    store.close();
}

/// A store of a few messages in one segment, checkpointed, then closed
/// with more written after the checkpoint.
async fn small_store(dir: &Path) -> String {
    let store = common::open(dir, 64 << 20);
    for i in 0..6u64 {
        let to: &[&str] = if i % 2 == 0 { &["alice"] } else { &["bob", "carol"] };
        deliver(&store, to, T0 + i, bytes(i, 100)).await;
    }
    let first = store.list("alice")[0].id;
    store.delete("alice", vec![first]).await.expect("delete");
    store.checkpoint().expect("checkpoint");
    deliver(&store, &["dave"], T0 + 99, bytes(99, 100)).await;
    let want = state_of(&store);
    store.close();
    want
}

/// The checkpoint torn at every byte offset (as a kill while it was
/// written would leave it, were it not renamed only when whole), and
/// damaged at every byte: never used, and the store opens with every
/// message from its segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_or_damaged_checkpoint_is_never_used() {
    let dir = TempDir::new("ckpt-torn");
    let want = small_store(dir.path()).await;
    let path = common::checkpoint_path(dir.path());
    let good = std::fs::read(&path).expect("a checkpoint");
    let store = common::open(dir.path(), 64 << 20);
    assert_eq!(store.open_report().checkpoint_segment, Some(1), "whole, it is used");
    assert_same(&state_of(&store), &want, "from the whole checkpoint");
    store.close();
    let damaged = (0..good.len())
        .map(|cut| (format!("torn at {cut}"), good[..cut].to_vec()))
        .chain((0..good.len()).map(|at| {
            let mut d = good.clone();
            d[at] ^= 0x20;
            (format!("byte {at} flipped"), d)
        }))
        .chain([("a byte added".to_owned(), [&good[..], &[0]].concat())]);
    for (what, data) in damaged {
        std::fs::write(&path, &data).expect("damage the checkpoint");
        let store = common::open(dir.path(), 64 << 20);
        assert_eq!(
            store.open_report().checkpoint_segment,
            None,
            "a checkpoint {what} is not used"
        );
        assert_same(&state_of(&store), &want, &format!("with a checkpoint {what}"));
        store.close();
    }
}

/// A checkpoint that does not fit the segments found is not used: one
/// whose segment is shorter now, and one beside a sealed segment it did
/// not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_that_does_not_fit_the_segments_is_not_used() {
    let dir = TempDir::new("ckpt-fit");
    let want = small_store(dir.path()).await;
    let good = std::fs::read(common::checkpoint_path(dir.path())).expect("a checkpoint");

    // Its segment cut back to before where it began (a disk that lost
    // what it said was durable): every segment read instead.
    let seg = common::last_segment(dir.path());
    let data = std::fs::read(&seg).expect("segment");
    let half = TempDir::new("ckpt-fit-short");
    std::fs::write(
        half.path().join(seg.file_name().expect("name")),
        &data[..data.len() / 3],
    )
    .expect("copy");
    std::fs::write(common::checkpoint_path(half.path()), &good).expect("copy");
    let store = common::open(half.path(), 64 << 20);
    assert_eq!(
        store.open_report().checkpoint_segment,
        None,
        "not used over a shorter segment"
    );
    assert!(
        store.stats().entries < 5,
        "what the short segment holds: {:?}",
        store.stats()
    );
    store.close();

    // A segment before its own that it did not know.
    let early = dir.path().join("seg-00000000.qseg");
    std::fs::write(&early, b"").expect("an unknown segment");
    let store = common::open(dir.path(), 64 << 20);
    assert_eq!(
        store.open_report().checkpoint_segment,
        None,
        "not used beside an unknown segment"
    );
    assert_eq!(
        state_of(&store).lines().skip(1).collect::<Vec<_>>(),
        want.lines().skip(1).collect::<Vec<_>>()
    );
    store.close();
}

const CHILD_DIR: &str = "QUILL_CHECKPOINT_CHILD_DIR";

/// Run by `kill_9_while_a_checkpoint_is_written_loses_nothing` as its
/// child: delivers and deletes, printing each once it is acknowledged,
/// while another thread writes checkpoints one after another, until it
/// is killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the child process of kill_9_while_a_checkpoint_is_written_loses_nothing"]
async fn checkpoint_child() {
    let dir = std::env::var(CHILD_DIR).expect("run by its parent test");
    let store = Arc::new(
        FragmentStore::open(StoreConfig {
            checkpoint_chunk: 64,
            ..common::config(Path::new(&dir), 256 << 10)
        })
        .expect("open"),
    );
    let s = store.clone();
    std::thread::spawn(move || {
        loop {
            s.checkpoint().expect("checkpoint");
        }
    });
    let round: u64 = std::env::var("QUILL_CHECKPOINT_ROUND")
        .expect("round")
        .parse()
        .expect("a number");
    // Bounded: the parent kills it long before.
    for i in 0..200_000u64 {
        let n = round * 1_000_000 + i;
        let user = USERS[(i % 5) as usize];
        let (id, _) = deliver(&store, &[user], T0 + n, bytes(n, 300)).await;
        println!("D {user} {} {n}", id.to_hex());
        if i % 3 == 2 {
            let gone = store.list(user)[0].id;
            println!("T {user} {}", gone.to_hex());
            store.delete(user, vec![gone]).await.expect("delete");
            println!("X {user} {}", gone.to_hex());
        }
    }
}

/// kill -9 of a process writing checkpoints while it delivers and
/// deletes, three times over the same store: every acknowledged delivery
/// is there and every acknowledged deletion is gone, the store opened
/// from its checkpoint holds what reading every segment gives, and at
/// least one kill found a checkpoint half written.
#[test]
fn kill_9_while_a_checkpoint_is_written_loses_nothing() {
    let dir = TempDir::new("ckpt-kill");
    let mut delivered: Vec<(String, String, u64)> = Vec::new();
    let mut deleted: Vec<(String, String)> = Vec::new();
    // Deletions begun: acknowledged or not when the kill came.
    let mut begun: Vec<(String, String)> = Vec::new();
    let mut half_written = 0;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for round in 0..3u64 {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "checkpoint_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR, dir.path())
            .env("QUILL_CHECKPOINT_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the child starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let want = 1500 + 400 * round as usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut acked = 0;
        while acked < want {
            assert!(
                Instant::now() < deadline,
                "round {round}: {acked} of {want} acknowledged in time"
            );
            let line = lines.next().expect("the child goes on").expect("a line");
            let f: Vec<&str> = line.split(' ').collect();
            match f[..] {
                ["D", user, id, n] => delivered.push((user.into(), id.into(), n.parse().expect("n"))),
                ["X", user, id] => deleted.push((user.into(), id.into())),
                ["T", user, id] => {
                    begun.push((user.into(), id.into()));
                    continue;
                }
                _ => continue,
            }
            acked += 1;
        }
        child.kill().expect("kill -9");
        child.wait().expect("reaped");
        // What it had acknowledged before the kill and printed after it.
        for line in lines.map_while(Result::ok) {
            let f: Vec<&str> = line.split(' ').collect();
            match f[..] {
                ["D", user, id, n] => delivered.push((user.into(), id.into(), n.parse().expect("n"))),
                ["X", user, id] => deleted.push((user.into(), id.into())),
                ["T", user, id] => begun.push((user.into(), id.into())),
                _ => {}
            }
        }
        let tmp = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with(".tmp"));
        half_written += usize::from(tmp);

        let store = common::open(dir.path(), 256 << 10);
        assert!(
            store.open_report().checkpoint_segment.is_some(),
            "round {round}: opened from a checkpoint"
        );
        let listed: Vec<(String, String)> = USERS
            .iter()
            .flat_map(|u| store.list(u).into_iter().map(move |e| (u.to_string(), e.id.to_hex())))
            .collect();
        for (user, id, n) in &delivered {
            let gone = deleted.iter().any(|(u, i)| u == user && i == id);
            let there = listed.iter().any(|(u, i)| u == user && i == id);
            if !gone && begun.iter().any(|(u, i)| u == user && i == id) {
                continue; // Its deletion was under way: either is right.
            }
            assert_eq!(
                there, !gone,
                "round {round}: {user}'s message {id} (delivery {n}), deleted: {gone}"
            );
        }
        let from_checkpoint = state_of(&store);
        store.close();
        drop(store);
        let whole = TempDir::new("ckpt-kill-whole");
        common::copy_store(dir.path(), whole.path());
        let store = common::open(whole.path(), 256 << 10);
        assert_eq!(
            state_of(&store),
            from_checkpoint,
            "round {round}: as read from every segment"
        );
        // Every acknowledged delivery reads back.
        rt.block_on(async {
            for (user, id, n) in delivered
                .iter()
                .filter(|(u, i, _)| !begun.iter().any(|d| &d.0 == u && &d.1 == i))
            {
                let e = store
                    .list(user)
                    .into_iter()
                    .find(|e| &e.id.to_hex() == id)
                    .expect("listed");
                let body = store.read_body(e.body).await.expect("reads back");
                assert_eq!(body, bytes(*n, 300), "round {round}: delivery {n}");
            }
        });
        store.close();
    }
    assert!(half_written > 0, "at least one kill found a checkpoint half written");
}
