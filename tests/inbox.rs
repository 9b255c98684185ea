//! The daemon's inbox: files renamed in, written slowly in place, present before start; what is ignored;
//! no overwrites; a clean stop; a watcher that loses its folder.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{Daemon, Workspace, notice_of, wait_until};

#[test]
fn a_notice_renamed_into_the_inbox_is_taken_within_a_second() {
    let ws = Workspace::new();
    let _d = Daemon::start_watching(&ws);
    let start = Instant::now();
    ws.drop_notice("renamed.json", &notice_of(1, 3));
    let taken = wait_until(Duration::from_secs(1), || {
        ws.files_in("inbox/processed") == ["renamed.json"]
    });
    assert!(
        taken,
        "not processed within 1 s (inbox: {:?})",
        ws.files_in("inbox")
    );
    eprintln!("renamed notice processed after {:?}", start.elapsed());
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 3);
}

#[test]
fn on_the_built_in_defaults_a_notice_dropped_in_the_relative_inbox_is_taken_promptly() {
    let ws = Workspace::new();
    let d = Daemon::start_on_defaults(&ws);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    std::fs::copy(common::sample_notice(), ws.path("staged.json")).unwrap();
    std::fs::rename(ws.path("staged.json"), ws.inbox().join("JWST.json")).unwrap();
    // Well under inbox.rescan_interval (60 s): the watcher, not the periodic scan, must see it.
    assert!(
        wait_until(Duration::from_secs(3), || ws.files_in("inbox/processed")
            == ["JWST.json"]),
        "not processed; log:\n{}",
        d.log()
    );
    assert!(ws.path("mastsub.db").is_file());
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 3);
}

#[test]
fn a_notice_written_slowly_in_place_is_taken_only_once_closed() {
    let ws = Workspace::new();
    let _d = Daemon::start_watching(&ws);
    let body = notice_of(10, 20);
    let path = ws.inbox().join("slow.json");
    let mut f = std::fs::File::create(&path).unwrap();
    for chunk in body.chunks(body.len() / 5 + 1) {
        f.write_all(chunk).unwrap();
        f.flush().unwrap();
        // Longer than inbox.settle: only the open file tells the daemon the notice is unfinished.
        std::thread::sleep(Duration::from_millis(300));
        assert!(path.exists(), "taken while still being written");
        assert!(
            ws.files_in("inbox/rejected").is_empty(),
            "a half-written notice was rejected"
        );
    }
    drop(f);
    assert!(
        wait_until(Duration::from_secs(5), || ws.files_in("inbox/processed")
            == ["slow.json"]),
        "not processed after close; inbox {:?}, rejected {:?}",
        ws.files_in("inbox"),
        ws.files_in("inbox/rejected")
    );
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 20);
}

#[test]
fn notices_that_arrived_while_down_are_taken_at_start_up_and_temporary_names_are_ignored() {
    let ws = Workspace::new();
    std::fs::create_dir_all(ws.inbox()).unwrap();
    std::fs::write(ws.inbox().join("early.json"), notice_of(100, 2)).unwrap();
    for ignored in [
        ".hidden.json",
        "partial.json.part",
        "upload.json.tmp",
        "edit.json~",
    ] {
        std::fs::write(ws.inbox().join(ignored), notice_of(200, 1)).unwrap();
    }
    // Written just now, and closed: taken at once where the daemon can tell no writer is left (a read
    // lease, /proc), else after write_timeout (short here, so that this test holds either way).
    let _d = Daemon::start_with_env(&ws, &[("MASTSUB_INBOX__WRITE_TIMEOUT", "1s")]);
    assert!(
        wait_until(Duration::from_secs(10), || ws.files_in("inbox/processed")
            == ["early.json"]),
        "pre-existing notice not processed"
    );
    // Give the ignored names every chance to be (wrongly) taken.
    std::thread::sleep(Duration::from_millis(500));
    let left = ws.files_in("inbox");
    for ignored in [
        ".hidden.json",
        "partial.json.part",
        "upload.json.tmp",
        "edit.json~",
    ] {
        assert!(
            left.contains(&ignored.to_string()),
            "{ignored} was taken: {left:?}"
        );
    }
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 2);
}

#[test]
fn an_empty_file_waits_for_its_writer() {
    let ws = Workspace::new();
    let d = Daemon::start_with_env(&ws, &[("MASTSUB_INBOX__WRITE_TIMEOUT", "3s")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    // Created empty and closed (as `touch` does), filled a moment later by a second open.
    let path = ws.inbox().join("touched.json");
    std::fs::File::create(&path).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(path.exists(), "an empty file was taken at once");
    std::fs::write(&path, notice_of(40, 2)).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || ws.files_in("inbox/processed")
            == ["touched.json"]),
        "rejected: {:?}",
        ws.files_in("inbox/rejected")
    );
}

