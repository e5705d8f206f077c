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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Normalized (lower-case) address: the mailbox name everywhere.
    pub address: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// None: unlimited.
    pub quota_bytes: Option<u64>,
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

fn normalize_domain(d: &str) -> Result<String, DirectoryError> {
    let d = d.trim().trim_end_matches('.').to_ascii_lowercase();
    if valid_domain(&d) {
        Ok(d)
    } else {
        Err(DirectoryError::BadDomain(d))
    }
}

/// Lower-cases an address and checks its shape. Quill treats local parts
/// case-insensitively, as nearly every provider does.
pub fn normalize_address(a: &str) -> Result<String, DirectoryError> {
    let a = a.trim();
    let bad = || DirectoryError::BadAddress(a.to_owned());
    let (local, domain) = a.rsplit_once('@').ok_or_else(bad)?;
    if local.is_empty()
        || local.len() > LOCAL_PART_BYTES_MAX
        || a.len() > ADDRESS_BYTES_MAX
        || !local
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'<' | b'>' | b'@' | b'"' | b'\\' | b','))
    {
        return Err(bad());
    }
    let domain = normalize_domain(domain).map_err(|_| bad())?;
    Ok(format!("{}@{domain}", local.to_ascii_lowercase()))
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
                };
                self.users.insert(a, record);
            }
            DirectoryCommand::RemoveUser { address } => {
                let a = normalize_address(address)?;
                if self.users.remove(&a).is_none() {
                    return Err(DirectoryError::NoSuchUser(a));
                }
            }
            DirectoryCommand::SetPassword { address, password_hash } => {
                let a = normalize_address(address)?;
                let u = self
                    .users
                    .get_mut(&a)
                    .ok_or_else(|| DirectoryError::NoSuchUser(a.clone()))?;
                u.password_hash = password_hash.clone();
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

/// The directory as the rest of a node sees it: reads are local and cheap;
/// writes are committed (to a file now, through Raft later) before they
/// resolve.
pub trait Directory: Send + Sync + 'static {
    fn resolve(&self, address: &str) -> Recipient;
    fn user(&self, address: &str) -> Option<UserRecord>;
    fn domains(&self) -> Vec<String>;
    fn users(&self) -> Vec<UserSummary>;
    fn apply(&self, cmd: DirectoryCommand) -> DirectoryFuture<'_>;
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

    fn apply(&self, cmd: DirectoryCommand) -> DirectoryFuture<'_> {
        // Writes are rare (operators); the file write is small.
        Box::pin(async move { self.apply_sync(&cmd) })
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
