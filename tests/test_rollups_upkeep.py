"""The rollups (stats.py) follow the rows deleted under them, in the deleting transaction:
`Store.forget` drops them (reads take raw rows until refreshes rebuild them), retention
(`Store.delete_days`) deletes the rollup rows of the days it deletes. Figures read
through the rollups equal the raw ones afterwards, and nothing of the deleted rows stays
counted."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from duckdb import IOException
from test_stats import CHROME_WIN, D, H, M, Maker, T, data, everything

from triolytics.core.journal import Position
from triolytics.storage import stats
from triolytics.storage.store import Store

TABLES = set(stats._ROLLUPS)


@pytest.fixture
def store(tmp_path):
    store = Store(tmp_path / "events.duckdb")
    store.load(data(), Position(0, 1))
    while stats.refresh_rollups(store.conn):
        pass
    assert stats.watermark(store.conn) == len(data())
    yield store
    store.close()


def tables(c) -> set[str]:
    return {r[0] for r in c.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
        "AND schema_name = 'main'").fetchall()} & TABLES


def rollups(c) -> dict[str, list]:
    return {t: sorted(c.execute(f"SELECT * FROM {t}").fetchall(), key=repr)
            for t in sorted(tables(c))}


def visitor_hashes(c, anon: str) -> set[int]:
    return {r[0] for r in c.execute(
        "SELECT DISTINCT hash(project, coalesce(anonymous_id, user_id)) FROM events "
        "WHERE anonymous_id = ?", [anon]).fetchall()}


# --- forget
def test_forget_drops_what_the_rollups_counted(store):
    c = store.conn.cursor()
    a1 = visitor_hashes(c, "a1")
    assert a1 <= {r[0] for r in c.execute("SELECT vid FROM stats_visitors").fetchall()}
    assert stats.top(c, T, T + D).pages[2] == stats.Item("/pricing", 1)  # a1's alone
    assert store.forget("anonymous_id", "a1", None) == (9, 0)  # s1 and s3, 4 + 5 rows
    assert tables(c) == set()  # a1's visitor hash gone with them
    assert stats.watermark(c) == 0
    raw = everything(c, False)
    assert everything(c, True) == raw
    o = stats.overview(c, T, T + D)
    assert o == stats.overview(c, T, T + D, use_rollups=False)
    assert (o.visitors.value, o.events.value, o.pageviews.value) == (3, 5, 1)  # a2, w1, u1
    t = stats.top(c, T, T + D)
    assert t == stats.top(c, T, T + D, use_rollups=False)
    assert [i.key for i in t.pages] == ["Home", "/", "Settings"]  # "/pricing" gone
    assert t.events == [stats.Item("screen_view", 2), stats.Item("button_click", 1),
                        stats.Item("page", 1), stats.Item("screen", 1)]  # no "signup"
    assert stats.refresh_rollups(store.conn) == store.count()  # built again, without a1
    assert stats.watermark(c) == c.execute("SELECT max(ingest_seq) FROM events").fetchone()[0]
    assert not a1 & {r[0] for r in c.execute("SELECT vid FROM stats_visitors").fetchall()}
    assert everything(c, True) == raw


def test_deleting_nothing_keeps_the_rollups(store):
    before = rollups(store.conn)
    assert store.forget("user", "nobody", None) == (0, 0)
    assert store.delete_days([]) == 0
    assert store.delete_days([("2025-01-01", None)]) == 0
    assert rollups(store.conn) == before


class FailOn:
    """`store.conn`, failing the first statement that contains `text`: a failure in the
    middle of a transaction."""

    def __init__(self, conn, text: str) -> None:
        self.conn, self.text, self.failed = conn, text, False

    def execute(self, sql, *args):
        if self.text in sql and not self.failed:
            self.failed = True
            raise IOException(f"injected: {sql}")
        return self.conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self.conn, name)


def test_a_failed_forget_keeps_rows_and_rollups(store, monkeypatch):
    """Failing after the DELETE and the first DROPs: all of it is undone."""
    before = rollups(store.conn), store.count()
    raw = everything(store.conn, False)
    monkeypatch.setattr(store, "conn", FailOn(store.conn, "stats_visitors"))
    with pytest.raises(IOException, match="injected"):
        store.forget("anonymous_id", "a1", None)
    assert store.conn.failed
    monkeypatch.undo()
    assert (rollups(store.conn), store.count()) == before
    assert set(rollups(store.conn)) == TABLES
    assert everything(store.conn, True) == raw
    assert store.forget("anonymous_id", "a1", None) == (9, 0)  # and it can be done again


# --- retention
def older_rows() -> list:
    """Two more days before `data()`'s: the 8th (a1's visit) and the 9th's morning."""
    m = Maker()
    m.session("web", "http", "s8", T - 2 * D + 10 * H,
              [("page", 0, {"props": {"path": "/old"}}), ("track", 2, {"event": "signup"})],
              end=(5, 120_000, 2), anon="a1", ua=CHROME_WIN)
    m.session("web", "http", "s9", T - D + 2 * H,
              [("page", 0, {"props": {"path": "/"}})], end=(1, 0, 1), anon="a8",
              ua=CHROME_WIN)
    return m.rows


def since(c, t) -> dict[str, int]:
    """The rollup rows of hours (or session ends) before `t`, by table."""
    naive = stats._naive(t)
    return {
        "stats_hourly": c.execute("SELECT count(*) FROM stats_hourly WHERE hour < ?",
                                  [naive]).fetchone()[0],
        "stats_visitors": c.execute("SELECT count(*) FROM stats_visitors WHERE hour < ?",
                                    [naive]).fetchone()[0],
        "stats_session_ends": c.execute(
            "SELECT count(*) FROM stats_session_ends WHERE ts < ?", [t]).fetchone()[0]}


