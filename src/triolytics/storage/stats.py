"""The dashboard's figures: overview, one time series, top lists, one session's events;
and the rollups that keep the 30-day view under a second at ten million events.

Rules:
- Reads are functions of a DuckDB connection (a cursor of the writer's), a range
  [since, until) of aware UTC datetimes and a project (None: all). They return
  msgspec Structs, ready for JSON. Hours and days are UTC.
- What counts (one definition each, used by every figure):
  - an *event* is a row of any type but `session_start`/`session_end`, the server's
    bookkeeping rows; its name is `event` (a `track`) or else its `type`;
  - a *visitor* is `coalesce(anonymous_id, user_id)` within its project: the key its
    sessions belong to (the `analytics_id` on the WebSocket, `anonymousId` else
    `userId` over HTTP). Visitors are counted over events only, by a 64-bit hash of
    (project, id): distinct integers count five times faster than distinct strings,
    and two visitors share a hash with odds of ~1e-8 at a million of them;
  - a *pageview* is a `page` event (path: `properties.path`, else `context.page.path`,
    else `name`); a *screen view* a `screen` (`name`) or `screen_view` (WebSocket,
    `properties.screen_name`) event; a referrer is a pageview's `properties.referrer`
    (else `context.page.referrer`), by domain without `www.` ("" is direct), unless it
    is the page's own domain (`properties.url`, else `context.page.url`): a move inside
    the site is no referral, and is not counted;
  - a *session* counts where its `session_start` row is; bounce rate and durations are
    over the sessions *ended* in the range (their `session_end` row): a bounce is a
    session whose `event_count` is 1 (one event; start and end rows are not events),
    durations are its `duration_ms` (first to last event received);
  - browsers and OS are counted by visitors, parsed from `context.userAgent` by
    ua-parser, each distinct user agent once (a bounded LRU cache), and joined to the
    rows through an Arrow table registered on the connection as `stats_ua`.
- `change` is (value - previous) / previous, for the previous range of equal length
  just before; None when previous is 0 or None.
- Rollups: `refresh_rollups` folds rows past a watermark (`ingest_seq`) into hourly
  counts, visitor-hours and session ends, in one transaction with the watermark. A
  read takes the rollups for whole hours inside the range and the raw rows for the
  rest: the partial hours at its edges and every row past the watermark. Both go
  through the same SQL (`_FACTS`), so figures are exact and equal the raw ones. Rows
  deleted after they were rolled up leave the rollups in the deleting transaction
  (store.py: forget drops them, to be built again; retention deletes its days' rows).
  Refreshes run under the server's archive lock, as forget and retention do (a write
  beside theirs would conflict).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import duckdb
import msgspec
import pyarrow as pa
from ua_parser import parse_os, parse_user_agent

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
HOURLY_UP_TO = timedelta(days=2)  # a range up to this long is bucketed by hour, else by day
REFRESH_MAX_ROWS = 250_000  # rows one `refresh_rollups` call folds in: ~1.5 s on one core
UA_CACHE = 4096  # distinct user agents kept parsed (~1 ms to parse one anew)
_UA_SCHEMA = pa.schema([("ua", pa.string()), ("browser", pa.string()), ("os", pa.string())])

# One row per event (and session start) of `events` matching {where}: what every figure
# is made of. The hour is a naive UTC timestamp (date_trunc of a TIMESTAMPTZ would follow
# the session's TimeZone).
_FACTS = """
SELECT project, type, date_trunc('hour', timezone('UTC', timestamp)) AS hour,
  hash(project, coalesce(anonymous_id, user_id)) AS vid, coalesce(event, type) AS name,
  CASE type WHEN 'page' THEN coalesce(properties->>'$.path', context->>'$.page.path', name, '')
    WHEN 'screen' THEN coalesce(name, '')
    WHEN 'screen_view' THEN coalesce(properties->>'$.screen_name', '') END AS view,
  CASE WHEN type <> 'page' THEN NULL
    WHEN {ref} <> '' AND {ref} = {url} THEN NULL ELSE {ref} END AS referrer,
  coalesce(context->>'$.userAgent', '') AS ua
