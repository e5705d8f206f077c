//! AUTH PLAIN (RFC 4616) and LOGIN on submission (RFC 4954): the
//! challenge-response exchange. What a response means is the protocol
//! cores' one SASL decoder (`quill_proto::sasl`).

use quill_proto::sasl::{self, Credentials};
use quill_proto::smtp::{AUTH_LINE_BYTES_MAX, AuthResult, Reply};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::info;

use super::Session;
use crate::net::conn::{Line, trim_eol};
use crate::services::Auth;

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    /// AUTH; false ends the session.
    pub(super) async fn auth(&mut self, mechanism: u64, initial: String) -> std::io::Result<bool> {
        if let Err(r) = self.state.auth_check() {
            return self.send(r).await;
        }
        if !self.io.may_send_password(self.peer.ip()) {
            self.services.counters().plaintext_auth_refused.inc();
            return self.send(Reply::ok(quill_proto::smtp::REPLY_ENCRYPTION_REQUIRED)).await;
        }
        let creds: Option<Credentials> = if mechanism == smtp_proto::AUTH_PLAIN {
            let data = if initial.is_empty() {
                self.response(quill_proto::smtp::CHALLENGE_PLAIN).await?
            } else {
                sasl::decode_base64(initial.as_bytes()).ok()
            };
            data.and_then(|d| sasl::decode_plain(&d).ok())
        } else if mechanism == smtp_proto::AUTH_LOGIN {
            let user = if initial.is_empty() {
                self.response(quill_proto::smtp::CHALLENGE_USERNAME).await?
            } else {
                sasl::decode_base64(initial.as_bytes()).ok()
            };
            match user {
                Some(u) => self
                    .response(quill_proto::smtp::CHALLENGE_PASSWORD)
                    .await?
                    .and_then(|p| sasl::decode_login(&u, &p).ok()),
                None => None,
            }
        } else {
            return self
                .send(Reply::bad("504 5.5.4 Unrecognized authentication type (PLAIN, LOGIN)"))
                .await;
        };
        let Some(Credentials { user, password }) = creds else {
            return self
                .send(Reply::bad("501 5.5.2 Cannot decode the response (or cancelled)"))
                .await;
        };
        let result = match self.services.auth.authenticate(self.peer.ip(), &user, &password).await {
            Auth::Ok(record) => {
                tracing::Span::current().record("user", record.address.as_str());
                info!(user = %record.address, "submission login");
                AuthResult::Ok(record.address)
            }
            Auth::Failed => AuthResult::Failed,
            Auth::Blocked => AuthResult::Blocked,
        };
        let reply = self.state.auth_result(result);
        self.send(reply).await
    }

    /// One response line from the client after a 334 challenge, decoded;
    /// None: cancelled (`*`), malformed, or the client went away.
    async fn response(&mut self, challenge: &str) -> std::io::Result<Option<Vec<u8>>> {
        self.io.reply(&format!("334 {challenge}")).await?;
        self.io.flush().await?;
        let idle = self.services.limits().idle_timeout;
        match self.io.read_line(AUTH_LINE_BYTES_MAX, idle).await? {
            Line::Ok(l) => {
                let l = trim_eol(&l);
                if l == b"*" {
                    return Ok(None);
                }
                Ok(sasl::decode_base64(l).ok())
            }
            _ => Ok(None),
        }
    }
}
