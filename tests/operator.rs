//! What an operator can do to a running daemon: delete or replace its database file, start a second one
//! on the same database (or a second `mastsub download` into the same folder), and set the clock back (here
//! through the stored times a clock set back leaves behind).

mod common;

use std::time::{Duration, Instant};

use common::mast::{Faults, MastStandIn, assert_identical, serve_products, wait_done};
use common::{Daemon, Workspace, notice_of, wait_until};

/// Waits for the daemon to exit on its own; it must within `timeout`, with a failure status (so that
/// systemd's Restart=on-failure starts it again). Returns how long it took from `since`.
fn exits_with_failure(d: &mut Daemon, since: Instant, timeout: Duration) -> Duration {
    let status = d.wait_exit(timeout);
    let took = since.elapsed();
    let status =
        status.unwrap_or_else(|| panic!("the daemon still runs {took:?} after; log:\n{}", d.log()));
    assert!(
        !status.success(),
        "exited with {status}, not a failure; log:\n{}",
        d.log()
    );
    took
}

/// The notice is still in the inbox: neither processed nor rejected.
fn still_in_inbox(ws: &Workspace, name: &str) {
    assert!(
        ws.files_in("inbox").contains(&name.to_string()),
        "{name} left the inbox: inbox {:?}, processed {:?}, rejected {:?}",
        ws.files_in("inbox"),
        ws.files_in("inbox/processed"),
        ws.files_in("inbox/rejected")
    );
    assert!(!ws.files_in("inbox/processed").contains(&name.to_string()));
}

#[test]
fn a_database_deleted_under_the_daemon_stops_it_with_an_error_and_the_notice_stays_in_the_inbox() {
    let ws = Workspace::new();
    let mut d = Daemon::start_watching(&ws);
    ws.drop_notice("before.json", &notice_of(1, 2));
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/processed")
        == ["before.json"]));

    std::fs::remove_file(ws.db()).unwrap();
    let deleted = Instant::now();
    ws.drop_notice("after.json", &notice_of(10, 2));
    let took = exits_with_failure(&mut d, deleted, Duration::from_secs(10));
    eprintln!("the daemon stopped {took:?} after its database was deleted");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    d.wait_for_log(
        "was deleted or moved away while mastsub had it open; stopping so that nothing is recorded",
        Duration::from_secs(2),
    );
    // The notice that arrived meanwhile was refused by the store, not recorded into the deleted file.
    d.wait_for_log("after.json: ", Duration::from_secs(1));
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains("after.json: ") && l.contains("stays in the inbox")),
        "{}",
        d.log()
    );
    still_in_inbox(&ws, "after.json");

    // Started again (as systemd does), it begins a new database and takes the notice.
    let _d = Daemon::start_watching(&ws);
    assert!(
        wait_until(Duration::from_secs(5), || ws
            .files_in("inbox/processed")
            .contains(&"after.json".to_string())),
        "not taken after the restart"
    );
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 2);
}

