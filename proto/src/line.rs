//! Lines out of a byte stream, bounded: the one splitter every line
//! protocol (and the DATA reader) stands on. The shell reads; this only
//! decides where a line ends and what is kept of it.

/// One line read from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line, terminator included (`\n` or `\r\n`).
    Ok(Vec<u8>),
    /// The line was longer than allowed; it has been read and thrown away.
    /// `crlf`: whether it ended with `\r\n` (not a bare `\n`), which the
    /// DATA reader needs to find the one true end of a message.
    TooLong { crlf: bool },
    /// The client closed the connection (a partial last line is dropped).
    Eof,
    /// Nothing arrived within the idle timeout.
    Idle,
}

/// A line as [`LineSplitter::next_in`] lends it: borrowed from the bytes
/// offered (or from the splitter, for a line that crossed reads), copied
/// nowhere.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum LineRef<'a> {
    /// A whole line, terminator included.
    Ok(&'a [u8]),
    /// Longer than allowed, read and thrown away; see [`Line::TooLong`].
    TooLong { crlf: bool },
}

/// Cuts lines of at most `max_bytes` (terminator included) out of the
/// bytes offered to it, whatever their chunking: memory stays bounded by
/// `max_bytes` whatever the client sends.
#[derive(Debug)]
pub struct LineSplitter {
    max_bytes: usize,
    line: Vec<u8>,
    too_long: bool,
    /// The last byte consumed, to tell `\r\n` from a bare `\n` when the
    /// line itself was thrown away.
    last: u8,
    /// `line` holds a line [`Self::next_in`] lent: cleared at the next call.
    lent: bool,
}

impl LineSplitter {
    pub fn new(max_bytes: usize) -> Self {
        LineSplitter {
            max_bytes,
            line: Vec::new(),
            too_long: false,
            last: 0,
            lent: false,
        }
    }

    /// Takes what it can of `available`: how many bytes it consumed, and
    /// the line they completed, if they did.
    pub fn push(&mut self, available: &[u8]) -> (usize, Option<Line>) {
        let (chunk, done) = match memchr::memchr(b'\n', available) {
            Some(i) => (&available[..=i], true),
            None => (available, false),
        };
        let n = chunk.len();
        if n == 0 {
            return (0, None);
        }
        let before_lf = if n >= 2 { chunk[n - 2] } else { self.last };
        self.last = chunk[n - 1];
        if !self.too_long {
            if self.line.len() + n > self.max_bytes {
                self.too_long = true;
                self.line = Vec::new();
            } else {
                self.line.extend_from_slice(chunk);
            }
        }
        if !done {
            return (n, None);
        }
        let line = if std::mem::take(&mut self.too_long) {
            Line::TooLong {
                crlf: before_lf == b'\r',
            }
        } else {
            Line::Ok(std::mem::take(&mut self.line))
        };
        (n, Some(line))
    }

    /// As [`Self::push`], lending the line instead of giving it: a line
    /// that lies whole in `available` is a slice of it (no copy, no
    /// allocation: a DATA body is read this way); one that began in an
    /// earlier read is the splitter's, until the next call.
    pub fn next_in<'a>(&'a mut self, available: &'a [u8]) -> (usize, Option<LineRef<'a>>) {
        if self.lent {
            self.line.clear();
            self.lent = false;
        }
        if self.line.is_empty()
            && !self.too_long
            && let Some(i) = memchr::memchr(b'\n', available)
        {
            let n = i + 1;
            self.last = b'\n';
            if n <= self.max_bytes {
                return (n, Some(LineRef::Ok(&available[..n])));
            }
            let crlf = n >= 2 && available[n - 2] == b'\r';
            return (n, Some(LineRef::TooLong { crlf }));
        }
        let (n, line) = self.push(available);
        match line {
            None => (n, None),
            Some(Line::Ok(l)) => {
                // Lent from the splitter's own buffer, kept for the next line.
                self.line = l;
                self.lent = true;
                (n, Some(LineRef::Ok(&self.line)))
            }
            Some(Line::TooLong { crlf }) => (n, Some(LineRef::TooLong { crlf })),
            Some(Line::Eof | Line::Idle) => (n, None),
        }
    }

    /// Every line of `data` offered in chunks of `chunk` bytes (tests and
    /// fuzz targets: lines cross the chunks as reads cut them), then `Eof`.
    pub fn split_all(max_bytes: usize, data: &[u8], chunk: usize) -> Vec<Line> {
        let mut s = LineSplitter::new(max_bytes);
        let mut out = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            let mut rest = piece;
            while !rest.is_empty() {
                let (n, line) = s.push(rest);
                rest = &rest[n..];
                out.extend(line);
            }
        }
        out.push(Line::Eof);
        out
    }
}

