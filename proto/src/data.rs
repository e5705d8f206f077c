//! The DATA section of SMTP and LMTP, line by line: where a message ends,
//! dot-unstuffing, and what makes a message unacceptable. Pure (no I/O), so
//! every byte sequence that matters is tested directly.
//!
//! Only `<CRLF>.<CRLF>` ends a message (RFC 5321 §4.1.1.4): a `.` line
//! counts only when the line before it ended with CRLF. A bare LF or a bare
//! CR anywhere in the data makes the message refused once its real end has
//! come, so that `<LF>.<CRLF>`, `<LF>.<LF>` or `<CR>.<CR>` can neither end a
//! message early nor let the text after them be read as commands (the 2023
//! "SMTP smuggling" class: CVE-2023-51764, -51765, -51766). Receivers
//! disagree about bare line ends, so accepting them would let a sender
//! split one message into two at the next hop; refusing them is the one
//! reading that is safe everywhere (RFC 5321 §2.3.8: bare CR and LF "MUST
//! NOT" be sent).

use crate::line::{Line, LineRef};

/// The longest line accepted inside a message, CRLF included. RFC 5322's
/// 998 characters are broken by real senders (long HTML lines, base64
/// without folding); like the large receivers, Quill stores such lines
/// unchanged and leaves the guarding to the message size limit. This bound
/// only keeps one line from being absurd.
pub const DATA_LINE_BYTES_MAX: usize = 1 << 20;

/// Why a message was refused after its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooBig,
    LineTooLong,
    BareLineEnd,
    /// The node's budget for messages held in memory is spent.
    NoMemory,
}

/// What one line did to the message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// More data to come.
    More,
    /// `<CRLF>.<CRLF>`: the message is complete.
    End(Result<Vec<u8>, Refusal>),
}

/// Collects a message from the lines after `354`.
#[derive(Debug)]
pub struct DataReader {
    body: Vec<u8>,
    max_bytes: usize,
    /// Whether the previous line ended with CRLF (the DATA command did).
    after_crlf: bool,
    refusal: Option<Refusal>,
}

impl DataReader {
    /// `body` starts with what goes before the data (the `Received:`
    /// header); `max_bytes` bounds the whole.
    pub fn new(mut body: Vec<u8>, max_bytes: usize) -> Self {
        body.reserve(8 * 1024);
        DataReader {
            body,
            max_bytes,
            after_crlf: true,
            refusal: None,
        }
    }

    /// Bytes of memory the message holds so far (its buffer's capacity).
    pub fn held(&self) -> usize {
        self.body.capacity()
    }

    /// Refuses the message (it is read to its end and dropped).
    pub fn refuse(&mut self, why: Refusal) {
        // The first reason stands; the buffer goes at once.
        self.refusal.get_or_insert(why);
        self.body = Vec::new();
    }

    /// Takes one line as the shell's reader cut it (`Ok` or
    /// `TooLong`; the caller handles end of input and idleness).
    pub fn line(&mut self, line: &Line) -> Step {
        match line {
            Line::Ok(l) => self.whole_line(l),
            Line::TooLong { crlf } => self.line_ref(LineRef::TooLong { crlf: *crlf }),
            Line::Eof | Line::Idle => Step::More,
        }
    }

    /// Takes one line as [`crate::line::LineSplitter::next_in`] lends it.
    pub fn line_ref(&mut self, line: LineRef<'_>) -> Step {
        match line {
            LineRef::Ok(l) => self.whole_line(l),
            LineRef::TooLong { crlf } => {
                self.refuse(Refusal::LineTooLong);
                self.after_crlf = crlf;
                Step::More
            }
        }
    }

