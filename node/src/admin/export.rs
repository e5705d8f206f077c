//! Export and import of one user's mail, online and streamed: a reply or
//! a request body goes one message at a time, so memory stays flat
//! whatever the mailbox's size.
//!
//! `GET /v1/export/{address}?format=mbox` lists the mailbox once (the
//! messages acknowledged before the request, and perhaps some after),
//! then reads and writes each message in turn (a few reads ahead), in
//! folder and UID order: mboxrd with the folder and flags in added headers
//! (`quill_proto::mbox`). `format=maildir` writes a tar stream of a
//! Maildir++ tree instead (flags in the file names, keywords in each
//! folder's `dovecot-keywords`). A message deleted meanwhile is left out;
//! one that cannot be read ends the stream without its last chunk, so the
//! client sees a failed transfer, never a short file taken for whole.
//!
//! `POST /v1/import/{address}[?folder=NAME]` reads mbox from the request
//! body and stores each message as IMAP APPEND does (R copies, its flags,
//! UIDs in its folder), making missing folders. A message whose bytes are
//! already in that folder (same blake3 hash: same Message-ID and content)
//! is skipped, so importing a file twice stores it once. Every byte is
//! the client's: lines and messages are bounded by the node's message size
//! limit, flags are checked as IMAP's STORE checks them, folder names as
//! CREATE checks them, and any failure answers 400 with what was imported
//! before it (importing again is safe).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use futures::StreamExt;
use membership::DirectoryError;
use quill_proto::admin::{ExportQuery, ImportQuery, ImportReport};
use quill_proto::imap::folders;
use quill_proto::mbox;
use replication::BodyHash;
use replication::marks::FLAGS_PER_MESSAGE_MAX;
use replication::replica::Listed;

use super::state::{AdminState, ApiResult, Failure};
use crate::mail::{Mail, flag_change, fresh_listed, store_one};
use crate::services::Services;
use crate::uids::sequence_name;

/// Messages read ahead of the one being written (export), or being
/// stored at once (import): enough to hide a replica's latency, few
/// enough that memory stays a handful of messages.
const IN_FLIGHT: usize = 4;
/// UIDs given in one request at most during an import.
const UID_BATCH: usize = 256;
/// How long a refused import's remaining bytes are read and dropped.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the rest of a refused upload and drops it (for [`DRAIN_TIME`] at
/// most), so that the client, still sending, gets the reason rather than
/// a connection reset.
async fn drain<S: futures::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Unpin>(mut stream: S) {
    let all = async { while let Some(Ok(_)) = stream.next().await {} };
    let _ = tokio::time::timeout(DRAIN_TIME, all).await;
}
/// A tar stream ends with two empty blocks.
const TAR_END: [u8; 1024] = [0; 1024];

/// One message to export: what the listing said, and where it goes.
struct Entry {
    listed: Listed,
    folder: String,
    uid: Option<u32>,
}

/// The user's mailbox name, or 404.
fn mailbox_of(s: &AdminState, address: &str) -> Result<String, Failure> {
    s.services
        .directory
        .user(address)
        .map(|u| u.mailbox())
        .ok_or_else(|| Failure::from(DirectoryError::NoSuchUser(address.to_owned())))
}

/// The mailbox's messages in folder and UID order, with their folder
/// names (a message of a folder deleted meanwhile is left out).
async fn entries(services: &Services, mailbox: &str) -> Vec<Entry> {
    let names: HashMap<String, String> = services
        .uids
        .names(&folders::scope(mailbox))
        .into_iter()
        .map(|(name, raw)| (folders::id_string(&raw), name))
        .collect();
    let mut by_folder: BTreeMap<String, Vec<Listed>> = BTreeMap::new();
    for l in services.mail.mailbox(mailbox).await {
        let name = match l.meta.folder.as_str() {
            folders::INBOX => folders::INBOX.to_owned(),
            id => match names.get(id) {
                Some(n) => n.clone(),
                None => continue,
            },
        };
        by_folder.entry(name).or_default().push(l);
    }
    let mut out = Vec::new();
    for (folder, msgs) in by_folder {
        let seq = sequence_name(mailbox, &msgs[0].meta.folder);
        let ids: Vec<[u8; 16]> = msgs.iter().map(|l| l.meta.id.0).collect();
        let uids = services.uids.numbers(&seq, &ids).map(|n| n.uids).unwrap_or_default();
        let mut these: Vec<Entry> = msgs
            .into_iter()
            .enumerate()
            .map(|(i, listed)| Entry {
                listed,
                folder: folder.clone(),
                uid: uids.get(i).copied().flatten(),
            })
            .collect();
        these.sort_by_key(|e| (e.uid.is_none(), e.uid, e.listed.meta.arrival_ms, e.listed.meta.id.0));
        out.extend(these);
    }
    out
}

