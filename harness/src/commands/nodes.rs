//! `add`, `kill`, `restart`, `drain`, `status`, `down`: one node or all of
//! a harness cluster, found through `DIR/harness.json`.

use std::path::PathBuf;

use anyhow::Context;

use crate::cluster::{ClusterState, NodeEntry, parse_node};

pub async fn add(dir: PathBuf, binary: Option<PathBuf>) -> anyhow::Result<()> {
    let mut state = ClusterState::load(&dir)?;
    let k = state.nodes.iter().map(|n| n.k).max().unwrap_or(0) + 1;
    let binary = match binary {
        Some(b) => Some(
            b.canonicalize()
                .with_context(|| format!("no quill binary at {}", b.display()))?,
        ),
        None => None,
    };
    state.nodes.push(NodeEntry {
        binary,
        ..NodeEntry::new(k)
    });
    let r = state.start_node(&dir, k).await;
    if r.is_err() {
        state.nodes.retain(|n| n.k != k);
    }
    state.save(&dir)?;
    r?;
    println!("n{k} joined on {}", state.ip(k));
    Ok(())
}

pub async fn kill(dir: PathBuf, node: String) -> anyhow::Result<()> {
    let mut state = ClusterState::load(&dir)?;
    let k = parse_node(&node)?;
    state.kill_node(k)?;
    state.save(&dir)?;
    println!("n{k} killed (SIGKILL)");
    Ok(())
}

pub async fn restart(dir: PathBuf, node: String) -> anyhow::Result<()> {
    let mut state = ClusterState::load(&dir)?;
    let k = parse_node(&node)?;
    state.stop_node(k)?;
    let r = state.start_node(&dir, k).await;
    state.save(&dir)?;
    r?;
    println!("n{k} running again");
    Ok(())
}

pub async fn drain(dir: PathBuf, node: String) -> anyhow::Result<()> {
    let state = ClusterState::load(&dir)?;
    let k = parse_node(&node)?;
    state.drain(&dir, k).await?;
    println!("n{k} is draining: it takes no new mail");
    Ok(())
}

pub async fn status(dir: PathBuf, json: bool) -> anyhow::Result<()> {
    let state = ClusterState::load(&dir)?;
    let s = state.any_status(&dir).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "epoch {}  leader {}  under_replicated {}  outbound queue {} copies  feature level {}",
        s["epoch"], s["leader"], s["under_replicated"], s["queued_copies"], s["feature_level"]
    );
    println!(
        "{:<5} {:<18} {:<9} {:<8} {:<6} {:>9} {:>12} {:>7}  {:<20} addr",
        "node", "id", "state", "release", "voter", "messages", "bytes", "queued", "doing"
    );
    for n in s["nodes"].as_array().into_iter().flatten() {
        let doing = match n["activity"].as_str().unwrap_or("?") {
            "repairing" => format!("repairing ({} left)", n["repair_pending"]),
            other => other.to_owned(),
        };
        println!(
            "{:<5} {:<18} {:<9} {:<8} {:<6} {:>9} {:>12} {:>7}  {:<20} {}",
            n["name"].as_str().unwrap_or("?"),
            n["id"].to_string(),
            n["state"].as_str().unwrap_or("?"),
            n["version"].as_str().unwrap_or("?"),
            n["voter"].to_string(),
            n["messages"].to_string(),
            n["bytes"].to_string(),
            n["queued"].to_string(),
            doing,
            n["addrs"]["smtp"].as_str().unwrap_or("-"),
        );
    }
    Ok(())
}

pub async fn down(dir: PathBuf) -> anyhow::Result<()> {
    let mut state = ClusterState::load(&dir)?;
    let live = state.live();
    for k in &live {
        state.stop_node(*k)?;
        state.save(&dir)?;
        println!("n{k} stopped");
    }
    if live.is_empty() {
        println!("no node was running");
    }
    Ok(())
}
