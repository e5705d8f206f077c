//! Events counted per client address in fixed windows (failed logins,
//! unknown recipients), in bounded memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Addresses tracked at most; the table is emptied when full (memory stays
/// bounded under many sources).
const ADDRESSES_MAX: usize = 100_000;

/// Per address: events in the current window, and when it began.
#[derive(Debug, Default)]
pub struct Windows(Mutex<HashMap<IpAddr, (u32, Instant)>>);

impl Windows {
    /// Counts one event for `ip` in a window of `window`.
    pub fn count(&self, ip: IpAddr, window: Duration) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if table.len() >= ADDRESSES_MAX {
            table.clear();
        }
        let e = table.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    /// Whether `ip` has counted `max` events in its current window.
    pub fn full(&self, ip: IpAddr, max: u32, window: Duration) -> bool {
        let table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        table
            .get(&ip)
            .is_some_and(|(n, since)| *n >= max && since.elapsed() < window)
    }
}
