"""WebSocket stream benchmark: triolytics against two bare WebSocket probes, same run.

N connections (16 by default) stream batches to `GET /analytics?analytics_id=…` as
docs/websocket.md describes: each frame holds 1, 20 or 100 events (one load each) and a
`seq`, and each connection keeps a bounded number of frames in flight (8 by default),
sending the next one as each ack arrives. Three servers, each pinned to CPU 0 and loaded
from CPU 1:
  triolytics        `triolytics serve --fsync always`, one analytics_id per connection
                    from `POST /create`
  probe_trio        bench/probe_ws.py --server trio (trio-websocket + msgspec, stores nothing)
  probe_wsproto     bench/probe_ws.py --server wsproto (trio + wsproto without trio-websocket)
  probe_websockets  bench/probe_ws.py --server websockets (asyncio websockets, stores nothing)
The load generator is raw sockets and a selector: it does the handshake by hand, sends
pre-built masked frames (only the seq digits change) and parses the server's frames for
acks. After each triolytics load the server is stopped with SIGINT and the rows in its
DuckDB file are counted: every acknowledged event must be stored. Prints one JSON
document (machine, versions, results, ratios, targets) to stdout; progress goes to stderr.

    .venv/bin/python bench/ws_stream.py [--quick] [--duration S] [--connections N]
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import http.client
import json
import os
import selectors
import socket
import sys
import time
from array import array
from pathlib import Path

import harness
import msgspec
from harness import (  # noqa: F401 (bench/sessions.py imports busy_cpu_seconds, machine from here)
    HOST,
    CpuMeter,
    Server,
    StartupError,
    busy_cpu_seconds,
    cpu_utils,
    free_port,
    in_workers,
    latency_ms,
    log,
    machine,
    percentile,
    pinning,
    ratio,
    record_failure,
    recv_or_why,
)

EVENT_TYPE = "bench_ws"  # the benchmark's event type; session_start rows are not counted
TARGETS = ("triolytics", "probe_trio", "probe_wsproto", "probe_websockets")
LOADS = {"frame_1": 1, "frame_20": 20, "frame_100": 100}  # name -> events per frame
TARGET_EVENTS_PER_S = {"frame_20": 150_000, "frame_100": 200_000}  # triolytics, stored
MASK_KEY = b"\x37\xfa\x21\x3d"  # fixed client mask key (RFC 6455 example)
LOAD_SATURATED = 0.9  # generator CPU (cores) above which a result is flagged
SEQ_WIDTH = 10  # `"seq":` digits, right-padded with spaces so every frame has one length
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def server_argv(target: str, port: int, data: Path, fsync: str, target_cmd: str | None) -> list:
    probe = None
    if target.startswith("probe_"):
        probe = ["probe_ws.py", "--server", target.removeprefix("probe_")]
    return harness.server_argv(port, data, fsync, target_cmd, probe=probe)


def create_ids(port: int, n: int) -> list[str]:
    """Up to n analytics ids from POST /create; fewer if rate-limited after the first."""
    ids: list[str] = []
    for _ in range(n):
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        try:
            conn.request("POST", "/create", headers={"Content-Length": "0"})
            resp = conn.getresponse()
            body = resp.read()
        finally:
            conn.close()
        if resp.status == 429 and ids:
            break
        if resp.status != 200:
            raise RuntimeError(f"POST /create answered {resp.status}: {body[:300]!r}")
        ids.append(json.loads(body)["analytics_id"])
    return ids


# --- the WebSocket client side, by hand --------------------------------------------------


class HandshakeError(RuntimeError):
    pass


def handshake_request(port: int, path: str) -> tuple[bytes, bytes]:
    """(request bytes, expected Sec-WebSocket-Accept) for one client handshake."""
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\nUser-Agent: triolytics-bench\r\n\r\n"
    ).encode()
    return request, base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def check_handshake(head: bytes, accept: bytes) -> None:
    """Raise HandshakeError unless `head` (through the blank line) is our 101."""
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"101":
        raise HandshakeError(lines[0].decode(errors="replace"))
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"sec-websocket-accept") != accept:
        raise HandshakeError("101 with a wrong Sec-WebSocket-Accept")


def open_ws(port: int, path: str, timeout: float = 10) -> tuple[socket.socket, bytearray]:
    """A blocking socket past a completed handshake, and any bytes read after it."""
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request, accept = handshake_request(port, path)
    sock.sendall(request)
    buf = bytearray()
    while (end := buf.find(b"\r\n\r\n")) < 0:
        data = sock.recv(65536)
        if not data:
            raise HandshakeError("connection closed during the handshake")
        buf += data
    try:
        check_handshake(bytes(buf[: end + 4]), accept)
    except HandshakeError as exc:  # show the refusal's body too: it says why
        sock.settimeout(0.5)
        try:
            while data := sock.recv(65536):
                buf += data
        except OSError:
            pass
        sock.close()
        body = bytes(buf[end + 4 :])[:300].decode(errors="replace")
        raise HandshakeError(f"{exc} {body}".strip()) from None
    sock.settimeout(None)  # blocking: recv only after select says readable
    return sock, buf[end + 4 :]


def mask(data: bytes, phase: int = 0) -> bytes:
    key = MASK_KEY[phase:] + MASK_KEY[:phase]
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def frame_header(opcode: int, length: int) -> bytes:
    """FIN + opcode, MASK bit + length, then the mask key (client frames are masked)."""
    if length < 126:
        head = bytes([0x80 | opcode, 0x80 | length])
    elif length < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
    return head + MASK_KEY


def client_frame(opcode: int, payload: bytes) -> bytes:
    return frame_header(opcode, len(payload)) + mask(payload)


def read_frames(buf: bytearray) -> list[tuple[int, int, bytes, int]]:
    """Take every complete server frame off the front of buf: (fin, opcode, payload, masked),
    fin and masked as their bits (true when set)."""
    frames, pos, end = [], 0, len(buf)
    while end - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        length, at = b1 & 0x7F, pos + 2
        if length == 126:
            if end - at < 2:
                break
            length, at = int.from_bytes(buf[at : at + 2], "big"), at + 2
        elif length == 127:
            if end - at < 8:
                break
            length, at = int.from_bytes(buf[at : at + 8], "big"), at + 8
        if b1 & 0x80:
            at += 4
        if end - at < length:
            break
        frames.append((b0 & 0x80, b0 & 0x0F, bytes(buf[at : at + length]), b1 & 0x80))
        pos = at + length
    del buf[:pos]
    return frames


class FrameTemplate:
    """One text frame, masked once; `frame(seq)` masks only the seq digits in place.

    The payload is `{"seq":N         ,"events":[...]}`: the seq comes first and is padded
    with spaces to SEQ_WIDTH (JSON allows whitespace there), so its place, the payload
    length and the frame header are the same for every seq.
    """

    SEQ_AT = len(b'{"seq":')

    def __init__(self, events: int, ts_ms: int) -> None:
        event = {"type": EVENT_TYPE, "ts": ts_ms, "payload": {"screen_name": "Home",
                                                              "btn_id": "play_music"}}
        body = json.dumps([event] * events, separators=(",", ":")).encode()
        payload = b'{"seq":' + b"0" * SEQ_WIDTH + b',"events":' + body + b"}"
        self.events, self.payload_bytes = events, len(payload)
        masked = mask(payload)
        head = frame_header(0x1, len(payload))
        self.prefix = head + masked[: self.SEQ_AT]
        self.suffix = masked[self.SEQ_AT + SEQ_WIDTH :]
        key = MASK_KEY * (SEQ_WIDTH // 4 + 2)
        phase = self.SEQ_AT % 4
        self.seq_mask = int.from_bytes(key[phase : phase + SEQ_WIDTH], "big")
        assert self.frame(123)[len(head) :] == mask(payload.replace(b"0" * SEQ_WIDTH,
                                                                    b"123".ljust(SEQ_WIDTH)))

    def frame(self, seq: int) -> bytes:
        digits = int.from_bytes(f"{seq:<{SEQ_WIDTH}d}".encode(), "big") ^ self.seq_mask
        return self.prefix + digits.to_bytes(SEQ_WIDTH, "big") + self.suffix


class Reply(msgspec.Struct):
    type: str
    seq: int | None = None
    stored: int | None = None
    session_id: str | None = None
    code: str | None = None
    message: str | None = None


DECODE_REPLY = msgspec.json.Decoder(Reply)


class Conn:
    __slots__ = ("sock", "buf", "pending", "next_seq", "closed_with", "sessions")

    def __init__(self, sock: socket.socket, buf: bytearray) -> None:
        self.sock, self.buf = sock, buf
        self.pending: collections.deque[tuple[int, float]] = collections.deque()
        self.next_seq = 0
        self.closed_with: str | None = None
        self.sessions: set[str] = set()


def drive(
    port: int,
    paths: list[str],
    events: int,
    window: int,
    duration: float,
    drain: float,
    start_at: float,
    ts_ms: int,
) -> dict:
    """Worker process: one streaming connection per path, `window` frames in flight on each."""
    harness.pin_to_load_cpu()
    template = FrameTemplate(events, ts_ms)
    frame = template.frame
    stats = collections.Counter()
    problems: list[str] = []  # the first few, verbatim
    latencies = array("d")
    conns = [Conn(*open_ws(port, path)) for path in paths]
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)

    def problem(text: str) -> None:
        stats["problems"] += 1
        if len(problems) < 5:
            problems.append(text)

    def drop(c: Conn, why: str) -> None:
        stats["unanswered_frames"] += len(c.pending)
        c.pending.clear()
        c.closed_with = why
        sel.unregister(c.sock)
        c.sock.close()

    def consume(c: Conn, now: float) -> None:
        """Handle every complete server frame in c.buf."""
        for fin, opcode, payload, masked in read_frames(c.buf):
            if masked:  # a masked server frame is a protocol error; count it, read on
                problem("server sent a masked frame")
            if not fin:
                problem(f"fragmented server frame (opcode {opcode}); not expected for acks")
            elif opcode in (0x1, 0x2):
                reply(c, payload, now)
            elif opcode == 0x9:  # ping: answer with a pong carrying the same payload
                c.sock.sendall(client_frame(0xA, payload))
                stats["pings"] += 1
            elif opcode == 0x8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                reason = payload[2:].decode(errors="replace")
                drop(c, f"close {code} {reason}".strip())
                stats["closed_by_server"] += 1
                if len(problems) < 5:
                    problems.append(f"server closed a connection: {c.closed_with}")
                return

    def reply(c: Conn, payload: bytes, now: float) -> None:
        try:
            r = DECODE_REPLY.decode(payload)
        except msgspec.DecodeError:
            problem(f"undecodable server message {payload[:200]!r}")
            return
        if not c.pending or r.seq != c.pending[0][0]:
            problem(f"{r.type} for seq {r.seq}, expected {c.pending and c.pending[0][0]}")
            return
        _, sent = c.pending.popleft()
        latencies.append(now - sent)
        if r.type == "ack":
            stats["acked_frames"] += 1
            stats["acked_events"] += r.stored or 0
            if r.stored != events:
                problem(f"ack for seq {r.seq} says stored={r.stored}, sent {events}")
            if r.session_id is not None:
                c.sessions.add(r.session_id)
        else:
            stats["error_replies"] += 1
            problem(f"{r.type} for seq {r.seq}: {r.code} {r.message}")

    def send(c: Conn, count: int, now: float) -> None:
        seq = c.next_seq
        c.next_seq = seq + count
        c.pending.extend((s, now) for s in range(seq, seq + count))
        c.sock.sendall(b"".join([frame(s) for s in range(seq, seq + count)]))
        stats["sent_frames"] += count

    time.sleep(max(0.0, start_at - time.time()))
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline, last = t0 + duration, t0
    for c in conns:
        send(c, window, t0)
        if c.buf:
            consume(c, t0)
    live = len(conns)
    while live and time.perf_counter() < deadline + drain:
        for key, _ in sel.select(0.5):
            c = key.data
            data, why = recv_or_why(c.sock, 262144, "recv: {exc}", "closed without a close frame")
            now = time.perf_counter()
            if not data:
                stats["socket_errors"] += 1
                problem(f"connection lost with {len(c.pending)} frames in flight: {why}")
                drop(c, why)
                live -= 1
                continue
            c.buf += data
            acked = len(c.pending)
            consume(c, now)
            if c.closed_with is not None:
                live -= 1
                continue
            if len(c.pending) < acked:
                last = now
            if now < deadline:
                if len(c.pending) < window:
                    send(c, window - len(c.pending), now)
            elif not c.pending:  # time is up and everything sent was answered
                sel.unregister(c.sock)
                c.closed_with = "done"
                live -= 1
    cpu = time.process_time() - cpu0
    for c in conns:
        stats["unanswered_frames"] += len(c.pending)
        if c.closed_with != "done" and c.closed_with is not None:
            continue
        if c.closed_with is None:
            sel.unregister(c.sock)
        try:  # a polite close; no need to wait for the server's answer
            c.sock.sendall(client_frame(0x8, (1000).to_bytes(2, "big")))
        except OSError:
            pass
        c.sock.close()
    return {
        **stats,
        "elapsed_s": last - t0,
        "latencies": latencies,
        "load_cpu_s": cpu,
        "sessions": len(set().union(*(c.sessions for c in conns))),
        "problems_first": problems,
        "frame_bytes": len(template.frame(0)),
    }


def run_load(port: int, paths: list[str], events: int, args: argparse.Namespace) -> dict:
    procs = max(1, min(args.gen_procs, len(paths)))
    shares = [paths[i::procs] for i in range(procs)]
    start_at = time.time() + 1.0 + len(paths) * 0.01
    ts_ms = int(time.time() * 1000)
    calls = [
        (port, share, events, args.window, args.duration, args.drain, start_at, ts_ms)
        for share in shares
    ]
    parts = in_workers(drive, calls, args.duration + args.drain + 60)
    counts = ("sent_frames", "acked_frames", "acked_events", "error_replies", "problems",
              "socket_errors", "closed_by_server", "unanswered_frames", "pings")
    return {
        **{k: sum(p.get(k, 0) for p in parts) for k in counts},
        "elapsed_s": max(p["elapsed_s"] for p in parts),
        **latency_ms(parts),
        "load_cpu_s": sum(p["load_cpu_s"] for p in parts),
        "sessions": sum(p["sessions"] for p in parts),
        "problems_first": [x for p in parts for x in p["problems_first"]][:5],
        "frame_bytes": parts[0]["frame_bytes"],
    }


# --- optional: the same load through triolytics.client -----------------------------------


def run_client_load(port: int, ids: list[str], events: int, args: argparse.Namespace) -> dict:
    """The load through `triolytics.client`, one client (one connection) per connection.

    Each client gets frames of `events` events and at most --window of them unanswered,
    and its buffer is kept topped up. Latency is from `send_many` to the ack of its last
    event, as seen by polling the client's counters each millisecond, so it includes the
    time in the client's buffer. This measures the library as an application uses it
    (trio-websocket on the client side, ids on every event), so it is only a cross-check.
    """
    import trio

    from triolytics.client import open_client

    latencies: list[float] = []
    totals = collections.Counter()
    base = f"http://{HOST}:{port}"
    batch = [
        {"type": EVENT_TYPE, "ts": int(time.time() * 1000),
         "payload": {"screen_name": "Home", "btn_id": "play_music"}}
        for _ in range(events)
    ]
    topped = events * args.window  # events buffered beyond those in flight

    async def one(analytics_id: str, deadline: float) -> None:
        options = {"max_batch_events": events, "max_in_flight": args.window,
                   "max_buffered_events": 4 * topped + events}
        async with open_client(base, analytics_id, **options) as client:
            sent, marks = 0, collections.deque()  # (events sent up to here, when)
            while (now := trio.current_time()) < deadline:
                stats = client.stats()
                while marks and marks[0][0] <= stats.events_acked:
                    latencies.append(now - marks.popleft()[1])
                if sent - stats.events_acked < 2 * topped:
                    client.send_many(batch)
                    sent += events
                    marks.append((sent, now))
                    totals["sent_frames"] += 1
                    await trio.sleep(0)
                else:
                    await trio.sleep(0.001)
            await client.flush(args.drain)
            stats = client.stats()
            totals["acked_events"] += stats.events_acked
            totals["refused_events"] += stats.events_refused
            totals["reconnects"] += stats.reconnects

    async def main() -> float:
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(args.connections):
                nursery.start_soon(one, ids[i % len(ids)], t0 + args.duration)
        return trio.current_time() - t0

    cpu0 = time.process_time()
    elapsed = trio.run(main)
    latencies.sort()
    problems = [f"client: {totals['refused_events']} events refused, "
                f"{totals['reconnects']} reconnects"] if totals["refused_events"] else []
    return {
        "sent_frames": totals["sent_frames"],
        "acked_frames": totals["acked_events"] // events,
        "acked_events": totals["acked_events"],
        "error_replies": totals["refused_events"] // events, "problems": len(problems),
        "socket_errors": 0, "closed_by_server": 0, "pings": 0,
        "unanswered_frames": totals["sent_frames"] - totals["acked_events"] // events,
        "elapsed_s": elapsed,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "load_cpu_s": time.process_time() - cpu0,
        "sessions": None, "problems_first": problems, "frame_bytes": None,
    }


# --- one measurement: start, load, stop, count -------------------------------------------


def count_stored(db: Path) -> dict:
    """The benchmark's rows (channel 'ws', type EVENT_TYPE) in `events`, and ws rows by type."""
    import duckdb

    if not db.exists():
        return {"stored_events": None, "note": f"{db.name} not found"}
    con = duckdb.connect(str(db), read_only=True)
    try:
        columns = {row[0] for row in con.execute("DESCRIBE events").fetchall()}
        if not {"channel", "type"} <= columns:
            return {"stored_events": None, "note": f"events has no channel/type: {columns}"}
        by_type = dict(
            con.execute("SELECT type, count(*) FROM events WHERE channel = 'ws' GROUP BY 1")
            .fetchall()
        )
        total = con.execute("SELECT count(*) FROM events").fetchone()[0]
    finally:
        con.close()
    return {"stored_rows": total, "stored_ws_by_type": by_type,
            "stored_events": by_type.get(EVENT_TYPE, 0)}


