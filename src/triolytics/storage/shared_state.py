"""Sessions and dedup shared by many writers, in PostgreSQL (`shared_state`, docs/scaling.md).

Rules:
- Tables in schema `triolytics`: `current` (a key's current session), `sessions` (each
  open session's activity; `claimed_by` the writer ending it), `dedup` (client ids
  stored within the window, and by which writer), `applied` (per writer: the journal
  position its last group's transaction covered).
- A group (writer.py) is one transaction that stays open while the group is journaled:
  `begin` locks the group's keys (advisory locks, in one order, so two writers never
  deadlock on them), claims its client ids (INSERT .. ON CONFLICT: a writer claiming an
  id another writer's open transaction holds waits for that one's outcome), and decides
  each session: the key's current session if it is live (not claimed, active within
  the timeout), else the group's own id, else (the group's id is known and not live) a
  new one. `commit(position)` records the journal position and commits, after the
  journal sync and before any ack. A group whose journal write fails is rolled back.
- A writer that dies between its journal sync and its commit left rows its shared state
  does not know: at start (`writer.recover`) the records after `applied_position()` are
  decided again (`recovering`: ids this writer claimed stay its own) before they load.
- Ends are the shared reaper's: `claim_expired` marks idle sessions as this writer's and
  commits; their `session_end` rows are journaled; `finish` deletes them. A writer that
  dies in between finds its claims at start (`own_claims`): those whose end is stored are
  finished, the others released, so each session ends exactly once.
- Every call is blocking (a worker thread's); a failure raises `SharedStateError`, and
  the connection is opened again by the next call.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import psycopg

from triolytics.core.journal import Position
from triolytics.core.rows import Part
from triolytics.core.shared import Touch, rewrite, summarize

log = logging.getLogger("triolytics.shared")
SCHEMA_LOCK = 0x7472696F  # advisory lock id held while creating the schema

_SCHEMA = """
CREATE SCHEMA IF NOT EXISTS triolytics;
CREATE TABLE IF NOT EXISTS triolytics.current (
  project text NOT NULL, channel text NOT NULL, key text NOT NULL,
  session_id text NOT NULL, PRIMARY KEY (project, channel, key));
CREATE TABLE IF NOT EXISTS triolytics.sessions (
  session_id text PRIMARY KEY, project text NOT NULL, channel text NOT NULL,
  key text NOT NULL, anonymous_id text, user_id text, started bigint NOT NULL,
  last_seen bigint NOT NULL, events bigint NOT NULL, first_ts bigint NOT NULL,
  latest_ts bigint NOT NULL, claimed_by text);
CREATE INDEX IF NOT EXISTS sessions_claimed ON triolytics.sessions (claimed_by)
  WHERE claimed_by IS NOT NULL;
CREATE TABLE IF NOT EXISTS triolytics.dedup (
  key text PRIMARY KEY, writer text NOT NULL, seen_at bigint NOT NULL);
CREATE INDEX IF NOT EXISTS dedup_seen ON triolytics.dedup (seen_at);
CREATE TABLE IF NOT EXISTS triolytics.applied (
  writer text PRIMARY KEY, segment bigint NOT NULL, byte_offset bigint NOT NULL);
CREATE TABLE IF NOT EXISTS triolytics.schema (version integer NOT NULL);
"""
SCHEMA_VERSION = 1

_LOCK_KEYS = """
SELECT count(pg_advisory_xact_lock(h)) FROM (
  SELECT DISTINCT hashtextextended(p || chr(31) || c || chr(31) || k, 7) AS h
  FROM unnest(%(project)b::text[], %(channel)b::text[], %(key)b::text[]) AS t(p, c, k)
  ORDER BY h) AS locks
"""

_CLAIM_IDS = """
INSERT INTO triolytics.dedup AS d (key, writer, seen_at)
SELECT k, %(writer)s, %(now)s FROM (SELECT DISTINCT unnest(%(ids)b::text[]) AS k) AS i
ORDER BY k
ON CONFLICT (key) DO UPDATE SET writer = excluded.writer, seen_at = excluded.seen_at
  WHERE d.seen_at <= excluded.seen_at - %(window)s
     OR (%(recovering)s AND d.writer = excluded.writer)
