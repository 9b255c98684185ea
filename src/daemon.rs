//! The daemon: opens the store, starts the sources and the download pool, and runs until the shutdown
//! token is cancelled.
//!
//! Every loop runs under one [`CancellationToken`]; nothing lives only in memory, so a restart (or a kill -9)
//! loses nothing. A loop that stops unexpectedly is logged and started again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::download;
use crate::ingest::Ingestor;
use crate::service::{self, Vitals};
use crate::sources::imap::ImapSource;
use crate::sources::inbox;
use crate::store::{SqliteStore, Store};

/// Pause before a crashed source is started again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Runs the daemon until `shutdown` is cancelled; a new value on `reload` (SIGHUP) makes the loops read
/// their secrets again.
pub async fn run(
    config: Config,
    reload: tokio::sync::watch::Receiver<u64>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        "mastsub {} starting: database {}, downloads under {}",
        env!("CARGO_PKG_VERSION"),
        config.storage.database.display(),
        config.storage.downloads.display()
    );
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&config.storage.database).await?);
    let wake = Arc::new(Notify::new());
    let ingestor = Arc::new(Ingestor::new(store.clone(), &config).waking(wake.clone()));
    let config = Arc::new(config);
    let vitals = Arc::new(Vitals::default());

    let mut tasks: JoinSet<(Loop, anyhow::Result<()>)> = JoinSet::new();
    // Which loop each task runs, so that a panic restarts that loop alone.
    let mut loops: HashMap<tokio::task::Id, Loop> = HashMap::new();
    let start = |tasks: &mut JoinSet<(Loop, anyhow::Result<()>)>, which: Loop| {
        let token = shutdown.clone();
        let (vitals, reload) = (vitals.clone(), reload.clone());
        let handle = match which {
            Loop::Inbox => {
                let (cfg, ingestor) = (config.inbox.clone(), ingestor.clone());
                tasks.spawn(async move {
                    inbox::run(cfg, ingestor, vitals, token).await;
                    (Loop::Inbox, Ok(()))
                })
            }
            Loop::Mailer => {
                let (cfg, store) = (config.email.clone(), store.clone());
                tasks.spawn(async move {
                    crate::mailer::run(cfg, store, token).await;
                    (Loop::Mailer, Ok(()))
                })
            }
            Loop::Imap => {
                let source = ImapSource::new(config.imap.clone(), store.clone(), ingestor.clone());
                tasks.spawn(async move {
                    source.run(reload, token).await;
                    (Loop::Imap, Ok(()))
                })
            }
            Loop::Downloads => {
                let (cfg, store, wake) = (config.clone(), store.clone(), wake.clone());
                tasks.spawn(async move {
                    (
                        Loop::Downloads,
                        download::run(&cfg, store, wake, vitals, reload, token).await,
                    )
                })
            }
        };
        (handle.id(), which)
    };
    let mut wanted = vec![Loop::Downloads];
    if config.inbox.enabled {
        wanted.push(Loop::Inbox);
    } else {
        tracing::info!("inbox disabled (inbox.enabled = false)");
    }
    if config.imap.enabled {
        wanted.push(Loop::Imap);
    }
    if config.email.enabled {
        wanted.push(Loop::Mailer);
    }
    for which in wanted {
        let (id, which) = start(&mut tasks, which);
        loops.insert(id, which);
    }
    // The store is open and the sources run: ready, with a first status line; then kept current.
    if service::supervised() {
        let first = match store.status(0).await {
            Ok(s) => service::status_line(&s, 0.0),
            Err(_) => "started".to_string(),
        };
        service::ready(&first);
    }
    let notifier = tokio::spawn(service::run(
        store.clone(),
        vitals.clone(),
        shutdown.clone(),
    ));

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(ended) = tasks.join_next_with_id() => {
                if shutdown.is_cancelled() {
                    break;
                }
                let which = match ended {
                    Ok((id, (which, Ok(())))) => {
                        loops.remove(&id);
                        tracing::error!("the {which:?} loop stopped unexpectedly");
                        which
                    }
                    Ok((id, (which, Err(e)))) => {
                        loops.remove(&id);
                        tracing::error!("the {which:?} loop failed: {e:#}");
                        which
                    }
                    Err(e) => {
                        let Some(which) = loops.remove(&e.id()) else {
                            tracing::error!("a loop crashed: {e}; stopping so that the service manager restarts mastsub");
                            shutdown.cancel();
                            break;
                        };
                        // A panic (a bug): that loop alone starts again; the others go on.
                        tracing::error!("the {which:?} loop crashed: {e}");
                        which
                    }
                };
                tracing::info!("starting the {which:?} loop again in {}s", RESTART_PAUSE.as_secs());
                tokio::time::sleep(RESTART_PAUSE).await;
                let (id, which) = start(&mut tasks, which);
                loops.insert(id, which);
            }
        }
    }

    service::stopping();
    tracing::info!("shutting down");
    let _ = notifier.await;
    if tokio::time::timeout(config.download.drain_timeout, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!(
            "loops did not stop within download.drain_timeout ({}s); leaving them",
            config.download.drain_timeout.as_secs()
        );
        tasks.abort_all();
    }
    store.close().await;
    tracing::info!("mastsub stopped");
    Ok(())
}

/// The daemon's supervised loops.
#[derive(Debug, Clone, Copy)]
enum Loop {
    Inbox,
    Imap,
    Mailer,
    Downloads,
}
