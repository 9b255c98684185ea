//! The store's contract, run against every backend (rstest cases: SQLite, and PostgreSQL where it is
//! installed): de-duplication, one job per product version, re-queueing, claims racing on many connections,
//! the status counts, and several stores writing one database at once.

mod common;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use common::postgres::Postgres;
use common::{Workspace, record};
use mastsub::categorize::Categorizer;
use mastsub::config::EventsConfig;
use mastsub::notice::{self, Event, EventType, Limits};
use mastsub::store::{
    DownloadState, Finish, Held, IngestOutcome, MemberBeat, NoticeMeta, NoticeStatus, PgStore,
    Provenance, SourceHealth, SourceKind, SqliteStore, Store, StoreError,
};
use rstest::rstest;
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// One test's database: a SQLite file in a workspace, or a PostgreSQL database of its own on this test
/// binary's server.
struct Db {
    backend: Backend,
    ws: Workspace,
    /// The server and the database's name.
    pg: Option<(&'static Postgres, String)>,
}

impl Db {
    /// `None` (the test says SKIPPED and returns) for PostgreSQL when it is not installed.
    fn new(backend: Backend) -> Option<Db> {
        let ws = Workspace::new();
        let pg = match backend {
            Backend::Sqlite => None,
            Backend::Postgres => {
                let Some(pg) = Postgres::shared() else {
                    eprintln!("SKIPPED: this case needs PostgreSQL");
                    return None;
                };
                let url = pg.database("contract");
                let name = url.rsplit('/').next().unwrap().to_string();
                Some((pg, name))
            }
        };
        Some(Db { backend, ws, pg })
    }

    /// The PostgreSQL database's URL (no password: the harness trusts local connections).
    fn url(&self) -> String {
        let (pg, name) = self.pg.as_ref().expect("a PostgreSQL case");
        pg.url(name)
    }

    /// A store on the database (a new one each time, as another process would open it).
    async fn open(&self) -> Arc<dyn Store> {
        match self.backend {
            Backend::Sqlite => Arc::new(SqliteStore::open(&self.ws.db()).await.unwrap()),
            Backend::Postgres => Arc::new(self.open_pg().await.unwrap()),
        }
    }

    async fn open_pg(&self) -> Result<PgStore, StoreError> {
        let url = self.url();
        PgStore::open(PgConnectOptions::from_str(&url).unwrap(), &url).await
    }

