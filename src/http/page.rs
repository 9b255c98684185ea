//! The status page (`GET /`): what `status` says, for people, in one self-contained HTML document.
//!
//! Rendered here, on the server: every figure is in the HTML itself, so the page reads the same with
//! scripts off, in a terminal browser, or saved to a file. It refreshes itself (`<meta http-equiv=
//! "refresh">`), fetches nothing (no script, font, image or style from anywhere), and is laid out for a
//! phone first (one column that widens into a grid, tables that scroll sideways). Everything that comes
//! from outside (file names, notice names, error texts) is escaped.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::service::Live;
use crate::status::{DAEMON_SILENT_AFTER_MS, human_age, human_bytes};
use crate::store::{DownloadState, StatusSnapshot};

/// The page reloads itself this often, in seconds.
pub const REFRESH_SECS: u32 = 5;

/// What the page shows besides the store's figures.
pub struct Extra<'a> {
    /// The running transfers as they go, by job id.
    pub live: &'a BTreeMap<i64, Live>,
    /// `download.max_rate`, if set.
    pub max_rate: Option<String>,
    /// Free bytes on the download file system, if known.
    pub free: Option<u64>,
    /// Now, ms since the epoch.
    pub now: i64,
}

/// `<`, `>`, `&`, `"` and `'` as entities.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn when(now: i64, at: Option<i64>) -> String {
    match at {
        Some(t) => format!(
            "<time datetime=\"{}\">{} ago</time>",
            chrono::DateTime::from_timestamp_millis(t)
                .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_default(),
            human_age(now - t)
        ),
        None => "never".into(),
    }
}

const STYLE: &str = "
:root{color-scheme:light dark;--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--line:#8884}
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;padding:12px;max-width:1100px;margin-inline:auto}
h1{font-size:1.3em;margin:.2em 0}h2{font-size:1.05em;margin:1.4em 0 .4em}
.sub{opacity:.75;font-size:.9em}
.counts{display:grid;grid-template-columns:repeat(auto-fit,minmax(120px,1fr));gap:8px;margin-top:10px}
.count{border:1px solid var(--line);border-radius:8px;padding:8px 10px}
.count b{display:block;font-size:1.6em;font-variant-numeric:tabular-nums}
.count.failed b,.count.needs_auth b{color:var(--bad)}.count.done b{color:var(--ok)}
.scroll{overflow-x:auto;-webkit-overflow-scrolling:touch}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid var(--line);vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
td.path{word-break:break-all}
progress{width:100%;min-width:90px;height:.9em}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
.note{border-left:4px solid var(--warn);padding:6px 10px;margin:10px 0}
footer{margin-top:2em;font-size:.85em;opacity:.7}
";

