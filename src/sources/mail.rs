//! What a mail holds for mastsub: who sent it, and its JSON attachments (also inside forwarded
//! `message/rfc822` parts, `.json.gz` files and `.zip` archives). Pure functions over the raw message
//! bytes (and over an IMAP `BODYSTRUCTURE`, to tell which mails are worth fetching whole), so that they
//! can be tested and fuzzed without a server.

use std::io::{Cursor, Read};

use async_imap::imap_proto::{BodyParams, BodyStructure};
use flate2::read::MultiGzDecoder;
use mail_parser::{HeaderName, Message, MessageParser, MimeHeaders, PartType};

/// Forwarded messages inside forwarded messages are followed this deep, no deeper.
const MAX_DEPTH: usize = 8;

/// At most this many `.json` entries are read from one zip archive.
const MAX_ZIP_ENTRIES: usize = 100;

/// At most this many entry names are listed when a zip archive holds no `.json` file.
const MAX_LISTED_NAMES: usize = 10;

const GZIP_MAGIC: &[u8] = b"\x1f\x8b";
const ZIP_MAGIC: &[u8] = b"PK\x03\x04";
const EMPTY_ZIP_MAGIC: &[u8] = b"PK\x05\x06";

/// The formats named when a part that looks like a notice is none of them.
const READ_FORMATS: &str = "JSON, .json.gz, .zip";

/// File name endings of compressed files and archives: a part so named may hold a notice.
const ARCHIVE_EXTENSIONS: &[&str] = &[
    ".gz", ".zip", ".bz2", ".xz", ".zst", ".7z", ".tar", ".tgz", ".rar", ".lz", ".lzma", ".z",
];

/// Limits on what is decompressed from one mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes one `.json.gz` file or zip entry may decompress to, and also the most that all of
    /// a mail's compressed notices together may decompress to (pass `ingest.max_notice_size`).
    /// Decompression stops at this limit: the real decompressed bytes are counted, never the sizes an
    /// archive claims.
    pub max_uncompressed: u64,
}

impl Default for Limits {
    /// 64 MiB, the default of `ingest.max_notice_size`.
    fn default() -> Self {
        Limits {
            max_uncompressed: 64 * 1024 * 1024,
        }
    }
}

/// One JSON attachment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Its file name (or a made-up one, when the mail gives none): without `.gz` for a gunzipped one, the
    /// entry's own file name for one from a zip archive.
    pub name: String,
    /// Its decoded (and decompressed) bytes.
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
    /// From an allowed sender, but without any JSON attachment that could be read.
    NoNotice {
        /// The From address.
        from: String,
        /// One short description per part that looked like it could hold a notice but was not taken
        /// (and why), in the order they appear; empty when nothing looked like a notice.
        found: Vec<String>,
    },
    /// JSON attachments to ingest.
    Notices {
        /// The From address.
        from: String,
        /// The attachments, in the order they appear (those from a compressed part where that part is).
        attachments: Vec<Attachment>,
        /// Parts that looked like they could hold a notice but were not taken, described as in
        /// [`Mail::NoNotice::found`].
        skipped: Vec<String>,
    },
}

/// Whether a mail's sender is allowed, by its From header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sender {
    /// Allowed (or anyone is); `from` is the address(es), or `(none)`.
    Allowed {
        /// The From address(es), lower case, `, `-separated.
        from: String,
    },
    /// Not allowed; `from` is the address(es), or `(none)`.
    NotAllowed {
        /// The From address(es), lower case, `, `-separated.
        from: String,
    },
}

/// The Message-ID header (without angle brackets), if the mail has one.
pub fn message_id(raw: &[u8]) -> Option<String> {
    MessageParser::default()
        .parse_headers(raw)
        .and_then(|m| m.message_id().map(str::to_string))
}

/// Reads a mail: checks its sender against `allowed` (see [`header_sender`]), then collects its JSON
/// attachments: parts named `*.json` or typed `application/json`, gunzipped `*.json.gz` (or gzip) parts and
/// the `.json` entries of `.zip` parts, also inside forwarded messages, decompressing no more than `limits`
/// allow. Parts that look like they could hold a notice but are not taken are described in
/// [`Mail::NoNotice::found`] or [`Mail::Notices::skipped`].
pub fn read(raw: &[u8], allowed: &[String], limits: &Limits) -> Mail {
    let Some(message) = MessageParser::default().parse(raw) else {
        return Mail::Unreadable;
    };
    let from = match sender(&message, allowed) {
        Sender::Allowed { from } => from,
        Sender::NotAllowed { from } => return Mail::NotAllowed { from },
    };
    let mut collector = Collector {
        limits: *limits,
        budget: limits.max_uncompressed,
        attachments: Vec::new(),
        found: Vec::new(),
    };
    collector.collect(&message, 0);
    let Collector {
        attachments, found, ..
    } = collector;
    if attachments.is_empty() {
        Mail::NoNotice { from, found }
    } else {
        Mail::Notices {
            from,
            attachments,
            skipped: found,
        }
    }
}

/// Checks a mail's sender from its header lines alone (`headers`: the `From` and `Message-ID` lines as an
/// IMAP server returns them for `BODY.PEEK[HEADER.FIELDS (FROM MESSAGE-ID)]`, a blank line after them or
/// not), by the same rules as [`read`]: `allowed` holds addresses or `@domain`s, compared without case, and
/// an empty list allows anyone.
///
/// Only the addresses of the `From` header count: a display name ("notices@stsci.edu" <x@evil.org>),
/// `Reply-To` or `Sender` cannot make a mail look allowed; there must be exactly one From header, every
/// entry of it must carry an address, and every address must be allowed.
pub fn header_sender(headers: &[u8], allowed: &[String]) -> Sender {
    match MessageParser::default().parse_headers(headers) {
        Some(message) => sender(&message, allowed),
        None => {
            let from = "(none)".to_string();
            if allowed.is_empty() {
                Sender::Allowed { from }
            } else {
                Sender::NotAllowed { from }
            }
        }
    }
}

