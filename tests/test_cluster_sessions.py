"""Sessions and dedup keep their meaning across nodes, through nginx (bench/cluster.py:
PostgreSQL, three ducklake nodes, deploy/nginx-cluster.conf):

- one visitor's HTTP events, spread by round robin over every node, make one session,
  which ends once;
- a Segment batch sent to one node and retried through another is stored once;
- a WebSocket whose node is killed reconnects through nginx to another node and resumes
  its session (the ack names the same session_id), and the session ends once.

Skipped without PostgreSQL or nginx (`make test-tools` installs both).
"""

from __future__ import annotations

import json
import signal

import pytest
from seed_examples import load_bench_script
from websockets.sync.client import connect

cluster_mod = load_bench_script("cluster")
pytestmark = pytest.mark.skipif(cluster_mod.missing_tools() is not None,
                                reason=str(cluster_mod.missing_tools()))

NODES = 3
TIMEOUT_S = 4  # session_timeout_s: sessions end within the test
ENV = {"TRIOLYTICS_LOAD_INTERVAL_MS": "250", "TRIOLYTICS_SESSION_TIMEOUT_S": str(TIMEOUT_S),
       "TRIOLYTICS_SHARED_REAP_INTERVAL_S": "0.5"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = cluster_mod.Cluster(NODES, tmp_path_factory.mktemp("cluster"), env=ENV)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def sessions_of(c, anonymous_id: str, want_end: bool = True) -> list:
    """(type, rows, distinct session ids, distinct writers) of one anonymous id, once its
    session has ended (or the time is up)."""
    sql = ("SELECT type, count(*), count(DISTINCT session_id), count(DISTINCT writer) "
           f"FROM events WHERE anonymous_id = '{anonymous_id}' GROUP BY 1 ORDER BY 1")
    return c.wait_query(sql, lambda r: not want_end or any(x[0] == "session_end" for x in r),
                        TIMEOUT_S + 20)


def test_one_visitors_events_over_every_node_make_one_session(cluster):
    for i in range(2 * NODES):  # (one request per connection: round robin takes turns)
        status, body = cluster.send_events("/v1/capture", {
            "type": "track", "event": f"E{i}", "anonymousId": "visitor-rr",
            "messageId": f"rr-{i}"})
        assert status == 201, body
    rows = sessions_of(cluster, "visitor-rr")
    assert rows == [["session_end", 1, 1, 1], ["session_start", 1, 1, 1],
                    ["track", 2 * NODES, 1, NODES]], rows
    end = cluster.query("SELECT properties FROM events WHERE anonymous_id = 'visitor-rr' "
                        "AND type = 'session_end'")
    assert json.loads(end[0][0])["event_count"] == 2 * NODES


def test_a_batch_retried_through_another_node_is_stored_once(cluster):
    batch = {"batch": [{"type": "track", "event": "Retried", "anonymousId": "visitor-retry",
                        "messageId": f"retry-{i}"} for i in range(5)]}
    for node in (1, 2):
        status, body = cluster.send_events("/v1/batch", batch, node=node)
        assert status == 200, body
    status, body = cluster.send_events("/v1/batch", batch)  # (and through nginx)
    assert status == 200, body
    rows = sessions_of(cluster, "visitor-retry")
    assert ["track", 5, 1, 1] in rows, rows
    end = cluster.query("SELECT properties FROM events WHERE anonymous_id = 'visitor-retry' "
                        "AND type = 'session_end'")
    assert json.loads(end[0][0])["event_count"] == 5


def test_a_websocket_whose_node_dies_resumes_its_session_on_another(cluster):
    status, _, body = cluster.request("POST", "/create")
    assert status == 200, body
    aid = json.loads(body)["analytics_id"]

    def send(seq: int) -> dict:
        with connect(cluster.ws_url(aid), open_timeout=10) as ws:
            ws.send(json.dumps({"seq": seq, "events": [
                {"type": "tap", "id": f"{aid}-{seq}-{i}"} for i in range(2)]}))
            return json.loads(ws.recv(timeout=10))
    first = send(1)
    assert first["type"] == "ack", first
    # the node nginx chose for this id: the one that wrote its rows
    writer = cluster.wait_query(
        f"SELECT DISTINCT writer FROM events WHERE anonymous_id = '{aid}' AND type = 'tap'",
        lambda r: len(r) == 1, 15)[0][0]
    number = int(writer[1:])
    cluster.kill(number, signal.SIGKILL)
    try:
        second = send(2)  # nginx: the hash's next node
        assert second["type"] == "ack" and second["session_id"] == first["session_id"], \
            (first, second)
        rows = sessions_of(cluster, aid)
        assert rows == [["session_end", 1, 1, 1], ["session_start", 1, 1, 1],
                        ["tap", 4, 1, 2]], rows
    finally:
        cluster.restart(number)
