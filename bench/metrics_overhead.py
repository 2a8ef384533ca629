"""What `GET /metrics` costs ingest: scraped every second vs not, and vs the code before it.

Arms, run in interleaved rounds (each round runs every arm once, in a rotated order, so
drift in the machine's speed falls on all arms alike):
  off      this tree's server, `metrics_listen` set, never scraped
  scraped  the same, `GET /metrics` on `metrics_listen` every `--scrape-interval` s (1 s:
           15x Prometheus's default) from a thread of this script, on the load CPU
  pre      with `--pre SRC`: the server from another source tree (the commit before
           /metrics was added, checked out with `git worktree add --detach`), never scraped
Each run is as in bench/http_capture.py: a fresh server and data directory pinned to
CPU 0, its built-in keep-alive generator on CPU 1, then a SIGINT stop. Prints one JSON
document: per arm and load, for events/s and for server CPU per event (µs; less moved
by other work on the machine), every round's figure, their median and spread (min, max,
and the median absolute deviation as a fraction of the median), and the ratios
scraped/off and off/pre (the median of the per-round ratios and the ratio of the
medians); for scraped runs, the scrapes and their round-trip time.

    .venv/bin/python bench/metrics_overhead.py [--rounds 6] [--duration 4] \\
        [--loads single,batch] [--pre /tmp/wt-premetrics/src]
"""

from __future__ import annotations

import http.client
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import harness
import http_capture
from harness import HOST, CpuMeter, Server, free_port, log

SRC = Path(__file__).resolve().parent.parent / "src"