FROM events WHERE type <> 'session_end' AND ({where})"""



def _domain(url: str) -> str:
    """SQL: the host of the URL `url` (SQL), lower case, without `www.`; "" for none."""
    return (f"regexp_replace(lower(regexp_extract(coalesce({url}, ''), "
            "'^[A-Za-z][A-Za-z0-9+.-]*://(?:[^@/?#]*@)?([^/:?#]+)', 1)), '^www\\.', '')")


# A referrer of the page's own site is a move inside it, not a referral: not counted.
_FACTS = _FACTS.replace("{ref}", _domain(
    "coalesce(properties->>'$.referrer', context->>'$.page.referrer')")).replace(
    "{url}", _domain("coalesce(properties->>'$.url', context->>'$.page.url')"))

# Hourly counts of facts, by kind: event (by name), page / screen (by path or name),
# referrer (by domain), session (starts).
_HOURLY = """
SELECT project, hour, 'event' AS kind, name AS key, count(*) AS n FROM f
  WHERE type <> 'session_start' GROUP BY ALL
UNION ALL SELECT project, hour, 'session', '', count(*) FROM f
  WHERE type = 'session_start' GROUP BY ALL
UNION ALL SELECT project, hour, CASE type WHEN 'page' THEN 'page' ELSE 'screen' END, view,
  count(*) FROM f WHERE view IS NOT NULL GROUP BY ALL
UNION ALL SELECT project, hour, 'referrer', referrer, count(*) FROM f
  WHERE referrer IS NOT NULL GROUP BY ALL"""
_UAS = "SELECT DISTINCT ua FROM f WHERE type <> 'session_start'"
_VISITORS = ("SELECT DISTINCT project, hour, vid, browser, os FROM f JOIN stats_ua USING (ua) "
             "WHERE type <> 'session_start'")
_ENDS = """
SELECT project, timestamp AS ts, CAST(properties->>'$.duration_ms' AS BIGINT) AS duration_ms,
  CAST(properties->>'$.event_count' AS BIGINT) AS event_count
FROM events WHERE type = 'session_end' AND ({where})"""

_ROLLUPS = ("stats_mark", "stats_hourly", "stats_visitors", "stats_session_ends")
# A value of DuckDB's hash() and of the rollups' layout: rollups made by another hash()
# (another DuckDB version) hold visitor hashes that raw rows would not match, and those of
# another layout other tables, so they are not read and are rebuilt. (Layout 2:
# stats_visitors without a primary key; 3: a page's own site is no referrer.)
_HASHING = "hash('triolytics', 3)"
_TABLES = (
    "CREATE TABLE IF NOT EXISTS stats_mark (id INTEGER PRIMARY KEY, seq BIGINT NOT NULL, "
    "hashing UBIGINT NOT NULL)",  # `_HASHING` when the visitor hashes were made
    "CREATE TABLE IF NOT EXISTS stats_hourly (project VARCHAR, hour TIMESTAMP, "
    "kind VARCHAR, key VARCHAR, n BIGINT NOT NULL, PRIMARY KEY (project, hour, kind, key))",
    "CREATE TABLE IF NOT EXISTS stats_visitors (project VARCHAR, hour TIMESTAMP, "
    "vid UBIGINT, browser VARCHAR, os VARCHAR)",  # (no key: see refresh_rollups)
    "CREATE TABLE IF NOT EXISTS stats_session_ends (project VARCHAR NOT NULL, "
    "ts TIMESTAMPTZ NOT NULL, duration_ms BIGINT, event_count BIGINT)",
)
# A DuckLake (lake.py) has no keys: the same tables without them, and MERGE for upserts.
_LAKE_TABLES = tuple(re.sub(r", PRIMARY KEY \([^)]*\)| PRIMARY KEY", "", sql) for sql in _TABLES)


def _in_lake(conn) -> bool:
    """Whether `conn`'s current database is a DuckLake (store = "ducklake")."""
    return conn.execute("SELECT type = 'ducklake' FROM duckdb_databases() "
                        "WHERE database_name = current_database()").fetchone() == (True,)


