//! The admin API's requests and replies, typed once for the HTTP server
//! (the node's `admin` module) and its clients (`quill admin`, the
//! harness): each [`Call`] knows its method, path and body; each reply is
//! a struct both sides (de)serialize. HTTP+JSON on `--admin`; everything
//! under `/v1` needs `Authorization: Bearer TOKEN`; errors are
//! [`ApiError`] with 400, 401, 404, 409, 500 or 503.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::activity::{
    NodeQuery, SessionList, SessionRow, TOP_KEPT, TOP_KINDS, TOP_WINDOWS, TopList, TopRow, WATCH_SECS_MAX, WatchBody,
};

/// `POST /v1/domains`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainBody {
    pub domain: String,
}

/// `POST /v1/users`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserBody {
    pub address: String,
    pub password: String,
    pub quota_bytes: Option<u64>,
}

/// `PUT /v1/users/{address}/password`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasswordBody {
    pub password: String,
}

/// `POST /v1/aliases`: mail for `address` goes to `targets` (local or
/// remote addresses); replaces an alias of the same address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasBody {
    pub address: String,
    pub targets: Vec<String>,
}

/// `POST /v1/domain-aliases`: every address of `alias` is the same address
/// of `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainAliasBody {
    pub alias: String,
    pub target: String,
}

/// `PUT /v1/catch-all/{domain}`: where mail to unknown addresses of the
/// domain goes (`null`: refused again, the default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatchAllBody {
    pub address: Option<String>,
}

/// `PUT /v1/sieve/{address}`: the user's Sieve script (checked first: a
/// script with an error is refused with its line and reason), made
/// active.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SieveBody {
    pub script: String,
}

/// `GET /v1/sieve/{address}`: the user's scripts and which is active.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SieveList {
    pub active: Option<String>,
    pub scripts: BTreeMap<String, String>,
}

/// `GET /v1/routes`: the recipients that are not users, cluster-wide.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesList {
    /// Address to targets, in address order.
    pub aliases: Vec<AliasBody>,
    pub domain_aliases: Vec<DomainAliasBody>,
    /// Domain to catch-all address.
    pub catch_all: BTreeMap<String, String>,
    /// Domain or address to the archive user that gets a copy.
    #[serde(default)]
    pub taps: BTreeMap<String, String>,
}

/// `PUT /v1/taps/{target}`: every message accepted for the target (a
/// domain or an address) is copied to `archive`'s mailbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapBody {
    pub archive: String,
}

/// `PUT /v1/users/{address}/quota`: bytes, or `null` for none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaBody {
    pub quota_bytes: Option<u64>,
}

/// `PUT /v1/settings/{key}`: a cluster setting (checked first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingBody {
    pub value: String,
}

/// One row of `GET /v1/settings`, as the answering node applies it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingRow {
    pub key: String,
    pub value: String,
    pub default: String,
    /// `flag` (the node's own, over the cluster's), `cluster` or `default`.
    pub source: String,
    #[serde(default)]
    pub help: String,
    /// From when a change holds: `the next command` (open sessions too),
    /// `new sessions`, `new connections`, `the next try`, ...
    #[serde(default)]
    pub applies: String,
}

/// `PUT /v1/log-level`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelBody {
    pub level: String,
    /// Every node that is not down, not only this one.
    #[serde(default)]
    pub all: bool,
}

/// `GET /v1/export/{address}?format=mbox|maildir` (mbox by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportQuery {
    #[serde(default)]
    pub format: Option<String>,
}

/// `POST /v1/import/{address}?folder=NAME`: the folder of messages whose
/// mbox does not name one (INBOX by default).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportQuery {
    #[serde(default)]
    pub folder: Option<String>,
}

/// What an import did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    /// Messages stored.
    pub imported: usize,
    /// Messages already in their folder (same bytes), not stored again.
    pub skipped: usize,
    pub folders_created: usize,
}

/// `DELETE /v1/users/{address}?purge=true`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveQuery {
    #[serde(default)]
    pub purge: bool,
}

