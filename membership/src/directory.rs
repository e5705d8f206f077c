//! The user directory: domains and users.
//!
//! [`DirectoryState::apply`] is the whole write logic, deterministic and
//! free of I/O, so that the same commands applied from a Raft log give the
//! same state on every node.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Mutex, RwLock};

use serde::{Deserialize, Serialize};

/// RFC 5321: a domain is at most 255 octets, a path at most 256.
const DOMAIN_BYTES_MAX: usize = 255;
const ADDRESS_BYTES_MAX: usize = 254;
/// RFC 5321: a local part is at most 64 octets.
const LOCAL_PART_BYTES_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum DirectoryError {
    #[error("invalid domain: {0}")]
    BadDomain(String),
    #[error("invalid address: {0}")]
    BadAddress(String),
    #[error("domain {0} already exists")]
    DomainExists(String),
    #[error("no such domain: {0}")]
    NoSuchDomain(String),
    #[error("domain {0} still has users")]
    DomainNotEmpty(String),
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error("directory storage: {0}")]
    Storage(String),
}

/// A change to the directory: what a Raft log entry will carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectoryCommand {
    AddDomain {
        domain: String,
    },
    RemoveDomain {
        domain: String,
    },
    AddUser {
        address: String,
        password_hash: String,
        quota_bytes: Option<u64>,
    },
    RemoveUser {
        address: String,
    },
    SetPassword {
        address: String,
        password_hash: String,
    },
    /// Feature level 3: a user's quota (`None`: unlimited).
    SetQuota {
        address: String,
        quota_bytes: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Normalized (lower-case) address.
    pub address: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// None: unlimited.
    pub quota_bytes: Option<u64>,
    /// How many users of this address were removed before this one was
    /// created: part of the mailbox name, so that mail left by a removed
    /// user can never match the next user given the same address.
    #[serde(default)]
    pub incarnation: u64,
}

impl UserRecord {
    /// The name the user's mail is stored under everywhere (fragments,
    /// placement, locks): the address for the first user of an address,
    /// `address#N` for the N-th one after a removal (`#` cannot occur in a
    /// domain, so no address can take that name).
    pub fn mailbox(&self) -> String {
        mailbox_name(&self.address, self.incarnation)
    }
}

/// See [`UserRecord::mailbox`].
pub fn mailbox_name(address: &str, incarnation: u64) -> String {
    if incarnation == 0 {
        address.to_owned()
    } else {
        format!("{address}#{incarnation}")
    }
}

/// A user as listed to operators (no hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSummary {
    pub address: String,
    pub quota_bytes: Option<u64>,
}

/// What a recipient address resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    Local(UserRecord),
    /// The domain is ours but the user is not.
    UnknownUser,
    /// Not one of our domains.
    NotLocal,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectoryState {
    pub domains: BTreeSet<String>,
    pub users: BTreeMap<String, UserRecord>,
    /// Addresses whose user was removed, with the incarnation the next user
    /// of that address gets.
    #[serde(default)]
    pub next_incarnation: BTreeMap<String, u64>,
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d.len() <= DOMAIN_BYTES_MAX
        && d.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

pub(crate) fn normalize_domain(d: &str) -> Result<String, DirectoryError> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    if valid_domain(&d) {
        Ok(d)
    } else {
        Err(DirectoryError::BadDomain(d))
    }
}

/// Whether a character may stand in a local part: printable ASCII but the
/// address delimiters, or any non-ASCII character but controls and
/// spaces (RFC 6531 UTF8-non-ascii, for SMTPUTF8).
fn local_part_char(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_graphic() && !matches!(c, '<' | '>' | '@' | '"' | '\\' | ',')
    } else {
        !c.is_control() && !c.is_whitespace()
    }
}

/// Lower-cases an address and checks its shape. Quill treats local parts
/// case-insensitively, as nearly every provider does; a UTF-8 local part
/// (RFC 6531) is lower-cased by Unicode's rules and otherwise compared as
/// given (no Unicode normalization). Domains are ASCII: an
/// internationalized domain is given in its `xn--` form.
pub fn normalize_address(a: &str) -> Result<String, DirectoryError> {
    let a = a.trim();
    let bad = || DirectoryError::BadAddress(a.to_owned());
    let (local, domain) = a.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || local.len() > LOCAL_PART_BYTES_MAX
        || a.len() > ADDRESS_BYTES_MAX
        || !local.chars().all(local_part_char)
    {
        return Err(bad());
    }
    let domain = normalize_domain(domain).map_err(|_| bad())?;
    Ok(format!("{}@{domain}", local.to_lowercase()))
}

