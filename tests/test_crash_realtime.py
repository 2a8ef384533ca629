"""kill -9 the real server while WebSocket clients stream; acked events survive, once, and
each analytics_id's session resumes with the same session_id.

The server is `bench/crash_loop.py`'s `Server` (a `python -m triolytics serve` subprocess
with fsync always, on a free port). Two trio-websocket connections, one per analytics_id,
pipeline batches with `seq` and event `id`s and record every ack. SIGKILL comes mid-stream.
After the restart each connection does what a client must: resend every unacknowledged
batch (same ids), plus its last acknowledged one (an ack lost with the crash looks the
same to a client), then one new batch; every ack must carry the session_id of before the
crash. A clean SIGTERM stop, then DuckDB: every sent id stored exactly once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import duckdb
import pytest
import trio
from seed_examples import load_bench_script
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url

from triolytics.client import create_analytics_id

BATCH_EVENTS = 20
IN_FLIGHT = 8  # batches a connection keeps unanswered (the server takes 32)
ACKED_BEFORE_KILL = 10  # batches each connection has had acked before the kill...
KILL_JITTER_S = 0.2  # ...then up to this much more streaming
TIME_LIMIT_S = 15.0  # the whole test, server starts and stops included

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")




crash_loop = load_bench_script("crash_loop")


class Stream:
    """One analytics_id's batches: what was sent, what was acked, the sessions seen."""

    def __init__(self, name: str, analytics_id: str) -> None:
        self.name = name
        self.analytics_id = analytics_id
        self.sent: dict[int, list[str]] = {}  # seq -> event ids
        self.acked: dict[int, list[str]] = {}
        self.sessions: list[str] = []  # session_id of each ack, in order
        self.lost: BaseException | None = None  # what ended the streaming connection

    def new_batch(self) -> int:
        seq = len(self.sent)
        self.sent[seq] = [f"{self.name}-{seq}-{n}" for n in range(BATCH_EVENTS)]
        return seq

    def message(self, seq: int) -> str:
        events = [{"type": "crash_test", "id": id_, "payload": {"seq": seq, "n": n}}
                  for n, id_ in enumerate(self.sent[seq])]
        return json.dumps({"events": events, "seq": seq})

    def take_ack(self, message: str | bytes, expected_seq: int) -> None:
        reply = json.loads(message)
        assert reply == {"type": "ack", "seq": expected_seq, "stored": BATCH_EVENTS,
                         "session_id": reply.get("session_id")}, reply
        assert reply["session_id"], reply
        self.acked[expected_seq] = self.sent[expected_seq]
        self.sessions.append(reply["session_id"])

    def url(self, port: int) -> str:
        return f"ws://{crash_loop.HOST}:{port}/analytics?analytics_id={self.analytics_id}"


async def stream_until_lost(port: int, s: Stream) -> None:
    """Pipeline new batches (at most IN_FLIGHT unanswered) until the connection dies."""
    window = trio.Semaphore(IN_FLIGHT)
    order: list[int] = []  # seqs sent on this connection, for the in-order acks

    async def write(ws) -> None:
        while True:
            await window.acquire()
            seq = s.new_batch()
            order.append(seq)
            await ws.send_message(s.message(seq))

    async def read(ws) -> None:
        for n in range(1 << 62):
            message = await ws.get_message()
            s.take_ack(message, order[n])
            window.release()

    async def guarded(loop, ws, scope: trio.CancelScope) -> None:
        try:
            await loop(ws)
        except (ConnectionClosed, trio.BrokenResourceError, OSError) as exc:
            s.lost = exc
        scope.cancel()

    try:
        async with open_websocket_url(s.url(port)) as ws, trio.open_nursery() as nursery:
            nursery.start_soon(guarded, write, ws, nursery.cancel_scope)
            nursery.start_soon(guarded, read, ws, nursery.cancel_scope)
    except (ConnectionClosed, HandshakeError, OSError) as exc:
        s.lost = s.lost or exc


async def resume(port: int, s: Stream) -> list[str]:
    """After the restart: resend the unacked batches and the last acked one (same seq and
    ids), then one new batch. Returns the session_id of each of those acks."""
    unacked = sorted(s.sent.keys() - s.acked.keys())
    resend = [max(s.acked), *unacked, s.new_batch()]
    before = len(s.sessions)
    async with open_websocket_url(s.url(port)) as ws:
        for seq in resend:  # pipelined: all sent before the first ack is read
            await ws.send_message(s.message(seq))
        for seq in resend:
            with trio.fail_after(10):
                s.take_ack(await ws.get_message(), seq)
    return s.sessions[before:]


