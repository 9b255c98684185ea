//! The HTTP endpoint through the real binary: `/metrics` read by the Prometheus project's own parser
//! (Debian's python3-prometheus-client) and checked against `status --json`, the stand-in's byte count and
//! the files on disk; `/api/status` against `status --json`; the status page in a real headless Chromium
//! (its DOM and a phone-sized screenshot kept in the test's output); no secret in any answer; 404
//! elsewhere; a port taken at start-up.

mod common;

use std::io::Write;
use std::time::Duration;

use common::mast::{MastStandIn, serve_products, wait_done};
use common::{Daemon, Workspace, free_port, http_get as get, record, wait_until};
use serde_json::Value;

const TOKEN: &str = "tok-7c1d9e-never-shown";
const PASSWORD: &str = "pw-5f2a-never-shown";
/// An event type MAST might add, written the worst way a label value can be.
const ODD_TYPE: &str = "Odd \"type\" \\ x";

/// The exposition parsed by prometheus_client's OpenMetrics parser: `{"name{l=v,...}": value}`.
fn parse_metrics(text: &str) -> serde_json::Map<String, Value> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused /metrics: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_object()
        .unwrap()
        .clone()
}

fn parser_available() -> bool {
    let ok = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import prometheus_client.openmetrics.parser"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("REQUIRE_PROMETHEUS_CLIENT").is_none(),
            "python3-prometheus-client is not installed"
        );
        eprintln!("SKIPPED: python3-prometheus-client is not installed; /metrics was not parsed");
    }
    ok
}

/// Three products done and one failed (not FITS), with the endpoint on `port`, and a MAST token set.
fn a_daemon_with_work(
    mast: &MastStandIn,
    port: u16,
) -> (Workspace, Daemon, Vec<(String, Vec<u8>)>) {
    let (notice, files) = serve_products(mast, 1, 3, 40);
    let mut records: Vec<Value> = serde_json::from_slice(&notice).unwrap();
    let bad = record(9, "Public");
    let mut page = b"Service temporarily unavailable".to_vec();
    page.resize(2880 * 2, b' ');
    mast.put(bad["filename"].as_str().unwrap(), page);
    records.push(bad);
    let mut odd = record(10, ODD_TYPE);
    odd["event_type"] = Value::String(ODD_TYPE.into());
    records.push(odd);
    // A mailbox that cannot be reached, with a password that must show nowhere.
    let ws = Workspace::with_base(
        &mast.base_url,
        &format!(
            "[http]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n\n[imap]\nenabled = true\n\
             host = \"127.0.0.1\"\nport = {}\nusername = \"mast\"\npassword = \"{PASSWORD}\"\n\
             allowed_senders = [\"@stsci.edu\"]\n",
            free_port()
        ),
    );
    let d = Daemon::start_with_env(&ws, &[("MAST_API_TOKEN", TOKEN)]);
    d.wait_for_log("serving the status page", Duration::from_secs(20));
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice(
        "event_metadata_jwst-program-5105_hourly_20260422_143523.json",
        &serde_json::to_vec(&records).unwrap(),
    );
    wait_done(&ws, &d, 3, Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(20), || ws.jobs_in("failed") == 1),
        "the bad product did not fail; log:\n{}",
        d.log()
    );
    (ws, d, files)
}

