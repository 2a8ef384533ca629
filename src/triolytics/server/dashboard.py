"""The dashboard: `/` (a login, then the page), its figures as JSON, its live feed
(server-sent events), one session's events, and its assets.

Rules:
- Who: a login with the admin token or the viewer token (`<data_dir>/viewer.token`)
  sets a cookie `triolytics_dash` = `<role>.<expiry>.<HMAC>`, keyed by both tokens
  (a new admin or viewer token ends every dashboard session): `HttpOnly`, `SameSite=Strict`,
  `Secure` with `dashboard_secure_cookie`, for `dashboard_session_s`. The cookie
  reaches the dashboard's routes only; `/admin/*` takes the bearer admin token alone,
  so a viewer (or a page forging requests) never reaches them.
- Writes (`POST /login`, `POST /logout`) are refused from another site (`Sec-Fetch-Site`,
  else `Origin` against `Host`): with the `SameSite=Strict` cookie, CSRF-safe. Every
  answer carries a strict Content-Security-Policy (no inline script or style).
- Reads run in `Background` threads, at most `dashboard_queries` at once, each on a
  DuckDB cursor of its own and at the lowest CPU priority (`dashboard_nice`), so a
  dashboard never takes the core from ingest. The same figures are computed once per
  `dashboard_cache_s` however many pages ask (`Cache`: single flight, bounded), and
  those asked for within `dashboard_warm_s` (and the page's four ranges, once it
  loads) are computed again in the background before they expire: an open dashboard
  is answered from memory.
- `Rollups` folds new rows into the rollups (storage/stats.py) every
  `rollup_interval_s`, `stats.REFRESH_MAX_ROWS` at a time, holding the archive lock (a
  forget or retention step rewriting rows waits for it, and it for them); beside it,
  as often, the cache is kept warm.
- `Live` is one task: every `dashboard_live_s`, while someone watches, it
  reads the open sessions (the session table in memory: exact), events per second
  (the counters the server keeps) and the rows stored since its last look, and hands
  the message to every watcher; at most `dashboard_max_watchers` streams at once. A
  stream ends when the server drains.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import hmac
import logging
import math
import os
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime, timedelta
from functools import partial
from importlib.resources import files

import duckdb
import msgspec
import trio

from triolytics.core.config import Config
from triolytics.core.errors import ApiError
from triolytics.core.web import Request, Response, Routes
from triolytics.server import dashboard_html
from triolytics.server.static import Static
from triolytics.storage import stats

log = logging.getLogger("triolytics.dashboard")
COOKIE = b"triolytics_dash"
HTML = b"text/html; charset=utf-8"
CSP = (b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"same-origin"), (b"x-content-type-options", b"nosniff"),
                    (b"cache-control", b"no-store")]
RANGES = {"24h": timedelta(days=1), "7d": timedelta(days=7), "30d": timedelta(days=30)}
CACHE_ENTRIES = 64  # distinct (range, project) figures kept
PREWARMED = ("7d", "today", "24h", "30d")  # computed in the background once the page loads
LATEST_ROWS = 50  # rows one live message carries at most
ASSET_TYPES = {".js": b"text/javascript; charset=utf-8", ".css": b"text/css; charset=utf-8"}
_ROLES = ("admin", "viewer")


# --- who
class Auth:
    def __init__(self, admin_token: str, viewer_token: str, session_s: float,
                 secure: bool, clock: Callable[[], float] = time.time) -> None:
        self.tokens = {"admin": admin_token.encode(), "viewer": viewer_token.encode()}
        self.key = hashlib.sha256(b"triolytics dashboard\0" + admin_token.encode() + b"\0" +
                                  viewer_token.encode()).digest()
        self.session_s = session_s
        self.secure = secure
        self.clock = clock

    def role_of_token(self, token: bytes) -> str | None:
        found = None
        for role, known in self.tokens.items():  # (both compared, in constant time)
            if hmac.compare_digest(token, known) and found is None:
                found = role
        return found

    def _sign(self, text: bytes) -> bytes:
        return hmac.new(self.key, text, hashlib.sha256).hexdigest()[:40].encode()

    def cookie(self, role: str) -> bytes:
        text = b"%s.%d" % (role.encode(), int(self.clock() + self.session_s))
        flags = b"; Secure" if self.secure else b""
        return (COOKIE + b"=" + text + b"." + self._sign(text) +
                b"; Path=/; HttpOnly; SameSite=Strict; Max-Age=%d" % self.session_s + flags)

    def cleared(self) -> bytes:
        flags = b"; Secure" if self.secure else b""
        return COOKIE + b"=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0" + flags

    def role(self, req: Request) -> str | None:
        """The role of the request's valid, unexpired cookie; None without one."""
        for part in req.headers.get(b"cookie", b"").split(b";"):
            name, _, value = part.strip().partition(b"=")
            if name != COOKIE:
                continue
            text, _, sig = value.rpartition(b".")
            role, _, expiry = text.partition(b".")
            if not hmac.compare_digest(sig, self._sign(text)) or not expiry.isdigit():
                continue
            if role.decode() in _ROLES and int(expiry) > self.clock():
                return role.decode()
        return None


