"""lake.py: the store on a DuckLake, with a local catalog and with a real PostgreSQL one
(bench/pgserver.py, started by the `postgres` fixture): loads exactly once per writer,
one arrival order across writers that load at once, shared keys, ids and secrets, own
sessions, rollups and queries, maintenance, a read-only reader beside the writers."""

from __future__ import annotations

import itertools
import json
import threading

import duckdb
import pytest

from triolytics.core.journal import Position
from triolytics.core.rows import Row
from triolytics.storage import stats
from triolytics.storage.lake import LakeStore, attach_sql, connect

T0 = 1_714_564_800_000_000  # 2024-05-01T12:00:00Z in µs
_names = itertools.count()


def make_row(i: int, type_: str = "track", session: str | None = None,
             anonymous_id: str | None = None) -> Row:
    received = T0 + i * 1_000_000
    return Row(f"m{i}", "default", "http", type_, f"E{i}", None, anonymous_id or f"a{i}", None,
               None, None, session, received - 500, None, None, received,
               json.dumps({"i": i}), None, '{"ip":"1.2.3.4"}', None)


@pytest.fixture(params=["local", "postgres"])
def lake(request, tmp_path):
    """(catalog, data path) of a new, empty lake."""
    if request.param == "local":
        return str(tmp_path / "catalog.ducklake"), str(tmp_path / "data")
    server = request.getfixturevalue("postgres")
    return "postgres:" + server.create_database(f"lake{next(_names)}"), str(tmp_path / "data")


def open_store(lake, writer: str = "w1") -> LakeStore:
    return LakeStore(*lake, writer)


def test_load_moves_only_its_writers_mark_and_survives_reopen(lake):
    s = open_store(lake)
    assert s.loaded_position() == Position(0, 0)
    s.load([make_row(1), make_row(2)], Position(1, 120))
    s.load([make_row(3)], Position(2, 40))
    assert s.loaded_position() == Position(2, 40)
    s.close()
    s = open_store(lake)
    assert s.loaded_position() == Position(2, 40)
    assert s.conn.execute("SELECT message_id, ingest_seq, writer FROM events ORDER BY 2"
                          ).fetchall() == [("m1", 1, "w1"), ("m2", 2, "w1"), ("m3", 3, "w1")]
    assert s.last_seq == 3
    s.close()


def test_writers_loading_at_once_share_one_gapless_arrival_order(lake):
    """Two writers on one PostgreSQL catalog (and, with a local catalog, two connections of
    one process) load at the same time: every load commits once, each writer's mark is its
    own, and ingest_seq is 1..n without repeats, in commit order (each load's rows a run)."""
    if not lake[0].startswith("postgres"):
        pytest.skip("a local catalog is one process's")
    stores = [open_store(lake, f"w{k}") for k in range(2)]
    loads = 12
    errors = []

    def run(k: int) -> None:
        try:
            for j in range(loads):
                rows = [make_row(10_000 * k + 100 * j + i) for i in range(50)]
                stores[k].load(rows, Position(1, j + 1))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = stores[0].conn.execute(
        "SELECT ingest_seq, writer, message_id FROM events ORDER BY ingest_seq").fetchall()
    assert [r[0] for r in got] == list(range(1, 2 * loads * 50 + 1))
    assert len({r[2] for r in got}) == 2 * loads * 50
    runs = [w for w, _ in itertools.groupby(r[1] for r in got)]
    assert len(runs) >= 2  # (both wrote; each load's 50 rows are consecutive)
    assert all(len(list(g)) % 50 == 0 for _, g in itertools.groupby(r[1] for r in got))
    for k in range(2):
        assert stores[k].loaded_position() == Position(1, loads)
    print("conflicts retried:", sum(s.conflicts for s in stores))
    for s in stores:
        s.close()


def test_keys_ids_and_secrets_are_shared(lake):
    a = open_store(lake, "w1")
    key = a.create_key("shop")
    assert a.create_key("shop", key) == key
    with pytest.raises(KeyError):
        a.create_key("other", key)
    a.record_analytics_ids([("id1", T0, "1.2.3.4"), ("id1", T0, "1.2.3.4")])
    a.record_analytics_ids([("id1", T0, None), ("id2", T0, None)])
    secret = a.shared_secret("admin.token", lambda: "first")
    a.close()
    b = open_store(lake, "w2")
    assert b.active_keys() == {key: "shop"}
    assert b.shared_secret("admin.token", lambda: "second") == secret == "first"
    assert b.conn.execute("SELECT analytics_id FROM analytics_ids ORDER BY 1").fetchall() == \
        [("id1",), ("id2",)]
    assert b.revoke_key(key) and not b.revoke_key(key)
    assert b.active_keys() == {}
    b.close()


