#!/usr/bin/env python3
"""HTTP endpoint benchmark: how long `/`, `/metrics` and `/api/status` take to answer with 100,000 jobs in
the store, beside `mastsub status --json` (a process of its own, reading the same snapshot).

The store: one notice of 100,000 events (mastsub ingest), so 100,000 queued jobs. The daemon runs on it with
`[http]` enabled and MAST pointed at a closed port, so that its four workers keep claiming, failing to
connect and queueing jobs again while the endpoint is asked: the page is measured on a busy daemon, not an
idle one. Each endpoint is asked REQUEST times over one connection each, one request at a time; the table
gives the median, the 95th percentile and the largest, and the size of the answer.

Usage: bench/endpoint.py BINARY WORKDIR [REQUESTS]
"""
import http.client, json, os, shutil, socket, statistics, subprocess, sys, time, uuid

BIN, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
REQUESTS = int(sys.argv[3]) if len(sys.argv) > 3 else 200
JOBS = 100_000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    d = os.path.join(WORK, "run", "http")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    port, closed = free_port(), free_port()
    with open(os.path.join(d, "mastsub.toml"), "w") as f:
        f.write(f'[mast]\nbase_url = "http://127.0.0.1:{closed}"\n[log]\nlevel = "warn"\n'
                f'[http]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
    records = [{
        "event_id": str(uuid.UUID(int=n, version=4)), "mission": "JWST",
        "fileset": f"jw{n:08d}_02201_00001", "filename": f"jw{n:08d}_02201_00001_mirimage_o001_crf.fits",
        "program": 5105 + n % 50, "event_type": ["New", "Reprocessed", "Public"][n % 3],
        "archived_date": "2026-03-30T17:53:19.695", "public_release_date": "2026-03-30T17:52:27.000",
    } for n in range(JOBS)]
    with open(os.path.join(d, "big.json"), "w") as f:
        json.dump(records, f)
    subprocess.run([BIN, "--config", "mastsub.toml", "ingest", "big.json"], cwd=d, check=True,
                   stdout=subprocess.DEVNULL)
    proc = subprocess.Popen([BIN, "--config", "mastsub.toml", "run"], cwd=d, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        time.sleep(2)  # the workers at their churn
        print(f"| what ({JOBS:,} jobs in the store, daemon busy) | median ms | p95 ms | max ms | bytes |")
        print("|---|---:|---:|---:|---:|")
        for path in ["/", "/metrics", "/api/status"]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            times, size = [], 0
            for _ in range(REQUESTS):
                start = time.perf_counter()
                conn.request("GET", path)
                r = conn.getresponse()
                body = r.read()
                times.append((time.perf_counter() - start) * 1e3)
                if r.status != 200:
                    sys.exit(f"{path}: HTTP {r.status}")
                size = len(body)
            conn.close()
            times.sort()
            p95 = times[int(len(times) * 0.95) - 1]
            print(f"| GET {path} | {statistics.median(times):.1f} | {p95:.1f} | {times[-1]:.1f} | {size:,} |")
        times = []
        for _ in range(max(5, REQUESTS // 20)):
            start = time.perf_counter()
            subprocess.run([BIN, "--config", "mastsub.toml", "status", "--json"], cwd=d, check=True,
                           stdout=subprocess.DEVNULL)
            times.append((time.perf_counter() - start) * 1e3)
        times.sort()
        print(f"| `mastsub status --json` (a process each) | {statistics.median(times):.1f} | - | "
              f"{times[-1]:.1f} | - |")
    finally:
        proc.terminate()
        proc.wait()


main()
