//! Running a compiled script over one message and recipient: its tests
//! read the header, envelope, size, body and flags; its commands add up to
//! the [`Actions`] the node carries out. A limit reached (steps,
//! redirects, folders) stops the script and keeps the message, as RFC
//! 5228 §2.10.6 asks of a runtime error: mail is never lost to a script.

use std::collections::BTreeMap;

use super::Script;
use super::ast::{BodyPart, Cmd, Cmp, Kind, Match, Part, Rel, Test, VacationSpec};
use super::{BODY_BYTES_MAX, FILEINTO_MAX, REDIRECTS_MAX, STEPS_MAX};

/// The envelope of the message, for this recipient.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    /// MAIL FROM (empty: the null sender).
    pub from: &'a str,
    /// The recipient the script runs for.
    pub to: &'a str,
}

/// What to do with the message, for this recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actions {
    /// Keep it in INBOX, with these flags (explicitly or implicitly).
    pub keep: Option<Vec<String>>,
    /// File it into these folders (besides or instead of INBOX).
    pub fileinto: Vec<FileInto>,
    /// Send it on to these addresses.
    pub redirect: Vec<String>,
    /// Answer the sender, if the rules of RFC 5230 allow.
    pub vacation: Option<Vacation>,
    /// What went wrong while running (a limit reached): logged; the
    /// message was kept.
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInto {
    pub folder: String,
    /// Make the folder if it does not exist (`:create`); without it a
    /// missing folder means INBOX.
    pub create: bool,
    pub flags: Vec<String>,
}

/// A `vacation` action (RFC 5230), before the node's checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vacation {
    pub days: u64,
    pub subject: Option<String>,
    pub from: Option<String>,
    /// The user's other addresses (never answered as "not to me").
    pub addresses: Vec<String>,
    pub mime: bool,
    /// What "the same reply" is for the once-per-days rule: the handle
    /// given, else the reason and subject.
    pub handle: String,
    pub reason: String,
}

/// The message as tests read it, parsed once.
struct Msg<'a> {
    raw: &'a [u8],
    parsed: Option<mail_parser::Message<'a>>,
    /// Header values by lower-case name (decoded where the parser could),
    /// unfolded.
    headers: BTreeMap<String, Vec<String>>,
}

/// Longest header value a test looks at.
const VALUE_BYTES_MAX: usize = 64 * 1024;

impl<'a> Msg<'a> {
    fn new(raw: &'a [u8]) -> Msg<'a> {
        let parsed = mail_parser::MessageParser::default().parse(raw);
        let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        if let Some(m) = &parsed {
            for h in m.headers() {
                let name = h.name().to_ascii_lowercase();
                let value = match h.value() {
                    mail_parser::HeaderValue::Text(t) => t.to_string(),
                    mail_parser::HeaderValue::TextList(l) => l.join(", "),
                    _ => {
                        let (s, e) = (h.offset_start as usize, h.offset_end as usize);
                        let v = raw.get(s..e).unwrap_or_default();
                        String::from_utf8_lossy(v).into_owned()
                    }
                };
                let mut v: String = value
                    .split(['\r', '\n'])
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                if v.len() > VALUE_BYTES_MAX {
                    let mut cut = VALUE_BYTES_MAX;
                    while !v.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    v.truncate(cut);
                }
                headers.entry(name).or_default().push(v);
            }
        }
        Msg { raw, parsed, headers }
    }

    fn values(&self, name: &str) -> &[String] {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map_or(&[], |v| v.as_slice())
    }

    /// The addresses of every `name` header.
    fn addresses(&self, name: &str) -> Vec<String> {
        let want = name.to_ascii_lowercase();
        let mut out = Vec::new();
        if let Some(m) = &self.parsed {
            for h in m.headers() {
                if h.name().to_ascii_lowercase() != want {
                    continue;
                }
                match h.value().as_address() {
                    Some(a) => out.extend(a.iter().filter_map(|x| x.address.as_deref().map(str::to_owned))),
                    None => {
                        if let mail_parser::HeaderValue::Text(t) = h.value() {
                            out.push(t.trim().trim_matches(['<', '>']).to_owned());
                        }
                    }
                }
            }
        }
        out
    }

    fn body(&self, part: BodyPart) -> String {
        match part {
            BodyPart::Raw => {
                let start = self
                    .raw
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(self.raw.len(), |p| p + 4);
                let end = self.raw.len().min(start + BODY_BYTES_MAX);
                String::from_utf8_lossy(&self.raw[start..end]).into_owned()
            }
            BodyPart::Text => {
                let mut s = String::new();
                if let Some(m) = &self.parsed {
                    let mut i = 0;
                    while let Some(t) = m.body_text(i) {
                        s.push_str(&t);
                        s.push('\n');
                        if s.len() > BODY_BYTES_MAX {
                            break;
                        }
                        i += 1;
                    }
                }
                s
            }
        }
    }
}

struct Runner<'a> {
    msg: Msg<'a>,
    env: Envelope<'a>,
    size: u64,
    steps: usize,
    flags: Vec<String>,
    out: Actions,
    /// The implicit keep is cancelled (discard, fileinto, redirect).
    cancelled: bool,
    explicit_keep: Option<Vec<String>>,
}

