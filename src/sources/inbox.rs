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

use super::writers;
use crate::config::InboxConfig;
use crate::fsutil::rename_no_replace;
use crate::ingest::{FileIdentity, IngestError, IngestReport, Ingestor};
use crate::store::SourceKind;

/// Handled notices go here, inside the inbox.
pub const PROCESSED_DIR: &str = "processed";
/// In a cluster, each member's claimed files are in `<inbox>/.claimed/<node>/` while they are read.
pub const CLAIMED_DIR: &str = ".claimed";
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
    /// In a cluster, `<inbox>/.claimed/<node>/`: a file is taken by an atomic rename into it before it is
    /// read, so that members watching one shared inbox never read one file twice.
    claim_dir: Option<PathBuf>,
    /// A member not heard from for this long is gone: its claimed files are taken over.
    gone_after: Duration,
    /// Files in `claim_dir` still to be recorded (left by a crash, or not recorded for a failure), and
    /// when each is tried next.
    claimed: HashMap<PathBuf, Instant>,
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
/// `claim_as`: this member's `[cluster] node` and `download.lease` when the store is shared, so that the
/// inbox folder may be shared too (each file claimed by an atomic rename into `.claimed/<node>/` before it
/// is read; the claims of a member gone for 3 leases are taken over).
pub async fn run(
    config: InboxConfig,
    claim_as: Option<(String, Duration)>,
    ingestor: Arc<Ingestor>,
    vitals: Arc<crate::service::Vitals>,
    shutdown: CancellationToken,
) {
    // The watcher reports absolute paths; a relative `inbox.dir` (the default) must be made absolute the
    // same way, or no event would ever match the folder.
    let dir = std::path::absolute(&config.dir).unwrap_or_else(|_| config.dir.clone());
    let gone_after = claim_as
        .as_ref()
        .map_or(Duration::MAX, |(_, lease)| *lease * 3);
    let claim_dir = claim_as.map(|(node, _)| dir.join(CLAIMED_DIR).join(claim_folder(&node)));
    let mut inbox = Inbox {
        processed: dir.join(PROCESSED_DIR),
        rejected: dir.join(REJECTED_DIR),
        dir,
        settle: config.settle,
        write_timeout: config.write_timeout,
        ingestor,
        candidates: HashMap::new(),
        untaken: HashMap::new(),
        claim_dir,
        gone_after,
        claimed: HashMap::new(),
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
                inbox.handle_ready(&shutdown).await;
                inbox.handle_claimed(&shutdown).await;
            }
            _ = rescan.tick() => {
                if !inbox.dir.is_dir() && watch.watcher.is_some() {
                    watch.failed();
                }
                inbox.scan();
                inbox.adopt_claims().await;
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
        // This member's claimed files not recorded yet (a crash between the claim and the move).
        if let Some(own) = self.claim_dir.clone() {
            for file in claimed_files(&own) {
                self.claimed.entry(file).or_insert(Instant::now());
            }
        }
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

    /// Takes over the files claimed by members that are gone (not heard from for 3 leases) or stopped,
    /// by moving them into this member's folder; one member wins each (a rename).
    async fn adopt_claims(&mut self) {
        let Some(own) = self.claim_dir.clone() else {
            return;
        };
        let Some(root) = own.parent() else { return };
        let others: Vec<PathBuf> = match std::fs::read_dir(root) {
            Ok(entries) => entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()) && e.path() != own)
                .map(|e| e.path())
                .collect(),
            Err(_) => return,
        };
        if others.is_empty() {
            return;
        }
        let now = crate::store::now_ms();
        let members = match self.ingestor.store().members(now).await {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!("cannot read the members for their claimed notices: {e}");
                return;
            }
        };
        let gone_after = i64::try_from(self.gone_after.as_millis()).unwrap_or(i64::MAX);
        for dir in others {
            let Some(name) = dir.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let live = members.iter().any(|m| {
                claim_folder(&m.node) == name
                    && m.stopped_at.is_none()
                    && now.saturating_sub(m.last_heartbeat) <= gone_after
            });
            if live {
                continue;
            }
            for file in claimed_files(&dir) {
                match claim_into(&file, &own) {
                    Ok(taken) => {
                        tracing::info!(
                            "{} was claimed by the member {name:?}, which is gone or stopped: taken over as {}",
                            file.display(),
                            taken.display()
                        );
                        self.claimed.insert(taken, Instant::now());
                    }
                    // Another member took it first.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => tracing::warn!("cannot take over {}: {e}", file.display()),
                }
            }
        }
    }

    /// Records the claimed files that are due (left by a crash, or tried again after a failure).
    async fn handle_claimed(&mut self, shutdown: &CancellationToken) {
        let now = Instant::now();
        let mut due: Vec<PathBuf> = self
            .claimed
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(p, _)| p.clone())
            .collect();
        due.sort();
        for path in due {
            if shutdown.is_cancelled() {
                return;
            }
            match self.handle_at(&path).await {
                Ok(Handled::Done) => {
                    self.claimed.remove(&path);
                    // Its claim's own folder, now empty.
                    if let Some(folder) = path
                        .parent()
                        .filter(|f| Some(*f) != self.claim_dir.as_deref())
                    {
                        let _ = std::fs::remove_dir(folder);
                    }
                }
                Ok(Handled::Changed) => {
                    // Nothing but this member writes there: read it again at the next turn.
                    self.claimed.insert(path, now + TICK);
                }
                Err(e) => {
                    tracing::error!(
                        "{}: {e}; it stays there and is tried again in {}s",
                        path.display(),
                        RETRY_AFTER.as_secs()
                    );
                    self.claimed.insert(path, now + RETRY_AFTER);
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

    /// Takes one file: in a cluster, first claimed by a rename into this member's folder (a member that
    /// finds it gone lost the race, and is done with it), then recorded from there.
    async fn handle(&mut self, path: &Path) -> Result<Handled, HandleError> {
        let Some(claim_dir) = self.claim_dir.clone() else {
            return self.handle_at(path).await;
        };
        let claimed = match claim_into(path, &claim_dir) {
            Ok(claimed) => claimed,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Handled::Done),
            Err(e) => return Err(HandleError::Claim(e)),
        };
        tracing::debug!("{} claimed as {}", path.display(), claimed.display());
        self.claimed.insert(claimed, Instant::now());
        self.handle_claimed(&CancellationToken::new()).await;
        Ok(Handled::Done)
    }

    /// Ingests one file and moves it to `processed/` or `rejected/`, if its name still holds what was read.
    async fn handle_at(&self, path: &Path) -> Result<Handled, HandleError> {
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
    #[error("cannot claim it (move it into this member's folder of the shared inbox): {0}")]
    Claim(io::Error),
}

/// Claims `file` for the member whose folder is `own`: a plain rename into a folder of its own made for
/// this claim, `<own>/<pid>-<n>/<name>`. Of two members renaming one file only one succeeds (the other
/// finds it gone: `NotFound`), on NFS too, where the no-replace rename flag is refused and a link-then-
/// unlink fallback would let both succeed; the fresh folder means the rename replaces nothing.
fn claim_into(file: &Path, own: &Path) -> io::Result<PathBuf> {
    static CLAIMS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = file
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    std::fs::create_dir_all(own)?;
    let folder = loop {
        let n = CLAIMS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let folder = own.join(format!("{}-{n}", std::process::id()));
        match std::fs::create_dir(&folder) {
            Ok(()) => break folder,
            // Left by an earlier process of the same pid: the next number.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    };
    let claimed = folder.join(name);
    match std::fs::rename(file, &claimed) {
        Ok(()) => Ok(claimed),
        Err(e) => {
            let _ = std::fs::remove_dir(&folder);
            Err(e)
        }
    }
}

/// The files claimed in a member's folder `dir`: one in each claim's folder (and any loose one).
fn claimed_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_file() {
            files.push(entry.path());
        } else if kind.is_dir() {
            let mut inner = std::fs::read_dir(entry.path())
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.path())
                .peekable();
            if inner.peek().is_none() {
                // A claim whose file was recorded and moved away before its folder was removed.
                let _ = std::fs::remove_dir(entry.path());
            }
            files.extend(inner);
        }
    }
    files.sort();
    files
}

/// The folder of `.claimed/` that holds a member's claims: its node name, made one path component.
fn claim_folder(node: &str) -> String {
    node.replace(['/', '\0'], "_")
        .trim_start_matches('.')
        .to_string()
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
        // A process another test starts meanwhile would hold `held` until it execs.
        let _spawns = crate::test_support::SPAWNS.blocking_lock();
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
