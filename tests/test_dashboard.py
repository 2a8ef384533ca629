"""The dashboard's server side (server/dashboard.py): the login and its cookie, CSRF
refusals, the figures' JSON against SQL, the live feed (server-sent events), the session
explorer, and its parts alone (Cache on trio's autojump clock, Background's nice, the
range parser). End to end on loopback, port 0."""

from __future__ import annotations

import os
import threading
from datetime import UTC, datetime, timedelta

import pytest
import requests
import trio
from test_e2e_collector import AUTH, running
from test_e2e_query import admin

from triolytics.core.errors import ApiError
from triolytics.core.web import Request
from triolytics.server.dashboard import Auth, Background, Cache, same_origin, time_range

NOW = datetime(2026, 12, 3, 10, 30, tzinfo=UTC)


def login(server, token: str, **headers) -> requests.Response:
    return server.session.post(server.url("/login"), data={"token": token},
                               headers=headers, allow_redirects=False, timeout=10)


def tokens(data_dir) -> tuple[str, str]:
    return ((data_dir / "admin.token").read_text().strip(),
            (data_dir / "viewer.token").read_text().strip())


async def sql(server, query: str):
    reply = await server.post("/admin/query", json={"sql": query}, headers=admin(server.data_dir))
    assert reply.status_code == 200, reply.text
    return reply.json()["rows"]


async def until_loaded(server, n: int) -> None:
    with trio.fail_after(15):
        while (await sql(server, "SELECT count(*) FROM events "
                         "WHERE type NOT LIKE 'session_%'"))[0][0] < n:
            await trio.sleep(0.05)


BATCH = {"batch": [
    {"type": "page", "anonymousId": "a1", "properties": {"path": "/", "referrer":
                                                         "https://www.google.com/q"},
     "context": {"userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, "
                              "like Gecko) Chrome/120.0.0.0 Safari/537.36"}},
    {"type": "page", "anonymousId": "a1", "properties": {"path": "/pricing"}},
    {"type": "track", "anonymousId": "a1", "event": "Signed Up"},
    {"type": "page", "anonymousId": "a2", "properties": {"path": "/"}},
    {"type": "track", "anonymousId": "a2", "event": "Signed Up"},
    {"type": "track", "userId": "u3", "event": "Order Completed"},
]}


async def test_login_cookie_roles_and_refusals(tmp_path):
    async with running(tmp_path) as server:
        admin_token, viewer_token = tokens(tmp_path)
        page = await trio.to_thread.run_sync(server.session.get, server.url("/"))
        assert page.status_code == 200 and b"<form" in page.content
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        # no cookie: the JSON routes say 401
        got = await trio.to_thread.run_sync(server.session.get,
                                            server.url("/dashboard/figures"))
        assert got.status_code == 401
        # a wrong token: 401 and the login page again, no cookie
        wrong = await trio.to_thread.run_sync(login, server, "nope")
        assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
        # a write from another site is refused, whatever the token
        other = await trio.to_thread.run_sync(
            lambda: login(server, admin_token, Origin="https://evil.example"))
        assert other.status_code == 403
        cross = await trio.to_thread.run_sync(
            lambda: login(server, admin_token, **{"Sec-Fetch-Site": "cross-site"}))
        assert cross.status_code == 403
        # the viewer logs in: a cookie with the right flags, and the page
        ok = await trio.to_thread.run_sync(login, server, viewer_token)
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        cookie = ok.headers["set-cookie"]
        for flag in ("HttpOnly", "SameSite=Strict", "Path=/"):
            assert flag in cookie
        assert "Secure" not in cookie
        figures = await trio.to_thread.run_sync(server.session.get,
                                                server.url("/dashboard/figures?range=7d"))
        assert figures.status_code == 200 and figures.json()["role"] == "viewer"
        # neither the cookie nor the viewer token reaches /admin/*
        for headers in ({}, {"Authorization": f"Bearer {viewer_token}"}):
            refused = await server.post("/admin/query", json={"sql": "SELECT 1"},
                                        headers=headers)
            assert refused.status_code == 401
        # a forged cookie (another role, same signature) is not a login
        forged = server.session.cookies["triolytics_dash"].replace("viewer.", "admin.", 1)
        got = await trio.to_thread.run_sync(lambda: requests.get(
            server.url("/dashboard/figures"), cookies={"triolytics_dash": forged}, timeout=10))
        assert got.status_code == 401
        # log out: the cookie is cleared
        out = await trio.to_thread.run_sync(lambda: server.session.post(
            server.url("/logout"), allow_redirects=False, timeout=10))
        assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]


