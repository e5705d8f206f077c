//! Reports: after a view change every node tells each user's new manager
//! which of the user's fragments it holds (Porcupine's soft-state
//! reconstruction); a node that gets a user's first fragment outside its
//! manager's placement says so at once.

use std::collections::BTreeMap;

use tracing::debug;

use super::protocol::{Network, NodeId, REPORT_USERS_MAX, Request};
use super::{Replicator, live_nodes, lock, manager_of};

impl<N: Network> Replicator<N> {
    /// Asks the live peers whose full report for this view is missing to
    /// send it (their own report round may have run on another view, or
    /// failed). Returns how many were asked.
    pub async fn chase_reports(&self) -> usize {
        let missing = lock(&self.manager).reports_missing(&self.view());
        let calls = missing.iter().map(|&p| self.call(p, Request::ReportTo));
        futures::future::join_all(calls).await;
        missing.len()
    }

    /// Tells the managers of `users`, of whom this node held no fragment
    /// before, that it now does: a full report taken before the fragment
    /// landed (or sent to a former manager) would not show it.
    pub(super) async fn report_new_fragments(&self, users: Vec<String>) {
        if users.is_empty() {
            return;
        }
        let view = self.view();
        let mut by_manager: BTreeMap<NodeId, Vec<(String, u64, u64)>> = BTreeMap::new();
        for u in users {
            if let Some(m) = manager_of(&view, &u) {
                let bytes = self.store.usage_bytes(&u);
                by_manager.entry(m).or_default().push((u, 1, bytes));
            }
        }
        let calls = by_manager.into_iter().map(|(m, users)| {
            let req = Request::Report {
                users,
                epoch: view.epoch(),
                last: false,
            };
            self.call(m, req)
        });
        for r in futures::future::join_all(calls).await {
            if let Err(e) = r {
                debug!(error = %e, "new fragment not reported; the next report round carries it");
            }
        }
    }

    /// Sends this node's `(user, entries, bytes)` to the users' managers
    /// (only to `only` when given). Called after a view change.
    pub async fn report_to(&self, only: Option<NodeId>) -> usize {
        let view = self.view();
        let epoch = view.epoch();
        // Every live peer gets a full report, empty or not: it tells the
        // manager that its map has all of this node's fragments.
        let mut by_manager: BTreeMap<NodeId, Vec<(String, u64, u64)>> = match only {
            Some(m) => [(m, Vec::new())].into(),
            None => live_nodes(&view).map(|p| (p, Vec::new())).collect(),
        };
        for u in self.store.usage_async().await {
            if let Some(m) = manager_of(&view, &u.user)
                && only.is_none_or(|o| o == m)
            {
                by_manager.entry(m).or_default().push((u.user, u.entries, u.bytes));
            }
        }
        let mut sent = 0;
        let calls = by_manager.into_iter().map(|(m, users)| async move {
            let mut n = 0;
            let n_chunks = users.len().div_ceil(REPORT_USERS_MAX).max(1);
            for (i, chunk) in users
                .chunks(REPORT_USERS_MAX)
                .chain(users.is_empty().then_some(&[][..]))
                .enumerate()
            {
                let req = Request::Report {
                    users: chunk.to_vec(),
                    epoch,
                    last: i + 1 == n_chunks,
                };
                match self.call(m, req).await {
                    Ok(_) => n += chunk.len(),
                    Err(e) => {
                        debug!(manager = m, error = %e, "report not delivered");
                        break;
                    }
                }
            }
            n
        });
        for n in futures::future::join_all(calls).await {
            sent += n;
        }
        sent
    }

    /// Reports to every manager.
    pub async fn report_round(&self) -> usize {
        self.report_to(None).await
    }

    /// Asks every other live node to report what it holds of the users this
    /// node manages (after a start, when this node's maps are empty).
    pub async fn ask_reports(&self) {
        let calls = self.live_peers().into_iter().map(|p| self.call(p, Request::ReportTo));
        futures::future::join_all(calls).await;
    }
}