class Figure(msgspec.Struct):
    value: int | float | None
    previous: int | float | None
    change: float | None  # (value - previous) / previous


class Overview(msgspec.Struct):
    visitors: Figure
    sessions: Figure
    events: Figure
    pageviews: Figure
    screen_views: Figure
    bounce_rate: Figure  # 0..1, of the sessions ended in the range
    duration_median_ms: Figure
    duration_mean_ms: Figure


class Series(msgspec.Struct):
    interval: str  # "hour" or "day"
    buckets: list[str]  # each bucket's start, ISO-8601 UTC
    visitors: list[int]
    sessions: list[int]
    events: list[int]
    views: list[int]  # pageviews and screen views


class Item(msgspec.Struct, array_like=True):
    key: str
    count: int


class Top(msgspec.Struct):
    events: list[Item]  # by events
    pages: list[Item]  # pages and screens, by views
    referrers: list[Item]  # by pageviews; "" is direct
    browsers: list[Item]  # by visitors
    os: list[Item]  # by visitors


class SessionEvent(msgspec.Struct):
    seq: int
    timestamp: str
    received_at: str
    type: str
    event: str | None
    name: str | None
    properties: msgspec.Raw | None


# --- the range: which rows come from rollups, which from `events`
class _Plan(msgspec.Struct):
    """SQL for the three relations a range reads (hourly counts `h`, visitor-hours `v`,
    session ends `e`) with their parameters, rollups and raw rows together."""

    ctes: str
    params: list


def _naive(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None)


def _floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _plan(conn, since: datetime, until: datetime, project: str | None,
          use_rollups: bool = True) -> _Plan:
    mark = watermark(conn) if use_rollups else 0
    since, until = since.astimezone(UTC), until.astimezone(UTC)
    h0 = _floor_hour(since) + (HOUR if _floor_hour(since) < since else timedelta())
    h1 = _floor_hour(until)
    if h0 >= h1 or not mark:  # no whole hour to read from rollups
        h0 = h1 = until
    proj = "" if project is None else " AND project = ?"
    pp = [] if project is None else [project]
    # Raw rows: past the watermark anywhere in the range, or up to it at the edges. (One
    # scan each, not one scan with OR: a range on its own skips row groups by their
    # min/max, and so never reads their JSON.)
    raw = [(">", since, until), ("<=", since, h0), ("<=", h1, until)]
    ctes = fcte = "f AS MATERIALIZED (" + " UNION ALL ".join(_FACTS.format(
        where=f"ingest_seq {op} ? AND timestamp >= ? AND timestamp < ?{proj}")
        for op, _, _ in raw) + ")"
    params: list = [x for _, a, b in raw for x in (mark, a, b, *pp)]
    fparams = [*params]
    eparams = [mark, since, until, *pp]
    ends = _ENDS.format(where="ingest_seq > ? AND timestamp >= ? AND timestamp < ?" + proj)
    if mark:
        ctes += (f", h AS ({_HOURLY} UNION ALL SELECT project, hour, kind, key, n "
                 f"FROM stats_hourly WHERE hour >= ? AND hour < ?{proj}), "
                 f"v AS ({_VISITORS} UNION ALL SELECT project, hour, vid, browser, os "
                 f"FROM stats_visitors WHERE hour >= ? AND hour < ?{proj}), "
                 f"e AS ({ends} UNION ALL SELECT project, ts, duration_ms, event_count "
                 f"FROM stats_session_ends WHERE ts >= ? AND ts < ?{proj})")
        hp = [_naive(h0), _naive(h1), *pp]
        params += hp + hp + eparams + [since, until, *pp]
    else:
        ctes += f", h AS ({_HOURLY}), v AS ({_VISITORS}), e AS ({ends})"
        params += eparams
    _register_uas(conn, f"WITH {fcte} {_UAS}", fparams)
    return _Plan(ctes, params)


