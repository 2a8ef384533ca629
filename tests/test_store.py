"""store.py against a DuckDB file: atomic load + journal mark, write keys, recent ids."""

from __future__ import annotations

import json
import re
import sys
import uuid

import pytest

import triolytics.storage.store as store_mod
from triolytics.core.dedup import dedup_key
from triolytics.core.journal import Position
from triolytics.core.rows import COLUMNS, Columns, Row, RtColumns, decode_part, encode_part
from triolytics.storage.store import Store, rows_to_arrow, wide_to_arrow

T0 = 1_714_564_800_000_000  # 2024-05-01T12:00:00Z in µs


def make_row(i: int, project: str = "default", received: int | None = None) -> Row:
    received = T0 + i * 1_000_000 if received is None else received
    return Row(f"m{i}", project, "http", "track", f"E{i}", None, f"a{i}", None, None, None,
               None, received - 500, None, None, received, json.dumps({"i": i}),
               None, '{"ip":"1.2.3.4"}', None)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "events.duckdb")
    yield s
    s.close()


def rows_in(store: Store) -> list[tuple]:
    return store.conn.execute(
        "SELECT message_id, project, event, epoch_us(timestamp), epoch_us(received_at), "
        "properties->>'$.i', context->>'$.ip' FROM events ORDER BY message_id").fetchall()


def test_fresh_store(store):
    assert store.count() == 0
    assert store.loaded_position() == Position(0, 0)


def test_load_inserts_rows_and_moves_mark(store):
    store.load([make_row(1), make_row(2)], Position(1, 120))
    assert rows_in(store) == [
        ("m1", "default", "E1", T0 + 1_000_000 - 500, T0 + 1_000_000, "1", "1.2.3.4"),
        ("m2", "default", "E2", T0 + 2_000_000 - 500, T0 + 2_000_000, "2", "1.2.3.4")]
    assert store.loaded_position() == Position(1, 120)
    store.load([make_row(3)], Position(2, 40))
    assert store.count() == 3
    assert store.loaded_position() == Position(2, 40)


def test_load_without_rows_moves_mark(store):
    store.load([], Position(3, 7))
    assert store.loaded_position() == Position(3, 7)
    assert store.count() == 0


def test_load_survives_reopen(tmp_path):
    s = Store(tmp_path / "e.duckdb")
    s.load([make_row(1)], Position(1, 50))
    s.close()
    s = Store(tmp_path / "e.duckdb")
    assert (s.count(), s.loaded_position()) == (1, Position(1, 50))
    s.close()


def test_failed_conversion_changes_nothing(store, monkeypatch):
    store.load([make_row(1)], Position(1, 10))

    def boom(rows):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store_mod, "rows_to_arrow", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        store.load([make_row(2)], Position(1, 20))
    assert store.count() == 1
    assert store.loaded_position() == Position(1, 10)


def test_failure_after_insert_rolls_back_rows(store):
    # The mark cannot be written (not a number): the rows inserted before it must go too.
    store.load([make_row(1)], Position(1, 10))
    with pytest.raises(Exception):  # noqa: B017 - any DuckDB conversion error
        store.load([make_row(2), make_row(3)], Position("not-a-segment", 20))
    assert store.count() == 1
    assert store.loaded_position() == Position(1, 10)
    store.load([make_row(2)], Position(1, 30))  # the connection is still usable
    assert (store.count(), store.loaded_position()) == (2, Position(1, 30))


# --- write keys ------------------------------------------------------------------------

STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def test_create_list_revoke(store):
    k1 = store.create_key("shop")
    k2 = store.create_key("blog", "wk_blog_fixed")
    assert k1.startswith("wk_") and len(k1) > 20 and k1 != k2
    assert k2 == "wk_blog_fixed"
    assert store.active_keys() == {k1: "shop", k2: "blog"}
    listed = {k.key: k for k in store.list_keys()}
    assert set(listed) == {k1, k2}
    assert listed[k1].project == "shop" and listed[k1].revoked_at is None
    assert STAMP.match(listed[k1].created_at)

    assert store.revoke_key(k1) is True
    assert store.revoke_key(k1) is False
    assert store.revoke_key("wk_unknown") is False
    assert store.active_keys() == {k2: "blog"}
    revoked = {k.key: k for k in store.list_keys()}[k1]
    assert revoked.revoked_at is not None and STAMP.match(revoked.revoked_at)


