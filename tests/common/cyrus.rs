//! A real Cyrus IMAP 3.6 (Debian 12's cyrus-imapd) for the IMAP tests, started by the test itself.
//!
//! Debian's package conflicts with dovecot-imapd, so it is not installed: `tests/servers/install-cyrus.sh`
//! unpacks cyrus-common and cyrus-imapd into `/opt/mastsub-test/cyrus` (or `$MASTSUB_CYRUS_ROOT`),
//! installs their libraries and sasl2-bin, creates the system user `cyrus` (group `mail`) that Cyrus drops
//! root to, and builds `syslog-to-file.so`, an LD_PRELOAD library that writes Cyrus's syslog() into a file
//! (Cyrus logs only to syslog; this machine has no /dev/log).
//!
//! Each server lives in a temp dir: its own imapd.conf, made of Debian's stock /etc/imapd.conf from the
//! package with only the paths replaced (so `altnamespace: no` and `unixhierarchysep: no`: personal folders
//! are `INBOX.<name>`, the separator is `.`, and a user cannot create a top-level folder), plus TLS, SASL
//! and the test's settings; its own cyrus.conf with `imap` (plain + STARTTLS) and `imaps` (`imapd -s`) on
//! free loopback ports and `idled`, so that IDLE announces new mail at once (`imapidlepoll: 1` is the
//! fallback). The master runs in the foreground (`-D`) in a process group of its own, as `cyrus` when the
//! tests run as root, else as the current user (`$CYRUS_USER`). Users are in a sasldb made with
//! saslpasswd2 (`sasl_pwcheck_method: auxprop`, `sasl_auxprop_plugin: sasldb`, `PLAIN LOGIN`): the test
//! user, and an admin that creates the test user's mailbox `user.notices` (the user's INBOX).
//!
//! Quirks: a refused login answers only after `failedloginpause` (3 s by default, kept); CREATE "Processed"
//! is "NO Permission denied", CREATE "MAST/processed" is "NO Invalid mailbox name".

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::dovecot::{Imap, PASSWORD, USER};
use super::imap_server::{ImapServer, ServerCert, write_cert};
use super::wait_until;

/// The Cyrus admin (`admins:`), who creates the test user's mailbox.
pub const ADMIN: &str = "cyrusadmin";
pub const ADMIN_PASSWORD: &str = "cyrus-admin-8b4d";

/// Where `tests/servers/install-cyrus.sh` unpacks the packages.
pub fn root() -> PathBuf {
    std::env::var_os("MASTSUB_CYRUS_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mastsub-test/cyrus"))
}

fn bin(name: &str) -> PathBuf {
    root().join("usr/lib/cyrus/bin").join(name)
}

const SASLPASSWD2: &str = "/usr/sbin/saslpasswd2";

/// Whether the unpacked Cyrus (and saslpasswd2) are there: `tests/servers/install-cyrus.sh`.
pub fn available() -> bool {
    bin("master").exists() && bin("imapd").exists() && Path::new(SASLPASSWD2).exists()
}

/// The pids of the live (not zombie) processes in process group `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
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
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string() {
            pids.push(pid);
        }
    }
    pids
}

/// The user the services run as: `cyrus` as root (Cyrus drops root to it), else the current user.
fn run_user() -> nix::unistd::User {
    let name = if nix::unistd::getuid().is_root() {
        "cyrus".to_string()
    } else {
        nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .expect("the current user")
            .name
    };
    nix::unistd::User::from_name(&name)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no user {name}: run tests/servers/install-cyrus.sh"))
}

/// A running Cyrus.
pub struct Cyrus {
    pub dir: tempfile::TempDir,
    /// Plain IMAP, and STARTTLS.
    pub port: u16,
    /// Implicit TLS.
    pub tls_port: u16,
    /// The CA of the default certificate (for `start_with_cert`: the given certificate itself).
    pub ca_file: PathBuf,
    user: nix::unistd::User,
    child: Option<Child>,
    /// The process group of the master and its services (its pid), kept after `stop`.
    pgid: Option<i32>,
}

