"""A full disk end to end: 503s that say why, /readyz's reason, and start-up on a full
disk (listening, 503 until start-up succeeds, then serving on the same port).

Faults are injected at the system calls (os.writev, os.fdatasync raise ENOSPC) and at
start-up (`prepare` fails with DuckDB's "No space left on device" first)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from types import SimpleNamespace

import duckdb
import msgspec
import pytest
import trio
from test_e2e_collector import AUTH, make_config, running, stored

import triolytics.server.app as app
from triolytics.core.sessions import Sessions
from triolytics.server.api import Api
from triolytics.server.startup import StartupError, no_space, startup_error
from triolytics.storage.store import Store

REAL_WRITEV = os.writev
EVENT = {"type": "track", "event": "E", "anonymousId": "a"}
ENOSPC = "[Errno 28] No space left on device"


def full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def admin(data_dir: Path) -> dict[str, str]:
    token = (data_dir / "admin.token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


async def test_a_full_journal_answers_503_and_readyz_says_why(tmp_path, monkeypatch):
    async with running(tmp_path) as server:
        ok = await server.post("/v1/capture", json={**EVENT, "messageId": "before"},
                               headers=AUTH)
        monkeypatch.setattr(os, "writev", full)
        refused = await server.post("/v1/capture", json={**EVENT, "messageId": "lost"},
                                    headers=AUTH)
        ready = await server.request("GET", "/readyz")
        health = await server.request("GET", "/healthz")
        stats = await server.request("GET", "/admin/stats", headers=admin(tmp_path))
        monkeypatch.undo()
        retried = await server.post("/v1/capture", json={**EVENT, "messageId": "lost"},
                                    headers=AUTH)
        ready_again = await server.request("GET", "/readyz")
    assert ok.status_code == 201 and retried.status_code == 201
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["message"] == (
        f"could not journal the events: journal write failed: {ENOSPC}")
    assert ready.status_code == 503
    assert ready.json() == {"ready": False, "reason": f"journal write failed: {ENOSPC}"}
    assert health.status_code == 200
    assert stats.json()["fault"] == f"journal write failed: {ENOSPC}"
    assert ready_again.status_code == 200 and ready_again.json() == {"ready": True}
    assert sorted(r["message_id"] for r in stored(tmp_path)) == ["before", "lost"]


async def test_readyz_reason_is_json_encoded():
    cause = 'DuckDB load failed: could not write "x\\y"\n'  # quotes, a backslash, a newline
    api = SimpleNamespace(writer=SimpleNamespace(fault=cause, healthy=False, closing=False))
    reply = await Api.readyz(api, None)
    assert reply.status == 503
    assert msgspec.json.decode(reply.body) == {"ready": False, "reason": cause}
    api.writer.closing = True
    reply = await Api.readyz(api, None)
    assert msgspec.json.decode(reply.body) == {"ready": False, "reason": "shutting down"}


def full_at_first(monkeypatch, failures: int) -> list[int]:
    """`prepare` fails as on a full disk `failures` times, then runs as usual."""
    real = app.prepare
    attempts: list[int] = []

    def prepare(config):
        attempts.append(1)
        if len(attempts) <= failures:
            raise duckdb.TransactionException(
                'TransactionContext Error: Failed to commit: Could not write file '
                '"events.duckdb.wal": No space left on device')
        return real(config)
    monkeypatch.setattr(app, "prepare", prepare)
    return attempts


async def test_a_start_on_a_full_disk_answers_503_then_serves_on_the_same_port(
        tmp_path, monkeypatch, caplog):
    attempts = full_at_first(monkeypatch, 3)
    async with running(tmp_path, startup_retry_s=0.05) as server:
        refused = await server.post("/v1/capture", json={**EVENT, "messageId": "early"},
                                    headers=AUTH)
        health = await server.request("GET", "/healthz")
        ready = await server.request("GET", "/readyz")
        while (await server.request("GET", "/readyz")).status_code == 503:
            await trio.sleep(0.02)
        stored_reply = await server.post("/v1/capture", json={**EVENT, "messageId": "late"},
                                         headers=AUTH)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert refused.headers["Connection"] == "close"
    assert "No space left on device" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "unavailable"
    assert health.status_code == 200
    assert ready.status_code == 503 and ready.json()["ready"] is False
    assert ready.json()["reason"].startswith("start-up failed: TransactionContext Error")
    assert stored_reply.status_code == 201
    assert len(attempts) == 4
    assert [r["message_id"] for r in stored(tmp_path)] == ["late"]
    started = [m for m in caplog.messages if m.startswith("start-up failed")]
    assert len(started) == 1  # the first failure; the next two within the log interval
    assert any(m.startswith("start-up attempts succeed again after 3 failures")
               for m in caplog.messages)


async def test_a_second_server_is_refused_while_the_first_waits_for_space(tmp_path,
                                                                         monkeypatch):
    full_at_first(monkeypatch, 10**9)
    async with running(tmp_path, startup_retry_s=0.05) as server:
        assert (await server.request("GET", "/readyz")).status_code == 503
        with pytest.raises(StartupError, match=f"data directory {tmp_path} is locked by "
                           f"another process \\(PID {os.getpid()}\\)"):
            await app.serve(make_config(tmp_path))


async def test_other_start_up_faults_still_stop_the_server(tmp_path, monkeypatch):
    def broken(config):
        raise StartupError("cannot open events.duckdb: something else")
    monkeypatch.setattr(app, "prepare", broken)
    with pytest.raises(BaseException) as raised:
        await app.serve(make_config(tmp_path))
    assert str(startup_error(raised.value)) == "cannot open events.duckdb: something else"


def test_no_space_is_told_apart():
    assert no_space(OSError(errno.ENOSPC, "No space left on device"))
    try:
        try:
            raise duckdb.IOException('IO Error: Could not write file "x": No space left on '
                                     'device')
        except duckdb.IOException as exc:
            raise StartupError("cannot open x") from exc
    except StartupError as wrapped:
        assert no_space(wrapped)
    assert not no_space(StartupError("data directory d is locked by another process"))
    assert not no_space(OSError(errno.EACCES, "Permission denied"))


@pytest.fixture
def made(monkeypatch) -> list[Sessions]:
    """The server's `Sessions`, once it has made them."""
    made: list[Sessions] = []

    class Recorded(Sessions):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(app, "Sessions", Recorded)
    return made


