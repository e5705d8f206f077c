//! Named bindings in the replicated state: per scope, names bound to
//! opaque 16-byte ids. The node keeps a user's IMAP folders here (scope:
//! the user, name: the folder's name, id: the folder's id, which names its
//! messages and UID sequence), so that a folder is created, renamed and
//! deleted by one committed entry, the same on every node, and a rename
//! moves no message. Nothing here knows about mail.
//!
//! Every change is all or nothing, and checks what it expects: an unbind
//! or a rename names the id it expects each name to be bound to, so a
//! session acting on what it saw cannot undo another session's newer
//! change of the same name.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Longest scope.
pub const SCOPE_BYTES_MAX: usize = 512;
/// Longest name.
pub const NAME_BYTES_MAX: usize = 1024;
/// Names one scope holds at most.
pub const NAMES_PER_SCOPE_MAX: usize = 1000;
/// Bindings one command changes at most.
pub const NAMES_PER_COMMAND_MAX: usize = 1000;
/// Scopes held at most.
pub const SCOPES_MAX: usize = 1 << 22;

/// Every scope's bindings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Names {
    pub scopes: BTreeMap<String, BTreeMap<String, [u8; 16]>>,
}

/// Why a names command changed nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum NameError {
    #[error("a scope must be 1 to {SCOPE_BYTES_MAX} bytes and a name 1 to {NAME_BYTES_MAX}")]
    BadName,
    #[error("at most {NAMES_PER_COMMAND_MAX} names per command")]
    TooManyNames,
    #[error("{0:?} already exists")]
    Exists(String),
    #[error("{0:?} does not exist (or was changed meanwhile)")]
    Missing(String),
    #[error("at most {NAMES_PER_SCOPE_MAX} names in one scope")]
    Full,
    #[error("too many scopes ({SCOPES_MAX})")]
    TooManyScopes,
}

impl Names {
    pub fn get(&self, scope: &str) -> Option<&BTreeMap<String, [u8; 16]>> {
        self.scopes.get(scope)
    }

    /// Binds each name to its id. A name already bound to the same id is
    /// left as it is (a retry); bound to another, the whole command fails.
    pub fn bind(&mut self, scope: &str, items: &[(String, [u8; 16])]) -> Result<(), NameError> {
        check(scope, items.iter().map(|(n, _)| n.as_str()), items.len())?;
        let held = self.scopes.get(scope);
        if held.is_none() && self.scopes.len() >= SCOPES_MAX {
            return Err(NameError::TooManyScopes);
        }
        let mut added = 0;
        for (name, id) in items {
            match held.and_then(|h| h.get(name)) {
                Some(old) if old == id => {}
                Some(_) => return Err(NameError::Exists(name.clone())),
                None => added += 1,
            }
        }
        if held.map_or(0, BTreeMap::len) + added > NAMES_PER_SCOPE_MAX {
            return Err(NameError::Full);
        }
        let held = self.scopes.entry(scope.to_owned()).or_default();
        for (name, id) in items {
            held.insert(name.clone(), *id);
        }
        Ok(())
    }

    /// Removes each name, which must be bound to the id given.
    pub fn unbind(&mut self, scope: &str, items: &[(String, [u8; 16])]) -> Result<(), NameError> {
        check(scope, items.iter().map(|(n, _)| n.as_str()), items.len())?;
        let Some(held) = self.scopes.get_mut(scope) else {
            return match items.first() {
                Some((n, _)) => Err(NameError::Missing(n.clone())),
                None => Ok(()),
            };
        };
        if let Some((n, _)) = items.iter().find(|(n, id)| held.get(n) != Some(id)) {
            return Err(NameError::Missing(n.clone()));
        }
        for (name, _) in items {
            held.remove(name);
        }
        if held.is_empty() {
            self.scopes.remove(scope);
        }
        Ok(())
    }

