//! `[hooks]` through the real binary: `on_product` once per published product with the notice's own
//! values, `on_notice` once with the right counts, a hook that fails twice then succeeds, one that always
//! fails (status shows it), kill -9 during a slow hook (it runs again after the restart), and downloads
//! that go on while a hook sleeps.

mod common;

use std::time::Duration;

use common::mast::{MastStandIn, serve_products, wait_done};
use common::{Daemon, Workspace, record, wait_until};
use serde_json::{Value, json};

/// The lines of a file a hook appends to (none if it does not exist yet).
fn lines(path: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn hooks_section(on_product: Option<&str>, on_notice: Option<&str>, extra: &str) -> String {
    let mut s = "[hooks]\n".to_string();
    if let Some(c) = on_product {
        s.push_str(&format!("on_product = {}\n", toml_str(c)));
    }
    if let Some(c) = on_notice {
        s.push_str(&format!("on_notice = {}\n", toml_str(c)));
    }
    s.push_str(extra);
    s
}

fn toml_str(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[test]
fn on_product_runs_once_per_product_with_the_notice_s_values_and_on_notice_once_with_the_counts() {
    let mast = MastStandIn::start();
    let (notice, files) = serve_products(&mast, 1, 3, 4);
    let mut records: Vec<Value> = serde_json::from_slice(&notice).unwrap();
    // Values as a notice writes them: a date with 3 fractional digits (stored with 7), a program as a
    // number.
    records[0]["archived_date"] = json!("2025-12-03T19:44:10.707");
    // Not FITS: fails after its three fetches.
    let bad = record(8, "New");
    let mut page = b"Service temporarily unavailable".to_vec();
    page.resize(2880 * 2, b' ');
    mast.put(bad["filename"].as_str().unwrap(), page);
    records.push(bad);
    // Public events are recorded only here: skipped.
    records.push(record(9, "Public"));
    let ws0 = tempfile::tempdir().unwrap();
    let products = ws0.path().join("products.log");
    let notices = ws0.path().join("notices.log");
    let ws = Workspace::with_base(
        &mast.base_url,
        &format!(
            "[events]\npublic = \"record\"\n\n{}",
            hooks_section(
                Some(&format!(
                    "printf '%s|%s|%s|%s|%s|%s|%s|%s\\n' \"$MASTSUB_PATH\" \"$MASTSUB_MISSION\" \
                     \"$MASTSUB_FILESET\" \"$MASTSUB_FILENAME\" \"$MASTSUB_PROGRAM\" \
                     \"$MASTSUB_EVENT_TYPE\" \"$MASTSUB_ARCHIVED_DATE\" \"$MASTSUB_NOTICE\" >> {}",
                    products.display()
                )),
                // A hook may ask mastsub itself: its MASTSUB_* variables are no configuration.
                Some(&format!(
                    "echo \"$MASTSUB_NOTICE $MASTSUB_DONE $MASTSUB_FAILED $MASTSUB_SKIPPED\" >> {}; \
                     {} --config {} status --json > {}",
                    notices.display(),
                    env!("CARGO_BIN_EXE_mastsub"),
                    ws0.path().join("mastsub.toml").display(),
                    ws0.path().join("status.json").display(),
                )),
                "retry_initial = \"100ms\"\n",
            )
        ),
    );
    std::fs::copy(&ws.config, ws0.path().join("mastsub.toml")).unwrap();
    let d = Daemon::start_watching(&ws);
    let name = "event_metadata_jwst-program-5105_daily_20260422_143523.json";
    ws.drop_notice(name, &serde_json::to_vec(&records).unwrap());
    wait_done(&ws, &d, 3, Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || lines(&notices).len() == 1),
        "on_notice did not run; log:\n{}",
        d.log()
    );
    assert_eq!(lines(&notices), vec![format!("{name} 3 1 1")]);
    assert!(
        wait_until(Duration::from_secs(10), || {
            std::fs::read(ws0.path().join("status.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|s| s["downloads"]["done"] == 3 && s["downloads"]["failed"] == 1)
        }),
        "mastsub status run by the hook did not work: {:?}; log:\n{}",
        std::fs::read_to_string(ws0.path().join("status.json")),
        d.log()
    );
    assert!(wait_until(Duration::from_secs(10), || lines(&products)
        .len()
        == 3));
    let mut got = lines(&products);
    got.sort();
    let root = std::fs::canonicalize(ws.path("mastDownload")).unwrap();
    for ((path, body), line) in files.iter().zip(&got) {
        let f: Vec<&str> = line.split('|').collect();
        assert_eq!(f.len(), 8, "{line}");
        let abs = std::path::Path::new(f[0]);
        assert!(abs.is_absolute(), "MASTSUB_PATH {abs:?} is not absolute");
        assert_eq!(std::fs::read(abs).unwrap(), *body, "{line}");
        assert_eq!(
            std::fs::canonicalize(abs).unwrap(),
            root.join(path),
            "{line}"
        );
        assert_eq!(f[1], "JWST");
        assert_eq!(format!("jwst/{}/{}", f[2], f[3]), *path);
        assert_eq!(f[4], "5105");
        assert_eq!(f[5], "New");
        assert_eq!(f[7], name);
    }
    let dates: Vec<&str> = got.iter().map(|l| l.split('|').nth(6).unwrap()).collect();
    assert!(
        dates.contains(&"2025-12-03T19:44:10.707"),
        "the archived date not as the notice wrote it: {dates:?}"
    );
    // Once each: nothing more runs later.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(lines(&products).len(), 3);
    assert_eq!(lines(&notices).len(), 1);
    let status = ws.status();
    assert_eq!(status["hooks"]["done"], 4, "{status}");
    assert_eq!(status["hooks"]["failed"], 0);
}

#[test]
fn a_hook_that_fails_twice_then_succeeds_is_retried_and_one_that_always_fails_is_shown_failed() {
    let mast = MastStandIn::start();
    let (notice, _files) = serve_products(&mast, 1, 2, 4);
    let dir = tempfile::tempdir().unwrap();
    let tries = dir.path().join("tries");
    std::fs::create_dir_all(&tries).unwrap();
    // Per product: exit 1 on the first two attempts, 0 on the third; product 2 always fails.
    let script = format!(
        "f={}/$MASTSUB_FILENAME; echo x >> \"$f\"; n=$(wc -l < \"$f\"); \
         case \"$MASTSUB_FILENAME\" in *00002001001*) echo \"no room in the pipeline\" >&2; exit 3;; esac; \
         test \"$n\" -ge 3",
        tries.display()
    );
    let port = common::free_port();
    let ws = Workspace::with_base(
        &mast.base_url,
        &format!(
            "[http]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n\n{}",
            hooks_section(
                Some(&script),
                None,
                "retry_initial = \"200ms\"\nmax_attempts = 4\n",
            )
        ),
    );
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &notice);
    wait_done(&ws, &d, 2, Duration::from_secs(30));
    assert!(
        wait_until(Duration::from_secs(30), || {
            let h = &ws.status()["hooks"];
            h["done"] == 1 && h["failed"] == 1
        }),
        "hooks: {}; log:\n{}",
        ws.status()["hooks"],
        d.log()
    );
    let count =
        |n: u64| lines(&tries.join(format!("jw{n:05}001001_02201_00001_mirimage_cal.fits"))).len();
    assert_eq!(
        count(1),
        3,
        "the first product's hook: two failures, then success"
    );
    assert_eq!(count(2), 4, "the second product's hook: hooks.max_attempts");
    let status = ws.status();
    let hooks = &status["hooks"];
    assert_eq!(hooks["failed_attempts"], 2 + 4, "{hooks}");
    let failure = &hooks["recent_failures"][0];
    assert_eq!(failure["state"], "failed");
    assert_eq!(failure["kind"], "on_product");
    assert!(
        failure["error"]
            .as_str()
            .unwrap()
            .contains("exited with status 3"),
        "{failure}"
    );
    assert!(failure["about"].as_str().unwrap().contains("00002001001"));
    // The output went to the log, tagged with the product.
    assert!(
        d.log().contains("hooks.on_product for jwst/jw00002001001_02201_00001/jw00002001001_02201_00001_mirimage_cal.fits: no room in the pipeline"),
        "{}",
        d.log()
    );
    let text = String::from_utf8(ws.cmd().arg("status").output().unwrap().stdout).unwrap();
    assert!(
        text.contains("hooks:") && text.contains("1 failed"),
        "{text}"
    );
    // The metrics and the page show the failures too.
    let (_, metrics) = common::http_get(port, "/metrics");
    for line in [
        "mastsub_hook_runs{state=\"failed\"} 1\n",
        "mastsub_hook_runs{state=\"done\"} 1\n",
        "mastsub_hook_failed_attempts_total 6\n",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
    let (_, page) = common::http_get(port, "/");
    assert!(
        page.contains("id=\"hook-failures\"") && page.contains("exited with status 3"),
        "{page}"
    );
}

#[test]
fn kill_9_during_a_slow_hook_runs_it_again_after_the_restart_and_downloads_never_wait_for_hooks() {
    let mast = MastStandIn::start();
    let (notice, _files) = serve_products(&mast, 1, 10, 4);
    let dir = tempfile::tempdir().unwrap();
    let started = dir.path().join("started");
    // GNU sleep takes fractions: the pid makes this sleep's command line ours alone.
    let marker = format!("sleep 600.{}", std::process::id());
    // One hook at a time, each sleeping far longer than the test: while the first sleeps, all ten
    // products must be downloaded.
    let ws = Workspace::with_base(
        &mast.base_url,
        &hooks_section(
            Some(&format!(
                "echo \"$MASTSUB_FILENAME\" >> {}; {marker}",
                started.display()
            )),
            None,
            "concurrency = 1\ntimeout = \"1h\"\n",
        ),
    );
    let mut d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &notice);
    wait_done(&ws, &d, 10, Duration::from_secs(30));
    assert!(wait_until(Duration::from_secs(10), || lines(&started)
        .len()
        == 1));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        lines(&started).len(),
        1,
        "hooks.concurrency = 1 ran more at once"
    );
    let first = lines(&started)[0].clone();
    d.kill9();
    // The orphaned hook of the killed daemon (systemd would have killed its cgroup).
    let _ = std::process::Command::new("pkill")
        .args(["-f", &marker])
        .status();
    let d2 = Daemon::start(&ws);
    assert!(
        wait_until(Duration::from_secs(10), || lines(&started).len() >= 2),
        "the interrupted hook did not run again after the restart; log:\n{}",
        d2.log()
    );
    assert_eq!(
        lines(&started)[1],
        first,
        "the run interrupted is the one that runs first"
    );
    assert!(
        d2.log().contains("interrupted when mastsub last stopped"),
        "{}",
        d2.log()
    );
    let mut d2 = d2;
    d2.terminate();
    let _ = std::process::Command::new("pkill")
        .args(["-f", &marker])
        .status();
}
