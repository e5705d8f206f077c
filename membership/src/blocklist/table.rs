//! A blocklist's addresses as a sorted table of disjoint inclusive
//! ranges (IPv4 as `u32` pairs, IPv6 as `u128` pairs), read from text
//! (addresses, CIDR ranges, `a-b` ranges, rbldnsd `ip4set` lines), merged,
//! and encoded compactly (each range as the gap since the previous one and
//! its length, LEB128): a million scattered addresses take about 3 MB.
//! A lookup is a binary search.

use std::net::{IpAddr, Ipv4Addr};

/// The first byte of an encoded table (its format).
const FORMAT: u8 = 1;

/// Sorted, disjoint, non-adjacent inclusive ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeTable {
    pub v4: Vec<(u32, u32)>,
    pub v6: Vec<(u128, u128)>,
}

/// A line that is not an address, a range or a directive, by number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct LineError {
    pub line: usize,
    pub why: String,
}

/// Sorts and merges overlapping or adjacent ranges.
fn merge<T: Copy + Ord + num::Step>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if T::adjacent_or_over(last.1, a) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Removes `ex` (merged) from `inc` (merged).
fn subtract<T: Copy + Ord + num::Step>(inc: Vec<(T, T)>, ex: &[(T, T)]) -> Vec<(T, T)> {
    let mut out = Vec::with_capacity(inc.len());
    let mut j = 0;
    for (mut a, b) in inc {
        while j < ex.len() && ex[j].1 < a {
            j += 1;
        }
        let mut k = j;
        let mut alive = true;
        while k < ex.len() && ex[k].0 <= b {
            let (ea, eb) = ex[k];
            if ea > a {
                out.push((a, T::before(ea)));
            }
            if eb >= b {
                alive = false;
                break;
            }
            a = T::after(eb);
            k += 1;
        }
        if alive {
            out.push((a, b));
        }
    }
    out
}

mod num {
    pub trait Step: Sized {
        /// `next` starts at or before the end of `last`, plus one.
        fn adjacent_or_over(last: Self, next: Self) -> bool;
        fn before(x: Self) -> Self;
        fn after(x: Self) -> Self;
    }
    macro_rules! step {
        ($t:ty) => {
            impl Step for $t {
                fn adjacent_or_over(last: $t, next: $t) -> bool {
                    last == <$t>::MAX || next <= last + 1
                }
                fn before(x: $t) -> $t {
                    x - 1
                }
                fn after(x: $t) -> $t {
                    x + 1
                }
            }
        };
    }
    step!(u32);
    step!(u128);
}

/// One range of either family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Range {
    V4(u32, u32),
    V6(u128, u128),
}

/// An IPv4-mapped IPv6 address as IPv4 (a dual-stack listener's peers).
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// `1.2.3.4`, `1.2.3.0/24`, `1.2.3.4-1.2.3.10`, `1.2.3.4-10`, rbldnsd's
/// short prefixes (`10`, `10.1`, `10.1.2` for /8, /16, /24), and the same
/// for IPv6 (no short forms).
pub fn parse_range(s: &str) -> Result<Range, String> {
    let bad = || format!("{s:?} is not an address, a CIDR range or a range a-b");
    if let Some((a, b)) = s.split_once('-') {
        let a: IpAddr = a.trim().parse().map_err(|_| bad())?;
        let b = b.trim();
        let r = match (a, b.parse::<IpAddr>()) {
            (IpAddr::V4(a), Ok(IpAddr::V4(b))) => Range::V4(a.into(), b.into()),
            (IpAddr::V6(a), Ok(IpAddr::V6(b))) => Range::V6(a.into(), b.into()),
            (IpAddr::V4(a), Err(_)) => {
                let last: u8 = b.parse().map_err(|_| bad())?;
                let a = u32::from(a);
                Range::V4(a, (a & !0xff) | u32::from(last))
            }
            _ => return Err(bad()),
        };
        return match r {
            Range::V4(a, b) if a > b => Err(format!("{s:?}: the range ends before it starts")),
            Range::V6(a, b) if a > b => Err(format!("{s:?}: the range ends before it starts")),
            r => Ok(r),
        };
    }
    let (addr, bits) = match s.split_once('/') {
        Some((a, b)) => (a, Some(b.parse::<u32>().map_err(|_| bad())?)),
        None => (s, None),
    };
    let (ip, bits) = match addr.parse::<IpAddr>() {
        Ok(ip) => (ip, bits),
        Err(_) => {
            // rbldnsd: "10.1.2" is 10.1.2.0/24 (and with /n, that prefix).
            let parts: Vec<&str> = addr.split('.').collect();
            if parts.is_empty() || parts.len() > 3 {
                return Err(bad());
            }
            let mut octets = [0u8; 4];
            for (i, p) in parts.iter().enumerate() {
                octets[i] = p.parse().map_err(|_| bad())?;
            }
            let ip = IpAddr::V4(Ipv4Addr::from(octets));
            (ip, Some(bits.unwrap_or(8 * parts.len() as u32)))
        }
    };
    match ip {
        IpAddr::V4(a) => {
            let bits = bits.unwrap_or(32);
            if bits > 32 {
                return Err(format!("{s:?}: an IPv4 prefix is at most /32"));
            }
            let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
            let a = u32::from(a);
            if a & !mask != 0 {
                return Err(format!("{s:?}: bits set past the prefix length"));
            }
            Ok(Range::V4(a, a | !mask))
        }
        IpAddr::V6(a) => {
            let bits = bits.unwrap_or(128);
            if bits > 128 {
                return Err(format!("{s:?}: an IPv6 prefix is at most /128"));
            }
            let mask = if bits == 0 { 0 } else { u128::MAX << (128 - bits) };
            let a = u128::from(a);
            if a & !mask != 0 {
                return Err(format!("{s:?}: bits set past the prefix length"));
            }
            Ok(Range::V6(a, a | !mask))
        }
    }
}

