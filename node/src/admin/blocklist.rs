//! Blocklists and access rules (`membership::blocklist`): the admin API's
//! handlers and `quill admin blocklist|access`.
//!
//! ```text
//! GET    /v1/blocklists               -> [{"name", "ranges", "loaded_at_ms", "bytes"}]
//! PUT    /v1/blocklists/{name}        body: the encoded range table (what `blocklist load` makes)
//! DELETE /v1/blocklists/{name}
//! GET    /v1/access                   -> [{"cidr", "action"}]
//! PUT    /v1/access                   {"cidr", "action": "allow" | "deny"}
//! DELETE /v1/access?cidr=CIDR
//! ```
//! A list is parsed and merged by `quill admin blocklist load` (a bad line
//! is refused there, with its number); the node checks the table again and
//! commits it in chunks that each fit a Raft entry.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use clap::Subcommand;
use membership::blocklist::{BlocklistCommand, LIST_BYTES_MAX, RANGES_MAX, RangeTable, load_commands};
use serde::{Deserialize, Serialize};

use super::state::{AdminState, ApiResult, Failure, done, reply};

/// The largest upload: one encoded list.
pub const UPLOAD_BYTES_MAX: usize = LIST_BYTES_MAX as usize;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListRow {
    pub name: String,
    pub ranges: u64,
    pub loaded_at_ms: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccessRow {
    pub cidr: String,
    /// "allow" or "deny".
    pub action: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CidrQuery {
    pub cidr: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Loaded {
    pub ranges: u64,
    pub bytes: u64,
    /// Raft entries the load took.
    pub entries: u64,
    pub ms: u64,
}

fn refused(why: String) -> Failure {
    super::state::refusal(why, &[], &["no list", "no access rule"])
}

pub(super) async fn list(State(s): State<AdminState>) -> ApiResult {
    reply(lists_of(&s))
}

/// Every list as listed (for the API and the web page).
pub(super) fn lists_of(s: &AdminState) -> Vec<ListRow> {
    s.cluster.membership.with_blocklists(|b| {
        b.lists
            .iter()
            .map(|(name, l)| ListRow {
                name: name.clone(),
                ranges: l.ranges,
                loaded_at_ms: l.loaded_at_ms,
                bytes: l.data.len() as u64,
            })
            .collect()
    })
}

pub(super) async fn load(State(s): State<AdminState>, Path(name): Path<String>, body: Bytes) -> ApiResult {
    let started = Instant::now();
    let bytes = body.to_vec();
    let checked = tokio::task::spawn_blocking(move || RangeTable::decode(&bytes, RANGES_MAX).map(|t| (t.len(), bytes)))
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let (ranges, bytes) = checked.map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("a bad table: {e}")))?;
    let random = crate::files::random_bytes().map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let upload = u64::from_le_bytes(random[..8].try_into().expect("8 bytes"));
    let commands = load_commands(&name, upload, &bytes, crate::time::now_ms());
    let entries = commands.len() as u64;
    for c in commands {
        s.cluster.membership.blocklist_write(c).await.map_err(refused)?;
    }
    tracing::info!(list = %name, ranges, bytes = bytes.len(), entries, "blocklist loaded");
    reply(Loaded {
        ranges: ranges as u64,
        bytes: bytes.len() as u64,
        entries,
        ms: started.elapsed().as_millis() as u64,
    })
}

pub(super) async fn remove(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    s.cluster
        .membership
        .blocklist_write(BlocklistCommand::Remove { name })
        .await
        .map_err(refused)?;
    done()
}

pub(super) async fn access_list(State(s): State<AdminState>) -> ApiResult {
    reply(access_of(&s))
}

/// Every access rule as listed (for the API and the web page).
pub(super) fn access_of(s: &AdminState) -> Vec<AccessRow> {
    s.cluster.membership.with_blocklists(|b| {
        b.access
            .iter()
            .map(|(cidr, allow)| AccessRow {
                cidr: cidr.clone(),
                action: if *allow { "allow" } else { "deny" }.to_owned(),
            })
            .collect()
    })
}

pub(super) async fn access_set(State(s): State<AdminState>, Json(r): Json<AccessRow>) -> ApiResult {
    let allow = match r.action.as_str() {
        "allow" => true,
        "deny" => false,
        other => return Err(Failure(StatusCode::BAD_REQUEST, format!("{other:?}: allow or deny"))),
    };
    let c = BlocklistCommand::SetAccess { cidr: r.cidr, allow };
    s.cluster.membership.blocklist_write(c).await.map_err(refused)?;
    done()
}

pub(super) async fn access_remove(State(s): State<AdminState>, Query(q): Query<CidrQuery>) -> ApiResult {
    let c = BlocklistCommand::RemoveAccess { cidr: q.cidr };
    s.cluster.membership.blocklist_write(c).await.map_err(refused)?;
    done()
}

/// `quill admin blocklist`.
#[derive(Subcommand)]
pub enum BlocklistCmd {
    /// Load (or replace) list NAME from FILE, for every node within
    /// seconds: addresses, CIDR ranges and a-b ranges, one a line (`#`
    /// comments; rbldnsd ip4set lines, `!` exclusions). A bad line
    /// refuses the whole file, with its number.
    Load { name: String, file: PathBuf },
    /// The lists: name, ranges, when loaded, bytes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove list NAME from every node.
    Remove { name: String },
}

/// `quill admin access`: the operator's own rules, over every list.
#[derive(Subcommand)]
pub enum AccessCmd {
    /// Clients in CIDR are never refused by a list, a DNS blocklist or
    /// greylisting.
    Allow { cidr: String },
    /// Clients in CIDR are refused as if listed.
    Deny { cidr: String },
    /// The rules: allow or deny, and their range.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove the rule for CIDR (as given to allow or deny).
    Remove { cidr: String },
}

fn path_part(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Sends one request with `body` (JSON, or the raw bytes of a table; a
/// large one takes a while to commit); the JSON reply of a 2xx, or the
/// server's reason.
async fn send(
    node: &str,
    token: &str,
    method: hyper::Method,
    path: &str,
    body: Vec<u8>,
    json: bool,
) -> anyhow::Result<serde_json::Value> {
    let kind = if json {
        "application/json"
    } else {
        "application/octet-stream"
    };
    let (status, reply) = super::client::send(node, token, method, path, (kind, body), UPLOAD_TIMEOUT).await?;
    super::client::ok_or_reason(status, reply)
}

/// How long a load may take, its commit through Raft included.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

fn json_body<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("json")
}

fn when(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let age = (crate::time::now_ms().saturating_sub(ms)) / 1000;
    format!("{secs} (unix time, {age}s ago)")
}

pub async fn run_blocklist(node: &str, token: &str, c: &BlocklistCmd) -> anyhow::Result<()> {
    use hyper::Method;
    match c {
        BlocklistCmd::Load { name, file } => {
            let started = Instant::now();
            let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
            let table = RangeTable::parse(&text).with_context(|| format!("{}", file.display()))?;
            if table.len() > RANGES_MAX {
                bail!("{} ranges after merging: at most {RANGES_MAX}", table.len());
            }
            let bytes = table.encode();
            let parsed = started.elapsed();
            let path = format!("/v1/blocklists/{}", path_part(name));
            let v = send(node, token, Method::PUT, &path, bytes, false).await?;
            let l: Loaded = serde_json::from_value(v)?;
            println!(
                "loaded {name}: {} ranges, {} bytes, {} Raft entries ({} ms to read, {} ms to commit)",
                l.ranges,
                l.bytes,
                l.entries,
                parsed.as_millis(),
                l.ms
            );
        }
        BlocklistCmd::List { json } => {
            let v = send(node, token, Method::GET, "/v1/blocklists", Vec::new(), true).await?;
            let rows: Vec<ListRow> = serde_json::from_value(v)?;
            if *json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                for r in rows {
                    println!(
                        "{} {} ranges, {} bytes, loaded {}",
                        r.name,
                        r.ranges,
                        r.bytes,
                        when(r.loaded_at_ms)
                    );
                }
            }
        }
        BlocklistCmd::Remove { name } => {
            let path = format!("/v1/blocklists/{}", path_part(name));
            send(node, token, Method::DELETE, &path, Vec::new(), true).await?;
            println!("ok");
        }
    }
    Ok(())
}

pub async fn run_access(node: &str, token: &str, c: &AccessCmd) -> anyhow::Result<()> {
    use hyper::Method;
    let set = |cidr: &String, action: &str| {
        json_body(&AccessRow {
            cidr: cidr.clone(),
            action: action.to_owned(),
        })
    };
    match c {
        AccessCmd::Allow { cidr } => {
            send(node, token, Method::PUT, "/v1/access", set(cidr, "allow"), true).await?;
            println!("ok");
        }
        AccessCmd::Deny { cidr } => {
            send(node, token, Method::PUT, "/v1/access", set(cidr, "deny"), true).await?;
            println!("ok");
        }
        AccessCmd::Remove { cidr } => {
            let path = format!("/v1/access?cidr={}", path_part(cidr));
            send(node, token, Method::DELETE, &path, Vec::new(), true).await?;
            println!("ok");
        }
        AccessCmd::List { json } => {
            let v = send(node, token, Method::GET, "/v1/access", Vec::new(), true).await?;
            let rows: Vec<AccessRow> = serde_json::from_value(v)?;
            if *json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                for r in rows {
                    println!("{} {}", r.action, r.cidr);
                }
            }
        }
    }
    Ok(())
}
