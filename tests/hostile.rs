//! A hostile MAST: answers that look fine and lie. An HTML page with a 200 for a product of any format, an
//! encoding not asked for, bodies without a length that end early on a FITS block boundary, a 206 with
//! another total, symbolic links in the download tree, a trickle, a body that never ends, a disk filled by
//! the job itself, a name too long for its `.part`, a Retry-After of an hour. Every case ends with the
//! product byte-identical at its final path, or not published with a clear reason: never done with other
//! bytes.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::mast::{Faults, MastStandIn, RangeTotal, assert_identical, fits_product, html_page};
use common::{Daemon, SmallDisk, Workspace, record, wait_until};
use rstest::rstest;
use serde_json::{Value, json};

/// Long enough for a few retries with backoff on a busy two-core machine.
const SETTLE: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------------
// Small valid products of each format.

fn json_body() -> Vec<u8> {
    serde_json::to_vec_pretty(&json!([
        {"target": "NGC 1365", "exposures": 3, "filter": "F770W"},
        {"target": "M 51", "exposures": 1, "filter": "F1130W"}
    ]))
    .unwrap()
}

fn asdf_body() -> Vec<u8> {
    b"#ASDF 1.0.0\n#ASDF_STANDARD 1.5.0\n%YAML 1.1\n%TAG ! tag:stsci.edu:asdf/\n--- !core/asdf-1.1.0\nfoo: 1\n...\n"
        .to_vec()
}

fn ecsv_body() -> Vec<u8> {
    concat!(
        "# %ECSV 1.0\n",
        "# ---\n",
        "# datatype:\n",
        "# - {name: source_id, datatype: int64}\n",
        "# - {name: flux, datatype: float64}\n",
        "# schema: astropy-2.0\n",
        "source_id flux\n",
        "1 0.5\n",
        "2 1.25\n"
    )
    .as_bytes()
    .to_vec()
}

/// A 2x2 8-bit greyscale PNG: signature, IHDR, IDAT, IEND, each chunk with its CRC.
fn png_body() -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&2u32.to_be_bytes());
    ihdr.extend_from_slice(&2u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    // Two rows, each a filter byte (none) and two pixels.
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut z, &[0, 0x10, 0x20, 0, 0x30, 0x40]).unwrap();
    let idat = z.finish().unwrap();
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(&mut png, b"IDAT", &idat);
    chunk(&mut png, b"IEND", &[]);
    png
}

/// An 8x8 grey baseline JPEG: SOI, APP0 (JFIF), DQT, SOF0, DHT (DC and AC, one code each), SOS, one
/// block of entropy-coded data (DC difference 0, then end of block), EOI.
fn jpeg_body() -> Vec<u8> {
    let mut j = vec![0xFF, 0xD8];
    j.extend_from_slice(b"\xFF\xE0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00");
    j.extend_from_slice(&[0xFF, 0xDB, 0x00, 0x43, 0x00]);
    j.extend_from_slice(&[1; 64]);
    j.extend_from_slice(&[0xFF, 0xC0, 0x00, 0x0B, 8, 0, 8, 0, 8, 1, 1, 0x11, 0]);
    for class in [0x00, 0x10] {
        j.extend_from_slice(&[0xFF, 0xC4, 0x00, 0x14, class, 1]);
        j.extend_from_slice(&[0; 15]);
        j.push(0x00);
    }
    j.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x08, 1, 1, 0x00, 0, 63, 0]);
    j.push(0x3F);
    j.extend_from_slice(&[0xFF, 0xD9]);
    j
}

