//! A MAST stand-in: a real HTTP/1.1 server on loopback serving deterministic products at both MAST URL
//! forms, with Range, If-Range, ETag and Last-Modified like a static server, and faults switched on per
//! test. The same server started with [`MastStandIn::start_bucket`] is an S3-like bucket instead: objects
//! by key, the ETag as S3 makes it (the MD5 of a single-part object, `md5-N` of a multipart one), 403
//! AccessDenied for a missing key, the `x-amz-checksum-*` header of an object that has one when asked
//! (`x-amz-checksum-mode: ENABLED`). MAST's path look-up answers from [`MastStandIn::set_cloud_path`].
//! A plain tokio listener rather than a framework, so that a body can be cut at an exact byte, by a
//! reset or a clean close. The hostile switches answer with plausible lies: an HTML page with a 200, an
//! encoding not asked for, no length, a 206 whose total is wrong, a trickle, a body that never ends.

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
    /// The next body is cut at exactly this offset of the body sent (for a 206, counted from the
    /// range's start), whatever the other cut switches say; used once, then cleared.
    pub cut_at: Option<u64>,
    /// Cut with a TCP reset (else a clean close).
    pub cut_with_reset: bool,
    /// Percent of answers that are 503 with `Retry-After: retry_after`.
    pub unavailable_percent: u32,
    /// The next N answers are 503 with `Retry-After: retry_after`.
    pub unavailable_next: u32,
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
    /// Answer every product request with 200 and [`html_page`] as `text/html; charset=utf-8`.
    pub html_page: bool,
    /// The same page sent as `application/octet-stream`: only sniffing the bytes can tell.
    pub html_as_octets: bool,
    /// Send the body gzip-compressed with `Content-Encoding: gzip` (and the compressed length),
    /// whatever `Accept-Encoding` said.
    pub gzip_encoding: bool,
    /// No Content-Length at all: the body ends when the server closes the connection.
    pub no_length: bool,
    /// On a 206, lie about the total in Content-Range (the bytes are still the true ones).
    pub range_total: Option<RangeTotal>,
    /// Send bodies a byte (or a few) at a time at this rate...
    pub trickle_bytes_per_sec: Option<u32>,
    /// ...for these products only (empty: every product).
    pub trickle_only: Vec<String>,
    /// A 200 without a length (with `no_length`) goes on with filler bytes after the product's until the
    /// client closes the connection.
    pub endless: bool,
    /// Answer every product request with this status and no body (a bucket URL in the wrong region
    /// answers 301 with no Location, say).
    pub status: Option<u16>,
}

/// The total a lying 206 announces in its Content-Range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeTotal {
    /// `bytes a-b/*`: unknown.
    Star,
    /// The true total plus this many bytes.
    Plus(u64),
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
    /// The Accept-Encoding header, if any.
    pub accept_encoding: Option<String>,
    /// The x-amz-checksum-mode header, if any.
    pub checksum_mode: Option<String>,
    /// The status answered.
    pub status: u16,
}

/// The page a maintenance proxy answers with, 200 and all.
pub fn html_page() -> Vec<u8> {
    concat!(
        "<!DOCTYPE html>\n<html><head><title>MAST: Service Unavailable</title></head><body>\n",
        "<h1>Service Unavailable</h1>\n",
        "<p>The Mikulski Archive for Space Telescopes is undergoing scheduled maintenance.\n",
        "Downloads and searches will be available again shortly. We apologize for the inconvenience.</p>\n",
        "<p>For help, contact the <a href=\"https://stsci.service-now.com/mast\">MAST Help Desk</a>.</p>\n",
        "</body></html>\n"
    )
    .as_bytes()
    .to_vec()
}

struct Product {
    body: Arc<Vec<u8>>,
    etag: String,
    last_modified: String,
    /// A bucket object's checksum header (name, value).
    checksum: Option<(String, String)>,
}

/// How a bucket object was stored, which decides its ETag and checksum.
#[derive(Debug, Clone, Default)]
pub struct Object {
    /// Uploaded in parts of this size: the ETag is `md5(part md5s)-N`, not the bytes' MD5.
    pub multipart: Option<usize>,
    /// Its checksum header as S3 gives it: `("x-amz-checksum-crc64nvme", base64)`.
    pub checksum: Option<(String, String)>,
    /// An ETag other than the one its bytes make (a lying or damaged object).
    pub etag: Option<String>,
    /// Its Last-Modified, if not "now".
    pub last_modified: Option<std::time::SystemTime>,
}

