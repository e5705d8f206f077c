//! Porcupine's dynamic-versus-static placement experiment, simulated with
//! this crate's placement functions.
//!
//! Run: `cargo run --release -p placement --example placement_sim`
//! (`-- --quick` for fewer, shorter runs). Prints markdown; the model is
//! described in the printed header.

use std::time::Instant;

use placement::{LoadVector, NodeId, NodeInfo, NodeState, UserKey, View};

/// Nodes in the cluster, as in Porcupine's 30-node experiments.
const N_NODES: usize = 30;
/// Users; popularity follows Zipf(s) over them.
const N_USERS: usize = 100_000;
/// Simulation step: one millisecond.
const TICKS_PER_S: u64 = 1000;
/// Fault-free warm-up before measuring, seconds.
const WARMUP_S: u64 = 10;
/// How often every proxy's copy of the cluster's load is refreshed,
/// milliseconds, in the main table (Porcupine piggybacks load on its RPCs:
/// information is recent, never current). A second table varies it.
const LOAD_REFRESH_MS: u64 = 100;
/// A run is sustained if, at its end, no node needs more than this long to
/// drain its backlog.
const MAX_BACKLOG_S: f64 = 1.0;
/// Bisection steps on the offered rate (capacity / 2^12 ≈ 0.2 msg/s).
const BISECTION_STEPS: usize = 12;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: usize) -> usize {
        ((self.next() as u128 * n as u128) >> 64) as usize
    }
    /// Poisson variate by inversion (means here are below 1 per tick).
    fn poisson(&mut self, mean: f64) -> u32 {
        let u = self.unit();
        let mut p = (-mean).exp();
        let mut cdf = p;
        let mut k = 0;
        while u > cdf && k < 64 {
            k += 1;
            p *= mean / f64::from(k);
            cdf += p;
        }
        k
    }
}

#[derive(Clone, Copy)]
enum Policy {
    /// Fragments only on the user's manager (Porcupine's static placement).
    Static,
    /// Least-loaded node within the user's spread (`replica_set`, R = 1).
    Dynamic { spread: usize },
}

struct Cluster {
    name: &'static str,
    /// Messages per second each node can store.
    rates: Vec<f64>,
}

impl Cluster {
    fn capacity(&self) -> f64 {
        self.rates.iter().sum()
    }
}

struct Workload {
    /// Cumulative popularity, for sampling users.
    cdf: Vec<f64>,
    keys: Vec<UserKey>,
}

impl Workload {
    fn zipf(s: f64, keys: &[UserKey]) -> Workload {
        let mut cdf = Vec::with_capacity(keys.len());
        let mut total = 0.0;
        for rank in 1..=keys.len() {
            total += 1.0 / (rank as f64).powf(s);
            cdf.push(total);
        }
        cdf.iter_mut().for_each(|c| *c /= total);
        Workload {
            cdf,
            keys: keys.to_vec(),
        }
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
    fn top_share(&self) -> f64 {
        self.cdf[0]
    }
}

/// What one simulated run is made of.
#[derive(Clone, Copy)]
struct Sim<'a> {
    view: &'a View,
    cluster: &'a Cluster,
    work: &'a Workload,
    measure_s: u64,
    refresh_ms: u64,
}

