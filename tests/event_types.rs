//! Notices as MAST sends them: all four documented event types (New, First, Reprocessed, Public), types
//! MAST may add (recorded with their own name, never refused), an `event_id` that comes again with other
//! content (a conflict, reported, and the new product still recorded and queued), notice names of every
//! delivery frequency, and `mast:` URIs with the mission in upper case.

mod common;

use common::{Workspace, record};
use serde_json::{Value, json};

fn ingest(ws: &Workspace, name: &str, records: &[Value]) -> (i32, String) {
    let file = ws.write_notice(name, &serde_json::to_vec(records).unwrap());
    let out = ws
        .cmd()
        .arg("-v")
        .arg("ingest")
        .arg(&file)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_first_event_is_accepted_and_new_and_first_of_one_version_are_one_download() {
    let ws = Workspace::new();
    let new = record(1, "New");
    let mut first = record(2, "First");
    first["fileset"] = new["fileset"].clone();
    first["filename"] = new["filename"].clone();
    let (code, out) = ingest(
        &ws,
        "event_metadata_jwst-program-5105_weekly_20260422_143523.json",
        &[new, first],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(ws.query_i64("SELECT count(*) FROM downloads"), 1);
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM events WHERE event_type = 'First'"),
        1
    );
    let status = ws.status();
    assert_eq!(status["events"]["First"], json!(1), "{status}");
    assert_eq!(status["events"]["New"], json!(1), "{status}");
}

#[test]
fn an_unknown_event_type_is_recorded_under_its_own_name_and_downloaded_only_if_asked() {
    let ws = Workspace::new();
    let (code, out) = ingest(
        &ws,
        "event_metadata_jwst-program-5105_monthly_20260422_143523.json",
        &[
            record(1, "Retracted"),
            record(2, "Retracted"),
            record(3, "New"),
        ],
    );
    assert_eq!(code, 0, "an unknown type must not refuse the notice: {out}");
    assert_eq!(
        out.matches("event type \"Retracted\" is not one MAST documents")
            .count(),
        1,
        "one warning per type and notice: {out}"
    );
    assert!(out.contains("[events] other"), "{out}");
    let status = ws.status();
    assert_eq!(status["events"]["Retracted"], json!(2), "{status}");
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM downloads"),
        1,
        "only the New product is downloaded by default"
    );
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM events WHERE disposition = 'record_only'"),
        2
    );
    // `[events] other = "download"` fetches their products too.
    let ws = Workspace::new();
    let file = ws.write_notice(
        "n.json",
        &serde_json::to_vec(&[record(4, "Retracted")]).unwrap(),
    );
    ws.cmd()
        .env("MASTSUB_EVENTS__OTHER", "download")
        .arg("ingest")
        .arg(&file)
        .assert()
        .success();
    assert_eq!(ws.query_i64("SELECT count(*) FROM downloads"), 1);
    assert_eq!(
        ws.query_string("SELECT event_type FROM downloads"),
        "Retracted"
    );
}

#[test]
fn an_event_id_that_comes_again_with_other_content_is_reported_and_still_recorded() {
    let ws = Workspace::new();
    let a = record(1, "New");
    let mut b = record(2, "Public");
    b["event_id"] = a["event_id"].clone();
    let (code, out) = ingest(&ws, "first.json", std::slice::from_ref(&a));
    assert_eq!(code, 0, "{out}");
    let (code, out) = ingest(&ws, "second.json", std::slice::from_ref(&b));
    assert_eq!(code, 0, "{out}");
    let id = a["event_id"].as_str().unwrap();
    assert!(
        out.contains(&format!("event_id {id} was recorded before"))
            && out.contains("notice first.json, record 1")
            && out.contains("second.json, record 1"),
        "the conflict must name the id, both notices and records: {out}"
    );
    assert_eq!(
        ws.query_i64(&format!(
            "SELECT count(*) FROM events WHERE event_id = '{id}'"
        )),
        2
    );
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM downloads"),
        2,
        "the second product is queued"
    );
    // The same record again is one event, not a conflict.
    let (code, out) = ingest(&ws, "again.json", std::slice::from_ref(&b));
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("was recorded before"), "{out}");
    assert_eq!(
        ws.query_i64(&format!(
            "SELECT count(*) FROM events WHERE event_id = '{id}'"
        )),
        2
    );

    // Within one notice too.
    let ws = Workspace::new();
    let (code, out) = ingest(&ws, "both.json", &[a.clone(), b.clone(), a]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("notice both.json, record 2"), "{out}");
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 2);
    assert_eq!(ws.query_i64("SELECT count(*) FROM downloads"), 2);
}

#[test]
fn a_mission_without_retrieve_product_gets_an_upper_case_mast_uri() {
    let ws = Workspace::new();
    let mut r = record(1, "New");
    r["mission"] = json!("tess");
    r["filename"] = json!("tess2026_s0090-0000000123-s_lc.fits");
    let (code, out) = ingest(&ws, "tess.json", &[r]);
    assert_eq!(code, 0, "{out}");
    let url = ws.query_string("SELECT url FROM downloads");
    assert!(
        url.contains("Download/file?uri=mast%3ATESS%2Fproduct%2Ftess2026_s0090"),
        "{url}"
    );
    assert_eq!(
        ws.query_string("SELECT local_path FROM downloads"),
        format!(
            "tess/{}/tess2026_s0090-0000000123-s_lc.fits",
            ws.query_string("SELECT fileset FROM downloads")
        ),
        "the folder keeps astroquery's lower-case mission"
    );
}
