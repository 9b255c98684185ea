//! What a mail holds for mastsub: who sent it, and its JSON attachments (also inside forwarded
//! `message/rfc822` parts). Pure functions over the raw message bytes, so that they can be tested and
//! fuzzed without a server.

use mail_parser::{HeaderName, Message, MessageParser, MimeHeaders, PartType};

/// Forwarded messages inside forwarded messages are followed this deep, no deeper.
const MAX_DEPTH: usize = 8;

/// One JSON attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Its file name (or a made-up one, when the mail gives none).
    pub name: String,
    /// Its decoded bytes.
    pub bytes: Vec<u8>,
}

/// What a mail is, for mastsub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mail {
    /// Not a mail at all (the bytes do not parse).
    Unreadable,
    /// From a sender that `allowed_senders` does not name; `from` is the address (or `(none)`).
    NotAllowed {
        /// The From address(es) as given.
        from: String,
    },
    /// From an allowed sender, but without any JSON attachment.
    NoNotice {
        /// The From address.
        from: String,
    },
    /// JSON attachments to ingest.
    Notices {
        /// The From address.
        from: String,
        /// The attachments, in the order they appear.
        attachments: Vec<Attachment>,
    },
}

/// The Message-ID header (without angle brackets), if the mail has one.
pub fn message_id(raw: &[u8]) -> Option<String> {
    MessageParser::default()
        .parse_headers(raw)
        .and_then(|m| m.message_id().map(str::to_string))
}

/// Reads a mail: checks its sender against `allowed` (addresses or `@domain`, compared without case; an
/// empty list allows anyone), then collects its JSON attachments.
///
/// Only the addresses of the `From` header count: a display name ("notices@stsci.edu" <x@evil.org>),
/// `Reply-To` or `Sender` cannot make a mail look allowed, and a mail with several From addresses needs
/// every one of them allowed.
pub fn read(raw: &[u8], allowed: &[String]) -> Mail {
    let Some(message) = MessageParser::default().parse(raw) else {
        return Mail::Unreadable;
    };
    // Exactly one From header counts: with two, mail clients and DMARC read the first and this parser
    // the last, a known way to slip a forged sender past a check. Every entry must carry an address.
    let from_headers = message.header_values(HeaderName::From).count();
    let entries: Vec<Option<String>> = message
        .from()
        .map(|from| {
            from.iter()
                .map(|a| a.address().map(|a| a.trim().to_ascii_lowercase()))
                .collect()
        })
        .unwrap_or_default();
    let addresses: Vec<String> = entries.iter().flatten().cloned().collect();
    let from = if addresses.is_empty() {
        "(none)".to_string()
    } else {
        addresses.join(", ")
    };
    if !allowed.is_empty()
        && (from_headers != 1
            || addresses.is_empty()
            || addresses.len() != entries.len()
            || !addresses.iter().all(|a| sender_allowed(a, allowed)))
    {
        return Mail::NotAllowed { from };
    }
    let mut attachments = Vec::new();
    collect(&message, 0, &mut attachments);
    if attachments.is_empty() {
        Mail::NoNotice { from }
    } else {
        Mail::Notices { from, attachments }
    }
}

/// Whether `address` (lower case) is named by `allowed`.
pub fn sender_allowed(address: &str, allowed: &[String]) -> bool {
    let Some((_, domain)) = address.rsplit_once('@') else {
        return false;
    };
    allowed.iter().any(|entry| {
        let entry = entry.trim().to_ascii_lowercase();
        match entry.strip_prefix('@') {
            Some(d) => d == domain,
            None => entry == address,
        }
    })
}

fn collect(message: &Message<'_>, depth: usize, out: &mut Vec<Attachment>) {
    for (index, part) in message.parts.iter().enumerate() {
        match &part.body {
            PartType::Message(inner) if depth < MAX_DEPTH => collect(inner, depth + 1, out),
            PartType::Message(_) | PartType::Multipart(_) => {}
            PartType::Text(_)
            | PartType::Html(_)
            | PartType::Binary(_)
            | PartType::InlineBinary(_) => {
                let name = part.attachment_name().map(str::to_string);
                let by_name = name
                    .as_deref()
                    .is_some_and(|n| n.to_ascii_lowercase().ends_with(".json"));
                let by_type = part.content_type().is_some_and(|ct| {
                    ct.ctype().eq_ignore_ascii_case("application")
                        && ct.subtype().is_some_and(|s| s.eq_ignore_ascii_case("json"))
                });
                if by_name || by_type {
                    let name = name
                        .map(|n| safe_name(&n))
                        .unwrap_or_else(|| format!("attachment-{}-{index}.json", out.len() + 1));
                    out.push(Attachment {
                        name,
                        bytes: part.contents().to_vec(),
                    });
                }
            }
        }
    }
}

