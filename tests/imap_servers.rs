//! The IMAP source against the servers people run, not only Dovecot: GNU Mailutils imap4d and Cyrus
//! (Debian's stock hierarchy: personal folders under `INBOX.`), each a real server started by the test.
//! The same checks for each: mail before start and during IDLE, every mail shape a notice arrives in, the
//! processed folder written with `/`, a restart that really ends the sessions, and the certificates
//! people make (self-signed CA:TRUE and CA:FALSE, a private CA, a host-name mismatch).

mod common;

use std::io::Write;
use std::time::Duration;

use common::certs;
use common::cyrus::{self, Cyrus};
use common::dovecot::mails::{self, Encoding};
use common::dovecot::{self, Dovecot};
use common::imap_server::{ImapServer, ServerCert};
use common::imap4d::{self, Imap4d};
use common::{Daemon, Workspace, notice_of, wait_until};

/// Skips (saying so) when `$available` is false, unless `$require` is set, as CI does.
macro_rules! need {
    ($available:expr, $require:literal, $what:literal) => {
        if !$available {
            assert!(
                std::env::var_os($require).is_none(),
                concat!($what, " is not installed (see .ci/run)")
            );
            eprintln!(concat!(
                "SKIPPED: ",
                $what,
                " is not installed (see .ci/run)"
            ));
            return;
        }
    };
}

/// The daemon's `[imap]` for `s`: `tls` on the matching port, `ca_file` as given.
fn imap_config(s: &dyn ImapServer, tls: &str, ca_file: &std::path::Path, extra: &str) -> String {
    let port = if tls == "implicit" {
        s.tls_port()
    } else {
        s.port()
    };
    format!(
        r#"
[imap]
enabled = true
host = "localhost"
port = {port}
tls = "{tls}"
ca_file = "{ca}"
username = "{user}"
password = "{password}"
allowed_senders = ["@stsci.edu"]
timeout = "5s"
poll_interval = "2s"
{extra}
"#,
        ca = ca_file.display(),
        user = s.user(),
        password = s.password(),
    )
}

/// Whether the daemon has made its tables yet.
fn ready(ws: &Workspace) -> bool {
    ws.db().exists()
        && ws.query_i64(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'events'",
        ) == 1
}

fn has_event(ws: &Workspace, n: u64) -> bool {
    ready(ws)
        && ws.query_i64(&format!(
            "SELECT count(*) FROM events WHERE event_id = '00000000-0000-4000-8000-{n:012}'"
        )) == 1
}

fn events(ws: &Workspace) -> i64 {
    if !ready(ws) {
        return 0;
    }
    ws.query_i64("SELECT count(*) FROM events")
}

fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    let text = base64::engine::general_purpose::STANDARD.encode(bytes);
    text.as_bytes()
        .chunks(76)
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, bytes) in entries {
        w.start_file(
            *name,
            zip::write::SimpleFileOptions::default()
                .compression_method(zip::CompressionMethod::Deflated),
        )
        .unwrap();
        w.write_all(bytes).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// A binary attachment part.
fn binary_part(content_type: &str, disposition: &str, bytes: &[u8]) -> String {
    format!(
        "Content-Type: {content_type}\r\nContent-Disposition: {disposition}\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n",
        base64(bytes)
    )
}

/// Every shape a notice arrives in, each with notices of its own: (what, the mail, the event numbers).
fn mail_shapes(base: u64) -> Vec<(&'static str, Vec<u8>, Vec<u64>)> {
    let from = "MAST Notifications <archive@stsci.edu>";
    let n = |k: u64| base + k * 10;
    let single = format!(
        "From: {from}\r\nTo: notices@archive.example\r\nSubject: MAST notice single\r\n\
         Message-ID: <single-{base}@mast.example>\r\nMIME-Version: 1.0\r\n\
         Content-Type: application/json\r\nContent-Transfer-Encoding: base64\r\n\r\n{}\r\n",
        base64(&notice_of(n(3), 1))
    )
    .into_bytes();
    vec![
        (
            "octet-stream .json, quoted-printable",
            mails::mail(
                from,
                &[mails::json_part(
                    "event_metadata.json",
                    &notice_of(n(0), 1),
                    Encoding::QuotedPrintable,
                )],
            ),
            vec![n(0)],
        ),
        (
            "an RFC 2231 name",
            mails::mail(
                from,
                &[binary_part(
                    "application/octet-stream",
                    "attachment; filename*0*=UTF-8''event%20meta; filename*1*=data%C3%A9.json",
                    &notice_of(n(1), 1),
                )],
            ),
            vec![n(1)],
        ),
        (
            "inline",
            mails::mail(
                from,
                &[binary_part(
                    "application/json; name=\"notice.json\"",
                    "inline; filename=\"notice.json\"",
                    &notice_of(n(2), 1),
                )],
            ),
            vec![n(2)],
        ),
        ("single-part application/json", single, vec![n(3)]),
        (
            "forwarded",
            mails::forwarded(
                "Colleague <colleague@stsci.edu>",
                &mails::notice_mail(&notice_of(n(4), 1)),
            ),
            vec![n(4)],
        ),
        (
            ".json.gz",
            mails::mail(
                from,
                &[binary_part(
                    "application/gzip; name=\"event_metadata.json.gz\"",
                    "attachment; filename=\"event_metadata.json.gz\"",
                    &gzip(&notice_of(n(5), 1)),
                )],
            ),
            vec![n(5)],
        ),
        (
            ".zip",
            mails::mail(
                from,
                &[binary_part(
                    "application/zip; name=\"notices.zip\"",
                    "attachment; filename=\"notices.zip\"",
                    &zip_of(&[
                        ("a.json", &notice_of(n(6), 1)),
                        ("readme.txt", b"not a notice"),
                        ("b.json", &notice_of(n(7), 1)),
                    ]),
                )],
            ),
            vec![n(6), n(7)],
        ),
    ]
}

/// Mail before start (every shape, and one from a stranger), the processed folder written with `/`, mail
/// during IDLE, a restart that ends every session, and mail after it: each notice taken once.
fn takes_every_shape_through_a_restart(s: &mut dyn ImapServer, ca_file: &std::path::Path) {
    let shapes = mail_shapes(100);
    for (_, mail, _) in &shapes {
        s.deliver("INBOX", mail);
    }
    s.deliver(
        "INBOX",
        &mails::mail(
            "Stranger <someone@elsewhere.example>",
            &[mails::json_part(
                "n.json",
                &notice_of(900, 1),
                Encoding::Base64,
            )],
        ),
    );
    let ws = Workspace::with_config(&imap_config(
        &*s,
        "implicit",
        ca_file,
        r#"processed_mailbox = "MAST/processed""#,
    ));
    let daemon = Daemon::start(&ws);
    for (what, _, numbers) in &shapes {
        assert!(
            wait_until(Duration::from_secs(30), || numbers
                .iter()
                .all(|n| has_event(&ws, *n))),
            "{}: the notice ({what}) mailed before start was not taken; log:\n{}\nserver log:\n{}",
            s.name(),
            daemon.log(),
            s.log()
        );
    }
    assert!(!has_event(&ws, 900), "a stranger's notice was taken");
    // Taken mail moved to the processed folder, under the server's own name for it.
    let processed = s.mailbox_name("MAST/processed");
    assert!(
        wait_until(Duration::from_secs(10), || s.uids(&processed, "ALL").len()
            == shapes.len()),
        "{}: {processed} holds {:?}; INBOX {:?}; log:\n{}",
        s.name(),
        s.uids(&processed, "ALL"),
        s.uids("INBOX", "ALL"),
        daemon.log()
    );
    assert_eq!(
        s.uids("INBOX", "ALL").len(),
        1,
        "only the stranger's mail stays"
    );
    let log = daemon.log();
    assert!(
        !log.contains("cannot create imap.processed_mailbox"),
        "{}: {log}",
        s.name()
    );

    // During IDLE (or polling, where the server offers no IDLE).
    daemon.wait_for_log("selected", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(500));
    s.deliver("INBOX", &mails::notice_mail(&notice_of(300, 1)));
    assert!(
        wait_until(Duration::from_secs(20), || has_event(&ws, 300)),
        "{}: the mail sent while waiting was not taken; log:\n{}",
        s.name(),
        daemon.log()
    );

    // A restart that ends every session, once that mail is moved (a restart in the middle of a COPY and
    // EXPUNGE may leave a second copy in the processed folder: the notice is still recorded once); mail
    // delivered while it was down and after.
    assert!(
        wait_until(Duration::from_secs(10), || s.uids(&processed, "ALL").len()
            == shapes.len() + 1),
        "{}: the mail taken while waiting was not moved; log:\n{}",
        s.name(),
        daemon.log()
    );
    s.stop();
    daemon.wait_for_log("trying again in", Duration::from_secs(30));
    s.start_again();
    s.deliver("INBOX", &mails::notice_mail(&notice_of(301, 1)));
    // The same notice again (a resend): a mail of its own, its events not new.
    s.deliver("INBOX", &mails::notice_mail(&notice_of(300, 1)));
    assert!(
        wait_until(Duration::from_secs(60), || has_event(&ws, 301)),
        "{}: no reconnect after the restart; log:\n{}",
        s.name(),
        daemon.log()
    );
    let expected: i64 = shapes.iter().map(|(_, _, n)| n.len() as i64).sum::<i64>() + 2;
    assert_eq!(
        events(&ws),
        expected,
        "{}: an event twice or missing",
        s.name()
    );
    assert!(
        wait_until(Duration::from_secs(10), || s.uids(&processed, "ALL").len()
            == shapes.len() + 3),
        "{}: {processed} holds {:?}; log:\n{}",
        s.name(),
        s.uids(&processed, "ALL"),
        daemon.log()
    );
    // What mastsub says (not what its libraries trace at debug level) has no Rust debug structures.
    let log = daemon.log();
    for line in log
        .lines()
        .filter(|l| l.contains(" INFO ") || l.contains(" WARN ") || l.contains(" ERROR "))
    {
        for bad in ["code:", "Some(", "Outcome {", "Error(", "None"] {
            assert!(
                !line.contains(bad),
                "{}: a debug structure in: {line}",
                s.name()
            );
        }
    }
}

/// One daemon against `s`, until it takes a notice (`Ok`) or logs `refusal` (`Err` with the log).
fn try_certificate(
    s: &dyn ImapServer,
    tls: &str,
    ca_file: &std::path::Path,
    extra: &str,
    n: u64,
) -> Result<(), String> {
    s.deliver("INBOX", &mails::notice_mail(&notice_of(n, 1)));
    let ws = Workspace::with_config(&imap_config(s, tls, ca_file, extra));
    let daemon = Daemon::start(&ws);
    let outcome = wait_until(Duration::from_secs(20), || {
        has_event(&ws, n) || daemon.log().contains("trying again in")
    });
    assert!(
        outcome,
        "{}: neither taken nor refused:\n{}",
        s.name(),
        daemon.log()
    );
    if has_event(&ws, n) {
        Ok(())
    } else {
        Err(daemon.log())
    }
}

/// The certificates people make, on `start(cert)`'s server: CA:TRUE self-signed (the `openssl req -x509`
/// default, no subjectAltName) listed in `ca_file`, CA:FALSE self-signed, a private CA, a pin, and a
/// certificate for another name, refused with a sentence naming the names.
fn certificates_people_make(start: &dyn Fn(ServerCert) -> Box<dyn ImapServer>) {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "CA:TRUE, no subjectAltName",
            certs::self_signed_ca_true_no_san(dir.path()),
        ),
        ("CA:FALSE", certs::self_signed_ca_false(dir.path())),
        ("a private CA", certs::private_ca(dir.path())),
    ];
    for (i, (what, made)) in cases.iter().enumerate() {
        let s = start(made.server.clone());
        for (j, tls) in ["implicit", "starttls"].iter().enumerate() {
            let n = 500 + (i * 10 + j) as u64;
            if let Err(log) = try_certificate(&*s, tls, &made.ca_file, "", n) {
                panic!(
                    "{}: {what} over {tls} refused:\n{log}\nserver:\n{}",
                    s.name(),
                    s.log()
                );
            }
        }
        if i == 0 {
            // Pinned by the fingerprint openssl prints, without ca_file.
            let pin = format!("tls_fingerprint = \"{}\"", made.fingerprint);
            let n = 600;
            s.deliver("INBOX", &mails::notice_mail(&notice_of(n, 1)));
            let ws = Workspace::with_config(
                &imap_config(&*s, "implicit", &made.ca_file, &pin)
                    .replace(&format!("ca_file = \"{}\"\n", made.ca_file.display()), ""),
            );
            let daemon = Daemon::start(&ws);
            assert!(
                wait_until(Duration::from_secs(20), || has_event(&ws, n)),
                "{}: the pinned certificate was refused:\n{}",
                s.name(),
                daemon.log()
            );
        }
    }
    let wrong = certs::wrong_name(dir.path());
    let s = start(wrong.server.clone());
    let log = try_certificate(&*s, "implicit", &wrong.ca_file, "", 700)
        .expect_err("a certificate for another name was accepted");
    assert!(
        log.contains("mail.example.org") && log.contains("imap.host"),
        "{}: the mismatch is not said plainly:\n{log}",
        s.name()
    );
    assert!(!log.contains("for a private CA set imap.ca_file"), "{log}");
}

