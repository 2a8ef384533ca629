"""A damaged DuckDB file or WAL never keeps the server down, and loses nothing journaled.

Each case stores events through a real writer (small journal segments, so several loads
and checkpoints happen), stops it as `kill -9` would leave DuckDB (no checkpoint at
close: the last loads exist only in the WAL), damages the file, and starts again the
way `serve` does (`open_store`, then `Writer.recover`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from triolytics.core.config import Config
from triolytics.core.dedup import Dedup
from triolytics.core.journal import Journal
from triolytics.core.rows import Row
from triolytics.server.startup import StartupError, open_store
from triolytics.storage.store import Store
from triolytics.storage.writer import Writer

T0 = 1_714_564_800_000_000
N = 600


def row(i: int) -> Row:
    return Row(f"m{i:04d}", "default", "http", "track", "E", None, f"a{i}", None, None,
               None, None, T0 + i, None, None, T0 + i, json.dumps({"i": i, "pad": "x" * 40}),
               None, "{}", None)


def config(tmp_path) -> Config:
    return Config(data_dir=str(tmp_path), journal_segment_bytes=8192, load_batch_rows=50,
                  load_interval_ms=1)


def start(tmp_path) -> Writer:
    store, quarantined = open_store(tmp_path / "events.duckdb", 1)
    c = config(tmp_path)
    writer = Writer(c, Journal(tmp_path / "journal", c.journal_segment_bytes), store,
                    Dedup(10**12, 1000))
    writer.quarantined = [str(q) for q in quarantined]
    writer.recover()
    return writer


def crash(writer: Writer) -> None:
    """Leave the files as kill -9 would: no checkpoint at close."""
    writer.store.conn.execute("PRAGMA disable_checkpoint_on_shutdown")
    writer.store.close()
    writer.journal.close()


async def fill(tmp_path) -> Writer:
    """Store N events in groups of 10, each group loaded before the next."""
    writer = start(tmp_path)
    writer.store.create_key("default", "wk_damage_test")
    writer._close_files = lambda: None  # (closed by the test, the way it chooses)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        for i in range(0, N, 10):
            await writer.store_rows([row(j) for j in range(i, i + 10)])
            while writer.stats.unloaded_rows:
                await trio.sleep(0.005)
        writer.close()
    return writer


def stored_ids(writer: Writer) -> list[str]:
    return [r[0] for r in writer.store.conn.execute(
        "SELECT message_id FROM events ORDER BY message_id").fetchall()]


def expected() -> list[str]:
    return [row(i).message_id for i in range(N)]


def wal(tmp_path) -> Path:
    return tmp_path / "events.duckdb.wal"


def damage(path: Path, at: int, data: bytes = b"\xa5" * 16) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(data)


@pytest.fixture
def crashed(tmp_path):
    """N events stored, the last loads only in the WAL, the process gone."""
    writer = trio.run(fill, tmp_path)
    assert writer.journal.segments()[0] > 1  # some segments were released...
    assert wal(tmp_path).stat().st_size > 0  # ...and some loads are only in the WAL
    crash(writer)
    return tmp_path


def test_the_journal_keeps_what_only_the_wal_holds(crashed, caplog):
    """DuckDB opens a file whose WAL it cannot read at its last checkpoint (it ignores a
    WAL with a damaged header): the journal must still hold what the WAL held."""
    wal(crashed).unlink()
    writer = start(crashed)
    assert stored_ids(writer) == expected()
    crash(writer)


def test_a_corrupt_wal_is_quarantined_and_the_journal_replays_it(crashed, caplog):
    size = wal(crashed).stat().st_size
    damage(wal(crashed), size // 2)
    writer = start(crashed)
    assert stored_ids(writer) == expected()
    [moved] = writer.quarantined
    assert Path(moved).parent == crashed / "quarantine"
    assert Path(moved).name.startswith("events.duckdb.wal.")
    assert Path(moved).stat().st_size == size  # kept as it was, for the owner
    assert "could not replay its WAL" in caplog.text and "Corrupt WAL" in caplog.text
    assert writer.store.active_keys() == {
        "wk_damage_test": "default"}
    # ingest_seq continues without gaps or repeats over the replayed rows
    seqs = [r[0] for r in writer.store.conn.execute(
        "SELECT ingest_seq FROM events ORDER BY ingest_seq").fetchall()]
    assert seqs == list(range(1, N + 1))
    crash(writer)


def test_a_truncated_wal_loses_nothing(crashed):
    size = wal(crashed).stat().st_size
    os.truncate(wal(crashed), size // 3)
    writer = start(crashed)
    assert stored_ids(writer) == expected()
    crash(writer)


def test_a_damaged_file_is_quarantined_with_its_keys(crashed, caplog):
    damage(crashed / "events.duckdb", 100)  # the first header block
    writer = start(crashed)
    names = sorted(Path(q).name.rsplit(".", 1)[0] for q in writer.quarantined)
    assert names == ["events.duckdb", "events.duckdb.keys.json", "events.duckdb.wal"]
    assert "cannot open" in caplog.text and "Corrupt database file" in caplog.text
    # A new file: the write keys come back from the mirror; every event the journal
    # still holds is replayed (those before the last checkpoint are in the moved file).
    assert writer.store.active_keys() == {"wk_damage_test": "default"}
    got = stored_ids(writer)
    assert got and set(got) <= set(expected())
    assert got == expected()[N - len(got):]  # a suffix: the journal's segments kept
    crash(writer)


def test_a_second_server_still_refuses_in_one_line(crashed):
    """The lock is checked before any damage: a held file is never quarantined."""
    damage(wal(crashed), wal(crashed).stat().st_size // 2)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, sys
        f = open({str(crashed / "events.duckdb")!r}, "r+b")
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        print("held", flush=True)
        sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StartupError, match="locked by another process"):
            open_store(crashed / "events.duckdb", 1)
        assert not (crashed / "quarantine").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_segments_are_deleted_only_after_a_checkpoint(tmp_path, monkeypatch):
    """A checkpoint that does not empty the WAL keeps every segment."""
    monkeypatch.setattr(Store, "checkpoint", lambda self: False)
    writer = trio.run(fill, tmp_path)
    assert writer.journal.segments()[0] == 1
    crash(writer)


def test_serve_reports_what_it_set_aside(crashed):
    from triolytics.server.app import prepare
    damage(wal(crashed), wal(crashed).stat().st_size // 2)
    ready = prepare(config(crashed))
    stats = ready.writer.statistics()
    assert [Path(q).parent.name for q in stats["quarantined"]] == ["quarantine"]
    assert ready.keys == {"wk_damage_test": "default"}
    crash(ready.writer)


def test_the_keys_mirror_follows_every_change(tmp_path):
    store = Store(tmp_path / "events.duckdb")
    a = store.create_key("p1")
    b = store.create_key("p2")
    mirror = tmp_path / "events.duckdb.keys.json"
    assert json.loads(mirror.read_text()) == {"keys": sorted([[a, "p1"], [b, "p2"]])}
    assert mirror.stat().st_mode & 0o777 == 0o600
    store.revoke_key(a)
    assert json.loads(mirror.read_text()) == {"keys": [[b, "p2"]]}
    store.close()
