"""`kill -9` in the middle of a forget: afterwards the person's events are all there or
all gone, and nobody else's are touched. A real server process (bench/crash_loop.py's
`Server`), killed at a few moments after `POST /admin/forget` was sent."""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import crash_loop  # noqa: E402

VICTIM, OTHERS = 40000, 2000  # events of the person forgotten, and of everyone else


def call(server, path: str, body: dict, token: str | None = None,
         timeout: float = 30) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(crash_loop.HOST, server.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    else:
        headers["x-write-key"] = crash_loop.WRITE_KEY
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def counts(server, token: str) -> dict[str, int]:
    status, reply = call(server, "/admin/query", {
        "sql": "SELECT coalesce(user_id, '-') AS u, count(*) FROM events "
               "WHERE type = 'track' GROUP BY ALL"}, token)
    assert status == 200, reply
    return dict(reply["rows"])


@pytest.mark.parametrize("delay_s", [0.0, 0.005, 0.02, 0.04, 0.08])
def test_a_forget_killed_midway_is_all_or_nothing(tmp_path, delay_s):
    data = tmp_path / "data"
    server = crash_loop.Server(data, tmp_path / "first.log", port=0)
    try:
        server.wait_healthy()
        token = (data / "admin.token").read_text().strip()
        for user, n in (("victim", VICTIM), ("other", OTHERS)):
            for start in range(0, n, 500):
                status, _ = call(server, "/v1/batch", {"batch": [
                    {"type": "track", "event": "E", "userId": user,
                     "messageId": f"{user}-{i}"} for i in range(start, start + 500)]})
                assert status == 200
        deadline = time.monotonic() + 30
        while counts(server, token) != {"victim": VICTIM, "other": OTHERS}:
            assert time.monotonic() < deadline, "events were not loaded"
            time.sleep(0.1)  # (a real process: bounded polling)
        answered: list = []
        forget = threading.Thread(target=lambda: answered.append(_forget(server, token)),
                                  daemon=True)
        forget.start()
        time.sleep(delay_s)
        server.kill()
        forget.join(timeout=30)
    finally:
        server.kill()
    again = crash_loop.Server(data, tmp_path / "second.log", port=0)
    try:
        again.wait_healthy()
        after = counts(again, token)
    finally:
        assert again.terminate() == 0
    assert after.get("other") == OTHERS, after
    assert after.get("victim") in (None, VICTIM), after  # all or nothing
    if answered and answered[0] is not None and answered[0][0] == 200:
        assert "victim" not in after  # an answered forget is durable


def _forget(server, token: str):
    try:
        return call(server, "/admin/forget", {"kind": "user", "id": "victim"}, token)
    except OSError:
        return None  # killed before it answered
