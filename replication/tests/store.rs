//! Scenario tests of the fragment store: torn tails, group commit,
//! multi-recipient bodies, compaction, idempotent deletes and on-disk
//! corruption.

mod common;

use std::path::Path;
use std::sync::Arc;

use replication::{BodyHash, Delivery, FragmentStore, MessageId, StoreError, Tombstone};

use common::{SMALL_SEGMENT, TempDir, bytes, deliver, open, reopen, state_of};

const DEFAULT_SEGMENT: u64 = 64 << 20;
const T0: u64 = 1_700_000_000_000;

/// Record format constants, from `src/record.rs` (the on-disk format).
const MAGIC: u32 = 0x5155_494c;
const HEADER_BYTES: usize = 40;
/// A body record is a header, the kind byte, the body hash and the body.
fn body_record_len(body_len: usize) -> usize {
    HEADER_BYTES + 1 + 32 + body_len
}

/// One message as a test expects to find it.
#[derive(Debug, Clone)]
struct Msg {
    users: Vec<&'static str>,
    id: MessageId,
    body: Vec<u8>,
}

impl Msg {
    fn hash(&self) -> BodyHash {
        BodyHash::of(&self.body)
    }
}

async fn deliver_msg(store: &FragmentStore, users: &[&'static str], arrival_ms: u64, body: Vec<u8>) -> Msg {
    let (id, _) = deliver(store, users, arrival_ms, body.clone()).await;
    Msg {
        users: users.to_vec(),
        id,
        body,
    }
}

/// Asserts that every message of `msgs` is listed for each of its users and
/// reads back byte for byte.
async fn assert_present(store: &FragmentStore, msgs: &[Msg], when: &str) {
    for m in msgs {
        for user in &m.users {
            let listed = store.list(user);
            let entry = listed.iter().find(|e| e.id == m.id);
            assert!(entry.is_some(), "{when}: message {} should be listed for {user}", m.id);
            let entry = entry.expect("checked");
            assert_eq!(
                entry.body,
                m.hash(),
                "{when}: entry {} should name its body's hash",
                m.id
            );
            assert_eq!(
                entry.size_bytes,
                m.body.len() as u64,
                "{when}: entry {} should carry its body's size",
                m.id
            );
        }
        let got = store.read_body(m.hash()).await;
        assert!(
            matches!(&got, Ok(b) if *b == m.body),
            "{when}: body of {} should read back as the {} delivered bytes, got {:?}",
            m.id,
            m.body.len(),
            got.map(|b| b.len())
        );
    }
}

/// Asserts that no user lists any message of `msgs`.
fn assert_absent(store: &FragmentStore, msgs: &[Msg], users: &[&str], when: &str) {
    for m in msgs {
        for user in users {
            assert!(
                !store.list(user).iter().any(|e| e.id == m.id),
                "{when}: message {} should not be listed for {user}",
                m.id
            );
        }
    }
}

/// Removes the summaries of sealed segments (`seg-N.qidx`) and the
/// checkpoint of the index: the store then reads every segment whole when
/// it opens.
fn remove_summaries(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("store dir").filter_map(|e| e.ok()) {
        if e.file_name().to_string_lossy().ends_with(".qidx") {
            std::fs::remove_file(e.path()).expect("remove summary");
        }
    }
    common::remove_checkpoint(dir);
}

fn flip_byte(path: &Path, at: usize) {
    let mut data = std::fs::read(path).expect("read segment");
    data[at] ^= 0x5a;
    std::fs::write(path, data).expect("write segment");
}

// ---------------------------------------------------------------------------
// 2. Torn tail
// ---------------------------------------------------------------------------

/// What a damage to the tail of the last segment should leave visible.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// The victim's records were cut: it must be wholly absent.
    VictimGone,
    /// Only bytes after the victim were damaged: it must be intact.
    VictimKept,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_cut_and_the_store_recovers() {
    let base = TempDir::new("torn-base");
    let users = ["alice", "bob"];
    let store = open(base.path(), DEFAULT_SEGMENT);
    let mut good = Vec::new();
    for (i, size) in [0usize, 1, 700, 2500, 40].into_iter().enumerate() {
        let to: &[&'static str] = if i % 2 == 0 { &["alice", "bob"] } else { &["bob"] };
        good.push(deliver_msg(&store, to, T0 + i as u64, bytes(i as u64, size)).await);
    }
    store.close();
    drop(store);
    let seg = common::last_segment(base.path());
    let good_len = std::fs::metadata(&seg).expect("segment").len() as usize;

    // The victim: the last delivery, one user, so that its records are one
    // body record then one entry record.
    let store = open(base.path(), DEFAULT_SEGMENT);
    let victim = deliver_msg(&store, &["alice"], T0 + 100, bytes(100, 1500)).await;
    store.close();
    drop(store);
    assert_eq!(
        common::segment_files(base.path()).len(),
        1,
        "a default-sized store should still have one segment"
    );
    let pristine = std::fs::read(&seg).expect("segment");
    let body_rec = body_record_len(victim.body.len());
    let entry_rec = pristine.len() - good_len - body_rec;
    assert!(
        entry_rec > HEADER_BYTES,
        "the victim's entry record should follow its body record"
    );

    let mut damages: Vec<(String, Vec<u8>, Expect)> = Vec::new();
    let cuts = [
        1,
        HEADER_BYTES - 1,
        HEADER_BYTES,
        HEADER_BYTES + 1,
        body_rec / 2,
        body_rec - 1,
        body_rec,
        body_rec + 1,
        body_rec + HEADER_BYTES,
        body_rec + entry_rec / 2,
        body_rec + entry_rec - 1,
    ];
    for cut in cuts {
        damages.push((
            format!("truncated {cut} bytes into the victim"),
            pristine[..good_len + cut].to_vec(),
            Expect::VictimGone,
        ));
    }
    let mut garbage = pristine.clone();
    garbage.extend_from_slice(&bytes(7, 100));
    damages.push(("100 random bytes appended".into(), garbage, Expect::VictimKept));

    // A header that looks valid (magic, plausible length) but whose checksum
    // does not match its payload.
    let payload = bytes(8, 200);
    let mut wrong_sum = pristine.clone();
    wrong_sum.extend_from_slice(&MAGIC.to_le_bytes());
    wrong_sum.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    wrong_sum.extend_from_slice(&[0xab; 32]);
    wrong_sum.extend_from_slice(&payload);
    damages.push((
        "a header with a wrong checksum appended".into(),
        wrong_sum.clone(),
        Expect::VictimKept,
    ));
    let half = wrong_sum.len() - payload.len() / 2;
    damages.push((
        "a header whose payload is cut short appended".into(),
        wrong_sum[..half].to_vec(),
        Expect::VictimKept,
    ));
    // The victim's own entry record, checksum corrupted.
    let mut bad_entry = pristine.clone();
    bad_entry[good_len + body_rec + 20] ^= 1;
    damages.push((
        "the victim's entry checksum corrupted".into(),
        bad_entry,
        Expect::VictimGone,
    ));

    for (i, (what, data, expect)) in damages.into_iter().enumerate() {
        let dir = TempDir::new(&format!("torn-{i}"));
        std::fs::write(dir.path().join(seg.file_name().expect("name")), &data).expect("write damaged segment");
        let store = open(dir.path(), DEFAULT_SEGMENT);
        let when = format!("after reopening with {what}");
        assert_present(&store, &good, &when).await;
        match expect {
            Expect::VictimGone => {
                assert_absent(&store, std::slice::from_ref(&victim), &users, &when);
                let got = store.read_body(victim.hash()).await;
                assert!(
                    matches!(got, Err(StoreError::NoSuchBody)),
                    "{when}: the victim's body should be Err(NoSuchBody), got {:?}",
                    got.map(|b| b.len())
                );
            }
            Expect::VictimKept => assert_present(&store, std::slice::from_ref(&victim), &when).await,
        }
        let kept: Vec<Msg> = match expect {
            Expect::VictimGone => good.clone(),
            Expect::VictimKept => good.iter().cloned().chain([victim.clone()]).collect(),
        };
        let s = store.stats();
        let want_entries: usize = kept.iter().map(|m| m.users.len()).sum();
        assert_eq!(
            s.entries, want_entries as u64,
            "{when}: stats().entries should count the intact entries"
        );
        let distinct: std::collections::BTreeSet<BodyHash> = kept.iter().map(|m| m.hash()).collect();
        assert_eq!(
            s.bodies,
            distinct.len() as u64,
            "{when}: stats().bodies should count the intact bodies"
        );
        let len = std::fs::metadata(dir.path().join(seg.file_name().expect("name")))
            .expect("segment")
            .len() as usize;
        match expect {
            Expect::VictimGone => assert!(
                len >= good_len && len <= data.len(),
                "{when}: the file should be cut back to a record boundary at or after {good_len}, is {len}"
            ),
            Expect::VictimKept => assert_eq!(
                len,
                pristine.len(),
                "{when}: the garbage should be cut off, leaving the intact records"
            ),
        }

        // The store takes new deliveries after recovery, and they survive.
        let fresh = deliver_msg(&store, &["alice", "bob"], T0 + 200, bytes(200 + i as u64, 900)).await;
        let store = reopen(store, dir.path(), DEFAULT_SEGMENT);
        let when = format!("after a second reopen following {what}");
        assert_present(&store, &kept, &when).await;
        assert_present(&store, std::slice::from_ref(&fresh), &when).await;
        if expect == Expect::VictimGone {
            assert_absent(&store, std::slice::from_ref(&victim), &users, &when);
        }
        assert_eq!(
            store.stats().entries,
            want_entries as u64 + 2,
            "{when}: the intact entries and the 2 new ones should be there"
        );
        store.close();
    }
}

/// A delivery to several users is one body record and one entry record per
/// user, followed by the batch's commit record. A torn write that keeps the
/// first entry record and loses the rest must leave the delivery invisible
/// to every recipient, since its `deliver()` never resolved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_multi_recipient_delivery_is_all_or_nothing() {
    let dir = TempDir::new("torn-multi");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let good = deliver_msg(&store, &["alice"], T0, bytes(1, 300)).await;
    store.close();
    drop(store);
    let seg = common::last_segment(dir.path());
    let good_len = std::fs::metadata(&seg).expect("segment").len() as usize;
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let victim = deliver_msg(&store, &["alice", "bob", "carol"], T0 + 1, bytes(2, 500)).await;
    store.close();
    drop(store);
    let data = std::fs::read(&seg).expect("segment");
    let entries = data.len() - good_len - body_record_len(victim.body.len());
    // Three entry records of (nearly) equal length: cut inside the second.
    let cut = good_len + body_record_len(victim.body.len()) + entries / 3 + entries / 6;
    std::fs::write(&seg, &data[..cut]).expect("truncate");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    assert_present(&store, std::slice::from_ref(&good), "after the torn delivery").await;
    let seen: Vec<&str> = ["alice", "bob", "carol"]
        .into_iter()
        .filter(|u| store.list(u).iter().any(|e| e.id == victim.id))
        .collect();
    assert!(
        seen.is_empty() || seen.len() == 3,
        "a delivery whose deliver() never resolved should be visible to all its recipients or to none, \
         but after the torn write it is visible to {seen:?} only"
    );
    store.close();
}

// ---------------------------------------------------------------------------
// 3. Group commit
// ---------------------------------------------------------------------------

/// The writer keeps zeros written ahead of the active segment's end (so
/// that a batch's sync need not grow the file). A store stopped without
/// closing (kill -9) has them at the end of its last segment; a sealed
/// segment may have them too. Opening cuts them off quietly, loses nothing
/// and serves on; a clean close leaves none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeros_ahead_of_the_end_are_room_not_damage() {
    let dir = TempDir::new("zeros-ahead");
    let segment = 64 << 10;
    let store = open(dir.path(), segment);
    let mut msgs = Vec::new();
    for i in 0..40u64 {
        msgs.push(deliver_msg(&store, &["alice"], T0 + i, bytes(i, 3000)).await);
    }
    let disk = store.stats().disk_bytes;
    let files: u64 = common::segment_files(dir.path())
        .iter()
        .map(|(_, p)| std::fs::metadata(p).expect("segment").len())
        .sum();
    assert!(
        files > disk,
        "the open store should hold zeros ahead of its records ({files} bytes of files, {disk} of records)"
    );
    // As a kill -9 leaves it: the files copied while the store is open,
    // and a sealed segment given zeros it did not have.
    let crashed = TempDir::new("zeros-ahead-crash");
    common::copy_store(dir.path(), crashed.path());
    let (_, first) = common::segment_files(crashed.path()).remove(0);
    let sealed_len = std::fs::metadata(&first).expect("sealed").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&first)
        .and_then(|f| f.set_len(sealed_len + 8192))
        .expect("zeros after the sealed segment");
    store.close();
    drop(store);

    let store = open(crashed.path(), segment);
    assert_present(&store, &msgs, "after a crash with zeros ahead").await;
    assert_eq!(store.stats().disk_bytes, disk, "the same records after the crash");
    assert_eq!(
        std::fs::metadata(&first).expect("sealed").len(),
        sealed_len,
        "the zeros after the sealed segment are cut off"
    );
    let more = deliver_msg(&store, &["bob"], T0 + 100, bytes(100, 5000)).await;
    let store = reopen(store, crashed.path(), segment);
    assert_present(&store, &msgs, "after a second start").await;
    assert_present(&store, std::slice::from_ref(&more), "after a second start").await;
    let disk = store.stats().disk_bytes;
    store.close();
    let files: u64 = common::segment_files(crashed.path())
        .iter()
        .map(|(_, p)| std::fs::metadata(p).expect("segment").len())
        .sum();
    assert_eq!(files, disk, "a closed store's files hold its records and nothing else");
}

