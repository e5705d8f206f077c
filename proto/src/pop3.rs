//! POP3 (RFC 1939) with CAPA (RFC 2449), AUTH PLAIN (RFC 5034), STLS
//! (RFC 2595) and UTF8 (RFC 6856): the command parser, the maildrop as a
//! session sees it (numbers, sizes, UIDLs, deletions marked until QUIT)
//! and every reply. The node's `pop3` module reads, logs in, locks the
//! mailbox and sends bodies.

use crate::sasl;

pub use crate::message::dot_stuff;

/// RFC 2449 gives 255 octets for POP3 commands; AUTH PLAIN responses
/// (RFC 5034) may be longer, so a little room is left.
pub const POP3_LINE_BYTES_MAX: usize = 1024;
/// Failed logins in one session before it is closed.
pub const SESSION_AUTH_FAILURES_MAX: u32 = 3;

/// One parsed POP3 command.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    User(String),
    Pass(String),
    /// `AUTH` alone lists mechanisms; otherwise mechanism and initial response.
    Auth(Option<(String, Option<String>)>),
    Capa,
    Quit,
    Stat,
    List(Option<u32>),
    Uidl(Option<u32>),
    Retr(u32),
    Top(u32, u32),
    Dele(u32),
    Rset,
    Noop,
    /// RFC 6856: UTF-8 user names and passwords (always accepted here).
    Utf8,
    /// RFC 2595: TLS from here on.
    Stls,
}

/// Parses one command line (terminator already removed). Pure: table-tested.
pub fn parse(line: &[u8]) -> Result<Command, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "command is not UTF-8")?;
    let (verb, rest) = match line.split_once(' ') {
        Some((v, r)) => (v, r),
        None => (line, ""),
    };
    let args: Vec<&str> = rest.split(' ').filter(|a| !a.is_empty()).collect();
    let num = |s: &str| -> Result<u32, &'static str> {
        match s.parse::<u32>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err("invalid message number"),
        }
    };
    let opt_num = |args: &[&str]| -> Result<Option<u32>, &'static str> {
        match args {
            [] => Ok(None),
            [n] => num(n).map(Some),
            _ => Err("too many arguments"),
        }
    };
    let none = |args: &[&str], c: Command| {
        if args.is_empty() {
            Ok(c)
        } else {
            Err("no arguments expected")
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "USER" => match args.as_slice() {
            [u] => Ok(Command::User((*u).to_owned())),
            _ => Err("usage: USER name"),
        },
        // A password may hold spaces: it is the rest of the line.
        "PASS" if !rest.is_empty() => Ok(Command::Pass(rest.to_owned())),
        "PASS" => Err("usage: PASS password"),
        "AUTH" => match args.as_slice() {
            [] => Ok(Command::Auth(None)),
            [m] => Ok(Command::Auth(Some((m.to_ascii_uppercase(), None)))),
            [m, ir] => Ok(Command::Auth(Some((m.to_ascii_uppercase(), Some((*ir).to_owned()))))),
            _ => Err("usage: AUTH mechanism [initial-response]"),
        },
        "CAPA" => none(&args, Command::Capa),
        "QUIT" => none(&args, Command::Quit),
        "STAT" => none(&args, Command::Stat),
        "RSET" => none(&args, Command::Rset),
        "NOOP" => none(&args, Command::Noop),
        "UTF8" => none(&args, Command::Utf8),
        "STLS" => none(&args, Command::Stls),
        "LIST" => opt_num(&args).map(Command::List),
        "UIDL" => opt_num(&args).map(Command::Uidl),
        "RETR" => match args.as_slice() {
            [n] => num(n).map(Command::Retr),
            _ => Err("usage: RETR msg"),
        },
        "DELE" => match args.as_slice() {
            [n] => num(n).map(Command::Dele),
            _ => Err("usage: DELE msg"),
        },
        "TOP" => match args.as_slice() {
            [n, k] => Ok(Command::Top(num(n)?, k.parse().map_err(|_| "invalid line count")?)),
            _ => Err("usage: TOP msg lines"),
        },
        _ => Err("unknown command"),
    }
}

