//! The admin API: HTTP+JSON on `--admin`, bearer-token protected, plus an
//! unauthenticated `GET /metrics` (Prometheus text) and `GET /health`.
//!
//! ```text
//! GET    /v1/domains                  -> ["example.org", ...]
//! POST   /v1/domains                  {"domain": "example.org"}
//! DELETE /v1/domains/{domain}
//! GET    /v1/users                    -> [{"address": ..., "quota_bytes": ...}]
//! POST   /v1/users                    {"address", "password", "quota_bytes"?}
//! DELETE /v1/users/{address}[?purge=true]  refused (409) if the user has mail, unless purged
//! PUT    /v1/users/{address}/password {"password"}
//! GET    /v1/cluster/status           -> DESIGN.md's status object
//! POST   /v1/nodes/{id}/drain         mark a node draining (placement stops choosing it)
//! DELETE /v1/nodes/{id}               take a node out of the cluster for good
//! PUT    /v1/log-level                {"level": "debug" | "quill=trace,info" ...}
//! GET    /v1/tls                      -> {"cluster": [...], "local": [...]} certificates served here
//! PUT    /v1/tls/{name}               {"cert_pem", "key_pem"}: stored cluster-wide, checked first
//! DELETE /v1/tls/{name}
//! ```
//! Errors are `{"error": "..."}` with 400 (bad input), 401 (token), 404,
//! 409 (conflict) or 500.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use axum::{Json, Router};
use membership::{DirectoryCommand, DirectoryError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::services::Services;

/// Admin requests are small JSON documents.
const ADMIN_BODY_BYTES_MAX: usize = 64 * 1024;

pub use crate::rpc::LogLevelSetter;

/// The addresses a node serves, as reported in the cluster status.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Addrs {
    pub cluster: Option<SocketAddr>,
    pub smtp: Option<SocketAddr>,
    pub submission: Option<SocketAddr>,
    pub lmtp: Option<SocketAddr>,
    pub pop3: Option<SocketAddr>,
    pub imap: Option<SocketAddr>,
    pub smtps: Option<SocketAddr>,
    pub pop3s: Option<SocketAddr>,
    pub imaps: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

#[derive(Clone)]
pub struct AdminState {
    pub services: Arc<Services>,
    /// This node's replicator (status, metrics).
    pub replica: Arc<crate::replica::NodeReplicator>,
    pub token: Arc<String>,
    pub cluster: crate::cluster::Cluster,
    pub name: String,
    pub addrs: Addrs,
    pub set_log_level: LogLevelSetter,
}

struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<DirectoryError> for ApiError {
    fn from(e: DirectoryError) -> Self {
        let code = match &e {
            DirectoryError::BadDomain(_) | DirectoryError::BadAddress(_) => StatusCode::BAD_REQUEST,
            DirectoryError::DomainExists(_) | DirectoryError::UserExists(_) | DirectoryError::DomainNotEmpty(_) => {
                StatusCode::CONFLICT
            }
            DirectoryError::NoSuchDomain(_) | DirectoryError::NoSuchUser(_) => StatusCode::NOT_FOUND,
            DirectoryError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

fn check(state: &AdminState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compare hashes so the time taken says nothing about the token.
    match given {
        Some(t) if blake3::hash(t.as_bytes()) == blake3::hash(state.token.as_bytes()) => Ok(()),
        _ => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token".into(),
        )),
    }
}

/// `GET /health` (no token): whether this node can take mail, and what
/// else it knows of its state. 503 when it cannot store mail (the store
/// stopped after a failed fsync or i/o error, or its writer is gone): a
/// load balancer or the harness should send clients elsewhere. A node that
/// sees no Raft leader (no majority reachable) still takes and serves mail,
/// so that is reported (`leader: null`, in `warnings`) with 200.
async fn health(State(s): State<AdminState>) -> Response {
    let store = s.replica.store().failure();
    let m = &s.cluster.membership;
    let view = m.view();
    let me = view.node(m.id());
    let leader = m.leader();
    let mut warnings = Vec::new();
    let majority = s.cluster.majority.load(std::sync::atomic::Ordering::Relaxed);
    if leader.is_none() {
        warnings.push(
            "no raft leader known: a majority of the voters is unreachable; the view and directory cannot change",
        );
    } else if !majority {
        warnings.push(
            "cannot reach a majority of the voters: the view and directory cannot change here; mail is served by the last view",
        );
    }
    if s.replica.store().disk_full() {
        warnings.push("disk full: deliveries get 451 until deletions or the operator free space");
    }
    match me.map(|n| n.state) {
        Some(membership::NodeState::Down) => warnings.push("this node is marked down in its own view (not caught up)"),
        None => warnings.push("this node is not in its own view (not caught up)"),
        _ => {}
    }
    let ok = store.is_none();
    let body = json!({
        "ok": ok,
        "store": store.as_deref().unwrap_or("ok"),
        "leader": leader,
        "majority_reachable": majority,
        "view_epoch": view.epoch,
        "warnings": warnings,
    });
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Every `/v1` request shows the token before anything else of it is
/// read: the layer runs before the handlers' body extractors.
async fn require_token(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match check(&s, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/v1/domains", get(list_domains).post(add_domain))
        .route("/v1/domains/{domain}", delete(remove_domain))
        .route("/v1/users", get(list_users).post(add_user))
        .route("/v1/users/{address}", delete(remove_user))
        .route("/v1/users/{address}/password", put(set_password))
        .route("/v1/cluster/status", get(cluster_status))
        .route("/v1/nodes/{id}/drain", axum::routing::post(drain_node))
        .route("/v1/nodes/{id}", delete(remove_node))
        .route("/v1/log-level", put(log_level))
        .route("/v1/tls", get(list_tls))
        .route("/v1/tls/{name}", put(set_tls).delete(remove_tls))
        .route("/v1/queue", get(list_queue))
        .route("/v1/queue/{id}", get(show_queued).delete(remove_queued))
        .route("/v1/queue/{id}/{action}", axum::routing::post(queue_action))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api)
        .layer(DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX))
        .with_state(state)
}

/// Admin connections open at once, all addresses together, and from one
/// address: the admin port is for operators and scripts, not crowds.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;
pub const ADMIN_CONNECTIONS_PER_ADDRESS_MAX: u32 = 16;
/// A request's head must arrive within this (slowloris), and a connection
/// lives at most `ADMIN_CONNECTION_LIFETIME` (a purge of a large mailbox
/// fits well inside).
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
const ADMIN_CONNECTION_LIFETIME: std::time::Duration = std::time::Duration::from_secs(600);

/// Serves the admin API on `listener` until `stop`: HTTP/1.1 over hyper
/// with a cap on connections (in all and per address: one over the cap is
/// closed at once), a deadline for each request head and a longest
/// connection lifetime.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, mut stop: tokio::sync::watch::Receiver<bool>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX));
    let per_address = Arc::new(crate::conn::PerAddress::default());
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let permit = slots.clone().try_acquire_owned().ok();
        let slot = per_address.acquire(peer.ip(), ADMIN_CONNECTIONS_PER_ADDRESS_MAX);
        let (Some(permit), Some(slot)) = (permit, slot) else {
            tracing::debug!(%peer, "admin connection refused: too many");
            drop(stream);
            continue;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = stop.clone();
        conns.spawn(async move {
            let _held = (permit, slot);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let lifetime = tokio::time::sleep(ADMIN_CONNECTION_LIFETIME);
            tokio::pin!(lifetime);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = &mut lifetime => {}
                _ = stop.changed() => {}
            }
            // Let a request in flight finish (bounded), then close.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), conn).await;
        });
    }
    // Each connection closes itself on `stop` (bounded).
    while conns.join_next().await.is_some() {}
}