/// A FITS primary HDU with data: BITPIX = 8, NAXIS = 1, NAXIS1 = `n`, NEXTEND = 0, then `n` bytes padded
/// to 2880.
fn fits_with_data(name: &str, n: usize) -> Vec<u8> {
    let mut header = String::new();
    for card in [
        "SIMPLE  =                    T / conforms to FITS standard".to_string(),
        "BITPIX  =                    8".to_string(),
        "NAXIS   =                    1".to_string(),
        format!("NAXIS1  = {n:>20}"),
        // No extensions follow: a body without a length can be proven whole by the primary alone.
        "NEXTEND =                    0".to_string(),
        format!("FILENAME= '{}'", &name[..name.len().min(60)]),
        "END".to_string(),
    ] {
        header.push_str(&format!("{card:<80}"));
    }
    let mut out = format!("{header:<2880}").into_bytes();
    out.extend((0..n).map(|i| (i * 7 + i / 251) as u8));
    out.resize(out.len().div_ceil(2880) * 2880, 0);
    out
}

/// Bytes of no known format.
fn opaque_body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 97) as u8).collect()
}

/// A valid body for a product whose file ends with `ext`.
fn body_for(ext: &str, name: &str) -> Vec<u8> {
    match ext {
        "json" => json_body(),
        "asdf" => asdf_body(),
        "jpg" => jpeg_body(),
        "png" => png_body(),
        "ecsv" => ecsv_body(),
        "fits" => fits_product(name, 4, 1),
        "html" => html_page(),
        _ => opaque_body(50_000),
    }
}

// ---------------------------------------------------------------------------------------------------
// Helpers.

/// A record for product `n` whose file ends with `.ext`: (record, file name, path under mastDownload).
fn product(n: u64, ext: &str) -> (Value, String, String) {
    let mut r = record(n, "New");
    let name = format!("jw{n:05}001001_02201_00001_prod.{ext}");
    r["filename"] = json!(name);
    let rel = format!("jwst/{}/{name}", r["fileset"].as_str().unwrap());
    (r, name, rel)
}

fn notice(records: &[Value]) -> Vec<u8> {
    serde_json::to_vec(records).unwrap()
}

/// The daemon with these `MASTSUB_*` variables, once it watches its inbox.
fn daemon(ws: &Workspace, env: &[(&str, &str)]) -> Daemon {
    let d = Daemon::start_with_env(ws, env);
    d.wait_for_log("watching inbox", Duration::from_secs(30));
    d
}