impl RemoveQuery {
    /// The query string as a client sends it (none without purge).
    pub fn parse(query: &str) -> Option<RemoveQuery> {
        serde_urlencoded::from_str(query).ok()
    }
}

/// `PUT /v1/tls/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsBody {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Every failure: what went wrong, in words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// A change that needs no more answer than "done".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    pub ok: bool,
}

/// `DELETE /v1/users/{address}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRemoved {
    pub ok: bool,
    /// Messages deleted with `?purge=true`.
    pub purged: usize,
}

/// `GET /v1/users`: one user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserInfo {
    pub address: String,
    pub quota_bytes: Option<u64>,
}

/// `GET /health` (no token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub ok: bool,
    /// `ok`, or why the store takes no writes.
    pub store: String,
    pub leader: Option<u64>,
    pub majority_reachable: bool,
    pub view_epoch: u64,
    pub warnings: Vec<String>,
}

/// `GET /v1/cluster/status`: DESIGN.md's status object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    #[serde(rename = "self")]
    pub me: u64,
    pub epoch: u64,
    pub leader: Option<u64>,
    /// Messages with fewer than R copies on live nodes, each counted by
    /// one live holder.
    pub under_replicated: u64,
    /// Outbound queue entries as copies over every node that answered.
    pub queued_copies: u64,
    /// The feature level the cluster runs at (see `upgrade-finish`); read
    /// as 1 from a status served by a node of release 0.1.0, which does
    /// not say.
    #[serde(default = "level_one")]
    pub feature_level: u32,
    /// Bytes of the Raft state as a snapshot would hold it (the answering
    /// node's copy; every node applies the same state): it grows with
    /// users, folders and nodes, never with messages.
    #[serde(default)]
    pub raft_state_bytes: u64,
    pub nodes: Vec<NodeStatus>,
}

fn level_one() -> u32 {
    1
}

/// One node in [`ClusterStatus`]; its counts are null when it did not
/// answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: u64,
    pub name: String,
    /// `up`, `down` or `draining`.
    pub state: String,
    pub voter: bool,
    pub messages: Option<u64>,
    pub bytes: Option<u64>,
    /// `serving`, `repairing`, `draining` or `down`.
    pub activity: String,
    pub repair_pending: Option<u64>,
    pub repairs_copied: Option<u64>,
    pub queued: Option<u64>,
    /// The node's release (e.g. `0.2.0`); null when it did not answer.
    /// (A status served by a node of release 0.1.0 has neither field.)
    #[serde(default)]
    pub version: Option<String>,
    /// The newest feature level its release supports; null as `version`.
    #[serde(default)]
    pub feature_level_max: Option<u32>,
    pub addrs: NodeAddrs,
}

/// A node's addresses as the view has them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddrs {
    pub cluster: Option<String>,
    pub smtp: Option<String>,
    pub submission: Option<String>,
    pub lmtp: Option<String>,
    pub pop3: Option<String>,
    pub imap: Option<String>,
    pub smtps: Option<String>,
    pub pop3s: Option<String>,
    pub imaps: Option<String>,
    pub admin: Option<String>,
}

/// `PUT /v1/log-level`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelSet {
    pub ok: bool,
    pub level: String,
    /// `this node` or `all`.
    pub scope: String,
    /// Each node's name and what it answered (`ok`, or why not).
    pub nodes: BTreeMap<String, String>,
}

/// One certificate a node serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertInfo {
    /// Its cluster-wide name (none for a node's own).
    pub name: Option<String>,
    pub names: Vec<String>,
    /// Seconds since the epoch.
    pub not_after: i64,
    pub fingerprint: String,
}

/// `GET /v1/tls`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertList {
    pub cluster: Vec<CertInfo>,
    pub local: Vec<CertInfo>,
}

/// `PUT /v1/tls/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertSet {
    pub ok: bool,
    pub certificate: CertInfo,
}