/// The whole page.
pub fn render(s: &StatusSnapshot, extra: &Extra<'_>) -> String {
    let now = extra.now;
    let mut o = String::with_capacity(16 * 1024);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\
         <title>mastsub: {} running, {} queued, {} failed</title><style>{STYLE}</style></head><body>",
        n(s, DownloadState::Running),
        n(s, DownloadState::Queued),
        n(s, DownloadState::Failed)
    );
    o.push_str("<header><h1>mastsub</h1><p class=\"sub\" id=\"daemon\">");
    match &s.daemon {
        Some(d) if now - d.updated_at <= DAEMON_SILENT_AFTER_MS => {
            let _ = write!(
                o,
                "<span class=\"ok\">running</span> (pid {}, up {}), receiving {}/s",
                d.pid,
                human_age(now - d.started_at),
                human_bytes(d.rate as u64)
            );
        }
        Some(d) => {
            let _ = write!(
                o,
                "<span class=\"bad\">not running</span> (last seen {} ago)",
                human_age(now - d.updated_at)
            );
        }
        None => o.push_str("starting"),
    }
    if let Some(r) = &extra.max_rate {
        let _ = write!(o, " · capped at {}", esc(r));
    }
    if let Some(free) = extra.free {
        let _ = write!(o, " · {} free for downloads", human_bytes(free));
    }
    let _ = write!(
        o,
        " · {} done in all · updated {} UTC, every {REFRESH_SECS}s</p></header>",
        human_bytes(s.bytes_done),
        chrono::DateTime::from_timestamp_millis(now)
            .map(|d| d.format("%H:%M:%S").to_string())
            .unwrap_or_default()
    );

    // Counts by state.
    o.push_str("<section aria-label=\"downloads\"><div class=\"counts\">");
    for state in DownloadState::ALL {
        let label = match state {
            DownloadState::NeedsAuth => "need a token",
            other => other.as_str(),
        };
        let _ = write!(
            o,
            "<div class=\"count {0}\" id=\"count-{0}\"><b>{1}</b>{label}</div>",
            state.as_str(),
            n(s, state)
        );
    }
    o.push_str("</div>");
    if s.waiting > 0 {
        let _ = write!(
            o,
            "<p class=\"note\" id=\"waiting\"><b>{} waiting for room on the disk.</b> {}</p>",
            s.waiting,
            esc(s.waiting_reason.as_deref().unwrap_or(""))
        );
    }
    o.push_str("</section>");

    // Running transfers.
    let _ = write!(o, "<h2>Running ({})</h2>", n(s, DownloadState::Running));
    if s.running.is_empty() {
        o.push_str("<p class=\"sub\">Nothing is downloading.</p>");
    } else {
        o.push_str(
            "<div class=\"scroll\"><table id=\"running\"><thead><tr><th>product</th><th>progress</th>\
             <th class=\"n\">rate</th><th class=\"n\">attempt</th></tr></thead><tbody>",
        );
        for r in &s.running {
            let live = extra.live.get(&r.id);
            let bytes = live.map_or(r.bytes_done as u64, |l| l.bytes);
            let total = live
                .and_then(|l| l.total)
                .or(r.bytes_expected.map(|t| t as u64));
            let bar = match total {
                Some(t) if t > 0 => format!(
                    "<progress value=\"{bytes}\" max=\"{t}\"></progress> {:.0}% of {}",
                    bytes as f64 * 100.0 / t as f64,
                    human_bytes(t)
                ),
                _ => format!("<progress></progress> {}", human_bytes(bytes)),
            };
            let rate = live.map_or("–".to_string(), |l| {
                format!("{}/s", human_bytes(l.rate as u64))
            });
            let _ = write!(
                o,
                "<tr><td class=\"path\">{}<br><span class=\"sub\">{} · program {}</span></td><td>{bar}</td>\
                 <td class=\"n\">{rate}</td><td class=\"n\">{}</td></tr>",
                esc(&r.local_path),
                esc(&r.event_type),
                r.program,
                r.attempts
            );
        }
        o.push_str("</tbody></table></div>");
    }

    // By event type.
    o.push_str(
        "<h2>By event type</h2><div class=\"scroll\"><table id=\"events\"><thead><tr><th>type</th>\
         <th class=\"n\">events</th>",
    );
    for state in DownloadState::ALL {
        let _ = write!(o, "<th class=\"n\">{}</th>", state.as_str());
    }
    o.push_str("</tr></thead><tbody>");
    for (t, count) in &s.events {
        let _ = write!(
            o,
            "<tr><td>{}</td><td class=\"n\">{count}</td>",
            esc(&t.to_string())
        );
        let by = s.by_event_type.get(t);
        for state in DownloadState::ALL {
            let v = by.and_then(|b| b.get(&state)).copied().unwrap_or(0);
            let _ = write!(o, "<td class=\"n\">{v}</td>");
        }
        o.push_str("</tr>");
    }
    o.push_str("</tbody></table></div>");

    // Sources.
    o.push_str("<h2>Sources</h2>");
    if s.sources.is_empty() {
        o.push_str("<p class=\"sub\">No source has reported yet.</p>");
    } else {
        o.push_str(
            "<div class=\"scroll\"><table id=\"sources\"><thead><tr><th>source</th><th>state</th>\
             <th>last contact</th><th class=\"n\">taken</th><th>last error</th></tr></thead><tbody>",
        );
        for h in &s.sources {
            let _ = write!(
                o,
                "<tr><td>{}<br><span class=\"sub\">{}</span></td><td class=\"{}\">{}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td>{}</td></tr>",
                esc(&h.source),
                esc(h.detail.as_deref().unwrap_or("")),
                if h.connected { "ok" } else { "bad" },
                esc(&h.state),
                when(now, h.last_contact),
                h.taken,
                match &h.last_error {
                    Some(e) => format!("{} ({})", esc(e), when(now, h.last_error_at)),
                    None => "none".into(),
                }
            );
        }
        o.push_str("</tbody></table></div>");
    }

    // The members of a cluster (a single host has one, and no table).
    if s.members.len() > 1 {
        o.push_str(
            "<h2>Members</h2><div class=\"scroll\"><table id=\"members\"><thead><tr><th>node</th>\
             <th>state</th><th>heard from</th><th class=\"n\">running</th><th class=\"n\">rate</th>\
             <th>leads</th></tr></thead><tbody>",
        );
        for m in &s.members {
            let _ = write!(
                o,
                "<tr><td>{}<br><span class=\"sub\">pid {}</span></td><td class=\"{}\">{}</td><td>{}</td>\
                 <td class=\"n\">{}</td><td class=\"n\">{}/s</td><td>{}</td></tr>",
                esc(&m.node),
                m.pid,
                if m.state == "up" { "ok" } else { "bad" },
                esc(&m.state),
                when(now, Some(m.last_heartbeat)),
                m.running,
                crate::status::human_bytes(m.rate as u64),
                esc(&m.leads.join(", "))
            );
        }
        o.push_str("</tbody></table></div>");
    }

    // Recent notices.
    o.push_str("<h2>Recent notices</h2>");
    if s.recent_notices.is_empty() {
        o.push_str("<p class=\"sub\">No notice yet.</p>");
    } else {
        o.push_str(
            "<div class=\"scroll\"><table id=\"notices\"><thead><tr><th>notice</th><th>received</th>\
             <th>status</th><th class=\"n\">events</th></tr></thead><tbody>",
        );
        for r in &s.recent_notices {
            let class = match r.status.as_str() {
                "accepted" => "ok",
                "partial" => "warn",
                _ => "bad",
            };
            let _ = write!(
                o,
                "<tr><td class=\"path\">{}<br><span class=\"sub\">from {}</span>{}</td><td>{}</td>\
                 <td class=\"{class}\">{}</td><td class=\"n\">{} of {}</td></tr>",
                esc(&r.name),
                esc(&r.source_kind),
                r.error
                    .as_deref()
                    .map(|e| format!("<br><span class=\"bad\">{}</span>", esc(e)))
                    .unwrap_or_default(),
                when(now, Some(r.received_at)),
                esc(&r.status),
                r.events_recorded,
                r.records
            );
        }
        o.push_str("</tbody></table></div>");
    }

    // Hooks.
    let h = &s.hooks;
    if h.pending + h.running + h.done + h.failed > 0 {
        let _ = write!(
            o,
            "<h2>Hooks</h2><p id=\"hooks\">{} pending, {} running, {} done, <span class=\"{}\">{} failed</span> \
             ({} failed attempt(s) in all)</p>",
            h.pending,
            h.running,
            h.done,
            if h.failed > 0 { "bad" } else { "ok" },
            h.failed,
            h.failed_attempts
        );
        if !h.recent_failures.is_empty() {
            o.push_str(
                "<div class=\"scroll\"><table id=\"hook-failures\"><thead><tr><th>hook</th><th>for</th>\
                 <th>state</th><th>reason</th></tr></thead><tbody>",
            );
            for f in &h.recent_failures {
                let _ = write!(
                    o,
                    "<tr><td>{}</td><td class=\"path\">{}</td><td class=\"bad\">{} (attempt {})</td>\
                     <td>{}</td></tr>",
                    esc(&f.kind),
                    esc(&f.about),
                    f.standing(),
                    f.attempts,
                    esc(&f.error)
                );
            }
            o.push_str("</tbody></table></div>");
        }
    }

    // Recent failures.
    o.push_str("<h2>Recent failures</h2>");
    if s.recent_failures.is_empty() {
        o.push_str("<p class=\"sub\" id=\"no-failures\">None.</p>");
    } else {
        o.push_str(
            "<div class=\"scroll\"><table id=\"failures\"><thead><tr><th>job</th><th>product</th>\
             <th>state</th><th>reason</th></tr></thead><tbody>",
        );
        for f in &s.recent_failures {
            let _ = write!(
                o,
                "<tr><td class=\"n\">#{}</td><td class=\"path\">{}<br><span class=\"sub\">{} · program {} · \
                 {}</span></td><td class=\"bad\">{}</td><td>{}</td></tr>",
                f.id,
                esc(&f.local_path),
                esc(&f.event_type),
                f.program,
                when(now, Some(f.updated_at)),
                f.state.as_str(),
                esc(f.last_error.as_deref().unwrap_or("(no error recorded)"))
            );
        }
        o.push_str("</tbody></table></div>");
    }
    let _ = writeln!(
        o,
        "<footer>mastsub {} · <a href=\"/metrics\">metrics</a> · <a href=\"/api/status\">status as JSON</a> \
         · <code>mastsub retry ID</code> queues a failed job again</footer></body></html>",
        env!("CARGO_PKG_VERSION")
    );
    o
}

