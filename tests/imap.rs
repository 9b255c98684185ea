//! The IMAP source against a real Dovecot started by each test (Debian's `dovecot-imapd`, installed by
//! `.ci/run`): mail delivered with APPEND is taken, left alone, moved, and never taken twice, through
//! restarts, wrong passwords and a recreated mailbox.

mod common;

use std::time::{Duration, Instant};

use common::dovecot::mails::{self, Encoding};
use common::dovecot::{self, Dovecot, OAUTH2_TOKEN, PASSWORD};
use common::imap_server::ImapServer;
use common::{Daemon, Workspace, notice_of, record, wait_until};

/// The daemon's settings for `d`: implicit TLS with the test CA, taken mails moved to `Processed`.
fn imap_config(d: &Dovecot, extra: &str) -> String {
    d.imap_section(extra)
}

/// Skips (with a line saying so) when Dovecot is not installed; CI installs it and sets REQUIRE_DOVECOT,
/// under which a missing Dovecot fails instead.
macro_rules! need_dovecot {
    () => {
        if !dovecot::available() {
            assert!(
                std::env::var_os("REQUIRE_DOVECOT").is_none(),
                "Dovecot is not installed (apt-get install dovecot-imapd)"
            );
            eprintln!("SKIPPED: Dovecot is not installed (apt-get install dovecot-imapd)");
            return;
        }
    };
}

/// Events recorded (0 before the daemon has made its database).
fn events(ws: &Workspace) -> i64 {
    if !ws.db().exists() {
        return 0;
    }
    ws.query_i64("SELECT count(*) FROM events")
}

fn has_event(ws: &Workspace, n: u64) -> bool {
    ws.db().exists()
        && ws.query_i64(&format!(
            "SELECT count(*) FROM events WHERE event_id = '00000000-0000-4000-8000-{n:012}'"
        )) == 1
}

#[test]
fn notices_mailed_before_start_and_while_idle_are_taken_the_second_within_2s() {
    need_dovecot!();
    let d = Dovecot::start();
    d.deliver("INBOX", &mails::notice_mail(&notice_of(1, 3)));
    let ws = Workspace::with_config(&imap_config(&d, r#"processed_mailbox = "Processed""#));
    // At trace level, where a client library would print the commands it sends, LOGIN included.
    let daemon = Daemon::start_with_env(&ws, &[("MASTSUB_LOG__LEVEL", "trace")]);
    assert!(
        wait_until(Duration::from_secs(20), || events(&ws) == 3),
        "the mail sent before start-up was not taken; log:\n{}",
        daemon.log()
    );
    daemon.wait_for_log("waiting with IDLE", Duration::from_secs(10));
    assert!(wait_until(
        Duration::from_secs(10),
        || ws.status()["sources"][0]["state"] == "idle"
    ));

    d.deliver("INBOX", &mails::notice_mail(&notice_of(10, 2)));
    let sent = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || has_event(&ws, 10)
            && has_event(&ws, 11)),
        "the mail sent while idle was not taken; log:\n{}",
        daemon.log()
    );
    let took = sent.elapsed();
    eprintln!("mail sent while idle: ingested {took:?} after APPEND");
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // Both were marked and moved; the notices name their mail.
    assert!(wait_until(Duration::from_secs(5), || d
        .uids("INBOX", "ALL")
        .is_empty()));
    assert_eq!(d.uids("Processed", "SEEN").len(), 2);
    assert_eq!(
        ws.query_i64(
            "SELECT count(*) FROM notices WHERE source_kind = 'imap' AND source_ref LIKE 'imap://notices@127.0.0.1:%/INBOX;UIDVALIDITY=%;UID=% <mastsub-test-%@mast.example>'"
        ),
        2
    );
    assert!(
        wait_until(
            Duration::from_secs(5),
            || ws.status()["sources"][0]["taken"] == 2
        ),
        "{}",
        ws.status()
    );
    assert_eq!(ws.status()["sources"][0]["connected"], true);
    let log = daemon.log();
    assert!(log.contains("TRACE"), "not at trace level");
    assert!(
        d.log()
            .lines()
            .any(|l| l.contains("Login: user=<notices>") && l.contains(", TLS,")),
        "Dovecot logged no login over implicit TLS:\n{}",
        d.log()
    );
    assert!(!log.contains(PASSWORD), "the password was logged");
}

