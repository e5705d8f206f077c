//! Cluster settings as a node applies them: the keys it knows (each the
//! name of a `quill node` flag without its dashes), how a value is
//! checked (unit, range) before it is proposed, and the limits in force
//! (the node's own flags first, then the cluster's settings, then the
//! defaults). The values themselves are kept in the Raft state
//! (`membership::settings`), so a change reaches every node, one that was
//! down included, with no restart.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Serialize;

use crate::net::PlaintextAuth;
use crate::services::Limits;
use crate::units::{parse_duration_arg, parse_size};

/// A key's kind of value.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Bytes, with a unit or not (`10MB`, `2GiB`).
    Size {
        min: u64,
        max: u64,
    },
    Count {
        min: u64,
        max: u64,
    },
    /// Seconds, or a duration (`90s`, `5m`).
    Seconds {
        min: u64,
        max: u64,
    },
    Bool,
    /// Submission's sender rules (`--allow-from`): WHO:PATTERN rules
    /// separated by spaces or commas, or `none`.
    SenderRules,
    /// One of the words.
    Choice(&'static [&'static str]),
    /// Milliseconds, given as a duration (`500ms`, `30s`, `5m`, `120h`).
    Millis {
        min: u64,
        max: u64,
    },
}

/// A setting a node knows.
#[derive(Debug)]
pub struct Key {
    pub name: &'static str,
    /// What a change reaches: sessions already open at their next
    /// command, or only what starts after it.
    pub applies: &'static str,
    pub help: &'static str,
    kind: Kind,
}

/// The keys applied at runtime, every node alike.
pub const KEYS: &[Key] = &[
    Key {
        name: "max-message-size",
        applies: "the next transaction",
        help: "largest message accepted (advertised in SIZE)",
        kind: Kind::Size {
            min: 1024,
            max: (replication::MESSAGE_BYTES_MAX - 64 * 1024) as u64,
        },
    },
    Key {
        name: "max-recipients",
        applies: "the next command",
        help: "recipients per message",
        kind: Kind::Count { min: 1, max: 10_000 },
    },
    Key {
        name: "max-unknown-recipients",
        applies: "the next command",
        help: "unknown recipients one client address may name per minute",
        kind: Kind::Count { min: 1, max: 1_000_000 },
    },
    Key {
        name: "max-submissions-per-minute",
        applies: "the next message",
        help: "messages with remote recipients one account may submit a minute",
        kind: Kind::Count { min: 1, max: 1_000_000 },
    },
    Key {
        name: "max-submission-recipients-per-hour",
        applies: "the next message",
        help: "remote recipients one account may name an hour",
        kind: Kind::Count {
            min: 1,
            max: 100_000_000,
        },
    },
    Key {
        name: "idle-timeout",
        applies: "new sessions",
        help: "seconds a session may stay silent",
        kind: Kind::Seconds { min: 10, max: 3600 },
    },
    Key {
        name: "subaddress-folders",
        applies: "the next message",
        help: "file user+tag@ into the user's folder tag where it exists",
        kind: Kind::Bool,
    },
    Key {
        name: "allow-from",
        applies: "new sessions",
        help: "addresses users may send as besides their own: WHO:PATTERN rules, or none",
        kind: Kind::SenderRules,
    },
    Key {
        name: "plaintext-auth",
        applies: "new sessions",
        help: "where passwords may be sent without TLS: loopback, never, always",
        kind: Kind::Choice(&["loopback", "never", "always"]),
    },
    Key {
        name: "max-connections-per-ip",
        applies: "new connections",
        help: "open connections per client address",
        kind: Kind::Count { min: 1, max: 100_000 },
    },
    Key {
        name: "max-imap-sessions-per-user",
        applies: "new logins",
        help: "IMAP sessions one user may have open on a node",
        kind: Kind::Count { min: 1, max: 10_000 },
    },
    Key {
        name: "retry-initial",
        applies: "the next try",
        help: "first wait before an outbound delivery is tried again (doubles each time)",
        kind: Kind::Millis {
            min: 1_000,
            max: 86_400_000,
        },
    },
    Key {
        name: "retry-max",
        applies: "the next try",
        help: "longest wait between two tries of an outbound delivery",
        kind: Kind::Millis {
            min: 1_000,
            max: 7 * 86_400_000,
        },
    },
    Key {
        name: "queue-lifetime",
        applies: "the next try",
        help: "how long a message stays in the outbound queue before it bounces",
        kind: Kind::Millis {
            min: 60_000,
            max: 30 * 86_400_000,
        },
    },
    Key {
        name: "delay-warning",
        applies: "the next try",
        help: "tell the sender once when a message waited this long (0: never)",
        kind: Kind::Millis {
            min: 0,
            max: 30 * 86_400_000,
        },
    },
    Key {
        name: "outbound-per-destination",
        applies: "the next delivery",
        help: "outbound connections to one destination domain at once",
        kind: Kind::Count { min: 1, max: 1_000 },
    },
    Key {
        name: "outbound-rate-per-destination",
        applies: "the next delivery",
        help: "outbound transactions a second to one destination domain (0: no limit)",
        kind: Kind::Count { min: 0, max: 1_000_000 },
    },
    Key {
        name: "queue-max-messages",
        applies: "the next message",
        help: "outbound queue messages held on a node above which remote mail gets 451",
        kind: Kind::Count {
            min: 1,
            max: 1_000_000_000,
        },
    },
    Key {
        name: "queue-max-bytes",
        applies: "the next message",
        help: "outbound queue bytes held on a node above which remote mail gets 451",
        kind: Kind::Size {
            min: 1 << 20,
            max: 1 << 50,
        },
    },
    Key {
        name: "repair-grace",
        applies: "the next repair round",
        help: "how long a node may be down before its copies are made again elsewhere",
        kind: Kind::Millis {
            min: 0,
            max: 7 * 86_400_000,
        },
    },
    Key {
        name: "repair-rate",
        applies: "the next repair round",
        help: "bytes a second a node sends when it restores or moves copies",
        kind: Kind::Size {
            min: 64 * 1024,
            max: 1 << 40,
        },
    },
];

