"""Ingest and an open dashboard at once, at ten million events (issue 12).

How fast the figures come while ingest runs, and what an open dashboard costs ingest.

The data: a DuckDB file of `--rows` events over the 30 days before today's UTC midnight,
made by bench/dashboard_queries.py's generator (the project's schema), its rollups then
built by `stats.refresh_rollups` on one DuckDB thread, the server's setting. `--file
PATH` keeps it (made if missing, reused if present; the report says how many of its rows
the 30-day view covers). Each run copies it into a fresh data directory and starts
`triolytics serve` there: port 0 (read from `server.json`), fsync always, pinned to
CPU 0 (this script and the load generator on CPU 1), run from a copy of src/ taken at
the start, so that edits to the working tree during a run do not reach its servers.
`rollups_rebuilt` says whether a server built the rollups again (their layout changed).

The dashboard client logs in with `<data>/admin.token` and loads the page (GET /, as a
browser follows the login's redirect: the server then computes the page's ranges in the
background), keeps GET /dashboard/live open, and every `--every` s asks for
/dashboard/figures of each of its ranges, one after another: one open page asks for its
one range every 10 s, so three ranges are three pages. A tick that passes while an
answer is awaited is skipped (`skipped_ticks`): the client has one request out at a
time, where a page's timer would send another.

Phase `throughput`, `--rounds` interleaved rounds (the order rotated each round) of two
arms, `--duration` s each of saturating /v1/batch ingest (100 events a request,
bench/http_capture.py's built-in generator, `--connections`):
  alone      ingest only
  dashboard  the same, the client asking for 30d, 7d and 24h every `--every` s
It reports events/s and server CPU per event of every round, medians, dashboard/alone
(target >= 0.90), the client's request latencies (those unanswered at the end of a load
count as `unfinished`, with how long they had waited) and the rows the rollups had not
folded in when the server stopped.

Phase `latency`, `--latency-rounds` interleaved rounds of the `--latency-arms`, /v1/batch
ingest paced at `--rate` events/s while the client asks for its ranges `--views` times
per arm (split over the rounds), every `--every` s:
  warm        default settings (the figures kept warm: answered from memory): 30d, 7d, 24h
  cold        TRIOLYTICS_DASHBOARD_CACHE_S=0 (every request computes its view): 30d
  cold_nice0  (not by default) cold, with the reads at nice 0 instead of 19
It reports p50/p95/max per range as the client sees it (target: 30d p95 < 1 s), how old
the answered figures were, and apart from these each run's first request: the page
opening on a server just started, right after GET /.

Prints one JSON document; progress goes to stderr. About 10 minutes as below, plus 2
to make the file when it is missing:

    .venv/bin/python bench/dashboard_ingest.py --file /tmp/dash10m-today.duckdb \\
        [--rows 10000000] [--rounds 3] [--duration 15] [--views 20] [--every 10]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from datetime import UTC, datetime, timedelta
from pathlib import Path

import crash_loop
import dashboard_queries
import duckdb
import harness
import http_capture
from harness import HOST, CpuMeter, Server, log, percentile
from metrics_overhead import compare, spread

from triolytics.storage import stats
from triolytics.storage.store import Store

TARGET_RATIO = 0.90  # ingest with a dashboard open / ingest alone: at least
TARGET_P95_MS = 1000.0  # the 30-day view: below
LOAD = "batch"  # bench/http_capture.py's: 100 events a request, stamped by the server
LATENCY_ARMS = {  # name -> the server's environment
    "warm": {},  # the defaults: figures kept warm
    "cold": {"TRIOLYTICS_DASHBOARD_CACHE_S": "0"},  # every request computes its view
    "cold_nice0": {"TRIOLYTICS_DASHBOARD_CACHE_S": "0", "TRIOLYTICS_DASHBOARD_NICE": "0"},
}
ROOT = Path(__file__).resolve().parent.parent
CLIENT_TIMEOUT_S = 300.0  # one dashboard request; the end of a load cuts it short


# --- the data ----------------------------------------------------------------------------


def today_base() -> datetime:
    """30 days before today's UTC midnight: data from there ends where today begins."""
    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - timedelta(days=30)


