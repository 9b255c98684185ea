//! `mastsub ingest`, `status`, `list` and `check-config` on real SQLite files in temp dirs.

mod common;

use common::{Workspace, record, sample_notice};
use serde_json::{Value, json};

#[test]
fn sample_notice_gives_three_events_and_three_downloads_and_is_idempotent() {
    let ws = Workspace::new();
    ws.cmd()
        .arg("ingest")
        .arg(sample_notice())
        .assert()
        .success()
        .stdout(predicates::str::contains(
            "3 events (1 New, 1 Reprocessed, 1 Public), 3 downloads queued",
        ));
    let first = ws.status();
    assert_eq!(
        first["events"],
        json!({"New": 1, "First": 0, "Reprocessed": 1, "Public": 1})
    );
    assert_eq!(
        first["downloads"],
        json!({"queued": 3, "running": 0, "done": 0, "failed": 0, "needs_auth": 0})
    );
    assert_eq!(first["bytes_done"], 0);

    ws.cmd()
        .arg("ingest")
        .arg(sample_notice())
        .assert()
        .success();
    // Seen again: the same counts; only the time a notice was last received moves.
    let mut again = ws.status();
    let mut first = first;
    assert!(again["last_notice_at"].as_i64() >= first["last_notice_at"].as_i64());
    again["last_notice_at"] = Value::Null;
    first["last_notice_at"] = Value::Null;
    assert_eq!(again, first, "a second ingest changed the status");
    assert_eq!(ws.query_i64("SELECT count(*) FROM notices"), 1);
    assert_eq!(ws.query_i64("SELECT times_seen FROM notices"), 2);
}

#[test]
fn downloads_follow_astroquery_layout_and_mast_urls() {
    let ws = Workspace::new();
    ws.cmd()
        .arg("ingest")
        .arg(sample_notice())
        .assert()
        .success();
    let out = ws.cmd().args(["list", "--json"]).output().unwrap();
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[1]["local_path"],
        "jwst/jw05105001001_02201_00001/jw05105001001_02201_00001_mirimage_o001_crf.fits"
    );
    assert_eq!(
        rows[1]["url"],
        "http://127.0.0.1:9/search/jwst/api/v0.1/retrieve_product?product_name=jw05105001001_02201_00001_mirimage_o001_crf.fits"
    );
    assert_eq!(rows[0]["event_type"], "Reprocessed");
    assert_eq!(rows[0]["version"], "2025-12-03T19:44:10.7070000");
    // The filter keeps only the asked state.
    let out = ws
        .cmd()
        .args(["list", "--state", "done", "--json"])
        .output()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(),
        json!([])
    );
    ws.cmd()
        .args(["list", "--state", "finished"])
        .assert()
        .code(2);
}

#[test]
fn raw_records_keep_unknown_fields_and_event_type_is_canonical() {
    let ws = Workspace::new();
    let mut r = record(1, "reprocessed");
    r["calib_version"] = json!({"pipeline": "1.17.1", "crds": [1321, 1322]});
    let file = ws.write_notice("n.json", &serde_json::to_vec(&[r]).unwrap());
    ws.cmd().arg("ingest").arg(&file).assert().success();
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM events WHERE event_type = 'Reprocessed'"),
        1
    );
    assert_eq!(
        ws.query_i64(
            "SELECT count(*) FROM events WHERE json_extract(raw, '$.calib_version.crds[1]') = 1322"
        ),
        1
    );
}

#[test]
fn a_partly_bad_notice_records_the_good_records_and_exits_1() {
    let ws = Workspace::new();
    let mut bad = record(3, "New");
    bad["filename"] = json!("../../etc/passwd");
    let file = ws.write_notice(
        "mixed.json",
        &serde_json::to_vec(&[record(1, "New"), record(2, "Public"), bad]).unwrap(),
    );
    ws.cmd()
        .arg("ingest")
        .arg(&file)
        .assert()
        .code(1)
        .stderr(predicates::str::contains(
            "mixed.json: record 2, field \"filename\"",
        ));
    let s = ws.status();
    assert_eq!(
        s["events"],
        json!({"New": 1, "First": 0, "Reprocessed": 0, "Public": 1})
    );
    assert_eq!(s["notices"]["partial"], 1);
    // Ingesting the fixed file later records only what is new.
    let mut fixed = record(3, "New");
    fixed["note"] = json!("fixed");
    let file = ws.write_notice(
        "fixed.json",
        &serde_json::to_vec(&[record(1, "New"), record(2, "Public"), fixed]).unwrap(),
    );
    ws.cmd().arg("ingest").arg(&file).assert().success();
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 3);
}

