"""Idle WebSocket connections: server memory per connection and handshakes per second.

Opens N (10,000 by default) WebSocket connections to `GET /analytics?analytics_id=…`,
completes every handshake (101), then holds them all idle. Reports:
  - the server's memory per connection: (VmRSS with all N open − VmRSS before) / N, from
    /proc/PID/status (target ≤ 16 KiB)
  - new connections per second: handshakes completed / time from the first connect to the
    last 101, with at most --concurrency handshakes under way at once
  - that every connection is still open at the end: none was closed while held, and each
    answers a ping with a pong
The server is `triolytics serve` (with TRIOLYTICS_MAX_CONNECTIONS and
TRIOLYTICS_MAX_CONNECTIONS_PER_IP raised above N); with
--probe, bench/probe_ws.py's trio-websocket probe is measured the same way in the same run.
The server runs on CPU 0 and this script on CPU 1. Both get RLIMIT_NOFILE raised (this
script for itself, the server through preexec_fn), and the client sockets are bound to
several loopback source addresses (127.0.0.x) so no one address runs out of ports.
Prints one JSON document to stdout; progress goes to stderr.

    .venv/bin/python bench/connections.py [--connections N] [--probe] [--hold S]
"""

from __future__ import annotations

import argparse
import errno
import os
import selectors
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import harness
from harness import (
    HOST,
    CpuMeter,
    Server,
    cpu_utils,
    free_port,
    log,
    percentile,
    pinning,
    raise_nofile,
    record_failure,
    recv_or_why,
)
from ws_stream import (
    HandshakeError,
    check_handshake,
    client_frame,
    create_ids,
    handshake_request,
    open_ws,
    read_frames,
    server_argv,
)

TARGET_RSS_PER_CONN_KIB = 16
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
TARGETS = ("triolytics", "probe_trio", "probe_wsproto", "probe_websockets")


class Pending:
    """One connection on its way: connecting, then handshaking."""

    __slots__ = ("sock", "request", "accept", "buf", "began")

    def __init__(self, sock: socket.socket, request: bytes, accept: bytes, began: float) -> None:
        self.sock, self.request, self.accept, self.began = sock, request, accept, began
        self.buf = bytearray()


