//! `chaos`: a load with a fault schedule drawn from a seed (kill -9 and
//! restart, SIGSTOP/SIGCONT pauses, partitions), then `verify`. One fault at
//! a time, each over before the next begins, so that a majority stays up,
//! and the last fifth of the run left for healing. The same seed draws the
//! same schedule.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use testkit::Rng;

use super::{Cluster, Fault, LoadArgs, load, verify};
use crate::cluster::ClusterState;
use crate::load::LoadConfig;

/// The kinds of fault a schedule draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// kill -9, restarted at the end of its window.
    Kill,
    Pause,
    Partition,
}

impl std::str::FromStr for Kind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Kind> {
        Ok(match s {
            "kill" => Kind::Kill,
            "pause" => Kind::Pause,
            "partition" => Kind::Partition,
            _ => bail!("unknown fault kind {s:?} (kill, pause, partition)"),
        })
    }
}

/// Draws `n` faults over `duration` on `nodes`: fault i gets the i-th of
/// `n` equal slots of the run between its first tenth (a warm-up) and its
/// last fifth (healing), starts in the first quarter of its slot and lasts
/// between 2 s and the rest of its first half, so windows never overlap.
pub fn schedule(seed: u64, nodes: &[u8], kinds: &[Kind], duration: Duration, n: usize) -> Vec<(Duration, Fault)> {
    let mut out = Vec::new();
    if nodes.is_empty() || kinds.is_empty() || n == 0 {
        return out;
    }
    let mut rng = Rng::new(seed);
    let total_ms = duration.as_millis() as u64;
    let warmup_ms = total_ms / 10;
    let slot_ms = (total_ms * 4 / 5 - warmup_ms) / n as u64;
    for i in 0..n as u64 {
        let node = nodes[rng.below(nodes.len() as u64) as usize];
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let half = slot_ms / 2;
        let start = warmup_ms + i * slot_ms + rng.below(half / 2 + 1);
        let len_ms = 2_000 + rng.below((half.saturating_sub(2_000) / 2).max(1));
        let (at, len) = (Duration::from_millis(start), Duration::from_millis(len_ms));
        match kind {
            Kind::Kill => {
                out.push((at, Fault::Kill(node)));
                out.push((at + len, Fault::Restart(node)));
            }
            Kind::Pause => out.push((at, Fault::Pause(node, len))),
            Kind::Partition => out.push((at, Fault::Partition(node, len))),
        }
    }
    out
}

pub struct ChaosArgs {
    pub dir: PathBuf,
    pub cfg: LoadConfig,
    pub faults: usize,
    pub kinds: Vec<Kind>,
    pub out: PathBuf,
    pub progress: bool,
}

/// Runs the load with a drawn schedule, then verifies; fails if anything
/// acknowledged was lost, duplicated or came back after deletion.
pub async fn chaos(args: ChaosArgs) -> anyhow::Result<()> {
    let state = ClusterState::load(&args.dir)?;
    let nodes = state.live();
    let mut kinds = args.kinds.clone();
    if kinds.contains(&Kind::Partition) && !crate::process::Partition::available() {
        eprintln!("iptables is not usable here (root needed): drawing no partitions");
        kinds.retain(|k| *k != Kind::Partition);
    }
    let duration = Duration::from_secs_f64(args.cfg.duration_s);
    if args.faults == 0 || duration * 7 / 10 / args.faults as u32 <= Duration::from_secs(6) {
        bail!("give each fault at least 6 s: --duration over 8.6 s per --faults");
    }
    let faults = schedule(args.cfg.seed, &nodes, &kinds, duration, args.faults);
    println!("seed {}: {} faults drawn", args.cfg.seed, args.faults);
    for (at, f) in &faults {
        println!("  {:>6.1}s  {f:?}", at.as_secs_f64());
    }
    load(LoadArgs {
        cluster: Cluster::Dir(args.dir.clone()),
        token: None,
        password: None,
        cfg: args.cfg,
        faults,
        out: args.out.clone(),
        progress: args.progress,
    })
    .await?;
    let v = verify(Cluster::Dir(args.dir), None, args.out).await?;
    if !v.lost.is_empty() || !v.resurrected.is_empty() || !v.duplicated.is_empty() || !v.corrupt.is_empty() {
        bail!(
            "chaos run failed: {} lost, {} resurrected, {} duplicated, {} corrupt",
            v.lost.len(),
            v.resurrected.len(),
            v.duplicated.len(),
            v.corrupt.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(f: &[(Duration, Fault)], i: usize) -> (Duration, Duration) {
        match &f[i].1 {
            Fault::Pause(_, len) | Fault::Partition(_, len) => (f[i].0, f[i].0 + *len),
            Fault::Kill(_) => (f[i].0, f[i + 1].0),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn schedules_are_seeded_bounded_and_never_overlap() {
        let kinds = [Kind::Kill, Kind::Pause, Kind::Partition];
        let d = Duration::from_secs(120);
        for seed in 0..200 {
            let a = schedule(seed, &[1, 2, 3], &kinds, d, 5);
            let b = schedule(seed, &[1, 2, 3], &kinds, d, 5);
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "the seed decides");
            let mut i = 0;
            let mut last_end = d / 10;
            let mut faults = 0;
            while i < a.len() {
                let (start, end) = window(&a, i);
                assert!(start >= last_end, "seed {seed}: windows overlap: {a:?}");
                assert!(end <= d * 4 / 5, "seed {seed}: the last fifth is for healing: {a:?}");
                assert!(end - start >= Duration::from_secs(2));
                if let Fault::Kill(n) = a[i].1 {
                    assert!(matches!(a[i + 1].1, Fault::Restart(m) if m == n), "a kill is restarted");
                    i += 1;
                }
                last_end = end;
                faults += 1;
                i += 1;
            }
            assert_eq!(faults, 5);
        }
        assert!(schedule(1, &[], &kinds, d, 5).is_empty());
    }
}
