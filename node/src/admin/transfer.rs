//! The streamed side of `quill admin`: `export` (a mailbox to standard
//! output), `import` (an mbox file into a mailbox), and `backup` and
//! `restore` of a whole cluster. Bodies go through in chunks: memory stays
//! flat whatever the mailbox's size.
//!
//! A backup directory holds `directory.json` (the Raft state's directory:
//! `backup::DirectoryBackup`), `mail/NNNNN.mbox` (one per user, as
//! `export` writes it) and, written last, `manifest.json` naming every
//! file with its size and blake3 hash. A directory without a manifest is
//! an unfinished backup and `restore` refuses it; so does one whose files
//! do not match their hashes (checked before anything is written to the
//! cluster). Files are written under a temporary name, synced, then
//! renamed: a half-written file is never taken for a whole one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use quill_proto::admin::ImportReport;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::backup::DirectoryBackup;

/// A stream that sends or receives nothing for this long has failed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// Bytes read from a file at once for an upload.
const CHUNK_BYTES: usize = 256 * 1024;
/// The manifest's layout version.
const MANIFEST_FORMAT: u32 = 1;

type UploadBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn send(
    node: &str,
    token: &str,
    method: Method,
    path: &str,
    body: UploadBody,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    let stream = TcpStream::connect(node)
        .await
        .with_context(|| format!("cannot connect to admin API at {node}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| anyhow!("no admin API answered at {node} ({e})"))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", node)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", content_type(path))
        .body(body)?;
    sender
        .send_request(req)
        .await
        .map_err(|e| anyhow!("admin API at {node}: {e}"))
}

/// The request body's type: JSON, but for an import's mbox.
fn content_type(path: &str) -> &'static str {
    if path.starts_with("/v1/import/") {
        "application/mbox"
    } else {
        "application/json"
    }
}

fn full(bytes: Vec<u8>) -> UploadBody {
    Full::new(Bytes::from(bytes)).map_err(|never| match never {}).boxed()
}

/// A failed reply's reason, from its JSON error.
async fn failure(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Error {
    let status = resp.status().as_u16();
    let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    anyhow!("{msg} (HTTP {status})")
}

/// GETs `path` into `out`, at most `max_rate` bytes a second if given
/// (reading slower holds the node's stream back: it reads the mailbox
/// only as fast as the bytes leave): the bytes written and their hash.
async fn download(
    node: &str,
    token: &str,
    path: &str,
    out: &mut (impl AsyncWrite + Unpin),
    max_rate: Option<u64>,
) -> anyhow::Result<(u64, blake3::Hash)> {
    let start = tokio::time::Instant::now();
    let resp = tokio::time::timeout(IDLE_TIMEOUT, send(node, token, Method::GET, path, full(Vec::new())))
        .await
        .map_err(|_| anyhow!("admin API at {node} did not answer"))??;
    if !resp.status().is_success() {
        return Err(failure(resp).await);
    }
    let mut body = resp.into_body();
    let (mut n, mut hasher) = (0u64, blake3::Hasher::new());
    loop {
        let frame = tokio::time::timeout(IDLE_TIMEOUT, body.frame())
            .await
            .map_err(|_| anyhow!("the export stalled after {n} bytes"))?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| anyhow!("the export failed after {n} bytes (the node logs why): {e}"))?;
        if let Ok(data) = frame.into_data() {
            hasher.update(&data);
            out.write_all(&data).await?;
            n += data.len() as u64;
            if let Some(rate) = max_rate.filter(|r| *r > 0) {
                tokio::time::sleep_until(start + Duration::from_secs_f64(n as f64 / rate as f64)).await;
            }
        }
    }
    out.flush().await?;
    Ok((n, hasher.finalize()))
}

