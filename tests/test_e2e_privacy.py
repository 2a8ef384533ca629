"""Privacy controls end to end on loopback: `ip_mode`, `respect_dnt`, `triolytics forget`.

Each test runs the whole server (test_e2e_collector's `running`), talks HTTP and the
WebSocket to it, stops it and reads what DuckDB holds.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest
import trio
import trio_websocket
from test_e2e_collector import AUTH, running

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