async def test_figures_equal_sql_and_bad_ranges(tmp_path):
    async with running(tmp_path, load_interval_ms=50, rollup_interval_s=0.1,
                       dashboard_cache_s=0) as server:
        admin_token, _ = tokens(tmp_path)
        assert (await server.post("/v1/batch", json=BATCH, headers=AUTH)).status_code == 200
        await until_loaded(server, 6)
        await trio.to_thread.run_sync(login, server, admin_token)
        for attempt in range(2):  # raw rows, then (once refreshed) rollups + raw edges
            got = await trio.to_thread.run_sync(lambda: server.session.get(
                server.url("/dashboard/figures?range=today&project=default"), timeout=10))
            assert got.status_code == 200, got.text
            body = got.json()
            o = body["overview"]
            assert o["events"]["value"] == 6
            assert o["pageviews"]["value"] == 3
            assert o["visitors"]["value"] == 3
            assert o["sessions"]["value"] == (await sql(
                server, "SELECT count(*) FROM events WHERE type = 'session_start'"))[0][0]
            assert body["top"]["events"][:2] == [["page", 3], ["Signed Up", 2]]
            assert body["top"]["pages"][0] == ["/", 2]
            assert ["google.com", 1] in body["top"]["referrers"]
            assert ["Chrome", 1] in body["top"]["browsers"]
            assert body["projects"] == ["default"] and body["role"] == "admin"
            assert body["series"]["interval"] == "hour"
            assert sum(body["series"]["events"]) == 6
            if attempt == 0:
                with trio.fail_after(10):  # the rollups catch up
                    while (await sql(server, "SELECT coalesce(max(seq), 0) FROM stats_mark"
                                     ))[0][0] < 6:
                        await trio.sleep(0.05)
        for query, field in (("range=week", "range"), ("range=custom&since=2026-13-01", "since"),
                             ("range=custom&since=2026-12-02&until=2026-12-01", "until"),
                             ("range=custom&since=2020-01-01&until=2026-01-01", "until")):
            bad = await trio.to_thread.run_sync(lambda q=query: server.session.get(
                server.url("/dashboard/figures?" + q), timeout=10))
            assert bad.status_code == 400
            assert bad.json()["error"]["code"] == "bad_request", query
            assert bad.json()["error"]["field"] == field


async def test_live_feed_and_session_explorer(tmp_path):
    async with running(tmp_path, load_interval_ms=50, dashboard_live_s=0.1) as server:
        admin_token, _ = tokens(tmp_path)
        await trio.to_thread.run_sync(login, server, admin_token)
        messages: list[str] = []
        got_row = threading.Event()

        def watch() -> int:
            with server.session.get(server.url("/dashboard/live"), stream=True,
                                    timeout=10) as feed:
                assert feed.headers["content-type"] == "text/event-stream"
                for line in feed.iter_lines(decode_unicode=True):
                    if line.startswith("data: "):
                        messages.append(line[6:])
                        if "Order Completed" in line:
                            got_row.set()
                            return feed.status_code
            return 0

        async with trio.open_nursery() as nursery:
            result: list[int] = []
            nursery.start_soon(lambda: _collect(result, watch))
            with trio.fail_after(10):
                while not messages:
                    await trio.sleep(0.02)
            assert (await server.post("/v1/batch", json=BATCH, headers=AUTH)).status_code == 200
            with trio.fail_after(10):
                while not got_row.is_set():
                    await trio.sleep(0.02)
        assert result == [200]
        import json
        last = json.loads(messages[-1])
        assert last["open_sessions"] == 3
        row = next(r for r in last["latest"] if r["name"] == "Order Completed")
        assert row["visitor"] == "u3" and row["type"] == "track"
        seqs = [r["seq"] for m in messages for r in json.loads(m)["latest"]]
        assert seqs == sorted(set(seqs), reverse=True) or len(seqs) == len(set(seqs))
        # the session explorer: that session's rows, start first
        explorer = await trio.to_thread.run_sync(lambda: server.session.get(
            server.url(f"/dashboard/session?id={row['session_id']}"), timeout=10))
        events = explorer.json()["events"]
        assert [e["type"] for e in events] == ["session_start", "track"]
        missing = await trio.to_thread.run_sync(lambda: server.session.get(
            server.url("/dashboard/session"), timeout=10))
        assert missing.status_code == 400


