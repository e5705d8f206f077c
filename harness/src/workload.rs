//! Deterministic test messages: sizes around a 4.7 KB mean with a long tail,
//! each with a unique Message-ID so it can be recognised when read back.

/// The workloads' generator: testkit's splitmix64, with the seed mixed as
/// the workloads always did (so a seed gives the same load as before).
#[derive(Debug, Clone)]
pub struct Rng(testkit::Rng);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(testkit::Rng::new(seed ^ 0x9e37_79b9_7f4a_7c15))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// A message size: 98 % between 1 and 7.5 KiB, 2 % between 10 and 40 KiB
/// (mean about 4.7 KB, like Porcupine's workload).
pub fn message_size(rng: &mut Rng) -> usize {
    if rng.range(0, 100) < 98 {
        rng.range(1024, 7680) as usize
    } else {
        rng.range(10 * 1024, 40 * 1024) as usize
    }
}

/// A plain-text message of about `size` bytes with a unique Message-ID.
/// Some lines start with a dot, to exercise transparency.
pub fn message(rng: &mut Rng, seq: u64, from: &str, to: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: quill harness message {seq}\r\n\
         Message-ID: <{seq}.{:016x}@harness.quill.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\r\n",
        rng.next_u64()
    )
    .into_bytes();
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .";
    while m.len() < size {
        let n = (size - m.len()).clamp(1, 78);
        for i in 0..n {
            let c = ALPHABET[(rng.next_u64() % ALPHABET.len() as u64) as usize];
            m.push(if i == 0 && c == b' ' { b'x' } else { c });
        }
        m.extend_from_slice(b"\r\n");
    }
    m
}

/// The Message-ID's sequence number of a message made by [`message`].
pub fn seq_of(msg: &[u8]) -> Option<u64> {
    let text = String::from_utf8_lossy(&msg[..msg.len().min(4096)]);
    let line = text.lines().find(|l| l.starts_with("Message-ID: <"))?;
    line["Message-ID: <".len()..].split('.').next()?.parse().ok()
}

/// p-th percentile (0..=100) of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_ids() {
        let mut rng = Rng::new(1);
        let n = 20_000;
        let total: usize = (0..n).map(|_| message_size(&mut rng)).sum();
        let mean = total as f64 / n as f64;
        assert!((4300.0..5100.0).contains(&mean), "mean size {mean}");
        let m = message(&mut rng, 42, "a@x.test", "b@y.test", 3000);
        assert!(m.len() >= 3000 && m.len() < 3100);
        assert_eq!(seq_of(&m), Some(42));
    }
}
