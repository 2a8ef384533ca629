"""Compaction (store.py `compact`, compact.py): the file shrinks after retention, every
table comes through whole (rows, keys, the journal mark, archived days), loads go on
numbering after it and a replayed journal doubles nothing; a crash or a kill at any
point leaves a file that opens with everything."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from test_export import row

import triolytics.storage.store as store_module
from triolytics.core.config import Config
from triolytics.core.dedup import Dedup
from triolytics.core.journal import Journal, Position
from triolytics.storage.compact import compact_if_needed, should_compact
from triolytics.storage.store import Store
from triolytics.storage.writer import Writer

DAYS, PER_DAY = 12, 30_000
TABLES = ("events", "write_keys", "journal_mark", "meta", "analytics_ids", "archived_days")


def fill(path: Path) -> Store:
    """Twelve days of rows in arrival order, keys (one revoked), an analytics id, an
    archived day; then all days but the last deleted as retention does."""
    s = Store(path)
    for day in range(DAYS):
        s.load([row(i, day) for i in range(PER_DAY)], Position(1, day + 1))
    s.create_key("default", "wk_a")
    s.revoke_key(s.create_key("p2", "wk_b"))
    s.record_analytics_ids([("aid-1", 1_714_564_800_000_000, "10.0.0.1")])
    s.record_archived("2024-05-01", {"2024-05-01": PER_DAY}, PER_DAY)
    s.delete_days([(f"2024-05-{d + 1:02d}", None) for d in range(DAYS - 1)])
    return s


def contents(s: Store) -> dict[str, list[tuple]]:
    """Each table's rows (events: their count and the sum of every row's hash)."""
    got = {t: s.conn.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall() for t in TABLES
           if t != "events"}
    got["events"] = s.conn.execute("SELECT count(*), sum(hash(e)) FROM events e").fetchall()
    return got


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "events.duckdb"
    fill(path).close()
    return path


@pytest.fixture
def filled(tmp_path, template):
    shutil.copy(template, tmp_path / "events.duckdb")
    s = Store(tmp_path / "events.duckdb")
    yield s
    s.close()


def test_should_compact():
    assert should_compact(0.6, 100, 0.5, 100)
    assert not should_compact(0.4, 100, 0.5, 100)
    assert not should_compact(0.6, 99, 0.5, 100)
    assert not should_compact(1.0, 10**12, 0, 0)  # 0: off


def test_compaction_shrinks_the_file_and_keeps_every_table(filled, tmp_path):
    path = tmp_path / "events.duckdb"
    free, total, size = filled.free_space()
    assert free / total > 0.3 and size == path.stat().st_size  # (blocks hold parts of
    # several row groups: some stay in use)
    before = contents(filled)
    last_seq, mark = filled.last_seq, filled.loaded_position()
    assert filled.compact() == (size, path.stat().st_size)
    after_bytes = path.stat().st_size
    assert after_bytes < size / 2, (size, after_bytes)
    assert contents(filled) == before
    assert (filled.last_seq, filled.loaded_position()) == (last_seq, mark) == \
        (DAYS * PER_DAY, Position(1, DAYS))
    assert filled.free_space()[0] <= 1
    assert not (tmp_path / "events.duckdb.compact-tmp").exists()
    # loads go on after it: numbered after every old row, the constraints still there
    filled.load([row(i, 9) for i in range(10)], Position(2, 0))
    assert filled.conn.execute("SELECT min(ingest_seq), max(ingest_seq) FROM events "
                               "WHERE message_id LIKE 'm9-%'").fetchone() == \
        (DAYS * PER_DAY + 1, DAYS * PER_DAY + 10)
    assert filled.loaded_position() == Position(2, 0)
    with pytest.raises(KeyError):
        filled.create_key("other", "wk_a")
    assert filled.active_keys() == {"wk_a": "default"}
    filled.close()
    reopened = Store(path)  # and after a restart
    try:
        assert reopened.last_seq == DAYS * PER_DAY + 10
        assert reopened.count() == PER_DAY + 10
    finally:
        reopened.close()


def make_writer(tmp_path, **overrides) -> Writer:
    config = Config(data_dir=str(tmp_path), **overrides)
    journal = Journal(tmp_path / "journal", config.journal_segment_bytes)
    writer = Writer(config, journal, Store(tmp_path / "events.duckdb"), Dedup(10**12, 1000))
    writer.recover()
    return writer


async def test_a_replayed_journal_after_compaction_doubles_nothing(tmp_path):
    writer = make_writer(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        await writer.store_rows([row(i, 0) for i in range(100)])
        await writer.wait_loaded()
        await writer.run_store(writer.store.compact)
        await writer.store_rows([row(i, 1) for i in range(100)])
        await writer.wait_loaded()
        writer.close()
    writer = make_writer(tmp_path)  # replays the journal from the mark: nothing
    try:
        assert writer.store.conn.execute(
            "SELECT count(*), count(DISTINCT message_id), min(ingest_seq), max(ingest_seq) "
            "FROM events").fetchone() == (200, 200, 1, 200)
        assert writer.store.conn.execute(
            "SELECT max(ingest_seq) FROM events WHERE message_id LIKE 'm0-%'").fetchone() == \
            (100,)
    finally:
        writer.journal.close()
        writer.store.close()


async def test_compact_if_needed_follows_the_settings(tmp_path, template, caplog):
    caplog.set_level(logging.INFO, "triolytics.compact")
    shutil.copy(template, tmp_path / "events.duckdb")
    writer = make_writer(tmp_path, compact_free_ratio=0, compact_min_bytes=0)
    try:
        assert await compact_if_needed(writer.config, writer) is None  # off
        writer.config = Config(data_dir=str(tmp_path), compact_free_ratio=0.3,
                               compact_min_bytes=10**12)
        assert await compact_if_needed(writer.config, writer) is None  # too small
        writer.config = Config(data_dir=str(tmp_path), compact_free_ratio=0.9,
                               compact_min_bytes=0)
        assert await compact_if_needed(writer.config, writer) is None  # not enough free
        size = (tmp_path / "events.duckdb").stat().st_size
        writer.config = Config(data_dir=str(tmp_path), compact_free_ratio=0.3,
                               compact_min_bytes=0)
        before, after = await compact_if_needed(writer.config, writer)
        assert before == size and after == (tmp_path / "events.duckdb").stat().st_size < size
        assert "compacted" in caplog.text
        assert await compact_if_needed(writer.config, writer) is None  # nothing free now
    finally:
        writer.journal.close()
        writer.store.close()


class Crash(BaseException):
    pass


def test_a_crash_before_the_rename_keeps_the_old_file(filled, tmp_path, monkeypatch):
    path = tmp_path / "events.duckdb"
    before, size = contents(filled), path.stat().st_size

    def crash(*args):
        raise Crash
    monkeypatch.setattr(store_module.os, "replace", crash)
    with pytest.raises(Crash):
        filled.compact()
    monkeypatch.undo()
    assert (tmp_path / "events.duckdb.compact-tmp").exists()  # what a kill leaves
    assert path.stat().st_size == size
    reopened = Store(path)
    try:
        assert not (tmp_path / "events.duckdb.compact-tmp").exists()
        assert contents(reopened) == before
    finally:
        reopened.close()
    # the old object reopens by itself at its next call
    filled.load([row(1, 9)], Position(2, 0))
    assert filled.count() == PER_DAY + 1


def test_a_half_written_copy_left_behind_is_removed(filled, tmp_path):
    path = tmp_path / "events.duckdb"
    before = contents(filled)
    filled.close()
    Path(f"{path}.compact-tmp").write_bytes(path.read_bytes()[:100_000])
    Path(f"{path}.compact-tmp.wal").write_bytes(b"junk")
    reopened = Store(path)
    try:
        assert contents(reopened) == before
        assert not Path(f"{path}.compact-tmp").exists()
        assert not Path(f"{path}.compact-tmp.wal").exists()
    finally:
        reopened.close()


COMPACT = """
import sys
from triolytics.storage.store import Store
s = Store(sys.argv[1])
print("ready", flush=True)
s.compact()
print("done", flush=True)
"""


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.1, 0.15, 0.2, 0.3])
def test_a_kill_during_compaction_leaves_a_whole_file(filled, tmp_path, delay_s):
    path = tmp_path / "events.duckdb"
    before = contents(filled)
    filled.close()
    env = {**os.environ, "PYTHONPATH": str(Path(store_module.__file__).parents[2])}
    child = subprocess.Popen([sys.executable, "-c", COMPACT, str(path)], env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "ready\n"
        time.sleep(delay_s)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    shutil.copy(path, tmp_path / "as-killed.duckdb")  # (for a failure's post-mortem)
    reopened = Store(path)
    try:
        assert contents(reopened) == before
        assert reopened.last_seq == DAYS * PER_DAY
        assert not Path(f"{path}.compact-tmp").exists()
    finally:
        reopened.close()


async def test_the_server_retains_then_compacts_and_the_file_shrinks(tmp_path, caplog):
    """End to end: the archive task's retention step deletes old days, then compacts."""
    from test_e2e_collector import running
    caplog.set_level(logging.INFO, "triolytics")
    data = tmp_path / "data"
    data.mkdir()
    s = Store(data / "events.duckdb")
    for day in range(DAYS):
        s.load([row(i, day) for i in range(PER_DAY)], Position(1, day + 1))
    now_us = time.time_ns() // 1000
    s.load([row(i, 0)._replace(message_id=f"now-{i}", timestamp=now_us)
            for i in range(PER_DAY)], Position(1, DAYS + 1))  # (today: kept)
    s.close()
    full = (data / "events.duckdb").stat().st_size
    async with running(data, retention_days=1, retention_without_archive=True,
                       archive_interval_s=0.2, compact_min_bytes=0,
                       rollup_interval_s=3600):  # (no dashboard rollups: the events alone)
        with trio.fail_after(60):
            while "compacted" not in caplog.text:
                await trio.sleep(0.05)
    after = (data / "events.duckdb").stat().st_size
    print(f"\n{full} bytes with {DAYS * PER_DAY} rows -> {after} after retention")
    assert after < full / 3
    s = Store(data / "events.duckdb", read_only=True)
    try:
        assert s.count() == PER_DAY  # (the days of 2024 are past one day of retention)
    finally:
        s.close()