async def start(data_dir: Path, log: Path):
    server = crash_loop.Server(data_dir, log)
    await trio.to_thread.run_sync(server.wait_healthy)
    return server


def stored_rows(data_dir: Path) -> list[tuple[str, str, str, str]]:
    con = duckdb.connect(str(data_dir / "events.duckdb"), read_only=True)
    try:
        return con.execute("SELECT type, anonymous_id, session_id, message_id FROM events"
                           ).fetchall()
    finally:
        con.close()


async def test_kill_9_mid_websocket_stream_keeps_acked_events_once_and_sessions(tmp_path):
    data = tmp_path / "data"
    began = time.monotonic()
    rng = random.Random(1)
    with trio.fail_after(TIME_LIMIT_S):
        server = await start(data, tmp_path / "server-0.log")
        try:
            base = f"http://{crash_loop.HOST}:{server.port}"
            streams = [Stream(f"c{i}", await create_analytics_id(base)) for i in range(2)]
            async with trio.open_nursery() as nursery:
                for s in streams:
                    nursery.start_soon(stream_until_lost, server.port, s)
                while min(len(s.acked) for s in streams) < ACKED_BEFORE_KILL:
                    assert all(s.lost is None for s in streams), [s.lost for s in streams]
                    await trio.sleep(crash_loop.POLL_S)
                await trio.sleep(rng.uniform(0, KILL_JITTER_S))
                os.kill(server.proc.pid, signal.SIGKILL)  # mid-stream: acks are in flight
            await trio.to_thread.run_sync(server.kill)  # reap it, close its log
        finally:
            if server.proc.poll() is None:
                server.kill()
        assert all(isinstance(s.lost, ConnectionClosed | OSError) for s in streams), \
            [s.lost for s in streams]
        before_kill = {}
        for s in streams:
            assert len(set(s.sessions)) == 1, s.sessions  # one session per analytics_id...
            before_kill[s.name] = s.sessions[0]
        assert len(set(before_kill.values())) == 2  # ...and one per analytics_id

        server = await start(data, tmp_path / "server-1.log")
        try:
            after = {}
            async with trio.open_nursery() as nursery:
                async def resume_one(s: Stream) -> None:
                    after[s.name] = await resume(server.port, s)
                for s in streams:
                    nursery.start_soon(resume_one, s)
        finally:
            code = await trio.to_thread.run_sync(server.terminate)
    logs = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.log")))
    assert code == 0, logs
    for s in streams:  # the session resumed: the new batch's ack has the old session_id
        assert set(after[s.name]) == {before_kill[s.name]}, (s.name, after[s.name])

    rows = stored_rows(data)
    counts: dict[str, int] = {}
    for type_, _, _, message_id in rows:
        if type_ == "crash_test":
            counts[message_id] = counts.get(message_id, 0) + 1
    acked = {i for s in streams for ids in s.acked.values() for i in ids}
    sent = {i for s in streams for ids in s.sent.values() for i in ids}
    assert acked == sent  # after the resends, everything sent was acked
    assert sent == counts.keys(), (sorted(sent - counts.keys())[:5],
                                   sorted(counts.keys() - sent)[:5])
    assert {k: c for k, c in counts.items() if c != 1} == {}
    for s in streams:
        mine = [r for r in rows if r[1] == s.analytics_id]
        assert [r[0] for r in mine].count("session_start") == 1, s.name
        assert "session_end" not in [r[0] for r in mine]
        assert {r[2] for r in mine} == {before_kill[s.name]}
    assert {r[1] for r in rows} == {s.analytics_id for s in streams}
    con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    try:  # arrival order: exactly 1..n; each session sorts and arrives start first
        assert con.execute("SELECT count(*) = count(DISTINCT ingest_seq) AND "
                           "min(ingest_seq) = 1 AND max(ingest_seq) = count(*) FROM events"
                           ).fetchone() == (True,)
        assert set(con.execute(
            "SELECT first(type ORDER BY timestamp, ingest_seq), first(type ORDER BY "
            "ingest_seq) FROM events GROUP BY session_id").fetchall()) == \
            {("session_start", "session_start")}
    finally:
        con.close()
    assert time.monotonic() - began < TIME_LIMIT_S
