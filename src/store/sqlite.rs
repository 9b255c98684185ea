//! The SQLite backend: one writer connection, read-only readers, WAL, `BEGIN IMMEDIATE` for every write.
//!
//! A notice is recorded with few statements whatever its size: rows are inserted in multi-row `VALUES`
//! chunks of bound parameters (never one round trip per event), and look-ups send their keys as one JSON
//! parameter that SQLite's `json_each` unpacks.

use super::now_ms;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::json;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::guard::FileIdentity;
use super::{
    CloudPath, DigestItem, Held, Member, MemberBeat, NewMail, NoticeDigest, OutMail, Upcoming,
};
use super::{
    DaemonState, DownloadRow, DownloadState, EventConflict, Finish, HookEnd, HookFailure, HookKind,
    HookRun, IngestOutcome, Job, NoticeMeta, NoticeRow, NoticeStatus, Progress, Provenance,
    SourceHealth, StatusSnapshot, Store, StoreError,
};
use super::{HookFailureTuple, NoticeTuple};
use crate::categorize::{Categorizer, Disposition, JobRef, LatestJob};
use crate::notice::{Event, EventType};

/// How long a connection waits for another process's write lock (`mastsub ingest` beside the daemon).
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);
/// Rows per multi-row INSERT: 1,000 rows of 15 values stay under SQLite's 32,766 bound parameters.
const ROWS_PER_INSERT: usize = 1000;
/// The writer's page cache, in KiB (SQLite's convention for a negative `cache_size`). A large notice
/// touches tens of MiB of pages; with SQLite's default 2 MiB they spill to the WAL and are read back.
const WRITER_CACHE_KIB: i64 = 16 * 1024;

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    path: PathBuf,
    writer: SqlitePool,
    readers: SqlitePool,
    /// The database file's identity when it was opened for writing (`None` read-only: nothing is
    /// recorded through such a store).
    identity: Option<FileIdentity>,
    /// Queue an `on_product` hook run with every job recorded done.
    product_hooks: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// A list of keys as one JSON text parameter for `json_each`.
fn json_text<T: serde::Serialize>(keys: &T) -> String {
    // Serializing strings into a String cannot fail.
    serde_json::to_string(keys).unwrap_or_else(|_| "[]".to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let shown = path.display().to_string();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| StoreError::Open {
                path: shown.clone(),
                source: sqlx::Error::Io(e),
            })?;
        }
        let open_err = |source| StoreError::Open {
            path: shown.clone(),
            source,
        };
        // Processes opening a new database at once (the daemon starting while `mastsub ingest` runs) would
        // race on the first migration; an advisory lock beside the database makes them take turns. Never
        // lock the database file itself: closing any descriptor of it drops SQLite's own POSIX locks.
        let lock_path = {
            let mut p = path.as_os_str().to_owned();
            p.push(".lock");
            PathBuf::from(p)
        };
        let migrate_lock =
            tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)?;
                file.lock()?;
                Ok(file)
            })
            .await
            .map_err(|e| open_err(sqlx::Error::Io(std::io::Error::other(e))))?
            .map_err(|e| open_err(sqlx::Error::Io(e)))?;
        let base = SqliteConnectOptions::from_str("sqlite:")
            .map_err(open_err)?
            .filename(path)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // Job bookkeeping (claims, progress, ends) replays safely after a power cut: a job that loses
            // its `done` runs again over a file already fsynced. Ingest raises this to FULL for its commit.
            .synchronous(SqliteSynchronous::Normal);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(Duration::from_secs(600))
            .connect_with(
                base.clone()
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .pragma("cache_size", (-WRITER_CACHE_KIB).to_string())
                    .pragma("temp_store", "memory")
                    .optimize_on_close(true, None),
            )
            .await
            .map_err(open_err)?;
        // The file SQLite opened, as its path names it now; `check_identity` compares against it.
        let identity = FileIdentity::of(path).map_err(|e| open_err(sqlx::Error::Io(e)))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&writer)
            .await
            .map_err(|source| StoreError::Migrate {
                path: shown.clone(),
                source,
            })?;
        drop(migrate_lock);
        let readers = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(base.read_only(true))
            .await
            .map_err(open_err)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer,
            readers,
            identity: Some(identity),
            product_hooks: Default::default(),
        })
    }

    /// Opens an existing database for reading only: no file is created, no migration runs. For `status`
    /// and `list`, so that a mistyped path is an error, not a new empty database.
    pub async fn open_read_only(path: &Path) -> Result<SqliteStore, StoreError> {
        let shown = path.display().to_string();
        let open_err = |source| StoreError::Open {
            path: shown.clone(),
            source,
        };
        if !path.is_file() {
            return Err(StoreError::Missing { path: shown });
        }
        let options = SqliteConnectOptions::from_str("sqlite:")
            .map_err(open_err)?
            .filename(path)
            .busy_timeout(BUSY_TIMEOUT)
            .read_only(true);
        let readers = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .map_err(open_err)?;
        // Another program's SQLite file (or an empty one) would fail later with "no such table".
        let ours: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'downloads'",
        )
        .fetch_optional(&readers)
        .await
        .map_err(open_err)?;
        if ours.is_none() {
            return Err(StoreError::NotOurs { path: shown });
        }
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: readers.clone(),
            readers,
            identity: None,
            product_hooks: Default::default(),
        })
    }

    /// Checkpoints the WAL into the database file and truncates it, then makes the writer read-only, so
    /// that nothing (not even the `PRAGMA optimize` of its close) writes frames again.
    async fn empty_wal(&self) -> Result<(), String> {
        let mut conn = self.writer.acquire().await.map_err(|e| e.to_string())?;
        for _ in 0..10 {
            // (busy, frames in the log, frames checkpointed): busy 1 means a reader held it back.
            let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| e.to_string())?;
            if busy == 0 {
                sqlx::query("PRAGMA query_only = ON")
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err("another process is reading it".into())
    }

    /// A claimed hook run with its environment; `None` if what it is about is no longer recorded.
    async fn hook_run(
        &self,
        id: i64,
        kind: &str,
        attempt: i64,
        download: Option<i64>,
        notice: Option<i64>,
    ) -> Result<Option<HookRun>, StoreError> {
        let err = self.query_err();
        let run = match (kind, download, notice) {
            ("product", Some(download), _) => {
                let row: Option<ProductHookRow> = sqlx::query_as(PRODUCT_HOOK_ENV)
                    .bind(download)
                    .fetch_optional(&self.writer)
                    .await
                    .map_err(&err)?;
                let Some(row) = row else {
                    return Ok(None);
                };
                product_hook_run(id, attempt, row)
            }
            ("notice", _, Some(notice)) => {
                let row: Option<NoticeHookRow> = sqlx::query_as(NOTICE_HOOK_ENV)
                    .bind(notice)
                    .fetch_optional(&self.writer)
                    .await
                    .map_err(&err)?;
                let Some(row) = row else {
                    return Ok(None);
                };
                notice_hook_run(id, attempt, row)
            }
            _ => return Ok(None),
        };
        Ok(Some(run))
    }

    /// The members, their running jobs and live leases at `now`, read on `conn` (`status` reads them in
    /// its own transaction, with the counts).
    async fn members_on(
        &self,
        conn: &mut sqlx::SqliteConnection,
        now: i64,
    ) -> Result<Vec<Member>, StoreError> {
        let err = self.query_err();
        // `status` on a database that no daemon of this version has opened yet (read-only, unmigrated).
        let has_members: Option<String> = sqlx::query_scalar(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'members'",
        )
        .fetch_optional(&mut *conn)
        .await
        .map_err(&err)?;
        if has_members.is_none() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query_as(
            "SELECT node, owner, pid, started_at, heartbeat_at, clock_skew, rate, stopped_at
             FROM members ORDER BY node",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(&err)?;
        let running = sqlx::query_as(
            "SELECT coalesce(lease_owner, ''), count(*) FROM downloads WHERE state = 'running'
             GROUP BY lease_owner",
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(&err)?;
        let leaders =
            sqlx::query_as("SELECT role, owner FROM leaders WHERE expires_at > ?1 ORDER BY role")
                .bind(now)
                .fetch_all(&mut *conn)
                .await
                .map_err(&err)?;
        Ok(super::assemble_members(rows, running, leaders))
    }

    fn query_err(&self) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        move |source| StoreError::Query {
            path: self.path.display().to_string(),
            source,
        }
    }

    /// A claimed job from a `RETURNING` row.
    fn job(&self, row: &sqlx::sqlite::SqliteRow) -> Result<Job, StoreError> {
        let err = self.query_err();
        Ok(Job {
            id: row.try_get("id").map_err(&err)?,
            product: row.try_get("product").map_err(&err)?,
            mission: row.try_get("mission").map_err(&err)?,
            filename: row.try_get("filename").map_err(&err)?,
            program: row.try_get("program").map_err(&err)?,
            event_type: row.try_get("event_type").map_err(&err)?,
            version: row.try_get("version").map_err(&err)?,
            url: row.try_get("url").map_err(&err)?,
            local_path: row.try_get("local_path").map_err(&err)?,
            attempt: row.try_get("attempts").map_err(&err)?,
            claim: row.try_get("claims").map_err(&err)?,
            bytes_expected: row.try_get("bytes_expected").map_err(&err)?,
            bytes_done: row.try_get("bytes_done").map_err(&err)?,
            etag: row.try_get("etag").map_err(&err)?,
            last_modified: row.try_get("last_modified").map_err(&err)?,
            verify_failures: row.try_get("verify_failures").map_err(&err)?,
            not_found_since: row.try_get("not_found_since").map_err(&err)?,
            waiting_reason: row.try_get("waiting_reason").map_err(&err)?,
            source: self.provenance(row)?,
            checksum: row.try_get("checksum").map_err(&err)?,
        })
    }

    /// `downloads.source`.
    fn provenance(&self, row: &SqliteRow) -> Result<Option<Provenance>, StoreError> {
        let text: Option<String> = row.try_get("source").map_err(self.query_err())?;
        text.map(|t| {
            Provenance::parse(&t).ok_or_else(|| StoreError::Corrupt {
                path: self.path.display().to_string(),
                column: "downloads.source",
                value: t,
            })
        })
        .transpose()
    }

    fn download_row(&self, row: &SqliteRow) -> Result<DownloadRow, StoreError> {
        let err = self.query_err();
        let state: String = row.try_get("state").map_err(&err)?;
        Ok(DownloadRow {
            id: row.try_get("id").map_err(&err)?,
            product: row.try_get("product").map_err(&err)?,
            mission: row.try_get("mission").map_err(&err)?,
            fileset: row.try_get("fileset").map_err(&err)?,
            filename: row.try_get("filename").map_err(&err)?,
            program: row.try_get("program").map_err(&err)?,
            event_type: row.try_get("event_type").map_err(&err)?,
            version: row.try_get("version").map_err(&err)?,
            url: row.try_get("url").map_err(&err)?,
            local_path: row.try_get("local_path").map_err(&err)?,
            state: DownloadState::parse(&state).ok_or_else(|| StoreError::Corrupt {
                path: self.path.display().to_string(),
                column: "downloads.state",
                value: state.clone(),
            })?,
            attempts: row.try_get("attempts").map_err(&err)?,
            bytes_expected: row.try_get("bytes_expected").map_err(&err)?,
            bytes_done: row.try_get("bytes_done").map_err(&err)?,
            last_error: row.try_get("last_error").map_err(&err)?,
            verified: row.try_get("verified").map_err(&err)?,
            waiting_reason: row.try_get("waiting_reason").map_err(&err)?,
            source: self.provenance(row)?,
            fetched_from: row.try_get("fetched_from").map_err(&err)?,
            updated_at: row.try_get("updated_at").map_err(&err)?,
        })
    }
}

const UPSERT_NOTICE: &str = "
    INSERT INTO notices (sha256, source_kind, source_ref, name, size, received_at, last_seen_at,
                         status, records, error)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8, ?9)
    ON CONFLICT (sha256) DO UPDATE SET
        last_seen_at = excluded.last_seen_at,
        times_seen = times_seen + 1,
        status = excluded.status,
        records = excluded.records,
        error = excluded.error
    RETURNING id, times_seen";

