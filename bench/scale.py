"""Scaling out: events/s and CPU per event with 1, 2, 3 nodes on one DuckLake, same run.

For each node count (`--nodes 1,2,3`) bench/cluster.py starts that many `triolytics
serve` nodes (store = "ducklake", one PostgreSQL shared by the runs, a new lake database
per run) with nginx in front, and a load generator posts `/v1/batch` bodies of
`--batch-events` events on `--connections` keep-alive connections for `--duration`
seconds: through nginx (`proxy`), and with `--direct` also straight to the nodes
(connections spread evenly, no nginx). The acked events are then waited for in the lake
(`SELECT count(*)` of this load's event name through /admin/query). Prints one JSON
document: per node count and target, events/s acked and stored, latency, the CPU
seconds per event of the nodes, nginx and PostgreSQL, and the scaling factor against
1 node. Progress goes to stderr.

    .venv/bin/python bench/scale.py [--nodes 1,2,3] [--duration 10] [--direct] [--pin]
        [--load-procs 1] [--connections 48] [--batch-events 50] [--out FILE]

The generator is http_capture.py's built-in one, with a rotating set of bodies (no
messageId: nothing is a repeat; each event its own anonymousId, BODIES_PER_CONN bodies
per connection, so no two requests in flight share a session key).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import sys
import tempfile
import time
from array import array
from pathlib import Path

import cluster
import harness
import http_capture
from harness import busy_cpu_seconds, in_workers, latency_ms, log, recv_or_why

HOST = cluster.HOST
# Bodies a generator process rotates through, per connection of its: no two requests in
# flight carry the same anonymousId (nodes deciding one session key at once wait for each
# other, which is the workload's doing, not scaling's)
BODIES_PER_CONN = 4
STORED_WAIT_S = 60.0  # after the load, the acked events must be in the lake by then
DRAIN_S = 10.0  # at the deadline, requests in flight get this long to be answered
NOISY_OTHER_CPU = 0.3  # cores used by anything else meanwhile: the figure is not clean


def bodies(event: str, proc: int, n_events: int, count: int) -> list[bytes]:
    """`count` `/v1/batch` bodies of `n_events` events for generator `proc`, every event
    with an anonymousId of its own."""
    out = []
    for b in range(count):
        batch = [{"type": "track", "event": event, "anonymousId": f"p{proc}-b{b}-e{i}",
                  "timestamp": f"2026-01-01T00:00:{i % 60:02d}.000Z",
                  "context": {"library": {"name": "bench-scale", "version": "1"}},
                  "properties": {"i": i, "plan": ("free", "pro")[i % 2]}}
                 for i in range(n_events)]
        out.append(json.dumps({"batch": batch}).encode())
    return out


def requests_for(payloads: list[bytes]) -> list[bytes]:
    """The bytes of one POST /v1/batch per body."""
    head = ("POST /v1/batch HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"x-write-key: {cluster.WRITE_KEY}\r\nContent-Length: {{n}}\r\n\r\n")
    return [head.format(host=HOST, n=len(p)).encode() + p for p in payloads]


def drive(ports: list[int], requests: list[bytes], duration: float, start_at: float,
          pin: int | None) -> dict:
    """Worker process: one keep-alive connection per entry of `ports`, one request in
    flight on each, the requests taken in turn (http_capture.drive, with many bodies
    and many ports)."""
    if pin is not None:
        os.sched_setaffinity(0, {pin})
    sel = selectors.DefaultSelector()
    stats = {"ok": 0, "non_2xx": 0, "socket_errors": 0, "unanswered": 0}
    latencies = array("d")
    sent_at: dict[socket.socket, float] = {}
    buffers: dict[socket.socket, bytearray] = {}
    port_of: dict[socket.socket, int] = {}
    turn = 0

    def send(sock: socket.socket) -> None:
        nonlocal turn
        turn += 1
        sent_at[sock] = time.perf_counter()
        sock.sendall(requests[turn % len(requests)])

    def open_and_send(port: int) -> None:
        try:
            sock = socket.create_connection((HOST, port), timeout=10)
        except OSError:
            stats["socket_errors"] += 1
            return
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sel.register(sock, selectors.EVENT_READ)
        buffers[sock], port_of[sock] = bytearray(), port
        send(sock)

    def drop(sock: socket.socket) -> None:
        sel.unregister(sock)
        sock.close()
        sent_at.pop(sock, None)
        buffers.pop(sock)
        port_of.pop(sock)

    time.sleep(max(0.0, start_at - time.time()))
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline, last = t0 + duration, t0
    for port in ports:
        open_and_send(port)
    while buffers and time.perf_counter() < deadline + DRAIN_S:
        for key, _ in sel.select(0.5):
            sock, buf = key.fileobj, buffers[key.fileobj]
            data, _ = recv_or_why(sock, 262144, "", "")
            if not data:  # closed with our request unanswered
                stats["socket_errors"] += 1
                stats["unanswered"] += 1
                port = port_of[sock]
                drop(sock)
                if time.perf_counter() < deadline:
                    open_and_send(port)
                continue
            buf += data
            while (parsed := http_capture.parse_response(buf)) is not None:
                status, used, close = parsed
                del buf[:used]
                last = time.perf_counter()
                latencies.append(last - sent_at.pop(sock))
                stats["ok" if 200 <= status < 300 else "non_2xx"] += 1
                if close or last >= deadline:
                    port = port_of[sock]
                    drop(sock)
                    if close and last < deadline:
                        open_and_send(port)
                    break
                send(sock)
    stats["unanswered"] += len(sent_at)
    for sock in list(buffers):
        drop(sock)
    return {**stats, "elapsed_s": last - t0, "latencies": latencies,
            "load_cpu_s": time.process_time() - cpu0}


def run_load(ports: list[int], event: str, args: argparse.Namespace,
             load_cpu: int | None) -> dict:
    """`args.connections` connections spread over `ports`, in `args.load_procs`
    processes; the totals."""
    procs = max(1, min(args.load_procs, args.connections))
    conn_ports = [ports[j % len(ports)] for j in range(args.connections)]
    shares = [conn_ports[p::procs] for p in range(procs)]
    start_at = time.time() + 1.0
    calls = [(share, requests_for(bodies(event, p, args.batch_events,
                                         BODIES_PER_CONN * len(share))),
              args.duration, start_at, load_cpu) for p, share in enumerate(shares)]
    parts = in_workers(drive, calls, args.duration + DRAIN_S + 60)
    total = {k: sum(p[k] for p in parts) for k in ("ok", "non_2xx", "socket_errors",
                                                   "unanswered")}
    return {**total, "elapsed_s": max(p["elapsed_s"] for p in parts), **latency_ms(parts),
            "load_cpu_s": sum(p["load_cpu_s"] for p in parts)}


def stored_count(c: cluster.Cluster, event: str) -> int:
    return c.query(f"SELECT count(*) FROM events WHERE event = '{event}'")[0][0]


def wait_stored(c: cluster.Cluster, event: str, acked: int) -> tuple[int, float]:
    """(events of this load in the lake, seconds waited) once they reach `acked`, or
    once STORED_WAIT_S has passed."""
    began = time.monotonic()
    while True:
        n = stored_count(c, event)
        if n >= acked or time.monotonic() - began > STORED_WAIT_S:
            return n, time.monotonic() - began
        time.sleep(0.2)  # bounded polling: each node loads every load_interval_ms


def log_problems(c: cluster.Cluster) -> dict:
    """ERROR and WARNING lines in the nodes' logs so far, and the first ERROR."""
    errors = warnings = 0
    first = None
    for node in c.nodes:
        for line in node.log_path.read_text(errors="replace").splitlines():
            if " ERROR " in line:
                errors += 1
                first = first or f"{node.node_id}: {line[:300]}"
            elif " WARNING " in line:
                warnings += 1
    return {"log_errors": errors, "log_warnings": warnings, "first_error": first}


