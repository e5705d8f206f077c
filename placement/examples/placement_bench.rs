//! Placement benchmark: lookup rates on one core, view build time and
//! memory, balance quality, and the two designs the crate did not pick
//! (per-key rendezvous, a ring with virtual nodes), measured the same way.
//!
//! Run: `cargo run --release -p placement --example placement_bench`
//! (`-- --quick` for a shorter run). Prints markdown.

use std::hint::black_box;
use std::time::{Duration, Instant};

use placement::{LoadVector, NodeId, NodeInfo, NodeState, UserKey, View};

/// Keys per lookup-rate measurement: 4 M random keys (32 MiB) so lookups
/// touch the whole 8 MiB table, as a server's do, rather than a cached
/// corner of it.
const N_KEYS: usize = 1 << 22;
/// Users in the balance comparison (as in the crate's property test).
const N_USERS: usize = 1_000_000;
/// Timed repetitions; the median is reported.
const REPEATS: usize = 5;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    mix64(*state)
}

fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn nodes(n: u64) -> Vec<NodeInfo> {
    (0..n)
        .map(|i| NodeInfo {
            id: NodeId(1000 + i * 7),
            weight: 1,
            zone: format!("zone-{}", i % 4),
            state: NodeState::Up,
        })
        .collect()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Runs `f` (which does `ops` operations) REPEATS times; median ops/s.
fn rate(ops: usize, mut f: impl FnMut() -> u64) -> f64 {
    let mut rates = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        let start = Instant::now();
        black_box(f());
        rates.push(ops as f64 / start.elapsed().as_secs_f64());
    }
    median(rates)
}

fn fmt_rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.1} M/s", r / 1e6)
    } else {
        format!("{:.0} k/s", r / 1e3)
    }
}

fn fmt_bytes(b: usize) -> String {
    if b >= 1 << 20 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b as f64 / 1024.0)
    }
}

