"""The real-time API on loopback (port 0): `POST /create`, the WebSocket, sessions.

Level three of the test ladder: `serve` runs in a nursery, trio-websocket clients talk
to it, and once `serve` has returned the DuckDB file is read. Session time is driven by
a mock clock: the server's wall clock is derived from `trio.current_time()`.
"""

from __future__ import annotations

import json
import random
import re
import threading
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import duckdb
import h11
import pytest
import trio
import trio_websocket
from seed_examples import DOC_PAYLOAD
from trio.testing import MockClock
from ws_wire import masked, server_frames

from triolytics.core.config import Config
from triolytics.server.app import serve
from triolytics.storage.store import Store

BASE_NS = 1_706_859_000_000 * 1_000_000  # 2024-02-02T07:30:00Z, the document's first ts
ID_FORMAT = re.compile(r"0\.[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.fixture
def clock():
    """Virtual time that jumps only after 20 ms of real idleness (real sockets, and the
    journal's sync thread, finish their real work before the clock races on)."""
    return MockClock(autojump_threshold=0.02)


def wall_clock(offset_s: float = 0.0):
    return lambda: BASE_NS + int((trio.current_time() + offset_s) * 1e9)


class Server:
    def __init__(self, port: int, data_dir: Path, stop: trio.Event,
                 metrics_port: int | None = None) -> None:
        self.port = port
        self.metrics_port = metrics_port  # of metrics_listen, when set
        self.data_dir = data_dir
        self.stop = stop

    def ws_url(self, analytics_id: str | None) -> str:
        query = f"?analytics_id={analytics_id}" if analytics_id is not None else ""
        return f"ws://127.0.0.1:{self.port}/analytics{query}"

    async def http(self, method: bytes, target: bytes, headers=(), body: bytes = b""):
        """One request on a fresh connection: (status, headers dict, body)."""
        conn = h11.Connection(h11.CLIENT)
        head = [(b"host", b"x"), (b"content-length", b"%d" % len(body)), *headers]
        data = conn.send(h11.Request(method=method, target=target, headers=head))
        data += conn.send(h11.Data(data=body)) if body else b""
        data += conn.send(h11.EndOfMessage())
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(data)
            status, got, out = 0, {}, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif type(event) is h11.Response:
                    status, got = event.status_code, dict(event.headers)
                elif type(event) is h11.Data:
                    out += event.data
                else:
                    return status, got, out

    async def create(self) -> str:
        status, _, body = await self.http(b"POST", b"/create")  # no headers, no body
        assert status == 200, body
        return json.loads(body)["analytics_id"]

    async def stats(self) -> dict:
        token = (self.data_dir / "admin.token").read_text().strip().encode()
        status, _, body = await self.http(b"GET", b"/admin/stats",
                                          [(b"authorization", b"Bearer " + token)])
        assert status == 200
        return json.loads(body)

    async def wait_journaled(self, rows: int) -> None:
        while (await self.stats())["journaled_rows"] < rows:
            await trio.sleep(0.01)


@asynccontextmanager
async def running(data_dir: Path, offset_s: float = 0.0, **overrides):
    config = Config(host="127.0.0.1", port=0, data_dir=str(data_dir), **overrides)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve, config, stop=stop,
                                            clock=wall_clock(offset_s)))
        try:
            yield Server(bound.port, data_dir, stop, bound.metrics_port)
        finally:
            stop.set()


def stored(data_dir: Path) -> list[dict]:
    con = duckdb.connect(str(data_dir / "events.duckdb"), read_only=True)
    try:
        cur = con.execute(
            "SELECT type, channel, anonymous_id, session_id, epoch_ms(timestamp) AS ts, "
            "epoch_ms(original_timestamp) AS original, properties::VARCHAR AS properties, "
            "context::VARCHAR AS context, message_id FROM events "
            "ORDER BY received_at, (type = 'session_start') DESC, timestamp")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


def ws(server: Server, analytics_id: str | None, **kw):
    return trio_websocket.open_websocket_url(server.ws_url(analytics_id), **kw)


