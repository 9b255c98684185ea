#!/usr/bin/env python3
"""Download benchmark: mastsub against curl, aria2c and astroquery on the same files, side by side.

nginx (Debian's) serves FITS-shaped products from a folder, with MAST's
`/search/jwst/api/v0.1/retrieve_product?product_name=X` URL mapped onto it (Range, If-Range, ETag and
Last-Modified as a static server does). Sets: 8 x 128 MiB and 400 x 256 KiB. Four at a time for mastsub
(`download.workers = 4`), `curl --parallel --parallel-max 4` and `aria2c -j4`; astroquery's own transfer
function (`BaseQuery._download_file`, what `download_products` calls) one file at a time, as astroquery
works. mastsub is timed from `mastsub run` start until every job is done, on a notice ingested beforehand;
it fsyncs every file and its folder before publishing, which the others do not do.

Also: peak RSS of mastsub downloading one 2 GiB product, and the bytes fetched twice when mastsub is
killed with -9 halfway through it and restarted (from nginx's access log).

Cloud: the 8 x 128 MiB set again, from MAST's URLs and as bucket objects (`[cloud]`): nginx serves the same
files at `/stpubdata/jwst/public/bench/X` with the headers S3 gives them, and MAST's path look-up as a fixed
JSON answer. Two kinds of object: uploaded whole (ETag = the MD5 of the bytes, which mastsub computes) and
uploaded in 8 MiB parts with S3's default whole-object CRC64NVME (`md5-N` ETag, the CRC computed); curl
fetches the bucket URLs as the baseline.

Far server: 200 small products (64 KiB) from a server that answers every request after 50 ms, as one
far from MAST does (`FarServer`: HTTP/1.1 with keep-alive, the same product URL); with 4 at a time the
physical floor is 200 x 50 ms / 4 = 2.5 s, and every tool is compared with it.

Usage: bench/download.py BINARY WORKDIR [REPEAT]
Environment: BENCH_ONLY=small (or large) runs that set alone, with curl and aria2c, and skips the 2 GiB
product; BENCH_ONLY=cloud runs only the cloud set; BENCH_ONLY=far runs only the far-server set; BENCH_ONLY=latency measures only the
inbox-to-first-request time.
"""
import http.server, json, os, shutil, signal, sqlite3, statistics, subprocess, sys, threading, time

from measure import measured, peak_rss_mib, read_rss


BIN, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
FLOOR = os.path.join(os.path.dirname(BIN), "examples", "download_floor")
S3_DIGESTS = os.path.join(os.path.dirname(BIN), "examples", "s3_digests")
REPEAT = int(sys.argv[3]) if len(sys.argv) > 3 else 3
DATA = os.path.join(WORK, "data")
BLOCK = 2880


def fits_file(path, size):
    """A valid FITS file of about `size` bytes (whole 2880-byte blocks): a primary header whose NAXIS1 covers
    the random 8-bit data after it, so that mastsub's FITS walk accepts it."""
    blocks = max(2, size // BLOCK)
    data = (blocks - 1) * BLOCK
    header = "".join(f"{c:<80}" for c in ["SIMPLE  =                    T", "BITPIX  =                    8",
                                          "NAXIS   =                    1", f"NAXIS1  = {data:>20}", "END"])
    header = f"{header:<2880}".encode()
    if os.path.exists(path) and os.path.getsize(path) == blocks * BLOCK:
        with open(path, "rb") as f:
            if f.read(BLOCK) == header:
                return
    with open(path, "wb") as f:
        f.write(header)
        remaining = data
        chunk = os.urandom(4 * 1024 * 1024)
        while remaining > 0:
            n = min(remaining, len(chunk))
            f.write(chunk[:n])
            remaining -= n


FAR_DELAY = 0.05
FAR_NAMES = [f"jw{n:05d}_far_cal.fits" for n in range(200)]


class FarHandler(http.server.BaseHTTPRequestHandler):
    """Answers `retrieve_product?product_name=X` from DATA after FAR_DELAY, keeping connections open."""
    protocol_version = "HTTP/1.1"
    # Headers and body go out as separate writes: with Nagle's algorithm on, each answer would wait for
    # the client's delayed ACK (40 ms) and the server, not the tools, would set the pace.
    disable_nagle_algorithm = True
    bodies = {}
    requests = []
    connections = []

    def setup(self):
        FarHandler.connections.append(1)
        super().setup()

    def do_GET(self):
        time.sleep(FAR_DELAY)
        name = self.path.split("product_name=", 1)[-1]
        body = self.bodies.get(name)
        FarHandler.requests.append(self.command)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{name}"')
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self):
        FarHandler.requests.append(self.command)
        time.sleep(FAR_DELAY)
        self.send_response(405)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def start_far():
    for n in FAR_NAMES:
        with open(os.path.join(DATA, n), "rb") as f:
            FarHandler.bodies[n] = f.read()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FarHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def make_sets():
    os.makedirs(DATA, exist_ok=True)
    sets = {
        "8 x 128 MiB": [f"jw{n:05d}_large_cal.fits" for n in range(8)],
        "400 x 256 KiB": [f"jw{n:05d}_small_cal.fits" for n in range(400)],
    }
    for name in sets["8 x 128 MiB"]:
        fits_file(os.path.join(DATA, name), 128 * 1024 * 1024)
    for name in sets["400 x 256 KiB"]:
        fits_file(os.path.join(DATA, name), 256 * 1024)
    for name in FAR_NAMES:
        fits_file(os.path.join(DATA, name), 64 * 1024)
    fits_file(os.path.join(DATA, "jw99999_huge_cal.fits"), 2 * 1024 * 1024 * 1024)
    return sets


