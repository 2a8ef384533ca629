"""kill -9 the real server while clients send; every acknowledged event survives, once.

Runs a few short rounds of `bench/crash_loop.py` (which has the longer version): a
`python -m triolytics serve` subprocess, concurrent client threads sending batches with
unique messageIds (retrying failures with the same ids), SIGKILL mid-stream, restart, and
finally a clean SIGTERM stop, then a look at DuckDB.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time

import duckdb
import pytest
from seed_examples import load_bench_script

crash_loop = load_bench_script("crash_loop")

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")


def test_kill_9_mid_stream_loses_and_doubles_nothing(tmp_path):
    summary = crash_loop.run(rounds=3, data_dir=tmp_path / "data", clients=4, load_s=1.0,
                             seed=1, ws_clients=2)
    report = json.dumps(summary, indent=2)
    assert all(r["acked"] > 0 for r in summary["per_round"]), report
    assert summary["missing"] == 0, report  # every 2xx'd id is stored...
    assert summary["doubled"] == 0, report  # ...exactly once...
    assert summary["unexpected"] == 0, report  # ...and nothing else is
    assert summary["unsent_retries"] == 0, report
    assert summary["final_exit_code"] == 0, report
    assert summary["stored"] >= summary["acked"]["total"] > 0, report
    assert summary["acked"]["http"] > 0 and summary["acked"]["ws"] > 0, report
    assert summary["ok"], report
    assert arrival_faults(tmp_path / "data") == {}, report


def arrival_faults(data_dir) -> dict[str, int]:
    """What breaks the arrival order: `ingest_seq` not exactly 1..n (gaps, repeats,
    nulls), a batch whose events are not consecutive in their order, a session whose
    start is not its first row or whose end is not its last."""
    con = duckdb.connect(str(data_dir / "events.duckdb"), read_only=True)
    try:
        rows, distinct, low, high = con.execute(
            "SELECT count(*), count(DISTINCT ingest_seq), min(ingest_seq), max(ingest_seq) "
            "FROM events").fetchone()
        faults = {"not_1_to_n": int((rows, distinct, low, high) != (rows, rows, 1, rows))}
        faults["batches_not_consecutive"] = con.execute(  # (ids: client-serial-index)
            "SELECT count(*) FROM (SELECT regexp_replace(message_id, '-[0-9]+$', '') AS "
            "batch FROM events WHERE type = 'track' GROUP BY batch HAVING count(DISTINCT "
            "ingest_seq - CAST(regexp_extract(message_id, '[0-9]+$') AS BIGINT)) > 1)"
        ).fetchone()[0]
        faults["sessions_out_of_order"] = con.execute(
            "SELECT count(*) FROM (SELECT session_id, arg_min(type, ingest_seq) AS first, "
            "arg_max(type, ingest_seq) AS last, bool_or(type = 'session_end') AS ended "
            "FROM events GROUP BY session_id) WHERE first != 'session_start' "
            "OR (ended AND last != 'session_end')").fetchone()[0]
    finally:
        con.close()
    return {k: v for k, v in faults.items() if v}


def test_the_checks_flag_loss_doubles_and_strangers(tmp_path):
    """The crash test can fail: its checks see a lost, a doubled and an unknown id."""
    data = tmp_path / "data"
    data.mkdir()
    con = duckdb.connect(str(data / "events.duckdb"))
    con.execute("CREATE TABLE events (message_id VARCHAR, type VARCHAR)")
    con.execute("INSERT INTO events VALUES ('a', 'track'), ('a', 'track'), ('c', 'track'), "
                "('x', 'track'), ('s', 'session_start')")
    con.close()
    ledger = crash_loop.Ledger()
    ledger.sent = {"a", "b", "c"}
    ledger.acked = {"a", "b"}
    counts = crash_loop.stored_counts(data)
    assert counts == {"a": 2, "c": 1, "x": 1}
    assert crash_loop.check(ledger, counts) == ({"a": 2}, ["b"], ["x"])


def test_the_arrival_checks_flag_gaps_split_batches_and_misplaced_session_rows(tmp_path):
    con = duckdb.connect(str(tmp_path / "events.duckdb"))
    con.execute("CREATE TABLE events (message_id VARCHAR, type VARCHAR, session_id VARCHAR, "
                "ingest_seq BIGINT)")
    con.execute("INSERT INTO events VALUES ('c0-1-0', 'track', 's', 1), "
                "('s0', 'session_start', 's', 2), ('c0-1-1', 'track', 's', 3), "
                "('e0', 'session_end', 's', 5), ('c0-2-0', 'track', 's', 6)")
    con.close()
    assert arrival_faults(tmp_path) == {"not_1_to_n": 1, "batches_not_consecutive": 1,
                                        "sessions_out_of_order": 1}


def test_sigterm_exits_0_and_keeps_every_acknowledged_event(tmp_path):
    """The subprocess's clean stop: what was acked before SIGTERM is in DuckDB."""
    data = tmp_path / "data"
    server = crash_loop.Server(data, tmp_path / "server.log")
    server.wait_healthy()
    ledger = crash_loop.Ledger()
    stop = threading.Event()
    threads, errors = crash_loop._run_clients(server.port, ledger, 2, stop)
    deadline_polls = 500
    while ledger.acked_count() < 100 and deadline_polls and not errors:
        deadline_polls -= 1
        stop.wait(crash_loop.POLL_S)  # bounded polling while a real subprocess works
    code = server.terminate()  # clients are still sending
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert code == 0, (tmp_path / "server.log").read_text()
    counts = crash_loop.stored_counts(data)
    assert ledger.acked_count() >= 100
    assert ledger.acked <= counts.keys()
    assert set(counts.values()) == {1}
    assert counts.keys() <= ledger.sent