/// Whether an address needs SMTPUTF8 (RFC 6531) to be carried.
pub fn needs_smtputf8(address: &str) -> bool {
    !address.is_ascii()
}

impl DirectoryState {
    /// Applies one command. On error the state is unchanged.
    pub fn apply(&mut self, cmd: &DirectoryCommand) -> Result<(), DirectoryError> {
        match cmd {
            DirectoryCommand::AddDomain { domain } => {
                let d = normalize_domain(domain)?;
                if !self.domains.insert(d.clone()) {
                    return Err(DirectoryError::DomainExists(d));
                }
            }
            DirectoryCommand::RemoveDomain { domain } => {
                let d = normalize_domain(domain)?;
                if !self.domains.contains(&d) {
                    return Err(DirectoryError::NoSuchDomain(d));
                }
                let suffix = format!("@{d}");
                if self.users.keys().any(|u| u.ends_with(&suffix)) {
                    return Err(DirectoryError::DomainNotEmpty(d));
                }
                self.domains.remove(&d);
            }
            DirectoryCommand::AddUser {
                address,
                password_hash,
                quota_bytes,
            } => {
                let a = normalize_address(address)?;
                let domain = a.rsplit_once('@').expect("normalized").1;
                if !self.domains.contains(domain) {
                    return Err(DirectoryError::NoSuchDomain(domain.to_owned()));
                }
                if self.users.contains_key(&a) {
                    return Err(DirectoryError::UserExists(a));
                }
                let record = UserRecord {
                    address: a.clone(),
                    password_hash: password_hash.clone(),
                    quota_bytes: *quota_bytes,
                    incarnation: self.next_incarnation.get(&a).copied().unwrap_or(0),
                };
                self.users.insert(a, record);
            }
            DirectoryCommand::RemoveUser { address } => {
                let a = normalize_address(address)?;
                let Some(old) = self.users.remove(&a) else {
                    return Err(DirectoryError::NoSuchUser(a));
                };
                self.next_incarnation.insert(a, old.incarnation + 1);
            }
            DirectoryCommand::SetPassword { address, password_hash } => {
                let a = normalize_address(address)?;
                let u = self
                    .users
                    .get_mut(&a)
                    .ok_or_else(|| DirectoryError::NoSuchUser(a.clone()))?;
                u.password_hash = password_hash.clone();
            }
            DirectoryCommand::SetQuota { address, quota_bytes } => {
                let a = normalize_address(address)?;
                let u = self
                    .users
                    .get_mut(&a)
                    .ok_or_else(|| DirectoryError::NoSuchUser(a.clone()))?;
                u.quota_bytes = *quota_bytes;
            }
        }
        Ok(())
    }

    pub fn resolve(&self, address: &str) -> Recipient {
        let Ok(a) = normalize_address(address) else {
            return match address.rsplit_once('@') {
                Some((_, d)) if normalize_domain(d).is_ok_and(|d| self.domains.contains(&d)) => Recipient::UnknownUser,
                _ => Recipient::NotLocal,
            };
        };
        match self.users.get(&a) {
            Some(u) => Recipient::Local(u.clone()),
            None if self.domains.contains(a.rsplit_once('@').expect("normalized").1) => Recipient::UnknownUser,
            None => Recipient::NotLocal,
        }
    }
}

impl DirectoryState {
    /// The user with this address (normalized first), if any.
    pub fn user(&self, address: &str) -> Option<UserRecord> {
        let a = normalize_address(address).ok()?;
        self.users.get(&a).cloned()
    }

    /// Where postmaster mail goes when no `postmaster@DOMAIN` user exists
    /// and none was configured: the domain's first user in address order,
    /// else the first user of any domain (RFC 5321 §4.5.1 wants postmaster
    /// deliverable for every local domain).
    pub fn postmaster_fallback(&self, domain: Option<&str>) -> Option<UserRecord> {
        let of_domain = domain.and_then(|d| {
            let suffix = format!("@{}", d.to_ascii_lowercase());
            self.users.values().find(|u| u.address.ends_with(&suffix))
        });
        of_domain.or_else(|| self.users.values().next()).cloned()
    }

