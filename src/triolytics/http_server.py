"""One HTTP/1.1 connection, driven by h11 over a trio stream.

Rules:
- This module owns the socket of its connection and nothing else; what a request means
  is the route handler's business (`web.Routes`).
- Keep-alive and pipelining come from h11's cycle; a response is written with one
  `send_all`. Limits: head size, body size (checked against Content-Length before
  reading, and while reading), whole-request and idle timeouts.
- Timeouts cost the request path nothing but two attribute stores: each connection
  records its phase and when it entered it, and one sweeper task (`sweep`) cancels the
  connections that overstayed. A phase's timeout: idle, `keepalive_timeout_s` (closed
  quietly; `drain()` closes idle connections at once); receiving or sending,
  `request_timeout_s` (a 408 while receiving); handling, none — the writer's waits are
  bounded, and a request whose rows reached the writer is never abandoned.
- Every client fault is answered with its status; a handler's unexpected exception is
  a 500 for that request only (logged), never the process.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import h11
import trio

from triolytics.config import Config
from triolytics.errors import ApiError
from triolytics.web import (
    Cors,
    DateHeader,
    Request,
    Response,
    Routes,
    allowed_methods,
    client_ip,
    error_response,
    parse_networks,
    route,
)

log = logging.getLogger("triolytics.http")
RECV_BYTES = 64 * 1024  # one read; also the most h11 buffers beyond a request head
SWEEP_S = 0.5  # how often timeouts are checked: each timeout is late by at most this
LINGER_S = 2.0  # how long a refused upload is read and discarded before closing
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_NO_BODY_OK = {b"GET", b"HEAD", b"OPTIONS", b"DELETE"}
INTERNAL = b'{"error":{"code":"internal","message":"internal error; see the server log"}}'
IDLE, RECEIVING, HANDLING, SENDING = range(4)
HEAD_CACHE_SIZE = 64  # distinct plain response heads kept per second
_END = h11.EndOfMessage()


def _head_size(target: bytes, headers: dict[bytes, bytes]) -> int:
    """A parsed head's size (near enough: separators not counted). Only computed when
    more than `max_header_bytes` arrived with the head, so the limit is exact without
    costing the common request anything."""
    return len(target) + sum(map(len, headers)) + sum(map(len, headers.values()))


def header_dict(headers: h11._headers.Headers) -> dict[bytes, bytes]:
    """Lower-cased name -> value (the last one wins). Iterating h11's `Headers` goes
    through the generic Sequence protocol, an item at a time; its list of (raw name,
    name, value) is read directly when present (3x cheaper, on every request)."""
    full = getattr(headers, "_full_items", None)
    if full is None:
        return dict(headers)
    return {name: value for _, name, value in full}


class _Conn:
    """What the sweeper and `drain()` need to know about one connection."""

    __slots__ = ("scope", "phase", "since", "origin", "why", "head_bytes", "upgrade")

    def __init__(self, tick: int) -> None:
        self.scope = trio.CancelScope()
        self.phase = IDLE
        self.since = tick  # sweeper tick at which `phase` began
        self.origin: bytes | None = None  # of the request being received (for a 408)
        self.why: ApiError | None = None  # the answer owed if cancelled mid-request
        self.head_bytes = 0
        self.upgrade: tuple | None = None  # (handler, trailing, checked) once upgraded


class Connections:
    """The open connections, their timeouts, and shutdown's drain."""

    def __init__(self, keepalive_s: float, request_s: float) -> None:
        self.open: set[_Conn] = set()
        self.draining = False
        self.tick = 0
        self.keepalive_ticks = keepalive_s / SWEEP_S
        self.request_ticks = request_s / SWEEP_S

    @property
    def count(self) -> int:
        return len(self.open)

    @property
    def idle(self) -> list[_Conn]:
        return [c for c in self.open if c.phase == IDLE]

    def drain(self) -> None:
        self.draining = True
        for c in self.idle:
            c.why = UNAVAILABLE
            c.scope.cancel()

    def sweep(self) -> None:
        """One tick: cancel every connection past its phase's timeout."""
        self.tick = tick = self.tick + 1
        for c in self.open:
            if c.phase == IDLE:
                if tick - c.since > self.keepalive_ticks:
                    c.scope.cancel()
            elif c.phase != HANDLING and tick - c.since > self.request_ticks:
                c.why = TIMED_OUT
                c.scope.cancel()


TIMED_OUT = ApiError("request_timeout", "request not received in time")
UNAVAILABLE = ApiError("unavailable", "server is shutting down; retry",
                       headers=((b"retry-after", b"1"),))


