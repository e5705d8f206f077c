//! Delivery latency while anti-entropy walks a large store, and while a
//! checkpoint of its index is written.
//!
//! Fills a fragment store with `ENTRIES` entries (100 users per message,
//! replica set {1, 2}), then delivers `DELIVERIES` one-recipient messages of
//! ~4.7 KB with `CONCURRENCY` callers: once alone, once while
//! a task on the same runtime walks the whole index the way a node's duties do
//! (the peer digests of anti-entropy, tombstone expiry, the usage report),
//! back to back, and a third time while checkpoints of the index are
//! written back to back. Prints p50/p99/max delivery latency of each phase,
//! how long one walk takes and how long one checkpoint.
//!
//!     cargo run --release -p replication --example store_walks [ENTRIES]
//!
//! Bounded: fixed counts, fsync on every commit, a fresh directory under
//! /tmp removed at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use replication::{Delivery, FragmentStore, StoreConfig};

const DELIVERIES: usize = 3_000;
const CONCURRENCY: usize = 8;
const USERS_PER_FILL_MESSAGE: usize = 100;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p / 100.0).round() as usize]
}

async fn deliver_phase(store: &Arc<FragmentStore>, label: &str, seq: &AtomicU64) -> Vec<f64> {
    let body = vec![b'x'; 4_700];
    let per_task = DELIVERIES / CONCURRENCY;
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|t| {
            let (store, body) = (store.clone(), body.clone());
            let base = seq.fetch_add(per_task as u64, Ordering::Relaxed);
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_task);
                for i in 0..per_task {
                    let n = base + i as u64;
                    let arrival = 2_000_000_000_000 + n;
                    let d = Delivery {
                        id: store.new_message_id(arrival),
                        arrival_ms: arrival,
                        users: vec![format!("live{t}-{}@example.org", i % 50)],
                        folder: "INBOX".into(),
                        body: body.clone(),
                        replicas: vec![1, 2],
                    };
                    let t0 = Instant::now();
                    store.deliver(d).await.expect("deliver");
                    lat.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{label:<24} deliveries={} p50_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        all.len(),
        percentile(&all, 50.0),
        percentile(&all, 99.0),
        all.last().copied().unwrap_or(f64::NAN)
    );
    all
}

fn main() {
    let entries: usize = std::env::args().nth(1).map_or(200_000, |a| a.parse().expect("ENTRIES"));
    let dir = std::env::temp_dir().join(format!("quill-store-walks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = Arc::new(FragmentStore::open(StoreConfig::new(&dir)).expect("store"));
        // Fill: one body per message, USERS_PER_FILL_MESSAGE entries each.
        let t0 = Instant::now();
        let messages = entries.div_ceil(USERS_PER_FILL_MESSAGE);
        let fills: Vec<_> = (0..4)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for m in (w..messages).step_by(4) {
                        let arrival = 1_000_000_000_000 + m as u64;
                        let users = (0..USERS_PER_FILL_MESSAGE)
                            .map(|u| format!("user{:05}@example.org", (m * 7 + u * 131) % 20_000))
                            .collect();
                        let d = Delivery {
                            id: store.new_message_id(arrival),
                            arrival_ms: arrival,
                            users,
                            folder: "INBOX".into(),
                            body: format!("fill {m}\r\n").into_bytes(),
                            replicas: vec![1, 2],
                        };
                        store.deliver(d).await.expect("fill");
                    }
                })
            })
            .collect();
        for f in fills {
            f.await.expect("fill task");
        }
        let st = store.stats();
        println!(
            "filled {} entries for {} users in {:.1} s",
            st.entries,
            store.usage().len(),
            t0.elapsed().as_secs_f64()
        );

        let seq = AtomicU64::new(0);
        deliver_phase(&store, "alone", &seq).await;

        // The walks a node's duties make, back to back, on the runtime.
        let stop = Arc::new(AtomicBool::new(false));
        let walks = Arc::new(AtomicU64::new(0));
        let walk_ms = Arc::new(AtomicU64::new(0));
        let walkers: Vec<_> = (0..1)
            .map(|_| {
                let (store, stop, walks, walk_ms) = (store.clone(), stop.clone(), walks.clone(), walk_ms.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        let digests = store.peer_digests_async(2).await;
                        std::hint::black_box(digests.len());
                        let usage = store.usage_async().await;
                        std::hint::black_box(usage.len());
                        let forgot = store.forget_tombstones_async(|_, _, _, _| false).await;
                        std::hint::black_box(forgot);
                        walk_ms.fetch_add(t.elapsed().as_millis() as u64, Ordering::Relaxed);
                        walks.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                })
            })
            .collect();
        deliver_phase(&store, "while walking the index", &seq).await;
        stop.store(true, Ordering::Relaxed);
        for w in walkers {
            w.await.expect("walker");
        }
        let n = walks.load(Ordering::Relaxed).max(1);
        println!(
            "walks={} mean_walk_ms={:.1} (peer digests + usage + tombstone expiry over {} entries)",
            walks.load(Ordering::Relaxed),
            walk_ms.load(Ordering::Relaxed) as f64 / n as f64,
            store.stats().entries
        );

        // Checkpoints of the index, back to back, as the store writes one
        // in the background now and then.
        let stop = Arc::new(AtomicBool::new(false));
        let checkpointer = {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::task::spawn_blocking(move || {
                let mut times = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = store.checkpoint().expect("checkpoint");
                    times.push((t.elapsed().as_secs_f64(), r.bytes));
                }
                times
            })
        };
        deliver_phase(&store, "while checkpointing", &seq).await;
        stop.store(true, Ordering::Relaxed);
        let times = checkpointer.await.expect("checkpointer");
        let n = times.len().max(1) as f64;
        println!(
            "checkpoints={} mean_secs={:.2} bytes={}",
            times.len(),
            times.iter().map(|t| t.0).sum::<f64>() / n,
            times.last().map_or(0, |t| t.1)
        );
        store.close();
    });
    let _ = std::fs::remove_dir_all(&dir);
}
