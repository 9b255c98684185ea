//! Group commit of publication: finished downloads are made durable, renamed into place and recorded in
//! batches, as databases commit.
//!
//! A worker whose attempt ends hands it over and goes on with its next job at once: a verified `.part`
//! file to publish, or the end a failed attempt was given. The publisher takes whatever has been handed
//! over since its last batch (up to [`MAX_BATCH`]; nothing waits for a timer: what arrives while one batch
//! is written is the next batch) and, in one blocking call:
//!
//! 1. makes every `.part` file of the batch durable: one `syncfs` per file system when the batch has more
//!    than one file and the kernel reports write-back errors to `syncfs` (Linux 5.8 and later), an
//!    `fsync` of each file (issued in parallel) otherwise, or for a file whose `syncfs` failed, so that
//!    an I/O error is pinned on the file it struck;
//! 2. renames each durable file into place (after keeping the previous version if asked);
//! 3. fsyncs each folder it touched, once.
//!
//! Only then does the recorder store the ends, in one transaction with the claims of the workers
//! asking for their next job at that moment (claims never wait for a batch's disk work). So nothing is
//! visible at its final name before its bytes are durable, nothing is recorded done before it is in
//! place, and a kill -9 at any moment loses at most the batch in flight: its `.part` files stay, and
//! are found whole (416) and published on the next run, or a published file is fetched again once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};

use super::error::FetchError;
use super::fetch::{Fetched, Staged, place_error};
use super::{log_failure, policy};
use crate::config::DownloadConfig;
use crate::store::{Finish, Held, Job, Provenance, Store, now_ms};
use crate::verify::Verified;

/// The most files in one batch.
pub const MAX_BATCH: usize = 64;
/// How long ends the store refused wait before they are tried again.
const RETRY_RECORD: Duration = Duration::from_secs(1);

/// What the publisher and the recorder share with the pool.
pub struct Context {
    pub store: Arc<dyn Store>,
    pub owner: String,
    pub config: DownloadConfig,
    pub lease: Duration,
    /// Whether other processes share the store (PostgreSQL): then each batch's leases are checked, and
    /// renewed, just before its files are renamed into place.
    pub shared: bool,
    /// Counts of attempts and published bytes, for the metrics.
    pub vitals: Arc<crate::service::Vitals>,
}

/// The end of one attempt, handed over by its worker.
pub struct Hand {
    pub job: Job,
    pub outcome: Outcome,
    /// When the worker began the attempt (for the log line).
    pub started: Instant,
}

pub enum Outcome {
    /// A verified file, to publish and then record done.
    Fetched(Box<Fetched>),
    /// An attempt that failed, with the end the policy gave it.
    Ended(Finish),
}

enum ToPublisher {
    Hand(Box<Hand>),
    Flush(oneshot::Sender<()>),
}

/// What the log line of a download done says.
struct Summary {
    bytes: u64,
    resumed_from: u64,
    fetched: u64,
    verified: Verified,
    started: Instant,
    origin: crate::store::Origin,
}

struct End {
    job: Job,
    finish: Finish,
    done: Option<Summary>,
}

enum ToRecorder {
    Ends(Vec<End>),
    Claim(oneshot::Sender<Option<Job>>),
    Flush(oneshot::Sender<()>),
}

/// The pool's side of the publisher and the recorder, which run as tasks of their own.
pub struct Publication {
    publisher: mpsc::UnboundedSender<ToPublisher>,
    recorder: mpsc::UnboundedSender<ToRecorder>,
}

impl Publication {
    /// Starts the publisher and the recorder; they end when this is dropped.
    pub fn start(context: Context) -> Publication {
        let context = Arc::new(context);
        let (publisher, to_publisher) = mpsc::unbounded_channel();
        let (recorder, to_recorder) = mpsc::unbounded_channel();
        tokio::spawn(record(context.clone(), to_recorder));
        tokio::spawn(publish(context, to_publisher, recorder.clone()));
        Publication {
            publisher,
            recorder,
        }
    }

    /// Hands over the end of an attempt.
    pub fn hand(&self, hand: Hand) {
        if let Err(lost) = self.publisher.send(ToPublisher::Hand(Box::new(hand))) {
            // Only when the runtime is going down; the lease is given back with the pool's.
            let ToPublisher::Hand(h) = lost.0 else {
                return;
            };
            tracing::warn!(
                "{}: the publisher has stopped; the download is published on the next run",
                h.job.about()
            );
        }
    }

    /// Claims the next due job for a worker, with whatever else the recorder writes at the moment.
    pub async fn claim(&self) -> Option<Job> {
        self.claim_later().await.ok().flatten()
    }