/// `GET /v1/export/{address}?format=mbox|maildir`.
pub(super) async fn export(
    State(s): State<AdminState>,
    Path(address): Path<String>,
    Query(q): Query<ExportQuery>,
) -> ApiResult {
    let maildir = match q.format.as_deref().unwrap_or("mbox") {
        "mbox" => false,
        "maildir" => true,
        other => {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                format!("unknown format {other:?}: mbox or maildir"),
            ));
        }
    };
    let mailbox = mailbox_of(&s, &address)?;
    let list = entries(&s.services, &mailbox).await;
    let count = list.len();
    let bytes: u64 = list.iter().map(|e| e.listed.meta.size_bytes).sum();
    tracing::info!(user = %address, messages = count, bytes, maildir, "export started");
    let mut keywords = KeywordLetters::default();
    if maildir {
        for e in &list {
            keywords.add(&e.folder, e.listed.meta.marks.set_flags());
        }
    }
    let keywords = Arc::new(keywords);
    let mail = s.services.mail.clone();
    let mailbox = Arc::new(mailbox);
    let mut folders_started: HashSet<String> = HashSet::new();
    let stream = futures::stream::iter(list)
        .map(move |e| {
            let (mail, mailbox) = (mail.clone(), mailbox.clone());
            async move { read_one(&*mail, &mailbox, e).await }
        })
        .buffered(IN_FLIGHT)
        .filter_map(move |r| {
            let out = match r {
                Ok(None) => None,
                Ok(Some((e, body))) => Some(Ok(if maildir {
                    let first = folders_started.insert(e.folder.clone());
                    maildir_entry(&e, &body, first.then_some(&*keywords), &keywords)
                } else {
                    let meta = mbox::Meta {
                        folder: e.folder.clone(),
                        flags: e.listed.meta.marks.set_flags().map(str::to_owned).collect(),
                        arrival_ms: e.listed.meta.arrival_ms,
                    };
                    let mut out = Vec::with_capacity(body.len() + 256);
                    mbox::write(&mut out, &meta, &body);
                    Bytes::from(out)
                })),
                Err(e) => Some(Err(e)),
            };
            std::future::ready(out)
        });
    let body = if maildir {
        Body::from_stream(stream.chain(futures::stream::once(async { Ok(Bytes::from_static(&TAR_END)) })))
    } else {
        Body::from_stream(stream)
    };
    let kind = if maildir {
        "application/x-tar"
    } else {
        "application/mbox"
    };
    Ok(([("content-type", kind)], body).into_response())
}

/// One message's bytes; `None` if it was deleted since the listing.
async fn read_one(mail: &dyn Mail, mailbox: &str, e: Entry) -> Result<Option<(Entry, Vec<u8>)>, std::io::Error> {
    match mail.read(&e.listed).await {
        Ok(body) => Ok(Some((e, body))),
        Err(_) if mail.is_deleted(mailbox, &e.listed).await => Ok(None),
        Err(err) => {
            tracing::warn!(mailbox, id = %e.listed.meta.id, "export failed: a message cannot be read: {err}");
            Err(std::io::Error::other(format!(
                "message {} cannot be read: {err}",
                e.listed.meta.id
            )))
        }
    }
}

/// The keywords of each folder and the letter (a–z) Dovecot's Maildir
/// gives each, in order of first use (26 at most; more are left out of
/// the file names).
#[derive(Default)]
struct KeywordLetters(BTreeMap<String, Vec<String>>);