async def _collect(result: list, fn) -> None:
    result.append(await trio.to_thread.run_sync(fn))


async def test_live_feed_ends_when_the_server_drains(tmp_path):
    async with running(tmp_path, dashboard_live_s=0.1) as server:
        admin_token, _ = tokens(tmp_path)
        await trio.to_thread.run_sync(login, server, admin_token)
        opened = threading.Event()
        ended: list[bool] = []

        def watch() -> None:
            with server.session.get(server.url("/dashboard/live"), stream=True,
                                    timeout=10) as feed:
                for _ in feed.iter_lines():
                    opened.set()
            ended.append(True)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, watch)
            with trio.fail_after(10):
                while not opened.is_set():
                    await trio.sleep(0.02)
            with trio.fail_after(5):
                server.stop.set()  # the feed ends by itself, well within the grace
                while not ended:
                    await trio.sleep(0.02)


async def test_live_watchers_are_capped(tmp_path):
    async with running(tmp_path, dashboard_max_watchers=1, dashboard_live_s=0.1) as server:
        admin_token, _ = tokens(tmp_path)
        await trio.to_thread.run_sync(login, server, admin_token)
        first = await trio.to_thread.run_sync(lambda: server.session.get(
            server.url("/dashboard/live"), stream=True, timeout=10))
        try:
            with trio.fail_after(5):
                while True:
                    second = await trio.to_thread.run_sync(lambda: requests.get(
                        server.url("/dashboard/live"), timeout=10,
                        cookies=server.session.cookies))
                    if second.status_code == 503:
                        break
                    await trio.sleep(0.05)
            assert second.json()["error"]["code"] == "unavailable"
        finally:
            first.close()


