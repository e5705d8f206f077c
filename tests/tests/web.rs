//! The operator's web page on the admin port (#31 item 4): the login, the
//! session cookie and the CSRF token, over plain HTTP (hostile forms
//! refused, nothing changed), and the page in headless Chromium through
//! selenium (tests/web/admin_page.py), which keeps a screenshot.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP reply, read whole.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on its own connection (no redirect followed, so that each
/// `Location` can be checked): `form` is posted url-encoded.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&[(&str, &str)]>,
) -> Reply {
    let body = form.map(encode).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: {c}\r\n"));
    }
    if form.is_some() {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connects");
    s.write_all(req.as_bytes()).await.expect("sends");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut raw))
        .await
        .expect("a reply in time")
        .expect("reads");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole reply");
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    Reply { status, headers, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

fn encode(pairs: &[(&str, &str)]) -> String {
    let esc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                b' ' => "+".to_owned(),
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", esc(k), esc(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Logs in: the `quill_session=...` pair to send back, and the reply.
async fn login(addr: SocketAddr, token: &str) -> (String, Reply) {
    let r = http(addr, "POST", "/login", None, Some(&[("token", token)])).await;
    assert_eq!(r.status, 303, "login: {}", r.body);
    let set = r.header("set-cookie").expect("a session cookie").to_owned();
    let pair = set.split(';').next().unwrap().trim().to_owned();
    assert!(pair.starts_with("quill_session="), "{set}");
    (pair, r)
}

/// The add-user form's fields (the CSRF token first).
fn add_user_form<'a>(csrf: &'a str, address: &'a str) -> [(&'a str, &'a str); 3] {
    [("csrf", csrf), ("address", address), ("password", common::PASSWORD)]
}

/// The CSRF token of the page's forms.
fn csrf_of(page: &str) -> String {
    let at = page.find(r#"name="csrf" value=""#).expect("a csrf field") + r#"name="csrf" value=""#.len();
    page[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn web_login_session_and_csrf() {
    let (dir, node) = common::node("web-csrf", &[]).await;
    let addr = node.admin_addr();
    let token = node.opts.admin_token.clone();
    // A DKIM key and a blocklist, for the page's mail authentication part.
    let (ok, said) = common::quill_admin(&node, &["dkim", "create", "example.org", "--algorithm", "ed25519"]);
    assert!(ok, "{said}");
    let list = dir.path().join("list.txt");
    std::fs::write(&list, "203.0.113.0/24\n").unwrap();
    let (ok, said) = common::quill_admin(&node, &["blocklist", "load", "drop", list.to_str().unwrap()]);
    assert!(ok, "{said}");

    // Not logged in: the login form, with the headers every reply has.
    let r = http(addr, "GET", "/", None, None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.body.contains(r#"name="token""#) && r.body.contains(r#"action="/login""#),
        "{}",
        r.body
    );
    assert!(!r.body.contains("<script"), "no script on the page");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("x-frame-options"), Some("DENY"));
    let csp = r.header("content-security-policy").expect("a CSP");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );

    // A wrong token: 401 and no session.
    let r = http(addr, "POST", "/login", None, Some(&[("token", "not-the-token")])).await;
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_none());
    let r = http(addr, "POST", "/login", None, Some(&[])).await;
    assert_eq!(r.status, 401);

    // The right one: a cookie only the server reads, sent to this site
    // alone; the token is in no URL.
    let (cookie, r) = login(addr, &token).await;
    let set = r.header("set-cookie").unwrap();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict") && set.contains("Path=/"),
        "{set}"
    );
    let location = r.header("location").expect("a redirect");
    assert_eq!(location, "/");
    assert!(!location.contains(&token));

    let page = http(addr, "GET", "/", Some(&cookie), None).await;
    assert_eq!(page.status, 200);
    for section in ["cluster", "queue", "activity", "domains", "users", "settings", "edge"] {
        assert!(
            page.body.contains(&format!(r#"id="{section}""#)),
            "no section {section}"
        );
    }
    assert!(page.body.contains("alice@example.org") && page.body.contains("example.org"));
    assert!(
        page.body.contains("._domainkey.example.org. IN TXT") && page.body.contains("k=ed25519"),
        "the DKIM record to publish"
    );
    assert!(page.body.contains("<td>drop</td>"), "the blocklist");
    assert!(!page.body.contains(&token), "the token is not on the page");
    let csrf = csrf_of(&page.body);
    assert_eq!(csrf.len(), 64);

    let dave = "dave@example.org";
    let c = csrf.as_str();

    // Refused, and nothing changed: no CSRF field, a wrong one, no cookie,
    // a forged cookie, another session's CSRF token.
    let r = http(
        addr,
        "POST",
        "/users",
        Some(&cookie),
        Some(&add_user_form("", dave)[1..]),
    )
    .await;
    assert_eq!(r.status, 403, "without csrf: {}", r.body);
    let r = http(
        addr,
        "POST",
        "/users",
        Some(&cookie),
        Some(&add_user_form("0000", dave)),
    )
    .await;
    assert_eq!(r.status, 403, "wrong csrf");
    let r = http(addr, "POST", "/users", None, Some(&add_user_form(c, dave))).await;
    assert_eq!(r.status, 403, "no cookie");
    let forged = format!("quill_session={}", "ab".repeat(32));
    let r = http(addr, "POST", "/users", Some(&forged), Some(&add_user_form(c, dave))).await;
    assert_eq!(r.status, 403, "forged cookie");
    let (other, _) = login(addr, &token).await;
    assert_ne!(other, cookie);
    let other_page = http(addr, "GET", "/", Some(&other), None).await;
    let other_csrf = csrf_of(&other_page.body);
    assert_ne!(other_csrf, csrf, "a CSRF token per session");
    let r = http(addr, "POST", "/users", Some(&other), Some(&add_user_form(c, dave))).await;
    assert_eq!(r.status, 403, "another session's csrf");
    // A forged cookie on GET is the login form again.
    let r = http(addr, "GET", "/", Some(&forged), None).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains(r#"name="token""#));
    let users = node.user_list().await.expect("users");
    assert!(
        !users.iter().any(|u| u == dave),
        "a refused form changed nothing: {users:?}"
    );

    // With the session's cookie and CSRF token: added, and the page says so.
    let r = http(addr, "POST", "/users", Some(&cookie), Some(&add_user_form(c, dave))).await;
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/"));
    let users = node.user_list().await.expect("users");
    assert!(users.iter().any(|u| u == dave), "{users:?}");
    // The password was hashed as the JSON API does it: dave can log in.
    common::read_all(&node, dave).await;
    let page = http(addr, "GET", "/", Some(&cookie), None).await;
    assert!(
        page.body.contains(&format!("user {dave} added")),
        "the outcome is shown"
    );
    assert!(page.body.contains(&format!(">{dave}<")), "dave is listed");

    // Hostile input is shown escaped: a refused address with markup.
    let evil = "<script>alert(1)</script>@example.org";
    let form = [("csrf", c), ("address", evil), ("password", "x")];
    let r = http(addr, "POST", "/users", Some(&cookie), Some(&form)).await;
    assert_eq!(r.status, 303);
    let page = http(addr, "GET", "/", Some(&cookie), None).await;
    assert!(!page.body.contains("<script"), "markup escaped: {}", page.body);
    assert!(page.body.contains("&lt;script&gt;"), "the refusal is shown");

    // A quota and a domain through the forms.
    let form = [("csrf", c), ("address", dave), ("quota", "10MB")];
    assert_eq!(
        http(addr, "POST", "/users/quota", Some(&cookie), Some(&form))
            .await
            .status,
        303
    );
    let listed = node.admin(hyper::Method::GET, "/v1/users", None).await.expect("users");
    let quota = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["address"] == dave)
        .map(|u| u["quota_bytes"].clone());
    assert_eq!(quota, Some(serde_json::json!(10_000_000)));
    let form = [("csrf", c), ("domain", "example.net")];
    assert_eq!(
        http(addr, "POST", "/domains", Some(&cookie), Some(&form)).await.status,
        303
    );
    let domains = node
        .admin(hyper::Method::GET, "/v1/domains", None)
        .await
        .expect("domains");
    assert!(
        domains.as_array().unwrap().iter().any(|d| d == "example.net"),
        "{domains}"
    );

    // Logged out: the cookie is dropped and the session ends.
    let form = [("csrf", c)];
    let r = http(addr, "POST", "/logout", Some(&cookie), Some(&form)).await;
    assert_eq!(r.status, 303);
    assert!(r.header("set-cookie").unwrap().contains("Max-Age=0"));
    let form = [("csrf", c), ("address", "erin@example.org"), ("password", "x")];
    let r = http(addr, "POST", "/users", Some(&cookie), Some(&form)).await;
    assert_eq!(r.status, 403, "an ended session");
    let users = node.user_list().await.expect("users");
    assert!(!users.iter().any(|u| u == "erin@example.org"));
}

/// The path of the first of `names` on `PATH`, as [`testkit::available`]
/// says it.
fn program_of(names: &[&str], what: &str) -> Option<String> {
    let found = names.iter().find_map(|n| {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {n}"))
            .output()
            .ok()?;
        let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (out.status.success() && !path.is_empty()).then_some(path)
    });
    if testkit::available(found.is_some(), &format!("{what} is not installed")) {
        found
    } else {
        None
    }
}

/// The page in headless Chromium: logged in, its sections there, a user
/// added through the form and listed, a screenshot kept (and copied to
/// `QUILL_SCREENSHOT`, e.g. `docs/admin.png`, relative to the repository).
#[tokio::test]
async fn web_page_in_headless_chromium() {
    let Some(chromium) = program_of(&["chromium", "chromium-browser"], "chromium") else {
        return;
    };
    let Some(driver) = program_of(&["chromedriver"], "chromedriver (chromium-driver)") else {
        return;
    };
    let Some(python) = testkit::python_with("selenium") else {
        return;
    };

    let (dir, node) = common::node("web-browser", &[]).await;
    let shot = dir.path().join("admin.png");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/web/admin_page.py");
    let added = "erin@example.org";
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg(script)
        .args(["--url", &format!("http://{}", node.admin_addr())])
        .args(["--token", &node.opts.admin_token])
        .args(["--add", added])
        .arg("--screenshot")
        .arg(&shot)
        .args(["--chromium", &chromium, "--chromedriver", &driver])
        .arg("--profile")
        .arg(dir.path().join("chromium-profile"))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(180), cmd.output())
        .await
        .expect("the browser run ends in time")
        .expect("python runs");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "admin_page.py failed:\n{said}");
    eprintln!("{said}");

    let users = node.user_list().await.expect("users");
    assert!(users.iter().any(|u| u == added), "{users:?}");
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "a PNG of the page"
    );
    if let Ok(to) = std::env::var("QUILL_SCREENSHOT") {
        let to = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(to);
        std::fs::copy(&shot, &to).expect("screenshot copied");
        eprintln!("screenshot kept as {}", to.display());
    }
}
