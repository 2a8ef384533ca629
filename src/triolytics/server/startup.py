"""Start-up faults: what stops the server before it serves, each said in one sentence.

Rules:
- A fault the user can fix (the server extra missing, the data directory not writable
  or held by another process, the port taken) becomes a `StartupError` whose message
  names the place and the fix. `triolytics serve` prints it as one line and exits 1.
- Only those: anything else is a bug and keeps its traceback. `startup_error` unwraps
  trio's exception groups only when a StartupError is all they hold.
- A damaged DuckDB file never keeps the server down (`open_store`): a WAL that DuckDB
  cannot replay is moved to `<data_dir>/quarantine/` and the file opens at its last
  checkpoint; a file DuckDB cannot open at all is moved there too (its WAL and keys
  mirror with it) and a new one is made, taking the old one's write keys. Either way
  the journal then replays what the file no longer has (the writer keeps every segment
  until a checkpoint covers it). Locks and other faults are never taken for damage.
- A full disk at start-up is not one of them: `serve` listens anyway, answers 503 and
  retries (`no_space` tells it apart). `<data_dir>/server.lock` (flock, `lock_data_dir`)
  keeps a second server out even while the first one's DuckDB file is not open.
- This module imports nothing of the server extra (duckdb, pyarrow), so that it can say
  the extra is missing; `open_store` imports the store when it is called.
- Listening sockets are trio's (`open_listeners`) unless `reuse_port`: then each also
  sets SO_REUSEPORT before bind, so that several processes (`serve --workers N`,
  workers.py) listen on one port and the kernel spreads the connections among them.
  `reserve_port` holds such a port, bound but not listening, between their lives.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import socket
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from triolytics.core.config import Config

if TYPE_CHECKING:
    from triolytics.storage.store import Store

log = logging.getLogger("triolytics")
SERVER_EXTRA = ("duckdb", "pyarrow")  # what `serve` needs beyond the base install
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (.*?) \(PID (\d+)\)")
# What DuckDB 1.5 says of a WAL it cannot replay, and of a file it cannot read.
_BAD_WAL = ("Failure while replaying WAL", "Corrupt WAL file")
_BAD_FILE = ("Corrupt database file", "is not a valid DuckDB database file")


class StartupError(Exception):
    """The server cannot start; the message says why and what to change."""


def load_serve():
    """`serve`, or a StartupError when this install lacks the `server` extra."""
    try:
        from triolytics.server.app import serve
    except ModuleNotFoundError as exc:
        if exc.name not in SERVER_EXTRA:
            raise
        raise _extra_missing(exc) from exc
    return serve


def _extra_missing(exc: ModuleNotFoundError) -> StartupError:
    return StartupError(f"`serve` needs the server extra ({exc.name} is not installed): "
                        "pip install 'triolytics[server]'")


def check_workers(config: Config) -> None:
    """More than one worker (`serve --workers N`) needs a lake every worker can write at
    once: a StartupError unless store = "ducklake" with a PostgreSQL catalog. (A local
    catalog is a DuckDB file: one process at a time.)"""
    if config.store == "ducklake":
        try:
            from triolytics.storage.lake import is_postgres
        except ModuleNotFoundError as exc:
            if exc.name not in SERVER_EXTRA:
                raise
            raise _extra_missing(exc) from exc
        if is_postgres(config.ducklake_catalog):
            return
    raise StartupError(f"--workers {config.workers} needs store = \"ducklake\" with a "
                       "PostgreSQL catalog (docs/scaling.md)")


def open_data_dir(path: Path) -> None:
    """Create the data directory if need be and check that a file can be made in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StartupError(f"data directory {path} is not writable ({exc.strerror}); "
                           "choose another with --data") from exc


def open_store(path: Path, threads: int) -> tuple[Store, list[Path]]:
    """The DuckDB file and what had to be quarantined to open it; a StartupError when
    another process holds it or it cannot be opened (DuckDB names the lock holder)."""
    import duckdb

    from triolytics.storage.store import SchemaError, Store
    quarantined: list[Path] = []
    keys: Path | None = None  # a quarantined file's keys mirror
    while True:
        try:
            store = Store(path, threads=threads)
        except SchemaError as exc:  # a file of a newer triolytics: left as it is
            raise StartupError(str(exc)) from exc
        except duckdb.Error as exc:
            message = " ".join(str(exc).split())
            _check_lock(path, message, exc)
            wal = Path(f"{path}.wal")
            if any(s in message for s in _BAD_WAL) and wal.exists():
                quarantined.append(_quarantine(wal))
                log.error("DuckDB could not replay its WAL (%s); moved it to %s and opened "
                          "%s at its last checkpoint; the journal replays the rest",
                          message, quarantined[-1], path.name)
                continue
            if any(s in message for s in _BAD_FILE) and path.exists() and keys is None:
                moved = _quarantine(path)
                quarantined.append(moved)
                if wal.exists():
                    quarantined.append(_quarantine(wal))
                keys = Path(f"{path}.keys.json")
                if keys.exists():
                    keys = _quarantine(keys)
                    quarantined.append(keys)
                log.error("DuckDB cannot open %s (%s); moved it to %s and started a new "
                          "file: events stored before its last checkpoint are in the moved "
                          "file, the journal replays what it still holds", path, message,
                          moved)
                continue
            raise StartupError(f"cannot open {path}: {message}") from exc
        if keys is not None and keys.exists():
            log.warning("restored %d write keys from %s", store.restore_keys(keys), keys)
        return store, quarantined


