//! The soak, as a cluster: three members on one PostgreSQL database and one download folder, while
//! everything breaks. Notices arrive through the members' inboxes (some through two, some by mail too);
//! the MAST stand-in cuts bodies, answers 503 and 500, ignores Range, and products change (a Reprocessed
//! notice follows); members are killed with -9 and with SIGTERM at random moments and started again;
//! PostgreSQL itself is killed and restarted; Dovecot restarts. At the end: every product byte-identical
//! to its latest version, none published more often than it has versions, no `.part` left, every event
//! recorded once, and the status counts equal to the rows.
//!
//! Short form (CI): `cargo test --test soak_postgres` runs 45 s of chaos. Long form by hand:
//! `SOAK_SECONDS=1800 cargo test --release --test soak_postgres -- --nocapture`; `SOAK_SEED=n` replays.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::dovecot::{self, Dovecot, mails};
use common::mast::{
    Faults, MastStandIn, assert_identical, assert_published_once_per_version, fits_product,
};
use common::postgres::Postgres;
use common::{Daemon, Workspace, record, wait_until};
use serde_json::{Value, json};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const NOTICES: u64 = 16;
const PER_NOTICE: u64 = 4;
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

#[test]
fn three_members_keep_every_promise_through_kills_and_a_database_restart() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    let seed: u64 = std::env::var("SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let Some(pg) = Postgres::shared() else {
        return;
    };
    eprintln!("soak (PostgreSQL, 3 members): {seconds} s of chaos, SOAK_SEED={seed}");
    let mut rng = Rng(seed);
    let url = pg.database("soak");
    let db = url.rsplit('/').next().unwrap().to_string();
    let query = |sql: &str| pg.psql(&db, sql).map(|o| o.trim().to_string());
    let count = |sql: &str| query(sql).ok().and_then(|o| o.parse::<i64>().ok());

    let mast = MastStandIn::start();
    let with_imap = dovecot::available();
    if !with_imap {
        assert!(
            std::env::var_os("REQUIRE_DOVECOT").is_none(),
            "Dovecot is not installed"
        );
    }
    let mut dovecot = with_imap.then(Dovecot::start);
    let imap = dovecot.as_ref().map_or(String::new(), |d| {
        d.imap_section("processed_mailbox = \"Processed\"")
    });
    let ws = Workspace::with_base(&mast.base_url, &imap);
    let inbox = |node: &str| ws.path(&format!("inbox-{node}"));
    let start = |node: &str| {
        let dir = inbox(node);
        Daemon::start_with_env(
            &ws,
            &[
                ("MASTSUB_STORAGE__DATABASE", url.as_str()),
                ("MASTSUB_CLUSTER__NODE", node),
                ("MASTSUB_INBOX__DIR", dir.to_str().unwrap()),
                ("MASTSUB_INBOX__WRITE_TIMEOUT", "300ms"),
                ("MASTSUB_DOWNLOAD__LEASE", "3s"),
                ("MASTSUB_DOWNLOAD__WORKERS", "2"),
                ("MASTSUB_DOWNLOAD__DRAIN_TIMEOUT", "3s"),
                ("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "1000"),
            ],
        )
    };

    let mut notices: Vec<Vec<u8>> = Vec::new();
    let mut products: BTreeMap<String, (String, Vec<u8>)> = BTreeMap::new();
    for k in 0..NOTICES {
        let mut records: Vec<Value> = Vec::new();
        for i in 0..PER_NOTICE {
            let n = 1 + k * PER_NOTICE + i;
            let r = record(n, "New");
            let name = r["filename"].as_str().unwrap().to_string();
            let body = fits_product(&name, 2 + rng.below(120) as usize, 1);
            mast.put(&name, body.clone());
            let path = format!("jwst/{}/{name}", r["fileset"].as_str().unwrap());
            products.insert(name, (path, body));
            records.push(r);
        }
        notices.push(serde_json::to_vec(&records).unwrap());
    }

    let mut members: Vec<Daemon> = NODES.iter().map(|n| start(n)).collect();
    let mut logs: Vec<String> = Vec::new();
    let mut changed: BTreeSet<String> = BTreeSet::new();
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    let mut next_notice = 0usize;
    let drop_into = |node: &str, name: &str, body: &[u8]| {
        let dir = inbox(node);
        std::fs::create_dir_all(&dir).unwrap();
        let staged = ws.path(&format!("{node}-{name}.staged"));
        std::fs::write(&staged, body).unwrap();
        std::fs::rename(&staged, dir.join(name)).unwrap();
    };
    // 0: one member's inbox; 1: by mail; 2: two members' inboxes and mail (the same notice three times).
    let deliver = |k: usize, how: u64, pick: usize, d: &Option<Dovecot>| {
        let name = format!("n{k}.json");
        if how != 1 || d.is_none() {
            drop_into(NODES[pick % 3], &name, &notices[k]);
        }
        if how == 2 {
            drop_into(NODES[(pick + 1) % 3], &name, &notices[k]);
        }
        if how >= 1
            && let Some(d) = d
        {
            d.deliver("INBOX", &mails::notice_mail(&notices[k]));
        }
    };
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        let name = match rng.below(10) {
            0 | 1 if next_notice < notices.len() => {
                deliver(next_notice, rng.below(3), rng.below(3) as usize, &dovecot);
                next_notice += 1;
                "notice"
            }
            2 => {
                let m = rng.below(3) as usize;
                logs.push(members[m].log());
                members[m].kill9();
                members[m] = start(NODES[m]);
                "kill -9"
            }
            3 => {
                let m = rng.below(3) as usize;
                logs.push(members[m].log());
                let took = members[m].terminate();
                assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
                members[m] = start(NODES[m]);
                "SIGTERM"
            }
            4 => {
                mast.set_faults(Faults {
                    cut_percent: rng.below(40) as u32,
                    cut_with_reset: rng.below(2) == 0,
                    unavailable_percent: rng.below(20) as u32,
                    errors_500_next: rng.below(5) as u32,
                    ignore_range: rng.below(4) == 0,
                    ..Faults::default()
                });
                "faults"
            }
            5 => {
                let names: Vec<&String> = products.keys().collect();
                let name = names[rng.below(names.len() as u64) as usize].clone();
                let version = 2 + changed.len() as u8;
                let body = fits_product(&name, 2 + rng.below(120) as usize, version);
                mast.put(&name, body.clone());
                products.get_mut(&name).unwrap().1 = body;
                changed.insert(name);
                "product changed"
            }
            6 if dovecot.is_some() => {
                let d = dovecot.as_mut().unwrap();
                d.stop();
                std::thread::sleep(Duration::from_millis(rng.below(1500)));
                d.start_again();
                "Dovecot restarted"
            }
            7 if counts.get("PostgreSQL restarted").copied().unwrap_or(0) < 2 => {
                pg.kill();
                std::thread::sleep(Duration::from_millis(500 + rng.below(3000)));
                pg.start_server();
                "PostgreSQL restarted"
            }
            _ => continue,
        };
        *counts.entry(name).or_default() += 1;
    }

    // Calm: every notice delivered, faults off; a Reprocessed notice for each product that changed.
    while next_notice < notices.len() {
        deliver(next_notice, rng.below(3), rng.below(3) as usize, &dovecot);
        next_notice += 1;
    }
    mast.set_faults(Faults::default());
    if !changed.is_empty() {
        let records: Vec<Value> = changed
            .iter()
            .map(|name| {
                let n: u64 = name[2..7].parse().unwrap();
                let mut r = record(n, "Reprocessed");
                r["event_id"] = json!(format!("00000000-0000-4000-9000-{n:012}"));
                r["archived_date"] = json!("2026-06-01T00:00:00");
                r
            })
            .collect();
        drop_into(
            "node-b",
            "reprocessed.json",
            &serde_json::to_vec(&records).unwrap(),
        );
    }
    let events = (NOTICES * PER_NOTICE) as i64 + changed.len() as i64;
    let settled = wait_until(Duration::from_secs(180), || {
        count("SELECT count(*) FROM events") == Some(events)
            && count("SELECT count(*) FROM downloads WHERE state <> 'done'") == Some(0)
    });
    let tails = || {
        members
            .iter()
            .zip(NODES)
            .map(|(d, n)| {
                let log = d.log();
                let tail: Vec<&str> = log.lines().rev().take(25).collect();
                format!(
                    "--- {n}:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        settled,
        "not settled: {:?}, {:?} events of {events}; chaos {counts:?}\n{}",
        query("SELECT state, count(*) FROM downloads GROUP BY state"),
        count("SELECT count(*) FROM events"),
        tails()
    );
    for m in &mut members {
        logs.push(m.log());
        m.terminate();
    }

    // Every product byte-identical to its latest version, none missing, no .part; none published more
    // often than it has versions, over every run's (every member's) log.
    let latest: Vec<(String, Vec<u8>)> = products.values().cloned().collect();
    assert_identical(&ws, &latest);
    assert_published_once_per_version(&logs.join("\n"), &products, &changed);
    assert_eq!(count("SELECT count(*) FROM events"), Some(events));
    assert_eq!(
        count("SELECT count(DISTINCT event_id) FROM events"),
        Some(events)
    );
    // The counts `status` reads (sums of deltas) equal the rows.
    let out = ws
        .cmd()
        .args(["status", "--json"])
        .env("MASTSUB_STORAGE__DATABASE", &url)
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        status["downloads"]["done"].as_i64(),
        count("SELECT count(*) FROM downloads"),
        "{status}"
    );
    assert_eq!(
        status["events"]["New"].as_i64(),
        Some((NOTICES * PER_NOTICE) as i64)
    );
    assert_eq!(status["members"].as_array().unwrap().len(), 3);
    eprintln!(
        "soak (PostgreSQL): {} products ({} changed), {events} events, chaos: {counts:?}, {} requests to MAST",
        products.len(),
        changed.len(),
        mast.seen().len()
    );
}
