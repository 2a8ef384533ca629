"""One HTTP/1.1 connection, driven by h11 over a trio stream.

Rules:
- This module owns the socket of its connection and nothing else; what a request means
  is the route handler's business (`web.Routes`).
- Keep-alive and pipelining come from h11's cycle; a response is written with one
  `send_all`. Limits: head size (h11), body size (checked against Content-Length before
  reading, and while reading), whole-request and idle timeouts.
- Every client fault is answered with its status; a handler's unexpected exception is
  a 500 for that request only (logged), never the process.
- `Connections.drain()` (shutdown) closes idle connections and makes busy ones close
  after their current response.
"""

from __future__ import annotations

import logging
import math
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
    client_ip,
    error_response,
    parse_networks,
    route,
)

log = logging.getLogger("triolytics.http")
RECV_BYTES = 64 * 1024  # one read; also the most h11 buffers beyond a request head
SERVER = b"triolytics"
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
LINGER_S = 2.0  # how long a refused upload is read and discarded before closing
_NO_BODY_OK = {b"GET", b"HEAD", b"OPTIONS", b"DELETE"}
INTERNAL = b'{"error":{"code":"internal","message":"internal error; see the server log"}}'


class Connections:
    """The set of open connections, so shutdown can reach the idle ones."""

    def __init__(self) -> None:
        self.idle: set[trio.CancelScope] = set()
        self.draining = False
        self.count = 0

    def drain(self) -> None:
        self.draining = True
        for scope in self.idle:
            scope.cancel()


class _Context:
    """Per-connection state the timeout path needs."""

    __slots__ = ("timer", "origin", "receiving")

    def __init__(self) -> None:
        self.timer: trio.CancelScope | None = None
        self.origin: bytes | None = None  # of the request being received (for a 408)
        self.receiving = False  # part of a request is in: a timeout answers 408


