//! Cluster settings (`crate::settings`): listed as this node applies them,
//! set and unset for the whole cluster through any node.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use quill_proto::admin::{SettingBody, SettingRow};

use super::state::{AdminState, ApiResult, Failure, done, reply};

pub(super) async fn list(State(s): State<AdminState>) -> ApiResult {
    reply(rows_of(&s))
}

/// The settings as this node applies them (the JSON API's and the web
/// page's).
pub(super) fn rows_of(s: &AdminState) -> Vec<SettingRow> {
    let settings = s.cluster.membership.settings();
    crate::settings::rows(&s.flags, &s.explicit_settings, &settings.values)
        .into_iter()
        .map(|r| SettingRow {
            key: r.key,
            value: r.value,
            default: r.default,
            source: r.source,
            help: r.help,
            applies: r.applies,
        })
        .collect()
}

/// A refusal of the cluster's: a feature level it does not run at yet is a
/// conflict, a setting that is not set is not found.
fn refused(why: String) -> Failure {
    super::state::refusal(why, &[], &["is not set"])
}

pub(super) async fn set(State(s): State<AdminState>, Path(key): Path<String>, Json(b): Json<SettingBody>) -> ApiResult {
    set_value(&s, key, Some(&b.value)).await?;
    done()
}

pub(super) async fn unset(State(s): State<AdminState>, Path(key): Path<String>) -> ApiResult {
    set_value(&s, key, None).await?;
    done()
}

/// Sets (checked first) or unsets a setting for every node (the JSON
/// API's and the web page's).
pub(super) async fn set_value(s: &AdminState, key: String, value: Option<&str>) -> Result<(), Failure> {
    let value = match value {
        Some(v) => Some(crate::settings::check(&key, v).map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?),
        None => None,
    };
    s.cluster.membership.set_setting(key, value).await.map_err(refused)
}
