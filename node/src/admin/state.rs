//! What every admin handler shares: the node it acts on, the token
//! check, and the typed replies and failures.

use std::sync::Arc;

use axum::Json;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use membership::DirectoryError;
use quill_proto::admin::{ApiError, Done};
use serde::Serialize;

use crate::cluster::replica::NodeReplicator;
use crate::cluster::{Cluster, LogLevelSetter};
use crate::services::Services;

#[derive(Clone)]
pub struct AdminState {
    pub services: Arc<Services>,
    /// This node's replicator (status).
    pub replica: Arc<NodeReplicator>,
    pub token: Arc<String>,
    pub cluster: Cluster,
    pub name: String,
    pub set_log_level: LogLevelSetter,
    /// This node's limits from its flags, and the settings it was given a
    /// flag for (see `crate::settings`).
    pub flags: Arc<crate::services::Limits>,
    pub explicit_settings: Arc<std::collections::BTreeSet<String>>,
}

/// A failed request: its status and why.
pub struct Failure(pub StatusCode, pub String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(ApiError { error: self.1 })).into_response()
    }
}

impl From<DirectoryError> for Failure {
    fn from(e: DirectoryError) -> Self {
        let code = match &e {
            DirectoryError::BadDomain(_) | DirectoryError::BadAddress(_) => StatusCode::BAD_REQUEST,
            DirectoryError::DomainExists(_) | DirectoryError::UserExists(_) | DirectoryError::DomainNotEmpty(_) => {
                StatusCode::CONFLICT
            }
            DirectoryError::NoSuchDomain(_) | DirectoryError::NoSuchUser(_) => StatusCode::NOT_FOUND,
            DirectoryError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(code, e.to_string())
    }
}

/// A write the cluster refused, as a reply: a feature level it does not
/// run at yet (or a reason containing one of `conflict`) is 409, a reason
/// containing one of `not_found` 404, a write not committed 503, the
/// rest 400.
pub fn refusal(why: String, conflict: &[&str], not_found: &[&str]) -> Failure {
    let code = if why.contains("feature level") || conflict.iter().any(|c| why.contains(c)) {
        StatusCode::CONFLICT
    } else if not_found.iter().any(|n| why.contains(n)) {
        StatusCode::NOT_FOUND
    } else if why.starts_with("not committed") {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::BAD_REQUEST
    };
    Failure(code, why)
}

pub type ApiResult = Result<Response, Failure>;

/// A typed reply as JSON with 200.
pub fn reply<T: Serialize>(v: T) -> ApiResult {
    Ok(Json(v).into_response())
}

pub fn done() -> ApiResult {
    reply(Done { ok: true })
}

pub fn check(state: &AdminState, headers: &HeaderMap) -> Result<(), Failure> {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(t) if token_matches(state, t) => Ok(()),
        _ => Err(Failure(StatusCode::UNAUTHORIZED, "missing or wrong admin token".into())),
    }
}

/// Whether `given` is the admin token (the bearer header's, or the web
/// page's login form's).
pub fn token_matches(state: &AdminState, given: &str) -> bool {
    // Compare hashes so the time taken says nothing about the token.
    blake3::hash(given.as_bytes()) == blake3::hash(state.token.as_bytes())
}