class Scraper(threading.Thread):
    """GET /metrics every `interval` s until stopped; counts the scrapes that parsed 200."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.done = threading.Event()
        self.ok = self.failed = 0
        self.bytes = 0
        self.ms: list[float] = []  # each scrape's round trip

    def run(self) -> None:
        while not self.done.wait(self.interval):
            conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
            began = time.perf_counter()
            try:
                conn.request("GET", "/metrics")
                resp = conn.getresponse()
                body = resp.read()
                if resp.status == 200 and b"triolytics_events_received_total" in body:
                    self.ok += 1
                    self.bytes = len(body)
                    self.ms.append((time.perf_counter() - began) * 1e3)
                else:
                    self.failed += 1
            except OSError:
                self.failed += 1
            finally:
                conn.close()


def make_server(arm: str, args, run_dir: Path) -> tuple[Server, int | None]:
    """The server of `arm` (not started), and its metrics_listen port (None: pre)."""
    port = free_port()
    extra = ["--write-key", http_capture.WRITE_KEY]
    metrics_port = None
    if arm != "pre":
        metrics_port = free_port()
        extra += ["--metrics-listen", f"{HOST}:{metrics_port}"]
    argv = harness.pinned(harness.SERVER_CPU) + [
        sys.executable, "-m", "triolytics", "serve", "--host", HOST, "--port", str(port),
        "--data", str(run_dir / "data"), *extra, "--fsync", args.fsync]
    src = args.pre if arm == "pre" else str(SRC)
    return Server(arm, argv, port, run_dir, env={"PYTHONPATH": src}), metrics_port


def scrape_cost(args, tmp: Path, n: int) -> dict:
    """Server CPU per scrape: `n` scrapes back to back of an idle server."""
    srv, metrics_port = make_server("off", args, tmp / "scrape-cost")
    try:
        srv.start(args.startup_timeout)
        meter = CpuMeter(srv)
        began = time.perf_counter()
        for _ in range(n):
            conn = http.client.HTTPConnection(HOST, metrics_port, timeout=5)
            conn.request("GET", "/metrics")
            assert conn.getresponse().read()
            conn.close()
        wall = time.perf_counter() - began
        cpu, _ = meter.stop()
        srv.shut_down(args.stop_timeout)
    finally:
        srv.kill()
    ms = cpu * 1e3 / n
    return {"scrapes": n, "server_cpu_ms_per_scrape": round(ms, 3),
            "wall_ms_per_scrape": round(wall * 1e3 / n, 3),
            "core_fraction_at_interval": round(ms / 1e3 / args.scrape_interval, 5)}


def measure(arm: str, load: str, args, tmp: Path, n: int) -> dict:
    server, metrics_port = make_server(arm, args, tmp / f"{arm}-{load}-{n}")
    port = server.port
    conns = args.connections if load == "single" else args.batch_connections
    scraper = Scraper(metrics_port, args.scrape_interval) if arm == "scraped" else None
    try:
        server.start(args.startup_timeout)
        if scraper:
            scraper.start()
        meter = CpuMeter(server)
        r = http_capture.run_builtin(port, load, conns, args.duration, 1)
        server_cpu, busy = meter.stop()
        if scraper:
            scraper.done.set()
            scraper.join()
        server.shut_down(args.stop_timeout)
    finally:
        server.kill()
    per_req = http_capture.LOADS[load][2]
    elapsed = r["elapsed_s"] or float("nan")
    out = {"events_per_s": round(r["ok"] * per_req / elapsed, 1),
           # server CPU per event: less moved than events/s by other work on the machine
           "server_cpu_us_per_event": round(server_cpu * 1e6 / (r["ok"] * per_req or 1), 3),
           "non_2xx": r["non_2xx"], "socket_errors": r["socket_errors"],
           **harness.cpu_utils(server_cpu, r["load_cpu_s"], busy, elapsed)}
    if scraper:
        out.update(scrapes_ok=scraper.ok, scrapes_failed=scraper.failed,
                   scrape_bytes=scraper.bytes,
                   scrape_ms_median=round(statistics.median(scraper.ms or [0]), 2))
    log(f"{arm}/{load} round {n}: {out['events_per_s']:.0f} events/s")
    return out


def spread(xs: list[float]) -> dict:
    med = statistics.median(xs)
    mad = statistics.median(abs(x - med) for x in xs)
    return {"median": round(med, 1), "min": min(xs), "max": max(xs),
            "mad_frac": round(mad / med, 4) if med else None}


def compare(a: list[float], b: list[float]) -> dict:
    """a vs b: the median of the per-round ratios (rounds run back to back), its
    spread, and the ratio of the medians."""
    per_round = [x / y for x, y in zip(a, b, strict=True) if y]
    return {"median_of_round_ratios": round(statistics.median(per_round), 4),
            "round_ratios": [round(x, 4) for x in per_round],
            "ratio_of_medians": round(statistics.median(a) / statistics.median(b), 4)}


def main() -> int:
    p = harness.load_parser(__doc__)
    p.set_defaults(duration=4.0)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--loads", default="single,batch", help="of bench/http_capture.py")
    p.add_argument("--connections", type=int, default=64, help="connections, single load")
    p.add_argument("--batch-connections", type=int, default=16)
    p.add_argument("--fsync", default="always")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="seconds")
    p.add_argument("--pre", help="src directory of the code before /metrics (an arm)")
    p.add_argument("--scrape-cost", type=int, default=200,
                   help="scrapes of an idle server to time first (0: none)")
    p.add_argument("--startup-timeout", type=float, default=30.0)
    p.add_argument("--stop-timeout", type=float, default=60.0)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = harness.parse_load_args(p)
    harness.prepare_main()
    arms = ["off", "scraped"] + (["pre"] if args.pre else [])
    loads = args.loads.split(",")
    runs: dict = {arm: {load: [] for load in loads} for arm in arms}
    with tempfile.TemporaryDirectory(prefix="triolytics-metrics-") as tmp:
        cost = scrape_cost(args, Path(tmp), args.scrape_cost) if args.scrape_cost else None
        for n in range(args.rounds):
            for load in loads:
                k = n % len(arms)
                for arm in arms[k:] + arms[:k]:
                    runs[arm][load].append(measure(arm, load, args, Path(tmp), n))
    summary: dict = {}
    ratios: dict = {}
    for key in ("events_per_s", "server_cpu_us_per_event") if args.rounds else ():
        x = {arm: {load: [r[key] for r in runs[arm][load]] for load in loads}
             for arm in arms}
        summary[key] = {load: {arm: spread(x[arm][load]) for arm in arms} for load in loads}
        ratios[key] = {load: {"scraped_vs_off": compare(x["scraped"][load], x["off"][load])}
                       for load in loads}
        if args.pre:
            for load in loads:
                ratios[key][load]["off_vs_pre"] = compare(x["off"][load], x["pre"][load])
    report = {
        **harness.report_head("metrics_overhead", "triolytics", "trio", "h11",
                              "prometheus_client"),
        "config": {"rounds": args.rounds, "duration_s": args.duration, "fsync": args.fsync,
                   "scrape_interval_s": args.scrape_interval, "pre_src": args.pre,
                   "load_tool": "builtin", "pinning": harness.pinning(),
                   "src": str(SRC)},
        "scrape_cost": cost,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    harness.emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
