//! What the protocols read out of a stored message (RFC 5322): where its
//! header ends, its fields, the hops it has made, its `From:` addresses,
//! and the dates written into headers.

/// `Received:` headers a message may carry before it is taken for a loop
/// (RFC 5321 6.3).
pub const RECEIVED_MAX: usize = 50;

/// Where the header ends: after the first empty line (the whole message
/// if there is none).
pub fn header_end(b: &[u8]) -> usize {
    if b.starts_with(b"\r\n") {
        return 2;
    }
    b.windows(4).position(|w| w == b"\r\n\r\n").map_or(b.len(), |p| p + 4)
}

/// The header's fields: (name, the whole field with its CRLFs), folded
/// lines kept with the field they continue.
pub fn header_fields(header: &[u8]) -> Vec<(&[u8], &[u8])> {
    let mut out: Vec<(&[u8], &[u8])> = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < header.len() {
        let end = header[i..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map_or(header.len(), |p| i + p + 2);
        let line = &header[i..end];
        let continuation = line.first().is_some_and(|c| *c == b' ' || *c == b'\t');
        if !continuation && i > start {
            push_field(&mut out, &header[start..i]);
            start = i;
        }
        i = end;
    }
    if start < header.len() {
        push_field(&mut out, &header[start..]);
    }
    out
}

fn push_field<'a>(out: &mut Vec<(&'a [u8], &'a [u8])>, field: &'a [u8]) {
    if let Some(colon) = field.iter().position(|c| *c == b':') {
        out.push((&field[..colon], field));
    }
}

/// Counts the `Received:` headers of a message's header.
pub fn received_count(message: &[u8]) -> usize {
    let end = header_end(message);
    message[..end]
        .split(|b| *b == b'\n')
        .filter(|l| l.len() >= 9 && l[..9].eq_ignore_ascii_case(b"received:"))
        .count()
}

/// Whether the header already has `Delivered-To: <address>` (a loop
/// through a forward back to the same mailbox).
pub fn delivered_to(message: &[u8], address: &str) -> bool {
    let end = header_end(message);
    message[..end].split(|b| *b == b'\n').any(|l| {
        l.len() > 13
            && l[..13].eq_ignore_ascii_case(b"delivered-to:")
            && String::from_utf8_lossy(&l[13..]).trim().eq_ignore_ascii_case(address)
    })
}

/// Whether a message arriving here loops: more hops than
/// [`RECEIVED_MAX`] (besides this node's own `Received:`, which `body`
/// starts with), or a `Delivered-To:` naming one of its recipients.
pub fn is_loop<'a>(body: &[u8], mut rcpts: impl Iterator<Item = &'a str>) -> bool {
    received_count(body) > RECEIVED_MAX + 1 || rcpts.any(|r| delivered_to(body, r))
}

/// The domain of an address (lower case), if it has one.
pub fn domain_of(address: &str) -> Option<String> {
    let (_, d) = address.rsplit_once('@')?;
    (!d.is_empty()).then(|| d.trim_end_matches('.').to_ascii_lowercase())
}

/// Whether every `From:` address of the message is `user` (and there is
/// one): RFC 6409 8.1's check that a submitter sends as itself.
pub fn from_is(message: &[u8], user: &str) -> bool {
    from_all(message, |a| a.eq_ignore_ascii_case(user))
}

/// Whether the message has a `From:` and `allowed` holds for every
/// address in it (submission: the addresses the user may send as).
pub fn from_all(message: &[u8], allowed: impl Fn(&str) -> bool) -> bool {
    let Some(m) = mail_parser::MessageParser::default().parse_headers(message) else {
        return false;
    };
    let Some(from) = m.from() else { return false };
    let mut any = false;
    for a in from.iter() {
        any = true;
        if !a.address.as_deref().is_some_and(&allowed) {
            return false;
        }
    }
    any
}

/// The domain (lower case) of the first `From:` address (RFC 5322.From),
/// if the message has one: the domain a DKIM signature speaks for.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let m = mail_parser::MessageParser::default().parse_headers(message)?;
    let first = m.from()?.first()?;
    domain_of(first.address.as_deref()?)
}

/// A client-supplied name made safe for a header: printable ASCII only,
/// at most 255 bytes.
pub fn clean_name(s: &str) -> String {
    s.chars().filter(|c| c.is_ascii_graphic()).take(255).collect()
}

/// A message made transparent (RFC 5321 4.5.2, RFC 1939 3): a dot before
/// every line that starts with one, CRLF at the end, then the terminating
/// `.` line, appended to `out` (SMTP's DATA, POP3's RETR).
pub fn dot_stuff(body: &[u8], out: &mut Vec<u8>) {
    out.reserve(body.len() + 64);
    let mut at_line_start = true;
    for &b in body {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
}

/// `Sat, 28 Nov 2026 16:49:35 +0000` for a time in seconds since the epoch.
pub fn rfc5322_date(unix_secs: u64) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = unix_secs / 86_400;
    let secs = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(rfc5322_date(1_795_884_575), "Sat, 28 Nov 2026 16:49:35 +0000");
    }

    #[test]
    fn fields_keep_their_folded_lines() {
        let h = b"Subject: hi\r\nFrom: a@b\r\n x\r\nTo: c@d\r\n\r\n";
        let f = header_fields(h);
        assert_eq!(f.len(), 3);
        assert_eq!(f[1], (&b"From"[..], &b"From: a@b\r\n x\r\n"[..]));
        assert_eq!(header_end(b"no header end"), 13);
        assert_eq!(header_end(b"\r\nbody"), 2);
    }

    #[test]
    fn the_from_check() {
        assert!(from_is(
            b"From: Alice <alice@example.org>\r\n\r\nx",
            "ALICE@example.org"
        ));
        assert!(!from_is(
            b"From: alice@example.org, eve@example.org\r\n\r\nx",
            "alice@example.org"
        ));
        assert!(!from_is(b"Subject: no from\r\n\r\nx", "alice@example.org"));
    }

    #[test]
    fn the_from_domain() {
        let m = b"To: x@y\r\nFrom: \"A, B\" <Alice@Example.ORG>, eve@evil.test\r\n\r\nx";
        assert_eq!(from_domain(m).as_deref(), Some("example.org"));
        assert_eq!(from_domain(b"From: nobody\r\n\r\nx"), None);
        assert_eq!(from_domain(b"Subject: s\r\n\r\nx"), None);
    }

    #[test]
    fn loops() {
        let mut m = Vec::new();
        for _ in 0..RECEIVED_MAX + 2 {
            m.extend_from_slice(b"Received: from x by y\r\n");
        }
        m.extend_from_slice(b"\r\nbody\r\n");
        assert!(is_loop(&m, std::iter::empty()));
        let one = b"Received: a\r\nDelivered-To: bob@example.org\r\n\r\n";
        assert!(is_loop(one, ["bob@example.org"].into_iter()));
        assert!(!is_loop(one, ["carol@example.org"].into_iter()));
    }
}
