//! Domains and users: the directory in the Raft state, changed through
//! any node. Removing a user with mail is refused unless purged.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use membership::{DirectoryCommand, DirectoryError};
use quill_proto::admin::{DomainBody, PasswordBody, QuotaBody, RemoveQuery, UserBody, UserRemoved};
use quill_proto::imap::folders;

use super::state::{AdminState, ApiResult, Failure, done, reply};
use crate::uids::sequence_name;

async fn apply(state: &AdminState, cmd: DirectoryCommand) -> ApiResult {
    command(state, cmd).await?;
    done()
}

/// One change of the directory (the JSON API's and the web page's).
pub(super) async fn command(state: &AdminState, cmd: DirectoryCommand) -> Result<(), Failure> {
    state.services.directory.apply(cmd).await?;
    Ok(())
}

pub(super) async fn list_domains(State(s): State<AdminState>) -> ApiResult {
    reply(s.services.directory.domains())
}

pub(super) async fn add_domain(State(s): State<AdminState>, Json(b): Json<DomainBody>) -> ApiResult {
    apply(&s, DirectoryCommand::AddDomain { domain: b.domain }).await
}

pub(super) async fn remove_domain(State(s): State<AdminState>, Path(domain): Path<String>) -> ApiResult {
    apply(&s, DirectoryCommand::RemoveDomain { domain }).await
}

pub(super) async fn list_users(State(s): State<AdminState>) -> ApiResult {
    reply(s.services.directory.users())
}

async fn hash_password(password: String) -> Result<String, Failure> {
    tokio::task::spawn_blocking(move || membership::password::hash(&password))
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))
}

/// Adds a user, with the special-use folders (RFC 6154: Sent, Drafts,
/// Trash, Junk, Archive), subscribed, so that mail clients find them.
pub(super) async fn add_user(State(s): State<AdminState>, Json(b): Json<UserBody>) -> ApiResult {
    create_user(&s, b).await?;
    done()
}

/// [`add_user`]'s work, for the JSON API and the web page.
pub(super) async fn create_user(s: &AdminState, b: UserBody) -> Result<(), Failure> {
    let password_hash = hash_password(b.password).await?;
    let address = b.address.clone();
    s.services
        .directory
        .apply(DirectoryCommand::AddUser {
            address: b.address,
            password_hash,
            quota_bytes: b.quota_bytes,
        })
        .await?;
    if let Some(user) = s.services.directory.user(&address) {
        let mailbox = user.mailbox();
        let uids = &s.services.uids;
        let now = crate::time::now_ms();
        let items: Vec<(String, [u8; 16])> = folders::SPECIAL_USE
            .iter()
            .map(|(name, _)| (name.to_string(), s.services.mail.new_message_id(now).0))
            .collect();
        let subs: Vec<(String, [u8; 16])> = items.iter().map(|(n, _)| (n.clone(), [0; 16])).collect();
        let made = uids
            .bind(&folders::scope(&mailbox), items)
            .await
            .and(uids.bind(&folders::subscriptions(&mailbox), subs).await);
        if let Err(e) = made {
            // The user exists; the folders come when a client makes them.
            tracing::warn!(user = %user.address, "special-use folders not made: {e}");
        }
    }
    Ok(())
}

pub(super) async fn set_password(
    State(s): State<AdminState>,
    Path(address): Path<String>,
    Json(b): Json<PasswordBody>,
) -> ApiResult {
    change_password(&s, address, b.password).await?;
    done()
}

/// Hashes and sets a user's password (the JSON API's and the web page's).
pub(super) async fn change_password(s: &AdminState, address: String, password: String) -> Result<(), Failure> {
    let password_hash = hash_password(password).await?;
    command(s, DirectoryCommand::SetPassword { address, password_hash }).await
}

/// Sets a user's quota (feature level 3: refused below it).
pub(super) async fn set_quota(
    State(s): State<AdminState>,
    Path(address): Path<String>,
    Json(b): Json<QuotaBody>,
) -> ApiResult {
    let cmd = DirectoryCommand::SetQuota {
        address,
        quota_bytes: b.quota_bytes,
    };
    apply(&s, cmd).await
}

/// Removes a user. One with mail is refused unless `?purge=true`, which
/// deletes every message on every replica first (tombstones, so that a node
/// that is down cannot bring them back) and again after the removal (mail
/// that arrived meanwhile). Whatever is left, the next user given this
/// address has a new mailbox name ([`membership::UserRecord::mailbox`]) and
/// starts empty.
pub(super) async fn remove_user(
    State(s): State<AdminState>,
    Path(address): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult {
    let purged = delete_user(&s, address, q.purge).await?;
    reply(UserRemoved { ok: true, purged })
}

/// [`remove_user`]'s work, for the JSON API and the web page: the number
/// of messages purged.
pub(super) async fn delete_user(s: &AdminState, address: String, purge_mail: bool) -> Result<usize, Failure> {
    let user = s
        .services
        .directory
        .user(&address)
        .ok_or_else(|| Failure::from(DirectoryError::NoSuchUser(address.clone())))?;
    let mailbox = user.mailbox();
    let purge = |mailbox: String| {
        let mail = s.services.mail.clone();
        async move {
            let msgs = mail.mailbox(&mailbox).await;
            let n = msgs.len();
            if n > 0 {
                mail.delete(&mailbox, &msgs)
                    .await
                    .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, format!("purging the mailbox: {e}")))?;
            }
            Ok::<usize, Failure>(n)
        }
    };
    let held = s.services.mail.mailbox(&mailbox).await.len();
    if held > 0 && !purge_mail {
        return Err(Failure(
            StatusCode::CONFLICT,
            format!(
                "{} has {held} message(s); remove with --purge to delete them",
                user.address
            ),
        ));
    }
    let mut purged = if purge_mail { purge(mailbox.clone()).await? } else { 0 };
    s.services
        .directory
        .apply(DirectoryCommand::RemoveUser { address })
        .await?;
    if purge_mail {
        purged += purge(mailbox.clone()).await?;
    }
    // Its folders, their UIDs and its subscriptions go too (a mailbox name
    // is never reused: see `UserRecord::mailbox`).
    let uids = &s.services.uids;
    let scope = folders::scope(&mailbox);
    let folder_names: Vec<(String, [u8; 16])> = uids.names(&scope).into_iter().collect();
    let mut ids: Vec<String> = folder_names.iter().map(|(_, id)| folders::id_string(id)).collect();
    ids.push(folders::INBOX.to_owned());
    let subs: Vec<(String, [u8; 16])> = uids.names(&folders::subscriptions(&mailbox)).into_iter().collect();
    let mut dropped = uids
        .unbind(&scope, folder_names)
        .await
        .and(uids.unbind(&folders::subscriptions(&mailbox), subs).await);
    for id in ids {
        dropped = dropped.and(uids.drop_folder(&sequence_name(&mailbox, &id)).await);
    }
    if let Err(e) = dropped {
        tracing::warn!(user = %user.address, error = %e, "the user's folders and UIDs were not all dropped");
    }
    tracing::info!(user = %user.address, purged, "user removed");
    Ok(purged)
}
