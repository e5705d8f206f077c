//! DKIM signing keys of the cluster's domains (`crate::dkim`,
//! `membership::dkim`): `quill admin dkim create|list|remove` and the API
//! under them. A key is generated on the node that serves `create` and
//! committed through Raft, so every node signs with it once applied. No
//! reply, log line or listing carries a private key.
//!
//! ```text
//! GET    /v1/dkim                     -> [{"domain", "selector", "algorithm", "created_secs", "signing", "record", "zone_line"}]
//! POST   /v1/dkim/{domain}            {"selector"?, "algorithm"?}: a new key -> its row (with the record to publish)
//! DELETE /v1/dkim/{domain}/{selector}
//! ```

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use clap::Subcommand;
use hyper::Method;
use membership::dkim::{DkimAlgorithm, DkimCommand, DkimKey};
use quill_proto::admin::path_segment;
use serde::{Deserialize, Serialize};

use super::state::{AdminState, ApiResult, Failure, done, reply};

#[derive(Subcommand)]
pub(super) enum DkimCmd {
    /// Make a new signing key for DOMAIN and print the DNS record to publish.
    ///
    /// The key is made on the addressed node and shared with every node
    /// through the cluster; the record is printed as one zone-file line.
    /// The newest key of a domain signs: publish its record right away
    /// (mail signed before it is visible fails verification).
    Create {
        domain: String,
        /// The selector (a DNS label); quill and the year and month by
        /// default, e.g. quill202612.
        #[arg(long)]
        selector: Option<String>,
        #[arg(long, default_value = "rsa2048", value_parser = ["rsa2048", "ed25519"])]
        algorithm: String,
    },
    /// The keys: domain, selector, algorithm, created, signing, record.
    ///
    /// Never the private key.
    List {
        /// Print the JSON list as is.
        #[arg(long)]
        json: bool,
    },
    /// Remove a selector's key (after a rotation).
    ///
    /// Once the new selector's record is published and it signs. The
    /// domain's other key, if any, signs from then on; with none left its
    /// mail goes unsigned.
    Remove { domain: String, selector: String },
}

/// `POST /v1/dkim/{domain}`'s body.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateBody {
    #[serde(default)]
    pub selector: Option<String>,
    /// rsa2048 (the default) or ed25519.
    #[serde(default)]
    pub algorithm: Option<String>,
}

/// One key as listed: everything but the private key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRow {
    pub domain: String,
    pub selector: String,
    pub algorithm: String,
    pub created_secs: u64,
    /// Whether it is the key that signs the domain's mail (its newest).
    pub signing: bool,
    /// The TXT record's text (`v=DKIM1; k=...; p=...`).
    pub record: String,
    /// The record as one zone-file line, in quoted strings of at most
    /// 255 bytes.
    pub zone_line: String,
}

fn row(domain: &str, k: &DkimKey, signing: bool) -> KeyRow {
    KeyRow {
        domain: domain.to_owned(),
        selector: k.selector.clone(),
        algorithm: k.algorithm.name().to_owned(),
        created_secs: k.created_secs,
        signing,
        record: crate::dkim::record_text(k.algorithm, &k.public_b64),
        zone_line: crate::dkim::zone_line(domain, &k.selector, k.algorithm, &k.public_b64),
    }
}

fn refused(why: String) -> Failure {
    super::state::refusal(why, &["already has"], &["has no DKIM selector"])
}

pub(super) async fn list(State(s): State<AdminState>) -> ApiResult {
    reply(rows_of(&s))
}

/// Every key as listed (for the API and the web page).
pub(super) fn rows_of(s: &AdminState) -> Vec<KeyRow> {
    let keys = s.cluster.membership.dkim_keys();
    let mut rows = Vec::new();
    for (domain, ks) in &keys.domains {
        let signing = keys.signing_key(domain).map(|k| k.selector.clone());
        for k in ks {
            rows.push(row(domain, k, signing.as_deref() == Some(k.selector.as_str())));
        }
    }
    rows
}