def test_generated_keys_distinct(store):
    keys = {store.create_key("p") for _ in range(20)}
    assert len(keys) == 20


def test_create_key_idempotent_for_same_project(store):
    assert store.create_key("shop", "wk_x") == "wk_x"
    assert store.create_key("shop", "wk_x") == "wk_x"
    assert len(store.list_keys()) == 1


def test_create_key_of_other_project_raises(store):
    store.create_key("shop", "wk_x")
    with pytest.raises(KeyError):
        store.create_key("blog", "wk_x")
    assert store.active_keys() == {"wk_x": "shop"}


def test_revoked_key_cannot_be_reused(store):
    store.create_key("shop", "wk_x")
    store.revoke_key("wk_x")
    with pytest.raises(KeyError):
        store.create_key("shop", "wk_x")
    assert store.active_keys() == {}


# --- recent ids ------------------------------------------------------------------------

def test_recent_ids(store):
    rows = [make_row(i, project="p" if i % 2 else "q") for i in range(6)]
    store.load(rows[3:] + rows[:3], Position(1, 1))  # insertion order does not matter
    got = store.recent_ids(T0 + 2_000_000, 100)
    assert got == [(dedup_key(r.project, r.message_id), r.received_at) for r in rows[2:]]
    # the limit keeps the most recent ones, still oldest first
    got = store.recent_ids(T0, 2)
    assert got == [(dedup_key(r.project, r.message_id), r.received_at) for r in rows[4:]]
    assert store.recent_ids(T0 + 10_000_000, 100) == []


def test_rows_without_message_id_get_a_uuid_at_load(store):
    store.load([make_row(1)._replace(message_id=None), make_row(2)._replace(message_id=None),
                make_row(3)], Position(1, 10))
    ids = [r[0] for r in store.conn.execute(
        "SELECT message_id FROM events ORDER BY received_at").fetchall()]
    assert ids[2] == "m3"
    assert len(set(ids[:2])) == 2
    assert all(uuid.UUID(i).version == 4 for i in ids[:2])


def test_columns_become_the_same_table_as_their_rows():
    parts = [
        RtColumns("p1", "0.a", "s1", 1_000, '{"ip":"1"}', [None, "id-2"], ["a", "b"],
                  [5, 6], [None, 6], ['{"x":1}', None]),
        RtColumns("p2", "0.b", None, 2_000, '{"ip":"2"}', ["id-3"], ["c"], [7], [7], [None]),
        RtColumns("p1", "0.c", "s3", 3_000, "{}", [None] * 3, ["d", "e", "f"], [8, 9, 10],
                  [None] * 3, ["{}"] * 3),
    ]
    rows = [row for part in parts for row in part.rows()]
    assert wide_to_arrow([p.columns() for p in parts]).to_pylist() == \
        rows_to_arrow(rows).to_pylist()
    assert wide_to_arrow([parts[1].columns()]).num_rows == 1


def test_wide_columns_become_the_same_table_as_their_rows(monkeypatch):
    monkeypatch.setattr(store_mod, "ARROW_SLICE_ROWS", 2)  # lists span several slices
    n = len(COLUMNS)

    def part(count: int, **varying) -> Columns:
        shared = [None, "p1", "http", "track", "E", None, "a", None, None, None, "s1",
                  1_000, None, None, 1_000, None, None, '{"ip":"1"}', None]
        for name, value in varying.items():
            shared[list(COLUMNS).index(name)] = value
        assert len(shared) == n
        return Columns(count, shared)

    parts = [
        part(3, message_id=["m1", None, "m3"], type=["track", "page", "track"],
             timestamp=[5, 6, 7], properties=['{"x":1}', None, "{}"]),
        part(1, project="p2", session_id=None, context="{}"),  # shared, differing per part
        part(2, anonymous_id=["b", "c"], user_id="u", integrations='{"All":false}'),
        part(0),
    ]
    rows = [row for p in parts for row in p.rows()]
    assert len(rows) == 6
    assert wide_to_arrow(parts).to_pylist() == rows_to_arrow(rows).to_pylist()
    assert wide_to_arrow(parts[1:2]).num_rows == 1
    assert decode_part(encode_part(parts[0])) == parts[0]  # a journal record and back