// Dovecot.

#[test]
fn dovecot_takes_every_shape_through_a_restart() {
    need!(dovecot::available(), "REQUIRE_DOVECOT", "Dovecot");
    let dir = tempfile::tempdir().unwrap();
    let made = certs::self_signed_ca_true_no_san(dir.path());
    let mut s = Dovecot::start_with_cert(made.server.clone());
    takes_every_shape_through_a_restart(&mut s, &made.ca_file);
}

#[test]
fn dovecot_certificates_people_make() {
    need!(dovecot::available(), "REQUIRE_DOVECOT", "Dovecot");
    certificates_people_make(&|c| Box::new(Dovecot::start_with_cert(c)));
}

// GNU Mailutils imap4d.

#[test]
fn imap4d_takes_every_shape_through_a_restart() {
    need!(
        imap4d::available(),
        "REQUIRE_IMAP4D",
        "GNU Mailutils imap4d"
    );
    let dir = tempfile::tempdir().unwrap();
    let made = certs::self_signed_ca_true_no_san(dir.path());
    let mut s = Imap4d::start_with_cert(made.server.clone());
    takes_every_shape_through_a_restart(&mut s, &made.ca_file);
}

#[test]
fn imap4d_certificates_people_make() {
    need!(
        imap4d::available(),
        "REQUIRE_IMAP4D",
        "GNU Mailutils imap4d"
    );
    certificates_people_make(&|c| Box::new(Imap4d::start_with_cert(c)));
}

