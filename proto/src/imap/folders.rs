//! IMAP folders: the names clients give, the ids messages are kept under,
//! and the checks on both.
//!
//! A user's folders other than INBOX are named bindings in the Raft state
//! (scope `imap/{user}`, name → a random 16-byte id; see
//! `membership::names`). A message's `folder` is `INBOX` or the hex of its
//! folder's id, and so is the last part of the folder's UID sequence name:
//! renaming a folder changes one binding and neither its messages nor its
//! UIDVALIDITY. Subscriptions are bindings too (scope `imap-sub/{user}`).
//!
//! # Folders, MOVE and COPY across the cluster
//! A **folder** is a name bound to a random 16-byte id in the Raft state
//! (`membership::names`, scope `imap/{user}`); a message's `folder` is
//! `INBOX` or that id in hex, and so is the end of its UID sequence's name.
//! CREATE binds (and binds the missing levels above), RENAME moves the
//! bindings of the folder and those below it in one entry (no message is
//! touched, UIDVALIDITY is kept), DELETE unbinds, then deletes the folder's
//! messages and drops its sequence. Every names command names the id it
//! expects, so a session acting on a stale view cannot undo a newer change.
//! Subscriptions are bindings too (`imap-sub/{user}`). **MOVE** numbers the
//! messages in the destination's sequence first (for COPYUID, and so that a
//! session there gives them the same UIDs), then changes their folder
//! register, then forgets their UIDs in the source: a message keeps its id
//! and body, and moved back later it gets a new UID (forgotten numbers are
//! never given again). Two sessions moving one message to different folders
//! at once: the later move wins, the other destination shows it and then
//! expunges it. **COPY** stores new messages (bodies deduplicated by hash on
//! each node) with the source's flags, all or nothing (copies made before a
//! failure are deleted).

use std::collections::BTreeMap;

pub const INBOX: &str = "INBOX";
/// The hierarchy delimiter.
pub const DELIMITER: char = '/';
/// Longest folder name, in bytes.
pub const NAME_BYTES_MAX: usize = 255;
/// Deepest folder: levels of the hierarchy.
pub const DEPTH_MAX: usize = 16;
/// Folders one user has at most (INBOX aside): the Raft state's names
/// per scope (`membership::names::NAMES_PER_SCOPE_MAX`, checked equal by
/// the node).
pub const FOLDERS_MAX: usize = 1000;

/// The special-use folders (RFC 6154) every new user gets, by name, with
/// the attribute LIST shows for them.
pub const SPECIAL_USE: &[(&str, &str)] = &[
    ("Archive", "Archive"),
    ("Drafts", "Drafts"),
    ("Junk", "Junk"),
    ("Sent", "Sent"),
    ("Trash", "Trash"),
];

/// The special-use attribute of a folder (without its backslash): the
/// top-level folders named as [`SPECIAL_USE`] says.
pub fn special_use(name: &str) -> Option<&'static str> {
    SPECIAL_USE.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}

/// The scope of a user's folders.
pub fn scope(user: &str) -> String {
    format!("imap/{user}")
}

/// The scope of a user's subscriptions.
pub fn subscriptions(user: &str) -> String {
    format!("imap-sub/{user}")
}

/// A folder as a session resolved it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folder {
    pub name: String,
    /// What the folder's messages and UID sequence are kept under.
    pub id: String,
    /// The binding's id (zero for INBOX, which has none).
    pub raw: [u8; 16],
}

impl Folder {
    pub fn inbox() -> Self {
        Folder {
            name: INBOX.to_owned(),
            id: INBOX.to_owned(),
            raw: [0; 16],
        }
    }

    pub fn is_inbox(&self) -> bool {
        self.id == INBOX
    }
}

/// The id string of a folder binding.
pub fn id_string(id: &[u8; 16]) -> String {
    id.iter().map(|b| format!("{b:02x}")).collect()
}

/// The folder name a client's mailbox name means, or why it cannot be
/// one: UTF-8 (the modified UTF-7 of RFC 3501 is ASCII), INBOX in any
/// case is INBOX (and so is the INBOX prefix of its children), one
/// trailing delimiter is dropped (`CREATE a/` makes `a`), and the name
/// is bounded in length and depth, with no empty level and no wildcard.
pub fn canonical(raw: &[u8]) -> Result<String, &'static str> {
    let name = std::str::from_utf8(raw).map_err(|_| "a folder name must be UTF-8 (modified UTF-7)")?;
    let name = name.strip_suffix(DELIMITER).unwrap_or(name);
    if name.is_empty() {
        return Err("a folder name must not be empty");
    }
    if name.len() > NAME_BYTES_MAX {
        return Err("the folder name is too long (at most 255 bytes)");
    }
    if name.chars().any(|c| c.is_control() || c == '*' || c == '%') {
        return Err("a folder name must not hold wildcards or control characters");
    }
    let levels: Vec<&str> = name.split(DELIMITER).collect();
    if levels.len() > DEPTH_MAX {
        return Err("the folder is nested too deep (at most 16 levels)");
    }
    if levels.iter().any(|l| l.is_empty()) {
        return Err("a folder name must not have an empty level");
    }
    if levels[0].eq_ignore_ascii_case(INBOX) {
        let mut out = INBOX.to_owned();
        for l in &levels[1..] {
            out.push(DELIMITER);
            out.push_str(l);
        }
        return Ok(out);
    }
    Ok(name.to_owned())
}

