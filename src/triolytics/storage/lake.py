"""`store = "ducklake"`: the same tables in a DuckLake (Parquet data files, a catalog in
PostgreSQL, or in a local DuckDB file for one process), written by many writers at once.

Rules:
- DuckDB's `ducklake` and `postgres_scanner` extensions come from their PyPI wheels
  (`pip install 'triolytics[lake]'`) and are loaded from site-packages by path; nothing
  is ever downloaded at run time (autoinstall and autoload stay off).
- One `LakeStore` per writer (a worker of a node). Each writer keeps its own journal and
  its own mark: `journal_marks` has a row per writer, moved in the load's transaction,
  so each journal is loaded exactly once, as with the file.
- `ingest_seq` stays one arrival order for the whole lake, without gaps or repeats:
  a load reads `lake_seq` and sets it past its rows in its own transaction. Two writers
  that load at once both update that row; DuckLake refuses the second commit
  ("Transaction conflict"), and the load is tried again from BEGIN (at most
  `ducklake_load_retries` times, with a growing pause). Loads are serialised, which is
  what archive's and the rollups' watermarks need: a row with a lower number never
  commits after one with a higher number. DuckLake's own retries
  (`ducklake_max_retry_count`) cover the commits that only race for a snapshot id.
- Every event row also names its `writer`: after a restart a writer resumes only the
  sessions it opened (`open_sessions`), never another writer's.
- DuckLake has no primary keys, so upserts are MERGE or UPDATE/INSERT; the tables are
  otherwise those of the file (store.py), at `SCHEMA_VERSION`.
- A commit is durable once the catalog's transaction is (PostgreSQL's commit, or the
  local catalog file's) and its Parquet files are on disk: DuckLake does not sync those,
  so `checkpoint()` (before the journal drops a segment) syncs a local data path's file
  system. `compact()` is DuckLake's maintenance: small files merged,
  inlined rows flushed to Parquet, snapshots older than `ducklake_snapshot_keep_s`
  expired and their files deleted (docs/scaling.md).
- Cursors (readers) start in the lake (`USE`), so every query names the same tables.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import duckdb

from triolytics.core.config import postgres_dsn
from triolytics.core.journal import Position
from triolytics.storage import store as file_store
from triolytics.storage.store import ARRIVAL, SCHEMA_VERSION, Store

log = logging.getLogger("triolytics.store")

LAKE = "lake"  # the attached DuckLake's name in each connection
EXTENSIONS = (("duckdb_extension_postgres_scanner", "postgres_scanner"),
              ("duckdb_extension_ducklake", "ducklake"))
# PostgreSQL's words when two writers create a new catalog's tables at once
_RACE = re.compile(r"duplicate key value violates unique constraint|already exists")
ATTACH_TRIES = 10
_CONFLICT = re.compile(r"[Cc]onflict")
_INSERT = file_store._INSERT.replace(
    f'"{ARRIVAL}") SELECT', f'"{ARRIVAL}", writer) SELECT').replace(
    " FROM batch", ", ? FROM batch")


class LakeError(Exception):
    """The lake cannot be used as configured (an extension missing, a bad catalog)."""


def extension_path(module: str, name: str) -> str:
    """The `.duckdb_extension` file a PyPI wheel ships for this DuckDB version."""
    try:
        mod = __import__(module)
    except ModuleNotFoundError as exc:
        raise LakeError(f"store = \"ducklake\" needs DuckDB's {name} extension: pip install "
                        "'triolytics[lake]' (or `make run`, which installs it)") from exc
    found = Path(mod.__file__).parent / "extensions" / f"v{duckdb.__version__}" / \
        f"{name}.duckdb_extension"
    if not found.exists():
        have = sorted(p.name for p in (Path(mod.__file__).parent / "extensions").iterdir())
        raise LakeError(f"the {name} extension installed is built for DuckDB {', '.join(have)}, "
                        f"not v{duckdb.__version__}: install the matching version")
    return str(found)


def attach_sql(catalog: str, data_path: str, read_only: bool = False) -> str:
    """`ATTACH` of the lake: `catalog` is a PostgreSQL URL or libpq string (postgresql://,
    postgres:...) or a local file path (one process only)."""
    dsn = postgres_dsn(catalog)
    target = str(Path(catalog).expanduser()) if dsn is None else "postgres:" + dsn
    options = [f"DATA_PATH {_quote(data_path.rstrip('/') + '/')}"]
    if read_only:
        options.append("READ_ONLY")
    return f"ATTACH {_quote('ducklake:' + target)} AS {LAKE} ({', '.join(options)})"


def is_postgres(catalog: str) -> bool:
    """Whether `catalog` names a PostgreSQL database (else a local file)."""
    return postgres_dsn(catalog) is not None


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def connect(catalog: str, data_path: str, *, read_only: bool = False, threads: int = 1,
            retries: int = 100) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection (in memory) with the lake attached and in use."""
    conn = duckdb.connect(":memory:", config={
        "threads": threads, "autoinstall_known_extensions": False,
        "autoload_known_extensions": False})
    try:
        for module, name in EXTENSIONS:
            conn.execute(f"LOAD {_quote(extension_path(module, name))}")
        conn.execute("SET enable_progress_bar = false")
        conn.execute(f"SET ducklake_max_retry_count = {int(retries)}")
        if not is_postgres(catalog) and not read_only:
            Path(catalog).expanduser().parent.mkdir(parents=True, exist_ok=True)
        if "://" not in data_path and not read_only:
            Path(data_path).mkdir(parents=True, exist_ok=True)
        for attempt in range(ATTACH_TRIES):
            try:
                conn.execute(attach_sql(catalog, data_path, read_only))
                break
            except duckdb.Error as exc:  # (writers starting at once on a new catalog)
                if attempt + 1 == ATTACH_TRIES or not _RACE.search(str(exc)):
                    raise
                log.info("lake: another writer is making the catalog; attaching again")
                time.sleep(0.2 + 0.3 * attempt)
        conn.execute(f"USE {LAKE}")
    except BaseException:
        conn.close()
        raise
    return conn


