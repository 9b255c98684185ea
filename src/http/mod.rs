//! The HTTP endpoint (`[http]`): `GET /metrics` (Prometheus), `GET /api/status` (what `status --json`
//! prints), `GET /` (the status page for people); any other path is 404.
//!
//! Off unless `http.enabled`, and bound only to `http.listen` (loopback by default). Read-only: every
//! answer is built from the store's status snapshot and the daemon's counters, and none carries a
//! secret (the status snapshot holds no token or password). A port that cannot be bound is logged and
//! tried again every [`BIND_RETRY`]; the rest of the daemon goes on meanwhile.

pub mod metrics;
pub mod page;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::service::Vitals;
use crate::status::{RECENT_FAILURES, StatusReport};
use crate::store::{StatusSnapshot, Store, now_ms};

/// Pause before binding again after a failure.
pub const BIND_RETRY: Duration = Duration::from_secs(10);

/// What the handlers read.
struct Shared {
    store: Arc<dyn Store>,
    vitals: Arc<Vitals>,
    config: Arc<Config>,
    /// `download.max_rate` as now in force (SIGHUP may change it).
    reload: crate::config::Reload,
}

/// Serves until `shutdown`.
pub async fn run(
    config: Arc<Config>,
    store: Arc<dyn Store>,
    vitals: Arc<Vitals>,
    reload: crate::config::Reload,
    shutdown: CancellationToken,
) {
    let listen = config.http.listen;
    let shared = Arc::new(Shared {
        store,
        vitals,
        config,
        reload,
    });
    let app = Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics_text))
        .route("/api/status", get(api_status))
        .fallback(not_found)
        .with_state(shared);
    loop {
        match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => {
                let at = listener.local_addr().unwrap_or(listen);
                tracing::info!(
                    "serving the status page on http://{at}/ (and /metrics, /api/status)"
                );
                let stop = shutdown.clone();
                if let Err(e) = axum::serve(listener, app.clone())
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
                {
                    tracing::error!("the HTTP endpoint on {at} stopped: {e}");
                }
                if shutdown.is_cancelled() {
                    return;
                }
            }
            Err(e) => tracing::error!(
                "cannot listen on {listen} (http.listen): {e}; is another program (or another mastsub) \
                 using it? Trying again in {}s; downloads go on",
                BIND_RETRY.as_secs()
            ),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(BIND_RETRY) => {}
        }
    }
}

impl Shared {
    async fn snapshot(&self, recent: usize) -> Result<StatusSnapshot, Response> {
        let mut snap = self.store.status(recent).await.map_err(|e| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                format!("mastsub cannot read its database: {e}\n"),
            )
                .into_response()
        })?;
        crate::status::judge_members(
            &mut snap,
            self.config.download.lease,
            crate::store::now_ms(),
        );
        Ok(snap)
    }

    /// Free bytes on the download file system.
    fn free(&self) -> Option<u64> {
        crate::fsutil::space_of(&self.config.storage.downloads).map(|(free, _)| free)
    }

    fn max_rate(&self) -> Option<crate::config::Rate> {
        self.reload.borrow().download.max_rate
    }
}

async fn status_page(State(s): State<Arc<Shared>>) -> Response {
    let snap = match s.snapshot(RECENT_FAILURES).await {
        Ok(snap) => snap,
        Err(e) => return e,
    };
    let live = s.vitals.live.lock().map(|m| m.clone()).unwrap_or_default();
    let body = page::render(
        &snap,
        &page::Extra {
            live: &live,
            max_rate: s.max_rate().map(|r| r.to_string()),
            free: s.free(),
            now: now_ms(),
        },
    );
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

async fn api_status(State(s): State<Arc<Shared>>) -> Response {
    let snap = match s.snapshot(RECENT_FAILURES).await {
        Ok(snap) => snap,
        Err(e) => return e,
    };
    let report = StatusReport {
        database: s.config.storage.database_shown(),
        snapshot: &snap,
    };
    match serde_json::to_string_pretty(&report) {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body + "\n",
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn metrics_text(State(s): State<Arc<Shared>>) -> Response {
    let snap = match s.snapshot(0).await {
        Ok(snap) => snap,
        Err(e) => return e,
    };
    let mut sources = Vec::new();
    if s.config.inbox.enabled {
        sources.push("inbox");
    }
    if s.config.imap.enabled {
        sources.push("imap");
    }
    let body = metrics::render(
        &snap,
        &s.vitals,
        &metrics::Context {
            sources: &sources,
            free: s.free(),
            min_free: s.config.download.min_free_space.as_u64(),
            max_rate: s.max_rate().map(|r| r.0),
            now: now_ms(),
        },
    );
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "not found: mastsub serves / (the status page), /metrics and /api/status\n",
    )
        .into_response()
}