/// One run at `offered` msg/s; returns (delivered msg/s over the measured
/// window, worst backlog in seconds at the end).
fn run(sim: &Sim, policy: Policy, offered: f64, seed: u64) -> (f64, f64) {
    let Sim {
        view,
        cluster,
        work,
        measure_s,
        refresh_ms,
    } = *sim;
    let mut rng = Rng(seed);
    let ids: Vec<NodeId> = view.nodes().iter().map(|n| n.id).collect();
    let index_of = |id: NodeId| ids.binary_search(&id).expect("node in view");
    let mut queue = vec![0u64; N_NODES];
    let mut credit = vec![0.0f64; N_NODES];
    // Each proxy: the last load snapshot plus what it sent since.
    let mut snapshot = vec![0u64; N_NODES];
    let mut sent_since = vec![vec![0u64; N_NODES]; N_NODES];
    // Nodes holding fragments of each user (small, sorted).
    let mut holders: Vec<Vec<NodeId>> = vec![Vec::new(); work.keys.len()];
    let mut delivered = 0u64;
    let total_ticks = (WARMUP_S + measure_s) * TICKS_PER_S;
    for tick in 0..total_ticks {
        if tick % refresh_ms == 0 {
            snapshot.copy_from_slice(&queue);
            sent_since.iter_mut().for_each(|s| s.fill(0));
        }
        for _ in 0..rng.poisson(offered / TICKS_PER_S as f64) {
            let user = work.sample(&mut rng);
            let key = work.keys[user];
            let target = match policy {
                Policy::Static => view.manager_of(key).expect("up nodes"),
                Policy::Dynamic { spread } => {
                    let proxy = rng.below(N_NODES);
                    let loads = LoadVector::new(
                        ids.iter()
                            .enumerate()
                            .map(|(i, &id)| (id, snapshot[i] + sent_since[proxy][i])),
                    );
                    let chosen = view.replica_set(key, 1, spread, &loads, &holders[user]);
                    let target = chosen[0];
                    sent_since[proxy][index_of(target)] += 1;
                    target
                }
            };
            let t = index_of(target);
            queue[t] += 1;
            if let Err(pos) = holders[user].binary_search(&target) {
                holders[user].insert(pos, target);
            }
        }
        let measuring = tick >= WARMUP_S * TICKS_PER_S;
        for i in 0..N_NODES {
            credit[i] += cluster.rates[i] / TICKS_PER_S as f64;
            while credit[i] >= 1.0 && queue[i] > 0 {
                credit[i] -= 1.0;
                queue[i] -= 1;
                if measuring {
                    delivered += 1;
                }
            }
            if queue[i] == 0 {
                // An idle node cannot bank service for later.
                credit[i] = credit[i].min(1.0);
            }
        }
    }
    let backlog_s = (0..N_NODES)
        .map(|i| queue[i] as f64 / cluster.rates[i])
        .fold(0.0, f64::max);
    (delivered as f64 / measure_s as f64, backlog_s)
}

/// Highest offered rate whose run is sustained (bisection), and the
/// delivered rate measured at that offered rate.
fn max_sustained(sim: &Sim, policy: Policy) -> f64 {
    let (mut lo, mut hi) = (0.0, sim.cluster.capacity());
    let mut best = 0.0;
    for step in 0..BISECTION_STEPS {
        let mid = (lo + hi) / 2.0;
        let (delivered, backlog_s) = run(sim, policy, mid, 0x5eed + step as u64);
        if backlog_s <= MAX_BACKLOG_S {
            lo = mid;
            best = delivered;
        } else {
            hi = mid;
        }
    }
    best
}

