"""What the lake and the shared state cost one node: the DuckDB file vs a DuckLake vs a
DuckLake with sessions and dedup shared in PostgreSQL, in one run on one machine.

Arms, run in interleaved rounds (each round runs every arm once per load, in an order
rotated each round, so drift in the machine's speed falls on all arms alike):
  file    the default: one DuckDB file
  lake    store = "ducklake", its catalog in PostgreSQL, shared_state = "off"
  shared  store = "ducklake", its catalog in PostgreSQL, the shared state on: each group
          decided in a PostgreSQL transaction held open across the journal sync (advisory
          locks on its session keys, its messageIds claimed, its sessions upserted) and
          committed before the ack
Loads (each request its own messageIds, so dedup does real work; `--anonymous-ids`
anonymousIds, 300 by default, so sessions do too):
  single  one event per POST /v1/capture, `--connections` (64) keep-alive connections;
          request n names anonymousId n mod 300
  batch   100 events per POST /v1/batch, `--batch-connections` (16); a request's events
          name 10 anonymousIds, 10 events each, the next 10 in turn for the next request

One PostgreSQL (bench/pgserver.py, fsync on) serves the whole run; each lake run gets a
database of its own (created before, dropped after) and a fresh data directory. Each
triolytics run is as in bench/http_capture.py: a fresh server pinned to CPU 0
(`fsync = always`), a built-in keep-alive generator (one request in flight per
connection; each request's body made from a template with a counter) on CPU 1, then a
SIGINT stop and a count of what is stored (the lake's through a DuckDB connection that
loads the extensions as the server does): every acknowledged event must be there, once.
PostgreSQL is started from this script, which is pinned to CPU 1, so it runs on CPU 1
with the generator: on 2 cores it competes with one or the other either way. Its CPU is
the postmaster's and its children's (/proc/PID/stat, exited children included through
the postmaster's cutime/cstime) over the load.

The servers run a copy of src/ taken at the start: `git archive HEAD` by default (the
report names the commit), the working tree with `--worktree`, so that edits made to the
checkout during a run do not reach them.

Prints one JSON document (progress goes to stderr): per arm and load every run's events/s,
server CPU µs per event, PostgreSQL CPU µs per event, both together, ack latency p50/p99,
the server's group commits and loads (from one GET /metrics right after the load), its
WARNING/ERROR lines, and the stored-vs-acked check; medians and spread; and the ratios
lake/file, shared/file and shared/lake as the median of the per-round ratios (and the
ratio of the medians). About 4-5 minutes as below; `--quick`: one round of 3 s runs.

    .venv/bin/python bench/shared_state.py [--rounds 3] [--duration 8] \\
        [--loads single,batch] [--arms file,lake,shared] [--quick] [--out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing
import os
import secrets
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import harness
import pgserver
from harness import HOST, CpuMeter, Server, StartupError, free_port, log
from http_capture import parse_response

ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "wk_shared_bench"
EVENT_NAME = "Button Clicked"
ARMS = ("file", "lake", "shared")
LOADS = {"single": ("/v1/capture", 1), "batch": ("/v1/batch", 100)}  # path, events/request
IDS_PER_BATCH = 10  # anonymousIds named in one batch request, 10 events each
COUNTER = b"##########"  # in each template: the request's number, 10 digits


# --- bodies ------------------------------------------------------------------------------


def event(anon: int, message_id: str) -> dict:
    return {"type": "track", "event": EVENT_NAME, "anonymousId": f"anon-{anon:05d}",
            "messageId": message_id,
            "properties": {"button_id": "signup_hero", "color": "blue"}}


def templates(load: str, token: str, anonymous_ids: int) -> list[bytes]:
    """Request bodies, one per step of the anonymousId rotation, with COUNTER where each
    request's number goes: messageIds `<token>-<COUNTER>[-<i>]` are unique in a run."""
    if load == "single":
        return [json.dumps(event(a, f"{token}-{COUNTER.decode()}")).encode()
                for a in range(anonymous_ids)]
    steps = max(1, anonymous_ids // IDS_PER_BATCH)
    per_id = LOADS["batch"][1] // IDS_PER_BATCH
    return [json.dumps({"batch": [
        event((s * IDS_PER_BATCH + i // per_id) % anonymous_ids,
              f"{token}-{COUNTER.decode()}-{i:02d}")
        for i in range(LOADS["batch"][1])]}).encode() for s in range(steps)]


# --- the load ----------------------------------------------------------------------------


def drive(port: int, path: str, bodies: list[bytes], first: int, conns: int,
          duration: float, start_at: float) -> dict:
    """Worker process: `conns` keep-alive connections, one request in flight on each;
    request n (from `first`) is bodies[n % len] with n in place of COUNTER."""
    harness.pin_to_load_cpu()
    head = (f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json"
            f"\r\nx-write-key: {WRITE_KEY}\r\nContent-Length: %d\r\n\r\n").encode()
    heads = [head % len(b) for b in bodies]
    sel = selectors.DefaultSelector()
    stats = {"ok": 0, "non_2xx": 0, "socket_errors": 0, "unanswered": 0}
    latencies = array("d")
    sent_at: dict[socket.socket, float] = {}
    buffers: dict[socket.socket, bytearray] = {}
    n = first

    def send(sock: socket.socket) -> None:
        nonlocal n
        k = n % len(bodies)
        request = heads[k] + bodies[k].replace(COUNTER, b"%010d" % n)
        n += 1
        sent_at[sock] = time.perf_counter()
        sock.sendall(request)

    def open_and_send() -> None:
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(sock, selectors.EVENT_READ)
        buffers[sock] = bytearray()
        send(sock)

    def drop(sock: socket.socket) -> None:
        sel.unregister(sock)
        sock.close()
        sent_at.pop(sock, None)
        buffers.pop(sock)

    time.sleep(max(0.0, start_at - time.time()))
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline, last = t0 + duration, t0
    for _ in range(conns):
        open_and_send()
    while buffers and time.perf_counter() < deadline + 10:  # 10 s to drain what is in flight
        for key, _ in sel.select(0.5):
            sock, buf = key.fileobj, buffers[key.fileobj]
            data, _ = harness.recv_or_why(sock, 262144, "", "")
            if not data:  # the server closed with our request unanswered
                stats["socket_errors"] += 1
                stats["unanswered"] += 1
                drop(sock)
                if time.perf_counter() < deadline:
                    open_and_send()
                continue
            buf += data
            while (parsed := parse_response(buf)) is not None:
                status, used, close = parsed
                del buf[:used]
                last = time.perf_counter()
                latencies.append(last - sent_at.pop(sock))
                stats["ok" if 200 <= status < 300 else "non_2xx"] += 1
                if close or last >= deadline:
                    drop(sock)
                    if close and last < deadline:
                        open_and_send()
                    break
                send(sock)
    stats["unanswered"] += len(sent_at)
    for sock in list(buffers):
        drop(sock)
    return {**stats, "elapsed_s": last - t0, "latencies": latencies,
            "load_cpu_s": time.process_time() - cpu0}


class Meters:
    """CPU seconds of the server, of PostgreSQL and of the whole machine, and wall time,
    from `start()` to `stop()`."""

    def __init__(self, server: Server, postmaster: int) -> None:
        self.server, self.postmaster = server, postmaster

    def start(self) -> None:
        self.cpu = CpuMeter(self.server)
        self.pg0, self.t0 = postgres_cpu_seconds(self.postmaster), time.monotonic()

    def stop(self) -> dict:
        server, busy = self.cpu.stop()
        pg = postgres_cpu_seconds(self.postmaster) - self.pg0
        return {"server": server, "busy": busy, "pg": pg, "wall": time.monotonic() - self.t0}


def run_load(port: int, load: str, args: argparse.Namespace, meters: Meters) -> dict:
    """The load from `--gen-procs` processes; the meters run from the moment they all
    start sending until the last has its answers."""
    path, _ = LOADS[load]
    conns = args.connections if load == "single" else args.batch_connections
    bodies = templates(load, secrets.token_hex(4), args.anonymous_ids)
    procs = max(1, min(args.gen_procs, conns))
    shares = [conns // procs + (i < conns % procs) for i in range(procs)]
    start_at = time.time() + 1.5  # (the processes spawned and ready by then)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(procs, mp_context=ctx) as pool:
        futures = [pool.submit(drive, port, path, bodies, i * 10**9, share, args.duration,
                               start_at)  # (request numbers apart per process)
                   for i, share in enumerate(shares)]
        time.sleep(max(0.0, start_at - time.time()))
        meters.start()
        parts = [f.result(timeout=args.duration + 60) for f in futures]
        used = meters.stop()
    total = {k: sum(p[k] for p in parts) for k in ("ok", "non_2xx", "socket_errors",
                                                    "unanswered")}
    return {**total, "elapsed_s": max(p["elapsed_s"] for p in parts),
            **harness.latency_ms(parts), "connections": conns,
            "load_cpu_s": sum(p["load_cpu_s"] for p in parts), "used": used}


# --- PostgreSQL's CPU --------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def postgres_cpu_seconds(postmaster: int) -> float:
    """CPU of the postmaster and its children: its own, that of the children it has
    reaped (cutime, cstime) and that of those alive (their utime, stime)."""
    own = _stat(postmaster)
    if own is None:
        return float("nan")
    ticks = sum(int(x) for x in own[11:15])
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and int(fields[1]) == postmaster:
                ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpus_allowed(pid: int) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


# --- the server's own counters ------------------------------------------------------------

SCRAPED = ("triolytics_journal_groups_total", "triolytics_journal_ack_duration_seconds_sum",
           "triolytics_journal_ack_duration_seconds_count", "triolytics_duckdb_loads_total",
           "triolytics_duckdb_load_duration_seconds_sum",
           "triolytics_duckdb_load_duration_seconds_count")


def scrape(metrics_port: int) -> dict[str, float]:
    """The unlabelled SCRAPED series of one GET /metrics."""
    conn = http.client.HTTPConnection(HOST, metrics_port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in SCRAPED:
            out[name] = float(value)
    return out


def groups_and_loads(m: dict[str, float], wall: float, acked: int) -> dict:
    """Group commits and loads over the run, from the server's counters (read once,
    right after the load: the server started with none)."""
    groups = m.get("triolytics_journal_groups_total", 0)
    acks = m.get("triolytics_journal_ack_duration_seconds_count", 0)
    loads = m.get("triolytics_duckdb_load_duration_seconds_count", 0)
    return {
        "groups_per_s": round(groups / wall, 1),
        "events_per_group": round(acked / groups, 1) if groups else None,
        # a group's journal write to its ack (shared: the sync and the commit)
        "group_ack_ms_mean": round(m["triolytics_journal_ack_duration_seconds_sum"] * 1e3
                                   / acks, 3) if acks else None,
        "loads": int(m.get("triolytics_duckdb_loads_total", 0)),
        "load_ms_mean": round(m["triolytics_duckdb_load_duration_seconds_sum"] * 1e3
                              / loads, 1) if loads else None,
    }


# --- what is stored ----------------------------------------------------------------------

COUNT_SQL = ("SELECT count(*), count(DISTINCT message_id) FROM events WHERE event = ?",
             "SELECT type, count(*) FROM events GROUP BY 1 ORDER BY 1")


def count_stored(arm: str, data: Path, dsn: str | None, lake_data: Path) -> dict:
    """Our events (and how many distinct messageIds), and rows by type."""
    import duckdb

    if arm == "file":
        con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    else:
        from triolytics.storage.lake import connect
        con = connect(dsn, str(lake_data), read_only=True)
    try:
        ours, distinct = con.execute(COUNT_SQL[0], [EVENT_NAME]).fetchone()
        by_type = dict(con.execute(COUNT_SQL[1]).fetchall())
    finally:
        con.close()
    return {"stored_events": ours, "stored_distinct_message_ids": distinct,
            "stored_by_type": by_type}


def shared_tables(pg: pgserver.PostgresServer, db: str) -> dict:
    """Rows of the shared state's tables after the run."""
    out = pg.psql("SELECT (SELECT count(*) FROM triolytics.dedup), "
                  "(SELECT count(*) FROM triolytics.sessions), "
                  "(SELECT count(*) FROM triolytics.current)", dbname=db).strip()
    dedup, sessions, current = (int(x) for x in out.split("|"))
    return {"pg_dedup_ids": dedup, "pg_sessions": sessions, "pg_current_keys": current}


# --- one run -----------------------------------------------------------------------------


def server_env(arm: str, dsn: str | None, lake_data: Path) -> dict[str, str]:
    if arm == "file":
        return {}
    env = {"TRIOLYTICS_STORE": "ducklake", "TRIOLYTICS_DUCKLAKE_CATALOG": dsn,
           "TRIOLYTICS_DUCKLAKE_DATA_PATH": str(lake_data), "TRIOLYTICS_NODE_ID": "n1"}
    if arm == "lake":
        env["TRIOLYTICS_SHARED_STATE"] = "off"
    return env


def log_lines(text: str, limit: int = 5) -> dict:
    """WARNING and ERROR lines of a server's stderr: how many, and the first few."""
    lines = [x for x in text.splitlines() if "WARNING" in x or "ERROR" in x
             or "Traceback" in x]
    return {"server_log_warnings": len(lines), "server_log_first": lines[:limit]}


def drop_run(pg: pgserver.PostgresServer, db: str | None, run_dir: Path) -> None:
    """A run's database and directory, removed (a batch run journals gigabytes)."""
    if db is not None:
        pg.psql(f"DROP DATABASE IF EXISTS {pgserver.quote_ident(db)} WITH (FORCE)")
    shutil.rmtree(run_dir, ignore_errors=True)


def measure(arm: str, load: str, n: int, args: argparse.Namespace, tmp: Path,
            pg: pgserver.PostgresServer) -> dict:
    run_dir = tmp / f"{arm}-{load}-{n}"
    data, lake_data = run_dir / "data", run_dir / "lake"
    db = f"bench_{arm}_{load}_{n}"
    dsn = pg.create_database(db) if arm != "file" else None
    port, metrics_port = free_port(), free_port()
    argv = harness.pinned(harness.SERVER_CPU) + [
        sys.executable, "-m", "triolytics", "serve", "--host", HOST, "--port", str(port),
        "--data", str(data), "--write-key", WRITE_KEY, "--fsync", "always",
        "--metrics-listen", f"{HOST}:{metrics_port}"]
    env = {"PYTHONPATH": args.src, **server_env(arm, dsn, lake_data)}
    server = Server(arm, argv, port, run_dir, env=env)
    result: dict = {"round": n}
    try:
        began = time.monotonic()
        server.start(args.startup_timeout)
        result["server_start_s"] = round(time.monotonic() - began, 2)
        r = run_load(port, load, args, Meters(server, pg.pid))
        counters = scrape(metrics_port)
        stopped = server.shut_down(args.stop_timeout)
        stderr = (run_dir / "stderr").read_text(errors="replace")
    except StartupError as exc:
        harness.record_failure(result, f"{arm}/{load} round {n}", exc, server)
        drop_run(pg, db if dsn else None, run_dir)
        return result
    finally:
        server.kill()
    per_req = LOADS[load][1]
    acked = r["ok"] * per_req
    elapsed = r["elapsed_s"] or float("nan")
    used = r["used"]
    server_cpu, pg_cpu, wall = used["server"], used["pg"], used["wall"]
    result.update({
        "connections": r["connections"],
        "events_per_s": round(acked / elapsed, 1),
        "server_cpu_us_per_event": round(server_cpu * 1e6 / (acked or 1), 3),
        "pg_cpu_us_per_event": round(pg_cpu * 1e6 / (acked or 1), 3),
        "server_and_pg_cpu_us_per_event": round((server_cpu + pg_cpu) * 1e6 / (acked or 1), 3),
        "p50_ms": round(r["p50_ms"], 3), "p99_ms": round(r["p99_ms"], 3),
        "non_2xx": r["non_2xx"], "socket_errors": r["socket_errors"],
        # in cores over the load (wall time from its first request to its last answer)
        "server_cpu_util": round(server_cpu / wall, 3),
        "pg_cpu_util": round(pg_cpu / wall, 3),
        "load_cpu_util": round(r["load_cpu_s"] / wall, 3),
        # anything else on the machine meanwhile: near 0 for a clean run
        "other_cpu_util": round((used["busy"] - server_cpu - pg_cpu - r["load_cpu_s"])
                                / wall, 3),
        **groups_and_loads(counters, wall, acked),
        **stopped,
    })
    try:
        counts = count_stored(arm, data, dsn, lake_data)
        result.update(harness.durability(counts, acked, r["unanswered"] * per_req))
        result["stored_once"] = counts["stored_distinct_message_ids"] == counts["stored_events"]
        if arm == "shared":
            result.update(shared_tables(pg, db))
    except Exception as exc:  # noqa: BLE001 - reported, not fatal to the run
        result["count_error"] = f"{type(exc).__name__}: {exc}"
    result.update(log_lines(stderr))
    drop_run(pg, db if dsn else None, run_dir)
    log(f"{arm}/{load} round {n}: {result['events_per_s']:.0f} events/s, server "
        f"{result['server_cpu_us_per_event']} + pg {result['pg_cpu_us_per_event']} µs/event, "
        f"p99 {result['p99_ms']} ms, durable {result.get('durability_ok')}, "
        f"other CPU {result['other_cpu_util']}")
    return result


# --- summary -----------------------------------------------------------------------------

FIGURES = ("events_per_s", "server_cpu_us_per_event", "pg_cpu_us_per_event",
           "server_and_pg_cpu_us_per_event", "p50_ms", "p99_ms")
RATIO_FIGURES = ("events_per_s", "server_cpu_us_per_event", "server_and_pg_cpu_us_per_event",
                 "p99_ms")
PAIRS = (("lake", "file"), ("shared", "file"), ("shared", "lake"))


def spread(xs: list[float]) -> dict:
    med = statistics.median(xs)
    mad = statistics.median(abs(x - med) for x in xs)
    return {"median": round(med, 3), "min": min(xs), "max": max(xs),
            "mad_frac": round(mad / med, 4) if med else None}


def compare(a: list[float], b: list[float]) -> dict:
    """a vs b: the median of the per-round ratios, each ratio, and the ratio of the
    medians."""
    per_round = [x / y for x, y in zip(a, b, strict=True) if y]
    if not per_round:
        return {"median_of_round_ratios": None}
    return {"median_of_round_ratios": round(statistics.median(per_round), 4),
            "round_ratios": [round(x, 4) for x in per_round],
            "ratio_of_medians": round(statistics.median(a) / statistics.median(b), 4)}


def summarize(runs: dict, arms: list[str], loads: list[str]) -> tuple[dict, dict]:
    def series(arm: str, load: str, key: str) -> list[float] | None:
        rs = runs[arm][load]
        if not rs or any(key not in r for r in rs):
            return None  # (a failed run: no figure, no ratio)
        return [r[key] for r in rs]

    summary = {load: {arm: {key: spread(xs) for key in FIGURES
                            if (xs := series(arm, load, key))}
                      for arm in arms} for load in loads}
    ratios = {load: {f"{a}/{b}": {key: compare(xa, xb) for key in RATIO_FIGURES
                                  if (xa := series(a, load, key))
                                  and (xb := series(b, load, key))}
                     for a, b in PAIRS if a in arms and b in arms}
              for load in loads}
    return summary, ratios


# --- main --------------------------------------------------------------------------------


def src_copy(into: Path, worktree: bool) -> dict:
    """src/ at HEAD (or the working tree) copied to `into`; the commit and whether the
    working tree's src/ differed from it."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    changed = git("status", "--porcelain", "--", "src") != ""
    if worktree:
        shutil.copytree(ROOT / "src", into, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        blob = subprocess.run(["git", "archive", "HEAD", "src"], cwd=ROOT,
                              capture_output=True, check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
            tar.extractall(into.parent, filter="data")
        if into != into.parent / "src":
            (into.parent / "src").rename(into)
    return {"head": head, "ran": "working tree" if worktree else "HEAD",
            "worktree_src_changed": changed}


def parse_args() -> argparse.Namespace:
    p = harness.load_parser(__doc__)
    p.set_defaults(duration=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loads", default=",".join(LOADS), help="comma-separated subset")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset")
    p.add_argument("--connections", type=int, default=64, help="connections, single load")
    p.add_argument("--batch-connections", type=int, default=16)
    p.add_argument("--anonymous-ids", type=int, default=300, help="distinct per run")
    p.add_argument("--gen-procs", type=int, default=1, help="generator processes")
    p.add_argument("--worktree", action="store_true",
                   help="run the working tree's src/ (default: HEAD's)")
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--stop-timeout", type=float, default=60.0)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = harness.parse_load_args(p)
    if args.quick:
        args.rounds = 1
    for name, chosen, known in (("--loads", args.loads, LOADS), ("--arms", args.arms, ARMS)):
        bad = [x for x in chosen.split(",") if x not in known]
        if bad:
            p.error(f"{name}: unknown {', '.join(bad)} (known: {', '.join(known)})")
    return args


def main() -> int:
    args = parse_args()
    harness.prepare_main()  # this process, PostgreSQL and the generator: on CPU 1
    arms = [a for a in ARMS if a in args.arms.split(",")]
    loads = [x for x in LOADS if x in args.loads.split(",")]
    runs: dict = {arm: {load: [] for load in loads} for arm in arms}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="triolytics-shared-") as tmp:
        args.src = str(Path(tmp) / "src")
        git = src_copy(Path(args.src), args.worktree)
        sys.path.insert(0, args.src)  # (the lake's count: the servers' lake.connect)
        with pgserver.PostgresServer(Path(tmp) / "pg") as pg:
            pg_info = {"version": pg.psql("SHOW server_version").strip(),
                       "fsync": pg.psql("SHOW fsync").strip(),
                       "synchronous_commit": pg.psql("SHOW synchronous_commit").strip(),
                       "cpus_allowed": cpus_allowed(pg.pid)}
            log(f"PostgreSQL {pg_info['version']} on CPUs {pg_info['cpus_allowed']}, "
                f"fsync {pg_info['fsync']}; code {git['ran']} at {git['head']}")
            for n in range(args.rounds):
                for load in loads:
                    k = n % len(arms)
                    for arm in arms[k:] + arms[:k]:
                        runs[arm][load].append(measure(arm, load, n, args, Path(tmp), pg))
    summary, ratios = summarize(runs, arms, loads)
    failed = [f"{arm}/{load}/{r['round']}" for arm in arms for load in loads
              for r in runs[arm][load] if "error" in r or "count_error" in r
              or r.get("durability_ok") is False]
    report = {
        **harness.report_head("shared_state", "triolytics", "trio", "duckdb", "psycopg",
                              "duckdb-extension-ducklake",
                              "duckdb-extension-postgres-scanner"),
        "config": {"rounds": args.rounds, "duration_s": args.duration, "fsync": "always",
                   "arms": arms, "loads": loads, "connections": {
                       "single": args.connections, "batch": args.batch_connections},
                   "anonymous_ids_per_run": args.anonymous_ids,
                   "anonymous_ids_per_batch_request": IDS_PER_BATCH,
                   "load_tool": "builtin", "gen_procs": args.gen_procs,
                   "pinning": {**(harness.pinning() or {}),
                               "postgres_cpu": harness.LOAD_CPU if harness.pinning() else None,
                               "note": "PostgreSQL runs on the load CPU with the generator"},
                   "postgres": pg_info, "git": git,
                   "elapsed_s": round(time.monotonic() - began, 1)},
        "summary": summary,
        "ratios": ratios,
        "failed": failed,
        "runs": runs,
    }
    harness.emit(report, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
