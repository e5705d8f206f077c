//! Sequence sets (RFC 3501 9) and LIST patterns (RFC 3501 6.3.8), matched
//! without walking what they span: a client's `1:4294967295` or a pattern
//! of a thousand wildcards costs no more than a short one.

use imap_next::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};

use super::Message;

/// Whether `n` is in the set, `*` being `largest` (RFC 3501 9: `n:*`
/// includes the largest even when n is above it). Walks the set, never the
/// numbers it spans.
pub fn set_contains(set: &SequenceSet, n: u32, largest: u32) -> bool {
    let v = |s: &SeqOrUid| match s {
        SeqOrUid::Value(x) => x.get(),
        SeqOrUid::Asterisk => largest,
    };
    set.0.as_ref().iter().any(|s| match s {
        Sequence::Single(a) => v(a) == n,
        Sequence::Range(a, b) => {
            let (lo, hi) = (v(a).min(v(b)), v(a).max(v(b)));
            lo <= n && n <= hi
        }
    })
}

/// What `*` stands for in a selected folder: its highest UID, or its
/// number of messages.
pub fn largest<M: Message>(msgs: &[M], uid: bool) -> u32 {
    if uid {
        msgs.last().map_or(0, |m| m.uid())
    } else {
        msgs.len() as u32
    }
}

/// The positions (0-based) of the messages a set names, by UID or by
/// message number.
pub fn selected<M: Message>(msgs: &[M], set: &SequenceSet, uid: bool) -> Vec<usize> {
    let largest = largest(msgs, uid);
    (0..msgs.len())
        .filter(|i| set_contains(set, if uid { msgs[*i].uid() } else { *i as u32 + 1 }, largest))
        .collect()
}

/// IMAP LIST matching: `*` matches anything, `%` anything but `/`;
/// INBOX case-insensitively. Dynamic programming over (pattern, name)
/// positions: a pattern of many wildcards cannot make it backtrack
/// exponentially.
pub fn wildcard_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    if p.len() > 1024 {
        return false;
    }
    // ok[j]: the pattern so far matches name[..j].
    let mut ok = vec![false; n.len() + 1];
    ok[0] = true;
    for &c in p {
        let mut next = vec![false; n.len() + 1];
        match c {
            b'*' | b'%' => {
                for j in 0..=n.len() {
                    // Either the wildcard ends here, or it goes on over n[j-1].
                    next[j] = ok[j] || (j > 0 && next[j - 1] && (c == b'*' || n[j - 1] != b'/'));
                }
            }
            _ => {
                for j in 1..=n.len() {
                    next[j] = ok[j - 1] && n[j - 1].eq_ignore_ascii_case(&c);
                }
            }
        }
        ok = next;
    }
    ok[n.len()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::testing::TestMsg;

    fn set(s: &str) -> SequenceSet {
        SequenceSet::try_from(s).unwrap()
    }

    #[test]
    fn sets_match_without_walking_their_span() {
        assert!(set_contains(&set("1:*"), 7, 7));
        assert!(set_contains(&set("4294967295"), 4_294_967_295, 3));
        assert!(!set_contains(&set("2,4:6"), 3, 10));
        assert!(set_contains(&set("6:4"), 5, 10));
        // n:* with n above the largest still names the largest.
        assert!(set_contains(&set("9:*"), 5, 5));
        assert!(!set_contains(&set("9:*"), 4, 5));
        let msgs = vec![TestMsg::new(3, &[]), TestMsg::new(8, &[]), TestMsg::new(9, &[])];
        assert_eq!(selected(&msgs, &set("8:*"), true), vec![1, 2]);
        assert_eq!(selected(&msgs, &set("2"), false), vec![1]);
        assert_eq!(largest(&msgs, true), 9);
    }

    #[test]
    fn list_patterns() {
        assert!(wildcard_match("*", "INBOX"));
        assert!(wildcard_match("%", "INBOX"));
        assert!(wildcard_match("inbox", "INBOX"));
        assert!(wildcard_match("IN*", "INBOX"));
        assert!(!wildcard_match("Sent", "INBOX"));
        assert!(!wildcard_match("INBOX/%", "INBOX"));
        assert!(wildcard_match("I%X", "INBOX"));
        assert!(!wildcard_match("%", "a/b"));
        assert!(wildcard_match("*", "a/b"));
        assert!(wildcard_match("", ""));
        // Many wildcards: linear, not exponential.
        let many = "*".repeat(1000) + "Z";
        assert!(!wildcard_match(&many, "INBOX"));
        assert!(wildcard_match(&"%".repeat(1000), "INBOX"));
    }
}
