"""The WebSocket connection task over in-memory streams: what no loopback test can make
happen on cue."""

from __future__ import annotations

import trio
from ws_wire import masked

from triolytics.core.config import Config
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