/// Strips a trailing `\r\n` or `\n`.
pub fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A command line as an operator's log may show it: the verb and, for
/// verbs whose arguments carry no secret (addresses, message numbers), the
/// arguments, cut at 200 characters with anything unprintable as `?`.
/// Credentials (AUTH, PASS, APOP, LOGIN, AUTHENTICATE) show the verb only,
/// and a line that is no known verb (a SASL response, a password sent as
/// a literal) shows only its length.
pub fn loggable(line: &[u8]) -> String {
    const WITH_ARGS: &[&str] = &[
        "HELO",
        "EHLO",
        "LHLO",
        "MAIL",
        "RCPT",
        "DATA",
        "BDAT",
        "RSET",
        "NOOP",
        "QUIT",
        "VRFY",
        "STARTTLS",
        "USER",
        "STAT",
        "LIST",
        "RETR",
        "DELE",
        "TOP",
        "UIDL",
        "CAPA",
        "UTF8",
        "STLS",
        "HAVESPACE",
        "LISTSCRIPTS",
        "GETSCRIPT",
        "SETACTIVE",
        "DELETESCRIPT",
        "RENAMESCRIPT",
        "CHECKSCRIPT",
        "PUTSCRIPT",
        "CAPABILITY",
        "LOGOUT",
        "UNAUTHENTICATE",
    ];
    const SECRET: &[&str] = &["AUTH", "PASS", "APOP", "LOGIN", "AUTHENTICATE"];
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\r', '\n']);
    let verb = text.split(' ').next().unwrap_or("");
    let upper = verb.to_ascii_uppercase();
    if SECRET.contains(&upper.as_str()) {
        return format!("{upper} (credentials hidden)");
    }
    if !WITH_ARGS.contains(&upper.as_str()) {
        return format!("(a line of {} bytes)", line.len());
    }
    let shown: String = text
        .chars()
        .take(200)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    if text.chars().count() > 200 {
        format!("{shown}...")
    } else {
        shown
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn loggable_hides_credentials_and_unknown_lines() {
        use super::loggable;
        assert_eq!(loggable(b"MAIL FROM:<a@b.test>\r\n"), "MAIL FROM:<a@b.test>");
        assert_eq!(loggable(b"pass hunter2\r\n"), "PASS (credentials hidden)");
        assert_eq!(
            loggable(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n"),
            "AUTH (credentials hidden)"
        );
        assert_eq!(loggable(b"AGFsaWNlAHNlY3JldA==\r\n"), "(a line of 22 bytes)");
        assert_eq!(loggable(b"RCPT TO:<x\x1b[31m@y>\r\n"), "RCPT TO:<x?[31m@y>");
        assert!(loggable(&[b'N', b'O', b'O', b'P', b' '].repeat(100)).ends_with("..."));
    }

    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Line> {
        LineSplitter::split_all(max, input, 4)
    }

    #[test]
    fn bounded_lines() {
        assert_eq!(
            lines(b"ab\r\ncdefghij\r\nk\npartial", 6),
            vec![
                Line::Ok(b"ab\r\n".to_vec()),
                Line::TooLong { crlf: true },
                Line::Ok(b"k\n".to_vec()),
                Line::Eof
            ]
        );
        assert_eq!(lines(b"123456\n", 7), vec![Line::Ok(b"123456\n".to_vec()), Line::Eof]);
        assert_eq!(lines(b"1234567\n", 7), vec![Line::TooLong { crlf: false }, Line::Eof]);
        // The CR and LF arrive in different chunks (4 bytes each).
        assert_eq!(lines(b"1234567\r\n", 7), vec![Line::TooLong { crlf: true }, Line::Eof]);
        assert_eq!(
            lines(b"123456789\r\n", 7),
            vec![Line::TooLong { crlf: true }, Line::Eof]
        );
    }

    /// What `next_in` lends, owned, for every line of `data` offered in
    /// chunks of `chunk` bytes.
    fn lent_lines(max: usize, data: &[u8], chunk: usize) -> Vec<Line> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for piece in data.chunks(chunk.max(1)) {
            let mut rest = piece;
            while !rest.is_empty() {
                let (n, line) = s.next_in(rest);
                out.extend(line.map(|l| match l {
                    LineRef::Ok(b) => Line::Ok(b.to_vec()),
                    LineRef::TooLong { crlf } => Line::TooLong { crlf },
                }));
                rest = &rest[n..];
            }
        }
        out.push(Line::Eof);
        out
    }

    #[test]
    fn lent_lines_are_the_lines_pushed_whatever_the_chunks() {
        let input = b"ab\r\ncdefghij\r\nk\n\r\n1234567\r\n.\r\nx\ny\rz\r\npartial";
        for max in [3, 6, 7, 8, 64] {
            for chunk in [1, 2, 3, 4, 5, 7, 11, 64] {
                assert_eq!(
                    lent_lines(max, input, chunk),
                    LineSplitter::split_all(max, input, chunk),
                    "max {max} chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn trims_either_line_end() {
        assert_eq!(trim_eol(b"a\r\n"), b"a");
        assert_eq!(trim_eol(b"a\n"), b"a");
        assert_eq!(trim_eol(b"a"), b"a");
    }
}
