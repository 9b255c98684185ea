//! mastsub under a service manager: the test plays systemd with a unix datagram socket as `NOTIFY_SOCKET`
//! and `WATCHDOG_USEC` set, and checks the notify protocol, the graceful stop on SIGTERM and SIGHUP.

mod common;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::mast::{Faults, MastStandIn, assert_identical, serve_products, wait_done};
use common::{Daemon, Workspace, wait_until};

/// What the "service manager" received, one datagram per entry.
struct Manager {
    path: std::path::PathBuf,
    got: Arc<Mutex<Vec<String>>>,
}

impl Manager {
    fn listen(dir: &std::path::Path) -> Manager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
        Manager { path, got }
    }

    fn lines(&self) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .flat_map(|d| d.lines().map(str::to_string).collect::<Vec<_>>())
            .collect()
    }

    fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| *l == line).count()
    }

    fn statuses(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter_map(|l| l.strip_prefix("STATUS=").map(str::to_string))
            .collect()
    }
}

#[test]
fn systemd_sees_ready_status_watchdog_and_stopping_and_a_stop_keeps_part_files() {
    let mast = MastStandIn::start();
    // About 3 s per product, 4 at a time: work in progress for several status refreshes.
    let (notice, files) = serve_products(&mast, 1, 6, 200);
    mast.set_faults(Faults {
        slow: Some(Duration::from_millis(90)),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let manager = Manager::listen(ws.dir.path());
    let mut d = Daemon::start_with_env(
        &ws,
        &[
            ("NOTIFY_SOCKET", manager.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    assert!(
        wait_until(Duration::from_secs(20), || manager.count("READY=1") == 1),
        "no READY=1; got {:?}; log:\n{}",
        manager.lines(),
        d.log()
    );
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("n.json", &notice);
    // Pings at half the watchdog interval while the loops turn.
    assert!(
        wait_until(Duration::from_secs(10), || manager.count("WATCHDOG=1") >= 3),
        "{:?}",
        manager.lines()
    );
    // The status line follows the work: products go from queued to running.
    assert!(
        wait_until(Duration::from_secs(15), || {
            let s = manager.statuses();
            s.iter().any(|l| l.contains(" 4 running"))
                && s.iter().collect::<std::collections::HashSet<_>>().len() >= 2
        }),
        "{:?}\n{}",
        manager.statuses(),
        d.log()
    );
    assert!(
        wait_until(Duration::from_secs(20), || ws
            .query_i64("SELECT count(*) FROM downloads WHERE bytes_done > 0")
            >= 2),
        "{}",
        d.log()
    );
    assert_eq!(
        ws.jobs_in("done"),
        0,
        "the test needs downloads in progress"
    );

    let took = d.terminate();
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    assert_eq!(manager.count("STOPPING=1"), 1, "{:?}", manager.lines());
    let parts: Vec<_> = ws
        .tree("mastDownload")
        .into_iter()
        .filter(|p| p.ends_with(".part"))
        .collect();
    assert!(!parts.is_empty(), "no .part file kept");
    assert_eq!(ws.jobs_in("running"), 0, "leases left behind");

    mast.set_faults(Faults::default());
    let d = Daemon::start(&ws);
    wait_done(&ws, &d, 6, Duration::from_secs(30));
    assert_identical(&ws, &files);
    let resumed = mast.seen().iter().filter(|s| s.status == 206).count();
    assert!(
        resumed >= parts.len(),
        "{resumed} resumes for {} .part files",
        parts.len()
    );
}

#[test]
fn sighup_reads_the_token_file_again_and_jobs_waiting_for_a_token_go() {
    let mast = MastStandIn::start();
    let (notice, files) = serve_products(&mast, 1, 2, 10);
    mast.set_faults(Faults {
        token: Some("tok-abc".into()),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let token_file = ws.path("token");
    std::fs::write(&token_file, "").unwrap();
    let d = Daemon::start_with_env(
        &ws,
        &[("MASTSUB_MAST__TOKEN_FILE", token_file.to_str().unwrap())],
    );
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("n.json", &notice);
    assert!(
        wait_until(Duration::from_secs(20), || ws.db().exists()
            && ws.jobs_in("needs_auth") == 2),
        "{}",
        d.log()
    );
    std::fs::write(&token_file, "tok-abc\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_done(&ws, &d, 2, Duration::from_secs(20));
    assert_identical(&ws, &files);
    d.wait_for_log(
        "secrets read again: a MAST token is set",
        Duration::from_secs(1),
    );
    assert!(!d.log().contains("tok-abc"), "the token was logged");
}

#[test]
fn under_the_journal_lines_carry_a_priority_and_no_time() {
    let ws = Workspace::new();
    let d = Daemon::start_with_env(&ws, &[("JOURNAL_STREAM", "8:12345")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    std::fs::write(ws.inbox().join("bad.json"), b"{ not json").unwrap();
    d.wait_for_log("notice bad.json rejected", Duration::from_secs(10));
    let log = d.log();
    let starting = log.lines().find(|l| l.contains("starting")).unwrap();
    assert!(starting.starts_with("<6>mastsub "), "{starting}");
    let rejected = log
        .lines()
        .find(|l| l.contains("notice bad.json rejected"))
        .unwrap();
    assert!(rejected.starts_with("<4>"), "{rejected}");
    assert!(
        !log.lines().any(|l| l.starts_with("20")),
        "a line with a timestamp:\n{log}"
    );
}

#[test]
fn status_after_a_mixed_run_shows_states_by_event_type_failures_sources_and_the_daemon() {
    let mast = MastStandIn::start();
    let (notice, _files) = serve_products(&mast, 1, 2, 10);
    // Product 2 never appears: 404 until not_found_give_up (3 s in tests), then failed.
    mast.remove("jw00002001001_02201_00001_mirimage_cal.fits");
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("a.json", &notice);
    assert!(
        wait_until(Duration::from_secs(20), || ws.jobs_in("done") == 1
            && ws.jobs_in("failed") == 1),
        "{}",
        d.log()
    );
    // From now on MAST wants a token: product 3 ends needs_auth.
    mast.set_faults(Faults {
        token: Some("tok".into()),
        ..Faults::default()
    });
    let (third, _) = serve_products(&mast, 3, 1, 10);
    ws.drop_notice("b.json", &third);
    assert!(wait_until(Duration::from_secs(20), || ws
        .jobs_in("needs_auth")
        == 1));
    // The daemon writes its figures every 5 s.
    assert!(wait_until(
        Duration::from_secs(10),
        || ws.status()["daemon"]["pid"] == i64::from(d.pid())
    ));

    let s = ws.status();
    assert_eq!(s["downloads"]["done"], 1, "{s}");
    assert_eq!(s["downloads"]["failed"], 1, "{s}");
    assert_eq!(s["downloads"]["needs_auth"], 1, "{s}");
    assert_eq!(s["by_event_type"]["New"]["done"], 1, "{s}");
    assert_eq!(s["by_event_type"]["New"]["failed"], 1, "{s}");
    assert_eq!(s["by_event_type"]["New"]["needs_auth"], 1, "{s}");
    assert_eq!(s["by_event_type"]["Public"]["done"], 0, "{s}");
    let failures = s["recent_failures"].as_array().unwrap();
    assert_eq!(failures.len(), 2, "{s}");
    assert!(
        failures[0]["last_error"].as_str().unwrap().contains("401"),
        "{s}"
    );
    assert!(
        failures[1]["last_error"].as_str().unwrap().contains("404"),
        "{s}"
    );
    let inbox = &s["sources"][0];
    assert_eq!(inbox["source"], "inbox", "{s}");
    assert_eq!(inbox["state"], "watching", "{s}");
    assert_eq!(inbox["taken"], 2, "{s}");
    assert!(s["daemon"]["rate"].is_number(), "{s}");
    assert_eq!(s["bytes_done"], 10 * 2880, "{s}");

    let out = ws.cmd().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for expected in [
        format!("daemon:     running (pid {}", d.pid()),
        "downloads:  0 queued, 0 running, 1 done, 1 failed, 1 needs_auth".to_string(),
        "New               0       0    1      1          1".to_string(),
        "needs_auth New program 5105 jwst/jw00003001001_02201_00001/jw00003001001_02201_00001_mirimage_cal.fits: MAST answered HTTP 401".to_string(),
        "inbox: watching, connected".to_string(),
        "2 notice(s) taken".to_string(),
    ] {
        assert!(text.contains(&expected), "{expected:?} not in:\n{text}");
    }
}
