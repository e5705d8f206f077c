//! SMTP (RFC 5321), LMTP (RFC 2033) and submission (RFC 6409) rules: a
//! session's state, and what it answers to each command, as functions
//! from the state and the command to a [`Reply`]. What needs the
//! directory, the store or the clock (who a recipient is, a quota, the
//! sending allowance, storing the message) is the node's; it asks these
//! rules before and after.

use smtp_proto::{Error as ParseError, MAIL_SMTPUTF8, MailFrom};

use crate::data::{DATA_LINE_BYTES_MAX, Refusal};
use crate::message::{clean_name, rfc5322_date};

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with CRLF.
pub const SMTP_COMMAND_BYTES_MAX: usize = 512;
/// Longest AUTH response line (base64 of a PLAIN response).
pub const AUTH_LINE_BYTES_MAX: usize = 12 * 1024;
/// Failed AUTH attempts in one submission session before it is closed.
pub const AUTH_FAILURES_MAX: u32 = 3;
/// Unknown recipients in one session answered at once; past this each
/// `550` waits (Postfix's error sleep), so that guessing addresses is slow.
pub const UNKNOWN_RCPT_FREE: u32 = 3;
/// Unknown recipients that end one session with `421`.
pub const UNKNOWN_RCPT_SESSION_MAX: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Smtp,
    Lmtp,
    /// Message submission (RFC 6409, `--submission`): AUTH required; the
    /// envelope sender and `From:` must be the authenticated user.
    Submission,
}

/// One reply line (or lines, CRLF-joined) and what it means for the
/// session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub text: String,
    /// Counts as a bad command (enough of them end the session).
    pub bad: bool,
    /// A limit refused it (`quill_limit_refusals_total`).
    pub limit: bool,
    /// The session ends after it.
    pub close: bool,
}

impl Reply {
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply {
            text: text.into(),
            bad: false,
            limit: false,
            close: false,
        }
    }

    pub fn bad(text: impl Into<String>) -> Reply {
        Reply {
            bad: true,
            ..Reply::ok(text)
        }
    }

    pub fn limit(text: impl Into<String>) -> Reply {
        Reply {
            limit: true,
            ..Reply::ok(text)
        }
    }

    pub fn close(mut self) -> Reply {
        self.close = true;
        self
    }
}

/// The reply to a command line smtp-proto could not parse.
pub fn parse_error(e: ParseError) -> Reply {
    Reply::bad(match e {
        ParseError::UnknownCommand => "500 5.5.1 Command unrecognized".to_owned(),
        ParseError::SyntaxError { syntax } => format!("501 5.5.4 Syntax: {syntax}"),
        ParseError::InvalidSenderAddress => "501 5.1.7 Bad sender address syntax".to_owned(),
        ParseError::InvalidRecipientAddress => "501 5.1.3 Bad recipient address syntax".to_owned(),
        ParseError::InvalidParameter { param } => format!("501 5.5.4 Invalid parameter {param}"),
        ParseError::UnsupportedParameter { param } => {
            format!("555 5.5.4 Unsupported parameter {}", clean_name(&param))
        }
        _ => "500 5.5.2 Syntax error".to_owned(),
    })
}

pub const REPLY_UTF8_NEEDS_SMTPUTF8: &str = "553 5.6.7 A UTF-8 address needs the SMTPUTF8 parameter (RFC 6531)";
pub const REPLY_NEED_MAIL: &str = "503 5.5.1 Need MAIL command first";
pub const REPLY_HELP: &str =
    "214-2.0.0 Commands: EHLO HELO LHLO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT\r\n214 2.0.0 End of HELP";
pub const REPLY_VRFY: &str = "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery";
pub const REPLY_DATA_GO_AHEAD: &str = "354 Start mail input; end with <CRLF>.<CRLF>";
pub const REPLY_STORE_UNAVAILABLE: &str = "451 4.3.0 Mail store unavailable, try again later";
pub const REPLY_ENCRYPTION_REQUIRED: &str =
    "538 5.7.11 Encryption required for requested authentication mechanism (STARTTLS first)";
