"""The server on a DuckLake, end to end on loopback: the API documents' flows, the owner's
query, export, the dashboard, archive and retention, forget, work as on the file; and
two servers on one PostgreSQL catalog (the `postgres` fixture) share sessions and dedup:
a visitor's events through either server make one session, a WebSocket reconnecting to
the other server resumes it, a batch retried through the other server is stored once,
and the session ends once."""

from __future__ import annotations

import itertools
import json
import logging
import os
import subprocess
import sys
from contextlib import AsyncExitStack

import trio
from test_dashboard import login, tokens
from test_e2e_collector import AUTH, WRITE_KEY, running
from test_e2e_query import admin

from triolytics.storage.lake import connect

_names = itertools.count()


def lake_settings(tmp_path, catalog: str | None = None, node: str = "n1", **more) -> dict:
    return {"store": "ducklake", "ducklake_catalog": catalog or str(tmp_path / "catalog.ducklake"),
            "ducklake_data_path": str(tmp_path / "lake"), "node_id": node,
            "load_interval_ms": 50, **more}


async def query(server, sql: str) -> list[list]:
    reply = await server.post("/admin/query", json={"sql": sql}, headers=admin(server.data_dir))
    assert reply.status_code == 200, reply.text
    return reply.json()["rows"]


async def until(server, sql: str, want, timeout: float = 15) -> list[list]:
    with trio.fail_after(timeout):
        while True:
            rows = await query(server, sql)
            if rows == want:
                return rows
            await trio.sleep(0.05)


async def test_the_documents_query_export_dashboard_and_forget_on_a_local_lake(tmp_path):
    data = tmp_path / "data"
    async with running(data, **lake_settings(tmp_path)) as server:
        reply = await server.post("/v1/capture", headers=AUTH, json={
            "type": "track", "event": "Signed Up", "anonymousId": "a1", "messageId": "m1"})
        assert reply.status_code == 201
        reply = await server.post("/v1/batch", headers=AUTH, json={"batch": [
            {"type": "page", "anonymousId": "a1", "properties": {"path": "/x"}},
            {"type": "track", "userId": "u2", "event": "Order Completed"}]})
        assert reply.status_code == 200
        await until(server, "SELECT count(*) FROM events WHERE type <> 'session_start'", [[3]])
        sessions = await query(server, "SELECT anonymous_id, count(DISTINCT session_id) "
                                       "FROM events WHERE anonymous_id = 'a1' GROUP BY 1")
        assert sessions == [["a1", 1]]
        # export: Parquet files and a manifest, as from the file
        out = tmp_path / "export"
        reply = await server.post("/admin/export", json={"to": str(out)},
                                  headers=admin(data))
        assert reply.status_code == 200, reply.text
        assert sum(f["rows"] for f in reply.json()["files"]) >= 3
        # the dashboard's figures
        assert (await trio.to_thread.run_sync(login, server, tokens(data)[0])
                ).status_code in (200, 303)
        figures = await trio.to_thread.run_sync(
            lambda: server.session.get(server.url("/dashboard/figures?range=24h"), timeout=20))
        assert figures.status_code == 200, figures.text
        assert figures.json()["overview"]["events"]["value"] >= 1
        # forget one person
        reply = await server.post("/admin/forget", json={"kind": "user", "id": "u2"},
                                  headers=admin(data))
        assert reply.status_code == 200 and reply.json()["events"] == 2  # (and its start)
        await until(server, "SELECT count(*) FROM events WHERE user_id = 'u2'", [[0]])


