//! A real Dovecot for the IMAP tests, started by the test itself: a generated config in a temp dir, a
//! passwd-file user, Maildir storage, a CA and a server certificate made with rcgen, loopback ports chosen
//! free at run time. Mail is delivered with IMAP APPEND through a small blocking client, which the tests
//! also use to look into mailboxes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::imap_server::{ImapServer, ServerCert};
use super::wait_until;

/// The test user and password.
pub const USER: &str = "notices";
pub const PASSWORD: &str = "imap-secret-3f9a";

/// The one OAuth2 access token the test's token introspection endpoint calls active.
pub const OAUTH2_TOKEN: &str = "ya29.test-access-token-5d1e";

/// Where Debian's package puts the server.
const DOVECOT: &str = "/usr/sbin/dovecot";

/// Whether Dovecot is installed (`.ci/run` installs `dovecot-imapd`).
pub fn available() -> bool {
    Path::new(DOVECOT).exists()
}

/// A running Dovecot.
pub struct Dovecot {
    pub dir: tempfile::TempDir,
    /// Plain IMAP, and STARTTLS.
    pub port: u16,
    /// Implicit TLS.
    pub tls_port: u16,
    /// The CA that signed the server's certificate, for `imap.ca_file`.
    pub ca_file: PathBuf,
    child: Option<Child>,
}

