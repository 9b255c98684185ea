//! The store: the only shared state of mastsub, behind one narrow trait.
//!
//! Sources only insert (through [`Store::ingest_notice`]); workers only claim and update jobs; the CLI only
//! reads. Every backend implements [`Store`] and runs the same contract tests (`tests/store_contract.rs`):
//! SQLite (`sqlite.rs`), one file that one daemon writes, and PostgreSQL (`postgres.rs`), one database that
//! several daemons on several hosts share. Each has its own migrations (`migrations/sqlite/`,
//! `migrations/postgres/`). All SQL lives in the backend modules.

mod guard;
mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::categorize::Categorizer;
use crate::notice::{Event, EventType};

pub use guard::{RunLock, RunLockError, run_lock_path};
pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// A download job's state: `queued → running → done | failed | needs_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DownloadState {
    /// Waiting for a worker (or for its next attempt time).
    Queued,
    /// Held by a worker under a lease.
    Running,
    /// On disk, verified.
    Done,
    /// Gave up; `last_error` says why. `retry` or a new event re-queues it.
    Failed,
    /// MAST wants a token; a token or a Public event re-queues it.
    NeedsAuth,
}

impl DownloadState {
    /// All states, in report order.
    pub const ALL: [DownloadState; 5] = [
        DownloadState::Queued,
        DownloadState::Running,
        DownloadState::Done,
        DownloadState::Failed,
        DownloadState::NeedsAuth,
    ];

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DownloadState::Queued => "queued",
            DownloadState::Running => "running",
            DownloadState::Done => "done",
            DownloadState::Failed => "failed",
            DownloadState::NeedsAuth => "needs_auth",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<DownloadState> {
        DownloadState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for DownloadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a notice came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// The watched inbox folder.
    Inbox,
    /// `mastsub ingest`.
    Cli,
    /// The IMAP mailbox.
    Imap,
    /// `mastsub download`.
    Download,
}

impl SourceKind {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Inbox => "inbox",
            SourceKind::Cli => "cli",
            SourceKind::Imap => "imap",
            SourceKind::Download => "download",
        }
    }
}

/// How much of a notice was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeStatus {
    /// Every record.
    Accepted,
    /// Some records; the others were refused.
    Partial,
    /// None: the file as a whole, or every record, was refused.
    Rejected,
}

impl NoticeStatus {
    /// All, in report order.
    pub const ALL: [NoticeStatus; 3] = [
        NoticeStatus::Accepted,
        NoticeStatus::Partial,
        NoticeStatus::Rejected,
    ];

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeStatus::Accepted => "accepted",
            NoticeStatus::Partial => "partial",
            NoticeStatus::Rejected => "rejected",
        }
    }
}

/// What is known of a notice before its events are recorded.
#[derive(Debug, Clone)]
pub struct NoticeMeta {
    /// Hex SHA-256 of its bytes.
    pub sha256: String,
    /// Its source.
    pub source_kind: SourceKind,
    /// A path, or a mail's Message-ID and UID.
    pub source_ref: String,
    /// The file or attachment name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Records in the array.
    pub records: usize,
    /// How much was accepted.
    pub status: NoticeStatus,
    /// Why anything was refused.
    pub error: Option<String>,
}

/// What recording a notice did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct IngestOutcome {
    /// The notice's row.
    pub notice_id: i64,
    /// The same content was recorded before.
    pub seen_before: bool,
    /// Events recorded now, by type.
    pub recorded: BTreeMap<EventType, usize>,
    /// Events skipped because their `event_id` was recorded already (or repeated in the notice).
    pub already_recorded: usize,
    /// New download jobs.
    pub queued: usize,
    /// Events that joined a pending job.
    pub joined: usize,
    /// Failed or `needs_auth` jobs queued again.
    pub requeued: usize,
    /// Events whose product version is already on disk.
    pub already_done: usize,
    /// Events kept without a download (`[events]` policy `record`).
    pub record_only: usize,
    /// Events whose `event_id` was recorded before with other content: recorded (and queued) all the
    /// same, and reported.
    pub conflicts: Vec<EventConflict>,
}

/// An `event_id` seen again with other content (another product, type or date).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EventConflict {
    /// The id.
    pub event_id: String,
    /// The record (from 1) of this notice that holds it now.
    pub record: usize,
    /// What it named now: "jwst/jw1/a.fits, Public, 2026-03-30T17:53:19.6950000".
    pub now: String,
    /// Where and what it was before: "notice n.json, record 2: jwst/jw1/b.fits, New, …".
    pub earlier: String,
}

impl IngestOutcome {
    /// Events recorded now.
    pub fn recorded_total(&self) -> usize {
        self.recorded.values().sum()
    }
}