async fn apply(state: &AdminState, cmd: DirectoryCommand) -> ApiResult {
    state.services.directory.apply(cmd).await?;
    Ok((StatusCode::OK, Json(json!({ "ok": true }))).into_response())
}

async fn list_domains(State(s): State<AdminState>, h: HeaderMap) -> ApiResult {
    check(&s, &h)?;
    Ok(Json(s.services.directory.domains()).into_response())
}

#[derive(Deserialize)]
struct DomainBody {
    domain: String,
}

async fn add_domain(State(s): State<AdminState>, h: HeaderMap, Json(b): Json<DomainBody>) -> ApiResult {
    check(&s, &h)?;
    apply(&s, DirectoryCommand::AddDomain { domain: b.domain }).await
}

async fn remove_domain(State(s): State<AdminState>, h: HeaderMap, Path(domain): Path<String>) -> ApiResult {
    check(&s, &h)?;
    apply(&s, DirectoryCommand::RemoveDomain { domain }).await
}

async fn list_users(State(s): State<AdminState>, h: HeaderMap) -> ApiResult {
    check(&s, &h)?;
    Ok(Json(s.services.directory.users()).into_response())
}

#[derive(Deserialize)]
struct UserBody {
    address: String,
    password: String,
    quota_bytes: Option<u64>,
}