/// The CRC64NVME of `bytes` as S3 writes it (base64 of the big-endian value).
pub fn crc64nvme(bytes: &[u8]) -> String {
    use base64::Engine;
    let crc = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, bytes);
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

/// The ETag S3 gives an object of `body` uploaded whole, or in parts of `part` bytes.
pub fn s3_etag(body: &[u8], part: Option<usize>) -> String {
    use md5::Digest;
    match part {
        None => format!("\"{}\"", hex::encode(md5::Md5::digest(body))),
        Some(size) => {
            let mut all = Vec::new();
            let chunks: Vec<&[u8]> = body.chunks(size).collect();
            for c in &chunks {
                all.extend_from_slice(&md5::Md5::digest(c));
            }
            format!(
                "\"{}-{}\"",
                hex::encode(md5::Md5::digest(&all)),
                chunks.len()
            )
        }
    }
}

struct State {
    /// An S3-like bucket rather than MAST.
    bucket: bool,
    /// MAST's path look-up: URI → path (`None`: not in the cloud).
    cloud_paths: HashMap<String, Option<String>>,
    /// The URIs of each path look-up request, with its `use_cloud_path` value.
    lookups: Vec<(Vec<String>, Option<String>)>,
    /// Path look-ups answer 500 while set.
    lookup_broken: bool,
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

/// A deterministic FITS product: a primary header block, then `blocks - 1` blocks of data that its header
/// describes (BITPIX = 8, NAXIS1 = the data's length; NAXIS = 0 for a single block), so that a verifier
/// walking the HDUs finds it whole.
pub fn fits_product(name: &str, blocks: usize, version: u8) -> Vec<u8> {
    let data = blocks.saturating_sub(1) * 2880;
    let axes = if data == 0 {
        vec!["NAXIS   =                    0".to_string()]
    } else {
        vec![
            "NAXIS   =                    1".to_string(),
            format!("NAXIS1  = {data:>20}"),
        ]
    };
    let mut header = String::new();
    for card in [
        "SIMPLE  =                    T / conforms to FITS standard".to_string(),
        "BITPIX  =                    8".to_string(),
    ]
    .into_iter()
    .chain(axes)
    .chain([
        format!("FILENAME= '{}'", &name[..name.len().min(60)]),
        format!("VERSION =                  {version:>3}"),
        "END".to_string(),
    ]) {
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
        MastStandIn::start_as(false)
    }

    /// Starts an S3-like bucket on a free loopback port; its `base_url` is the bucket's URL.
    pub fn start_bucket() -> MastStandIn {
        MastStandIn::start_as(true)
    }

    fn start_as(bucket: bool) -> MastStandIn {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            bucket,
            cloud_paths: HashMap::new(),
            lookups: Vec::new(),
            lookup_broken: false,
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
                checksum: None,
                body: Arc::new(body),
            },
        );
    }

    /// Stores a bucket object under `key` as S3 would (see [`Object`]).
    pub fn put_object(&self, key: &str, body: Vec<u8>, how: Object) {
        let mut s = self.state.lock().unwrap();
        s.generation += 1;
        let modified = how.last_modified.unwrap_or_else(std::time::SystemTime::now);
        s.products.insert(
            key.to_string(),
            Product {
                etag: how.etag.unwrap_or_else(|| s3_etag(&body, how.multipart)),
                last_modified: httpdate::fmt_http_date(modified),
                checksum: how.checksum,
                body: Arc::new(body),
            },
        );
    }

    /// What MAST's path look-up says of `uri`: a path (`/jwst/public/...`) or not in the cloud.
    pub fn set_cloud_path(&self, uri: &str, path: Option<&str>) {
        self.state
            .lock()
            .unwrap()
            .cloud_paths
            .insert(uri.to_string(), path.map(str::to_string));
    }

    /// Path look-ups answer 500 while `broken`.
    pub fn break_lookups(&self, broken: bool) {
        self.state.lock().unwrap().lookup_broken = broken;
    }

    /// The URIs of every path look-up so far, with `use_cloud_path`.
    pub fn lookups(&self) -> Vec<(Vec<String>, Option<String>)> {
        self.state.lock().unwrap().lookups.clone()
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

/// How a body's bytes go out.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// 16 KiB pieces as fast as the socket takes them.
    Full,
    /// 16 KiB pieces with a pause after each.
    Slow(Duration),
    /// A few bytes at a time at this many bytes a second.
    Trickle(u32),
}