def open_lake(config: Config) -> Store:
    """The DuckLake of `store = "ducklake"` (lake.py); a StartupError naming the catalog
    and the fix when it cannot be used."""
    import duckdb

    from triolytics.storage.lake import LakeError, LakeStore, _display, is_postgres
    catalog, data = config.lake_catalog(), config.lake_data_path()
    try:
        return LakeStore(catalog, data, config.writer_name(), threads=config.duckdb_threads,
                         retries=config.ducklake_max_retry_count,
                         snapshot_keep_s=config.ducklake_snapshot_keep_s)
    except LakeError as exc:
        raise StartupError(str(exc)) from exc
    except duckdb.Error as exc:
        message = " ".join(str(exc).split())
        hint = ""
        if "lock" in message.lower() and not is_postgres(catalog):
            hint = ("; a local catalog serves one process: use a PostgreSQL catalog "
                    "(ducklake_catalog = \"postgresql://...\") for workers or nodes")
        raise StartupError(f"cannot open {_display(catalog, data)}: {message}{hint}") from exc


def _check_lock(path: Path, message: str, exc: Exception) -> None:
    holder = _LOCK_HOLDER.search(message)
    if holder is not None:
        raise StartupError(
            f"data directory {path.parent} is locked by another process (PID "
            f"{holder[2]}, {holder[1]}), probably another triolytics server; stop it "
            "or choose another directory with --data") from exc
    if "Could not set lock" in message:
        raise StartupError(f"data directory {path.parent} is locked by another process, "
                           "probably another triolytics server; stop it or choose "
                           "another directory with --data") from exc


def _quarantine(path: Path) -> Path:
    """Move a damaged file to `<its dir>/quarantine/<name>.<UTC time>` (never deleted)."""
    folder = path.parent / "quarantine"
    folder.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S-%fZ")
    target = folder / f"{path.name}.{stamp}"
    path.rename(target)
    return target


LOCK_FILE = "server.lock"  # in the data directory: flocked by the serving process


def lock_data_dir(path: Path) -> int:
    """Hold `<data_dir>/server.lock` (flock) for the process's life; the fd is returned.
    A StartupError when another process holds it. DuckDB's own lock is not enough: a
    server whose store failed to open on a full disk holds no DuckDB lock while it waits
    for space, and a second server must still be refused."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StartupError(f"data directory {path} is not writable ({exc.strerror}); "
                           "choose another with --data") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        held = f" (PID {pid})" if pid.isdigit() else ""
        raise StartupError(f"data directory {path} is locked by another process{held}, "
                           "probably another triolytics server; stop it or choose another "
                           "directory with --data") from None
    try:  # who holds it, for the message above (best effort: the disk may be full)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    return fd


def no_space(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) says the disk is full: ENOSPC
    or EDQUOT from the journal or a file, or DuckDB's IO error "No space left on device"."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return True
        todo += [e.__cause__, e.__context__]
    return False


async def open_listeners(port: int, host: str, setting: str = "", *,
                         reuse_port: bool = False) -> list[trio.SocketListener]:
    """The listening sockets, or a StartupError naming host:port and the flag (or the
    `setting`, such as metrics_listen) to change. With `reuse_port` other processes of
    this user may listen on the same port (SO_REUSEPORT)."""
    try:
        if reuse_port:
            return await _reuse_port_listeners(port, host)
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise listen_error(host, port, setting, exc) from exc


def listen_error(host: str, port: int, setting: str, exc: OSError) -> StartupError:
    """The one line for a port that cannot be bound, naming the flag or `setting`."""
    place = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = exc.strerror or str(exc)
    flag = setting or "--port"
    if exc.errno == errno.EADDRINUSE:
        fix = f"choose another port with {flag}"
    elif exc.errno == errno.EACCES:
        fix = f"ports below 1024 need privileges; choose another with {flag}"
    else:
        fix = f"check {setting or '--host and --port'}"
    return StartupError(f"cannot listen on {place}: {reason}; {fix}")


LISTEN_BACKLOG = 0xFFFF  # as trio's: the kernel cuts it to net.core.somaxconn


def _share_port(sock) -> None:
    """SO_REUSEADDR (as trio sets it) and SO_REUSEPORT, before bind; IPv6 only on an
    IPv6 socket, as trio does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


async def _reuse_port_listeners(port: int, host: str) -> list[trio.SocketListener]:
    """`trio.open_tcp_listeners` with SO_REUSEPORT: one listener per address of `host`."""
    listeners: list[trio.SocketListener] = []
    try:
        for family, type_, proto, _, address in await trio.socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            sock = trio.socket.socket(family, type_, proto)
            try:
                _share_port(sock)
                await sock.bind(address)
                sock.listen(LISTEN_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT and not listening, so that it gets no
    connections but keeps the port ours while listeners with SO_REUSEPORT come and go;
    port 0 picks a free one. A StartupError (naming --port) when it cannot be bound."""
    try:
        family, type_, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, type_, proto)
    except OSError as exc:
        raise listen_error(host, port, "", exc) from exc
    try:
        _share_port(sock)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise listen_error(host, port, "", exc) from exc
    return sock


def startup_error(exc: BaseException) -> StartupError | None:
    """The StartupError `exc` is, or the first one in an exception group made only of
    StartupErrors (trio nests a group per nursery); None when anything else is there."""
    if isinstance(exc, StartupError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        faults, others = exc.split(StartupError)
        if faults is not None and others is None:
            while isinstance(faults, BaseExceptionGroup):
                faults = faults.exceptions[0]
            return faults
    return None
