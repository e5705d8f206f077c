//! Whole-cluster backup and restore, the directory half: everything in
//! the Raft state that is not mail (domains, users with their password
//! hashes and quotas, aliases, domain aliases, catch-alls, taps, Sieve
//! scripts, cluster settings, the TLS certificates stored cluster-wide with
//! their keys, the DKIM signing keys, the blocklists and access rules, and
//! each user's folder names and subscriptions) as one JSON
//! document. The mail goes user by user through `export` and `import`;
//! `quill admin backup` and `restore` (`transfer`) put the two together.
//!
//! `GET /v1/backup/directory` reads the state as this node applied it.
//! `POST /v1/restore/directory` re-creates it in a cluster that has no
//! user yet (409 otherwise: a restore never merges into live data), at a
//! feature level at least the backup's.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use base64::Engine;
use membership::{DirectoryCommand, DirectoryError, Routes, RoutesCommand, StoredCert, UserRecord};
use quill_proto::imap::folders;
use serde::{Deserialize, Serialize};

use super::state::{AdminState, ApiResult, Failure, reply};

/// The version of [`DirectoryBackup`]'s layout.
pub const BACKUP_FORMAT: u32 = 1;
/// Largest directory document a restore takes: the blocklists' bound
/// (`membership::blocklist::TOTAL_BYTES_MAX`) in base64, and room for the
/// rest.
pub const DIRECTORY_BYTES_MAX: usize = 448 << 20;

/// One blocklist as a backup keeps it: its encoded range table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupList {
    pub loaded_at_ms: u64,
    /// The table as the Raft state holds it (`RangeTable::encode`), base64.
    pub table: String,
}

/// One user's folders (INBOX aside) and subscriptions, by name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UserFolders {
    pub folders: Vec<String>,
    pub subscribed: Vec<String>,
}

/// The directory of a cluster, as a backup keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectoryBackup {
    pub format: u32,
    /// The cluster's feature level when it was taken: a restore needs one
    /// at least as high.
    pub feature_level: u32,
    pub taken_ms: u64,
    pub domains: Vec<String>,
    /// With their password hashes and quotas.
    pub users: Vec<UserRecord>,
    pub routes: Routes,
    /// Cluster settings set (not the defaults or flags).
    pub settings: BTreeMap<String, String>,
    /// Certificates stored cluster-wide, with their keys.
    pub tls: BTreeMap<String, StoredCert>,
    /// By user address.
    pub folders: BTreeMap<String, UserFolders>,
    /// DKIM signing keys by domain, with their private keys (absent from
    /// a backup taken before they existed).
    #[serde(default)]
    pub dkim: BTreeMap<String, Vec<membership::dkim::DkimKey>>,
    /// Blocklists by name (absent from a backup taken before they
    /// existed).
    #[serde(default)]
    pub blocklists: BTreeMap<String, BackupList>,
    /// Access rules: CIDR -> allow (`false`: deny).
    #[serde(default)]
    pub access: BTreeMap<String, bool>,
}

/// `GET /v1/backup/directory`.
pub(super) async fn directory(State(s): State<AdminState>) -> ApiResult {
    let dir = &s.services.directory;
    let membership = &s.cluster.membership;
    let users: Vec<UserRecord> = dir.users().iter().filter_map(|u| dir.user(&u.address)).collect();
    let folders = users
        .iter()
        .map(|u| {
            let mailbox = u.mailbox();
            let f = UserFolders {
                folders: s.services.uids.names(&folders::scope(&mailbox)).into_keys().collect(),
                subscribed: s
                    .services
                    .uids
                    .names(&folders::subscriptions(&mailbox))
                    .into_keys()
                    .collect(),
            };
            (u.address.clone(), f)
        })
        .collect();
    reply(DirectoryBackup {
        format: BACKUP_FORMAT,
        feature_level: membership.feature_level(),
        taken_ms: crate::time::now_ms(),
        domains: dir.domains(),
        users,
        routes: dir.routes(),
        settings: membership.settings().values,
        tls: membership.tls_certs().certs,
        folders,
        dkim: membership.dkim_keys().domains,
        blocklists: membership.with_blocklists(|b| {
            b.lists
                .iter()
                .map(|(name, l)| {
                    let table = base64::engine::general_purpose::STANDARD.encode(&l.data);
                    let list = BackupList {
                        loaded_at_ms: l.loaded_at_ms,
                        table,
                    };
                    (name.clone(), list)
                })
                .collect()
        }),
        access: membership.with_blocklists(|b| b.access.clone()),
    })
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure(StatusCode::SERVICE_UNAVAILABLE, format!("restoring {what}: {e}"))
}

