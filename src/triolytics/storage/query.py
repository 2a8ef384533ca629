"""The owner's SQL: one read statement, classified by DuckDB's own parser, run with a
time limit in a transaction that is rolled back.

Rules:
- Nothing runs before `check` has parsed the text: a syntax error is `query_syntax`
  with DuckDB's message; a statement that is not a read is `query_not_read_only` and
  named by its parsed type (`WITH x AS (SELECT 1) DELETE ...` is a DELETE, whatever its
  first word); EXPLAIN is a read when the statement it explains is one (EXPLAIN ANALYZE
  runs it); exactly one statement. A read's table functions must be in
  `TABLE_FUNCTIONS`: some SELECTs act beyond the rollback (`enable_logging(...)` sets a
  global and writes log files anywhere; `checkpoint()`; `query('...')` runs text this
  check cannot see), and an extension loaded later may add more.
- What runs is the checked statement object, never the text parsed again.
- Its transaction is rolled back whatever happens: a second guard, for whatever the
  checks above miss (`nextval` of a sequence, say). It undoes changes to the database
  only, not files or settings: those the checks must stop.
- The time limit lives in one place, `_Deadline`: a timer thread interrupts the cursor
  if the statement is still running at the deadline (`query_timeout`), never after it
  has returned, so the interrupt cannot hit the rollback or a later statement.
- External access stays on: loads read Arrow tables by replacement scan, and planned
  exports write files (docs/api.md, "Queries", says why and what a query can read). Nothing a
  query names can install or load a DuckDB extension (`Store` turns auto-install and
  auto-load off; LOAD and INSTALL are refused here).
"""

from __future__ import annotations

import json
import re
import threading

import duckdb
import msgspec

StatementType = duckdb.StatementType
READ = StatementType.SELECT  # SELECT, WITH ... SELECT, FROM, VALUES, DESCRIBE, SHOW,
# SUMMARIZE, PIVOT ... IN (...), and the PRAGMAs DuckDB rewrites to a SELECT
READ_FORMS = "SELECT, WITH … SELECT, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN"
# What a refused type is called when its name alone would mislead.
LABELS = {
    StatementType.LOAD: "LOAD/INSTALL",
    StatementType.SET: "SET/RESET/USE (or a PRAGMA that sets)",
    StatementType.VACUUM: "VACUUM/ANALYZE",
    StatementType.CALL: "CALL/CHECKPOINT",
    StatementType.TRANSACTION: "BEGIN/COMMIT/ROLLBACK",
    StatementType.PRAGMA: "PRAGMA",
}


# Table functions a query may call: they read and change nothing. Any other (DuckDB's
# `checkpoint`, `enable_logging`, `enable_profiling`, `query`, `query_table`,
# `json_execute_serialized_sql`, `arrow_scan`, `pandas_scan`, ... or an extension's) is
# query_not_read_only. Those marked "files" read files the server's OS user can read.
TABLE_FUNCTIONS = frozenset({
    "range", "generate_series", "unnest", "repeat", "repeat_row", "summary",
    "json_each", "json_tree", "histogram", "histogram_values", "test_all_types",
    "test_vector_types", "pg_timezone_names", "icu_calendar_names", "which_secret",
    # the catalog and the database's own state
    "duckdb_approx_database_count", "duckdb_columns", "duckdb_connection_count",
    "duckdb_constraints", "duckdb_coordinate_systems", "duckdb_databases",
    "duckdb_dependencies", "duckdb_extensions", "duckdb_external_file_cache",
    "duckdb_functions", "duckdb_indexes", "duckdb_keywords", "duckdb_log_contexts",
    "duckdb_logs", "duckdb_logs_parsed", "duckdb_memory", "duckdb_optimizers",
    "duckdb_profiling_settings",
    "duckdb_prepared_statements", "duckdb_schemas", "duckdb_secret_types",
    "duckdb_secrets", "duckdb_sequences", "duckdb_settings", "duckdb_table_sample",
    "duckdb_tables", "duckdb_temporary_files", "duckdb_types", "duckdb_variables",
    "duckdb_views", "pragma_collations", "pragma_database_size", "pragma_metadata_info",
    "pragma_platform", "pragma_show", "pragma_storage_info", "pragma_table_info",
    "pragma_user_agent", "pragma_version",
    # files
    "read_csv", "read_csv_auto", "sniff_csv", "read_parquet", "parquet_scan",
    "parquet_metadata", "parquet_file_metadata", "parquet_full_metadata",
    "parquet_kv_metadata", "parquet_schema", "parquet_bloom_probe", "read_json",
    "read_json_auto", "read_json_objects", "read_json_objects_auto", "read_ndjson",
    "read_ndjson_auto", "read_ndjson_objects", "read_text", "read_blob", "glob",
    "read_duckdb",
})
INSPECT = "SELECT json_serialize_sql(?)"  # a SELECT's syntax tree, as JSON


class QueryError(Exception):
    """A query refused or failed; `code` is its `core.errors` code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class QueryResult(msgspec.Struct):
    columns: list[str]
    rows: list[list]
    truncated: bool


def one_line(message: str) -> str:
    """DuckDB's message on one line, without its `LINE n: ...` / caret excerpt."""
    lines = message.splitlines()
    kept = [s.strip() for i, s in enumerate(lines)
            if s.strip() and not s.startswith("LINE ")
            and not (i and lines[i - 1].startswith("LINE ") and s.strip() == "^")]
    return " ".join(kept)