fn key(name: &str) -> Result<&'static Key, String> {
    KEYS.iter().find(|k| k.name == name).ok_or_else(|| {
        let known: Vec<&str> = KEYS.iter().map(|k| k.name).collect();
        format!("unknown setting {name:?}; the settings are: {}", known.join(", "))
    })
}

/// `value` checked for `name`, in the form it is stored in (a number of
/// bytes or seconds, `true`/`false`); the reason when refused.
pub fn check(name: &str, value: &str) -> Result<String, String> {
    let k = key(name)?;
    let v = value.trim();
    let ranged = |n: u64, min: u64, max: u64, unit: &str| {
        if (min..=max).contains(&n) {
            Ok(n.to_string())
        } else {
            Err(format!("{name} must be {min} to {max}{unit}, not {n}"))
        }
    };
    match k.kind {
        Kind::Size { min, max } => {
            let n = parse_size(v).map_err(|e| format!("{name}: {e}"))?;
            ranged(n, min, max, " bytes")
        }
        Kind::Count { min, max } => {
            let n: u64 = v
                .parse()
                .map_err(|_| format!("{name} takes a whole number, not {v:?}"))?;
            ranged(n, min, max, "")
        }
        Kind::Seconds { min, max } => {
            let n = match v.parse::<u64>() {
                Ok(n) => n,
                Err(_) => parse_duration_arg(v).map_err(|e| format!("{name}: {e}"))?.as_secs(),
            };
            ranged(n, min, max, " seconds")
        }
        Kind::SenderRules => {
            let rules = sender_rules(v).map_err(|e| format!("{name}: {e}"))?;
            Ok(show_rules(&rules))
        }
        Kind::Choice(words) => {
            let w = v.to_ascii_lowercase();
            if words.contains(&w.as_str()) {
                Ok(w)
            } else {
                Err(format!("{name} takes one of {}, not {v:?}", words.join(", ")))
            }
        }
        Kind::Millis { min, max } => {
            let n = parse_duration_arg(v).map_err(|e| format!("{name}: {e}"))?.as_millis() as u64;
            if (min..=max).contains(&n) {
                Ok(show_ms(n))
            } else {
                Err(format!("{name} must be {} to {}, not {v}", show_ms(min), show_ms(max)))
            }
        }
        Kind::Bool => match v.to_ascii_lowercase().as_str() {
            "true" | "on" | "yes" | "1" => Ok("true".into()),
            "false" | "off" | "no" | "0" => Ok("false".into()),
            _ => Err(format!("{name} takes true or false, not {v:?}")),
        },
    }
}