def test_store_loads_rows_and_both_kinds_of_columns_in_one_transaction(tmp_path):
    store = Store(tmp_path / "e.duckdb")
    wide = Columns(2, [None, "p", "http", "page", None, "Home", ["a", "b"], None, None, None,
                       "s", 1_000, None, None, 1_000, None, None, "{}", None])
    ws = RtColumns("p", "0.a", "s", 1_000, "{}", ["w1"], ["ws_e"], [5], [None], [None])
    store.load(wide.rows()[:1], Position(1, 10), [wide, ws])
    got = store.conn.execute("SELECT type, anonymous_id, message_id IS NOT NULL FROM events "
                             "ORDER BY all").fetchall()
    assert got == [("page", "a", True), ("page", "a", True), ("page", "b", True),
                   ("ws_e", "0.a", True)]
    assert store.loaded_position() == Position(1, 10)


def test_open_sessions_carry_their_start_and_latest_stamps(store):
    """What a restart resumes a session with: activity in receive time, and the start
    row's timestamp and the session's latest timestamp (client clocks, years off)."""
    received, year = T0 + 2 * 365 * 86_400_000_000, 365 * 86_400_000_000

    def row(kind: str, session: str, timestamp: int, at: int) -> Row:
        return make_row(0, received=at)._replace(
            message_id=f"{session}-{kind}-{at}", type=kind, anonymous_id="a",
            session_id=session, timestamp=timestamp)
    store.load([row("session_start", "s1", T0, received), row("track", "s1", T0 + 5, received),
                row("track", "s1", T0 + year, received + 10_000_000),
                row("session_start", "s2", T0, received), row("session_end", "s2", T0, received)],
               Position(1, 1))
    assert store.open_sessions() == [
        ("default", "http", "a", None, "s1", received, received + 10_000_000, 2, T0, T0 + year)]


# --- ingest_seq: the arrival order of every row


def arrival(store: Store) -> list[tuple[str, int]]:
    return store.conn.execute(
        "SELECT message_id, ingest_seq FROM events ORDER BY ingest_seq").fetchall()


def wide_of(*ids: str) -> Columns:
    return Columns(len(ids), [list(ids), "p", "http", "track", "E", None, "a", None, None,
                              None, "s", 1_000, None, None, 1_000, None, None, "{}", None])


def test_ingest_seq_numbers_rows_and_batches_by_column_in_journal_order(store):
    ws = RtColumns("p", "0.a", "s", 1_000, "{}", ["w1", "w2"], ["x", "y"], [5, 6],
                   [None, None], [None, None])
    rows = [make_row(i)._replace(message_id=f"r{i}") for i in range(1, 6)]
    # journaled: r1, W(b1 b2), r2 r3, (an empty batch), C(w1 w2), W(b3), r4 r5
    store.load(rows, Position(1, 10), [wide_of("b1", "b2"), wide_of(), ws, wide_of("b3")],
               rows_before=[1, 3, 3, 3])
    assert arrival(store) == [(m, n) for n, m in enumerate(
        ["r1", "b1", "b2", "r2", "r3", "w1", "w2", "b3", "r4", "r5"], 1)]
    store.load([make_row(9)], Position(1, 20), [wide_of("b9")])  # default: rows first
    assert arrival(store)[-2:] == [("m9", 11), ("b9", 12)]


def test_ingest_seq_continues_after_reopen_and_skips_nothing_for_a_failed_load(tmp_path):
    s = Store(tmp_path / "e.duckdb")
    s.load([make_row(1), make_row(2)], Position(1, 1))
    s.close()
    s = Store(tmp_path / "e.duckdb")
    assert s.last_seq == 2
    with pytest.raises(Exception):  # noqa: B017 (rolled back: DuckDB's own error)
        s.load([make_row(3)], Position("not-a-segment", 2))
    s.load([make_row(4)], Position(1, 3), [wide_of("b5")])
    assert arrival(s) == [("m1", 1), ("m2", 2), ("m4", 3), ("b5", 4)]
    s.close()


V1_EVENTS = ("CREATE TABLE events (" + ", ".join(
    f'"{name}" {sql}' for name, sql in COLUMNS.items()) + ")")  # schema version 1


