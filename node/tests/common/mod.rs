//! What the in-process session tests share: a two-node cluster on the
//! in-memory network, the services of a node on it, and the client end of
//! a session's byte stream.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use membership::{Directory, DirectoryCommand, LocalDirectory};
use placement::{NodeId, NodeInfo, NodeState, View};
use quill_node::Limits;
use quill_node::mail::Mail;
use quill_node::services::{Options, Parts, Services};
use quill_node::uids::{LocalUids, Uids};
use replication::mem_net::{MemNet, MemRouter, Serve};
use replication::replica::{ReplicaConfig, Replicator};
use replication::{FragmentStore, StoreConfig};
use testkit::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

pub type Rep = Replicator<MemNet>;

/// Two replicators (R=2) on one in-memory router, both up in one view.
pub fn cluster(dir: &TempDir) -> Vec<Arc<Rep>> {
    let router = MemRouter::new(7);
    let reps: Vec<Arc<Rep>> = (1..=2)
        .map(|id| {
            let d = dir.path().join(format!("n{id}"));
            let store = FragmentStore::open(StoreConfig::new(d.join("store"))).expect("store");
            let mut cfg = ReplicaConfig::new(d.join("updates"));
            cfg.replicas = 2;
            let rep = Arc::new(Replicator::new(id, Arc::new(store), router.net(id), cfg).expect("replicator"));
            let serve: Arc<dyn Serve> = rep.clone();
            router.register(id, Arc::downgrade(&serve));
            rep
        })
        .collect();
    let infos = (1..=2)
        .map(|id| NodeInfo {
            id: NodeId(id),
            weight: 1,
            zone: String::new(),
            state: NodeState::Up,
        })
        .collect();
    let view = Arc::new(View::with_slot_bits(1, infos, placement::MIN_SLOT_BITS).expect("view"));
    for r in &reps {
        r.set_view(view.clone());
    }
    reps
}

pub async fn services(dir: &TempDir, rep: &Arc<Rep>) -> Arc<Services> {
    services_with(dir, rep, Limits::default()).await
}

pub async fn services_with(dir: &TempDir, rep: &Arc<Rep>, limits: Limits) -> Arc<Services> {
    let directory = directory(dir).await;
    services_on(rep, directory, Arc::new(LocalUids::default()), limits)
}

/// The directory: domain `example.org`, user `alice@example.org` with
/// password `pw`.
pub async fn directory(dir: &TempDir) -> Arc<dyn Directory> {
    let directory = LocalDirectory::open(dir.path()).expect("directory");
    directory
        .apply(DirectoryCommand::AddDomain {
            domain: "example.org".into(),
        })
        .await
        .expect("domain");
    let password_hash = membership::password::hash("pw").expect("hash");
    directory
        .apply(DirectoryCommand::AddUser {
            address: "alice@example.org".into(),
            password_hash,
            quota_bytes: None,
        })
        .await
        .expect("user");
    Arc::new(directory)
}

/// The services of the node `rep` is, with the directory and UIDs given
/// (several nodes share them, as they share the Raft state).
pub fn services_on(
    rep: &Arc<Rep>,
    directory: Arc<dyn Directory>,
    uids: Arc<dyn Uids>,
    limits: Limits,
) -> Arc<Services> {
    Arc::new(Services::new(Parts {
        hostname: format!("n{}", rep.id()),
        store: rep.store().clone(),
        mail: rep.clone() as Arc<dyn Mail>,
        uids,
        directory,
        limits,
        tls: None,
        auth_key: [1; 32],
        options: Options::default(),
    }))
}

/// The client end of a session: send a line, read a reply.
pub struct Client(pub BufReader<DuplexStream>);

impl Client {
    pub async fn line(&mut self) -> String {
        let mut l = String::new();
        tokio::time::timeout(Duration::from_secs(10), self.0.read_line(&mut l))
            .await
            .expect("a reply within 10 s")
            .expect("read");
        l
    }

    /// A whole (multi-line) SMTP reply.
    pub async fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let l = self.line().await;
            let more = l.as_bytes().get(3) == Some(&b'-');
            all.push_str(&l);
            if !more {
                return all;
            }
        }
    }

    pub async fn send(&mut self, text: &str) {
        self.0.get_mut().write_all(text.as_bytes()).await.expect("write");
    }

    /// IMAP: sends `tag command` and reads every line up to and including
    /// the tagged reply.
    pub async fn command(&mut self, tag: &str, command: &str) -> Vec<String> {
        self.send(&format!("{tag} {command}\r\n")).await;
        self.until_tagged(tag).await
    }

    /// IMAP: every line up to and including the one tagged `tag`.
    pub async fn until_tagged(&mut self, tag: &str) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let l = self.line().await;
            assert!(!l.is_empty(), "the server closed the connection");
            let done = l.starts_with(&format!("{tag} "));
            out.push(l);
            if done {
                return out;
            }
        }
    }
}

pub fn peer() -> SocketAddr {
    "127.0.0.1:40000".parse().expect("addr")
}
