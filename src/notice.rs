//! The MAST notice format: a JSON array of event records, parsed and validated record by record.
//!
//! This module owns what a valid notice is. A notice that is not UTF-8 JSON, not an array, too large or too
//! deeply nested is refused whole ([`NoticeError`]); inside the array every record is checked on its own, so
//! the valid ones survive a bad neighbour ([`RecordError`] names the record index and the field).

use std::borrow::Cow;
use std::fmt;

use chrono::{NaiveDate, NaiveDateTime, NaiveTime};
use serde::Serialize;
use serde_json::value::RawValue;

/// The longest `mission`, `fileset` or `filename` accepted, in bytes (a file-name limit on most systems).
pub const MAX_NAME_BYTES: usize = 255;
/// The longest `uri` accepted, in bytes.
pub const MAX_URI_BYTES: usize = 2048;

/// What a notice may not exceed.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes.
    pub max_size: u64,
    /// Depth of nested arrays and objects; the notice itself (an array of objects) is depth 2.
    pub max_nesting: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_size: 64 * 1024 * 1024,
            max_nesting: 32,
        }
    }
}

/// Why an event was sent: the four subscription types MAST documents, or one it added since, kept as
/// written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventType {
    /// Data of a program appear for the first time.
    New,
    /// The first data of a program appear (JWST only).
    First,
    /// Recalibrated: a new version of a file one may already have.
    Reprocessed,
    /// Its exclusive-access period ended.
    Public,
    /// A type mastsub does not know (MAST may add one), as the notice spelled it.
    Other(String),
}

/// The longest event type taken as a type of its own; longer text is a damaged record.
const MAX_EVENT_TYPE: usize = 64;

impl EventType {
    /// The types MAST documents, in the order reports list them.
    pub const KNOWN: [EventType; 4] = [
        EventType::New,
        EventType::First,
        EventType::Reprocessed,
        EventType::Public,
    ];

    /// The canonical spelling, as stored (an unknown type as the notice wrote it).
    pub fn as_str(&self) -> &str {
        match self {
            EventType::New => "New",
            EventType::First => "First",
            EventType::Reprocessed => "Reprocessed",
            EventType::Public => "Public",
            EventType::Other(s) => s,
        }
    }

    /// A known type in any letter case, else an `Other` holding the text; `None` for text that cannot be
    /// a type name (empty, too long, control characters).
    pub fn parse(s: &str) -> Option<EventType> {
        if let Some(t) = EventType::KNOWN
            .into_iter()
            .find(|t| t.as_str().eq_ignore_ascii_case(s))
        {
            return Some(t);
        }
        let t = s.trim();
        (!t.is_empty() && t.len() <= MAX_EVENT_TYPE && !t.chars().any(char::is_control))
            .then(|| EventType::Other(t.to_string()))
    }

