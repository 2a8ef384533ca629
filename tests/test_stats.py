"""stats.py on a small data set whose every figure is computed by hand; rollups == raw."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from triolytics.core.journal import Position
from triolytics.core.rows import Row
from triolytics.storage import stats
from triolytics.storage.store import Store

T = datetime(2026, 1, 10, tzinfo=UTC)  # the day under test: R = [T, T + 1 day)
H, M, D = timedelta(hours=1), timedelta(minutes=1), timedelta(days=1)
CHROME_WIN = ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like "
              "Gecko) Chrome/120.0.0.0 Safari/537.36")
FIREFOX_LINUX = "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0"
CHROME_ANDROID = ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like "
                  "Gecko) Chrome/120.0.0.0 Mobile Safari/537.36")
SAFARI_MAC = ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_2) AppleWebKit/605.1.15 (KHTML, "
              "like Gecko) Version/17.2 Safari/605.1.15")
SAFARI_IPHONE = ("Mozilla/5.0 (iPhone; CPU iPhone OS 17_2 like Mac OS X) AppleWebKit/605.1.15"
                 " (KHTML, like Gecko) Version/17.2 Mobile/15E148 Safari/604.1")


def us(t: datetime) -> int:
    return int(t.timestamp() * 1_000_000)


class Maker:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def row(self, project, channel, type_, at, *, sid, anon=None, user=None, event=None,
            name=None, props=None, ua=None, context=None) -> None:
        if context is None and ua is not None:
            context = {"ip": "1.2.3.4", "userAgent": ua}
        self.rows.append(Row(
            None, project, channel, type_, event, name, anon, user, None, None, sid, us(at),
            None, None, us(at), None if props is None else json.dumps(props), None,
            None if context is None else json.dumps(context), None))

    def session(self, project, channel, sid, start, events, end=None, *, anon=None,
                user=None, ua=None) -> None:
        """A session: its start row, `events` as (type, minutes after start, fields), and
        its end row at `end` minutes (None: still open)."""
        who = {"anon": anon, "user": user}
        self.row(project, channel, "session_start", start, sid=sid, **who)
        for type_, minutes, fields in events:
            self.row(project, channel, type_, start + minutes * M, sid=sid, ua=ua, **who,
                     **fields)
        if end is not None:
            minutes, duration_ms, count = end
            self.row(project, channel, "session_end", start + minutes * M, sid=sid, **who,
                     props={"duration_ms": duration_ms, "event_count": count})


def page(path, referrer=None):
    props = {"path": path}
    if referrer is not None:
        props["referrer"] = referrer
    return {"props": props}


def data() -> list[Row]:
    m = Maker()
    # the previous day: one bounced visit from an iPhone, its referrer in context.page
    m.session("web", "http", "s0", T - 12 * H,
              [("page", 0, {"name": "Blog", "context": {
                  "userAgent": SAFARI_IPHONE, "page": {"path": "/blog",
                                                       "referrer": "https://twitter.com/x"}}})],
              end=(30, 0, 1), anon="a3")
    m.session("web", "http", "s1", T + 1 * H,
              [("page", 0, page("/", "https://www.google.com/search?q=x")),
               ("page", 5, page("/pricing", "")),
               ("track", 10, {"event": "signup"})],
              end=(40, 600_000, 3), anon="a1", ua=CHROME_WIN)
    m.session("app", "ws", "s4", T + 2 * H,
              [("screen_view", 0, {"props": {"screen_name": "Home"}}),
               ("button_click", 1, {"props": {"btn_id": "play"}}),
               ("screen_view", 2, {"props": {"screen_name": "Home"}})],
              end=(32, 120_000, 3), anon="w1", ua=CHROME_ANDROID)
    m.session("web", "http", "s2", T + 3 * H + 30 * M,
              [("page", 0, page("/", "https://news.ycombinator.com/item?id=1"))],
              end=(30, 0, 1), anon="a2", ua=FIREFOX_LINUX)
    m.session("app", "http", "s5", T + 5 * H, [("screen", 0, {"name": "Settings"})],
              user="u1", ua=SAFARI_MAC)  # still open
    # a1 again late in the day: it ends the next day, outside the range
    m.session("web", "http", "s3", T + 23 * H + 50 * M,
              [("page", 0, page("/")), ("track", 5, {"event": "signup"})],
              end=(35, 300_000, 2), anon="a1", ua=CHROME_WIN)
    return m.rows


@pytest.fixture
def conn(tmp_path):
    store = Store(tmp_path / "events.duckdb")
    store.load(data(), Position(0, 1))
    yield store.conn.cursor()
    store.close()


def values(o: stats.Overview) -> dict:
    return {k: (f.value, f.previous, f.change) for k, f in msgspec.structs.asdict(o).items()}


def test_overview_by_hand(conn):
    got = values(stats.overview(conn, T, T + D))
    assert got == {
        "visitors": (4, 1, 3.0),  # a1, a2 (web), w1, u1 (app); the day before: a3
        "sessions": (5, 1, 4.0),  # s1 s2 s3 s4 s5 start in the day
        "events": (10, 1, 9.0),  # 3 + 1 + 2 + 3 + 1, start and end rows not counted
        "pageviews": (4, 1, 3.0),
        "screen_views": (3, 0, None),  # 2 screen_view (WebSocket) + 1 screen (HTTP)
        "bounce_rate": (pytest.approx(1 / 3), 1.0, pytest.approx(-2 / 3)),  # s2 of s1 s2 s4
        "duration_median_ms": (120_000.0, 0.0, None),
        "duration_mean_ms": (240_000.0, 0.0, None),
    }


def test_overview_project_filter(conn):
    got = values(stats.overview(conn, T, T + D, "web"))
    assert {k: v[0] for k, v in got.items()} == {
        "visitors": 2, "sessions": 3, "events": 6, "pageviews": 4, "screen_views": 0,
        "bounce_rate": 0.5, "duration_median_ms": 300_000.0, "duration_mean_ms": 300_000.0}
    app = values(stats.overview(conn, T, T + D, "app"))
    assert {k: v[0] for k, v in app.items()} == {
        "visitors": 2, "sessions": 2, "events": 4, "pageviews": 0, "screen_views": 3,
        "bounce_rate": 0.0, "duration_median_ms": 120_000.0, "duration_mean_ms": 120_000.0}
    assert app["visitors"][1] == 0 and app["visitors"][2] is None


def test_overview_of_nothing(conn):
    got = values(stats.overview(conn, T + 30 * D, T + 31 * D))
    assert got["events"] == (0, 0, None)
    assert got["bounce_rate"] == (None, None, None)
    assert got["duration_median_ms"] == (None, None, None)


def test_series_hourly_zero_filled(conn):
    s = stats.series(conn, T, T + D)
    assert s.interval == "hour"
    assert s.buckets[:2] == ["2026-01-10T00:00:00Z", "2026-01-10T01:00:00Z"]
    assert len(s.buckets) == 24

    def at(hours: dict) -> list[int]:
        return [hours.get(h, 0) for h in range(24)]

    assert s.events == at({1: 3, 2: 3, 3: 1, 5: 1, 23: 2})
    assert s.views == at({1: 2, 2: 2, 3: 1, 5: 1, 23: 1})
    assert s.visitors == at({1: 1, 2: 1, 3: 1, 5: 1, 23: 1})
    assert s.sessions == at({1: 1, 2: 1, 3: 1, 5: 1, 23: 1})


def test_series_daily_beyond_two_days(conn):
    assert stats.series(conn, T - D, T + D).interval == "hour"  # exactly 2 days: 48 hours
    assert len(stats.series(conn, T - D, T + D).buckets) == 48
    s = stats.series(conn, T - 2 * D, T + D + H)  # a partial last day is a bucket too
    assert s.interval == "day"
    assert s.buckets == ["2026-01-08T00:00:00Z", "2026-01-09T00:00:00Z",
                         "2026-01-10T00:00:00Z", "2026-01-11T00:00:00Z"]
    assert s.events == [0, 1, 10, 0]
    assert s.visitors == [0, 1, 4, 0]
    assert s.sessions == [0, 1, 5, 0]
    assert s.views == [0, 1, 7, 0]


def test_top_lists(conn):
    t = stats.top(conn, T, T + D)
    as_pairs = msgspec.to_builtins(t)
    assert as_pairs == {
        "events": [["page", 4], ["screen_view", 2], ["signup", 2], ["button_click", 1],
                   ["screen", 1]],
        "pages": [["/", 3], ["Home", 2], ["/pricing", 1], ["Settings", 1]],
        "referrers": [["", 2], ["google.com", 1], ["news.ycombinator.com", 1]],
        "browsers": [["Chrome", 1], ["Chrome Mobile", 1], ["Firefox", 1], ["Safari", 1]],
        "os": [["Android", 1], ["Linux", 1], ["Mac OS X", 1], ["Windows", 1]],
    }
    short = stats.top(conn, T, T + D, "web", limit=1)
    assert msgspec.to_builtins(short) == {
        "events": [["page", 4]], "pages": [["/", 3]], "referrers": [["", 2]],
        "browsers": [["Chrome", 1]], "os": [["Linux", 1]]}
    before = stats.top(conn, T - D, T)  # the page's path and referrer from its context
    assert before.pages == [stats.Item("/blog", 1)]
    assert before.referrers == [stats.Item("twitter.com", 1)]
    assert before.browsers == [stats.Item("Mobile Safari", 1)]


def test_user_agents_parsed_once(conn):
    stats.browser_and_os.cache_clear()
    stats.top(conn, T, T + D)
    stats.top(conn, T, T + D)
    info = stats.browser_and_os.cache_info()
    assert info.misses == 4  # (and hit on every later read)


def test_session_explorer(conn):
    got = stats.session_events(conn, "s1")
    assert [e.type for e in got] == ["session_start", "page", "page", "track", "session_end"]
    assert got[1].timestamp == "2026-01-10T01:00:00.000000Z"
    assert msgspec.json.decode(got[2].properties) == {"path": "/pricing", "referrer": ""}
    assert got[3].event == "signup"
    assert json.loads(msgspec.json.encode(got[4]))["properties"] == {
        "duration_ms": 600_000, "event_count": 3}
    assert stats.session_events(conn, "s1", "app") == []


RANGES = [(T, T + D), (T - 2 * D, T + 2 * D),  # whole hours; edges inside hours:
          (T + 1 * H + 3 * M, T + 5 * H + 1 * M), (T + 2 * H + 1 * M, T + 2 * H + 2 * M),
          (T + 23 * H + 52 * M, T + D + 40 * M)]


def everything(conn, use_rollups: bool) -> list:
    out = []
    for since, until in RANGES:
        for project in (None, "web"):
            out += [stats.overview(conn, since, until, project, use_rollups=use_rollups),
                    stats.series(conn, since, until, project, use_rollups=use_rollups),
                    stats.top(conn, since, until, project, use_rollups=use_rollups)]
    return msgspec.to_builtins(out)


def test_rollups_equal_raw(tmp_path):
    store = Store(tmp_path / "events.duckdb")
    rows = data()
    store.load(rows[:20], Position(0, 1))
    c = store.conn.cursor()
    assert stats.watermark(c) == 0
    assert stats.refresh_rollups(store.conn, max_rows=7) == 7  # in steps
    assert stats.refresh_rollups(store.conn) == 13
    assert stats.refresh_rollups(store.conn) == 0
    assert stats.watermark(c) == 20
    store.load(rows[20:], Position(0, 2))  # the rest only raw: past the watermark
    raw = everything(c, False)
    assert everything(c, True) == raw
    assert stats.refresh_rollups(store.conn) == len(rows) - 20
    assert everything(c, True) == raw
    # a late event (an old timestamp, arriving now) lands in an hour already rolled up
    late = Maker()
    late.row("web", "http", "track", T + 1 * H + 30 * M, sid="s1", anon="a9",
             event="late", ua=CHROME_WIN)
    store.load(late.rows, Position(0, 3))
    raw = everything(c, False)
    assert everything(c, True) == raw
    assert stats.refresh_rollups(store.conn) == 1
    assert everything(c, True) == raw
    assert stats.overview(c, T, T + D).visitors.value == 5
    stats.reset_rollups(store.conn)
    assert stats.watermark(c) == 0
    assert everything(c, True) == raw
    store.close()


def test_rollups_of_another_hash_are_rebuilt(conn):
    assert stats.refresh_rollups(conn) == len(data())
    conn.execute("UPDATE stats_mark SET hashing = hashing + 1")  # as another DuckDB made them
    assert stats.watermark(conn) == 0  # not read: its visitor hashes would not match
    assert stats.overview(conn, T, T + D).visitors.value == 4
    assert stats.refresh_rollups(conn) == len(data())  # dropped and built again
    assert stats.watermark(conn) == len(data())
    assert stats.overview(conn, T, T + D).visitors.value == 4


def test_a_referrer_of_the_pages_own_site_is_no_referral(tmp_path):
    m = Maker()
    url = {"url": "https://www.shop.example/cart"}
    m.session("web", "http", "s9", T, [
        ("page", 0, page("/", "https://news.ycombinator.com/")),  # (no url: counted)
        ("page", 1, {"props": {"path": "/cart", "referrer": "https://shop.example/", **url}}),
        ("page", 2, {"props": {"path": "/pay", "referrer": "https://duck.example/", **url}}),
        ("page", 3, {"props": {"path": "/x"}, "context": {"page": {
            "url": "http://Shop.example:8080/x", "referrer": "http://shop.example/cart"}}}),
        ("page", 4, {"props": {"path": "/y", **url}})], anon="a9")
    store = Store(tmp_path / "events.duckdb")
    try:
        store.load(m.rows, Position(0, 1))
        conn = store.conn.cursor()
        raw = stats.top(conn, T, T + D, use_rollups=False)
        assert msgspec.to_builtins(raw.referrers) == [
            ["", 1], ["duck.example", 1], ["news.ycombinator.com", 1]]
        stats.refresh_rollups(conn)
        assert stats.top(conn, T - H, T + D + H) == stats.top(conn, T - H, T + D + H,
                                                               use_rollups=False)
        assert stats.top(conn, T, T + D).referrers == raw.referrers
    finally:
        store.close()


def test_a_visitor_hour_is_one_row_however_many_refreshes_it_spans(tmp_path):
    store = Store(tmp_path / "events.duckdb")
    try:
        conn = store.conn.cursor()
        for i in range(3):  # one visitor, one hour, three loads each folded in alone
            m = Maker()
            m.row("web", "http", "page", T + i * M, sid="s1", anon="a1", ua=CHROME_WIN,
                  props={"path": f"/{i}"})
            store.load(m.rows, Position(0, i + 1))
            assert stats.refresh_rollups(conn) == 1
        assert conn.execute("SELECT count(*) FROM stats_visitors").fetchone() == (1,)
        assert stats.overview(conn, T, T + H).visitors.value == 1
    finally:
        store.close()
