//! Cloud-first downloads (`[cloud]`, `download --cloud`): public products from an S3 bucket, MAST as the
//! fall-back. Against the MAST stand-in with its path look-up and an S3-like stand-in bucket (403 for a
//! missing key, MD5 ETags, `md5-N` multipart ETags, checksum headers, and the faults of the stand-in), and
//! against moto, an S3 implementation someone else wrote.

mod common;

use std::time::Duration;

use common::mast::{
    Faults, MastStandIn, Object, assert_identical, crc64nvme, fits_product, wait_done,
};
use common::{Daemon, Workspace, record, wait_until};
use serde_json::{Value, json};

/// A notice, its files (local path, bytes) and their bucket keys.
type Served = (Vec<u8>, Vec<(String, Vec<u8>)>, Vec<String>);

/// `count` products of `event_type` numbered from `first`, `blocks` FITS blocks each: MAST serves them,
/// its path look-up names `jwst/public/<fileset>/<file>`, and the bucket holds each (as `how(n)` says;
/// `None`: not in the bucket, though the look-up names it). Returns the notice, the files and the keys.
fn cloud_products(
    mast: &MastStandIn,
    bucket: &MastStandIn,
    first: u64,
    count: u64,
    blocks: usize,
    event_type: &str,
    how: impl Fn(u64, &[u8]) -> Option<Object>,
) -> Served {
    let mut records = Vec::new();
    let mut files = Vec::new();
    let mut keys = Vec::new();
    for n in first..first + count {
        let r = record(n, event_type);
        let name = r["filename"].as_str().unwrap().to_string();
        let fileset = r["fileset"].as_str().unwrap().to_string();
        let body = fits_product(&name, blocks, 1);
        mast.put(&name, body.clone());
        let key = format!("jwst/public/{fileset}/{name}");
        mast.set_cloud_path(
            &format!("mast:JWST/product/{name}"),
            Some(&format!("/{key}")),
        );
        if let Some(object) = how(n, &body) {
            bucket.put_object(&key, body.clone(), object);
        }
        files.push((format!("jwst/{fileset}/{name}"), body));
        keys.push(key);
        records.push(r);
    }
    (serde_json::to_vec(&records).unwrap(), files, keys)
}

fn cloud_config(bucket_url: &str, extra: &str) -> String {
    format!("[cloud]\nenabled = true\nbucket_url = {bucket_url:?}\n{extra}\n")
}

/// A workspace on `mast` with `[cloud]` on `bucket`.
fn workspace(mast: &MastStandIn, bucket: &MastStandIn) -> Workspace {
    Workspace::with_base(&mast.base_url, &cloud_config(&bucket.base_url, ""))
}

/// ...and its daemon, watching its inbox.
fn watching(mast: &MastStandIn, bucket: &MastStandIn) -> (Workspace, Daemon) {
    let ws = workspace(mast, bucket);
    let d = Daemon::start_watching(&ws);
    (ws, d)
}

