//! E-mail with lettre: a summary when all downloads of a notice have ended, an alert when jobs end
//! `failed` or `needs_auth` (at most one per cause per `email.alert_every`).
//!
//! Mails are composed into the store's outbox first, in the same transaction that marks the notice
//! summarized (or moves the alert watermark), then sent: an SMTP server that is down delays a mail but
//! never loses it, across restarts too. Failed sends are tried again with a doubling wait between
//! `email.retry_initial` and `email.retry_max`, and logged; nothing here can stop the daemon.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use lettre::Message;
use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, AsyncTokioStream};
use lettre::transport::smtp::extension::ClientId;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::{EmailConfig, TlsMode};
use crate::status::human_bytes;
use crate::store::{DownloadRow, DownloadState, NewMail, NoticeDigest, Store, now_ms};

/// How often the outbox and the job ends are looked at.
const TURN: Duration = Duration::from_secs(2);
/// How long one SMTP exchange may take.
const SMTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs until `shutdown`.
pub async fn run(cfg: EmailConfig, store: Arc<dyn Store>, shutdown: CancellationToken) {
    let since = loop {
        match store.mail_watermarks(now_ms()).await {
            Ok((since, _)) => break since,
            Err(e) => {
                tracing::error!("e-mail: cannot read the mailer's state: {e}; trying again");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(TURN * 5) => {}
                }
            }
        }
    };
    tracing::info!(
        "e-mail: summaries and alerts to {} through {}:{}",
        cfg.to.join(", "),
        cfg.smtp_host,
        cfg.smtp_port
    );
    let mut turn = tokio::time::interval(TURN);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = turn.tick() => {}
        }
        if let Err(e) = compose_summaries(&store, since).await {
            tracing::warn!("e-mail: cannot compose summaries: {e}");
        }
        if let Err(e) = compose_alerts(&cfg, &store).await {
            tracing::warn!("e-mail: cannot compose alerts: {e}");
        }
        send_due(&cfg, &store, &shutdown).await;
    }
}

async fn compose_summaries(
    store: &Arc<dyn Store>,
    since: i64,
) -> Result<(), crate::store::StoreError> {
    for digest in store.notices_to_summarize(since).await? {
        let mail = summary(&digest);
        store
            .queue_summary(digest.notice_id, mail.as_ref(), now_ms())
            .await?;
    }
    Ok(())
}

