//! The IMAP keywords each folder has defined (feature level 3).
//!
//! RFC 3501 7.2.6: a FETCH may show a keyword only after a `FLAGS`
//! response listed it, and every session of a folder should be told the
//! same list. A keyword is defined for a folder the first time a session
//! uses or sees it, and stays defined (as in Dovecot and Cyrus) until the
//! folder goes: so a session that selects the folder later is told of a
//! keyword no message carries any more, as the sessions that saw it were.
//! Kept per sequence (folder) name, at most [`KEYWORDS_PER_FOLDER_MAX`]
//! each, only for sequences that exist: O(folders), not O(messages).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The feature level that brought folder keywords.
pub const KEYWORDS_FEATURE_LEVEL: u32 = 3;
/// Keywords one folder defines at most; past it new ones are not
/// defined (the `FLAGS` response stays bounded; IMAP's `\*` still lets a
/// client set them on messages).
pub const KEYWORDS_PER_FOLDER_MAX: usize = 256;
/// Longest keyword defined.
pub const KEYWORD_BYTES_MAX: usize = 128;

/// Defined keywords by sequence name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FolderKeywords {
    folders: BTreeMap<String, BTreeSet<String>>,
}

/// Whether `k` can be a keyword: an IMAP atom, not a system flag.
pub fn valid_keyword(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= KEYWORD_BYTES_MAX
        && k.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'(' | b')' | b'{' | b'%' | b'*' | b'"' | b'\\' | b']'))
}

impl FolderKeywords {
    /// Defines `keywords` for sequence `name` (which must exist: the
    /// caller checks). Invalid ones, ones defined already (keywords match
    /// without regard to case) and those past the bound are left out: the
    /// state machine applies this the same way on every node, and a
    /// keyword left undefined costs only its announcement.
    pub fn define(&mut self, name: &str, keywords: &[String]) {
        let set = self.folders.entry(name.to_owned()).or_default();
        for k in keywords {
            if set.len() >= KEYWORDS_PER_FOLDER_MAX {
                break;
            }
            if valid_keyword(k) && !set.iter().any(|d| d.eq_ignore_ascii_case(k)) {
                set.insert(k.clone());
            }
        }
        if set.is_empty() {
            self.folders.remove(name);
        }
    }

    /// The folder went (its sequence was dropped): its keywords go too.
    pub fn drop_folder(&mut self, name: &str) {
        self.folders.remove(name);
    }

    /// The keywords sequence `name` defines.
    pub fn get(&self, name: &str) -> Option<&BTreeSet<String>> {
        self.folders.get(name)
    }

    /// Folders with keywords defined.
    pub fn len(&self) -> usize {
        self.folders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.folders.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn keywords_are_defined_once_without_regard_to_case_and_bounded() {
        let mut f = FolderKeywords::default();
        f.define("a", &s(&["$Label1", "Work", "$label1", "bad word", "\\Seen", ""]));
        let got: Vec<&str> = f.get("a").unwrap().iter().map(String::as_str).collect();
        assert_eq!(got, ["$Label1", "Work"]);
        f.define("b", &s(&["bad(word"]));
        assert!(f.get("b").is_none(), "nothing valid: no entry");
        let many: Vec<String> = (0..KEYWORDS_PER_FOLDER_MAX + 10).map(|i| format!("k{i}")).collect();
        f.define("a", &many);
        assert_eq!(f.get("a").unwrap().len(), KEYWORDS_PER_FOLDER_MAX);
        f.drop_folder("a");
        assert!(f.is_empty());
    }
}