/// The CAPA reply: USER and SASL only where a password may be sent now
/// (RFC 2595 4: not before STLS where plaintext logins are refused), STLS
/// while TLS can still be started.
pub fn capa(login: bool, stls: bool) -> String {
    let mut c = String::from("+OK Capability list follows\r\n");
    if login {
        c.push_str("USER\r\nSASL PLAIN\r\n");
    }
    if stls {
        c.push_str("STLS\r\n");
    }
    c.push_str("TOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\nUTF8 USER\r\nEXPIRE NEVER\r\nIMPLEMENTATION Quill\r\n.");
    c
}

/// The answer to a login sent in the clear where `--plaintext-auth` refuses it.
pub const PLAINTEXT_REFUSED: &str =
    "-ERR [AUTH] Plaintext authentication disallowed on an unencrypted connection; use STLS (or port 995) first";

/// `AUTH PLAIN`'s base64 response (RFC 4616), or the reply refusing it.
pub fn decode_plain(b64: &str) -> Result<(String, String), &'static str> {
    const MALFORMED: &str = "-ERR malformed AUTH PLAIN response";
    let raw = sasl::decode_base64(b64.as_bytes()).map_err(|_| MALFORMED)?;
    match sasl::decode_plain(&raw) {
        Ok(c) => Ok((c.user, c.password)),
        Err(sasl::SaslError::NotPermitted) => {
            Err("-ERR [AUTH] logging in as another user (authorization identity) is not permitted")
        }
        Err(sasl::SaslError::Malformed) => Err(MALFORMED),
    }
}

/// One message of a maildrop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its unique id (the same on every node, never reused).
    pub uidl: String,
    pub size: u64,
}

/// The mailbox as a session sees it from login to QUIT: messages are
/// numbered from 1 in this order, and deletions are only marked.
#[derive(Debug)]
pub struct Maildrop {
    messages: Vec<Message>,
    deleted: Vec<bool>,
}

/// What a command of the transaction state asks of the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Reply(String),
    /// Send message `index` (0-based): whole (RETR), or its header and
    /// the first lines of its body (TOP).
    Send {
        index: usize,
        top_lines: Option<u32>,
    },
    /// Apply the marked deletions, then sign off.
    Quit,
}

impl Maildrop {
    pub fn new(messages: Vec<Message>) -> Maildrop {
        Maildrop {
            deleted: vec![false; messages.len()],
            messages,
        }
    }

    /// The reply to a successful login.
    pub fn opened(&self) -> String {
        let octets: u64 = self.messages.iter().map(|m| m.size).sum();
        format!("+OK maildrop has {} messages ({octets} octets)", self.messages.len())
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Message)> {
        self.messages.iter().enumerate().filter(|(i, _)| !self.deleted[*i])
    }

    /// The index of message `n` (1-based) unless absent or marked deleted.
    pub fn index(&self, n: u32) -> Result<usize, String> {
        let i = (n as usize).wrapping_sub(1);
        match self.messages.get(i) {
            None => Err(format!("-ERR no such message {n}")),
            Some(_) if self.deleted[i] => Err(format!("-ERR message {n} already deleted")),
            Some(_) => Ok(i),
        }
    }

    pub fn message(&self, index: usize) -> &Message {
        &self.messages[index]
    }

    /// The indices marked deleted (what QUIT removes).
    pub fn deleted(&self) -> Vec<usize> {
        (0..self.messages.len()).filter(|i| self.deleted[*i]).collect()
    }

    /// Messages left after the marked deletions.
    pub fn left(&self) -> usize {
        self.messages.len() - self.deleted().len()
    }

