//! What the test suites (and the harness's benchmarks) share, so that each
//! does not write its own: a temporary directory removed on drop, a seed
//! taken from `SEED` with a line that says how to rerun a failure, and
//! waiting for a condition with a deadline (never sleep-and-hope).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A directory under the system temp dir, unique per process and call,
/// removed on drop (also when a test fails and unwinds), unless
/// `QUILL_KEEP_TEST_DIRS` is set.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> std::io::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("quill-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("QUILL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Whether a test may use something this machine may lack (a program, root,
/// iptables): `ok` as given, with a `SKIPPED: <what>` line when it is
/// false. Where `QUILL_REQUIRE_TOOLS=1` (as in CI) a lack is a failure
/// instead, so that a CI machine cannot skip the test silently.
pub fn available(ok: bool, what: &str) -> bool {
    if !ok {
        assert!(
            std::env::var("QUILL_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "required here (QUILL_REQUIRE_TOOLS=1): {what}"
        );
        eprintln!("SKIPPED: {what}");
    }
    ok
}

/// Whether `name` is a program on `PATH`, as [`available`] says it.
pub fn program(name: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .is_ok_and(|o| o.status.success());
    available(found, &format!("{name} is not installed"))
}

/// A Python that imports `module`: `QUILL_PYTHON`, else `python3`, else
/// the system's (Debian's python3-* packages go there), as [`available`]
/// says it.
pub fn python_with(module: &str) -> Option<String> {
    let mut candidates: Vec<String> = std::env::var("QUILL_PYTHON").into_iter().collect();
    candidates.extend(["python3".to_owned(), "/usr/bin/python3".to_owned()]);
    let found = candidates.into_iter().find(|p| {
        std::process::Command::new(p)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    available(found.is_some(), &format!("no Python with the {module} module")).then(|| found.expect("found"))
}

/// The seeds a seeded test runs: `SEED` from the environment alone, else
/// `defaults`.
pub fn seeds(defaults: &[u64]) -> Vec<u64> {
    match std::env::var("SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => vec![s],
        None => defaults.to_vec(),
    }
}

/// Held while a seeded run goes: if the test panics, it prints
/// `REPRODUCE WITH: SEED=n <command>`.
#[derive(Debug)]
pub struct Reproduce {
    pub seed: u64,
    pub command: String,
}

impl Reproduce {
    pub fn new(seed: u64, command: impl Into<String>) -> Self {
        Reproduce {
            seed,
            command: command.into(),
        }
    }
}

impl Drop for Reproduce {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("REPRODUCE WITH: SEED={} {}", self.seed, self.command);
        }
    }
}

/// A small deterministic generator (SplitMix64): the same seed gives the
/// same sequence on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0), by rejection of the biased tail.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }

    /// True with probability `per_million` / 1 000 000.
    pub fn chance_per_million(&mut self, per_million: u32) -> bool {
        self.below(1_000_000) < u64::from(per_million)
    }
}

/// Polls `f` every 50 ms until it returns true; panics naming `what` once
/// `deadline` has passed.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    while !f().await {
        assert!(Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dirs_are_distinct_and_go_away() {
        let (a, b) = (TempDir::new("kit").unwrap(), TempDir::new("kit").unwrap());
        assert_ne!(a.path(), b.path());
        let p = a.path().to_path_buf();
        assert!(p.is_dir());
        drop(a);
        assert!(!p.exists());
    }

    #[test]
    fn rng_is_deterministic() {
        let (mut a, mut b) = (Rng::new(9), Rng::new(9));
        let xs: Vec<u64> = (0..5).map(|_| a.below(100)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.below(100)).collect();
        assert_eq!(xs, ys);
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
        let mut r = Rng::new(1);
        let hits = (0..100_000).filter(|_| r.chance_per_million(100_000)).count();
        assert!((9_000..11_000).contains(&hits), "{hits}");
        assert!((0..1000).all(|_| r.below(3) < 3));
    }

    #[tokio::test]
    async fn wait_for_returns_once_true() {
        let mut n = 0;
        wait_for("the third poll", Duration::from_secs(5), || {
            n += 1;
            let done = n >= 3;
            async move { done }
        })
        .await;
        assert_eq!(n, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "timed out")]
    async fn wait_for_panics_past_its_deadline() {
        wait_for("never", Duration::from_millis(120), || async { false }).await;
    }
}
