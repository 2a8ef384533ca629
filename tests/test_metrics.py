"""`GET /metrics`: Prometheus text on loopback, guarded by a token, agreeing with DuckDB.

Level three of the test ladder: `serve` runs in a nursery (test_e2e_realtime's helpers),
HTTP and WebSocket clients send a mixed load, `/metrics` is scraped and parsed with
prometheus_client's own parser, and the counters are held against the rows in DuckDB.
The docs' dashboard and alert rules may name only metrics a scrape shows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import duckdb
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from test_e2e_realtime import Server, ack, running, ws

from triolytics.core.config import Config, ConfigError
from triolytics.server.startup import startup_error

ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "wk_metrics_1"
KEYED = [(b"content-type", b"application/json"), (b"x-write-key", WRITE_KEY.encode())]


def admin(server: Server) -> list[tuple[bytes, bytes]]:
    token = (server.data_dir / "admin.token").read_text().strip().encode()
    return [(b"authorization", b"Bearer " + token)]


async def scrape(server: Server, headers=None) -> dict[tuple[str, frozenset], float]:
    status, got, body = await server.http(b"GET", b"/metrics",
                                          admin(server) if headers is None else headers)
    assert status == 200, body
    assert got[b"content-type"].startswith(b"text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_need_the_admin_token_or_the_metrics_token(tmp_path):
    async with running(tmp_path / "a") as server:
        status, _, body = await server.http(b"GET", b"/metrics")
        assert status == 401 and b"unauthorized" in body
        status, _, _ = await server.http(b"GET", b"/metrics",
                                         [(b"authorization", b"Bearer wrong")])
        assert status == 401
        assert await scrape(server)  # the admin token, as no metrics_token is set
    async with running(tmp_path / "b", metrics_token="scrape-secret") as server:
        status, _, _ = await server.http(b"GET", b"/metrics", admin(server))
        assert status == 401  # a metrics_token replaces the admin token here
        samples = await scrape(server, [(b"authorization", b"Bearer scrape-secret")])
        assert value(samples, "triolytics_ws_connections") == 0
        assert ("process_cpu_seconds_total", frozenset()) in samples


def private(server: Server) -> Server:
    """The same server, reached on its metrics_listen address."""
    assert server.metrics_port and server.metrics_port != server.port
    return Server(server.metrics_port, server.data_dir, server.stop)


async def test_metrics_listen_serves_only_metrics_there_and_no_token(tmp_path):
    async with running(tmp_path, metrics_listen="127.0.0.1:0") as server:
        samples = await scrape(private(server), [])  # no token asked for
        assert value(samples, "triolytics_ready") == 1
        assert ("process_cpu_seconds_total", frozenset()) in samples
        status, _, body = await server.http(b"GET", b"/metrics", admin(server))
        assert status == 404, body  # only on the private address
        assert (await server.http(b"GET", b"/healthz"))[0] == 200
        for path in (b"/healthz", b"/admin/stats", b"/v1/capture"):
            assert (await private(server).http(b"GET", path, admin(server)))[0] == 404
        assert (await private(server).http(b"POST", b"/metrics"))[0] == 405
        samples = await scrape(private(server), [])
        assert value(samples, "triolytics_http_requests_total", route="/healthz",
                     status="200") == 1  # (the main port's responses only)


async def test_metrics_listen_with_a_metrics_token_asks_for_it(tmp_path):
    async with running(tmp_path, metrics_listen="127.0.0.1:0",
                       metrics_token="scrape-secret") as server:
        there = private(server)
        assert (await there.http(b"GET", b"/metrics"))[0] == 401
        assert (await there.http(b"GET", b"/metrics", admin(server)))[0] == 401
        assert await scrape(there, [(b"authorization", b"Bearer scrape-secret")])
        status, _, _ = await server.http(b"GET", b"/metrics",
                                         [(b"authorization", b"Bearer scrape-secret")])
        assert status == 404


async def test_metrics_listen_malformed_or_taken_is_a_clear_startup_error(tmp_path):
    for bad in ("9464", "localhost", ":9464", "127.0.0.1:x", "127.0.0.1:70000"):
        with pytest.raises(ConfigError, match="metrics_listen must be host:port"):
            Config(metrics_listen=bad)
    taken = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = taken.socket.getsockname()[1]
    with pytest.raises(BaseException) as caught:  # noqa: PT011 (trio wraps it in a group)
        async with running(tmp_path, metrics_listen=f"127.0.0.1:{port}"):
            pass
    fault = startup_error(caught.value)
    assert fault is not None and f"127.0.0.1:{port}" in str(fault)
    assert "metrics_listen" in str(fault)
    await taken.aclose()


async def test_counters_agree_with_duckdb_after_a_mixed_load(tmp_path):
    async with running(tmp_path, write_keys=[WRITE_KEY], load_interval_ms=20) as server:
        dup = b'{"type":"track","event":"A","anonymousId":"u1","messageId":"m-dup"}'
        assert (await server.http(b"POST", b"/v1/capture", KEYED, dup))[0] == 201
        assert (await server.http(b"POST", b"/v1/capture", KEYED, dup))[0] == 201  # a repeat
        assert (await server.http(b"POST", b"/v1/capture", KEYED, b"{nope"))[0] == 400
        batch = {"batch": [{"type": "track", "event": "B", "anonymousId": "u2"},
                           {"type": "track", "event": "C", "anonymousId": "u2"},
                           {"type": "track", "anonymousId": "u2"}]}  # no event name
        status, _, body = await server.http(b"POST", b"/v1/batch", KEYED,
                                            json.dumps(batch).encode())
        assert status == 200 and json.loads(body)["stored"] == 2, body
        assert (await server.http(b"GET", b"/nowhere"))[0] == 404
        aid = await server.create()
        async with ws(server, aid) as conn:
            events = [{"type": "w", "payload": {"i": i}} for i in range(3)]
            await conn.send_message(json.dumps({"events": events, "seq": 0}))
            await conn.send_message('{"events":[{"type":7}],"seq":1}')
            assert (await ack(conn))["type"] == "ack"
            assert (await ack(conn))["type"] == "error"
            live = await scrape(server)
            assert value(live, "triolytics_ws_connections") == 1
        with trio.fail_after(10):
            while True:
                s = await scrape(server)
                if value(s, "triolytics_unloaded_rows") == 0 and \
                        value(s, "triolytics_loaded_rows_total") == \
                        value(s, "triolytics_journaled_rows_total"):
                    break
                await trio.sleep(0.02)
        while value(s, "triolytics_ws_connections"):  # (the close reaches the server)
            await trio.sleep(0.02)
            s = await scrape(server)
    con = duckdb.connect(str(tmp_path / "events.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT count(*) FROM events").fetchone()[0]
        events = dict(con.execute(
            "SELECT type = 'w', count(*) FROM events "
            "WHERE type NOT IN ('session_start', 'session_end') GROUP BY 1").fetchall())
        sessions = con.execute("SELECT count(DISTINCT session_id) FROM events").fetchone()[0]
    finally:
        con.close()
    received_http = value(s, "triolytics_events_received_total", transport="http")
    received_ws = value(s, "triolytics_events_received_total", transport="websocket")
    duplicates = value(s, "triolytics_duplicates_total")
    assert (received_http, received_ws, duplicates) == (4, 3, 1)
    assert events == {False: 3, True: 3}  # stored: received less the repeats
    assert received_http + received_ws - duplicates == sum(events.values())
    assert value(s, "triolytics_loaded_rows_total") == rows  # events and session rows
    assert value(s, "triolytics_journaled_rows_total") == rows
    assert value(s, "triolytics_events_refused_total", transport="http",
                 code="invalid_event") == 1
    assert value(s, "triolytics_events_refused_total", transport="http",
                 code="invalid_json") == 1
    assert value(s, "triolytics_events_refused_total", transport="websocket",
                 code="invalid_event") == 1
    assert value(s, "triolytics_http_requests_total", route="/v1/capture", status="201") == 2
    assert value(s, "triolytics_http_requests_total", route="/v1/capture", status="400") == 1
    assert value(s, "triolytics_http_requests_total", route="/v1/batch", status="200") == 1
    assert value(s, "triolytics_http_requests_total", route="other", status="404") == 1
    assert value(s, "triolytics_sessions") == sessions >= 2
    assert value(s, "triolytics_load_lag_seconds") == 0
    assert value(s, "triolytics_unloaded_bytes") == 0
    loads = value(s, "triolytics_duckdb_loads_total")
    assert loads >= 1 and value(s, "triolytics_duckdb_load_errors_total") == 0
    assert value(s, "triolytics_duckdb_load_duration_seconds_count") == loads
    assert value(s, "triolytics_duckdb_load_duration_seconds_bucket", le="+Inf") == loads
    assert value(s, "triolytics_journal_groups_total") >= 1
    assert value(s, "triolytics_journal_syncs_total") >= 1
    assert value(s, "triolytics_journal_ack_duration_seconds_count") >= 1


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:triolytics|process)_[a-z_]+", expr))


async def test_the_dashboard_and_the_alerts_name_only_metrics_that_exist(tmp_path):
    async with running(tmp_path) as server:
        assert (await server.http(b"POST", b"/v1/capture", body=b"{}"))[0] == 401
        names = {name for name, _ in await scrape(server)}  # (labelled ones: once seen)
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 7
    alerts = (ROOT / "docs" / "alerts.yml").read_text()
    exprs += re.findall(r"expr: (.+)", alerts)
    for expr in exprs:
        assert metric_names(expr), expr
        assert metric_names(expr) <= names, expr
    documented = (ROOT / "docs" / "metrics.md").read_text()
    for name in {re.sub(r"_(bucket|sum|count)$", "", n) for n in names
                 if n.startswith("triolytics_")}:
        assert f"`{name}`" in documented, name
