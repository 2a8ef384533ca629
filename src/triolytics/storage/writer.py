"""The writer task: owns the journal and the DuckDB store; acks follow durability.

Rules:
- Handlers `await writer.wait_room()`, build their rows (dedup and sessions: `Intake`),
  `submit` them and `await wait_durable(group)`: it returns once the rows are in the
  journal under the fsync policy, or raises `ApiError` (503) and stores nothing.
  No await between `wait_room` and `submit`, so nothing refuses rows once built.
- Group commit: everything submitted since the writer last ran goes out in one `write`
  (on the event loop: a page-cache write of one group is a few µs). With fsync
  `always`, the `Syncer` thread fdatasyncs behind the writer and the group is answered
  when a sync covers it; appends made meanwhile share the next sync. No thread hand-off
  per group.
- Rows reach the loader only once durable, so DuckDB's journal mark never passes the
  synced end of the journal. Loads run in a worker thread, one DuckDB call at a time.
- Memory is bounded by `max_pending_rows` (accepted, not yet durable) and
  `max_unloaded_rows`/`max_unloaded_bytes` (durable, not in DuckDB). At a bound, a
  caller waits up to `backpressure_wait_ms`, then gets 503 + Retry-After.
- The journal keeps a segment until a DuckDB checkpoint covers it, not merely a load:
  a load's commit sits in DuckDB's WAL until the next checkpoint, and a damaged WAL is
  set aside at start (startup.py), so the journal must still hold everything after the
  mark of the last checkpoint. After a load that leaves a whole segment behind the
  mark, the loading thread checkpoints and only then deletes (about one checkpoint per
  `journal_segment_bytes` journaled).
- Shutdown: `close()` stops intake; `run` journals what is pending, loads everything,
  closes the store and returns.
"""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections import deque
from time import monotonic, time_ns

import trio

from triolytics.core.config import Config
from triolytics.core.dedup import Dedup
from triolytics.core.errors import ApiError, overloaded
from triolytics.core.faults import Faults
from triolytics.core.journal import HEADER, Journal, JournalError, Position, Syncer
from triolytics.core.rows import Columns, Part, Row, RtColumns, decode_part, encode_part
from triolytics.core.sessions import start_row
from triolytics.core.shared import rewrite
from triolytics.storage.store import Store

log = logging.getLogger("triolytics.writer")
LOAD_RETRY_S = 1.0  # after a failed DuckDB load
JOURNAL_FAULT = "journal write"  # the fault keys (faults.py): a write or sync, and a load
CHECKPOINT_FAULT = "DuckDB checkpoint"
SHARED_FAULT = "shared state"  # sessions and dedup in PostgreSQL (many writers)
LOAD_FAULT = "DuckDB load"
FREE_SLICE = 2048  # rows freed per step after a load
# Histogram bounds (seconds) of a DuckDB load, and of a group's journal write to its ack
LOAD_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ACK_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5)


def _rollback(shared) -> None:
    try:
        shared.rollback()
    except Exception as exc:  # (the connection is dropped: the transaction with it)
        log.warning("%s", exc)