/// Recorded events with any of the ids in ?1, with what they named and where they came from.
const RECORDED_EVENTS: &str = "
    SELECT e.event_id, n.name, e.record_index, e.mission, e.fileset, e.filename, e.event_type,
           e.archived_date
    FROM events AS e JOIN notices AS n ON n.id = e.notice_id
    WHERE e.event_id IN (SELECT value FROM json_each(?1))";

/// A recorded event found by `RECORDED_EVENTS`: id, notice name, record index, then what it named.
pub(super) type Recorded = (String, String, i64, String, String, String, String, String);

/// What makes two records with one `event_id` the same event: mission, fileset, filename, type, date.
type Names<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str);

fn recorded_names(r: &Recorded) -> Names<'_> {
    (&r.3, &r.4, &r.5, &r.6, &r.7)
}

fn event_names(e: &Event) -> Names<'_> {
    (
        &e.mission,
        &e.fileset,
        &e.filename,
        e.event_type.as_str(),
        e.archived_date.canonical(),
    )
}

/// What an event named, as conflict reports say it: "jwst/jw1/a.fits, New, 2026-…".
fn names_text((mission, fileset, filename, t, archived): Names) -> String {
    format!(
        "{}/{fileset}/{filename}, {t}, {archived}",
        mission.to_lowercase()
    )
}

/// An event and where it came from: "notice n.json, record 2: jwst/jw1/a.fits, New, 2026-…".
fn describe_event(notice: &str, index: usize, names: Names) -> String {
    format!(
        "notice {notice}, record {}: {}",
        index + 1,
        names_text(names)
    )
}

/// The events of a notice to record now, given the events already recorded under any of their ids
/// (`RECORDED_EVENTS`): the same id with the same content (recorded before, or earlier in this notice) is
/// one event, counted in `already_recorded`; with other content it is a conflict, reported in
/// `conflicts` and recorded all the same, so that nothing is silently dropped. Shared by every backend.
pub(super) fn fresh_events<'e>(
    events: &'e [Event],
    recorded: &[Recorded],
    notice_name: &str,
    outcome: &mut IngestOutcome,
) -> Vec<&'e Event> {
    let mut before: HashMap<&str, Vec<&Recorded>> = HashMap::new();
    for r in recorded {
        before.entry(r.0.as_str()).or_default().push(r);
    }
    // This notice's own events by id; what they named is compared only when an id comes again.
    let mut here: HashMap<&str, Vec<&Event>> = HashMap::with_capacity(events.len());
    let mut fresh: Vec<&Event> = Vec::with_capacity(events.len());
    for e in events {
        let what = event_names(e);
        let earlier = before.get(e.event_id.as_str());
        let earlier_here = here.get(e.event_id.as_str());
        let same = earlier.is_some_and(|v| v.iter().any(|r| recorded_names(r) == what))
            || earlier_here.is_some_and(|v| v.iter().any(|o| event_names(o) == what));
        if same {
            outcome.already_recorded += 1;
            continue;
        }
        let first = earlier
            .and_then(|v| v.first())
            .map(|r| describe_event(&r.1, r.2 as usize, recorded_names(r)))
            .or_else(|| {
                earlier_here
                    .and_then(|v| v.first())
                    .map(|o| describe_event(notice_name, o.index, event_names(o)))
            });
        if let Some(earlier) = first {
            outcome.conflicts.push(EventConflict {
                event_id: e.event_id.clone(),
                record: e.index + 1,
                now: names_text(what),
                earlier,
            });
        }
        here.entry(e.event_id.as_str()).or_default().push(e);
        fresh.push(e);
    }
    fresh
}

/// Counts what each planned event did into `outcome`. Shared by every backend.
pub(super) fn tally(plan: &crate::categorize::Plan<'_>, outcome: &mut IngestOutcome) {
    for planned in &plan.events {
        *outcome
            .recorded
            .entry(planned.event.event_type.clone())
            .or_default() += 1;
        match planned.disposition {
            Disposition::Queued => outcome.queued += 1,
            Disposition::Joined => outcome.joined += 1,
            Disposition::Requeued => outcome.requeued += 1,
            Disposition::AlreadyDone => outcome.already_done += 1,
            Disposition::RecordOnly => outcome.record_only += 1,
        }
    }
}

/// One index seek per product on `downloads_by_product (product, id)`.
const LATEST_JOBS: &str = "
    SELECT d.id, d.product, d.state, d.version
    FROM json_each(?1) AS k
    JOIN downloads AS d ON d.id = (SELECT max(id) FROM downloads WHERE product = k.value)";

const NEXT_JOB_ID: &str = "SELECT coalesce(max(id), 0) + 1 FROM downloads";

/// Followed by `VALUES (...), (...)` chunks of bound rows.
const INSERT_JOBS: &str = "
    INSERT INTO downloads (id, product, mission, fileset, filename, program, event_type, version, url,
                           local_path, state, next_attempt_at, created_at, updated_at) ";

/// A requeue starts the job afresh: no attempts, no lease, no error, due now.
const UPDATE_JOBS: &str = "
    UPDATE downloads SET
        version = u.version,
        state = CASE WHEN u.requeue IS NULL THEN state ELSE 'queued' END,
        event_type = coalesce(u.requeue, event_type),
        attempts = CASE WHEN u.requeue IS NULL THEN attempts ELSE 0 END,
        next_attempt_at = CASE WHEN u.requeue IS NULL THEN next_attempt_at ELSE ?2 END,
        lease_owner = CASE WHEN u.requeue IS NULL THEN lease_owner ELSE NULL END,
        lease_expires_at = CASE WHEN u.requeue IS NULL THEN lease_expires_at ELSE NULL END,
        last_error = CASE WHEN u.requeue IS NULL THEN last_error ELSE NULL END,
        updated_at = ?2
    FROM (SELECT value ->> 0 AS id, value ->> 1 AS version, value ->> 2 AS requeue FROM json_each(?1)) AS u
    WHERE downloads.id = u.id";

/// Followed by `VALUES (...), (...)` chunks of bound rows.
const INSERT_EVENTS: &str = "
    INSERT INTO events (event_id, notice_id, record_index, mission, fileset, filename, program, event_type,
                        archived_date, public_release_date, uri, raw, disposition, download_id, received_at) ";

const COUNT_EVENTS_RECORDED: &str = "
    UPDATE notices SET events_recorded = events_recorded + ?2 WHERE id = ?1";

/// Jobs by state, and the bytes of done ones: from the counts the triggers of migration 0012 keep.
const DOWNLOADS_BY_STATE: &str = "
    SELECT state, sum(n) AS n, sum(bytes) AS bytes FROM download_counts GROUP BY state";

const EVENTS_BY_TYPE: &str = "SELECT event_type, n FROM event_counts WHERE n > 0";

const DOWNLOADS_BY_TYPE_AND_STATE: &str =
    "SELECT event_type, state, n FROM download_counts WHERE n > 0";

