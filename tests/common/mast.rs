//! A MAST stand-in: a real HTTP/1.1 server on loopback serving deterministic products at both MAST URL
//! forms, with Range, If-Range, ETag and Last-Modified like a static server, and faults switched on per
//! test. A plain tokio listener rather than a framework, so that a body can be cut at an exact byte, by a
//! reset or a clean close.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{Daemon, Workspace, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Faults, all off by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Percent of bodies cut at a random byte.
    pub cut_percent: u32,
    /// The next N bodies are cut, whatever `cut_percent` says.
    pub cut_next: u32,
    /// Cut with a TCP reset (else a clean close).
    pub cut_with_reset: bool,
    /// Percent of answers that are 503 with `Retry-After: retry_after`.
    pub unavailable_percent: u32,
    /// Seconds for Retry-After on 503s.
    pub retry_after: u64,
    /// The next N answers are 500.
    pub errors_500_next: u32,
    /// Answer every request with the whole body (200), ignoring Range.
    pub ignore_range: bool,
    /// Require this token (`Authorization: token <T>`); 401 otherwise.
    pub token: Option<String>,
    /// Pause between 16 KiB pieces of a body.
    pub slow: Option<Duration>,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The product name asked for.
    pub product: String,
    /// The Range header, if any.
    pub range: Option<String>,
    /// The If-Range header, if any.
    pub if_range: Option<String>,
    /// The Authorization header, if any.
    pub authorization: Option<String>,
    /// The User-Agent.
    pub user_agent: Option<String>,
    /// The status answered.
    pub status: u16,
}

struct Product {
    body: Arc<Vec<u8>>,
    etag: String,
    last_modified: String,
}

struct State {
    products: HashMap<String, Product>,
    faults: Faults,
    served: u64,
    seen: Vec<Seen>,
    rng: u64,
    generation: u64,
}

impl State {
    fn roll(&mut self, percent: u32) -> bool {
        percent > 0 && (self.next() % 100) < u64::from(percent)
    }

    fn next(&mut self) -> u64 {
        // xorshift64: deterministic per server, so a test's fault pattern is the same on every run.
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }
}

/// The running stand-in; stops when dropped.
pub struct MastStandIn {
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    state: Arc<Mutex<State>>,
    _runtime: tokio::runtime::Runtime,
}

/// A deterministic FITS-shaped product: a primary header block, then `blocks - 1` blocks of data.
pub fn fits_product(name: &str, blocks: usize, version: u8) -> Vec<u8> {
    let mut header = String::new();
    for card in [
        "SIMPLE  =                    T / conforms to FITS standard".to_string(),
        "BITPIX  =                    8".to_string(),
        "NAXIS   =                    0".to_string(),
        format!("FILENAME= '{}'", &name[..name.len().min(60)]),
        format!("VERSION =                  {version:>3}"),
        "END".to_string(),
    ] {
        header.push_str(&format!("{card:<80}"));
    }
    let mut body = format!("{header:<2880}").into_bytes();
    let mut x = name
        .bytes()
        .fold(0x9e37_79b9_7f4a_7c15u64 ^ u64::from(version), |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
    for _ in 1..blocks {
        for _ in 0..2880 / 8 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            body.extend_from_slice(&x.to_le_bytes());
        }
    }
    body
}

