"""The dashboard (`/`, static/dashboard/) in a real browser: Debian's Chromium, driven by
Playwright, against a real server process on loopback (bench/crash_loop.Server, port 0).

Skipped, saying why, without /usr/bin/chromium or Playwright (as tests/test_browser_sdk.py,
whose browser fixture and bounds these tests share).

One server and one data set for the module: pages with referrers, tracks, an identify,
two browsers' user agents over HTTP (`/v1/batch`), and a realtime session over the
WebSocket. Then, in the browser:

- the admin logs in through the form; the figures the page shows (overview cards, top
  lists) equal what `/admin/query` SQL counts independently over the same range;
- live: events sent now appear in the latest list, and events per second moves, with
  no reload; clicking one opens the session explorer, which lists that session's rows
  in the order SQL gives;
- a viewer logs in and sees the page (at 1280 px and at a phone's 390 px, nothing wider
  than the screen), and gets 401 from `/admin/query` (bearer token or cookie); a wrong
  token gets the login page again with its error;
- the whole run, every page: no Content-Security-Policy violation (the page's
  `securitypolicyviolation` events and the console's reports, checked to be caught).

No sleeps decide anything: each wait is on a condition with a deadline.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from seed_examples import load_bench_script
from test_browser_sdk import DB_WAIT_S, WAIT_MS, browser  # noqa: F401 (its fixture)
from test_browser_sdk import pytestmark as browser_marks

pytestmark = browser_marks
crash_loop = load_bench_script("crash_loop")

CHROME = ("Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
          "Chrome/120.0.0.0 Safari/537.36")
FIREFOX = "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:121.0) Gecko/20100101 Firefox/121.0"
# The figures must show what the data are now: no cache; a live message twice a second.
CONFIG = "dashboard_cache_s = 0\ndashboard_live_s = 0.5\n"


def _page(anon, path, referrer, ua, **extra):
    props = {"path": path, **({"referrer": referrer} if referrer else {})}
    return {"type": "page", "anonymousId": anon, "properties": props,
            "context": {"userAgent": ua}, **extra}


def _track(who, event, ua, **props):
    return {"type": "track", **who, "event": event, "properties": props,
            "context": {"userAgent": ua}}


DATA = [
    _page("v1", "/", "https://www.google.com/search?q=trio", CHROME),
    _page("v1", "/pricing", "https://google.com/", CHROME),
    _track({"anonymousId": "v1"}, "Signed Up", CHROME, plan="pro"),
    {"type": "identify", "anonymousId": "v1", "userId": "u1", "traits": {"plan": "pro"},
     "context": {"userAgent": CHROME}},
    _page("v2", "/", "https://news.ycombinator.com/item?id=1", FIREFOX),
    _track({"anonymousId": "v2"}, "Order Completed", FIREFOX, revenue=42),
    _track({"anonymousId": "v2"}, "Signed Up", FIREFOX),
    _page("v3", "/docs", None, CHROME),
    _page("v3", "/pricing", None, CHROME),
    _page("v3", "/docs/install", "http://127.0.0.1/docs", CHROME),
    _track({"userId": "u9"}, "Order Completed", FIREFOX, revenue=7),
]
NOT_SESSION = "type NOT IN ('session_start', 'session_end')"


class Server:
    """The server process, its tokens, and the admin's SQL."""

    def __init__(self, tmp: Path) -> None:
        (tmp / "config.toml").write_text(CONFIG)
        self.data = tmp / "data"
        self.proc = crash_loop.Server(self.data, tmp / "server.log", port=0,
                                      extra=("--config", str(tmp / "config.toml")))
        self.proc.wait_healthy()
        self.origin = f"http://{crash_loop.HOST}:{self.proc.port}"
        self.admin_token = (self.data / "admin.token").read_text().strip()
        self.viewer_token = (self.data / "viewer.token").read_text().strip()

    def post(self, path: str, body, headers: dict[str, str]) -> tuple[int, bytes]:
        req = urllib.request.Request(self.origin + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(req, timeout=10) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def send(self, events: list[dict]) -> None:
        status, body = self.post("/v1/batch", {"batch": events},
                                 {"x-write-key": crash_loop.WRITE_KEY})
        assert status == 200 and json.loads(body)["stored"] == len(events), body

    def query(self, sql: str, token: str | None = None) -> list[list]:
        status, body = self.post("/admin/query", {"sql": sql},
                                 {"Authorization": f"Bearer {token or self.admin_token}"})
        assert status == 200, body
        return json.loads(body)["rows"]

    def wait_rows(self, where: str, count: int) -> None:
        deadline = time.monotonic() + DB_WAIT_S
        while self.query(f"SELECT count(*) FROM events WHERE {where}")[0][0] < count:
            assert time.monotonic() < deadline, f"fewer than {count} rows where {where}"
            time.sleep(0.05)  # polling the database, bounded by the deadline


def realtime_session(origin_port: int) -> str:
    """A screen view and a click over the WebSocket; returns the analytics_id."""
    from websockets.sync.client import connect

    aid = crash_loop.create_analytics_id(origin_port)
    with connect(f"ws://{crash_loop.HOST}:{origin_port}/analytics?analytics_id={aid}",
                 open_timeout=10) as ws:
        ws.send(json.dumps({"events": [
            {"type": "screen_view", "payload": {"screen_name": "Home"}},
            {"type": "button_click", "payload": {"btn_id": "play"}}], "seq": 1}))
        assert json.loads(ws.recv(timeout=10))["type"] == "ack"
    return aid


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("dashboard"))
    try:
        s.send(DATA)
        s.aid = realtime_session(s.proc.port)
        s.wait_rows(NOT_SESSION, len(DATA) + 2)
        yield s
    finally:
        s.proc.terminate()


