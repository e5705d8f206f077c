//! An IMAP session's state as the handler keeps it: the phase (not
//! authenticated, authenticated, a folder selected), the counts that end
//! an abusive session, and the responses a command makes. No socket: the
//! driver sends what the handler returns.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use imap_next::imap_types::core::Tag;
use imap_next::imap_types::mailbox::Mailbox;
use imap_next::imap_types::response::{Code, Data, Status};
use quill_proto::imap::folders::{self, Folder};
use quill_proto::imap::keywords::Shown;
use quill_proto::imap::reply::{self, mailbox_as_bytes, nonexistent};
use replication::replica::Listed;

use crate::services::{ImapSession, Services};

/// One message of the selected folder.
#[derive(Debug, Clone)]
pub struct Msg {
    pub uid: u32,
    /// Its mod-sequence as the session last read it (RFC 7162).
    pub modseq: u64,
    pub listed: Listed,
    /// `\Recent` to this session (it took the message's claim).
    pub recent: bool,
}

impl quill_proto::imap::Message for Msg {
    fn uid(&self) -> u32 {
        self.uid
    }
    fn size(&self) -> u64 {
        self.listed.meta.size_bytes
    }
    fn arrival_ms(&self) -> u64 {
        self.listed.meta.arrival_ms
    }
    fn flags(&self) -> Vec<&str> {
        self.listed.meta.marks.set_flags().collect()
    }
    fn registers(&self) -> Vec<(&str, bool)> {
        self.listed
            .meta
            .marks
            .flags
            .iter()
            .map(|f| (f.name.as_str(), f.set))
            .collect()
    }
    fn has(&self, flag: &str) -> bool {
        self.listed.meta.marks.has(flag)
    }
    fn recent(&self) -> bool {
        self.recent
    }
    fn modseq(&self) -> u64 {
        self.modseq
    }
}

pub struct Selected {
    pub user: String,
    pub folder: Folder,
    pub read_only: bool,
    pub validity: u32,
    pub uid_next: u32,
    /// HIGHESTMODSEQ as of the session's last look.
    pub highest_modseq: u64,
    pub msgs: Vec<Msg>,
    /// The keywords the last FLAGS response listed.
    pub keywords: Shown,
    /// The UIDs `\Recent` to this session (`membership::recent`).
    pub recent: std::collections::HashSet<u32>,
    /// The count the last RECENT response gave: RFC 3501 7.3.2 sends
    /// RECENT whenever it changes, an expunge of a recent message too.
    pub told_recent: usize,
    /// Changes to the mailbox, told (`replication::replica::watch`): a
    /// NOOP reads a listing only when one was told, while a message told
    /// to be coming may still show, or once the safety look is due;
    /// `None` where changes are not told (every NOOP reads one).
    pub watch: Option<replication::replica::watch::Subscription>,
    /// When the session last read a listing.
    pub looked: std::time::Instant,
    /// Until when a message told to be coming may still show.
    pub coming_until: Option<std::time::Instant>,
}

impl Selected {
    /// Whether a NOOP must read a listing (see [`Selected::watch`]).
    pub fn must_look(&mut self) -> bool {
        use replication::replica::watch::{SAFETY_LOOK, SOON_CHECKS};
        let now = std::time::Instant::now();
        let Some(w) = self.watch.as_mut().filter(|w| w.told()) else {
            return true;
        };
        if let Some(change) = w.take_change() {
            if change.soon {
                self.coming_until = Some(now + SOON_CHECKS[SOON_CHECKS.len() - 1]);
            }
            return true;
        }
        self.coming_until.is_some_and(|t| now < t) || now.duration_since(self.looked) >= SAFETY_LOOK
    }

    /// A RECENT response when the session's count moved since it was last
    /// told (after new mail, or the expunge of a recent message).
    pub fn recent_news(&mut self) -> Option<imap_next::imap_types::response::Data<'static>> {
        let present: std::collections::HashSet<u32> = self.msgs.iter().map(|m| m.uid).collect();
        self.recent.retain(|u| present.contains(u));
        (self.recent.len() != self.told_recent).then(|| {
            self.told_recent = self.recent.len();
            imap_next::imap_types::response::Data::Recent(self.told_recent as u32)
        })
    }
}

pub enum Phase {
    NotAuthenticated,
    Authenticated { user: String },
    Selected(Box<Selected>),
}