/// One download job as reports show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DownloadRow {
    /// Its id (what `retry` takes).
    pub id: i64,
    /// `<mission lowercase>/<fileset>/<filename>` (`product::product_key` of the events it serves).
    pub product: String,
    /// Mission as given.
    pub mission: String,
    /// File set.
    pub fileset: String,
    /// File.
    pub filename: String,
    /// Program.
    pub program: i64,
    /// The event type that queued it.
    pub event_type: String,
    /// The archived date it serves.
    pub version: String,
    /// Where from.
    pub url: String,
    /// Where to, relative to `storage.downloads`.
    pub local_path: String,
    /// Its state.
    pub state: DownloadState,
    /// Attempts made.
    pub attempts: i64,
    /// Bytes announced by the server, once known.
    pub bytes_expected: Option<i64>,
    /// Bytes on disk.
    pub bytes_done: i64,
    /// The last error, if any.
    pub last_error: Option<String>,
    /// For a done job, what its content was verified by ("FITS: 3 HDUs, structure and …").
    pub verified: Option<String>,
    /// Why a queued job waits beyond its time (no room on the disk for it), if it does.
    pub waiting_reason: Option<String>,
    /// Where its bytes came from; for a done job, those of the published file.
    pub source: Option<Provenance>,
    /// The URL they came from (MAST's, or the bucket object's).
    pub fetched_from: Option<String>,
    /// Last change, ms since the epoch.
    pub updated_at: i64,
}

/// Counts for `status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatusSnapshot {
    /// Jobs by state (every state present, zero included).
    pub downloads: BTreeMap<DownloadState, u64>,
    /// Events by type (every type present).
    pub events: BTreeMap<EventType, u64>,
    /// Notices by status (every status present).
    pub notices: BTreeMap<NoticeStatus, u64>,
    /// Bytes of finished downloads.
    pub bytes_done: u64,
    /// The latest failed or `needs_auth` jobs, newest first.
    pub recent_failures: Vec<DownloadRow>,
    /// The health of each source that has reported it.
    pub sources: Vec<SourceHealth>,
    /// Jobs by event type, then state (every type and state present).
    pub by_event_type: BTreeMap<EventType, BTreeMap<DownloadState, u64>>,
    /// What the last running daemon said about itself, if one ever ran.
    pub daemon: Option<DaemonState>,
    /// Queued jobs waiting for room on the disk (`download.min_free_space`).
    pub waiting: u64,
    /// The latest reason one of them gave.
    pub waiting_reason: Option<String>,
    /// When the oldest queued job was created (ms since the epoch), if any is queued.
    pub oldest_queued_at: Option<i64>,
    /// When a notice was last received (a new one, or one seen again), ms since the epoch.
    pub last_notice_at: Option<i64>,
    /// The running jobs, with their progress.
    pub running: Vec<DownloadRow>,
    /// The latest notices, newest first.
    pub recent_notices: Vec<NoticeRow>,
    /// The hook runs.
    pub hooks: HookCounts,
    /// The members of the cluster (one, on a single host), by node.
    pub members: Vec<Member>,
}

/// A notice as reports show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NoticeRow {
    /// Its id.
    pub id: i64,
    /// Its file or attachment name.
    pub name: String,
    /// `inbox`, `imap`, `cli` or `download`.
    pub source_kind: String,
    /// When it was first received, ms since the epoch.
    pub received_at: i64,
    /// `accepted`, `partial` or `rejected`.
    pub status: String,
    /// Records in it.
    pub records: i64,
    /// Events recorded from it.
    pub events_recorded: i64,
    /// Why a part or the whole was refused.
    pub error: Option<String>,
}

/// A notice whose downloads have all ended, for its summary mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoticeDigest {
    /// The notice's id.
    pub notice_id: i64,
    /// Its file or attachment name.
    pub name: String,
    /// Where it came from (`inbox`, `imap`, `cli`).
    pub source_kind: String,
    /// When it was received, ms since the epoch.
    pub received_at: i64,
    /// Its events with their jobs (the job is `None` for events recorded only).
    pub items: Vec<DigestItem>,
}

/// One event of a [`NoticeDigest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestItem {
    /// `New`, `Reprocessed` or `Public`.
    pub event_type: String,
    /// The program.
    pub program: i64,
    /// `<mission>/<fileset>/<filename>`.
    pub local_path: String,
    /// The job's end state, if the event has a job.
    pub state: Option<DownloadState>,
    /// Bytes on disk.
    pub bytes: i64,
    /// The job's last error.
    pub error: Option<String>,
}

/// A mail to queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMail {
    /// `summary` or `alert`.
    pub kind: &'static str,
    /// For alerts: the cause, one mail per cause per `email.alert_every`.
    pub cause: Option<String>,
    /// The subject.
    pub subject: String,
    /// The plain-text body.
    pub body: String,
}

/// A queued mail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMail {
    /// Its id.
    pub id: i64,
    /// The subject.
    pub subject: String,
    /// The body.
    pub body: String,
    /// Tries so far.
    pub attempts: i64,
}

/// A running daemon's own figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DaemonState {
    /// Its process id.
    pub pid: i64,
    /// When it started, ms since the epoch.
    pub started_at: i64,
    /// Bytes per second received lately.
    pub rate: f64,
    /// When it last wrote this, ms since the epoch (a stale time: it is not running).
    pub updated_at: i64,
}

