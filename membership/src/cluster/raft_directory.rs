//! [`RaftDirectory`]: the user directory over this node's Raft.

use super::Membership;
use crate::command::{Command, CommandError, Response};
use crate::directory::{
    Directory, DirectoryCommand, DirectoryError, DirectoryFuture, Recipient, RoutesFuture, RoutesWriteError,
    UserRecord, UserSummary,
};
use crate::routes::{ExpandError, Expansion, Routes, RoutesCommand};

/// The user directory kept by Raft: the same [`Directory`] trait as
/// [`crate::LocalDirectory`]. Reads are local (this node's applied state);
/// a write is forwarded to the leader when this node does not lead and
/// resolves once committed and applied there.
#[derive(Debug, Clone)]
pub struct RaftDirectory {
    pub(super) m: Membership,
}

impl RaftDirectory {
    /// Commits a directory command. A refused command (unknown domain, user
    /// exists, …) is a committed no-op and returns its [`DirectoryError`];
    /// when no leader commits it in time: [`DirectoryError::Storage`].
    pub async fn write(&self, cmd: DirectoryCommand) -> Result<(), DirectoryError> {
        match self.m.write(Command::Directory(cmd)).await {
            Ok(Response { result: Ok(()), .. }) => Ok(()),
            Ok(Response {
                result: Err(CommandError::Directory(e)),
                ..
            }) => Err(e),
            Ok(Response { result: Err(e), .. }) => Err(DirectoryError::Storage(e.to_string())),
            Err(e) => Err(DirectoryError::Storage(format!("raft: {e}"))),
        }
    }
}

impl Directory for RaftDirectory {
    fn resolve(&self, address: &str) -> Recipient {
        self.m.inner.shared.read().state.directory.resolve(address)
    }

    fn user(&self, address: &str) -> Option<UserRecord> {
        self.m.inner.shared.read().state.directory.user(address)
    }

    fn domains(&self) -> Vec<String> {
        self.m.inner.shared.read().state.directory.domain_list()
    }

    fn users(&self) -> Vec<UserSummary> {
        self.m.inner.shared.read().state.directory.user_summaries()
    }

    fn postmaster_fallback(&self, domain: Option<&str>) -> Option<UserRecord> {
        self.m.inner.shared.read().state.directory.postmaster_fallback(domain)
    }

    fn apply(&self, cmd: DirectoryCommand) -> DirectoryFuture<'_> {
        Box::pin(self.write(cmd))
    }

    fn expand(&self, address: &str) -> Result<Expansion, ExpandError> {
        let shared = self.m.inner.shared.read();
        crate::routes::expand(&shared.state.directory, &shared.state.routes, address)
    }

    fn routes(&self) -> Routes {
        self.m.inner.shared.read().state.routes.clone()
    }

    fn srs_key(&self) -> Option<[u8; 32]> {
        self.m.inner.shared.read().state.routes.srs_key
    }

    fn taps_for(&self, address: &str) -> Vec<UserRecord> {
        let shared = self.m.inner.shared.read();
        let st = &shared.state;
        st.routes
            .taps_for(address)
            .into_iter()
            .filter_map(|a| st.directory.users.get(a).cloned())
            .collect()
    }

    fn sieve_script(&self, user: &str) -> Option<String> {
        self.m
            .inner
            .shared
            .read()
            .state
            .routes
            .active_sieve(user)
            .map(str::to_owned)
    }

    fn sieve_scripts(&self, user: &str) -> crate::routes::SieveScripts {
        let shared = self.m.inner.shared.read();
        crate::routes::normalize_user(user)
            .and_then(|u| shared.state.routes.sieve.get(&u).cloned())
            .unwrap_or_default()
    }

    fn apply_routes(&self, cmd: RoutesCommand) -> RoutesFuture<'_> {
        Box::pin(async move {
            match self.m.write(Command::Routes(cmd)).await {
                Ok(Response { result: Ok(()), .. }) => Ok(()),
                Ok(Response { result: Err(e), .. }) => Err(RoutesWriteError::Refused(e)),
                Err(e) => Err(RoutesWriteError::Unavailable(format!("raft: {e}"))),
            }
        })
    }
}