impl MastStandIn {
    /// Starts the server on a free loopback port.
    pub fn start() -> MastStandIn {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            products: HashMap::new(),
            faults: Faults::default(),
            served: 0,
            seen: Vec::new(),
            rng: 0x2545_f491_4f6c_dd1d,
            generation: 0,
        }));
        let shared = state.clone();
        runtime.spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(socket, state).await;
                });
            }
        });
        MastStandIn {
            base_url: format!("http://{addr}"),
            state,
            _runtime: runtime,
        }
    }

    /// Serves `body` as product `name` (a new ETag and Last-Modified each time it changes).
    pub fn put(&self, name: &str, body: Vec<u8>) {
        let mut s = self.state.lock().unwrap();
        s.generation += 1;
        let generation = s.generation;
        let modified = std::time::SystemTime::UNIX_EPOCH
            + Duration::from_secs(1_790_000_000 + generation * 60);
        s.products.insert(
            name.to_string(),
            Product {
                etag: format!("\"{:x}-{generation}\"", body.len()),
                last_modified: httpdate::fmt_http_date(modified),
                body: Arc::new(body),
            },
        );
    }

    /// Stops serving `name` (404 from now on).
    pub fn remove(&self, name: &str) {
        self.state.lock().unwrap().products.remove(name);
    }

    /// Replaces the faults.
    pub fn set_faults(&self, faults: Faults) {
        self.state.lock().unwrap().faults = faults;
    }

    /// Body bytes written to sockets so far.
    pub fn bytes_served(&self) -> u64 {
        self.state.lock().unwrap().served
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

async fn serve(mut socket: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 2048];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).to_string();
    let mut lines = text.split("\r\n");
    let target = lines
        .next()
        .unwrap_or("")
        .split(' ')
        .nth(1)
        .unwrap_or("/")
        .to_string();
    let headers: HashMap<String, String> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let params: HashMap<String, String> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let product = if path.ends_with("/api/v0.1/retrieve_product") {
        params.get("product_name").cloned()
    } else if path.ends_with("/api/v0.1/Download/file") {
        params
            .get("uri")
            .and_then(|u| u.rsplit('/').next().map(str::to_string))
    } else {
        None
    };

    // Decide the answer under the lock, write it outside.
    let (status, extra, body, cut_at, slow, reset) = {
        let mut s = state.lock().unwrap();
        let faults = s.faults.clone();
        let mut seen = Seen {
            product: product.clone().unwrap_or_default(),
            range: headers.get("range").cloned(),
            if_range: headers.get("if-range").cloned(),
            authorization: headers.get("authorization").cloned(),
            user_agent: headers.get("user-agent").cloned(),
            status: 0,
        };
        let authorized = faults
            .token
            .as_ref()
            .is_none_or(|t| seen.authorization.as_deref() == Some(format!("token {t}").as_str()));
        let answer = if !authorized {
            (401, vec![], None)
        } else if s.faults.errors_500_next > 0 {
            s.faults.errors_500_next -= 1;
            (500, vec![], None)
        } else if s.roll(faults.unavailable_percent) {
            (
                503,
                vec![format!("Retry-After: {}", faults.retry_after)],
                None,
            )
        } else if let Some(p) = product.as_ref().and_then(|name| s.products.get(name)) {
            let (body, etag, modified) = (p.body.clone(), p.etag.clone(), p.last_modified.clone());
            let len = body.len() as u64;
            let validators = vec![
                format!("ETag: {etag}"),
                format!("Last-Modified: {modified}"),
                "Accept-Ranges: bytes".to_string(),
            ];
            let range_ok = seen
                .if_range
                .as_ref()
                .is_none_or(|v| *v == etag || *v == modified);
            let start = seen
                .range
                .as_deref()
                .filter(|_| !faults.ignore_range && range_ok)
                .and_then(|r| r.strip_prefix("bytes="))
                .and_then(|r| r.strip_suffix('-'))
                .and_then(|r| r.parse::<u64>().ok());
            match start {
                Some(start) if start >= len => {
                    let mut h = validators;
                    h.push(format!("Content-Range: bytes */{len}"));
                    (416, h, None)
                }
                Some(start) => {
                    let mut h = validators;
                    h.push(format!("Content-Range: bytes {start}-{}/{len}", len - 1));
                    (206, h, Some((body, start)))
                }
                None => (200, validators, Some((body, 0))),
            }
        } else {
            (404, vec![], None)
        };
        let (status, extra, body) = answer;
        let mut cut_at = None;
        if let Some((b, start)) = &body {
            let remaining = b.len() as u64 - start;
            let cut = if s.faults.cut_next > 0 {
                s.faults.cut_next -= 1;
                true
            } else {
                s.roll(faults.cut_percent)
            };
            if cut && remaining > 1 {
                cut_at = Some(1 + s.next() % (remaining - 1));
            }
        }
        seen.status = status;
        s.seen.push(seen);
        (
            status,
            extra,
            body,
            cut_at,
            faults.slow,
            faults.cut_with_reset,
        )
    };

    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let length = body.as_ref().map_or(0, |(b, start)| b.len() as u64 - start);
    let mut head =
        format!("HTTP/1.1 {status} {reason}\r\nContent-Length: {length}\r\nConnection: close\r\n");
    for h in extra {
        head.push_str(&h);
        head.push_str("\r\n");
    }
    head.push_str("Content-Type: application/octet-stream\r\n\r\n");
    socket.write_all(head.as_bytes()).await?;
    if let Some((b, start)) = body {
        let end = cut_at.map_or(b.len() as u64, |c| start + c) as usize;
        for piece in b[start as usize..end].chunks(16 * 1024) {
            socket.write_all(piece).await?;
            state.lock().unwrap().served += piece.len() as u64;
            if let Some(pause) = slow {
                tokio::time::sleep(pause).await;
            }
        }
        if cut_at.is_some() {
            if reset {
                socket.set_zero_linger()?;
                drop(socket);
            } else {
                socket.shutdown().await?;
            }
            return Ok(());
        }
    }
    socket.flush().await?;
    socket.shutdown().await
}