/// An attachment name fit for log lines and messages: its last path component, printable characters only.
fn safe_name(name: &str) -> String {
    let last = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let cleaned: String = last.chars().filter(|c| !c.is_control()).take(200).collect();
    if cleaned.trim().is_empty() || cleaned == "." || cleaned == ".." {
        "attachment.json".to_string()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOTICE: &str = r#"[{"event_id":"x"}]"#;

    fn mail(from: &str, extra_headers: &str, body: &str) -> Vec<u8> {
        format!(
            "From: {from}\r\n{extra_headers}To: me@example.org\r\nSubject: MAST notice\r\n\
             Message-ID: <abc@mast.example>\r\nMIME-Version: 1.0\r\n{body}"
        )
        .into_bytes()
    }

    fn multipart(parts: &[&str]) -> String {
        let mut body = String::from("Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n");
        for p in parts {
            body.push_str("--b1\r\n");
            body.push_str(p);
            body.push_str("\r\n");
        }
        body.push_str("--b1--\r\n");
        body
    }

    fn json_part_base64(name: &str) -> String {
        use base64::Engine;
        let encode = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
        format!(
            "Content-Type: application/json; name=\"{name}\"\r\nContent-Disposition: attachment; \
             filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}",
            encode(NOTICE.as_bytes())
        )
    }

    #[test]
    fn base64_and_quoted_printable_attachments_are_both_taken() {
        let qp = "Content-Type: application/octet-stream\r\nContent-Disposition: attachment; \
                  filename=\"b.JSON\"\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
                  [{\"event_id\"=3A\"x\"}]";
        let raw = mail(
            "MAST <notices@stsci.edu>",
            "",
            &multipart(&[
                "Content-Type: text/plain\r\n\r\nHello",
                &json_part_base64("a.json"),
                qp,
            ]),
        );
        let Mail::Notices { from, attachments } = read(&raw, &["@stsci.edu".into()]) else {
            panic!("{:?}", read(&raw, &[]));
        };
        assert_eq!(from, "notices@stsci.edu");
        assert_eq!(attachments.len(), 2);
        assert_eq!(attachments[0].name, "a.json");
        assert_eq!(attachments[0].bytes, NOTICE.as_bytes());
        assert_eq!(attachments[1].name, "b.JSON");
        assert_eq!(attachments[1].bytes, NOTICE.as_bytes());
    }

    #[test]
    fn a_forwarded_message_gives_its_attachments() {
        let inner = String::from_utf8(mail(
            "notices@stsci.edu",
            "",
            &multipart(&[&json_part_base64("inner.json")]),
        ))
        .unwrap();
        let raw = mail(
            "colleague@uni.example",
            "",
            &multipart(&[
                "Content-Type: text/plain\r\n\r\nFYI",
                &format!("Content-Type: message/rfc822\r\n\r\n{inner}"),
            ]),
        );
        let Mail::Notices { attachments, .. } = read(&raw, &[]) else {
            panic!("{:?}", read(&raw, &[]));
        };
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].name, "inner.json");
        assert_eq!(attachments[0].bytes, NOTICE.as_bytes());
    }

    #[test]
    fn display_names_reply_to_and_sender_do_not_make_a_sender_allowed() {
        let allowed = vec!["notices@stsci.edu".to_string()];
        let body = multipart(&[&json_part_base64("a.json")]);
        for (from, extra) in [
            ("\"notices@stsci.edu\" <mallory@evil.example>", ""),
            (
                "mallory@evil.example",
                "Reply-To: notices@stsci.edu\r\nSender: notices@stsci.edu\r\n",
            ),
            ("notices@stsci.edu.evil.example", ""),
            ("notices@stsci.edu, mallory@evil.example", ""),
            ("mallory@evil.example\r\nFrom: notices@stsci.edu", ""),
            ("notices@stsci.edu\r\nFrom: notices@stsci.edu", ""),
        ] {
            let got = read(&mail(from, extra, &body), &allowed);
            assert!(matches!(got, Mail::NotAllowed { .. }), "{from}: {got:?}");
        }
        let ok = read(&mail("Notices <NOTICES@STSCI.EDU>", "", &body), &allowed);
        assert!(matches!(ok, Mail::Notices { .. }), "{ok:?}");
    }

    #[test]
    fn domains_match_whole_domains_only() {
        let allowed = vec!["@stsci.edu".to_string()];
        assert!(sender_allowed("a@stsci.edu", &allowed));
        assert!(!sender_allowed("a@evilstsci.edu", &allowed));
        assert!(!sender_allowed("a@stsci.edu.evil", &allowed));
        assert!(!sender_allowed("stsci.edu", &allowed));
    }

    #[test]
    fn a_mail_without_json_is_no_notice_and_garbage_is_handled() {
        let raw = mail("a@b.example", "", "Content-Type: text/plain\r\n\r\nhello");
        assert!(matches!(read(&raw, &[]), Mail::NoNotice { .. }));
        assert_eq!(message_id(&raw).as_deref(), Some("abc@mast.example"));
        // Whatever the bytes, reading them returns.
        for junk in [
            &b""[..],
            b"\xff\xfe\x00",
            b"From:\r\n\r\n",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n",
        ] {
            let _ = read(junk, &["@x.example".into()]);
        }
    }

    #[test]
    fn attachment_names_cannot_carry_paths_or_control_characters() {
        assert_eq!(safe_name("../../etc/passwd.json"), "passwd.json");
        assert_eq!(safe_name("a\r\nb.json"), "ab.json");
        assert_eq!(safe_name(".."), "attachment.json");
    }
}