def s3_headers(names):
    """nginx `map` blocks giving each bucket object S3's headers: the single-part ETag (MD5), the multipart
    ETag (8 MiB parts) and the CRC64NVME, from the s3_digests example."""
    single, multi, crc = [], [], []
    for n in names:
        out = subprocess.run([S3_DIGESTS, os.path.join(DATA, n)], check=True, capture_output=True,
                             text=True).stdout.split()
        single.append(f'    /stpubdata/jwst/public/bench/{n} \'{out[0]}\';')
        multi.append(f'    /stpubmulti/jwst/public/bench/{n} \'{out[1]}\';')
        crc.append(f'    /stpubmulti/jwst/public/bench/{n} {out[2]};')
    block = lambda var, rows: "map $uri $" + var + " {\n" + "\n".join(rows) + "\n}\n"
    return ("map_hash_bucket_size 256;\n" + block("s3_etag", single + multi) + block("s3_crc", crc))


def path_lookup(names):
    """MAST's path look-up answer for every product of `names` (the same answer whatever is asked)."""
    return json.dumps({f"mast:JWST/product/{n}": {"status_code": 200, "path": f"/jwst/public/bench/{n}"}
                       for n in names}, separators=(",", ":"))


def start_nginx(cloud_names=()):
    port = 18000 + os.getpid() % 1000
    conf_dir = os.path.join(WORK, "nginx")
    shutil.rmtree(conf_dir, ignore_errors=True)
    os.makedirs(conf_dir)
    conf = f"""
daemon off;
worker_processes 1;
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    log_format bytes '$request_uri $status $body_bytes_sent';
    log_format timed '$msec $request_time $request_uri';
    access_log {conf_dir}/access.log bytes;
    access_log {conf_dir}/timed.log timed;
    client_body_temp_path {conf_dir}/tmp;
    proxy_temp_path {conf_dir}/tmp;
    fastcgi_temp_path {conf_dir}/tmp;
    uwsgi_temp_path {conf_dir}/tmp;
    scgi_temp_path {conf_dir}/tmp;
    sendfile on;
    {s3_headers(cloud_names)}
    server {{
        listen 127.0.0.1:{port};
        location = /search/jwst/api/v0.1/retrieve_product {{ rewrite ^ /files/$arg_product_name last; }}
        location /files/ {{ alias {DATA}/; }}
        location = /api/v0.1/path_lookup/ {{ default_type application/json; return 200 '{path_lookup(cloud_names)}'; }}
        location /stpubdata/jwst/public/bench/ {{ alias {DATA}/; etag off; add_header ETag $s3_etag; }}
        location /stpubmulti/jwst/public/bench/ {{
            alias {DATA}/; etag off; add_header ETag $s3_etag;
            add_header x-amz-checksum-crc64nvme $s3_crc; add_header x-amz-checksum-type FULL_OBJECT;
        }}
    }}
}}
"""
    path = os.path.join(conf_dir, "nginx.conf")
    with open(path, "w") as f:
        f.write(conf)
    check = subprocess.run(["nginx", "-t", "-c", path, "-p", conf_dir], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"nginx refuses the configuration: {check.stderr}")
    proc = subprocess.Popen(["nginx", "-c", path, "-p", conf_dir], stderr=subprocess.DEVNULL)
    probe = url_of(f"http://127.0.0.1:{port}", "jw00000_small_cal.fits")
    for _ in range(100):
        if subprocess.run(["curl", "-sf", "-o", "/dev/null", probe]).returncode == 0:
            break
        time.sleep(0.05)
    else:
        sys.exit("nginx did not start")
    return proc, f"http://127.0.0.1:{port}", os.path.join(conf_dir, "access.log")


