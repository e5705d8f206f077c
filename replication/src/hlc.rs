//! Hybrid logical clocks (Kulkarni et al., 2014), packed in a `u64`: the
//! upper 48 bits are wall-clock milliseconds, the lower 16 a counter. A
//! node's clock never goes backwards, moves past every timestamp it has
//! seen from another node, and stays close to wall time, so "last writer
//! wins" by HLC orders causally related updates correctly even across
//! nodes whose clocks disagree a little.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const COUNTER_BITS: u32 = 16;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The HLC value of the wall clock now, counter 0 (for a lone store).
pub fn wall_hlc() -> u64 {
    from_ms(wall_ms())
}

/// The HLC value at the start of millisecond `ms`.
pub fn from_ms(ms: u64) -> u64 {
    ms << COUNTER_BITS
}

/// The wall-clock milliseconds of an HLC value.
pub fn to_ms(hlc: u64) -> u64 {
    hlc >> COUNTER_BITS
}

/// One node's clock.
#[derive(Debug, Default)]
pub struct HlcClock {
    last: AtomicU64,
}

impl HlcClock {
    /// A timestamp greater than every one this clock has given or seen.
    pub fn now(&self) -> u64 {
        let wall = wall_hlc();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    /// Takes in a timestamp from another node.
    pub fn observe(&self, remote: u64) {
        self.last.fetch_max(remote, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_and_past_what_it_saw() {
        let c = HlcClock::default();
        let a = c.now();
        let b = c.now();
        assert!(b > a);
        let far = from_ms(to_ms(b) + 60_000);
        c.observe(far);
        assert!(c.now() > far, "a clock moves past a remote timestamp");
        assert!(to_ms(a).abs_diff(wall_ms()) < 5_000);
    }
}
