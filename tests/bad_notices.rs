//! A table of bad notices: each is refused with a message naming the record index and the field (or why
//! the whole file is refused), nothing of a refused record is recorded, the valid records beside it are,
//! and the daemon keeps running and files each one in `rejected/` with its `.error.txt`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Daemon, Workspace, record, wait_until};
use mastsub::config::Config;
use mastsub::ingest::Ingestor;
use mastsub::store::{NoticeStatus, SourceKind, SqliteStore, Store};
use serde_json::{Value, json};

/// What a case must produce.
enum Expect {
    /// The whole file is refused with a message containing this.
    Whole(&'static str),
    /// Record 1 (after one good record) is refused for this field, with a message containing the text.
    Field(&'static str, &'static str),
    /// Record 1 is refused as a whole (not an object).
    Record(&'static str),
}

struct Case {
    name: &'static str,
    body: Vec<u8>,
    expect: Expect,
}

/// A notice of one good record (id `good`) and one bad record built by `spoil` from a good one.
fn with_bad_record(good: u64, spoil: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut bad = record(good + 5000, "New");
    spoil(&mut bad);
    serde_json::to_vec(&json!([record(good, "New"), bad])).unwrap()
}

fn field_case(
    name: &'static str,
    n: u64,
    field: &'static str,
    text: &'static str,
    spoil: impl FnOnce(&mut Value),
) -> Case {
    Case {
        name,
        body: with_bad_record(n, spoil),
        expect: Expect::Field(field, text),
    }
}

fn cases() -> Vec<Case> {
    let sample = std::fs::read(common::sample_notice()).unwrap();
    let mut cases = vec![
        Case {
            name: "not-json",
            body: b"event_id,mission\n1,JWST\n".to_vec(),
            expect: Expect::Whole("not valid JSON"),
        },
        Case {
            name: "empty",
            body: Vec::new(),
            expect: Expect::Whole("empty"),
        },
        Case {
            name: "blank",
            body: b" \n\t\n".to_vec(),
            expect: Expect::Whole("empty"),
        },
        Case {
            name: "object",
            body: br#"{"event_id": "x"}"#.to_vec(),
            expect: Expect::Whole("an object, not an array"),
        },
        Case {
            name: "string",
            body: br#""hello""#.to_vec(),
            expect: Expect::Whole("a string, not an array"),
        },
        Case {
            name: "truncated",
            body: sample[..sample.len() / 2].to_vec(),
            expect: Expect::Whole("not valid JSON"),
        },
        Case {
            name: "invalid-utf8",
            body: b"[{\"mission\": \"J\xffWST\"}]".to_vec(),
            expect: Expect::Whole("not UTF-8"),
        },
        Case {
            name: "too-deep",
            body: format!("{}{}", "[".repeat(100), "]".repeat(100)).into_bytes(),
            expect: Expect::Whole("nested deeper than 32"),
        },
        Case {
            name: "too-large",
            body: serde_json::to_vec(&(0..40).map(|n| record(9000 + n, "New")).collect::<Vec<_>>())
                .unwrap(),
            expect: Expect::Whole("over the limit of 4096 bytes"),
        },
        Case {
            name: "record-not-object",
            body: serde_json::to_vec(&json!([record(1, "New"), 42])).unwrap(),
            expect: Expect::Record("expected an object with the event fields, found a number"),
        },
    ];
    let mut n = 10;
    let mut next = || {
        n += 1;
        n
    };
    for field in [
        "event_id",
        "mission",
        "fileset",
        "filename",
        "program",
        "event_type",
        "archived_date",
        "public_release_date",
    ] {
        cases.push(field_case(
            Box::leak(format!("missing-{field}").into_boxed_str()),
            next(),
            field,
            "missing",
            |r| {
                r.as_object_mut().unwrap().remove(field);
            },
        ));
    }
    cases.extend([
        field_case(
            "program-word",
            next(),
            "program",
            "is not a whole non-negative number",
            |r| r["program"] = json!("five"),
        ),
        field_case(
            "program-fraction",
            next(),
            "program",
            "is not a whole non-negative number",
            |r| r["program"] = json!(51.5),
        ),
        field_case(
            "program-negative",
            next(),
            "program",
            "is not a whole non-negative number",
            |r| r["program"] = json!(-3),
        ),
        field_case("program-array", next(), "program", "found an array", |r| {
            r["program"] = json!([5105])
        }),
        field_case(
            "mission-number",
            next(),
            "mission",
            "found a number; expected a string",
            |r| r["mission"] = json!(7),
        ),
        // A type mastsub does not know is recorded (tests/event_types.rs); one that cannot be a type name
        // is refused.
        field_case(
            "type-blank",
            next(),
            "event_type",
            "expected New, First, Reprocessed, Public or another short name",
            |r| r["event_type"] = json!("   "),
        ),
        field_case(
            "date-month-13",
            next(),
            "archived_date",
            "not a calendar date",
            |r| r["archived_date"] = json!("2026-13-01T00:00:00"),
        ),
        field_case(
            "date-zone",
            next(),
            "public_release_date",
            "time zone is not expected",
            |r| r["public_release_date"] = json!("2026-03-30T17:52:27Z"),
        ),
        field_case(
            "date-8-digits",
            next(),
            "archived_date",
            "0 to 7 fractional digits",
            |r| r["archived_date"] = json!("2026-03-30T17:52:27.12345678"),
        ),
        field_case(
            "date-no-time",
            next(),
            "archived_date",
            "is not a date",
            |r| r["archived_date"] = json!("2026-03-30"),
        ),
        field_case("uuid-bad", next(), "event_id", "is not a UUID", |r| {
            r["event_id"] = json!("not-a-uuid")
        }),
        field_case("uuid-number", next(), "event_id", "found a number", |r| {
            r["event_id"] = json!(12345)
        }),
        field_case(
            "name-dotdot-path",
            next(),
            "filename",
            "contains \\\"..\\\"",
            |r| r["filename"] = json!("../../etc/passwd"),
        ),
        field_case("name-slash", next(), "fileset", "path separator", |r| {
            r["fileset"] = json!("a/b")
        }),
        field_case(
            "name-backslash",
            next(),
            "filename",
            "path separator",
            |r| r["filename"] = json!("a\\b.fits"),
        ),
        field_case("name-dot", next(), "fileset", "is \\\".\\\"", |r| {
            r["fileset"] = json!(".")
        }),
        field_case(
            "name-dotdot",
            next(),
            "mission",
            "contains \\\"..\\\"",
            |r| r["mission"] = json!(".."),
        ),
        field_case("name-nul", next(), "filename", "NUL", |r| {
            r["filename"] = json!("a\u{0}b.fits")
        }),
        field_case(
            "name-control",
            next(),
            "filename",
            "control character",
            |r| r["filename"] = json!("a\u{7}b.fits"),
        ),
        field_case(
            "name-newline",
            next(),
            "fileset",
            "control character",
            |r| r["fileset"] = json!("a\nb"),
        ),
        field_case("name-empty", next(), "mission", "is empty", |r| {
            r["mission"] = json!("")
        }),
        field_case(
            "name-too-long",
            next(),
            "filename",
            "longer than 255 bytes",
            |r| r["filename"] = json!("x".repeat(256)),
        ),
        field_case("uri-elsewhere", next(), "uri", "is not a mast: URI", |r| {
            r["uri"] = json!("https://evil.example/x.fits")
        }),
    ]);
    cases
}

/// The text a case's message must contain.
fn expected_text(case: &Case) -> Vec<String> {
    match &case.expect {
        Expect::Whole(text) => vec![text.to_string()],
        Expect::Field(field, text) => vec![
            format!("record 1, field \"{field}\""),
            text.replace("\\\"", "\""),
        ],
        Expect::Record(text) => vec!["record 1:".to_string(), text.to_string()],
    }
}

fn small_limit_config(ws: &Workspace) -> Config {
    let mut config = Config::load(Some(&ws.config)).unwrap();
    config.ingest.max_notice_size = bytesize::ByteSize::kib(4);
    config
}

#[test]
fn every_bad_notice_is_refused_naming_record_and_field_and_nothing_bad_is_recorded() {
    let ws = Workspace::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let good_records = runtime.block_on(ingest_every_case(&ws));
    // Only the good records, none of the bad ones, and one job per good record.
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), good_records);
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM events WHERE event_id LIKE '%-0000000050%'"),
        0
    );
    assert_eq!(ws.query_i64("SELECT count(*) FROM downloads"), good_records);
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM notices WHERE status = 'accepted'"),
        0
    );
}

