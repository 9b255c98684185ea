//! The command line of the public contract: `run`, `ingest`, `status`, `list`, `retry`, `check-config`.
//!
//! Exit codes: 0 success; 1 `ingest` refused all or part of a notice, or could not read a file; 2 the
//! configuration or the command line is wrong, or the work could not be done (database unavailable).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ingest::{IngestError, Ingestor};
use crate::status::{self, StatusReport};
use crate::store::{DownloadState, NoticeStatus, SourceKind, Store};

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "mastsub",
    version,
    about = "Turns MAST data-notification notices into verified downloads"
)]
pub struct Cli {
    /// Configuration file (default: /etc/mastsub/mastsub.toml if it exists, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log at info level in one-shot commands (they print their own results and log errors only).
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: watch the sources and record notices; SIGTERM or Ctrl-C stops it cleanly.
    Run,
    /// Record notice files now; exit 0 if all were accepted, 1 if any part was refused.
    Ingest {
        /// Notice files (JSON arrays of MAST events).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Counts by state and event type, bytes done, recent failures.
    Status {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// List download jobs.
    List {
        /// Only jobs in this state: queued, running, done, failed, needs_auth.
        #[arg(long, value_parser = parse_state, value_name = "STATE")]
        state: Option<DownloadState>,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Queue failed or token-waiting downloads again, with fresh attempts.
    Retry {
        /// Every `failed` and `needs_auth` job.
        #[arg(long, conflicts_with = "ids", required_unless_present = "ids")]
        all_failed: bool,
        /// These job ids (see `mastsub list`).
        #[arg(value_name = "ID")]
        ids: Vec<i64>,
    },
    /// Download the products of notice files now, like astroquery's download_products: progress, then a
    /// manifest; exit 0 if every product selected is COMPLETE, 1 otherwise. A re-run resumes.
    Download(crate::oneshot::Args),
    /// Print the effective configuration with secrets redacted; exit non-zero if it is invalid.
    CheckConfig,
}

fn parse_state(s: &str) -> Result<DownloadState, String> {
    DownloadState::parse(s).ok_or_else(|| {
        let all: Vec<_> = DownloadState::ALL.iter().map(|s| s.as_str()).collect();
        format!("expected one of {}", all.join(", "))
    })
}

/// Runs a parsed command line; returns the process exit code.
pub fn main(cli: Cli) -> ExitCode {
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mastsub: {e}");
            return ExitCode::from(2);
        }
    };
    let one_shot_level = (!cli.verbose).then_some("error");
    let daemon = matches!(cli.command, Command::Run);
    crate::logging::init(&config.log, if daemon { None } else { one_shot_level });

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mastsub: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run => run(config, cli.config).await,
            Command::Ingest { files } => ingest(config, files).await,
            Command::Status { json } => show_status(config, json).await,
            Command::List { state, json } => list(config, state, json).await,
            Command::Retry { all_failed, ids } => retry(config, all_failed, ids).await,
            Command::Download(args) => crate::oneshot::run(config, args).await,
            Command::CheckConfig => {
                print!("{}", config.to_redacted_toml());
                println!("# configuration is valid");
                Ok(ExitCode::SUCCESS)
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            // The daemon's log (the journal) gets it too; a command's log is this same terminal.
            if daemon {
                tracing::error!("{e:#}");
            }
            eprintln!("mastsub: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(config: Config, file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        wait_for_stop_signal().await;
        tracing::info!("stop requested");
        signals.cancel();
    });
    // SIGHUP: read the configuration again: the secrets (token and password files) and
    // `download.max_rate` take effect without a restart.
    let (reload_tx, reload) = tokio::sync::watch::channel(Arc::new(config.clone()));
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    match Config::load(file.as_deref()) {
                        Ok(c) => {
                            tracing::info!(
                                "SIGHUP: configuration and secrets read again (download.max_rate and \
                                 the secrets take effect now, other keys at the next start)"
                            );
                            reload_tx.send_replace(Arc::new(c));
                        }
                        Err(e) => {
                            tracing::error!(
                                "SIGHUP: {e}; keeping the configuration in use, reading the secrets again"
                            );
                            reload_tx.send_modify(|_| {});
                        }
                    }
                }
            });
        }
        Err(e) => {
            tracing::warn!("cannot listen for SIGHUP ({e}); secrets are read at start-up only")
        }
    }
    crate::daemon::run(config, reload, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT or SIGTERM.
async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!("cannot listen for SIGTERM ({e}); only Ctrl-C stops the daemon");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(crate::store::open(&config.storage).await?)
}

/// For commands that only read: never creates or migrates the database.
async fn open_store_read_only(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(crate::store::open_read_only(&config.storage).await?)
}

async fn ingest(config: Config, files: Vec<PathBuf>) -> anyhow::Result<ExitCode> {
    let store = open_store(&config).await?;
    let ingestor = Ingestor::new(store.clone(), &config);
    let mut all_accepted = true;
    let mut failed = false;
    for file in &files {
        match ingestor.ingest_file(file, SourceKind::Cli).await {
            Ok(report) if report.is_accepted() => {
                println!("accepted {}: {}", file.display(), report.summary());
            }
            Ok(report) => {
                all_accepted = false;
                match report.status {
                    NoticeStatus::Partial => {
                        println!("partly rejected {}: {}", file.display(), report.summary())
                    }
                    _ => println!("rejected {}", file.display()),
                }
                for line in report.error_lines() {
                    eprintln!("  {line}");
                }
            }
            Err(e @ IngestError::Read { .. }) => {
                all_accepted = false;
                eprintln!("mastsub: {e}");
            }
            Err(e) => {
                failed = true;
                eprintln!("mastsub: {}: {e}", file.display());
            }
        }
    }
    store.close().await;
    Ok(match (failed, all_accepted) {
        (true, _) => ExitCode::from(2),
        (false, true) => ExitCode::SUCCESS,
        (false, false) => ExitCode::from(1),
    })
}

async fn show_status(config: Config, json: bool) -> anyhow::Result<ExitCode> {
    let store = open_store_read_only(&config).await?;
    let mut snapshot = store.status(status::RECENT_FAILURES).await?;
    store.close().await;
    status::judge_members(&mut snapshot, config.download.lease, crate::store::now_ms());
    let database = config.storage.database_shown();
    if json {
        let report = StatusReport {
            database,
            snapshot: &snapshot,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status::render_text(&database, &snapshot));
    }
    Ok(ExitCode::SUCCESS)
}

async fn list(
    config: Config,
    state: Option<DownloadState>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let store = open_store_read_only(&config).await?;
    let rows = store.list_downloads(state).await?;
    store.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", status::render_list(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

async fn retry(config: Config, all_failed: bool, ids: Vec<i64>) -> anyhow::Result<ExitCode> {
    let store = open_store(&config).await?;
    let now = chrono::Utc::now().timestamp_millis();
    let n = store
        .retry((!all_failed).then_some(ids.as_slice()), now)
        .await?;
    store.close().await;
    println!("{n} download(s) queued again");
    Ok(ExitCode::SUCCESS)
}
