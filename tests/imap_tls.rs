//! TLS with the certificates people make (with the `openssl` command, `common::certs`), against a real
//! Dovecot and the real daemon: self-signed CA:TRUE with and without subjectAltName, CA:FALSE, a private
//! CA, and a pin are taken; a wrong name, a wrong pin, an unknown self-signed certificate, an expired one
//! and implicit TLS on the plain port are refused with a sentence that says what to do.

mod common;

use std::path::Path;
use std::time::Duration;

use common::certs::{self, Made};
use common::dovecot::mails;
use common::dovecot::{self, Dovecot, PASSWORD, USER};
use common::{Daemon, Workspace, notice_of, wait_until};

/// The daemon's settings for `d`: `tls` on the matching port, host "localhost", `ca_file` if given.
fn imap_config(d: &Dovecot, tls: &str, ca_file: Option<&Path>, extra: &str) -> String {
    let port = if tls == "implicit" {
        d.tls_port
    } else {
        d.port
    };
    let ca = ca_file
        .map(|p| format!("ca_file = \"{}\"\n", p.display()))
        .unwrap_or_default();
    format!(
        r#"
[imap]
enabled = true
host = "localhost"
port = {port}
tls = "{tls}"
{ca}username = "{USER}"
password = "{PASSWORD}"
allowed_senders = ["@stsci.edu"]
timeout = "5s"
{extra}
"#
    )
}

/// Skips (with a line saying so) when Dovecot or openssl is not installed; under REQUIRE_DOVECOT (CI) a
/// missing Dovecot fails instead.
macro_rules! need_dovecot {
    () => {
        if !dovecot::available() || !certs::available() {
            assert!(
                std::env::var_os("REQUIRE_DOVECOT").is_none(),
                "Dovecot or openssl is not installed (apt-get install dovecot-imapd openssl)"
            );
            eprintln!("SKIPPED: Dovecot or openssl is not installed");
            return;
        }
    };
}

/// Whether the daemon has made its database (the file appears before its tables).
fn has_db(ws: &Workspace) -> bool {
    ws.db().exists()
        && ws.query_i64(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'events'",
        ) == 1
}

fn events(ws: &Workspace) -> i64 {
    if !has_db(ws) {
        return 0;
    }
    ws.query_i64("SELECT count(*) FROM events")
}

fn has_event(ws: &Workspace, n: u64) -> bool {
    has_db(ws)
        && ws.query_i64(&format!(
            "SELECT count(*) FROM events WHERE event_id = '00000000-0000-4000-8000-{n:012}'"
        )) == 1
}

/// Delivers notice `n`, runs a daemon with `config`, and asserts it takes the notice.
fn takes(d: &Dovecot, what: &str, config: &str, n: u64) {
    d.deliver("INBOX", &mails::notice_mail(&notice_of(n, 1)));
    let ws = Workspace::with_config(config);
    let mut daemon = Daemon::start(&ws);
    assert!(
        wait_until(Duration::from_secs(20), || has_event(&ws, n)),
        "{what}: the notice was not taken; log:\n{}\nDovecot:\n{}",
        daemon.log(),
        d.log()
    );
    daemon.terminate();
}

/// Delivers notice `n`, runs a daemon with `config`, waits for its TLS error, asserts it took nothing;
/// returns the error as `mastsub status` shows it (its text output, then `last_error` of `--json`).
fn refused(d: &Dovecot, what: &str, config: &str, n: u64) -> String {
    d.deliver("INBOX", &mails::notice_mail(&notice_of(n, 1)));
    let ws = Workspace::with_config(config);
    let daemon = Daemon::start(&ws);
    daemon.wait_for_log("TLS with localhost failed", Duration::from_secs(20));
    let mut last_error = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            last_error = ws.status()["sources"][0]["last_error"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            last_error.contains("TLS with localhost failed")
        }),
        "{what}: status shows no TLS error: {}",
        ws.status()
    );
    let text = ws.cmd().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert_eq!(
        events(&ws),
        0,
        "{what}: a mail was read; log:\n{}",
        daemon.log()
    );
    let log: String = daemon
        .log()
        .lines()
        .filter(|l| l.contains("TLS with"))
        .collect();
    for shown in [&text, &last_error, &log] {
        for debug in [
            "Other(",
            "OtherError",
            "InvalidContentType",
            "CaUsedAsEndEntity",
            "{ ",
        ] {
            assert!(!shown.contains(debug), "{what}: {debug:?} shown:\n{shown}");
        }
    }
    format!("{text}\n{last_error}")
}

/// openssl's "sha256:AB:CD:…" as mastsub prints a fingerprint: "sha256:abcd…".
fn printed(fingerprint: &str) -> String {
    fingerprint
        .replace(':', "")
        .replacen("sha256", "sha256:", 1)
        .to_lowercase()
}

