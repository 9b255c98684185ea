//! One download attempt: verified resume into `<final>.part`, verification, then publication.
//!
//! Resume is verified: a `.part` file is continued only when its validator (ETag, else Last-Modified) is
//! known, with `Range: bytes=N-` and `If-Range: <validator>`, and bytes are appended only on a 206 whose
//! `Content-Range` starts at N and whose ETag (if any) is the one the `.part` holds. A 200 means the server
//! ignored the range or the product changed: the file starts over, so a changed product ends as the new
//! version whole, never a splice of two. A 416 is checked against what is on disk. The validator and the
//! announced size are stored before the first byte reaches the `.part` file, and progress at least every
//! second, so a kill -9 costs little. A small body (up to 1 MiB) that arrives within 100 ms is held in
//! memory and written once, when it is published: on many small products that halves the work per file.
//! At the end the size must match what was announced, a `.fits` file must be whole
//! 2880-byte blocks starting with `SIMPLE  =`, and only then is the file fsynced, renamed into place, and
//! its folder fsynced.

use crate::store::now_ms;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::header::{self, HeaderMap, HeaderValue};
use tokio_util::sync::CancellationToken;

use super::error::FetchError;
use crate::store::{Job, Progress, Store};

/// Progress is stored at least this often while bytes arrive.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// Bytes buffered in memory before a write to the `.part` file: all a kill -9 can lose of a transfer,
/// besides what was in flight.
const WRITE_BUFFER: usize = 64 * 1024;
/// A body of at most this many bytes is held whole in memory and written when the file is published: on
/// small products the per-write hops to the blocking pool and the progress write cost more than the
/// transfer.
const WHOLE_IN_MEMORY: usize = 1024 * 1024;
/// ... unless it takes longer than this: a slow body goes to disk as it comes, so that a kill -9 loses
/// little of it.
const HOLD_AT_MOST: Duration = Duration::from_millis(100);
/// The first bytes of every FITS file.
const FITS_MAGIC: &[u8] = b"SIMPLE  =";
/// FITS files are made of blocks of this many bytes.
const FITS_BLOCK: u64 = 2880;

/// What an attempt needs besides the job.
pub struct Transfer {
    /// The HTTP client (timeouts, User-Agent).
    pub client: reqwest::Client,
    /// The MAST token, sent only to `mast_origin`; replaced when SIGHUP re-reads the secrets.
    pub token: std::sync::RwLock<Option<String>>,
    /// Scheme, host and port of `mast.base_url`.
    pub mast_origin: url::Origin,
    /// `storage.downloads`.
    pub root: PathBuf,
    /// `download.keep_previous`.
    pub keep_previous: bool,
    /// The store, for progress and the version on disk.
    pub store: Arc<dyn Store>,
    /// This worker pool's lease owner name.
    pub owner: String,
    /// How long a lease lasts.
    pub lease: Duration,
    /// Bytes received by all workers, for the rate in summaries.
    pub vitals: Arc<crate::service::Vitals>,
}

/// A finished attempt.
#[derive(Debug)]
pub struct Fetched {
    /// The file's size.
    pub bytes: u64,
    /// Bytes that were already in the `.part` file and not fetched again.
    pub resumed_from: u64,
    /// Bytes fetched by this attempt.
    pub fetched: u64,
}

/// The validator of the bytes in a `.part` file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Validator {
    etag: Option<String>,
    last_modified: Option<String>,
}

impl Validator {
    fn from_headers(headers: &HeaderMap) -> Validator {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Validator {
            etag: get(header::ETAG),
            last_modified: get(header::LAST_MODIFIED),
        }
    }

    /// What `If-Range` carries: a strong ETag, else Last-Modified (weak ETags cannot validate a range).
    fn if_range(&self) -> Option<&str> {
        self.etag
            .as_deref()
            .filter(|e| !e.starts_with("W/"))
            .or(self.last_modified.as_deref())
    }
}

/// `<final>.part`.
pub fn part_path(final_path: &Path) -> PathBuf {
    let mut p = final_path.as_os_str().to_owned();
    p.push(".part");
    PathBuf::from(p)
}

/// `bytes START-END/TOTAL` (TOTAL may be `*`), or `bytes */TOTAL` (for 416).
fn content_range(headers: &HeaderMap) -> Option<(Option<u64>, Option<u64>)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let total = total.trim().parse().ok();
    let start = match range.trim() {
        "*" => None,
        r => Some(r.split_once('-')?.0.trim().parse().ok()?),
    };
    Some((start, total))
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

