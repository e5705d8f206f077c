//! Vacation replies (RFC 5230, RFC 3834): whom never to answer, and the
//! reply itself. The once-per-sender-per-days rule needs state across the
//! cluster: the node keeps it at the user's manager.

use super::Vacation;

/// Whether a vacation reply may go to the sender of `raw` (envelope
/// sender `from`) for `user` (its address) and the user's other
/// `addresses`: never to the null sender or a list or daemon address,
/// never to oneself, never to mail that is automatic (`Auto-Submitted`),
/// bulk or from a list (`Precedence`, `List-*`), and only to mail that
/// names the user in `To:`, `Cc:` or `Bcc:` (a message that reached the
/// user through a list or a blind alias is not answered).
pub fn may_reply(raw: &[u8], from: &str, user: &str, addresses: &[String]) -> bool {
    let sender = from.to_ascii_lowercase();
    let Some((local, _)) = sender.rsplit_once('@') else {
        return false;
    };
    if local.is_empty()
        || local == "mailer-daemon"
        || local == "listserv"
        || local == "majordomo"
        || local.starts_with("owner-")
        || local.ends_with("-request")
        || local.starts_with("bounce")
        || quill_srs_like(local)
    {
        return false;
    }
    let mine = |a: &str| a.eq_ignore_ascii_case(user) || addresses.iter().any(|x| x.eq_ignore_ascii_case(a));
    if mine(&sender) {
        return false;
    }
    let Some(m) = mail_parser::MessageParser::default().parse_headers(raw) else {
        return false;
    };
    for h in m.headers() {
        let name = h.name().to_ascii_lowercase();
        let value = m.header_raw(h.name()).unwrap_or_default().trim().to_ascii_lowercase();
        match name.as_str() {
            "auto-submitted" if value != "no" => return false,
            "precedence" if matches!(value.as_str(), "bulk" | "list" | "junk") => return false,
            "list-id" | "list-post" | "list-unsubscribe" | "list-help" => return false,
            "x-auto-response-suppress" if value.contains("oof") || value.contains("all") => return false,
            _ => {}
        }
    }
    ["to", "cc", "bcc", "resent-to", "resent-cc"].iter().any(|hn| {
        m.headers()
            .iter()
            .filter(|h| h.name().eq_ignore_ascii_case(hn))
            .filter_map(|h| h.value().as_address())
            .any(|a| a.iter().any(|x| x.address.as_deref().is_some_and(mine)))
    })
}

/// A bounce address of a forwarder (SRS): it is not a person.
fn quill_srs_like(local: &str) -> bool {
    crate::srs::is_srs(local)
}

/// The reply to `raw` from `user`, to `to`: `Auto-Submitted:
/// auto-replied`, `In-Reply-To`/`References` the original's id,
/// the subject asked for or "Auto: " and the original's. `date` is the
/// RFC 5322 date, `message_id` a fresh id.
pub fn compose(v: &Vacation, raw: &[u8], user: &str, to: &str, date: &str, message_id: &str) -> Vec<u8> {
    let parsed = mail_parser::MessageParser::default().parse_headers(raw);
    let subject = v.subject.clone().unwrap_or_else(|| {
        let orig = parsed.as_ref().and_then(|m| m.subject()).unwrap_or("");
        format!("Auto: {orig}")
    });
    let clean = |s: &str| -> String { s.chars().filter(|c| !c.is_control()).take(998).collect() };
    let from = clean(v.from.as_deref().unwrap_or(user));
    let mut out = format!(
        "From: {from}\r\nTo: <{}>\r\nSubject: {}\r\nDate: {date}\r\nMessage-ID: <{message_id}>\r\nAuto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n",
        clean(to),
        clean(&subject)
    );
    if let Some(id) = parsed.as_ref().and_then(|m| m.message_id()) {
        let id = clean(id);
        out.push_str(&format!("In-Reply-To: <{id}>\r\nReferences: <{id}>\r\n"));
    }
    if v.mime {
        // The reason is a MIME entity of its own (RFC 5230 4.7).
        out.push_str(&v.reason.replace("\r\n", "\n").replace('\n', "\r\n"));
        if !out.ends_with("\r\n") {
            out.push_str("\r\n");
        }
    } else {
        out.push_str("Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n");
        for line in v.reason.lines() {
            // No line may end the DATA section early or run past 998.
            let line: String = line.chars().take(990).collect();
            out.push_str(&line);
            out.push_str("\r\n");
        }
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "alice@example.org";

    fn msg(extra: &str) -> Vec<u8> {
        format!("From: bob@remote.example\r\nTo: Alice <alice@example.org>\r\nSubject: lunch?\r\nMessage-ID: <m1@remote.example>\r\n{extra}\r\nhi\r\n")
            .into_bytes()
    }

    #[test]
    fn who_is_never_answered() {
        assert!(may_reply(&msg(""), "bob@remote.example", USER, &[]));
        assert!(!may_reply(&msg(""), "", USER, &[]), "the null sender");
        for from in [
            "MAILER-DAEMON@remote.example",
            "owner-list@remote.example",
            "list-request@remote.example",
            "alice@example.org",
            "SRS0=abcd=aa=x.example=y@fwd.example",
        ] {
            assert!(!may_reply(&msg(""), from, USER, &[]), "{from}");
        }
        for h in [
            "Auto-Submitted: auto-replied\r\n",
            "Precedence: bulk\r\n",
            "List-Id: <dev.lists.example>\r\n",
        ] {
            assert!(!may_reply(&msg(h), "bob@remote.example", USER, &[]), "{h}");
        }
        assert!(may_reply(
            &msg("Auto-Submitted: no\r\n"),
            "bob@remote.example",
            USER,
            &[]
        ));
        // Not named in To/Cc/Bcc (a list, a blind copy): not answered,
        // unless through one of the user's other addresses.
        let blind = b"From: bob@remote.example\r\nTo: team@example.org\r\nSubject: x\r\n\r\nhi\r\n";
        assert!(!may_reply(blind, "bob@remote.example", USER, &[]));
        assert!(may_reply(
            blind,
            "bob@remote.example",
            USER,
            &["team@example.org".into()]
        ));
    }

    #[test]
    fn the_reply_says_it_is_automatic_and_answers_the_message() {
        let v = Vacation {
            days: 7,
            subject: None,
            from: None,
            addresses: vec![],
            mime: false,
            handle: String::new(),
            reason: "Away until Monday.\n.\nBye".into(),
        };
        let r = String::from_utf8(compose(
            &v,
            &msg(""),
            USER,
            "bob@remote.example",
            "Mon, 7 Dec 2026 10:00:00 +0000",
            "v1@q",
        ))
        .unwrap();
        assert!(r.contains("Auto-Submitted: auto-replied\r\n"), "{r}");
        assert!(r.contains("Subject: Auto: lunch?\r\n"), "{r}");
        assert!(r.contains("In-Reply-To: <m1@remote.example>\r\n"), "{r}");
        assert!(r.contains("To: <bob@remote.example>\r\n") && r.contains("From: alice@example.org\r\n"));
        assert!(r.ends_with("Away until Monday.\r\n.\r\nBye\r\n"), "{r}");
    }
}
