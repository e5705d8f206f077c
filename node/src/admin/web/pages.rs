//! The web page's markup (maud: every value is escaped as it is written).
//! No script anywhere: the Content-Security-Policy forbids it.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use maud::{DOCTYPE, Markup, html};
use membership::UserSummary;
use quill_proto::admin::{ClusterStatus, QueueList, SessionList, SettingRow, TopList};

/// Users and queue entries shown at most (the JSON API lists them all).
const ROWS_MAX: usize = 500;

/// What the page shows after a form: what was done, or why not.
#[derive(Clone)]
pub(in crate::admin) struct Flash {
    pub ok: bool,
    pub text: String,
}

/// What the page shows.
pub(in crate::admin) struct View {
    pub node: String,
    pub csrf: String,
    pub flash: Option<Flash>,
    pub status: ClusterStatus,
    pub queue: QueueList,
    pub domains: Vec<String>,
    pub users: Vec<UserSummary>,
    pub settings: Vec<SettingRow>,
    pub sessions: SessionList,
    pub top_senders: TopList,
    pub dkim: Vec<crate::admin::dkim::KeyRow>,
    pub blocklists: Vec<crate::admin::blocklist::ListRow>,
    pub access: Vec<crate::admin::blocklist::AccessRow>,
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f5f6f8;color:#1d2330}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;align-items:center;gap:1em}
header h1{font-size:1.2em;margin:0;flex:1}
main{padding:1em 1.2em;display:grid;gap:1em}
section{background:#fff;border:1px solid #dde;border-radius:6px;padding:.4em 1em 1em}
h2{font-size:1.05em;margin:.6em 0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.25em .5em;border-bottom:1px solid #eef;vertical-align:top}
th{font-weight:600;color:#556}
td.n{text-align:right;font-variant-numeric:tabular-nums}
form{display:inline-flex;gap:.3em;margin:0;align-items:center}
input{font:inherit;padding:.15em .3em}
input[type=text],input[type=password]{width:11em}
button{font:inherit;padding:.1em .6em;cursor:pointer}
.flash{padding:.5em 1em;border-radius:6px}
.ok{background:#e3f6e8;border:1px solid #9c9}
.err{background:#fbe5e5;border:1px solid #d99}
.muted{color:#778}
.up{color:#170}.down{color:#b00}.draining{color:#a60}
.login{max-width:24em;margin:5em auto}
";

fn frame(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) }
                style { (maud::PreEscaped(STYLE)) }
            }
            body { (body) }
        }
    }
}

/// The login form: the admin token, posted (never in a URL).
pub(in crate::admin) fn login(error: Option<&str>) -> Markup {
    frame(
        "Quill: log in",
        html! {
            main {
                section.login {
                    h2 { "Quill admin: log in" }
                    @if let Some(e) = error {
                        p.flash.err { (e) }
                    }
                    form method="post" action="/login" {
                        label for="token" { "Admin token " }
                        input #token type="password" name="token" autocomplete="current-password" required autofocus;
                        button type="submit" { "Log in" }
                    }
                    p.muted { "The token is in the node's data directory (admin-token)." }
                }
            }
        },
    )
}

pub(in crate::admin) fn refused(code: StatusCode, why: &str) -> Markup {
    frame(
        "Quill: refused",
        html! {
            main {
                section {
                    h2 { (code.as_u16()) " " (code.canonical_reason().unwrap_or("")) }
                    p { (why) }
                    p { a href="/" { "Back to the page" } }
                }
            }
        },
    )
}

/// The CSRF field every form but the login form carries.
fn csrf(token: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(token); }
}

fn opt(n: Option<u64>) -> String {
    n.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
}

/// Bytes in a short form (KiB, MiB, ...).
fn size(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn age(s: u64) -> String {
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

/// The page of a logged-in operator.
pub(in crate::admin) fn page(v: &View) -> Markup {
    frame(
        &format!("Quill: {}", v.node),
        html! {
            header {
                h1 { "Quill — node " (v.node) }
                form method="post" action="/logout" {
                    (csrf(&v.csrf))
                    button type="submit" { "Log out" }
                }
            }
            main {
                @if let Some(f) = &v.flash {
                    p.flash.ok[f.ok].err[!f.ok] #flash { (f.text) }
                }
                (cluster(&v.status))
                (queue(v))
                (activity(v))
                (domains(v))
                (users(v))
                (settings(v))
                (edge(v))
            }
        },
    )
}

fn cluster(s: &ClusterStatus) -> Markup {
    let stored: u64 = s.nodes.iter().filter_map(|n| n.bytes).sum();
    let to_repair: u64 = s.nodes.iter().filter_map(|n| n.repair_pending).sum();
    html! {
        section #cluster {
            h2 { "Cluster" }
            p {
                "epoch " (s.epoch)
                " · leader " (s.leader.map(|l| l.to_string()).unwrap_or_else(|| "none".into()))
                " · feature level " (s.feature_level)
                " · stored " (size(stored))
                " · under-replicated " (s.under_replicated)
                " · copies to repair " (to_repair)
                " · Raft state " (size(s.raft_state_bytes))
            }
            table {
                thead { tr {
                    th { "id" } th { "name" } th { "state" } th { "activity" } th { "voter" }
                    th { "messages" } th { "stored" } th { "to repair" } th { "queued" } th { "release" }
                } }
                tbody {
                    @for n in &s.nodes {
                        tr {
                            td { (n.id) @if n.id == s.me { " (this)" } }
                            td { (n.name) }
                            td class=(n.state) { (n.state) }
                            td { (n.activity) }
                            td { @if n.voter { "yes" } @else { "no" } }
                            td.n { (opt(n.messages)) }
                            td.n { (n.bytes.map(size).unwrap_or_else(|| "?".into())) }
                            td.n { (opt(n.repair_pending)) }
                            td.n { (opt(n.queued)) }
                            td { (n.version.as_deref().unwrap_or("?")) }
                        }
                    }
                }
            }
        }
    }
}

/// The domain of each recipient still to be delivered to.
fn destinations(q: &QueueList) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for e in &q.entries {
        for r in e.rcpts.iter().filter(|r| r.state == "pending") {
            let domain = r.address.rsplit_once('@').map(|(_, d)| d).unwrap_or(&r.address);
            *by.entry(domain.to_ascii_lowercase()).or_insert(0) += 1;
        }
    }
    by
}

fn queue(v: &View) -> Markup {
    let q = &v.queue;
    let held = q.entries.iter().filter(|e| e.held).count();
    let deferred = q.entries.len() - held;
    let by = destinations(q);
    html! {
        section #queue {
            h2 { "Outbound queue" }
            p {
                (q.total) " entries · " (held) " held · " (deferred) " waiting (deferred)"
                @if q.total > q.entries.len() { " (the first " (q.entries.len()) " counted)" }
            }
            @if !by.is_empty() {
                p { "By destination: "
                    @for (i, (d, n)) in by.iter().enumerate() {
                        @if i > 0 { ", " }
                        (d) " (" (n) ")"
                    }
                }
            }
            @if !q.entries.is_empty() {
                table {
                    thead { tr {
                        th { "id" } th { "from" } th { "to" } th { "age" } th { "size" } th { "state" } th { "" }
                    } }
                    tbody {
                        @for e in q.entries.iter().take(ROWS_MAX) {
                            tr {
                                td { code { (e.id.get(..12).unwrap_or(&e.id)) } }
                                td { "<" (e.from) ">" }
                                td {
                                    @for r in &e.rcpts { (r.address) " (" (r.state) ") " }
                                }
                                td.n { (age(e.age_s)) }
                                td.n { (size(e.size)) }
                                td { @if e.held { "held" } @else { "deferred" } }
                                td {
                                    @for action in ["retry", "hold", "release", "delete"] {
                                        form method="post" action="/queue" {
                                            (csrf(&v.csrf))
                                            input type="hidden" name="id" value=(e.id);
                                            input type="hidden" name="action" value=(action);
                                            button type="submit" { (action) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Top senders and live sessions: their place on the page.
/// The cluster's top senders of the last hour and every node's live
/// sessions (the same as `quill admin top senders` and `sessions`).
fn activity(v: &View) -> Markup {
    let now = crate::time::now_ms();
    html! {
        section #activity {
            h2 { "Top senders and sessions" }
            p.muted { "Top senders, last hour (" (v.top_senders.total) " messages counted)" }
            table {
                thead { tr { th { "sender" } th { "messages" } } }
                tbody {
                    @for t in &v.top_senders.top {
                        tr { td { (t.key) } td { (t.count) } }
                    }
                }
            }
            p.muted { (v.sessions.sessions.len()) " live sessions" }
            table {
                thead { tr { th { "node" } th { "protocol" } th { "peer" } th { "user" } th { "for" } th { "TLS" } } }
                tbody {
                    @for x in v.sessions.sessions.iter().take(200) {
                        tr {
                            td { (x.node) }
                            td { (x.protocol) }
                            td { (x.peer) }
                            td { (x.user.as_deref().unwrap_or("-")) }
                            td { (now.saturating_sub(x.since_ms) / 1000) "s" }
                            td { (if x.tls { "yes" } else { "no" }) }
                        }
                    }
                }
            }
            @for m in v.sessions.missing.iter().chain(&v.top_senders.missing) {
                p.muted { "not answering: " (m) }
            }
        }
    }
}

fn domains(v: &View) -> Markup {
    html! {
        section #domains {
            h2 { "Domains" }
            table {
                tbody {
                    @for d in &v.domains {
                        tr {
                            td { (d) }
                            td {
                                form method="post" action="/domains/remove" {
                                    (csrf(&v.csrf))
                                    input type="hidden" name="domain" value=(d);
                                    button type="submit" { "remove" }
                                }
                            }
                        }
                    }
                }
            }
            p {
                form method="post" action="/domains" {
                    (csrf(&v.csrf))
                    input type="text" name="domain" placeholder="example.org" required;
                    button type="submit" { "Add domain" }
                }
            }
        }
    }
}

fn users(v: &View) -> Markup {
    html! {
        section #users {
            h2 { "Users" }
            p {
                form #add-user method="post" action="/users" {
                    (csrf(&v.csrf))
                    input type="text" name="address" placeholder="user@example.org" required;
                    input type="password" name="password" placeholder="password" autocomplete="new-password" required;
                    input type="text" name="quota" placeholder="quota (e.g. 2GiB)";
                    button type="submit" { "Add user" }
                }
            }
            @if v.users.len() > ROWS_MAX {
                p.muted { "The first " (ROWS_MAX) " of " (v.users.len()) " users." }
            }
            table {
                thead { tr { th { "address" } th { "quota" } th { "password" } th { "quota" } th { "" } } }
                tbody {
                    @for u in v.users.iter().take(ROWS_MAX) {
                        tr.user {
                            td { (u.address) }
                            td { (u.quota_bytes.map(size).unwrap_or_else(|| "none".into())) }
                            td {
                                form method="post" action="/users/password" {
                                    (csrf(&v.csrf))
                                    input type="hidden" name="address" value=(u.address);
                                    input type="password" name="password" placeholder="new password" autocomplete="new-password" required;
                                    button type="submit" { "set" }
                                }
                            }
                            td {
                                form method="post" action="/users/quota" {
                                    (csrf(&v.csrf))
                                    input type="hidden" name="address" value=(u.address);
                                    input type="text" name="quota" placeholder="none";
                                    button type="submit" { "set" }
                                }
                            }
                            td {
                                form method="post" action="/users/remove" {
                                    (csrf(&v.csrf))
                                    input type="hidden" name="address" value=(u.address);
                                    label { input type="checkbox" name="purge" value="1"; " with its mail" }
                                    button type="submit" { "remove" }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn settings(v: &View) -> Markup {
    html! {
        section #settings {
            h2 { "Settings" }
            p.muted { "As this node applies them; a change is for every node (a node's own flag still wins on it)." }
            table {
                thead { tr { th { "key" } th { "value" } th { "default" } th { "source" } th { "" } } }
                tbody {
                    @for r in &v.settings {
                        tr {
                            td { code { (r.key) } br; span.muted { (r.help) " (from " (r.applies) ")" } }
                            td { (r.value) }
                            td { (r.default) }
                            td { (r.source) }
                            td {
                                form method="post" action="/settings" {
                                    (csrf(&v.csrf))
                                    input type="hidden" name="key" value=(r.key);
                                    input type="text" name="value" value=(r.value) required;
                                    button type="submit" { "set" }
                                }
                                @if r.source == "cluster" {
                                    form method="post" action="/settings/unset" {
                                        (csrf(&v.csrf))
                                        input type="hidden" name="key" value=(r.key);
                                        button type="submit" { "unset" }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// DKIM keys (the records to publish), blocklists and access rules: read
/// only (`quill admin dkim`, `blocklist`, `access` change them).
fn edge(v: &View) -> Markup {
    html! {
        section #edge {
            h2 { "Mail authentication" }
            p.muted { "DKIM keys sign outgoing mail (the newest of a domain); publish each record in DNS." }
            table {
                thead { tr { th { "domain" } th { "selector" } th { "algorithm" } th { "signs" } th { "DNS record" } } }
                tbody {
                    @for k in &v.dkim {
                        tr {
                            td { (k.domain) } td { (k.selector) } td { (k.algorithm) }
                            td { @if k.signing { "yes" } @else { "no" } }
                            td { code { (k.zone_line) } }
                        }
                    }
                }
            }
            p.muted { "Blocklists and access rules: clients of --smtp refused at RCPT (allow wins over every list)." }
            table {
                thead { tr { th { "list" } th { "ranges" } th { "size" } th { "loaded" } } }
                tbody {
                    @for l in &v.blocklists {
                        tr { td { (l.name) } td { (l.ranges) } td { (size(l.bytes)) } td { (age(crate::time::now_ms().saturating_sub(l.loaded_at_ms) / 1000)) " ago" } }
                    }
                    @for a in &v.access {
                        tr { td { (a.action) " " code { (a.cidr) } } td { "" } td { "" } td { "" } }
                    }
                }
            }
        }
    }
}