def test_a_version_1_file_is_migrated_numbering_its_rows_in_stored_order(tmp_path):
    import duckdb
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))  # a file as the first schema made it
    con.execute(V1_EVENTS)
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("CREATE TABLE journal_mark (id INTEGER PRIMARY KEY, segment BIGINT NOT NULL,"
                " byte_offset BIGINT NOT NULL)")
    con.execute("INSERT INTO journal_mark VALUES (1, 4, 400)")
    for i in (3, 1, 2):  # stored in this order (not the order of their ids or times)
        r = make_row(i)
        con.execute(f"INSERT INTO events VALUES ({', '.join(['?'] * len(r))})",
                    [*r[:11], *(str(make_timestamp(t)) if t else None for t in r[11:15]),
                     *r[15:]])
    con.execute("DELETE FROM events WHERE message_id = 'm1'")  # (a gap in rowids)
    con.execute("INSERT INTO events (message_id, project, channel, type, timestamp, "
                "received_at) VALUES ('m4', 'default', 'http', 'track', now(), now())")
    con.close()
    s = Store(path)
    assert arrival(s) == [("m3", 1), ("m2", 2), ("m4", 3)]
    assert s.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
        == (store_mod.SCHEMA_VERSION,)
    assert s.loaded_position() == Position(4, 400)  # the rest of the file is as it was
    s.load([make_row(5)], Position(4, 500))
    assert arrival(s)[-1] == ("m5", 4) and s.count() == 4
    s.close()
    s = Store(path)  # opening it again migrates nothing more
    assert arrival(s) == [("m3", 1), ("m2", 2), ("m4", 3), ("m5", 4)]
    with pytest.raises(Exception, match="NOT NULL"):
        s.conn.execute("INSERT INTO events (project, channel, type, timestamp, received_at) "
                       "VALUES ('p', 'http', 'track', now(), now())")
    s.close()


def make_timestamp(us: int) -> str:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat()


def test_a_file_of_a_newer_schema_is_refused_and_left_alone(tmp_path):
    s = Store(tmp_path / "new.duckdb")
    s.conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    s.close()
    with pytest.raises(store_mod.SchemaError, match="schema version 99"):
        Store(tmp_path / "new.duckdb")
    s = Store(tmp_path / "new.duckdb", read_only=True)
    assert s.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
        == ("99",)
    s.close()


def test_a_migration_cut_after_numbering_finishes_at_the_next_open(tmp_path):
    import duckdb
    path = tmp_path / "cut.duckdb"
    con = duckdb.connect(str(path))
    con.execute(V1_EVENTS)
    con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute("INSERT INTO events (message_id, project, channel, type, timestamp, "
                "received_at) VALUES ('m1', 'p', 'http', 'track', now(), now())")
    con.execute("ALTER TABLE events ADD COLUMN ingest_seq BIGINT")  # the first step, done
    con.execute("UPDATE events SET ingest_seq = 1")
    con.close()
    s = Store(path)
    assert arrival(s) == [("m1", 1)] and s.last_seq == 1
    assert s.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() \
        == (store_mod.SCHEMA_VERSION,)
    assert s.conn.execute("SELECT is_nullable FROM duckdb_columns() WHERE table_name = "
                          "'events' AND column_name = 'ingest_seq'").fetchone() == (False,)
    s.close()


class FailingCommit:
    """A connection whose COMMIT fails as DuckDB's does on a full disk: the transaction is
    already gone, so a ROLLBACK after it fails too ("no transaction is active")."""

    def __init__(self, conn, error: Exception) -> None:
        self.conn = conn
        self.error = error
        self.closed = False

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self.conn.execute("ROLLBACK")
            raise self.error
        batch = sys._getframe(1).f_locals.get("batch")  # noqa: F841 (DuckDB reads it by name)
        return self.conn.execute(sql, *args)

    def close(self) -> None:
        self.closed = True
        self.conn.close()


def test_a_failed_commit_raises_its_own_error_not_the_rollbacks(store):
    import duckdb
    full = duckdb.TransactionException(
        'TransactionContext Error: Failed to commit: Could not write file '
        '"events.duckdb.wal": No space left on device')
    store.conn = FailingCommit(store.conn, full)
    with pytest.raises(duckdb.TransactionException, match="No space left on device"):
        store.load([make_row(1)], Position(1, 10))
    store.conn = store.conn.conn
    store.load([make_row(2)], Position(1, 20))  # the next load works
    assert [r[0] for r in rows_in(store)] == ["m2"]
    assert store.loaded_position() == Position(1, 20)


def test_a_failed_step_of_a_migration_raises_its_own_error(store):
    import duckdb
    store.conn = FailingCommit(store.conn, duckdb.IOException("No space left on device"))
    with pytest.raises(duckdb.IOException, match="No space left on device"):
        store._in_transaction("INSERT OR REPLACE INTO meta VALUES ('x', 'y')")
    store.conn = store.conn.conn