RETURNING key
"""

_DECIDE = """
WITH i AS (
  SELECT * FROM unnest(%(project)b::text[], %(channel)b::text[], %(key)b::text[],
    %(sid)b::text[], %(anon)b::text[], %(usr)b::text[], %(events)b::bigint[],
    %(frecv)b::bigint[], %(lrecv)b::bigint[], %(fts)b::bigint[], %(lts)b::bigint[])
    AS t(project, channel, key, sid, anon, usr, events, frecv, lrecv, fts, lts)),
live AS (
  SELECT c.project, c.channel, c.key, s.session_id FROM triolytics.current c
  JOIN (SELECT project, channel, key, min(frecv) AS frecv FROM i GROUP BY 1, 2, 3) AS k
    USING (project, channel, key)
  JOIN triolytics.sessions s ON s.session_id = c.session_id
  WHERE s.claimed_by IS NULL AND s.last_seen + %(timeout)s > k.frecv
  FOR UPDATE OF s),
own AS (
  SELECT s.session_id FROM triolytics.sessions s JOIN i ON s.session_id = i.sid),
d AS (
  SELECT i.*, CASE WHEN live.session_id IS NOT NULL THEN live.session_id
                   WHEN own.session_id IS NOT NULL THEN gen_random_uuid()::text
                   ELSE i.sid END AS shared,
         live.session_id IS NULL AND own.session_id IS NOT NULL AS fresh
  FROM i LEFT JOIN live USING (project, channel, key)
  LEFT JOIN own ON own.session_id = i.sid),
uc AS (
  INSERT INTO triolytics.current AS c (project, channel, key, session_id)
  SELECT DISTINCT ON (project, channel, key) project, channel, key, shared FROM d
  ORDER BY project, channel, key, lrecv DESC
  ON CONFLICT (project, channel, key) DO UPDATE SET session_id = excluded.session_id
    WHERE c.session_id <> excluded.session_id),
us AS (
  INSERT INTO triolytics.sessions AS s (session_id, project, channel, key, anonymous_id,
    user_id, started, last_seen, events, first_ts, latest_ts)
  SELECT shared, min(project), min(channel), min(key), min(anon), min(usr), min(frecv),
    max(lrecv), sum(events), min(fts), max(lts) FROM d GROUP BY shared
  ON CONFLICT (session_id) DO UPDATE SET
    last_seen = greatest(s.last_seen, excluded.last_seen),
    events = s.events + excluded.events,
    latest_ts = greatest(s.latest_ts, excluded.latest_ts),
    user_id = coalesce(excluded.user_id, s.user_id))
SELECT sid, shared, fresh FROM d
"""

_CLAIM_ENDS = """
UPDATE triolytics.sessions SET claimed_by = %(writer)s WHERE session_id IN (
  SELECT session_id FROM triolytics.sessions
  WHERE claimed_by IS NULL AND last_seen + %(timeout)s <= %(now)s
  ORDER BY last_seen LIMIT %(limit)s FOR UPDATE SKIP LOCKED)
RETURNING session_id, project, channel, anonymous_id, user_id, started, last_seen, events,
  first_ts, latest_ts
