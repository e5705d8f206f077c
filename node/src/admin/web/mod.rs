//! The operator's web page on the admin port: server-rendered HTML
//! ([`pages`], maud), no JavaScript. `GET /` is the login form until the
//! admin token is posted to `/login` (never in a URL); then it is the
//! cluster, the queue, the domains and users, and the settings, with forms
//! that post to the routes below and are redirected (303) back to `/` with
//! a message.
//!
//! A login makes a session: a random 32-byte id in the cookie
//! `quill_session` (HttpOnly, SameSite=Strict, Path=/; not Secure: the
//! admin port is plain HTTP), kept here in memory, keyed by its hash, for
//! [`SESSION_LIFETIME`], at most [`SESSIONS_MAX`] at once. Each session has
//! a CSRF token, a hidden `csrf` field in every form but the login form,
//! compared in constant time: a form posted without it, with a wrong one,
//! or with an unknown or forged cookie gets 403 and changes nothing. Every
//! reply forbids caching, framing and scripts (see [`secure_headers`]).
//!
//! Each form does what the JSON API's handler does, through the same
//! functions (`directory::create_user`, `queue::act_on`, ...).
//!
//! ```text
//! GET  /                 the login form, or the page
//! POST /login            {token}: a session cookie, or 401
//! POST /logout           {csrf}
//! POST /domains          {csrf, domain}
//! POST /domains/remove   {csrf, domain}
//! POST /users            {csrf, address, password, quota}
//! POST /users/remove     {csrf, address, purge?}
//! POST /users/password   {csrf, address, password}
//! POST /users/quota      {csrf, address, quota}  ("" or "none": no quota)
//! POST /queue            {csrf, id, action}      (retry, hold, release, delete)
//! POST /settings         {csrf, key, value}
//! POST /settings/unset   {csrf, key}
//! ```

mod pages;

use pages::Flash;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use membership::DirectoryCommand;
use quill_proto::admin::UserBody;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::state::{AdminState, Failure, token_matches};
use super::{activity, cluster, directory, queue, settings};

/// How long a login lasts.
const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at once; a login over it ends the oldest.
const SESSIONS_MAX: usize = 64;
/// How long a wrong token waits for its 401 (guessing is slow).
const LOGIN_REFUSED_DELAY: Duration = Duration::from_millis(500);
const COOKIE: &str = "quill_session";

struct Session {
    csrf: String,
    expires: Instant,
    flash: Option<Flash>,
}

/// The live sessions, by the hash of their cookie (a lookup's time says
/// nothing about the ids).
#[derive(Default)]
struct Sessions(Mutex<HashMap<[u8; 32], Session>>);

/// A session's key, put in the request by [`require_session`].
#[derive(Clone, Copy)]
struct SessionKey([u8; 32]);

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session: its cookie value.
    fn open(&self) -> std::io::Result<String> {
        let id = crate::files::hex(&crate::files::random_bytes()?);
        let csrf = crate::files::hex(&crate::files::random_bytes()?);
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| s.expires > now);
        while map.len() >= SESSIONS_MAX {
            let oldest = map.iter().min_by_key(|(_, s)| s.expires).map(|(k, _)| *k);
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(
            key_of(&id),
            Session {
                csrf,
                expires: now + SESSION_LIFETIME,
                flash: None,
            },
        );
        Ok(id)
    }

    /// The live session the request's cookie names.
    fn find(&self, headers: &HeaderMap) -> Option<SessionKey> {
        let key = key_of(cookie(headers)?);
        let map = self.lock();
        let s = map.get(&key)?;
        (s.expires > Instant::now()).then_some(SessionKey(key))
    }

    fn set_flash(&self, key: SessionKey, flash: Flash) {
        if let Some(s) = self.lock().get_mut(&key.0) {
            s.flash = Some(flash);
        }
    }
}

fn key_of(id: &str) -> [u8; 32] {
    *blake3::hash(id.as_bytes()).as_bytes()
}

/// The value of the `quill_session` cookie.
fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

#[derive(Clone)]
struct Web {
    admin: AdminState,
    sessions: Arc<Sessions>,
}

/// The web page's routes, with their own session (not the bearer token).
pub(super) fn router(admin: AdminState) -> Router {
    let web = Web {
        admin,
        sessions: Arc::new(Sessions::default()),
    };
    let forms = Router::new()
        .route("/logout", post(logout))
        .route("/domains", post(add_domain))
        .route("/domains/remove", post(remove_domain))
        .route("/users", post(add_user))
        .route("/users/remove", post(remove_user))
        .route("/users/password", post(set_password))
        .route("/users/quota", post(set_quota))
        .route("/queue", post(queue_action))
        .route("/settings", post(set_setting))
        .route("/settings/unset", post(unset_setting))
        .route_layer(axum::middleware::from_fn_with_state(web.clone(), require_session));
    Router::new()
        .route("/", get(index))
        .route("/login", post(login))
        .merge(forms)
        .layer(axum::middleware::map_response(secure_headers))
        .with_state(web)
}