    fn whole_line(&mut self, line: &[u8]) -> Step {
        let crlf = line.ends_with(b"\r\n");
        if self.after_crlf && line == b".\r\n" {
            let body = std::mem::take(&mut self.body);
            return Step::End(match self.refusal {
                Some(r) => Err(r),
                None => Ok(body),
            });
        }
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = if crlf { &content[..content.len() - 1] } else { content };
        let at_line_start = self.after_crlf;
        self.after_crlf = crlf;
        if !crlf || content.contains(&b'\r') {
            self.refuse(Refusal::BareLineEnd);
        }
        if self.refusal.is_some() {
            return Step::More;
        }
        let content = match content.strip_prefix(b".") {
            Some(rest) if at_line_start => rest,
            _ => content,
        };
        if self.body.len() + content.len() + 2 > self.max_bytes {
            self.refuse(Refusal::TooBig);
            return Step::More;
        }
        self.body.extend_from_slice(content);
        self.body.extend_from_slice(b"\r\n");
        Step::More
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::line::LineSplitter;

    /// Feeds `input` through the line splitter in small chunks, as a
    /// session's reads cut it, and returns each message's outcome and what
    /// was left after the first one ended (what the session would take as
    /// commands).
    fn run(input: &[u8], max: usize, line_max: usize) -> (Vec<Result<Vec<u8>, Refusal>>, Vec<u8>) {
        let mut out = Vec::new();
        let mut reader = DataReader::new(Vec::new(), max);
        let mut rest = Vec::new();
        for l in LineSplitter::split_all(line_max, input, 7) {
            if l == Line::Eof {
                break;
            }
            if !out.is_empty() {
                if let Line::Ok(b) = &l {
                    rest.extend_from_slice(b);
                }
                continue;
            }
            if let Step::End(m) = reader.line(&l) {
                out.push(m);
            }
        }
        (out, rest)
    }

    #[test]
    fn only_crlf_dot_crlf_ends_a_message() {
        let (m, rest) = run(b"a\r\n..b\r\n.\r\nQUIT\r\n", 1000, 100);
        assert_eq!(m, vec![Ok(b"a\r\n.b\r\n".to_vec())]);
        assert_eq!(rest, b"QUIT\r\n");
        // An empty message.
        let (m, _) = run(b".\r\n", 1000, 100);
        assert_eq!(m, vec![Ok(Vec::new())]);
    }

    #[test]
    fn smuggling_sequences_neither_end_the_message_nor_become_commands() {
        // Each smuggles a second transaction behind a non-standard "end".
        let smuggled = b"MAIL FROM:<admin@example.org>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\nevil\r\n";
        for fake_end in [
            &b"\n.\r\n"[..],
            b"\n.\n",
            b"\r.\r\n",
            b"\r.\r",
            b"\r\n.\n",
            b"\r\n.\r",
            b"\n.\r",
        ] {
            let mut input = b"Subject: hi\r\n\r\nbody".to_vec();
            input.extend_from_slice(fake_end);
            input.extend_from_slice(smuggled);
            input.extend_from_slice(b".\r\nQUIT\r\n");
            let (m, rest) = run(&input, 100_000, 1000);
            assert_eq!(
                m,
                vec![Err(Refusal::BareLineEnd)],
                "{:?}",
                String::from_utf8_lossy(fake_end)
            );
            assert_eq!(rest, b"QUIT\r\n", "{:?}", String::from_utf8_lossy(fake_end));
        }
    }

    #[test]
    fn a_lone_dot_lf_line_is_not_rewritten_into_an_end() {
        // `.<LF>` is not an end, and the message is refused, not stored
        // with the line changed.
        let (m, rest) = run(b"a\r\n.\nb\r\n.\r\nNOOP\r\n", 1000, 100);
        assert_eq!(m, vec![Err(Refusal::BareLineEnd)]);
        assert_eq!(rest, b"NOOP\r\n");
    }

    #[test]
    fn a_too_long_line_ending_in_a_bare_lf_cannot_end_the_message() {
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\n.\r\nMAIL FROM:<a@b>\r\n.\r\nNOOP\r\n");
        let (m, rest) = run(&input, 100_000, 20);
        assert_eq!(m, vec![Err(Refusal::LineTooLong)]);
        assert_eq!(rest, b"NOOP\r\n");
        // With CRLF it is a line like any other: the next dot ends.
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\r\n.\r\nNOOP\r\n");
        let (m, rest) = run(&input, 100_000, 20);
        assert_eq!(m, vec![Err(Refusal::LineTooLong)]);
        assert_eq!(rest, b"NOOP\r\n");
    }

    #[test]
    fn lines_up_to_the_bound_are_kept_unchanged() {
        // 1000 characters + CRLF: over RFC 5322's 998, kept as is.
        let line = vec![b'y'; 1000];
        let mut input = line.clone();
        input.extend_from_slice(b"\r\n.\r\n");
        let (m, _) = run(&input, 100_000, 1002);
        let mut want = line.clone();
        want.extend_from_slice(b"\r\n");
        assert_eq!(m, vec![Ok(want)]);
        // Exactly the bound (CRLF included) passes, one more does not.
        let (m, _) = run(&input, 100_000, 1001);
        assert_eq!(m, vec![Err(Refusal::LineTooLong)]);
    }

    #[test]
    fn size_bound() {
        let (m, _) = run(b"0123456789\r\n.\r\n", 12, 100);
        assert_eq!(m, vec![Ok(b"0123456789\r\n".to_vec())]);
        let (m, _) = run(b"0123456789\r\n.\r\n", 11, 100);
        assert_eq!(m, vec![Err(Refusal::TooBig)]);
    }
}
