//! The floor for mastsub's downloads: the same HTTP client (reqwest on tokio), 4 transfers at a time, each
//! body held whole in memory, then written to `<name>.part`, fsynced, renamed into place and its folder
//! fsynced, and nothing else (no database, no resume, no retry, no checks, no bound on memory). What is left between this and mastsub is the cost of
//! mastsub's bookkeeping; what is left between this and curl is the cost of durability.
//!
//! Usage: download_floor BASE_URL OUT_DIR NAME... (built by `bench/run.sh` as a cargo example)

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let (base, out) = (
        args.next().expect("BASE_URL"),
        PathBuf::from(args.next().expect("OUT_DIR")),
    );
    let names = Arc::new(Mutex::new(args.rev().collect::<Vec<_>>()));
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    std::fs::create_dir_all(&out).expect("create OUT_DIR");
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let (client, names, base, out) = (client.clone(), names.clone(), base.clone(), out.clone());
        workers.spawn(async move {
            loop {
                let Some(name) = names.lock().expect("names").pop() else {
                    break;
                };
                let url =
                    format!("{base}/search/jwst/api/v0.1/retrieve_product?product_name={name}");
                let mut response = client.get(url).send().await.expect("request");
                assert!(
                    response.status().is_success(),
                    "{name}: {}",
                    response.status()
                );
                let mut body = Vec::new();
                while let Some(chunk) = response.chunk().await.expect("body") {
                    body.extend_from_slice(&chunk);
                }
                let out = out.clone();
                tokio::task::spawn_blocking(move || {
                    let (part, path) = (out.join(format!("{name}.part")), out.join(&name));
                    let mut file = std::fs::File::create(&part).expect("create");
                    file.write_all(&body).expect("write");
                    file.sync_all().expect("fsync");
                    std::fs::rename(&part, &path).expect("rename");
                    std::fs::File::open(&out)
                        .and_then(|d| d.sync_all())
                        .expect("fsync folder");
                })
                .await
                .expect("file work");
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("worker");
    }
}
