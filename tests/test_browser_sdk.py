"""The SDK (static/sdk.js) in a real browser: Debian's Chromium, driven by Playwright.

Playwright drives the system's /usr/bin/chromium (`make test` installs Debian's
`chromium`; Playwright never downloads a browser of its own). Without either, the tests
are skipped, saying why.

Everything is on loopback. The server is a real process (bench/crash_loop.Server) on
127.0.0.1, port 0, so it can be killed and started again on the same data directory and
port. The test pages come from another origin: a small http.server on 127.0.0.2, so the
SDK's requests are cross-origin (CORS, a module imported from elsewhere, `ws://` to
another host), as on a real site. What was stored is read through the server's
`/admin/query` with the admin token of the data directory.

- both variants: `/sdk.js` as a classic script and `import` from `/sdk.mjs`, each with
  both transports (realtime and http with a write key), and what each stores as context;
- offline (the browser's own network emulation): tracking goes on, a reload keeps the
  buffer (localStorage), and once online `flush()` stores every event exactly once;
- the server killed (`kill -9`) or stopped mid-stream and started again: the realtime
  session resumes with the same session id and no event is lost or stored twice.

No sleeps decide anything: each wait is on a condition with a deadline.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from seed_examples import load_bench_script

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PAGE_HOST = "127.0.0.2"  # the pages' origin; the server is on 127.0.0.1
WAIT_MS = 20_000  # the bound of every wait in the browser
DB_WAIT_S = 20.0  # ...and of every wait for rows (loads into DuckDB run every second)

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                       reason=f"{CHROMIUM} is missing: `make test` installs Debian's chromium"),
    pytest.mark.skipif(sync_playwright is None,
                       reason="playwright (Python) is not installed: `make test` installs it "
                              "from uv.lock"),
]

crash_loop = load_bench_script("crash_loop")
WRITE_KEY = crash_loop.WRITE_KEY


def _loopback_alias_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind((PAGE_HOST, 0))
        return True
    except OSError:
        return False


# --- the browser, the server, the pages


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def context(browser):
    # A fresh profile for each test (its own localStorage and cache), with a locale,
    # time zone and screen the stored context must show.
    ctx = browser.new_context(locale="fr-FR", timezone_id="Europe/Paris",
                              viewport={"width": 1000, "height": 700},
                              screen={"width": 1280, "height": 800}, device_scale_factor=2)
    ctx.set_default_timeout(WAIT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


class Collector:
    """A server process on a data directory; `restart` keeps the directory and the port."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.data, self.runs = tmp, tmp / "data", 0
        self.server = self._start(port=0)
        self.port = self.server.port
        self.origin = f"http://{crash_loop.HOST}:{self.port}"
        self.token = (self.data / "admin.token").read_text().strip()

    def _start(self, port: int):
        self.runs += 1
        server = crash_loop.Server(self.data, self.tmp / f"server-{self.runs}.log", port=port)
        server.wait_healthy()
        return server

    def down(self, how: str) -> None:
        """`kill -9`, or SIGTERM and wait for the exit."""
        self.server.kill() if how == "kill" else self.server.terminate()

    def up(self) -> None:
        """A new process on the same data directory and port."""
        self.server = self._start(port=self.port)

    def stop(self) -> None:
        if self.server.proc.poll() is None:
            self.server.terminate()

    def query(self, sql: str) -> list[list]:
        body = json.dumps({"sql": sql}).encode()
        req = urllib.request.Request(f"{self.origin}/admin/query", body,
                                     {"Authorization": f"Bearer {self.token}",
                                      "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as answer:
            return json.load(answer)["rows"]

    def rows(self, columns: str, count: int, where: str = "TRUE") -> list[list]:
        """The clients' events (`where`), once at least `count` are there (bounded wait)."""
        sql = (f"SELECT {columns} FROM events WHERE type NOT IN ('session_start', 'session_end') "
               f"AND ({where}) ORDER BY ingest_seq")
        deadline = time.monotonic() + DB_WAIT_S
        while True:
            rows = self.query(sql)
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)  # polling the database, bounded by the deadline


@pytest.fixture
def collector(tmp_path):
    c = Collector(tmp_path)
    try:
        yield c
    finally:
        c.stop()


class Pages(http.server.ThreadingHTTPServer):
    """Serves `pages` (path -> HTML) from PAGE_HOST: the site that embeds the SDK."""

    daemon_threads = True

    def __init__(self, pages: dict[str, str]) -> None:
        self.pages = pages
        super().__init__((PAGE_HOST, 0), _PageHandler)
        self.origin = f"http://{PAGE_HOST}:{self.server_address[1]}"


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.pages.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        # Fresh for a while, as many sites' pages are: a navigation may come from the cache.
        self.send_header("Cache-Control", "max-age=600")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def pages():
    if not _loopback_alias_works():
        pytest.skip(f"cannot bind {PAGE_HOST}: the pages need an origin other than the server's")
    site = Pages({})
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield site
    finally:
        site.shutdown()
        site.server_close()


# In the page: `record(t, prefix, call, ...args)` makes a call on instance `t` and keeps
# the messageId it was given (the newest entry of that instance's stored buffer), so the
# test knows every id the page made.
RECORD = """
<script>
window.made = [];
window.record = (t, prefix, call, ...args) => {
  t[call](...args);
  const q = JSON.parse(localStorage.getItem(prefix + ".q"));
  window.made.push(q[q.length - 1].messageId);
};
window.errors = [];
window.onError = e => window.errors.push(e.code + ": " + e.message);
</script>
"""


def classic_page(server: str, options: str) -> str:
    return f"""<!doctype html><html><head><title>Classic page</title>{RECORD}
<script src="{server}/sdk.js"></script>
<script>
window.rt = triolytics.init({{storagePrefix: "rt", onError, {options}}});
window.hp = triolytics.init({{storagePrefix: "hp", writeKey: "{WRITE_KEY}", onError, {options}}});
window.sdkLoaded = true;
</script></head><body><p>classic</p></body></html>"""


def module_page(server: str, options: str) -> str:
    return f"""<!doctype html><html><head><title>Module page</title>{RECORD}
<script type="module">
import triolytics, {{ init }} from "{server}/sdk.mjs";
window.rt = init({{host: "{server}", storagePrefix: "rt", onError, {options}}});
window.hp = triolytics.init({{host: "{server}", storagePrefix: "hp", writeKey: "{WRITE_KEY}",
                              onError, {options}}});
window.sdkLoaded = true;
</script></head><body><p>module</p></body></html>"""


def open_page(context, url: str, referrer_page: str | None = None):
    """Open `url` (by a link from `referrer_page` when given) and wait for the SDK."""
    page = context.new_page()
    if referrer_page is None:
        page.goto(url)
    else:
        page.goto(referrer_page)
        page.click("a#go")
    page.wait_for_function("window.sdkLoaded === true")
    return page


def flush(page, name: str) -> None:
    page.evaluate(f"{name}.flush()")


# --- a. both variants, both transports, and the context each stores


@pytest.mark.parametrize("variant", ["classic", "module"])
def test_both_variants_send_over_both_transports(variant, collector, pages, context):
    make = classic_page if variant == "classic" else module_page
    pages.pages["/app.html"] = make(collector.origin, "")
    pages.pages["/"] = '<title>Home</title><a id="go" href="/app.html?from=home">go</a>'
    page = open_page(context, f"{pages.origin}/app.html?from=home",
                     referrer_page=f"{pages.origin}/")
    page.evaluate("""() => {
      for (const [t, p] of [[rt, "rt"], [hp, "hp"]]) {
        record(t, p, "track", "Signed Up", {plan: "pro", via: p});
        record(t, p, "page");
        record(t, p, "identify", "u-" + p, {email: "a@example.com"});
      }
    }""")
    page.evaluate("Promise.all([rt.flush(), hp.flush()])")
    made = page.evaluate("made")
    stats = page.evaluate("({rt: rt.stats(), hp: hp.stats()})")
    browser_env = page.evaluate("""({ua: navigator.userAgent, lang: navigator.language,
                                     url: location.href, referrer: document.referrer})""")
    assert page.evaluate("errors") == []

    rows = collector.rows("message_id, channel, type, event, anonymous_id, user_id, "
                          "properties::VARCHAR, context::VARCHAR, session_id", len(made))
    assert sorted(r[0] for r in rows) == sorted(made), "each event stored once, by its id"
    url, referrer = browser_env["url"], browser_env["referrer"]
    assert url == f"{pages.origin}/app.html?from=home" and referrer == f"{pages.origin}/"
    page_props = {"path": "/app.html", "referrer": referrer, "search": "?from=home",
                  "title": f"{variant.capitalize()} page", "url": url}

    http = [r for r in rows if r[1] == "http"]
    assert [(r[2], r[3]) for r in http] == [("track", "Signed Up"), ("page", None),
                                           ("identify", None)]
    assert {r[4] for r in http} == {stats["hp"]["anonymousId"]}
    assert [r[5] for r in http] == [None, None, "u-hp"]
    assert json.loads(http[0][6]) == {"plan": "pro", "via": "hp"}
    assert json.loads(http[1][6]) == page_props
    for r in http:
        c = json.loads(r[7])
        assert c["library"] == {"name": "triolytics.js", "version": "0.1.0"}
        assert c["userAgent"] == browser_env["ua"] and "Chrome/" in c["userAgent"]
        assert c["locale"] == "fr-FR" == browser_env["lang"]
        assert c["timezone"] == "Europe/Paris"
        assert c["page"] == page_props
        assert c["screen"] == {"width": 1280, "height": 800, "density": 2}
        assert c["ip"] == "127.0.0.1"

    # realtime: the event's name is its type, the anonymous id is the analytics_id, the
    # context is the connection's (address and the browser's User-Agent header).
    ws = [r for r in rows if r[1] == "ws"]
    assert [r[2] for r in ws] == ["Signed Up", "page", "identify"]
    assert {r[4] for r in ws} == {stats["rt"]["analyticsId"]} and stats["rt"]["analyticsId"]
    assert json.loads(ws[0][6]) == {"plan": "pro", "via": "rt"}
    assert json.loads(ws[1][6]) == page_props
    assert json.loads(ws[2][6]) == {"userId": "u-rt", "traits": {"email": "a@example.com"}}
    for r in ws:
        assert json.loads(r[7]) == {"ip": "127.0.0.1", "userAgent": browser_env["ua"]}
    assert len({r[8] for r in ws}) == 1 and ws[0][8], "one realtime session"


# --- b. offline: tracking goes on, a reload keeps the buffer, online again stores each once


@pytest.mark.parametrize("transport", ["realtime", "http"])
def test_offline_reload_then_online_stores_each_event_once(transport, collector, pages, context):
    t = "rt" if transport == "realtime" else "hp"  # the instance, and its storage prefix
    # Short backoffs: the test waits for the SDK's own retries, not for a clock.
    pages.pages["/app.html"] = classic_page(
        collector.origin, "minBackoff: 100, maxBackoff: 1000, flushTimeout: 15000")
    url = f"{pages.origin}/app.html"
    # Tracks events `from` to `to`, then answers the stored buffer (synchronously: before
    # any answer of the server could change it).
    track = ("([name, from, to]) => { for (let i = from; i < to; i++) "
             f"record({t}, '{t}', 'track', name, {{i}}); return localStorage.getItem('{t}.q') }}")
    page = open_page(context, url)
    unacked = json.loads(page.evaluate(track, ["online", 0, 3]))
    assert len(unacked) == 3
    page.evaluate(f"{t}.flush()")

    context.set_offline(True)
    page.wait_for_function("navigator.onLine === false")
    page.evaluate(track, ["offline", 0, 5])
    made = page.evaluate("made")
    reach = f"fetch('{collector.origin}/healthz').then(() => 'reached', () => 'offline')"
    assert page.evaluate(reach) == "offline", "the browser's network emulation cuts loopback"
    queued = json.loads(page.evaluate(f"localStorage.getItem('{t}.q')"))
    assert [m["messageId"] for m in queued] == made[3:]
    # As if the page had died before the first three events' acks came: they are in the
    # stored buffer again, and go again, with the same ids, to be stored once.
    queued = unacked + queued
    page.evaluate(f"q => localStorage.setItem('{t}.q', q)", json.dumps(queued))

    # A reload while offline: the page and the SDK come from the browser's cache; the
    # buffer comes from localStorage, and tracking goes on.
    page.goto(url)
    page.wait_for_function("window.sdkLoaded === true")
    assert page.evaluate(f"{t}.ready.then(() => {t}.stats().queued)") == 8
    page.evaluate(track, ["offline", 5, 8])
    made += page.evaluate("made")  # the reloaded page's own
    assert collector.query("SELECT count(*) FROM events WHERE event = 'offline' "
                           "OR type = 'offline'") == [[0]]

    context.set_offline(False)
    page.wait_for_function("navigator.onLine === true")
    page.evaluate(f"{t}.flush()")
    assert page.evaluate(f"{t}.stats().queued") == 0
    assert page.evaluate("errors") == []
    assert len(made) == len(set(made)) == 11

    rows = collector.rows("message_id, event, type, properties::VARCHAR", len(made))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[0]] = counts.get(r[0], 0) + 1
    assert counts == dict.fromkeys(made, 1), "every event stored exactly once"
    name = (lambda r: r[1]) if transport == "http" else (lambda r: r[2])
    assert sorted((name(r), json.loads(r[3])["i"]) for r in rows) == sorted(
        [("online", i) for i in range(3)] + [("offline", i) for i in range(8)])


