//! The bounce: a delivery status notification (RFC 3464) for the
//! recipients that failed (or, as a warning, still wait), and the RFC 3463
//! status of a remote reply.

use super::Envelope;
use crate::message::{header_end, rfc5322_date};

/// One recipient's end, for a bounce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    pub rcpt: String,
    /// RFC 3463 status, e.g. `5.1.1`.
    pub status: String,
    /// The remote server's reply (or what went wrong), one line.
    pub diagnostic: String,
    /// The host that answered, if any.
    pub remote: Option<String>,
}

/// A delivery status notification (RFC 3464) to `env.from` for the
/// recipients in `failed`: a human-readable part, the machine-readable
/// `message/delivery-status` and the original message's header
/// (`text/rfc822-headers`). Sent with the null sender. `delayed`: a delay
/// warning (the recipients are still being tried), else a failure (an
/// expired message fails with its `4.4.7`). Hand-built: the format is
/// fixed ASCII (no crate writes RFC 3464 reports), and the copied header
/// is the original's bytes as they are.
pub fn dsn(
    me: &str,
    env: &Envelope,
    original: &[u8],
    failed: &[Failed],
    delayed: bool,
    now_ms: u64,
    id: &str,
) -> Vec<u8> {
    let boundary = format!("=_quill_dsn_{id}");
    let date = rfc5322_date(now_ms / 1000);
    let header = &original[..header_end(original)];
    let subject = if delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    let (said, action) = if delayed {
        (
            "Your message has not been delivered yet to one or more recipients; it is still being tried.",
            "delayed",
        )
    } else {
        (
            "Your message could not be delivered to one or more recipients.",
            "failed",
        )
    };
    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@{me}>\r\n\
         To: <{to}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <dsn.{id}@{me}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\
         \r\n\
         This is a MIME-encapsulated message.\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is the mail system at {me}.\r\n\
         \r\n\
         {said}\r\n\
         \r\n",
        to = env.from,
    );
    for f in failed {
        out.push_str(&format!("<{}>: {}\r\n", f.rcpt, one_line(&f.diagnostic)));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; {me}\r\n\
         Arrival-Date: {}\r\n",
        rfc5322_date(env.queued_ms / 1000)
    ));
    for f in failed {
        out.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\nAction: {action}\r\nStatus: {}\r\n",
            f.rcpt, f.status
        ));
        if let Some(remote) = &f.remote {
            out.push_str(&format!("Remote-MTA: dns; {remote}\r\n"));
        }
        out.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", one_line(&f.diagnostic)));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(header);
    if !header.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// A reply or error as one printable ASCII line (header-safe).
fn one_line(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { ' ' })
        .collect();
    out.truncate(400);
    out
}

/// The RFC 3463 status of a remote reply: its enhanced code if it gave
/// one, else one made from the reply code's class.
pub fn status_of(code: u16, text: &str) -> String {
    let first = text.split_whitespace().next().unwrap_or("");
    let looks = first.split('.').count() == 3
        && first
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if looks && first.starts_with(['2', '4', '5']) {
        return first.to_owned();
    }
    match code / 100 {
        2 => "2.0.0".to_owned(),
        4 => "4.0.0".to_owned(),
        _ => "5.0.0".to_owned(),
    }
}