fn summaries(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .expect("store dir")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".qidx"))
        .collect();
    v.sort();
    v
}

/// Sealed segments get a summary (`seg-N.qidx`: their records without the
/// bodies) once sealed, and opening a store from the summaries gives
/// exactly what reading every segment whole gives: the same entries,
/// tombstones, bodies and counts. A summary that is torn or damaged is
/// not used (the segment is read whole, and the summary made again); one
/// whose segment is gone is removed. With a summary a damaged body is
/// not found at start but when it is read: it is never served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn summaries_open_a_store_as_reading_it_whole_does() {
    let dir = TempDir::new("summaries");
    let users = ["alice", "bob", "carol"];
    let store = open(dir.path(), SMALL_SEGMENT);
    let mut msgs = Vec::new();
    for i in 0..40u64 {
        let to: &[&'static str] = match i % 3 {
            0 => &["alice"],
            1 => &["alice", "bob"],
            _ => &["carol"],
        };
        msgs.push(deliver_msg(&store, to, T0 + i, bytes(i, 200 + (i as usize * 131) % 1800)).await);
    }
    for m in msgs.iter().step_by(4) {
        let tomb = Tombstone {
            id: m.id,
            hlc: 1 << 40,
            replicas: vec![],
        };
        store.apply_tombstones(m.users[0], vec![tomb]).await.expect("tombstone");
    }
    let segs = common::segment_files(dir.path());
    assert!(segs.len() >= 8, "40 messages fill many 4 KiB segments: {}", segs.len());
    store.close();
    drop(store);
    // Every sealed segment (all but the last) gets its summary, off the writer.
    let want_summaries = segs.len() - 1;
    testkit::wait_for(
        "a summary for every sealed segment",
        std::time::Duration::from_secs(20),
        || {
            let n = summaries(dir.path()).len();
            async move { n == want_summaries }
        },
    )
    .await;

    let whole = TempDir::new("summaries-whole");
    common::copy_store(dir.path(), whole.path());
    remove_summaries(whole.path());
    let store = open(whole.path(), SMALL_SEGMENT);
    let want = state_of(&store, &users);
    assert_eq!(
        summaries(whole.path()).len(),
        segs.len() - 1,
        "a start that reads sealed segments whole writes their summaries"
    );
    store.close();

    let store = open(dir.path(), SMALL_SEGMENT);
    assert_eq!(state_of(&store, &users), want, "opened from summaries");
    store.close();
    drop(store);

    // Torn and damaged summaries are not used.
    let victim = summaries(dir.path())[1].clone();
    let good = std::fs::read(&victim).expect("summary");
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 1;
    let damages: Vec<(String, Vec<u8>)> = [0, 1, 4, 16, good.len() / 2, good.len() - 1]
        .into_iter()
        .map(|cut| (format!("torn at {cut}"), good[..cut].to_vec()))
        .chain([("a byte flipped".to_owned(), flipped)])
        .collect();
    for (what, data) in damages {
        std::fs::write(&victim, &data).expect("damage the summary");
        // Every segment read, from its summary or whole.
        common::remove_checkpoint(dir.path());
        let store = open(dir.path(), SMALL_SEGMENT);
        assert_eq!(state_of(&store, &users), want, "with a summary {what}");
        store.close();
        assert_eq!(
            std::fs::read(&victim).expect("summary"),
            good,
            "the summary made again after {what}"
        );
    }

    // Orphans go.
    let orphan = dir.path().join("seg-99999999.qidx");
    let half = dir.path().join("seg-00000002.qidx.tmp");
    std::fs::write(&orphan, b"QIDX").expect("orphan");
    std::fs::write(&half, b"QI").expect("half written");
    let store = open(dir.path(), SMALL_SEGMENT);
    assert!(!orphan.exists() && !half.exists(), "orphan summaries are removed");
    store.close();
    drop(store);

    // A body damaged under a summary: listed, never served.
    let (_, first) = &segs[0];
    let data = std::fs::read(first).expect("segment");
    let m = msgs
        .iter()
        .enumerate()
        .find(|(i, m)| i % 4 != 0 && common::find(&data, &m.body).is_some())
        .expect("a live body in the first segment")
        .1
        .clone();
    flip_byte(first, common::find(&data, &m.body).expect("found") + 50);
    common::remove_checkpoint(dir.path());
    let store = open(dir.path(), SMALL_SEGMENT);
    let got = store.read_body(m.hash()).await;
    assert!(
        matches!(got, Err(StoreError::Corrupt(_))),
        "a damaged body is not served, got {:?}",
        got.map(|b| b.len())
    );
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_deliveries_share_fsyncs() {
    let dir = TempDir::new("group");
    let store = Arc::new(open(dir.path(), DEFAULT_SEGMENT));
    let tasks: Vec<_> = (0..200u64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let user = ["alice", "bob", "carol"][i as usize % 3];
                let body = bytes(i, 100 + (i as usize * 37) % 2000);
                let id = store.new_message_id(T0 + i);
                let r = store
                    .deliver(Delivery {
                        id,
                        arrival_ms: T0 + i,
                        users: vec![user.to_string()],
                        folder: "INBOX".into(),
                        body: body.clone(),
                        replicas: vec![],
                    })
                    .await;
                (
                    r,
                    Msg {
                        users: vec![user],
                        id,
                        body,
                    },
                )
            })
        })
        .collect();
    let mut msgs = Vec::new();
    for t in tasks {
        let (r, m) = t.await.expect("delivery task should not panic");
        assert!(r.is_ok(), "every concurrent delivery should resolve Ok, got {r:?}");
        msgs.push(m);
    }
    let s = store.stats();
    assert_eq!(s.ops, 200, "stats().ops should count the 200 deliveries; {s:?}");
    assert_eq!(s.entries, 200, "stats().entries should be 200; {s:?}");
    assert!(
        s.fsyncs < s.ops,
        "group commit should make fsyncs ({}) fewer than ops ({})",
        s.fsyncs,
        s.ops
    );
    assert_present(&store, &msgs, "after 200 concurrent deliveries").await;
    let store = Arc::into_inner(store).expect("all tasks are done");
    let store = reopen(store, dir.path(), DEFAULT_SEGMENT);
    assert_present(&store, &msgs, "after reopening").await;
    assert_eq!(store.stats().entries, 200, "all 200 entries should survive a reopen");
    store.close();
}

