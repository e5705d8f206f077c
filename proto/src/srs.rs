//! The Sender Rewriting Scheme, for mail forwarded to another domain: the
//! envelope sender becomes an address of ours that only we can have made,
//! so the destination's SPF check passes, and a bounce sent to it comes
//! back here to be sent on to the original sender.
//!
//! The forms are those of libsrs2 and postsrsd (the "guarded" scheme):
//! - `SRS0=HHHH=TT=domain=local@forwarder`: `local@domain` forwarded once;
//! - `SRS1=HHHH=first-forwarder==HHHH=TT=domain=local@forwarder`: an SRS0
//!   address of another forwarder forwarded again (the bounce goes back to
//!   that forwarder, which undoes its own SRS0).
//!
//! `HHHH` is a keyed hash (blake3, the key in the Raft state) of the rest
//! of the address, in lower case (mail systems change the case of local
//! parts), four base-32 characters; `TT` is the day it was made, modulo
//! 1024, two base-32 characters. An address older than [`MAX_AGE_DAYS`]
//! or with a hash that does not match is refused: nobody can use our
//! domain to send a bounce where they like.

/// How long a rewritten address is honoured for bounces.
pub const MAX_AGE_DAYS: u32 = 21;
const HASH_CHARS: usize = 4;
const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SrsError {
    #[error("not an SRS address")]
    NotSrs,
    #[error("malformed SRS address")]
    Malformed,
    #[error("SRS address with a wrong hash")]
    BadHash,
    #[error("SRS address expired")]
    Expired,
}

/// Whether a local part looks like SRS (either form, any case).
pub fn is_srs(local: &str) -> bool {
    let l = local.as_bytes();
    l.len() > 5 && (l[..5].eq_ignore_ascii_case(b"SRS0=") || l[..5].eq_ignore_ascii_case(b"SRS1="))
}

fn hash(key: &[u8; 32], parts: &[&str]) -> String {
    let mut h = blake3::Hasher::new_keyed(key);
    for p in parts {
        h.update(p.to_ascii_lowercase().as_bytes());
        h.update(b"\0");
    }
    let out = h.finalize();
    out.as_bytes()[..HASH_CHARS]
        .iter()
        .map(|b| ALPHABET[(*b & 31) as usize] as char)
        .collect()
}

fn stamp(day: u32) -> String {
    let t = day % 1024;
    [ALPHABET[(t >> 5) as usize] as char, ALPHABET[(t & 31) as usize] as char]
        .iter()
        .collect()
}

fn unstamp(tt: &str) -> Option<u32> {
    let b = tt.as_bytes();
    if b.len() != 2 {
        return None;
    }
    let v = |c: u8| {
        ALPHABET
            .iter()
            .position(|a| *a == c.to_ascii_lowercase())
            .map(|p| p as u32)
    };
    Some(v(b[0])? << 5 | v(b[1])?)
}

fn constant_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| {
            acc | (x.to_ascii_lowercase() ^ y.to_ascii_lowercase())
        }) == 0
}

/// The envelope sender for `sender`'s mail forwarded by `forwarder` (one
/// of our domains) on `day` (days since 1970). The null sender and an
/// address without a domain stay as they are.
pub fn forward(key: &[u8; 32], sender: &str, forwarder: &str, day: u32) -> String {
    let Some((local, domain)) = sender.rsplit_once('@') else {
        return sender.to_owned();
    };
    if local.is_empty() || domain.is_empty() {
        return sender.to_owned();
    }
    if domain.eq_ignore_ascii_case(forwarder) {
        // Already ours (including our own SRS addresses): nothing to hide.
        return sender.to_owned();
    }
    let l = local.as_bytes();
    if l.len() > 5 && l[..5].eq_ignore_ascii_case(b"SRS0=") {
        // Another forwarder's SRS0: point back to it.
        let rest = &local[4..]; // "=HHHH=TT=domain=local"
        let h = hash(key, &[domain, rest]);
        return format!("SRS1={h}={domain}={rest}@{forwarder}");
    }
    if l.len() > 5 && l[..5].eq_ignore_ascii_case(b"SRS1=") {
        // Already SRS1: keep its first forwarder and payload, sign anew.
        if let Some((first, rest)) = local[5..].split_once('=').and_then(|(_, r)| r.split_once("=="))
            && !first.is_empty()
            && !rest.is_empty()
        {
            let rest = format!("={rest}");
            let h = hash(key, &[first, &rest]);
            return format!("SRS1={h}={first}={rest}@{forwarder}");
        }
    }
    let tt = stamp(day);
    let h = hash(key, &[&tt, domain, local]);
    format!("SRS0={h}={tt}={domain}={local}@{forwarder}")
}