impl RangeTable {
    /// Reads a list: one entry a line; blank lines and `#` or `;`
    /// comments skipped; rbldnsd's `$` directives (`$TTL`, `$SOA`, ...)
    /// and `:value` lines (the default answer) skipped; text after an
    /// entry (its answer) ignored; `!entry` excludes addresses from the
    /// rest. The first bad line refuses the whole list.
    pub fn parse(text: &str) -> Result<RangeTable, LineError> {
        let (mut v4, mut v6, mut x4, mut x6) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with(['#', ';', '$']) {
                continue;
            }
            // `:127.0.0.2:text` is rbldnsd's default answer; `::1` an entry.
            let first = line.split_whitespace().next().unwrap_or_default();
            if line.starts_with(':') && parse_range(first).is_err() {
                continue;
            }
            let (excluded, rest) = match line.strip_prefix('!') {
                Some(r) => (true, r.trim_start()),
                None => (false, line),
            };
            // The entry ends at white space; an IPv4 entry may carry its
            // answer after a colon (`1.2.3.4:127.0.0.2:text`).
            let token = rest.split_whitespace().next().unwrap_or_default();
            let r = parse_range(token)
                .or_else(|e| match token.split_once(':') {
                    Some((v4, _)) if v4.contains('.') => parse_range(v4),
                    _ => Err(e),
                })
                .map_err(|why| LineError { line: i + 1, why })?;
            match (r, excluded) {
                (Range::V4(a, b), false) => v4.push((a, b)),
                (Range::V4(a, b), true) => x4.push((a, b)),
                (Range::V6(a, b), false) => v6.push((a, b)),
                (Range::V6(a, b), true) => x6.push((a, b)),
            }
        }
        let (x4, x6) = (merge(x4), merge(x6));
        Ok(RangeTable {
            v4: subtract(merge(v4), &x4),
            v6: subtract(merge(v6), &x6),
        })
    }

    /// A table of these ranges, merged.
    pub fn from_ranges(v4: Vec<(u32, u32)>, v6: Vec<(u128, u128)>) -> RangeTable {
        RangeTable {
            v4: merge(v4),
            v6: merge(v6),
        }
    }

    /// The ranges held (both families).
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        fn find<T: Ord + Copy>(v: &[(T, T)], x: T) -> bool {
            let i = v.partition_point(|r| r.0 <= x);
            i > 0 && v[i - 1].1 >= x
        }
        match canonical(ip) {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => find(&self.v6, u128::from(a)),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + 3 * self.v4.len() + 8 * self.v6.len() + 20);
        out.push(FORMAT);
        put(&mut out, self.v4.len() as u128);
        let mut next = 0u128;
        for &(a, b) in &self.v4 {
            put(&mut out, u128::from(a) - next);
            put(&mut out, u128::from(b - a));
            next = u128::from(b) + 1;
        }
        put(&mut out, self.v6.len() as u128);
        let mut next: Option<u128> = Some(0);
        for &(a, b) in &self.v6 {
            put(&mut out, a - next.unwrap_or(0));
            put(&mut out, b - a);
            next = b.checked_add(1);
        }
        out
    }

    /// Reads what [`RangeTable::encode`] wrote, checking that the ranges
    /// are in order and disjoint; at most `ranges_max` of them.
    pub fn decode(bytes: &[u8], ranges_max: usize) -> Result<RangeTable, String> {
        let mut r = Reader { bytes, at: 0 };
        if r.byte()? != FORMAT {
            return Err("not a blocklist table of a format this release reads".into());
        }
        let n4 = r.count(ranges_max)?;
        let mut v4 = Vec::with_capacity(n4);
        let mut next = 0u128;
        for i in 0..n4 {
            let gap = r.num()?;
            if i > 0 && gap == 0 {
                return Err("adjacent ranges".into());
            }
            let a = next
                .checked_add(gap)
                .filter(|a| *a <= u128::from(u32::MAX))
                .ok_or("past the end")?;
            let b = a
                .checked_add(r.num()?)
                .filter(|b| *b <= u128::from(u32::MAX))
                .ok_or("past the end")?;
            v4.push((a as u32, b as u32));
            next = b + 1;
        }
        let n6 = r.count(ranges_max.saturating_sub(n4))?;
        let mut v6 = Vec::with_capacity(n6);
        let mut next: Option<u128> = Some(0);
        for i in 0..n6 {
            let gap = r.num()?;
            if i > 0 && gap == 0 {
                return Err("adjacent ranges".into());
            }
            let a = next.and_then(|n| n.checked_add(gap)).ok_or("past the end")?;
            let b = a.checked_add(r.num()?).ok_or("past the end")?;
            v6.push((a, b));
            next = b.checked_add(1);
        }
        if r.at != bytes.len() {
            return Err("bytes after the table".into());
        }
        Ok(RangeTable { v4, v6 })
    }
}