const NOTICES_BY_STATUS: &str = "SELECT status, count(*) AS n FROM notices GROUP BY status";

/// The columns `download_row` reads, for every query that lists jobs.
macro_rules! download_row_columns {
    () => {
        "SELECT id, product, mission, fileset, filename, program, event_type, version, url, local_path, state,
                attempts, bytes_expected, bytes_done, last_error, verified, waiting_reason, source,
                fetched_from, updated_at
         FROM downloads "
    };
}

const RECENT_FAILURES: &str = concat!(
    download_row_columns!(),
    "INDEXED BY downloads_failures
     WHERE state IN ('failed', 'needs_auth') ORDER BY updated_at DESC, id DESC LIMIT ?1"
);

/// The running jobs (never more than the workers, but for moments), by id.
const RUNNING_JOBS: &str = concat!(
    download_row_columns!(),
    "WHERE state = 'running' ORDER BY id LIMIT 1000"
);

/// Queued jobs waiting for room, the latest reason, and when the oldest queued job was created: each
/// from its partial index (migration 0012; named, since the planner would otherwise walk every queued
/// job through `downloads_by_state`).
const QUEUE_FIGURES: &str = "
    SELECT
        (SELECT count(*) FROM downloads INDEXED BY downloads_waiting
         WHERE state = 'queued' AND waiting_reason IS NOT NULL),
        (SELECT waiting_reason FROM downloads INDEXED BY downloads_waiting
         WHERE state = 'queued' AND waiting_reason IS NOT NULL ORDER BY updated_at DESC LIMIT 1),
        (SELECT min(created_at) FROM downloads INDEXED BY downloads_queued_since WHERE state = 'queued')";

/// The latest ?1 notices, newest first.
const RECENT_NOTICES: &str = "
    SELECT id, name, source_kind, received_at, status, records, events_recorded, error
    FROM notices ORDER BY received_at DESC, id DESC LIMIT ?1";

const LIST_DOWNLOADS: &str = concat!(
    download_row_columns!(),
    "WHERE ?1 IS NULL OR state = ?1 ORDER BY id"
);

/// Jobs that ended failed or needing a token after ?1, oldest first.
const FAILURES_SINCE: &str = concat!(
    download_row_columns!(),
    "INDEXED BY downloads_failures
     WHERE state IN ('failed', 'needs_auth') AND updated_at > ?1 ORDER BY updated_at, id LIMIT 1000"
);

/// The due job with the earliest attempt time whose local path has no job running (two jobs never write one
/// path at once: versions of one product share it, and so do same-named products in `download --flat`),
/// claimed for an owner (?1) until a lease time (?2), at a time (?3).
const CLAIM: &str = "
    UPDATE downloads SET
        state = 'running', lease_owner = ?1, lease_expires_at = ?2,
        attempts = attempts + 1, claims = claims + 1, started_at = coalesce(started_at, ?3), updated_at = ?3
    WHERE id = (
        SELECT d.id FROM downloads AS d
        WHERE d.state = 'queued' AND d.next_attempt_at <= ?3
          AND NOT EXISTS (SELECT 1 FROM downloads AS r WHERE r.local_path = d.local_path AND r.state = 'running')
        ORDER BY d.next_attempt_at, d.id
        LIMIT 1)
    RETURNING id, product, mission, filename, program, event_type, version, url, local_path, attempts,
              bytes_expected, bytes_done, etag, last_modified, verify_failures, not_found_since, waiting_reason,
              source, checksum, claims";

const PROGRESS: &str = "
    UPDATE downloads SET
        bytes_done = ?3, bytes_expected = ?4, etag = ?5, last_modified = ?6, lease_expires_at = ?7,
        updated_at = ?8, source = ?9, fetched_from = ?10, checksum = ?11
    WHERE id = ?1 AND lease_owner = ?2 AND state = 'running' AND claims = ?12";

const RENEW_LEASE: &str = "
    UPDATE downloads SET lease_expires_at = ?3
    WHERE id = ?1 AND lease_owner = ?2 AND state = 'running' AND claims = ?4";

const FINISH_DONE: &str = "
    UPDATE downloads SET
        state = 'done', bytes_done = ?3, bytes_expected = ?3, lease_owner = NULL, lease_expires_at = NULL,
        last_error = NULL, verify_failures = 0, not_found_since = NULL, finished_at = ?4, updated_at = ?4,
        verified = ?5, waiting_reason = NULL, source = ?6, fetched_from = ?7
    WHERE id = ?1 AND lease_owner = ?2 AND state = 'running' AND claims = ?8";

const FINISH_RETRY: &str = "
    UPDATE downloads SET
        state = 'queued', next_attempt_at = ?3, last_error = ?4, attempts = max(attempts - ?5, 0),
        verify_failures = ?6, not_found_since = ?7, lease_owner = NULL, lease_expires_at = NULL,
        updated_at = ?8, waiting_reason = ?9
    WHERE id = ?1 AND lease_owner = ?2 AND state = 'running' AND claims = ?10";

const FINISH_GIVE_UP: &str = "
    UPDATE downloads SET
        state = ?3, last_error = ?4, lease_owner = NULL, lease_expires_at = NULL, finished_at = ?5,
        updated_at = ?5, waiting_reason = NULL
    WHERE id = ?1 AND lease_owner = ?2 AND state = 'running' AND claims = ?6";

/// The statement that ends an attempt of `owner` at job `id`.
fn finish_query<'q>(
    job: Held,
    owner: &'q str,
    finish: &'q Finish,
    now: i64,
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    let id = job.id;
    match finish {
        Finish::Done {
            bytes,
            verified,
            origin,
        } => sqlx::query(FINISH_DONE)
            .bind(id)
            .bind(owner)
            .bind(bytes)
            .bind(now)
            .bind(verified)
            .bind(origin.as_ref().map(|o| o.source.as_str()))
            .bind(origin.as_ref().map(|o| o.url.as_str()))
            .bind(job.claim),
        Finish::Retry {
            at,
            error,
            refund,
            verify_failures,
            not_found_since,
            waiting,
        } => sqlx::query(FINISH_RETRY)
            .bind(id)
            .bind(owner)
            .bind(at)
            .bind(error)
            .bind(i64::from(*refund))
            .bind(verify_failures)
            .bind(not_found_since)
            .bind(now)
            .bind(waiting)
            .bind(job.claim),
        Finish::GiveUp { state, error } => sqlx::query(FINISH_GIVE_UP)
            .bind(id)
            .bind(owner)
            .bind(state.as_str())
            .bind(error)
            .bind(now)
            .bind(job.claim),
    }
}

/// `FINISH_DONE` for many jobs of owner ?1 at time ?3, from ?4: a JSON array of
/// `[id, bytes, verified, source, url, claim]`.
/// (?2, the lease of the claims beside it in `end_and_claim`'s script, is not used.)
const FINISH_DONE_MANY: &str = "
    UPDATE downloads SET
        state = 'done', bytes_done = j.bytes, bytes_expected = j.bytes, lease_owner = NULL,
        lease_expires_at = NULL, last_error = NULL, verify_failures = 0, not_found_since = NULL,
        finished_at = ?3, updated_at = ?3, verified = j.verified, waiting_reason = NULL,
        source = j.source, fetched_from = j.url
    FROM (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS bytes,
                 json_extract(value, '$[2]') AS verified, json_extract(value, '$[3]') AS source,
                 json_extract(value, '$[4]') AS url, json_extract(value, '$[5]') AS claim
          FROM json_each(?4)) AS j
    WHERE downloads.id = j.id AND downloads.lease_owner = ?1 AND downloads.state = 'running'
      AND downloads.claims = j.claim
    RETURNING downloads.id AS ended";

/// An `on_product` run for each job of `FINISH_DONE_MANY`'s ?4 that it recorded done at ?3. (It leaves
/// ?1 and ?2 unused: sqlx-sqlite binds numbered parameters by number, and counts an unused number as a
/// positional slot; a statement after it with more unused numbers than the four values would bind NULL.
/// Every statement of the script uses numbers only.)
const QUEUE_PRODUCT_HOOKS: &str = "
    INSERT INTO hook_runs (kind, download_id, next_attempt_at, created_at, updated_at)
    SELECT 'product', d.id, ?3, ?3, ?3
    FROM json_each(?4) AS j JOIN downloads AS d ON d.id = json_extract(j.value, '$[0]')
    WHERE d.state = 'done' AND d.finished_at = ?3 AND d.lease_owner IS NULL";

/// An `on_notice` run for each notice received since ?1 (not rejected) that has none, and none of whose
/// events has a job still queued or running; at ?2.
const QUEUE_NOTICE_HOOKS: &str = "
    INSERT INTO hook_runs (kind, notice_id, next_attempt_at, created_at, updated_at)
    SELECT 'notice', n.id, ?2, ?2, ?2 FROM notices AS n
    WHERE n.received_at >= ?1 AND n.status != 'rejected'
      AND NOT EXISTS (SELECT 1 FROM hook_runs AS h WHERE h.kind = 'notice' AND h.notice_id = n.id)
      AND NOT EXISTS (
          SELECT 1 FROM events AS e JOIN downloads AS d ON d.id = e.download_id
          WHERE e.notice_id = n.id AND d.state IN ('queued', 'running'))";

/// Up to ?2 runs due at ?1, claimed.
const CLAIM_HOOK_RUNS: &str = "
    UPDATE hook_runs SET state = 'running', attempts = attempts + 1, updated_at = ?1
    WHERE id IN (SELECT id FROM hook_runs WHERE state = 'pending' AND next_attempt_at <= ?1
                 ORDER BY next_attempt_at, id LIMIT ?2)
    RETURNING id, kind, attempts, download_id, notice_id";