/// AUTH's challenges (RFC 4954): PLAIN's empty one, LOGIN's two.
pub const CHALLENGE_PLAIN: &str = "";
pub const CHALLENGE_USERNAME: &str = "VXNlcm5hbWU6";
pub const CHALLENGE_PASSWORD: &str = "UGFzc3dvcmQ6";

/// A mail transaction, from MAIL to the end of DATA.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub mail_from: String,
    /// `MAIL FROM ... SMTPUTF8` (RFC 6531): UTF-8 addresses allowed.
    pub smtputf8: bool,
    /// Accepted recipients in RCPT order, without duplicates (but for LMTP,
    /// which owes one reply per RCPT).
    pub rcpts: Vec<Rcpt>,
    /// Recipients in other domains (submission only): the outbound queue's.
    pub remote: Vec<String>,
    /// Remote addresses local recipients forward to (aliases): queued
    /// with the sender rewritten (SRS) and `Delivered-To:` added.
    pub forward: Vec<String>,
}

/// One accepted local recipient: the address a RCPT named and where its
/// mail goes (an alias names several mailboxes, or forwards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rcpt {
    /// The normalized address as named (replies, headers).
    pub address: String,
    /// Where its copies are stored: one per user it reaches.
    pub dests: Vec<Dest>,
    /// Whether some of its mail is forwarded to `Transaction::forward`.
    pub forwards: bool,
}

/// One user a recipient reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dest {
    /// The user's normalized address (their Sieve script, vacation).
    pub user: String,
    /// Where their mail is stored.
    pub mailbox: String,
    /// The sub-address tag they were named by (`user+tag@`), if any.
    pub tag: Option<String>,
    /// A tap's archive copy: stored as received, no filter runs.
    pub tap: bool,
}

impl Rcpt {
    /// A user named directly.
    pub fn user(address: impl Into<String>, mailbox: impl Into<String>) -> Rcpt {
        let address = address.into();
        Rcpt {
            dests: vec![Dest {
                user: address.clone(),
                mailbox: mailbox.into(),
                tag: None,
                tap: false,
            }],
            address,
            forwards: false,
        }
    }
}

/// What the connection offers now, for EHLO and AUTH.
#[derive(Debug, Clone, Copy)]
pub struct Offer {
    /// STARTTLS can be started (TLS set up and not on yet).
    pub starttls: bool,
    /// A password may be sent on this connection now.
    pub password: bool,
    /// The largest message (`SIZE`).
    pub size: usize,
}

/// One SMTP, LMTP or submission session's state.
#[derive(Debug)]
pub struct State {
    pub mode: Mode,
    /// This server's name (greeting, EHLO, `Received:`).
    pub me: String,
    pub helo: Option<String>,
    pub esmtp: bool,
    pub tx: Option<Transaction>,
    /// Unknown recipients named in this session.
    pub n_unknown: u32,
    /// Submission: the authenticated user's address.
    pub authed: Option<String>,
    pub auth_failures: u32,
    /// Submission: the addresses a user may send as besides their own.
    pub send_as: std::sync::Arc<crate::send_as::SendAs>,
}

impl State {
    pub fn new(mode: Mode, me: String) -> State {
        State {
            mode,
            me,
            helo: None,
            esmtp: false,
            tx: None,
            n_unknown: 0,
            authed: None,
            auth_failures: 0,
            send_as: Default::default(),
        }
    }

    /// The greeting.
    pub fn greeting(&self) -> String {
        let proto = if self.mode == Mode::Lmtp { "LMTP" } else { "ESMTP" };
        format!("220 {} {proto} Quill ready", self.me)
    }

    fn lmtp(&self) -> bool {
        self.mode == Mode::Lmtp
    }