fn put(out: &mut Vec<u8>, mut x: u128) {
    loop {
        let b = (x & 0x7f) as u8;
        x >>= 7;
        if x == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.bytes.get(self.at).ok_or("a truncated table")?;
        self.at += 1;
        Ok(b)
    }

    fn num(&mut self) -> Result<u128, String> {
        let mut x = 0u128;
        for shift in (0..).step_by(7) {
            let b = self.byte()?;
            if shift > 126 || (shift == 126 && b > 0b11) {
                return Err("a number too large".into());
            }
            x |= u128::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        unreachable!()
    }

    fn count(&mut self, max: usize) -> Result<usize, String> {
        let n = self.num()?;
        if n > max as u128 {
            return Err(format!("more than {max} ranges"));
        }
        Ok(n as usize)
    }
}

/// An address as text for a reason (IPv4-mapped shown as IPv4).
pub fn show(ip: IpAddr) -> String {
    canonical(ip).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn lines_of_every_kind_are_read_and_merged() {
        let t = RangeTable::parse(
            "# a comment\n\n; another\n$TTL 300\n:127.0.0.2:Listed\n1.2.3.4\n1.2.3.5 :127.0.0.3:text\n\
             10.0.0.0/8\n10.1.0.0/16\n192.168.1.10-192.168.1.20\n192.168.1.21-30\n172.16\n\
             2001:db8::/32\n2001:db8::1 listed\n!10.0.0.7\n",
        )
        .unwrap();
        assert_eq!(
            t.v4,
            vec![
                (
                    u32::from(Ipv4Addr::new(1, 2, 3, 4)),
                    u32::from(Ipv4Addr::new(1, 2, 3, 5))
                ),
                (
                    u32::from(Ipv4Addr::new(10, 0, 0, 0)),
                    u32::from(Ipv4Addr::new(10, 0, 0, 6))
                ),
                (
                    u32::from(Ipv4Addr::new(10, 0, 0, 8)),
                    u32::from(Ipv4Addr::new(10, 255, 255, 255))
                ),
                (
                    u32::from(Ipv4Addr::new(172, 16, 0, 0)),
                    u32::from(Ipv4Addr::new(172, 16, 255, 255))
                ),
                (
                    u32::from(Ipv4Addr::new(192, 168, 1, 10)),
                    u32::from(Ipv4Addr::new(192, 168, 1, 30))
                ),
            ]
        );
        assert_eq!(t.v6.len(), 1);
        for yes in [
            "1.2.3.4",
            "1.2.3.5",
            "10.0.0.6",
            "10.0.0.8",
            "10.255.255.255",
            "192.168.1.30",
            "2001:db8::",
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            "::ffff:1.2.3.4",
        ] {
            assert!(t.contains(ip(yes)), "{yes}");
        }
        for no in [
            "1.2.3.3",
            "1.2.3.6",
            "10.0.0.7",
            "11.0.0.0",
            "9.255.255.255",
            "192.168.1.9",
            "192.168.1.31",
            "2001:db9::",
            "2001:db7:ffff::",
            "0.0.0.0",
            "255.255.255.255",
        ] {
            assert!(!t.contains(ip(no)), "{no}");
        }
    }

    #[test]
    fn a_bad_line_is_named_by_its_number() {
        for (text, line) in [
            ("1.2.3.4\nnot-an-address\n", 2),
            ("1.2.3.4/33\n", 1),
            ("\n\n1.2.3.9-1.2.3.1\n", 3),
            ("1.2.3.4/24\n", 1),
            ("1.2.3.4-1::\n", 1),
            ("# ok\n2001:db8::/129\n", 2),
        ] {
            let e = RangeTable::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
        }
    }

    #[test]
    fn edges_of_both_families() {
        let t = RangeTable::from_ranges(
            vec![(0, 0), (u32::MAX, u32::MAX), (5, 9), (7, 20), (21, 21)],
            vec![(0, 1), (u128::MAX - 1, u128::MAX)],
        );
        assert_eq!(t.v4, vec![(0, 0), (5, 21), (u32::MAX, u32::MAX)]);
        assert!(t.contains(ip("0.0.0.0")) && t.contains(ip("255.255.255.255")));
        assert!(!t.contains(ip("0.0.0.1")) && !t.contains(ip("0.0.0.22")));
        assert!(t.contains(ip("::1")) && !t.contains(ip("::2")));
        assert!(t.contains(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        let back = RangeTable::decode(&t.encode(), 100).unwrap();
        assert_eq!(back, t);
        assert!(RangeTable::decode(&t.encode(), 4).is_err(), "over the bound");
        let everything = RangeTable::parse("0.0.0.0/0\n::/0\n!::\n").unwrap();
        assert_eq!(everything.v4, vec![(0, u32::MAX)]);
        assert_eq!(everything.v6, vec![(1, u128::MAX)]);
        assert_eq!(RangeTable::decode(&everything.encode(), 10).unwrap(), everything);
    }

    #[test]
    fn damaged_encodings_are_refused() {
        let t = RangeTable::from_ranges(vec![(1, 2), (10, 12)], vec![]);
        let bytes = t.encode();
        assert!(RangeTable::decode(&bytes[..bytes.len() - 1], 10).is_err());
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(RangeTable::decode(&extra, 10).is_err());
        // A zero gap after the first range would make adjacent ranges.
        let mut adjacent = vec![FORMAT, 2, 1, 1, 0, 0, 0];
        assert!(RangeTable::decode(&adjacent, 10).is_err());
        adjacent[4] = 1;
        assert!(RangeTable::decode(&adjacent, 10).is_ok());
        assert!(RangeTable::decode(&[2, 0, 0], 10).is_err(), "unknown format");
    }

    #[test]
    fn a_million_scattered_addresses_stay_small() {
        let v4: Vec<(u32, u32)> = (0..1_000_000u32).map(|i| (i * 4096 + 7, i * 4096 + 7)).collect();
        let t = RangeTable::from_ranges(v4, vec![]);
        let bytes = t.encode();
        assert!(bytes.len() < 4_000_000, "{} bytes", bytes.len());
        let back = RangeTable::decode(&bytes, 4_000_000).unwrap();
        let started = std::time::Instant::now();
        let hits = (0..1_000_000u32)
            .filter(|i| back.contains(IpAddr::V4(Ipv4Addr::from(i.wrapping_mul(2_654_435_761)))))
            .count();
        println!(
            "1M lookups in a 1M-range table: {:?} ({hits} hits), {} bytes encoded",
            started.elapsed(),
            bytes.len()
        );
        assert!(back.contains(IpAddr::V4(Ipv4Addr::from(4096 * 500 + 7))));
        assert!(!back.contains(IpAddr::V4(Ipv4Addr::from(4096 * 500 + 8))));
    }
}