/// The whole answer to one request, decided under the lock by [`decide`] and written by [`send`].
struct Answer {
    status: u16,
    /// Header lines besides the status line, Content-Length, Connection and Content-Type.
    headers: Vec<String>,
    content_type: &'static str,
    /// The bytes of the body (already encoded), possibly empty.
    body: Arc<Vec<u8>>,
    /// The part of `body` this answer carries.
    range: std::ops::Range<usize>,
    /// Send `Content-Length` (else the body ends at the close).
    send_length: bool,
    /// Stop after this many bytes of the body and close (a reset if `reset`).
    cut: Option<usize>,
    reset: bool,
    pace: Pace,
    /// After the body, filler until the client goes away.
    endless: bool,
}

impl Answer {
    fn empty(status: u16, headers: Vec<String>) -> Answer {
        Answer::with_body(status, headers, Arc::new(Vec::new()), 0)
    }

    fn with_body(status: u16, headers: Vec<String>, body: Arc<Vec<u8>>, start: usize) -> Answer {
        Answer {
            status,
            headers,
            content_type: "application/octet-stream",
            range: start..body.len(),
            body,
            send_length: true,
            cut: None,
            reset: false,
            pace: Pace::Full,
            endless: false,
        }
    }
}

async fn serve(socket: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let mut socket = socket;
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
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let params: HashMap<String, String> = pairs.iter().cloned().collect();
    let bucket = state.lock().unwrap().bucket;
    if !bucket && path.ends_with("/api/v0.1/path_lookup/") {
        let answer = look_up(&mut state.lock().unwrap(), &pairs);
        return send(socket, answer, &state).await;
    }
    let product = if bucket {
        let key = path.trim_start_matches('/');
        Some(
            percent_encoding::percent_decode_str(key)
                .decode_utf8_lossy()
                .into_owned(),
        )
    } else if path.ends_with("/api/v0.1/retrieve_product") {
        params.get("product_name").cloned()
    } else if path.ends_with("/api/v0.1/Download/file") {
        params
            .get("uri")
            .and_then(|u| u.rsplit('/').next().map(str::to_string))
    } else {
        None
    };
    // Decide the answer under the lock, write it outside.
    let answer = decide(&mut state.lock().unwrap(), product, &headers);
    send(socket, answer, &state).await
}

/// MAST's path look-up: one object keyed by URI, `{"status_code": 200, "path": ...}` or a 404 with a null
/// path.
fn look_up(s: &mut State, pairs: &[(String, String)]) -> Answer {
    let uris: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "uri")
        .map(|(_, v)| v.clone())
        .collect();
    let flag = pairs
        .iter()
        .find(|(k, _)| k == "use_cloud_path")
        .map(|(_, v)| v.clone());
    s.lookups.push((uris.clone(), flag));
    if s.lookup_broken {
        return Answer::empty(500, vec![]);
    }
    if uris.len() > 40 {
        return Answer::empty(414, vec![]);
    }
    let mut out = serde_json::Map::new();
    for uri in uris {
        let path = s.cloud_paths.get(&uri).cloned().flatten();
        let status = if path.is_some() { 200 } else { 404 };
        out.insert(
            uri,
            serde_json::json!({"status_code": status, "path": path}),
        );
    }
    let body = serde_json::to_vec(&serde_json::Value::Object(out)).unwrap();
    let mut a = Answer::with_body(200, vec![], Arc::new(body), 0);
    a.content_type = "application/json";
    a
}

