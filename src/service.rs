//! Running under a service manager: systemd's notify protocol (`READY=1`, a `STATUS=` line kept current,
//! `WATCHDOG=1` while the loops are alive, `STOPPING=1`), and the liveness of the daemon's loops.
//!
//! Without `NOTIFY_SOCKET` (not under systemd) nothing is sent and the status line is not computed.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

use crate::store::{StatusSnapshot, Store, now_ms};

/// A loop that has not turned for this long is stalled (the download pool turns at least every 5 s, the
/// inbox watcher every 50 ms): the watchdog pings stop, and systemd restarts mastsub after `WatchdogSec`.
pub const STALLED_AFTER: Duration = Duration::from_secs(30);
/// How often the `STATUS=` line is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(2);

/// What the daemon's loops share with the service side.
#[derive(Debug, Default)]
pub struct Vitals {
    /// Bytes received by all download workers.
    pub received: AtomicU64,
    /// The download pool's last turn, ms since the epoch (0: not running).
    pub downloads_beat: AtomicI64,
    /// The inbox watcher's last turn, ms since the epoch (0: not running).
    pub inbox_beat: AtomicI64,
    /// Bytes of the products published since the daemon started.
    pub published: AtomicU64,
    /// Attempts recorded since the daemon started, by how they ended.
    pub attempts: Attempts,
    /// Products published since the daemon started from the cloud bucket (`[cloud]`).
    pub from_cloud: Published,
    /// Products published since the daemon started from MAST.
    pub from_mast: Published,
    /// Told when the recorder has recorded ends: a hook run may have been queued, or a notice's last
    /// download ended.
    pub hooks_wake: tokio::sync::Notify,
    /// The running transfers as they go, by job id: for the status page's rates.
    pub live: std::sync::Mutex<std::collections::BTreeMap<i64, Live>>,
}

/// Attempts by how they ended (`mastsub_download_attempts_total{outcome}`).
#[derive(Debug, Default)]
pub struct Attempts {
    /// Published.
    pub done: AtomicU64,
    /// Queued again (network trouble, a wait for room, a shutdown).
    pub retry: AtomicU64,
    /// Given up.
    pub failed: AtomicU64,
    /// Waiting for a MAST token.
    pub needs_auth: AtomicU64,
}

/// Products published from one source (`mastsub_products_published_total{source}`).
#[derive(Debug, Default)]
pub struct Published {
    /// Products.
    pub products: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
}

/// One transfer as it goes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Live {
    /// Bytes of the file so far (resumed bytes included).
    pub bytes: u64,
    /// Its size, if announced.
    pub total: Option<u64>,
    /// Bytes per second over the last second or so.
    pub rate: f64,
}

impl Vitals {
    /// The products published from `source`.
    pub fn published_from(&self, source: crate::store::Provenance) -> &Published {
        match source {
            crate::store::Provenance::Cloud => &self.from_cloud,
            crate::store::Provenance::Mast => &self.from_mast,
        }
    }

    /// Records a turn of the download pool.
    pub fn downloads_alive(&self) {
        self.downloads_beat.store(now_ms(), Ordering::Relaxed);
    }

    /// A transfer's progress, for the status page.
    pub fn transfer_at(&self, job: i64, live: Live) {
        if let Ok(mut m) = self.live.lock() {
            m.insert(job, live);
        }
    }

    /// A transfer has ended.
    pub fn transfer_ended(&self, job: i64) {
        if let Ok(mut m) = self.live.lock() {
            m.remove(&job);
        }
    }

    /// Records a turn of the inbox watcher.
    pub fn inbox_alive(&self) {
        self.inbox_beat.store(now_ms(), Ordering::Relaxed);
    }

    /// The loops that have run but not turned within `silence` (a loop that never ran is not judged).
    pub fn stalled(&self, silence: Duration) -> Vec<&'static str> {
        let limit = now_ms() - silence.as_millis() as i64;
        [
            ("downloads", &self.downloads_beat),
            ("inbox", &self.inbox_beat),
        ]
        .into_iter()
        .filter(|(_, beat)| {
            let b = beat.load(Ordering::Relaxed);
            b != 0 && b < limit
        })
        .map(|(name, _)| name)
        .collect()
    }
}