// ---------------------------------------------------------------------------
// 4. Multi-recipient
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_body_for_many_recipients() {
    let dir = TempDir::new("multi");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let m = deliver_msg(&store, &["alice", "bob", "carol"], T0, bytes(1, 1234)).await;
    let s = store.stats();
    assert_eq!(s.bodies, 1, "a 3-recipient delivery should store one body; {s:?}");
    assert_eq!(s.entries, 3, "a 3-recipient delivery should make 3 entries; {s:?}");
    assert_eq!(s.body_bytes, 1234, "body_bytes should count the body once; {s:?}");
    for u in ["alice", "bob", "carol"] {
        assert_eq!(
            store.usage_bytes(u),
            1234,
            "each recipient's usage should be the body size"
        );
    }
    assert_present(&store, std::slice::from_ref(&m), "after delivery").await;

    for (n, u) in ["alice", "bob"].into_iter().enumerate() {
        let got = store.delete(u, vec![m.id]).await.expect("delete should succeed");
        assert_eq!(got, 1, "deleting {u}'s copy should delete 1 entry");
        let s = store.stats();
        assert_eq!(s.bodies, 1, "the body should stay while carol still holds it; {s:?}");
        assert_eq!(
            s.body_bytes, 1234,
            "the body's bytes should stay while referenced; {s:?}"
        );
        assert_eq!(s.entries, 2 - n as u64, "one entry fewer per delete; {s:?}");
        assert_eq!(
            store.usage_bytes(u),
            0,
            "{u}'s usage should be 0 after deleting its only message"
        );
    }
    let carol = Msg {
        users: vec!["carol"],
        ..m.clone()
    };
    assert_present(&store, std::slice::from_ref(&carol), "after deleting for alice and bob").await;
    let store = reopen(store, dir.path(), DEFAULT_SEGMENT);
    assert_present(&store, std::slice::from_ref(&carol), "after reopening").await;
    assert_eq!(store.stats().bodies, 1, "the body should still be held after reopening");

    assert_eq!(
        store.delete("carol", vec![m.id]).await.expect("delete"),
        1,
        "carol's delete should delete 1"
    );
    let s = store.stats();
    assert_eq!(
        (s.bodies, s.body_bytes, s.entries),
        (0, 0, 0),
        "the last delete should free the body; {s:?}"
    );
    let got = store.read_body(m.hash()).await;
    assert!(
        matches!(got, Err(StoreError::NoSuchBody)),
        "a freed body should read as Err(NoSuchBody), got {:?}",
        got.map(|b| b.len())
    );
    let store = reopen(store, dir.path(), DEFAULT_SEGMENT);
    let s = store.stats();
    assert_eq!(
        (s.bodies, s.body_bytes, s.entries),
        (0, 0, 0),
        "the freed body should stay freed after reopening; {s:?}"
    );
    store.close();
}

// ---------------------------------------------------------------------------
// 5. Compaction
// ---------------------------------------------------------------------------