/// One recipient of a queued message and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedRcpt {
    pub address: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
}

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub id: String,
    pub shard: String,
    pub from: String,
    pub rcpts: Vec<QueuedRcpt>,
    pub queued_ms: u64,
    pub age_s: u64,
    pub size: u64,
    pub held: bool,
    pub replicas: Vec<u64>,
    /// Whether its envelope could be read.
    pub readable: bool,
    /// `queue show`: the message's header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

/// `GET /v1/queue`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueList {
    pub entries: Vec<QueueEntry>,
    pub total: usize,
    pub listed_max: usize,
}

/// `POST /v1/queue/{id}/{action}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueActed {
    pub ok: bool,
    pub id: String,
    pub action: String,
}

/// `DELETE /v1/queue/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRemoved {
    pub ok: bool,
    pub removed: String,
}

/// `POST /v1/nodes/{id}/drain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDrained {
    pub ok: bool,
    pub node: u64,
    pub state: String,
}

/// `POST /v1/cluster/upgrade-finish`: the feature level before and now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeFinished {
    pub ok: bool,
    pub before: u32,
    pub feature_level: u32,
}

/// `POST /v1/cluster/step-down`: whether the addressed node led, and who
/// leads now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SteppedDown {
    pub ok: bool,
    pub was_leader: bool,
    pub leader: Option<u64>,
}

/// `DELETE /v1/nodes/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRemoved {
    pub ok: bool,
    pub removed: u64,
}

/// What an operator's action on a queued message sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueAction {
    /// Try it again now.
    Retry,
    /// Keep it queued, untried.
    Hold,
    /// Try it again, and no longer hold it.
    Release,
}

impl QueueAction {
    pub fn parse(s: &str) -> Option<QueueAction> {
        match s {
            "retry" => Some(QueueAction::Retry),
            "hold" => Some(QueueAction::Hold),
            "release" => Some(QueueAction::Release),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QueueAction::Retry => "retry",
            QueueAction::Hold => "hold",
            QueueAction::Release => "release",
        }
    }

    /// The flag registers it sets: (name, set).
    pub fn flags(self) -> &'static [(&'static str, bool)] {
        match self {
            QueueAction::Retry => &[("retry", true)],
            QueueAction::Hold => &[("held", true)],
            // Released: tried at once.
            QueueAction::Release => &[("held", false), ("retry", true)],
        }
    }
}

/// One call of the admin API, as a client makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    AddDomain(DomainBody),
    ListDomains,
    RemoveDomain { domain: String },
    AddUser(UserBody),
    ListUsers,
    RemoveUser { address: String, purge: bool },
    SetPassword { address: String, body: PasswordBody },
    SetQuota { address: String, body: QuotaBody },
    ClusterStatus,
    UpgradeFinish,
    StepDown,
    DrainNode { node: String },
    RemoveNode { node: String },
    SetLogLevel(LevelBody),
    ListTls,
    SetTls { name: String, body: TlsBody },
    RemoveTls { name: String },
    ListQueue,
    ShowQueued { id: String },
    RemoveQueued { id: String },
    ActOnQueued { id: String, action: QueueAction },
    ListRoutes,
    SetAlias(AliasBody),
    RemoveAlias { address: String },
    SetDomainAlias(DomainAliasBody),
    RemoveDomainAlias { alias: String },
    SetCatchAll { domain: String, body: CatchAllBody },
    SetSieve { address: String, body: SieveBody },
    SetTap { target: String, body: TapBody },
    ListSettings,
    SetSetting { key: String, body: SettingBody },
    UnsetSetting { key: String },
    RemoveTap { target: String },
    GetSieve { address: String },
    RemoveSieve { address: String },
    ListSessions,
    Top { kind: String, window: String },
    Watch(WatchBody),
}

