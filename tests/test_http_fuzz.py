"""No bytes a client sends make the HTTP server answer 500 or fail.

Hypothesis writes request heads with odd lines and bodies, and raw garbage, to an
`HttpServer` over an in-memory stream whose routes run the real `Collector` (no writer).
Each exchange must end with well-formed 2xx/4xx responses or a closed connection.
"""

from __future__ import annotations

import re

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from triolytics.capture import RequestMeta
from triolytics.collector import Collector
from triolytics.config import Config
from triolytics.errors import ApiError
from triolytics.http_server import HttpServer
from triolytics.web import Request, Response, error_response

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
    assert all(100 <= s < 500 for s in statuses), statuses


def test_the_harness_sees_answers():
    valid = (b"POST /v1/capture HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"x-write-key: wk_fuzz\r\nContent-Length: 41\r\n\r\n"
             b'{"type":"track","event":"E","userId":"u"}')
    clock = trio.testing.MockClock(autojump_threshold=0)
    assert trio.run(exchange, valid + valid.replace(b"wk_fuzz", b"wk_nope"), clock=clock) \
        == [201, 401]
