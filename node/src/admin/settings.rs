//! Cluster settings (`crate::settings`): listed as this node applies them,
//! set and unset for the whole cluster through any node.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use quill_proto::admin::{SettingBody, SettingRow};

use super::state::{AdminState, ApiResult, Failure, done, reply};

pub(super) async fn list(State(s): State<AdminState>) -> ApiResult {
    let settings = s.cluster.membership.settings();
    let rows: Vec<SettingRow> = crate::settings::rows(&s.flags, &s.explicit_settings, &settings.values)
        .into_iter()
        .map(|r| SettingRow {
            key: r.key,
            value: r.value,
            default: r.default,
            source: r.source,
            help: r.help,
        })
        .collect();
    reply(rows)
}

/// A refusal of the cluster's: a feature level it does not run at yet is a
/// conflict, a setting that is not set is not found.
fn refused(why: String) -> Failure {
    let code = if why.contains("feature level") {
        StatusCode::CONFLICT
    } else if why.contains("is not set") {
        StatusCode::NOT_FOUND
    } else if why.starts_with("not committed") {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::BAD_REQUEST
    };
    Failure(code, why)
}

pub(super) async fn set(State(s): State<AdminState>, Path(key): Path<String>, Json(b): Json<SettingBody>) -> ApiResult {
    let value = crate::settings::check(&key, &b.value).map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    s.cluster
        .membership
        .set_setting(key, Some(value))
        .await
        .map_err(refused)?;
    done()
}

pub(super) async fn unset(State(s): State<AdminState>, Path(key): Path<String>) -> ApiResult {
    s.cluster.membership.set_setting(key, None).await.map_err(refused)?;
    done()
}