def prepare_data(path: Path, rows: int) -> dict:
    """Make the file if missing, fold in whatever its rollups lack, and describe it."""
    out: dict = {"file": str(path), "generated": not path.exists()}
    if out["generated"]:
        base = today_base()
        log(f"generating {rows:,} events from {base:%Y-%m-%d} in {path} ...")
        out["generate_s"] = round(dashboard_queries.generate(path, rows, base), 1)
    store = Store(path, threads=1)  # the server's DuckDB threads
    try:
        log("rollups ...")
        began, folded = time.perf_counter(), 0
        while n := stats.refresh_rollups(store.conn):
            folded += n
        out["rollup_build"] = {"rows": folded, "s": round(time.perf_counter() - began, 1),
                               "duckdb_threads": 1}
        store.conn.execute("CHECKPOINT")  # the copies take the file alone, no WAL
        since = datetime.now(UTC) - timedelta(days=30)
        total, first, last, in_view = store.conn.execute(
            "SELECT count(*), min(timestamp), max(timestamp), "
            "count(*) FILTER (WHERE timestamp >= ?) FROM events", [since]).fetchone()
    finally:
        store.close()
    out.update(rows=total, first=first.isoformat(), last=last.isoformat(),
               rows_in_30d_view=in_view, bytes=path.stat().st_size,
               rollups_hashing=rollups_state(path).get("hashing"))
    if in_view < 0.9 * total:
        log(f"WARNING: the 30-day view covers {in_view / total:.0%} of {path}'s rows; "
            "delete it to make one that ends today")
    return out


def copy_file(src: Path, dst: Path) -> None:
    if shutil.which("cp"):  # a reflink where the file system has them
        subprocess.run(["cp", "--reflink=auto", str(src), str(dst)], check=True)
    else:
        shutil.copyfile(src, dst)


def rollups_state(db: Path) -> dict:
    """The rollups' layout (`stats_mark.hashing`) and the rows stored but not folded into
    them, in a stopped server's file."""
    try:
        con = duckdb.connect(str(db), read_only=True)
    except duckdb.Error:
        return {}
    try:
        lag, hashing = con.execute("SELECT (SELECT max(ingest_seq) FROM events) - seq, "
                                   "hashing FROM stats_mark").fetchone()
    except (duckdb.Error, TypeError):
        return {}
    finally:
        con.close()
    return {"lag_rows": lag, "hashing": hashing}


def rollups_at_stop(db: Path, data: dict) -> dict:
    """rollups_state, and whether the server built the rollups again (another layout)."""
    state = rollups_state(db)
    return {"rollup_lag_rows_at_stop": state.get("lag_rows"),
            "rollups_rebuilt": state.get("hashing") != data["rollups_hashing"]}


# --- the server --------------------------------------------------------------------------


class DashServer(Server):
    """`triolytics serve --port 0` over a copy of the data file; the port is read from
    `<data>/server.json` once the process that wrote it is this one."""

    def __init__(self, name: str, run_dir: Path, source: Path, args, env: dict) -> None:
        self.data = run_dir / "data"
        argv = harness.pinned(harness.SERVER_CPU) + [
            sys.executable, "-m", "triolytics", "serve", "--host", HOST, "--port", "0",
            "--data", str(self.data), "--write-key", http_capture.WRITE_KEY,
            "--fsync", args.fsync]
        super().__init__(name, argv, 0, run_dir, env={"PYTHONPATH": args.src, **env})
        self.data.mkdir(parents=True)
        copy_file(source, self.data / "events.duckdb")

    def ready(self) -> bool:
        if not self.port:
            self.port = crash_loop.bound_port(self.data, self.proc.pid) or 0
            if not self.port:
                return False
        return super().ready()

    def token(self) -> str:
        return (self.data / "admin.token").read_text().strip()


# --- the clients -------------------------------------------------------------------------


