//! The state machine's commands applied without Raft.

use super::*;

fn req(node: u64, incarnation: u64, serial: u64, command: Command) -> Request {
    Request {
        client: ClientId { node, incarnation },
        serial,
        command,
    }
}

fn add_domain(d: &str) -> Command {
    Command::Directory(DirectoryCommand::AddDomain { domain: d.into() })
}

#[test]
fn view_commands() {
    let mut s = ClusterState::default();
    let voters = BTreeSet::from([1]);
    let table: Vec<(Command, Result<(), CommandError>, u64)> = vec![
        (Command::AddNode(NodeInfo::new(1, "a:1")), Ok(()), 1),
        (Command::AddNode(NodeInfo::new(1, "a:1")), Ok(()), 1),
        (Command::AddNode(NodeInfo::new(2, "b:1")), Ok(()), 2),
        (
            Command::SetNodeState {
                id: 2,
                state: NodeState::Down,
            },
            Ok(()),
            3,
        ),
        (
            Command::SetNodeState {
                id: 2,
                state: NodeState::Down,
            },
            Ok(()),
            3,
        ),
        (
            Command::SetNodeState {
                id: 9,
                state: NodeState::Down,
            },
            Err(CommandError::NoSuchNode(9)),
            3,
        ),
        (Command::RemoveNode { id: 1 }, Err(CommandError::NodeIsVoter(1)), 3),
        (Command::RemoveNode { id: 2 }, Ok(()), 4),
        (Command::RemoveNode { id: 2 }, Err(CommandError::NoSuchNode(2)), 4),
        (
            Command::AddNode(NodeInfo {
                weight: 0,
                ..NodeInfo::new(3, "c:1")
            }),
            Err(CommandError::BadNode(NodeError::ZeroWeight(3))),
            4,
        ),
        (add_domain("example.org"), Ok(()), 4),
        (
            add_domain("example.org"),
            Err(CommandError::Directory(DirectoryError::DomainExists(
                "example.org".into(),
            ))),
            4,
        ),
    ];
    for (i, (cmd, want, epoch)) in table.into_iter().enumerate() {
        let before = s.clone();
        let got = s.apply(&cmd, &voters, CommittedBy::default());
        assert_eq!(got.result, want, "case {i}: {cmd:?}");
        assert_eq!(got.epoch, epoch, "case {i}: {cmd:?}");
        if got.result.is_err() {
            assert_eq!(s, before, "case {i}: a refused command changed the state");
        }
    }
    assert!(s.view.node(1).unwrap().voter);
    s.set_voters(&BTreeSet::new());
    assert!(!s.view.node(1).unwrap().voter);
    assert_eq!(s.view.epoch, 5);
}

#[test]
fn verdicts_are_fenced_by_the_term_that_commits_them() {
    let mut s = ClusterState::default();
    let v = BTreeSet::from([1]);
    let by = |term, leader| CommittedBy { term, leader };
    for id in [1, 2, 3] {
        s.apply(&Command::AddNode(NodeInfo::new(id, format!("n{id}:1"))), &v, by(1, 1));
    }
    let verdict = |id, state, term| Command::Verdict { id, state, term };
    // Decided and committed in term 3 by leader 1: applied.
    let r = s.apply(&verdict(2, NodeState::Down, 3), &v, by(3, 1));
    assert_eq!(r.result, Ok(()));
    assert_eq!(s.view.node(2).unwrap().state, NodeState::Down);
    // Leader 1 was deposed; its term-3 verdict on 3 reaches the term-4
    // leader 2 and is committed there: refused, nothing changes.
    let before = s.clone();
    let r = s.apply(&verdict(3, NodeState::Down, 3), &v, by(4, 2));
    assert_eq!(
        r.result,
        Err(CommandError::StaleVerdict {
            node: 3,
            decided: 3,
            committed: 4
        })
    );
    assert_eq!(s, before);
    // A verdict from a later term than its entry cannot be honest either.
    assert!(s.apply(&verdict(3, NodeState::Down, 5), &v, by(4, 2)).result.is_err());
    // The committing leader is never judged down, even in its own term.
    assert!(s.apply(&verdict(2, NodeState::Down, 4), &v, by(4, 2)).result.is_err());
    // ... but may mark itself up (a stale verdict got through earlier).
    assert_eq!(s.apply(&verdict(2, NodeState::Up, 4), &v, by(4, 2)).result, Ok(()));
    assert_eq!(s.view.node(2).unwrap().state, NodeState::Up);
    // Operator commands (drain) are not verdicts: no fence.
    let drain = Command::SetNodeState {
        id: 3,
        state: NodeState::Draining,
    };
    assert_eq!(s.apply(&drain, &v, by(9, 1)).result, Ok(()));
}

