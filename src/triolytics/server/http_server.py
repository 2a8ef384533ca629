"""One HTTP/1.1 connection, driven by h11 over a trio stream.

Rules:
- This module owns the socket of its connection and nothing else; what a request means
  is the route handler's business (`web.Routes`).
- A request head is framed here (read until its blank line, its bytes and lines
  counted: 431 past `max_header_bytes` or `max_header_count`, however the bytes arrive),
  then h11 parses it (and chunked bodies); a Content-Length body is sliced from the
  bytes read, and responses are written here, each with one `send_all` (see `_loop`
  and `_head`). Keep-alive and pipelining follow h11's rules. Body size is checked
  against Content-Length before reading, and while reading.
- Framing is never ambiguous (RFC 9112 section 6): Transfer-Encoding with
  Content-Length, or in HTTP/1.0, is a 400; a transfer coding other than `chunked`
  alone a 400 or 501 (h11 refuses it, `protocol_error` says which). Either closes.
- Timeouts cost the request path nothing but a few attribute stores: each connection
  records its phase and when it entered it, and one sweeper task (`sweep`) cancels the
  connections that overstayed. A phase's timeout: fresh (accepted, nothing received)
  and head, `head_timeout_s` from accept for a connection's first request, from its
  first byte for later ones (a 408 once a byte came, else closed quietly); idle
  (between requests), `keepalive_timeout_s` (closed quietly; `drain()` closes idle
  connections at once); body, `request_timeout_s`, and `min_body_rate_bytes_s` on
  average once `body_rate_grace_s` has passed (a 408); sending, `request_timeout_s`;
  handling, none — the writer's waits are bounded, and a request whose rows reached
  the writer is never abandoned.
- Connection caps (`max_connections`, `max_connections_per_ip`; `admission.Caps`) are
  taken when a connection starts and given back when it closes, upgraded or not. Over
  a cap: a 503 with Retry-After, written without reading the request, then close.
- Every client fault is answered with its status; a handler's unexpected exception is
  a 500 for that request only (logged), never the process.
"""

from __future__ import annotations

import contextlib
import logging
import re
from http import HTTPStatus

import h11
import trio

from triolytics.core.admission import Caps, client_key
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
    in_networks,
    parse_networks,
    route,
)

log = logging.getLogger("triolytics.http")
RECV_BYTES = 64 * 1024  # one read; also the most h11 buffers beyond a request head
SWEEP_S = 0.5  # how often timeouts are checked: each timeout is late by at most this
REFUSALS_LOG_S = 10.0  # connections refused at a cap: one log line per this, with counts
LINGER_S = 2.0  # how long a refused upload is read and discarded before closing
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_NO_BODY_OK = {b"GET", b"HEAD", b"OPTIONS", b"DELETE"}
INTERNAL = b'{"error":{"code":"internal","message":"internal error; see the server log"}}'
IDLE, FRESH, HEAD, BODY, HANDLING, SENDING = range(6)  # a connection's phases
HEAD_CACHE_SIZE = 64  # distinct plain response heads kept per second
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_UNSAFE = re.compile(rb"[\r\n\0]")  # never in a header we write
_HEAD_END = re.compile(rb"\n\r?\n")  # a head's blank line, as h11 finds it
_TE_LINE = re.compile(rb"^transfer-encoding:(.*)$", re.I | re.M)
_CL_LINE = re.compile(rb"^content-length:", re.I | re.M)


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

    __slots__ = ("scope", "phase", "since", "origin", "why", "got", "upgrade", "rest",
                 "eof", "unread", "continued")

    def __init__(self, tick: int) -> None:
        self.scope = trio.CancelScope()
        self.phase = FRESH
        self.since = tick  # sweeper tick at which `phase` began
        self.origin: bytes | None = None  # of the request being received (for a 408)
        self.why: ApiError | None = None  # the answer owed if cancelled mid-request
        self.got = 0  # body bytes received since the body phase began (its rate)
        self.upgrade: tuple | None = None  # (handler, trailing, checked) once upgraded
        self.rest = b""  # received after the current request (pipelined requests)
        self.eof = False  # the peer has closed its side
        self.unread = False  # the current request's body is not (all) read
        self.continued = False  # `100 Continue` was sent for the current request