async def test_archive_and_retention_on_a_local_lake(tmp_path, caplog):
    caplog.set_level(logging.INFO, "triolytics.archive")
    data, root = tmp_path / "data", tmp_path / "archive"
    async with running(data, **lake_settings(tmp_path, archive_dir=str(root),
                                             archive_interval_s=0.2,
                                             retention_days=30)) as server:
        for i in range(4):
            reply = await server.post("/v1/capture", headers=AUTH, json={
                "type": "track", "event": "E", "anonymousId": f"u{i}", "messageId": f"x{i}",
                "timestamp": f"2024-05-0{i % 2 + 1}T10:00:00Z"})
            assert reply.status_code == 201
        with trio.fail_after(30):
            while not (root / "dt=2024-05").exists() or "retention: deleted" \
                    not in caplog.text:
                await trio.sleep(0.05)
        await until(server, "SELECT count(*) FROM events WHERE timestamp < "
                            "TIMESTAMPTZ '2024-06-01'", [[0]])
        assert await query(server, "SELECT day::VARCHAR FROM archived_days ORDER BY 1") == \
            [["2024-05-01"], ["2024-05-02"]]


async def test_two_servers_on_one_catalog_share_sessions_and_dedup(tmp_path, postgres):
    catalog = postgres.create_database(f"e2elake{next(_names)}")
    timeout = {"session_timeout_s": 3.0, "shared_reap_interval_s": 0.2}
    async with AsyncExitStack() as stack:
        one = await stack.enter_async_context(running(
            tmp_path / "n1", **lake_settings(tmp_path, catalog, "n1", **timeout)))
        two = await stack.enter_async_context(running(
            tmp_path / "n2", **lake_settings(tmp_path, catalog, "n2", **timeout)))
        # one visitor's events alternate between the servers
        for i in range(4):
            server = (one, two)[i % 2]
            reply = await server.post("/v1/capture", headers=AUTH, json={
                "type": "track", "event": f"E{i}", "anonymousId": "v1", "messageId": f"m{i}"})
            assert reply.status_code == 201
        # a batch retried through the other server is stored once
        batch = {"batch": [{"type": "track", "event": "B", "anonymousId": "v1",
                            "messageId": f"b{i}"} for i in range(3)]}
        assert (await one.post("/v1/batch", headers=AUTH, json=batch)).status_code == 200
        assert (await two.post("/v1/batch", headers=AUTH, json=batch)).status_code == 200
        # a WebSocket session begun on one server resumes on the other
        created = (await one.post("/create")).json()
        aid = created["analytics_id"]
        acks = [await ws_send(server, aid, n) for server, n in ((one, 2), (two, 3))]
        assert acks[0]["session_id"] == acks[1]["session_id"]
        sql = ("SELECT type, count(*), count(DISTINCT session_id), count(DISTINCT writer) "
               "FROM events WHERE anonymous_id = '{}' GROUP BY 1 ORDER BY 1")
        await until(one, sql.format("v1"),
                    [["session_end", 1, 1, 1], ["session_start", 1, 1, 1],
                     ["track", 7, 1, 2]], timeout=20)
        await until(two, sql.format(aid),
                    [["click", 5, 1, 2], ["session_end", 1, 1, 1], ["session_start", 1, 1, 1]],
                    timeout=20)
        ends = await query(two, "SELECT properties FROM events WHERE type = 'session_end' "
                                "AND anonymous_id = 'v1'")
        assert json.loads(ends[0][0])["event_count"] == 7


async def ws_send(server, aid: str, n: int) -> dict:
    """`n` events over the WebSocket at /analytics in one acked batch; the ack."""
    from trio_websocket import open_websocket_url
    url = f"ws://127.0.0.1:{server.port}/analytics?analytics_id={aid}"
    async with open_websocket_url(url) as ws:
        await ws.send_message(json.dumps({"seq": 1, "events": [
            {"type": "click", "payload": {"i": i}} for i in range(n)]}))
        ack = json.loads(await ws.get_message())
        assert ack.get("seq") == 1, ack
        return ack


