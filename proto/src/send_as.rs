//! Who may send as whom on submission: by default an authenticated user
//! may name only their own address as the envelope sender and in `From:`;
//! an operator allows more with rules `WHO:PATTERN` (`--allow-from`), per
//! user or per domain:
//!
//! - WHO: a user's address, or `@domain` for every user of that domain;
//! - PATTERN: an address, `@domain` for any address of that domain, or
//!   `*` for any address at all.
//!
//! e.g. `@example.org:@example.org` (users of example.org may send as any
//! example.org address: role addresses, shared boxes),
//! `alice@example.org:ceo@example.org`, `newsletter@example.org:*`.

use std::fmt;

/// Rules at most (each is checked per message).
pub const RULES_MAX: usize = 1_000;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Who {
    User(String),
    Domain(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Address(String),
    Domain(String),
    Any,
}

/// One `WHO:PATTERN` rule, lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    who: Who,
    pattern: Pattern,
}

fn domain_of(address: &str) -> Option<&str> {
    address.rsplit_once('@').map(|(_, d)| d)
}

fn check_address(a: &str) -> Result<(), String> {
    let ok = a.len() <= 254
        && a.bytes().filter(|b| *b == b'@').count() == 1
        && !a.starts_with('@')
        && !a.ends_with('@')
        && a.bytes().all(|b| b.is_ascii_graphic() && b != b':' && b != b',');
    if ok {
        Ok(())
    } else {
        Err(format!("{a:?} is not an address"))
    }
}

fn check_domain(d: &str) -> Result<(), String> {
    let ok = !d.is_empty() && d.len() <= 253 && d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!("{d:?} is not a domain"))
    }
}

impl std::str::FromStr for Rule {
    type Err = String;

    fn from_str(s: &str) -> Result<Rule, String> {
        let s = s.trim().to_ascii_lowercase();
        let (who, pattern) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: a rule is WHO:PATTERN (e.g. @example.org:@example.org)"))?;
        let who = match who.strip_prefix('@') {
            Some(d) => check_domain(d).map(|()| Who::Domain(d.to_owned()))?,
            None => check_address(who).map(|()| Who::User(who.to_owned()))?,
        };
        let pattern = if pattern == "*" {
            Pattern::Any
        } else if let Some(d) = pattern.strip_prefix('@') {
            check_domain(d).map(|()| Pattern::Domain(d.to_owned()))?
        } else {
            check_address(pattern).map(|()| Pattern::Address(pattern.to_owned()))?
        };
        Ok(Rule { who, pattern })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.who {
            Who::User(u) => write!(f, "{u}:")?,
            Who::Domain(d) => write!(f, "@{d}:")?,
        }
        match &self.pattern {
            Pattern::Address(a) => write!(f, "{a}"),
            Pattern::Domain(d) => write!(f, "@{d}"),
            Pattern::Any => write!(f, "*"),
        }
    }
}

/// The rules of a node: whether `user` may send as `address`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendAs {
    rules: Vec<Rule>,
}

impl SendAs {
    pub fn new(rules: Vec<Rule>) -> Result<SendAs, String> {
        if rules.len() > RULES_MAX {
            return Err(format!("at most {RULES_MAX} sender rules"));
        }
        Ok(SendAs { rules })
    }

    /// The rules, in the order given.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether `user` (authenticated) may name `address` as a sender:
    /// their own address always, others as a rule allows (addresses
    /// compare without regard to case).
    pub fn allows(&self, user: &str, address: &str) -> bool {
        if user.eq_ignore_ascii_case(address) {
            return true;
        }
        let (user, address) = (user.to_ascii_lowercase(), address.to_ascii_lowercase());
        self.rules.iter().any(|r| {
            let who = match &r.who {
                Who::User(u) => *u == user,
                Who::Domain(d) => domain_of(&user) == Some(d.as_str()),
            };
            who && match &r.pattern {
                Pattern::Any => true,
                Pattern::Domain(d) => domain_of(&address) == Some(d.as_str()),
                Pattern::Address(a) => *a == address,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(r: &[&str]) -> SendAs {
        SendAs::new(r.iter().map(|s| s.parse().unwrap()).collect()).unwrap()
    }

    #[test]
    fn own_address_always_others_by_rule() {
        let none = SendAs::default();
        assert!(none.allows("alice@example.org", "Alice@Example.org"));
        assert!(!none.allows("alice@example.org", "ceo@example.org"));
        let r = rules(&[
            "@example.org:@example.org",
            "bob@other.test:ceo@example.org",
            "news@other.test:*",
        ]);
        assert!(r.allows("alice@example.org", "sales@EXAMPLE.org"));
        assert!(!r.allows("alice@example.org", "sales@other.test"));
        assert!(r.allows("bob@other.test", "ceo@example.org"));
        assert!(!r.allows("bob@other.test", "cfo@example.org"));
        assert!(r.allows("news@other.test", "anyone@anywhere.test"));
        assert!(!r.allows("eve@evil.test", "alice@example.org"));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for bad in [
            "example.org",
            "@:@x.org",
            "a@b:@",
            "a@b:x y@z",
            "@ex ample.org:*",
            "a@b@c:*",
        ] {
            let e = bad.parse::<Rule>().unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
        let r: Rule = "@Example.org:*".parse().unwrap();
        assert_eq!(r.to_string(), "@example.org:*");
    }
}