// Cyrus.

#[test]
fn cyrus_takes_every_shape_through_a_restart() {
    need!(cyrus::available(), "REQUIRE_CYRUS", "Cyrus");
    let dir = tempfile::tempdir().unwrap();
    let made = certs::self_signed_ca_true_no_san(dir.path());
    let mut s = Cyrus::start_with_cert(made.server.clone());
    takes_every_shape_through_a_restart(&mut s, &made.ca_file);
}

#[test]
fn cyrus_certificates_people_make() {
    need!(cyrus::available(), "REQUIRE_CYRUS", "Cyrus");
    certificates_people_make(&|c| Box::new(Cyrus::start_with_cert(c)));
}

/// A big personal inbox at first start: 2,000 old mails (from people, with and without attachments) and
/// five notices. Only the notices are fetched whole (Dovecot counts the bodies it sent, in its logout
/// line), and the rest is one summary line, not a line each.
#[test]
fn a_big_personal_inbox_is_looked_at_not_fetched_and_summed_up_in_a_line() {
    need!(dovecot::available(), "REQUIRE_DOVECOT", "Dovecot");
    let d = Dovecot::start_with(
        "imap_logout_format = in=%i out=%o bodies=%{fetch_body_count} body_bytes=%{fetch_body_bytes}",
    );
    let mut all = Vec::new();
    for i in 0..2000u64 {
        let from = format!("Person {i} <person{i}@uni.example>");
        let mail = if i % 10 == 0 {
            // A colleague's mail with a JSON attachment: looks like a notice, but not from MAST.
            mails::mail(
                &from,
                &[mails::json_part(
                    "data.json",
                    &notice_of(10_000 + i, 1),
                    Encoding::Base64,
                )],
            )
        } else if i % 10 == 1 {
            // From MAST's domain, with no attachment at all.
            mails::mail("Helpdesk <help@stsci.edu>", &[])
        } else {
            mails::mail(&from, &[])
        };
        all.push(mail);
        if i % 400 == 0 {
            all.push(mails::notice_mail(&notice_of(i + 1, 1)));
        }
    }
    let mut c = d.client();
    c.append_many("INBOX", &all);
    c.logout();
    let ws = Workspace::with_config(&format!(
        "{}\n",
        imap_config(&d, "implicit", &d.ca_file, "").replace("localhost", "127.0.0.1")
    ));
    let mut daemon = Daemon::start(&ws);
    assert!(
        wait_until(Duration::from_secs(120), || events(&ws) == 5),
        "{} of 5 notices; log:\n{}",
        events(&ws),
        daemon.log()
    );
    daemon.wait_for_log("new mail(s) looked at", Duration::from_secs(30));
    daemon.terminate();
    let log = daemon.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("IMAP INBOX") && !l.contains(" DEBUG "))
        .count();
    // Five taken, and the summaries of the passes (100 mails a look, one line a pass).
    eprintln!("2005 mails at first start: {lines} log lines at info level or above");
    assert!(lines <= 10, "{lines} log lines for the mailbox:\n{log}");
    assert!(
        log.contains(
            "2005 new mail(s) looked at, 5 taken; passed over without fetching them: 1800 from \
             senders imap.allowed_senders does not name (200 of them with a part that could be a \
             notice, e.g. from person0@uni.example), 200 with no part that could be a notice"
        ),
        "{log}"
    );
    // Dovecot's logout line for mastsub's session: five bodies sent, not 2,005.
    let server = d.log();
    let bodies: Vec<u64> = server
        .lines()
        .filter(|l| l.contains("Logged out") || l.contains("Disconnected"))
        .filter_map(|l| l.split("bodies=").nth(1))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        bodies.contains(&5) && bodies.iter().all(|b| *b <= 5),
        "bodies fetched per session: {bodies:?}\n{server}"
    );
}