pub(crate) fn is_fits(filename: &str) -> bool {
    filename.to_ascii_lowercase().ends_with(".fits")
}

/// How the server answered.
enum Answer {
    /// Bytes from `start` on, of `total` if known.
    Body {
        response: reqwest::Response,
        start: u64,
        total: Option<u64>,
        validator: Validator,
    },
    /// 416 for a `.part` file that is already whole.
    AlreadyWhole { total: u64 },
}

impl Transfer {
    fn lease_until(&self) -> i64 {
        now_ms() + i64::try_from(self.lease.as_millis()).unwrap_or(i64::MAX)
    }

    /// Stores progress and renews the lease, and waits for it (`report_in_background` does not wait).
    async fn report(
        &self,
        job: &Job,
        bytes_done: u64,
        total: Option<u64>,
        v: &Validator,
    ) -> Result<(), FetchError> {
        settle(&mut Some(
            self.report_in_background(job, bytes_done, total, v),
        ))
        .await
    }

    /// Sends the request; from `offset` with `If-Range` when resuming.
    async fn send(
        &self,
        job: &Job,
        offset: u64,
        validator: &Validator,
    ) -> Result<reqwest::Response, FetchError> {
        let url = url::Url::parse(&job.url)
            .map_err(|e| FetchError::Protocol(format!("bad URL {}: {e}", job.url)))?;
        let mut request = self.client.get(url.clone());
        // The token goes to the MAST host only; reqwest drops these headers on a redirect elsewhere.
        let token = self.token.read().map(|t| t.clone()).unwrap_or_default();
        if let Some(token) = token.filter(|_| url.origin() == self.mast_origin) {
            let mut auth = HeaderValue::from_str(&format!("token {token}")).map_err(|_| {
                FetchError::Protocol("the MAST token holds characters a header cannot carry".into())
            })?;
            auth.set_sensitive(true);
            let mut cookie =
                HeaderValue::from_str(&format!("mast_token={token}")).map_err(|_| {
                    FetchError::Protocol(
                        "the MAST token holds characters a header cannot carry".into(),
                    )
                })?;
            cookie.set_sensitive(true);
            request = request
                .header(header::AUTHORIZATION, auth)
                .header(header::COOKIE, cookie);
        }
        if offset > 0
            && let Some(if_range) = validator.if_range()
        {
            request = request
                .header(header::RANGE, format!("bytes={offset}-"))
                .header(header::IF_RANGE, if_range);
        }
        Ok(request.send().await?)
    }