#[test]
fn an_unreadable_file_is_an_error_naming_it() {
    let ws = Workspace::new();
    ws.cmd()
        .args(["ingest", "no-such-notice.json"])
        .assert()
        .code(1)
        .stderr(predicates::str::contains("no-such-notice.json"));
}

#[test]
fn check_config_redacts_secrets_and_fails_on_bad_values() {
    let ws = Workspace::with_config(
        "[imap]\nhost = \"mail.example.org\"\nusername = \"u\"\npassword = \"hunter2-secret\"\n",
    );
    let out = ws
        .cmd()
        .arg("check-config")
        .env("MASTSUB_MAST__TOKEN", "tok-secret-123")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        !text.contains("hunter2-secret") && !text.contains("tok-secret-123"),
        "{text}"
    );
    assert!(text.contains("(redacted)"));
    assert!(text.contains("mail.example.org"));

    ws.cmd()
        .arg("check-config")
        .env("MASTSUB_DOWNLOAD__WORKERS", "0")
        .assert()
        .code(2)
        .stderr(predicates::str::contains("download.workers"));
    let typo = Workspace::with_config("[events]\nnwe = \"record\"\n");
    typo.cmd()
        .arg("check-config")
        .assert()
        .code(2)
        .stderr(predicates::str::contains("nwe"));
    assert_cmd::Command::cargo_bin("mastsub")
        .unwrap()
        .args(["--config", "/nonexistent/mastsub.toml", "check-config"])
        .assert()
        .code(2)
        .stderr(predicates::str::contains("does not exist"));
}

#[test]
fn env_overrides_reach_every_section() {
    let ws = Workspace::new();
    let out = ws
        .cmd()
        .arg("check-config")
        .env("MASTSUB_MAST__BASE_URL", "https://mast.example.org/")
        .env("MASTSUB_EVENTS__PUBLIC", "record")
        .env("MASTSUB_IMAP__ALLOWED_SENDERS", "a@x.org, @stsci.edu")
        .env("MASTSUB_IMAP__USERNAME", "007")
        .env("MASTSUB_IMAP__PORT", "143")
        .env("MASTSUB_DOWNLOAD__KEEP_PREVIOUS", "true")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("base_url = \"https://mast.example.org/\""),
        "{text}"
    );
    assert!(text.contains("public = \"record\""), "{text}");
    assert!(
        text.contains("allowed_senders = [\n    \"a@x.org\",\n    \"@stsci.edu\",\n]"),
        "{text}"
    );
    // Strings stay strings (a password or user "007" must not become the number 7); numbers and booleans
    // still parse where a key needs them.
    assert!(text.contains("username = \"007\""), "{text}");
    assert!(text.contains("port = 143"), "{text}");
    assert!(text.contains("keep_previous = true"), "{text}");
}

#[test]
fn record_policy_keeps_events_without_downloads() {
    let ws = Workspace::with_config("[events]\npublic = \"record\"\n");
    ws.cmd()
        .arg("ingest")
        .arg(sample_notice())
        .assert()
        .success();
    let s = ws.status();
    assert_eq!(s["events"]["Public"], 1);
    assert_eq!(s["downloads"]["queued"], 2);
}

#[test]
fn status_and_list_never_create_a_database() {
    let ws = Workspace::new();
    for args in [&["status"][..], &["status", "--json"], &["list"]] {
        ws.cmd()
            .args(args)
            .assert()
            .code(2)
            .stderr(predicates::str::contains("no such database"));
    }
    assert!(
        !ws.db().exists(),
        "a read-only command created the database"
    );
    // Said once, not once per layer of the error.
    let out = ws.cmd().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        text.contains("mastsub.db: run `mastsub run` or `mastsub ingest` first"),
        "{text}"
    );
    assert_eq!(text.matches("no such database").count(), 1, "{text}");
    // An empty file, or another program's SQLite database, is not taken for one.
    std::fs::write(ws.db(), b"").unwrap();
    for args in [&["status"][..], &["list"]] {
        ws.cmd()
            .args(args)
            .assert()
            .code(2)
            .stderr(predicates::str::contains("is not a mastsub database"));
    }
    assert_eq!(std::fs::metadata(ws.db()).unwrap().len(), 0);
}
