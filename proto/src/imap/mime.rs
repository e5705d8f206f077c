//! What IMAP tells of a message's structure, from mail-parser's MIME tree:
//! ENVELOPE, BODY and BODYSTRUCTURE (RFC 3501 7.4.2) and the bytes of a
//! section `BODY[1.2]`, `BODY[2.HEADER]`, `BODY[1.MIME]`, … Header values
//! in ENVELOPE are the raw (unfolded) field values, as RFC 3501 wants:
//! encoded words are left for the client to decode.

use std::num::NonZeroU32;

use imap_next::imap_types::body::{
    BasicFields, Body, BodyStructure, Disposition, MultiPartExtensionData, SinglePartExtensionData, SpecificFields,
};
use imap_next::imap_types::core::{IString, NString, Vec1};
use imap_next::imap_types::envelope::{Address, Envelope};
use imap_next::imap_types::fetch::Section;
use mail_parser::{Message, MessageParser, MessagePart, MimeHeaders, PartType};

/// Nesting followed at most (a hostile message may nest very deeply).
const DEPTH_MAX: usize = 32;
/// Parts described at most in one BODYSTRUCTURE: a malformed message can
/// make the parser's tree name the same part many times over (the fuzzer
/// found one where 32 levels of that took 19 s and gigabytes).
const PARTS_MAX: usize = 1000;

fn parse(raw: &[u8]) -> Option<Message<'_>> {
    MessageParser::default().parse(raw)
}

fn istring(s: &str) -> IString<'static> {
    IString::try_from(s.to_owned())
        .or_else(|_| IString::try_from(s.replace(['\r', '\n', '\0'], " ")))
        .unwrap_or_else(|_| IString::try_from("").expect("empty string"))
}

fn nstring(s: Option<&str>) -> NString<'static> {
    NString(s.map(istring))
}

/// The raw, unfolded value of a header field (the first one).
fn raw_field(m: &Message<'_>, name: &str) -> Option<String> {
    let v = m.header_raw(name)?;
    let unfolded = v.replace("\r\n", "").replace('\n', "");
    Some(unfolded.trim().to_owned())
}

fn addresses(a: Option<&mail_parser::Address<'_>>) -> Vec<Address<'static>> {
    let one = |name: Option<&str>, addr: Option<&str>| {
        let (mailbox, host) = match addr.and_then(|a| a.rsplit_once('@')) {
            Some((m, h)) => (Some(m.to_owned()), Some(h.to_owned())),
            None => (addr.map(str::to_owned), None),
        };
        Address {
            name: nstring(name),
            adl: NString(None),
            mailbox: nstring(mailbox.as_deref()),
            host: nstring(host.as_deref()),
        }
    };
    match a {
        None => vec![],
        Some(mail_parser::Address::List(list)) => list
            .iter()
            .map(|x| one(x.name.as_deref(), x.address.as_deref()))
            .collect(),
        // RFC 3501: a group is a start marker (host NIL, mailbox the
        // group's name), its members, and an end marker (both NIL).
        Some(mail_parser::Address::Group(groups)) => {
            let mut out = Vec::new();
            for g in groups {
                out.push(Address {
                    name: NString(None),
                    adl: NString(None),
                    mailbox: nstring(g.name.as_deref()),
                    host: NString(None),
                });
                out.extend(g.addresses.iter().map(|x| one(x.name.as_deref(), x.address.as_deref())));
                out.push(Address {
                    name: NString(None),
                    adl: NString(None),
                    mailbox: NString(None),
                    host: NString(None),
                });
            }
            out
        }
    }
}

fn envelope_of(m: &Message<'_>) -> Envelope<'static> {
    let from = addresses(m.from());
    let or_from = |v: Vec<Address<'static>>| if v.is_empty() { from.clone() } else { v };
    Envelope {
        date: nstring(raw_field(m, "Date").as_deref()),
        subject: nstring(raw_field(m, "Subject").as_deref()),
        sender: or_from(addresses(m.sender())),
        reply_to: or_from(addresses(m.reply_to())),
        to: addresses(m.to()),
        cc: addresses(m.cc()),
        bcc: addresses(m.bcc()),
        in_reply_to: nstring(raw_field(m, "In-Reply-To").as_deref()),
        message_id: nstring(raw_field(m, "Message-ID").as_deref()),
        from,
    }
}

/// ENVELOPE of a message (all NIL if it cannot be parsed at all).
pub fn envelope(raw: &[u8]) -> Envelope<'static> {
    match parse(raw) {
        Some(m) => envelope_of(&m),
        None => Envelope {
            date: NString(None),
            subject: NString(None),
            from: vec![],
            sender: vec![],
            reply_to: vec![],
            to: vec![],
            cc: vec![],
            bcc: vec![],
            in_reply_to: NString(None),
            message_id: NString(None),
        },
    }
}

fn lines(b: &[u8]) -> u32 {
    b.iter().filter(|c| **c == b'\n').count() as u32
}

fn raw_body<'a>(m: &'a Message<'_>, p: &MessagePart<'_>) -> &'a [u8] {
    let raw = m.raw_message();
    let (s, e) = (p.offset_body as usize, p.offset_end as usize);
    raw.get(s.min(e)..e.min(raw.len())).unwrap_or_default()
}