/// No caching, no framing, no scripts, nothing fetched but inline style;
/// forms post only here.
async fn secure_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    r
}

/// A form posted without a live session is refused before its body is
/// read.
async fn require_session(
    State(w): State<Web>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match w.sessions.find(req.headers()) {
        Some(key) => {
            req.extensions_mut().insert(key);
            next.run(req).await
        }
        None => refused(
            StatusCode::FORBIDDEN,
            "no session, or it has ended: log in again (nothing was changed)",
        ),
    }
}

fn refused(code: StatusCode, why: &str) -> Response {
    (code, Html(pages::refused(code, why).into_string())).into_response()
}

/// A form refused: its status and why.
struct Refusal(StatusCode, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        refused(self.0, &self.1)
    }
}

/// Back to the page (303: the browser follows with a GET).
fn to_page() -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response()
}

impl Web {
    /// A form of the session `key`: refused (403) unless its `csrf` field
    /// is the session's; then decoded (400 if malformed).
    fn form<T: DeserializeOwned>(&self, key: SessionKey, body: &Bytes) -> Result<T, Refusal> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
            .map_err(|_| Refusal(StatusCode::BAD_REQUEST, "the form could not be read".into()))?;
        let given = pairs.iter().find(|(k, _)| k == "csrf").map(|(_, v)| v.as_str());
        let expected = self.sessions.lock().get(&key.0).map(|s| s.csrf.clone());
        let fine = match (given, expected) {
            // Hashes compared, so the time taken says nothing.
            (Some(g), Some(e)) => blake3::hash(g.as_bytes()) == blake3::hash(e.as_bytes()),
            _ => false,
        };
        if !fine {
            return Err(Refusal(
                StatusCode::FORBIDDEN,
                "the form's CSRF token is missing or wrong (nothing was changed): reload the page".into(),
            ));
        }
        serde_urlencoded::from_bytes(body).map_err(|e| Refusal(StatusCode::BAD_REQUEST, format!("bad form: {e}")))
    }

    /// The outcome of a form, shown once on the page it goes back to.
    fn done(&self, key: SessionKey, outcome: Result<String, Failure>) -> Response {
        let flash = match outcome {
            Ok(text) => Flash { ok: true, text },
            Err(Failure(_, why)) => Flash { ok: false, text: why },
        };
        self.sessions.set_flash(key, flash);
        to_page()
    }
}

