//! The inbox source: a watched folder that notices are dropped (or written, or renamed) into.
//!
//! A file is read once it is complete: renamed in, or closed after writing, or found by a scan, and its size
//! and time unchanged for `inbox.settle`. A file still open is waited for (up to `inbox.write_timeout` of
//! silence). The folder is scanned at start-up (files that came while the daemon was down), after a
//! watcher overflow, and every `inbox.rescan_interval` as a safety net. Handled files move to `processed/`,
//! refused ones to `rejected/` beside `<name>.error.txt`; nothing there is ever overwritten. If the notice
//! could not be recorded (the database is unavailable) the file stays in the inbox and is tried again.
//! A watcher that fails is logged and restarted; meanwhile the periodic scan keeps notices flowing.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{
    DebounceEventResult, DebouncedEvent, Debouncer, RecommendedCache, new_debouncer,
};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::config::InboxConfig;
use crate::ingest::{IngestError, IngestReport, Ingestor};
use crate::store::SourceKind;

/// Handled notices go here, inside the inbox.
pub const PROCESSED_DIR: &str = "processed";
/// Refused notices go here, inside the inbox, each beside `<name>.error.txt`.
pub const REJECTED_DIR: &str = "rejected";

/// How often pending files are looked at.
const TICK: Duration = Duration::from_millis(50);
/// The debouncer's window: events on one path within it arrive together.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// After a failure to record a notice, it is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// The longest wait between two attempts to start the watcher.
const MAX_WATCH_BACKOFF: Duration = Duration::from_secs(60);

/// True for names the inbox never takes: dot-files and temporary names of editors and downloaders.
pub fn is_ignored(name: &str) -> bool {
    name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || name.ends_with('~')
}

/// A file seen in the inbox and not handled yet.
#[derive(Debug)]
struct Candidate {
    /// Something is writing it: created or modified, and not closed since.
    writing: bool,
    /// The last watcher event about it.
    last_event: Instant,
    /// Size and modification time when last looked at.
    stat: Option<(u64, Option<SystemTime>)>,
    /// Since when `stat` has not changed.
    stable_since: Instant,
    /// Not before this (after a failure).
    not_before: Option<Instant>,
}

impl Candidate {
    fn new(now: Instant, writing: bool) -> Candidate {
        Candidate {
            writing,
            last_event: now,
            stat: None,
            stable_since: now,
            not_before: None,
        }
    }
}

struct Inbox {
    dir: PathBuf,
    processed: PathBuf,
    rejected: PathBuf,
    settle: Duration,
    write_timeout: Duration,
    ingestor: Arc<Ingestor>,
    candidates: HashMap<PathBuf, Candidate>,
}