fn current_user() -> (u32, u32, String) {
    let uid = nix::unistd::getuid();
    let gid = nix::unistd::getgid();
    let name = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "root".into());
    (uid.as_raw(), gid.as_raw(), name)
}

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM: (ca, cert, key).
pub fn certificates() -> (String, String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
        SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name
        .push(DnType::CommonName, "mastsub test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name
        .push(DnType::CommonName, "127.0.0.1");
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// An OAuth2 token introspection endpoint (RFC 7662) for Dovecot's oauth2 passdb, on a thread: active
/// for `OAUTH2_TOKEN` only. Returns its URL.
fn introspection_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/introspect", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then a body of Content-Length bytes.
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request);
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&request);
            let body = if text.contains(&format!("token={OAUTH2_TOKEN}"))
                || text.contains(&format!("Bearer {OAUTH2_TOKEN}"))
            {
                format!(r#"{{"active":true,"username":"{USER}"}}"#)
            } else {
                r#"{"active":false}"#.to_string()
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}

impl Dovecot {
    /// The `[imap]` section that points mastsub at this server over implicit TLS (its CA trusted), as the
    /// test user, taking mail from `@stsci.edu`; `extra` is more keys of the section.
    pub fn imap_section(&self, extra: &str) -> String {
        format!(
            r#"
[imap]
enabled = true
host = "127.0.0.1"
port = {port}
tls = "implicit"
ca_file = "{ca}"
username = "{USER}"
password = "{PASSWORD}"
allowed_senders = ["@stsci.edu"]
timeout = "5s"
{extra}
"#,
            port = self.tls_port,
            ca = self.ca_file.display(),
        )
    }

    /// Writes the configuration and starts the server; waits until both ports answer.
    pub fn start() -> Dovecot {
        Dovecot::start_with("")
    }

    /// `start`, with `extra` appended to the configuration (e.g. an `imap_capability` list).
    pub fn start_with(extra: &str) -> Dovecot {
        let (ca, cert_pem, key_pem) = certificates();
        Dovecot::configure(extra, ServerCert { cert_pem, key_pem }, &ca)
    }

    /// `start` with `cert` as the server's certificate; `ca_file` is then that certificate itself.
    pub fn start_with_cert(cert: ServerCert) -> Dovecot {
        let ca = cert.cert_pem.clone();
        Dovecot::configure("", cert, &ca)
    }

    fn configure(extra: &str, cert: ServerCert, ca: &str) -> Dovecot {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let ca_file = root.join("ca.pem");
        std::fs::write(&ca_file, ca).unwrap();
        super::imap_server::write_cert(root, &cert);
        let (uid, gid, name) = current_user();
        // Dovecot never opens mail as root: as root, the mail belongs to the package's `dovecot` user.
        let (mail_uid, mail_gid) = if uid == 0 {
            let u = nix::unistd::User::from_name("dovecot")
                .ok()
                .flatten()
                .expect("the dovecot user of Debian's package");
            (u.uid.as_raw(), u.gid.as_raw())
        } else {
            (uid, gid)
        };
        std::fs::write(
            root.join("passwd"),
            format!(
                "{USER}:{{PLAIN}}{PASSWORD}:{mail_uid}:{mail_gid}::{}::\n",
                root.join("home").display()
            ),
        )
        .unwrap();
        for d in ["run", "state", "home", "mail"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        for d in ["home", "mail"] {
            nix::unistd::chown(
                &root.join(d),
                Some(nix::unistd::Uid::from_raw(mail_uid)),
                Some(nix::unistd::Gid::from_raw(mail_gid)),
            )
            .expect("chown the mail folders");
        }
        // As root, the package's unprivileged users run the login and internal processes; otherwise
        // everything runs as the current user.
        let (internal, login) = if uid == 0 {
            ("dovecot".to_string(), "dovenull".to_string())
        } else {
            (name.clone(), name)
        };
        let (port, tls_port) = (super::free_port(), super::free_port());
        let introspection = introspection_endpoint();
        std::fs::write(
            root.join("oauth2.conf"),
            format!(
                "introspection_mode = post\nintrospection_url = {introspection}\n\
                 username_attribute = username\nactive_attribute = active\nactive_value = true\n"
            ),
        )
        .unwrap();
        let r = root.display();
        let config = format!(
            r#"
base_dir = {r}/run
state_dir = {r}/state
log_path = {r}/dovecot.log
info_log_path = {r}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{r}/cert.pem
ssl_key = <{r}/key.pem
ssl_min_protocol = TLSv1.2
disable_plaintext_auth = no
auth_mechanisms = plain login xoauth2 oauthbearer
first_valid_uid = 0
first_valid_gid = 0
default_internal_user = {internal}
default_login_user = {login}
mail_location = maildir:{r}/mail/%u
mail_uid = {mail_uid}
mail_gid = {mail_gid}
imap_idle_notify_interval = 10 secs
mailbox_idle_check_interval = 1 secs
{extra}
passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {r}/passwd
}}
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {r}/oauth2.conf
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {r}/passwd
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
service anvil {{
  chroot =
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0666
  }}
}}
"#
        );
        std::fs::write(root.join("dovecot.conf"), config).unwrap();
        // Everything under the temp dir must be reachable by the unprivileged processes.
        let _ = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(root)
            .status();
        let mut d = Dovecot {
            dir,
            port,
            tls_port,
            ca_file,
            child: None,
        };
        d.start_again();
        d
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("dovecot.conf")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dovecot.log")).unwrap_or_default()
    }

    /// Starts the server (again, after `stop`), and waits until it serves IMAP.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "Dovecot is running already");
        let child = Command::new(DOVECOT)
            .arg("-F")
            .arg("-c")
            .arg(self.conf())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dovecot");
        self.child = Some(child);
        let up = wait_until(Duration::from_secs(20), || {
            Imap::connect(self.port).is_some()
        });
        if !up {
            let mut err = String::new();
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
                if let Some(mut e) = c.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
            }
            panic!("Dovecot did not start: {err}\nlog:\n{}", self.log());
        }
    }

    /// Stops the server (SIGTERM to the master, which ends every connection) and waits for the port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
        let down = wait_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", self.port)).is_err()
        });
        assert!(down, "Dovecot still answers after being stopped");
    }

    /// A logged-in client for the test user.
    pub fn client(&self) -> Imap {
        let mut c = Imap::connect(self.port).expect("connect to Dovecot");
        if let Err(e) = c.command(&format!("LOGIN {USER} {PASSWORD}")) {
            panic!("LOGIN to Dovecot: {e}\nDovecot's log:\n{}", self.log());
        }
        c
    }

    /// Delivers `mail` into `mailbox` with APPEND.
    pub fn deliver(&self, mailbox: &str, mail: &[u8]) {
        let mut c = self.client();
        c.append(mailbox, mail);
        c.logout();
    }

    /// The UIDs in `mailbox` (with `criteria`, e.g. "ALL" or "UNSEEN").
    pub fn uids(&self, mailbox: &str, criteria: &str) -> Vec<u32> {
        let mut c = self.client();
        let uids = c.uids("SELECT", mailbox, criteria);
        c.logout();
        uids
    }
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }
}