/// Why running stopped.
enum Halt {
    Stop,
    Limit(String),
}

/// Runs `script` over the message `raw` for one recipient.
pub fn run(script: &Script, raw: &[u8], env: Envelope<'_>) -> Actions {
    let mut r = Runner {
        msg: Msg::new(raw),
        env,
        size: raw.len() as u64,
        steps: 0,
        flags: Vec::new(),
        out: Actions::default(),
        cancelled: false,
        explicit_keep: None,
    };
    match r.block(&script.cmds) {
        Ok(()) | Err(Halt::Stop) => {}
        Err(Halt::Limit(why)) => {
            // A runtime error: the message is kept, whatever was decided.
            r.out.errors.push(why);
            r.cancelled = false;
        }
    }
    let mut out = r.out;
    out.keep = match (r.explicit_keep, r.cancelled) {
        (Some(f), _) => Some(f),
        (None, false) => Some(r.flags),
        (None, true) => None,
    };
    out
}

fn split_flags(list: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in list.iter().flat_map(|s| s.split_whitespace()) {
        if !out.iter().any(|o| o.eq_ignore_ascii_case(f)) {
            out.push(f.to_owned());
        }
    }
    out
}

impl Runner<'_> {
    fn step(&mut self) -> Result<(), Halt> {
        self.steps += 1;
        if self.steps > STEPS_MAX {
            return Err(Halt::Limit(format!("more than {STEPS_MAX} steps")));
        }
        Ok(())
    }

    fn block(&mut self, cmds: &[Cmd]) -> Result<(), Halt> {
        for c in cmds {
            self.step()?;
            match c {
                Cmd::If { branches, otherwise } => {
                    let mut taken = false;
                    for (t, body) in branches {
                        if self.test(t)? {
                            self.block(body)?;
                            taken = true;
                            break;
                        }
                    }
                    if !taken && let Some(body) = otherwise {
                        self.block(body)?;
                    }
                }
                Cmd::Stop => return Err(Halt::Stop),
                Cmd::Keep { flags } => {
                    let f = flags.as_deref().map_or_else(|| self.flags.clone(), split_flags);
                    self.explicit_keep = Some(f);
                }
                Cmd::Discard => self.cancelled = true,
                Cmd::FileInto {
                    folder,
                    copy,
                    create,
                    flags,
                } => {
                    if !copy {
                        self.cancelled = true;
                    }
                    let flags = flags.as_deref().map_or_else(|| self.flags.clone(), split_flags);
                    if let Some(f) = self.out.fileinto.iter_mut().find(|f| f.folder == *folder) {
                        f.create |= create;
                        f.flags = flags;
                    } else {
                        if self.out.fileinto.len() >= FILEINTO_MAX {
                            return Err(Halt::Limit(format!("more than {FILEINTO_MAX} fileinto")));
                        }
                        self.out.fileinto.push(FileInto {
                            folder: folder.clone(),
                            create: *create,
                            flags,
                        });
                    }
                }
                Cmd::Redirect { address, copy } => {
                    if !copy {
                        self.cancelled = true;
                    }
                    if !self.out.redirect.iter().any(|a| a.eq_ignore_ascii_case(address)) {
                        if self.out.redirect.len() >= REDIRECTS_MAX {
                            return Err(Halt::Limit(format!("more than {REDIRECTS_MAX} redirects")));
                        }
                        self.out.redirect.push(address.clone());
                    }
                }
                Cmd::SetFlag(f) => self.flags = split_flags(f),
                Cmd::AddFlag(f) => {
                    let mut all = self.flags.clone();
                    all.extend(f.iter().cloned());
                    self.flags = split_flags(&all);
                }
                Cmd::RemoveFlag(f) => {
                    let gone = split_flags(f);
                    self.flags.retain(|x| !gone.iter().any(|g| g.eq_ignore_ascii_case(x)));
                }
                Cmd::Vacation(v) => {
                    if self.out.vacation.is_none() {
                        self.out.vacation = Some(vacation(v));
                    }
                }
            }
        }
        Ok(())
    }

    fn test(&mut self, t: &Test) -> Result<bool, Halt> {
        self.step()?;
        Ok(match t {
            Test::True => true,
            Test::False => false,
            Test::Not(t) => !self.test(t)?,
            Test::AllOf(ts) => {
                for t in ts {
                    if !self.test(t)? {
                        return Ok(false);
                    }
                }
                true
            }
            Test::AnyOf(ts) => {
                for t in ts {
                    if self.test(t)? {
                        return Ok(true);
                    }
                }
                false
            }
            Test::Exists(names) => names.iter().all(|n| !self.msg.values(n).is_empty()),
            Test::Size { over, limit } => {
                if *over {
                    self.size > *limit
                } else {
                    self.size < *limit
                }
            }
            Test::Header { m, headers, keys } => {
                let values: Vec<String> = headers.iter().flat_map(|h| self.msg.values(h).to_vec()).collect();
                matches(*m, &values, keys)
            }
            Test::Address { part, m, headers, keys } => {
                let values: Vec<String> = headers
                    .iter()
                    .flat_map(|h| self.msg.addresses(h))
                    .map(|a| address_part(&a, *part))
                    .collect();
                matches(*m, &values, keys)
            }
            Test::Envelope { part, m, which, keys } => {
                let values: Vec<String> = which
                    .iter()
                    .map(|w| match w.to_ascii_lowercase().as_str() {
                        "from" => self.env.from,
                        _ => self.env.to,
                    })
                    .map(|a| address_part(a, *part))
                    .collect();
                matches(*m, &values, keys)
            }
            Test::Body { part, m, keys } => {
                let body = self.msg.body(*part);
                matches(*m, &[body], keys)
            }
            Test::HasFlag { m, keys } => {
                let flags = self.flags.clone();
                matches(*m, &flags, &split_flags(keys))
            }
        })
    }
}

