//! The daemon: opens the store, starts the sources and the download pool, and runs until the shutdown
//! token is cancelled.
//!
//! Every loop runs under one [`CancellationToken`]; nothing lives only in memory, so a restart (or a kill -9)
//! loses nothing. A loop that stops unexpectedly is logged and started again.
//!
//! One daemon per database: the run lock (`<database>.run.lock`) is taken before the store opens and held
//! to the end. While it runs, the database file's identity is checked every [`IDENTITY_EVERY`]: a file
//! deleted, moved or replaced under the daemon stops it with an error (a non-zero exit, so that systemd's
//! `Restart=on-failure` starts it again on the file now at the path), since everything recorded from
//! then on would go into a file no one will read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cluster::Membership;
use crate::config::Config;
use crate::download;
use crate::ingest::Ingestor;
use crate::service::{self, Vitals};
use crate::sources::imap::ImapSource;
use crate::sources::inbox;
use crate::store::{RunLock, RunLockError, Store};

/// Pause before a crashed source is started again.
const RESTART_PAUSE: Duration = Duration::from_secs(1);
/// How often the database file's identity is checked.
pub const IDENTITY_EVERY: Duration = Duration::from_secs(2);

/// Runs the daemon until `shutdown` is cancelled; a new value on `reload` (SIGHUP) makes the loops read
/// their secrets again. An error: it could not start (another daemon holds the database, the store cannot
/// be opened), or it stopped on a fatal condition (the database file was replaced, a loop crashed beyond
/// repair), after stopping its loops.
pub async fn run(
    config: Config,
    reload: crate::config::Reload,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tracing::info!(
        "mastsub {} starting: database {}, downloads under {}",
        env!("CARGO_PKG_VERSION"),
        config.storage.database_shown(),
        config.storage.downloads.display()
    );
    // SQLite: one daemon per database file, by the run lock, taken before anything is opened and held (by
    // this binding) until the store is closed. PostgreSQL: many, each a member under its own name.
    let shared = crate::store::is_shared(&config.storage);
    let _run_lock = if shared {
        None
    } else {
        Some(
            RunLock::acquire(&config.storage.database, "run").map_err(|e| match e {
                e @ RunLockError::Held { .. } => anyhow::anyhow!(
                    "{e}; stop it first (systemctl stop mastsub) or point this one at another [storage] \
                     database"
                ),
                e => e.into(),
            })?,
        )
    };
    let store: Arc<dyn Store> = crate::store::open(&config.storage).await?;
    let node = config.cluster.node_name();
    let membership = Membership::join(
        store.clone(),
        node.clone(),
        download::owner_name(&node),
        config.download.lease,
        !shared,
    )
    .await?;
    if shared {
        tracing::info!(
            "cluster member {node:?}: jobs, the mailbox, mail and hooks are shared with the other members \
             of this database"
        );
    }
    store.queue_product_hooks(config.hooks.on_product.is_some());
    if config.hooks.on_notice.is_none()
        && let Err(e) = store
            .notice_hooks_since(false, crate::store::now_ms())
            .await
    {
        tracing::warn!("cannot record that hooks.on_notice is not set: {e}");
    }
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
                let claim_as = shared.then(|| (node.clone(), config.download.lease));
                tasks.spawn(async move {
                    inbox::run(cfg, claim_as, ingestor, vitals, token).await;
                    (Loop::Inbox, Ok(()))
                })
            }
            // Mail, the mailbox and hooks: one member of the cluster at a time, the leader of each.
            Loop::Mailer => {
                let (cfg, store) = (config.email.clone(), store.clone());
                let member = membership.clone();
                tasks.spawn(async move {
                    member
                        .lead("mail", token, move |stop| {
                            crate::mailer::run(cfg.clone(), store.clone(), stop)
                        })
                        .await;
                    (Loop::Mailer, Ok(()))
                })
            }
            Loop::Imap => {
                let (cfg, store, ingestor) = (config.imap.clone(), store.clone(), ingestor.clone());
                let member = membership.clone();
                tasks.spawn(async move {
                    member
                        .lead("imap", token, move |stop| {
                            let source =
                                ImapSource::new(cfg.clone(), store.clone(), ingestor.clone());
                            let reload = reload.clone();
                            async move { source.run(reload, stop).await }
                        })
                        .await;
                    (Loop::Imap, Ok(()))
                })
            }
            Loop::Hooks => {
                let (cfg, root, store) = (
                    config.hooks.clone(),
                    config.storage.downloads.clone(),
                    store.clone(),
                );
                let member = membership.clone();
                tasks.spawn(async move {
                    member
                        .lead("hooks", token, move |stop| {
                            crate::hooks::run(
                                cfg.clone(),
                                root.clone(),
                                store.clone(),
                                vitals.clone(),
                                stop,
                            )
                        })
                        .await;
                    (Loop::Hooks, Ok(()))
                })
            }
            Loop::Http => {
                let (cfg, store) = (config.clone(), store.clone());
                tasks.spawn(async move {
                    crate::http::run(cfg, store, vitals, reload, token).await;
                    (Loop::Http, Ok(()))
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
    if config.http.enabled {
        wanted.push(Loop::Http);
    }
    if config.hooks.on_product.is_some() || config.hooks.on_notice.is_some() {
        wanted.push(Loop::Hooks);
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
    let mut beat = tokio::spawn(membership.clone().beat(vitals.clone(), shutdown.clone()));
    let notifier = tokio::spawn(service::run(
        store.clone(),
        vitals.clone(),
        shutdown.clone(),
    ));

    // Why the daemon stops on its own, if it does: the exit is then an error.
    let mut fatal: Option<anyhow::Error> = None;
    let mut identity = tokio::time::interval(IDENTITY_EVERY);
    identity.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            ended = &mut beat => {
                let e = match ended {
                    // It ends by itself on the shutdown this loop has not seen yet.
                    Ok(Ok(())) if shutdown.is_cancelled() => break,
                    Ok(Ok(())) => anyhow::anyhow!("the cluster heartbeat stopped unexpectedly"),
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::anyhow!("the cluster heartbeat crashed: {e}"),
                };
                tracing::error!("{e:#}");
                fatal = Some(e);
                shutdown.cancel();
                break;
            }
            _ = identity.tick() => {
                if let Err(e) = store.check_identity().await {
                    tracing::error!("{e}");
                    fatal = Some(e.into());
                    shutdown.cancel();
                    break;
                }
            }
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
                            fatal = Some(anyhow::anyhow!("a loop crashed: {e}"));
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
    if !beat.is_finished() {
        // It records that this member stopped, and gives up its leases.
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut beat).await;
    }
    store.close().await;
    match fatal {
        Some(e) => {
            tracing::info!("mastsub stopped on an error");
            Err(e)
        }
        None => {
            tracing::info!("mastsub stopped");
            Ok(())
        }
    }
}

/// The daemon's supervised loops.
#[derive(Debug, Clone, Copy)]
enum Loop {
    Inbox,
    Imap,
    Mailer,
    Http,
    Hooks,
    Downloads,
}