"""


class SharedStateError(Exception):
    """PostgreSQL refused or could not be reached; the message says which."""


class Decision:
    """What the shared state said of a group."""

    __slots__ = ("shared", "fresh", "repeated")

    def __init__(self, shared: dict[str, str], fresh: dict[str, str], repeated: set[str]):
        self.shared = shared  # local session id -> shared id
        self.fresh = fresh  # shared id -> local id: new sessions that need a start row
        self.repeated = repeated  # dedup keys another writer stored


class SharedState:
    def __init__(self, dsn: str, writer: str, timeout_us: int, window_us: int) -> None:
        self.dsn = dsn
        self.writer = writer
        self.timeout_us = timeout_us
        self.window_us = window_us
        self._conn: psycopg.Connection | None = None
        self._in_group = False
        self._create_schema()

    def _create_schema(self) -> None:
        """The tables, made once: a writer starting beside others under load must not
        run DDL (CREATE INDEX IF NOT EXISTS takes a lock that conflicts with their open
        groups: a deadlock), so an existing schema of this version is left alone."""
        conn = self._connection()
        try:
            if conn.execute("SELECT to_regclass('triolytics.schema')").fetchone()[0]:
                got = conn.execute("SELECT max(version) FROM triolytics.schema").fetchone()[0]
                if got == SCHEMA_VERSION:
                    return
                if got is not None and got > SCHEMA_VERSION:
                    raise SharedStateError(
                        f"the shared state's schema is version {got}; this triolytics knows "
                        f"up to {SCHEMA_VERSION}: upgrade triolytics")
            with conn.transaction():
                conn.execute("SET LOCAL lock_timeout = '30s'")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK])
                conn.execute(_SCHEMA)
                conn.execute("INSERT INTO triolytics.schema SELECT %s WHERE NOT EXISTS "
                             "(SELECT 1 FROM triolytics.schema)", [SCHEMA_VERSION])
        except psycopg.Error as exc:
            raise self._failed(exc, "creating its tables") from exc

    # --- the connection
    def _connect(self) -> psycopg.Connection:
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                   application_name=f"triolytics {self.writer}")
        except psycopg.Error as exc:
            raise SharedStateError(f"cannot reach the shared state's PostgreSQL: "
                                   f"{_message(exc)}") from exc
        return conn

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _failed(self, exc: Exception, what: str) -> SharedStateError:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass
        self._in_group = False
        return SharedStateError(f"shared state: {what} failed: {_message(exc)}")

    # --- a group
    def begin(self, parts: list[Part], now_us: int,
              recovering: bool = False) -> tuple[list[Part], Decision, dict[str, Touch]]:
        """Open the group's transaction and decide it (see Rules): the group without the
        events another writer stored, the decision on its sessions, and what it did to
        each. The transaction stays open until `commit` or `rollback`."""
        summary = summarize(parts)
        conn = self._connection()
        try:
            with conn.pipeline():  # (statements sent together: a round trip per result)
                conn.execute("BEGIN")
                self._in_group = True
                repeated: set[str] = set()
                if summary.ids:
                    claimed = {r[0] for r in conn.execute(_CLAIM_IDS, {
                        "ids": summary.ids, "writer": self.writer, "now": now_us,
                        "window": self.window_us, "recovering": recovering}).fetchall()}
                    if len(claimed) != len(set(summary.ids)):
                        repeated = set(summary.ids) - claimed
                        parts = rewrite(parts, {}, repeated)  # (not counted in sessions)
                        summary = summarize(parts)
                shared: dict[str, str] = {}
                fresh: dict[str, str] = {}
                if summary.sessions:
                    args = _columns(summary.sessions)
                    conn.execute(_LOCK_KEYS, args)
                    for sid, to, new in conn.execute(_DECIDE, {
                            **args, "timeout": self.timeout_us}).fetchall():
                        shared[sid] = to
                        if new:
                            fresh[to] = sid
            return parts, Decision(shared, fresh, repeated), summary.sessions
        except psycopg.Error as exc:
            raise self._failed(exc, "deciding a group") from exc

    def commit(self, position: Position) -> None:
        conn = self._connection()
        try:
            with conn.pipeline():
                conn.execute("INSERT INTO triolytics.applied VALUES (%s, %s, %s) ON CONFLICT "
                             "(writer) DO UPDATE SET segment = excluded.segment, "
                             "byte_offset = excluded.byte_offset", [self.writer, *position])
                conn.execute("COMMIT")
            self._in_group = False
        except psycopg.Error as exc:
            raise self._failed(exc, "committing a group") from exc

    def rollback(self) -> None:
        if not self._in_group:
            return
        try:
            self._connection().execute("ROLLBACK")
        except psycopg.Error as exc:
            raise self._failed(exc, "rolling back a group") from exc
        self._in_group = False

    def applied_position(self) -> Position:
        try:
            got = self._connection().execute(
                "SELECT segment, byte_offset FROM triolytics.applied WHERE writer = %s",
                [self.writer]).fetchone()
        except psycopg.Error as exc:
            raise self._failed(exc, "reading the applied position") from exc
        return Position(*got) if got else Position(0, 0)

    # --- ends (the shared reaper)
    def claim_expired(self, now_us: int, limit: int) -> list[tuple]:
        """Sessions idle for the timeout at `now_us`, claimed by this writer (committed):
        (session_id, project, channel, anonymous_id, user_id, started, last_seen, events,
        first_ts, latest_ts)."""
        try:
            with self._connection().transaction():
                return self._connection().execute(_CLAIM_ENDS, {
                    "writer": self.writer, "timeout": self.timeout_us, "now": now_us,
                    "limit": limit}).fetchall()
        except psycopg.Error as exc:
            raise self._failed(exc, "claiming idle sessions") from exc

    def own_claims(self) -> list[str]:
        try:
            return [r[0] for r in self._connection().execute(
                "SELECT session_id FROM triolytics.sessions WHERE claimed_by = %s",
                [self.writer]).fetchall()]
        except psycopg.Error as exc:
            raise self._failed(exc, "reading this writer's claims") from exc

    def finish(self, session_ids: Sequence[str]) -> None:
        """The ends of these claimed sessions are stored: forget them."""
        if not session_ids:
            return
        try:
            conn = self._connection()
            with conn.transaction():
                conn.execute("DELETE FROM triolytics.sessions WHERE session_id = ANY(%s) "
                             "AND claimed_by = %s", [list(session_ids), self.writer])
                conn.execute("DELETE FROM triolytics.current WHERE session_id = ANY(%s)",
                             [list(session_ids)])
        except psycopg.Error as exc:
            raise self._failed(exc, "finishing ended sessions") from exc

    def release(self, session_ids: Sequence[str]) -> None:
        """These claims' ends were never stored: another reaper may end them."""
        if not session_ids:
            return
        try:
            self._connection().execute(
                "UPDATE triolytics.sessions SET claimed_by = NULL WHERE session_id = ANY(%s) "
                "AND claimed_by = %s", [list(session_ids), self.writer])
        except psycopg.Error as exc:
            raise self._failed(exc, "releasing claims") from exc

    def forget_ids(self, now_us: int) -> int:
        """Drop client ids older than the dedup window; how many."""
        try:
            return self._connection().execute(
                "DELETE FROM triolytics.dedup WHERE seen_at <= %s",
                [now_us - self.window_us]).rowcount
        except psycopg.Error as exc:
            raise self._failed(exc, "forgetting old ids") from exc

    def open_sessions(self) -> int:
        try:
            return self._connection().execute(
                "SELECT count(*) FROM triolytics.sessions WHERE claimed_by IS NULL"
            ).fetchone()[0]
        except psycopg.Error as exc:
            raise self._failed(exc, "counting sessions") from exc