    /// True for a type MAST does not document (yet).
    pub fn is_other(&self) -> bool {
        matches!(self, EventType::Other(_))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EventType {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A MAST time: ISO-8601 without a zone, taken as UTC, with 0 to 7 fractional digits.
///
/// Its canonical text always has 7 fractional digits, so canonical texts sort as the times do. The text is
/// made once, when parsed, because ingest stores it for every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MastTime {
    at: NaiveDateTime,
    text: [u8; CANONICAL_LEN],
}

/// `2026-03-30T17:54:12.7510000`
const CANONICAL_LEN: usize = 27;

impl MastTime {
    /// Parses `YYYY-MM-DDTHH:MM:SS[.f{1,7}]`; explains what is wrong otherwise.
    pub fn parse(s: &str) -> Result<MastTime, String> {
        const SHAPE: &str = "a date like 2026-03-30T17:53:13 or 2026-03-30T17:54:12.7510000 (UTC, no zone, 0 to 7 fractional digits)";
        let zone_hint = |rest: &str| {
            if rest.ends_with('Z') || rest.contains('+') || rest.contains('-') {
                "a time zone is not expected; "
            } else {
                ""
            }
        };
        let (main, frac) = match s.split_once('.') {
            Some((m, f)) => (m, f),
            None => (s, ""),
        };
        let b = main.as_bytes();
        let shape_ok = b.len() == 19
            && b.iter().enumerate().all(|(i, c)| match i {
                4 | 7 => *c == b'-',
                10 => *c == b'T',
                13 | 16 => *c == b':',
                _ => c.is_ascii_digit(),
            });
        if !shape_ok {
            let hint = zone_hint(s.get(19..).unwrap_or(""));
            return Err(format!("{s:?} is not a date: {hint}expected {SHAPE}"));
        }
        let has_dot = s.len() > main.len();
        if (has_dot && frac.is_empty())
            || frac.len() > 7
            || !frac.bytes().all(|c| c.is_ascii_digit())
        {
            return Err(format!(
                "{s:?} is not a date: {}expected {SHAPE}",
                zone_hint(frac)
            ));
        }
        let mut text = [b'0'; CANONICAL_LEN];
        text[..19].copy_from_slice(b);
        text[19] = b'.';
        text[20..20 + frac.len()].copy_from_slice(frac.as_bytes());
        let num = |r: std::ops::Range<usize>| main[r].parse::<u32>().unwrap_or(u32::MAX);
        let nanos = std::str::from_utf8(&text[20..])
            .ok()
            .and_then(|f| f.parse::<u32>().ok())
            .unwrap_or(0)
            * 100;
        let date = NaiveDate::from_ymd_opt(num(0..4) as i32, num(5..7), num(8..10))
            .ok_or_else(|| format!("{s:?} is not a calendar date; expected {SHAPE}"))?;
        let time = NaiveTime::from_hms_nano_opt(num(11..13), num(14..16), num(17..19), nanos)
            .filter(|_| num(17..19) < 60)
            .ok_or_else(|| format!("{s:?} is not a valid time of day; expected {SHAPE}"))?;
        Ok(MastTime {
            at: NaiveDateTime::new(date, time),
            text,
        })
    }

    /// Seconds since the epoch (UTC), the fraction dropped.
    pub fn unix_seconds(&self) -> i64 {
        self.at.and_utc().timestamp()
    }

    /// The canonical text: `2026-03-30T17:54:12.7510000`.
    pub fn canonical(&self) -> &str {
        // Built from ASCII digits and separators only.
        std::str::from_utf8(&self.text).unwrap_or("")
    }
}

impl fmt::Display for MastTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.canonical())
    }
}

/// One valid event record.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The record's position in the notice array, from 0.
    pub index: usize,
    /// The event's UUID, lower-case hyphenated.
    pub event_id: String,
    /// As given ("JWST").
    pub mission: String,
    /// The observation's file set.
    pub fileset: String,
    /// The product file.
    pub filename: String,
    /// The proposal/program number.
    pub program: i64,
    /// Why the event was sent.
    pub event_type: EventType,
    /// When this version of the product was archived: the product's version.
    pub archived_date: MastTime,
    /// When its exclusive-access period ends or ended.
    pub public_release_date: MastTime,
    /// An optional `mast:` URI for the product.
    pub uri: Option<String>,
    /// The record exactly as it stood in the notice, unknown fields included.
    pub raw: String,
}

/// A record that was refused, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordError {
    /// The record's position in the array, from 0.
    pub index: usize,
    /// The field at fault, or `None` when the record as a whole is wrong (not an object).
    pub field: Option<&'static str>,
    /// What was found and what was expected.
    pub message: String,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field {
            Some(field) => write!(
                f,
                "record {}, field \"{}\": {}",
                self.index, field, self.message
            ),
            None => write!(f, "record {}: {}", self.index, self.message),
        }
    }
}