/// What an `on_product` run's environment says: the job, and the first event of its version (the
/// values as the notice wrote them are in its raw record) with its notice's name.
const PRODUCT_HOOK_ENV: &str = "
    WITH d AS (SELECT * FROM downloads WHERE id = ?1),
         e AS (SELECT events.* FROM events, d WHERE events.download_id = d.id
               ORDER BY (events.archived_date = d.version) DESC, events.id LIMIT 1)
    SELECT d.local_path, d.mission, d.fileset, d.filename, d.program, d.event_type, d.version,
           e.raw, n.name
    FROM d LEFT JOIN e ON 1 LEFT JOIN notices AS n ON n.id = e.notice_id";

/// What an `on_notice` run's environment says: the notice's name, its products published, failed (or
/// waiting for a token), and recorded only.
const NOTICE_HOOK_ENV: &str = "
    SELECT n.name,
        (SELECT count(DISTINCT e.download_id) FROM events AS e JOIN downloads AS d ON d.id = e.download_id
         WHERE e.notice_id = n.id AND d.state = 'done'),
        (SELECT count(DISTINCT e.download_id) FROM events AS e JOIN downloads AS d ON d.id = e.download_id
         WHERE e.notice_id = n.id AND d.state IN ('failed', 'needs_auth')),
        (SELECT count(DISTINCT lower(e.mission) || '/' || e.fileset || '/' || e.filename) FROM events AS e
         WHERE e.notice_id = n.id AND e.download_id IS NULL)
    FROM notices AS n WHERE n.id = ?1";

const HOOK_COUNTS: &str = "
    SELECT state, count(*), coalesce(sum(failures), 0) FROM hook_runs GROUP BY state";

const HOOK_FAILURES: &str = "
    SELECT h.id, h.kind, h.state, coalesce(d.local_path, n.name, ''), h.attempts, h.last_error, h.updated_at
    FROM hook_runs AS h
    LEFT JOIN downloads AS d ON d.id = h.download_id
    LEFT JOIN notices AS n ON n.id = h.notice_id
    WHERE h.state IN ('pending', 'failed') AND h.last_error IS NOT NULL
    ORDER BY h.updated_at DESC, h.id DESC LIMIT ?1";

const RUNNING_LEASES: &str = "
    SELECT id, coalesce(lease_owner, ''), coalesce(lease_expires_at, 0) FROM downloads WHERE state = 'running'";

/// An orphaned attempt does not count: the worker did not fail, it vanished.
/// ?1: a JSON array of `[id, lease owner, lease expiry]` as judged; a lease renewed or claimed again since
/// (another process writes the same database) is not one of them.
const REQUEUE_IDS: &str = "
    UPDATE downloads SET
        state = 'queued', attempts = max(attempts - 1, 0), lease_owner = NULL, lease_expires_at = NULL,
        next_attempt_at = ?2, updated_at = ?2
    FROM (SELECT value ->> 0 AS id, value ->> 1 AS owner, value ->> 2 AS expires FROM json_each(?1)) AS o
    WHERE downloads.id = o.id AND downloads.state = 'running'
      AND coalesce(downloads.lease_owner, '') = o.owner
      AND coalesce(downloads.lease_expires_at, 0) = o.expires";

const NEXT_DUE: &str = "SELECT min(next_attempt_at) FROM downloads WHERE state = 'queued'";

/// A range on `downloads_by_state`: nothing to do costs one index seek.
const DUE_NOW_BEYOND: &str = "
    UPDATE downloads SET next_attempt_at = ?1, updated_at = ?1
    WHERE state = 'queued' AND next_attempt_at > ?1 + ?2";

const RETRY_IDS: &str = "
    UPDATE downloads SET
        state = 'queued', attempts = 0, next_attempt_at = ?2, last_error = NULL, verify_failures = 0,
        not_found_since = NULL, updated_at = ?2, waiting_reason = NULL
    WHERE id IN (SELECT value FROM json_each(?1)) AND state IN ('queued', 'failed', 'needs_auth')";

const RETRY_ALL_FAILED: &str = "
    UPDATE downloads SET
        state = 'queued', attempts = 0, next_attempt_at = ?1, last_error = NULL, verify_failures = 0,
        not_found_since = NULL, updated_at = ?1
    WHERE state IN ('failed', 'needs_auth')";

const REQUEUE_NEEDS_AUTH: &str = "
    UPDATE downloads SET state = 'queued', attempts = 0, next_attempt_at = ?1, last_error = NULL, updated_at = ?1
    WHERE state = 'needs_auth'";

/// What the path look-up said of the URIs in ?1 (a JSON array).
const CLOUD_PATHS: &str = "
    SELECT uri, key, looked_up_at FROM cloud_paths WHERE uri IN (SELECT value FROM json_each(?1))";

/// Look-up answers from ?1, a JSON array of `[uri, key or null]`, made at ?2.
const RECORD_CLOUD_PATHS: &str = "
    INSERT INTO cloud_paths (uri, key, looked_up_at)
    SELECT value ->> 0, value ->> 1, ?2 FROM json_each(?1) WHERE true
    ON CONFLICT (uri) DO UPDATE SET key = excluded.key, looked_up_at = excluded.looked_up_at";

/// The next ?1 queued jobs (through `downloads_by_state`).
const UPCOMING: &str = "
    SELECT mission, filename, url, event_type FROM downloads
    WHERE state = 'queued' ORDER BY next_attempt_at, id LIMIT ?1";

const VERSION_ON_DISK: &str = "
    SELECT version FROM downloads WHERE product = ?1 AND state = 'done' AND id != ?2 ORDER BY id DESC LIMIT 1";

