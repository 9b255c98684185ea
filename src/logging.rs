//! Log output: journal-friendly under systemd, coloured on a terminal, JSON on request.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber, writing to standard error. `level` overrides `config.level` (one-shot
/// commands print their own results and log only errors unless asked). `RUST_LOG`, when set, wins over both.
pub fn init(config: &LogConfig, level: Option<&str>) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(level.unwrap_or(&config.level)).ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
        // async-imap traces every command it sends, LOGIN and AUTHENTICATE included: never below info.
        .add_directive(
            "async_imap=info"
                .parse()
                .expect("a valid directive for async_imap"),
        );
    let terminal = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // Errors mean a subscriber is installed already (tests calling twice); keep the first.
    let _ = match config.format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        // The journal stamps every line itself and shows the level as the priority.
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => {
            builder.without_time().with_ansi(false).try_init()
        }
        LogFormat::Auto | LogFormat::Pretty => builder.with_ansi(terminal).try_init(),
    };
}