def _register_uas(conn, sql: str, params: list) -> None:
    """`stats_ua` (ua, browser, os) for the user agents `sql` selects."""
    uas = [r[0] for r in conn.execute(sql, params).fetchall()]
    parsed = [browser_and_os(ua) for ua in uas]
    conn.register("stats_ua", pa.table({"ua": pa.array(uas, pa.string()),
                                        "browser": [b for b, _ in parsed],
                                        "os": [o for _, o in parsed]},
                                       schema=_UA_SCHEMA))


@contextmanager
def _snapshot(conn) -> Iterator[None]:
    """One read transaction: every statement sees the same rollups and watermark."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.unregister("stats_ua")


def watermark(conn) -> int:
    """The last `ingest_seq` folded into the rollups (0: none, or no rollup tables)."""
    try:
        got = conn.execute(f"SELECT seq FROM stats_mark WHERE hashing = {_HASHING}").fetchone()
    except duckdb.CatalogException:
        return 0
    return got[0] if got else 0


# --- overview
_OVERVIEW = """
SELECT
  (SELECT count(DISTINCT vid) FROM v),
  (SELECT coalesce(sum(n), 0) FROM h WHERE kind = 'session'),
  (SELECT coalesce(sum(n), 0) FROM h WHERE kind = 'event'),
  (SELECT coalesce(sum(n), 0) FROM h WHERE kind = 'page'),
  (SELECT coalesce(sum(n), 0) FROM h WHERE kind = 'screen'),
  (SELECT avg(CASE WHEN event_count = 1 THEN 1 ELSE 0 END) FROM e),
  (SELECT median(duration_ms) FROM e),
  (SELECT avg(duration_ms) FROM e)"""


def _figures(conn, plan: _Plan) -> tuple:
    """The overview's values, in `Overview`'s order, for one plan."""
    return conn.execute(f"WITH {plan.ctes} {_OVERVIEW}", plan.params).fetchone()


def _change(value, previous) -> float | None:
    if value is None or not previous:
        return None
    return (value - previous) / previous


def overview(conn, since: datetime, until: datetime, project: str | None = None, *,
             use_rollups: bool = True) -> Overview:
    """The headline figures of [since, until), each beside the previous range's."""
    with _snapshot(conn):
        now = _figures(conn, _plan(conn, since, until, project, use_rollups))
        before = _figures(conn, _plan(conn, since - (until - since), since, project,
                                      use_rollups))
    return _overview(now, before)


def _overview(now: tuple, before: tuple) -> Overview:
    return Overview(*[Figure(_number(v), _number(p), _change(v, p))
                      for v, p in zip(now, before, strict=True)])


def _number(v):
    return float(v) if v is not None and not isinstance(v, int) else v


# --- time series
def interval_for(since: datetime, until: datetime) -> str:
    return "hour" if until - since <= HOURLY_UP_TO else "day"


def series(conn, since: datetime, until: datetime, project: str | None = None, *,
           use_rollups: bool = True) -> Series:
    """Visitors, sessions, events and views per hour (ranges up to 2 days) or per day,
    every bucket from the one holding `since` to the one holding the range's end."""
    with _snapshot(conn):
        return _series(conn, _plan(conn, since, until, project, use_rollups), since, until)