fn list(ws: &Workspace) -> Vec<Value> {
    let out = ws.cmd().args(["list", "--json"]).output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Product requests MAST saw (its path look-ups are not among them).
fn product_requests(mast: &MastStandIn) -> usize {
    mast.seen().len()
}

#[test]
fn public_products_come_from_the_bucket_byte_identical_and_mast_is_only_asked_where_they_are() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    // 90 products: three look-ups of at most 40. Every third has a CRC64NVME, every fifth was uploaded
    // in parts.
    let (notice, files, keys) = cloud_products(&mast, &bucket, 1, 90, 12, "Public", |n, body| {
        Some(Object {
            multipart: (n.is_multiple_of(5)).then_some(8 * 2880),
            checksum: (n.is_multiple_of(3))
                .then(|| ("x-amz-checksum-crc64nvme".to_string(), crc64nvme(body))),
            ..Object::default()
        })
    });
    let port = common::free_port();
    let ws = Workspace::with_base(
        &mast.base_url,
        &format!(
            "{}\n[http]\nenabled = true\nlisten = \"127.0.0.1:{port}\"\n",
            cloud_config(&bucket.base_url, "")
        ),
    );
    let d = Daemon::start_with_env(&ws, &[("MAST_API_TOKEN", "secret-token-1")]);
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("public.json", &notice);
    wait_done(&ws, &d, 90, Duration::from_secs(60));
    assert_identical(&ws, &files);

    assert_eq!(
        product_requests(&mast),
        0,
        "MAST served products: {:?}",
        mast.seen()
    );
    let lookups = mast.lookups();
    assert!(
        lookups
            .iter()
            .all(|(uris, flag)| uris.len() <= 40 && flag.as_deref() == Some("True")),
        "{lookups:?}"
    );
    let asked: std::collections::BTreeSet<&String> = lookups.iter().flat_map(|(u, _)| u).collect();
    assert_eq!(asked.len(), 90, "every product looked up");
    assert!(
        lookups.len() <= 4,
        "{} look-ups for 90 products: not batched",
        lookups.len()
    );
    let seen = bucket.seen();
    assert_eq!(seen.len(), 90, "{seen:?}");
    assert!(
        seen.iter().all(|s| s.authorization.is_none()),
        "the MAST token went to the bucket"
    );
    assert!(
        seen.iter()
            .all(|s| s.checksum_mode.as_deref() == Some("ENABLED"))
    );
    assert!(keys.iter().all(|k| seen.iter().any(|s| &s.product == k)));

    let rows = list(&ws);
    for r in &rows {
        assert_eq!(r["source"], "cloud", "{r}");
        let from = r["fetched_from"].as_str().unwrap();
        assert!(
            from.starts_with(&format!("{}/jwst/public/", bucket.base_url)),
            "{from}"
        );
        let verified = r["verified"].as_str().unwrap();
        let n: u64 = r["filename"].as_str().unwrap()[2..7].parse().unwrap();
        // One whole-object digest, the cheapest given: the CRC where there is one, else the MD5 a
        // single-part object's ETag is.
        if n.is_multiple_of(3) {
            assert!(verified.contains("S3 CRC64NVME matched"), "{verified}");
        } else if n.is_multiple_of(5) {
            assert!(
                verified.contains("multipart ETag not checkable"),
                "{verified}"
            );
        } else {
            assert!(verified.contains("S3 ETag (MD5) matched"), "{verified}");
        }
        assert!(verified.starts_with("FITS"), "{verified}");
    }
    assert!(d.log().contains("from the cloud bucket ("), "{}", d.log());
    let (_, metrics) = common::http_get(port, "/metrics");
    assert!(
        metrics.contains("mastsub_products_published_total{source=\"cloud\"} 90"),
        "{metrics}"
    );
    assert!(metrics.contains("mastsub_products_published_total{source=\"mast\"} 0"));
}