    /// One integer from a query, outside the store (callable inside a runtime too).
    fn query_i64(&self, sql: &str) -> i64 {
        match &self.pg {
            // The workspace's query runs a runtime of its own: on a thread of its own.
            None => std::thread::scope(|s| s.spawn(|| self.ws.query_i64(sql)).join().unwrap()),
            Some((pg, name)) => {
                let out = pg.psql(name, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                out.trim()
                    .parse()
                    .unwrap_or_else(|e| panic!("{sql}: {out:?}: {e}"))
            }
        }
    }

    /// One write statement, outside the store (to put a job in a state no API sets).
    fn execute(&self, sql: &str) {
        match &self.pg {
            None => std::thread::scope(|s| s.spawn(|| self.ws.execute(sql)).join().unwrap()),
            Some((pg, name)) => {
                pg.psql(name, sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// For the cases where tasks race on several threads.
fn threaded_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
}

fn categorizer() -> Categorizer {
    Categorizer::new(
        EventsConfig::default(),
        &url::Url::parse("https://mast.stsci.edu").unwrap(),
    )
}

fn events(records: &[Value]) -> Vec<Event> {
    let bytes = serde_json::to_vec(records).unwrap();
    let parsed = notice::parse(&bytes, &Limits::default()).unwrap();
    assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
    parsed.events
}

/// Ingests `records` as a notice whose content hash is `tag` (distinct tags are distinct notices).
async fn ingest(store: &Arc<dyn Store>, tag: &str, records: &[Value]) -> IngestOutcome {
    ingest_with(store, tag, records, &categorizer()).await
}

/// `ingest` with a categorizer of the test's.
async fn ingest_with(
    store: &Arc<dyn Store>,
    tag: &str,
    records: &[Value],
    categorizer: &Categorizer,
) -> IngestOutcome {
    let evs = events(records);
    let meta = NoticeMeta {
        sha256: format!("{tag:0>64}"),
        source_kind: SourceKind::Cli,
        source_ref: tag.to_string(),
        name: format!("{tag}.json"),
        size: 1,
        records: evs.len(),
        status: NoticeStatus::Accepted,
        error: None,
    };
    store.ingest_notice(&meta, &evs, categorizer).await.unwrap()
}

/// Record `n` as another type and version of the same product.
/// One end and one claim through `end_and_claim`: whether the end was recorded, and the job claimed.
async fn finish_and_claim(
    store: &Arc<dyn Store>,
    job: Held,
    owner: &str,
    finish: &Finish,
    now: i64,
    lease_until: i64,
) -> (bool, Option<mastsub::store::Job>) {
    let (recorded, mut jobs) = store
        .end_and_claim(owner, &[(job, finish.clone())], 1, now, lease_until)
        .await
        .unwrap();
    assert_eq!(recorded.len(), 1);
    assert!(jobs.len() <= 1, "one claim asked, {} given", jobs.len());
    (recorded[0], jobs.pop())
}

fn same_product(n: u64, id: u64, event_type: &str, archived: &str) -> Value {
    let mut r = record(n, event_type);
    r["event_id"] = json!(format!("00000000-0000-4000-8000-{id:012}"));
    r["archived_date"] = json!(archived);
    r
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn the_same_event_in_two_notices_is_recorded_once(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        let a = ingest(&store, "a", &[record(1, "New"), record(2, "New")]).await;
        assert_eq!((a.recorded_total(), a.queued), (2, 2));
        let b = ingest(
            &store,
            "b",
            &[record(2, "New"), record(3, "New"), record(3, "New")],
        )
        .await;
        assert_eq!(
            (b.recorded_total(), b.already_recorded, b.queued),
            (1, 2, 1)
        );
        let again = ingest(&store, "a", &[record(1, "New"), record(2, "New")]).await;
        assert!(again.seen_before);
        assert_eq!(again.recorded_total(), 0);
        store.close().await;
    });
    assert_eq!(db.query_i64("SELECT count(*) FROM events"), 3);
    assert_eq!(db.query_i64("SELECT count(*) FROM notices"), 2);
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn new_then_public_in_separate_notices_share_one_job(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        ingest(
            &store,
            "a",
            &[same_product(1, 1, "New", "2026-01-01T00:00:00")],
        )
        .await;
        let o = ingest(
            &store,
            "b",
            &[same_product(1, 2, "Public", "2026-01-01T00:00:00")],
        )
        .await;
        assert_eq!((o.queued, o.joined), (0, 1));
        store.close().await;
    });
    assert_eq!(db.query_i64("SELECT count(*) FROM downloads"), 1);
    assert_eq!(
        db.query_i64("SELECT count(DISTINCT download_id) FROM events"),
        1
    );
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn a_newer_version_raises_a_queued_job_and_queues_after_a_done_one(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let store = db.open().await;
        ingest(
            &store,
            "a",
            &[same_product(1, 1, "New", "2026-01-01T00:00:00")],
        )
        .await;
        let o = ingest(
            &store,
            "b",
            &[same_product(1, 2, "Reprocessed", "2026-02-01T00:00:00.5")],
        )
        .await;
        assert_eq!((o.queued, o.joined), (0, 1));
        let rows = store.list_downloads(None).await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].version, "2026-02-01T00:00:00.5000000");
        store.close().await;
    });
    db.execute("UPDATE downloads SET state = 'done'");
    rt.block_on(async {
        let store = db.open().await;
        let same = ingest(
            &store,
            "c",
            &[same_product(1, 3, "Public", "2026-02-01T00:00:00.5")],
        )
        .await;
        assert_eq!(same.already_done, 1);
        let newer = ingest(
            &store,
            "d",
            &[same_product(1, 4, "Reprocessed", "2026-03-01T00:00:00")],
        )
        .await;
        assert_eq!(newer.queued, 1);
        let queued = store
            .list_downloads(Some(DownloadState::Queued))
            .await
            .unwrap();
        assert_eq!(queued.len(), 1);
        assert_eq!(queued[0].event_type, "Reprocessed");
        store.close().await;
    });
    assert_eq!(db.query_i64("SELECT count(*) FROM downloads"), 2);
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn public_requeues_a_job_waiting_for_a_token_and_any_event_a_failed_one(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    let rt = runtime();
    rt.block_on(async {
        let store = db.open().await;
        ingest(
            &store,
            "a",
            &[same_product(1, 1, "New", "2026-01-01T00:00:00")],
        )
        .await;
        ingest(
            &store,
            "b",
            &[same_product(2, 2, "New", "2026-01-01T00:00:00")],
        )
        .await;
        store.close().await;
    });
    db.execute(
        "UPDATE downloads SET state = 'needs_auth', attempts = 1, last_error = 'HTTP 401', lease_owner = 'w1', \
         lease_expires_at = 1, next_attempt_at = 9999999999999 WHERE filename LIKE 'jw00001%'",
    );
    db.execute("UPDATE downloads SET state = 'failed', attempts = 8, last_error = 'HTTP 404' WHERE filename LIKE 'jw00002%'");
    rt.block_on(async {
        let store = db.open().await;
        let joined = ingest(
            &store,
            "c",
            &[same_product(1, 3, "New", "2026-01-01T00:00:00")],
        )
        .await;
        assert_eq!(
            (joined.joined, joined.requeued),
            (1, 0),
            "New must not re-queue a needs_auth job"
        );
        let o = ingest(
            &store,
            "d",
            &[
                same_product(1, 4, "Public", "2026-01-01T00:00:00"),
                same_product(2, 5, "New", "2026-01-01T00:00:00"),
            ],
        )
        .await;
        assert_eq!(o.requeued, 2);
        let rows = store
            .list_downloads(Some(DownloadState::Queued))
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert!(
            rows.iter()
                .all(|r| r.attempts == 0 && r.last_error.is_none())
        );
        assert_eq!(rows[0].event_type, "Public");
        store.close().await;
    });
    assert_eq!(
        db.query_i64("SELECT count(*) FROM downloads WHERE lease_owner IS NOT NULL"),
        0
    );
    assert_eq!(
        db.query_i64("SELECT count(*) FROM downloads WHERE next_attempt_at = 9999999999999"),
        0
    );
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn ending_a_job_and_claiming_the_next_checks_the_lease_and_keeps_products_apart(
    #[case] backend: Backend,
) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        // Products 1 and 2, and a newer version of product 1 queued behind the first.
        ingest(
            &store,
            "a",
            &[
                same_product(1, 1, "New", "2026-01-01T00:00:00"),
                same_product(2, 2, "New", "2026-01-01T00:00:00"),
            ],
        )
        .await;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            + 1_000;
        let first = store.claim("w1", i64::MAX, now).await.unwrap().unwrap();
        assert!(first.filename.starts_with("jw00001"), "{}", first.filename);
        ingest(
            &store,
            "b",
            &[same_product(1, 3, "Reprocessed", "2026-02-01T00:00:00")],
        )
        .await;

        // Another owner cannot end it.
        let done = Finish::Done {
            bytes: 10,
            verified: "JSON: parses".into(),
            origin: None,
        };
        let (ended, next) =
            finish_and_claim(&store, first.held(), "intruder", &done, now, i64::MAX).await;
        assert!(!ended, "a worker without the lease ended the job");
        let next = next.expect("the intruder still claims what is free");
        assert!(next.filename.starts_with("jw00002"), "{}", next.filename);

        // The holder ends it with a retry; the newer version of the same product is then free.
        let retry = Finish::Retry {
            at: now + 60_000,
            error: "HTTP 503".into(),
            refund: false,
            verify_failures: 0,
            not_found_since: None,
            waiting: None,
        };
        let (ended, next) =
            finish_and_claim(&store, first.held(), "w1", &retry, now, i64::MAX).await;
        assert!(ended);
        let newer = next.expect("the queued newer version of product 1");
        assert_eq!(newer.event_type, "Reprocessed");
        assert_eq!(newer.attempt, 1);

        // Giving up the newer one claims nothing: the retry is not due yet.
        let give_up = Finish::GiveUp {
            state: DownloadState::NeedsAuth,
            error: "HTTP 401".into(),
        };
        let (ended, next) =
            finish_and_claim(&store, newer.held(), "w1", &give_up, now, i64::MAX).await;
        assert!(ended);
        assert!(next.is_none(), "{next:?}");
        // Done, with the retry due: it comes back.
        let (ended, next) = finish_and_claim(
            &store,
            store
                .claim("w2", i64::MAX, now)
                .await
                .unwrap()
                .map_or(Held { id: -1, claim: 0 }, |j| j.held()),
            "w2",
            &done,
            now + 120_000,
            i64::MAX,
        )
        .await;
        assert!(!ended, "nothing was free for w2 to claim and end");
        assert_eq!(next.map(|j| j.id), Some(first.id));
        store.close().await;
    });
    assert_eq!(
        db.query_i64(
            "SELECT count(*) FROM downloads WHERE state = 'needs_auth' AND last_error = 'HTTP 401'"
        ),
        1
    );
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn a_batch_records_every_end_and_claims_only_distinct_paths(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        let first_versions: Vec<Value> = (1..=5)
            .map(|n| same_product(n, n, "New", "2026-01-01T00:00:00"))
            .collect();
        ingest(&store, "a", &first_versions).await;
        let now = mastsub::store::now_ms() + 1_000;
        // Ten claims asked at once: the five there are.
        let (recorded, claimed) = store
            .end_and_claim("w1", &[], 10, now, i64::MAX)
            .await
            .unwrap();
        assert!(recorded.is_empty());
        assert_eq!(claimed.len(), 5, "{claimed:?}");
        let mut ids: Vec<i64> = claimed.iter().map(|j| j.id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5, "a job claimed twice");
        // A newer version of product 1 queues behind the running first one.
        ingest(
            &store,
            "b",
            &[same_product(1, 6, "Reprocessed", "2026-02-01T00:00:00")],
        )
        .await;
        let product_1 = claimed
            .iter()
            .find(|j| j.filename.starts_with("jw00001"))
            .unwrap();
        let others: Vec<Held> = claimed
            .iter()
            .filter(|j| j.id != product_1.id)
            .map(|j| j.held())
            .collect();
        let done = Finish::Done {
            bytes: 10,
            verified: "JSON: parses".into(),
            origin: None,
        };
        let (recorded, _) = store
            .end_and_claim("intruder", &[(others[0], done.clone())], 0, now, i64::MAX)
            .await
            .unwrap();
        assert_eq!(
            recorded,
            vec![false],
            "an owner without the lease ended a job"
        );
        // Three ends in one call, the first a retry due at once: both versions of product 1 are then due
        // on one path, and the claims of the same call take one of them, never both.
        let retry = Finish::Retry {
            at: now,
            error: "HTTP 503".into(),
            refund: false,
            verify_failures: 0,
            not_found_since: None,
            waiting: None,
        };
        let ends = vec![
            (product_1.held(), retry),
            (others[0], done.clone()),
            (others[1], done.clone()),
        ];
        let (recorded, next) = store
            .end_and_claim("w1", &ends, 3, now, i64::MAX)
            .await
            .unwrap();
        assert_eq!(recorded, vec![true, true, true]);
        assert_eq!(
            next.len(),
            1,
            "two jobs of one path claimed together: {next:?}"
        );
        assert_eq!(next[0].local_path, product_1.local_path);
        // Ending a job twice records it once.
        let (recorded, none) = store
            .end_and_claim("w1", &[(others[0], done)], 1, now, i64::MAX)
            .await
            .unwrap();
        assert_eq!(recorded, vec![false]);
        assert!(none.is_empty(), "{none:?}");
        store.close().await;
    });
    assert_eq!(
        db.query_i64("SELECT count(*) FROM downloads WHERE state = 'done'"),
        2
    );
    assert_eq!(
        db.query_i64(
            "SELECT count(*) FROM downloads WHERE state = 'running' AND lease_owner = 'w1'"
        ),
        3
    );
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn hook_runs_are_queued_with_the_ends_that_publish_and_claimed_once_each(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        let mut records: Vec<Value> = (1..=3)
            .map(|n| same_product(n, n, "New", "2026-01-01T00:00:00.5"))
            .collect();
        // Recorded only: a product the notice skips.
        let mut skipped = same_product(4, 4, "Public", "2026-01-01T00:00:00");
        skipped["event_type"] = json!("Mystery");
        records.push(skipped);
        ingest(&store, "a", &records).await;
        let since = store.notice_hooks_since(true, 0).await.unwrap().unwrap();
        assert_eq!(
            store.notice_hooks_since(true, 99).await.unwrap(),
            Some(since),
            "set once"
        );
        assert_eq!(store.notice_hooks_since(false, 99).await.unwrap(), None);
        assert_eq!(
            store.notice_hooks_since(true, 7).await.unwrap(),
            Some(7),
            "set anew after a break"
        );
        let since = store.notice_hooks_since(true, 0).await.unwrap().unwrap();
        let now = mastsub::store::now_ms() + 1_000;
        let (_, claimed) = store
            .end_and_claim("w1", &[], 3, now, i64::MAX)
            .await
            .unwrap();
        assert_eq!(claimed.len(), 3);
        assert_eq!(
            store.queue_notice_hooks(since, now).await.unwrap(),
            0,
            "a notice with downloads running has not ended"
        );
        let done = Finish::Done {
            bytes: 10,
            verified: "FITS".into(),
            origin: None,
        };
        // Hooks off: a done end queues nothing.
        store
            .end_and_claim("w1", &[(claimed[0].held(), done.clone())], 0, now, i64::MAX)
            .await
            .unwrap();
        assert!(store.claim_hook_runs(10, now).await.unwrap().is_empty());
        // Hooks on: one run per end recorded, none for an end refused (not this owner's lease).
        store.queue_product_hooks(true);
        let (recorded, _) = store
            .end_and_claim(
                "intruder",
                &[(claimed[1].held(), done.clone())],
                0,
                now,
                i64::MAX,
            )
            .await
            .unwrap();
        assert_eq!(recorded, vec![false]);
        let failed = Finish::GiveUp {
            state: DownloadState::Failed,
            error: "HTTP 404".into(),
        };
        let (recorded, _) = store
            .end_and_claim(
                "w1",
                &[
                    (claimed[1].held(), done.clone()),
                    (claimed[2].held(), failed),
                ],
                0,
                now,
                i64::MAX,
            )
            .await
            .unwrap();
        assert_eq!(recorded, vec![true, true]);
        let runs = store.claim_hook_runs(10, now).await.unwrap();
        assert_eq!(runs.len(), 1, "{runs:?}");
        let env: std::collections::HashMap<_, _> = runs[0].env.iter().cloned().collect();
        assert_eq!(env["MASTSUB_PATH"], claimed[1].local_path);
        assert_eq!(
            env["MASTSUB_ARCHIVED_DATE"], "2026-01-01T00:00:00.5",
            "as the notice wrote it"
        );
        assert_eq!(env["MASTSUB_NOTICE"], "a.json");
        assert_eq!(env["MASTSUB_PROGRAM"], "5105");
        assert!(
            store.claim_hook_runs(10, now).await.unwrap().is_empty(),
            "claimed twice"
        );
        // Every download of the notice has ended: its run, once, with the counts.
        assert_eq!(store.queue_notice_hooks(since, now).await.unwrap(), 1);
        assert_eq!(store.queue_notice_hooks(since, now).await.unwrap(), 0);
        let runs = store.claim_hook_runs(10, now).await.unwrap();
        let env: std::collections::HashMap<_, _> = runs[0].env.iter().cloned().collect();
        assert_eq!(
            (
                env["MASTSUB_DONE"].as_str(),
                env["MASTSUB_FAILED"].as_str(),
                env["MASTSUB_SKIPPED"].as_str()
            ),
            ("2", "1", "1")
        );
        // A daemon killed while it ran: pending again, the attempt not counted.
        assert_eq!(store.requeue_hook_runs(now, true).await.unwrap(), 2);
        let again = store.claim_hook_runs(10, now).await.unwrap();
        assert_eq!(again.len(), 2);
        assert!(again.iter().all(|r| r.attempt == 1), "{again:?}");
        store.close().await;
    });
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn cloud_look_ups_are_kept_and_where_bytes_came_from_is_recorded(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        ingest(&store, "a", &[record(1, "Public"), record(2, "New")]).await;
        let up = store.upcoming(10).await.unwrap();
        assert_eq!(up.len(), 2);
        assert_eq!(up[0].event_type, "Public");
        assert!(up[0].url.contains(&up[0].filename), "{up:?}");

        let (a, b) = ("mast:JWST/product/a.fits", "mast:JWST/product/b.fits");
        store
            .record_cloud_paths(
                &[
                    (a.into(), Some("jwst/public/a.fits".into())),
                    (b.into(), None),
                ],
                1000,
            )
            .await
            .unwrap();
        // A later answer replaces an earlier one.
        store
            .record_cloud_paths(&[(b.into(), Some("jwst/public/b.fits".into()))], 2000)
            .await
            .unwrap();
        let known = store
            .cloud_paths(&[a.into(), b.into(), "mast:JWST/product/c.fits".into()])
            .await
            .unwrap();
        assert_eq!(known.len(), 2, "{known:?}");
        assert_eq!(known[a].key.as_deref(), Some("jwst/public/a.fits"));
        assert_eq!(known[a].looked_up_at, 1000);
        assert_eq!(
            (known[b].key.as_deref(), known[b].looked_up_at),
            (Some("jwst/public/b.fits"), 2000)
        );

        // A job's bytes: where its .part came from is on record while it runs (the claim gives it back),
        // and where the published file came from once done.
        let now = mastsub::store::now_ms();
        let (_, jobs) = store
            .end_and_claim("w1", &[], 2, now, now + 60_000)
            .await
            .unwrap();
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.source.is_none()));
        let cloud = mastsub::store::Origin {
            source: Provenance::Cloud,
            url: "https://bucket.example/jwst/public/a.fits".into(),
        };
        let progress = mastsub::store::Progress {
            bytes_done: 5,
            bytes_expected: Some(10),
            etag: Some("\"e\"".into()),
            last_modified: None,
            origin: Some(cloud.clone()),
            checksum: Some("x-amz-checksum-crc64nvme:AAAAAAAAAAA=".into()),
        };
        assert!(
            store
                .progress(jobs[0].held(), "w1", now + 60_000, &progress)
                .await
                .unwrap()
        );
        let back = Finish::Retry {
            at: now,
            error: "cut".into(),
            refund: true,
            verify_failures: 0,
            not_found_since: None,
            waiting: None,
        };
        let done = Finish::Done {
            bytes: 10,
            verified: "FITS".into(),
            origin: Some(mastsub::store::Origin {
                source: Provenance::Mast,
                url: jobs[1].url.clone(),
            }),
        };
        let (ended, again) = store
            .end_and_claim(
                "w1",
                &[(jobs[0].held(), back), (jobs[1].held(), done)],
                1,
                now,
                now + 60_000,
            )
            .await
            .unwrap();
        assert_eq!(ended, vec![true, true]);
        assert_eq!(again[0].id, jobs[0].id);
        assert_eq!(again[0].source, Some(Provenance::Cloud));
        assert_eq!(
            again[0].checksum.as_deref(),
            Some("x-amz-checksum-crc64nvme:AAAAAAAAAAA=")
        );
        let rows = store.list_downloads(None).await.unwrap();
        let row = |id| rows.iter().find(|r| r.id == id).unwrap();
        assert_eq!(
            row(jobs[0].id).fetched_from.as_deref(),
            Some(cloud.url.as_str())
        );
        assert_eq!(row(jobs[1].id).source, Some(Provenance::Mast));
        assert_eq!(
            row(jobs[1].id).fetched_from.as_deref(),
            Some(jobs[1].url.as_str())
        );
        store.close().await;
    });
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn two_jobs_of_one_local_path_never_run_at_once(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        // Two products of one file name in other filesets: in the --flat layout, one local path.
        let a = same_product(1, 1, "New", "2026-01-01T00:00:00");
        let mut b = same_product(2, 2, "New", "2026-01-01T00:00:00");
        b["filename"] = a["filename"].clone();
        let evs = events(&[a, b]);
        let meta = NoticeMeta {
            sha256: format!("{:0>64}", "flat"),
            source_kind: SourceKind::Cli,
            source_ref: "flat".into(),
            name: "flat.json".into(),
            size: 1,
            records: evs.len(),
            status: NoticeStatus::Accepted,
            error: None,
        };
        let outcome = store
            .ingest_notice(&meta, &evs, &categorizer().flat(true))
            .await
            .unwrap();
        assert_eq!(outcome.queued, 2, "two products, two jobs");
        let jobs = store.list_downloads(None).await.unwrap();
        assert_eq!(jobs[0].local_path, jobs[1].local_path);
        assert_ne!(jobs[0].fileset, jobs[1].fileset);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            + 1_000;
        let first = store.claim("w1", i64::MAX, now).await.unwrap().unwrap();
        // Its path is held: the other job is not claimed, by another worker or by the same one.
        assert!(store.claim("w2", i64::MAX, now).await.unwrap().is_none());
        let done = Finish::Done {
            bytes: 10,
            verified: "JSON: parses".into(),
            origin: None,
        };
        let (ended, next) =
            finish_and_claim(&store, first.held(), "w1", &done, now, i64::MAX).await;
        assert!(ended);
        let second = next.expect("the path is free once the first has ended");
        assert_ne!(second.id, first.id);
        assert!(store.claim("w2", i64::MAX, now).await.unwrap().is_none());
        store.close().await;
    });
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn mailbox_positions_and_source_health_are_kept(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        assert_eq!(store.imap_position("u@h:993", "INBOX").await.unwrap(), None);
        store
            .set_imap_position("u@h:993", "INBOX", 7, 41)
            .await
            .unwrap();
        store
            .set_imap_position("u@h:993", "INBOX", 7, 42)
            .await
            .unwrap();
        store
            .set_imap_position("u@h:993", "Other", 9, 1)
            .await
            .unwrap();
        assert_eq!(
            store.imap_position("u@h:993", "INBOX").await.unwrap(),
            Some((7, 42))
        );
        let mut h = SourceHealth {
            source: "imap".into(),
            state: "reconnecting".into(),
            last_error: Some("connection refused".into()),
            last_error_at: Some(5),
            updated_at: 5,
            ..SourceHealth::default()
        };
        store.record_source_health(&h).await.unwrap();
        h.state = "idle".into();
        h.connected = true;
        h.last_error = None;
        h.last_error_at = None;
        h.last_contact = Some(9);
        h.taken = 2;
        store.record_source_health(&h).await.unwrap();
        h.taken = 1;
        store.record_source_health(&h).await.unwrap();
        let s = store.status(0).await.unwrap();
        assert_eq!(s.sources.len(), 1);
        let got = &s.sources[0];
        assert_eq!(
            (
                got.state.as_str(),
                got.connected,
                got.taken,
                got.last_contact
            ),
            ("idle", true, 3, Some(9))
        );
        assert_eq!(
            (got.last_error.as_deref(), got.last_error_at),
            (Some("connection refused"), Some(5)),
            "the last error stays after recovery"
        );
        store.close().await;
    });
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn status_counts_every_state_type_and_notice_status(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        ingest(
            &store,
            "a",
            &[
                record(1, "New"),
                record(2, "Reprocessed"),
                record(3, "Public"),
                record(4, "Public"),
            ],
        )
        .await;
        let s = store.status(10).await.unwrap();
        assert_eq!(s.downloads[&DownloadState::Queued], 4);
        assert_eq!(s.downloads[&DownloadState::NeedsAuth], 0);
        assert_eq!(s.events[&mastsub::notice::EventType::Public], 2);
        assert_eq!(s.notices[&NoticeStatus::Accepted], 1);
        assert!(s.recent_failures.is_empty());
        store.close().await;
    });
}