async fn index(State(w): State<Web>, headers: HeaderMap) -> Response {
    let Some(key) = w.sessions.find(&headers) else {
        return Html(pages::login(None).into_string()).into_response();
    };
    let (csrf, flash) = {
        let mut map = w.sessions.lock();
        match map.get_mut(&key.0) {
            Some(s) => (s.csrf.clone(), s.flash.take()),
            None => return Html(pages::login(None).into_string()).into_response(),
        }
    };
    let s = &w.admin;
    let view = pages::View {
        node: s.name.clone(),
        csrf,
        flash,
        status: cluster::status_of(s).await,
        queue: queue::list_of(s).await,
        domains: s.services.directory.domains(),
        users: s.services.directory.users(),
        settings: settings::rows_of(s),
        sessions: activity::sessions_of(s).await.unwrap_or_default(),
        top_senders: activity::top_of(s, "senders", "1h").await.unwrap_or_default(),
        dkim: super::dkim::rows_of(s),
        blocklists: super::blocklist::lists_of(s),
        access: super::blocklist::access_of(s),
    };
    Html(pages::page(&view).into_string()).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn login(State(w): State<Web>, body: Bytes) -> Response {
    let token = serde_urlencoded::from_bytes::<LoginForm>(&body)
        .map(|f| f.token)
        .unwrap_or_default();
    if !token_matches(&w.admin, token.trim()) {
        tracing::warn!("web page: login with a wrong admin token");
        tokio::time::sleep(LOGIN_REFUSED_DELAY).await;
        return (
            StatusCode::UNAUTHORIZED,
            Html(pages::login(Some("wrong admin token")).into_string()),
        )
            .into_response();
    }
    let id = match w.sessions.open() {
        Ok(id) => id,
        Err(e) => return refused(StatusCode::INTERNAL_SERVER_ERROR, &format!("no session: {e}")),
    };
    tracing::info!("web page: operator logged in");
    let cookie = format!(
        "{COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
        SESSION_LIFETIME.as_secs()
    );
    (
        StatusCode::SEE_OTHER,
        [(header::SET_COOKIE, cookie), (header::LOCATION, "/".to_owned())],
    )
        .into_response()
}

#[derive(Deserialize)]
struct Empty {}

async fn logout(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    if let Err(r) = w.form::<Empty>(key, &body) {
        return r.into_response();
    }
    w.sessions.lock().remove(&key.0);
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    (
        StatusCode::SEE_OTHER,
        [(header::SET_COOKIE, cookie), (header::LOCATION, "/".to_owned())],
    )
        .into_response()
}

#[derive(Deserialize)]
struct DomainForm {
    domain: String,
}

async fn add_domain(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    let f: DomainForm = match w.form(key, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let domain = f.domain.trim().to_owned();
    let r = directory::command(&w.admin, DirectoryCommand::AddDomain { domain: domain.clone() }).await;
    w.done(key, r.map(|()| format!("domain {domain} added")))
}

async fn remove_domain(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    let f: DomainForm = match w.form(key, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let domain = f.domain;
    let r = directory::command(&w.admin, DirectoryCommand::RemoveDomain { domain: domain.clone() }).await;
    w.done(key, r.map(|()| format!("domain {domain} removed")))
}

#[derive(Deserialize)]
struct UserForm {
    address: String,
    password: String,
    #[serde(default)]
    quota: String,
}

/// A quota as typed: empty or `none`/`unlimited` for no quota, else bytes
/// or a size with a unit (`crate::units::parse_size`).
fn quota(typed: &str) -> Result<Option<u64>, Failure> {
    match typed.trim() {
        "" | "none" | "unlimited" => Ok(None),
        t => crate::units::parse_size(t)
            .map(Some)
            .map_err(|e| Failure(StatusCode::BAD_REQUEST, format!("quota: {e}"))),
    }
}

async fn add_user(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    let f: UserForm = match w.form(key, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let address = f.address.trim().to_owned();
    let r = async {
        let quota_bytes = quota(&f.quota)?;
        let body = UserBody {
            address: address.clone(),
            password: f.password,
            quota_bytes,
        };
        directory::create_user(&w.admin, body).await
    }
    .await;
    w.done(key, r.map(|()| format!("user {address} added")))
}

#[derive(Deserialize)]
struct RemoveUserForm {
    address: String,
    #[serde(default)]
    purge: Option<String>,
}

async fn remove_user(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    let f: RemoveUserForm = match w.form(key, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let address = f.address;
    let r = directory::delete_user(&w.admin, address.clone(), f.purge.is_some()).await;
    w.done(
        key,
        r.map(|purged| format!("user {address} removed ({purged} message(s) purged)")),
    )
}

#[derive(Deserialize)]
struct PasswordForm {
    address: String,
    password: String,
}

async fn set_password(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    let f: PasswordForm = match w.form(key, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let address = f.address;
    let r = directory::change_password(&w.admin, address.clone(), f.password).await;
    w.done(key, r.map(|()| format!("password of {address} changed")))
}

#[derive(Deserialize)]
struct QuotaForm {
    address: String,
    #[serde(default)]
    quota: String,
}

async fn set_quota(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    let f: QuotaForm = match w.form(key, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let address = f.address;
    let r = async {
        let quota_bytes = quota(&f.quota)?;
        let cmd = DirectoryCommand::SetQuota {
            address: address.clone(),
            quota_bytes,
        };
        directory::command(&w.admin, cmd).await?;
        Ok(quota_bytes)
    }
    .await;
    w.done(
        key,
        r.map(|q| match q {
            Some(q) => format!("quota of {address} set to {q} bytes"),
            None => format!("{address} has no quota"),
        }),
    )
}

#[derive(Deserialize)]
struct QueueForm {
    id: String,
    action: String,
}

async fn queue_action(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    let f: QueueForm = match w.form(key, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let r = match f.action.as_str() {
        "delete" => queue::remove_entry(&w.admin, &f.id).await,
        a => queue::act_on(&w.admin, &f.id, a).await,
    };
    w.done(key, r.map(|()| format!("queue entry {}: {}", f.id, f.action)))
}

#[derive(Deserialize)]
struct SettingForm {
    key: String,
    #[serde(default)]
    value: Option<String>,
}

async fn set_setting(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    let f: SettingForm = match w.form(key, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let value = f.value.unwrap_or_default();
    let r = settings::set_value(&w.admin, f.key.clone(), Some(&value)).await;
    w.done(
        key,
        r.map(|()| format!("{} set to {} for every node", f.key, value.trim())),
    )
}

async fn unset_setting(State(w): State<Web>, Extension(key): Extension<SessionKey>, body: Bytes) -> Response {
    let f: SettingForm = match w.form(key, &body) {
        Ok(f) => f,
        Err(r) => return r.into_response(),
    };
    let r = settings::set_value(&w.admin, f.key.clone(), None).await;
    w.done(key, r.map(|()| format!("{} unset: back to its default", f.key)))
}
