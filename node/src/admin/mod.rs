//! The admin API: HTTP+JSON on `--admin`, bearer-token protected, plus an
//! unauthenticated `GET /metrics` (Prometheus text, from the node's
//! registry) and `GET /health`, and the operator's web page at `/`
//! (`web`: its own cookie session, logged in with the token). The
//! requests and replies are typed once in `quill_proto::admin`, for this
//! server and for its clients ([`client`], `quill admin` in [`cli`]).
//!
//! ```text
//! GET    /v1/domains                  -> ["example.org", ...]
//! POST   /v1/domains                  {"domain": "example.org"}
//! DELETE /v1/domains/{domain}
//! GET    /v1/users                    -> [{"address": ..., "quota_bytes": ...}]
//! POST   /v1/users                    {"address", "password", "quota_bytes"?}
//! DELETE /v1/users/{address}[?purge=true]  refused (409) if the user has mail, unless purged
//! PUT    /v1/users/{address}/password {"password"}
//! PUT    /v1/users/{address}/quota    {"quota_bytes": N | null}
//! GET    /v1/cluster/status           -> DESIGN.md's status object (with versions, feature level)
//! POST   /v1/cluster/upgrade-finish   raise the feature level (409 naming the nodes holding it back)
//! POST   /v1/cluster/step-down        this node stops leading Raft (before it is stopped)
//! POST   /v1/nodes/{id}/drain         mark a node draining (placement stops choosing it)
//! DELETE /v1/nodes/{id}               take a node out of the cluster for good
//! PUT    /v1/log-level                {"level": "debug" | "quill=trace,info" ..., "all"?}
//! GET    /v1/tls                      -> {"cluster": [...], "local": [...]} certificates served here
//! PUT    /v1/tls/{name}               {"cert_pem", "key_pem"}: stored cluster-wide, checked first
//! DELETE /v1/tls/{name}
//! GET    /v1/queue                    -> the outbound queue, cluster-wide
//! GET    /v1/queue/{id}               one entry with its header
//! DELETE /v1/queue/{id}
//! POST   /v1/queue/{id}/retry|hold|release
//! GET    /v1/routes                   -> {"aliases": [...], "domain_aliases": [...], "catch_all": {...}}
//! POST   /v1/aliases                  {"address", "targets": [...]}: add or replace (409 naming a loop)
//! DELETE /v1/aliases/{address}
//! POST   /v1/domain-aliases           {"alias", "target"}: every address of alias is target's
//! DELETE /v1/domain-aliases/{alias}
//! PUT    /v1/catch-all/{domain}       {"address": "..." | null}
//! GET    /v1/sieve/{address}          -> {"active": name | null, "scripts": {name: source}}
//! PUT    /v1/sieve/{address}          {"script"}: checked (400 with line and reason), made active
//! DELETE /v1/sieve/{address}          the active script
//! PUT    /v1/taps/{domain-or-address} {"archive"}: a copy of every message accepted for it
//! GET    /v1/settings                 -> [{"key", "value", "default", "source", "help"}] as this node applies them
//! PUT    /v1/settings/{key}           {"value"}: checked (400 with the reason), for every node
//! DELETE /v1/settings/{key}
//! GET    /v1/dkim                     -> [{"domain", "selector", "algorithm", "created_secs", "signing", "record", "zone_line"}] (no private key)
//! POST   /v1/dkim/{domain}            {"selector"?, "algorithm"?}: a key made here, for every node -> its row
//! DELETE /v1/dkim/{domain}/{selector}
//! DELETE /v1/taps/{domain-or-address}
//! GET|PUT|DELETE /v1/blocklists[/{name}], /v1/access  blocklists and access rules (see `blocklist`)
//! GET    /v1/sessions                 -> {"sessions": [{"node", "protocol", "peer", "user", "since_ms", "tls"}], "missing"}
//! GET    /v1/top/{senders|recipients|clients}?window=1m|1h -> {"top": [{"key", "count", "error"}], "total", ...}
//! PUT    /v1/log-watch                {"target": address or IP, "for_secs", "all"?}: every command logged
//!
//! GET    /                            the operator's web page (the login form without a session)
//! POST   /login                       {token} as a form: a session cookie (see `web`)
//! POST   /logout|/users|/domains|...  the page's forms, each with the session's CSRF token
//! GET    /v1/export/{address}[?format=mbox|maildir]  streamed: mbox, or a Maildir tree as tar
//! POST   /v1/import/{address}[?folder=NAME]  body: mbox, streamed -> {"imported", "skipped", "folders_created"}
//! GET    /v1/backup/directory         -> domains, users with password hashes, routes, Sieve, settings, TLS keys
//! POST   /v1/restore/directory        that document, into a cluster with no user (409 otherwise)
//! ```
//! Errors are `{"error": "..."}` with 400 (bad input), 401 (token), 404,
//! 409 (conflict), 500 or 503.
//!
//! It may use the services, the cluster, TLS and the outbound queue's
//! data; nothing depends on it but the wiring.

