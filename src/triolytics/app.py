"""`serve`: the task tree. Every nursery of the server is opened here.

    serve(config, task_status)
    └─ root nursery
       ├─ signal watcher    SIGINT/SIGTERM: drain; a second one cancels `service`
       ├─ writer            journal (+ Syncer thread) and DuckDB loads; exits last
       └─ service           (cancel scope)
          └─ listener
             ├─ timers      the sweeper: idle and request timeouts of all connections
             ├─ acceptors   one per listening socket; cancelled first on shutdown
             └─ handlers    one task per connection; get `shutdown_grace_s` to finish

Start-up (before listening): open the store, replay the journal's unloaded suffix,
register write keys, write `<data_dir>/server.json` so the CLI can find us.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import secrets
import signal
from collections.abc import Callable
from pathlib import Path
from time import time_ns

import msgspec
import trio

from triolytics.api import Api
from triolytics.collector import Collector
from triolytics.config import Config
from triolytics.dedup import Dedup
from triolytics.http_server import HttpServer
from triolytics.journal import Journal
from triolytics.store import Store
from triolytics.writer import Writer

log = logging.getLogger("triolytics")
ACCEPT_RETRY_S = 0.1  # after EMFILE/ENFILE/ENOBUFS, wait this long before accepting again
GC_YOUNG_THRESHOLD = 20_000  # allocations between young-generation collections (default 700)
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Bound(msgspec.Struct):
    host: str
    port: int


def _admin_token(data: Path) -> str:
    path = data / "admin.token"
    if path.exists():
        return path.read_text().strip()
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token


def prepare(config: Config) -> tuple[Writer, dict[str, str], str]:
    """Blocking start-up work (run in a thread): store, replay, keys, admin token."""
    data = Path(config.data_dir)
    data.mkdir(parents=True, exist_ok=True)
    store = Store(data / "events.duckdb", threads=config.duckdb_threads)
    journal = Journal(data / "journal", config.journal_segment_bytes,
                      sync_on_rotate=config.fsync != "off")
    dedup = Dedup(config.dedup_window_s * 1_000_000, config.dedup_max_ids)
    writer = Writer(config, journal, store, dedup)
    replayed = writer.recover()
    if journal.torn_bytes:
        log.warning("dropped a torn journal tail of %d bytes (never acknowledged)",
                    journal.torn_bytes)
    if replayed:
        log.info("replayed %d journaled rows into DuckDB", replayed)
    for key in config.write_keys:
        store.create_key("default", key)
    keys = store.active_keys()
    if not keys:
        key = store.create_key("default")
        keys = store.active_keys()
        print(f"\n  Created project 'default' with write key:  {key}\n"
              f"  Send events with the header  x-write-key: {key}\n", flush=True)
    return writer, keys, _admin_token(data)


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED,
                stop: trio.Event | None = None, handle_signals: bool = False,
                clock: Callable[[], int] = time_ns) -> None:
    """Run the server until `stop` is set (or SIGINT/SIGTERM, with handle_signals)."""
    writer, keys, token = await trio.to_thread.run_sync(prepare, config)
    # Long-lived start-up objects never need collecting: freeze them, and collect the
    # young generation less often (each request allocates many short-lived objects).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    api = Api(Collector(config, keys), writer, token, clock)
    http = HttpServer(config, api.routes())
    stop = stop if stop is not None else trio.Event()
    service = trio.CancelScope()  # a second signal cancels in-flight requests at once
    signals = trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) if handle_signals \
        else contextlib.nullcontext()
    with signals as received:  # held until the end: no KeyboardInterrupt mid-shutdown
        async with trio.open_nursery() as root:
            if received is not None:
                root.start_soon(_watch_signals, received, stop, service)
            writer_done = trio.Event()
            root.start_soon(_run_writer, writer, writer_done)
            try:
                with service:
                    async with trio.open_nursery() as nursery:
                        bound = await nursery.start(_listen, config, http, stop)
                        task_status.started(bound)
            finally:
                writer.close()
                with trio.CancelScope(shield=True):
                    await writer_done.wait()
                root.cancel_scope.cancel()  # the signal watcher
    log.info("stopped; %d rows stored this run", writer.stats.loaded_rows)


async def _run_writer(writer: Writer, done: trio.Event) -> None:
    try:
        await writer.run()
    finally:
        done.set()


async def _listen(config: Config, http: HttpServer, stop: trio.Event, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
    listeners = await trio.open_tcp_listeners(config.port, host=config.host)
    sockname = listeners[0].socket.getsockname()
    bound = Bound(sockname[0], sockname[1])
    (Path(config.data_dir) / "server.json").write_text(
        json.dumps({"host": bound.host, "port": bound.port, "pid": os.getpid()}))
    log.info("listening on http://%s:%d", bound.host, bound.port)
    limiter = trio.CapacityLimiter(config.max_connections)
    async with trio.open_nursery() as timers:
        timers.start_soon(http.sweep)
        await _serve_until(listeners, http, limiter, stop, config, bound, task_status)
        timers.cancel_scope.cancel()
    (Path(config.data_dir) / "server.json").unlink(missing_ok=True)


async def _serve_until(listeners, http: HttpServer, limiter: trio.CapacityLimiter,
                       stop: trio.Event, config: Config, bound: Bound, task_status) -> None:
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as acceptors:
            for listener in listeners:
                acceptors.start_soon(_accept, listener, handlers, http, limiter)
            task_status.started(bound)
            await stop.wait()
            acceptors.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        log.info("draining %d connections (grace %.0fs)", http.connections.count,
                 config.shutdown_grace_s)
        http.connections.drain()
        handlers.cancel_scope.deadline = trio.current_time() + config.shutdown_grace_s


async def _accept(listener: trio.SocketListener, handlers: trio.Nursery, http: HttpServer,
                  limiter: trio.CapacityLimiter) -> None:
    while True:
        token = object()  # one connection slot
        await limiter.acquire_on_behalf_of(token)
        try:
            stream = await listener.accept()
        except OSError as exc:
            limiter.release_on_behalf_of(token)
            if exc.errno not in _CAPACITY_ERRNOS:
                raise
            log.error("accept failed (%s); retrying in %.1fs", exc, ACCEPT_RETRY_S)
            await trio.sleep(ACCEPT_RETRY_S)
            continue
        except BaseException:
            limiter.release_on_behalf_of(token)
            raise
        handlers.start_soon(_connection, http, stream, limiter, token)


async def _connection(http: HttpServer, stream: trio.SocketStream,
                      limiter: trio.CapacityLimiter, token: object) -> None:
    try:
        try:
            peer = stream.socket.getpeername()[0]
        except OSError:
            return
        await http.serve(stream, peer)
    finally:
        limiter.release_on_behalf_of(token)


async def _watch_signals(signals, stop: trio.Event, service: trio.CancelScope) -> None:
    async for signum in signals:
        if stop.is_set():
            log.warning("second signal: cancelling in-flight requests")
            service.cancel()
            continue
        log.info("received %s: finishing in-flight requests", signal.Signals(signum).name)
        stop.set()