def test_a_reader_outside_the_server_sees_the_lake(tmp_path):
    """(docs/scaling.md: any DuckDB attaches the lake read-only; with a local catalog,
    once the server is stopped.)"""
    async def main():
        async with running(tmp_path / "d", **lake_settings(tmp_path)) as server:
            reply = await server.post("/v1/capture", headers=AUTH, json={
                "type": "track", "event": "E", "anonymousId": "a"})
            assert reply.status_code == 201
    trio.run(main)
    conn = connect(str(tmp_path / "catalog.ducklake"), str(tmp_path / "lake"), read_only=True)
    try:
        assert conn.execute("SELECT count(*) FROM events WHERE type = 'track'").fetchone() == (1,)
    finally:
        conn.close()
    # the CLI reads (and forgets in) the lake of a stopped server
    env = {**os.environ, **{f"TRIOLYTICS_{k.upper()}": str(v)
                            for k, v in lake_settings(tmp_path).items()}}
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "triolytics", *args, "--data",
                               str(tmp_path / "d")], capture_output=True, text=True,
                              env=env, timeout=60)
    got = cli("query", "SELECT count(*) AS n FROM events WHERE type = 'track'")
    assert got.returncode == 0 and got.stdout.split() == ["n", "1"], got.stderr
    got = cli("keys", "list")
    assert got.returncode == 0 and WRITE_KEY in got.stdout, got.stderr
    got = cli("forget", "--anonymous-id", "a")
    assert got.returncode == 0 and "deleted 2 events" in got.stdout, got.stderr


async def test_lost_shared_state_connections_refuse_groups_until_reopened(tmp_path,
                                                                            postgres):
    """PostgreSQL drops the writer's connections (a restart, a failover): a group on a
    broken connection is answered 503 with Retry-After and stores nothing; the retry
    and the next events are stored, once each."""
    catalog = postgres.create_database(f"e2elake{next(_names)}")
    async with running(tmp_path / "n1", **lake_settings(tmp_path, catalog)) as server:
        event = {"type": "track", "event": "E", "anonymousId": "v"}
        assert (await server.post("/v1/capture", headers=AUTH,
                                  json={**event, "messageId": "m0"})).status_code == 201
        dbname = catalog.rsplit("dbname=", 1)[1].split()[0]
        postgres.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                      f"datname = '{dbname}' AND application_name LIKE 'triolytics%'")
        refused = []
        for mid in ("m1", "m2"):  # (each with the SDK's retries)
            while True:
                answer = await server.post("/v1/capture", headers=AUTH,
                                           json={**event, "messageId": mid})
                if answer.status_code == 201:
                    break
                refused.append(answer)
                assert len(refused) <= 2, [a.text for a in refused]  # (one per connection)
        for answer in refused:  # (a connection found closed is opened again first)
            assert answer.status_code == 503 and answer.headers["retry-after"]
            assert "shared state" in answer.json()["error"]["message"]
        await until(server, "SELECT message_id FROM events WHERE type = 'track' ORDER BY 1",
                    [["m0"], ["m1"], ["m2"]])


async def test_one_writer_leads_the_upkeep_and_another_takes_over(tmp_path, postgres, caplog):
    """The lake's upkeep (rollups, maintenance, archive) runs at one writer: the one
    holding the lead's advisory lock. Here another holder (this test) has it first; the
    server only serves, then takes over within seconds once the holder goes."""
    import psycopg

    from triolytics.storage.shared_state import Leader
    caplog.set_level(logging.INFO, "triolytics")
    catalog = postgres.create_database(f"e2elake{next(_names)}")
    holder = psycopg.connect(catalog, autocommit=True)
    assert holder.execute("SELECT pg_try_advisory_lock(%s)", [Leader.LOCK]).fetchone()[0]
    async with running(tmp_path / "n1", **lake_settings(tmp_path, catalog, "n1")):
        await trio.sleep(0.5)
        assert "leads the lake's upkeep" not in caplog.text
        holder.close()  # (a leader that dies: its session, and the lock, go)
        with trio.fail_after(10):
            while "now leads the lake's upkeep" not in caplog.text:
                await trio.sleep(0.1)
