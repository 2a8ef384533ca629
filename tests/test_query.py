"""query.py against a DuckDB file: what is refused before it runs, with which code, and
the time limit that interrupts a slow query."""

from __future__ import annotations

import re
import time

import duckdb
import pytest
from test_store import make_row

from triolytics.core.errors import STATUS
from triolytics.core.journal import Position
from triolytics.storage import query
from triolytics.storage.query import QueryError
from triolytics.storage.store import Store

# About 10^9 row pairs: seconds to tens of seconds on one DuckDB thread.
SLOW = "SELECT count(*) FROM range(1000000) a(x), range(1000) b(y) WHERE x + y < 0"


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where a refused COPY or EXPORT would have written
    s = Store(tmp_path / "events.duckdb")
    s.load([make_row(1), make_row(2), make_row(3)], Position(1, 10))
    yield s
    s.close()


class Spy:
    """A cursor that records every statement it is asked to execute, and interrupts."""

    def __init__(self, conn: duckdb.DuckDBPyConnection) -> None:
        self.conn = conn
        self.executed: list = []
        self.interrupts = 0

    def __getattr__(self, name: str):
        return getattr(self.conn, name)

    def execute(self, what, *args):
        self.executed.append(what)
        return self.conn.execute(what, *args)

    def interrupt(self) -> None:
        self.interrupts += 1
        self.conn.interrupt()


def refused(store: Store, sql: str, **kwargs) -> tuple[QueryError, Spy]:
    spy = Spy(store.cursor())
    with pytest.raises(QueryError) as got:
        query.run(spy, sql, 10, kwargs.get("timeout_s", 5.0))
    return got.value, spy


def test_every_code_has_a_status():
    for code in ("query_syntax", "query_not_read_only", "query_failed", "query_timeout"):
        assert STATUS[code] in (400, 503)


def test_a_syntax_error_says_so_in_duckdbs_words(store):
    error, spy = refused(store, "SELEC 1")
    assert error.code == "query_syntax"
    assert error.message == 'Parser Error: syntax error at or near "SELEC"'
    assert spy.executed == []


def test_a_parser_error_that_does_not_say_syntax_error_is_prefixed(store):
    error, _ = refused(store, "SELECT 'unterminated")
    assert error.code == "query_syntax"
    assert error.message.startswith("syntax error: Parser Error: unterminated quoted string")


@pytest.mark.parametrize("sql", ["", ";", "  -- only a comment"])
def test_no_statement_is_refused(store, sql):
    error, spy = refused(store, sql)
    assert (error.code, spy.executed) == ("query_syntax", [])


def test_with_delete_is_a_delete_refused_before_it_runs(store):
    error, spy = refused(store, "WITH x AS (SELECT 1) DELETE FROM events")
    assert error.code == "query_not_read_only"
    assert error.message.startswith("DELETE is not allowed: queries are read-only (SELECT")
    assert spy.executed == []  # not even BEGIN: nothing ran
    assert store.count() == 3