/// The summary of a notice whose downloads have ended; `None` when it queued no download (duplicates,
/// record-only events).
pub fn summary(d: &NoticeDigest) -> Option<NewMail> {
    let jobs: Vec<_> = d.items.iter().filter(|i| i.state.is_some()).collect();
    if jobs.is_empty() {
        return None;
    }
    let count = |st| jobs.iter().filter(|i| i.state == Some(st)).count();
    let (done, failed, auth) = (
        count(DownloadState::Done),
        count(DownloadState::Failed),
        count(DownloadState::NeedsAuth),
    );
    let mut programs: Vec<i64> = d.items.iter().map(|i| i.program).collect();
    programs.sort_unstable();
    programs.dedup();
    let programs = programs
        .iter()
        .map(i64::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let mut by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for i in &d.items {
        *by_type.entry(i.event_type.as_str()).or_default() += 1;
    }
    let types = by_type
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut subject = format!(
        "mastsub: program {programs}: {done} of {} product(s) downloaded",
        jobs.len()
    );
    if failed + auth > 0 {
        let _ = write!(subject, ", {} not", failed + auth);
    }
    let mut body = format!(
        "Notice {} (from {}, received {})\n\nProgram(s): {programs}\nEvents: {types}\nDownloads: {done} done, \
         {failed} failed, {auth} waiting for a MAST token\n\n",
        d.name,
        d.source_kind,
        chrono::DateTime::from_timestamp_millis(d.received_at)
            .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
            .unwrap_or_default()
    );
    body.push_str("Files:\n");
    for i in &jobs {
        let _ = writeln!(
            body,
            "  {:<10} {:<11} {}  {}",
            i.state.map(|s| s.to_string()).unwrap_or_default(),
            i.event_type,
            i.local_path,
            human_bytes(i.bytes.max(0) as u64)
        );
    }
    let problems: Vec<_> = jobs
        .iter()
        .filter(|i| i.state != Some(DownloadState::Done))
        .collect();
    if !problems.is_empty() {
        body.push_str("\nNot downloaded, and why:\n");
        for i in problems {
            let _ = writeln!(
                body,
                "  {}: {}",
                i.local_path,
                i.error.as_deref().unwrap_or("(no error recorded)")
            );
        }
        body.push_str(
            "\n`mastsub status` shows the latest failures; `mastsub retry --all-failed` queues them again.\n",
        );
    }
    Some(NewMail {
        kind: "summary",
        cause: None,
        subject,
        body,
    })
}

/// What an alert is about: the state, and for failures the error up to its first colon ("failed: MAST
/// answered HTTP 404").
pub fn cause(row: &DownloadRow) -> String {
    match row.state {
        DownloadState::NeedsAuth => "needs_auth".to_string(),
        state => {
            let error = row.last_error.as_deref().unwrap_or("unknown error");
            let head = error.split(':').next().unwrap_or(error).trim();
            format!("{state}: {}", head.chars().take(80).collect::<String>())
        }
    }
}

async fn compose_alerts(
    cfg: &EmailConfig,
    store: &Arc<dyn Store>,
) -> Result<(), crate::store::StoreError> {
    let (_, until) = store.mail_watermarks(now_ms()).await?;
    let rows = store.failures_since(until).await?;
    let Some(last) = rows.iter().map(|r| r.updated_at).max() else {
        return Ok(());
    };
    let mut by_cause: BTreeMap<String, Vec<&DownloadRow>> = BTreeMap::new();
    for r in &rows {
        by_cause.entry(cause(r)).or_default().push(r);
    }
    let now = now_ms();
    let quiet = i64::try_from(cfg.alert_every.as_millis()).unwrap_or(i64::MAX);
    let mut mails = Vec::new();
    for (cause, rows) in by_cause {
        if let Some(at) = store.last_alert(&cause).await?
            && now - at < quiet
        {
            tracing::debug!(
                "e-mail: no alert for {cause}: one went out {}s ago",
                (now - at) / 1000
            );
            continue;
        }
        mails.push(alert(&cause, &rows));
    }
    store.queue_alerts(&mails, last, now).await
}

/// One alert for `rows`, which share `cause`.
pub fn alert(cause: &str, rows: &[&DownloadRow]) -> NewMail {
    let auth = cause == "needs_auth";
    let subject = if auth {
        format!(
            "mastsub alert: {} download(s) need a MAST token",
            rows.len()
        )
    } else {
        format!("mastsub alert: {} download(s) {cause}", rows.len())
    };
    let mut body = String::new();
    for r in rows {
        let _ = writeln!(
            body,
            "  #{} {} program {} {}: {}",
            r.id,
            r.event_type,
            r.program,
            r.local_path,
            r.last_error.as_deref().unwrap_or("(no error recorded)")
        );
    }
    body.push('\n');
    body.push_str(if auth {
        "These products are under exclusive access. Give mastsub a MAST token (mast.token_file, or \
         MAST_API_TOKEN) and reload it (systemctl reload mastsub): the downloads start again.\n"
    } else {
        "`mastsub status` shows the latest failures; `mastsub retry --all-failed` queues them again.\n"
    });
    NewMail {
        kind: "alert",
        cause: Some(cause.to_string()),
        subject,
        body,
    }
}

/// Sends the due mails, until `stop` (this member no longer sends mail): the mails it claimed and did
/// not send are due again to whoever sends mail after [`crate::store::MAIL_CLAIM_MS`].
async fn send_due(cfg: &EmailConfig, store: &Arc<dyn Store>, stop: &CancellationToken) {
    let due = match store.due_mail(now_ms()).await {
        Ok(d) if d.is_empty() => return,
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("e-mail: cannot read the outbox: {e}");
            return;
        }
    };
    let smtp = match Smtp::new(cfg) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("e-mail: {e}");
            return;
        }
    };
    for mail in due {
        if stop.is_cancelled() {
            return;
        }
        let sent = match message(cfg, &mail.subject, &mail.body) {
            Ok(m) => smtp.send(&m).await,
            Err(e) => Err(e),
        };
        let now = now_ms();
        let recorded = match sent {
            Ok(()) => {
                tracing::info!("e-mail sent: {}", mail.subject);
                store.mail_sent(mail.id, now).await
            }
            Err(e) => {
                let wait = retry_wait(cfg, mail.attempts);
                tracing::warn!(
                    "e-mail: cannot send \"{}\" (try {}): {e}; trying again in {}s",
                    mail.subject,
                    mail.attempts + 1,
                    wait.as_secs()
                );
                store
                    .mail_failed(mail.id, &e, now + wait.as_millis() as i64)
                    .await
            }
        };
        if let Err(e) = recorded {
            tracing::warn!("e-mail: cannot record a mail's outcome: {e}");
        }
    }
}

