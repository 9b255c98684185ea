//! Ingest: one path from notice bytes to recorded events, shared by every source (inbox, CLI, IMAP).
//!
//! Parsing runs on a blocking thread (a 64 MiB notice is CPU work); recording is one store transaction.
//! The report says what was recorded and what was refused, in words a user can act on, and logs one line
//! per notice plus one per refused record.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::categorize::Categorizer;
use crate::config::Config;
use crate::notice::{self, Limits, NoticeError, RecordError};
use crate::store::{IngestOutcome, NoticeMeta, NoticeStatus, SourceKind, Store, StoreError};

/// At most this many refused records are logged one per line; the rest are counted (all are in the report).
const LOGGED_RECORD_ERRORS: usize = 20;

/// Where a notice came from.
#[derive(Debug, Clone)]
pub struct NoticeSource {
    /// Which source.
    pub kind: SourceKind,
    /// A path, or a mail's Message-ID and UID.
    pub reference: String,
    /// The file or attachment name, used in messages.
    pub name: String,
}

/// Errors that leave a notice where it is, to be tried again: nothing was decided about it.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The store failed; the notice is not recorded and will be tried again.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The parsing thread died (a bug).
    #[error("parsing {name} failed unexpectedly: {message}")]
    Parser {
        /// The notice.
        name: String,
        /// The panic or cancellation.
        message: String,
    },
}

/// What ingesting one notice did.
#[derive(Debug, Clone)]
pub struct IngestReport {
    /// The notice's name.
    pub name: String,
    /// Records in the array.
    pub records: usize,
    /// Why the whole notice was refused, if it was.
    pub fatal: Option<NoticeError>,
    /// The records refused.
    pub record_errors: Vec<RecordError>,
    /// Accepted, accepted in part, or refused: decided once, from the parse.
    pub status: NoticeStatus,
    /// What the store did (empty when nothing reached it).
    pub outcome: IngestOutcome,
}

/// Which file was read: if the name no longer holds this, the file was replaced or changed meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileIdentity {
    /// `st_dev`.
    pub device: u64,
    /// `st_ino`.
    pub inode: u64,
    /// Bytes.
    pub size: u64,
    /// Modification time.
    pub modified: Option<std::time::SystemTime>,
}

impl FileIdentity {
    /// The identity of the file `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> FileIdentity {
        use std::os::unix::fs::MetadataExt;
        FileIdentity {
            device: meta.dev(),
            inode: meta.ino(),
            size: meta.len(),
            modified: meta.modified().ok(),
        }
    }
}

impl IngestReport {
    /// Every record was accepted.
    pub fn is_accepted(&self) -> bool {
        self.fatal.is_none() && self.record_errors.is_empty()
    }

    /// "3 events (1 New, 1 Reprocessed, 1 Public), 3 downloads queued", plus whatever else happened.
    pub fn summary(&self) -> String {
        let o = &self.outcome;
        let total = o.recorded_total();
        let mut s = format!("{total} event{}", plural(total));
        if total > 0 {
            let by_type: Vec<String> = o
                .recorded
                .iter()
                .filter(|(_, n)| **n > 0)
                .map(|(t, n)| format!("{n} {t}"))
                .collect();
            let _ = write!(s, " ({})", by_type.join(", "));
        }
        let _ = write!(s, ", {} download{} queued", o.queued, plural(o.queued));
        for (n, what) in [
            (o.joined, "joined a pending download"),
            (o.requeued, "re-queued a failed or token-waiting download"),
            (o.already_done, "already on disk"),
            (o.record_only, "recorded only ([events] policy)"),
            (o.already_recorded, "already recorded before"),
            (
                o.conflicts.len(),
                "recorded despite an event_id recorded before for something else (see the warnings)",
            ),
        ] {
            if n > 0 {
                let _ = write!(s, ", {n} {what}");
            }
        }
        if !self.record_errors.is_empty() {
            let n = self
                .record_errors
                .iter()
                .map(|e| e.index)
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            let _ = write!(
                s,
                "; {n} of {} record{} refused",
                self.records,
                plural(self.records)
            );
        }
        s
    }