#[test]
fn a_product_the_bucket_lacks_comes_from_mast_and_one_not_in_the_cloud_never_asks_the_bucket() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    // 1: in the bucket. 2: named by the look-up, missing from the bucket (403). 3: not in the cloud.
    let (notice, files, keys) = cloud_products(&mast, &bucket, 1, 3, 10, "New", |n, _| {
        (n == 1).then(Object::default)
    });
    mast.set_cloud_path(
        &format!(
            "mast:JWST/product/{}",
            files[2].0.rsplit('/').next().unwrap()
        ),
        None,
    );
    let (ws, d) = watching(&mast, &bucket);
    ws.drop_notice("three.json", &notice);
    wait_done(&ws, &d, 3, Duration::from_secs(30));
    assert_identical(&ws, &files);

    let seen = bucket.seen();
    let asked = |k: &str| seen.iter().filter(|s| s.product == k).count();
    assert_eq!(asked(&keys[0]), 1);
    assert_eq!(asked(&keys[1]), 1, "{seen:?}");
    assert!(seen.iter().any(|s| s.product == keys[1] && s.status == 403));
    assert_eq!(
        asked(&keys[2]),
        0,
        "a product not in the cloud was asked of the bucket"
    );
    let served: Vec<String> = mast.seen().into_iter().map(|s| s.product).collect();
    assert_eq!(served.len(), 2, "{served:?}");
    let sources: Vec<(String, String)> = list(&ws)
        .iter()
        .map(|r| {
            (
                r["filename"].as_str().unwrap()[..7].to_string(),
                r["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        [
            ("jw00001", "cloud"),
            ("jw00002", "mast"),
            ("jw00003", "mast")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    // `list` for a terminal says it too, in its FROM column (before the path).
    let out = ws.cmd().arg("list").output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(table.lines().next().unwrap().contains(" FROM "), "{table}");
    let from: Vec<&str> = table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().rev().nth(1).unwrap_or(""))
        .collect();
    assert_eq!(from, ["cloud", "mast", "mast"], "{table}");
    let log = d.log();
    assert_eq!(
        log.matches("the cloud bucket has no object").count(),
        1,
        "{log}"
    );
    // The bucket's answer is kept: the look-up's key is forgotten for a while.
    assert_eq!(
        ws.query_i64(&format!(
            "SELECT count(*) FROM cloud_paths WHERE key IS NULL AND uri LIKE '%{}'",
            files[1].0.rsplit('/').next().unwrap()
        )),
        1
    );
}

#[test]
fn download_cloud_only_skips_what_is_not_in_the_cloud_and_exits_1_while_cloud_falls_back() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    let (notice, files, _) = cloud_products(&mast, &bucket, 1, 2, 8, "Public", |n, _| {
        (n == 1).then(Object::default)
    });
    let missing = files[1].0.rsplit('/').next().unwrap().to_string();
    mast.set_cloud_path(&format!("mast:JWST/product/{missing}"), None);
    let ws = Workspace::with_base(
        &mast.base_url,
        &format!("[cloud]\nbucket_url = {:?}\n", bucket.base_url),
    );
    let path = ws.write_notice("n.json", &notice);

    let only = ws.path("only");
    let out = ws
        .cmd()
        .args(["download", "--cloud-only", "--quiet", "--dir"])
        .arg(&only)
        .arg("--manifest")
        .arg(ws.path("only.json"))
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: Vec<Value> =
        serde_json::from_slice(&std::fs::read(ws.path("only.json")).unwrap()).unwrap();
    assert_eq!(manifest[0]["Status"], "COMPLETE", "{manifest:?}");
    assert!(
        manifest[0]["URL"]
            .as_str()
            .unwrap()
            .starts_with(&bucket.base_url)
    );
    assert_eq!(manifest[1]["Status"], "SKIPPED");
    assert_eq!(manifest[1]["Message"], "Product not found in cloud");
    assert_eq!(
        std::fs::read(only.join("mastDownload").join(&files[0].0)).unwrap(),
        files[0].1
    );
    assert!(!only.join("mastDownload").join(&files[1].0).exists());
    assert_eq!(
        product_requests(&mast),
        0,
        "MAST was asked under --cloud-only"
    );

    let both = ws.path("both");
    let out = ws
        .cmd()
        .args(["download", "--cloud", "--quiet", "--dir"])
        .arg(&both)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (rel, body) in &files {
        assert_eq!(
            &std::fs::read(both.join("mastDownload").join(rel)).unwrap(),
            body
        );
    }
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(table.contains(&bucket.base_url), "{table}");
    assert_eq!(product_requests(&mast), 1);
}

#[test]
fn bucket_bytes_that_do_not_match_its_etag_or_checksum_are_refused_and_mast_gives_the_product() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    // The bucket's copies are damaged in one data byte, which the FITS walk cannot see (no DATASUM):
    // only S3's own digests of what it stored can. 1: its ETag is the MD5 of the good bytes; 2: its
    // CRC64NVME is.
    let (notice, files, keys) = cloud_products(&mast, &bucket, 1, 2, 10, "Public", |_, _| None);
    for (i, (key, (_, body))) in keys.iter().zip(&files).enumerate() {
        let mut damaged = body.clone();
        damaged[2880 + 100] ^= 0x20;
        let object = if i == 0 {
            Object {
                etag: Some(common::mast::s3_etag(body, None)),
                ..Object::default()
            }
        } else {
            Object {
                checksum: Some(("x-amz-checksum-crc64nvme".into(), crc64nvme(body))),
                ..Object::default()
            }
        };
        bucket.put_object(key, damaged, object);
    }
    let (ws, d) = watching(&mast, &bucket);
    ws.drop_notice("damaged.json", &notice);
    wait_done(&ws, &d, 2, Duration::from_secs(30));
    assert_identical(&ws, &files);
    let log = d.log();
    assert!(log.contains("but the bucket's ETag says"), "{log}");
    assert!(log.contains("CRC64NVME is"), "{log}");
    assert!(
        log.contains("from MAST now: the bucket's copy failed verification"),
        "{log}"
    );
    assert!(list(&ws).iter().all(|r| r["source"] == "mast"));
    assert_eq!(product_requests(&mast), 2);
}