def same_origin(req: Request) -> bool:
    """Whether a write came from our own pages (or from no page at all: curl)."""
    site = req.headers.get(b"sec-fetch-site")
    if site is not None:
        return site in (b"same-origin", b"none")
    origin = req.headers.get(b"origin")
    if origin is None:
        return True
    host = req.headers.get(b"host", b"")
    return origin.partition(b"://")[2] == host


# --- which rows
def time_range(query: dict[str, list[str]], now: datetime,
               max_days: int) -> tuple[str, datetime, datetime]:
    """(name, since, until) of `range=today|24h|7d|30d|custom` (custom: `since` and
    `until` as YYYY-MM-DD, both days included, UTC), or a bad_request.

    A rolling range ends with the current hour (24h: the 24 hours up to the end of
    this one): whole hours are read from the rollups, so no part of the range is read
    row by row but the rows not folded in yet. (Ending at `now`, the current hour was
    read raw: at 2,000 events/s its rows made a 30-day view grow from 1.0 to 1.8 s
    over 200 s, bench/dashboard_ingest.py.)"""
    name = query.get("range", ["24h"])[0]
    hour = now.replace(minute=0, second=0, microsecond=0)
    end = hour + timedelta(hours=1) if hour < now else hour
    if name == "today":
        return name, hour.replace(hour=0), end
    if name in RANGES:
        return name, end - RANGES[name], end
    if name != "custom":
        raise ApiError("bad_request", "range must be today, 24h, 7d, 30d or custom",
                       field="range")
    try:
        first = date.fromisoformat(query["since"][0])
        last = date.fromisoformat(query["until"][0])
    except (KeyError, ValueError):
        raise ApiError("bad_request", "a custom range needs since and until as YYYY-MM-DD",
                       field="since") from None
    if last < first:
        raise ApiError("bad_request", "until is before since", field="until")
    if (last - first).days + 1 > max_days:
        raise ApiError("bad_request", f"a range is at most {max_days} days "
                       "(dashboard_max_range_days)", field="until")
    since = datetime(first.year, first.month, first.day, tzinfo=UTC)
    return name, since, datetime(last.year, last.month, last.day, tzinfo=UTC) + \
        timedelta(days=1)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Figures(msgspec.Struct):
    range: dict[str, str]
    overview: stats.Overview
    series: stats.Series
    top: stats.Top
    projects: list[str]
    generated_at: str


def figures(conn, name: str, since: datetime, until: datetime, project: str | None,
            limit: int = 10) -> Figures:
    """Everything the page shows for one range (blocking: a worker thread)."""
    view = stats.view(conn, since, until, project, limit)
    return Figures({"name": name, "since": _iso(since), "until": _iso(until),
                    "interval": view.series.interval}, view.overview, view.series,
                   view.top, stats.projects(conn), _iso(datetime.now(UTC)))


# --- where reads run
class Background:
    """Worker threads for the dashboard's reads, niced to `nice` (Linux: a thread's
    own priority), each read on a DuckDB cursor taken from a small pool."""

    def __init__(self, workers: int, nice: int, new_cursor) -> None:
        self.nice = nice
        self.pool = concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="dashboard", initializer=self._lower)
        self.new_cursor = new_cursor  # async () -> a cursor (made beside loads)
        self.cursors: list = []
        self.limit = trio.Semaphore(workers)

    def _lower(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.nice)

    async def run(self, fn, *args):
        """`fn(cursor, *args)` in a worker; a cursor DuckDB failed on is not reused,
        and the call is tried once more on a new one (the store may have reopened)."""
        async with self.limit:
            for attempt in (1, 2):
                cursor = self.cursors.pop() if self.cursors else await self.new_cursor()
                try:
                    result = await self._call(fn, cursor, *args)
                except duckdb.Error:
                    with contextlib.suppress(Exception):
                        cursor.close()
                    if attempt == 2:
                        raise
                    continue
                except BaseException:
                    with contextlib.suppress(Exception):
                        cursor.close()  # (cancelled: it may still be running)
                    raise
                self.cursors.append(cursor)
                return result
        raise AssertionError("unreachable")

    async def _call(self, fn, *args):
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        def finished(_future) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future = self.pool.submit(fn, *args)
        future.add_done_callback(finished)
        try:
            await done.wait()
        except BaseException:
            with contextlib.suppress(Exception):
                args[0].interrupt()  # a DuckDB cursor: stop its query
            raise
        return future.result()

    def close(self) -> None:
        for cursor in self.cursors:
            with contextlib.suppress(Exception):
                cursor.close()
        self.cursors.clear()
        self.pool.shutdown(wait=True, cancel_futures=True)


