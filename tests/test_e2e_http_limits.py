"""The HTTP defences on loopback (port 0): a smuggled request gets no answer of its own,
and the connection caps hold for HTTP and WebSocket connections alike.

Level three of the test ladder: `serve` in a nursery, raw trio sockets (bound to chosen
loopback source addresses, 127.0.0.x, to be several clients) and trio-websocket. Caps
are tiny (3) so each test opens a handful of connections and takes well under a second.
"""

from __future__ import annotations

import trio
import trio_websocket
from test_e2e_realtime import running, ws

HOST = "127.0.0.1"


async def connect(port: int, source: str = HOST) -> trio.SocketStream:
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect((HOST, port))
    return trio.SocketStream(sock)


async def until_closed(stream: trio.SocketStream) -> bytes:
    received = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(65536):
            received += chunk
    return received


async def held(port: int, source: str = HOST) -> trio.SocketStream:
    """A connection the server serves (one request answered), left open."""
    stream = await connect(port, source)
    await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    with trio.fail_after(10):
        answer = await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    return stream


async def refused(port: int, source: str = HOST) -> bytes:
    """Connect, send nothing, and return the answer: a 503 that closes."""
    stream = await connect(port, source)
    async with stream:
        answer = await until_closed(stream)
    assert answer.startswith(b"HTTP/1.1 503 "), answer
    assert b"\r\nretry-after: 1\r\n" in answer
    assert b"too_many_connections" in answer
    return answer


async def served_again(port: int, source: str = HOST) -> trio.SocketStream:
    """A connection served once a slot is free (the server frees it when it sees the
    close, a moment after the client's)."""
    with trio.fail_after(10):
        while True:
            stream = await connect(port, source)
            await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = await stream.receive_some(65536)
            if answer.startswith(b"HTTP/1.1 200 "):
                return stream
            await stream.aclose()
            await trio.sleep(0.01)


async def test_a_smuggled_request_gets_no_answer(tmp_path):
    """The audit's case: Content-Length and chunked, a request hidden in the body. One
    answer (400), then the connection closes; the hidden request is never served."""
    hidden = b"GET /admin/stats HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n" + hidden
    async with running(tmp_path) as server:
        stream = await connect(server.port)
        async with stream:
            await stream.send_all(b"POST /v1/capture HTTP/1.1\r\nHost: x\r\n"
                                  b"Content-Type: application/json\r\n"
                                  b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  % len(body) + body)
            received = await until_closed(stream)
    assert received.count(b"HTTP/1.1 ") == 1
    assert received.startswith(b"HTTP/1.1 400 ")
    assert b"Transfer-Encoding with Content-Length" in received


async def test_the_per_ip_cap_refuses_the_fourth_and_a_close_frees_a_slot(tmp_path):
    async with running(tmp_path, max_connections_per_ip=3) as server:
        port = server.port
        streams = [await held(port) for _ in range(3)]
        await refused(port)  # a 4th from 127.0.0.1
        other = await held(port, "127.0.0.2")  # another address is served
        await streams.pop().aclose()
        streams.append(await served_again(port))
        await refused(port)
        for stream in [*streams, other]:
            await stream.aclose()


async def test_the_global_cap_refuses_past_max_connections(tmp_path):
    async with running(tmp_path, max_connections=3) as server:
        port = server.port
        streams = [await held(port, f"127.0.0.{i}") for i in (1, 2, 3)]
        answer = await refused(port, "127.0.0.4")
        assert b"(max_connections)" in answer
        await streams.pop().aclose()
        streams.append(await served_again(port, "127.0.0.4"))
        for stream in streams:
            await stream.aclose()


async def test_websocket_connections_count_against_the_caps(tmp_path):
    """Upgraded connections hold their slot until they close: with 3 WebSockets open,
    an HTTP connection and a 4th WebSocket handshake are refused (503); closing one
    WebSocket lets the next in."""
    async with running(tmp_path, max_connections_per_ip=3) as server:
        aid = await server.create()
        async with ws(server, aid), ws(server, aid):
            async with ws(server, aid):
                await refused(server.port)
                try:
                    async with ws(server, aid):
                        raise AssertionError("a 4th WebSocket was accepted")
                except trio_websocket.ConnectionRejected as exc:
                    assert exc.status_code == 503
            stream = await served_again(server.port)  # the 3rd WebSocket's slot
            await refused(server.port)
            await stream.aclose()