async def ack(conn) -> dict:
    with trio.fail_after(10):
        return json.loads(await conn.get_message())


# --- the document's flow, verbatim


async def test_document_flow_create_connect_send(tmp_path):
    async with running(tmp_path) as server:
        status, headers, body = await server.http(b"POST", b"/create")
        created = json.loads(body)
        assert status == 200
        assert ID_FORMAT.fullmatch(created["analytics_id"]), created
        assert created["metadata"] == {"region": "global"}
        async with ws(server, created["analytics_id"]) as conn:
            await conn.send_message(DOC_PAYLOAD)
            with trio.move_on_after(0.3) as quiet:  # it only sends: nothing comes back
                await conn.get_message()
            assert quiet.cancelled_caught
        await server.wait_journaled(3)
    rows = stored(tmp_path)
    assert [r["type"] for r in rows] == ["session_start", "screen_view", "button_click"]
    session = rows[0]["session_id"]
    assert session and all(r["session_id"] == session for r in rows)
    assert all(r["anonymous_id"] == created["analytics_id"] for r in rows)
    assert [r["ts"] for r in rows[1:]] == [1706859000000, 1706859005000]
    assert [json.loads(r["properties"]) for r in rows[1:]] == [
        {"screen_name": "Home"}, {"btn_id": "play_music"}]
    assert json.loads(rows[1]["context"])["ip"] == "127.0.0.1"
    assert {r["channel"] for r in rows} == {"ws"}
    with duckdb.connect(str(tmp_path / "events.duckdb"), read_only=True) as con:
        assert con.execute("SELECT analytics_id FROM analytics_ids").fetchall() == [
            (created["analytics_id"],)]


async def test_ts_defaults_to_receive_time(tmp_path, clock):
    async with running(tmp_path) as server:
        aid = await server.create()
        await trio.sleep(5)
        async with ws(server, aid) as conn:
            before_ms = wall_clock()() // 1_000_000
            await conn.send_message('{"events":[{"type":"tick"}],"seq":1}')
            assert (await ack(conn))["type"] == "ack"
            after_ms = wall_clock()() // 1_000_000
    (start, tick) = stored(tmp_path)
    assert tick["original"] is None
    assert before_ms <= tick["ts"] <= after_ms


# --- acknowledgements and refusals (opt-in, with seq)


async def test_acks_come_in_order_and_a_bad_batch_is_refused_alone(tmp_path):
    async with running(tmp_path) as server:
        aid = await server.create()
        async with ws(server, aid) as conn:
            for seq in range(5):  # pipelined: no waiting between batches
                events = [{"type": "e", "payload": {"seq": seq, "i": i}} for i in range(3)]
                await conn.send_message(json.dumps({"events": events, "seq": seq}))
            await conn.send_message(b'{"events":[{"type":"ok"},{"type":7}],"seq":5}')
            await conn.send_message('{"events":[{"type":"after"}],"seq":6}')
            answers = [await ack(conn) for _ in range(7)]
    assert [a["seq"] for a in answers] == list(range(7))
    assert [a["type"] for a in answers] == ["ack"] * 5 + ["error", "ack"]
    assert all(a["stored"] == 3 for a in answers[:5])
    assert len({a["session_id"] for a in answers if a["type"] == "ack"}) == 1
    assert answers[5]["code"] == "invalid_event"
    assert answers[5]["field"] == "$.events[1].type"
    types = [r["type"] for r in stored(tmp_path)]
    assert types.count("e") == 15 and types.count("after") == 1 and "ok" not in types


async def test_event_ids_are_stored_once_across_reconnects(tmp_path):
    async with running(tmp_path) as server:
        aid = await server.create()
        batch = json.dumps({"events": [{"type": "e", "id": "ev-1"}, {"type": "e", "id": "ev-2"}],
                            "seq": 1})
        async with ws(server, aid) as conn:
            await conn.send_message(batch)
            first = await ack(conn)
        async with ws(server, aid) as conn:  # a resend after a reconnect
            await conn.send_message(batch)
            again = await ack(conn)
    assert first["stored"] == again["stored"] == 2
    assert first["session_id"] == again["session_id"]
    ids = [r["message_id"] for r in stored(tmp_path) if r["type"] == "e"]
    assert sorted(ids) == ["ev-1", "ev-2"]