async fn compact_fully(store: &FragmentStore) -> u64 {
    let mut rounds = 0;
    while let Some(report) = store.compact_once().await.expect("compact_once should not fail") {
        rounds += 1;
        assert!(
            rounds < 1000,
            "compact_once should reach None in fewer than 1000 rounds; last {report:?}"
        );
    }
    rounds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_reclaims_space_and_never_resurrects() {
    const SEG: u64 = 64 << 10;
    let dir = TempDir::new("compact");
    let store = open(dir.path(), SEG);
    let users = ["alice", "bob", "carol"];
    let mut live = Vec::new();
    let mut dead = Vec::new();
    let mut pending: Vec<Msg> = Vec::new();
    // 300 messages of 1 KiB. Nine in ten are deleted, ten messages after
    // their delivery, so that tombstones are spread over the segments and
    // later segments hold tombstones of entries in earlier ones.
    for i in 0..300u64 {
        let user = users[i as usize % 3];
        pending.push(deliver_msg(&store, &[user], T0 + i, bytes(i, 1024)).await);
        if pending.len() > 10 {
            let m = pending.remove(0);
            if i % 10 == 0 {
                live.push(m);
            } else {
                assert_eq!(
                    store.delete(m.users[0], vec![m.id]).await.expect("delete"),
                    1,
                    "delete should find it"
                );
                dead.push(m);
            }
        }
    }
    // The last ten: keep one.
    for (n, m) in std::mem::take(&mut pending).into_iter().enumerate() {
        if n == 0 {
            live.push(m);
        } else {
            assert_eq!(
                store.delete(m.users[0], vec![m.id]).await.expect("delete"),
                1,
                "delete should find it"
            );
            dead.push(m);
        }
    }
    assert!(dead.len() >= 260, "about 90 % should be deleted, {} were", dead.len());
    let before = store.stats();
    assert!(
        before.segments >= 4,
        "300 KiB in 64 KiB segments should make several segments; {before:?}"
    );

    let rounds = compact_fully(&store).await;
    let after = store.stats();
    assert!(rounds > 0, "compaction should have cleaned at least one segment");
    assert!(
        after.disk_bytes * 2 < before.disk_bytes,
        "compaction should at least halve disk_bytes: before {before:?}, after {after:?}"
    );
    assert_eq!(
        common::segment_files(dir.path()).len() as u64,
        after.segments,
        "the dropped segments' files should be gone"
    );
    assert_eq!(
        after.entries,
        live.len() as u64,
        "compaction should keep every live entry; {after:?}"
    );
    assert_present(&store, &live, "after compaction").await;
    assert_absent(&store, &dead, &users, "after compaction");

    let store = reopen(store, dir.path(), SEG);
    let reopened = store.stats();
    assert_eq!(
        (reopened.entries, reopened.bodies, reopened.disk_bytes),
        (after.entries, after.bodies, after.disk_bytes),
        "reopening after compaction should show the same state"
    );
    assert_present(&store, &live, "after compaction and reopen").await;
    assert_absent(&store, &dead, &users, "after compaction and reopen");

    // More traffic on top, then compact again: the segments that held the
    // tombstones are now the oldest and get dropped as well.
    let mut more = Vec::new();
    for i in 0..120u64 {
        let m = deliver_msg(&store, &[users[i as usize % 3]], T0 + 1000 + i, bytes(1000 + i, 1024)).await;
        if i % 4 == 0 {
            more.push(m);
        } else {
            assert_eq!(
                store.delete(m.users[0], vec![m.id]).await.expect("delete"),
                1,
                "delete should find it"
            );
            dead.push(m);
        }
    }
    compact_fully(&store).await;
    live.extend(more);
    let store = reopen(store, dir.path(), SEG);
    assert_eq!(
        store.stats().entries,
        live.len() as u64,
        "only the live entries should come back"
    );
    assert_present(&store, &live, "after the second compaction and reopen").await;
    assert_absent(&store, &dead, &users, "after the second compaction and reopen");
    for m in &dead {
        if live.iter().all(|l| l.hash() != m.hash()) {
            let got = store.read_body(m.hash()).await;
            assert!(
                matches!(got, Err(StoreError::NoSuchBody)),
                "a deleted message's body should be gone, got {:?}",
                got.map(|b| b.len())
            );
        }
    }
    store.close();
}

/// Bodies written hashed once (kind 8, `write_hashed_bodies`) beside
/// bodies of kind 1: every message reads back after a reopen, and a body
/// damaged on disk is found at start (its entry goes, the others stay),
/// as for kind 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_hashed_once_read_back_and_damage_is_found() {
    let dir = TempDir::new("hashed-once");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let mut msgs = vec![deliver_msg(&store, &["alice"], T0, bytes(1, 900)).await];
    store.write_hashed_bodies(true);
    for i in 2..6u64 {
        msgs.push(deliver_msg(&store, &["alice", "bob"], T0 + i, bytes(i, 700 + i as usize * 100)).await);
    }
    let store = reopen(store, dir.path(), DEFAULT_SEGMENT);
    assert_present(&store, &msgs, "after a reopen").await;
    store.close();
    drop(store);
    let seg = common::last_segment(dir.path());
    let data = std::fs::read(&seg).expect("segment");
    let victim = msgs[3].clone();
    let at = common::find(&data, &victim.body).expect("the victim's body");
    assert_eq!(data[at - 33], 8, "written as kind 8");
    flip_byte(&seg, at + 100);
    let store = open(dir.path(), DEFAULT_SEGMENT);
    assert_absent(
        &store,
        std::slice::from_ref(&victim),
        &["alice", "bob"],
        "after its body was damaged",
    );
    let others: Vec<Msg> = msgs.iter().filter(|m| m.id != victim.id).cloned().collect();
    assert_present(&store, &others, "beside the damaged one").await;
    store.close();
}

// ---------------------------------------------------------------------------
// 6. Idempotent delete
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_is_idempotent() {
    let dir = TempDir::new("idem");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let a = deliver_msg(&store, &["alice"], T0, bytes(1, 100)).await;
    let b = deliver_msg(&store, &["bob"], T0 + 1, bytes(2, 100)).await;
    let unknown = MessageId([0x42; 16]);

    assert_eq!(
        store.delete("alice", vec![]).await.expect("delete"),
        0,
        "deleting no ids should return 0"
    );
    assert_eq!(
        store.delete("alice", vec![unknown]).await.expect("delete"),
        0,
        "deleting an unknown id should return 0"
    );
    assert_eq!(
        store.delete("nobody", vec![a.id]).await.expect("delete"),
        0,
        "deleting for an unknown user should return 0"
    );
    assert_eq!(
        store.delete("alice", vec![b.id]).await.expect("delete"),
        0,
        "deleting another user's message should return 0"
    );
    assert_present(&store, &[a.clone(), b.clone()], "after deletes that matched nothing").await;
    assert_eq!(
        store.stats().entries,
        2,
        "deletes that matched nothing should change nothing"
    );

    assert_eq!(
        store.delete("alice", vec![a.id, a.id, unknown]).await.expect("delete"),
        1,
        "deleting an id twice in one call plus an unknown one should return 1"
    );
    assert_eq!(
        store.delete("alice", vec![a.id]).await.expect("delete"),
        0,
        "deleting it again should return 0"
    );
    let store = reopen(store, dir.path(), DEFAULT_SEGMENT);
    assert_eq!(
        store.delete("alice", vec![a.id]).await.expect("delete"),
        0,
        "deleting it again after a reopen should return 0"
    );
    assert_absent(&store, std::slice::from_ref(&a), &["alice"], "after the deletes");
    assert_present(&store, std::slice::from_ref(&b), "after alice's deletes").await;
    assert_eq!(store.stats().entries, 1, "only bob's entry should remain");
    store.close();
}

/// Delivering the same `Delivery` (same id, same body) twice, as a retry
/// after a lost acknowledgement would, stores it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_of_the_same_message_is_idempotent() {
    let dir = TempDir::new("redeliver");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let id = store.new_message_id(T0);
    let d = Delivery {
        id,
        arrival_ms: T0,
        users: vec!["alice".into(), "bob".into()],
        folder: "INBOX".into(),
        body: bytes(5, 700),
        replicas: vec![],
    };
    store.deliver(d.clone()).await.expect("first delivery");
    store.deliver(d.clone()).await.expect("retried delivery");
    let check = |store: &FragmentStore, when: &str| {
        let s = store.stats();
        assert_eq!(
            (s.entries, s.bodies, s.body_bytes),
            (2, 1, 700),
            "{when}: one body, 2 entries; {s:?}"
        );
        assert_eq!(
            store.usage_bytes("alice"),
            700,
            "{when}: alice's usage should count the message once"
        );
        assert_eq!(store.list("alice").len(), 1, "{when}: alice should hold one message");
    };
    check(&store, "after a retried delivery");
    let store = reopen(store, dir.path(), DEFAULT_SEGMENT);
    check(&store, "after reopening");
    assert_eq!(
        store.delete("alice", vec![id]).await.expect("delete"),
        1,
        "one delete should remove alice's copy"
    );
    assert!(
        store.list("alice").is_empty(),
        "alice's mailbox should be empty after the delete"
    );
    store.close();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_store_refuses_writes() {
    let dir = TempDir::new("closed");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let m = deliver_msg(&store, &["alice"], T0, bytes(1, 10)).await;
    store.close();
    let id = store.new_message_id(T0 + 1);
    let got = store
        .deliver(Delivery {
            id,
            arrival_ms: T0 + 1,
            users: vec!["alice".into()],
            folder: "INBOX".into(),
            body: vec![1, 2, 3],
            replicas: vec![],
        })
        .await;
    assert!(
        matches!(got, Err(StoreError::Closed)),
        "deliver after close should be Err(Closed), got {got:?}"
    );
    let got = store.delete("alice", vec![m.id]).await;
    assert!(
        matches!(got, Err(StoreError::Closed)),
        "delete after close should be Err(Closed), got {got:?}"
    );
    assert_present(&store, std::slice::from_ref(&m), "reads after close").await;
}

