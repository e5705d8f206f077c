//! The cluster as this node sees it: `/health`, `cluster status`, draining
//! and removing nodes, and the log level (here or on every node).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use membership::NodeState;
use quill_proto::admin::{
    ClusterStatus, Health, LevelBody, LevelSet, NodeAddrs, NodeDrained, NodeRemoved, NodeStatus, SteppedDown,
    UpgradeFinished,
};

use super::state::{AdminState, ApiResult, Failure, reply};
use crate::cluster::rpc::{ReplicaService, describe_here};
use crate::cluster::{ClusterReply, ClusterRequest};

/// How long `log-level --all` waits for each other node.
const LOG_LEVEL_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /health` (no token): whether this node can take mail, and what
/// else it knows of its state. 503 when it cannot store mail (the store
/// stopped after a failed fsync or i/o error, or its writer is gone): a
/// load balancer or the harness should send clients elsewhere. A node that
/// sees no Raft leader (no majority reachable) still takes and serves mail,
/// so that is reported (`leader: null`, in `warnings`) with 200.
pub(super) async fn health(State(s): State<AdminState>) -> Response {
    let store = s.replica.store().failure();
    let m = &s.cluster.membership;
    let view = m.view();
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
    match view.node(m.id()).map(|n| n.state) {
        Some(NodeState::Down) => warnings.push("this node is marked down in its own view (not caught up)"),
        None => warnings.push("this node is not in its own view (not caught up)"),
        _ => {}
    }
    let ok = store.is_none();
    let body = Health {
        ok,
        store: store.unwrap_or_else(|| "ok".to_owned()),
        leader,
        majority_reachable: majority,
        view_epoch: view.epoch,
        warnings: warnings.into_iter().map(str::to_owned).collect(),
    };
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

fn state_name(s: NodeState) -> &'static str {
    match s {
        NodeState::Up => "up",
        NodeState::Down => "down",
        NodeState::Draining => "draining",
    }
}

/// DESIGN.md's status object, from this node's copy of the view. Message
/// and byte counts come from each node (null when it does not answer).
pub async fn status_of(s: &AdminState) -> ClusterStatus {
    let view = s.cluster.membership.view();
    let me = s.cluster.id();
    let mut described: std::collections::HashMap<u64, _> = s
        .cluster
        .ask_others(|cluster, addr| async move { cluster.describe(&addr).await })
        .await
        .into_iter()
        .filter_map(|(n, c)| Some((n.id, c?)))
        .collect();
    let service: &dyn ReplicaService = s.replica.as_ref();
    described.insert(me, describe_here(&s.services.store, Some(service)));
    let counts: std::collections::HashMap<u64, _> = described.iter().map(|(id, d)| (*id, d.stats)).collect();
    let nodes = view
        .nodes
        .values()
        .map(|n| {
            let c = counts.get(&n.id);
            let a = &n.addrs;
            NodeStatus {
                id: n.id,
                name: n.name.clone(),
                state: state_name(n.state).to_owned(),
                voter: n.voter,
                messages: c.map(|c| c.messages),
                bytes: c.map(|c| c.bytes),
                // What the node is doing: "draining" (handing its copies
                // off), "repairing" (restoring copies it coordinates), else
                // "serving"; `repair_pending` counts what its round has left.
                activity: match (n.state, c.map(|c| c.repair_pending)) {
                    (NodeState::Draining, _) => "draining",
                    (NodeState::Down, _) => "down",
                    (_, Some(p)) if p > 0 => "repairing",
                    _ => "serving",
                }
                .to_owned(),
                repair_pending: c.map(|c| c.repair_pending),
                repairs_copied: c.map(|c| c.repairs_copied),
                queued: c.map(|c| c.queued),
                version: described.get(&n.id).map(|d| d.version.clone()),
                feature_level_max: described.get(&n.id).map(|d| d.feature_level_max),
                addrs: NodeAddrs {
                    cluster: Some(a.cluster.clone()),
                    smtp: a.smtp.clone(),
                    submission: a.submission.clone(),
                    lmtp: a.lmtp.clone(),
                    pop3: a.pop3.clone(),
                    imap: a.imap.clone(),
                    smtps: a.smtps.clone(),
                    pop3s: a.pop3s.clone(),
                    imaps: a.imaps.clone(),
                    admin: a.admin.clone(),
                },
            }
        })
        .collect();
    ClusterStatus {
        me,
        epoch: view.epoch,
        leader: s.cluster.membership.leader(),
        // Each under-replicated message is counted by one live holder only.
        under_replicated: counts.values().map(|c| c.under_replicated).sum(),
        // Outbound queue entries, as copies over every node that answered
        // (each entry is stored on R nodes).
        queued_copies: counts.values().map(|c| c.queued).sum(),
        feature_level: s.cluster.membership.feature_level(),
        raft_state_bytes: s.cluster.membership.state_bytes(),
        nodes,
    }
}

pub(super) async fn status(State(s): State<AdminState>) -> ApiResult {
    reply(status_of(&s).await)
}

/// How long `step-down` waits for another node to take over.
const STEP_DOWN_WITHIN: Duration = Duration::from_secs(15);

/// `POST /v1/cluster/upgrade-finish`: raises the feature level to the
/// newest every node supports; 409 naming the nodes that hold it back.
pub(super) async fn upgrade_finish(State(s): State<AdminState>) -> ApiResult {
    let answers = crate::cluster::levels::survey(&s.cluster).await;
    let (before, now) = crate::cluster::levels::finish(&s.cluster, &answers)
        .await
        .map_err(|why| Failure(StatusCode::CONFLICT, why))?;
    if now > before {
        tracing::info!(from = before, to = now, "feature level raised (upgrade-finish)");
    }
    reply(UpgradeFinished {
        ok: true,
        before,
        feature_level: now,
    })
}

/// `POST /v1/cluster/step-down`: this node stops leading Raft (before it
/// is stopped for an upgrade); answered once another node leads.
pub(super) async fn step_down(State(s): State<AdminState>) -> ApiResult {
    let was_leader = s.cluster.membership.leader() == Some(s.cluster.id());
    let leader = s
        .cluster
        .step_down(STEP_DOWN_WITHIN)
        .await
        .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}")))?
        .or(s.cluster.membership.leader());
    reply(SteppedDown {
        ok: true,
        was_leader,
        leader,
    })
}

fn node_error(e: membership::MembershipError) -> Failure {
    let code = match &e {
        membership::MembershipError::Refused(_) => StatusCode::CONFLICT,
        membership::MembershipError::Timeout { .. } => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Failure(code, e.to_string())
}

/// A node given by id or by name.
fn find_node(s: &AdminState, key: &str) -> Result<u64, Failure> {
    let view = s.cluster.membership.view();
    view.nodes
        .values()
        .find(|n| n.id.to_string() == key || n.name == key)
        .map(|n| n.id)
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no such node: {key}")))
}

pub(super) async fn drain_node(State(s): State<AdminState>, Path(key): Path<String>) -> ApiResult {
    let id = find_node(&s, &key)?;
    s.cluster
        .membership
        .set_node_state(id, NodeState::Draining)
        .await
        .map_err(node_error)?;
    reply(NodeDrained {
        ok: true,
        node: id,
        state: "draining".into(),
    })
}

pub(super) async fn remove_node(State(s): State<AdminState>, Path(key): Path<String>) -> ApiResult {
    let id = find_node(&s, &key)?;
    if id == s.cluster.id() {
        return Err(Failure(
            StatusCode::CONFLICT,
            "a node cannot remove itself; ask another node".into(),
        ));
    }
    if s.cluster.membership.leader() == Some(id) {
        // openraft 0.9 has no leadership transfer, and a leader committing
        // its own removal is unsafe there (databendlabs/openraft#923).
        return Err(Failure(
            StatusCode::CONFLICT,
            format!("node {id} is the Raft leader: stop it first (the cluster elects another leader), then remove it"),
        ));
    }
    s.cluster.membership.remove_node(id).await.map_err(node_error)?;
    reply(NodeRemoved { ok: true, removed: id })
}

/// Sets the log filter on this node, or (`all`) on every node that is not
/// down, through the cluster wire. A bad filter is refused here before any
/// node changes; the reply names each node and what it answered.
pub(super) async fn log_level(State(s): State<AdminState>, Json(b): Json<LevelBody>) -> ApiResult {
    (s.set_log_level)(&b.level).map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    tracing::info!(level = %b.level, "log level changed");
    let mut nodes = BTreeMap::new();
    nodes.insert(s.name.clone(), "ok".to_owned());
    if b.all {
        let filter = b.level.clone();
        let answers = s
            .cluster
            .ask_others(move |cluster, addr| {
                let req = ClusterRequest::SetLogLevel { filter: filter.clone() };
                async move {
                    let r = tokio::time::timeout(LOG_LEVEL_TIMEOUT, cluster.transport.request(&addr, &req)).await;
                    match r {
                        Ok(Ok(ClusterReply::Done)) => "ok".to_owned(),
                        Ok(Ok(ClusterReply::Refused(e))) => format!("refused: {e}"),
                        Ok(Ok(_)) => "unexpected reply".to_owned(),
                        Ok(Err(e)) => format!("unreachable: {e:#}"),
                        Err(_) => format!("no answer within {LOG_LEVEL_TIMEOUT:?}"),
                    }
                }
            })
            .await;
        nodes.extend(answers.into_iter().map(|(n, said)| (n.name, said)));
    }
    reply(LevelSet {
        ok: nodes.values().all(|v| v == "ok"),
        level: b.level,
        scope: if b.all { "all" } else { "this node" }.to_owned(),
        nodes,
    })
}
