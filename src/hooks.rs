//! `[hooks]`: the operator's own commands, run when products land (`on_product`) and when every download
//! of a notice has ended (`on_notice`), like aria2's `--on-download-complete`.
//!
//! Durable: an `on_product` run is queued in the store in the transaction that records the product done
//! (`Store::queue_product_hooks`), an `on_notice` run by this loop once the notice's downloads have all
//! ended. This loop claims due runs, at most `hooks.concurrency` at once, and runs each through `sh -c`
//! in a process group of its own, with the `MASTSUB_*` variables in its environment and its output in
//! the log, tagged with the product or notice. A non-zero exit (or `hooks.timeout`, which kills the whole
//! group) is a failed attempt, retried after `hooks.retry_initial`, doubling, until
//! `hooks.max_attempts`; then the run is `failed`, which `status` and the metrics show. A run the daemon
//! was killed in is run again at the next start: hooks run at least once. Downloads never wait for a
//! hook: the pool only writes the row.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::HooksConfig;
use crate::service::Vitals;
use crate::store::{HookEnd, HookKind, HookRun, Store, now_ms};

/// The longest nap between looks at the store (notices whose downloads ended, runs come due).
const LOOK_EVERY: Duration = Duration::from_secs(2);
/// The longest delay between attempts of a run.
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// Output read after the shell has exited, at most; a process of the hook's group still holding the pipe
/// then is sent SIGTERM.
const OUTPUT_GRACE: Duration = Duration::from_millis(500);
/// The longest line of a hook's output taken into the log; the rest of it is cut.
const LINE_MAX: usize = 4096;

/// How one attempt ended.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure(String),
    Interrupted,
}

/// Runs the hooks until `shutdown`. Runs in progress at shutdown are stopped (their process groups
/// sent SIGTERM, then SIGKILL) and run again at the next start.
pub async fn run(
    cfg: HooksConfig,
    downloads: PathBuf,
    store: Arc<dyn Store>,
    vitals: Arc<Vitals>,
    shutdown: CancellationToken,
) {
    let root = std::path::absolute(&downloads).unwrap_or(downloads);
    let cfg = Arc::new(cfg);
    match store.requeue_hook_runs(now_ms(), true).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            "{n} hook run(s) were interrupted when mastsub last stopped; running them again"
        ),
        Err(e) => tracing::error!("cannot look for interrupted hook runs: {e}"),
    }
    let since = match &cfg.on_notice {
        Some(_) => match store.notice_hooks_since(true, now_ms()).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(
                    "cannot read since when hooks.on_notice is set: {e}; it runs for no notice until mastsub restarts"
                );
                None
            }
        },
        None => None,
    };
    tracing::info!(
        "hooks: {}{}, {} at once",
        if cfg.on_product.is_some() {
            "on_product set"
        } else {
            "no on_product"
        },
        if since.is_some() {
            ", on_notice set"
        } else {
            ""
        },
        cfg.concurrency
    );
    let stop_runs = CancellationToken::new();
    let mut running: JoinSet<()> = JoinSet::new();
    // Notices are looked at once per LOOK_EVERY at most, however often the recorder wakes this loop:
    // the look reads the notices' jobs, and must not come with every batch of downloads recorded.
    let mut notices_looked: Option<tokio::time::Instant> = None;
    loop {
        let mut trouble = false;
        if let Some(since) = since
            && notices_looked.is_none_or(|at| at.elapsed() >= LOOK_EVERY)
        {
            notices_looked = Some(tokio::time::Instant::now());
            match store.queue_notice_hooks(since, now_ms()).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!("{n} notice(s) ended: on_notice queued"),
                Err(e) => {
                    tracing::error!("cannot queue on_notice runs: {e}");
                    trouble = true;
                }
            }
        }
        let free = cfg.concurrency.saturating_sub(running.len());
        // A read first: claiming is a write, and most wakes find nothing due.
        let due = match store.next_hook_due().await {
            Ok(at) => at,
            Err(e) => {
                tracing::error!("cannot look for hook runs: {e}");
                trouble = true;
                None
            }
        };
        if free > 0 && due.is_some_and(|at| at <= now_ms()) {
            match store.claim_hook_runs(free, now_ms()).await {
                Ok(runs) => {
                    for run in runs {
                        let (cfg, store, root, stop) =
                            (cfg.clone(), store.clone(), root.clone(), stop_runs.clone());
                        running
                            .spawn(async move { attempt(&cfg, &store, &root, run, &stop).await });
                    }
                }
                Err(e) => {
                    tracing::error!("cannot claim hook runs: {e}");
                    trouble = true;
                }
            }
        }
        let mut nap = LOOK_EVERY;
        if let Some(at) = due
            && !trouble
            && running.len() < cfg.concurrency
        {
            // Never a nap of zero: a run due now was just claimed, or could not be (store trouble).
            nap = nap.min(Duration::from_millis((at - now_ms()).max(10) as u64));
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = vitals.hooks_wake.notified(), if !trouble => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = tokio::time::sleep(nap) => {}
        }
    }
    stop_runs.cancel();
    while running.join_next().await.is_some() {}
}

