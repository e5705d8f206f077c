//! ManageSieve (RFC 5804): the words of a command line, the strings the
//! server sends, and the capability response. The node's session reads
//! and writes; this holds the grammar.
//!
//! A command is an atom followed by strings, each quoted (`"..."`, with
//! `\"` and `\\`) or a literal (`{N+}` or `{N}` at the end of a line, then
//! exactly N bytes, then the rest of the command on the next line).

/// The longest command line (without literals).
pub const LINE_BYTES_MAX: usize = 8 * 1024;
/// The largest literal a client may send (a script and some room).
pub const LITERAL_BYTES_MAX: usize = crate::sieve::SCRIPT_BYTES_MAX + 1024;
/// Strings in one command, at most.
pub const ARGS_MAX: usize = 8;

/// One word of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Word {
    Atom(String),
    Str(String),
}

/// One line's words, and the literal it announces at its end, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub words: Vec<Word>,
    pub literal: Option<usize>,
}

/// Splits one line (without its CRLF) into words.
pub fn words(line: &[u8]) -> Result<Line, &'static str> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < line.len() {
        match line[i] {
            b' ' | b'\t' => i += 1,
            b'"' => {
                i += 1;
                let mut s = Vec::new();
                loop {
                    match line.get(i) {
                        None => return Err("unterminated string"),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') => {
                            match line.get(i + 1) {
                                Some(c @ (b'"' | b'\\')) => s.push(*c),
                                _ => return Err("bad escape in a string"),
                            }
                            i += 2;
                        }
                        Some(c) => {
                            s.push(*c);
                            i += 1;
                        }
                    }
                }
                out.push(Word::Str(String::from_utf8(s).map_err(|_| "a string is not UTF-8")?));
            }
            b'{' => {
                let end = line[i..].iter().position(|c| *c == b'}').ok_or("bad literal")? + i;
                if end + 1 != line.len() {
                    return Err("a literal must end its line");
                }
                let spec = std::str::from_utf8(&line[i + 1..end]).map_err(|_| "bad literal")?;
                let n: usize = spec
                    .strip_suffix('+')
                    .unwrap_or(spec)
                    .parse()
                    .map_err(|_| "bad literal length")?;
                if n > LITERAL_BYTES_MAX {
                    return Err("literal too large");
                }
                return Ok(Line {
                    words: out,
                    literal: Some(n),
                });
            }
            c if c.is_ascii_alphanumeric() => {
                let start = i;
                while i < line.len() && (line[i].is_ascii_alphanumeric() || line[i] == b'-') {
                    i += 1;
                }
                let atom = String::from_utf8_lossy(&line[start..i]).to_ascii_uppercase();
                out.push(Word::Atom(atom));
            }
            _ => return Err("unexpected character"),
        }
        if out.len() > ARGS_MAX + 1 {
            return Err("too many arguments");
        }
    }
    Ok(Line {
        words: out,
        literal: None,
    })
}

/// `s` as the server sends a string: quoted when it can be, else a
/// literal.
pub fn string(s: &str) -> String {
    if s.len() <= 1024 && !s.contains(['\r', '\n', '\0']) {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        format!("{{{}}}\r\n{s}", s.len())
    }
}

/// The capability response (RFC 5804 1.7), ending with OK.
pub fn capability(starttls: bool, sasl: bool) -> String {
    let mut out = String::from("\"IMPLEMENTATION\" \"Quill\"\r\n");
    out.push_str(&format!("\"SIEVE\" {}\r\n", string(&crate::sieve::capability())));
    if sasl {
        out.push_str("\"SASL\" \"PLAIN\"\r\n");
    } else {
        out.push_str("\"SASL\" \"\"\r\n");
    }
    if starttls {
        out.push_str("\"STARTTLS\"\r\n");
    }
    out.push_str(&format!("\"MAXREDIRECTS\" \"{}\"\r\n", crate::sieve::REDIRECTS_MAX));
    out.push_str("\"VERSION\" \"1.0\"\r\nOK");
    out
}

/// `NO` with a response code and the reason.
pub fn no(code: Option<&str>, why: &str) -> String {
    match code {
        Some(c) => format!("NO ({c}) {}", string(why)),
        None => format!("NO {}", string(why)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_strings_and_literals() {
        let l = words(br#"PUTSCRIPT "my \"s\"" {12+}"#).unwrap();
        assert_eq!(
            l.words,
            vec![Word::Atom("PUTSCRIPT".into()), Word::Str("my \"s\"".into())]
        );
        assert_eq!(l.literal, Some(12));
        assert_eq!(words(b"logout").unwrap().words, vec![Word::Atom("LOGOUT".into())]);
        assert_eq!(words(b"x {5}").unwrap().literal, Some(5));
        assert!(words(b"x \"open").is_err());
        assert!(words(b"x {99999999}").is_err());
        assert!(words(b"x {3} y").is_err());
        assert!(words(b"x \"a\\n\"").is_err());
        assert_eq!(string("a\"b"), "\"a\\\"b\"");
        assert_eq!(string("a\r\nb"), "{4}\r\na\r\nb");
        assert!(capability(true, false).contains("\"STARTTLS\"") && capability(true, false).ends_with("OK"));
        assert_eq!(no(Some("ACTIVE"), "it is"), "NO (ACTIVE) \"it is\"");
    }
}