#[test]
fn cloud_only_never_publishes_a_damaged_bucket_copy() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    let (notice, files, keys) = cloud_products(&mast, &bucket, 1, 1, 10, "Public", |_, _| None);
    let mut damaged = files[0].1.clone();
    damaged[2880 * 3] ^= 1;
    bucket.put_object(
        &keys[0],
        damaged,
        Object {
            etag: Some(common::mast::s3_etag(&files[0].1, None)),
            ..Object::default()
        },
    );
    let ws = Workspace::with_base(
        &mast.base_url,
        &cloud_config(&bucket.base_url, "only = true"),
    );
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("damaged.json", &notice);
    assert!(
        wait_until(Duration::from_secs(30), || ws.jobs_in("failed") == 1),
        "{}",
        d.log()
    );
    assert!(
        ws.tree("mastDownload").is_empty(),
        "{:?}",
        ws.tree("mastDownload")
    );
    assert_eq!(
        bucket.seen().len(),
        3,
        "three fetches from zero, then failed"
    );
    assert_eq!(product_requests(&mast), 0);
    let error = ws.query_string("SELECT last_error FROM downloads");
    assert!(error.contains("not the object S3 stored"), "{error}");
}

#[test]
fn a_kill_9_mid_transfer_from_the_bucket_resumes_from_the_bucket() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    // Uploaded in parts, as large objects are: its ETag proves nothing, its CRC64NVME does.
    let (notice, files, keys) = cloud_products(&mast, &bucket, 1, 1, 2000, "Public", |_, body| {
        Some(Object {
            multipart: Some(1 << 20),
            checksum: Some(("x-amz-checksum-crc64nvme".into(), crc64nvme(body))),
            ..Object::default()
        })
    });
    bucket.set_faults(Faults {
        slow: Some(Duration::from_millis(20)),
        ..Faults::default()
    });
    let (ws, mut d) = watching(&mast, &bucket);
    ws.drop_notice("big.json", &notice);
    let part = ws.path("mastDownload").join(format!("{}.part", files[0].0));
    assert!(
        wait_until(Duration::from_secs(30), || {
            std::fs::metadata(&part).is_ok_and(|m| m.len() > 1_000_000)
                && ws.query_i64("SELECT bytes_done FROM downloads") > 0
        }),
        "{}",
        d.log()
    );
    d.kill9();
    bucket.set_faults(Faults::default());
    let d = Daemon::start_watching(&ws);
    wait_done(&ws, &d, 1, Duration::from_secs(60));
    assert_identical(&ws, &files);
    let seen = bucket.seen();
    let resumed = seen.last().unwrap();
    assert_eq!(resumed.status, 206, "{seen:?}");
    assert_eq!(
        resumed.if_range.as_deref(),
        Some(common::mast::s3_etag(&files[0].1, Some(1 << 20)).as_str())
    );
    assert!(seen.iter().all(|s| s.product == keys[0]));
    assert_eq!(product_requests(&mast), 0);
    let size = files[0].1.len() as u64;
    assert!(
        bucket.bytes_served() < size * 12 / 10,
        "{} bytes served for {size}",
        bucket.bytes_served()
    );
    // The resumed file was checked, from its first byte, against the CRC64NVME the first (whole) answer
    // gave: the 206 carries none.
    let verified = ws.query_string("SELECT verified FROM downloads");
    assert!(verified.contains("S3 CRC64NVME matched"), "{verified}");
    assert!(!seen[1..].iter().any(|s| s.status == 200), "{seen:?}");
}