async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || membership::password::hash(&password))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn add_user(State(s): State<AdminState>, h: HeaderMap, Json(b): Json<UserBody>) -> ApiResult {
    check(&s, &h)?;
    let password_hash = hash_password(b.password).await?;
    apply(
        &s,
        DirectoryCommand::AddUser {
            address: b.address,
            password_hash,
            quota_bytes: b.quota_bytes,
        },
    )
    .await
}

#[derive(Deserialize, Default)]
struct RemoveQuery {
    #[serde(default)]
    purge: bool,
}

/// Removes a user. One with mail is refused unless `?purge=true`, which
/// deletes every message on every replica first (tombstones, so that a node
/// that is down cannot bring them back) and again after the removal (mail
/// that arrived meanwhile). Whatever is left, the next user given this
/// address has a new mailbox name ([`membership::UserRecord::mailbox`]) and
/// starts empty.
async fn remove_user(
    State(s): State<AdminState>,
    h: HeaderMap,
    Path(address): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> ApiResult {
    check(&s, &h)?;
    let user = s
        .services
        .directory
        .user(&address)
        .ok_or_else(|| ApiError::from(DirectoryError::NoSuchUser(address.clone())))?;
    let mailbox = user.mailbox();
    let purge = |mailbox: String| {
        let mail = s.services.mail.clone();
        async move {
            let msgs = mail.mailbox(&mailbox).await;
            let n = msgs.len();
            if n > 0 {
                mail.delete(&mailbox, &msgs)
                    .await
                    .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("purging the mailbox: {e}")))?;
            }
            Ok::<usize, ApiError>(n)
        }
    };
    let held = s.services.mail.mailbox(&mailbox).await.len();
    if held > 0 && !q.purge {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "{} has {held} message(s); remove with --purge to delete them",
                user.address
            ),
        ));
    }
    let mut purged = if q.purge { purge(mailbox.clone()).await? } else { 0 };
    s.services
        .directory
        .apply(DirectoryCommand::RemoveUser { address })
        .await?;
    if q.purge {
        purged += purge(mailbox.clone()).await?;
    }
    // Its folders, their UIDs and its subscriptions go too (a mailbox name
    // is never reused: see `UserRecord::mailbox`).
    let uids = &s.services.uids;
    let scope = crate::imap_folders::scope(&mailbox);
    let folders: Vec<(String, [u8; 16])> = uids.names(&scope).into_iter().collect();
    let mut ids: Vec<String> = folders
        .iter()
        .map(|(_, id)| crate::imap_folders::id_string(id))
        .collect();
    ids.push(crate::imap_folders::INBOX.to_owned());
    let subs: Vec<(String, [u8; 16])> = uids
        .names(&crate::imap_folders::subscriptions(&mailbox))
        .into_iter()
        .collect();
    let mut dropped = uids
        .unbind(&scope, folders)
        .await
        .and(uids.unbind(&crate::imap_folders::subscriptions(&mailbox), subs).await);
    for id in ids {
        dropped = dropped.and(uids.drop_folder(&crate::uids::sequence_name(&mailbox, &id)).await);
    }
    if let Err(e) = dropped {
        tracing::warn!(user = %user.address, error = %e, "the user's folders and UIDs were not all dropped");
    }
    tracing::info!(user = %user.address, purged, "user removed");
    Ok(Json(json!({ "ok": true, "purged": purged })).into_response())
}

#[derive(Deserialize)]
struct PasswordBody {
    password: String,
}

async fn set_password(
    State(s): State<AdminState>,
    h: HeaderMap,
    Path(address): Path<String>,
    Json(b): Json<PasswordBody>,
) -> ApiResult {
    check(&s, &h)?;
    let password_hash = hash_password(b.password).await?;
    apply(&s, DirectoryCommand::SetPassword { address, password_hash }).await
}

#[derive(Deserialize)]
struct LevelBody {
    level: String,
    /// Every node that is not down, not only this one.
    #[serde(default)]
    all: bool,
}