# --- refusals at the handshake, as plain HTTP


async def test_handshake_refusals_are_http_answers(tmp_path):
    async with running(tmp_path, ws_origins=["https://app.example"]) as server:
        aid = await server.create()
        cases = {
            None: 400,
            "not-an-id": 400,
            "0.00000000-0000-4000-8000-000000000000": 403,
            "1" + aid[1:]: 403,  # another shard's
        }
        for analytics_id, status in cases.items():
            with pytest.raises(trio_websocket.ConnectionRejected) as refused:
                async with ws(server, analytics_id):
                    pass
            assert refused.value.status_code == status, analytics_id
            assert json.loads(refused.value.body)["error"]["code"] in {
                "bad_request", "unknown_analytics_id"}
        with pytest.raises(trio_websocket.ConnectionRejected) as refused:
            async with ws(server, aid, extra_headers=[(b"origin", b"https://evil.example")]):
                pass
        assert refused.value.status_code == 403
        async with ws(server, aid, extra_headers=[(b"origin", b"https://app.example")]):
            pass
        status, headers, _ = await server.http(b"GET", ("/analytics?analytics_id=" + aid).encode())
        assert status == 426 and headers[b"upgrade"] == b"websocket"


# --- protocol faults close the connection


@pytest.mark.parametrize("message, code", [
    (b"\xff not json", 1007),
    ('{"events": [{"type": "x"}], "seq": "one"}', 1007),
    ('{"events": [{"type": "session_start"}]}', 1007),  # refused, and no seq to say so
    (json.dumps({"events": [{"type": "x"}] * 11}), 1008),
    ('{"events": [{"type": "' + "x" * 3000 + '"}]}', 1009),
])
async def test_protocol_faults_close_with_their_code(tmp_path, message, code):
    async with running(tmp_path, ws_max_batch_events=10, ws_max_message_bytes=2048) as server:
        aid = await server.create()
        async with ws(server, aid) as conn:
            await conn.send_message(message)
            with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await conn.get_message()
    assert closed.value.reason.code == code
    assert [r["type"] for r in stored(tmp_path)] == []


# --- sessions


async def test_sessions_expire_resume_and_are_shared(tmp_path, clock):
    async with running(tmp_path, session_timeout_s=60) as server:
        aid = await server.create()
        async with ws(server, aid) as a, ws(server, aid) as b:  # two connections, one key
            await a.send_message('{"events":[{"type":"a1"}],"seq":1}')
            first = (await ack(a))["session_id"]
            await trio.sleep(30)
            await b.send_message('{"events":[{"type":"b1"}],"seq":1}')
            assert (await ack(b))["session_id"] == first
        await trio.sleep(50)  # 50 s after the last event: still alive
        async with ws(server, aid) as c:  # a reconnect resumes it
            await c.send_message('{"events":[{"type":"c1"},{"type":"c2"}],"seq":1}')
            assert (await ack(c))["session_id"] == first
        await trio.sleep(61)  # now it times out
        await server.wait_journaled(6)
        async with ws(server, aid) as d:
            await d.send_message('{"events":[{"type":"d1"}],"seq":1}')
            second = (await ack(d))["session_id"]
        assert second != first
    rows = stored(tmp_path)
    assert [r["type"] for r in rows] == ["session_start", "a1", "b1", "c1", "c2",
                                          "session_end", "session_start", "d1"]
    a1, c2, end = rows[1], rows[4], rows[5]  # events without ts: ts = receive time
    assert end["session_id"] == first
    assert end["ts"] == c2["ts"] + 60_000  # last activity + timeout
    assert json.loads(end["properties"]) == {"duration_ms": c2["ts"] - a1["ts"],
                                             "event_count": 4}
    assert c2["ts"] - a1["ts"] >= 80_000  # (30 s + 50 s of virtual time between them)


