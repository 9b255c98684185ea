//! Shared test helpers: a workspace with its own config, the real binary as a daemon, notice builders,
//! and the MAST stand-in (`mast.rs`).
#![allow(dead_code)] // each test crate uses its own subset

pub mod certs;
pub mod cyrus;
pub mod dovecot;
pub mod imap4d;
pub mod imap_server;
pub mod mast;
pub mod moto;
pub mod nginx;
pub mod postgres;
pub mod smtp;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A loopback port free now for a server a test starts, never the same twice in one test process: a port
/// released by `bind(0)` can be handed to the next caller at once, and two servers of tests running in
/// parallel would then share it (the second failing to bind while the first answers for it).
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// The sample notice of ../shared/samples, kept in the repo so a lone clone tests too.
pub fn sample_notice() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/JWST.json")
}

/// A temp directory with a config file whose paths all point inside it.
pub struct Workspace {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Workspace {
    pub fn new() -> Workspace {
        Workspace::with_config("")
    }

    /// `extra` is TOML appended to the generated config (whole sections only).
    pub fn with_config(extra: &str) -> Workspace {
        Workspace::with_base("http://127.0.0.1:9", extra)
    }

    /// A workspace whose MAST is `base_url` (a stand-in), with retries fast enough for tests: tweak
    /// `[download]` through `MASTSUB_DOWNLOAD__*` variables, since `extra` cannot repeat that section.
    pub fn with_base(base_url: &str, extra: &str) -> Workspace {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path();
        let config = root.join("mastsub.toml");
        let text = format!(
            "[storage]\ndatabase = {:?}\ndownloads = {:?}\n\n[inbox]\ndir = {:?}\nsettle = \"100ms\"\n\n\
             [mast]\nbase_url = {base_url:?}\n\n[log]\nlevel = \"debug,sqlx=warn\"\n\n\
             [download]\nretry_initial = \"20ms\"\nretry_max = \"200ms\"\nread_timeout = \"5s\"\n\
             not_found_retry = \"200ms\"\nnot_found_give_up = \"3s\"\nmin_free_space = \"0B\"\n\n{extra}",
            root.join("mastsub.db"),
            root.join("mastDownload"),
            root.join("inbox"),
        );
        std::fs::write(&config, text).expect("write config");
        Workspace { dir, config }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn inbox(&self) -> PathBuf {
        self.path("inbox")
    }

    pub fn db(&self) -> PathBuf {
        self.path("mastsub.db")
    }

    /// The binary with `--config` set, run in the workspace.
    pub fn cmd(&self) -> assert_cmd::Command {
        let mut c = assert_cmd::Command::cargo_bin("mastsub").expect("binary");
        c.arg("--config")
            .arg(&self.config)
            .current_dir(self.dir.path());
        c.env_remove("RUST_LOG");
        c
    }

    /// `status --json` as a value.
    pub fn status(&self) -> Value {
        let out = self
            .cmd()
            .args(["status", "--json"])
            .output()
            .expect("status");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Writes a notice file somewhere in the workspace (not the inbox).
    pub fn write_notice(&self, name: &str, body: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, body).expect("write notice");
        p
    }

    /// Puts a notice into the inbox atomically (write beside, rename in), as a mail filter would.
    pub fn drop_notice(&self, name: &str, body: &[u8]) -> PathBuf {
        std::fs::create_dir_all(self.inbox()).unwrap();
        let staged = self.path(&format!("{name}.staged"));
        std::fs::write(&staged, body).unwrap();
        let dest = self.inbox().join(name);
        std::fs::rename(&staged, &dest).unwrap();
        dest
    }

    /// Every file under `rel`, recursively, as paths relative to it.
    pub fn tree(&self, rel: &str) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
                }
            }
        }
        let root = self.path(rel);
        let mut out = Vec::new();
        walk(&root, &root, &mut out);
        out.sort();
        out
    }

    /// The number of download jobs in `state`.
    pub fn jobs_in(&self, state: &str) -> i64 {
        self.query_i64(&format!(
            "SELECT count(*) FROM downloads WHERE state = '{state}'"
        ))
    }

    pub fn files_in(&self, rel: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(rel))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// One integer from a read-only SQL query on the workspace's database.
    pub fn query_i64(&self, sql: &str) -> i64 {
        self.with_db(true, sql, |pool, sql| async move {
            sqlx::query_scalar(&sql)
                .fetch_one(&pool)
                .await
                .expect("query")
        })
    }

    /// One text value from a read-only SQL query on the workspace's database.
    pub fn query_string(&self, sql: &str) -> String {
        self.with_db(true, sql, |pool, sql| async move {
            sqlx::query_scalar(&sql)
                .fetch_one(&pool)
                .await
                .expect("query")
        })
    }

    /// The first column of every row of a read-only SQL query, as integers.
    pub fn query_column_i64(&self, sql: &str) -> Vec<i64> {
        self.with_db(true, sql, |pool, sql| async move {
            sqlx::query_scalar(&sql)
                .fetch_all(&pool)
                .await
                .expect("query")
        })
    }

    /// Runs one write statement on the workspace's database (to put a job in a state no API sets yet).
    pub fn execute(&self, sql: &str) {
        self.with_db(false, sql, |pool, sql| async move {
            sqlx::query(&sql).execute(&pool).await.expect("execute");
        })
    }

    /// Opens the database (read-only or not) on a runtime of its own and runs `f` with it.
    fn with_db<T, F, Fut>(&self, read_only: bool, sql: &str, f: F) -> T
    where
        F: FnOnce(sqlx::SqlitePool, String) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let opts = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(self.db())
            .read_only(read_only);
        let sql = sql.to_string();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let pool = sqlx::SqlitePool::connect_with(opts).await.expect("open db");
            let out = f(pool.clone(), sql).await;
            pool.close().await;
            out
        })
    }
}