#[test]
fn mail_not_allowed_or_without_a_notice_is_left_alone_and_every_attachment_form_is_taken() {
    need_dovecot!();
    let d = Dovecot::start();
    let not_allowed = mails::mail(
        "\"archive@stsci.edu\" <mallory@evil.example>",
        &[mails::json_part(
            "n.json",
            &notice_of(100, 1),
            Encoding::Base64,
        )],
    );
    let reply_to = String::from_utf8(mails::mail(
        "mallory@evil.example",
        &[mails::json_part(
            "n.json",
            &notice_of(101, 1),
            Encoding::Base64,
        )],
    ))
    .unwrap()
    .replacen("From:", "Reply-To: archive@stsci.edu\r\nFrom:", 1);
    let no_notice = mails::mail("archive@stsci.edu", &[]);
    let two = mails::mail(
        "archive@stsci.edu",
        &[
            mails::json_part("a.json", &notice_of(1, 2), Encoding::Base64),
            mails::json_part("b.json", &notice_of(3, 2), Encoding::QuotedPrintable),
        ],
    );
    let forwarded = mails::forwarded(
        "Colleague <colleague@stsci.edu>",
        &mails::notice_mail(&notice_of(5, 2)),
    );
    for m in [
        &not_allowed,
        reply_to.as_bytes(),
        &no_notice,
        &two,
        &forwarded,
    ] {
        d.deliver("INBOX", m);
    }
    let ws = Workspace::with_config(&imap_config(&d, ""));
    let daemon = Daemon::start(&ws);
    daemon.wait_for_log("waiting with IDLE", Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(10), || events(&ws) == 6),
        "expected the 6 events of the two-attachment and the forwarded mail; got {}; log:\n{}",
        events(&ws),
        daemon.log()
    );
    assert!((1..=6).all(|n| has_event(&ws, n)));
    assert!(!has_event(&ws, 100) && !has_event(&ws, 101));
    // The three mails left alone are still unseen; the two taken are seen (no processed_mailbox).
    assert_eq!(d.uids("INBOX", "UNSEEN"), vec![1, 2, 3]);
    assert_eq!(d.uids("INBOX", "SEEN"), vec![4, 5]);
    // Looked at, not fetched: one summary line for the pass, not a line each.
    let log = daemon.log();
    assert!(
        log.contains(
            "5 new mail(s) looked at, 2 taken; passed over without fetching them: 2 from senders \
             imap.allowed_senders does not name (2 of them with a part that could be a notice, e.g. \
             from mallory@evil.example), 1 with no part that could be a notice"
        ),
        "{log}"
    );
    // Said once: a later wake does not look at them again.
    d.deliver("INBOX", &mails::notice_mail(&notice_of(7, 1)));
    assert!(wait_until(Duration::from_secs(10), || has_event(&ws, 7)));
    assert_eq!(
        daemon
            .log()
            .matches("with no part that could be a notice")
            .count(),
        1,
        "{}",
        daemon.log()
    );
}