class Cache:
    """Results by key, fresh for `ttl_s`; one computation per key at a time (others wait
    for it); at most `entries` keys (the oldest leave first); ttl 0: nothing kept.

    Kept warm: a key asked for (or `want`ed) within `warm_s` is computed again by `warm`
    (the rollups task calls it) once its `ttl_s` has passed, so a page refreshing every
    few seconds is answered from memory, with figures about `ttl_s` old (older only
    while the box has no idle CPU for the dashboard's threads), and the cost of a view
    is paid in the background, at the dashboard's low priority: once per `ttl_s` at
    most, however many pages ask."""

    def __init__(self, ttl_s: float, warm_s: float = 0.0,
                 entries: int = CACHE_ENTRIES) -> None:
        self.ttl_s = ttl_s
        self.warm_s = warm_s
        self.entries = entries
        self.done: dict = {}  # key -> (computed at, value)
        self.running: dict = {}  # key -> trio.Event
        self.asked: dict = {}  # key -> (last asked at, compute)

    @property
    def warming(self) -> bool:
        return self.warm_s > 0 and self.ttl_s > 0

    def want(self, key, compute, once: bool = False) -> None:
        """Keep `key` warm from now on (for `warm_s`), without waiting for it; `once`:
        only have it computed by the next `warm` (unless it is asked for meanwhile)."""
        if self.warming:
            asked = self.asked.pop(key, None)
            now = trio.current_time()
            if once:  # (as if asked for long ago: computed once, then forgotten)
                now = max(now - self.warm_s + self.ttl_s, asked[0] if asked else -math.inf)
            self.asked[key] = (now, compute)
            while len(self.asked) > self.entries:
                del self.asked[next(iter(self.asked))]

    async def get(self, key, compute):
        """The value of `key`: fresh (computed within `ttl_s`); or, while kept warm, the
        last one computed within `warm_s` (its renewal is the warm task's: a page is
        never kept waiting by a busy box, it shows figures a little older); else
        computed now (once, whoever else asks meanwhile)."""
        self.want(key, compute)
        while True:
            hit = self.done.get(key)
            now = trio.current_time()
            if hit is not None and (hit[0] + self.ttl_s > now or
                                    (self.warming and hit[0] + self.warm_s > now)):
                return hit[1]
            running = self.running.get(key)
            if running is None:
                break
            await running.wait()
            if self.ttl_s <= 0:
                break  # (nothing kept: compute our own)
        return await self._compute(key, compute)

    async def _compute(self, key, compute):
        self.running[key] = event = trio.Event()
        try:
            started = trio.current_time()
            value = await compute()
            if self.ttl_s > 0:
                self.done.pop(key, None)
                self.done[key] = (started, value)
                while len(self.done) > self.entries:
                    del self.done[next(iter(self.done))]
            return value
        finally:
            del self.running[key]
            event.set()

    async def warm(self) -> int:
        """Compute again the keys asked for lately whose value has expired (an asker
        meanwhile gets the last one); forget the others. Returns how many were
        computed."""
        computed = 0
        for key, (asked, compute) in list(self.asked.items()):
            now = trio.current_time()
            if now - asked > self.warm_s:
                del self.asked[key]
                continue
            hit = self.done.get(key)
            if key in self.running or (hit is not None and hit[0] + self.ttl_s > now):
                continue
            await self._compute(key, compute)
            computed += 1
        return computed


# --- background tasks
async def every(stop: trio.Event, interval_s: float, step, what: str) -> None:
    """`await step()` every `interval_s` (the first after one: start-up's own work goes
    first) until `stop`; a step that fails is logged and tried again next time (a full
    disk, a conflict)."""
    while not stop.is_set():
        with trio.move_on_after(interval_s):
            await stop.wait()
        if stop.is_set():
            return
        try:
            await step()
        except Exception as exc:
            log.warning("%s failed: %s", what, exc)


