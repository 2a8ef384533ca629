"""Crash loop: kill -9 the server under HTTP and WebSocket load, optionally damage its
files, restart it, check exactly-once.

Each round starts `python -m triolytics serve` (fsync always) on a free port with one
data directory shared by all rounds, waits for /healthz, and runs client threads:

- HTTP (`--clients`): POST `/v1/batch` with unique messageIds, recording every id
  answered 200. A batch that fails (connection lost, 408, 429, 5xx) is retried with the
  same ids, as Segment SDKs do, in the same round or after the restart.
- WebSocket (`--ws-clients`): each gets an analytics_id from `POST /create` once, then
  streams batches with unique event `id`s and a `seq` over `/analytics` (at most
  WS_WINDOW unanswered). An id counts as acknowledged only when its batch's ack
  arrives; after a lost connection the unacknowledged batches go again first, same ids
  (the server deduplicates by id).

At a random moment in the round the server gets SIGKILL. With `--damage-every K`, after
every K-th kill and before the restart one kind of damage (taken in turn from
`--damage`; a kind with nothing to damage, such as an empty WAL after a checkpoint, is
logged as skipped and tried again at the next cycle) is done to the files, and logged in
the JSON:

- `wal-truncate`: events.duckdb.wal cut at a random offset;
- `wal-corrupt`: 16 random bytes written in the middle of the WAL (the server must move
  it to quarantine/, log an ERROR and replay the journal);
- `journal-tail`: random garbage appended to the last journal segment (a torn write);
- `journal-loaded`: bytes of a record before DuckDB's journal mark overwritten (its
  events are in DuckDB already: nothing may be lost);
- `journal-unloaded`: bytes of a record after the mark overwritten. Its events are
  destroyed: the record is decoded first, its acknowledged ids are expected missing
  (`lost_to_injected_damage`, not `missing`), and the server must report the damage (a
  copy of the damaged range, `journal/quarantine/<segment>-<start>-<end>.bin`, that
  holds the overwritten bytes, and an ERROR log line). The unacknowledged ones are
  resent by their clients and must be stored once.

The journal is read by one function, `journal_records` (the only code here that knows
the journal's format). DuckDB is read read-only, which leaves the WAL as it is.

After the last round the server is started once more, the clients drain their retries,
and the server is stopped with SIGTERM (it must exit 0). Then DuckDB is opened
read-only: every acknowledged id (HTTP messageId and WebSocket event id, both in
`message_id`) must be stored exactly once, apart from the ids lost to injected damage,
which must not be stored at all, and nothing must be stored that no client sent. A
server that does not start ends the run with `error` set.

    PYTHONPATH=src .venv/bin/python bench/crash_loop.py [ROUNDS] [--clients N]
        [--ws-clients N] [--load-s S] [--damage-every K] [--damage KIND,...]
        [--seed N] [--keep DIR]

Prints one JSON document; exit status 0 when every check holds. `tests/test_crash.py`
runs a few short rounds of the same loop.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import NamedTuple

HOST = "127.0.0.1"
WRITE_KEY = "wk_crash"
BATCH_EVENTS = 20
START_TIMEOUT_S = 20.0  # the server must answer /healthz within this
STOP_TIMEOUT_S = 30.0  # ...and exit after SIGTERM within this
POLL_S = 0.02  # how often we look at a subprocess or a counter
RETRYABLE = {408, 429, 500, 502, 503, 504}


class Ledger:
    """What the clients sent and what the server acknowledged (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: set[str] = set()
        self.acked: set[str] = set()
        self.retries: list[list[str]] = []  # batches to send again, same ids
        self.retried = 0
        self.serial = 0
        self.answers: Counter[int] = Counter()  # HTTP status -> how many
        self.acked_by: Counter[str] = Counter()  # transport ("http", "ws") -> ids acked
        self.ws_replies: Counter[str] = Counter()  # WebSocket reply type/code -> how many
        self.ws_connects = 0  # WebSocket handshakes accepted

    def next_batch(self, name: str) -> list[str]:
        with self.lock:
            if self.retries:
                self.retried += 1
                return self.retries.pop()
            self.serial += 1
            ids = [f"{name}-{self.serial}-{i}" for i in range(BATCH_EVENTS)]
            self.sent.update(ids)
            return ids

    def ack(self, ids: list[str], transport: str = "http") -> None:
        with self.lock:
            self.acked_by[transport] += len(set(ids) - self.acked)
            self.acked.update(ids)

    def new_ids(self, ids: list[str]) -> None:
        with self.lock:
            self.sent.update(ids)

    def retry(self, ids: list[str]) -> None:
        with self.lock:
            self.retries.append(ids)

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _body(ids: list[str]) -> bytes:
    return json.dumps(
        {
            "batch": [
                {
                    "type": "track",
                    "event": "Crash Test",
                    "anonymousId": i.split("-", 1)[0],
                    "messageId": i,
                    "properties": {"n": n},
                }
                for n, i in enumerate(ids)
            ]
        }
    ).encode()


def client(
    port: int, name: str, ledger: Ledger, stop: threading.Event, drain_only: bool = False
) -> None:
    """Send batches until `stop` (or, with drain_only, until no retry is left)."""
    conn: http.client.HTTPConnection | None = None
    headers = {"Content-Type": "application/json", "x-write-key": WRITE_KEY}
    while not stop.is_set():
        if drain_only:
            with ledger.lock:
                if not ledger.retries:
                    break
        ids = ledger.next_batch(name)
        try:
            if conn is None:
                conn = http.client.HTTPConnection(HOST, port, timeout=10)
            conn.request("POST", "/v1/batch", _body(ids), headers)
            response = conn.getresponse()
            reply = response.read()
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            conn = None
            ledger.retry(ids)
            stop.wait(POLL_S)  # the server is gone or going; back off a little
            continue
        with ledger.lock:
            ledger.answers[response.status] += 1
        if response.status == 200:
            answer = json.loads(reply)
            if not answer.get("success") or answer.get("rejected"):
                raise AssertionError(f"unexpected 200 answer: {answer}")
            ledger.ack(ids, "http")
        elif response.status in RETRYABLE:  # as Segment SDKs: retry, same ids
            ledger.retry(ids)
        else:
            raise AssertionError(f"unexpected answer {response.status}: {reply[:300]!r}")
        if response.getheader("connection", "").lower() == "close":
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


WS_TYPE = "crash_ws"  # the WebSocket events' `type`
WS_WINDOW = 8  # batches a WebSocket connection keeps unanswered (the server takes 32)


class WsStream:
    """One WebSocket client: its analytics_id and its batches not yet acknowledged. It
    outlives the rounds: after a reconnect the unacknowledged batches go again, same ids."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.analytics_id: str | None = None
        self.serial = 0
        self.unacked: dict[int, list[str]] = {}  # seq -> event ids
        self.resent = 0  # batches sent again on a later connection

    def new_batch(self, ledger: Ledger) -> int:
        self.serial += 1
        ids = [f"{self.name}-{self.serial}-{i}" for i in range(BATCH_EVENTS)]
        ledger.new_ids(ids)
        self.unacked[self.serial] = ids
        return self.serial

    def message(self, seq: int) -> str:
        events = [{"type": WS_TYPE, "id": i, "payload": {"n": n}}
                  for n, i in enumerate(self.unacked[seq])]
        return json.dumps({"events": events, "seq": seq})


def create_analytics_id(port: int) -> str:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("POST", "/create")
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200:
        raise OSError(f"POST /create answered {response.status}: {body[:200]!r}")
    return json.loads(body)["analytics_id"]


def ws_client(
    port: int, stream: WsStream, ledger: Ledger, stop: threading.Event,
    drain_only: bool = False,
) -> None:
    """Stream batches over `/analytics` with `seq` (at most WS_WINDOW unanswered) until
    `stop`; with drain_only, until every batch is acknowledged. A batch counts as acked
    only on its ack; a lost connection leaves the unanswered ones for the next."""
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    while not stop.is_set():
        if drain_only and not stream.unacked:
            return
        try:
            if stream.analytics_id is None:
                stream.analytics_id = create_analytics_id(port)
            ws = connect(f"ws://{HOST}:{port}/analytics?analytics_id={stream.analytics_id}",
                         open_timeout=10, close_timeout=1, max_size=None)
        except InvalidStatus as exc:
            if exc.response.status_code < 500:  # a refusal that no retry mends
                raise AssertionError(f"handshake refused: {exc}") from exc
            stop.wait(POLL_S)
            continue
        except (OSError, WebSocketException, http.client.HTTPException, ValueError):
            stop.wait(POLL_S)  # the server is gone or starting; back off a little
            continue
        with ledger.lock:
            ledger.ws_connects += 1
        queue = deque(sorted(stream.unacked))  # first what an earlier connection left
        stream.resent += len(queue)
        in_flight: deque[int] = deque()
        try:
            with ws:
                while not stop.is_set():
                    while len(in_flight) < WS_WINDOW:
                        if queue:
                            seq = queue.popleft()
                        elif not drain_only:
                            seq = stream.new_batch(ledger)
                        else:
                            break
                        ws.send(stream.message(seq))
                        in_flight.append(seq)
                    if not in_flight:
                        return  # drained
                    try:
                        reply = json.loads(ws.recv(timeout=0.5))
                    except TimeoutError:
                        continue
                    seq = in_flight.popleft()  # replies come in the order sent
                    kind = reply.get("type")
                    with ledger.lock:
                        ledger.ws_replies[kind if kind == "ack" else
                                          f"{kind}:{reply.get('code')}"] += 1
                    if reply.get("seq") != seq:
                        raise AssertionError(f"reply out of order (expected {seq}): {reply}")
                    if kind == "ack" and reply.get("stored") == BATCH_EVENTS:
                        ledger.ack(stream.unacked.pop(seq), "ws")
                    elif kind == "error" and reply.get("code") == "unavailable":
                        queue.append(seq)  # not stored: send it again later
                    else:
                        raise AssertionError(f"unexpected reply: {reply}")
        except (OSError, WebSocketException):
            pass  # the server went away: the unanswered batches stay in stream.unacked
        stop.wait(POLL_S)


def bound_port(data_dir: Path, pid: int) -> int | None:
    """The port the server process `pid` bound, from the server.json it wrote in
    `data_dir`; None before it has (an older one names another pid)."""
    try:
        info = json.loads((data_dir / "server.json").read_text())
    except (OSError, ValueError):
        return None
    return info["port"] if info.get("pid") == pid else None


class Server:
    """`python -m triolytics serve` on HOST. With `port=0` the server picks its port, and
    `wait_healthy` reads it from the `server.json` this process writes in `data_dir`."""

    def __init__(self, data_dir: Path, log_path: Path, *, write_key: str = WRITE_KEY,
                 port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.port = free_port() if port is None else port
        self.data_dir = data_dir
        self.log_path = log_path
        self.log = open(log_path, "wb")  # closed by kill() or terminate()
        argv = [
            sys.executable,
            "-m",
            "triolytics",
            "serve",
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--data",
            str(data_dir),
            "--write-key",
            write_key,
            *extra,
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("TRIOLYTICS_")}
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self) -> float:
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n"
                    + self.log_path.read_text(errors="replace")
                )
            if self.port == 0 and not self._read_port():
                time.sleep(POLL_S)  # bounded polling of a real subprocess
                continue
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=1)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    return time.monotonic() - start
                conn.close()
            except OSError:
                pass
            time.sleep(POLL_S)  # bounded polling of a real subprocess
        self.kill()
        raise RuntimeError(
            "server did not become healthy:\n" + self.log_path.read_text(errors="replace")
        )

    def _read_port(self) -> bool:
        port = bound_port(self.data_dir, self.proc.pid)
        if port is None:
            return False
        self.port = port
        return True

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"server did not stop within {STOP_TIMEOUT_S}s of SIGTERM") from None
        self.log.close()
        return code


def _run_clients(
    port: int, ledger: Ledger, clients: int, stop: threading.Event, drain_only: bool = False,
    streams: list[WsStream] = (),
) -> tuple[list[threading.Thread], list[BaseException]]:
    """`clients` HTTP client threads and one thread per WebSocket stream."""
    errors: list[BaseException] = []

    def guarded(fn, *args) -> None:
        try:
            fn(port, *args, ledger, stop, drain_only)
        except BaseException as exc:  # reported by the caller
            errors.append(exc)

    threads = [
        threading.Thread(target=guarded, args=(client, f"c{i}"), daemon=True)
        for i in range(clients)
    ] + [threading.Thread(target=guarded, args=(ws_client, s), daemon=True) for s in streams]
    for t in threads:
        t.start()
    return threads, errors


# --- damage injected between a kill -9 and the restart

DAMAGE_KINDS = ("wal-truncate", "wal-corrupt", "journal-tail", "journal-loaded",
                "journal-unloaded")


class JournalRecord(NamedTuple):
    segment: int
    payload_start: int  # byte offset of the record's payload in its segment file
    end: int  # byte offset just past the record
    payload: bytes


def journal_records(journal_dir: Path) -> list[JournalRecord]:
    """Every valid record of every segment, in journal order. The one place that knows the
    journal's format: `Journal(dir, 0).read(n)`, its pure reader for scripts (it reads
    version 2 and version 1 segments; it changes and logs nothing)."""
    from triolytics.core.journal import Journal

    journal = Journal(journal_dir, 0)
    return [JournalRecord(n, end - len(payload), end, payload)
            for n in journal.segments() for _start, end, payload in journal.read(n).records]


def record_ids(payload: bytes) -> set[str]:
    """The message ids of the client events in one journal record's payload."""
    from triolytics.core.rows import decode_part

    part = decode_part(payload)
    rows = part if isinstance(part, list) else part.rows()
    return {r.message_id for r in rows
            if r.message_id and r.type not in ("session_start", "session_end")}