/// How a source is doing, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceHealth {
    /// `imap` (later also `inbox`).
    pub source: String,
    /// What it is doing: `connecting`, `idle`, `polling`, `reconnecting`, `stopped`...
    pub state: String,
    /// What it reads, e.g. `notices@imap.example.org:993/INBOX`.
    pub detail: Option<String>,
    /// Whether it holds a working connection.
    pub connected: bool,
    /// The last answer from its server, ms since the epoch.
    pub last_contact: Option<i64>,
    /// The last error (kept after recovery, with its time).
    pub last_error: Option<String>,
    /// When `last_error` happened, ms since the epoch.
    pub last_error_at: Option<i64>,
    /// Mails taken since the database was created.
    pub taken: u64,
    /// When this was written, ms since the epoch.
    pub updated_at: i64,
}

/// A job as a worker holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// Its id.
    pub id: i64,
    /// `<mission lowercase>/<fileset>/<filename>`.
    pub product: String,
    /// Mission as given.
    pub mission: String,
    /// The file.
    pub filename: String,
    /// The program.
    pub program: i64,
    /// The event type that queued it.
    pub event_type: String,
    /// The archived date it serves.
    pub version: String,
    /// Where from.
    pub url: String,
    /// Where to, relative to `storage.downloads`.
    pub local_path: String,
    /// This attempt's number, from 1.
    pub attempt: i64,
    /// Which claim of the job this is (its count of claims, from 1): the fencing token of the
    /// lease-checked writes ([`Held`]).
    pub claim: i64,
    /// Bytes the server announced, once known.
    pub bytes_expected: Option<i64>,
    /// Bytes on disk at the last progress report.
    pub bytes_done: i64,
    /// The ETag of the bytes in the `.part` file.
    pub etag: Option<String>,
    /// Their Last-Modified.
    pub last_modified: Option<String>,
    /// Consecutive verification failures.
    pub verify_failures: i64,
    /// When MAST first answered 404, ms since the epoch.
    pub not_found_since: Option<i64>,
    /// Why it was waiting (no room on the disk), if it was, when it was claimed.
    pub waiting_reason: Option<String>,
    /// Where the bytes in its `.part` file came from, if any were recorded.
    pub source: Option<Provenance>,
    /// The bucket's whole-object checksum of those bytes (`x-amz-checksum-crc64nvme:<base64>`), if it
    /// gave one.
    pub checksum: Option<String>,
}

/// A claimed job as the lease-checked writes name it: its id, and which claim of it this is (the job's
/// count of claims when it was claimed). A write of an earlier claim, from a worker whose lease was taken
/// over (by another member, or by its own process after a stall), changes nothing: fencing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Held {
    /// The job.
    pub id: i64,
    /// Its claim.
    pub claim: i64,
}

impl Job {
    /// The job as this claim holds it.
    pub fn held(&self) -> Held {
        Held {
            id: self.id,
            claim: self.claim,
        }
    }

    /// How log lines name the job: its file, program and event type.
    pub fn about(&self) -> String {
        format!(
            "{} (program {}, {})",
            self.local_path, self.program, self.event_type
        )
    }
}

/// What a worker reports while it downloads; it also renews the lease.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Progress {
    /// Bytes in the `.part` file.
    pub bytes_done: i64,
    /// Bytes the server announced.
    pub bytes_expected: Option<i64>,
    /// The validator of those bytes.
    pub etag: Option<String>,
    /// The other validator.
    pub last_modified: Option<String>,
    /// Where those bytes come from.
    pub origin: Option<Origin>,
    /// The bucket's whole-object checksum of the object they are from (`header:value`), if any.
    pub checksum: Option<String>,
}

/// Where a job's bytes come from: MAST, or the cloud bucket (`[cloud]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provenance {
    /// MAST's own URL.
    Mast,
    /// The open-data bucket.
    Cloud,
}

impl Provenance {
    /// Both, in report order.
    pub const ALL: [Provenance; 2] = [Provenance::Cloud, Provenance::Mast];

    /// The stored spelling (`downloads.source`), also the metrics' label.
    pub fn as_str(self) -> &'static str {
        match self {
            Provenance::Mast => "mast",
            Provenance::Cloud => "cloud",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Provenance> {
        Provenance::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

/// Where a job's bytes come from, and the URL asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// MAST or the bucket.
    pub source: Provenance,
    /// The URL asked.
    pub url: String,
}

/// What MAST's path look-up said of a product's `mast:` URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudPath {
    /// Its key in the bucket; `None`: not in the cloud.
    pub key: Option<String>,
    /// When it was asked, ms since the epoch.
    pub looked_up_at: i64,
}

/// A queued job, for looking up cloud paths ahead of its claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upcoming {
    /// Mission as given.
    pub mission: String,
    /// The file.
    pub filename: String,
    /// Its MAST URL.
    pub url: String,
    /// The event type that queued it.
    pub event_type: String,
}