async def test_http_events_are_sessionized_by_anonymous_id(tmp_path, clock):
    async with running(tmp_path, write_keys=["wk_1"], session_timeout_s=60) as server:
        def capture(anon: str):
            body = json.dumps({"type": "track", "event": "E", "anonymousId": anon}).encode()
            return server.http(b"POST", b"/v1/capture", [(b"x-write-key", b"wk_1")], body)
        for anon in ("a", "b", "a"):
            status, _, _ = await capture(anon)
            assert status == 201
        await trio.sleep(120)
        await server.wait_journaled(3 + 2 + 2)
    rows = stored(tmp_path)
    by_anon = {}
    for r in rows:
        by_anon.setdefault(r["anonymous_id"], []).append((r["type"], r["session_id"]))
    assert [t for t, _ in by_anon["a"]] == ["session_start", "track", "track", "session_end"]
    assert len({s for _, s in by_anon["a"]}) == 1
    assert {s for _, s in by_anon["a"]} != {s for _, s in by_anon["b"]}
    assert {r["channel"] for r in rows} == {"http"}


async def test_sessions_resume_after_a_restart_and_end_late_after_downtime(tmp_path, clock):
    async with running(tmp_path, session_timeout_s=60) as server:
        aid, other = await server.create(), await server.create()
        async with ws(server, aid) as conn, ws(server, other) as conn2:
            await conn.send_message('{"events":[{"type":"before"}],"seq":1}')
            first = (await ack(conn))["session_id"]
            await conn2.send_message('{"events":[{"type":"other"}],"seq":1}')
            other_session = (await ack(conn2))["session_id"]
    # A restart 30 s later (the clock restarts at 0: shift the wall clock on).
    async with running(tmp_path, offset_s=30, session_timeout_s=60) as server:
        async with ws(server, aid) as conn:
            await conn.send_message('{"events":[{"type":"after"}],"seq":1}')
            assert (await ack(conn))["session_id"] == first
    # A restart after an hour down: both sessions end at start-up, stamped in the past.
    async with running(tmp_path, offset_s=3600, session_timeout_s=60) as server:
        await server.wait_journaled(2)
    rows = stored(tmp_path)
    ends = {r["session_id"]: r for r in rows if r["type"] == "session_end"}
    assert set(ends) == {first, other_session}
    after = next(r for r in rows if r["type"] == "after")
    assert abs(ends[first]["ts"] - (after["ts"] + 60_000)) < 50
    assert json.loads(ends[first]["properties"])["event_count"] == 2


# --- POST /create


async def test_create_is_rate_limited_per_ip_and_speaks_cors(tmp_path, clock):
    async with running(tmp_path, create_burst=2, create_rate_per_min=6) as server:
        got = [await server.http(b"POST", b"/create") for _ in range(3)]
        assert [s for s, _, _ in got] == [200, 200, 429]
        assert got[2][1][b"retry-after"] == b"10"
        await trio.sleep(10)
        status, headers, _ = await server.http(b"POST", b"/create",
                                               [(b"origin", b"https://app.example")])
        assert status == 200
        assert headers[b"access-control-allow-origin"] == b"https://app.example"
        ids = {json.loads(b)["analytics_id"] for s, _, b in got if s == 200}
        assert len(ids) == 2


# --- bounds and timeouts