    /// EHLO, HELO or LHLO (`verb` as the client spelled it).
    pub fn hello(&mut self, verb: &[u8], host: &str, offer: Offer) -> Reply {
        let (is_lhlo, is_helo) = (verb.eq_ignore_ascii_case(b"LHLO"), verb.eq_ignore_ascii_case(b"HELO"));
        if self.lmtp() != is_lhlo {
            let want = if self.lmtp() { "LHLO" } else { "EHLO or HELO" };
            return Reply::bad(format!("500 5.5.1 This service wants {want}"));
        }
        self.tx = None;
        self.helo = Some(clean_name(host));
        self.esmtp = !is_helo;
        let me = &self.me;
        if is_helo {
            return Reply::ok(format!("250 {me}"));
        }
        let size = offer.size;
        let starttls = if offer.starttls { "250-STARTTLS\r\n" } else { "" };
        // RFC 4954: AUTH only where a password may be sent.
        let auth = if self.mode == Mode::Submission && self.authed.is_none() && offer.password {
            "250-AUTH PLAIN LOGIN\r\n"
        } else {
            ""
        };
        Reply::ok(format!(
            "250-{me}\r\n250-PIPELINING\r\n250-SIZE {size}\r\n250-8BITMIME\r\n\
             {starttls}{auth}250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 HELP"
        ))
    }

    /// MAIL FROM.
    pub fn mail(&mut self, from: &MailFrom<std::borrow::Cow<'_, str>>, message_bytes_max: usize) -> Reply {
        if self.helo.is_none() {
            let hello = if self.lmtp() { "LHLO" } else { "EHLO/HELO" };
            return Reply::ok(format!("503 5.5.1 Send {hello} first"));
        }
        if self.mode == Mode::Submission && self.authed.is_none() {
            return Reply::ok("530 5.7.0 Authentication required");
        }
        if self.mode == Mode::Submission
            && !self
                .authed
                .as_deref()
                .is_some_and(|a| self.send_as.allows(a, &from.address))
        {
            return Reply::ok("553 5.7.1 Sender address not owned by the authenticated user");
        }
        if self.tx.is_some() {
            return Reply::ok("503 5.5.1 Sender already specified");
        }
        if from.size > message_bytes_max {
            return Reply::limit("552 5.3.4 Message size exceeds fixed maximum message size");
        }
        if !from.address.is_ascii() && from.flags & MAIL_SMTPUTF8 == 0 {
            return Reply::ok(REPLY_UTF8_NEEDS_SMTPUTF8);
        }
        self.tx = Some(Transaction {
            mail_from: from.address.chars().filter(|c| !c.is_control()).take(256).collect(),
            smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
            rcpts: Vec::new(),
            remote: Vec::new(),
            forward: Vec::new(),
        });
        Reply::ok("250 2.1.0 Sender ok")
    }

    /// What RCPT TO is answered before anyone is asked who `address` is.
    pub fn rcpt_check(&self, address: &str, recipients_max: usize) -> Result<(), Reply> {
        let Some(tx) = &self.tx else {
            return Err(Reply::ok(REPLY_NEED_MAIL));
        };
        if tx.rcpts.len() + tx.remote.len() >= recipients_max {
            return Err(Reply::limit("452 4.5.3 Too many recipients"));
        }
        if !address.is_ascii() && !tx.smtputf8 {
            return Err(Reply::ok(REPLY_UTF8_NEEDS_SMTPUTF8));
        }
        Ok(())
    }

    /// A local recipient accepted: one entry per address, however often it
    /// is named (LMTP keeps duplicates: it owes one reply per RCPT), with
    /// the remote addresses it forwards to.
    pub fn add_local(&mut self, rcpt: Rcpt, forward: Vec<String>) -> Reply {
        let lmtp = self.lmtp();
        if let Some(tx) = self.tx.as_mut()
            && (lmtp || !tx.rcpts.iter().any(|r| r.address == rcpt.address))
        {
            tx.rcpts.push(rcpt);
            for f in forward {
                if !tx.forward.contains(&f) {
                    tx.forward.push(f);
                }
            }
        }
        Reply::ok("250 2.1.5 Recipient ok")
    }