/// What a member of the cluster records of itself at every heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberBeat {
    /// `[cluster] node`.
    pub node: String,
    /// `node:pid:nonce:machine` of this process.
    pub owner: String,
    /// Its process id.
    pub pid: i64,
    /// When it started, ms since the epoch.
    pub started_at: i64,
    /// Bytes per second received lately.
    pub rate: f64,
    /// Now, ms since the epoch, by its clock.
    pub now: i64,
}

/// A member of the cluster, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    /// `[cluster] node`.
    pub node: String,
    /// The process that is (or was) the member.
    pub pid: i64,
    /// When it started, ms since the epoch.
    pub started_at: i64,
    /// When it was last heard from, ms since the epoch (by its clock).
    pub last_heartbeat: i64,
    /// Its clock minus the database's at that heartbeat, ms (0 where the store has no clock of its own).
    pub clock_skew: i64,
    /// Downloads it holds now.
    pub running: u64,
    /// Bytes per second it received lately.
    pub rate: f64,
    /// The roles it holds a live leader lease for: `imap` (reads the mailbox), `mail` (sends mail),
    /// `hooks` (runs the hooks).
    pub leads: Vec<String>,
    /// When it stopped cleanly, if it did.
    pub stopped_at: Option<i64>,
    /// `up`, `stopped` (cleanly), or `gone` (not heard from for 3 leases): as `status` judges it with
    /// its `download.lease` ([`crate::status::judge_members`]); `up` as the store reads it.
    pub state: String,
}

/// The node of a lease or member owner name (`node:pid:nonce:machine`; the node may hold colons).
pub fn owner_node(owner: &str) -> &str {
    let mut parts = owner.rsplitn(4, ':');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(_), Some(_), Some(_), Some(node)) => node,
        _ => owner,
    }
}

/// The members as the backends read them: their rows (node, owner, pid, started_at, heartbeat_at,
/// clock_skew, rate, stopped_at), the running jobs by lease owner, and the live leader leases (role,
/// owner).
#[allow(clippy::type_complexity)]
fn assemble_members(
    rows: Vec<(String, String, i64, i64, i64, i64, f64, Option<i64>)>,
    running: Vec<(String, i64)>,
    leaders: Vec<(String, String)>,
) -> Vec<Member> {
    let mut members: Vec<Member> = rows
        .into_iter()
        .map(
            |(node, owner, pid, started_at, last_heartbeat, clock_skew, rate, stopped_at)| {
                let leads = leaders
                    .iter()
                    .filter(|(_, o)| *o == owner)
                    .map(|(role, _)| role.clone())
                    .collect();
                Member {
                    node,
                    pid,
                    started_at,
                    last_heartbeat,
                    clock_skew,
                    running: 0,
                    rate,
                    leads,
                    stopped_at,
                    state: "up".into(),
                }
            },
        )
        .collect();
    for (owner, n) in running {
        let node = owner_node(&owner);
        if let Some(m) = members.iter_mut().find(|m| m.node == node) {
            m.running += n as u64;
        }
    }
    members
}

/// A row of `RECENT_NOTICES`, as both backends read it.
pub(super) type NoticeTuple = (i64, String, String, i64, String, i64, i64, Option<String>);

impl From<NoticeTuple> for NoticeRow {
    fn from(
        (id, name, source_kind, received_at, status, records, events_recorded, error): NoticeTuple,
    ) -> NoticeRow {
        NoticeRow {
            id,
            name,
            source_kind,
            received_at,
            status,
            records,
            events_recorded,
            error,
        }
    }
}

/// A row of `HOOK_FAILURES`, as both backends read it.
pub(super) type HookFailureTuple = (i64, String, String, String, i64, String, i64);

impl From<HookFailureTuple> for HookFailure {
    fn from(
        (id, kind, state, about, attempts, error, updated_at): HookFailureTuple,
    ) -> HookFailure {
        HookFailure {
            id,
            kind: match kind.as_str() {
                "product" => "on_product".into(),
                _ => "on_notice".into(),
            },
            state,
            about,
            attempts,
            error,
            updated_at,
        }
    }
}

impl HookCounts {
    /// Adds a row of `HOOK_COUNTS`: the runs in `state`, and the failed attempts among them.
    pub(super) fn count(&mut self, (state, n, failures): (String, i64, i64)) {
        let n = n as u64;
        match state.as_str() {
            "pending" => self.pending = n,
            "running" => self.running = n,
            "done" => self.done = n,
            "failed" => self.failed = n,
            _ => {}
        }
        self.failed_attempts += failures as u64;
    }
}

/// The `daemon_state` row (pid, started_at, rate, updated_at), as both backends read it.
impl From<(i64, i64, f64, i64)> for DaemonState {
    fn from((pid, started_at, rate, updated_at): (i64, i64, f64, i64)) -> DaemonState {
        DaemonState {
            pid,
            started_at,
            rate,
            updated_at,
        }
    }
}

