//! What IMAP tells of a message's structure, from mail-parser's MIME tree:
//! ENVELOPE, BODY and BODYSTRUCTURE (RFC 3501 7.4.2). (The bytes of a
//! section `BODY[1.2]`, `BODY[2.HEADER]`, … are found by [`super::parts`]
//! on the message's own bytes.) Header values
//! in ENVELOPE are the raw (unfolded) field values, as RFC 3501 wants:
//! encoded words are left for the client to decode.

use imap_next::imap_types::body::{
    BasicFields, Body, BodyStructure, Disposition, MultiPartExtensionData, SinglePartExtensionData, SpecificFields,
};
use imap_next::imap_types::core::{IString, NString, Vec1};
use imap_next::imap_types::envelope::{Address, Envelope};
use mail_parser::{Encoding, Message, MessageParser, MessagePart, MimeHeaders, PartType};

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

/// The raw, unfolded value of a header field (the first one) of `header`.
/// (Not mail-parser's `header_raw`: its offsets into an enclosed message
/// are not those of the message's own bytes.)
fn raw_field(header: &[u8], name: &str) -> Option<String> {
    let (_, field) = crate::message::header_fields(header)
        .into_iter()
        .find(|(n, _)| n.trim_ascii().eq_ignore_ascii_case(name.as_bytes()))?;
    let value = &field[field.iter().position(|c| *c == b':')? + 1..];
    let unfolded = String::from_utf8_lossy(value).replace("\r\n", "").replace('\n', "");
    Some(unfolded.trim().to_owned())
}

fn addresses(a: Option<&mail_parser::Address<'_>>) -> Vec<Address<'static>> {
    let one = |name: Option<&str>, addr: Option<&str>| {
        // A source route (`<@route:user@host>`) is the address's adl.
        let (adl, addr) = match addr.and_then(|a| a.strip_prefix('@').and(a.split_once(':'))) {
            Some((route, rest)) => (Some(route), Some(rest)),
            None => (None, addr),
        };
        let (mailbox, host) = match addr.and_then(|a| a.rsplit_once('@')) {
            Some((m, h)) => (Some(m.to_owned()), Some(h.to_owned())),
            None => (addr.map(str::to_owned), None),
        };
        Address {
            name: nstring(name),
            adl: nstring(adl),
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
                // A member without an address (`group: (foo) ;` makes
                // mail-parser one of the comment) is none.
                out.extend(
                    g.addresses
                        .iter()
                        .filter(|x| x.address.is_some())
                        .map(|x| one(x.name.as_deref(), x.address.as_deref())),
                );
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

/// ENVELOPE of `m`, whose header's bytes are `header`.
fn envelope_of(m: &Message<'_>, header: &[u8]) -> Envelope<'static> {
    let raw_field = |name| raw_field(header, name);
    let from = addresses(m.from());
    let or_from = |v: Vec<Address<'static>>| if v.is_empty() { from.clone() } else { v };
    Envelope {
        date: nstring(raw_field("Date").as_deref()),
        subject: nstring(raw_field("Subject").as_deref()),
        sender: or_from(addresses(m.sender())),
        reply_to: or_from(addresses(m.reply_to())),
        to: addresses(m.to()),
        cc: addresses(m.cc()),
        bcc: addresses(m.bcc()),
        in_reply_to: nstring(raw_field("In-Reply-To").as_deref()),
        message_id: nstring(raw_field("Message-ID").as_deref()),
        from,
    }
}

/// ENVELOPE of a message (all NIL if it cannot be parsed at all).
pub fn envelope(raw: &[u8]) -> Envelope<'static> {
    match parse(raw) {
        Some(m) => envelope_of(&m, &raw[..crate::message::header_end(raw)]),
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

/// The body of `p`, whose offsets are into `raw`.
fn raw_body<'a>(raw: &'a [u8], p: &MessagePart<'_>) -> &'a [u8] {
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

/// The structure of `p`, a part of `m`; `raw`: the bytes `m`'s offsets
/// are into. mail-parser parses an enclosed message in place, its offsets
/// those of the outer message's bytes (its `raw_message` only its body);
/// one base64 or quoted-printable encoded is parsed from its decoded
/// bytes, its offsets into those.
fn part_structure(
    raw: &[u8],
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
            bodies.push(part_structure(raw, m, c, ext, depth + 1, budget));
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
    let body = raw_body(raw, p);
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
        // A part of a multipart/digest (RFC 2046 5.1.5).
        None if matches!(p.body, PartType::Message(_)) => ("MESSAGE".to_owned(), "RFC822".to_owned()),
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
        (PartType::Message(inner), _) if deeper => {
            let inner_raw = match p.encoding {
                Encoding::None => raw,
                _ => inner.raw_message(),
            };
            let header = match p.encoding {
                Encoding::None => body,
                _ => inner_raw,
            };
            let header = &header[..crate::message::header_end(header)];
            SpecificFields::Message {
                envelope: Box::new(envelope_of(inner, header)),
                body_structure: Box::new(part_structure(
                    inner_raw,
                    inner,
                    inner.root_part(),
                    ext,
                    depth + 1,
                    budget,
                )),
                number_of_lines: lines(body),
            }
        }
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
            part_structure(raw, &m, m.root_part(), ext, 0, &mut budget)
        }
        None => plain_text(raw, ext),
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use imap_next::imap_types::fetch::Section;

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
        let part = |n| crate::imap::sections::section_bytes(MULTI, Some(&one(n)));
        assert_eq!(part(1).unwrap(), b"hello\r\nthere");
        assert_eq!(part(2).unwrap(), b"AAAA");
        assert!(part(3).is_none());
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