    /// A remote recipient accepted for the outbound queue (submission).
    pub fn add_remote(&mut self, address: &str) -> Reply {
        let address: String = address.chars().filter(|c| !c.is_control()).take(320).collect();
        if let Some(tx) = self.tx.as_mut()
            && !tx.remote.contains(&address)
        {
            tx.remote.push(address);
        }
        Reply::ok("250 2.1.5 Recipient ok (queued for remote delivery)")
    }

    /// An unknown recipient: `550`, and whether to wait before saying so
    /// (after the first few) and whether the session ends (directory
    /// harvesting).
    pub fn unknown_recipient(&mut self) -> (bool, Reply) {
        self.n_unknown += 1;
        let delay = self.n_unknown > UNKNOWN_RCPT_FREE;
        let reply = if self.n_unknown >= UNKNOWN_RCPT_SESSION_MAX {
            Reply {
                limit: true,
                ..Reply::ok("550 5.1.1 No such user here\r\n421 4.7.0 Too many unknown recipients, closing connection")
            }
            .close()
        } else {
            Reply::ok("550 5.1.1 No such user here")
        };
        (delay, reply)
    }

    /// DATA before the message: the recipients to store for, or the reply.
    pub fn data_check(&self) -> Result<Vec<Rcpt>, Reply> {
        match &self.tx {
            None => Err(Reply::ok(REPLY_NEED_MAIL)),
            Some(tx) if tx.rcpts.is_empty() && tx.remote.is_empty() => Err(Reply::ok("554 5.5.1 No valid recipients")),
            Some(tx) => Ok(tx.rcpts.clone()),
        }
    }

    /// Whether the transaction names remote recipients (submission's own,
    /// not forwards).
    pub fn has_remote(&self) -> bool {
        self.tx.as_ref().is_some_and(|t| !t.remote.is_empty())
    }

    /// RSET.
    pub fn rset(&mut self) -> Reply {
        self.tx = None;
        Reply::ok("250 2.0.0 Ok")
    }

    /// STARTTLS before the handshake: the reply, and whether to start it.
    pub fn starttls(&self, line: &[u8], tls_on: bool, offered: bool) -> (bool, Reply) {
        if crate::line::trim_eol(line).len() != b"STARTTLS".len() {
            return (false, Reply::bad("501 5.5.4 Syntax: STARTTLS takes no parameters"));
        }
        if tls_on {
            return (false, Reply::bad("503 5.5.1 TLS already active"));
        }
        if !offered {
            return (false, Reply::ok("454 4.7.0 TLS not available"));
        }
        (true, Reply::ok("220 2.0.0 Ready to start TLS"))
    }

    /// TLS is on (RFC 3207): the session starts over, as if just connected.
    pub fn tls_started(&mut self) {
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.authed = None;
    }

    /// AUTH before its exchange: `Err` with the reply when it may not be
    /// run now (then, where a password may not be sent in the clear,
    /// [`REPLY_ENCRYPTION_REQUIRED`]).
    pub fn auth_check(&self) -> Result<(), Reply> {
        if self.authed.is_some() {
            return Err(Reply::ok("503 5.5.1 Already authenticated"));
        }
        if self.tx.is_some() {
            return Err(Reply::ok("503 5.5.1 AUTH not allowed during a mail transaction"));
        }
        Ok(())
    }

    /// The outcome of the password check of an AUTH.
    pub fn auth_result(&mut self, result: AuthResult) -> Reply {
        match result {
            AuthResult::Ok(address) => {
                self.authed = Some(address);
                Reply::ok("235 2.7.0 Authentication successful")
            }
            AuthResult::Failed => {
                self.auth_failures += 1;
                if self.auth_failures >= AUTH_FAILURES_MAX {
                    Reply::ok(
                        "535 5.7.8 Authentication credentials invalid\r\n\
                         421 4.7.0 Too many authentication failures, closing connection",
                    )
                    .close()
                } else {
                    Reply::ok("535 5.7.8 Authentication credentials invalid")
                }
            }
            AuthResult::Blocked => Reply::limit("421 4.7.0 Too many authentication failures, try again later").close(),
        }
    }

