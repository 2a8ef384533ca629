"""HTTP capture benchmark: triolytics against a bare trio + h11 + msgspec probe, same run.

Two probes store nothing: `probe` uses h11 for the whole exchange; `probe_lean` uses h11
only to parse request heads, as triolytics does (see bench/probe_h11.py).

Each server runs pinned to CPU 0 and is loaded from CPU 1, with two loads:
  single  one event per request to POST /v1/capture (the Collector API's curl example)
  batch   100 events per request to POST /v1/batch
The load comes from wrk when installed, else from a built-in keep-alive generator (raw
sockets, one request in flight per connection). After each triolytics load the server is
stopped with SIGINT and the rows in its DuckDB file are counted: every acknowledged event
must be stored. Prints one JSON document (machine, versions, results, ratios) to stdout;
progress goes to stderr.

    .venv/bin/python bench/http_capture.py [--quick] [--duration S] [--connections N]
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import time
from array import array
from pathlib import Path

import harness
from harness import (
    HOST,
    LOAD_CPU,
    CpuMeter,
    Server,
    StartupError,
    cpu_utils,
    free_port,
    in_workers,
    latency_ms,
    log,
    pinned,
    pinning,
    ratio,
    recv_or_why,
)

WRITE_KEY = "wk_bench"
TARGET_SINGLE_VS_PROBE = 0.9
TARGET_BATCH_EVENTS_PER_S = 150_000
EVENT = {
    "type": "track",
    "event": "Button Clicked",
    "anonymousId": "550e8400-e29b-41d4-a716-446655440000",
    "properties": {"button_id": "signup_hero", "color": "blue"},
}
# A batch shaped like an SDK's: types, times, users, properties and contexts differ per
# event. (No messageId: with a body sent over and over, every request after the first
# would be all repeats, answered as stored and stored once.)
SDK_BATCH = {"sentAt": "2026-01-01T00:00:10.000Z", "batch": [
    {**EVENT, "type": ("track", "page", "screen", "identify")[i % 4],
     "userId": f"user-{i % 5}", "timestamp": f"2026-01-01T00:00:0{i % 10}.{i:03d}Z",
     "context": {"library": {"name": "analytics-python", "version": "2.3.2"},
                 "locale": "en-US", "page": {"path": f"/p/{i % 3}"}},
     "properties": {"button_id": f"b{i}", "value": i * 1.5, "tags": ["a", "b"]}}
    for i in range(100)]}
LOADS = {  # name -> (path, body, events per request)
    "single": ("/v1/capture", json.dumps(EVENT), 1),
    "batch": ("/v1/batch", json.dumps({"batch": [EVENT] * 100}), 100),
    "sdk_batch": ("/v1/batch", json.dumps(SDK_BATCH), 100),
}


PROBES = {"probe": ["probe_h11.py"], "probe_lean": ["probe_h11.py", "--heads-only"]}
TARGETS = ("probe", "probe_lean", "triolytics")


def server_argv(target: str, args: argparse.Namespace, port: int, data: Path) -> list[str]:
    probe = PROBES.get(target)
    extra = ["--write-key", WRITE_KEY]
    return harness.server_argv(port, data, args.fsync, args.target_cmd, probe=probe, extra=extra)


def count_stored(db: Path) -> dict:
    """Rows in `events`, and how many of them are the benchmark's own event."""
    import duckdb

    if not db.exists():
        return {"stored_rows": None, "stored_events": None, "note": f"{db.name} not found"}
    con = duckdb.connect(str(db), read_only=True)
    try:
        columns = {row[0] for row in con.execute("DESCRIBE events").fetchall()}
        total = con.execute("SELECT count(*) FROM events").fetchone()[0]
        ours, by_type = total, None
        if "type" in columns:
            by_type = dict(con.execute("SELECT type, count(*) FROM events GROUP BY 1").fetchall())
        if "event" in columns:  # leave out system rows such as session_start
            sql = "SELECT count(*) FROM events WHERE event = ?"
            ours = con.execute(sql, [EVENT["event"]]).fetchone()[0]
    finally:
        con.close()
    return {"stored_rows": total, "stored_by_type": by_type, "stored_events": ours}


# --- load: wrk ---------------------------------------------------------------------------

