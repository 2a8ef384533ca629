"""The WebSocket connection task over in-memory streams: what no loopback test can make
happen on cue."""

from __future__ import annotations

import json

import trio
from ws_wire import masked, server_frames

from triolytics.core.config import Config
from triolytics.core.dedup import Dedup
from triolytics.core.realtime import Realtime
from triolytics.core.sessions import Sessions
from triolytics.server.ws_server import RealtimeServer


class RoomyWriter:
    """What a connection asks of the writer before it has a batch to submit."""

    closing = False
    dedup = None

    def has_room(self, rows: int) -> bool:
        return True


class StuckPeer(trio.abc.Stream):
    """Sends `data` once, then nothing; takes the 101, then no byte more."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def receive_some(self, max_bytes=None) -> bytes:
        if self.data:
            data, self.data = self.data, b""
            return data
        await trio.sleep_forever()

    async def send_all(self, data) -> None:
        if not bytes(data).startswith(b"HTTP/1.1 101"):
            await trio.sleep_forever()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.sleep_forever()

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


async def test_a_peer_that_stops_reading_is_dropped_after_the_pong_timeout(autojump_clock):
    config = Config(ws_pong_timeout_s=15, ws_ping_interval_s=30, ws_idle_timeout_s=600)
    server = RealtimeServer(config, RoomyWriter(), None, Sessions(10**9, str))
    rt = Realtime(config, "default", "0.x", "{}")
    start = trio.current_time()
    with trio.fail_after(100):  # without the send timeout the pong's write never ends
        await server.upgrade(StuckPeer(masked(0x89, b"hi")), (rt, b"HTTP/1.1 101 x\r\n\r\n"),
                             b"")
    assert 15 <= trio.current_time() - start < 16
    assert not server.peers


# --- limits per message and event rates, on a peer that plays a script


class Group:
    """A journal group that is durable at once."""

    error = None
    renamed = None  # (many writers: the sessions the shared state renamed)

    def __init__(self) -> None:
        self.done = trio.Event()
        self.done.set()


class StoringWriter(RoomyWriter):
    """Takes every batch at once and notes when (the connection's own clock)."""

    def __init__(self) -> None:
        self.dedup = Dedup(10**12, 1000)
        self.submitted: list[tuple[float, int]] = []  # (time, events)

    def submit(self, rows, keys=None, columns=None, notify=None) -> Group:
        self.submitted.append((trio.current_time(), len(columns.types) if columns else 0))
        return Group()


class ScriptedPeer(trio.abc.Stream):
    """Plays `script`: bytes are what one read returns, a number is seconds to wait
    before the next read returns; then silence. Notes the time of every read and every
    frame the server sends."""

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.reads: list[float] = []
        self.sent = b""
        self.closed_at: float | None = None  # when the server sent its Close

    async def receive_some(self, max_bytes=None) -> bytes:
        await trio.lowlevel.checkpoint()  # (as a socket's read is: a cancel lands here)
        while self.script:
            step = self.script.pop(0)
            if isinstance(step, bytes):
                self.reads.append(trio.current_time())
                return step
            await trio.sleep(step)
        await trio.sleep_forever()

    async def send_all(self, data) -> None:
        self.sent += bytes(data)
        if self.closed_at is None and self.close_code() is not None:
            self.closed_at = trio.current_time()

    def frames(self) -> list[tuple[int, bytes]]:
        """The server's frames (after its 101)."""
        return server_frames(self.sent.split(b"\r\n\r\n", 1)[-1])

    def close_code(self) -> int | None:
        closes = [p for op, p in self.frames() if op == 0x8]
        return int.from_bytes(closes[0][:2], "big") if closes else None

    async def wait_send_all_might_not_block(self) -> None:
        pass

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


HANDSHAKE = b"HTTP/1.1 101 x\r\n\r\n"
CLOSE_1000 = masked(0x88, (1000).to_bytes(2, "big"))


def batch(events: int, seq: int | None = None) -> bytes:
    body = {"events": [{"type": "e"}] * events}
    if seq is not None:
        body["seq"] = seq
    return masked(0x81, json.dumps(body).encode())


async def serve_peers(config: Config, *peers: tuple[ScriptedPeer, str], limit: float = 100):
    """Run each (peer, analytics_id) as an accepted connection until all are done."""
    server = RealtimeServer(config, StoringWriter(), None, Sessions(10**9, str))
    with trio.fail_after(limit):
        async with trio.open_nursery() as nursery:
            for peer, aid in peers:
                rt = Realtime(config, "default", aid, "{}")
                nursery.start_soon(server.upgrade, peer, (rt, HANDSHAKE), b"")
    return server


async def test_too_many_fragments_close_1009(autojump_clock):
    """Empty continuations, each far within the size cap: the one past
    `ws_max_fragments` closes the connection with 1009."""
    config = Config(ws_max_fragments=16)
    peer = ScriptedPeer([masked(0x01, b"{") + masked(0x00, b"") * 100])
    server = await serve_peers(config, (peer, "0.a"))
    assert peer.close_code() == 1009
    assert not server.writer.submitted and not server.peers


async def test_a_message_has_its_time_then_closes_1008(autojump_clock):
    """A message whose fragments trickle in (pings between them keep the peer alive)
    is cut `ws_message_timeout_s` after its first byte; one that makes it is stored."""
    body = json.dumps({"events": [{"type": "e"}], "seq": 1}).encode()
    config = Config(ws_message_timeout_s=10, ws_ping_interval_s=30, ws_idle_timeout_s=600)
    slow = [masked(0x01, body[:5])]
    for i in range(5, 40):  # a byte every 2 s, a ping with each
        slow += [2.0, masked(0x00, body[i:i + 1]) + masked(0x89, b"p")]
    start = trio.current_time()
    peer = ScriptedPeer(slow)
    server = await serve_peers(config, (peer, "0.a"))
    assert peer.close_code() == 1008
    assert 10 <= peer.closed_at - start < 11
    assert not server.writer.submitted
    # Within the time: 8 s of fragments, then the last one.
    on_time = [masked(0x01, body[:5]), 4.0, masked(0x00, body[5:9]), 4.0,
               masked(0x80, body[9:]), CLOSE_1000]
    peer = ScriptedPeer(on_time)
    server = await serve_peers(config, (peer, "0.a"))
    assert [op for op, _ in peer.frames()] == [0x1, 0x8]  # the ack, then the close
    assert [e for _, e in server.writer.submitted] == [1]


class FullWriter(StoringWriter):
    """Full after each batch, for 20 s."""

    room = True

    def has_room(self, rows: int) -> bool:
        return self.room

    def submit(self, rows, keys=None, columns=None, notify=None) -> Group:
        self.room = False
        return super().submit(rows, keys, columns, notify)

    async def wait_room(self, rows: int = 1, *, give_up: bool = True) -> None:
        await trio.sleep(20)
        self.room = True


async def test_time_the_server_does_not_read_is_not_the_messages(autojump_clock):
    """A message under way while the writer is full (the server reads nothing) has its
    whole `ws_message_timeout_s` of reading once the writer takes batches again."""
    config = Config(ws_message_timeout_s=10)
    body = json.dumps({"events": [{"type": "e"}], "seq": 2}).encode()
    peer = ScriptedPeer([batch(1, 1) + masked(0x01, body[:5]), masked(0x80, body[5:]),
                         CLOSE_1000])
    server = RealtimeServer(config, FullWriter(), None, Sessions(10**9, str))
    rt = Realtime(config, "default", "0.a", "{}")
    start = trio.current_time()
    with trio.fail_after(100):
        await server.upgrade(peer, (rt, HANDSHAKE), b"")
    assert peer.close_code() == 1000
    assert [round(t - start) for t, _ in server.writer.submitted] == [0, 20]


async def test_a_steady_stream_split_across_reads_is_never_timed_out(autojump_clock):
    """Every read ends inside the next message (as a busy stream's reads do), for six
    times `ws_message_timeout_s`: no message takes long, so none is cut."""
    config = Config(ws_message_timeout_s=5)
    frames = b"".join(batch(1, seq) for seq in range(10, 41))  # (all of one length)
    cut = len(batch(1, 10))
    script = []
    for i in range(30):  # each read: the rest of one message, half of the next
        lo = 0 if i == 0 else i * cut + cut // 2
        script += [frames[lo:(i + 1) * cut + cut // 2], 1.0]
    script += [frames[30 * cut + cut // 2:], CLOSE_1000]
    peer = ScriptedPeer(script)
    server = await serve_peers(config, (peer, "0.a"))
    assert peer.close_code() == 1000  # the echo of the client's own close
    assert len(server.writer.submitted) == 31


async def test_over_the_rate_the_next_frame_waits_for_tokens(autojump_clock):
    """10 events/s after a burst of 10, batches of 10: the first two are read at once
    (the second runs the bucket into debt), then one a second. Meanwhile another
    connection is read at once, and the paused one is neither pinged nor dropped."""
    config = Config(ws_max_events_per_s=10, ws_burst_events=10, ws_ping_interval_s=0.5,
                    ws_pong_timeout_s=0.2, ws_idle_timeout_s=0.8)
    start = trio.current_time()
    paced = ScriptedPeer([batch(10, seq) for seq in range(5)] + [CLOSE_1000])
    other = ScriptedPeer([0.5, batch(10, 0), CLOSE_1000])
    server = await serve_peers(config, (paced, "0.a"), (other, "0.b"))
    assert [round(t - start, 3) for t in paced.reads] == [0, 0, 1, 2, 3, 4]
    assert [round(t - start, 3) for t in other.reads] == [0.5, 0.5]
    assert [op for op, _ in paced.frames()] == [0x1] * 5 + [0x8]  # acks, no ping
    assert paced.close_code() == 1000
    assert len(server.rates.conns) == 0  # buckets of closed connections are forgotten


async def test_connections_of_one_analytics_id_share_its_rate(autojump_clock):
    config = Config(ws_id_max_events_per_s=10, ws_id_burst_events=10)
    start = trio.current_time()
    one = ScriptedPeer([batch(10, seq) for seq in range(3)] + [CLOSE_1000])
    two = ScriptedPeer([batch(10, seq) for seq in range(3)] + [CLOSE_1000])
    server = await serve_peers(config, (one, "0.a"), (two, "0.a"))
    times = sorted(round(t - start, 3) for t, _ in server.writer.submitted)
    assert times == [0, 0, 1, 2, 3, 4]
    assert len(server.rates.ids) == 1  # (kept after its connections: a reconnect waits too)


async def test_over_the_rate_with_close_the_connection_closes_1008(autojump_clock):
    """`ws_rate_limit_action = "close"`: a batch that comes while the bucket is in debt
    is not stored and closes the connection, after the answers owed."""
    config = Config(ws_max_events_per_s=10, ws_burst_events=10, ws_rate_limit_action="close")
    peer = ScriptedPeer([batch(10, 1) + batch(10, 2) + batch(10, 3)])
    server = await serve_peers(config, (peer, "0.a"))
    frames = peer.frames()
    assert [json.loads(p)["seq"] for op, p in frames if op == 0x1] == [1, 2]
    assert peer.close_code() == 1008
    assert [e for _, e in server.writer.submitted] == [10, 10]
    # A client that keeps to the rate is never closed.
    peer = ScriptedPeer([batch(10, 1), batch(10, 2), 1.0, batch(10, 3), 1.0, batch(10, 4),
                         CLOSE_1000])
    server = await serve_peers(config, (peer, "0.a"))
    assert peer.close_code() == 1000
    assert len(server.writer.submitted) == 4