/// How long `log-level --all` waits for each other node.
const LOG_LEVEL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Sets the log filter on this node, or (`all`) on every node that is not
/// down, through the cluster wire. A bad filter is refused here before any
/// node changes; the reply names each node and what it answered.
async fn log_level(State(s): State<AdminState>, h: HeaderMap, Json(b): Json<LevelBody>) -> ApiResult {
    check(&s, &h)?;
    (s.set_log_level)(&b.level).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    tracing::info!(level = %b.level, "log level changed");
    let mut nodes = serde_json::Map::new();
    nodes.insert(s.name.clone(), json!("ok"));
    if b.all {
        let view = s.cluster.membership.view();
        let me = s.cluster.id();
        let asks: Vec<_> = view
            .nodes
            .values()
            .filter(|n| n.id != me && n.state != membership::NodeState::Down)
            .map(|n| {
                let (cluster, name, addr) = (s.cluster.clone(), n.name.clone(), n.addrs.cluster.clone());
                let req = crate::cluster::ClusterRequest::SetLogLevel {
                    filter: b.level.clone(),
                };
                tokio::spawn(async move {
                    let r = tokio::time::timeout(LOG_LEVEL_TIMEOUT, cluster.transport.request(&addr, &req)).await;
                    let said = match r {
                        Ok(Ok(crate::cluster::ClusterReply::Done)) => "ok".to_owned(),
                        Ok(Ok(crate::cluster::ClusterReply::Refused(e))) => format!("refused: {e}"),
                        Ok(Ok(_)) => "unexpected reply".to_owned(),
                        Ok(Err(e)) => format!("unreachable: {e:#}"),
                        Err(_) => format!("no answer within {LOG_LEVEL_TIMEOUT:?}"),
                    };
                    (name, said)
                })
            })
            .collect();
        for a in asks {
            if let Ok((name, said)) = a.await {
                nodes.insert(name, json!(said));
            }
        }
    }
    let all_ok = nodes.values().all(|v| v == "ok");
    Ok(Json(
        json!({ "ok": all_ok, "level": b.level, "scope": if b.all { "all" } else { "this node" }, "nodes": nodes }),
    )
    .into_response())
}

/// DESIGN.md's status object, from this node's copy of the view. Message
/// and byte counts come from each node (null when it does not answer).
pub async fn status_json(s: &AdminState) -> serde_json::Value {
    let view = s.cluster.membership.view();
    let me = s.cluster.id();
    // Ask the other nodes for their counts all at once, so that a dead node
    // not yet marked down costs one short timeout, not one per node.
    let asks: Vec<_> = view
        .nodes
        .values()
        .filter(|n| n.id != me && n.state != membership::NodeState::Down)
        .map(|n| {
            let (cluster, id, addr) = (s.cluster.clone(), n.id, n.addrs.cluster.clone());
            tokio::spawn(async move { (id, cluster.stats_of(&addr).await) })
        })
        .collect();
    let mut counts = std::collections::HashMap::new();
    for a in asks {
        if let Ok((id, Some(c))) = a.await {
            counts.insert(id, c);
        }
    }
    let service: &dyn crate::rpc::ReplicaService = s.replica.as_ref();
    counts.insert(me, crate::cluster::node_stats(&s.services.store, Some(service)));
    // Each under-replicated message is counted by one live holder only.
    let under_replicated: u64 = counts.values().map(|c| c.under_replicated).sum();
    let mut nodes = Vec::new();
    for n in view.nodes.values() {
        let c = counts.get(&n.id);
        let state = match n.state {
            membership::NodeState::Up => "up",
            membership::NodeState::Down => "down",
            membership::NodeState::Draining => "draining",
        };
        nodes.push(json!({
            "id": n.id,
            "name": n.name,
            "state": state,
            "voter": n.voter,
            "messages": c.map(|c| c.messages),
            "bytes": c.map(|c| c.bytes),
            // What the node is doing: "draining" (handing its copies off),
            // "repairing" (restoring copies it coordinates), else "serving";
            // `repair_pending` counts what its running round has left.
            "activity": match (n.state, c.map(|c| c.repair_pending)) {
                (membership::NodeState::Draining, _) => "draining",
                (membership::NodeState::Down, _) => "down",
                (_, Some(p)) if p > 0 => "repairing",
                _ => "serving",
            },
            "repair_pending": c.map(|c| c.repair_pending),
            "repairs_copied": c.map(|c| c.repairs_copied),
            "queued": c.map(|c| c.queued),
            "addrs": {
                "cluster": n.addrs.cluster,
                "smtp": n.addrs.smtp,
                "submission": n.addrs.submission,
                "lmtp": n.addrs.lmtp,
                "pop3": n.addrs.pop3,
                "imap": n.addrs.imap,
                "smtps": n.addrs.smtps,
                "pop3s": n.addrs.pop3s,
                "imaps": n.addrs.imaps,
                "admin": n.addrs.admin,
            }
        }));
    }
    json!({
        "self": me,
        "epoch": view.epoch,
        "leader": s.cluster.membership.leader(),
        "under_replicated": under_replicated,
        // Outbound queue entries, as copies over every node that answered
        // (each entry is stored on R nodes).
        "queued_copies": counts.values().map(|c| c.queued).sum::<u64>(),
        "nodes": nodes,
    })
}

async fn cluster_status(State(s): State<AdminState>, h: HeaderMap) -> ApiResult {
    check(&s, &h)?;
    Ok(Json(status_json(&s).await).into_response())
}