    /// A command of the transaction state.
    pub fn command(&mut self, cmd: Command) -> Action {
        let reply = |s: String| Action::Reply(s);
        match cmd {
            Command::Capa => reply(capa(false, false)),
            Command::Stls => reply("-ERR STLS only before login".into()),
            Command::Noop => reply("+OK".into()),
            // RFC 6856 §2: not permitted after authentication.
            Command::Utf8 => reply("-ERR UTF8 must come before login".into()),
            Command::Stat => {
                let (n, octets) = self.live().fold((0, 0), |(n, o), (_, m)| (n + 1, o + m.size));
                reply(format!("+OK {n} {octets}"))
            }
            Command::List(None) | Command::Uidl(None) => {
                let uidl = matches!(cmd, Command::Uidl(None));
                let mut out = String::from("+OK\r\n");
                for (i, m) in self.live() {
                    if uidl {
                        out.push_str(&format!("{} {}\r\n", i + 1, m.uidl));
                    } else {
                        out.push_str(&format!("{} {}\r\n", i + 1, m.size));
                    }
                }
                out.push('.');
                reply(out)
            }
            Command::List(Some(n)) => reply(
                self.index(n)
                    .map(|i| format!("+OK {n} {}", self.messages[i].size))
                    .unwrap_or_else(|e| e),
            ),
            Command::Uidl(Some(n)) => reply(
                self.index(n)
                    .map(|i| format!("+OK {n} {}", self.messages[i].uidl))
                    .unwrap_or_else(|e| e),
            ),
            Command::Retr(n) | Command::Top(n, _) => match self.index(n) {
                Err(e) => reply(e),
                Ok(index) => Action::Send {
                    index,
                    top_lines: match cmd {
                        Command::Top(_, k) => Some(k),
                        _ => None,
                    },
                },
            },
            Command::Dele(n) => match self.index(n) {
                Err(e) => reply(e),
                Ok(i) => {
                    self.deleted[i] = true;
                    reply(format!("+OK message {n} deleted"))
                }
            },
            Command::Rset => {
                self.deleted.iter_mut().for_each(|d| *d = false);
                reply(format!("+OK maildrop has {} messages", self.messages.len()))
            }
            Command::Quit => Action::Quit,
            Command::User(_) | Command::Pass(_) | Command::Auth(_) => reply("-ERR already logged in".into()),
        }
    }
}

/// The first line of a message sent by RETR or TOP.
pub fn sending(size: u64) -> String {
    format!("+OK {size} octets")
}

