//! The PostgreSQL backend: one database shared by several daemons on several hosts, through a pool of
//! connections. The same [`Store`] contract as SQLite's, made safe where SQLite relied on being the only
//! writer:
//!
//! - a notice is recorded under a transaction-scoped advisory lock ([`INGEST_LOCK`]), so that ingests
//!   read and write (content hash, `event_id` de-duplication, the latest job of each product) one after
//!   the other, as SQLite's `BEGIN IMMEDIATE` makes them; the latest jobs it plans from are locked
//!   (`FOR UPDATE`) so that no worker changes them under the plan;
//! - a claim takes its job with `FOR UPDATE SKIP LOCKED` (claimers never wait for, nor take, the same
//!   row), and a partial unique index keeps two jobs of one local path from running at once: a claim that
//!   hits it (another connection took a job of that path since the claim's snapshot) tries again with a
//!   fresh snapshot, inside a savepoint when it is part of `end_and_claim`'s transaction;
//! - lease-checked writes name the owner and the running state, and orphaned leases are taken back only
//!   if they are still exactly the ones judged;
//! - `status`'s counts are sums of append-only delta rows (migrations/postgres/0001_initial.sql), never
//!   a hot counter row that every worker would update.
//!
//! Lists of keys go as array parameters that `unnest` or `= ANY` unpacks: one statement and a few
//! parameters however many rows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Postgres, Row};

use super::sqlite::{
    NoticeHookRow, ProductHookRow, Recorded, fresh_events, notice_hook_run, product_hook_run, tally,
};
use super::{
    CloudPath, DaemonState, DigestItem, DownloadRow, DownloadState, Finish, Held, HookEnd,
    HookFailure, HookRun, IngestOutcome, Job, Member, MemberBeat, NewMail, NoticeDigest,
    NoticeMeta, NoticeRow, NoticeStatus, OutMail, Progress, Provenance, SourceHealth,
    StatusSnapshot, Store, StoreError, Upcoming, now_ms,
};
use super::{HookFailureTuple, NoticeTuple};
use crate::categorize::{Categorizer, JobRef, LatestJob};
use crate::notice::{Event, EventType};

/// The key of the advisory lock that serialises ingests across every host ("mastsubi"): held for the
/// ingest transaction only (`pg_advisory_xact_lock`), released by its commit or rollback.
pub const INGEST_LOCK: i64 = 0x6d61_7374_7375_6269;
/// The key of the advisory lock under which members join ("mastsubm").
const MEMBERS_LOCK: i64 = 0x6d61_7374_7375_626d;
/// The database's clock, ms since the epoch, in SQL.
const DB_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";
/// Connections per store: the workers' claims and ends go through the publisher, so a few suffice.
const MAX_CONNECTIONS: u32 = 8;
/// How long a query waits for a free connection (or for the server to come back) before failing: short,
/// so that while the server is down (a restart) every loop still turns, failing its store calls and
/// trying again, instead of hanging in them long enough for systemd's watchdog to kill the daemon.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// `status` folds the count deltas into one row per group once there are more rows than this.
const FOLD_AT: i64 = 10_000;
/// How often one claim tries again after another connection took a job of the same path first. Each try
/// reads a newer snapshot, which skips the path just taken, so this is only a bound.
const CLAIM_TRIES: usize = 64;

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PgStore {
    /// The database as shown to people (no password).
    shown: String,
    pool: PgPool,
    /// Opened by `open_read_only`: every transaction is read-only, and `status` folds nothing.
    read_only: bool,
    /// Queue an `on_product` hook run with every job recorded done.
    product_hooks: Arc<AtomicBool>,
}

impl PgStore {
    /// Connects, and creates or migrates the schema.
    pub async fn open(options: PgConnectOptions, shown: &str) -> Result<PgStore, StoreError> {
        let pool = connect(options, shown).await?;
        // sqlx's migrator holds an advisory lock while it creates its table and applies migrations, so
        // members starting at once on an empty database take turns.
        if let Err(source) = sqlx::migrate!("./migrations/postgres").run(&pool).await {
            pool.close().await;
            return Err(StoreError::Migrate {
                path: shown.to_string(),
                source,
            });
        }
        Ok(PgStore {
            shown: shown.to_string(),
            pool,
            read_only: false,
            product_hooks: Default::default(),
        })
    }

    /// Connects to an existing mastsub database for reading only: no migration; StoreError::NotOurs when
    /// it has no `downloads` table (an empty or foreign database).
    pub async fn open_read_only(
        options: PgConnectOptions,
        shown: &str,
    ) -> Result<PgStore, StoreError> {
        let options = options.options([("default_transaction_read_only", "on")]);
        let pool = connect(options, shown).await?;
        let ours: Result<bool, _> =
            sqlx::query_scalar("SELECT to_regclass('downloads') IS NOT NULL")
                .fetch_one(&pool)
                .await;
        match ours {
            Ok(true) => Ok(PgStore {
                shown: shown.to_string(),
                pool,
                read_only: true,
                product_hooks: Default::default(),
            }),
            Ok(false) => {
                pool.close().await;
                Err(StoreError::NotOurs {
                    path: shown.to_string(),
                })
            }
            Err(source) => {
                pool.close().await;
                Err(StoreError::Open {
                    path: shown.to_string(),
                    source,
                })
            }
        }
    }

    /// The members, their running jobs and live leases at `now`, read on `conn` (`status` reads them in
    /// its own snapshot, with the counts).
    async fn members_on(
        &self,
        conn: &mut PgConnection,
        now: i64,
    ) -> Result<Vec<Member>, StoreError> {
        let err = self.query_err();
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
            sqlx::query_as("SELECT role, owner FROM leaders WHERE expires_at > $1 ORDER BY role")
                .bind(now)
                .fetch_all(&mut *conn)
                .await
                .map_err(&err)?;
        Ok(super::assemble_members(rows, running, leaders))
    }

