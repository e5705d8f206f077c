//! How `quill admin` shows answers to people (`--json` prints them as
//! they came).

use quill_proto::admin::{CertList, ClusterStatus, QueueList, RoutesList, SessionList, TopList};

/// `alias list`: aliases, domain aliases, catch-alls and taps.
pub(super) fn routes(r: &RoutesList) {
    for a in &r.aliases {
        println!("{} -> {}", a.address, a.targets.join(", "));
    }
    for d in &r.domain_aliases {
        println!("*@{} -> *@{} (domain alias)", d.alias, d.target);
    }
    for (domain, address) in &r.catch_all {
        println!("*@{domain} -> {address} (catch-all)");
    }
    for (target, archive) in &r.taps {
        println!("{target} => {archive} (tap)");
    }
}

/// `queue list`: one line an entry.
pub(super) fn queue(list: &QueueList) {
    for e in &list.entries {
        let rcpts: Vec<String> = e.rcpts.iter().map(|r| format!("{}={}", r.address, r.state)).collect();
        println!(
            "{} age={}s size={} from=<{}> {}{}",
            e.id,
            e.age_s,
            e.size,
            e.from,
            rcpts.join(" "),
            if e.held { " HELD" } else { "" }
        );
    }
    println!("{} queued", list.entries.len());
}

/// `tls list`: the cluster's certificates, then this node's files.
pub(super) fn certs(list: &CertList) -> serde_json::Result<()> {
    for (source, certs) in [("cluster", &list.cluster), ("local", &list.local)] {
        for c in certs {
            println!(
                "{source} {} names={} not_after={} fingerprint={}",
                c.name.as_deref().unwrap_or("-"),
                serde_json::to_string(&c.names)?,
                c.not_after,
                c.fingerprint
            );
        }
    }
    Ok(())
}

/// `sessions`: one line a session, then the nodes that did not answer.
pub(super) fn sessions(r: &SessionList) {
    println!(
        "{:<20} {:<12} {:<22} {:<30} {:>8} TLS",
        "NODE", "PROTOCOL", "PEER", "USER", "SECONDS"
    );
    let now = crate::time::now_ms();
    for x in &r.sessions {
        println!(
            "{:<20} {:<12} {:<22} {:<30} {:>8} {}",
            x.node,
            x.protocol,
            x.peer,
            x.user.as_deref().unwrap_or("-"),
            now.saturating_sub(x.since_ms) / 1000,
            if x.tls { "yes" } else { "no" }
        );
    }
    for m in &r.missing {
        eprintln!("not answering: {m}");
    }
}

/// `top`: rank, count (and its possible overcount), key.
pub(super) fn top(r: &TopList) {
    println!("top {} of the last {} ({} counted)", r.kind, r.window, r.total);
    for (i, t) in r.top.iter().enumerate() {
        let within = if t.error > 0 {
            format!(" (at most {} over)", t.error)
        } else {
            String::new()
        };
        println!("{:>3}. {:>8}  {}{within}", i + 1, t.count, t.key);
    }
    for m in &r.missing {
        eprintln!("not answering: {m}");
    }
}

/// `cluster status` for people.
pub(super) fn status(s: &ClusterStatus) {
    let or_null = |v: Option<u64>| v.map_or("null".to_owned(), |v| v.to_string());
    println!(
        "epoch {}  leader {}  self {}  under-replicated {}  feature level {}  raft state {} bytes",
        s.epoch,
        or_null(s.leader),
        s.me,
        s.under_replicated,
        s.feature_level,
        s.raft_state_bytes
    );
    for n in &s.nodes {
        let activity = match n.activity.as_str() {
            "repairing" => format!("repairing({} left)", or_null(n.repair_pending)),
            other => other.to_owned(),
        };
        println!(
            "  node {} {:<16} {:<9} release={} voter={} messages={} bytes={} {activity} smtp={} pop3={} admin={}",
            n.id,
            n.name,
            n.state,
            n.version.as_deref().unwrap_or("?"),
            n.voter,
            or_null(n.messages),
            or_null(n.bytes),
            n.addrs.smtp.as_deref().unwrap_or("-"),
            n.addrs.pop3.as_deref().unwrap_or("-"),
            n.addrs.admin.as_deref().unwrap_or("-"),
        );
    }
}
