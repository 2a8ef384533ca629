"""writer.py in-process: group commit, fsync policies, dedup, backpressure, recovery.

A real journal and DuckDB file in tmp_path; no sockets. Time-dependent paths run under
a mock clock that jumps ahead once the run has been idle for 20 ms of real time: the
journal and DuckDB work in worker threads (real time) finishes first, so waiting for the
load interval costs no wall time and is not raced by the jump.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
from time import time_ns

import duckdb
import pytest
import trio
from trio.testing import MockClock

from triolytics.core.config import Config
from triolytics.core.dedup import Dedup
from triolytics.core.errors import ApiError
from triolytics.core.journal import Journal, JournalError, Position
from triolytics.core.rows import Row
from triolytics.storage.store import Store
from triolytics.storage.writer import Writer, _Load

T0 = 1_714_564_800_000_000


@pytest.fixture
def clock():
    # The clock jumps to the next deadline once every task has waited this long in real
    # time. Loads and syncs run in worker threads, which count as waiting: the threshold
    # must outlast a small DuckDB load on a busy machine (~100 ms seen with the other
    # core loaded), or the clock jumps past a deadline while a load is still running.
    return MockClock(autojump_threshold=0.25)


def row(i: int, mid: str | None = None) -> Row:
    return Row(mid or f"m{i}", "default", "http", "track", "E", None, f"a{i}", None, None,
               None, None, T0 + i, None, None, T0 + i, json.dumps({"i": i}), None, "{}", None)


def make_writer(tmp_path, **overrides) -> Writer:
    config = Config(data_dir=str(tmp_path), **overrides)
    store = Store(tmp_path / "events.duckdb")
    journal = Journal(tmp_path / "journal", config.journal_segment_bytes)
    writer = Writer(config, journal, store, Dedup(10**12, 1000))
    writer.recover()
    return writer


def stored(tmp_path) -> list[str]:
    store = Store(tmp_path / "events.duckdb", read_only=True)
    try:
        return [r[0] for r in store.conn.execute(
            "SELECT message_id FROM events ORDER BY message_id").fetchall()]
    finally:
        store.close()


async def run_writer(writer: Writer, body) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        try:
            await body()
        finally:
            writer.close()


@pytest.mark.parametrize("fsync", ["always", "interval", "off"])
async def test_every_policy_stores_everything_at_close(tmp_path, fsync, clock):
    writer = make_writer(tmp_path, fsync=fsync)

    async def body():
        async with trio.open_nursery() as clients:
            for i in range(20):
                clients.start_soon(writer.store_rows, [row(i)])
    await run_writer(writer, body)
    assert stored(tmp_path) == sorted(f"m{i}" for i in range(20))
    assert writer.stats.pending_rows == 0 and writer.stats.unloaded_rows == 0


async def test_concurrent_submissions_share_one_journal_write(tmp_path):
    writer = make_writer(tmp_path)

    async def body():
        async with trio.open_nursery() as clients:
            for i in range(50):
                clients.start_soon(writer.store_rows, [row(i)])
    await run_writer(writer, body)
    assert writer.stats.journaled_rows == 50
    assert writer.stats.groups < 50  # group commit: many requests per write + sync


async def test_loaded_within_interval_while_running(tmp_path, clock):
    writer = make_writer(tmp_path, load_interval_ms=500)

    async def body():
        await writer.store_rows([row(1)])
        assert writer.stats.loaded_rows == 0
        await trio.sleep(0.6)
        assert writer.stats.loaded_rows == 1
    await run_writer(writer, body)


async def test_a_failed_journal_write_forgets_its_dedup_keys(tmp_path):
    """Rows refused by the journal were never stored: their client ids must not make a
    retry look like a duplicate."""
    writer = make_writer(tmp_path)
    writer.dedup.admit("default\x1fok", 0)
    writer.dedup.admit("default\x1flost", 0)

    async def body():
        await writer.store_rows([row(1, "ok")], ["default\x1fok"])

        def broken(payloads):
            raise JournalError("disk full")
        writer.journal.append = broken
        with pytest.raises(ApiError) as refused:
            await writer.store_rows([row(2, "lost")], ["default\x1flost"])
        assert refused.value.status == 503
    await run_writer(writer, body)
    assert not writer.dedup.admit("default\x1fok", 1)  # stored: still a duplicate
    assert writer.dedup.admit("default\x1flost", 1)  # forgotten: a retry is stored


async def test_backpressure_answers_503_after_waiting(tmp_path, clock):
    writer = make_writer(tmp_path, max_unloaded_rows=2, load_batch_rows=100,
                         load_interval_ms=60_000, backpressure_wait_ms=200, retry_after_s=3)

    async def body():
        await writer.store_rows([row(1), row(2)])
        start = trio.current_time()
        with pytest.raises(ApiError) as info:
            await writer.store_rows([row(3)])
        assert info.value.status == 503 and info.value.code == "overloaded"
        assert (b"retry-after", b"3") in info.value.headers
        assert trio.current_time() - start == pytest.approx(0.2)
    await run_writer(writer, body)
    assert stored(tmp_path) == ["m1", "m2"]  # the refused request stored nothing
    assert writer.stats.rejected_busy == 1


async def test_backpressure_waiter_proceeds_when_room_appears(tmp_path, clock):
    writer = make_writer(tmp_path, max_unloaded_rows=2, load_batch_rows=100,
                         load_interval_ms=100, backpressure_wait_ms=5_000)

    async def body():
        await writer.store_rows([row(1), row(2)])
        await writer.store_rows([row(3)])  # waits for the interval load, then goes
    await run_writer(writer, body)
    assert stored(tmp_path) == ["m1", "m2", "m3"]


async def test_closed_writer_refuses_new_rows(tmp_path):
    writer = make_writer(tmp_path)
    writer.close()
    with pytest.raises(ApiError) as info:
        await writer.store_rows([row(1)])
    assert info.value.status == 503


def test_recover_replays_unloaded_journal_exactly_once(tmp_path):
    # Journal three records but load none (a crash before the loader ran).
    config = Config(data_dir=str(tmp_path))
    journal = Journal(tmp_path / "journal", config.journal_segment_bytes)
    journal.open()
    from triolytics.core.rows import Columns, encode_part, encode_rows
    by_column = Columns(2, [["m4", "m5"], *row(4)[1:6], ["a4", "a5"], *row(4)[7:]])
    journal.append([encode_rows([row(1), row(2)]), encode_rows([row(3)]),
                    encode_part(by_column)])
    journal.sync()
    journal.close()
    Store(tmp_path / "events.duckdb").close()

    first = make_writer(tmp_path)
    assert stored_rows_via(first) == ["m1", "m2", "m3", "m4", "m5"]
    first.store.close()
    first.journal.close()
    second = make_writer(tmp_path)  # a second start replays nothing
    assert stored_rows_via(second) == ["m1", "m2", "m3", "m4", "m5"]
    second.store.close()
    second.journal.close()


def stored_rows_via(writer: Writer) -> list[str]:
    return [r[0] for r in writer.store.conn.execute(
        "SELECT message_id FROM events ORDER BY message_id").fetchall()]


def test_recover_remembers_recent_ids_for_dedup(tmp_path):
    writer = make_writer(tmp_path)
    # a minute ago: inside the window
    recent = row(1, "seen-before")._replace(received_at=time_ns() // 1000 - 60_000_000)
    old = row(2, "long-ago")  # 2024: outside the default one-day window
    writer.store.load([recent, old], writer.journal.position)
    writer.store.close()
    writer.journal.close()
    again = make_writer(tmp_path)
    from triolytics.core.dedup import dedup_key
    now = time_ns() // 1000
    assert not again.dedup.admit(dedup_key("default", "seen-before"), now)
    assert again.dedup.admit(dedup_key("default", "long-ago"), now)
    again.store.close()
    again.journal.close()


async def test_failed_load_keeps_rows_and_reports_unhealthy(tmp_path, clock,
                                                            monkeypatch):
    writer = make_writer(tmp_path, load_interval_ms=10)
    real_load = writer.store.load
    failures = []

    def flaky(rows, position, *parts):
        if len(failures) < 2:
            failures.append(1)
            raise OSError("disk full")
        real_load(rows, position, *parts)
    monkeypatch.setattr(writer.store, "load", flaky)

    async def body():
        await writer.store_rows([row(1)])
        await trio.sleep(0.05)
        assert not writer.healthy
        await trio.sleep(3)  # retried every second
        assert writer.healthy
    await run_writer(writer, body)
    assert stored(tmp_path) == ["m1"]
    assert writer.stats.load_errors == 2


def test_mark_beyond_lost_journal_tail_does_not_hide_new_records(tmp_path):
    # DuckDB says segment 1 was loaded up to byte 5000, but the journal (fsync off, power
    # cut) only kept 100 bytes of it. New records must land past the mark, or replay
    # after the next crash would skip them.
    writer = make_writer(tmp_path)
    writer.store.load([row(1)], Position(1, 5000))
    writer.store.close()
    writer.journal.close()
    again = make_writer(tmp_path)
    assert again.journal.position > Position(1, 5000)
    from triolytics.core.rows import encode_rows
    again.journal.append([encode_rows([row(2)])])
    again.store.close()
    again.journal.close()
    third = make_writer(tmp_path)  # replays the new record
    assert stored_rows_via(third) == ["m1", "m2"]
    third.store.close()
    third.journal.close()


def test_loaded_rows_are_freed_on_the_loading_thread(tmp_path, monkeypatch):
    """Not where the load's last reference goes (the event loop, in `_load_some`):
    freeing a whole load there held the GIL for up to 40 ms (bench/sessions.py)."""
    writer = make_writer(tmp_path)
    monkeypatch.setattr(writer.store, "load", lambda rows, position, *parts: None)
    freed: list[threading.Thread] = []

    class Tracked:
        def __del__(self) -> None:
            freed.append(threading.current_thread())

    load = _Load()
    load.rows.extend(Tracked() for _ in range(5000))
    worker = threading.Thread(target=writer._load, args=(load, writer._loaded))
    worker.start()
    worker.join()
    assert len(freed) == 5000 and set(freed) == {worker}
    assert load.rows == [] and load.columns == []
    writer.journal.close()
    writer.store.close()


# --- ingest_seq: arrival order, through the loader and through replay


def arrival_via(writer: Writer) -> list[tuple[str, int]]:
    return writer.store.conn.execute(
        "SELECT message_id, ingest_seq FROM events ORDER BY ingest_seq").fetchall()


def by_column(*ids: str):
    from triolytics.core.rows import Columns
    return Columns(len(ids), [list(ids), *row(0)[1:]])


def test_a_load_keeps_the_order_parts_were_journaled_in():
    load = _Load()
    parts = [[row(1)], by_column("b1"), by_column("b2"), [row(2), row(3)], by_column(), [row(4)]]
    for part in parts:
        load.add(part)
    assert (load.rows_before, load.count) == ([1, 1, 3], 6)
    assert load.parts() == parts[:4] + [by_column(), [row(4)]]


def test_ingest_seq_is_gap_free_and_in_journal_order_across_a_crash_and_replay(tmp_path):
    from triolytics.core.rows import RtColumns, encode_part
    ws = RtColumns("default", "0.a", "s", T0, "{}", ["w1", "w2"], ["x", "y"], [T0, T0],
                   [None, None], [None, None])
    writer = make_writer(tmp_path)  # journaled and loaded while running
    writer.journal.append([encode_part(p) for p in ([row(1)], by_column("b1", "b2"), ws)])
    writer.journal.sync()
    writer.close()
    writer.journal.close()
    writer.store.close()
    replayed = make_writer(tmp_path)  # the first start replays them
    assert [m for m, _ in arrival_via(replayed)] == ["m1", "b1", "b2", "w1", "w2"]
    # Journaled, not loaded, then kill -9: the next start replays the rest.
    replayed.journal.append([encode_part(p) for p in ([row(3)], by_column("b3"), [row(4)])])
    replayed.journal.sync()
    replayed.journal.close()
    replayed.store.close()
    again = make_writer(tmp_path)
    assert arrival_via(again) == [(m, n) for n, m in enumerate(
        ["m1", "b1", "b2", "w1", "w2", "m3", "b3", "m4"], 1)]
    again.journal.close()
    again.store.close()


async def test_the_running_loader_numbers_submissions_in_journal_order(tmp_path):
    writer = make_writer(tmp_path, load_interval_ms=60_000)  # one load, at close

    async def body():
        for i in range(3):  # each request: a session row, then its batch by column
            await writer.wait_durable(writer.submit([row(i)], None,
                                                    by_column(f"b{i}", f"c{i}")))
    await run_writer(writer, body)
    assert writer.stats.loads == 1
    writer = make_writer(tmp_path)
    assert arrival_via(writer) == [(m, n) for n, m in enumerate(
        ["m0", "b0", "c0", "m1", "b1", "c1", "m2", "b2", "c2"], 1)]


# --- storage faults: a full disk at the journal's write or sync, or at DuckDB's load

class FakeClock:
    """The fault reporter's clock (seconds), moved by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def writer_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "triolytics.writer" and r.levelno >= logging.ERROR]


