//! A script's grammar (RFC 5228 §8.2) into commands and tests, checked:
//! every command, test, tag and extension known and `require`d, every
//! argument of the right kind, bounded nesting and lists.

use std::collections::BTreeSet;

use super::ast::{BodyPart, Cmd, Cmp, Kind, Match, Part, Rel, Test, VacationSpec};
use super::lex::{Tok, tokens};
use super::{LIST_MAX, NESTING_MAX, SCRIPT_BYTES_MAX, SieveError};

/// A compiled script, ready to [`super::run`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Script {
    pub(super) cmds: Vec<Cmd>,
}

/// An argument as written.
#[derive(Debug, Clone)]
enum Arg {
    Num(u64),
    Strs(Vec<String>),
}

/// Tags followed by a value of their own.
const VALUED_TAGS: &[&str] = &[
    "comparator",
    "value",
    "count",
    "days",
    "subject",
    "from",
    "addresses",
    "handle",
    "flags",
    "content",
];

/// Checks and compiles a script.
pub fn compile(src: &str) -> Result<Script, SieveError> {
    if src.len() > SCRIPT_BYTES_MAX {
        return Err(SieveError::at(
            1,
            format!("script larger than {SCRIPT_BYTES_MAX} bytes"),
        ));
    }
    let toks = tokens(src)?;
    let last_line = toks.last().map_or(1, |t| t.1);
    let mut p = Parser {
        toks,
        pos: 0,
        required: BTreeSet::new(),
        last_line,
        seen_other: false,
    };
    let cmds = p.block(0, true)?;
    if p.pos < p.toks.len() {
        return Err(SieveError::at(p.line(), "unexpected '}'"));
    }
    Ok(Script { cmds })
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    required: BTreeSet<String>,
    last_line: usize,
    /// A command other than `require` came: no more `require`.
    seen_other: bool,
}

/// Tagged and positional arguments, taken one by one by the command.
struct Args {
    line: usize,
    name: String,
    tags: Vec<(String, Option<Arg>)>,
    pos: Vec<Arg>,
}

impl Args {
    fn err(&self, why: impl Into<String>) -> SieveError {
        SieveError::at(self.line, format!("{}: {}", self.name, why.into()))
    }

    fn flag(&mut self, tag: &str) -> bool {
        match self.tags.iter().position(|(t, _)| t == tag) {
            Some(i) => {
                self.tags.remove(i);
                true
            }
            None => false,
        }
    }

    fn valued(&mut self, tag: &str) -> Option<Arg> {
        let i = self.tags.iter().position(|(t, _)| t == tag)?;
        self.tags.remove(i).1
    }

    fn valued_str(&mut self, tag: &str) -> Result<Option<String>, SieveError> {
        match self.valued(tag) {
            None => Ok(None),
            Some(Arg::Strs(s)) if s.len() == 1 => Ok(s.into_iter().next()),
            Some(_) => Err(self.err(format!(":{tag} takes one string"))),
        }
    }

