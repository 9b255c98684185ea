//! Folder names as a person writes them (`MAST/processed`) and as a server wants them.
//!
//! Servers differ: Dovecot's Maildir separates levels with `.` and refuses `/`; Debian's Cyrus keeps a
//! user's folders under `INBOX.`; names outside ASCII travel in IMAP's modified UTF-7 (RFC 3501 5.1.3).
//! The config always uses `/`; [`Layout::server_name`] maps it with the hierarchy delimiter (from
//! `LIST "" ""`) and the personal namespace prefix (from `NAMESPACE`, RFC 2342).

/// What a server told about its folder names.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    /// The hierarchy delimiter, `None` for a flat server.
    pub delimiter: Option<char>,
    /// The personal namespace's prefix, e.g. `INBOX.` on Cyrus without altnamespace, often empty.
    pub personal: String,
    /// The prefixes of the other namespaces (other users', shared), which are left as they are.
    pub others: Vec<String>,
}

impl Layout {
    /// The server's name for `configured`: `/` becomes the delimiter, the personal prefix is put in
    /// front unless the name is INBOX, under INBOX already, or in another namespace; then modified
    /// UTF-7.
    pub fn server_name(&self, configured: &str) -> String {
        let trimmed = configured.trim_matches('/');
        let native = match self.delimiter {
            Some(d) if d != '/' => trimmed.replace('/', &d.to_string()),
            _ => trimmed.to_string(),
        };
        let is_inbox = |n: &str| {
            n.eq_ignore_ascii_case("INBOX")
                || self.delimiter.is_some_and(|d| {
                    n.get(..5).is_some_and(|h| h.eq_ignore_ascii_case("INBOX"))
                        && n[5..].starts_with(d)
                        && n.len() > 5 + d.len_utf8()
                })
        };
        let starts_with_prefix = |n: &str, p: &str| {
            !p.is_empty()
                && n.len() >= p.len()
                && n.is_char_boundary(p.len())
                && n[..p.len()].eq_ignore_ascii_case(p)
        };
        let named = if is_inbox(&native)
            || self.personal.is_empty()
            || starts_with_prefix(&native, &self.personal)
            || self.others.iter().any(|p| starts_with_prefix(&native, p))
        {
            native
        } else {
            format!("{}{native}", self.personal)
        };
        // INBOX is case-insensitive and servers want it as INBOX.
        let named = if is_inbox(&named) {
            format!("INBOX{}", &named[5..])
        } else {
            named
        };
        utf7_encode(&named)
    }
}

/// Parses a `* NAMESPACE` line (RFC 2342): `* NAMESPACE (("" "/")) NIL (("#shared/" "/"))`. Returns the
/// first personal prefix and delimiter, and every other prefix; `None` if the line is not one.
pub fn parse_namespace(line: &str) -> Option<(String, Option<char>, Vec<String>)> {
    let rest = line.trim_end().strip_prefix("* ")?;
    let rest = rest
        .get(..9)
        .filter(|h| h.eq_ignore_ascii_case("NAMESPACE"))
        .map(|_| &rest[9..])?;
    let mut p = Parser {
        s: rest.as_bytes(),
        i: 0,
    };
    let mut groups = Vec::new();
    for _ in 0..3 {
        p.space();
        groups.push(p.group()?);
    }
    let personal = groups[0].first().cloned();
    let others = groups[0]
        .iter()
        .skip(1)
        .chain(groups[1].iter())
        .chain(groups[2].iter())
        .map(|(prefix, _)| prefix.clone())
        .filter(|p| !p.is_empty())
        .collect();
    let (prefix, delimiter) = personal.unwrap_or_default();
    Some((prefix, delimiter, others))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn space(&mut self) {
        while self.s.get(self.i) == Some(&b' ') {
            self.i += 1;
        }
    }

    fn nil(&mut self) -> bool {
        if self.s.len() >= self.i + 3 && self.s[self.i..self.i + 3].eq_ignore_ascii_case(b"NIL") {
            self.i += 3;
            true
        } else {
            false
        }
    }

    /// A quoted string, or NIL as `None`.
    fn nstring(&mut self) -> Option<Option<String>> {
        self.space();
        if self.nil() {
            return Some(None);
        }
        if self.s.get(self.i) != Some(&b'"') {
            return None;
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            match *self.s.get(self.i)? {
                b'\\' => {
                    out.push(*self.s.get(self.i + 1)?);
                    self.i += 2;
                }
                b'"' => {
                    self.i += 1;
                    return Some(Some(String::from_utf8_lossy(&out).into_owned()));
                }
                b => {
                    out.push(b);
                    self.i += 1;
                }
            }
        }
    }

    /// NIL or `((prefix delim ext...)...)`.
    fn group(&mut self) -> Option<Vec<(String, Option<char>)>> {
        if self.nil() {
            return Some(Vec::new());
        }
        if self.s.get(self.i) != Some(&b'(') {
            return None;
        }
        self.i += 1;
        let mut out = Vec::new();
        loop {
            self.space();
            match self.s.get(self.i)? {
                b')' => {
                    self.i += 1;
                    return Some(out);
                }
                b'(' => {
                    self.i += 1;
                    let prefix = self.nstring()??;
                    let delimiter = self.nstring()?.and_then(|d| d.chars().next());
                    // Namespace extensions (RFC 2342 7): skipped to the closing parenthesis.
                    let mut depth = 1;
                    while depth > 0 {
                        match self.s.get(self.i)? {
                            b'(' => depth += 1,
                            b')' => depth -= 1,
                            b'"' => {
                                self.nstring()?;
                                continue;
                            }
                            _ => {}
                        }
                        self.i += 1;
                    }
                    out.push((prefix, delimiter));
                }
                _ => return None,
            }
        }
    }
}