/// The keys of the stock imapd.conf that name paths; they are replaced by ones in the temp dir.
const PATH_KEYS: &[&str] = &[
    "configdirectory",
    "proc_path",
    "mboxname_lockpath",
    "partition-default",
    "partition-news",
    "newsspool",
    "sievedir",
    "lmtpsocket",
    "idlesocket",
    "notifysocket",
    "syslog_prefix",
];

impl Cyrus {
    /// Starts Cyrus with a certificate for 127.0.0.1 and localhost from a private CA (`ca_file`).
    pub fn start() -> Cyrus {
        let (ca, cert_pem, key_pem) = super::dovecot::certificates();
        let mut c = Cyrus::configure(ServerCert { cert_pem, key_pem });
        std::fs::write(&c.ca_file, ca).unwrap();
        c.start_again();
        c.create_user_inbox();
        c
    }

    /// Starts Cyrus with `cert`; `ca_file` then holds that certificate.
    pub fn start_with_cert(cert: ServerCert) -> Cyrus {
        let mut c = Cyrus::configure(cert.clone());
        std::fs::write(&c.ca_file, &cert.cert_pem).unwrap();
        c.start_again();
        c.create_user_inbox();
        c
    }

    /// Writes the temp dir: folders, certificate, sasldb, imapd.conf, cyrus.conf.
    fn configure(cert: ServerCert) -> Cyrus {
        assert!(
            available(),
            "Cyrus is not unpacked: run tests/servers/install-cyrus.sh"
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let base = dir.path().to_path_buf();
        // The services run as `cyrus`, which must reach into the temp dir.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let user = run_user();
        let conf = base.join("conf");
        for d in [
            "db", "proc", "socket", "log", "msg", "user", "quota", "lock",
        ] {
            std::fs::create_dir_all(conf.join(d)).unwrap();
        }
        for d in ["spool", "sieve"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
        }
        let (cert_file, key_file) = write_cert(&base, &cert);
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let sasldb = base.join("sasldb2");
        for (name, password) in [(ADMIN, ADMIN_PASSWORD), (USER, PASSWORD)] {
            let mut p = Command::new(SASLPASSWD2)
                .args(["-p", "-c", "-f"])
                .arg(&sasldb)
                .arg(name)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("run saslpasswd2");
            p.stdin
                .take()
                .unwrap()
                .write_all(password.as_bytes())
                .unwrap();
            let out = p.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "saslpasswd2 {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let syslog = base.join("syslog.log");
        std::fs::write(&syslog, "").unwrap();
        std::fs::set_permissions(&syslog, std::fs::Permissions::from_mode(0o666)).unwrap();
        if nix::unistd::getuid().is_root() {
            let mut owned = vec![
                conf.clone(),
                base.join("spool"),
                base.join("sieve"),
                key_file.clone(),
                sasldb.clone(),
                syslog.clone(),
            ];
            for d in [
                "db", "proc", "socket", "log", "msg", "user", "quota", "lock",
            ] {
                owned.push(conf.join(d));
            }
            for p in owned {
                nix::unistd::chown(&p, Some(user.uid), Some(user.gid)).expect("chown to cyrus");
            }
        }

        // Debian's stock imapd.conf, its paths replaced.
        let stock = std::fs::read_to_string(root().join("etc/imapd.conf"))
            .expect("the package's etc/imapd.conf");
        let mut config: String = stock
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter(|l| {
                let key = l.split(':').next().unwrap_or("").trim();
                !PATH_KEYS.contains(&key)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let r = base.display();
        let c = conf.display();
        config.push_str(&format!(
            "\n# mastsub test server\n\
             configdirectory: {c}\n\
             proc_path: {c}/proc\n\
             mboxname_lockpath: {c}/lock\n\
             partition-default: {r}/spool\n\
             sievedir: {r}/sieve\n\
             lmtpsocket: {c}/socket/lmtp\n\
             idlesocket: {c}/socket/idle\n\
             notifysocket: {c}/socket/notify\n\
             syslog_prefix: mastsub-cyrus\n\
             cyrus_user: {user}\n\
             admins: {ADMIN}\n\
             sasl_mech_list: PLAIN LOGIN\n\
             sasl_auxprop_plugin: sasldb\n\
             sasl_sasldb_path: {sasldb}\n\
             tls_server_cert: {cert}\n\
             tls_server_key: {key}\n\
             imapidlepoll: 1\n",
            user = user.name,
            sasldb = sasldb.display(),
            cert = cert_file.display(),
            key = key_file.display(),
        ));
        let imapd_conf = base.join("imapd.conf");
        std::fs::write(&imapd_conf, config).unwrap();

        let (port, tls_port) = (super::free_port(), super::free_port());
        let conf_arg = imapd_conf.display();
        let b = |n: &str| bin(n).display().to_string();
        let cyrus_conf = format!(
            "START {{\n  recover cmd=\"{ctl} -C {conf_arg} -r\"\n}}\n\
             SERVICES {{\n  \
               imap cmd=\"{imapd} -C {conf_arg}\" listen=\"127.0.0.1:{port}\" prefork=0\n  \
               imaps cmd=\"{imapd} -s -C {conf_arg}\" listen=\"127.0.0.1:{tls_port}\" prefork=0\n\
             }}\n\
             DAEMON {{\n  idled cmd=\"{idled} -C {conf_arg}\"\n}}\n",
            ctl = b("ctl_cyrusdb"),
            imapd = b("imapd"),
            idled = b("idled"),
        );
        std::fs::write(base.join("cyrus.conf"), cyrus_conf).unwrap();
        Cyrus {
            ca_file: base.join("ca.pem"),
            dir,
            port,
            tls_port,
            user,
            child: None,
            pgid: None,
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The process group of the master and its services (also after `stop`, to check it is empty).
    pub fn process_group(&self) -> Option<i32> {
        self.pgid
    }

    /// The live processes of this server (master, imapd sessions, idled).
    pub fn processes(&self) -> Vec<i32> {
        self.pgid.map(group_members).unwrap_or_default()
    }

    /// Logs in as the admin and creates the test user's mailbox, `user.notices` (the user's INBOX).
    fn create_user_inbox(&self) {
        let mut c = self.login(ADMIN, ADMIN_PASSWORD);
        if let Err(e) = c.command(&format!("CREATE user.{USER}")) {
            panic!("CREATE user.{USER}: {e}\nlog:\n{}", self.log());
        }
        c.logout();
    }

    fn login(&self, user: &str, password: &str) -> Imap {
        let mut c = Imap::connect(self.port).expect("connect to Cyrus");
        if let Err(e) = c.command(&format!("LOGIN {user} {password}")) {
            panic!("LOGIN {user} to Cyrus: {e}\nlog:\n{}", self.log());
        }
        c
    }

    /// A logged-in client for the test user.
    pub fn client(&self) -> Imap {
        self.login(USER, PASSWORD)
    }

    /// A logged-in client for the admin.
    pub fn admin_client(&self) -> Imap {
        self.login(ADMIN, ADMIN_PASSWORD)
    }

    /// Sends `signal` to the whole process group.
    fn signal_group(&self, signal: nix::sys::signal::Signal) {
        if let Some(pgid) = self.pgid {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), signal);
        }
    }

    /// SIGTERM to the master, which ends its children and then itself; SIGKILL to the whole group if
    /// that takes over 2 s. Waits until no process of the group is left.
    ///
    /// SIGTERM alone is not always enough: Cyrus 3.6's master, shutting down while a connection waits
    /// in a listen queue that no child will accept any more (e.g. one made just before the stop), spins
    /// in pselect() and never reaps its children (and SIGTERM to the whole group at once can make it
    /// miss a child's exit).
    fn kill_all(&mut self) {
        use nix::sys::signal::Signal;
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = self.pgid.unwrap();
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pgid), Signal::SIGTERM);
        let ended = wait_until(Duration::from_secs(2), || {
            matches!(child.try_wait(), Ok(Some(_))) && group_members(pgid).is_empty()
        });
        if !ended {
            self.signal_group(Signal::SIGKILL);
        }
        let _ = child.kill();
        let _ = child.wait();
        wait_until(Duration::from_secs(10), || group_members(pgid).is_empty());
    }
}

impl ImapServer for Cyrus {
    fn name(&self) -> &'static str {
        "Cyrus"
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
        Cyrus::client(self)
    }

    /// Personal folders are under `INBOX.`, with `.` as the separator (`altnamespace: no`,
    /// `unixhierarchysep: no`): "MAST/processed" is "INBOX.MAST.processed".
    fn mailbox_name(&self, path: &str) -> String {
        let path = path.trim_matches('/');
        if path.eq_ignore_ascii_case("INBOX") {
            return "INBOX".into();
        }
        let rest = match path.get(..6) {
            Some(p) if p.eq_ignore_ascii_case("INBOX/") => &path[6..],
            _ => path,
        };
        format!("INBOX.{}", rest.replace('/', "."))
    }

    fn stop(&mut self) {
        self.kill_all();
        let down = wait_until(Duration::from_secs(10), || {
            [self.port, self.tls_port]
                .iter()
                .all(|&p| std::net::TcpStream::connect(("127.0.0.1", p)).is_err())
        });
        assert!(down, "Cyrus still answers after being stopped");
        if let Some(pgid) = self.pgid {
            let left = group_members(pgid);
            assert!(left.is_empty(), "Cyrus processes left after stop: {left:?}");
        }
    }

    fn start_again(&mut self) {
        assert!(self.child.is_none(), "Cyrus is running already");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("master.log"))
            .unwrap();
        let mut cmd = Command::new(bin("master"));
        cmd.arg("-D")
            .arg("-C")
            .arg(self.path("imapd.conf"))
            .arg("-M")
            .arg(self.path("cyrus.conf"))
            .arg("-p")
            .arg(self.path("master.pid"))
            .current_dir(self.dir.path())
            .env("LD_LIBRARY_PATH", root().join("usr/lib/x86_64-linux-gnu"))
            .env("MASTSUB_SYSLOG_FILE", self.path("syslog.log"))
            .env("CYRUS_USER", &self.user.name)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own process group, so that `stop` reaches every session process.
            .process_group(0);
        let shim = root().join("syslog-to-file.so");
        if shim.exists() {
            cmd.env("LD_PRELOAD", shim);
        }
        let child = cmd.spawn().expect("start Cyrus's master");
        self.pgid = Some(child.id() as i32);
        self.child = Some(child);
        // The master binds every listener before it serves any, so a greeting on the plain port means
        // the TLS one is there too. (No probe connection to it: one left unaccepted stalls a stop.)
        let up = wait_until(Duration::from_secs(20), || {
            Imap::connect(self.port).is_some()
        });
        if !up {
            self.kill_all();
            panic!("Cyrus did not start; log:\n{}", self.log());
        }
    }

    /// Cyrus's syslog (through syslog-to-file.so), then the master's stdout and stderr.
    fn log(&self) -> String {
        let syslog = std::fs::read_to_string(self.path("syslog.log")).unwrap_or_default();
        let master = std::fs::read_to_string(self.path("master.log")).unwrap_or_default();
        format!("{syslog}--- master's stdout/stderr ---\n{master}")
    }

    /// The "badlogin:" lines imapd logs for each refused LOGIN or AUTHENTICATE.
    fn failed_logins(&self) -> usize {
        std::fs::read_to_string(self.path("syslog.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("badlogin:"))
            .count()
    }
}

impl Drop for Cyrus {
    fn drop(&mut self) {
        self.kill_all();
    }
}
