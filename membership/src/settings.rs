//! Cluster settings (feature level 3): policy values every node applies,
//! changed at runtime (`quill admin settings set KEY VALUE`) instead of by
//! restarting every node with a new flag. The state machine keeps keys and
//! values as text, bounded; the node knows the keys, checks a value before
//! proposing it, and applies a change within a second of its commit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The level that brought settings (release 0.3.0).
pub const SETTINGS_FEATURE_LEVEL: u32 = 3;
/// Keys set at once, at most.
pub const SETTINGS_MAX: usize = 256;
pub const KEY_BYTES_MAX: usize = 64;
pub const VALUE_BYTES_MAX: usize = 1024;

/// The cluster's settings and a counter moved by every change (so that a
/// node notices one without comparing them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub version: u64,
    pub values: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SettingsError {
    #[error(
        "a setting's key is 1 to {KEY_BYTES_MAX} characters a-z, 0-9 and '-', its value at most {VALUE_BYTES_MAX} printable bytes"
    )]
    Malformed,
    #[error("at most {SETTINGS_MAX} settings")]
    TooMany,
    #[error("{0} is not set")]
    NotSet(String),
}

impl Settings {
    /// Sets `key` to `value`, or with `None` unsets it.
    pub fn set(&mut self, key: &str, value: Option<&str>) -> Result<(), SettingsError> {
        let key_ok = !key.is_empty()
            && key.len() <= KEY_BYTES_MAX
            && key
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !key_ok {
            return Err(SettingsError::Malformed);
        }
        match value {
            Some(v) => {
                if v.len() > VALUE_BYTES_MAX || v.chars().any(char::is_control) {
                    return Err(SettingsError::Malformed);
                }
                if !self.values.contains_key(key) && self.values.len() >= SETTINGS_MAX {
                    return Err(SettingsError::TooMany);
                }
                self.values.insert(key.to_owned(), v.to_owned());
            }
            None => {
                if self.values.remove(key).is_none() {
                    return Err(SettingsError::NotSet(key.to_owned()));
                }
            }
        }
        self.version += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_are_bounded_and_every_change_is_counted() {
        let mut s = Settings::default();
        s.set("max-recipients", Some("50")).unwrap();
        assert_eq!(s.version, 1);
        assert_eq!(s.values["max-recipients"], "50");
        for bad in ["", "Max", "a b", &"k".repeat(65)] {
            assert_eq!(s.set(bad, Some("1")), Err(SettingsError::Malformed), "{bad:?}");
        }
        assert_eq!(s.set("x", Some("a\nb")), Err(SettingsError::Malformed));
        s.set("max-recipients", None).unwrap();
        assert_eq!(s.version, 2);
        assert_eq!(
            s.set("max-recipients", None),
            Err(SettingsError::NotSet("max-recipients".into()))
        );
    }
}
