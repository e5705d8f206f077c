//! The commands of every state, dispatched; logging in (LOGIN and
//! AUTHENTICATE PLAIN); and the authenticated state's dispatch to the
//! folder, mailbox and message commands.

use imap_next::imap_types::auth::AuthMechanism;
use imap_next::imap_types::command::{Command, CommandBody};
use imap_next::imap_types::core::{IString, NString, Tag};
use imap_next::imap_types::response::{Code, CommandContinuationRequest, Data, Status};
use quill_proto::imap::SESSION_AUTH_FAILURES_MAX;
use quill_proto::imap::reply::{bad, no, no_code, ok};
use quill_proto::sasl;
use tracing::debug;

use super::state::{Handler, Phase, Reply, Then};
use crate::services::Auth;

/// What an AUTHENTICATE does next.
#[derive(Debug)]
pub enum AuthStep {
    /// Ask for the (PLAIN) response.
    Continue(CommandContinuationRequest<'static>),
    /// Finish with the first response (a status), then the others.
    Finish(Reply),
}

impl Handler {
    /// One command (counted already by the driver); its responses.
    pub async fn command(&mut self, command: Command<'static>) -> Reply {
        if let Some(s) = crate::net::slots::watched() {
            // The command's name only: its arguments may hold a password.
            tracing::info!(
                target: "quill::watch",
                protocol = s.protocol,
                peer = %s.peer,
                user = s.user().as_deref().unwrap_or("-"),
                command = command.body.name(),
                "watched session"
            );
        }
        let tag = command.tag;
        let status = match command.body {
            CommandBody::Capability => {
                let caps = self.capabilities();
                self.data(Data::Capability(caps));
                ok(tag, None, "CAPABILITY completed")
            }
            CommandBody::Noop | CommandBody::Check => {
                // Told of changes: a NOOP that has none to show reads no
                // listing (see `Selected::must_look`).
                let look = match &mut self.phase {
                    Phase::Selected(sel) => sel.must_look(),
                    _ => false,
                };
                if look {
                    for d in self.sync().await {
                        self.data(d);
                    }
                }
                ok(tag, None, "completed")
            }
            CommandBody::Logout => {
                self.status(quill_proto::imap::reply::bye("Quill IMAP logging out"));
                self.status(ok(tag, None, "LOGOUT completed"));
                return self.reply(Then::Close);
            }
            CommandBody::StartTLS => {
                if self.tls {
                    bad(Some(tag), "TLS is already active")
                } else if !matches!(self.phase, Phase::NotAuthenticated) {
                    bad(Some(tag), "STARTTLS only before authentication")
                } else if self.services.env.tls.is_none() {
                    no(tag, None, "TLS not available")
                } else {
                    self.status(ok(tag, None, "begin TLS negotiation now"));
                    return self.reply(Then::StartTls);
                }
            }
            CommandBody::Login { username, password } => {
                if !matches!(self.phase, Phase::NotAuthenticated) {
                    bad(Some(tag), "already authenticated")
                } else if !self.password_ok() {
                    self.services.counters().plaintext_auth_refused.inc();
                    no_code(tag, "PRIVACYREQUIRED", "LOGIN needs TLS (STARTTLS) first")
                } else {
                    let user = String::from_utf8(username.as_ref().to_vec());
                    let pass = String::from_utf8(password.declassify().as_ref().to_vec());
                    match (user, pass) {
                        (Ok(user), Ok(pass)) => self.login(tag.clone(), &user, &pass).await,
                        _ => bad(Some(tag), "the user name and password must be UTF-8"),
                    }
                }
            }
            CommandBody::Id { .. } => {
                let params = vec![(
                    IString::try_from("name").expect("valid"),
                    NString(Some(IString::try_from("Quill").expect("valid"))),
                )];
                self.data(Data::Id {
                    parameters: Some(params),
                });
                ok(tag, None, "ID completed")
            }
            CommandBody::Enable { capabilities } => {
                if matches!(self.phase, Phase::NotAuthenticated) {
                    bad(Some(tag), "log in first")
                } else {
                    let enabled = self.enable(capabilities.as_ref());
                    self.data(Data::Enabled { capabilities: enabled });
                    ok(tag, None, "ENABLE completed")
                }
            }
            body => match self.user() {
                None => bad(Some(tag), "log in first"),
                Some(user) => self.authenticated(tag, user, body).await,
            },
        };
        self.done(status)
    }

