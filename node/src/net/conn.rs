//! Bounded line reading with an idle deadline (the line protocols and
//! DATA), and the per-client-address connection count (the admin port).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use quill_proto::line::LineSplitter;
pub use quill_proto::line::{Line, trim_eol};

/// Reads one line of at most `max_bytes` (terminator included); the whole
/// line must arrive within `idle` (not each chunk of it: a client sending a
/// byte a second cannot hold a session open past the deadline). Memory is
/// bounded by `max_bytes` whatever the client sends; where the line ends
/// is the protocol cores' [`LineSplitter`]'s decision.
pub async fn read_line<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max_bytes: usize,
    idle: Duration,
) -> std::io::Result<Line> {
    let deadline = tokio::time::Instant::now() + idle;
    let mut splitter = LineSplitter::new(max_bytes);
    loop {
        let available = match tokio::time::timeout_at(deadline, reader.fill_buf()).await {
            Err(_) => return Ok(Line::Idle),
            Ok(r) => r?,
        };
        if available.is_empty() {
            return Ok(Line::Eof);
        }
        let (n, line) = splitter.push(available);
        reader.consume(n);
        if let Some(line) = line {
            return Ok(line);
        }
    }
}

/// Counts open connections per client address, to refuse one address that
/// tries to take them all.
#[derive(Debug, Default)]
pub struct PerAddress {
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// Held while a connection is open; gives its slot back when dropped.
#[derive(Debug)]
pub struct AddressSlot {
    owner: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    /// Takes a slot for `ip` unless it already has `max` connections.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr, max: u32) -> Option<AddressSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::BufReader;

    async fn lines(input: &[u8], max: usize) -> Vec<Line> {
        let mut r = BufReader::with_capacity(4, input);
        let mut out = Vec::new();
        loop {
            let l = read_line(&mut r, max, Duration::from_secs(1)).await.unwrap();
            let end = l == Line::Eof;
            out.push(l);
            if end {
                return out;
            }
        }
    }

    #[tokio::test]
    async fn bounded_lines() {
        assert_eq!(
            lines(b"ab\r\ncdefghij\r\nk\npartial", 6).await,
            vec![
                Line::Ok(b"ab\r\n".to_vec()),
                Line::TooLong { crlf: true },
                Line::Ok(b"k\n".to_vec()),
                Line::Eof
            ]
        );
        assert_eq!(
            lines(b"123456\n", 7).await,
            vec![Line::Ok(b"123456\n".to_vec()), Line::Eof]
        );
        assert_eq!(
            lines(b"1234567\n", 7).await,
            vec![Line::TooLong { crlf: false }, Line::Eof]
        );
        // The CR and LF arrive in different chunks (capacity 4).
        assert_eq!(
            lines(b"1234567\r\n", 7).await,
            vec![Line::TooLong { crlf: true }, Line::Eof]
        );
        assert_eq!(
            lines(b"123456789\r\n", 7).await,
            vec![Line::TooLong { crlf: true }, Line::Eof]
        );
    }

    #[test]
    fn per_address_limit() {
        let p = Arc::new(PerAddress::default());
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let a = p.acquire(ip, 2).unwrap();
        let _b = p.acquire(ip, 2).unwrap();
        assert!(p.acquire(ip, 2).is_none());
        drop(a);
        assert!(p.acquire(ip, 2).is_some());
    }
}