#[test]
fn several_processes_ingesting_into_one_database_lose_nothing() {
    let ws = Workspace::new();
    let mut children = Vec::new();
    for p in 0..4u64 {
        let files: Vec<_> = (0..15u64)
            .map(|i| {
                ws.write_notice(
                    &format!("p{p}-{i}.json"),
                    &common::notice_of(p * 10_000 + i * 100, 50),
                )
            })
            .collect();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mastsub"));
        cmd.arg("--config")
            .arg(&ws.config)
            .arg("ingest")
            .args(&files)
            .current_dir(ws.dir.path());
        children.push(cmd.spawn().unwrap());
    }
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 4 * 15 * 50);
    assert_eq!(ws.query_i64("SELECT count(*) FROM notices"), 60);
}

/// A done end of `bytes` bytes.
fn done(bytes: i64) -> Finish {
    Finish::Done {
        bytes,
        verified: "JSON: parses".into(),
        origin: None,
    }
}

/// Claims of one worker task until nothing is left to claim, each job ended done; the ids it claimed.
/// `style` 0 claims and finishes one at a time, 1 ends and claims one per `end_and_claim`, 2 holds three
/// and ends them and claims three more in one `end_and_claim`.
async fn drain(store: Arc<dyn Store>, owner: String, style: usize, now: i64) -> Vec<i64> {
    let lease = now + 600_000;
    let mut claimed = Vec::new();
    match style {
        0 => {
            while let Some(job) = store.claim(&owner, lease, now).await.unwrap() {
                claimed.push(job.id);
                assert!(
                    store
                        .finish(job.held(), &owner, &done(10), now)
                        .await
                        .unwrap()
                );
            }
        }
        _ => {
            let batch = if style == 1 { 1 } else { 3 };
            let (_, mut held) = store
                .end_and_claim(&owner, &[], batch, now, lease)
                .await
                .unwrap();
            while !held.is_empty() {
                claimed.extend(held.iter().map(|j| j.id));
                let ends: Vec<(Held, Finish)> = held.iter().map(|j| (j.held(), done(10))).collect();
                let (recorded, next) = store
                    .end_and_claim(&owner, &ends, batch, now, lease)
                    .await
                    .unwrap();
                assert!(recorded.iter().all(|r| *r), "{owner}: an end refused");
                held = next;
            }
        }
    }
    claimed
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn concurrent_workers_claim_every_job_exactly_once(#[case] backend: Backend) {
    const JOBS: u64 = 2_000;
    const TASKS: usize = 32;
    let Some(db) = Db::new(backend) else {
        return;
    };
    let rt = threaded_runtime();
    let claimed = rt.block_on(async {
        let store = db.open().await;
        let records: Vec<Value> = (1..=JOBS).map(|n| record(n, "New")).collect();
        assert_eq!(ingest(&store, "many", &records).await.queued, JOBS as usize);
        let now = mastsub::store::now_ms() + 1_000;
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| tokio::spawn(drain(store.clone(), format!("w{t}"), t % 3, now)))
            .collect();
        let mut claimed = Vec::new();
        for t in tasks {
            claimed.extend(t.await.unwrap());
        }
        let s = store.status(0).await.unwrap();
        assert_eq!(s.downloads[&DownloadState::Done], JOBS);
        assert_eq!(s.downloads[&DownloadState::Queued], 0);
        assert_eq!(s.downloads[&DownloadState::Running], 0);
        assert_eq!(s.bytes_done, JOBS * 10);
        assert_eq!(s.by_event_type[&EventType::New][&DownloadState::Done], JOBS);
        store.close().await;
        claimed
    });
    let distinct: HashSet<i64> = claimed.iter().copied().collect();
    assert_eq!(distinct.len(), claimed.len(), "a job was claimed twice");
    assert_eq!(claimed.len() as u64, JOBS);
    assert_eq!(
        db.query_i64("SELECT count(*) FROM downloads WHERE state = 'done' AND attempts = 1"),
        JOBS as i64
    );
    if backend == Backend::Postgres {
        assert_eq!(
            db.query_i64("SELECT count(*) FROM downloads WHERE claims = 1"),
            JOBS as i64
        );
    }
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn racing_claimers_never_run_two_jobs_of_one_path(#[case] backend: Backend) {
    const PATHS: u64 = 100;
    const TASKS: usize = 16;
    let Some(db) = Db::new(backend) else {
        return;
    };
    let rt = threaded_runtime();
    rt.block_on(async {
        let store = db.open().await;
        // Two products per file name, in other filesets: in the --flat layout, two jobs per local path.
        let mut records = Vec::new();
        for n in 1..=PATHS {
            let a = same_product(n, n, "New", "2026-01-01T00:00:00");
            let mut b = same_product(n + 1_000, n + 1_000, "New", "2026-01-01T00:00:00");
            b["filename"] = a["filename"].clone();
            records.push(a);
            records.push(b);
        }
        let outcome = ingest_with(&store, "flat", &records, &categorizer().flat(true)).await;
        assert_eq!(outcome.queued as u64, 2 * PATHS);
        let now = mastsub::store::now_ms() + 1_000;
        // The paths held now, as the claimers see them: a path is let go before its end is recorded, so
        // a claim of it can only succeed after that.
        let held = Arc::new(Mutex::new(HashSet::<String>::new()));
        let tasks: Vec<_> = (0..TASKS)
            .map(|t| {
                let (store, held) = (store.clone(), held.clone());
                tokio::spawn(async move {
                    let owner = format!("w{t}");
                    let lease = now + 600_000;
                    let mut ended = 0u64;
                    let claim = |store: Arc<dyn Store>,
                                 owner: String,
                                 ends: Vec<(Held, Finish)>| async move {
                        if t % 2 == 0 {
                            for (job, f) in &ends {
                                assert!(store.finish(*job, &owner, f, now).await.unwrap());
                            }
                            store.claim(&owner, lease, now).await.unwrap()
                        } else {
                            let (recorded, mut jobs) = store
                                .end_and_claim(&owner, &ends, 1, now, lease)
                                .await
                                .unwrap();
                            assert!(recorded.iter().all(|r| *r));
                            jobs.pop()
                        }
                    };
                    let mut job = claim(store.clone(), owner.clone(), Vec::new()).await;
                    while let Some(j) = job {
                        assert!(
                            held.lock().unwrap().insert(j.local_path.clone()),
                            "two jobs of {} running at once",
                            j.local_path
                        );
                        tokio::task::yield_now().await;
                        held.lock().unwrap().remove(&j.local_path);
                        ended += 1;
                        job = claim(store.clone(), owner.clone(), vec![(j.held(), done(1))]).await;
                    }
                    ended
                })
            })
            .collect();
        let mut ended = 0;
        for t in tasks {
            ended += t.await.unwrap();
        }
        assert_eq!(ended, 2 * PATHS);
        store.close().await;
    });
    assert_eq!(
        db.query_i64("SELECT count(*) FROM downloads WHERE state = 'done' AND attempts = 1"),
        2 * PATHS as i64
    );
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn stores_opened_at_once_on_a_new_database_all_migrate_it_once(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    let db = Arc::new(db);
    threaded_runtime().block_on(async {
        let opening: Vec<_> = (0..4)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move { db.open().await })
            })
            .collect();
        let mut stores = Vec::new();
        for o in opening {
            stores.push(o.await.unwrap());
        }
        // They share one database.
        ingest(&stores[0], "a", &[record(1, "New")]).await;
        for s in &stores {
            assert_eq!(s.list_downloads(None).await.unwrap().len(), 1);
            s.close().await;
        }
    });
    let (migrations, tables) = match backend {
        Backend::Sqlite => (
            std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite"))
                .unwrap()
                .count() as i64,
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'downloads'",
        ),
        Backend::Postgres => (
            1,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'downloads'",
        ),
    };
    assert_eq!(
        db.query_i64("SELECT count(*) FROM _sqlx_migrations WHERE success"),
        migrations
    );
    assert_eq!(db.query_i64(tables), 1);
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn several_stores_ingesting_into_one_database_at_once_lose_and_repeat_nothing(
    #[case] backend: Backend,
) {
    const STORES: u64 = 4;
    const NOTICES: u64 = 15;
    let Some(db) = Db::new(backend) else {
        return;
    };
    let db = Arc::new(db);
    let already = threaded_runtime().block_on(async {
        let mut stores = Vec::new();
        for _ in 0..STORES {
            stores.push(db.open().await);
        }
        let tasks: Vec<_> = stores
            .iter()
            .enumerate()
            .map(|(p, store)| {
                let store = store.clone();
                let p = p as u64;
                tokio::spawn(async move {
                    let mut already = 0;
                    for i in 0..NOTICES {
                        // 50 events of this store's own, and 10 that every store's notice i holds.
                        let mut records: Vec<Value> = (0..50)
                            .map(|k| record(p * 10_000 + i * 100 + k + 1, "New"))
                            .collect();
                        records.extend((0..10).map(|k| record(900_000 + i * 10 + k, "New")));
                        let o = ingest(&store, &format!("p{p}n{i}"), &records).await;
                        already += o.already_recorded;
                        // The same content from every store: one notice.
                        ingest(
                            &store,
                            &format!("shared{i}"),
                            &[record(800_000 + i, "Public")],
                        )
                        .await;
                    }
                    already
                })
            })
            .collect();
        let mut already = 0;
        for t in tasks {
            already += t.await.unwrap();
        }
        for s in &stores {
            s.close().await;
        }
        already as i64
    });
    let (s, n) = (STORES as i64, NOTICES as i64);
    assert_eq!(already, (s - 1) * n * 10, "shared events recorded again");
    assert_eq!(
        db.query_i64("SELECT count(*) FROM events"),
        s * n * 50 + n * 10 + n
    );
    assert_eq!(
        db.query_i64("SELECT count(DISTINCT event_id) FROM events"),
        s * n * 50 + n * 10 + n
    );
    assert_eq!(db.query_i64("SELECT count(*) FROM notices"), s * n + n);
    assert_eq!(
        db.query_i64("SELECT sum(times_seen) FROM notices WHERE name LIKE 'shared%'"),
        s * n
    );
    assert_eq!(
        db.query_i64("SELECT count(*) FROM downloads"),
        s * n * 50 + n * 10 + n
    );
    assert_eq!(
        db.query_i64("SELECT count(DISTINCT product) FROM downloads"),
        s * n * 50 + n * 10 + n
    );
}