#[test]
fn a_database_replaced_under_the_daemon_stops_it_and_the_restart_uses_the_file_now_there() {
    // The replacement: another database (a backup restored, say) with its own two events.
    let other = Workspace::new();
    let restored = other.write_notice("old.json", &notice_of(500, 2));
    other.cmd().arg("ingest").arg(&restored).assert().success();

    let ws = Workspace::new();
    let mut d = Daemon::start_watching(&ws);
    ws.drop_notice("before.json", &notice_of(1, 3));
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/processed")
        == ["before.json"]));

    // A whole copy (its write-ahead log included), renamed over the database file.
    other.execute(&format!(
        "VACUUM INTO '{}'",
        ws.path("restored.db").display()
    ));
    std::fs::rename(ws.path("restored.db"), ws.db()).unwrap();
    let replaced = Instant::now();
    ws.drop_notice("after.json", &notice_of(10, 2));
    let took = exits_with_failure(&mut d, replaced, Duration::from_secs(10));
    eprintln!("the daemon stopped {took:?} after its database was replaced");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    d.wait_for_log(
        "was replaced by another file while mastsub had it open",
        Duration::from_secs(2),
    );
    still_in_inbox(&ws, "after.json");

    // The file now at the path is whole and is the replacement: the old file's write-ahead log, which
    // SQLite leaves by name beside it, was emptied rather than read into it.
    let wal = std::fs::metadata(ws.path("mastsub.db-wal")).map_or(0, |m| m.len());
    assert_eq!(
        wal,
        0,
        "the old file's WAL holds {wal} bytes; log:\n{}",
        d.log()
    );
    assert_eq!(ws.query_string("PRAGMA integrity_check"), "ok");
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 2);
    let _d = Daemon::start_watching(&ws);
    assert!(
        wait_until(Duration::from_secs(5), || ws
            .files_in("inbox/processed")
            .contains(&"after.json".to_string())),
        "not taken after the restart"
    );
    assert_eq!(ws.query_string("PRAGMA integrity_check"), "ok");
    let mut ids = ws.query_column_i64(
        "SELECT CAST(substr(event_id, 25) AS INTEGER) FROM events ORDER BY event_id",
    );
    ids.sort();
    assert_eq!(
        ids,
        [10, 11, 500, 501],
        "the replacement's events and the new notice's"
    );
}

#[test]
fn a_second_run_on_the_same_database_is_refused_naming_the_first_and_the_other_commands_still_work()
{
    let ws = Workspace::new();
    let mut first = Daemon::start_watching(&ws);

    let started = Instant::now();
    let out = ws
        .cmd()
        .arg("run")
        .timeout(Duration::from_secs(20))
        .output()
        .unwrap();
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        err.contains(&format!(
            "another mastsub run (pid {}) is using {}",
            first.pid(),
            ws.db().display()
        )),
        "{err}"
    );
    assert!(
        err.contains(
            "stop it first (systemctl stop mastsub) or point this one at another [storage] database"
        ),
        "{err}"
    );
    assert!(first.is_running());

    // Beside it: status, list, ingest and retry take no run lock.
    let notice = ws.write_notice("cli.json", &notice_of(1, 2));
    ws.cmd().arg("ingest").arg(&notice).assert().success();
    assert_eq!(ws.status()["events"]["New"], 2);
    ws.cmd().args(["list", "--json"]).assert().success();
    ws.cmd().args(["retry", "--all-failed"]).assert().success();
    assert!(first.is_running());

    // Once the first has stopped, the lock is free.
    first.terminate();
    let _second = Daemon::start_watching(&ws);
}

#[test]
fn a_second_download_into_the_same_folder_is_refused_while_the_first_runs() {
    let mast = MastStandIn::start();
    let (notice, _files) = serve_products(&mast, 1, 2, 40);
    mast.set_faults(Faults {
        slow: Some(Duration::from_millis(400)),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let notice = ws.write_notice("n.json", &notice);
    let dir = ws.path("D");
    let download = || {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mastsub"));
        c.arg("--config")
            .arg(&ws.config)
            .arg("download")
            .arg(&notice)
            .arg("--dir")
            .arg(&dir)
            .arg("-q")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    };
    let first = download().spawn().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || ws
            .tree("D")
            .iter()
            .any(|p| p.ends_with(".part"))),
        "the first download never began"
    );
    let second = download().output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("another mastsub download (pid {})", first.id())),
        "{err}"
    );
    assert!(err.contains("download into another --dir"), "{err}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let _ = first.wait_with_output();
}

/// The filename of record `n` (see `common::record`).
fn filename(n: u64) -> String {
    format!("jw{n:05}001001_02201_00001_mirimage_cal.fits")
}