    fn valued_list(&mut self, tag: &str) -> Result<Option<Vec<String>>, SieveError> {
        match self.valued(tag) {
            None => Ok(None),
            Some(Arg::Strs(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(format!(":{tag} takes a string list"))),
        }
    }

    fn strs(&mut self, what: &str) -> Result<Vec<String>, SieveError> {
        if self.pos.is_empty() {
            return Err(self.err(format!("missing {what}")));
        }
        match self.pos.remove(0) {
            Arg::Strs(s) => Ok(s),
            _ => Err(self.err(format!("{what} must be a string or a string list"))),
        }
    }

    fn one_str(&mut self, what: &str) -> Result<String, SieveError> {
        let mut s = self.strs(what)?;
        if s.len() != 1 {
            return Err(self.err(format!("{what} must be one string")));
        }
        Ok(s.remove(0))
    }

    fn num(&mut self, what: &str) -> Result<u64, SieveError> {
        if self.pos.is_empty() {
            return Err(self.err(format!("missing {what}")));
        }
        match self.pos.remove(0) {
            Arg::Num(n) => Ok(n),
            _ => Err(self.err(format!("{what} must be a number"))),
        }
    }

    /// Nothing may be left over.
    fn done(&self) -> Result<(), SieveError> {
        if let Some((t, _)) = self.tags.first() {
            return Err(self.err(format!("unknown or misplaced tag :{t}")));
        }
        if !self.pos.is_empty() {
            return Err(self.err("too many arguments"));
        }
        Ok(())
    }
}

impl Parser {
    fn line(&self) -> usize {
        self.toks.get(self.pos).map_or(self.last_line, |t| t.1)
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|t| &t.0)
    }

    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.pos).map(|t| t.0.clone());
        self.pos += 1;
        t
    }

    fn expect(&mut self, want: Tok, what: &str) -> Result<(), SieveError> {
        let line = self.line();
        match self.next() {
            Some(t) if t == want => Ok(()),
            _ => Err(SieveError::at(line, format!("expected {what}"))),
        }
    }

    fn need(&self, ext: &str, line: usize, what: &str) -> Result<(), SieveError> {
        if self.required.contains(ext) {
            Ok(())
        } else {
            Err(SieveError::at(line, format!("{what} needs require \"{ext}\"")))
        }
    }

    fn list(&mut self) -> Result<Vec<String>, SieveError> {
        let line = self.line();
        let mut out = Vec::new();
        loop {
            match self.next() {
                Some(Tok::Str(s)) => out.push(s),
                _ => return Err(SieveError::at(line, "a string list holds strings")),
            }
            if out.len() > LIST_MAX {
                return Err(SieveError::at(line, format!("more than {LIST_MAX} strings in a list")));
            }
            match self.next() {
                Some(Tok::Comma) => continue,
                Some(Tok::RBracket) => return Ok(out),
                _ => return Err(SieveError::at(line, "expected ',' or ']' in a string list")),
            }
        }
    }

    fn args(&mut self, name: String, line: usize) -> Result<Args, SieveError> {
        let mut a = Args {
            line,
            name,
            tags: Vec::new(),
            pos: Vec::new(),
        };
        loop {
            let arg = match self.peek() {
                Some(Tok::Tag(_)) => {
                    let Some(Tok::Tag(t)) = self.next() else { unreachable!() };
                    if VALUED_TAGS.contains(&t.as_str()) {
                        let v = match self.next() {
                            Some(Tok::Str(s)) => Arg::Strs(vec![s]),
                            Some(Tok::Number(n)) => Arg::Num(n),
                            Some(Tok::LBracket) => Arg::Strs(self.list()?),
                            _ => return Err(a.err(format!(":{t} needs a value"))),
                        };
                        a.tags.push((t, Some(v)));
                    } else {
                        a.tags.push((t, None));
                    }
                    continue;
                }
                Some(Tok::Number(n)) => Arg::Num(*n),
                Some(Tok::Str(s)) => Arg::Strs(vec![s.clone()]),
                Some(Tok::LBracket) => {
                    self.pos += 1;
                    a.pos.push(Arg::Strs(self.list()?));
                    continue;
                }
                _ => return Ok(a),
            };
            self.pos += 1;
            a.pos.push(arg);
        }
    }

    fn block(&mut self, depth: usize, top: bool) -> Result<Vec<Cmd>, SieveError> {
        if depth > NESTING_MAX {
            return Err(SieveError::at(self.line(), format!("nested deeper than {NESTING_MAX}")));
        }
        let mut cmds = Vec::new();
        loop {
            let line = self.line();
            let name = match self.peek() {
                None if top => return Ok(cmds),
                None => return Err(SieveError::at(line, "missing '}'")),
                Some(Tok::RBrace) if !top => {
                    self.pos += 1;
                    return Ok(cmds);
                }
                Some(Tok::RBrace) => return Err(SieveError::at(line, "unexpected '}'")),
                Some(Tok::Ident(n)) => n.clone(),
                Some(_) => return Err(SieveError::at(line, "expected a command")),
            };
            self.pos += 1;
            if name == "require" {
                if self.seen_other || !top {
                    return Err(SieveError::at(line, "require must come before every other command"));
                }
                let mut a = self.args(name, line)?;
                for ext in a.strs("extension names")? {
                    let ext = ext.to_ascii_lowercase();
                    if !super::EXTENSIONS.contains(&ext.as_str()) {
                        return Err(SieveError::at(line, format!("unsupported extension \"{ext}\"")));
                    }
                    self.required.insert(ext);
                }
                a.done()?;
                self.expect(Tok::Semi, "';'")?;
                continue;
            }
            self.seen_other = true;
            if name == "if" {
                let mut branches = vec![(self.test(depth + 1)?, self.braced(depth)?)];
                let mut otherwise = None;
                loop {
                    match self.peek() {
                        Some(Tok::Ident(n)) if n == "elsif" => {
                            self.pos += 1;
                            branches.push((self.test(depth + 1)?, self.braced(depth)?));
                        }
                        Some(Tok::Ident(n)) if n == "else" => {
                            self.pos += 1;
                            otherwise = Some(self.braced(depth)?);
                            break;
                        }
                        _ => break,
                    }
                }
                cmds.push(Cmd::If { branches, otherwise });
                continue;
            }
            if name == "elsif" || name == "else" {
                return Err(SieveError::at(line, format!("{name} without if")));
            }
            let a = self.args(name, line)?;
            cmds.push(self.command(a)?);
            self.expect(Tok::Semi, "';' after a command")?;
        }
    }

    fn braced(&mut self, depth: usize) -> Result<Vec<Cmd>, SieveError> {
        self.expect(Tok::LBrace, "'{'")?;
        self.block(depth + 1, false)
    }

    fn flags_arg(&mut self, a: &mut Args) -> Result<Option<Vec<String>>, SieveError> {
        let f = a.valued_list("flags")?;
        if f.is_some() {
            self.need("imap4flags", a.line, ":flags")?;
        }
        Ok(f)
    }

    fn command(&mut self, mut a: Args) -> Result<Cmd, SieveError> {
        let line = a.line;
        let cmd = match a.name.as_str() {
            "stop" => Cmd::Stop,
            "discard" => Cmd::Discard,
            "keep" => Cmd::Keep {
                flags: self.flags_arg(&mut a)?,
            },
            "fileinto" => {
                self.need("fileinto", line, "fileinto")?;
                let copy = a.flag("copy");
                if copy {
                    self.need("copy", line, ":copy")?;
                }
                let create = a.flag("create");
                if create {
                    self.need("mailbox", line, ":create")?;
                }
                let flags = self.flags_arg(&mut a)?;
                let folder = a.one_str("the folder")?;
                if folder.is_empty() {
                    return Err(a.err("an empty folder name"));
                }
                Cmd::FileInto {
                    folder,
                    copy,
                    create,
                    flags,
                }
            }
            "redirect" => {
                let copy = a.flag("copy");
                if copy {
                    self.need("copy", line, ":copy")?;
                }
                let address = a.one_str("the address")?;
                if !address.contains('@') || address.len() > 320 {
                    return Err(a.err(format!("{address:?} is not an address")));
                }
                Cmd::Redirect { address, copy }
            }
            "setflag" | "addflag" | "removeflag" => {
                self.need("imap4flags", line, &a.name.clone())?;
                let flags = a.strs("the flags")?;
                match a.name.as_str() {
                    "setflag" => Cmd::SetFlag(flags),
                    "addflag" => Cmd::AddFlag(flags),
                    _ => Cmd::RemoveFlag(flags),
                }
            }
            "vacation" => {
                self.need("vacation", line, "vacation")?;
                let days = match a.valued("days") {
                    None => 7,
                    Some(Arg::Num(n)) => n.clamp(1, 365),
                    Some(_) => return Err(a.err(":days takes a number")),
                };
                let subject = a.valued_str("subject")?;
                let from = a.valued_str("from")?;
                let addresses = a.valued_list("addresses")?.unwrap_or_default();
                let handle = a.valued_str("handle")?;
                let mime = a.flag("mime");
                let reason = a.one_str("the reason")?;
                Cmd::Vacation(VacationSpec {
                    days,
                    subject,
                    from,
                    addresses,
                    mime,
                    handle,
                    reason,
                })
            }
            other => return Err(a.err(format!("unknown command {other}"))),
        };
        a.done()?;
        Ok(cmd)
    }

    fn matching(&self, a: &mut Args) -> Result<Match, SieveError> {
        let cmp = match a.valued("comparator") {
            None => Cmp::Casemap,
            Some(Arg::Strs(s)) if s.len() == 1 => match s[0].to_ascii_lowercase().as_str() {
                "i;ascii-casemap" => Cmp::Casemap,
                "i;octet" => Cmp::Octet,
                "i;ascii-numeric" => {
                    self.need("comparator-i;ascii-numeric", a.line, "i;ascii-numeric")?;
                    Cmp::Numeric
                }
                other => return Err(a.err(format!("unknown comparator {other:?}"))),
            },
            Some(_) => return Err(a.err(":comparator takes one string")),
        };
        let mut kinds = Vec::new();
        for (t, k) in [
            ("is", Kind::Is),
            ("contains", Kind::Contains),
            ("matches", Kind::Matches),
        ] {
            if a.flag(t) {
                kinds.push(k);
            }
        }
        for t in ["value", "count"] {
            if let Some(v) = a.valued(t) {
                self.need("relational", a.line, &format!(":{t}"))?;
                let rel = match v {
                    Arg::Strs(s) if s.len() == 1 => match s[0].to_ascii_lowercase().as_str() {
                        "gt" => Rel::Gt,
                        "ge" => Rel::Ge,
                        "lt" => Rel::Lt,
                        "le" => Rel::Le,
                        "eq" => Rel::Eq,
                        "ne" => Rel::Ne,
                        other => return Err(a.err(format!("unknown relation {other:?}"))),
                    },
                    _ => return Err(a.err(format!(":{t} takes one string"))),
                };
                kinds.push(if t == "value" {
                    Kind::Value(rel)
                } else {
                    Kind::Count(rel)
                });
            }
        }
        if kinds.len() > 1 {
            return Err(a.err("more than one match type"));
        }
        Ok(Match {
            kind: kinds.pop().unwrap_or(Kind::Is),
            cmp,
        })
    }

    fn part(&self, a: &mut Args) -> Result<Part, SieveError> {
        let mut parts = Vec::new();
        for (t, p) in [("all", Part::All), ("localpart", Part::Local), ("domain", Part::Domain)] {
            if a.flag(t) {
                parts.push(p);
            }
        }
        if parts.len() > 1 {
            return Err(a.err("more than one address part"));
        }
        Ok(parts.pop().unwrap_or(Part::All))
    }

    fn test(&mut self, depth: usize) -> Result<Test, SieveError> {
        if depth > NESTING_MAX {
            return Err(SieveError::at(self.line(), format!("nested deeper than {NESTING_MAX}")));
        }
        let line = self.line();
        let name = match self.next() {
            Some(Tok::Ident(n)) => n,
            _ => return Err(SieveError::at(line, "expected a test")),
        };
        match name.as_str() {
            "not" => return Ok(Test::Not(Box::new(self.test(depth + 1)?))),
            "allof" | "anyof" => {
                self.expect(Tok::LParen, "'(' after allof/anyof")?;
                let mut tests = vec![self.test(depth + 1)?];
                loop {
                    match self.next() {
                        Some(Tok::Comma) => tests.push(self.test(depth + 1)?),
                        Some(Tok::RParen) => break,
                        _ => return Err(SieveError::at(line, "expected ',' or ')' in a test list")),
                    }
                    if tests.len() > LIST_MAX {
                        return Err(SieveError::at(line, "too many tests in a list"));
                    }
                }
                return Ok(if name == "allof" {
                    Test::AllOf(tests)
                } else {
                    Test::AnyOf(tests)
                });
            }
            _ => {}
        }
        let mut a = self.args(name, line)?;
        let t = match a.name.as_str() {
            "true" => Test::True,
            "false" => Test::False,
            "address" => {
                let part = self.part(&mut a)?;
                let m = self.matching(&mut a)?;
                Test::Address {
                    part,
                    m,
                    headers: a.strs("the header names")?,
                    keys: a.strs("the keys")?,
                }
            }
            "envelope" => {
                self.need("envelope", line, "envelope")?;
                let part = self.part(&mut a)?;
                let m = self.matching(&mut a)?;
                let which = a.strs("the envelope parts")?;
                for w in &which {
                    if !matches!(w.to_ascii_lowercase().as_str(), "from" | "to") {
                        return Err(a.err(format!("unknown envelope part {w:?}")));
                    }
                }
                Test::Envelope {
                    part,
                    m,
                    which,
                    keys: a.strs("the keys")?,
                }
            }
            "header" => {
                let m = self.matching(&mut a)?;
                Test::Header {
                    m,
                    headers: a.strs("the header names")?,
                    keys: a.strs("the keys")?,
                }
            }
            "exists" => Test::Exists(a.strs("the header names")?),
            "size" => {
                let (over, under) = (a.flag("over"), a.flag("under"));
                if over == under {
                    return Err(a.err("needs one of :over or :under"));
                }
                Test::Size {
                    over,
                    limit: a.num("the limit")?,
                }
            }
            "body" => {
                self.need("body", line, "body")?;
                let part = if a.flag("raw") {
                    BodyPart::Raw
                } else {
                    // :text, and :content (taken as the text parts).
                    a.flag("text");
                    let _ = a.valued("content");
                    BodyPart::Text
                };
                let m = self.matching(&mut a)?;
                Test::Body {
                    part,
                    m,
                    keys: a.strs("the keys")?,
                }
            }
            "hasflag" => {
                self.need("imap4flags", line, "hasflag")?;
                let m = self.matching(&mut a)?;
                Test::HasFlag {
                    m,
                    keys: a.strs("the flags")?,
                }
            }
            other => return Err(a.err(format!("unknown test {other}"))),
        };
        a.done()?;
        Ok(t)
    }
}