def check(conn: duckdb.DuckDBPyConnection, sql: str) -> duckdb.Statement:
    """The one read statement in `sql`, parsed; else raise QueryError. Runs nothing."""
    try:
        statements = conn.extract_statements(sql)
    except duckdb.ParserException as exc:
        message = one_line(str(exc))  # DuckDB's, saying "syntax error" when it is one
        if "syntax error" not in message:
            message = f"syntax error: {message}"
        raise QueryError("query_syntax", message) from None
    except duckdb.Error as exc:  # IMPORT DATABASE reads its files while parsing
        raise QueryError("query_failed", one_line(str(exc))) from None
    if not statements:
        raise QueryError("query_syntax", "no statement: send one read-only statement")
    writes = [s for s in statements if s.type not in (READ, StatementType.EXPLAIN)]
    if writes:  # named by the first the sender wrote (not one the parser added)
        write = next((s for s in writes if s.query), writes[0])
        raise QueryError("query_not_read_only", _refusal(write, statements))
    if len(statements) > 1:
        raise QueryError("query_not_read_only", f"only one statement is allowed, got "
                         f"{len(statements)}")
    if statements[0].type == StatementType.EXPLAIN:
        check(conn, _explained(statements[0].query))
    else:
        _check_table_functions(conn, statements[0].query)
    return statements[0]


def _check_table_functions(conn: duckdb.DuckDBPyConnection, text: str) -> None:
    """Refuse a read whose table functions are not all in TABLE_FUNCTIONS (or whose
    syntax tree DuckDB cannot show)."""
    tree = json.loads(conn.execute(INSPECT, [text]).fetchone()[0])
    if tree.get("error"):
        raise QueryError("query_not_read_only", "this statement cannot be inspected: "
                         + str(tree.get("error_message", "")))
    called: list[str] = []
    _walk(tree, called)
    for name in called:
        if name.lower() not in TABLE_FUNCTIONS:
            raise QueryError("query_not_read_only", f"table function {name}() is not "
                             f"allowed: queries are read-only (docs/api.md lists the "
                             f"table functions they may call)")


def _walk(node, called: list[str]) -> None:
    if isinstance(node, dict):
        if node.get("type") == "TABLE_FUNCTION" and isinstance(node.get("function"), dict):
            called.append(node["function"].get("function_name", "?"))
        for value in node.values():
            _walk(value, called)
    elif isinstance(node, list):
        for value in node:
            _walk(value, called)


def _refusal(statement: duckdb.Statement, statements: list[duckdb.Statement]) -> str:
    name = statement.type.name
    label = LABELS.get(statement.type, name.replace("_", " "))
    if not name.replace("_", "").isalpha():  # a type the Python enum does not name
        label = " ".join(statement.query.split()[:2]).upper() or "this statement"
    expanded = ""
    if not statement.query:  # made by the parser from what was sent (PIVOT without IN)
        expanded = (" (the statement expands to "
                    + ", ".join(s.type.name for s in statements) + ")")
    return f"{label} is not allowed{expanded}: queries are read-only ({READ_FORMS})"


_WORD = re.compile(r"\w+|\S")


def _explained(text: str) -> str:
    """The statement an EXPLAIN explains: past `EXPLAIN`, `ANALYZE` and `(options)`.
    Anything unexpected leaves text that does not parse as a read, so it is refused."""
    tokens = [offset for offset, _ in duckdb.tokenize(text)]

    def word(i: int) -> str:
        return _WORD.match(text, tokens[i]).group().upper() if i < len(tokens) else ""

    if word(0) != "EXPLAIN":
        return ""
    i = 1
    if word(i) in ("ANALYZE", "ANALYSE"):
        i += 1
    if word(i) == "(":
        depth = 0
        while i < len(tokens):
            depth += {"(": 1, ")": -1}.get(word(i), 0)
            i += 1
            if depth == 0:
                break
    return text[tokens[i]:] if i < len(tokens) else ""


class _Deadline:
    """Interrupts `conn` if the statement is still running `timeout_s` from entry."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, timeout_s: float) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.running = True
        self.fired = False
        self.timer = threading.Timer(timeout_s, self._fire)
        self.timer.daemon = True

    def __enter__(self) -> _Deadline:
        self.timer.start()
        return self

    def _fire(self) -> None:
        with self.lock:
            if self.running:
                self.fired = True
                self.conn.interrupt()

    def __exit__(self, *exc_info) -> None:
        with self.lock:
            self.running = False
        self.timer.cancel()


def run(conn: duckdb.DuckDBPyConnection, sql: str, max_rows: int,
        timeout_s: float) -> QueryResult:
    """Check `sql`, run it on `conn` (a cursor of its own) in a transaction that is
    rolled back, and return at most `max_rows` rows; raise QueryError. Closes `conn`."""
    try:
        statement = check(conn, sql)
        conn.execute("BEGIN")
        try:
            with _Deadline(conn, timeout_s) as deadline:
                result = conn.execute(statement)
                columns = [d[0] for d in result.description or []]
                rows = result.fetchmany(max_rows + 1)
        except duckdb.InterruptException:
            if deadline.fired:
                raise QueryError("query_timeout", f"the query ran longer than "
                                 f"query_timeout_s ({timeout_s:g} s) and was stopped") from None
            raise
        finally:
            _rollback(conn)
    except duckdb.Error as exc:
        raise QueryError("query_failed", one_line(str(exc))) from None
    finally:
        conn.close()
    return QueryResult(columns, [list(r) for r in rows[:max_rows]], len(rows) > max_rows)


def _rollback(conn: duckdb.DuckDBPyConnection) -> None:
    """Undo whatever the statement did. Should ROLLBACK itself fail, closing the cursor
    (which `run` does next) discards the transaction all the same."""
    try:
        conn.execute("ROLLBACK")
    except duckdb.Error:
        pass