fn vacation(v: &VacationSpec) -> Vacation {
    Vacation {
        days: v.days,
        subject: v.subject.clone(),
        from: v.from.clone(),
        addresses: v.addresses.clone(),
        mime: v.mime,
        handle: v
            .handle
            .clone()
            .unwrap_or_else(|| format!("{}\n{}", v.subject.as_deref().unwrap_or(""), v.reason)),
        reason: v.reason.clone(),
    }
}

fn address_part(a: &str, part: Part) -> String {
    let (local, domain) = a.rsplit_once('@').unwrap_or((a, ""));
    match part {
        Part::All => a.to_owned(),
        Part::Local => local.to_owned(),
        Part::Domain => domain.to_owned(),
    }
}

/// Whether any value matches any key (`:count`: the number of values).
fn matches(m: Match, values: &[String], keys: &[String]) -> bool {
    if let Kind::Count(rel) = m.kind {
        let n = values.len() as u64;
        return keys.iter().any(|k| relate(numeric(k).map(|k| n.cmp(&k)), rel));
    }
    values.iter().any(|v| keys.iter().any(|k| one(m, v, k)))
}

fn relate(o: Option<std::cmp::Ordering>, rel: Rel) -> bool {
    use std::cmp::Ordering::*;
    let Some(o) = o else {
        return rel == Rel::Ne;
    };
    match rel {
        Rel::Gt => o == Greater,
        Rel::Ge => o != Less,
        Rel::Lt => o == Less,
        Rel::Le => o != Greater,
        Rel::Eq => o == Equal,
        Rel::Ne => o != Equal,
    }
}

