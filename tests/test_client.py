"""The real-time client against in-test fakes of docs/websocket.md on loopback (port 0).

`FakeServer` is the WebSocket side in a few lines of trio-websocket: it acks every batch
in order, refuses batches holding an event of type `bad` with an error reply, stores
events by `id` (so a resend is visibly deduplicated), and can be told to refuse the next
handshakes, to hold its replies, or to drop a connection after K frames without
answering the K-th. `/create` is a tiny h11 server. Backoff and timeouts run on
`autojump_clock`.
"""

from __future__ import annotations

import json
import random
from functools import partial

import h11
import pytest
import trio
from trio_websocket import ConnectionClosed, serve_websocket

from triolytics.client import (
    BufferFull,
    ClientError,
    RealtimeClient,
    Undelivered,
    backoff_delay,
    create_analytics_id,
    open_client,
    ws_url,
)

AID = "0.8d6f1c2e-5b7a-4c39-9e01-3f2a7b6c5d4e"
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


class FakeServer:
    def __init__(self) -> None:
        self.port = 0
        self.conns: list[list[dict]] = []  # frames received, per connection, resends included
        self.stored: dict[str, dict] = {}  # event id -> event: the dedup the real server does
        self.paths: list[str] = []
        self.attempts: list[float] = []  # trio.current_time() of each handshake
        self.close_codes: list[int] = []  # codes the client closed with
        self.reject: list[int] = []  # statuses for the next handshakes, in order
        self.drop_after: list[int] = []  # per connection: close after K frames, K-th unanswered
        self.misnumber = 0  # replies to answer with a wrong seq
        self.hold = False  # keep replies until `release`
        self.held: list[bytes] = []  # of the current connection
        self.ws = None

    @property
    def frames(self) -> list[dict]:
        return [frame for conn in self.conns for frame in conn]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handler(self, request) -> None:
        self.attempts.append(trio.current_time())
        self.paths.append(request.path)
        if self.reject:
            status = self.reject.pop(0)
            code = "unknown_analytics_id" if status == 403 else "unavailable"
            body = json.dumps({"error": {"code": code, "message": "no"}}).encode()
            await request.reject(status, body=body)
            return
        self.ws = ws = await request.accept()
        self.held = []  # replies held for a dropped connection are never sent
        frames: list[dict] = []
        self.conns.append(frames)
        drop = self.drop_after.pop(0) if self.drop_after else None
        try:
            while True:
                frames.append(frame := json.loads(await ws.get_message()))
                reply = self.store(frame)
                if len(frames) == drop:
                    await ws.aclose(1011)
                    return
                if self.hold:
                    self.held.append(reply)
                else:
                    await ws.send_message(reply)
        except ConnectionClosed as exc:
            self.close_codes.append(exc.reason.code)

    def store(self, frame: dict) -> bytes:
        events = frame["events"]
        bad = [i for i, e in enumerate(events) if e["type"] == "bad"]
        if bad:
            return json.dumps({"type": "error", "seq": frame["seq"], "code": "invalid_event",
                               "message": "bad type", "field": f"$.events[{bad[0]}].type"}
                              ).encode()
        for event in events:
            self.stored.setdefault(event["id"], event)
        seq = frame["seq"] + (self.misnumber > 0) * 100
        self.misnumber -= 1
        return json.dumps({"type": "ack", "seq": seq, "stored": len(events),
                           "session_id": "sess-1"}).encode()

    async def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for reply in held:
            await self.ws.send_message(reply)


@pytest.fixture
async def fake(nursery):
    server = FakeServer()
    listener = await nursery.start(serve_websocket, server.handler, "127.0.0.1", 0, None)
    server.port = listener.port
    return server


async def until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.005)


def ids_of(frames: list[dict]) -> list[str]:
    return [event["id"] for frame in frames for event in frame["events"]]


# --- pure parts


def test_ws_url():
    assert ws_url("http://h:8000", AID) == f"ws://h:8000/analytics?analytics_id={AID}"
    assert ws_url("https://h/p/", "a b") == "wss://h/p/analytics?analytics_id=a%20b"
    with pytest.raises(ValueError):
        ws_url("ftp://h", AID)