/// Watches `config.dir` and ingests what arrives, until `shutdown`.
pub async fn run(config: InboxConfig, ingestor: Arc<Ingestor>, shutdown: CancellationToken) {
    // The watcher reports absolute paths; a relative `inbox.dir` (the default) must be made absolute the
    // same way, or no event would ever match the folder.
    let dir = std::path::absolute(&config.dir).unwrap_or_else(|_| config.dir.clone());
    let mut inbox = Inbox {
        processed: dir.join(PROCESSED_DIR),
        rejected: dir.join(REJECTED_DIR),
        dir,
        settle: config.settle,
        write_timeout: config.write_timeout,
        ingestor,
        candidates: HashMap::new(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<DebounceEventResult>();
    let mut watcher = None;
    let mut backoff = Duration::from_secs(1);
    let mut next_watch_attempt = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut rescan = tokio::time::interval(config.rescan_interval);
    rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick of `rescan` fires at once: that is the start-up scan.

    loop {
        if watcher.is_none() && Instant::now() >= next_watch_attempt {
            match inbox.start_watcher(tx.clone()) {
                Ok(w) => {
                    tracing::info!(
                        "watching inbox {} (handled notices move to {}, refused ones to {})",
                        inbox.dir.display(),
                        inbox.processed.display(),
                        inbox.rejected.display()
                    );
                    watcher = Some(w);
                    backoff = Duration::from_secs(1);
                    // Files that arrived before the watch began.
                    inbox.scan();
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot watch inbox {}: {e}; trying again in {}s, scanning it every {}s meanwhile",
                        inbox.dir.display(),
                        backoff.as_secs(),
                        config.rescan_interval.as_secs()
                    );
                    next_watch_attempt = Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_WATCH_BACKOFF);
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(result) = rx.recv() => match result {
                Ok(events) => {
                    for event in events {
                        if inbox.on_event(&event) {
                            tracing::warn!("inbox {} was removed; recreating it", inbox.dir.display());
                            watcher = None;
                        }
                    }
                }
                Err(errors) => {
                    for e in errors {
                        tracing::warn!("inbox watcher error on {}: {e}; restarting the watcher", inbox.dir.display());
                    }
                    watcher = None;
                }
            },
            _ = tick.tick() => inbox.handle_ready(&shutdown).await,
            _ = rescan.tick() => {
                if !inbox.dir.is_dir() {
                    watcher = None;
                }
                inbox.scan();
            }
        }
    }
    drop(watcher);
    tracing::debug!("inbox watcher stopped");
}

impl Inbox {
    fn start_watcher(
        &self,
        tx: mpsc::UnboundedSender<DebounceEventResult>,
    ) -> Result<Debouncer<RecommendedWatcher, RecommendedCache>, notify::Error> {
        for dir in [&self.dir, &self.processed, &self.rejected] {
            std::fs::create_dir_all(dir).map_err(|e| notify::Error::io(e).add_path(dir.clone()))?;
        }
        let mut debouncer = new_debouncer(DEBOUNCE, None, move |result: DebounceEventResult| {
            // The receiver is gone only when the source stops; nothing is left to tell.
            let _ = tx.send(result);
        })?;
        debouncer.watch(&self.dir, RecursiveMode::NonRecursive)?;
        Ok(debouncer)
    }

    /// The candidate for `path`, if it is a name the inbox takes.
    fn candidate(&mut self, path: &Path) -> Option<&mut Candidate> {
        if path.parent() != Some(self.dir.as_path()) {
            return None;
        }
        if path.file_name()?.to_str().is_some_and(is_ignored) {
            return None;
        }
        let now = Instant::now();
        let c = self
            .candidates
            .entry(path.to_path_buf())
            .or_insert_with(|| Candidate::new(now, true));
        c.last_event = now;
        Some(c)
    }

    /// Applies one watcher event; returns true when the inbox folder itself went away.
    fn on_event(&mut self, event: &DebouncedEvent) -> bool {
        if event.need_rescan() {
            tracing::warn!(
                "inbox watcher overflowed; scanning {} in full",
                self.dir.display()
            );
            self.scan();
            return false;
        }
        let paths = &event.paths;
        match event.kind {
            EventKind::Create(_)
            | EventKind::Modify(
                ModifyKind::Data(_) | ModifyKind::Any | ModifyKind::Other | ModifyKind::Metadata(_),
            ) => {
                for p in paths {
                    if let Some(c) = self.candidate(p) {
                        c.writing = true;
                    }
                }
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                for p in paths {
                    if let Some(c) = self.candidate(p) {
                        c.writing = false;
                    }
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                for p in paths {
                    if let Some(c) = self.candidate(p) {
                        c.writing = false;
                    }
                }
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                if let [from, to] = paths.as_slice() {
                    self.candidates.remove(from);
                    if let Some(c) = self.candidate(to) {
                        c.writing = false;
                    }
                }
            }
            EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => {
                for p in paths {
                    self.candidates.remove(p);
                    if p == &self.dir {
                        return true;
                    }
                }
            }
            _ => {}
        }
        false
    }

    /// Adds every file in the inbox that is not known yet.
    fn scan(&mut self) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!("cannot scan inbox {}: {e}", self.dir.display());
                return;
            }
        };
        let now = Instant::now();
        for entry in entries.flatten() {
            let path = entry.path();
            let is_file = std::fs::metadata(&path)
                .map(|m| m.is_file())
                .unwrap_or(false);
            let name = entry.file_name();
            if !is_file || name.to_str().is_some_and(is_ignored) {
                continue;
            }
            self.candidates
                .entry(path)
                .or_insert_with(|| Candidate::new(now, false));
        }
    }

    /// Takes every candidate that is complete, one after another.
    async fn handle_ready(&mut self, shutdown: &CancellationToken) {
        let now = Instant::now();
        let mut ready = Vec::new();
        self.candidates.retain(|path, c| {
            let meta = match std::fs::metadata(path) {
                Ok(m) if m.is_file() => m,
                _ => return false,
            };
            let stat = Some((meta.len(), meta.modified().ok()));
            if c.stat != stat {
                c.stat = stat;
                c.stable_since = now;
            }
            let stable = now.duration_since(c.stable_since) >= self.settle;
            let quiet = now.duration_since(c.last_event) >= if c.writing { self.write_timeout } else { Duration::ZERO };
            let due = c.not_before.is_none_or(|t| now >= t);
            if stable && quiet && due {
                if c.writing {
                    tracing::warn!(
                        "{} is still open for writing but nothing wrote to it for {}s; taking it as complete",
                        path.display(),
                        self.write_timeout.as_secs()
                    );
                }
                ready.push(path.clone());
            }
            true
        });
        ready.sort();
        for path in ready {
            if shutdown.is_cancelled() {
                return;
            }
            match self.handle(&path).await {
                Ok(()) => {
                    self.candidates.remove(&path);
                }
                Err(e) => {
                    tracing::error!(
                        "{}: {e}; it stays in the inbox and is tried again in {}s",
                        path.display(),
                        RETRY_AFTER.as_secs()
                    );
                    if let Some(c) = self.candidates.get_mut(&path) {
                        c.not_before = Some(Instant::now() + RETRY_AFTER);
                    }
                }
            }
        }
    }

    /// Ingests one file and moves it to `processed/` or `rejected/`.
    async fn handle(&self, path: &Path) -> Result<(), HandleError> {
        let report = match self.ingestor.ingest_file(path, SourceKind::Inbox).await {
            Ok(report) => report,
            Err(IngestError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(());
            }
            Err(e) => return Err(HandleError::Ingest(e)),
        };
        let moved = if report.is_accepted() {
            move_no_clobber(path, &self.processed, None)
        } else {
            move_no_clobber(path, &self.rejected, Some(&report))
        };
        match moved {
            Ok(dest) => {
                tracing::debug!("{} moved to {}", path.display(), dest.display());
                Ok(())
            }
            Err(e) => Err(HandleError::Move(e)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum HandleError {
    #[error(transparent)]
    Ingest(IngestError),
    #[error("recorded, but cannot move it out of the inbox: {0}")]
    Move(io::Error),
}

/// `name` with `.<n>` before its extension: `notice.json` → `notice.1.json`.
fn numbered(name: &std::ffi::OsStr, n: u32) -> OsString {
    if n == 0 {
        return name.to_owned();
    }
    let path = Path::new(name);
    match (path.file_stem(), path.extension()) {
        (Some(stem), Some(ext)) => {
            let mut s = stem.to_owned();
            s.push(format!(".{n}."));
            s.push(ext);
            s
        }
        _ => {
            let mut s = name.to_owned();
            s.push(format!(".{n}"));
            s
        }
    }
}

/// Moves `path` into `dir` under its own name, or a numbered one if that is taken; never replaces a file.
/// With a report, writes `<final name>.error.txt` beside it first.
fn move_no_clobber(path: &Path, dir: &Path, report: Option<&IngestReport>) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    std::fs::create_dir_all(dir)?;
    for n in 0..10_000 {
        let dest = dir.join(numbered(name, n));
        let error_file = report.map(|_| {
            let mut e = dest.clone().into_os_string();
            e.push(".error.txt");
            PathBuf::from(e)
        });
        if let (Some(report), Some(error_file)) = (report, &error_file) {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(error_file)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    f.write_all(report.error_file_text().as_bytes())?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        // A hard link fails if the name exists, so a file there is never replaced, even in a race.
        let placed = match std::fs::hard_link(path, &dest) {
            Ok(()) => std::fs::remove_file(path).map(|()| true),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            // File systems without hard links: check, then rename.
            Err(_) if std::fs::symlink_metadata(&dest).is_err() => {
                std::fs::rename(path, &dest).map(|()| true)
            }
            Err(_) => Ok(false),
        };
        match placed {
            Ok(true) => return Ok(dest),
            Ok(false) => {
                if let Some(error_file) = &error_file {
                    let _ = std::fs::remove_file(error_file);
                }
            }
            Err(e) => {
                if let Some(error_file) = &error_file {
                    let _ = std::fs::remove_file(error_file);
                }
                return Err(e);
            }
        }
    }
    Err(io::Error::other(format!(
        "no free name for {} in {}",
        path.display(),
        dir.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_names() {
        for n in [".hidden.json", "a.json.tmp", "a.json.part", "a.json~"] {
            assert!(is_ignored(n), "{n}");
        }
        assert!(!is_ignored(
            "event_metadata_jwst-program-5105_hourly_20260422_143523.json"
        ));
    }

    #[test]
    fn numbered_names_keep_the_extension() {
        assert_eq!(numbered("a.json".as_ref(), 0), "a.json");
        assert_eq!(numbered("a.json".as_ref(), 2), "a.2.json");
        assert_eq!(numbered("a.b.json".as_ref(), 1), "a.b.1.json");
        assert_eq!(numbered("notice".as_ref(), 1), "notice.1");
    }

    #[test]
    fn moving_never_replaces_a_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("processed");
        for i in 0..3 {
            let src = tmp.path().join("n.json");
            std::fs::write(&src, format!("{i}")).unwrap();
            move_no_clobber(&src, &dir, None).unwrap();
        }
        for (name, content) in [("n.json", "0"), ("n.1.json", "1"), ("n.2.json", "2")] {
            assert_eq!(std::fs::read_to_string(dir.join(name)).unwrap(), content);
        }
    }
}