/// A processed folder the server refuses (another user's folder on Cyrus): said once at warning level
/// with the server's words and the folders there are, shown in `status`, and the notices are still
/// taken (the mail marked \Seen and left in INBOX), with no warning per mail.
#[test]
fn a_processed_folder_the_server_refuses_is_said_once_and_shown_in_status() {
    need!(cyrus::available(), "REQUIRE_CYRUS", "Cyrus");
    let s = Cyrus::start();
    for n in [1, 2, 3] {
        s.deliver("INBOX", &mails::notice_mail(&notice_of(n, 1)));
    }
    let ws = Workspace::with_config(&imap_config(
        &s,
        "implicit",
        s.ca_file(),
        r#"processed_mailbox = "user/someone-else/processed""#,
    ));
    let daemon = Daemon::start(&ws);
    assert!(
        wait_until(Duration::from_secs(30), || events(&ws) == 3),
        "log:\n{}",
        daemon.log()
    );
    s.deliver("INBOX", &mails::notice_mail(&notice_of(4, 1)));
    assert!(wait_until(Duration::from_secs(20), || has_event(&ws, 4)));
    let log = daemon.log();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cannot create imap.processed_mailbox"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains(" WARN ")
            && warned[0].contains("(sent as \"user.someone-else.processed\")")
            && warned[0].contains("the server said: ")
            && warned[0].contains("\"INBOX\""),
        "{}",
        warned[0]
    );
    assert!(!log.contains("the server refused to move"), "{log}");
    assert_eq!(s.uids("INBOX", "SEEN").len(), 4);
    let status = ws.status();
    let detail = status["sources"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("cannot create imap.processed_mailbox"),
        "{status}"
    );
    let text = ws.cmd().arg("status").output().unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("cannot create imap.processed_mailbox"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}

/// A folder name outside ASCII travels in modified UTF-7: Dovecot lists it as `Donn&AOk-es.trait&AOk-es`
/// (RFC 3501's encoding, made by the server's own code, not ours, when its own client CREATEs it).
#[test]
fn a_non_ascii_processed_folder_is_sent_in_modified_utf7() {
    need!(dovecot::available(), "REQUIRE_DOVECOT", "Dovecot");
    let d = Dovecot::start();
    d.deliver("INBOX", &mails::notice_mail(&notice_of(1, 1)));
    let ws = Workspace::with_config(&imap_config(
        &d,
        "implicit",
        &d.ca_file,
        "processed_mailbox = \"Données/traitées\"",
    ));
    let daemon = Daemon::start(&ws);
    assert!(wait_until(Duration::from_secs(20), || has_event(&ws, 1)));
    assert!(
        wait_until(Duration::from_secs(10), || d
            .uids("Donn&AOk-es.trait&AOk-es", "ALL")
            .len()
            == 1),
        "log:\n{}",
        daemon.log()
    );
    // The server's folder list, as the server encodes it: exactly one folder besides INBOX.
    let mut c = d.client();
    let listed = c.ok("LIST \"\" \"*\"");
    c.logout();
    let names: Vec<&String> = listed.iter().filter(|l| !l.ends_with("INBOX")).collect();
    assert!(
        names.iter().any(|l| l.ends_with("Donn&AOk-es")) && names.len() == 2,
        "{listed:?}"
    );
}