fn params(
    ct: Option<&mail_parser::ContentType<'_>>,
    default: &[(&str, &str)],
) -> Vec<(IString<'static>, IString<'static>)> {
    match ct.and_then(|c| c.attributes()) {
        Some(attrs) if !attrs.is_empty() => attrs
            .iter()
            .map(|a| (istring(&a.name.to_ascii_uppercase()), istring(&a.value)))
            .collect(),
        _ => default.iter().map(|(k, v)| (istring(k), istring(v))).collect(),
    }
}

fn part_structure(
    m: &Message<'_>,
    p: &MessagePart<'_>,
    ext: bool,
    depth: usize,
    budget: &mut usize,
) -> BodyStructure<'static> {
    *budget = budget.saturating_sub(1);
    let deeper = depth < DEPTH_MAX && *budget > 0;
    let ct = p.content_type();
    if let (PartType::Multipart(children), true) = (&p.body, deeper) {
        let mut bodies: Vec<BodyStructure<'static>> = Vec::new();
        for c in children.iter().filter_map(|i| m.part(*i)) {
            if *budget == 0 {
                break;
            }
            bodies.push(part_structure(m, c, ext, depth + 1, budget));
        }
        if let Ok(bodies) = Vec1::try_from(bodies) {
            let subtype = ct.and_then(|c| c.subtype()).unwrap_or("mixed").to_ascii_uppercase();
            return BodyStructure::Multi {
                bodies,
                subtype: istring(&subtype),
                extension_data: ext.then(|| MultiPartExtensionData {
                    parameter_list: params(ct, &[]),
                    tail: Some(disposition(p)),
                }),
            };
        }
    }
    let body = raw_body(m, p);
    let default_text = !matches!(
        p.body,
        PartType::Binary(_) | PartType::InlineBinary(_) | PartType::Message(_)
    );
    let (ty, sub) = match ct {
        Some(c) => (
            c.ctype().to_ascii_uppercase(),
            c.subtype()
                .unwrap_or(if default_text { "plain" } else { "octet-stream" })
                .to_ascii_uppercase(),
        ),
        None if default_text => ("TEXT".to_owned(), "PLAIN".to_owned()),
        None => ("APPLICATION".to_owned(), "OCTET-STREAM".to_owned()),
    };
    let basic = BasicFields {
        parameter_list: params(ct, if ty == "TEXT" { &[("CHARSET", "us-ascii")] } else { &[] }),
        id: nstring(p.content_id()),
        description: nstring(p.content_description()),
        content_transfer_encoding: istring(&p.content_transfer_encoding().unwrap_or("7BIT").to_ascii_uppercase()),
        size: body.len() as u32,
    };
    let specific = match (&p.body, ty.as_str()) {
        (PartType::Message(inner), _) if deeper => SpecificFields::Message {
            envelope: Box::new(envelope_of(inner)),
            body_structure: Box::new(part_structure(inner, inner.root_part(), ext, depth + 1, budget)),
            number_of_lines: lines(body),
        },
        (_, "TEXT") => SpecificFields::Text {
            subtype: istring(&sub),
            number_of_lines: lines(body),
        },
        _ => SpecificFields::Basic {
            r#type: istring(&ty),
            subtype: istring(&sub),
        },
    };
    BodyStructure::Single {
        body: Body { basic, specific },
        extension_data: ext.then(|| SinglePartExtensionData {
            md5: NString(None),
            tail: Some(disposition(p)),
        }),
    }
}

fn disposition(p: &MessagePart<'_>) -> Disposition<'static> {
    Disposition {
        disposition: p
            .content_disposition()
            .map(|d| (istring(&d.ctype().to_ascii_uppercase()), params(Some(d), &[]))),
        tail: None,
    }
}

fn plain_text(raw: &[u8], ext: bool) -> BodyStructure<'static> {
    let body = &raw[crate::message::header_end(raw)..];
    BodyStructure::Single {
        body: Body {
            basic: BasicFields {
                parameter_list: vec![(istring("CHARSET"), istring("us-ascii"))],
                id: NString(None),
                description: NString(None),
                content_transfer_encoding: istring("7BIT"),
                size: body.len() as u32,
            },
            specific: SpecificFields::Text {
                subtype: istring("PLAIN"),
                number_of_lines: lines(body),
            },
        },
        extension_data: ext.then_some(SinglePartExtensionData {
            md5: NString(None),
            tail: None,
        }),
    }
}

