//! The daemon: opens the store, starts the sources, and runs until the shutdown token is cancelled.
//!
//! Every loop runs under one [`CancellationToken`]; nothing lives only in memory, so a restart (or a kill -9)
//! loses nothing. A source that stops unexpectedly is logged and started again.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::Ingestor;
use crate::sources::inbox;
use crate::store::{SqliteStore, Store};

/// How long sources get to stop after the shutdown token fires.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Pause before a crashed source is started again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Runs the daemon until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(
        "mastsub {} starting: database {}, downloads under {}",
        env!("CARGO_PKG_VERSION"),
        config.storage.database.display(),
        config.storage.downloads.display()
    );
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.storage.database).await?);
    let ingestor = Arc::new(Ingestor::new(store.clone(), &config));

    let mut tasks = JoinSet::new();
    let start_inbox = |tasks: &mut JoinSet<&'static str>| {
        let (cfg, ingestor, token) = (config.inbox.clone(), ingestor.clone(), shutdown.clone());
        tasks.spawn(async move {
            inbox::run(cfg, ingestor, token).await;
            "inbox"
        });
    };
    if config.inbox.enabled {
        start_inbox(&mut tasks);
    } else {
        tracing::info!("inbox disabled (inbox.enabled = false)");
    }
    if config.imap.enabled {
        tracing::warn!(
            "[imap] is enabled but this build has no IMAP source yet; the mailbox is not read"
        );
    }

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(ended) = tasks.join_next() => {
                let what = match ended {
                    Ok(name) => format!("the {name} source stopped"),
                    Err(e) => format!("a source crashed: {e}"),
                };
                if shutdown.is_cancelled() {
                    break;
                }
                tracing::error!("{what}; starting it again in {}s", RESTART_PAUSE.as_secs());
                tokio::time::sleep(RESTART_PAUSE).await;
                start_inbox(&mut tasks);
            }
        }
    }

    tracing::info!("shutting down");
    if tokio::time::timeout(STOP_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "sources did not stop within {}s; leaving them",
            STOP_GRACE.as_secs()
        );
        tasks.abort_all();
    }
    store.close().await;
    tracing::info!("mastsub stopped");
    Ok(())
}
