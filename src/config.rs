//! Configuration: built-in defaults, then a TOML file, then `MASTSUB_<SECTION>__<KEY>` environment overrides.
//!
//! This module owns every key of the public contract, their defaults, validation, and the redacted view that
//! `check-config` prints. `config/mastsub.toml` documents the same keys; a test keeps the two in step.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// Where the configuration file is looked for when `--config` is not given.
pub const SYSTEM_CONFIG: &str = "/etc/mastsub/mastsub.toml";

/// The prefix of environment overrides: `MASTSUB_MAST__BASE_URL` sets `mast.base_url`.
pub const ENV_PREFIX: &str = "MASTSUB";

/// Errors while loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named with `--config` does not exist.
    #[error(
        "config file {0} does not exist (give an existing file with --config, or none to use the defaults)"
    )]
    Missing(PathBuf),
    /// The file or an environment override could not be read or does not fit the schema.
    #[error("{source_name}: {message}")]
    Load {
        /// The file, or "environment", or "defaults".
        source_name: String,
        /// What the `config` crate said, with the key.
        message: String,
    },
    /// Values that parse but do not make sense together.
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// A secret value (token, password). It never prints: Debug, Display and Serialize all show `(redacted)`.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(redacted)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("(redacted)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("(redacted)")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Database and download locations.
    pub storage: StorageConfig,
    /// The watched inbox folder.
    pub inbox: InboxConfig,
    /// Limits applied to every notice, whatever its source.
    pub ingest: IngestConfig,
    /// The MAST service.
    pub mast: MastConfig,
    /// The download workers.
    pub download: DownloadConfig,
    /// What each event type leads to.
    pub events: EventsConfig,
    /// Which products are downloaded (the others are recorded only).
    pub filters: crate::filters::FiltersConfig,
    /// The IMAP source.
    pub imap: ImapConfig,
    /// E-mail summaries.
    pub email: EmailConfig,
    /// The HTTP endpoint: metrics, the status page, `/api/status`.
    pub http: HttpConfig,
    /// Commands run when products land and when a notice's downloads have ended.
    pub hooks: HooksConfig,
    /// Public products from STScI's open-data bucket first, MAST as the fall-back.
    pub cloud: CloudConfig,
    /// This daemon as a member of several sharing one store.
    pub cluster: ClusterConfig,
    /// Logging.
    pub log: LogConfig,
}

/// What SIGHUP hands the loops: the configuration read again (or the one before, if the file no longer
/// loads). The download pool takes its token and `download.max_rate` from it, the IMAP source its
/// secrets; other keys take effect at the next start.
pub type Reload = tokio::sync::watch::Receiver<std::sync::Arc<Config>>;

/// `[storage]`
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The SQLite database file, or a `postgresql://` URL: a store shared by several daemons.
    pub database: PathBuf,
    /// The PostgreSQL password, read from this file (instead of the URL, `PGPASSWORD` or `PGPASSFILE`).
    pub password_file: Option<PathBuf>,
    /// The root of downloaded products: `<downloads>/<mission>/<fileset>/<filename>`.
    pub downloads: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            database: PathBuf::from("mastsub.db"),
            password_file: None,
            downloads: PathBuf::from("mastDownload"),
        }
    }
}

/// Without the password a PostgreSQL URL may hold.
impl fmt::Debug for StorageConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StorageConfig")
            .field("database", &self.database_shown())
            .field("password_file", &self.password_file)
            .field("downloads", &self.downloads)
            .finish()
    }
}

/// What `storage.database` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (the URL as given, password included: never shown).
    Postgres(url::Url),
}

/// Whether `text` starts like a URL (`scheme://`), which a file path is not taken to be.
fn url_scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once("://")?;
    (!scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
    .then_some(scheme)
}

/// A database URL as it may be shown: without a password, in the user part or as a `password`
/// parameter. Text that is not a URL is returned as it is.
pub fn database_shown(text: &str) -> String {
    let Some(scheme) = url_scheme(text) else {
        return text.to_string();
    };
    match url::Url::parse(text) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            if u.query_pairs().any(|(k, _)| k == "password") {
                let kept: Vec<(String, String)> = u
                    .query_pairs()
                    .filter(|(k, _)| k != "password")
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect();
                if kept.is_empty() {
                    u.set_query(None);
                } else {
                    u.query_pairs_mut().clear().extend_pairs(kept);
                }
            }
            u.to_string()
        }
        Err(_) => format!("{scheme}://..."),
    }
}

impl StorageConfig {
    /// `storage.database` as it may be shown (in logs, `check-config`, `status`, errors): a URL's
    /// password removed.
    pub fn database_shown(&self) -> String {
        database_shown(&self.database.to_string_lossy())
    }

