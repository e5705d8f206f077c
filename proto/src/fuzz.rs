//! Entry points for the fuzz targets in `fuzz/` (libfuzzer) and for the
//! test that replays their corpus (`tests/tests/fuzz_corpus.rs`): each
//! takes arbitrary bytes from a client or a peer that has proven nothing
//! and must never panic, hang or grow without bound. Not an API.

use crate::data::{DATA_LINE_BYTES_MAX, DataReader, Step};
use crate::line::{Line, LineSplitter, trim_eol};
use crate::pop3::POP3_LINE_BYTES_MAX;
use crate::smtp::SMTP_COMMAND_BYTES_MAX;

/// The lines a session would cut `data` into (reads of 7 bytes: lines
/// cross reads).
fn lines(data: &[u8], max: usize) -> Vec<Line> {
    let mut out = LineSplitter::split_all(max, data, 7);
    out.pop();
    out
}

/// SMTP/LMTP: every line as a command (smtp-proto's parser, as the session
/// calls it), and the same lines as a DATA section (the smuggling-proof
/// reader). The reader must end at `.` only after a CRLF line, never hold
/// more than its bound, and account for every byte.
pub fn smtp(data: &[u8]) {
    for l in lines(data, SMTP_COMMAND_BYTES_MAX) {
        if let Line::Ok(bytes) = l {
            let _ = smtp_proto::Request::parse(&mut bytes.iter());
        }
    }
    let max = 4096;
    let mut reader = DataReader::new(b"Received: x\r\n".to_vec(), max);
    for l in lines(data, DATA_LINE_BYTES_MAX) {
        if let Step::End(outcome) = reader.line(&l) {
            if let Ok(body) = outcome {
                assert!(body.len() <= max, "a message past its bound");
                assert!(
                    !body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
                    "a bare LF kept"
                );
            }
            reader = DataReader::new(Vec::new(), max);
        }
    }
    // Every line as a recipient's local part that may be SRS: a forged
    // one is refused, never taken; one we made comes back as its sender.
    let key = [3u8; 32];
    for l in lines(data, SMTP_COMMAND_BYTES_MAX) {
        if let Line::Ok(bytes) = l
            && let Ok(text) = std::str::from_utf8(&bytes)
        {
            let text = text.trim_end();
            let _ = crate::srs::reverse(&key, text, 20_000);
            if let Some((local, domain)) = text.rsplit_once('@') {
                let made = crate::srs::forward(&key, text, "fwd.test", 20_000);
                let dns_name = domain
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
                if dns_name && !domain.eq_ignore_ascii_case("fwd.test") && !local.is_empty() && !domain.is_empty() {
                    let back = made.rsplit_once('@').map(|(l, _)| crate::srs::reverse(&key, l, 20_000));
                    assert!(matches!(back, Some(Ok(_))), "{text:?} -> {made:?} not reversed");
                }
            }
        }
    }
}

/// Sieve: the input as a script (checked; run, when it compiles, over a
/// fixed message and over the input itself as a message). Running never
/// panics, always ends within its steps, and never loses the message to
/// a limit.
pub fn sieve(data: &[u8]) {
    const MSG: &[u8] = b"From: a@b.example\r\nTo: c@d.example\r\nSubject: s\r\n\r\nbody\r\n";
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(script) = crate::sieve::compile(src) {
        for msg in [MSG, data] {
            let env = crate::sieve::Envelope {
                from: "a@b.example",
                to: "c@d.example",
            };
            let a = crate::sieve::run(&script, msg, env);
            assert!(a.redirect.len() <= crate::sieve::REDIRECTS_MAX);
            assert!(a.fileinto.len() <= crate::sieve::FILEINTO_MAX);
            if !a.errors.is_empty() {
                assert!(a.keep.is_some(), "a limit reached must keep the message");
            }
        }
    }
}