impl SqliteStore {
    /// The ingest transaction on the writer connection (switched to `synchronous=FULL` by the caller).
    async fn ingest_on(
        &self,
        conn: &mut sqlx::SqliteConnection,
        notice: &NoticeMeta,
        events: &[Event],
        categorizer: &Categorizer,
    ) -> Result<IngestOutcome, StoreError> {
        use sqlx::Connection;
        let err = self.query_err();
        let now = now_ms();
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await.map_err(&err)?;

        let (notice_id, times_seen): (i64, i64) = sqlx::query_as(UPSERT_NOTICE)
            .bind(&notice.sha256)
            .bind(notice.source_kind.as_str())
            .bind(&notice.source_ref)
            .bind(&notice.name)
            .bind(notice.size as i64)
            .bind(now)
            .bind(notice.status.as_str())
            .bind(notice.records as i64)
            .bind(&notice.error)
            .fetch_one(&mut *tx)
            .await
            .map_err(&err)?;
        let mut outcome = IngestOutcome {
            notice_id,
            seen_before: times_seen > 1,
            ..IngestOutcome::default()
        };
        if events.is_empty() {
            tx.commit().await.map_err(&err)?;
            return Ok(outcome);
        }

        // Events already recorded, by this notice before or by another; repeats inside the notice count too.
        // The same id with the same content is one event; with other content it is a conflict, reported
        // and recorded all the same, so that nothing is silently dropped.
        let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        let recorded: Vec<Recorded> = sqlx::query_as(RECORDED_EVENTS)
            .bind(json_text(&ids))
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        let fresh = fresh_events(events, &recorded, &notice.name, &mut outcome);

        let products: HashSet<String> = fresh
            .iter()
            .map(|e| crate::product::product_key(e))
            .collect();
        let rows: Vec<(i64, String, String, String)> = sqlx::query_as(LATEST_JOBS)
            .bind(json!(products).to_string())
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        let mut latest = HashMap::with_capacity(rows.len());
        for (id, product, state, version) in rows {
            let state = DownloadState::parse(&state).ok_or_else(|| StoreError::Corrupt {
                path: self.path.display().to_string(),
                column: "downloads.state",
                value: state.clone(),
            })?;
            latest.insert(product, LatestJob { id, state, version });
        }

        let plan = categorizer.plan(&fresh, &latest);

        // The write lock is ours (BEGIN IMMEDIATE), so new jobs can take ids from here without RETURNING.
        let first_id: i64 = sqlx::query_scalar(NEXT_JOB_ID)
            .fetch_one(&mut *tx)
            .await
            .map_err(&err)?;
        let job_id = |i: usize| first_id + i as i64;
        for (c, chunk) in plan.new_jobs.chunks(ROWS_PER_INSERT).enumerate() {
            let mut insert = QueryBuilder::<Sqlite>::new(INSERT_JOBS);
            insert.push_values(chunk.iter().enumerate(), |mut row, (i, j)| {
                row.push_bind(job_id(c * ROWS_PER_INSERT + i))
                    .push_bind(j.product.as_str())
                    .push_bind(j.mission.as_str())
                    .push_bind(j.fileset.as_str())
                    .push_bind(j.filename.as_str())
                    .push_bind(j.program)
                    .push_bind(j.event_type.as_str())
                    .push_bind(j.version.as_str())
                    .push_bind(j.url.as_str())
                    .push_bind(j.local_path.as_str())
                    .push_bind(DownloadState::Queued.as_str())
                    .push_bind(now)
                    .push_bind(now)
                    .push_bind(now);
            });
            insert.build().execute(&mut *tx).await.map_err(&err)?;
        }
        if !plan.updates.is_empty() {
            let batch: Vec<_> = plan
                .updates
                .iter()
                .map(|u| json!([u.id, u.version, u.requeue.as_ref().map(EventType::as_str)]))
                .collect();
            sqlx::query(UPDATE_JOBS)
                .bind(serde_json::Value::Array(batch).to_string())
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(&err)?;
        }

        tally(&plan, &mut outcome);
        for chunk in plan.events.chunks(ROWS_PER_INSERT) {
            let mut insert = QueryBuilder::<Sqlite>::new(INSERT_EVENTS);
            insert.push_values(chunk, |mut row, planned| {
                let e = planned.event;
                let download_id = planned.job.map(|job| match job {
                    JobRef::Existing(id) => id,
                    JobRef::New(i) => job_id(i),
                });
                row.push_bind(e.event_id.as_str())
                    .push_bind(notice_id)
                    .push_bind(e.index as i64)
                    .push_bind(e.mission.as_str())
                    .push_bind(e.fileset.as_str())
                    .push_bind(e.filename.as_str())
                    .push_bind(e.program)
                    .push_bind(e.event_type.as_str())
                    .push_bind(e.archived_date.canonical())
                    .push_bind(e.public_release_date.canonical())
                    .push_bind(e.uri.as_deref())
                    .push_bind(e.raw.as_str())
                    .push_bind(planned.disposition.as_str())
                    .push_bind(download_id)
                    .push_bind(now);
            });
            insert.build().execute(&mut *tx).await.map_err(&err)?;
        }
        sqlx::query(COUNT_EVENTS_RECORDED)
            .bind(notice_id)
            .bind(plan.events.len() as i64)
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        tx.commit().await.map_err(&err)?;
        Ok(outcome)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn ingest_notice(
        &self,
        notice: &NoticeMeta,
        events: &[Event],
        categorizer: &Categorizer,
    ) -> Result<IngestOutcome, StoreError> {
        // A notice recorded into a database file that was deleted or replaced is lost with it; the source
        // keeps a notice whose recording failed, so the file is checked once the transaction committed
        // (the inbox moves the notice away right after a success).
        let err = self.query_err();
        let mut conn = self.writer.acquire().await.map_err(&err)?;
        // A committed notice must survive a power cut (the inbox moves the file away after the commit), so
        // this transaction syncs fully; job bookkeeping, which is safe to replay, does not.
        sqlx::query("PRAGMA synchronous = FULL")
            .execute(&mut *conn)
            .await
            .map_err(&err)?;
        let result = self.ingest_on(&mut conn, notice, events, categorizer).await;
        sqlx::query("PRAGMA synchronous = NORMAL")
            .execute(&mut *conn)
            .await
            .map_err(&err)?;
        let outcome = result?;
        self.check_identity().await?;
        Ok(outcome)
    }

    async fn status(&self, recent_failures: usize) -> Result<StatusSnapshot, StoreError> {
        let err = self.query_err();
        let mut snap = StatusSnapshot {
            downloads: DownloadState::ALL.into_iter().map(|s| (s, 0)).collect(),
            events: EventType::KNOWN.into_iter().map(|t| (t, 0)).collect(),
            notices: NoticeStatus::ALL.into_iter().map(|s| (s, 0)).collect(),
            ..StatusSnapshot::default()
        };
        // One read transaction, so the counts agree with each other (rolled back if dropped on an error).
        let mut conn = self.readers.begin().await.map_err(&err)?;
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(DOWNLOADS_BY_STATE)
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?;
        for (state, n, bytes) in rows {
            if let Some(state) = DownloadState::parse(&state) {
                snap.downloads.insert(state, n as u64);
                if state == DownloadState::Done {
                    snap.bytes_done = bytes as u64;
                }
            }
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(EVENTS_BY_TYPE)
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?;
        for (t, n) in rows {
            if let Some(t) = EventType::parse(&t) {
                snap.events.insert(t, n as u64);
            }
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(NOTICES_BY_STATUS)
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?;
        for (s, n) in rows {
            if let Some(s) = NoticeStatus::ALL.into_iter().find(|x| x.as_str() == s) {
                snap.notices.insert(s, n as u64);
            }
        }
        let rows = sqlx::query(RECENT_FAILURES)
            .bind(recent_failures as i64)
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?;
        let health: Vec<(String, String, Option<String>, bool, Option<i64>, Option<String>, Option<i64>, i64, i64)> =
            sqlx::query_as(
                "SELECT source, state, detail, connected, last_contact, last_error, last_error_at, taken,
                        updated_at
                 FROM source_health ORDER BY source",
            )
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?;
        snap.sources = health
            .into_iter()
            .map(
                |(
                    source,
                    state,
                    detail,
                    connected,
                    last_contact,
                    last_error,
                    last_error_at,
                    taken,
                    updated_at,
                )| {
                    SourceHealth {
                        source,
                        state,
                        detail,
                        connected,
                        last_contact,
                        last_error,
                        last_error_at,
                        taken: taken as u64,
                        updated_at,
                    }
                },
            )
            .collect();
        snap.by_event_type = EventType::KNOWN
            .into_iter()
            .map(|t| (t, DownloadState::ALL.into_iter().map(|s| (s, 0)).collect()))
            .collect();
        let rows_by_type: Vec<(String, String, i64)> = sqlx::query_as(DOWNLOADS_BY_TYPE_AND_STATE)
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?;
        for (t, st, n) in rows_by_type {
            if let (Some(t), Some(st)) = (EventType::parse(&t), DownloadState::parse(&st)) {
                snap.by_event_type
                    .entry(t)
                    .or_default()
                    .insert(st, n as u64);
            }
        }
        snap.daemon = sqlx::query_as::<_, (i64, i64, f64, i64)>(
            "SELECT pid, started_at, rate, updated_at FROM daemon_state WHERE id = 1",
        )
        .fetch_optional(&mut *conn)
        .await
        .map_err(&err)?
        .map(DaemonState::from);
        let (waiting, waiting_reason, oldest_queued_at): (i64, Option<String>, Option<i64>) =
            sqlx::query_as(QUEUE_FIGURES)
                .fetch_one(&mut *conn)
                .await
                .map_err(&err)?;
        snap.waiting = waiting as u64;
        snap.waiting_reason = waiting_reason;
        snap.oldest_queued_at = oldest_queued_at;
        snap.last_notice_at = sqlx::query_scalar("SELECT max(last_seen_at) FROM notices")
            .fetch_one(&mut *conn)
            .await
            .map_err(&err)?;
        let running = sqlx::query(RUNNING_JOBS)
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?;
        snap.recent_notices = sqlx::query_as::<_, NoticeTuple>(RECENT_NOTICES)
            .bind(recent_failures as i64)
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?
            .into_iter()
            .map(NoticeRow::from)
            .collect();
        let counts: Vec<(String, i64, i64)> = sqlx::query_as(HOOK_COUNTS)
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?;
        counts.into_iter().for_each(|row| snap.hooks.count(row));
        snap.hooks.recent_failures = sqlx::query_as::<_, HookFailureTuple>(HOOK_FAILURES)
            .bind(recent_failures as i64)
            .fetch_all(&mut *conn)
            .await
            .map_err(&err)?
            .into_iter()
            .map(HookFailure::from)
            .collect();
        snap.members = self.members_on(&mut conn, now_ms()).await?;
        conn.commit().await.map_err(&err)?;
        snap.running = running
            .iter()
            .map(|r| self.download_row(r))
            .collect::<Result<_, _>>()?;
        snap.recent_failures = rows
            .iter()
            .map(|r| self.download_row(r))
            .collect::<Result<_, _>>()?;
        Ok(snap)
    }

    async fn end_and_claim(
        &self,
        owner: &str,
        ends: &[(Held, Finish)],
        claims: usize,
        now: i64,
        lease_until: i64,
    ) -> Result<(Vec<bool>, Vec<Job>), StoreError> {
        let err = self.query_err();
        if ends.is_empty() && claims == 0 {
            return Ok((Vec::new(), Vec::new()));
        }
        // One transaction, one commit and one round trip to the database thread for a whole batch of
        // `done` ends and the claims waiting with it, as one script: each round trip and each commit cost
        // more than the statements themselves on small products, and a worker's claim waited for all of
        // them. The ends go as one JSON parameter (numbered parameters that a statement leaves unused
        // would shift sqlx's binding of the next statement's). Other ends (retries, failures) are rare:
        // each is its own statement, in the same transaction, before the script.
        let mut conn = self.writer.acquire().await.map_err(&err)?;
        let mut done = Vec::new();
        let mut others = Vec::new();
        for (job, finish) in ends {
            match finish {
                Finish::Done {
                    bytes,
                    verified,
                    origin,
                } => done.push(json!([
                    job.id,
                    bytes,
                    verified,
                    origin.as_ref().map(|o| o.source.as_str()),
                    origin.as_ref().map(|o| o.url.as_str()),
                    job.claim
                ])),
                other => others.push((*job, other)),
            }
        }
        let mut ended = HashSet::new();
        let mut sql = String::new();
        if others.is_empty() {
            sql.push_str("BEGIN IMMEDIATE;\n");
        } else {
            sqlx::query("BEGIN IMMEDIATE")
                .execute(&mut *conn)
                .await
                .map_err(&err)?;
            for (job, finish) in others {
                match finish_query(job, owner, finish, now)
                    .execute(&mut *conn)
                    .await
                {
                    Ok(r) if r.rows_affected() == 1 => {
                        ended.insert(job.id);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                        return Err(err(e));
                    }
                }
            }
        }
        if !done.is_empty() {
            sql.push_str(FINISH_DONE_MANY);
            sql.push_str(";\n");
            if self
                .product_hooks
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                sql.push_str(QUEUE_PRODUCT_HOOKS);
                sql.push_str(";\n");
            }
        }
        for _ in 0..claims {
            sql.push_str(CLAIM);
            sql.push_str(";\n");
        }
        sql.push_str("COMMIT;");
        // A handful of shapes (with or without ends, 0 to `workers` claims): the prepared scripts are kept.
        let query = sqlx::query(&sql)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .bind(serde_json::Value::Array(done).to_string());
        let rows = match query.fetch_all(&mut *conn).await {
            Ok(rows) => rows,
            Err(e) => {
                // A statement failed inside the transaction: it must not stay open on the writer.
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                return Err(err(e));
            }
        };
        let mut jobs = Vec::new();
        for row in &rows {
            match row.try_get::<i64, _>("ended") {
                Ok(id) => {
                    ended.insert(id);
                }
                Err(_) => jobs.push(self.job(row)?),
            }
        }
        Ok((
            ends.iter()
                .map(|(job, _)| ended.contains(&job.id))
                .collect(),
            jobs,
        ))
    }

    async fn list_downloads(
        &self,
        state: Option<DownloadState>,
    ) -> Result<Vec<DownloadRow>, StoreError> {
        let rows = sqlx::query(LIST_DOWNLOADS)
            .bind(state.map(DownloadState::as_str))
            .fetch_all(&self.readers)
            .await
            .map_err(self.query_err())?;
        rows.iter().map(|r| self.download_row(r)).collect()
    }

    async fn claim(
        &self,
        owner: &str,
        lease_until: i64,
        now: i64,
    ) -> Result<Option<Job>, StoreError> {
        let err = self.query_err();
        let Some(row) = sqlx::query(CLAIM)
            .bind(owner)
            .bind(lease_until)
            .bind(now)
            .fetch_optional(&self.writer)
            .await
            .map_err(&err)?
        else {
            return Ok(None);
        };
        self.job(&row).map(Some)
    }

    async fn progress(
        &self,
        job: Held,
        owner: &str,
        lease_until: i64,
        p: &Progress,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(PROGRESS)
            .bind(job.id)
            .bind(owner)
            .bind(p.bytes_done)
            .bind(p.bytes_expected)
            .bind(&p.etag)
            .bind(&p.last_modified)
            .bind(lease_until)
            .bind(now_ms())
            .bind(p.origin.as_ref().map(|o| o.source.as_str()))
            .bind(p.origin.as_ref().map(|o| o.url.as_str()))
            .bind(&p.checksum)
            .bind(job.claim)
            .execute(&self.writer)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected() == 1)
    }

    async fn renew_lease(
        &self,
        job: Held,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(RENEW_LEASE)
            .bind(job.id)
            .bind(owner)
            .bind(lease_until)
            .bind(job.claim)
            .execute(&self.writer)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected() == 1)
    }