/// Asserts that `status` counts what a fresh count of the rows says: jobs by state and by type and
/// state, bytes of done jobs, events by type.
async fn assert_counts_match(db: &Db, store: &Arc<dyn Store>) {
    let s = store.status(0).await.unwrap();
    for state in DownloadState::ALL {
        let counted = db.query_i64(&format!(
            "SELECT count(*) FROM downloads WHERE state = '{state}'"
        ));
        assert_eq!(s.downloads[&state] as i64, counted, "{state}");
        for t in EventType::KNOWN {
            let counted = db.query_i64(&format!(
                "SELECT count(*) FROM downloads WHERE state = '{state}' AND event_type = '{}'",
                t.as_str()
            ));
            assert_eq!(
                s.by_event_type[&t][&state] as i64,
                counted,
                "{state}, {}",
                t.as_str()
            );
        }
    }
    assert_eq!(
        s.bytes_done as i64,
        db.query_i64("SELECT coalesce(sum(bytes_done), 0) FROM downloads WHERE state = 'done'")
    );
    for t in EventType::KNOWN {
        assert_eq!(
            s.events[&t] as i64,
            db.query_i64(&format!(
                "SELECT count(*) FROM events WHERE event_type = '{}'",
                t.as_str()
            )),
            "{}",
            t.as_str()
        );
    }
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn status_counts_stay_exact_through_claims_retries_give_ups_and_ends(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    let rt = threaded_runtime();
    rt.block_on(async {
        let store = db.open().await;
        let types = ["New", "Reprocessed", "Public"];
        let records: Vec<Value> = (1..=30).map(|n| record(n, types[n as usize % 3])).collect();
        ingest(&store, "a", &records).await;
        assert_counts_match(&db, &store).await;
        let now = mastsub::store::now_ms() + 1_000;
        let lease = now + 600_000;
        let (_, jobs) = store
            .end_and_claim("w1", &[], 30, now, lease)
            .await
            .unwrap();
        assert_eq!(jobs.len(), 30);
        assert_counts_match(&db, &store).await;
        // Progress of a running job, or a renewed lease, changes no count (on PostgreSQL: adds no delta).
        let deltas = || match backend {
            Backend::Sqlite => 0,
            Backend::Postgres => db.query_i64("SELECT count(*) FROM download_count_deltas"),
        };
        let before = deltas();
        let progress = mastsub::store::Progress {
            bytes_done: 5,
            ..Default::default()
        };
        assert!(
            store
                .progress(jobs[4].held(), "w1", lease, &progress)
                .await
                .unwrap()
        );
        assert!(
            store
                .renew_lease(jobs[4].held(), "w1", lease + 1)
                .await
                .unwrap()
        );
        assert_eq!(deltas(), before, "a progress write added count deltas");
        let mut ends = Vec::new();
        for (i, j) in jobs.iter().enumerate() {
            let end = match i % 5 {
                0 => done(100 + i as i64),
                1 => Finish::Retry {
                    at: now,
                    error: "HTTP 503".into(),
                    refund: false,
                    verify_failures: 0,
                    not_found_since: None,
                    waiting: None,
                },
                2 => Finish::GiveUp {
                    state: DownloadState::Failed,
                    error: "HTTP 404".into(),
                },
                3 => Finish::GiveUp {
                    state: DownloadState::NeedsAuth,
                    error: "HTTP 401".into(),
                },
                _ => continue,
            };
            ends.push((j.held(), end));
        }
        // Half through `finish`, half in one batch that also claims the retried ones again.
        let (one_by_one, batch) = ends.split_at(ends.len() / 2);
        for (job, f) in one_by_one {
            assert!(store.finish(*job, "w1", f, now).await.unwrap());
        }
        let (recorded, again) = store
            .end_and_claim("w1", batch, 2, now, lease)
            .await
            .unwrap();
        assert!(recorded.iter().all(|r| *r));
        assert_eq!(again.len(), 2);
        assert_counts_match(&db, &store).await;
        // The jobs retried and claimed again end done; a failed one is retried; a done one redone; the
        // ones waiting for a token queued again; the rest given back.
        for j in &again {
            assert!(store.finish(j.held(), "w1", &done(7), now).await.unwrap());
        }
        let failed = store
            .list_downloads(Some(DownloadState::Failed))
            .await
            .unwrap();
        assert_eq!(store.retry(Some(&[failed[0].id]), now).await.unwrap(), 1);
        let done_jobs = store
            .list_downloads(Some(DownloadState::Done))
            .await
            .unwrap();
        assert_eq!(store.redo(&[done_jobs[0].id], now).await.unwrap(), 1);
        assert!(store.requeue_needs_auth(now).await.unwrap() > 0);
        assert_counts_match(&db, &store).await;
        assert!(store.release_leases("w1", now).await.unwrap() > 0);
        assert_counts_match(&db, &store).await;
        store.close().await;
    });
    if backend == Backend::Postgres {
        // Many delta rows (that add up to nothing): the next status folds them into one per group, and
        // two statuses folding at once count right as well.
        db.execute(
            "INSERT INTO download_count_deltas (event_type, state, n, bytes)
             SELECT 'New', 'queued', CASE WHEN g % 2 = 0 THEN 1 ELSE -1 END, 0
             FROM generate_series(1, 10002) AS g;
             INSERT INTO event_count_deltas (event_type, n)
             SELECT 'Public', CASE WHEN g % 2 = 0 THEN 1 ELSE -1 END FROM generate_series(1, 10002) AS g",
        );
        rt.block_on(async {
            let store = db.open().await;
            let (a, b) = tokio::join!(store.status(0), store.status(0));
            assert_eq!(a.unwrap().downloads, b.unwrap().downloads);
            assert_counts_match(&db, &store).await;
            store.close().await;
        });
        let groups = db.query_i64(
            "SELECT count(*) FROM (SELECT DISTINCT event_type, state FROM downloads) AS g",
        );
        assert!(
            db.query_i64("SELECT count(*) FROM download_count_deltas") <= groups + 10,
            "not folded"
        );
        assert!(db.query_i64("SELECT count(*) FROM event_count_deltas") <= 3 + 10);
    }
}

#[test]
fn a_lease_renewed_after_it_was_judged_orphaned_is_not_taken() {
    let Some(db) = Db::new(Backend::Postgres) else {
        return;
    };
    let db = Arc::new(db);
    runtime().block_on(async {
        let store = db.open().await;
        ingest(&store, "a", &[record(1, "New"), record(2, "New")]).await;
        let now = mastsub::store::now_ms() + 1_000;
        let (_, jobs) = store
            .end_and_claim("gone", &[], 2, now, now + 10)
            .await
            .unwrap();
        assert_eq!(jobs.len(), 2);
        let renewed = jobs[0].id;
        // The holder of the first renews its lease between the judging and the requeue.
        let side = db.clone();
        let judge = move |owner: &str, _expires: i64| {
            let sql = format!(
                "UPDATE downloads SET lease_expires_at = lease_expires_at + 60000 WHERE id = {renewed}"
            );
            side.execute(&sql);
            owner == "gone"
        };
        assert_eq!(store.requeue_orphans(now, &judge).await.unwrap(), 1);
        let running = store
            .list_downloads(Some(DownloadState::Running))
            .await
            .unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].id, renewed);
        store.close().await;
    });
}

