//! The inbox source: a watched folder that notices are dropped (or written, or renamed) into.
//!
//! A file is read once it is complete: renamed in, or closed after its last write, with its size and time
//! unchanged for `inbox.settle`. Whether a writer may still be at a file (one found by a scan, or one whose
//! close the watcher never reported) is asked of the kernel, not guessed from the file's age: a file no
//! process holds open for writing is taken at once, one that is still open waits (see [`writers`]). Only
//! where that cannot be told (a file of another owner without CAP_LEASE and an unreadable `/proc`, a network
//! file system), a file still open, or empty, or found by a scan with a last change more recent than
//! `inbox.write_timeout`, is waited for until nothing has written to it for that long. The folder is
//! scanned at start-up (files that came while the daemon was down), after a watcher overflow, and every
//! `inbox.rescan_interval` as a safety net. Only regular files are taken, never through a symbolic link;
//! anything else in the folder (a link, a FIFO, a socket, a device, a folder other than `processed/` and
//! `rejected/`) is named once in the log with the reason, and again only if it is replaced.
//!
//! A file is read through one open handle, and moved only if its name still holds that same file, unchanged:
//! a notice replaced or extended while it was being read is read again, never moved away unrecorded.
//! Handled files move to `processed/`, refused ones to `rejected/` beside `<name>.error.txt`; nothing there
//! is ever overwritten. If the notice could not be recorded (the database is unavailable) the file stays in
//! the inbox and is tried again. A watcher that fails is logged and restarted with backoff; meanwhile the
//! periodic scan keeps notices flowing.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::MetadataExt;
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
use crate::fsutil::rename_no_replace;
use crate::ingest::{FileIdentity, IngestError, IngestReport, Ingestor};
use crate::store::SourceKind;

/// Handled notices go here, inside the inbox.
pub const PROCESSED_DIR: &str = "processed";
/// Refused notices go here, inside the inbox, each beside `<name>.error.txt`.
pub const REJECTED_DIR: &str = "rejected";

/// How often pending files are looked at.
const TICK: Duration = Duration::from_millis(50);
/// How often the inbox folder itself is looked at, besides the watcher's events.
const LOOK_EVERY: Duration = Duration::from_secs(1);
/// The debouncer's window: events on one path within it arrive together.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// After a failure to record a notice, it is tried again after this long.
const RETRY_AFTER: Duration = Duration::from_secs(30);
/// The longest wait between two attempts to start the watcher.
const MAX_WATCH_BACKOFF: Duration = Duration::from_secs(60);
/// A watcher that ran this long without error earns a fresh backoff.
const WATCH_HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// A file found open for writing is asked about again after this long (its close is normally reported
/// by the watcher sooner).
const WRITER_RECHECK: Duration = Duration::from_secs(1);
/// Where it could not be told whether a file is open for writing, it is asked again after this long.
const UNKNOWN_WRITER_RECHECK: Duration = Duration::from_secs(5);

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
    /// Something may still write it: created or modified and not closed since, or found by a scan with a
    /// recent modification time.
    writing: bool,
    /// The last sign of a writer: a create or write event, or (for a scanned file) its modification time.
    last_write: Instant,
    /// Size and modification time when last looked at.
    stat: Option<(u64, Option<SystemTime>)>,
    /// Since when `stat` has not changed.
    stable_since: Instant,
    /// Not before this (after a failure).
    not_before: Option<Instant>,
    /// Renamed into the inbox, and not written since: complete at once (a rename is atomic), no settling.
    renamed_in: bool,
    /// While `writing`, when to ask [`writers::open_for_writing`] (again).
    ask_writer_at: Instant,
    /// Its last answer since the last sign of a writer: a process holds the file open for writing
    /// (`Some(true)`), none does (`Some(false)`), or it cannot be told / was not asked (`None`).
    writer: Option<bool>,
}

impl Candidate {
    fn new(now: Instant, writing: bool) -> Candidate {
        Candidate {
            writing,
            last_write: now,
            stat: None,
            stable_since: now,
            not_before: None,
            renamed_in: false,
            ask_writer_at: now,
            writer: None,
        }
    }
}

/// What an entry the inbox never takes was when it was named in the log: (device, inode, file type).
type UntakenId = (u64, u64, u32);

/// What handling a ready file came to.
enum Handled {
    /// Recorded and moved away (or gone before it could be read).
    Done,
    /// Changed while it was read: look at it again.
    Changed,
}