/// Whether a service manager listens.
pub fn supervised() -> bool {
    std::env::var_os("NOTIFY_SOCKET").is_some()
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// `READY=1` with a first status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// The `STATUS=` line: "12 queued, 4 running, 1280 done, 2 failed, 1 needs a token; 85.0 MB/s; IMAP
/// connected".
pub fn status_line(s: &StatusSnapshot, rate: f64) -> String {
    let mut line = crate::status::counts_line(s, rate);
    for h in &s.sources {
        match h.source.as_str() {
            "imap" if h.connected => line.push_str("; IMAP connected"),
            "imap" => line.push_str(&format!("; IMAP {}", h.state)),
            other => line.push_str(&format!("; {other} {}", h.state)),
        }
    }
    line
}

/// Keeps the status line current and, when systemd asks for a watchdog, pings it at half its interval
/// while every loop is alive. Ends with `shutdown`.
pub async fn run(store: Arc<dyn Store>, vitals: Arc<Vitals>, shutdown: CancellationToken) {
    if !supervised() {
        return;
    }
    let watchdog = sd_notify::watchdog_enabled();
    let mut status = tokio::time::interval(STATUS_EVERY);
    let mut ping = tokio::time::interval(
        watchdog
            .map(|w| w / 2)
            .unwrap_or(Duration::from_secs(3600))
            .max(Duration::from_millis(100)),
    );
    let mut last_received = vitals.received.load(Ordering::Relaxed);
    let mut last_at = std::time::Instant::now();
    let mut withheld = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = status.tick() => {
                let received = vitals.received.load(Ordering::Relaxed);
                let rate = (received - last_received) as f64 / last_at.elapsed().as_secs_f64().max(1e-3);
                (last_received, last_at) = (received, std::time::Instant::now());
                // Bounded: a database that does not answer must not hold back the watchdog's ping.
                match tokio::time::timeout(STATUS_EVERY, store.status(0)).await {
                    Ok(Ok(s)) => notify(&[NotifyState::Status(&status_line(&s, rate))]),
                    Ok(Err(e)) => tracing::warn!("cannot read the counts for the service status: {e}"),
                    Err(_) => tracing::warn!("the counts for the service status did not come in time"),
                }
            }
            _ = ping.tick(), if watchdog.is_some() => {
                let stalled = vitals.stalled(STALLED_AFTER);
                if stalled.is_empty() {
                    notify(&[NotifyState::Watchdog]);
                    withheld = false;
                } else if !withheld {
                    withheld = true;
                    tracing::error!(
                        "the {} loop(s) have not turned for {}s; withholding the watchdog ping so that \
                         the service manager restarts mastsub",
                        stalled.join(" and "),
                        STALLED_AFTER.as_secs()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DownloadState, SourceHealth};

    #[test]
    fn the_status_line_counts_and_names_each_source() {
        let mut s = StatusSnapshot::default();
        s.downloads.insert(DownloadState::Queued, 12);
        s.downloads.insert(DownloadState::Done, 1280);
        s.sources.push(SourceHealth {
            source: "imap".into(),
            state: "idle".into(),
            connected: true,
            ..SourceHealth::default()
        });
        assert_eq!(
            status_line(&s, 85e6),
            "12 queued, 0 running, 1280 done, 0 failed, 0 need a token; 85.0 MB/s; IMAP connected"
        );
    }

    #[test]
    fn a_loop_that_stops_turning_is_stalled_and_one_never_started_is_not() {
        let v = Vitals::default();
        assert!(v.stalled(Duration::from_secs(1)).is_empty());
        v.downloads_beat.store(now_ms() - 5_000, Ordering::Relaxed);
        v.inbox_alive();
        assert_eq!(v.stalled(Duration::from_secs(2)), vec!["downloads"]);
        v.downloads_alive();
        assert!(v.stalled(Duration::from_secs(2)).is_empty());
    }
}