def durability(data: Path, acked: int, in_flight: int) -> dict:
    """Stored vs acknowledged events; frames cut off at the stop may be stored unacked."""
    out = harness.durability(count_stored(data / "events.duckdb"), acked, in_flight)
    out.setdefault("durability_ok", False)  # nothing stored to compare
    return out


def measure(target: str, load: str, args: argparse.Namespace, tmp: Path) -> dict:
    port, run_dir = free_port(), tmp / f"{target}-{load}"
    data = run_dir / "data"
    events = LOADS[load]
    argv = server_argv(target, port, data, args.fsync, args.target_cmd)
    server = Server(target, argv, port, run_dir, healthz=target == "triolytics")
    client = args.client and target == "triolytics"
    log(f"{target}/{load}: {args.connections} connections x {args.window} frames of {events} "
        f"event(s), {args.duration:g}s{' via triolytics.client' if client else ''}")
    result: dict = {"connections": args.connections, "events_per_frame": events,
                    "frames_in_flight_per_connection": args.window}
    r = None
    try:
        server.start(args.startup_timeout)
        if target == "triolytics":
            ids = create_ids(port, min(args.ids, args.connections))
            result["analytics_ids"] = len(ids)
        else:
            ids = ["probe"]
        paths = [f"/analytics?analytics_id={ids[i % len(ids)]}" for i in range(args.connections)]
        meter = CpuMeter(server)
        if client:
            r = run_client_load(port, ids, events, args)
        else:
            r = run_load(port, paths, events, args)
        server_cpu, busy = meter.stop()
    except Exception as exc:  # a server that fails is reported, not fatal to the run
        expected = (StartupError, HandshakeError, RuntimeError, OSError)
        record_failure(result, f"{target}/{load}", exc, server, not isinstance(exc, expected))
    finally:
        result.update(server.shut_down(args.stop_timeout))
    if r is None:
        return result
    elapsed = r["elapsed_s"] or float("nan")
    result.update({
        "events_per_s": round(r["acked_events"] / elapsed, 1),
        "frames_per_s": round(r["acked_frames"] / elapsed, 1),
        "p50_ms": round(r["p50_ms"], 3),
        "p99_ms": round(r["p99_ms"], 3),
        "sent_frames": r["sent_frames"],
        "acked_frames": r["acked_frames"],
        "acked_events": r["acked_events"],
        "elapsed_s": round(r["elapsed_s"], 3),
        "error_replies": r["error_replies"],
        "socket_errors": r["socket_errors"],
        "closed_by_server": r["closed_by_server"],
        "unanswered_frames": r["unanswered_frames"],
        "problems": r["problems"],
        "sessions_seen": r["sessions"],
        "frame_bytes": r["frame_bytes"],
        **cpu_utils(server_cpu, r["load_cpu_s"], busy, elapsed),
    })
    if r["load_cpu_s"] > 0:  # what the generator could drive if it had CPU 1 to itself
        result["load_ceiling_events_per_s_est"] = round(r["acked_events"] / r["load_cpu_s"])
    # the generator near a full core means the figure may be the generator's, not the server's
    result["load_saturated"] = r["load_cpu_s"] / elapsed > LOAD_SATURATED
    if r["problems_first"]:
        result["problems_first"] = r["problems_first"]
    if target == "triolytics":
        result.update(durability(data, r["acked_events"], r["unanswered_frames"] * events))
    return result


