//! Seeing the cluster work: the live client sessions of every node, the
//! cluster's heaviest senders, recipients and client addresses, and
//! watching one user or client address (every command logged, for a
//! while). The node asked answers for itself and asks every other node
//! that is not down over the cluster wire (`ClusterRequest::Query`), with
//! a deadline; a node that does not answer is named in `missing`.

use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use quill_proto::admin::{
    NodeQuery, SessionList, SessionRow, TOP_KEPT, TOP_KINDS, TOP_WINDOWS, TopList, TopRow, WATCH_SECS_MAX, WatchBody,
};
use serde::Deserialize;

use super::state::{AdminState, ApiResult, Failure, reply};
use crate::cluster::{ClusterReply, ClusterRequest};
use crate::services::Services;

/// How long the node asked waits for each other node.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Rows `top` shows.
const TOP_SHOWN: usize = 20;
/// Sessions one node reports at most (a node holds up to
/// `--max-connections`; the list is for people).
const SESSIONS_PER_NODE_MAX: usize = 10_000;

/// What this node answers to `q` (for itself), as JSON.
pub fn answer(services: &Services, node: &str, q: &NodeQuery) -> Result<String, String> {
    let json = match q {
        NodeQuery::Sessions => serde_json::to_string(&sessions_here(services, node)),
        NodeQuery::Top { kind, window_secs } => {
            let top = services
                .activity
                .top(kind, *window_secs, TOP_KEPT)
                .ok_or_else(|| format!("unknown kind {kind:?}"))?;
            serde_json::to_string(&top)
        }
        NodeQuery::Watch { target, for_secs } => {
            services.slots.watch(target, for_secs.min(&WATCH_SECS_MAX) * 1000);
            tracing::info!(%target, for_secs, "watching: every command logged (target quill::watch)");
            serde_json::to_string(&true)
        }
    };
    json.map_err(|e| e.to_string())
}

/// The query handler the cluster wire calls (`ClusterRequest::Query`).
pub fn handler(services: std::sync::Arc<Services>, node: String) -> crate::cluster::QueryHandler {
    std::sync::Arc::new(move |json: String| {
        let (services, node) = (services.clone(), node.clone());
        Box::pin(async move {
            let q: NodeQuery = serde_json::from_str(&json).map_err(|e| format!("bad query: {e}"))?;
            answer(&services, &node, &q)
        })
    })
}

fn sessions_here(services: &Services, node: &str) -> Vec<SessionRow> {
    services
        .slots
        .sessions()
        .into_iter()
        .take(SESSIONS_PER_NODE_MAX)
        .map(|i| SessionRow {
            node: node.to_owned(),
            protocol: i.protocol.to_owned(),
            peer: i.peer.to_string(),
            user: i.user(),
            since_ms: i.since_ms,
            tls: i.tls(),
        })
        .collect()
}

/// This node's answer and every other node's (name, answer or why not).
async fn ask_all<T: serde::de::DeserializeOwned + Send + 'static>(
    s: &AdminState,
    q: NodeQuery,
) -> Result<(T, Vec<(String, Result<T, String>)>), Failure> {
    let here = answer(&s.services, &s.name, &q).map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    let here: T = serde_json::from_str(&here).map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let json = serde_json::to_string(&q).expect("queries encode");
    let others = s
        .cluster
        .ask_others(move |cluster, addr| {
            let req = ClusterRequest::Query { json: json.clone() };
            async move {
                match tokio::time::timeout(ASK_TIMEOUT, cluster.transport.request(&addr, &req)).await {
                    Ok(Ok(ClusterReply::Json(j))) => {
                        serde_json::from_str::<T>(&j).map_err(|e| format!("bad answer: {e}"))
                    }
                    Ok(Ok(ClusterReply::Refused(e))) => Err(format!("refused: {e}")),
                    Ok(Ok(_)) => Err("unexpected reply (an older release?)".to_owned()),
                    Ok(Err(e)) => Err(format!("unreachable: {e:#}")),
                    Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
                }
            }
        })
        .await;
    Ok((here, others.into_iter().map(|(n, r)| (n.name, r)).collect()))
}