async def test_a_full_writer_stops_reading_and_nothing_is_refused(tmp_path, monkeypatch):
    """While DuckDB loads are held, the unloaded backlog fills: the server stops reading
    the socket (no 503 for a WebSocket, no error), then catches up once loads resume."""
    gate = threading.Event()
    real_load = Store.load

    def held_load(self, rows, position, *parts):
        gate.wait(30)
        return real_load(self, rows, position, *parts)

    monkeypatch.setattr(Store, "load", held_load)
    async with running(tmp_path, max_unloaded_rows=50, max_pending_rows=20,
                       load_batch_rows=10) as server:
        aid = await server.create()
        try:
            async with ws(server, aid) as conn:
                for seq in range(20):
                    events = [{"type": "e", "id": f"{seq}-{i}"} for i in range(10)]
                    await conn.send_message(json.dumps({"events": events, "seq": seq}))
                answered = []
                with trio.move_on_after(1.0):
                    while True:
                        answered.append(await ack(conn))
                assert len(answered) < 20  # the backlog bound held the rest back
                stats = await server.stats()
                # Bounded: what was journaled before the bound was seen, not all 200.
                assert stats["unloaded_rows"] + stats["pending_rows"] < 200, stats
                gate.set()
                while len(answered) < 20:
                    answered.append(await ack(conn))
        finally:
            gate.set()
    assert [a["type"] for a in answered] == ["ack"] * 20
    assert [a["seq"] for a in answered] == list(range(20))
    assert sum(r["type"] == "e" for r in stored(tmp_path)) == 200


async def test_idle_connection_is_closed_and_a_silent_peer_is_dropped(tmp_path, clock):
    async with running(tmp_path, ws_ping_interval_s=10, ws_pong_timeout_s=5,
                       ws_idle_timeout_s=30) as server:
        aid = await server.create()
        start = trio.current_time()
        async with ws(server, aid) as conn:  # answers pings (trio-websocket does)
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                await conn.get_message()
        assert closed.value.reason.code == 1000
        assert 30 <= trio.current_time() - start < 31  # the idle timeout is a timer of its own
        # A peer that completed the handshake, then went silent (answers no ping).
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(
            f"GET /analytics?analytics_id={aid} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        start = trio.current_time()
        got = b""
        with trio.fail_after(60):
            while chunk := await stream.receive_some(65536):
                got += chunk
        assert got.startswith(b"HTTP/1.1 101 ")
        assert 15 <= trio.current_time() - start < 20  # ping interval + pong timeout
        await stream.aclose()


async def test_shutdown_answers_what_it_read_then_closes_1001(tmp_path):
    stop_at = trio.Event()
    async with running(tmp_path) as server:
        aid = await server.create()
        async with ws(server, aid) as conn:
            for seq in range(5):
                await conn.send_message(json.dumps({"events": [{"type": "e"}], "seq": seq}))
            first = await ack(conn)
            stop_at.set()
            server.stop.set()  # SIGINT, as far as serve is concerned
            answers = [first]
            with pytest.raises(trio_websocket.ConnectionClosed) as closed:
                while True:
                    answers.append(await ack(conn))
    assert closed.value.reason.code == 1001
    assert [a["seq"] for a in answers] == list(range(len(answers)))
    stored_events = sum(r["type"] == "e" for r in stored(tmp_path))
    assert stored_events >= len(answers)  # every acked batch is stored


async def test_a_bug_in_one_connection_closes_only_that_connection(tmp_path, monkeypatch):
    from triolytics.core.realtime import Realtime
    real_batch = Realtime.batch

    def batch(self, data, intake):
        if b"boom" in (data if isinstance(data, bytes) else data.encode()):
            raise RuntimeError("injected bug")
        return real_batch(self, data, intake)

    monkeypatch.setattr(Realtime, "batch", batch)
    async with running(tmp_path) as server:
        aid = await server.create()
        async with ws(server, aid) as bad, ws(server, aid) as good:
            await bad.send_message('{"events":[{"type":"boom"}],"seq":1}')
            with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed):
                await bad.get_message()
            await good.send_message('{"events":[{"type":"fine"}],"seq":1}')
            assert (await ack(good))["type"] == "ack"
        status, _, _ = await server.http(b"GET", b"/healthz")
        assert status == 200
    assert [r["type"] for r in stored(tmp_path)] == ["session_start", "fine"]