/// IMAP's modified UTF-7 (RFC 3501 5.1.3): printable ASCII as itself (`&` as `&-`), everything else as
/// `&` + modified base64 of UTF-16 + `-`.
pub fn utf7_encode(name: &str) -> String {
    use base64::Engine;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::IMAP_MUTF7,
        base64::engine::general_purpose::NO_PAD,
    );
    let mut out = String::new();
    let mut pending: Vec<u16> = Vec::new();
    let flush = |pending: &mut Vec<u16>, out: &mut String| {
        if !pending.is_empty() {
            let bytes: Vec<u8> = pending.iter().flat_map(|u| u.to_be_bytes()).collect();
            out.push('&');
            out.push_str(&engine.encode(bytes));
            out.push('-');
            pending.clear();
        }
    };
    for c in name.chars() {
        if (' '..='~').contains(&c) {
            flush(&mut pending, &mut out);
            if c == '&' {
                out.push_str("&-");
            } else {
                out.push(c);
            }
        } else {
            let mut buf = [0u16; 2];
            pending.extend_from_slice(c.encode_utf16(&mut buf));
        }
    }
    flush(&mut pending, &mut out);
    out
}

/// What a server's refusal said, without the client library's wrapping: async-imap gives NO and BAD as
/// `code: Some(..), info: Some("text")`.
pub fn server_words(refusal: &str) -> String {
    // SELECT's refusals come as `outcome: Outcome { code: None, information: Some("text") }`.
    let outcome = refusal.strip_prefix("outcome: Outcome { ").map(|r| {
        r.strip_suffix(" }")
            .unwrap_or(r)
            .replace("information: ", "info: ")
    });
    let refusal = outcome.as_deref().unwrap_or(refusal);
    let text = match refusal.find("info: Some(\"") {
        Some(at) => {
            let body = &refusal[at + 12..];
            let end = body.rfind("\")").unwrap_or(body.len());
            body[..end].replace("\\\"", "\"").replace("\\\\", "\\")
        }
        None if refusal.contains("info: None") => String::new(),
        None => refusal.to_string(),
    };
    // A response code such as [ALREADYEXISTS] is part of what the server said.
    let code = refusal
        .strip_prefix("code: Some(")
        .and_then(|c| c.split([',', '(', ')']).next())
        .map(|c| c.trim().trim_matches('"').to_string())
        .filter(|c| !c.is_empty() && c != "Other");
    let text = text.trim().to_string();
    match (code, text.is_empty()) {
        (Some(c), false) => format!("[{}] {text}", c.to_ascii_uppercase()),
        (Some(c), true) => format!("[{}]", c.to_ascii_uppercase()),
        (None, false) => text,
        (None, true) => "(no text)".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(delimiter: char, personal: &str) -> Layout {
        Layout {
            delimiter: Some(delimiter),
            personal: personal.into(),
            others: vec!["user.".into(), "#shared.".into()],
        }
    }

    #[test]
    fn names_follow_the_servers_delimiter_and_personal_namespace() {
        // Dovecot with Maildir.
        let dovecot = layout('.', "");
        assert_eq!(dovecot.server_name("MAST/processed"), "MAST.processed");
        assert_eq!(dovecot.server_name("Processed"), "Processed");
        assert_eq!(dovecot.server_name("inbox"), "INBOX");
        // Debian's Cyrus: personal folders under INBOX.
        let cyrus = layout('.', "INBOX.");
        assert_eq!(cyrus.server_name("MAST/processed"), "INBOX.MAST.processed");
        assert_eq!(cyrus.server_name("Processed"), "INBOX.Processed");
        assert_eq!(cyrus.server_name("INBOX"), "INBOX");
        assert_eq!(cyrus.server_name("INBOX/MAST"), "INBOX.MAST");
        assert_eq!(cyrus.server_name("inbox.MAST"), "INBOX.MAST");
        assert_eq!(cyrus.server_name("INBOX.Processed"), "INBOX.Processed");
        // Another user's or a shared folder is left in its namespace.
        assert_eq!(
            cyrus.server_name("user/astro/notices"),
            "user.astro.notices"
        );
        // A `/` server: as written.
        let slash = layout('/', "");
        assert_eq!(slash.server_name("MAST/processed"), "MAST/processed");
        assert_eq!(slash.server_name("/MAST/processed/"), "MAST/processed");
        // INBOXes is not INBOX.
        assert_eq!(cyrus.server_name("INBOXes"), "INBOX.INBOXes");
    }

    #[test]
    fn modified_utf7_matches_rfc_3501s_examples() {
        assert_eq!(utf7_encode("INBOX"), "INBOX");
        assert_eq!(utf7_encode("R&D"), "R&-D");
        // RFC 3501 5.1.3's example.
        assert_eq!(
            utf7_encode("~peter/mail/\u{65e5}\u{672c}\u{8a9e}/\u{53f0}\u{5317}"),
            "~peter/mail/&ZeVnLIqe-/&U,BTFw-"
        );
        assert_eq!(utf7_encode("Verarbeitet-Ä"), "Verarbeitet-&AMQ-");
        // Outside the BMP: a surrogate pair.
        assert_eq!(utf7_encode("\u{1F52D}"), "&2D3dLQ-");
        let cyrus = layout('.', "INBOX.");
        assert_eq!(
            cyrus.server_name("Données/traitées"),
            "INBOX.Donn&AOk-es.trait&AOk-es"
        );
    }

    #[test]
    fn namespace_lines_of_real_servers_are_read() {
        // Dovecot.
        assert_eq!(
            parse_namespace("* NAMESPACE ((\"\" \".\")) NIL NIL"),
            Some((String::new(), Some('.'), vec![]))
        );
        // Cyrus without altnamespace.
        assert_eq!(
            parse_namespace("* NAMESPACE ((\"INBOX.\" \".\")) ((\"user.\" \".\")) ((\"\" \".\"))"),
            Some(("INBOX.".into(), Some('.'), vec!["user.".into()]))
        );
        // An extension inside, and a NIL delimiter.
        assert_eq!(
            parse_namespace(
                "* NAMESPACE ((\"\" \"/\" \"X-PARAM\" (\"a\" \"b\"))) NIL ((\"#shared/\" NIL))"
            ),
            Some((String::new(), Some('/'), vec!["#shared/".into()]))
        );
        assert_eq!(
            parse_namespace("* NAMESPACE NIL NIL NIL"),
            Some((String::new(), None, vec![]))
        );
        assert_eq!(parse_namespace("* OK hello"), None);
        assert_eq!(parse_namespace("* NAMESPACE ((\"unterminated"), None);
    }

    #[test]
    fn a_refusal_reads_as_the_servers_words() {
        assert_eq!(
            server_words("code: None, info: Some(\"Mailbox name must not have '/' characters\")"),
            "Mailbox name must not have '/' characters"
        );
        assert_eq!(
            server_words("code: Some(AlreadyExists), info: Some(\"Mailbox exists\")"),
            "[ALREADYEXISTS] Mailbox exists"
        );
        assert_eq!(server_words("code: None, info: None"), "(no text)");
        // SELECT's form.
        assert_eq!(
            server_words(
                "outcome: Outcome { code: None, information: Some(\"Mailbox doesn't exist: Foo\") }"
            ),
            "Mailbox doesn't exist: Foo"
        );
        assert_eq!(server_words("Invalid mailbox name"), "Invalid mailbox name");
        assert_eq!(
            server_words("code: None, info: Some(\"say \\\"no\\\"\")"),
            "say \"no\""
        );
    }
}
