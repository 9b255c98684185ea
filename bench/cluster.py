#!/usr/bin/env python3
"""Cluster benchmark: several `mastsub run` members on one PostgreSQL database and one download folder.

Everything runs on this one machine: a PostgreSQL server made with initdb under WORKDIR (run as the
`postgres` user when we are root; `fsync = on`, as a production server runs, unless BENCH_PG_FSYNC=off),
a MAST stand-in in this script, and the members, each a `mastsub run` with its own name and inbox folder
(MASTSUB_CLUSTER__NODE, MASTSUB_INBOX__DIR) and the same configuration otherwise.

1. Throughput: BENCH_CLUSTER_PRODUCTS (48) FITS products of BENCH_CLUSTER_MIB (4) MiB, timed from the
   rename of the notice into an inbox until every job is `done` (the database polled every 25 ms through
   one psql session). The stand-in sends every response at BENCH_CLUSTER_RATE (3,000,000) bytes/s, as a
   server far away does, with no limit in total, so N members of 4 workers should take 1/N of one
   member's time. Runs: SQLite, 1 member (the reference); PostgreSQL, 1, 2 and 3 members with the one
   notice renamed into node-1's inbox (the others learn of its jobs at their next sweep, within 5 s: the
   rounds drop it at points spread over that cycle); PostgreSQL, 2 and 3 members with the products split
   into one notice per member, each into its own inbox (every member is woken by its own ingest). Every
   file is compared byte for byte with what was served. Recorded too: when each member first held a
   job, the jobs each did (its log), the CPU time of the members, of PostgreSQL's processes and of this
   script (the stand-in), and the machine's CPU use (/proc/stat: other work on the machine counts too).
2. Claims: `bench/claims.rs` (cargo example `claims`): jobs claimed and ended per second, K worker tasks
   at once, on SQLite and on PostgreSQL (one store with its pool of 8 connections, and one store per 4
   tasks, as members of 4 workers each), and on a second PostgreSQL server with the other fsync setting.
3. Fail-over: two members; a notice of 4 products of 16 MiB dropped on node-a; once node-a holds running
   downloads with bytes on disk it is killed with -9, and the time until each of its jobs is claimed by
   node-b is measured (the downloads table polled every 25 ms), for download.lease = 3 s and 10 s, the
   kill spread over node-b's 5 s sweep cycle by the rounds. Each member runs in a PID namespace of its
   own (`unshare --pid --fork`), so that each sees the other as another host and judges it by its lease
   alone, as across hosts; a row with both in one namespace shows the one-machine case (a dead pid is
   seen at the next sweep, whatever the lease). The stand-in is then let go at full speed, and every
   product must end whole.

Usage: bench/cluster.py BINARY WORKDIR [REPEAT]   (bench/run.sh runs it; REPEAT rounds, medians)
Environment: BENCH_CLUSTER=throughput,claims,failover (which parts; all by default);
BENCH_PG_FSYNC=off (the server's fsync; on by default); BENCH_CLUSTER_PRODUCTS, BENCH_CLUSTER_MIB,
BENCH_CLUSTER_RATE (bytes/s per response) for the throughput set; BENCH_CLAIM_JOBS (2000) and
BENCH_CLAIM_TASKS (1,4,16,32) for the claims; BENCH_FAILOVER_ROUNDS (4) and BENCH_FAILOVER_LEASES (3s,10s).
"""
import http.server, json, os, pwd, re, shutil, signal, socket, sqlite3, statistics, subprocess, sys, threading
import time

