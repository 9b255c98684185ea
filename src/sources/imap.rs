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
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::mail::{self, Mail};
use crate::config::{ImapConfig, TlsMode};
use crate::ingest::{IngestError, Ingestor, NoticeSource};
use crate::store::{SourceHealth, SourceKind, Store};

/// The first pause before reconnecting; it doubles (with jitter) up to `RECONNECT_MAX`.
const RECONNECT_MIN: Duration = Duration::from_secs(1);
/// The longest pause before reconnecting.
const RECONNECT_MAX: Duration = Duration::from_secs(300);
/// A session that caught up and lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);
/// A mail on which this many sessions in a row ended is passed over.
const POISON_AFTER: u32 = 3;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    /// Could not reach the server.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// host:port
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed (certificate, protocol).
    #[error("TLS with {host} failed: {reason} (for a private CA set imap.ca_file)")]
    Tls {
        /// The host.
        host: String,
        /// Why.
        reason: String,
    },
    /// The server refused the credentials.
    #[error("the server refused the login of {user}: {reason} (check the imap credential)")]
    Auth {
        /// The user.
        user: String,
        /// What the server said.
        reason: String,
    },
    /// A credential could not be read or made.
    #[error("{0}")]
    Credential(String),
    /// The mailbox cannot be selected.
    #[error("cannot open mailbox {mailbox:?}: {reason}")]
    Mailbox {
        /// The mailbox.
        mailbox: String,
        /// What the server said.
        reason: String,
    },
    /// A command took too long.
    #[error("no answer to {0} within the timeout (imap.timeout)")]
    Timeout(&'static str),
    /// The server answered NO or BAD.
    #[error("the server refused: {0}")]
    Refused(String),
    /// The connection failed or the server said something unexpected.
    #[error("{0}")]
    Protocol(String),
    /// A notice could not be recorded; its mail stays for the next try.
    #[error("{0}")]
    Ingest(#[from] IngestError),
    /// The store could not record the mailbox position or the health.
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
}

impl From<std::io::Error> for ImapError {
    fn from(e: std::io::Error) -> Self {
        ImapError::Protocol(e.to_string())
    }
}

impl From<async_imap::error::Error> for ImapError {
    fn from(e: async_imap::error::Error) -> Self {
        use async_imap::error::Error;
        match e {
            Error::No(why) | Error::Bad(why) => ImapError::Refused(why),
            other => ImapError::Protocol(other.to_string()),
        }
    }
}

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

/// The TLS settings: the system's roots, or only the CAs in `ca_file`.
fn tls_config(cfg: &ImapConfig) -> Result<Arc<rustls::ClientConfig>, ImapError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ImapError::Credential(format!("TLS setup: {e}")))?;
    let config = match &cfg.ca_file {
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    ImapError::Credential(format!(
                        "cannot read imap.ca_file {}: {e}",
                        path.display()
                    ))
                })?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(ImapError::Credential(format!(
                    "imap.ca_file {} holds no usable certificate",
                    path.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            use rustls_platform_verifier::BuilderVerifierExt;
            builder
                .with_platform_verifier()
                .map_err(|e| ImapError::Credential(format!("TLS setup: {e}")))?
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
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
        }
    }

    /// Runs until `shutdown`: sessions, with backoff between them. A change on `reload` (SIGHUP: secrets
    /// read again) ends the session and connects again at once, with the credential read anew.
    pub async fn run(
        mut self,
        mut reload: tokio::sync::watch::Receiver<u64>,
        shutdown: CancellationToken,
    ) {
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
        let mut backoff = new_backoff();
        loop {
            let began = Instant::now();
            self.progressed = false;
            let ended = tokio::select! {
                r = self.session(&shutdown) => r,
                _ = shutdown.cancelled() => Ok(()),
                Ok(()) = reload.changed() => {
                    tracing::info!("IMAP {}: secrets read again; connecting again", self.account);
                    backoff = new_backoff();
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                self.set_state("stopped", false, None).await;
                return;
            }
            if self.progressed && began.elapsed() >= HEALTHY_SESSION {
                backoff = new_backoff();
            }
            let pause = backoff.next().unwrap_or(RECONNECT_MAX);
            let why = match ended {
                Ok(()) => "the session ended".to_string(),
                Err(e) => e.to_string(),
            };
            tracing::warn!(
                "IMAP {}: {why}; reconnecting in {:.0}s",
                self.account,
                pause.as_secs_f64().ceil()
            );
            self.set_state("reconnecting", false, Some(why)).await;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
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
        self.health.last_error_at = error.as_ref().map(|_| now);
        self.health.last_error = error;
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
        let tcp = timed(cfg.timeout, "the connection", async {
            TcpStream::connect((cfg.host.as_str(), cfg.port)).await
        })
        .await
        .map_err(|e| match e {
            ImapError::Timeout(_) => ImapError::Connect {
                addr: addr.clone(),
                reason: "timed out".into(),
            },
            other => ImapError::Connect {
                addr: addr.clone(),
                reason: other.to_string(),
            },
        })?;
        let keepalive = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(60))
            .with_interval(Duration::from_secs(10));
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
        let _ = tcp.set_nodelay(true);

        let tls = |tcp: TcpStream| async move {
            let name = ServerName::try_from(cfg.host.clone()).map_err(|e| ImapError::Tls {
                host: cfg.host.clone(),
                reason: format!("not a valid server name: {e}"),
            })?;
            let connector = tokio_rustls::TlsConnector::from(tls_config(cfg)?);
            timed(cfg.timeout, "the TLS handshake", async {
                connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| ImapError::Tls {
                        host: cfg.host.clone(),
                        reason: e.to_string(),
                    })
            })
            .await
        };
        let client = match cfg.tls {
            TlsMode::Implicit => {
                let mut c = Client::new(Stream::Tls(Box::new(tls(tcp).await?)));
                greeting(&mut c, cfg.timeout).await?;
                c
            }
            TlsMode::None => {
                let mut c = Client::new(Stream::Plain(tcp));
                greeting(&mut c, cfg.timeout).await?;
                c
            }
            TlsMode::Starttls => {
                let mut c = Client::new(tcp);
                greeting(&mut c, cfg.timeout).await?;
                timed(
                    cfg.timeout,
                    "STARTTLS",
                    c.run_command_and_check_ok("STARTTLS", None),
                )
                .await
                .map_err(|e| ImapError::Tls {
                    host: cfg.host.clone(),
                    reason: format!("STARTTLS refused: {e}"),
                })?;
                Client::new(Stream::Tls(Box::new(tls(c.into_inner()).await?)))
            }
        };
        let credential = credential(cfg).await?;
        let user = cfg.username.clone();
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
            Ok(Err((e, _))) => Err(ImapError::Auth {
                user,
                reason: e.to_string(),
            }),
        }
    }

    /// One session: connect, select, catch up, then IDLE (or poll) until an error or shutdown.
    async fn session(&mut self, shutdown: &CancellationToken) -> Result<(), ImapError> {
        self.set_state("connecting", false, None).await;
        let mut session = self.connect().await?;
        let t = self.cfg.timeout;
        let caps = timed(t, "CAPABILITY", session.capabilities()).await?;
        let use_idle = self.cfg.idle && caps.has_str("IDLE");
        let moves = Moves {
            target: self.cfg.processed_mailbox.clone(),
            can_move: caps.has_str("MOVE"),
            uidplus: caps.has_str("UIDPLUS"),
        };
        if let Some(target) = &moves.target {
            // Created if missing; "already exists" is the usual answer.
            match timed(t, "CREATE", session.create(target)).await {
                Ok(()) => tracing::info!("IMAP {}: created mailbox {target}", self.account),
                Err(ImapError::Refused(why)) => tracing::debug!("CREATE {target}: {why}"),
                Err(other) => return Err(other),
            }
        }
        let mailbox = self.cfg.mailbox.clone();
        let selected = match timed(t, "SELECT", session.select(&mailbox)).await {
            Ok(m) => m,
            Err(ImapError::Refused(reason)) => {
                return Err(ImapError::Mailbox { mailbox, reason });
            }
            Err(e) => return Err(e),
        };
        let uidvalidity = selected.uid_validity.ok_or_else(|| {
            ImapError::Protocol(format!("the server gave no UIDVALIDITY for {mailbox}"))
        })?;
        let stored = self.store.imap_position(&self.account, &mailbox).await?;
        let mut last_uid = match stored {
            Some((v, uid)) if v == uidvalidity => {
                if selected.uid_next.is_some_and(|next| next <= uid) {
                    // UIDs went backwards without a new UIDVALIDITY (a server restored from a backup):
                    // what comes next would hide below the position.
                    tracing::warn!(
                        "IMAP {}/{mailbox}: the next UID ({:?}) is not above the last one handled ({uid}); \
                         reading all of it again, already recorded notices are skipped",
                        self.account,
                        selected.uid_next
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
                .set_imap_position(&self.account, &mailbox, uidvalidity, last_uid)
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
            // Until a search finds nothing new: announcements dropped meanwhile cannot hide mail.
            while self
                .catch_up(&mut session, uidvalidity, &mut last_uid, &moves)
                .await?
                > 0
            {}
            self.progressed = true;
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
                    let (wait, stop) = idle.wait_with_timeout(self.cfg.idle_refresh);
                    let woke = tokio::select! {
                        r = wait => Some(r),
                        _ = tokio::time::sleep(self.cfg.idle_refresh) => None,
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
                                return Err(ImapError::Protocol(format!(
                                    "the server reported {status:?} during IDLE: {}",
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

    /// Takes every mail above `last_uid`, oldest first; returns how many UIDs it passed.
    async fn catch_up(
        &mut self,
        session: &mut Session<Stream>,
        uidvalidity: u32,
        last_uid: &mut u32,
        moves: &Moves,
    ) -> Result<usize, ImapError> {
        let t = self.cfg.timeout;
        let query = format!("UID {}:*", last_uid.saturating_add(1));
        let found: HashSet<u32> = timed(t, "UID SEARCH", session.uid_search(&query)).await?;
        // `n:*` always matches the highest UID, even below n.
        let mut uids: Vec<u32> = found.into_iter().filter(|u| *u > *last_uid).collect();
        uids.sort_unstable();
        for &uid in &uids {
            // A mail that ended three sessions in a row is passed over, so that it cannot hold up the
            // mail behind it forever.
            let key = (uidvalidity, uid);
            let tries = self.failures.get(&key).copied().unwrap_or(0);
            let taken = if tries >= POISON_AFTER {
                tracing::error!(
                    "IMAP {} UID {uid}: {tries} sessions ended on this mail; passing over it, left where \
                     it is",
                    self.cfg.mailbox
                );
                false
            } else {
                self.failures.insert(key, tries + 1);
                let taken = self.take(session, uidvalidity, uid, moves).await?;
                self.failures.remove(&key);
                taken
            };
            self.store
                .set_imap_position(&self.account, &self.cfg.mailbox, uidvalidity, uid)
                .await?;
            *last_uid = uid;
            if taken {
                self.health.taken += 1;
                self.write_health().await;
            }
        }
        self.health.last_contact = Some(crate::store::now_ms());
        Ok(uids.len())
    }

    /// Handles one mail; true if its notices were taken (and the mail marked and moved).
    async fn take(
        &mut self,
        session: &mut Session<Stream>,
        uidvalidity: u32,
        uid: u32,
        moves: &Moves,
    ) -> Result<bool, ImapError> {
        let t = self.cfg.timeout;
        let mailbox = self.cfg.mailbox.clone();
        let uid_s = uid.to_string();
        let size = fetch_one(
            session,
            t,
            "UID FETCH (size)",
            uid,
            "(UID RFC822.SIZE)",
            |f| f.size,
        )
        .await?;
        let Some(size) = size else {
            return self.gone_or_failed(session, uid, "its size").await;
        };
        let limit = self.cfg.max_message_size.as_u64();
        if u64::from(size) > limit {
            tracing::warn!(
                "IMAP {mailbox} UID {uid}: {size} bytes is more than imap.max_message_size ({limit}); \
                 left where it is"
            );
            return Ok(false);
        }
        // The timeout grows with the mail: at least 256 KiB/s on top of the command timeout.
        let body_limit = t + Duration::from_secs(u64::from(size) / (256 * 1024));
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
        let allowed = self.cfg.allowed_senders.clone();
        let read = tokio::task::spawn_blocking(move || {
            (mail::read(&raw, &allowed), mail::message_id(&raw))
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
            Mail::NoNotice { from } => {
                tracing::info!("{what}: from {from}, has no JSON attachment; left where it is");
                return Ok(false);
            }
            Mail::Notices { from, attachments } => {
                tracing::info!(
                    "{what}: from {from}, {} notice attachment(s)",
                    attachments.len()
                );
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
        let query = format!("UID {uid}");
        let still: HashSet<u32> =
            timed(self.cfg.timeout, "UID SEARCH", session.uid_search(&query)).await?;
        if still.contains(&uid) {
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
            timed(t, "UID EXPUNGE", async {
                session
                    .uid_expunge(uid_s)
                    .await?
                    .try_collect::<Vec<_>>()
                    .await
            })
            .await?;
            tracing::debug!("IMAP UID {uid_s}: copied to {target} and expunged (UID EXPUNGE)");
            return Ok(());
        }
        let deleted: HashSet<u32> = timed(t, "UID SEARCH", session.uid_search("DELETED")).await?;
        if deleted.iter().any(|u| u.to_string() != uid_s) {
            tracing::warn!(
                "IMAP UID {uid_s}: copied to {target}, but other mails are marked \\Deleted and the server \
                 has no UID EXPUNGE, so it stays here marked \\Deleted (EXPUNGE would remove theirs too)"
            );
            return Ok(());
        }
        timed(t, "EXPUNGE", async {
            session.expunge().await?.try_collect::<Vec<_>>().await
        })
        .await?;
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

/// Adds `flag` to the mail `uid`.
async fn add_flag(
    session: &mut Session<Stream>,
    limit: Duration,
    uid: &str,
    flag: &str,
) -> Result<(), ImapError> {
    timed(limit, "UID STORE", async {
        session
            .uid_store(uid, format!("+FLAGS.SILENT ({flag})"))
            .await?
            .try_collect::<Vec<_>>()
            .await
    })
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

async fn greeting<T>(client: &mut Client<T>, limit: Duration) -> Result<(), ImapError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + std::fmt::Debug + Send,
{
    match tokio::time::timeout(limit, client.read_response()).await {
        Err(_) => Err(ImapError::Timeout("the server's greeting")),
        Ok(Err(e)) => Err(ImapError::Protocol(format!("reading the greeting: {e}"))),
        Ok(Ok(None)) => Err(ImapError::Protocol(
            "the server closed the connection before its greeting".into(),
        )),
        Ok(Ok(Some(_))) => Ok(()),
    }
}

fn new_backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(RECONNECT_MIN)
        .with_max_delay(RECONNECT_MAX)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_imap::Authenticator;

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