def no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("call", ["writev", "fdatasync"])
async def test_a_full_disk_at_the_journal_answers_503_logs_once_and_recovers(
        tmp_path, monkeypatch, caplog, call):
    writer = make_writer(tmp_path)
    faults_clock = FakeClock()
    writer.faults.clock = faults_clock
    caplog.set_level(logging.INFO, logger="triolytics.writer")
    verb = "write" if call == "writev" else "sync"

    async def body():
        monkeypatch.setattr(os, call, no_space)
        for i in range(50):  # 50 groups, each refused
            keys = [f"default\x1fk{i}"]
            writer.dedup.admit(keys[0], 0)
            with pytest.raises(ApiError) as refused:
                await writer.store_rows([row(i)], keys)
            assert refused.value.status == 503
            faults_clock.now += 0.1
        assert writer_errors(caplog) == [
            f"journal {verb} failed: [Errno 28] No space left on device"]
        assert writer.fault == f"journal {verb} failed: [Errno 28] No space left on device"
        assert not writer.healthy
        # nothing of the refused groups stays behind
        assert writer.stats.pending_rows == 0 and not writer._unsynced
        assert not writer._unloaded and writer.stats.unloaded_rows == 0
        assert len(writer.dedup) == 0
        faults_clock.now += 10
        with pytest.raises(ApiError):
            await writer.store_rows([row(50)])
        assert writer_errors(caplog)[1:] == [
            f"journal write: 50 more failures in the last 15 s; latest: journal {verb} "
            "failed: [Errno 28] No space left on device"]
        monkeypatch.undo()
        await writer.store_rows([row(99)])  # space again
        assert writer.fault is None and writer.healthy
    await run_writer(writer, body)
    assert "journal writes succeed again after 51 failures over 15 s" in caplog.messages
    assert len(writer_errors(caplog)) == 2
    assert "m99" in stored(tmp_path)


