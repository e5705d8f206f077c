//! The outbound queue, cluster-wide from any node: list, show, remove, and
//! the operator's flags (retry, hold, release) that the owner reads.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use quill_proto::admin::{QueueActed, QueueAction, QueueEntry, QueueList, QueueRemoved, QueuedRcpt};
use quill_proto::message::header_end;
use quill_proto::queue;
use replication::replica::Listed;

use super::state::{AdminState, ApiResult, Failure, reply};

/// Queue entries listed at most by `GET /v1/queue`.
const QUEUE_LIST_MAX: usize = 1000;

/// One queue entry as the API shows it (reading its envelope).
async fn entry(s: &AdminState, shard: &str, l: &Listed, header: bool) -> QueueEntry {
    let now = crate::time::now_ms();
    let body = s.services.mail.read(l).await.ok();
    let decoded = body.as_deref().and_then(|b| queue::decode(b).ok());
    let marks = &l.meta.marks;
    let (from, rcpts, queued_ms, head) = match &decoded {
        Some((env, msg)) => {
            let rcpts = env
                .rcpts
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let state = if marks.has(&queue::ok_flag(i)) {
                        "delivered"
                    } else if marks.has(&queue::failed_flag(i)) {
                        "failed"
                    } else {
                        "pending"
                    };
                    QueuedRcpt {
                        address: r.clone(),
                        state: state.to_owned(),
                    }
                })
                .collect();
            let head = header.then(|| String::from_utf8_lossy(&msg[..header_end(msg)]).into_owned());
            (env.from.clone(), rcpts, env.queued_ms, head)
        }
        None => (String::new(), vec![], l.meta.arrival_ms, None),
    };
    QueueEntry {
        id: l.meta.id.to_hex(),
        shard: shard.to_owned(),
        from,
        rcpts,
        queued_ms,
        age_s: now.saturating_sub(queued_ms) / 1000,
        size: l.meta.size_bytes,
        held: marks.has("held"),
        replicas: l.meta.replicas.clone(),
        readable: decoded.is_some(),
        header: head,
    }
}

pub(super) async fn list(State(s): State<AdminState>) -> ApiResult {
    reply(list_of(&s).await)
}

/// The queue, cluster-wide (the JSON API's and the web page's).
pub(super) async fn list_of(s: &AdminState) -> QueueList {
    let mut entries = Vec::new();
    let mut total = 0usize;
    for k in 0..queue::SHARDS {
        let shard = queue::shard_mailbox(k);
        for l in s.services.mail.mailbox(&shard).await {
            total += 1;
            if entries.len() < QUEUE_LIST_MAX {
                entries.push(entry(s, &shard, &l, false).await);
            }
        }
    }
    QueueList {
        entries,
        total,
        listed_max: QUEUE_LIST_MAX,
    }
}

/// The queue entry named by a hex id, and its shard.
async fn find(s: &AdminState, id: &str) -> Result<(String, Listed), Failure> {
    let bytes: Vec<u8> = (0..id.len())
        .step_by(2)
        .filter_map(|i| id.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect();
    let raw: [u8; 16] = bytes.try_into().map_err(|_| {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a queue id (32 hex digits)"),
        )
    })?;
    let shard = queue::shard_mailbox(queue::shard_of(&raw));
    let found = s
        .services
        .mail
        .mailbox(&shard)
        .await
        .into_iter()
        .find(|l| l.meta.id.0 == raw)
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no queued message {id}")))?;
    Ok((shard, found))
}

pub(super) async fn show(State(s): State<AdminState>, Path(id): Path<String>) -> ApiResult {
    let (shard, l) = find(&s, &id).await?;
    reply(entry(&s, &shard, &l, true).await)
}

pub(super) async fn remove(State(s): State<AdminState>, Path(id): Path<String>) -> ApiResult {
    remove_entry(&s, &id).await?;
    reply(QueueRemoved { ok: true, removed: id })
}

/// Removes a queue entry (the JSON API's and the web page's).
pub(super) async fn remove_entry(s: &AdminState, id: &str) -> Result<(), Failure> {
    let (shard, l) = find(s, id).await?;
    s.services
        .mail
        .delete(&shard, std::slice::from_ref(&l))
        .await
        .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tracing::info!(%id, "queued message removed by an operator");
    Ok(())
}

/// retry, hold, release: a flag register of the entry, which its owner
/// reads at its next look.
pub(super) async fn act(State(s): State<AdminState>, Path((id, action)): Path<(String, String)>) -> ApiResult {
    act_on(&s, &id, &action).await?;
    reply(QueueActed { ok: true, id, action })
}

/// Sets an operator's flag on a queue entry (the JSON API's and the web
/// page's).
pub(super) async fn act_on(s: &AdminState, id: &str, action: &str) -> Result<(), Failure> {
    let Some(act) = QueueAction::parse(action) else {
        return Err(Failure(StatusCode::NOT_FOUND, format!("no queue action {action:?}")));
    };
    let (shard, l) = find(s, id).await?;
    let hlc = s.services.mail.hlc_now();
    let change = replication::MarkChange {
        id: l.meta.id,
        folder: None,
        flags: act
            .flags()
            .iter()
            .map(|(name, set)| replication::FlagMark {
                name: (*name).to_owned(),
                set: *set,
                hlc,
            })
            .collect(),
    };
    s.services
        .mail
        .mark(&shard, &[(l, change)])
        .await
        .map_err(|e| Failure(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    Ok(())
}
