//! Recipients that are not users: aliases, domain aliases and catch-alls,
//! in the Raft state (`membership::routes`), changed through any node.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use membership::{CommandError, RouteError, RoutesCommand, RoutesWriteError};
use quill_proto::admin::{AliasBody, CatchAllBody, DomainAliasBody, RoutesList, SieveBody, SieveList, TapBody};

use super::state::{AdminState, ApiResult, Failure, done, reply};

impl From<RoutesWriteError> for Failure {
    fn from(e: RoutesWriteError) -> Self {
        let code = match &e {
            RoutesWriteError::Refused(CommandError::Route(r)) => match r {
                RouteError::BadAddress(_) | RouteError::BadDomain(_) | RouteError::TargetCount => {
                    StatusCode::BAD_REQUEST
                }
                RouteError::NoSuchAlias(_)
                | RouteError::NoSuchDomainAlias(_)
                | RouteError::NotLocal(_)
                | RouteError::NoSuchUser(_)
                | RouteError::NoSuchScript(_)
                | RouteError::NoSuchTap(_) => StatusCode::NOT_FOUND,
                RouteError::ScriptLimit => StatusCode::BAD_REQUEST,
                _ => StatusCode::CONFLICT,
            },
            // Below the feature level that brought routes.
            RoutesWriteError::Refused(CommandError::FeatureLevel { .. }) => StatusCode::CONFLICT,
            RoutesWriteError::Refused(_) => StatusCode::INTERNAL_SERVER_ERROR,
            RoutesWriteError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        Failure(code, e.to_string())
    }
}

async fn apply(s: &AdminState, cmd: RoutesCommand) -> ApiResult {
    s.services.directory.apply_routes(cmd).await?;
    done()
}

pub(super) async fn list(State(s): State<AdminState>) -> ApiResult {
    let r = s.services.directory.routes();
    reply(RoutesList {
        aliases: r
            .aliases
            .into_iter()
            .map(|(address, targets)| AliasBody { address, targets })
            .collect(),
        domain_aliases: r
            .domain_aliases
            .into_iter()
            .map(|(alias, target)| DomainAliasBody { alias, target })
            .collect(),
        catch_all: r.catch_all,
        taps: r.taps,
    })
}

pub(super) async fn set_tap(
    State(s): State<AdminState>,
    Path(target): Path<String>,
    Json(b): Json<TapBody>,
) -> ApiResult {
    let cmd = RoutesCommand::SetTap {
        target,
        archive: Some(b.archive),
    };
    apply(&s, cmd).await
}

pub(super) async fn remove_tap(State(s): State<AdminState>, Path(target): Path<String>) -> ApiResult {
    apply(&s, RoutesCommand::SetTap { target, archive: None }).await
}

pub(super) async fn set_alias(State(s): State<AdminState>, Json(b): Json<AliasBody>) -> ApiResult {
    // The SRS key, should this be the first alias: fresh randomness from
    // this node, the same on every node once committed.
    let srs_key =
        crate::files::random_bytes().map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let cmd = RoutesCommand::SetAlias {
        address: b.address,
        targets: b.targets,
        srs_key,
    };
    apply(&s, cmd).await
}

pub(super) async fn remove_alias(State(s): State<AdminState>, Path(address): Path<String>) -> ApiResult {
    apply(&s, RoutesCommand::RemoveAlias { address }).await
}

pub(super) async fn set_domain_alias(State(s): State<AdminState>, Json(b): Json<DomainAliasBody>) -> ApiResult {
    let cmd = RoutesCommand::SetDomainAlias {
        alias: b.alias,
        target: b.target,
    };
    apply(&s, cmd).await
}

pub(super) async fn remove_domain_alias(State(s): State<AdminState>, Path(alias): Path<String>) -> ApiResult {
    apply(&s, RoutesCommand::RemoveDomainAlias { alias }).await
}

pub(super) async fn set_catch_all(
    State(s): State<AdminState>,
    Path(domain): Path<String>,
    Json(b): Json<CatchAllBody>,
) -> ApiResult {
    let cmd = RoutesCommand::SetCatchAll {
        domain,
        address: b.address,
    };
    apply(&s, cmd).await
}

/// The name `quill admin sieve set` stores a script under.
pub const ADMIN_SCRIPT_NAME: &str = "quill";

pub(super) async fn set_sieve(
    State(s): State<AdminState>,
    Path(address): Path<String>,
    Json(b): Json<SieveBody>,
) -> ApiResult {
    if let Err(e) = quill_proto::sieve::compile(&b.script) {
        return Err(Failure(StatusCode::BAD_REQUEST, format!("script refused: {e}")));
    }
    let srs_key =
        crate::files::random_bytes().map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let cmd = RoutesCommand::PutSieve {
        user: address,
        name: ADMIN_SCRIPT_NAME.to_owned(),
        script: Some(b.script),
        activate: true,
        srs_key,
    };
    apply(&s, cmd).await
}

pub(super) async fn get_sieve(State(s): State<AdminState>, Path(address): Path<String>) -> ApiResult {
    let all = s.services.directory.sieve_scripts(&address);
    reply(SieveList {
        active: all.active,
        scripts: all.scripts,
    })
}

/// Removes the user's active script (and with it any filtering).
pub(super) async fn remove_sieve(State(s): State<AdminState>, Path(address): Path<String>) -> ApiResult {
    let all = s.services.directory.sieve_scripts(&address);
    let Some(name) = all.active else {
        return Err(Failure(
            StatusCode::NOT_FOUND,
            format!("{address} has no active script"),
        ));
    };
    let cmd = RoutesCommand::PutSieve {
        user: address,
        name,
        script: None,
        activate: true,
        srs_key: [0; 32],
    };
    apply(&s, cmd).await
}