/// One attempt of `run`, and its end recorded.
async fn attempt(
    cfg: &HooksConfig,
    store: &Arc<dyn Store>,
    root: &Path,
    mut run: HookRun,
    stop: &CancellationToken,
) {
    let command = match run.kind {
        HookKind::OnProduct => cfg.on_product.clone(),
        HookKind::OnNotice => cfg.on_notice.clone(),
    };
    let key = run.kind.key();
    let Some(command) = command else {
        // Queued while the hook was set, and unset since: nothing to run.
        tracing::info!(
            "hooks.{key} is no longer set: the run for {} is dropped",
            run.about
        );
        let _ = store.end_hook_run(run.id, &HookEnd::Done, now_ms()).await;
        return;
    };
    if run.kind == HookKind::OnProduct {
        for (k, v) in run.env.iter_mut() {
            if k == "MASTSUB_PATH" {
                *v = root.join(v.as_str()).display().to_string();
            }
        }
    }
    let tag = format!("hooks.{key} for {}", run.about);
    tracing::info!("{tag}: running (attempt {})", run.attempt);
    let outcome = execute(&command, &run.env, cfg.timeout, &tag, stop).await;
    let now = now_ms();
    let end = match outcome {
        Outcome::Success => {
            tracing::info!("{tag}: done");
            HookEnd::Done
        }
        Outcome::Interrupted => {
            tracing::info!("{tag}: stopped for shutdown; it runs again at the next start");
            HookEnd::Interrupted
        }
        Outcome::Failure(error) if run.attempt < i64::from(cfg.max_attempts) => {
            let delay = retry_delay(cfg, run.attempt);
            tracing::warn!(
                "{tag}: {error} (attempt {} of {}); trying again in {}",
                run.attempt,
                cfg.max_attempts,
                humantime::format_duration(delay)
            );
            HookEnd::Retry {
                at: now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2),
                error,
            }
        }
        Outcome::Failure(error) => {
            tracing::error!(
                "{tag}: {error}; gave up after {} attempt(s) (hooks.max_attempts); status lists it",
                run.attempt
            );
            HookEnd::Failed {
                error: format!("{error} ({} attempts)", run.attempt),
            }
        }
    };
    if let Err(e) = store.end_hook_run(run.id, &end, now).await {
        tracing::error!("{tag}: cannot record how it ended: {e}; it runs again at the next start");
    }
}

/// `retry_initial`, doubling with each failed attempt, at most an hour.
fn retry_delay(cfg: &HooksConfig, attempt: i64) -> Duration {
    let doublings = u32::try_from(attempt.max(1) - 1)
        .unwrap_or(u32::MAX)
        .min(20);
    cfg.retry_initial
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(RETRY_MAX.max(cfg.retry_initial))
}