    /// What `storage.database` names, or why it names nothing mastsub can open.
    pub fn target(&self) -> Result<DatabaseTarget, String> {
        let Some(text) = self.database.to_str() else {
            return Ok(DatabaseTarget::Sqlite(self.database.clone()));
        };
        let Some(scheme) = url_scheme(text) else {
            // libpq's other form, `host=db user=u password=...`: not a file name (it would be created,
            // and shown, password and all).
            let words: Vec<&str> = text.split_whitespace().collect();
            if words.len() > 1 && words.iter().all(|w| w.contains('='))
                || text.contains("password=")
            {
                return Err(
                    "storage.database looks like a libpq key=value connection string, which mastsub \
                     does not read (and would take for a file name): give a \
                     postgresql://user@host:port/database URL, with the password in \
                     storage.password_file"
                        .into(),
                );
            }
            return Ok(DatabaseTarget::Sqlite(self.database.clone()));
        };
        let shown = database_shown(text);
        if !matches!(scheme, "postgres" | "postgresql") {
            return Err(format!(
                "storage.database = {shown}: a {scheme}:// URL is not a database mastsub can open; give \
                 the path of a SQLite file, such as mastsub.db, or a postgresql://user@host:port/database \
                 URL"
            ));
        }
        let url = url::Url::parse(text).map_err(|e| {
            format!(
                "storage.database = {shown}: not a valid PostgreSQL URL ({e}); the form is \
                 postgresql://user@host:port/database"
            )
        })?;
        if url.path().trim_start_matches('/').is_empty()
            && !url.query_pairs().any(|(k, _)| k == "dbname")
        {
            return Err(format!(
                "storage.database = {shown}: the URL names no database; the form is \
                 postgresql://user@host:port/database"
            ));
        }
        if self.password_file.is_some()
            && (url.password().is_some() || url.query_pairs().any(|(k, _)| k == "password"))
        {
            return Err(format!(
                "storage.database = {shown} has a password, and storage.password_file is set too: give \
                 the password in one place (the file keeps it out of the configuration)"
            ));
        }
        Ok(DatabaseTarget::Postgres(url))
    }
}

/// `[inbox]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InboxConfig {
    /// Whether the inbox folder is watched at all.
    pub enabled: bool,
    /// The watched folder; handled files move to `<dir>/processed/`, rejected ones to `<dir>/rejected/`.
    pub dir: PathBuf,
    /// How long a closed, renamed-in or found file must keep its size and time before it is read.
    #[serde(with = "humantime_serde")]
    pub settle: Duration,
    /// A file still open for writing is taken anyway once nothing has written to it for this long.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// How often the folder is scanned in full, as a safety net under the file-system watcher.
    #[serde(with = "humantime_serde")]
    pub rescan_interval: Duration,
}

impl Default for InboxConfig {
    fn default() -> Self {
        InboxConfig {
            enabled: true,
            dir: PathBuf::from("inbox"),
            settle: Duration::from_millis(200),
            write_timeout: Duration::from_secs(60),
            rescan_interval: Duration::from_secs(60),
        }
    }
}

/// `[ingest]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// A notice larger than this is rejected whole without being parsed.
    pub max_notice_size: ByteSize,
    /// A notice nested deeper than this (arrays and objects) is rejected whole.
    pub max_nesting: usize,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            max_notice_size: ByteSize::mib(64),
            max_nesting: 32,
        }
    }
}

/// `[mast]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MastConfig {
    /// Every product URL is built on this; nothing in a notice can point elsewhere.
    pub base_url: String,
    /// A MAST API token for exclusive-access data (or `token_file`, or env `MAST_API_TOKEN`).
    pub token: Option<Secret>,
    /// A file holding the token.
    pub token_file: Option<PathBuf>,
}

impl Default for MastConfig {
    fn default() -> Self {
        MastConfig {
            base_url: "https://mast.stsci.edu".to_string(),
            token: None,
            token_file: None,
        }
    }
}

/// `[download]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DownloadConfig {
    /// How many products download at once.
    pub workers: usize,
    /// Attempts before a job ends `failed`.
    pub max_attempts: u32,
    /// The first retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// The longest retry delay.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Time allowed to open a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed between two reads of a body (not the whole transfer).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Keep the replaced version of a reprocessed product as `<name>.<archived_date>`.
    pub keep_previous: bool,
    /// After a 404 (a product can lag its notice), try again this often...
    #[serde(with = "humantime_serde")]
    pub not_found_retry: Duration,
    /// ...until this long after the first 404, then fail.
    #[serde(with = "humantime_serde")]
    pub not_found_give_up: Duration,
    /// On SIGTERM, the daemon stops within this: running downloads stop at a safe point keeping their
    /// `.part` files, and the jobs go back to the queue.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// The low-speed limit: an attempt whose rate stays below this for `min_rate_window` is ended and
    /// retried (curl's `--speed-limit`, aria2's `--lowest-speed-limit`); `0B/s` turns it off.
    pub min_rate: Rate,
    /// How long a transfer may stay below `min_rate`.
    #[serde(with = "humantime_serde")]
    pub min_rate_window: Duration,
    /// No product may be larger: an announced size above it is refused, and a body sent with no size
    /// is ended when it grows past it.
    pub max_product_size: ByteSize,
    /// Publish a body sent with no length (no Content-Length, not chunked) even when its format cannot
    /// prove the file whole (FITS with NEXTEND, gzip, JSON, PNG and JPEG can); off: such a body is refused.
    pub accept_unsized_bodies: bool,
    /// All workers together receive at most this (rclone's `--bwlimit`, aria2's
    /// `--max-overall-download-limit`); unset: no cap. Re-read on SIGHUP.
    pub max_rate: Option<Rate>,
    /// No body is written while it would leave the download file system with less than this free:
    /// such a job waits (never fails) until room appears.
    pub min_free_space: ByteSize,
    /// How long a claim on a job lasts unless renewed (workers renew it every third of it): a job whose
    /// holder is gone, and cannot be seen to be, is taken over once its lease has run out.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
}

