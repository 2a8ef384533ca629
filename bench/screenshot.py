"""The dashboard's picture for the docs (docs/dashboard.png): a real server, demo data,
Debian's Chromium.

Starts `triolytics serve` (bench/crash_loop.Server) on a temporary data directory and
loads a demo data set through the public APIs, as clients would send it:

- project `default`, a product's website: 60 days of visits (more on weekdays, growing),
  each a session of pageviews with its entry page's referrer (search, news, GitHub, ...
  or none), tracks (`Signed Up`, `Docs Searched`, `Plan Selected`, ...) and an identify
  on sign-up, over `/v1/batch`, each visitor with one browser's user agent;
- project `shop` (a write key made with `POST /admin/keys`): product views, carts, orders;
- an app over the WebSocket (`POST /create`, `/analytics`): screen views and clicks.

Session durations are receive time (core/sessions.py), so a session's events are sent
in WAVES a few seconds apart: the demo's sessions last seconds, not minutes. A visitor's
second visit goes in a second phase, after their first session has ended (else the two
would be one session). Then a trickle of new events feeds the live panel, the browser
logs in with the admin token, picks 30 days, waits for the figures, the chart and the
live list, and saves a full-page screenshot 1280 px wide.

    .venv/bin/python bench/screenshot.py [--out docs/dashboard.png] [--seed 7] [--width 1280]

Prints one JSON document: what was loaded, the picture's size, how long each step took.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import crash_loop  # noqa: E402  (a sibling script)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--hide-scrollbars"]
DAYS = 60  # of data: the 30 days shown, and the 30 before them (the "previous" figures)
WAVES = (0.0, 2.0, 5.0, 9.0)  # s: when a session's 1st, 2nd, ... part is sent
SESSION_TIMEOUT_S = 8  # the demo server's: a session ends this long after its last part
WAIT_S = 60.0  # the bound of every wait
CONFIG = "dashboard_cache_s = 0\ncreate_burst = 1000\n"  # (one app install per session)

UAS = [  # (user agent, weight): one per visitor
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", 30),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36", 16),
    ("Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6) AppleWebKit/605.1.15 (KHTML, like Gecko) "
     "Version/18.1 Safari/605.1.15", 12),
    ("Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
     "like Gecko) Version/18.1 Mobile/15E148 Safari/604.1", 12),
    ("Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0", 9),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:132.0) Gecko/20100101 Firefox/132.0", 5),
    ("Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Safari/537.36 Edg/131.0.0.0", 7),
    ("Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
     "Chrome/131.0.0.0 Mobile Safari/537.36", 9),
]
SITE = {  # project default: a product's website
    "referrers": [("", 34), ("https://www.google.com/", 30), ("https://news.ycombinator.com/",
                  11), ("https://github.com/python-trio/trio", 8), ("https://duckduckgo.com/",
                  6), ("https://www.reddit.com/r/Python/", 5), ("https://lobste.rs/", 3),
                  ("https://www.bing.com/", 3)],
    "entries": [("/", 45), ("/blog/structured-concurrency", 15), ("/docs", 14),
                ("/pricing", 10), ("/blog/duckdb-for-events", 9), ("/docs/install", 7)],
    "next": [("/docs", 20), ("/pricing", 18), ("/docs/install", 14), ("/docs/sdk", 10),
             ("/signup", 8), ("/about", 5), ("/changelog", 5), ("/docs/realtime", 6)],
    "tracks": [("Docs Searched", 0.16), ("Plan Selected", 0.08), ("Signed Up", 0.06),
               ("Newsletter Subscribed", 0.04), ("Demo Requested", 0.02)],
}
SHOP = {  # project shop
    "referrers": [("", 30), ("https://www.google.com/", 32), ("https://www.instagram.com/",
                  16), ("https://www.pinterest.com/", 9), ("https://www.facebook.com/", 8)],
    "entries": [("/", 40), ("/products/trio-mug", 25), ("/products/duck-tee", 20),
                ("/collections/new", 15)],
    "next": [("/products/trio-mug", 20), ("/products/duck-tee", 18), ("/cart", 14),
             ("/products/nursery-poster", 10), ("/checkout", 6)],
    "tracks": [("Product Viewed", 0.55), ("Added to Cart", 0.22), ("Checkout Started", 0.1),
               ("Order Completed", 0.06)],
}
APP_SCREENS = [("Home", 40), ("Player", 25), ("Library", 18), ("Search", 10), ("Settings", 7)]
APP_ACTIONS = ["play_pressed", "track_liked", "playlist_created", "search_submitted"]


def pick(rnd: random.Random, weighted):
    return rnd.choices([w[0] for w in weighted], [w[1] for w in weighted])[0]


def iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Demo:
    """The demo's sessions: each a list of HTTP events (or app events), in time order."""

    def __init__(self, seed: int, now: datetime) -> None:
        self.rnd = random.Random(seed)
        self.now = now
        self.first: list[tuple[str, list[dict]]] = []  # (project, events): first visits
        self.again: list[tuple[str, list[dict]]] = []  # second visits of some visitors
        self.app: list[list[dict]] = []  # WebSocket sessions' events
        self.visitors = 0

    def build(self) -> Demo:
        today = self.now.replace(hour=0, minute=0, second=0, microsecond=0)
        for back in range(DAYS - 1, -1, -1):
            day = today - timedelta(days=back)
            weekday = day.weekday() < 5
            growth = 1 + (DAYS - back) / DAYS
            for project, site, base in (("default", SITE, 16), ("shop", SHOP, 6)):
                n = int(base * growth * (1 if weekday else 0.6) * self.rnd.uniform(0.8, 1.2))
                for _ in range(n):
                    self._visit(project, site, day)
            for _ in range(int(2 * growth * self.rnd.uniform(0.6, 1.4))):
                start = self._time(day)
                if start:
                    self.app.append(self._app_session(start))
        return self

    def _time(self, day: datetime) -> datetime | None:
        """A time of `day` (UTC), busier in the afternoon; None if it is still to come."""
        hour = min(23, max(0, int(self.rnd.gauss(15, 4.5))))
        t = day + timedelta(hours=hour, seconds=self.rnd.randrange(3600))
        return t if t < self.now - timedelta(minutes=20) else None

    def _visit(self, project: str, site: dict, day: datetime) -> None:
        start = self._time(day)
        if start is None:
            return
        self.visitors += 1
        who = f"{project[0]}{self.visitors:05d}"
        ua = pick(self.rnd, UAS)
        self.first.append((project, self._session(site, who, ua, start, entry=True)))
        later = start + timedelta(days=self.rnd.uniform(0.3, 6))
        if self.rnd.random() < 0.28 and later < self.now - timedelta(minutes=20):
            self.again.append((project, self._session(site, who, ua, later, entry=False)))

    def _session(self, site: dict, who: str, ua: str, t: datetime, entry: bool) -> list[dict]:
        ctx = {"userAgent": ua}
        path = pick(self.rnd, site["entries"])
        referrer = pick(self.rnd, site["referrers"]) if entry else ""
        props = {"path": path, **({"referrer": referrer} if referrer else {})}
        events = [{"type": "page", "anonymousId": who, "timestamp": iso(t),
                   "properties": props, "context": ctx}]
        pages = 0 if self.rnd.random() < 0.38 else min(7, int(self.rnd.expovariate(0.45)) + 1)
        for _ in range(pages):
            t += timedelta(seconds=self.rnd.randint(8, 180))
            events.append({"type": "page", "anonymousId": who, "timestamp": iso(t),
                           "properties": {"path": pick(self.rnd, site["next"])},
                           "context": ctx})
        for name, p in site["tracks"]:
            if self.rnd.random() < p * (1 + pages / 2):
                t += timedelta(seconds=self.rnd.randint(5, 60))
                events.append({"type": "track", "anonymousId": who, "event": name,
                               "timestamp": iso(t), "properties": self._props(name),
                               "context": ctx})
                if name == "Signed Up":
                    events.append({"type": "identify", "anonymousId": who,
                                   "userId": f"user-{who}", "timestamp": iso(t),
                                   "traits": {"plan": "free"}, "context": ctx})
        return events

    def _props(self, name: str) -> dict:
        if name == "Order Completed":
            return {"revenue": round(self.rnd.uniform(12, 90), 2), "currency": "EUR"}
        if name in ("Product Viewed", "Added to Cart"):
            return {"product": self.rnd.choice(["trio-mug", "duck-tee", "nursery-poster"])}
        if name == "Plan Selected":
            return {"plan": self.rnd.choice(["hobby", "team", "business"])}
        return {}

    def _app_session(self, t: datetime) -> list[dict]:
        events = []
        for _ in range(self.rnd.randint(1, 7)):
            t += timedelta(seconds=self.rnd.randint(5, 120))
            if self.rnd.random() < 0.6:
                events.append({"type": "screen_view", "ts": int(t.timestamp() * 1000),
                               "payload": {"screen_name": pick(self.rnd, APP_SCREENS)}})
            else:
                events.append({"type": self.rnd.choice(APP_ACTIONS),
                               "ts": int(t.timestamp() * 1000), "payload": {}})
        return events


