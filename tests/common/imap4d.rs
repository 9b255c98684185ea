//! A real GNU Mailutils imap4d 3.15 (Debian 12's `mailutils-imap4d`) for the IMAP tests, started by the
//! test itself beside any Dovecot: its own config file (`--config-file`, so /etc/mailutils.conf is not
//! read), no system account, mail in the temp dir, free loopback ports.
//!
//! The test user is a virtual-domain user: `auth { authorization virtdomain; authentication generic; }`
//! looks `notices@mastsub.test` up in `<dir>/vdomains/mastsub.test`, a passwd(5)-format file with a
//! SHA-512 crypt hash of the password (the login name must carry the domain). Its home is `<dir>/home`,
//! owned by the current user (root in CI) and named in that file, so imap4d switches to no one else; the
//! INBOX is the mbox `<dir>/home/INBOX` (created empty before the first start: APPEND to an INBOX that
//! does not exist is `NO [TRYCREATE]`), other folders are mbox files under `<dir>/home` in the personal
//! namespace `""` with the delimiter `/` (`NAMESPACE` is `(("" "/")) NIL NIL`), so "MAST/processed" is
//! "MAST/processed". INBOX has no inferiors (`LIST` gives it a NIL delimiter).
//!
//! The master runs with `--daemon --foreground` in a process group of its own (its session processes,
//! one per connection, stay in that group), logging to stderr (`logging { syslog false; }`), which goes
//! to `<dir>/imap4d.log`. Two `server` blocks: plain with `tls-mode ondemand` (STARTTLS offered, LOGIN
//! allowed without it) and `tls-mode connection` (implicit TLS).
//!
//! Quirks, as seen on 3.15:
//! - `UID SEARCH UID n:*` answers an empty `* SEARCH` (a bug): `uids` writes `*` as 4294967295 instead.
//!   `UID SEARCH ALL`, `UNSEEN`, `DELETED`, `UID FETCH n:*` are right.
//! - IDLE is offered, but imap4d never sends anything while idling: it looks at the mailbox only when a
//!   line comes from the client (new mail shows up as `* n EXISTS` just before `OK IDLE terminated`,
//!   after DONE). There is no setting for it; a client must leave IDLE now and then to see new mail.
//! - No MOVE, UIDPLUS, SASL-IR, CONDSTORE or ENABLE. The greeting is a bare `* OK IMAP4rev1`.
//! - `AUTHENTICATE PLAIN` succeeds with a tagged OK ended by a bare LF, not CRLF; an initial response
//!   on the command line is `BAD Invalid arguments`.
//! - Any APPEND failure is `NO APPEND [TRYCREATE] failed` (also a mail with no From: header).
//! - The mbox's UIDVALIDITY changes (to the current time) when a session that had INBOX selected, and
//!   was told of mail another session appended meanwhile (`* n EXISTS` on NOOP, or after IDLE), closes
//!   it; the UIDs themselves stay. A session that saw no new mail leaves UIDVALIDITY alone.
//! - A refused login is answered at once (no delay); `failed_logins` counts its log line.
//! - APPEND without a date stores the mail with an internal date of 1 Jan 1970.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::dovecot::Imap;
use super::imap_server::{ImapServer, ServerCert, write_cert};
use super::wait_until;

/// The test user (a virtual-domain user: the login name carries the domain) and password.
pub const USER: &str = "notices@mastsub.test";
pub const PASSWORD: &str = super::dovecot::PASSWORD;
/// The virtual domain, the name of the password file in `<dir>/vdomains`.
const DOMAIN: &str = "mastsub.test";
/// `openssl passwd -6 -salt mastsubtest9 imap-secret-3f9a`: `PASSWORD` for crypt(3).
const PASSWORD_HASH: &str = "$6$mastsubtest9$bpDi3CJJ.r/qtbZSzbWG/erAif8h0/FGef3Fo6rWYrR.qiuXQ6krlDwDWyJbwY5.SAuPlwUHb3xK3jjo/EfTa1";

/// Where Debian's package puts the server.
const IMAP4D: &str = "/usr/sbin/imap4d";

/// Whether imap4d is installed (`apt-get install mailutils-imap4d`).
pub fn available() -> bool {
    Path::new(IMAP4D).exists()
}

/// A running imap4d.
pub struct Imap4d {
    pub dir: tempfile::TempDir,
    /// Plain IMAP, with STARTTLS.
    pub port: u16,
    /// Implicit TLS.
    pub tls_port: u16,
    /// The CA of the default certificate (for `start_with_cert`: the given certificate itself).
    pub ca_file: PathBuf,
    child: Option<Child>,
    /// The process group of the master and its sessions (the master's pid), kept after `stop`.
    pgid: Option<i32>,
    /// The personal namespace's prefix and the hierarchy delimiter, asked at the first start.
    prefix: String,
    delimiter: String,
}

