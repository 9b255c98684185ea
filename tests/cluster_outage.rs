//! The shared store from the operator's side: a PostgreSQL restart under running members (they wait and
//! carry on, nothing lost), and the commands (`ingest`, `status`, `list`, `retry`) against a database that
//! wants a password, given by `storage.password_file` or libpq's `PGPASSFILE`, never shown. A test binary
//! of its own: it restarts its server and changes its authentication.

mod common;

use std::time::Duration;

use common::mast::{Faults, MastStandIn, assert_identical, serve_products};
use common::postgres::Postgres;
use common::{Daemon, Workspace, notice_of, wait_until};

/// This binary's tests change the server under each other: they take turns.
static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn member(ws: &Workspace, url: &str, node: &str) -> Daemon {
    let inbox = ws.path(&format!("inbox-{node}"));
    let d = Daemon::start_with_env(
        ws,
        &[
            ("MASTSUB_STORAGE__DATABASE", url),
            ("MASTSUB_CLUSTER__NODE", node),
            ("MASTSUB_INBOX__DIR", inbox.to_str().unwrap()),
            ("MASTSUB_DOWNLOAD__LEASE", "3s"),
            ("MASTSUB_DOWNLOAD__WORKERS", "2"),
        ],
    );
    d.wait_for_log("watching inbox", Duration::from_secs(30));
    d
}

#[test]
fn members_wait_out_a_database_restart_and_carry_on_losing_nothing() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let mast = MastStandIn::start();
    mast.set_faults(Faults {
        trickle_bytes_per_sec: Some(300_000),
        ..Faults::default()
    });
    let (notice, files) = serve_products(&mast, 1, 10, 150);
    let Some(pg) = Postgres::shared() else {
        return;
    };
    let url = pg.database("outage");
    let db = url.rsplit('/').next().unwrap().to_string();
    let ws = Workspace::with_base(&mast.base_url, "");
    let mut a = member(&ws, &url, "node-a");
    let mut b = member(&ws, &url, "node-b");
    let inbox = ws.path("inbox-node-a");
    std::fs::create_dir_all(&inbox).unwrap();
    std::fs::write(ws.path("n.staged"), &notice).unwrap();
    std::fs::rename(ws.path("n.staged"), inbox.join("n.json")).unwrap();
    let count = |sql: &str| {
        pg.psql(&db, sql)
            .ok()
            .and_then(|o| o.trim().parse::<i64>().ok())
    };
    assert!(
        wait_until(Duration::from_secs(60), || count(
            "SELECT count(*) FROM downloads WHERE state = 'running' AND bytes_done > 0"
        )
        .is_some_and(|n| n > 0)),
        "no download under way:\n{}\n{}",
        a.log(),
        b.log()
    );
    // The server dies mid-download (no shutdown at all), and comes back after a while.
    pg.kill();
    std::thread::sleep(Duration::from_secs(4));
    pg.start_server();
    let done = || count("SELECT count(*) FROM downloads WHERE state = 'done'") == Some(10);
    assert!(
        wait_until(Duration::from_secs(180), done),
        "not all done after the restart: {:?}\n--- node-a:\n{}\n--- node-b:\n{}",
        pg.psql(&db, "SELECT state, count(*) FROM downloads GROUP BY state"),
        a.log(),
        b.log()
    );
    // Both members are still running: they waited, they did not give up.
    assert!(a.is_running(), "node-a exited:\n{}", a.log());
    assert!(b.is_running(), "node-b exited:\n{}", b.log());
    assert_identical(&ws, &files);
    assert_eq!(count("SELECT count(*) FROM events"), Some(10));
    // A notice after the restart is taken as usual.
    std::fs::write(ws.path("m.staged"), notice_of(500, 2)).unwrap();
    std::fs::rename(ws.path("m.staged"), ws.path("inbox-node-b").join("m.json")).unwrap();
    assert!(wait_until(Duration::from_secs(30), || count(
        "SELECT count(*) FROM events"
    ) == Some(12)));
    a.terminate();
    b.terminate();
}