/// i;ascii-numeric: the leading digits; none is "positive infinity".
fn numeric(s: &str) -> Option<u64> {
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() {
        None
    } else {
        Some(digits.parse().unwrap_or(u64::MAX))
    }
}

fn one(m: Match, value: &str, key: &str) -> bool {
    let fold = |s: &str| match m.cmp {
        Cmp::Casemap => s.to_ascii_lowercase(),
        _ => s.to_owned(),
    };
    match m.kind {
        Kind::Is if m.cmp == Cmp::Numeric => numeric(value) == numeric(key),
        Kind::Is => fold(value) == fold(key),
        Kind::Contains => fold(value).contains(&fold(key)),
        Kind::Matches => glob(fold(value).as_bytes(), fold(key).as_bytes()),
        Kind::Value(rel) => {
            let o = match m.cmp {
                Cmp::Numeric => match (numeric(value), numeric(key)) {
                    (Some(a), Some(b)) => Some(a.cmp(&b)),
                    (None, None) => Some(std::cmp::Ordering::Equal),
                    (None, Some(_)) => Some(std::cmp::Ordering::Greater),
                    (Some(_), None) => Some(std::cmp::Ordering::Less),
                },
                _ => Some(fold(value).cmp(&fold(key))),
            };
            relate(o, rel)
        }
        Kind::Count(_) => false,
    }
}