/// The one place that decides what a request gets: status, headers, which bytes, and how they go out.
fn decide(s: &mut State, product: Option<String>, headers: &HashMap<String, String>) -> Answer {
    let faults = s.faults.clone();
    let mut seen = Seen {
        product: product.clone().unwrap_or_default(),
        range: headers.get("range").cloned(),
        if_range: headers.get("if-range").cloned(),
        authorization: headers.get("authorization").cloned(),
        user_agent: headers.get("user-agent").cloned(),
        accept_encoding: headers.get("accept-encoding").cloned(),
        checksum_mode: headers.get("x-amz-checksum-mode").cloned(),
        status: 0,
    };
    let authorized = faults
        .token
        .as_ref()
        .is_none_or(|t| seen.authorization.as_deref() == Some(format!("token {t}").as_str()));
    let retry_after = vec![format!("Retry-After: {}", faults.retry_after)];
    let mut answer = if let Some(status) = faults.status.filter(|_| product.is_some()) {
        Answer::empty(status, vec![])
    } else if !authorized {
        Answer::empty(401, vec![])
    } else if s.faults.errors_500_next > 0 {
        s.faults.errors_500_next -= 1;
        Answer::empty(500, vec![])
    } else if s.faults.unavailable_next > 0 {
        s.faults.unavailable_next -= 1;
        Answer::empty(503, retry_after)
    } else if s.roll(faults.unavailable_percent) {
        Answer::empty(503, retry_after)
    } else if product.is_some() && (faults.html_page || faults.html_as_octets) {
        let mut a = Answer::with_body(200, vec![], Arc::new(html_page()), 0);
        if faults.html_page {
            a.content_type = "text/html; charset=utf-8";
        }
        a
    } else if let Some(p) = product.as_ref().and_then(|name| s.products.get(name)) {
        product_answer(p, &seen, &faults)
    } else if s.bucket {
        // Anonymous S3 without ListBucket: a missing key is AccessDenied, not NoSuchKey.
        let xml = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>AccessDenied</Code>\
                    <Message>Access Denied</Message></Error>";
        let mut a = Answer::with_body(403, vec![], Arc::new(xml.to_vec()), 0);
        a.content_type = "application/xml";
        a
    } else {
        Answer::empty(404, vec![])
    };

    if !answer.range.is_empty() {
        if faults.gzip_encoding {
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            std::io::Write::write_all(&mut gz, &answer.body[answer.range.clone()]).unwrap();
            answer.body = Arc::new(gz.finish().unwrap());
            answer.range = 0..answer.body.len();
            answer.headers.push("Content-Encoding: gzip".to_string());
        }
        let remaining = answer.range.len() as u64;
        answer.cut = if let Some(at) = s.faults.cut_at.take() {
            Some(at.min(remaining) as usize)
        } else {
            let cut = if s.faults.cut_next > 0 {
                s.faults.cut_next -= 1;
                true
            } else {
                s.roll(faults.cut_percent)
            };
            (cut && remaining > 1).then(|| (1 + s.next() % (remaining - 1)) as usize)
        };
        answer.reset = faults.cut_with_reset;
        let trickled =
            faults.trickle_only.is_empty() || faults.trickle_only.contains(&seen.product);
        answer.pace = match (faults.trickle_bytes_per_sec, faults.slow) {
            (Some(rate), _) if trickled => Pace::Trickle(rate.max(1)),
            (_, Some(pause)) => Pace::Slow(pause),
            _ => Pace::Full,
        };
    }
    answer.send_length = !faults.no_length;
    answer.endless = faults.endless && faults.no_length && answer.status == 200;
    seen.status = answer.status;
    s.seen.push(seen);
    answer
}

/// A product's answer as a static server gives it: 200, 206 from the Range asked (if the validator
/// still matches), or 416; with `range_total`, a 206 lies about the total.
fn product_answer(p: &Product, seen: &Seen, faults: &Faults) -> Answer {
    let len = p.body.len() as u64;
    let validators = vec![
        format!("ETag: {}", p.etag),
        format!("Last-Modified: {}", p.last_modified),
        "Accept-Ranges: bytes".to_string(),
    ];
    let range_ok = seen
        .if_range
        .as_ref()
        .is_none_or(|v| *v == p.etag || *v == p.last_modified);
    let start = seen
        .range
        .as_deref()
        .filter(|_| !faults.ignore_range && range_ok)
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse::<u64>().ok());
    let mut headers = validators;
    match start {
        Some(start) if start >= len => {
            headers.push(format!("Content-Range: bytes */{len}"));
            Answer::empty(416, headers)
        }
        Some(start) => {
            let total = match faults.range_total {
                None => len.to_string(),
                Some(RangeTotal::Star) => "*".to_string(),
                Some(RangeTotal::Plus(n)) => (len + n).to_string(),
            };
            headers.push(format!("Content-Range: bytes {start}-{}/{total}", len - 1));
            Answer::with_body(206, headers, p.body.clone(), start as usize)
        }
        None => {
            if let Some((name, value)) = &p.checksum
                && seen.checksum_mode.as_deref() == Some("ENABLED")
            {
                headers.push(format!("{name}: {value}"));
                headers.push("x-amz-checksum-type: FULL_OBJECT".to_string());
            }
            Answer::with_body(200, headers, p.body.clone(), 0)
        }
    }
}