#[test]
fn a_self_signed_ca_true_certificate_without_subject_alt_name_works_listed_pinned_and_over_starttls()
 {
    need_dovecot!();
    let dir = tempfile::tempdir().unwrap();
    let a = certs::self_signed_ca_true_no_san(dir.path());
    let other = certs::self_signed_ca_true_san(dir.path());
    let d = Dovecot::start_with_cert(a.server.clone());

    takes(
        &d,
        "(a) in ca_file",
        &imap_config(&d, "implicit", Some(&a.ca_file), ""),
        1,
    );
    takes(
        &d,
        "(a) over STARTTLS",
        &imap_config(&d, "starttls", Some(&a.ca_file), ""),
        2,
    );
    let pin = format!("tls_fingerprint = \"{}\"", a.fingerprint);
    takes(
        &d,
        "(a) pinned",
        &imap_config(&d, "implicit", None, &pin),
        3,
    );
    // openssl's lower-case form, without colons, works too.
    let pin = format!("tls_fingerprint = \"{}\"", printed(&a.fingerprint));
    takes(
        &d,
        "(a) pinned, lower case",
        &imap_config(&d, "implicit", None, &pin),
        4,
    );

    // Not listed: another self-signed certificate is in ca_file.
    let text = refused(
        &d,
        "(a) not listed",
        &imap_config(&d, "implicit", Some(&other.ca_file), ""),
        10,
    );
    let expected = format!(
        "TLS with localhost failed: the certificate of localhost:{} is self-signed and not signed by a \
         CA in imap.ca_file {}: if the server's certificate is self-signed, put that certificate \
         itself in imap.ca_file, or pin it with imap.tls_fingerprint = \"{}\"",
        d.tls_port,
        other.ca_file.display(),
        printed(&a.fingerprint)
    );
    assert!(
        text.contains(&expected),
        "expected:\n{expected}\ngot:\n{text}"
    );

    // A wrong pin: both fingerprints, even with the right certificate in ca_file.
    let pin = format!("tls_fingerprint = \"{}\"", other.fingerprint);
    let text = refused(
        &d,
        "a wrong pin",
        &imap_config(&d, "implicit", Some(&a.ca_file), &pin),
        11,
    );
    let expected = format!(
        "the certificate of localhost:{} has the fingerprint {}, not {} as imap.tls_fingerprint says",
        d.tls_port,
        printed(&a.fingerprint),
        printed(&other.fingerprint)
    );
    assert!(
        text.contains(&expected),
        "expected:\n{expected}\ngot:\n{text}"
    );

    // Implicit TLS on the plain port.
    let mut config = imap_config(&d, "implicit", Some(&a.ca_file), "");
    config = config.replace(
        &format!("port = {}", d.tls_port),
        &format!("port = {}", d.port),
    );
    let text = refused(&d, "implicit TLS on the plain port", &config, 12);
    let expected = format!(
        "TLS with localhost failed: localhost:{} did not answer TLS; port 143 speaks plain IMAP first: \
         set imap.tls = \"starttls\"",
        d.port
    );
    assert!(
        text.contains(&expected),
        "expected:\n{expected}\ngot:\n{text}"
    );
}

#[test]
fn ca_true_with_subject_alt_name_ca_false_and_a_private_ca_are_taken() {
    need_dovecot!();
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, Made); 3] = [
        (
            "(b) CA:TRUE with subjectAltName",
            certs::self_signed_ca_true_san(dir.path()),
        ),
        ("(c) CA:FALSE", certs::self_signed_ca_false(dir.path())),
        ("(d) a private CA", certs::private_ca(dir.path())),
    ];
    for (i, (what, made)) in cases.iter().enumerate() {
        let d = Dovecot::start_with_cert(made.server.clone());
        takes(
            &d,
            what,
            &imap_config(&d, "implicit", Some(&made.ca_file), ""),
            20 + i as u64,
        );
    }
}

#[test]
fn a_certificate_for_another_name_or_expired_is_refused_with_a_sentence() {
    need_dovecot!();
    let dir = tempfile::tempdir().unwrap();
    let wrong = certs::wrong_name(dir.path());
    let d = Dovecot::start_with_cert(wrong.server.clone());
    let text = refused(
        &d,
        "(e) another name",
        &imap_config(&d, "implicit", Some(&wrong.ca_file), ""),
        30,
    );
    let expected = format!(
        "TLS with localhost failed: the certificate of localhost:{} names mail.example.org, not \
         localhost: set imap.host to a name it gives",
        d.tls_port
    );
    assert!(
        text.contains(&expected),
        "expected:\n{expected}\ngot:\n{text}"
    );
    assert!(!text.contains("for a private CA"), "{text}");
    drop(d);

    let old = certs::expired(dir.path());
    let d = Dovecot::start_with_cert(old.server.clone());
    let text = refused(
        &d,
        "(f) expired",
        &imap_config(&d, "implicit", Some(&old.ca_file), ""),
        31,
    );
    let expected = format!(
        "the certificate of localhost:{} expired on 2020-12-31 00:00:00 UTC (its fingerprint is {})",
        d.tls_port,
        printed(&old.fingerprint)
    );
    assert!(
        text.contains(&expected),
        "expected:\n{expected}\ngot:\n{text}"
    );
}