/// The pids of the live (not zombie) processes in process group `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            pids.push(pid);
        }
    }
    pids
}

/// The first quoted string of `s` (or a NIL) and what follows it.
fn quoted(s: &str) -> Option<(Option<String>, &str)> {
    let s = s.trim_start();
    if let Some(rest) = s.strip_prefix("NIL") {
        return Some((None, rest));
    }
    let rest = s.strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?.1),
            '"' => return Some((Some(out), &rest[i + 1..])),
            c => out.push(c),
        }
    }
    None
}

impl Imap4d {
    /// Starts imap4d with a certificate for 127.0.0.1 and localhost from a private CA (`ca_file`).
    pub fn start() -> Imap4d {
        let (ca, cert_pem, key_pem) = super::dovecot::certificates();
        Imap4d::start_with(ServerCert { cert_pem, key_pem }, &ca)
    }

    /// Starts imap4d with `cert`; `ca_file` then holds that certificate.
    pub fn start_with_cert(cert: ServerCert) -> Imap4d {
        let pem = cert.cert_pem.clone();
        Imap4d::start_with(cert, &pem)
    }

    fn start_with(cert: ServerCert, ca_pem: &str) -> Imap4d {
        assert!(
            available(),
            "imap4d is not installed (apt-get install mailutils-imap4d)"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().to_path_buf();
        let ca_file = root.join("ca.pem");
        std::fs::write(&ca_file, ca_pem).unwrap();
        let (cert_file, key_file) = write_cert(&root, &cert);
        let home = root.join("home");
        let vdomains = root.join("vdomains");
        for d in [&home, &vdomains] {
            std::fs::create_dir_all(d).unwrap();
        }
        // An empty file is an empty mbox; APPEND to a missing INBOX is refused.
        std::fs::write(home.join("INBOX"), "").unwrap();
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let name = USER.split('@').next().unwrap();
        std::fs::write(
            vdomains.join(DOMAIN),
            format!(
                "{name}:{PASSWORD_HASH}:{uid}:{gid}:mastsub test:{}:/bin/false\n",
                home.display()
            ),
        )
        .unwrap();
        let (port, tls_port) = (super::free_port(), super::free_port());
        let config = format!(
            r#"# Generated by the mastsub tests (tests/common/imap4d.rs).
logging {{
  syslog false;
  print-severity true;
  severity debug;
}};
pidfile "{pid}";
max-children 100;
virtdomain {{
  passwd-dir "{vdomains}";
}};
auth {{
  authorization virtdomain;
  authentication generic;
}};
tls {{
  ssl-certificate-file "{cert}";
  ssl-key-file "{key}";
}};
tls-file-checks {{
  key-file none;
  cert-file none;
  ca-file none;
}};
server 127.0.0.1:{port} {{
  tls-mode ondemand;
}};
server 127.0.0.1:{tls_port} {{
  tls-mode connection;
}};
"#,
            pid = root.join("imap4d.pid").display(),
            vdomains = vdomains.display(),
            cert = cert_file.display(),
            key = key_file.display(),
        );
        std::fs::write(root.join("imap4d.conf"), config).unwrap();
        let mut d = Imap4d {
            dir,
            port,
            tls_port,
            ca_file,
            child: None,
            pgid: None,
            prefix: String::new(),
            delimiter: "/".into(),
        };
        d.start_again();
        d.learn_namespace();
        d
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The generated configuration.
    pub fn config(&self) -> String {
        std::fs::read_to_string(self.path("imap4d.conf")).unwrap()
    }

    /// A logged-in client for the test user.
    pub fn client(&self) -> Imap {
        let mut c = Imap::connect(self.port).expect("connect to imap4d");
        if let Err(e) = c.command(&format!("LOGIN {USER} \"{PASSWORD}\"")) {
            panic!("LOGIN to imap4d: {e}\nimap4d's log:\n{}", self.log());
        }
        c
    }

    /// The personal namespace's prefix (`NAMESPACE`) and the hierarchy delimiter (`LIST "" ""`).
    fn learn_namespace(&mut self) {
        let mut c = self.client();
        let lines = c.ok("NAMESPACE");
        // * NAMESPACE (("prefix" "delim") ...) other shared
        if let Some(rest) = lines.iter().find_map(|l| l.strip_prefix("* NAMESPACE (("))
            && let Some((Some(prefix), rest)) = quoted(rest)
        {
            self.prefix = prefix;
            if let Some((Some(d), _)) = quoted(rest) {
                self.delimiter = d;
            }
        }
        let lines = c.ok("LIST \"\" \"\"");
        // * LIST (\Noselect) "/" ""
        if let Some(rest) = lines
            .iter()
            .find_map(|l| l.strip_prefix("* LIST ("))
            .and_then(|l| l.split_once(')'))
            .map(|(_, rest)| rest)
            && let Some((Some(d), _)) = quoted(rest)
        {
            self.delimiter = d;
        }
        c.logout();
    }

    fn signal_group(&self, signal: nix::sys::signal::Signal) {
        if let Some(pgid) = self.pgid {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
        }
    }

    /// SIGTERM to the master and every session, SIGKILL after 5 s to what is left.
    fn kill_all(&mut self) {
        use nix::sys::signal::Signal;
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = self.pgid.unwrap();
        self.signal_group(Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !matches!(child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if !wait_until(Duration::from_secs(5), || group_members(pgid).is_empty()) {
            self.signal_group(Signal::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
        wait_until(Duration::from_secs(10), || group_members(pgid).is_empty());
    }

    /// The pids of imap4d's live processes (the master and its sessions).
    pub fn processes(&self) -> Vec<i32> {
        self.pgid.map(group_members).unwrap_or_default()
    }
}

impl Drop for Imap4d {
    fn drop(&mut self) {
        self.kill_all();
    }
}

impl ImapServer for Imap4d {
    fn client(&self) -> Imap {
        Imap4d::client(self)
    }

    fn name(&self) -> &'static str {
        "imap4d"
    }

    fn port(&self) -> u16 {
        self.port
    }

    fn tls_port(&self) -> u16 {
        self.tls_port
    }

    fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    fn user(&self) -> &str {
        USER
    }

    fn password(&self) -> &str {
        PASSWORD
    }

    /// APPEND, after CREATE for any mailbox but INBOX (imap4d creates none on APPEND).
    fn deliver(&self, mailbox: &str, mail: &[u8]) {
        let mut c = self.client();
        if !mailbox.eq_ignore_ascii_case("INBOX") {
            // "NO" when it is there already.
            let _ = c.command(&format!("CREATE \"{mailbox}\""));
        }
        c.append(mailbox, mail);
        c.logout();
    }

    /// `UID SEARCH` in an EXAMINEd mailbox, with every `*` written as the highest UID there can be
    /// (imap4d answers `UID n:*` with nothing).
    fn uids(&self, mailbox: &str, criteria: &str) -> Vec<u32> {
        let mut c = self.client();
        let uids = c.uids("EXAMINE", mailbox, &criteria.replace('*', "4294967295"));
        c.logout();
        uids
    }

    /// The personal namespace is "" and the delimiter `/`: "MAST/processed" is "MAST/processed".
    fn mailbox_name(&self, path: &str) -> String {
        let path = path.trim_matches('/');
        if path.eq_ignore_ascii_case("INBOX") {
            return "INBOX".into();
        }
        format!("{}{}", self.prefix, path.replace('/', &self.delimiter))
    }

    fn stop(&mut self) {
        self.kill_all();
        let down = wait_until(Duration::from_secs(10), || {
            [self.port, self.tls_port]
                .iter()
                .all(|&p| std::net::TcpStream::connect(("127.0.0.1", p)).is_err())
        });
        assert!(down, "imap4d still answers after being stopped");
        let left = self.processes();
        assert!(
            left.is_empty(),
            "imap4d processes left after stop: {left:?}"
        );
    }

    fn start_again(&mut self) {
        assert!(self.child.is_none(), "imap4d is running already");
        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("imap4d.log"))
            .unwrap();
        let _ = writeln!(out, "--- mastsub test: starting imap4d");
        let child = Command::new(IMAP4D)
            .arg(format!(
                "--config-file={}",
                self.path("imap4d.conf").display()
            ))
            .arg("--daemon")
            .arg("--foreground")
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own process group, so that `stop` reaches every session process.
            .process_group(0)
            .spawn()
            .expect("start imap4d");
        self.pgid = Some(child.id() as i32);
        self.child = Some(child);
        // The master opens every server's socket before it accepts on any (a bare connect to the TLS
        // port would only log a TLS error).
        let up = wait_until(Duration::from_secs(20), || {
            Imap::connect(self.port).is_some()
        });
        if !up {
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            self.kill_all();
            panic!(
                "imap4d did not start (exit: {exited:?})\nconfig:\n{}\nlog:\n{}",
                self.config(),
                self.log()
            );
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("imap4d.log")).unwrap_or_default()
    }

    /// LOGIN with a wrong password is "login failed: <user>", with an unknown user "user `<user>'
    /// nonexistent"; a refused AUTHENTICATE is "GSASL error: Error authenticating user".
    fn failed_logins(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| {
                l.contains("login failed: ")
                    || (l.contains("info: user `") && l.ends_with("' nonexistent"))
                    || l.contains("GSASL error: Error authenticating user")
            })
            .count()
    }
}
