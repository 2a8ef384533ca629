"""Privacy controls end to end on loopback: `ip_mode`, `respect_dnt`, `triolytics forget`.

Each test runs the whole server (test_e2e_collector's `running`), talks HTTP and the
WebSocket to it, stops it and reads what DuckDB holds.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import duckdb
import pytest
import trio
import trio_websocket
from test_e2e_collector import AUTH, WRITE_KEY, running

from triolytics import cli
from triolytics.core.capture import RequestMeta
from triolytics.core.collector import Collector
from triolytics.core.config import load_config
from triolytics.core.journal import Journal
from triolytics.core.rows import encode_part
from triolytics.storage.store import Store

EVENT = {"type": "track", "event": "E", "anonymousId": "anon-1"}


def rows(data_dir: Path, sql: str) -> list[tuple]:
    con = duckdb.connect(str(data_dir / "events.duckdb"), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


async def _send_everything(server, extra_headers=None) -> tuple[list[int], str, dict]:
    """Events over every HTTP route kind and the WebSocket; (statuses, analytics_id, ack)."""
    headers = {**AUTH, **(extra_headers or {})}
    statuses = []
    for path, body in (("/v1/capture", {**EVENT, "messageId": "m-capture"}),
                       ("/v1/track", {**EVENT, "messageId": "m-track"}),
                       ("/v1/batch", {"batch": [{**EVENT, "messageId": "m-batch"},
                                                {**EVENT, "messageId": "m-own-ip", "context":
                                                 {"ip": "198.51.100.9"}}]})):
        statuses.append((await server.post(path, json=body, headers=headers)).status_code)
    created = await server.post("/create", headers=extra_headers)
    assert created.status_code == 200
    aid = created.json()["analytics_id"]
    async with trio_websocket.open_websocket_url(
            f"ws://127.0.0.1:{server.port}/analytics?analytics_id={aid}",
            extra_headers=list((extra_headers or {}).items())) as ws:
        await ws.send_message(json.dumps({"events": [{"type": "screen_view"}], "seq": 1}))
        with trio.fail_after(10):
            ack = json.loads(await ws.get_message())
    return statuses, aid, ack


@pytest.mark.parametrize(("mode", "peer", "own"), [
    ("full", "127.0.0.1", "198.51.100.9"),
    ("truncate", "127.0.0.0", "198.51.100.0"),
    ("drop", None, None),
])
async def test_ip_mode_decides_every_stored_ip(tmp_path, mode, peer, own):
    async with running(tmp_path, ip_mode=mode) as server:
        statuses, aid, ack = await _send_everything(server)
    assert statuses == [201, 200, 200] and ack["type"] == "ack"
    ips = dict(rows(tmp_path, "SELECT coalesce(message_id, type), context->>'ip' FROM events "
                              "WHERE type NOT IN ('session_start', 'session_end')"))
    assert ips.pop("m-own-ip") == own
    ws_ips = {ip for key, ip in ips.items() if not key.startswith("m-")}
    assert len(ips) == 4 and set(ips.values()) == {peer}, ips
    assert ws_ips == {peer}
    if mode == "drop":  # no key at all, not a null one
        assert rows(tmp_path, "SELECT count(*) FROM events WHERE json_exists(context, '$.ip')"
                    ) == [(0,)]
    assert rows(tmp_path, "SELECT analytics_id, ip FROM analytics_ids") == [(aid, peer)]


async def _stats(server) -> dict:
    token = (server.data_dir / "admin.token").read_text().strip()
    reply = await server.request("GET", "/admin/stats", headers={"authorization":
                                                                 f"Bearer {token}"})
    assert reply.status_code == 200
    return reply.json()


@pytest.mark.parametrize("header", [{"DNT": "1"}, {"Sec-GPC": "1"}])
async def test_respect_dnt_answers_as_usual_and_stores_nothing(tmp_path, header):
    async with running(tmp_path, respect_dnt=True) as server:
        statuses, aid, ack = await _send_everything(server, header)
        invalid = await server.post("/v1/capture", json={"type": "track"},
                                    headers={**AUTH, **header})
        tracked = await server.post("/v1/capture", json={**EVENT, "messageId": "tracked"},
                                    headers=AUTH)
        stats = await _stats(server)
    assert statuses == [201, 200, 200]  # the same answers as when stored
    assert ack == {"type": "ack", "seq": 1, "stored": 1, "session_id": None}
    assert invalid.status_code == 400  # and the same refusals
    assert tracked.status_code == 201
    assert stats["dnt_skipped"] == 6  # 4 HTTP requests, /create and one WebSocket message
    assert rows(tmp_path, "SELECT message_id FROM events WHERE type = 'track'") == [("tracked",)]
    assert rows(tmp_path, "SELECT count(*) FROM events WHERE anonymous_id = ?".replace(
        "?", f"'{aid}'")) == [(0,)]
    assert rows(tmp_path, "SELECT count(*) FROM analytics_ids") == [(0,)]


async def test_dnt_is_ignored_unless_respect_dnt(tmp_path):
    async with running(tmp_path) as server:
        statuses, aid, ack = await _send_everything(server, {"DNT": "1"})
        stats = await _stats(server)
    assert statuses == [201, 200, 200] and ack["stored"] == 1
    assert stats["dnt_skipped"] == 0
    assert rows(tmp_path, "SELECT count(*) FROM events WHERE type != 'session_start' "
                          "AND type != 'session_end'") == [(5,)]


# --- triolytics forget

def _forget(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["forget", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


async def _events_for(server, user: str, anon: str, n: int) -> None:
    for i in range(n):
        reply = await server.post("/v1/capture", headers=AUTH, json={
            **EVENT, "anonymousId": anon, "userId": user, "messageId": f"{user}-{i}"})
        assert reply.status_code == 201


async def test_forget_while_the_server_runs_covers_rows_not_yet_loaded(tmp_path, capsys,
                                                                          caplog):
    caplog.set_level(logging.INFO, logger="triolytics")
    data = ["--data", str(tmp_path)]
    run = partial(trio.to_thread.run_sync, _forget, capsys)
    # loads only every minute: what is forgotten is journaled, not yet in DuckDB
    async with running(tmp_path, load_interval_ms=60_000) as server:
        await _events_for(server, "u-gone", "a-gone", 3)
        await _events_for(server, "u-kept", "a-kept", 2)
        aid = (await server.post("/create")).json()["analytics_id"]
        async with trio_websocket.open_websocket_url(
                f"ws://127.0.0.1:{server.port}/analytics?analytics_id={aid}") as ws:
            await ws.send_message(json.dumps({"events": [{"type": "a"}, {"type": "b"}],
                                              "seq": 1}))
            with trio.fail_after(10):
                assert json.loads(await ws.get_message())["type"] == "ack"
        assert (await _stats(server))["loaded_rows"] == 0
        code, out, _ = await run("--user", "u-gone", *data)
        assert code == 0
        assert out.strip() == "deleted 4 events"  # 3 and their session's start
        code, out, _ = await run("--analytics-id", aid, *data)
        assert (code, out.strip()) == (0, "deleted 3 events and 1 analytics_id")
        code, out, _ = await run("--anonymous-id", "a-kept", "--project", "other", *data)
        assert (code, out.strip()) == (0, "deleted 0 events")
        code, out, err = await run("--anonymous-id", "", *data)
        assert code == 1 and "id" in err
    assert rows(tmp_path, "SELECT DISTINCT user_id FROM events") == [("u-kept",)]
    assert rows(tmp_path, "SELECT count(*) FROM analytics_ids") == [(0,)]
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("forget")]
    assert len(logged) == 3, logged
    assert any("--user" in m and "4 events" in m for m in logged), logged
    assert not any("u-gone" in m or aid in m or "a-kept" in m for m in logged), logged


async def test_forget_while_the_server_is_stopped_replays_the_journal_first(tmp_path, capsys):
    data = ["--data", str(tmp_path)]
    async with running(tmp_path) as server:
        await _events_for(server, "u-gone", "a-gone", 2)
        await _events_for(server, "u-kept", "a-kept", 1)
    # rows journaled after the last load, as a kill -9 leaves them
    config = load_config(overrides={"data_dir": str(tmp_path)})
    collector = Collector(config, {WRITE_KEY: "default"})
    accepted = collector.capture(None, {b"x-write-key": WRITE_KEY.encode()}, json.dumps(
        {**EVENT, "anonymousId": "a-gone", "userId": "u-gone", "messageId": "late"}).encode(),
        RequestMeta(1_700_000_000_000_000, "127.0.0.1"))
    journal = Journal(tmp_path / "journal", config.journal_segment_bytes)
    journal.open()
    journal.append([encode_part(accepted.rows)])
    journal.sync()
    journal.close()
    code, out, _ = _forget(capsys, "--user", "u-gone", *data)
    assert (code, out.strip()) == (0, "deleted 5 events")  # 2 + 1 late, 2 session starts
    assert rows(tmp_path, "SELECT DISTINCT user_id FROM events") == [("u-kept",)]
    async with running(tmp_path):  # nothing comes back from the journal at the next start
        pass
    assert rows(tmp_path, "SELECT DISTINCT user_id FROM events") == [("u-kept",)]
    code, out, err = _forget(capsys, "--user", "u-gone", "--data", str(tmp_path / "none"))
    assert code == 1 and "events.duckdb" in err


async def test_admin_forget_needs_the_token(tmp_path):
    async with running(tmp_path) as server:
        reply = await server.post("/admin/forget", json={"kind": "user", "id": "u"})
    assert reply.status_code == 401


def test_forget_is_one_transaction(tmp_path):
    """A failure (or a kill) between the DELETEs leaves everything: both are in one
    transaction, so a kill -9 in the middle deletes all or nothing."""
    store = Store(tmp_path / "events.duckdb")
    store.record_analytics_ids([("0.x", 1, None)])
    real = store.conn

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def execute(self, sql, *args):
            if sql.startswith("DELETE FROM analytics_ids"):
                raise duckdb.IOException("injected")
            return real.execute(sql, *args)

    store.conn.execute("INSERT INTO events (message_id, project, type, anonymous_id, "
                       "timestamp, received_at, ingest_seq) VALUES ('m', 'default', 'track', "
                       "'0.x', now(), now(), 1)")
    store.conn = Failing()
    with pytest.raises(duckdb.IOException):
        store.forget("analytics_id", "0.x", None)
    store.conn = real
    assert store.conn.execute("SELECT count(*) FROM events").fetchone() == (1,)
    assert store.forget("analytics_id", "0.x", None) == (1, 1)
    assert store.conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
    # checkpointed: the DELETE is in the file, so a WAL set aside later cannot undo it
    assert not store.wal_path.exists() or store.wal_path.stat().st_size == 0
    store.close()
