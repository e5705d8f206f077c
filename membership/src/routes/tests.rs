//! The routing table's writes and expansion, without Raft.

use super::*;
use crate::directory::DirectoryCommand;

fn dir() -> DirectoryState {
    let mut d = DirectoryState::default();
    for c in [
        DirectoryCommand::AddDomain {
            domain: "example.org".into(),
        },
        DirectoryCommand::AddDomain {
            domain: "other.org".into(),
        },
    ] {
        d.apply(&c).unwrap();
    }
    for u in ["alice@example.org", "bob@example.org", "carol@other.org"] {
        d.apply(&DirectoryCommand::AddUser {
            address: u.into(),
            password_hash: "x".into(),
            quota_bytes: None,
        })
        .unwrap();
    }
    d
}

fn alias(a: &str, t: &[&str]) -> RoutesCommand {
    RoutesCommand::SetAlias {
        address: a.into(),
        targets: t.iter().map(|s| s.to_string()).collect(),
        srs_key: [7; 32],
    }
}

fn users(e: &Expansion) -> Vec<(&str, Option<&str>)> {
    e.local
        .iter()
        .map(|(u, t)| (u.address.as_str(), t.as_deref()))
        .collect()
}

#[test]
fn aliases_expand_to_users_and_remote_addresses_once_each() {
    let mut d = dir();
    let mut r = Routes::default();
    r.apply(
        &alias("Sales@example.org", &["alice@example.org", "bob@example.org"]),
        &mut d,
    )
    .unwrap();
    r.apply(
        &alias(
            "team@example.org",
            &["sales@example.org", "alice@example.org", "x@remote.net"],
        ),
        &mut d,
    )
    .unwrap();
    let e = expand(&d, &r, "TEAM@example.org").unwrap();
    assert_eq!(users(&e), vec![("alice@example.org", None), ("bob@example.org", None)]);
    assert_eq!(e.remote, vec!["x@remote.net".to_owned()]);
    assert!(e.routed);
    assert_eq!(r.srs_key, Some([7; 32]), "the first alias sets the SRS key");
    // A user named directly is not routed; an unknown one is unknown;
    // a foreign domain is not ours.
    let e = expand(&d, &r, "alice@example.org").unwrap();
    assert!(!e.routed);
    assert_eq!(expand(&d, &r, "nobody@example.org"), Err(ExpandError::Unknown));
    assert_eq!(expand(&d, &r, "x@remote.net"), Err(ExpandError::NotLocal));
}

#[test]
fn an_alias_that_reaches_itself_is_refused_naming_the_loop() {
    let mut d = dir();
    let mut r = Routes::default();
    r.apply(&alias("a@example.org", &["alice@example.org"]), &mut d)
        .unwrap();
    r.apply(&alias("b@example.org", &["a@example.org"]), &mut d).unwrap();
    let before = r.clone();
    let err = r
        .apply(&alias("a@example.org", &["b@example.org"]), &mut d)
        .unwrap_err();
    assert_eq!(
        err,
        RouteError::Loop(vec![
            "a@example.org".into(),
            "b@example.org".into(),
            "a@example.org".into()
        ])
    );
    assert_eq!(
        err.to_string(),
        "alias loop: a@example.org -> b@example.org -> a@example.org"
    );
    assert_eq!(r, before, "a refused alias changes nothing");
    // Direct self-reference too.
    assert!(matches!(
        r.apply(&alias("c@example.org", &["c@example.org"]), &mut d),
        Err(RouteError::Loop(_))
    ));
}

#[test]
fn targets_must_exist_and_bounds_hold() {
    let mut d = dir();
    let mut r = Routes::default();
    assert_eq!(
        r.apply(&alias("a@example.org", &["typo@example.org"]), &mut d),
        Err(RouteError::NoSuchTarget("typo@example.org".into()))
    );
    assert_eq!(
        r.apply(&alias("alice@example.org", &["bob@example.org"]), &mut d),
        Err(RouteError::IsUser("alice@example.org".into()))
    );
    assert_eq!(
        r.apply(&alias("a@nowhere.net", &["bob@example.org"]), &mut d),
        Err(RouteError::NotLocal("nowhere.net".into()))
    );
    assert_eq!(
        r.apply(&alias("a@example.org", &[]), &mut d),
        Err(RouteError::TargetCount)
    );
    // A chain deeper than the bound is refused at add.
    let mut prev = "alice@example.org".to_owned();
    for i in 0..EXPANSION_DEPTH_MAX {
        let a = format!("l{i}@example.org");
        r.apply(&alias(&a, &[&prev]), &mut d).unwrap();
        prev = a;
    }
    assert_eq!(
        r.apply(&alias("deep@example.org", &[&prev]), &mut d),
        Err(RouteError::Expansion(ExpandError::TooDeep))
    );
    // More than 1 000 final recipients: refused too.
    let mut r = Routes::default();
    let many: Vec<String> = (0..600).map(|i| format!("u{i}@remote.net")).collect();
    let more: Vec<String> = (600..1200).map(|i| format!("u{i}@remote.net")).collect();
    let refs = |v: &Vec<String>| RoutesCommand::SetAlias {
        address: String::new(),
        targets: v.clone(),
        srs_key: [0; 32],
    };
    let named = |a: &str, c: RoutesCommand| match c {
        RoutesCommand::SetAlias { targets, srs_key, .. } => RoutesCommand::SetAlias {
            address: a.into(),
            targets,
            srs_key,
        },
        c => c,
    };
    r.apply(&named("m1@example.org", refs(&many)), &mut d).unwrap();
    r.apply(&named("m2@example.org", refs(&more)), &mut d).unwrap();
    assert_eq!(
        r.apply(&alias("all@example.org", &["m1@example.org", "m2@example.org"]), &mut d),
        Err(RouteError::Expansion(ExpandError::TooMany))
    );
}

