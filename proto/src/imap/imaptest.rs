//! Dovecot's imaptest scripts for FETCH of sections and ENVELOPE, run as
//! unit tests: each script's commands are parsed as a client would send
//! them, answered by [`super::fetch::items`], and the answer compared with
//! the script's expected untagged reply. The scripts and their mbox inputs
//! are imaptest's own (`src/tests/`, MIT licensed), copied unchanged under
//! `testdata/`; imaptest sends the messages with CRLF line ends, and so do
//! these tests.

use std::num::NonZeroU32;

use imap_codec::encode::Encoder;
use imap_codec::{CommandCodec, ResponseCodec, decode::Decoder};
use imap_next::imap_types::command::CommandBody;
use imap_next::imap_types::core::Vec1;
use imap_next::imap_types::fetch::{MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName};
use imap_next::imap_types::response::{Data, Response};

use super::fetch::{item_names, items};
use super::mime::envelope;
use super::testing::TestMsg;

/// The messages of an mbox file, as imaptest appends them: everything
/// between two `From ` lines, with CRLF line ends.
fn messages(mbox: &str) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    for line in mbox.split_inclusive('\n') {
        if line.starts_with("From ") {
            out.push(Vec::new());
            continue;
        }
        let m = out.last_mut().expect("an mbox starts with a From line");
        m.extend_from_slice(line.trim_end_matches('\n').as_bytes());
        if line.ends_with('\n') {
            m.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// One FETCH of a script: the command (without its tag) and the expected
/// reply, its `{{{ }}}` literal expanded as imaptest does (CRLF line ends,
/// the last one dropped).
struct Case {
    command: String,
    expected: Vec<u8>,
}

fn cases(script: &str) -> Vec<Case> {
    let mut out = Vec::new();
    let mut command = None;
    let mut lines = script.lines();
    while let Some(line) = lines.next() {
        if let Some(c) = line.strip_prefix("ok ") {
            command = Some(c.to_owned());
        } else if let Some(head) = line.strip_suffix("{{{") {
            let mut literal: Vec<u8> = Vec::new();
            let mut tail = "";
            for l in lines.by_ref() {
                if let Some(t) = l.strip_prefix("}}}") {
                    tail = t;
                    break;
                }
                literal.extend_from_slice(l.as_bytes());
                literal.extend_from_slice(b"\r\n");
            }
            literal.truncate(literal.len().saturating_sub(2));
            let mut expected = format!("{head}{{{}}}\r\n", literal.len()).into_bytes();
            expected.extend_from_slice(&literal);
            expected.extend_from_slice(tail.as_bytes());
            expected.extend_from_slice(b"\r\n");
            out.push(Case {
                command: command.take().expect("a command before its reply"),
                expected,
            });
        } else if line.starts_with("* ") {
            out.push(Case {
                command: command.clone().expect("a command before its reply"),
                expected: format!("{line}\r\n").into_bytes(),
            });
        }
    }
    out
}

/// The names a FETCH command asks for, parsed as the server parses them.
fn names_of(command: &str) -> Vec<MessageDataItemName<'static>> {
    let line = format!("a {command}\r\n");
    let (_, cmd) = CommandCodec::default()
        .decode_static(line.as_bytes())
        .unwrap_or_else(|e| panic!("{command}: {e:?}"));
    let CommandBody::Fetch {
        macro_or_item_names, ..
    } = cmd.body
    else {
        panic!("{command}: not a FETCH")
    };
    let names: MacroOrMessageDataItemNames<'static> = macro_or_item_names;
    item_names(names, false).expect("served")
}

fn encode(seq: u32, items: Vec<MessageDataItem<'static>>) -> Vec<u8> {
    let data = Data::Fetch {
        seq: NonZeroU32::new(seq).expect("nonzero"),
        items: Vec1::try_from(items).expect("an item"),
    };
    ResponseCodec::default().encode(&Response::Data(data)).dump()
}

/// The literal of an encoded reply (everything after the first CRLF).
fn literal(reply: &[u8]) -> &[u8] {
    let start = reply.windows(2).position(|w| w == b"\r\n").map_or(0, |p| p + 2);
    &reply[start..]
}

/// Runs the body-section cases of a script on its one message: the
/// section's bytes exactly, the rest of the reply without case.
fn run_sections(script: &str, mbox: &str) {
    let msgs = messages(mbox);
    let m = TestMsg::new(1, &[]);
    let mut failed = Vec::new();
    for case in cases(script) {
        let names = names_of(&case.command);
        let got = encode(1, items(&names, &m, Some(&msgs[0]), false));
        if literal(&got) != literal(&case.expected) || !got.eq_ignore_ascii_case(&case.expected) {
            failed.push(format!(
                "{}\n--- expected\n{}--- got\n{}",
                case.command,
                String::from_utf8_lossy(&case.expected),
                String::from_utf8_lossy(&got)
            ));
        }
    }
    assert!(failed.is_empty(), "{} failed:\n{}", failed.len(), failed.join("\n"));
}

#[test]
fn fetch_body_message_rfc822() {
    run_sections(
        include_str!("testdata/fetch-body-message-rfc822"),
        include_str!("testdata/fetch-body-message-rfc822.mbox"),
    );
}

#[test]
fn fetch_body_message_rfc822_mime() {
    run_sections(
        include_str!("testdata/fetch-body-message-rfc822-mime"),
        include_str!("testdata/fetch-body-message-rfc822-mime.mbox"),
    );
}

#[test]
fn fetch_body_message_rfc822_x2() {
    run_sections(
        include_str!("testdata/fetch-body-message-rfc822-x2"),
        include_str!("testdata/fetch-body-message-rfc822-x2.mbox"),
    );
}

#[test]
fn fetch_body_mime() {
    run_sections(
        include_str!("testdata/fetch-body-mime"),
        include_str!("testdata/fetch-body-mime.mbox"),
    );
}

#[test]
fn fetch_envelope() {
    let msgs = messages(include_str!("testdata/fetch-envelope.mbox"));
    let expected = cases(include_str!("testdata/fetch-envelope"));
    assert_eq!(expected.len(), msgs.len());
    let mut failed = Vec::new();
    for (i, (m, case)) in msgs.iter().zip(&expected).enumerate() {
        let got = encode(i as u32 + 1, vec![MessageDataItem::Envelope(envelope(m))]);
        if got != case.expected {
            failed.push(format!(
                "expected {}     got {}",
                String::from_utf8_lossy(&case.expected),
                String::from_utf8_lossy(&got)
            ));
        }
    }
    assert!(failed.is_empty(), "{} failed:\n{}", failed.len(), failed.join(""));
}

#[test]
fn scripts_are_read_whole() {
    assert_eq!(cases(include_str!("testdata/fetch-body-mime")).len(), 14);
    assert_eq!(cases(include_str!("testdata/fetch-body-message-rfc822-mime")).len(), 13);
    assert_eq!(messages(include_str!("testdata/fetch-envelope.mbox")).len(), 6);
}

/// Not in these scripts, but from the same messages: the structure of a
/// message/rfc822 part has the enclosed message's envelope, structure and
/// line count, with the sizes of its parts (counted by hand), and a part
/// of a multipart/digest without a Content-Type is a message/rfc822.
#[test]
fn bodystructure_of_enclosed_messages() {
    let structure = |mbox: &str| {
        let m = messages(mbox).remove(0);
        let reply = encode(
            1,
            vec![MessageDataItem::BodyStructure(super::mime::body_structure(&m, true))],
        );
        String::from_utf8(reply).expect("ASCII")
    };
    let sub = r#"("Sun, 12 Aug 2012 12:34:56 +0300" "submsg" ((NIL NIL "sub" "domain.org")) ((NIL NIL "sub" "domain.org")) ((NIL NIL "sub" "domain.org")) NIL NIL NIL NIL NIL)"#;
    assert_eq!(
        structure(include_str!("testdata/fetch-body-mime.mbox")),
        format!(
            "* 1 FETCH (BODYSTRUCTURE ((\"TEXT\" \"X-MYOWN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 7 1 NIL NIL)\
             (\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 298 {sub} \
             ((\"TEXT\" \"HTML\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 20 1 NIL NIL)\
             (\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 21 1 NIL NIL) \
             \"ALTERNATIVE\" (\"BOUNDARY\" \"sub1\") NIL) 18 NIL NIL) \
             \"MIXED\" (\"BOUNDARY\" \"foo bar\") NIL))\r\n"
        )
    );
    let digest = structure(include_str!("testdata/fetch-body-message-rfc822-mime.mbox"));
    let m1 = r#"("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 46 (NIL "m1" ((NIL NIL "m1" "example.com")) ((NIL NIL "m1" "example.com")) ((NIL NIL "m1" "example.com")) NIL NIL NIL NIL NIL) ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 9 1 NIL NIL) 4 NIL NIL)"#;
    assert!(
        digest.starts_with(&format!(
            "* 1 FETCH (BODYSTRUCTURE (\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 296 {sub} ({m1}(\"MESSAGE\""
        )),
        "{digest}"
    );
    assert!(
        digest.ends_with(" \"DIGEST\" (\"BOUNDARY\" \"foo\") NIL) 25 NIL NIL))\r\n"),
        "{digest}"
    );
    let x2 = structure(include_str!("testdata/fetch-body-message-rfc822-x2.mbox"));
    assert!(x2.contains(&format!("\"7BIT\" 93 {sub} (\"TEXT\" \"PLAIN\" (\"CHARSET\" \"us-ascii\") NIL NIL \"7BIT\" 13 1 NIL NIL) 5 NIL NIL) 10 NIL NIL))")), "{x2}");
}