/// POSTs the file at `file` to `path`, streamed; the JSON reply.
async fn upload<T: serde::de::DeserializeOwned>(node: &str, token: &str, path: &str, file: &Path) -> anyhow::Result<T> {
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot read {}", file.display()))?;
    let chunks = futures::stream::unfold(f, |mut f| async move {
        let mut buf = vec![0; CHUNK_BYTES];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Frame::data(Bytes::from(buf))), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let body = BodyExt::boxed(StreamBody::new(chunks));
    let resp = send(node, token, Method::POST, path, body)
        .await
        .map_err(|e| e.context("the node closed the upload before it ended: it refused the file (its log says why)"))?;
    if !resp.status().is_success() {
        return Err(failure(resp).await);
    }
    let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| anyhow!("reading the reply: {e}"))?
        .to_bytes();
    serde_json::from_slice(&body).with_context(|| format!("an unexpected reply from {node}"))
}

/// A path segment, percent-encoded.
fn segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' | b'+' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `quill admin export ADDRESS [--format mbox|maildir]`: to standard output.
pub async fn export(node: &str, token: &str, address: &str, format: &str, max_rate: Option<u64>) -> anyhow::Result<()> {
    let path = format!("/v1/export/{}?format={}", segment(address), segment(format));
    let mut out = tokio::io::stdout();
    let (n, _) = download(node, token, &path, &mut out, max_rate).await?;
    eprintln!("exported {address}: {n} bytes");
    Ok(())
}

/// `quill admin import ADDRESS FILE [--folder NAME]`.
pub async fn import(node: &str, token: &str, address: &str, file: &Path, folder: Option<&str>) -> anyhow::Result<()> {
    let r = import_file(node, token, address, file, folder).await?;
    println!(
        "imported {} message(s), {} already there, {} folder(s) made",
        r.imported, r.skipped, r.folders_created
    );
    Ok(())
}

async fn import_file(
    node: &str,
    token: &str,
    address: &str,
    file: &Path,
    folder: Option<&str>,
) -> anyhow::Result<ImportReport> {
    let mut path = format!("/v1/import/{}", segment(address));
    if let Some(f) = folder {
        path.push_str(&format!("?folder={}", segment(f)));
    }
    upload(node, token, &path, file).await
}

/// One file of a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct FileEntry {
    file: String,
    bytes: u64,
    blake3: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct UserEntry {
    address: String,
    #[serde(flatten)]
    mail: FileEntry,
}

/// `manifest.json`: what a finished backup holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    release: String,
    feature_level: u32,
    node: String,
    /// When it began: every message acknowledged before this is in it.
    started_ms: u64,
    finished_ms: u64,
    directory: FileEntry,
    users: Vec<UserEntry>,
}

/// Writes `name` in `dir` from `write`, under a temporary name first,
/// synced, then renamed (and the directory synced).
async fn write_file<F, Fut>(dir: &Path, name: &str, write: F) -> anyhow::Result<FileEntry>
where
    F: FnOnce(tokio::fs::File) -> Fut,
    Fut: Future<Output = anyhow::Result<(tokio::fs::File, u64, blake3::Hash)>>,
{
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.part"));
    let f = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .await
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    let (f, bytes, hash) = write(f).await?;
    f.sync_all().await?;
    drop(f);
    tokio::fs::rename(&tmp, &path).await?;
    if let Some(parent) = path.parent() {
        tokio::fs::File::open(parent).await?.sync_all().await?;
    }
    Ok(FileEntry {
        file: name.to_owned(),
        bytes,
        blake3: hash.to_hex().to_string(),
    })
}

async fn write_bytes(dir: &Path, name: &str, bytes: Vec<u8>) -> anyhow::Result<FileEntry> {
    write_file(dir, name, |mut f| async move {
        f.write_all(&bytes).await?;
        Ok((f, bytes.len() as u64, blake3::hash(&bytes)))
    })
    .await
}