/// The wait after `attempts` failed tries: `retry_initial`, doubling, at most `retry_max`.
fn retry_wait(cfg: &EmailConfig, attempts: i64) -> Duration {
    let doublings = u32::try_from(attempts.clamp(0, 20)).unwrap_or(20);
    cfg.retry_initial
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(cfg.retry_max)
}

fn message(cfg: &EmailConfig, subject: &str, body: &str) -> Result<Message, String> {
    let from: Mailbox = cfg
        .from
        .parse()
        .map_err(|e| format!("email.from {:?}: {e}", cfg.from))?;
    let mut builder = Message::builder()
        .from(from)
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .user_agent(concat!("mastsub/", env!("CARGO_PKG_VERSION")).to_string());
    for to in &cfg.to {
        builder = builder.to(to.parse().map_err(|e| format!("email.to {to:?}: {e}"))?);
    }
    builder.body(body.to_string()).map_err(|e| e.to_string())
}

/// What the SMTP connection trusts.
fn trust(cfg: &EmailConfig) -> crate::tls::Trust<'_> {
    crate::tls::Trust {
        section: "email",
        ca_file: cfg.ca_file.as_deref(),
        fingerprint: cfg.tls_fingerprint.as_deref(),
    }
}

/// Sending over SMTP: lettre speaks SMTP, over a connection made here, so that TLS (implicit, or after
/// STARTTLS) uses `crate::tls`'s verifier (self-listed certificates, pinning, sentences for errors):
/// lettre 0.11 takes no rustls configuration of ours, but takes a stream.
struct Smtp<'a> {
    cfg: &'a EmailConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    credentials: Option<Credentials>,
}

