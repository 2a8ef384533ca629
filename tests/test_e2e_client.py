"""`triolytics.client` against the real server (`serve` in a nursery, on loopback).

The other end of tests/test_client.py's fakes: `create_analytics_id` → `open_client` →
`send` → `flush`, then DuckDB is read once `serve` has returned. The restarts stop one
`serve` and start another on the SAME port and data directory (the client reconnects to
a fixed URL), so the port is picked first. Real time throughout: the client's backoff
and the server's journal run on the wall clock, with short backoffs.
"""

from __future__ import annotations

import json
import socket
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import pytest
import trio
from test_e2e_realtime import stored  # one reading of the events table

from triolytics.client import BufferFull, ClientError, create_analytics_id, open_client
from triolytics.core.config import Config, ConfigError
from triolytics.server.app import serve

HOST = "127.0.0.1"
FAST = {"backoff_initial_s": 0.02, "backoff_max_s": 0.1, "close_timeout_s": 10.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@asynccontextmanager
async def running(data_dir: Path, port: int = 0, **overrides):
    """`serve` for the block; yields its base URL. Leaving returns once it has stopped
    (connections closed, everything loaded into DuckDB)."""
    config = Config(host=HOST, port=port, data_dir=str(data_dir), **overrides)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(partial(serve, config, stop=stop))
        try:
            yield f"http://{HOST}:{bound.port}"
        finally:
            stop.set()




def check_one_session(rows: list[dict], analytics_id: str, ids: list[str]) -> str:
    """Every id stored exactly once, one session_start, one session_id for all rows."""
    events = [r for r in rows if r["type"] not in ("session_start", "session_end")]
    got = [r["message_id"] for r in events]
    assert len(got) == len(set(got)), "an event was stored twice"
    assert sorted(got) == sorted(ids)
    assert [r["type"] for r in rows].count("session_start") == 1
    assert "session_end" not in [r["type"] for r in rows]
    assert {r["anonymous_id"] for r in rows} == {analytics_id}
    assert {r["channel"] for r in rows} == {"ws"}
    (session,) = {r["session_id"] for r in rows}
    assert session
    return session


async def test_create_send_flush_stores_one_session(tmp_path):
    async with running(tmp_path) as base:
        aid = await create_analytics_id(base)
        async with open_client(base, aid, **FAST) as client:
            ids = [client.send("screen_view", {"screen_name": "Home", "n": n})
                   for n in range(250)]  # three frames at max_batch_events=100
            ids.append(client.send("button_click", {"btn_id": "play_music"}, ts=1706859005000))
            await client.flush(timeout=10)
            stats = client.stats()
            session = client.session_id
    assert stats.events_acked == 251 and stats.events_refused == 0
    assert stats.reconnects == 0 and stats.frames_resent == 0
    assert client.errors == []
    rows = stored(tmp_path)
    assert rows[0]["type"] == "session_start"
    assert check_one_session(rows, aid, ids) == session
    by_id = {r["message_id"]: r for r in rows}
    assert json.loads(by_id[ids[7]]["properties"]) == {"screen_name": "Home", "n": 7}
    assert by_id[ids[-1]]["original"] == 1706859005000


async def test_create_exactly_as_the_document_no_headers_no_body(tmp_path):
    async with running(tmp_path) as base:
        stream = await trio.open_tcp_stream(HOST, int(base.rsplit(":", 1)[1]))
        async with stream:
            await stream.send_all(b"POST /create HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            with trio.fail_after(10):
                while b"\r\n\r\n" not in answer:
                    answer += await stream.receive_some(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer


async def test_a_server_restart_mid_stream_stores_each_event_once_in_one_session(tmp_path):
    port = free_port()
    ids: list[str] = []
    sessions: set[str] = set()

    async def keep_sending(client, n: int) -> None:
        for i in range(n):
            ids.append(client.send("tick", {"i": i}))
            if client.session_id:
                sessions.add(client.session_id)
            await trio.sleep(0.002)

    async with running(tmp_path, port) as base:
        aid = await create_analytics_id(base)
    async with open_client(base, aid, **FAST) as client, trio.open_nursery() as nursery:
        async with running(tmp_path, port):
            nursery.start_soon(keep_sending, client, 600)
            while client.stats().events_acked < 150:
                await trio.sleep(0.005)
            first = client.session_id
        # stopped (clean: in-flight batches acked, then 1001); the client keeps sending
        acked_before = client.stats().events_acked
        await trio.sleep(0.3)
        assert not client.connected
        async with running(tmp_path, port):
            while len(ids) < 600:
                await trio.sleep(0.01)
            await client.flush(timeout=10)
            stats = client.stats()
            last = client.session_id
    assert acked_before < 600, "the restart came too late to be in the middle"
    assert stats.reconnects >= 1 and stats.events_acked == 600 and client.errors == []
    assert first == last and sessions == {first}
    assert check_one_session(stored(tmp_path), aid, ids) == first


async def test_buffer_full_while_the_server_is_down_then_delivered(tmp_path):
    port = free_port()
    limit = 50
    async with running(tmp_path, port) as base:
        aid = await create_analytics_id(base)
    async with open_client(base, aid, max_buffered_events=limit, **FAST) as client:
        async with running(tmp_path, port):
            ids = [client.send("before") for _ in range(5)]
            await client.flush(timeout=10)
        # the server is gone; the client's buffer fills, then it refuses
        held = [client.send("while_down", {"n": n}) for n in range(limit)]
        with pytest.raises(BufferFull) as full:
            client.send("one_too_many")
        with pytest.raises(BufferFull):
            client.send_many([{"type": "a"}])
        await trio.sleep(0.3)  # several reconnect attempts: nothing dropped or added
        stats = client.stats()
        assert (stats.buffered, stats.in_flight, stats.connected) == (limit, 0, False)
        assert stats.connect_failures >= 2
        async with running(tmp_path, port):
            await client.flush(timeout=10)
            ids += held
            ids.append(client.send("after"))  # room again
            await client.flush(timeout=10)
            session = client.session_id
    assert full.value.status is None
    rows = stored(tmp_path)
    types = [r["type"] for r in rows]
    assert "one_too_many" not in types and "a" not in types
    assert check_one_session(rows, aid, ids) == session


async def test_an_id_from_another_server_is_refused_403_and_fatal(tmp_path):
    async with running(tmp_path / "a") as other:
        foreign = await create_analytics_id(other)
    async with running(tmp_path / "b") as base:
        with pytest.raises(ClientError) as at_exit:
            async with open_client(base, foreign, **FAST) as client:
                client.send("lost")
                with pytest.raises(ClientError) as at_flush:
                    await client.flush(timeout=10)
                with pytest.raises(ClientError) as at_send:
                    client.send("refused")
                await trio.sleep(0.3)  # a fatal refusal is not retried
                stats = client.stats()
    for refusal in (at_flush.value, at_send.value, at_exit.value):
        assert refusal.status == 403
        assert refusal.code == "unknown_analytics_id"
    assert (stats.connect_failures, stats.reconnects, stats.frames_sent) == (0, 0, 0)
    assert stored(tmp_path / "b") == []


async def test_create_analytics_id_past_the_burst_is_a_429_client_error(tmp_path):
    async with running(tmp_path, create_burst=1, create_rate_per_min=1) as base:
        await create_analytics_id(base)
        with pytest.raises(ClientError) as refused:
            await create_analytics_id(base)
    assert (refused.value.status, refused.value.code) == (429, "rate_limited")


async def test_a_zero_create_rate_is_refused_at_start_or_answered_429(tmp_path):
    try:
        Config(create_rate_per_min=0)
    except ConfigError:
        return  # refused at start: fine too
    async with running(tmp_path, create_burst=1, create_rate_per_min=0) as base:
        await create_analytics_id(base)
        with pytest.raises(ClientError) as refused:
            await create_analytics_id(base)
    assert refused.value.status == 429


@pytest.mark.parametrize("shard", [-1, 10**9])
async def test_an_out_of_range_shard_is_refused_at_start_or_its_ids_work(tmp_path, shard):
    try:
        Config(analytics_shard=shard)
    except ConfigError:
        return  # refused at start: fine too
    async with running(tmp_path, analytics_shard=shard) as base:
        aid = await create_analytics_id(base)
        async with open_client(base, aid, **FAST) as client:
            client.send("e")
            await client.flush(timeout=10)
