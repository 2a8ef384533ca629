"""The real-time client: `POST /create` once, then events over one WebSocket.

    analytics_id = await create_analytics_id("http://127.0.0.1:8000")   # cache it
    async with open_client("http://127.0.0.1:8000", analytics_id) as client:
        client.send("screen_view", {"screen_name": "Home"})
        await client.flush()

Rules (docs/websocket.md is the protocol):
- `send` never blocks and never drops: it appends to a bounded buffer or raises
  `BufferFull`. Each event gets a client-made `id` and its `ts` when sent, so a resent
  batch is deduplicated by the server and keeps its time.
- One background task (`run`) owns the one connection. It frames buffered events into
  batches with an increasing `seq`, keeps at most `max_in_flight` unanswered, and drops a
  batch when its reply arrives; replies come in `seq` order.
- A frame is encoded once (one msgspec call) and its bytes are kept until answered: after
  a reconnect (jittered exponential backoff, same `analytics_id`) the unanswered frames
  are resent byte for byte, before anything new.
- A batch refused by an error reply is recorded in `errors` and never resent. A handshake
  refused with a 4xx (not 408/429) is fatal: `send`, `flush` and leaving the context raise
  it. Everything else (no route, 503, drops, bad replies) is retried.
- Not thread-safe: call everything from the trio thread that runs the client.
"""

from __future__ import annotations

import logging
import math
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote, urlsplit

import h11
import msgspec
import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, open_websocket_url

log = logging.getLogger("triolytics.client")

RESERVED_TYPES = frozenset({"session_start", "session_end"})
MAX_TYPE_CHARS = 200
RETRYABLE_4XX = frozenset({408, 429})
HEADERS = [(b"User-Agent", b"triolytics-client/0.1")]
_UNENCODABLE = (TypeError, ValueError, OverflowError, msgspec.MsgspecError)
_encode = msgspec.json.Encoder().encode


