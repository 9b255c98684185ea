//! Several daemons, one queue: three `mastsub run` members on one PostgreSQL database (a real server,
//! tests/common/postgres.rs) and one download folder, as a cluster of hosts would run them. A member
//! killed with -9 while it holds downloads: its jobs are taken over and resumed from the `.part` files it
//! left, every product ends byte-identical, every event is recorded once. The IMAP mailbox is read by one
//! member; when it dies, another takes new mail.

mod common;

use std::time::{Duration, Instant};

use common::dovecot::{self, Dovecot, mails};
use common::mast::{Faults, MastStandIn, assert_identical, serve_products};
use common::postgres::Postgres;
use common::{Daemon, Workspace, notice_of, wait_until};
use serde_json::Value;

/// One database and one workspace (config, download folder) that the members share; each member has its
/// own inbox folder (`inbox-<node>`) and name.
struct Cluster {
    pg: &'static Postgres,
    db: String,
    url: String,
    ws: Workspace,
}

impl Cluster {
    /// `None` (the test is skipped) when PostgreSQL is not installed and not required.
    fn new(base_url: &str, extra: &str) -> Option<Cluster> {
        let pg = Postgres::shared()?;
        let url = pg.database("cluster");
        let db = url.rsplit('/').next().unwrap().to_string();
        let ws = Workspace::with_base(base_url, extra);
        Some(Cluster { pg, db, url, ws })
    }

