//! A small client for the admin API, used by `quill admin` and the
//! harness: [`request`] sends one typed [`Call`] and reads its typed
//! reply; [`call`] is the untyped form underneath.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use quill_proto::admin::Call;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

/// Every admin call finishes or fails within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Replies larger than this are refused (a user list of a large domain
/// fits easily).
const RESPONSE_BYTES_MAX: usize = 64 << 20;

/// Sends one request and returns the status code and the JSON reply.
pub async fn call(
    node: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let bytes = body.map(|b| serde_json::to_vec(&b).expect("json")).unwrap_or_default();
    send(node, token, method, path, ("application/json", bytes), REQUEST_TIMEOUT).await
}

/// As [`call`], the reply of a 2xx only: else an error with the server's
/// reason and the status.
pub async fn call_ok(
    node: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let (status, reply) = call(node, token, method, path, body).await?;
    ok_or_reason(status, reply)
}

/// The reply of a 2xx; else an error with the server's reason and the
/// status.
pub fn ok_or_reason(status: u16, reply: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    if !(200..300).contains(&status) {
        let msg = reply
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| reply.to_string());
        bail!("{msg} (HTTP {status})");
    }
    Ok(reply)
}

/// Sends one request with a body of its content type (JSON, or the raw
/// bytes of an upload) within `timeout`: the status and the JSON reply.
pub async fn send(
    node: &str,
    token: &str,
    method: Method,
    path: &str,
    (content_type, bytes): (&str, Vec<u8>),
    timeout: Duration,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let exchange = async {
        let stream = TcpStream::connect(node)
            .await
            .with_context(|| format!("cannot connect to admin API at {node}"))?;
        // Anything but an HTTP server here (a mail port, the QUIC port) fails
        // below: say what was expected rather than hyper's words alone.
        let not_admin = |e: hyper::Error| {
            anyhow!(
                "no admin API answered at {node} ({e}); --node takes a node's --admin address \
                 (HTTP, e.g. 127.0.0.1:8080), not a mail or cluster port"
            )
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(not_admin)?;
        let conn = tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", node)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(bytes)))?;
        let resp = sender.send_request(req).await.map_err(not_admin)?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| anyhow!("reading admin reply: {e}"))?
            .to_bytes();
        conn.abort();
        let value = if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        Ok((status, value))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| anyhow!("admin API at {node} did not answer within {timeout:?}"))?
}

/// Sends one call and reads its reply as `T`; a failure (not 2xx) is an
/// error with the server's reason and the status.
pub async fn request<T: DeserializeOwned>(node: &str, token: &str, c: &Call) -> anyhow::Result<T> {
    let method = Method::from_bytes(c.method().as_bytes()).expect("a known method");
    let reply = call_ok(node, token, method, &c.path(), c.body()).await?;
    serde_json::from_value(reply).with_context(|| format!("an unexpected reply from {node}"))
}
