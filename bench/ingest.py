#!/usr/bin/env python3
"""Ingest benchmark: events/s and peak RSS for mastsub, side by side with a hand-written baseline.

Cases (each on a fresh database):
  large   one notice of 100,000 events               `mastsub ingest big.json`
  many    1,000 notices of 100 events, one process    `mastsub ingest n0000.json ... n0999.json`
  inbox   the same 1,000 notices dropped into the inbox of a running daemon, until all are in processed/
Two references, run in the same session:
  baseline  what a person would otherwise write: Python's json.load plus sqlite3 executemany into one events
            table with a unique event_id (no validation, no jobs, no categorization);
  floor     the same Python, but filling mastsub's own schema (migrations/, both tables, every index) with
            the rows mastsub would write: what SQLite alone costs for this data, with nothing checked.
Runs each case REPEAT times and reports the median. Usage: bench/ingest.py BINARY WORKDIR [REPEAT]
"""
import json, os, shutil, statistics, subprocess, sys, time, uuid

from measure import measured, peak_rss_mib, read_rss


BIN, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
REPEAT = int(sys.argv[3]) if len(sys.argv) > 3 else 3


def record(n, kind):
    return {
        "event_id": str(uuid.UUID(int=n, version=4)),
        "mission": "JWST",
        "fileset": f"jw{n:08d}_02201_00001",
        "filename": f"jw{n:08d}_02201_00001_mirimage_o001_crf.fits",
        "program": 5105 + n % 50,
        "event_type": kind,
        "archived_date": "2026-03-30T17:53:19.695",
        "public_release_date": "2026-03-30T17:52:27.000",
    }


def write_notice(path, first, count):
    kinds = ["New", "Reprocessed", "Public"]
    with open(path, "w") as f:
        json.dump([record(n, kinds[n % 3]) for n in range(first, first + count)], f, indent=1)


def run_measured(argv, cwd):
    """Runs argv, returns (seconds, peak RSS in MiB) of the child."""
    wrapped, rss = measured(argv)
    start = time.perf_counter()
    p = subprocess.Popen(wrapped, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, _ = os.wait4(p.pid, 0)
    elapsed = time.perf_counter() - start
    err = p.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{argv[0]} failed: {err}")
    return elapsed, read_rss(rss)


def fresh(case):
    d = os.path.join(WORK, "run", case)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    with open(os.path.join(d, "mastsub.toml"), "w") as f:
        f.write('[inbox]\nsettle = "50ms"\n[log]\nlevel = "warn"\n')
    return d


def mastsub_ingest(files):
    d = fresh("ingest")
    return run_measured([BIN, "--config", "mastsub.toml", "ingest", *files], d)


def mastsub_inbox(files):
    d = fresh("inbox")
    proc = subprocess.Popen([BIN, "--config", "mastsub.toml", "run"], cwd=d, stderr=subprocess.DEVNULL)
    inbox = os.path.join(d, "inbox")
    while not os.path.isdir(os.path.join(inbox, "processed")):
        time.sleep(0.01)
    time.sleep(0.2)
    staging = os.path.join(d, "staging")
    os.makedirs(staging)
    for f in files:
        shutil.copy(f, staging)
    start = time.perf_counter()
    for name in os.listdir(staging):
        os.rename(os.path.join(staging, name), os.path.join(inbox, name))
    processed = os.path.join(inbox, "processed")
    while len(os.listdir(processed)) < len(files):
        time.sleep(0.005)
    elapsed = time.perf_counter() - start
    rss = peak_rss_mib(proc.pid)
    proc.terminate()
    os.wait4(proc.pid, 0)
    return elapsed, rss


BASELINE = r'''
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE IF NOT EXISTS events (event_id TEXT UNIQUE, mission, fileset, filename, program, event_type, archived_date, public_release_date, raw)")
for path in sys.argv[2:]:
    with open(path) as f:
        records = json.load(f)
    with db:
        db.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?,?)",
            [(r["event_id"], r["mission"], r["fileset"], r["filename"], r["program"], r["event_type"],
              r["archived_date"], r["public_release_date"], json.dumps(r)) for r in records])
'''


FLOOR = r'''
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.executescript(open(sys.argv[2]).read())
job = 0
for n, path in enumerate(sys.argv[3:]):
    with open(path) as f:
        records = json.load(f)
    db.execute("BEGIN IMMEDIATE")
    notice = db.execute("INSERT INTO notices (sha256, source_kind, source_ref, name, size, received_at, last_seen_at, status, records) VALUES (?, 'cli', ?, ?, 0, 0, 0, 'accepted', ?) RETURNING id", (str(n), path, path, len(records))).fetchone()[0]
    jobs, events = [], []
    for i, r in enumerate(records):
        job += 1
        key = "%s/%s/%s" % (r["mission"].lower(), r["fileset"], r["filename"])
        url = "https://mast.stsci.edu/search/jwst/api/v0.1/retrieve_product?product_name=" + r["filename"]
        jobs.append((job, key, r["mission"], r["fileset"], r["filename"], r["program"], r["event_type"], r["archived_date"], url, key, "queued", 0, 0, 0))
        events.append((r["event_id"], notice, i, r["mission"], r["fileset"], r["filename"], r["program"], r["event_type"], r["archived_date"], r["public_release_date"], None, json.dumps(r), "queued", job, 0))
    db.executemany("INSERT INTO downloads (id, product, mission, fileset, filename, program, event_type, version, url, local_path, state, next_attempt_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", jobs)
    db.executemany("INSERT INTO events (event_id, notice_id, record_index, mission, fileset, filename, program, event_type, archived_date, public_release_date, uri, raw, disposition, download_id, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", events)
    db.execute("COMMIT")
'''

SCHEMA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "migrations", "0001_initial.sql")