def after_cutoff(c) -> list:
    """Figures of ranges after T (the previous range's figures of an overview aside)."""
    out = []
    for a, b in [(T, T + 2 * D), (T + H, T + 5 * H)]:
        o = msgspec.structs.asdict(stats.overview(c, a, b))
        out += [{k: f.value for k, f in o.items()}, stats.series(c, a, b), stats.top(c, a, b)]
    return msgspec.to_builtins(out)


@pytest.fixture
def older(store):
    store.load(older_rows(), Position(0, 2))
    while stats.refresh_rollups(store.conn):
        pass
    return store


def test_retention_deletes_the_rollups_of_its_days(older):
    c = older.conn.cursor()
    assert all(since(c, T).values())
    before = after_cutoff(c)
    assert older.delete_days([("2026-01-08", None), ("2026-01-09", None)]) == 10
    assert since(c, T) == dict.fromkeys(since(c, T), 0)
    assert tables(c) == TABLES and stats.watermark(c) == older.last_seq
    assert after_cutoff(c) == before
    assert everything(c, True) == everything(c, False)  # (RANGES reach before T too)
    o = stats.overview(c, T - 3 * D, T + 2 * D)
    assert o == stats.overview(c, T - 3 * D, T + 2 * D, use_rollups=False)
    assert (o.visitors.value, o.sessions.value, o.events.value) == (4, 5, 10)


def test_retention_of_some_days_only(older):
    """A day refused (not archived) keeps its rollups; the others go."""
    c = older.conn.cursor()
    nine = since(c, T)
    eight = since(c, T - D)
    assert older.delete_days([("2026-01-08", None)]) == 4
    assert since(c, T - D) == dict.fromkeys(eight, 0)
    assert since(c, T) == {k: nine[k] - eight[k] for k in nine}
    assert everything(c, True) == everything(c, False)
    assert stats.overview(c, T - D, T).visitors.value == 2  # a8 and a3, on the 9th


def test_retention_keeping_rolled_up_late_rows(older):
    """Rows above a day's `ingest_seq_max` stay; if the rollups counted them, the rollups
    are dropped (reads are raw until rebuilt), so figures stay exact."""
    c = older.conn.cursor()
    late = Maker()
    late.row("web", "http", "track", T - D + 3 * H, sid="s9", anon="a8", event="late",
             ua=CHROME_WIN)
    seq_max = older.last_seq
    older.load(late.rows, Position(0, 3))
    assert older.delete_days([("2026-01-09", seq_max)]) == 6  # s0 and s9; not the late one
    assert older.count() == len(data()) + len(older_rows()) + 1 - 6
    assert tables(c) == TABLES  # the late row was not rolled up: rollups kept
    assert since(c, T) == since(c, T - D)
    assert everything(c, True) == everything(c, False)
    assert stats.refresh_rollups(older.conn) == 1  # now it is
    late.row("web", "http", "track", T - D + 4 * H, sid="s9", anon="a8", event="later",
             ua=CHROME_WIN)
    older.load(late.rows[1:], Position(0, 4))
    seq_max = older.last_seq
    late.row("web", "http", "track", T - D + 5 * H, sid="s9", anon="a8", event="latest",
             ua=CHROME_WIN)
    older.load(late.rows[2:], Position(0, 5))
    assert stats.refresh_rollups(older.conn) == 2
    assert older.delete_days([("2026-01-09", seq_max)]) == 2  # "late" and "later"
    assert stats.watermark(c) == 0  # "latest" was counted: dropped
    assert stats.overview(c, T - D, T).events.value == 1
    assert everything(c, True) == everything(c, False)


def test_retention_days_are_utc_whatever_the_time_zone(older):
    """A UTC day is 24 hours, also where the session's TimeZone changes clocks that day
    (DuckDB takes it from the process's TZ): its rows and its rollups go, nothing more."""
    c = older.conn
    c.execute("SET TimeZone = 'Europe/Berlin'")
    days = ["2026-03-29", "2026-10-25"]  # Berlin's days of 23 and 25 hours
    m = Maker()
    for day in days:  # one row in each hour from the day before's last to the day after's 2nd
        begins = datetime.fromisoformat(day).replace(tzinfo=UTC)
        for hour in range(-1, 26):
            m.row("web", "http", "track", begins + hour * H + 30 * M, sid="dst", anon="z",
                  event=f"{day} {hour}", ua=CHROME_WIN)
    older.load(m.rows, Position(0, 3))
    while stats.refresh_rollups(c):
        pass
    for day in days:
        assert older.delete_days([(day, None)]) == 24
    assert [r[0] for r in c.execute("SELECT event FROM events WHERE anonymous_id = 'z' "
                                    "ORDER BY timestamp").fetchall()] == [
        f"{day} {hour}" for day in days for hour in (-1, 24, 25)]
    assert stats.watermark(c) == older.last_seq
    whole = (T, datetime(2027, 1, 1, tzinfo=UTC))
    assert stats.overview(c, *whole) == stats.overview(c, *whole, use_rollups=False)
    assert stats.series(c, *whole) == stats.series(c, *whole, use_rollups=False)
    assert [i for i in stats.top(c, *whole, limit=100).events if i.key[:4] == "2026"] == [
        stats.Item(f"{day} {hour}", 1) for day in days for hour in (-1, 24, 25)]