    /// Asks for the product (resuming at `offset` if it can), and settles what the answer means.
    async fn open(
        &self,
        job: &Job,
        mut offset: u64,
        part: &Path,
        stored: &Validator,
    ) -> Result<Answer, FetchError> {
        loop {
            let response = self.send(job, offset, stored).await?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            match status {
                206 if offset > 0 => {
                    let fresh = Validator::from_headers(&headers);
                    let same_version = match (&stored.etag, &fresh.etag) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    };
                    match content_range(&headers) {
                        Some((Some(start), total)) if start == offset && same_version => {
                            return Ok(Answer::Body {
                                response,
                                start,
                                total,
                                validator: Validator {
                                    etag: fresh.etag.or(stored.etag.clone()),
                                    last_modified: fresh
                                        .last_modified
                                        .or(stored.last_modified.clone()),
                                },
                            });
                        }
                        other => {
                            tracing::warn!(
                                "{}: the server's 206 does not continue the .part file at byte {offset} \
                                 (Content-Range {other:?}, same version: {same_version}); starting over",
                                job.about()
                            );
                            offset = 0;
                        }
                    }
                }
                200 => {
                    return Ok(Answer::Body {
                        total: response.content_length(),
                        validator: Validator::from_headers(&headers),
                        response,
                        start: 0,
                    });
                }
                416 if offset > 0 => match content_range(&headers) {
                    Some((None, Some(total))) if total == offset => {
                        return Ok(Answer::AlreadyWhole { total });
                    }
                    _ => {
                        tracing::warn!(
                            "{}: the server cannot continue at byte {offset}; starting over",
                            job.about()
                        );
                        offset = 0;
                    }
                },
                206 | 416 => {
                    return Err(FetchError::Protocol(format!(
                        "MAST answered HTTP {status} to a request for the whole file"
                    )));
                }
                401 | 403 => return Err(FetchError::Auth { status }),
                404 => return Err(FetchError::NotFound),
                _ => {
                    return Err(FetchError::Http {
                        status,
                        retry_after: retry_after(&headers),
                    });
                }
            }
            // Starting over: the old bytes must not be mistaken for part of the new answer.
            tokio::fs::write(part, b"")
                .await
                .map_err(|e| FetchError::local("truncate", part, e))?;
        }
    }

    /// One attempt at `job`; on failure the `.part` file keeps what is worth keeping.
    pub async fn fetch(
        &self,
        job: &Job,
        cancel: &CancellationToken,
    ) -> Result<Fetched, FetchError> {
        let final_path = self.root.join(&job.local_path);
        let part = part_path(&final_path);
        let stored = Validator {
            etag: job.etag.clone(),
            last_modified: job.last_modified.clone(),
        };
        // Bytes without a validator cannot be continued safely, so without one the `.part` file (if any)
        // is not even looked at: it is emptied when the first bytes are written.
        let offset = if stored.if_range().is_some() {
            blocking({
                let part = part.clone();
                move || disk::part_size(&part)
            })
            .await?
        } else {
            0
        };

        let (mut response, start, total, validator) =
            match self.open(job, offset, &part, &stored).await? {
                Answer::AlreadyWhole { total } => {
                    let out = disk::PartWriter::new(part.clone(), true, None);
                    self.verify_and_publish(job, out, &final_path, total)
                        .await?;
                    return Ok(Fetched {
                        bytes: total,
                        resumed_from: total,
                        fetched: 0,
                    });
                }
                Answer::Body {
                    response,
                    start,
                    total,
                    validator,
                } => (response, start, total, validator),
            };
        // The validator and size go on record before the first byte can land in the `.part` file, so
        // that a crash at any moment can resume. When the bytes in the `.part` file are of the version the store already names
        // (or the store names none, so a crash restarts from zero anyway), that write runs beside the
        // transfer instead of in front of it; a changed version is recorded first, so that a crash can
        // never pair the new bytes with the old validator.
        // A body held whole in memory reaches the disk only when it is published, so there is no
        // `.part` file to resume before then and nothing to record.
        let out = disk::PartWriter::new(part.clone(), start > 0, total.map(|t| t - start));
        let mut pending = None;
        if !out.holds_whole_body() {
            pending = Some(self.report_in_background(job, start, total, &validator));
            if stored.if_range().is_some() && stored != validator {
                settle(&mut pending).await?;
            }
        }
        let mut out = out;
        let mut written = start;
        let began = Instant::now();
        let mut last_report = began;
        let ended = loop {
            let chunk = tokio::select! {
                _ = cancel.cancelled() => break Err(FetchError::Interrupted),
                chunk = response.chunk() => chunk,
            };
            match chunk {
                Ok(Some(bytes)) => {
                    if total.is_some_and(|t| written + bytes.len() as u64 > t) {
                        break Err(FetchError::Protocol(format!(
                            "MAST sent more than the {} bytes it announced",
                            total.unwrap_or_default()
                        )));
                    }
                    if let Err(e) = out.write(&bytes).await {
                        break Err(e);
                    }
                    written += bytes.len() as u64;
                    self.vitals
                        .received
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if out.holds_whole_body() && began.elapsed() >= HOLD_AT_MOST {
                        // A slow body: from now on it goes to disk as it comes, after its validator.
                        if let Err(e) = self.report(job, start, total, &validator).await {
                            break Err(e);
                        }
                        out.stop_holding();
                        if let Err(e) = out.flush().await {
                            break Err(e);
                        }
                        last_report = Instant::now();
                    }
                    if last_report.elapsed() >= PROGRESS_EVERY {
                        if let Err(e) = out.flush().await {
                            break Err(e);
                        }
                        if let Err(e) = settle(&mut pending).await {
                            break Err(e);
                        }
                        if let Err(e) = self.report(job, written, total, &validator).await {
                            break Err(e);
                        }
                        last_report = Instant::now();
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    break Err(FetchError::Cut {
                        got: written,
                        expected: total,
                        reason: FetchError::from(e).to_string(),
                    });
                }
            }
        };
        let recorded = settle(&mut pending).await;
        let cut_short = total.filter(|t| written < *t).map(|t| FetchError::Cut {
            got: written,
            expected: Some(t),
            reason: "the connection closed early".into(),
        });
        let ended = match (ended.and(recorded), cut_short) {
            (Ok(()), Some(cut)) => Err(cut),
            (other, _) => other,
        };
        if let Err(e) = ended {
            if matches!(e, FetchError::Protocol(_)) {
                // Nothing of this answer is worth keeping.
                blocking({
                    let part = part.clone();
                    move || disk::open(&part, false).map(drop)
                })
                .await?;
                written = 0;
            } else if !matches!(e, FetchError::LeaseLost) {
                // What was received is kept for the next attempt; a held body's validator goes on
                // record before its bytes reach the disk.
                if out.holds_whole_body() {
                    self.report(job, start, total, &validator).await?;
                }
                if let Err(flush) = out.flush().await {
                    tracing::warn!("{}: {flush}", job.about());
                }
            }
            if !matches!(e, FetchError::LeaseLost) {
                let _ = self.report(job, written, total, &validator).await;
            }
            return Err(e);
        }
        self.verify_and_publish(job, out, &final_path, written)
            .await?;
        Ok(Fetched {
            bytes: written,
            resumed_from: start,
            fetched: written - start,
        })
    }

    /// Stores progress in a task of its own; `settle` waits for it.
    fn report_in_background(
        &self,
        job: &Job,
        bytes_done: u64,
        total: Option<u64>,
        v: &Validator,
    ) -> tokio::task::JoinHandle<Result<bool, crate::store::StoreError>> {
        let progress = Progress {
            bytes_done: bytes_done as i64,
            bytes_expected: total.map(|t| t as i64),
            etag: v.etag.clone(),
            last_modified: v.last_modified.clone(),
        };
        let (store, owner, id, until) = (
            Arc::clone(&self.store),
            self.owner.clone(),
            job.id,
            self.lease_until(),
        );
        tokio::spawn(async move { store.progress(id, &owner, until, &progress).await })
    }

    /// Writes what is still buffered, checks the whole `.part` file, then fsyncs it, renames it into place
    /// and fsyncs its folder, in one blocking call.
    async fn verify_and_publish(
        &self,
        job: &Job,
        out: disk::PartWriter,
        final_path: &Path,
        size: u64,
    ) -> Result<(), FetchError> {
        let keep_as = if self.keep_previous {
            self.store
                .version_on_disk(&job.product, job.id)
                .await?
                .map(|previous| {
                    let mut kept = final_path.as_os_str().to_owned();
                    kept.push(format!(".{previous}"));
                    PathBuf::from(kept)
                })
        } else {
            None
        };
        let check = disk::Check {
            size,
            fits: is_fits(&job.filename),
        };
        let final_path = final_path.to_path_buf();
        blocking(move || {
            let (file, part) = out.write_all_now()?;
            disk::verify_and_publish(file, &part, &final_path, check, keep_as.as_deref())
        })
        .await
    }
}