/// A notice refused whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoticeError {
    /// Zero bytes, or only white space.
    #[error("the file is empty; expected a JSON array of event records")]
    Empty,
    /// Over the configured size limit.
    #[error(
        "the file is {size} bytes, over the limit of {limit} bytes (ingest.max_notice_size); split it or raise the limit"
    )]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Not UTF-8.
    #[error(
        "the file is not UTF-8 text (invalid byte at offset {offset}); expected a JSON array of event records"
    )]
    InvalidUtf8 {
        /// The first bad byte.
        offset: usize,
    },
    /// Nested deeper than the limit.
    #[error(
        "the JSON is nested deeper than {limit} levels (at byte {offset}); a notice is an array of flat records (ingest.max_nesting)"
    )]
    TooDeep {
        /// The limit.
        limit: usize,
        /// Where the limit was passed.
        offset: usize,
    },
    /// Not JSON, or cut short.
    #[error(
        "not valid JSON at line {line}, column {column}: {reason}; expected a JSON array of event records"
    )]
    NotJson {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// serde_json's words.
        reason: String,
    },
    /// JSON, but not an array.
    #[error(
        "the notice is {found}, not an array; expected a JSON array of event records, [ {{...}}, ... ]"
    )]
    NotArray {
        /// What it is instead ("an object").
        found: &'static str,
    },
}

/// The valid events of a notice and the records refused.
#[derive(Debug, Clone, Default)]
pub struct ParsedNotice {
    /// How many records the array holds.
    pub records: usize,
    /// The valid ones, in order.
    pub events: Vec<Event>,
    /// The refused ones, in order.
    pub errors: Vec<RecordError>,
}

/// Parses and validates a notice.
pub fn parse(bytes: &[u8], limits: &Limits) -> Result<ParsedNotice, NoticeError> {
    if bytes.len() as u64 > limits.max_size {
        return Err(NoticeError::TooLarge {
            size: bytes.len() as u64,
            limit: limits.max_size,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| NoticeError::InvalidUtf8 {
        offset: e.valid_up_to(),
    })?;
    let trimmed = text.trim_start_matches('\u{feff}').trim();
    if trimmed.is_empty() {
        return Err(NoticeError::Empty);
    }
    if let Some(offset) = nesting_exceeds(trimmed.as_bytes(), limits.max_nesting) {
        return Err(NoticeError::TooDeep {
            limit: limits.max_nesting,
            offset,
        });
    }
    let records: Vec<&RawValue> =
        serde_json::from_str(trimmed).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => NoticeError::NotArray {
                found: kind_of_json(trimmed),
            },
            _ => NoticeError::NotJson {
                line: e.line(),
                column: e.column(),
                reason: describe_json_error(&e),
            },
        })?;
    let mut parsed = ParsedNotice {
        records: records.len(),
        events: Vec::with_capacity(records.len()),
        errors: Vec::new(),
    };
    for (index, raw) in records.into_iter().enumerate() {
        match validate_record(index, raw) {
            Ok(event) => parsed.events.push(event),
            Err(mut errors) => parsed.errors.append(&mut errors),
        }
    }
    Ok(parsed)
}

/// serde_json's message without its own " at line L column C" tail, which we print ourselves.
fn describe_json_error(e: &serde_json::Error) -> String {
    let full = e.to_string();
    match full.rfind(" at line ") {
        Some(pos) => full[..pos].to_string(),
        None => full,
    }
}

/// What a JSON text is, by its first character, for messages.
fn kind_of_json(text: &str) -> &'static str {
    match text.as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// The offset at which arrays/objects nest deeper than `limit`, if they do. Strings are skipped, escapes
