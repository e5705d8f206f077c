//! The cluster's feature level (see membership's `formats`): what data the
//! cluster may write, so that every node can read it. It rises only once
//! every node of the view runs a release that supports the next level:
//! `quill admin cluster upgrade-finish` raises it at once, and the leader
//! raises it by itself ([`UpgradeFinish::Auto`], the default) when it
//! sees every node support more. A node that does not answer holds it
//! back (it may be of an older release); remove a dead node from the
//! cluster to let the level rise.
//!
//! Until the level rises a node rolled back to the previous release
//! works; after, the previous release is refused (its Raft folder is of a
//! newer format, and peers refuse its protocol).

use std::time::Duration;

use membership::FEATURE_LEVEL_MAX;
use tokio::sync::watch;
use tracing::{debug, info};

use super::node::Cluster;
use super::rpc::NodeDescription;

/// How often the leader looks whether the level can rise.
pub const LEVEL_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Who raises the feature level once every node supports more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpgradeFinish {
    /// The leader, as soon as every node of the view says it supports it.
    #[default]
    Auto,
    /// Only `quill admin cluster upgrade-finish`: keeps a rollback to the
    /// previous release possible until the operator says so.
    Manual,
}

/// One node of the view and what it said of itself (`None`: no answer).
#[derive(Debug, Clone)]
pub struct NodeAnswer {
    pub name: String,
    pub described: Option<NodeDescription>,
}

/// What to do about the level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Every node supports this level, above the current one.
    Raise(u32),
    /// Some node supports more than the current level, but these hold it
    /// back (an older release, or no answer).
    Hold(Vec<String>),
    /// No node supports more than the current level.
    Done,
}

/// Decides from every node's answer (this node's among them).
pub fn decide(current: u32, answers: &[NodeAnswer]) -> Decision {
    let maxes: Vec<u32> = answers
        .iter()
        .filter_map(|a| a.described.as_ref().map(|d| d.feature_level_max))
        .collect();
    let best = maxes.iter().copied().max().unwrap_or(current);
    if best <= current {
        return Decision::Done;
    }
    let common = maxes.iter().copied().min().unwrap_or(current).min(FEATURE_LEVEL_MAX);
    let holdouts: Vec<String> = answers
        .iter()
        .filter_map(|a| match &a.described {
            None => Some(format!("{} (did not answer)", a.name)),
            Some(d) if d.feature_level_max < best => Some(format!(
                "{} (release {}, supports level {})",
                a.name, d.version, d.feature_level_max
            )),
            Some(_) => None,
        })
        .collect();
    if answers.iter().any(|a| a.described.is_none()) || common <= current {
        return Decision::Hold(holdouts);
    }
    Decision::Raise(common)
}

/// Asks every node of the view (this one too) what it supports.
pub async fn survey(cluster: &Cluster) -> Vec<NodeAnswer> {
    let me = cluster.id();
    let view = cluster.membership.view();
    let mut answers: Vec<NodeAnswer> = cluster
        .ask_others(|cluster, addr| async move { cluster.describe(&addr).await })
        .await
        .into_iter()
        .map(|(n, d)| NodeAnswer {
            name: n.name,
            described: d,
        })
        .collect();
    if let Some(n) = view.node(me) {
        answers.push(NodeAnswer {
            name: n.name.clone(),
            // Its figures do not matter here.
            described: Some(NodeDescription {
                version: crate::RELEASE.to_owned(),
                feature_level_max: FEATURE_LEVEL_MAX,
                stats: Default::default(),
            }),
        });
    }
    answers
}

/// `upgrade-finish`: raises the level to the newest every node supports.
/// Returns (the level before, the level now), or why not.
pub async fn finish(cluster: &Cluster, answers: &[NodeAnswer]) -> Result<(u32, u32), String> {
    let before = cluster.membership.feature_level();
    match decide(before, answers) {
        Decision::Done => Ok((before, before)),
        Decision::Hold(holdouts) => Err(format!(
            "not every node runs a release that supports a newer feature level: {}; upgrade them \
             (or remove the dead ones from the cluster), then try again",
            holdouts.join(", ")
        )),
        Decision::Raise(level) => {
            cluster
                .membership
                .raise_feature_level(level)
                .await
                .map_err(|e| format!("cannot raise the feature level: {e}"))?;
            Ok((before, level))
        }
    }
}

/// The leader raises the level by itself once every node supports more
/// (unless [`UpgradeFinish::Manual`]); looked at every
/// [`LEVEL_CHECK_INTERVAL`].
pub async fn duty(cluster: Cluster, upgrade_finish: UpgradeFinish, mut stop: watch::Receiver<bool>) {
    if upgrade_finish == UpgradeFinish::Manual {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LEVEL_CHECK_INTERVAL) => {}
            _ = stop.changed() => return,
        }
        let m = &cluster.membership;
        if m.feature_level() >= FEATURE_LEVEL_MAX || m.leading_term().is_none() {
            continue;
        }
        let answers = survey(&cluster).await;
        match finish(&cluster, &answers).await {
            Ok((before, now)) if now > before => {
                info!(from = before, to = now, "every node supports it: feature level raised")
            }
            Ok(_) => {}
            Err(why) => debug!("feature level held: {why}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, max: Option<u32>) -> NodeAnswer {
        NodeAnswer {
            name: name.into(),
            described: max.map(|m| NodeDescription {
                version: if m == 1 { "0.1.0" } else { "0.2.0" }.into(),
                feature_level_max: m,
                stats: Default::default(),
            }),
        }
    }

    #[test]
    fn the_level_rises_only_when_every_node_supports_it() {
        // Every node upgraded: raise.
        let all = [node("n1", Some(2)), node("n2", Some(2)), node("n3", Some(2))];
        assert_eq!(decide(1, &all), Decision::Raise(2));
        assert_eq!(decide(2, &all), Decision::Done);
        // Mid-upgrade: n3 still runs the previous release.
        let mixed = [node("n1", Some(2)), node("n2", Some(2)), node("n3", Some(1))];
        assert_eq!(
            decide(1, &mixed),
            Decision::Hold(vec!["n3 (release 0.1.0, supports level 1)".into()])
        );
        // A node that does not answer may be of any release: hold.
        let silent = [node("n1", Some(2)), node("n2", None)];
        assert_eq!(decide(1, &silent), Decision::Hold(vec!["n2 (did not answer)".into()]));
        // Nothing newer anywhere: nothing to do.
        let old = [node("n1", Some(1)), node("n2", Some(1))];
        assert_eq!(decide(1, &old), Decision::Done);
        // Never above what this release knows.
        let newer = [
            node("n1", Some(FEATURE_LEVEL_MAX + 3)),
            node("n2", Some(FEATURE_LEVEL_MAX + 3)),
        ];
        assert_eq!(decide(1, &newer), Decision::Raise(FEATURE_LEVEL_MAX));
    }
}