def measure(c: cluster.Cluster, n: int, target: str, args: argparse.Namespace,
            load_cpu: int | None) -> dict:
    event = f"scale {n} {target}"
    ports = [c.proxy.port] if target == "proxy" else [node.port for node in c.nodes]
    log(f"{n} node(s), {target}: {args.connections} connections, {args.duration:g}s")
    cpu0, busy0 = c.cpu_seconds(), busy_cpu_seconds()
    began = time.monotonic()
    r = run_load(ports, event, args, load_cpu)
    load_s = time.monotonic() - began
    acked = r["ok"] * args.batch_events
    stored, lag = wait_stored(c, event, acked)
    cpu1, busy1 = c.cpu_seconds(), busy_cpu_seconds()
    window = load_s + lag
    cpu = {k: round(cpu1[k] - cpu0[k], 3) for k in cpu0}
    nodes_cpu = sum(v for k, v in cpu.items() if k.startswith("n"))
    elapsed = r["elapsed_s"] or float("nan")
    per_event = (lambda s: round(s / acked * 1e6, 1) if acked else None)  # noqa: E731
    return {
        "connections": args.connections,
        "requests": r["ok"] + r["non_2xx"],
        "non_2xx": r["non_2xx"],
        "socket_errors": r["socket_errors"],
        "acked_events": acked,
        "acked_events_per_s": round(acked / elapsed, 1),
        "stored_events": stored,
        "stored_lag_s": round(lag, 2),
        # the rate the lake took them in: stored over the load plus the wait for the rest
        "stored_events_per_s": round(stored / (elapsed + lag), 1),
        "durability_ok": stored >= acked,
        "p50_ms": round(r["p50_ms"], 2),
        "p99_ms": round(r["p99_ms"], 2),
        "cpu_s": cpu,
        "cpu_us_per_event": {"nodes": per_event(nodes_cpu), "nginx": per_event(cpu["nginx"]),
                             "postgres": per_event(cpu["postgres"]),
                             "all_servers": per_event(nodes_cpu + cpu["nginx"]
                                                      + cpu["postgres"])},
        "cpu_util": {"nodes": round(nodes_cpu / window, 2),
                     "nginx": round(cpu["nginx"] / window, 2),
                     "postgres": round(cpu["postgres"] / window, 2),
                     "load": round(r["load_cpu_s"] / window, 2),
                     "machine_busy": round((busy1 - busy0) / window, 2),
                     # anything else on the machine: near 0 for a clean run
                     "other": round((busy1 - busy0 - nodes_cpu - cpu["nginx"]
                                     - cpu["postgres"] - r["load_cpu_s"]) / window, 2)},
        "load_saturated": r["load_cpu_s"] / elapsed > 0.9 * args.load_procs,
        "noisy": (busy1 - busy0 - nodes_cpu - cpu["nginx"] - cpu["postgres"]
                  - r["load_cpu_s"]) / window > NOISY_OTHER_CPU,
        **log_problems(c),
    }