def parts(events: list, n: int) -> list[list]:
    """`events` in at most `n` consecutive parts (one per wave), the first never empty."""
    k = min(n, len(events))
    cut = sorted(random.Random(len(events)).sample(range(1, len(events)), k - 1)) \
        if k > 1 else []
    edges = [0, *cut, len(events)]
    return [events[a:b] for a, b in zip(edges, edges[1:], strict=False)]


class Loader:
    def __init__(self, server: crash_loop.Server, keys: dict[str, str]) -> None:
        self.origin = f"http://{crash_loop.HOST}:{server.port}"
        self.port = server.port
        self.admin = (server.data_dir / "admin.token").read_text().strip()
        self.keys = keys
        self.sent = 0

    def post(self, path: str, body, headers: dict[str, str]) -> dict:
        req = urllib.request.Request(self.origin + path, json.dumps(body).encode(),
                                     {"Content-Type": "application/json", **headers})
        with urllib.request.urlopen(req, timeout=30) as answer:
            return json.load(answer)

    def query(self, sql: str):
        return self.post("/admin/query", {"sql": sql},
                         {"Authorization": f"Bearer {self.admin}"})["rows"]

    def batch(self, project: str, events: list[dict]) -> None:
        for i in range(0, len(events), 400):
            chunk = events[i:i + 400]
            got = self.post("/v1/batch", {"batch": chunk}, {"x-write-key": self.keys[project]})
            assert got.get("stored") == len(chunk), got
            self.sent += len(chunk)

    def phase(self, sessions: list[tuple[str, list[dict]]], app: list[list[dict]]) -> None:
        """Every session's parts, wave by wave (the app's over open WebSockets)."""
        from websockets.sync.client import connect

        with contextlib.ExitStack() as open_sockets:
            sockets = []
            for events in app:  # each session an install of the app, on a phone
                aid = crash_loop.create_analytics_id(self.port)
                ua = pick(random.Random(aid), UAS[3:4] + UAS[7:8])
                ws = open_sockets.enter_context(connect(
                    f"ws://{crash_loop.HOST}:{self.port}/analytics?analytics_id={aid}",
                    user_agent_header=ua, open_timeout=10))
                sockets.append((ws, parts(events, len(WAVES))))
            self._waves(sessions, sockets)

    def _waves(self, sessions, sockets) -> None:
        """Part i of every session at WAVES[i] s: each over HTTP in batches, per project."""
        split = [(project, parts(events, len(WAVES))) for project, events in sessions]
        start = time.monotonic()
        for wave, at in enumerate(WAVES):
            time.sleep(max(0.0, start + at - time.monotonic()))  # the demo's clock
            for project in ("default", "shop"):
                self.batch(project, [e for p, ps in split if p == project and wave < len(ps)
                                     for e in ps[wave]])
            for ws, ps in sockets:
                if wave < len(ps):
                    ws.send(json.dumps({"events": ps[wave], "seq": wave + 1}))
                    assert json.loads(ws.recv(timeout=10))["type"] == "ack"
                    self.sent += len(ps[wave])

    def wait_sessions_ended(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while True:
            (opened, ended), = self.query(
                "SELECT count(*) FILTER (type = 'session_start'), "
                "count(*) FILTER (type = 'session_end') FROM events")
            if opened and opened == ended:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"sessions still open: {opened - ended}")
            time.sleep(0.5)  # polling the database, bounded by the deadline

    def wait_loaded(self) -> int:
        deadline = time.monotonic() + WAIT_S
        while True:
            (n,), = self.query("SELECT count(*) FROM events "
                               "WHERE type NOT IN ('session_start', 'session_end')")
            if n >= self.sent or time.monotonic() > deadline:
                return n
            time.sleep(0.2)  # polling the database, bounded by the deadline


