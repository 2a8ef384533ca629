"""The writer task: owns the journal and the DuckDB store; acks follow durability.

Rules:
- Handlers call `await writer.store(rows, client_ids)`; it returns once the rows are in
  the journal under the fsync policy, or raises `ApiError` (503) and stores nothing.
- Group commit: everything submitted while a write+sync is in flight goes out in the
  next single write and sync. Journal I/O and DuckDB loads run in worker threads; the
  two never share a file.
- Memory is bounded by `max_pending_rows` (accepted, not journaled) and
  `max_unloaded_rows`/`max_unloaded_bytes` (journaled, not in DuckDB). At a bound, a
  caller waits up to `backpressure_wait_ms`, then gets 503 + Retry-After.
- Shutdown: `close()` stops intake; `run` journals what is pending, loads everything,
  closes the store and returns.
"""

from __future__ import annotations

import logging
from collections import deque
from time import time_ns

import trio

from triolytics.config import Config
from triolytics.dedup import Dedup, dedup_key
from triolytics.errors import ApiError, overloaded
from triolytics.journal import HEADER, Journal, JournalError, Position
from triolytics.rows import Row, decode_rows, encode_rows
from triolytics.store import Store

log = logging.getLogger("triolytics.writer")


class _Group:
    """Submissions that share one journal write and sync."""

    __slots__ = ("batches", "rows", "waiters", "done", "error", "keys")

    def __init__(self) -> None:
        self.batches: list[list[Row]] = []
        self.rows = 0
        self.waiters = 0
        self.keys: list[str] = []  # dedup keys admitted for this group
        self.done = trio.Event()
        self.error: Exception | None = None