/// Ingests every case in-process, checks each report, and returns how many good records sat beside bad ones.
async fn ingest_every_case(ws: &Workspace) -> i64 {
    let config = small_limit_config(ws);
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&config.storage.database).await.unwrap());
    let ingestor = Ingestor::new(store.clone(), &config);
    let cases = cases();
    assert!(cases.len() >= 20);
    let mut good_records = 0;
    for case in &cases {
        let path = ws.write_notice(&format!("{}.json", case.name), &case.body);
        let report = ingestor.ingest_file(&path, SourceKind::Cli).await.unwrap();
        assert!(!report.is_accepted(), "{}: accepted", case.name);
        let message = report.error_lines().join("\n");
        for text in expected_text(case) {
            assert!(
                message.contains(&text),
                "{}: message lacks {text:?}:\n{message}",
                case.name
            );
        }
        assert!(
            message.starts_with(&format!("{}.json: ", case.name)),
            "{}: message does not name the file",
            case.name
        );
        match case.expect {
            Expect::Whole(_) => {
                assert_eq!(report.status, NoticeStatus::Rejected, "{}", case.name)
            }
            _ => {
                assert_eq!(report.status, NoticeStatus::Partial, "{}", case.name);
                assert_eq!(
                    report.outcome.recorded_total(),
                    1,
                    "{}: the good record was not recorded",
                    case.name
                );
                good_records += 1;
            }
        }
    }
    store.close().await;
    good_records
}

