//! E-mail summaries and alerts against a real SMTP server started by each test (Debian's
//! python3-aiosmtpd, installed by `.ci/run`): plain and with STARTTLS, and a server that is down.

mod common;

use std::time::Duration;

use common::mast::{MastStandIn, serve_products, wait_done};
use common::smtp::{self, Smtp};
use common::{Daemon, Workspace, wait_until};

/// Skips (with a line saying so) when aiosmtpd is not installed; CI installs it and sets REQUIRE_SMTP.
macro_rules! need_smtp {
    () => {
        if !smtp::available() {
            assert!(
                std::env::var_os("REQUIRE_SMTP").is_none(),
                "aiosmtpd is not installed (apt-get install python3-aiosmtpd)"
            );
            eprintln!("SKIPPED: aiosmtpd is not installed (apt-get install python3-aiosmtpd)");
            return;
        }
    };
}

fn wait_for_mail(server: &Smtp, d: &Daemon, subject: &str) -> String {
    let mut body = None;
    let found = wait_until(Duration::from_secs(30), || {
        body = server
            .received()
            .into_iter()
            .find(|(s, _)| s.contains(subject))
            .map(|(_, b)| b);
        body.is_some()
    });
    assert!(
        found,
        "no mail with {subject:?}; got {:?}; log:\n{}",
        server.received(),
        d.log()
    );
    body.unwrap()
}

#[test]
fn a_summary_with_counts_files_and_reasons_and_one_alert_per_cause() {
    need_smtp!();
    let server = Smtp::start(false);
    let mast = MastStandIn::start();
    let (notice, _) = serve_products(&mast, 1, 3, 10);
    // Product 3 never appears: 404 until not_found_give_up (3 s in tests), then failed.
    mast.remove("jw00003001001_02201_00001_mirimage_cal.fits");
    let ws = Workspace::with_base(&mast.base_url, &server.config(""));
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("event_metadata_jwst-program-5105.json", &notice);

    let body = wait_for_mail(
        &server,
        &d,
        "mastsub: program 5105: 2 of 3 product(s) downloaded, 1 not",
    );
    for expected in [
        "Notice event_metadata_jwst-program-5105.json (from inbox",
        "Events: 3 New",
        "Downloads: 2 done, 1 failed, 0 waiting for a MAST token",
        "jwst/jw00001001001_02201_00001/jw00001001001_02201_00001_mirimage_cal.fits  28.1 KiB",
        "jw00003001001_02201_00001_mirimage_cal.fits: MAST answered HTTP 404",
    ] {
        assert!(body.contains(expected), "{expected:?} not in:\n{body}");
    }
    let alert = wait_for_mail(
        &server,
        &d,
        "mastsub alert: 1 download(s) failed: MAST answered HTTP 404",
    );
    assert!(alert.contains("#3 New program 5105"), "{alert}");

    // The same cause again within the hour: a summary, but no second alert.
    let (second, _) = serve_products(&mast, 4, 1, 10);
    mast.remove("jw00004001001_02201_00001_mirimage_cal.fits");
    ws.drop_notice("second.json", &second);
    wait_for_mail(&server, &d, "0 of 1 product(s) downloaded, 1 not");
    std::thread::sleep(Duration::from_secs(3));
    let alerts = server
        .received()
        .iter()
        .filter(|(s, _)| s.starts_with("mastsub alert"))
        .count();
    assert_eq!(alerts, 1, "{:?}", server.received());
    assert_eq!(server.received().len(), 3, "{:?}", server.received());
}

#[test]
fn summaries_go_out_over_starttls() {
    need_smtp!();
    // This server refuses mail without STARTTLS.
    let server = Smtp::start(true);
    let mast = MastStandIn::start();
    let (notice, _) = serve_products(&mast, 1, 2, 10);
    let ws = Workspace::with_base(&mast.base_url, &server.config(""));
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &notice);
    let body = wait_for_mail(&server, &d, "2 of 2 product(s) downloaded");
    assert!(body.contains("Downloads: 2 done, 0 failed"), "{body}");
    let raw = String::from_utf8_lossy(&server.mails()[0]).into_owned();
    assert!(raw.contains("To: astronomer@uni.example"), "{raw}");
}