/// Writes `answer`: the head, the body (cut, paced, endless as decided), then the close.
async fn send(mut socket: TcpStream, answer: Answer, state: &Mutex<State>) -> std::io::Result<()> {
    let reason = match answer.status {
        200 => "OK",
        206 => "Partial Content",
        401 => "Unauthorized",
        403 => "Forbidden",
        414 => "URI Too Long",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", answer.status);
    if answer.send_length {
        head.push_str(&format!("Content-Length: {}\r\n", answer.range.len()));
    }
    head.push_str("Connection: close\r\n");
    for h in &answer.headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str(&format!("Content-Type: {}\r\n\r\n", answer.content_type));
    socket.write_all(head.as_bytes()).await?;

    let body = &answer.body[answer.range.clone()];
    let end = answer.cut.unwrap_or(body.len());
    write_paced(&mut socket, &body[..end], answer.pace, state).await?;
    if answer.cut.is_some() {
        if answer.reset {
            socket.set_zero_linger()?;
            drop(socket);
        } else {
            socket.shutdown().await?;
        }
        return Ok(());
    }
    if answer.endless {
        // Every round writes, so the loop ends with the first write the closed connection refuses.
        let filler: Vec<u8> = (0..16 * 1024u32)
            .map(|i| b"0123456789abcdef"[i as usize % 16])
            .collect();
        loop {
            write_paced(&mut socket, &filler, answer.pace, state).await?;
        }
    }
    socket.flush().await?;
    socket.shutdown().await
}

/// Writes `bytes` at `pace`, counting them as served.
async fn write_paced(
    socket: &mut TcpStream,
    bytes: &[u8],
    pace: Pace,
    state: &Mutex<State>,
) -> std::io::Result<()> {
    let (piece_len, pause) = match pace {
        Pace::Full => (16 * 1024, None),
        Pace::Slow(pause) => (16 * 1024, Some(pause)),
        Pace::Trickle(rate) => {
            let step = (rate / 10).max(1);
            (
                step as usize,
                Some(Duration::from_secs_f64(f64::from(step) / f64::from(rate))),
            )
        }
    };
    for piece in bytes.chunks(piece_len) {
        socket.write_all(piece).await?;
        if matches!(pace, Pace::Trickle(_)) {
            socket.flush().await?;
        }
        state.lock().unwrap().served += piece.len() as u64;
        if let Some(pause) = pause {
            tokio::time::sleep(pause).await;
        }
    }
    Ok(())
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

/// No product published (a `done` log line, over `logs`: every run's, every member's) more often than it
/// has versions (2 for those `changed`), and each at least once: a log format this check no longer reads
/// would otherwise pass it blind. `products`: name -> (local path, bytes).
pub fn assert_published_once_per_version(
    logs: &str,
    products: &std::collections::BTreeMap<String, (String, Vec<u8>)>,
    changed: &std::collections::BTreeSet<String>,
) {
    let mut published: std::collections::BTreeMap<&str, u32> = Default::default();
    for line in logs.lines().filter(|l| l.contains(" done jwst/")) {
        let path = line
            .split(" done ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .unwrap_or_default();
        *published.entry(path).or_default() += 1;
    }
    for (name, (path, _)) in products {
        let versions = if changed.contains(name) { 2 } else { 1 };
        let n = published.get(path.as_str()).copied().unwrap_or(0);
        assert!(n >= 1, "{path}: no \"done\" line in any log");
        assert!(
            n <= versions,
            "{path} published {n} times for {versions} version(s)"
        );
    }
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
