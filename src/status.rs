//! What `status` and `list` print: for a terminal, and as JSON for scripts.
//!
//! The JSON shape of `status --json` is part of the public contract: `downloads` (every state), `events`
//! (every type), `bytes_done`, plus `notices` and `recent_failures`.

use std::fmt::Write as _;

use serde::Serialize;

use crate::store::{DownloadRow, DownloadState, StatusSnapshot};

/// How many failures `status` lists.
pub const RECENT_FAILURES: usize = 10;

/// The `status --json` document.
#[derive(Debug, Serialize)]
pub struct StatusReport<'a> {
    /// The database it was read from.
    pub database: String,
    /// The counts.
    #[serde(flatten)]
    pub snapshot: &'a StatusSnapshot,
}

/// `status` for a terminal.
pub fn render_text(database: &str, s: &StatusSnapshot) -> String {
    let mut out = format!("mastsub status ({database})\n");
    let now = crate::store::now_ms();
    match &s.daemon {
        Some(d) if now - d.updated_at <= DAEMON_SILENT_AFTER_MS => {
            let _ = writeln!(
                out,
                "  daemon:     running (pid {}, up {}), receiving {}/s",
                d.pid,
                human_age(now - d.started_at),
                human_bytes(d.rate as u64)
            );
        }
        Some(d) => {
            let _ = writeln!(
                out,
                "  daemon:     not running (last seen {} ago, pid {})",
                human_age(now - d.updated_at),
                d.pid
            );
        }
        None => out.push_str("  daemon:     never ran on this database\n"),
    }
    if s.members.len() > 1 || s.members.iter().any(|m| !m.leads.is_empty()) {
        out.push_str(&render_members(&s.members, now));
    }
    let counts = |pairs: Vec<(String, u64)>| {
        pairs
            .into_iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        out,
        "  downloads:  {}",
        counts(
            s.downloads
                .iter()
                .map(|(k, n)| (k.to_string(), *n))
                .collect()
        )
    );
    let _ = writeln!(
        out,
        "  events:     {}",
        counts(s.events.iter().map(|(k, n)| (k.to_string(), *n)).collect())
    );
    let _ = writeln!(
        out,
        "  notices:    {}",
        counts(
            s.notices
                .iter()
                .map(|(k, n)| (k.as_str().to_string(), *n))
                .collect()
        )
    );
    let _ = writeln!(out, "  bytes done: {}", human_bytes(s.bytes_done));
    if s.waiting > 0 {
        let _ = writeln!(
            out,
            "  waiting:    {} download(s) for room on the disk: {}",
            s.waiting,
            s.waiting_reason.as_deref().unwrap_or("")
        );
    }
    out.push_str("  by event type:  queued running done failed needs_auth\n");
    for (t, states) in &s.by_event_type {
        let n = |st| states.get(&st).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "    {:<11} {:>7} {:>7} {:>4} {:>6} {:>10}",
            t.to_string(),
            n(DownloadState::Queued),
            n(DownloadState::Running),
            n(DownloadState::Done),
            n(DownloadState::Failed),
            n(DownloadState::NeedsAuth)
        );
    }
    for h in &s.sources {
        let ago = |at: Option<i64>| {
            at.map(|t| format!("{} ago", human_age(now - t)))
                .unwrap_or_else(|| "never".into())
        };
        let _ = writeln!(
            out,
            "  {}: {}{} ({}), last contact {}, {} {} taken",
            h.source,
            h.state,
            if h.connected { ", connected" } else { "" },
            h.detail.as_deref().unwrap_or("-"),
            ago(h.last_contact),
            h.taken,
            if h.source == "imap" {
                "mail(s)"
            } else {
                "notice(s)"
            }
        );
        if let Some(e) = &h.last_error {
            let _ = writeln!(out, "    last error ({}): {e}", ago(h.last_error_at));
        }
    }
    let h = &s.hooks;
    if h.pending + h.running + h.done + h.failed > 0 {
        let _ = writeln!(
            out,
            "  hooks:      {} pending, {} running, {} done, {} failed ({} failed attempt(s) in all)",
            h.pending, h.running, h.done, h.failed, h.failed_attempts
        );
        for f in &h.recent_failures {
            let _ = writeln!(
                out,
                "    {} run #{} {} for {} (attempt {}): {}",
                f.kind,
                f.id,
                f.standing(),
                f.about,
                f.attempts,
                f.error
            );
        }
    }
    if s.recent_failures.is_empty() {
        out.push_str("  recent failures: none\n");
    } else {
        out.push_str("  recent failures (newest first):\n");
        for f in &s.recent_failures {
            let _ = writeln!(
                out,
                "    #{} {} {} program {} {}: {}",
                f.id,
                f.state,
                f.event_type,
                f.program,
                f.local_path,
                f.last_error.as_deref().unwrap_or("(no error recorded)")
            );
        }
    }
    out
}