// ---------------------------------------------------------------------------
// 7. Corrupt bodies on disk
// ---------------------------------------------------------------------------

/// A body corrupted on disk while the store is closed, in the active (last)
/// segment. Observed: recovery finds the record's checksum wrong and cuts
/// the segment there, as for a torn tail, so the corrupt message is gone
/// (and so is every later record of that segment, see
/// `intact_records_after_a_corrupt_one_survive_recovery`). No wrong bytes
/// are ever handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_body_in_the_active_segment_is_never_served() {
    let dir = TempDir::new("corrupt-active");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let a = deliver_msg(&store, &["alice"], T0, bytes(1, 800)).await;
    let b = deliver_msg(&store, &["alice", "bob"], T0 + 1, bytes(2, 2000)).await;
    let c = deliver_msg(&store, &["bob"], T0 + 2, bytes(3, 600)).await;
    store.close();
    drop(store);
    let seg = common::last_segment(dir.path());
    let data = std::fs::read(&seg).expect("segment");
    let at = common::find(&data, &b.body).expect("the body bytes should be in the segment");
    flip_byte(&seg, at + 1000);

    let store = open(dir.path(), DEFAULT_SEGMENT);
    assert_present(
        &store,
        std::slice::from_ref(&a),
        "after reopening with a corrupt later body",
    )
    .await;
    assert_absent(
        &store,
        std::slice::from_ref(&b),
        &["alice", "bob"],
        "after reopening with b's body corrupt",
    );
    let got = store.read_body(b.hash()).await;
    assert!(
        matches!(got, Err(StoreError::NoSuchBody)),
        "the corrupt body should have been cut on recovery (Err(NoSuchBody)), got {:?}",
        got.map(|v| v.len())
    );
    // The damaged record is skipped, not treated as a torn tail: the
    // acknowledged message after it survives.
    assert_present(&store, std::slice::from_ref(&c), "c, written after the damaged body").await;
    store.close();
}

/// One flipped byte in a body in the middle of the active segment: recovery
/// skips the damaged record and resyncs on the next valid one, so later
/// records that were intact and acknowledged (here message `c`) survive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intact_records_after_a_corrupt_one_survive_recovery() {
    let dir = TempDir::new("corrupt-later");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let b = deliver_msg(&store, &["alice"], T0, bytes(2, 2000)).await;
    let c = deliver_msg(&store, &["bob"], T0 + 1, bytes(3, 600)).await;
    store.close();
    drop(store);
    let seg = common::last_segment(dir.path());
    let at = common::find(&std::fs::read(&seg).expect("segment"), &b.body).expect("b's body is in the segment");
    flip_byte(&seg, at + 1000);
    let store = open(dir.path(), DEFAULT_SEGMENT);
    assert_present(
        &store,
        std::slice::from_ref(&c),
        "message c, intact on disk after the corrupt body of b",
    )
    .await;
    store.close();
}

/// A body corrupted in a sealed segment. Observed: recovery logs the bad
/// record and ignores the rest of that segment; the message is not listed
/// and its body is not served. Later segments are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_body_in_a_sealed_segment_is_never_served() {
    let dir = TempDir::new("corrupt-sealed");
    let store = open(dir.path(), SMALL_SEGMENT);
    let mut msgs = Vec::new();
    for i in 0..12u64 {
        msgs.push(deliver_msg(&store, &["alice"], T0 + i, bytes(i, 1500)).await);
    }
    store.close();
    drop(store);
    let segs = common::segment_files(dir.path());
    assert!(
        segs.len() >= 3,
        "12 bodies of 1500 bytes should fill several 4 KiB segments"
    );
    let (victim_seg, path) = &segs[0];
    let data = std::fs::read(path).expect("segment");
    let victim = msgs
        .iter()
        .find(|m| common::find(&data, &m.body).is_some())
        .expect("the first segment should hold a body")
        .clone();
    let at = common::find(&data, &victim.body).expect("found");
    flip_byte(path, at + 10);
    // Read whole, as a segment without a summary is (with one, the damage
    // is found when the body is read: see
    // `summaries_open_a_store_as_reading_it_whole_does`).
    remove_summaries(dir.path());

    let store = open(dir.path(), SMALL_SEGMENT);
    let listed = store.list("alice");
    assert!(
        !listed.iter().any(|e| e.id == victim.id),
        "the message with the corrupt body (segment {victim_seg}) should not be listed"
    );
    let got = store.read_body(victim.hash()).await;
    assert!(
        matches!(got, Err(StoreError::NoSuchBody) | Err(StoreError::Corrupt(_))),
        "the corrupt body should not be served, got {:?}",
        got.map(|v| v.len())
    );
    // Every listed message reads back exactly; the ones from later segments
    // are all listed.
    for e in &listed {
        let m = msgs.iter().find(|m| m.id == e.id).expect("listed ids were delivered");
        assert_present(&store, std::slice::from_ref(m), "a listed message after recovery").await;
    }
    let later: Vec<Msg> = msgs
        .iter()
        .filter(|m| {
            segs[1..]
                .iter()
                .any(|(_, p)| common::find(&std::fs::read(p).expect("segment"), &m.body).is_some())
        })
        .cloned()
        .collect();
    assert!(!later.is_empty(), "later segments should hold messages");
    assert_present(&store, &later, "messages in later segments").await;
    store.close();
}

/// A body corrupted on disk while the store is open: `read_body` checks the
/// hash and answers `Err(Corrupt)` instead of wrong bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_corrupted_under_an_open_store_reads_as_corrupt() {
    let dir = TempDir::new("corrupt-open");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let a = deliver_msg(&store, &["alice"], T0, bytes(1, 1000)).await;
    let b = deliver_msg(&store, &["alice"], T0 + 1, bytes(2, 1000)).await;
    let seg = common::last_segment(dir.path());
    let data = std::fs::read(&seg).expect("segment");
    let at = common::find(&data, &a.body).expect("body a should be in the segment");
    // Overwrite in place (same inode) so the open store sees the change.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .expect("open segment");
        f.write_all_at(&[data[at + 500] ^ 0xff], (at + 500) as u64)
            .expect("flip");
        f.sync_all().expect("sync");
    }
    let got = store.read_body(a.hash()).await;
    assert!(
        matches!(got, Err(StoreError::Corrupt(h)) if h == a.hash()),
        "a body corrupted on disk should read as Err(Corrupt(its hash)), got {:?}",
        got.map(|v| v.len())
    );
    assert_present(&store, std::slice::from_ref(&b), "the other body").await;
    store.close();
}