/// How an attempt ended, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// Published and verified.
    Done {
        /// The file's size.
        bytes: i64,
        /// What its content was verified by.
        verified: String,
        /// Where its bytes came from.
        origin: Option<Origin>,
    },
    /// Back to `queued` until `at` (ms since the epoch).
    Retry {
        /// The next attempt time.
        at: i64,
        /// Why.
        error: String,
        /// The attempt does not count against `max_attempts` (disk trouble, shutdown).
        refund: bool,
        /// The new count of consecutive verification failures.
        verify_failures: i64,
        /// When 404s began, if this was one.
        not_found_since: Option<i64>,
        /// Why the job waits, when it is not a failure at all (no room on the disk): shown as the job's
        /// `waiting_reason` until it ends otherwise.
        waiting: Option<String>,
    },
    /// Given up: `failed` or `needs_auth`.
    GiveUp {
        /// `Failed` or `NeedsAuth`.
        state: DownloadState,
        /// Why.
        error: String,
    },
}

/// A store failure: the database could not be opened, migrated, read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or migrating the database.
    #[error("cannot open the database {path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// A command that only reads found no database at the path.
    #[error(
        "no such database {path}: run `mastsub run` or `mastsub ingest` first, or check storage.database \
         (and --config)"
    )]
    Missing {
        /// The file.
        path: String,
    },
    /// The file at the path is not a mastsub database (another program's SQLite file, an empty file).
    #[error(
        "{path} is not a mastsub database (it has none of mastsub's tables); check storage.database \
         (and --config)"
    )]
    NotOurs {
        /// The file.
        path: String,
    },
    /// Applying migrations.
    #[error("cannot bring the database {path} up to date: {source}")]
    Migrate {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    /// A query failed.
    #[error("database {path}: {source}")]
    Query {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: sqlx::Error,
    },
    /// The database file at the path is not the one opened: what is recorded from now on would go into a
    /// file no one will read.
    #[error(
        "the database file {path} was {what} while mastsub had it open; stopping so that nothing is \
         recorded into a file no one will read: start mastsub again (systemd does) to use the file now at \
         that path"
    )]
    Moved {
        /// The file.
        path: String,
        /// "deleted or moved away", "replaced by another file".
        what: &'static str,
    },
    /// The database holds a value this version cannot read.
    #[error("database {path}: unexpected value {value:?} in {column}")]
    Corrupt {
        /// The file.
        path: String,
        /// The column.
        column: &'static str,
        /// The value.
        value: String,
    },
}

/// Opens (creating or migrating) the store `storage.database` names: a SQLite file, or a PostgreSQL
/// database (`storage.password_file` read for its password).
pub async fn open(storage: &crate::config::StorageConfig) -> Result<Arc<dyn Store>, StoreError> {
    match target(storage)? {
        Target::Sqlite(path) => Ok(Arc::new(SqliteStore::open(&path).await?)),
        Target::Postgres(options, shown) => Ok(Arc::new(PgStore::open(*options, &shown).await?)),
    }
}

/// Opens the existing store `storage.database` names, for reading only: no file or schema is made.
pub async fn open_read_only(
    storage: &crate::config::StorageConfig,
) -> Result<Arc<dyn Store>, StoreError> {
    match target(storage)? {
        Target::Sqlite(path) => Ok(Arc::new(SqliteStore::open_read_only(&path).await?)),
        Target::Postgres(options, shown) => {
            Ok(Arc::new(PgStore::open_read_only(*options, &shown).await?))
        }
    }
}

/// Whether `storage.database` is a PostgreSQL database (a store several daemons may share).
pub fn is_shared(storage: &crate::config::StorageConfig) -> bool {
    matches!(
        storage.target(),
        Ok(crate::config::DatabaseTarget::Postgres(_))
    )
}

enum Target {
    Sqlite(std::path::PathBuf),
    Postgres(Box<sqlx::postgres::PgConnectOptions>, String),
}

fn target(storage: &crate::config::StorageConfig) -> Result<Target, StoreError> {
    use crate::config::DatabaseTarget;
    let shown = storage.database_shown();
    let invalid = |why: String| StoreError::Open {
        path: shown.clone(),
        source: sqlx::Error::Configuration(why.into()),
    };
    match storage.target().map_err(invalid)? {
        DatabaseTarget::Sqlite(path) => Ok(Target::Sqlite(path)),
        DatabaseTarget::Postgres(url) => {
            use sqlx::ConnectOptions;
            // sqlx's own message may quote the URL: it is replaced by one that names the parameter.
            let mut options = sqlx::postgres::PgConnectOptions::from_url(&url).map_err(|e| {
                let why = e.to_string().replace(url.as_str(), &shown);
                invalid(format!("cannot read the URL's parameters: {why}"))
            })?;
            if let Some(file) = &storage.password_file {
                let password = std::fs::read_to_string(file).map_err(|e| {
                    invalid(format!(
                        "cannot read storage.password_file {}: {e}",
                        file.display()
                    ))
                })?;
                let password = password.lines().next().unwrap_or_default();
                options = options.password(password);
            }
            // The server's log and pg_stat_activity name the program.
            options = options.application_name("mastsub");
            Ok(Target::Postgres(Box::new(options), shown))
        }
    }
}

