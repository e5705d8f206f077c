//! How `quill admin` shows answers to people (`--json` prints them as
//! they came).

use quill_proto::admin::{ClusterStatus, SessionList, TopList};

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