class Dashboard:
    """An open dashboard: logged in with the admin token; GET /dashboard/live kept open
    (its messages counted); every `every` s from `start_at`, the figures of each range,
    one request after another. Tick 0 is the page opening; then `ticks` more, or until
    `stop()`. `records` holds (tick, range, ms, age of the figures in s) per answer."""

    def __init__(self, port: int, token: str, ranges: list[str], every: float,
                 ticks: int | None = None, start_at: float = 0.0) -> None:
        self.port, self.ranges, self.every, self.ticks = port, ranges, every, ticks
        self.start_at = start_at or time.time()
        self.records: list[tuple[int, str, float, float]] = []
        self.unfinished: list[tuple[str, float]] = []  # cut off by stop(): waited s
        self.skipped = 0  # ticks passed while an answer was awaited (not caught up)
        self.failures: list[str] = []
        self.live_messages = 0
        self.done = threading.Event()
        self.socks: list[socket.socket] = []
        self.cookie = self._login(token)
        self.threads = [threading.Thread(target=self._figures, daemon=True),
                        threading.Thread(target=self._live, daemon=True)]

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
        conn.connect()
        self.socks.append(conn.sock)
        return conn

    def _login(self, token: str) -> str:
        """POST /login, then GET / with the cookie, as a browser follows the 303 (the
        page's load, which has the server compute its ranges in the background)."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=CLIENT_TIMEOUT_S)
        try:
            conn.request("POST", "/login", urllib.parse.urlencode({"token": token}),
                         {"Content-Type": "application/x-www-form-urlencoded"})
            resp = conn.getresponse()
            resp.read()
            cookie = (resp.getheader("set-cookie") or "").split(";")[0]
            if resp.status != 303 or not cookie:
                raise RuntimeError(f"login answered {resp.status}, cookie {cookie!r}")
            conn.request("GET", "/", headers={"Cookie": cookie})
            page = conn.getresponse()
            if page.status != 200 or b"<html" not in page.read().lower():
                raise RuntimeError(f"GET / answered {page.status}")
        finally:
            conn.close()
        return cookie

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def wait(self, timeout: float) -> None:
        self.threads[0].join(timeout)

    def stop(self) -> None:
        self.done.set()
        for sock in self.socks:  # wakes a thread waiting for an answer
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            if t.is_alive():
                t.join(10)

    def _figures(self) -> None:
        conn, tick, due = None, 0, self.start_at
        while self.ticks is None or tick <= self.ticks:
            if self.done.wait(max(0.0, due - time.time())):
                return
            for name in self.ranges:
                conn = conn or self._connect(CLIENT_TIMEOUT_S)
                began = time.perf_counter()
                try:
                    conn.request("GET", f"/dashboard/figures?range={name}",
                                 headers={"Cookie": self.cookie})
                    resp = conn.getresponse()
                    body = resp.read()
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = None
                    if self.done.is_set():
                        self.unfinished.append((name, round(time.perf_counter() - began, 3)))
                        return
                    self.failures.append(f"{name}: {exc!r}")
                    continue
                ms = (time.perf_counter() - began) * 1e3
                if resp.status != 200:
                    self.failures.append(f"{name}: {resp.status} {body[:200]!r}")
                    continue
                made = datetime.fromisoformat(json.loads(body)["generated_at"])
                age = (datetime.now(UTC) - made).total_seconds()  # (to the second)
                self.records.append((tick, name, ms, age))
            tick += 1
            due += self.every
            while due < time.time():  # as a page's timer: a passed tick is not made up
                due += self.every
                self.skipped += 1

    def _live(self) -> None:
        conn = None
        try:
            conn = self._connect(60.0)
            conn.request("GET", "/dashboard/live", headers={"Cookie": self.cookie})
            resp = conn.getresponse()
            if resp.status != 200:
                self.failures.append(f"live: {resp.status}")
                return
            while not self.done.is_set() and (line := resp.readline()):
                if line.startswith(b"event: live"):
                    self.live_messages += 1
        except (OSError, http.client.HTTPException) as exc:
            if not self.done.is_set():
                self.failures.append(f"live: {exc!r}")
        finally:
            if conn is not None:
                conn.close()

    def summary(self, first_apart: bool) -> dict:
        """Latencies per range (with the page opening apart, or not), and the rest."""
        out: dict = {}
        for name in self.ranges:
            ms = [m for t, r, m, _ in self.records if r == name and not (first_apart and t == 0)]
            ages = [a for t, r, _, a in self.records if r == name and t > 0]
            out[name] = {**dist(ms), "age_s_max": max(ages, default=None),
                         "age_s_p50": statistics.median(ages) if ages else None}
            if first_apart:
                out[name]["first_ms"] = next((round(m, 1) for t, r, m, _ in self.records
                                              if r == name and t == 0), None)
        return {"ranges": out, "unfinished": self.unfinished, "skipped_ticks": self.skipped,
                "live_messages": self.live_messages, "failures": self.failures[:5],
                "failed": len(self.failures)}


class PacedIngest(threading.Thread):
    """POST /v1/batch (100 events) at `rate` events/s on one keep-alive connection; a
    request whose time came while the one before waited goes at once."""

    def __init__(self, port: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.port, self.rate = port, rate
        self.done = threading.Event()
        self.acked = self.non_2xx = self.errors = 0
        self.ms: list[float] = []
        self.elapsed = 0.0

    def run(self) -> None:
        path, body, per = http_capture.LOADS[LOAD]
        headers = {"Content-Type": "application/json", "x-write-key": http_capture.WRITE_KEY}
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        began, k = time.perf_counter(), 0
        while not self.done.wait(max(0.0, began + k * per / self.rate - time.perf_counter())):
            k += 1
            sent = time.perf_counter()
            try:
                conn.request("POST", path, body, headers)
                resp = conn.getresponse()
                resp.read()
            except (OSError, http.client.HTTPException):
                self.errors += 1
                conn.close()
                continue
            self.ms.append((time.perf_counter() - sent) * 1e3)
            if 200 <= resp.status < 300:
                self.acked += per
            else:
                self.non_2xx += 1
        self.elapsed = time.perf_counter() - began
        conn.close()


def dist(ms: list[float]) -> dict:
    s = sorted(ms)
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50_ms": round(statistics.median(s), 1),
            "p95_ms": round(percentile(s, 95), 1), "max_ms": round(s[-1], 1)}


# --- the runs ----------------------------------------------------------------------------


def throughput_run(arm: str, n: int, args, tmp: Path, source: Path) -> dict:
    run_dir = tmp / f"throughput-{arm}-{n}"
    server = DashServer(arm, run_dir, source, args, {})
    client = None
    try:
        server.start(args.startup_timeout)
        if arm == "dashboard":  # its first tick as the load starts (1 s from now)
            client = Dashboard(server.port, server.token(), args.throughput_ranges.split(","),
                               args.every, start_at=time.time() + 1.0)
            client.start()
        meter = CpuMeter(server)
        r = http_capture.run_builtin(server.port, LOAD, args.connections, args.duration,
                                     args.gen_procs)
        server_cpu, busy = meter.stop()
        if client is not None:
            client.stop()
        stopped = server.shut_down(args.stop_timeout)
    finally:
        if client is not None:
            client.stop()
        server.kill()
    per = http_capture.LOADS[LOAD][2]
    elapsed = r["elapsed_s"] or float("nan")
    out = {"events_per_s": round(r["ok"] * per / elapsed, 1),
           "server_cpu_us_per_event": round(server_cpu * 1e6 / (r["ok"] * per or 1), 3),
           "p50_ms": round(r["p50_ms"], 2), "p99_ms": round(r["p99_ms"], 2),
           "non_2xx": r["non_2xx"], "socket_errors": r["socket_errors"],
           **harness.cpu_utils(server_cpu, r["load_cpu_s"], busy, elapsed), **stopped,
           **rollups_at_stop(server.data / "events.duckdb", args.data)}
    if client is not None:
        out["dashboard"] = client.summary(first_apart=False)
        out["dashboard"]["records"] = [(t, r_, round(m, 1)) for t, r_, m, _ in client.records]
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"throughput {arm} round {n}: {out['events_per_s']:,.0f} events/s, "
        f"other CPU {out['other_cpu_util']}")
    return out


def latency_run(arm: str, n: int, views: int, args, tmp: Path, source: Path) -> dict:
    run_dir = tmp / f"latency-{arm}-{n}"
    ranges = (args.warm_ranges if arm == "warm" else args.cold_ranges).split(",")
    server = DashServer(arm, run_dir, source, args, LATENCY_ARMS[arm])
    ingest = client = None
    try:
        server.start(args.startup_timeout)
        ingest = PacedIngest(server.port, args.rate)
        ingest.start()
        client = Dashboard(server.port, server.token(), ranges, args.every, ticks=views,
                           start_at=time.time() + args.settle)
        meter, cpu0 = CpuMeter(server), time.process_time()
        began = time.perf_counter()
        client.start()
        client.wait((views + 1) * args.every + args.settle + 2 * CLIENT_TIMEOUT_S)
        client.stop()
        ingest.done.set()
        ingest.join(60)
        server_cpu, busy = meter.stop()
        elapsed = time.perf_counter() - began
        load_cpu = time.process_time() - cpu0
        stopped = server.shut_down(args.stop_timeout)
    finally:
        if client is not None:
            client.stop()
        if ingest is not None:
            ingest.done.set()
        server.kill()
    out = {**client.summary(first_apart=True),
           "ingest": {"events_per_s": round(ingest.acked / (ingest.elapsed or 1), 1),
                      "non_2xx": ingest.non_2xx, "errors": ingest.errors,
                      **{k: v for k, v in dist(ingest.ms).items() if k != "n"},
                      "requests": len(ingest.ms)},
           **harness.cpu_utils(server_cpu, load_cpu, busy, elapsed), **stopped,
           **rollups_at_stop(server.data / "events.duckdb", args.data),
           "ms": {r: [round(m, 1) for t, r_, m, _ in client.records if r_ == r and t > 0]
                  for r in ranges},
           "ages": {r: [round(a, 1) for t, r_, _, a in client.records if r_ == r and t > 0]
                    for r in ranges}}
    shutil.rmtree(run_dir, ignore_errors=True)
    log(f"latency {arm} round {n}: " + ", ".join(
        f"{r} p50 {s.get('p50_ms')} p95 {s.get('p95_ms')} ms"
        for r, s in out["ranges"].items()) + f"; other CPU {out['other_cpu_util']}")
    return out


def git_state() -> dict:
    """The commit, and whether src/ differed from it when the servers' copy was taken."""
    def git(*argv: str) -> str:
        got = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True)
        return got.stdout.strip()
    return {"head": git("rev-parse", "--short", "HEAD"),
            "src_changed": git("status", "--porcelain", "--", "src") != ""}