/// Bytes per second, written like `"50MB/s"` or `"1KiB/s"` (SI and binary units; `/s` may be left out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Rate(pub u64);

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Rate, String> {
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t).trim();
        t.parse::<ByteSize>()
            .map(|b| Rate(b.as_u64()))
            .map_err(|e| format!("{s:?} is not a rate such as \"50MB/s\" or \"1KiB/s\": {e}"))
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/s", ByteSize(self.0).display().si())
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        /// A rate as text, or a plain number of bytes per second (as an environment value may arrive).
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Rate(n)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            workers: 4,
            max_attempts: 8,
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(15 * 60),
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(120),
            keep_previous: false,
            not_found_retry: Duration::from_secs(30 * 60),
            not_found_give_up: Duration::from_secs(6 * 3600),
            drain_timeout: Duration::from_secs(10),
            min_rate: Rate(1000),
            min_rate_window: Duration::from_secs(60),
            max_product_size: ByteSize::gib(200),
            accept_unsized_bodies: false,
            max_rate: None,
            min_free_space: ByteSize::gib(1),
            lease: Duration::from_secs(60),
        }
    }
}

/// What an event of one type leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum EventAction {
    /// Record the event and download the product.
    #[default]
    Download,
    /// Record the event only.
    Record,
}

/// `[events]`
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    /// For `New` events.
    pub new: EventAction,
    /// For `First` events (JWST: a program's first data).
    pub first: EventAction,
    /// For `Reprocessed` events.
    pub reprocessed: EventAction,
    /// For `Public` events.
    pub public: EventAction,
    /// For event types mastsub does not know (MAST may add some): recorded only by default.
    pub other: EventAction,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            new: EventAction::Download,
            first: EventAction::Download,
            reprocessed: EventAction::Download,
            public: EventAction::Download,
            other: EventAction::Record,
        }
    }
}

/// How a connection is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// TLS from the first byte (IMAPS 993, SMTPS 465).
    Implicit,
    /// Plain, then STARTTLS.
    Starttls,
    /// No TLS at all (warned about at start-up).
    None,
}

/// `[imap]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImapConfig {
    /// Whether the mailbox is read.
    pub enabled: bool,
    /// The server.
    pub host: String,
    /// The port.
    pub port: u16,
    /// `implicit`, `starttls` or `none`.
    pub tls: TlsMode,
    /// A PEM file of CA certificates to trust instead of the system's, or of the server's own
    /// (self-signed) certificate.
    pub ca_file: Option<PathBuf>,
    /// "sha256:<hex>": trust only the server certificate with this SHA-256 fingerprint.
    pub tls_fingerprint: Option<String>,
    /// The login name.
    pub username: String,
    /// The password (or `password_file`, `password_credential`).
    pub password: Option<Secret>,
    /// A file holding the password.
    pub password_file: Option<PathBuf>,
    /// The name of a systemd credential holding the password (`$CREDENTIALS_DIRECTORY/<name>`).
    pub password_credential: Option<String>,
    /// A file holding an OAuth2 access token: XOAUTH2 instead of LOGIN.
    pub oauth2_token_file: Option<PathBuf>,
    /// A command (run with `sh -c`) printing an OAuth2 access token: XOAUTH2 instead of LOGIN.
    pub oauth2_token_command: Option<String>,
    /// The mailbox notices arrive in.
    pub mailbox: String,
    /// Where taken mails are moved, if set.
    pub processed_mailbox: Option<String>,
    /// Addresses or `@domain`s notices are accepted from; empty accepts any sender.
    pub allowed_senders: Vec<String>,
    /// Mails larger than this are left alone.
    pub max_message_size: ByteSize,
    /// Use IDLE when the server offers it.
    pub idle: bool,
    /// How often to poll when IDLE is off or missing.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How often IDLE is ended and issued again.
    #[serde(with = "humantime_serde")]
    pub idle_refresh: Duration,
    /// How long any command (and connecting, and logging in) may take.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for ImapConfig {
    fn default() -> Self {
        ImapConfig {
            enabled: false,
            host: String::new(),
            port: 993,
            tls: TlsMode::Implicit,
            ca_file: None,
            tls_fingerprint: None,
            username: String::new(),
            password: None,
            password_file: None,
            password_credential: None,
            oauth2_token_file: None,
            oauth2_token_command: None,
            mailbox: "INBOX".to_string(),
            processed_mailbox: None,
            allowed_senders: Vec::new(),
            max_message_size: ByteSize::mib(96),
            idle: true,
            poll_interval: Duration::from_secs(300),
            idle_refresh: Duration::from_secs(9 * 60),
            timeout: Duration::from_secs(60),
        }
    }
}

/// `[email]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EmailConfig {
    /// Whether summaries and alerts are mailed.
    pub enabled: bool,
    /// The SMTP server.
    pub smtp_host: String,
    /// The SMTP port.
    pub smtp_port: u16,
    /// `implicit`, `starttls` or `none`.
    pub tls: TlsMode,
    /// A PEM file of CA certificates to trust instead of the system's, or of the server's own
    /// (self-signed) certificate.
    pub ca_file: Option<PathBuf>,
    /// "sha256:<hex>": trust only the server certificate with this SHA-256 fingerprint.
    pub tls_fingerprint: Option<String>,
    /// The SMTP login, if any.
    pub username: Option<String>,
    /// A file holding the SMTP password.
    pub password_file: Option<PathBuf>,
    /// The sender address.
    pub from: String,
    /// The recipients.
    pub to: Vec<String>,
    /// The first wait before a mail that could not be sent is tried again.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// The longest wait between tries.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// At most one alert per cause this often.
    #[serde(with = "humantime_serde")]
    pub alert_every: Duration,
}

