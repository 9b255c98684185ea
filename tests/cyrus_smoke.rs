//! The Cyrus test server itself (`common/cyrus.rs`, Debian's cyrus-imapd 3.6 unpacked by
//! `tests/servers/install-cyrus.sh`): it starts, takes mail, has Debian's stock hierarchy (folders under
//! `INBOX.`, `.` as the separator), stops with every session process, and keeps its mail over a restart.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::cyrus::{self, Cyrus};
use common::dovecot::mails;
use common::dovecot::{PASSWORD, USER};
use common::imap_server::ImapServer;
use common::{notice_of, wait_until};

/// Skips (with a line saying so) when Cyrus is not unpacked; with REQUIRE_CYRUS set, a missing Cyrus
/// fails instead.
macro_rules! need_cyrus {
    () => {
        if !cyrus::available() {
            assert!(
                std::env::var_os("REQUIRE_CYRUS").is_none(),
                "Cyrus is not unpacked (run tests/servers/install-cyrus.sh)"
            );
            eprintln!("SKIPPED: Cyrus is not unpacked (run tests/servers/install-cyrus.sh)");
            return;
        }
    };
}

#[test]
fn cyrus_starts_takes_mail_refuses_top_level_folders_and_restarts() {
    need_cyrus!();
    let mut c = Cyrus::start();

    let mut client = c.client();
    let caps = client.ok("CAPABILITY").join(" ");
    assert!(caps.contains(" IDLE"), "no IDLE: {caps}");
    let ns = client.ok("NAMESPACE").join(" ");
    assert!(ns.contains(r#"(("INBOX." "."))"#), "namespace: {ns}");

    c.deliver("INBOX", &mails::notice_mail(&notice_of(1, 1)));
    c.deliver("INBOX", &mails::notice_mail(&notice_of(2, 1)));
    assert_eq!(c.uids("INBOX", "ALL").len(), 2, "log:\n{}", c.log());

    // Debian's stock namespace: no top-level folders for a user, no `/` separator.
    let e = client.command(r#"CREATE "Processed""#).unwrap_err();
    assert_eq!(e, "NO Permission denied");
    let e = client.command(r#"CREATE "MAST/processed""#).unwrap_err();
    assert_eq!(e, "NO Invalid mailbox name");
    let processed = c.mailbox_name("MAST/processed");
    assert_eq!(processed, "INBOX.MAST.processed");
    client.ok(&format!(r#"CREATE "{processed}""#));
    let list = client.ok(r#"LIST "" "*""#).join("\n");
    assert!(list.contains(r#""." INBOX.MAST.processed"#), "LIST: {list}");
    client.logout();

    // A refused login is logged (and answered only after Cyrus's failedloginpause).
    let mut bad = common::dovecot::Imap::connect(c.port).unwrap();
    assert!(bad.command(&format!("LOGIN {USER} wrong")).is_err());
    assert!(
        wait_until(Duration::from_secs(5), || c.failed_logins() == 1),
        "log:\n{}",
        c.log()
    );

    // A session still open when the server stops is ended with it.
    let mut open = TcpStream::connect(("127.0.0.1", c.port)).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut reader = BufReader::new(open.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    write!(open, "a LOGIN {USER} {PASSWORD}\r\nb SELECT INBOX\r\n").unwrap();
    loop {
        line.clear();
        reader.read_line(&mut line).unwrap();
        if line.starts_with("b ") {
            break;
        }
    }
    assert!(line.starts_with("b OK"), "{line}");
    let pgid = c.process_group().unwrap();
    assert!(
        cyrus::group_members(pgid).len() >= 3,
        "master, idled, imapd"
    );

    c.stop();
    assert_eq!(cyrus::group_members(pgid), Vec::<i32>::new());
    let mut rest = Vec::new();
    if let Err(e) = reader.read_to_end(&mut rest) {
        // A reset is an end too; a timeout is not.
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "session still open"
        );
    }
    assert!(TcpStream::connect(("127.0.0.1", c.port)).is_err());
    assert!(TcpStream::connect(("127.0.0.1", c.tls_port)).is_err());

    c.start_again();
    assert_eq!(c.uids("INBOX", "ALL").len(), 2, "log:\n{}", c.log());
    let mut client = c.client();
    let list = client.ok(r#"LIST "" "*""#).join("\n");
    assert!(list.contains(r#""." INBOX.MAST.processed"#), "LIST: {list}");
    client.logout();
}
