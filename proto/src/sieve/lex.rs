//! Sieve's tokens (RFC 5228 §8.1): identifiers, tags, numbers with their
//! K/M/G quantifiers, quoted and multi-line strings, and punctuation;
//! comments dropped. Every token knows its line.

use super::SieveError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Tok {
    Ident(String),
    /// `:name`, without the colon, lower-cased.
    Tag(String),
    Number(u64),
    Str(String),
    LBracket,
    RBracket,
    LBrace,
    RBrace,
    LParen,
    RParen,
    Comma,
    Semi,
}

pub(super) fn tokens(src: &str) -> Result<Vec<(Tok, usize)>, SieveError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let (mut i, mut line) = (0usize, 1usize);
    while i < b.len() {
        let c = b[i];
        let at = line;
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b' ' | b'\t' | b'\r' => i += 1,
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                loop {
                    if i + 1 >= b.len() {
                        return Err(SieveError::at(at, "unterminated comment"));
                    }
                    if b[i] == b'*' && b[i + 1] == b'/' {
                        i += 2;
                        break;
                    }
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
            }
            b'[' | b']' | b'{' | b'}' | b'(' | b')' | b',' | b';' => {
                out.push((
                    match c {
                        b'[' => Tok::LBracket,
                        b']' => Tok::RBracket,
                        b'{' => Tok::LBrace,
                        b'}' => Tok::RBrace,
                        b'(' => Tok::LParen,
                        b')' => Tok::RParen,
                        b',' => Tok::Comma,
                        _ => Tok::Semi,
                    },
                    at,
                ));
                i += 1;
            }
            b'"' => {
                i += 1;
                let mut s = Vec::new();
                loop {
                    match b.get(i) {
                        None => return Err(SieveError::at(at, "unterminated string")),
                        Some(b'"') => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') if i + 1 < b.len() => {
                            s.push(b[i + 1]);
                            if b[i + 1] == b'\n' {
                                line += 1;
                            }
                            i += 2;
                        }
                        Some(&ch) => {
                            if ch == b'\n' {
                                line += 1;
                            }
                            s.push(ch);
                            i += 1;
                        }
                    }
                }
                out.push((Tok::Str(String::from_utf8_lossy(&s).into_owned()), at));
            }
            b':' => {
                let start = i + 1;
                i = start;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                if i == start {
                    return Err(SieveError::at(at, "a tag needs a name after ':'"));
                }
                out.push((Tok::Tag(src[start..i].to_ascii_lowercase()), at));
            }
            b'0'..=b'9' => {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                let n: u64 = src[start..i]
                    .parse()
                    .map_err(|_| SieveError::at(at, "number too large"))?;
                let mult = match b.get(i).map(u8::to_ascii_uppercase) {
                    Some(b'K') => 1 << 10,
                    Some(b'M') => 1 << 20,
                    Some(b'G') => 1 << 30,
                    _ => 1,
                };
                if mult > 1 {
                    i += 1;
                }
                let n = n
                    .checked_mul(mult)
                    .ok_or_else(|| SieveError::at(at, "number too large"))?;
                out.push((Tok::Number(n), at));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                let word = src[start..i].to_ascii_lowercase();
                if word == "text" && b.get(i) == Some(&b':') {
                    // A multi-line string: to the end of this line, then
                    // lines up to one that is a lone ".", dot-stuffed.
                    i += 1;
                    while i < b.len() && b[i] != b'\n' {
                        if !matches!(b[i], b' ' | b'\t' | b'\r') && b[i] != b'#' {
                            return Err(SieveError::at(at, "text: must end its line"));
                        }
                        if b[i] == b'#' {
                            while i < b.len() && b[i] != b'\n' {
                                i += 1;
                            }
                            break;
                        }
                        i += 1;
                    }
                    i += 1;
                    line += 1;
                    let mut s = String::new();
                    loop {
                        if i >= b.len() {
                            return Err(SieveError::at(at, "unterminated text: string"));
                        }
                        let end = src[i..].find('\n').map_or(b.len(), |e| i + e);
                        let l = src[i..end].trim_end_matches('\r');
                        i = (end + 1).min(b.len());
                        line += 1;
                        if l == "." {
                            break;
                        }
                        s.push_str(l.strip_prefix('.').filter(|_| l.starts_with("..")).unwrap_or(l));
                        s.push_str("\r\n");
                    }
                    out.push((Tok::Str(s), at));
                } else {
                    out.push((Tok::Ident(word), at));
                }
            }
            _ => {
                return Err(SieveError::at(at, format!("unexpected character {:?}", char::from(c))));
            }
        }
    }
    Ok(out)
}