fn node_error(e: membership::MembershipError) -> ApiError {
    let code = match &e {
        membership::MembershipError::Refused(_) => StatusCode::CONFLICT,
        membership::MembershipError::Timeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(code, e.to_string())
}

/// A node given by id or by name.
fn find_node(s: &AdminState, key: &str) -> Result<u64, ApiError> {
    let view = s.cluster.membership.view();
    view.nodes
        .values()
        .find(|n| n.id.to_string() == key || n.name == key)
        .map(|n| n.id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no such node: {key}")))
}

fn describe_pair(name: Option<&str>, p: &crate::tls::Pair) -> serde_json::Value {
    json!({ "name": name, "names": p.names, "not_after": p.not_after, "fingerprint": p.fingerprint })
}

async fn list_tls(State(s): State<AdminState>, h: HeaderMap) -> ApiResult {
    check(&s, &h)?;
    let Some(tls) = &s.services.tls else {
        return Ok(Json(json!({ "cluster": [], "local": [] })).into_response());
    };
    let cluster: Vec<_> = tls
        .certs
        .cluster()
        .iter()
        .map(|(n, p)| describe_pair(Some(n), p))
        .collect();
    let local: Vec<_> = tls.certs.local().iter().map(|p| describe_pair(None, p)).collect();
    Ok(Json(json!({ "cluster": cluster, "local": local })).into_response())
}

#[derive(Deserialize)]
struct TlsBody {
    cert_pem: String,
    key_pem: String,
}

async fn set_tls(
    State(s): State<AdminState>,
    h: HeaderMap,
    Path(name): Path<String>,
    Json(b): Json<TlsBody>,
) -> ApiResult {
    check(&s, &h)?;
    // Refused here, with the reason, before it reaches any node.
    let now = i64::try_from(crate::time::now_ms() / 1000).unwrap_or(i64::MAX);
    let pair = crate::tls::check_pair(b.cert_pem.as_bytes(), b.key_pem.as_bytes(), now)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let cert = membership::StoredCert {
        cert_pem: b.cert_pem,
        key_pem: b.key_pem,
    };
    s.cluster
        .membership
        .set_tls_cert(name.clone(), cert)
        .await
        .map_err(|e| match e {
            membership::MembershipError::Refused(why) => ApiError(StatusCode::BAD_REQUEST, why),
            other => node_error(other),
        })?;
    Ok(Json(json!({ "ok": true, "certificate": describe_pair(Some(&name), &pair) })).into_response())
}

async fn remove_tls(State(s): State<AdminState>, h: HeaderMap, Path(name): Path<String>) -> ApiResult {
    check(&s, &h)?;
    s.cluster.membership.remove_tls_cert(name).await.map_err(|e| match e {
        membership::MembershipError::Refused(why) => ApiError(StatusCode::NOT_FOUND, why),
        other => node_error(other),
    })?;
    Ok(Json(json!({ "ok": true })).into_response())
}

/// Queue entries listed at most by `GET /v1/queue`.
const QUEUE_LIST_MAX: usize = 1000;

/// One queue entry as the API shows it (reading its envelope).
async fn queue_entry(s: &AdminState, shard: &str, l: &replication::replica::Listed, header: bool) -> serde_json::Value {
    let now = crate::time::now_ms();
    let body = s.services.mail.read(l).await.ok();
    let decoded = body.as_deref().and_then(crate::queue::decode);
    let marks = &l.meta.marks;
    let (from, rcpts, queued_ms, head) = match &decoded {
        Some((env, msg)) => {
            let rcpts: Vec<serde_json::Value> = env
                .rcpts
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let state = if marks.has(&crate::queue::ok_flag(i)) {
                        "delivered"
                    } else if marks.has(&crate::queue::failed_flag(i)) {
                        "failed"
                    } else {
                        "pending"
                    };
                    json!({ "address": r, "state": state })
                })
                .collect();
            let head = header.then(|| String::from_utf8_lossy(&msg[..crate::imap::header_end(msg)]).into_owned());
            (env.from.clone(), rcpts, env.queued_ms, head)
        }
        None => (String::new(), vec![], l.meta.arrival_ms, None),
    };
    let mut v = json!({
        "id": l.meta.id.to_hex(),
        "shard": shard,
        "from": from,
        "rcpts": rcpts,
        "queued_ms": queued_ms,
        "age_s": now.saturating_sub(queued_ms) / 1000,
        "size": l.meta.size_bytes,
        "held": marks.has("held"),
        "replicas": l.meta.replicas,
        "readable": decoded.is_some(),
    });
    if let Some(h) = head {
        v["header"] = json!(h);
    }
    v
}