def _series(conn, plan: _Plan, since: datetime, until: datetime) -> Series:
    unit = interval_for(since, until)
    got = conn.execute(
        f"WITH {plan.ctes}, c AS (SELECT date_trunc('{unit}', hour) AS b, "
        "sum(n) FILTER (kind = 'session') AS s, sum(n) FILTER (kind = 'event') AS ev, "
        "sum(n) FILTER (kind IN ('page', 'screen')) AS vw FROM h GROUP BY 1), "
        f"p AS (SELECT date_trunc('{unit}', hour) AS b, count(DISTINCT vid) AS vis "
        "FROM v GROUP BY 1) "
        "SELECT coalesce(c.b, p.b), coalesce(vis, 0), coalesce(s, 0), coalesce(ev, 0), "
        "coalesce(vw, 0) FROM c FULL JOIN p ON c.b = p.b", plan.params).fetchall()
    by_bucket = {row[0]: row[1:] for row in got}
    step = HOUR if unit == "hour" else DAY
    t = _naive(since).replace(minute=0, second=0, microsecond=0)
    if unit == "day":
        t = t.replace(hour=0)
    end = _naive(until)
    out = Series(unit, [], [], [], [], [])
    while t < end:
        vis, s, ev, vw = by_bucket.get(t, (0, 0, 0, 0))
        out.buckets.append(t.isoformat() + "Z")
        out.visitors.append(vis)
        out.sessions.append(int(s))
        out.events.append(int(ev))
        out.views.append(int(vw))
        t += step
    return out


# --- top lists
@functools.lru_cache(maxsize=UA_CACHE)
def browser_and_os(ua: str) -> tuple[str, str]:
    """(browser family, OS family) of a user agent; "(unknown)" for none."""
    if not ua:
        return "(unknown)", "(unknown)"
    browser, os_ = parse_user_agent(ua), parse_os(ua)
    return (browser.family if browser else "Other"), (os_.family if os_ else "Other")


def top(conn, since: datetime, until: datetime, project: str | None = None,
        limit: int = 10, *, use_rollups: bool = True) -> Top:
    """The first `limit` events, pages and screens, referrers, browsers and OS."""
    with _snapshot(conn):
        return _top(conn, _plan(conn, since, until, project, use_rollups), limit)


def _top(conn, plan: _Plan, limit: int) -> Top:
    counts = conn.execute(
        f"WITH {plan.ctes}, k AS (SELECT CASE WHEN kind IN ('page', 'screen') THEN 'page' "
        "ELSE kind END AS kind, key, sum(n) AS n FROM h WHERE kind <> 'session' "
        "GROUP BY ALL) SELECT kind, key, n FROM (SELECT *, row_number() OVER "
        "(PARTITION BY kind ORDER BY n DESC, key) AS r FROM k) WHERE r <= ? "
        "ORDER BY kind, r", [*plan.params, limit]).fetchall()
    people = conn.execute(
        f"WITH {plan.ctes} SELECT CASE WHEN os IS NULL THEN 'browser' ELSE 'os' END, "
        "coalesce(browser, os), count(DISTINCT vid) FROM v "
        "GROUP BY GROUPING SETS ((browser), (os))", plan.params).fetchall()
    lists: dict[str, list[Item]] = {"event": [], "page": [], "referrer": [],
                                    "browser": [], "os": []}
    for kind, key, n in counts:
        lists[kind].append(Item(key, int(n)))
    for kind, key, n in sorted(people, key=lambda r: (r[0], -r[2], r[1])):
        if len(lists[kind]) < limit:
            lists[kind].append(Item(key, n))
    return Top(lists["event"], lists["page"], lists["referrer"], lists["browser"],
               lists["os"])


# --- the whole view at once
class View(msgspec.Struct):
    overview: Overview
    series: Series
    top: Top


def view(conn, since: datetime, until: datetime, project: str | None = None,
         limit: int = 10, *, use_rollups: bool = True) -> View:
    """Overview, series and top lists of [since, until) from one snapshot: every figure
    of the dashboard agrees with the others, and the range's plan (its raw edges and
    user agents) is made once."""
    with _snapshot(conn):
        plan = _plan(conn, since, until, project, use_rollups)
        now = _figures(conn, plan)
        series_ = _series(conn, plan, since, until)
        top_ = _top(conn, plan, limit)
        before = _figures(conn, _plan(conn, since - (until - since), since, project,
                                      use_rollups))
    return View(_overview(now, before), series_, top_)