    pub fn domain_list(&self) -> Vec<String> {
        self.domains.iter().cloned().collect()
    }

    /// Every user as operators see them (no password hashes).
    pub fn user_summaries(&self) -> Vec<UserSummary> {
        self.users
            .values()
            .map(|u| UserSummary {
                address: u.address.clone(),
                quota_bytes: u.quota_bytes,
            })
            .collect()
    }
}

pub type DirectoryFuture<'a> = Pin<Box<dyn Future<Output = Result<(), DirectoryError>> + Send + 'a>>;
pub type RoutesFuture<'a> = Pin<Box<dyn Future<Output = Result<(), RoutesWriteError>> + Send + 'a>>;

/// Why a routes write did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoutesWriteError {
    /// Committed as a no-op: the reason (a loop, a missing target, a
    /// feature level the cluster does not run at yet, ...).
    #[error(transparent)]
    Refused(#[from] crate::command::CommandError),
    /// Not committed in time (no leader, storage).
    #[error("not committed: {0}")]
    Unavailable(String),
}

/// The directory as the rest of a node sees it: reads are local and cheap;
/// writes are committed (to a file now, through Raft later) before they
/// resolve.
pub trait Directory: Send + Sync + 'static {
    fn resolve(&self, address: &str) -> Recipient;
    fn user(&self, address: &str) -> Option<UserRecord>;
    fn domains(&self) -> Vec<String>;
    fn users(&self) -> Vec<UserSummary>;
    /// See [`DirectoryState::postmaster_fallback`].
    fn postmaster_fallback(&self, domain: Option<&str>) -> Option<UserRecord>;
    fn apply(&self, cmd: DirectoryCommand) -> DirectoryFuture<'_>;
    /// Where mail for `address` goes: users, aliases, domain aliases,
    /// sub-addresses and catch-alls ([`crate::routes::expand`]).
    fn expand(&self, address: &str) -> Result<crate::routes::Expansion, crate::routes::ExpandError>;
    /// The routing table as it stands (aliases, domain aliases,
    /// catch-alls, the SRS key).
    fn routes(&self) -> crate::routes::Routes;
    /// The key forwarded mail's senders are rewritten with (SRS), once an
    /// alias has been made.
    fn srs_key(&self) -> Option<[u8; 32]>;
    /// The users (archives) that get a copy of mail for `address`.
    fn taps_for(&self, address: &str) -> Vec<UserRecord>;
    /// The user's active Sieve script (by normalized address), if any.
    fn sieve_script(&self, user: &str) -> Option<String>;
    /// The user's Sieve scripts, all of them (ManageSieve, admin).
    fn sieve_scripts(&self, user: &str) -> crate::routes::SieveScripts;
    fn apply_routes(&self, cmd: crate::routes::RoutesCommand) -> RoutesFuture<'_>;
}

/// The directory of a single node, kept in `directory.json` in the data
/// directory. Every write replaces the file atomically (write, fsync,
/// rename, fsync the directory).
#[derive(Debug)]
pub struct LocalDirectory {
    path: PathBuf,
    state: RwLock<DirectoryState>,
    write: Mutex<()>,
}