# Each document reports its CSP violations to the console, where `context` collects them
# with the browser's own reports ("Refused to ...").
REPORT_CSP = """document.addEventListener("securitypolicyviolation", e =>
  console.error("CSP violation: " + e.violatedDirective + " " + e.blockedURI));"""


@pytest.fixture
def context(browser):  # noqa: F811 (the fixture imported above)
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(WAIT_MS)
    ctx.add_init_script(REPORT_CSP)
    ctx.csp = []
    ctx.on("console", lambda m: ctx.csp.append(m.text) if
           "CSP violation" in m.text or "Content Security Policy" in m.text else None)
    try:
        yield ctx
        assert ctx.csp == [], "no CSP violation"
    finally:
        ctx.close()


def wait_until(page, expression: str) -> None:
    """Until `expression` is true in the page, for at most WAIT_MS. (Playwright's
    `wait_for_function` compiles its predicate with `new Function` in the page, which
    the CSP refuses: a violation this test would report.)"""
    deadline = time.monotonic() + WAIT_MS / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still false: {expression}"
        page.wait_for_timeout(20)  # polling the page, bounded by the deadline


def log_in(context, server: Server, token: str):
    page = context.new_page()
    page.goto(server.origin + "/")
    page.fill("#token", token)
    page.click("button[type=submit]")
    return page


def shown_figures(page) -> dict:
    """What the page shows, once it has figures: each card's value, each list's items."""
    page.wait_for_selector("body[data-loaded]")
    return page.evaluate("""() => ({
      cards: Object.fromEntries([...document.querySelectorAll(".card")].map(c =>
        [c.dataset.figure, {value: c.dataset.value,
                            text: c.querySelector(".value").textContent}])),
      lists: Object.fromEntries([...document.querySelectorAll("ol.bars")].map(ol =>
        [ol.id.slice(4), [...ol.querySelectorAll("li[data-key]")].map(li =>
          [li.dataset.key, Number(li.dataset.count)])])),
    })""")