/// A notice of `count` New products numbered from `first`, each served by `mast` with `blocks` blocks.
pub fn serve_products(
    mast: &MastStandIn,
    first: u64,
    count: u64,
    blocks: usize,
) -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut records = Vec::new();
    let mut files = Vec::new();
    for n in first..first + count {
        let r = super::record(n, "New");
        let name = r["filename"].as_str().unwrap().to_string();
        let body = fits_product(&name, blocks, 1);
        mast.put(&name, body.clone());
        files.push((
            format!("jwst/{}/{name}", r["fileset"].as_str().unwrap()),
            body,
        ));
        records.push(r);
    }
    (serde_json::to_vec(&records).unwrap(), files)
}

/// Every product is on disk byte for byte as served, and no `.part` file is left.
pub fn assert_identical(ws: &Workspace, files: &[(String, Vec<u8>)]) {
    for (path, body) in files {
        let got = std::fs::read(ws.path("mastDownload").join(path))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(
            got == *body,
            "{path}: {} bytes on disk differ from the {} served",
            got.len(),
            body.len()
        );
    }
    let parts: Vec<_> = ws
        .tree("mastDownload")
        .into_iter()
        .filter(|p| p.ends_with(".part"))
        .collect();
    assert!(parts.is_empty(), ".part files left: {parts:?}");
}

/// Waits until `n` jobs are done, or fails with the counts and the log's tail.
pub fn wait_done(ws: &Workspace, d: &Daemon, n: i64, timeout: Duration) {
    assert!(
        wait_until(timeout, || ws.jobs_in("done") == n),
        "{} of {n} done after {timeout:?} ({} queued, {} failed); log tail:\n{}",
        ws.jobs_in("done"),
        ws.jobs_in("queued"),
        ws.jobs_in("failed"),
        d.log()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The sample's three products, served by `mast`; returns (local path, bytes).
pub fn serve_sample(mast: &MastStandIn) -> Vec<(String, Vec<u8>)> {
    let notice: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(super::sample_notice()).unwrap()).unwrap();
    notice
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let name = r["filename"].as_str().unwrap();
            let body = fits_product(name, 20 + i * 7, 1);
            mast.put(name, body.clone());
            (
                format!("jwst/{}/{name}", r["fileset"].as_str().unwrap()),
                body,
            )
        })
        .collect()
}