    /// Renames at once: each `(from, id, to)` moves `id` from `from`
    /// (which must be bound to it) to `to` (which must be free, or be
    /// one of the names the command moves away).
    pub fn rename(&mut self, scope: &str, moves: &[(String, [u8; 16], String)]) -> Result<(), NameError> {
        check(
            scope,
            moves.iter().flat_map(|(f, _, t)| [f.as_str(), t.as_str()]),
            moves.len(),
        )?;
        let held = self.scopes.get(scope);
        let mut after: BTreeMap<String, [u8; 16]> = held.cloned().unwrap_or_default();
        for (from, id, _) in moves {
            if after.remove(from).as_ref() != Some(id) {
                return Err(NameError::Missing(from.clone()));
            }
        }
        for (_, id, to) in moves {
            if after.insert(to.clone(), *id).is_some() {
                return Err(NameError::Exists(to.clone()));
            }
        }
        if !moves.is_empty() {
            self.scopes.insert(scope.to_owned(), after);
        }
        Ok(())
    }
}

fn check<'a>(scope: &str, mut names: impl Iterator<Item = &'a str>, n: usize) -> Result<(), NameError> {
    if n > NAMES_PER_COMMAND_MAX {
        return Err(NameError::TooManyNames);
    }
    if scope.is_empty() || scope.len() > SCOPE_BYTES_MAX || names.any(|n| n.is_empty() || n.len() > NAME_BYTES_MAX) {
        return Err(NameError::BadName);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> String {
        x.to_owned()
    }

    #[test]
    fn bind_rename_unbind_check_what_they_expect() {
        let mut n = Names::default();
        n.bind("u", &[(s("a"), [1; 16]), (s("a/b"), [2; 16])]).unwrap();
        n.bind("u", &[(s("a"), [1; 16])]).expect("a retry is fine");
        assert_eq!(n.bind("u", &[(s("a"), [9; 16])]), Err(NameError::Exists(s("a"))));
        // A rename of a folder and its child, at once.
        n.rename("u", &[(s("a"), [1; 16], s("c")), (s("a/b"), [2; 16], s("c/b"))])
            .unwrap();
        let names: Vec<&String> = n.get("u").unwrap().keys().collect();
        assert_eq!(names, vec!["c", "c/b"]);
        // Stale expectations change nothing.
        assert_eq!(
            n.rename("u", &[(s("c"), [7; 16], s("d"))]),
            Err(NameError::Missing(s("c")))
        );
        assert_eq!(n.unbind("u", &[(s("c"), [7; 16])]), Err(NameError::Missing(s("c"))));
        n.bind("u", &[(s("x"), [3; 16])]).unwrap();
        assert_eq!(
            n.rename("u", &[(s("c"), [1; 16], s("x"))]),
            Err(NameError::Exists(s("x")))
        );
        assert_eq!(n.get("u").unwrap().len(), 3, "a refused rename changes nothing");
        // Swapping two names in one command is allowed.
        n.rename("u", &[(s("c"), [1; 16], s("x")), (s("x"), [3; 16], s("c"))])
            .unwrap();
        assert_eq!(n.get("u").unwrap()["x"], [1; 16]);
        n.unbind("u", &[(s("x"), [1; 16]), (s("c"), [3; 16]), (s("c/b"), [2; 16])])
            .unwrap();
        assert!(n.get("u").is_none(), "an empty scope goes");
    }

    #[test]
    fn limits() {
        let mut n = Names::default();
        let many: Vec<(String, [u8; 16])> = (0..NAMES_PER_SCOPE_MAX).map(|i| (format!("f{i}"), [0; 16])).collect();
        n.bind("u", &many).unwrap();
        assert_eq!(n.bind("u", &[(s("one-more"), [0; 16])]), Err(NameError::Full));
        assert_eq!(n.bind("u", &[(s(""), [0; 16])]), Err(NameError::BadName));
        assert_eq!(
            n.bind("u", &[("x".repeat(NAME_BYTES_MAX + 1), [0; 16])]),
            Err(NameError::BadName)
        );
    }
}
