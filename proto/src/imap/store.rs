//! STORE (RFC 3501 6.4.6): the flag register changes one STORE makes on
//! one message. Keywords are case-insensitive: a change goes to the
//! register the message already has under another case; only what changes
//! is sent; a message keeps at most [`super::FLAGS_PER_MESSAGE_MAX`]
//! registers.

use imap_next::imap_types::flag::StoreType;

use super::{FLAGS_PER_MESSAGE_MAX, Message};

/// Why a STORE is refused.
pub const TOO_MANY_FLAGS: &str = "a message keeps at most 64 flags (set or cleared)";

/// The changes `(register name, set)` that `kind` with `names` makes on
/// `m`; `Err` with the reason when the message would keep too many
/// registers.
pub fn edits<M: Message>(m: &M, kind: StoreType, names: &[String]) -> Result<Vec<(String, bool)>, &'static str> {
    let registers = m.registers();
    let mark = |name: &str, set: bool| {
        let stored = registers
            .iter()
            .find(|(f, _)| f.eq_ignore_ascii_case(name))
            .map_or_else(|| name.to_owned(), |(f, _)| (*f).to_owned());
        (stored, set)
    };
    let mut edits: Vec<(String, bool)> = match kind {
        StoreType::Add | StoreType::Replace => names.iter().map(|n| mark(n, true)).collect(),
        StoreType::Remove => names.iter().map(|n| mark(n, false)).collect(),
    };
    if kind == StoreType::Replace {
        for old in m.flags() {
            if !names.iter().any(|n| n.eq_ignore_ascii_case(old)) {
                edits.push(mark(old, false));
            }
        }
    }
    // Only what changes (a STORE that changes nothing sends nothing).
    edits.retain(|(name, set)| m.has(name) != *set);
    let fresh = edits
        .iter()
        .filter(|(name, _)| !registers.iter().any(|(f, _)| f == name))
        .count();
    if registers.len() + fresh > FLAGS_PER_MESSAGE_MAX {
        return Err(TOO_MANY_FLAGS);
    }
    Ok(edits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::testing::TestMsg;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn store_kinds() {
        let m = TestMsg::new(1, &["\\Seen", "$Case"]);
        assert_eq!(edits(&m, StoreType::Add, &names(&["\\Seen"])), Ok(vec![]));
        assert_eq!(
            edits(&m, StoreType::Add, &names(&["\\Flagged"])),
            Ok(vec![("\\Flagged".into(), true)])
        );
        // Another case of a keyword changes the register it has.
        assert_eq!(
            edits(&m, StoreType::Remove, &names(&["$CASE"])),
            Ok(vec![("$Case".into(), false)])
        );
        assert_eq!(
            edits(&m, StoreType::Replace, &names(&["\\Draft"])),
            Ok(vec![
                ("\\Draft".into(), true),
                ("\\Seen".into(), false),
                ("$Case".into(), false)
            ])
        );
    }

    #[test]
    fn registers_are_bounded() {
        let flags: Vec<String> = (0..FLAGS_PER_MESSAGE_MAX).map(|i| format!("k{i}")).collect();
        let refs: Vec<&str> = flags.iter().map(String::as_str).collect();
        let m = TestMsg::new(1, &refs);
        assert_eq!(edits(&m, StoreType::Add, &names(&["one-more"])), Err(TOO_MANY_FLAGS));
        assert_eq!(edits(&m, StoreType::Remove, &names(&["k1"])).map(|e| e.len()), Ok(1));
    }
}
