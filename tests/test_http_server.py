"""`HttpServer` over in-memory streams, driven by an h11 client (as hypercorn's tests do).

Level two of the test ladder: no sockets, no real time. Tests that wait use the
`autojump_clock` fixture, and a hang fails fast under `trio.fail_after` instead of blocking.
"""

from __future__ import annotations

import json
import re
import threading
from contextlib import asynccontextmanager

import h11
import msgspec
import pytest
import trio
import trio.testing

from triolytics.core.collector import Collector
from triolytics.core.config import Config
from triolytics.core.web import Request, Response
from triolytics.server.api import Api
from triolytics.server.app import prepare
from triolytics.server.http_server import HttpServer

PEER = "127.0.0.1"
ORIGIN = b"https://app.example"
EVENT = b'{"type":"track","event":"Clicked","anonymousId":"a-1"}'


# --- a small h11 client over one end of a memory stream pair


class Reply(msgspec.Struct):
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k == name]

    def header(self, name: bytes) -> bytes | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name!r} sent {len(values)} times: {values}"
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)


class Client:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def send(self, *events) -> None:
        await self.stream.send_all(b"".join(self.conn.send(e) for e in events))

    async def next_event(self):
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.stream.receive_some(65536))

    async def response(self) -> Reply:
        """The next final response (1xx are skipped), read to its end."""
        event = await self.next_event()
        while type(event) is h11.InformationalResponse:
            event = await self.next_event()
        assert type(event) is h11.Response, event
        reply = Reply(event.status_code, list(event.headers), b"")
        while True:
            event = await self.next_event()
            if type(event) is h11.EndOfMessage:
                return reply
            reply.body += event.data

    async def request(self, method: bytes, target: bytes, headers=(), body: bytes = b"") -> Reply:
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        hdrs = [(b"host", b"test"), *headers]
        if body or method in (b"POST", b"PUT"):
            hdrs.append((b"content-length", b"%d" % len(body)))
        await self.send(h11.Request(method=method, target=target, headers=hdrs))
        if body:
            await self.send(h11.Data(data=body))
        await self.send(h11.EndOfMessage())
        return await self.response()

    async def raw(self, data: bytes, method: bytes = b"POST") -> Reply:
        """Send bytes as they are; parse the answer as the response to a `method` request."""
        self.conn = h11.Connection(h11.CLIENT)  # primed: it "sent" a `method` request
        head = [(b"host", b"x"), (b"content-length", b"0")]
        self.conn.send(h11.Request(method=method, target=b"/", headers=head))
        self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        return await self.response()

    async def assert_closed(self) -> None:
        """The server closed (or half-closed) its side: EOF and no stray bytes."""
        assert await self.stream.receive_some(65536) == b""


async def sweep_until_cancelled(server: HttpServer) -> None:
    with server.sweep_scope:
        await server.sweep()


def open_client(nursery: trio.Nursery, server: HttpServer, peer: str = PEER) -> Client:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    if not hasattr(server, "sweep_scope"):  # the timeouts' task, once per server
        server.sweep_scope = trio.CancelScope()
        nursery.start_soon(sweep_until_cancelled, server)
    nursery.start_soon(server.serve, server_stream, peer)
    return Client(client_stream)


# --- a fake route table


class Fake:
    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.entered = trio.Event()
        self.release = trio.Event()

    async def echo(self, req: Request) -> Response:
        self.calls.append(req.path)
        return Response(200, req.body, content_type=b"application/octet-stream")

    async def hello(self, req: Request) -> Response:
        self.calls.append(req.path)
        return Response(200, b'{"hello":"world"}')

    async def slow(self, req: Request) -> Response:
        self.calls.append(req.path)
        await trio.sleep(1)
        return Response(200, b"slow", content_type=b"text/plain")

    async def fast(self, req: Request) -> Response:
        self.calls.append(req.path)
        return Response(200, b"fast", content_type=b"text/plain")

    async def boom(self, req: Request) -> Response:
        self.calls.append(req.path)
        raise RuntimeError("a bug in a handler")

    async def held(self, req: Request) -> Response:
        self.calls.append(req.path)
        self.entered.set()
        await self.release.wait()
        return Response(200, b"held", content_type=b"text/plain")

    async def ip(self, req: Request) -> Response:
        return Response(200, req.client_ip.encode(), content_type=b"text/plain")

    def routes(self):
        return {
            b"/echo": {b"POST": self.echo},
            b"/hello": {b"GET": self.hello, b"HEAD": self.hello},
            b"/slow": {b"GET": self.slow},
            b"/fast": {b"GET": self.fast},
            b"/boom": {b"GET": self.boom, b"POST": self.boom},
            b"/held": {b"GET": self.held},
            b"/ip": {b"GET": self.ip},
        }