#[test]
fn the_daemon_files_bad_notices_in_rejected_with_reasons_and_keeps_running() {
    let ws = Workspace::with_config("[ingest]\nmax_notice_size = \"4KiB\"\n");
    // The empty notice waits inbox.write_timeout (a writer may be about to fill it); keep that short here.
    let mut d = Daemon::start_with_env(&ws, &[("MASTSUB_INBOX__WRITE_TIMEOUT", "1s")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    let cases = cases();
    for case in &cases {
        ws.drop_notice(&format!("{}.json", case.name), &case.body);
    }
    let expected_files = cases.len() * 2;
    assert!(
        wait_until(Duration::from_secs(20), || ws
            .files_in("inbox/rejected")
            .len()
            == expected_files),
        "rejected/ holds {:?}",
        ws.files_in("inbox/rejected")
    );
    for case in &cases {
        let reason = std::fs::read_to_string(
            ws.path(&format!("inbox/rejected/{}.json.error.txt", case.name)),
        )
        .unwrap_or_else(|e| panic!("{}: no error file: {e}", case.name));
        for text in expected_text(case) {
            assert!(
                reason.contains(&text),
                "{}: error file lacks {text:?}:\n{reason}",
                case.name
            );
        }
        assert!(
            reason.contains("Fix the file"),
            "{}: no advice:\n{reason}",
            case.name
        );
    }
    assert!(ws.files_in("inbox/processed").is_empty());
    assert!(d.is_running(), "the daemon died");

    // Still working: a good notice after all that is processed.
    ws.drop_notice(
        "good.json",
        &serde_json::to_vec(&json!([record(77, "Public")])).unwrap(),
    );
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/processed")
        == ["good.json"]));
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM events WHERE event_type = 'Public'"),
        1
    );
}

#[test]
fn two_good_records_and_one_bad_record_the_two_and_go_to_rejected() {
    let ws = Workspace::new();
    let _d = Daemon::start_watching(&ws);
    let mut bad = record(3, "New");
    bad["event_type"] = json!("Withdrawn\nnow");
    ws.drop_notice(
        "mixed.json",
        &serde_json::to_vec(&json!([record(1, "New"), record(2, "Reprocessed"), bad])).unwrap(),
    );
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/rejected")
        == ["mixed.json", "mixed.json.error.txt"]));
    let reason = std::fs::read_to_string(ws.path("inbox/rejected/mixed.json.error.txt")).unwrap();
    assert!(
        reason.contains("record 2, field \"event_type\""),
        "{reason}"
    );
    assert!(
        reason.contains("2 events (1 New, 1 Reprocessed)"),
        "{reason}"
    );
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 2);

    // Fixed and dropped again: the third is recorded, the two are not recorded twice.
    let mut fixed = record(3, "New");
    fixed["event_type"] = json!("public");
    ws.drop_notice(
        "mixed.json",
        &serde_json::to_vec(&json!([record(1, "New"), record(2, "Reprocessed"), fixed])).unwrap(),
    );
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/processed")
        == ["mixed.json"]));
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 3);
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM events WHERE event_type = 'Public'"),
        1
    );
}