#[test]
fn commands_work_against_a_database_that_wants_a_password_which_is_never_shown() {
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(pg) = Postgres::shared() else {
        return;
    };
    // A role that must give its password (scram-sha-256), the others trusted as before.
    let hba = pg.dir().join("data/pg_hba.conf");
    let before = std::fs::read_to_string(&hba).unwrap();
    if !before.contains("mastsub_pw") {
        std::fs::write(
            &hba,
            format!("host all mastsub_pw 127.0.0.1/32 scram-sha-256\n{before}"),
        )
        .unwrap();
        pg.psql(
            "postgres",
            "CREATE ROLE mastsub_pw LOGIN PASSWORD 'pw-never-shown-42'",
        )
        .unwrap();
        pg.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    }
    let name = format!("pwdb_{}", std::process::id());
    pg.psql(
        "postgres",
        &format!("CREATE DATABASE {name} OWNER mastsub_pw"),
    )
    .unwrap();
    let url = format!("postgresql://mastsub_pw@127.0.0.1:{}/{name}", pg.port);
    let ws = Workspace::new();
    let secret = ws.path("db-password");
    std::fs::write(&secret, "pw-never-shown-42\n").unwrap();
    let wrong = ws.path("wrong-password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = ws.cmd();
        cmd.args(args)
            .env("MASTSUB_STORAGE__DATABASE", &url)
            .env_remove("PGPASSWORD")
            .env_remove("PGPASSFILE")
            .timeout(Duration::from_secs(90));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!text.contains("pw-never-shown-42"), "{args:?}: {text}");
        (out.status.success(), text)
    };
    let with_file = [("MASTSUB_STORAGE__PASSWORD_FILE", secret.to_str().unwrap())];
    // No password: refused by the server, said with the database's name.
    let (ok, text) = run(&["ingest", common::sample_notice().to_str().unwrap()], &[]);
    assert!(!ok, "{text}");
    assert!(text.contains(&url), "{text}");
    // A wrong one: the server's refusal, not the password.
    let (ok, text) = run(
        &["status"],
        &[("MASTSUB_STORAGE__PASSWORD_FILE", wrong.to_str().unwrap())],
    );
    assert!(!ok, "{text}");
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("not-the-password"), "{text}");
    // The right one: the commands work, and status and check-config name the database without it.
    let (ok, text) = run(
        &["ingest", common::sample_notice().to_str().unwrap()],
        &with_file,
    );
    assert!(ok, "{text}");
    let (ok, text) = run(&["status", "--json"], &with_file);
    assert!(ok, "{text}");
    let status: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status["database"], url.as_str());
    assert_eq!(status["downloads"]["queued"], 3, "{status}");
    let (ok, text) = run(&["list"], &with_file);
    assert!(ok && text.contains("queued"), "{text}");
    let (ok, text) = run(&["check-config"], &with_file);
    assert!(ok && text.contains(&url), "{text}");
    // A job failed for good, and `retry` queues it again.
    pg.psql(
        &name,
        "UPDATE downloads SET state = 'failed', last_error = 'HTTP 404' WHERE id = (SELECT min(id) FROM downloads)",
    )
    .unwrap();
    let (ok, text) = run(&["retry", "--all-failed"], &with_file);
    assert!(ok, "{text}");
    assert_eq!(
        pg.psql(
            &name,
            "SELECT count(*) FROM downloads WHERE state = 'queued'"
        )
        .unwrap()
        .trim(),
        "3"
    );
    // libpq's password file works too, as libpq reads it.
    let pgpass = ws.path("pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "127.0.0.1:{}:{name}:mastsub_pw:pw-never-shown-42\n",
            pg.port
        ),
    )
    .unwrap();
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (ok, text) = run(&["status"], &[("PGPASSFILE", pgpass.to_str().unwrap())]);
    assert!(ok, "{text}");
    assert!(text.contains("3 queued"), "{text}");
}