class ClientError(Exception):
    """A refusal or failure; `status`/`body` are the HTTP answer when there was one,
    `code` the `error.code` of a JSON error body."""

    def __init__(self, message: str, *, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body
        self.code = _error_code(body)


class BufferFull(ClientError):
    """`max_buffered_events` events are held unacknowledged: nothing was added."""


class Undelivered(ClientError):
    """Closing gave up after `close_timeout_s` with events still unacknowledged."""


class FrameError(msgspec.Struct, frozen=True):
    """A batch that was refused and will not be resent. `seq` is None when the client
    refused it itself (the event cannot be encoded, or alone exceeds `max_frame_bytes`)."""

    seq: int | None
    code: str
    message: str
    field: str | None
    events: list[Any]


class Stats(msgspec.Struct, frozen=True):
    frames_sent: int  # frames written, resends included
    frames_resent: int
    events_acked: int
    events_refused: int
    reconnects: int  # connections opened after the first
    connect_failures: int  # connections that failed or ended, each followed by a backoff
    buffered: int  # events not yet in a frame
    in_flight: int  # frames built and not yet answered
    connected: bool


class _Reply(msgspec.Struct):
    type: str
    seq: int | None = None
    session_id: str | None = None
    code: str = ""
    message: str = ""
    field: str | None = None


class _ErrorInfo(msgspec.Struct):
    code: str


class _ErrorBody(msgspec.Struct):
    error: _ErrorInfo


class _Created(msgspec.Struct):
    analytics_id: str


_decode_reply = msgspec.json.Decoder(_Reply).decode


class _ProtocolViolation(Exception):
    pass


class _Frame:
    __slots__ = ("seq", "count", "data", "sent", "extra")

    def __init__(self, seq: int, count: int, data: bytes) -> None:
        self.seq = seq
        self.count = count  # events in the frame
        self.data = data
        self.sent = False  # written at least once (later writes are resends)
        self.extra = 0  # locally refused events after it, settled with it (FIFO order)


def _error_code(body: bytes) -> str | None:
    try:
        return msgspec.json.decode(body, type=_ErrorBody).error.code
    except msgspec.DecodeError:
        return None


def _origin(base_url: str) -> tuple[bool, str, int, str, str]:
    """(tls, host, port, Host header, path prefix) of an http(s) base URL."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url must be http(s)://host[:port], not {base_url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    return tls, parts.hostname, port, parts.netloc, parts.path.rstrip("/")


def ws_url(base_url: str, analytics_id: str) -> str:
    """`http://h:p` → `ws://h:p/analytics?analytics_id=…` (https → wss)."""
    tls, _, _, netloc, prefix = _origin(base_url)
    id_ = quote(analytics_id, safe="")
    return f"{'wss' if tls else 'ws'}://{netloc}{prefix}/analytics?analytics_id={id_}"


def backoff_delay(failures: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait after `failures` (≥ 1) failures in a row: doubles from `initial_s`,
    capped at `max_s`, then jittered down by up to half (so delays never shrink)."""
    ceiling = min(max_s, initial_s * 2.0 ** min(failures - 1, 64))
    return ceiling * rng.uniform(0.5, 1.0)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _event(type: str, payload: Any, ts: int | None, id_: str, now: int) -> dict[str, Any]:
    if type.__class__ is not str or not 0 < len(type) <= MAX_TYPE_CHARS:
        raise ValueError(f"event type must be a string of 1-{MAX_TYPE_CHARS} characters")
    if type in RESERVED_TYPES:
        raise ValueError(f"{type!r} is made by the server")
    if ts is None:
        ts = now
    elif ts.__class__ is not int:
        raise TypeError("ts must be an int (epoch milliseconds)")
    if payload is None:
        return {"type": type, "ts": ts, "id": id_}
    if not isinstance(payload, dict):
        raise TypeError("payload must be a dict")
    return {"type": type, "ts": ts, "id": id_, "payload": payload}


# --- POST /create


async def create_analytics_id(base_url: str, *, timeout_s: float = 10.0,
                              max_response_bytes: int = 64 * 1024) -> str:
    """`POST /create` (no body); returns the new `analytics_id`. Raises `ClientError` on an
    answer other than 200, OSError when the server cannot be reached, TooSlowError."""
    tls, host, port, netloc, prefix = _origin(base_url)
    with trio.fail_after(timeout_s):
        if tls:
            stream = await trio.open_ssl_over_tcp_stream(host, port, https_compatible=True)
        else:
            stream = await trio.open_tcp_stream(host, port)
        async with stream:
            status, body = await _post_empty(stream, netloc, prefix + "/create",
                                             max_response_bytes)
    if status != 200:
        raise ClientError(f"POST /create answered {status}", status=status, body=body)
    try:
        return msgspec.json.decode(body, type=_Created).analytics_id
    except msgspec.DecodeError as exc:
        raise ClientError("POST /create: no analytics_id in the answer", status=status,
                          body=body) from exc


async def _post_empty(stream: trio.abc.Stream, host: str, target: str,
                      limit: int) -> tuple[int, bytes]:
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(method="POST", target=target,
                          headers=[("Host", host), ("Content-Length", "0")])
    await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
    try:
        return await _read_response(conn, stream, limit)
    except h11.RemoteProtocolError as exc:
        raise ClientError(f"bad HTTP answer: {exc}") from exc


async def _read_response(conn: h11.Connection, stream: trio.abc.Stream,
                         limit: int) -> tuple[int, bytes]:
    status, body = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(64 * 1024))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > limit:
                raise ClientError(f"answer over {limit} bytes", status=status)
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            return status, bytes(body)


# --- the WebSocket stream


@asynccontextmanager
async def open_client(base_url: str, analytics_id: str,
                      **options: Any) -> AsyncIterator[RealtimeClient]:
    """Run a `RealtimeClient` for the block. A normal exit flushes (at most
    `close_timeout_s`) and closes with 1000; an exception cancels it and propagates as is."""
    client = RealtimeClient(base_url, analytics_id, **options)
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run)
        try:
            yield client
            await client.aclose()
        except BaseException as exc:  # re-raised below, outside the nursery: not grouped
            error = exc
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error