mod activity;
mod backup;
pub mod blocklist;
pub mod cli;
pub mod client;
mod cluster;
mod directory;
mod dkim;
mod export;
mod print;
mod queue;
mod routes;
mod settings;
mod state;
mod tls;
mod transfer;
mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use serde::Serialize;

use crate::net::conn::PerAddress;
pub use activity::handler as query_handler;
pub use state::AdminState;

pub use crate::cluster::LogLevelSetter;

/// Admin requests are small JSON documents.
const ADMIN_BODY_BYTES_MAX: usize = 64 * 1024;
/// Admin connections open at once, all addresses together, and from one
/// address: the admin port is for operators and scripts, not crowds.
pub const ADMIN_CONNECTIONS_MAX: usize = 64;
pub const ADMIN_CONNECTIONS_PER_ADDRESS_MAX: u32 = 16;
/// A request's head must arrive within this (slowloris), and a connection
/// lives at most `ADMIN_CONNECTION_LIFETIME` (a purge of a large mailbox
/// fits well inside).
const ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
const ADMIN_CONNECTION_LIFETIME: Duration = Duration::from_secs(600);
/// How long a request still in flight at the end of a connection's
/// lifetime may go on: an export of a large mailbox or a backup, streamed
/// at the pace of its client (`--max-rate`).
const ADMIN_STREAM_MAX: Duration = Duration::from_secs(24 * 3600);

/// The addresses a node serves, as it prints them when ready.
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