    /// Every reason for refusal, one per line, each naming the notice.
    pub fn error_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(fatal) = &self.fatal {
            lines.push(format!("{}: {fatal}", self.name));
        }
        lines.extend(
            self.record_errors
                .iter()
                .map(|e| format!("{}: {e}", self.name)),
        );
        lines
    }

    /// The text of `<name>.error.txt`: what was refused, what was kept, and what to do.
    pub fn error_file_text(&self) -> String {
        let mut s = format!(
            "mastsub refused {} at {}.\n\n",
            if self.fatal.is_some() {
                "this notice"
            } else {
                "part of this notice"
            },
            chrono::Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
        );
        for line in self.error_lines() {
            let _ = writeln!(s, "- {line}");
        }
        if self.fatal.is_none() {
            let _ = writeln!(s, "\nThe valid records were recorded: {}.", self.summary());
        }
        s.push_str(
            "\nFix the file and put it in the inbox again (or run `mastsub ingest FILE`): records already \
             recorded are recognised by their event_id and not recorded twice.\n",
        );
        s
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Turns notice bytes into recorded events.
pub struct Ingestor {
    store: Arc<dyn Store>,
    categorizer: Categorizer,
    limits: Limits,
    wake: Option<Arc<tokio::sync::Notify>>,
}

impl Ingestor {
    /// `ingest.max_notice_size`: also the most a compressed notice may unpack to.
    pub fn max_notice_size(&self) -> u64 {
        self.limits.max_size
    }

    /// Files go straight into `storage.downloads` (the `download --flat` layout).
    pub fn flat(mut self, flat: bool) -> Ingestor {
        self.categorizer = self.categorizer.flat(flat);
        self
    }

    /// How it decides what each event does.
    pub fn categorizer(&self) -> &Categorizer {
        &self.categorizer
    }

    /// The store it records into.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// An ingestor writing to `store` under `config`'s limits and policy.
    pub fn new(store: Arc<dyn Store>, config: &Config) -> Ingestor {
        // Config::validate checked the URL; the default is a valid URL, so the fallback never happens.
        let base_url = url::Url::parse(&config.mast.base_url).unwrap_or_else(|_| {
            url::Url::parse("https://mast.stsci.edu").expect("a valid literal URL")
        });
        Ingestor {
            store,
            // Config::validate checked the filters too.
            categorizer: Categorizer::new(config.events, &base_url)
                .filtered(crate::filters::Filters::new(&config.filters).unwrap_or_default()),
            limits: Limits {
                max_size: config.ingest.max_notice_size.as_u64(),
                max_nesting: config.ingest.max_nesting,
            },
            wake: None,
        }
    }

    /// Notifies `wake` whenever a notice queues downloads, so that workers start at once.
    pub fn waking(mut self, wake: Arc<tokio::sync::Notify>) -> Ingestor {
        self.wake = Some(wake);
        self
    }

    /// Reads and ingests a file named on the command line.
    pub async fn ingest_file(
        &self,
        path: &Path,
        kind: SourceKind,
    ) -> Result<IngestReport, IngestError> {
        self.ingest_path(path, kind).await.map(|(report, _)| report)
    }

    /// Reads a file through one handle and ingests it; returns the identity of what was read. A file over
    /// the size limit is refused without being read. Inbox files are never read through a symbolic link.
    pub async fn ingest_path(
        &self,
        path: &Path,
        kind: SourceKind,
    ) -> Result<(IngestReport, FileIdentity), IngestError> {
        let read_err = |source| IngestError::Read {
            path: path.display().to_string(),
            source,
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        let limit = self.limits.max_size;
        let owned = path.to_path_buf();
        let follow_links = kind != SourceKind::Inbox;
        let (identity, bytes) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
            use std::io::Read;
            use std::os::unix::fs::OpenOptionsExt;
            let mut options = std::fs::OpenOptions::new();
            options.read(true);
            // O_NONBLOCK: a FIFO put where a notice was must not hang the open (it is refused below as not
            // a regular file); for a regular file the flag changes nothing.
            let mut flags = nix::libc::O_NONBLOCK;
            if !follow_links {
                flags |= nix::libc::O_NOFOLLOW;
            }
            options.custom_flags(flags);
            let file = options.open(&owned)?;
            let meta = file.metadata()?;
            if !meta.is_file() {
                return Err(std::io::Error::other("not a regular file"));
            }
            let identity = FileIdentity::of(&meta);
            if meta.len() > limit {
                return Ok((identity, None));
            }
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            // One byte past the limit tells a file that grew while being read.
            file.take(limit + 1).read_to_end(&mut bytes)?;
            Ok((identity, Some(bytes)))
        })
        .await
        .map_err(|e| IngestError::Parser {
            name: name.clone(),
            message: e.to_string(),
        })?
        .map_err(read_err)?;
        let bytes = match bytes {
            Some(bytes) if bytes.len() as u64 <= limit => bytes,
            too_large => {
                let size = too_large.map_or(identity.size, |b| b.len() as u64);
                let report = IngestReport {
                    name,
                    records: 0,
                    fatal: Some(NoticeError::TooLarge { size, limit }),
                    record_errors: Vec::new(),
                    status: NoticeStatus::Rejected,
                    outcome: IngestOutcome::default(),
                };
                log_report(&report);
                return Ok((report, identity));
            }
        };
        let source = NoticeSource {
            kind,
            reference: path.display().to_string(),
            name,
        };
        Ok((self.ingest_bytes(&source, bytes).await?, identity))
    }

    /// Parses, validates and records a notice's bytes.
    pub async fn ingest_bytes(
        &self,
        source: &NoticeSource,
        bytes: Vec<u8>,
    ) -> Result<IngestReport, IngestError> {
        let limits = self.limits;
        let size = bytes.len() as u64;
        let (sha256, parsed) = tokio::task::spawn_blocking(move || {
            let sha256 = hex::encode(Sha256::digest(&bytes));
            (sha256, notice::parse(&bytes, &limits))
        })
        .await
        .map_err(|e| IngestError::Parser {
            name: source.name.clone(),
            message: e.to_string(),
        })?;

        let (records, events, record_errors, fatal) = match parsed {
            Ok(p) => (p.records, p.events, p.errors, None),
            Err(e) => (0, Vec::new(), Vec::new(), Some(e)),
        };
        let status = match (&fatal, record_errors.is_empty(), events.is_empty()) {
            (Some(_), _, _) => NoticeStatus::Rejected,
            (None, true, _) => NoticeStatus::Accepted,
            (None, false, false) => NoticeStatus::Partial,
            (None, false, true) => NoticeStatus::Rejected,
        };
        let mut report = IngestReport {
            name: source.name.clone(),
            records,
            fatal,
            record_errors,
            status,
            outcome: IngestOutcome::default(),
        };
        let error = (!report.is_accepted()).then(|| report.error_lines().join("\n"));
        let meta = NoticeMeta {
            sha256,
            source_kind: source.kind,
            source_ref: source.reference.clone(),
            name: source.name.clone(),
            size,
            records,
            status,
            error,
        };
        report.outcome = self
            .store
            .ingest_notice(&meta, &events, &self.categorizer)
            .await?;
        // Jobs to run (new, or a version raised, or queued again): the pool starts them now, not at its
        // next sweep. `notify_one` keeps the wake-up for a pool that is busy at this moment.
        let o = &report.outcome;
        if (o.queued > 0 || o.requeued > 0 || o.joined > 0)
            && let Some(wake) = &self.wake
        {
            wake.notify_one();
        }
        log_report(&report);
        self.warn_unknown_types(&report.name, &events);
        Ok(report)
    }
}