impl KeywordLetters {
    fn add<'a>(&mut self, folder: &str, flags: impl Iterator<Item = &'a str>) {
        let list = self.0.entry(folder.to_owned()).or_default();
        for f in flags.filter(|f| !f.starts_with('\\')) {
            if list.len() < 26 && !list.iter().any(|k| k == f) {
                list.push(f.to_owned());
            }
        }
    }

    fn letter(&self, folder: &str, keyword: &str) -> Option<char> {
        let i = self.0.get(folder)?.iter().position(|k| k == keyword)?;
        Some((b'a' + i as u8) as char)
    }
}

/// A folder's directory in the Maildir++ tree: `Maildir/` for INBOX,
/// `Maildir/.a.b/` for `a/b` (a `.` in a name is written `&AC4-`, as
/// modified UTF-7 would).
fn maildir_dir(folder: &str) -> String {
    if folder == folders::INBOX {
        return "Maildir/".to_owned();
    }
    let name: Vec<String> = folder
        .split(folders::DELIMITER)
        .map(|l| l.replace('.', "&AC4-"))
        .collect();
    format!("Maildir/.{}/", name.join("."))
}

/// One tar entry (header, data, padding): bytes for the stream.
fn tar_file(path: &str, data: &[u8], mtime_s: u64) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o600);
    header.set_mtime(mtime_s);
    header.set_entry_type(tar::EntryType::Regular);
    let mut b = tar::Builder::new(Vec::with_capacity(data.len() + 1536));
    // Writing into a Vec fails only on a path tar cannot hold (none of
    // ours: long names take GNU's long-name entries).
    if let Err(e) = b.append_data(&mut header, path, data) {
        tracing::warn!(path, "export: tar entry not written: {e}");
    }
    // Take the bytes before the builder's drop adds the end blocks.
    std::mem::take(b.get_mut())
}

/// A message as a Maildir file (and, for a folder's first message, its
/// `dovecot-keywords` file).
fn maildir_entry(e: &Entry, body: &[u8], first: Option<&KeywordLetters>, letters: &KeywordLetters) -> Bytes {
    let dir = maildir_dir(&e.folder);
    let mtime = e.listed.meta.arrival_ms / 1000;
    let mut out = Vec::new();
    if let Some(k) = first
        && let Some(list) = k.0.get(&e.folder)
        && !list.is_empty()
    {
        let text: String = list.iter().enumerate().map(|(i, k)| format!("{i} {k}\n")).collect();
        out.extend(tar_file(&format!("{dir}dovecot-keywords"), text.as_bytes(), mtime));
    }
    let mut info: Vec<char> = Vec::new();
    for f in e.listed.meta.marks.set_flags() {
        let c = match f.to_ascii_lowercase().as_str() {
            "\\draft" => Some('D'),
            "\\flagged" => Some('F'),
            "$forwarded" => Some('P'),
            "\\answered" => Some('R'),
            "\\seen" => Some('S'),
            "\\deleted" => Some('T'),
            _ if !f.starts_with('\\') => letters.letter(&e.folder, f),
            _ => None,
        };
        info.extend(c);
    }
    info.sort_unstable();
    info.dedup();
    let info: String = info.into_iter().collect();
    let name = format!("{dir}cur/{mtime}.{}.quill,S={}:2,{info}", e.listed.meta.id, body.len());
    out.extend(tar_file(&name, body, mtime));
    Bytes::from(out)
}

