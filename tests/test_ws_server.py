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


# --- limits per message, on a peer that plays a script


class Group:
    """A journal group that is durable at once."""

    error = None

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