def url_of(base, name):
    return f"{base}/search/jwst/api/v0.1/retrieve_product?product_name={name}"


def fresh(tool):
    d = os.path.join(WORK, "out", tool)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def timed(argv, cwd=None):
    wrapped, rss = measured(argv)
    start = time.perf_counter()
    p = subprocess.Popen(wrapped, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, _ = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{argv[0]} failed: {p.stderr.read().decode()[-2000:]}")
    return elapsed, read_rss(rss)


def notice(names):
    return [{
        "event_id": f"00000000-0000-4000-8000-{i:012d}", "mission": "JWST", "fileset": "bench",
        "filename": n, "program": 1, "event_type": "New",
        "archived_date": "2026-01-01T00:00:00", "public_release_date": "2026-01-01T00:00:00",
    } for i, n in enumerate(names)]


def done_count(db):
    """Jobs done; stops the benchmark if any has failed (it would wait forever)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        n = con.execute("SELECT count(*) FROM downloads WHERE state = 'done'").fetchone()[0]
        failed = con.execute("SELECT last_error FROM downloads WHERE state IN ('failed', 'needs_auth')").fetchall()
        con.close()
    except sqlite3.Error:
        return 0
    if failed:
        sys.exit(f"mastsub: {len(failed)} download(s) failed, e.g. {failed[0][0]}")
    return n


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port, stop, paths=("/metrics", "/")):
    """Fetches the daemon's /metrics and status page every half second until `stop`, as a Prometheus
    server and an open browser tab would (a scrape every 15 s is usual: this is thirty times that)."""
    import urllib.request
    while not stop.is_set():
        for path in paths:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()
            except OSError:
                pass
        stop.wait(0.5)


def mastsub_run(base, names, kill_after=None, binary=BIN, tool="mastsub", http=False, bucket=None):
    """Ingests a notice for `names`, runs the daemon until all are done; returns (seconds, peak RSS MiB).
    With `http`, the daemon serves [http] and is scraped every half second meanwhile; with `bucket`, it
    takes the products from that bucket URL ([cloud])."""
    d = fresh(tool)
    port = free_port()
    with open(os.path.join(d, "mastsub.toml"), "w") as f:
        f.write(f'[mast]\nbase_url = "{base}"\n[download]\nworkers = 4\n[log]\nlevel = "warn"\n')
        if http:
            f.write(f'[http]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
        if bucket:
            f.write(f'[cloud]\nenabled = true\nbucket_url = "{bucket}"\nonly = true\n')
    with open(os.path.join(d, "notice.json"), "w") as f:
        json.dump(notice(names), f)
    subprocess.run([binary, "--config", "mastsub.toml", "ingest", "notice.json"], cwd=d, check=True,
                   stdout=subprocess.DEVNULL)
    db = os.path.join(d, "mastsub.db")
    if kill_after is not None:
        proc = subprocess.Popen([binary, "--config", "mastsub.toml", "run"], cwd=d, stderr=subprocess.DEVNULL)
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    start = time.perf_counter()
    proc = subprocess.Popen([binary, "--config", "mastsub.toml", "run"], cwd=d, stderr=subprocess.DEVNULL)
    stop = threading.Event()
    scraper = threading.Thread(target=scrape, args=(port, stop)) if http else None
    if scraper:
        scraper.start()
    while done_count(db) < len(names):
        if proc.poll() is not None:
            sys.exit("mastsub run exited early")
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    if bucket:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        rows = con.execute("SELECT source, verified FROM downloads").fetchall()
        con.close()
        if any(src != "cloud" or "matched" not in (v or "") for src, v in rows):
            sys.exit(f"{tool}: not every product came from the bucket with S3's digest checked: {rows[:2]}")
    stop.set()
    if scraper:
        scraper.join()
    rss = peak_rss_mib(proc.pid)
    proc.terminate()
    os.wait4(proc.pid, 0)
    return elapsed, rss


def inbox_latency(base, rounds=7):
    """Time from a notice renamed into a running daemon's inbox to nginx seeing its product's request."""
    d = fresh("latency")
    with open(os.path.join(d, "mastsub.toml"), "w") as f:
        f.write(f'[mast]\nbase_url = "{base}"\n[log]\nlevel = "warn"\n')
    os.makedirs(os.path.join(d, "inbox"))
    timed_log = os.path.join(WORK, "nginx", "timed.log")
    proc = subprocess.Popen([BIN, "--config", "mastsub.toml", "run"], cwd=d, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # the watcher is up
        latencies = []
        for i in range(rounds):
            name = f"jw{i:05d}_small_cal.fits"
            record = notice([name])[0]
            record["event_id"] = f"00000000-0000-4000-a000-{i:012d}"
            record["fileset"] = f"latency{i}"
            tmp = os.path.join(d, f"n{i}.json.tmp")
            with open(tmp, "w") as f:
                json.dump([record], f)
            start = time.time()
            os.rename(tmp, os.path.join(d, "inbox", f"n{i}.json"))
            seen = None
            deadline = time.time() + 10
            while seen is None and time.time() < deadline:
                with open(timed_log) as f:
                    for line in f:
                        at, took, uri = line.split(" ", 2)
                        began = float(at) - float(took)  # when nginx read the request
                        if name in uri and began >= start - 0.001:
                            seen = began
                            break
                time.sleep(0.002)
            if seen is None:
                sys.exit(f"no request for {name} within 10 s of the notice landing")
            latencies.append((seen - start) * 1000)
            time.sleep(0.3)
        return latencies
    finally:
        proc.terminate()
        proc.wait()


def curl_config(tool, base, names):
    """A fresh output folder for `tool` and a curl config fetching `names` into it; returns the config."""
    d = fresh(tool)
    cfg = os.path.join(d, "urls.txt")
    with open(cfg, "w") as f:
        for n in names:
            f.write(f'url = "{url_of(base, n)}"\noutput = "{os.path.join(d, n)}"\n')
    return cfg


def curl_run(base, names):
    cfg = curl_config("curl", base, names)
    return timed(["curl", "--parallel", "--parallel-max", "4", "-s", "-f", "-K", cfg])


def curl_bucket_run(base, names):
    """curl from the bucket's URLs."""
    d = fresh("curl_bucket")
    cfg = os.path.join(WORK, "out", "curl_bucket.cfg")
    with open(cfg, "w") as f:
        for n in names:
            f.write(f'url = "{base}/stpubdata/jwst/public/bench/{n}"\noutput = "{d}/{n}"\n')
    return timed(["curl", "--parallel", "--parallel-max", "4", "-s", "-f", "-K", cfg])


def cloud_table(base, names):
    """The same set from MAST's URLs and from the bucket, each tool in turn each round."""
    total = sum(os.path.getsize(os.path.join(DATA, n)) for n in names)
    tools = [
        ("mastsub, from MAST's URLs", "mastsub", lambda: mastsub_run(base, names)),
        ("mastsub [cloud], objects uploaded whole: ETag = MD5, checked", "mastsub_cloud",
         lambda: mastsub_run(base, names, tool="mastsub_cloud", bucket=f"{base}/stpubdata")),
        ("mastsub [cloud], 8 MiB parts: md5-N ETag, CRC64NVME checked", "mastsub_cloud_multi",
         lambda: mastsub_run(base, names, tool="mastsub_cloud_multi", bucket=f"{base}/stpubmulti")),
        ("curl --parallel-max 4, from the bucket", "curl_bucket", lambda: curl_bucket_run(base, names)),
    ]
    runs = {tool: [] for tool, _, _ in tools}
    for _ in range(REPEAT):
        for tool, key, fn in tools:
            # The tool before left its files' write-back (curl does not fsync): not this one's to pay.
            subprocess.run(["sync"], check=True)
            runs[tool].append(fn())
            check_same(key, names)
    print()
    print(f"Cloud ({len(names)} x 128 MiB from MAST's URLs and as bucket objects, the same nginx):")
    print()
    print(f"| tool | seconds (median of {REPEAT}) | MB/s | peak RSS MiB | vs mastsub from MAST |")
    print("|---|---:|---:|---:|---:|")
    m = statistics.median(r[0] for r in runs[tools[0][0]])
    for tool, rs in runs.items():
        t = statistics.median(r[0] for r in rs)
        rss = max(r[1] for r in rs)
        ratio = "-" if tool == tools[0][0] else f"{t / m:.2f}x"
        print(f"| {tool} | {t:.2f} | {total / t / 1e6:.0f} | {rss:.0f} | {ratio} |")


def curl_sync_run(base, names):
    """curl, then `sync`: the same durability as mastsub's fsync + rename (for the whole machine)."""
    cfg = curl_config("curlsync", base, names)
    return timed(["sh", "-c", f'curl --parallel --parallel-max 4 -s -f -K "{cfg}" && sync'])


def floor_run(base, names):
    """bench/download_floor.rs: mastsub's HTTP client with fsync + rename and no bookkeeping at all."""
    d = fresh("floor")
    return timed([FLOOR, base, d, *names])


def aria2c_run(base, names):
    d = fresh("aria2c")
    lst = os.path.join(d, "urls.txt")
    with open(lst, "w") as f:
        for n in names:
            f.write(f"{url_of(base, n)}\n  out={n}\n")
    return timed(["aria2c", "-q", "-j4", "-x1", "--file-allocation=none", "--auto-file-renaming=false",
                  "--allow-overwrite=true", "-d", d, "-i", lst])


ASTROQUERY = r'''
import sys
from astroquery.query import BaseQuery
q = BaseQuery()
base, out = sys.argv[1], sys.argv[2]
for name in sys.argv[3:]:
    q._download_file(f"{base}/search/jwst/api/v0.1/retrieve_product?product_name={name}", f"{out}/{name}")
'''


def astroquery_run(base, names):
    d = fresh("astroquery")
    script = os.path.join(d, "aq.py")
    with open(script, "w") as f:
        f.write(ASTROQUERY)
    return timed([sys.executable, script, base, d, *names])


def have_astroquery():
    return subprocess.run([sys.executable, "-c", "import astroquery.query"], capture_output=True).returncode == 0


def check_same(tool, names):
    """Every file the tool wrote is the one served, byte for byte."""
    import filecmp
    for n in names:
        got = (os.path.join(WORK, "out", tool, "mastDownload", "jwst", "bench", n) if tool.startswith("mastsub")
               else os.path.join(WORK, "out", tool, n))
        if not filecmp.cmp(got, os.path.join(DATA, n), shallow=False):
            sys.exit(f"{tool}: {n} differs from what was served")


def far_table(tools):
    """The far-server set: every tool against the 2.5 s floor, and how many requests each made."""
    server, base = start_far()
    floor = len(FAR_NAMES) * FAR_DELAY / 4
    print()
    print(f"Far server ({len(FAR_NAMES)} x 64 KiB, every request answered after {FAR_DELAY * 1000:.0f} ms, "
          f"4 at a time; floor {floor:.2f} s):")
    print()
    print(f"| tool | seconds (median of {REPEAT}) | x the floor | requests per product | connections |")
    print("|---|---:|---:|---:|---:|")
    try:
        runs = {tool: [] for tool, _, _ in tools}
        asked = {tool: (0, 0) for tool, _, _ in tools}
        for _ in range(REPEAT):
            for tool, key, fn in tools:
                FarHandler.requests, FarHandler.connections = [], []
                runs[tool].append(fn(base, FAR_NAMES)[0])
                asked[tool] = (len(FarHandler.requests), len(FarHandler.connections))
                check_same(key, FAR_NAMES)
        for tool, rs in runs.items():
            t = statistics.median(rs)
            requests, connections = asked[tool]
            print(f"| {tool} | {t:.2f} | {t / floor:.3f}x | {requests / len(FAR_NAMES):.2f} | {connections} |")
    finally:
        server.shutdown()


def main():
    sets = make_sets()
    only = os.environ.get("BENCH_ONLY")
    cloud_names = sets["8 x 128 MiB"]
    if only in ("latency", "far", "cloud"):
        sets = {}
    elif only:
        sets = {k: v for k, v in sets.items() if only in k or only in ("small", "large") and
                (("256 KiB" in k) == (only == "small"))}
    nginx, base, access_log = start_nginx(cloud_names)
    try:
        tools = [("mastsub", "mastsub", mastsub_run), ("curl --parallel-max 4", "curl", curl_run),
                 ("aria2c -j4", "aria2c", aria2c_run)]
        # The same build with the HTTP endpoint on and scraped: what metrics and the page cost.
        tools.insert(1, ("mastsub, [http] on, /metrics and / fetched every 0.5 s", "mastsub_http",
                         lambda base, names: mastsub_run(base, names, tool="mastsub_http", http=True)))
        before = os.environ.get("BENCH_BEFORE")
        if before:
            # Another build of mastsub (say, the last commit's), for before-and-after rows in one run.
            tools.insert(1, ("mastsub, build before the change", "mastsub_before",
                             lambda base, names: mastsub_run(base, names, binary=os.path.abspath(before),
                                                             tool="mastsub_before")))
        if have_astroquery() and not only:
            tools.append(("astroquery _download_file (sequential)", "astroquery", astroquery_run))
        tools += [("curl --parallel-max 4, then sync", "curlsync", curl_sync_run),
                  ("floor: mastsub's HTTP client + fsync + rename, no bookkeeping", "floor", floor_run)]
        print(f"| set | tool | seconds (median of {REPEAT}) | MB/s | peak RSS MiB | mastsub speed vs it |")
        print("|---|---|---:|---:|---:|---:|")
        for set_name, names in sets.items():
            total = sum(os.path.getsize(os.path.join(DATA, n)) for n in names)
            # Rounds take every tool in turn, so that the VM's drift falls on all of them alike.
            runs = {tool: [] for tool, _, _ in tools}
            for _ in range(REPEAT):
                for tool, key, fn in tools:
                    # The tool before left its files' write-back (curl and aria2c do not fsync): not
                    # this one's to pay.
                    subprocess.run(["sync"], check=True)
                    runs[tool].append(fn(base, names))
                    check_same(key, names)
            results = {tool: (statistics.median(r[0] for r in rs), max(r[1] for r in rs))
                       for tool, rs in runs.items()}
            m = results["mastsub"][0]
            for tool, (t, rss) in results.items():
                ratio = "-" if tool == "mastsub" else f"{t / m:.2f}x"
                print(f"| {set_name} | {tool} | {t:.2f} | {total / t / 1e6:.0f} | {rss:.0f} | {ratio} |")
        if only in (None, "cloud"):
            cloud_table(base, cloud_names)
        if only in (None, "far"):
            far_table([t for t in tools if t[1] in ("mastsub", "mastsub_before", "curl", "aria2c")])
        if only and only != "latency":
            return
        lat = inbox_latency(base)
        print()
        print(f"Notice renamed into the inbox of a running daemon -> first product request at nginx "
              f"({len(lat)} notices): median {statistics.median(lat):.0f} ms, max {max(lat):.0f} ms "
              f"(target: under 100 ms).")
        if only:
            return
        # One 2 GiB product: peak RSS, and bytes fetched twice after kill -9 halfway.
        huge = ["jw99999_huge_cal.fits"]
        size = os.path.getsize(os.path.join(DATA, huge[0]))
        t, rss = mastsub_run(base, huge)
        print()
        print(f"One 2 GiB product: mastsub {t:.2f} s ({size / t / 1e6:.0f} MB/s), peak RSS {rss:.0f} MiB.")
        open(access_log, "w").close()
        nginx.send_signal(signal.SIGUSR1)  # reopen the log
        time.sleep(0.2)
        t, _ = mastsub_run(base, huge, kill_after=t / 2)
        time.sleep(0.3)
        requests = []
        with open(access_log) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 3 and "huge" in parts[0]:
                    requests.append((int(parts[1]), int(parts[2])))
        served = sum(b for _, b in requests)
        answers = ", ".join(f"{status} with {sent} bytes" for status, sent in requests)
        if len(requests) < 2 or not any(status == 206 for status, _ in requests):
            print(f"Killed with -9 halfway, then restarted: nginx logged {answers or 'nothing'}; the kill did not "
                  "land inside a logged transfer, so this run measured nothing about resuming.")
        else:
            print(f"Killed with -9 halfway, then restarted: nginx logged {answers}: {served} bytes for {size} "
                  f"({served - size} fetched twice, {100 * (served - size) / size:.3f}%).")
    finally:
        nginx.terminate()
        nginx.wait()


main()