def test_crash_loop_script_prints_json(tmp_path):
    """`bench/crash_loop.py N` is a script: one round, JSON on stdout, exit 0."""
    done = subprocess.run(
        [sys.executable, crash_loop.__file__, "1", "--clients", "2", "--load-s", "0.5",
         "--keep", str(tmp_path)], capture_output=True, timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stderr.decode() + done.stdout.decode()
    summary = json.loads(done.stdout)
    assert summary["rounds"] == 1 and summary["ok"] is True


def test_acknowledged_events_reach_duckdb_within_about_a_second(tmp_path):
    """A trickle of events (far below load_batch_rows) is loaded on the load interval, so
    it is queryable about a second after its ack, not only at shutdown."""
    data = tmp_path / "data"
    server = crash_loop.Server(data, tmp_path / "server.log")
    try:
        server.wait_healthy()
        conn = http.client.HTTPConnection(crash_loop.HOST, server.port, timeout=10)
        conn.request("POST", "/v1/capture", json.dumps(
            {"type": "track", "event": "Trickle", "userId": "u"}),
            {"Content-Type": "application/json", "x-write-key": crash_loop.WRITE_KEY})
        response = conn.getresponse()
        assert (response.status, response.read()[:6]) == (201, b'{"ok":')
        acked_at = time.monotonic()
        token = (data / "admin.token").read_text().strip()
        loaded = 0
        while time.monotonic() - acked_at < 3.0:  # bounded polling of a real subprocess
            conn.request("GET", "/admin/stats", headers={"Authorization": f"Bearer {token}"})
            loaded = json.loads(conn.getresponse().read())["loaded_rows"]
            if loaded:
                break
            time.sleep(crash_loop.POLL_S)
        waited = time.monotonic() - acked_at
        conn.close()
    finally:
        assert server.terminate() == 0
    assert loaded == 2, f"not loaded into DuckDB {waited:.1f}s after its ack (+ session_start)"
    assert waited < 1.5


def test_kill_9_with_torn_journal_tails_and_websocket_clients(tmp_path):
    """Garbage appended to the last journal segment after each kill -9 (a torn write) is
    dropped at the restart; HTTP and WebSocket acks all survive, once."""
    summary = crash_loop.run(rounds=3, data_dir=tmp_path / "data", clients=2, load_s=1.0,
                             seed=2, ws_clients=2, damage_every=1, damage=("journal-tail",))
    report = json.dumps(summary, indent=2)
    assert summary["damage"]["injected"] == {"journal-tail": 3}, report
    assert summary["torn_tails"] >= 3, report  # each start after the damage dropped it
    assert summary["acked"]["http"] > 0 and summary["acked"]["ws"] > 0, report
    assert (summary["missing"], summary["doubled"], summary["unexpected"]) == (0, 0, 0), report
    assert summary["lost_to_injected_damage"] == 0, report
    assert summary["ok"], report


def test_kill_9_with_a_corrupt_wal_loses_nothing(tmp_path):
    """The server moves a WAL DuckDB cannot replay to quarantine/, says so in an ERROR
    line, and the journal replays what the WAL held. (Three rounds: a kill just after a
    checkpoint leaves an empty WAL, and the damage waits for the next round.)"""
    summary = crash_loop.run(rounds=3, data_dir=tmp_path / "data", clients=2, load_s=1.5,
                             seed=3, ws_clients=1, damage_every=1, damage=("wal-corrupt",))
    report = json.dumps(summary, indent=2)
    assert summary["damage"]["injected"].get("wal-corrupt"), report
    assert summary["damage"]["unreported_damage"] == [], report
    assert (summary["missing"], summary["doubled"], summary["unexpected"]) == (0, 0, 0), report
    assert summary["ok"], report


def test_kill_9_with_a_destroyed_unloaded_record_loses_exactly_its_events(tmp_path):
    """A record DuckDB does not have yet, overwritten: its acknowledged events are gone
    (and only those), the server copies the damaged range to journal/quarantine/ and logs
    an ERROR, and replays the records after it."""
    summary = crash_loop.run(rounds=3, data_dir=tmp_path / "data", clients=2, load_s=1.0,
                             seed=4, ws_clients=1, damage_every=1,
                             damage=("journal-unloaded",))
    report = json.dumps(summary, indent=2)
    assert summary["damage"]["injected"].get("journal-unloaded"), report
    assert summary["damage"]["unreported_damage"] == [], report
    assert summary["lost_to_injected_damage"] > 0, report
    assert summary["lost_but_stored"] == 0, report
    assert (summary["missing"], summary["doubled"], summary["unexpected"]) == (0, 0, 0), report
    assert summary["ok"], report


def test_kill_9_with_a_damaged_loaded_record_loses_nothing(tmp_path):
    """A record DuckDB already has, overwritten: nothing after it is lost, and damage in
    the last segment (which the server reads through at start) is reported."""
    summary = crash_loop.run(rounds=3, data_dir=tmp_path / "data", clients=2, load_s=1.0,
                             seed=5, ws_clients=1, damage_every=1, damage=("journal-loaded",))
    report = json.dumps(summary, indent=2)
    injected = [e for e in summary["damage"]["log"] if "skipped" not in e]
    assert injected, report
    assert all(e["quarantine_covers_damage"] and e["error_logged"]
               for e in injected if e["last_segment"]), report
    assert (summary["missing"], summary["doubled"], summary["unexpected"]) == (0, 0, 0), report
    assert summary["lost_to_injected_damage"] == 0, report
    assert summary["ok"], report


def test_the_damage_reader_finds_each_records_ids_and_the_loss_is_the_acked_part(tmp_path):
    """`journal_records`/`record_ids` read what the server's Journal writes, and
    `journal-unloaded` expects lost only the acknowledged ids of the record it destroys."""
    from triolytics.core.journal import Journal
    from triolytics.core.rows import Row, encode_part

    def rows(ids, type_="track"):
        return [Row(i, "p", "http", type_, "E", None, "a", None, None, None, "s", 1, None,
                    None, 1, None, None, None, None) for i in ids]

    journal = Journal(tmp_path / "data" / "journal", 1 << 20)
    journal.open()
    journal.append([encode_part(rows(["a1", "a2"])), encode_part(rows(["s"], "session_start")
                                                                 + rows(["b1"]))])
    journal.sync()
    journal.close()
    records = crash_loop.journal_records(tmp_path / "data" / "journal")
    assert [crash_loop.record_ids(r.payload) for r in records] == [{"a1", "a2"}, {"b1"}]
    assert records[0].end <= records[1].payload_start
    ledger = crash_loop.Ledger()
    ledger.sent = {"a1", "a2", "b1"}
    ledger.acked = {"a1", "b1"}
    con = duckdb.connect(str(tmp_path / "data" / "events.duckdb"))
    con.execute("CREATE TABLE journal_mark (id INTEGER, segment BIGINT, byte_offset BIGINT)")
    con.close()  # no mark yet: every record is unloaded
    entry = crash_loop.inject("journal-unloaded", tmp_path / "data",
                              __import__("random").Random(0), ledger)
    assert entry["lost"] in (["a1"], ["b1"]), entry
    assert crash_loop.journal_records(tmp_path / "data" / "journal") != records