/// Runs `command` through `sh -c` in a process group of its own; its output lines go to the log.
async fn execute(
    command: &str,
    env: &[(String, String)],
    timeout: Duration,
    tag: &str,
    stop: &CancellationToken,
) -> Outcome {
    let mut cmd = tokio::process::Command::new("sh");
    // The daemon's own overrides and token stay with it (they may hold secrets); the hook gets its
    // MASTSUB_* variables alone.
    for (name, _) in std::env::vars_os() {
        let n = name.to_string_lossy();
        if n.starts_with("MASTSUB_") || n == "MAST_API_TOKEN" {
            cmd.env_remove(&name);
        }
    }
    let mut child = match cmd
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Outcome::Failure(format!("cannot start sh: {e}")),
    };
    let group = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
    let mut output = JoinSet::new();
    if let Some(out) = child.stdout.take() {
        output.spawn(log_lines(out, tag.to_string(), false));
    }
    if let Some(err) = child.stderr.take() {
        output.spawn(log_lines(err, tag.to_string(), true));
    }
    let kill = |signal| {
        if let Some(g) = group {
            // The whole group: the shell and whatever it started.
            let _ = nix::sys::signal::killpg(g, signal);
        }
    };
    let outcome = tokio::select! {
        status = child.wait() => match status {
            Ok(s) if s.success() => Outcome::Success,
            Ok(s) => Outcome::Failure(match (s.code(), std::os::unix::process::ExitStatusExt::signal(&s)) {
                (Some(code), _) => format!("exited with status {code}"),
                (None, Some(sig)) => format!("was killed by signal {sig}"),
                _ => format!("ended: {s}"),
            }),
            Err(e) => Outcome::Failure(format!("cannot wait for it: {e}")),
        },
        _ = tokio::time::sleep(timeout) => {
            kill(nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait().await;
            Outcome::Failure(format!(
                "still running after hooks.timeout ({}): its process group was killed",
                humantime::format_duration(timeout)
            ))
        }
        _ = stop.cancelled() => {
            kill(nix::sys::signal::Signal::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(2), child.wait()).await.is_err() {
                kill(nix::sys::signal::Signal::SIGKILL);
                let _ = child.wait().await;
            }
            Outcome::Interrupted
        }
    };
    // What it printed last. A process it left behind still holding the pipe is ended with the rest of
    // its group: a hook is its process group, as a service is its cgroup.
    if tokio::time::timeout(OUTPUT_GRACE, async {
        while output.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        kill(nix::sys::signal::Signal::SIGTERM);
    }
    outcome
}

async fn log_lines<R: tokio::io::AsyncRead + Unpin>(from: R, tag: String, stderr: bool) {
    let say = |line: &[u8], cut: bool| {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        let more = if cut { " …" } else { "" };
        if stderr {
            tracing::warn!("{tag}: {text}{more}");
        } else {
            tracing::info!("{tag}: {text}{more}");
        }
    };
    // Lines are read a buffer at a time, and a line longer than LINE_MAX is cut: a hook that prints
    // without newlines cannot make the daemon hold all of it.
    let mut reader = BufReader::new(from);
    let mut line: Vec<u8> = Vec::new();
    let mut skipping = false;
    loop {
        let buf = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(b) => b,
        };
        let (taken, ended) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        if !skipping {
            let room = LINE_MAX.saturating_sub(line.len());
            let part = &buf[..taken.min(room)];
            line.extend_from_slice(part.strip_suffix(b"\n").unwrap_or(part));
            if taken > room {
                say(&line, true);
                line.clear();
                skipping = !ended;
            }
        }
        reader.consume(taken);
        if ended {
            if !skipping && !line.is_empty() {
                say(&line, false);
            }
            line.clear();
            skipping = false;
        }
    }
    if !line.is_empty() {
        say(&line, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_from_the_first_delay_up_to_an_hour() {
        let cfg = HooksConfig {
            retry_initial: Duration::from_secs(30),
            ..HooksConfig::default()
        };
        assert_eq!(retry_delay(&cfg, 1), Duration::from_secs(30));
        assert_eq!(retry_delay(&cfg, 2), Duration::from_secs(60));
        assert_eq!(retry_delay(&cfg, 4), Duration::from_secs(240));
        assert_eq!(retry_delay(&cfg, 40), RETRY_MAX);
    }

    #[tokio::test]
    async fn a_hook_that_hangs_is_killed_with_its_whole_group_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The shell starts a grandchild that would outlive it, and waits.
        let command = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let began = std::time::Instant::now();
        let outcome = execute(
            &command,
            &[],
            Duration::from_secs(2),
            "test",
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(&outcome, Outcome::Failure(e) if e.contains("hooks.timeout")),
            "{outcome:?}"
        );
        assert!(began.elapsed() < Duration::from_secs(10));
        assert!(
            pidfile.exists(),
            "the hook did not start its grandchild within the timeout"
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The grandchild is gone too (reaped by init, or a zombie for a moment).
        let mut gone = false;
        for _ in 0..50 {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if state.is_empty() || state.split(' ').nth(2) == Some("Z") {
                gone = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone, "the hook's grandchild {pid} outlived the timeout");
    }

    #[tokio::test]
    async fn the_exit_status_and_the_environment_reach_the_outcome() {
        let env = vec![("MASTSUB_DONE".to_string(), "3".to_string())];
        let ok = execute(
            "test \"$MASTSUB_DONE\" = 3",
            &env,
            Duration::from_secs(10),
            "t",
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(ok, Outcome::Success);
        let failed = execute(
            "exit 7",
            &env,
            Duration::from_secs(10),
            "t",
            &CancellationToken::new(),
        )
        .await;
        assert_eq!(failed, Outcome::Failure("exited with status 7".into()));
    }
}
