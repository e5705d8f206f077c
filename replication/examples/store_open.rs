//! How long a fragment store takes to open, by what it holds.
//!
//! Fills a store with `ENTRIES` entries: `USERS` users, one small message
//! each (`BODY_BYTES`, the shape of the restart figure of the issue "a
//! thousand nodes": 100 users x 10 240 small messages), then closes it and
//! times `FragmentStore::open` (the index rebuilt from the segments) a few
//! times, printing entries, segments, bytes and seconds.
//!
//!     cargo run --release -p replication --example store_open [ENTRIES [BODY_BYTES]]
//!
//! Each open is timed three ways: from a checkpoint of the index
//! (`index.qckp`, what a start normally has), from the summaries of the
//! sealed segments alone (`seg-N.qidx`) and without either (every segment
//! read whole, as before summaries). The time to write the checkpoint is
//! printed too.
//!
//! Bounded: fixed counts, a fresh directory under /tmp removed at the end.
//! With `STORE_OPEN_DIR=D`, the store is kept in D instead, and a D that
//! already holds one is only opened, once (to time a restart's open in a
//! fresh process, or profile it), and a checkpoint written after if it was
//! opened without one.

use std::sync::Arc;
use std::time::Instant;

use replication::{Delivery, FragmentStore, StoreConfig};

const USERS: usize = 100;
const CONCURRENCY: usize = 64;
const OPENS: usize = 3;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let entries: usize = std::env::args()
        .nth(1)
        .map_or(1_000_000, |a| a.parse().expect("ENTRIES is a number"));
    let body_bytes: usize = std::env::args()
        .nth(2)
        .map_or(300, |a| a.parse().expect("BODY_BYTES is a number"));
    let kept = std::env::var_os("STORE_OPEN_DIR").map(std::path::PathBuf::from);
    let dir = kept
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("quill-store-open-{}", std::process::id())));
    let holds_a_store = |d: &std::path::Path| {
        std::fs::read_dir(d)
            .is_ok_and(|mut r| r.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".qseg"))))
    };
    if kept.as_deref().is_some_and(holds_a_store) {
        // One open, in a process of its own, as a restarted node's: run
        // the command again for more rounds.
        let t = Instant::now();
        let store = FragmentStore::open(StoreConfig::new(&dir)).expect("reopen");
        println!(
            "open entries={} secs={:.2} {:?}",
            store.stats().entries,
            t.elapsed().as_secs_f64(),
            store.open_report()
        );
        if store.open_report().checkpoint_segment.is_none() {
            checkpoint(&store);
        }
        store.close();
        return;
    }
    let _ = std::fs::remove_dir_all(&dir);
    let store = Arc::new(FragmentStore::open(StoreConfig::new(&dir)).expect("open"));
    let t = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|c| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut n = c;
                while n < entries {
                    let mut body = format!("Subject: message {n}\r\n\r\n").into_bytes();
                    body.resize(body_bytes, b'x');
                    let arrival_ms = 1_700_000_000_000 + n as u64;
                    store
                        .deliver(Delivery {
                            id: store.new_message_id(arrival_ms),
                            arrival_ms,
                            users: vec![format!("user{:04}@example.com", n % USERS)],
                            folder: "INBOX".into(),
                            body,
                            replicas: vec![1, 2],
                        })
                        .await
                        .expect("deliver");
                    n += CONCURRENCY;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("filler");
    }
    let fill_s = t.elapsed().as_secs_f64();
    let store = Arc::into_inner(store).expect("fillers done");
    store.close();
    drop(store);
    let bytes: u64 = std::fs::read_dir(&dir)
        .expect("dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("filled entries={entries} body_bytes={body_bytes} secs={fill_s:.1} bytes={bytes}");
    // The summaries of the last sealed segments are written off the
    // writer: the first open makes any still missing. Then a checkpoint,
    // kept aside for the rounds that start from it.
    let store = FragmentStore::open(StoreConfig::new(&dir)).expect("reopen");
    checkpoint(&store);
    store.close();
    let ckpt = dir.join("index.qckp");
    let aside = dir.join("checkpoint.aside");
    std::fs::copy(&ckpt, &aside).expect("keep the checkpoint");
    for round in 1..=OPENS {
        for how in ["checkpoint", "summaries", "whole"] {
            let _ = std::fs::remove_file(&ckpt);
            match how {
                "checkpoint" => drop(std::fs::copy(&aside, &ckpt).expect("the checkpoint back")),
                "summaries" => {}
                _ => {
                    for e in std::fs::read_dir(&dir).expect("dir").filter_map(|e| e.ok()) {
                        if e.file_name().to_string_lossy().ends_with(".qidx") {
                            std::fs::remove_file(e.path()).expect("remove summary");
                        }
                    }
                }
            }
            // The page cache as a restarted node finds it (warm): every way alike.
            let t = Instant::now();
            let store = FragmentStore::open(StoreConfig::new(&dir)).expect("reopen");
            let secs = t.elapsed().as_secs_f64();
            let s = store.stats();
            println!(
                "open round={round} from={how} entries={} segments={} body_bytes={} secs={secs:.2} segments_read={}",
                s.entries,
                s.segments,
                s.body_bytes,
                store.open_report().segments_read
            );
            store.close();
        }
    }
    if kept.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Writes a checkpoint of the index and says how long it took.
fn checkpoint(store: &FragmentStore) {
    let t = Instant::now();
    let r = store.checkpoint().expect("checkpoint");
    println!(
        "checkpoint entries={} bytes={} secs={:.2}",
        r.entries,
        r.bytes,
        t.elapsed().as_secs_f64()
    );
}