/// Sets a checked value on `limits`.
fn apply(limits: &mut Limits, name: &str, value: &str) {
    let n = || value.parse::<u64>().unwrap_or(0);
    let ms = || parse_duration_arg(value).map_or(0, |d| d.as_millis() as u64);
    match name {
        "max-message-size" => limits.message_bytes_max = usize::try_from(n()).unwrap_or(usize::MAX),
        "max-recipients" => limits.recipients_max = usize::try_from(n()).unwrap_or(usize::MAX),
        "max-unknown-recipients" => limits.unknown_recipients_max = u32::try_from(n()).unwrap_or(u32::MAX),
        "max-submissions-per-minute" => limits.submission_messages_per_minute = u32::try_from(n()).unwrap_or(u32::MAX),
        "max-submission-recipients-per-hour" => {
            limits.submission_recipients_per_hour = u32::try_from(n()).unwrap_or(u32::MAX)
        }
        "idle-timeout" => limits.idle_timeout = Duration::from_secs(n()),
        "subaddress-folders" => limits.subaddress_folders = value == "true",
        "allow-from" => {
            if let Ok(rules) = sender_rules(value)
                && let Ok(send_as) = quill_proto::send_as::SendAs::new(rules)
            {
                limits.send_as = std::sync::Arc::new(send_as);
            }
        }
        "plaintext-auth" => {
            limits.plaintext_auth = match value {
                "never" => PlaintextAuth::Never,
                "always" => PlaintextAuth::Always,
                _ => PlaintextAuth::Loopback,
            }
        }
        "max-connections-per-ip" => limits.connections_per_address_max = u32::try_from(n()).unwrap_or(u32::MAX),
        "max-imap-sessions-per-user" => limits.imap_sessions_per_user_max = u32::try_from(n()).unwrap_or(u32::MAX),
        "retry-initial" => limits.queue.schedule.initial_ms = ms(),
        "retry-max" => limits.queue.schedule.max_ms = ms(),
        "queue-lifetime" => limits.queue.schedule.lifetime_ms = ms(),
        "delay-warning" => limits.queue.delay_warning_ms = ms(),
        "outbound-per-destination" => limits.queue.per_destination = usize::try_from(n()).unwrap_or(usize::MAX),
        "outbound-rate-per-destination" => limits.queue.rate_per_destination = u32::try_from(n()).unwrap_or(u32::MAX),
        "queue-max-messages" => limits.queue.max_messages = n(),
        "queue-max-bytes" => limits.queue.max_bytes = n(),
        "repair-grace" => limits.repair_grace = Duration::from_millis(ms()),
        "repair-rate" => limits.repair_rate = n(),
        _ => {}
    }
}

