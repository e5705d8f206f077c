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

/// The set of `uids` (any order, repeats allowed), `None` when empty:
/// what a VANISHED response names.
pub fn uid_set(uids: &[u32]) -> Option<SequenceSet> {
    set_of_ranges(uids.iter().map(|u| (*u, *u)).collect())
}

/// The set of inclusive ranges (any order, overlapping allowed; 0 is left
/// out), merged, `None` when empty.
pub fn set_of_ranges(mut ranges: Vec<(u32, u32)>) -> Option<SequenceSet> {
    ranges.retain(|r| r.1 >= r.0.max(1));
    ranges.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        let lo = lo.max(1);
        match merged.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => merged.push((lo, hi)),
        }
    }
    let v = |n: u32| SeqOrUid::Value(std::num::NonZeroU32::new(n).expect("above 0"));
    let seqs: Vec<Sequence> = merged
        .into_iter()
        .map(|(lo, hi)| {
            if lo == hi {
                Sequence::Single(v(lo))
            } else {
                Sequence::Range(v(lo), v(hi))
            }
        })
        .collect();
    imap_next::imap_types::core::Vec1::try_from(seqs).ok().map(SequenceSet)
}

/// The UIDs from 1 to `up_to` that `set` names (all of them for `None`;
/// `*` is `up_to`) and that are not in `present` (sorted, ascending), as
/// ranges: a QRESYNC client's known UIDs that no longer exist. Walks the
/// set's ranges and `present`, never the UIDs a range spans.
pub fn missing_ranges(set: Option<&SequenceSet>, up_to: u32, present: &[u32]) -> Vec<(u32, u32)> {
    let v = |s: &SeqOrUid| match s {
        SeqOrUid::Value(x) => x.get(),
        SeqOrUid::Asterisk => up_to,
    };
    let ranges: Vec<(u32, u32)> = match set {
        None => vec![(1, up_to)],
        Some(set) => set
            .0
            .as_ref()
            .iter()
            .map(|s| match s {
                Sequence::Single(a) => (v(a), v(a)),
                Sequence::Range(a, b) => (v(a).min(v(b)), v(a).max(v(b))),
            })
            .collect(),
    };
    let mut out = Vec::new();
    for (lo, hi) in ranges {
        let hi = hi.min(up_to);
        let mut n = lo.max(1);
        let first = present.partition_point(|p| *p < n);
        for &p in &present[first..] {
            if p > hi {
                break;
            }
            if n < p {
                out.push((n, p - 1));
            }
            n = p + 1;
        }
        if n <= hi {
            out.push((n, hi));
        }
    }
    out
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

    fn written(s: Option<SequenceSet>) -> String {
        let Some(s) = s else { return String::new() };
        let v = |x: &SeqOrUid| match x {
            SeqOrUid::Value(n) => n.to_string(),
            SeqOrUid::Asterisk => "*".into(),
        };
        s.0.as_ref()
            .iter()
            .map(|q| match q {
                Sequence::Single(a) => v(a),
                Sequence::Range(a, b) => format!("{}:{}", v(a), v(b)),
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    #[test]
    fn vanished_sets_are_ranges_of_what_is_missing() {
        assert_eq!(written(uid_set(&[])), "");
        assert_eq!(written(uid_set(&[7, 3, 4, 5, 9, 4])), "3:5,7,9");
        assert_eq!(written(set_of_ranges(vec![(5, 9), (1, 2), (3, 4), (0, 0)])), "1:9");
        let present = [2, 3, 7, 10];
        assert_eq!(written(set_of_ranges(missing_ranges(None, 10, &present))), "1,4:6,8:9");
        // The client's set bounds it; `*` and ranges past UIDNEXT stop at
        // the last UID given.
        let s = set("5:*,1");
        assert_eq!(
            written(set_of_ranges(missing_ranges(Some(&s), 12, &present))),
            "1,5:6,8:9,11:12"
        );
        let huge = set("1:4294967295");
        assert_eq!(
            missing_ranges(Some(&huge), 1_000_000, &[500_000]),
            vec![(1, 499_999), (500_001, 1_000_000)]
        );
        assert!(missing_ranges(None, 0, &[]).is_empty());
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