/// A folder's id for an import: made (with the levels above it) when
/// missing, as IMAP CREATE makes it.
async fn import_folder(services: &Services, mailbox: &str, name: &str) -> Result<(String, bool), String> {
    let name = folders::canonical(name.as_bytes()).map_err(|why| format!("folder {name:?}: {why}"))?;
    if name == folders::INBOX {
        return Ok((name, false));
    }
    let scope = folders::scope(mailbox);
    let names = services.uids.names(&scope);
    if let Some(f) = folders::resolve(&names, &name) {
        return Ok((f.id, false));
    }
    let mut items: Vec<(String, [u8; 16])> = folders::superiors(&name)
        .into_iter()
        .chain([name.clone()])
        .filter(|s| s != folders::INBOX && !names.contains_key(s))
        .map(|s| (s, services.mail.new_message_id(crate::time::now_ms()).0))
        .collect();
    items.dedup_by(|a, b| a.0 == b.0);
    if names.len() + items.len() > folders::FOLDERS_MAX {
        return Err(format!("folder {name:?}: the user has too many folders (at most 1000)"));
    }
    services
        .uids
        .bind(&scope, items)
        .await
        .map_err(|e| format!("folder {name:?} not made: {e}"))?;
    folders::resolve(&services.uids.names(&scope), &name)
        .map(|f| (f.id, true))
        .ok_or_else(|| format!("folder {name:?} not made"))
}

/// The flags of an imported message as IMAP would store them: the five
/// system flags in their usual case, keywords as IMAP allows them; the
/// rest left out.
fn import_flags(flags: &[String]) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = Vec::new();
    for f in flags {
        let name = match f.to_ascii_lowercase().as_str() {
            "\\seen" => "\\Seen".to_owned(),
            "\\answered" => "\\Answered".to_owned(),
            "\\flagged" => "\\Flagged".to_owned(),
            "\\deleted" => "\\Deleted".to_owned(),
            "\\draft" => "\\Draft".to_owned(),
            _ if membership::keywords::valid_keyword(f) => f.clone(),
            _ => continue,
        };
        if out.len() < FLAGS_PER_MESSAGE_MAX && !out.iter().any(|(n, _)| n.eq_ignore_ascii_case(&name)) {
            out.push((name, true));
        }
    }
    out
}

/// Stores one imported message with its flags: its id, or why not.
async fn store_imported(
    services: Arc<Services>,
    mailbox: Arc<String>,
    folder_id: String,
    arrival_ms: u64,
    flags: Vec<(String, bool)>,
    body: Vec<u8>,
) -> Result<(String, [u8; 16]), String> {
    let mail = &*services.mail;
    let Some(stored) = store_one(mail, &mailbox, &folder_id, arrival_ms, body).await else {
        return Err("a message could not be stored (too few nodes up?)".to_owned());
    };
    if !flags.is_empty() {
        let listed = fresh_listed(stored.id, &folder_id, arrival_ms, stored.copies);
        let change = flag_change(&listed, &flags, mail.hlc_now());
        if let Err(e) = mail.mark(&mailbox, &[(listed, change)]).await {
            // Anti-entropy carries them to the copies that missed them.
            tracing::debug!(%mailbox, "import: flags not recorded everywhere: {e}");
        }
    }
    Ok((folder_id, stored.id.0))
}

/// What an import did so far, and the UIDs it has yet to ask for.
struct Importer {
    services: Arc<Services>,
    mailbox: Arc<String>,
    default_folder: String,
    /// (folder id, body hash) of every message there.
    present: HashSet<(String, [u8; 32])>,
    /// Folder name → id, as made or found.
    folder_ids: HashMap<String, String>,
    report: ImportReport,
    unnumbered: BTreeMap<String, Vec<[u8; 16]>>,
}

impl Importer {
    async fn number(&mut self, all: bool) {
        for (folder, ids) in self.unnumbered.iter_mut() {
            if ids.is_empty() || (!all && ids.len() < UID_BATCH) {
                continue;
            }
            let ids = std::mem::take(ids);
            // A message left unnumbered gets its UID when a session
            // selects the folder, as delivered mail does.
            if let Err(e) = self
                .services
                .uids
                .assign(&sequence_name(&self.mailbox, folder), ids)
                .await
            {
                tracing::debug!(mailbox = %self.mailbox, "import: UIDs not given now: {e}");
            }
        }
    }

    fn stored(&mut self, r: Result<(String, [u8; 16]), String>) -> Result<(), String> {
        let (folder, id) = r?;
        self.report.imported += 1;
        self.unnumbered.entry(folder).or_default().push(id);
        Ok(())
    }

