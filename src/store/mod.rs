//! The store: the only shared state of mastsub, behind one narrow trait.
//!
//! Sources only insert (through [`Store::ingest_notice`]); workers only claim and update jobs; the CLI only
//! reads. Every backend (today SQLite, in `sqlite.rs`) implements [`Store`] and runs the same contract tests.
//! All SQL lives in the backend modules.

mod sqlite;

use std::collections::BTreeMap;
use std::fmt;

use async_trait::async_trait;
use serde::Serialize;

use crate::categorize::Categorizer;
use crate::notice::{Event, EventType};

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
    /// Last change, ms since the epoch.
    pub updated_at: i64,
}

/// Counts for `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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

    /// Closes connections cleanly (checkpoints the WAL).
    async fn close(&self);
}