impl Call {
    /// The HTTP method.
    pub fn method(&self) -> &'static str {
        match self {
            Call::ListDomains
            | Call::ListUsers
            | Call::ClusterStatus
            | Call::ListTls
            | Call::ListQueue
            | Call::ListRoutes
            | Call::ListSettings
            | Call::GetSieve { .. }
            | Call::ListSessions
            | Call::Top { .. }
            | Call::ShowQueued { .. } => "GET",
            Call::SetAlias(_) | Call::SetDomainAlias(_) => "POST",
            Call::AddDomain(_)
            | Call::AddUser(_)
            | Call::DrainNode { .. }
            | Call::ActOnQueued { .. }
            | Call::UpgradeFinish
            | Call::StepDown => "POST",
            Call::SetPassword { .. }
            | Call::SetQuota { .. }
            | Call::SetLogLevel(_)
            | Call::SetTls { .. }
            | Call::SetCatchAll { .. }
            | Call::SetSieve { .. }
            | Call::SetSetting { .. }
            | Call::Watch(_)
            | Call::SetTap { .. } => "PUT",
            Call::RemoveAlias { .. }
            | Call::RemoveDomainAlias { .. }
            | Call::RemoveSieve { .. }
            | Call::RemoveTap { .. }
            | Call::UnsetSetting { .. } => "DELETE",
            Call::RemoveDomain { .. }
            | Call::RemoveUser { .. }
            | Call::RemoveNode { .. }
            | Call::RemoveTls { .. }
            | Call::RemoveQueued { .. } => "DELETE",
        }
    }

    /// The path, with its segments percent-encoded.
    pub fn path(&self) -> String {
        let s = path_segment;
        match self {
            Call::AddDomain(_) | Call::ListDomains => "/v1/domains".to_owned(),
            Call::RemoveDomain { domain } => format!("/v1/domains/{}", s(domain)),
            Call::AddUser(_) | Call::ListUsers => "/v1/users".to_owned(),
            Call::RemoveUser { address, purge } => {
                format!("/v1/users/{}{}", s(address), if *purge { "?purge=true" } else { "" })
            }
            Call::SetPassword { address, .. } => format!("/v1/users/{}/password", s(address)),
            Call::SetQuota { address, .. } => format!("/v1/users/{}/quota", s(address)),
            Call::ClusterStatus => "/v1/cluster/status".to_owned(),
            Call::UpgradeFinish => "/v1/cluster/upgrade-finish".to_owned(),
            Call::StepDown => "/v1/cluster/step-down".to_owned(),
            Call::DrainNode { node } => format!("/v1/nodes/{}/drain", s(node)),
            Call::RemoveNode { node } => format!("/v1/nodes/{}", s(node)),
            Call::SetLogLevel(_) => "/v1/log-level".to_owned(),
            Call::ListTls => "/v1/tls".to_owned(),
            Call::SetTls { name, .. } | Call::RemoveTls { name } => format!("/v1/tls/{}", s(name)),
            Call::ListQueue => "/v1/queue".to_owned(),
            Call::ShowQueued { id } | Call::RemoveQueued { id } => format!("/v1/queue/{}", s(id)),
            Call::ActOnQueued { id, action } => format!("/v1/queue/{}/{}", s(id), action.name()),
            Call::ListRoutes => "/v1/routes".to_owned(),
            Call::SetAlias(_) => "/v1/aliases".to_owned(),
            Call::RemoveAlias { address } => format!("/v1/aliases/{}", s(address)),
            Call::SetDomainAlias(_) => "/v1/domain-aliases".to_owned(),
            Call::RemoveDomainAlias { alias } => format!("/v1/domain-aliases/{}", s(alias)),
            Call::SetCatchAll { domain, .. } => format!("/v1/catch-all/{}", s(domain)),
            Call::SetTap { target, .. } | Call::RemoveTap { target } => format!("/v1/taps/{}", s(target)),
            Call::ListSettings => "/v1/settings".to_owned(),
            Call::SetSetting { key, .. } | Call::UnsetSetting { key } => format!("/v1/settings/{}", s(key)),
            Call::SetSieve { address, .. } | Call::GetSieve { address } | Call::RemoveSieve { address } => {
                format!("/v1/sieve/{}", s(address))
            }
            Call::ListSessions => "/v1/sessions".to_owned(),
            Call::Top { kind, window } => format!("/v1/top/{}?window={}", s(kind), s(window)),
            Call::Watch(_) => "/v1/log-watch".to_owned(),
        }
    }

    /// The JSON body, if the call has one.
    pub fn body(&self) -> Option<serde_json::Value> {
        let v = match self {
            Call::AddDomain(b) => serde_json::to_value(b),
            Call::AddUser(b) => serde_json::to_value(b),
            Call::SetPassword { body, .. } => serde_json::to_value(body),
            Call::SetQuota { body, .. } => serde_json::to_value(body),
            Call::SetLogLevel(b) => serde_json::to_value(b),
            Call::SetTls { body, .. } => serde_json::to_value(body),
            Call::SetAlias(b) => serde_json::to_value(b),
            Call::SetDomainAlias(b) => serde_json::to_value(b),
            Call::SetCatchAll { body, .. } => serde_json::to_value(body),
            Call::SetSieve { body, .. } => serde_json::to_value(body),
            Call::SetTap { body, .. } => serde_json::to_value(body),
            Call::SetSetting { body, .. } => serde_json::to_value(body),
            Call::Watch(b) => serde_json::to_value(b),
            _ => return None,
        };
        Some(v.expect("admin bodies encode"))
    }
}