def test_an_invalidated_database_is_reopened_before_the_next_load(tmp_path):
    import duckdb
    store = Store(tmp_path / "events.duckdb")
    store.load([make_row(1)], Position(1, 10))
    broken = FailingCommit(store.conn, duckdb.FatalException(
        "FATAL Error: Failed: database has been invalidated because of a previous fatal "
        "error. The database must be restarted prior to being used again."))
    store.conn = broken
    with pytest.raises(duckdb.FatalException):
        store.load([make_row(2)], Position(1, 20))
    store.load([make_row(3)], Position(1, 30))  # reopened: a new connection
    assert broken.closed and store.conn is not broken
    assert [r[0] for r in rows_in(store)] == ["m1", "m3"]
    assert arrival(store) == [("m1", 1), ("m3", 2)]
    store.close()


class CommitThenFatal(FailingCommit):
    """DuckDB 1.5 on a full disk: the COMMIT is durable, then the automatic checkpoint
    fails and the instance is invalidated (a FatalException from the COMMIT call)."""

    def execute(self, sql, *args):
        if sql == "COMMIT":
            self.conn.execute("COMMIT")
            raise self.error
        batch = sys._getframe(1).f_locals.get("batch")  # noqa: F841 (DuckDB reads it by name)
        return self.conn.execute(sql, *args)


def test_a_load_whose_commit_landed_before_a_fatal_error_is_not_stored_twice(tmp_path):
    """The writer retries a failed load with the same parts first (and maybe more after
    them): those the fatal COMMIT did store are skipped, the rest numbered after them."""
    import duckdb
    store = Store(tmp_path / "events.duckdb")
    store.conn = CommitThenFatal(store.conn, duckdb.FatalException(
        "FATAL Error: Transaction COMMIT succeeded and is durable, but the autocheckpoint "
        "failed. Reopen the database instance to recover."))
    with pytest.raises(duckdb.FatalException):
        store.load([make_row(1)], Position(1, 10), [wide_of("w1")], [1])
    store.list_keys()  # (reopens the file before the retry does)
    store.load([make_row(1), make_row(2)], Position(1, 20),  # the retry, and more
               [wide_of("w1"), wide_of("w2")], [1, 2])
    assert arrival(store) == [("m1", 1), ("w1", 2), ("m2", 3), ("w2", 4)]
    assert store.loaded_position() == Position(1, 20)
    store.close()


def test_a_load_whose_commit_failed_before_a_fatal_error_is_stored_on_retry(tmp_path):
    import duckdb
    store = Store(tmp_path / "events.duckdb")
    store.conn = FailingCommit(store.conn, duckdb.FatalException(
        "FATAL Error: Failed to create checkpoint because of error: Could not write file "
        '"events.duckdb": No space left on device'))
    with pytest.raises(duckdb.FatalException):
        store.load([make_row(1)], Position(1, 10))
    store.load([make_row(1), make_row(2)], Position(1, 20))
    assert arrival(store) == [("m1", 1), ("m2", 2)]
    store.close()


class Invalidated:
    """A connection DuckDB has invalidated: every call fails."""

    def __init__(self, conn) -> None:
        self.conn = conn

    def execute(self, *args):
        raise __import__("duckdb").FatalException(
            "FATAL Error: Failed: database has been invalidated because of a previous fatal "
            "error. The database must be restarted prior to being used again.")

    executemany = cursor = execute

    def close(self) -> None:
        self.conn.close()


def test_key_and_id_calls_reopen_an_invalidated_store(tmp_path):
    import duckdb
    store = Store(tmp_path / "events.duckdb")
    store.conn = Invalidated(store.conn)
    with pytest.raises(duckdb.FatalException):
        store.record_analytics_ids([("id1", T0, "1.2.3.4")])
    store.record_analytics_ids([("id2", T0, "1.2.3.4")])  # reopened first
    key = store.create_key("p")
    assert [k.key for k in store.list_keys()] == [key]
    store.conn = Invalidated(store.conn)
    with pytest.raises(duckdb.FatalException):
        store.list_keys()
    assert store.revoke_key(key)
    assert store.cursor().execute("SELECT analytics_id FROM analytics_ids").fetchall() == [
        ("id2",)]
    store.close()