BIN, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
CLAIMS = os.path.join(os.path.dirname(BIN), "examples", "claims")
REPEAT = int(sys.argv[3]) if len(sys.argv) > 3 else 3
ROOT = os.path.join(WORK, "cluster")
DATA = os.path.join(ROOT, "data")
PARTS = os.environ.get("BENCH_CLUSTER", "throughput,claims,failover").split(",")
FSYNC = os.environ.get("BENCH_PG_FSYNC", "on")
PRODUCTS = int(os.environ.get("BENCH_CLUSTER_PRODUCTS", "48"))
MIB = float(os.environ.get("BENCH_CLUSTER_MIB", "4"))
RATE = float(os.environ.get("BENCH_CLUSTER_RATE", "3000000"))
CLAIM_JOBS = int(os.environ.get("BENCH_CLAIM_JOBS", "2000"))
CLAIM_TASKS = [int(k) for k in os.environ.get("BENCH_CLAIM_TASKS", "1,4,16,32").split(",")]
FAILOVER_ROUNDS = int(os.environ.get("BENCH_FAILOVER_ROUNDS", "4"))
FAILOVER_LEASES = os.environ.get("BENCH_FAILOVER_LEASES", "3s,10s").split(",")
WORKERS = 4
BLOCK = 2880
POLL = 0.025
SWEEP = 5.0  # the download pool's sweep, and an idle pool's longest nap (src/download/mod.rs)


