//! The units of command-line values: sizes (`50MiB`, `10MB`) and
//! durations (`30s`, `500ms`, `5m`, `120h`).

use std::time::Duration;

use anyhow::{Context, bail};

/// A size to bytes: `123`, `10KB`/`10MB`/`10GB`/`1TB` (powers of 1000),
/// `10K`/`10KiB`, `500M`/`500MiB`, `2G`/`2GiB`, `1T`/`1TiB` (powers of 1024);
/// units in any case, a space before them allowed.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        other => bail!("not a size: {s:?} (unknown unit {other:?}; use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("not a size: {s:?} (a whole number, then an optional unit such as MB or MiB)"))?;
    n.checked_mul(mult).with_context(|| format!("size too large: {s:?}"))
}

/// [`parse_size`] for clap.
pub fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// A duration: a number and a unit, ms, s, m or h (`30s`, `500ms`, `5m`).
pub fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (ms, s, m, h)"))?;
    let ms = match unit.trim() {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        use super::parse_size;
        for (s, want) in [
            ("123", 123),
            ("10K", 10240),
            ("2g", 2 << 30),
            ("10MB", 10_000_000),
            ("10 MB", 10_000_000),
            ("10mb", 10_000_000),
            ("10MiB", 10 << 20),
            ("1GB", 1_000_000_000),
            ("1GiB", 1 << 30),
            ("5KB", 5_000),
            ("5KiB", 5 << 10),
            ("7B", 7),
        ] {
            assert_eq!(parse_size(s).unwrap(), want, "{s}");
        }
        for bad in ["x", "", "MB", "10XB", "1.5G", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(parse_size("10XB").unwrap_err().to_string().contains("unknown unit"));
    }
}