class HttpServer:
    def __init__(self, config: Config, routes: Routes, upgrades: dict | None = None) -> None:
        self.config = config
        self.routes = routes
        self.upgrades = upgrades or {}  # path -> async fn(stream, request, leftover bytes)
        self.cors = Cors(config.cors_origins)
        self.trusted = parse_networks(config.trusted_proxies)
        self.date = DateHeader()
        self.connections = Connections()

    async def serve(self, stream: trio.abc.Stream, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.config.max_header_bytes)
        self.connections.count += 1
        try:
            await self._loop(conn, stream, peer)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.connections.count -= 1
            if conn.their_state is h11.SEND_BODY:
                await _linger(stream)
            await trio.aclose_forcefully(stream)

    async def _loop(self, conn: h11.Connection, stream: trio.abc.Stream, peer: str) -> None:
        # Phases of a request: idle (keep-alive timeout; drain closes the connection),
        # receiving (request timeout, answered 408), handling (no deadline: the writer's
        # own waits are bounded), sending (request timeout). One cancel scope for the
        # connection's life times them all by moving its deadline.
        conns = self.connections
        ctx = _Context()
        with trio.CancelScope() as timer:
            ctx.timer = timer
            while not conns.draining:
                timer.deadline = trio.current_time() + self.config.keepalive_timeout_s
                ctx.origin = None
                ctx.receiving = False
                event = await self._next_request(conn, stream, ctx)
                if event is None:
                    return
                if not await self._exchange(conn, stream, peer, event, ctx):
                    return
                if conn.our_state is h11.MUST_CLOSE or conns.draining:
                    return
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    return
        if timer.cancelled_caught and ctx.receiving:
            with trio.move_on_after(LINGER_S):
                await self._send_error(conn, stream, ApiError(
                    "request_timeout", "request not received in time"), ctx.origin)

    async def _next_request(self, conn: h11.Connection, stream: trio.abc.Stream, ctx):
        """Wait for the next request head. While nothing of it has arrived the connection
        is idle: `drain()` may close it then. None: the connection is done."""
        while True:
            event = await self._next(conn, stream, once=True)
            if event is not h11.NEED_DATA:
                return event
            if ctx.receiving:
                conn.receive_data(await stream.receive_some(RECV_BYTES))
                continue
            idle = trio.CancelScope()
            self.connections.idle.add(idle)
            try:
                with idle:
                    data = await stream.receive_some(RECV_BYTES)
            finally:
                self.connections.idle.discard(idle)
            if idle.cancelled_caught:
                return None
            conn.receive_data(data)
            ctx.receiving = True
            ctx.timer.deadline = trio.current_time() + self.config.request_timeout_s

    async def _next(self, conn: h11.Connection, stream: trio.abc.Stream, once: bool = False):
        """The next h11 event, reading as needed; None when the peer is gone. With
        `once`, NEED_DATA is returned instead of read for."""
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._send_error(conn, stream, ApiError(
                    _hint(exc.error_status_hint), f"bad HTTP request: {exc}"))
                return None
            if event is h11.NEED_DATA:
                if once:
                    return event
                if conn.they_are_waiting_for_100_continue:
                    await stream.send_all(conn.send(h11.InformationalResponse(
                        status_code=100, headers=[])))
                conn.receive_data(await stream.receive_some(RECV_BYTES))
                continue
            if type(event) is h11.ConnectionClosed:
                return None
            return event

    async def _exchange(self, conn, stream, peer: str, event, ctx: _Context) -> bool:
        """Read one request, answer it. False: the connection must close now."""
        if type(event) is not h11.Request:
            return False
        timer = ctx.timer
        if not ctx.receiving:  # a pipelined request, already buffered
            ctx.receiving = True
            timer.deadline = trio.current_time() + self.config.request_timeout_s
        headers = dict(event.headers)
        target = event.target
        path, _, query = target.partition(b"?")
        method = event.method
        origin = ctx.origin = headers.get(b"origin")
        upgrade = self.upgrades.get(path) if b"upgrade" in headers else None
        try:
            if len(target) + sum(map(len, headers)) + sum(map(len, headers.values())) \
                    > self.config.max_header_bytes:
                raise ApiError("header_too_large", "request head exceeds max_header_bytes")
            if upgrade is not None:
                request = Request(method, path, query, headers, b"",
                                  client_ip(peer, headers.get(b"x-forwarded-for"), self.trusted))
                await upgrade(stream, conn, request)
                return False
            if method == b"OPTIONS":
                response = self._options(Request(method, path, query, headers, b"", peer))
            else:
                handler = route(self.routes, method, path)
                if not self.cors.allowed(origin):
                    raise ApiError("forbidden_origin", "origin not allowed")
                body = await self._body(conn, stream, method, headers)
                if body is None:
                    return False
                ctx.receiving = False
                timer.deadline = math.inf  # handling: the writer's waits are bounded
                ip = client_ip(peer, headers.get(b"x-forwarded-for"), self.trusted)
                response = await handler(Request(method, path, query, headers, body, ip))
        except ApiError as exc:
            response = error_response(exc)
        except Exception:
            log.exception("unhandled error on %s %s", method.decode(), path.decode("latin-1"))
            response = Response(500, INTERNAL)
        timer.deadline = trio.current_time() + self.config.request_timeout_s
        if conn.their_state is h11.SEND_BODY and response.status not in (413, 431):
            await self._discard_body(conn, stream)  # keep the connection usable
        ctx.receiving = False
        return await self._respond(conn, stream, response, origin, method == b"HEAD")

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
        allow = b", ".join(sorted({*methods, b"OPTIONS"}))
        return Response(204, b"", [(b"allow", allow)], content_type=b"")

    async def _body(self, conn, stream, method: bytes, headers: dict) -> bytes | None:
        limit = self.config.max_request_bytes
        length = headers.get(b"content-length")
        if length is None and b"transfer-encoding" not in headers and method not in _NO_BODY_OK:
            raise ApiError("length_required", "send Content-Length or chunked encoding")
        if length is not None and int(length) > limit:
            raise ApiError("payload_too_large",
                           f"body exceeds {limit} bytes (max_request_bytes)")
        chunks = []
        size = 0
        while True:
            event = await self._next(conn, stream)
            if event is None:
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
        headers = [(b"date", self.date()), (b"server", SERVER)]
        if response.content_type:
            headers.append((b"content-type", response.content_type))
        headers.append((b"content-length", b"%d" % len(response.body)))
        if response.headers:
            headers.extend(response.headers)
        if origin is not None:
            headers.extend(self.cors.headers(origin))
        if conn.their_state is not h11.DONE or self.connections.draining:
            headers.append((b"connection", b"close"))
        try:
            data = conn.send(h11.Response(status_code=response.status, headers=headers,
                                          reason=REASONS.get(response.status, b"")))
            if response.body and not head:  # HEAD: same headers, no body
                data += conn.send(h11.Data(data=response.body))
            data += conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            return False
        await stream.send_all(data)
        return True

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


def _hint(status: int) -> str:
    return {431: "header_too_large", 413: "payload_too_large"}.get(status, "bad_request")