    fn query_err(&self) -> impl Fn(sqlx::Error) -> StoreError + '_ {
        move |source| StoreError::Query {
            path: self.shown.clone(),
            source,
        }
    }

    fn corrupt(&self, column: &'static str, value: String) -> StoreError {
        StoreError::Corrupt {
            path: self.shown.clone(),
            column,
            value,
        }
    }

    /// A claimed job from a `RETURNING` row.
    fn job(&self, row: &PgRow) -> Result<Job, StoreError> {
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
    fn provenance(&self, row: &PgRow) -> Result<Option<Provenance>, StoreError> {
        let text: Option<String> = row.try_get("source").map_err(self.query_err())?;
        text.map(|t| Provenance::parse(&t).ok_or_else(|| self.corrupt("downloads.source", t)))
            .transpose()
    }

    fn download_row(&self, row: &PgRow) -> Result<DownloadRow, StoreError> {
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
            state: DownloadState::parse(&state)
                .ok_or_else(|| self.corrupt("downloads.state", state.clone()))?,
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

    /// One claim on `conn`: the next due job on a free path, or `None`. Inside a transaction (`in_tx`)
    /// each try runs in a savepoint, so that a try refused by the running-path index (or chosen to break
    /// a deadlock) leaves the transaction and its other writes usable.
    async fn claim_on(
        &self,
        conn: &mut PgConnection,
        in_tx: bool,
        owner: &str,
        lease_until: i64,
        now: i64,
    ) -> Result<Option<Job>, StoreError> {
        let err = self.query_err();
        for _ in 0..CLAIM_TRIES {
            let claimed = if in_tx {
                let mut savepoint = conn.begin().await.map_err(&err)?;
                let claimed = claim_query(owner, lease_until, now)
                    .fetch_optional(&mut *savepoint)
                    .await;
                match claimed {
                    Ok(_) => savepoint.commit().await.map_err(&err)?,
                    Err(_) => savepoint.rollback().await.map_err(&err)?,
                }
                claimed
            } else {
                claim_query(owner, lease_until, now)
                    .fetch_optional(&mut *conn)
                    .await
            };
            match claimed {
                Ok(Some(row)) => return self.job(&row).map(Some),
                Ok(None) => return Ok(None),
                Err(e) => match refusal(&e) {
                    Some(Refusal::PathTaken) => continue,
                    // This transaction's claims and another's wait for each other's paths: trying again
                    // would wait again, so this call claims no more (the other goes on).
                    Some(Refusal::Deadlock) => return Ok(None),
                    None => return Err(err(e)),
                },
            }
        }
        tracing::debug!("no claim after {CLAIM_TRIES} tries: other claimers kept taking its paths");
        Ok(None)
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
        match (kind, download, notice) {
            ("product", Some(download), _) => {
                let row: Option<ProductHookRow> = sqlx::query_as(PRODUCT_HOOK_ENV)
                    .bind(download)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(&err)?;
                Ok(row.map(|row| product_hook_run(id, attempt, row)))
            }
            ("notice", _, Some(notice)) => {
                let row: Option<NoticeHookRow> = sqlx::query_as(NOTICE_HOOK_ENV)
                    .bind(notice)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(&err)?;
                Ok(row.map(|row| notice_hook_run(id, attempt, row)))
            }
            _ => Ok(None),
        }
    }

    /// Folds the count deltas into one row per group, each table in one statement: the rows it deletes
    /// are the ones it sums, so deltas committed meanwhile stay, and two folds at once each fold what
    /// they deleted.
    async fn fold_counts(&self) -> Result<(), StoreError> {
        let err = self.query_err();
        sqlx::query(FOLD_DOWNLOAD_COUNTS)
            .execute(&self.pool)
            .await
            .map_err(&err)?;
        sqlx::query(FOLD_EVENT_COUNTS)
            .execute(&self.pool)
            .await
            .map_err(&err)?;
        Ok(())
    }

    /// The ingest transaction.
    async fn ingest_in(
        &self,
        tx: &mut sqlx::Transaction<'_, Postgres>,
        notice: &NoticeMeta,
        events: &[Event],
        categorizer: &Categorizer,
    ) -> Result<IngestOutcome, StoreError> {
        let err = self.query_err();
        let now = now_ms();
        // Ingests on every host one after the other, as SQLite's BEGIN IMMEDIATE: each reads what the
        // previous one wrote (content hash, event ids, the latest job of each product).
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(INGEST_LOCK)
            .execute(&mut **tx)
            .await
            .map_err(&err)?;
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
            .fetch_one(&mut **tx)
            .await
            .map_err(&err)?;
        let mut outcome = IngestOutcome {
            notice_id,
            seen_before: times_seen > 1,
            ..IngestOutcome::default()
        };
        if events.is_empty() {
            return Ok(outcome);
        }

        let ids: Vec<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
        let recorded: Vec<Recorded> = sqlx::query_as(RECORDED_EVENTS)
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await
            .map_err(&err)?;
        let fresh = fresh_events(events, &recorded, &notice.name, &mut outcome);

        let products: Vec<String> = fresh
            .iter()
            .map(|e| crate::product::product_key(e))
            .collect::<HashSet<String>>()
            .into_iter()
            .collect();
        let rows: Vec<(i64, String, String, String)> = sqlx::query_as(LATEST_JOBS)
            .bind(&products)
            .fetch_all(&mut **tx)
            .await
            .map_err(&err)?;
        let mut latest = HashMap::with_capacity(rows.len());
        for (id, product, state, version) in rows {
            let state = DownloadState::parse(&state)
                .ok_or_else(|| self.corrupt("downloads.state", state.clone()))?;
            latest.insert(product, LatestJob { id, state, version });
        }

        let plan = categorizer.plan(&fresh, &latest);

        // The new jobs' ids from the identity's sequence, in the plan's order: the events name them.
        let mut job_ids: Vec<i64> = if plan.new_jobs.is_empty() {
            Vec::new()
        } else {
            sqlx::query_scalar(NEW_JOB_IDS)
                .bind(plan.new_jobs.len() as i64)
                .fetch_all(&mut **tx)
                .await
                .map_err(&err)?
        };
        job_ids.sort_unstable();
        if !plan.new_jobs.is_empty() {
            let j = &plan.new_jobs;
            sqlx::query(INSERT_JOBS)
                .bind(now)
                .bind(&job_ids)
                .bind(j.iter().map(|j| j.product.as_str()).collect::<Vec<_>>())
                .bind(j.iter().map(|j| j.mission.as_str()).collect::<Vec<_>>())
                .bind(j.iter().map(|j| j.fileset.as_str()).collect::<Vec<_>>())
                .bind(j.iter().map(|j| j.filename.as_str()).collect::<Vec<_>>())
                .bind(j.iter().map(|j| j.program).collect::<Vec<_>>())
                .bind(j.iter().map(|j| j.event_type.as_str()).collect::<Vec<_>>())
                .bind(j.iter().map(|j| j.version.as_str()).collect::<Vec<_>>())
                .bind(j.iter().map(|j| j.url.as_str()).collect::<Vec<_>>())
                .bind(j.iter().map(|j| j.local_path.as_str()).collect::<Vec<_>>())
                .execute(&mut **tx)
                .await
                .map_err(&err)?;
        }
        if !plan.updates.is_empty() {
            let u = &plan.updates;
            sqlx::query(UPDATE_JOBS)
                .bind(now)
                .bind(u.iter().map(|u| u.id).collect::<Vec<_>>())
                .bind(u.iter().map(|u| u.version.as_str()).collect::<Vec<_>>())
                .bind(
                    u.iter()
                        .map(|u| u.requeue.as_ref().map(EventType::as_str))
                        .collect::<Vec<_>>(),
                )
                .execute(&mut **tx)
                .await
                .map_err(&err)?;
        }

        tally(&plan, &mut outcome);
        let p = &plan.events;
        let download_ids: Vec<Option<i64>> = p
            .iter()
            .map(|planned| {
                planned.job.map(|job| match job {
                    JobRef::Existing(id) => id,
                    JobRef::New(i) => job_ids[i],
                })
            })
            .collect();
        sqlx::query(INSERT_EVENTS)
            .bind(notice_id)
            .bind(now)
            .bind(
                p.iter()
                    .map(|e| e.event.event_id.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(p.iter().map(|e| e.event.index as i64).collect::<Vec<_>>())
            .bind(
                p.iter()
                    .map(|e| e.event.mission.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                p.iter()
                    .map(|e| e.event.fileset.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                p.iter()
                    .map(|e| e.event.filename.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(p.iter().map(|e| e.event.program).collect::<Vec<_>>())
            .bind(
                p.iter()
                    .map(|e| e.event.event_type.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(
                p.iter()
                    .map(|e| e.event.archived_date.canonical())
                    .collect::<Vec<_>>(),
            )
            .bind(
                p.iter()
                    .map(|e| e.event.public_release_date.canonical())
                    .collect::<Vec<_>>(),
            )
            .bind(p.iter().map(|e| e.event.uri.as_deref()).collect::<Vec<_>>())
            .bind(p.iter().map(|e| e.event.raw.as_str()).collect::<Vec<_>>())
            .bind(p.iter().map(|e| e.disposition.as_str()).collect::<Vec<_>>())
            .bind(&download_ids)
            .execute(&mut **tx)
            .await
            .map_err(&err)?;
        sqlx::query(COUNT_EVENTS_RECORDED)
            .bind(notice_id)
            .bind(plan.events.len() as i64)
            .execute(&mut **tx)
            .await
            .map_err(&err)?;
        Ok(outcome)
    }
}

/// The pool, with one connection made at once (so an unreachable server is an error here).
async fn connect(options: PgConnectOptions, shown: &str) -> Result<PgPool, StoreError> {
    // The server's notices (`relation "_sqlx_migrations" already exists, skipping` from every member
    // but the first) are not news to anyone reading the log.
    let options = options.options([("client_min_messages", "warning")]);
    PgPoolOptions::new()
        .max_connections(MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect_with(options)
        .await
        .map_err(|source| StoreError::Open {
            path: shown.to_string(),
            source,
        })
}

/// Why PostgreSQL refused a claim that SQLite, with its one writer, never meets.
enum Refusal {
    /// Another connection has a job of the same path running, committed since the claim's snapshot (the
    /// running-path index): another try, with a fresh snapshot, skips that path.
    PathTaken,
    /// PostgreSQL broke a wait cycle between claimers (each waiting at the running-path index for a path
    /// the other's uncommitted claim holds) by failing this one.
    Deadlock,
}

fn refusal(e: &sqlx::Error) -> Option<Refusal> {
    let sqlx::Error::Database(db) = e else {
        return None;
    };
    match db.code().as_deref() {
        Some("23505") if db.constraint() == Some("downloads_running_by_path") => {
            Some(Refusal::PathTaken)
        }
        Some("40P01") => Some(Refusal::Deadlock),
        _ => None,
    }
}

const UPSERT_NOTICE: &str = "
    INSERT INTO notices (sha256, source_kind, source_ref, name, size, received_at, last_seen_at,
                         status, records, error)
    VALUES ($1, $2, $3, $4, $5, $6, $6, $7, $8, $9)
    ON CONFLICT (sha256) DO UPDATE SET
        last_seen_at = excluded.last_seen_at,
        times_seen = notices.times_seen + 1,
        status = excluded.status,
        records = excluded.records,
        error = excluded.error
    RETURNING id, times_seen";

/// Recorded events with any of the ids in $1, with what they named and where they came from.
const RECORDED_EVENTS: &str = "
    SELECT e.event_id, n.name, e.record_index, e.mission, e.fileset, e.filename, e.event_type,
           e.archived_date
    FROM events AS e JOIN notices AS n ON n.id = e.notice_id
    WHERE e.event_id = ANY($1::text[])";

/// The latest job of each product in $1, locked in id order until the ingest commits: a worker's end
/// or claim of it waits (or skips it), so the plan made from its state holds when it is written.
const LATEST_JOBS: &str = "
    SELECT d.id, d.product, d.state, d.version
    FROM unnest($1::text[]) AS k(product)
    JOIN downloads AS d ON d.id = (SELECT max(id) FROM downloads WHERE product = k.product)
    ORDER BY d.id
    FOR UPDATE OF d";

/// $1 ids for new jobs.
const NEW_JOB_IDS: &str =
    "SELECT nextval(pg_get_serial_sequence('downloads', 'id')) FROM generate_series(1, $1::bigint)";

/// New jobs at $1 from arrays of their ids and fields.
const INSERT_JOBS: &str = "
    INSERT INTO downloads (id, product, mission, fileset, filename, program, event_type, version, url,
                           local_path, state, next_attempt_at, created_at, updated_at)
    SELECT id, product, mission, fileset, filename, program, event_type, version, url, local_path,
           'queued', $1, $1, $1
    FROM unnest($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[],
                $9::text[], $10::text[], $11::text[])
         WITH ORDINALITY AS j(id, product, mission, fileset, filename, program, event_type, version, url,
                              local_path, ord)
    ORDER BY ord";

/// A requeue starts the job afresh: no attempts, no lease, no error, due now ($1).
const UPDATE_JOBS: &str = "
    UPDATE downloads SET
        version = u.version,
        state = CASE WHEN u.requeue IS NULL THEN downloads.state ELSE 'queued' END,
        event_type = coalesce(u.requeue, downloads.event_type),
        attempts = CASE WHEN u.requeue IS NULL THEN downloads.attempts ELSE 0 END,
        next_attempt_at = CASE WHEN u.requeue IS NULL THEN downloads.next_attempt_at ELSE $1 END,
        lease_owner = CASE WHEN u.requeue IS NULL THEN downloads.lease_owner ELSE NULL END,
        lease_expires_at = CASE WHEN u.requeue IS NULL THEN downloads.lease_expires_at ELSE NULL END,
        last_error = CASE WHEN u.requeue IS NULL THEN downloads.last_error ELSE NULL END,
        updated_at = $1
    FROM unnest($2::bigint[], $3::text[], $4::text[]) AS u(id, version, requeue)
    WHERE downloads.id = u.id";

/// The events of notice $1 at $2, from arrays of their fields, in the plan's order.
const INSERT_EVENTS: &str = "
    INSERT INTO events (event_id, notice_id, record_index, mission, fileset, filename, program, event_type,
                        archived_date, public_release_date, uri, raw, disposition, download_id, received_at)
    SELECT event_id, $1, record_index, mission, fileset, filename, program, event_type, archived_date,
           public_release_date, uri, raw, disposition, download_id, $2
    FROM unnest($3::text[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::bigint[], $9::text[],
                $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::bigint[])
         WITH ORDINALITY AS e(event_id, record_index, mission, fileset, filename, program, event_type,
                              archived_date, public_release_date, uri, raw, disposition, download_id, ord)
    ORDER BY ord";

const COUNT_EVENTS_RECORDED: &str = "
    UPDATE notices SET events_recorded = events_recorded + $2 WHERE id = $1";

/// Jobs by event type and state, and the bytes of done ones, summed from the deltas; with the rows
/// summed, to know when to fold them.
const DOWNLOAD_COUNTS: &str = "
    SELECT event_type, state, sum(n)::bigint, sum(bytes)::bigint, count(*)
    FROM download_count_deltas GROUP BY event_type, state";

const EVENT_COUNTS: &str = "
    SELECT event_type, sum(n)::bigint, count(*) FROM event_count_deltas GROUP BY event_type";

const FOLD_DOWNLOAD_COUNTS: &str = "
    WITH gone AS (DELETE FROM download_count_deltas RETURNING event_type, state, n, bytes)
    INSERT INTO download_count_deltas (event_type, state, n, bytes)
    SELECT event_type, state, sum(n), sum(bytes) FROM gone GROUP BY event_type, state
    HAVING sum(n) <> 0 OR sum(bytes) <> 0";

const FOLD_EVENT_COUNTS: &str = "
    WITH gone AS (DELETE FROM event_count_deltas RETURNING event_type, n)
    INSERT INTO event_count_deltas (event_type, n)
    SELECT event_type, sum(n) FROM gone GROUP BY event_type HAVING sum(n) <> 0";

const NOTICES_BY_STATUS: &str = "SELECT status, count(*) FROM notices GROUP BY status";

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
    "WHERE state IN ('failed', 'needs_auth') ORDER BY updated_at DESC, id DESC LIMIT $1"
);

/// The running jobs (never more than the workers, but for moments), by id.
const RUNNING_JOBS: &str = concat!(
    download_row_columns!(),
    "WHERE state = 'running' ORDER BY id LIMIT 1000"
);

/// Queued jobs waiting for room, the latest reason, and when the oldest queued job was created: each
/// from its partial index.
const QUEUE_FIGURES: &str = "
    SELECT
        (SELECT count(*) FROM downloads WHERE state = 'queued' AND waiting_reason IS NOT NULL),
        (SELECT waiting_reason FROM downloads WHERE state = 'queued' AND waiting_reason IS NOT NULL
         ORDER BY updated_at DESC LIMIT 1),
        (SELECT min(created_at) FROM downloads WHERE state = 'queued')";

/// The latest $1 notices, newest first.
const RECENT_NOTICES: &str = "
    SELECT id, name, source_kind, received_at, status, records, events_recorded, error
    FROM notices ORDER BY received_at DESC, id DESC LIMIT $1";

const SOURCE_HEALTH: &str = "
    SELECT source, state, detail, connected, last_contact, last_error, last_error_at, taken, updated_at
    FROM source_health ORDER BY source";

const LIST_DOWNLOADS: &str = concat!(
    download_row_columns!(),
    "WHERE $1::text IS NULL OR state = $1::text ORDER BY id"
);

/// Jobs that ended failed or needing a token after $1, oldest first.
const FAILURES_SINCE: &str = concat!(
    download_row_columns!(),
    "WHERE state IN ('failed', 'needs_auth') AND updated_at > $1 ORDER BY updated_at, id LIMIT 1000"
);

/// The due job with the earliest attempt time whose local path has no job running (two jobs never write
/// one path at once: versions of one product share it, and so do same-named products in `download
/// --flat`), claimed for an owner ($1) until a lease time ($2), at a time ($3). A row another connection
/// holds is skipped, never waited for; two claimers that pass the NOT EXISTS test for two jobs of one path
/// at once meet at the unique index `downloads_running_by_path`, and the later one fails (and tries again).
const CLAIM: &str = "
    WITH next AS (
        SELECT d.id FROM downloads AS d
        WHERE d.state = 'queued' AND d.next_attempt_at <= $3
          AND NOT EXISTS (SELECT 1 FROM downloads AS r
                          WHERE r.local_path = d.local_path AND r.state = 'running')
        ORDER BY d.next_attempt_at, d.id
        LIMIT 1
        FOR UPDATE OF d SKIP LOCKED)
    UPDATE downloads SET
        state = 'running', lease_owner = $1, lease_expires_at = $2,
        attempts = attempts + 1, claims = claims + 1, started_at = coalesce(started_at, $3),
        updated_at = $3
    WHERE id = (SELECT id FROM next) AND state = 'queued'
    RETURNING id, product, mission, filename, program, event_type, version, url, local_path, attempts,
              bytes_expected, bytes_done, etag, last_modified, verify_failures, not_found_since, waiting_reason,
              source, checksum, claims";

fn claim_query<'q>(
    owner: &'q str,
    lease_until: i64,
    now: i64,
) -> sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(CLAIM).bind(owner).bind(lease_until).bind(now)
}

const PROGRESS: &str = "
    UPDATE downloads SET
        bytes_done = $3, bytes_expected = $4, etag = $5, last_modified = $6, lease_expires_at = $7,
        updated_at = $8, source = $9, fetched_from = $10, checksum = $11
    WHERE id = $1 AND lease_owner = $2 AND state = 'running' AND claims = $12";

const RENEW_LEASE: &str = "
    UPDATE downloads SET lease_expires_at = $3
    WHERE id = $1 AND lease_owner = $2 AND state = 'running' AND claims = $4";

/// The jobs of these ends ($1) that `owner` ($2) holds, locked in id order before they are written: an
/// ingest locks the jobs it plans from in id order too, so the two never wait for each other in a cycle.
const LOCK_ENDS: &str = "
    SELECT id FROM downloads WHERE id = ANY($1::bigint[]) AND lease_owner = $2 AND state = 'running'
    ORDER BY id FOR UPDATE";

/// Done ends of owner $1 at $2, from arrays of `id, bytes, verified, source, url, claim`.
const FINISH_DONE_MANY: &str = "
    UPDATE downloads SET
        state = 'done', bytes_done = j.bytes, bytes_expected = j.bytes, lease_owner = NULL,
        lease_expires_at = NULL, last_error = NULL, verify_failures = 0, not_found_since = NULL,
        finished_at = $2, updated_at = $2, verified = j.verified, waiting_reason = NULL,
        source = j.source, fetched_from = j.url
    FROM unnest($3::bigint[], $4::bigint[], $5::text[], $6::text[], $7::text[], $8::bigint[])
         AS j(id, bytes, verified, source, url, claim)
    WHERE downloads.id = j.id AND downloads.lease_owner = $1 AND downloads.state = 'running'
      AND downloads.claims = j.claim
    RETURNING downloads.id";

/// An `on_product` run at $2 for each job in $1 (the jobs just recorded done).
const QUEUE_PRODUCT_HOOKS: &str = "
    INSERT INTO hook_runs (kind, download_id, next_attempt_at, created_at, updated_at)
    SELECT 'product', id, $2, $2, $2 FROM unnest($1::bigint[]) AS t(id) ORDER BY id";

const FINISH_RETRY: &str = "
    UPDATE downloads SET
        state = 'queued', next_attempt_at = $3, last_error = $4, attempts = GREATEST(attempts - $5, 0),
        verify_failures = $6, not_found_since = $7, lease_owner = NULL, lease_expires_at = NULL,
        updated_at = $8, waiting_reason = $9
    WHERE id = $1 AND lease_owner = $2 AND state = 'running' AND claims = $10";

const FINISH_GIVE_UP: &str = "
    UPDATE downloads SET
        state = $3, last_error = $4, lease_owner = NULL, lease_expires_at = NULL, finished_at = $5,
        updated_at = $5, waiting_reason = NULL
    WHERE id = $1 AND lease_owner = $2 AND state = 'running' AND claims = $6";

/// The statement that ends an attempt of `owner` at job `id` that is not a `Done` (those go in a batch
/// with their hook runs); `None` for a `Done`.
fn finish_query<'q>(
    job: Held,
    owner: &'q str,
    finish: &'q Finish,
    now: i64,
) -> Option<sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>> {
    let id = job.id;
    match finish {
        Finish::Done { .. } => None,
        Finish::Retry {
            at,
            error,
            refund,
            verify_failures,
            not_found_since,
            waiting,
        } => Some(
            sqlx::query(FINISH_RETRY)
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
        ),
        Finish::GiveUp { state, error } => Some(
            sqlx::query(FINISH_GIVE_UP)
                .bind(id)
                .bind(owner)
                .bind(state.as_str())
                .bind(error)
                .bind(now)
                .bind(job.claim),
        ),
    }
}

/// An `on_notice` run for each notice received since $1 (not rejected) that has none, and none of whose
/// events has a job still queued or running; at $2. Two daemons doing this at once queue one run each.
const QUEUE_NOTICE_HOOKS: &str = "
    INSERT INTO hook_runs (kind, notice_id, next_attempt_at, created_at, updated_at)
    SELECT 'notice', n.id, $2, $2, $2 FROM notices AS n
    WHERE n.received_at >= $1 AND n.status != 'rejected'
      AND NOT EXISTS (SELECT 1 FROM hook_runs AS h WHERE h.kind = 'notice' AND h.notice_id = n.id)
      AND NOT EXISTS (
          SELECT 1 FROM events AS e JOIN downloads AS d ON d.id = e.download_id
          WHERE e.notice_id = n.id AND d.state IN ('queued', 'running'))
    ORDER BY n.id
    ON CONFLICT (notice_id) WHERE kind = 'notice' DO NOTHING";

/// Up to $2 runs due at $1, claimed (runs another daemon is claiming are skipped).
const CLAIM_HOOK_RUNS: &str = "
    WITH due AS (
        SELECT id FROM hook_runs WHERE state = 'pending' AND next_attempt_at <= $1
        ORDER BY next_attempt_at, id LIMIT $2
        FOR UPDATE SKIP LOCKED)
    UPDATE hook_runs SET state = 'running', attempts = attempts + 1, updated_at = $1
    WHERE id IN (SELECT id FROM due) AND state = 'pending'
    RETURNING id, kind, attempts, download_id, notice_id";

/// What an `on_product` run's environment says: the job, and the first event of its version (the
/// values as the notice wrote them are in its raw record) with its notice's name.
const PRODUCT_HOOK_ENV: &str = "
    WITH d AS (SELECT * FROM downloads WHERE id = $1),
         e AS (SELECT events.* FROM events, d WHERE events.download_id = d.id
               ORDER BY (events.archived_date = d.version) DESC, events.id LIMIT 1)
    SELECT d.local_path, d.mission, d.fileset, d.filename, d.program, d.event_type, d.version,
           e.raw, n.name
    FROM d LEFT JOIN e ON true LEFT JOIN notices AS n ON n.id = e.notice_id";

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
    FROM notices AS n WHERE n.id = $1";

const HOOK_COUNTS: &str = "
    SELECT state, count(*), coalesce(sum(failures), 0)::bigint FROM hook_runs GROUP BY state";

const HOOK_FAILURES: &str = "
    SELECT h.id, h.kind, h.state, coalesce(d.local_path, n.name, ''), h.attempts, h.last_error, h.updated_at
    FROM hook_runs AS h
    LEFT JOIN downloads AS d ON d.id = h.download_id
    LEFT JOIN notices AS n ON n.id = h.notice_id
    WHERE h.state IN ('pending', 'failed') AND h.last_error IS NOT NULL
    ORDER BY h.updated_at DESC, h.id DESC LIMIT $1";

const RUNNING_LEASES: &str =
    "SELECT id, lease_owner, lease_expires_at FROM downloads WHERE state = 'running'";

/// An orphaned attempt does not count: the worker did not fail, it vanished. Only leases still exactly
/// as judged ($1 ids, $2 owners, $3 expiries) are taken: one renewed, or a job ended and claimed again
/// (by another host) since, is left alone.
const REQUEUE_ORPHANS: &str = "
    UPDATE downloads SET
        state = 'queued', attempts = GREATEST(downloads.attempts - 1, 0), lease_owner = NULL,
        lease_expires_at = NULL, next_attempt_at = $4, updated_at = $4
    FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS o(id, owner, expires)
    WHERE downloads.id = o.id AND downloads.state = 'running'
      AND downloads.lease_owner IS NOT DISTINCT FROM o.owner
      AND downloads.lease_expires_at IS NOT DISTINCT FROM o.expires";

const RELEASE_LEASES: &str = "
    UPDATE downloads SET
        state = 'queued', attempts = GREATEST(attempts - 1, 0), lease_owner = NULL,
        lease_expires_at = NULL, next_attempt_at = $2, updated_at = $2
    WHERE state = 'running' AND lease_owner = $1";

const NEXT_DUE: &str = "SELECT min(next_attempt_at) FROM downloads WHERE state = 'queued'";

const DUE_NOW_BEYOND: &str = "
    UPDATE downloads SET next_attempt_at = $1, updated_at = $1
    WHERE state = 'queued' AND next_attempt_at > $1 + $2";

const RETRY_IDS: &str = "
    UPDATE downloads SET
        state = 'queued', attempts = 0, next_attempt_at = $2, last_error = NULL, verify_failures = 0,
        not_found_since = NULL, updated_at = $2, waiting_reason = NULL
    WHERE id = ANY($1::bigint[]) AND state IN ('queued', 'failed', 'needs_auth')";

const RETRY_ALL_FAILED: &str = "
    UPDATE downloads SET
        state = 'queued', attempts = 0, next_attempt_at = $1, last_error = NULL, verify_failures = 0,
        not_found_since = NULL, updated_at = $1
    WHERE state IN ('failed', 'needs_auth')";

const REDO: &str = "
    UPDATE downloads SET
        state = 'queued', attempts = 0, next_attempt_at = $2, last_error = NULL,
        verify_failures = 0, not_found_since = NULL, bytes_done = 0, finished_at = NULL,
        updated_at = $2
    WHERE id = ANY($1::bigint[]) AND state = 'done'";

const REQUEUE_NEEDS_AUTH: &str = "
    UPDATE downloads SET state = 'queued', attempts = 0, next_attempt_at = $1, last_error = NULL, updated_at = $1
    WHERE state = 'needs_auth'";

const VERSION_ON_DISK: &str = "
    SELECT version FROM downloads WHERE product = $1 AND state = 'done' AND id != $2 ORDER BY id DESC LIMIT 1";

const NOTICES_TO_SUMMARIZE: &str = "
    SELECT n.id, n.name, n.source_kind, n.received_at FROM notices AS n
    WHERE n.summarized_at IS NULL AND n.received_at >= $1
      AND NOT EXISTS (
          SELECT 1 FROM events AS e JOIN downloads AS d ON d.id = e.download_id
          WHERE e.notice_id = n.id AND d.state IN ('queued', 'running'))
    ORDER BY n.id LIMIT 100";

const NOTICE_DIGEST: &str = "
    SELECT e.event_type, e.program, lower(e.mission) || '/' || e.fileset || '/' || e.filename,
           d.state, d.bytes_done, d.last_error
    FROM events AS e LEFT JOIN downloads AS d ON d.id = e.download_id
    WHERE e.notice_id = $1 ORDER BY e.record_index";

/// What the path look-up said of the URIs in $1.
const CLOUD_PATHS: &str =
    "SELECT uri, key, looked_up_at FROM cloud_paths WHERE uri = ANY($1::text[])";

/// Look-up answers from arrays of URIs ($1) and keys or NULL ($2), made at $3.
const RECORD_CLOUD_PATHS: &str = "
    INSERT INTO cloud_paths (uri, key, looked_up_at)
    SELECT uri, key, $3 FROM unnest($1::text[], $2::text[]) AS p(uri, key)
    ON CONFLICT (uri) DO UPDATE SET key = excluded.key, looked_up_at = excluded.looked_up_at";

/// The next $1 queued jobs.
const UPCOMING: &str = "
    SELECT mission, filename, url, event_type FROM downloads
    WHERE state = 'queued' ORDER BY next_attempt_at, id LIMIT $1";

/// An event of a notice with its job: type, program, local path, state, bytes, error.
type DigestRow = (
    String,
    i64,
    String,
    Option<String>,
    Option<i64>,
    Option<String>,
);

/// A source's health as `SOURCE_HEALTH` reads it.
type HealthRow = (
    String,
    String,
    Option<String>,
    bool,
    Option<i64>,
    Option<String>,
    Option<i64>,
    i64,
    i64,
);

/// Inserts a mail into the outbox, due at once.
async fn insert_mail(
    tx: &mut sqlx::Transaction<'_, Postgres>,
    m: &NewMail,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO outbox (kind, cause, subject, body, created_at, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, $5)",
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

#[async_trait]
impl Store for PgStore {
    async fn ingest_notice(
        &self,
        notice: &NoticeMeta,
        events: &[Event],
        categorizer: &Categorizer,
    ) -> Result<IngestOutcome, StoreError> {
        let err = self.query_err();
        // Committed durably (synchronous_commit): the source moves the notice away after this returns.
        // Dropped on an error: rolled back, the lock with it.
        let mut tx = self.pool.begin().await.map_err(&err)?;
        let outcome = self.ingest_in(&mut tx, notice, events, categorizer).await?;
        tx.commit().await.map_err(&err)?;
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
        snap.by_event_type = EventType::KNOWN
            .into_iter()
            .map(|t| (t, DownloadState::ALL.into_iter().map(|s| (s, 0)).collect()))
            .collect();
        // One snapshot for every figure, so the counts agree with each other.
        let mut tx = self.pool.begin().await.map_err(&err)?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        let mut delta_rows = 0;
        let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(DOWNLOAD_COUNTS)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        let mut by_state: HashMap<DownloadState, i64> = HashMap::new();
        let mut bytes_done = 0;
        for (t, state, n, bytes, summed) in rows {
            delta_rows += summed;
            let Some(state) = DownloadState::parse(&state) else {
                continue;
            };
            *by_state.entry(state).or_default() += n;
            if state == DownloadState::Done {
                bytes_done += bytes;
            }
            if n > 0
                && let Some(t) = EventType::parse(&t)
            {
                snap.by_event_type
                    .entry(t)
                    .or_default()
                    .insert(state, n as u64);
            }
        }
        for (state, n) in by_state {
            snap.downloads.insert(state, n.max(0) as u64);
        }
        snap.bytes_done = bytes_done.max(0) as u64;
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(EVENT_COUNTS)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        for (t, n, summed) in rows {
            delta_rows += summed;
            if n > 0
                && let Some(t) = EventType::parse(&t)
            {
                snap.events.insert(t, n as u64);
            }
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(NOTICES_BY_STATUS)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        for (s, n) in rows {
            if let Some(s) = NoticeStatus::ALL.into_iter().find(|x| x.as_str() == s) {
                snap.notices.insert(s, n as u64);
            }
        }
        let failures = sqlx::query(RECENT_FAILURES)
            .bind(recent_failures as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        let health: Vec<HealthRow> = sqlx::query_as(SOURCE_HEALTH)
            .fetch_all(&mut *tx)
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
                )| SourceHealth {
                    source,
                    state,
                    detail,
                    connected,
                    last_contact,
                    last_error,
                    last_error_at,
                    taken: taken as u64,
                    updated_at,
                },
            )
            .collect();
        snap.daemon = sqlx::query_as::<_, (i64, i64, f64, i64)>(
            "SELECT pid, started_at, rate, updated_at FROM daemon_state WHERE id = 1",
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(&err)?
        .map(DaemonState::from);
        let (waiting, waiting_reason, oldest_queued_at): (i64, Option<String>, Option<i64>) =
            sqlx::query_as(QUEUE_FIGURES)
                .fetch_one(&mut *tx)
                .await
                .map_err(&err)?;
        snap.waiting = waiting as u64;
        snap.waiting_reason = waiting_reason;
        snap.oldest_queued_at = oldest_queued_at;
        snap.last_notice_at = sqlx::query_scalar("SELECT max(last_seen_at) FROM notices")
            .fetch_one(&mut *tx)
            .await
            .map_err(&err)?;
        let running = sqlx::query(RUNNING_JOBS)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        snap.recent_notices = sqlx::query_as::<_, NoticeTuple>(RECENT_NOTICES)
            .bind(recent_failures as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?
            .into_iter()
            .map(NoticeRow::from)
            .collect();
        let counts: Vec<(String, i64, i64)> = sqlx::query_as(HOOK_COUNTS)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?;
        counts.into_iter().for_each(|row| snap.hooks.count(row));
        snap.hooks.recent_failures = sqlx::query_as::<_, HookFailureTuple>(HOOK_FAILURES)
            .bind(recent_failures as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(&err)?
            .into_iter()
            .map(HookFailure::from)
            .collect();
        snap.members = self.members_on(&mut tx, now_ms()).await?;
        tx.commit().await.map_err(&err)?;
        snap.running = running
            .iter()
            .map(|r| self.download_row(r))
            .collect::<Result<_, _>>()?;
        snap.recent_failures = failures
            .iter()
            .map(|r| self.download_row(r))
            .collect::<Result<_, _>>()?;
        if delta_rows > FOLD_AT
            && !self.read_only
            && let Err(e) = self.fold_counts().await
        {
            // The counts read are right all the same; the next status folds.
            tracing::warn!("cannot fold the status counts: {e}");
        }
        Ok(snap)
    }

    async fn list_downloads(
        &self,
        state: Option<DownloadState>,
    ) -> Result<Vec<DownloadRow>, StoreError> {
        let rows = sqlx::query(LIST_DOWNLOADS)
            .bind(state.map(DownloadState::as_str))
            .fetch_all(&self.pool)
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
        let mut conn = self.pool.acquire().await.map_err(self.query_err())?;
        self.claim_on(&mut conn, false, owner, lease_until, now)
            .await
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
            .execute(&self.pool)
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
            .execute(&self.pool)
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
        let ids: Vec<i64> = jobs.iter().map(|j| j.id).collect();
        let claims: Vec<i64> = jobs.iter().map(|j| j.claim).collect();
        let held: Vec<(i64, i64)> = sqlx::query_as(
            "UPDATE downloads SET lease_expires_at = $4
             FROM unnest($2::bigint[], $3::bigint[]) AS h(id, claim)
             WHERE downloads.id = h.id AND downloads.claims = h.claim AND downloads.lease_owner = $1
               AND downloads.state = 'running'
             RETURNING downloads.id, downloads.claims",
        )
        .bind(owner)
        .bind(&ids)
        .bind(&claims)
        .bind(lease_until)
        .fetch_all(&self.pool)
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
        match finish_query(job, owner, finish, now) {
            Some(query) => {
                let done = query.execute(&self.pool).await.map_err(self.query_err())?;
                Ok(done.rows_affected() == 1)
            }
            // With its hook run, if one is queued: the same transaction.
            None => {
                let (recorded, _) = self
                    .end_and_claim(owner, &[(job, finish.clone())], 0, now, now)
                    .await?;
                Ok(recorded.first().copied().unwrap_or(false))
            }
        }
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
        // One transaction (rolled back if dropped on an error): the ends, the hook runs of the done ones,
        // and the claims.
        let mut tx = self.pool.begin().await.map_err(&err)?;
        let mut ended = HashSet::new();
        if !ends.is_empty() {
            let ids: Vec<i64> = ends.iter().map(|(job, _)| job.id).collect();
            sqlx::query(LOCK_ENDS)
                .bind(&ids)
                .bind(owner)
                .execute(&mut *tx)
                .await
                .map_err(&err)?;
        }
        let mut done_ids = Vec::new();
        let mut bytes = Vec::new();
        let mut verified = Vec::new();
        let mut sources = Vec::new();
        let mut urls = Vec::new();
        let mut claims_of = Vec::new();
        for (job, finish) in ends {
            match finish_query(*job, owner, finish, now) {
                Some(query) => {
                    if query.execute(&mut *tx).await.map_err(&err)?.rows_affected() == 1 {
                        ended.insert(job.id);
                    }
                }
                None => {
                    if let Finish::Done {
                        bytes: b,
                        verified: v,
                        origin,
                    } = finish
                    {
                        done_ids.push(job.id);
                        claims_of.push(job.claim);
                        bytes.push(*b);
                        verified.push(v.as_str());
                        sources.push(origin.as_ref().map(|o| o.source.as_str()));
                        urls.push(origin.as_ref().map(|o| o.url.as_str()));
                    }
                }
            }
        }
        if !done_ids.is_empty() {
            let recorded: Vec<i64> = sqlx::query_scalar(FINISH_DONE_MANY)
                .bind(owner)
                .bind(now)
                .bind(&done_ids)
                .bind(&bytes)
                .bind(&verified)
                .bind(&sources)
                .bind(&urls)
                .bind(&claims_of)
                .fetch_all(&mut *tx)
                .await
                .map_err(&err)?;
            if self.product_hooks.load(Ordering::Relaxed) && !recorded.is_empty() {
                sqlx::query(QUEUE_PRODUCT_HOOKS)
                    .bind(&recorded)
                    .bind(now)
                    .execute(&mut *tx)
                    .await
                    .map_err(&err)?;
            }
            ended.extend(recorded);
        }
        let mut jobs = Vec::new();
        while jobs.len() < claims {
            match self
                .claim_on(&mut tx, true, owner, lease_until, now)
                .await?
            {
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        tx.commit().await.map_err(&err)?;
        Ok((
            ends.iter()
                .map(|(job, _)| ended.contains(&job.id))
                .collect(),
            jobs,
        ))
    }

    async fn requeue_orphans(
        &self,
        now: i64,
        orphaned: &(dyn for<'a> Fn(&'a str, i64) -> bool + Send + Sync),
    ) -> Result<u64, StoreError> {
        let err = self.query_err();
        let running: Vec<(i64, Option<String>, Option<i64>)> = sqlx::query_as(RUNNING_LEASES)
            .fetch_all(&self.pool)
            .await
            .map_err(&err)?;
        let orphans: Vec<_> = running
            .into_iter()
            .filter(|(_, owner, expires)| {
                orphaned(owner.as_deref().unwrap_or(""), expires.unwrap_or(0))
            })
            .collect();
        if orphans.is_empty() {
            return Ok(0);
        }
        let done = sqlx::query(REQUEUE_ORPHANS)
            .bind(orphans.iter().map(|o| o.0).collect::<Vec<_>>())
            .bind(orphans.iter().map(|o| o.1.as_deref()).collect::<Vec<_>>())
            .bind(orphans.iter().map(|o| o.2).collect::<Vec<_>>())
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(&err)?;
        Ok(done.rows_affected())
    }

    async fn release_leases(&self, owner: &str, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(RELEASE_LEASES)
            .bind(owner)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn next_due(&self) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar(NEXT_DUE)
            .fetch_one(&self.pool)
            .await
            .map_err(self.query_err())
    }

    async fn due_now_beyond(&self, now: i64, horizon: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(DUE_NOW_BEYOND)
            .bind(now)
            .bind(horizon)
            .execute(&self.pool)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn check_identity(&self) -> Result<(), StoreError> {
        // A server's database has no file that could be moved or replaced under the daemon.
        Ok(())
    }

    async fn retry(&self, ids: Option<&[i64]>, now: i64) -> Result<u64, StoreError> {
        let query = match ids {
            Some(ids) => sqlx::query(RETRY_IDS).bind(ids).bind(now),
            None => sqlx::query(RETRY_ALL_FAILED).bind(now),
        };
        let done = query.execute(&self.pool).await.map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn redo(&self, ids: &[i64], now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(REDO)
            .bind(ids)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn requeue_needs_auth(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(REQUEUE_NEEDS_AUTH)
            .bind(now)
            .execute(&self.pool)
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
            .fetch_optional(&self.pool)
            .await
            .map_err(self.query_err())
    }

    async fn imap_position(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<Option<(u32, u32)>, StoreError> {
        let row: Option<(i64, i64)> = sqlx::query_as(
            "SELECT uidvalidity, last_uid FROM imap_mailboxes WHERE account = $1 AND mailbox = $2",
        )
        .bind(account)
        .bind(mailbox)
        .fetch_optional(&self.pool)
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
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (account, mailbox) DO UPDATE SET
                 uidvalidity = excluded.uidvalidity, last_uid = excluded.last_uid,
                 updated_at = excluded.updated_at",
        )
        .bind(account)
        .bind(mailbox)
        .bind(i64::from(uidvalidity))
        .bind(i64::from(last_uid))
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn mail_watermarks(&self, now: i64) -> Result<(i64, i64), StoreError> {
        let err = self.query_err();
        sqlx::query(
            "INSERT INTO mailer_state (id, enabled_since, alerts_until) VALUES (1, $1, $1)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(&err)?;
        sqlx::query_as("SELECT enabled_since, alerts_until FROM mailer_state WHERE id = 1")
            .fetch_one(&self.pool)
            .await
            .map_err(&err)
    }

    async fn notices_to_summarize(&self, since: i64) -> Result<Vec<NoticeDigest>, StoreError> {
        let err = self.query_err();
        let notices: Vec<(i64, String, String, i64)> = sqlx::query_as(NOTICES_TO_SUMMARIZE)
            .bind(since)
            .fetch_all(&self.pool)
            .await
            .map_err(&err)?;
        let mut out = Vec::with_capacity(notices.len());
        for (notice_id, name, source_kind, received_at) in notices {
            let rows: Vec<DigestRow> = sqlx::query_as(NOTICE_DIGEST)
                .bind(notice_id)
                .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(&err)?;
        // Marked first, and only if no one marked it (two mailers at a hand-over): the mail is queued
        // once.
        let marked = sqlx::query(
            "UPDATE notices SET summarized_at = $2 WHERE id = $1 AND summarized_at IS NULL",
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
            .fetch_all(&self.pool)
            .await
            .map_err(self.query_err())?;
        rows.iter().map(|r| self.download_row(r)).collect()
    }

    async fn last_alert(&self, cause: &str) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar("SELECT max(created_at) FROM outbox WHERE kind = 'alert' AND cause = $1")
            .bind(cause)
            .fetch_one(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(&err)?;
        for m in mails {
            insert_mail(&mut tx, m, now).await.map_err(&err)?;
        }
        sqlx::query(
            "UPDATE mailer_state SET alerts_until = GREATEST(alerts_until, $1) WHERE id = 1",
        )
        .bind(until)
        .execute(&mut *tx)
        .await
        .map_err(&err)?;
        tx.commit().await.map_err(&err)
    }

    async fn due_mail(&self, now: i64) -> Result<Vec<OutMail>, StoreError> {
        // Rows another mailer is claiming are skipped, not waited for.
        let mut rows: Vec<(i64, String, String, i64)> = sqlx::query_as(
            "WITH due AS (
                 SELECT id FROM outbox WHERE sent_at IS NULL AND next_attempt_at <= $1
                 ORDER BY id LIMIT 50 FOR UPDATE SKIP LOCKED)
             UPDATE outbox SET next_attempt_at = $2 FROM due WHERE outbox.id = due.id
             RETURNING outbox.id, outbox.subject, outbox.body, outbox.attempts",
        )
        .bind(now)
        .bind(now.saturating_add(super::MAIL_CLAIM_MS))
        .fetch_all(&self.pool)
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
            "UPDATE outbox SET sent_at = $2, attempts = attempts + 1, last_error = NULL WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn mail_failed(&self, id: i64, error: &str, next_at: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3
             WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(next_at)
        .execute(&self.pool)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn record_daemon_state(&self, d: &DaemonState) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO daemon_state (id, pid, started_at, rate, updated_at) VALUES (1, $1, $2, $3, $4)
             ON CONFLICT (id) DO UPDATE SET pid = excluded.pid, started_at = excluded.started_at,
                 rate = excluded.rate, updated_at = excluded.updated_at",
        )
        .bind(d.pid)
        .bind(d.started_at)
        .bind(d.rate)
        .bind(d.updated_at)
        .execute(&self.pool)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn record_source_health(&self, h: &SourceHealth) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO source_health (source, state, detail, connected, last_contact, last_error,
                                        last_error_at, taken, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (source) DO UPDATE SET
                 state = excluded.state, detail = excluded.detail, connected = excluded.connected,
                 last_contact = coalesce(excluded.last_contact, source_health.last_contact),
                 last_error = coalesce(excluded.last_error, source_health.last_error),
                 last_error_at = coalesce(excluded.last_error_at, source_health.last_error_at),
                 taken = source_health.taken + excluded.taken, updated_at = excluded.updated_at",
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
        .execute(&self.pool)
        .await
        .map_err(self.query_err())?;
        Ok(())
    }

    async fn due_now_waiting(&self, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE downloads SET next_attempt_at = $1
             WHERE state = 'queued' AND waiting_reason IS NOT NULL AND next_attempt_at > $1",
        )
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    fn queue_product_hooks(&self, on: bool) {
        self.product_hooks.store(on, Ordering::Relaxed);
    }

    async fn notice_hooks_since(&self, on: bool, now: i64) -> Result<Option<i64>, StoreError> {
        let err = self.query_err();
        if !on {
            sqlx::query("DELETE FROM hook_state")
                .execute(&self.pool)
                .await
                .map_err(&err)?;
            return Ok(None);
        }
        sqlx::query(
            "INSERT INTO hook_state (id, notices_since) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        )
        .bind(now)
        .execute(&self.pool)
        .await
        .map_err(&err)?;
        sqlx::query_scalar("SELECT notices_since FROM hook_state WHERE id = 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(&err)
    }

    async fn queue_notice_hooks(&self, since: i64, now: i64) -> Result<u64, StoreError> {
        let done = sqlx::query(QUEUE_NOTICE_HOOKS)
            .bind(since)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn claim_hook_runs(&self, n: usize, now: i64) -> Result<Vec<HookRun>, StoreError> {
        let err = self.query_err();
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut claimed: Vec<(i64, String, i64, Option<i64>, Option<i64>)> =
            sqlx::query_as(CLAIM_HOOK_RUNS)
                .bind(now)
                .bind(i64::try_from(n).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await
                .map_err(&err)?;
        claimed.sort_unstable_by_key(|c| c.0);
        let ids: Vec<i64> = claimed.iter().map(|c| c.0).collect();
        let mut runs = Vec::with_capacity(claimed.len());
        for (id, kind, attempt, download, notice) in claimed {
            match self.hook_run(id, &kind, attempt, download, notice).await {
                Ok(Some(run)) => runs.push(run),
                Ok(None) => {
                    // Its product or notice is gone (a database edited by hand): nothing to run.
                    sqlx::query(
                        "UPDATE hook_runs SET state = 'failed', last_error = 'its product or notice is no \
                         longer recorded', finished_at = $2, updated_at = $2 WHERE id = $1",
                    )
                    .bind(id)
                    .bind(now)
                    .execute(&self.pool)
                    .await
                    .map_err(&err)?;
                }
                Err(e) => {
                    // None of this claim is left running: all pending again, a minute later, this
                    // attempt not counted.
                    let _ = sqlx::query(
                        "UPDATE hook_runs SET state = 'pending', attempts = GREATEST(attempts - 1, 0),
                             next_attempt_at = $2, updated_at = $2
                         WHERE id = ANY($1::bigint[]) AND state = 'running'",
                    )
                    .bind(&ids)
                    .bind(now + 60_000)
                    .execute(&self.pool)
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
                "UPDATE hook_runs SET state = 'done', last_error = NULL, finished_at = $2, updated_at = $2
                 WHERE id = $1 AND state = 'running'",
            )
            .bind(id)
            .bind(now),
            HookEnd::Retry { at, error } => sqlx::query(
                "UPDATE hook_runs SET state = 'pending', next_attempt_at = $3, last_error = $4,
                     failures = failures + 1, updated_at = $2
                 WHERE id = $1 AND state = 'running'",
            )
            .bind(id)
            .bind(now)
            .bind(at)
            .bind(error),
            HookEnd::Failed { error } => sqlx::query(
                "UPDATE hook_runs SET state = 'failed', last_error = $3, failures = failures + 1,
                     finished_at = $2, updated_at = $2
                 WHERE id = $1 AND state = 'running'",
            )
            .bind(id)
            .bind(now)
            .bind(error),
            HookEnd::Interrupted => sqlx::query(
                "UPDATE hook_runs SET state = 'pending', attempts = GREATEST(attempts - 1, 0),
                     next_attempt_at = LEAST(next_attempt_at, $2), updated_at = $2
                 WHERE id = $1 AND state = 'running'",
            )
            .bind(id)
            .bind(now),
        };
        q.execute(&self.pool).await.map_err(self.query_err())?;
        Ok(())
    }

    async fn requeue_hook_runs(&self, now: i64, refund: bool) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "UPDATE hook_runs SET state = 'pending', attempts = GREATEST(attempts - $2, 0),
                 next_attempt_at = LEAST(next_attempt_at, $1),
                 updated_at = $1
             WHERE state = 'running'",
        )
        .bind(now)
        .bind(i64::from(refund))
        .execute(&self.pool)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected())
    }

    async fn next_hook_due(&self) -> Result<Option<i64>, StoreError> {
        sqlx::query_scalar("SELECT min(next_attempt_at) FROM hook_runs WHERE state = 'pending'")
            .fetch_one(&self.pool)
            .await
            .map_err(self.query_err())
    }

    async fn cloud_paths(&self, uris: &[String]) -> Result<HashMap<String, CloudPath>, StoreError> {
        let rows: Vec<(String, Option<String>, i64)> = sqlx::query_as(CLOUD_PATHS)
            .bind(uris)
            .fetch_all(&self.pool)
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
        // The last answer for a URI wins, as a row after row insert would have it (one statement cannot
        // update a row twice).
        let mut last: HashMap<&str, Option<&str>> = HashMap::with_capacity(paths.len());
        let mut order = Vec::with_capacity(paths.len());
        for (uri, key) in paths {
            if last.insert(uri.as_str(), key.as_deref()).is_none() {
                order.push(uri.as_str());
            }
        }
        let keys: Vec<Option<&str>> = order.iter().map(|u| last[u]).collect();
        sqlx::query(RECORD_CLOUD_PATHS)
            .bind(&order)
            .bind(&keys)
            .bind(now)
            .execute(&self.pool)
            .await
            .map_err(self.query_err())?;
        Ok(())
    }

    async fn upcoming(&self, n: usize) -> Result<Vec<Upcoming>, StoreError> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(UPCOMING)
            .bind(i64::try_from(n).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await.map_err(&err)?;
        // Joins take turns (two processes joining under one new name would both find no row).
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MEMBERS_LOCK)
            .execute(&mut *tx)
            .await
            .map_err(&err)?;
        let row: Option<(String, String, i64, i64, i64, i64, f64, Option<i64>)> = sqlx::query_as(
            "SELECT node, owner, pid, started_at, heartbeat_at, clock_skew, rate, stopped_at
             FROM members WHERE node = $1",
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
            sqlx::query("DELETE FROM leaders WHERE owner = $1 AND owner <> $2")
                .bind(owner)
                .bind(&me.owner)
                .execute(&mut *tx)
                .await
                .map_err(&err)?;
        }
        sqlx::query(&format!(
            "INSERT INTO members (node, owner, pid, started_at, heartbeat_at, clock_skew, rate)
             VALUES ($1, $2, $3, $4, $5, $5 - {DB_NOW_MS}, $6)
             ON CONFLICT (node) DO UPDATE SET owner = excluded.owner, pid = excluded.pid,
                 started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at,
                 clock_skew = excluded.clock_skew, rate = excluded.rate, stopped_at = NULL"
        ))
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
        let done = sqlx::query(&format!(
            "INSERT INTO members (node, owner, pid, started_at, heartbeat_at, clock_skew, rate)
             VALUES ($1, $2, $5, $6, $3, $3 - {DB_NOW_MS}, $4)
             ON CONFLICT (node) DO UPDATE SET heartbeat_at = excluded.heartbeat_at,
                 clock_skew = excluded.clock_skew, rate = excluded.rate, pid = excluded.pid
             WHERE members.owner = excluded.owner"
        ))
        .bind(&me.node)
        .bind(&me.owner)
        .bind(me.now)
        .bind(me.rate)
        .bind(me.pid)
        .bind(me.started_at)
        .execute(&self.pool)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected() == 1)
    }

    async fn leave_member(&self, node: &str, owner: &str, now: i64) -> Result<(), StoreError> {
        let err = self.query_err();
        let mut tx = self.pool.begin().await.map_err(&err)?;
        sqlx::query(
            "UPDATE members SET stopped_at = $3, heartbeat_at = $3, rate = 0
             WHERE node = $1 AND owner = $2",
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
        // Two members asking at once for a free role: one inserts, the other's conflict waits for it and
        // then finds a live lease of another owner, and changes nothing.
        let done = sqlx::query(
            "INSERT INTO leaders (role, node, owner, since, expires_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (role) DO UPDATE SET node = excluded.node, owner = excluded.owner,
                 since = CASE WHEN leaders.owner = excluded.owner THEN leaders.since ELSE excluded.since END,
                 expires_at = excluded.expires_at
             WHERE leaders.owner = excluded.owner OR leaders.expires_at <= $4",
        )
        .bind(role)
        .bind(node)
        .bind(owner)
        .bind(now)
        .bind(until)
        .execute(&self.pool)
        .await
        .map_err(self.query_err())?;
        Ok(done.rows_affected() == 1)
    }

    async fn resign(&self, role: &str, owner: &str) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM leaders WHERE role = $1 AND owner = $2")
            .bind(role)
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(self.query_err())?;
        Ok(())
    }

    async fn members(&self, now: i64) -> Result<Vec<Member>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(self.query_err())?;
        let members = self.members_on(&mut tx, now).await?;
        tx.commit().await.map_err(self.query_err())?;
        Ok(members)
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
