//! A real PostgreSQL for the tests of a store shared by several daemons: Debian's server, made with
//! `initdb` in a temp folder and run as the `postgres` user when the tests run as root (PostgreSQL refuses
//! root), on a free loopback port, its socket in the folder. One server per test binary, started by the
//! first test that asks for it and killed with the test process (the parent-death signal); one database
//! per test. `fsync = off`: a crash of the server process loses nothing (the kernel keeps what was
//! written), and the tests do not crash the machine.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::wait_until;

/// The running server.
pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// `postgres` when the tests run as root.
    user: Option<nix::unistd::User>,
    pub port: u16,
    child: Mutex<Option<Child>>,
}

static SHARED: OnceLock<Option<Postgres>> = OnceLock::new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// The newest installed server's `bin` folder.
fn bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
        .collect();
    found.sort_by_key(|b| {
        b.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found.pop()
}

impl Postgres {
    /// This test binary's server; `None` (the test says it is skipped) when PostgreSQL is not installed,
    /// unless `REQUIRE_POSTGRES` is set.
    pub fn shared() -> Option<&'static Postgres> {
        SHARED.get_or_init(Postgres::start).as_ref()
    }

    fn start() -> Option<Postgres> {
        let Some(bin) = bin() else {
            assert!(
                std::env::var_os("REQUIRE_POSTGRES").is_none(),
                "PostgreSQL is required here (REQUIRE_POSTGRES) but not installed (apt-get install \
                 postgresql)"
            );
            eprintln!("SKIPPED: PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        let user = nix::unistd::geteuid()
            .is_root()
            .then(|| nix::unistd::User::from_name("postgres").ok().flatten())
            .flatten();
        let dir = tempfile::tempdir().unwrap();
        if let Some(u) = &user {
            nix::unistd::chown(dir.path(), Some(u.uid), Some(u.gid)).unwrap();
        }
        let out = as_user(Command::new(bin.join("initdb")), user.as_ref(), false)
            .args([
                "-D",
                "data",
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .current_dir(dir.path())
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pg = Postgres {
            port: super::free_port(),
            dir,
            bin,
            user,
            child: Mutex::new(None),
        };
        pg.start_server();
        Some(pg)
    }

    /// Starts the server on the data it has (again, after [`Postgres::kill`]).
    pub fn start_server(&self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let mut command = as_user(
            Command::new(self.bin.join("postgres")),
            self.user.as_ref(),
            true,
        );
        command
            .args(["-D", "data", "-p", &self.port.to_string(), "-k"])
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // The parent-death signal follows the thread that forked, not the process: spawned from the test
        // that first asked, the server would be killed as that test's thread ends, under the tests still
        // running. A thread that lives as long as the test process spawns it.
        let (sent, child) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = sent.send(command.spawn());
            loop {
                std::thread::park();
            }
        });
        let child = child
            .recv()
            .expect("the spawning thread answers")
            .expect("postgres starts");
        *self.child.lock().unwrap() = Some(child);
        let up = wait_until(Duration::from_secs(30), || {
            self.psql("postgres", "SELECT 1")
                .is_ok_and(|o| o.trim() == "1")
        });
        assert!(up, "PostgreSQL did not start:\n{}", self.log());
    }

    /// Kills the server at once (SIGKILL: no shutdown at all) and waits for it to be gone.
    pub fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Its backends go when they see the postmaster gone; a new one cannot start while they hold
        // the shared memory.
        let pid_file = self.dir.path().join("data/postmaster.pid");
        wait_until(Duration::from_secs(20), || {
            self.psql("postgres", "SELECT 1").is_err()
        });
        let _ = std::fs::remove_file(pid_file);
    }

    /// A new, empty database for one test; its URL.
    pub fn database(&self, prefix: &str) -> String {
        let name = format!(
            "{}_{}_{}",
            prefix
                .to_ascii_lowercase()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            std::process::id(),
            DATABASES.fetch_add(1, Ordering::Relaxed)
        );
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        self.url(&name)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `sql` with psql on database `name`: its unaligned, tuples-only output, or its error.
    pub fn psql(&self, name: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(name))
            .args(["-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The folder holding the data and the socket.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// `command` run as `user` (when the tests run as root); with `tied`, killed when the thread that spawns it
/// ends (the parent-death signal, set after the change of user, which clears it): spawn it from a thread
/// that lives as long as the process.
fn as_user(mut command: Command, user: Option<&nix::unistd::User>, tied: bool) -> Command {
    let ids = user.map(|u| (u.uid, u.gid));
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(move || {
            if let Some((uid, gid)) = ids {
                nix::unistd::setgroups(&[]).map_err(std::io::Error::from)?;
                nix::unistd::setgid(gid).map_err(std::io::Error::from)?;
                nix::unistd::setuid(uid).map_err(std::io::Error::from)?;
            }
            if tied {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    command
}
