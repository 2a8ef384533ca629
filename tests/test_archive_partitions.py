"""archive.py's partitioning: small days together as a month, big days alone, days that
retention needs archived at once, files split past `max_file_bytes` in arrival order,
late rows added to their partition atomically; forget rewrites a month partition."""

from __future__ import annotations

import json

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from test_archive import HOUR_US, MIDNIGHT_0503, ids, run
from test_export import DAY_US, row

import triolytics.storage.archive as archive
from triolytics.core.journal import Position
from triolytics.storage.archive import (
    ROW_GROUP,
    finish_swaps,
    forget_archived,
    retain_before,
    retention_plan,
    verify,
)
from triolytics.storage.store import Archived, Store

JUNE_2 = MIDNIGHT_0503 + 30 * DAY_US + 2 * HOUR_US  # 2024-06-02T02:00Z: May is closed
SMALL = 1 << 20  # bytes: a day of a few rows is small


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "events.duckdb")
    yield s
    s.close()


def load(store, rows, at=[100]):  # noqa: B006 (a counter shared by the calls)
    at[0] += 1
    store.load(rows, Position(1, at[0]))


def manifest(folder) -> dict:
    return json.loads((folder / "_manifest.json").read_text())


def test_small_days_wait_for_their_month_and_go_together(store, tmp_path):
    root = tmp_path / "archive"
    load(store, [row(i, d) for d in (0, 1, 5) for i in range(10)])
    assert run(store, root, MIDNIGHT_0503 + 10 * DAY_US, min_bytes=SMALL) == []  # May open
    assert not any(root.iterdir())
    assert run(store, root, JUNE_2, min_bytes=SMALL) == ["2024-05"]
    m = manifest(root / "dt=2024-05")
    assert m["day"] == "2024-05" and m["rows"] == 30
    assert m["days"] == {"2024-05-01": 10, "2024-05-02": 10, "2024-05-06": 10}
    assert m["since"] == "2024-05-01" and m["until"] == "2024-05-07"
    assert store.archived_days() == {d: Archived(30, "2024-05") for d in m["days"]}
    assert ids(root) == sorted(f"m{d}-{i}" for d in (0, 1, 5) for i in range(10))
    assert run(store, root, JUNE_2, min_bytes=SMALL) == []  # never twice


def test_a_big_day_goes_alone_and_the_small_ones_as_the_month(store, tmp_path):
    root = tmp_path / "archive"
    load(store, [row(i, 0) for i in range(100)] + [row(i, 1) for i in range(5)])
    # 100 rows x 60 bytes (the guess before the archive has measured) >= 6000 bytes
    assert run(store, root, MIDNIGHT_0503 + 2 * HOUR_US, min_bytes=6000) == ["2024-05-01"]
    assert run(store, root, JUNE_2, min_bytes=6000) == ["2024-05"]
    assert manifest(root / "dt=2024-05")["days"] == {"2024-05-02": 5}
    assert len(ids(root)) == 105


def test_retention_does_not_wait_for_the_month(store, tmp_path):
    root = tmp_path / "archive"
    load(store, [row(i, d) for d in range(3) for i in range(10)])
    now = MIDNIGHT_0503 + 2 * HOUR_US  # 3 May: May is open
    before = retain_before(now, 1)  # rows before 2 May are past retention
    assert run(store, root, now, min_bytes=SMALL, retain_before=before) == ["2024-05-01"]
    delete, refused = retention_plan(store.cursor(), root, now, 1, False,
                                     store.archived_days())
    assert delete == [("2024-05-01", 30)] and refused == []


def test_files_end_past_max_file_bytes_in_arrival_order(store, tmp_path):
    root = tmp_path / "archive"
    n = 3 * ROW_GROUP
    load(store, [row(i, 0) for i in range(n)])
    run(store, root, MIDNIGHT_0503, min_bytes=0, max_file_bytes=1)  # a file per row group
    m = manifest(root / "dt=2024-05-01")
    assert [f["path"] for f in m["files"]] == ["part-0.parquet", "part-1.parquet",
                                               "part-2.parquet"]
    assert [f["rows"] for f in m["files"]] == [ROW_GROUP] * 3
    seqs = []
    for f in m["files"]:
        seqs += pq.read_table(root / "dt=2024-05-01" / f["path"],
                              columns=["ingest_seq"]).column(0).to_pylist()
    assert seqs == sorted(seqs) and len(set(seqs)) == n  # arrival order, each once
    assert verify(root / "dt=2024-05-01") is None


