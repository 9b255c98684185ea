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

use lettre::message::{Mailbox, header::ContentType};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, CertificateStore, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
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
        send_due(&cfg, &store).await;
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

async fn send_due(cfg: &EmailConfig, store: &Arc<dyn Store>) {
    let due = match store.due_mail(now_ms()).await {
        Ok(d) if d.is_empty() => return,
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("e-mail: cannot read the outbox: {e}");
            return;
        }
    };
    let transport = match transport(cfg) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("e-mail: {e}");
            return;
        }
    };
    for mail in due {
        let sent = match message(cfg, &mail.subject, &mail.body) {
            Ok(m) => transport.send(m).await.map(drop).map_err(|e| e.to_string()),
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

fn transport(cfg: &EmailConfig) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
    let tls = || -> Result<TlsParameters, String> {
        let mut builder = TlsParameters::builder(cfg.smtp_host.clone());
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("cannot read email.ca_file {}: {e}", path.display()))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| format!("email.ca_file {}: {e}", path.display()))?;
            builder = builder
                .certificate_store(CertificateStore::None)
                .add_root_certificate(cert);
        }
        builder.build_rustls().map_err(|e| e.to_string())
    };
    let builder = match cfg.tls {
        TlsMode::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.smtp_host),
        TlsMode::Starttls => {
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.smtp_host)
                .tls(Tls::Required(tls()?))
        }
        TlsMode::Implicit => {
            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&cfg.smtp_host)
                .tls(Tls::Wrapper(tls()?))
        }
    };
    let mut builder = builder.port(cfg.smtp_port).timeout(Some(SMTP_TIMEOUT));
    if let (Some(user), Some(path)) = (&cfg.username, &cfg.password_file) {
        let password = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read email.password_file {}: {e}", path.display()))?;
        builder = builder.credentials(Credentials::new(
            user.clone(),
            password.trim_end_matches(['\r', '\n']).to_string(),
        ));
    }
    Ok(builder.build())
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