async fn list_queue(State(s): State<AdminState>, h: HeaderMap) -> ApiResult {
    check(&s, &h)?;
    let mut entries = Vec::new();
    let mut total = 0usize;
    for k in 0..crate::queue::SHARDS {
        let shard = crate::queue::shard_mailbox(k);
        for l in s.services.mail.mailbox(&shard).await {
            total += 1;
            if entries.len() < QUEUE_LIST_MAX {
                entries.push(queue_entry(&s, &shard, &l, false).await);
            }
        }
    }
    Ok(Json(json!({ "entries": entries, "total": total, "listed_max": QUEUE_LIST_MAX })).into_response())
}

/// The queue entry named by a hex id, and its shard.
async fn find_queued(s: &AdminState, id: &str) -> Result<(String, replication::replica::Listed), ApiError> {
    let bytes: Vec<u8> = (0..id.len())
        .step_by(2)
        .filter_map(|i| id.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect();
    let raw: [u8; 16] = bytes.try_into().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a queue id (32 hex digits)"),
        )
    })?;
    let shard = crate::queue::shard_mailbox(crate::queue::shard_of(&raw));
    let found = s
        .services
        .mail
        .mailbox(&shard)
        .await
        .into_iter()
        .find(|l| l.meta.id.0 == raw)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no queued message {id}")))?;
    Ok((shard, found))
}

async fn show_queued(State(s): State<AdminState>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    check(&s, &h)?;
    let (shard, l) = find_queued(&s, &id).await?;
    Ok(Json(queue_entry(&s, &shard, &l, true).await).into_response())
}

async fn remove_queued(State(s): State<AdminState>, h: HeaderMap, Path(id): Path<String>) -> ApiResult {
    check(&s, &h)?;
    let (shard, l) = find_queued(&s, &id).await?;
    s.services
        .mail
        .delete(&shard, std::slice::from_ref(&l))
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tracing::info!(%id, "queued message removed by an operator");
    Ok(Json(json!({ "ok": true, "removed": id })).into_response())
}

/// retry, hold, release: a flag register of the entry, which its owner
/// reads at its next look.
async fn queue_action(
    State(s): State<AdminState>,
    h: HeaderMap,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult {
    check(&s, &h)?;
    let (name, set) = match action.as_str() {
        "retry" => ("retry", true),
        "hold" => ("held", true),
        "release" => ("held", false),
        other => return Err(ApiError(StatusCode::NOT_FOUND, format!("no queue action {other:?}"))),
    };
    let (shard, l) = find_queued(&s, &id).await?;
    let hlc = s.services.mail.hlc_now();
    let mut flags = vec![replication::FlagMark {
        name: name.to_owned(),
        set,
        hlc,
    }];
    if action == "release" {
        // Released: tried at once.
        flags.push(replication::FlagMark {
            name: "retry".to_owned(),
            set: true,
            hlc,
        });
    }
    let change = replication::MarkChange {
        id: l.meta.id,
        folder: None,
        flags,
    };
    s.services
        .mail
        .mark(&shard, &[(l, change)])
        .await
        .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(Json(json!({ "ok": true, "id": id, "action": action })).into_response())
}

async fn drain_node(State(s): State<AdminState>, h: HeaderMap, Path(key): Path<String>) -> ApiResult {
    check(&s, &h)?;
    let id = find_node(&s, &key)?;
    s.cluster
        .membership
        .set_node_state(id, membership::NodeState::Draining)
        .await
        .map_err(node_error)?;
    Ok(Json(json!({ "ok": true, "node": id, "state": "draining" })).into_response())
}

async fn remove_node(State(s): State<AdminState>, h: HeaderMap, Path(key): Path<String>) -> ApiResult {
    check(&s, &h)?;
    let id = find_node(&s, &key)?;
    if id == s.cluster.id() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "a node cannot remove itself; ask another node".into(),
        ));
    }
    if s.cluster.membership.leader() == Some(id) {
        // openraft 0.9 has no leadership transfer, and a leader committing
        // its own removal is unsafe there (databendlabs/openraft#923).
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("node {id} is the Raft leader: stop it first (the cluster elects another leader), then remove it"),
        ));
    }
    s.cluster.membership.remove_node(id).await.map_err(node_error)?;
    Ok(Json(json!({ "ok": true, "removed": id })).into_response())
}

