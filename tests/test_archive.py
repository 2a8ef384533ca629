"""archive.py: closed UTC days as Parquet partitions (atomic, never doubled), late
events, and retention (only verified archived days, unless told otherwise)."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime

import duckdb
import pyarrow.dataset as ds
import pytest
import trio
from test_e2e_collector import AUTH, running
from test_export import DAY_US, T0, row

import triolytics.storage.archive as archive
from triolytics.core.journal import Position
from triolytics.storage.archive import archive_closed, retention_plan, unrecorded
from triolytics.storage.store import Store

HOUR_US = 3_600_000_000
MIDNIGHT_0503 = T0 + 2 * DAY_US - 12 * HOUR_US  # 2024-05-03T00:00Z


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "events.duckdb")
    s.load([row(i, d) for d in range(3) for i in range(10)], Position(1, 100))
    yield s
    s.close()


def run(store, root, now_us, grace_s=3600.0, **options):
    """One archive step as the server's task takes it: record what is on disk and not
    recorded, write, then record. Every closed day alone unless `min_bytes` is given."""
    options.setdefault("min_bytes", 0)
    found = unrecorded(root, store.archived_days())
    for m in found:
        store.record_archived(m.day, m.day_rows(), m.ingest_seq_max)
    manifests = archive_closed(store.cursor(), root, now_us, grace_s,
                               store.archived_days(), **options)
    for m in manifests:
        store.record_archived(m.day, m.day_rows(), m.ingest_seq_max)
    return [m.day for m in found + manifests]


def ids(root) -> list[str]:
    return sorted(ds.dataset(root, format="parquet", partitioning="hive")
                  .to_table(columns=["message_id"]).column("message_id").to_pylist())


def test_closed_days_only_after_the_grace(store, tmp_path):
    root = tmp_path / "archive"
    assert run(store, root, MIDNIGHT_0503 + HOUR_US // 2) == ["2024-05-01"]  # in grace
    assert run(store, root, MIDNIGHT_0503 + 2 * HOUR_US) == ["2024-05-02"]
    assert run(store, root, MIDNIGHT_0503 + 3 * HOUR_US) == []  # nothing twice
    assert sorted(p.name for p in root.iterdir()) == ["dt=2024-05-01", "dt=2024-05-02"]
    manifest = json.loads((root / "dt=2024-05-02" / "_manifest.json").read_text())
    assert manifest["rows"] == 10 and manifest["day"] == "2024-05-02"
    assert manifest["min_timestamp"].startswith("2024-05-02 12:00:00")
    f = manifest["files"][0]
    assert f["path"] == "part-0.parquet"
    assert f["sha256"] == hashlib.sha256(
        (root / "dt=2024-05-02" / "part-0.parquet").read_bytes()).hexdigest()
    # pyarrow reads the archive as a hive dataset, `dt` as a column
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 20
    assert sorted(set(map(str, table.column("dt").to_pylist()))) == [
        "2024-05-01", "2024-05-02"]
    assert ids(root) == sorted(f"m{d}-{i}" for d in range(2) for i in range(10))
    recorded = store.conn.execute("SELECT day::VARCHAR, rows FROM archived_days "
                                  "ORDER BY day").fetchall()
    assert recorded == [("2024-05-01", 10), ("2024-05-02", 10)]


def test_a_crash_mid_archive_leaves_no_half_partition(store, tmp_path, monkeypatch):
    root = tmp_path / "archive"

    def crash(*_):
        raise OSError("killed after the first file")

    with monkeypatch.context() as m:
        m.setattr(archive, "_write_manifest", crash)
        with pytest.raises(OSError):
            run(store, root, MIDNIGHT_0503 + 2 * HOUR_US)
    left = [p.name for p in root.iterdir()]
    assert len(left) == 1 and left[0].startswith(".dt=2024-05-01.partial-")
    assert ds.dataset(root, format="parquet").files == []  # a hidden temp is not in it
    assert store.archived_days() == {}
    assert run(store, root, MIDNIGHT_0503 + 2 * HOUR_US) == ["2024-05-01", "2024-05-02"]
    assert sorted(p.name for p in root.iterdir()) == ["dt=2024-05-01", "dt=2024-05-02"]
    assert ids(root) == sorted(f"m{d}-{i}" for d in range(2) for i in range(10))  # once


def test_a_partition_written_but_not_recorded_is_recorded_not_rewritten(store, tmp_path):
    root = tmp_path / "archive"
    archive_closed(store.cursor(), root, MIDNIGHT_0503 + 2 * HOUR_US, 3600, {},
                   min_bytes=0)
    before = (root / "dt=2024-05-01" / "part-0.parquet").stat().st_mtime_ns
    assert run(store, root, MIDNIGHT_0503 + 2 * HOUR_US) == ["2024-05-01", "2024-05-02"]
    assert (root / "dt=2024-05-01" / "part-0.parquet").stat().st_mtime_ns == before
    assert set(store.archived_days()) == {"2024-05-01", "2024-05-02"}


def test_late_events_stay_in_duckdb_and_retention_keeps_them(store, tmp_path):
    root = tmp_path / "archive"
    now = MIDNIGHT_0503 + 2 * HOUR_US
    run(store, root, now)
    late = row(99, 0)._replace(message_id="late")  # a client's old timestamp, later
    store.load([late], Position(1, 200))
    assert run(store, root, now) == []  # the partition is not written again
    assert "late" not in ids(root)
    delete, refused = retention_plan(store.cursor(), root, now, 1, False,
                                     store.archived_days())
    assert delete == [("2024-05-01", 30)] and refused == []
    assert store.delete_days(delete) == 10
    left = store.conn.execute("SELECT message_id FROM events WHERE timestamp < "
                              "'2024-05-02'::TIMESTAMPTZ").fetchall()
    assert left == [("late",)]
    assert retention_plan(store.cursor(), root, now, 1, False,
                          store.archived_days()) == ([], [])  # late rows: no nagging


def test_retention_refused_without_archive_unless_told(store, tmp_path, caplog):
    now = MIDNIGHT_0503 + 2 * HOUR_US
    delete, refused = retention_plan(store.cursor(), None, now, 1, False, {})
    assert delete == [] and refused == ["2024-05-01: 10 rows not archived"]
    delete, _ = retention_plan(store.cursor(), None, now, 1, True, {})
    assert store.delete_days(delete) == 10
    assert store.count() == 20


def test_retention_refuses_a_partition_that_does_not_verify(store, tmp_path):
    root = tmp_path / "archive"
    now = MIDNIGHT_0503 + 2 * HOUR_US
    run(store, root, now)
    part = root / "dt=2024-05-01" / "part-0.parquet"
    part.write_bytes(part.read_bytes()[:-1] + b"x")
    delete, refused = retention_plan(store.cursor(), root, now, 1, False,
                                     store.archived_days())
    assert delete == [] and "does not match" in refused[0]
    (root / "dt=2024-05-01" / "_manifest.json").unlink()
    _, refused = retention_plan(store.cursor(), root, now, 1, False, store.archived_days())
    assert "no readable manifest" in refused[0]


def test_file_size_after_retention(tmp_path):
    """Deleted rows' blocks are reused after a CHECKPOINT: the file stops growing (it
    does not shrink). Measured: see docs/archive.md."""
    s = Store(tmp_path / "events.duckdb")
    n = 100_000
    try:
        s.load([row(i, 0) for i in range(n)], Position(1, 100))
        s.checkpoint()
        full = (tmp_path / "events.duckdb").stat().st_size
        assert s.delete_days([("2024-05-01", None)]) == n
        after_delete = (tmp_path / "events.duckdb").stat().st_size
        s.load([row(i, 1) for i in range(n)], Position(1, 200))
        s.checkpoint()
        refilled = (tmp_path / "events.duckdb").stat().st_size
    finally:
        s.close()
    print(f"\nfile: {full} bytes with {n} rows; {after_delete} after delete+checkpoint; "
          f"{refilled} after {n} new rows")
    assert after_delete <= full
    assert refilled <= full * 1.1  # freed blocks reused


async def test_the_server_archives_and_then_retains(tmp_path, caplog):
    caplog.set_level(logging.INFO, "triolytics.archive")
    data, root = tmp_path / "data", tmp_path / "archive"
    async with running(data, archive_dir=str(root), archive_interval_s=0.2,
                       retention_days=30) as server:
        for i in range(5):
            reply = await server.post("/v1/capture", headers=AUTH, json={
                "type": "track", "event": "E", "anonymousId": f"u{i}", "messageId": f"x{i}",
                "timestamp": f"2024-05-0{i % 2 + 1}T10:00:00Z"})
            assert reply.status_code == 201
        with trio.fail_after(20):
            while not (root / "dt=2024-05").exists() or "retention: deleted" \
                    not in caplog.text:
                await trio.sleep(0.05)
    assert [i for i in ids(root) if i.startswith("x")] == [f"x{i}" for i in range(5)]
    con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    try:
        old = con.execute("SELECT count(*) FROM events WHERE timestamp < ?",
                          [datetime(2024, 6, 1, tzinfo=UTC)]).fetchone()[0]
        days = con.execute("SELECT day::VARCHAR FROM archived_days ORDER BY day").fetchall()
    finally:
        con.close()
    assert old == 0
    assert days == [("2024-05-01",), ("2024-05-02",)]


async def test_the_server_refuses_retention_without_archive(tmp_path, caplog):
    data = tmp_path / "data"
    async with running(data, archive_interval_s=0.2, retention_days=30) as server:
        reply = await server.post("/v1/capture", headers=AUTH, json={
            "type": "track", "event": "E", "anonymousId": "u", "messageId": "old",
            "timestamp": "2024-05-01T10:00:00Z"})
        assert reply.status_code == 201
        with trio.fail_after(20):
            while "retention: keeping rows" not in caplog.text:
                await trio.sleep(0.05)
    con = duckdb.connect(str(data / "events.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM events WHERE message_id = 'old'"
                           ).fetchone()[0] == 1
    finally:
        con.close()