# --- the parts alone
def test_time_range():
    end = datetime(2026, 12, 3, 11, tzinfo=UTC)  # (rolling ranges end with NOW's hour)
    assert time_range({"range": ["today"]}, NOW, 366)[1:] == (
        datetime(2026, 12, 3, tzinfo=UTC), end)
    assert time_range({}, NOW, 366) == ("24h", end - timedelta(days=1), end)
    assert time_range({"range": ["30d"]}, end, 366) == ("30d", end - timedelta(days=30), end)
    assert time_range({"range": ["custom"], "since": ["2026-11-01"],
                       "until": ["2026-11-30"]}, NOW, 366)[1:] == (
        datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    with pytest.raises(ApiError):
        time_range({"range": ["custom"], "since": ["2026-11-01"]}, NOW, 366)
    with pytest.raises(ApiError):
        time_range({"range": ["custom"], "since": ["2026-11-01"], "until": ["2026-11-30"]},
                   NOW, 10)


def test_auth_cookie_expires_and_is_bound_to_the_admin_token():
    now = [1000.0]
    auth = Auth("A" * 43, "V" * 43, 60, True, clock=lambda: now[0])
    cookie = auth.cookie("admin").split(b";")[0]
    assert b"Secure" in auth.cookie("admin")
    req = Request(b"GET", b"/", b"", {b"cookie": b"x=1; " + cookie}, b"", "127.0.0.1")
    assert auth.role(req) == "admin"
    assert Auth("B" * 43, "V" * 43, 60, True, clock=lambda: now[0]).role(req) is None
    now[0] += 61
    assert auth.role(req) is None
    assert auth.role_of_token(b"V" * 43) == "viewer" and auth.role_of_token(b"") is None


def test_same_origin():
    def req(**h):
        return Request(b"POST", b"/login", b"", {k.encode(): v.encode() for k, v in h.items()},
                       b"", "127.0.0.1")
    assert same_origin(req())
    assert same_origin(req(host="a:3000", origin="http://a:3000"))
    assert not same_origin(req(host="a:3000", origin="http://b:3000"))
    assert same_origin(req(**{"sec-fetch-site": "same-origin", "origin": "http://x"}))
    assert not same_origin(req(**{"sec-fetch-site": "same-site"}))


def counting(seconds: float):
    """(calls, compute): a computation taking `seconds` that returns how many ran."""
    calls: list[float] = []

    async def compute():
        calls.append(trio.current_time())
        await trio.sleep(seconds)
        return len(calls)
    return calls, compute


async def test_cache_single_flight_and_expiry(autojump_clock):
    cache = Cache(5.0, entries=2)
    calls, compute = counting(1)

    async with trio.open_nursery() as nursery:
        results = []
        for _ in range(3):
            nursery.start_soon(lambda: _append(results, cache.get("k", compute)))
    assert results == [1, 1, 1] and len(calls) == 1  # one computation for three
    assert await cache.get("k", compute) == 1  # within the ttl
    await trio.sleep(5)
    assert await cache.get("k", compute) == 2  # expired: computed again
    await cache.get("a", compute)
    await cache.get("b", compute)
    assert len(cache.done) == 2  # bounded


async def _append(results, awaitable):
    results.append(await awaitable)


async def test_background_threads_run_niced_and_interruptible():
    made = []

    class Cursor:
        def close(self):
            pass

        def interrupt(self):
            pass

    async def new_cursor():
        made.append(Cursor())
        return made[-1]

    background = Background(2, 19, new_cursor)
    try:
        nice = await background.run(lambda cursor: os.getpriority(
            os.PRIO_PROCESS, threading.get_native_id()))
        assert nice == 19 or os.getpriority(os.PRIO_PROCESS, 0) == 19
        assert await background.run(lambda cursor, x: x + 1, 41) == 42
        assert len(made) == 1  # the cursor is reused
    finally:
        background.close()


async def test_cache_keeps_asked_keys_warm(autojump_clock):
    cache = Cache(4.0, warm_s=10.0)
    calls, compute = counting(0.5)

    assert await cache.get("k", compute) == 1
    await trio.sleep(3)
    assert await cache.warm() == 0  # still fresh
    await trio.sleep(1)
    assert await cache.warm() == 1  # expired: computed again
    await trio.sleep(2)
    assert await cache.get("k", compute) == 2  # answered from memory
    assert len(calls) == 2
    await trio.sleep(11)
    await cache.warm()  # not asked for within warm_s: forgotten
    assert not cache.asked and len(calls) == 2


def test_a_new_viewer_token_ends_the_logins():
    auth = Auth("A" * 43, "V" * 43, 60, False)
    req = Request(b"GET", b"/", b"", {b"cookie": auth.cookie("viewer").split(b";")[0]}, b"",
                  "127.0.0.1")
    assert auth.role(req) == "viewer"
    assert Auth("A" * 43, "W" * 43, 60, False).role(req) is None


async def test_cache_answers_a_warm_key_at_once_while_it_is_renewed(autojump_clock):
    cache = Cache(4.0, warm_s=30.0)
    calls, compute = counting(3)  # (a slow view, on a busy box)

    assert await cache.get("k", compute) == 1
    await trio.sleep(10)  # past its ttl, the warm task starved: the last value, at once
    t = trio.current_time()
    assert await cache.get("k", compute) == 1 and trio.current_time() == t
    assert await cache.warm() == 1  # renewed by the warm task
    assert await cache.get("k", compute) == 2 and len(calls) == 2
    await trio.sleep(31)  # older than warm_s: computed for the asker
    assert await cache.get("k", compute) == 3
    cache.want("w", compute, once=True)  # wanted before it is asked for: computed by
    assert await cache.warm() == 1  # the warm task, once
    await trio.sleep(5)
    assert await cache.warm() == 1  # ("k" again)
    assert "w" not in cache.asked and len(calls) == 5