def sql_figures(server: Server, since: str, until: str) -> dict:
    """The same figures, counted in SQL by the definitions of storage/stats.py."""
    where = f"timestamp >= '{since}' AND timestamp < '{until}'"
    events = f"{where} AND {NOT_SESSION}"
    (visitors, n, pageviews, screens), = server.query(
        "SELECT count(DISTINCT (project, coalesce(anonymous_id, user_id))), count(*), "
        "count(*) FILTER (type = 'page'), count(*) FILTER (type IN ('screen', 'screen_view')) "
        f"FROM events WHERE {events}")
    (sessions,), = server.query(f"SELECT count(*) FROM events WHERE {where} "
                                "AND type = 'session_start'")
    top = {
        "events": f"SELECT coalesce(event, type), count(*) FROM events WHERE {events} "
                  "GROUP BY 1",
        "pages": "SELECT CASE WHEN type = 'page' THEN properties->>'$.path' WHEN type = 'screen' "
                 "THEN name ELSE properties->>'$.screen_name' END, count(*) FROM events "
                 f"WHERE {events} AND type IN ('page', 'screen', 'screen_view') GROUP BY 1",
        "referrers": "SELECT regexp_replace(coalesce(regexp_extract(properties->>'$.referrer', "
                     "'://([^/:]+)', 1), ''), '^www\\.', ''), count(*) FROM events "
                     f"WHERE {events} AND type = 'page' GROUP BY 1",
        "browsers": "SELECT CASE WHEN (context->>'$.userAgent') LIKE '%Firefox/%' THEN 'Firefox' "
                    "ELSE 'Chrome' END, count(DISTINCT coalesce(anonymous_id, user_id)) "
                    f"FROM events WHERE {events} AND (context->>'$.userAgent') LIKE 'Mozilla%' "
                    "GROUP BY 1",
    }
    return {"cards": {"visitors": visitors, "sessions": sessions, "events": n,
                      "pageviews": pageviews, "screen_views": screens},
            "lists": {k: dict(map(tuple, server.query(sql))) for k, sql in top.items()}}


def figures_json(page) -> dict:
    return page.evaluate("""fetch("/dashboard/figures?range=7d").then(r => r.json())""")


def test_admin_sees_the_figures_sql_gives(server, context):
    page = log_in(context, server, server.admin_token)
    shown = shown_figures(page)
    assert page.evaluate("document.body.dataset.role") == "admin"
    assert page.evaluate("location.hash") == "#range=7d"
    r = figures_json(page)["range"]
    want = sql_figures(server, r["since"], r["until"])
    assert want["cards"] == {"visitors": 5, "sessions": 5, "events": 13, "pageviews": 6,
                             "screen_views": 1}, "the data set as loaded"
    for figure, value in want["cards"].items():
        assert shown["cards"][figure]["value"] == str(value), figure
        assert shown["cards"][figure]["text"] == f"{value:,}", figure
    for key in ("events", "pages", "referrers"):
        assert dict(map(tuple, shown["lists"][key])) == want["lists"][key], key
        counts = [n for _, n in shown["lists"][key]]
        assert counts == sorted(counts, reverse=True), f"{key}: the largest first"
    browsers = dict(map(tuple, shown["lists"]["browsers"]))
    assert {k: browsers[k] for k in ("Chrome", "Firefox")} == want["lists"]["browsers"]
    assert "Direct / none" in page.inner_text("#top-referrers")
    # the chart: uPlot drew one series over the range's days
    assert page.locator("#chart canvas").count() == 1
    assert page.evaluate("getComputedStyle(document.querySelector('#chart')).height") == \
        "280px"

    # Another range and a project: the page asks again and says which.
    # (The first answer may come after the second was asked for: the newest one shows.)
    assert page.evaluate("document.body.dataset.range") == "7d"
    page.click("[data-range='24h']")
    wait_until(page, "location.hash === '#range=24h'")
    wait_until(page, "document.body.dataset.range === '24h'")
    assert page.text_content("#chart-unit") == "by hour, UTC"
    page.select_option("#project", "default")
    wait_until(page, "location.hash === '#range=24h&project=default'")
    wait_until(page, "document.querySelector('[data-figure=events]').dataset.value "
                           "=== '13'")  # (everything is in project default)
    page.click("[data-range='30d']")
    wait_until(page, "document.body.dataset.range === '30d'")
    assert page.text_content("#chart-unit") == "by day, UTC"

    # The detector works: an inline style attribute set from script is refused, and seen.
    page.evaluate("document.body.setAttribute('style', 'color: red')")
    deadline = time.monotonic() + 5
    while not context.csp and time.monotonic() < deadline:
        page.wait_for_timeout(20)  # (a bounded wait for the console event)
    assert context.csp and "style" in context.csp[0]
    context.csp.clear()


