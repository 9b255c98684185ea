//! `mastsub download`: the sample notice against the MAST stand-in, the manifest, a re-run that fetches
//! nothing, a missing product, every filter rule, and progress as bars (under a pseudo-terminal, through
//! `script`) or as lines (piped).

mod common;

use std::path::Path;
use std::time::Duration;

use common::mast::{Faults, MastStandIn, fits_product, serve_sample};
use common::{Workspace, record};
use serde_json::{Value, json};

/// Runs `mastsub download` in `ws`; returns (exit code, stdout, stderr).
fn download(ws: &Workspace, args: &[&str]) -> (i32, String, String) {
    let out = ws
        .cmd()
        .arg("download")
        .args(args)
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_sample_notice_downloads_to_astroquery_paths_and_a_rerun_fetches_nothing() {
    let mast = MastStandIn::start();
    let files = serve_sample(&mast);
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = ws.path("D");
    let notice = common::sample_notice();
    let manifest = ws.path("manifest.json");
    let (code, out, err) = download(
        &ws,
        &[
            notice.to_str().unwrap(),
            "--dir",
            d.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    for (path, body) in &files {
        let got = std::fs::read(d.join("mastDownload").join(path)).unwrap();
        assert!(got == *body, "{path} differs");
    }
    assert_eq!(out.matches("COMPLETE").count(), 3, "{out}");
    assert!(out.starts_with("Local Path"), "{out}");
    let rows: Vec<Value> = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["Status"] == "COMPLETE"));
    assert!(
        rows[0]["URL"]
            .as_str()
            .unwrap()
            .contains("/search/jwst/api/v0.1/retrieve_product?product_name=")
    );
    // Piped: a plain line per product started and finished.
    assert_eq!(err.matches("started  ").count(), 3, "{err}");
    assert_eq!(err.matches("done     ").count(), 3, "{err}");

    let requests = mast.seen().len();
    let (code, out, err) = download(
        &ws,
        &[notice.to_str().unwrap(), "--dir", d.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.matches("COMPLETE").count(), 3, "{out}");
    assert_eq!(mast.seen().len(), requests, "the re-run made requests");
    assert!(
        !err.contains("started"),
        "a complete file reported as started again:\n{err}"
    );

    // A damaged file is fetched again.
    let (first, _) = &files[0];
    std::fs::write(d.join("mastDownload").join(first), b"SIMPLE  = damaged").unwrap();
    let (code, out, err) = download(
        &ws,
        &[notice.to_str().unwrap(), "--dir", d.to_str().unwrap(), "-q"],
    );
    assert_eq!(code, 0);
    assert_eq!(mast.seen().len(), requests + 1);
    // --quiet: the manifest and nothing else.
    assert!(err.is_empty(), "{err}");
    assert!(out.starts_with("Local Path"), "{out}");
    assert!(std::fs::read(d.join("mastDownload").join(first)).unwrap() == files[0].1);
}

#[test]
fn a_missing_product_is_an_error_row_with_its_reason_and_exit_1() {
    let mast = MastStandIn::start();
    let files = serve_sample(&mast);
    let missing = Path::new(&files[1].0)
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    mast.remove(&missing);
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = ws.path("D");
    let csv = ws.path("m.csv");
    let (code, out, err) = download(
        &ws,
        &[
            common::sample_notice().to_str().unwrap(),
            "--dir",
            d.to_str().unwrap(),
            "--flat",
            "--manifest",
            csv.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert_eq!(out.matches("COMPLETE").count(), 2, "{out}");
    let error_line = out.lines().find(|l| l.contains("ERROR")).unwrap();
    assert!(
        error_line.contains(&missing) && error_line.contains("HTTP 404"),
        "{out}"
    );
    // --flat: straight into D.
    assert!(d.join(Path::new(&files[0].0).file_name().unwrap()).exists());
    let csv = std::fs::read_to_string(csv).unwrap();
    // astroquery's columns, then what each COMPLETE product was verified by.
    assert!(
        csv.starts_with("Local Path,Status,Message,URL,Verified\n"),
        "{csv}"
    );
    assert_eq!(csv.matches(",ERROR,").count(), 1, "{csv}");
    assert_eq!(
        csv.matches(",\"FITS: 1 HDU, structure only").count(),
        2,
        "{csv}"
    );
}

/// Products for the filter tests: (n, program, event type, mission, filename suffix).
const MIX: [(u64, i64, &str, &str, &str); 6] = [
    (1, 100, "New", "JWST", "cal"),
    (2, 1500, "New", "JWST", "rate"),
    (3, 2500, "Public", "JWST", "cal"),
    (4, 1800, "Reprocessed", "JWST", "cal"),
    (5, 1200, "New", "HST", "cal"),
    (6, 3000, "New", "JWST", "uncal"),
];

fn mixed_notice(mast: &MastStandIn, ws: &Workspace) -> std::path::PathBuf {
    let mut records = Vec::new();
    for (n, program, et, mission, kind) in MIX {
        let mut r = record(n, et);
        let name = format!("x{n:05}_{kind}.fits");
        r["program"] = json!(program);
        r["mission"] = json!(mission);
        r["filename"] = json!(name);
        mast.put(&name, fits_product(&name, 2, 1));
        records.push(r);
    }
    let path = ws.path("mix.json");
    std::fs::write(&path, serde_json::to_vec(&records).unwrap()).unwrap();
    path
}

#[test]
fn every_filter_rule_selects_exactly_the_expected_products() {
    let mast = MastStandIn::start();
    let ws = Workspace::with_base(&mast.base_url, "");
    let notice = mixed_notice(&mast, &ws);
    for (i, (args, expected)) in [
        (vec!["--event-type", "New"], vec![1, 2, 5, 6]),
        (vec!["--event-type", "public,reprocessed"], vec![3, 4]),
        (vec!["--event-type", "!New"], vec![3, 4]),
        (vec!["--mission", "hst"], vec![5]),
        (vec!["--mission", "!HST"], vec![1, 2, 3, 4, 6]),
        (vec!["--program", ">1000"], vec![2, 3, 4, 5, 6]),
        (vec!["--program", "<=1500"], vec![1, 2, 5]),
        (vec!["--program", "1200..2000"], vec![2, 4, 5]),
        (vec!["--program", "!1200..2000"], vec![1, 3, 6]),
        (vec!["--program", "100", "--program", "3000"], vec![1, 6]),
        (vec!["--filename", "*_cal.fits"], vec![1, 3, 4, 5]),
        (vec!["--filename", "!*cal.fits"], vec![2]),
        (
            vec![
                "--mission",
                "JWST",
                "--program",
                ">1000",
                "--filename",
                "!*_rate.fits",
            ],
            vec![3, 4, 6],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let d = ws.path(&format!("D{i}"));
        let mut all = vec![notice.to_str().unwrap(), "--dir", d.to_str().unwrap(), "-q"];
        all.extend(args.iter().copied());
        let (code, out, err) = download(&ws, &all);
        assert_eq!(code, 0, "{args:?}\n{out}\n{err}");
        let complete: Vec<u64> = MIX
            .iter()
            .filter(|(n, ..)| {
                out.lines()
                    .any(|l| l.contains(&format!("x{n:05}_")) && l.contains("COMPLETE"))
            })
            .map(|(n, ..)| *n)
            .collect();
        assert_eq!(complete, expected, "{args:?}\n{out}");
        assert_eq!(
            out.matches("SKIPPED").count(),
            MIX.len() - expected.len(),
            "{args:?}\n{out}"
        );
        if args[0] == "--program" && args[1] == ">1000" {
            assert!(
                out.contains("filtered out: program 100 is not >1000"),
                "{out}"
            );
        }
    }
    let (code, _, err) = download(&ws, &[notice.to_str().unwrap(), "--program", "abc"]);
    assert_eq!(code, 2);
    assert!(err.contains("filter program = \"abc\""), "{err}");
}

#[test]
fn on_a_terminal_progress_shows_as_bars() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: no `script` to make a pseudo-terminal");
        return;
    }
    let mast = MastStandIn::start();
    serve_sample(&mast);
    mast.set_faults(Faults {
        slow: Some(Duration::from_millis(30)),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = ws.path("D");
    let command = format!(
        "{} --config {} download {} --dir {}",
        env!("CARGO_BIN_EXE_mastsub"),
        ws.config.display(),
        common::sample_notice().display(),
        d.display()
    );
    let out = std::process::Command::new("script")
        .args(["-q", "-e", "-c", &command, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("products"), "no total bar:\n{text}");
    assert!(text.contains("[="), "no bar drawn:\n{text}");
    assert!(
        !text.contains("started  "),
        "plain lines on a terminal:\n{text}"
    );
    assert_eq!(text.matches("COMPLETE").count(), 3, "{text}");
}

#[test]
fn the_daemon_applies_the_filters_section_and_still_records_every_event() {
    let mast = MastStandIn::start();
    let ws = Workspace::with_base(
        &mast.base_url,
        "[filters]\nprogram = [\">1000\"]\nfilename = [\"!*_rate.fits\"]\n",
    );
    let notice = mixed_notice(&mast, &ws);
    let d = common::Daemon::start_watching(&ws);
    std::fs::rename(&notice, ws.inbox().join("mix.json")).unwrap();
    assert!(
        common::wait_until(Duration::from_secs(20), || ws.db().exists()
            && ws.jobs_in("done") == 4),
        "{}",
        d.log()
    );
    // Programs above 1000 except the _rate file: 3, 4, 5, 6; all six events recorded.
    assert_eq!(ws.query_i64("SELECT count(*) FROM downloads"), 4);
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 6);
    assert_eq!(
        ws.query_i64("SELECT count(*) FROM events WHERE disposition = 'record_only'"),
        2
    );
}

#[test]
fn ctrl_c_stops_cleanly_and_the_next_run_resumes() {
    let mast = MastStandIn::start();
    let files = serve_sample(&mast);
    mast.set_faults(Faults {
        slow: Some(Duration::from_millis(400)),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = ws.path("D");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_mastsub"))
        .arg("--config")
        .arg(&ws.config)
        .arg("download")
        .arg(common::sample_notice())
        .arg("--dir")
        .arg(&d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Until some bytes are on disk.
    assert!(common::wait_until(Duration::from_secs(20), || ws
        .tree("D")
        .iter()
        .any(|p| p.ends_with(".part"))));
    std::thread::sleep(Duration::from_millis(300));
    let started = std::time::Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("interrupted; run the same command again to resume"),
        "{err}"
    );
    assert!(
        ws.tree("D").iter().any(|p| p.ends_with(".part")),
        "no .part kept"
    );

    mast.set_faults(Faults::default());
    let (code, out, _) = download(
        &ws,
        &[
            common::sample_notice().to_str().unwrap(),
            "--dir",
            d.to_str().unwrap(),
            "-q",
        ],
    );
    assert_eq!(code, 0, "{out}");
    for (path, body) in &files {
        assert!(std::fs::read(d.join("mastDownload").join(path)).unwrap() == *body);
    }
    assert!(
        mast.seen().iter().any(|s| s.status == 206),
        "nothing resumed"
    );
}

/// One integer from the one-shot's own store, `D/.mastsub/mastsub.db`.
fn oneshot_i64(d: &Path, sql: &str) -> i64 {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(d.join(".mastsub/mastsub.db"))
        .read_only(true);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let pool = sqlx::SqlitePool::connect_with(opts).await.unwrap();
        let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
        pool.close().await;
        n
    })
}

/// The requests the stand-in saw for product `name`.
fn gets_of(mast: &MastStandIn, name: &str) -> usize {
    mast.seen().iter().filter(|s| s.product == name).count()
}

/// New, then `later` of the same product with a later `archived_date`, in one notice: one row, COMPLETE,
/// of the latest version, one GET, exit 0 (astroquery: one row per file name, fetched once).
fn two_versions_in_one_notice_are_one_complete_row(later: &str) {
    let mast = MastStandIn::start();
    let ws = Workspace::with_base(&mast.base_url, "");
    let first = record(1, "New");
    let mut second = record(1, later);
    second["event_id"] = json!("00000000-0000-4000-8000-000000000099");
    second["archived_date"] = json!("2026-04-02T08:00:00.123");
    let name = first["filename"].as_str().unwrap().to_string();
    let body = fits_product(&name, 4, 2);
    mast.put(&name, body.clone());
    let notice = ws.write_notice("two.json", &serde_json::to_vec(&[first, second]).unwrap());
    let (d, manifest) = (ws.path("D"), ws.path("m.json"));
    let (code, out, err) = download(
        &ws,
        &[
            notice.to_str().unwrap(),
            "--dir",
            d.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{later}:\n{out}\n{err}");
    let rows: Vec<Value> = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(rows.len(), 1, "{later}: {rows:?}");
    assert_eq!(rows[0]["Status"], "COMPLETE", "{later}: {rows:?}");
    assert!(!out.contains("ERROR"), "{later}:\n{out}");
    assert_eq!(gets_of(&mast, &name), 1, "{later}: not one GET");
    let path = d
        .join("mastDownload/jwst")
        .join(format!("jw{:05}001001_02201_00001", 1))
        .join(&name);
    assert!(
        std::fs::read(path).unwrap() == body,
        "{later}: bytes differ"
    );
    // The one job is the latest version's.
    assert_eq!(oneshot_i64(&d, "SELECT count(*) FROM downloads"), 1);
    assert_eq!(
        oneshot_i64(
            &d,
            "SELECT count(*) FROM downloads WHERE state = 'done' AND version LIKE '2026-04-02T08:00:00.123%'"
        ),
        1,
        "{later}: the job is not of the later version"
    );
}

#[test]
fn new_and_reprocessed_of_one_product_in_one_notice_are_one_complete_row() {
    two_versions_in_one_notice_are_one_complete_row("Reprocessed");
}

#[test]
fn new_and_public_with_a_later_archived_date_are_one_complete_row() {
    two_versions_in_one_notice_are_one_complete_row("Public");
}

#[test]
fn flat_keeps_the_first_record_of_a_name_and_skips_other_products_of_that_name() {
    let mast = MastStandIn::start();
    let ws = Workspace::with_base(&mast.base_url, "");
    // Three products named alike: JWST in two filesets, and TESS (whose URL comes from its own `uri`,
    // so that a request for it can be told from the first's).
    let first = record(1, "New");
    let name = first["filename"].as_str().unwrap().to_string();
    let mut other_fileset = record(2, "New");
    other_fileset["filename"] = json!(name);
    let mut other_mission = record(3, "New");
    other_mission["mission"] = json!("TESS");
    other_mission["fileset"] = json!("tess_fileset_3");
    other_mission["filename"] = json!(name);
    other_mission["uri"] = json!("mast:TESS/product/decoy_same_name.fits");
    let body = fits_product(&name, 40, 1);
    mast.put(&name, body.clone());
    mast.put(
        "decoy_same_name.fits",
        fits_product("decoy_same_name.fits", 41, 7),
    );
    // Slow bodies, so that two jobs on one name would overlap.
    mast.set_faults(Faults {
        slow: Some(Duration::from_millis(20)),
        ..Faults::default()
    });
    let notice = ws.write_notice(
        "flat.json",
        &serde_json::to_vec(&[first.clone(), other_fileset.clone(), other_mission]).unwrap(),
    );
    let (d, manifest) = (ws.path("D"), ws.path("m.json"));
    let args = [
        notice.to_str().unwrap(),
        "--dir",
        d.to_str().unwrap(),
        "--flat",
        "--manifest",
        manifest.to_str().unwrap(),
    ];
    let holder = format!("jwst/{}/{name}", first["fileset"].as_str().unwrap());
    let reason = format!(
        "--flat: the name {name} is taken by {holder} (the first record); astroquery keeps the first too"
    );
    for run in ["first run", "re-run"] {
        let (code, out, err) = download(&ws, &args);
        assert_eq!(code, 0, "{run}:\n{out}\n{err}");
        let rows: Vec<Value> = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
        let statuses: Vec<&str> = rows.iter().map(|r| r["Status"].as_str().unwrap()).collect();
        assert_eq!(
            statuses,
            ["COMPLETE", "SKIPPED", "SKIPPED"],
            "{run}: {rows:?}"
        );
        let local = d.join(&name).display().to_string();
        assert!(
            rows.iter().all(|r| r["Local Path"] == local.as_str()),
            "{rows:?}"
        );
        for r in &rows[1..] {
            assert_eq!(r["Message"], reason.as_str(), "{run}");
        }
        assert!(
            rows[2]["URL"]
                .as_str()
                .unwrap()
                .contains("decoy_same_name.fits")
        );
        assert!(
            out.contains(&reason),
            "{run}: the reason is not printed:\n{out}"
        );
        // The first record's bytes, fetched once; the others never asked for.
        assert!(
            std::fs::read(d.join(&name)).unwrap() == body,
            "{run}: not the first's bytes"
        );
        assert_eq!(gets_of(&mast, &name), 1, "{run}");
        assert_eq!(gets_of(&mast, "decoy_same_name.fits"), 0, "{run}");
        assert!(!ws.tree("D").iter().any(|p| p.ends_with(".part")));
    }
    // Recorded, without a job.
    assert_eq!(oneshot_i64(&d, "SELECT count(*) FROM downloads"), 1);
    assert_eq!(
        oneshot_i64(
            &d,
            "SELECT count(*) FROM events WHERE disposition = 'record_only'"
        ),
        2
    );
}

#[test]
fn local_path_is_printed_as_astroquery_prints_it() {
    let mast = MastStandIn::start();
    let files = serve_sample(&mast);
    let ws = Workspace::with_base(&mast.base_url, "");
    let notice = common::sample_notice();
    let notice = notice.to_str().unwrap();
    let manifest = ws.path("m.json");
    let manifest = manifest.to_str().unwrap();
    let local_paths = |args: &[&str]| -> Vec<String> {
        let mut all = vec![notice, "-q", "--manifest", manifest];
        all.extend_from_slice(args);
        let (code, out, err) = download(&ws, &all);
        assert_eq!(code, 0, "{args:?}\n{out}\n{err}");
        let rows: Vec<Value> = serde_json::from_slice(&std::fs::read(manifest).unwrap()).unwrap();
        let paths: Vec<String> = rows
            .iter()
            .map(|r| r["Local Path"].as_str().unwrap().to_string())
            .collect();
        // The printed table says the same.
        for p in &paths {
            assert!(
                out.lines().any(|l| l.starts_with(&format!("{p} "))),
                "{p} is not printed:\n{out}"
            );
        }
        paths
    };
    // No --dir (the command runs in the workspace): relative, as pathlib prints Path('.') / 'mastDownload'.
    let expected: Vec<String> = files
        .iter()
        .map(|(p, _)| format!("mastDownload/{p}"))
        .collect();
    assert_eq!(local_paths(&[]), expected);
    assert!(ws.path("mastDownload").join(&files[0].0).exists());
    // --dir ./sub: pathlib drops the `.` too.
    let expected: Vec<String> = files
        .iter()
        .map(|(p, _)| format!("sub/mastDownload/{p}"))
        .collect();
    assert_eq!(local_paths(&["--dir", "./sub"]), expected);
    // --dir D: D/mastDownload/..., as given.
    let d = ws.path("D");
    let expected: Vec<String> = files
        .iter()
        .map(|(p, _)| d.join("mastDownload").join(p).display().to_string())
        .collect();
    assert_eq!(local_paths(&["--dir", d.to_str().unwrap()]), expected);
    // --flat without --dir, in a folder of its own (this one's store has the other layout's jobs): the
    // bare name.
    let ws = Workspace::with_base(&mast.base_url, "");
    let (code, out, err) = download(&ws, &[notice, "--flat", "-q"]);
    assert_eq!(code, 0, "{out}\n{err}");
    for (p, _) in &files {
        let name = Path::new(p).file_name().unwrap().to_str().unwrap();
        assert!(
            out.lines()
                .any(|l| l.starts_with(&format!("{name} ")) && l.contains(" COMPLETE ")),
            "{name}:\n{out}"
        );
        assert!(ws.path(name).exists());
    }
}

#[test]
fn a_download_waiting_for_room_says_why_once_and_finishes_when_room_appears() {
    let mast = MastStandIn::start();
    let files = serve_sample(&mast);
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = ws.path("D");
    let Some(_disk) = common::SmallDisk::mount(&d, "4m") else {
        assert!(
            std::env::var_os("CI").is_none(),
            "cannot mount a tmpfs in CI (not root?)"
        );
        eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
        return;
    };
    // Another program's file leaves less than 1 MiB free.
    let ballast = d.join("ballast");
    std::fs::write(&ballast, vec![0u8; 3 << 20]).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mastsub"))
        .arg("--config")
        .arg(&ws.config)
        .arg("download")
        .arg(common::sample_notice())
        .arg("--dir")
        .arg(&d)
        .env("MASTSUB_DOWNLOAD__MIN_FREE_SPACE", "1MiB")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            sink.lock().unwrap().push(l);
        }
    });
    let waiting = || {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with("waiting"))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(
        common::wait_until(Duration::from_secs(20), || !waiting().is_empty()),
        "no word of the wait: {:?}",
        lines.lock().unwrap()
    );
    std::thread::sleep(Duration::from_secs(2));
    let said = waiting();
    assert_eq!(said.len(), 1, "said more than once: {said:?}");
    assert!(said[0].contains("download.min_free_space"), "{said:?}");
    assert!(child.try_wait().unwrap().is_none(), "it gave up");
    std::fs::remove_file(&ballast).unwrap();
    let status = {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still waiting after room appeared"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(status.success(), "{:?}", lines.lock().unwrap());
    for (path, body) in &files {
        assert_eq!(
            std::fs::read(d.join("mastDownload").join(path)).unwrap(),
            *body,
            "{path}"
        );
    }
}