@pytest.mark.parametrize("with_seq", [True, False])
async def test_a_journal_failure_is_an_error_reply_or_1011(tmp_path, monkeypatch, with_seq):
    from triolytics.core.journal import Journal, JournalError

    def broken(self, payloads):
        raise JournalError("disk full (injected)")

    async with running(tmp_path) as server:
        aid = await server.create()
        async with ws(server, aid) as conn:
            monkeypatch.setattr(Journal, "append", broken)
            for seq in range(40):  # more than ws_max_in_flight: the reader must not hang
                message = {"events": [{"type": "e"}]} | ({"seq": seq} if with_seq else {})
                try:
                    await conn.send_message(json.dumps(message))
                except trio_websocket.ConnectionClosed:
                    break
            if with_seq:
                answers = [await ack(conn) for _ in range(40)]
                assert {a["type"] for a in answers} == {"error"}
                assert {a["code"] for a in answers} == {"unavailable"}
            else:
                with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed) as c:
                    while True:
                        await conn.get_message()
                assert c.value.reason.code == 1011
            monkeypatch.undo()
    assert [r["type"] for r in stored(tmp_path)] == []


# --- the frame layer, by hand: the handshake's checks, fragments, pings, closes


async def raw_upgrade(server: Server, analytics_id: str, headers: dict | None = None):
    """A TCP stream past a handshake: (stream, status line, head, bytes after it)."""
    h = {"Host": "x", "Upgrade": "websocket", "Connection": "keep-alive, Upgrade",
         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version": "13",
         **(headers or {})}
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    head = f"GET /analytics?analytics_id={analytics_id} HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n" for k, v in h.items() if v is not None) + "\r\n"
    await stream.send_all(head.encode())
    got = b""
    with trio.fail_after(10):
        while b"\r\n\r\n" not in got:
            got += await stream.receive_some(65536)
    head, _, rest = got.partition(b"\r\n\r\n")
    return stream, head.split(b"\r\n")[0], head, rest


async def read_frames(stream, buf: bytes, count: int) -> list[tuple[int, bytes]]:
    with trio.fail_after(10):
        while len(frames := server_frames(buf)) < count:
            buf += await stream.receive_some(65536)
    return frames


async def test_the_opening_handshake_is_checked_as_rfc_6455_says(tmp_path):
    async with running(tmp_path) as server:
        aid = await server.create()
        stream, status, head, _ = await raw_upgrade(server, aid)
        assert status == b"HTTP/1.1 101 Switching Protocols"
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head  # RFC's example
        await stream.aclose()
        refusals = [
            ({"Sec-WebSocket-Version": "8"}, b"426", b"sec-websocket-version: 13"),
            ({"Sec-WebSocket-Key": "c2hvcnQ="}, b"400", b"Sec-WebSocket-Key"),
            ({"Sec-WebSocket-Key": None}, b"400", b"Sec-WebSocket-Key"),
            ({"Connection": "keep-alive"}, b"400", b"Connection: Upgrade"),
        ]
        for headers, code, says in refusals:
            stream, status, head, body = await raw_upgrade(server, aid, headers)
            with trio.fail_after(10):
                while chunk := await stream.receive_some(65536):
                    body += chunk
            await stream.aclose()
            assert status.split(b" ")[1] == code, headers
            assert says.lower() in (head + body).lower(), (headers, head, body)


async def test_fragments_pings_and_answers_in_one_read(tmp_path):
    async with running(tmp_path) as server:
        aid = await server.create()
        stream, status, _, rest = await raw_upgrade(server, aid)
        first = json.dumps({"events": [{"type": "e"}] * 3, "seq": 1}).encode()
        second = json.dumps({"events": [{"type": "e"}], "seq": 2}).encode()
        await stream.send_all(
            masked(0x01, first[:10]) + masked(0x89, b"hello")
            + masked(0x00, first[10:20]) + masked(0x80, first[20:])
            + masked(0x82, second))  # (a binary message holds a batch as well)
        frames = await read_frames(stream, rest, 3)
        await stream.aclose()
    assert frames[0] == (0xA, b"hello")  # the pong comes first: no batch was durable yet
    acks = [json.loads(p) for op, p in frames[1:]]
    assert [(a["seq"], a["stored"]) for a in acks] == [(1, 3), (2, 1)]
    assert sum(r["type"] == "e" for r in stored(tmp_path)) == 4


