"""The DuckDB file: the `events` table, projects and write keys, and the journal mark.

Rules:
- One `Store` (one connection) per process, owned by the writer; its methods run in a
  worker thread, one at a time. Readers go through the server or open read-only.
- `load(rows, position)` inserts columnar (Arrow) and records the journal position in the
  same transaction: a crash either keeps both or neither, so replay is exactly once.
- Every row gets `ingest_seq`, its arrival order: 1, 2, 3, ... in journal order (which is
  acknowledgement order), numbered at load from the last one stored. Loads are exactly
  once and in journal order, so the numbers have no gaps and no repeats, across
  restarts and replays too; nothing about them travels through the journal.
- The schema is migrated on open (`meta.schema_version`); a file of a newer version is
  refused. Version 2 added `ingest_seq`, numbering older rows in their stored order.
- Key management works on a closed server too (the CLI opens the file itself). The
  active write keys are mirrored to `<file>.keys.json` (0600) after every change, so
  a file that had to be quarantined as damaged (startup.py) gives its keys to the new one.
- `checkpoint()` says whether everything committed is in the file itself (the WAL is
  gone or empty afterwards): only then may the journal drop what the mark covers.
- `compact()` rewrites the database into `<file>.compact-tmp` (CHECKPOINT first, then
  ATTACH, COPY FROM DATABASE, DETACH, a check that every table has the same columns and
  rows, fsync) and only then closes the connection and renames it over the file (fsync
  of the directory), then reopens. A kill at any point leaves the old file or the new
  one, whole; a leftover `.compact-tmp` is removed at the next open or compaction.
  Cursors of the closed connection are closed with it (a reader running a statement
  is waited for; its next statement fails).
- Deleting rows keeps the dashboard's rollups (stats.py) true, in the same transaction:
  `forget` drops them (reads are raw until refreshes rebuild them), retention deletes
  their rows of the days it deletes.
- The owner's queries are checked, time-limited and rolled back by query.py.
- A failed transaction raises its own error (a failing ROLLBACK never replaces it). A
  fatal DuckDB error invalidates the instance; the next load (or key, id or query call)
  reopens the file first.
  On a full disk (DuckDB 1.5) a COMMIT fails with "Could not write file ...: No space
  left on device", the transaction is gone and the instance stays usable. A failed
  automatic checkpoint is fatal, possibly after a durable COMMIT: the reopened store
  checks the journal mark and skips the parts of the retried load that landed.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from pathlib import Path
from typing import NamedTuple

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from triolytics.core.journal import Position, fsync_path
from triolytics.core.rows import COLUMNS, Columns, Row, RtColumns
from triolytics.storage import query, stats
from triolytics.storage.query import QueryResult

log = logging.getLogger("triolytics.store")

COMPACT_SUFFIX = ".compact-tmp"  # beside the file: the copy `compact` writes
SCHEMA_VERSION = "2"  # 1: the first; 2: events.ingest_seq
ARRIVAL = "ingest_seq"  # the events column numbering rows in arrival order
FORGET_COLUMNS = {"user": "user_id", "anonymous_id": "anonymous_id",
                  "analytics_id": "anonymous_id"}  # `forget`'s kinds and their column
_ARROW_TYPES = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
}
ARROW_SCHEMA = pa.schema([(name, _ARROW_TYPES[sql]) for name, sql in COLUMNS.items()])
_ROW_TYPE = pa.struct(list(ARROW_SCHEMA))
# Rows arrive without a message id when the client sent none and no answer needed one.
_NAMES = [f'"{name}"' for name in [*COLUMNS, ARRIVAL]]
_EVENTS_COLUMNS = ", ".join([f'"{name}" {sql}' for name, sql in COLUMNS.items()]
                            + [f"{ARRIVAL} BIGINT NOT NULL"])
_INSERT = (f"INSERT INTO events ({', '.join(_NAMES)}) SELECT "
           f"{', '.join(['coalesce(message_id, CAST(uuid() AS VARCHAR))', *_NAMES[1:]])} "
           "FROM batch")


class KeyInfo(msgspec.Struct):
    key: str
    project: str
    created_at: str
    revoked_at: str | None


class Archived(NamedTuple):
    seq_max: int  # the partition holds the day's rows up to this ingest_seq
    partition: str  # its dt= value in the archive (archive.py)


def new_write_key() -> str:
    return "wk_" + secrets.token_urlsafe(24)


ARROW_SLICE_ROWS = 4096  # rows converted per pyarrow call: each call holds the GIL


def rows_to_arrow(rows: list[Row]) -> pa.Table:
    """Rows (tuples) to a columnar table; pyarrow transposes them in C++. In slices:
    one call over 100,000 rows holds the GIL (and stalls the event loop) for ~100 ms."""
    return pa.Table.from_batches(
        [pa.RecordBatch.from_struct_array(pa.array(rows[i:i + ARROW_SLICE_ROWS],
                                                   type=_ROW_TYPE))
         for i in range(0, len(rows), ARROW_SLICE_ROWS)], schema=ARROW_SCHEMA)


_TYPES = ARROW_SCHEMA.types


def _runs(rows_before: list[int], counts: list[int], n: int) -> tuple[list[int], list[int]]:
    """`rows` in runs between batches by column: where each run ends, and how many
    rows of those batches came before it (see `Store.load`)."""
    ends: list[int] = []
    skips: list[int] = []
    done = 0  # rows of batches by column so far
    for before, count in zip(rows_before, counts, strict=True):
        if count and before > (ends[-1] if ends else 0):
            ends.append(before)
            skips.append(done)
        done += count
    if n > (ends[-1] if ends else 0):
        ends.append(n)
        skips.append(done)
    return ends, skips


def wide_to_arrow(parts: list[Columns]) -> pa.Table:
    """`Columns` batches to one table. A column that every batch holds one value of is
    expanded by Arrow (repeated, or run-end decoded when batches differ); otherwise the
    batches' values are joined into one list and converted in slices (each pyarrow call
    holds the GIL)."""
    parts = [p for p in parts if p.count]  # (a run of no rows cannot be run-end encoded)
    if not parts:
        return ARROW_SCHEMA.empty_table()
    counts = [p.count for p in parts]
    n = sum(counts)
    ends = None
    arrays = []
    for i, typ in enumerate(_TYPES):
        values = [p.values[i] for p in parts]
        if list not in set(map(type, values)):
            if values.count(values[0]) == len(values):  # one value for the whole load
                arrays.append(pa.nulls(n, typ) if values[0] is None else
                              pa.repeat(pa.scalar(values[0], typ), n))
                continue
            if ends is None:
                ends = pc.cumulative_sum(pa.array(counts, pa.int64()))
            arrays.append(pc.run_end_decode(
                pa.RunEndEncodedArray.from_arrays(ends, pa.array(values, typ))))
            continue
        joined: list = []
        for v, count in zip(values, counts, strict=True):
            if type(v) is list:
                joined += v
            else:
                joined += [v] * count
        arrays.append(pa.chunked_array(
            [pa.array(joined[j:j + ARROW_SLICE_ROWS], typ)
             for j in range(0, n, ARROW_SLICE_ROWS)], typ))
    return pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA)


def arrival_numbers(counting: pa.Array, first: int, ends: list[int],
                    skips: list[int]) -> pa.Array:
    """Arrival numbers from `first` on for `ends[-1]` rows that arrived in runs, with
    rows of another table in between: the rows before `ends[0]` skip `skips[0]`
    numbers, then those before `ends[1]` skip `skips[1]`, and so on. `counting` is
    0, 1, 2, ... (at least `ends[-1]` long): one C++ add of a slice of it (~2 ns a row)."""
    numbers = counting.slice(0, ends[-1])
    if skips.count(skips[0]) == len(skips):  # one run, or runs back to back
        return pc.add(numbers, pa.scalar(first + skips[0], pa.int64()))
    return pc.add(numbers, pc.run_end_decode(pa.RunEndEncodedArray.from_arrays(
        pa.array(ends, pa.int32()), pa.array([first + k for k in skips], pa.int64()))))


def _invalidates(error: BaseException) -> bool:
    """Whether DuckDB gave up on the database instance after `error` (a FATAL error):
    every later call fails until the file is reopened."""
    return isinstance(error, duckdb.FatalException) or (
        isinstance(error, duckdb.Error) and "database has been invalidated" in str(error))


class SchemaError(Exception):
    """The file was written by a newer version of triolytics."""


class Store:
    def __init__(self, path: str | Path, *, read_only: bool = False, threads: int = 1) -> None:
        self.path = str(path)
        self.read_only = read_only
        self.threads = threads
        self.conn = self._connect()
        self.invalidated = False  # DuckDB refuses every call until the file is reopened
        # (position, rows, batches) of a load that hit a fatal error: committed or not?
        self._doubtful: tuple[Position, int, int] | None = None
        self.last_seq = 0  # the last `ingest_seq` stored (kept by loads, read at open)
        self._counting = pa.array([], pa.int64())  # 0, 1, 2, ...: arrival numbers' base
        if not read_only:
            self._remove_compact_tmp()
            self._create()
            self.last_seq = self._stored_seq()

    def _stored_seq(self) -> int:
        """The last `ingest_seq` stored, read from the store."""
        return self.conn.execute(f"SELECT coalesce(max({ARRIVAL}), 0) FROM events").fetchone()[0]

    def _connect(self) -> duckdb.DuckDBPyConnection:
        conn = duckdb.connect(self.path, read_only=self.read_only, config={
            "threads": self.threads,
            # No SQL (an owner's query naming 'https://...') installs or loads an
            # extension behind our back; what we use (json, parquet, icu) is built in.
            "autoinstall_known_extensions": False, "autoload_known_extensions": False})
        # DuckDB draws a progress bar on stdout for statements past 2 s; its cursors
        # (queries) inherit this.
        conn.execute("SET enable_progress_bar = false")
        return conn

    def close(self) -> None:
        self.conn.close()

    @property
    def wal_path(self) -> Path:
        return Path(self.path + ".wal")

    def checkpoint(self) -> bool:
        """Fold the WAL into the file; True once it is (the WAL is gone or empty). A
        failed checkpoint is fatal to DuckDB: the next call reopens the file."""
        with self._live() as c:
            c.execute("CHECKPOINT")
        try:
            return self.wal_path.stat().st_size == 0
        except FileNotFoundError:
            return True

    def reopen(self) -> None:
        """Close the connection and connect again: after a fatal error DuckDB refuses
        every call on the instance ("database has been invalidated"); a new one replays
        DuckDB's WAL. Raises (and stays invalidated) if the file cannot be opened yet."""
        try:
            self.conn.close()
        except duckdb.Error:
            pass
        self.conn = self._connect()
        self.invalidated = False
        self.last_seq = self._stored_seq()

    def _rollback(self, error: BaseException) -> None:
        """Roll back after `error` without hiding it: DuckDB ends a transaction whose
        COMMIT failed (a full disk: "Failed to commit: Could not write file ... No space
        left on device"), and the ROLLBACK then fails with "no transaction is active"."""
        if _invalidates(error):
            self.invalidated = True
            return
        try:
            self.conn.execute("ROLLBACK")
        except duckdb.Error as exc:
            if _invalidates(exc):
                self.invalidated = True

    def _create(self) -> None:
        """Create what is missing, then migrate what is old."""
        c = self.conn
        c.execute(f"CREATE TABLE IF NOT EXISTS events ({_EVENTS_COLUMNS})")
        c.execute("CREATE TABLE IF NOT EXISTS write_keys (key VARCHAR PRIMARY KEY, "
                  "project VARCHAR NOT NULL, created_at TIMESTAMPTZ NOT NULL, "
                  "revoked_at TIMESTAMPTZ)")
        c.execute("CREATE TABLE IF NOT EXISTS journal_mark (id INTEGER PRIMARY KEY, "
                  "segment BIGINT NOT NULL, byte_offset BIGINT NOT NULL)")
        c.execute("CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        c.execute("CREATE TABLE IF NOT EXISTS analytics_ids (analytics_id VARCHAR PRIMARY KEY, "
                  "issued_at TIMESTAMPTZ NOT NULL, ip VARCHAR)")
        c.execute("CREATE TABLE IF NOT EXISTS archived_days (day DATE PRIMARY KEY, "
                  "rows BIGINT NOT NULL, archived_at TIMESTAMPTZ NOT NULL, "
                  "ingest_seq_max BIGINT NOT NULL)")  # (archive.py)
        # (dt: the day's partition, archive.py; NULL in older files: the day itself)
        c.execute("ALTER TABLE archived_days ADD COLUMN IF NOT EXISTS dt VARCHAR")
        self._migrate()

    def _migrate(self) -> None:
        """Bring the file to `SCHEMA_VERSION`. Each step is a transaction that can be
        interrupted and redone: a step is taken by what the file lacks, not by its number
        (about 1 s per million rows)."""
        c = self.conn
        got = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if got is not None and int(got[0]) > int(SCHEMA_VERSION):
            raise SchemaError(f"{self.path} has schema version {got[0]}; this triolytics "
                              f"knows up to {SCHEMA_VERSION}: upgrade triolytics to open it")
        if got is not None and got[0] == SCHEMA_VERSION:
            return
        nullable = dict(c.execute(
            "SELECT column_name, is_nullable FROM duckdb_columns() WHERE database_name = "
            "current_database() AND schema_name = 'main' AND table_name = 'events'").fetchall())
        c.execute("SET enable_progress_bar = false")  # (a long step would draw one)
        if ARRIVAL not in nullable:  # 1 -> 2: number the rows in their stored order
            self._in_transaction(
                f"ALTER TABLE events ADD COLUMN {ARRIVAL} BIGINT",
                f"UPDATE events SET {ARRIVAL} = o.n FROM (SELECT rowid AS r, row_number() "
                "OVER (ORDER BY rowid) AS n FROM events) AS o WHERE events.rowid = o.r")
        # (a step of its own: DuckDB refuses a constraint over rows updated in the same
        # transaction)
        self._in_transaction(
            *([f"ALTER TABLE events ALTER {ARRIVAL} SET NOT NULL"]
              if nullable.get(ARRIVAL, True) else []),
            f"INSERT OR REPLACE INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}')")
        c.execute("RESET enable_progress_bar")

    def _in_transaction(self, *statements: str) -> None:
        c = self.conn
        c.execute("BEGIN")
        try:
            for sql in statements:
                c.execute(sql)
            c.execute("COMMIT")
        except BaseException as exc:
            self._rollback(exc)
            raise

    # --- events
    def load(self, rows: list[Row], position: Position,
             columns: list[RtColumns | Columns] | None = None,
             rows_before: list[int] | None = None) -> None:
        """Insert rows (and batches by column) and move the journal mark to `position`,
        atomically. They arrived (were journaled) in this order: `rows[:rows_before[0]]`,
        `columns[0]`, `rows[rows_before[0]:rows_before[1]]`, `columns[1]`, ..., the rest
        of `rows`; `ingest_seq` numbers them so, after the last number stored (None:
        every row arrived before `columns`)."""
        if self.invalidated:
            self.reopen()
        if self._doubtful is not None:  # (another call may have reopened the file)
            rows, columns, rows_before = self._not_committed(rows, columns, rows_before)
        wide = [p if type(p) is Columns else p.columns() for p in columns or ()]
        if rows_before is None:
            rows_before = [len(rows)] * len(wide)
        counts = [p.count for p in wide]
        total = len(rows) + sum(counts)
        if len(self._counting) < max(len(rows), sum(counts)):  # (grown rarely: doubled)
            self._counting = pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), max(
                len(rows), sum(counts), 2 * len(self._counting), 1 << 16)), start=-1)
        tables = (rows_to_arrow(rows) if rows else None,
                  wide_to_arrow(wide) if sum(counts) else None)
        attempt = 0
        while True:
            c = self.conn
            c.execute("BEGIN")
            try:
                first = self._first_seq()
                if rows:
                    ends, skips = _runs(rows_before, counts, len(rows))
                    self._insert(tables[0], arrival_numbers(self._counting, first, ends, skips))
                if sum(counts):
                    shown = [(n, before) for n, before in zip(counts, rows_before, strict=True)
                             if n]  # (wide_to_arrow leaves out batches of no rows)
                    self._insert(tables[1], arrival_numbers(
                        self._counting, first, list(accumulate(n for n, _ in shown)),
                        [before for _, before in shown]))
                self._mark(position, first - 1 + total)
                c.execute("COMMIT")
            except BaseException as exc:
                self._rollback(exc)
                if self.invalidated:  # a fatal error: the COMMIT may have landed all the same
                    self._doubtful = (position, len(rows), len(wide))
                elif self._conflicted(exc, attempt):  # (another writer of a shared store)
                    attempt += 1
                    continue
                raise
            break
        self.last_seq = first - 1 + total

    def _first_seq(self) -> int:
        """The first `ingest_seq` of a load, in its transaction."""
        return self.last_seq + 1

    def _mark(self, position: Position, last_seq: int) -> None:
        """Move the journal mark to `position`, in the load's transaction."""
        self.conn.execute("INSERT OR REPLACE INTO journal_mark VALUES (1, ?, ?)", list(position))

    def _conflicted(self, error: BaseException, attempt: int) -> bool:
        """Whether a failed load is to be tried again (a shared store's conflict)."""
        return False

    def _not_committed(self, rows: list[Row], columns, rows_before: list[int] | None):
        """After a reopen: the parts of a load not stored yet. A fatal error can come
        after a durable COMMIT (DuckDB 1.5: "Transaction COMMIT succeeded and is durable,
        but the autocheckpoint failed"); the writer retries that load's parts first, so
        if the mark shows it landed, its rows and batches are skipped here."""
        doubtful, self._doubtful = self._doubtful, None
        if doubtful is None or self.loaded_position() != doubtful[0]:
            return rows, columns, rows_before
        _, n_rows, n_columns = doubtful
        columns = list(columns or ())[n_columns:]
        if rows_before is not None:
            rows_before = [before - n_rows for before in rows_before[n_columns:]]
        return rows[n_rows:], columns, rows_before

    def _insert(self, table: pa.Table, numbers: pa.Array) -> None:
        batch = table.append_column(ARRIVAL, numbers)  # noqa: F841 (read by name in the SQL)
        self.conn.execute(_INSERT)

    def loaded_position(self) -> Position:
        got = self.conn.execute("SELECT segment, byte_offset FROM journal_mark").fetchone()
        return Position(*got) if got else Position(0, 0)

    def recent_ids(self, since_us: int, limit: int) -> list[tuple[str, int]]:
        """(dedup key, received µs) of recently stored events, oldest first."""
        return self.conn.execute(
            "SELECT project || chr(31) || message_id, epoch_us(received_at) AS t FROM ("
            "  SELECT project, message_id, received_at FROM events"
            "  WHERE received_at >= make_timestamptz(?) ORDER BY received_at DESC LIMIT ?"
            ") ORDER BY t", [since_us, limit]).fetchall()

    def open_sessions(self, writer: str | None = None) -> list[tuple]:
        """Sessions with a start and no end: (project, channel, anonymous_id, user_id,
        session_id, started µs, last event µs, events, first µs, latest µs), for resuming
        after a restart. `started` and the last event are receive times; `first` is the
        start row's timestamp and `latest` the latest timestamp of the session's rows.
        `writer`: only those it opened (a lake's rows name their writer)."""
        mine, args = ("", []) if writer is None else (" AND writer = ?", [writer])
        return self.conn.execute(
            "WITH open AS ("
            "  SELECT session_id, project, channel, anonymous_id, user_id,"
            "         epoch_us(received_at) AS started, epoch_us(timestamp) AS first"
            f"  FROM events WHERE type = 'session_start'{mine} AND session_id NOT IN"
            "    (SELECT session_id FROM events WHERE type = 'session_end'))"
            "SELECT o.project, o.channel, o.anonymous_id, o.user_id, o.session_id, o.started,"
            "       epoch_us(max(e.received_at)), count(*) - 1, o.first,"
            "       epoch_us(max(e.timestamp))"
            " FROM open o JOIN events e ON e.session_id = o.session_id"
            " WHERE e.received_at >= (SELECT make_timestamptz(min(started)) FROM open)"
            " GROUP BY ALL", args).fetchall()

    def ended_sessions(self, session_ids: list[str]) -> set[str]:
        """Which of these sessions have a stored `session_end` row."""
        return {r[0] for r in self.conn.execute(
            "SELECT DISTINCT session_id FROM events WHERE type = 'session_end' AND "
            "session_id IN (SELECT unnest(?::VARCHAR[]))", [session_ids]).fetchall()}

    def count(self) -> int:
        return self.conn.execute("SELECT count(*) FROM events").fetchone()[0]

    @contextmanager
    def _live(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The connection for one call: reopened first if a fatal error invalidated it,
        and marked invalidated if this call's error is fatal."""
        if self.invalidated:
            self.reopen()
        try:
            yield self.conn
        except duckdb.Error as exc:
            if _invalidates(exc):
                self.invalidated = True
            raise

    # --- write keys
    def active_keys(self) -> dict[str, str]:
        return dict(self.conn.execute(
            "SELECT key, project FROM write_keys WHERE revoked_at IS NULL").fetchall())

    def create_key(self, project: str, key: str | None = None) -> str:
        key = key or new_write_key()
        with self._live() as c:
            existing = c.execute(
                "SELECT project, revoked_at FROM write_keys WHERE key = ?", [key]).fetchone()
            if existing is not None:
                if existing[0] != project or existing[1] is not None:
                    raise KeyError(f"write key already used by project {existing[0]!r}"
                                   + (" (revoked)" if existing[1] is not None else ""))
                return key
            c.execute("INSERT INTO write_keys VALUES (?, ?, ?, NULL)",
                      [key, project, datetime.now(UTC)])
        self.save_keys()
        return key

    def list_keys(self) -> list[KeyInfo]:
        with self._live() as c:
            rows = c.execute(
                "SELECT key, project, strftime(created_at, '%Y-%m-%dT%H:%M:%SZ'), "
                "strftime(revoked_at, '%Y-%m-%dT%H:%M:%SZ') FROM write_keys "
                "ORDER BY created_at, key").fetchall()
        return [KeyInfo(*r) for r in rows]

    def revoke_key(self, key: str) -> bool:
        with self._live() as c:
            got = c.execute(
                "UPDATE write_keys SET revoked_at = ? WHERE key = ? AND revoked_at IS NULL "
                "RETURNING key", [datetime.now(UTC), key]).fetchall()
        self.save_keys()
        return bool(got)

    @property
    def keys_path(self) -> Path:
        return Path(self.path + ".keys.json")

    def save_keys(self) -> None:
        """Mirror the active keys beside the file (written whole, then renamed). A mirror
        that cannot be written (a full disk) is logged: the keys are in DuckDB."""
        keys = [[k, p] for k, p in sorted(self.active_keys().items())]
        temp = self.keys_path.with_suffix(".tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"keys": keys}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.keys_path)
        except OSError as exc:
            log.warning("could not write the keys mirror %s: %s", self.keys_path, exc)

    def restore_keys(self, path: Path) -> int:
        """Take the keys of a mirror (a quarantined file's); returns how many."""
        try:
            keys = json.loads(path.read_text())["keys"]
        except (OSError, ValueError, KeyError, TypeError):
            return 0
        restored = 0
        for key, project in keys:
            try:
                self.create_key(project, key)
                restored += 1
            except KeyError:
                pass
        return restored

    # --- analytics ids (the real-time API's identities)
    def record_analytics_ids(self, issued: list[tuple[str, int, str | None]]) -> None:
        """(analytics_id, issued µs, client ip) of ids handed out by `POST /create`."""
        with self._live() as c:
            c.executemany("INSERT OR IGNORE INTO analytics_ids "
                          "VALUES (?, make_timestamptz(?), ?)", issued)

    # --- privacy: one person's rows deleted (`triolytics forget`, docs/privacy.md)
    def forget(self, kind: str, value: str, project: str | None) -> tuple[int, int]:
        """Delete every event of one person, and with `kind` "analytics_id" its
        `analytics_ids` record, in one transaction (a crash or a kill deletes all or
        nothing). `kind`: "user" (user_id), "anonymous_id" or "analytics_id" (the
        anonymous_id of a WebSocket's rows). Returns (events, analytics_ids) deleted.
        Logged at INFO: the kind and the counts, never the id."""
        column = FORGET_COLUMNS[kind]
        where, args = f"{column} = ?", [value]
        if project is not None:
            where, args = where + " AND project = ?", [value, project]
        with self._live() as c:
            c.execute("BEGIN")
            try:
                events = c.execute(f"DELETE FROM events WHERE {where}", args).fetchone()[0]
                ids = 0
                if kind == "analytics_id":
                    ids = c.execute("DELETE FROM analytics_ids WHERE analytics_id = ?",
                                    [value]).fetchone()[0]
                if events:  # the rollups may count them: reads are raw until rebuilt
                    stats.drop_rollups(c)
                c.execute("COMMIT")
            except BaseException as exc:
                self._rollback(exc)
                raise
        try:  # the DELETE into the file itself: a WAL set aside later cannot undo it
            self.checkpoint()
        except duckdb.Error as exc:
            log.warning("forget: checkpoint failed (%s); the DELETE is in the WAL", exc)
        log.info("forget --%s%s: deleted %d events, %d analytics_id records",
                 kind.replace("_", "-"), "" if project is None else f" --project {project}",
                 events, ids)
        return events, ids

    # --- archive and retention (archive.py, docs/archive.md)
    def archived_days(self) -> dict[str, Archived]:
        """The archived days (ISO dates): each one's `ingest_seq_max` and partition."""
        with self._live() as c:
            return {d.isoformat(): Archived(seq, dt or d.isoformat()) for d, seq, dt in
                    c.execute("SELECT day, ingest_seq_max, dt FROM archived_days").fetchall()}

    def record_archived(self, dt: str, days: dict[str, int], seq_max: int) -> None:
        """Partition `dt` holds `days` (day -> rows) up to `seq_max`."""
        with self._live() as c:
            c.executemany(
                "INSERT INTO archived_days (day, rows, archived_at, ingest_seq_max, dt) "
                "VALUES (?::DATE, ?, now(), ?, ?) ON CONFLICT (day) DO UPDATE SET "
                "rows = excluded.rows, archived_at = excluded.archived_at, "
                "ingest_seq_max = excluded.ingest_seq_max, dt = excluded.dt "
                "WHERE excluded.ingest_seq_max > archived_days.ingest_seq_max "
                "OR archived_days.dt IS DISTINCT FROM excluded.dt",
                [[day, rows, seq_max, dt] for day, rows in days.items()])

    def delete_days(self, days: list[tuple[str, int | None]]) -> int:
        """Delete the rows of UTC `days` (up to each one's ingest_seq_max; None: all) in
        one transaction, then CHECKPOINT; returns the rows deleted."""
        deleted = 0
        with self._live() as c:
            c.execute("BEGIN")
            try:
                # (each end computed here: DuckDB's `+ INTERVAL 1 DAY` to a TIMESTAMPTZ
                # follows the session's TimeZone, 23 or 25 hours on a DST change)
                spans = [(b, b + timedelta(days=1)) for b in
                         (datetime.fromisoformat(day).replace(tzinfo=UTC) for day, _ in days)]
                for (begins, ends), (_, seq) in zip(spans, days, strict=True):
                    where, args = "timestamp >= ? AND timestamp < ?", [begins, ends]
                    if seq is not None:
                        where, args = where + " AND ingest_seq <= ?", [*args, seq]
                    deleted += c.execute(f"DELETE FROM events WHERE {where}",
                                         args).fetchone()[0]
                stats.trim_rollups(c, spans)
                c.execute("COMMIT")
            except BaseException as exc:
                self._rollback(exc)
                raise
        try:
            self.checkpoint()
        except duckdb.Error as exc:
            log.warning("retention: checkpoint failed (%s); the DELETE is in the WAL", exc)
        return deleted

    # --- size (compact.py, docs/archive.md)
    def free_space(self) -> tuple[int, int, int]:
        """(free blocks, total blocks, file bytes): cheap, DuckDB's own block counts."""
        with self._live() as c:
            free, total = c.execute("SELECT free_blocks, total_blocks FROM pragma_database_size() "
                                    "WHERE database_name = current_database()").fetchone()
        return free, total, os.path.getsize(self.path)

    @property
    def compact_path(self) -> Path:
        return Path(self.path + COMPACT_SUFFIX)

    def _remove_compact_tmp(self) -> None:
        for leftover in (self.compact_path, Path(f"{self.compact_path}.wal")):
            leftover.unlink(missing_ok=True)

    def compact(self) -> tuple[int, int]:
        """Rewrite the database into a new file and swap it in (see Rules); returns the
        file's bytes before and after. On an error the old file stays in use."""
        before = os.path.getsize(self.path)
        self._remove_compact_tmp()
        if not self.checkpoint():  # (everything committed must be in the file copied)
            raise RuntimeError("compaction: the WAL is not empty after a CHECKPOINT")
        quoted = str(self.compact_path).replace("'", "''")
        with self._live() as c:
            old = c.execute("SELECT current_database()").fetchone()[0]
            c.execute(f"ATTACH '{quoted}' AS compact_new")
            try:
                c.execute(f'COPY FROM DATABASE "{old}" TO compact_new')
                if self._contents(old) != self._contents("compact_new"):
                    raise RuntimeError("compaction: the copy differs from the database")
            except BaseException:
                with suppress(duckdb.Error):
                    c.execute("DETACH compact_new")
                self._remove_compact_tmp()
                raise
            c.execute("DETACH compact_new")  # (checkpoints the copy into its file)
        try:
            if Path(f"{self.compact_path}.wal").exists():
                raise RuntimeError("compaction: the copy kept a WAL")
            fsync_path(self.compact_path)
            self.conn.close()
            self.invalidated = True  # until reopened (a failed reopen: the next call's)
            if self.wal_path.exists() and self.wal_path.stat().st_size:
                raise RuntimeError("compaction: the file has a WAL after closing")
        except BaseException:
            self._remove_compact_tmp()
            raise
        os.replace(self.compact_path, self.path)
        fsync_path(Path(self.path).parent)
        self.reopen()
        return before, os.path.getsize(self.path)

    def _contents(self, database: str) -> tuple[list[tuple], list[tuple]]:
        """Every table's columns (names, types, NOT NULL) and rows, and its constraints."""
        c = self.conn
        constraints = c.execute(
            "SELECT schema_name, table_name, list(constraint_text ORDER BY constraint_text) "
            "FROM duckdb_constraints() WHERE database_name = ? GROUP BY ALL ORDER BY ALL",
            [database]).fetchall()
        tables = c.execute(
            "SELECT schema_name, table_name, list(column_name || ' ' || data_type || ' ' || "
            "is_nullable ORDER BY column_index) FROM duckdb_columns() WHERE database_name = ? "
            "GROUP BY ALL ORDER BY ALL", [database]).fetchall()
        return [(*t, c.execute(f'SELECT count(*) FROM "{database}"."{t[0]}"."{t[1]}"')
                 .fetchone()[0]) for t in tables], constraints

    # --- reading
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own for a reader: queries then run beside loads."""
        with self._live() as c:
            return c.cursor()

    def query(self, sql: str, max_rows: int, *, timeout_s: float,
              cursor: duckdb.DuckDBPyConnection | None = None) -> QueryResult:
        """Run one read-only statement on a cursor of its own (closed after), stopped
        after `timeout_s`; at most `max_rows` rows. Raises QueryError (query.py)."""
        return query.run(cursor or self.conn.cursor(), sql, max_rows, timeout_s)
