//! Why a download attempt ended early, and what that means for the job.

use std::path::PathBuf;
use std::time::Duration;

use crate::store::StoreError;

/// One attempt's failure. Whether and when to retry is decided in `policy.rs` from the variant.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No connection, a timeout, or a transport error before the body.
    #[error("{0}")]
    Transport(String),
    /// The body stopped before its announced end (reset, timeout, or a clean close).
    #[error("the body was cut after {got} of {} bytes: {reason}", expected.map_or("?".to_string(), |e| e.to_string()))]
    Cut {
        /// Bytes in the `.part` file.
        got: u64,
        /// Bytes announced.
        expected: Option<u64>,
        /// What the connection said.
        reason: String,
    },
    /// An HTTP status other than success, 401/403 and 404.
    #[error("MAST answered HTTP {status}")]
    Http {
        /// The status.
        status: u16,
        /// Its Retry-After, if any.
        retry_after: Option<Duration>,
    },
    /// 401 or 403: exclusive-access data without a (valid) token.
    #[error("MAST answered HTTP {status}: this product needs a MAST token")]
    Auth {
        /// 401 or 403.
        status: u16,
    },
    /// 404: not (yet) on MAST.
    #[error("MAST answered HTTP 404: the product is not (yet) there")]
    NotFound,
    /// The cloud bucket answered with a status other than success, 403 and 404.
    #[error("the cloud bucket answered HTTP {status}")]
    Bucket {
        /// The status.
        status: u16,
        /// Its Retry-After, if any.
        retry_after: Option<Duration>,
    },
    /// MAST's path look-up names a key, but the bucket has no object there (anonymous S3 answers 403 for
    /// a missing key where listing is not allowed, 404 where it is): not copied there yet.
    #[error("the cloud bucket has no object {key} (HTTP {status})")]
    NotInBucket {
        /// 403 or 404.
        status: u16,
        /// The key asked for.
        key: String,
    },
    /// The bucket's copy is older than the version to fetch (its Last-Modified is before the version's
    /// archived date): a reprocessed product not copied there yet.
    #[error(
        "the cloud bucket's copy is older than this version (Last-Modified {modified}, archived {version})"
    )]
    StaleInBucket {
        /// The object's Last-Modified.
        modified: String,
        /// The version's archived date.
        version: String,
    },
    /// MAST's path look-up has no cloud path for the product, and `cloud.only` forbids MAST.
    #[error("{}", crate::download::cloud::NOT_IN_CLOUD)]
    NotInCloud,
    /// The server's answer does not add up (a Content-Range that does not start where asked, more bytes than
    /// announced).
    #[error("{0}")]
    Protocol(String),
    /// The bytes are not the product: an HTML page, an encoding nobody asked for, a damaged or cut file
    /// by its format's own rules, a size that does not match.
    #[error("verification failed: {0}")]
    Verify(String),
    /// The attempt cannot succeed as things are, and retrying would not change that: a symbolic link in
    /// the download folder, a product over `download.max_product_size`, a disk filled by the product
    /// itself, a body with no length that its format cannot prove whole.
    #[error("{0}")]
    Refused(String),
    /// The low-speed limit: the rate stayed below `download.min_rate` for `download.min_rate_window`.
    #[error(
        "the transfer stayed below download.min_rate ({}) for {}: {rate:.0} B/s",
        crate::config::Rate(*min_rate),
        humantime::format_duration(*window)
    )]
    TooSlow {
        /// The rate over the window, bytes per second.
        rate: f64,
        /// The limit.
        min_rate: u64,
        /// The window.
        window: Duration,
    },
    /// The disk refused: full, over quota, read-only, or permissions.
    #[error("cannot {op} {}: {source}", path.display())]
    Disk {
        /// What was being done.
        op: &'static str,
        /// To which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No room for the product: writing it would leave the download file system with less than
    /// `download.min_free_space` free. Not a failure: the job waits.
    #[error(
        "waiting for room: {filename} needs {}, {} has {} free for it, and download.min_free_space keeps \
         {} free; make room (or lower download.min_free_space) and it starts by itself",
        human(*needed), root.display(), human(*free), human(*min_free)
    )]
    NoRoom {
        /// The product.
        filename: String,
        /// Bytes still to write.
        needed: u64,
        /// Bytes free for it (what the file system has, less what running downloads will still write).
        free: u64,
        /// `download.min_free_space`.
        min_free: u64,
        /// `storage.downloads`.
        root: PathBuf,
    },
    /// Another I/O error on a local file.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// To which path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The daemon is stopping; the `.part` file is kept.
    #[error("interrupted by shutdown")]
    Interrupted,
    /// Another worker holds the job now (our lease expired).
    #[error("the job's lease was lost")]
    LeaseLost,
    /// The store failed while the attempt ran.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug: the attempt panicked. The job fails rather than retrying the same bug forever.
    #[error("internal error (please report it): {0}")]
    Internal(String),
}

impl FetchError {
    /// A local file operation failed: disk trouble or another I/O error.
    pub fn local(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> FetchError {
        let path = path.into();
        if crate::fsutil::is_disk_trouble(&source) {
            FetchError::Disk { op, path, source }
        } else {
            FetchError::Io { op, path, source }
        }
    }

    /// Worth another attempt later: network trouble, cut bodies, 408, 429 and 5xx.
    pub fn is_transient(&self) -> bool {
        match self {
            FetchError::Transport(_)
            | FetchError::Cut { .. }
            | FetchError::TooSlow { .. }
            | FetchError::Protocol(_)
            | FetchError::Io { .. } => true,
            FetchError::Store(_) => true,
            FetchError::Http { status, .. } | FetchError::Bucket { status, .. } => {
                matches!(status, 408 | 429 | 500..=599)
            }
            _ => false,
        }
    }
}

impl From<reqwest::Error> for FetchError {
    fn from(e: reqwest::Error) -> FetchError {
        // The chain says what really happened (connection refused, reset, timed out).
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        FetchError::Transport(text)
    }
}

/// A size for a sentence: "1.5 GiB".
fn human(bytes: u64) -> String {
    bytesize::ByteSize(bytes).display().iec().to_string()
}
