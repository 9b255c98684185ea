//! `GET /metrics`: the figures an operator graphs and alerts on, in the OpenMetrics text format that
//! Prometheus scrapes (prometheus-client encodes it).
//!
//! A registry is built for each scrape from two sources, so nothing is kept twice: the store (jobs by
//! state, events by type, notices, sources, the oldest queued job, the last notice, hooks), which is
//! what `status --json` reads too, so the two always agree; and the daemon's own counters since it
//! started (`Vitals`: bytes received, bytes published, attempts by outcome), which Prometheus treats as
//! counters that reset at a restart.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use crate::service::Vitals;
use crate::store::{DownloadState, StatusSnapshot};

/// The `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

/// What the metrics read besides the store and the counters.
pub struct Context<'a> {
    /// The sources configured (`inbox`, `imap`): each has a `mastsub_source_up`, reported or not.
    pub sources: &'a [&'static str],
    /// Free bytes on the download file system, if known.
    pub free: Option<u64>,
    /// `download.min_free_space`.
    pub min_free: u64,
    /// `download.max_rate`, if set.
    pub max_rate: Option<u64>,
    /// Now, ms since the epoch.
    pub now: i64,
}

/// A label value as the exposition format writes it: prometheus-client writes values as given, and an
/// event type is free text from a notice (a `"` in one would end the value early and make Prometheus
/// refuse the whole scrape).
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn counter(v: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(v);
    c
}

fn gauge(v: i64) -> Gauge {
    let g = Gauge::default();
    g.set(v);
    g
}

fn gauge_f(v: f64) -> Gauge<f64, AtomicU64> {
    let g = Gauge::<f64, AtomicU64>::default();
    g.set(v);
    g
}

