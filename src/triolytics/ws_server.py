"""The WebSocket at `/analytics`: handshake checks, hand-off to trio-websocket, one loop
per connection.

Rules:
- The HTTP server calls `check` with the request h11 parsed. A refusal (400, 403, 503)
  is an `ApiError`, so h11 answers it as plain HTTP: no client is accepted and then
  closed. Then `upgrade` owns the connection: the request's bytes are replayed to
  trio-websocket, which does the handshake and the framing.
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
from wsproto.events import TextMessage

from triolytics.config import Config
from triolytics.errors import ApiError
from triolytics.identity import Identities
from triolytics.realtime import CLOSE_ERROR, Batch, FrameError, Realtime
from triolytics.sessions import Intake, Sessions
from triolytics.web import Cors, Request
from triolytics.writer import Writer

log = logging.getLogger("triolytics.ws")
_FAILED = object()  # the answer of a batch without seq that could not be stored
# Coalesced answers use trio-websocket's internals (`_send_texts`): only if they are there.
_COALESCE = {"_wsproto", "_stream_lock", "_stream", "_close_reason"} <= set(
    trio_websocket.WebSocketConnection.__init__.__code__.co_names)
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


class _Peer:
    """One accepted connection: its unanswered batches, idle clock, and `drain()` scope.

    `pending` holds (batch, group) in arrival order, at most `ws_max_in_flight`; the
    reader waits on `lot` when it is full, the acker when it is empty (never both: one
    parking lot serves). A refused batch is queued as (None, FrameError) to keep order.
    """

    __slots__ = ("reading", "last", "pending", "lot", "done", "dead")

    def __init__(self) -> None:
        self.reading = trio.CancelScope()
        self.last = trio.current_time()  # when the last message arrived
        self.pending: list = []  # (a list: 56 bytes empty, where a deque takes 600)
        self.lot = trio.lowlevel.ParkingLot()
        self.done = False  # the reader has stopped: the acker finishes the queue
        self.dead = False  # the peer missed a pong: no closing handshake to wait for


class RealtimeServer:
    def __init__(self, config: Config, writer: Writer, identities: Identities,
                 sessions: Sessions, clock: Callable[[], int] = time_ns) -> None:
        self.config = config
        self.writer = writer
        self.identities = identities
        self.sessions = sessions
        self.clock = clock  # wall clock, ns since epoch
        self.origins = Cors(config.ws_origins or ["*"])  # no list: any Origin
        self.peers: set[_Peer] = set()
        self.draining = False

    def drain(self) -> None:
        """Stop reading every connection; each closes with 1001 once answered."""
        self.draining = True
        for peer in self.peers:
            peer.reading.cancel()

    # --- the handshake, on the HTTP connection's task
    def check(self, request: Request) -> Realtime:
        """What the connection needs from its request (its analytics_id, the client's
        address and user agent), or ApiError (answered as plain HTTP)."""
        h = request.headers
        if request.method != b"GET" or h.get(b"upgrade", b"").lower() != b"websocket" \
                or b"sec-websocket-key" not in h:
            raise ApiError("bad_request", "expected a WebSocket upgrade (GET with "
                           "Upgrade: websocket)")
        if self.draining or self.writer.closing:
            raise ApiError("unavailable", "server is shutting down; retry",
                           headers=((b"retry-after", b"1"),))
        origin = h.get(b"origin")
        if not self.origins.allowed(origin):
            raise ApiError("forbidden_origin", "origin not allowed (ws_origins)")
        ids = parse_qs(request.query.decode("latin-1")).get("analytics_id")
        analytics_id = self.identities.check(ids[-1] if ids else None)
        ua = request.headers.get(b"user-agent")
        context = {"ip": request.client_ip}
        if ua:
            context["userAgent"] = ua.decode("latin-1")
        return Realtime(self.config, self.config.realtime_project, analytics_id,
                        _ENCODE.encode(context).decode())

    async def upgrade(self, stream: trio.abc.Stream, rt: Realtime) -> None:
        """Own an upgraded connection whose request passed `check`; `stream` replays
        the request's bytes first."""
        try:
            await self._session(stream, rt)
        except Exception:  # a bug here must cost this connection only, never the server
            log.exception("WebSocket connection failed; closing it")

    async def _session(self, stream: trio.abc.Stream, rt: Realtime) -> None:
        c = self.config
        async with trio.open_nursery() as nursery:  # trio-websocket's reader, our acker
            try:
                proposal = await trio_websocket.wrap_server_stream(
                    nursery, stream, c.ws_message_queue,
                    c.ws_max_message_bytes, c.ws_receive_buffer_bytes)
                ws = await proposal.accept()
            except trio_websocket.ConnectionClosed:
                return
            peer = _Peer()
            self.peers.add(peer)
            del proposal  # (held for the connection's life otherwise)
            acked = trio.Event()
            nursery.start_soon(self._acker, ws, peer, acked)
            try:
                with peer.reading:
                    await self._read(ws, rt, peer)
                peer.done = True
                peer.lot.unpark_all()
                await acked.wait()  # every batch read is answered (or the peer is gone)
            finally:
                self.peers.discard(peer)
                if not peer.dead:
                    with trio.move_on_after(CLOSE_TIMEOUT_S) as cs:
                        cs.shield = True
                        await ws.aclose(CLOSE_GOING_AWAY if self.draining else CLOSE_IDLE)
                nursery.cancel_scope.cancel()  # (the HTTP server closes the socket)

    # --- one connection
    async def _read(self, ws, rt: Realtime, peer: _Peer) -> None:
        writer, dedup, sessions = self.writer, self.writer.dedup, self.sessions
        pending, limit = peer.pending, self.config.ws_max_in_flight
        while True:
            while len(pending) >= limit:  # TCP backpressure until the oldest is answered
                await peer.lot.park()
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
                pending.append((None, exc))
            else:
                pending.append((batch, writer.submit(batch.system_rows, batch.keys,
                                                     batch.columns)))
            if len(pending) == 1:
                peer.lot.unpark_all()  # the acker waits for the first

    async def _acker(self, ws, peer: _Peer, acked: trio.Event) -> None:
        """Answer batches in order once durable, every answer ready at once in one write;
        ping when no batch came for a ping interval."""
        pending = peer.pending
        try:
            while True:
                if not pending:
                    if peer.done:
                        return
                    with trio.move_on_after(self.config.ws_ping_interval_s) as waited:
                        await peer.lot.park()
                    if waited.cancelled_caught and not await self._heartbeat(ws, peer):
                        return
                    continue
                batch, group = pending[0]
                if batch is not None:
                    await group.done.wait()
                answers: list[str] = []
                while pending and (pending[0][0] is None or pending[0][1].done.is_set()):
                    answer = self._answer(*pending.pop(0))
                    if answer is _FAILED:
                        await _close(ws, CLOSE_ERROR, "could not store a batch")
                        return
                    if answer is not None:
                        answers.append(answer)
                peer.lot.unpark_all()  # room for the reader
                if answers and not await _send_texts(ws, answers):
                    return
        finally:
            if not peer.done:  # the peer is gone, silent or refused: stop reading too
                peer.reading.cancel()
            acked.set()

    def _answer(self, batch: Batch | None, group_or_error) -> str | None:
        """The answer owed for one batch (None: no seq, nothing to say); `_FAILED` if a
        batch without seq could not be stored (the connection must close)."""
        if batch is None:
            e = group_or_error.error
            return _text(Refusal(group_or_error.seq, e.code, e.message, e.field))
        if group_or_error.error is not None:
            if batch.seq is None:
                return _FAILED
            return _text(Refusal(batch.seq, "unavailable",
                                 f"could not journal the events: {group_or_error.error}"))
        if batch.seq is None:
            return None
        return _text(Ack(batch.seq, batch.events, batch.session_id))

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
        peer.dead = True
        return False


def _text(message: msgspec.Struct) -> str:
    return _ENCODE.encode(message).decode()


async def _send_texts(ws, texts: list[str]) -> bool:
    """Send text messages in one socket write; False if the connection is gone.
    trio-websocket sends one write per message; when its internals are as expected
    (0.12), the frames are built by its wsproto connection and written together, under
    its send lock, as its own `_send` does."""
    try:
        if len(texts) == 1 or not _COALESCE:
            for text in texts:
                await ws.send_message(text)
            return True
        if ws._close_reason is not None:
            return False
        data = b"".join([ws._wsproto.send(TextMessage(data=text)) for text in texts])
        async with ws._stream_lock:
            await ws._stream.send_all(data)
        return True
    except (trio_websocket.ConnectionClosed, trio.BrokenResourceError,
            trio.ClosedResourceError):
        return False


async def _close(ws, code: int, reason: str) -> None:
    reason = reason.encode()[:120].decode("utf-8", "ignore")  # a close reason fits 123 bytes
    with trio.move_on_after(CLOSE_TIMEOUT_S):
        await ws.aclose(code, reason)