async def test_refused_requests_leave_no_sessions_or_ids_behind(tmp_path, monkeypatch, made):
    async with running(tmp_path) as server:
        monkeypatch.setattr(os, "writev", full)
        for i in range(30):  # each from a new client: each would open a session
            refused = await server.post("/v1/batch", headers=AUTH, json={"batch": [
                {**EVENT, "anonymousId": f"new-{i}", "messageId": f"m{i}-{j}"}
                for j in range(3)]})
            assert refused.status_code == 503
        [sessions] = made
        assert len(sessions) == 0
        monkeypatch.setattr(os, "writev", REAL_WRITEV)
        again = await server.post("/v1/batch", headers=AUTH, json={"batch": [
            {**EVENT, "anonymousId": "new-0", "messageId": "m0-0"}]})
        assert again.status_code == 200 and len(sessions) == 1
    rows = stored(tmp_path, sessions=True)
    assert sorted(r["type"] for r in rows) == ["session_start", "track"]


async def test_create_on_a_full_disk_is_503_not_500(tmp_path, monkeypatch):
    def full_store(self, issued):
        raise duckdb.TransactionException(
            'TransactionContext Error: Failed to commit: Could not write file '
            '"events.duckdb.wal": No space left on device')
    async with running(tmp_path) as server:
        monkeypatch.setattr(Store, "record_analytics_ids", full_store)
        refused = await server.post("/create")
        monkeypatch.undo()
        created = await server.post("/create")
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
    assert "No space left on device" in refused.json()["error"]["message"]
    assert created.status_code == 200


async def test_a_refused_websocket_batch_leaves_no_session_behind(tmp_path, monkeypatch,
                                                                   made):
    from test_e2e_realtime import ack, ws
    from test_e2e_realtime import running as running_rt
    async with running_rt(tmp_path) as server:
        ids = [await server.create() for _ in range(3)]
        [sessions] = made
        monkeypatch.setattr(os, "writev", full)
        for analytics_id in ids:  # each connection would open its session
            async with ws(server, analytics_id) as conn:
                await conn.send_message(json.dumps(
                    {"events": [{"type": "click", "id": "e1"}], "seq": 1}))
                refused = await ack(conn)
                assert refused["type"] != "ack", refused
        assert len(sessions) == 0