/// POP3: every line through the command parser.
pub fn pop3(data: &[u8]) {
    for l in lines(data, POP3_LINE_BYTES_MAX) {
        if let Line::Ok(bytes) = l {
            let _ = crate::pop3::parse(trim_eol(&bytes));
        }
    }
}

/// The cluster wire: a frame as an unauthenticated peer may send it
/// (enrollment reads a request before any certificate), and a reply as a
/// peer may send it back, with the payload types the caller names.
pub fn cluster_frame<Req: serde::de::DeserializeOwned, Reply: serde::de::DeserializeOwned>(data: &[u8]) {
    for p in crate::wire::Protocol::ALL {
        let _ = crate::wire::decode::<Req>(data, p);
        let _ = crate::wire::decode::<Reply>(data, p);
    }
}

/// The admin API's JSON bodies and query (parsed only after the token:
/// still input).
pub fn admin_json(data: &[u8]) {
    crate::admin::parse_bodies(data);
}

/// IMAP: the bytes as a client's stream into imap-next's server state (with
/// the node's options: literal and command bounds), every event drained;
/// and the bytes as a stored message through what FETCH makes of one
/// (ENVELOPE, BODYSTRUCTURE, BODY, header and MIME sections, header
/// fields), which must stay inside the message.
pub fn imap(data: &[u8]) {
    use imap_next::State;
    use imap_next::imap_types::response::Greeting;
    let mut o = imap_next::server::Options::default();
    o.max_literal_size = 4096;
    o.max_command_size = 8192;
    let mut server = imap_next::server::Server::new(o, Greeting::ok(None, "fuzz").expect("valid"));
    // Fed in small pieces, as reads cut them.
    for chunk in data.chunks(97) {
        server.enqueue_input(chunk);
        for _ in 0..10_000 {
            match server.next() {
                Err(imap_next::Interrupt::Io(imap_next::Io::NeedMoreInput)) => break,
                Ok(imap_next::server::Event::IdleCommandReceived { .. }) => {
                    let cont = imap_next::imap_types::response::CommandContinuationRequest::basic(None, "idling")
                        .expect("valid");
                    let _ = server.idle_accept(cont);
                }
                Ok(imap_next::server::Event::CommandAuthenticateReceived { command_authenticate }) => {
                    let st = imap_next::imap_types::response::Status::no(Some(command_authenticate.tag), None, "no")
                        .expect("valid");
                    let _ = server.authenticate_finish(st);
                }
                _ => {}
            }
        }
    }
    let _ = crate::imap::mime::envelope(data);
    let _ = crate::imap::mime::body_structure(data, true);
    let _ = crate::imap::mime::body_structure(data, false);
    crate::imap::sections::check_sections(data);
}

/// mbox as `quill admin import` reads it (in 13-byte pieces: lines cross
/// reads), with small bounds; every message read is written again and
/// must read back the same.
pub fn mbox(data: &[u8]) {
    let mut r = crate::mbox::Reader::new(4096, 1024);
    let mut out = Vec::new();
    let ok = data
        .chunks(13)
        .try_for_each(|c| r.push(c, &mut out))
        .and_then(|()| r.finish(&mut out));
    let _ = ok;
    for p in out {
        assert!(p.body.len() <= 4096, "a message past its bound");
        let meta = crate::mbox::Meta {
            folder: p.folder.clone().unwrap_or_else(|| "INBOX".to_owned()),
            flags: p.flags.clone(),
            arrival_ms: 0,
        };
        if meta.folder.contains('\n') {
            continue;
        }
        let mut again = Vec::new();
        crate::mbox::write(&mut again, &meta, &p.body);
        let mut r = crate::mbox::Reader::new(1 << 20, 1 << 20);
        let mut back = Vec::new();
        r.push(&again, &mut back).expect("a written message reads back");
        r.finish(&mut back).expect("a written message reads back");
        assert_eq!(back.len(), 1, "one message written, one read");
        assert_eq!(back[0].body, p.body, "the bytes read back");
    }
}
