//! kill -9 in the middle of ingesting a large notice: all of it or none of it is recorded, and after a
//! restart all of it, once.

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Workspace, notice_of, wait_until};

const EVENTS: i64 = 10_000;

#[test]
fn kill_9_during_ingest_records_all_or_nothing_then_all_once() {
    let body = notice_of(1, EVENTS as u64);
    // Calibrate: how long from the rename to the file leaving the inbox on this machine and build.
    let full = {
        let ws = Workspace::new();
        let _d = Daemon::start_watching(&ws);
        let start = Instant::now();
        ws.drop_notice("big.json", &body);
        assert!(wait_until(Duration::from_secs(60), || ws
            .files_in("inbox/processed")
            == ["big.json"]));
        start.elapsed().as_millis() as u64
    };
    // Kill times spread over that window, so some land before, some inside and some after the transaction.
    // One calibration is noisy on a loaded machine: while no kill has landed on one side of the commit,
    // further kills go earlier (down to at once) or later (up to four times the calibration).
    let mut outcomes: Vec<(u64, i64)> = Vec::new();
    let mut percents: Vec<u64> = vec![110, 100, 92, 85, 75, 60, 40];
    let (mut earlier, mut later) = (
        [20u64, 5, 0].into_iter(),
        [150u64, 200, 300, 400].into_iter(),
    );
    while let Some(percent) = percents.pop().or_else(|| {
        if !outcomes.iter().any(|(_, n)| *n == 0) {
            earlier.next()
        } else if !outcomes.iter().any(|(_, n)| *n == EVENTS) {
            later.next()
        } else {
            None
        }
    }) {
        let delay_ms = full * percent / 100;
        let ws = Workspace::new();
        let mut d = Daemon::start_watching(&ws);
        ws.drop_notice("big.json", &body);
        std::thread::sleep(Duration::from_millis(delay_ms));
        d.kill9();

        let recorded = if ws.db().exists() {
            ws.query_i64("SELECT count(*) FROM events")
        } else {
            0
        };
        assert!(
            recorded == 0 || recorded == EVENTS,
            "after kill -9 at {delay_ms} ms: {recorded} of {EVENTS} events recorded"
        );
        // The rule the inbox keeps: a notice leaves the inbox only once it is recorded.
        let left_inbox = !ws.inbox().join("big.json").exists();
        assert!(
            !left_inbox || recorded == EVENTS,
            "big.json left the inbox at {delay_ms} ms with {recorded} events recorded"
        );
        let jobs = ws.query_i64("SELECT count(*) FROM downloads");
        assert_eq!(
            jobs, recorded,
            "downloads and events disagree after kill -9 at {delay_ms} ms"
        );
        outcomes.push((delay_ms, recorded));

        // The restarted daemon finds the notice still in the inbox and takes it (at once when it can tell
        // no process has it open for writing; after write_timeout where it cannot tell).
        let _d = Daemon::start_with_env(&ws, &[("MASTSUB_INBOX__WRITE_TIMEOUT", "1s")]);
        assert!(
            wait_until(Duration::from_secs(30), || ws.files_in("inbox/processed")
                == ["big.json"]),
            "not processed after restart"
        );
        assert_eq!(ws.query_i64("SELECT count(*) FROM events"), EVENTS);
        assert_eq!(
            ws.query_i64("SELECT count(DISTINCT event_id) FROM events"),
            EVENTS
        );
        assert_eq!(ws.query_i64("SELECT count(*) FROM downloads"), EVENTS);
        assert_eq!(ws.query_i64("SELECT count(*) FROM notices"), 1);
    }
    eprintln!("full ingest {full} ms; (kill at ms, events recorded): {outcomes:?}");
    // The kills must have landed on both sides of the commit, or the test showed nothing.
    assert!(
        outcomes.iter().any(|(_, n)| *n == 0),
        "no kill landed before the commit: {outcomes:?}"
    );
    assert!(
        outcomes.iter().any(|(_, n)| *n == EVENTS),
        "no kill landed after the commit: {outcomes:?}"
    );
}