#[test]
fn metrics_and_the_api_agree_with_status_json_the_server_and_the_disk_and_show_no_secret() {
    let mast = MastStandIn::start();
    let port = free_port();
    let (ws, mut d, files) = a_daemon_with_work(&mast, port);

    // /api/status is status --json.
    let (code, api) = get(port, "/api/status");
    assert_eq!(code, 200);
    let api: Value = serde_json::from_str(&api).unwrap();
    let cli = ws.status();
    for key in [
        "database",
        "downloads",
        "events",
        "bytes_done",
        "notices",
        "by_event_type",
        "waiting",
        "recent_failures",
        "recent_notices",
        "hooks",
    ] {
        assert_eq!(
            api[key], cli[key],
            "/api/status and status --json differ in {key}"
        );
    }

    let (code, text) = get(port, "/metrics");
    assert_eq!(code, 200);
    for secret in [TOKEN, PASSWORD] {
        assert!(!text.contains(secret), "a secret is in /metrics");
    }
    if parser_available() {
        let m = parse_metrics(&text);
        let metric = |k: &str| {
            m.get(k)
                .and_then(Value::as_f64)
                .unwrap_or_else(|| panic!("{k} missing from /metrics:\n{text}"))
        };
        for state in ["queued", "running", "done", "failed", "needs_auth"] {
            assert_eq!(
                metric(&format!("mastsub_downloads{{state={state}}}")),
                cli["downloads"][state].as_f64().unwrap(),
                "mastsub_downloads{{state={state}}}"
            );
        }
        for (t, n) in cli["events"].as_object().unwrap() {
            assert_eq!(
                metric(&format!("mastsub_events_total{{event_type={t}}}")),
                n.as_f64().unwrap(),
                "events of type {t}"
            );
        }
        let on_disk: usize = files.iter().map(|(_, b)| b.len()).sum();
        assert_eq!(metric("mastsub_published_bytes_total{}"), on_disk as f64);
        assert_eq!(
            metric("mastsub_downloads_done_bytes{}"),
            cli["bytes_done"].as_f64().unwrap()
        );
        // Every byte the server sent was received and counted once: the products and the three
        // fetches of the page that was not FITS.
        assert_eq!(
            metric("mastsub_downloaded_bytes_total{}"),
            mast.bytes_served() as f64,
            "bytes received vs bytes the server sent"
        );
        assert_eq!(metric("mastsub_download_attempts_total{outcome=done}"), 3.0);
        assert_eq!(
            metric("mastsub_download_attempts_total{outcome=failed}"),
            1.0
        );
        assert_eq!(
            metric("mastsub_download_attempts_total{outcome=retry}"),
            2.0,
            "the page was fetched three times in all"
        );
        assert_eq!(metric("mastsub_source_up{source=inbox}"), 1.0);
        assert_eq!(
            metric("mastsub_source_up{source=imap}"),
            0.0,
            "the mailbox cannot be reached"
        );
        assert_eq!(
            metric(&format!("mastsub_events_total{{event_type={ODD_TYPE}}}")),
            1.0,
            "an event type with a quote and a backslash, as the parser reads it back"
        );
        assert_eq!(metric("mastsub_downloads_waiting{reason=disk_space}"), 0.0);
        assert_eq!(metric("mastsub_oldest_queued_job_age_seconds{}"), 0.0);
        let last = metric("mastsub_last_notice_received_timestamp_seconds{}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            last > now - 120.0 && last <= now + 1.0,
            "last notice at {last}, now {now}"
        );
        assert_eq!(metric("mastsub_hook_runs{state=failed}"), 0.0);
    }

    let (code, page) = get(port, "/");
    assert_eq!(code, 200);
    assert!(page.contains("id=\"count-done\"><b>3</b>"), "{page}");
    assert!(page.contains("id=\"count-failed\"><b>1</b>"), "{page}");
    assert!(
        page.contains("event_metadata_jwst-program-5105_hourly_20260422_143523.json"),
        "the notice is not on the page"
    );
    // The mailbox was tried (its error is on record), and still no secret anywhere.
    assert!(
        wait_until(Duration::from_secs(20), || ws.status()["sources"]
            .as_array()
            .is_some_and(|s| s
                .iter()
                .any(|h| h["source"] == "imap" && !h["last_error"].is_null()))),
        "the IMAP source never reported"
    );
    for (path, body) in [
        ("/", get(port, "/").1),
        ("/api/status", get(port, "/api/status").1),
        ("/metrics", get(port, "/metrics").1),
    ] {
        for secret in [TOKEN, PASSWORD] {
            assert!(!body.contains(secret), "a secret is in {path}");
        }
    }
    for path in [
        "/nope",
        "/metrics/x",
        "/api",
        "/../etc/passwd",
        "/api/status/",
    ] {
        assert_eq!(get(port, path).0, 404, "{path}");
    }
    d.terminate();
}

#[test]
fn the_status_page_renders_in_a_real_browser_with_its_counts_and_a_screenshot_is_kept() {
    let chromium = std::path::Path::new("/usr/bin/chromium");
    if !chromium.exists() {
        assert!(
            std::env::var_os("REQUIRE_CHROMIUM").is_none(),
            "chromium is not installed"
        );
        eprintln!("SKIPPED: chromium is not installed; the page was not rendered in a browser");
        return;
    }
    let mast = MastStandIn::start();
    let port = free_port();
    let (_ws, mut d, _files) = a_daemon_with_work(&mast, port);
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/");
    let browser = |extra: &[&str]| {
        let out = std::process::Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .output()
            .expect("run chromium");
        assert!(
            out.status.success(),
            "chromium failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    // The DOM as the browser built it: the counts are there with scripts off (there are none).
    let dom = String::from_utf8(browser(&["--dump-dom"]).stdout).unwrap();
    assert!(dom.contains("<b>3</b>done"), "{dom}");
    assert!(dom.contains("<b>1</b>failed"), "{dom}");
    assert!(
        dom.contains("http-equiv=\"refresh\""),
        "the page does not refresh itself"
    );
    assert!(
        dom.contains("not a FITS") || dom.contains("SIMPLE"),
        "the failure's reason is not shown: {dom}"
    );
    // A phone's viewport.
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page-phone.png");
    let _ = std::fs::remove_file(&shot);
    browser(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=412,915",
    ]);
    let png = std::fs::read(&shot).expect("a screenshot");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    // The PNG's width is the viewport's: nothing made the page wider than the phone.
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    assert_eq!(width, 412, "the screenshot is {width} px wide");
    eprintln!(
        "screenshot of the status page on a phone: {}",
        shot.display()
    );
    d.terminate();
}

#[test]
fn a_port_in_use_at_start_is_reported_and_taken_once_free_while_downloads_go_on() {
    let mast = MastStandIn::start();
    let (notice, _files) = serve_products(&mast, 1, 2, 4);
    let port = free_port();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let ws = Workspace::with_base(
        &mast.base_url,
        &format!("[http]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut d = Daemon::start(&ws);
    d.wait_for_log("(http.listen)", Duration::from_secs(20));
    assert!(
        d.log()
            .contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{}",
        d.log()
    );
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("n.json", &notice);
    wait_done(&ws, &d, 2, Duration::from_secs(30));
    drop(squatter);
    d.wait_for_log("serving the status page", Duration::from_secs(20));
    assert_eq!(get(port, "/api/status").0, 200);
    d.terminate();
}