def _columns(sessions: dict[str, Touch]) -> dict[str, list]:
    t = list(sessions.values())
    return {"project": [s.project for s in t], "channel": [s.channel for s in t],
            "key": [s.key for s in t], "sid": list(sessions),
            "anon": [s.anonymous_id for s in t], "usr": [s.user_id for s in t],
            "events": [s.events for s in t], "frecv": [s.first_received for s in t],
            "lrecv": [s.last_received for s in t], "fts": [s.first_ts for s in t],
            "lts": [s.latest_ts for s in t]}


def _message(exc: Exception) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class Leader:
    """Which writer runs the lake's once-for-all work (the dashboard's rollups, the
    lake's maintenance, archive and retention): the one holding a PostgreSQL advisory
    lock on a connection of its own. If that writer dies, its connection goes and the
    lock with it, and the next writer to ask takes over. Blocking calls."""

    LOCK = 0x7472696F + 1

    def __init__(self, dsn: str, writer: str) -> None:
        self.dsn = dsn
        self.writer = writer
        self._conn: psycopg.Connection | None = None
        self.leading = False

    def check(self) -> bool:
        """Whether this writer leads now (taking the lead if it is free)."""
        try:
            if self._conn is None or self._conn.closed:
                self.leading = False
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                                             application_name=f"triolytics {self.writer} lead")
            if self.leading:
                self._conn.execute("SELECT 1")
            else:
                self.leading = self._conn.execute("SELECT pg_try_advisory_lock(%s)",
                                                  [self.LOCK]).fetchone()[0]
        except psycopg.Error as exc:
            log.warning("shared state: cannot check the lead (%s): not leading",
                        _message(exc))
            self.close()
        return self.leading

    def close(self) -> None:
        self.leading = False
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                pass
            self._conn = None