impl Default for EmailConfig {
    fn default() -> Self {
        EmailConfig {
            enabled: false,
            smtp_host: String::new(),
            smtp_port: 587,
            tls: TlsMode::Starttls,
            ca_file: None,
            tls_fingerprint: None,
            username: None,
            password_file: None,
            from: String::new(),
            to: Vec::new(),
            retry_initial: Duration::from_secs(30),
            retry_max: Duration::from_secs(30 * 60),
            alert_every: Duration::from_secs(3600),
        }
    }
}

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Journal-friendly under systemd, coloured on a terminal, plain otherwise.
    Auto,
    /// Human-readable lines with timestamps.
    Pretty,
    /// One JSON object per line.
    Json,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `auto`, `pretty` or `json`.
    pub format: LogFormat,
    /// A level (`info`) or a tracing filter (`info,mastsub::inbox=debug`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Auto,
            level: "info".to_string(),
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve nothing unless true.
    pub enabled: bool,
    /// The address and port to bind (only this one).
    pub listen: std::net::SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: false,
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 9187)),
        }
    }
}

/// `[hooks]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HooksConfig {
    /// Run through `sh -c` once per published product version.
    pub on_product: Option<String>,
    /// Run through `sh -c` once when every download of a notice has ended.
    pub on_notice: Option<String>,
    /// A run still going after this is ended, with its whole process group, as a failed attempt.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts of a run (a non-zero exit is tried again) before it is recorded as failed.
    pub max_attempts: u32,
    /// The first delay before a failed run is tried again; it doubles with each attempt.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// Runs at once.
    pub concurrency: usize,
}

impl Default for HooksConfig {
    fn default() -> Self {
        HooksConfig {
            on_product: None,
            on_notice: None,
            timeout: Duration::from_secs(3600),
            max_attempts: 5,
            retry_initial: Duration::from_secs(30),
            concurrency: 2,
        }
    }
}

/// `[cluster]`
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// This member's name (unset: the host name): the first part of its lease owner names.
    pub node: Option<String>,
}

impl ClusterConfig {
    /// `node`, or the host name.
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .filter(|h| !h.is_empty() && !h.contains(':'))
                .unwrap_or_else(|| "localhost".into())
        })
    }
}

/// `[cloud]`: public products from an S3 bucket (STScI's open-data bucket by default) instead of MAST's
/// servers, as astroquery's `Observations.enable_cloud_dataset()` does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CloudConfig {
    /// Look products up in the bucket first.
    pub enabled: bool,
    /// The bucket; the object for key K is `{bucket_url}/{K}` (path- or virtual-host style alike).
    pub bucket_url: String,
    /// Never fall back to MAST (astroquery's `cloud_only`): a product not in the bucket is not
    /// downloaded, and its job fails saying so.
    pub only: bool,
    /// The event types whose products may come from the bucket; `"*"` is every type.
    pub event_types: Vec<String>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        CloudConfig {
            enabled: false,
            bucket_url: "https://stpubdata.s3.amazonaws.com".to_string(),
            only: false,
            event_types: vec!["*".to_string()],
        }
    }
}

impl CloudConfig {
    /// Whether products of `event_type` (as stored) may come from the bucket.
    pub fn takes(&self, event_type: &str) -> bool {
        let wanted = crate::notice::EventType::parse(event_type);
        self.event_types.iter().any(|t| {
            t == "*"
                || t.eq_ignore_ascii_case(event_type)
                || (wanted.is_some() && crate::notice::EventType::parse(t) == wanted)
        })
    }
}

/// Whether an environment variable is a configuration override: `MASTSUB_<SECTION>__<KEY>`.
pub fn is_override(name: &str) -> bool {
    name.strip_prefix(ENV_PREFIX)
        .and_then(|rest| rest.strip_prefix('_'))
        .and_then(|rest| rest.split_once("__"))
        .is_some_and(|(section, key)| !section.is_empty() && !key.is_empty())
}

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: [&str; 7] = [
    "cloud.event_types",
    "imap.allowed_senders",
    "email.to",
    "filters.event_type",
    "filters.mission",
    "filters.program",
    "filters.filename",
];