#[test]
fn a_read_only_store_refuses_a_database_that_is_not_ours_and_writes_nothing() {
    let Some(db) = Db::new(Backend::Postgres) else {
        return;
    };
    let url = db.url();
    let options = || PgConnectOptions::from_str(&url).unwrap();
    runtime().block_on(async {
        match PgStore::open_read_only(options(), "the shown name").await {
            Err(StoreError::NotOurs { path }) => assert_eq!(path, "the shown name"),
            other => panic!("{other:?}"),
        }
        let store = db.open().await;
        ingest(&store, "a", &[record(1, "New")]).await;
        store.close().await;
        let reader: Arc<dyn Store> =
            Arc::new(PgStore::open_read_only(options(), &url).await.unwrap());
        assert_eq!(
            reader.status(0).await.unwrap().downloads[&DownloadState::Queued],
            1
        );
        let refused = reader.retry(None, 0).await;
        assert!(
            matches!(refused, Err(StoreError::Query { .. })),
            "{refused:?}"
        );
        let claimed = reader.claim("w1", i64::MAX, i64::MAX).await;
        assert!(claimed.is_err(), "{claimed:?}");
        reader.close().await;
    });
    assert_eq!(
        db.query_i64("SELECT count(*) FROM downloads WHERE state = 'queued'"),
        1
    );
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn an_event_id_again_with_other_content_is_a_conflict_recorded_all_the_same(
    #[case] backend: Backend,
) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        ingest(&store, "a", &[record(1, "New"), record(2, "New")]).await;
        // Record 2's id again naming product 3, and in the same notice once more with product 4.
        let mut other = record(3, "Public");
        other["event_id"] = record(2, "New")["event_id"].clone();
        let mut again = record(4, "New");
        again["event_id"] = record(7, "New")["event_id"].clone();
        let o = ingest(
            &store,
            "b",
            &[other, record(7, "New"), again, record(1, "New")],
        )
        .await;
        assert_eq!((o.recorded_total(), o.already_recorded), (3, 1));
        assert_eq!(o.conflicts.len(), 2, "{:?}", o.conflicts);
        assert_eq!(o.conflicts[0].record, 1);
        assert!(
            o.conflicts[0]
                .earlier
                .starts_with("notice a.json, record 2: jwst/"),
            "{}",
            o.conflicts[0].earlier
        );
        assert!(
            o.conflicts[0].now.contains(", Public, "),
            "{}",
            o.conflicts[0].now
        );
        assert!(
            o.conflicts[1]
                .earlier
                .starts_with("notice b.json, record 2: "),
            "{}",
            o.conflicts[1].earlier
        );
        store.close().await;
    });
    assert_eq!(db.query_i64("SELECT count(*) FROM events"), 5);
    assert_eq!(
        db.query_i64("SELECT count(DISTINCT event_id) FROM events"),
        3
    );
}