struct Inbox {
    dir: PathBuf,
    processed: PathBuf,
    rejected: PathBuf,
    settle: Duration,
    write_timeout: Duration,
    ingestor: Arc<Ingestor>,
    candidates: HashMap<PathBuf, Candidate>,
    /// Entries the inbox never takes that were named in the log already, so that each is named once.
    untaken: HashMap<PathBuf, UntakenId>,
}

/// The file-system watcher and when to (re)start it.
struct Watch {
    watcher: Option<Debouncer<RecommendedWatcher, RecommendedCache>>,
    started: Instant,
    backoff: Duration,
    next_attempt: Instant,
}

impl Watch {
    /// Drops the watcher after a failure; the next start waits out a growing backoff.
    fn failed(&mut self) {
        self.watcher = None;
        if self.started.elapsed() >= WATCH_HEALTHY_AFTER {
            self.backoff = Duration::from_secs(1);
        }
        self.next_attempt = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(MAX_WATCH_BACKOFF);
    }
}

/// Watches `config.dir` and ingests what arrives, until `shutdown`.
pub async fn run(
    config: InboxConfig,
    ingestor: Arc<Ingestor>,
    vitals: Arc<crate::service::Vitals>,
    shutdown: CancellationToken,
) {
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
        untaken: HashMap::new(),
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<DebounceEventResult>();
    let mut watch = Watch {
        watcher: None,
        started: Instant::now(),
        backoff: Duration::from_secs(1),
        next_attempt: Instant::now(),
    };
    let mut tick = tokio::time::interval(TICK);
    let mut last_look = Instant::now();
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut rescan = tokio::time::interval(config.rescan_interval);
    rescan.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick of `rescan` fires at once: that is the start-up scan.

    loop {
        vitals.inbox_alive();
        if watch.watcher.is_none() && Instant::now() >= watch.next_attempt {
            match inbox.start_watcher(tx.clone()) {
                Ok(w) => {
                    tracing::info!(
                        "watching inbox {} (handled notices move to {}, refused ones to {})",
                        inbox.dir.display(),
                        inbox.processed.display(),
                        inbox.rejected.display()
                    );
                    watch.watcher = Some(w);
                    watch.started = Instant::now();
                    inbox.health("watching", true, None, 0).await;
                    // Files that arrived before the watch began.
                    inbox.scan();
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot watch inbox {}: {e}; trying again in {}s, scanning it every {}s meanwhile",
                        inbox.dir.display(),
                        watch.backoff.as_secs(),
                        config.rescan_interval.as_secs()
                    );
                    inbox
                        .health(
                            "scanning only",
                            false,
                            Some(format!("cannot watch: {e}")),
                            0,
                        )
                        .await;
                    watch.failed();
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
                            watch.failed();
                        }
                    }
                    // A notice renamed in is taken now, not at the next tick.
                    inbox.handle_ready(&shutdown).await;
                }
                Err(errors) => {
                    for e in errors {
                        tracing::warn!("inbox watcher error on {}: {e}; restarting the watcher", inbox.dir.display());
                    }
                    watch.failed();
                }
            },
            _ = tick.tick() => {
                // The watcher's event for the folder itself can be lost (seen under load): a look every
                // second catches a removed inbox all the same.
                if watch.watcher.is_some() && last_look.elapsed() >= LOOK_EVERY {
                    last_look = Instant::now();
                    if !inbox.dir.is_dir() {
                        tracing::warn!("inbox {} was removed; recreating it", inbox.dir.display());
                        watch.failed();
                    }
                }
                inbox.handle_ready(&shutdown).await
            }
            _ = rescan.tick() => {
                if !inbox.dir.is_dir() && watch.watcher.is_some() {
                    watch.failed();
                }
                inbox.scan();
            }
        }
    }
    drop(watch);
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

    /// The candidate for `path` (created as `writing` if new), if it is a name the inbox takes.
    fn candidate(&mut self, path: &Path) -> Option<&mut Candidate> {
        if path.parent() != Some(self.dir.as_path())
            || path.file_name()?.to_str().is_some_and(is_ignored)
        {
            return None;
        }
        let now = Instant::now();
        Some(
            self.candidates
                .entry(path.to_path_buf())
                .or_insert_with(|| Candidate::new(now, true)),
        )
    }

    /// Notes a sign of a writer on `path`.
    fn written(&mut self, path: &Path) {
        if let Some(c) = self.candidate(path) {
            c.writing = true;
            c.renamed_in = false;
            c.last_write = Instant::now();
            // "No writer" was true before this write, not after it; the next question is not brought
            // forward, though: a slow writer must not cost a look in /proc at every write.
            if c.writer == Some(false) {
                c.writer = None;
            }
        }
    }

    /// Notes that `path` was renamed into the inbox: whole, and taken without settling.
    fn renamed(&mut self, path: &Path) {
        self.completed(path);
        if let Some(c) = self.candidate(path) {
            c.renamed_in = true;
        }
    }

    /// Notes that `path` is complete as far as the watcher can tell (closed, or renamed in).
    fn completed(&mut self, path: &Path) {
        if let Some(c) = self.candidate(path) {
            c.writing = false;
            c.not_before = None;
        }
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
            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any | ModifyKind::Other) => {
                paths.iter().for_each(|p| self.written(p));
            }
            // chmod, touch, or times set after a copy: nothing was written.
            EventKind::Modify(ModifyKind::Metadata(_)) => {}
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                paths.iter().for_each(|p| self.completed(p));
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                paths.iter().for_each(|p| self.renamed(p));
            }
            EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => {
                if let [from, to] = paths.as_slice() {
                    self.candidates.remove(from);
                    self.untaken.remove(from);
                    self.untaken.remove(to);
                    self.renamed(to);
                }
            }
            EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => {
                for p in paths {
                    self.candidates.remove(p);
                    self.untaken.remove(p);
                    if p == &self.dir {
                        return true;
                    }
                }
            }
            _ => {}
        }
        false
    }

    /// Adds every regular file in the inbox that is not known yet, and names (once) what it never takes.
    /// A file changed within `write_timeout` may still have a writer the watcher never told us about: it
    /// is `writing` until [`writers::open_for_writing`] says otherwise (or, if that cannot tell, until
    /// `write_timeout` has passed since its last change).
    fn scan(&mut self) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) => {
                tracing::warn!("cannot scan inbox {}: {e}", self.dir.display());
                return;
            }
        };
        let now = Instant::now();
        let mut present = HashSet::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(is_ignored) {
                continue;
            }
            // Not followed: a symbolic link is described as itself.
            let Ok(meta) = entry.metadata() else { continue };
            let path = entry.path();
            if !meta.file_type().is_file() {
                self.note_untaken(&path, &meta);
                present.insert(path);
                continue;
            }
            let age = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .unwrap_or(Duration::ZERO);
            self.candidates.entry(path).or_insert_with(|| Candidate {
                last_write: now.checked_sub(age).unwrap_or(now),
                ..Candidate::new(now, age < self.write_timeout)
            });
        }
        // Gone since (or now a regular file): named again if it comes back.
        self.untaken.retain(|path, _| present.contains(path));
    }

    /// Names `path`, which the inbox never takes, in the log with the reason and what to do: once, and
    /// again only if it is replaced by something else. `processed/`, `rejected/` and ignored names are
    /// left alone silently.
    fn note_untaken(&mut self, path: &Path, meta: &std::fs::Metadata) {
        let Some(name) = path.file_name() else { return };
        if name.to_str().is_some_and(is_ignored)
            || (meta.is_dir() && (name == PROCESSED_DIR || name == REJECTED_DIR))
            || meta.is_file()
        {
            return;
        }
        let id = (meta.dev(), meta.ino(), meta.mode() & nix::libc::S_IFMT);
        if self.untaken.insert(path.to_path_buf(), id) == Some(id) {
            return;
        }
        tracing::warn!("{}", untaken_reason(path, meta, &self.dir));
    }

    /// Asks, for every candidate that may still be written and is due, whether a process holds it open
    /// for writing. No writer: it is as good as closed (it still settles). A writer: it waits, and is
    /// asked again. Cannot tell: the rule by age decides.
    async fn ask_writers(&mut self) {
        let now = Instant::now();
        let due: Vec<PathBuf> = self
            .candidates
            .iter()
            .filter(|(_, c)| {
                c.writing
                    && !c.renamed_in
                    && c.ask_writer_at <= now
                    && c.not_before.is_none_or(|t| now >= t)
            })
            .map(|(path, _)| path.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        // A look in /proc can take a while on a busy host: not on the runtime's threads.
        let answers = tokio::task::spawn_blocking(move || {
            due.into_iter()
                .map(|path| {
                    let answer = writers::writer_of(&path);
                    (path, answer)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let now = Instant::now();
        for (path, answer) in answers {
            let Some(c) = self.candidates.get_mut(&path) else {
                continue;
            };
            if c.writer != answer {
                tracing::debug!(
                    "{}: {}",
                    path.display(),
                    match answer {
                        Some(false) => "no process holds it open for writing",
                        Some(true) => "still open for writing; waiting for it to be closed",
                        None => "cannot tell whether it is still open for writing",
                    }
                );
            }
            c.writer = answer;
            match answer {
                Some(false) => c.writing = false,
                Some(true) => c.ask_writer_at = now + WRITER_RECHECK,
                None => c.ask_writer_at = now + UNKNOWN_WRITER_RECHECK,
            }
        }
    }

    /// Takes every candidate that is complete, one after another.
    async fn handle_ready(&mut self, shutdown: &CancellationToken) {
        self.ask_writers().await;
        let now = Instant::now();
        let mut ready = Vec::new();
        let mut untaken = Vec::new();
        self.candidates.retain(|path, c| {
            if c.not_before.is_some_and(|t| now < t) {
                return true;
            }
            // Regular files only, and never through a symbolic link.
            let meta = match std::fs::symlink_metadata(path) {
                Ok(m) if m.file_type().is_file() => m,
                Ok(m) => {
                    untaken.push((path.clone(), m));
                    return false;
                }
                Err(_) => return false,
            };
            let stat = Some((meta.len(), meta.modified().ok()));
            if c.stat != stat {
                c.stat = stat;
                c.stable_since = now;
            }
            let stable = c.renamed_in || now.duration_since(c.stable_since) >= self.settle;
            // An empty file is most likely created and not yet written (touch, or a tool that opens first):
            // it waits as long as an open one before it is judged.
            let waiting = c.writing || meta.len() == 0;
            let quiet = !waiting || now.duration_since(c.last_write) >= self.write_timeout;
            if stable && quiet {
                if waiting {
                    tracing::warn!(
                        "{} is {} and nothing wrote to it for {}s; taking it as it is",
                        path.display(),
                        match (c.writing, c.writer) {
                            (true, Some(true)) => "still open for writing",
                            (true, _) => "perhaps still open for writing",
                            (false, _) => "empty",
                        },
                        self.write_timeout.as_secs()
                    );
                }
                ready.push(path.clone());
            }
            true
        });
        for (path, meta) in untaken {
            self.note_untaken(&path, &meta);
        }
        ready.sort();
        for path in ready {
            if shutdown.is_cancelled() {
                return;
            }
            match self.handle(&path).await {
                Ok(Handled::Done) => {
                    self.candidates.remove(&path);
                }
                Ok(Handled::Changed) => {
                    tracing::info!(
                        "{} changed while it was read; reading it again",
                        path.display()
                    );
                    if let Some(c) = self.candidates.get_mut(&path) {
                        c.stat = None;
                        c.writing = true;
                        c.last_write = Instant::now();
                        c.writer = None;
                        c.ask_writer_at = Instant::now();
                    }
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

    /// Records the watcher's health for `status` (`taken` notices are added to the count).
    async fn health(&self, state: &str, connected: bool, error: Option<String>, taken: u64) {
        let now = crate::store::now_ms();
        let h = crate::store::SourceHealth {
            source: "inbox".into(),
            state: state.into(),
            detail: Some(self.dir.display().to_string()),
            connected,
            last_contact: Some(now),
            last_error_at: error.as_ref().map(|_| now),
            last_error: error,
            taken,
            updated_at: now,
        };
        if let Err(e) = self.ingestor.store().record_source_health(&h).await {
            tracing::warn!("cannot record the inbox watcher's health: {e}");
        }
    }

    /// Ingests one file and moves it to `processed/` or `rejected/`, if its name still holds what was read.
    async fn handle(&self, path: &Path) -> Result<Handled, HandleError> {
        let (report, read) = match self.ingestor.ingest_path(path, SourceKind::Inbox).await {
            Ok(done) => done,
            Err(IngestError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                return Ok(Handled::Done);
            }
            Err(e) => return Err(HandleError::Ingest(e)),
        };
        // Replaced (renamed over, copied over) or extended while being read: what is there now is another
        // notice, unread. Re-reading is safe: the same content is recognised and recorded once.
        let now = std::fs::symlink_metadata(path).map(|m| FileIdentity::of(&m));
        if now.as_ref().ok() != Some(&read) {
            return Ok(Handled::Changed);
        }
        let moved = if report.is_accepted() {
            move_no_clobber(path, &self.processed, None)
        } else {
            move_no_clobber(path, &self.rejected, Some(&report))
        };
        match moved {
            Ok(dest) => {
                tracing::debug!("{} moved to {}", path.display(), dest.display());
                self.health("watching", true, None, 1).await;
                Ok(Handled::Done)
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
        match rename_no_replace(path, &dest) {
            Ok(()) => return Ok(dest),
            Err(e) => {
                if let Some(error_file) = &error_file {
                    let _ = std::fs::remove_file(error_file);
                }
                if e.kind() != io::ErrorKind::AlreadyExists {
                    return Err(e);
                }
            }
        }
    }
    Err(io::Error::other(format!(
        "no free name for {} in {}",
        path.display(),
        dir.display()
    )))
}

/// Why the inbox never takes `path` (described by `meta`, not followed) and what to do about it.
fn untaken_reason(path: &Path, meta: &std::fs::Metadata, inbox: &Path) -> String {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let p = path.display();
    if t.is_symlink() {
        format!(
            "{p} is a symbolic link; mastsub takes only regular files and never follows a link: copy the \
             notice in instead"
        )
    } else if t.is_fifo() {
        format!(
            "{p} is a named pipe (FIFO); mastsub takes only regular files: write the notice to a file and \
             move that into the inbox instead"
        )
    } else if t.is_dir() {
        format!(
            "{p} is a folder; mastsub does not look into folders in the inbox (other than {PROCESSED_DIR}/ \
             and {REJECTED_DIR}/): move the notices in it up into {}",
            inbox.display()
        )
    } else if t.is_socket() {
        format!(
            "{p} is a socket; mastsub takes only regular files: write the notice to a file and move that \
             into the inbox instead"
        )
    } else if t.is_block_device() || t.is_char_device() {
        format!(
            "{p} is a device file; mastsub takes only regular files: remove it from the inbox and move the \
             notice in as a file"
        )
    } else {
        format!(
            "{p} is not a regular file; mastsub takes only regular files: copy the notice in instead"
        )
    }
}

/// Whether any process holds a file open for writing, told from facts (on Linux), not from the file's age.
///
/// First a read lease, `fcntl(F_SETLEASE, F_RDLCK)`: the kernel grants it exactly when nothing on this host
/// has the file open for writing (a descriptor, or a shared writable mapping made from one), refuses it
/// with EAGAIN when something does (or holds a write lease on it), and it is released at once. It needs the
/// file's owner or CAP_LEASE, and a file system with leases (EACCES, EPERM, EINVAL otherwise). Where it is
/// refused, `/proc/[pid]/fd` (with the `flags:` of `/proc/[pid]/fdinfo`) and `/proc/[pid]/maps` of every
/// process are looked at; that tells only if every process can be seen and read. Neither sees a writer on
/// another host, so on a network (or FUSE) file system "no writer" is never concluded.
mod writers {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    use std::path::Path;

    use nix::libc;

    /// `F_SETSIG` of `<linux/fcntl.h>` (10 on every architecture); the libc crate has it only for musl.
    const F_SETSIG: libc::c_int = 10;
    /// The inode of the initial PID namespace (`PROC_PID_INIT_INO`): from it, every process is in /proc.
    const INITIAL_PID_NAMESPACE: &str = "pid:[4026531836]";

    /// File systems whose files other hosts (or a user-space server) may write: magic numbers of statfs(2).
    const SHARED_FILE_SYSTEMS: &[u32] = &[
        0x6969,      // NFS
        0x517B,      // SMB
        0xFF53_4D42, // CIFS
        0xFE53_4D42, // SMB2
        0x6573_5546, // FUSE (sshfs, rclone, virtiofs, ...)
        0x0102_1997, // 9p
        0x00C3_6400, // Ceph
        0x5346_414F, // AFS
        0x6B41_4653, // kAFS
        0x7375_7245, // Coda
        0x0116_1970, // GFS2
        0x7461_636F, // OCFS2
        0x0BD0_0BD0, // Lustre
        0x2003_0528, // OrangeFS
        0x4750_4653, // GPFS
        0x786F_4256, // vboxsf
    ];

    /// Opens `path` (read-only, not through a link, never blocking: a FIFO or a leased file must not hold
    /// the inbox up) and asks [`open_for_writing`]. `None` if it cannot be opened.
    pub(super) fn writer_of(path: &Path) -> Option<bool> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path);
        match file {
            Ok(file) => open_for_writing(path, &file),
            Err(e) => {
                tracing::debug!(
                    "{}: cannot open it to ask about writers: {e}",
                    path.display()
                );
                None
            }
        }
    }

    /// `Some(false)` when it is certain that no process holds `file` (opened read-only from `path`) open for
    /// writing, `Some(true)` when one does, `None` when it cannot be told. Our own read-only descriptor is
    /// not a writer.
    pub(super) fn open_for_writing(path: &Path, file: &File) -> Option<bool> {
        let meta = file.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        let answer = match read_lease(file) {
            Lease::Granted => Some(false),
            Lease::Refused => Some(true),
            Lease::Unavailable(e) => {
                tracing::debug!(
                    "{}: no read lease ({e}); looking in /proc for a writer",
                    path.display()
                );
                from_proc(path, meta.dev(), meta.ino())
            }
        };
        if answer == Some(false) && on_shared_file_system(file) {
            tracing::debug!(
                "{}: no writer on this host, but it is on a network file system",
                path.display()
            );
            return None;
        }
        answer
    }

    enum Lease {
        /// Granted (and released): nothing holds the file open for writing.
        Granted,
        /// EAGAIN: something holds it open for writing (or holds a write lease on it).
        Refused,
        /// Not ours to take (EACCES, EPERM), or no leases on this file system (EINVAL).
        Unavailable(io::Error),
    }

    fn read_lease(file: &File) -> Lease {
        let fd = file.as_raw_fd();
        // While the lease is held (two system calls), a process opening the file for writing makes the
        // kernel signal the holder: SIGIO by default, which would end the daemon. SIGURG is asked for
        // instead: ignored by default and handled nowhere in mastsub, it is dropped. The opener waits only
        // until the lease is released just below (or gets EWOULDBLOCK if it opens with O_NONBLOCK).
        // SAFETY: fcntl with integer arguments only, on a descriptor `file` keeps open throughout.
        if unsafe { libc::fcntl(fd, F_SETSIG, libc::SIGURG) } == -1 {
            return Lease::Unavailable(io::Error::last_os_error());
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK) } == 0 {
            // SAFETY: as above. Should this fail, closing `file` releases the lease all the same.
            unsafe { libc::fcntl(fd, libc::F_SETLEASE, libc::F_UNLCK) };
            return Lease::Granted;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAGAIN) {
            Lease::Refused
        } else {
            Lease::Unavailable(e)
        }
    }

    fn on_shared_file_system(file: &File) -> bool {
        match nix::sys::statfs::fstatfs(file) {
            // Magic numbers are 32 bits; f_type is signed on some targets.
            Ok(fs) => SHARED_FILE_SYSTEMS.contains(&(fs.filesystem_type().0 as u32)),
            Err(_) => true,
        }
    }

    /// The answer of `/proc` for the file (`dev`, `ino`): a writer found, or none among every process.
    fn from_proc(path: &Path, dev: u64, ino: u64) -> Option<bool> {
        let look = match look_in_proc(Path::new("/proc"), dev, ino) {
            Ok(look) => look,
            Err(e) => {
                tracing::debug!("{}: cannot read /proc: {e}", path.display());
                return None;
            }
        };
        if let Some(pid) = look.writer {
            tracing::debug!(
                "{}: process {pid} holds it open for writing",
                path.display()
            );
            return Some(true);
        }
        if look.unreadable > 0 {
            tracing::debug!(
                "{}: no writer among the processes mastsub may look at, but {} it may not",
                path.display(),
                look.unreadable
            );
            return None;
        }
        if !sees_every_process() {
            tracing::debug!(
                "{}: no writer in /proc, but this /proc does not show every process (a PID namespace, \
                 or hidepid)",
                path.display()
            );
            return None;
        }
        Some(false)
    }

    /// What a walk through `/proc` found.
    #[derive(Debug, Default)]
    pub(super) struct ProcLook {
        /// A process holding the file open for writing (the first found).
        pub writer: Option<u32>,
        /// Processes whose descriptors or mappings could not be read (not ours, or hidden).
        pub unreadable: usize,
    }

    /// Walks `/proc/[pid]` of every process for a descriptor open for writing (or a shared writable
    /// mapping) on the file (`dev`, `ino`); stops at the first.
    pub(super) fn look_in_proc(proc: &Path, dev: u64, ino: u64) -> io::Result<ProcLook> {
        let mut look = ProcLook::default();
        for entry in std::fs::read_dir(proc)? {
            let entry = entry?;
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            match process_writes(&entry.path(), dev, ino) {
                Ok(false) => {}
                Ok(true) => {
                    look.writer = Some(pid);
                    return Ok(look);
                }
                // Ended meanwhile: it writes nothing any more.
                Err(e) if gone(&e) => {}
                Err(_) => look.unreadable += 1,
            }
        }
        Ok(look)
    }

    /// The process ended while it was looked at (or its descriptor was closed).
    fn gone(e: &io::Error) -> bool {
        e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
    }

    /// Whether the process at `/proc/[pid]` (`base`) writes the file (`dev`, `ino`).
    fn process_writes(base: &Path, dev: u64, ino: u64) -> io::Result<bool> {
        for fd in std::fs::read_dir(base.join("fd"))? {
            let fd = fd?;
            let link = fd.path();
            // Files only: sockets, pipes and anonymous inodes are named `socket:[...]` and so on.
            match std::fs::read_link(&link) {
                Ok(target) if target.as_os_str().as_bytes().starts_with(b"/") => {}
                Ok(_) => continue,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            }
            let meta = match std::fs::metadata(&link) {
                Ok(meta) => meta,
                Err(e) if gone(&e) => continue,
                Err(e) => return Err(e),
            };
            if (meta.dev(), meta.ino()) != (dev, ino) {
                continue;
            }
            match fd_flags(&base.join("fdinfo").join(fd.file_name())) {
                Ok(flags) if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 => {
                    return Ok(true);
                }
                Ok(_) => {}
                Err(e) if gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        // A shared writable mapping outlives the descriptor it was made from, and still writes the file.
        let maps = std::fs::read_to_string(base.join("maps"))?;
        Ok(maps_write(&maps, ino))
    }

    /// The `flags:` line of a `/proc/[pid]/fdinfo/[fd]` file (octal).
    fn fd_flags(fdinfo: &Path) -> io::Result<u32> {
        let text = std::fs::read_to_string(fdinfo)?;
        text.lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            .ok_or_else(|| io::Error::other(format!("no flags in {}", fdinfo.display())))
    }

    /// Whether `/proc/[pid]/maps` text holds a shared writable mapping of inode `ino`. The device is not
    /// compared (for some file systems, btrfs among them, maps shows another one than stat): a match on the
    /// inode alone can only make a file wait, never take one too early.
    pub(super) fn maps_write(maps: &str, ino: u64) -> bool {
        maps.lines().any(|line| {
            let mut fields = line.split_ascii_whitespace();
            let perms = fields.nth(1).unwrap_or("").as_bytes();
            let inode = fields.nth(2).and_then(|i| i.parse::<u64>().ok());
            perms.get(1) == Some(&b'w') && perms.get(3) == Some(&b's') && inode == Some(ino)
        })
    }

    /// Whether this `/proc` shows every process of the host: the initial PID namespace (a container sees
    /// only its own), and a `/proc` mounted without `hidepid` (systemd's `ProtectProc=`).
    fn sees_every_process() -> bool {
        std::fs::read_link("/proc/self/ns/pid")
            .is_ok_and(|ns| ns.as_os_str() == INITIAL_PID_NAMESPACE)
            && std::fs::read_to_string("/proc/self/mountinfo")
                .is_ok_and(|m| proc_shows_every_pid(&m))
    }

    /// Whether the last `/proc` mount in `mountinfo` text has no `hidepid` (other than 0 / off).
    pub(super) fn proc_shows_every_pid(mountinfo: &str) -> bool {
        let options = mountinfo.lines().rev().find_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            (mount.split(' ').nth(4)? == "/proc").then(|| fs.split(' ').nth(2).unwrap_or(""))
        });
        options.is_some_and(|options| {
            !options.split(',').any(|o| {
                o.strip_prefix("hidepid=")
                    .is_some_and(|v| v != "0" && v != "off")
            })
        })
    }
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
    fn a_closed_file_has_no_writer_and_an_open_one_has() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("n.json");
        std::fs::write(&path, b"[]").unwrap();
        assert_eq!(writers::writer_of(&path), Some(false), "closed file");
        let held = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        assert_eq!(writers::writer_of(&path), Some(true), "open for writing");
        // Readers are not writers, and neither is the inbox's own read-only handle.
        let reader = std::fs::File::open(&path).unwrap();
        drop(held);
        assert_eq!(
            writers::writer_of(&path),
            Some(false),
            "open for reading only"
        );
        drop(reader);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(writers::writer_of(&path), None, "gone: cannot tell");
    }

    #[test]
    fn a_fifo_or_a_link_is_never_asked_about() {
        let tmp = tempfile::tempdir().unwrap();
        let fifo = tmp.path().join("pipe.json");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        // Opened without blocking (no writer will ever come) and not a regular file: no answer.
        assert_eq!(writers::writer_of(&fifo), None);
        let link = tmp.path().join("link.json");
        std::fs::write(tmp.path().join("target"), b"[]").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("target"), &link).unwrap();
        assert_eq!(writers::writer_of(&link), None);
    }

    #[test]
    fn a_writer_opening_the_file_while_the_lease_is_held_does_not_end_the_daemon() {
        // Each granted lease is broken by a writer opening the file meanwhile now and then: the kernel then
        // signals the holder, with SIGIO (fatal) unless F_SETSIG chose another signal.
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("n.json");
        std::fs::write(&path, b"[]").unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let opener = {
            let (path, stop) = (path.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut opens = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    drop(
                        std::fs::OpenOptions::new()
                            .append(true)
                            .open(&path)
                            .unwrap(),
                    );
                    opens += 1;
                }
                opens
            })
        };
        let mut answers = [0u32; 2];
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(1500) {
            match writers::writer_of(&path) {
                Some(open) => answers[usize::from(open)] += 1,
                None => panic!("no answer"),
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let opens = opener.join().unwrap();
        // Still here; and both answers came up, so leases were taken while the writer was at it.
        assert!(
            answers[0] > 0 && answers[1] > 0,
            "{answers:?} with {opens} opens"
        );
    }

    #[test]
    fn proc_names_a_process_holding_the_file_open_for_writing() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("n.json");
        std::fs::write(&path, b"[]").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let (dev, ino) = (meta.dev(), meta.ino());
        let reader = std::fs::File::open(&path).unwrap();
        let look = writers::look_in_proc(Path::new("/proc"), dev, ino).unwrap();
        assert_eq!(look.writer, None, "a reader taken for a writer");
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let look = writers::look_in_proc(Path::new("/proc"), dev, ino).unwrap();
        assert_eq!(look.writer, Some(std::process::id()));
        drop((reader, writer));
        let look = writers::look_in_proc(Path::new("/proc"), dev, ino).unwrap();
        assert_eq!(look.writer, None);
    }

    #[test]
    fn only_shared_writable_mappings_of_the_inode_write() {
        let maps = "\
55d0c000-55d0d000 r--p 00000000 fd:01 1234                       /usr/bin/cat
7f00a000-7f00b000 rw-p 00000000 fd:01 777                        /tmp/private.json
7f00c000-7f00d000 r--s 00000000 fd:01 888                        /tmp/read-shared.json
7f00e000-7f00f000 rw-s 00000000 fd:01 999                        /tmp/n.json
7ffd1000-7ffd2000 rw-p 00000000 00:00 0                          [stack]
";
        assert!(writers::maps_write(maps, 999));
        for ino in [1234, 777, 888, 0, 5] {
            assert!(!writers::maps_write(maps, ino), "{ino}");
        }
    }

    #[test]
    fn hidepid_hides_processes() {
        let line = |opts: &str| {
            format!(
                "20 26 0:5 / /sys rw,nosuid - sysfs sysfs rw\n\
                 22 27 0:21 / /proc rw,nosuid,nodev,noexec,relatime - proc proc {opts}\n"
            )
        };
        assert!(writers::proc_shows_every_pid(&line("rw")));
        assert!(writers::proc_shows_every_pid(&line("rw,hidepid=0")));
        assert!(writers::proc_shows_every_pid(&line(
            "rw,hidepid=off,subset=pid"
        )));
        assert!(!writers::proc_shows_every_pid(&line("rw,hidepid=2")));
        assert!(!writers::proc_shows_every_pid(&line(
            "rw,hidepid=invisible"
        )));
        assert!(!writers::proc_shows_every_pid(&line("rw,hidepid=noaccess")));
        // The last /proc mount is the one seen.
        let stacked = format!("{}{}", line("rw"), line("rw,hidepid=invisible"));
        assert!(!writers::proc_shows_every_pid(&stacked));
        assert!(!writers::proc_shows_every_pid(
            "20 26 0:5 / /sys rw - sysfs sysfs rw\n"
        ));
    }

    #[test]
    fn what_is_never_taken_is_named_with_a_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let inbox = tmp.path();
        std::os::unix::fs::symlink("/etc/hostname", inbox.join("link.json")).unwrap();
        nix::unistd::mkfifo(&inbox.join("pipe.json"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::create_dir(inbox.join("stray")).unwrap();
        for (name, words) in [
            (
                "link.json",
                "is a symbolic link; mastsub takes only regular files",
            ),
            ("pipe.json", "is a named pipe (FIFO)"),
            ("stray", "is a folder; mastsub does not look into folders"),
        ] {
            let path = inbox.join(name);
            let text = untaken_reason(&path, &std::fs::symlink_metadata(&path).unwrap(), inbox);
            assert!(text.contains(words), "{text}");
            assert!(text.contains(&path.display().to_string()), "{text}");
        }
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