#[test]
fn an_smtp_server_that_is_down_delays_the_mail_without_losing_it_or_stopping_downloads() {
    need_smtp!();
    let port = common::free_port();
    let mut server = Smtp::on_port(port, false);
    let mast = MastStandIn::start();
    let (notice, _) = serve_products(&mast, 1, 2, 10);
    let ws = Workspace::with_base(&mast.base_url, &server.config(""));
    let mut d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &notice);
    wait_done(&ws, &d, 2, Duration::from_secs(20));
    d.wait_for_log("e-mail: cannot send", Duration::from_secs(20));
    // Kept across a restart, too.
    d.terminate();
    let d = Daemon::start(&ws);
    server.start_again();
    let body = wait_for_mail(&server, &d, "2 of 2 product(s) downloaded");
    assert!(body.contains("Downloads: 2 done"), "{body}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(server.received().len(), 1, "{:?}", server.received());
}

#[test]
fn a_self_signed_ca_true_certificate_in_ca_file_works_and_a_wrong_name_or_port_is_a_sentence() {
    need_smtp!();
    if !common::certs::available() {
        eprintln!("SKIPPED: openssl is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // `openssl req -x509` as people run it: CA:TRUE, no subjectAltName, CN=localhost.
    let made = common::certs::self_signed_ca_true_no_san(dir.path());
    let server = Smtp::start_with_cert(&made.server);
    let mast = MastStandIn::start();
    let (notice, _) = serve_products(&mast, 1, 1, 10);
    let config = server
        .config("")
        .replace("smtp_host = \"127.0.0.1\"", "smtp_host = \"localhost\"");
    // ca_file is the server's certificate itself.
    assert_eq!(
        std::fs::read_to_string(&server.ca_file).unwrap(),
        made.server.cert_pem
    );
    let ws = Workspace::with_base(&mast.base_url, &config);
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &notice);
    let body = wait_for_mail(&server, &d, "1 of 1 product(s) downloaded");
    assert!(body.contains("Downloads: 1 done"), "{body}");
    drop(d);

    // A certificate for another name: refused, and the log says which names it gives.
    let wrong = common::certs::wrong_name(dir.path());
    let server = Smtp::start_with_cert(&wrong.server);
    let config = server
        .config("")
        .replace("smtp_host = \"127.0.0.1\"", "smtp_host = \"localhost\"");
    let ws = Workspace::with_base(&mast.base_url, &config);
    let d = Daemon::start_watching(&ws);
    let (notice, _) = serve_products(&mast, 2, 1, 10);
    ws.drop_notice("n.json", &notice);
    let expected = format!(
        "TLS with localhost failed: the certificate of localhost:{} names mail.example.org, not \
         localhost: set email.smtp_host to a name it gives",
        server.port
    );
    d.wait_for_log(&expected, Duration::from_secs(30));
    assert!(server.received().is_empty(), "{:?}", server.received());
    drop(d);

    // Implicit TLS on a port that speaks plain SMTP first.
    let config = config.replace("tls = \"starttls\"", "tls = \"implicit\"");
    let ws = Workspace::with_base(&mast.base_url, &config);
    let d = Daemon::start_watching(&ws);
    let (notice, _) = serve_products(&mast, 3, 1, 10);
    ws.drop_notice("n.json", &notice);
    let expected = format!(
        "TLS with localhost failed: localhost:{} did not answer TLS; port 587 or 25 speaks plain SMTP \
         first: set email.tls = \"starttls\"",
        server.port
    );
    d.wait_for_log(&expected, Duration::from_secs(30));
    for line in d.log().lines().filter(|l| l.contains("TLS with")) {
        assert!(
            !line.contains("InvalidContentType") && !line.contains("Other("),
            "{line}"
        );
    }
    assert!(server.received().is_empty(), "{:?}", server.received());
}