/// Every node's live client sessions (those that answered), oldest first.
pub(super) async fn sessions_of(s: &AdminState) -> Result<SessionList, Failure> {
    let (mut all, others) = ask_all::<Vec<SessionRow>>(s, NodeQuery::Sessions).await?;
    let mut missing = Vec::new();
    for (name, r) in others {
        match r {
            Ok(rows) => all.extend(rows),
            Err(e) => missing.push(format!("{name}: {e}")),
        }
    }
    all.sort_by(|a, b| (a.since_ms, &a.node).cmp(&(b.since_ms, &b.node)));
    Ok(SessionList { sessions: all, missing })
}

/// `GET /v1/sessions`: every node's live client sessions.
pub(super) async fn sessions(State(s): State<AdminState>) -> ApiResult {
    reply(sessions_of(&s).await?)
}

#[derive(Debug, Deserialize)]
pub(super) struct WindowQuery {
    window: Option<String>,
}

/// The cluster's top 20 of `kind` (senders, recipients, clients) over
/// `window` (1m, 1h).
pub(super) async fn top_of(s: &AdminState, kind: &str, window: &str) -> Result<TopList, Failure> {
    if !TOP_KINDS.contains(&kind) {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("top ranks {}, not {kind:?}", TOP_KINDS.join(", ")),
        ));
    }
    let Some((_, secs)) = TOP_WINDOWS.iter().find(|(name, _)| *name == window) else {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("the window is 1m or 1h, not {window:?}"),
        ));
    };
    let q = NodeQuery::Top {
        kind: kind.to_owned(),
        window_secs: *secs,
    };
    let ((total, here), others) = ask_all::<(u64, Vec<TopRow>)>(s, q).await?;
    let (mut parts, mut sum, mut missing) = (vec![here], total, Vec::new());
    for (name, r) in others {
        match r {
            Ok((t, rows)) => {
                sum = sum.saturating_add(t);
                parts.push(rows);
            }
            Err(e) => missing.push(format!("{name}: {e}")),
        }
    }
    Ok(TopList {
        kind: kind.to_owned(),
        window: window.to_owned(),
        top: crate::services::activity::merge(&parts, TOP_SHOWN),
        total: sum,
        missing,
    })
}

/// `GET /v1/top/{kind}?window=1m|1h`: the cluster's top 20.
pub(super) async fn top(
    State(s): State<AdminState>,
    Path(kind): Path<String>,
    Query(w): Query<WindowQuery>,
) -> ApiResult {
    let window = w.window.unwrap_or_else(|| "1h".to_owned());
    reply(top_of(&s, &kind, &window).await?)
}

/// `PUT /v1/log-watch`: log every command of a user or a client address,
/// on this node or (`all`) on every node.
pub(super) async fn watch(State(s): State<AdminState>, Json(b): Json<WatchBody>) -> ApiResult {
    let target = b.target.trim().to_owned();
    let is_ip = target.parse::<std::net::IpAddr>().is_ok();
    let is_address = target.contains('@') && target.len() <= 254 && !target.contains(char::is_whitespace);
    if !(is_ip || is_address) {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("watch a user's address or a client's IP address, not {target:?}"),
        ));
    }
    if b.for_secs == 0 || b.for_secs > WATCH_SECS_MAX {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!("a watch lasts 1 to {WATCH_SECS_MAX} seconds"),
        ));
    }
    let q = NodeQuery::Watch {
        target: target.clone(),
        for_secs: b.for_secs,
    };
    let mut nodes = std::collections::BTreeMap::new();
    if b.all {
        let (_, others) = ask_all::<bool>(&s, q).await?;
        for (name, r) in others {
            nodes.insert(name, r.map_or_else(|e| e, |_| "ok".to_owned()));
        }
    } else {
        answer(&s.services, &s.name, &q).map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    }
    nodes.insert(s.name.clone(), "ok".to_owned());
    reply(quill_proto::admin::LevelSet {
        ok: nodes.values().all(|v| v == "ok"),
        level: format!("watch {target} for {}s", b.for_secs),
        scope: if b.all { "all" } else { "this node" }.to_owned(),
        nodes,
    })
}