impl Ingestor {
    /// One warning per event type MAST does not document, per notice: what was done with its events.
    fn warn_unknown_types(&self, notice: &str, events: &[notice::Event]) {
        let mut seen: std::collections::BTreeMap<&str, (usize, &notice::Event)> =
            Default::default();
        for e in events.iter().filter(|e| e.event_type.is_other()) {
            seen.entry(e.event_type.as_str()).or_insert((0, e)).0 += 1;
        }
        for (t, (n, first)) in seen {
            let done = match self.categorizer.skipped(first) {
                Some(why) => format!("recorded without downloads: {why}"),
                None => {
                    "recorded, and its products downloaded ([events] other = \"download\")".into()
                }
            };
            tracing::warn!(
                notice = %notice,
                "notice {notice}: event type {t:?} is not one MAST documents (New, First, Reprocessed, \
                 Public); its {n} event{} {} {done}",
                plural(n),
                if n == 1 { "was" } else { "were" }
            );
        }
    }
}

fn log_report(report: &IngestReport) {
    if let Some(fatal) = &report.fatal {
        tracing::warn!(notice = %report.name, "notice {} rejected: {fatal}", report.name);
        return;
    }
    if report.outcome.seen_before && report.outcome.recorded_total() == 0 {
        tracing::info!(
            notice = %report.name,
            "notice {}: already recorded (same content as notice #{}), nothing new",
            report.name,
            report.outcome.notice_id
        );
    } else {
        tracing::info!(notice = %report.name, "notice {}: {}", report.name, report.summary());
    }
    for c in &report.outcome.conflicts {
        tracing::warn!(
            notice = %report.name,
            "notice {}, record {}: event_id {} was recorded before for something else ({}); this record \
             ({}) is recorded and queued too, since nothing is dropped silently: tell MAST if it recurs",
            report.name,
            c.record,
            c.event_id,
            c.earlier,
            c.now
        );
    }
    for e in report.record_errors.iter().take(LOGGED_RECORD_ERRORS) {
        tracing::warn!(notice = %report.name, record = e.index, field = e.field, "notice {}: rejected {e}", report.name);
    }
    if report.record_errors.len() > LOGGED_RECORD_ERRORS {
        tracing::warn!(
            notice = %report.name,
            "notice {}: {} more refused records not logged; all are listed in its error file",
            report.name,
            report.record_errors.len() - LOGGED_RECORD_ERRORS
        );
    }
}