/// The whole exposition.
pub fn render(s: &StatusSnapshot, vitals: &Vitals, cx: &Context<'_>) -> String {
    let mut r = Registry::with_prefix("mastsub");

    let downloads = Family::<Labels, Gauge>::default();
    for state in DownloadState::ALL {
        downloads
            .get_or_create(&vec![("state", state.as_str().to_string())])
            .set(s.downloads.get(&state).copied().unwrap_or(0) as i64);
    }
    r.register(
        "downloads",
        "Download jobs by state (as status --json counts them)",
        downloads,
    );
    let waiting = Family::<Labels, Gauge>::default();
    waiting
        .get_or_create(&vec![("reason", "disk_space".to_string())])
        .set(s.waiting as i64);
    r.register(
        "downloads_waiting",
        "Queued jobs waiting for room on the disk (download.min_free_space)",
        waiting,
    );
    r.register_with_unit(
        "downloaded",
        "Bytes received from MAST since the daemon started (a resume counts only new bytes)",
        Unit::Bytes,
        counter(vitals.received.load(Ordering::Relaxed)),
    );
    r.register_with_unit(
        "published",
        "Bytes of the products published since the daemon started",
        Unit::Bytes,
        counter(vitals.published.load(Ordering::Relaxed)),
    );
    let (products, bytes) = (
        Family::<Labels, Counter>::default(),
        Family::<Labels, Counter>::default(),
    );
    for source in crate::store::Provenance::ALL {
        let p = vitals.published_from(source);
        let label = vec![("source", source.as_str().to_string())];
        products
            .get_or_create(&label)
            .inc_by(p.products.load(Ordering::Relaxed));
        bytes
            .get_or_create(&label)
            .inc_by(p.bytes.load(Ordering::Relaxed));
    }
    r.register(
        "products_published",
        "Products published since the daemon started, by where their bytes came from (cloud: the \
         open-data bucket, mast: MAST)",
        products,
    );
    r.register_with_unit(
        "source_published",
        "Bytes of the products published since the daemon started, by where they came from",
        Unit::Bytes,
        bytes,
    );
    r.register_with_unit(
        "downloads_done",
        "Bytes of every product on disk as recorded done (status's bytes_done)",
        Unit::Bytes,
        gauge(s.bytes_done as i64),
    );
    let events = Family::<Labels, Counter>::default();
    for (t, n) in &s.events {
        events
            .get_or_create(&vec![("event_type", label_value(&t.to_string()))])
            .inc_by(*n);
    }
    r.register("events", "Events recorded, by event type", events);
    let notices = Family::<Labels, Counter>::default();
    for (status, n) in &s.notices {
        notices
            .get_or_create(&vec![("status", status.as_str().to_string())])
            .inc_by(*n);
    }
    r.register(
        "notices",
        "Distinct notices recorded, by how they were taken",
        notices,
    );
    let attempts = Family::<Labels, Counter>::default();
    let a = &vitals.attempts;
    for (outcome, n) in [
        ("done", &a.done),
        ("retry", &a.retry),
        ("failed", &a.failed),
        ("needs_auth", &a.needs_auth),
    ] {
        attempts
            .get_or_create(&vec![("outcome", outcome.to_string())])
            .inc_by(n.load(Ordering::Relaxed));
    }
    r.register(
        "download_attempts",
        "Download attempts recorded since the daemon started, by how they ended",
        attempts,
    );
    let up = Family::<Labels, Gauge>::default();
    for source in cx.sources {
        let connected = s
            .sources
            .iter()
            .find(|h| h.source == *source)
            .is_some_and(|h| h.connected);
        up.get_or_create(&vec![("source", source.to_string())])
            .set(i64::from(connected));
    }
    r.register(
        "source_up",
        "1 while a configured source is connected (the inbox watched, the mailbox logged in)",
        up,
    );
    let hooks = Family::<Labels, Gauge>::default();
    for (state, n) in [
        ("pending", s.hooks.pending),
        ("running", s.hooks.running),
        ("done", s.hooks.done),
        ("failed", s.hooks.failed),
    ] {
        hooks
            .get_or_create(&vec![("state", state.to_string())])
            .set(n as i64);
    }
    r.register(
        "hook_runs",
        "Hook runs (on_product, on_notice) by state; failed: gave up after hooks.max_attempts",
        hooks,
    );
    let members = Family::<Labels, Gauge>::default();
    for state in ["up", "gone", "stopped"] {
        let n = s.members.iter().filter(|m| m.state == state).count();
        members
            .get_or_create(&vec![("state", state.to_string())])
            .set(n as i64);
    }
    r.register(
        "members",
        "Members of the cluster sharing this store by state (up; gone: not heard from for 3 leases; stopped)",
        members,
    );
    r.register(
        "hook_failed_attempts",
        "Hook attempts that failed (a non-zero exit, hooks.timeout), retried or not",
        counter(s.hooks.failed_attempts),
    );
    let age = s
        .oldest_queued_at
        .map_or(0.0, |t| (cx.now - t).max(0) as f64 / 1e3);
    r.register_with_unit(
        "oldest_queued_job_age",
        "How long the oldest queued job has been waiting (0 when none is queued)",
        Unit::Seconds,
        gauge_f(age),
    );
    r.register_with_unit(
        "last_notice_received_timestamp",
        "When a notice was last received, seconds since the epoch (0: never)",
        Unit::Seconds,
        gauge_f(s.last_notice_at.map_or(0.0, |t| t as f64 / 1e3)),
    );
    if let Some(d) = &s.daemon {
        r.register_with_unit(
            "start_timestamp",
            "When the daemon started, seconds since the epoch",
            Unit::Seconds,
            gauge_f(d.started_at as f64 / 1e3),
        );
    }
    if let Some(free) = cx.free {
        r.register_with_unit(
            "download_free",
            "Bytes free on the download file system",
            Unit::Bytes,
            gauge(i64::try_from(free).unwrap_or(i64::MAX)),
        );
    }
    r.register_with_unit(
        "download_min_free",
        "download.min_free_space: no body is written below this",
        Unit::Bytes,
        gauge(i64::try_from(cx.min_free).unwrap_or(i64::MAX)),
    );
    r.register(
        "download_max_rate_bytes_per_second",
        "download.max_rate, for all workers together (0: no cap)",
        gauge(
            cx.max_rate
                .map_or(0, |m| i64::try_from(m).unwrap_or(i64::MAX)),
        ),
    );
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}
