"""Probe: the floor for an HTTP capture server on trio + h11 + msgspec.

A bare HTTP/1.1 keep-alive server that does only what any capture server on this stack
must do — parse HTTP with h11, read the body, decode it into typed Structs — and stores
nothing. `bench/http_capture.py` runs it beside triolytics, pinned the same way, so the
benchmark can say how much triolytics adds on top of the stack itself.

    POST /v1/capture  one event        -> 201 {"ok":true}
    POST /v1/batch    {"batch": [...]} -> 200 {"ok":true}
    GET  /healthz                      -> 200 {"ok":true}

Usage: python bench/probe_h11.py --host 127.0.0.1 --port 3001   (prints `listening`)
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


async def send_quietly(stream: trio.SocketStream, data: bytes) -> None:
    with trio.move_on_after(1):
        try:
            await stream.send_all(data)
        except trio.BrokenResourceError:
            pass


async def serve(host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then close every connection and return."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(trio.serve_tcp, handle, port, host=host))
            print("listening", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3001)
    args = parser.parse_args()
    trio.run(serve, args.host, args.port)


if __name__ == "__main__":
    main()