/// included, so brackets inside them do not count.
fn nesting_exceeds(bytes: &[u8], limit: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, &c) in bytes.iter().enumerate() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
            continue;
        }
        match c {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The fields of a record, each still raw JSON and borrowed from the notice (no copy, no map of every
/// key): unknown fields are skipped here and live on in the stored raw record.
#[derive(serde::Deserialize)]
struct RawFields<'a> {
    #[serde(borrow)]
    event_id: Option<&'a RawValue>,
    #[serde(borrow)]
    mission: Option<&'a RawValue>,
    #[serde(borrow)]
    fileset: Option<&'a RawValue>,
    #[serde(borrow)]
    filename: Option<&'a RawValue>,
    #[serde(borrow)]
    program: Option<&'a RawValue>,
    #[serde(borrow)]
    event_type: Option<&'a RawValue>,
    #[serde(borrow)]
    archived_date: Option<&'a RawValue>,
    #[serde(borrow)]
    public_release_date: Option<&'a RawValue>,
    #[serde(borrow)]
    uri: Option<&'a RawValue>,
}

/// What a raw JSON value is, for messages.
fn kind_of_raw(raw: &RawValue) -> &'static str {
    kind_of_json(raw.get())
}

/// The field as a string: borrowed from the notice, or owned when it holds escapes. Absent and null both
/// count as missing.
fn string_field(raw: Option<&RawValue>) -> Result<Cow<'_, str>, String> {
    match raw {
        None => Err("missing; every record needs it".to_string()),
        Some(raw) if raw.get().starts_with('"') => match serde_json::from_str::<&str>(raw.get()) {
            Ok(s) => Ok(Cow::Borrowed(s)),
            Err(_) => serde_json::from_str::<String>(raw.get())
                .map(Cow::Owned)
                .map_err(|e| format!("not a valid string: {e}")),
        },
        Some(raw) => Err(format!("found {}; expected a string", kind_of_raw(raw))),
    }
}

fn uuid_field(raw: Option<&RawValue>) -> Result<String, String> {
    let s = string_field(raw)?;
    uuid::Uuid::try_parse(&s)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| {
            format!(
                "{s:?} is not a UUID; expected a UUID like 17a653f9-c2fe-4d71-a3ca-2590123615da"
            )
        })
}

fn name_field(raw: Option<&RawValue>) -> Result<String, String> {
    let s = string_field(raw)?;
    check_path_component(&s)?;
    Ok(s.into_owned())
}

/// A product's file name: a path component with room for the `.part` suffix it downloads under.
fn file_name_field(raw: Option<&RawValue>) -> Result<String, String> {
    let s = name_field(raw)?;
    let part = s.len() + ".part".len();
    if part > MAX_NAME_BYTES {
        return Err(format!(
            "{:?} is {} bytes long; with the .part suffix it downloads under that makes {part}, more than \
             the {MAX_NAME_BYTES} bytes a file name may have on disk: expected at most {} bytes",
            truncate_for_message(&s),
            s.len(),
            MAX_NAME_BYTES - ".part".len()
        ));
    }
    Ok(s)
}

/// An integer, or a string holding one.
fn program_field(raw: Option<&RawValue>) -> Result<i64, String> {
    let raw = raw.ok_or("missing; expected the program number, e.g. 5105")?;
    let digits = match raw.get().as_bytes().first() {
        Some(b'"') => string_field(Some(raw))?,
        Some(b'-' | b'0'..=b'9') => Cow::Borrowed(raw.get()),
        _ => {
            return Err(format!(
                "found {}; expected the program number, e.g. 5105",
                kind_of_raw(raw)
            ));
        }
    };
    digits
        .trim()
        .parse::<i64>()
        .ok()
        .filter(|p| *p >= 0)
        .ok_or_else(|| {
            format!(
                "{} is not a whole non-negative number; expected e.g. 5105",
                raw.get()
            )
        })
}

fn event_type_field(raw: Option<&RawValue>) -> Result<EventType, String> {
    let s = string_field(raw)?;
    EventType::parse(&s).ok_or_else(|| {
        format!(
            "{:?} is not an event type; expected New, First, Reprocessed, Public or another short name",
            truncate_for_message(&s)
        )
    })
}

fn date_field(raw: Option<&RawValue>) -> Result<MastTime, String> {
    MastTime::parse(&string_field(raw)?)
}