async def test_failing_loads_log_once_report_the_cause_and_clear(tmp_path, clock,
                                                                  monkeypatch, caplog):
    writer = make_writer(tmp_path, load_interval_ms=10)
    writer.faults.clock = trio.current_time
    real_load = writer.store.load
    failures = []

    def full(rows, position, *parts):
        if len(failures) < 15:
            failures.append(1)
            raise duckdb.TransactionException(
                'TransactionContext Error: Failed to commit: Could not write file '
                '"events.duckdb.wal": No space left on device')
        real_load(rows, position, *parts)
    monkeypatch.setattr(writer.store, "load", full)

    async def body():
        await writer.store_rows([row(1)])
        await trio.sleep(0.05)
        assert writer.fault == ("DuckDB load failed: TransactionContext Error: Failed to "
                                'commit: Could not write file "events.duckdb.wal": No '
                                "space left on device")
        assert not writer.healthy
        await trio.sleep(20)  # retried every second: 15 failures, then a load
        assert writer.fault is None and writer.healthy
    await run_writer(writer, body)
    assert stored(tmp_path) == ["m1"]
    errors = writer_errors(caplog)
    assert 2 <= len(errors) <= 3  # the first, then one per 10 s (not 15)
    assert errors[0].startswith("DuckDB load failed: ")
    assert any(m.startswith("DuckDB loads succeed again after 15 failures")
               for m in caplog.messages)