    fn env<'a>(&'a self, node: &'a str, inbox: &'a str) -> Vec<(&'a str, &'a str)> {
        vec![
            ("MASTSUB_STORAGE__DATABASE", self.url.as_str()),
            ("MASTSUB_CLUSTER__NODE", node),
            ("MASTSUB_INBOX__DIR", inbox),
            // Fail-over within seconds, not a minute.
            ("MASTSUB_DOWNLOAD__LEASE", "3s"),
            ("MASTSUB_DOWNLOAD__WORKERS", "2"),
        ]
    }

    /// Starts member `node`, and waits until it watches its inbox.
    fn member(&self, node: &str) -> Daemon {
        self.member_with(node, &[])
    }

    /// `member` with more environment.
    fn member_with(&self, node: &str, extra: &[(&str, &str)]) -> Daemon {
        let inbox = self.ws.path(&format!("inbox-{node}"));
        let inbox = inbox.to_str().unwrap();
        let mut env = self.env(node, inbox);
        env.extend_from_slice(extra);
        let d = Daemon::start_with_env(&self.ws, &env);
        d.wait_for_log("watching inbox", Duration::from_secs(30));
        d
    }

    /// Puts a notice into member `node`'s inbox atomically.
    fn drop_notice(&self, node: &str, name: &str, body: &[u8]) {
        let dir = self.ws.path(&format!("inbox-{node}"));
        std::fs::create_dir_all(&dir).unwrap();
        let staged = self.ws.path(&format!("{node}-{name}.staged"));
        std::fs::write(&staged, body).unwrap();
        std::fs::rename(&staged, dir.join(name)).unwrap();
    }

    fn query(&self, sql: &str) -> String {
        self.pg
            .psql(&self.db, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .trim()
            .to_string()
    }

    fn count(&self, sql: &str) -> i64 {
        self.query(sql).parse().unwrap_or(-1)
    }

    /// `mastsub status --json`, asked with the members' configuration.
    fn status(&self) -> Value {
        let out = self
            .ws
            .cmd()
            .args(["status", "--json"])
            .env("MASTSUB_STORAGE__DATABASE", &self.url)
            .env("MASTSUB_DOWNLOAD__LEASE", "3s")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The member leading `role`, as `status --json` says.
    fn leader(&self, role: &str) -> Option<String> {
        self.status()["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["leads"].as_array().unwrap().iter().any(|r| r == role))
            .map(|m| m["node"].as_str().unwrap().to_string())
    }
}

fn logs(members: &[(&str, &Daemon)]) -> String {
    members
        .iter()
        .map(|(node, d)| format!("--- {node}:\n{}", d.log()))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn a_killed_members_downloads_resume_elsewhere_and_every_product_ends_whole_and_recorded_once() {
    let mast = MastStandIn::start();
    // Each answer trickles (as from a far server), so that downloads are under way when a member dies.
    mast.set_faults(Faults {
        trickle_bytes_per_sec: Some(400_000),
        ..Faults::default()
    });
    let (first, mut files) = serve_products(&mast, 1, 12, 200);
    let (second, more) = serve_products(&mast, 101, 6, 200);
    files.extend(more);
    let Some(cluster) = Cluster::new(&mast.base_url, "") else {
        return;
    };
    let a = cluster.member("node-a");
    // node-b serves the status page and the metrics, which show the whole cluster.
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let b = cluster.member_with(
        "node-b",
        &[
            ("MASTSUB_HTTP__ENABLED", "true"),
            ("MASTSUB_HTTP__LISTEN", listen.as_str()),
        ],
    );
    let c = cluster.member("node-c");
    // The same notice through two members' inboxes, another through the third.
    cluster.drop_notice("node-a", "first.json", &first);
    cluster.drop_notice("node-b", "first-again.json", &first);
    cluster.drop_notice("node-c", "second.json", &second);

    // node-a holds downloads with bytes on disk.
    let held = "SELECT string_agg(id::text, ',' ORDER BY id) FROM downloads
                WHERE state = 'running' AND lease_owner LIKE 'node-a:%' AND bytes_done > 0";
    assert!(
        wait_until(Duration::from_secs(60), || !cluster.query(held).is_empty()),
        "node-a never held a download under way; logs:\n{}",
        logs(&[("node-a", &a), ("node-b", &b), ("node-c", &c)])
    );
    let mut a = a;
    a.kill9();
    let killed = Instant::now();
    let ids = cluster.query(
        "SELECT string_agg(id::text, ',' ORDER BY id) FROM downloads
         WHERE state = 'running' AND lease_owner LIKE 'node-a:%'",
    );
    assert!(!ids.is_empty());
    // Taken over by another member once its lease runs out.
    let taken_over = format!(
        "SELECT count(*) FROM downloads WHERE id IN ({ids})
         AND (state = 'done' OR lease_owner NOT LIKE 'node-a:%')"
    );
    let all = ids.split(',').count() as i64;
    assert!(
        wait_until(Duration::from_secs(60), || cluster.count(&taken_over)
            == all),
        "node-a's downloads {ids} were not taken over; logs:\n{}",
        logs(&[("node-b", &b), ("node-c", &c)])
    );
    eprintln!(
        "node-a's {all} download(s) taken over {:.1}s after its kill -9 (lease 3s)",
        killed.elapsed().as_secs_f64()
    );
    assert!(
        wait_until(Duration::from_secs(120), || cluster
            .count("SELECT count(*) FROM downloads WHERE state = 'done'")
            == 18),
        "not all done: {}; logs:\n{}",
        cluster.query("SELECT state, count(*) FROM downloads GROUP BY state"),
        logs(&[("node-b", &b), ("node-c", &c)])
    );
    assert_identical(&cluster.ws, &files);
    // Each event once, each notice once (the one seen twice counted twice), nothing failed.
    assert_eq!(cluster.count("SELECT count(*) FROM events"), 18);
    assert_eq!(
        cluster.query("SELECT string_agg(times_seen::text, ',' ORDER BY times_seen) FROM notices"),
        "1,2"
    );
    assert_eq!(
        cluster.count("SELECT count(*) FROM downloads WHERE state <> 'done'"),
        0
    );
    // What node-a had on disk was continued, not fetched again from byte 0.
    let resumed = mast
        .seen()
        .iter()
        .filter(|s| {
            s.range
                .as_deref()
                .is_some_and(|r| r.starts_with("bytes=") && !r.starts_with("bytes=0-"))
        })
        .count();
    assert!(resumed >= 1, "no download was resumed: {:?}", mast.seen());
    // status, from any member's configuration: three members, node-a gone once it has not been heard
    // from for 3 leases.
    let state_of = |node: &str| {
        cluster.status()["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["node"] == node)
            .map(|m| m["state"].as_str().unwrap().to_string())
    };
    assert!(wait_until(Duration::from_secs(30), || state_of("node-a")
        .as_deref()
        == Some("gone")));
    let status = cluster.status();
    let members = status["members"].as_array().unwrap();
    let nodes: Vec<&str> = members
        .iter()
        .map(|m| m["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, ["node-a", "node-b", "node-c"]);
    for m in members {
        assert_eq!(
            m["state"],
            if m["node"] == "node-a" { "gone" } else { "up" },
            "{m}"
        );
    }
    assert_eq!(status["downloads"]["done"], 18);
    let (_, metrics) = common::http_get(port, "/metrics");
    for line in [
        "mastsub_members{state=\"up\"} 2\n",
        "mastsub_members{state=\"gone\"} 1\n",
        "mastsub_downloads{state=\"done\"} 18\n",
    ] {
        assert!(metrics.contains(line), "no {line:?} in:\n{metrics}");
    }
    let (_, page) = common::http_get(port, "/");
    assert!(
        page.contains("id=\"members\"") && page.contains("node-a") && page.contains(">gone<"),
        "{page}"
    );
}

#[test]
fn a_second_member_under_a_live_members_name_is_refused() {
    let Some(cluster) = Cluster::new("http://127.0.0.1:9", "") else {
        return;
    };
    let _a = cluster.member("node-a");
    let inbox = cluster.ws.path("inbox-other");
    let out = cluster
        .ws
        .cmd()
        .arg("run")
        .envs(cluster.env("node-a", inbox.to_str().unwrap()))
        .timeout(Duration::from_secs(30))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("another mastsub is the cluster member \"node-a\""),
        "{text}"
    );
    // Under its own name it joins.
    let _b = cluster.member("node-b");
    let status = cluster.status();
    assert_eq!(status["members"].as_array().unwrap().len(), 2);
}

#[test]
fn one_member_reads_the_mailbox_and_another_takes_new_mail_when_it_dies() {
    if !dovecot::available() {
        assert!(
            std::env::var_os("REQUIRE_DOVECOT").is_none(),
            "Dovecot is not installed (apt-get install dovecot-imapd)"
        );
        eprintln!("SKIPPED: Dovecot is not installed");
        return;
    }
    let imap = Dovecot::start();
    let Some(cluster) = Cluster::new("http://127.0.0.1:9", &imap.imap_section("")) else {
        return;
    };
    let mut members = vec![
        ("node-a", cluster.member("node-a")),
        ("node-b", cluster.member("node-b")),
        ("node-c", cluster.member("node-c")),
    ];
    let events = || cluster.count("SELECT count(*) FROM events");
    imap.deliver("INBOX", &mails::notice_mail(&notice_of(1, 3)));
    assert!(
        wait_until(Duration::from_secs(30), || events() == 3),
        "the mail was not taken; logs:\n{}",
        logs(&members.iter().map(|(n, d)| (*n, d)).collect::<Vec<_>>())
    );
    let leader = cluster.leader("imap").expect("a member leads imap");
    // Only the leader connected to the mailbox; the others hold no connection.
    for (node, d) in &members {
        assert_eq!(
            d.log().contains("connected, INBOX selected"),
            *node == leader,
            "{node} (leader {leader}):\n{}",
            d.log()
        );
    }
    let at = members.iter().position(|(n, _)| *n == leader).unwrap();
    let (_, mut dead) = members.remove(at);
    dead.kill9();
    imap.deliver("INBOX", &mails::notice_mail(&notice_of(10, 2)));
    assert!(
        wait_until(Duration::from_secs(60), || events() == 5),
        "no other member took the new mail; logs:\n{}",
        logs(&members.iter().map(|(n, d)| (*n, d)).collect::<Vec<_>>())
    );
    let next = cluster.leader("imap").expect("a new leader");
    assert_ne!(next, leader);
    // Every event once: the mail taken before is not taken again by the new leader.
    assert_eq!(
        cluster.count("SELECT count(DISTINCT event_id) FROM events"),
        5
    );
    assert_eq!(cluster.count("SELECT count(*) FROM notices"), 2);
}

#[test]
fn members_sharing_one_inbox_folder_read_each_file_once() {
    let Some(cluster) = Cluster::new("http://127.0.0.1:9", "[events]\nnew = \"record\"\n") else {
        return;
    };
    let shared = cluster.ws.path("inbox-shared");
    // A notice claimed by a member that is gone for good (a crash between its claim and its record):
    // taken over by one of the others.
    let orphan = shared.join(".claimed/node-gone");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("left.json"), notice_of(9001, 2)).unwrap();
    let shared = shared.to_str().unwrap();
    let members: Vec<(&str, Daemon)> = ["node-a", "node-b", "node-c"]
        .into_iter()
        .map(|node| {
            let mut env = cluster.env(node, shared);
            env.push(("MASTSUB_INBOX__RESCAN_INTERVAL", "1s"));
            let d = Daemon::start_with_env(&cluster.ws, &env);
            d.wait_for_log("watching inbox", Duration::from_secs(30));
            (node, d)
        })
        .collect();
    // Forty distinct notices, renamed in one after another as a mail filter would.
    for n in 0..40u64 {
        cluster.drop_notice(
            "shared",
            &format!("n{n:02}.json"),
            &notice_of(n * 10 + 1, 2),
        );
    }
    let all = || cluster.count("SELECT count(*) FROM events");
    assert!(
        wait_until(Duration::from_secs(60), || all() == 82),
        "{} of 82 events; logs:\n{}",
        all(),
        logs(&members.iter().map(|(n, d)| (*n, d)).collect::<Vec<_>>())
    );
    // Each file read by one member only: seen once, moved to processed/ once, nothing left claimed.
    assert_eq!(cluster.count("SELECT count(*) FROM notices"), 41);
    assert_eq!(
        cluster.count("SELECT count(*) FROM notices WHERE times_seen <> 1"),
        0
    );
    assert!(wait_until(Duration::from_secs(10), || {
        cluster.ws.files_in("inbox-shared/processed").len() == 41
    }));
    let left: Vec<String> = cluster
        .ws
        .tree("inbox-shared/.claimed")
        .into_iter()
        .filter(|p| !p.ends_with('/'))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    for (node, d) in &members {
        assert!(
            !d.log().contains("ERROR"),
            "{node} logged an error:\n{}",
            d.log()
        );
    }
}

#[test]
fn summaries_and_alerts_go_out_once_for_the_cluster_and_on_after_the_mailer_dies() {
    if !common::smtp::available() {
        assert!(
            std::env::var_os("REQUIRE_SMTP").is_none(),
            "aiosmtpd is not installed (apt-get install python3-aiosmtpd)"
        );
        eprintln!("SKIPPED: aiosmtpd is not installed");
        return;
    }
    let server = common::smtp::Smtp::start(false);
    let mast = MastStandIn::start();
    let (first, _) = serve_products(&mast, 1, 3, 10);
    let (second, _) = serve_products(&mast, 11, 2, 10);
    let (third, _) = serve_products(&mast, 21, 2, 10);
    // One product never appears: 404 until given up (3 s in tests), then failed: one alert.
    mast.remove("jw00003001001_02201_00001_mirimage_cal.fits");
    let Some(cluster) = Cluster::new(&mast.base_url, &server.config("")) else {
        return;
    };
    let mut members = vec![
        ("node-a", cluster.member("node-a")),
        ("node-b", cluster.member("node-b")),
        ("node-c", cluster.member("node-c")),
    ];
    cluster.drop_notice("node-a", "first.json", &first);
    cluster.drop_notice("node-c", "second.json", &second);
    let mails = |subject: &str| {
        server
            .received()
            .iter()
            .filter(|(s, _)| s.contains(subject))
            .count()
    };
    let all_logs = |members: &[(&str, Daemon)]| {
        logs(&members.iter().map(|(n, d)| (*n, d)).collect::<Vec<_>>())
    };
    assert!(
        wait_until(Duration::from_secs(60), || mails("2 of 3 product(s)") == 1
            && mails("2 of 2 product(s)") == 1
            && mails("mastsub alert") == 1),
        "{:?}\n{}",
        server.received(),
        all_logs(&members)
    );
    let leader = cluster.leader("mail").expect("a member sends mail");
    // The member that sends mail dies; the next notice's summary is sent by another, once.
    let at = members.iter().position(|(n, _)| *n == leader).unwrap();
    let (_, mut dead) = members.remove(at);
    dead.kill9();
    let survivor = members[0].0;
    cluster.drop_notice(survivor, "third.json", &third);
    assert!(
        wait_until(Duration::from_secs(60), || mails("2 of 2 product(s)") == 2),
        "{:?}\n{}",
        server.received(),
        all_logs(&members)
    );
    std::thread::sleep(Duration::from_secs(3));
    // Nothing twice: three summaries and one alert in all.
    assert_eq!(server.received().len(), 4, "{:?}", server.received());
    assert_ne!(cluster.leader("mail").as_deref(), Some(leader.as_str()));
}

#[test]
fn a_member_paused_past_its_lease_changes_nothing_when_it_wakes_and_every_product_ends_whole() {
    let mast = MastStandIn::start();
    mast.set_faults(Faults {
        trickle_bytes_per_sec: Some(400_000),
        ..Faults::default()
    });
    let (notice, files) = serve_products(&mast, 1, 8, 200);
    let Some(cluster) = Cluster::new(&mast.base_url, "") else {
        return;
    };
    // node-a as another host would be: only its lease tells whether it is gone (a stopped process of
    // this very machine is judged alive, as its workers will renew when it runs again).
    let inbox = cluster.ws.path("inbox-node-a");
    let Some(mut a) =
        Daemon::start_as_another_host(&cluster.ws, &cluster.env("node-a", inbox.to_str().unwrap()))
    else {
        eprintln!("SKIPPED: no PID namespace can be made here (not root)");
        return;
    };
    a.wait_for_log("watching inbox", Duration::from_secs(30));
    let b = cluster.member("node-b");
    cluster.drop_notice("node-a", "n.json", &notice);
    let held = "SELECT count(*) FROM downloads
                WHERE state = 'running' AND lease_owner LIKE 'node-a:%' AND bytes_done > 0";
    assert!(
        wait_until(Duration::from_secs(60), || cluster.count(held) > 0),
        "node-a never held a download under way:\n{}",
        a.log()
    );
    // node-a stops dead (a VM paused, a process stopped) with its workers mid-transfer, past its lease:
    // node-b takes its jobs over and resumes them from node-a's .part files.
    let pids: Vec<nix::unistd::Pid> = a
        .pids()
        .into_iter()
        .map(nix::unistd::Pid::from_raw)
        .collect();
    for pid in &pids {
        nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(30), || cluster.count(
            "SELECT count(*) FROM downloads WHERE lease_owner LIKE 'node-a:%'"
        ) == 0),
        "node-b did not take node-a's jobs:\n{}",
        b.log()
    );
    // node-a wakes: its workers' writes are refused (fenced), it writes no more into the files it
    // lost, and publishes none of them.
    for pid in &pids {
        nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(120), || cluster
            .count("SELECT count(*) FROM downloads WHERE state = 'done'")
            == 8),
        "not all done: {}\n--- node-a:\n{}\n--- node-b:\n{}",
        cluster.query("SELECT state, count(*) FROM downloads GROUP BY state"),
        a.log(),
        b.log()
    );
    assert_identical(&cluster.ws, &files);
    assert!(a.is_running(), "node-a stopped:\n{}", a.log());
    assert_eq!(cluster.count("SELECT count(*) FROM events"), 8);
    // What node-a was fetching when it stopped, it did not publish: its attempts were fenced off.
    assert!(
        a.log().contains("lease"),
        "node-a never noticed it lost its leases:\n{}",
        a.log()
    );
}
