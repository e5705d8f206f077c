//! Client TLS certificates stored cluster-wide (checked before they are
//! stored: the key matches, not expired, parsable), and what this node
//! serves.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use quill_proto::admin::{CertInfo, CertList, CertSet, TlsBody};

use super::state::{AdminState, ApiResult, Failure, done, reply};

fn describe(name: Option<&str>, p: &crate::tls::Pair) -> CertInfo {
    CertInfo {
        name: name.map(str::to_owned),
        names: p.names.clone(),
        not_after: p.not_after,
        fingerprint: p.fingerprint.clone(),
    }
}

fn membership_error(e: membership::MembershipError, refused: StatusCode) -> Failure {
    match e {
        membership::MembershipError::Refused(why) => Failure(refused, why),
        membership::MembershipError::Timeout { .. } => Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        other => Failure(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    }
}

pub(super) async fn list(State(s): State<AdminState>) -> ApiResult {
    let Some(tls) = &s.services.env.tls else {
        return reply(CertList::default());
    };
    reply(CertList {
        cluster: tls.certs.cluster().iter().map(|(n, p)| describe(Some(n), p)).collect(),
        local: tls.certs.local().iter().map(|p| describe(None, p)).collect(),
    })
}

pub(super) async fn set(State(s): State<AdminState>, Path(name): Path<String>, Json(b): Json<TlsBody>) -> ApiResult {
    // Refused here, with the reason, before it reaches any node.
    let now = i64::try_from(crate::time::now_ms() / 1000).unwrap_or(i64::MAX);
    let pair = crate::tls::check_pair(b.cert_pem.as_bytes(), b.key_pem.as_bytes(), now)
        .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("{e:#}")))?;
    let cert = membership::StoredCert {
        cert_pem: b.cert_pem,
        key_pem: b.key_pem,
    };
    s.cluster
        .membership
        .set_tls_cert(name.clone(), cert)
        .await
        .map_err(|e| membership_error(e, StatusCode::BAD_REQUEST))?;
    reply(CertSet {
        ok: true,
        certificate: describe(Some(&name), &pair),
    })
}

pub(super) async fn remove(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    s.cluster
        .membership
        .remove_tls_cert(name)
        .await
        .map_err(|e| membership_error(e, StatusCode::NOT_FOUND))?;
    done()
}
