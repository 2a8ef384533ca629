"""`serve`: the task tree. Every nursery of the server is opened here.

    serve(config, task_status)
    └─ root nursery
       ├─ signal watcher    SIGINT/SIGTERM: drain; a second one cancels `service`
       ├─ writer            journal (+ Syncer thread) and DuckDB loads; exits last
       └─ service           (cancel scope)
          ├─ archiver       archive_dir / retention_days: every archive_interval_s
          │                 (archive.py); returns on `stop`
          ├─ rollups        the dashboard's rollups, every rollup_interval_s, and beside
          │                 it the figures kept warm (dashboard.py); returns on `stop`
          ├─ live feed      a message every dashboard_live_s while a dashboard page is
          │                 open (dashboard.py); returns on `stop`
          ├─ lake upkeep    store = "ducklake": the lake's maintenance every
          │                 ducklake_maintenance_interval_s (lake.py); returns on `stop`
          ├─ lead           many writers: every LEAD_CHECK_S, whether this writer leads
          │                 (runs rollups, maintenance, archive: shared_state.Leader)
          ├─ shared reaper  many writers: claims idle sessions (any writer's) every
          │                 shared_reap_interval_s and stores their ends (reaper.py)
          └─ listener
             ├─ timers      the sweepers: idle and request timeouts of all connections;
             │              the session reaper: sleeps until the earliest session
             │              deadline, stores session_end rows (runs until drained)
             ├─ acceptors   one per listening socket (those of `metrics_listen` too,
             │              with their own one-route HttpServer); cancelled first on shutdown
             └─ handlers    one task per connection; get `shutdown_grace_s` to finish
                            (a WebSocket connection: its task reads, an acker answers).
                            Over a connection cap, the task answers 503 and closes
                            (`HttpServer.serve`): no client waits in the backlog

The dashboard's reads, its rollups' refreshes included, run in its own worker threads
at nice `dashboard_nice` (dashboard.Background), closed before the writer.

Start-up (before listening): lock `<data_dir>/server.lock`, open the store, replay the
journal's unloaded suffix, resume the sessions open in storage, register write keys,
write `<data_dir>/server.json` so the CLI can find us. A fault the user can fix (data
directory not writable or locked, port taken) is raised as a `StartupError` (startup.py).
A start-up that fails for lack of space (ENOSPC, DuckDB's "No space left on device")
listens anyway: every request is answered 503 (unready.py; `/healthz` 200) while start-up
is retried every `startup_retry_s`; once it succeeds the same sockets serve as usual.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import secrets
import shlex
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path
from time import time_ns

import msgspec
import trio

from triolytics.core.capture import new_id
from triolytics.core.collector import Collector
from triolytics.core.config import Config, split_address
from triolytics.core.dedup import Dedup
from triolytics.core.faults import Faults
from triolytics.core.identity import Identities
from triolytics.core.journal import Journal
from triolytics.core.sessions import Session, Sessions
from triolytics.server.api import BODILESS, Api
from triolytics.server.dashboard import Auth, Background, Dashboard, Live, Rollups, every
from triolytics.server.http_server import HttpServer
from triolytics.server.metrics import Metrics
from triolytics.server.reaper import reap_sessions, reap_shared
from triolytics.server.startup import (
    lock_data_dir,
    no_space,
    open_data_dir,
    open_lake,
    open_listeners,
    open_store,
)
from triolytics.server.static import sdk_routes
from triolytics.server.unready import Unready
from triolytics.server.ws_server import RealtimeServer
from triolytics.storage.archive import archive_loop
from triolytics.storage.store import Store
from triolytics.storage.writer import Writer

log = logging.getLogger("triolytics")
LEAD_CHECK_S = 2.0  # many writers: how often a writer asks who leads the lake's upkeep
ACCEPT_RETRY_S = 0.1  # after EMFILE/ENFILE/ENOBUFS, wait this long before accepting again
GC_YOUNG_THRESHOLD = 20_000  # allocations between young-generation collections (default 700)
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class Bound(msgspec.Struct):
    host: str
    port: int
    metrics_port: int | None = None  # of `metrics_listen`, when set


def _secret_file(path: Path) -> str:
    """A secret kept in the data directory, readable by its owner only; made once."""
    if path.exists():
        return path.read_text().strip()
    return _write_secret(path, secrets.token_urlsafe(32))


def _write_secret(path: Path, value: str) -> str:
    """Write `value` as `path`, readable by its owner only (written whole, then renamed)."""
    temp = path.with_suffix(".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    os.replace(temp, path)
    return value


class Prepared(msgspec.Struct):
    writer: Writer
    shared_reaper: object | None  # many writers: the shared reaper's SharedState
    leader: object | None  # many writers: shared_state.Leader (who runs the lake's upkeep)
    keys: dict[str, str]  # write key -> project
    admin_token: str
    viewer_token: str  # the dashboard's read-only login
    identities: Identities
    sessions: Sessions


def prepare(config: Config) -> Prepared:
    """Blocking start-up work (run in a thread): store, replay, sessions, keys, secrets."""
    data = Path(config.data_dir)
    open_data_dir(data)
    if config.store == "ducklake":
        store, quarantined = open_lake(config), []
    else:
        store, quarantined = open_store(data / "events.duckdb", config.duckdb_threads)
    journal = Journal(data / "journal", config.journal_segment_bytes,
                      sync_on_rotate=config.fsync != "off")
    try:
        return _prepare(config, data, store, journal, quarantined)
    except BaseException:  # (closed, so that a start-up on a full disk can be retried)
        with contextlib.suppress(Exception):
            journal.close()
        with contextlib.suppress(Exception):
            store.close()
        raise


def _prepare(config: Config, data: Path, store: Store, journal: Journal,
             quarantined: list[Path]) -> Prepared:
    dedup = Dedup(config.dedup_window_s * 1_000_000, config.dedup_max_ids)
    writer = Writer(config, journal, store, dedup)
    writer.quarantined = [str(q) for q in quarantined]
    writer.new_id = new_id
    shared_reaper = leader = None
    dsn = config.shared_state_dsn()
    if dsn is not None:  # many writers: sessions and dedup in PostgreSQL
        from triolytics.storage.shared_state import Leader, SharedState
        timeout = round(config.session_timeout_s * 1_000_000)
        window = config.dedup_window_s * 1_000_000
        writer.shared = SharedState(dsn, config.writer_name(), timeout, window)
        # (two groups open at once: one decided while the previous one syncs)
        writer.shared_pool = [writer.shared,
                              SharedState(dsn, config.writer_name(), timeout, window)]
        shared_reaper = SharedState(dsn, config.writer_name(), timeout, window)
        leader = Leader(dsn, config.writer_name())
        leader.check()
    replayed = writer.recover()
    if replayed:
        log.info("replayed %d journaled rows into DuckDB", replayed)
    for key in config.write_keys:
        store.create_key("default", key)
    store.save_keys()
    keys = store.active_keys()
    if not keys:
        key = store.create_key("default")  # stored at once: a failed start keeps it
        keys = store.active_keys()
        print(f"created project 'default' with write key {key} (send it as the x-write-key "
              f"header); `{_keys_list_command(config)}` shows it again", flush=True)
    sessions = Sessions(round(config.session_timeout_s * 1_000_000), new_id,
                        ends=shared_reaper is None)
    writer.adopt = sessions.adopt
    if shared_reaper is None:  # (many writers: the sessions are in PostgreSQL)
        sessions.restore([Session((project, channel, anonymous_id or user_id), session_id,
                                  started, anonymous_id, user_id, last_seen, events, first,
                                  latest)
                          for project, channel, anonymous_id, user_id, session_id, started,
                          last_seen, events, first, latest in store.open_sessions()])
    if len(sessions):
        log.info("resumed %d open sessions", len(sessions))
    secret = partial(_secret, store, data)
    identities = Identities(secret("analytics.secret").encode(), config.analytics_shard)
    return Prepared(writer, shared_reaper, leader, keys, secret("admin.token"),
                    secret("viewer.token"), identities, sessions)


def _secret(store: Store, data: Path, name: str) -> str:
    """A secret of the data directory; with a lake, the one every node shares (kept in
    the lake, copied to the data directory for the CLI)."""
    shared = getattr(store, "shared_secret", None)
    if shared is None:
        return _secret_file(data / name)
    value = shared(name, lambda: secrets.token_urlsafe(32))
    path = data / name
    if not path.exists() or path.read_text().strip() != value:
        _write_secret(path, value)
    return value


def _keys_list_command(config: Config) -> str:
    data = config.data_dir
    return "triolytics keys list" + ("" if data == Config().data_dir else
                                     f" --data {shlex.quote(data)}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED,
                stop: trio.Event | None = None, handle_signals: bool = False,
                clock: Callable[[], int] = time_ns) -> None:
    """Run the server until `stop` is set (or SIGINT/SIGTERM, with handle_signals)."""
    stop = stop if stop is not None else trio.Event()
    lock = await trio.to_thread.run_sync(lock_data_dir, Path(config.data_dir))
    try:
        signals = trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) \
            if handle_signals else contextlib.nullcontext()
        with signals as received:  # held until the end: no KeyboardInterrupt mid-shutdown
            await _serve(config, stop, received, clock, task_status)
    finally:
        os.close(lock)


async def _serve(config: Config, stop: trio.Event, received, clock: Callable[[], int],
                 task_status) -> None:
    service = trio.CancelScope()  # a second signal cancels in-flight requests at once
    async with trio.open_nursery() as root:
        if received is not None:
            root.start_soon(_watch_signals, received, stop, service)
        try:
            ready = await trio.to_thread.run_sync(prepare, config)
            listeners = None
        except Exception as exc:
            if not no_space(exc):
                raise
            listeners = await open_listeners(config.port, config.host,
                                             reuse_port=config.reuse_port)
            ready = await _start_when_space(config, listeners, exc, stop, task_status)
            if ready is None:  # stopped while waiting
                root.cancel_scope.cancel()
                return
        await _run(config, ready, listeners, stop, service, clock, task_status)
        root.cancel_scope.cancel()  # the signal watcher


async def _start_when_space(config: Config, listeners: list[trio.SocketListener],
                            exc: Exception, stop: trio.Event,
                            task_status) -> Prepared | None:
    """Start-up failed for lack of space: listen anyway, answer 503 saying why, and retry
    `prepare` every `startup_retry_s` until it succeeds (then return it) or `stop`."""
    faults = Faults(log, config.fault_log_interval_s, trio.current_time)
    fault = "start-up attempt"
    reason = f"start-up failed: {_one_line(exc)}"
    faults.failed(fault, f"{reason} (listening anyway: 503 until there is space; retrying "
                  f"every {config.startup_retry_s:g} s)")
    unready = Unready(config, reason)
    bound = _bound(listeners)
    _write_server_json(config, bound)
    log.info("listening on http://%s:%d (not ready: %s)", bound.host, bound.port, reason)
    task_status.started(bound)
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as acceptors:
            for listener in listeners:
                acceptors.start_soon(_accept_with, listener, handlers, unready.serve)
            while True:
                with trio.move_on_after(config.startup_retry_s):
                    await stop.wait()
                if stop.is_set():
                    ready = None
                    break
                try:
                    ready = await trio.to_thread.run_sync(prepare, config)
                    break
                except Exception as again:
                    if not no_space(again):
                        raise
                    unready.reason = f"start-up failed: {_one_line(again)}"
                    faults.failed(fault, unready.reason)
            acceptors.cancel_scope.cancel()
        handlers.cancel_scope.deadline = trio.current_time() + 1  # the answers under way
    if ready is not None:
        faults.cleared(fault)
    else:
        for listener in listeners:
            await listener.aclose()
        (Path(config.data_dir) / "server.json").unlink(missing_ok=True)
    return ready


async def _run(config: Config, ready: Prepared, listeners: list | None, stop: trio.Event,
               service: trio.CancelScope, clock: Callable[[], int], task_status) -> None:
    writer, sessions = ready.writer, ready.sessions
    # Long-lived start-up objects never need collecting: freeze them, and collect the
    # young generation less often (each request allocates many short-lived objects).
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 20, 20)
    collector = Collector(config, ready.keys, sessions, writer.dedup)
    api = Api(collector, writer, ready.admin_token, ready.identities, clock)
    realtime = RealtimeServer(config, writer, ready.identities, sessions, clock)
    background = Background(config.dashboard_queries, config.dashboard_nice,
                            partial(writer.run_store, writer.store.cursor))
    live = Live(config, lambda: api.events_received + realtime.events_received,
                lambda: len(sessions), background, lambda: writer.store.last_seq,
                lambda: stop.is_set(), clock=trio.current_time)
    dashboard = Dashboard(config, Auth(ready.admin_token, ready.viewer_token,
                                       config.dashboard_session_s,
                                       config.dashboard_secure_cookie),
                          background, live)
    routes = api.routes() | sdk_routes() | dashboard.routes()
    # With metrics_listen, GET /metrics is served there only (docs/metrics.md)
    private = HttpServer(config, {b"/metrics": routes.pop(b"/metrics")}) \
        if config.metrics_listen else None
    http = HttpServer(config, routes, upgrades={b"/analytics": realtime}, bodiless=BODILESS)
    api.render_metrics = Metrics(api, http, realtime, writer, sessions).render
    async with trio.open_nursery() as root:
        writer_done = trio.Event()
        root.start_soon(_run_writer, writer, writer_done)
        try:
            with service:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(live.run, stop)
                    leads = None
                    if ready.leader is not None:
                        leads = partial(getattr, ready.leader, "leading")
                        nursery.start_soon(_lead, ready.leader, stop)
                    nursery.start_soon(Rollups(background, config.rollup_interval_s,
                                               api.archive_lock, dashboard.cache,
                                               leads).run, stop)
                    reaper = partial(reap_sessions, sessions, writer,
                                     config.session_end_chunk_rows, clock)
                    if ready.shared_reaper is not None:
                        nursery.start_soon(partial(
                            reap_shared, ready.shared_reaper, writer,
                            config.session_end_chunk_rows,
                            round(config.session_timeout_s * 1_000_000),
                            config.shared_reap_interval_s, new_id, stop, clock))
                    if config.store == "ducklake":
                        nursery.start_soon(_maintain_lake, config, writer, stop, leads)
                    if config.archive_dir or config.retention_days:
                        nursery.start_soon(archive_loop, config, writer, stop, clock,
                                           api.archive_lock, leads)
                    bound = await nursery.start(_listen, config, http, private, realtime,
                                                reaper, stop, listeners)
                    if listeners is None:  # (else started while start-up waited)
                        task_status.started(bound)
        finally:
            with trio.CancelScope(shield=True):  # (its cursors close before the store)
                await trio.to_thread.run_sync(background.close)
            writer.close()
            with trio.CancelScope(shield=True):
                await writer_done.wait()
            for shared in (*writer.shared_pool, ready.shared_reaper, ready.leader):
                if shared is not None:
                    shared.close()
    log.info("stopped; %d rows stored this run", writer.stats.loaded_rows)


async def _lead(leader, stop: trio.Event) -> None:
    """Many writers: who runs the lake's upkeep, checked every LEAD_CHECK_S (a writer that
    dies lets another take over within that)."""
    leading = leader.leading
    if leading:
        log.info("this writer leads the lake's upkeep (rollups, maintenance, archive)")
    while not stop.is_set():
        with trio.move_on_after(LEAD_CHECK_S):
            await stop.wait()
        if stop.is_set():
            return
        if await trio.to_thread.run_sync(leader.check) != leading:
            leading = leader.leading
            log.info("this writer %s the lake's upkeep", "now leads" if leading else
                     "no longer leads")


async def _maintain_lake(config: Config, writer: Writer, stop: trio.Event,
                         leads=None) -> None:
    """Every ducklake_maintenance_interval_s: the lake's maintenance (lake.py), on a
    cursor of its own in a thread, beside the loads (with many writers, by the one that
    leads)."""
    store = writer.store
    cursor = await writer.run_store(store.cursor)

    async def step() -> None:
        if leads is not None and not leads():
            return
        began = trio.current_time()
        before, after = await trio.to_thread.run_sync(store.maintain, cursor)
        log.info("lake maintenance: events in %d data files, now %d (%.1f s)", before,
                 after, trio.current_time() - began)
    try:
        await every(stop, config.ducklake_maintenance_interval_s, step, "lake maintenance")
    finally:
        cursor.close()


async def _run_writer(writer: Writer, done: trio.Event) -> None:
    try:
        await writer.run()
    finally:
        done.set()


def _bound(listeners: list[trio.SocketListener]) -> Bound:
    sockname = listeners[0].socket.getsockname()
    return Bound(sockname[0], sockname[1])


def _write_server_json(config: Config, bound: Bound) -> None:
    try:
        (Path(config.data_dir) / "server.json").write_text(
            json.dumps({"host": bound.host, "port": bound.port, "pid": os.getpid()}))
    except OSError as exc:  # (a full disk: the CLI then opens the file itself)
        log.warning("could not write %s/server.json: %s", config.data_dir, exc)


async def _listen(config: Config, http: HttpServer, private: HttpServer | None,
                  realtime: RealtimeServer, reaper, stop: trio.Event,
                  listeners: list[trio.SocketListener] | None = None, *,
                  task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve `http` on `listeners` (opened here when None), and `private` on
    `metrics_listen`, until `stop`."""
    if listeners is None:
        listeners = await open_listeners(config.port, config.host, reuse_port=config.reuse_port)
    bound = _bound(listeners)
    served = [(listener, http) for listener in listeners]
    if private is not None:
        host, port = split_address(config.metrics_listen, "metrics_listen")
        try:
            metrics = await open_listeners(port, host, "metrics_listen")
        except BaseException:
            for listener in listeners:  # (nothing is left listening)
                listener.socket.close()
            raise
        bound.metrics_port = _bound(metrics).port
        served += [(listener, private) for listener in metrics]
        log.info("serving GET /metrics on http://%s:%d", host, bound.metrics_port)
    _write_server_json(config, bound)
    log.info("listening on http://%s:%d", bound.host, bound.port)
    log.info("dashboard: http://%s:%d/ (log in with the token in %s/admin.token, or "
             "read-only with %s/viewer.token)", bound.host, bound.port, config.data_dir,
             config.data_dir)
    servers = [http] if private is None else [http, private]
    async with trio.open_nursery() as timers:
        for server in servers:
            timers.start_soon(server.sweep)
        timers.start_soon(reaper)
        await _serve_until(served, servers, realtime, stop, config, bound, task_status)
        timers.cancel_scope.cancel()
    (Path(config.data_dir) / "server.json").unlink(missing_ok=True)