class Connections:
    """The open connections, their timeouts and caps, and shutdown's drain."""

    def __init__(self, config: Config) -> None:
        self.open: set[_Conn] = set()  # served as HTTP now (not upgraded)
        self.caps = Caps(config.max_connections, config.max_connections_per_ip)
        self.draining = False
        self.tick = 0
        self.keepalive_ticks = config.keepalive_timeout_s / SWEEP_S
        self.head_ticks = config.head_timeout_s / SWEEP_S
        self.request_ticks = config.request_timeout_s / SWEEP_S
        self.grace_ticks = config.body_rate_grace_s / SWEEP_S
        self.rate_per_tick = config.min_body_rate_bytes_s * SWEEP_S
        self.report_tick = 0  # refusals are next logged at this tick or later
        self.reported_tick = 0

    @property
    def count(self) -> int:
        return len(self.open)

    @property
    def idle(self) -> list[_Conn]:
        return [c for c in self.open if c.phase < HEAD]

    def drain(self) -> None:
        self.draining = True
        for c in self.idle:
            c.why = UNAVAILABLE
            c.scope.cancel()

    def sweep(self) -> None:
        """One tick: cancel every connection past its phase's timeout; log refusals."""
        self.tick = tick = self.tick + 1
        for c in self.open:
            phase, age = c.phase, tick - c.since
            if phase == IDLE:
                if age > self.keepalive_ticks:
                    c.scope.cancel()
            elif phase == FRESH:
                if age > self.head_ticks:
                    c.scope.cancel()  # nothing came: closed quietly
            elif phase == HEAD:
                if age > self.head_ticks:
                    c.why = HEAD_TIMED_OUT
                    c.scope.cancel()
            elif phase == BODY:
                if age > self.request_ticks:
                    c.why = BODY_TIMED_OUT
                    c.scope.cancel()
                elif c.got < (age - self.grace_ticks) * self.rate_per_tick:
                    c.why = BODY_TOO_SLOW
                    c.scope.cancel()
            elif phase == SENDING and age > self.request_ticks:
                c.scope.cancel()
        if tick >= self.report_tick:
            self._report_refusals(tick)

    def _report_refusals(self, tick: int) -> None:
        """One warning for the connections refused since the last one, if any."""
        total, per_ip = self.caps.take_refused()
        if total or per_ip:
            log.warning("refused %d connections in the last %.1fs: %d at max_connections "
                        "(%d), %d at max_connections_per_ip (%d; last from %s)",
                        total + per_ip, (tick - self.reported_tick) * SWEEP_S, total,
                        self.caps.total, per_ip, self.caps.per_key, self.caps.last_refused)
            self.reported_tick = tick
            self.report_tick = tick + REFUSALS_LOG_S / SWEEP_S


HEAD_TIMED_OUT = ApiError("request_timeout", "request head not received in time "
                          "(head_timeout_s)")
BODY_TIMED_OUT = ApiError("request_timeout", "request body not received in time "
                          "(request_timeout_s)")