def floor(files):
    d = fresh("floor")
    script = os.path.join(d, "floor.py")
    with open(script, "w") as f:
        f.write(FLOOR)
    return run_measured([sys.executable, script, "floor.db", SCHEMA, *files], d)


def baseline(files):
    d = fresh("baseline")
    script = os.path.join(d, "baseline.py")
    with open(script, "w") as f:
        f.write(BASELINE)
    return run_measured([sys.executable, script, "base.db", *files], d)


def median_of(fn, files):
    runs = [fn(files) for _ in range(REPEAT)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


def main():
    data = os.path.join(WORK, "data")
    os.makedirs(os.path.join(data, "many"), exist_ok=True)
    big = os.path.join(data, "big.json")
    if not os.path.exists(big):
        write_notice(big, 0, 100_000)
    many = [os.path.join(data, "many", f"n{i:04d}.json") for i in range(1000)]
    if not all(os.path.exists(p) for p in many):
        for i, p in enumerate(many):
            write_notice(p, 1_000_000 + i * 100, 100)
    rows = []
    for case, files in [("1 notice x 100,000 events", [big]), ("1,000 notices x 100 events", many)]:
        m_t, m_rss = median_of(mastsub_ingest, files)
        b_t, b_rss = median_of(baseline, files)
        f_t, f_rss = median_of(floor, files)
        rows.append((case, "mastsub ingest", m_t, m_rss, 100_000 / m_t, b_t / m_t, f_t / m_t))
        rows.append((case, "baseline: python json + sqlite3, one table", b_t, b_rss, 100_000 / b_t, 1.0, None))
        rows.append((case, "floor: python filling mastsub's schema, unchecked", f_t, f_rss, 100_000 / f_t, None, 1.0))
    i_t, i_rss = median_of(mastsub_inbox, many)
    rows.append(("1,000 notices x 100 events", "mastsub run (inbox, until all processed)", i_t, i_rss, 100_000 / i_t, None, None))
    print(f"| case | tool | seconds (median of {REPEAT}) | peak RSS MiB | events/s | mastsub speed vs it | mastsub speed vs floor |")
    print("|---|---|---:|---:|---:|---:|---:|")
    ratio = lambda x: f"{x:.2f}x" if x is not None else "-"
    for case, tool, t, rss, rate, vs_base, vs_floor in rows:
        print(f"| {case} | {tool} | {t:.3f} | {rss:.1f} | {rate:,.0f} | {ratio(vs_base)} | {ratio(vs_floor)} |")


main()