#[test]
fn a_public_event_for_a_product_already_from_mast_is_not_fetched_again_and_a_stale_copy_is_not_taken()
 {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    // 1: New while exclusive (not in the cloud), from MAST; then Public: already done.
    // 2: Reprocessed, whose bucket copy is the version before (modified before the archived date).
    let (new, files, keys) = cloud_products(&mast, &bucket, 1, 1, 6, "New", |_, _| None);
    let name = files[0].0.rsplit('/').next().unwrap().to_string();
    mast.set_cloud_path(&format!("mast:JWST/product/{name}"), None);
    let (re, re_files, re_keys) =
        cloud_products(&mast, &bucket, 2, 1, 7, "Reprocessed", |_, _| None);
    let old_version = fits_product(re_files[0].0.rsplit('/').next().unwrap(), 7, 0);
    bucket.put_object(
        &re_keys[0],
        old_version,
        Object {
            last_modified: Some(
                std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
            ),
            ..Object::default()
        },
    );
    let (ws, d) = watching(&mast, &bucket);
    ws.drop_notice("new.json", &new);
    wait_done(&ws, &d, 1, Duration::from_secs(20));
    assert_eq!(product_requests(&mast), 1);
    // Made public: in the bucket now, and the look-up says so; the version is the one on disk.
    bucket.put_object(&keys[0], files[0].1.clone(), Object::default());
    mast.set_cloud_path(
        &format!("mast:JWST/product/{name}"),
        Some(&format!("/{}", keys[0])),
    );
    let mut public = record(1, "Public");
    public["event_id"] = json!("00000000-0000-4000-8000-000000000901");
    ws.drop_notice("public.json", &serde_json::to_vec(&[public]).unwrap());
    ws.drop_notice("re.json", &re);
    wait_done(&ws, &d, 2, Duration::from_secs(20));
    assert!(wait_until(Duration::from_secs(5), || ws
        .files_in("inbox/processed")
        .len()
        == 3));
    let mut all = files.clone();
    all.extend(re_files);
    assert_identical(&ws, &all);
    assert_eq!(ws.query_i64("SELECT count(*) FROM downloads"), 2);
    assert!(
        bucket.seen().iter().all(|s| s.product != keys[0]),
        "a product on disk was fetched again"
    );
    assert_eq!(product_requests(&mast), 2, "{:?}", mast.seen());
    let log = d.log();
    assert!(
        log.contains("the cloud bucket's copy is older than this version"),
        "{log}"
    );
}

#[test]
fn a_broken_path_look_up_sends_products_to_mast_unless_cloud_only() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    let (notice, files, _) = cloud_products(&mast, &bucket, 1, 3, 6, "Public", |_, _| {
        Some(Object::default())
    });
    mast.break_lookups(true);
    let (ws, d) = watching(&mast, &bucket);
    ws.drop_notice("n.json", &notice);
    wait_done(&ws, &d, 3, Duration::from_secs(20));
    assert_identical(&ws, &files);
    assert!(bucket.seen().is_empty());
    assert!(d.log().contains("MAST's path look-up"), "{}", d.log());
    assert!(d.log().contains("failed: HTTP 500; from MAST this time"));
    // One failed look-up, then a pause: the other products did not ask again.
    assert_eq!(mast.lookups().len(), 1, "{:?}", mast.lookups());
}

#[test]
fn objects_moto_stores_whole_and_in_parts_verify_and_a_key_it_lacks_falls_back() {
    let mast = MastStandIn::start();
    let dir = tempfile::tempdir().unwrap();
    // 1: whole, CRC32; 2: whole, SHA-256; 3: in 5 MiB parts (composite SHA-256, md5-N ETag); 4: not there.
    let mut files = Vec::new();
    let mut records = Vec::new();
    let mut uploads_spec = Vec::new();
    for (n, blocks, part, checksum) in [
        (1u64, 30usize, None, Some("CRC32")),
        (2, 40, None, Some("SHA256")),
        (3, 4400, Some(5 * 1024 * 1024), Some("SHA256")),
        (4, 10, None, None),
    ] {
        let r = record(n, "Public");
        let name = r["filename"].as_str().unwrap().to_string();
        let fileset = r["fileset"].as_str().unwrap().to_string();
        let body = fits_product(&name, blocks, 1);
        mast.put(&name, body.clone());
        let key = format!("jwst/public/{fileset}/{name}");
        mast.set_cloud_path(
            &format!("mast:JWST/product/{name}"),
            Some(&format!("/{key}")),
        );
        let file = dir.path().join(&name);
        std::fs::write(&file, &body).unwrap();
        if n != 4 {
            uploads_spec.push((key, file, part, checksum));
        }
        files.push((format!("jwst/{fileset}/{name}"), body));
        records.push(r);
    }
    let uploads: Vec<common::moto::Upload> = uploads_spec
        .iter()
        .map(|(key, file, part, checksum)| common::moto::Upload {
            key,
            file,
            part_size: *part,
            checksum: *checksum,
        })
        .collect();
    let Some(moto) = common::moto::Moto::start("stpubdata", &uploads) else {
        return;
    };
    let ws = Workspace::with_base(&mast.base_url, &cloud_config(&moto.bucket_url, ""));
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("moto.json", &serde_json::to_vec(&records).unwrap());
    wait_done(&ws, &d, 4, Duration::from_secs(60));
    assert_identical(&ws, &files);
    let rows = list(&ws);
    let by = |i: usize| rows[i]["verified"].as_str().unwrap().to_string();
    assert!(by(0).contains("S3 CRC32 matched"), "{}", by(0));
    assert!(by(1).contains("S3 SHA-256 matched"), "{}", by(1));
    assert!(
        by(2).contains("multipart ETag and composite SHA-256 not checkable"),
        "{}",
        by(2)
    );
    let sources: Vec<&str> = rows.iter().map(|r| r["source"].as_str().unwrap()).collect();
    assert_eq!(sources, ["cloud", "cloud", "cloud", "mast"]);
    // moto answers 404 NoSuchKey where S3 without ListBucket answers 403: either is "not there".
    assert!(d.log().contains("has no object"), "{}", d.log());
    assert_eq!(product_requests(&mast), 1);
}