class Rollups:
    def __init__(self, background: Background, interval_s: float, lock: trio.Lock,
                 cache: Cache | None = None, leads: Callable[[], bool] | None = None) -> None:
        self.leads = leads  # many writers: refresh only while this one leads
        self.background = background
        self.cache = cache  # kept warm after each refresh
        self.interval_s = interval_s
        self.lock = lock  # the archive lock: forget and retention change rows
        self.folded = 0  # rows folded in since start

    async def run(self, stop: trio.Event) -> None:
        """Refresh every `interval_s` until `stop`; chunks of REFRESH_MAX_ROWS, each a
        transaction of its own, while there is more. Beside it, as often, the cache is
        kept warm (a long catch-up does not hold the figures back)."""
        async with trio.open_nursery() as nursery:
            if self.cache is not None:
                nursery.start_soon(every, stop, self.interval_s, self.cache.warm,
                                   "dashboard: keeping figures warm")
            await every(stop, self.interval_s, partial(self._refresh, stop),
                        "dashboard: rollups' refresh")

    async def _refresh(self, stop: trio.Event) -> None:
        if self.leads is not None and not self.leads():
            return
        while not stop.is_set():
            async with self.lock:
                n = await self.background.run(stats.refresh_rollups)
            self.folded += n
            if n < stats.REFRESH_MAX_ROWS:
                return


# --- live
class Live:
    def __init__(self, config: Config, counters: Callable[[], int], open_sessions,
                 background: Background, last_seq: Callable[[], int],
                 draining: Callable[[], bool], clock=trio.current_time) -> None:
        self.interval_s = config.dashboard_live_s
        self.max_watchers = config.dashboard_max_watchers
        self.counters = counters  # events answered as stored so far (all transports)
        self.open_sessions = open_sessions  # () -> sessions open now
        self.background = background
        self.last_seq = last_seq  # () -> the store's last ingest_seq
        self.draining = draining
        self.clock = clock
        self.watchers = 0
        self.message = b""  # the newest message, SSE-framed
        self.changed = trio.Event()
        self.seen = -1  # last ingest_seq shown
        self.count, self.at = counters(), clock()  # at the last tick (events per second)

    async def run(self, stop: trio.Event) -> None:
        """For the server's life: every interval, a message while anyone watches (an
        idle tick reads two counters); then the streams learn it is over."""
        try:
            await every(stop, self.interval_s, self._tick, "dashboard: live feed")
        finally:
            self._publish(self.message)

    async def _tick(self) -> None:
        count, at = self.count, self.at
        self.count, self.at = self.counters(), self.clock()
        if self.watchers:
            self._publish(await self._message(count, at))

    def _publish(self, message: bytes) -> None:
        self.message = message
        self.changed.set()
        self.changed = trio.Event()

    async def _message(self, count: int, t: float) -> bytes:
        last = self.last_seq()
        if self.seen < 0:
            self.seen = max(0, last - LATEST_ROWS)
        latest = await self.background.run(stats.latest, self.seen, last, LATEST_ROWS) \
            if last > self.seen else []
        if latest:
            self.seen = latest[0].seq
        elapsed = max(self.clock() - t, 1e-3)
        rate = (self.counters() - count) / elapsed
        body = msgspec.json.encode({"open_sessions": self.open_sessions(),
                                    "events_per_s": round(rate, 1), "latest": latest})
        return b"event: live\ndata: " + body + b"\n\n"

    async def stream(self) -> AsyncIterator[bytes]:
        """One watcher's messages, until the server drains."""
        self.watchers += 1
        try:
            yield b"retry: 3000\n\n"
            if self.message:
                yield self.message
            while not self.draining():
                with trio.move_on_after(self.interval_s * 2 + 1):
                    await self.changed.wait()
                yield self.message or b": waiting\n\n"
        finally:
            self.watchers -= 1


