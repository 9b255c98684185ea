//! Downloads from a real HTTP server (nginx), not only our stand-in: its own Range, If-Range and ETag
//! rules, and a gzip that compresses whatever a client accepts. Products end byte-identical and verified,
//! a killed download resumes with nginx's 206, and a product changed on the server between the kill and
//! the resume (nginx's ETag changes with it) is fetched again whole, never spliced.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, SystemTime};

use common::mast::{fits_product, wait_done};
use common::nginx::Nginx;
use common::{Daemon, Workspace, record, wait_until};
use serde_json::json;

/// A notice for `files` (name, bytes), written into `data` for nginx to serve; returns the notice and
/// each product's path under the download folder.
fn publish(
    data: &std::path::Path,
    records: &[serde_json::Value],
    bodies: &[Vec<u8>],
) -> Vec<String> {
    records
        .iter()
        .zip(bodies)
        .map(|(r, body)| {
            let name = r["filename"].as_str().unwrap();
            std::fs::write(data.join(name), body).unwrap();
            format!("jwst/{}/{name}", r["fileset"].as_str().unwrap())
        })
        .collect()
}

#[test]
fn a_gzip_happy_server_still_sends_the_bytes_as_stored_and_they_verify() {
    let data = tempfile::tempdir().unwrap();
    let Some(nginx) = Nginx::start(
        data.path(),
        "gzip on; gzip_types *; gzip_min_length 1; gzip_proxied any;",
    ) else {
        return;
    };
    let fits = record(1, "New");
    let mut js = record(2, "New");
    js["filename"] = json!("jw00002001001_02201_00001_asn.json");
    let bodies = vec![
        fits_product(fits["filename"].as_str().unwrap(), 60, 1),
        serde_json::to_vec_pretty(&json!({"products": vec!["a"; 500]})).unwrap(),
    ];
    let paths = publish(data.path(), &[fits.clone(), js.clone()], &bodies);

    // The test can fail: nginx compresses for a client that accepts gzip.
    let mut s = std::net::TcpStream::connect(nginx.base_url.trim_start_matches("http://")).unwrap();
    write!(
        s,
        "GET /files/{} HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        js["filename"].as_str().unwrap()
    )
    .unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    assert!(
        String::from_utf8_lossy(&answer).contains("Content-Encoding: gzip"),
        "nginx did not gzip for a client that asked: the test proves nothing"
    );

    let ws = Workspace::with_base(&nginx.base_url, "");
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &serde_json::to_vec(&[fits, js]).unwrap());
    wait_done(&ws, &d, 2, Duration::from_secs(30));
    for (path, body) in paths.iter().zip(&bodies) {
        assert_eq!(
            std::fs::read(ws.path("mastDownload").join(path)).unwrap(),
            *body,
            "{path}"
        );
    }
    let verified = |ext: &str| {
        ws.query_string(&format!(
            "SELECT verified FROM downloads WHERE filename LIKE '%.{ext}'"
        ))
    };
    assert!(
        verified("fits").starts_with("FITS: 1 HDU"),
        "{}",
        verified("fits")
    );
    assert_eq!(verified("json"), "JSON: parses");
    // After the probe, every answer carried the whole, uncompressed body (in whichever order the two
    // downloads ran).
    let mut expected: Vec<(u16, u64)> = bodies.iter().map(|b| (200, b.len() as u64)).collect();
    let mut served: Vec<(u16, u64)> = nginx.requests().into_iter().skip(1).collect();
    expected.sort_unstable();
    served.sort_unstable();
    assert_eq!(served, expected);
}