#[rstest::rstest]
#[case::eight_attempts(8, 3)]
#[case::two_attempts(2, 1)]
fn a_bucket_that_is_down_gets_its_attempts_then_mast_gives_the_product(
    #[case] max_attempts: u32,
    #[case] at_bucket: usize,
) {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    let (notice, files, _) = cloud_products(&mast, &bucket, 1, 1, 6, "Public", |_, _| {
        Some(Object::default())
    });
    bucket.set_faults(Faults {
        unavailable_percent: 100,
        retry_after: 0,
        ..Faults::default()
    });
    let ws = workspace(&mast, &bucket);
    let d = Daemon::start_with_env(
        &ws,
        &[("MASTSUB_DOWNLOAD__MAX_ATTEMPTS", &max_attempts.to_string())],
    );
    d.wait_for_log("watching inbox", Duration::from_secs(20));
    ws.drop_notice("n.json", &notice);
    wait_done(&ws, &d, 1, Duration::from_secs(20));
    assert_identical(&ws, &files);
    let seen = bucket.seen();
    assert_eq!(seen.len(), at_bucket, "{seen:?}");
    assert!(seen.iter().all(|s| s.status == 503));
    assert_eq!(product_requests(&mast), 1);
    let log = d.log();
    assert!(log.contains("the cloud bucket answered HTTP 503"), "{log}");
    assert!(
        log.contains(&format!(
            "from MAST now: {at_bucket} attempt(s) at the cloud bucket failed"
        )),
        "{log}"
    );
    assert_eq!(
        ws.query_i64("SELECT attempts FROM downloads"),
        at_bucket as i64 + 1
    );
}

#[test]
fn an_answer_no_retry_would_change_sends_the_attempt_to_mast_at_once() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    let (notice, files, _) = cloud_products(&mast, &bucket, 1, 2, 6, "Public", |_, _| {
        Some(Object::default())
    });
    // A bucket URL in another region: S3 answers 301 PermanentRedirect, with no Location to follow.
    bucket.set_faults(Faults {
        status: Some(301),
        ..Faults::default()
    });
    let (ws, d) = watching(&mast, &bucket);
    ws.drop_notice("n.json", &notice);
    wait_done(&ws, &d, 2, Duration::from_secs(20));
    assert_identical(&ws, &files);
    assert_eq!(bucket.seen().len(), 2);
    assert_eq!(product_requests(&mast), 2);
    assert_eq!(ws.query_i64("SELECT max(attempts) FROM downloads"), 1);
    assert!(
        d.log()
            .contains("the cloud bucket answered HTTP 301; from MAST"),
        "{}",
        d.log()
    );
}