def fits_bytes(size, seed):
    """A valid FITS file of about `size` bytes (whole 2880-byte blocks), random 8-bit data."""
    blocks = max(2, size // BLOCK)
    data = (blocks - 1) * BLOCK
    header = "".join(f"{c:<80}" for c in ["SIMPLE  =                    T", "BITPIX  =                    8",
                                          "NAXIS   =                    1", f"NAXIS1  = {data:>20}", "END"])
    return f"{header:<2880}".encode() + os.urandom(data)


# ---------------------------------------------------------------------------------------------------------
# PostgreSQL


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres():
    """preexec_fn: become the `postgres` user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return None
    u = pwd.getpwnam("postgres")

    def drop():
        os.setgroups([])
        os.setgid(u.pw_gid)
        os.setuid(u.pw_uid)
    return drop


def pg_bin():
    versions = sorted((d for d in os.listdir("/usr/lib/postgresql") if d.isdigit()), key=int)
    if not versions:
        sys.exit("PostgreSQL is not installed (apt-get install postgresql)")
    return f"/usr/lib/postgresql/{versions[-1]}/bin"


class Postgres:
    def __init__(self, fsync):
        self.bin = pg_bin()
        self.dir = os.path.join(ROOT, f"pg-fsync-{fsync}")
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        if os.geteuid() == 0:
            u = pwd.getpwnam("postgres")
            os.chown(self.dir, u.pw_uid, u.pw_gid)
        subprocess.run([f"{self.bin}/initdb", "-D", "data", "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], cwd=self.dir, preexec_fn=as_postgres(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = free_port()
        self.log = open(os.path.join(ROOT, f"pg-fsync-{fsync}.log"), "w")
        self.proc = subprocess.Popen(
            [f"{self.bin}/postgres", "-D", "data", "-p", str(self.port), "-k", self.dir,
             "-c", "listen_addresses=127.0.0.1", "-c", f"fsync={fsync}", "-c", "max_connections=300"],
            cwd=self.dir, preexec_fn=as_postgres(), stdout=subprocess.DEVNULL, stderr=self.log)
        for _ in range(300):
            if self.psql("postgres", "SELECT 1").strip() == "1":
                break
            time.sleep(0.1)
        else:
            sys.exit("PostgreSQL did not start")
        self.n = 0

    def url(self, db):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def psql(self, db, sql):
        out = subprocess.run([f"{self.bin}/psql", "-X", "-q", "-A", "-t", "-d", self.url(db), "-c", sql],
                             capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else ""

    def database(self, prefix):
        self.n += 1
        name = f"{prefix}_{self.n}"
        out = subprocess.run([f"{self.bin}/psql", "-X", "-q", "-d", self.url("postgres"), "-c",
                              f"CREATE DATABASE {name}"], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"CREATE DATABASE {name}: {out.stderr}")
        return self.url(name)

    def pids(self):
        uid = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.getuid()
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and owner_of(p) == uid]

    def stop(self):
        self.proc.send_signal(signal.SIGINT)  # fast shutdown
        self.proc.wait()
        self.log.close()


def owner_of(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


class Session:
    """One psql process kept open: a query every 25 ms costs no process start."""

    def __init__(self, url):
        self.p = subprocess.Popen([f"{pg_bin()}/psql", "-X", "-q", "-A", "-t", "-F", "\t", "-d", url],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  text=True, bufsize=1)

    def rows(self, sql):
        self.p.stdin.write(sql.rstrip().rstrip(";") + ";\n\\echo __end__\n")
        self.p.stdin.flush()
        rows = []
        while True:
            line = self.p.stdout.readline()
            if not line:
                raise RuntimeError("psql ended")
            line = line.rstrip("\n")
            if line == "__end__":
                return rows
            if line:
                rows.append(line.split("\t"))

    def close(self):
        self.p.stdin.close()
        self.p.wait()


class SqliteSession:
    def __init__(self, path):
        self.path = path

    def rows(self, sql):
        try:
            con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=1)
            try:
                return [[str(c) for c in r] for r in con.execute(sql).fetchall()]
            finally:
                con.close()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e) or "unable to open" in str(e) or "locked" in str(e):
                return []
            raise

    def close(self):
        pass


# ---------------------------------------------------------------------------------------------------------
# The MAST stand-in: every response paced at a rate of its own.


class Paced(http.server.BaseHTTPRequestHandler):
    """`retrieve_product?product_name=X` from memory, as a static server answers (ETag, Last-Modified,
    Range, If-Range), each body sent at `rate` bytes/s (None: as fast as it goes). Keep-alive."""
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    bodies = {}
    rate = None
    stats = {"requests": 0, "ranges": 0, "bytes": 0}
    lock = threading.Lock()

    def do_GET(self):
        name = self.path.split("product_name=", 1)[-1]
        body = self.bodies.get(name)
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        etag = f'"{name}-1"'
        start = 0
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        if rng and rng.startswith("bytes=") and rng.endswith("-") and if_range in (None, etag, LAST_MODIFIED):
            start = int(rng[6:-1])
        with Paced.lock:
            Paced.stats["requests"] += 1
            Paced.stats["ranges"] += start > 0
        if start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", LAST_MODIFIED)
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        began, sent, pos = time.monotonic(), 0, start
        try:
            while pos < len(body):
                n = min(65536, len(body) - pos)
                self.wfile.write(body[pos:pos + n])
                pos += n
                sent += n
                rate = Paced.rate
                if rate:
                    ahead = began + sent / rate - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                else:
                    began, sent = time.monotonic(), 0
        except (BrokenPipeError, ConnectionResetError):
            pass
        with Paced.lock:
            Paced.stats["bytes"] += pos - start

    def log_message(self, *args):
        pass


LAST_MODIFIED = "Wed, 01 Jan 2026 00:00:00 GMT"


def start_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Paced)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


# ---------------------------------------------------------------------------------------------------------
# Members


def notice(names, tag, first=0, step=1):
    return [{
        "event_id": f"00000000-0000-4000-{0x8000 + tag:04x}-{first + i * step:012d}", "mission": "JWST",
        "fileset": "bench", "filename": n, "program": 1, "event_type": "New",
        "archived_date": "2026-01-01T00:00:00", "public_release_date": "2026-01-01T00:00:00",
    } for i, n in enumerate(names)]


class Member:
    def __init__(self, run_dir, node, database, base, lease="60s", ns=False):
        self.node, self.run_dir = node, run_dir
        self.inbox = os.path.join(run_dir, f"inbox-{node}")
        os.makedirs(self.inbox, exist_ok=True)
        conf = os.path.join(run_dir, "mastsub.toml")
        if not os.path.exists(conf):
            with open(conf, "w") as f:
                f.write(f'[storage]\ndownloads = "{run_dir}/mastDownload"\n'
                        f'[mast]\nbase_url = "{base}"\n'
                        f'[download]\nworkers = {WORKERS}\nmin_free_space = "0B"\n'
                        f'[log]\nlevel = "info"\n')
        env = dict(os.environ, MASTSUB_STORAGE__DATABASE=database, MASTSUB_CLUSTER__NODE=node,
                   MASTSUB_INBOX__DIR=self.inbox, MASTSUB_DOWNLOAD__LEASE=lease,
                   MASTSUB_DOWNLOAD__WORKERS=str(WORKERS))
        env.pop("RUST_LOG", None)
        self.log_path = os.path.join(run_dir, f"{node}.log")
        self.log = open(self.log_path, "w")
        argv = [BIN, "--config", conf, "run"]
        if ns:
            # A PID namespace of its own: its owner names another "machine" (the pid namespace is part
            # of it), so the others judge it by its lease alone, as members on other hosts.
            argv = ["unshare", "--pid", "--fork", "--kill-child"] + argv
        self.proc = subprocess.Popen(argv, cwd=run_dir, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        self.pid = self.proc.pid
        if ns:
            self.pid = None
            for _ in range(200):
                kids = children(self.proc.pid)
                if kids:
                    self.pid = kids[0]
                    break
                time.sleep(0.01)
            if self.pid is None:
                sys.exit(f"{node}: no mastsub under unshare")

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with open(self.log_path) as f:
                if "watching inbox" in f.read():
                    return
            if self.proc.poll() is not None:
                sys.exit(f"{self.node} exited: {self.text()[-3000:]}")
            time.sleep(0.05)
        sys.exit(f"{self.node} did not start: {self.text()[-3000:]}")

    def drop(self, records, name):
        staged = os.path.join(self.run_dir, f"{name}.staged")
        with open(staged, "w") as f:
            json.dump(records, f)
        os.rename(staged, os.path.join(self.inbox, name))

    def cpu(self):
        return proc_cpu(self.pid)

    def kill9(self):
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self):
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        if not self.log.closed:
            self.log.close()

    def text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()


def children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid):
    """User + system CPU seconds of a process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError):
        return 0.0


