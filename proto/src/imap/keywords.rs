//! Keywords a session has been told of (RFC 3501 7.2.6): a FETCH may show
//! a keyword only after a `FLAGS` response listed it, so a keyword first
//! used by STORE or APPEND (here or through another session) is announced
//! with `FLAGS` and `PERMANENTFLAGS` before the first response that shows
//! it.

use std::collections::BTreeMap;

use imap_next::imap_types::fetch::MessageDataItem;
use imap_next::imap_types::flag::{Flag, FlagFetch, FlagPerm};
use imap_next::imap_types::response::{Code, Data, Status};

use super::reply::{flag_of_name, untagged_ok};

/// Keywords announced to one session at most; past it new ones are not
/// announced (a FLAGS response stays bounded).
pub const KEYWORDS_SHOWN_MAX: usize = 256;

/// The keywords one session's last `FLAGS` response listed, by their
/// lower-case form (keywords match without regard to case).
#[derive(Debug, Clone, Default)]
pub struct Shown {
    keywords: BTreeMap<String, String>,
}

impl Shown {
    /// What a `FLAGS` response tells: it replaces what was known.
    pub fn told(&mut self, flags: &[Flag<'_>]) {
        self.keywords = flags
            .iter()
            .filter_map(|f| match f {
                Flag::Keyword(k) => Some(k.as_ref().to_owned()),
                _ => None,
            })
            .map(|k| (k.to_ascii_lowercase(), k))
            .collect();
    }

    /// Keywords in `d` (a FETCH's FLAGS) that were never announced: noted
    /// as announced now; empty when there are none (or no room for more).
    pub fn new_in(&mut self, d: &Data<'_>) -> Vec<String> {
        let Data::Fetch { items, .. } = d else {
            return Vec::new();
        };
        let mut new = Vec::new();
        for item in items.as_ref() {
            let MessageDataItem::Flags(flags) = item else { continue };
            for f in flags {
                let FlagFetch::Flag(Flag::Keyword(k)) = f else { continue };
                let key = k.as_ref().to_ascii_lowercase();
                if !self.keywords.contains_key(&key) && self.keywords.len() < KEYWORDS_SHOWN_MAX {
                    self.keywords.insert(key, k.as_ref().to_owned());
                    new.push(k.as_ref().to_owned());
                }
            }
        }
        new
    }

    /// Keywords the folder defines (`membership::keywords`) that this
    /// session was not told of: noted as announced now; empty when none
    /// (or no room for more).
    pub fn defined(&mut self, defined: &[String]) -> Vec<String> {
        let mut new = Vec::new();
        for k in defined {
            let key = k.to_ascii_lowercase();
            if !self.keywords.contains_key(&key)
                && self.keywords.len() < KEYWORDS_SHOWN_MAX
                && flag_of_name(k).is_some()
            {
                self.keywords.insert(key, k.clone());
                new.push(k.clone());
            }
        }
        new
    }

    /// The `FLAGS` response and the `PERMANENTFLAGS` code that announce
    /// every keyword known now.
    pub fn announcement(&self) -> (Data<'static>, Status<'static>) {
        let mut flags = vec![Flag::Answered, Flag::Flagged, Flag::Deleted, Flag::Seen, Flag::Draft];
        flags.extend(self.keywords.values().filter_map(|k| flag_of_name(k)));
        let mut permanent: Vec<FlagPerm<'static>> = flags.iter().cloned().map(Into::into).collect();
        permanent.push(FlagPerm::Asterisk);
        (
            Data::Flags(flags),
            untagged_ok(Code::PermanentFlags(permanent), "flags are stored"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imap::reply::nz;
    use imap_next::imap_types::core::{Atom, Vec1};

    fn fetch(flags: &[&str]) -> Data<'static> {
        Data::Fetch {
            seq: nz(1),
            items: Vec1::unvalidated(vec![MessageDataItem::Flags(
                flags
                    .iter()
                    .filter_map(|f| flag_of_name(f))
                    .map(FlagFetch::Flag)
                    .collect(),
            )]),
        }
    }

    #[test]
    fn a_keyword_is_announced_once_whatever_its_case() {
        let mut shown = Shown::default();
        shown.told(&[Flag::Seen, Flag::Keyword(Atom::try_from("work").unwrap())]);
        assert!(shown.new_in(&fetch(&["\\Seen", "WORK"])).is_empty());
        assert_eq!(shown.new_in(&fetch(&["$keyword1", "work"])), ["$keyword1"]);
        assert!(shown.new_in(&fetch(&["$KEYWORD1"])).is_empty());
        let (Data::Flags(flags), _) = shown.announcement() else {
            panic!("a FLAGS response")
        };
        let names: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
        assert!(names.contains(&"$keyword1".to_owned()) && names.contains(&"work".to_owned()));
        assert!(names.contains(&"\\Seen".to_owned()));
        // A new FLAGS response replaces what was known.
        shown.told(&[Flag::Seen]);
        assert_eq!(shown.new_in(&fetch(&["work"])), ["work"]);
        // What the folder defines is announced once.
        assert_eq!(shown.defined(&["Work".into(), "$Label2".into()]), ["$Label2"]);
        assert!(shown.defined(&["$label2".into()]).is_empty());
    }
}