    async fn hold(
        &self,
        owner: &str,
        jobs: &[Held],
        lease_until: i64,
    ) -> Result<Vec<bool>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let pairs: Vec<(i64, i64)> = jobs.iter().map(|j| (j.id, j.claim)).collect();
        let held: Vec<(i64, i64)> = sqlx::query_as(
            "UPDATE downloads SET lease_expires_at = ?3
             FROM (SELECT value ->> 0 AS id, value ->> 1 AS claim FROM json_each(?2)) AS h
             WHERE downloads.id = h.id AND downloads.claims = h.claim AND downloads.lease_owner = ?1
               AND downloads.state = 'running'
             RETURNING downloads.id, downloads.claims",
        )
        .bind(owner)
        .bind(json_text(&pairs))
        .bind(lease_until)
        .fetch_all(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(jobs
            .iter()
            .map(|j| held.contains(&(j.id, j.claim)))
            .collect())
    }

    async fn finish(
        &self,
        job: Held,
        owner: &str,
        finish: &Finish,
        now: i64,
    ) -> Result<bool, StoreError> {
        if matches!(finish, Finish::Done { .. }) {
            // With its hook run, if one is queued: the same transaction.
            let (recorded, _) = self
                .end_and_claim(owner, &[(job, finish.clone())], 0, now, now)
                .await?;
            return Ok(recorded.first().copied().unwrap_or(false));
        }
        let done = finish_query(job, owner, finish, now)
            .execute(&self.writer)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected() == 1)
    }

    async fn requeue_orphans(
        &self,
        now: i64,
        orphaned: &(dyn for<'a> Fn(&'a str, i64) -> bool + Send + Sync),
    ) -> Result<u64, StoreError> {
        let err = self.query_err();
        let running: Vec<(i64, String, i64)> = sqlx::query_as(RUNNING_LEASES)
            .fetch_all(&self.writer)
            .await
            .map_err(&err)?;
        let orphans: Vec<(i64, String, i64)> = running
            .into_iter()
            .filter(|(_, owner, expires)| orphaned(owner, *expires))
            .collect();
        if orphans.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(REQUEUE_IDS)
            .bind(json_text(&orphans))
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(&err)?;
        Ok(done.rows_affected())
    }

    async fn release_leases(&self, owner: &str, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE downloads SET
                 state = 'queued', attempts = max(attempts - 1, 0), lease_owner = NULL,
                 lease_expires_at = NULL, next_attempt_at = ?2, updated_at = ?2
             WHERE state = 'running' AND lease_owner = ?1",
        )
        .bind(owner)
        .bind(now)
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar(NEXT_DUE)
            .fetch_one(&self.readers)
            .await
            .map_err(self.query_err())
    }

    async fn due_now_beyond(&self, now: i64, horizon: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(DUE_NOW_BEYOND)
            .bind(now)
            .bind(horizon)
            .execute(&self.writer)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn check_identity(&self) -> Result<(), StoreError> {
        let Some(identity) = self.identity else {
            return Ok(());
        };
        let path = self.path.clone();
        let checked = tokio::task::spawn_blocking(move || identity.check(&path)).await;
        match checked {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(change))) => Err(StoreError::Moved {
                path: self.path.display().to_string(),
                what: change.describe(),
            }),
            // Not allowed to look, or an I/O error: that proves nothing about the file (and SQLite will
            // say so if the file cannot be used).
            Ok(Err(e)) => {
                tracing::debug!(
                    "cannot check the database file {}: {e}",
                    self.path.display()
                );
                Ok(())
            }
            Err(_) => Ok(()),
        }
    }

    async fn retry(&self, ids: Option<&[i64]>, now: i64) -> Result<u64, StoreError> {
        let query = match ids {
            Some(ids) => sqlx::query(RETRY_IDS).bind(json_text(&ids)).bind(now),
            None => sqlx::query(RETRY_ALL_FAILED).bind(now),
        };
        let done = query
            .execute(&self.writer)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn redo(&self, ids: &[i64], now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE downloads SET
                 state = 'queued', attempts = 0, next_attempt_at = ?2, last_error = NULL,
                 verify_failures = 0, not_found_since = NULL, bytes_done = 0, finished_at = NULL,
                 updated_at = ?2
             WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'done'",
        )
        .bind(json_text(&ids))
        .bind(now)
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn requeue_needs_auth(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(REQUEUE_NEEDS_AUTH)
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn version_on_disk(
        &self,
        product: &str,
        except: i64,
    ) -> Result<Option<String>, StoreError> {
        sqlx::query_scalar(VERSION_ON_DISK)
            .bind(product)
            .bind(except)
            .fetch_optional(&self.readers)
            .await
            .map_err(self.query_err())
    }

    async fn imap_position(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<Option<(u32, u32)>, StoreError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT uidvalidity, last_uid FROM imap_mailboxes WHERE account = ?1 AND mailbox = ?2",
        )
        .bind(account)
        .bind(mailbox)
        .fetch_optional(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(row.map(|(v, u)| (v as u32, u as u32)))
    }

    async fn set_imap_position(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        last_uid: u32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO imap_mailboxes (account, mailbox, uidvalidity, last_uid, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (account, mailbox) DO UPDATE SET
                 uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid,
                 updated_at = excluded.updated_at",
        )
        .bind(account)
        .bind(mailbox)
        .bind(i64::from(uidvalidity))
        .bind(i64::from(last_uid))
        .bind(now_ms())
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn mail_watermarks(&self, now: i64) -> Result<(i64, i64), StoreError> {
        let err = self.query_err();
        sqlx::query(
            "INSERT OR IGNORE INTO mailer_state (id, enabled_since, alerts_until) VALUES (1, ?1, ?1)",
        )
        .bind(now)
        .execute(&self.writer)
        .await
        .map_err(&err)?;
        sqlx::query_as("SELECT enabled_since, alerts_until FROM mailer_state WHERE id = 1")
            .fetch_one(&self.writer)
            .await
            .map_err(&err)
    }

    async fn notices_to_summarize(&self, since: i64) -> Result<Vec<NoticeDigest>, StoreError> {
        let err = self.query_err();
        let notices: Vec<(i64, String, String, i64)> = sqlx::query_as(
            "SELECT n.id, n.name, n.source_kind, n.received_at FROM notices AS n
             WHERE n.summarized_at IS NULL AND n.received_at >= ?1
               AND NOT EXISTS (
                   SELECT 1 FROM events AS e JOIN downloads AS d ON d.id = e.download_id
                   WHERE e.notice_id = n.id AND d.state IN ('queued', 'running'))
             ORDER BY n.id LIMIT 100",
        )
        .bind(since)
        .fetch_all(&self.readers)
        .await
        .map_err(&err)?;
        let mut out = Vec::with_capacity(notices.len());
        for (notice_id, name, source_kind, received_at) in notices {
            let rows: Vec<DigestRow> = sqlx::query_as(
                "SELECT e.event_type, e.program,
                        lower(e.mission) || '/' || e.fileset || '/' || e.filename,
                        d.state, d.bytes_done, d.last_error
                 FROM events AS e LEFT JOIN downloads AS d ON d.id = e.download_id
                 WHERE e.notice_id = ?1 ORDER BY e.record_index",
            )
            .bind(notice_id)
            .fetch_all(&self.readers)
            .await
            .map_err(&err)?;
            out.push(NoticeDigest {
                notice_id,
                name,
                source_kind,
                received_at,
                items: rows
                    .into_iter()
                    .map(
                        |(event_type, program, local_path, state, bytes, error)| DigestItem {
                            event_type,
                            program,
                            local_path,
                            state: state.as_deref().and_then(DownloadState::parse),
                            bytes: bytes.unwrap_or(0),
                            error,
                        },
                    )
                    .collect(),
            });
        }
        Ok(out)
    }

    async fn queue_summary(
        &self,
        notice: i64,
        mail: Option<&NewMail>,
        now: i64,
    ) -> Result<(), StoreError> {
        let err = self.query_err();
        let mut tx = self.writer.begin().await.map_err(&err)?;
        // Marked first, and only if no one marked it (two mailers at a hand-over): the mail is queued
        // once.
        let marked = sqlx::query(
            "UPDATE notices SET summarized_at = ?2 WHERE id = ?1 AND summarized_at IS NULL",
        )
        .bind(notice)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        if marked.rows_affected() == 1
            && let Some(m) = mail
        {
            insert_mail(&mut tx, m, now).await.map_err(&err)?;
        }
        tx.commit().await.map_err(&err)
    }

    async fn failures_since(&self, after: i64) -> Result<Vec<DownloadRow>, StoreError> {
        let rows = sqlx::query(FAILURES_SINCE)
            .bind(after)
            .fetch_all(&self.readers)
            .await
            .map_err(self.query_err())?;
        rows.iter().map(|r| self.download_row(r)).collect()
    }

    async fn last_alert(&self, cause: &str) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar("SELECT max(created_at) FROM outbox WHERE kind = 'alert' AND cause = ?1")
            .bind(cause)
            .fetch_one(&self.readers)
            .await
            .map_err(self.query_err())
    }

    async fn queue_alerts(
        &self,
        mails: &[NewMail],
        until: i64,
        now: i64,
    ) -> Result<(), StoreError> {
        let err = self.query_err();
        let mut tx = self.writer.begin().await.map_err(&err)?;
        for m in mails {
            insert_mail(&mut tx, m, now).await.map_err(&err)?;
        }
        sqlx::query("UPDATE mailer_state SET alerts_until = max(alerts_until, ?1) WHERE id = 1")
            .bind(until)
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        tx.commit().await.map_err(&err)
    }

    async fn due_mail(&self, now: i64) -> Result<Vec<OutMail>, StoreError> {
        let mut rows: Vec<(i64, String, String, i64)> = sqlx::query_as(
            "UPDATE outbox SET next_attempt_at = ?2
             WHERE id IN (SELECT id FROM outbox WHERE sent_at IS NULL AND next_attempt_at <= ?1
                          ORDER BY id LIMIT 50)
             RETURNING id, subject, body, attempts",
        )
        .bind(now)
        .bind(now.saturating_add(super::MAIL_CLAIM_MS))
        .fetch_all(&self.writer)
        .await
        .map_err(self.query_err())?;
        rows.sort_by_key(|r| r.0);
        Ok(rows
            .into_iter()
            .map(|(id, subject, body, attempts)| OutMail {
                id,
                subject,
                body,
                attempts,
            })
            .collect())
    }

    async fn mail_sent(&self, id: i64, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET sent_at = ?2, attempts = attempts + 1, last_error = NULL WHERE id = ?1",
        )
        .bind(id)
        .bind(now)
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn mail_failed(&self, id: i64, error: &str, next_at: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3
             WHERE id = ?1",
        )
        .bind(id)
        .bind(error)
        .bind(next_at)
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn record_daemon_state(&self, d: &DaemonState) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO daemon_state (id, pid, started_at, rate, updated_at) VALUES (1, ?1, ?2, ?3, ?4)
             ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, started_at = excluded.started_at,
                 rate = excluded.rate, updated_at = excluded.updated_at",
        )
        .bind(d.pid)
        .bind(d.started_at)
        .bind(d.rate)
        .bind(d.updated_at)
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn record_source_health(&self, h: &SourceHealth) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO source_health (source, state, detail, connected, last_contact, last_error,
                                        last_error_at, taken, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (source) DO UPDATE SET
                 state = excluded.state, detail = excluded.detail, connected = excluded.connected,
                 last_contact = coalesce(excluded.last_contact, last_contact),
                 last_error = coalesce(excluded.last_error, last_error),
                 last_error_at = coalesce(excluded.last_error_at, last_error_at),
                 taken = taken + excluded.taken, updated_at = excluded.updated_at",
        )
        .bind(&h.source)
        .bind(&h.state)
        .bind(&h.detail)
        .bind(h.connected)
        .bind(h.last_contact)
        .bind(&h.last_error)
        .bind(h.last_error_at)
        .bind(h.taken as i64)
        .bind(h.updated_at)
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn due_now_waiting(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE downloads SET next_attempt_at = ?1
             WHERE state = 'queued' AND waiting_reason IS NOT NULL AND next_attempt_at > ?1",
        )
        .bind(now)
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    fn queue_product_hooks(&self, on: bool) {
        self.product_hooks
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    async fn notice_hooks_since(&self, on: bool, now: i64) -> Result<Option<i64>, StoreError> {
        let err = self.query_err();
        if !on {
            sqlx::query("DELETE FROM hook_state")
                .execute(&self.writer)
                .await
                .map_err(&err)?;
            return Ok(None);
        }
        sqlx::query("INSERT OR IGNORE INTO hook_state (id, notices_since) VALUES (1, ?1)")
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(&err)?;
        sqlx::query_scalar("SELECT notices_since FROM hook_state WHERE id = 1")
            .fetch_optional(&self.writer)
            .await
            .map_err(&err)
    }

    async fn queue_notice_hooks(&self, since: i64, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(QUEUE_NOTICE_HOOKS)
            .bind(since)
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn claim_hook_runs(&self, n: usize, now: i64) -> Result<Vec<HookRun>, StoreError> {
        let err = self.query_err();
        if n == 0 {
            return Ok(Vec::new());
        }
        let claimed: Vec<(i64, String, i64, Option<i64>, Option<i64>)> =
            sqlx::query_as(CLAIM_HOOK_RUNS)
                .bind(now)
                .bind(n as i64)
                .fetch_all(&self.writer)
                .await
                .map_err(&err)?;
        let ids: Vec<i64> = claimed.iter().map(|c| c.0).collect();
        let mut runs = Vec::with_capacity(claimed.len());
        for (id, kind, attempt, download, notice) in claimed {
            match self.hook_run(id, &kind, attempt, download, notice).await {
                Ok(Some(run)) => runs.push(run),
                Ok(None) => {
                    // Its product or notice is gone (a database edited by hand): nothing to run.
                    sqlx::query(
                        "UPDATE hook_runs SET state = 'failed', last_error = 'its product or notice is no \
                         longer recorded', finished_at = ?2, updated_at = ?2 WHERE id = ?1",
                    )
                    .bind(id)
                    .bind(now)
                    .execute(&self.writer)
                    .await
                    .map_err(&err)?;
                }
                Err(e) => {
                    // None of this claim is left running: all pending again, a minute later, this
                    // attempt not counted.
                    let _ = sqlx::query(
                        "UPDATE hook_runs SET state = 'pending', attempts = max(attempts - 1, 0),
                             next_attempt_at = ?2, updated_at = ?2
                         WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'running'",
                    )
                    .bind(json_text(&ids))
                    .bind(now + 60_000)
                    .execute(&self.writer)
                    .await;
                    return Err(e);
                }
            }
        }
        Ok(runs)
    }

    async fn end_hook_run(&self, id: i64, end: &HookEnd, now: i64) -> Result<(), StoreError> {
        let q = match end {
            HookEnd::Done => sqlx::query(
                "UPDATE hook_runs SET state = 'done', last_error = NULL, finished_at = ?2, updated_at = ?2
                 WHERE id = ?1 AND state = 'running'",
            )
            .bind(id)
            .bind(now),
            HookEnd::Retry { at, error } => sqlx::query(
                "UPDATE hook_runs SET state = 'pending', next_attempt_at = ?3, last_error = ?4,
                     failures = failures + 1, updated_at = ?2
                 WHERE id = ?1 AND state = 'running'",
            )
            .bind(id)
            .bind(now)
            .bind(at)
            .bind(error),
            HookEnd::Failed { error } => sqlx::query(
                "UPDATE hook_runs SET state = 'failed', last_error = ?3, failures = failures + 1,
                     finished_at = ?2, updated_at = ?2
                 WHERE id = ?1 AND state = 'running'",
            )
            .bind(id)
            .bind(now)
            .bind(error),
            HookEnd::Interrupted => sqlx::query(
                "UPDATE hook_runs SET state = 'pending', attempts = max(attempts - 1, 0),
                     next_attempt_at = min(next_attempt_at, ?2), updated_at = ?2
                 WHERE id = ?1 AND state = 'running'",
            )
            .bind(id)
            .bind(now),
        };
        q.execute(&self.writer).await.map_err(self.query_err())?;
        Ok(())
    }

    async fn requeue_hook_runs(&self, now: i64, refund: bool) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE hook_runs SET state = 'pending', attempts = max(attempts - ?2, 0),
                 next_attempt_at = min(next_attempt_at, ?1),
                 updated_at = ?1
             WHERE state = 'running'",
        )
        .bind(now)
        .bind(i64::from(refund))
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn next_hook_due(&self) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar("SELECT min(next_attempt_at) FROM hook_runs WHERE state = 'pending'")
            .fetch_one(&self.readers)
            .await
            .map_err(self.query_err())
    }

    async fn cloud_paths(&self, uris: &[String]) -> Result<HashMap<String, CloudPath>, StoreError> {
        let rows: Vec<(String, Option<String>, i64)> = sqlx::query_as(CLOUD_PATHS)
            .bind(json_text(&uris))
            .fetch_all(&self.readers)
            .await
            .map_err(self.query_err())?;
        Ok(rows
            .into_iter()
            .map(|(uri, key, looked_up_at)| (uri, CloudPath { key, looked_up_at }))
            .collect())
    }

    async fn record_cloud_paths(
        &self,
        paths: &[(String, Option<String>)],
        now: i64,
    ) -> Result<(), StoreError> {
        if paths.is_empty() {
            return Ok(());
        }
        sqlx::query(RECORD_CLOUD_PATHS)
            .bind(json_text(&paths))
            .bind(now)
            .execute(&self.writer)
            .await
            .map_err(self.query_err())?;
        Ok(())
    }

    async fn upcoming(&self, n: usize) -> Result<Vec<Upcoming>, StoreError> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(UPCOMING)
            .bind(i64::try_from(n).unwrap_or(i64::MAX))
            .fetch_all(&self.readers)
            .await
            .map_err(self.query_err())?;
        Ok(rows
            .into_iter()
            .map(|(mission, filename, url, event_type)| Upcoming {
                mission,
                filename,
                url,
                event_type,
            })
            .collect())
    }

    async fn join_member(
        &self,
        me: &MemberBeat,
        live_since: i64,
        gone: &(dyn for<'a> Fn(&'a str) -> bool + Send + Sync),
    ) -> Result<Option<Member>, StoreError> {
        let err = self.query_err();
        let mut tx = self.writer.begin().await.map_err(&err)?;
        let row: Option<(String, String, i64, i64, i64, i64, f64, Option<i64>)> = sqlx::query_as(
            "SELECT node, owner, pid, started_at, heartbeat_at, clock_skew, rate, stopped_at
             FROM members WHERE node = ?1",
        )
        .bind(&me.node)
        .fetch_optional(&mut *tx)
        .await
        .map_err(&err)?;
        if let Some(row) = row {
            let (owner, heartbeat_at, stopped_at) = (&row.1, row.4, row.7);
            if *owner != me.owner
                && stopped_at.is_none()
                && heartbeat_at >= live_since
                && !gone(owner)
            {
                return Ok(super::assemble_members(vec![row], vec![], vec![]).pop());
            }
            // The process that had the name is gone (or silent for a lease): so are its leader leases.
            sqlx::query("DELETE FROM leaders WHERE owner = ?1 AND owner != ?2")
                .bind(owner)
                .bind(&me.owner)
                .execute(&mut *tx)
                .await
                .map_err(&err)?;
        }
        sqlx::query(
            "INSERT INTO members (node, owner, pid, started_at, heartbeat_at, rate)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (node) DO UPDATE SET owner = excluded.owner, pid = excluded.pid,
                 started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, clock_skew = 0,
                 rate = excluded.rate, stopped_at = NULL",
        )
        .bind(&me.node)
        .bind(&me.owner)
        .bind(me.pid)
        .bind(me.started_at)
        .bind(me.now)
        .bind(me.rate)
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        tx.commit().await.map_err(&err)?;
        Ok(None)
    }

    async fn member_beat(&self, me: &MemberBeat) -> Result<bool, StoreError> {
        // A row gone (a restored database, one deleted by hand) is made again; one that names another
        // process is left alone, and said.
        let done = sqlx::query(
            "INSERT INTO members (node, owner, pid, started_at, heartbeat_at, rate)
             VALUES (?1, ?2, ?5, ?6, ?3, ?4)
             ON CONFLICT (node) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, rate = excluded.rate,
                 pid = excluded.pid
             WHERE members.owner = excluded.owner",
        )
        .bind(&me.node)
        .bind(&me.owner)
        .bind(me.now)
        .bind(me.rate)
        .bind(me.pid)
        .bind(me.started_at)
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected() == 1)
    }

    async fn leave_member(&self, node: &str, owner: &str, now: i64) -> Result<(), StoreError> {
        let err = self.query_err();
        let mut tx = self.writer.begin().await.map_err(&err)?;
        sqlx::query(
            "UPDATE members SET stopped_at = ?3, heartbeat_at = ?3, rate = 0
             WHERE node = ?1 AND owner = ?2",
        )
        .bind(node)
        .bind(owner)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        tx.commit().await.map_err(&err)
    }

    async fn lead(
        &self,
        role: &str,
        node: &str,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO leaders (role, node, owner, since, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (role) DO UPDATE SET node = excluded.node, owner = excluded.owner,
                 since = CASE WHEN leaders.owner = excluded.owner THEN leaders.since ELSE excluded.since END,
                 expires_at = excluded.expires_at
             WHERE leaders.owner = excluded.owner OR leaders.expires_at <= ?4",
        )
        .bind(role)
        .bind(node)
        .bind(owner)
        .bind(now)
        .bind(until)
        .execute(&self.writer)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected() == 1)
    }

    async fn resign(&self, role: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leaders WHERE role = ?1 AND owner = ?2")
            .bind(role)
            .bind(owner)
            .execute(&self.writer)
            .await
            .map_err(self.query_err())?;
        Ok(())
    }

    async fn members(&self, now: i64) -> Result<Vec<Member>, StoreError> {
        let mut conn = self.readers.begin().await.map_err(self.query_err())?;
        let members = self.members_on(&mut conn, now).await?;
        conn.commit().await.map_err(self.query_err())?;
        Ok(members)
    }

    async fn close(&self) {
        self.readers.close().await;
        // SQLite neither checkpoints nor removes the WAL of a database file that was deleted or moved
        // (SQLITE_FCNTL_HAS_MOVED), and the WAL is found by name: the file now at the path would read our
        // frames as its own at its next opening. Emptied, it is harmless.
        if matches!(self.check_identity().await, Err(StoreError::Moved { .. }))
            && let Err(why) = self.empty_wal().await
        {
            tracing::warn!(
                "cannot empty the write-ahead log {}-wal of the database file that was moved ({why}); \
                 remove it before mastsub opens the file now at that path",
                self.path.display()
            );
        }
        self.writer.close().await;
    }
}