fn view_with_weights(weights: &[u32]) -> View {
    let nodes = weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| NodeInfo {
            id: NodeId(i as u64 + 1),
            weight,
            zone: format!("zone-{}", i % 3),
            state: NodeState::Up,
        })
        .collect();
    View::new(1, nodes).expect("valid view")
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let measure_s = if quick { 20 } else { 60 };
    let skews: &[f64] = if quick { &[0.0, 1.0] } else { &[0.0, 0.5, 0.8, 1.0] };
    let started = Instant::now();

    let clusters = [
        Cluster {
            name: "30 equal nodes",
            rates: vec![800.0 / 30.0; N_NODES],
        },
        Cluster {
            name: "10 fast (40/s) + 20 slow (20/s)",
            rates: (0..N_NODES).map(|i| if i % 3 == 0 { 40.0 } else { 20.0 }).collect(),
        },
    ];
    let keys: Vec<UserKey> = (0..N_USERS)
        .map(|i| UserKey::from_address(&format!("user{i}@example.com")))
        .collect();
    let equal_view = view_with_weights(&[1; N_NODES]);

    println!("# Dynamic versus static placement (simulation)\n");
    println!(
        "Command: `cargo run --release -p placement --example placement_sim`{}.\n",
        if quick { " -- --quick" } else { "" }
    );
    println!("Model (a discrete-time queueing model, not a mail server):");
    println!(
        "- {N_NODES} nodes in 3 zones; each stores up to its rate of messages per second (fixed cost per message, one copy, no replication)."
    );
    println!("  Total capacity is 800 msg/s in both clusters (Porcupine's 30-node cluster peaked near 800 msg/s).");
    println!(
        "- {N_USERS} users; each message goes to a user drawn from Zipf(s) by popularity rank (s = 0 is uniform). Rank is independent of the user's hash."
    );
    println!(
        "- Messages arrive as a Poisson process at the offered rate, each at a random node acting as proxy, in 1 ms steps."
    );
    println!(
        "- Static: the message goes to the user's manager (`View::manager_of`). Dynamic: `View::replica_set(user, R = 1, spread, loads, holders)`,"
    );
    println!(
        "  i.e. least loaded within the user's spread, holders of the user's mail winning ties. Load = queue length; each proxy sees a snapshot"
    );
    println!(
        "  refreshed every {LOAD_REFRESH_MS} ms plus its own sends since, so load information is stale as in Porcupine."
    );
    println!(
        "- Throughput = the highest offered rate at which, after {WARMUP_S} s warm-up and {measure_s} s measured, no node needs more than"
    );
    println!(
        "  {MAX_BACKLOG_S} s to drain its queue (bisection, {BISECTION_STEPS} steps); the cell shows the delivered msg/s at that rate."
    );
    println!(
        "- \"static, speed weights\" gives fast nodes weight 2 in the view (the operator tuning static placement by hand).\n"
    );

    let mut header = String::from("| cluster | policy |");
    let mut rule = String::from("|---|---|");
    let mut shares = String::new();
    let workloads: Vec<Workload> = skews.iter().map(|&s| Workload::zipf(s, &keys)).collect();
    for (s, w) in skews.iter().zip(&workloads) {
        header.push_str(&format!(" Zipf s = {s} |"));
        rule.push_str("---:|");
        shares.push_str(&format!(" s = {s}: {:.3} %;", w.top_share() * 100.0));
    }
    println!("Share of all messages going to the single most popular user:{shares}\n");
    println!("{header}");
    println!("{rule}");
    for cluster in &clusters {
        let speed_weights: Vec<u32> = cluster.rates.iter().map(|&r| if r > 30.0 { 2 } else { 1 }).collect();
        let weighted_view = view_with_weights(&speed_weights);
        let rows: Vec<(&str, &View, Policy)> = vec![
            ("static (manager only)", &equal_view, Policy::Static),
            ("static, speed weights", &weighted_view, Policy::Static),
            ("dynamic, spread 2", &equal_view, Policy::Dynamic { spread: 2 }),
            ("dynamic, spread 4", &equal_view, Policy::Dynamic { spread: 4 }),
        ];
        for (name, view, policy) in rows {
            if cluster.name.starts_with("30 equal") && name == "static, speed weights" {
                continue; // same as plain static when all speeds are equal
            }
            let mut line = format!("| {} | {name} |", cluster.name);
            for work in &workloads {
                let sim = Sim {
                    view,
                    cluster,
                    work,
                    measure_s,
                    refresh_ms: LOAD_REFRESH_MS,
                };
                let t = max_sustained(&sim, policy);
                line.push_str(&format!(" {t:.0} |"));
            }
            println!("{line}");
        }
    }

    // Sensitivity to stale load information, at the harshest skew.
    let cluster = &clusters[1];
    let work = workloads.last().expect("at least one skew");
    let skew = skews.last().expect("at least one skew");
    println!(
        "\nStaleness: {}, Zipf s = {skew}, load snapshot refreshed every ...\n",
        cluster.name
    );
    println!("| policy | 1 ms | 10 ms | 100 ms | 1 000 ms |");
    println!("|---|---:|---:|---:|---:|");
    for spread in [2, 4] {
        let mut line = format!("| dynamic, spread {spread} |");
        for refresh_ms in [1, 10, 100, 1000] {
            let sim = Sim {
                view: &equal_view,
                cluster,
                work,
                measure_s,
                refresh_ms,
            };
            line.push_str(&format!(" {:.0} |", max_sustained(&sim, Policy::Dynamic { spread })));
        }
        println!("{line}");
    }
    println!("\n(Simulated in {:.0} s.)", started.elapsed().as_secs_f64());
}