fn beat(node: &str, owner: &str, now: i64) -> MemberBeat {
    MemberBeat {
        node: node.into(),
        owner: owner.into(),
        pid: 4242,
        started_at: now,
        rate: 1.5,
        now,
    }
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn a_member_name_is_refused_while_its_holder_lives_and_taken_over_when_it_is_silent_or_stopped(
    #[case] backend: Backend,
) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        let never = |_: &str| false;
        let t = 1_000_000;
        assert_eq!(
            store
                .join_member(&beat("node-a", "node-a:1:1:m", t), t - 60_000, &never)
                .await
                .unwrap(),
            None
        );
        // The same process again (a restarted loop) is welcome.
        assert_eq!(
            store
                .join_member(&beat("node-a", "node-a:1:1:m", t + 1), t - 60_000, &never)
                .await
                .unwrap(),
            None
        );
        // Another process under that name, while the first was heard from within the window: refused, and
        // told who is in the way.
        let other = store
            .join_member(
                &beat("node-a", "node-a:2:2:m", t + 10),
                t + 10 - 60_000,
                &never,
            )
            .await
            .unwrap()
            .expect("refused");
        assert_eq!(
            (other.node.as_str(), other.pid, other.last_heartbeat),
            ("node-a", 4242, t + 1)
        );
        assert!(
            store
                .member_beat(&beat("node-a", "node-a:1:1:m", t + 20))
                .await
                .unwrap()
        );
        // Certainly gone (a dead process of this machine): taken at once, with the leases it held.
        assert!(
            store
                .lead("imap", "node-a", "node-a:1:1:m", t + 25, t + 60_000)
                .await
                .unwrap()
        );
        let gone = |owner: &str| owner == "node-a:1:1:m";
        assert_eq!(
            store
                .join_member(
                    &beat("node-a", "node-a:2:2:m", t + 30),
                    t + 30 - 60_000,
                    &gone
                )
                .await
                .unwrap(),
            None
        );
        // The old holder's heartbeat now says it lost the name.
        assert!(
            !store
                .member_beat(&beat("node-a", "node-a:1:1:m", t + 40))
                .await
                .unwrap()
        );
        assert!(
            store
                .member_beat(&beat("node-a", "node-a:2:2:m", t + 40))
                .await
                .unwrap()
        );
        assert!(
            store
                .lead("imap", "node-a", "node-a:2:2:m", t + 41, t + 60_000)
                .await
                .unwrap()
        );
        // A row gone (a restored database, a row deleted by hand) is made again by its holder's heartbeat.
        db.execute("DELETE FROM members WHERE node = 'node-a'");
        assert!(
            store
                .member_beat(&beat("node-a", "node-a:2:2:m", t + 45))
                .await
                .unwrap()
        );
        assert_eq!(
            store.members(t + 46).await.unwrap()[0].last_heartbeat,
            t + 45
        );
        // Silent for longer than the window: taken.
        assert_eq!(
            store
                .join_member(
                    &beat("node-a", "node-a:3:3:m", t + 70_000),
                    t + 10_000,
                    &never
                )
                .await
                .unwrap(),
            None
        );
        // Stopped cleanly: taken at once, however fresh its last heartbeat.
        store
            .join_member(&beat("node-b", "node-b:1:1:m", t), t - 60_000, &never)
            .await
            .unwrap();
        store
            .leave_member("node-b", "node-b:1:1:m", t + 5)
            .await
            .unwrap();
        let members = store.members(t + 6).await.unwrap();
        let b = members.iter().find(|m| m.node == "node-b").unwrap();
        assert_eq!(b.stopped_at, Some(t + 5));
        assert_eq!(
            store
                .join_member(&beat("node-b", "node-b:2:2:m", t + 6), t - 60_000, &never)
                .await
                .unwrap(),
            None
        );
        let members = store.members(t + 7).await.unwrap();
        assert_eq!(
            members.iter().map(|m| m.node.as_str()).collect::<Vec<_>>(),
            ["node-a", "node-b"]
        );
        assert!(
            members.iter().all(|m| m.stopped_at.is_none()),
            "{members:?}"
        );
    });
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn a_leader_lease_has_one_holder_until_it_runs_out_or_is_given_up(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        let t = 2_000_000;
        let (a, b) = ("node-a:1:1:m", "node-b:1:1:m");
        let never = |_: &str| false;
        store
            .join_member(&beat("node-a", a, t), t, &never)
            .await
            .unwrap();
        store
            .join_member(&beat("node-b", b, t), t, &never)
            .await
            .unwrap();
        assert!(store.lead("imap", "node-a", a, t, t + 1000).await.unwrap());
        assert!(
            !store
                .lead("imap", "node-b", b, t + 10, t + 1010)
                .await
                .unwrap()
        );
        // Another role is another lease.
        assert!(
            store
                .lead("mail", "node-b", b, t + 10, t + 1010)
                .await
                .unwrap()
        );
        // Renewed by its holder; not taken before it runs out.
        assert!(
            store
                .lead("imap", "node-a", a, t + 500, t + 1500)
                .await
                .unwrap()
        );
        assert!(
            !store
                .lead("imap", "node-b", b, t + 1200, t + 2200)
                .await
                .unwrap()
        );
        let members = store.members(t + 1300).await.unwrap();
        let leads = |node: &str| {
            members
                .iter()
                .find(|m| m.node == node)
                .unwrap()
                .leads
                .clone()
        };
        assert_eq!(leads("node-a"), ["imap"]);
        assert_eq!(
            leads("node-b"),
            Vec::<String>::new(),
            "mail ran out at t + 1010"
        );
        // Run out: the other member takes it, and the old holder cannot renew.
        assert!(
            store
                .lead("imap", "node-b", b, t + 1500, t + 2500)
                .await
                .unwrap()
        );
        assert!(
            !store
                .lead("imap", "node-a", a, t + 1600, t + 2600)
                .await
                .unwrap()
        );
        // Given up: taken at once. Giving up what one does not hold changes nothing.
        store.resign("imap", a).await.unwrap();
        assert!(
            !store
                .lead("imap", "node-a", a, t + 1700, t + 2700)
                .await
                .unwrap()
        );
        store.resign("imap", b).await.unwrap();
        assert!(
            store
                .lead("imap", "node-a", a, t + 1800, t + 2800)
                .await
                .unwrap()
        );
        // A member that leaves keeps its leases until its work under them has stopped and it resigns:
        // a successor must not start while that work still runs.
        store.leave_member("node-a", a, t + 1900).await.unwrap();
        assert!(
            !store
                .lead("imap", "node-b", b, t + 1901, t + 2901)
                .await
                .unwrap()
        );
        store.resign("imap", a).await.unwrap();
        assert!(
            store
                .lead("imap", "node-b", b, t + 1902, t + 2902)
                .await
                .unwrap()
        );
    });
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn of_many_members_asking_for_a_free_lease_at_once_exactly_one_gets_it(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    threaded_runtime().block_on(async {
        let store = db.open().await;
        for round in 0..5i64 {
            let t = 3_000_000 + round * 10_000;
            let mut asks = tokio::task::JoinSet::new();
            for i in 0..16 {
                let store = store.clone();
                asks.spawn(async move {
                    let owner = format!("node-{i}:1:{round}:m");
                    store
                        .lead("hooks", &format!("node-{i}"), &owner, t, t + 5000)
                        .await
                        .unwrap()
                });
            }
            let won = asks.join_all().await.into_iter().filter(|w| *w).count();
            assert_eq!(won, 1, "round {round}");
        }
    });
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn members_show_the_jobs_they_hold(#[case] backend: Backend) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        let records: Vec<Value> = (1..=3).map(|i| record(i, "New")).collect();
        ingest(&store, "m1", &records).await;
        let never = |_: &str| false;
        let now = mastsub::store::now_ms();
        // A node name with colons in it is still one node.
        let (a, b) = ("host:a:1:1:m", "node-b:7:2:m");
        store
            .join_member(&beat("host:a", a, now), now, &never)
            .await
            .unwrap();
        store
            .join_member(&beat("node-b", b, now), now, &never)
            .await
            .unwrap();
        for owner in [a, a, b] {
            store
                .claim(owner, now + 60_000, now)
                .await
                .unwrap()
                .expect("a job");
        }
        let members = store.members(now).await.unwrap();
        let running: Vec<(&str, u64)> = members
            .iter()
            .map(|m| (m.node.as_str(), m.running))
            .collect();
        assert_eq!(running, [("host:a", 2), ("node-b", 1)]);
        let status = store.status(5).await.unwrap();
        assert_eq!(status.members.len(), 2);
    });
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn a_worker_whose_lease_was_taken_over_changes_nothing_even_under_its_own_owner_name(
    #[case] backend: Backend,
) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    runtime().block_on(async {
        let store = db.open().await;
        ingest(&store, "f1", &[record(1, "New")]).await;
        let now = mastsub::store::now_ms();
        // A worker claims the job, stalls past its lease; the sweep gives the job back, and the same pool
        // (the same owner name) claims it again for another worker.
        let stale = store
            .claim("pool", now + 1_000, now)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stale.claim, 1);
        let orphaned = |_: &str, expires: i64| expires <= now + 2_000;
        assert_eq!(
            store.requeue_orphans(now + 2_000, &orphaned).await.unwrap(),
            1
        );
        let fresh = store
            .claim("pool", now + 60_000, now + 2_000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((fresh.id, fresh.claim), (stale.id, 2));
        // The stalled worker wakes: its progress, renewal and end are all refused.
        let progress = mastsub::store::Progress {
            bytes_done: 999,
            ..Default::default()
        };
        assert!(
            !store
                .progress(stale.held(), "pool", now + 60_000, &progress)
                .await
                .unwrap()
        );
        assert!(
            !store
                .renew_lease(stale.held(), "pool", now + 90_000)
                .await
                .unwrap()
        );
        assert!(
            !store
                .finish(stale.held(), "pool", &done(5), now + 3_000)
                .await
                .unwrap()
        );
        let (recorded, _) = store
            .end_and_claim(
                "pool",
                &[(stale.held(), done(5))],
                0,
                now + 3_000,
                now + 60_000,
            )
            .await
            .unwrap();
        assert_eq!(recorded, [false]);
        let row = store.list_downloads(None).await.unwrap().remove(0);
        assert_eq!((row.state, row.bytes_done), (DownloadState::Running, 0));
        // Before publication the publisher holds the leases of its batch: only the current claim's is.
        assert_eq!(
            store
                .hold("pool", &[stale.held(), fresh.held()], now + 120_000)
                .await
                .unwrap(),
            [false, true]
        );
        assert_eq!(
            store
                .hold("other", &[fresh.held()], now + 120_000)
                .await
                .unwrap(),
            [false]
        );
        // The current claim's writes count.
        assert!(
            store
                .progress(fresh.held(), "pool", now + 60_000, &progress)
                .await
                .unwrap()
        );
        assert!(
            store
                .renew_lease(fresh.held(), "pool", now + 90_000)
                .await
                .unwrap()
        );
        assert!(
            store
                .finish(fresh.held(), "pool", &done(7), now + 3_000)
                .await
                .unwrap()
        );
        let row = store.list_downloads(None).await.unwrap().remove(0);
        assert_eq!((row.state, row.bytes_done), (DownloadState::Done, 7));
    });
}

