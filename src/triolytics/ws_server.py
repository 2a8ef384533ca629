"""The WebSocket at `/analytics`: handshake checks, hand-off to trio-websocket, one loop
per connection.

Rules:
- The HTTP server calls `upgrade` with the h11 request it parsed. A refusal (400, 403,
  503) is an `ApiError` raised before anything is sent, so h11 answers it as plain HTTP:
  no client is accepted and then closed. Accepted connections get the request's bytes
  replayed to trio-websocket (`Replay`), which does the handshake and the framing.
- Each connection runs two tasks of ours: the reader (this connection's task) reads,
  validates and submits batches to the writer without waiting for the journal; the
  acker answers them in order as they become durable, and pings the peer when no batch
  has come for `ws_ping_interval_s`. At most `ws_max_in_flight` batches wait between
  them; past that the reader stops reading (TCP backpressure), as it does while the
  writer has no room.
- A client that sends no `seq` never receives a message; a batch of it that must be
  refused closes the connection with a close code instead (docs/websocket.md).
- `drain()` (shutdown) stops every reader; in-flight batches are still answered, then
  the connection closes with 1001.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from time import time_ns
from urllib.parse import parse_qs

import msgspec
import trio
import trio_websocket

from triolytics.config import Config
from triolytics.errors import ApiError
from triolytics.identity import Identities
from triolytics.realtime import CLOSE_ERROR, FrameError, Realtime
from triolytics.sessions import Intake, Sessions
from triolytics.web import Request
from triolytics.writer import Writer

log = logging.getLogger("triolytics.ws")
CLOSE_TIMEOUT_S = 5.0  # a closing handshake the peer does not finish is cut after this
CLOSE_IDLE, CLOSE_GOING_AWAY = 1000, 1001
_ENCODE = msgspec.json.Encoder()


class Ack(msgspec.Struct, tag_field="type", tag="ack"):
    seq: int
    stored: int
    session_id: str | None


class Refusal(msgspec.Struct, tag_field="type", tag="error", omit_defaults=True):
    seq: int
    code: str
    message: str
    field: str | None = None


class Replay(trio.abc.Stream):
    """A stream that first returns bytes already read from it (the request head)."""

    def __init__(self, stream: trio.abc.Stream, data: bytes) -> None:
        self.stream = stream
        self.data = data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self.data:
            data, self.data = self.data, b""
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Peer:
    """One accepted connection, for idle checks and `drain()`."""

    __slots__ = ("reading", "last")

    def __init__(self) -> None:
        self.reading = trio.CancelScope()
        self.last = trio.current_time()  # when the last message arrived


class RealtimeServer:
    def __init__(self, config: Config, writer: Writer, identities: Identities,
                 sessions: Sessions, clock: Callable[[], int] = time_ns) -> None:
        self.config = config
        self.writer = writer
        self.identities = identities
        self.sessions = sessions
        self.clock = clock  # wall clock, ns since epoch
        self.origins = frozenset(o.rstrip("/").encode() for o in config.ws_origins)
        self.peers: set[_Peer] = set()
        self.draining = False

    def drain(self) -> None:
        """Stop reading every connection; each closes with 1001 once answered."""
        self.draining = True
        for peer in self.peers:
            peer.reading.cancel()

    # --- the handshake, on the HTTP connection's task
    def check(self, request: Request) -> str:
        """The connection's analytics_id, or ApiError (answered as plain HTTP)."""
        h = request.headers
        if request.method != b"GET" or h.get(b"upgrade", b"").lower() != b"websocket" \
                or b"sec-websocket-key" not in h:
            raise ApiError("bad_request", "expected a WebSocket upgrade (GET with "
                           "Upgrade: websocket)")
        if self.draining or self.writer.closing:
            raise ApiError("unavailable", "server is shutting down; retry",
                           headers=((b"retry-after", b"1"),))
        origin = h.get(b"origin")
        if self.origins and origin is not None and origin.rstrip(b"/") not in self.origins:
            raise ApiError("forbidden_origin", "origin not allowed (ws_origins)")
        ids = parse_qs(request.query.decode("latin-1")).get("analytics_id")
        return self.identities.check(ids[-1] if ids else None)

    async def upgrade(self, stream: trio.abc.Stream, raw_head: bytes, request: Request) -> None:
        analytics_id = self.check(request)
        ua = request.headers.get(b"user-agent")
        context = {"ip": request.client_ip}
        if ua:
            context["userAgent"] = ua.decode("latin-1")
        rt = Realtime(self.config, self.config.realtime_project, analytics_id,
                      _ENCODE.encode(context).decode())
        c = self.config
        async with trio.open_nursery() as nursery:
            try:
                proposal = await trio_websocket.wrap_server_stream(
                    nursery, Replay(stream, raw_head), c.ws_message_queue,
                    c.ws_max_message_bytes, c.ws_receive_buffer_bytes)
                ws = await proposal.accept()
            except trio_websocket.ConnectionClosed:
                return
            peer = _Peer()
            self.peers.add(peer)
            try:
                await self._serve(ws, rt, peer)
            finally:
                self.peers.discard(peer)
                with trio.move_on_after(CLOSE_TIMEOUT_S) as cs:
                    cs.shield = True
                    await ws.aclose(CLOSE_GOING_AWAY if self.draining else CLOSE_IDLE)
                nursery.cancel_scope.cancel()

    # --- one connection
    async def _serve(self, ws, rt: Realtime, peer: _Peer) -> None:
        send, receive = trio.open_memory_channel(self.config.ws_max_in_flight)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._acker, ws, receive, peer, nursery.cancel_scope)
            async with send:
                with peer.reading:
                    await self._read(ws, rt, peer, send)

    async def _read(self, ws, rt: Realtime, peer: _Peer, send) -> None:
        writer, dedup, sessions = self.writer, self.writer.dedup, self.sessions
        while True:
            try:
                data = await ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            peer.last = trio.current_time()
            if writer.closing or not writer.has_room(1):
                try:
                    await writer.wait_room(give_up=False)  # the socket waits meanwhile
                except ApiError:
                    return  # closing
            intake = Intake(dedup, sessions, self.clock() // 1000)
            try:
                batch = rt.batch(data, intake)
            except FrameError as exc:
                if exc.seq is None:
                    await _close(ws, exc.close_code, exc.error.message)
                    return
                try:
                    await send.send((None, exc))
                except trio.BrokenResourceError:
                    return
                continue
            try:  # waits while ws_max_in_flight batches are unanswered
                await send.send((batch, writer.submit(batch.rows, batch.keys)))
            except trio.BrokenResourceError:
                return  # the acker closed the connection

    async def _acker(self, ws, receive, peer: _Peer, scope: trio.CancelScope) -> None:
        """Answer batches in order once durable; ping when none came for a while."""
        async with receive:
            while True:
                try:
                    item = await _next(receive, self.config.ws_ping_interval_s)
                except trio.EndOfChannel:
                    return  # the reader is done and every batch is answered
                ok = await self._answer(ws, *item) if item is not None else \
                    await self._heartbeat(ws, peer)
                if not ok:
                    scope.cancel()
                    return

    async def _answer(self, ws, batch, group_or_error) -> bool:
        """Send the answer of one batch; False if the connection must close."""
        try:
            if batch is None:
                e = group_or_error.error
                await ws.send_message(_ENCODE.encode(Refusal(
                    group_or_error.seq, e.code, e.message, e.field)).decode())
                return True
            try:
                await self.writer.wait_durable(group_or_error)
            except ApiError as exc:
                if batch.seq is None:
                    await _close(ws, CLOSE_ERROR, exc.message)
                    return False
                await ws.send_message(_ENCODE.encode(Refusal(
                    batch.seq, exc.code, exc.message)).decode())
                return True
            if batch.seq is not None:
                await ws.send_message(_ENCODE.encode(Ack(
                    batch.seq, batch.events, batch.session_id)).decode())
            return True
        except trio_websocket.ConnectionClosed:
            return False

    async def _heartbeat(self, ws, peer: _Peer) -> bool:
        """No batch for a ping interval: close an idle connection, ping a quiet one.
        False if the connection must close."""
        c = self.config
        if trio.current_time() - peer.last >= c.ws_idle_timeout_s:
            await _close(ws, CLOSE_IDLE, "idle timeout")
            return False
        with trio.move_on_after(c.ws_pong_timeout_s):
            try:
                await ws.ping()
                return True
            except trio_websocket.ConnectionClosed:
                return False
        log.info("dropping a WebSocket peer that did not answer a ping")
        return False


async def _next(receive, timeout: float):
    """The next queued batch; None if none came within `timeout`. Under load one is
    usually queued already: no cancel scope then."""
    try:
        return receive.receive_nowait()
    except trio.WouldBlock:
        pass
    with trio.move_on_after(timeout):
        return await receive.receive()
    return None


async def _close(ws, code: int, reason: str) -> None:
    reason = reason.encode()[:120].decode("utf-8", "ignore")  # a close reason fits 123 bytes
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        await ws.aclose(code, reason)