#[test]
fn a_part_file_from_one_source_is_never_continued_from_the_other() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    // The bucket's copy differs from MAST's in its bytes (same size, both valid FITS): a splice of the
    // two would be a file neither served.
    let (notice, files, keys) = cloud_products(&mast, &bucket, 1, 1, 1500, "New", |_, _| None);
    let name = files[0].0.rsplit('/').next().unwrap().to_string();
    bucket.put_object(&keys[0], fits_product(&name, 1500, 7), Object::default());
    let slow = Faults {
        slow: Some(Duration::from_millis(20)),
        ..Faults::default()
    };
    mast.set_faults(slow.clone());
    bucket.set_faults(slow);
    // 1. MAST (the look-up fails), killed mid-transfer.
    mast.break_lookups(true);
    let ws = workspace(&mast, &bucket);
    let part = ws.path("mastDownload").join(format!("{}.part", files[0].0));
    let mid_transfer = |ws: &Workspace| {
        wait_until(Duration::from_secs(30), || {
            std::fs::metadata(&part).is_ok_and(|m| m.len() > 500_000)
                && ws.query_i64("SELECT bytes_done FROM downloads") > 0
        })
    };
    let mut d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &notice);
    assert!(mid_transfer(&ws), "{}", d.log());
    d.kill9();
    assert_eq!(ws.query_string("SELECT source FROM downloads"), "mast");
    // 2. The bucket now: MAST's .part is not continued there. Killed mid-transfer again.
    mast.break_lookups(false);
    let mut d = Daemon::start_watching(&ws);
    assert!(
        wait_until(Duration::from_secs(30), || ws
            .query_string("SELECT coalesce(source, '') FROM downloads")
            == "cloud"),
        "{}",
        d.log()
    );
    assert!(mid_transfer(&ws), "{}", d.log());
    d.kill9();
    let asked = bucket.seen();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert_eq!(
        asked[0].range, None,
        "MAST's bytes continued from the bucket"
    );
    // 3. The bucket fails from now on: after its attempts, MAST, which must not continue the bucket's
    // bytes either.
    bucket.set_faults(Faults {
        unavailable_percent: 100,
        retry_after: 0,
        ..Faults::default()
    });
    mast.set_faults(Faults::default());
    let d = Daemon::start_watching(&ws);
    wait_done(&ws, &d, 1, Duration::from_secs(60));
    assert_identical(&ws, &files);
    let from_mast = mast.seen();
    let last = from_mast.last().unwrap();
    assert_eq!(
        last.range, None,
        "the bucket's bytes continued from MAST: {from_mast:?}"
    );
    assert_eq!(ws.query_string("SELECT source FROM downloads"), "mast");
}

#[test]
fn only_the_event_types_cloud_event_types_names_use_the_bucket() {
    let mast = MastStandIn::start();
    let bucket = MastStandIn::start_bucket();
    let (new, new_files, new_keys) = cloud_products(&mast, &bucket, 1, 2, 6, "New", |_, _| {
        Some(Object::default())
    });
    let (public, public_files, _) = cloud_products(&mast, &bucket, 3, 2, 6, "Public", |_, _| {
        Some(Object::default())
    });
    let ws = Workspace::with_base(
        &mast.base_url,
        &cloud_config(&bucket.base_url, "event_types = [\"Public\"]"),
    );
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("new.json", &new);
    ws.drop_notice("public.json", &public);
    wait_done(&ws, &d, 4, Duration::from_secs(20));
    let mut files = new_files.clone();
    files.extend(public_files);
    assert_identical(&ws, &files);
    // By file (the two notices may be taken in either order): jw00001-2 New, jw00003-4 Public.
    let mut sources: Vec<(String, String)> = list(&ws)
        .iter()
        .map(|r| {
            (
                r["filename"].as_str().unwrap()[..7].to_string(),
                r["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    sources.sort();
    let from: Vec<&str> = sources.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(from, ["mast", "mast", "cloud", "cloud"], "{sources:?}");
    // The New products were neither looked up nor asked of the bucket.
    let asked: Vec<String> = mast.lookups().into_iter().flat_map(|(u, _)| u).collect();
    assert!(
        new_files.iter().all(|(p, _)| !asked
            .iter()
            .any(|u| u.ends_with(p.rsplit('/').next().unwrap()))),
        "{asked:?}"
    );
    assert!(bucket.seen().iter().all(|s| !new_keys.contains(&s.product)));
    assert_eq!(product_requests(&mast), 2);
}