#[test]
fn many_small_products_cost_one_get_each_on_connections_kept_open() {
    let data = tempfile::tempdir().unwrap();
    let Some(nginx) = Nginx::start(data.path(), "") else {
        return;
    };
    let records: Vec<serde_json::Value> = (1..=40).map(|n| record(n, "New")).collect();
    let bodies: Vec<Vec<u8>> = records
        .iter()
        .map(|r| fits_product(r["filename"].as_str().unwrap(), 3, 1))
        .collect();
    let paths = publish(data.path(), &records, &bodies);
    let ws = Workspace::with_base(&nginx.base_url, "");
    let d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &serde_json::to_vec(&records).unwrap());
    wait_done(&ws, &d, 40, Duration::from_secs(30));
    for (path, body) in paths.iter().zip(&bodies) {
        assert_eq!(
            std::fs::read(ws.path("mastDownload").join(path)).unwrap(),
            *body,
            "{path}"
        );
    }
    // Far from MAST every request is a round trip: no HEAD first, no second request per product, and the
    // workers' connections are kept open from one product to the next (4 workers by default).
    let requests = nginx.connections_and_methods();
    assert_eq!(requests.len(), 40, "one request per product: {requests:?}");
    assert!(
        requests.iter().all(|(_, method)| method == "GET"),
        "{requests:?}"
    );
    let connections: std::collections::HashSet<u64> = requests.iter().map(|(c, _)| *c).collect();
    assert!(
        connections.len() <= 4,
        "{} connections for 40 products with 4 workers: {requests:?}",
        connections.len()
    );
}

/// A product served slowly, a daemon killed with -9 once part of it is on disk; `change` is done to the
/// served file before the restart. Returns the bytes the product must end as, nginx (whose folder it
/// serves goes with it), the workspace and the product's path in it.
fn kill_during(change: bool) -> Option<(Vec<u8>, Served, Workspace, String)> {
    let folder = tempfile::tempdir().unwrap();
    let data = folder.path().to_path_buf();
    let nginx = Nginx::start(&data, "limit_rate 150k;")?;
    let r = record(1, "New");
    let name = r["filename"].as_str().unwrap().to_string();
    let body = fits_product(&name, 400, 1);
    let path = publish(&data, std::slice::from_ref(&r), std::slice::from_ref(&body)).remove(0);
    let ws = Workspace::with_base(&nginx.base_url, "");
    let mut d = Daemon::start_watching(&ws);
    ws.drop_notice("n.json", &serde_json::to_vec(&[r]).unwrap());
    assert!(
        wait_until(Duration::from_secs(30), || ws
            .query_i64("SELECT coalesce(max(bytes_done), 0) FROM downloads")
            > 300_000),
        "no progress recorded; log:\n{}",
        d.log()
    );
    d.kill9();
    let mut expected = body;
    if change {
        // A new version of the same size: only nginx's ETag (mtime and size) can tell.
        expected = fits_product(&name, 400, 2);
        std::fs::write(data.join(&name), &expected).unwrap();
        let later = SystemTime::now() + Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(data.join(&name))
            .unwrap()
            .set_modified(later)
            .unwrap();
    }
    let d = Daemon::start(&ws);
    wait_done(&ws, &d, 1, Duration::from_secs(60));
    Some((
        expected,
        Served {
            nginx,
            _data: folder,
        },
        ws,
        path,
    ))
}

/// nginx and the folder it serves.
struct Served {
    nginx: Nginx,
    _data: tempfile::TempDir,
}

#[test]
fn a_download_killed_with_9_resumes_with_nginx_s_206() {
    let Some((expected, Served { nginx, .. }, ws, path)) = kill_during(false) else {
        return;
    };
    assert_eq!(
        std::fs::read(ws.path("mastDownload").join(&path)).unwrap(),
        expected
    );
    let served = nginx.requests();
    let size = expected.len() as u64;
    assert!(
        served
            .iter()
            .any(|&(status, bytes)| status == 206 && bytes < size),
        "no resume: {served:?}"
    );
    let total: u64 = served.iter().map(|&(_, b)| b).sum();
    assert!(
        total < size * 3 / 2,
        "{total} bytes served for {size}: {served:?}"
    );
}

#[test]
fn a_product_changed_on_nginx_between_kill_and_resume_ends_as_the_new_version_whole() {
    let Some((expected, Served { nginx, .. }, ws, path)) = kill_during(true) else {
        return;
    };
    assert_eq!(
        std::fs::read(ws.path("mastDownload").join(&path)).unwrap(),
        expected,
        "the file is not the new version whole (a splice of two?)"
    );
    let served = nginx.requests();
    // nginx answers the resume's If-Range with the old ETag by sending the new version whole.
    assert!(
        served.iter().all(|&(status, _)| status != 206),
        "nginx continued across versions: {served:?}"
    );
    assert_eq!(
        served.last().map(|r| r.1),
        Some(expected.len() as u64),
        "{served:?}"
    );
}