    /// Checks a login; the tagged status (a BYE may be due after it).
    async fn login(&mut self, tag: Tag<'static>, user: &str, password: &str) -> Status<'static> {
        match self.services.auth.authenticate(self.peer.ip(), user, password).await {
            Auth::Blocked => {
                self.services.counters().limit_refusals.inc();
                self.bye_after = Some("too many authentication failures, try again later");
                no_code(tag, "UNAVAILABLE", "too many authentication failures")
            }
            Auth::Failed => {
                self.auth_failures += 1;
                if self.auth_failures >= SESSION_AUTH_FAILURES_MAX {
                    self.bye_after = Some("too many authentication failures");
                }
                no_code(tag, "AUTHENTICATIONFAILED", "invalid user name or password")
            }
            Auth::Ok(record) => {
                let Some(counted) = self.services.locks.imap_session(&record.mailbox()) else {
                    self.services.counters().limit_refusals.inc();
                    return no_code(tag, "LIMIT", "too many IMAP sessions for this user on this node");
                };
                self.counted = Some(counted);
                self.services.counters().imap_logins.inc();
                tracing::Span::current().record("user", record.address.as_str());
                debug!("imap login");
                self.phase = Phase::Authenticated { user: record.mailbox() };
                let caps = self.capabilities();
                ok(tag, Some(Code::Capability(caps)), "logged in")
            }
        }
    }

    /// AUTHENTICATE (counted already by the driver): only PLAIN, with or
    /// without an initial response (SASL-IR).
    pub async fn authenticate(
        &mut self,
        tag: Tag<'static>,
        mechanism: AuthMechanism<'static>,
        initial: Option<Vec<u8>>,
    ) -> AuthStep {
        if !matches!(self.phase, Phase::NotAuthenticated) {
            let r = self.done(bad(Some(tag), "already authenticated"));
            return AuthStep::Finish(r);
        }
        if !self.password_ok() {
            self.services.counters().plaintext_auth_refused.inc();
            let r = self.done(no_code(
                tag,
                "PRIVACYREQUIRED",
                "authentication needs TLS (STARTTLS) first",
            ));
            return AuthStep::Finish(r);
        }
        if mechanism != AuthMechanism::Plain {
            let r = self.done(no(tag, None, "unsupported mechanism: only PLAIN"));
            return AuthStep::Finish(r);
        }
        match initial {
            Some(data) => AuthStep::Finish(self.finish_plain(tag, &data).await),
            None => {
                self.authenticating = Some(tag);
                AuthStep::Continue(
                    CommandContinuationRequest::basic(None, " ")
                        .unwrap_or_else(|_| CommandContinuationRequest::basic(None, "go ahead").expect("valid")),
                )
            }
        }
    }

    /// The client's response to the AUTHENTICATE that waits (`None`:
    /// cancelled): the status that finishes it first.
    pub async fn authenticate_data(&mut self, data: Option<Vec<u8>>) -> Reply {
        let tag = self.authenticating.take().expect("an AUTHENTICATE is waiting");
        match data {
            Some(data) => self.finish_plain(tag, &data).await,
            None => self.done(bad(Some(tag), "authentication cancelled")),
        }
    }

    /// RFC 4616: `[authzid] NUL authcid NUL passwd` (already base64-decoded
    /// by the protocol layer).
    async fn finish_plain(&mut self, tag: Tag<'static>, data: &[u8]) -> Reply {
        let status = match sasl::decode_plain(data) {
            Ok(c) => self.login(tag, &c.user, &c.password).await,
            Err(_) => bad(Some(tag), "malformed PLAIN response"),
        };
        self.done(status)
    }

    /// Commands of the authenticated and selected states.
    async fn authenticated(&mut self, tag: Tag<'static>, user: String, body: CommandBody<'static>) -> Status<'static> {
        match body {
            CommandBody::Namespace => self.namespace(tag),
            CommandBody::GetQuotaRoot { mailbox } => self.get_quota_root(tag, &user, mailbox).await,
            CommandBody::GetQuota { root } => self.get_quota(tag, &user, &root).await,
            CommandBody::SetQuota { .. } => {
                no_code(tag, "NOPERM", "quotas are set by the operator (quill admin user quota)")
            }
            CommandBody::List {
                reference,
                mailbox_wildcard,
            } => self.list(tag, &user, &reference, &mailbox_wildcard, false),
            CommandBody::Lsub {
                reference,
                mailbox_wildcard,
            } => self.list(tag, &user, &reference, &mailbox_wildcard, true),
            CommandBody::Status { mailbox, item_names } => self.status_of(tag, &user, mailbox, &item_names).await,
            CommandBody::Select { mailbox, parameters } => self.select(tag, user, mailbox, false, parameters).await,
            CommandBody::Examine { mailbox, parameters } => self.select(tag, user, mailbox, true, parameters).await,
            CommandBody::Subscribe { mailbox } => self.subscribe(tag, &user, &mailbox).await,
            CommandBody::Unsubscribe { mailbox } => self.unsubscribe(tag, &user, &mailbox).await,
            CommandBody::Create { mailbox } => self.create(tag, &user, &mailbox).await,
            CommandBody::Delete { mailbox } => self.delete_folder(tag, &user, &mailbox).await,
            CommandBody::Rename { from, to } => self.rename(tag, &user, &from, &to).await,
            CommandBody::Append {
                mailbox,
                message,
                flags,
                date,
            } => {
                let folder = match self.folder(&user, &mailbox) {
                    Ok(f) => f,
                    Err(_) => return no(tag, Some(Code::TryCreate), "no such folder: CREATE it first"),
                };
                let bytes = match message {
                    imap_next::imap_types::extensions::binary::LiteralOrLiteral8::Literal(l) => {
                        l.into_inner().into_owned()
                    }
                    imap_next::imap_types::extensions::binary::LiteralOrLiteral8::Literal8(l) => l.data.into_owned(),
                };
                let arrival = date.map(|d| d.as_ref().timestamp_millis().max(0) as u64);
                self.append(tag, user, folder, bytes, flags, arrival).await
            }
            body => {
                if !matches!(self.phase, Phase::Selected(_)) {
                    return bad(Some(tag), "no folder selected");
                }
                self.selected(tag, body).await
            }
        }
    }