    /// Asks for the next due job now, to be taken later: the claim goes with the recorder's next
    /// turn while the worker finishes its current job.
    pub fn claim_later(&self) -> oneshot::Receiver<Option<Job>> {
        let (tx, rx) = oneshot::channel();
        let _ = self.recorder.send(ToRecorder::Claim(tx));
        rx
    }

    /// Waits until everything handed over before is published and recorded.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.publisher.send(ToPublisher::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn publish(
    context: Arc<Context>,
    mut from_workers: mpsc::UnboundedReceiver<ToPublisher>,
    recorder: mpsc::UnboundedSender<ToRecorder>,
) {
    while let Some(first) = from_workers.recv().await {
        let mut hands = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                ToPublisher::Hand(h) => hands.push(*h),
                ToPublisher::Flush(f) => flushes.push(f),
            }
            next = if hands.len() < MAX_BATCH {
                from_workers.try_recv().ok()
            } else {
                None
            };
        }
        // Failed attempts are ends already; fetched files become ends once published.
        let mut ends = Vec::with_capacity(hands.len());
        let mut files = Vec::new();
        let mut fetched = Vec::new();
        for Hand {
            job,
            outcome,
            started,
        } in hands
        {
            match outcome {
                Outcome::Ended(finish) => ends.push(End {
                    job,
                    finish,
                    done: None,
                }),
                Outcome::Fetched(f) => {
                    let Fetched {
                        bytes,
                        resumed_from,
                        fetched: got,
                        verified,
                        staged,
                        origin,
                    } = *f;
                    files.push(staged);
                    let summary = Summary {
                        bytes,
                        resumed_from,
                        fetched: got,
                        verified,
                        started,
                        origin,
                    };
                    fetched.push((job, summary));
                }
            }
        }
        if context.shared && !files.is_empty() {
            // A worker whose lease was taken over (this member cut off from the database, or stalled
            // longer than a lease) must not rename its file over what the job's new holder writes: its
            // `.part` is left to that holder, and its end is not recorded (it would be refused).
            let held: Vec<Held> = fetched.iter().map(|(job, _)| job.held()).collect();
            let until = now_ms() + i64::try_from(context.lease.as_millis()).unwrap_or(i64::MAX / 2);
            match context.store.hold(&context.owner, &held, until).await {
                Ok(still) => {
                    let mut kept_files = Vec::with_capacity(files.len());
                    let mut kept = Vec::with_capacity(fetched.len());
                    for ((staged, pair), held) in files.into_iter().zip(fetched).zip(still) {
                        if held {
                            kept_files.push(staged);
                            kept.push(pair);
                        } else {
                            tracing::warn!(
                                "{}: its lease was taken over before it could be published; its .part \
                                 file is left to the job's new holder",
                                pair.0.about()
                            );
                        }
                    }
                    files = kept_files;
                    fetched = kept;
                }
                // The database does not answer: published unchecked, as on a single host (a lease is
                // taken over only once it has run out, and the end's record is fenced all the same).
                Err(e) => tracing::warn!("cannot check the leases before publication: {e}"),
            }
        }
        if !files.is_empty() {
            let count = files.len();
            let began = Instant::now();
            let published = tokio::task::spawn_blocking(move || publish_all(files))
                .await
                .unwrap_or_else(|e| {
                    (0..count)
                        .map(|_| Err(FetchError::Internal(format!("publication failed: {e}"))))
                        .collect()
                });
            tracing::debug!(
                "published {count} file(s) in {:.1} ms",
                began.elapsed().as_secs_f64() * 1e3
            );
            let now = now_ms();
            for ((job, summary), result) in fetched.into_iter().zip(published) {
                ends.push(match result {
                    Ok(()) => End {
                        finish: Finish::Done {
                            bytes: summary.bytes as i64,
                            verified: summary.verified.by.clone(),
                            origin: Some(summary.origin.clone()),
                        },
                        job,
                        done: Some(summary),
                    },
                    Err(e) => {
                        let finish = policy::decide(&context.config, &job, &e, now);
                        log_failure(&job, &e, &finish, now);
                        End {
                            job,
                            finish,
                            done: None,
                        }
                    }
                });
            }
        }
        if !ends.is_empty() {
            let _ = recorder.send(ToRecorder::Ends(ends));
        }
        for flush in flushes {
            let _ = recorder.send(ToRecorder::Flush(flush));
        }
    }
}

