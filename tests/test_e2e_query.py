"""`POST /admin/query` and `triolytics query` end to end: the server on loopback (port 0)
answers each cause with its own code, and the CLI, a subprocess, prints one line on
stderr and nothing on stdout for each, whether it asks the server or reads the file."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import trio
from test_e2e_collector import AUTH, JSON_CT, running, stored
from test_query import SLOW

TIMEOUT_S = 0.3  # query_timeout_s of these tests; SLOW runs for seconds
COPY_TO = Path(__file__).parent / "copy-refused.csv"  # must never be written
CAUSES = [  # sql, code, HTTP status
    ("SELEC 1", "query_syntax", 400),
    ("WITH x AS (SELECT 1) DELETE FROM events", "query_not_read_only", 400),
    (f"COPY events TO '{COPY_TO}'", "query_not_read_only", 400),
    ("SELECT 1; SELECT 2", "query_not_read_only", 400),
    ("FROM checkpoint()", "query_not_read_only", 400),
    ("SELECT no_such_column FROM events", "query_failed", 400),
    (SLOW, "query_timeout", 503),
]
COUNT = "SELECT count(*) AS n FROM events WHERE type = 'track'"


def admin(data_dir: Path) -> dict[str, str]:
    token = (data_dir / "admin.token").read_text().strip()
    return {**JSON_CT, "Authorization": f"Bearer {token}"}


async def store_events(server, *names: str) -> None:
    reply = await server.post("/v1/batch", headers=AUTH, json={"batch": [
        {"type": "track", "event": name, "userId": "u1"} for name in names]})
    assert reply.status_code == 200


async def wait_count(server, n: int) -> None:
    """Until a query sees `n` track events (loads run every load_interval_ms)."""
    with trio.fail_after(10):
        while True:
            reply = await server.post("/admin/query", json={"sql": COUNT},
                                      headers=admin(server.data_dir))
            assert reply.status_code == 200, reply.text
            if reply.json()["rows"] == [[n]]:
                return
            await trio.sleep(0.05)


async def test_admin_query_answers_each_cause_with_its_code(tmp_path):
    async with running(tmp_path, query_timeout_s=TIMEOUT_S, load_interval_ms=50) as server:
        await store_events(server, "A", "B")
        await wait_count(server, 2)
        for sql, code, status in CAUSES:
            started = time.monotonic()
            reply = await server.post("/admin/query", json={"sql": sql},
                                      headers=admin(tmp_path))
            took = time.monotonic() - started
            assert reply.status_code == status, (sql, reply.text)
            error = reply.json()["error"]
            assert (error["code"], error["field"]) == (code, "$.sql")
            assert error["message"] and "\n" not in error["message"]
            assert took < 3.0  # SLOW alone runs for seconds
        # the reader is free again and loads go on
        await store_events(server, "C")
        await wait_count(server, 3)
    assert sorted(r["event"] for r in stored(tmp_path)) == ["A", "B", "C"]
    assert not COPY_TO.exists()


def cli(data_dir: Path, sql: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRIOLYTICS_QUERY_TIMEOUT_S": str(TIMEOUT_S)}
    return subprocess.run([sys.executable, "-m", "triolytics", "query", sql,
                           "--data", str(data_dir)],
                          capture_output=True, text=True, timeout=60, env=env)


async def cli_answers(data_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    """`triolytics query` of COUNT and of every cause, run side by side."""
    done: dict[str, subprocess.CompletedProcess] = {}

    async def one(sql: str) -> None:
        done[sql] = await trio.to_thread.run_sync(partial(cli, data_dir, sql))

    async with trio.open_nursery() as nursery:
        for sql in [COUNT, *(c[0] for c in CAUSES)]:
            nursery.start_soon(one, sql)
    return done


def check_cli(done: dict[str, subprocess.CompletedProcess]) -> None:
    assert (done[COUNT].returncode, done[COUNT].stdout) == (0, "n\n2\n"), done[COUNT]
    for sql, code, _ in CAUSES:
        got = done[sql]
        assert got.returncode == 1, (sql, got)
        assert got.stdout == "", (sql, got)
        assert got.stderr.startswith("triolytics: "), (sql, got)
        assert got.stderr.endswith(f" [{code}]\n"), (sql, got)
        assert got.stderr.count("\n") == 1, (sql, got)


async def test_query_cli_while_the_server_runs_and_after_it_stopped(tmp_path):
    async with running(tmp_path, query_timeout_s=TIMEOUT_S, load_interval_ms=50) as server:
        await store_events(server, "A", "B")
        await wait_count(server, 2)
        check_cli(await cli_answers(tmp_path))  # through POST /admin/query
    assert not (tmp_path / "server.json").exists()
    check_cli(await cli_answers(tmp_path))  # the CLI opens the file itself
    assert len(stored(tmp_path)) == 2
    assert not COPY_TO.exists()