fn fmt_dur(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// Per-key weighted rendezvous (highest random weight), equal weights: the
/// winner is the node with the largest `mix64(key ^ seed)`, no logarithm
/// needed, the most favourable case for this design.
struct Rendezvous {
    seeds: Vec<u64>,
}

impl Rendezvous {
    fn new(n: u64) -> Rendezvous {
        Rendezvous {
            seeds: (0..n).map(|i| mix64(i ^ 0xabcd)).collect(),
        }
    }
    fn lookup(&self, key: u64) -> usize {
        let mut best = 0;
        let mut best_score = 0;
        for (i, &seed) in self.seeds.iter().enumerate() {
            let score = mix64(key ^ seed);
            if score > best_score {
                best_score = score;
                best = i;
            }
        }
        best
    }
}

/// Consistent-hash ring with `vnodes` points per node; owner of a key is the
/// first point at or after it (wrapping).
struct Ring {
    points: Vec<u64>,
    owners: Vec<u16>,
}

impl Ring {
    fn new(n: u64, vnodes: u64) -> Ring {
        let mut pairs: Vec<(u64, u16)> = (0..n)
            .flat_map(|i| {
                let seed = mix64(i ^ 0x1234_5678);
                (0..vnodes).map(move |v| (mix64(seed ^ mix64(v)), i as u16))
            })
            .collect();
        pairs.sort_unstable();
        Ring {
            points: pairs.iter().map(|p| p.0).collect(),
            owners: pairs.iter().map(|p| p.1).collect(),
        }
    }
    fn lookup(&self, key: u64) -> usize {
        let i = self.points.partition_point(|&p| p < key);
        usize::from(self.owners[if i == self.points.len() { 0 } else { i }])
    }
    fn bytes(&self) -> usize {
        self.points.len() * (size_of::<u64>() + size_of::<u16>())
    }
}

fn max_over_mean(counts: &[u64]) -> f64 {
    let mean = counts.iter().sum::<u64>() as f64 / counts.len() as f64;
    *counts.iter().max().unwrap_or(&0) as f64 / mean
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes: &[u64] = &[10, 100, 1000];

    println!("# placement benchmark\n");
    println!(
        "Command: `cargo run --release -p placement --example placement_bench`. One thread; \
         `{}` CPUs visible; times are medians of {REPEATS} runs.\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );

    // ---- view build ----
    println!("## View build time and memory (default 2^22-slot table)\n");
    println!("| nodes | build time | view heap memory |");
    println!("|---:|---:|---:|");
    let mut views = Vec::new();
    for &n in sizes {
        let mut times = Vec::new();
        let mut view = None;
        for _ in 0..if quick { 1 } else { 3 } {
            let start = Instant::now();
            let v = View::new(1, nodes(n)).expect("valid view");
            times.push(start.elapsed().as_secs_f64());
            view = Some(v);
        }
        let view = view.expect("built at least once");
        println!(
            "| {n} | {} | {} |",
            fmt_dur(Duration::from_secs_f64(median(times))),
            fmt_bytes(view.heap_bytes())
        );
        views.push(view);
    }

    // ---- lookups ----
    let mut state = 42u64;
    let keys: Vec<UserKey> = (0..N_KEYS).map(|_| UserKey(splitmix(&mut state))).collect();
    let n_addrs = if quick { 200_000 } else { 1_000_000 };
    let lower: Vec<String> = (0..n_addrs).map(|i| format!("user{i}@example.com")).collect();
    let mixed: Vec<String> = (0..n_addrs).map(|i| format!("user{i}@Example.COM")).collect();
    println!("\n## User-manager lookups per second, one core\n");
    println!(
        "`manager_of(UserKey)` takes a precomputed key ({N_KEYS} random keys, so lookups touch the whole table); \
         `user_manager(&str)` normalizes and blake3-hashes each address first ({n_addrs} addresses, \
         `user123@example.com` as the directory stores them, or `user123@Example.COM` needing case folding).\n"
    );
    println!(
        "| nodes | `manager_of(UserKey)` | `user_manager`, lower-case domain | `user_manager`, mixed-case domain |"
    );
    println!("|---:|---:|---:|---:|");
    for view in &views {
        let by_key = rate(keys.len(), || {
            keys.iter().map(|&k| view.manager_of(k).map_or(0, |id| id.0)).sum()
        });
        let by_lower = rate(lower.len(), || {
            lower.iter().map(|a| view.user_manager(a).map_or(0, |id| id.0)).sum()
        });
        let by_mixed = rate(mixed.len(), || {
            mixed.iter().map(|a| view.user_manager(a).map_or(0, |id| id.0)).sum()
        });
        println!(
            "| {} | {} | {} | {} |",
            view.nodes().len(),
            fmt_rate(by_key),
            fmt_rate(by_lower),
            fmt_rate(by_mixed)
        );
    }
    let hash_only = rate(lower.len(), || {
        lower
            .iter()
            .map(|a| UserKey::from_address(a).0)
            .fold(0, u64::wrapping_add)
    });
    let blake_only = rate(lower.len(), || {
        lower
            .iter()
            .map(|a| u64::from(blake3::hash(a.as_bytes()).as_bytes()[0]))
            .fold(0, u64::wrapping_add)
    });
    println!(
        "\nFor reference, one core: `UserKey::from_address` alone {}; bare `blake3::hash` of the same ~20-byte \
         addresses {}.\n",
        fmt_rate(hash_only),
        fmt_rate(blake_only)
    );

    // ---- spread / replica set ----
    println!("## Spread and replica-set calls per second, one core\n");
    println!("| nodes | `spread_set(S=4)` | `replica_set(R=2, S=4)` |");
    println!("|---:|---:|---:|");
    for view in &views {
        let ids: Vec<NodeId> = view.nodes().iter().map(|n| n.id).collect();
        let loads = LoadVector::new(ids.iter().enumerate().map(|(i, &id)| (id, (i as u64 * 7919) % 13)));
        let calls = if view.nodes().len() >= 1000 { 20_000 } else { 200_000 };
        let sample = &keys[..calls];
        let spread = rate(calls, || {
            sample.iter().map(|&k| view.spread_set(k, 4).len() as u64).sum()
        });
        let replicas = rate(calls, || {
            sample
                .iter()
                .map(|&k| view.replica_set(k, 2, 4, &loads, &ids[..1]).len() as u64)
                .sum()
        });
        println!(
            "| {} | {} | {} |",
            view.nodes().len(),
            fmt_rate(spread),
            fmt_rate(replicas)
        );
    }

    // ---- the alternatives ----
    println!("\n## Alternatives measured for the design choice\n");
    println!(
        "Per-key rendezvous (HRW, equal weights, no logarithm) and a ring with virtual nodes \
         (sorted `u64` points, binary search), same keys, same core.\n"
    );
    println!("| design | nodes | lookups/s | build | memory |");
    println!("|---|---:|---:|---:|---:|");
    for &n in sizes {
        let hrw = Rendezvous::new(n);
        let count = (N_KEYS / n as usize).max(10_000);
        let r = rate(count, || keys[..count].iter().map(|k| hrw.lookup(k.0) as u64).sum());
        println!(
            "| rendezvous per key | {n} | {} | — | {} |",
            fmt_rate(r),
            fmt_bytes(hrw.seeds.len() * 8)
        );
    }
    for &n in sizes {
        // A slot table filled by scoring every (slot, node) pair: the
        // straightforward way to get the same table. At 1 000 nodes it is
        // timed on 2^18 slots and scaled by 16.
        let hrw = Rendezvous::new(n);
        let slot_bits = if n >= 1000 { 18 } else { 22 };
        let start = Instant::now();
        let table: Vec<u16> = (0..1u64 << slot_bits).map(|s| hrw.lookup(mix64(s)) as u16).collect();
        black_box(&table);
        let build = start.elapsed().mul_f64((1u64 << (22 - slot_bits)) as f64);
        println!(
            "| slot table filled by direct rendezvous{} | {n} | (as this crate) | {} | 8.0 MiB |",
            if slot_bits < 22 {
                " (scaled from 2^18 slots)"
            } else {
                ""
            },
            fmt_dur(build)
        );
    }
    for &vnodes in &[1000u64, 4000] {
        for &n in sizes {
            let start = Instant::now();
            let ring = Ring::new(n, vnodes);
            let build = start.elapsed();
            let r = rate(keys.len(), || keys.iter().map(|k| ring.lookup(k.0) as u64).sum());
            println!(
                "| ring, {vnodes} vnodes/node | {n} | {} | {} | {} |",
                fmt_rate(r),
                fmt_dur(build),
                fmt_bytes(ring.bytes())
            );
        }
    }

    // ---- balance quality ----
    println!("\n## Balance: 1 000 000 users over 100 equal nodes\n");
    println!("max/mean users per manager (1.000 is perfect; users are `user{{i}}@example.com`).\n");
    let users: Vec<UserKey> = (0..N_USERS)
        .map(|i| UserKey::from_address(&format!("user{i}@example.com")))
        .collect();
    println!("| design | max/mean |");
    println!("|---|---:|");
    let view = &views[1];
    let mut counts = vec![0u64; 100];
    for &u in &users {
        let id = view.manager_of(u).expect("up nodes");
        counts[view.nodes().binary_search_by_key(&id, |n| n.id).expect("in view")] += 1;
    }
    println!(
        "| slot table, 2^22 slots (this crate) | {:.3} |",
        max_over_mean(&counts)
    );
    let hrw = Rendezvous::new(100);
    let mut counts = vec![0u64; 100];
    users.iter().for_each(|u| counts[hrw.lookup(u.0)] += 1);
    println!("| rendezvous per key | {:.3} |", max_over_mean(&counts));
    for &vnodes in &[100u64, 1000, 4000] {
        let ring = Ring::new(100, vnodes);
        let mut counts = vec![0u64; 100];
        users.iter().for_each(|u| counts[ring.lookup(u.0)] += 1);
        println!("| ring, {vnodes} vnodes/node | {:.3} |", max_over_mean(&counts));
    }

    // Many views: the distribution of max/mean for the slot table.
    let trials = if quick { 3 } else { 10 };
    let mut worst: f64 = 0.0;
    let mut sum = 0.0;
    for t in 0..trials {
        let nodes: Vec<NodeInfo> = (0..100u64)
            .map(|i| NodeInfo {
                id: NodeId(mix64(t * 1000 + i)),
                weight: 1,
                zone: String::new(),
                state: NodeState::Up,
            })
            .collect();
        let view = View::new(1, nodes).expect("valid view");
        let mut counts = vec![0u64; 100];
        for &u in &users {
            let id = view.manager_of(u).expect("up nodes");
            counts[view.nodes().binary_search_by_key(&id, |n| n.id).expect("in view")] += 1;
        }
        let m = max_over_mean(&counts);
        worst = worst.max(m);
        sum += m;
    }
    println!(
        "\nSlot table over {trials} random sets of 100 node ids: mean max/mean {:.3}, worst {:.3}.",
        sum / trials as f64,
        worst
    );

    // Weights: 10 nodes, every other one of weight 2.
    let weighted = View::new(
        1,
        (0..10u64)
            .map(|i| NodeInfo {
                id: NodeId(500 + i),
                weight: 1 + (i % 2) as u32,
                zone: String::new(),
                state: NodeState::Up,
            })
            .collect(),
    )
    .expect("valid view");
    let mut counts = [0u64; 10];
    for &u in &users {
        let id = weighted.manager_of(u).expect("up nodes");
        counts[(id.0 - 500) as usize] += 1;
    }
    let light: Vec<f64> = counts.iter().step_by(2).map(|&c| c as f64).collect();
    let light_mean = light.iter().sum::<f64>() / light.len() as f64;
    let ratios: Vec<f64> = counts
        .iter()
        .skip(1)
        .step_by(2)
        .map(|&c| c as f64 / light_mean)
        .collect();
    println!(
        "Weights (10 nodes, 5 of weight 2): weight-2 users / mean weight-1 users = {}.",
        ratios.iter().map(|r| format!("{r:.3}")).collect::<Vec<_>>().join(", ")
    );

    // Movement when one node joins 100.
    let grown = {
        let mut n = nodes(100);
        n.push(NodeInfo {
            id: NodeId(1),
            weight: 1,
            zone: "zone-0".into(),
            state: NodeState::Up,
        });
        View::new(2, n).expect("valid view")
    };
    let moved = users
        .iter()
        .filter(|&&u| views[1].manager_of(u) != grown.manager_of(u))
        .count();
    println!(
        "Adding a 101st node moves {:.3} % of users (ideal 1/101 = {:.3} %).",
        moved as f64 * 100.0 / N_USERS as f64,
        100.0 / 101.0
    );
}