/// The daemon, started from the real binary, with its stderr collected.
pub struct Daemon {
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn start(ws: &Workspace) -> Daemon {
        Daemon::start_with_env(ws, &[])
    }

    pub fn start_with_env(ws: &Workspace, env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn(ws, &["--config", ws.config.to_str().unwrap(), "run"], env)
    }

    /// `mastsub run` with no config file at all, in the workspace: the README's first command.
    pub fn start_on_defaults(ws: &Workspace) -> Daemon {
        Daemon::spawn(ws, &["run"], &[])
    }

    /// `mastsub run` in a PID namespace of its own (`unshare --pid --fork`, as root), so that other
    /// processes judge it as they would a process of another host: by its lease only. `None` where
    /// namespaces cannot be made (not root).
    pub fn start_as_another_host(ws: &Workspace, env: &[(&str, &str)]) -> Option<Daemon> {
        let probe = Command::new("unshare")
            .args(["--pid", "--fork", "true"])
            .status()
            .ok()?;
        if !probe.success() {
            return None;
        }
        let config = ws.config.to_str().unwrap().to_string();
        Some(Daemon::spawn_with(
            ws,
            "unshare",
            &[
                "--pid",
                "--fork",
                "--kill-child",
                env!("CARGO_BIN_EXE_mastsub"),
                "--config",
                &config,
                "run",
            ],
            env,
        ))
    }

    /// The pids of this daemon's process and its children (for `unshare`, the daemon itself).
    pub fn pids(&self) -> Vec<i32> {
        let pid = self.pid();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        std::iter::once(pid)
            .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
            .collect()
    }

    fn spawn(ws: &Workspace, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        Daemon::spawn_with(ws, env!("CARGO_BIN_EXE_mastsub"), args, env)
    }

    fn spawn_with(ws: &Workspace, program: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(ws.dir.path())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn mastsub run");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("ECHO_DAEMON_LOG").is_some() {
                    eprintln!("daemon: {line}");
                }
                sink.lock().unwrap().push(line);
            }
        });
        Daemon {
            child: Some(child),
            lines,
        }
    }

    /// Starts the daemon and waits until it watches its inbox.
    pub fn start_watching(ws: &Workspace) -> Daemon {
        let d = Daemon::start(ws);
        d.wait_for_log("watching inbox", Duration::from_secs(20));
        d
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn wait_for_log(&self, needle: &str, timeout: Duration) {
        let found = wait_until(timeout, || {
            self.lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains(needle))
        });
        assert!(
            found,
            "no log line containing {needle:?} within {timeout:?}; log:\n{}",
            self.log()
        );
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// Waits up to `timeout` for the daemon to exit on its own; its exit status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for a successful exit; returns how long it took.
    pub fn terminate(&mut self) -> Duration {
        self.stop_with(nix::sys::signal::Signal::SIGTERM)
    }

    /// Sends `signal`, then waits for a successful exit; returns how long it took.
    pub fn stop_with(&mut self, signal: nix::sys::signal::Signal) -> Duration {
        let start = Instant::now();
        if let Some(mut c) = self.child.take() {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), signal).unwrap();
            let deadline = start + Duration::from_secs(30);
            loop {
                if let Ok(Some(status)) = c.try_wait() {
                    assert!(
                        status.success(),
                        "daemon exited with {status}; log:\n{}",
                        self.log()
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "daemon did not stop after SIGTERM; log:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        start.elapsed()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A valid record; `n` makes the event id and file name unique.
pub fn record(n: u64, event_type: &str) -> Value {
    json!({
        "event_id": format!("00000000-0000-4000-8000-{n:012}"),
        "mission": "JWST",
        "fileset": format!("jw{n:05}001001_02201_00001"),
        "filename": format!("jw{n:05}001001_02201_00001_mirimage_cal.fits"),
        "program": 5105,
        "event_type": event_type,
        "archived_date": "2026-03-30T17:53:19.695",
        "public_release_date": "2026-03-30T17:52:27.000"
    })
}

/// A notice of `count` New records numbered from `first`.
pub fn notice_of(first: u64, count: u64) -> Vec<u8> {
    let records: Vec<Value> = (first..first + count).map(|n| record(n, "New")).collect();
    serde_json::to_vec(&records).unwrap()
}

/// A tmpfs mounted for the length of a test (needs root; the test says so and stops if it cannot mount).
pub struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    pub fn mount(dir: &std::path::Path, size: &str) -> Option<SmallDisk> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| SmallDisk(dir.to_path_buf()))
    }

    pub fn grow(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "cannot remount {}", self.0.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A plain HTTP/1.1 GET of the daemon's endpoint on `port`: (status, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status");
    // Bodies here are small: chunked framing only if the server chose it.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}