def test_live_events_arrive_without_reload_and_open_their_session(server, context):
    page = log_in(context, server, server.admin_token)
    page.wait_for_selector("body[data-loaded]")
    page.wait_for_selector("#live-dot.on")
    # Every events-per-second value the page shows, from here on; and a mark a reload
    # would lose.
    page.evaluate("""() => { window.stayed = true; window.rates = [];
      const rate = document.querySelector('#events-per-s');
      new MutationObserver(() => rates.push(Number(rate.textContent)))
        .observe(rate, {childList: true, characterData: true, subtree: true}); }""")
    server.send([_page("live-1", "/live", None, CHROME),
                 _track({"anonymousId": "live-1"}, "Live Ping", CHROME, n=1),
                 _track({"anonymousId": "live-1"}, "Live Pong", CHROME, n=2)])
    pong = page.locator("#latest button", has_text="Live Pong")
    pong.wait_for()
    page.locator("#latest button", has_text="Live Ping").wait_for()
    wait_until(page, "rates.some(r => r > 0)")
    assert page.evaluate("window.stayed") is True, "no reload"
    # the newest first
    names = page.eval_on_selector_all("#latest .name", "els => els.map(e => e.textContent)")
    assert names.index("Live Pong") < names.index("Live Ping")

    session_id = pong.get_attribute("data-session")
    pong.click()
    page.wait_for_selector("#session[open] #session-events li.hit")
    shown = page.eval_on_selector_all("#session-events li", "els => els.map(e => "
                                      "[Number(e.dataset.seq), e.querySelector('.kind')"
                                      ".textContent])")
    rows = server.query("SELECT ingest_seq, type, coalesce(event, name, type) FROM events "
                        f"WHERE session_id = '{session_id}' ORDER BY timestamp, ingest_seq")
    assert [s for s, _ in shown] == [r[0] for r in rows]
    assert [k for _, k in shown] == ["session started", "page", "Live Ping", "Live Pong"]
    assert page.inner_text("#session-meta").startswith(session_id)
    assert page.inner_text("#session-events li.hit .kind") == "Live Pong"
    page.click("#session .close")  # (a `<form method=dialog>`: no script, no request)
    page.wait_for_selector("#session", state="hidden")


def test_a_viewer_sees_the_page_but_not_admin(server, context):
    page = log_in(context, server, server.viewer_token)
    shown = shown_figures(page)
    assert page.evaluate("document.body.dataset.role") == "viewer"
    assert page.inner_text(".role") == "viewer"
    assert int(shown["cards"]["visitors"]["value"]) >= 5
    # on a phone: nothing wider than the screen, the chart resized to fit
    overflow = "document.documentElement.scrollWidth - innerWidth"
    assert page.evaluate(overflow) <= 0
    page.set_viewport_size({"width": 390, "height": 800})
    wait_until(page, "document.querySelector('#chart canvas').getBoundingClientRect().width "
                     "< 390")
    assert page.evaluate(overflow) <= 0
    assert page.evaluate("getComputedStyle(document.querySelector('.cards'))"
                         ".gridTemplateColumns.split(' ').length") == 2
    # neither the viewer token nor the cookie reaches /admin/*
    status, _ = server.post("/admin/query", {"sql": "SELECT 1"},
                            {"Authorization": f"Bearer {server.viewer_token}"})
    assert status == 401
    assert page.evaluate("""fetch("/admin/query", {method: "POST", body: '{"sql": "SELECT 1"}',
                              headers: {"Content-Type": "application/json"}})
                            .then(r => r.status)""") == 401
    # logging out: the login page again, and the figures are refused
    page.click(".logout button")
    page.wait_for_selector("#token")
    assert page.evaluate("fetch('/dashboard/figures?range=7d').then(r => r.status)") == 401


def test_a_wrong_token_gets_the_login_page_with_its_error(server, context):
    page = context.new_page()
    answers = []
    page.on("response", lambda r: answers.append(r.status) if r.url.endswith("/login") else None)
    page.goto(server.origin + "/")
    page.fill("#token", "not-a-token")
    page.click("button[type=submit]")
    page.wait_for_selector(".login-error")
    assert answers == [401]
    assert "neither the admin token nor the viewer token" in page.inner_text(".login-error")
    assert page.locator("#token").count() == 1 and page.locator("#overview").count() == 0