/// One response of a command, in the order it is sent.
#[derive(Debug)]
pub enum Response {
    Data(Data<'static>),
    Status(Status<'static>),
}

/// What the driver does once a command's responses are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    Continue,
    /// Start TLS once the last response is written (STARTTLS's OK).
    StartTls,
    /// Close once the last response (a BYE) is written.
    Close,
}

/// A command's responses and what follows them.
#[derive(Debug)]
pub struct Reply {
    pub responses: Vec<Response>,
    pub then: Then,
}

/// A response to a command that failed before it started (no such
/// folder, ...): made with the command's tag.
pub type Refusal = fn(Tag<'static>) -> Status<'static>;

/// One IMAP session's state and the services it reaches mail through.
pub struct Handler {
    pub(super) services: Arc<Services>,
    pub(super) peer: SocketAddr,
    pub(super) phase: Phase,
    /// Whether the connection is under TLS.
    pub(super) tls: bool,
    n_commands: u32,
    n_bad: u32,
    pub(super) auth_failures: u32,
    /// An AUTHENTICATE waiting for its (PLAIN) response.
    pub(super) authenticating: Option<Tag<'static>>,
    /// This session counted against its user's limit (after login).
    pub(super) counted: Option<ImapSession>,
    /// Responses made so far by the command being handled.
    out: Vec<Response>,
    /// Say BYE (with this reason) after the command's tagged reply.
    pub(super) bye_after: Option<&'static str>,
    /// Per folder id, the messages `\Recent` to this session: they stay
    /// so when it selects the folder again (the claims are taken once).
    pub(super) recent_held: std::collections::HashMap<String, std::collections::HashSet<[u8; 16]>>,
    /// CONDSTORE enabled (RFC 7162 3.1: by ENABLE or by the first command
    /// that uses it): responses with FLAGS carry MODSEQ.
    pub(super) condstore: bool,
    /// QRESYNC enabled (ENABLE QRESYNC): expunges are told as VANISHED.
    pub(super) qresync: bool,
}

impl Handler {
    pub fn new(services: Arc<Services>, peer: SocketAddr, tls: bool) -> Handler {
        Handler {
            services,
            peer,
            phase: Phase::NotAuthenticated,
            tls,
            n_commands: 0,
            n_bad: 0,
            auth_failures: 0,
            authenticating: None,
            counted: None,
            out: Vec::new(),
            bye_after: None,
            recent_held: Default::default(),
            condstore: false,
            qresync: false,
        }
    }

    /// How changes are told to this session (what it enabled).
    pub(super) fn tell(&self) -> quill_proto::imap::sync::Tell {
        quill_proto::imap::sync::Tell {
            modseq: self.condstore,
            vanished: self.qresync,
        }
    }

    /// TLS is on (after STARTTLS).
    pub fn tls_started(&mut self) {
        self.tls = true;
    }

    pub(super) fn data(&mut self, d: Data<'static>) {
        self.out.push(Response::Data(d));
    }

    pub(super) fn status(&mut self, s: Status<'static>) {
        self.out.push(Response::Status(s));
    }

    pub(super) fn untagged_ok(&mut self, code: Code<'static>, t: &str) {
        self.status(reply::untagged_ok(code, t));
    }

    /// The responses made so far, and what follows them.
    pub(super) fn reply(&mut self, then: Then) -> Reply {
        self.announce_keywords();
        Reply {
            responses: std::mem::take(&mut self.out),
            then,
        }
    }

    /// What the session is told while it idles: the folder's changes, with
    /// their new keywords announced.
    pub async fn idle_updates(&mut self) -> Vec<Response> {
        for d in self.sync().await {
            self.data(d);
        }
        self.announce_keywords();
        std::mem::take(&mut self.out)
    }

    /// A FETCH may show a keyword only after a FLAGS response listed it
    /// (RFC 3501 7.2.6): FLAGS and PERMANENTFLAGS go before the first
    /// response that shows a new one.
    fn announce_keywords(&mut self) {
        let Phase::Selected(sel) = &mut self.phase else {
            return;
        };
        if !self
            .out
            .iter()
            .any(|r| matches!(r, Response::Data(Data::Fetch { .. } | Data::Flags(_))))
        {
            return;
        }
        let mut out = Vec::with_capacity(self.out.len() + 2);
        for r in self.out.drain(..) {
            match &r {
                Response::Data(Data::Flags(f)) => sel.keywords.told(f),
                Response::Data(d) if !sel.keywords.new_in(d).is_empty() => {
                    let (flags, permanent) = sel.keywords.announcement();
                    out.push(Response::Data(flags));
                    out.push(Response::Status(permanent));
                }
                _ => {}
            }
            out.push(r);
        }
        self.out = out;
    }

    /// Ends a command with its tagged status, and a BYE if one is due.
    pub(super) fn done(&mut self, status: Status<'static>) -> Reply {
        self.status(status);
        self.then_bye()
    }

    /// The responses so far, then the BYE that was due, if one was.
    pub(super) fn then_bye(&mut self) -> Reply {
        match self.bye_after.take() {
            Some(why) => self.bye(why),
            None => self.reply(Then::Continue),
        }
    }

    /// The responses so far, then BYE: the session ends.
    pub fn bye(&mut self, why: &str) -> Reply {
        // A session the server ends says why in the log (LOGOUT does not
        // come here).
        tracing::info!(reason = why, "imap session closed by the server");
        self.status(reply::bye(why));
        self.reply(Then::Close)
    }

    /// Counts a command; a BYE when the session has had too many.
    pub fn count_command(&mut self) -> Option<Reply> {
        self.n_commands += 1;
        if self.n_commands > self.services.limits().commands_max {
            self.services.counters().limit_refusals.inc();
            return Some(self.bye("too many commands in one session"));
        }
        None
    }

    /// Counts a bad command (after its BAD, if any, was pushed); a BYE
    /// when the session has had too many.
    pub fn count_bad(&mut self) -> Reply {
        self.n_bad += 1;
        if self.n_bad >= self.services.limits().bad_commands_max {
            self.services.counters().limit_refusals.inc();
            return self.bye("too many bad commands");
        }
        self.reply(Then::Continue)
    }

    /// A line the protocol layer could not take: BAD (with its tag, if it
    /// had one), counted.
    pub fn malformed(&mut self, discarded: &[u8], why: &str) -> Reply {
        let tag = reply::parse_tag(discarded);
        self.status(reply::bad(tag, why));
        self.count_bad()
    }

    /// A literal over the limit (refused with BAD by the protocol layer).
    pub fn literal_refused(&mut self) -> Reply {
        self.services.counters().limit_refusals.inc();
        self.count_bad()
    }

    /// A command line over the limit: the session ends.
    pub fn command_too_long(&mut self) -> Reply {
        self.services.counters().limit_refusals.inc();
        self.bye("command line too long")
    }

    pub(crate) fn user(&self) -> Option<String> {
        match &self.phase {
            Phase::NotAuthenticated => None,
            Phase::Authenticated { user } => Some(user.clone()),
            Phase::Selected(s) => Some(s.user.clone()),
        }
    }

    /// Whether IDLE may start (a folder is selected).
    pub fn can_idle(&self) -> bool {
        matches!(self.phase, Phase::Selected(_))
    }

    /// The capabilities to announce now.
    pub fn capabilities(
        &self,
    ) -> imap_next::imap_types::core::Vec1<imap_next::imap_types::response::Capability<'static>> {
        let env = &self.services.env;
        let authenticated = !matches!(self.phase, Phase::NotAuthenticated);
        reply::capabilities(
            !self.tls && env.tls.is_some(),
            self.services.limits().plaintext_auth.allows(self.tls, self.peer.ip()),
            authenticated,
            self.services.uids.modseqs_kept(),
        )
    }

    /// Whether a password may be sent on this connection now.
    pub(super) fn password_ok(&self) -> bool {
        self.services.limits().plaintext_auth.allows(self.tls, self.peer.ip())
    }

    /// A new folder's id: unique like a message id (time, node nonce,
    /// counter).
    pub(super) fn new_folder_id(&self) -> [u8; 16] {
        self.services.mail.new_message_id(crate::time::now_ms()).0
    }

    /// The folder a client's mailbox name names, if it exists.
    pub(super) fn folder(&self, user: &str, mailbox: &Mailbox<'_>) -> Result<Folder, Refusal> {
        let Ok(name) = folders::canonical(mailbox_as_bytes(mailbox)) else {
            return Err(nonexistent);
        };
        if name == folders::INBOX {
            return Ok(Folder::inbox());
        }
        folders::resolve(&self.services.uids.names(&folders::scope(user)), &name).ok_or(nonexistent as _)
    }

    /// A name for a new folder (CREATE, the target of RENAME): canonical
    /// and not taken; with the user's folders as they are now.
    #[allow(clippy::result_large_err)]
    pub(super) fn free_name(
        &self,
        tag: &Tag<'static>,
        user: &str,
        mailbox: &Mailbox<'_>,
    ) -> Result<(String, BTreeMap<String, [u8; 16]>), Status<'static>> {
        let name = folders::canonical(mailbox_as_bytes(mailbox)).map_err(|why| reply::no(tag.clone(), None, why))?;
        let names = self.services.uids.names(&folders::scope(user));
        if name == folders::INBOX || names.contains_key(&name) {
            return Err(reply::no_code(
                tag.clone(),
                "ALREADYEXISTS",
                "that folder already exists",
            ));
        }
        Ok((name, names))
    }

    /// The levels above `name` that do not exist, with new ids (CREATE and
    /// RENAME make them, RFC 3501 6.3.3).
    pub(super) fn missing_superiors(&self, name: &str, names: &BTreeMap<String, [u8; 16]>) -> Vec<(String, [u8; 16])> {
        folders::superiors(name)
            .into_iter()
            .filter(|s| s != folders::INBOX && !names.contains_key(s))
            .map(|s| (s, self.new_folder_id()))
            .collect()
    }

    /// The messages of one of `user`'s folders as listed now (every
    /// node's fragments).
    pub(super) async fn folder_messages(&self, user: &str, folder: &Folder) -> Vec<Listed> {
        let mut listed = self.services.mail.mailbox(user).await;
        listed.retain(|l| l.meta.folder == folder.id);
        listed
    }

    /// A refused Raft change (a limit, or a race with another session).
    pub(super) fn refused(&self, tag: Tag<'static>, e: &anyhow::Error) -> Status<'static> {
        let why = e.to_string();
        tracing::debug!(error = %why, "imap: folder change refused");
        reply::refused(tag, &why)
    }
}
