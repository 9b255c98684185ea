//! The IMAP source: takes notices straight from a mailbox.
//!
//! State lives in the store, not in flags: per account and mailbox, the UIDVALIDITY seen and the highest
//! UID handled. After every connect and every IDLE wake, a catch-up `UID SEARCH UID <last+1>:*` finds what
//! is new, so mail that arrives between a search and IDLE, or while mastsub is down, is never missed; a
//! human reading the mailbox (and so setting `\Seen`) changes nothing. A new UIDVALIDITY reads the mailbox
//! again from the start; the notice content hash keeps that free of duplicates.
//!
//! Each new mail: the sender is checked against `allowed_senders` (the From address only); every JSON
//! attachment (also inside a forwarded `message/rfc822`) is ingested through the same path as the inbox;
//! then the mail is marked `\Seen` and, with `processed_mailbox`, moved there (MOVE, else COPY + EXPUNGE).
//! A mail with no notice, from a sender not allowed, or too large is logged once and left where it is.
//!
//! Every command has a timeout; IDLE is ended and issued again every `idle_refresh`; TCP keepalive finds
//! dead peers. Any error or drop reconnects with exponential backoff and jitter, logging each change of
//! state; the loop never stops the inbox watcher or the downloads.

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_imap::extensions::idle::IdleResponse;
use async_imap::types::UnsolicitedResponse;
use async_imap::{Client, Session};
use backon::BackoffBuilder;
use futures_util::TryStreamExt;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::mail::{self, Mail};
use crate::config::{ImapConfig, TlsMode};
use crate::ingest::{IngestError, Ingestor, NoticeSource};
use crate::store::{SourceHealth, SourceKind, Store};

/// The first pause before reconnecting; it doubles (with jitter) up to `RECONNECT_MAX`.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
/// The longest pause before reconnecting, before a jitter of up to as much again (so at most 5 min).
const RECONNECT_MAX: Duration = Duration::from_secs(150);
/// A session that caught up and lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);
/// A mail on which this many sessions in a row ended is passed over.
const POISON_AFTER: u32 = 3;
/// The first pause after the server refused the login; it doubles up to `LOGIN_RETRY_MAX`.
const LOGIN_RETRY_MIN: Duration = Duration::from_secs(5 * 60);
/// The longest pause after a refused login, before a jitter of up to as much again (so at most 1 h).
const LOGIN_RETRY_MAX: Duration = Duration::from_secs(30 * 60);
/// Mails looked at (size, From, structure) with one FETCH.
const LOOK_BATCH: usize = 100;

/// Why a session ended. Each reads as a sentence for a person: what failed, the server's own words, and
/// the fix where one is known.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    /// Could not reach the server; `reason` is a sentence.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// host:port
        addr: String,
        /// Why, and what to check.
        reason: String,
    },
    /// The TLS handshake failed (certificate, protocol); a sentence from `crate::tls`.
    #[error("{0}")]
    Tls(String),
    /// The server refused the credentials.
    #[error("the server refused the login for {user}: {hint} (the server said: {reason})")]
    Auth {
        /// The user.
        user: String,
        /// What the server said.
        reason: String,
        /// What to check.
        hint: &'static str,
    },
    /// A credential could not be read or made.
    #[error("{0}")]
    Credential(String),
    /// The mailbox cannot be selected.
    #[error("cannot open the mailbox {mailbox:?}{sent}: the server said: {reason}; {hint}")]
    Mailbox {
        /// The mailbox as configured.
        mailbox: String,
        /// `(sent as "…")` when the server's name differs, else empty.
        sent: String,
        /// What the server said.
        reason: String,
        /// The folders there are, or what to check.
        hint: String,
    },
    /// A command took too long.
    #[error("no answer to {0} within imap.timeout")]
    Timeout(&'static str),
    /// The server answered NO or BAD; its words.
    #[error("the server refused: {0}")]
    Refused(String),
    /// The connection failed or the server said something unexpected; a sentence.
    #[error("{0}")]
    Protocol(String),
    /// The server sent an answer the client cannot parse (the start of it); the session cannot go on.
    #[error("the server sent an answer mastsub cannot read: {0}")]
    Unreadable(String),
    /// A notice could not be recorded; its mail stays for the next try.
    #[error("{0}")]
    Ingest(#[from] IngestError),
    /// The store could not record the mailbox position or the health.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

impl From<std::io::Error> for ImapError {
    fn from(e: std::io::Error) -> Self {
        io_error(&e)
    }
}

impl From<async_imap::error::Error> for ImapError {
    fn from(e: async_imap::error::Error) -> Self {
        use async_imap::error::Error;
        match e {
            Error::No(why) | Error::Bad(why) => ImapError::Refused(server_words(&why)),
            Error::Io(e) => io_error(&e),
            Error::ConnectionLost => ImapError::Protocol("the server closed the connection".into()),
            Error::Parse(e) => ImapError::Unreadable(clip(&e.to_string(), 120)),
            other => ImapError::Protocol(clip(&other.to_string(), 200)),
        }
    }
}

/// `text` cut to `n` characters, with an ellipsis.
fn clip(text: &str, n: usize) -> String {
    let mut out: String = text.chars().take(n).collect();
    if text.chars().count() > n {
        out.push('…');
    }
    out
}

/// A failed read or write on the connection, as a sentence. A response the client library cannot parse
/// comes as an I/O error holding the whole buffer (mail included): only its start is kept.
fn io_error(e: &std::io::Error) -> ImapError {
    use std::io::ErrorKind;
    let text = e.to_string();
    if let Some((_, answer)) = text.split_once(" during parsing of ") {
        return ImapError::Unreadable(clip(answer, 120));
    }
    ImapError::Protocol(match e.kind() {
        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => {
            "the server closed the connection".into()
        }
        ErrorKind::TimedOut => "the connection timed out".into(),
        _ => format!("the connection failed: {text}"),
    })
}

/// Why a TCP connection could not be made, with what to check.
fn describe_connect(e: &std::io::Error, cfg: &ImapConfig) -> String {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => format!(
            "the connection was refused: is the server running, and is imap.port ({}) right?",
            cfg.port
        ),
        ErrorKind::TimedOut => "no answer (a firewall, or the wrong imap.host or imap.port)".into(),
        _ if e.to_string().contains("failed to lookup address")
            || e.to_string().contains("Name or service not known") =>
        {
            format!(
                "the name {:?} cannot be resolved: check imap.host",
                cfg.host
            )
        }
        _ => format!("{e}"),
    }
}

use super::imap_folders::{Layout, server_words};

/// The stream under the IMAP client: TLS or, with `tls = "none"`, plain TCP.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// XOAUTH2 (Gmail, Microsoft 365): the first answer carries user and token; an error challenge gets an
/// empty answer, after which the server ends the exchange with NO.
struct XOAuth2 {
    user: String,
    token: String,
    answered: bool,
}

impl async_imap::Authenticator for XOAuth2 {
    type Response = String;

    fn process(&mut self, _challenge: &[u8]) -> String {
        if self.answered {
            return String::new();
        }
        self.answered = true;
        format!("user={}\x01auth=Bearer {}\x01\x01", self.user, self.token)
    }
}

/// How mastsub logs in.
enum Credential {
    Password(String),
    OAuth2Token(String),
}

/// Reads the credential anew (at every connection, so that a changed file or a refreshed token is used).
async fn credential(cfg: &ImapConfig) -> Result<Credential, ImapError> {
    let read = |path: &Path, what: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|e| {
                ImapError::Credential(format!("cannot read {what} {}: {e}", path.display()))
            })
    };
    if let Some(p) = &cfg.password {
        return Ok(Credential::Password(p.expose().to_string()));
    }
    if let Some(path) = &cfg.password_file {
        return read(path, "imap.password_file").map(Credential::Password);
    }
    if let Some(name) = &cfg.password_credential {
        let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
            ImapError::Credential(format!(
                "imap.password_credential = {name:?} but $CREDENTIALS_DIRECTORY is not set: give the \
                 unit LoadCredential={name}:<file> (or use imap.password_file)"
            ))
        })?;
        return read(&PathBuf::from(dir).join(name), "the systemd credential")
            .map(Credential::Password);
    }
    if let Some(path) = &cfg.oauth2_token_file {
        return read(path, "imap.oauth2_token_file").map(Credential::OAuth2Token);
    }
    if let Some(command) = &cfg.oauth2_token_command {
        let run = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(cfg.timeout, run)
            .await
            .map_err(|_| {
                ImapError::Credential(
                    "imap.oauth2_token_command did not finish within imap.timeout".into(),
                )
            })?
            .map_err(|e| {
                ImapError::Credential(format!("cannot run imap.oauth2_token_command: {e}"))
            })?;
        if !out.status.success() {
            // Its error output, never its standard output (which may hold a token).
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(ImapError::Credential(format!(
                "imap.oauth2_token_command failed ({}): {}",
                out.status,
                stderr.trim().chars().take(300).collect::<String>()
            )));
        }
        let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if token.is_empty() {
            return Err(ImapError::Credential(
                "imap.oauth2_token_command printed no token".into(),
            ));
        }
        return Ok(Credential::OAuth2Token(token));
    }
    Err(ImapError::Credential(
        "no IMAP credential is configured".into(),
    ))
}