impl<'a> Smtp<'a> {
    fn new(cfg: &'a EmailConfig) -> Result<Smtp<'a>, String> {
        let tls = match cfg.tls {
            TlsMode::None => None,
            TlsMode::Implicit | TlsMode::Starttls => Some(crate::tls::client_config(&trust(cfg))?),
        };
        let credentials = match (&cfg.username, &cfg.password_file) {
            (Some(user), Some(path)) => {
                let password = std::fs::read_to_string(path).map_err(|e| {
                    format!("cannot read email.password_file {}: {e}", path.display())
                })?;
                Some(Credentials::new(
                    user.clone(),
                    password.trim_end_matches(['\r', '\n']).to_string(),
                ))
            }
            _ => None,
        };
        Ok(Smtp {
            cfg,
            tls,
            credentials,
        })
    }

    fn who(&self) -> String {
        format!("{}:{}", self.cfg.smtp_host, self.cfg.smtp_port)
    }

    /// Sends `message` on a connection of its own.
    async fn send(&self, message: &Message) -> Result<(), String> {
        let exchange = async {
            let mut conn = self.connect().await?;
            if let Some(credentials) = &self.credentials {
                conn.auth(&[Mechanism::Plain, Mechanism::Login], credentials)
                    .await
                    .map_err(|e| {
                        format!("{} refused the login (check email.username and email.password_file): {e}", self.who())
                    })?;
            }
            conn.send(message.envelope(), &message.formatted())
                .await
                .map_err(|e| format!("{} did not take the mail: {e}", self.who()))?;
            let _ = conn.quit().await;
            Ok(())
        };
        tokio::time::timeout(SMTP_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "{} did not answer within {}s{}",
                    self.who(),
                    SMTP_TIMEOUT.as_secs(),
                    if self.cfg.tls == TlsMode::Starttls {
                        " (if the port speaks TLS at once, as 465 does, set email.tls = \"implicit\")"
                    } else {
                        ""
                    }
                ))
            })
    }

    /// Connects, secures the connection as `email.tls` says, and greets the server.
    async fn connect(&self) -> Result<AsyncSmtpConnection, String> {
        let (host, port) = (self.cfg.smtp_host.as_str(), self.cfg.smtp_port);
        let hello = ClientId::default();
        let tcp = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", self.who()))?;
        let _ = tcp.set_nodelay(true);
        let peer = tcp.peer_addr().ok();
        let stream = match (&self.tls, self.cfg.tls) {
            (Some(config), TlsMode::Starttls) => {
                let tcp = self.starttls(tcp, &hello).await?;
                // lettre reads a greeting first; the server greeted before STARTTLS already.
                SmtpStream::tls(
                    self.handshake(config, tcp).await?,
                    b"220 (greeted before STARTTLS)\r\n",
                    peer,
                )
            }
            (Some(config), _) => SmtpStream::tls(self.handshake(config, tcp).await?, b"", peer),
            (None, _) => SmtpStream {
                inner: Inner::Plain(tcp),
                pending: Vec::new(),
                peer,
            },
        };
        AsyncSmtpConnection::connect_with_transport(Box::new(stream), &hello)
            .await
            .map_err(|e| format!("{} failed the SMTP greeting: {e}", self.who()))
    }

    async fn handshake(
        &self,
        config: &Arc<rustls::ClientConfig>,
        tcp: TcpStream,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name =
            rustls::pki_types::ServerName::try_from(self.cfg.smtp_host.clone()).map_err(|e| {
                format!(
                    "email.smtp_host {:?} is not a valid server name: {e}",
                    self.cfg.smtp_host
                )
            })?;
        tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                crate::tls::explain_handshake(
                    &e,
                    &self.cfg.smtp_host,
                    self.cfg.smtp_port,
                    &trust(self.cfg),
                )
            })
    }

    /// The plain part of STARTTLS (RFC 3207): greeting, EHLO, STARTTLS, 220. Nothing the server sends
    /// after its 220 is taken (it would be read as if it came over TLS).
    async fn starttls(&self, tcp: TcpStream, hello: &ClientId) -> Result<TcpStream, String> {
        let who = self.who();
        let mut r = BufReader::new(tcp);
        let (code, text) = reply(&mut r).await.map_err(|e| {
            format!("{who} sent no SMTP greeting ({e}); if the port speaks TLS at once, as 465 does, set email.tls = \"implicit\"")
        })?;
        if code != 220 {
            return Err(format!("{who} greeted with {code} {text}"));
        }
        r.get_mut()
            .write_all(format!("EHLO {hello}\r\n").as_bytes())
            .await
            .map_err(|e| format!("{who}: {e}"))?;
        let (code, text) = reply(&mut r).await.map_err(|e| format!("{who}: {e}"))?;
        if code != 250 {
            return Err(format!("{who} refused EHLO: {code} {text}"));
        }
        let offers = text
            .lines()
            .any(|l| l.trim().eq_ignore_ascii_case("STARTTLS"));
        if !offers {
            return Err(format!(
                "{who} does not offer STARTTLS; if the port speaks TLS at once, as 465 does, set \
                 email.tls = \"implicit\""
            ));
        }
        r.get_mut()
            .write_all(b"STARTTLS\r\n")
            .await
            .map_err(|e| format!("{who}: {e}"))?;
        let (code, text) = reply(&mut r).await.map_err(|e| format!("{who}: {e}"))?;
        if code != 220 {
            return Err(format!("{who} refused STARTTLS: {code} {text}"));
        }
        if !r.buffer().is_empty() {
            return Err(format!(
                "{who} sent more after its STARTTLS answer; refused, as it could be injected"
            ));
        }
        Ok(r.into_inner())
    }
}

