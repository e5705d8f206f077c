//! Membership clusters on the in-memory network: election, replicated
//! directory writes from any node, leader loss, partitions, restarts from
//! disk, snapshots. Each test prints `REPRODUCE WITH: SEED=…` on failure.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;

use membership::{Directory, DirectoryCommand, DirectoryError, MembershipError, NodeState};
use openraft::ServerState;

use common::{Cluster, test_config, wait_domains, wait_until, wait_view};

fn add_domain(d: &str) -> DirectoryCommand {
    DirectoryCommand::AddDomain { domain: d.into() }
}

fn add_user(a: &str) -> DirectoryCommand {
    DirectoryCommand::AddUser {
        address: a.into(),
        password_hash: "$argon2id$fake".into(),
        quota_bytes: Some(1 << 20),
    }
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "current_thread")]
async fn three_nodes_elect_a_leader_and_agree_on_the_view() {
    let seed = common::seed(1);
    let _r = common::reproduce(seed, "three_nodes_elect_a_leader_and_agree_on_the_view");
    let c = Cluster::start(seed, 3, test_config()).await;
    let leader = c.leader_of(&[1, 2, 3]).await;
    for (id, m) in &c.nodes {
        let want = if *id == leader {
            ServerState::Leader
        } else {
            ServerState::Follower
        };
        assert_eq!(m.metrics().borrow().state, want, "node {id}");
    }
    let view = c.node(leader).view();
    assert_eq!(view.voters(), BTreeSet::from([1, 2, 3]));
    assert!(view.nodes.values().all(|n| n.state == NodeState::Up));
    assert_eq!(view.node(2).unwrap().name, "node-2");
    for m in c.nodes.values() {
        wait_view(m, "the leader's view", |v| *v == *view).await;
    }
    // Placement's view follows.
    let p = view.placement_view(placement::MIN_SLOT_BITS).unwrap();
    assert_eq!(p.epoch(), view.epoch);
    assert_eq!(p.up_nodes().count(), 3);

    // A state change from a follower: every node sees the new epoch.
    let follower = *c.nodes.keys().find(|id| **id != leader).unwrap();
    let rx = c.node(3).subscribe();
    c.node(follower).set_node_state(2, NodeState::Draining).await.unwrap();
    for m in c.nodes.values() {
        wait_view(m, "node 2 draining", |v| {
            v.epoch == view.epoch + 1 && v.node(2).unwrap().state == NodeState::Draining
        })
        .await;
    }
    assert!(rx.has_changed().unwrap());
    let p = c.node(3).view().placement_view(placement::MIN_SLOT_BITS).unwrap();
    assert_eq!(p.up_nodes().count(), 2);
    c.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn directory_writes_on_any_node_appear_on_all_despite_loss() {
    let seed = common::seed(2);
    let _r = common::reproduce(seed, "directory_writes_on_any_node_appear_on_all_despite_loss");
    let c = Cluster::start(seed, 3, test_config()).await;
    // 3 % of requests and 3 % of replies lost, up to 5 ms of delay.
    c.router.set_loss_per_million(30_000);
    c.router.set_delay_ms_max(5);
    let dirs: Vec<Arc<dyn Directory>> = c
        .nodes
        .values()
        .map(|m| Arc::new(m.directory()) as Arc<dyn Directory>)
        .collect();
    let mut domains = BTreeSet::new();
    for round in 0..4 {
        for (i, d) in dirs.iter().enumerate() {
            let domain = format!("d{round}-{i}.example");
            d.apply(add_domain(&domain)).await.unwrap();
            d.apply(add_user(&format!("user@{domain}"))).await.unwrap();
            // The node that wrote reads its write at once.
            assert!(
                d.user(&format!("user@{domain}")).is_some(),
                "node {i} does not see its write"
            );
            domains.insert(domain);
        }
    }
    // A refused write is a committed no-op with its error, on any node.
    let err = dirs[1].apply(add_domain("d0-0.example")).await.unwrap_err();
    assert_eq!(err, DirectoryError::DomainExists("d0-0.example".into()));
    let err = dirs[2].apply(add_user("x@nowhere.example")).await.unwrap_err();
    assert_eq!(err, DirectoryError::NoSuchDomain("nowhere.example".into()));
    for m in c.nodes.values() {
        wait_domains(m, &domains).await;
        let d = m.directory();
        assert_eq!(d.users().len(), domains.len());
        assert!(d.user("USER@d3-2.example").is_some());
    }
    let (sent, lost) = c.router.counts();
    assert!(lost > 0, "the test lost nothing ({sent} sent)");
    c.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn leader_loss_elects_a_new_leader_and_writes_continue() {
    let seed = common::seed(3);
    let _r = common::reproduce(seed, "leader_loss_elects_a_new_leader_and_writes_continue");
    let mut c = Cluster::start(seed, 3, test_config()).await;
    let old = c.leader_of(&[1, 2, 3]).await;
    c.node(old)
        .directory()
        .write(add_domain("before.example"))
        .await
        .unwrap();
    c.stop(old).await;

    let rest: Vec<u64> = c.nodes.keys().copied().collect();
    let new = c.leader_of(&rest).await;
    assert_ne!(new, old);
    // Writes go on, from the new leader and from the other survivor.
    for id in &rest {
        c.node(*id)
            .directory()
            .write(add_domain(&format!("after-{id}.example")))
            .await
            .unwrap();
    }
    let want = set(&[
        "before.example",
        &format!("after-{}.example", rest[0]),
        &format!("after-{}.example", rest[1]),
    ]);
    for id in &rest {
        wait_domains(c.node(*id), &want).await;
    }
    // The old leader comes back from its folder and catches up.
    let back = c.start_node(old).await;
    wait_domains(&back, &want).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_minority_cannot_commit_and_converges_after_heal() {
    let seed = common::seed(4);
    let _r = common::reproduce(seed, "a_minority_cannot_commit_and_converges_after_heal");
    let mut config = test_config();
    config.write_timeout_ms = 2_000;
    let c = Cluster::start(seed, 3, config).await;
    let old = c.leader_of(&[1, 2, 3]).await;
    let majority: Vec<u64> = c.nodes.keys().copied().filter(|id| *id != old).collect();
    c.router.partition(&[&[old], &majority]);

    // The isolated leader cannot commit; the majority elects and commits.
    let (minority_dir, majority_dir) = (c.node(old).directory(), c.node(majority[0]).directory());
    let (minority_write, majority_write) = tokio::join!(
        minority_dir.write(add_domain("minority.example")),
        majority_dir.write(add_domain("majority.example")),
    );
    assert!(
        matches!(minority_write, Err(DirectoryError::Storage(_))),
        "minority committed: {minority_write:?}"
    );
    majority_write.unwrap();
    assert!(
        !c.node(old)
            .directory()
            .domains()
            .contains(&"majority.example".to_string())
    );

    c.router.heal();
    let want = set(&["majority.example"]);
    for m in c.nodes.values() {
        wait_domains(m, &want).await;
    }
    // One leader again, and the healed node can write.
    let leader = c.leader_of(&[1, 2, 3]).await;
    assert_ne!(leader, old);
    c.node(old)
        .directory()
        .write(add_domain("healed.example"))
        .await
        .unwrap();
    let want = set(&["majority.example", "healed.example"]);
    for m in c.nodes.values() {
        wait_domains(m, &want).await;
    }
    c.shutdown().await;
}

/// The failure detector's verdicts are fenced by term: a leader that was
/// cut off decides "down" from its stale pings, and its write is forwarded
/// to the new leader after the heal. It must be refused there, not
/// committed (the new leader would otherwise be marked down by a node that
/// could not see it).
#[tokio::test(flavor = "current_thread")]
async fn a_deposed_leaders_verdict_is_refused_by_the_next_term() {
    let seed = common::seed(9);
    let _r = common::reproduce(seed, "a_deposed_leaders_verdict_is_refused_by_the_next_term");
    let mut config = test_config();
    config.write_timeout_ms = 2_000;
    let c = Cluster::start(seed, 3, config).await;
    let old = c.leader_of(&[1, 2, 3]).await;
    let term = c.node(old).leading_term().expect("the leader knows its term");
    let majority: Vec<u64> = c.nodes.keys().copied().filter(|id| *id != old).collect();
    c.router.partition(&[&[old], &majority]);
    let new = c.leader_of(&majority).await;
    assert_ne!(new, old);
    c.router.heal();
    let epoch = c.node(new).view().epoch;

    // The verdict the old leader reached in its term, sent after the heal.
    let r = c.node(old).set_node_verdict(new, NodeState::Down, term).await;
    assert!(
        matches!(&r, Err(MembershipError::Refused(why)) if why.contains("fenced")),
        "{r:?}"
    );
    let third = *majority.iter().find(|id| **id != new).unwrap();
    let r = c.node(old).set_node_verdict(third, NodeState::Down, term).await;
    assert!(matches!(&r, Err(MembershipError::Refused(_))), "{r:?}");
    for id in [1, 2, 3] {
        let v = c.node(new).view();
        assert_eq!(v.node(id).unwrap().state, NodeState::Up, "node {id} in {v:?}");
    }
    assert_eq!(c.node(new).view().epoch, epoch, "a fenced verdict changed nothing");

    // The new leader's own verdicts, in its own term, are committed.
    let t = c.node(new).leading_term().unwrap();
    assert!(t > term);
    c.node(new).set_node_verdict(third, NodeState::Down, t).await.unwrap();
    assert_eq!(c.node(new).view().node(third).unwrap().state, NodeState::Down);
    c.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_restarted_node_keeps_its_state_from_log_and_snapshot() {
    let seed = common::seed(5);
    let _r = common::reproduce(seed, "a_restarted_node_keeps_its_state_from_log_and_snapshot");
    let mut config = test_config();
    // Snapshots (and log purges) happen during the test.
    config.snapshot_logs_since_last = 20;
    config.logs_kept_after_snapshot = 5;
    let mut c = Cluster::start(seed, 3, config).await;
    let leader = c.leader_of(&[1, 2, 3]).await;
    let follower = *c.nodes.keys().find(|id| **id != leader).unwrap();
    let mut want = BTreeSet::new();
    for i in 0..50 {
        let d = format!("d{i}.example");
        c.node(leader).directory().write(add_domain(&d)).await.unwrap();
        want.insert(d);
    }
    wait_domains(c.node(follower), &want).await;
    wait_until(c.node(follower), "a snapshot", |m| {
        m.metrics().borrow().snapshot.is_some()
    })
    .await;
    let view_before = c.node(follower).view();
    c.stop(follower).await;
    c.node(leader)
        .directory()
        .write(add_domain("while-down.example"))
        .await
        .unwrap();

    // Off the network: what it has comes from its own folder.
    let m = c.start_isolated(follower).await;
    wait_domains(&m, &want).await;
    assert_eq!(*m.view(), *view_before);
    assert!(m.directory().user("nobody@d1.example").is_none());

    // Back on the network: it catches up.
    c.router.register(m.clone());
    want.insert("while-down.example".into());
    wait_domains(&m, &want).await;

    // The whole cluster stops and starts again from disk.
    let ids: Vec<u64> = c.nodes.keys().copied().collect();
    for id in &ids {
        c.stop(*id).await;
    }
    for id in &ids {
        c.start_node(*id).await;
    }
    c.leader_of(&ids).await;
    for m in c.nodes.values() {
        wait_domains(m, &want).await;
    }
    c.node(ids[2])
        .directory()
        .write(add_domain("after-restart.example"))
        .await
        .unwrap();
    want.insert("after-restart.example".into());
    for m in c.nodes.values() {
        wait_domains(m, &want).await;
    }
    c.shutdown().await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_late_joiner_catches_up_from_a_snapshot_and_can_be_removed() {
    let seed = common::seed(6);
    let _r = common::reproduce(seed, "a_late_joiner_catches_up_from_a_snapshot_and_can_be_removed");
    let mut config = test_config();
    config.snapshot_logs_since_last = 10;
    config.logs_kept_after_snapshot = 0;
    let mut c = Cluster::start(seed, 3, config).await;
    let mut want = BTreeSet::new();
    for i in 0..30 {
        let d = format!("d{i}.example");
        c.node(1 + i % 3).directory().write(add_domain(&d)).await.unwrap();
        want.insert(d);
    }
    let leader = c.leader_of(&[1, 2, 3]).await;
    wait_until(c.node(leader), "the log purged", |m| {
        m.metrics().borrow().purged.is_some()
    })
    .await;

    // Node 4 joins through a follower; the leader's log no longer has the
    // start, so node 4 gets a snapshot.
    let via = *c.nodes.keys().find(|id| **id != leader).unwrap();
    let m4 = c.start_node(4).await;
    m4.join(&common::addr(via), common::info(4)).await.unwrap();
    wait_domains(&m4, &want).await;
    wait_view(&m4, "4 nodes, 4 a learner", |v| {
        v.nodes.len() == 4 && !v.node(4).unwrap().voter && v.voters().len() == 3
    })
    .await;
    assert!(
        m4.metrics().borrow().snapshot.is_some(),
        "node 4 did not install a snapshot"
    );

    // Writes through the learner are forwarded too.
    m4.directory().write(add_domain("from-learner.example")).await.unwrap();
    want.insert("from-learner.example".into());
    for m in c.nodes.values() {
        wait_domains(m, &want).await;
    }

    // Promote it, then remove it again.
    m4.change_membership(BTreeSet::from([1, 2, 3, 4])).await.unwrap();
    wait_view(c.node(1), "4 voters", |v| v.voters().len() == 4).await;
    c.node(via).remove_node(4).await.unwrap();
    for id in [1, 2, 3] {
        wait_view(c.node(id), "node 4 gone", |v| {
            v.node(4).is_none() && v.voters().len() == 3
        })
        .await;
    }
    c.shutdown().await;
}

/// IMAP's UIDs are numbers from the replicated sequences: a node cut off
/// from the majority (which thinks itself still in the view) gets no
/// number at all, while the majority numbers the same ids and others; after
/// the heal every node holds the same numbers, each given to one id, and
/// the cut-off node asking again for its ids gets the majority's numbers.
#[tokio::test(flavor = "current_thread")]
async fn a_partitioned_node_never_numbers_an_id_the_majority_numbers_differently() {
    let seed = common::seed(9);
    let _r = common::reproduce(
        seed,
        "a_partitioned_node_never_numbers_an_id_the_majority_numbers_differently",
    );
    let mut config = test_config();
    config.write_timeout_ms = 2_000;
    let c = Cluster::start(seed, 3, config).await;
    let id = |n: u8| [n; 16];
    let name = "imap/u/INBOX".to_string();
    c.node(1)
        .assign_numbers(name.clone(), vec![id(1), id(2)])
        .await
        .unwrap();
    let old = c.leader_of(&[1, 2, 3]).await;
    let majority: Vec<u64> = c.nodes.keys().copied().filter(|n| *n != old).collect();
    c.router.partition(&[&[old], &majority]);
    let (cut, major) = tokio::join!(
        c.node(old).assign_numbers(name.clone(), vec![id(3), id(4)]),
        c.node(majority[0])
            .assign_numbers(name.clone(), vec![id(4), id(5), id(3)]),
    );
    assert!(cut.is_err(), "the minority numbered ids: {cut:?}");
    major.unwrap();
    c.router.heal();
    c.node(old)
        .assign_numbers(name.clone(), vec![id(3), id(4), id(6)])
        .await
        .unwrap();
    let want: Vec<Option<u32>> = vec![Some(1), Some(2), Some(5), Some(3), Some(4), Some(6)];
    for m in c.nodes.values() {
        let (name, want) = (name.clone(), want.clone());
        wait_until(m, "the same numbers everywhere", move |m| {
            m.with_sequence(&name, |s| {
                s.map(|s| (1..=6u8).map(|n| s.number(&[n; 16])).collect::<Vec<_>>())
            }) == Some(want.clone())
        })
        .await;
    }
    c.shutdown().await;
}

/// IMAP's `\Recent` claims: the node whose entry numbered an id claims
/// it, no other node does (every node applies the entry), an id already
/// numbered is claimed by no one, and a claim is taken once.
#[tokio::test(flavor = "current_thread")]
async fn the_node_that_numbers_a_message_claims_it_as_recent() {
    let seed = common::seed(10);
    let _r = common::reproduce(seed, "the_node_that_numbers_a_message_claims_it_as_recent");
    let c = Cluster::start(seed, 3, test_config()).await;
    let id = |n: u8| [n; 16];
    let name = "imap/u/INBOX".to_string();
    let all = [id(1), id(2), id(3)];
    c.node(1)
        .assign_numbers(name.clone(), vec![id(1), id(2)])
        .await
        .unwrap();
    c.node(2)
        .assign_numbers(name.clone(), vec![id(2), id(3)])
        .await
        .unwrap();
    for m in c.nodes.values() {
        let name = name.clone();
        wait_until(m, "every number applied", move |m| {
            m.with_sequence(&name, |s| s.is_some_and(|s| s.number(&[3; 16]).is_some()))
        })
        .await;
    }
    assert_eq!(c.node(1).count_recent(&name, &all), 2);
    assert_eq!(c.node(2).count_recent(&name, &all), 1, "id 2 was numbered already");
    assert_eq!(c.node(3).count_recent(&name, &all), 0);
    assert_eq!(c.node(2).take_recent(&name, &all), vec![id(3)]);
    assert!(c.node(2).take_recent(&name, &all).is_empty(), "taken twice");
    c.shutdown().await;
}
