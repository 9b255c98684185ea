//! Log output: journal-friendly under systemd, coloured on a terminal, JSON on request.

use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

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
        // The journal stamps every line itself and takes the level from a `<N>` priority prefix.
        LogFormat::Auto if std::env::var_os("JOURNAL_STREAM").is_some() => builder
            .with_ansi(false)
            .event_format(Journal(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false)
                    .with_target(false)
                    .with_ansi(false),
            ))
            .try_init(),
        LogFormat::Auto | LogFormat::Pretty => builder.with_ansi(terminal).try_init(),
    };
}

/// The syslog priority journald reads from a `<N>` line prefix (sd-daemon(3)).
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Lines for the journal: the priority as a prefix, then the plain line (no time: the journal adds it).
struct Journal<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journal<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_syslog_priorities() {
        assert_eq!(
            [Level::ERROR, Level::WARN, Level::INFO, Level::DEBUG].map(|l| priority(&l)),
            [3, 4, 6, 7]
        );
    }
}
