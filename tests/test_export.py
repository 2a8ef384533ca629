"""export.py and `triolytics export`: files by day, the manifest, filters, atomicity,
through a running server and from the file; read back with pyarrow as a user would."""

from __future__ import annotations

import csv
import hashlib
import json
from functools import partial
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import trio
from test_e2e_collector import AUTH, running

import triolytics.storage.export as export_mod
from triolytics import cli
from triolytics.core.journal import Position
from triolytics.core.rows import Row
from triolytics.storage.export import ExportError, export
from triolytics.storage.store import Store

DAY_US = 86_400_000_000
T0 = 1_714_564_800_000_000  # 2024-05-01T12:00:00Z


def row(i: int, day: int, project: str = "default") -> Row:
    t = T0 + day * DAY_US + i
    return Row(f"m{day}-{i}", project, "http", "track", "E", None, f"a{i}", None, None,
               None, None, t, None, None, t, json.dumps({"i": i}), None, "{}", None)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "events.duckdb")
    s.load([row(i, d, "p2" if i % 4 == 0 else "default") for d in range(3) for i in range(10)],
           Position(1, 100))
    yield s
    s.close()


def message_ids(folder: Path) -> list[str]:
    return sorted(ds.dataset(folder, format="parquet", partitioning="hive")
                  .to_table(columns=["message_id"]).column("message_id").to_pylist())


def test_parquet_by_day_with_a_manifest(store, tmp_path):
    out = tmp_path / "out"
    manifest = export(store.cursor(), out)
    assert sorted(p.name for p in out.iterdir()) == [
        "_manifest.json", "dt=2024-05-01", "dt=2024-05-02", "dt=2024-05-03"]
    assert message_ids(out) == sorted(f"m{d}-{i}" for d in range(3) for i in range(10))
    written = json.loads((out / "_manifest.json").read_text())
    assert written["rows"] == manifest.rows == 30
    assert written["format"] == "parquet"
    assert written["min_timestamp"].startswith("2024-05-01 12:00:00")
    assert written["max_timestamp"].startswith("2024-05-03 12:00:00")
    for f in written["files"]:
        data = (out / f["path"]).read_bytes()
        assert f["rows"] == 10 and f["bytes"] == len(data)
        assert f["sha256"] == hashlib.sha256(data).hexdigest()
    table = ds.dataset(out / "dt=2024-05-02", format="parquet").to_table()
    assert table.column("ingest_seq").to_pylist() == list(range(11, 21))  # arrival order
    meta = ds.dataset(out / "dt=2024-05-02", format="parquet").files[0]
    import pyarrow.parquet as pq
    assert pq.ParquetFile(meta).metadata.row_group(0).column(0).compression == "ZSTD"


def test_filters(store, tmp_path):
    export(store.cursor(), tmp_path / "a", since="2024-05-02", until="2024-05-03")
    assert message_ids(tmp_path / "a") == sorted(f"m1-{i}" for i in range(10))
    export(store.cursor(), tmp_path / "b", project="p2")
    assert message_ids(tmp_path / "b") == sorted(f"m{d}-{i}" for d in range(3)
                                                 for i in (0, 4, 8))
    empty = export(store.cursor(), tmp_path / "c", since="2030-01-01T00:00:00Z")
    assert empty.rows == 0 and empty.files == []
    assert json.loads((tmp_path / "c" / "_manifest.json").read_text())["rows"] == 0


def test_csv_and_json(store, tmp_path):
    export(store.cursor(), tmp_path / "csv", fmt="csv", project="p2")
    with open(tmp_path / "csv" / "dt=2024-05-01" / "part-0.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["message_id"] for r in got] == ["m0-0", "m0-4", "m0-8"]
    export(store.cursor(), tmp_path / "json", fmt="json", project="p2")
    lines = (tmp_path / "json" / "dt=2024-05-03" / "part-0.json").read_text().splitlines()
    assert [json.loads(line)["message_id"] for line in lines] == ["m2-0", "m2-4", "m2-8"]


@pytest.mark.parametrize("kwargs, message", [
    ({"fmt": "xml"}, "format must be one of parquet, csv, json"),
    ({"since": "yesterday"}, "since must be a date or an ISO 8601 time"),
])
def test_bad_requests_write_nothing(store, tmp_path, kwargs, message):
    with pytest.raises(ExportError, match=message):
        export(store.cursor(), tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_never_into_an_earlier_export(store, tmp_path):
    export(store.cursor(), tmp_path / "out")
    with pytest.raises(ExportError, match="already exists and is not an empty directory"):
        export(store.cursor(), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert export(store.cursor(), tmp_path / "empty").rows == 30


def test_an_interrupted_export_leaves_nothing_visible(store, tmp_path, monkeypatch):
    calls = []

    def fails_on_the_second_file(path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return "x"
    monkeypatch.setattr(export_mod, "_sha256", fails_on_the_second_file)
    with pytest.raises(OSError):
        export(store.cursor(), tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir() if "out" in p.name] == []


def test_cli_export_from_the_file(store, tmp_path, capsys):
    store.close()
    assert cli.main(["export", "--to", str(tmp_path / "out"), "--data", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("exported 30 events in 3 files (")
    assert len(message_ids(tmp_path / "out")) == 30
    assert cli.main(["export", "--to", str(tmp_path / "out"), "--data", str(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err


async def test_cli_export_through_the_running_server(tmp_path):
    data = tmp_path / "data"
    async with running(data) as server:
        for i in range(5):
            reply = await server.post("/v1/capture", headers=AUTH, json={
                "type": "track", "event": "E", "anonymousId": f"u{i}", "messageId": f"x{i}"})
            assert reply.status_code == 201
        done = await trio.to_thread.run_sync(partial(
            cli.main, ["export", "--to", str(tmp_path / "out"), "--data", str(data)]))
        refused = await server.post("/admin/export", json={"to": "relative/dir"}, headers={
            "Authorization": "Bearer " + (data / "admin.token").read_text().strip()})
    assert done == 0
    ids = message_ids(tmp_path / "out")
    assert [i for i in ids if i.startswith("x")] == [f"x{i}" for i in range(5)]
    assert refused.status_code == 400


async def test_an_export_while_loads_fail_is_503(tmp_path, monkeypatch):
    data = tmp_path / "data"
    async with running(data, load_interval_ms=50) as server:
        def fails(*args):
            raise OSError("No space left on device")
        monkeypatch.setattr(Store, "load", fails)
        stored = await server.post("/v1/capture", headers=AUTH, json={
            "type": "track", "event": "E", "anonymousId": "u", "messageId": "y1"})
        refused = await server.post("/admin/export", json={"to": str(tmp_path / "out")},
                                    headers={"Authorization": "Bearer " + (
                                        data / "admin.token").read_text().strip()})
        monkeypatch.undo()
    assert stored.status_code == 201
    assert refused.status_code == 503
    assert "No space left on device" in refused.json()["error"]["message"]
    assert not (tmp_path / "out").exists()