WRITES = [
    ("INSERT INTO events (message_id) VALUES ('x')", "INSERT"),
    ("INSERT INTO events (message_id) VALUES ('x') RETURNING *", "INSERT"),
    ("UPDATE events SET event = 'x'", "UPDATE"),
    ("DELETE FROM events", "DELETE"),
    ("WITH x AS (SELECT 1) DELETE FROM events", "DELETE"),
    ("MERGE INTO events USING (SELECT 'm1' AS id) s ON events.message_id = s.id "
     "WHEN MATCHED THEN DELETE", "MERGE INTO"),
    ("CREATE TABLE t AS SELECT * FROM events", "CREATE"),
    ("CREATE SECRET (TYPE s3)", "CREATE"),
    ("DROP TABLE events", "DROP"),
    ("ALTER TABLE events ADD COLUMN x INTEGER", "ALTER"),
    ("COMMENT ON TABLE events IS 'x'", "ALTER"),
    ("COPY events TO 'x.csv'", "COPY"),
    ("COPY events FROM 'x.csv'", "COPY"),
    ("EXPORT DATABASE 'dump'", "EXPORT"),
    ("ATTACH 'other.duckdb'", "ATTACH"),
    ("DETACH other", "DETACH"),
    ("INSTALL httpfs", "LOAD/INSTALL"),
    ("LOAD httpfs", "LOAD/INSTALL"),
    ("SET threads = 4", "SET/RESET/USE (or a PRAGMA that sets)"),
    ("RESET threads", "SET/RESET/USE (or a PRAGMA that sets)"),
    ("USE memory", "SET/RESET/USE (or a PRAGMA that sets)"),
    ("PRAGMA threads = 4", "SET/RESET/USE (or a PRAGMA that sets)"),
    ("PRAGMA force_checkpoint", "PRAGMA"),
    ("CHECKPOINT", "CALL/CHECKPOINT"),
    ("CALL pragma_version()", "CALL/CHECKPOINT"),
    ("VACUUM", "VACUUM/ANALYZE"),
    ("ANALYZE", "VACUUM/ANALYZE"),
    ("BEGIN", "BEGIN/COMMIT/ROLLBACK"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("EXECUTE p", "EXECUTE"),
    ("UPDATE EXTENSIONS", "UPDATE EXTENSIONS"),
    ("EXPLAIN ANALYZE DELETE FROM events", "DELETE"),  # EXPLAIN ANALYZE runs it
    ("EXPLAIN DELETE FROM events", "DELETE"),
    ("EXPLAIN -- a comment\n ANALYSE INSERT INTO events (message_id) VALUES (1)", "INSERT"),
    ("EXPLAIN /* a comment */ (ANALYZE, FORMAT json) UPDATE events SET event = 'x'",
     "UPDATE"),
    ("PIVOT events ON type", "CREATE"),  # makes an enum type first: expands to two
    ("COPY FROM DATABASE memory TO other", "COPY DATABASE"),  # expands to four
]


@pytest.mark.parametrize("sql,label", WRITES)
def test_every_write_is_refused_by_name_before_it_runs(store, tmp_path, sql, label):
    error, spy = refused(store, sql)
    assert error.code == "query_not_read_only"
    assert error.message.startswith(label + " is not allowed")
    assert "read-only" in error.message
    assert spy.executed == []
    assert store.count() == 3
    assert {p.name for p in tmp_path.iterdir()} <= {"events.duckdb", "events.duckdb.wal"}


@pytest.mark.parametrize("sql", [
    "SELECT * FROM enable_logging(storage = 'file', storage_path = 'logs')",
    "FROM checkpoint()",
    "SELECT * FROM main.force_checkpoint()",
    "SELECT (SELECT count(*) FROM enable_profiling())",
    "WITH q AS (FROM events, LATERAL (SELECT * FROM disable_logging())) FROM q",
    "SELECT * FROM query('SELECT 1')",
    "FROM query_table('events')",
    "SELECT * FROM json_execute_serialized_sql('{}')",
    "SELECT * FROM arrow_scan(0, 0, 0)",
    "EXPLAIN ANALYZE SELECT * FROM enable_logging(storage = 'file', storage_path = 'logs')",
])
def test_a_read_that_calls_a_table_function_not_listed_is_refused(store, tmp_path, sql):
    """These SELECTs act beyond the rollback (a global setting, log files written
    anywhere, a checkpoint) or run SQL or memory the check cannot see."""
    error, spy = refused(store, sql)
    assert error.code == "query_not_read_only"
    assert re.match(r"table function \w+\(\) is not allowed: queries are read-only",
                    error.message)
    assert set(spy.executed) <= {query.INSPECT}  # the statement itself never ran
    assert not (tmp_path / "logs").exists()
    assert store.conn.execute("SELECT current_setting('enable_logging')").fetchone() == (
        False,)


# DuckDB's table functions (and table macros) that queries may not call, and why.
REFUSED_TABLE_FUNCTIONS = {
    "checkpoint": "writes the file", "force_checkpoint": "writes the file",
    "enable_logging": "global setting; log files anywhere", "disable_logging": "global",
    "truncate_duckdb_logs": "deletes logs", "enable_profiling": "setting; output file",
    "disable_profiling": "setting", "query": "runs SQL from a string",
    "query_table": "runs SQL from a string", "json_execute_serialized_sql": "runs SQL",
    "arrow_scan": "reads memory at an address", "arrow_scan_dumb": "same",
    "pandas_scan": "same", "python_map_function": "runs Python", "seq_scan": "internal",
}


def test_every_table_function_of_this_duckdb_is_allowed_or_refused_on_purpose(store):
    """A DuckDB upgrade that adds a table function fails here until it is placed."""
    present = {name for (name,) in store.conn.execute(
        "SELECT DISTINCT function_name FROM duckdb_functions() "
        "WHERE function_type IN ('table', 'table_macro')").fetchall()}
    assert query.TABLE_FUNCTIONS <= present  # no typo in the list
    assert query.TABLE_FUNCTIONS.isdisjoint(REFUSED_TABLE_FUNCTIONS)
    assert present - query.TABLE_FUNCTIONS == set(REFUSED_TABLE_FUNCTIONS)


def test_a_read_may_read_a_file(store, tmp_path):
    """External access stays on (docs/api.md, "Queries"): the owner's query may read
    files the server's OS user can read."""
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    got = store.query(f"SELECT * FROM read_csv('{tmp_path / 'x.csv'}')", 10, timeout_s=5.0)
    assert (got.columns, got.rows) == (["a", "b"], [[1, 2]])


@pytest.mark.parametrize("sql,message", [
    ("SELECT 1; SELECT 2", "only one statement is allowed, got 2"),
    ("SELECT 1; DELETE FROM events", "DELETE is not allowed"),
])
def test_more_than_one_statement_is_refused(store, sql, message):
    error, spy = refused(store, sql)
    assert error.code == "query_not_read_only"
    assert error.message.startswith(message)
    assert spy.executed == []
    assert store.count() == 3


@pytest.mark.parametrize("sql", [
    "SELECT count(*) FROM events",
    "select count(*) from events;",
    "WITH e AS (SELECT * FROM events) SELECT count(*) FROM e",
    "FROM events SELECT count(*)",
    "VALUES (1)",
    "DESCRIBE events",
    "SHOW TABLES",
    "SUMMARIZE events",
    "PRAGMA table_info('events')",
    "EXPLAIN SELECT count(*) FROM events",
    "EXPLAIN ANALYZE SELECT count(*) FROM events",
    "EXPLAIN (FORMAT json) SELECT 1",
    "PIVOT events ON type IN ('track')",
    "-- a comment first\nSELECT 1",
])
def test_reads_still_work(store, sql):
    got = store.query(sql, 100, timeout_s=5.0)
    assert got.columns and got.rows


def test_query_returns_columns_rows_and_truncation(store):
    got = store.query("SELECT message_id, event FROM events ORDER BY message_id;", 2,
                      timeout_s=5.0)
    assert (got.columns, got.rows, got.truncated) == (
        ["message_id", "event"], [["m1", "E1"], ["m2", "E2"]], True)
    assert store.query("SELECT count(*) AS n FROM events", 2, timeout_s=5.0).rows == [[3]]


def test_a_read_duckdb_refuses_while_running_is_query_failed(store):
    with pytest.raises(QueryError) as got:
        store.query("SELECT no_such_column FROM events", 10, timeout_s=5.0)
    assert got.value.code == "query_failed"
    assert "no_such_column" in got.value.message
    assert "\n" not in got.value.message


def test_the_rollback_still_guards_a_write_that_slipped_past_the_check(store, monkeypatch):
    def lax(conn, sql):
        return conn.extract_statements(sql)[0]
    monkeypatch.setattr(query, "check", lax)
    got = store.query("DELETE FROM events", 10, timeout_s=5.0)
    assert got.rows == [[3]]  # DuckDB reports the rows it deleted...
    assert store.count() == 3  # ...in a transaction that was rolled back


def test_a_slow_query_is_interrupted_at_its_deadline(store):
    started = time.monotonic()
    with pytest.raises(QueryError) as got:
        store.query(SLOW, 10, timeout_s=0.2)
    took = time.monotonic() - started
    assert got.value.code == "query_timeout"
    assert "query_timeout_s (0.2 s)" in got.value.message
    assert 0.2 <= took < 2.0  # the query alone runs for seconds
    # the store is free again: loads and queries go on
    store.load([make_row(4)], Position(1, 20))
    assert store.query("SELECT count(*) FROM events", 10, timeout_s=5.0).rows == [[4]]


def test_a_query_that_ends_in_time_is_not_interrupted_later(store):
    spy = Spy(store.cursor())
    assert query.run(spy, "SELECT 1", 10, 0.05).rows == [[1]]
    time.sleep(0.2)  # past the deadline: the timer ended with the statement
    assert spy.interrupts == 0
    assert spy.executed[-1] == "ROLLBACK"


def test_the_deadline_interrupts_the_statements_cursor_once(store):
    spy = Spy(store.cursor())
    with pytest.raises(QueryError):
        query.run(spy, SLOW, 10, 0.2)
    assert spy.interrupts == 1


def test_no_query_installs_or_loads_an_extension(store):
    with pytest.raises(QueryError) as got:
        store.query("SELECT * FROM read_csv('https://example.com/x.csv')", 10,
                    timeout_s=5.0)
    assert got.value.code == "query_failed"
    assert "requires the extension httpfs to be loaded" in got.value.message


def test_queries_draw_no_progress_bar(store):
    # DuckDB would draw one on stdout past 2 s (into `triolytics query --json`).
    assert store.cursor().execute(
        "SELECT current_setting('enable_progress_bar')").fetchone() == (False,)