/// A key's value in `limits`, as stored.
fn value_of(limits: &Limits, name: &str) -> String {
    match name {
        "max-message-size" => limits.message_bytes_max.to_string(),
        "max-recipients" => limits.recipients_max.to_string(),
        "max-unknown-recipients" => limits.unknown_recipients_max.to_string(),
        "max-submissions-per-minute" => limits.submission_messages_per_minute.to_string(),
        "max-submission-recipients-per-hour" => limits.submission_recipients_per_hour.to_string(),
        "idle-timeout" => limits.idle_timeout.as_secs().to_string(),
        "subaddress-folders" => limits.subaddress_folders.to_string(),
        "allow-from" => show_rules(limits.send_as.rules()),
        "plaintext-auth" => match limits.plaintext_auth {
            PlaintextAuth::Loopback => "loopback",
            PlaintextAuth::Never => "never",
            PlaintextAuth::Always => "always",
        }
        .to_owned(),
        "max-connections-per-ip" => limits.connections_per_address_max.to_string(),
        "max-imap-sessions-per-user" => limits.imap_sessions_per_user_max.to_string(),
        "retry-initial" => show_ms(limits.queue.schedule.initial_ms),
        "retry-max" => show_ms(limits.queue.schedule.max_ms),
        "queue-lifetime" => show_ms(limits.queue.schedule.lifetime_ms),
        "delay-warning" => show_ms(limits.queue.delay_warning_ms),
        "outbound-per-destination" => limits.queue.per_destination.to_string(),
        "outbound-rate-per-destination" => limits.queue.rate_per_destination.to_string(),
        "queue-max-messages" => limits.queue.max_messages.to_string(),
        "queue-max-bytes" => limits.queue.max_bytes.to_string(),
        "repair-grace" => show_ms(limits.repair_grace.as_millis() as u64),
        "repair-rate" => limits.repair_rate.to_string(),
        _ => String::new(),
    }
}

/// `--allow-from` rules from a setting's value: separated by spaces or
/// commas; `none` (or nothing) for none.
fn sender_rules(v: &str) -> Result<Vec<quill_proto::send_as::Rule>, String> {
    if v.trim().eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    let rules = v
        .split([' ', ','])
        .filter(|r| !r.is_empty())
        .map(str::parse)
        .collect::<Result<Vec<_>, String>>()?;
    if rules.len() > quill_proto::send_as::RULES_MAX {
        return Err(format!("at most {} rules", quill_proto::send_as::RULES_MAX));
    }
    Ok(rules)
}

fn show_rules(rules: &[quill_proto::send_as::Rule]) -> String {
    if rules.is_empty() {
        return "none".to_owned();
    }
    rules.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(" ")
}

/// A duration in milliseconds as the flags take it: the largest unit
/// that divides it (`90s`, `5m`, `120h`, `500ms`, `0s`).
fn show_ms(ms: u64) -> String {
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

/// The limits in force: `flags` (the node's, defaults filled in), with
/// the cluster's `settings` over every key the node was not given a flag
/// for (`explicit`). A stored value this release cannot take (a newer
/// release's key or range) is skipped.
pub fn effective(flags: &Limits, explicit: &BTreeSet<String>, settings: &BTreeMap<String, String>) -> Limits {
    let mut out = flags.clone();
    for (name, value) in settings {
        if explicit.contains(name) {
            continue;
        }
        if let Ok(v) = check(name, value) {
            apply(&mut out, name, &v);
        }
    }
    out
}

/// One row of `settings list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub key: String,
    /// In force on this node.
    pub value: String,
    pub default: String,
    /// `flag` (this node's, over the cluster's), `cluster` or `default`.
    pub source: String,
    pub help: String,
    /// From when a change holds (`the next command`, `new sessions`, ...).
    pub applies: String,
}