class RealtimeClient:
    def __init__(
        self, base_url: str, analytics_id: str, *,
        max_buffered_events: int = 10_000,  # events held until answered: the offline buffer
        max_batch_events: int = 100,  # events per frame (the server takes up to 2,500)
        max_in_flight: int = 32,  # frames kept unanswered; also the reply queue's length
        max_frame_bytes: int = 1024 * 1024,  # one encoded frame (server: ws_max_message_bytes)
        max_reply_bytes: int = 64 * 1024,  # one reply from the server
        receive_buffer_bytes: int = 64 * 1024,  # one socket read
        max_errors: int = 100,  # refused batches kept in `errors` (oldest forgotten)
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 30.0,
        connect_timeout_s: float = 10.0,  # TCP + TLS + handshake
        close_timeout_s: float = 10.0,  # flush on close, then the closing handshake
        ssl_context: Any = None,
        rng: random.Random | None = None,  # backoff jitter (tests pass a seeded one)
    ) -> None:
        if max_batch_events < 1 or max_in_flight < 1 or max_buffered_events < 1:
            raise ValueError("max_buffered_events, max_batch_events, max_in_flight must be ≥ 1")
        self.url = ws_url(base_url, analytics_id)
        self.session_id: str | None = None  # from the latest ack
        self.errors: list[FrameError] = []
        self._max_buffered, self._max_batch = max_buffered_events, max_batch_events
        self._max_in_flight, self._max_frame_bytes = max_in_flight, max_frame_bytes
        self._max_reply_bytes, self._receive_bytes = max_reply_bytes, receive_buffer_bytes
        self._max_errors = max_errors
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._connect_timeout_s, self._close_timeout_s = connect_timeout_s, close_timeout_s
        self._ssl, self._rng = ssl_context, rng or random.Random()
        self._id_prefix = uuid.uuid4().hex + "-"
        self._serial = 0  # ids are prefix + serial (hex): unique without a syscall each
        self._pending: deque[dict[str, Any]] = deque()  # sent, not yet in a frame
        self._frames: deque[_Frame] = deque()  # built and unanswered, seq order
        self._written = 0  # how many of `_frames` went out on the current connection
        self._next_seq = 0
        self._accepted = self._settled = 0  # events taken by `send`; answered (or refused)
        self._counts = {"frames_sent": 0, "frames_resent": 0, "events_acked": 0,
                        "events_refused": 0, "reconnects": 0, "connect_failures": 0}
        self._connects = 0
        self._failures = 0  # consecutive connection failures (reset by an ack)
        self._fatal: ClientError | None = None
        self._started = self._closing = self._connected = False
        self._connecting: trio.CancelScope | None = None
        self._lost: BaseException | None = None
        self._wake, self._progress = trio.Event(), trio.Event()
        self._stop, self._stopped = trio.Event(), trio.Event()

    # --- the caller's side

    def send(self, type: str, payload: dict[str, Any] | None = None,
             ts: int | None = None) -> str:
        """Buffer one event and return its id. Raises BufferFull (nothing added),
        ValueError/TypeError for a malformed event, or the fatal ClientError."""
        self._check_room(1)
        id_ = f"{self._id_prefix}{self._serial:x}"
        self._pending.append(_event(type, payload, ts, id_, _now_ms()))
        self._serial += 1
        self._accepted += 1
        self._wake.set()
        return id_

    def send_many(self, events: list[dict[str, Any]]) -> None:
        """Buffer events given as `{"type", "payload"?, "ts"?, "id"?}`: all of them, or
        none when one is malformed or they do not all fit (BufferFull)."""
        self._check_room(len(events))
        now, prefix, serial = _now_ms(), self._id_prefix, self._serial
        made = [_event(e.get("type"), e.get("payload"), e.get("ts"),
                       e.get("id") or f"{prefix}{serial + i:x}", now)
                for i, e in enumerate(events)]
        self._pending.extend(made)
        self._serial += len(made)
        self._accepted += len(made)
        self._wake.set()

    async def flush(self, timeout: float | None = None) -> None:
        """Return once every event sent so far is answered. Raises the fatal error,
        ClientError if the client stopped first, trio.TooSlowError after `timeout` s."""
        target = self._accepted
        with trio.fail_after(math.inf if timeout is None else timeout):
            while True:
                self._raise_if_fatal()
                if self._settled >= target:
                    return
                if self._stopped.is_set():
                    raise ClientError(f"closed with {target - self._settled} events unanswered")
                await self._progress.wait()

    async def aclose(self) -> None:
        """Flush (at most `close_timeout_s`), close the connection with 1000, stop `run`.
        Raises the fatal error, or Undelivered when events stayed unanswered."""
        try:
            if not self._closing:
                with trio.move_on_after(self._close_timeout_s):
                    await self.flush()
        finally:
            self._closing = True
            self._stop.set()
            if self._connecting is not None:
                self._connecting.cancel()
            if self._started:
                await self._stopped.wait()
        if self._accepted > self._settled:
            left = self._accepted - self._settled
            raise Undelivered(f"closed with {left} events unacknowledged")

    @property
    def connected(self) -> bool:
        return self._connected

    def stats(self) -> Stats:
        return Stats(**self._counts, buffered=len(self._pending), in_flight=len(self._frames),
                     connected=self._connected)

    def _check_room(self, n: int) -> None:
        self._raise_if_fatal()
        if self._closing:
            raise ClientError("the client is closed")
        if self._accepted - self._settled + n > self._max_buffered:
            raise BufferFull(f"{self._accepted - self._settled} events held, "
                             f"max_buffered_events={self._max_buffered}")

    def _raise_if_fatal(self) -> None:
        fatal = self._fatal
        if fatal is not None:
            raise ClientError(str(fatal), status=fatal.status, body=fatal.body) from fatal

    def _settle(self, n: int) -> None:
        self._settled += n
        self._notify()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    # --- the background task

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Connect, pump frames and replies, reconnect; until `aclose` or a fatal refusal."""
        self._started = True
        task_status.started()
        try:
            while not self._closing:
                error = await self._connection()
                if self._closing:
                    break
                if _is_fatal(error):
                    self._fail(error)
                    break
                await self._back_off(error)
        finally:
            self._stopped.set()
            self._notify()

    async def _connection(self) -> BaseException | None:
        """One connection, from handshake to close; returns what ended it."""
        self._lost = None
        try:
            with trio.CancelScope() as self._connecting:
                async with open_websocket_url(
                        self.url, self._ssl, extra_headers=HEADERS,
                        message_queue_size=self._max_in_flight,
                        max_message_size=self._max_reply_bytes,
                        receive_buffer_size=self._receive_bytes,
                        connect_timeout=self._connect_timeout_s,
                        disconnect_timeout=self._close_timeout_s) as ws:
                    self._connecting = None
                    await self._pump(ws)
        except (HandshakeError, ConnectionClosed, OSError) as exc:
            return self._lost or exc
        finally:
            self._connecting = None
            self._connected = False
        return self._lost

    async def _pump(self, ws: Any) -> None:
        self._counts["reconnects"] += self._connects > 0
        self._connects += 1
        self._connected = True
        self._written = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._guard, self._write_frames, ws, nursery.cancel_scope)
            nursery.start_soon(self._guard, self._read_replies, ws, nursery.cancel_scope)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def _guard(self, loop: Any, ws: Any, scope: trio.CancelScope) -> None:
        try:
            await loop(ws)
        except ConnectionClosed as exc:
            self._lost = exc
        except _ProtocolViolation as exc:
            self._lost = exc
            with trio.move_on_after(self._close_timeout_s):
                await ws.aclose(1002, str(exc)[:120])
        scope.cancel()

    async def _back_off(self, error: BaseException | None) -> None:
        self._failures += 1
        self._counts["connect_failures"] += 1
        delay = backoff_delay(self._failures, *self._backoff, self._rng)
        log.debug("%s: %r; reconnecting in %.2f s", self.url, error, delay)
        with trio.move_on_after(delay):
            await self._stop.wait()

    def _fail(self, error: ConnectionRejected) -> None:
        log.warning("%s: handshake refused with %s", self.url, error.status_code)
        self._fatal = ClientError(f"WebSocket handshake refused with {error.status_code}",
                                  status=error.status_code, body=error.body or b"")
        self._fatal.__cause__ = error

    # --- frames out

    async def _write_frames(self, ws: Any) -> None:
        counts = self._counts
        while True:
            frame = self._next_frame()
            if frame is None:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            self._written += 1
            counts["frames_sent"] += 1
            if frame.sent:
                counts["frames_resent"] += 1
            frame.sent = True
            await ws.send_message(frame.data)

    def _next_frame(self) -> _Frame | None:
        """The next frame to write: an unanswered one not yet written on this connection,
        else a new one from the buffer while fewer than `max_in_flight` are out."""
        frames = self._frames
        if self._written < len(frames):
            return frames[self._written]
        pending = self._pending
        while pending and len(frames) < self._max_in_flight:
            n = min(len(pending), self._max_batch)
            frame = self._encode([pending.popleft() for _ in range(n)])
            if frame is not None:
                frames.append(frame)
                return frame
        return None

    def _encode(self, events: list[dict[str, Any]]) -> _Frame | None:
        seq = self._next_seq
        try:
            data = _encode({"events": events, "seq": seq})
        except _UNENCODABLE as exc:
            return self._split(events, "unencodable", str(exc))
        if len(data) > self._max_frame_bytes:
            limit = self._max_frame_bytes
            return self._split(events, "too_large", f"over max_frame_bytes={limit}")
        self._next_seq = seq + 1
        return _Frame(seq, len(events), data)

    def _split(self, events: list[dict[str, Any]], code: str, message: str) -> _Frame | None:
        """Halve a frame that cannot go out (the rest returns to the buffer's head) until
        the event at fault is alone: that one is refused here."""
        if len(events) > 1:
            half = len(events) // 2
            self._pending.extendleft(reversed(events[half:]))
            return self._encode(events[:half])
        self._record(FrameError(None, code, message, None, events))
        if self._frames:  # earlier events are still unanswered: settle in order
            self._frames[-1].extra += 1
        else:
            self._settle(1)
        return None

    # --- replies in

    async def _read_replies(self, ws: Any) -> None:
        while True:
            message = await ws.get_message()
            try:
                reply = _decode_reply(message)
            except msgspec.DecodeError as exc:
                raise _ProtocolViolation(f"unreadable reply: {exc}") from exc
            if reply.type == "ack" or reply.type == "error":
                self._answer(reply)

    def _answer(self, reply: _Reply) -> None:
        frames = self._frames
        if not self._written or reply.seq != frames[0].seq:
            expected = frames[0].seq if self._written else None
            raise _ProtocolViolation(f"reply for seq {reply.seq}, expected {expected}")
        frame = frames.popleft()
        self._written -= 1
        if reply.type == "ack":
            self._counts["events_acked"] += frame.count
            self._failures = 0
            self.session_id = reply.session_id or self.session_id
        else:
            events = msgspec.json.decode(frame.data)["events"]
            self._record(FrameError(frame.seq, reply.code, reply.message, reply.field, events))
        self._settle(frame.count + frame.extra)
        self._wake.set()

    def _record(self, error: FrameError) -> None:
        self._counts["events_refused"] += len(error.events)
        self.errors.append(error)
        if len(self.errors) > self._max_errors:
            del self.errors[0]


def _is_fatal(error: BaseException | None) -> bool:
    return (isinstance(error, ConnectionRejected) and 400 <= error.status_code < 500
            and error.status_code not in RETRYABLE_4XX)