/// Where a bounce to the SRS address with local part `local` goes, if we
/// made it (hash) within [`MAX_AGE_DAYS`] of `day`.
pub fn reverse(key: &[u8; 32], local: &str, day: u32) -> Result<String, SrsError> {
    if !is_srs(local) {
        return Err(SrsError::NotSrs);
    }
    let (kind, body) = local.split_at(4);
    let body = &body[1..];
    if kind.eq_ignore_ascii_case("SRS0") {
        let mut it = body.splitn(4, '=');
        let (Some(h), Some(tt), Some(domain), Some(user)) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(SrsError::Malformed);
        };
        if domain.is_empty() || user.is_empty() {
            return Err(SrsError::Malformed);
        }
        if !constant_eq(h, &hash(key, &[tt, domain, user])) {
            return Err(SrsError::BadHash);
        }
        let made = unstamp(tt).ok_or(SrsError::Malformed)?;
        let age = (day % 1024 + 1024 - made) % 1024;
        if age > MAX_AGE_DAYS {
            return Err(SrsError::Expired);
        }
        return Ok(format!("{user}@{domain}"));
    }
    // SRS1=HHHH=first==rest: back to the first forwarder's SRS0.
    let (h, after) = body.split_once('=').ok_or(SrsError::Malformed)?;
    let (first, rest) = after.split_once("==").ok_or(SrsError::Malformed)?;
    if first.is_empty() || rest.is_empty() {
        return Err(SrsError::Malformed);
    }
    let rest = format!("={rest}");
    if !constant_eq(h, &hash(key, &[first, &rest])) {
        return Err(SrsError::BadHash);
    }
    Ok(format!("SRS0{rest}@{first}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [9; 32];

    #[test]
    fn a_forwarded_sender_comes_back_for_its_bounce() {
        let s = forward(&KEY, "Alice@Sender.example", "fwd.example", 20_000);
        assert!(s.starts_with("SRS0="), "{s}");
        assert!(s.ends_with("=Sender.example=Alice@fwd.example"), "{s}");
        let local = s.rsplit_once('@').unwrap().0;
        assert_eq!(reverse(&KEY, local, 20_000).unwrap(), "Alice@Sender.example");
        // Case changed on the way (a relay lower-cased it): still ours.
        assert_eq!(
            reverse(&KEY, &local.to_ascii_lowercase(), 20_005).unwrap(),
            "alice@sender.example"
        );
        // Too old, wrong key, tampered, not SRS.
        assert_eq!(reverse(&KEY, local, 20_000 + MAX_AGE_DAYS + 1), Err(SrsError::Expired));
        assert_eq!(reverse(&[1; 32], local, 20_000), Err(SrsError::BadHash));
        let forged = local.replace("Alice", "Mallory");
        assert_eq!(reverse(&KEY, &forged, 20_000), Err(SrsError::BadHash));
        assert_eq!(reverse(&KEY, "alice", 20_000), Err(SrsError::NotSrs));
        assert_eq!(reverse(&KEY, "SRS0=abcd", 20_000), Err(SrsError::Malformed));
        // The day counter wraps at 1024 without refusing fresh addresses.
        let s = forward(&KEY, "a@b.example", "fwd.example", 1023);
        let local = s.rsplit_once('@').unwrap().0;
        assert_eq!(reverse(&KEY, local, 1025).unwrap(), "a@b.example");
    }

    #[test]
    fn null_and_local_senders_stay_and_srs0_becomes_srs1() {
        assert_eq!(forward(&KEY, "", "fwd.example", 1), "");
        assert_eq!(forward(&KEY, "x@fwd.example", "fwd.example", 1), "x@fwd.example");
        let other = "SRS0=abcd=ab=orig.example=bob@first.example";
        let s = forward(&KEY, other, "fwd.example", 1);
        assert!(s.starts_with("SRS1="), "{s}");
        assert!(
            s.ends_with("=first.example==abcd=ab=orig.example=bob@fwd.example"),
            "{s}"
        );
        let local = s.rsplit_once('@').unwrap().0;
        assert_eq!(
            reverse(&KEY, local, 500).unwrap(),
            "SRS0=abcd=ab=orig.example=bob@first.example"
        );
        // SRS1 forwarded again stays SRS1, to the same first forwarder.
        let again = forward(&[3; 32], &s, "third.example", 1);
        assert!(
            again.starts_with("SRS1=") && again.contains("=first.example==abcd="),
            "{again}"
        );
        let local = again.rsplit_once('@').unwrap().0;
        assert_eq!(
            reverse(&[3; 32], local, 1).unwrap(),
            "SRS0=abcd=ab=orig.example=bob@first.example"
        );
    }
}