/// Every `/v1` request shows the token before anything else of it is
/// read: the layer runs before the handlers' body extractors.
async fn require_token(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match state::check(&s, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

pub fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/v1/domains", get(directory::list_domains).post(directory::add_domain))
        .route("/v1/domains/{domain}", delete(directory::remove_domain))
        .route("/v1/users", get(directory::list_users).post(directory::add_user))
        .route("/v1/users/{address}", delete(directory::remove_user))
        .route("/v1/users/{address}/password", put(directory::set_password))
        .route("/v1/users/{address}/quota", put(directory::set_quota))
        .route("/v1/cluster/status", get(cluster::status))
        .route("/v1/cluster/upgrade-finish", post(cluster::upgrade_finish))
        .route("/v1/cluster/step-down", post(cluster::step_down))
        .route("/v1/nodes/{id}/drain", post(cluster::drain_node))
        .route("/v1/nodes/{id}", delete(cluster::remove_node))
        .route("/v1/log-level", put(cluster::log_level))
        .route("/v1/tls", get(tls::list))
        .route("/v1/tls/{name}", put(tls::set).delete(tls::remove))
        .route("/v1/queue", get(queue::list))
        .route("/v1/queue/{id}", get(queue::show).delete(queue::remove))
        .route("/v1/queue/{id}/{action}", post(queue::act))
        .route("/v1/routes", get(routes::list))
        .route("/v1/aliases", post(routes::set_alias))
        .route("/v1/aliases/{address}", delete(routes::remove_alias))
        .route("/v1/domain-aliases", post(routes::set_domain_alias))
        .route("/v1/domain-aliases/{alias}", delete(routes::remove_domain_alias))
        .route("/v1/catch-all/{domain}", put(routes::set_catch_all))
        .route("/v1/taps/{target}", put(routes::set_tap).delete(routes::remove_tap))
        .route("/v1/sessions", get(activity::sessions))
        .route("/v1/top/{kind}", get(activity::top))
        .route("/v1/log-watch", put(activity::watch))
        .route("/v1/export/{address}", get(export::export))
        .route(
            "/v1/import/{address}",
            post(export::import).layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/backup/directory", get(backup::directory))
        .route(
            "/v1/restore/directory",
            post(backup::restore).layer(DefaultBodyLimit::max(backup::DIRECTORY_BYTES_MAX)),
        )
        .route("/v1/blocklists", get(blocklist::list))
        .route(
            "/v1/blocklists/{name}",
            put(blocklist::load)
                .delete(blocklist::remove)
                .layer(DefaultBodyLimit::max(blocklist::UPLOAD_BYTES_MAX)),
        )
        .route(
            "/v1/access",
            get(blocklist::access_list)
                .put(blocklist::access_set)
                .delete(blocklist::access_remove),
        )
        .route("/v1/settings", get(settings::list))
        .route("/v1/settings/{key}", put(settings::set).delete(settings::unset))
        .route("/v1/dkim", get(dkim::list))
        .route("/v1/dkim/{domain}", post(dkim::create))
        .route("/v1/dkim/{domain}/{selector}", delete(dkim::remove))
        .route(
            "/v1/sieve/{address}",
            get(routes::get_sieve)
                .put(routes::set_sieve)
                .delete(routes::remove_sieve),
        )
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(cluster::health))
        .route("/metrics", get(metrics))
        .merge(api)
        .with_state(state.clone())
        // The operator's web page: its own cookie session, not the token.
        .merge(web::router(state))
        .layer(DefaultBodyLimit::max(ADMIN_BODY_BYTES_MAX))
}

/// `GET /metrics`: the node's registry.
async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.services.metrics.encode(),
    )
        .into_response()
}

/// Serves the admin API on `listener` until `stop`: HTTP/1.1 over hyper
/// with a cap on connections (in all and per address: one over the cap is
/// closed at once), a deadline for each request head and a longest
/// connection lifetime.
pub async fn serve(listener: tokio::net::TcpListener, app: Router, stop: tokio::sync::watch::Receiver<bool>) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(ADMIN_CONNECTIONS_MAX));
    let per_address = Arc::new(PerAddress::default());
    let conn_stop = stop.clone();
    let mut conns = crate::net::accept_loop(&listener, "admin", stop, |stream, peer| {
        let permit = slots.clone().try_acquire_owned().ok();
        let slot = per_address.acquire(peer.ip(), ADMIN_CONNECTIONS_PER_ADDRESS_MAX);
        let (Some(permit), Some(slot)) = (permit, slot) else {
            tracing::debug!(%peer, "admin connection refused: too many");
            return None;
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut stop = conn_stop.clone();
        Some(async move {
            let _held = (permit, slot);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            let lifetime = tokio::time::sleep(ADMIN_CONNECTION_LIFETIME);
            tokio::pin!(lifetime);
            let finish_within = tokio::select! {
                _ = conn.as_mut() => return,
                // A request in flight past the lifetime is a long export or
                // backup (every other answers at once): it may finish.
                _ = &mut lifetime => ADMIN_STREAM_MAX,
                _ = stop.changed() => Duration::from_secs(5),
            };
            // Let a request in flight finish (bounded), then close.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(finish_within, conn).await;
        })
    })
    .await;
    // Each connection closes itself on `stop` (bounded).
    while conns.join_next().await.is_some() {}
}
