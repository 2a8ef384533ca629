"""`HttpServer`'s defences over in-memory streams: unambiguous framing, head limits,
head and body deadlines, connection caps (docs/api.md, "Limits and refusals").

Level two of the test ladder, as tests/test_http_server.py (whose h11 client and fake
routes these reuse): no sockets, and time is the `autojump_clock`'s, so a deadline of
seconds passes at once.
"""

from __future__ import annotations

import logging

import h11
import pytest
import trio
import trio.testing
from test_http_server import PEER, open_client
from test_http_server import make_server as _make_server

# The tests' defaults: a head limit big enough for the counts below, the timeouts apart.
LIMITS = {"max_header_bytes": 1024, "head_timeout_s": 10.0, "request_timeout_s": 30.0,
          "keepalive_timeout_s": 75.0, "min_body_rate_bytes_s": 1024,
          "body_rate_grace_s": 5.0}


def make_server(**overrides):
    return _make_server(**{**LIMITS, **overrides})


async def answers(client, data: bytes | list[bytes]) -> bytes:
    """Send `data` (a list: one write per item, each read on its own), then read all the
    server sends until it closes."""
    for piece in [data] if isinstance(data, bytes) else data:
        await client.stream.send_all(piece)
        await trio.testing.wait_all_tasks_blocked()
    received = b""
    while chunk := await client.stream.receive_some(65536):
        received += chunk
    return received


