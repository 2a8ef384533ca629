"""Probes: the floor for a WebSocket event stream, on trio-websocket or on asyncio websockets.

Bare WebSocket servers that do only what any real-time collector must do — accept the
upgrade, read each message, decode it into typed Structs — and store nothing. A message
is the batch of docs/websocket.md: `{"events": [{type, ts?, payload?, id?}, ...], "seq"?}`.
When it has a `seq`, the probe answers `{"type":"ack","seq":N,"stored":k,"session_id":"…"}`
(one session id per connection); an undecodable message closes the connection with 1007.
Any request path is accepted. `bench/ws_stream.py` and `bench/connections.py` run these
beside triolytics, pinned the same way.

    --server trio        trio + trio-websocket (wsproto), the stack triolytics is built on
    --server websockets  asyncio + the `websockets` package, a widely used reference
    --server wsproto     trio + wsproto directly (the frame layer under trio-websocket):
                         one task per connection, answers to one read sent in one write

Usage: python bench/probe_ws.py --server trio --host 127.0.0.1 --port 3002  (prints `listening`)
"""

from __future__ import annotations

import argparse
import signal
import uuid

import msgspec

MESSAGE_QUEUE_SIZE = 32  # messages read ahead per connection (triolytics: ws_max_in_flight)
RECEIVE_BUFFER_SIZE = 64 * 1024  # bytes per socket read (trio-websocket's default is 4 KiB)
MAX_MESSAGE_SIZE = 1024 * 1024  # ws_max_message_bytes


class Event(msgspec.Struct):
    type: str
    ts: int | None = None
    payload: msgspec.Raw = msgspec.Raw(b"null")
    id: str | None = None


class Batch(msgspec.Struct):
    events: list[Event]
    seq: int | None = None


class Ack(msgspec.Struct, tag_field="type", tag="ack"):
    seq: int
    stored: int
    session_id: str


DECODE_BATCH = msgspec.json.Decoder(Batch)
ENCODE = msgspec.json.Encoder()


def answer(message: str | bytes, session_id: str) -> str | None:
    """The ack for one message (None when it has no seq); raises msgspec.DecodeError."""
    batch = DECODE_BATCH.decode(message)
    if batch.seq is None:
        return None
    return ENCODE.encode(Ack(batch.seq, len(batch.events), session_id)).decode()


async def handle(message: str | bytes, session_id: str, send, close) -> bool:
    """Answer one message with `await send(ack)` when it has a seq; an undecodable one
    gets `await close(1007, ...)` and False (stop reading)."""
    try:
        ack = answer(message, session_id)
    except msgspec.DecodeError:
        await close(1007, "invalid batch")
        return False
    if ack is not None:
        await send(ack)
    return True


# --- trio + trio-websocket ---------------------------------------------------------------


def serve_trio(host: str, port: int, queue: int, receive_buffer: int) -> None:
    import trio
    import trio_websocket

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        session_id = str(uuid.uuid4())
        try:
            while True:
                message = await ws.get_message()
                if not await handle(message, session_id, ws.send_message, ws.aclose):
                    return
        except trio_websocket.ConnectionClosed:
            pass

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: trio_websocket.serve_websocket(
                        handler,
                        host,
                        port,
                        None,
                        message_queue_size=queue,
                        max_message_size=MAX_MESSAGE_SIZE,
                        receive_buffer_size=receive_buffer,
                        task_status=task_status,
                    )
                )
                print("listening", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    trio.run(serve)


# --- trio + wsproto, no trio-websocket ------------------------------------------------


def serve_wsproto(host: str, port: int, receive_buffer: int) -> None:
    import trio
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import (
        AcceptConnection,
        CloseConnection,
        Message,
        Ping,
        Request,
        TextMessage,
    )

    async def handler(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        session_id = str(uuid.uuid4())
        parts: list = []
        size = 0
        try:
            while data := await stream.receive_some(receive_buffer):
                ws.receive_data(data)
                out = []
                for event in ws.events():
                    if isinstance(event, Message):
                        size += len(event.data)
                        if size > MAX_MESSAGE_SIZE:
                            out.append(ws.send(CloseConnection(1009, "too big")))
                            await stream.send_all(b"".join(out))
                            return
                        if not event.message_finished:
                            parts.append(event.data)
                            continue
                        message = event.data
                        if parts:
                            parts.append(message)
                            message = ("" if isinstance(event, TextMessage) else b"").join(parts)
                            parts.clear()
                        size = 0
                        try:
                            ack = answer(message, session_id)
                        except msgspec.DecodeError:
                            out.append(ws.send(CloseConnection(1007, "invalid batch")))
                            await stream.send_all(b"".join(out))
                            return
                        if ack is not None:
                            out.append(ws.send(TextMessage(ack)))
                    elif isinstance(event, Request):
                        out.append(ws.send(AcceptConnection()))
                    elif isinstance(event, Ping):
                        out.append(ws.send(event.response()))
                    elif isinstance(event, CloseConnection):
                        out.append(ws.send(event.response()))
                        await stream.send_all(b"".join(out))
                        return
                if out:
                    await stream.send_all(b"".join(out))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    async def serve() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(lambda task_status: trio.serve_tcp(
                    handler, port, host=host, task_status=task_status))
                print("listening", flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()

    trio.run(serve)


# --- asyncio + websockets ----------------------------------------------------------------


def serve_websockets(host: str, port: int, queue: int) -> None:
    import asyncio

    from websockets.asyncio.server import ServerConnection, serve
    from websockets.exceptions import ConnectionClosed

    async def handler(ws: ServerConnection) -> None:
        session_id = str(uuid.uuid4())
        try:
            async for message in ws:
                if not await handle(message, session_id, ws.send, ws.close):
                    return
        except ConnectionClosed:
            pass

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = loop.create_future()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        async with serve(
            handler,
            host,
            port,
            compression=None,  # the browser default would be deflate; the bench offers none
            max_size=MAX_MESSAGE_SIZE,
            max_queue=queue,
            server_header=None,
        ):
            print("listening", flush=True)
            await stop

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=["trio", "websockets", "wsproto"], default="trio")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3002)
    parser.add_argument("--message-queue-size", type=int, default=MESSAGE_QUEUE_SIZE,
                        help=f"messages read ahead per connection (default {MESSAGE_QUEUE_SIZE})")
    parser.add_argument("--receive-buffer-size", type=int, default=RECEIVE_BUFFER_SIZE,
                        help=f"trio: bytes per socket read (default {RECEIVE_BUFFER_SIZE})")
    args = parser.parse_args()
    if args.server == "trio":
        serve_trio(args.host, args.port, args.message_queue_size, args.receive_buffer_size)
    elif args.server == "wsproto":
        serve_wsproto(args.host, args.port, args.receive_buffer_size)
    else:
        serve_websockets(args.host, args.port, args.message_queue_size)


if __name__ == "__main__":
    main()