def open_many(
    port: int, path: str, n: int, concurrency: int, sources: list[str], timeout: float
) -> tuple[list[socket.socket], dict]:
    """Open n WebSocket connections, at most `concurrency` handshakes at a time."""
    sel = selectors.DefaultSelector()
    done: list[socket.socket] = []
    errors: dict[str, int] = {}
    latencies: list[float] = []
    first_error: list[str] = []
    started = 0
    t0 = time.perf_counter()
    last = t0

    def fail(p: Pending, why: str) -> None:
        errors[why.split(":")[0]] = errors.get(why.split(":")[0], 0) + 1
        if not first_error:
            first_error.append(why)
        sel.unregister(p.sock)
        p.sock.close()

    def start_one() -> None:
        nonlocal started
        source = sources[started * len(sources) // n]
        started += 1
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))  # the port is chosen at connect, per destination
            err = sock.connect_ex((HOST, port))
            if err not in (0, errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except OSError as exc:
            sock.close()
            errors["connect"] = errors.get("connect", 0) + 1
            if not first_error:
                first_error.append(f"connect from {source}: {exc}")
            return
        request, accept = handshake_request(port, path)
        p = Pending(sock, request, accept, time.perf_counter())
        sel.register(sock, selectors.EVENT_WRITE, p)

    deadline = t0 + timeout
    while (started < n or sel.get_map()) and time.perf_counter() < deadline:
        while started < n and len(sel.get_map()) < concurrency:
            start_one()
        for key, mask in sel.select(0.5):
            p: Pending = key.data
            if mask & selectors.EVENT_WRITE:
                err = p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(p, f"connect: {os.strerror(err)}")
                    continue
                try:
                    p.sock.send(p.request)  # a few hundred bytes: fits any empty send buffer
                except OSError as exc:
                    fail(p, f"send: {exc}")
                    continue
                sel.modify(p.sock, selectors.EVENT_READ, p)
                continue
            data, why = recv_or_why(p.sock, 4096, "recv: {exc}", "closed: during the handshake")
            if why:
                fail(p, why)
                continue
            p.buf += data
            end = p.buf.find(b"\r\n\r\n")
            if end < 0:
                continue
            try:
                check_handshake(bytes(p.buf[: end + 4]), p.accept)
            except HandshakeError as exc:
                fail(p, f"refused: {exc}")
                continue
            last = time.perf_counter()
            latencies.append(last - p.began)
            sel.unregister(p.sock)
            done.append(p.sock)
    for key in list(sel.get_map().values()):
        fail(key.data, "timeout: handshake not done in time")
    sel.close()
    latencies.sort()
    elapsed = last - t0
    return done, {
        "handshakes_ok": len(done),
        "handshake_errors": errors,
        "first_error": first_error[0] if first_error else None,
        "open_elapsed_s": round(elapsed, 3),
        "handshakes_per_s": round(len(done) / elapsed, 1) if elapsed > 0 else None,
        "handshake_p50_ms": round(percentile(latencies, 50) * 1e3, 3),
        "handshake_p99_ms": round(percentile(latencies, 99) * 1e3, 3),
    }


def hold(
    socks: list[socket.socket],
    seconds: float,
    ping: bool,
    ping_timeout: float,
    after_hold: Callable[[], None],
) -> dict:
    """Keep the connections idle for `seconds` (answering the server's pings), call
    `after_hold`, then ping each.

    Returns how many the server closed while they were held and how many answered the
    final ping with a pong.
    """
    sel = selectors.DefaultSelector()
    bufs = {}
    closed: dict[str, int] = {}
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s] = bytearray()
    ponged: set[socket.socket] = set()
    server_pings = 0

    def close(s: socket.socket, why: str) -> None:
        closed[why] = closed.get(why, 0) + 1
        sel.unregister(s)

    def pump(until: float, stop_when_all_ponged: bool) -> None:
        nonlocal server_pings
        while time.monotonic() < until:
            if stop_when_all_ponged and len(ponged) >= len(sel.get_map()):
                return
            for key, _ in sel.select(min(0.5, max(0.0, until - time.monotonic()))):
                s = key.fileobj
                try:
                    data, why = recv_or_why(s, 65536, "recv error {exc.errno}",
                                            "closed without a close frame", raise_blocking=True)
                except BlockingIOError:
                    continue
                if why:
                    close(s, why)
                    continue
                bufs[s] += data
                for _, opcode, payload, _ in read_frames(bufs[s]):
                    if opcode == 0x9:
                        server_pings += 1
                        s.sendall(client_frame(0xA, payload))
                    elif opcode == 0xA:
                        ponged.add(s)
                    elif opcode == 0x8:
                        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                        close(s, f"close frame {code}")
                        break

    pump(time.monotonic() + seconds, False)
    after_hold()
    still_open = len(sel.get_map())
    out = {"held_s": seconds, "closed_while_held": closed, "open_after_hold": still_open,
           "server_pings_answered": server_pings}
    if ping:
        began = time.monotonic()
        for key in list(sel.get_map().values()):
            try:
                key.fileobj.sendall(client_frame(0x9, b"bench"))
            except OSError as exc:
                close(key.fileobj, f"ping send error {exc.errno}")
        pump(began + ping_timeout, True)
        out["answered_ping"] = len(ponged)
        out["ping_round_s"] = round(time.monotonic() - began, 3)
    sel.close()
    return out


