//! The admin API's types for seeing the cluster work (`quill admin
//! sessions`, `top`, `log-level --user|--client`), and the question one
//! node asks another for them (`ClusterRequest::Query`). Re-exported by
//! [`crate::admin`].

use serde::{Deserialize, Serialize};

/// `PUT /v1/log-watch`: log every command of one user or one client
/// address (at info, whatever the log level) for a while.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchBody {
    /// A user's address, or a client's IP address.
    pub target: String,
    /// Seconds from now (at most a day).
    pub for_secs: u64,
    /// Every node that is not down, not only this one.
    #[serde(default)]
    pub all: bool,
}

/// The longest a watch lasts.
pub const WATCH_SECS_MAX: u64 = 86_400;

/// One live client session (`GET /v1/sessions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRow {
    pub node: String,
    /// smtp, submission, lmtp, pop3, imap, ... (the listener's).
    pub protocol: String,
    pub peer: String,
    /// Once logged in.
    pub user: Option<String>,
    /// Unix milliseconds.
    pub since_ms: u64,
    pub tls: bool,
}

/// `GET /v1/sessions`: every node's that answered, and those that did not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionList {
    pub sessions: Vec<SessionRow>,
    /// Nodes that did not answer, with the reason.
    #[serde(default)]
    pub missing: Vec<String>,
}

/// One heavy hitter of the cluster (`GET /v1/top/{kind}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopRow {
    pub key: String,
    /// At least the true count (each node's summary is exact for its
    /// leaders); at most `count - error` below it.
    pub count: u64,
    pub error: u64,
}

/// `GET /v1/top/{senders|recipients|clients}?window=1m|1h`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopList {
    pub kind: String,
    pub window: String,
    pub top: Vec<TopRow>,
    /// Everything counted in the window, cluster-wide.
    pub total: u64,
    #[serde(default)]
    pub missing: Vec<String>,
}

/// What one node is asked through `ClusterRequest::Query`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeQuery {
    /// Its live sessions: `Vec<SessionRow>`.
    Sessions,
    /// Its summary of `kind` over the last `window_secs`:
    /// `(total, Vec<TopRow>)`, up to `TOP_KEPT` rows.
    Top { kind: String, window_secs: u64 },
    /// Start watching a user or a client address: `Done`.
    Watch { target: String, for_secs: u64 },
}

/// Keys each node keeps per summary, and sends when asked: more than the
/// 20 shown, so that the merge of the nodes' leaders is right.
pub const TOP_KEPT: usize = 100;

/// What `top` ranks.
pub const TOP_KINDS: [&str; 3] = ["senders", "recipients", "clients"];
/// The windows `top` knows, in seconds.
pub const TOP_WINDOWS: [(&str, u64); 2] = [("1m", 60), ("1h", 3600)];