fn tail(d: &Daemon) -> String {
    let log = d.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn state_of(ws: &Workspace, filename: &str) -> String {
    ws.query_string(&format!(
        "SELECT coalesce((SELECT state FROM downloads WHERE filename = '{filename}'), 'no job')"
    ))
}

/// Waits until the job of `filename` is in `state`, or fails as soon as it ends in another one. With
/// `watch`, the final path is looked at all along and must never hold other bytes than these.
fn wait_state(
    ws: &Workspace,
    d: &Daemon,
    filename: &str,
    state: &str,
    watch: Option<(&Path, &[u8])>,
) {
    let mut wrong = None;
    wait_until(SETTLE, || {
        if let Some((path, expected)) = watch
            && let Ok(got) = std::fs::read(path)
            && got != expected
        {
            wrong = Some(got.len());
        }
        let now = state_of(ws, filename);
        now == state || ["done", "failed", "needs_auth"].contains(&now.as_str())
    });
    assert_eq!(
        wrong, None,
        "{filename}: the final path held {wrong:?} bytes that are not the product's"
    );
    let now = state_of(ws, filename);
    assert!(
        now == state,
        "{filename}: {now} (last error {:?}), expected {state}; log tail:\n{}",
        last_error(ws, filename),
        tail(d)
    );
}

/// The job of `filename` as `list --json` shows it.
fn listed(ws: &Workspace, filename: &str) -> Value {
    let out = ws.cmd().args(["list", "--json"]).output().unwrap();
    assert!(
        out.status.success(),
        "list --json: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).expect("list --json is JSON");
    rows.into_iter()
        .find(|r| r["filename"] == filename)
        .unwrap_or_else(|| panic!("no job for {filename} in list --json"))
}

fn last_error(ws: &Workspace, filename: &str) -> String {
    listed(ws, filename)["last_error"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `filename`'s job ended `failed` with an error containing each of `needles`.
fn assert_failed_with(ws: &Workspace, filename: &str, needles: &[&str]) {
    let error = last_error(ws, filename);
    for needle in needles {
        assert!(
            error.contains(needle),
            "{filename}: the error does not say {needle:?}: {error:?}"
        );
    }
}

/// Nothing at the final path, and no `.part` left anywhere.
fn assert_not_published(ws: &Workspace, rel: &str) {
    let path = ws.path("mastDownload").join(rel);
    assert!(
        std::fs::symlink_metadata(&path).is_err(),
        "{rel} was published"
    );
    let parts: Vec<_> = ws
        .tree("mastDownload")
        .into_iter()
        .filter(|p| p.ends_with(".part"))
        .collect();
    assert!(parts.is_empty(), ".part files left: {parts:?}");
}

/// Every file under `dir`, recursively, with its bytes.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(snapshot(&p));
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
        }
    }
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------------------
// The honest control: the bodies above are valid, so the cases below fail for the lie and nothing else.

#[test]
fn products_of_every_format_served_honestly_are_published_byte_identical() {
    let mast = MastStandIn::start();
    let mut records = Vec::new();
    let mut files = Vec::new();
    for (n, ext) in ["json", "asdf", "jpg", "png", "ecsv", "fits", "html", "dat"]
        .into_iter()
        .enumerate()
    {
        let (r, name, rel) = product(n as u64 + 1, ext);
        let body = body_for(ext, &name);
        mast.put(&name, body.clone());
        records.push(r);
        files.push((rel, body));
    }
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = daemon(&ws, &[]);
    ws.drop_notice("n.json", &notice(&records));
    common::mast::wait_done(&ws, &d, files.len() as i64, SETTLE);
    assert_identical(&ws, &files);
    // `list --json` says what each was proven by.
    for (r, by) in records.iter().zip([
        "JSON: parses",
        "ASDF: header, tree end",
        "JPEG: start and end markers",
        "PNG: 3 chunks with good CRCs",
        "ECSV: header and UTF-8",
        "FITS: 1 HDU, structure only",
        "size only (an HTML product)",
        "size only (no verifier for .dat files)",
    ]) {
        let name = r["filename"].as_str().unwrap();
        let verified = listed(&ws, name)["verified"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            verified.starts_with(by),
            "{name}: verified {verified:?}, expected {by:?}"
        );
    }
    assert!(
        d.log()
            .contains("no verifier for this format; only its size was checked"),
        "the unknown format is not named in the log"
    );
}

// ---------------------------------------------------------------------------------------------------
// An HTML page with a 200.

#[rstest]
fn an_html_page_answered_for_a_product_is_never_published(
    #[values("json", "asdf", "jpg", "png", "ecsv", "fits")] ext: &str,
    #[values(true, false)] labelled_html: bool,
) {
    let mast = MastStandIn::start();
    let (r, name, rel) = product(1, ext);
    mast.put(&name, body_for(ext, &name));
    mast.set_faults(Faults {
        html_page: labelled_html,
        html_as_octets: !labelled_html,
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = daemon(&ws, &[("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "3")]);
    ws.drop_notice("n.json", &notice(&[r]));
    wait_state(&ws, &d, &name, "failed", None);
    assert_failed_with(&ws, &name, &["HTML page"]);
    assert_not_published(&ws, &rel);
    let seen = mast.seen();
    assert!(
        !seen.is_empty() && seen.iter().all(|s| s.status == 200),
        "{seen:?}"
    );
}

#[test]
fn an_html_product_served_as_html_is_published() {
    let mast = MastStandIn::start();
    let (r, name, rel) = product(1, "html");
    mast.put(&name, html_page());
    mast.set_faults(Faults {
        html_page: true,
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = daemon(&ws, &[]);
    ws.drop_notice("n.json", &notice(&[r]));
    let page = html_page();
    let final_path = ws.path("mastDownload").join(&rel);
    wait_state(&ws, &d, &name, "done", Some((&final_path, &page)));
    assert_identical(&ws, &[(rel, page)]);
}

// ---------------------------------------------------------------------------------------------------
// Content-Encoding not asked for.

#[test]
fn a_gzip_content_encoding_not_asked_for_fails_the_job() {
    let mast = MastStandIn::start();
    let (r, name, rel) = product(1, "fits");
    mast.put(&name, fits_product(&name, 10, 1));
    mast.set_faults(Faults {
        gzip_encoding: true,
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = daemon(&ws, &[("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "3")]);
    ws.drop_notice("n.json", &notice(&[r]));
    wait_state(&ws, &d, &name, "failed", None);
    assert_failed_with(&ws, &name, &["Content-Encoding"]);
    assert_not_published(&ws, &rel);
    let seen = mast.seen();
    assert!(!seen.is_empty());
    assert!(
        seen.iter()
            .all(|s| s.accept_encoding.as_deref() == Some("identity")),
        "a request did not ask for Accept-Encoding: identity: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// No Content-Length.

#[test]
fn a_fits_body_without_length_cut_on_a_block_boundary_is_not_published_and_the_next_attempt_is() {
    let mast = MastStandIn::start();
    let (r, name, rel) = product(1, "fits");
    // A header block and six data blocks (5 × 2880 + 100 bytes of data, padded).
    let body = fits_with_data(&name, 5 * 2880 + 100);
    assert_eq!(body.len(), 7 * 2880);
    mast.put(&name, body.clone());
    // Cut inside the data, on a block boundary: a multiple of 2880 that begins with SIMPLE, closed cleanly.
    mast.set_faults(Faults {
        no_length: true,
        cut_at: Some(3 * 2880),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = daemon(&ws, &[]);
    ws.drop_notice("n.json", &notice(&[r]));
    let final_path = ws.path("mastDownload").join(&rel);
    wait_state(&ws, &d, &name, "done", Some((&final_path, &body)));
    assert_identical(&ws, &[(rel, body)]);
    let seen = mast.seen();
    assert!(
        seen.len() >= 2,
        "the cut body was taken for the whole product (one request): {seen:?}"
    );
}

#[test]
fn a_product_of_unknown_format_without_length_fails_for_having_no_length() {
    let mast = MastStandIn::start();
    let (r, name, rel) = product(1, "dat");
    mast.put(&name, opaque_body(40_000));
    mast.set_faults(Faults {
        no_length: true,
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = daemon(&ws, &[("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "3")]);
    ws.drop_notice("n.json", &notice(&[r]));
    wait_state(&ws, &d, &name, "failed", None);
    assert_failed_with(&ws, &name, &["no length"]);
    assert_not_published(&ws, &rel);
}

#[test]
fn a_product_of_unknown_format_without_length_is_published_when_unsized_bodies_are_accepted() {
    let mast = MastStandIn::start();
    let (r, name, rel) = product(1, "dat");
    let body = opaque_body(40_000);
    mast.put(&name, body.clone());
    mast.set_faults(Faults {
        no_length: true,
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = daemon(&ws, &[("MASTSUB_DOWNLOAD__ACCEPT_UNSIZED_BODIES", "true")]);
    ws.drop_notice("n.json", &notice(&[r]));
    let final_path = ws.path("mastDownload").join(&rel);
    wait_state(&ws, &d, &name, "done", Some((&final_path, &body)));
    assert_identical(&ws, &[(rel, body)]);
}

// ---------------------------------------------------------------------------------------------------
// A resume answered with another total.

#[rstest]
#[case::unknown_total(RangeTotal::Star)]
#[case::a_larger_total(RangeTotal::Plus(1000))]
fn a_resume_answered_with_another_total_starts_over_and_ends_whole(#[case] total: RangeTotal) {
    let mast = MastStandIn::start();
    let (r, name, rel) = product(1, "fits");
    let body = fits_product(&name, 40, 1);
    mast.put(&name, body.clone());
    // The first body (a 200, with validators) is cut half-way, leaving a .part to resume; the resume's
    // 206 then lies about the total. The 200 that follows a fresh start is true.
    mast.set_faults(Faults {
        cut_at: Some(20 * 2880),
        range_total: Some(total),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = daemon(&ws, &[]);
    ws.drop_notice("n.json", &notice(&[r]));
    let final_path = ws.path("mastDownload").join(&rel);
    wait_state(&ws, &d, &name, "done", Some((&final_path, &body)));
    assert_identical(&ws, &[(rel, body)]);
    let seen = mast.seen();
    let lie = seen
        .iter()
        .position(|s| s.status == 206)
        .unwrap_or_else(|| panic!("no resume was tried after the cut: {seen:?}"));
    assert!(
        seen[lie].if_range.is_some(),
        "the resume had no validator: {seen:?}"
    );
    assert!(
        seen.get(lie + 1).is_some_and(|s| s.range.is_none()),
        "after a 206 with another total the client must start over without Range: {seen:?}"
    );
}

// ---------------------------------------------------------------------------------------------------
// Symbolic links in the download tree.

/// Where the planted link is.
enum Link {
    /// `mastDownload/jwst/<fileset>/<file>.part` → a file outside.
    Part,
    /// `mastDownload/jwst/<fileset>` → a folder outside.
    Fileset,
    /// `mastDownload/jwst` → a folder outside.
    Mission,
}

fn a_symbolic_link_fails_the_job_untouched(link: Link) {
    let mast = MastStandIn::start();
    let (r, name, _) = product(1, "fits");
    mast.put(&name, fits_product(&name, 6, 1));
    let ws = Workspace::with_base(&mast.base_url, "");
    let outside = tempfile::tempdir().unwrap();
    let fileset = r["fileset"].as_str().unwrap().to_string();
    let downloads = ws.path("mastDownload");
    let victim_bytes = b"a file outside the download folder: it must never change\n";
    let (link_path, victim) = match link {
        Link::Part => {
            let dir = downloads.join("jwst").join(&fileset);
            std::fs::create_dir_all(&dir).unwrap();
            let victim = outside.path().join("victim.bin");
            std::fs::write(&victim, victim_bytes).unwrap();
            let link_path = dir.join(format!("{name}.part"));
            std::os::unix::fs::symlink(&victim, &link_path).unwrap();
            (link_path, victim)
        }
        Link::Fileset => {
            std::fs::create_dir_all(downloads.join("jwst")).unwrap();
            let victim = outside.path().join(&name);
            std::fs::write(&victim, victim_bytes).unwrap();
            let link_path = downloads.join("jwst").join(&fileset);
            std::os::unix::fs::symlink(outside.path(), &link_path).unwrap();
            (link_path, victim)
        }
        Link::Mission => {
            std::fs::create_dir_all(&downloads).unwrap();
            std::fs::create_dir_all(outside.path().join(&fileset)).unwrap();
            let victim = outside.path().join(&fileset).join(&name);
            std::fs::write(&victim, victim_bytes).unwrap();
            let link_path = downloads.join("jwst");
            std::os::unix::fs::symlink(outside.path(), &link_path).unwrap();
            (link_path, victim)
        }
    };
    let before = snapshot(outside.path());

    let d = daemon(&ws, &[("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "3")]);
    ws.drop_notice("n.json", &notice(&[r]));
    wait_state(&ws, &d, &name, "failed", None);

    assert_eq!(std::fs::read(&victim).unwrap(), victim_bytes);
    assert_eq!(
        snapshot(outside.path()),
        before,
        "the folder outside the download folder changed"
    );
    assert!(
        std::fs::symlink_metadata(&link_path).is_ok_and(|m| m.file_type().is_symlink()),
        "the link {} was removed",
        link_path.display()
    );
    assert_failed_with(&ws, &name, &["symbolic link", link_path.to_str().unwrap()]);
}

#[test]
fn a_symbolic_link_as_the_part_file_is_not_followed() {
    a_symbolic_link_fails_the_job_untouched(Link::Part);
}

#[test]
fn a_symbolic_link_as_the_fileset_folder_is_not_followed() {
    a_symbolic_link_fails_the_job_untouched(Link::Fileset);
}

#[test]
fn a_symbolic_link_as_the_mission_folder_is_not_followed() {
    a_symbolic_link_fails_the_job_untouched(Link::Mission);
}

// ---------------------------------------------------------------------------------------------------
// Bounded attempts: a trickle, an endless body, a disk filled by the job itself.

#[test]
fn trickled_products_are_cut_off_by_the_low_speed_limit_and_do_not_block_the_others() {
    let mast = MastStandIn::start();
    let mut records = Vec::new();
    let mut trickled = Vec::new();
    let mut normal = Vec::new();
    // The trickled ones first: they take all four workers.
    for n in 1..=6u64 {
        let (r, name, rel) = product(n, "fits");
        let body = fits_product(&name, 4, 1);
        mast.put(&name, body.clone());
        records.push(r);
        if n <= 4 {
            trickled.push(name);
        } else {
            normal.push((name, rel, body));
        }
    }
    mast.set_faults(Faults {
        trickle_bytes_per_sec: Some(1),
        trickle_only: trickled.clone(),
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let d = daemon(
        &ws,
        &[
            ("MASTSUB_DOWNLOAD__WORKERS", "4"),
            ("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "50"),
            ("MASTSUB_DOWNLOAD__MIN_RATE", "1000B/s"),
            ("MASTSUB_DOWNLOAD__MIN_RATE_WINDOW", "2s"),
        ],
    );
    let start = Instant::now();
    ws.drop_notice("n.json", &notice(&records));
    let limit = Duration::from_secs(25);
    let normal_done = || {
        normal
            .iter()
            .all(|(name, _, _)| state_of(&ws, name) == "done")
    };
    assert!(
        wait_until(limit, normal_done),
        "the normal products were not done within {limit:?} ({:?}); log tail:\n{}",
        normal
            .iter()
            .map(|(n, _, _)| state_of(&ws, n))
            .collect::<Vec<_>>(),
        tail(&d)
    );
    eprintln!("the normal products were done after {:?}", start.elapsed());
    let files: Vec<_> = normal
        .iter()
        .map(|(_, rel, body)| (rel.clone(), body.clone()))
        .collect();
    for (rel, body) in &files {
        assert_eq!(
            std::fs::read(ws.path("mastDownload").join(rel)).unwrap(),
            *body
        );
    }
    let retried = |name: &str| {
        let attempts = ws.query_i64(&format!(
            "SELECT attempts FROM downloads WHERE filename = '{name}'"
        ));
        let requests = mast.seen().iter().filter(|s| s.product == name).count();
        let error = ws.query_string(&format!(
            "SELECT coalesce(last_error, '') FROM downloads WHERE filename = '{name}'"
        ));
        (attempts >= 2 || requests >= 2) && error.contains("download.min_rate")
    };
    assert!(
        wait_until(SETTLE, || trickled.iter().all(|n| retried(n))),
        "trickled products not retried for download.min_rate: {:?}; log tail:\n{}",
        trickled
            .iter()
            .map(|n| (state_of(&ws, n), last_error(&ws, n)))
            .collect::<Vec<_>>(),
        tail(&d)
    );
    for name in &trickled {
        assert_ne!(state_of(&ws, name), "done", "{name} was trickled, yet done");
        assert!(last_error(&ws, name).contains("download.min_rate"));
    }
}

/// A `.dat` product whose body never ends (sent with no length), and its notice record.
fn serve_endless(mast: &MastStandIn) -> (Value, String, String) {
    let (r, name, rel) = product(1, "dat");
    mast.put(&name, opaque_body(100_000));
    mast.set_faults(Faults {
        no_length: true,
        endless: true,
        ..Faults::default()
    });
    (r, name, rel)
}

/// A daemon that accepts bodies with no length up to `max_size`, then the endless product's notice; waits
/// until the job has failed.
fn download_endless(ws: &Workspace, r: Value, name: &str, max_size: &str) -> Daemon {
    let d = daemon(
        ws,
        &[
            ("MASTSUB_DOWNLOAD__ACCEPT_UNSIZED_BODIES", "true"),
            ("MASTSUB_DOWNLOAD__MAX_PRODUCT_SIZE", max_size),
            ("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", "3"),
        ],
    );
    ws.drop_notice("n.json", &notice(&[r]));
    wait_state(ws, &d, name, "failed", None);
    d
}

#[test]
fn an_endless_body_fails_at_the_maximum_product_size() {
    let mast = MastStandIn::start();
    let (r, name, rel) = serve_endless(&mast);
    let ws = Workspace::with_base(&mast.base_url, "");
    let _d = download_endless(&ws, r, &name, "1MiB");
    assert_failed_with(&ws, &name, &["download.max_product_size"]);
    assert_not_published(&ws, &rel);
}

#[test]
fn a_disk_filled_by_the_job_s_own_part_fails_it_and_the_room_comes_back() {
    let mast = MastStandIn::start();
    let (r, name, rel) = serve_endless(&mast);
    let ws = Workspace::with_base(&mast.base_url, "");
    let downloads = ws.path("mastDownload");
    let Some(_disk) = SmallDisk::mount(&downloads, "4m") else {
        eprintln!(
            "SKIPPED: cannot mount a tmpfs here (not root?); a disk filled by the job was not checked"
        );
        return;
    };
    let _d = download_endless(&ws, r, &name, "1GiB");
    assert_failed_with(&ws, &name, &["filled"]);
    assert_not_published(&ws, &rel);
    let fs = nix::sys::statvfs::statvfs(&downloads).unwrap();
    let (free, total) = (fs.blocks_available(), fs.blocks());
    assert!(
        free * 10 >= total * 9,
        "the disk has no room again: {free} of {total} blocks free"
    );
}

// ---------------------------------------------------------------------------------------------------
// A name too long for its `.part`.

#[test]
fn a_filename_too_long_for_its_part_file_is_refused_by_field_and_the_others_are_recorded() {
    let ws = Workspace::new();
    let mut long = record(2, "New");
    let name = format!("{}.fits", "x".repeat(247));
    assert_eq!(name.len(), 252, "with .part: 257 bytes, past NAME_MAX");
    long["filename"] = json!(name);
    let file = ws.write_notice(
        "long.json",
        &notice(&[record(1, "New"), long, record(3, "New")]),
    );
    ws.cmd()
        .arg("ingest")
        .arg(&file)
        .assert()
        .code(1)
        .stderr(predicates::str::contains(
            "long.json: record 1, field \"filename\"",
        ));
    assert_eq!(ws.query_i64("SELECT count(*) FROM events"), 2);
    assert_eq!(ws.query_i64("SELECT count(*) FROM downloads"), 2);
    assert_eq!(
        ws.query_i64(&format!(
            "SELECT count(*) FROM events WHERE filename = '{name}'"
        )),
        0
    );
}

// ---------------------------------------------------------------------------------------------------
// Retry-After of an hour.

#[test]
fn a_one_shot_download_does_not_wait_an_hour_for_retry_after() {
    let mast = MastStandIn::start();
    let (r, name, rel) = product(1, "fits");
    let body = fits_product(&name, 5, 1);
    mast.put(&name, body.clone());
    mast.set_faults(Faults {
        unavailable_next: 2,
        retry_after: 3600,
        ..Faults::default()
    });
    let ws = Workspace::with_base(&mast.base_url, "");
    let notice_path = ws.write_notice("n.json", &notice(&[r]));
    let dir = ws.path("D");
    let start = Instant::now();
    let out = ws
        .cmd()
        .env("MASTSUB_DOWNLOAD__RETRY_MAX", "5s")
        .arg("download")
        .arg(&notice_path)
        .arg("--dir")
        .arg(&dir)
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    let took = start.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("COMPLETE"), "{stdout}");
    assert!(
        took < Duration::from_secs(60),
        "took {took:?}: Retry-After was waited for beyond retry_max"
    );
    assert_eq!(
        std::fs::read(dir.join("mastDownload").join(&rel)).unwrap(),
        body
    );
    let statuses: Vec<u16> = mast.seen().iter().map(|s| s.status).collect();
    assert_eq!(statuses, [503, 503, 200]);
}
