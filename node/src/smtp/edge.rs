//! The edge checks' hooks in an SMTP session (`--smtp` only: see
//! `crate::edge`).

use quill_proto::smtp::Reply;
use tokio::io::{AsyncRead, AsyncWrite};

use super::Session;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// The reply that takes the place of the greeting for a refused
    /// client (`--dnsbl-at connect`).
    pub(super) async fn edge_at_connect(&mut self) -> Option<String> {
        self.edge.as_mut()?.at_connect().await
    }

    /// The refusal of a recipient for a listed client, if it is one.
    pub(super) async fn edge_rcpt(&mut self, address: &str) -> Option<Reply> {
        let text = self.edge.as_mut()?.at_rcpt(address).await?;
        Some(Reply::ok(text))
    }

    /// Greylisting of a recipient about to be taken: the deferral, if
    /// this is a first try.
    pub(super) async fn edge_greylist(&mut self, address: &str) -> Option<Reply> {
        let check = self.edge.as_ref()?;
        let from = self.state.tx.as_ref().map(|t| t.mail_from.as_str()).unwrap_or_default();
        let s = &self.services;
        crate::edge::greylist::check(&s.edge, &*s.mail, check, from, address).await
    }
}