/// A compressed notice mastsub cannot read (bzip2), and a gzip that unpacks past the notice size limit:
/// each named in the line that leaves the mail, with what to do.
#[test]
fn a_notice_in_a_format_mastsub_cannot_read_is_named_where_the_mail_is_left() {
    need!(dovecot::available(), "REQUIRE_DOVECOT", "Dovecot");
    let d = Dovecot::start();
    d.deliver(
        "INBOX",
        &mails::mail(
            "MAST <archive@stsci.edu>",
            &[binary_part(
                "application/x-bzip2; name=\"event_metadata.json.bz2\"",
                "attachment; filename=\"event_metadata.json.bz2\"",
                b"BZh91AY&SY not really",
            )],
        ),
    );
    // 4 MiB of zeros: a few KiB gzipped, past a 1 MiB limit unpacked.
    let bomb = gzip(&vec![b' '; 4 << 20]);
    d.deliver(
        "INBOX",
        &mails::mail(
            "MAST <archive@stsci.edu>",
            &[binary_part(
                "application/gzip; name=\"big.json.gz\"",
                "attachment; filename=\"big.json.gz\"",
                &bomb,
            )],
        ),
    );
    d.deliver("INBOX", &mails::notice_mail(&notice_of(1, 1)));
    let ws = Workspace::with_config(&format!(
        "{}\n[ingest]\nmax_notice_size = \"1MiB\"\n",
        imap_config(&d, "implicit", &d.ca_file, "")
    ));
    let daemon = Daemon::start(&ws);
    assert!(wait_until(Duration::from_secs(20), || has_event(&ws, 1)));
    let log = daemon.log();
    let left: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("no notice could be read"))
        .collect();
    assert_eq!(left.len(), 2, "{log}");
    assert!(left[0].contains("event_metadata.json.bz2"), "{}", left[0]);
    assert!(
        left[1].contains("big.json.gz") && left[1].contains("ingest.max_notice_size"),
        "{}",
        left[1]
    );
    assert_eq!(d.uids("INBOX", "UNSEEN"), vec![1, 2]);
}

/// Two spellings of one folder (`INBOX/` is INBOX): no endless take-and-move, one warning; and a mailbox
/// that does not exist is said in the server's words with the folders it has, in the log and `status`.
#[test]
fn a_processed_folder_that_is_the_mailbox_and_a_missing_mailbox_are_said_plainly() {
    need!(dovecot::available(), "REQUIRE_DOVECOT", "Dovecot");
    let d = Dovecot::start();
    d.deliver("INBOX", &mails::notice_mail(&notice_of(1, 1)));
    let ws = Workspace::with_config(&imap_config(
        &d,
        "implicit",
        &d.ca_file,
        r#"processed_mailbox = "INBOX/""#,
    ));
    let daemon = Daemon::start(&ws);
    assert!(wait_until(Duration::from_secs(20), || has_event(&ws, 1)));
    d.deliver("INBOX", &mails::notice_mail(&notice_of(2, 1)));
    assert!(wait_until(Duration::from_secs(20), || has_event(&ws, 2)));
    std::thread::sleep(Duration::from_secs(1));
    let log = daemon.log();
    assert_eq!(
        log.matches("is the same folder as imap.mailbox").count(),
        1,
        "{log}"
    );
    // Each mail taken once: not moved into its own mailbox and found again.
    assert_eq!(log.matches("notice attachment(s)").count(), 2, "{log}");
    assert_eq!(d.uids("INBOX", "SEEN"), vec![1, 2]);
    drop(daemon);

    let ws = Workspace::with_config(&imap_config(
        &d,
        "implicit",
        &d.ca_file,
        r#"mailbox = "MAST/notices""#,
    ));
    let daemon = Daemon::start(&ws);
    daemon.wait_for_log("trying again in", Duration::from_secs(20));
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("cannot open the mailbox"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(
            "cannot open the mailbox \"MAST/notices\" (sent as \"MAST.notices\"): the server said: "
        ) && line.contains("check imap.mailbox (the server has \"INBOX\")")
            && !line.contains("Outcome")
            && !line.contains("Some("),
        "{line}"
    );
    let status = ws.status();
    assert!(
        status["sources"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot open the mailbox \"MAST/notices\"")),
        "{status}"
    );
}