WRK_LUA = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["x-write-key"] = "{key}"
wrk.body = [==[{body}]==]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCH_RESULT {{"requests": %.0f, "duration_us": %.0f, ' ..
    '"p50_us": %.0f, "p99_us": %.0f, "non_2xx": %.0f, "connect_errors": %.0f, ' ..
    '"read_errors": %.0f, "write_errors": %.0f, "timeouts": %.0f}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
"""


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, timeout=10)
    return (out.stdout + out.stderr).splitlines()[0].strip()


def run_wrk(port: int, load: str, conns: int, duration: float, tmp: Path) -> dict:
    path, body, _ = LOADS[load]
    script = tmp / f"{load}.lua"
    script.write_text(WRK_LUA.format(key=WRITE_KEY, body=body))
    argv = pinned(LOAD_CPU) + [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{duration:g}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://{HOST}:{port}{path}",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in out.stdout.splitlines() if x.startswith("BENCH_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    r = json.loads(line.split(" ", 1)[1])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    socket_errors = r["connect_errors"] + r["read_errors"] + r["write_errors"]
    return {
        "responses": r["requests"],
        "ok": r["requests"] - r["non_2xx"],
        "non_2xx": r["non_2xx"],
        "elapsed_s": r["duration_us"] / 1e6,
        "p50_ms": r["p50_us"] / 1e3,
        "p99_ms": r["p99_us"] / 1e3,
        "socket_errors": socket_errors,
        "timeouts": r["timeouts"],
        "in_flight_at_stop_max": conns,
        "load_cpu_s": cpu,
    }


# --- load: built-in generator ------------------------------------------------------------


def parse_response(buf: bytearray) -> tuple[int, int, bool] | None:
    """(status, bytes used, server closes) for one complete response at the start of buf."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    close = headers.get(b"connection") == b"close"
    if b"content-length" in headers:
        used = end + 4 + int(headers[b"content-length"])
        return (status, used, close) if len(buf) >= used else None
    if headers.get(b"transfer-encoding") == b"chunked":
        pos = end + 4
        while (eol := buf.find(b"\r\n", pos)) >= 0:
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                tail = buf.find(b"\r\n\r\n", eol)  # the empty line after any trailers
                return (status, tail + 4, close) if tail >= 0 else None
            pos = eol + 2 + size + 2
        return None
    return status, end + 4, close  # no body (204, 304)


def drive(port: int, request: bytes, conns: int, duration: float, start_at: float) -> dict:
    """Worker process: `conns` keep-alive connections, one request in flight on each."""
    harness.pin_to_load_cpu()
    sel = selectors.DefaultSelector()
    stats = {"ok": 0, "non_2xx": 0, "socket_errors": 0, "unanswered": 0}
    latencies = array("d")
    sent_at: dict[socket.socket, float] = {}
    buffers: dict[socket.socket, bytearray] = {}

    def open_and_send() -> None:
        sock = socket.create_connection((HOST, port), timeout=10)
        sock.settimeout(None)  # blocking: recv only after select says readable
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(sock, selectors.EVENT_READ)
        buffers[sock] = bytearray()
        sent_at[sock] = time.perf_counter()
        sock.sendall(request)

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
    while buffers and time.perf_counter() < deadline + 10:  # 10 s to drain in-flight requests
        for key, _ in sel.select(0.5):
            sock, buf = key.fileobj, buffers[key.fileobj]
            data, _ = recv_or_why(sock, 262144, "", "")
            if not data:  # server closed with our request unanswered
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
                sent_at[sock] = last
                sock.sendall(request)
    stats["unanswered"] += len(sent_at)
    for sock in list(buffers):
        drop(sock)
    return {
        **stats,
        "elapsed_s": last - t0,
        "latencies": latencies,
        "load_cpu_s": time.process_time() - cpu0,
    }


def run_builtin(port: int, load: str, conns: int, duration: float, procs: int) -> dict:
    path, body, _ = LOADS[load]
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"x-write-key: {WRITE_KEY}\r\nContent-Length: {len(body.encode())}\r\n\r\n"
    )
    request = head.encode() + body.encode()
    procs = max(1, min(procs, conns))
    shares = [conns // procs + (i < conns % procs) for i in range(procs)]
    start_at = time.time() + 1.0
    calls = [(port, request, n, duration, start_at) for n in shares]
    parts = in_workers(drive, calls, duration + 60)
    total = {k: sum(p[k] for p in parts) for k in ("ok", "non_2xx", "socket_errors", "unanswered")}
    return {
        **total,
        "responses": total["ok"] + total["non_2xx"],
        "elapsed_s": max(p["elapsed_s"] for p in parts),
        **latency_ms(parts),
        "in_flight_at_stop_max": total["unanswered"],
        "load_cpu_s": sum(p["load_cpu_s"] for p in parts),
    }


# --- one measurement: start, load, stop, count -------------------------------------------


def measure(target: str, load: str, args: argparse.Namespace, tmp: Path) -> dict:
    port, run_dir = free_port(), tmp / f"{target}-{load}"
    data = run_dir / "data"
    server = Server(target, server_argv(target, args, port, data), port, run_dir)
    conns = args.connections if load == "single" else args.batch_connections
    log(f"{target}/{load}: {conns} connections, {args.duration:g}s, {args.tool}")
    try:
        server.start(args.startup_timeout)
        meter = CpuMeter(server)
        if args.tool == "wrk":
            r = run_wrk(port, load, conns, args.duration, run_dir)
        else:
            r = run_builtin(port, load, conns, args.duration, args.gen_procs)
        server_cpu, busy = meter.stop()
        stopped = server.shut_down(args.stop_timeout)
    finally:
        server.kill()
    per_req = LOADS[load][2]
    elapsed = r["elapsed_s"] or float("nan")
    result = {
        "connections": conns,
        "requests": r["responses"],
        "requests_per_s": round(r["responses"] / elapsed, 1),
        "events_per_s": round(r["ok"] * per_req / elapsed, 1),
        "p50_ms": round(r["p50_ms"], 3),
        "p99_ms": round(r["p99_ms"], 3),
        "non_2xx": r["non_2xx"],
        "socket_errors": r["socket_errors"],
        **cpu_utils(server_cpu, r["load_cpu_s"], busy, elapsed),
        **stopped,
    }
    if "timeouts" in r:
        result["timeouts"] = r["timeouts"]
    if target == "triolytics":
        result.update(durability(data, r["ok"] * per_req, r["in_flight_at_stop_max"] * per_req))
    return result


def durability(data: Path, acked: int, in_flight: int) -> dict:
    """Stored vs acknowledged events; requests cut off at the stop may be stored unacked."""
    return harness.durability(count_stored(data / "events.duckdb"), acked, in_flight)


# --- report ------------------------------------------------------------------------------


def summarize(results: dict) -> tuple[dict, dict]:
    def eps(target: str, load: str) -> float | None:
        return results.get(target, {}).get(load, {}).get("events_per_s")

    ratios = {
        "single_vs_probe": ratio(eps("triolytics", "single"), eps("probe", "single")),
        "batch_vs_probe": ratio(eps("triolytics", "batch"), eps("probe", "batch")),
        "single_vs_probe_lean": ratio(eps("triolytics", "single"), eps("probe_lean", "single")),
        "batch_vs_probe_lean": ratio(eps("triolytics", "batch"), eps("probe_lean", "batch")),
        "batch_events_per_s": eps("triolytics", "batch"),
        "sdk_batch_events_per_s": eps("triolytics", "sdk_batch"),
        "sdk_batch_vs_probe": ratio(eps("triolytics", "sdk_batch"), eps("probe", "sdk_batch")),
    }
    met = {
        "single_vs_probe_min": TARGET_SINGLE_VS_PROBE,
        "single_vs_probe_met": None
        if ratios["single_vs_probe"] is None
        else ratios["single_vs_probe"] >= TARGET_SINGLE_VS_PROBE,
        "batch_events_per_s_min": TARGET_BATCH_EVENTS_PER_S,
        "batch_events_per_s_met": None
        if ratios["batch_events_per_s"] is None
        else ratios["batch_events_per_s"] >= TARGET_BATCH_EVENTS_PER_S,
    }
    return ratios, met


def parse_args() -> argparse.Namespace:
    p = harness.load_parser(__doc__)
    p.add_argument("--connections", type=int, default=64, help="connections, single load")
    p.add_argument("--batch-connections", type=int, default=16, help="connections, batch load")
    p.add_argument("--fsync", default="always", help="triolytics --fsync policy")
    p.add_argument("--tool", choices=["auto", "wrk", "builtin"], default="auto")
    p.add_argument("--gen-procs", type=int, default=1, help="built-in generator processes")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    p.add_argument("--loads", default=",".join(LOADS), help="comma-separated subset")
    harness.add_server_args(p)
    args = harness.parse_load_args(p)
    if args.tool == "auto":
        args.tool = "wrk" if shutil.which("wrk") else "builtin"
    return args


def main() -> int:
    args = parse_args()
    harness.prepare_main()
    try:
        results = harness.run_grid(args, TARGETS, LOADS, measure, "triolytics-bench-")
    except StartupError as exc:
        print(f"server did not come up: {exc}", file=sys.stderr)
        return 2
    ratios, targets_met = summarize(results)
    report = {
        **harness.report_head("http_capture", "triolytics", "trio", "h11", "msgspec", "duckdb"),
        "tool": args.tool,
        "tool_version": wrk_version() if args.tool == "wrk" else "builtin",
        "config": {
            "duration_s": args.duration,
            "fsync": args.fsync,
            "gen_procs": args.gen_procs,
            "pinning": pinning(),
            "target_cmd": args.target_cmd,
            "non_2xx_counts": "status >= 400" if args.tool == "wrk" else "status not 2xx",
        },
        "results": results,
        "ratios": ratios,
        "targets": targets_met,
    }
    harness.emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