/// Waits for a progress write started by `report_in_background`.
async fn settle(
    pending: &mut Option<tokio::task::JoinHandle<Result<bool, crate::store::StoreError>>>,
) -> Result<(), FetchError> {
    let Some(task) = pending.take() else {
        return Ok(());
    };
    match task.await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err(FetchError::LeaseLost),
        Ok(Err(e)) => Err(e.into()),
        Err(e) => Err(FetchError::Internal(format!(
            "the progress write failed: {e}"
        ))),
    }
}

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, FetchError> + Send + 'static,
) -> Result<T, FetchError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| FetchError::Io {
            op: "run file work for",
            path: PathBuf::from("a download"),
            source: std::io::Error::other(e),
        })?
}

/// The file side of an attempt, as plain blocking calls, few per file: every call from async code costs a
/// hop to the blocking pool, and on many small files those hops were most of the time.
pub(crate) mod disk {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::path::{Path, PathBuf};

    use super::{FITS_BLOCK, FITS_MAGIC, FetchError, WHOLE_IN_MEMORY, WRITE_BUFFER, blocking};

    /// The size of an existing `.part` file (0 if none).
    pub fn part_size(part: &Path) -> Result<u64, FetchError> {
        match std::fs::metadata(part) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(FetchError::local("read", part, e)),
        }
    }

    /// Opens the `.part` file (creating its folder) to continue it, or empties it to start over.
    pub fn open(part: &Path, append: bool) -> Result<std::fs::File, FetchError> {
        let dir = part.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| FetchError::local("create folder", dir, e))?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(!append)
            .open(part)
            .map_err(|e| FetchError::local("open", part, e))?;
        file.seek(SeekFrom::End(0))
            .map_err(|e| FetchError::local("open", part, e))?;
        Ok(file)
    }

    /// Buffers the body and writes it to the `.part` file in few blocking calls: `WRITE_BUFFER` bytes at a
    /// time, or, for a body of at most `WHOLE_IN_MEMORY` bytes, all at once when the file is published (the
    /// file is opened by the first write, so a small product costs one blocking call in all).
    pub struct PartWriter {
        file: Option<std::fs::File>,
        append: bool,
        buffer: Vec<u8>,
        limit: usize,
        path: PathBuf,
    }

    impl PartWriter {
        /// A writer for `path`, continuing it when `append`; `remaining` is the body's announced size.
        pub fn new(path: PathBuf, append: bool, remaining: Option<u64>) -> PartWriter {
            let (limit, capacity) = match remaining {
                Some(r) if r <= WHOLE_IN_MEMORY as u64 => (usize::MAX, r as usize),
                _ => (WRITE_BUFFER, WRITE_BUFFER),
            };
            PartWriter {
                file: None,
                append,
                buffer: Vec::with_capacity(capacity),
                limit,
                path,
            }
        }

        /// From now on, writes go to disk `WRITE_BUFFER` bytes at a time.
        pub fn stop_holding(&mut self) {
            self.limit = WRITE_BUFFER;
        }

        /// Whether the body is kept in memory until it is published.
        pub fn holds_whole_body(&self) -> bool {
            self.limit == usize::MAX
        }

        pub async fn write(&mut self, bytes: &[u8]) -> Result<(), FetchError> {
            self.buffer.extend_from_slice(bytes);
            if self.buffer.len() >= self.limit {
                self.flush().await?;
            }
            Ok(())
        }

        pub async fn flush(&mut self) -> Result<(), FetchError> {
            if self.buffer.is_empty() {
                return Ok(());
            }
            let (file, append, buffer, path) = (
                self.file.take(),
                self.append,
                std::mem::take(&mut self.buffer),
                self.path.clone(),
            );
            let (file, mut buffer) =
                blocking(move || write_at_end(file, &path, append, buffer)).await?;
            buffer.clear();
            self.file = Some(file);
            self.append = true;
            self.buffer = buffer;
            Ok(())
        }

        /// Blocking: writes what is buffered; gives back the file and its path.
        pub fn write_all_now(self) -> Result<(std::fs::File, PathBuf), FetchError> {
            let (file, _) = write_at_end(self.file, &self.path, self.append, self.buffer)?;
            Ok((file, self.path))
        }
    }

    /// Blocking: opens the file if it is not open yet, and writes `buffer` at its end.
    fn write_at_end(
        file: Option<std::fs::File>,
        path: &Path,
        append: bool,
        buffer: Vec<u8>,
    ) -> Result<(std::fs::File, Vec<u8>), FetchError> {
        let mut file = match file {
            Some(f) => f,
            None => open(path, append)?,
        };
        file.write_all(&buffer)
            .map_err(|e| FetchError::local("write", path, e))?;
        Ok((file, buffer))
    }

    /// What a finished `.part` file must be.
    pub struct Check {
        pub size: u64,
        pub fits: bool,
    }

    /// What is wrong with `file` as the whole product `check` describes (`None`: nothing): the size, and
    /// for FITS whole 2880-byte blocks starting with `SIMPLE  =`.
    pub fn whole(file: &mut std::fs::File, check: &Check) -> std::io::Result<Option<String>> {
        let actual = file.metadata()?.len();
        Ok(if actual != check.size {
            Some(format!(
                "the file has {actual} bytes, the server announced {}",
                check.size
            ))
        } else if check.fits && !check.size.is_multiple_of(FITS_BLOCK) {
            Some(format!(
                "{} bytes is not a whole number of 2880-byte FITS blocks",
                check.size
            ))
        } else if check.fits {
            let mut head = [0u8; 9];
            let read = file
                .seek(SeekFrom::Start(0))
                .and_then(|_| file.read_exact(&mut head));
            (read.is_err() || head != FITS_MAGIC).then(|| {
                "the file does not begin with \"SIMPLE  =\", so it is not FITS".to_string()
            })
        } else {
            None
        })
    }

    /// Verifies, fsyncs, keeps the previous version if asked, renames into place, fsyncs the folder.
    pub fn verify_and_publish(
        mut file: std::fs::File,
        part: &Path,
        final_path: &Path,
        check: Check,
        keep_as: Option<&Path>,
    ) -> Result<(), FetchError> {
        let problem = whole(&mut file, &check).map_err(|e| FetchError::local("read", part, e))?;
        if let Some(why) = problem {
            // Fetched again from zero next time.
            let _ = std::fs::remove_file(part);
            return Err(FetchError::Verify(why));
        }
        file.sync_all()
            .map_err(|e| FetchError::local("fsync", part, e))?;
        drop(file);
        if let Some(kept) = keep_as.filter(|_| final_path.exists()) {
            match crate::fsutil::rename_no_replace(final_path, kept) {
                Ok(()) => {}
                // That version is kept already: the file in place is another copy of it.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(FetchError::local(
                        "keep the previous version of",
                        final_path,
                        e,
                    ));
                }
            }
        }
        std::fs::rename(part, final_path)
            .map_err(|e| FetchError::local("publish", final_path, e))?;
        let dir = final_path.parent().unwrap_or(Path::new("."));
        crate::fsutil::fsync_dir(dir).map_err(|e| FetchError::local("fsync", dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[tokio::test]
    async fn a_write_that_ends_on_a_buffer_boundary_keeps_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let part = tmp.path().join("x.part");
        std::fs::write(&part, b"old bytes of another version").unwrap();
        let mut w = disk::PartWriter::new(part.clone(), false, None);
        w.write(&vec![7u8; WRITE_BUFFER]).await.unwrap();
        w.flush().await.unwrap();
        w.flush().await.unwrap();
        let (file, _) = w.write_all_now().unwrap();
        assert_eq!(file.metadata().unwrap().len(), WRITE_BUFFER as u64);
    }

    #[tokio::test]
    async fn a_small_body_is_written_once_at_the_end_and_large_ones_as_they_come() {
        let tmp = tempfile::tempdir().unwrap();
        let small = tmp.path().join("sub/small.part");
        let mut w = disk::PartWriter::new(small.clone(), false, Some(3 * WRITE_BUFFER as u64));
        for _ in 0..3 {
            w.write(&vec![1u8; WRITE_BUFFER]).await.unwrap();
        }
        assert!(!small.exists(), "a small body waits in memory");
        let (file, _) = w.write_all_now().unwrap();
        assert_eq!(file.metadata().unwrap().len(), 3 * WRITE_BUFFER as u64);

        let large = tmp.path().join("large.part");
        std::fs::write(&large, vec![2u8; 10]).unwrap();
        let remaining = 2 * WHOLE_IN_MEMORY as u64;
        let mut w = disk::PartWriter::new(large.clone(), true, Some(remaining));
        w.write(&vec![3u8; WRITE_BUFFER]).await.unwrap();
        assert_eq!(
            std::fs::metadata(&large).unwrap().len(),
            10 + WRITE_BUFFER as u64,
            "a large body is written as it comes, after what the file held"
        );
    }

    #[test]
    fn content_range_forms() {
        assert_eq!(
            content_range(&headers(&[("content-range", "bytes 100-199/200")])),
            Some((Some(100), Some(200)))
        );
        assert_eq!(
            content_range(&headers(&[("content-range", "bytes */200")])),
            Some((None, Some(200)))
        );
        assert_eq!(
            content_range(&headers(&[("content-range", "bytes 5-9/*")])),
            Some((Some(5), None))
        );
        assert_eq!(
            content_range(&headers(&[("content-range", "items 1-2/3")])),
            None
        );
    }

    #[test]
    fn weak_etags_do_not_validate_ranges() {
        let v = Validator {
            etag: Some("W/\"x\"".into()),
            last_modified: Some("Tue, 01 Dec 2026 10:00:00 GMT".into()),
        };
        assert_eq!(v.if_range(), Some("Tue, 01 Dec 2026 10:00:00 GMT"));
        let none = Validator {
            etag: Some("W/\"x\"".into()),
            last_modified: None,
        };
        assert_eq!(none.if_range(), None);
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")])),
            Some(Duration::from_secs(7))
        );
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(60));
        let d = retry_after(&headers(&[("retry-after", &later)])).unwrap();
        assert!(d > Duration::from_secs(50) && d <= Duration::from_secs(60));
    }
}