/// `POST /v1/restore/directory`: into a cluster without users only.
pub(super) async fn restore(State(s): State<AdminState>, Json(b): Json<DirectoryBackup>) -> ApiResult {
    let dir = &s.services.directory;
    let membership = &s.cluster.membership;
    if b.format != BACKUP_FORMAT {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!(
                "backup format {} is not {BACKUP_FORMAT}, the one this release reads",
                b.format
            ),
        ));
    }
    if membership.feature_level() < b.feature_level {
        return Err(Failure(
            StatusCode::CONFLICT,
            format!(
                "the backup was taken at feature level {}, this cluster runs at {}: finish its upgrade first",
                b.feature_level,
                membership.feature_level()
            ),
        ));
    }
    let existing = dir.users();
    if !existing.is_empty() {
        return Err(Failure(
            StatusCode::CONFLICT,
            format!(
                "this cluster is not empty: it has {} user(s) (e.g. {}); a restore goes into a cluster with none",
                existing.len(),
                existing[0].address
            ),
        ));
    }
    for domain in &b.domains {
        match dir.apply(DirectoryCommand::AddDomain { domain: domain.clone() }).await {
            Ok(()) | Err(DirectoryError::DomainExists(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    for u in &b.users {
        let cmd = DirectoryCommand::AddUser {
            address: u.address.clone(),
            password_hash: u.password_hash.clone(),
            quota_bytes: u.quota_bytes,
        };
        dir.apply(cmd).await?;
    }
    restore_folders(&s, &b).await?;
    restore_routes(&s, &b.routes).await?;
    for (key, value) in &b.settings {
        let value = crate::settings::check(key, value).map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
        membership
            .set_setting(key.clone(), Some(value))
            .await
            .map_err(|e| unavailable("settings", e))?;
    }
    for (name, cert) in &b.tls {
        membership
            .set_tls_cert(name.clone(), cert.clone())
            .await
            .map_err(|e| unavailable("certificates", e))?;
    }
    for (domain, keys) in &b.dkim {
        for key in keys {
            let add = membership::dkim::DkimCommand::Add {
                domain: domain.clone(),
                key: key.clone(),
            };
            match membership.write_dkim(add).await {
                // The same key there already (a restore tried again).
                Err(e) if e.contains("already has selector") => {}
                r => r.map_err(|e| unavailable("DKIM keys", e))?,
            }
        }
    }
    restore_blocklists(&s, &b).await?;
    tracing::info!(users = b.users.len(), domains = b.domains.len(), "directory restored");
    reply(serde_json::json!({"ok": true, "users": b.users.len(), "domains": b.domains.len()}))
}

/// The access rules, and each blocklist loaded again in chunks as `quill
/// admin blocklist load` loads it (a list of that name there already is
/// replaced).
async fn restore_blocklists(s: &AdminState, b: &DirectoryBackup) -> Result<(), Failure> {
    use membership::blocklist::{BlocklistCommand, RANGES_MAX, RangeTable, load_commands};
    let membership = &s.cluster.membership;
    for (cidr, allow) in &b.access {
        let rule = BlocklistCommand::SetAccess {
            cidr: cidr.clone(),
            allow: *allow,
        };
        membership
            .blocklist_write(rule)
            .await
            .map_err(|e| unavailable("access rules", e))?;
    }
    for (name, list) in &b.blocklists {
        let bad = |e: String| Failure(StatusCode::BAD_REQUEST, format!("blocklist {name}: {e}"));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&list.table)
            .map_err(|e| bad(e.to_string()))?;
        RangeTable::decode(&bytes, RANGES_MAX).map_err(|e| bad(e.to_string()))?;
        let random = crate::files::random_bytes().map_err(|e| unavailable("blocklists", e))?;
        let upload = u64::from_le_bytes(random[..8].try_into().expect("8 bytes"));
        for c in load_commands(name, upload, &bytes, list.loaded_at_ms) {
            membership
                .blocklist_write(c)
                .await
                .map_err(|e| unavailable("blocklists", e))?;
        }
    }
    Ok(())
}

/// Each user's folders (new ids: a message's folder is bound again as its
/// mail is imported by name) and subscriptions.
async fn restore_folders(s: &AdminState, b: &DirectoryBackup) -> Result<(), Failure> {
    let uids = &s.services.uids;
    for (address, f) in &b.folders {
        let Some(user) = s.services.directory.user(address) else {
            continue;
        };
        let mailbox = user.mailbox();
        let new_id = || s.services.mail.new_message_id(crate::time::now_ms()).0;
        let names: Vec<(String, [u8; 16])> = f
            .folders
            .iter()
            .filter(|n| folders::canonical(n.as_bytes()).is_ok_and(|c| c == **n) && *n != folders::INBOX)
            .take(folders::FOLDERS_MAX)
            .map(|n| (n.clone(), new_id()))
            .collect();
        let subs: Vec<(String, [u8; 16])> = f
            .subscribed
            .iter()
            .take(folders::FOLDERS_MAX)
            .map(|n| (n.clone(), [0; 16]))
            .collect();
        uids.bind(&folders::scope(&mailbox), names)
            .await
            .map_err(|e| unavailable("folders", e))?;
        uids.bind(&folders::subscriptions(&mailbox), subs)
            .await
            .map_err(|e| unavailable("subscriptions", e))?;
    }
    Ok(())
}

/// Aliases (in rounds: one whose target is another alias waits for it),
/// domain aliases, catch-alls, taps and Sieve scripts, with the SRS key
/// of the backup (so forwarded mail's bounces still verify).
async fn restore_routes(s: &AdminState, r: &Routes) -> Result<(), Failure> {
    let dir = &s.services.directory;
    let srs_key = match r.srs_key {
        Some(k) => k,
        None => crate::files::random_bytes().map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
    };
    let apply = |cmd: RoutesCommand| async move { dir.apply_routes(cmd).await.map_err(Failure::from) };
    for (alias, target) in &r.domain_aliases {
        apply(RoutesCommand::SetDomainAlias {
            alias: alias.clone(),
            target: target.clone(),
        })
        .await?;
    }
    let mut left: Vec<(&String, &Vec<String>)> = r.aliases.iter().collect();
    while !left.is_empty() {
        let mut next = Vec::new();
        let mut last_error = None;
        for (address, targets) in left.iter().copied() {
            let cmd = RoutesCommand::SetAlias {
                address: address.clone(),
                targets: targets.clone(),
                srs_key,
            };
            if let Err(e) = apply(cmd).await {
                last_error = Some(e);
                next.push((address, targets));
            }
        }
        if next.len() == left.len() {
            return Err(last_error.expect("a failure"));
        }
        left = next;
    }
    for (domain, address) in &r.catch_all {
        apply(RoutesCommand::SetCatchAll {
            domain: domain.clone(),
            address: Some(address.clone()),
        })
        .await?;
    }
    for (target, archive) in &r.taps {
        apply(RoutesCommand::SetTap {
            target: target.clone(),
            archive: Some(archive.clone()),
        })
        .await?;
    }
    for (user, scripts) in &r.sieve {
        for (name, script) in &scripts.scripts {
            apply(RoutesCommand::PutSieve {
                user: user.clone(),
                name: name.clone(),
                script: Some(script.clone()),
                activate: scripts.active.as_deref() == Some(name.as_str()),
                srs_key,
            })
            .await?;
        }
    }
    Ok(())
}
