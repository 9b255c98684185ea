//! One download attempt: verified resume into `<final>.part`, content verification as the bytes pass, then
//! publication.
//!
//! Resume is verified: a `.part` file is continued only when its validator (ETag, else Last-Modified) is
//! known, with `Range: bytes=N-` and `If-Range: <validator>`, and bytes are appended only on a 206 whose
//! `Content-Range` starts at N, whose ETag (if any) is the one the `.part` holds, and whose total is the
//! size the first answer announced. Anything else means the server ignored the range or the product
//! changed: the file starts over, so a changed product ends as the new version whole, never a splice of
//! two. A 416 is checked against what is on disk. The validator and the announced size are stored before
//! the first byte reaches the `.part` file, and progress at least every second, so a kill -9 costs little.
//! A small body (up to 1 MiB) that arrives within 100 ms is held in memory and written once, when it is
//! published: on many small products that halves the work per file.
//!
//! Every product passes its format's verifier (`crate::verify`) on its way to the `.part` file; it is
//! published only when the size matches what was announced and the verifier proves the content (a body
//! with no length at all only when its format proves where it ends). Requests ask for
//! `Accept-Encoding: identity`, and an answer in another encoding or an HTML page for a non-HTML product is
//! refused before a byte is written. Attempts are bounded: a low-speed limit, a maximum size, and a disk
//! filled by the attempt itself ends the job. Files and folders are reached only through `SafeDir`, never
//! through a symbolic link. The verified `.part` file is then handed to the publisher (`super::publish`),
//! which makes it durable, renames it into place and fsyncs its folder, with others in one batch.

use crate::store::now_ms;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use reqwest::header::{self, HeaderMap, HeaderValue};
use tokio_util::sync::CancellationToken;

use super::cloud::Route;
use super::error::FetchError;
use crate::fsutil::{PlaceError, SafeDir};
use crate::store::{Job, Origin, Progress, Provenance, Store};
use crate::verify::{self, Problem, Verified};

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
/// Of an HTML page sent instead of a product, this much is read to name it (its title).
const HTML_READ: usize = 64 * 1024;

/// Bounds on one attempt (from `[download]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Bytes per second below which, for `min_rate_window`, an attempt is ended (0: no limit).
    pub min_rate: u64,
    /// See `min_rate`.
    pub min_rate_window: Duration,
    /// The largest product.
    pub max_product_size: u64,
    /// Publish a body with no length whose format cannot prove its end.
    pub accept_unsized: bool,
}

impl Limits {
    /// The limits `[download]` sets.
    pub fn from_config(c: &crate::config::DownloadConfig) -> Limits {
        Limits {
            min_rate: c.min_rate.0,
            min_rate_window: c.min_rate_window,
            max_product_size: c.max_product_size.as_u64(),
            accept_unsized: c.accept_unsized_bodies,
        }
    }
}

/// What an attempt needs besides the job.
pub struct Transfer {
    /// The HTTP client (timeouts, User-Agent).
    pub client: reqwest::Client,
    /// The MAST token, sent only to `mast_origin`; replaced when SIGHUP re-reads the secrets.
    pub token: std::sync::RwLock<Option<String>>,
    /// Scheme, host and port of `mast.base_url`.
    pub mast_origin: url::Origin,
    /// `storage.downloads`.
    pub root: std::path::PathBuf,
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
    /// Bounds on each attempt.
    pub limits: Limits,
    /// `download.max_rate`, shared by every worker.
    pub throttle: Arc<super::throttle::Throttle>,
    /// `download.min_free_space`, and the room promised to running attempts.
    pub room: Arc<super::room::Room>,
    /// `[cloud]`, when enabled: the bucket first, MAST as the fall-back.
    pub cloud: Option<Arc<super::cloud::Cloud>>,
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
    /// What the content was proven by.
    pub verified: Verified,
    /// The verified `.part` file, to be published (`super::publish`).
    pub staged: Staged,
    /// Where its bytes came from.
    pub origin: Origin,
}

/// A verified `.part` file, whole and checked but not yet durable: the publisher makes a batch of them
/// durable at once, then renames them into place.
#[derive(Debug)]
pub struct Staged {
    pub dir: Arc<SafeDir>,
    /// The `.part` file's name in `dir`.
    pub part: String,
    /// The product's file name in `dir`.
    pub name: String,
    /// Keep the file in place under this name first (`download.keep_previous`).
    pub keep_as: Option<String>,
    /// The `.part` file, open, for its fsync.
    pub file: std::fs::File,
}

/// The validator of the bytes in a `.part` file, and where they come from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Validator {
    etag: Option<String>,
    last_modified: Option<String>,
    origin: Option<Origin>,
    /// From the bucket: the cheapest whole-object checksum it gave (`header:value`), which a 206 does not
    /// carry.
    checksum: Option<String>,
}

impl Validator {
    fn from_headers(headers: &HeaderMap, origin: &Origin) -> Validator {
        let get = |name| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Validator {
            etag: get(header::ETAG),
            last_modified: get(header::LAST_MODIFIED),
            origin: Some(origin.clone()),
            checksum: None,
        }
    }