#[test]
fn dovecot_restarted_while_idle_reconnects_and_later_mail_is_taken_once() {
    need_dovecot!();
    let mut d = Dovecot::start();
    // STARTTLS on the plain port this time, and the password as a systemd credential.
    let config = imap_config(&d, "password_credential = \"imap-password\"")
        .replace(
            &format!("port = {}", d.tls_port),
            &format!("port = {}", d.port),
        )
        .replace("tls = \"implicit\"", "tls = \"starttls\"")
        .replace(&format!("password = \"{PASSWORD}\"\n"), "");
    let ws = Workspace::with_config(&config);
    let credentials = ws.path("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::write(credentials.join("imap-password"), format!("{PASSWORD}\n")).unwrap();
    let daemon = Daemon::start_with_env(
        &ws,
        &[("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap())],
    );
    d.deliver("INBOX", &mails::notice_mail(&notice_of(1, 2)));
    assert!(
        wait_until(Duration::from_secs(20), || events(&ws) == 2),
        "log:\n{}",
        daemon.log()
    );
    daemon.wait_for_log("waiting with IDLE", Duration::from_secs(10));

    d.stop();
    daemon.wait_for_log("trying again in", Duration::from_secs(20));
    d.start_again();
    // The same notice again (a resend) and a new one.
    d.deliver("INBOX", &mails::notice_mail(&notice_of(1, 2)));
    d.deliver("INBOX", &mails::notice_mail(&notice_of(3, 1)));
    assert!(
        wait_until(Duration::from_secs(60), || has_event(&ws, 3)),
        "no reconnect; log:\n{}",
        daemon.log()
    );
    assert_eq!(events(&ws), 3, "an event was recorded twice");
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM downloads"),
        3,
        "a download was queued twice"
    );
    // Three mails, each taken once (the resend is a mail of its own; its events are not new).
    assert!(
        wait_until(
            Duration::from_secs(5),
            || ws.status()["sources"][0]["taken"] == 3
        ),
        "{}",
        ws.status()
    );
    assert_eq!(
        daemon.log().matches("notice attachment(s)").count(),
        3,
        "{}",
        daemon.log()
    );
    assert!(
        daemon.log().matches("connected,").count() >= 2,
        "{}",
        daemon.log()
    );
}

#[test]
fn a_wrong_password_is_tried_again_after_minutes_said_once_and_a_sighup_after_the_fix_logs_in_at_once()
 {
    need_dovecot!();
    let d = Dovecot::start();
    let ws0 = Workspace::new();
    let password_file = ws0.path("imap-password");
    std::fs::write(&password_file, "wrong-password-77\n").unwrap();
    let config = imap_config(&d, "").replace(
        &format!("password = \"{PASSWORD}\""),
        &format!("password_file = {:?}", password_file.display().to_string()),
    );
    let ws = Workspace::with_config(&config);
    let daemon = Daemon::start_watching(&ws);
    daemon.wait_for_log(
        "the server refused the login for notices: check imap.username and the password (the server \
         said: ",
        Duration::from_secs(20),
    );
    daemon.wait_for_log("; trying again in ", Duration::from_secs(5));
    // Minutes, not seconds: 5 min and a jitter of up to as much again.
    let log = daemon.log();
    let pause = log
        .lines()
        .find_map(|l| l.split("; trying again in ").nth(1))
        .unwrap();
    let pause = humantime::parse_duration(pause.trim()).unwrap();
    assert!(
        pause >= Duration::from_secs(300) && pause <= Duration::from_secs(600),
        "{pause:?}"
    );
    ws.drop_notice("by-hand.json", &notice_of(1, 2));
    assert!(
        wait_until(Duration::from_secs(10), || events(&ws) == 2),
        "the inbox stopped working; log:\n{}",
        daemon.log()
    );
    // One refused login, not one every few seconds: a directory that locks accounts after a few
    // failures must not lock this one.
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        d.failed_logins(),
        1,
        "Dovecot's log:\n{}\nmastsub's log:\n{}",
        d.log(),
        daemon.log()
    );
    assert_eq!(daemon.log().matches("refused the login").count(), 1);
    let status = ws.status();
    let imap = &status["sources"][0];
    assert_eq!(imap["connected"], false, "{status}");
    assert_eq!(imap["state"], "login refused", "{status}");
    let error = imap["last_error"].as_str().unwrap();
    assert!(
        error.contains("check imap.username and the password") && error.contains("(next try in "),
        "{status}"
    );
    assert!(
        !error.contains("code:") && !error.contains("Some("),
        "{error}"
    );
    let text = ws.cmd().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("imap: login refused"), "{text}");
    assert!(!daemon.log().contains("wrong-password-77") && !text.contains("wrong-password-77"));
    // The operator fixes the password and reloads: mastsub logs in now, not in five minutes.
    std::fs::write(&password_file, format!("{PASSWORD}\n")).unwrap();
    d.deliver("INBOX", &mails::notice_mail(&notice_of(10, 1)));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || has_event(&ws, 10)),
        "no login after the fix and SIGHUP; log:\n{}",
        daemon.log()
    );
}