BODY_TOO_SLOW = ApiError("request_timeout", "request body arriving too slowly "
                         "(min_body_rate_bytes_s)")
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
        self.connections = Connections(config)
        self.max_lines = config.max_header_count
        # A shorter head cannot hold more lines (a request line takes 13 bytes or more,
        # a header line 3: `a:` and LF), so the common small head is not counted.
        self._countable = 13 + 3 * (self.max_lines + 1)
        retry = ((b"retry-after", str(config.retry_after_s).encode()),)
        self.full = ApiError("too_many_connections", "the server has too many connections "
                             "(max_connections); retry later", headers=retry)
        self.full_ip = ApiError("too_many_connections", "too many connections from your "
                                "address (max_connections_per_ip); retry later", headers=retry)
        self._heads: dict[tuple, bytes] = {}  # plain response heads, this second
        self._heads_date = b""
        # Responses by (route, status), read at scrape time (server/metrics.py); a path
        # that is no route counts as b"other", so the keys stay few.
        self.responses: dict[tuple[bytes, int], int] = {}

    def _count(self, path: bytes, status: int) -> None:
        key = (path if path in self.routes else b"other", status)
        self.responses[key] = self.responses.get(key, 0) + 1

    async def sweep(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the timeouts (forever; cancel to stop)."""
        task_status.started()
        while True:
            await trio.sleep(SWEEP_S)
            self.connections.sweep()

    async def serve(self, stream: trio.abc.Stream, peer: str) -> None:
        """Serve one connection (`peer`: its address) until it closes, or refuse it
        over a connection cap."""
        key = None if self.trusted and in_networks(peer, self.trusted) else client_key(peer)
        caps = self.connections.caps
        if not caps.admit(key):
            await self._turn_away(stream)
            return
        try:
            await self._serve(stream, peer)
        finally:
            caps.release(key)

    async def _turn_away(self, stream: trio.abc.Stream) -> None:
        """Refuse a connection over a cap at once: a 503, written without reading the
        request (a fast answer beats a hang), then close."""
        full = self.full if self.connections.caps.open >= self.connections.caps.total \
            else self.full_ip
        self._count(b"other", full.status)
        try:
            with trio.move_on_after(LINGER_S):
                await self._send_error(stream, full)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.Stream, peer: str) -> None:
        c = _Conn(self.connections.tick)
        self.connections.open.add(c)
        upgraded = None
        try:
            with c.scope:
                upgraded = await self._loop(stream, peer, c)
            if c.scope.cancelled_caught and c.phase in (HEAD, BODY) and c.why is not None:
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

        Each request head is read whole (`_receive_head`), then parsed by h11 on a
        fresh `h11.Connection` fed with it and what came after it (which costs less
        than `start_next_cycle`). Bodies with a Content-Length are sliced from those
        bytes here, and responses are written here, so h11 is not on the path of
        either (see `_respond`). A refused head closes the connection."""
        conns = self.connections
        while not conns.draining:
            if c.phase != FRESH:
                c.phase = IDLE
                c.since = conns.tick
            c.origin = None
            c.continued = False
            try:
                data, end = await self._receive_head(stream, c)
                conn = h11.Connection(h11.SERVER,
                                      max_incomplete_event_size=self.config.max_header_bytes)
                conn.receive_data(data)
                if c.eof:
                    conn.receive_data(b"")
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise protocol_error(exc, data[:end] if end >= 0 else b"") from None
            except ApiError as exc:
                c.unread = True  # what follows is read away before closing (`_linger`)
                c.phase = SENDING
                c.since = conns.tick
                self._count(b"other", exc.status)
                await self._send_error(stream, exc)
                return None
            if type(event) is not h11.Request:
                return None  # ConnectionClosed
            if c.phase < HEAD:  # a pipelined request, already buffered
                c.phase = HEAD
                c.since = conns.tick
            if not await self._exchange(conn, stream, peer, event, c):
                return c.upgrade
        return None

    async def _receive_head(self, stream, c: _Conn) -> tuple[bytes | bytearray, int]:
        """Read until a request head is in: (the bytes read, the head first; where the
        head ends), or where -1 when the peer closed first or the bytes cannot begin a
        request (then h11 tells which). Bytes and header lines are counted here, before
        h11 sees them, so `max_header_bytes` and `max_header_count` hold however the head
        arrives (431); this costs a search for the blank line h11 repeats."""
        limit = self.config.max_header_bytes
        data = c.rest
        found = _HEAD_END.search(data) if data else None
        while found is None:
            if len(data) > limit:
                raise ApiError("header_too_large", f"request head exceeds {limit} bytes "
                               "(max_header_bytes)")
            if c.eof or (data and data[0] < 0x21):  # no request line starts so
                return data, -1
            if data and c.phase < HEAD:  # a request has begun: its head is due (the
                if c.phase == IDLE:  # first request's since accept)
                    c.since = self.connections.tick
                c.phase = HEAD
            more = await stream.receive_some(RECV_BYTES)
            if not more:
                c.eof = True
                continue
            searched = max(0, len(data) - 2)
            if not data:
                data = more
            else:  # a head in pieces: grown in place, searched where not yet searched
                if type(data) is bytes:
                    data = bytearray(data)
                data += more
            found = _HEAD_END.search(data, searched)
        end = found.end()
        if end > limit:
            raise ApiError("header_too_large", f"request head exceeds {limit} bytes "
                           "(max_header_bytes)")
        if end > self._countable and data.count(b"\n", 0, end) - 2 > self.max_lines:
            raise ApiError("header_too_large", f"request head has more than {self.max_lines}"
                           " header lines (max_header_count)")  # (-2: request line, end)
        return data, end

    async def _exchange(self, conn, stream, peer: str, event, c: _Conn) -> bool:
        """Read one request, answer it. False: the connection must close now."""
        headers = header_dict(event.headers)
        target = event.target
        path, _, query = target.partition(b"?")
        method = event.method
        origin = c.origin = headers.get(b"origin")
        upgrade = self.upgrades.get(path) if b"upgrade" in headers else None
        chunked = b"transfer-encoding" in headers  # (h11 let only `chunked` through)
        c.unread = chunked or headers.get(b"content-length", b"0") != b"0"
        if not c.unread:  # what follows a bodiless request is the next one, however
            c.rest, c.eof = conn.trailing_data  # it is answered (OPTIONS, an error)
        if chunked and (b"content-length" in headers or event.http_version < b"1.1"):
            return await self._ambiguous(stream, c, headers)
        try:
            if upgrade is not None:  # refused, it closes as a failed handshake does
                request = Request(method, path, query, headers, b"",
                                  client_ip(peer, headers.get(b"x-forwarded-for"), self.trusted))
                accepted = upgrade.check(request)  # a refusal is answered here, as HTTP
                c.phase = HANDLING  # the upgraded connection keeps its own timeouts
                c.unread = False
                c.upgrade = (upgrade.upgrade, conn.trailing_data[0], accepted)
                self._count(path, 101)
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
                try:
                    body = await self._body(conn, stream, headers, c, invite=True)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    body = None  # the client went away mid-body (a reset)
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
            try:  # read past the body we refused, to keep the connection usable
                await self._body(conn, stream, headers, c, invite=False)
            except ApiError:
                pass  # too long to read past: close instead
        close = c.unread or upgrade is not None or self.connections.draining or \
            not _keeps_alive(event, headers)
        self._count(path, response.status)
        if response.stream is not None:
            return await self._stream(stream, response, origin)
        c.phase = SENDING
        c.since = self.connections.tick
        return await self._respond(stream, response, origin, close, method == b"HEAD")

    async def _ambiguous(self, stream, c: _Conn, headers: dict[bytes, bytes]) -> bool:
        """Refuse a request whose body has no one length (RFC 9112 section 6.3: a 400,
        then close): chunked with a Content-Length beside it (which one a proxy in
        front believed is unknown: the bytes after may be a smuggled request), or in
        HTTP/1.0. Nothing after the head is read as a request."""
        why = "Transfer-Encoding with Content-Length" if b"content-length" in headers \
            else "Transfer-Encoding in an HTTP/1.0 request"
        c.phase = SENDING
        c.since = self.connections.tick
        await self._send_error(stream, ApiError("bad_request", f"bad HTTP request: {why}; "
                                                "send one of them"), c.origin)
        return False

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
            return b""  # (`_exchange` took what follows)
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
            self._body_begins(c)
            chunks = [data]
            have = len(data)
            while have < length:
                more = b"" if closed else await stream.receive_some(RECV_BYTES)
                if not more:
                    return None
                chunks.append(more)
                have += len(more)
                c.got += len(more)
            data = b"".join(chunks)
        c.rest = data[length:]
        c.eof = closed
        return data[:length] if len(data) > length else data

    def _body_begins(self, c: _Conn) -> None:
        """The body is being waited for: its timeout and rate run from now."""
        c.phase = BODY
        c.since = self.connections.tick
        c.got = 0

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
                if c.phase != BODY:
                    self._body_begins(c)
                more = await stream.receive_some(RECV_BYTES)
                c.got += len(more)
                conn.receive_data(more)
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

    async def _stream(self, stream, response: Response, origin: bytes | None) -> bool:
        """A body of unknown length (`Response.stream`): the head without a length,
        then each chunk as it comes, each sent within `request_timeout_s`; then close.
        The connection stays in its handling phase (no timeout): the stream's own
        source decides when it ends (drain included)."""
        chunks = response.stream
        async with contextlib.aclosing(chunks):
            await stream.send_all(self._head(response, origin, True, length=False))
            async for chunk in chunks:
                with trio.move_on_after(self.config.request_timeout_s) as sending:
                    await stream.send_all(chunk)
                if sending.cancelled_caught:
                    break  # a client that does not read
        return False

    def _head(self, response: Response, origin: bytes | None, close: bool,
              length: bool = True) -> bytes:
        """The response head's bytes, written here rather than by h11: h11 rebuilds and
        re-validates every head it sends, which cost as much as parsing the request.
        Every value here is ours or one h11 already validated as a request header; the
        check below keeps it that way. Plain heads (no extra headers, no CORS) are
        cached for the current second: a busy server sends the same few all second."""
        date = self.date()
        plain = not response.headers and origin is None and length
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
        if length:
            lines.append(b"content-length: %d\r\n" % len(response.body))
        lines.extend(b"%s: %s\r\n" % header for header in extra)
        if close:
            lines.append(b"connection: close\r\n")
        lines.append(b"\r\n")
        built = b"".join(lines)
        if plain and len(self._heads) < HEAD_CACHE_SIZE:
            self._heads[key] = built
        return built

    async def _send_error(self, stream, exc: ApiError, origin: bytes | None = None) -> None:
        """Answer with an error, then the connection closes."""
        await self._respond(stream, error_response(exc), origin, close=True)


def protocol_error(exc: h11.RemoteProtocolError, head: bytes | bytearray = b"") -> ApiError:
    """What h11 could not parse, with the status it suggests; a Transfer-Encoding it
    refused (`head`: the request head) with the one RFC 9112 asks for."""
    if exc.error_status_hint == 501 and head:
        return transfer_coding_error(head)
    code = {431: "header_too_large", 413: "payload_too_large"}.get(
        exc.error_status_hint, "bad_request")
    return ApiError(code, f"bad HTTP request: {exc}")


def transfer_coding_error(head: bytes | bytearray) -> ApiError:
    """The answer to a Transfer-Encoding other than `chunked` alone (h11 refuses every
    one): 400 when the body's length cannot be known (chunked absent, not last, or
    twice; or a Content-Length beside it; RFC 9112 section 6.3), else 501, a coding not
    implemented before the final chunked (section 6.1)."""
    codings = [t.strip().lower() for line in _TE_LINE.findall(head)
               for t in line.split(b",") if t.strip()]
    if codings[-1:] != [b"chunked"] or codings.count(b"chunked") > 1 or \
            _CL_LINE.search(head):
        return ApiError("bad_request", "bad HTTP request: Transfer-Encoding must be "
                        "chunked, once and last, without Content-Length")
    names = ", ".join(bytes(t).decode("latin-1") for t in codings[:-1])
    return ApiError("not_implemented", f"transfer coding not implemented: {names} "
                    "(send chunked alone)")


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