/// One SMTP reply: its code, and its lines' text without the codes.
async fn reply(r: &mut BufReader<TcpStream>) -> Result<(u16, String), String> {
    let mut text = String::new();
    for _ in 0..100 {
        let mut line = String::new();
        let n = (&mut *r)
            .take(4096)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the connection was closed".into());
        }
        let line = line.trim_end_matches(['\r', '\n']);
        let code = line
            .get(..3)
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| {
                format!(
                    "not an SMTP reply: {:?}",
                    line.chars().take(60).collect::<String>()
                )
            })?;
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(line.get(4..).unwrap_or(""));
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, text));
        }
    }
    Err("an SMTP reply of more than 100 lines".into())
}

/// The stream lettre talks SMTP over.
struct SmtpStream {
    inner: Inner,
    /// Bytes read before the stream's own (the greeting given before STARTTLS).
    pending: Vec<u8>,
    peer: Option<std::net::SocketAddr>,
}

enum Inner {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl SmtpStream {
    fn tls(
        stream: tokio_rustls::client::TlsStream<TcpStream>,
        pending: &[u8],
        peer: Option<std::net::SocketAddr>,
    ) -> SmtpStream {
        SmtpStream {
            inner: Inner::Tls(Box::new(stream)),
            pending: pending.to_vec(),
            peer,
        }
    }
}

impl std::fmt::Debug for SmtpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.inner {
            Inner::Plain(_) => "plain",
            Inner::Tls(_) => "TLS",
        };
        write!(f, "SMTP stream ({kind}) to {:?}", self.peer)
    }
}

impl AsyncTokioStream for SmtpStream {
    fn peer_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.peer
            .ok_or_else(|| std::io::Error::other("no peer address"))
    }
}

impl AsyncRead for SmtpStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.remaining());
            buf.put_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return std::task::Poll::Ready(Ok(()));
        }
        match &mut self.inner {
            Inner::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SmtpStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match &mut self.inner {
            Inner::Plain(s) => std::pin::Pin::new(s).poll_write(cx, data),
            Inner::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DigestItem;

    fn item(state: Option<DownloadState>, path: &str, error: Option<&str>) -> DigestItem {
        DigestItem {
            event_type: "New".into(),
            program: 5105,
            local_path: path.into(),
            state,
            bytes: 2880 * 10,
            error: error.map(str::to_string),
        }
    }

    #[test]
    fn a_summary_counts_states_and_lists_files_and_reasons() {
        let d = NoticeDigest {
            notice_id: 1,
            name: "event_metadata_jwst.json".into(),
            source_kind: "imap".into(),
            received_at: 0,
            items: vec![
                item(Some(DownloadState::Done), "jwst/a/a.fits", None),
                item(
                    Some(DownloadState::Failed),
                    "jwst/b/b.fits",
                    Some("MAST answered HTTP 404: gone"),
                ),
                item(None, "jwst/c/c.fits", None),
            ],
        };
        let m = summary(&d).unwrap();
        assert_eq!(
            m.subject,
            "mastsub: program 5105: 1 of 2 product(s) downloaded, 1 not"
        );
        assert!(m.body.contains("Events: 3 New"), "{}", m.body);
        assert!(
            m.body.contains("Downloads: 1 done, 1 failed, 0 waiting"),
            "{}",
            m.body
        );
        assert!(m.body.contains("jwst/a/a.fits  28.1 KiB"), "{}", m.body);
        assert!(
            m.body
                .contains("jwst/b/b.fits: MAST answered HTTP 404: gone"),
            "{}",
            m.body
        );
        let none = NoticeDigest {
            items: vec![item(None, "x", None)],
            ..d
        };
        assert!(
            summary(&none).is_none(),
            "a notice that queued nothing gets no mail"
        );
    }

    #[test]
    fn retries_wait_longer_each_time_up_to_the_limit() {
        let cfg = EmailConfig {
            retry_initial: Duration::from_secs(30),
            retry_max: Duration::from_secs(600),
            ..EmailConfig::default()
        };
        let waits: Vec<u64> = (0..7).map(|n| retry_wait(&cfg, n).as_secs()).collect();
        assert_eq!(waits, [30, 60, 120, 240, 480, 600, 600]);
    }
}