/// BODYSTRUCTURE (`ext`) or BODY of a message.
pub fn body_structure(raw: &[u8], ext: bool) -> BodyStructure<'static> {
    match parse(raw) {
        Some(m) => {
            let mut budget = PARTS_MAX;
            part_structure(&m, m.root_part(), ext, 0, &mut budget)
        }
        None => plain_text(raw, ext),
    }
}

/// The part at `path` (1-based numbers), and the message it belongs to.
fn find<'a, 'x>(m: &'a Message<'x>, path: &[NonZeroU32]) -> Option<(&'a Message<'x>, &'a MessagePart<'x>)> {
    let mut msg = m;
    let mut part = m.root_part();
    for (depth, n) in path.iter().enumerate() {
        if depth >= DEPTH_MAX {
            return None;
        }
        let n = n.get() as usize;
        // Into an enclosed message: its body's parts are numbered from it.
        if let PartType::Message(inner) = &part.body {
            msg = inner;
            part = inner.root_part();
        }
        match &part.body {
            PartType::Multipart(children) => {
                part = msg.part(*children.get(n - 1)?)?;
            }
            _ if n == 1 => {}
            _ => return None,
        }
    }
    Some((msg, part))
}

/// The bytes of a section with a part number (the others are the whole
/// message's header or text, handled by the caller). `None`: no such part.
pub fn part_section(raw: &[u8], section: &Section<'_>) -> Option<Vec<u8>> {
    let m = parse(raw)?;
    let bytes = |msg: &Message<'_>, s: u32, e: u32| -> Vec<u8> {
        let r = msg.raw_message();
        r.get(s as usize..(e as usize).min(r.len()))
            .unwrap_or_default()
            .to_vec()
    };
    match section {
        Section::Part(p) => {
            let (msg, part) = find(&m, p.0.as_ref())?;
            Some(bytes(msg, part.offset_body, part.offset_end))
        }
        Section::Mime(p) => {
            let (msg, part) = find(&m, p.0.as_ref())?;
            Some(bytes(msg, part.offset_header, part.offset_body))
        }
        Section::Header(Some(p)) | Section::Text(Some(p)) => {
            let (_, part) = find(&m, p.0.as_ref())?;
            let PartType::Message(inner) = &part.body else {
                return None;
            };
            let root = inner.root_part();
            Some(match section {
                Section::Header(_) => bytes(inner, root.offset_header, root.offset_body),
                _ => bytes(inner, root.offset_body, root.offset_end),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MULTI: &[u8] = b"From: Ann <ann@example.org>\r\nTo: bob@example.org, Cy <cy@example.org>\r\nSubject: =?utf-8?q?hi?=\r\nDate: Thu, 3 Dec 2026 10:00:00 +0000\r\nMessage-ID: <1@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\npreamble\r\n--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhello\r\nthere\r\n--b\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"a.pdf\"\r\n\r\nAAAA\r\n--b--\r\n";

    #[test]
    fn envelope_keeps_raw_values_and_splits_addresses() {
        let e = envelope(MULTI);
        assert_eq!(e.subject, nstring(Some("=?utf-8?q?hi?=")));
        assert_eq!(e.message_id, nstring(Some("<1@example.org>")));
        assert_eq!(e.to.len(), 2);
        assert_eq!(e.from[0].mailbox, nstring(Some("ann")));
        assert_eq!(e.from[0].host, nstring(Some("example.org")));
        // Sender and Reply-To default to From.
        assert_eq!(e.sender, e.from);
    }

    #[test]
    fn structure_and_parts_of_a_multipart_message() {
        let BodyStructure::Multi { bodies, subtype, .. } = body_structure(MULTI, true) else {
            panic!("not multipart")
        };
        assert_eq!(subtype, istring("MIXED"));
        assert_eq!(bodies.as_ref().len(), 2);
        let one = |n: u32| {
            Section::Part(imap_next::imap_types::fetch::Part(Vec1::from(
                NonZeroU32::new(n).unwrap(),
            )))
        };
        assert_eq!(part_section(MULTI, &one(1)).unwrap(), b"hello\r\nthere");
        assert_eq!(part_section(MULTI, &one(2)).unwrap(), b"AAAA");
        assert!(part_section(MULTI, &one(3)).is_none());
    }

    #[test]
    fn a_plain_message_is_text_plain_and_garbage_does_not_panic() {
        let BodyStructure::Single { body, .. } = body_structure(b"Subject: x\r\n\r\nline\r\n", false) else {
            panic!()
        };
        assert!(matches!(body.specific, SpecificFields::Text { number_of_lines: 1, .. }));
        for junk in [
            &b""[..],
            b"\r\n",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n--x\r\n",
            &[0xff; 64],
        ] {
            let _ = body_structure(junk, true);
            let _ = envelope(junk);
        }
    }
}