def machine_cpu():
    """(busy, total) jiffies of all cores."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def log_complaints(members):
    """WARN and ERROR lines of the members' logs (with the member's name), but the expected one of a
    member killed on purpose is not there to see."""
    out = []
    for m in members:
        for line in m.text().splitlines():
            if re.search(r"\b(WARN|ERROR)\b", line):
                out.append(f"{m.node}: {line.strip()}")
    return out


COMPLAINTS = []


def check_same(run_dir, names):
    for n in names:
        with open(os.path.join(run_dir, "mastDownload", "jwst", "bench", n), "rb") as f:
            if f.read() != Paced.bodies[n]:
                sys.exit(f"{run_dir}: {n} differs from what was served")


# ---------------------------------------------------------------------------------------------------------
# 1. Throughput


def throughput_run(pg, base, backend, n, split, names, round_no):
    """One timed run; `split`: the products come as one notice per member, each into its own inbox, instead
    of one notice into node-1's (then the others learn of its jobs at their next sweep)."""
    run_dir = os.path.join(ROOT, "runs", f"{backend}-{n}{'-split' if split else ''}")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    if backend == "sqlite":
        database = os.path.join(run_dir, "mastsub.db")
    else:
        database = pg.database(f"tp{n}")
    members = [Member(run_dir, f"node-{i + 1}", database, base) for i in range(n)]
    try:
        for m in members:
            m.wait_ready()
        if n > 1 and not split:
            # An idle member looks at the queue every 5 s (its sweep) unless its own ingest wakes it: on
            # a cluster running for hours, a notice lands anywhere in that cycle. The rounds spread the
            # drop over it evenly instead of always landing at the same point after the members' start.
            time.sleep((round_no + 0.5) * SWEEP / REPEAT)
        session = SqliteSession(database) if backend == "sqlite" else Session(database)
        pg_pids = pg.pids() if backend != "sqlite" else []
        pg_before = {p: proc_cpu(p) for p in pg_pids}
        cpu_before = [m.cpu() for m in members]
        busy0, total0 = machine_cpu()
        me0 = time.process_time()
        start = time.perf_counter()
        if split:
            for i, m in enumerate(members):
                m.drop(notice(names[i::n], round_no * 16 + i, first=i, step=n), "notice.json")
        else:
            members[0].drop(notice(names, round_no * 16), "notice.json")
        first_claim = {}
        while True:
            rows = session.rows(
                "SELECT 'c', CAST(count(*) FILTER (WHERE state = 'done') AS TEXT), "
                "CAST(count(*) FILTER (WHERE state IN ('failed', 'needs_auth')) AS TEXT) FROM downloads "
                "UNION ALL SELECT 'r', lease_owner, '' FROM downloads WHERE state = 'running'")
            now = time.perf_counter() - start
            done = failed = 0
            for r in rows:
                if r[0] == "c":
                    done, failed = int(r[1]), int(r[2])
                elif r[1]:
                    first_claim.setdefault(r[1].split(":")[0], now)
            if failed:
                sys.exit(f"{backend} x{n}: {failed} download(s) failed; logs in {run_dir}")
            if done == len(names):
                break
            for m in members:
                if m.proc.poll() is not None:
                    sys.exit(f"{m.node} exited early: {m.text()[-3000:]}")
            if now > 300:
                sys.exit(f"{backend} x{n}: not done after 300 s ({rows}); logs in {run_dir}")
            time.sleep(POLL)
        elapsed = time.perf_counter() - start
        busy1, total1 = machine_cpu()
        me1 = time.process_time()
        cpu = [m.cpu() - c for m, c in zip(members, cpu_before)]
        pg_cpu = sum(proc_cpu(p) - pg_before.get(p, 0.0) for p in pg.pids()) if backend != "sqlite" else 0.0
        session.close()
        status = None
        if backend != "sqlite":
            out = subprocess.run([BIN, "--config", os.path.join(run_dir, "mastsub.toml"), "status", "--json"],
                                 env=dict(os.environ, MASTSUB_STORAGE__DATABASE=database),
                                 capture_output=True, text=True)
            status = json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr}
        check_same(run_dir, names)
        jobs = {m.node: m.text().count(" done ") for m in members}
        for c in log_complaints(members):
            COMPLAINTS.append(f"throughput {backend} x{n}: {c}")
        return {
            "seconds": elapsed, "busy": (busy1 - busy0) / max(1, total1 - total0),
            "member_cpu": sum(cpu), "pg_cpu": pg_cpu, "driver_cpu": me1 - me0,
            "first_claim": [first_claim.get(m.node) for m in members], "jobs": jobs, "status": status,
        }
    finally:
        for m in members:
            m.stop()