#[test]
fn taps_copy_an_address_or_a_whole_domain_to_a_user() {
    let mut d = dir();
    let mut r = Routes::default();
    let tap = |t: &str, a: Option<&str>| RoutesCommand::SetTap {
        target: t.into(),
        archive: a.map(str::to_owned),
    };
    assert_eq!(
        r.apply(&tap("nowhere.net", Some("carol@other.org")), &mut d),
        Err(RouteError::NotLocal("nowhere.net".into()))
    );
    assert_eq!(
        r.apply(&tap("example.org", Some("ghost@other.org")), &mut d),
        Err(RouteError::NoSuchUser("ghost@other.org".into()))
    );
    r.apply(&tap("Example.ORG", Some("carol@other.org")), &mut d).unwrap();
    r.apply(&tap("alice@example.org", Some("carol@other.org")), &mut d)
        .unwrap();
    assert_eq!(r.taps_for("ALICE@example.org"), ["carol@other.org"], "once");
    assert_eq!(r.taps_for("anyone@example.org"), ["carol@other.org"]);
    assert!(r.taps_for("carol@other.org").is_empty());
    r.apply(&tap("example.org", None), &mut d).unwrap();
    assert!(r.taps_for("anyone@example.org").is_empty());
    assert_eq!(
        r.apply(&tap("example.org", None), &mut d),
        Err(RouteError::NoSuchTap("example.org".into()))
    );
}

#[test]
fn domain_aliases_catch_alls_and_sub_addresses() {
    let mut d = dir();
    let mut r = Routes::default();
    r.apply(
        &RoutesCommand::SetDomainAlias {
            alias: "example.net".into(),
            target: "example.org".into(),
        },
        &mut d,
    )
    .unwrap();
    assert_eq!(
        users(&expand(&d, &r, "alice@example.net").unwrap()),
        vec![("alice@example.org", None)]
    );
    assert_eq!(expand(&d, &r, "nobody@example.net"), Err(ExpandError::Unknown));
    // A domain with users cannot become an alias.
    assert_eq!(
        r.apply(
            &RoutesCommand::SetDomainAlias {
                alias: "other.org".into(),
                target: "example.org".into(),
            },
            &mut d
        ),
        Err(RouteError::DomainHasUsers("other.org".into()))
    );
    // Sub-addresses reach the user with the tag; through a domain alias too.
    assert_eq!(
        users(&expand(&d, &r, "alice+lists@example.org").unwrap()),
        vec![("alice@example.org", Some("lists"))]
    );
    assert_eq!(
        users(&expand(&d, &r, "bob+x@example.net").unwrap()),
        vec![("bob@example.org", Some("x"))]
    );
    assert_eq!(expand(&d, &r, "nobody+x@example.org"), Err(ExpandError::Unknown));
    // A catch-all takes what is unknown, not what exists.
    r.apply(
        &RoutesCommand::SetCatchAll {
            domain: "example.org".into(),
            address: Some("bob@example.org".into()),
        },
        &mut d,
    )
    .unwrap();
    assert_eq!(
        users(&expand(&d, &r, "whoever@example.org").unwrap()),
        vec![("bob@example.org", None)]
    );
    assert_eq!(
        users(&expand(&d, &r, "whoever@example.net").unwrap()),
        vec![("bob@example.org", None)]
    );
    assert_eq!(
        users(&expand(&d, &r, "alice@example.org").unwrap()),
        vec![("alice@example.org", None)]
    );
    // A catch-all onto an address of its own domain that only it would
    // take is a loop.
    assert!(matches!(
        r.apply(
            &RoutesCommand::SetCatchAll {
                domain: "example.org".into(),
                address: Some("ghost@example.org".into()),
            },
            &mut d
        ),
        Err(RouteError::Loop(_))
    ));
}