#[rstest]
#[case::sqlite(Backend::Sqlite)]
#[case::postgres(Backend::Postgres)]
fn mailers_at_once_never_take_one_mail_and_a_dead_mailers_mails_come_back(
    #[case] backend: Backend,
) {
    let Some(db) = Db::new(backend) else {
        return;
    };
    threaded_runtime().block_on(async {
        let (one, two) = (db.open().await, db.open().await);
        let t = 5_000_000;
        one.mail_watermarks(t).await.unwrap();
        let mails: Vec<mastsub::store::NewMail> = (0..60)
            .map(|i| mastsub::store::NewMail {
                kind: "alert",
                cause: Some(format!("cause {i}")),
                subject: format!("mail {i}"),
                body: "body".into(),
            })
            .collect();
        one.queue_alerts(&mails, t, t).await.unwrap();
        let (a, b) = tokio::join!(one.due_mail(t + 1), two.due_mail(t + 1));
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut ids: Vec<i64> = a.iter().chain(&b).map(|m| m.id).collect();
        assert_eq!(ids.len(), 60, "{} and {}", a.len(), b.len());
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 60, "a mail taken by both mailers");
        assert!(a.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
        // Claimed: due to no one, until sent, failed, or the claim runs out.
        assert!(one.due_mail(t + 2).await.unwrap().is_empty());
        one.mail_sent(ids[0], t + 3).await.unwrap();
        one.mail_failed(ids[1], "421 try later", t + 10)
            .await
            .unwrap();
        let again = two.due_mail(t + 10).await.unwrap();
        assert_eq!(
            again.iter().map(|m| (m.id, m.attempts)).collect::<Vec<_>>(),
            [(ids[1], 1)]
        );
        // The mailer that claimed the others died: they come back after the claim, the sent one never.
        let back = two
            .due_mail(t + 1 + mastsub::store::MAIL_CLAIM_MS)
            .await
            .unwrap();
        assert_eq!(back.len(), 50, "{}", back.len());
        assert!(back.iter().all(|m| m.id != ids[0] && m.id != ids[1]));
    });
}