#[test]
fn the_feature_level_only_rises_and_gates_newer_commands() {
    let mut s = ClusterState::default();
    let v = BTreeSet::new();
    let by = CommittedBy::default();
    let max = crate::formats::FEATURE_LEVEL_MAX;
    assert_eq!(s.feature_level, 1, "a state of release 0.1.0's level");
    // A level this release does not know: refused, nothing changes.
    let before = s.clone();
    let r = s.apply(&Command::SetFeatureLevel { level: max + 1 }, &v, by);
    assert!(matches!(r.result, Err(CommandError::FeatureLevel { asked, .. }) if asked == max + 1));
    assert_eq!(s, before);
    assert_eq!(s.apply(&Command::SetFeatureLevel { level: 2 }, &v, by).result, Ok(()));
    assert_eq!(s.feature_level, 2);
    // Again: a no-op; lower: refused.
    assert_eq!(s.apply(&Command::SetFeatureLevel { level: 2 }, &v, by).result, Ok(()));
    assert!(s.apply(&Command::SetFeatureLevel { level: 1 }, &v, by).result.is_err());
    assert_eq!(s.feature_level, 2);
    // Every command's level is one this release knows.
    assert!(Command::SetFeatureLevel { level: 2 }.feature_level() <= max);
}

#[test]
fn a_folder_defines_keywords_from_level_three_until_it_goes() {
    let mut s = ClusterState::default();
    let v = BTreeSet::new();
    let by = CommittedBy::default();
    let name = "imap/alice/INBOX".to_owned();
    let define = Command::DefineKeywords {
        name: name.clone(),
        keywords: vec!["$Label1".into()],
    };
    assert!(s.apply(&define, &v, by).result.is_err(), "refused below level 3");
    assert_eq!(s.apply(&Command::SetFeatureLevel { level: 3 }, &v, by).result, Ok(()));
    // No sequence, no folder: nothing defined.
    assert_eq!(s.apply(&define, &v, by).result, Ok(()));
    assert!(s.keywords.is_empty());
    let assign = Command::AssignNumbers {
        name: name.clone(),
        ids: vec![[1; 16]],
        now_secs: 1,
    };
    assert_eq!(s.apply(&assign, &v, by).result, Ok(()));
    assert_eq!(s.apply(&define, &v, by).result, Ok(()));
    assert!(s.keywords.get(&name).is_some_and(|k| k.contains("$Label1")));
    let drop = Command::DropSequence { name: name.clone() };
    assert_eq!(s.apply(&drop, &v, by).result, Ok(()));
    assert!(s.keywords.get(&name).is_none(), "the folder's keywords went with it");
}

#[test]
fn routes_and_the_directory_stay_consistent() {
    use crate::routes::RoutesCommand;
    let mut s = ClusterState::default();
    let v = BTreeSet::new();
    let by = CommittedBy::default();
    assert_eq!(s.apply(&Command::SetFeatureLevel { level: 3 }, &v, by).result, Ok(()));
    for d in ["example.org", "example.net"] {
        assert_eq!(s.apply(&add_domain(d), &v, by).result, Ok(()));
    }
    let user = Command::Directory(DirectoryCommand::AddUser {
        address: "alice@example.org".into(),
        password_hash: "h".into(),
        quota_bytes: None,
    });
    assert_eq!(s.apply(&user, &v, by).result, Ok(()));
    let alias_domain = Command::Routes(RoutesCommand::SetDomainAlias {
        alias: "example.net".into(),
        target: "example.org".into(),
    });
    assert_eq!(s.apply(&alias_domain, &v, by).result, Ok(()));
    assert!(
        !s.directory.domains.contains("example.net"),
        "now an alias, not a domain of its own"
    );
    // An alias domain is not added again as a domain, and its target
    // stays while aliased.
    assert!(s.apply(&add_domain("example.net"), &v, by).result.is_err());
    let remove = |d: &str| Command::Directory(DirectoryCommand::RemoveDomain { domain: d.into() });
    let catch_all = Command::Routes(RoutesCommand::SetCatchAll {
        domain: "other.org".into(),
        address: Some("alice@example.org".into()),
    });
    assert_eq!(s.apply(&add_domain("other.org"), &v, by).result, Ok(()));
    assert_eq!(s.apply(&catch_all, &v, by).result, Ok(()));
    assert!(matches!(
        s.apply(&remove("example.org"), &v, by).result,
        Err(CommandError::Directory(DirectoryError::DomainNotEmpty(_)))
    ));
    // A domain removed takes its catch-all with it.
    assert_eq!(s.apply(&remove("other.org"), &v, by).result, Ok(()));
    assert!(s.routes.catch_all.is_empty());
}