class WriterStats:
    __slots__ = ("pending_rows", "unloaded_rows", "unloaded_bytes", "journaled_rows", "loaded_rows",
                 "duplicates", "rejected_busy", "groups", "loads", "load_errors")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def snapshot(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class Writer:
    def __init__(self, config: Config, journal: Journal, store: Store, dedup: Dedup) -> None:
        self.config = config
        self.journal = journal
        self.store = store
        self.dedup = dedup
        self.stats = WriterStats()
        self._group = _Group()
        self._wakeup = trio.Event()
        self._room = trio.Event()
        self._load_wakeup = trio.Event()
        self._unloaded: deque[tuple[list[Row], Position, int]] = deque()  # rows, end, bytes
        self._oldest_unloaded = 0.0  # trio time of the oldest row waiting for a load
        self._loaded = Position(0, 0)
        self._closing = False
        self._io_lock = trio.Lock()  # journal writes vs. interval syncs
        self._store_lock = trio.Lock()  # one DuckDB call at a time (loads, admin)
        self.healthy = True  # journal writable and DuckDB loads succeeding

    # --- start-up (before serving): replay whatever DuckDB does not have yet
    def recover(self) -> int:
        """Open the journal and load its unloaded suffix; returns rows replayed."""
        self.journal.open()
        self._loaded = self.store.loaded_position()
        batch: list[Row] = []
        end = self._loaded
        replayed = 0
        for payload, position in self.journal.records(self._loaded):
            batch.extend(decode_rows(payload))
            end = position
            if len(batch) >= self.config.load_batch_rows:
                self.store.load(batch, end)
                replayed += len(batch)
                batch = []
        if end != self._loaded or batch:
            self.store.load(batch, end)
            replayed += len(batch)
        self._loaded = self.journal.position if end == self._loaded else end
        self.journal.release(self._loaded)
        now = time_ns() // 1000
        window = self.config.dedup_window_s * 1_000_000
        self.dedup.remember(self.store.recent_ids(now - window, self.config.dedup_max_ids), now)
        return replayed

    # --- intake (called by connection tasks)
    def has_room(self, rows: int) -> bool:
        s, c = self.stats, self.config
        if s.unloaded_rows >= c.max_unloaded_rows:
            return False
        if s.unloaded_bytes >= c.max_unloaded_bytes:
            return False
        return s.pending_rows == 0 or s.pending_rows + rows <= c.max_pending_rows

    async def store_rows(self, rows: list[Row], client_ids: list[bool]) -> None:
        """Return once `rows` are journaled (durable per policy); else raise ApiError."""
        if self._closing:
            raise ApiError("unavailable", "server is shutting down",
                           headers=((b"retry-after", str(self.config.retry_after_s).encode()),))
        if not self.has_room(len(rows)):
            await self._wait_room(len(rows))
        group = self._group
        now = time_ns() // 1000
        if any(client_ids):
            rows = self._dedup(rows, client_ids, now, group)
        if rows:
            group.batches.append(rows)
            group.rows += len(rows)
            self.stats.pending_rows += len(rows)
        group.waiters += 1
        self._wakeup.set()
        await group.done.wait()
        if group.error is not None:
            raise ApiError("unavailable", f"could not journal the events: {group.error}",
                           headers=((b"retry-after", str(self.config.retry_after_s).encode()),))

    def _dedup(self, rows: list[Row], client_ids: list[bool], now: int,
               group: _Group) -> list[Row]:
        kept = []
        for row, client in zip(rows, client_ids, strict=True):
            if client:
                key = dedup_key(row.project, row.message_id)
                if not self.dedup.admit(key, now):
                    self.stats.duplicates += 1
                    continue
                group.keys.append(key)
            kept.append(row)
        return kept

    async def _wait_room(self, rows: int) -> None:
        with trio.move_on_after(self.config.backpressure_wait_ms / 1000):
            while not self.has_room(rows):
                await self._room.wait()
            return
        self.stats.rejected_busy += 1
        raise overloaded(self.config.retry_after_s)

    def _room_changed(self) -> None:
        self._room.set()
        self._room = trio.Event()

    # --- the task
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._load_loop)
                syncing = trio.CancelScope()
                if self.config.fsync == "interval":
                    nursery.start_soon(self._sync_loop, syncing)
                task_status.started()
                await self._write_loop()
                syncing.cancel()  # _close_files makes the last sync
                self._load_wakeup.set()  # final load; _load_loop returns when drained
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close_files)

    @property
    def closing(self) -> bool:
        return self._closing

    async def run_store(self, fn, *args):
        """Run a `Store` method in a worker thread, never alongside a load."""
        async with self._store_lock:
            return await trio.to_thread.run_sync(fn, *args)

    def close(self) -> None:
        """Stop intake; `run` drains and returns."""
        self._closing = True
        self._wakeup.set()

    async def _write_loop(self) -> None:
        while True:
            while not self._group.waiters:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup = trio.Event()
            group, self._group = self._group, _Group()
            await self._write_group(group)

    async def _write_group(self, group: _Group) -> None:
        try:
            if self.config.fsync == "interval":
                async with self._io_lock:
                    position, size = await trio.to_thread.run_sync(self._append, group.batches)
            else:
                position, size = await trio.to_thread.run_sync(self._append, group.batches)
        except JournalError as exc:
            log.error("%s", exc)
            self.healthy = False
            group.error = exc
            self.dedup.forget(group.keys)
        else:
            if group.rows:
                first = not self._unloaded
                if first:
                    self._oldest_unloaded = trio.current_time()
                self._unloaded.append(([r for b in group.batches for r in b], position, size))
                self.stats.unloaded_rows += group.rows
                self.stats.unloaded_bytes += size
                self.stats.journaled_rows += group.rows
                if first or self.stats.unloaded_rows >= self.config.load_batch_rows:
                    self._load_wakeup.set()  # start the interval clock, or load now
        finally:
            self.stats.pending_rows -= group.rows
            self.stats.groups += 1
            group.done.set()
            self._room_changed()

    def _append(self, batches: list[list[Row]]) -> tuple[Position, int]:
        payloads = [encode_rows(b) for b in batches]
        position = self.journal.append(payloads)
        if self.config.fsync == "always":
            self.journal.sync()
        return position, sum(map(len, payloads)) + HEADER.size * len(payloads)

    async def _sync_loop(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.sleep(self.config.fsync_interval_ms / 1000)
                async with self._io_lock:
                    await trio.to_thread.run_sync(self.journal.sync)

    async def _load_loop(self) -> None:
        interval = self.config.load_interval_ms / 1000
        while True:
            if not self._unloaded:
                if self._closing and not self._group.waiters and not self._group.batches:
                    return
                await self._load_wakeup.wait()
                self._load_wakeup = trio.Event()
                continue
            if (self.stats.unloaded_rows < self.config.load_batch_rows and not self._closing):
                with trio.move_on_at(self._oldest_unloaded + interval):
                    await self._load_wakeup.wait()
                self._load_wakeup = trio.Event()
            if not await self._load_some() and self._closing:
                log.error("giving up loading at shutdown; the journal keeps the rows "
                          "and the next start loads them")
                return

    async def _load_some(self) -> bool:
        """Load the oldest journaled groups; False if DuckDB refused them (kept for retry)."""
        rows: list[Row] = []
        end = self._loaded
        size = 0
        while self._unloaded and len(rows) < self.config.load_batch_rows:
            batch, end, nbytes = self._unloaded.popleft()
            rows.extend(batch)
            size += nbytes
        try:
            await self.run_store(self._load, rows, end)
        except Exception as exc:  # DuckDB failed: keep the rows, retry, report unready
            log.error("DuckDB load of %d rows failed: %s", len(rows), exc)
            self.stats.load_errors += 1
            self.healthy = False
            self._unloaded.appendleft((rows, end, size))
            if not self._closing:
                await trio.sleep(1.0)
            return False
        self.healthy = True
        self._loaded = end
        self.stats.unloaded_rows -= len(rows)
        self.stats.unloaded_bytes -= size
        self.stats.loaded_rows += len(rows)
        self.stats.loads += 1
        self._oldest_unloaded = trio.current_time()
        self._room_changed()
        return True

    def _load(self, rows: list[Row], end: Position) -> None:
        self.store.load(rows, end)
        self.journal.release(end)

    def _close_files(self) -> None:
        if self.config.fsync != "always" and self.journal.fd >= 0:
            try:
                self.journal.sync()
            except JournalError as exc:
                log.error("%s", exc)
        self.journal.close()
        self.store.close()