# --- live
class Latest(msgspec.Struct):
    seq: int
    timestamp: str
    project: str
    type: str
    name: str  # a track's event, a page's path, a screen's name; else its type
    session_id: str | None
    visitor: str | None  # anonymous_id, else user_id


def latest(conn, after: int, last_seq: int, limit: int = 50) -> list[Latest]:
    """The rows stored after `ingest_seq` `after`, newest first, at most `limit`.
    `last_seq` is the store's last number: rows are numbered densely, so only the
    last `limit` numbers are read (a range on `ingest_seq` skips every older row
    group by its min/max)."""
    lower = max(after, last_seq - limit)
    got = conn.execute(
        "SELECT ingest_seq, strftime(timezone('UTC', timestamp), '%Y-%m-%dT%H:%M:%S.%fZ'), "
        "project, type, CASE type WHEN 'page' THEN coalesce(properties->>'$.path', "
        "context->>'$.page.path', name, type) WHEN 'screen_view' THEN coalesce("
        "properties->>'$.screen_name', type) ELSE coalesce(event, name, type) END, session_id, "
        "coalesce(anonymous_id, user_id) FROM events WHERE ingest_seq > ? "
        "ORDER BY ingest_seq DESC LIMIT ?", [lower, limit]).fetchall()
    return [Latest(*r) for r in got]


def projects(conn) -> list[str]:
    """The projects that have write keys, and those with rolled-up events."""
    names = {r[0] for r in conn.execute("SELECT DISTINCT project FROM write_keys").fetchall()}
    if watermark(conn):
        names.update(r[0] for r in conn.execute(
            "SELECT DISTINCT project FROM stats_hourly").fetchall())
    return sorted(names)


# --- session explorer
def session_events(conn, session_id: str, project: str | None = None,
                   limit: int = 1000) -> list[SessionEvent]:
    """One session's rows (its start and end included) in order: by timestamp, then
    arrival (sessions.py stamps them so)."""
    proj, pp = ("", []) if project is None else (" AND project = ?", [project])
    got = conn.execute(
        "SELECT ingest_seq, strftime(timezone('UTC', timestamp), '%Y-%m-%dT%H:%M:%S.%fZ'), "
        "strftime(timezone('UTC', received_at), '%Y-%m-%dT%H:%M:%S.%fZ'), type, event, "
        f"name, properties FROM events WHERE session_id = ?{proj} "
        "ORDER BY timestamp, ingest_seq LIMIT ?", [session_id, *pp, limit]).fetchall()
    return [SessionEvent(*r[:6], None if r[6] is None else msgspec.Raw(r[6].encode()))
            for r in got]


