//! A real SMTP server for the e-mail tests: Debian's python3-aiosmtpd (installed by `.ci/run`), started
//! by the test on a free loopback port, storing what it receives in a Maildir; plain, or requiring
//! STARTTLS with a certificate from the test CA.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::wait_until;

/// Debian's interpreter, where the package installs the module (not whatever `python3` is first on PATH).
const PYTHON: &str = "/usr/bin/python3";

/// Whether aiosmtpd is installed.
pub fn available() -> bool {
    Command::new(PYTHON)
        .args(["-c", "import aiosmtpd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running (or, after `stop`, stopped) SMTP server.
pub struct Smtp {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// For `email.ca_file` when STARTTLS is on.
    pub ca_file: PathBuf,
    tls: bool,
    child: Option<Child>,
}

impl Smtp {
    /// A server on a free port; `tls` requires STARTTLS.
    pub fn start(tls: bool) -> Smtp {
        let port = super::free_port();
        let mut s = Smtp::on_port(port, tls);
        s.start_again();
        s
    }

    /// A server requiring STARTTLS with `cert` (`ca_file` is then that certificate itself).
    pub fn start_with_cert(cert: &super::imap_server::ServerCert) -> Smtp {
        let port = super::free_port();
        let mut s = Smtp::with_cert(port, true, cert, &cert.cert_pem);
        s.start_again();
        s
    }

    /// A server for `port` that is not started yet (`start_again` starts it).
    pub fn on_port(port: u16, tls: bool) -> Smtp {
        let (ca, cert_pem, key_pem) = super::dovecot::certificates();
        let cert = super::imap_server::ServerCert { cert_pem, key_pem };
        Smtp::with_cert(port, tls, &cert, &ca)
    }

    fn with_cert(port: u16, tls: bool, cert: &super::imap_server::ServerCert, ca: &str) -> Smtp {
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca).unwrap();
        super::imap_server::write_cert(dir.path(), cert);
        Smtp {
            dir,
            port,
            ca_file,
            tls,
            child: None,
        }
    }

    pub fn start_again(&mut self) {
        let root = self.dir.path();
        let mut cmd = Command::new(PYTHON);
        cmd.args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{}", self.port));
        if self.tls {
            cmd.arg("--tlscert")
                .arg(root.join("cert.pem"))
                .arg("--tlskey")
                .arg(root.join("key.pem"));
        }
        cmd.args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(root.join("maildir"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(cmd.spawn().expect("start aiosmtpd"));
        assert!(
            wait_until(Duration::from_secs(20), || TcpStream::connect((
                "127.0.0.1",
                self.port
            ))
            .is_ok()),
            "aiosmtpd did not start"
        );
    }

    /// The mails received so far, raw.
    pub fn mails(&self) -> Vec<Vec<u8>> {
        let dir = self.dir.path().join("maildir/new");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map(|it| it.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files.iter().filter_map(|f| std::fs::read(f).ok()).collect()
    }

    /// (subject, text body) of every mail received.
    pub fn received(&self) -> Vec<(String, String)> {
        self.mails()
            .iter()
            .filter_map(|raw| {
                let m = mail_parser::MessageParser::default().parse(raw)?;
                Some((
                    m.subject().unwrap_or_default().to_string(),
                    m.body_text(0).map(|b| b.into_owned()).unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// The `[email]` section for this server.
    pub fn config(&self, extra: &str) -> String {
        let (tls, ca) = if self.tls {
            ("starttls", format!("ca_file = {:?}\n", self.ca_file))
        } else {
            ("none", String::new())
        };
        format!(
            "[email]\nenabled = true\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {}\ntls = \"{tls}\"\n{ca}\
             from = \"mastsub <mastsub@archive.example>\"\nto = [\"astronomer@uni.example\"]\n\
             retry_initial = \"300ms\"\nretry_max = \"1s\"\n{extra}\n",
            self.port
        )
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Smtp {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