def trickle(loader: Loader, stop: threading.Event) -> None:
    """A few visitors on the site right now: the live panel's events."""
    rnd = random.Random(1)
    while not stop.is_set():
        who = f"now-{rnd.randrange(6)}"
        if rnd.random() < 0.6:
            event = {"type": "page", "anonymousId": who,
                     "properties": {"path": pick(rnd, SITE["next"])},
                     "context": {"userAgent": pick(rnd, UAS)}}
        else:
            event = {"type": "track", "anonymousId": who,
                     "event": pick(rnd, [(n, p) for n, p in SITE["tracks"]]),
                     "properties": {}, "context": {"userAgent": pick(rnd, UAS)}}
        try:
            loader.batch("default", [event])
        except (OSError, AssertionError):
            return
        stop.wait(rnd.uniform(0.05, 0.5))


def screenshot(origin: str, token: str, out: Path, width: int) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900},
                                    device_scale_factor=1)
            page.set_default_timeout(WAIT_S * 1000)
            page.goto(origin + "/")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_selector("body[data-loaded]")
            page.click("[data-range='30d']")
            page.wait_for_selector("body[data-range='30d']")
            page.wait_for_selector("#latest li:nth-child(12) button")
            page.wait_for_selector("#live-dot.on")
            page.mouse.move(0, 0)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args()
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="triolytics-screenshot-") as tmp:
        (Path(tmp) / "config.toml").write_text(CONFIG)
        server = crash_loop.Server(Path(tmp) / "data", Path(tmp) / "server.log", port=0,
                                   extra=("--config", str(Path(tmp) / "config.toml"),
                                          "--session-timeout", str(SESSION_TIMEOUT_S)))
        stop = threading.Event()
        try:
            server.wait_healthy()
            keys = {"default": crash_loop.WRITE_KEY}
            loader = Loader(server, keys)
            keys["shop"] = loader.post("/admin/keys", {"project": "shop"},
                                       {"Authorization": f"Bearer {loader.admin}"})["key"]
            demo = Demo(args.seed, datetime.now(UTC)).build()
            timings["start_s"] = time.monotonic() - t0
            loader.phase(demo.first, demo.app)
            loader.wait_sessions_ended()
            timings["first_visits_s"] = time.monotonic() - t0
            loader.phase(demo.again, [])
            loader.wait_sessions_ended()
            stored, sent = loader.wait_loaded(), loader.sent
            timings["second_visits_s"] = time.monotonic() - t0
            feed = threading.Thread(target=trickle, args=(loader, stop), daemon=True)
            feed.start()
            screenshot(loader.origin, loader.admin, args.out, args.width)
            timings["screenshot_s"] = time.monotonic() - t0
        finally:
            stop.set()
            if server.proc.poll() is None:
                server.terminate()
    print(json.dumps({
        "out": str(args.out), "bytes": args.out.stat().st_size, "width": args.width,
        "sessions": len(demo.first) + len(demo.again) + len(demo.app),
        "visitors": demo.visitors + len(demo.app), "events_sent": sent,
        "events_stored": stored, "timings": {k: round(v, 1) for k, v in timings.items()},
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }, indent=2))


if __name__ == "__main__":
    main()