fn n(s: &StatusSnapshot, state: DownloadState) -> u64 {
    s.downloads.get(&state).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_comes_from_outside_is_escaped_and_the_page_fetches_nothing() {
        let mut s = StatusSnapshot::default();
        s.downloads.insert(DownloadState::Failed, 3);
        s.recent_failures.push(crate::store::DownloadRow {
            id: 7,
            product: "p".into(),
            mission: "JWST".into(),
            fileset: "f".into(),
            filename: "<script>alert(1)</script>.fits".into(),
            program: 1,
            event_type: "New".into(),
            version: "v".into(),
            url: "https://mast.stsci.edu/x".into(),
            local_path: "jwst/f/<script>alert(1)</script>.fits".into(),
            state: DownloadState::Failed,
            attempts: 8,
            bytes_expected: None,
            bytes_done: 0,
            last_error: Some("MAST answered \"<b>503</b>\" & gave up".into()),
            verified: None,
            waiting_reason: None,
            source: None,
            fetched_from: None,
            updated_at: 0,
        });
        let live = BTreeMap::new();
        let page = render(
            &s,
            &Extra {
                live: &live,
                max_rate: None,
                free: None,
                now: 1_000,
            },
        );
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;.fits"));
        assert!(page.contains("&quot;&lt;b&gt;503&lt;/b&gt;&quot; &amp; gave up"));
        assert!(page.contains("id=\"count-failed\"><b>3</b>failed"));
        for outside in ["src=", "http://", "https://", "@import", "url("] {
            assert!(
                !page.contains(outside),
                "the page refers outside: {outside}"
            );
        }
    }
}