async def test_a_close_of_ours_comes_after_the_answers_owed(tmp_path):
    async with running(tmp_path) as server:
        aid = await server.create()
        stream, _, _, rest = await raw_upgrade(server, aid)
        batch = json.dumps({"events": [{"type": "e"}], "seq": 7}).encode()
        await stream.send_all(masked(0x81, batch) + masked(0x81, b"\xff\xfe bad"))
        frames = await read_frames(stream, rest, 2)
        await stream.send_all(masked(0x88, frames[1][1][:2]))  # finish the handshake
        with trio.fail_after(10):
            while await stream.receive_some(65536):
                pass  # the server closes the TCP connection
        await stream.aclose()
    assert json.loads(frames[0][1])["seq"] == 7
    assert frames[1][0] == 0x8 and int.from_bytes(frames[1][1][:2], "big") == 1007
    assert sum(r["type"] == "e" for r in stored(tmp_path)) == 1


async def test_garbage_after_the_handshake_costs_that_connection_only(tmp_path, caplog):
    rng = random.Random(7)
    garbage = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
               for _ in range(20)]
    garbage += [masked(0x81, b'{"events": [{"type": "e"}], "seq": 1}')[:-3] + b"\x81"]
    async with running(tmp_path) as server:
        aid = await server.create()
        for data in garbage:
            stream, status, _, _ = await raw_upgrade(server, aid)
            assert status.startswith(b"HTTP/1.1 101")
            await stream.send_all(data)
            with trio.move_on_after(0.5):  # closed by the server, or still waiting
                while await stream.receive_some(65536):
                    pass
            await stream.aclose()
        async with ws(server, aid) as conn:  # the server is still fine
            await conn.send_message(json.dumps({"events": [{"type": "e"}], "seq": 1}))
            assert (await ack(conn))["stored"] == 1
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# --- a session's rows sort as a session, whatever the clients' clocks say

YEARS_LATER_S = 2.5 * 365 * 86_400  # the server's clock in 2026; the document's ts is 2024


def session_order(data_dir: Path, session_id: str) -> list[dict]:
    """The session's rows as `ORDER BY timestamp, ingest_seq` gives them."""
    con = duckdb.connect(str(data_dir / "events.duckdb"), read_only=True)
    try:
        cur = con.execute(
            "SELECT type, epoch_ms(timestamp) AS ts, epoch_ms(original_timestamp) AS original,"
            " ingest_seq FROM events WHERE session_id = ? ORDER BY timestamp, ingest_seq",
            [session_id])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


async def test_the_document_flow_years_later_sorts_as_a_session_across_a_restart(tmp_path,
                                                                                   clock):
    skew = 10 * 365 * 86_400  # max_future_skew_s: the "ahead" clock (2030) is kept
    async with running(tmp_path, YEARS_LATER_S, session_timeout_s=60,
                       max_future_skew_s=skew) as server:
        aid = await server.create()
        async with ws(server, aid) as conn:
            await conn.send_message(DOC_PAYLOAD)  # verbatim: no seq, no answer
            await conn.send_message('{"events":[{"type":"offline","ts":1600000000000}],'
                                    '"seq":1}')  # buffered on the device since 2020
            session = (await ack(conn))["session_id"]
        await server.wait_journaled(4)
    async with running(tmp_path, YEARS_LATER_S + 10, session_timeout_s=60,
                       max_future_skew_s=skew) as server:
        async with ws(server, aid) as conn:  # resumed after the restart, with its stamps
            await conn.send_message('{"events":[{"type":"older","ts":1500000000000},'
                                    '{"type":"ahead","ts":1900000000000}],"seq":1}')
            assert (await ack(conn))["session_id"] == session
        await trio.sleep(61)  # idle past the timeout: the reaper ends it
        await server.wait_journaled(3)
    rows = session_order(tmp_path, session)
    assert [r["type"] for r in rows] == ["session_start", "screen_view", "offline", "older",
                                          "button_click", "ahead", "session_end"]
    start = rows[0]["ts"]
    assert start == 1706859000000  # the opening batch's earliest ts, not receipt (2026)
    by_type = {r["type"]: r for r in rows}
    assert (by_type["offline"]["ts"], by_type["offline"]["original"]) == (start,
                                                                          1600000000000)
    assert (by_type["older"]["ts"], by_type["older"]["original"]) == (start, 1500000000000)
    assert by_type["session_end"]["ts"] == by_type["ahead"]["ts"] == 1900000000000
    assert sorted(r["ingest_seq"] for r in rows) == list(range(1, 8))  # arrival, no gaps
    assert [r["type"] for r in sorted(rows, key=lambda r: r["ingest_seq"])] == [
        "session_start", "screen_view", "button_click", "offline", "older", "ahead",
        "session_end"]