# --- c. the server restarted mid-stream: the realtime session resumes, nothing lost or doubled


@pytest.mark.parametrize("how", ["kill", "terminate"])
def test_realtime_resumes_its_session_across_a_server_restart(how, collector, pages, context):
    pages.pages["/app.html"] = classic_page(
        collector.origin, "minBackoff: 100, maxBackoff: 500, flushTimeout: 15000")
    page = open_page(context, f"{pages.origin}/app.html")
    # A steady stream: one event every 20 ms until told to stop.
    page.evaluate("""() => { let i = 0;
      window.ticking = () => {
        window.ticker = setInterval(() => record(rt, "rt", "track", "tick", {i: i++}), 20) };
      ticking() }""")
    page.wait_for_function("made.length >= 10")
    page.evaluate("rt.flush()")
    rid = page.evaluate("rt.stats().analyticsId")
    before = collector.rows("session_id", 1, where=f"anonymous_id = '{rid}'")
    session = before[0][0]
    assert session and {r[0] for r in before} == {session}

    collector.down(how)  # mid-stream
    page.wait_for_function(f"made.length >= {page.evaluate('made.length') + 5}")
    page.evaluate("clearInterval(ticker)")  # tracked while the server was down: waiting
    collector.up()
    # The SDK reconnects by itself (no new call, no flush) and sends what waited.
    page.wait_for_function("rt.stats().queued === 0")
    # The stream goes on over the new socket.
    page.evaluate("ticking()")
    page.wait_for_function(f"made.length >= {page.evaluate('made.length') + 10}")
    page.evaluate("clearInterval(ticker)")
    page.evaluate("rt.flush()")
    made = page.evaluate("made")
    assert page.evaluate("errors") == []
    assert page.evaluate("rt.stats().analyticsId") == rid

    rows = collector.rows("message_id, session_id, properties::VARCHAR", len(made),
                          where=f"anonymous_id = '{rid}'")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[0]] = counts.get(r[0], 0) + 1
    assert counts == dict.fromkeys(made, 1), "every event stored exactly once"
    assert sorted(json.loads(r[2])["i"] for r in rows) == list(range(len(made)))
    assert {r[1] for r in rows} == {session}, "the same session after the reconnect"
    marks = collector.query("SELECT type, session_id FROM events WHERE anonymous_id = "
                            f"'{rid}' AND type IN ('session_start', 'session_end')")
    assert marks == [["session_start", session]], "one session, not ended by the restart"
