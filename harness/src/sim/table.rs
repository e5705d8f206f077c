//! The simulation's table and its picture.

use std::path::Path;

use crate::chart::{Chart, PALETTE, Series};

use super::{EventRow, SimReport};

fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e12 {
        format!("{:.2} TB", b / 1e12)
    } else if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{b:.0} B")
    }
}

fn count(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} G", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} M", n / 1e6)
    } else if n >= 1e4 {
        format!("{:.1} k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// Prints the table: per-node memory, the cost at rest, then one block
/// per event, each row saying what it measures.
pub fn print_table(r: &SimReport) {
    let c = &r.config;
    let m = &r.memory;
    let a = &r.at_rest;
    println!(
        "simulation: {} nodes, {} users, {} sampled users x {} messages of {} (scale x{:.0}), R={}, spread {}, \
         {} watchers, seed {}",
        c.nodes,
        c.users,
        c.sample_users,
        c.messages_per_user,
        bytes(c.message_bytes),
        c.users as f64 / c.sample_users.max(1) as f64,
        c.replicas,
        c.spread,
        c.watchers,
        c.seed
    );
    println!();
    println!("memory per node");
    println!(
        "  placement view (slot table, measured)          {}",
        bytes(m.placement_view_bytes)
    );
    println!(
        "  membership view, encoded (measured)            {}",
        bytes(m.membership_view_bytes)
    );
    println!(
        "  directory, encoded (measured per user)         {}",
        bytes(m.directory_bytes)
    );
    println!(
        "  users managed, busiest node / mean             {} / {:.0}",
        count(m.managed_max),
        m.managed_mean
    );
    println!(
        "  manager soft state, busiest node (modelled)    {}",
        bytes(m.manager_bytes_max)
    );
    println!(
        "  nodes one node pings: ring+voters / all        {} / {}",
        m.pinged_max, m.pinged_all
    );
    println!(
        "  snapshot to a joining node (view + directory)  {}",
        bytes(m.snapshot_bytes)
    );
    let fits = |limit: u64| if m.snapshot_bytes <= limit { "yes" } else { "no" };
    println!(
        "  fits a snapshot: one buffer (to 0.2.0, {}) / a file (now, {})  {} / {}",
        bytes(membership::codec::DISK_BYTES_MAX as u64),
        bytes(membership::store::SNAPSHOT_BYTES_MAX),
        fits(membership::codec::DISK_BYTES_MAX as u64),
        fits(membership::store::SNAPSHOT_BYTES_MAX),
    );
    println!();
    println!("at rest, per minute");
    println!(
        "  failure detector pings, cluster: ring / all    {} / {}",
        count(a.pings_ring),
        count(a.pings_all)
    );
    println!(
        "  pings one node sends / a voter receives (max)  {} / {}",
        count(a.pings_out_max),
        count(a.pings_in_max)
    );
    println!(
        "  raft heartbeats from the leader                {}",
        count(a.heartbeats)
    );
    println!("  bytes of pings and heartbeats (modelled frames) {}", bytes(a.bytes));
    println!(
        "  manager report round: messages / bytes         {} / {} (one node sends at most {})",
        count(a.report_messages),
        bytes(a.report_bytes),
        bytes(a.report_bytes_node_max)
    );
    for row in &r.rows {
        print_event(row);
    }
    println!();
    println!(
        "invariants held: {} user-manager checks (one up manager per user per view), {} messages with R copies on up \
         nodes after healing; {:.1} s",
        r.manager_checks, r.messages_checked, r.wall_s
    );
}

fn print_event(e: &EventRow) {
    println!();
    println!("event: {}", e.event);
    if e.views == 0 {
        println!(
            "  snapshot transfer                              {}",
            bytes(e.snapshot_bytes)
        );
        println!("  nodes holding a user's mail, mean              {:.2}", e.holders_mean);
        return;
    }
    println!(
        "  views committed / slot table build (max, here) {} / {:.0} ms",
        e.views, e.build_ms
    );
    println!(
        "  time to converge (virtual: detect+commit+build) {:.1} s",
        e.converge_ms as f64 / 1e3
    );
    println!(
        "  view change traffic, raft: messages / bytes    {} / {}",
        count(e.raft_messages),
        bytes(e.raft_bytes)
    );
    println!(
        "  managers moved / least possible                {} / {}",
        count(e.managers_moved),
        count(e.managers_min)
    );
    println!(
        "  soft state rebuilt, reports: messages / bytes  {} / {} (moved users only: {})",
        count(e.report_messages),
        bytes(e.report_bytes),
        bytes(e.report_bytes_min)
    );
    println!(
        "  failure reports to the leader                  {}",
        e.detector_reports
    );
    println!(
        "  data moved / least possible                    {} / {}",
        bytes(e.bytes_moved),
        bytes(e.bytes_min)
    );
    if e.snapshot_bytes > 0 {
        println!(
            "  snapshot transfer                              {}",
            bytes(e.snapshot_bytes)
        );
    }
    println!("  nodes holding a user's mail, mean, after       {:.2}", e.holders_mean);
}

/// Two pictures beside `base`: time to converge per event
/// (`base`-converge.png) and bytes moved per event (`base`-moved.png).
pub fn write_chart(r: &SimReport, base: &Path) -> anyhow::Result<()> {
    let events: Vec<&EventRow> = r.rows.iter().filter(|e| e.views > 0).collect();
    let note = Some(format!(
        "{} nodes, {} users, seed {}; events in order: {}",
        r.config.nodes,
        r.config.users,
        r.config.seed,
        events
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{}={}", i + 1, e.event.split([',', ';']).next().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let series = |name: &str, k: usize, f: &dyn Fn(&EventRow) -> f64| Series {
        name: name.into(),
        points: events.iter().enumerate().map(|(i, e)| ((i + 1) as f64, f(e))).collect(),
        color: PALETTE[k],
    };
    let converge = Chart {
        title: "Quill simulation: time until every node has the new view".into(),
        x_label: "event".into(),
        y_label: "seconds (virtual)".into(),
        series: vec![series("time to converge", 0, &|e| e.converge_ms as f64 / 1e3)],
        markers: Vec::new(),
        note: note.clone(),
        x_integer: true,
    };
    let moved = Chart {
        title: "Quill simulation: bytes moved per event".into(),
        x_label: "event".into(),
        y_label: "GB".into(),
        series: vec![
            series("mail copied", 0, &|e| e.bytes_moved as f64 / 1e9),
            series("least possible", 1, &|e| e.bytes_min as f64 / 1e9),
            series("reports (soft state)", 2, &|e| e.report_bytes as f64 / 1e9),
        ],
        markers: Vec::new(),
        note,
        x_integer: true,
    };
    let name = |suffix: &str| {
        let mut s = base.as_os_str().to_owned();
        s.push(suffix);
        std::path::PathBuf::from(s)
    };
    std::fs::write(name("-converge.png"), converge.png()?)?;
    std::fs::write(name("-moved.png"), moved.png()?)?;
    Ok(())
}