async fn metrics(State(s): State<AdminState>) -> Response {
    let m = &s.services.metrics;
    let st = s.services.store.stats();
    let mut out = String::new();
    let mut line = |name: &str, kind: &str, help: &str, v: u64| {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"));
    };
    let c = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    line(
        "quill_smtp_sessions_total",
        "counter",
        "SMTP sessions accepted.",
        c(&m.smtp_sessions),
    );
    line(
        "quill_lmtp_sessions_total",
        "counter",
        "LMTP sessions accepted.",
        c(&m.lmtp_sessions),
    );
    line(
        "quill_pop3_logins_total",
        "counter",
        "Successful POP3 logins.",
        c(&m.pop3_sessions),
    );
    line(
        "quill_imap_sessions_total",
        "counter",
        "IMAP sessions accepted.",
        c(&m.imap_sessions),
    );
    line(
        "quill_imap_logins_total",
        "counter",
        "Successful IMAP logins.",
        c(&m.imap_logins),
    );
    line(
        "quill_imap_uid_failures_total",
        "counter",
        "Times UIDs could not be given to new mail (Raft state not writable).",
        c(&m.imap_uid_failures),
    );
    let q = &s.services.queue;
    for (name, kind, help, v) in [
        (
            "quill_queue_messages_held",
            "gauge",
            "Outbound queue entries stored on this node (the bounds apply to these).",
            c(&q.held_messages),
        ),
        (
            "quill_queue_bytes_held",
            "gauge",
            "Outbound queue bytes stored on this node.",
            c(&q.held_bytes),
        ),
        (
            "quill_queue_messages_owned",
            "gauge",
            "Outbound queue entries in the shards this node works.",
            c(&q.owned_messages),
        ),
        (
            "quill_queue_oldest_age_ms",
            "gauge",
            "Age of the oldest entry in the shards this node works.",
            c(&q.oldest_ms),
        ),
        (
            "quill_queue_slow_domains",
            "gauge",
            "Destinations in the slow lane.",
            c(&q.slow_domains),
        ),
        (
            "quill_outbound_delivered_total",
            "counter",
            "Recipients delivered to a remote server.",
            c(&q.delivered),
        ),
        (
            "quill_outbound_deferred_total",
            "counter",
            "Recipient tries that failed temporarily (retried).",
            c(&q.deferred),
        ),
        (
            "quill_outbound_failed_total",
            "counter",
            "Recipients that failed for good (bounced).",
            c(&q.failed),
        ),
        (
            "quill_outbound_bounces_total",
            "counter",
            "Delivery status notifications made.",
            c(&q.bounces),
        ),
        (
            "quill_outbound_cut_transactions_total",
            "counter",
            "Transactions cut after DATA was sent (a duplicate is possible).",
            c(&q.cut_transactions),
        ),
    ] {
        line(name, kind, help, v);
    }
    line(
        "quill_imap_stores_total",
        "counter",
        "IMAP STORE commands that changed flags.",
        c(&m.imap_stores),
    );
    line(
        "quill_imap_copies_total",
        "counter",
        "Messages copied by IMAP COPY.",
        c(&m.imap_copies),
    );
    line(
        "quill_imap_moves_total",
        "counter",
        "Messages moved by IMAP MOVE.",
        c(&m.imap_moves),
    );
    line(
        "quill_messages_accepted_total",
        "counter",
        "Messages stored and acknowledged.",
        c(&m.messages_accepted),
    );
    line(
        "quill_deliveries_failed_total",
        "counter",
        "Deliveries refused by a storage error.",
        c(&m.deliveries_failed),
    );
    line(
        "quill_messages_retrieved_total",
        "counter",
        "Messages sent by RETR.",
        c(&m.messages_retrieved),
    );
    line(
        "quill_messages_deleted_total",
        "counter",
        "Messages deleted at POP3 QUIT.",
        c(&m.messages_deleted),
    );
    line(
        "quill_auth_failures_total",
        "counter",
        "Failed logins.",
        c(&m.auth_failures),
    );
    line(
        "quill_limit_refusals_total",
        "counter",
        "Requests refused by a limit.",
        c(&m.limit_refusals),
    );
    line(
        "quill_connections_refused_total",
        "counter",
        "Connections refused by a limit.",
        c(&m.connections_refused),
    );
    line(
        "quill_tls_handshakes_total",
        "counter",
        "Client TLS handshakes completed (implicit TLS and STARTTLS).",
        c(&m.tls_handshakes),
    );
    line(
        "quill_tls_handshake_failures_total",
        "counter",
        "Client TLS handshakes that failed or timed out.",
        c(&m.tls_handshake_failures),
    );
    line(
        "quill_starttls_injections_total",
        "counter",
        "STARTTLS commands followed by plaintext before the handshake (discarded).",
        c(&m.tls_injected),
    );
    line(
        "quill_plaintext_auth_refused_total",
        "counter",
        "Logins refused because the session was not encrypted (--plaintext-auth).",
        c(&m.plaintext_auth_refused),
    );
    line(
        "quill_store_entries",
        "gauge",
        "Mailbox entries stored on this node.",
        st.entries,
    );
    line(
        "quill_store_bodies",
        "gauge",
        "Distinct message bodies stored.",
        st.bodies,
    );
    line(
        "quill_store_body_bytes",
        "gauge",
        "Bytes of the bodies stored.",
        st.body_bytes,
    );
    line(
        "quill_store_disk_bytes",
        "gauge",
        "Bytes of all segment files.",
        st.disk_bytes,
    );
    line(
        "quill_store_live_bytes",
        "gauge",
        "Bytes of segment files still in use.",
        st.live_bytes,
    );
    line("quill_store_segments", "gauge", "Segment files.", st.segments);
    line(
        "quill_store_fsyncs_total",
        "counter",
        "Fsyncs of the store (group commits).",
        st.fsyncs,
    );
    line(
        "quill_store_ops_total",
        "counter",
        "Store writes covered by those fsyncs.",
        st.ops,
    );
    line(
        "quill_store_tombstones",
        "gauge",
        "Deletions remembered so that missed replicas cannot resurrect mail.",
        st.tombstones,
    );
    let r = &s.replica;
    line(
        "quill_under_replicated",
        "gauge",
        "Messages held here with fewer than R live replicas (each counted on one node).",
        r.under_replicated(),
    );
    line(
        "quill_replica_pending_updates",
        "gauge",
        "Deletions waiting in the update log for a replica to return.",
        r.pending_updates() as u64,
    );
    line(
        "quill_repair_pending",
        "gauge",
        "Copies this node's running repair round has yet to restore or hand off.",
        r.counters.repair_pending.load(std::sync::atomic::Ordering::Relaxed),
    );
    let rc = &r.counters;
    for (name, help, v) in [
        (
            "quill_replica_deliveries_total",
            "Deliveries this node sent to replicas.",
            &rc.deliveries,
        ),
        (
            "quill_replica_deliveries_under_replicated_total",
            "Deliveries stored on fewer than R nodes.",
            &rc.deliveries_under_replicated,
        ),
        (
            "quill_replica_copies_failed_total",
            "Copies a target node did not acknowledge.",
            &rc.copies_failed,
        ),
        (
            "quill_replica_updates_logged_total",
            "Deletions logged for a replica that did not acknowledge.",
            &rc.updates_logged,
        ),
        (
            "quill_replica_updates_replayed_total",
            "Logged deletions delivered later.",
            &rc.updates_replayed,
        ),
        (
            "quill_replica_repairs_pulled_total",
            "Copies fetched by anti-entropy.",
            &rc.repairs_pulled,
        ),
        (
            "quill_repair_copies_total",
            "Copies this node made on other nodes to restore R or hand off a draining node's copies.",
            &rc.repairs_copied,
        ),
        ("quill_repair_bytes_total", "Bytes of those copies.", &rc.repairs_bytes),
        (
            "quill_replica_repairs_tombstones_total",
            "Deletions applied by anti-entropy.",
            &rc.repairs_tombstones,
        ),
        (
            "quill_replica_manager_fallbacks_total",
            "Times a user manager did not answer and placement was done locally.",
            &rc.manager_fallbacks,
        ),
        (
            "quill_replica_calls_cut_by_view_total",
            "Calls in flight ended because a new view had their node down.",
            &rc.calls_cut_by_view,
        ),
    ] {
        line(name, "counter", help, c(v));
    }
    // The latency histograms (prometheus-client's registry) go last: its
    // text ends with `# EOF`.
    out.push_str(&s.services.latency.encode());
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

/// Every request body type parsed from `data` (the fuzz targets' entry).
#[doc(hidden)]
pub fn fuzz_bodies(data: &[u8]) {
    let _ = serde_json::from_slice::<DomainBody>(data);
    let _ = serde_json::from_slice::<UserBody>(data);
    let _ = serde_json::from_slice::<PasswordBody>(data);
    let _ = serde_json::from_slice::<LevelBody>(data);
    if let Ok(q) = std::str::from_utf8(data) {
        let _ = serde_urlencoded_like(q);
    }
}

/// The query string of `DELETE /v1/users/{address}?purge=...`, parsed as
/// axum's `Query` does.
fn serde_urlencoded_like(q: &str) -> Option<bool> {
    let uri: axum::http::Uri = format!("/x?{q}").parse().ok()?;
    Query::<RemoveQuery>::try_from_uri(&uri).ok().map(|Query(r)| r.purge)
}