/// How long a mail claimed by [`Store::due_mail`] is not due to anyone else: 10 minutes, far longer than
/// sending 50 mails takes.
pub const MAIL_CLAIM_MS: i64 = 600_000;

/// Now, in milliseconds since the epoch: the unit of every time in the store.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The narrow interface every backend implements.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Records a notice and its valid events in one transaction, de-duplicated by content and by
    /// `event_id`, and applies the categorizer's plan to the download jobs.
    async fn ingest_notice(
        &self,
        notice: &NoticeMeta,
        events: &[Event],
        categorizer: &Categorizer,
    ) -> Result<IngestOutcome, StoreError>;

    /// Counts for `status`, with up to `recent_failures` of the latest failures.
    async fn status(&self, recent_failures: usize) -> Result<StatusSnapshot, StoreError>;

    /// Download jobs, all or in one state, oldest first.
    async fn list_downloads(
        &self,
        state: Option<DownloadState>,
    ) -> Result<Vec<DownloadRow>, StoreError>;

    /// Claims the next due job whose product has no other job running, for `owner` until `lease_until`.
    async fn claim(
        &self,
        owner: &str,
        lease_until: i64,
        now: i64,
    ) -> Result<Option<Job>, StoreError>;

    /// Records progress and renews the lease; false if `owner` no longer holds the job under that claim.
    async fn progress(
        &self,
        job: Held,
        owner: &str,
        lease_until: i64,
        progress: &Progress,
    ) -> Result<bool, StoreError>;

    /// Renews the lease only; false if `owner` no longer holds the job under that claim.
    async fn renew_lease(
        &self,
        job: Held,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError>;

    /// Renews the leases of `jobs` that `owner` still holds under their claims, until `lease_until`; for
    /// each, whether it is held. The publisher asks just before it renames files into place, so that a
    /// worker whose lease was taken over (a member cut off from the database, a stall) never publishes
    /// over the job's new holder.
    async fn hold(
        &self,
        owner: &str,
        jobs: &[Held],
        lease_until: i64,
    ) -> Result<Vec<bool>, StoreError>;

    /// Ends an attempt; false (and nothing changed) if `owner` no longer holds the job under that claim.
    async fn finish(
        &self,
        job: Held,
        owner: &str,
        finish: &Finish,
        now: i64,
    ) -> Result<bool, StoreError>;

    /// Ends several attempts of `owner` and claims up to `claims` due jobs for it, in one transaction
    /// where the store has them: the publisher records a whole batch of ends, and the claims of the
    /// workers waiting at that moment, with one commit. Returns, for each end in order, whether it was
    /// recorded (as `finish`), and the jobs claimed (as `claim`, each on a path no other running job
    /// holds, and never the same job twice).
    async fn end_and_claim(
        &self,
        owner: &str,
        ends: &[(Held, Finish)],
        claims: usize,
        now: i64,
        lease_until: i64,
    ) -> Result<(Vec<bool>, Vec<Job>), StoreError> {
        let mut recorded = Vec::with_capacity(ends.len());
        for (job, finish) in ends {
            recorded.push(self.finish(*job, owner, finish, now).await?);
        }
        let mut jobs = Vec::new();
        while jobs.len() < claims {
            match self.claim(owner, lease_until, now).await? {
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        Ok((recorded, jobs))
    }

    /// Puts `running` jobs back to `queued` when `orphaned(lease owner, lease expiry)` says so (a process
    /// that died, a lease run out: the caller judges, since only it can see processes); their attempt
    /// does not count. Returns how many.
    async fn requeue_orphans(
        &self,
        now: i64,
        orphaned: &(dyn for<'a> Fn(&'a str, i64) -> bool + Send + Sync),
    ) -> Result<u64, StoreError>;

    /// Puts the `running` jobs of `owner` back to `queued` (their attempt not counted): a pool that
    /// stops gives back what it holds. Returns how many.
    async fn release_leases(&self, owner: &str, now: i64) -> Result<u64, StoreError>;

    /// The earliest `next_attempt_at` of a queued job, if any.
    async fn next_due(&self) -> Result<Option<i64>, StoreError>;

    /// Makes due at `now` every queued job whose next attempt lies more than `horizon` ms after `now`:
    /// no delay mastsub sets is that long, so such a time was written before the clock was set back.
    /// Returns how many.
    async fn due_now_beyond(&self, now: i64, horizon: i64) -> Result<u64, StoreError>;

    /// Whether the database file at the configured path is still the one opened (checked through the
    /// path); [`StoreError::Moved`] if it was deleted, moved or replaced.
    async fn check_identity(&self) -> Result<(), StoreError>;

    /// Re-queues jobs with fresh attempts: these ids (any state but `running` and `done`), or every
    /// `failed` and `needs_auth` job. Returns how many.
    async fn retry(&self, ids: Option<&[i64]>, now: i64) -> Result<u64, StoreError>;

    /// Queues these `done` jobs again (their file is gone or damaged). Returns how many.
    async fn redo(&self, ids: &[i64], now: i64) -> Result<u64, StoreError>;

    /// Re-queues every `needs_auth` job (a token has appeared). Returns how many.
    async fn requeue_needs_auth(&self, now: i64) -> Result<u64, StoreError>;

    /// The version of the newest `done` job of `product` other than `except`: the file on disk now.
    async fn version_on_disk(
        &self,
        product: &str,
        except: i64,
    ) -> Result<Option<String>, StoreError>;

    /// The UIDVALIDITY and highest handled UID of `mailbox` for `account`, if it was read before.
    async fn imap_position(
        &self,
        account: &str,
        mailbox: &str,
    ) -> Result<Option<(u32, u32)>, StoreError>;

    /// Records the UIDVALIDITY and highest handled UID of `mailbox` for `account`.
    async fn set_imap_position(
        &self,
        account: &str,
        mailbox: &str,
        uidvalidity: u32,
        last_uid: u32,
    ) -> Result<(), StoreError>;

    /// The mailer's watermarks (set to `now` the first time): (e-mail enabled since, alerts looked at
    /// until).
    async fn mail_watermarks(&self, now: i64) -> Result<(i64, i64), StoreError>;

    /// Notices received since `since`, not summarized yet, whose downloads have all ended.
    async fn notices_to_summarize(&self, since: i64) -> Result<Vec<NoticeDigest>, StoreError>;

    /// Marks `notice` summarized and, in the same transaction, queues `mail` (if any), unless it was marked
    /// already (by another mailer): a summary is queued once.
    async fn queue_summary(
        &self,
        notice: i64,
        mail: Option<&NewMail>,
        now: i64,
    ) -> Result<(), StoreError>;

    /// Jobs that ended `failed` or `needs_auth` after `after` (by their last change), oldest first.
    async fn failures_since(&self, after: i64) -> Result<Vec<DownloadRow>, StoreError>;

    /// When the last alert for `cause` was queued.
    async fn last_alert(&self, cause: &str) -> Result<Option<i64>, StoreError>;

    /// Queues the alert mails and moves the alert watermark to `until`, in one transaction.
    async fn queue_alerts(&self, mails: &[NewMail], until: i64, now: i64)
    -> Result<(), StoreError>;

    /// Claims up to 50 unsent mails due at `now`, oldest first: each is not due again for
    /// [`MAIL_CLAIM_MS`] (its `mail_sent` or `mail_failed` comes first), so that two mailers (a leader and
    /// one that took over from it) never send one mail each, and a mailer that dies mid-send leaves its
    /// mails to be sent by another after that while.
    async fn due_mail(&self, now: i64) -> Result<Vec<OutMail>, StoreError>;

    /// Records a mail as sent.
    async fn mail_sent(&self, id: i64, now: i64) -> Result<(), StoreError>;

    /// Records a failed try; the next one at `next_at`.
    async fn mail_failed(&self, id: i64, error: &str, next_at: i64) -> Result<(), StoreError>;

    /// Records the running daemon's figures (`status` shows them).
    async fn record_daemon_state(&self, state: &DaemonState) -> Result<(), StoreError>;

    /// Records a source's health; `taken` in `health` is added to the count kept, and a `last_error`
    /// or `last_contact` of `None` keeps the one recorded before.
    async fn record_source_health(&self, health: &SourceHealth) -> Result<(), StoreError>;

    /// Makes the queued jobs waiting for room due now (room appeared); returns how many.
    async fn due_now_waiting(&self, now: i64) -> Result<u64, StoreError>;

    /// From now on, every job recorded done queues an `on_product` hook run in the same transaction
    /// (`hooks.on_product` is set). Off by default: `mastsub download` and the tools queue none.
    fn queue_product_hooks(&self, on: bool);

    /// Since when `on_notice` has been set without a break: with `on`, the first call records `now` and
    /// later ones return that time; without, the time is forgotten (`None`), so that setting it again
    /// later does not run it for the notices of the meantime.
    async fn notice_hooks_since(&self, on: bool, now: i64) -> Result<Option<i64>, StoreError>;

    /// Queues an `on_notice` run for each notice received since `since` whose downloads have all ended
    /// and that has none yet; returns how many were queued.
    async fn queue_notice_hooks(&self, since: i64, now: i64) -> Result<u64, StoreError>;

    /// Claims up to `n` hook runs due at `now` (pending → running, one more attempt), with what their
    /// environment says.
    async fn claim_hook_runs(&self, n: usize, now: i64) -> Result<Vec<HookRun>, StoreError>;

    /// Records how an attempt of a hook run ended.
    async fn end_hook_run(&self, id: i64, end: &HookEnd, now: i64) -> Result<(), StoreError>;

    /// Puts runs left `running` (their daemon died, or stopped them) back to pending, due at once and
    /// ahead of the runs queued after them; with `refund`, the attempt they were in does not count.
    async fn requeue_hook_runs(&self, now: i64, refund: bool) -> Result<u64, StoreError>;

    /// When the next pending hook run is due.
    async fn next_hook_due(&self) -> Result<Option<i64>, StoreError>;

    /// What MAST's path look-up said of each of `uris` that it was asked about.
    async fn cloud_paths(
        &self,
        uris: &[String],
    ) -> Result<std::collections::HashMap<String, CloudPath>, StoreError>;

    /// Records look-up answers (URI, key or `None` for "not in the cloud") made at `now`.
    async fn record_cloud_paths(
        &self,
        paths: &[(String, Option<String>)],
        now: i64,
    ) -> Result<(), StoreError>;

    /// Up to `n` queued jobs, the next due first.
    async fn upcoming(&self, n: usize) -> Result<Vec<Upcoming>, StoreError>;

    /// Joins the cluster as `me.node`: refused, with the member in the way returned, when another process
    /// is recorded under that name, was heard from at or after `live_since`, has not stopped, and
    /// `gone(its owner)` does not say it is certainly dead. Otherwise the row is this process's, and the
    /// leader leases of the process that had it are given up.
    async fn join_member(
        &self,
        me: &MemberBeat,
        live_since: i64,
        gone: &(dyn for<'a> Fn(&'a str) -> bool + Send + Sync),
    ) -> Result<Option<Member>, StoreError>;

    /// A heartbeat of `me` (its row made again if it is gone); false when its row now names another
    /// process (which judged it gone).
    async fn member_beat(&self, me: &MemberBeat) -> Result<bool, StoreError>;

    /// Records that `owner` stopped cleanly. Its leader leases are given up by [`Store::resign`] once
    /// the work under each has stopped, not here: a successor must not start while it still runs.
    async fn leave_member(&self, node: &str, owner: &str, now: i64) -> Result<(), StoreError>;

    /// Takes or renews the leader lease of `role` for `owner` until `until` (the lease lasting
    /// `until - now`); false when another owner holds a lease not run out.
    async fn lead(
        &self,
        role: &str,
        node: &str,
        owner: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, StoreError>;

    /// Gives up the leader lease of `role` if `owner` holds it.
    async fn resign(&self, role: &str, owner: &str) -> Result<(), StoreError>;

    /// The members, by node, with their running jobs and the roles they lead at `now`.
    async fn members(&self, now: i64) -> Result<Vec<Member>, StoreError>;

    /// Closes connections cleanly (SQLite: checkpoints the WAL).
    async fn close(&self);
}

/// A hook run claimed to be run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRun {
    /// Its id.
    pub id: i64,
    /// `on_product` or `on_notice`.
    pub kind: HookKind,
    /// This attempt's number, from 1.
    pub attempt: i64,
    /// What it is about, for the log: the product's path, or the notice's name.
    pub about: String,
    /// The `MASTSUB_*` variables of its environment.
    pub env: Vec<(String, String)>,
}