def rotated(arms: list[str], n: int) -> list[str]:
    k = n % len(arms)
    return arms[k:] + arms[:k]


def throughput_phase(args, tmp: Path, source: Path) -> dict:
    arms = ["alone", "dashboard"]
    runs: dict = {arm: [] for arm in arms}
    for n in range(args.rounds):
        for arm in rotated(arms, n):
            runs[arm].append(throughput_run(arm, n, args, tmp, source))
    x = {key: {arm: [r[key] for r in runs[arm]] for arm in arms}
         for key in ("events_per_s", "server_cpu_us_per_event")}
    requests: dict = {}
    for name in args.throughput_ranges.split(","):
        ms = [m for r in runs["dashboard"] for t, r_, m in r["dashboard"]["records"]
              if r_ == name]
        cut = [w for r in runs["dashboard"] for r_, w in r["dashboard"]["unfinished"]
               if r_ == name]
        requests[name] = {**dist(ms), "unfinished": len(cut),
                          "unfinished_waited_s": cut}
    ratio = compare(x["events_per_s"]["dashboard"], x["events_per_s"]["alone"])
    return {
        "summary": {key: {arm: spread(v[arm]) for arm in arms} for key, v in x.items()},
        "other_cpu_util": {arm: [r["other_cpu_util"] for r in runs[arm]] for arm in arms},
        "ratio_dashboard_vs_alone": {
            "events_per_s": ratio,
            "server_cpu_us_per_event": compare(x["server_cpu_us_per_event"]["dashboard"],
                                               x["server_cpu_us_per_event"]["alone"])},
        "dashboard_requests": requests,
        "target": {"min_ratio": TARGET_RATIO,
                   "met": ratio["median_of_round_ratios"] >= TARGET_RATIO},
        "runs": runs,
    }