/// What the IMAP connection trusts.
fn trust(cfg: &ImapConfig) -> crate::tls::Trust<'_> {
    crate::tls::Trust {
        section: "imap",
        ca_file: cfg.ca_file.as_deref(),
        fingerprint: cfg.tls_fingerprint.as_deref(),
    }
}

/// Runs `f`, or fails with `Timeout(what)`.
async fn timed<T, E: Into<ImapError>>(
    limit: Duration,
    what: &'static str,
    f: impl Future<Output = Result<T, E>>,
) -> Result<T, ImapError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err(ImapError::Timeout(what)),
    }
}

/// The source: one account, one mailbox.
pub struct ImapSource {
    cfg: ImapConfig,
    store: Arc<dyn Store>,
    ingestor: Arc<Ingestor>,
    /// `user@host:port`, the key of the mailbox position in the store.
    account: String,
    health: SourceHealth,
    /// Sessions that ended while taking each mail, by (UIDVALIDITY, UID).
    failures: std::collections::HashMap<(u32, u32), u32>,
    /// Whether the current session caught up at least once (only such a session resets the backoff).
    progressed: bool,
    /// Whether the current session logged in (only then the login backoff starts over).
    logged_in: bool,
    /// The last reason a session ended, as logged: the same reason again is not logged again.
    last_reported: Option<String>,
    /// Whether `UID SEARCH` can be trusted to find new mail; false once it missed mail `UID FETCH` found.
    search_works: bool,
    /// Whether the server's BODYSTRUCTURE answers can be read; false after one could not.
    bodystructure_works: bool,
    /// Why the processed folder cannot be used, as last logged.
    processed_problem: Option<String>,
    /// Mails expunged by commands read past the client's parser, not yet taken off the mailbox size.
    expunged: u32,
    /// Sessions that ended while looking at a batch, by (UIDVALIDITY, its first UID).
    look_failures: std::collections::HashMap<(u32, u32), u32>,
}

/// What a look at a mail (size, From, structure) found, before fetching it whole; all `None` for a mail
/// the look gave nothing for.
#[derive(Default)]
struct Look {
    size: Option<u32>,
    sender: Option<mail::Sender>,
    /// `None` when the structure was not asked for or not given.
    may_hold_notice: Option<bool>,
    message_id: Option<String>,
    /// Marked `\Deleted`: on its way out (often a mail copied to the processed folder whose EXPUNGE
    /// had to wait), not taken again.
    deleted: bool,
}

/// What one catch-up pass passed over without fetching, for its summary line.
#[derive(Default)]
struct Passed {
    looked: usize,
    taken: usize,
    not_allowed: usize,
    not_allowed_with_parts: usize,
    example_sender: Option<String>,
    no_notice: usize,
    too_large: usize,
    deleted: usize,
    left: usize,
}

impl Passed {
    /// "12 mails looked at, 2 taken; passed over without fetching them: …", or `None` when there is
    /// nothing to say beyond the taken mails' own lines.
    fn summary(&self) -> Option<String> {
        let skipped = self.not_allowed + self.no_notice + self.deleted;
        if skipped == 0 && self.left == 0 {
            return None;
        }
        let mut parts = Vec::new();
        if self.not_allowed > 0 {
            let mut p = format!(
                "{} from senders imap.allowed_senders does not name",
                self.not_allowed
            );
            if self.not_allowed_with_parts > 0 {
                p.push_str(&format!(
                    " ({} of them with a part that could be a notice, e.g. from {})",
                    self.not_allowed_with_parts,
                    self.example_sender.as_deref().unwrap_or("?")
                ));
            }
            parts.push(p);
        }
        if self.no_notice > 0 {
            parts.push(format!(
                "{} with no part that could be a notice",
                self.no_notice
            ));
        }
        if self.deleted > 0 {
            parts.push(format!("{} marked \\Deleted", self.deleted));
        }
        let mut s = format!(
            "{} new mail(s) looked at, {} taken",
            self.looked, self.taken
        );
        if !parts.is_empty() {
            s.push_str(&format!(
                "; passed over without fetching them: {}",
                parts.join(", ")
            ));
        }
        if self.left > 0 {
            s.push_str(&format!(
                "; {} fetched but left where they are (see the lines above{})",
                self.left,
                if self.too_large > 0 {
                    format!(", {} over imap.max_message_size", self.too_large)
                } else {
                    String::new()
                }
            ));
        }
        Some(s)
    }
}

impl ImapSource {
    /// A source for `cfg`.
    pub fn new(cfg: ImapConfig, store: Arc<dyn Store>, ingestor: Arc<Ingestor>) -> ImapSource {
        let account = format!("{}@{}:{}", cfg.username, cfg.host, cfg.port);
        let health = SourceHealth {
            source: "imap".into(),
            state: "starting".into(),
            detail: Some(format!("{account}/{}", cfg.mailbox)),
            ..SourceHealth::default()
        };
        ImapSource {
            cfg,
            store,
            ingestor,
            account,
            health,
            failures: std::collections::HashMap::new(),
            progressed: false,
            logged_in: false,
            last_reported: None,
            search_works: true,
            bodystructure_works: true,
            processed_problem: None,
            expunged: 0,
            look_failures: std::collections::HashMap::new(),
        }
    }