/// `quill admin backup DIR`: DIR must be new or empty.
pub async fn backup(node: &str, token: &str, dir: &Path, max_rate: Option<u64>) -> anyhow::Result<()> {
    let started_ms = crate::time::now_ms();
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!(
            "{} is not empty: a backup goes into a new or empty directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir.join("mail")).with_context(|| format!("cannot make {}", dir.display()))?;
    let mut raw = Vec::new();
    download(node, token, "/v1/backup/directory", &mut raw, None)
        .await
        .context("reading the directory")?;
    let directory: DirectoryBackup = serde_json::from_slice(&raw).context("an unexpected directory reply")?;
    let dir_entry = write_bytes(dir, "directory.json", raw).await?;
    let mut users = Vec::new();
    let mut total = 0u64;
    for (i, u) in directory.users.iter().enumerate() {
        let name = format!("mail/{:05}.mbox", i + 1);
        let path = format!("/v1/export/{}?format=mbox", segment(&u.address));
        let entry = write_file(dir, &name, |mut f| async move {
            let (n, h) = download(node, token, &path, &mut f, max_rate).await?;
            Ok((f, n, h))
        })
        .await
        .with_context(|| format!("exporting {}", u.address))?;
        total += entry.bytes;
        eprintln!("{}: {} bytes", u.address, entry.bytes);
        users.push(UserEntry {
            address: u.address.clone(),
            mail: entry,
        });
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        release: env!("CARGO_PKG_VERSION").to_owned(),
        feature_level: directory.feature_level,
        node: node.to_owned(),
        started_ms,
        finished_ms: crate::time::now_ms(),
        directory: dir_entry,
        users,
    };
    write_bytes(dir, "manifest.json", serde_json::to_vec_pretty(&manifest)?).await?;
    let secs = (manifest.finished_ms - started_ms) as f64 / 1000.0;
    println!(
        "backed up {} user(s), {total} bytes of mail, in {secs:.1}s to {}",
        manifest.users.len(),
        dir.display()
    );
    Ok(())
}

/// Checks that `entry`'s file in `dir` is whole (size and hash).
async fn verify(dir: &Path, entry: &FileEntry) -> anyhow::Result<PathBuf> {
    if entry.file.contains("..") || Path::new(&entry.file).is_absolute() {
        bail!("the manifest names a file outside the backup: {}", entry.file);
    }
    let path = dir.join(&entry.file);
    let mut f = tokio::fs::File::open(&path)
        .await
        .with_context(|| format!("cannot read {}", path.display()))?;
    let (mut hasher, mut n, mut buf) = (blake3::Hasher::new(), 0u64, vec![0; CHUNK_BYTES]);
    loop {
        let k = f.read(&mut buf).await?;
        if k == 0 {
            break;
        }
        hasher.update(&buf[..k]);
        n += k as u64;
    }
    if n != entry.bytes || hasher.finalize().to_hex().as_str() != entry.blake3 {
        bail!(
            "{} does not match the manifest ({n} bytes, {} expected): the backup is damaged",
            path.display(),
            entry.bytes
        );
    }
    Ok(path)
}

/// `quill admin restore DIR`: into a cluster without users; with
/// `resume`, the mail only (after a restore that stopped part way:
/// imports skip what is there).
pub async fn restore(node: &str, token: &str, dir: &Path, resume: bool) -> anyhow::Result<()> {
    let raw = std::fs::read(dir.join("manifest.json")).with_context(|| {
        format!(
            "{} has no manifest.json: not a backup, or one that did not finish",
            dir.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_slice(&raw).context("manifest.json")?;
    if manifest.format != MANIFEST_FORMAT {
        bail!("backup format {} is not {MANIFEST_FORMAT}", manifest.format);
    }
    let dir_path = verify(dir, &manifest.directory).await?;
    let mut mail = Vec::new();
    for u in &manifest.users {
        mail.push((u.address.clone(), verify(dir, &u.mail).await?));
    }
    if !resume {
        let directory = std::fs::read(&dir_path)?;
        let resp = send(node, token, Method::POST, "/v1/restore/directory", full(directory)).await?;
        if !resp.status().is_success() {
            return Err(failure(resp).await.context("restoring the directory"));
        }
    }
    let (mut imported, mut skipped) = (0, 0);
    for (address, path) in &mail {
        let r = import_file(node, token, address, path, None).await.with_context(|| {
            format!(
                "importing {address}'s mail (running restore's import again is safe: quill admin import {address} {})",
                path.display()
            )
        })?;
        eprintln!("{address}: {} message(s)", r.imported + r.skipped);
        imported += r.imported;
        skipped += r.skipped;
    }
    println!(
        "restored {} user(s), {imported} message(s) ({skipped} already there)",
        mail.len()
    );
    Ok(())
}