/// A body that went bad under an open store in the oldest segment must not
/// stop the cleaner for good: the messages using it are removed (logged)
/// and the segment is still cleaned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_is_not_blocked_forever_by_one_corrupt_body() {
    let dir = TempDir::new("corrupt-compact");
    let store = open(dir.path(), SMALL_SEGMENT);
    let mut msgs = Vec::new();
    for i in 0..12u64 {
        msgs.push(deliver_msg(&store, &["alice"], T0 + i, bytes(i, 1500)).await);
    }
    let (_, oldest) = common::segment_files(dir.path()).remove(0);
    let data = std::fs::read(&oldest).expect("segment");
    let at = common::find(&data, &msgs[0].body).expect("the first body is in the oldest segment");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&oldest)
            .expect("open segment");
        f.write_all_at(&[data[at + 3] ^ 1], (at + 3) as u64).expect("flip");
    }
    let ids = msgs[1..].iter().map(|m| m.id).collect();
    assert_eq!(
        store.delete("alice", ids).await.expect("delete"),
        11,
        "11 messages should be deleted"
    );
    let before = store.stats();
    let mut results = Vec::new();
    for _ in 0..10 {
        let r = store.compact_once().await;
        let done = matches!(r, Ok(None));
        results.push(format!("{r:?}"));
        if done {
            break;
        }
    }
    let after = store.stats();
    assert!(
        after.disk_bytes * 2 < before.disk_bytes,
        "with 11 of 12 messages deleted, compaction should reclaim space despite one corrupt body; \
         compact_once returned {results:?}; before {before:?}, after {after:?}"
    );
    store.close();
}

// ---------------------------------------------------------------------------
// Concurrency within one write batch
// ---------------------------------------------------------------------------

/// A delete that drops the last reference to a body and a delivery of the
/// same body, committed in the same writer batch (delete first). The
/// delivery is planned while the body is still live, so it writes no body
/// record; the batch must still apply cleanly (deletions are applied last)
/// and the writer must keep working. (This once panicked the writer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_of_last_reference_and_redelivery_in_one_batch() {
    let dir = TempDir::new("batch-race");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    for round in 0..20u64 {
        let body = bytes(round, 1000);
        let first = deliver_msg(&store, &["alice"], T0 + 3 * round, body.clone()).await;
        // A large delivery first keeps the writer busy while the delete and
        // the redelivery queue up behind it, so they share the next batch.
        let big_id = store.new_message_id(T0 + 3 * round + 1);
        let again_id = store.new_message_id(T0 + 3 * round + 2);
        let (big, del, again) = tokio::join!(
            store.deliver(Delivery {
                id: big_id,
                arrival_ms: T0 + 3 * round + 1,
                users: vec!["carol".into()],
                folder: "INBOX".into(),
                body: bytes(10_000 + round, 4 << 20),
                replicas: vec![],
            }),
            store.delete("alice", vec![first.id]),
            store.deliver(Delivery {
                id: again_id,
                arrival_ms: T0 + 3 * round + 2,
                users: vec!["bob".into()],
                folder: "INBOX".into(),
                body: body.clone(),
                replicas: vec![],
            }),
        );
        assert!(
            big.is_ok(),
            "round {round}: the large delivery should succeed, got {big:?}"
        );
        assert!(
            matches!(del, Ok(1)),
            "round {round}: the delete of alice's copy should return Ok(1), got {del:?}"
        );
        assert!(
            again.is_ok(),
            "round {round}: redelivering the same body to bob should succeed, got {again:?}"
        );
        let bob = Msg {
            users: vec!["bob"],
            id: again_id,
            body,
        };
        assert_present(&store, std::slice::from_ref(&bob), &format!("round {round}")).await;
        assert_eq!(
            store.delete("carol", vec![big_id]).await.expect("delete"),
            1,
            "round {round}: deleting the large message should return 1"
        );
    }
    store.close();
}

/// A deletion is remembered: the same id delivered again (a late copy from
/// a replica) stays deleted, also after a restart and after the cleaner
/// has rewritten every segment; a tombstone for an id never seen blocks
/// it too; two stores that agree compute the same digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_outlive_restarts_and_cleaning() {
    use replication::{SyncItem, Tombstone};
    let dir = TempDir::new("tombstones");
    let mut store = open(dir.path(), SMALL_SEGMENT);
    let replicas = vec![7, 9];
    let mk = |id, seed| Delivery {
        id,
        arrival_ms: T0,
        users: vec!["alice".into()],
        folder: "INBOX".into(),
        body: bytes(seed, 900),
        replicas: replicas.clone(),
    };
    let a = store.new_message_id(T0);
    let b = store.new_message_id(T0);
    store.deliver(mk(a, 1)).await.expect("deliver a");
    assert_eq!(store.list("alice")[0].replicas, replicas, "the replica set is kept");
    assert_eq!(store.delete("alice", vec![a]).await.expect("delete"), 1);
    // b: deleted before its copy arrives.
    let tomb = Tombstone {
        id: b,
        hlc: 1 << 20,
        replicas: replicas.clone(),
    };
    assert_eq!(store.apply_tombstones("alice", vec![tomb]).await.expect("tombstone"), 0);
    for round in 0..3 {
        store.deliver(mk(a, 1)).await.expect("late copy of a");
        store.deliver(mk(b, 2)).await.expect("late copy of b");
        assert!(
            store.list("alice").is_empty(),
            "round {round}: a deleted message came back"
        );
        // Filler so the cleaner has sealed segments to rewrite.
        for i in 0..8 {
            let (id, _) = deliver(&store, &["bob"], T0 + i, bytes(100 + i, 1500)).await;
            store.delete("bob", vec![id]).await.expect("delete filler");
        }
        while store.compact_once().await.expect("compact").is_some() {}
        store = reopen(store, dir.path(), SMALL_SEGMENT);
        let items = store.sync_items("alice", Some(9));
        assert!(
            items.len() == 2 && items.iter().all(|i| matches!(i, SyncItem::Dead(_))),
            "round {round}: both tombstones kept: {items:?}"
        );
    }
    // A copy of the same state elsewhere has the same digest; a store that
    // lacks one tombstone does not.
    let dir2 = TempDir::new("tombstones2");
    let other = open(dir2.path(), DEFAULT_SEGMENT);
    for (id, hlc) in [(a, 1u64 << 30), (b, 1u64 << 31)] {
        other
            .apply_tombstones(
                "alice",
                vec![Tombstone {
                    id,
                    hlc,
                    replicas: replicas.clone(),
                }],
            )
            .await
            .expect("tombstone");
        if id == a {
            assert_ne!(
                store.digest("alice", 9),
                other.digest("alice", 9),
                "one tombstone missing"
            );
        }
    }
    assert_eq!(store.digest("alice", 9), other.digest("alice", 9));
    assert_eq!(store.digest("alice", 5), [0; 32], "node 5 shares nothing of alice");
    // Forgetting them lets the id in again (after the retention).
    assert_eq!(
        store.expire_tombstones(u64::MAX),
        2 + 3 * 8,
        "alice's two and bob's fillers"
    );
    assert_eq!(store.stats().tombstones, 0);
    store.deliver(mk(a, 1)).await.expect("deliver a again");
    assert_eq!(store.list("alice").len(), 1);
}

/// The under-replicated count (kept per replica set, not walked per entry)
/// agrees with a count over every entry after deliveries, deletions, the
/// cleaner and a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_replicated_count_matches_the_entries() {
    let dir = TempDir::new("under");
    let mut store = open(dir.path(), SMALL_SEGMENT);
    let me = 5;
    let sets: [&[u64]; 5] = [&[5], &[3, 5], &[5, 8], &[5, 8, 9], &[1, 5, 9]];
    let users = ["u1", "u2", "u3"];
    let mut ids = Vec::new();
    for i in 0..60u64 {
        let id = store.new_message_id(T0 + i);
        let user = users[i as usize % users.len()];
        store
            .deliver(Delivery {
                id,
                arrival_ms: T0 + i,
                users: vec![user.into()],
                folder: "INBOX".into(),
                body: bytes(i, 700),
                // Unsorted on purpose: the set is the same either way.
                replicas: sets[i as usize % sets.len()].iter().rev().copied().collect(),
            })
            .await
            .expect("deliver");
        ids.push((user, id));
    }
    for (user, id) in ids.iter().step_by(4) {
        store.delete(user, vec![*id]).await.expect("delete");
    }
    let downs: [&[u64]; 4] = [&[], &[8], &[1, 3], &[8, 9]];
    for round in 0..2 {
        for down in downs {
            let up = |n: u64| !down.contains(&n);
            let walked = users
                .iter()
                .flat_map(|u| store.list(u))
                .filter(|e| {
                    let live: Vec<u64> = e.replicas.iter().copied().filter(|&r| up(r)).collect();
                    live.len() < 2 && live.iter().all(|&r| r >= me)
                })
                .count() as u64;
            assert_eq!(
                store.under_replicated(me, 2, up),
                walked,
                "round {round}, down {down:?}"
            );
        }
        while store.compact_once().await.expect("compact").is_some() {}
        store = reopen(store, dir.path(), SMALL_SEGMENT);
    }
}