/// The folder `name` (canonical) among a user's bindings.
pub fn resolve(names: &BTreeMap<String, [u8; 16]>, name: &str) -> Option<Folder> {
    if name == INBOX {
        return Some(Folder::inbox());
    }
    names.get(name).map(|raw| Folder {
        name: name.to_owned(),
        id: id_string(raw),
        raw: *raw,
    })
}

/// The levels above `name`: `a/b/c` → `a`, `a/b`.
pub fn superiors(name: &str) -> Vec<String> {
    name.match_indices(DELIMITER)
        .map(|(i, _)| name[..i].to_owned())
        .collect()
}

/// The bindings a rename of `from` to `to` moves: `from` and every folder
/// below it.
pub fn renames(names: &BTreeMap<String, [u8; 16]>, from: &str, to: &str) -> Vec<(String, [u8; 16], String)> {
    let below = format!("{from}{DELIMITER}");
    names
        .iter()
        .filter_map(|(n, id)| {
            if n == from {
                Some((n.clone(), *id, to.to_owned()))
            } else {
                n.strip_prefix(&below)
                    .map(|rest| (n.clone(), *id, format!("{to}{DELIMITER}{rest}")))
            }
        })
        .collect()
}

/// One LIST answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    /// Not a folder, only a level above some (`\Noselect`).
    pub noselect: bool,
    pub children: bool,
}

/// LIST: the folders (INBOX and `names`) and the levels above them that
/// `matches` accepts, INBOX first, then by name.
pub fn list(names: &BTreeMap<String, [u8; 16]>, matches: impl Fn(&str) -> bool) -> Vec<Listed> {
    let mut all: BTreeMap<String, bool> = BTreeMap::new();
    all.insert(INBOX.to_owned(), true);
    for n in names.keys() {
        for s in superiors(n) {
            all.entry(s).or_insert(false);
        }
        all.insert(n.clone(), true);
    }
    let mut out: Vec<Listed> = all
        .iter()
        .filter(|(n, _)| matches(n))
        .map(|(n, exists)| {
            let below = format!("{n}{DELIMITER}");
            Listed {
                name: n.clone(),
                noselect: !exists,
                children: all
                    .range(below.clone()..)
                    .next()
                    .is_some_and(|(c, _)| c.starts_with(&below)),
            }
        })
        .collect();
    out.sort_by(|a, b| (a.name != INBOX, &a.name).cmp(&(b.name != INBOX, &b.name)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_inbox_is_any_case() {
        assert_eq!(canonical(b"inbox").unwrap(), "INBOX");
        assert_eq!(canonical(b"Inbox/Sub").unwrap(), "INBOX/Sub");
        assert_eq!(canonical(b"Archive/").unwrap(), "Archive");
        assert_eq!(canonical(b"Sent").unwrap(), "Sent");
        assert!(canonical(b"").is_err());
        assert!(canonical(b"a//b").is_err());
        assert!(canonical(b"/a").is_err());
        assert!(canonical(b"a*").is_err());
        assert!(canonical(b"a\x01").is_err());
        assert!(canonical(&[0xff]).is_err());
        assert!(canonical("x".repeat(NAME_BYTES_MAX + 1).as_bytes()).is_err());
        assert!(canonical(vec!["a"; DEPTH_MAX + 1].join("/").as_bytes()).is_err());
        assert!(canonical(vec!["a"; DEPTH_MAX].join("/").as_bytes()).is_ok());
    }

    #[test]
    fn renames_move_children_and_list_shows_levels() {
        let names: BTreeMap<String, [u8; 16]> = [("a", 1u8), ("a/b", 2), ("ab", 3), ("x/y/z", 4)]
            .into_iter()
            .map(|(n, i)| (n.to_owned(), [i; 16]))
            .collect();
        let moves = renames(&names, "a", "c");
        assert_eq!(
            moves,
            vec![
                ("a".to_owned(), [1; 16], "c".to_owned()),
                ("a/b".to_owned(), [2; 16], "c/b".to_owned()),
            ],
            "ab is not below a"
        );
        let top = list(&names, |n| !n.contains('/'));
        let shown: Vec<(&str, bool, bool)> = top.iter().map(|l| (l.name.as_str(), l.noselect, l.children)).collect();
        assert_eq!(
            shown,
            vec![
                ("INBOX", false, false),
                ("a", false, true),
                ("ab", false, false),
                ("x", true, true)
            ]
        );
        assert_eq!(superiors("x/y/z"), vec!["x", "x/y"]);
        assert_eq!(resolve(&names, "a").unwrap().id, "01".repeat(16));
        assert!(resolve(&names, "nope").is_none());
        assert!(resolve(&names, INBOX).unwrap().is_inbox());
    }
}