def make_server(**overrides) -> tuple[HttpServer, Fake]:
    settings = {"max_request_bytes": 1000, "max_header_bytes": 1024,
                "keepalive_timeout_s": 5.0, "request_timeout_s": 3.0, **overrides}
    fake = Fake()
    return HttpServer(Config(**settings), fake.routes()), fake


@pytest.fixture
def fake_server():
    return make_server()


# --- keep-alive and pipelining


async def test_keep_alive_two_requests_on_one_connection(nursery, fake_server, autojump_clock):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        first = await client.request(b"GET", b"/hello")
        second = await client.request(b"POST", b"/echo", body=b"ping")
    assert (first.status, first.json()) == (200, {"hello": "world"})
    assert (second.status, second.body) == (200, b"ping")
    assert first.header(b"connection") is None and second.header(b"connection") is None
    assert server.connections.count == 1
    assert fake.calls == [b"/hello", b"/echo"]


async def test_cached_response_heads_follow_length_origin_and_date(nursery, fake_server,
                                                                   autojump_clock):
    """Plain heads are reused within a second; a head must still carry this response's
    length, its CORS headers when there is an Origin, and the current date."""
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        a = await client.request(b"POST", b"/echo", body=b"ping")
        b = await client.request(b"POST", b"/echo", body=b"ping")  # the cached head
        c = await client.request(b"POST", b"/echo", body=b"longer body")
        d = await client.request(b"POST", b"/echo", body=b"ping",
                                 headers=[(b"origin", b"https://site.example")])
        e = await client.request(b"POST", b"/echo", body=b"ping")
    assert [r.header(b"content-length") for r in (a, b, c, d, e)] == \
        [b"4", b"4", b"11", b"4", b"4"]
    assert (b.body, c.body) == (b"ping", b"longer body")
    assert d.header(b"access-control-allow-origin") == b"https://site.example"
    assert e.header(b"access-control-allow-origin") is None
    later = b"Thu, 01 Jan 2099 00:00:00 GMT"
    server.date = lambda: later  # a new second: the cache must not serve a stale date
    with trio.fail_after(10):
        f = await client.request(b"POST", b"/echo", body=b"ping")
    assert f.header(b"date") == b"Thu, 01 Jan 2099 00:00:00 GMT"