def test_backoff_delay_doubles_caps_and_jitters():
    rng = random.Random(1)
    for failures, ceiling in [(1, 0.1), (2, 0.2), (3, 0.4), (9, 25.6), (10, 30.0), (500, 30.0)]:
        delays = [backoff_delay(failures, 0.1, 30.0, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (failures, delays)
        assert len(set(delays)) > 1  # jittered


def test_send_checks_events_before_buffering():
    client = RealtimeClient("http://127.0.0.1:1", AID)
    for args, error in [(("",), ValueError), (("x" * 201,), ValueError),
                        (("session_start",), ValueError), ((7,), ValueError),
                        (("click", [1]), TypeError), (("click", None, 1.5), TypeError)]:
        with pytest.raises(error):
            client.send(*args)
    with pytest.raises(ValueError):
        client.send_many([{"type": "ok"}, {"type": "session_end"}])
    assert client.stats().buffered == 0
    a, b = client.send("click"), client.send("click", {"k": 1}, ts=5)
    assert a != b and a.endswith("-0") and b.endswith("-1")
    assert client.stats().buffered == 2


def test_buffer_full_adds_nothing():
    client = RealtimeClient("http://127.0.0.1:1", AID, max_buffered_events=5)
    for _ in range(3):
        client.send("click")
    with pytest.raises(BufferFull):
        client.send_many([{"type": "a"}, {"type": "b"}, {"type": "c"}])
    assert client.stats().buffered == 3
    client.send_many([{"type": "a"}, {"type": "b"}])
    with pytest.raises(BufferFull):
        client.send("click")
    assert client.stats().buffered == 5


# --- against the fake server


async def test_batches_carry_increasing_seq_and_acks_settle_them(fake):
    async with open_client(fake.base_url, AID, max_batch_events=10) as client:
        sent = [client.send("screen_view", {"n": i}, ts=1_706_859_000_000 + i)
                for i in range(35)]
        await client.flush(timeout=5)
        stats = client.stats()
        assert client.session_id == "sess-1"
    assert fake.paths == [f"/analytics?analytics_id={AID}"]
    assert [f["seq"] for f in fake.frames] == [0, 1, 2, 3]
    assert [len(f["events"]) for f in fake.frames] == [10, 10, 10, 5]
    assert ids_of(fake.frames) == sent and len(set(sent)) == 35
    assert fake.frames[3]["events"][4] == {"type": "screen_view", "ts": 1_706_859_000_034,
                                           "id": sent[34], "payload": {"n": 34}}
    assert (stats.frames_sent, stats.events_acked, stats.in_flight, stats.buffered) == \
        (4, 35, 0, 0)
    assert fake.close_codes == [1000]


async def test_send_many_keeps_given_ids_and_times(fake):
    async with open_client(fake.base_url, AID) as client:
        client.send_many([{"type": "a", "id": "mine-1", "ts": 3},
                          {"type": "b", "payload": {"x": [1, 2]}}])
        await client.flush(timeout=5)
    first, second = fake.frames[0]["events"]
    assert first == {"type": "a", "ts": 3, "id": "mine-1"}
    assert second["payload"] == {"x": [1, 2]} and second["ts"] > 1_700_000_000_000


async def test_at_most_max_in_flight_frames_unanswered(fake):
    fake.hold = True
    async with open_client(fake.base_url, AID, max_batch_events=1, max_in_flight=3) as client:
        for i in range(10):
            client.send("click", {"n": i})
        await until(lambda: len(fake.frames) == 3)
        await trio.sleep(0.05)
        assert len(fake.frames) == 3
        stats = client.stats()
        assert (stats.in_flight, stats.buffered, stats.events_acked) == (3, 7, 0)
        await fake.release()
        await client.flush(timeout=5)
        assert client.stats().events_acked == 10
    assert [f["seq"] for f in fake.frames] == list(range(10))


async def test_buffer_frees_as_acks_arrive(fake):
    fake.hold = True
    async with open_client(fake.base_url, AID, max_buffered_events=4) as client:
        for _ in range(4):
            client.send("click")
        with pytest.raises(BufferFull):
            client.send("click")
        await until(lambda: len(fake.held) == 1)
        with pytest.raises(BufferFull):  # framed and sent still counts until answered
            client.send("click")
        await fake.release()
        await client.flush(timeout=5)
        client.send("click")
        await client.flush(timeout=5)
    assert len(fake.stored) == 5


async def test_reconnect_resends_unanswered_frames_with_the_same_ids(fake):
    fake.drop_after = [3]
    async with open_client(fake.base_url, AID, max_batch_events=2, **FAST) as client:
        sent = [client.send("click", {"n": i}) for i in range(12)]
        await client.flush(timeout=5)
        stats = client.stats()
    first, second = fake.conns
    assert [f["seq"] for f in first] == [0, 1, 2]
    assert second[0] == first[2]  # the unanswered frame, byte for byte, before new ones
    assert [f["seq"] for f in second] == [2, 3, 4, 5]
    received = ids_of(fake.frames)
    assert len(received) == 14 and set(received) == set(sent)  # duplicates, all dedup-able
    assert list(fake.stored) == sent
    assert (stats.reconnects, stats.events_acked) == (1, 12)
    # frames written after the server stopped reading were lost too, and resent
    assert stats.frames_resent >= 1 and stats.frames_sent == 6 + stats.frames_resent


async def test_reconnect_resends_every_unanswered_frame_in_order(fake):
    fake.hold = True
    fake.drop_after = [3]
    async with open_client(fake.base_url, AID, max_batch_events=1, max_in_flight=3,
                           **FAST) as client:
        for i in range(5):
            client.send("click", {"n": i})
        await until(lambda: len(fake.conns) == 2 and len(fake.held) == 3)
        assert client.stats().in_flight == 3
        await fake.release()
        await client.flush(timeout=5)
        stats = client.stats()
    assert [f["seq"] for f in fake.conns[0]] == [0, 1, 2]
    assert fake.conns[1][:3] == fake.conns[0]
    assert [f["seq"] for f in fake.conns[1]] == [0, 1, 2, 3, 4]
    assert (stats.frames_sent, stats.frames_resent, stats.events_acked) == (8, 3, 5)


async def test_a_reply_out_of_order_drops_the_connection_and_resends(fake):
    fake.misnumber = 1
    async with open_client(fake.base_url, AID, **FAST) as client:
        sent = client.send("click")
        await client.flush(timeout=5)
    assert fake.close_codes == [1002, 1000]
    assert [ids_of(conn) for conn in fake.conns] == [[sent], [sent]]
    assert client.stats().events_acked == 1


async def test_backoff_grows_between_attempts(fake, autojump_clock):
    fake.reject = [503] * 6
    async with open_client(fake.base_url, AID, backoff_initial_s=1.0, backoff_max_s=8.0,
                           rng=random.Random(3)) as client:
        client.send("click")
        await client.flush()
        stats = client.stats()
    gaps = [b - a for a, b in zip(fake.attempts, fake.attempts[1:], strict=False)]
    assert len(gaps) == 6
    for gap, ceiling in zip(gaps, [1, 2, 4, 8, 8, 8], strict=True):
        assert ceiling / 2 <= gap <= ceiling + 0.01, gaps
    assert (stats.connect_failures, stats.reconnects, stats.events_acked) == (6, 0, 1)


async def test_forbidden_handshake_is_fatal_and_not_retried(fake, autojump_clock):
    fake.reject = [403, 403, 403]
    with pytest.raises(ClientError) as leaving:
        async with open_client(fake.base_url, AID) as client:
            client.send("click")
            with pytest.raises(ClientError) as flushing:
                await client.flush()
            await trio.sleep(100)
            with pytest.raises(ClientError):
                client.send("click")
    assert flushing.value.status == 403 and flushing.value.code == "unknown_analytics_id"
    assert leaving.value.status == 403
    assert len(fake.attempts) == 1


async def test_unavailable_handshake_is_retried(fake, autojump_clock):
    fake.reject = [503]
    async with open_client(fake.base_url, AID) as client:
        client.send("click")
        await client.flush()
    assert len(fake.attempts) == 2 and len(fake.stored) == 1


async def test_refused_batch_is_recorded_and_never_resent(fake):
    fake.drop_after = [3]
    async with open_client(fake.base_url, AID, max_batch_events=1, **FAST) as client:
        ok1, bad, ok2 = client.send("click"), client.send("bad", {"k": 1}), client.send("c")
        await client.flush(timeout=5)
        stats = client.stats()
    [error] = client.errors
    assert (error.seq, error.code, error.field) == (1, "invalid_event", "$.events[0].type")
    assert [e["id"] for e in error.events] == [bad]
    assert ids_of(fake.frames).count(bad) == 1  # not resent after the reconnect
    assert ids_of(fake.frames).count(ok2) == 2  # the unanswered one was
    assert list(fake.stored) == [ok1, ok2]
    assert (stats.events_acked, stats.events_refused) == (2, 1)


async def test_unsendable_events_are_refused_here_and_the_rest_sent(fake):
    async with open_client(fake.base_url, AID, max_frame_bytes=300) as client:
        first = client.send("click")
        client.send("odd", {"x": object()})
        client.send("big", {"x": "y" * 400})
        last = client.send("click")
        await client.flush(timeout=5)
    assert [(e.seq, e.code, e.events[0]["type"]) for e in client.errors] == \
        [(None, "unencodable", "odd"), (None, "too_large", "big")]
    assert list(fake.stored) == [first, last]
    assert client.stats().events_refused == 2


async def test_close_without_acks_raises_undelivered(fake, autojump_clock):
    fake.hold = True
    with pytest.raises(Undelivered):
        async with open_client(fake.base_url, AID, close_timeout_s=2) as client:
            client.send("click")
            with pytest.raises(trio.TooSlowError):
                await client.flush(timeout=5)
    assert len(fake.frames) == 1 and fake.close_codes == [1000]


async def test_an_error_in_the_block_propagates_as_is(fake):
    with pytest.raises(KeyError):
        async with open_client(fake.base_url, AID) as client:
            client.send("click")
            raise KeyError("x")


async def test_events_wait_through_an_outage(nursery, autojump_clock):
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    server = FakeServer()
    server.port = sock.getsockname()[1]
    sock.close()  # nothing listens there yet: connections are refused
    async with open_client(server.base_url, AID, backoff_initial_s=1.0) as client:
        sent = client.send("click")
        await trio.sleep(5)
        assert client.stats().connect_failures >= 2 and not client.connected
        await nursery.start(serve_websocket, server.handler, "127.0.0.1", server.port, None)
        await client.flush()
    assert list(server.stored) == [sent]


# --- POST /create


async def serve_create(nursery, status: int, body: bytes, seen: list):
    async def handle(stream):
        conn = h11.Connection(h11.SERVER)
        while (event := conn.next_event()) is not h11.PAUSED:
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif not isinstance(event, h11.EndOfMessage):
                seen.append(event)
            else:
                break
        head = h11.Response(status_code=status, headers=[
            ("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        await stream.send_all(conn.send(head) + conn.send(h11.Data(data=body))
                              + conn.send(h11.EndOfMessage()))
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"


async def test_create_analytics_id_posts_nothing_and_returns_the_id(nursery):
    seen: list = []
    body = json.dumps({"analytics_id": AID, "metadata": {"region": "global"}}).encode()
    base_url = await serve_create(nursery, 200, body, seen)
    assert await create_analytics_id(base_url) == AID
    [request] = seen  # no Data event: an empty body
    assert (request.method, request.target) == (b"POST", b"/create")
    assert dict(request.headers) == {b"host": base_url[7:].encode(), b"content-length": b"0"}


async def test_create_analytics_id_refused(nursery):
    body = b'{"error": {"code": "rate_limited", "message": "slow down"}}'
    base_url = await serve_create(nursery, 429, body, [])
    with pytest.raises(ClientError) as refused:
        await create_analytics_id(base_url)
    assert (refused.value.status, refused.value.code, refused.value.body) == \
        (429, "rate_limited", body)