# --- rollups
def refresh_rollups(conn, max_rows: int = REFRESH_MAX_ROWS) -> int:
    """Fold the rows past the watermark (at most `max_rows` of them) into the rollups,
    in one transaction with the new watermark. Returns how many rows were folded in;
    call again while it returns `max_rows`."""
    lake = _in_lake(conn)
    tables = _LAKE_TABLES if lake else _TABLES
    conn.execute("BEGIN")
    try:
        for sql in tables:
            conn.execute(sql)
        if conn.execute(f"SELECT hashing <> {_HASHING} FROM stats_mark").fetchone() == (True,):
            drop_rollups(conn)  # made by another DuckDB's hash(): built again
            for sql in tables:
                conn.execute(sql)
        mark = watermark(conn)
        top_seq = conn.execute("SELECT max(ingest_seq) FROM events WHERE ingest_seq > ?",
                               [mark]).fetchone()[0]
        if top_seq is None:
            conn.execute("COMMIT")
            return 0
        upto = min(top_seq, mark + max_rows)
        where = "ingest_seq > ? AND ingest_seq <= ?"
        rows = conn.execute(f"SELECT count(*) FROM events WHERE {where}",
                            [mark, upto]).fetchone()[0]
        facts = f"WITH f AS MATERIALIZED ({_FACTS.format(where=where)}) "
        _register_uas(conn, facts + _UAS, [mark, upto])
        if lake:
            conn.execute(f"MERGE INTO stats_hourly s USING ({facts} {_HOURLY}) AS x "
                         "ON s.project IS NOT DISTINCT FROM x.project AND s.hour = x.hour "
                         "AND s.kind = x.kind AND s.key IS NOT DISTINCT FROM x.key "
                         "WHEN MATCHED THEN UPDATE SET n = s.n + x.n "
                         "WHEN NOT MATCHED THEN INSERT VALUES (x.project, x.hour, x.kind, "
                         "x.key, x.n)", [mark, upto])
        else:
            conn.execute(f"INSERT INTO stats_hourly {facts} {_HOURLY} "
                         "ON CONFLICT DO UPDATE SET n = n + excluded.n", [mark, upto])
        # Visitor-hours not there yet: a chunk every few seconds would otherwise add a
        # row per chunk for a visitor active across them. An anti join over the hours
        # the chunk touches, rather than a primary key, whose index was as big as the
        # table (it kept 6 MB of a file with 30,000 rows, tests/test_compact.py).
        conn.execute(
            f"INSERT INTO stats_visitors {facts}, n AS ({_VISITORS}), "
            "s AS (SELECT * FROM stats_visitors WHERE hour >= (SELECT min(hour) FROM n) "
            "AND hour <= (SELECT max(hour) FROM n)) "
            "SELECT * FROM n WHERE NOT EXISTS (SELECT 1 FROM s WHERE s.project = n.project "
            "AND s.hour = n.hour AND s.vid = n.vid AND s.browser = n.browser "
            "AND s.os = n.os)", [mark, upto])
        conn.execute(f"INSERT INTO stats_session_ends {_ENDS.format(where=where)}",
                     [mark, upto])
        if lake:
            conn.execute("DELETE FROM stats_mark")
            conn.execute(f"INSERT INTO stats_mark VALUES (1, ?, {_HASHING})", [upto])
        else:
            conn.execute(f"INSERT OR REPLACE INTO stats_mark VALUES (1, ?, {_HASHING})", [upto])
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    finally:
        conn.unregister("stats_ua")
    return rows


def reset_rollups(conn) -> None:
    """Drop the rollups (after rows were deleted, or for a new rollup schema): reads take
    raw rows until the next refreshes have built them again."""
    conn.execute("BEGIN")
    try:
        drop_rollups(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def drop_rollups(conn) -> None:
    """Drop the rollup tables, in the caller's transaction (store.py: a forget)."""
    for table in _ROLLUPS:
        conn.execute(f"DROP TABLE IF EXISTS {table}")


def trim_rollups(conn, spans: list[tuple[datetime, datetime]]) -> None:
    """Delete the rollups' rows of the UTC `spans` (whole days), whose rows the caller's
    transaction deleted (store.py: retention); if rows of theirs that the rollups
    counted were kept (above a day's `ingest_seq_max`), drop the rollups instead:
    reads are raw until rebuilt."""
    have = {r[0] for r in conn.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main'").fetchall()}
    if not spans or not have & set(_ROLLUPS):
        return
    if set(_ROLLUPS) - have:  # (not made by refresh_rollups, which makes all)
        drop_rollups(conn)
        return
    kept = conn.execute("SELECT count(*) FROM events WHERE ingest_seq <= ? AND ("
                        + " OR ".join(["timestamp >= ? AND timestamp < ?"] * len(spans))
                        + ")", [watermark(conn), *[t for span in spans for t in span]]
                        ).fetchone()[0]
    if kept:
        drop_rollups(conn)
        return
    for begins, ends in spans:  # (hours are naive UTC timestamps, session ends aware)
        hours = [_naive(begins), _naive(ends)]
        conn.execute("DELETE FROM stats_hourly WHERE hour >= ? AND hour < ?", hours)
        conn.execute("DELETE FROM stats_visitors WHERE hour >= ? AND hour < ?", hours)
        conn.execute("DELETE FROM stats_session_ends WHERE ts >= ? AND ts < ?",
                     [begins, ends])