def test_late_rows_are_added_once_there_are_enough(store, tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "ROW_GROUP", 5)
    root = tmp_path / "archive"
    load(store, [row(i, 0) for i in range(10)])
    now = MIDNIGHT_0503 + 2 * HOUR_US
    assert run(store, root, now) == ["2024-05-01"]
    load(store, [row(i, 0)._replace(message_id=f"late{i}") for i in range(4)])
    assert run(store, root, now) == []  # 4 late rows: fewer than a row group, they wait
    load(store, [row(9, 0)._replace(message_id="late4")])
    assert run(store, root, now) == ["2024-05-01"]
    m = manifest(root / "dt=2024-05-01")
    assert m["rows"] == 15 and m["ingest_seq_max"] == 15
    assert [f["path"] for f in m["files"]] == ["part-0.parquet", "late-15-0.parquet"]
    assert verify(root / "dt=2024-05-01") is None
    assert store.archived_days()["2024-05-01"] == Archived(15, "2024-05-01")
    assert ids(root) == sorted([f"m0-{i}" for i in range(10)] +
                               [f"late{i}" for i in range(5)])
    assert [p.name for p in root.iterdir()] == ["dt=2024-05-01"]  # no temp left
    assert run(store, root, now) == []


def test_a_late_row_goes_in_at_once_when_retention_is_due(store, tmp_path):
    root = tmp_path / "archive"
    load(store, [row(i, 0) for i in range(10)])
    now = MIDNIGHT_0503 + 2 * HOUR_US
    run(store, root, now)
    load(store, [row(0, 0)._replace(message_id="late")])
    assert run(store, root, now, retain_before=retain_before(now, 1)) == ["2024-05-01"]
    delete, _ = retention_plan(store.cursor(), root, now, 1, False, store.archived_days())
    assert store.delete_days(delete) == 11  # the late row too
    assert "late" in ids(root)


def test_a_new_day_of_an_archived_month_joins_it(store, tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "ROW_GROUP", 5)
    root = tmp_path / "archive"
    load(store, [row(i, 0) for i in range(10)])
    run(store, root, JUNE_2, min_bytes=SMALL)
    load(store, [row(i, 3) for i in range(6)])  # 4 May, unseen until now
    assert run(store, root, JUNE_2, min_bytes=SMALL) == ["2024-05"]
    assert manifest(root / "dt=2024-05")["days"] == {"2024-05-01": 10, "2024-05-04": 6}
    assert store.archived_days()["2024-05-04"] == Archived(16, "2024-05")
    assert len(ids(root)) == 16


def test_a_crash_adding_late_rows_is_finished_or_undone(store, tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "ROW_GROUP", 5)
    root = tmp_path / "archive"
    load(store, [row(i, 0) for i in range(10)])
    now = MIDNIGHT_0503 + 2 * HOUR_US
    run(store, root, now)
    load(store, [row(i, 0)._replace(message_id=f"late{i}") for i in range(5)])
    real = archive.Path.rename
    dirs = []

    def crash_on_the_second(self, target):
        if self.is_dir():
            dirs.append(target)
            if len(dirs) == 2:  # aside, not yet in place
                raise OSError("killed")
        return real(self, target)
    monkeypatch.setattr(archive.Path, "rename", crash_on_the_second)
    with pytest.raises(OSError):
        run(store, root, now)
    monkeypatch.setattr(archive.Path, "rename", real)
    assert not (root / "dt=2024-05-01").exists()
    # the next run finishes the swap, records the manifest ahead of DuckDB, adds nothing
    assert run(store, root, now) == ["2024-05-01"]
    assert store.archived_days()["2024-05-01"].seq_max == 15
    assert len(ids(root)) == 15 and run(store, root, now) == []


def test_forget_rewrites_a_month_of_many_files(store, tmp_path):
    root = tmp_path / "archive"
    load(store, [row(i, d)._replace(user_id="victim" if i % 2 else None)
                 for d in range(3) for i in range(ROW_GROUP)])
    run(store, root, JUNE_2, min_bytes=1 << 40, max_file_bytes=1)
    folder = root / "dt=2024-05"
    assert len(manifest(folder)["files"]) == 3
    assert forget_archived(store.cursor(), root, "user_id", "victim", None,
                           max_file_bytes=1) == 3 * ROW_GROUP // 2
    m = manifest(folder)
    assert m["rows"] == 3 * ROW_GROUP // 2 and verify(folder) is None
    assert m["days"] == {f"2024-05-0{d + 1}": ROW_GROUP // 2 for d in range(3)}
    table = ds.dataset(root, format="parquet", partitioning="hive").to_table()
    assert table.num_rows == 3 * ROW_GROUP // 2
    assert set(table.column("user_id").to_pylist()) == {None}
    finish_swaps(root)
    assert [p.name for p in root.iterdir()] == ["dt=2024-05"]