def statuses(received: bytes) -> list[int]:
    """The statuses of the responses in `received`, parsed by h11 as a client would: the
    bytes must be whole responses and nothing else."""
    out = []
    while received:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=b"GET", target=b"/", headers=[(b"host", b"x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(received)
        conn.receive_data(b"")
        while type(event := conn.next_event()) is not h11.EndOfMessage:
            if type(event) is h11.Response:
                out.append(event.status_code)
        received = conn.trailing_data[0]
    return out


async def trickle(client, piece: bytes, every: float) -> tuple[bytes, float]:
    """Send `piece` every `every` seconds until the server answers or closes: (all it
    sent until it closed, when its answer came)."""
    received = None
    while received is None:
        try:
            await client.stream.send_all(piece)
        except trio.BrokenResourceError:
            pass
        with trio.move_on_after(every):
            received = await client.stream.receive_some(65536)
    return received + await answers(client, []), trio.current_time()


# --- framing: one body length or a refusal (RFC 9112 section 6)

HIDDEN = b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
SMUGGLED = b"0\r\n\r\n" + HIDDEN  # a chunked end, then a request a proxy saw as body


@pytest.mark.parametrize("framing", [
    b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % len(SMUGGLED),
    b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % len(SMUGGLED),
    b"transfer-encoding: CHUNKED\r\ncontent-LENGTH: 0\r\n",
    b"Content-Length: 5\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding:\tchunked\r\nContent-Length: 5, 5\r\n",
])
async def test_content_length_with_chunked_is_400_and_nothing_after_is_served(
        nursery, autojump_clock, framing):
    """CL+TE is refused whatever the order, casing or repetition: one answer, then close,
    and the request hidden in the body is never read as a request."""
    server, fake = make_server()
    client = open_client(nursery, server)
    with trio.fail_after(10):
        received = await answers(client, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + framing
                                 + b"\r\n" + SMUGGLED)
    assert statuses(received) == [400]
    assert b"connection: close" in received
    assert b"Transfer-Encoding with Content-Length" in received
    assert fake.calls == []


async def test_chunked_in_http_1_0_is_400_and_closes(nursery, autojump_clock):
    server, fake = make_server()
    client = open_client(nursery, server)
    with trio.fail_after(10):
        received = await answers(client, b"POST /echo HTTP/1.0\r\nHost: x\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n" + SMUGGLED)
    assert statuses(received) == [400]
    assert fake.calls == []


@pytest.mark.parametrize("lines,status", [
    ([b"gzip, chunked"], 501),  # a coding we do not implement, then chunked
    ([b"gzip", b"chunked"], 501),  # the same over two lines
    ([b"chunked, chunked"], 400),  # chunked twice (section 6.1: at most once)
    ([b"chunked", b"chunked"], 400),
    ([b"chunked, gzip"], 400),  # chunked not last: no length (section 6.3)
    ([b"gzip"], 400),
    ([b"identity"], 400),
    ([b"chunked;x=1"], 400),
    ([b"gzip, chunked", b"x"], 400),
])
async def test_transfer_codings_other_than_chunked_alone_are_refused(nursery, autojump_clock,
                                                                     lines, status):
    server, fake = make_server()
    client = open_client(nursery, server)
    head = b"".join(b"Transfer-Encoding: %s\r\n" % v for v in lines)
    with trio.fail_after(10):
        received = await answers(client, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + head
                                 + b"\r\n" + SMUGGLED)
    assert statuses(received) == [status]
    assert fake.calls == []


async def test_an_unimplemented_coding_beside_content_length_is_400(nursery, autojump_clock):
    server, _ = make_server()
    client = open_client(nursery, server)
    with trio.fail_after(10):
        received = await answers(client, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                                 b"Transfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n"
                                 + SMUGGLED)
    assert statuses(received) == [400]


@pytest.mark.parametrize("lengths", [
    [b"5", b"6"], [b"5, 6"], [b"6", b"5, 5"], [b"+5"], [b"5 5"], [b"0x5"], [b"-5"],
])
async def test_differing_or_malformed_content_lengths_are_400(nursery, autojump_clock,
                                                              lengths):
    """(h11 refuses these itself; pinned here, as a proxy's other choice is smuggling.)"""
    server, fake = make_server()
    client = open_client(nursery, server)
    head = b"".join(b"Content-Length: %s\r\n" % v for v in lengths)
    with trio.fail_after(10):
        received = await answers(client, b"POST /echo HTTP/1.1\r\nHost: x\r\n" + head
                                 + b"\r\n12345" + HIDDEN)
    assert statuses(received) == [400]
    assert fake.calls == []


async def test_repeated_equal_content_lengths_are_one_length(nursery, autojump_clock):
    """RFC 9110 section 8.6 lets a recipient take `5, 5` (or two lines of 5) as 5."""
    server, fake = make_server()
    client = open_client(nursery, server)
    with trio.fail_after(10):
        received = await answers(client, b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                                 b"Content-Length: 5\r\nContent-Length: 5, 5\r\n"
                                 b"Connection: close\r\n\r\n12345")
    assert statuses(received) == [200]
    assert received.endswith(b"\r\n\r\n12345")


# --- head limits: bytes and lines, however they arrive


def head_of(lines: int, line: bytes = b"a:b") -> bytes:
    return b"GET /hello HTTP/1.1\r\nHost: x\r\n" + (line + b"\r\n") * lines + b"\r\n"


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("how", ["one write", "many writes", "after a request",
                                 "split after a request"])
async def test_many_small_header_lines_over_the_byte_limit_are_431(nursery, autojump_clock,
                                                                   how):
    """12,000 `a:b` lines (60 KB) under a 1 KiB head limit, however they come: in one
    write (read at once), in 100-byte writes, pipelined behind a request, or begun
    behind a request and ended by a later write."""
    server, fake = make_server(max_header_count=100_000)
    client = open_client(nursery, server)
    big = head_of(12_000)
    data = {"one write": [big], "many writes": pieces(big, 100),
            "after a request": [head_of(0) + big],
            "split after a request": [head_of(0) + big[:-10], big[-10:]]}[how]
    with trio.fail_after(30):
        received = await answers(client, data)
    expected = [431] if how in ("one write", "many writes") else [200, 431]
    assert statuses(received) == expected
    assert b'"code":"header_too_large"' in received
    assert b"max_header_bytes" in received
    assert len(fake.calls) == len(expected) - 1


@pytest.mark.parametrize("how", ["one write", "a line a write"])
async def test_header_lines_over_the_count_limit_are_431(nursery, autojump_clock, how):
    """101 lines (600 bytes: under the byte limit) against max_header_count = 100."""
    server, fake = make_server(max_header_count=100)
    client = open_client(nursery, server)
    head = head_of(100)  # Host and 100 more
    assert len(head) < 1024
    data = [head] if how == "one write" else [line + b"\n" for line in head.split(b"\n")[:-1]]
    with trio.fail_after(30):
        received = await answers(client, data)
    assert statuses(received) == [431]
    assert b"max_header_count" in received
    assert fake.calls == []


@pytest.mark.parametrize("lines,status", [(100, 404), (101, 431)])
async def test_the_shortest_lines_are_counted_too(nursery, autojump_clock, lines, status):
    """Small heads skip the count only when they are too short to hold more lines than
    the limit: the shortest request line and header lines (`a:`) are still counted."""
    server, _ = make_server(max_header_count=100)
    client = open_client(nursery, server)
    with trio.fail_after(10):
        await client.stream.send_all(b"A * HTTP/1.1\nHost:x\n" + b"a:\n" * (lines - 1) + b"\n")
        received = await client.stream.receive_some(65536)
    assert received.startswith(b"HTTP/1.1 %d " % status)


async def test_a_head_at_the_limits_is_served_and_a_byte_more_is_not(nursery,
                                                                      autojump_clock):
    """Exactly max_header_bytes bytes (the blank line included) in max_header_count
    lines pass; one byte more is a 431."""
    server, fake = make_server(max_header_count=3)
    head = b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: \r\n\r\n"
    head = head.replace(b"X-Pad: ", b"X-Pad: " + b"p" * (1024 - len(head)))
    assert len(head) == 1024
    with trio.fail_after(10):
        at_limit = await answers(open_client(nursery, server), head)
        over = await answers(open_client(nursery, server), head.replace(b"X-Pad: ", b"X-Pad: p"))
    assert statuses(at_limit) == [200]
    assert statuses(over) == [431]
    assert fake.calls == [b"/hello"]


# --- deadlines: the head from accept (or its first byte), the body by rate


async def test_the_first_head_is_due_head_timeout_s_after_accept(nursery, autojump_clock):
    """Sending the first byte late buys no time: the head's deadline ran from accept."""
    server, _ = make_server(head_timeout_s=10.0)
    client = open_client(nursery, server)
    start = trio.current_time()
    with trio.fail_after(100):
        await trio.sleep(8)
        received = await answers(client, b"POST /echo HTTP/1.1\r\nHo")
    assert statuses(received) == [408]
    assert b"head_timeout_s" in received
    assert 10.0 <= trio.current_time() - start < 11.0


async def test_a_keep_alive_head_is_due_head_timeout_s_after_its_first_byte(
        nursery, autojump_clock):
    """Between requests the (longer) keep-alive timeout applies; once a byte of the next
    head is in, head_timeout_s, and a trickle of bytes does not extend it."""
    server, _ = make_server(head_timeout_s=3.0, keepalive_timeout_s=75.0)
    client = open_client(nursery, server)
    with trio.fail_after(200):
        first = await client.request(b"GET", b"/hello")
        await trio.sleep(60)  # idle, within the keep-alive timeout
        start = trio.current_time()
        received, at = await trickle(client, b"x", 0.5)  # a byte of a header each 0.5 s
    assert first.status == 200
    assert statuses(received) == [408]
    assert 3.0 <= at - start < 4.0


async def test_a_head_begun_behind_a_pipelined_request_is_due_head_timeout_s(
        nursery, autojump_clock):
    """The next head's first bytes came with the previous request: its deadline runs
    from then, not the keep-alive timeout."""
    server, _ = make_server(head_timeout_s=3.0, keepalive_timeout_s=75.0)
    client = open_client(nursery, server)
    start = trio.current_time()
    with trio.fail_after(200):
        received = await answers(client, head_of(0) + b"GET /hel")
    assert statuses(received) == [200, 408]
    assert 3.0 <= trio.current_time() - start < 4.0


async def test_an_idle_keep_alive_connection_still_gets_the_keepalive_timeout(
        nursery, autojump_clock):
    server, _ = make_server(head_timeout_s=3.0, keepalive_timeout_s=20.0)
    client = open_client(nursery, server)
    with trio.fail_after(100):
        await client.request(b"GET", b"/hello")
        start = trio.current_time()
        await client.assert_closed()
    assert 20.0 <= trio.current_time() - start < 21.0


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_slower_than_the_minimum_rate_is_408(nursery, autojump_clock, chunked):
    """100 bytes/s against 1 KiB/s after a 5 s grace: cut at ~6 s, long before
    request_timeout_s (30 s)."""
    server, fake = make_server(max_request_bytes=100_000)
    client = open_client(nursery, server)
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: 50000"
    piece = b"5e\r\n" + b"x" * 94 + b"\r\n" if chunked else b"x" * 100
    with trio.fail_after(100):
        await client.stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n" % framing)
        start = trio.current_time()
        received, at = await trickle(client, piece, 1.0)
    assert statuses(received) == [408]
    assert b"min_body_rate_bytes_s" in received
    assert 5.5 <= at - start < 7.0
    assert fake.calls == []


async def test_a_body_at_the_minimum_rate_is_read_whole(nursery, autojump_clock):
    server, fake = make_server(max_request_bytes=100_000, request_timeout_s=60.0)
    client = open_client(nursery, server)
    body = b"y" * 1100 * 20
    with trio.fail_after(100):
        await client.stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: %d\r\n\r\n" % len(body))
        for piece in pieces(body, 1100):  # 1100 bytes/s for 20 s, after no grace at all
            await client.stream.send_all(piece)
            await trio.sleep(1)
        reply = await client.response()
    assert reply.status == 200 and reply.body == body


async def test_the_body_still_has_the_request_timeout(nursery, autojump_clock):
    server, _ = make_server(max_request_bytes=1_000_000, request_timeout_s=8.0,
                            min_body_rate_bytes_s=1)
    client = open_client(nursery, server)
    with trio.fail_after(100):
        await client.stream.send_all(b"POST /echo HTTP/1.1\r\nHost: x\r\n"
                                     b"Content-Length: 999999\r\n\r\n")
        start = trio.current_time()
        received, at = await trickle(client, b"z" * 1000, 0.5)
    assert statuses(received) == [408]
    assert b"request_timeout_s" in received
    assert 8.0 <= at - start < 9.0


# --- connection caps


async def open_held(nursery, server, peer: str = PEER):
    """A connection that is served (a request answered) and stays open."""
    client = open_client(nursery, server, peer)
    reply = await client.request(b"GET", b"/hello")
    assert reply.status == 200
    return client


async def test_the_per_ip_cap_answers_503_without_reading(nursery, autojump_clock):
    server, fake = make_server(max_connections_per_ip=2, retry_after_s=3)
    with trio.fail_after(10):
        held = [await open_held(nursery, server) for _ in range(2)]
        refused = open_client(nursery, server)  # nothing sent: it is not read
        reply = await refused.raw(b"")
        await refused.assert_closed()
        other = await open_held(nursery, server, "10.0.0.9")  # another address: served
    assert reply.status == 503
    assert reply.header(b"retry-after") == b"3"
    assert reply.header(b"connection") == b"close"
    assert reply.json()["error"]["code"] == "too_many_connections"
    assert "max_connections_per_ip" in reply.json()["error"]["message"]
    assert server.connections.caps.by_key == {PEER: 2, "10.0.0.9": 1}
    assert len(fake.calls) == 3 and held and other


async def test_the_global_cap_answers_503(nursery, autojump_clock):
    server, _ = make_server(max_connections=2)
    with trio.fail_after(10):
        await open_held(nursery, server, "10.0.0.1")
        await open_held(nursery, server, "10.0.0.2")
        reply = await open_client(nursery, server, "10.0.0.3").raw(b"")
    assert reply.status == 503
    assert "max_connections)" in reply.json()["error"]["message"]


async def test_a_closed_connection_frees_its_slot(nursery, autojump_clock):
    server, _ = make_server(max_connections_per_ip=1)
    with trio.fail_after(10):
        first = await open_held(nursery, server)
        assert (await open_client(nursery, server).raw(b"")).status == 503
        await first.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections.caps.by_key == {}  # the entry went at zero
        again = await open_held(nursery, server)
    assert again is not None


async def test_an_ipv6_client_is_counted_by_its_64_prefix(nursery, autojump_clock):
    server, _ = make_server(max_connections_per_ip=1)
    with trio.fail_after(10):
        await open_held(nursery, server, "2001:db8:1:2::1")
        reply = await open_client(nursery, server, "2001:db8:1:2:ffff::7").raw(b"")
        await open_held(nursery, server, "2001:db8:1:3::1")
    assert reply.status == 503


async def test_a_trusted_proxy_is_not_capped_per_ip(nursery, autojump_clock):
    """A proxy speaks for many clients; it counts against max_connections only."""
    server, _ = make_server(max_connections_per_ip=1, trusted_proxies=["127.0.0.1/32"])
    with trio.fail_after(10):
        for _ in range(3):
            await open_held(nursery, server)
    assert server.connections.caps.open == 3


async def test_refusals_are_logged_once_per_period_with_a_count(nursery, autojump_clock,
                                                               caplog):
    server, _ = make_server(max_connections_per_ip=1)
    caplog.set_level(logging.WARNING, "triolytics.http")
    with trio.fail_after(100):
        await open_held(nursery, server)
        for _ in range(50):
            await open_client(nursery, server).raw(b"")
        await trio.sleep(1)  # a sweep reports them
        for _ in range(7):
            await open_client(nursery, server).raw(b"")
        await trio.sleep(2)  # within the period: not yet
        lines = [r.getMessage() for r in caplog.records]
        await trio.sleep(10)
    assert len(lines) == 1 and lines[0].startswith("refused 50 connections")
    later = [r.getMessage() for r in caplog.records]
    assert len(later) == 2 and later[1].startswith("refused 7 connections")
    assert "7 at max_connections_per_ip (1; last from 127.0.0.1)" in later[1]