fn sender(message: &Message<'_>, allowed: &[String]) -> Sender {
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
        Sender::NotAllowed { from }
    } else {
        Sender::Allowed { from }
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

/// Whether a mail, by its IMAP `BODYSTRUCTURE`, may hold a notice: some part is typed JSON, gzip, zip or
/// another compressed or archive type, or `application/octet-stream`, or is named (in its Content-Type or
/// Content-Disposition parameters, RFC 2231 `name*`/`filename*` forms included) like a notice, a JSON file
/// or a compressed file; forwarded `message/rfc822` parts are looked into. Generous on purpose: a wrong
/// "yes" costs one fetch, a wrong "no" would lose a notice.
pub fn may_hold_notice(bs: &BodyStructure<'_>) -> bool {
    match bs {
        BodyStructure::Multipart { bodies, .. } => bodies.iter().any(may_hold_notice),
        BodyStructure::Message { body, .. } => may_hold_notice(body),
        BodyStructure::Basic { common, .. } | BodyStructure::Text { common, .. } => {
            let ct = format!("{}/{}", common.ty.ty, common.ty.subtype).to_ascii_lowercase();
            let mut names = param_names(&common.ty.params);
            if let Some(d) = &common.disposition {
                names.extend(param_names(&d.params));
            }
            ct == "application/octet-stream"
                // message/global and the like: a forwarded mail the server did not look into.
                || (ct.starts_with("message/") && ct != "message/delivery-status"
                    && ct != "message/disposition-notification")
                || looks_like_notice(None, &ct)
                || names.iter().any(|n| {
                    // An RFC 2047 encoded word that this does not decode: it could be anything.
                    n.contains("=?") || looks_like_notice(Some(&n.to_lowercase()), &ct)
                })
        }
    }
}

/// The `name` / `filename` values among raw BODYSTRUCTURE parameters, RFC 2231 continuations joined and
/// percent-encoding decoded, and each raw value too (so that nothing is lost to decoding).
fn param_names(params: &BodyParams<'_>) -> Vec<String> {
    let Some(params) = params else {
        return Vec::new();
    };
    let mut names = Vec::new();
    // (key, section, encoded, value) of `name*N*` / `filename*N` style parameters.
    let mut sections: Vec<(String, u32, bool, &str)> = Vec::new();
    for (key, value) in params {
        let key = key.to_ascii_lowercase();
        let (base, rest) = match key.split_once('*') {
            Some((base, rest)) => (base, Some(rest)),
            None => (key.as_str(), None),
        };
        if base != "name" && base != "filename" {
            continue;
        }
        names.push(value.to_string());
        let Some(rest) = rest else {
            continue;
        };
        let (number, encoded) = match rest.strip_suffix('*') {
            Some(n) => (n, true),
            None => (rest, false),
        };
        let section = if number.is_empty() {
            Some(0)
        } else {
            number.parse::<u32>().ok()
        };
        if let Some(section) = section {
            // `name*` (no section number) is encoded: the `*` ended up in `rest` as "".
            let encoded = encoded || number.is_empty();
            sections.push((base.to_string(), section, encoded, value));
        }
    }
    sections.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
    let mut i = 0;
    while i < sections.len() {
        let base = sections[i].0.clone();
        let mut joined = Vec::new();
        while i < sections.len() && sections[i].0 == base {
            let (_, section, encoded, value) = &sections[i];
            if *encoded {
                // The first encoded section starts with charset'language'.
                let value = if *section == 0 {
                    value.splitn(3, '\'').nth(2).unwrap_or(value)
                } else {
                    value
                };
                joined.extend(percent_encoding::percent_decode_str(value));
            } else {
                joined.extend_from_slice(value.as_bytes());
            }
            i += 1;
        }
        names.push(String::from_utf8_lossy(&joined).into_owned());
    }
    names
}

/// Whether a part named `name` (lower case, if any) and typed `ct` (`type/subtype`, lower case) looks like
/// it could hold a notice.
fn looks_like_notice(name: Option<&str>, ct: &str) -> bool {
    if ct.contains("json") || is_gzip_type(ct) || is_zip_type(ct) || is_archive_type(ct) {
        return true;
    }
    let Some(name) = name else {
        return false;
    };
    if ARCHIVE_EXTENSIONS.iter().any(|e| name.ends_with(e)) || name.ends_with(".json") {
        return true;
    }
    let media = ct.starts_with("image/")
        || ct.starts_with("audio/")
        || ct.starts_with("video/")
        || ct == "text/html"
        || ct.ends_with("-signature")
        || ct.ends_with("/pkcs7-mime");
    !media
        && ["json", "event", "notice", "metadata"]
            .iter()
            .any(|k| name.contains(k))
}

/// JSON by its type (what `read` takes as JSON without a `.json` name).
fn is_json_type(ct: &str) -> bool {
    matches!(ct, "application/json" | "application/x-json" | "text/json") || ct.ends_with("+json")
}

fn is_gzip_type(ct: &str) -> bool {
    matches!(
        ct,
        "application/gzip" | "application/x-gzip" | "application/gzip-compressed"
    )
}

fn is_zip_type(ct: &str) -> bool {
    matches!(
        ct,
        "application/zip" | "application/x-zip" | "application/x-zip-compressed"
    )
}

/// Compressed files and archives that `read` does not open.
fn is_archive_type(ct: &str) -> bool {
    matches!(
        ct,
        "application/x-bzip2"
            | "application/x-bzip"
            | "application/x-xz"
            | "application/zstd"
            | "application/x-zstd"
            | "application/x-7z-compressed"
            | "application/x-tar"
            | "application/x-gtar"
            | "application/x-compressed-tar"
            | "application/x-compress"
            | "application/x-compressed"
            | "application/x-rar-compressed"
            | "application/vnd.rar"
            | "application/x-lzip"
            | "application/x-lzma"
    )
}

/// Whether decompressed bytes look like JSON text (an object or array first, after any BOM and blanks).
fn looks_like_json(bytes: &[u8]) -> bool {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    matches!(
        bytes.iter().find(|b| !b.is_ascii_whitespace()),
        Some(b'{' | b'[')
    )
}

/// A byte count for people: `64 MiB`, `512 KiB`, `1000 bytes`.
fn human_size(n: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    if n >= MIB && n.is_multiple_of(MIB) {
        format!("{} MiB", n / MIB)
    } else if n >= KIB && n.is_multiple_of(KIB) {
        format!("{} KiB", n / KIB)
    } else {
        format!("{n} bytes")
    }
}

enum Format {
    Json,
    Gzip,
    Zip,
    /// Looks like a notice, but is no format that is read.
    Other,
}

/// What came of decompressing.
enum Inflated {
    Bytes(Vec<u8>),
    /// Over [`Limits::max_uncompressed`] by itself.
    OverLimit,
    /// Over what is left of the mail's budget.
    OverBudget,
    Failed(String),
}

struct Collector {
    limits: Limits,
    /// Decompressed bytes the mail may still give.
    budget: u64,
    attachments: Vec<Attachment>,
    found: Vec<String>,
}

impl Collector {
    fn collect(&mut self, message: &Message<'_>, depth: usize) {
        for (index, part) in message.parts.iter().enumerate() {
            match &part.body {
                PartType::Message(inner) if depth < MAX_DEPTH => self.collect(inner, depth + 1),
                PartType::Message(_) | PartType::Multipart(_) => {}
                PartType::Text(_)
                | PartType::Html(_)
                | PartType::Binary(_)
                | PartType::InlineBinary(_) => {
                    let name = part.attachment_name().map(safe_name);
                    let ct = part.content_type().map(|ct| {
                        format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or_default())
                            .to_ascii_lowercase()
                    });
                    self.leaf(name, ct.as_deref(), part.contents(), index);
                }
            }
        }
    }

    fn leaf(&mut self, name: Option<String>, ct: Option<&str>, bytes: &[u8], index: usize) {
        let lower = name.as_deref().map(str::to_ascii_lowercase);
        let lower = lower.as_deref();
        let ct_or_default = ct.unwrap_or("text/plain");
        let candidate = looks_like_notice(lower, ct_or_default);
        let sniff = candidate || ct_or_default == "application/octet-stream";
        let ends = |suffix: &str| lower.is_some_and(|n| n.ends_with(suffix));
        let format = if sniff && bytes.starts_with(GZIP_MAGIC) {
            Format::Gzip
        } else if sniff && (bytes.starts_with(ZIP_MAGIC) || bytes.starts_with(EMPTY_ZIP_MAGIC)) {
            Format::Zip
        } else if ends(".json") || is_json_type(ct_or_default) {
            Format::Json
        } else if ends(".gz") || is_gzip_type(ct_or_default) {
            Format::Gzip
        } else if ends(".zip") || is_zip_type(ct_or_default) {
            Format::Zip
        } else if candidate {
            Format::Other
        } else {
            return;
        };
        let shown = name.clone().unwrap_or_else(|| "(unnamed part)".to_string());
        let found_before = self.found.len();
        match format {
            Format::Json => {
                let name = name.unwrap_or_else(|| self.made_up_name(index));
                self.attachments.push(Attachment {
                    name,
                    bytes: bytes.to_vec(),
                });
            }
            Format::Gzip => self.gunzip(&shown, name, bytes, index),
            Format::Zip => self.unzip(&shown, bytes),
            Format::Other => self.found.push(format!(
                "{shown} ({}): not a format mastsub reads ({READ_FORMATS})",
                ct.unwrap_or("no Content-Type")
            )),
        }
        // A part found by its magic bytes alone (an octet-stream that is some zip or gzip file) is not
        // worth a log line unless it held a notice.
        if !candidate {
            self.found.truncate(found_before);
        }
    }

    fn made_up_name(&self, index: usize) -> String {
        format!("attachment-{}-{index}.json", self.attachments.len() + 1)
    }

    /// Decompresses `reader` up to the limits, counting what it gives against the mail's budget.
    fn inflate(&mut self, reader: impl Read) -> Inflated {
        let cap = self.limits.max_uncompressed.min(self.budget);
        let mut out = Vec::new();
        let read = reader.take(cap.saturating_add(1)).read_to_end(&mut out);
        // Whatever was unpacked counts, taken or not: parts over the limit or corrupt cannot make a
        // mail unpack more than its budget in all.
        self.budget = self.budget.saturating_sub(out.len() as u64);
        match read {
            Err(e) => Inflated::Failed(e.to_string()),
            Ok(n) if n as u64 > cap => {
                if cap == self.limits.max_uncompressed {
                    Inflated::OverLimit
                } else {
                    Inflated::OverBudget
                }
            }
            Ok(_) => Inflated::Bytes(out),
        }
    }

    /// Says why `shown` was not taken when decompressing it went wrong; false if it did not.
    fn too_big(&mut self, shown: &str, inflated: &Inflated) -> bool {
        let limit = human_size(self.limits.max_uncompressed);
        match inflated {
            Inflated::OverLimit => self.found.push(format!(
                "{shown}: more than {limit} uncompressed (ingest.max_notice_size)"
            )),
            Inflated::OverBudget => self.found.push(format!(
                "{shown}: not read, as the mail's compressed notices come to more than {limit} \
                 uncompressed in all (ingest.max_notice_size)"
            )),
            Inflated::Bytes(_) | Inflated::Failed(_) => return false,
        }
        true
    }

    fn gunzip(&mut self, shown: &str, name: Option<String>, bytes: &[u8], index: usize) {
        let inflated = self.inflate(MultiGzDecoder::new(bytes));
        if self.too_big(shown, &inflated) {
            return;
        }
        match inflated {
            Inflated::Bytes(data) => {
                // The name without `.gz`; a made-up one for an unnamed part, which then must look like
                // JSON inside.
                let (inner, named_json) = match name {
                    Some(n) => {
                        let stripped = if n.to_ascii_lowercase().ends_with(".gz") {
                            &n[..n.len() - 3]
                        } else {
                            &n[..]
                        };
                        let inner = safe_name(stripped);
                        let json = inner.to_ascii_lowercase().ends_with(".json");
                        (inner, json)
                    }
                    None => (self.made_up_name(index), false),
                };
                if named_json || looks_like_json(&data) {
                    self.attachments.push(Attachment {
                        name: inner,
                        bytes: data,
                    });
                } else {
                    self.found
                        .push(format!("{shown}: holds {inner}, which is not JSON"));
                }
            }
            Inflated::Failed(e) => self.found.push(format!("{shown}: not valid gzip ({e})")),
            Inflated::OverLimit | Inflated::OverBudget => {}
        }
    }

    fn unzip(&mut self, shown: &str, bytes: &[u8]) {
        let mut archive = match zip::ZipArchive::new(Cursor::new(bytes)) {
            Ok(a) => a,
            Err(e) => {
                self.found
                    .push(format!("{shown}: not a valid zip archive ({e})"));
                return;
            }
        };
        // Entries that share their bytes (a zip bomb's trick) are refused whole.
        if !matches!(archive.has_overlapping_files(), Ok(false)) {
            self.found.push(format!(
                "{shown}: entries that overlap each other (a zip bomb's shape), not read"
            ));
            return;
        }
        let found_before = self.found.len();
        let mut names = Vec::new();
        let mut taken = 0;
        let mut tried = 0;
        for i in 0..archive.len() {
            let (entry_name, is_dir, is_symlink, encrypted, method) = match archive.by_index_data(i)
            {
                Ok(e) => (
                    e.name()
                        .map(|n| n.into_owned())
                        .unwrap_or_else(|_| String::from_utf8_lossy(e.name_raw()).into_owned()),
                    e.is_dir(),
                    e.is_symlink(),
                    e.encrypted(),
                    e.compression(),
                ),
                Err(e) => {
                    self.found
                        .push(format!("{shown}: entry {} cannot be read ({e})", i + 1));
                    continue;
                }
            };
            if is_dir {
                continue;
            }
            let entry = safe_name(&entry_name);
            let lower = entry.to_ascii_lowercase();
            let shown_entry = format!("{shown}: {entry}");
            if names.len() < MAX_LISTED_NAMES {
                names.push(entry.clone());
            } else if names.len() == MAX_LISTED_NAMES {
                names.push("…".to_string());
            }
            if !lower.ends_with(".json") {
                if lower.ends_with(".zip") {
                    self.found.push(format!(
                        "{shown_entry}: a zip archive inside a zip archive, not read"
                    ));
                } else if looks_like_notice(Some(&lower), "") {
                    self.found.push(format!(
                        "{shown_entry}: not read (only the .json files of a zip archive are)"
                    ));
                }
                continue;
            }
            if tried == MAX_ZIP_ENTRIES {
                self.found.push(format!(
                    "{shown}: more than {MAX_ZIP_ENTRIES} .json files; those after the \
                     {MAX_ZIP_ENTRIES}th are not read"
                ));
                break;
            }
            if is_symlink {
                self.found
                    .push(format!("{shown_entry}: a symbolic link, not read"));
                continue;
            }
            if encrypted {
                self.found
                    .push(format!("{shown_entry}: encrypted, not read"));
                continue;
            }
            if !matches!(
                method,
                zip::CompressionMethod::Stored | zip::CompressionMethod::Deflated
            ) {
                self.found.push(format!(
                    "{shown_entry}: compressed with {method}, which mastsub does not read (only \
                     stored or deflated entries)"
                ));
                continue;
            }
            tried += 1;
            let inflated = match archive.by_index(i) {
                Ok(file) => self.inflate(file),
                Err(e) => Inflated::Failed(e.to_string()),
            };
            if self.too_big(&shown_entry, &inflated) {
                continue;
            }
            match inflated {
                Inflated::Bytes(data) => {
                    taken += 1;
                    self.attachments.push(Attachment {
                        name: entry,
                        bytes: data,
                    });
                }
                Inflated::Failed(e) => self
                    .found
                    .push(format!("{shown_entry}: corrupt, not read ({e})")),
                Inflated::OverLimit | Inflated::OverBudget => {}
            }
        }
        if taken == 0 && self.found.len() == found_before {
            let list = if names.is_empty() {
                "it is empty".to_string()
            } else {
                names.join(", ")
            };
            self.found
                .push(format!("{shown}: holds no .json file ({list})"));
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
        let Mail::Notices {
            from, attachments, ..
        } = read(&raw, &["@stsci.edu".into()], &Limits::default())
        else {
            panic!("{:?}", read_all(&raw));
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
        let Mail::Notices { attachments, .. } = read_all(&raw) else {
            panic!("{:?}", read_all(&raw));
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
            let got = read(&mail(from, extra, &body), &allowed, &Limits::default());
            assert!(matches!(got, Mail::NotAllowed { .. }), "{from}: {got:?}");
        }
        let ok = read(
            &mail("Notices <NOTICES@STSCI.EDU>", "", &body),
            &allowed,
            &Limits::default(),
        );
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
        assert!(matches!(read_all(&raw), Mail::NoNotice { .. }));
        assert_eq!(message_id(&raw).as_deref(), Some("abc@mast.example"));
        // Whatever the bytes, reading them returns.
        for junk in [
            &b""[..],
            b"\xff\xfe\x00",
            b"From:\r\n\r\n",
            b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n",
        ] {
            let _ = read(junk, &["@x.example".into()], &Limits::default());
        }
    }

    #[test]
    fn attachment_names_cannot_carry_paths_or_control_characters() {
        assert_eq!(safe_name("../../etc/passwd.json"), "passwd.json");
        assert_eq!(safe_name("a\r\nb.json"), "ab.json");
        assert_eq!(safe_name(".."), "attachment.json");
    }

    // ---- compressed notices ----

    fn limits(max: u64) -> Limits {
        Limits {
            max_uncompressed: max,
        }
    }

    fn read_all(raw: &[u8]) -> Mail {
        read(raw, &[], &Limits::default())
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// `n` zero bytes gzipped, written a chunk at a time (never `n` bytes in memory).
    fn gzip_zeros(n: usize) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let chunk = vec![0u8; 64 * 1024];
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len());
            e.write_all(&chunk[..k]).unwrap();
            left -= k;
        }
        e.finish().unwrap()
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            if name.ends_with('/') {
                w.add_directory(*name, options).unwrap();
            } else {
                w.start_file(*name, options).unwrap();
                w.write_all(data).unwrap();
            }
        }
        w.finish().unwrap().into_inner()
    }

    fn binary_part(ct: &str, name: &str, bytes: &[u8]) -> String {
        use base64::Engine;
        format!(
            "Content-Type: {ct}; name=\"{name}\"\r\nContent-Disposition: attachment; \
             filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}",
            base64::engine::general_purpose::STANDARD.encode(bytes)
        )
    }

    fn notices(mail: Mail) -> (Vec<Attachment>, Vec<String>) {
        match mail {
            Mail::Notices {
                attachments,
                skipped,
                ..
            } => (attachments, skipped),
            other => panic!("not notices: {other:?}"),
        }
    }

    fn no_notice(mail: Mail) -> Vec<String> {
        match mail {
            Mail::NoNotice { found, .. } => found,
            other => panic!("not NoNotice: {other:?}"),
        }
    }

    #[test]
    fn a_json_gz_attachment_is_gunzipped_and_named_without_gz() {
        let raw = mail(
            "notices@stsci.edu",
            "",
            &multipart(&[
                "Content-Type: text/plain\r\n\r\nHello",
                &binary_part(
                    "application/gzip",
                    "event_metadata.json.gz",
                    &gzip(NOTICE.as_bytes()),
                ),
            ]),
        );
        let (attachments, skipped) =
            notices(read(&raw, &["@stsci.edu".into()], &Limits::default()));
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].name, "event_metadata.json");
        assert_eq!(attachments[0].bytes, NOTICE.as_bytes());
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    #[test]
    fn gzip_is_recognised_by_type_and_by_magic_bytes_too() {
        let gz = gzip(NOTICE.as_bytes());
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[
                // Mislabelled: a .json name, gzip inside.
                &binary_part("application/octet-stream", "plain.json", &gz),
                // By type alone, with a name that says nothing.
                &binary_part("application/x-gzip", "data", &gz),
            ]),
        );
        let (attachments, skipped) = notices(read_all(&raw));
        let names: Vec<_> = attachments.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["plain.json", "data"]);
        assert!(attachments.iter().all(|a| a.bytes == NOTICE.as_bytes()));
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    #[test]
    fn a_gzip_bomb_stops_at_the_limit_and_is_named() {
        // 8 MiB of zeros: about 8 KiB gzipped, eight times the 1 MiB limit.
        let bomb = gzip_zeros(8 * 1024 * 1024);
        assert!(bomb.len() < 100 * 1024, "{}", bomb.len());
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[&binary_part("application/gzip", "big.json.gz", &bomb)]),
        );
        let found = no_notice(read(&raw, &[], &limits(1024 * 1024)));
        assert_eq!(
            found,
            ["big.json.gz: more than 1 MiB uncompressed (ingest.max_notice_size)"]
        );
    }

    #[test]
    fn bombs_that_fail_still_use_up_the_mails_budget() {
        // Twenty bombs in one mail: the first unpacks to the limit and is refused; it used the mail's
        // budget, so the other nineteen are not unpacked again (they would be 20x the limit).
        let bomb = gzip_zeros(8 * 1024 * 1024);
        let parts: Vec<String> = (0..20)
            .map(|i| binary_part("application/gzip", &format!("b{i}.json.gz"), &bomb))
            .collect();
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let raw = mail("a@b.example", "", &multipart(&refs));
        let mut collector = Collector {
            limits: limits(1024 * 1024),
            budget: 1024 * 1024,
            attachments: Vec::new(),
            found: Vec::new(),
        };
        let message = MessageParser::default().parse(&raw[..]).unwrap();
        collector.collect(&message, 0);
        assert_eq!(collector.budget, 0);
        assert_eq!(collector.found.len(), 20, "{:?}", collector.found);
        assert!(collector.found[0].contains("more than 1 MiB uncompressed (ingest"));
        assert!(
            collector.found[1..]
                .iter()
                .all(|f| f.contains("more than 1 MiB uncompressed in all")),
            "{:?}",
            collector.found
        );
    }

    #[test]
    fn the_limit_holds_for_all_compressed_notices_of_a_mail_together() {
        let mut big = NOTICE.as_bytes().to_vec();
        big.resize(600 * 1024, b' ');
        let gz = gzip(&big);
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[
                &binary_part("application/gzip", "one.json.gz", &gz),
                &binary_part("application/zip", "two.zip", &zip_of(&[("two.json", &big)])),
            ]),
        );
        let (attachments, skipped) = notices(read(&raw, &[], &limits(1024 * 1024)));
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].name, "one.json");
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert!(
            skipped[0].starts_with("two.zip: two.json: not read, as the mail's compressed notices")
                && skipped[0].contains("more than 1 MiB uncompressed in all"),
            "{skipped:?}"
        );
    }

    #[test]
    fn corrupt_gzip_is_named_with_the_reason() {
        let mut gz = gzip(NOTICE.as_bytes());
        let n = gz.len();
        gz[n - 6] ^= 0xff; // the CRC
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[
                &binary_part("application/gzip", "bad.json.gz", &gz),
                &binary_part("application/gzip", "worse.json.gz", b"not gzip at all"),
            ]),
        );
        let found = no_notice(read_all(&raw));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("bad.json.gz: not valid gzip ("),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("worse.json.gz: not valid gzip ("),
            "{found:?}"
        );
    }

    #[test]
    fn a_zip_gives_its_json_entries_in_order() {
        let z = zip_of(&[
            ("notices/", b""),
            ("notices/first.json", NOTICE.as_bytes()),
            ("readme.txt", b"hello"),
            ("../SECOND.JSON", br#"[{"event_id":"y"}]"#),
        ]);
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[
                &json_part_base64("before.json"),
                &binary_part("application/zip", "notices.zip", &z),
                &json_part_base64("after.json"),
            ]),
        );
        let (attachments, skipped) = notices(read_all(&raw));
        let names: Vec<_> = attachments.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            ["before.json", "first.json", "SECOND.JSON", "after.json"]
        );
        assert_eq!(attachments[1].bytes, NOTICE.as_bytes());
        assert_eq!(attachments[2].bytes, br#"[{"event_id":"y"}]"#);
        assert!(skipped.is_empty(), "{skipped:?}");
    }

    #[test]
    fn zip_is_recognised_by_magic_bytes_in_an_octet_stream() {
        let z = zip_of(&[("a.json", NOTICE.as_bytes())]);
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[&binary_part("application/octet-stream", "download.bin", &z)]),
        );
        let (attachments, _) = notices(read_all(&raw));
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].name, "a.json");
        // A zip of other things by magic alone, in a part that does not look like a notice: no log line.
        let z = zip_of(&[("a.csv", b"1,2")]);
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[&binary_part("application/octet-stream", "download.bin", &z)]),
        );
        assert_eq!(no_notice(read_all(&raw)), Vec::<String>::new());
    }

    #[test]
    fn a_zip_without_json_is_named_with_its_entries() {
        let z = zip_of(&[("readme.txt", b"hello"), ("data.csv", b"1,2")]);
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[
                "Content-Type: text/plain\r\n\r\nHello",
                &binary_part("application/zip", "notices.zip", &z),
            ]),
        );
        assert_eq!(
            no_notice(read_all(&raw)),
            ["notices.zip: holds no .json file (readme.txt, data.csv)"]
        );
    }

    #[test]
    fn a_zip_entry_over_the_limit_and_nested_archives_are_named() {
        let zeros = vec![0u8; 2 * 1024 * 1024];
        let inner = zip_of(&[("inner.json", NOTICE.as_bytes())]);
        // ok.json first: what big.json unpacks uses up the mail's budget, taken or not.
        let z = zip_of(&[
            ("ok.json", NOTICE.as_bytes()),
            ("big.json", &zeros),
            ("inner.zip", &inner),
            ("event.json.bz2", b"BZh9"),
        ]);
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[&binary_part("application/zip", "n.zip", &z)]),
        );
        let (attachments, skipped) = notices(read(&raw, &[], &limits(1024 * 1024)));
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].name, "ok.json");
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(
            skipped[0].starts_with("n.zip: big.json: ")
                && skipped[0].contains("more than 1 MiB uncompressed"),
            "{skipped:?}"
        );
        assert!(
            skipped[1].starts_with("n.zip: inner.zip: a zip archive inside"),
            "{skipped:?}"
        );
        assert!(
            skipped[2].starts_with("n.zip: event.json.bz2: not read"),
            "{skipped:?}"
        );
    }

    #[test]
    fn a_corrupt_zip_is_named_with_the_reason() {
        let mut z = zip_of(&[("a.json", NOTICE.as_bytes())]);
        z.truncate(z.len() / 2);
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[
                &binary_part("application/zip", "cut.zip", &z),
                &binary_part("application/zip", "junk.zip", b"PK\x03\x04 nothing else"),
            ]),
        );
        let found = no_notice(read_all(&raw));
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("cut.zip: not a valid zip archive ("),
            "{found:?}"
        );
        assert!(
            found[1].starts_with("junk.zip: not a valid zip archive ("),
            "{found:?}"
        );
        // A damaged entry (its data changed, the CRC no longer matches).
        let mut z = zip_of(&[("a.json", &[b'x'; 1000][..])]);
        let at = z.windows(6).position(|w| w == b"a.json").unwrap() + 6 + 2;
        z[at] ^= 0x55;
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[&binary_part("application/zip", "crc.zip", &z)]),
        );
        let found = no_notice(read_all(&raw));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("crc.zip: a.json: corrupt, not read ("),
            "{found:?}"
        );
    }

    #[test]
    fn other_compressed_formats_are_named_and_plain_parts_are_not() {
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[
                "Content-Type: text/plain\r\n\r\nHello",
                "Content-Type: text/html\r\n\r\n<p>Hello</p>",
                &binary_part("image/png", "logo.png", b"\x89PNG"),
                &binary_part("application/pkcs7-signature", "smime.p7s", b"sig"),
                &binary_part(
                    "application/x-bzip2",
                    "event_metadata.json.bz2",
                    b"BZh91AY&SY",
                ),
                &binary_part("application/pdf", "notice.pdf", b"%PDF"),
            ]),
        );
        assert_eq!(
            no_notice(read_all(&raw)),
            [
                "event_metadata.json.bz2 (application/x-bzip2): not a format mastsub reads \
                 (JSON, .json.gz, .zip)",
                "notice.pdf (application/pdf): not a format mastsub reads (JSON, .json.gz, .zip)",
            ]
        );
    }

    #[test]
    fn an_inline_json_part_is_taken() {
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[
                "Content-Type: text/plain\r\n\r\nHello",
                &format!(
                    "Content-Type: application/json\r\nContent-Disposition: inline; \
                     filename=\"inline.json\"\r\n\r\n{NOTICE}"
                ),
            ]),
        );
        let (attachments, _) = notices(read_all(&raw));
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].name, "inline.json");
        assert_eq!(attachments[0].bytes, NOTICE.as_bytes());
    }

    #[test]
    fn a_single_part_json_mail_is_taken() {
        let raw = mail(
            "a@b.example",
            "",
            &format!("Content-Type: application/json\r\n\r\n{NOTICE}"),
        );
        let (attachments, _) = notices(read_all(&raw));
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].name, "attachment-1-0.json");
        assert_eq!(attachments[0].bytes, NOTICE.as_bytes());
    }

    #[test]
    fn rfc2231_file_names_are_decoded() {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(NOTICE);
        for disposition in [
            "attachment; filename*=UTF-8''event%20metadata.json",
            "attachment;\r\n filename*0*=UTF-8''event%20meta;\r\n filename*1*=data.json",
            "attachment;\r\n filename*0*=UTF-8''event%20meta;\r\n filename*1=\"data.json\"",
        ] {
            let raw = mail(
                "a@b.example",
                "",
                &multipart(&[&format!(
                    "Content-Type: application/octet-stream\r\nContent-Disposition: \
                     {disposition}\r\nContent-Transfer-Encoding: base64\r\n\r\n{body}"
                )]),
            );
            let (attachments, _) = notices(read_all(&raw));
            assert_eq!(attachments.len(), 1, "{disposition}");
            assert_eq!(attachments[0].name, "event metadata.json", "{disposition}");
            assert_eq!(attachments[0].bytes, NOTICE.as_bytes());
        }
    }

    #[test]
    fn an_octet_stream_json_is_taken() {
        let raw = mail(
            "a@b.example",
            "",
            &multipart(&[&binary_part(
                "application/octet-stream",
                "notice.json",
                NOTICE.as_bytes(),
            )]),
        );
        let (attachments, _) = notices(read_all(&raw));
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].name, "notice.json");
        assert_eq!(attachments[0].bytes, NOTICE.as_bytes());
    }

    #[test]
    fn a_forwarded_mail_with_a_json_gz_is_taken() {
        let inner = String::from_utf8(mail(
            "notices@stsci.edu",
            "",
            &multipart(&[&binary_part(
                "application/gzip",
                "inner.json.gz",
                &gzip(NOTICE.as_bytes()),
            )]),
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
        let (attachments, _) = notices(read_all(&raw));
        assert_eq!(attachments.len(), 1);
        assert_eq!(attachments[0].name, "inner.json");
        assert_eq!(attachments[0].bytes, NOTICE.as_bytes());
    }

    // ---- the sender from header lines alone ----

    #[test]
    fn header_sender_follows_the_rules_of_read() {
        let allowed = vec!["@stsci.edu".to_string()];
        let ok = b"From: MAST <notices@STSCI.edu>\r\nMessage-ID: <a@b>\r\n\r\n";
        assert_eq!(
            header_sender(ok, &allowed),
            Sender::Allowed {
                from: "notices@stsci.edu".into()
            }
        );
        // Without the blank line, too.
        assert_eq!(
            header_sender(&ok[..ok.len() - 2], &allowed),
            Sender::Allowed {
                from: "notices@stsci.edu".into()
            }
        );
        for bad in [
            &b"From: \"notices@stsci.edu\" <mallory@evil.example>\r\n\r\n"[..],
            b"From: mallory@evil.example\r\nFrom: notices@stsci.edu\r\n\r\n",
            b"From: notices@stsci.edu\r\nFrom: notices@stsci.edu\r\n\r\n",
            b"From: notices@stsci.edu, mallory@evil.example\r\n\r\n",
            b"Message-ID: <a@b>\r\n\r\n",
            b"",
        ] {
            assert!(
                matches!(header_sender(bad, &allowed), Sender::NotAllowed { .. }),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            header_sender(b"From: mallory@evil.example\r\n", &allowed),
            Sender::NotAllowed {
                from: "mallory@evil.example".into()
            }
        );
        // An empty list allows anyone.
        assert!(matches!(
            header_sender(b"Message-ID: <a@b>\r\n\r\n", &[]),
            Sender::Allowed { .. }
        ));
    }

    // ---- BODYSTRUCTURE ----

    fn bodystructure_may_hold_notice(bs: &str) -> bool {
        use async_imap::imap_proto::{AttributeValue, Response};
        let line = format!("* 1 FETCH (UID 5 BODYSTRUCTURE {bs})\r\n");
        let (rest, response) = Response::parse(line.as_bytes())
            .unwrap_or_else(|e| panic!("does not parse: {e:?}\n{line}"));
        assert!(rest.is_empty(), "left: {}", String::from_utf8_lossy(rest));
        let Response::Fetch(_, attrs) = response else {
            panic!("not a FETCH: {response:?}");
        };
        let bs = attrs
            .iter()
            .find_map(|a| match a {
                AttributeValue::BodyStructure(bs) => Some(bs),
                _ => None,
            })
            .expect("no BODYSTRUCTURE");
        may_hold_notice(bs)
    }

    const TEXT_PART: &str =
        r#"("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 5 1 NIL NIL NIL NIL)"#;

    fn mixed(parts: &[&str]) -> String {
        format!(
            r#"({} "MIXED" ("BOUNDARY" "b1") NIL NIL NIL)"#,
            parts.concat()
        )
    }

    /// A basic (non-text) part: type, subtype, Content-Type params, Content-Disposition.
    fn basic(ty: &str, subtype: &str, params: &str, disposition: &str) -> String {
        format!(r#"("{ty}" "{subtype}" {params} NIL NIL "BASE64" 28 NIL {disposition} NIL NIL)"#)
    }

    #[test]
    fn bodystructure_plain_text_mail_holds_no_notice() {
        assert!(!bodystructure_may_hold_notice(TEXT_PART));
        let alternative = format!(
            r#"({TEXT_PART}("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "QUOTED-PRINTABLE" 30 2 NIL NIL NIL NIL) "ALTERNATIVE" ("BOUNDARY" "b2") NIL NIL NIL)"#
        );
        assert!(!bodystructure_may_hold_notice(&alternative));
    }

    #[test]
    fn bodystructure_json_attachment_may_hold_a_notice() {
        let json = basic(
            "APPLICATION",
            "JSON",
            r#"("NAME" "a.json")"#,
            r#"("ATTACHMENT" ("FILENAME" "a.json"))"#,
        );
        assert!(bodystructure_may_hold_notice(&mixed(&[TEXT_PART, &json])));
    }

    #[test]
    fn bodystructure_octet_stream_json_may_hold_a_notice() {
        let part = basic(
            "APPLICATION",
            "OCTET-STREAM",
            "NIL",
            r#"("ATTACHMENT" ("FILENAME" "x.json"))"#,
        );
        assert!(bodystructure_may_hold_notice(&mixed(&[TEXT_PART, &part])));
    }

    #[test]
    fn bodystructure_json_gz_and_zip_may_hold_a_notice() {
        for part in [
            basic(
                "APPLICATION",
                "GZIP",
                r#"("NAME" "event_metadata.json.gz")"#,
                "NIL",
            ),
            // By the name alone, under a type that says nothing.
            basic(
                "APPLICATION",
                "X-UNKNOWN",
                "NIL",
                r#"("ATTACHMENT" ("FILENAME" "x.json.gz"))"#,
            ),
            basic("APPLICATION", "ZIP", r#"("NAME" "n.zip")"#, "NIL"),
            basic(
                "APPLICATION",
                "X-UNKNOWN",
                "NIL",
                r#"("ATTACHMENT" ("FILENAME" "x.ZIP"))"#,
            ),
        ] {
            assert!(
                bodystructure_may_hold_notice(&mixed(&[TEXT_PART, &part])),
                "{part}"
            );
        }
    }

    #[test]
    fn bodystructure_forwarded_message_with_json_may_hold_a_notice() {
        let envelope = r#"("Mon, 1 Dec 2025 10:00:00 +0000" "MAST notice" (("MAST" NIL "notices" "stsci.edu")) (("MAST" NIL "notices" "stsci.edu")) (("MAST" NIL "notices" "stsci.edu")) ((NIL NIL "me" "example.org")) NIL NIL NIL "<abc@mast.example>")"#;
        let inner_json = basic(
            "APPLICATION",
            "JSON",
            r#"("NAME" "inner.json")"#,
            r#"("ATTACHMENT" ("FILENAME" "inner.json"))"#,
        );
        let inner = mixed(&[TEXT_PART, &inner_json]);
        let forwarded = format!(
            r#"("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 900 {envelope} {inner} 30 NIL NIL NIL NIL)"#
        );
        assert!(bodystructure_may_hold_notice(&mixed(&[
            TEXT_PART, &forwarded
        ])));
        // The same forwarded mail, holding text only.
        let forwarded = format!(
            r#"("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 900 {envelope} {TEXT_PART} 30 NIL NIL NIL NIL)"#
        );
        assert!(!bodystructure_may_hold_notice(&mixed(&[
            TEXT_PART, &forwarded
        ])));
    }

    #[test]
    fn bodystructure_rfc2231_names_are_decoded() {
        // Text parts, so that only the decoded name can say "JSON".
        let text = |disposition: &str| {
            format!(
                r#"("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "BASE64" 28 1 NIL {disposition} NIL NIL)"#
            )
        };
        for (disposition, expected) in [
            (
                r#"("ATTACHMENT" ("FILENAME*" "UTF-8''event%20metadata.json"))"#,
                true,
            ),
            (r#"("ATTACHMENT" ("FILENAME*" "UTF-8''x%2Ejson"))"#, true),
            (r#"("ATTACHMENT" ("FILENAME*" "UTF-8'en'x%2EJSON"))"#, true),
            (
                r#"("ATTACHMENT" ("FILENAME*0*" "UTF-8''x%2E" "FILENAME*1*" "js" "FILENAME*2" "on"))"#,
                true,
            ),
            (
                r#"("ATTACHMENT" ("FILENAME*1" "on" "FILENAME*0*" "UTF-8''x%2Ejs"))"#,
                true,
            ),
            (
                r#"("ATTACHMENT" ("FILENAME" "=?UTF-8?B?eC5qc29u?="))"#,
                true,
            ),
            (r#"("ATTACHMENT" ("FILENAME*" "UTF-8''x%2Etxt"))"#, false),
            (
                r#"("ATTACHMENT" ("FILENAME*0*" "UTF-8''photo" "FILENAME*1" ".txt"))"#,
                false,
            ),
        ] {
            assert_eq!(
                bodystructure_may_hold_notice(&mixed(&[TEXT_PART, &text(disposition)])),
                expected,
                "{disposition}"
            );
        }
        // In the Content-Type parameters as well.
        let part = basic(
            "APPLICATION",
            "X-UNKNOWN",
            r#"("NAME*" "utf-8''n%2Ezip")"#,
            "NIL",
        );
        assert!(bodystructure_may_hold_notice(&mixed(&[TEXT_PART, &part])));
    }

    #[test]
    fn bodystructure_captured_from_dovecot_may_hold_a_notice() {
        // Dovecot 2.3 (Debian 12), FETCH BODYSTRUCTURE of a mail with `name*=UTF-8''x%2Ejson` and
        // `filename*0*=UTF-8''event%20meta; filename*1*=data.json` (which it joins into one `filename*`).
        let captured = r#"(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 2 0 NIL NIL NIL NIL)("application" "octet-stream" ("name*" "UTF-8''x%2Ejson") NIL NIL "base64" 4 NIL ("attachment" ("filename*" "UTF-8''event%20metadata.json")) NIL NIL)("text" "plain" ("name" "=?UTF-8?B?eC5qc29u?=" "charset" "us-ascii") NIL NIL "7bit" 2 0 NIL ("attachment" ("filename*" "UTF-8''x%2Ejson")) NIL NIL) "mixed" ("boundary" "b") NIL NIL NIL)"#;
        assert!(bodystructure_may_hold_notice(captured));
        // Its last part alone, without the encoded word: only the decoded filename* says JSON.
        let last = r#"("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 2 0 NIL ("attachment" ("filename*" "UTF-8''x%2Ejson")) NIL NIL)"#;
        assert!(bodystructure_may_hold_notice(last));
    }

    #[test]
    fn bodystructure_image_only_holds_no_notice() {
        let photo = basic(
            "IMAGE",
            "JPEG",
            r#"("NAME" "photo.jpg")"#,
            r#"("ATTACHMENT" ("FILENAME" "photo.jpg"))"#,
        );
        assert!(!bodystructure_may_hold_notice(&mixed(&[TEXT_PART, &photo])));
        let signature = basic(
            "APPLICATION",
            "PKCS7-SIGNATURE",
            r#"("NAME" "smime.p7s")"#,
            r#"("ATTACHMENT" ("FILENAME" "smime.p7s"))"#,
        );
        assert!(!bodystructure_may_hold_notice(&mixed(&[
            TEXT_PART, &signature
        ])));
    }

    #[test]
    fn bodystructure_single_part_json_may_hold_a_notice() {
        assert!(bodystructure_may_hold_notice(
            r#"("APPLICATION" "JSON" NIL NIL NIL "7BIT" 18 NIL NIL NIL NIL)"#
        ));
        assert!(bodystructure_may_hold_notice(
            r#"("APPLICATION" "JSON" ("CHARSET" "utf-8") NIL NIL "7BIT" 18)"#
        ));
    }
}