/// Optional: absent or null is fine.
fn uri_field(raw: Option<&RawValue>) -> Result<Option<String>, String> {
    match raw {
        None => Ok(None),
        Some(raw) if raw.get().starts_with('"') => {
            let s = string_field(Some(raw))?;
            check_uri(&s)?;
            Ok(Some(s.into_owned()))
        }
        Some(raw) => Err(format!(
            "found {}; expected a mast: URI string",
            kind_of_raw(raw)
        )),
    }
}

/// The field's value, or `None` with its error noted.
fn keep<T>(
    errors: &mut Vec<RecordError>,
    index: usize,
    field: &'static str,
    result: Result<T, String>,
) -> Option<T> {
    result
        .map_err(|message| {
            errors.push(RecordError {
                index,
                field: Some(field),
                message,
            })
        })
        .ok()
}

/// Checks one record; every bad field is reported, not only the first.
fn validate_record(index: usize, raw: &RawValue) -> Result<Event, Vec<RecordError>> {
    let fields: RawFields = serde_json::from_str(raw.get()).map_err(|e| {
        let message = match kind_of_raw(raw) {
            // An object that still fails has a repeated field.
            "an object" => describe_json_error(&e),
            other => format!("expected an object with the event fields, found {other}"),
        };
        vec![RecordError {
            index,
            field: None,
            message,
        }]
    })?;
    let e = &mut Vec::new();
    let event = (
        keep(e, index, "event_id", uuid_field(fields.event_id)),
        keep(e, index, "mission", name_field(fields.mission)),
        keep(e, index, "fileset", name_field(fields.fileset)),
        keep(e, index, "filename", file_name_field(fields.filename)),
        keep(e, index, "program", program_field(fields.program)),
        keep(e, index, "event_type", event_type_field(fields.event_type)),
        keep(e, index, "archived_date", date_field(fields.archived_date)),
        keep(
            e,
            index,
            "public_release_date",
            date_field(fields.public_release_date),
        ),
        keep(e, index, "uri", uri_field(fields.uri)),
    );
    match event {
        (
            Some(event_id),
            Some(mission),
            Some(fileset),
            Some(filename),
            Some(program),
            Some(event_type),
            Some(archived_date),
            Some(public_release_date),
            Some(uri),
        ) => Ok(Event {
            index,
            event_id,
            mission,
            fileset,
            filename,
            program,
            event_type,
            archived_date,
            public_release_date,
            uri,
            raw: raw.get().to_string(),
        }),
        _ => Err(std::mem::take(e)),
    }
}

/// A name that will become one path component under the download root.
fn check_path_component(s: &str) -> Result<(), String> {
    let problem = if s.is_empty() {
        Some("is empty")
    } else if s.len() > MAX_NAME_BYTES {
        Some("is longer than 255 bytes")
    } else if s == "." {
        Some("is \".\"")
    } else if s.contains("..") {
        Some("contains \"..\"")
    } else if s.contains('/') || s.contains('\\') {
        Some("contains a path separator")
    } else if s.contains('\0') {
        Some("contains a NUL character")
    } else if s.chars().any(char::is_control) {
        Some("contains a control character")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(format!(
            "{:?} {p}; expected a plain name (no /, \\, \"..\", NUL or control characters, at most 255 bytes)",
            truncate_for_message(s)
        )),
    }
}

fn check_uri(s: &str) -> Result<(), String> {
    if !s.starts_with("mast:") || s.len() <= "mast:".len() {
        return Err(format!(
            "{:?} is not a mast: URI; expected e.g. mast:JWST/product/<file>",
            truncate_for_message(s)
        ));
    }
    if s.len() > MAX_URI_BYTES
        || s.chars().any(|c| c.is_control() || c.is_whitespace())
        || s.contains("..")
    {
        return Err(format!(
            "{:?} is not a usable mast: URI (too long, white space, control characters or \"..\")",
            truncate_for_message(s)
        ));
    }
    Ok(())
}