def node_cpus(n: int, pin: bool) -> tuple[list[int | None] | None, int | None, str]:
    """(cpus for the nodes, the generator's cpu, what was pinned): node i on CPU i-1
    when there are more CPUs than nodes (the generator on the last one), else none."""
    ncpu = os.cpu_count() or 1
    if not pin:
        return None, None, "none"
    if n < ncpu:
        return list(range(n)), ncpu - 1, f"node i on CPU i-1, generator on CPU {ncpu - 1}"
    if n == ncpu:
        return list(range(n)), None, "node i on CPU i-1, generator anywhere"
    return None, None, f"none ({n} nodes, {ncpu} CPUs)"


def scaling(results: dict, target: str, field: str) -> dict:
    base = results.get("1", {}).get(target, {}).get(field)
    return {n: harness.ratio(r.get(target, {}).get(field), base) for n, r in results.items()}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default="1,2,3", help="node counts, comma-separated")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load")
    p.add_argument("--direct", action="store_true", help="also load the nodes directly")
    p.add_argument("--pin", action="store_true",
                   help="node i on CPU i-1 (when the CPUs allow), the generator apart")
    p.add_argument("--load-procs", type=int, default=1, help="generator processes")
    p.add_argument("--connections", type=int, default=48)
    p.add_argument("--batch-events", type=int, default=50, help="events per /v1/batch")
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument("--pg-fast", action="store_true",
                   help="PostgreSQL without fsync (default: fsync on, as in production)")
    p.add_argument("--node-env", action="append", default=[], metavar="NAME=VALUE",
                   help="a variable for every node, e.g. TRIOLYTICS_SHARED_STATE=off "
                        "(repeatable)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    try:
        args.env = dict(item.split("=", 1) for item in args.node_env)
    except ValueError:
        p.error("--node-env takes NAME=VALUE")
    return args


def main() -> int:
    args = parse_args()
    if (why := cluster.missing_tools()) is not None:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    counts = [int(x) for x in args.nodes.split(",")]
    targets = ["proxy", "direct"] if args.direct else ["proxy"]
    results: dict = {}
    pinned: dict = {}
    with tempfile.TemporaryDirectory(prefix="triolytics-scale-") as tmp:
        pg = cluster.pgserver.PostgresServer(Path(tmp), fast=args.pg_fast)
        with pg:
            for n in counts:
                cpus, load_cpu, pinned[str(n)] = node_cpus(n, args.pin)
                c = cluster.Cluster(n, Path(tmp), postgres=pg, cpus=cpus, env=args.env,
                                    nginx_workers=args.nginx_workers)
                results[str(n)] = {}
                try:
                    c.start()
                    for target in targets:
                        results[str(n)][target] = measure(c, n, target, args, load_cpu)
                except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                    log(f"{n} node(s) FAILED: {exc}")
                    results[str(n)]["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
                finally:
                    results[str(n)]["stop_exit_codes"] = c.stop()
    report = {
        **harness.report_head("scale", "triolytics", "duckdb", "psycopg", "trio"),
        "config": {"nodes": counts, "targets": targets, "duration_s": args.duration,
                   "connections": args.connections, "batch_events": args.batch_events,
                   "load_procs": args.load_procs, "nginx_workers": args.nginx_workers,
                   "postgres_fsync": not args.pg_fast, "node_env": args.env,
                   "pinning": pinned},
        "results": results,
        "scaling": {t: {"acked_events_per_s": scaling(results, t, "acked_events_per_s"),
                        "stored_events_per_s": scaling(results, t, "stored_events_per_s")}
                    for t in targets},
    }
    harness.emit(report, args.out)
    failed = any("error" in r or any(not x.get("durability_ok", True)
                                     for x in r.values() if isinstance(x, dict))
                 for r in results.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