    /// Whether both name the same bytes: the same validators from the same source.
    fn same_bytes(&self, other: &Validator) -> bool {
        let source = |v: &Validator| v.origin.as_ref().map(|o| o.source);
        self.etag == other.etag
            && self.last_modified == other.last_modified
            && source(self) == source(other)
    }

    /// What `If-Range` carries: a strong ETag, else Last-Modified (weak ETags cannot validate a range).
    fn if_range(&self) -> Option<&str> {
        self.etag
            .as_deref()
            .filter(|e| !e.starts_with("W/"))
            .or(self.last_modified.as_deref())
    }
}

/// `<name>.part`.
pub fn part_name(name: &str) -> String {
    format!("{name}.part")
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

/// True when the body's end is framed by the protocol (a length, or chunked encoding's last chunk).
fn chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("chunked"))
}

/// The job's folder (relative to the root) and file name.
fn split(local_path: &str) -> (&Path, String) {
    let p = Path::new(local_path);
    (
        p.parent().unwrap_or(Path::new("")),
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )
}

/// A place that cannot be used: a link or a wrong kind of file is the operator's to fix (the job fails
/// with the reason); anything else is an I/O error like any other.
pub(super) fn place_error(e: PlaceError) -> FetchError {
    match e {
        PlaceError::Io { op, path, source } => FetchError::local(op, path, source),
        other => FetchError::Refused(other.to_string()),
    }
}

/// How the server answered. (Held for a moment, once per attempt: its size does not matter.)
#[allow(clippy::large_enum_variant)]
enum Answer {
    /// Bytes from `start` on, of `total` if known; `framed` when the protocol marks the body's end.
    Body {
        response: reqwest::Response,
        start: u64,
        total: Option<u64>,
        framed: bool,
        validator: Validator,
        /// S3's digests of the object, from the bucket.
        expect: Option<verify::digest::Expected>,
    },
    /// 416 for a `.part` file that is already whole.
    AlreadyWhole {
        total: u64,
        expect: Option<verify::digest::Expected>,
    },
}

/// A transfer on the status page while it goes (taken off when dropped).
struct LiveTransfer<'a> {
    vitals: &'a crate::service::Vitals,
    job: i64,
    total: Option<u64>,
}

impl<'a> LiveTransfer<'a> {
    fn new(
        vitals: &'a crate::service::Vitals,
        job: i64,
        bytes: u64,
        total: Option<u64>,
    ) -> LiveTransfer<'a> {
        let live = LiveTransfer { vitals, job, total };
        live.at(bytes, 0.0);
        live
    }

    fn at(&self, bytes: u64, rate: f64) {
        self.vitals.transfer_at(
            self.job,
            crate::service::Live {
                bytes,
                total: self.total,
                rate,
            },
        );
    }
}

impl Drop for LiveTransfer<'_> {
    fn drop(&mut self) {
        self.vitals.transfer_ended(self.job);
    }
}

/// The transfer rate over the last `window`, sampled every second: the low-speed limit.
struct RateWatch {
    samples: VecDeque<(Instant, u64)>,
    window: Duration,
    min_rate: u64,
}

impl RateWatch {
    fn new(limits: &Limits, now: Instant, bytes: u64) -> RateWatch {
        RateWatch {
            samples: VecDeque::from([(now, bytes)]),
            window: limits.min_rate_window.max(Duration::from_secs(1)),
            min_rate: limits.min_rate,
        }
    }

    /// Notes `bytes` received in all at `now`; an error once a whole window passed below the limit.
    fn check(&mut self, now: Instant, bytes: u64) -> Result<(), FetchError> {
        self.samples.push_back((now, bytes));
        while let Some(&(at, then)) = self.samples.front() {
            let age = now.duration_since(at);
            if age < self.window {
                break;
            }
            let rate = (bytes - then) as f64 / age.as_secs_f64();
            if rate < self.min_rate as f64 {
                return Err(FetchError::TooSlow {
                    rate,
                    min_rate: self.min_rate,
                    window: self.window,
                });
            }
            self.samples.pop_front();
        }
        Ok(())
    }
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