    /// Runs until `shutdown`: sessions, with backoff between them. A change on `reload` (SIGHUP: secrets
    /// read again) ends the session (or the pause) and connects again at once, with the credential read
    /// anew.
    pub async fn run(mut self, mut reload: crate::config::Reload, shutdown: CancellationToken) {
        if self.cfg.tls == TlsMode::None {
            tracing::warn!(
                "imap.tls = \"none\": the password and the mail cross the network in plain text"
            );
        }
        if self.cfg.allowed_senders.is_empty() {
            tracing::warn!(
                "imap.allowed_senders is empty: notices are taken from any sender; name MAST's address \
                 (or @stsci.edu) to refuse others"
            );
        }
        let mut backoff = new_backoff(RECONNECT_MIN, RECONNECT_MAX);
        // A refused login waits minutes, not seconds: directories lock accounts after a few failures.
        let mut login_backoff = new_backoff(LOGIN_RETRY_MIN, LOGIN_RETRY_MAX);
        loop {
            let began = Instant::now();
            self.progressed = false;
            self.logged_in = false;
            let ended = tokio::select! {
                r = self.session(&shutdown) => r,
                _ = shutdown.cancelled() => Ok(()),
                Ok(()) = reload.changed() => {
                    tracing::info!("IMAP {}: secrets read again; connecting again", self.account);
                    backoff = new_backoff(RECONNECT_MIN, RECONNECT_MAX);
                    login_backoff = new_backoff(LOGIN_RETRY_MIN, LOGIN_RETRY_MAX);
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                self.set_state("stopped", false, None).await;
                return;
            }
            if self.logged_in {
                login_backoff = new_backoff(LOGIN_RETRY_MIN, LOGIN_RETRY_MAX);
            }
            if self.progressed && began.elapsed() >= HEALTHY_SESSION {
                backoff = new_backoff(RECONNECT_MIN, RECONNECT_MAX);
            }
            let (pause, state) = match &ended {
                Err(ImapError::Auth { .. }) => (
                    login_backoff.next().unwrap_or(LOGIN_RETRY_MAX),
                    "login refused",
                ),
                _ => (backoff.next().unwrap_or(RECONNECT_MAX), "reconnecting"),
            };
            let why = match ended {
                Ok(()) => "the session ended".to_string(),
                Err(e) => e.to_string(),
            };
            let when = humantime::format_duration(Duration::from_secs(pause.as_secs().max(1)));
            // Said once per change: the same reason again goes to the debug log (and `status`).
            if self.last_reported.as_deref() == Some(why.as_str()) {
                tracing::debug!(
                    "IMAP {}: {why} (again); trying again in {when}",
                    self.account
                );
            } else {
                tracing::warn!("IMAP {}: {why}; trying again in {when}", self.account);
                self.last_reported = Some(why.clone());
            }
            self.set_state(state, false, Some(format!("{why} (next try in {when})")))
                .await;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                Ok(()) = reload.changed() => {
                    tracing::info!("IMAP {}: secrets read again; connecting now", self.account);
                    backoff = new_backoff(RECONNECT_MIN, RECONNECT_MAX);
                    login_backoff = new_backoff(LOGIN_RETRY_MIN, LOGIN_RETRY_MAX);
                }
                _ = shutdown.cancelled() => {
                    self.set_state("stopped", false, None).await;
                    return;
                }
            }
        }
    }

    async fn set_state(&mut self, state: &str, connected: bool, error: Option<String>) {
        let now = crate::store::now_ms();
        self.health.state = state.to_string();
        self.health.connected = connected;
        if error.is_some() {
            self.health.last_error_at = Some(now);
            self.health.last_error = error;
        }
        if connected {
            self.health.last_contact = Some(now);
        }
        self.health.updated_at = now;
        self.write_health().await;
    }

    async fn write_health(&mut self) {
        if let Err(e) = self.store.record_source_health(&self.health).await {
            tracing::warn!("cannot record the IMAP source's health: {e}");
        } else {
            // `taken` is a count to add: what was added is now on record.
            self.health.taken = 0;
        }
    }