/// Percent-encodes a path segment (an address holds `@`, maybe `+`).
pub fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every request body and query parsed from `data` (the fuzz target).
pub fn parse_bodies(data: &[u8]) {
    let _ = serde_json::from_slice::<DomainBody>(data);
    let _ = serde_json::from_slice::<UserBody>(data);
    let _ = serde_json::from_slice::<PasswordBody>(data);
    let _ = serde_json::from_slice::<LevelBody>(data);
    let _ = serde_json::from_slice::<TlsBody>(data);
    let _ = serde_json::from_slice::<AliasBody>(data);
    let _ = serde_json::from_slice::<DomainAliasBody>(data);
    let _ = serde_json::from_slice::<CatchAllBody>(data);
    let _ = serde_json::from_slice::<SieveBody>(data);
    let _ = serde_json::from_slice::<TapBody>(data);
    let _ = serde_json::from_slice::<QuotaBody>(data);
    let _ = serde_json::from_slice::<SettingBody>(data);
    let _ = serde_json::from_slice::<WatchBody>(data);
    if let Ok(q) = std::str::from_utf8(data) {
        let _ = RemoveQuery::parse(q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_know_their_paths() {
        let c = Call::RemoveUser {
            address: "a+b@example.org".into(),
            purge: true,
        };
        assert_eq!(
            (c.method(), c.path().as_str()),
            ("DELETE", "/v1/users/a%2Bb@example.org?purge=true")
        );
        let c = Call::ActOnQueued {
            id: "ab".into(),
            action: QueueAction::Release,
        };
        assert_eq!((c.method(), c.path().as_str()), ("POST", "/v1/queue/ab/release"));
        let c = Call::SetLogLevel(LevelBody {
            level: "debug".into(),
            all: true,
        });
        assert_eq!(c.body().unwrap(), serde_json::json!({ "level": "debug", "all": true }));
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn queries_and_bodies() {
        assert_eq!(RemoveQuery::parse("purge=true"), Some(RemoveQuery { purge: true }));
        assert_eq!(RemoveQuery::parse(""), Some(RemoveQuery { purge: false }));
        assert_eq!(RemoveQuery::parse("purge=maybe"), None);
        let l: LevelBody = serde_json::from_str(r#"{"level":"info"}"#).unwrap();
        assert!(!l.all);
        let status = r#"{"self":1,"epoch":2,"leader":null,"under_replicated":0,"queued_copies":0,"nodes":[]}"#;
        let s: ClusterStatus = serde_json::from_str(status).unwrap();
        assert_eq!(s.me, 1);
        assert!(serde_json::to_string(&s).unwrap().contains("\"self\":1"));
        assert_eq!(QueueAction::parse("hold"), Some(QueueAction::Hold));
        assert_eq!(QueueAction::parse("bounce"), None);
    }
}
