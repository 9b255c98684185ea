//! The download engine against the MAST stand-in: byte-identical products at astroquery's paths, verified
//! resume through cut bodies, 503s and 500s, servers that ignore Range, products that change, tokens,
//! reprocessed products, 404s, and kill -9 / SIGTERM in the middle of transfers.

mod common;

use std::time::{Duration, Instant};

use common::mast::{
    Faults, MastStandIn, assert_identical, fits_product, serve_products, serve_sample, wait_done,
};
use common::{Daemon, SmallDisk, Workspace, wait_until};
use serde_json::json;

#[test]
fn the_sample_products_arrive_byte_identical_at_astroquery_paths() {
    let mast = MastStandIn::start();
    let files = serve_sample(&mast);
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = Daemon::start_watching(&ws);
    std::fs::copy(common::sample_notice(), ws.path("s.json")).unwrap();
    std::fs::rename(ws.path("s.json"), ws.inbox().join("JWST.json")).unwrap();
    wait_done(&ws, &d, 3, Duration::from_secs(20));
    assert_identical(&ws, &files);
    let seen = mast.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.iter().all(|s| {
        s.user_agent
            .as_deref()
            .is_some_and(|u| u.starts_with("mastsub/"))
    }));
    assert!(d.log().contains("done jwst/"), "{}", d.log());
    let status = ws.status();
    let total: usize = files.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(status["bytes_done"], json!(total));
}