    /// Commands of the selected state.
    async fn selected(&mut self, tag: Tag<'static>, body: CommandBody<'static>) -> Status<'static> {
        match body {
            CommandBody::Unselect => {
                self.deselect();
                ok(tag, None, "UNSELECT completed")
            }
            CommandBody::Close => {
                let _ = self.expunge(None, false).await;
                self.deselect();
                ok(tag, None, "CLOSE completed")
            }
            CommandBody::Expunge => match self.expunge(None, true).await {
                Ok(()) => ok(tag, None, "EXPUNGE completed"),
                Err(why) => no(tag, None, why),
            },
            CommandBody::ExpungeUid { sequence_set } => match self.expunge(Some(sequence_set), true).await {
                Ok(()) => ok(tag, None, "UID EXPUNGE completed"),
                Err(why) => no(tag, None, why),
            },
            CommandBody::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } => match self.fetch_modifiers(modifiers, uid) {
                Ok(ask) => self.fetch(tag, sequence_set, macro_or_item_names, uid, ask).await,
                Err(why) => bad(Some(tag), why),
            },
            CommandBody::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } => match self.store_modifiers(modifiers) {
                Ok(since) => self.store(tag, sequence_set, kind, response, flags, uid, since).await,
                Err(why) => bad(Some(tag), why),
            },
            CommandBody::Search { criteria, uid, .. } => self.search(tag, criteria.as_ref(), uid).await,
            CommandBody::Copy {
                sequence_set,
                mailbox,
                uid,
            } => self.copy_or_move(tag, sequence_set, mailbox, uid, false).await,
            CommandBody::Move {
                sequence_set,
                mailbox,
                uid,
            } => self.copy_or_move(tag, sequence_set, mailbox, uid, true).await,
            other => bad(Some(tag), &format!("{} is not supported", other.name())),
        }
    }

    /// Back to the authenticated state (UNSELECT, CLOSE).
    fn deselect(&mut self) {
        let user = self.user().expect("selected");
        self.phase = Phase::Authenticated { user };
    }
}