#[test]
fn a_recreated_mailbox_with_a_new_uidvalidity_misses_nothing_and_takes_nothing_twice() {
    need_dovecot!();
    let d = Dovecot::start();
    let mut c = d.client();
    c.ok("CREATE Notices");
    c.logout();
    let first = mails::notice_mail(&notice_of(1, 2));
    let second = mails::notice_mail(&notice_of(3, 2));
    d.deliver("Notices", &first);
    d.deliver("Notices", &second);
    let ws = Workspace::with_config(&imap_config(&d, r#"mailbox = "Notices""#));
    let daemon = Daemon::start(&ws);
    assert!(
        wait_until(Duration::from_secs(20), || events(&ws) == 4),
        "log:\n{}",
        daemon.log()
    );
    daemon.wait_for_log("waiting with IDLE", Duration::from_secs(10));

    let mut c = d.client();
    c.ok("DELETE Notices");
    c.ok("CREATE Notices");
    c.append("Notices", &first);
    c.append("Notices", &second);
    c.append("Notices", &mails::notice_mail(&notice_of(5, 1)));
    c.logout();
    assert!(
        wait_until(Duration::from_secs(60), || has_event(&ws, 5)),
        "the mail in the recreated mailbox was missed; log:\n{}\nDovecot's log:\n{}",
        daemon.log(),
        d.log()
    );
    daemon.wait_for_log("UIDVALIDITY changed", Duration::from_secs(5));
    assert_eq!(events(&ws), 5, "an event was recorded twice");
    assert_eq!(ws.query_i64("SELECT count(*) FROM notices"), 3);
}

#[test]
fn fifty_mixed_mails_give_exactly_the_expected_notices() {
    need_dovecot!();
    let d = Dovecot::start();
    let mut c = d.client();
    let mut expected_events = std::collections::BTreeSet::new();
    let (mut taken, mut left) = (0, 0);
    let mut n = 1000u64;
    for i in 0..50u64 {
        let mail = match i % 7 {
            0 => {
                expected_events.extend(n..n + 3);
                mails::notice_mail(&notice_of(n, 3))
            }
            1 => {
                expected_events.extend(n..n + 2);
                mails::mail(
                    "archive@stsci.edu",
                    &[mails::json_part(
                        "q.json",
                        &notice_of(n, 2),
                        Encoding::QuotedPrintable,
                    )],
                )
            }
            2 => {
                expected_events.extend(n..n + 2);
                mails::forwarded("x@stsci.edu", &mails::notice_mail(&notice_of(n, 2)))
            }
            3 => mails::mail("archive@stsci.edu", &[]),
            4 => mails::mail(
                "someone@else.example",
                &[mails::json_part(
                    "n.json",
                    &notice_of(n, 1),
                    Encoding::Base64,
                )],
            ),
            5 => {
                // A notice with one bad record: the good one is recorded.
                expected_events.insert(n);
                let mut bad = record(n + 1, "New");
                // (an unknown type is recorded; one that cannot be a type name is refused)
                bad["event_type"] = "Side\nways".into();
                let body = serde_json::to_vec(&[record(n, "New"), bad]).unwrap();
                mails::notice_mail(&body)
            }
            _ => {
                // The same notice as an earlier mail: nothing new.
                mails::notice_mail(&notice_of(1000, 3))
            }
        };
        if matches!(i % 7, 3 | 4) {
            left += 1;
        } else {
            taken += 1;
        }
        c.append("INBOX", &mail);
        n += 10;
    }
    c.logout();
    let ws = Workspace::with_config(&imap_config(&d, r#"processed_mailbox = "Processed""#));
    let daemon = Daemon::start(&ws);
    assert!(
        wait_until(Duration::from_secs(60), || d.uids("Processed", "ALL").len()
            == taken),
        "log:\n{}",
        daemon.log()
    );
    let got: std::collections::BTreeSet<u64> = ws
        .query_column_i64("SELECT CAST(substr(event_id, 25) AS INTEGER) FROM events")
        .into_iter()
        .map(|n| n as u64)
        .collect();
    assert_eq!(got, expected_events);
    assert_eq!(d.uids("INBOX", "ALL").len(), left);
    assert!(
        wait_until(
            Duration::from_secs(5),
            || ws.status()["sources"][0]["taken"] == taken as u64
        ),
        "{}",
        ws.status()
    );
    assert!(
        daemon
            .log()
            .contains(r#""Side\nways" is not an event type"#),
        "the bad record was not reported"
    );
}

#[test]
fn a_certificate_from_an_unknown_ca_is_refused_with_a_clear_error() {
    need_dovecot!();
    let d = Dovecot::start();
    let config =
        imap_config(&d, "").replace(&format!("ca_file = \"{}\"\n", d.ca_file.display()), "");
    let ws = Workspace::with_config(&config);
    d.deliver("INBOX", &mails::notice_mail(&notice_of(1, 1)));
    let daemon = Daemon::start(&ws);
    daemon.wait_for_log("imap.tls_fingerprint", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        events(&ws),
        0,
        "a mail was read over an unverified connection"
    );
    // The test's own delivery logs in over plain loopback ("secured"); mastsub would come over TLS.
    assert!(
        !d.log()
            .lines()
            .any(|l| l.contains("Login: user=<notices>") && l.contains(", TLS,")),
        "mastsub logged in over an unverified connection:\n{}",
        d.log()
    );
}

#[test]
fn without_idle_the_mailbox_is_polled_and_mail_over_the_size_limit_is_left_alone() {
    need_dovecot!();
    let d = Dovecot::start();
    let ws = Workspace::with_config(&imap_config(
        &d,
        "idle = false\npoll_interval = \"1s\"\nmax_message_size = \"4KiB\"",
    ));
    let daemon = Daemon::start(&ws);
    daemon.wait_for_log("polling every 1s", Duration::from_secs(20));
    let big = mails::notice_mail(&notice_of(1, 20));
    assert!(big.len() > 4096);
    d.deliver("INBOX", &big);
    d.deliver("INBOX", &mails::notice_mail(&notice_of(50, 1)));
    assert!(
        wait_until(Duration::from_secs(10), || has_event(&ws, 50)),
        "the mailbox was not polled; log:\n{}",
        daemon.log()
    );
    assert_eq!(events(&ws), 1);
    assert!(
        daemon.log().contains("more than imap.max_message_size"),
        "{}",
        daemon.log()
    );
    assert_eq!(d.uids("INBOX", "UNSEEN"), vec![1]);
}

#[test]
fn xoauth2_reads_the_token_anew_at_every_connection() {
    need_dovecot!();
    let d = Dovecot::start();
    let ws = Workspace::with_config("");
    let token_file = ws.path("token");
    std::fs::write(&token_file, "an-expired-token\n").unwrap();
    let config = imap_config(
        &d,
        &format!("oauth2_token_command = \"cat '{}'\"", token_file.display()),
    )
    .replace(&format!("password = \"{PASSWORD}\"\n"), "");
    std::fs::write(
        &ws.config,
        format!("{}\n{config}", std::fs::read_to_string(&ws.config).unwrap()),
    )
    .unwrap();
    d.deliver("INBOX", &mails::notice_mail(&notice_of(1, 2)));
    let daemon = Daemon::start_with_env(&ws, &[("MASTSUB_LOG__LEVEL", "trace")]);
    daemon.wait_for_log(
        "the server refused the login for notices: check imap.username and the OAuth2 token",
        Duration::from_secs(20),
    );
    // A refreshed token: the next connection uses it; a refused login waits minutes, or a reload.
    std::fs::write(&token_file, format!("{OAUTH2_TOKEN}\n")).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || events(&ws) == 2),
        "log:\n{}\nDovecot's log:\n{}",
        daemon.log(),
        d.log()
    );
    let log = daemon.log();
    assert!(
        !log.contains(OAUTH2_TOKEN) && !log.contains("an-expired-token"),
        "{log}"
    );
}

#[test]
fn without_move_taken_mails_are_copied_then_expunged() {
    need_dovecot!();
    // Dovecot's own list without MOVE: mastsub must fall back to COPY, \Deleted and UID EXPUNGE.
    let d = Dovecot::start_with(
        "imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ UIDPLUS",
    );
    for n in [1, 3] {
        d.deliver("INBOX", &mails::notice_mail(&notice_of(n, 2)));
    }
    let ws = Workspace::with_config(&imap_config(&d, r#"processed_mailbox = "Processed""#));
    let daemon = Daemon::start(&ws);
    assert!(
        wait_until(Duration::from_secs(20), || d.uids("Processed", "ALL").len()
            == 2),
        "log:\n{}",
        daemon.log()
    );
    assert!(wait_until(Duration::from_secs(5), || d
        .uids("INBOX", "ALL")
        .is_empty()));
    assert_eq!(events(&ws), 4);
    daemon.wait_for_log(
        "copied to Processed and expunged (UID EXPUNGE)",
        Duration::from_secs(5),
    );
    assert!(!daemon.log().contains("(EXPUNGE)"));
}

#[test]
fn without_uid_expunge_a_mail_someone_else_marked_deleted_is_not_expunged() {
    need_dovecot!();
    // Neither MOVE nor UIDPLUS: a plain EXPUNGE would remove every mail marked \Deleted.
    let d = Dovecot::start_with(
        "imap_capability = IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+",
    );
    let mut c = d.client();
    c.append("INBOX", &mails::mail("colleague@stsci.edu", &[]));
    c.ok("SELECT INBOX");
    c.ok("UID STORE 1 +FLAGS (\\Deleted)");
    c.logout();
    d.deliver("INBOX", &mails::notice_mail(&notice_of(1, 2)));
    let ws = Workspace::with_config(&imap_config(&d, r#"processed_mailbox = "Processed""#));
    let daemon = Daemon::start(&ws);
    daemon.wait_for_log("other mails are marked \\Deleted", Duration::from_secs(20));
    assert_eq!(events(&ws), 2);
    assert_eq!(d.uids("Processed", "ALL").len(), 1);
    assert_eq!(
        d.uids("INBOX", "DELETED"),
        vec![1, 2],
        "the colleague's mail was expunged"
    );

    // Once nobody else's mail is marked, the plain EXPUNGE is used.
    let mut c = d.client();
    c.ok("SELECT INBOX");
    c.ok("UID STORE 1:2 -FLAGS (\\Deleted)");
    c.logout();
    d.deliver("INBOX", &mails::notice_mail(&notice_of(3, 1)));
    daemon.wait_for_log(
        "copied to Processed and expunged (EXPUNGE)",
        Duration::from_secs(10),
    );
    assert_eq!(d.uids("INBOX", "ALL"), vec![1, 2]);
    assert_eq!(events(&ws), 3);
}