    /// The `with` of the `Received:` header (RFC 3848).
    pub fn with_keyword(&self, tls: bool) -> &'static str {
        match (self.mode, self.esmtp, tls) {
            (Mode::Lmtp, _, false) => "LMTP",
            (Mode::Lmtp, _, true) => "LMTPS",
            (Mode::Smtp, true, false) => "ESMTP",
            (Mode::Smtp, true, true) => "ESMTPS",
            (Mode::Smtp, false, _) => "SMTP",
            (Mode::Submission, _, false) => "ESMTPA",
            (Mode::Submission, _, true) => "ESMTPSA",
        }
    }

    /// The `Received:` header this node prepends: `tls` describes the
    /// connection's TLS, if on; `ip` the client's address.
    pub fn received_header(&self, ip: &str, tls: Option<&str>, id: &str, rcpts: &[&str], arrival_ms: u64) -> Vec<u8> {
        let with = self.with_keyword(tls.is_some());
        let using = tls.map(|t| format!(" (using {t})")).unwrap_or_default();
        let helo = self.helo.as_deref().unwrap_or("unknown");
        let for_clause = match rcpts {
            [one] => format!("\r\n\tfor <{one}>"),
            _ => String::new(),
        };
        format!(
            "Received: from {helo} ({ip}){using}\r\n\tby {me} (Quill) with {with} id {id}{for_clause};\r\n\t{date}\r\n",
            me = self.me,
            date = rfc5322_date(arrival_ms / 1000),
        )
        .into_bytes()
    }
}

/// What a password check said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthResult {
    /// The user's address.
    Ok(String),
    Failed,
    /// Too many failures lately.
    Blocked,
}

/// The reply to a message refused after its end.
pub fn refusal_reply(why: Refusal) -> String {
    match why {
        Refusal::TooBig => "552 5.3.4 Message size exceeds fixed maximum message size".to_owned(),
        Refusal::LineTooLong => {
            format!("500 5.5.2 Message has a line longer than {DATA_LINE_BYTES_MAX} octets (CRLF included)")
        }
        Refusal::BareLineEnd => {
            "500 5.5.2 Message has a bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)".to_owned()
        }
        Refusal::NoMemory => "452 4.3.1 Insufficient system resources, try again later".to_owned(),
    }
}

/// The recipients of a transaction as stored (one copy per mailbox) and
/// as named in the `Received:` header (one per address), each sorted and
/// without duplicates.
pub fn unique_recipients(rcpts: &[Rcpt]) -> (Vec<String>, Vec<&str>) {
    let mut mailboxes: Vec<String> = rcpts
        .iter()
        .flat_map(|r| r.dests.iter().map(|d| d.mailbox.clone()))
        .collect();
    mailboxes.sort();
    mailboxes.dedup();
    let mut addresses: Vec<&str> = rcpts.iter().map(|r| r.address.as_str()).collect();
    addresses.sort_unstable();
    addresses.dedup();
    (mailboxes, addresses)
}

