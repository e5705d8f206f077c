//! What a node answers on the cluster wire: Raft, pings, figures, the
//! replica protocol, and (to anyone, certificate or not) enrollment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use membership::{Membership, NodeState};
use quinn::Endpoint;
use replication::FragmentStore;
use tokio::sync::watch;
use tracing::{info, warn};

use super::admission::{JoinLimiter, enroll_request, issue_here};
use super::rpc::{
    ClusterReply, ClusterRequest, LogSlot, QuerySlot, QuicTransport, ReplicaSlot, describe_here, node_stats,
};
use super::wire;
use quill_proto::wire::Protocol;

/// What the server side of the cluster wire answers with.
pub struct Handler {
    pub dir: PathBuf,
    pub membership: Membership,
    pub transport: Arc<QuicTransport>,
    pub store: Arc<FragmentStore>,
    pub replica: ReplicaSlot,
    pub log_level: LogSlot,
    pub queries: QuerySlot,
    pub joins: Mutex<JoinLimiter>,
    /// Failure reports for the leader's detector.
    pub reports: Arc<super::suspects::Reports>,
}

pub async fn accept_loop(endpoint: Endpoint, handler: Arc<Handler>, mut stop: watch::Receiver<bool>) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => match i { Some(i) => i, None => return },
            _ = stop.changed() => return,
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    // A wrong certificate ends here (rustls refused it).
                    warn!(error = %e, "cluster connection refused");
                    return;
                }
            };
            let peer = conn.remote_address();
            wire::serve_connection(conn, move |who: wire::Peer, req: ClusterRequest| {
                let handler = handler.clone();
                async move { handle(who, req, &handler, peer).await }
            })
            .await
        });
    }
}

async fn handle(who: wire::Peer, req: ClusterRequest, h: &Handler, peer: SocketAddr) -> ClusterReply {
    let (dir, membership, store, replica) = (h.dir.as_path(), &h.membership, &h.store, &h.replica);
    if let Some(why) = too_old(who.protocol, membership.feature_level()) {
        warn!(%peer, "{why}");
        return ClusterReply::Refused(why);
    }
    match req {
        ClusterRequest::Enroll { secret, name } => {
            enroll_request(&h.dir, &h.membership, &h.transport, &h.joins, peer, &secret, &name).await
        }
        _ if !who.member => ClusterReply::Refused("a cluster certificate is required".into()),
        ClusterRequest::Raft { to, .. } if to != 0 && to != membership.id() => {
            ClusterReply::Refused(format!("this address serves node {}, not node {to}", membership.id()))
        }
        ClusterRequest::Raft { msg, .. } => ClusterReply::Raft(membership.handle(*msg).await),
        ClusterRequest::Ping => ClusterReply::Pong {
            id: membership.id(),
            epoch: membership.view().epoch,
        },
        ClusterRequest::Stats => ClusterReply::Stats(node_stats(store, replica.get().map(|r| r.as_ref()))),
        ClusterRequest::Describe => ClusterReply::Described(describe_here(store, replica.get().map(|r| r.as_ref()))),
        ClusterRequest::Replica(call) => match replica.get() {
            Some(r) => ClusterReply::Replica(Box::new(r.handle(*call).await)),
            None => ClusterReply::Refused("this node is still starting".into()),
        },
        ClusterRequest::SetLogLevel { filter } => match h.log_level.get() {
            Some(set) => match set(&filter) {
                Ok(()) => {
                    info!(level = %filter, %peer, "log level changed (cluster-wide request)");
                    ClusterReply::Done
                }
                Err(e) => ClusterReply::Refused(e),
            },
            None => ClusterReply::Refused("this node is still starting".into()),
        },
        ClusterRequest::Query { json } => match h.queries.get() {
            Some(q) => match q(json).await {
                Ok(answer) => ClusterReply::Json(answer),
                Err(e) => ClusterReply::Refused(e),
            },
            None => ClusterReply::Refused("this node is still starting".into()),
        },
        ClusterRequest::IssueCert { name } => match issue_here(dir, &name) {
            Ok(r) => {
                info!(%peer, %name, "issued a certificate for an enrollment through another seed");
                r
            }
            Err(e) => ClusterReply::Refused(format!("cannot issue a certificate: {e:#}")),
        },
        ClusterRequest::CaKey => {
            let view = membership.view();
            let voter = view
                .nodes
                .values()
                .any(|n| n.voter && n.addrs.cluster.parse::<SocketAddr>().ok() == Some(peer));
            if !voter {
                warn!(%peer, "CA key refused: the asking node is not a voter");
                return ClusterReply::Refused("the CA key is for voters only".into());
            }
            match std::fs::read_to_string(dir.join("ca.key")) {
                Ok(pem) if !pem.trim().is_empty() => ClusterReply::CaKey(pem),
                _ => ClusterReply::Refused("this node does not hold the CA key".into()),
            }
        }
        ClusterRequest::Suspects { from, silent, answered } => {
            if membership.leading_term().is_none() {
                return ClusterReply::Refused("not the leader: failure reports go to the leader".into());
            }
            match h.reports.note(&membership.view(), peer, from, &silent, &answered) {
                Ok(()) => ClusterReply::Done,
                Err(why) => {
                    warn!(%peer, from, "failure report refused: {why}");
                    ClusterReply::Refused(why)
                }
            }
        }
        ClusterRequest::TakeLeadership => {
            let view = membership.view();
            let from_leader = membership
                .leader()
                .and_then(|l| view.node(l))
                .is_some_and(|n| n.addrs.cluster.parse::<SocketAddr>().ok() == Some(peer));
            let me = view.node(membership.id());
            if !from_leader || !me.is_some_and(|n| n.voter && n.state == NodeState::Up) {
                return ClusterReply::Refused("only the leader hands leadership to an up voter".into());
            }
            info!(%peer, "the leader is draining: calling an election");
            match membership.raft().trigger().elect().await {
                Ok(()) => ClusterReply::Done,
                Err(e) => ClusterReply::Refused(format!("cannot call an election: {e}")),
            }
        }
    }
}

/// Why a peer of `protocol` can no longer take part in a cluster running
/// at `level`: release 0.1.0 (the only one that stops at protocol V1)
/// cannot read what is written from level 2 on. Refused with the reason
/// (in a reply that release understands), not left to fail at decoding.
fn too_old(protocol: Protocol, level: u32) -> Option<String> {
    (protocol == Protocol::V1 && level > 1).then(|| {
        format!(
            "this cluster runs at feature level {level}; release {} supports only level 1: \
             run release {} or later on this node",
            Protocol::V1.oldest_release(),
            Protocol::V2.oldest_release()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_0_1_0_peer_is_refused_once_the_level_is_raised() {
        assert_eq!(too_old(Protocol::V1, 1), None);
        assert_eq!(too_old(Protocol::V2, 1), None);
        assert_eq!(too_old(Protocol::V2, 2), None);
        let why = too_old(Protocol::V1, 2).expect("refused");
        assert!(why.contains("feature level 2") && why.contains("0.2.0"), "{why}");
    }
}