async fn record(context: Arc<Context>, mut from: mpsc::UnboundedReceiver<ToRecorder>) {
    // Ends the store refused (it was busy or failing), tried again with the next turn.
    let mut pending: Vec<End> = Vec::new();
    loop {
        let first = if pending.is_empty() {
            from.recv().await
        } else {
            match tokio::time::timeout(RETRY_RECORD, from.recv()).await {
                Ok(message) => message,
                Err(_) => Some(ToRecorder::Ends(Vec::new())),
            }
        };
        let Some(first) = first else {
            break;
        };
        let mut ends = std::mem::take(&mut pending);
        let mut claims = Vec::new();
        let mut flushes = Vec::new();
        let mut next = Some(first);
        while let Some(message) = next {
            match message {
                ToRecorder::Ends(e) => ends.extend(e),
                ToRecorder::Claim(c) => claims.push(c),
                ToRecorder::Flush(f) => flushes.push(f),
            }
            next = from.try_recv().ok();
        }
        if ends.is_empty() && claims.is_empty() {
            for f in flushes {
                let _ = f.send(());
            }
            continue;
        }
        let pairs: Vec<(Held, Finish)> = ends
            .iter()
            .map(|e| (e.job.held(), e.finish.clone()))
            .collect();
        let now = now_ms();
        let lease_until = now + i64::try_from(context.lease.as_millis()).unwrap_or(i64::MAX / 2);
        match context
            .store
            .end_and_claim(&context.owner, &pairs, claims.len(), now, lease_until)
            .await
        {
            Ok((recorded, jobs)) => {
                for (end, recorded) in ends.iter().zip(recorded) {
                    if recorded {
                        count(&context.vitals, &end.finish);
                    }
                    if !recorded {
                        tracing::warn!(
                            "{}: the job's lease was lost before its end could be recorded",
                            end.job.about()
                        );
                    } else if let Some(s) = &end.done {
                        log_done(&end.job, s);
                    }
                }
                if !ends.is_empty() {
                    context.vitals.hooks_wake.notify_one();
                }
                let mut jobs = jobs.into_iter();
                for claim in claims {
                    // A worker that stopped waiting (aborted at shutdown) leaves its job running under
                    // this pool's lease, which the pool gives back as it stops.
                    let _ = claim.send(jobs.next());
                }
            }
            Err(e) => {
                tracing::error!(
                    "cannot record the end of {} download(s): {e}; trying again in {}s",
                    ends.len(),
                    RETRY_RECORD.as_secs()
                );
                for claim in claims {
                    let _ = claim.send(None);
                }
                pending = ends;
            }
        }
        for f in flushes {
            let _ = f.send(());
        }
    }
}

/// An end recorded, in the metrics.
fn count(vitals: &crate::service::Vitals, finish: &Finish) {
    use std::sync::atomic::Ordering::Relaxed;
    let a = &vitals.attempts;
    match finish {
        Finish::Done { bytes, origin, .. } => {
            a.done.fetch_add(1, Relaxed);
            let bytes = u64::try_from(*bytes).unwrap_or(0);
            vitals.published.fetch_add(bytes, Relaxed);
            let by = vitals.published_from(origin.as_ref().map_or(Provenance::Mast, |o| o.source));
            by.products.fetch_add(1, Relaxed);
            by.bytes.fetch_add(bytes, Relaxed);
        }
        Finish::Retry { .. } => {
            a.retry.fetch_add(1, Relaxed);
        }
        Finish::GiveUp {
            state: crate::store::DownloadState::NeedsAuth,
            ..
        } => {
            a.needs_auth.fetch_add(1, Relaxed);
        }
        Finish::GiveUp { .. } => {
            a.failed.fetch_add(1, Relaxed);
        }
    }
}

fn log_done(job: &Job, s: &Summary) {
    let secs = s.started.elapsed().as_secs_f64();
    tracing::info!(
        "done {}: {} bytes from {} in {:.1}s, {:.1} MB/s, attempt {}{}; verified: {}",
        job.about(),
        s.bytes,
        match s.origin.source {
            Provenance::Cloud => format!("the cloud bucket ({})", s.origin.url),
            Provenance::Mast => "MAST".to_string(),
        },
        secs,
        s.fetched as f64 / secs.max(1e-3) / 1e6,
        job.attempt,
        if s.resumed_from > 0 {
            format!(", resumed at byte {}", s.resumed_from)
        } else {
            String::new()
        },
        s.verified.by
    );
    if !s.verified.format_known {
        tracing::info!(
            "{}: mastsub has no verifier for this format; only its size was checked",
            job.about()
        );
    }
}