async def _serve_until(served: list[tuple[trio.SocketListener, HttpServer]],
                       servers: list[HttpServer], realtime: RealtimeServer,
                       stop: trio.Event, config: Config, bound: Bound, task_status) -> None:
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as acceptors:
            for listener, http in served:
                acceptors.start_soon(_accept, listener, handlers, http)
            task_status.started(bound)
            await stop.wait()
            acceptors.cancel_scope.cancel()
        for listener, _ in served:
            await listener.aclose()
        log.info("draining %d connections (grace %.0fs)",
                 sum(http.connections.count for http in servers), config.shutdown_grace_s)
        for http in servers:
            http.connections.drain()
        realtime.drain()
        handlers.cancel_scope.deadline = trio.current_time() + config.shutdown_grace_s


async def _accept(listener: trio.SocketListener, handlers: trio.Nursery,
                  http: HttpServer) -> None:
    """Accept every connection; `http.serve` applies the connection caps (a refused one
    is answered at once rather than left waiting in the listen backlog)."""
    await _accept_with(listener, handlers, partial(_connection, http))


async def _accept_with(listener: trio.SocketListener, handlers: trio.Nursery,
                       handle) -> None:
    """Accept every connection and start `handle(stream)` for it."""
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _CAPACITY_ERRNOS:
                raise
            log.error("accept failed (%s); retrying in %.1fs", exc, ACCEPT_RETRY_S)
            await trio.sleep(ACCEPT_RETRY_S)
            continue
        handlers.start_soon(handle, stream)


async def _connection(http: HttpServer, stream: trio.SocketStream) -> None:
    try:
        peer = stream.socket.getpeername()[0]
    except OSError:
        await trio.aclose_forcefully(stream)
        return
    await http.serve(stream, peer)


async def _watch_signals(signals, stop: trio.Event, service: trio.CancelScope) -> None:
    async for signum in signals:
        if stop.is_set():
            log.warning("second signal: cancelling in-flight requests")
            service.cancel()
            continue
        log.info("received %s: finishing in-flight requests", signal.Signals(signum).name)
        stop.set()
