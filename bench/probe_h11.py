"""Probe: the floor for an HTTP capture server on trio + h11 + msgspec.

A bare HTTP/1.1 keep-alive server that does only what any capture server on this stack
must do — parse HTTP with h11, read the body, decode it into typed Structs — and stores
nothing. `bench/http_capture.py` runs it beside triolytics, pinned the same way, so the
benchmark can say how much triolytics adds on top of the stack itself.

    POST /v1/capture  one event        -> 201 {"ok":true}
    POST /v1/batch    {"batch": [...]} -> 200 {"ok":true}
    GET  /healthz                      -> 200 {"ok":true}

With `--heads-only` it uses h11 the way triolytics does: h11 parses each request head
(on a fresh `h11.Connection` fed with the bytes left over), the body is sliced by its
Content-Length, and the response bytes are written directly. That is the floor for a
server built like triolytics, so the benchmark reports against both. (Chunked bodies
are refused with 411 in that mode: the benchmark sends none.)

Usage: python bench/probe_h11.py --host 127.0.0.1 --port 3001 [--heads-only]
(prints `listening`)
"""

from __future__ import annotations

import argparse
import functools
import signal

import h11
import msgspec
import trio

RECV_BYTES = 64 * 1024  # one receive buffer per read


class Event(msgspec.Struct):
    type: str
    event: str | None = None
    anonymousId: str | None = None
    userId: str | None = None
    properties: msgspec.Raw = msgspec.Raw(b"null")


class Batch(msgspec.Struct):
    batch: list[Event]


DECODE_EVENT = msgspec.json.Decoder(Event)
DECODE_BATCH = msgspec.json.Decoder(Batch)
OK = b'{"ok":true}'
ROUTES = {  # (method, target) -> (decoder or None, success status)
    (b"POST", b"/v1/capture"): (DECODE_EVENT, 201),
    (b"POST", b"/v1/batch"): (DECODE_BATCH, 200),
    (b"GET", b"/healthz"): (None, 200),
}


def respond(conn: h11.Connection, status: int, body: bytes) -> bytes:
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    return (
        conn.send(h11.Response(status_code=status, headers=headers))
        + conn.send(h11.Data(data=body))
        + conn.send(h11.EndOfMessage())
    )


def answer(request: h11.Request, body: bytes) -> tuple[int, bytes]:
    route = ROUTES.get((request.method, request.target))
    if route is None:
        return 404, b'{"error":"not found"}'
    decoder, status = route
    if decoder is not None:
        try:
            decoder.decode(body)
        except msgspec.DecodeError:
            return 400, b'{"error":"invalid body"}'
    return status, OK


async def handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    request, body = None, []
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECV_BYTES))
            elif isinstance(event, h11.Request):
                request, body = event, []
            elif isinstance(event, h11.Data):
                body.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                status, payload = answer(request, b"".join(body))
                await stream.send_all(respond(conn, status, payload))
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
            else:  # ConnectionClosed or PAUSED
                return
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await send_quietly(stream, respond(conn, exc.error_status_hint, b'{"error":"bad"}'))
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


REASONS = {200: b"OK", 201: b"Created", 400: b"Bad Request", 404: b"Not Found",
           411: b"Length Required"}


def raw_response(status: int, body: bytes, close: bool) -> bytes:
    return b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        status, REASONS[status], len(body), b"connection: close\r\n" if close else b"", body)


async def handle_heads_only(stream: trio.SocketStream) -> None:
    rest, eof = b"", False
    try:
        while True:
            conn = h11.Connection(h11.SERVER)
            if rest:
                conn.receive_data(rest)
            if eof:
                conn.receive_data(b"")
            while (event := conn.next_event()) is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(RECV_BYTES))
            if type(event) is not h11.Request:
                return
            data, eof = conn.trailing_data
            headers = dict(event.headers)
            if b"transfer-encoding" in headers:
                await stream.send_all(raw_response(411, b'{"error":"chunked"}', True))
                return
            length = int(headers.get(b"content-length", b"0"))
            while len(data) < length and not eof:
                more = await stream.receive_some(RECV_BYTES)
                eof = not more
                data += more
            if len(data) < length:
                return
            rest = data[length:]
            status, payload = answer(event, data[:length])
            close = event.http_version < b"1.1" or b"close" in headers.get(b"connection", b"")
            await stream.send_all(raw_response(status, payload, close))
            if close:
                return
    except h11.RemoteProtocolError:
        await send_quietly(stream, raw_response(400, b'{"error":"bad"}', True))
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def send_quietly(stream: trio.SocketStream, data: bytes) -> None:
    with trio.move_on_after(1):
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def serve(host: str, port: int, handler=handle) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection and return."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(trio.serve_tcp, handler, port, host=host))
            print("listening", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3001)
    parser.add_argument("--heads-only", action="store_true",
                        help="h11 parses request heads only; bodies and responses are ours")
    args = parser.parse_args()
    trio.run(serve, args.host, args.port, handle_heads_only if args.heads_only else handle)


if __name__ == "__main__":
    main()