def latency_phase(args, tmp: Path, source: Path) -> dict:
    arms = args.latency_arms.split(",")
    runs: dict = {arm: [] for arm in arms}
    rounds = max(1, args.latency_rounds)
    for n in range(rounds):
        views = args.views // rounds + (n < args.views % rounds)
        for arm in rotated(arms, n):
            runs[arm].append(latency_run(arm, n, views, args, tmp, source))
    summary: dict = {}
    for arm in arms:
        ranges = (args.warm_ranges if arm == "warm" else args.cold_ranges).split(",")
        summary[arm] = {name: {**dist([m for r in runs[arm] for m in r["ms"][name]]),
                               "first_ms": [r["ranges"][name]["first_ms"] for r in runs[arm]],
                               "age_s_max": max((r["ranges"][name]["age_s_max"] or 0
                                                 for r in runs[arm]), default=None),
                               "age_s_p50": statistics.median(
                                   a for r in runs[arm] for a in r["ages"][name]
                               ) if any(r["ages"][name] for r in runs[arm]) else None}
                        for name in ranges}
        summary[arm]["ingest_events_per_s"] = [r["ingest"]["events_per_s"] for r in runs[arm]]
        summary[arm]["ingest_p95_ms"] = [r["ingest"].get("p95_ms") for r in runs[arm]]
        summary[arm]["other_cpu_util"] = [r["other_cpu_util"] for r in runs[arm]]
    p95 = {arm: summary[arm].get("30d", {}).get("p95_ms") for arm in arms}
    return {"summary": summary,
            "target": {"p95_ms_below": TARGET_P95_MS,
                       **{f"{arm}_30d_p95_ms": p95[arm] for arm in arms},
                       **{f"{arm}_met": p95[arm] is not None and p95[arm] < TARGET_P95_MS
                          for arm in arms}},
            "runs": runs}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", type=Path, help="the data file: made if missing, else reused "
                   "(default: made in a temporary directory, then deleted)")
    p.add_argument("--rows", type=int, default=10_000_000, help="events, when making it")
    p.add_argument("--phases", default="throughput,latency", help="either or both")
    p.add_argument("--rounds", type=int, default=3, help="throughput rounds (2 arms each)")
    p.add_argument("--duration", type=float, default=15.0, help="s per throughput run")
    p.add_argument("--connections", type=int, default=16, help="saturating ingest's")
    p.add_argument("--gen-procs", type=int, default=1, help="load generator processes")
    p.add_argument("--throughput-ranges", default="30d,7d,24h", help="the client's, "
                   "throughput phase")
    p.add_argument("--rate", type=float, default=2000.0, help="events/s, latency phase")
    p.add_argument("--views", type=int, default=20, help="requests per range and arm, "
                   "after each run's first, latency phase")
    p.add_argument("--latency-rounds", type=int, default=2)
    p.add_argument("--latency-arms", default="warm,cold",
                   help="of warm, cold, cold_nice0 (cold at TRIOLYTICS_DASHBOARD_NICE=0)")
    p.add_argument("--every", type=float, default=10.0, help="s between the client's ticks")
    p.add_argument("--settle", type=float, default=2.0,
                   help="s of paced ingest before the page opens")
    p.add_argument("--warm-ranges", default="30d,7d,24h", help="the client's, warm arm")
    p.add_argument("--cold-ranges", default="30d", help="the client's, cold arms")
    p.add_argument("--fsync", default="always", help="the server's --fsync")
    p.add_argument("--startup-timeout", type=float, default=60.0)
    p.add_argument("--stop-timeout", type=float, default=120.0)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="triolytics-dash-") as tmp:
        git = git_state()
        args.src = str(Path(tmp) / "src")  # the servers' code, fixed for the run
        shutil.copytree(ROOT / "src", args.src, ignore=shutil.ignore_patterns("__pycache__"))
        source = args.file or Path(tmp) / "source.duckdb"
        data = args.data = prepare_data(source, args.rows)  # (before pinning: both CPUs)
        harness.prepare_main()
        phases = args.phases.split(",")
        report = {**harness.report_head("dashboard_ingest", "triolytics", "trio", "h11",
                                        "msgspec", "duckdb"),
                  "config": {**{k: str(v) if isinstance(v, Path) else v
                                for k, v in vars(args).items() if k != "data"},
                             "load": LOAD, "pinning": harness.pinning(), "git": git},
                  "data": data}
        if "throughput" in phases:
            report["throughput"] = throughput_phase(args, Path(tmp), source)
        if "latency" in phases:
            report["latency"] = latency_phase(args, Path(tmp), source)
    harness.emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
