"""A full disk end to end: 503s that say why, /readyz's reason, and start-up on a full
disk (listening, 503 until start-up succeeds, then serving on the same port).

Faults are injected at the system calls (os.writev, os.fdatasync raise ENOSPC) and at
start-up (`prepare` fails with DuckDB's "No space left on device" first)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import msgspec
from test_e2e_collector import AUTH, running, stored

from triolytics.server.api import Api

EVENT = {"type": "track", "event": "E", "anonymousId": "a"}
ENOSPC = "[Errno 28] No space left on device"


def no_space(*args):
    raise OSError(errno.ENOSPC, "No space left on device")


def admin(data_dir: Path) -> dict[str, str]:
    token = (data_dir / "admin.token").read_text().strip()
    return {"Authorization": f"Bearer {token}"}


async def test_a_full_journal_answers_503_and_readyz_says_why(tmp_path, monkeypatch):
    async with running(tmp_path) as server:
        ok = await server.post("/v1/capture", json={**EVENT, "messageId": "before"},
                               headers=AUTH)
        monkeypatch.setattr(os, "writev", no_space)
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