#[test]
fn retries_are_answered_not_applied() {
    let mut s = ClusterState::default();
    let v = BTreeSet::new();
    let first = s.apply_request(&req(1, 1, 10, add_domain("a.org")), &v, CommittedBy::default());
    assert_eq!(first.result, Ok(()));
    // The same request again (a retry after a lost answer): same answer.
    assert_eq!(
        s.apply_request(&req(1, 1, 10, add_domain("a.org")), &v, CommittedBy::default()),
        first
    );
    // Another serial is a new request.
    assert!(matches!(
        s.apply_request(&req(1, 1, 11, add_domain("a.org")), &v, CommittedBy::default())
            .result,
        Err(CommandError::Directory(DirectoryError::DomainExists(_)))
    ));
    // An earlier incarnation is stale; a later one starts afresh.
    assert!(matches!(
        s.apply_request(&req(1, 0, 12, add_domain("b.org")), &v, CommittedBy::default())
            .result,
        Err(CommandError::Stale { .. })
    ));
    assert_eq!(
        s.apply_request(&req(1, 2, 10, add_domain("b.org")), &v, CommittedBy::default())
            .result,
        Ok(())
    );
    // The window is bounded.
    for serial in 100..100 + SESSION_RESPONSES_MAX as u64 + 5 {
        s.apply_request(
            &req(1, 2, serial, add_domain(&format!("d{serial}.org"))),
            &v,
            CommittedBy::default(),
        );
    }
    assert_eq!(s.sessions[&1].responses.len(), SESSION_RESPONSES_MAX);
    assert!(matches!(
        s.apply_request(&req(1, 2, 100, add_domain("d100.org")), &v, CommittedBy::default())
            .result,
        Err(CommandError::Stale { .. })
    ));
}

#[test]
fn mod_sequences_rise_with_every_change_from_level_3() {
    let mut s = ClusterState::default();
    let v = BTreeSet::new();
    let by = CommittedBy::default();
    let name = "imap/alice/INBOX".to_owned();
    let assign = |ids: Vec<[u8; 16]>| Command::AssignNumbers {
        name: name.clone(),
        ids,
        now_secs: 1,
    };
    let touch = |ids: Vec<[u8; 16]>| Command::Touch {
        items: vec![(name.clone(), ids)],
    };
    // Below level 3: numbering stamps nothing, a Touch is refused.
    assert_eq!(s.apply(&assign(vec![[1; 16]]), &v, by).result, Ok(()));
    assert!(s.modseqs.get(&name).is_none());
    assert!(s.apply(&touch(vec![[1; 16]]), &v, by).result.is_err());
    assert_eq!(s.apply(&Command::SetFeatureLevel { level: 3 }, &v, by).result, Ok(()));
    let highest = |s: &ClusterState| s.modseqs.get(&name).map_or(1, |f| f.highest());
    let of = |s: &ClusterState, id: [u8; 16]| s.modseqs.get(&name).map_or(1, |f| f.of(&id));
    // New messages: one change for the batch; one numbered before counts 1.
    assert_eq!(s.apply(&assign(vec![[1; 16], [2; 16], [3; 16]]), &v, by).result, Ok(()));
    assert_eq!(
        (highest(&s), of(&s, [1; 16]), of(&s, [2; 16]), of(&s, [3; 16])),
        (2, 1, 2, 2)
    );
    // Asking again numbers nothing and changes nothing.
    assert_eq!(s.apply(&assign(vec![[2; 16]]), &v, by).result, Ok(()));
    assert_eq!(highest(&s), 2);
    // A flag change: up by one; ids not numbered are skipped.
    assert_eq!(s.apply(&touch(vec![[1; 16], [9; 16]]), &v, by).result, Ok(()));
    assert_eq!((highest(&s), of(&s, [1; 16]), of(&s, [9; 16])), (3, 3, 1));
    assert!(s.modseqs.get(&name).is_some_and(|f| !f.ids.contains_key(&[9; 16])));
    // A Touch of a folder without a sequence does nothing.
    let other = Command::Touch {
        items: vec![("imap/bob/INBOX".into(), vec![[1; 16]])],
    };
    assert_eq!(s.apply(&other, &v, by).result, Ok(()));
    assert!(s.modseqs.get("imap/bob/INBOX").is_none());
    // An expunge is a change; forgetting what is not numbered is not.
    let forget = |ids: Vec<[u8; 16]>| Command::ForgetNumbers {
        name: name.clone(),
        ids,
    };
    assert_eq!(s.apply(&forget(vec![[8; 16]]), &v, by).result, Ok(()));
    assert_eq!(highest(&s), 3);
    assert_eq!(s.apply(&forget(vec![[2; 16]]), &v, by).result, Ok(()));
    assert_eq!(highest(&s), 4);
    // Too many ids in one Touch: refused whole.
    let big = Command::Touch {
        items: vec![(name.clone(), vec![[1; 16]; crate::sequence::IDS_PER_COMMAND_MAX + 1])],
    };
    assert!(s.apply(&big, &v, by).result.is_err());
    assert_eq!(highest(&s), 4);
    // A dropped folder's counter goes with it.
    assert_eq!(
        s.apply(&Command::DropSequence { name: name.clone() }, &v, by).result,
        Ok(())
    );
    assert!(s.modseqs.get(&name).is_none());
}