    /// Connects and logs in.
    async fn connect(&mut self) -> Result<Session<Stream>, ImapError> {
        let cfg = &self.cfg;
        let addr = format!("{}:{}", cfg.host, cfg.port);
        let tcp = match tokio::time::timeout(
            cfg.timeout,
            TcpStream::connect((cfg.host.as_str(), cfg.port)),
        )
        .await
        {
            Err(_) => {
                return Err(ImapError::Connect {
                    addr,
                    reason: "no answer within imap.timeout (a firewall, or the wrong imap.host or \
                             imap.port)"
                        .into(),
                });
            }
            Ok(Err(e)) => {
                return Err(ImapError::Connect {
                    addr,
                    reason: describe_connect(&e, cfg),
                });
            }
            Ok(Ok(tcp)) => tcp,
        };
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10));
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let _ = tcp.set_nodelay(true);

        let tls = |tcp: TcpStream| async move {
            let name = ServerName::try_from(cfg.host.clone()).map_err(|e| {
                ImapError::Tls(format!(
                    "imap.host {:?} is not a valid server name: {e}",
                    cfg.host
                ))
            })?;
            let config = crate::tls::client_config(&trust(cfg)).map_err(ImapError::Credential)?;
            let connector = tokio_rustls::TlsConnector::from(config);
            timed(cfg.timeout, "the TLS handshake", async {
                connector.connect(name, tcp).await.map_err(|e| {
                    ImapError::Tls(crate::tls::explain_handshake(
                        &e,
                        &cfg.host,
                        cfg.port,
                        &trust(cfg),
                    ))
                })
            })
            .await
        };
        // A plain greeting that never comes: the port may be waiting for a TLS handshake.
        let plain_hint =
            format!("if {addr} speaks TLS at once (as port 993 does), set imap.tls = \"implicit\"");
        let client = match cfg.tls {
            TlsMode::Implicit => {
                let mut c = Client::new(Stream::Tls(Box::new(tls(tcp).await?)));
                greeting(&mut c, cfg.timeout, "").await?;
                c
            }
            TlsMode::None => {
                let mut c = Client::new(Stream::Plain(tcp));
                greeting(&mut c, cfg.timeout, &plain_hint).await?;
                c
            }
            TlsMode::Starttls => {
                let mut c = Client::new(tcp);
                greeting(&mut c, cfg.timeout, &plain_hint).await?;
                timed(
                    cfg.timeout,
                    "STARTTLS",
                    c.run_command_and_check_ok("STARTTLS", None),
                )
                .await
                .map_err(|e| {
                    ImapError::Tls(format!(
                        "{addr} refused STARTTLS ({e}); if the port speaks TLS at once, set \
                         imap.tls = \"implicit\""
                    ))
                })?;
                Client::new(Stream::Tls(Box::new(tls(c.into_inner()).await?)))
            }
        };
        let credential = credential(cfg).await?;
        let user = cfg.username.clone();
        let hint = match credential {
            Credential::Password(_) => "check imap.username and the password",
            Credential::OAuth2Token(_) => {
                "check imap.username and the OAuth2 token (it may have expired or lack the IMAP scope)"
            }
        };
        let login = async {
            match credential {
                Credential::Password(p) => client.login(&user, &p).await,
                Credential::OAuth2Token(token) => {
                    let auth = XOAuth2 {
                        user: user.clone(),
                        token,
                        answered: false,
                    };
                    client.authenticate("XOAUTH2", auth).await
                }
            }
        };
        match tokio::time::timeout(cfg.timeout, login).await {
            Err(_) => Err(ImapError::Timeout("the login")),
            Ok(Ok(session)) => Ok(session),
            Ok(Err((
                async_imap::error::Error::No(why) | async_imap::error::Error::Bad(why),
                _,
            ))) => Err(ImapError::Auth {
                user,
                reason: server_words(&why),
                hint,
            }),
            // A connection lost during the login is not a refusal.
            Ok(Err((other, _))) => Err(other.into()),
        }
    }

    /// The server's folder layout: NAMESPACE (where offered) and the delimiter from `LIST "" ""`.
    async fn layout(
        &mut self,
        session: &mut Session<Stream>,
        has_namespace: bool,
    ) -> Result<Layout, ImapError> {
        let t = self.cfg.timeout;
        let mut layout = Layout::default();
        if has_namespace {
            match namespace(session, t).await? {
                Some(line) => match super::imap_folders::parse_namespace(&line) {
                    Some((personal, delimiter, others)) => {
                        layout.personal = personal;
                        layout.delimiter = delimiter;
                        layout.others = others;
                    }
                    None => tracing::debug!("IMAP: cannot read the NAMESPACE answer {line:?}"),
                },
                None => tracing::debug!("IMAP: NAMESPACE gave no namespace"),
            }
        }
        let listed = timed(t, "LIST", async {
            session
                .list(Some(""), Some("\"\""))
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await;
        match listed {
            Ok(names) => {
                if let Some(d) = names
                    .iter()
                    .find_map(|n| n.delimiter())
                    .and_then(|d| d.chars().next())
                {
                    layout.delimiter = Some(d);
                }
            }
            Err(ImapError::Refused(why)) => tracing::debug!("IMAP: LIST \"\" \"\" refused: {why}"),
            Err(e) => return Err(e),
        }
        tracing::debug!(
            "IMAP {}: hierarchy delimiter {:?}, personal namespace {:?}",
            self.account,
            layout.delimiter,
            layout.personal
        );
        Ok(layout)
    }

    /// Whether the folder `name` (the server's name) exists.
    async fn folder_exists(
        &mut self,
        session: &mut Session<Stream>,
        name: &str,
    ) -> Result<bool, ImapError> {
        let pattern = quote(name);
        let names = timed(self.cfg.timeout, "LIST", async {
            session
                .list(Some(""), Some(&pattern))
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await;
        match names {
            Ok(names) => Ok(names.iter().any(|n| n.name() == name)),
            Err(ImapError::Refused(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Up to a dozen of the server's folder names, for hints.
    async fn some_folders(&mut self, session: &mut Session<Stream>) -> String {
        let names = timed(self.cfg.timeout, "LIST", async {
            session
                .list(Some(""), Some("*"))
                .await?
                .try_collect::<Vec<_>>()
                .await
        })
        .await;
        match names {
            Ok(names) if !names.is_empty() => {
                let mut shown: Vec<String> = names
                    .iter()
                    .take(12)
                    .map(|n| format!("{:?}", n.name()))
                    .collect();
                if names.len() > 12 {
                    shown.push(format!("and {} more", names.len() - 12));
                }
                format!("the server has {}", shown.join(", "))
            }
            _ => "the server lists no folders".into(),
        }
    }

    /// The processed folder, created if missing; `None` (said once, at warning level) if it cannot be.
    async fn processed_folder(
        &mut self,
        session: &mut Session<Stream>,
        layout: &Layout,
        mailbox: &str,
    ) -> Result<Option<String>, ImapError> {
        let Some(configured) = self.cfg.processed_mailbox.clone() else {
            return Ok(None);
        };
        let name = layout.server_name(&configured);
        let sent = sent_as(&configured, &name);
        if self.folder_exists(session, &name).await? {
            self.processed_problem = None;
            return Ok(Some(name));
        }
        match timed(self.cfg.timeout, "CREATE", session.create(&name)).await {
            Ok(()) => {
                tracing::info!(
                    "IMAP {}: created the folder {configured:?}{sent} for taken mail",
                    self.account
                );
                self.processed_problem = None;
                Ok(Some(name))
            }
            Err(ImapError::Refused(why)) => {
                // Made meanwhile by someone else, or a server that hides it from LIST.
                if self.folder_exists(session, &name).await? {
                    return Ok(Some(name));
                }
                let folders = self.some_folders(session).await;
                let problem = format!(
                    "cannot create imap.processed_mailbox {configured:?}{sent}: the server said: {why}. \
                     Taken mail is marked \\Seen and stays in {mailbox:?}; create the folder with a mail \
                     client, or set imap.processed_mailbox to one that exists ({folders})"
                );
                if self.processed_problem.as_deref() != Some(problem.as_str()) {
                    tracing::warn!("IMAP {}: {problem}", self.account);
                    self.processed_problem = Some(problem);
                }
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// One session: connect, select, catch up, then IDLE (or poll) until an error or shutdown.
    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), ImapError> {
        self.set_state("connecting", false, None).await;
        let mut session = self.connect().await?;
        self.logged_in = true;
        let t = self.cfg.timeout;
        let caps = timed(t, "CAPABILITY", session.capabilities()).await?;
        let use_idle = self.cfg.idle && caps.has_str("IDLE");
        let layout = self.layout(&mut session, caps.has_str("NAMESPACE")).await?;
        let configured = self.cfg.mailbox.clone();
        let mailbox = layout.server_name(&configured);
        self.expunged = 0;
        let mut target = self
            .processed_folder(&mut session, &layout, &configured)
            .await?;
        // Two spellings of one folder (`INBOX/` and `INBOX`, `MAST/notices` and `MAST.notices`): moving a
        // mail into its own mailbox would take it again and again.
        if target.as_deref().is_some_and(|t| {
            t == mailbox || (t.eq_ignore_ascii_case("INBOX") && mailbox == "INBOX")
        }) {
            let problem = format!(
                "imap.processed_mailbox {:?} is the same folder as imap.mailbox {configured:?} on this \
                 server ({mailbox:?}): taken mail is marked \\Seen and stays; name another folder",
                self.cfg.processed_mailbox.as_deref().unwrap_or_default()
            );
            if self.processed_problem.as_deref() != Some(problem.as_str()) {
                tracing::warn!("IMAP {}: {problem}", self.account);
                self.processed_problem = Some(problem);
            }
            target = None;
        }
        self.health.detail = Some(match (&target, &self.processed_problem) {
            (Some(t), _) => format!("{}/{mailbox}, taken mail moved to {t}", self.account),
            (None, Some(problem)) => format!("{}/{mailbox}; {problem}", self.account),
            (None, None) => format!("{}/{mailbox}", self.account),
        });
        let moves = Moves {
            target,
            can_move: caps.has_str("MOVE"),
            uidplus: caps.has_str("UIDPLUS"),
        };
        let selected = match timed(t, "SELECT", session.select(&mailbox)).await {
            Ok(m) => m,
            Err(ImapError::Refused(reason)) => {
                let hint = self.some_folders(&mut session).await;
                return Err(ImapError::Mailbox {
                    sent: sent_as(&configured, &mailbox),
                    mailbox: configured,
                    reason,
                    hint: format!("check imap.mailbox ({hint})"),
                });
            }
            Err(e) => return Err(e),
        };
        let uidvalidity = selected.uid_validity.ok_or_else(|| {
            ImapError::Protocol(format!("the server gave no UIDVALIDITY for {mailbox}"))
        })?;
        // The position is kept under the configured name, which does not change with the server.
        let stored = self.store.imap_position(&self.account, &configured).await?;
        let mut last_uid = match stored {
            Some((v, uid)) if v == uidvalidity => {
                if selected.uid_next.is_some_and(|next| next <= uid) {
                    // UIDs went backwards without a new UIDVALIDITY (a server restored from a backup):
                    // what comes next would hide below the position.
                    tracing::warn!(
                        "IMAP {}/{mailbox}: the next UID ({}) is not above the last one handled ({uid}); \
                         reading all of it again, already recorded notices are skipped",
                        self.account,
                        selected.uid_next.unwrap_or_default()
                    );
                    0
                } else {
                    uid
                }
            }
            Some((v, _)) => {
                tracing::warn!(
                    "IMAP {}/{mailbox}: UIDVALIDITY changed from {v} to {uidvalidity} (the mailbox was \
                     recreated or rebuilt); reading all of it again, already recorded notices are skipped",
                    self.account
                );
                0
            }
            None => 0,
        };
        if stored != Some((uidvalidity, last_uid)) {
            self.store
                .set_imap_position(&self.account, &configured, uidvalidity, last_uid)
                .await?;
        }
        tracing::info!(
            "IMAP {}: connected, {mailbox} selected ({} mails, UIDVALIDITY {uidvalidity}, handled up to \
             UID {last_uid}); {}",
            self.account,
            selected.exists,
            if use_idle {
                "waiting with IDLE".to_string()
            } else {
                format!(
                    "polling every {}",
                    humantime::format_duration(self.cfg.poll_interval)
                )
            }
        );
        self.set_state("connected", true, None).await;
        // The mailbox's size as the server last told it: an EXISTS above it means new mail.
        let mut exists = selected.exists;

        loop {
            // Until a pass finds nothing new: announcements dropped meanwhile cannot hide mail.
            while self
                .catch_up(&mut session, uidvalidity, &mut last_uid, &moves)
                .await?
                > 0
            {}
            exists = exists.saturating_sub(std::mem::take(&mut self.expunged));
            if !self.progressed && self.last_reported.is_some() {
                tracing::info!("IMAP {}: connected and caught up again", self.account);
            }
            self.progressed = true;
            self.last_reported = None;
            let mut announced = false;
            track_size(&session.unsolicited_responses, &mut exists, &mut announced);
            if announced {
                continue;
            }
            if use_idle {
                self.set_state("idle", true, None).await;
                let unsolicited = session.unsolicited_responses.clone();
                let mut idle = session.idle();
                timed(t, "IDLE", idle.init()).await?;
                // Mail announced while IDLE started waits in the channel, not in the IDLE stream.
                track_size(&unsolicited, &mut exists, &mut announced);
                let woke = if announced {
                    None
                } else {
                    // Renewed every poll_interval too (at most idle_refresh), with a catch-up after:
                    // some servers announce nothing during IDLE (GNU Mailutils imap4d looks at the
                    // mailbox only when the client speaks).
                    let renew = self.cfg.idle_refresh.min(self.cfg.poll_interval);
                    let (wait, stop) = idle.wait_with_timeout(renew);
                    let woke = tokio::select! {
                        r = wait => Some(r),
                        _ = tokio::time::sleep(renew) => None,
                        _ = shutdown.cancelled() => None,
                    };
                    drop(stop);
                    woke
                };
                match woke {
                    Some(Err(e)) => return Err(e.into()),
                    Some(Ok(IdleResponse::NewData(data))) => {
                        use async_imap::imap_proto::{MailboxDatum, Response, Status};
                        match data.parsed() {
                            // A server in trouble (an untagged NO, BAD or BYE, e.g. for a mailbox
                            // deleted under it) would wake IDLE again at once, forever: the session
                            // ends instead.
                            Response::Data {
                                status: status @ (Status::No | Status::Bad | Status::Bye),
                                outcome,
                            } => {
                                let said = match status {
                                    Status::No => "NO",
                                    Status::Bad => "BAD",
                                    _ => "BYE",
                                };
                                return Err(ImapError::Protocol(format!(
                                    "the server said {said} while waiting for mail: {}",
                                    outcome.information.as_deref().unwrap_or("(no text)")
                                )));
                            }
                            Response::MailboxData(MailboxDatum::Exists(n)) => exists = *n,
                            Response::Expunge(_) => exists = exists.saturating_sub(1),
                            _ => {}
                        }
                        tracing::debug!("IMAP {}: the server announced a change", self.account);
                    }
                    Some(Ok(IdleResponse::Timeout | IdleResponse::ManualInterrupt)) | None => {}
                }
                session = timed(t, "DONE (the end of IDLE)", idle.done()).await?;
            } else {
                self.set_state("polling", true, None).await;
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.poll_interval) => {}
                    _ = shutdown.cancelled() => {}
                }
                timed(t, "NOOP", session.noop()).await?;
            }
            if shutdown.is_cancelled() {
                let _ = tokio::time::timeout(Duration::from_secs(2), session.logout()).await;
                return Ok(());
            }
            self.health.last_contact = Some(crate::store::now_ms());
        }
    }

    /// The UIDs above `last_uid`, oldest first. `UID SEARCH` first; when it finds nothing, `UID FETCH
    /// n:* (UID)` too, since some servers' SEARCH misses mail (GNU Mailutils imap4d answers nothing to
    /// `UID SEARCH UID n:*`). A SEARCH caught missing mail is not asked again.
    async fn new_uids(
        &mut self,
        session: &mut Session<Stream>,
        last_uid: u32,
    ) -> Result<Vec<u32>, ImapError> {
        let t = self.cfg.timeout;
        let from = last_uid.saturating_add(1);
        let mut uids: Vec<u32> = Vec::new();
        if self.search_works {
            let found: HashSet<u32> =
                timed(t, "UID SEARCH", session.uid_search(format!("UID {from}:*"))).await?;
            // `n:*` always matches the highest UID, even below n.
            uids = found.into_iter().filter(|u| *u > last_uid).collect();
        }
        if uids.is_empty() {
            let fetched = timed(t, "UID FETCH (UID)", async {
                session
                    .uid_fetch(format!("{from}:*"), "(UID)")
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            })
            .await?;
            uids = fetched
                .iter()
                .filter_map(|f| f.uid)
                .filter(|u| *u > last_uid)
                .collect();
            // Mail delivered between the two commands is not the server's fault: SEARCH is asked again.
            if !uids.is_empty() && self.search_works {
                let again: HashSet<u32> =
                    timed(t, "UID SEARCH", session.uid_search(format!("UID {from}:*"))).await?;
                if again.iter().any(|u| *u > last_uid) {
                    uids.sort_unstable();
                    uids.dedup();
                    return Ok(uids);
                }
            }
            if !uids.is_empty() && self.search_works {
                tracing::warn!(
                    "IMAP {}: UID SEARCH found no mail above UID {last_uid}, but UID FETCH found {}; the \
                     server's SEARCH is not relied on from now on",
                    self.account,
                    uids.len()
                );
                self.search_works = false;
            }
        }
        uids.sort_unstable();
        uids.dedup();
        Ok(uids)
    }

    /// Size, From and structure of `uids`, without their bodies.
    async fn look(
        &mut self,
        session: &mut Session<Stream>,
        uids: &[u32],
    ) -> Result<std::collections::HashMap<u32, Look>, ImapError> {
        let set = uids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let query = if self.bodystructure_works {
            "(UID FLAGS RFC822.SIZE BODYSTRUCTURE BODY.PEEK[HEADER.FIELDS (FROM MESSAGE-ID)])"
        } else {
            "(UID FLAGS RFC822.SIZE BODY.PEEK[HEADER.FIELDS (FROM MESSAGE-ID)])"
        };
        let allowed = self.cfg.allowed_senders.clone();
        let limit = self.cfg.timeout + Duration::from_millis(20 * uids.len() as u64);
        let looked = timed(limit, "UID FETCH (the mails' headers)", async {
            let fetched = session
                .uid_fetch(&set, query)
                .await?
                .try_collect::<Vec<_>>()
                .await?;
            let mut out = std::collections::HashMap::new();
            for f in &fetched {
                let Some(uid) = f.uid else { continue };
                let header = f.header();
                out.insert(
                    uid,
                    Look {
                        size: f.size,
                        sender: header.map(|h| mail::header_sender(h, &allowed)),
                        may_hold_notice: f.bodystructure().map(mail::may_hold_notice),
                        message_id: header.and_then(mail::message_id),
                        deleted: f
                            .flags()
                            .any(|fl| matches!(fl, async_imap::types::Flag::Deleted)),
                    },
                );
            }
            Ok::<_, async_imap::error::Error>(out)
        })
        .await;
        match looked {
            Err(ImapError::Unreadable(what)) if self.bodystructure_works => {
                // The connection's parser is stuck on that answer: the session ends, and the next one
                // looks without BODYSTRUCTURE (every mail from an allowed sender is then fetched).
                self.bodystructure_works = false;
                Err(ImapError::Protocol(format!(
                    "the server sent a BODYSTRUCTURE mastsub cannot read ({what}); from now on every mail \
                     from an allowed sender is fetched whole"
                )))
            }
            other => other,
        }
    }

    /// Takes every mail above `last_uid`, oldest first; returns how many UIDs it passed.
    async fn catch_up(
        &mut self,
        session: &mut Session<Stream>,
        uidvalidity: u32,
        last_uid: &mut u32,
        moves: &Moves,
    ) -> Result<usize, ImapError> {
        let uids = self.new_uids(session, *last_uid).await?;
        let mailbox = self.cfg.mailbox.clone();
        let limit = self.cfg.max_message_size.as_u64();
        let mut passed = Passed::default();
        for batch in uids.chunks(LOOK_BATCH) {
            // A look that ended three sessions in a row is given up: each mail of the batch is then
            // fetched whole (and counted as a poison mail on its own).
            let key = (uidvalidity, batch[0]);
            let tries = self.look_failures.get(&key).copied().unwrap_or(0);
            let mut looks = if tries >= POISON_AFTER {
                tracing::warn!(
                    "IMAP {mailbox}: looking at UIDs {}..{} ended {tries} sessions; fetching them whole",
                    batch[0],
                    batch[batch.len() - 1]
                );
                std::collections::HashMap::new()
            } else {
                self.look_failures.insert(key, tries + 1);
                let looks = self.look(session, batch).await?;
                self.look_failures.remove(&key);
                looks
            };
            for &uid in batch {
                passed.looked += 1;
                // A mail the look gave nothing for is not taken to be gone: async-imap hides a refused
                // FETCH, so it is fetched whole, and `take` tells gone from refused.
                let look = looks.remove(&uid).unwrap_or_default();
                let taken = if look.deleted {
                    tracing::debug!("IMAP {mailbox} UID {uid}: marked \\Deleted; not taken");
                    passed.deleted += 1;
                    false
                } else {
                    let id = look.message_id.as_deref().unwrap_or("(no Message-ID)");
                    let from = match &look.sender {
                        Some(mail::Sender::Allowed { from }) => Some(from.clone()),
                        Some(mail::Sender::NotAllowed { from }) => {
                            tracing::debug!(
                                "IMAP {mailbox} UID {uid} <{id}>: from {from}, not allowed; not fetched"
                            );
                            passed.not_allowed += 1;
                            if look.may_hold_notice != Some(false) {
                                passed.not_allowed_with_parts += 1;
                                passed.example_sender.get_or_insert_with(|| from.clone());
                            }
                            None
                        }
                        // No header given: the whole mail decides.
                        None => Some(String::new()),
                    };
                    match from {
                        None => false,
                        Some(from) if look.may_hold_notice == Some(false) => {
                            tracing::debug!(
                                "IMAP {mailbox} UID {uid} <{id}>: from {from}, no part that could be \
                                     a notice; not fetched"
                            );
                            passed.no_notice += 1;
                            false
                        }
                        Some(_) => match look.size {
                            Some(size) if u64::from(size) > limit => {
                                tracing::warn!(
                                    "IMAP {mailbox} UID {uid} <{id}>: {size} bytes is more than \
                                         imap.max_message_size ({limit}); left where it is"
                                );
                                passed.too_large += 1;
                                passed.left += 1;
                                false
                            }
                            size => {
                                let taken = self
                                    .take_candidate(session, uidvalidity, uid, size, moves)
                                    .await?;
                                if taken {
                                    passed.taken += 1;
                                } else {
                                    passed.left += 1;
                                }
                                taken
                            }
                        },
                    }
                };
                self.store
                    .set_imap_position(&self.account, &mailbox, uidvalidity, uid)
                    .await?;
                *last_uid = uid;
                if taken {
                    self.health.taken += 1;
                    self.write_health().await;
                }
            }
        }
        if let Some(summary) = passed.summary() {
            tracing::info!("IMAP {mailbox}: {summary}");
        }
        self.health.last_contact = Some(crate::store::now_ms());
        Ok(uids.len())
    }

    /// A mail worth fetching: taken, unless sessions ended on it three times in a row.
    async fn take_candidate(
        &mut self,
        session: &mut Session<Stream>,
        uidvalidity: u32,
        uid: u32,
        size: Option<u32>,
        moves: &Moves,
    ) -> Result<bool, ImapError> {
        // A mail that ended three sessions in a row is passed over, so that it cannot hold up the mail
        // behind it forever.
        let key = (uidvalidity, uid);
        let tries = self.failures.get(&key).copied().unwrap_or(0);
        if tries >= POISON_AFTER {
            tracing::error!(
                "IMAP {} UID {uid}: {tries} sessions ended on this mail; passing over it, left where it is",
                self.cfg.mailbox
            );
            return Ok(false);
        }
        self.failures.insert(key, tries + 1);
        let taken = self.take(session, uidvalidity, uid, size, moves).await?;
        self.failures.remove(&key);
        Ok(taken)
    }

    /// Fetches one mail whole and takes its notices; true if they were taken (and the mail marked and
    /// moved).
    async fn take(
        &mut self,
        session: &mut Session<Stream>,
        uidvalidity: u32,
        uid: u32,
        size: Option<u32>,
        moves: &Moves,
    ) -> Result<bool, ImapError> {
        let t = self.cfg.timeout;
        let mailbox = self.cfg.mailbox.clone();
        let uid_s = uid.to_string();
        // The timeout grows with the mail: at least 256 KiB/s on top of the command timeout.
        let size =
            u64::from(size.unwrap_or(0)).max(self.cfg.max_message_size.as_u64().min(1 << 20));
        let body_limit = t + Duration::from_secs(size / (256 * 1024));
        let raw = fetch_one(
            session,
            body_limit,
            "UID FETCH (the mail)",
            uid,
            "(UID BODY.PEEK[])",
            |f| f.body().map(<[u8]>::to_vec),
        )
        .await?;
        let Some(raw) = raw else {
            return self.gone_or_failed(session, uid, "its body").await;
        };
        if raw.len() as u64 > self.cfg.max_message_size.as_u64() {
            tracing::warn!(
                "IMAP {mailbox} UID {uid}: {} bytes is more than imap.max_message_size ({}); left where \
                 it is",
                raw.len(),
                self.cfg.max_message_size.as_u64()
            );
            return Ok(false);
        }
        let allowed = self.cfg.allowed_senders.clone();
        let limits = mail::Limits {
            max_uncompressed: self.ingestor.max_notice_size(),
        };
        let read = tokio::task::spawn_blocking(move || {
            (mail::read(&raw, &allowed, &limits), mail::message_id(&raw))
        })
        .await;
        let (mail, message_id) = match read {
            Ok(read) => read,
            Err(e) => {
                // A bug met by this mail: taking it again would meet it again, forever.
                tracing::error!(
                    "IMAP {mailbox} UID {uid}: reading the mail failed ({e}); left where it is"
                );
                return Ok(false);
            }
        };
        let message_id = message_id.unwrap_or_else(|| "(no Message-ID)".into());
        let what = format!("IMAP {mailbox} UID {uid} <{message_id}>");
        let attachments = match mail {
            Mail::Unreadable => {
                tracing::warn!("{what}: not a readable mail; left where it is");
                return Ok(false);
            }
            Mail::NotAllowed { from } => {
                tracing::warn!(
                    "{what}: from {from}, which imap.allowed_senders does not name (one From header \
                     with allowed addresses only); left where it is"
                );
                return Ok(false);
            }
            Mail::NoNotice { from, found } => {
                if found.is_empty() {
                    tracing::info!(
                        "{what}: from {from}, has no JSON, .json.gz or .zip attachment; left where it is"
                    );
                } else {
                    tracing::warn!(
                        "{what}: from {from}, no notice could be read: {}; left where it is",
                        found.join("; ")
                    );
                }
                return Ok(false);
            }
            Mail::Notices {
                from,
                attachments,
                skipped,
            } => {
                tracing::info!(
                    "{what}: from {from}, {} notice attachment(s)",
                    attachments.len()
                );
                if !skipped.is_empty() {
                    tracing::warn!("{what}: also held, not read: {}", skipped.join("; "));
                }
                attachments
            }
        };
        for a in attachments {
            let source = NoticeSource {
                kind: SourceKind::Imap,
                reference: format!(
                    "imap://{}/{mailbox};UIDVALIDITY={uidvalidity}/;UID={uid} <{message_id}>",
                    self.account
                ),
                name: a.name,
            };
            match self.ingestor.ingest_bytes(&source, a.bytes).await {
                Ok(report) if !report.is_accepted() => tracing::warn!(
                    "{what}: notice {} was not accepted whole; its errors are logged above and kept with \
                     the notice in the database; the mail is taken all the same",
                    report.name
                ),
                Ok(_) => {}
                Err(e @ IngestError::Parser { .. }) => {
                    // A bug met by this attachment: not retried forever, and the mail not marked or moved,
                    // so that it can be taken by hand.
                    tracing::error!("{what}: {e}; left where it is");
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Then, and only then, the mail is marked and moved; a refusal is logged, never retried forever.
        let flagged = add_flag(session, t, &uid_s, "\\Seen").await;
        settle(flagged, &what, "mark it \\Seen")?;
        if let Some(target) = &moves.target {
            let moved = self.move_to(session, &uid_s, target, moves).await;
            settle(moved, &what, &format!("move it to {target}"))?;
        }
        Ok(true)
    }

    /// A FETCH that gave nothing: the mail is gone (moved or deleted meanwhile: passed over), or the
    /// server failed to answer for it (the session ends, to try again).
    async fn gone_or_failed(
        &mut self,
        session: &mut Session<Stream>,
        uid: u32,
        what: &str,
    ) -> Result<bool, ImapError> {
        // Read past async-imap, which hides a tagged NO to FETCH: a refusal is not "gone".
        let still = match raw_uids(
            session,
            self.cfg.timeout,
            "UID FETCH (UID)",
            &format!("UID FETCH {uid} (UID)"),
        )
        .await
        {
            Ok(uids) => uids.contains(&uid),
            Err(ImapError::Refused(why)) => {
                return Err(ImapError::Protocol(format!(
                    "the server did not give {what} of UID {uid}, and refused to say whether it is still \
                     there: {why}"
                )));
            }
            Err(e) => return Err(e),
        };
        if still {
            Err(ImapError::Protocol(format!(
                "the server did not give {what} of UID {uid}, which is still there"
            )))
        } else {
            tracing::info!("IMAP UID {uid}: gone before it could be read (moved or deleted)");
            Ok(false)
        }
    }

    /// Moves a taken mail: MOVE, else COPY, `\Deleted` and UID EXPUNGE; without UIDPLUS, EXPUNGE only
    /// when no other mail is marked `\Deleted` (EXPUNGE would remove those too).
    async fn move_to(
        &mut self,
        session: &mut Session<Stream>,
        uid_s: &str,
        target: &str,
        moves: &Moves,
    ) -> Result<(), ImapError> {
        let t = self.cfg.timeout;
        if moves.can_move {
            return timed(t, "UID MOVE", session.uid_mv(uid_s, target)).await;
        }
        timed(t, "UID COPY", session.uid_copy(uid_s, target)).await?;
        add_flag(session, t, uid_s, "\\Deleted").await?;
        if moves.uidplus {
            let expunged = timed(t, "UID EXPUNGE", async {
                session
                    .uid_expunge(uid_s)
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            })
            .await?;
            // Given back as the command's answer, not on the unsolicited channel.
            self.expunged += expunged.len() as u32;
            tracing::debug!("IMAP UID {uid_s}: copied to {target} and expunged (UID EXPUNGE)");
            return Ok(());
        }
        // Read past async-imap, which hides a tagged NO to SEARCH: a refusal must not read as "none".
        let deleted = match raw_uids(session, t, "UID SEARCH", "UID SEARCH DELETED").await {
            Ok(deleted) => deleted,
            Err(ImapError::Refused(why)) => {
                tracing::warn!(
                    "IMAP UID {uid_s}: copied to {target}; the server refused to say which mails are \
                     marked \\Deleted ({why}), so it stays here marked \\Deleted (EXPUNGE could remove \
                     others' too)"
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if deleted.iter().any(|u| u.to_string() != uid_s) {
            tracing::warn!(
                "IMAP UID {uid_s}: copied to {target}, but other mails are marked \\Deleted and the server \
                 has no UID EXPUNGE, so it stays here marked \\Deleted (EXPUNGE would remove theirs too)"
            );
            return Ok(());
        }
        let answer = raw_command(session, t, "EXPUNGE", "EXPUNGE").await?;
        // The mailbox shrank by the mails expunged (however the server spells it).
        self.expunged += answer
            .iter()
            .filter(|l| l.to_ascii_uppercase().contains(" EXPUNGE"))
            .count() as u32;
        tracing::debug!("IMAP UID {uid_s}: copied to {target} and expunged (EXPUNGE)");
        Ok(())
    }
}

/// FETCHes `query` for `uid` and keeps what `pick` takes from the answer for that UID (a server may also
/// send flag updates of other mails in between); `None` if the answer has nothing for it.
async fn fetch_one<T>(
    session: &mut Session<Stream>,
    limit: Duration,
    what: &'static str,
    uid: u32,
    query: &str,
    pick: impl Fn(&async_imap::types::Fetch) -> Option<T>,
) -> Result<Option<T>, ImapError> {
    timed(limit, what, async {
        let fetched = session
            .uid_fetch(uid.to_string(), query)
            .await?
            .try_collect::<Vec<_>>()
            .await?;
        Ok::<_, async_imap::error::Error>(
            fetched
                .iter()
                .filter(|f| f.uid == Some(uid))
                .find_map(&pick),
        )
    })
    .await
}

/// Adds `flag` to the mail `uid`. Past async-imap, which hides a tagged NO to STORE: a refusal comes
/// back as `Refused`, for `settle` to log.
async fn add_flag(
    session: &mut Session<Stream>,
    limit: Duration,
    uid: &str,
    flag: &str,
) -> Result<(), ImapError> {
    raw_command(
        session,
        limit,
        "UID STORE",
        &format!("UID STORE {uid} +FLAGS.SILENT ({flag})"),
    )
    .await
    .map(drop)
}

/// Reads what the server announced outside replies: EXISTS above the known size (new mail) sets
/// `announced`; EXPUNGE lowers the size. A full channel (announcements dropped) counts as news.
fn track_size(
    channel: &async_channel::Receiver<UnsolicitedResponse>,
    exists: &mut u32,
    announced: &mut bool,
) {
    if channel.is_full() {
        *announced = true;
    }
    while let Ok(r) = channel.try_recv() {
        match r {
            UnsolicitedResponse::Exists(n) => {
                *announced |= n > *exists;
                *exists = n;
            }
            UnsolicitedResponse::Expunge(_) => *exists = exists.saturating_sub(1),
            _ => {}
        }
    }
}

/// Where and how taken mails are moved.
struct Moves {
    target: Option<String>,
    can_move: bool,
    uidplus: bool,
}

/// A server's refusal (NO, BAD) of a flag or a move is logged and passed over: the notice is recorded,
/// and the mail must not be taken again and again. A lost connection or a timeout ends the session.
fn settle(result: Result<(), ImapError>, what: &str, doing: &str) -> Result<(), ImapError> {
    match result {
        Ok(()) => Ok(()),
        Err(ImapError::Refused(reason)) => {
            tracing::warn!("{what}: the server refused to {doing}: {reason}");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Reads the server's greeting; `hint` is added when none comes in time.
async fn greeting<T>(client: &mut Client<T>, limit: Duration, hint: &str) -> Result<(), ImapError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug + Send,
{
    match tokio::time::timeout(limit, client.read_response()).await {
        Err(_) if hint.is_empty() => Err(ImapError::Timeout("the server's greeting")),
        Err(_) => Err(ImapError::Protocol(format!(
            "the server sent no greeting within imap.timeout: {hint}"
        ))),
        Ok(Err(e)) => Err(e.into()),
        Ok(Ok(None)) => Err(ImapError::Protocol(
            "the server closed the connection before its greeting".into(),
        )),
        Ok(Ok(Some(_))) => Ok(()),
    }
}

/// Sends `command` and reads its answer line by line up to the tagged end, straight from the connection,
/// past the client library's parser: for NAMESPACE (RFC 2342), which async-imap cannot parse and would
/// stop the session on, and for EXPUNGE, whose answers some servers misspell (GNU Mailutils imap4d sends
/// `* n EXPUNGED`). Called between commands, when the client has nothing buffered. Returns the untagged
/// lines, or the server's refusal.
async fn raw_command(
    session: &mut Session<Stream>,
    limit: Duration,
    what: &'static str,
    command: &str,
) -> Result<Vec<String>, ImapError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TAG: &str = "mastsub-raw";
    let stream: &mut Stream = session.get_mut();
    let answer = timed(limit, what, async move {
        stream
            .write_all(format!("{TAG} {command}\r\n").as_bytes())
            .await?;
        stream.flush().await?;
        let mut untagged = Vec::new();
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            if stream.read(&mut byte).await? == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            line.push(byte[0]);
            if line.len() > 64 * 1024 {
                return Err(std::io::Error::other("an answer line over 64 KiB"));
            }
            if line.ends_with(b"\r\n") {
                let text = String::from_utf8_lossy(&line).trim_end().to_string();
                line.clear();
                if let Some(status) = text.strip_prefix(TAG) {
                    return Ok((status.trim().to_string(), untagged));
                }
                untagged.push(text);
            }
        }
    })
    .await?;
    let (status, untagged) = answer;
    let word = status.split_whitespace().next().unwrap_or("");
    if word.eq_ignore_ascii_case("OK") {
        Ok(untagged)
    } else {
        Err(ImapError::Refused(
            status.get(word.len()..).unwrap_or("").trim().to_string(),
        ))
    }
}

/// A `UID SEARCH` or `UID FETCH … (UID)` read with `raw_command`: the UIDs of its `* SEARCH` and
/// `* n FETCH (… UID u …)` lines, or the server's refusal.
async fn raw_uids(
    session: &mut Session<Stream>,
    limit: Duration,
    what: &'static str,
    command: &str,
) -> Result<Vec<u32>, ImapError> {
    let lines = raw_command(session, limit, what, command).await?;
    Ok(lines.iter().flat_map(|l| uids_in(l)).collect())
}

/// The UIDs an untagged `SEARCH` or `FETCH` line names.
fn uids_in(line: &str) -> Vec<u32> {
    let upper = line.to_ascii_uppercase();
    if let Some(rest) = upper.strip_prefix("* SEARCH") {
        return rest
            .split_whitespace()
            .filter_map(|n| n.parse().ok())
            .collect();
    }
    match upper.find(" FETCH (") {
        Some(at) => {
            let items: Vec<&str> = upper[at + 8..].split_whitespace().collect();
            items
                .windows(2)
                .find(|w| w[0] == "UID")
                .and_then(|w| w[1].trim_end_matches(')').parse().ok())
                .into_iter()
                .collect()
        }
        None => Vec::new(),
    }
}

/// The server's NAMESPACE line, if it gives one.
async fn namespace(
    session: &mut Session<Stream>,
    limit: Duration,
) -> Result<Option<String>, ImapError> {
    match raw_command(session, limit, "NAMESPACE", "NAMESPACE").await {
        Ok(lines) => Ok(lines.into_iter().find(|l| {
            l.get(..11)
                .is_some_and(|h| h.eq_ignore_ascii_case("* NAMESPACE"))
        })),
        Err(ImapError::Refused(why)) => {
            tracing::debug!("IMAP: NAMESPACE refused: {why}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A mailbox name as an IMAP quoted string.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('\\', "\\\\").replace('"', "\\\""))
}

/// ` (sent as "…")` when the server's name for a folder differs from the configured one.
fn sent_as(configured: &str, server: &str) -> String {
    if configured == server {
        String::new()
    } else {
        format!(" (sent as {server:?})")
    }
}

fn new_backoff(min: Duration, max: Duration) -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(min)
        .with_max_delay(max)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_imap::Authenticator;

    #[test]
    fn uids_are_read_from_raw_search_and_fetch_lines() {
        assert_eq!(uids_in("* SEARCH 3 7 12"), vec![3, 7, 12]);
        assert_eq!(uids_in("* SEARCH"), Vec::<u32>::new());
        assert_eq!(uids_in("* 4 FETCH (UID 17)"), vec![17]);
        assert_eq!(uids_in("* 4 FETCH (FLAGS (\\Seen) UID 18)"), vec![18]);
        assert_eq!(uids_in("* 4 fetch (uid 19 FLAGS ())"), vec![19]);
        // A flag update without its UID, and other lines, name none.
        assert_eq!(uids_in("* 4 FETCH (FLAGS (\\Seen))"), Vec::<u32>::new());
        assert_eq!(uids_in("* 5 EXISTS"), Vec::<u32>::new());
    }

    #[test]
    fn xoauth2_answers_once_then_empty() {
        let mut a = XOAuth2 {
            user: "u@example.org".into(),
            token: "tok".into(),
            answered: false,
        };
        assert_eq!(
            a.process(b""),
            "user=u@example.org\x01auth=Bearer tok\x01\x01"
        );
        assert_eq!(a.process(br#"{"status":"401"}"#), "");
    }

    #[tokio::test]
    async fn credentials_come_from_the_configured_place_and_errors_say_which() {
        // It runs `sh`: no test may be asking whether a file has a writer meanwhile.
        let _spawns = crate::test_support::SPAWNS.lock().await;
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let mut cfg = ImapConfig {
            password_file: Some(file),
            ..ImapConfig::default()
        };
        assert!(matches!(credential(&cfg).await, Ok(Credential::Password(p)) if p == "s3cret"));
        cfg.password_file = None;
        cfg.oauth2_token_command = Some("printf 'tok-123\\n'".into());
        assert!(matches!(credential(&cfg).await, Ok(Credential::OAuth2Token(t)) if t == "tok-123"));
        cfg.oauth2_token_command = Some("echo leaked-token; echo broken >&2; exit 3".into());
        let Err(e) = credential(&cfg).await else {
            panic!("a failing command gave a token")
        };
        let e = e.to_string();
        assert!(e.contains("broken") && !e.contains("leaked-token"), "{e}");
        cfg.oauth2_token_command = None;
        cfg.oauth2_token_file = Some(tmp.path().join("missing"));
        let Err(e) = credential(&cfg).await else {
            panic!("a missing file gave a token")
        };
        assert!(e.to_string().contains("imap.oauth2_token_file"), "{e}");
    }
}