/// What `PRODUCT_HOOK_ENV` reads: the job's path, mission, fileset, filename, program, event type and
/// version, the raw record of its first event and that event's notice name.
pub(super) type ProductHookRow = (
    String,
    String,
    String,
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
);

/// What `NOTICE_HOOK_ENV` reads: the notice's name, its products done, failed and recorded only.
pub(super) type NoticeHookRow = (String, i64, i64, i64);

/// An `on_product` run with its environment. Shared by every backend.
pub(super) fn product_hook_run(id: i64, attempt: i64, row: ProductHookRow) -> HookRun {
    let (path, mission, fileset, filename, program, event_type, version, raw, notice) = row;
    // The values as the notice wrote them, where its record has them.
    let raw: serde_json::Value = raw
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_default();
    let written = |key: &str, fallback: String| match raw.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v @ serde_json::Value::Number(_)) => v.to_string(),
        _ => fallback,
    };
    HookRun {
        id,
        kind: HookKind::OnProduct,
        attempt,
        about: path.clone(),
        env: vec![
            ("MASTSUB_PATH".into(), path),
            ("MASTSUB_MISSION".into(), written("mission", mission)),
            ("MASTSUB_FILESET".into(), written("fileset", fileset)),
            ("MASTSUB_FILENAME".into(), written("filename", filename)),
            (
                "MASTSUB_PROGRAM".into(),
                written("program", program.to_string()),
            ),
            (
                "MASTSUB_EVENT_TYPE".into(),
                written("event_type", event_type),
            ),
            (
                "MASTSUB_ARCHIVED_DATE".into(),
                written("archived_date", version),
            ),
            ("MASTSUB_NOTICE".into(), notice.unwrap_or_default()),
        ],
    }
}

/// An `on_notice` run with its environment. Shared by every backend.
pub(super) fn notice_hook_run(id: i64, attempt: i64, row: NoticeHookRow) -> HookRun {
    let (name, done, failed, skipped) = row;
    HookRun {
        id,
        kind: HookKind::OnNotice,
        attempt,
        about: name.clone(),
        env: vec![
            ("MASTSUB_NOTICE".into(), name),
            ("MASTSUB_DONE".into(), done.to_string()),
            ("MASTSUB_FAILED".into(), failed.to_string()),
            ("MASTSUB_SKIPPED".into(), skipped.to_string()),
        ],
    }
}

/// An event of a notice with its job: type, program, local path, state, bytes, error.
type DigestRow = (
    String,
    i64,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
);

/// Inserts a mail into the outbox, due at once.
async fn insert_mail(
    tx: &mut sqlx::Transaction<'_, Sqlite>,
    m: &NewMail,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox (kind, cause, subject, body, created_at, next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
    )
    .bind(m.kind)
    .bind(&m.cause)
    .bind(&m.subject)
    .bind(&m.body)
    .bind(now)
    .execute(&mut **tx)
    .await
    .map(drop)
}