def measure(target: str, args: argparse.Namespace, tmp: Path) -> dict:
    port, run_dir = free_port(), tmp / target
    data = run_dir / "data"
    argv = server_argv(target, port, data, "always", args.target_cmd)
    cap = str(max(20_000, 2 * args.connections))  # (all from a few source addresses)
    env = {"TRIOLYTICS_MAX_CONNECTIONS": cap, "TRIOLYTICS_MAX_CONNECTIONS_PER_IP": cap}
    server = Server(target, argv, port, run_dir, healthz=target == "triolytics",
                    env=env if target == "triolytics" else None, nofile=args.nofile)
    n = args.connections
    sources = [f"127.0.0.{args.first_source + i}" for i in range(-(-n // args.per_source))]
    log(f"{target}: {n} connections from {sources[0]}..{sources[-1]}, "
        f"{args.concurrency} handshakes at a time")
    result: dict = {"connections": n, "concurrency": args.concurrency,
                    "source_addresses": len(sources)}
    socks: list[socket.socket] = []
    try:
        server.start(args.startup_timeout)
        path = "/analytics?analytics_id=probe"
        if target == "triolytics":
            path = f"/analytics?analytics_id={create_ids(port, 1)[0]}"
        for _ in range(args.warmup):  # first connections pay for lazy imports and caches
            sock, _ = open_ws(port, path)
            sock.sendall(client_frame(0x8, (1000).to_bytes(2, "big")))
            sock.close()
        time.sleep(args.settle)
        rss_before = server.status_kib("VmRSS")
        meter, load0 = CpuMeter(server), time.process_time()
        socks, opened = open_many(port, path, n, args.concurrency, sources, args.open_timeout)
        server_cpu, busy = meter.stop()
        load_cpu = time.process_time() - load0
        result.update(opened)
        elapsed = opened["open_elapsed_s"] or float("nan")
        result.update(cpu_utils(server_cpu, load_cpu, busy, elapsed, "_while_opening"))
        result["server_cpu_us_per_handshake"] = (
            round(server_cpu / len(socks) * 1e6, 1) if socks else None
        )
        time.sleep(args.settle)
        rss_open = server.status_kib("VmRSS")
        rss_held = None

        def read_rss() -> None:  # idle, before the ping round allocates anything
            nonlocal rss_held
            rss_held = server.status_kib("VmRSS")

        held = hold(socks, args.hold, not args.no_ping, args.ping_timeout, read_rss)
        result.update(held)
        result["server_alive"] = server.proc.poll() is None
        result["rss_before_kib"] = rss_before
        result["rss_open_kib"] = rss_open
        result["rss_after_hold_kib"] = rss_held
        result["rss_after_ping_kib"] = server.status_kib("VmRSS")
        result["rss_hwm_kib"] = server.status_kib("VmHWM")
        if socks and rss_before is not None and rss_held is not None:
            per = (rss_held - rss_before) / len(socks)
            result["rss_per_connection_kib"] = round(per, 2)
            at_open = (rss_open - rss_before) / len(socks)
            result["rss_per_connection_kib_at_open"] = round(at_open, 2)
            result["rss_per_connection_met"] = per <= TARGET_RSS_PER_CONN_KIB
        result["all_open_at_end"] = (
            len(socks) == n
            and held["open_after_hold"] == n
            and (args.no_ping or held["answered_ping"] == n)
        )
    except Exception as exc:  # a server that fails is reported, not fatal to the run
        record_failure(result, target, exc, server)
    finally:
        for s in socks:
            s.close()
        result.update(server.shut_down(args.stop_timeout))
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10_000, help="default 10,000")
    p.add_argument("--probe", action="store_true",
                   help="also measure the trio-websocket probe in the same run")
    p.add_argument("--targets", help="comma-separated, overrides --probe: "
                   + ",".join(TARGETS))
    p.add_argument("--concurrency", type=int, default=256, help="handshakes under way at once")
    p.add_argument("--hold", type=float, default=10.0, help="seconds to hold them idle")
    p.add_argument("--no-ping", action="store_true", help="skip the final ping of each")
    p.add_argument("--ping-timeout", type=float, default=60.0)
    p.add_argument("--per-source", type=int, default=5000,
                   help="connections per loopback source address (default 5,000)")
    p.add_argument("--first-source", type=int, default=2,
                   help="first source address 127.0.0.X (default 2)")
    p.add_argument("--nofile", type=int, default=65536,
                   help="RLIMIT_NOFILE for this script and the server")
    p.add_argument("--warmup", type=int, default=8,
                   help="connections opened and closed before the 'before' RSS")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds to wait before reading RSS")
    p.add_argument("--open-timeout", type=float, default=300.0,
                   help="seconds allowed to open them all")
    harness.add_server_args(p)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    harness.prepare_main()
    nofile = raise_nofile(args.nofile)
    if nofile < args.connections + 100:
        log(f"RLIMIT_NOFILE is {nofile}: not enough for {args.connections} connections")
    if args.targets:
        targets = [t for t in TARGETS if t in args.targets.split(",")]
    else:
        targets = ["triolytics"] + (["probe_trio"] if args.probe else [])
    results = {}
    with tempfile.TemporaryDirectory(prefix="triolytics-connbench-") as tmp:
        for target in targets:
            results[target] = measure(target, args, Path(tmp))
    failed = [t for t, r in results.items() if "error" in r or not r.get("all_open_at_end")]
    per = results.get("triolytics", {}).get("rss_per_connection_kib")
    probe_per = results.get("probe_trio", {}).get("rss_per_connection_kib")
    report = {
        **harness.report_head("connections", "triolytics", "trio", "trio-websocket", "wsproto",
                              "websockets", "msgspec"),
        "config": {
            "connections": args.connections,
            "concurrency": args.concurrency,
            "hold_s": args.hold,
            "ping_check": not args.no_ping,
            "per_source": args.per_source,
            "nofile": nofile,
            "pinning": pinning(),
            "target_cmd": args.target_cmd,
        },
        "results": results,
        "failed": failed,
        "ratios": {
            "rss_per_connection_vs_probe_trio": round(per / probe_per, 3)
            if per is not None and probe_per else None,
        },
        "targets": {
            "rss_per_connection_kib_max": TARGET_RSS_PER_CONN_KIB,
            "rss_per_connection_kib": per,
            "all_open_at_end": results.get("triolytics", {}).get("all_open_at_end"),
            "met": None if per is None else bool(
                per <= TARGET_RSS_PER_CONN_KIB and results["triolytics"].get("all_open_at_end")
            ),
        },
    }
    harness.emit(report, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
