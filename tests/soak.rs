//! The soak: everything breaks at once, for a while, and the daemon still keeps its promises.
//!
//! Notices arrive through the inbox and the IMAP mailbox (some by both, some with bad records); the MAST
//! stand-in cuts bodies, answers 503 and 500, ignores Range, and products change (a Reprocessed notice
//! follows); the daemon is killed with -9 and with SIGTERM at random moments; Dovecot restarts; the disk
//! fills and empties. At the end: every product is byte-identical to its latest version, none is missing,
//! none was published twice, no `.part` is left, every event is recorded once, every bad record is
//! reported, and the database passes `PRAGMA integrity_check`.
//!
//! Short form (CI): `cargo test --test soak` runs 60 s of chaos. Long form by hand:
//! `SOAK_SECONDS=1800 cargo test --release --test soak -- --nocapture`; `SOAK_SEED=n` replays a run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::dovecot::{self, Dovecot, mails};
use common::mast::{
    Faults, MastStandIn, assert_identical, assert_published_once_per_version, fits_product,
};
use common::{Daemon, SmallDisk, Workspace, record, wait_until};
use serde_json::{Value, json};

/// A small deterministic generator (xorshift), seeded and printed so that a run can be replayed.
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

#[test]
fn everything_breaks_at_once_and_every_promise_holds() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
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
    eprintln!("soak: {seconds} s of chaos, SOAK_SEED={seed}");
    let mut rng = Rng(seed);

    let mast = MastStandIn::start();
    let with_imap = dovecot::available();
    if !with_imap {
        assert!(
            std::env::var_os("REQUIRE_DOVECOT").is_none(),
            "Dovecot is not installed"
        );
        eprintln!("soak: Dovecot is not installed; notices come through the inbox only");
    }
    let mut dovecot = with_imap.then(Dovecot::start);
    let imap = dovecot.as_ref().map_or(String::new(), |d| {
        d.imap_section("processed_mailbox = \"Processed\"")
    });
    let ws = Workspace::with_base(&mast.base_url, &imap);
    let disk = SmallDisk::mount(&ws.path("mastDownload"), "64m");
    if disk.is_none() {
        eprintln!("soak: cannot mount a tmpfs (not root?); the disk does not fill in this run");
    }
    let env = [
        ("MASTSUB_INBOX__WRITE_TIMEOUT", "300ms"),
        ("MASTSUB_DOWNLOAD__DRAIN_TIMEOUT", "3s"),
        ("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "1000"),
    ];

    // The notices: products of 2 to 120 blocks; two notices carry a bad record each.
    let mut notices: Vec<Vec<u8>> = Vec::new();
    let mut products: BTreeMap<String, (String, Vec<u8>)> = BTreeMap::new(); // name -> (path, body)
    let mut bad_records = 0;
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
        if k % 7 == 3 {
            let mut bad = record(9000 + k, "New");
            bad["archived_date"] = json!("not a date");
            records.push(bad);
            bad_records += 1;
        }
        notices.push(serde_json::to_vec(&records).unwrap());
    }

    // Something else filling the disk: a file that takes all the room left, removed to empty it.
    let filler = ws.path("mastDownload/.filler");
    let mut daemon = Daemon::start_with_env(&ws, &env);
    let mut logs: Vec<String> = Vec::new();
    let mut changed: BTreeSet<String> = BTreeSet::new();
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    let mut next_notice = 0usize;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let deliver = |k: usize, how: u64, d: &Option<Dovecot>| {
        let by_inbox = how != 1 || d.is_none();
        let by_mail = how >= 1 && d.is_some();
        if by_inbox {
            ws.drop_notice(&format!("n{k}.json"), &notices[k]);
        }
        if by_mail {
            d.as_ref()
                .unwrap()
                .deliver("INBOX", &mails::notice_mail(&notices[k]));
        }
    };
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        let action = rng.below(10);
        let name = match action {
            0 | 1 if next_notice < notices.len() => {
                // 0: inbox, 1: mail, 2: both (the same notice twice).
                deliver(next_notice, rng.below(3), &dovecot);
                next_notice += 1;
                "notice"
            }
            2 => {
                logs.push(daemon.log());
                daemon.kill9();
                daemon = Daemon::start_with_env(&ws, &env);
                "kill -9"
            }
            3 => {
                logs.push(daemon.log());
                let took = daemon.terminate();
                assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
                daemon = Daemon::start_with_env(&ws, &env);
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
                // A product changes on MAST; a Reprocessed notice for it comes at the end.
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
            7 if disk.is_some() => {
                fill(&filler);
                "disk full"
            }
            8 if disk.is_some() => {
                let _ = std::fs::remove_file(&filler);
                "disk emptied"
            }
            _ => continue,
        };
        *counts.entry(name).or_default() += 1;
    }

    // Calm: every notice delivered, faults off, room on disk; then a Reprocessed notice for each
    // product that changed, dated after its first version.
    while next_notice < notices.len() {
        deliver(next_notice, rng.below(3), &dovecot);
        next_notice += 1;
    }
    mast.set_faults(Faults::default());
    let _ = std::fs::remove_file(&filler);
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
        ws.drop_notice("reprocessed.json", &serde_json::to_vec(&records).unwrap());
    }
    // A Reprocessed event raises a job still queued, or queues one behind a finished one: the number of
    // jobs depends on timing, but every one of them must end done.
    let events = (NOTICES * PER_NOTICE) as i64 + changed.len() as i64;
    let settled = wait_until(Duration::from_secs(180), || {
        ws.db().exists()
            && ws.query_i64("SELECT count(*) FROM events") == events
            && ws.jobs_in("done") == ws.query_i64("SELECT count(*) FROM downloads")
    });
    logs.push(daemon.log());
    assert!(
        settled,
        "not settled: {} of {} jobs done ({} queued, {} running, {} failed); log tail:\n{}",
        ws.jobs_in("done"),
        ws.query_i64("SELECT count(*) FROM downloads"),
        ws.jobs_in("queued"),
        ws.jobs_in("running"),
        ws.jobs_in("failed"),
        logs.last()
            .unwrap()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    daemon.terminate();

    // Every product byte-identical to its latest version, none missing, no .part; none published more
    // often than it has versions, over every run's (every member's) log.
    let latest: Vec<(String, Vec<u8>)> = products.values().cloned().collect();
    assert_identical(&ws, &latest);
    assert_published_once_per_version(&logs.join("\n"), &products, &changed);
    // Every event recorded once; every bad record reported.
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), events);
    assert_eq!(
        ws.query_i64("SELECT count(DISTINCT event_id) FROM events"),
        events
    );
    let reported = ws.query_i64(&format!(
        "SELECT count(*) FROM notices WHERE status = 'partial' \
         AND error LIKE '%record {PER_NOTICE}%archived_date%'"
    ));
    assert_eq!(
        reported, bad_records,
        "notices with a bad record not reported"
    );
    assert!(
        logs.join("\n")
            .contains(&format!("record {PER_NOTICE}, field \"archived_date\"")),
        "no bad record in the log"
    );
    assert_eq!(ws.query_string("PRAGMA integrity_check"), "ok");
    eprintln!(
        "soak: {} products ({} changed), {events} events, {bad_records} bad records, chaos: {counts:?}, \
         {} requests to MAST",
        products.len(),
        changed.len(),
        mast.seen().len()
    );
}

/// Writes `path` until the disk is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let block = vec![0u8; 256 * 1024];
    while f.write_all(&block).is_ok() {}
    let _ = f.flush();
}