async def test_http_sessions_sort_as_sessions_through_the_server(tmp_path, clock):
    async with running(tmp_path, YEARS_LATER_S, write_keys=["wk_1"],
                       session_timeout_s=60) as server:
        async def send(path: bytes, body: dict) -> int:
            status, _, _ = await server.http(b"POST", path, [(b"x-write-key", b"wk_1")],
                                             json.dumps(body).encode())
            return status
        event = {"type": "track", "anonymousId": "a"}
        assert await send(b"/v1/capture", {**event, "event": "first",
                                           "timestamp": "2024-02-02T07:30:00Z"}) == 201
        assert await send(b"/v1/batch", {"batch": [
            {**event, "event": "late", "timestamp": "2023-01-01T00:00:00Z"},
            {**event, "event": "ahead", "timestamp": "2031-01-01T00:00:00Z"}]}) == 200
        await trio.sleep(61)
        await server.wait_journaled(5)
    (session,) = {r["session_id"] for r in stored(tmp_path)}
    rows = session_order(tmp_path, session)
    assert [r["type"] for r in rows] == ["session_start", "track", "track", "track",
                                          "session_end"]
    assert rows[0]["ts"] == rows[1]["ts"] == rows[2]["ts"] == 1706859000000
    assert rows[2]["original"] == 1672531200000  # "late", stored at the session's start


async def test_times_in_the_future_are_stored_at_receipt_and_flagged_in_duckdb(tmp_path,
                                                                               clock):
    async with running(tmp_path, write_keys=["wk_1"]) as server:
        aid = await server.create()
        async with ws(server, aid) as conn:
            await conn.send_message('{"events":[{"type":"ok","ts":1700000000000},'
                                    '{"type":"ahead","ts":4102444800000}],"seq":1}')  # 2100
            assert (await ack(conn))["type"] == "ack"
        status, _, _ = await server.http(b"POST", b"/v1/batch", [(b"x-write-key", b"wk_1")],
                                         json.dumps({"batch": [
                                             {"type": "track", "event": "ahead_http",
                                              "anonymousId": "a",
                                              "timestamp": "2100-01-01T00:00:00Z"},
                                             {"type": "track", "event": "ok_http",
                                              "anonymousId": "a", "messageId": "m" * 101},
                                         ]}).encode())
        assert status == 200
        await server.wait_journaled(5)
    con = duckdb.connect(str(tmp_path / "events.duckdb"), read_only=True)
    try:
        got = con.execute(
            "SELECT coalesce(event, type), epoch_ms(timestamp) = epoch_ms(received_at),"
            " epoch_ms(original_timestamp), context->>'timestamp_adjusted' FROM events"
            " WHERE type NOT LIKE 'session_%' ORDER BY ingest_seq").fetchall()
    finally:
        con.close()
    assert got == [("ok", False, 1700000000000, None), ("ahead", True, 4102444800000, "true"),
                   ("ahead_http", True, 4102444800000, "true")]  # (ok_http: its id too long)