/// Which hook.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookKind {
    /// `hooks.on_product`.
    OnProduct,
    /// `hooks.on_notice`.
    OnNotice,
}

impl HookKind {
    /// `on_product` or `on_notice`, as the config key names it.
    pub fn key(self) -> &'static str {
        match self {
            HookKind::OnProduct => "on_product",
            HookKind::OnNotice => "on_notice",
        }
    }
}

/// How an attempt of a hook run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEnd {
    /// Exit 0.
    Done,
    /// Failed (why); tried again at `at`.
    Retry {
        /// The next attempt, ms since the epoch.
        at: i64,
        /// Why this one failed.
        error: String,
    },
    /// Failed (why), with no attempt left.
    Failed {
        /// Why.
        error: String,
    },
    /// Stopped by a shutdown: pending again, the attempt not counted.
    Interrupted,
}

impl HookFailure {
    /// `failed` (no attempt left) or `retrying`, as reports say it.
    pub fn standing(&self) -> &'static str {
        if self.state == "failed" {
            "failed"
        } else {
            "retrying"
        }
    }
}

/// Hook runs, for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct HookCounts {
    /// Waiting to run (first or next attempt).
    pub pending: u64,
    /// Running now.
    pub running: u64,
    /// Ended with exit 0.
    pub done: u64,
    /// Gave up after `hooks.max_attempts`.
    pub failed: u64,
    /// Attempts that failed (a non-zero exit, a timeout), in all.
    pub failed_attempts: u64,
    /// The latest runs that failed or are retrying after a failure, newest first.
    pub recent_failures: Vec<HookFailure>,
}

/// A hook run that failed, or is retrying after a failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HookFailure {
    /// The run's id.
    pub id: i64,
    /// `on_product` or `on_notice`.
    pub kind: String,
    /// `pending` (to be retried) or `failed`.
    pub state: String,
    /// The product's path or the notice's name.
    pub about: String,
    /// Attempts made.
    pub attempts: i64,
    /// Why the last one failed.
    pub error: String,
    /// When, ms since the epoch.
    pub updated_at: i64,
}
