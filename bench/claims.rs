//! Claim throughput of a store: jobs claimed and finished per second with many workers at once, as the
//! download pool drives the store (each worker ends its job `Done` and claims the next in one
//! `end_and_claim`, one transaction), with no transfer at all between the two. What is measured is the
//! store alone: its transactions, locks and commits.
//!
//! Usage: claims JOBS TASKS LAYOUT TARGET
//! - JOBS: jobs ingested first (one notice, one `Store::ingest_notice`, not timed).
//! - TASKS: worker tasks claiming at once, on one multi-threaded tokio runtime.
//! - LAYOUT: `one` (every task on one store: one process, SQLite's one writer or PostgreSQL's pool of 8
//!   connections) or `per4` (one store per 4 tasks: members of 4 workers each, each with its own pool).
//! - TARGET: a SQLite file that does not exist yet, or a `postgresql://` URL of an empty database.
//!
//! Prints one line: `JOBS TASKS LAYOUT seconds jobs/s`. Every job must end `done`, each claimed once.
//! `bench/cluster.py` runs it (built by `bench/run.sh` as a cargo example).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use mastsub::categorize::Categorizer;
use mastsub::config::EventsConfig;
use mastsub::notice::{self, Limits};
use mastsub::store::{
    DownloadState, Finish, Held, NoticeMeta, NoticeStatus, PgStore, SourceKind, SqliteStore, Store,
};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;

async fn open(target: &str) -> Arc<dyn Store> {
    if target.starts_with("postgresql://") || target.starts_with("postgres://") {
        let options = PgConnectOptions::from_str(target).expect("a PostgreSQL URL");
        Arc::new(
            PgStore::open(options, target)
                .await
                .expect("open PostgreSQL"),
        )
    } else {
        Arc::new(
            SqliteStore::open(std::path::Path::new(target))
                .await
                .expect("open SQLite"),
        )
    }
}

/// One notice of `jobs` New events, each its own product.
async fn ingest(store: &Arc<dyn Store>, jobs: u64) {
    let records: Vec<_> = (1..=jobs)
        .map(|n| {
            json!({
                "event_id": format!("00000000-0000-4000-8000-{n:012}"),
                "mission": "JWST",
                "fileset": format!("jw{n:06}001001_02201_00001"),
                "filename": format!("jw{n:06}001001_02201_00001_mirimage_cal.fits"),
                "program": 5105,
                "event_type": "New",
                "archived_date": "2026-03-30T17:53:19.695",
                "public_release_date": "2026-03-30T17:52:27.000"
            })
        })
        .collect();
    let bytes = serde_json::to_vec(&records).unwrap();
    let parsed = notice::parse(&bytes, &Limits::default()).expect("the notice parses");
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    let meta = NoticeMeta {
        sha256: format!("{:0>64}", "c1a1"),
        source_kind: SourceKind::Cli,
        source_ref: "claims".into(),
        name: "claims.json".into(),
        size: bytes.len() as u64,
        records: parsed.events.len(),
        status: NoticeStatus::Accepted,
        error: None,
    };
    let categorizer = Categorizer::new(
        EventsConfig::default(),
        &url::Url::parse("https://mast.stsci.edu").unwrap(),
    );
    let outcome = store
        .ingest_notice(&meta, &parsed.events, &categorizer)
        .await
        .expect("ingest");
    assert_eq!(outcome.queued, jobs as usize, "every event queues a job");
}

/// One worker: claims, ends `Done` and claims the next in one call, until nothing is left; the number of
/// jobs it ended.
async fn worker(store: Arc<dyn Store>, owner: String, now: i64) -> u64 {
    let lease = now + 600_000;
    let done = |bytes| Finish::Done {
        bytes,
        verified: "bench".into(),
        origin: None,
    };
    let (_, mut held) = store
        .end_and_claim(&owner, &[], 1, now, lease)
        .await
        .expect("claim");
    let mut ended = 0;
    while let Some(job) = held.pop() {
        let ends: Vec<(Held, Finish)> = vec![(job.held(), done(10))];
        let (recorded, next) = store
            .end_and_claim(&owner, &ends, 1, now, lease)
            .await
            .expect("end and claim");
        assert!(recorded.iter().all(|r| *r), "{owner}: an end refused");
        ended += 1;
        held = next;
    }
    ended
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [jobs, tasks, layout, target] = &args[..] else {
        eprintln!("usage: claims JOBS TASKS LAYOUT(one|per4) TARGET");
        std::process::exit(2);
    };
    let jobs: u64 = jobs.parse().expect("JOBS");
    let tasks: usize = tasks.parse().expect("TASKS");
    let stores_n = match layout.as_str() {
        "one" => 1,
        "per4" => tasks.div_ceil(4),
        other => panic!("LAYOUT {other}: one or per4"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let first = open(target).await;
        ingest(&first, jobs).await;
        let mut stores = vec![first.clone()];
        for _ in 1..stores_n {
            stores.push(open(target).await);
        }
        // Due by then whatever the clock did since the ingest.
        let now = mastsub::store::now_ms() + 1_000;
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|t| {
                let store = stores[t % stores_n].clone();
                tokio::spawn(worker(
                    store,
                    format!("bench{}:1:{t:08x}:m", t % stores_n),
                    now,
                ))
            })
            .collect();
        let mut ended = 0;
        for h in handles {
            ended += h.await.unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(ended, jobs, "every job claimed and ended once");
        let s = first.status(0).await.expect("status");
        assert_eq!(
            s.downloads.get(&DownloadState::Done).copied().unwrap_or(0),
            jobs,
            "every job done"
        );
        println!(
            "{jobs} {tasks} {layout} {secs:.3} {:.0}",
            jobs as f64 / secs
        );
        for s in stores {
            s.close().await;
        }
    });
}