impl LocalDirectory {
    pub fn open(data_dir: &Path) -> Result<Self, DirectoryError> {
        let path = data_dir.join("directory.json");
        let storage = |e: std::io::Error| DirectoryError::Storage(format!("{}: {e}", path.display()));
        let state = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| DirectoryError::Storage(format!("{}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DirectoryState::default(),
            Err(e) => return Err(storage(e)),
        };
        Ok(LocalDirectory {
            path,
            state: RwLock::new(state),
            write: Mutex::new(()),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, DirectoryState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn persist(&self, state: &DirectoryState) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(state).expect("state serializes"))?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        File::open(self.path.parent().unwrap_or(Path::new(".")))?.sync_all()
    }

    fn apply_sync(&self, cmd: &DirectoryCommand) -> Result<(), DirectoryError> {
        let _serial = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = self.read().clone();
        next.apply(cmd)?;
        self.persist(&next)
            .map_err(|e| DirectoryError::Storage(format!("{}: {e}", self.path.display())))?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }
}

impl Directory for LocalDirectory {
    fn resolve(&self, address: &str) -> Recipient {
        self.read().resolve(address)
    }

    fn user(&self, address: &str) -> Option<UserRecord> {
        self.read().user(address)
    }

    fn domains(&self) -> Vec<String> {
        self.read().domain_list()
    }

    fn users(&self) -> Vec<UserSummary> {
        self.read().user_summaries()
    }

    fn postmaster_fallback(&self, domain: Option<&str>) -> Option<UserRecord> {
        self.read().postmaster_fallback(domain)
    }

    fn apply(&self, cmd: DirectoryCommand) -> DirectoryFuture<'_> {
        // Writes are rare (operators); the file write is small.
        Box::pin(async move { self.apply_sync(&cmd) })
    }

    /// Users only: routes live in the cluster's Raft state.
    fn expand(&self, address: &str) -> Result<crate::routes::Expansion, crate::routes::ExpandError> {
        crate::routes::expand(&self.read(), &crate::routes::Routes::default(), address)
    }

    fn routes(&self) -> crate::routes::Routes {
        crate::routes::Routes::default()
    }

    fn srs_key(&self) -> Option<[u8; 32]> {
        None
    }

    fn sieve_script(&self, _user: &str) -> Option<String> {
        None
    }

    fn taps_for(&self, _address: &str) -> Vec<UserRecord> {
        Vec::new()
    }

    fn sieve_scripts(&self, _user: &str) -> crate::routes::SieveScripts {
        Default::default()
    }

    fn apply_routes(&self, _cmd: crate::routes::RoutesCommand) -> RoutesFuture<'_> {
        Box::pin(async {
            Err(RoutesWriteError::Unavailable(
                "routes need a cluster's Raft state".into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_user(a: &str) -> DirectoryCommand {
        DirectoryCommand::AddUser {
            address: a.into(),
            password_hash: "h".into(),
            quota_bytes: None,
        }
    }

    #[test]
    fn table() {
        let mut s = DirectoryState::default();
        let cases: Vec<(DirectoryCommand, Result<(), DirectoryError>)> = vec![
            (
                add_user("a@example.org"),
                Err(DirectoryError::NoSuchDomain("example.org".into())),
            ),
            (
                DirectoryCommand::AddDomain {
                    domain: "Example.ORG".into(),
                },
                Ok(()),
            ),
            (
                DirectoryCommand::AddDomain {
                    domain: "example.org".into(),
                },
                Err(DirectoryError::DomainExists("example.org".into())),
            ),
            (
                DirectoryCommand::AddDomain {
                    domain: "bad domain".into(),
                },
                Err(DirectoryError::BadDomain("bad domain".into())),
            ),
            (add_user("Alice@Example.org"), Ok(())),
            (
                add_user("alice@example.org"),
                Err(DirectoryError::UserExists("alice@example.org".into())),
            ),
            (
                add_user("no-at-sign"),
                Err(DirectoryError::BadAddress("no-at-sign".into())),
            ),
            (
                DirectoryCommand::RemoveDomain {
                    domain: "example.org".into(),
                },
                Err(DirectoryError::DomainNotEmpty("example.org".into())),
            ),
            (
                DirectoryCommand::RemoveUser {
                    address: "bob@example.org".into(),
                },
                Err(DirectoryError::NoSuchUser("bob@example.org".into())),
            ),
            (
                DirectoryCommand::SetPassword {
                    address: "ALICE@example.org".into(),
                    password_hash: "h2".into(),
                },
                Ok(()),
            ),
            (
                DirectoryCommand::RemoveUser {
                    address: "alice@example.org".into(),
                },
                Ok(()),
            ),
            (
                DirectoryCommand::RemoveDomain {
                    domain: "example.org".into(),
                },
                Ok(()),
            ),
        ];
        for (i, (cmd, want)) in cases.into_iter().enumerate() {
            let before = s.clone();
            let got = s.apply(&cmd);
            assert_eq!(got, want, "case {i}: {cmd:?}");
            if got.is_err() {
                assert_eq!(s, before, "case {i}: a refused command changed the state");
            }
        }
        assert!(s.domains.is_empty() && s.users.is_empty());
    }

    #[test]
    fn resolve() {
        let mut s = DirectoryState::default();
        s.apply(&DirectoryCommand::AddDomain {
            domain: "example.org".into(),
        })
        .unwrap();
        s.apply(&add_user("alice@example.org")).unwrap();
        assert!(matches!(s.resolve("ALICE@example.ORG"), Recipient::Local(u) if u.address == "alice@example.org"));
        assert_eq!(s.resolve("bob@example.org"), Recipient::UnknownUser);
        assert_eq!(s.resolve("bob@example.com"), Recipient::NotLocal);
        assert_eq!(s.resolve("b<>ob@example.org"), Recipient::UnknownUser);
        assert_eq!(s.resolve("garbage"), Recipient::NotLocal);
    }

    #[test]
    fn a_user_made_again_gets_a_new_mailbox() {
        let mut s = DirectoryState::default();
        s.apply(&DirectoryCommand::AddDomain {
            domain: "example.org".into(),
        })
        .unwrap();
        s.apply(&add_user("alice@example.org")).unwrap();
        let first = s.user("alice@example.org").unwrap().mailbox();
        assert_eq!(first, "alice@example.org", "a first user keeps the plain name");
        let mut seen = vec![first];
        for _ in 0..3 {
            s.apply(&DirectoryCommand::RemoveUser {
                address: "ALICE@example.org".into(),
            })
            .unwrap();
            s.apply(&add_user("Alice@example.org")).unwrap();
            let m = s.user("alice@example.org").unwrap().mailbox();
            assert!(!seen.contains(&m), "{m} was used before: {seen:?}");
            seen.push(m);
        }
        // Other users are untouched; a name with `#` is never an address.
        s.apply(&add_user("bob@example.org")).unwrap();
        assert_eq!(s.user("bob@example.org").unwrap().mailbox(), "bob@example.org");
        assert!(normalize_address(&seen[1]).is_err());
    }

    #[test]
    fn utf8_local_parts() {
        let mut s = DirectoryState::default();
        s.apply(&DirectoryCommand::AddDomain {
            domain: "example.org".into(),
        })
        .unwrap();
        s.apply(&add_user("Jürgen@example.org")).unwrap();
        s.apply(&add_user("用户@example.org")).unwrap();
        assert!(matches!(s.resolve("JÜRGEN@example.org"), Recipient::Local(u) if u.address == "jürgen@example.org"));
        assert!(matches!(s.resolve("用户@EXAMPLE.org"), Recipient::Local(_)));
        assert!(needs_smtputf8("jürgen@example.org") && !needs_smtputf8("alice@example.org"));
        // Controls and spaces stay out, UTF-8 or not; the byte limit holds.
        for bad in ["a\u{0}b@example.org", "a\u{2003}b@example.org", "a\u{85}b@example.org"] {
            assert!(normalize_address(bad).is_err(), "{bad:?}");
        }
        assert!(normalize_address(&format!("{}@example.org", "ü".repeat(33))).is_err());
        assert!(normalize_address(&format!("{}@example.org", "ü".repeat(32))).is_ok());
    }

    #[test]
    fn postmaster_fallback() {
        let mut s = DirectoryState::default();
        assert_eq!(s.postmaster_fallback(Some("example.org")), None);
        for d in ["example.org", "example.net"] {
            s.apply(&DirectoryCommand::AddDomain { domain: d.into() }).unwrap();
        }
        s.apply(&add_user("zed@example.net")).unwrap();
        // A domain without users falls back to any user.
        assert_eq!(
            s.postmaster_fallback(Some("example.org")).unwrap().address,
            "zed@example.net"
        );
        s.apply(&add_user("bob@example.org")).unwrap();
        s.apply(&add_user("alice@example.org")).unwrap();
        assert_eq!(
            s.postmaster_fallback(Some("EXAMPLE.org")).unwrap().address,
            "alice@example.org"
        );
        assert_eq!(
            s.postmaster_fallback(Some("example.net")).unwrap().address,
            "zed@example.net"
        );
        assert_eq!(s.postmaster_fallback(None).unwrap().address, "alice@example.org");
    }

    #[test]
    fn local_directory_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("quill-dir-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        {
            let d = LocalDirectory::open(&dir).unwrap();
            d.apply_sync(&DirectoryCommand::AddDomain {
                domain: "example.org".into(),
            })
            .unwrap();
            d.apply_sync(&add_user("alice@example.org")).unwrap();
        }
        let d = LocalDirectory::open(&dir).unwrap();
        assert_eq!(d.domains(), vec!["example.org".to_string()]);
        assert!(d.user("alice@example.org").is_some());
        fs::remove_dir_all(&dir).unwrap();
    }
}