# --- report ------------------------------------------------------------------------------


def summarize(results: dict) -> tuple[dict, dict]:
    def get(target: str, load: str, key: str):
        return results.get(target, {}).get(load, {}).get(key)

    ratios = {
        load: {
            f"triolytics_vs_{probe}": ratio(get("triolytics", load, "events_per_s"),
                                            get(probe, load, "events_per_s"))
            for probe in TARGETS[1:]
        }
        for load in LOADS
        if any(load in r for r in results.values())
    }
    met = {}
    for load, goal in TARGET_EVENTS_PER_S.items():
        eps = get("triolytics", load, "events_per_s")
        durable = get("triolytics", load, "durability_ok")
        met[load] = {
            "events_per_s_min": goal,
            "events_per_s": eps,
            "durability_ok": durable,
            "met": None if eps is None else bool(eps >= goal and durable),
        }
    return ratios, met


def parse_args() -> argparse.Namespace:
    p = harness.load_parser(__doc__)
    p.add_argument("--connections", type=int, default=16, help="connections (default 16)")
    p.add_argument("--window", type=int, default=8, help="frames in flight per connection")
    p.add_argument("--ids", type=int, default=16,
                   help="analytics ids to create for triolytics; connections share them "
                   "round-robin (default 16)")
    p.add_argument("--fsync", default="always", help="triolytics --fsync policy")
    p.add_argument("--gen-procs", type=int, default=1, help="load generator processes")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset")
    p.add_argument("--loads", default=",".join(LOADS), help="comma-separated subset")
    p.add_argument("--client", action="store_true",
                   help="drive triolytics through triolytics.client instead of raw sockets")
    p.add_argument("--drain", type=float, default=10.0,
                   help="seconds to wait for the acks in flight after a load")
    harness.add_server_args(p)
    return harness.parse_load_args(p)


def main() -> int:
    args = parse_args()
    harness.prepare_main()
    results = harness.run_grid(args, TARGETS, LOADS, measure, "triolytics-wsbench-")
    ratios, targets_met = summarize(results)
    failed = [f"{t}/{x}" for t in results for x, r in results[t].items() if "error" in r]
    report = {
        **harness.report_head("ws_stream", "triolytics", "trio", "trio-websocket", "wsproto",
                              "websockets", "msgspec", "duckdb"),
        "tool": "builtin raw-socket generator"
        + (" (triolytics: triolytics.client)" if args.client else ""),
        "config": {
            "duration_s": args.duration,
            "connections": args.connections,
            "frames_in_flight_per_connection": args.window,
            "analytics_ids": args.ids,
            "fsync": args.fsync,
            "gen_procs": args.gen_procs,
            "pinning": pinning(),
            "target_cmd": args.target_cmd,
            "event_type": EVENT_TYPE,
        },
        "results": results,
        "failed": failed,
        "ratios": ratios,
        "targets": targets_met,
    }
    harness.emit(report, args.out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