pub(super) async fn create(
    State(s): State<AdminState>,
    Path(domain): Path<String>,
    Json(b): Json<CreateBody>,
) -> ApiResult {
    let bad = |why: String| Failure(StatusCode::BAD_REQUEST, why);
    let domain = membership::dkim::normalize_domain(&domain).map_err(|e| bad(e.to_string()))?;
    let algorithm = match b.algorithm.as_deref() {
        None => DkimAlgorithm::Rsa2048,
        Some(a) => DkimAlgorithm::parse(a).ok_or_else(|| bad(format!("{a:?}: the algorithm is rsa2048 or ed25519")))?,
    };
    let now = crate::time::now_ms() / 1000;
    let selector = match b.selector {
        Some(sel) => sel.to_ascii_lowercase(),
        None => {
            let keys = s.cluster.membership.dkim_keys();
            let taken: Vec<&str> = keys
                .domains
                .get(&domain)
                .map(|ks| ks.iter().map(|k| k.selector.as_str()).collect())
                .unwrap_or_default();
            crate::dkim::default_selector(now, &taken)
        }
    };
    if !membership::dkim::valid_selector(&selector) {
        return Err(bad(membership::dkim::DkimError::BadSelector(selector).to_string()));
    }
    // RSA generation takes a while: off the async threads.
    let sel = selector.clone();
    let key = tokio::task::spawn_blocking(move || crate::dkim::generate(algorithm, &sel, now))
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}")))?;
    let shown = row(&domain, &key, true);
    s.cluster
        .membership
        .write_dkim(DkimCommand::Add {
            domain: domain.clone(),
            key,
        })
        .await
        .map_err(refused)?;
    tracing::info!(%domain, %selector, algorithm = algorithm.name(), "DKIM key created");
    reply(shown)
}

pub(super) async fn remove(State(s): State<AdminState>, Path((domain, selector)): Path<(String, String)>) -> ApiResult {
    s.cluster
        .membership
        .write_dkim(DkimCommand::Remove {
            domain: domain.clone(),
            selector: selector.clone(),
        })
        .await
        .map_err(refused)?;
    tracing::info!(%domain, %selector, "DKIM key removed");
    done()
}

fn created(secs: u64) -> String {
    quill_proto::message::rfc5322_date(secs)
}

/// Runs `quill admin dkim ...` and prints its answer.
pub(super) async fn run(node: &str, token: &str, c: &DkimCmd) -> anyhow::Result<()> {
    match c {
        DkimCmd::Create {
            domain,
            selector,
            algorithm,
        } => {
            let body = CreateBody {
                selector: selector.clone(),
                algorithm: Some(algorithm.clone()),
            };
            let path = format!("/v1/dkim/{}", path_segment(domain));
            let r: KeyRow = serde_json::from_value(
                super::client::call_ok(node, token, Method::POST, &path, Some(serde_json::to_value(body)?)).await?,
            )?;
            println!("{}", r.zone_line);
        }
        DkimCmd::List { json } => {
            let v = super::client::call_ok(node, token, Method::GET, "/v1/dkim", None).await?;
            if *json {
                println!("{}", serde_json::to_string(&v)?);
            } else {
                let rows: Vec<KeyRow> = serde_json::from_value(v)?;
                for r in &rows {
                    let signing = if r.signing { ", signing" } else { "" };
                    println!(
                        "{} {} {} (created {}{signing})\n  {}",
                        r.domain,
                        r.selector,
                        r.algorithm,
                        created(r.created_secs),
                        r.zone_line
                    );
                }
            }
        }
        DkimCmd::Remove { domain, selector } => {
            let path = format!("/v1/dkim/{}/{}", path_segment(domain), path_segment(selector));
            super::client::call_ok(node, token, Method::DELETE, &path, None).await?;
            println!("ok");
        }
    }
    Ok(())
}