    /// Sends the request to `origin`; from `offset` with `If-Range` when resuming.
    async fn send(
        &self,
        origin: &Origin,
        offset: u64,
        validator: &Validator,
    ) -> Result<reqwest::Response, FetchError> {
        let url = url::Url::parse(&origin.url)
            .map_err(|e| FetchError::Protocol(format!("bad URL {}: {e}", origin.url)))?;
        // The bytes as stored, never a compressed rendering of them.
        let mut request = self
            .client
            .get(url.clone())
            .header(header::ACCEPT_ENCODING, "identity");
        if origin.source == Provenance::Cloud {
            // S3's checksums of the object, checked as the bytes pass.
            request = request.header("x-amz-checksum-mode", "ENABLED");
        }
        // The token goes to the MAST host only; reqwest drops these headers on a redirect elsewhere.
        let token = self.token.read().map(|t| t.clone()).unwrap_or_default();
        if let Some(token) =
            token.filter(|_| origin.source == Provenance::Mast && url.origin() == self.mast_origin)
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

    /// Refuses an answer whose body cannot be the product: in an encoding nobody asked for, or an HTML
    /// page for a product that is not one (read a little, to name it by its title).
    async fn refuse_wrong_body(
        &self,
        job: &Job,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, FetchError> {
        let headers = response.headers();
        if let Some(encoding) = headers
            .get(header::CONTENT_ENCODING)
            .map(|v| v.to_str().unwrap_or("?").trim().to_string())
            .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
        {
            return Err(FetchError::Verify(format!(
                "the server sent {} with Content-Encoding: {encoding}, though mastsub asks for the bytes \
                 as stored (Accept-Encoding: identity); they would not be the product",
                job.filename
            )));
        }
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let html_product = {
            let f = job.filename.to_ascii_lowercase();
            f.ends_with(".html") || f.ends_with(".htm")
        };
        match content_type {
            Some(t) if verify::html::is_html_type(&t) && !html_product => {
                let announced = response.content_length();
                let mut response = response;
                let mut head = Vec::new();
                while head.len() < HTML_READ {
                    match response.chunk().await {
                        Ok(Some(c)) => head.extend_from_slice(&c),
                        _ => break,
                    }
                }
                let title = verify::html::sniff(&head).and_then(|p| p.title);
                let page = verify::html::Page { title };
                Err(FetchError::Verify(page.instead_of(
                    &job.filename,
                    Some(t.split(';').next().unwrap_or(&t).trim()),
                    announced.or(Some(head.len() as u64)),
                )))
            }
            _ => Ok(response),
        }
    }

    /// Asks for the product (resuming at `offset` if it can), and settles what the answer means.
    async fn open(
        &self,
        job: &Job,
        mut offset: u64,
        dir: &Arc<SafeDir>,
        part: &str,
        stored: &Validator,
        route: &Route,
    ) -> Result<Answer, FetchError> {
        let first_total = job.bytes_expected.and_then(|t| u64::try_from(t).ok());
        let origin = &route.origin(job);
        loop {
            let response = self.send(origin, offset, stored).await?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            if matches!(route, Route::Cloud { .. }) && matches!(status, 200 | 206 | 416) {
                fresh_in_bucket(job, &headers)?;
            }
            match status {
                206 if offset > 0 => {
                    let fresh = Validator::from_headers(&headers, origin);
                    let same_version = match (&stored.etag, &fresh.etag) {
                        (Some(a), Some(b)) => a == b,
                        _ => true,
                    };
                    match content_range(&headers) {
                        Some((Some(start), total))
                            if start == offset
                                && same_version
                                && (first_total.is_none() || total == first_total) =>
                        {
                            let response = self.refuse_wrong_body(job, response).await?;
                            let validator = Validator {
                                etag: fresh.etag.or(stored.etag.clone()),
                                last_modified: fresh.last_modified.or(stored.last_modified.clone()),
                                origin: Some(origin.clone()),
                                // Of the same version (same ETag): the first answer's.
                                checksum: stored.checksum.clone(),
                            };
                            return Ok(Answer::Body {
                                response,
                                start,
                                total,
                                framed: true,
                                expect: s3_digests(route, &validator, &headers, false),
                                validator,
                            });
                        }
                        Some((Some(start), total)) if start == offset && same_version => {
                            tracing::warn!(
                                "{}: the server's 206 gives the product's size as {} where its first answer \
                                 said {}: a changed product; starting over",
                                job.about(),
                                total.map_or("unknown (*)".to_string(), |t| t.to_string()),
                                first_total.unwrap_or_default()
                            );
                            offset = 0;
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
                    let response = self.refuse_wrong_body(job, response).await?;
                    let mut validator = Validator::from_headers(&headers, origin);
                    let expect = s3_digests(route, &validator, &headers, true);
                    // What a 206 of this object, which carries no checksum, is checked against later.
                    validator.checksum = expect
                        .as_ref()
                        .and_then(verify::digest::Expected::checksum_header);
                    return Ok(Answer::Body {
                        total: response.content_length(),
                        framed: response.content_length().is_some() || chunked(&headers),
                        expect,
                        validator,
                        response,
                        start: 0,
                    });
                }
                416 if offset > 0 => match content_range(&headers) {
                    Some((None, Some(total)))
                        if total == offset && first_total.is_none_or(|t| t == total) =>
                    {
                        return Ok(Answer::AlreadyWhole {
                            total,
                            expect: s3_digests(route, stored, &headers, false),
                        });
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
                _ => {
                    let retry_after = retry_after(&headers);
                    return Err(match (route, status) {
                        // Anonymous S3 answers 403 for a key it does not have (without ListBucket).
                        (Route::Cloud { key, .. }, 401 | 403 | 404) => FetchError::NotInBucket {
                            status,
                            key: key.clone(),
                        },
                        (Route::Cloud { .. }, _) => FetchError::Bucket {
                            status,
                            retry_after,
                        },
                        (Route::Mast, 401 | 403) => FetchError::Auth { status },
                        (Route::Mast, 404) => FetchError::NotFound,
                        (Route::Mast, _) => FetchError::Http {
                            status,
                            retry_after,
                        },
                    });
                }
            }
            // Starting over: the old bytes must not be mistaken for part of the new answer.
            blocking({
                let (dir, part) = (dir.clone(), part.to_string());
                move || dir.open_rw(&part, false).map(drop).map_err(place_error)
            })
            .await?;
        }
    }

    /// One attempt at `job`; on failure the `.part` file keeps what is worth keeping. `small` is told as
    /// soon as only moments of work are left: a small body has arrived whole in memory, or the file was
    /// already whole on disk. (Never earlier: a body that looks small can still take minutes.)
    pub async fn fetch(
        &self,
        job: &Job,
        cancel: &CancellationToken,
        small: tokio::sync::oneshot::Sender<()>,
    ) -> Result<Fetched, FetchError> {
        let mut small = Some(small);
        let route = match &self.cloud {
            // A look-up that hangs must not hold a shutdown.
            Some(cloud) => tokio::select! {
                _ = cancel.cancelled() => return Err(FetchError::Interrupted),
                route = cloud.route(job) => route?,
            },
            None => Route::Mast,
        };
        let first = self.fetch_from(job, cancel, &mut small, &route).await;
        let (Some(cloud), Route::Cloud { uri, .. }) = (&self.cloud, &route) else {
            return first;
        };
        match first {
            // Not in the bucket after all, only in an older copy, or an answer no retry would change (a
            // bucket URL in the wrong region answers 301, say): MAST at once, in the same attempt.
            Err(
                e @ (FetchError::NotInBucket { .. }
                | FetchError::StaleInBucket { .. }
                | FetchError::Bucket { .. }),
            ) if !cloud.only() && !e.is_transient() => {
                if matches!(e, FetchError::NotInBucket { .. }) {
                    cloud.forget(uri).await;
                }
                tracing::info!("{}: {e}; from MAST", job.about());
                self.fetch_from(job, cancel, &mut small, &Route::Mast).await
            }
            other => other,
        }
    }

    /// One attempt at `job` along `route`.
    async fn fetch_from(
        &self,
        job: &Job,
        cancel: &CancellationToken,
        small: &mut Option<tokio::sync::oneshot::Sender<()>>,
        route: &Route,
    ) -> Result<Fetched, FetchError> {
        let origin = route.origin(job);
        let mut told_small = || {
            if let Some(s) = small.take() {
                let _ = s.send(());
            }
        };
        let (rel_dir, name) = split(&job.local_path);
        let part = part_name(&name);
        // What the store says of the `.part` file's bytes. (Jobs from before [cloud] existed came from
        // MAST.)
        let recorded = Validator {
            etag: job.etag.clone(),
            last_modified: job.last_modified.clone(),
            origin: Some(Origin {
                source: job.source.unwrap_or(Provenance::Mast),
                url: String::new(),
            }),
            checksum: job.checksum.clone(),
        };
        // Its validator holds only where its bytes came from: a `.part` of the other source is started
        // over.
        let stored = if recorded.origin.as_ref().map(|o| o.source) == Some(route.source()) {
            recorded.clone()
        } else {
            Validator::default()
        };
        // The folder, opened without following links, and what the `.part` file holds. Bytes without a
        // validator cannot be continued safely, so without one the `.part` file is not even looked at:
        // it is emptied when the first bytes are written.
        let resumable = stored.if_range().is_some();
        let (dir, offset) = blocking({
            let (root, rel_dir, part) = (self.root.clone(), rel_dir.to_path_buf(), part.clone());
            move || {
                let dir = SafeDir::open(&root, &rel_dir, true).map_err(place_error)?;
                let size = dir.file_size(&part).map_err(place_error)?.unwrap_or(0);
                Ok((Arc::new(dir), if resumable { size } else { 0 }))
            }
        })
        .await?;

        let (mut response, start, total, framed, validator, expect) =
            match self.open(job, offset, &dir, &part, &stored, route).await? {
                Answer::AlreadyWhole { total, expect } => {
                    told_small();
                    let out =
                        disk::PartWriter::new(dir.clone(), part.clone(), true, None, &job.filename)
                            .checking(expect);
                    let (verified, staged) = self
                        .verify_and_stage(job, out, &dir, &name, Some(total), true)
                        .await?;
                    return Ok(Fetched {
                        bytes: total,
                        resumed_from: total,
                        fetched: 0,
                        verified,
                        staged,
                        origin,
                    });
                }
                Answer::Body {
                    response,
                    start,
                    total,
                    framed,
                    validator,
                    expect,
                } => (response, start, total, framed, validator, expect),
            };
        let max = self.limits.max_product_size;
        if let Some(t) = total.filter(|t| *t > max) {
            return Err(FetchError::Refused(format!(
                "the server announces {t} bytes for {}, more than download.max_product_size ({max} bytes); \
                 raise it if the product really is that large",
                job.filename
            )));
        }
        // Room for what is still to come (a body with no size: the floor alone), before a byte is
        // written; a refusal is a wait, not a failure.
        let needed = total.map_or(0, |t| t.saturating_sub(start));
        let min_free = self.room.min_free();
        // Taken now, when the answer has come, not at the attempt's start: the request may have waited
        // long while other workers wrote. (Also what a full disk is judged against, below.)
        let space = dir.space();
        if let (Some((_, capacity)), Some(t)) = (space, total)
            && t.saturating_add(min_free) > capacity
        {
            // No waiting makes room for that.
            return Err(FetchError::Refused(format!(
                "{} is {t} bytes: more than the file system of {} could hold even empty while keeping \
                 download.min_free_space ({min_free} bytes) free ({capacity} bytes in all); give it more \
                 room (or lower download.min_free_space) and run `mastsub retry {}`",
                job.filename,
                self.root.display(),
                job.id
            )));
        }
        let mut reservation = match space {
            Some((free, _)) if min_free > 0 || needed > 0 => {
                Some(self.room.admit(free, needed).map_err(|refused| {
                    // No more claims until room appears (or the wait is over).
                    self.room.block(free, super::policy::ROOM_WAIT);
                    FetchError::NoRoom {
                        filename: job.filename.clone(),
                        needed,
                        free: refused.free,
                        min_free: self.room.min_free(),
                        root: self.root.clone(),
                    }
                })?)
            }
            _ => None,
        };
        // The validator and size go on record before the first byte can land in the `.part` file, so
        // that a crash at any moment can resume. When the bytes in the `.part` file are of the version the
        // store already names (or the store names none, so a crash restarts from zero anyway), that write
        // runs beside the transfer instead of in front of it; a changed version is recorded first, so that
        // a crash can never pair the new bytes with the old validator.
        // A body held whole in memory reaches the disk only when it is published, so there is no
        // `.part` file to resume before then and nothing to record.
        let out = disk::PartWriter::new(
            dir.clone(),
            part.clone(),
            start > 0,
            total.map(|t| t - start),
            &job.filename,
        )
        .checking(expect);
        let mut pending = None;
        if !out.holds_whole_body() {
            pending = Some(self.report_in_background(job, start, total, &validator));
            // Against what the store holds (not `stored`, which forgets a record of the other source): a
            // crash must never leave these bytes under another version's or source's validator.
            if recorded.if_range().is_some() && !recorded.same_bytes(&validator) {
                settle(&mut pending).await?;
            }
        }
        let mut out = out;
        let mut written = start;
        let began = Instant::now();
        let mut last_report = began;
        let mut reported = written;
        let live = LiveTransfer::new(&self.vitals, job.id, written, total);
        let watch_rate = self.limits.min_rate > 0;
        let mut rate = RateWatch::new(&self.limits, began, written);
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let ended = loop {
            let chunk = tokio::select! {
                _ = cancel.cancelled() => break Err(FetchError::Interrupted),
                _ = tick.tick(), if watch_rate => {
                    match rate.check(Instant::now(), written) {
                        Ok(()) => continue,
                        Err(e) => break Err(e),
                    }
                }
                chunk = response.chunk() => chunk,
            };
            match chunk {
                Ok(Some(bytes)) => {
                    let after = written + bytes.len() as u64;
                    if let Some(t) = total
                        && after > t
                    {
                        break Err(FetchError::Protocol(format!(
                            "MAST sent more than the {t} bytes it announced"
                        )));
                    }
                    if total.is_none() && after > max {
                        break Err(FetchError::Refused(format!(
                            "the server sent {} with no size and more than download.max_product_size \
                             ({max} bytes); the attempt was ended there",
                            job.filename
                        )));
                    }
                    if let Err(e) = out.write(&bytes).await {
                        break Err(e);
                    }
                    written = after;
                    self.vitals
                        .received
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    if let Some(r) = reservation.as_mut() {
                        r.wrote(bytes.len() as u64);
                    }
                    // The shared cap: the next read waits while the workers together are ahead of it.
                    tokio::select! {
                        _ = cancel.cancelled() => break Err(FetchError::Interrupted),
                        _ = self.throttle.take(bytes.len()) => {}
                    }
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
                        live.at(
                            written,
                            (written - reported) as f64 / last_report.elapsed().as_secs_f64(),
                        );
                        reported = written;
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
        drop(live);
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
        if ended.is_ok() && out.holds_whole_body() {
            // The whole body arrived, quickly, in memory: only its write and check are left.
            told_small();
        }
        if let Err(e) = ended {
            let e = self.own_disk_filled(job, e, written - start, total, space);
            if matches!(
                e,
                FetchError::Protocol(_) | FetchError::Verify(_) | FetchError::Refused(_)
            ) {
                // Nothing of this answer is worth keeping.
                drop(out);
                blocking({
                    let (dir, part) = (dir.clone(), part.clone());
                    move || dir.remove(&part).map_err(place_error)
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
        let (verified, staged) = self
            .verify_and_stage(job, out, &dir, &name, total, framed)
            .await?;
        Ok(Fetched {
            bytes: written,
            resumed_from: start,
            fetched: written - start,
            verified,
            staged,
            origin,
        })
    }

    /// A full disk is disk trouble to wait out, unless this attempt filled it itself: a body with no size
    /// that took at least half of what was free when it began, or a product larger than the whole file
    /// system. Waiting would only fill it again, so the job fails.
    fn own_disk_filled(
        &self,
        job: &Job,
        e: FetchError,
        wrote: u64,
        total: Option<u64>,
        space: Option<(u64, u64)>,
    ) -> FetchError {
        let full = matches!(&e, FetchError::Disk { source, .. }
            if matches!(source.raw_os_error(), Some(nix::libc::ENOSPC | nix::libc::EDQUOT)));
        let Some((free, capacity)) = space.filter(|_| full) else {
            return e;
        };
        let why = match total {
            None if wrote >= free / 2 => format!(
                "the server sent it with no size, and this attempt wrote {wrote} bytes of the {free}                  that were free when it began"
            ),
            Some(t) if t > capacity => {
                format!("it is {t} bytes, more than the whole file system holds ({capacity} bytes)")
            }
            _ => return e,
        };
        FetchError::Refused(format!(
            "{} filled the file system of {}: {why}; its .part file is removed. Make room (or check the \
             product) and run `mastsub retry {}`",
            job.filename,
            self.root.display(),
            job.id
        ))
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
            origin: v.origin.clone(),
            checksum: v.checksum.clone(),
        };
        let (store, owner, held, until) = (
            Arc::clone(&self.store),
            self.owner.clone(),
            job.held(),
            self.lease_until(),
        );
        tokio::spawn(async move { store.progress(held, &owner, until, &progress).await })
    }

    /// Writes what is still buffered and verifies the whole `.part` file, in one blocking call; the
    /// publisher makes it durable and renames it into place.
    async fn verify_and_stage(
        &self,
        job: &Job,
        out: disk::PartWriter,
        dir: &Arc<SafeDir>,
        name: &str,
        size: Option<u64>,
        framed: bool,
    ) -> Result<(Verified, Staged), FetchError> {
        let keep_as = if self.keep_previous {
            self.store
                .version_on_disk(&job.product, job.id)
                .await?
                .map(|previous| format!("{name}.{previous}"))
        } else {
            None
        };
        let check = disk::Check {
            dir: dir.clone(),
            name: name.to_string(),
            size,
            framed,
            accept_unsized: self.limits.accept_unsized,
        };
        let (verified, file) = blocking(move || check.run(out)).await?;
        Ok((
            verified,
            Staged {
                dir: dir.clone(),
                part: part_name(name),
                name: name.to_string(),
                keep_as,
                file,
            },
        ))
    }
}

/// The bucket's copy must not be older than the version asked for: a Reprocessed product is copied to the
/// bucket some time after MAST has it, and until then the bucket holds the version before. (Its
/// Last-Modified is when the copy was made, after the version was archived.)
fn fresh_in_bucket(job: &Job, headers: &HeaderMap) -> Result<(), FetchError> {
    if crate::notice::EventType::parse(&job.event_type)
        .is_none_or(|t| t != crate::notice::EventType::Reprocessed)
    {
        return Ok(());
    }
    let modified = headers
        .get(header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok());
    let (Some(text), Ok(version)) = (modified, crate::notice::MastTime::parse(&job.version)) else {
        return Ok(());
    };
    let Ok(at) = httpdate::parse_http_date(text) else {
        return Ok(());
    };
    let at = chrono::DateTime::<chrono::Utc>::from(at);
    // Last-Modified has whole seconds.
    if at.timestamp() < version.unix_seconds() {
        return Err(FetchError::StaleInBucket {
            modified: text.to_string(),
            version: job.version.clone(),
        });
    }
    Ok(())
}

/// What S3 says of the object's digests, for an answer from the bucket: the ETag (of the whole object,
/// also on a 206) and, on a whole answer (`whole`), the `x-amz-checksum-*` headers.
fn s3_digests(
    route: &Route,
    validator: &Validator,
    headers: &HeaderMap,
    whole: bool,
) -> Option<verify::digest::Expected> {
    if !matches!(route, Route::Cloud { .. }) {
        return None;
    }
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let sums: Vec<(&str, &str)> = if whole {
        verify::digest::Algorithm::ALL
            .iter()
            .filter_map(|(_, h)| text(h).map(|v| (*h, v)))
            .collect()
    } else {
        // A part of the object: the checksum the first, whole answer gave.
        validator
            .checksum
            .as_deref()
            .and_then(|c| c.split_once(':'))
            .into_iter()
            .collect()
    };
    Some(verify::digest::Expected::from_s3(
        validator.etag.as_deref(),
        text("x-amz-server-side-encryption")
            .or(text("x-amz-server-side-encryption-customer-algorithm").map(|_| "customer")),
        &sums,
    ))
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
            path: std::path::PathBuf::from("a download"),
            source: std::io::Error::other(e),
        })?
}

/// The file side of an attempt, as plain blocking calls, few per file: every call from async code costs a
/// hop to the blocking pool, and on many small files those hops were most of the time. Every byte written
/// passes the product's verifier on the way.
pub(crate) mod disk {
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::sync::Arc;

    use super::{
        FetchError, Problem, Verified, WHOLE_IN_MEMORY, WRITE_BUFFER, blocking, place_error,
    };
    use crate::fsutil::SafeDir;
    use crate::verify::{self, Verifier};

    /// Buffers the body and writes it to the `.part` file in few blocking calls: `WRITE_BUFFER` bytes at a
    /// time, or, for a body of at most `WHOLE_IN_MEMORY` bytes, all at once when the file is published (the
    /// file is opened by the first write, so a small product costs one blocking call in all). When it
    /// continues a `.part` file, the bytes already there pass the verifier first.
    pub struct PartWriter {
        file: Option<std::fs::File>,
        append: bool,
        buffer: Vec<u8>,
        limit: usize,
        dir: Arc<SafeDir>,
        part: String,
        verifier: Option<Box<dyn Verifier>>,
    }

    /// Blocking: what a writer carries into one blocking call and back.
    struct Carry {
        file: Option<std::fs::File>,
        verifier: Option<Box<dyn Verifier>>,
        buffer: Vec<u8>,
    }

    impl PartWriter {
        /// A writer for `part` in `dir`, continuing it when `append`; `remaining` is the body's announced
        /// size; `filename` chooses the verifier.
        pub fn new(
            dir: Arc<SafeDir>,
            part: String,
            append: bool,
            remaining: Option<u64>,
            filename: &str,
        ) -> PartWriter {
            let (limit, capacity) = match remaining {
                Some(r) if r <= WHOLE_IN_MEMORY as u64 => (usize::MAX, r as usize),
                _ => (WRITE_BUFFER, WRITE_BUFFER),
            };
            PartWriter {
                file: None,
                append,
                buffer: Vec::with_capacity(capacity),
                limit,
                dir,
                part,
                verifier: Some(verify::for_product(filename)),
            }
        }

        /// The verifier behind S3's digests of the object, when it comes from the bucket.
        pub fn checking(mut self, expected: Option<verify::digest::Expected>) -> PartWriter {
            if let Some(expected) = expected {
                self.verifier = self
                    .verifier
                    .take()
                    .map(|v| verify::digest::checking(v, expected));
            }
            self
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
            let carry = Carry {
                file: self.file.take(),
                verifier: self.verifier.take(),
                buffer: std::mem::take(&mut self.buffer),
            };
            let (dir, part, append) = (self.dir.clone(), self.part.clone(), self.append);
            let mut carry = blocking(move || write_at_end(carry, &dir, &part, append)).await?;
            carry.buffer.clear();
            self.file = carry.file;
            self.verifier = carry.verifier;
            self.buffer = carry.buffer;
            self.append = true;
            Ok(())
        }

        /// Blocking: writes what is buffered; gives back the file and the verifier that saw every byte.
        pub fn write_all_now(self) -> Result<(std::fs::File, Box<dyn Verifier>), FetchError> {
            let carry = Carry {
                file: self.file,
                verifier: self.verifier,
                buffer: self.buffer,
            };
            let carry = write_at_end(carry, &self.dir, &self.part, self.append)?;
            match (carry.file, carry.verifier) {
                (Some(f), Some(v)) => Ok((f, v)),
                _ => Err(FetchError::Internal("a part writer lost its file".into())),
            }
        }
    }

    fn verify_err(p: Problem) -> FetchError {
        match p {
            Problem::Io(m) => FetchError::Internal(m),
            other => FetchError::Verify(other.to_string()),
        }
    }

    /// Blocking: opens the file if it is not open yet (passing what it holds through the verifier when it
    /// is continued), then verifies and writes `buffer` at its end.
    fn write_at_end(
        mut carry: Carry,
        dir: &SafeDir,
        part: &str,
        append: bool,
    ) -> Result<Carry, FetchError> {
        let path = || dir.path().join(part);
        let mut file = match carry.file.take() {
            Some(f) => f,
            None => {
                let mut f = dir.open_rw(part, append).map_err(place_error)?;
                if append {
                    f.seek(SeekFrom::Start(0))
                        .map_err(|e| FetchError::local("read", path(), e))?;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = f
                            .read(&mut buf)
                            .map_err(|e| FetchError::local("read", path(), e))?;
                        if n == 0 {
                            break;
                        }
                        if let Some(v) = carry.verifier.as_mut() {
                            v.update(&buf[..n]).map_err(verify_err)?;
                        }
                    }
                }
                f.seek(SeekFrom::End(0))
                    .map_err(|e| FetchError::local("open", path(), e))?;
                f
            }
        };
        if let Some(v) = carry.verifier.as_mut() {
            v.update(&carry.buffer).map_err(verify_err)?;
        }
        file.write_all(&carry.buffer)
            .map_err(|e| FetchError::local("write", path(), e))?;
        carry.file = Some(file);
        Ok(carry)
    }

    /// What checking a finished `.part` file needs.
    pub struct Check {
        pub dir: Arc<SafeDir>,
        /// The product's file name.
        pub name: String,
        /// The size announced, if any.
        pub size: Option<u64>,
        /// The protocol marked the body's end (a length or chunked encoding).
        pub framed: bool,
        /// `download.accept_unsized_bodies`.
        pub accept_unsized: bool,
    }

    impl Check {
        /// Blocking: writes what is buffered and verifies the whole file; gives back the open file. A file
        /// that fails is removed (fetched from zero next time), except one cut short with no length, whose
        /// bytes may yet be continued.
        pub fn run(self, out: PartWriter) -> Result<(Verified, std::fs::File), FetchError> {
            let part = out.part.clone();
            let (mut file, verifier) = match out.write_all_now() {
                Ok(written) => written,
                Err(e) => {
                    if matches!(e, FetchError::Verify(_)) {
                        let _ = self.dir.remove(&part);
                    }
                    return Err(e);
                }
            };
            match self.check(&mut file, verifier) {
                Ok(v) => Ok((v, file)),
                Err(e) => {
                    drop(file);
                    if !matches!(e, FetchError::Cut { .. }) {
                        let _ = self.dir.remove(&part);
                    }
                    Err(e)
                }
            }
        }

        fn check(
            &self,
            file: &mut std::fs::File,
            verifier: Box<dyn Verifier>,
        ) -> Result<Verified, FetchError> {
            let actual = file
                .metadata()
                .map_err(|e| FetchError::local("read", self.dir.path().join(&self.name), e))?
                .len();
            if let Some(size) = self.size
                && actual != size
            {
                return Err(FetchError::Verify(format!(
                    "the file has {actual} bytes, the server announced {size}"
                )));
            }
            let verified = verifier.finish(file).map_err(|p| match p {
                // With a length announced and met, an early end is the server's file itself.
                Problem::Short(m) if self.framed => FetchError::Verify(format!(
                    "{m}, though the body had the length the server announced"
                )),
                Problem::Short(m) => FetchError::Cut {
                    got: actual,
                    expected: None,
                    reason: format!("the server sent no length and {m}"),
                },
                other => verify_err(other),
            })?;
            if !self.framed && !verified.proves_end && !self.accept_unsized {
                return Err(FetchError::Refused(format!(
                    "the server sent {} with no length (no Content-Length, not chunked), so a cut \
                     connection cannot be told from the end, and its format cannot prove the file whole \
                     ({}); set download.accept_unsized_bodies = true to accept such bodies",
                    self.name, verified.by
                )));
            }
            Ok(verified)
        }
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

    fn dir(root: &Path, rel: &str) -> Arc<SafeDir> {
        Arc::new(SafeDir::open(root, Path::new(rel), true).unwrap())
    }

    #[tokio::test]
    async fn a_write_that_ends_on_a_buffer_boundary_keeps_its_file() {
        let tmp = tempfile::tempdir().unwrap();
        let d = dir(tmp.path(), "");
        std::fs::write(tmp.path().join("x.part"), b"old bytes of another version").unwrap();
        let mut w = disk::PartWriter::new(d, "x.part".into(), false, None, "x.dat");
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
        let mut w = disk::PartWriter::new(
            dir(tmp.path(), "sub"),
            "small.part".into(),
            false,
            Some(3 * WRITE_BUFFER as u64),
            "small.dat",
        );
        for _ in 0..3 {
            w.write(&vec![1u8; WRITE_BUFFER]).await.unwrap();
        }
        assert!(!small.exists(), "a small body waits in memory");
        let (file, _) = w.write_all_now().unwrap();
        assert_eq!(file.metadata().unwrap().len(), 3 * WRITE_BUFFER as u64);

        let large = tmp.path().join("large.part");
        std::fs::write(&large, vec![2u8; 10]).unwrap();
        let remaining = 2 * WHOLE_IN_MEMORY as u64;
        let mut w = disk::PartWriter::new(
            dir(tmp.path(), ""),
            "large.part".into(),
            true,
            Some(remaining),
            "large.dat",
        );
        w.write(&vec![3u8; WRITE_BUFFER]).await.unwrap();
        assert_eq!(
            std::fs::metadata(&large).unwrap().len(),
            10 + WRITE_BUFFER as u64,
            "a large body is written as it comes, after what the file held"
        );
    }

    #[tokio::test]
    async fn a_continued_part_passes_the_verifier_from_its_first_byte() {
        let tmp = tempfile::tempdir().unwrap();
        // The bytes on disk are not FITS: continuing them must fail the FITS check, though the new bytes
        // alone would pass it.
        std::fs::write(tmp.path().join("a.fits.part"), vec![b'x'; 2880]).unwrap();
        let mut w = disk::PartWriter::new(
            dir(tmp.path(), ""),
            "a.fits.part".into(),
            true,
            None,
            "a.fits",
        );
        let e = w.write(&vec![b' '; WRITE_BUFFER]).await.unwrap_err();
        assert!(
            matches!(e, FetchError::Verify(ref m) if m.contains("SIMPLE")),
            "{e}"
        );
    }

    #[test]
    fn the_rate_watch_ends_only_a_whole_window_below_the_limit() {
        let limits = Limits {
            min_rate: 1000,
            min_rate_window: Duration::from_secs(3),
            max_product_size: u64::MAX,
            accept_unsized: false,
        };
        let t0 = Instant::now();
        let mut w = RateWatch::new(&limits, t0, 0);
        // A fast start, then a trickle: ended once three seconds pass at under 1000 B/s.
        assert!(w.check(t0 + Duration::from_secs(1), 10_000).is_ok());
        assert!(w.check(t0 + Duration::from_secs(2), 10_001).is_ok());
        assert!(
            w.check(t0 + Duration::from_secs(3), 10_002).is_ok(),
            "10 kB in the window"
        );
        assert!(w.check(t0 + Duration::from_secs(4), 10_003).is_err());
        let mut steady = RateWatch::new(&limits, t0, 0);
        for s in 1..20 {
            assert!(steady.check(t0 + Duration::from_secs(s), s * 1500).is_ok());
        }
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
            origin: None,
            checksum: None,
        };
        assert_eq!(v.if_range(), Some("Tue, 01 Dec 2026 10:00:00 GMT"));
        let none = Validator {
            etag: Some("W/\"x\"".into()),
            last_modified: None,
            origin: None,
            checksum: None,
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