def test_a_writer_resumes_only_the_sessions_it_opened(lake):
    a = open_store(lake, "w1")
    a.load([make_row(1, "session_start", "s1", "x"), make_row(2, session="s1",
                                                                anonymous_id="x")],
           Position(1, 10))
    a.close()
    b = open_store(lake, "w2")
    b.load([make_row(3, "session_start", "s2", "y")], Position(1, 5))
    assert [r[4] for r in b.open_sessions()] == ["s2"]
    b.close()
    a = open_store(lake, "w1")
    assert [(r[4], r[7]) for r in a.open_sessions()] == [("s1", 1)]
    a.close()


def test_queries_rollups_forget_and_retention_run_on_the_lake(lake):
    s = open_store(lake)
    rows = [make_row(1, "session_start", "s1", "x")] + [
        make_row(i, "page", "s1", "x") for i in range(2, 12)]
    s.load(rows, Position(1, 10))
    result = s.query("SELECT count(*) AS n FROM events", 10, timeout_s=10)
    assert result.rows == [[11]]
    cur = s.cursor()
    assert stats.refresh_rollups(cur) == 11
    assert stats.refresh_rollups(cur) == 0
    s.load([make_row(20, "page", "s1", "x")], Position(1, 20))
    assert stats.refresh_rollups(cur) == 1
    hourly = cur.execute("SELECT kind, sum(n) FROM stats_hourly GROUP BY 1 ORDER BY 1"
                         ).fetchall()
    assert dict(hourly)["event"] == 11 and dict(hourly)["session"] == 1
    cur.close()
    assert s.forget("anonymous_id", "x", None) == (12, 0)
    assert s.count() == 0
    s.load([make_row(30)], Position(1, 30))
    assert s.delete_days([("2024-05-01", None)]) == 1
    s.close()


def test_maintenance_merges_files_and_keeps_rows(lake, tmp_path):
    s = LakeStore(*lake, "w1", snapshot_keep_s=0.001)
    for j in range(6):  # (more than the inlining limit: each load a Parquet file)
        s.load([make_row(100 * j + i) for i in range(40)], Position(1, j + 1))
    cur = s.cursor()
    before, after = s.maintain(cur)
    assert before >= 6 and after < before
    assert s.count() == 240 and s.loaded_position() == Position(1, 6)
    cur.close()
    s.close()


def test_a_reader_attaches_read_only_while_a_writer_loads(lake):
    if not lake[0].startswith("postgres"):
        pytest.skip("a local catalog is one process's (DuckDB holds its file)")
    s = open_store(lake)
    s.load([make_row(1)], Position(1, 1))
    reader = connect(*lake, read_only=True)
    assert reader.execute("SELECT count(*) FROM events").fetchone() == (1,)
    s.load([make_row(2)], Position(1, 2))
    assert reader.execute("SELECT count(*) FROM events").fetchone() == (2,)
    with pytest.raises(duckdb.Error):
        reader.execute("INSERT INTO events (message_id, ingest_seq) VALUES ('x', 9)")
    reader.close()
    s.close()


def test_attach_sql_forms():
    assert attach_sql("postgresql://u@h:5432/db", "/d").startswith(
        "ATTACH 'ducklake:postgres:postgresql://u@h:5432/db' AS lake (DATA_PATH '/d/'")
    assert "ducklake:postgres:host=h dbname=x" in attach_sql("postgres:host=h dbname=x", "/d/")
    assert "ducklake:postgres:dbname=x host=h'" in attach_sql("dbname=x host=h", "/d")
    assert attach_sql("/c/it's.ducklake", "/d", read_only=True).endswith(
        "AS lake (DATA_PATH '/d/', READ_ONLY)")


def test_the_journal_drops_a_segment_only_after_the_data_files_are_synced(tmp_path,
                                                                          monkeypatch):
    """DuckLake does not sync the Parquet files it commits: `checkpoint()` (the writer's
    condition for dropping journal segments) syncs a local data path first."""
    import os
    synced = []
    monkeypatch.setattr(os, "sync", lambda: synced.append(1))
    s = open_store((str(tmp_path / "c.ducklake"), str(tmp_path / "data")))
    s.load([make_row(1)], Position(1, 1))
    assert s.checkpoint() and synced == [1]
    s.data_path = "s3://bucket/lake"  # (object storage: durable once written)
    assert s.checkpoint() and synced == [1]
    s.close()
