//! The imap4d harness (`common/imap4d.rs`) against Debian's GNU Mailutils imap4d: plain login, STARTTLS
//! and implicit TLS, delivery, UIDs (and the `UID SEARCH UID n:*` bug), a stop that ends every session,
//! and a restart that keeps the mail.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::dovecot::{Imap, mails};
use common::imap_server::ImapServer;
use common::imap4d::{self, Imap4d};
use common::{notice_of, wait_until};

/// Skips (with a line saying so) when imap4d is not installed; under REQUIRE_IMAP4D a missing imap4d
/// fails instead.
macro_rules! need_imap4d {
    () => {
        if !imap4d::available() {
            assert!(
                std::env::var_os("REQUIRE_IMAP4D").is_none(),
                "imap4d is not installed (apt-get install mailutils-imap4d)"
            );
            eprintln!("SKIPPED: imap4d is not installed (apt-get install mailutils-imap4d)");
            return;
        }
    };
}

/// `openssl s_client` to `port` (with `starttls`, `-starttls imap`), verifying the server against
/// `ca`; sends LOGIN and LOGOUT and returns what the server said.
fn openssl_session(server: &Imap4d, port: u16, starttls: bool) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-CAfile")
        .arg(server.ca_file())
        .args(["-verify_return_error", "-verify_ip", "127.0.0.1"])
        .args(["-quiet", "-crlf"]);
    if starttls {
        cmd.args(["-starttls", "imap"]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (apt-get install openssl)");
    write!(
        child.stdin.as_mut().unwrap(),
        "a1 LOGIN {} \"{}\"\na2 LOGOUT\n",
        server.user(),
        server.password()
    )
    .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let done = wait_until(Duration::from_secs(20), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !done {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    let out = reader.join().unwrap();
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    assert!(
        done && status.success(),
        "openssl s_client to {port} (starttls: {starttls}): {status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

#[test]
fn imap4d_serves_plain_starttls_and_tls_and_keeps_mail_over_a_restart() {
    need_imap4d!();
    let mut server = Imap4d::start();
    eprintln!("imap4d config:\n{}", server.config());

    // Plain: STARTTLS and IDLE offered, the user logs in, a wrong password is refused and counted.
    let mut c = Imap::connect(server.port()).expect("connect");
    let caps = c.ok("CAPABILITY").join(" ");
    eprintln!("capabilities: {caps}");
    assert!(caps.contains(" STARTTLS"), "{caps}");
    assert!(caps.contains(" IDLE"), "{caps}");
    assert!(c.command("LOGIN notices@mastsub.test \"wrong\"").is_err());
    c.ok(&format!(
        "LOGIN {} \"{}\"",
        server.user(),
        server.password()
    ));
    let namespace = c.ok("NAMESPACE");
    let list = c.ok("LIST \"\" \"\"");
    eprintln!("NAMESPACE: {namespace:?}; LIST \"\" \"\": {list:?}");
    c.logout();
    assert!(
        wait_until(Duration::from_secs(5), || server.failed_logins() == 1),
        "failed logins: {}\nlog:\n{}",
        server.failed_logins(),
        server.log()
    );

    // STARTTLS and implicit TLS, both verified against the private CA.
    for (port, starttls) in [(server.port(), true), (server.tls_port(), false)] {
        let out = openssl_session(&server, port, starttls);
        assert!(out.contains("a1 OK"), "port {port}: {out}");
        assert!(out.contains("a2 OK"), "port {port}: {out}");
    }

    // Two mails in INBOX.
    for n in [1, 2] {
        server.deliver("INBOX", &mails::notice_mail(&notice_of(n, 1)));
    }
    assert_eq!(server.uids("INBOX", "ALL"), vec![1, 2]);
    assert_eq!(server.uids("INBOX", "UNSEEN"), vec![1, 2]);
    assert!(server.uids("INBOX", "DELETED").is_empty());
    assert!(server.uids("Nowhere", "ALL").is_empty());

    // The bug: UID SEARCH UID 1:* finds nothing; UID FETCH 1:* and an explicit range are right, and
    // `uids` works around it.
    let mut c = server.client();
    c.ok("SELECT INBOX");
    let star = c.ok("UID SEARCH UID 1:*");
    eprintln!("UID SEARCH UID 1:* -> {star:?}");
    assert_eq!(star, vec!["* SEARCH".to_string()], "the bug is gone?");
    let fetched = c.ok("UID FETCH 1:* (UID FLAGS)");
    assert_eq!(fetched.len(), 2, "{fetched:?}");
    assert_eq!(c.ok("UID SEARCH UID 1:4294967295"), vec!["* SEARCH 1 2"]);
    c.ok("UID STORE 2 +FLAGS (\\Deleted)");
    c.logout();
    assert_eq!(server.uids("INBOX", "UID 1:*"), vec![1, 2]);
    assert_eq!(server.uids("INBOX", "UID 2:*"), vec![2]);
    assert_eq!(server.uids("INBOX", "DELETED"), vec![2]);
    assert_eq!(server.uids("INBOX", "UNDELETED"), vec![1]);

    // A folder of its own.
    let processed = server.mailbox_name("MAST/processed");
    assert_eq!(processed, "MAST/processed");
    server.deliver(&processed, &mails::notice_mail(&notice_of(3, 1)));
    assert_eq!(server.uids(&processed, "ALL"), vec![1]);

    // Stop with a session open: every process ends, and the session's connection with it.
    let mut held = std::net::TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        held,
        "h1 LOGIN {} \"{}\"\r\nh2 SELECT INBOX\r\n",
        server.user(),
        server.password()
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("h2 OK") {
        let n = held.read(&mut buf).expect("the held session answers");
        assert!(
            n > 0,
            "the held session closed: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    let before = server.processes();
    assert!(before.len() >= 2, "master and a session: {before:?}");
    server.stop();
    assert!(server.processes().is_empty(), "{:?}", server.processes());
    // Whatever the session said on its way out (a BYE), then the end of the connection.
    let mut rest = Vec::new();
    let end = held.read_to_end(&mut rest);
    assert!(
        end.is_ok() || rest.is_empty(),
        "the held session still open: {end:?}"
    );
    eprintln!(
        "held session after stop: {:?}",
        String::from_utf8_lossy(&rest)
    );

    // Again, with the same mail.
    server.start_again();
    assert_eq!(server.uids("INBOX", "ALL"), vec![1, 2]);
    assert_eq!(server.uids(&processed, "ALL"), vec![1]);
    eprintln!("imap4d log:\n{}", server.log());
}