def throughput(pg, base):
    names = [f"jw{n:05d}_cl_cal.fits" for n in range(PRODUCTS)]
    for i, n in enumerate(names):
        Paced.bodies[n] = fits_bytes(int(MIB * 1024 * 1024), i)
    total = sum(len(Paced.bodies[n]) for n in names)
    Paced.rate = RATE
    configs = [("sqlite", 1, False), ("postgresql", 1, False), ("postgresql", 2, False), ("postgresql", 3, False),
               ("postgresql", 2, True), ("postgresql", 3, True)]
    runs = {c: [] for c in configs}
    for r in range(REPEAT):
        for backend, n, split in configs:
            res = throughput_run(pg, base, backend, n, split, names, r)
            runs[(backend, n, split)].append(res)
            print(f"  round {r + 1}: {backend} x{n}{' split' if split else ''}: {res['seconds']:.2f} s, "
                  f"first claims {['-' if t is None else round(t, 2) for t in res['first_claim']]}, "
                  f"jobs {res['jobs']}, busy {res['busy']:.2f}", file=sys.stderr)
    one = statistics.median(x["seconds"] for x in runs[("postgresql", 1, False)])
    one_rate = total / one / 1e6
    sq = statistics.median(x["seconds"] for x in runs[("sqlite", 1, False)])
    size = len(Paced.bodies[names[0]])
    print(f"{PRODUCTS} products of {size / 2**20:.1f} MiB ({total / 1e6:.0f} MB), each response sent at "
          f"{RATE / 1e6:.1f} MB/s, {WORKERS} workers per member, PostgreSQL fsync={FSYNC}; timed from the "
          f"notice's rename into the inbox until every job is done; medians of {REPEAT}. The floor is the "
          f"stand-in's pace: {PRODUCTS} products / (4 x members) per worker x {size / RATE:.2f} s each.")
    print()
    print("| store | members | notice(s) | seconds | MB/s | x (N x one member) | x the floor | each member's "
          "first job, s after the drop | jobs per member | CPU s: members / PostgreSQL / stand-in + driver | "
          "the same, % of the cores | machine busy (all processes) |")
    print("|---|---:|---|---:|---:|---:|---:|---|---|---|---:|---:|")
    for (backend, n, split), rs in runs.items():
        t = statistics.median(x["seconds"] for x in rs)
        rate = total / t / 1e6
        floor = -(-PRODUCTS // (WORKERS * n)) * size / RATE
        vs = "-" if backend == "sqlite" else f"{rate / (n * one_rate):.2f}"
        firsts = []
        for i in range(n):
            seen = [x["first_claim"][i] for x in rs]
            firsts.append("/".join("never" if v is None else f"{v:.1f}" for v in seen))
        mid = sorted(rs, key=lambda x: x["seconds"])[len(rs) // 2]
        jobs = "/".join(str(v) for v in mid["jobs"].values())
        busy = statistics.median(x["busy"] for x in rs)
        share = statistics.median((x["member_cpu"] + x["pg_cpu"] + x["driver_cpu"]) / x["seconds"] / os.cpu_count()
                                  for x in rs)
        cpu = (f"{statistics.median(x['member_cpu'] for x in rs):.1f} / "
               f"{'-' if backend == 'sqlite' else format(statistics.median(x['pg_cpu'] for x in rs), '.1f')} / "
               f"{statistics.median(x['driver_cpu'] for x in rs):.1f}")
        how = "one per member" if split else "one, on node-1"
        print(f"| {'SQLite' if backend == 'sqlite' else 'PostgreSQL'} | {n} x {WORKERS} | {how} | {t:.2f} | "
              f"{rate:.1f} | {vs} | {t / floor:.2f} | {'; '.join(firsts)} | {jobs} | {cpu} | {share * 100:.0f}% | {busy * 100:.0f}% |")
    print()
    print(f"SQLite against PostgreSQL, one member each: {sq / one:.2f}x the time. \"each member's first job\": "
          f"every round's figure, members separated by `;` (node-1 first); \"jobs per member\": the median "
          f"run's, from the members' `done` log lines.")
    last = runs[("postgresql", 3, False)][-1]["status"]
    if last:
        ms = [{k: m.get(k) for k in ("node", "state", "running", "leads")} for m in last.get("members", [])]
        print()
        print(f"`status --json` members at the end of the last 3-member run: `{json.dumps(ms)}`")
    for n in names:
        del Paced.bodies[n]


# ---------------------------------------------------------------------------------------------------------
# 2. Claims


def claims(pgs):
    targets = [("SQLite", "one", None)]
    for fsync, pg in pgs:
        targets.append((f"PostgreSQL fsync={fsync}, one store (pool of 8)", "one", pg))
        if fsync == FSYNC:
            targets.append((f"PostgreSQL fsync={fsync}, one store per 4 tasks", "per4", pg))
    runs = {(label, k): [] for label, _, _ in targets for k in CLAIM_TASKS}
    d = os.path.join(ROOT, "claims")
    for r in range(REPEAT):
        for label, layout, pg in targets:
            for k in CLAIM_TASKS:
                if pg is None:
                    shutil.rmtree(d, ignore_errors=True)
                    os.makedirs(d)
                    target = os.path.join(d, "claims.db")
                else:
                    target = pg.database("claims")
                out = subprocess.run([CLAIMS, str(CLAIM_JOBS), str(k), layout, target], capture_output=True,
                                     text=True)
                if out.returncode != 0:
                    sys.exit(f"claims {label} {k}: {out.stderr[-3000:]}")
                runs[(label, k)].append(float(out.stdout.split()[4]))
                if pg is not None:
                    pg.psql("postgres", f"DROP DATABASE {target.rsplit('/', 1)[1]}")
    print(f"{CLAIM_JOBS} jobs ingested, then K worker tasks each ending its job done and claiming the next in "
          f"one `end_and_claim` until none is left; jobs per second, medians of {REPEAT}:")
    print()
    print("| store | " + " | ".join(f"K = {k}" for k in CLAIM_TASKS) + " |")
    print("|---|" + "---:|" * len(CLAIM_TASKS))
    med = {key: statistics.median(v) for key, v in runs.items()}
    for label, _, _ in targets:
        print(f"| {label} | " + " | ".join(f"{med[(label, k)]:,.0f}" for k in CLAIM_TASKS) + " |")
    for label, _, _ in targets[1:]:
        print(f"| ratio: {label} / SQLite | " +
              " | ".join(f"{med[(label, k)] / med[('SQLite', k)]:.2f}x" for k in CLAIM_TASKS) + " |")


# ---------------------------------------------------------------------------------------------------------
# 3. Fail-over


def failover_run(pg, base, names, lease, ns, round_no, phase):
    run_dir = os.path.join(ROOT, "runs", "failover")
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(run_dir)
    database = pg.database("fo")
    a = Member(run_dir, "node-a", database, base, lease=lease, ns=ns)
    b = Member(run_dir, "node-b", database, base, lease=lease, ns=ns)
    session = Session(database)
    try:
        a.wait_ready()
        b.wait_ready()
        # Where in node-b's 5 s sweep cycle the kill falls: spread over the cycle by the rounds, as on a
        # cluster running for hours (always the same point after a fresh start otherwise).
        time.sleep(phase)
        Paced.rate = RATE
        a.drop(notice(names, 0x100 + round_no), "notice.json")
        deadline = time.time() + 60
        while True:
            held = session.rows("SELECT id, lease_expires_at, (extract(epoch from now()) * 1000)::bigint "
                                "FROM downloads WHERE state = 'running' AND lease_owner LIKE 'node-a:%' "
                                "AND bytes_done > 0")
            if held:
                break
            if time.time() > deadline:
                sys.exit(f"node-a never held a download under way: {a.text()[-3000:]}")
            time.sleep(POLL)
        time.sleep(0.3)  # a little more on disk
        a.kill9()
        killed = time.perf_counter()
        killed_ms = int(time.time() * 1000)
        rows = session.rows("SELECT id, lease_expires_at FROM downloads "
                            "WHERE state = 'running' AND lease_owner LIKE 'node-a:%'")
        ids = [int(r[0]) for r in rows]
        expires = max(int(r[1]) for r in rows)
        taken = {}
        while len(taken) < len(ids):
            for r in session.rows(f"SELECT id, state, coalesce(lease_owner, '') FROM downloads "
                                  f"WHERE id IN ({','.join(map(str, ids))})"):
                i = int(r[0])
                if i not in taken and (r[1] == "done" or (r[2] and not r[2].startswith("node-a:"))):
                    taken[i] = time.perf_counter() - killed
            if time.perf_counter() - killed > 120:
                sys.exit(f"node-a's jobs {ids} not taken over in 120 s: {b.text()[-3000:]}")
            time.sleep(POLL)
        # Done with the measuring: the rest at full speed, and every product must be whole.
        Paced.rate = None
        while int(session.rows("SELECT count(*) FROM downloads WHERE state = 'done'")[0][0]) < len(names):
            if b.proc.poll() is not None:
                sys.exit(f"node-b exited: {b.text()[-3000:]}")
            time.sleep(POLL)
        check_same(run_dir, names)
        resumed = b.text().count("resumed at byte")
        for c in log_complaints([b]):
            COMPLAINTS.append(f"fail-over lease {lease}{'' if ns else ' (one machine)'}: {c}")
        return {"first": min(taken.values()), "all": max(taken.values()), "jobs": len(ids),
                "left": (expires - killed_ms) / 1000, "resumed": resumed}
    finally:
        session.close()
        a.stop()
        b.stop()
        Paced.rate = RATE


def failover(pg, base):
    names = [f"jw{n:05d}_fo_cal.fits" for n in range(4)]
    for i, n in enumerate(names):
        Paced.bodies[n] = fits_bytes(16 * 1024 * 1024, 1000 + i)
    ns_ok = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True).returncode == 0
    cases = [(lease, True) for lease in FAILOVER_LEASES] if ns_ok else []
    cases.append((FAILOVER_LEASES[-1], False))
    results = {}
    for lease, ns in cases:
        rounds = FAILOVER_ROUNDS if ns else max(1, FAILOVER_ROUNDS // 2)
        results[(lease, ns)] = []
        for r in range(rounds):
            res = failover_run(pg, base, names, lease, ns, len(results) * 100 + r, (r + 0.5) * SWEEP / rounds)
            results[(lease, ns)].append(res)
            print(f"  fail-over lease {lease} ns={ns} round {r + 1}: {res}", file=sys.stderr)
    print(f"Two members of {WORKERS} workers; 4 products of 16 MiB at {RATE / 1e6:.1f} MB/s dropped on node-a, "
          f"which is killed with -9 once it holds downloads with bytes on disk; seconds from the kill until "
          f"node-b has claimed every job node-a held:")
    print()
    print("| members | download.lease | rounds | jobs held by the killed member | its lease left at the kill, s "
          "(median) | kill -> all claimed elsewhere, median s | max s | every round, s | target (lease + 2 s) | "
          "resumed from the .part (log) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for (lease, ns), rs in results.items():
        secs = float(lease.rstrip("s"))
        med = statistics.median(x["all"] for x in rs)
        mx = max(x["all"] for x in rs)
        print(f"| {'each in a PID namespace of its own (as other hosts)' if ns else 'one PID namespace (one machine)'} "
              f"| {lease} | {len(rs)} | {statistics.median(x['jobs'] for x in rs):.0f} | "
              f"{statistics.median(x['left'] for x in rs):.2f} | {med:.2f} | {mx:.2f} | "
              f"{', '.join(format(x['all'], '.1f') for x in rs)} | "
              f"{'met' if mx <= secs + 2 else 'missed'} ({secs + 2:.0f} s) | "
              f"{sum(x['resumed'] for x in rs)} of {sum(x['jobs'] for x in rs)} |")
    if not ns_ok:
        print()
        print("`unshare --pid` is not allowed here: only the one-machine row was measured.")
    for n in names:
        del Paced.bodies[n]


def main():
    os.makedirs(ROOT, exist_ok=True)
    shutil.rmtree(os.path.join(ROOT, "runs"), ignore_errors=True)
    server, base = start_server()
    pg = Postgres(FSYNC)
    other = None
    try:
        print(f"- All on this machine: {os.cpu_count()} cores shared by PostgreSQL {pg_bin().split('/')[-2]} "
              f"(fsync={FSYNC}), the MAST stand-in (Python, in the driver) and every member.")
        if "throughput" in PARTS:
            print()
            print("### Throughput")
            print()
            throughput(pg, base)
        if "claims" in PARTS:
            print()
            print("### Claims")
            print()
            pgs = [(FSYNC, pg)]
            other_fsync = "off" if FSYNC == "on" else "on"
            other = Postgres(other_fsync)
            pgs.append((other_fsync, other))
            claims(pgs)
        if "failover" in PARTS:
            print()
            print("### Fail-over")
            print()
            failover(pg, base)
        if COMPLAINTS:
            print()
            print(f"Warnings and errors in the members' logs ({len(COMPLAINTS)}; the first 20):")
            print()
            for c in COMPLAINTS[:20]:
                print(f"- `{c[:300]}`")
    finally:
        pg.stop()
        if other:
            other.stop()
        server.shutdown()


main()