/// A failed fsync is never retried on the same pages: the batch is refused,
/// and so is every later write, with the reason (the store stopped); what
/// was stored before stays readable, and after a restart (on a working
/// disk) the store takes writes again with nothing half written visible.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_stops_the_store_taking_writes() {
    let dir = TempDir::new("fsync-fail");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    let before = deliver_msg(&store, &["alice"], T0, bytes(1, 500)).await;
    assert_eq!(store.failure(), None);

    store.inject_sync_failure();
    let delivery = |n: u64| Delivery {
        id: store.new_message_id(T0 + n),
        arrival_ms: T0 + n,
        users: vec!["alice".into()],
        folder: "INBOX".into(),
        body: bytes(n, 300),
        replicas: vec![],
    };
    let failed = delivery(2);
    let failed_id = failed.id;
    let r = store.deliver(failed).await;
    assert!(matches!(r, Err(StoreError::Io(_))), "{r:?}");
    let why = store.failure().expect("the store says why it stopped");
    assert!(why.contains("fsync failed"), "{why}");
    // No second fsync over possibly lost pages: later writes are refused.
    for n in 3..6 {
        let r = store.deliver(delivery(n)).await;
        assert!(
            matches!(&r, Err(StoreError::Stopped(w)) if w.contains("fsync")),
            "{r:?}"
        );
    }
    assert!(matches!(
        store.delete("alice", vec![before.id]).await,
        Err(StoreError::Stopped(_))
    ));
    // Reads go on; the refused message is not visible.
    assert_present(&store, std::slice::from_ref(&before), "after the failure").await;
    assert!(store.list("alice").iter().all(|e| e.id != failed_id));

    let store = reopen(store, dir.path(), DEFAULT_SEGMENT);
    assert_eq!(store.failure(), None, "a restart starts afresh");
    assert_present(&store, std::slice::from_ref(&before), "after the restart").await;
    assert!(store.list("alice").iter().all(|e| e.id != failed_id));
    let after = deliver_msg(&store, &["alice"], T0 + 9, bytes(9, 200)).await;
    assert_present(&store, &[before, after], "writes again after the restart").await;
}

/// A store on a small file system (a 4 MiB tmpfs mounted for the test, as
/// root), one segment: once the disk is full deliveries fail (the node
/// answers 451), deleting a third of the mail gives its space back in place
/// (dead bodies zeroed and punched out: nothing sealed to clean, no room to
/// copy), and the store takes mail again; after a restart everything live
/// reads back and nothing deleted returns. (Deleting freed nothing before.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_takes_mail_again_after_deletions() {
    full_disk_comes_back("fulldisk", "4m", 16 * 1024).await;
}

/// The same with messages of 1 MiB on a 16 MiB disk, each larger than the
/// reserve given up at the first ENOSPC: the deletions themselves give the
/// space back (the free space shows it before any delivery), and the first
/// delivery after them is taken. (Before, the reserve given up made the
/// store think it had room again, the deletions then left their bodies in
/// place, and only a delivery refused for a full disk freed them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_filled_by_large_messages_comes_back_with_the_deletions() {
    full_disk_comes_back("fulldisk-large", "16m", 1024 * 1024).await;
}

/// Bytes the file system holding `dir` has free for this process.
fn free_bytes(dir: &std::path::Path) -> u64 {
    let s = rustix::fs::statvfs(dir).expect("statvfs");
    s.f_bavail * s.f_frsize
}