/// `:matches`: `*` any run, `?` one character, `\` escapes (bytes; a
/// multi-byte character counts as several for `?`). Linear backtracking
/// on the last `*`, so at most |value| × |pattern| steps.
fn glob(v: &[u8], p: &[u8]) -> bool {
    let (mut vi, mut pi) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while vi < v.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi, vi));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    vi += 1;
                    pi += 1;
                    continue;
                }
                b'\\' if pi + 1 < p.len() && p[pi + 1] == v[vi] => {
                    vi += 1;
                    pi += 2;
                    continue;
                }
                c if c != b'\\' && c == v[vi] => {
                    vi += 1;
                    pi += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sv)) => {
                pi = sp + 1;
                vi = sv + 1;
                star = Some((sp, sv + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::super::{SieveError, compile};
    use super::*;

    const MSG: &[u8] = b"From: \"Boss\" <boss@work.example>\r\nTo: alice@example.org, team@example.org\r\n\
Subject: Quarterly report [urgent]\r\nList-Id: <dev.lists.example>\r\nX-Spam-Score: 7\r\n\r\n\
Please read the attached report.\r\n";

    fn env() -> Envelope<'static> {
        Envelope {
            from: "boss@work.example",
            to: "alice@example.org",
        }
    }

    fn go(src: &str) -> Actions {
        run(&compile(src).unwrap_or_else(|e| panic!("{e}")), MSG, env())
    }

    fn folders(a: &Actions) -> Vec<&str> {
        a.fileinto.iter().map(|f| f.folder.as_str()).collect()
    }

    #[test]
    fn the_base_language_files_keeps_and_discards() {
        let a = go("");
        assert_eq!(a.keep, Some(vec![]), "the implicit keep");
        let a = go(r#"require "fileinto"; if header :contains "subject" "REPORT" { fileinto "Reports"; }"#);
        assert_eq!((a.keep.clone(), folders(&a)), (None, vec!["Reports"]));
        let a = go(
            r#"require ["fileinto"]; if header :is "subject" "nope" { fileinto "A"; } elsif address :domain :is "from" "WORK.example" { fileinto "Work"; } else { discard; }"#,
        );
        assert_eq!(folders(&a), ["Work"]);
        let a = go(r#"if exists "list-id" { discard; stop; } keep;"#);
        assert_eq!(a.keep, None, "stop before keep");
        let a = go(r#"if allof(not exists "x-none", size :over 10, size :under 1M, true) { discard; }"#);
        assert_eq!(a.keep, None);
        let a = go(r#"if anyof(false, header :matches "subject" "quarterly*[urgent]") { discard; }"#);
        assert_eq!(a.keep, None);
        let a = go(r#"require "envelope"; if envelope :localpart :is "to" "alice" { discard; }"#);
        assert_eq!(a.keep, None);
        let a = go(r#"if address :all :is "to" "team@example.org" { discard; }"#);
        assert_eq!(a.keep, None, "every address of a header counts");
        // Comments, multi-line strings and quantifiers.
        let a = go(
            "# a comment\n/* block\ncomment */ if size :over 1K { discard; }\nif header :is \"x\" text:\nhello\n.\n{ keep; }",
        );
        assert_eq!(a.keep, Some(vec![]));
    }

    #[test]
    fn copy_flags_redirect_relational_body_and_vacation() {
        let a = go(
            r#"require ["fileinto", "copy", "imap4flags"]; addflag "\\Flagged"; fileinto :copy "Archive"; fileinto :copy :flags "$Work" "Work";"#,
        );
        assert_eq!(
            a.keep,
            Some(vec!["\\Flagged".to_owned()]),
            "a :copy keeps the implicit keep"
        );
        assert_eq!(a.fileinto[0].flags, ["\\Flagged"]);
        assert_eq!(a.fileinto[1].flags, ["$Work"]);
        let a = go(
            r#"require ["relational", "comparator-i;ascii-numeric", "fileinto"]; if header :value "ge" :comparator "i;ascii-numeric" "x-spam-score" "5" { fileinto "Junk"; }"#,
        );
        assert_eq!(folders(&a), ["Junk"]);
        let a = go(
            r#"require ["relational", "comparator-i;ascii-numeric"]; if address :count "eq" :comparator "i;ascii-numeric" "to" "2" { discard; }"#,
        );
        assert_eq!(a.keep, None);
        let a = go(r#"require "body"; if body :contains "attached report" { discard; }"#);
        assert_eq!(a.keep, None);
        let a = go(r#"require "copy"; redirect "bob@example.org"; redirect :copy "x@y.example";"#);
        assert_eq!(a.redirect, ["bob@example.org", "x@y.example"]);
        assert_eq!(a.keep, None);
        let a = go(r#"require "vacation"; vacation :days 3 :subject "Away" "Back on Monday.";"#);
        let v = a.vacation.unwrap();
        assert_eq!(
            (v.days, v.subject.as_deref(), v.reason.as_str()),
            (3, Some("Away"), "Back on Monday.")
        );
        assert_eq!(a.keep, Some(vec![]), "vacation keeps");
    }

    #[test]
    fn errors_name_their_line_and_reason() {
        let bad = |src: &str| compile(src).unwrap_err();
        assert_eq!(
            bad("keep;\nfileinto \"x\";"),
            SieveError::at(2, "fileinto needs require \"fileinto\"")
        );
        assert_eq!(bad("require \"nosuch\";").reason, "unsupported extension \"nosuch\"");
        assert_eq!(bad("keep").reason, "expected ';' after a command");
        assert_eq!(bad("if true { keep;").reason, "missing '}'");
        assert_eq!(bad("else { keep; }").reason, "else without if");
        assert_eq!(bad("keep;\nrequire \"fileinto\";").line, 2);
        assert!(
            bad("if header :is :contains \"a\" \"b\" { keep; }")
                .reason
                .contains("more than one match type")
        );
        assert!(bad("frobnicate;").reason.contains("unknown command"));
        assert!(bad("if size 10 { keep; }").reason.contains(":over or :under"));
        assert!(bad("redirect \"not-an-address\";").reason.contains("not an address"));
        assert!(bad("\"unterminated").reason.contains("unterminated"));
        // Nesting and size are bounded.
        let deep = "if true {".repeat(40) + &"}".repeat(40);
        assert!(bad(&deep).reason.contains("nested deeper"));
        let huge = "keep;".repeat(20_000);
        assert!(bad(&huge).reason.contains("larger than"));
    }

    #[test]
    fn limits_keep_the_message() {
        let many: String = (0..10).map(|i| format!("redirect \"u{i}@x.example\";")).collect();
        let a = go(&many);
        assert_eq!(a.redirect.len(), REDIRECTS_MAX);
        assert_eq!(a.keep, Some(vec![]), "a limit reached keeps the message");
        assert!(a.errors[0].contains("redirects"));
        // A script as long as allowed never runs past its steps.
        let tests = "true,".repeat(999) + "true";
        let one = format!("if allof({tests}) {{ keep; }}\n");
        let a = go(&one.repeat(6));
        assert_eq!(a.keep, Some(vec![]));
        assert!(a.errors[0].contains("steps"));
    }

    #[test]
    fn the_fuzz_seed_with_every_extension_compiles() {
        let src = include_str!("../../../fuzz/corpus/sieve/full.sieve");
        let s = compile(src).unwrap_or_else(|e| panic!("{e}"));
        let msg = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: s\r\n\r\nbody\r\n";
        let env = Envelope {
            from: "a@b.example",
            to: "c@d.example",
        };
        let a = run(&s, msg, env);
        assert_eq!(a.redirect, ["z@y.example"], "{a:?}");
        assert_eq!(a.keep, Some(vec!["\\Flagged".to_owned()]));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]
        /// Soups of Sieve's own words: checked or refused, never a panic;
        /// when checked, run within the bounds.
        #[test]
        fn token_soup_never_panics(words in proptest::collection::vec(proptest::sample::select(vec![
            "require", "\"fileinto\"", "[\"copy\",\"imap4flags\"]", "if", "elsif", "else", "{", "}", "(", ")",
            ",", ";", "allof", "anyof", "not", "true", "false", "header", "address", "envelope", "size",
            "exists", "body", ":is", ":contains", ":matches", ":over", ":under", ":value", "\"ge\"", ":count",
            ":comparator", "\"i;octet\"", "keep", "discard", "stop", "fileinto", "redirect", "\"a@b.c\"",
            "\"Subject\"", "\"*x?\"", "100K", "0", "vacation", ":days", ":copy", ":create", ":flags",
            "setflag", "addflag", "hasflag", "text:\nhi\n.\n", "# c\n", "/* c */", "\"\\\"\"", "[", "]",
        ]), 0..60)) {
            let src = words.join(" ");
            if let Ok(script) = compile(&src) {
                let a = run(&script, MSG, env());
                proptest::prop_assert!(a.redirect.len() <= REDIRECTS_MAX);
            }
        }

        #[test]
        fn any_text_never_panics(src in "\\PC{0,300}") {
            let _ = compile(&src).map(|s| run(&s, src.as_bytes(), env()));
        }
    }

    #[test]
    fn glob_matches_like_sieve() {
        for (v, p, want) in [
            ("hello", "h*o", true),
            ("hello", "h?llo", true),
            ("hello", "*", true),
            ("", "*", true),
            ("hello", "he", false),
            ("a*b", "a\\*b", true),
            ("axb", "a\\*b", false),
            ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "*a*a*a*a*a*c", false),
        ] {
            assert_eq!(glob(v.as_bytes(), p.as_bytes()), want, "{v} {p}");
        }
    }
}
