//! One download attempt: verified resume into `<final>.part`, verification, then publication.
//!
//! Resume is verified: a `.part` file is continued only when its validator (ETag, else Last-Modified) is
//! known, with `Range: bytes=N-` and `If-Range: <validator>`, and bytes are appended only on a 206 whose
//! `Content-Range` starts at N and whose ETag (if any) is the one the `.part` holds. A 200 means the server
//! ignored the range or the product changed: the file starts over, so a changed product ends as the new
//! version whole, never a splice of two. A 416 is checked against what is on disk. The validator and the
//! announced size are stored before the first byte is written, and progress at least every second, so a
//! kill -9 costs little. At the end the size must match what was announced, a `.fits` file must be whole
//! 2880-byte blocks starting with `SIMPLE  =`, and only then is the file fsynced, renamed into place, and
//! its folder fsynced.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
/// The first bytes of every FITS file.
const FITS_MAGIC: &[u8] = b"SIMPLE  =";
/// FITS files are made of blocks of this many bytes.
const FITS_BLOCK: u64 = 2880;

/// What an attempt needs besides the job.
pub struct Transfer {
    /// The HTTP client (timeouts, User-Agent).
    pub client: reqwest::Client,
    /// The MAST token, sent only to `mast_origin`.
    pub token: Option<String>,
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
    pub received: Arc<AtomicU64>,
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

fn is_fits(filename: &str) -> bool {
    filename.to_ascii_lowercase().ends_with(".fits")
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
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

    async fn report(
        &self,
        job: &Job,
        bytes_done: u64,
        total: Option<u64>,
        v: &Validator,
    ) -> Result<(), FetchError> {
        let progress = Progress {
            bytes_done: bytes_done as i64,
            bytes_expected: total.map(|t| t as i64),
            etag: v.etag.clone(),
            last_modified: v.last_modified.clone(),
        };
        if self
            .store
            .progress(job.id, &self.owner, self.lease_until(), &progress)
            .await?
        {
            Ok(())
        } else {
            Err(FetchError::LeaseLost)
        }
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
        if let Some(token) = self
            .token
            .as_deref()
            .filter(|_| url.origin() == self.mast_origin)
        {
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
                                job.filename
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
                            job.filename
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
        let on_disk = blocking({
            let (final_path, part) = (final_path.clone(), part.clone());
            move || disk::prepare(&final_path, &part)
        })
        .await?;
        // Bytes without a validator cannot be continued safely.
        let offset = if stored.if_range().is_some() {
            on_disk
        } else {
            0
        };

        let (mut response, start, total, validator) =
            match self.open(job, offset, &part, &stored).await? {
                Answer::AlreadyWhole { total } => {
                    let file = blocking({
                        let part = part.clone();
                        move || disk::open(&part, true)
                    })
                    .await?;
                    self.verify_and_publish(job, file, &part, &final_path, total)
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
        // The validator and size are on record before the first byte lands, so a crash at any moment can
        // resume (with job bookkeeping at synchronous=NORMAL this write costs no fsync).
        self.report(job, start, total, &validator).await?;
        let mut out = disk::PartWriter::new(
            blocking({
                let part = part.clone();
                move || disk::open(&part, start > 0)
            })
            .await?,
            part.clone(),
        );
        let mut written = start;
        let mut last_report = Instant::now();
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
                    self.received
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if last_report.elapsed() >= PROGRESS_EVERY {
                        if let Err(e) = out.flush().await {
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
        // Whatever happened, what was received is kept (and recorded) for the next attempt.
        let flushed = out.flush().await;
        if let Err(e) = ended.and(flushed) {
            if matches!(e, FetchError::Protocol(_)) {
                blocking({
                    let part = part.clone();
                    move || disk::open(&part, false).map(drop)
                })
                .await?;
                written = 0;
            }
            if !matches!(e, FetchError::LeaseLost) {
                let _ = self.report(job, written, total, &validator).await;
            }
            return Err(e);
        }
        if let Some(t) = total.filter(|t| written < *t) {
            self.report(job, written, total, &validator).await?;
            return Err(FetchError::Cut {
                got: written,
                expected: Some(t),
                reason: "the connection closed early".into(),
            });
        }
        self.verify_and_publish(job, out.into_file(), &part, &final_path, written)
            .await?;
        Ok(Fetched {
            bytes: written,
            resumed_from: start,
            fetched: written - start,
        })
    }

    /// Checks the whole `.part` file, then fsyncs it, renames it into place and fsyncs its folder, in one
    /// blocking call.
    async fn verify_and_publish(
        &self,
        job: &Job,
        file: std::fs::File,
        part: &Path,
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
        let (part, final_path) = (part.to_path_buf(), final_path.to_path_buf());
        blocking(move || {
            disk::verify_and_publish(file, &part, &final_path, check, keep_as.as_deref())
        })
        .await
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
mod disk {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::path::{Path, PathBuf};

    use super::{FITS_BLOCK, FITS_MAGIC, FetchError, WRITE_BUFFER, blocking};

    /// Creates the folder; returns the size of an existing `.part` file (0 if none).
    pub fn prepare(final_path: &Path, part: &Path) -> Result<u64, FetchError> {
        let dir = final_path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| FetchError::local("create folder", dir, e))?;
        match std::fs::metadata(part) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(FetchError::local("read", part, e)),
        }
    }

    /// Opens the `.part` file to continue it, or empties it to start over.
    pub fn open(part: &Path, append: bool) -> Result<std::fs::File, FetchError> {
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

    /// Buffers up to `WRITE_BUFFER` bytes, then writes them in one blocking call.
    pub struct PartWriter {
        file: Option<std::fs::File>,
        buffer: Vec<u8>,
        path: PathBuf,
    }

    impl PartWriter {
        pub fn new(file: std::fs::File, path: PathBuf) -> PartWriter {
            PartWriter {
                file: Some(file),
                buffer: Vec::with_capacity(WRITE_BUFFER),
                path,
            }
        }

        pub async fn write(&mut self, bytes: &[u8]) -> Result<(), FetchError> {
            self.buffer.extend_from_slice(bytes);
            if self.buffer.len() >= WRITE_BUFFER {
                self.flush().await?;
            }
            Ok(())
        }

        pub async fn flush(&mut self) -> Result<(), FetchError> {
            if self.buffer.is_empty() {
                return Ok(());
            }
            let Some(mut file) = self.file.take() else {
                return Ok(());
            };
            let mut buffer = std::mem::take(&mut self.buffer);
            let path = self.path.clone();
            let (file, buffer) = blocking(move || {
                file.write_all(&buffer)
                    .map_err(|e| FetchError::local("write", &path, e))?;
                buffer.clear();
                Ok((file, buffer))
            })
            .await?;
            self.file = Some(file);
            self.buffer = buffer;
            Ok(())
        }

        /// The file, once flushed.
        pub fn into_file(mut self) -> std::fs::File {
            // `flush` always gives the file back on success; the caller flushed.
            self.file
                .take()
                .expect("the file is back after a successful flush")
        }
    }

    /// What a finished `.part` file must be.
    pub struct Check {
        pub size: u64,
        pub fits: bool,
    }

    /// Verifies, fsyncs, keeps the previous version if asked, renames into place, fsyncs the folder.
    pub fn verify_and_publish(
        mut file: std::fs::File,
        part: &Path,
        final_path: &Path,
        check: Check,
        keep_as: Option<&Path>,
    ) -> Result<(), FetchError> {
        let actual = file
            .metadata()
            .map_err(|e| FetchError::local("read", part, e))?
            .len();
        let problem = if actual != check.size {
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
        };
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
        let mut w = disk::PartWriter::new(disk::open(&part, false).unwrap(), part.clone());
        w.write(&vec![7u8; WRITE_BUFFER]).await.unwrap();
        w.flush().await.unwrap();
        w.flush().await.unwrap();
        let file = w.into_file();
        assert_eq!(file.metadata().unwrap().len(), WRITE_BUFFER as u64);
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