class Timings:
    """A histogram kept as plain numbers (observed once per load or group, read at
    scrape time): counts per bucket (`bounds`, seconds; the last is +Inf), and the sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


class _Group:
    """Submissions that share one journal write (and sync)."""

    __slots__ = ("batches", "rows", "waiters", "done", "error", "keys", "end", "size",
                 "notify", "written", "renamed")

    def __init__(self) -> None:
        self.batches: list[Part] = []
        self.rows = 0
        self.waiters = 0
        self.keys: list[str] = []  # dedup keys admitted for this group
        self.done = trio.Event()
        self.error: Exception | None = None
        self.end = Position(0, 0)  # journal position just past this group
        self.size = 0  # journal bytes
        self.notify: list = []  # objects whose `wake()` is called once done
        self.written = 0.0  # trio time of its journal write
        self.renamed: dict[str, str] | None = None  # many writers: local -> shared session


class _Load:
    """Journaled parts gathered for one DuckDB load: rows, and batches by column, with
    where each batch came among the rows (the arrival order `ingest_seq` numbers)."""

    __slots__ = ("rows", "columns", "rows_before", "count")

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.columns: list[RtColumns | Columns] = []
        self.rows_before: list[int] = []  # per batch by column: rows journaled before it
        self.count = 0

    def add(self, part: Part) -> None:
        if type(part) is not list:
            self.columns.append(part)
            self.rows_before.append(len(self.rows))
        else:
            self.rows.extend(part)  # one copy per row, here, for the whole load
        self.count += len(part)

    def parts(self) -> list[Part]:
        """The parts again, in journal order (to load them later)."""
        parts: list[Part] = []
        done = 0
        for before, batch in zip(self.rows_before, self.columns, strict=True):
            if before > done:
                parts.append(self.rows[done:before])
                done = before
            parts.append(batch)
        if len(self.rows) > done:
            parts.append(self.rows[done:])
        return parts

    def free(self) -> None:
        """Drop the loaded rows a slice at a time, on the worker thread that loaded them.
        Freeing 100,000 rows at once is one C call that holds the GIL for tens of ms
        (on the event loop, where the load's last reference used to go); between slices
        the GIL can pass to the event loop."""
        rows, parts = self.rows, self.columns
        while rows:
            del rows[-FREE_SLICE:]
        step = max(1, FREE_SLICE * len(parts) // max(1, sum(map(len, parts))))
        while parts:  # batches by column: about FREE_SLICE rows' worth at a time
            del parts[-step:]


class WriterStats:
    __slots__ = ("pending_rows", "unloaded_rows", "unloaded_bytes", "journaled_rows",
                 "loaded_rows", "rejected_busy", "groups", "syncs", "loads",
                 "load_errors", "dnt_skipped")

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
        self.load_seconds = Timings(LOAD_BUCKETS_S)  # per DuckDB load (in its thread)
        self.ack_seconds = Timings(ACK_BUCKETS_S)  # per group: journal write to ack
        self._group = _Group()
        self._wakeup = trio.Event()
        self._room = trio.Event()
        self._load_wakeup = trio.Event()
        self._unsynced: deque[_Group] = deque()  # written, waiting for a sync (in order)
        self._all_synced = trio.Event()
        # Durable groups waiting for DuckDB: (their requests' row lists, end, bytes).
        self._unloaded: deque[tuple[list[list[Row]], Position, int]] = deque()
        self._oldest_unloaded = 0.0  # trio time of the oldest row waiting for a load
        self._loaded = Position(0, 0)
        self._written = Position(0, 0)  # the end of the last group journaled
        self._hurry = 0  # wait_loaded callers: load without waiting for the interval
        self._first_segment = 0  # the oldest journal segment kept
        self.quarantined: list[str] = []  # damaged DuckDB files set aside at start
        self._closing = False
        self._drained = False  # closing, and every group is durable: final loads
        self._store_lock = trio.Lock()  # one DuckDB call at a time (loads, admin)
        self._syncer: Syncer | None = None
        # Storage faults, each logged once then rate-limited; `fault` is the current
        # cause (None: journal writable and DuckDB loads succeeding), for /readyz.
        self.faults = Faults(log, config.fault_log_interval_s, monotonic)
        # Many writers (shared_state.py): each group is decided with the others, and
        # `adopt(key, local id, shared id)` tells the local sessions what was decided.
        self.shared = None
        self.shared_pool: list = []  # connections for open groups (default: `shared`)
        self.adopt = None
        self.new_id = None  # () -> a row id, for the start rows of sessions made shared
        self._synced_to = Position(0, 0)
        self._sync_error: Exception | None = None
        self._sync_changed = trio.Event()
        self._committed = trio.Event()  # the last group's commit (many writers)
        self._committed.set()
        self._shared_give = self._shared_take = None  # idle group connections
        self._nursery = None

    @property
    def fault(self) -> str | None:
        """Why the writer cannot store right now (the latest fault's message), or None."""
        return self.faults.cause

    @property
    def healthy(self) -> bool:
        """Journal writable and DuckDB loads succeeding."""
        return self.faults.cause is None

    # --- start-up (before serving): replay whatever DuckDB does not have yet
    def recover(self) -> int:
        """Open the journal and load its unloaded suffix; returns rows replayed. With
        many writers, records the shared state may not know (after its applied position:
        the writer died between a journal sync and its group's commit) are decided again
        before they load, and this writer's claims on session ends are settled."""
        self.journal.open()
        self._loaded = self.store.loaded_position()
        self.journal.skip_past(self._loaded)
        applied = self.shared.applied_position() if self.shared is not None else None
        batch = _Load()
        end = self._loaded
        replayed = 0
        for payload, position in self.journal.records(self._loaded):
            if applied is not None and end <= applied < position and batch.count:
                replayed += self._replay(batch, end, False)  # (known ones load as they are)
                batch = _Load()
            batch.add(decode_part(payload))
            end = position
            if batch.count >= self.config.load_batch_rows:
                replayed += self._replay(batch, end, applied is not None and end > applied)
                batch = _Load()
        if end != self._loaded or batch.count:
            replayed += self._replay(batch, end, applied is not None and end > applied)
        self._loaded = self._written = self._synced_to = end
        segments = self.journal.segments()
        self._first_segment = segments[0] if segments else 0
        self._release(end)
        now = time_ns() // 1000
        window = self.config.dedup_window_s * 1_000_000
        self.dedup.remember(self.store.recent_ids(now - window, self.config.dedup_max_ids), now)
        if self.shared is not None:
            claims = self.shared.own_claims()
            if claims:
                ended = self.store.ended_sessions(claims)
                self.shared.finish(sorted(ended))
                self.shared.release([c for c in claims if c not in ended])
                log.info("session ends claimed before a restart: %d stored, %d released",
                         len(ended), len(claims) - len(ended))
        return replayed

    def _replay(self, batch: _Load, end: Position, decide: bool) -> int:
        """Load a replayed batch; `decide`: with the shared state first (see recover)."""
        if not decide:
            self.store.load(batch.rows, end, batch.columns, batch.rows_before)
            return batch.count
        parts, decision, touched = self.shared.begin(batch.parts(), time_ns() // 1000,
                                                     recovering=True)
        try:
            parts = rewrite(parts, decision.shared, set())
            if decision.fresh:
                parts = [self._starts(touched, decision.fresh), *parts]
            again = _Load()
            for part in parts:
                again.add(part)
            self.store.load(again.rows, end, again.columns, again.rows_before)
        except BaseException:
            self.shared.rollback()
            raise
        self.shared.commit(end)
        return again.count

    # --- intake (called by connection tasks)
    # --- intake (called by connection tasks)
    def has_room(self, rows: int) -> bool:
        s, c = self.stats, self.config
        if s.unloaded_rows >= c.max_unloaded_rows or s.unloaded_bytes >= c.max_unloaded_bytes:
            return False
        return s.pending_rows == 0 or s.pending_rows + rows <= c.max_pending_rows

    def _refusal(self, message: str) -> ApiError:
        return ApiError("unavailable", message,
                        headers=((b"retry-after", str(self.config.retry_after_s).encode()),))

    def submit(self, rows: list[Row], keys: list[str] | None = None,
               columns: RtColumns | Columns | None = None, notify=None) -> _Group:
        """Queue `rows` for the next journal write; `await wait_durable(group)` for the
        ack. Call right after `wait_room` (or a true `has_room`), with no await between.
        `keys` are the dedup keys admitted for the rows: forgotten again if the journal
        write fails, so a retry is stored. `notify.wake()` is called when the group is
        done (durable or failed), for a task that cannot wait on `group.done` alone."""
        group = self._group
        for part in (rows, columns):  # (rows first: a session's start before its events)
            if part:
                group.batches.append(part)
                group.rows += len(part)
                self.stats.pending_rows += len(part)
        if keys:
            group.keys.extend(keys)
        group.waiters += 1
        if notify is not None and (not group.notify or group.notify[-1] is not notify):
            group.notify.append(notify)
        self._wakeup.set()
        return group

    async def wait_durable(self, group: _Group) -> None:
        """Return once `group` is journaled under the fsync policy; else raise ApiError."""
        await group.done.wait()
        if group.error is not None:
            raise self._refusal(f"could not journal the events: {group.error}")

    async def store_rows(self, rows: list[Row], keys: list[str] | None = None) -> None:
        """`wait_room`, `submit`, `wait_durable`: return once `rows` are durable."""
        await self.wait_room(len(rows))
        await self.wait_durable(self.submit(rows, keys))

    async def wait_room(self, rows: int = 1, *, give_up: bool = True) -> None:
        """Return when the writer takes `rows` more; raise ApiError (503) if it is closing,
        or (`give_up`) still full after `backpressure_wait_ms`. The pending bound is
        checked before the caller builds its rows, so one request may pass it by its own
        size: the bound is `max_pending_rows` + one request."""
        if self._closing:
            raise self._refusal("server is shutting down")
        if self.has_room(rows):
            return
        if give_up:
            await self._wait_room(rows)
        else:
            while not self.has_room(rows):
                await self._room.wait()
        if self._closing:
            raise self._refusal("server is shutting down")

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
        token = trio.lowlevel.current_trio_token()
        self._syncer = Syncer(self.journal, lambda pos, err: token.run_sync_soon(
            self._synced, pos, err))
        self._syncer.start()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.shared is not None:
                    pool = self.shared_pool or [self.shared]
                    self._shared_give, self._shared_take = trio.open_memory_channel(len(pool))
                    for shared in pool:
                        self._shared_give.send_nowait(shared)
                nursery.start_soon(self._load_loop)
                syncing = trio.CancelScope()
                if self.config.fsync == "interval":
                    nursery.start_soon(self._sync_loop, syncing)
                task_status.started()
                await self._write_loop()
                await self._committed.wait()  # (many writers: the last groups answered)
                syncing.cancel()
                if self._unsynced:
                    self._syncer.request(self.journal.position)
                    await self._all_synced.wait()
                self._drained = True
                self._load_wakeup.set()  # final loads; _load_loop returns when empty
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._syncer.stop)
                await trio.to_thread.run_sync(self._close_files)

    def statistics(self) -> dict:
        """A snapshot of the counters, with the repeats that deduplication answered, the
        journal's damaged and torn ranges and the damaged DuckDB files set aside."""
        return {**self.stats.snapshot(), "duplicates": self.dedup.repeats,
                **self.journal.damage_summary(),
                "journal_damage": [{**d._asdict(), "saved": d.saved and str(d.saved)}
                                   for d in self.journal.damage],
                "quarantined": self.quarantined}

    def warnings(self) -> list[str]:
        """What damage was set aside at start (for /readyz: the server is ready, but its
        owner should look)."""
        found = []
        damaged = [d for d in self.journal.damage if d.kind == "damaged"]
        if damaged:
            found.append(f"journal damage: {len(damaged)} ranges, "
                         f"{sum(d.end - d.start for d in damaged)} bytes quarantined in "
                         f"{self.journal.quarantine_dir}")
        if self.quarantined:
            found.append(f"damaged DuckDB files moved: {', '.join(self.quarantined)}")
        return found

    async def wait_loaded(self) -> None:
        """Return once DuckDB holds everything journaled when called (loaded now, not
        after `load_interval_ms`): what an export or a forget must cover. ApiError (503)
        if the writer closes first or storage is failing."""
        target = self._written
        self._hurry += 1
        try:
            while self._loaded < target:
                if self._closing:
                    raise self._refusal("server is shutting down")
                if self.fault is not None:
                    raise self._refusal(f"cannot load the journaled events: {self.fault}")
                self._load_wakeup.set()
                with trio.move_on_after(LOAD_RETRY_S):  # (a failed load sets nothing)
                    await self._room.wait()  # (set after each journal write and each load)
        finally:
            self._hurry -= 1

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
        self._room_changed()  # waiters for room learn that we are closing

    async def _write_loop(self) -> None:
        while True:
            while not self._group.waiters:
                if self._closing:
                    return
                await self._wakeup.wait()
                self._wakeup = trio.Event()
            group, self._group = self._group, _Group()
            if self.shared is None:
                self._write(group)
            else:
                await self._write_shared(group)
            # Let the connections run and gather the next group.
            await trio.lowlevel.checkpoint()

    def _append(self, group: _Group) -> JournalError | None:
        """Write the group to the journal (one write); the error if that failed."""
        self.stats.groups += 1
        group.written = trio.current_time()
        try:
            payloads = [encode_part(b) for b in group.batches]
            group.end = self._written = self.journal.append(payloads)
            group.size = sum(map(len, payloads)) + HEADER.size * len(payloads)
        except JournalError as exc:
            return exc
        return None

    def _write(self, group: _Group) -> None:
        error = self._append(group)
        if error is not None:
            self._finish(group, error)
            return
        if self.config.fsync == "always" and group.rows:
            self._unsynced.append(group)
            self._all_synced = trio.Event()
            self._syncer.request(group.end)
        elif self._unsynced:  # nothing to make durable, but answer after earlier groups
            self._unsynced.append(group)
        else:
            self._finish(group, None)

    async def _write_shared(self, group: _Group) -> None:
        """A group with many writers (shared_state.py, Rules): decided with the others in
        a transaction, rewritten as decided and journaled here; synced, committed and
        answered by `_complete_shared` beside the next groups. Up to `len(shared_pool)`
        groups are open at once, each on a connection of its own; they commit and are
        answered in journal order."""
        shared = None
        if group.rows:
            shared = await self._shared_take.receive()
            try:
                batches, decision, touched = await trio.to_thread.run_sync(
                    shared.begin, group.batches, time_ns() // 1000)
            except Exception as exc:
                self._shared_give.send_nowait(shared)
                self._finish(group, exc, SHARED_FAULT)
                return
            group.batches = batches
            self._apply(group, decision, touched)
        error = self._append(group)
        if error is not None:
            if shared is not None:
                await trio.to_thread.run_sync(_rollback, shared)
                self._shared_give.send_nowait(shared)
            self._finish(group, error)
            return
        previous, self._committed = self._committed, trio.Event()
        self._nursery.start_soon(self._complete_shared, group, shared, previous,
                                 self._committed)

    async def _complete_shared(self, group: _Group, shared, previous: trio.Event,
                               done: trio.Event) -> None:
        """Sync, then (after the previous group) commit, then answer. A group whose
        events were all repeats still commits: its transaction holds their ids' locks."""
        try:
            error = None
            if group.rows and self.config.fsync == "always":
                self._syncer.request(group.end)
                while self._synced_to < group.end and self._sync_error is None:
                    await self._sync_changed.wait()
                error = self._sync_error
            await previous.wait()
            if shared is not None:
                if error is not None:
                    await trio.to_thread.run_sync(_rollback, shared)
                else:
                    try:
                        await trio.to_thread.run_sync(shared.commit, group.end)
                    except Exception as exc:
                        self._finish(group, exc, SHARED_FAULT)
                        return
            self._finish(group, error)
        finally:
            if shared is not None:
                self._shared_give.send_nowait(shared)
            done.set()

    def _apply(self, group: _Group, decision, touched) -> None:
        """Rewrite the group as the shared state decided (core/shared.py); new shared
        sessions get their start row first; the local sessions adopt the shared ids."""
        batches = rewrite(group.batches, decision.shared, set())
        if decision.fresh:
            batches = [self._starts(touched, decision.fresh), *batches]
        group.renamed = decision.shared
        rows = sum(map(len, batches))
        self.stats.pending_rows += rows - group.rows
        group.rows = rows
        group.batches = batches
        if self.adopt is not None:
            for local, to in decision.shared.items():
                if local != to:
                    t = touched[local]
                    self.adopt((t.project, t.channel, t.key), local, to)

    def _starts(self, touched, fresh: dict[str, str]) -> list[Row]:
        """session_start rows of sessions the shared state made new (their local id
        was known and no longer live): stamped as their first event in the group."""
        return [start_row(self.new_id(), t.project, t.channel, t.anonymous_id, t.user_id, to,
                          t.first_ts, t.first_received)
                for to, t in ((to, touched[local]) for to, local in fresh.items())]

    def _synced(self, position: Position, error: Exception | None) -> None:
        """Called on the event loop by the Syncer: groups up to `position` are durable."""
        if self.shared is not None:
            if error is not None:
                self._sync_error = error
            elif position > self._synced_to:
                self._synced_to = position
                self._sync_error = None
            self._sync_changed.set()
            self._sync_changed = trio.Event()
        self.stats.syncs += 1
        unsynced = self._unsynced
        while unsynced and unsynced[0].end <= position:
            self._finish(unsynced.popleft(), error)
        if not unsynced:
            self._all_synced.set()

    def _finish(self, group: _Group, error: Exception | None,
                 fault: str = JOURNAL_FAULT) -> None:
        self.stats.pending_rows -= group.rows
        if error is not None:
            self.faults.failed(fault, str(error))
            group.error = error
            self.dedup.forget(group.keys)
            group.keys = []
            group.batches = []  # (the waiters hold the group: drop its rows now)
        elif group.rows:
            self.faults.cleared(JOURNAL_FAULT)
            if self.shared is not None:
                self.faults.cleared(SHARED_FAULT)
            first = not self._unloaded
            if first:
                self._oldest_unloaded = trio.current_time()
            self._unloaded.append((group.batches, group.end, group.size))
            self.stats.unloaded_rows += group.rows
            self.stats.unloaded_bytes += group.size
            self.stats.journaled_rows += group.rows
            if first or self.stats.unloaded_rows >= self.config.load_batch_rows:
                self._load_wakeup.set()  # start the interval clock, or load now
            self.ack_seconds.observe(trio.current_time() - group.written)
        group.done.set()
        for waiter in group.notify:
            waiter.wake()
        self._room_changed()

    async def _sync_loop(self, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.sleep(self.config.fsync_interval_ms / 1000)
                self._syncer.request(self.journal.position)

    async def _load_loop(self) -> None:
        """Load when `load_batch_rows` are waiting, or the oldest has waited an interval."""
        interval = self.config.load_interval_ms / 1000
        batch = self.config.load_batch_rows
        while True:
            if not self._unloaded:
                if self._drained:
                    return
                self._load_wakeup = trio.Event()
                await self._load_wakeup.wait()  # the first rows arrived, or we are closing
                continue
            deadline = self._oldest_unloaded + interval
            while (self.stats.unloaded_rows < batch and not self._drained
                   and not self._hurry and trio.current_time() < deadline):
                self._load_wakeup = trio.Event()
                with trio.move_on_at(deadline):
                    await self._load_wakeup.wait()
            if not await self._load_some() and self._drained:
                log.error("giving up loading at shutdown; the journal keeps the rows "
                          "and the next start loads them")
                return

    async def _load_some(self) -> bool:
        """Load the oldest journaled groups; False if DuckDB refused them (kept for retry)."""
        load = _Load()
        end = self._loaded
        size = 0
        while self._unloaded and load.count < self.config.load_batch_rows:
            batches, end, nbytes = self._unloaded.popleft()
            for batch in batches:
                load.add(batch)
            size += nbytes
        try:
            took = await self.run_store(self._load, load, end)
        except Exception as exc:  # DuckDB failed: keep the rows, retry, report unready
            self.faults.failed(LOAD_FAULT, f"DuckDB load failed: {exc}")
            self.stats.load_errors += 1
            self._unloaded.appendleft((load.parts(), end, size))
            if not self._drained:
                await trio.sleep(LOAD_RETRY_S)
            return False
        self.faults.cleared(LOAD_FAULT)
        self._loaded = end
        self.stats.unloaded_rows -= load.count
        self.stats.unloaded_bytes -= size
        self.stats.loaded_rows += load.count
        self.stats.loads += 1
        self.load_seconds.observe(took)
        self._oldest_unloaded = trio.current_time()
        self._room_changed()
        return True

    def _load(self, load: _Load, end: Position) -> float:
        """Load, release covered segments; returns the seconds the load took."""
        started = monotonic()
        self.store.load(load.rows, end, load.columns, load.rows_before)
        took = monotonic() - started
        self._release(end)
        load.free()
        return took

    def load_lag(self) -> float:
        """Seconds since the oldest row not yet in DuckDB became durable (0 when all
        are loaded). After a load that left rows behind, counted from that load."""
        if not self.stats.unloaded_rows:
            return 0.0
        return max(0.0, trio.current_time() - self._oldest_unloaded)

    def _release(self, end: Position) -> None:
        """Delete the journal segments wholly before `end`, the mark just loaded, once a
        checkpoint has put it in the DuckDB file itself (one DuckDB call at a time)."""
        if end.segment <= self._first_segment:
            return  # nothing to delete: no checkpoint needed yet
        try:
            checkpointed = self.store.checkpoint()
        except Exception as exc:  # (the next load tries again; the journal keeps all)
            self.faults.failed(CHECKPOINT_FAULT, f"DuckDB checkpoint failed ({exc}); "
                                                 "journal segments are kept")
            return
        self.faults.cleared(CHECKPOINT_FAULT)
        if checkpointed:
            self.journal.release(end)
            self._first_segment = end.segment

    def _close_files(self) -> None:
        try:
            self.journal.sync()
        except JournalError as exc:
            self.faults.failed(JOURNAL_FAULT, str(exc))
        self.journal.close()
        self.store.close()