#[test]
fn a_hundred_products_through_cut_bodies_503s_and_500s_arrive_whole_by_resuming() {
    let mast = MastStandIn::start();
    let (notice, files) = serve_products(&mast, 1, 100, 40);
    mast.set_faults(Faults {
        cut_percent: 30,
        unavailable_percent: 10,
        retry_after: 0,
        errors_500_next: 5,
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = Daemon::start_with_env(&ws, &[("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "50")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("hundred.json", &notice);
    wait_done(&ws, &d, 100, Duration::from_secs(120));
    assert_identical(&ws, &files);
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let served = mast.bytes_served();
    eprintln!(
        "served {served} bytes for {total} ({:.3}x)",
        served as f64 / total as f64
    );
    assert!(
        served < total * 12 / 10,
        "served {served} bytes for {total}: resumes restarted from zero"
    );
    let seen = mast.seen();
    assert!(seen.iter().any(|s| s.status == 206), "no resume happened");
    assert!(seen.iter().any(|s| s.status == 503) && seen.iter().any(|s| s.status == 500));
    // Every resume carried the validator.
    assert!(
        seen.iter()
            .filter(|s| s.range.is_some())
            .all(|s| s.if_range.is_some())
    );
}

#[test]
fn a_server_that_ignores_range_still_gives_correct_files() {
    let mast = MastStandIn::start();
    let (notice, files) = serve_products(&mast, 1, 10, 30);
    mast.set_faults(Faults {
        cut_percent: 50,
        cut_with_reset: true,
        ignore_range: true,
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = Daemon::start_with_env(&ws, &[("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "50")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("n.json", &notice);
    wait_done(&ws, &d, 10, Duration::from_secs(60));
    assert_identical(&ws, &files);
    assert!(
        mast.seen().iter().any(|s| s.range.is_some()),
        "no resume was even tried"
    );
}

#[test]
fn a_product_that_changes_between_a_cut_and_the_resume_ends_as_the_new_version_whole() {
    let mast = MastStandIn::start();
    let name = "jw00001001001_02201_00001_mirimage_cal.fits";
    mast.put(name, fits_product(name, 60, 1));
    mast.set_faults(Faults {
        cut_next: 1,
        slow: Some(Duration::from_millis(20)),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    // A long first retry delay leaves time to change the product after the cut.
    let d = Daemon::start_with_env(
        &ws,
        &[
            ("MASTSUB_DOWNLOAD__RETRY_INITIAL", "1s"),
            ("MASTSUB_DOWNLOAD__RETRY_MAX", "1s"),
        ],
    );
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice(
        "n.json",
        &serde_json::to_vec(&[common::record(1, "New")]).unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(20), || d
            .log()
            .contains("attempt 1 failed")),
        "no cut happened"
    );
    let v2 = fits_product(name, 45, 2);
    mast.put(name, v2.clone());
    mast.set_faults(Faults::default());
    wait_done(&ws, &d, 1, Duration::from_secs(20));
    let path = "jwst/jw00001001001_02201_00001/jw00001001001_02201_00001_mirimage_cal.fits";
    assert_identical(&ws, &[(path.to_string(), v2)]);
    let seen = mast.seen();
    let resume = seen
        .iter()
        .find(|s| s.range.is_some())
        .expect("a resume with Range");
    assert!(resume.if_range.is_some());
    assert_eq!(
        seen.last().unwrap().status,
        200,
        "the changed product must come whole: {seen:?}"
    );
}

#[test]
fn without_a_token_jobs_wait_and_with_one_they_download_and_the_token_is_never_logged() {
    let mast = MastStandIn::start();
    let files = serve_sample(&mast);
    let token = "s3cr3t-t0k3n-abcdef";
    mast.set_faults(Faults {
        token: Some(token.to_string()),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    {
        let mut d = Daemon::start_watching(&ws);
        std::fs::copy(common::sample_notice(), ws.path("s.json")).unwrap();
        std::fs::rename(ws.path("s.json"), ws.inbox().join("JWST.json")).unwrap();
        assert!(wait_until(Duration::from_secs(20), || ws
            .jobs_in("needs_auth")
            == 3));
        assert!(
            d.log().contains("MAST_API_TOKEN"),
            "no advice on how to set a token:\n{}",
            d.log()
        );
        // No hot retries: one request per product.
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(mast.seen().len(), 3);
        d.terminate();
    }
    let mut d = Daemon::start_with_env(&ws, &[("MAST_API_TOKEN", token)]);
    wait_done(&ws, &d, 3, Duration::from_secs(20));
    assert_identical(&ws, &files);
    d.terminate();
    assert!(!d.log().contains(token), "the token is in the log");
    let out = ws
        .cmd()
        .args(["status", "--json"])
        .env("MAST_API_TOKEN", token)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains(token));
}

#[test]
fn a_reprocessed_event_replaces_the_file_and_keep_previous_keeps_the_old_one() {
    let mast = MastStandIn::start();
    let name = "jw00007001001_02201_00001_mirimage_cal.fits";
    let v1 = fits_product(name, 10, 1);
    mast.put(name, v1.clone());
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = Daemon::start_with_env(&ws, &[("MASTSUB_DOWNLOAD__KEEP_PREVIOUS", "true")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice(
        "new.json",
        &serde_json::to_vec(&[common::record(7, "New")]).unwrap(),
    );
    wait_done(&ws, &d, 1, Duration::from_secs(20));
    let v2 = fits_product(name, 12, 2);
    mast.put(name, v2.clone());
    let mut reprocessed = common::record(70, "Reprocessed");
    reprocessed["fileset"] = json!("jw00007001001_02201_00001");
    reprocessed["filename"] = json!(name);
    reprocessed["archived_date"] = json!("2026-05-01T00:00:00");
    ws.drop_notice(
        "reprocessed.json",
        &serde_json::to_vec(&[reprocessed]).unwrap(),
    );
    wait_done(&ws, &d, 2, Duration::from_secs(20));
    let dir = "jwst/jw00007001001_02201_00001";
    assert_identical(&ws, &[(format!("{dir}/{name}"), v2)]);
    let kept = ws
        .path("mastDownload")
        .join(dir)
        .join(format!("{name}.2026-03-30T17:53:19.6950000"));
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        v1,
        "the previous version was not kept"
    );
}

#[test]
fn a_product_late_on_mast_is_fetched_once_it_appears_and_one_that_never_does_fails() {
    let mast = MastStandIn::start();
    let (notice, files) = serve_products(&mast, 1, 2, 5);
    mast.remove("jw00001001001_02201_00001_mirimage_cal.fits");
    mast.remove("jw00002001001_02201_00001_mirimage_cal.fits");
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("late.json", &notice);
    assert!(wait_until(Duration::from_secs(10), || mast
        .seen()
        .iter()
        .filter(|s| s.status == 404)
        .count()
        >= 4));
    mast.put(
        "jw00001001001_02201_00001_mirimage_cal.fits",
        files[0].1.clone(),
    );
    wait_done(&ws, &d, 1, Duration::from_secs(10));
    // The other gives up after not_found_give_up (3 s in tests), with the reason.
    assert!(wait_until(Duration::from_secs(15), || ws.jobs_in("failed") == 1));
    let status = ws.status();
    let reason = status["recent_failures"][0]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("404"), "{reason}");

    // `retry` queues it again; now it is there.
    mast.put(
        "jw00002001001_02201_00001_mirimage_cal.fits",
        files[1].1.clone(),
    );
    ws.cmd()
        .args(["retry", "--all-failed"])
        .assert()
        .success()
        .stdout(predicates::str::contains("1 download(s) queued again"));
    wait_done(&ws, &d, 2, Duration::from_secs(15));
    assert_identical(&ws, &files);
}

#[test]
fn kill_9_five_times_during_downloads_then_a_normal_run_completes_everything_once() {
    let mast = MastStandIn::start();
    // About 1.5 s per product at this pace (12 products, 4 at a time): the kills land mid-transfer.
    let (notice, files) = serve_products(&mast, 1, 12, 200);
    mast.set_faults(Faults {
        slow: Some(Duration::from_millis(40)),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    ws.drop_notice("n.json", &notice);
    for round in 0..5u64 {
        let mut d = Daemon::start_with_env(&ws, &[("MASTSUB_INBOX__WRITE_TIMEOUT", "100ms")]);
        std::thread::sleep(Duration::from_millis(700 + round * 170));
        d.kill9();
    }
    let served_before = mast.bytes_served();
    mast.set_faults(Faults::default());
    let d = Daemon::start(&ws);
    wait_done(&ws, &d, 12, Duration::from_secs(60));
    assert_identical(&ws, &files);
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM downloads"),
        12,
        "a job was duplicated"
    );
    let total: u64 = files.iter().map(|(_, b)| b.len() as u64).sum();
    let served = mast.bytes_served();
    eprintln!("served {served_before} bytes during the kills, {served} in all, for {total}");
    assert!(
        mast.seen().iter().any(|s| s.status == 206),
        "nothing was resumed after kill -9"
    );
    assert!(
        served < total * 3 / 2,
        "served {served} for {total}: too much fetched twice"
    );
}

#[test]
fn kill_9_inside_publication_batches_never_leaves_a_wrong_file_or_a_done_job_without_its_file() {
    let mast = MastStandIn::start();
    // Many tiny products and eight workers: they end faster than one batch is made durable, so the
    // publisher works in batches, and kills land inside them (in the fsyncs, between the renames, before
    // the batch's transaction).
    let total = 400u64;
    let (notice, files) = serve_products(&mast, 1, total, 2);
    let served: std::collections::HashMap<String, Vec<u8>> = files.iter().cloned().collect();
    let ws = Workspace::with_base(&mast.base_url, "");
    let path = ws.write_notice("n.json", &notice);
    ws.cmd().arg("ingest").arg(&path).assert().success();
    let env = [("MASTSUB_DOWNLOAD__WORKERS", "8")];
    let mut landed = 0;
    for round in 0..12u64 {
        let before = ws.jobs_in("done");
        if before == total as i64 {
            break;
        }
        let mut d = Daemon::start_with_env(&ws, &env);
        // Once this run has published something, a little later each round.
        wait_until(Duration::from_secs(30), || ws.jobs_in("done") > before);
        std::thread::sleep(Duration::from_millis(round * 3 % 20));
        d.kill9();
        let done = ws.jobs_in("done");
        if done < total as i64 {
            landed += 1;
        }
        let log = d.log();
        let batches: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split("published ").nth(1))
            .filter_map(|l| l.split(' ').next())
            .collect();
        eprintln!("kill {round}: {before} then {done} done; batch sizes {batches:?}");
        // What is at a final name is the product, whole; what is recorded done is at its final name.
        for path in ws.tree("mastDownload") {
            if path.ends_with(".part") {
                continue;
            }
            let body = served
                .get(&path)
                .unwrap_or_else(|| panic!("after kill {round}: {path} is not a product"));
            assert!(
                std::fs::read(ws.path("mastDownload").join(&path)).unwrap() == *body,
                "after kill {round}: {path} is published but differs from what was served"
            );
        }
        let done_paths = ws.query_string(
            "SELECT coalesce(group_concat(local_path, char(10)), '') FROM downloads WHERE state = 'done'",
        );
        for local in done_paths.lines() {
            assert!(
                ws.path("mastDownload").join(local).is_file(),
                "after kill {round}: {local} is recorded done but not in place"
            );
        }
    }
    assert!(
        landed >= 2,
        "only {landed} kill(s) landed before the end: the test showed nothing"
    );
    let d = Daemon::start(&ws);
    wait_done(&ws, &d, total as i64, Duration::from_secs(60));
    assert_identical(&ws, &files);
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM downloads"),
        total as i64,
        "a job was duplicated"
    );
}

#[test]
fn sigterm_during_downloads_keeps_part_files_and_the_next_run_resumes_them() {
    let mast = MastStandIn::start();
    // About 2 s per product at this pace: progress is recorded (every second) well before the end.
    let (notice, files) = serve_products(&mast, 1, 4, 200);
    mast.set_faults(Faults {
        slow: Some(Duration::from_millis(60)),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let mut d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &notice);
    assert!(wait_until(Duration::from_secs(20), || ws.query_i64(
        "SELECT count(*) FROM downloads WHERE bytes_done > 0"
    ) >= 2));
    let took = d.terminate();
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    let parts: Vec<_> = ws
        .tree("mastDownload")
        .into_iter()
        .filter(|p| p.ends_with(".part"))
        .collect();
    assert!(!parts.is_empty(), "no .part file kept");
    assert_eq!(
        ws.jobs_in("running"),
        0,
        "jobs left running after a clean stop"
    );
    mast.set_faults(Faults::default());
    let d = Daemon::start(&ws);
    wait_done(&ws, &d, 4, Duration::from_secs(30));
    assert_identical(&ws, &files);
    let resumed = mast.seen().iter().filter(|s| s.status == 206).count();
    assert!(
        resumed >= parts.len(),
        "{resumed} resumes for {} .part files",
        parts.len()
    );
}

#[test]
fn a_disk_without_room_makes_jobs_wait_with_their_reason_writing_nothing_and_they_start_when_room_appears()
 {
    let mast = MastStandIn::start();
    // Three products of about 580 KB on a 4 MiB disk that another program has filled to 1 MiB free, and
    // that must keep 512 KiB free: none fits.
    let (notice, files) = serve_products(&mast, 1, 3, 200);
    let port = common::free_port();
    let ws = Workspace::with_base(
        &mast.base_url,
        &format!("[http]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let Some(_disk) = SmallDisk::mount(&ws.path("mastDownload"), "4m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs in CI (not root?)"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?); the disk guard was not checked");
        return;
    };
    let ballast = ws.path("mastDownload/ballast");
    std::fs::write(&ballast, vec![0u8; 3 << 20]).unwrap();
    let mut d = Daemon::start_with_env(&ws, &[("MASTSUB_DOWNLOAD__MIN_FREE_SPACE", "512KiB")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("n.json", &notice);
    assert!(
        wait_until(Duration::from_secs(20), || {
            ws.status()["waiting"].as_u64().unwrap_or(0) >= 1
        }),
        "no job waits for room; log:\n{}",
        d.log()
    );
    d.wait_for_log("waiting for room", Duration::from_secs(5));
    // While they wait: no byte written, no job failed, every queued one says why (or has not been
    // asked yet), and the daemon asks MAST only a few times, not once per queued job per second.
    std::thread::sleep(Duration::from_secs(3));
    assert!(d.is_running());
    assert_eq!(
        ws.tree("mastDownload"),
        vec!["ballast".to_string()],
        "a body was written"
    );
    assert_eq!(
        ws.jobs_in("failed"),
        0,
        "a wait for room must never fail a job"
    );
    let list: serde_json::Value =
        serde_json::from_slice(&ws.cmd().args(["list", "--json"]).output().unwrap().stdout)
            .unwrap();
    let reasons: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["waiting_reason"].as_str())
        .collect();
    assert!(
        !reasons.is_empty(),
        "no waiting_reason in list --json: {list}"
    );
    for r in &reasons {
        assert!(
            r.contains("waiting for room")
                && r.contains("download.min_free_space")
                && r.contains("512.0 KiB"),
            "{r}"
        );
    }
    let text = ws.cmd().arg("status").output().unwrap().stdout;
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("for room on the disk"), "{text}");
    // The page and the metrics say it too.
    let waiting = ws.status()["waiting"].as_u64().unwrap();
    let (_, page) = common::http_get(port, "/");
    assert!(
        page.contains(&format!("<b>{waiting} waiting for room on the disk.</b>"))
            && page.contains("download.min_free_space"),
        "{page}"
    );
    let (_, metrics) = common::http_get(port, "/metrics");
    assert!(
        metrics.contains(&format!(
            "mastsub_downloads_waiting{{reason=\"disk_space\"}} {waiting}\n"
        )),
        "{metrics}"
    );
    let asked = mast.seen().len();
    assert!(
        asked <= 6,
        "MAST was asked {asked} times while the disk was full"
    );

    // Room appears (the other program's file is deleted): they start by themselves, well before their
    // next look.
    std::fs::remove_file(&ballast).unwrap();
    let grown = Instant::now();
    wait_done(&ws, &d, 3, Duration::from_secs(30));
    assert!(
        grown.elapsed() < Duration::from_secs(10),
        "took {:?} to notice the room",
        grown.elapsed()
    );
    assert_identical(&ws, &files);
    assert_eq!(ws.status()["waiting"], 0);
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM downloads WHERE waiting_reason IS NOT NULL"),
        0,
        "a reason outlived its wait"
    );
    d.kill9();
}

#[test]
fn a_disk_filled_by_another_writer_mid_transfer_is_waited_out_and_leaves_no_corrupt_file() {
    let mast = MastStandIn::start();
    // One product of about 580 KB, sent slowly, on a 4 MiB disk: admitted with room to spare, then
    // another program takes all the room while it arrives.
    let (notice, files) = serve_products(&mast, 1, 1, 200);
    mast.set_faults(Faults {
        slow: Some(Duration::from_millis(60)),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let Some(_disk) = SmallDisk::mount(&ws.path("mastDownload"), "4m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs in CI (not root?)"
        );
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (not root?); ENOSPC mid-transfer was not checked"
        );
        return;
    };
    let mut d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &notice);
    assert!(
        wait_until(Duration::from_secs(20), || ws
            .tree("mastDownload")
            .iter()
            .any(|p| p.ends_with(".part"))),
        "no .part file; log:\n{}",
        d.log()
    );
    // The other program: writes until the disk is full.
    let filler = ws.path("mastDownload/filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![7u8; 64 * 1024];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    assert!(
        wait_until(Duration::from_secs(20), || d.log().contains("disk trouble")),
        "no disk trouble reported; log:\n{}",
        d.log()
    );
    assert!(d.is_running());
    assert_eq!(
        ws.jobs_in("failed"),
        0,
        "disk trouble must not fail the job"
    );
    let (path, _) = &files[0];
    assert!(
        !ws.path("mastDownload").join(path).exists(),
        "a file was published from a transfer the disk cut"
    );
    std::fs::remove_file(&filler).unwrap();
    mast.set_faults(Faults::default());
    wait_done(&ws, &d, 1, Duration::from_secs(90));
    assert_identical(&ws, &files);
    d.kill9();
}

#[test]
fn a_product_that_is_not_fits_is_fetched_again_with_backoff_then_fails_with_the_reason() {
    let mast = MastStandIn::start();
    let name = "jw00003001001_02201_00001_mirimage_cal.fits";
    // The right size for FITS, the wrong first bytes (an HTML page is caught as one: tests/hostile.rs).
    let mut page = b"Service temporarily unavailable".to_vec();
    page.resize(2880 * 2, b' ');
    mast.put(name, page);
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = Daemon::start_watching(&ws);
    ws.drop_notice(
        "n.json",
        &serde_json::to_vec(&[common::record(3, "New")]).unwrap(),
    );
    assert!(
        wait_until(Duration::from_secs(20), || ws.jobs_in("failed") == 1),
        "not failed; log:\n{}",
        d.log()
    );
    let requests = mast.seen();
    assert_eq!(
        requests.len(),
        3,
        "fetched {} times, expected three times: {requests:?}",
        requests.len()
    );
    assert!(
        requests.iter().all(|r| r.range.is_none()),
        "every fetch must start from zero"
    );
    let status = ws.status();
    let reason = status["recent_failures"][0]["last_error"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(reason.contains("SIMPLE"), "{reason}");
    assert!(
        ws.tree("mastDownload").is_empty(),
        "something was left: {:?}",
        ws.tree("mastDownload")
    );
}

#[test]
fn a_notice_queues_its_downloads_at_once_not_at_the_next_sweep() {
    let mast = MastStandIn::start();
    let (notice, files) = serve_products(&mast, 1, 1, 2);
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = Daemon::start_watching(&ws);
    // Past the start-up sweep, so that only ingest's wake-up can start the job before the next one (5 s).
    std::thread::sleep(Duration::from_millis(500));
    let tmp = ws.path("n.json.tmp");
    std::fs::write(&tmp, &notice).unwrap();
    let start = std::time::Instant::now();
    std::fs::rename(&tmp, ws.inbox().join("n.json")).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || !mast.seen().is_empty()),
        "{}",
        d.log()
    );
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the first request came {took:?} after the notice: the pool waited for its sweep"
    );
    wait_done(&ws, &d, 1, Duration::from_secs(10));
    assert_identical(&ws, &files);
}

/// On a shared store (PostgreSQL): held by a worker on another host; by one of this host's name on another
/// machine (a container, a cluster member named alike), whose pid means nothing here though no such
/// process exists here; and by an owner named before machines were. Only the lease can tell.
#[rstest::rstest]
#[case::another_host("elsewhere:4242:0000abcd:0123456789abcdef")]
#[case::this_host_name_another_machine("{host}:4194305:0000abcd:0000000000000000")]
#[case::an_older_owner_name("{host}:4194305:0000abcd")]
fn a_job_held_out_of_sight_is_taken_over_once_download_lease_has_run_out(#[case] owner: &str) {
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let owner = owner.replace("{host}", &host);
    let mast = MastStandIn::start();
    let (notice, files) = serve_products(&mast, 1, 1, 10);
    let Some(pg) = common::postgres::Postgres::shared() else {
        return;
    };
    let url = pg.database("out_of_sight");
    let db = url.rsplit('/').next().unwrap().to_string();
    let ws = Workspace::with_base(&mast.base_url, "");
    let path = ws.write_notice("n.json", &notice);
    ws.cmd()
        .arg("ingest")
        .arg(&path)
        .env("MASTSUB_STORAGE__DATABASE", &url)
        .assert()
        .success();
    let count = |state: &str| {
        pg.psql(
            &db,
            &format!("SELECT count(*) FROM downloads WHERE state = '{state}'"),
        )
        .unwrap()
        .trim()
        .parse::<i64>()
        .unwrap()
    };
    // Its lease runs out 4 s from now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    pg.psql(
        &db,
        &format!(
            "UPDATE downloads SET state = 'running', attempts = 1, claims = 1, lease_owner = '{owner}', \
             lease_expires_at = {}",
            now + 4000
        ),
    )
    .unwrap();
    let started = Instant::now();
    let d = Daemon::start_with_env(
        &ws,
        &[
            ("MASTSUB_DOWNLOAD__LEASE", "3s"),
            ("MASTSUB_STORAGE__DATABASE", &url),
        ],
    );
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    std::thread::sleep(Duration::from_secs(2).saturating_sub(started.elapsed()));
    assert_eq!(count("running"), 1, "taken before its lease ran out");
    assert!(mast.seen().is_empty());
    assert!(
        wait_until(Duration::from_secs(20), || count("done") == 1),
        "{}",
        d.log()
    );
    assert_identical(&ws, &files);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "taken before its lease ran out"
    );
}

/// On SQLite the run lock admits one daemon at a time: a job left running by any other process, of this
/// machine or not, with its pid judged or not, is a dead one's, and is taken at once (under systemd's
/// `ProcSubset=pid` no pid can be judged at all, and a restart would otherwise wait out the lease).
#[rstest::rstest]
#[case::another_host("elsewhere:4242:0000abcd:0123456789abcdef")]
#[case::this_host_name_another_machine("{host}:4194305:0000abcd:0000000000000000")]
#[case::an_older_owner_name("{host}:4194305:0000abcd")]
fn on_sqlite_a_job_left_running_by_another_process_is_taken_at_once(#[case] owner: &str) {
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let owner = owner.replace("{host}", &host);
    let mast = MastStandIn::start();
    let (notice, files) = serve_products(&mast, 1, 1, 10);
    let ws = Workspace::with_base(&mast.base_url, "");
    let path = ws.write_notice("n.json", &notice);
    ws.cmd().arg("ingest").arg(&path).assert().success();
    // Its lease runs out an hour from now.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    ws.execute(&format!(
        "UPDATE downloads SET state = 'running', attempts = 1, claims = 1, lease_owner = '{owner}', \
         lease_expires_at = {}",
        now + 3_600_000
    ));
    let d = Daemon::start_watching(&ws);
    wait_done(&ws, &d, 1, Duration::from_secs(20));
    assert_identical(&ws, &files);
}