def journal_mark(data_dir: Path) -> tuple[int, int] | None:
    """DuckDB's journal mark (segment, byte offset): read-only, which replays the WAL in
    memory and leaves the files as they are."""
    import duckdb

    con = duckdb.connect(str(data_dir / "events.duckdb"), read_only=True)
    try:
        got = con.execute("SELECT segment, byte_offset FROM journal_mark").fetchone()
    finally:
        con.close()
    return tuple(got) if got else None


def _overwrite(path: Path, offset: int, new: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(new)


def _garble(rng: random.Random, old: bytes) -> bytes:
    """`old` with every byte changed (XOR with a nonzero byte)."""
    return bytes(b ^ rng.randrange(1, 256) for b in old)


def inject(kind: str, data_dir: Path, rng: random.Random, ledger: Ledger) -> dict:
    """Damage the stopped server's files; returns what was done (or why it was skipped).
    For `journal-unloaded`, `lost` holds the acknowledged ids of the destroyed record."""
    entry: dict = {"kind": kind}
    wal = data_dir / "events.duckdb.wal"
    journal_dir = data_dir / "journal"
    if kind in ("wal-truncate", "wal-corrupt"):
        size = wal.stat().st_size if wal.exists() else 0
        entry["wal_bytes"] = size
        if kind == "wal-truncate" and size:
            entry["offset"] = rng.randrange(size)
            os.truncate(wal, entry["offset"])
        elif kind == "wal-corrupt" and size >= 64:
            entry["offset"] = rng.randrange(size // 4, 3 * size // 4 - 16)  # the middle
            _overwrite(wal, entry["offset"], rng.randbytes(16))
        else:
            entry["skipped"] = "no WAL" if not size else "WAL too small"
        return entry
    records = journal_records(journal_dir)
    if kind == "journal-tail":
        segments = sorted(journal_dir.glob("*.journal"))
        if not segments:
            entry["skipped"] = "no journal segment"
            return entry
        garbage = rng.randbytes(rng.randint(1, 300))
        entry.update(segment=segments[-1].name, offset=segments[-1].stat().st_size,
                     bytes=len(garbage))
        with open(segments[-1], "ab") as f:
            f.write(garbage)
        return entry
    mark = journal_mark(data_dir)
    entry["mark"] = list(mark) if mark else None
    if kind == "journal-loaded":
        candidates = [r for r in records if mark and (r.segment, r.end) <= mark]
    else:
        candidates = [r for r in records if not mark or (r.segment, r.end) > mark]
    if not candidates:
        entry["skipped"] = f"no {kind.split('-')[1]} record"
        return entry
    record = rng.choice(candidates)
    ids = record_ids(record.payload)  # decoded before its bytes are destroyed
    at = record.payload_start + rng.randrange(max(1, len(record.payload) - 8))
    length = min(8, record.end - at)
    with open(journal_dir / f"{record.segment:012d}.journal", "rb") as f:
        f.seek(at)
        old = f.read(length)
    _overwrite(journal_dir / f"{record.segment:012d}.journal", at, _garble(rng, old))
    entry.update(segment=record.segment, record=[record.payload_start, record.end],
                 offset=at, bytes=length, record_ids=len(ids),
                 last_segment=record.segment == records[-1].segment)
    if kind == "journal-unloaded":
        with ledger.lock:
            entry["lost"] = sorted(ids & ledger.acked)  # the rest is resent by clients
    return entry


def quarantine_files(data_dir: Path) -> set[str]:
    """What the server has moved aside: <data>/quarantine/ (a DuckDB file or WAL it could
    not open) and <data>/journal/quarantine/ (damaged journal records)."""
    return {f"{q.relative_to(data_dir)}/{p.name}"
            for q in (data_dir / "quarantine", data_dir / "journal" / "quarantine")
            if q.is_dir() for p in q.iterdir()}


def covers(entry: dict, quarantined: list[str]) -> bool:
    """Whether a journal quarantine copy (`journal/quarantine/<segment>-<start>-<end>.bin`)
    holds the overwritten bytes of a journal-loaded/unloaded `entry`."""
    for q in quarantined:
        m = re.fullmatch(r"journal/quarantine/(\d+)-(\d+)-(\d+)\.bin", q)
        if m and int(m[1]) == entry["segment"] and int(m[2]) <= entry["offset"] < int(m[3]):
            return True
    return False


def stored_counts(data_dir: Path) -> dict[str, int]:
    import duckdb

    con = duckdb.connect(str(data_dir / "events.duckdb"), read_only=True)
    try:
        return dict(
            con.execute("SELECT message_id, count(*) FROM events WHERE type NOT IN "
                        "('session_start', 'session_end') GROUP BY message_id").fetchall()
        )
    finally:
        con.close()


def check(
    ledger: Ledger, counts: dict[str, int]
) -> tuple[dict[str, int], list[str], list[str]]:
    """(ids stored more than once, acked ids not stored, stored ids nobody sent)."""
    duplicates = {k: c for k, c in counts.items() if c != 1}
    missing = sorted(ledger.acked - counts.keys())
    unknown = sorted(counts.keys() - ledger.sent)
    return duplicates, missing, unknown


def run(
    rounds: int, data_dir: Path, clients: int = 4, load_s: float = 1.0, seed: int | None = None,
    ws_clients: int = 0, damage_every: int = 0, damage: tuple[str, ...] = DAMAGE_KINDS,
) -> dict:
    """The loop; returns the summary (see `main`)."""
    unknown_kinds = set(damage) - set(DAMAGE_KINDS)
    if unknown_kinds or not damage:
        raise ValueError(f"damage kinds: {sorted(unknown_kinds)}; choose from {DAMAGE_KINDS}")
    rng = random.Random(seed)
    data_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger()
    streams = [WsStream(f"w{i}") for i in range(ws_clients)]
    per_round = []
    restarts = 0
    error: str | None = None
    damage_log: list[dict] = []
    lost: set[str] = set()  # acked ids in journal records the damage destroyed
    awaiting: tuple[dict, set[str]] | None = None  # last damage, quarantine before it

    def restarted(server: Server) -> None:
        """After a start that followed damage: did the server report it?"""
        nonlocal awaiting
        if awaiting is not None:
            entry, before = awaiting
            entry["quarantined"] = sorted(quarantine_files(data_dir) - before)
            if entry["kind"] in ("journal-loaded", "journal-unloaded") and "offset" in entry:
                entry["quarantine_covers_damage"] = covers(entry, entry["quarantined"])
            entry["error_logged"] = " ERROR " in server.log_path.read_text(errors="replace")
            awaiting = None

    started = time.monotonic()
    for n in range(rounds):
        server = Server(data_dir, data_dir.parent / f"server-{n}.log")
        restarts += 1
        try:
            boot_s = server.wait_healthy()
        except RuntimeError as exc:
            error = f"round {n}: {str(exc)[-2000:]}"
            break
        restarted(server)
        before = ledger.acked_count()
        stop = threading.Event()
        threads, errors = _run_clients(server.port, ledger, clients, stop, streams=streams)
        kill_at = time.monotonic() + load_s * rng.uniform(0.5, 1.0)
        # run until the kill moment, and at least until this round acknowledged something
        while (
            (time.monotonic() < kill_at or ledger.acked_count() == before)
            and time.monotonic() < kill_at + 10
            and not errors
        ):
            time.sleep(POLL_S)
        server.kill()
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if errors:
            raise errors[0]
        if damage_every and (n + 1) % damage_every == 0:
            done = sum("skipped" not in e for e in damage_log)  # a skipped kind goes again
            entry = {"round": n, **inject(damage[done % len(damage)], data_dir, rng, ledger)}
            if "lost" in entry:
                ids = entry.pop("lost")
                entry["lost_acked"] = len(ids)
                lost.update(ids)
            damage_log.append(entry)
            awaiting = (entry, quarantine_files(data_dir))
        per_round.append(
            {
                "boot_s": round(boot_s, 3),
                "acked": ledger.acked_count() - before,
                "retry_backlog": len(ledger.retries) + sum(len(s.unacked) for s in streams),
            }
        )
    exit_code = None
    if error is None:
        # the last start: replay, drain the clients' retries, stop cleanly
        server = Server(data_dir, data_dir.parent / "server-final.log")
        restarts += 1
        try:
            server.wait_healthy()
        except RuntimeError as exc:
            error = f"final start: {str(exc)[-2000:]}"
        else:
            restarted(server)
    if error is None:
        stop = threading.Event()
        threads, errors = _run_clients(server.port, ledger, clients, stop, drain_only=True,
                                       streams=streams)
        for t in threads:
            t.join(timeout=60)
        exit_code = server.terminate()
        if errors:
            raise errors[0]
    counts = stored_counts(data_dir) if error is None else {}
    logs = "".join(p.read_text(errors="replace") for p in data_dir.parent.glob("server-*.log"))
    replayed = sum(int(m) for m in re.findall(r"replayed (\d+) journaled rows", logs))
    torn = len(re.findall(r"torn journal tail in ", logs))
    doubled, missing, unexpected = check(ledger, counts) if error is None else ({}, [], [])
    missing = [i for i in missing if i not in lost]
    lost_but_stored = sorted(lost & counts.keys())
    unsent = len(ledger.retries) + sum(len(s.unacked) for s in streams)
    injected = Counter(e["kind"] for e in damage_log if "skipped" not in e)
    # destroyed bytes must be reported: an ERROR line, and the WAL moved to quarantine/ or
    # a copy of the damaged journal range in journal/quarantine/
    unreported = [e["round"] for e in damage_log if "skipped" not in e and (
        e["kind"] == "wal-corrupt" and not (e.get("error_logged") and any(
            q.startswith("quarantine/events.duckdb.wal") for q in e.get("quarantined", ())))
        or e["kind"] == "journal-unloaded" and not (e.get("error_logged")
                                                    and e.get("quarantine_covers_damage")))]
    return {
        "rounds": rounds,
        "clients": {"http": clients, "ws": ws_clients},
        "load_s": load_s,
        "sent": len(ledger.sent),
        "acked": {"http": ledger.acked_by["http"], "ws": ledger.acked_by["ws"],
                  "total": len(ledger.acked)},
        # without a final clean stop there is no DuckDB file to count: null
        "stored": sum(counts.values()) if error is None else None,
        "missing": len(missing) if error is None else None,
        "doubled": len(doubled) if error is None else None,
        "unexpected": len(unexpected) if error is None else None,
        "lost_to_injected_damage": len(lost),
        "lost_but_stored": len(lost_but_stored),
        "examples": {
            "missing": missing[:5],
            "doubled": dict(list(doubled.items())[:5]),
            "unexpected": unexpected[:5],
            "lost_to_injected_damage": sorted(lost)[:5],
            "lost_but_stored": lost_but_stored[:5],
        },
        "damage": {
            "every": damage_every,
            "kinds": list(damage) if damage_every else [],
            "injected": dict(sorted(injected.items())),
            "skipped": dict(sorted(Counter(e["kind"] for e in damage_log
                                           if "skipped" in e).items())),
            "unreported_damage": unreported,
            "log": damage_log,
        },
        "retried_batches": {"http": ledger.retried, "ws": sum(s.resent for s in streams)},
        "answers": {str(k): v for k, v in sorted(ledger.answers.items())},
        "ws_replies": dict(sorted(ledger.ws_replies.items())),
        "ws_connects": ledger.ws_connects,
        "unsent_retries": unsent,
        "replayed_rows": replayed,
        "torn_tails": torn,
        "restarts": restarts,
        "final_exit_code": exit_code,
        "error": error,
        "per_round": per_round,
        "elapsed_s": round(time.monotonic() - started, 2),
        "ok": error is None
        and not doubled
        and not missing
        and not unexpected
        and not lost_but_stored
        and not unreported
        and exit_code == 0
        and not unsent,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("rounds", nargs="?", type=int, default=20)
    p.add_argument("--clients", type=int, default=8, help="HTTP client threads")
    p.add_argument("--ws-clients", type=int, default=4, help="WebSocket client threads")
    p.add_argument("--load-s", type=float, default=2.0, help="load per round before kill -9")
    p.add_argument("--damage-every", type=int, default=0, metavar="K",
                   help="damage the files after every K-th kill -9 (0: never)")
    p.add_argument("--damage", default=",".join(DAMAGE_KINDS), metavar="KINDS",
                   help="comma-separated kinds, taken in turn: " + ", ".join(DAMAGE_KINDS))
    p.add_argument("--seed", type=int)
    p.add_argument("--keep", help="keep the data and logs in this directory")
    args = p.parse_args(argv)
    kinds = tuple(k.strip() for k in args.damage.split(",") if k.strip())
    if set(kinds) - set(DAMAGE_KINDS) or not kinds:
        p.error(f"--damage: choose from {', '.join(DAMAGE_KINDS)}")
    damage = {"damage_every": args.damage_every, "damage": kinds}
    if args.keep:
        base = Path(args.keep)
        base.mkdir(parents=True, exist_ok=True)
        summary = run(args.rounds, base / "data", args.clients, args.load_s, args.seed,
                      ws_clients=args.ws_clients, **damage)
    else:
        with tempfile.TemporaryDirectory(prefix="triolytics-crash-") as tmp:
            summary = run(args.rounds, Path(tmp) / "data", args.clients, args.load_s,
                          args.seed, ws_clients=args.ws_clients, **damage)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