/// The reply to the end of DATA: SMTP's one for the transaction (a partial
/// failure must be retried for everyone: the stored copies of this
/// attempt stay, a retry may duplicate them, never lose them); LMTP's one
/// per recipient, `stored(mailbox)` saying whose copies are on disk and
/// `forwarded` whether the forwarded copy is queued.
pub fn data_reply(
    mode: Mode,
    id: &str,
    all_stored: bool,
    rcpts: &[Rcpt],
    stored: impl Fn(&str) -> bool,
    forwarded: bool,
) -> String {
    match mode {
        Mode::Smtp | Mode::Submission if all_stored => format!("250 2.0.0 Ok: stored as {id}"),
        Mode::Smtp | Mode::Submission => REPLY_STORE_UNAVAILABLE.to_owned(),
        Mode::Lmtp => rcpts
            .iter()
            .map(|r| {
                let addr = &r.address;
                if r.dests.iter().all(|d| stored(&d.mailbox)) && (forwarded || !r.forwards) {
                    format!("250 2.0.0 <{addr}> Ok: stored as {id}")
                } else {
                    format!("451 4.3.0 <{addr}> Mail store unavailable, try again later")
                }
            })
            .collect::<Vec<_>>()
            .join("\r\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smtp_proto::Request;

    fn offer() -> Offer {
        Offer {
            starttls: true,
            password: true,
            size: 1000,
        }
    }

    fn mail(s: &mut State, line: &str) -> Reply {
        let line = format!("{line}\r\n");
        match Request::parse(&mut line.as_bytes().iter()) {
            Ok(Request::Mail { from }) => s.mail(&from, 1000),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_transaction_in_order() {
        let mut s = State::new(Mode::Smtp, "mx.test".into());
        assert!(s.greeting().starts_with("220 mx.test ESMTP"));
        assert!(
            mail(&mut s, "MAIL FROM:<a@b.test>")
                .text
                .starts_with("503 5.5.1 Send EHLO/HELO")
        );
        let r = s.hello(b"EHLO", "c.test", offer());
        assert!(r.text.contains("250-STARTTLS") && r.text.contains("250-SIZE 1000"));
        assert!(!r.text.contains("AUTH"), "port 25 never offers AUTH");
        assert_eq!(s.rcpt_check("x@y", 100), Err(Reply::ok(REPLY_NEED_MAIL)));
        assert!(mail(&mut s, "MAIL FROM:<a@b.test>").text.starts_with("250"));
        assert!(
            mail(&mut s, "MAIL FROM:<a@b.test>")
                .text
                .starts_with("503 5.5.1 Sender already")
        );
        assert!(s.rcpt_check("x@y", 100).is_ok());
        let r = Rcpt::user("x@y", "x@y#1");
        s.add_local(r.clone(), vec![]);
        s.add_local(r, vec![]);
        assert_eq!(s.data_check().unwrap().len(), 1, "one entry per mailbox");
        assert!(s.rcpt_check("z@y", 1).unwrap_err().limit);
        assert!(s.rset().text.starts_with("250"));
        assert!(s.data_check().is_err());
    }

    #[test]
    fn limits_and_utf8() {
        let mut s = State::new(Mode::Smtp, "mx.test".into());
        s.hello(b"HELO", "c", offer());
        assert!(mail(&mut s, "MAIL FROM:<a@b.test> SIZE=5000").limit);
        assert_eq!(
            mail(&mut s, "MAIL FROM:<jürgen@b.test>").text,
            REPLY_UTF8_NEEDS_SMTPUTF8
        );
        assert!(mail(&mut s, "MAIL FROM:<a@b.test>").text.starts_with("250"));
        assert_eq!(
            s.rcpt_check("jürgen@b.test", 100),
            Err(Reply::ok(REPLY_UTF8_NEEDS_SMTPUTF8))
        );
        assert_eq!(s.with_keyword(false), "SMTP");
    }

    #[test]
    fn lmtp_wants_lhlo_and_answers_per_recipient() {
        let mut s = State::new(Mode::Lmtp, "mx.test".into());
        assert!(s.hello(b"EHLO", "c", offer()).bad);
        assert!(s.hello(b"LHLO", "c", offer()).text.starts_with("250-mx.test"));
        let rcpts = vec![Rcpt::user("a@x", "a"), Rcpt::user("b@x", "b")];
        let r = data_reply(Mode::Lmtp, "ID", false, &rcpts, |m| m == "a", true);
        assert_eq!(
            r,
            "250 2.0.0 <a@x> Ok: stored as ID\r\n451 4.3.0 <b@x> Mail store unavailable, try again later"
        );
        assert_eq!(
            data_reply(Mode::Smtp, "ID", false, &rcpts, |_| true, true),
            REPLY_STORE_UNAVAILABLE
        );
        // An alias: one reply for its RCPT, good only if every copy is
        // stored and its forwarded copy queued.
        let alias = Rcpt {
            address: "team@x".into(),
            dests: [Rcpt::user("a@x", "a"), Rcpt::user("b@x", "b")]
                .into_iter()
                .flat_map(|r| r.dests)
                .collect(),
            forwards: true,
        };
        let one = |stored: &dyn Fn(&str) -> bool, fwd| {
            data_reply(Mode::Lmtp, "ID", false, std::slice::from_ref(&alias), stored, fwd)
        };
        assert!(one(&|_| true, true).starts_with("250 2.0.0 <team@x>"));
        assert!(one(&|m| m == "a", true).starts_with("451"));
        assert!(one(&|_| true, false).starts_with("451"));
        assert_eq!(one(&|_| true, true).lines().count(), 1);
    }

    #[test]
    fn submission_needs_auth_as_the_sender() {
        let mut s = State::new(Mode::Submission, "mx.test".into());
        let r = s.hello(b"EHLO", "c", offer());
        assert!(r.text.contains("250-AUTH PLAIN LOGIN"));
        let no_pw = Offer {
            password: false,
            ..offer()
        };
        assert!(!s.hello(b"EHLO", "c", no_pw).text.contains("AUTH"));
        assert!(mail(&mut s, "MAIL FROM:<a@b.test>").text.starts_with("530"));
        assert!(s.auth_result(AuthResult::Failed).text.starts_with("535"));
        assert!(s.auth_result(AuthResult::Ok("a@b.test".into())).text.starts_with("235"));
        assert!(mail(&mut s, "MAIL FROM:<eve@b.test>").text.starts_with("553 5.7.1"));
        assert!(mail(&mut s, "MAIL FROM:<A@b.test>").text.starts_with("250"));
        assert!(s.auth_check().is_err(), "already authenticated");
        s.tls_started();
        assert!(s.authed.is_none() && s.tx.is_none(), "STARTTLS forgets everything");
        // One failure before: the session's count goes on across STARTTLS.
        assert!(!s.auth_result(AuthResult::Failed).close);
        assert!(s.auth_result(AuthResult::Failed).close, "the third failure ends it");
    }

    #[test]
    fn harvesting_is_slowed_then_ended() {
        let mut s = State::new(Mode::Smtp, "mx.test".into());
        let steps: Vec<(bool, bool)> = (0..UNKNOWN_RCPT_SESSION_MAX)
            .map(|_| {
                let (delay, r) = s.unknown_recipient();
                (delay, r.close)
            })
            .collect();
        assert_eq!(steps[0], (false, false));
        assert_eq!(steps[3], (true, false));
        assert_eq!(*steps.last().unwrap(), (true, true));
    }

    #[test]
    fn starttls_rules_and_received_header() {
        let s = State::new(Mode::Smtp, "mx.test".into());
        assert!(s.starttls(b"STARTTLS x\r\n", false, true).1.bad);
        assert!(s.starttls(b"STARTTLS\r\n", true, true).1.bad);
        assert_eq!(
            s.starttls(b"STARTTLS\r\n", false, false).1.text,
            "454 4.7.0 TLS not available"
        );
        assert!(s.starttls(b"STARTTLS\r\n", false, true).0);
        let h = String::from_utf8(s.received_header("192.0.2.1", Some("TLSv1.3"), "ID", &["a@x"], 0)).unwrap();
        assert!(
            h.starts_with("Received: from unknown (192.0.2.1) (using TLSv1.3)\r\n\tby mx.test (Quill) with SMTP id ID")
        );
        assert!(h.contains("for <a@x>;") && h.ends_with("Thu, 01 Jan 1970 00:00:00 +0000\r\n"));
    }
}