class HttpServer:
    def __init__(self, config: Config, routes: Routes, upgrades: dict | None = None,
                 bodiless: frozenset[bytes] = frozenset()) -> None:
        self.config = config
        self.routes = routes
        self.bodiless = bodiless  # paths whose POST without framing has an empty body
        # path -> an object with `check(request)` (ApiError to refuse, else a value) and
        # `async upgrade(stream, value, trailing)`, which owns the connection and answers
        # the request itself; `trailing` is what the client sent after the request head.
        self.upgrades = upgrades or {}
        self.cors = Cors(config.cors_origins)
        self.trusted = parse_networks(config.trusted_proxies)
        self.date = DateHeader()
        self.connections = Connections(config.keepalive_timeout_s, config.request_timeout_s)
        self._heads: dict[tuple, h11.Response] = {}  # plain response heads, this second
        self._heads_date = b""

    async def sweep(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the timeouts (forever; cancel to stop)."""
        task_status.started()
        while True:
            await trio.sleep(SWEEP_S)
            self.connections.sweep()

    async def serve(self, stream: trio.abc.Stream, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
        c = _Conn(self.connections.tick)
        self.connections.open.add(c)
        upgraded = None
        try:
            with c.scope:
                upgraded = await self._loop(conn, stream, peer, c)
            if c.scope.cancelled_caught and c.phase == RECEIVING and c.why is not None:
                with trio.move_on_after(LINGER_S):
                    await self._send_error(conn, stream, c.why, c.origin)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.connections.open.discard(c)
            if upgraded is None:
                if conn.their_state is h11.SEND_BODY:
                    await _linger(stream)
                await trio.aclose_forcefully(stream)
        if upgraded is not None:  # the other protocol owns the connection from here, and
            handler, trailing, checked = upgraded
            del conn, c, upgraded  # what h11 held is freed (a long-lived WebSocket holds less)
            try:
                await handler(stream, checked, trailing)
            finally:
                await trio.aclose_forcefully(stream)

    async def _loop(self, conn: h11.Connection, stream: trio.abc.Stream, peer: str,
                    c: _Conn) -> tuple | None:
        """Serve requests until the connection must close; an accepted upgrade is
        returned as (handler, bytes read past the head, checked) for `serve` to run."""
        conns = self.connections
        while not conns.draining:
            c.phase = IDLE
            c.since = conns.tick
            c.origin = None
            c.head_bytes = 0  # read for this head; 0: it was already buffered (pipelined)
            while True:  # the next request's head
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._protocol_error(conn, stream, exc)
                    return
                if event is not h11.NEED_DATA:
                    break
                data = await stream.receive_some(RECV_BYTES)
                c.head_bytes += len(data)
                if c.phase == IDLE:
                    c.phase = RECEIVING
                    c.since = conns.tick
                conn.receive_data(data)
            if type(event) is not h11.Request:
                return  # ConnectionClosed
            if c.phase == IDLE:  # a pipelined request, already buffered
                c.phase = RECEIVING
                c.since = conns.tick
            if not await self._exchange(conn, stream, peer, event, c):
                return c.upgrade
            if conn.our_state is h11.MUST_CLOSE:
                return
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next(self, conn: h11.Connection, stream: trio.abc.Stream):
        """The next h11 event, reading as needed; None when the peer is gone."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._protocol_error(conn, stream, exc)
                return None
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(conn.send(h11.InformationalResponse(
                        status_code=100, headers=[])))
                conn.receive_data(await stream.receive_some(RECV_BYTES))
                continue
            if type(event) is h11.ConnectionClosed:
                return None
            return event

    async def _exchange(self, conn, stream, peer: str, event, c: _Conn) -> bool:
        """Read one request, answer it. False: the connection must close now."""
        headers = header_dict(event.headers)
        target = event.target
        path, _, query = target.partition(b"?")
        method = event.method
        origin = c.origin = headers.get(b"origin")
        upgrade = self.upgrades.get(path) if b"upgrade" in headers else None
        try:
            if not 0 < c.head_bytes <= self.config.max_header_bytes and \
                    _head_size(target, headers) > self.config.max_header_bytes:
                raise ApiError("header_too_large", "request head exceeds max_header_bytes")
            if upgrade is not None:
                request = Request(method, path, query, headers, b"",
                                  client_ip(peer, headers.get(b"x-forwarded-for"), self.trusted))
                accepted = upgrade.check(request)  # a refusal is answered here, as HTTP
                c.phase = HANDLING  # the upgraded connection keeps its own timeouts
                c.upgrade = (upgrade.upgrade, conn.trailing_data[0], accepted)
                return False
            if method == b"OPTIONS":
                response = self._options(Request(method, path, query, headers, b"", peer))
            else:
                handler = route(self.routes, method, path)
                if origin is not None and not self.cors.allowed(origin):
                    raise ApiError("forbidden_origin", "origin not allowed")
                body = await self._body(conn, stream, method, path, headers)
                if body is None:
                    return False
                if c.scope.cancel_called:  # timed out or drained as the body arrived:
                    return await self._refuse(conn, stream, c)  # honestly, nothing stored
                c.phase = HANDLING  # from here the request is always answered
                ip = client_ip(peer, headers.get(b"x-forwarded-for"), self.trusted)
                response = await handler(Request(method, path, query, headers, body, ip))
        except ApiError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("unhandled error on %s %s", method.decode(), path.decode("latin-1"))
            response = Response(500, INTERNAL)
        if conn.their_state is h11.SEND_BODY and response.status not in (413, 431):
            if c.phase == HANDLING:  # reading again: the receive timeout applies
                c.phase = RECEIVING
                c.since = self.connections.tick
            await self._discard_body(conn, stream)  # keep the connection usable
        c.phase = SENDING
        c.since = self.connections.tick
        return await self._respond(conn, stream, response, origin, method == b"HEAD")

    async def _refuse(self, conn, stream, c: _Conn) -> bool:
        """Answer a request the sweeper or drain cancelled before it reached its handler."""
        with trio.CancelScope(shield=True), trio.move_on_after(LINGER_S):
            await self._send_error(conn, stream, c.why or UNAVAILABLE, c.origin)
        return False

    async def _discard_body(self, conn, stream) -> None:
        left = self.config.max_request_bytes
        while left > 0 and conn.their_state is h11.SEND_BODY:
            event = await self._next(conn, stream)
            if event is None or type(event) is h11.EndOfMessage:
                return
            left -= len(event.data)

    def _options(self, req: Request) -> Response:
        methods = self.routes.get(req.path)
        if methods is None:
            raise ApiError("not_found", f"no such endpoint: {req.path.decode('latin-1')}")
        if b"origin" in req.headers:
            return self.cors.preflight(req, list(methods))
        return Response(204, b"", [(b"allow", allowed_methods(methods))], content_type=b"")

    async def _body(self, conn, stream, method: bytes, path: bytes,
                    headers: dict) -> bytes | None:
        limit = self.config.max_request_bytes
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" not in headers and method not in _NO_BODY_OK:
            if path in self.bodiless:  # `POST /create`: "Headers: None, Body: None"
                return b""
            raise ApiError("length_required", "send Content-Length or chunked encoding")
        if length is not None and int(length) > limit:
            raise ApiError("payload_too_large",
                           f"body exceeds {limit} bytes (max_request_bytes)")
        chunks = []
        size = 0
        while True:
            try:  # the body is usually buffered already: no coroutine call per event
                event = conn.next_event()
            except h11.RemoteProtocolError:
                event = h11.NEED_DATA  # let _next answer it
            if event is h11.NEED_DATA:
                event = await self._next(conn, stream)
            if event is None or type(event) is h11.ConnectionClosed:
                return None
            if type(event) is h11.EndOfMessage:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            size += len(event.data)
            if size > limit:
                raise ApiError("payload_too_large",
                               f"body exceeds {limit} bytes (max_request_bytes)")
            chunks.append(event.data)

    async def _respond(self, conn, stream, response: Response, origin,
                       head: bool = False) -> bool:
        close = conn.their_state is not h11.DONE or self.connections.draining
        try:
            data = conn.send(self._head(response, origin, close))
            if response.body and not head:  # HEAD: same headers, no body
                data += conn.send(h11.Data(data=response.body))
            data += conn.send(_END)
        except h11.LocalProtocolError:
            return False
        await stream.send_all(data)
        return True

    def _head(self, response: Response, origin: bytes | None, close: bool) -> h11.Response:
        """The response head. Plain heads (no extra headers, no CORS) are cached for the
        current second: h11 validates a head when it is built, which costs as much as
        the rest of sending it, and a busy server sends the same few heads all second."""
        date = self.date()
        plain = not response.headers and origin is None
        if plain:
            if date is not self._heads_date:
                self._heads.clear()
                self._heads_date = date
            key = (response.status, len(response.body), response.content_type, close)
            cached = self._heads.get(key)
            if cached is not None:
                return cached
        headers = [(b"date", date)]
        if response.content_type:
            headers.append((b"content-type", response.content_type))
        headers.append((b"content-length", b"%d" % len(response.body)))
        if response.headers:
            headers.extend(response.headers)
        if origin is not None:
            headers.extend(self.cors.headers(origin))
        if close:
            headers.append((b"connection", b"close"))
        built = h11.Response(status_code=response.status, headers=headers,
                             reason=REASONS.get(response.status, b""))
        if plain and len(self._heads) < HEAD_CACHE_SIZE:
            self._heads[key] = built
        return built

    async def _protocol_error(self, conn, stream, exc: h11.RemoteProtocolError) -> None:
        """Answer what h11 could not parse with the status it suggests."""
        code = {431: "header_too_large", 413: "payload_too_large"}.get(
            exc.error_status_hint, "bad_request")
        await self._send_error(conn, stream, ApiError(code, f"bad HTTP request: {exc}"))

    async def _send_error(self, conn, stream, exc: ApiError, origin: bytes | None = None) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        await self._respond(conn, stream, error_response(exc), origin)


async def _linger(stream: trio.abc.Stream) -> None:
    """Half-close and read what the client still sends (briefly), so a client that is
    mid-upload sees our error response rather than a connection reset."""
    with trio.move_on_after(LINGER_S):
        try:
            await stream.send_eof()
            while await stream.receive_some(RECV_BYTES):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, AttributeError,
                NotImplementedError):
            pass