#[test]
fn a_name_used_twice_never_overwrites_and_equal_content_is_recorded_once() {
    let ws = Workspace::new();
    let _d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &notice_of(1, 2));
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/processed")
        .len()
        == 1));
    ws.drop_notice("n.json", &notice_of(1, 2));
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/processed")
        .len()
        == 2));
    assert_eq!(ws.files_in("inbox/processed"), ["n.1.json", "n.json"]);
    assert_eq!(ws.query_i64("SELECT count(*) FROM notices"), 1);
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 2);
}

#[test]
fn sigterm_and_sigint_stop_the_daemon_cleanly() {
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let ws = Workspace::new();
        let mut d = Daemon::start_watching(&ws);
        let took = d.stop_with(signal);
        assert!(
            took < Duration::from_secs(10),
            "{signal}: stop took {took:?}"
        );
        assert!(d.log().contains("mastsub stopped"), "{signal}: {}", d.log());
    }
}

#[test]
fn a_removed_inbox_is_recreated_and_watched_again() {
    let ws = Workspace::with_config("");
    let mut d = Daemon::start_watching(&ws);
    std::fs::remove_dir_all(ws.inbox()).unwrap();
    d.wait_for_log("was removed", Duration::from_secs(5));
    assert!(
        wait_until(Duration::from_secs(10), || ws
            .inbox()
            .join("processed")
            .is_dir()),
        "inbox not recreated"
    );
    // The watcher is back: a renamed-in notice is taken promptly.
    std::thread::sleep(Duration::from_millis(200));
    ws.drop_notice("after.json", &notice_of(5, 1));
    assert!(
        wait_until(Duration::from_secs(5), || ws.files_in("inbox/processed")
            == ["after.json"]),
        "not processed after the inbox came back; log:\n{}",
        d.log()
    );
    assert!(d.is_running());
}

#[test]
fn a_symbolic_link_in_the_inbox_is_never_followed() {
    let ws = Workspace::new();
    let _d = Daemon::start_watching(&ws);
    let outside = ws.write_notice("outside.json", &notice_of(60, 3));
    std::os::unix::fs::symlink(&outside, ws.inbox().join("link.json")).unwrap();
    ws.drop_notice("real.json", &notice_of(70, 1));
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/processed")
        == ["real.json"]));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM events"),
        1,
        "the link's target was read"
    );
    assert!(ws.inbox().join("link.json").is_symlink());
    assert!(outside.exists());
}

#[test]
fn a_notice_replaced_under_its_name_while_being_read_is_read_again() {
    let ws = Workspace::new();
    let d = Daemon::start_watching(&ws);
    // A large notice takes a while to record in a debug build; replace it while that happens.
    ws.drop_notice("n.json", &notice_of(1, 10_000));
    std::thread::sleep(Duration::from_millis(400));
    ws.drop_notice("n.json", &notice_of(50_000, 2));
    assert!(
        wait_until(Duration::from_secs(30), || !ws
            .inbox()
            .join("n.json")
            .exists()
            && ws.query_i64(
                "SELECT count(*) FROM events WHERE record_index < 2 AND filename LIKE 'jw50000%'"
            ) == 1),
        "the replacement was not recorded; log:\n{}",
        d.log()
    );
    // Whatever was moved to processed/ was recorded: every processed file's events are in the database.
    let processed = ws.files_in("inbox/processed");
    assert!(!processed.is_empty());
    for name in processed {
        let body = std::fs::read(ws.path(&format!("inbox/processed/{name}"))).unwrap();
        let records: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        let first = records[0]["event_id"].as_str().unwrap();
        assert_eq!(
            ws.query_i64(&format!(
                "SELECT count(*) FROM events WHERE event_id = '{first}'"
            )),
            1,
            "{name} was moved but not recorded"
        );
    }
}

/// The daemon's own time of its first log line containing `needle`, in ms since the epoch.
fn log_time_ms(d: &Daemon, needle: &str) -> i64 {
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"));
    let stamp = line.split_whitespace().next().unwrap();
    chrono::DateTime::parse_from_rfc3339(stamp)
        .unwrap_or_else(|e| panic!("{stamp:?} in {line:?}: {e}"))
        .timestamp_millis()
}

/// How many lines of the daemon's log contain `needle`.
fn lines_with(d: &Daemon, needle: &str) -> usize {
    d.log().lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn a_complete_notice_present_at_start_up_is_recorded_within_a_second_on_the_default_write_timeout()
{
    let ws = Workspace::new();
    std::fs::create_dir_all(ws.inbox()).unwrap();
    // Written just now and closed (`cp` then `systemctl start`): recent, but no process holds it open.
    std::fs::write(ws.inbox().join("boot.json"), notice_of(300, 3)).unwrap();
    let spawned = Instant::now();
    // inbox.write_timeout is not set: its default, 60 s, is in force.
    let d = Daemon::start(&ws);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    let recorded = wait_until(Duration::from_secs(10), || {
        ws.query_i64("SELECT count(*) FROM notices") == 1
    });
    let after = spawned.elapsed();
    assert!(recorded, "not recorded within 10 s; log:\n{}", d.log());
    // Measured on the daemon's own clock: from its "watching inbox" line to the notice's row.
    let watching = log_time_ms(&d, "watching inbox");
    let received = ws.query_i64("SELECT received_at FROM notices");
    eprintln!(
        "present at start-up: recorded {} ms after \"watching inbox\", {after:?} after the spawn",
        received - watching
    );
    assert!(
        received - watching < 1000,
        "recorded {} ms after the watch began; log:\n{}",
        received - watching,
        d.log()
    );
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 3);
    assert!(wait_until(Duration::from_secs(2), || ws
        .files_in("inbox/processed")
        == ["boot.json"]));
}