/// "12 queued, 4 running, 1280 done, 2 failed, 1 need a token; 85.0 MB/s": the download counts and a
/// rate, as the minute's summary in the log and systemd's status line give them.
pub fn counts_line(s: &StatusSnapshot, rate: f64) -> String {
    let n = |st| s.downloads.get(&st).copied().unwrap_or(0);
    format!(
        "{} queued, {} running, {} done, {} failed, {} need a token; {:.1} MB/s",
        n(DownloadState::Queued),
        n(DownloadState::Running),
        n(DownloadState::Done),
        n(DownloadState::Failed),
        n(DownloadState::NeedsAuth),
        rate / 1e6
    )
}

/// Members not heard from for this many leases are gone.
pub const MEMBER_GONE_AFTER_LEASES: u32 = 3;

/// Judges each member `up`, `stopped` or `gone` (not heard from for [`MEMBER_GONE_AFTER_LEASES`]
/// leases of `lease`) at `now`.
pub fn judge_members(s: &mut StatusSnapshot, lease: std::time::Duration, now: i64) {
    let gone_after =
        i64::try_from((lease * MEMBER_GONE_AFTER_LEASES).as_millis()).unwrap_or(i64::MAX);
    for m in &mut s.members {
        m.state = if m.stopped_at.is_some() {
            "stopped"
        } else if now.saturating_sub(m.last_heartbeat) > gone_after {
            "gone"
        } else {
            "up"
        }
        .into();
        if m.state != "up" {
            // What a stopped or gone member led has run out or was given up.
            m.leads.clear();
        }
    }
}

/// The members, a line each: "host-a: up (pid 12, heard from 2s ago), 3 running, 1.2 MiB/s, leads imap".
fn render_members(members: &[crate::store::Member], now: i64) -> String {
    let mut out = String::new();
    for (i, m) in members.iter().enumerate() {
        let label = if i == 0 {
            "  members:    "
        } else {
            "              "
        };
        let _ = write!(out, "{label}{}: {}", m.node, m.state);
        match m.state.as_str() {
            "up" => {
                let _ = write!(
                    out,
                    " (pid {}, up {}, heard from {} ago), {} running, {}/s",
                    m.pid,
                    human_age(now - m.started_at),
                    human_age(now - m.last_heartbeat),
                    m.running,
                    human_bytes(m.rate as u64)
                );
                if !m.leads.is_empty() {
                    let _ = write!(out, ", leads {}", m.leads.join(", "));
                }
                if m.clock_skew.abs() > 2000 {
                    let _ = write!(
                        out,
                        " (its clock is {:.1}s off the database's: leases need synchronised clocks)",
                        m.clock_skew as f64 / 1000.0
                    );
                }
            }
            _ => {
                let _ = write!(
                    out,
                    " (last heard from {} ago, pid {})",
                    human_age(now - m.last_heartbeat),
                    m.pid
                );
            }
        }
        out.push('\n');
    }
    out
}

/// A daemon that has not written its figures for this long is not running (it writes every 5 s).
pub const DAEMON_SILENT_AFTER_MS: i64 = 30_000;

/// "3s", "5m", "2h", "4d": how long ago, roughly.
pub fn human_age(ms: i64) -> String {
    let s = (ms.max(0) / 1000) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

/// `list` for a terminal: one row per job.
pub fn render_list(rows: &[DownloadRow]) -> String {
    if rows.is_empty() {
        return "no downloads\n".to_string();
    }
    let mut out = format!(
        "{:>6}  {:<10}  {:<11}  {:>7}  {:>8}  {:>10}  {:<5}  {}\n",
        "ID", "STATE", "EVENT", "PROGRAM", "ATTEMPTS", "BYTES", "FROM", "PATH"
    );
    for r in rows {
        let _ = write!(
            out,
            "{:>6}  {:<10}  {:<11}  {:>7}  {:>8}  {:>10}  {:<5}  {}",
            r.id,
            r.state.as_str(),
            r.event_type,
            r.program,
            r.attempts,
            human_bytes(r.bytes_done as u64),
            // Where its bytes came from: the cloud bucket or MAST ("-": none yet).
            r.source.map_or("-", |s| s.as_str()),
            r.local_path
        );
        if let (Some(e), DownloadState::Failed | DownloadState::NeedsAuth) =
            (&r.last_error, r.state)
        {
            let _ = write!(out, "  ({e})");
        }
        out.push('\n');
    }
    out
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}