impl Config {
    /// Loads the configuration: defaults, then `file` (or [`SYSTEM_CONFIG`] if it exists), then the
    /// environment, then validates it.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match file {
            Some(path) if !path.exists() => return Err(ConfigError::Missing(path.to_path_buf())),
            Some(path) => Some(path.to_path_buf()),
            None => Some(PathBuf::from(SYSTEM_CONFIG)).filter(|p| p.exists()),
        };
        let defaults =
            config::Config::try_from(&Config::default()).map_err(|e| ConfigError::Load {
                source_name: "built-in defaults".into(),
                message: e.to_string(),
            })?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = &file {
            builder = builder.add_source(
                config::File::from(path.as_path())
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        // No `try_parsing`: it would turn a password "007" into the number 7. The config crate converts
        // strings to numbers and booleans itself where a key needs one; the list keys are split here.
        // Only `MASTSUB_<SECTION>__<KEY>`: other `MASTSUB_*` variables are not configuration (a hook's
        // `MASTSUB_PATH`, say, when the hook runs `mastsub status`), and would be refused as unknown keys.
        let overrides: config::Map<String, String> =
            std::env::vars().filter(|(k, _)| is_override(k)).collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .source(Some(overrides)),
        );
        for key in LIST_KEYS {
            let var = format!("{ENV_PREFIX}_{}", key.to_uppercase().replace('.', "__"));
            if let Ok(value) = std::env::var(&var) {
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                builder = builder
                    .set_override(key, items)
                    .map_err(|e| ConfigError::Load {
                        source_name: var.clone(),
                        message: e.to_string(),
                    })?;
            }
        }
        let source_name = match &file {
            Some(path) => format!("{} (or a MASTSUB_* environment override)", path.display()),
            None => "MASTSUB_* environment overrides".to_string(),
        };
        let loaded = builder
            .build()
            .and_then(|c| c.try_deserialize::<Config>())
            .map_err(|e| ConfigError::Load {
                source_name,
                message: e.to_string(),
            })?;
        loaded.validate()?;
        Ok(loaded)
    }

    /// Checks values that parse but cannot work; every problem is listed, not only the first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        match url::Url::parse(&self.mast.base_url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            Ok(_) => problems.push(format!(
                "mast.base_url = {:?}: expected an http:// or https:// URL with a host",
                self.mast.base_url
            )),
            Err(e) => problems.push(format!(
                "mast.base_url = {:?}: {e}; expected a URL such as https://mast.stsci.edu",
                self.mast.base_url
            )),
        }
        match url::Url::parse(&self.cloud.bucket_url) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.query().is_none() => {}
            Ok(_) => problems.push(format!(
                "cloud.bucket_url = {:?}: expected an http:// or https:// URL with a host and no query, \
                 such as https://stpubdata.s3.amazonaws.com",
                self.cloud.bucket_url
            )),
            Err(e) => problems.push(format!(
                "cloud.bucket_url = {:?}: {e}; expected a URL such as https://stpubdata.s3.amazonaws.com",
                self.cloud.bucket_url
            )),
        }
        if self.cloud.event_types.iter().any(|t| t.trim().is_empty()) {
            problems.push(
                "cloud.event_types has an empty entry: name event types (New, First, Reprocessed, \
                 Public, ...) or \"*\" for all"
                    .into(),
            );
        }
        if self.cloud.enabled && self.cloud.event_types.is_empty() {
            problems.push(
                "cloud.enabled = true but cloud.event_types is empty: no product could use the bucket; \
                 give [\"*\"] for all types"
                    .into(),
            );
        }
        if self.mast.token.is_some() && self.mast.token_file.is_some() {
            problems.push("mast.token and mast.token_file are both set: keep one".into());
        }
        if let Some(node) = &self.cluster.node
            && (node.is_empty()
                || node.len() > 64
                || node.starts_with('.')
                || node
                    .chars()
                    .any(|c| c == ':' || c == '/' || c.is_whitespace() || c.is_control()))
        {
            problems.push(format!(
                "cluster.node = {node:?}: a name of 1 to 64 characters without ':', '/', spaces or \
                 control characters, not starting with '.' (it names the member's folder in a shared \
                 inbox)"
            ));
        }
        match self.storage.target() {
            Err(problem) => problems.push(problem),
            Ok(DatabaseTarget::Sqlite(_)) if self.storage.password_file.is_some() => problems.push(
                "storage.password_file is set, but storage.database is a SQLite file, which has no \
                 password: remove it, or give a postgresql:// URL"
                    .into(),
            ),
            Ok(_) => {}
        }
        if self.download.lease < Duration::from_secs(3) {
            problems.push(format!(
                "download.lease = {}: at least 3s (workers renew it every third of it)",
                humantime::format_duration(self.download.lease)
            ));
        }
        if self.download.workers == 0 {
            problems.push("download.workers = 0: at least one worker is needed".into());
        }
        if self.download.drain_timeout < Duration::from_secs(1) {
            problems.push("download.drain_timeout must be at least 1s".into());
        }
        if self.download.max_attempts == 0 {
            problems.push("download.max_attempts = 0: at least one attempt is needed".into());
        }
        if self.download.retry_initial > self.download.retry_max {
            problems.push(format!(
                "download.retry_initial ({}) is longer than download.retry_max ({})",
                humantime::format_duration(self.download.retry_initial),
                humantime::format_duration(self.download.retry_max)
            ));
        }
        if self.ingest.max_nesting < 2 {
            problems.push("ingest.max_nesting must be at least 2 (an array of objects)".into());
        }
        if self.ingest.max_notice_size.as_u64() == 0 {
            problems.push("ingest.max_notice_size must be larger than 0".into());
        }
        if self.download.min_rate.0 > 0 && self.download.min_rate_window < Duration::from_secs(1) {
            problems.push(
                "download.min_rate_window must be at least 1s (or set download.min_rate = \"0B/s\" to turn \
                 the low-speed limit off)"
                    .into(),
            );
        }
        if self.download.max_rate.is_some_and(|r| r.0 == 0) {
            problems.push(
                "download.max_rate = \"0B/s\" would stop every download: remove the key for no cap"
                    .into(),
            );
        }
        if let Some(cap) = self.download.max_rate.filter(|r| r.0 > 0)
            && self.download.min_rate.0 > 0
            && cap.0
                < self
                    .download
                    .min_rate
                    .0
                    .saturating_mul(self.download.workers as u64)
        {
            problems.push(format!(
                "download.max_rate ({cap}) is below download.workers ({}) x download.min_rate ({}): every \
                 transfer would be held under the low-speed limit and ended as too slow; raise max_rate, or \
                 lower min_rate (\"0B/s\" turns the limit off)",
                self.download.workers, self.download.min_rate
            ));
        }
        if self.hooks.max_attempts == 0 {
            problems.push("hooks.max_attempts = 0: at least one attempt is needed".into());
        }
        if self.hooks.concurrency == 0 {
            problems.push("hooks.concurrency = 0: at least one hook must be able to run".into());
        }
        if self.hooks.timeout < Duration::from_secs(1) {
            problems.push("hooks.timeout must be at least 1s".into());
        }
        for (key, command) in [
            ("on_product", &self.hooks.on_product),
            ("on_notice", &self.hooks.on_notice),
        ] {
            if command.as_deref().is_some_and(|c| c.trim().is_empty()) {
                problems.push(format!(
                    "hooks.{key} is empty: remove the key, or give a command for sh -c"
                ));
            }
        }
        if self.download.max_product_size.as_u64() == 0 {
            problems.push("download.max_product_size must be larger than 0".into());
        }
        if self.inbox.settle.is_zero() {
            problems.push("inbox.settle must be longer than 0".into());
        }
        if self.inbox.rescan_interval < Duration::from_secs(1) {
            problems.push("inbox.rescan_interval must be at least 1s".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(format!(
                "log.level = {:?}: {e}; expected error, warn, info, debug or trace",
                self.log.level
            ));
        }
        if let Err(e) = crate::filters::Filters::new(&self.filters) {
            problems.push(format!("[filters] {e}"));
        }
        for (section, enabled, tls, fingerprint) in [
            (
                "imap",
                self.imap.enabled,
                self.imap.tls,
                &self.imap.tls_fingerprint,
            ),
            (
                "email",
                self.email.enabled,
                self.email.tls,
                &self.email.tls_fingerprint,
            ),
        ] {
            let Some(fingerprint) = fingerprint.as_deref().filter(|_| enabled) else {
                continue;
            };
            if let Err(e) = crate::tls::parse_fingerprint(fingerprint) {
                problems.push(format!(
                    "{section}.tls_fingerprint = {fingerprint:?}: {e}, e.g. \"sha256:{}\"",
                    "0f".repeat(32)
                ));
            }
            if tls == TlsMode::None {
                problems.push(format!(
                    "{section}.tls_fingerprint is set but {section}.tls = \"none\": a fingerprint needs \
                     TLS (set {section}.tls = \"implicit\" or \"starttls\")"
                ));
            }
        }
        if self.imap.enabled {
            if self.imap.host.is_empty() {
                problems.push("imap.enabled = true but imap.host is empty".into());
            }
            if self.imap.username.is_empty() {
                problems.push("imap.enabled = true but imap.username is empty".into());
            }
            let i = &self.imap;
            let ways = [
                ("password", i.password.is_some()),
                ("password_file", i.password_file.is_some()),
                ("password_credential", i.password_credential.is_some()),
                ("oauth2_token_file", i.oauth2_token_file.is_some()),
                ("oauth2_token_command", i.oauth2_token_command.is_some()),
            ];
            let given: Vec<&str> = ways.iter().filter(|w| w.1).map(|w| w.0).collect();
            match given.len() {
                0 => problems.push(
                    "imap.enabled = true but no credential is set: set one of imap.password, \
                     imap.password_file, imap.password_credential (LOGIN), imap.oauth2_token_file or \
                     imap.oauth2_token_command (XOAUTH2)"
                        .into(),
                ),
                1 => {}
                _ => problems.push(format!(
                    "imap: set only one credential, not {}",
                    given
                        .iter()
                        .map(|g| format!("imap.{g}"))
                        .collect::<Vec<_>>()
                        .join(" and ")
                )),
            }
            if i.mailbox.is_empty() {
                problems.push("imap.mailbox must not be empty".into());
            }
            // INBOX is case-insensitive in IMAP: "inbox" is the same mailbox.
            let same = |a: &str, b: &str| {
                a == b || (a.eq_ignore_ascii_case("INBOX") && b.eq_ignore_ascii_case("INBOX"))
            };
            if i.processed_mailbox
                .as_deref()
                .is_some_and(|p| same(p, &i.mailbox))
            {
                problems.push(
                    "imap.processed_mailbox must differ from imap.mailbox (taken mails would come back \
                     as new ones)"
                        .into(),
                );
            }
            if i.idle_refresh.is_zero() || i.idle_refresh > Duration::from_secs(600) {
                problems.push(format!(
                    "imap.idle_refresh = {:?} must be between 1s and 10m (servers drop silent IDLE)",
                    i.idle_refresh
                ));
            }
            if i.timeout < Duration::from_secs(1) {
                problems.push("imap.timeout must be at least 1s".into());
            }
            if i.poll_interval < Duration::from_secs(1) {
                problems.push("imap.poll_interval must be at least 1s".into());
            }
            if i.max_message_size.as_u64() == 0 || i.max_message_size > ByteSize::mib(256) {
                problems.push(format!(
                    "imap.max_message_size = {} must be between 1 byte and 256MiB",
                    i.max_message_size
                ));
            }
        }
        if self.email.enabled {
            if self.email.smtp_host.is_empty() {
                problems.push("email.enabled = true but email.smtp_host is empty".into());
            }
            if self.email.from.is_empty() {
                problems.push("email.enabled = true but email.from is empty".into());
            }
            for address in std::iter::once(&self.email.from).chain(&self.email.to) {
                if !address.is_empty() && address.parse::<lettre::message::Mailbox>().is_err() {
                    problems.push(format!(
                        "email: {address:?} is not a mail address (e.g. \"mastsub@example.org\" or \
                         \"mastsub <mastsub@example.org>\")"
                    ));
                }
            }
            if self.email.retry_initial.is_zero() || self.email.retry_initial > self.email.retry_max
            {
                problems
                    .push("email.retry_initial must be above 0 and at most email.retry_max".into());
            }
            if self.email.username.is_some() != self.email.password_file.is_some() {
                problems.push(
                    "email.username and email.password_file go together: set both or neither"
                        .into(),
                );
            }
            if self.email.to.is_empty() {
                problems.push("email.enabled = true but email.to is empty".into());
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The effective configuration as TOML, with every secret shown as `(redacted)`.
    pub fn to_redacted_toml(&self) -> String {
        // Serialization cannot fail for these plain structs; Secret serializes as "(redacted)".
        let mut shown = self.clone();
        shown.storage.database = PathBuf::from(self.storage.database_shown());
        toml::to_string_pretty(&shown)
            .unwrap_or_else(|e| format!("# cannot render the configuration: {e}\n"))
    }
}

impl EventsConfig {
    /// The action for an event type.
    pub fn action_for(&self, event_type: &crate::notice::EventType) -> EventAction {
        use crate::notice::EventType;
        match event_type {
            EventType::New => self.new,
            EventType::First => self.first,
            EventType::Reprocessed => self.reprocessed,
            EventType::Public => self.public,
            EventType::Other(_) => self.other,
        }
    }

    /// The `[events]` key that sets the action for `event_type`.
    pub fn key_for(event_type: &crate::notice::EventType) -> &'static str {
        use crate::notice::EventType;
        match event_type {
            EventType::New => "new",
            EventType::First => "first",
            EventType::Reprocessed => "reprocessed",
            EventType::Public => "public",
            EventType::Other(_) => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_read_as_people_write_them() {
        for (text, bytes) in [
            ("1kB/s", 1000),
            ("50MB/s", 50_000_000),
            ("1KiB/s", 1024),
            ("0B/s", 0),
            ("2 MB", 2_000_000),
        ] {
            assert_eq!(text.parse::<Rate>().unwrap(), Rate(bytes), "{text}");
        }
        assert!("fast".parse::<Rate>().unwrap_err().contains("50MB/s"));
        assert_eq!(Rate(1000).to_string(), "1.0 kB/s");
    }

    #[test]
    fn defaults_are_valid_and_match_the_contract() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.storage.database, PathBuf::from("mastsub.db"));
        assert_eq!(c.storage.downloads, PathBuf::from("mastDownload"));
        assert_eq!(c.inbox.dir, PathBuf::from("inbox"));
        assert_eq!(c.download.workers, 4);
        assert_eq!(c.download.max_attempts, 8);
        assert_eq!(c.ingest.max_notice_size, ByteSize::mib(64));
    }

    #[test]
    fn cloud_settings_are_checked_and_event_types_matched_as_mast_writes_them() {
        let mut c = Config::default();
        assert!(!c.cloud.enabled);
        assert_eq!(c.cloud.bucket_url, "https://stpubdata.s3.amazonaws.com");
        assert!(c.cloud.takes("Public") && c.cloud.takes("SomethingNew"));
        c.cloud.event_types = vec!["public".into(), "First".into()];
        assert!(c.cloud.takes("Public") && c.cloud.takes("FIRST"));
        assert!(!c.cloud.takes("New") && !c.cloud.takes("Reprocessed"));
        c.cloud.enabled = true;
        c.cloud.bucket_url = "s3://stpubdata".into();
        c.cloud.event_types = vec![" ".into()];
        let Err(ConfigError::Invalid(problems)) = c.validate() else {
            panic!("expected invalid")
        };
        assert!(
            problems.iter().any(|p| p.contains("cloud.bucket_url")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.contains("cloud.event_types has an empty entry"))
        );
        c.cloud.bucket_url = "http://127.0.0.1:9000/stpubdata".into();
        c.cloud.event_types = vec![];
        let Err(ConfigError::Invalid(problems)) = c.validate() else {
            panic!("expected invalid")
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("no product could use the bucket"));
    }

    #[test]
    fn a_postgresql_url_is_a_database_and_its_password_is_never_shown() {
        let mut c = Config::default();
        c.storage.database = PathBuf::from(
            "postgresql://mastsub:s3cr3t-pw@db.example:5432/mastsub?sslmode=verify-full",
        );
        c.validate().unwrap();
        let Ok(DatabaseTarget::Postgres(url)) = c.storage.target() else {
            panic!("expected a PostgreSQL URL")
        };
        assert_eq!(url.password(), Some("s3cr3t-pw"));
        let shown = format!(
            "{}\n{c:?}\n{}",
            c.storage.database_shown(),
            c.to_redacted_toml()
        );
        assert!(
            shown.contains("postgresql://mastsub@db.example:5432/mastsub?sslmode=verify-full"),
            "{shown}"
        );
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        // libpq's password parameter is hidden as well, and the other parameters kept.
        assert_eq!(
            database_shown("postgres://u@h/db?password=s3cr3t-pw&sslmode=require"),
            "postgres://u@h/db?sslmode=require"
        );
        // Another scheme, a URL without a database, and a password given twice are refused, by name.
        for (database, says) in [
            (
                "mysql://u:s3cr3t-pw@h/db",
                "not a database mastsub can open",
            ),
            ("postgresql://u:s3cr3t-pw@h:5432", "names no database"),
            ("postgresql://u:s3cr3t-pw@h:5432/", "names no database"),
        ] {
            c.storage.database = PathBuf::from(database);
            let Err(ConfigError::Invalid(problems)) = c.validate() else {
                panic!("{database}: expected invalid")
            };
            let all = problems.join("\n");
            assert!(all.contains(says), "{database}: {all}");
            assert!(!all.contains("s3cr3t-pw"), "{all}");
        }
        c.storage.database = PathBuf::from("postgresql://u:s3cr3t-pw@h/db");
        c.storage.password_file = Some(PathBuf::from("/run/secrets/pg"));
        let Err(ConfigError::Invalid(problems)) = c.validate() else {
            panic!("expected invalid")
        };
        assert!(problems.join("\n").contains("in one place"), "{problems:?}");
        c.storage.database = PathBuf::from("postgresql://u@h/db");
        c.validate().unwrap();
        // A password file beside a SQLite file is a slip, said.
        c.storage.database = PathBuf::from("mastsub.db");
        assert!(c.validate().is_err());
        c.storage.password_file = None;
        // libpq's key=value form is refused, its password unshown.
        c.storage.database = PathBuf::from("host=db user=u password=s3cr3t-pw dbname=x");
        let Err(ConfigError::Invalid(problems)) = c.validate() else {
            panic!("expected invalid")
        };
        assert!(problems.join("\n").contains("key=value"), "{problems:?}");
        assert!(!problems.join("\n").contains("s3cr3t-pw"), "{problems:?}");
        // Paths, however odd, are paths.
        for path in [
            "a=b.db",
            "mastsub.db",
            "/var/lib/mastsub/x:y.db",
            "data/a://b.db",
            "1x://y.db",
        ] {
            c.storage.database = PathBuf::from(path);
            c.validate().unwrap();
            assert_eq!(
                c.storage.target(),
                Ok(DatabaseTarget::Sqlite(PathBuf::from(path)))
            );
        }
    }

    #[test]
    fn secrets_never_print() {
        let mut c = Config::default();
        c.mast.token = Some(Secret::new("tok-very-secret"));
        c.imap.password = Some(Secret::new("pw-very-secret"));
        let shown = format!("{c:?}\n{}", c.to_redacted_toml());
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("(redacted)"));
    }

    #[test]
    fn validation_lists_every_problem() {
        let mut c = Config::default();
        c.mast.base_url = "ftp://x".into();
        c.download.workers = 0;
        c.imap.enabled = true;
        let Err(ConfigError::Invalid(problems)) = c.validate() else {
            panic!("expected invalid")
        };
        assert!(problems.iter().any(|p| p.contains("mast.base_url")));
        assert!(problems.iter().any(|p| p.contains("download.workers")));
        assert!(problems.iter().any(|p| p.contains("imap.host")));
        assert!(problems.iter().any(|p| p.contains("no credential is set")));
    }

    #[test]
    fn imap_settings_that_would_loop_or_fail_are_refused() {
        let mut c = Config::default();
        c.imap.enabled = true;
        c.imap.host = "imap.example.org".into();
        c.imap.username = "u".into();
        c.imap.password = Some(Secret::new("p"));
        c.imap.oauth2_token_file = Some("/t".into());
        c.imap.processed_mailbox = Some("inbox".into());
        c.imap.idle_refresh = Duration::from_secs(1800);
        c.imap.max_message_size = ByteSize::gib(1);
        let Err(ConfigError::Invalid(problems)) = c.validate() else {
            panic!("expected invalid")
        };
        for expected in [
            "imap.password and imap.oauth2_token_file",
            "imap.processed_mailbox must differ",
            "imap.idle_refresh",
            "imap.max_message_size",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "{expected}: {problems:?}"
            );
        }
    }

    #[test]
    fn a_tls_fingerprint_must_be_sha256_and_needs_tls() {
        let mut c = Config::default();
        c.imap.enabled = true;
        c.imap.host = "imap.example.org".into();
        c.imap.username = "u".into();
        c.imap.password = Some(Secret::new("p"));
        let fp = "AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89";
        for good in [
            format!("sha256:{fp}"),
            fp.to_lowercase(),
            format!("SHA256:{}", fp.replace(':', "")),
        ] {
            c.imap.tls_fingerprint = Some(good.clone());
            c.validate().unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        c.imap.tls_fingerprint = Some("sha256:abcd".into());
        c.email.enabled = true;
        c.email.smtp_host = "smtp.example.org".into();
        c.email.from = "m@example.org".into();
        c.email.to = vec!["a@example.org".into()];
        c.email.tls = TlsMode::None;
        c.email.tls_fingerprint = Some(format!("sha256:{fp}"));
        let Err(ConfigError::Invalid(problems)) = c.validate() else {
            panic!("expected invalid")
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "imap.tls_fingerprint = \"sha256:abcd\": expected \"sha256:\" and 64 hex digits"
            ),
            "{problems:?}"
        );
        assert!(problems[0].contains("e.g. \"sha256:0f0f"), "{problems:?}");
        assert!(
            problems[1].starts_with("email.tls_fingerprint is set but email.tls = \"none\""),
            "{problems:?}"
        );
        // Unknown keys are still refused.
        let e = toml::from_str::<ImapConfig>("tls_fingerprints = \"x\"").unwrap_err();
        assert!(e.to_string().contains("tls_fingerprints"), "{e}");
        let i: ImapConfig = toml::from_str(&format!("tls_fingerprint = \"sha256:{fp}\"")).unwrap();
        assert_eq!(i.tls_fingerprint.as_deref(), Some(&*format!("sha256:{fp}")));
    }

    #[test]
    fn the_example_file_documents_every_key_with_its_default() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mastsub.toml");
        let loaded = Config::load(Some(&example)).unwrap();
        assert_eq!(
            loaded.to_redacted_toml(),
            Config::default().to_redacted_toml()
        );
        // Keys that default to unset appear commented out, so every key is documented.
        let text = std::fs::read_to_string(&example).unwrap();
        for key in [
            "token",
            "token_file",
            "password",
            "password_file",
            "password_credential",
            "oauth2_token_file",
            "oauth2_token_command",
            "ca_file",
            "tls_fingerprint",
            "processed_mailbox",
            "username",
            "max_rate",
            "on_product",
            "on_notice",
        ] {
            assert!(
                text.contains(&format!("# {key} = ")),
                "{key} is not documented"
            );
        }
        let defaults: toml::Table = toml::from_str(&Config::default().to_redacted_toml()).unwrap();
        for (section, keys) in &defaults {
            for key in keys.as_table().unwrap().keys() {
                assert!(
                    text.contains(&format!("\n{key} = ")),
                    "[{section}] {key} is not in the example"
                );
            }
        }
    }
}
