//! A cluster that release 0.1.0 left on disk (`tests/fixtures/v0.1.0`,
//! its nodes' Raft folders) runs on this release at its feature level,
//! then raises it; a cluster this release founds starts at the newest
//! level; a folder of a newer release is refused with the reason.

mod common;

use std::path::{Path, PathBuf};

use membership::store::folder_format;
use membership::{Directory, DirectoryCommand, FEATURE_LEVEL_MAX, Membership};

use common::{Cluster, test_config, wait_until};

fn fixture(k: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../tests/fixtures/v0.1.0/n{k}/cluster"))
}

/// Copies node `k`'s Raft folder into `to`; returns its node id.
fn copy_fixture(k: u32, to: &Path) -> u64 {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(fixture(k).join("raft")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    std::fs::read_to_string(fixture(k).join("node-id"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

async fn wait_level(m: &Membership, level: u32) {
    wait_until(m, &format!("feature level {level}"), move |m| {
        m.feature_level() == level
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_cluster_of_release_0_1_0_runs_at_its_level_then_raises_it() {
    let seed = common::seed(26);
    let _r = common::reproduce(seed, "a_cluster_of_release_0_1_0_runs_at_its_level_then_raises_it");
    let mut c = Cluster::empty(seed, test_config());
    let mut ids = Vec::new();
    for k in 1..=3 {
        // The fixture's ids are random u64s; its folders go where the
        // cluster keeps node `id`'s.
        let id = copy_fixture(k, &c.dir(0).join(format!("tmp-{k}")));
        std::fs::rename(c.dir(0).join(format!("tmp-{k}")), c.dir(id)).unwrap();
        ids.push(id);
    }
    for id in &ids {
        c.start_node(*id).await;
    }
    let leader = c.leader_of(&ids).await;
    for id in &ids {
        let m = c.node(*id);
        assert_eq!(m.feature_level(), 1, "node {id}: the level 0.1.0 ran at");
        assert!(m.directory().domains().contains(&"example.org".to_owned()));
    }
    // Writes of level 1 go on at level 1: the folders stay readable by
    // release 0.1.0 (a node rolled back finds its folder as it left it).
    let follower = *ids.iter().find(|id| **id != leader).unwrap();
    c.node(follower)
        .directory()
        .write(DirectoryCommand::AddDomain {
            domain: "upgraded.example".into(),
        })
        .await
        .unwrap();
    for id in &ids {
        wait_until(c.node(*id), "the new domain", |m| {
            m.directory().domains().contains(&"upgraded.example".to_owned())
        })
        .await;
        assert_eq!(folder_format(&c.dir(*id)).unwrap(), Some(1), "node {id}");
    }

    // Raised (from a follower): every folder is marked with the new
    // format before it holds anything of it.
    c.node(follower).raise_feature_level(2).await.unwrap();
    for id in &ids {
        wait_level(c.node(*id), 2).await;
        assert_eq!(folder_format(&c.dir(*id)).unwrap(), Some(2), "node {id}");
    }
    // A snapshot at the new level, and a restart from it.
    c.node(follower).raft().trigger().snapshot().await.unwrap();
    wait_until(c.node(follower), "a snapshot", |m| {
        m.metrics().borrow().snapshot.is_some_and(|s| s.index > 0)
    })
    .await;
    c.stop(follower).await;
    let m = c.start_node(follower).await;
    assert_eq!(m.feature_level(), 2, "the level survives a restart");
    assert!(m.directory().domains().contains(&"upgraded.example".to_owned()));
    // Never lowered.
    assert!(m.raise_feature_level(1).await.is_err());
    c.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_cluster_founded_now_starts_at_the_newest_level() {
    let seed = common::seed(27);
    let _r = common::reproduce(seed, "a_cluster_founded_now_starts_at_the_newest_level");
    let c = Cluster::start(seed, 3, test_config()).await;
    for (id, m) in &c.nodes {
        wait_level(m, FEATURE_LEVEL_MAX).await;
        assert_eq!(folder_format(&c.dir(*id)).unwrap(), Some(FEATURE_LEVEL_MAX));
    }
    c.shutdown().await;
}

/// A folder whose `format` file names a format of a newer release.
#[tokio::test(flavor = "current_thread")]
async fn a_folder_of_a_newer_release_is_refused_with_the_reason() {
    let c = Cluster::empty(28, test_config());
    let dir = c.dir(1);
    copy_fixture(1, &dir);
    // The frame membership writes: magic, length, blake3 prefix, payload
    // (bincode's varint of 9).
    let payload = [9u8];
    let mut f = b"QRF1".to_vec();
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&blake3::hash(&payload).as_bytes()[..8]);
    f.extend_from_slice(&payload);
    std::fs::write(dir.join("format"), f).unwrap();
    let e = Membership::start(1, &dir, test_config(), c.router.transport(1))
        .await
        .expect_err("a folder of format 9");
    assert!(e.to_string().contains("format 9 by a newer release"), "{e}");
}