/// Blocking: makes the files durable, renames them into place, fsyncs their folders; one result per file,
/// in order.
fn publish_all(files: Vec<Staged>) -> Vec<Result<(), FetchError>> {
    let mut results = make_durable(&files);
    for (staged, result) in files.iter().zip(results.iter_mut()) {
        if result.is_ok() {
            *result = rename_into_place(staged);
        }
    }
    // Each folder once, for the files renamed in it.
    let mut folders: Vec<(&Staged, Vec<usize>)> = Vec::new();
    for (i, staged) in files.iter().enumerate() {
        if results[i].is_err() {
            continue;
        }
        match folders
            .iter_mut()
            .find(|(first, _)| first.dir.path() == staged.dir.path())
        {
            Some((_, members)) => members.push(i),
            None => folders.push((staged, vec![i])),
        }
    }
    let synced = in_parallel(&folders, |(staged, _)| {
        staged.dir.fsync().map_err(|e| match e {
            crate::fsutil::PlaceError::Io { source, .. } => source,
            other => std::io::Error::other(other.to_string()),
        })
    });
    for ((staged, members), outcome) in folders.iter().zip(synced) {
        if let Err(e) = outcome {
            for &i in members {
                results[i] = Err(FetchError::local(
                    "fsync",
                    staged.dir.path(),
                    match e.raw_os_error() {
                        Some(code) => std::io::Error::from_raw_os_error(code),
                        None => std::io::Error::new(e.kind(), e.to_string()),
                    },
                ));
            }
        }
    }
    results
}

/// Blocking: the `.part` files' bytes durable, one result per file.
fn make_durable(files: &[Staged]) -> Vec<Result<(), FetchError>> {
    let fsync = |s: &Staged| {
        s.file
            .sync_all()
            .map_err(|e| FetchError::local("fsync", s.dir.path().join(&s.part), e))
    };
    if files.len() < 2 || !syncfs_reports_errors() {
        return in_parallel(files, fsync);
    }
    // One syncfs per file system; where it fails (or the file system cannot be told), fsyncs, which name
    // the files an error struck.
    let mut synced: std::collections::HashMap<u64, bool> = std::collections::HashMap::new();
    files
        .iter()
        .map(|s| {
            use std::os::unix::fs::MetadataExt;
            let device = s.file.metadata().ok().map(|m| m.dev());
            let whole = device.is_some_and(|d| {
                *synced
                    .entry(d)
                    .or_insert_with(|| nix::unistd::syncfs(&s.file).is_ok())
            });
            if whole { Ok(()) } else { fsync(s) }
        })
        .collect()
}

/// Whether `syncfs` reports write-back errors (Linux 5.8 and later); before, it returned 0 whatever
/// happened, so only `fsync` can be trusted.
fn syncfs_reports_errors() -> bool {
    static REPORTS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REPORTS.get_or_init(|| {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release
            .trim()
            .split(|c: char| !c.is_ascii_digit())
            .map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        (major, minor) >= (5, 8)
    })
}

/// Runs `work` on every item, on up to 8 threads at once (fsyncs issued together share the file
/// system's journal commits); results in order.
fn in_parallel<T: Sync, R: Send>(items: &[T], work: impl Fn(&T) -> R + Sync) -> Vec<R> {
    if items.len() < 2 {
        return items.iter().map(&work).collect();
    }
    let threads = items.len().min(8);
    let per = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(per)
            .map(|chunk| {
                let work = &work;
                scope.spawn(move || chunk.iter().map(work).collect::<Vec<R>>())
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an fsync thread panicked"))
            .collect()
    })
}

/// Blocking: keeps the previous version if asked, then renames the `.part` file into place.
fn rename_into_place(s: &Staged) -> Result<(), FetchError> {
    if let Some(kept) = &s.keep_as
        && s.dir.file_size(&s.name).map_err(place_error)?.is_some()
    {
        match s.dir.rename_no_replace(&s.name, kept) {
            Ok(()) => {}
            // That version is kept already: the file in place is another copy of it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(FetchError::local(
                    "keep the previous version of",
                    s.dir.path().join(&s.name),
                    e,
                ));
            }
        }
    }
    s.dir.rename(&s.part, &s.name).map_err(place_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_work_keeps_the_order_of_its_items() {
        let items: Vec<u32> = (0..37).collect();
        assert_eq!(
            in_parallel(&items, |i| i * 2),
            items.iter().map(|i| i * 2).collect::<Vec<_>>()
        );
        assert_eq!(in_parallel(&items[..1], |i| i + 1), vec![1]);
        assert!(in_parallel(&items[..0], |i| i + 1).is_empty());
    }
}