#[test]
fn a_file_still_open_for_writing_at_start_up_waits_until_it_is_closed() {
    let ws = Workspace::new();
    std::fs::create_dir_all(ws.inbox()).unwrap();
    let body = notice_of(400, 5);
    let path = ws.inbox().join("open.json");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&body[..body.len() / 2]).unwrap();
    f.flush().unwrap();
    // An hour: only the open descriptor can be what keeps the daemon from taking it.
    let d = Daemon::start_with_env(&ws, &[("MASTSUB_INBOX__WRITE_TIMEOUT", "1h")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(3));
    assert!(path.exists(), "taken while still open for writing");
    assert!(
        ws.files_in("inbox/rejected").is_empty(),
        "a half-written notice was rejected; log:\n{}",
        d.log()
    );
    assert_eq!(ws.query_i64("SELECT count(*) FROM notices"), 0);
    f.write_all(&body[body.len() / 2..]).unwrap();
    let closed = Instant::now();
    drop(f);
    assert!(
        wait_until(Duration::from_secs(5), || ws.files_in("inbox/processed")
            == ["open.json"]),
        "not taken after it was closed; inbox {:?}, log:\n{}",
        ws.files_in("inbox"),
        d.log()
    );
    eprintln!(
        "open at start-up: taken {:?} after the close",
        closed.elapsed()
    );
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 5);
}

#[test]
fn what_the_inbox_never_takes_is_named_once_with_the_reason_and_left_in_place() {
    use std::os::unix::fs::FileTypeExt;
    let ws = Workspace::new();
    let inbox = ws.inbox();
    std::fs::create_dir_all(&inbox).unwrap();
    let outside = ws.write_notice("outside.json", &notice_of(500, 1));
    let link = inbox.join("link.json");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let fifo = inbox.join("pipe.json");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let stray = inbox.join("stray");
    std::fs::create_dir(&stray).unwrap();
    std::fs::write(stray.join("inner.json"), notice_of(510, 1)).unwrap();
    // Left alone silently: a dot-folder.
    std::fs::create_dir(inbox.join(".cache")).unwrap();
    let d = Daemon::start_with_env(&ws, &[("MASTSUB_INBOX__RESCAN_INTERVAL", "1s")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    // One more that arrives while the daemon runs (the watcher sees it before any rescan).
    let socket_path = inbox.join("notices.sock");
    let _socket = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    let named = |p: &std::path::Path, what: &str| format!("{} is {what}", p.display());
    let expected = [
        (
            named(&link, "a symbolic link"),
            "copy the notice in instead",
        ),
        (
            named(&fifo, "a named pipe (FIFO)"),
            "mastsub takes only regular files",
        ),
        (named(&stray, "a folder"), "move the notices in it up into"),
        (
            named(&socket_path, "a socket"),
            "mastsub takes only regular files",
        ),
    ];
    for (line, _) in &expected {
        d.wait_for_log(line, Duration::from_secs(5));
    }
    // The daemon still takes notices.
    ws.drop_notice("real.json", &notice_of(520, 1));
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/processed")
        == ["real.json"]));
    // Past three more rescans: nothing is named twice.
    std::thread::sleep(Duration::from_millis(3500));
    let log = d.log();
    for (line, advice) in &expected {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(line.as_str())).collect();
        assert_eq!(
            lines.len(),
            1,
            "{line:?} named {} times; log:\n{log}",
            lines.len()
        );
        assert!(lines[0].contains("WARN"), "{}", lines[0]);
        assert!(lines[0].contains(advice), "{}", lines[0]);
    }
    for quiet in [".cache", "processed is", "rejected is", "inner.json"] {
        assert_eq!(lines_with(&d, quiet), 0, "{quiet:?} named; log:\n{log}");
    }
    // Everything is where it was, as it was.
    assert!(link.is_symlink());
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(stray.join("inner.json").is_file());
    assert!(
        std::fs::symlink_metadata(&socket_path)
            .unwrap()
            .file_type()
            .is_socket()
    );
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 1);
    // Replaced by another link: named again, once.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink("/nonexistent", &link).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || lines_with(&d, &expected[0].0)
            == 2),
        "a new link under the same name was not named; log:\n{}",
        d.log()
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(lines_with(&d, &expected[0].0), 2, "log:\n{}", d.log());
    let mut d = d;
    assert!(d.is_running());
}
