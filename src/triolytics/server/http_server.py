"""One HTTP/1.1 connection, driven by h11 over a trio stream.

Rules:
- This module owns the socket of its connection and nothing else; what a request means
  is the route handler's business (`web.Routes`).
- h11 parses request heads (and chunked bodies); a Content-Length body is sliced from
  the bytes read, and responses are written here, each with one `send_all` (see
  `_loop` and `_head`). Keep-alive and pipelining follow h11's rules. Limits: head
  size, body size (checked against Content-Length before reading, and while reading),
  whole-request and idle timeouts.
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
import re
from http import HTTPStatus

import h11
import trio

from triolytics.core.config import Config
from triolytics.core.errors import ApiError
from triolytics.core.web import (
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
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_UNSAFE = re.compile(rb"[\r\n\0]")  # never in a header we write


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
    """One connection: what the sweeper and `drain()` need to know, and the bytes read
    past the request being served."""

    __slots__ = ("scope", "phase", "since", "origin", "why", "head_bytes", "upgrade", "rest",
                 "eof", "unread", "continued")

    def __init__(self, tick: int) -> None:
        self.scope = trio.CancelScope()
        self.phase = IDLE
        self.since = tick  # sweeper tick at which `phase` began
        self.origin: bytes | None = None  # of the request being received (for a 408)
        self.why: ApiError | None = None  # the answer owed if cancelled mid-request
        self.head_bytes = 0
        self.upgrade: tuple | None = None  # (handler, trailing, checked) once upgraded
        self.rest = b""  # received after the current request (pipelined requests)
        self.eof = False  # the peer has closed its side
        self.unread = False  # the current request's body is not (all) read
        self.continued = False  # `100 Continue` was sent for the current request


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
        self._heads: dict[tuple, bytes] = {}  # plain response heads, this second
        self._heads_date = b""

    async def sweep(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the timeouts (forever; cancel to stop)."""
        task_status.started()
        while True:
            await trio.sleep(SWEEP_S)
            self.connections.sweep()

    async def serve(self, stream: trio.abc.Stream, peer: str) -> None:
        c = _Conn(self.connections.tick)
        self.connections.open.add(c)
        upgraded = None
        try:
            with c.scope:
                upgraded = await self._loop(stream, peer, c)
            if c.scope.cancelled_caught and c.phase == RECEIVING and c.why is not None:
                with trio.move_on_after(LINGER_S):
                    await self._send_error(stream, c.why, c.origin)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.connections.open.discard(c)
            if upgraded is None:
                if c.unread:
                    await _linger(stream)
                await trio.aclose_forcefully(stream)
        if upgraded is not None:  # the other protocol owns the connection from here, and
            handler, trailing, checked = upgraded
            del c, upgraded  # what the HTTP side held is freed
            try:
                await handler(stream, checked, trailing)
            finally:
                await trio.aclose_forcefully(stream)

    async def _loop(self, stream: trio.abc.Stream, peer: str, c: _Conn) -> tuple | None:
        """Serve requests until the connection must close; an accepted upgrade is
        returned as (handler, bytes read past the head, checked) for `serve` to run.

        h11 parses each request head, on a fresh `h11.Connection` fed with what was read
        past the previous request (which costs less than `start_next_cycle`). Bodies
        with a Content-Length are sliced from those bytes here, and responses are
        written here, so h11 is not on the path of either (see `_respond`)."""
        conns = self.connections
        limit = self.config.max_header_bytes
        while not conns.draining:
            c.phase = IDLE
            c.since = conns.tick
            c.origin = None
            c.head_bytes = 0  # read for this head; 0: it was already buffered (pipelined)
            c.continued = False
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limit)
            if c.rest:
                conn.receive_data(c.rest)
            if c.eof:
                conn.receive_data(b"")
            while True:  # the next request's head
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    await self._protocol_error(stream, exc)
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

    async def _exchange(self, conn, stream, peer: str, event, c: _Conn) -> bool:
        """Read one request, answer it. False: the connection must close now."""
        headers = header_dict(event.headers)
        target = event.target
        path, _, query = target.partition(b"?")
        method = event.method
        origin = c.origin = headers.get(b"origin")
        upgrade = self.upgrades.get(path) if b"upgrade" in headers else None
        c.unread = b"transfer-encoding" in headers or headers.get(b"content-length", b"0") != b"0"
        try:
            if not 0 < c.head_bytes <= self.config.max_header_bytes and \
                    _head_size(target, headers) > self.config.max_header_bytes:
                raise ApiError("header_too_large", "request head exceeds max_header_bytes")
            if upgrade is not None:  # refused, it closes as a failed handshake does
                request = Request(method, path, query, headers, b"",
                                  client_ip(peer, headers.get(b"x-forwarded-for"), self.trusted))
                accepted = upgrade.check(request)  # a refusal is answered here, as HTTP
                c.phase = HANDLING  # the upgraded connection keeps its own timeouts
                c.unread = False
                c.upgrade = (upgrade.upgrade, conn.trailing_data[0], accepted)
                return False
            if method == b"OPTIONS":
                response = self._options(Request(method, path, query, headers, b"", peer))
            else:
                handler = route(self.routes, method, path)
                if origin is not None and not self.cors.allowed(origin):
                    raise ApiError("forbidden_origin", "origin not allowed")
                if not c.unread and b"content-length" not in headers and \
                        method not in _NO_BODY_OK and path not in self.bodiless:
                    # (`POST /create` is bodiless: "Headers: None, Body: None")
                    raise ApiError("length_required", "send Content-Length or chunked encoding")
                body = await self._body(conn, stream, headers, c, invite=True)
                if body is None:
                    return False
                if c.scope.cancel_called:  # timed out or drained as the body arrived:
                    return await self._refuse(stream, c)  # honestly, nothing stored
                c.phase = HANDLING  # from here the request is always answered
                ip = client_ip(peer, headers.get(b"x-forwarded-for"), self.trusted)
                response = await handler(Request(method, path, query, headers, body, ip))
        except ApiError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("unhandled error on %s %s", method.decode(), path.decode("latin-1"))
            response = Response(500, INTERNAL)
        if c.unread and response.status not in (400, 413, 431):  # (400: h11 gave up)
            if c.phase == HANDLING:  # reading again: the receive timeout applies
                c.phase = RECEIVING
                c.since = self.connections.tick
            try:  # read past the body we refused, to keep the connection usable
                await self._body(conn, stream, headers, c, invite=False)
            except ApiError:
                pass  # too long to read past: close instead
        close = c.unread or upgrade is not None or self.connections.draining or \
            not _keeps_alive(event, headers)
        c.phase = SENDING
        c.since = self.connections.tick
        return await self._respond(stream, response, origin, close, method == b"HEAD")

    async def _refuse(self, stream, c: _Conn) -> bool:
        """Answer a request the sweeper or drain cancelled before it reached its handler."""
        with trio.CancelScope(shield=True), trio.move_on_after(LINGER_S):
            await self._send_error(stream, c.why or UNAVAILABLE, c.origin)
        return False

    def _options(self, req: Request) -> Response:
        methods = self.routes.get(req.path)
        if methods is None:
            raise ApiError("not_found", f"no such endpoint: {req.path.decode('latin-1')}")
        if b"origin" in req.headers:
            return self.cors.preflight(req, list(methods))
        return Response(204, b"", [(b"allow", allowed_methods(methods))], content_type=b"")

    async def _body(self, conn, stream, headers: dict, c: _Conn, invite: bool) -> bytes | None:
        """The request's whole body (b"" when it has none); None when the peer went away
        or (`invite` false) would only send it after a `100 Continue`. Over
        `max_request_bytes`: 413, before reading when Content-Length says so.

        A Content-Length body is sliced from the bytes read past the head (h11 checked
        the header); a chunked one is decoded by h11."""
        if not c.unread:
            c.rest, c.eof = conn.trailing_data
            return b""
        limit = self.config.max_request_bytes
        if b"transfer-encoding" in headers:
            body = await self._chunked(conn, stream, c, limit, invite)
        else:
            length = int(headers[b"content-length"])
            if length > limit:
                raise ApiError("payload_too_large",
                               f"body exceeds {limit} bytes (max_request_bytes)")
            body = await self._sized(conn, stream, c, length, invite)
        if body is not None:
            c.unread = False
        return body

    async def _sized(self, conn, stream, c: _Conn, length: int, invite: bool) -> bytes | None:
        data, closed = conn.trailing_data
        if len(data) < length:
            if not (closed or c.continued) and conn.they_are_waiting_for_100_continue:
                if not invite:
                    return None
                c.continued = True
                await stream.send_all(CONTINUE)
            chunks = [data]
            have = len(data)
            while have < length:
                more = b"" if closed else await stream.receive_some(RECV_BYTES)
                if not more:
                    return None
                chunks.append(more)
                have += len(more)
            data = b"".join(chunks)
        c.rest = data[length:]
        c.eof = closed
        return data[:length] if len(data) > length else data

    async def _chunked(self, conn, stream, c: _Conn, limit: int, invite: bool) -> bytes | None:
        chunks = []
        size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise protocol_error(exc) from None
            if event is h11.NEED_DATA:
                if not c.continued and conn.they_are_waiting_for_100_continue:
                    if not invite:
                        return None
                    c.continued = True
                    await stream.send_all(CONTINUE)
                conn.receive_data(await stream.receive_some(RECV_BYTES))
                continue
            if type(event) is h11.EndOfMessage:
                c.rest, c.eof = conn.trailing_data
                return b"".join(chunks)
            if type(event) is not h11.Data:
                return None  # ConnectionClosed
            size += len(event.data)
            if size > limit:
                raise ApiError("payload_too_large",
                               f"body exceeds {limit} bytes (max_request_bytes)")
            chunks.append(event.data)

    async def _respond(self, stream, response: Response, origin: bytes | None, close: bool,
                       head: bool = False) -> bool:
        """Write the response in one `send_all`: head and body, no body for HEAD.
        False: it told the client the connection closes."""
        try:
            data = self._head(response, origin, close)
        except ValueError:
            log.error("refused to send a response header holding CR, LF or NUL: %r",
                      response.headers)
            response, close = Response(500, INTERNAL), True
            data = self._head(response, None, close)
        if response.body and not head:
            data += response.body
        await stream.send_all(data)
        return not close

    def _head(self, response: Response, origin: bytes | None, close: bool) -> bytes:
        """The response head's bytes, written here rather than by h11: h11 rebuilds and
        re-validates every head it sends, which cost as much as parsing the request.
        Every value here is ours or one h11 already validated as a request header; the
        check below keeps it that way. Plain heads (no extra headers, no CORS) are
        cached for the current second: a busy server sends the same few all second."""
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
        extra = list(response.headers)
        if origin is not None:
            extra.extend(self.cors.headers(origin))
        if any(_UNSAFE.search(name) or _UNSAFE.search(value) for name, value in extra):
            raise ValueError("a response header holds CR, LF or NUL")
        lines = [b"HTTP/1.1 %d %s\r\ndate: %s\r\n" % (
            response.status, REASONS.get(response.status, b""), date)]
        if response.content_type:
            lines.append(b"content-type: %s\r\n" % response.content_type)
        lines.append(b"content-length: %d\r\n" % len(response.body))
        lines.extend(b"%s: %s\r\n" % header for header in extra)
        if close:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        built = b"".join(lines)
        if plain and len(self._heads) < HEAD_CACHE_SIZE:
            self._heads[key] = built
        return built

    async def _protocol_error(self, stream, exc: h11.RemoteProtocolError) -> None:
        """Answer what h11 could not parse with the status it suggests."""
        await self._send_error(stream, protocol_error(exc))

    async def _send_error(self, stream, exc: ApiError, origin: bytes | None = None) -> None:
        """Answer with an error, then the connection closes."""
        await self._respond(stream, error_response(exc), origin, close=True)


def protocol_error(exc: h11.RemoteProtocolError) -> ApiError:
    """What h11 could not parse, with the status it suggests."""
    code = {431: "header_too_large", 413: "payload_too_large"}.get(
        exc.error_status_hint, "bad_request")
    return ApiError(code, f"bad HTTP request: {exc}")


def _keeps_alive(event: h11.Request, headers: dict[bytes, bytes]) -> bool:
    """Whether the connection may serve another request after this one, by h11's rule:
    HTTP/1.1 or later and no `close` among the Connection header's tokens."""
    if event.http_version < b"1.1":
        return False
    if b"connection" not in headers:
        return True
    return b"close" not in _tokens(event.headers, b"connection")


def _tokens(headers: h11._headers.Headers, name: bytes) -> list[bytes]:
    """A comma-separated header's tokens over all its lines, lower-cased and stripped."""
    full = getattr(headers, "_full_items", None)
    items = ((n, v) for _, n, v in full) if full is not None else iter(headers)
    return [t.strip() for n, v in items if n == name for t in v.lower().split(b",")]


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