impl ImapServer for Dovecot {
    fn name(&self) -> &'static str {
        "Dovecot"
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

    fn client(&self) -> Imap {
        Dovecot::client(self)
    }

    /// Maildir++: the separator is `.`, folders sit beside INBOX ("MAST/processed" is "MAST.processed").
    fn mailbox_name(&self, path: &str) -> String {
        let path = path.trim_matches('/');
        if path.eq_ignore_ascii_case("INBOX") {
            return "INBOX".into();
        }
        path.replace('/', ".")
    }

    fn stop(&mut self) {
        Dovecot::stop(self)
    }

    fn start_again(&mut self) {
        Dovecot::start_again(self)
    }

    fn log(&self) -> String {
        Dovecot::log(self)
    }

    /// imap-login logs each refused login as "Disconnected (auth failed, N attempts …)" or, when the
    /// client logs out, "Aborted login by logging out (auth failed, …)": one line per connection, when
    /// it ends, N the attempts on it.
    fn failed_logins(&self) -> usize {
        Dovecot::log(self)
            .lines()
            .filter_map(|l| {
                let at = l.find("(auth failed, ")?;
                let rest = &l[at + "(auth failed, ".len()..];
                rest.split_whitespace().next()?.parse::<usize>().ok()
            })
            .sum()
    }
}

/// A minimal blocking IMAP client over plain TCP, for delivering and inspecting mail.
pub struct Imap {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    tag: u32,
}

impl Imap {
    pub fn connect(port: u16) -> Option<Imap> {
        let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let mut imap = Imap {
            reader: BufReader::new(stream.try_clone().ok()?),
            writer: stream,
            tag: 0,
        };
        let mut greeting = String::new();
        imap.reader.read_line(&mut greeting).ok()?;
        greeting.starts_with("* OK").then_some(imap)
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.reader.read_line(&mut l).expect("a line from Dovecot");
        assert!(!l.is_empty(), "Dovecot closed the connection");
        l.trim_end().to_string()
    }

    /// Sends a command; returns the untagged lines, or the tagged failure as Err.
    pub fn command(&mut self, command: &str) -> Result<Vec<String>, String> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        write!(self.writer, "{tag} {command}\r\n").unwrap();
        self.finish(&tag)
    }

    fn finish(&mut self, tag: &str) -> Result<Vec<String>, String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line();
            if let Some(rest) = l.strip_prefix(&format!("{tag} ")) {
                return if rest.starts_with("OK") {
                    Ok(lines)
                } else {
                    Err(rest.to_string())
                };
            }
            lines.push(l);
        }
    }

    /// A command that must succeed.
    pub fn ok(&mut self, command: &str) -> Vec<String> {
        self.command(command)
            .unwrap_or_else(|e| panic!("{command}: {e}"))
    }

    pub fn append(&mut self, mailbox: &str, mail: &[u8]) {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        write!(
            self.writer,
            "{tag} APPEND \"{mailbox}\" {{{}}}\r\n",
            mail.len()
        )
        .unwrap();
        let go = self.line();
        assert!(go.starts_with('+'), "APPEND refused: {go}");
        self.writer.write_all(mail).unwrap();
        self.writer.write_all(b"\r\n").unwrap();
        self.finish(&tag)
            .unwrap_or_else(|e| panic!("APPEND to {mailbox}: {e}"));
    }

    /// Appends every mail of `mails` with one MULTIAPPEND command (RFC 3502) and LITERAL+ (RFC 7888): a
    /// single round trip, for servers that offer both (Dovecot).
    pub fn append_many(&mut self, mailbox: &str, mails: &[Vec<u8>]) {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        let mut command = format!("{tag} APPEND \"{mailbox}\"").into_bytes();
        for mail in mails {
            command.extend_from_slice(format!(" {{{}+}}\r\n", mail.len()).as_bytes());
            command.extend_from_slice(mail);
        }
        command.extend_from_slice(b"\r\n");
        self.writer.write_all(&command).unwrap();
        self.finish(&tag)
            .unwrap_or_else(|e| panic!("MULTIAPPEND to {mailbox}: {e}"));
    }

    /// Opens `mailbox` with `open` (SELECT, or EXAMINE to leave it as it is) and returns the UIDs
    /// `UID SEARCH criteria` gives, in order; none when the mailbox is not there (yet).
    pub fn uids(&mut self, open: &str, mailbox: &str, criteria: &str) -> Vec<u32> {
        if self.command(&format!("{open} \"{mailbox}\"")).is_err() {
            return Vec::new();
        }
        let mut uids: Vec<u32> = self
            .ok(&format!("UID SEARCH {criteria}"))
            .iter()
            .filter_map(|l| l.strip_prefix("* SEARCH"))
            .flat_map(|rest| rest.split_whitespace().map(|n| n.parse::<u32>().unwrap()))
            .collect();
        uids.sort_unstable();
        uids
    }

    pub fn logout(&mut self) {
        let _ = self.command("LOGOUT");
    }
}

