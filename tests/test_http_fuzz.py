"""No bytes a client sends make the HTTP server answer 500 or fail.

Hypothesis writes request heads with odd lines and bodies, and raw garbage, to an
`HttpServer` over an in-memory stream whose routes run the real `Collector` (no writer).
Each exchange must end with well-formed 2xx/4xx responses (or 501 for a transfer coding
not implemented) or a closed connection.
"""

from __future__ import annotations

import re

import h11
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from triolytics.core.capture import RequestMeta
from triolytics.core.collector import Collector
from triolytics.core.config import Config
from triolytics.core.errors import ApiError
from triolytics.core.web import Request, Response, error_response
from triolytics.server.http_server import HttpServer

CONFIG = Config(max_request_bytes=2000, max_header_bytes=1000, request_timeout_s=2.0,
                keepalive_timeout_s=2.0)
COLLECTOR = Collector(CONFIG, {"wk_fuzz": "default"})


async def capture(req: Request) -> Response:
    try:
        accepted = COLLECTOR.capture(None, req.headers, req.body,
                                     RequestMeta(0, req.client_ip, None))
    except ApiError as exc:
        return error_response(exc)
    return Response(accepted.status, accepted.body)


ROUTES = {b"/v1/capture": {b"POST": capture}}
header_names = st.sampled_from([b"Content-Length", b"Transfer-Encoding", b"Content-Type",
                                b"Content-Encoding", b"x-write-key", b"Origin", b"Expect",
                                b"Connection", b"Authorization", b"X"])
header_values = st.sampled_from([b"0", b"5", b"100", b"-1", b"chunked", b"gzip",
                                 b"application/json", b"wk_fuzz", b"100-continue",
                                 b"close", b"Basic !!!", b""]) | st.binary(max_size=12)
heads = st.builds(
    lambda method, target, headers: b"%s %s HTTP/1.1\r\nHost: x\r\n" % (method, target)
    + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n",
    st.sampled_from([b"POST", b"GET", b"OPTIONS", b"PUT", b"HEAD"]),
    st.sampled_from([b"/v1/capture", b"/nope", b"/v1/capture?x=1", b"*"]),
    st.lists(st.tuples(header_names, header_values), max_size=5))
bodies = st.sampled_from([b"", b'{"type":"track","event":"E","userId":"u"}', b"{", b"0\r\n\r\n"]) \
    | st.binary(max_size=64)


async def exchange(data: bytes) -> list[int]:
    server = HttpServer(CONFIG, ROUTES)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.sweep)
            nursery.start_soon(server.serve, server_stream, "127.0.0.1")
            await client_stream.send_all(data)
            await client_stream.send_eof()
            received = b""
            while chunk := await client_stream.receive_some(65536):
                received += chunk
            nursery.cancel_scope.cancel()
    # Status lines (a JSON body may run straight into the next one; no body here holds
    # "HTTP/1.1 " followed by three digits, since requests only reach us escaped).
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", received)]


@settings(max_examples=150, deadline=None)
@given(head=heads, body=bodies, tail=st.binary(max_size=40))
def test_no_request_gets_a_500(head, body, tail):
    statuses = trio.run(exchange, head + body + tail,
                        clock=trio.testing.MockClock(autojump_threshold=0))
    assert all(s != 500 for s in statuses), statuses
    # (501: a transfer coding not implemented, as RFC 9112 asks; a client's fault too)
    assert all(100 <= s < 500 or s == 501 for s in statuses), statuses


def test_the_harness_sees_answers():
    valid = (b"POST /v1/capture HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"x-write-key: wk_fuzz\r\nContent-Length: 41\r\n\r\n"
             b'{"type":"track","event":"E","userId":"u"}')
    clock = trio.testing.MockClock(autojump_threshold=0)
    assert trio.run(exchange, valid + valid.replace(b"wk_fuzz", b"wk_nope"), clock=clock) \
        == [201, 401]


# --- framing and pipelining: any mix of requests, split anywhere, is answered in order


async def hello(req: Request) -> Response:
    return Response(200, b'{"hello":"world"}')


async def echo(req: Request) -> Response:
    return Response(200, req.body, content_type=b"application/octet-stream")


ECHO_ROUTES = {b"/hello": {b"GET": hello, b"HEAD": hello}, b"/echo": {b"POST": echo}}


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` in non-empty pieces, cut at the given offsets."""
    cuts = sorted(cuts)
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]


@st.composite
def requests(draw) -> tuple[bytes, bytes, bytes | None, bool]:
    """(method, wire bytes, the body the answer must echo or None for /hello, closes)."""
    method = draw(st.sampled_from([b"GET", b"HEAD", b"POST"]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    connection = draw(st.sampled_from([None, b"close", b"keep-alive", b"Keep-Alive, Close"]))
    head = [b"%s %s HTTP/%s" % (method, b"/echo" if method == b"POST" else b"/hello", version),
            b"Host: x"]
    if connection is not None:
        head.append(b"Connection: " + connection)
    body = None
    wire = b""
    if method == b"POST":
        body = draw(st.binary(max_size=300))
        if draw(st.booleans()):
            head.append(b"Expect: 100-continue")
        if version == b"1.1" and draw(st.booleans()):
            head.append(b"Transfer-Encoding: chunked")
            pieces = split(body, draw(st.lists(st.integers(0, len(body)), max_size=4)))
            wire = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
        else:
            head.append(b"Content-Length: %d" % len(body))
            wire = body
    closes = version == b"1.0" or (connection is not None and b"close" in connection.lower())
    return method, b"\r\n".join(head) + b"\r\n\r\n" + wire, body, closes


async def converse(pieces: list[bytes]) -> bytes:
    server = HttpServer(CONFIG, ECHO_ROUTES)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    received = b""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.serve, server_stream, "127.0.0.1")
            try:
                for piece in pieces:  # each piece is read by the server on its own
                    await client_stream.send_all(piece)
                    await trio.testing.wait_all_tasks_blocked()
                await client_stream.send_eof()
            except trio.BrokenResourceError:
                pass  # the server closed after a `close` request: it reads no more
            while chunk := await client_stream.receive_some(65536):
                received += chunk
    return received


def read_response(data: bytes, method: bytes) -> tuple[h11.Response, bytes, bytes]:
    """The first final response in `data` to a `method` request: (head, body, the rest)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    response, body = None, b""
    while (event := conn.next_event()) is not h11.PAUSED:
        if type(event) is h11.Response:
            response = event
        elif type(event) is h11.Data:
            body += event.data
        elif type(event) is h11.EndOfMessage:
            return response, body, conn.trailing_data[0]
        elif type(event) is not h11.InformationalResponse:
            raise AssertionError(f"incomplete response: {event!r}")


@settings(max_examples=200, deadline=None)
@given(batch=st.lists(requests(), min_size=1, max_size=6), data=st.data())
def test_pipelined_requests_split_anywhere_are_answered_in_order(batch, data):
    wire = b"".join(w for _, w, _, _ in batch)
    pieces = split(wire, data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    received = trio.run(converse, pieces, clock=trio.testing.MockClock(autojump_threshold=0))
    for method, _, body, closes in batch:
        response, got, received = read_response(received, method)
        assert response.status_code == 200
        if method == b"HEAD":
            assert got == b""
        else:
            assert got == (b'{"hello":"world"}' if body is None else body)
        assert (b"connection", b"close") in list(response.headers) or not closes
        if closes:
            break
    assert received == b""  # nothing after the last answer, and nothing after a close