/// The header, the blank line and the first `k` body lines of a message.
pub fn top(msg: &[u8], k: u32) -> &[u8] {
    let header_end = msg
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .unwrap_or(msg.len());
    let mut end = header_end;
    for _ in 0..k {
        match msg[end..].windows(2).position(|w| w == b"\r\n") {
            Some(i) => end += i + 2,
            None => {
                end = msg.len();
                break;
            }
        }
    }
    &msg[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Result<Command, &str>)] = &[
            ("USER alice@example.org", Ok(Command::User("alice@example.org".into()))),
            ("user bob", Ok(Command::User("bob".into()))),
            ("USER", Err("usage: USER name")),
            ("PASS two words", Ok(Command::Pass("two words".into()))),
            ("PASS", Err("usage: PASS password")),
            ("STAT", Ok(Command::Stat)),
            ("STAT 1", Err("no arguments expected")),
            ("LIST", Ok(Command::List(None))),
            ("LIST 3", Ok(Command::List(Some(3)))),
            ("LIST 0", Err("invalid message number")),
            ("LIST -1", Err("invalid message number")),
            ("LIST 99999999999", Err("invalid message number")),
            ("UIDL 2", Ok(Command::Uidl(Some(2)))),
            ("RETR 1", Ok(Command::Retr(1))),
            ("RETR", Err("usage: RETR msg")),
            ("TOP 1 0", Ok(Command::Top(1, 0))),
            ("TOP 1 x", Err("invalid line count")),
            ("DELE 7", Ok(Command::Dele(7))),
            ("AUTH", Ok(Command::Auth(None))),
            (
                "AUTH plain AGEAYg==",
                Ok(Command::Auth(Some(("PLAIN".into(), Some("AGEAYg==".into()))))),
            ),
            ("CAPA", Ok(Command::Capa)),
            ("QUIT", Ok(Command::Quit)),
            ("APOP a b", Err("unknown command")),
            ("", Err("unknown command")),
        ];
        for (line, want) in cases {
            assert_eq!(&parse(line.as_bytes()), want, "{line:?}");
        }
        assert_eq!(parse(b"USER \xff"), Err("command is not UTF-8"));
    }

    #[test]
    fn plain() {
        let enc = |s: &[u8]| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(decode_plain(&enc(b"\0alice\0pw")), Ok(("alice".into(), "pw".into())));
        assert_eq!(
            decode_plain(&enc(b"alice\0alice\0pw")),
            Ok(("alice".into(), "pw".into()))
        );
        assert!(decode_plain(&enc(b"bob\0alice\0pw")).is_err_and(|e| e.contains("not permitted")));
        assert!(decode_plain(&enc(b"alice\0pw")).is_err_and(|e| e.contains("malformed")));
        assert!(decode_plain("!!!").is_err_and(|e| e.contains("malformed")));
        // UTF-8 identities (RFC 6531 users) pass through.
        assert_eq!(
            decode_plain(&enc("\0jürgen@example.org\0pw".as_bytes())),
            Ok(("jürgen@example.org".into(), "pw".into()))
        );
    }

    #[test]
    fn dot_stuffing_and_top() {
        let mut out = Vec::new();
        dot_stuff(b"a\r\n.b\r\n..\r\n", &mut out);
        assert_eq!(out, b"a\r\n..b\r\n...\r\n.\r\n");
        let mut out = Vec::new();
        dot_stuff(b".x", &mut out);
        assert_eq!(out, b"..x\r\n.\r\n");
        let msg = b"H: 1\r\nH: 2\r\n\r\nl1\r\nl2\r\nl3\r\n";
        assert_eq!(top(msg, 0), b"H: 1\r\nH: 2\r\n\r\n");
        assert_eq!(top(msg, 2), b"H: 1\r\nH: 2\r\n\r\nl1\r\nl2\r\n");
        assert_eq!(top(msg, 9), &msg[..]);
    }

    #[test]
    fn a_maildrop_marks_deletions_until_quit() {
        let m = |u: &str, s| Message {
            uidl: u.into(),
            size: s,
        };
        let mut d = Maildrop::new(vec![m("a", 10), m("b", 20)]);
        assert_eq!(d.opened(), "+OK maildrop has 2 messages (30 octets)");
        assert_eq!(
            d.command(Command::Dele(1)),
            Action::Reply("+OK message 1 deleted".into())
        );
        assert_eq!(d.command(Command::Stat), Action::Reply("+OK 1 20".into()));
        assert_eq!(d.command(Command::Uidl(None)), Action::Reply("+OK\r\n2 b\r\n.".into()));
        assert_eq!(
            d.command(Command::Retr(1)),
            Action::Reply("-ERR message 1 already deleted".into())
        );
        assert_eq!(
            d.command(Command::List(Some(3))),
            Action::Reply("-ERR no such message 3".into())
        );
        assert_eq!(
            d.command(Command::Top(2, 5)),
            Action::Send {
                index: 1,
                top_lines: Some(5)
            }
        );
        assert_eq!(d.deleted(), vec![0]);
        assert_eq!(
            d.command(Command::Rset),
            Action::Reply("+OK maildrop has 2 messages".into())
        );
        assert_eq!(d.deleted(), Vec::<usize>::new());
        assert_eq!(d.command(Command::Quit), Action::Quit);
    }
}