/// A mail builder for the tests.
pub mod mails {
    use std::sync::atomic::{AtomicU64, Ordering};

    static SEQ: AtomicU64 = AtomicU64::new(1);

    fn id() -> u64 {
        SEQ.fetch_add(1, Ordering::Relaxed)
    }

    /// Base64 in lines of 76 characters, as mail carries it.
    fn base64(bytes: &[u8]) -> String {
        use base64::Engine;
        let text = base64::engine::general_purpose::STANDARD.encode(bytes);
        text.as_bytes()
            .chunks(76)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    fn quoted_printable(bytes: &[u8]) -> String {
        let mut out = String::new();
        let mut width = 0;
        for &b in bytes {
            let piece = if (b == b'\t' || b == b' ' || (33..=126).contains(&b)) && b != b'=' {
                (b as char).to_string()
            } else {
                format!("={b:02X}")
            };
            if width + piece.len() > 72 {
                out.push_str("=\r\n");
                width = 0;
            }
            width += piece.len();
            out.push_str(&piece);
        }
        out
    }

    /// How an attachment is encoded.
    pub enum Encoding {
        Base64,
        QuotedPrintable,
    }

    /// A JSON attachment part.
    pub fn json_part(name: &str, notice: &[u8], encoding: Encoding) -> String {
        match encoding {
            Encoding::Base64 => format!(
                "Content-Type: application/json; name=\"{name}\"\r\n\
                 Content-Disposition: attachment; filename=\"{name}\"\r\n\
                 Content-Transfer-Encoding: base64\r\n\r\n{}\r\n",
                base64(notice)
            ),
            Encoding::QuotedPrintable => format!(
                "Content-Type: application/octet-stream; name=\"{name}\"\r\n\
                 Content-Disposition: attachment; filename=\"{name}\"\r\n\
                 Content-Transfer-Encoding: quoted-printable\r\n\r\n{}\r\n",
                quoted_printable(notice)
            ),
        }
    }

    /// A mail from `from` with `parts` (a text part comes first).
    pub fn mail(from: &str, parts: &[String]) -> Vec<u8> {
        let n = id();
        let mut m = format!(
            "From: {from}\r\nTo: notices@archive.example\r\nSubject: MAST notice {n}\r\n\
             Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nMessage-ID: <mastsub-test-{n}@mast.example>\r\n\
             MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"=b{n}\"\r\n\r\n\
             --=b{n}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nNew data are available.\r\n"
        );
        for p in parts {
            m.push_str(&format!("--=b{n}\r\n{p}"));
        }
        m.push_str(&format!("--=b{n}--\r\n"));
        m.into_bytes()
    }

    /// A mail from MAST with one base64 notice attached.
    pub fn notice_mail(notice: &[u8]) -> Vec<u8> {
        mail(
            "MAST Notifications <archive@stsci.edu>",
            &[json_part(
                "event_metadata_jwst.json",
                notice,
                Encoding::Base64,
            )],
        )
    }

    /// `inner` forwarded by a colleague as `message/rfc822`.
    pub fn forwarded(from: &str, inner: &[u8]) -> Vec<u8> {
        mail(
            from,
            &[format!(
                "Content-Type: message/rfc822\r\nContent-Disposition: attachment\r\n\r\n{}\r\n",
                String::from_utf8_lossy(inner)
            )],
        )
    }
}