fn state_of(ws: &Workspace, n: u64) -> String {
    ws.query_string(&format!(
        "SELECT state FROM downloads WHERE filename = '{}'",
        filename(n)
    ))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[test]
fn a_next_attempt_further_ahead_than_any_delay_is_due_now_and_one_within_retry_max_waits() {
    let mast = MastStandIn::start();
    let (notice, files) = serve_products(&mast, 1, 3, 4);
    let ws = Workspace::with_base(&mast.base_url, "");
    let notice = ws.write_notice("n.json", &notice);
    ws.cmd().arg("ingest").arg(&notice).assert().success();
    // retry_max 30 s: the horizon is 30 s (not_found_retry is shorter) plus a minute.
    let env = [("MASTSUB_DOWNLOAD__RETRY_MAX", "30s")];

    // What a clock set back an hour leaves behind: a retry "due in an hour" that was due in seconds.
    // Beside it, a retry due in 5 s, well within retry_max, which must wait its time; and a job held
    // aside (failed) for the running daemon.
    let set_at = Instant::now();
    let now = now_ms();
    ws.execute(&format!(
        "UPDATE downloads SET next_attempt_at = {} WHERE filename = '{}'",
        now + 3_600_000,
        filename(1)
    ));
    ws.execute(&format!(
        "UPDATE downloads SET next_attempt_at = {} WHERE filename = '{}'",
        now + 5_000,
        filename(2)
    ));
    ws.execute(&format!(
        "UPDATE downloads SET state = 'failed' WHERE filename = '{}'",
        filename(3)
    ));

    let d = Daemon::start_with_env(&ws, &env);
    assert!(
        wait_until(Duration::from_secs(4), || state_of(&ws, 1) == "done"),
        "the job due \"in an hour\" was not taken at start-up ({}); log:\n{}",
        state_of(&ws, 1),
        d.log()
    );
    d.wait_for_log("was the clock set back?", Duration::from_secs(1));
    // The one due in 5 s is not taken early.
    while set_at.elapsed() < Duration::from_millis(4_500) {
        assert_eq!(
            state_of(&ws, 2),
            "queued",
            "the job due in 5 s was taken after {:?}",
            set_at.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        wait_until(Duration::from_secs(8), || state_of(&ws, 2) == "done"),
        "the job due in 5 s was not taken in time; log:\n{}",
        d.log()
    );

    // With the daemon running: the sweep (every 5 s) finds such a time too.
    let queued_at = Instant::now();
    ws.execute(&format!(
        "UPDATE downloads SET state = 'queued', attempts = 0, next_attempt_at = {} WHERE filename = '{}'",
        now_ms() + 3_600_000,
        filename(3)
    ));
    wait_done(&ws, &d, 3, Duration::from_secs(8));
    eprintln!(
        "a job \"due in an hour\" queued beside the running daemon was done after {:?}",
        queued_at.elapsed()
    );
    assert_identical(&ws, &files);
}

#[test]
fn a_database_url_is_never_taken_for_a_file_name_and_its_password_never_shown() {
    let ws = Workspace::new();
    // A PostgreSQL URL where no server listens: said, by its URL without the password.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgresql://mastsub:pw-never-shown@127.0.0.1:{port}/mastsub");
    let shown = format!("postgresql://mastsub@127.0.0.1:{port}/mastsub");
    for (args, ok) in [
        (vec!["run"], false),
        (vec!["status"], false),
        (vec!["check-config"], true),
    ] {
        let out = ws
            .cmd()
            .args(&args)
            .env("MASTSUB_STORAGE__DATABASE", &url)
            .timeout(Duration::from_secs(60))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.success(), ok, "{args:?}: {text}");
        assert!(text.contains(&shown), "{args:?}: {text}");
        assert!(!text.contains("pw-never-shown"), "{args:?}: {text}");
    }
    // Another scheme is refused, not taken for a file name.
    let out = ws
        .cmd()
        .arg("status")
        .env(
            "MASTSUB_STORAGE__DATABASE",
            "mysql://u:pw-never-shown@127.0.0.1/db",
        )
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(text.contains("not a database mastsub can open"), "{text}");
    assert!(!text.contains("pw-never-shown"), "{text}");
    let made: Vec<String> = ws
        .files_in(".")
        .into_iter()
        .filter(|f| f.starts_with("postgres") || f.starts_with("mysql"))
        .collect();
    assert!(made.is_empty(), "{made:?}");
    assert!(!ws.path("postgresql:").exists());
}