/// Every key as this node applies it.
pub fn rows(flags: &Limits, explicit: &BTreeSet<String>, settings: &BTreeMap<String, String>) -> Vec<Row> {
    let now = effective(flags, explicit, settings);
    let defaults = Limits::default();
    KEYS.iter()
        .map(|k| {
            let source = if explicit.contains(k.name) {
                "flag"
            } else if settings.contains_key(k.name) {
                "cluster"
            } else {
                "default"
            };
            Row {
                key: k.name.to_owned(),
                value: value_of(&now, k.name),
                default: value_of(&defaults, k.name),
                source: source.to_owned(),
                help: k.help.to_owned(),
                applies: k.applies.to_owned(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_checked_with_the_reason() {
        assert_eq!(check("max-message-size", "10MB"), Ok("10000000".into()));
        assert_eq!(check("max-recipients", " 50 "), Ok("50".into()));
        assert_eq!(check("idle-timeout", "5m"), Ok("300".into()));
        assert_eq!(check("subaddress-folders", "ON"), Ok("true".into()));
        assert!(check("max-recipients", "0").unwrap_err().contains("must be 1 to 10000"));
        assert!(check("max-recipients", "lots").unwrap_err().contains("whole number"));
        assert!(check("max-message-size", "1TB").unwrap_err().contains("must be"));
        assert!(check("nosuch", "1").unwrap_err().contains("unknown setting"));
        assert_eq!(check("plaintext-auth", "Never"), Ok("never".into()));
        assert_eq!(check("allow-from", " NONE "), Ok("none".into()));
        assert!(check("allow-from", "nobody").unwrap_err().starts_with("allow-from: "));
        assert!(
            check("plaintext-auth", "sometimes")
                .unwrap_err()
                .contains("one of loopback, never, always")
        );
        assert_eq!(check("retry-initial", "90s"), Ok("90s".into()));
        assert_eq!(check("queue-lifetime", "120h"), Ok("120h".into()));
        assert_eq!(check("repair-grace", "1500ms"), Ok("1500ms".into()));
        assert!(
            check("retry-initial", "10ms")
                .unwrap_err()
                .contains("must be 1s to 24h")
        );
        assert!(check("retry-max", "soon").unwrap_err().contains("unit"));
        assert_eq!(check("repair-rate", "8MiB"), Ok((8u64 << 20).to_string()));
    }

    #[test]
    fn every_key_reads_back_what_it_set() {
        // Each key set to a value it takes, then read from the limits it
        // made: the stored form goes through `check` again unchanged.
        let samples = [
            ("max-message-size", "65536"),
            ("max-recipients", "7"),
            ("max-unknown-recipients", "9"),
            ("max-submissions-per-minute", "11"),
            ("max-submission-recipients-per-hour", "13"),
            ("idle-timeout", "60"),
            ("subaddress-folders", "true"),
            ("allow-from", "@example.org:@example.org, boss@example.org:*"),
            ("plaintext-auth", "never"),
            ("max-connections-per-ip", "5"),
            ("max-imap-sessions-per-user", "3"),
            ("retry-initial", "90s"),
            ("retry-max", "2h"),
            ("queue-lifetime", "48h"),
            ("delay-warning", "4h"),
            ("outbound-per-destination", "2"),
            ("outbound-rate-per-destination", "10"),
            ("queue-max-messages", "500"),
            ("queue-max-bytes", "1048576"),
            ("repair-grace", "5m"),
            ("repair-rate", "1048576"),
        ];
        assert_eq!(samples.len(), KEYS.len(), "a sample for every key");
        for (k, v) in samples {
            let stored = check(k, v).unwrap_or_else(|e| panic!("{k}: {e}"));
            assert_eq!(check(k, &stored).as_deref(), Ok(stored.as_str()), "{k} stored form");
            let settings = BTreeMap::from([(k.to_owned(), stored.clone())]);
            let now = effective(&Limits::default(), &BTreeSet::new(), &settings);
            assert_eq!(value_of(&now, k), stored, "{k} applied");
            assert_ne!(
                value_of(&Limits::default(), k),
                stored,
                "{k}: the sample differs from the default"
            );
        }
    }

    #[test]
    fn a_flag_beats_the_cluster_which_beats_the_default() {
        let flags = Limits {
            recipients_max: 7,
            ..Limits::default()
        };
        let explicit = BTreeSet::from(["max-recipients".to_owned()]);
        let settings = BTreeMap::from([
            ("max-recipients".to_owned(), "3".to_owned()),
            ("idle-timeout".to_owned(), "60".to_owned()),
            ("from-a-newer-release".to_owned(), "x".to_owned()),
        ]);
        let now = effective(&flags, &explicit, &settings);
        assert_eq!(now.recipients_max, 7, "the node's flag");
        assert_eq!(now.idle_timeout, Duration::from_secs(60), "the cluster's");
        let rows = rows(&flags, &explicit, &settings);
        let row = |k: &str| rows.iter().find(|r| r.key == k).unwrap().clone();
        assert_eq!(
            (
                row("max-recipients").source.as_str(),
                row("max-recipients").value.as_str()
            ),
            ("flag", "7")
        );
        assert_eq!(row("idle-timeout").source, "cluster");
        assert_eq!(
            (
                row("max-message-size").source.as_str(),
                row("max-message-size").default.as_str()
            ),
            ("default", "52428800")
        );
    }
}