# --- routes
class Dashboard:
    def __init__(self, config: Config, auth: Auth, background: Background,
                 live: Live) -> None:
        self.config = config
        self.auth = auth
        self.background = background
        self.live = live
        self.cache = Cache(config.dashboard_cache_s, config.dashboard_warm_s)
        self.assets: dict[str, str] = {}
        self.statics: dict[bytes, Static] = {}
        folder = files("triolytics").joinpath("static/dashboard")
        for item in sorted(folder.iterdir(), key=lambda p: p.name):
            kind = ASSET_TYPES.get(os.path.splitext(item.name)[1])
            if kind is None:
                continue
            # (a URL that carries the file's digest: cached for good)
            static = Static(item.read_bytes(), kind, b"public, max-age=31536000, immutable")
            self.statics[b"/dashboard/static/" + item.name.encode()] = static
            self.assets[item.name] = f"/dashboard/static/{item.name}?v={static.etag[1:9].decode()}"

    def routes(self) -> Routes:
        routes: Routes = {
            b"/": {b"GET": self.index, b"HEAD": self.index},
            b"/login": {b"POST": self.login},
            b"/logout": {b"POST": self.logout},
            b"/dashboard/figures": {b"GET": self.figures},
            b"/dashboard/live": {b"GET": self.live_feed},
            b"/dashboard/session": {b"GET": self.session},
        }
        for path, static in self.statics.items():
            routes[path] = {b"GET": static, b"HEAD": static}
        return routes

    def _html(self, status: int, body: bytes, extra=()) -> Response:
        return Response(status, body, [*SECURITY_HEADERS, *extra], content_type=HTML)

    def _json(self, value) -> Response:
        return Response(200, msgspec.json.encode(value), SECURITY_HEADERS)

    def _role(self, req: Request) -> str:
        role = self.auth.role(req)
        if role is None:
            raise ApiError("unauthorized", "log in at / with the admin or viewer token")
        return role

    async def index(self, req: Request) -> Response:
        role = self.auth.role(req)
        if role is None:
            return self._html(200, dashboard_html.render_login(None, self.assets))
        projects = await self.background.run(stats.projects)
        for name in PREWARMED:  # (the page's ranges: ready before they are clicked)
            self.cache.want((name, None), self._job({"range": [name]}, name, None), once=True)
        return self._html(200, dashboard_html.render_page(role, projects, self.assets))

    async def login(self, req: Request) -> Response:
        if not same_origin(req):
            raise ApiError("forbidden_origin", "log in from this server's own page")
        form = urllib.parse.parse_qs(req.body.decode("latin-1"))
        role = self.auth.role_of_token(form.get("token", [""])[0].strip().encode())
        if role is None:
            log.warning("dashboard: a login with a wrong token from %s", req.client_ip)
            return self._html(401, dashboard_html.render_login(
                "That is neither the admin token nor the viewer token.", self.assets))
        log.info("dashboard: %s logged in from %s", role, req.client_ip)
        return self._html(303, b"", [(b"location", b"/"),
                                     (b"set-cookie", self.auth.cookie(role))])

    async def logout(self, req: Request) -> Response:
        if not same_origin(req):
            raise ApiError("forbidden_origin", "log out from this server's own page")
        return self._html(303, b"", [(b"location", b"/"), (b"set-cookie", self.auth.cleared())])

    def _query(self, req: Request) -> dict[str, list[str]]:
        return urllib.parse.parse_qs(req.query.decode("latin-1"))

    async def figures(self, req: Request) -> Response:
        role = self._role(req)
        query = self._query(req)
        name, since, until = time_range(query, datetime.now(UTC),
                                        self.config.dashboard_max_range_days)
        project = query.get("project", [""])[0] or None
        # A rolling range (today, 24h, ...) is one key whatever the second: computed
        # (again, when warmed) up to the time it is computed.
        key = (name, since, until, project) if name == "custom" else (name, project)
        body = await self.cache.get(key, self._job(query, name, project))
        return Response(200, body[:-1] + b',"role":"%s"}' % role.encode(), SECURITY_HEADERS)

    def _job(self, query: dict[str, list[str]], name: str, project: str | None):
        """The computation of one range's figures, as JSON, up to the time it runs."""
        async def compute() -> bytes:
            _, since, until = time_range(query, datetime.now(UTC),
                                         self.config.dashboard_max_range_days)
            return msgspec.json.encode(await self.background.run(
                figures, name, since, until, project))
        return compute

    async def session(self, req: Request) -> Response:
        self._role(req)
        query = self._query(req)
        session_id = query.get("id", [""])[0]
        if not session_id:
            raise ApiError("bad_request", "id (a session_id) is required", field="id")
        project = query.get("project", [""])[0] or None
        events = await self.background.run(stats.session_events, session_id, project)
        return self._json({"session_id": session_id, "events": events})

    async def live_feed(self, req: Request) -> Response:
        self._role(req)
        if self.live.watchers >= self.live.max_watchers:
            raise ApiError("unavailable", "too many live dashboards open "
                           "(dashboard_max_watchers)", headers=((b"retry-after", b"10"),))
        return Response(200, b"", [*SECURITY_HEADERS, (b"x-accel-buffering", b"no")],
                        content_type=b"text/event-stream",
                        stream=self.live.stream())