async def test_client_connection_close_is_honoured(nursery, fake_server, autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.request(b"GET", b"/hello", headers=[(b"connection", b"close")])
        await client.assert_closed()
    assert reply.status == 200
    assert reply.header(b"connection") == b"close"


async def test_http_1_0_gets_one_response_then_close(nursery, fake_server, autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.raw(b"GET /hello HTTP/1.0\r\n\r\n", method=b"GET")
        await client.assert_closed()
    assert (reply.status, reply.json()) == (200, {"hello": "world"})


async def test_pipelined_requests_are_answered_in_order(nursery, fake_server, autojump_clock):
    server, fake = fake_server
    client = open_client(nursery, server)
    second = h11.Connection(h11.CLIENT)
    head = [(b"host", b"test")]
    data = client.conn.send(h11.Request(method=b"GET", target=b"/slow", headers=head))
    data += client.conn.send(h11.EndOfMessage())
    data += second.send(h11.Request(method=b"GET", target=b"/fast", headers=head))
    data += second.send(h11.EndOfMessage())
    with trio.fail_after(10):
        await client.stream.send_all(data)  # both requests in one write
        slow = await client.response()
        leftover, _closed = client.conn.trailing_data
        client.conn = second
        if leftover:  # (receive_data(b"") would mean EOF)
            client.conn.receive_data(leftover)
        fast = await client.response()
    assert (slow.status, slow.body) == (200, b"slow")
    assert (fast.status, fast.body) == (200, b"fast")
    assert fake.calls == [b"/slow", b"/fast"]  # the second waited for the first


async def read_until_close(client: Client, cap: int = 100_000) -> bytes:
    """Everything the server sends until it closes (at most `cap` bytes: a server that
    answers without end stops the test instead of hanging it)."""
    got = b""
    while len(got) < cap:
        more = await client.stream.receive_some(65536)
        if not more:
            break
        got += more
    return got


@pytest.mark.parametrize("requests, statuses", [
    ([b"GET /hello", b"OPTIONS /echo", b"GET /hello"], [200, 204, 200]),
    ([b"OPTIONS /echo", b"GET /hello"], [204, 200]),
    ([b"GET /hello", b"GET /nope", b"GET /hello"], [200, 404, 200]),
    ([b"GET /nope", b"GET /hello"], [404, 200]),
    ([b"GET /hello", b"PUT /hello", b"GET /hello"], [200, 405, 200]),
    ([b"POST /echo", b"GET /hello"], [411, 200]),
])
async def test_pipelined_requests_after_a_bodiless_answer(nursery, fake_server, autojump_clock,
                                                          requests, statuses):
    """Each pipelined request is answered once: an answer that reads no body (OPTIONS, an
    error before the body) moves on to the next request, neither repeating its own
    without end nor dropping the ones after it (found by bench/fuzz.py)."""
    server, _ = fake_server
    client = open_client(nursery, server)
    heads = [line + b" HTTP/1.1\r\nhost: x\r\n" for line in requests]
    heads[-1] += b"connection: close\r\n"
    with trio.fail_after(10):
        await client.stream.send_all(b"".join(h + b"\r\n" for h in heads))
        got = await read_until_close(client)
    assert [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", got)] == statuses


class BreaksMidBody(trio.abc.Stream):
    """The server's end of a connection the client resets after the first bytes."""

    def __init__(self, inner: trio.abc.Stream) -> None:
        self.inner = inner
        self.reads = 0

    async def receive_some(self, max_bytes=None):
        self.reads += 1
        if self.reads > 1:
            raise trio.BrokenResourceError("socket connection broken: [Errno 104] "
                                           "Connection reset by peer")
        return await self.inner.receive_some(max_bytes)

    async def send_all(self, data):
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self):
        await self.inner.wait_send_all_might_not_block()

    async def aclose(self):
        await self.inner.aclose()


@pytest.mark.parametrize("extra", [b"content-length: 100\r\n",
                                   b"transfer-encoding: chunked\r\n",
                                   b"content-length: 100\r\nexpect: 100-continue\r\n"])
async def test_a_connection_reset_mid_body_is_not_a_server_error(fake_server, autojump_clock,
                                                                 caplog, extra):
    server, fake = fake_server
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(b"POST /echo HTTP/1.1\r\nhost: x\r\n" + extra + b"\r\n" +
                                 (b"5\r\nhello" if b"chunked" in extra else b"0123456789"))
    with trio.fail_after(10):
        await server.serve(BreaksMidBody(server_stream), PEER)
    assert fake.calls == []
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


async def test_expect_100_continue_is_answered_before_the_body(nursery, fake_server,
                                                              autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.send(h11.Request(method=b"POST", target=b"/echo", headers=[
            (b"host", b"test"), (b"content-length", b"5"), (b"expect", b"100-continue")]))
        interim = await client.next_event()  # the body is not sent yet
        assert type(interim) is h11.InformationalResponse
        assert interim.status_code == 100
        await client.send(h11.Data(data=b"hello"), h11.EndOfMessage())
        reply = await client.response()
    assert (reply.status, reply.body) == (200, b"hello")


async def test_expect_100_continue_refused_early_is_not_invited(nursery, fake_server,
                                                                autojump_clock):
    """A request refused before its body (404) must not get `100 Continue`: the client
    is told no and the connection closes, rather than asking for a body to discard."""
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.send(h11.Request(method=b"POST", target=b"/nope", headers=[
            (b"host", b"test"), (b"content-length", b"5"), (b"expect", b"100-continue")]))
        first = await client.next_event()
        assert type(first) is h11.Response and first.status_code == 404
        assert (b"connection", b"close") in list(first.headers)
        while type(await client.next_event()) is not h11.EndOfMessage:
            pass
        await client.assert_closed()


async def test_connection_close_in_any_connection_header_line_is_honoured(nursery, fake_server,
                                                                          autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.request(b"GET", b"/hello", headers=[
            (b"connection", b"Close, TE"), (b"connection", b"keep-alive")])
        await client.assert_closed()
    assert reply.status == 200 and reply.header(b"connection") == b"close"


async def test_expect_100_continue_too_large_is_refused_without_100(nursery, fake_server,
                                                                   autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.send(h11.Request(method=b"POST", target=b"/echo", headers=[
            (b"host", b"test"), (b"content-length", b"5000"), (b"expect", b"100-continue")]))
        first = await client.next_event()
    assert type(first) is h11.Response and first.status_code == 413


# --- limits


async def test_head_too_large_arriving_in_pieces_is_431(nursery, fake_server, autojump_clock):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.stream.send_all(b"GET /hello HTTP/1.1\r\nHost: test\r\nX-Big: ")
        await client.stream.send_all(b"a" * 1500)  # still no end of head
        reply = await client.raw(b"", method=b"GET")
        await client.assert_closed()
    assert reply.status == 431
    assert reply.json()["error"]["code"] == "header_too_large"
    assert fake.calls == []


async def test_head_too_large_arriving_whole_is_431(nursery, fake_server, autojump_clock):
    """max_header_bytes bounds the head however it arrives (here in one read)."""
    server, fake = fake_server
    client = open_client(nursery, server)
    head = b"GET /hello HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
    with trio.fail_after(10):
        reply = await client.raw(head, method=b"GET")
    assert reply.status == 431
    assert fake.calls == []


async def test_content_length_over_limit_is_413_and_closes(nursery, fake_server, autojump_clock):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.send(h11.Request(method=b"POST", target=b"/echo", headers=[
            (b"host", b"test"), (b"content-length", b"1001")]))
        reply = await client.response()  # answered before any body byte is sent
        await client.assert_closed()
    assert reply.status == 413
    assert reply.json()["error"]["code"] == "payload_too_large"
    assert reply.header(b"connection") == b"close"
    assert fake.calls == []


async def test_content_length_at_limit_is_accepted(nursery, fake_server, autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.request(b"POST", b"/echo", body=b"x" * 1000)
    assert (reply.status, len(reply.body)) == (200, 1000)


async def test_chunked_body_over_limit_is_413(nursery, fake_server, autojump_clock):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.send(h11.Request(method=b"POST", target=b"/echo", headers=[
            (b"host", b"test"), (b"transfer-encoding", b"chunked")]))
        for _ in range(3):
            await client.send(h11.Data(data=b"y" * 400))
        reply = await client.response()
        await client.assert_closed()
    assert reply.status == 413
    assert reply.header(b"connection") == b"close"
    assert fake.calls == []


async def test_chunked_body_within_limit_is_read_whole(nursery, fake_server, autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.send(h11.Request(method=b"POST", target=b"/echo", headers=[
            (b"host", b"test"), (b"transfer-encoding", b"chunked")]))
        await client.send(h11.Data(data=b"ab"), h11.Data(data=b"cd"), h11.EndOfMessage())
        reply = await client.response()
    assert (reply.status, reply.body) == (200, b"abcd")


@pytest.mark.parametrize("path,status", [(b"/echo", 400), (b"/nope", 404)])
async def test_a_malformed_chunked_body_gets_one_answer_then_close(nursery, fake_server,
                                                                   autojump_clock, path, status):
    """Read for its handler (400) or read past after a refusal (404): either way one
    answer, then the connection closes."""
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.stream.send_all(b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n")
        answer = b""
        while chunk := await client.stream.receive_some(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert answer.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in answer
    assert fake.calls == []


async def test_post_without_framing_is_411(nursery, fake_server, autojump_clock):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.raw(b"POST /echo HTTP/1.1\r\nHost: test\r\n\r\n")
    assert reply.status == 411
    assert reply.json()["error"]["code"] == "length_required"
    assert fake.calls == []


@pytest.mark.parametrize("head", [
    b"GARBAGE\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nHost: test\r\nContent-Length: abc\r\n\r\n",
    b"GET /hello HTTP/1.1\r\nBad Header\r\n\r\n",
])
async def test_malformed_request_is_400_and_closes(nursery, fake_server, autojump_clock, head):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.raw(head, method=b"GET")
        await client.assert_closed()
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "bad_request"
    assert fake.calls == []


# --- routing


async def test_unknown_path_is_404_and_the_connection_stays(nursery, fake_server, autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        missing = await client.request(b"POST", b"/nope", body=b"{}")
        after = await client.request(b"GET", b"/hello")
    assert missing.status == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert after.status == 200


async def test_wrong_method_is_405_with_allow(nursery, fake_server, autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        wrong = await client.request(b"GET", b"/echo")
        with_body = await client.request(b"PUT", b"/hello", body=b"123")  # body is skipped
        after = await client.request(b"GET", b"/hello")
    assert wrong.status == 405
    assert wrong.header(b"allow") == b"OPTIONS, POST"
    assert with_body.status == 405
    assert with_body.header(b"allow") == b"GET, HEAD, OPTIONS"
    assert after.status == 200


async def test_options_without_origin_is_not_refused(nursery, fake_server, autojump_clock):
    """Allow lists OPTIONS, so a plain OPTIONS request (no Origin) must not be a 405."""
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.request(b"OPTIONS", b"/echo")
    assert 200 <= reply.status < 300
    assert b"POST" in (reply.header(b"allow") or b"")


async def test_head_request_is_answered_without_a_body(nursery, fake_server, autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        head = await client.request(b"HEAD", b"/hello")
        after = await client.request(b"GET", b"/hello")
    assert (head.status, head.body) == (200, b"")
    assert after.json() == {"hello": "world"}


# --- CORS


async def test_preflight_echoes_the_origin_once(nursery, fake_server, autojump_clock):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.request(b"OPTIONS", b"/echo", headers=[
            (b"origin", ORIGIN), (b"access-control-request-method", b"POST"),
            (b"access-control-request-headers", b"content-type,x-write-key")])
        after = await client.request(b"POST", b"/echo", headers=[(b"origin", ORIGIN)],
                                     body=b"x")
    assert 200 <= reply.status < 300
    assert reply.all(b"access-control-allow-origin") == [ORIGIN]
    assert b"POST" in reply.header(b"access-control-allow-methods").split(b", ")
    allowed = reply.header(b"access-control-allow-headers").lower()
    assert b"content-type" in allowed and b"x-write-key" in allowed
    assert fake.calls == [b"/echo"]  # the preflight itself reached no handler
    assert after.all(b"access-control-allow-origin") == [ORIGIN]
    assert b"Origin" in after.header(b"vary")


async def test_disallowed_origin_with_allowlist_is_403(nursery, autojump_clock):
    server, fake = make_server(cors_origins=["https://good.example"])
    client = open_client(nursery, server)
    evil = [(b"origin", b"https://evil.example")]
    with trio.fail_after(10):
        preflight = await client.request(b"OPTIONS", b"/echo", headers=[
            *evil, (b"access-control-request-method", b"POST")])
        post = await client.request(b"POST", b"/echo", headers=evil, body=b"x")
        good = await client.request(b"POST", b"/echo",
                                    headers=[(b"origin", b"https://good.example")], body=b"y")
        no_origin = await client.request(b"POST", b"/echo", body=b"z")  # not a browser
    assert preflight.status == 403 and post.status == 403
    assert post.json()["error"]["code"] == "forbidden_origin"
    assert post.all(b"access-control-allow-origin") == []
    assert fake.calls == [b"/echo", b"/echo"]  # only `good` and `no_origin`
    assert good.all(b"access-control-allow-origin") == [b"https://good.example"]
    assert (no_origin.status, no_origin.body) == (200, b"z")


@pytest.mark.parametrize(("method", "target", "status"), [
    (b"GET", b"/nope", 404), (b"GET", b"/echo", 405), (b"GET", b"/boom", 500),
])
async def test_error_responses_carry_cors_headers(nursery, fake_server, autojump_clock,
                                                  method, target, status):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.request(method, target, headers=[(b"origin", ORIGIN)])
    assert reply.status == status
    assert reply.all(b"access-control-allow-origin") == [ORIGIN]


async def test_413_carries_cors_headers(nursery, fake_server, autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.send(h11.Request(method=b"POST", target=b"/echo", headers=[
            (b"host", b"test"), (b"origin", ORIGIN), (b"content-length", b"5000")]))
        reply = await client.response()
    assert reply.status == 413
    assert reply.all(b"access-control-allow-origin") == [ORIGIN]


async def test_408_carries_cors_headers(nursery, fake_server, autojump_clock):
    """The head (with its Origin) was read, so the browser must be able to see the 408."""
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(30):
        await client.send(h11.Request(method=b"POST", target=b"/echo", headers=[
            (b"host", b"test"), (b"origin", ORIGIN), (b"content-length", b"10")]))
        await client.send(h11.Data(data=b"12345"))
        reply = await client.response()
    assert reply.status == 408
    assert reply.all(b"access-control-allow-origin") == [ORIGIN]


# --- faults


async def test_handler_exception_is_500_and_the_next_request_works(nursery, fake_server,
                                                                   autojump_clock, caplog):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        broken = await client.request(b"POST", b"/boom", body=b"{}")
        after = await client.request(b"GET", b"/hello")
    assert broken.status == 500
    assert broken.json()["error"]["code"] == "internal"
    assert b"a bug in a handler" not in broken.body  # no internals leak to the client
    assert "a bug in a handler" in caplog.text  # but the log has them
    assert (after.status, after.json()) == (200, {"hello": "world"})
    assert fake.calls == [b"/boom", b"/hello"]


async def test_a_response_header_with_a_line_break_is_never_written(nursery, autojump_clock,
                                                                   caplog):
    """Response heads are written by the server, not h11: a header value that could
    split the response becomes a 500 (logged), never bytes on the wire."""
    server, fake = make_server()

    async def split(req: Request) -> Response:
        return Response(200, b"{}", [(b"x-note", b"a\r\nset-cookie: evil=1")])

    server.routes[b"/split"] = {b"GET": split}
    client = open_client(nursery, server)
    with trio.fail_after(10):
        reply = await client.request(b"GET", b"/split")
        start = trio.current_time()
        await client.assert_closed()
    assert trio.current_time() == start  # at once, as its head says
    assert reply.status == 500
    assert reply.header(b"set-cookie") is None and reply.header(b"x-note") is None
    assert "CR, LF or NUL" in caplog.text


async def test_peer_address_reaches_the_handler(nursery, autojump_clock):
    server, _ = make_server(trusted_proxies=["10.0.0.0/8"])
    direct = open_client(nursery, server, peer="192.0.2.7")
    proxied = open_client(nursery, server, peer="10.1.2.3")
    spoof = [(b"x-forwarded-for", b"203.0.113.9")]
    with trio.fail_after(10):
        a = await direct.request(b"GET", b"/ip", headers=spoof)
        b = await proxied.request(b"GET", b"/ip", headers=spoof)
    assert a.body == b"192.0.2.7"  # not a trusted proxy: its header is ignored
    assert b.body == b"203.0.113.9"


class ResettingStream(trio.abc.Stream):
    """A peer that sends `data`, then resets the connection (ECONNRESET)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received = b""

    async def receive_some(self, max_bytes=None) -> bytes:
        await trio.lowlevel.checkpoint()
        if self.data:
            data, self.data = self.data, b""
            return data
        raise trio.BrokenResourceError("connection reset by peer")

    async def send_all(self, data) -> None:
        await trio.lowlevel.checkpoint()
        self.received += bytes(data)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("sent", [b"", b"GET /hello HTTP/1.1\r\nHost: test\r\n\r\n"])
async def test_a_reset_connection_leaves_no_trace(fake_server, autojump_clock, sent):
    """A peer that resets while idle must not stay in `Connections` (memory would grow
    with every such client, and drain() would keep cancelling dead scopes)."""
    server, _ = fake_server
    stream = ResettingStream(sent)
    with trio.fail_after(10):
        await server.serve(stream, PEER)
    if sent:
        assert stream.received.startswith(b"HTTP/1.1 200 ")
    assert server.connections.count == 0
    assert len(server.connections.idle) == 0


# --- timeouts


async def test_idle_keep_alive_connection_is_closed_after_the_timeout(nursery, fake_server,
                                                                      autojump_clock):
    server, _ = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(60):
        await client.request(b"GET", b"/hello")
        start = trio.current_time()
        await client.assert_closed()
    waited = trio.current_time() - start
    assert 5.0 <= waited < 6.0
    await trio.testing.wait_all_tasks_blocked()
    assert server.connections.count == 0


async def test_connection_that_never_sends_is_closed_quietly_after_the_head_timeout(
        nursery, autojump_clock):
    """A new connection's first head must be in within head_timeout_s of accept, however
    long the keep-alive timeout (which only applies between requests)."""
    server, _ = make_server(head_timeout_s=2.0, keepalive_timeout_s=75.0)
    client = open_client(nursery, server)
    start = trio.current_time()
    with trio.fail_after(60):
        await client.assert_closed()  # no 408: nothing was asked
    assert 2.0 <= trio.current_time() - start < 3.0


async def test_stalled_body_is_408_after_the_request_timeout(nursery, fake_server,
                                                             autojump_clock):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(60):
        await client.send(h11.Request(method=b"POST", target=b"/echo", headers=[
            (b"host", b"test"), (b"content-length", b"10")]))
        await client.send(h11.Data(data=b"12345"))  # half the body, then silence
        start = trio.current_time()
        reply = await client.response()
        waited = trio.current_time() - start
        await client.assert_closed()
    assert reply.status == 408
    assert reply.json()["error"]["code"] == "request_timeout"
    assert reply.header(b"connection") == b"close"
    assert 3.0 <= waited < 4.0
    assert fake.calls == []


async def test_stalled_head_is_408_after_the_head_timeout(nursery, fake_server,
                                                          autojump_clock):
    """A request that has begun (part of its head is in) gets head_timeout_s, not the
    (longer) idle keep-alive timeout, and an answer."""
    server, _ = make_server(keepalive_timeout_s=75.0, head_timeout_s=3.0)
    client = open_client(nursery, server)
    answer = b""
    with trio.fail_after(200):
        await client.stream.send_all(b"POST /echo HTTP/1.1\r\nHost: te")
        start = trio.current_time()
        while chunk := await client.stream.receive_some(65536):
            answer += chunk
    waited = trio.current_time() - start
    assert answer.startswith(b"HTTP/1.1 408 "), (waited, answer)
    assert 3.0 <= waited < 4.0


# --- drain (shutdown)


async def test_drain_closes_idle_connections(nursery, fake_server, autojump_clock):
    server, _ = fake_server
    used = open_client(nursery, server)
    fresh = open_client(nursery, server)
    with trio.fail_after(10):
        await used.request(b"GET", b"/hello")
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        server.connections.drain()
        await used.assert_closed()
        await fresh.assert_closed()
    assert trio.current_time() == start  # at once, not after the keep-alive timeout
    await trio.testing.wait_all_tasks_blocked()
    assert server.connections.count == 0


async def test_drain_lets_a_busy_request_finish_with_connection_close(nursery, fake_server,
                                                                      autojump_clock):
    server, fake = fake_server
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.send(h11.Request(method=b"GET", target=b"/held",
                                      headers=[(b"host", b"test")]), h11.EndOfMessage())
        await fake.entered.wait()
        server.connections.drain()
        await trio.testing.wait_all_tasks_blocked()
        fake.release.set()
        reply = await client.response()
        await client.assert_closed()
    assert (reply.status, reply.body) == (200, b"held")
    assert reply.header(b"connection") == b"close"


async def test_drain_racing_a_request_that_just_arrived(nursery, fake_server, autojump_clock):
    """Shutdown starts in the same tick as a request arrives on an idle connection: the
    request is answered, not dropped — refused with 503 + `connection: close` before its
    handler runs (so nothing is stored behind the refusal; the client retries)."""
    server, fake = fake_server
    client = open_client(nursery, server)
    await trio.testing.wait_all_tasks_blocked()  # the server waits for a request
    data = client.conn.send(h11.Request(method=b"POST", target=b"/echo", headers=[
        (b"host", b"test"), (b"content-length", b"4")]))
    data += client.conn.send(h11.Data(data=b"ping")) + client.conn.send(h11.EndOfMessage())
    await client.stream.send_all(data)  # wakes the server's read; it has not run yet
    server.connections.drain()
    with trio.fail_after(10):
        try:
            reply = await client.response()
        except h11.RemoteProtocolError as exc:
            raise AssertionError(f"closed without a response; handler ran: {fake.calls}") \
                from exc
    assert reply.status == 503 and reply.header(b"retry-after") == b"1"
    assert reply.header(b"connection") == b"close"
    assert fake.calls == []  # the handler never ran


# --- with the real API routes and a real writer

SESSION_START = 1  # the first event of a key is journaled after its session_start row


@asynccontextmanager
async def real_api(tmp_path, **overrides):
    config = Config(data_dir=str(tmp_path), write_keys=["wk_test"], **overrides)
    ready = await trio.to_thread.run_sync(prepare, config)
    writer = ready.writer
    api = Api(Collector(config, ready.keys, ready.sessions, writer.dedup), writer,
              ready.admin_token, ready.identities)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        server = HttpServer(config, api.routes())
        try:
            yield server, writer, nursery
        finally:
            writer.close()
            server.connections.drain()  # close idle keep-alive connections
            if hasattr(server, "sweep_scope"):
                server.sweep_scope.cancel()


async def test_capture_with_expect_100_continue_is_journaled(tmp_path):
    async with real_api(tmp_path) as (server, writer, nursery):
        client = open_client(nursery, server)
        with trio.fail_after(10):
            await client.send(h11.Request(method=b"POST", target=b"/v1/capture", headers=[
                (b"host", b"test"), (b"content-type", b"application/json"),
                (b"x-write-key", b"wk_test"), (b"content-length", b"%d" % len(EVENT)),
                (b"expect", b"100-continue")]))
            interim = await client.next_event()
            assert type(interim) is h11.InformationalResponse and interim.status_code == 100
            await client.send(h11.Data(data=EVENT), h11.EndOfMessage())
            reply = await client.response()
            assert reply.status == 201, reply.body
            assert writer.stats.journaled_rows == 1 + SESSION_START
            await client.stream.aclose()


async def test_capture_preflight_and_post_with_the_real_routes(tmp_path):
    async with real_api(tmp_path) as (server, writer, nursery):
        client = open_client(nursery, server)
        with trio.fail_after(10):
            pre = await client.request(b"OPTIONS", b"/v1/capture", headers=[
                (b"origin", ORIGIN), (b"access-control-request-method", b"POST"),
                (b"access-control-request-headers", b"content-type,x-write-key")])
            post = await client.request(b"POST", b"/v1/capture", headers=[
                (b"origin", ORIGIN), (b"content-type", b"application/json"),
                (b"x-write-key", b"wk_test")], body=EVENT)
            await client.stream.aclose()
    assert pre.status == 204
    assert pre.all(b"access-control-allow-origin") == [ORIGIN]
    assert b"POST" in pre.header(b"access-control-allow-methods")
    assert post.status == 201
    assert post.all(b"access-control-allow-origin") == [ORIGIN]
    assert post.json()["ok"] is True
    assert writer.stats.journaled_rows == 1 + SESSION_START


async def test_oversized_capture_is_413_and_nothing_is_journaled(tmp_path):
    async with real_api(tmp_path, max_request_bytes=100) as (server, writer, nursery):
        client = open_client(nursery, server)
        body = b'{"type":"track","event":"E","anonymousId":"a","properties":{"p":"' + \
            b"x" * 200 + b'"}}'
        with trio.fail_after(10):
            reply = await client.request(b"POST", b"/v1/capture", headers=[
                (b"x-write-key", b"wk_test")], body=body)
            await client.stream.aclose()
    assert reply.status == 413
    assert writer.stats.journaled_rows == 0


async def test_a_bad_request_does_not_break_the_connection(tmp_path):
    async with real_api(tmp_path) as (server, writer, nursery):
        client = open_client(nursery, server)
        key = [(b"x-write-key", b"wk_test"), (b"content-type", b"application/json")]
        with trio.fail_after(10):
            good1 = await client.request(b"POST", b"/v1/capture", headers=key, body=EVENT)
            bad = await client.request(b"POST", b"/v1/capture", headers=key, body=b"{not json")
            good2 = await client.request(b"POST", b"/v1/capture", headers=key, body=EVENT)
            await client.stream.aclose()
    assert [good1.status, bad.status, good2.status] == [201, 400, 201]
    assert writer.stats.journaled_rows == 2 + SESSION_START  # one session for both


async def test_drain_race_never_answers_non_2xx_for_a_stored_event(tmp_path):
    """The same race through the real API: whatever the answer, it must be true. A 4xx/5xx
    means nothing was stored; a stored event gets its 201."""
    async with real_api(tmp_path) as (server, writer, nursery):
        client = open_client(nursery, server)
        await trio.testing.wait_all_tasks_blocked()
        data = client.conn.send(h11.Request(method=b"POST", target=b"/v1/capture", headers=[
            (b"host", b"test"), (b"x-write-key", b"wk_test"),
            (b"content-length", b"%d" % len(EVENT))]))
        data += client.conn.send(h11.Data(data=EVENT)) + client.conn.send(h11.EndOfMessage())
        await client.stream.send_all(data)
        server.connections.drain()
        with trio.fail_after(10):
            try:
                status = (await client.response()).status
            except h11.RemoteProtocolError:
                status = None  # closed without an answer
    stored = writer.stats.journaled_rows
    assert (status, stored) in {(201, 1 + SESSION_START), (503, 0)}, (status, stored)


@pytest.fixture
def thread_safe_clock():
    """Virtual time that jumps only after 20 ms of real idleness, so worker threads (the
    journal sync) finish their real-time work before the clock races past them."""
    return trio.testing.MockClock(autojump_threshold=0.02)


async def test_request_timeout_while_the_writer_is_slow_is_not_a_lie(tmp_path,
                                                                     thread_safe_clock):
    """request_timeout_s bounds receiving a request, not waiting for the journal. Once the
    rows are handed to the writer they will be stored, so the only honest answer is the
    2xx once the (slow) sync completes: never a 408 behind a stored event (the client
    would retry and, without a messageId, store it twice)."""
    gate = threading.Event()
    async with real_api(tmp_path, request_timeout_s=1.0) as (server, writer, nursery):
        sync = writer.journal.sync  # runs in a worker thread, never on the event loop

        def slow_sync():
            gate.wait(30)  # the disk is slow (until the test opens the gate)
            sync()

        writer.journal.sync = slow_sync

        async def open_gate_later():
            await trio.sleep(5)  # well past request_timeout_s
            gate.set()
        nursery.start_soon(open_gate_later)
        client = open_client(nursery, server)
        try:
            with trio.fail_after(20):
                reply = await client.request(b"POST", b"/v1/capture", headers=[
                    (b"x-write-key", b"wk_test")], body=EVENT)
        finally:
            gate.set()
    stored = writer.stats.journaled_rows
    assert (reply.status, stored) == (201, 1 + SESSION_START)


def test_header_dict_matches_h11s_public_iteration():
    from triolytics.server.http_server import header_dict
    request = h11.Request(method=b"GET", target=b"/", headers=[
        (b"Host", b"a"), (b"X-Write-Key", b"k1"), (b"x-write-key", b"k2"),
        (b"Content-Type", b"application/json")])
    assert header_dict(request.headers) == dict(request.headers)
    assert header_dict(request.headers)[b"x-write-key"] == b"k2"
