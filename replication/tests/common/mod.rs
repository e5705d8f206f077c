//! Helpers shared by the fragment store's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use replication::{BodyHash, Delivery, FragmentStore, MessageId, StoreConfig};

/// Segment size that makes rotation and compaction happen after a few
/// messages.
pub const SMALL_SEGMENT: u64 = 4096;

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(testkit::TempDir);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        TempDir(testkit::TempDir::new(&format!("repl-test-{tag}")).expect("create temp dir"))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

pub fn config(dir: &Path, segment_bytes_max: u64) -> StoreConfig {
    StoreConfig {
        segment_bytes_max,
        ..StoreConfig::new(dir)
    }
}

pub fn open(dir: &Path, segment_bytes_max: u64) -> FragmentStore {
    FragmentStore::open(config(dir, segment_bytes_max)).expect("opening the store should succeed")
}

/// The checkpoint of the index in a store directory.
pub fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("index.qckp")
}

/// Removes the checkpoint of the index: the store then reads every
/// segment when it opens (from its summary or whole).
pub fn remove_checkpoint(dir: &Path) {
    match std::fs::remove_file(checkpoint_path(dir)) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing the checkpoint: {e}"),
    }
}

/// Closes `store` and opens the same directory again.
pub fn reopen(store: FragmentStore, dir: &Path, segment_bytes_max: u64) -> FragmentStore {
    store.close();
    drop(store);
    open(dir, segment_bytes_max)
}

/// What a store shows: the counts, and every user's entries (as listed:
/// place, flags, folder, replicas) and tombstone digest.
pub fn state_of(store: &FragmentStore, users: &[&str]) -> String {
    let s = store.stats();
    let mut out = format!(
        "entries={} tombstones={} bodies={} body_bytes={} segments={} disk_bytes={} live_bytes={}\n",
        s.entries, s.tombstones, s.bodies, s.body_bytes, s.segments, s.disk_bytes, s.live_bytes
    );
    for u in users {
        out.push_str(&format!("{u}: {:?} {:?}\n", store.list(u), store.digest(u, 0)));
    }
    out
}

/// Deterministic pseudo-random bytes (splitmix64), so tests need no `rand`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Delivers `body` to `users` under a fresh id; returns the id and body hash.
pub async fn deliver(store: &FragmentStore, users: &[&str], arrival_ms: u64, body: Vec<u8>) -> (MessageId, BodyHash) {
    let id = store.new_message_id(arrival_ms);
    let expected = BodyHash::of(&body);
    let hash = store
        .deliver(Delivery {
            id,
            arrival_ms,
            users: users.iter().map(|u| u.to_string()).collect(),
            folder: "INBOX".into(),
            body,
            replicas: vec![],
        })
        .await
        .expect("deliver should succeed");
    assert_eq!(hash, expected, "deliver should return the blake3 hash of the body");
    (id, hash)
}

/// The segment files of a store directory, oldest first.
pub fn segment_files(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut segs: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .expect("read store dir")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix("seg-")?.strip_suffix(".qseg")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    segs.sort();
    segs
}

pub fn last_segment(dir: &Path) -> PathBuf {
    segment_files(dir)
        .pop()
        .expect("the store should have at least one segment")
        .1
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || needle.len() > haystack.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Copies every segment file of `from` into the (empty) directory `to`.
pub fn copy_store(from: &Path, to: &Path) {
    for (_, path) in segment_files(from) {
        std::fs::copy(&path, to.join(path.file_name().expect("file name"))).expect("copy segment");
    }
}