class LakeStore(Store):
    def __init__(self, catalog: str, data_path: str, writer: str, *, read_only: bool = False,
                 threads: int = 1, retries: int = 100, load_retries: int = 1000,
                 snapshot_keep_s: float = 3600.0) -> None:
        self.catalog = catalog
        self.data_path = data_path
        self.writer = writer
        self.retries = retries
        self.load_retries = load_retries
        self.snapshot_keep_s = snapshot_keep_s
        self.conflicts = 0  # loads tried again after another writer's commit
        super().__init__(_display(catalog, data_path), read_only=read_only, threads=threads)

    def _connect(self) -> duckdb.DuckDBPyConnection:
        return connect(self.catalog, self.data_path, read_only=self.read_only,
                       threads=self.threads, retries=self.retries)

    def _remove_compact_tmp(self) -> None:
        pass  # (no file of ours to rewrite)

    @property
    def wal_path(self) -> Path:  # pragma: no cover - the lake has none of ours
        raise AttributeError("a DuckLake store has no WAL of its own")

    @property
    def keys_path(self) -> Path:
        return Path(os.devnull)  # the keys are in the catalog, shared by every node

    def save_keys(self) -> None:
        pass

    def _create(self) -> None:
        """The tables of the file (store.py) without keys, plus `lake_seq` and a mark per
        writer. Several nodes may start at once: a conflicting commit is tried again."""
        columns = file_store._EVENTS_COLUMNS + ", writer VARCHAR"
        statements = [
            f"CREATE TABLE IF NOT EXISTS events ({columns})",
            "CREATE TABLE IF NOT EXISTS write_keys (key VARCHAR NOT NULL, project VARCHAR "
            "NOT NULL, created_at TIMESTAMPTZ NOT NULL, revoked_at TIMESTAMPTZ)",
            "CREATE TABLE IF NOT EXISTS journal_marks (writer VARCHAR NOT NULL, "
            "segment BIGINT NOT NULL, byte_offset BIGINT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS lake_seq (n BIGINT NOT NULL)",
            "CREATE TABLE IF NOT EXISTS meta (key VARCHAR NOT NULL, value VARCHAR)",
            "CREATE TABLE IF NOT EXISTS analytics_ids (analytics_id VARCHAR NOT NULL, "
            "issued_at TIMESTAMPTZ NOT NULL, ip VARCHAR)",
            "CREATE TABLE IF NOT EXISTS archived_days (day DATE NOT NULL, rows BIGINT NOT "
            "NULL, archived_at TIMESTAMPTZ NOT NULL, ingest_seq_max BIGINT NOT NULL, "
            "dt VARCHAR)",
        ]
        self._retrying(lambda c: [c.execute(sql) for sql in statements])
        self._retrying(self._seed)
        got = self.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if got is not None and int(got[0]) > int(SCHEMA_VERSION):
            raise file_store.SchemaError(
                f"the lake {self.path} has schema version {got[0]}; this triolytics knows "
                f"up to {SCHEMA_VERSION}: upgrade triolytics to open it")

    def _seed(self, c: duckdb.DuckDBPyConnection) -> None:
        c.execute("INSERT INTO lake_seq SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM lake_seq)")
        c.execute("INSERT INTO meta SELECT 'schema_version', ? WHERE NOT EXISTS "
                  "(SELECT 1 FROM meta WHERE key = 'schema_version')", [SCHEMA_VERSION])
        c.execute("INSERT INTO journal_marks SELECT ?, 0, 0 WHERE NOT EXISTS "
                  "(SELECT 1 FROM journal_marks WHERE writer = ?)", [self.writer, self.writer])

    def _retrying(self, step) -> None:
        """`step(conn)` in a transaction, tried again while another writer's commit
        conflicts with it."""
        attempt = 0
        while True:
            c = self.conn
            c.execute("BEGIN")
            try:
                step(c)
                c.execute("COMMIT")
                return
            except BaseException as exc:
                self._rollback(exc)
                if self.invalidated or not self._conflicted(exc, attempt):
                    raise
                attempt += 1

    def _migrate(self) -> None:
        pass  # (a lake starts at SCHEMA_VERSION; its checks are in _create)

    # --- loads
    def _stored_seq(self) -> int:
        return self.conn.execute("SELECT n FROM lake_seq").fetchone()[0]

    def _first_seq(self) -> int:
        return self._stored_seq() + 1

    def _insert(self, table, numbers) -> None:
        batch = table.append_column(ARRIVAL, numbers)  # noqa: F841 (read by name in the SQL)
        self.conn.execute(_INSERT, [self.writer])

    def _mark(self, position: Position, last_seq: int) -> None:
        c = self.conn
        c.execute("UPDATE lake_seq SET n = ?", [last_seq])
        c.execute("UPDATE journal_marks SET segment = ?, byte_offset = ? WHERE writer = ?",
                  [*position, self.writer])

    def _conflicted(self, error: BaseException, attempt: int) -> bool:
        if not isinstance(error, duckdb.Error) or not _CONFLICT.search(str(error)):
            return False
        if attempt >= self.load_retries:
            log.error("lake: gave up after %d conflicting commits: %s", attempt, error)
            return False
        self.conflicts += 1
        time.sleep(min(0.2, 0.002 * (1.5 ** min(attempt, 20))))
        return True

    def loaded_position(self) -> Position:
        got = self.conn.execute("SELECT segment, byte_offset FROM journal_marks WHERE "
                                "writer = ?", [self.writer]).fetchone()
        return Position(*got) if got else Position(0, 0)

    def open_sessions(self, writer: str | None = None) -> list[tuple]:
        """This writer's open sessions (see Store.open_sessions): those it opened."""
        return super().open_sessions(self.writer if writer is None else writer)

    def checkpoint(self) -> bool:
        """Before the journal drops what the mark covers: DuckLake commits the catalog
        without syncing the Parquet files it wrote (seen with strace: no fsync of the
        data file before the catalog's commit), so a power cut could leave the catalog
        naming a file the disk lost. A local data path's file system is synced here
        (about once per journal segment); object storage is durable once written."""
        if "://" not in self.data_path:
            os.sync()
        return True

    # --- statements the file writes with its keys
    def record_analytics_ids(self, issued: list[tuple[str, int, str | None]]) -> None:
        if not issued:
            return

        def step(c):
            c.execute("CREATE OR REPLACE TEMP TABLE issued (analytics_id VARCHAR, us BIGINT, "
                      "ip VARCHAR)")
            c.executemany("INSERT INTO issued VALUES (?, ?, ?)", issued)
            c.execute(f"INSERT INTO {LAKE}.analytics_ids SELECT DISTINCT ON (analytics_id) "
                      "analytics_id, make_timestamptz(us), ip FROM issued i WHERE NOT EXISTS "
                      f"(SELECT 1 FROM {LAKE}.analytics_ids a "
                      "WHERE a.analytics_id = i.analytics_id)")
        with self._live():
            self._retrying(step)

    def create_key(self, project: str, key: str | None = None) -> str:
        key = key or file_store.new_write_key()
        out: list[str] = []

        def step(c):
            out.clear()
            existing = c.execute("SELECT project, revoked_at FROM write_keys WHERE key = ?",
                                 [key]).fetchone()
            if existing is not None:
                if existing[0] != project or existing[1] is not None:
                    raise KeyError(f"write key already used by project {existing[0]!r}"
                                   + (" (revoked)" if existing[1] is not None else ""))
                return
            c.execute("INSERT INTO write_keys VALUES (?, ?, now(), NULL)", [key, project])
        with self._live():
            self._retrying(step)
        return key

    def revoke_key(self, key: str) -> bool:
        found: list[bool] = []

        def step(c):
            found[:] = [c.execute("SELECT count(*) FROM write_keys WHERE key = ? AND "
                                  "revoked_at IS NULL", [key]).fetchone()[0] > 0]
            c.execute("UPDATE write_keys SET revoked_at = now() WHERE key = ? AND "
                      "revoked_at IS NULL", [key])
        with self._live():
            self._retrying(step)
        return found[0]

    def record_archived(self, dt: str, days: dict[str, int], seq_max: int) -> None:
        def step(c):
            for day, rows in days.items():
                got = c.execute("SELECT ingest_seq_max, dt FROM archived_days WHERE day = "
                                "?::DATE", [day]).fetchone()
                if got is not None and not (seq_max > got[0] or got[1] != dt):
                    continue
                c.execute("DELETE FROM archived_days WHERE day = ?::DATE", [day])
                c.execute("INSERT INTO archived_days (day, rows, archived_at, ingest_seq_max, "
                          "dt) VALUES (?::DATE, ?, now(), ?, ?)", [day, rows, seq_max, dt])
        with self._live():
            self._retrying(step)

    def shared_secret(self, name: str, make) -> str:
        """A secret every node of the lake uses (the admin token, the key signing
        analytics_ids): the lake's, or `make()` stored as it once (the first node)."""
        def step(c):
            c.execute("INSERT INTO meta SELECT ?, ? WHERE NOT EXISTS (SELECT 1 FROM meta "
                      "WHERE key = ?)", [f"secret:{name}", make(), f"secret:{name}"])
        with self._live() as c:
            got = c.execute("SELECT value FROM meta WHERE key = ?", [f"secret:{name}"]).fetchone()
            if got is not None:
                return got[0]
            self._retrying(step)
            return c.execute("SELECT value FROM meta WHERE key = ?",
                             [f"secret:{name}"]).fetchone()[0]

    # --- maintenance
    def free_space(self) -> tuple[int, int, int]:
        """(files that merging would rewrite, data files, bytes of data files)."""
        with self._live() as c:
            files, size = c.execute(
                f"SELECT count(*), coalesce(sum(file_size_bytes), 0) FROM "
                f"ducklake_list_files('{LAKE}', 'events')").fetchone()
        return 0, files, size

    def compact(self) -> tuple[int, int]:
        """DuckLake's maintenance on the writer's connection (see `maintain`)."""
        with self._live() as c:
            return self.maintain(c)

    def maintain(self, c: duckdb.DuckDBPyConnection) -> tuple[int, int]:
        """DuckLake's maintenance (see Rules) on connection `c` (a cursor of its own
        beside the loads): inlined rows flushed, adjacent small files merged, snapshots
        older than `snapshot_keep_s` expired and the files only they used deleted.
        Returns the data files (events') before and after."""
        files = f"SELECT count(*) FROM ducklake_list_files('{LAKE}', 'events')"
        before = c.execute(files).fetchone()[0]
        keep = f"{float(self.snapshot_keep_s)} seconds"
        c.execute(f"CALL ducklake_flush_inlined_data('{LAKE}')")
        c.execute(f"CALL ducklake_merge_adjacent_files('{LAKE}')")
        if "://" not in self.data_path:  # (the merged files on disk before old ones go)
            os.sync()
        c.execute(f"CALL ducklake_expire_snapshots('{LAKE}', older_than => "
                  f"now() - INTERVAL '{keep}')")
        c.execute(f"CALL ducklake_cleanup_old_files('{LAKE}', older_than => "
                  f"now() - INTERVAL '{keep}')")
        return before, c.execute(files).fetchone()[0]

    def cursor(self) -> duckdb.DuckDBPyConnection:
        with self._live() as c:
            cur = c.cursor()
        cur.execute(f"USE {LAKE}")
        return cur

    def query(self, sql, max_rows, *, timeout_s, cursor=None):
        return super().query(sql, max_rows, timeout_s=timeout_s, cursor=cursor or self.cursor())


def _display(catalog: str, data_path: str) -> str:
    """The lake as logs name it: the catalog without a password, and the data path."""
    shown = re.sub(r"(password=)\S+", r"\1***", re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@",
                                                        catalog))
    return f"ducklake:{shown} (data {data_path})"