async fn full_disk_comes_back(name: &str, size: &str, body_bytes: usize) {
    let dir = TempDir::new(name);
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !testkit::available(mounted, "cannot mount a tmpfs here (needs root)") {
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let store_dir = mnt.join("store");
    let store = open(&store_dir, DEFAULT_SEGMENT);
    let mut kept = Vec::new();
    let mut n = 0u64;
    let full = loop {
        let id = store.new_message_id(T0 + n);
        let body = bytes(n, body_bytes);
        let d = Delivery {
            id,
            arrival_ms: T0 + n,
            users: vec!["alice".into()],
            folder: "INBOX".into(),
            body: body.clone(),
            replicas: vec![],
        };
        match store.deliver(d).await {
            Ok(_) => kept.push(Msg {
                users: vec!["alice"],
                id,
                body,
            }),
            Err(e) => break e,
        }
        n += 1;
        assert!(n < 1000, "a {size} disk never filled");
    };
    eprintln!("disk full after {} messages: {full}", kept.len());
    assert!(kept.len() >= 12, "{}", kept.len());
    assert_eq!(store.failure(), None, "a full disk does not stop the store for good");
    assert_eq!(store.stats().segments, 1);
    // Still full.
    let r = store
        .deliver(Delivery {
            id: store.new_message_id(T0 + 5000),
            arrival_ms: T0 + 5000,
            users: vec!["alice".into()],
            folder: "INBOX".into(),
            body: bytes(5000, body_bytes),
            replicas: vec![],
        })
        .await;
    assert!(r.is_err());
    assert!(store.disk_full());
    // Delete every third message.
    let (mut gone, mut live) = (Vec::new(), Vec::new());
    for (i, m) in kept.into_iter().enumerate() {
        if i % 3 == 0 { gone.push(m) } else { live.push(m) }
    }
    let gone_bytes: u64 = gone.iter().map(|m| m.body.len() as u64).sum();
    for chunk in gone.chunks(8) {
        store
            .delete("alice", chunk.iter().map(|m| m.id).collect())
            .await
            .expect("deleting works on a full disk");
    }
    // The deletions gave their space back, before any delivery tried.
    let free = free_bytes(&mnt);
    assert!(
        free >= gone_bytes / 2,
        "{free} bytes free after deleting {gone_bytes} bytes of mail"
    );
    // Mail fits again, from the first delivery on.
    let mut after = Vec::new();
    for k in 0..(gone.len() as u64 / 2).clamp(1, 10) {
        after.push(deliver_msg(&store, &["alice"], T0 + 10_000 + k, bytes(10_000 + k, body_bytes)).await);
    }
    assert!(!store.disk_full());
    assert_present(&store, &live, "after the space came back").await;
    assert_present(&store, &after, "the new mail").await;
    let store = reopen(store, &store_dir, DEFAULT_SEGMENT);
    assert_present(&store, &live, "after a restart").await;
    assert_present(&store, &after, "the new mail after a restart").await;
    assert_absent(&store, &gone, &["alice"], "deleted mail after a restart");
    store.close();
}

/// What a peer (or a bug) could send too long for a record: a mailbox or
/// folder name over the bound, a replica set of thousands of nodes, a
/// deletion naming as many. Each is refused with a clear error before the
/// writer sees it (an entry record over its encoding limit used to panic
/// the writer, stopping the store for good), and the store goes on taking
/// writes and reopens with what it had.
#[tokio::test]
async fn oversized_names_and_node_lists_are_refused_and_the_store_goes_on() {
    use replication::{SetChange, Tombstone};
    let dir = TempDir::new("store-oversized");
    let store = open(dir.path(), SMALL_SEGMENT);
    let (id, _) = deliver(&store, &["alice@example.org"], 1_000, b"kept\r\n".to_vec()).await;
    let bad = |d: Delivery| async { store.deliver(d).await };
    let base = || Delivery {
        id: store.new_message_id(2_000),
        arrival_ms: 2_000,
        users: vec!["alice@example.org".into()],
        folder: "INBOX".into(),
        body: b"x\r\n".to_vec(),
        replicas: vec![1, 2],
    };
    let long_user = Delivery {
        users: vec!["a".repeat(70_000)],
        ..base()
    };
    let long_folder = Delivery {
        folder: "f".repeat(2_000),
        ..base()
    };
    let many_nodes = Delivery {
        replicas: (0..100_000).collect(),
        ..base()
    };
    for d in [long_user, long_folder, many_nodes] {
        let e = bad(d).await.expect_err("refused");
        assert!(matches!(e, StoreError::Refused(_)), "{e}");
    }
    let e = store
        .set_replicas(
            "alice@example.org",
            vec![SetChange {
                id,
                replicas: vec![1, 3],
                prior: (0..10_000).collect(),
                placed: 9,
            }],
            1,
        )
        .await
        .expect_err("refused");
    assert!(matches!(e, StoreError::Refused(_)), "{e}");
    let e = store
        .apply_tombstones(
            "alice@example.org",
            vec![Tombstone {
                id,
                hlc: 9,
                replicas: (0..10_000).collect(),
            }],
        )
        .await
        .expect_err("refused");
    assert!(matches!(e, StoreError::Refused(_)), "{e}");
    assert!(store.failure().is_none(), "the store still takes writes");
    deliver(&store, &["bob@example.org"], 3_000, b"after\r\n".to_vec()).await;
    let store = reopen(store, dir.path(), SMALL_SEGMENT);
    assert_eq!(store.list("alice@example.org").len(), 1);
    assert_eq!(store.list("bob@example.org").len(), 1);
    store.close();
}

/// Folder and flag changes are durable, merge last writer wins per
/// register (in one batch too), survive compaction, and leave deleted
/// messages deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marks_are_durable_and_merge_last_writer_wins() {
    use replication::{FlagMark, MarkChange};
    let flag = |name: &str, set, hlc| FlagMark {
        name: name.into(),
        set,
        hlc,
    };
    let dir = TempDir::new("marks");
    let store = open(dir.path(), SMALL_SEGMENT);
    let a = deliver_msg(&store, &["alice"], T0, bytes(1, 100)).await;
    let b = deliver_msg(&store, &["alice"], T0 + 1, bytes(2, 100)).await;
    let change = |id, folder: Option<(&str, u64)>, flags| MarkChange {
        id,
        folder: folder.map(|(f, h)| (f.to_owned(), h)),
        flags,
    };
    // Several changes of one entry submitted at once (likely one batch).
    let (r1, r2, r3) = tokio::join!(
        store.mark("alice", vec![change(a.id, None, vec![flag("\\Seen", true, 10)])]),
        store.mark("alice", vec![change(a.id, Some(("f1", 11)), vec![])]),
        store.mark("alice", vec![change(a.id, None, vec![flag("$Work", true, 12)])]),
    );
    assert_eq!(r1.expect("mark") + r2.expect("mark") + r3.expect("mark"), 3);
    // Older writes lose.
    let n = store
        .mark(
            "alice",
            vec![change(a.id, Some(("f2", 5)), vec![flag("\\Seen", false, 9)])],
        )
        .await
        .expect("mark");
    assert_eq!(n, 0, "older changes change nothing");
    store.delete("alice", vec![b.id]).await.expect("delete");
    let n = store
        .mark("alice", vec![change(b.id, None, vec![flag("\\Seen", true, 20)])])
        .await
        .expect("mark");
    assert_eq!(n, 0, "a deleted message is not marked (nor brought back)");
    let check = |store: &FragmentStore, when: &str| {
        let listed = store.list("alice");
        assert_eq!(listed.len(), 1, "{when}: only a is left");
        let m = &listed[0];
        assert_eq!(m.folder, "f1", "{when}");
        assert_eq!(m.marks.folder_hlc, 11, "{when}");
        assert_eq!(
            m.marks.set_flags().collect::<Vec<_>>(),
            vec!["$Work", "\\Seen"],
            "{when}"
        );
    };
    check(&store, "before reopen");
    let store = reopen(store, dir.path(), SMALL_SEGMENT);
    check(&store, "after reopen");
    // Filler, so that the marked entry's segment is sealed and compacted.
    for i in 0..40u8 {
        deliver_msg(
            &store,
            &["bob"],
            T0 + 10 + u64::from(i),
            bytes(u64::from(i) + 50, 2_000),
        )
        .await;
    }
    compact_fully(&store).await;
    let store = reopen(store, dir.path(), SMALL_SEGMENT);
    check(&store, "after compaction and reopen");
    store.close();
}

/// A whole record of a kind a newer release writes, appended after this
/// release's: the store refuses to open, saying why, and leaves the
/// segment as it was (skipping or cutting it off would lose what the
/// newer release wrote, which a rollback to it must find).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_a_newer_release_is_refused_not_cut() {
    let dir = TempDir::new("newer-kind");
    let store = open(dir.path(), DEFAULT_SEGMENT);
    deliver_msg(&store, &["alice"], T0, bytes(1, 100)).await;
    store.close();
    drop(store);
    let seg = common::last_segment(dir.path());
    let payload = [&[99u8][..], b"a later release's record"].concat();
    let mut rec = MAGIC.to_le_bytes().to_vec();
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    rec.extend_from_slice(blake3::hash(&payload).as_bytes());
    rec.extend_from_slice(&payload);
    assert_eq!(rec.len(), HEADER_BYTES + payload.len());
    let mut data = std::fs::read(&seg).unwrap();
    data.extend_from_slice(&rec);
    std::fs::write(&seg, &data).unwrap();
    let e = FragmentStore::open(common::config(dir.path(), DEFAULT_SEGMENT)).expect_err("a newer kind");
    assert!(matches!(e, StoreError::Unreadable(_)), "{e}");
    assert!(
        e.to_string().contains("kind 99") && e.to_string().contains("newer release"),
        "{e}"
    );
    assert_eq!(std::fs::read(&seg).unwrap(), data, "the segment is left as it was");
}

/// The stores of the three nodes of `tests/fixtures/v0.1.0` (written by
/// release 0.1.0, see `tests/fixtures/make-v0.1.0.sh`) open, and together
/// hold every message the manifest lists, with its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stores_release_0_1_0_wrote_open_and_hold_every_message() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v0.1.0");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("manifest.json")).unwrap()).unwrap();
    let mut bodies = std::collections::BTreeSet::new();
    let mut stores = Vec::new();
    for k in 1..=3 {
        // A copy: opening a store writes to it (the reserve file, a cut).
        let dir = TempDir::new(&format!("fixture-n{k}"));
        for e in std::fs::read_dir(fixture.join(format!("n{k}/store"))).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
        let store = open(dir.path(), DEFAULT_SEGMENT);
        for user in ["alice@example.org", "bob@example.org", "carol@example.org"] {
            for e in store.list(user) {
                let body = store.read_body(e.body).await.expect("a listed body reads");
                assert_eq!(BodyHash::of(&body), e.body);
                bodies.insert(message_id(&body));
            }
        }
        stores.push((dir, store));
    }
    let mailboxes = manifest["mailboxes"].as_object().unwrap();
    let mut want = 0;
    for (user, m) in mailboxes {
        for (folder, f) in m["folders"].as_object().unwrap() {
            for msg in f["messages"].as_array().unwrap() {
                want += 1;
                let id = msg["message_id"].as_str().unwrap();
                assert!(
                    bodies.contains(id),
                    "{user} {folder} UID {}: no body of {id}",
                    msg["uid"]
                );
            }
        }
    }
    assert!(want >= 10, "the manifest lists {want} messages");
    for (_, s) in stores {
        s.close();
    }
}

/// The Message-ID header of a stored message (the manifest names each
/// message by it).
fn message_id(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.lines()
        .find_map(|l| l.strip_prefix("Message-ID: "))
        .unwrap_or("")
        .trim()
        .to_owned()
}
