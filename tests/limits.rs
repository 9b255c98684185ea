//! `download.max_rate`: all workers together, measured by the bytes that reach the disk, within ±15% of the
//! cap over 10 s, with no second far above it, and again after a SIGHUP that changes the cap; against our
//! stand-in and against nginx.

mod common;

use std::time::{Duration, Instant};

use common::mast::{MastStandIn, fits_product, serve_products};
use common::nginx::Nginx;
use common::{Daemon, Workspace, record, wait_until};

/// Bytes of every file under the download folder (`.part` files included).
fn on_disk(ws: &Workspace) -> u64 {
    fn walk(dir: &std::path::Path) -> u64 {
        let mut n = 0;
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => n += walk(&p),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
        n
    }
    walk(&ws.path("mastDownload"))
}

/// The config with `max_rate` set (or changed) in its `[download]` section.
fn set_max_rate(ws: &Workspace, rate: &str) {
    let text = std::fs::read_to_string(&ws.config).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("max_rate"))
        .collect();
    let text = kept.join("\n").replace(
        "[download]\n",
        &format!("[download]\nmax_rate = \"{rate}\"\n"),
    );
    std::fs::write(&ws.config, text).unwrap();
}

/// The mean rate over `window` (after `settle`), and the largest of its one-second steps.
fn measure(ws: &Workspace, settle: Duration, window: Duration) -> (f64, f64) {
    std::thread::sleep(settle);
    let start = Instant::now();
    let first = on_disk(ws);
    let mut last = first;
    let mut peak = 0f64;
    let mut at = start;
    while start.elapsed() < window {
        std::thread::sleep(Duration::from_secs(1));
        let now = on_disk(ws);
        let step = (now - last) as f64 / at.elapsed().as_secs_f64();
        peak = peak.max(step);
        last = now;
        at = Instant::now();
    }
    ((last - first) as f64 / start.elapsed().as_secs_f64(), peak)
}

/// The rate over 10 s (after a second's settling) is within ±15% of `cap` MB/s, and no second is above
/// 1.5 times it.
fn assert_capped(ws: &Workspace, cap: f64, server: &str) {
    let (rate, peak) = measure(ws, Duration::from_secs(1), Duration::from_secs(10));
    eprintln!(
        "{server}, cap {cap} MB/s: {:.3} MB/s over 10 s, peak second {:.3} MB/s",
        rate / 1e6,
        peak / 1e6
    );
    let cap = cap * 1e6;
    assert!(
        (rate - cap).abs() <= 0.15 * cap,
        "{server}: {:.3} MB/s under a cap of {} MB/s",
        rate / 1e6,
        cap / 1e6
    );
    assert!(
        peak <= 1.5 * cap,
        "{server}: a second of {:.3} MB/s under a cap of {} MB/s",
        peak / 1e6,
        cap / 1e6
    );
}

/// Starts the daemon on `ws` with `notice` in its inbox and waits for its four transfers to run.
fn four_running(ws: &Workspace, notice: &[u8], shown: &str) -> Daemon {
    let d = Daemon::start(ws);
    d.wait_for_log(&format!("at most {shown} in all"), Duration::from_secs(20));
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("n.json", notice);
    assert!(
        wait_until(Duration::from_secs(20), || ws.jobs_in("running") == 4),
        "four jobs did not start; log:\n{}",
        d.log()
    );
    d
}

#[test]
fn four_workers_together_keep_to_max_rate_and_a_sighup_changes_it() {
    let mast = MastStandIn::start();
    // Four products of 48 MiB: at these caps none ends within the test.
    let (notice, _files) = serve_products(&mast, 1, 4, 48 * 1024 * 1024 / 2880);
    let ws = Workspace::with_base(&mast.base_url, "");
    set_max_rate(&ws, "3MB/s");
    let d = four_running(&ws, &notice, "3.0 MB/s");
    assert_capped(&ws, 3.0, "stand-in");

    // A new cap by SIGHUP, without a restart: the transfers go on at it.
    set_max_rate(&ws, "6MB/s");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(d.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    d.wait_for_log("download.max_rate is now 6.0 MB/s", Duration::from_secs(10));
    assert_capped(&ws, 6.0, "stand-in");
    assert_eq!(ws.jobs_in("running"), 4);
    assert_eq!(
        ws.query_i64("SELECT max(attempts) FROM downloads"),
        1,
        "a transfer was ended and started again (by the SIGHUP, or the low-speed limit)"
    );
    assert_eq!(ws.jobs_in("failed"), 0);
}

#[test]
fn the_cap_holds_against_nginx_which_sends_from_the_page_cache_as_fast_as_the_socket_takes() {
    // A real server, with sendfile and large socket buffers, not our stand-in's pieces: the cap must
    // come from the reading side alone.
    let data = tempfile::tempdir().unwrap();
    let Some(nginx) = Nginx::start(data.path(), "") else {
        return;
    };
    let mut records = Vec::new();
    for n in 1..=4 {
        let r = record(n, "New");
        let name = r["filename"].as_str().unwrap().to_string();
        std::fs::write(
            data.path().join(&name),
            fits_product(&name, 48 * 1024 * 1024 / 2880, 1),
        )
        .unwrap();
        records.push(r);
    }
    let ws = Workspace::with_base(&nginx.base_url, "");
    set_max_rate(&ws, "4MB/s");
    let _d = four_running(&ws, &serde_json::to_vec(&records).unwrap(), "4.0 MB/s");
    assert_capped(&ws, 4.0, "nginx");
    assert_eq!(ws.query_i64("SELECT max(attempts) FROM downloads"), 1);
}