    /// The store to run for one parsed message, or `None` if it is there
    /// already.
    async fn prepare(
        &mut self,
        p: mbox::Parsed,
    ) -> Result<Option<impl Future<Output = Result<(String, [u8; 16]), String>> + use<>>, String> {
        let name = p.folder.clone().unwrap_or_else(|| self.default_folder.clone());
        let folder_id = match self.folder_ids.get(&name) {
            Some(id) => id.clone(),
            None => {
                let (id, made) = import_folder(&self.services, &self.mailbox, &name).await?;
                self.report.folders_created += usize::from(made);
                self.folder_ids.insert(name, id.clone());
                id
            }
        };
        let hash = BodyHash::of(&p.body).0;
        if !self.present.insert((folder_id.clone(), hash)) {
            self.report.skipped += 1;
            return Ok(None);
        }
        let arrival = p.arrival_ms.unwrap_or_else(crate::time::now_ms);
        Ok(Some(store_imported(
            self.services.clone(),
            self.mailbox.clone(),
            folder_id,
            arrival,
            import_flags(&p.flags),
            p.body,
        )))
    }
}

/// `POST /v1/import/{address}[?folder=NAME]`: the body is mbox.
pub(super) async fn import(
    State(s): State<AdminState>,
    Path(address): Path<String>,
    Query(q): Query<ImportQuery>,
    body: Body,
) -> ApiResult {
    let default_folder = q.folder.unwrap_or_else(|| folders::INBOX.to_owned());
    let checked = mailbox_of(&s, &address).and_then(|m| {
        folders::canonical(default_folder.as_bytes())
            .map(|_| m)
            .map_err(|why| Failure(StatusCode::BAD_REQUEST, format!("--folder: {why}")))
    });
    let mailbox = match checked {
        Ok(m) => m,
        Err(refusal) => {
            // Refused before reading the file: it is dropped all the same.
            drain(body.into_data_stream()).await;
            return Err(refusal);
        }
    };
    let present = s
        .services
        .mail
        .mailbox(&mailbox)
        .await
        .into_iter()
        .map(|l| (l.meta.folder, l.meta.body.0))
        .collect();
    let max = s.services.limits().message_bytes_max;
    let mut reader = mbox::Reader::new(max, max);
    let mut im = Importer {
        services: s.services.clone(),
        mailbox: Arc::new(mailbox),
        default_folder,
        present,
        folder_ids: HashMap::new(),
        report: ImportReport::default(),
        unnumbered: BTreeMap::new(),
    };
    let mut stream = body.into_data_stream();
    let mut storing = futures::stream::FuturesOrdered::new();
    let mut parsed = Vec::new();
    let mut done = false;
    let outcome: Result<(), (StatusCode, String)> = async {
        while !done {
            match stream.next().await {
                Some(Ok(chunk)) => reader.push(&chunk, &mut parsed),
                Some(Err(e)) => return Err((StatusCode::BAD_REQUEST, format!("reading the request: {e}"))),
                None => {
                    done = true;
                    reader.finish(&mut parsed)
                }
            }
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
            for p in parsed.drain(..) {
                if let Some(f) = im.prepare(p).await.map_err(|e| (StatusCode::BAD_REQUEST, e))? {
                    storing.push_back(f);
                }
                while storing.len() >= IN_FLIGHT {
                    let r = storing.next().await.expect("in flight");
                    im.stored(r).map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e))?;
                }
            }
            im.number(false).await;
        }
        Ok(())
    }
    .await;
    // What was started is finished (and counted) whatever happened.
    let mut failed = outcome.err();
    if failed.is_some() {
        drain(&mut stream).await;
    }
    while let Some(r) = storing.next().await {
        if let Err(e) = im.stored(r)
            && failed.is_none()
        {
            failed = Some((StatusCode::SERVICE_UNAVAILABLE, e));
        }
    }
    im.number(true).await;
    let r = &im.report;
    tracing::info!(user = %address, imported = r.imported, skipped = r.skipped, ok = failed.is_none(), "import");
    match failed {
        None => Ok(Json(im.report).into_response()),
        Some((code, why)) => Err(Failure(
            code,
            format!(
                "{why} (after {} message(s) imported and {} already there; importing the file again is safe)",
                r.imported, r.skipped
            ),
        )),
    }
}