fn truncate_for_message(s: &str) -> String {
    if s.len() <= 80 {
        return s.to_string();
    }
    let mut end = 80;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{"event_id":"17a653f9-c2fe-4d71-a3ca-2590123615da","mission":"JWST","fileset":"jw1","filename":"jw1_crf.fits","program":5105,"event_type":"New","archived_date":"2026-03-30T17:53:19.695","public_release_date":"2026-03-30T17:52:27.000"}"#;

    #[test]
    fn dates_take_zero_to_seven_fraction_digits() {
        for (s, canon) in [
            ("2026-03-30T17:53:13", "2026-03-30T17:53:13.0000000"),
            ("2025-12-03T19:44:10.707", "2025-12-03T19:44:10.7070000"),
            ("2026-03-30T17:54:12.7510000", "2026-03-30T17:54:12.7510000"),
            ("2026-03-30T17:54:12.1", "2026-03-30T17:54:12.1000000"),
        ] {
            assert_eq!(MastTime::parse(s).unwrap().canonical(), canon);
        }
        for bad in [
            "2026-03-30T17:54:12.75100001",
            "2026-03-30T17:54:12Z",
            "2026-03-30T17:54:12+01:00",
            "2026-02-30T17:54:12",
            "2026-03-30 17:54:12",
            "2026-03-30T24:00:00",
            "2026-03-30T17:54:60",
            "2026-03-30T17:54:12.",
            "yesterday",
        ] {
            assert!(MastTime::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(
            MastTime::parse("2026-03-30T17:54:12Z")
                .unwrap_err()
                .contains("time zone")
        );
    }

    #[test]
    fn canonical_dates_sort_as_times() {
        let a = MastTime::parse("2026-03-30T17:54:12.9").unwrap();
        let b = MastTime::parse("2026-03-30T17:54:12.10").unwrap();
        assert!(a > b);
        assert!(a.canonical() > b.canonical());
    }

    #[test]
    fn event_type_any_case_stored_canonical() {
        assert_eq!(
            EventType::parse("reprocessed"),
            Some(EventType::Reprocessed)
        );
        assert_eq!(EventType::parse("PUBLIC"), Some(EventType::Public));
        assert_eq!(EventType::parse("first"), Some(EventType::First));
        assert_eq!(
            EventType::parse("Retracted"),
            Some(EventType::Other("Retracted".into()))
        );
        assert_eq!(EventType::parse(""), None);
        assert_eq!(EventType::parse("a\nb"), None);
        assert_eq!(EventType::parse(&"x".repeat(65)), None);
    }

    #[test]
    fn a_good_record_keeps_unknown_fields_raw() {
        let text = format!("[{}]", GOOD.replace("}", r#","extra":{"a":[1,2]}}"#));
        let p = parse(text.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(p.events.len(), 1);
        assert!(p.events[0].raw.contains(r#""extra":{"a":[1,2]}"#));
        assert_eq!(p.events[0].program, 5105);
    }

    #[test]
    fn program_may_be_a_numeric_string() {
        let text = format!("[{}]", GOOD.replace("5105", r#""5105""#));
        let p = parse(text.as_bytes(), &Limits::default()).unwrap();
        assert_eq!(p.events[0].program, 5105);
    }

    #[test]
    fn every_bad_field_of_a_record_is_reported() {
        let text = format!(
            "[{}]",
            GOOD.replace("JWST", "")
                .replace("\"New\"", "\"\"")
                .replace("17a653f9", "zzz")
        );
        let p = parse(text.as_bytes(), &Limits::default()).unwrap();
        let fields: Vec<_> = p.errors.iter().map(|e| e.field.unwrap()).collect();
        assert_eq!(fields, ["event_id", "mission", "event_type"]);
    }

    #[test]
    fn nesting_counts_brackets_outside_strings_only() {
        assert_eq!(nesting_exceeds(br#"[{"a":"[[[[[[[["}]"#, 2), None);
        assert_eq!(nesting_exceeds(br#"[{"a":"\"[[[["}]"#, 2), None);
        assert_eq!(nesting_exceeds(br#"[{"a":[1]}]"#, 2), Some(6));
    }
}
