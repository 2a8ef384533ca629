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
    created = await server.post("/create")
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
