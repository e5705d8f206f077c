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
}

impl LineSplitter {
    pub fn new(max_bytes: usize) -> Self {
        LineSplitter {
            max_bytes,
            line: Vec::new(),
            too_long: false,
            last: 0,
        }
    }

    /// Takes what it can of `available`: how many bytes it consumed, and
    /// the line they completed, if they did.
    pub fn push(&mut self, available: &[u8]) -> (usize, Option<Line>) {
        let (chunk, done) = match available.iter().position(|&b| b == b'\n') {
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn trims_either_line_end() {
        assert_eq!(trim_eol(b"a\r\n"), b"a");
        assert_eq!(trim_eol(b"a\n"), b"a");
        assert_eq!(trim_eol(b"a"), b"a");
    }
}
