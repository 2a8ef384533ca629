"""`kill -9` while the archive writes: afterwards every archived day is whole, none is
doubled, and once the server has run again every event of the closed days is in the
archive exactly once. Real server processes (bench/crash_loop.py's `Server`): one stores
three closed days of events and stops; the next archives them at start and is killed at
a few moments after it came up; a third finishes the archive."""

from __future__ import annotations

import http.client
import json
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import crash_loop  # noqa: E402

DAYS, PER_DAY = 3, 40_000


def post(server, path: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(crash_loop.HOST, server.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token is None:
        headers["x-write-key"] = crash_loop.WRITE_KEY
    else:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", path, body=json.dumps(body), headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"{}")


def archived_days(server, token: str) -> int:
    status, reply = post(server, "/admin/query", {"sql": "SELECT count(*) FROM archived_days"},
                         token)
    assert status == 200, reply
    return reply["rows"][0][0]


@pytest.mark.parametrize("delay_s", [0.0, 0.03, 0.05, 0.07, 0.09, 0.3])
def test_a_kill_during_the_archive_leaves_whole_days_once(tmp_path, delay_s):
    data, archive = tmp_path / "data", tmp_path / "archive"
    config = tmp_path / "archive.toml"
    config.write_text(f'archive_dir = "{archive}"\narchive_interval_s = 0.5\n'
                      "archive_grace_s = 0\narchive_min_bytes = 0\n")  # (days alone)
    extra = ("--config", str(config))
    sent = set()
    first = crash_loop.Server(data, tmp_path / "first.log", port=0)  # (no archive)
    try:
        first.wait_healthy()
        for day in range(DAYS):
            for start in range(0, PER_DAY, 1000):
                batch = [{"type": "track", "event": "E", "anonymousId": f"a{i % 50}",
                          "messageId": f"d{day}-{i}",
                          "timestamp": f"2024-05-0{day + 1}T12:00:00Z"}
                         for i in range(start, start + 1000)]
                status, _ = post(first, "/v1/batch", {"batch": batch})
                assert status == 200
                sent.update(e["messageId"] for e in batch)
    finally:
        assert first.terminate() == 0
    killed = crash_loop.Server(data, tmp_path / "killed.log", port=0, extra=extra)
    try:
        killed.wait_healthy()  # (the archive's first pass starts with the server)
        time.sleep(delay_s)  # (a real process: the kill lands somewhere in it)
    finally:
        killed.kill()
    again = crash_loop.Server(data, tmp_path / "second.log", port=0, extra=extra)
    try:
        again.wait_healthy()
        token = (data / "admin.token").read_text().strip()
        deadline = time.monotonic() + 60
        while archived_days(again, token) < DAYS:
            assert time.monotonic() < deadline, (tmp_path / "second.log").read_text()
            time.sleep(0.2)  # (bounded polling of a real process)
    finally:
        assert again.terminate() == 0
    ids = ds.dataset(archive, format="parquet", partitioning="hive").to_table(
        columns=["message_id", "type"])
    stored = [m for m, t in zip(ids.column("message_id").to_pylist(),
                                ids.column("type").to_pylist(), strict=True) if t == "track"]
    assert len(stored) == len(set(stored)) == DAYS * PER_DAY  # none doubled
    assert set(stored) == sent  # none lost
    assert sorted(p.name for p in archive.iterdir()) == [
        f"dt=2024-05-0{d + 1}" for d in range(DAYS)]  # no partial directory left
    for day in range(DAYS):
        manifest = json.loads((archive / f"dt=2024-05-0{day + 1}" / "_manifest.json")
                              .read_text())
        assert manifest["rows"] >= PER_DAY
