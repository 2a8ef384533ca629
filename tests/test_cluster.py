"""Many nodes behind nginx, for real: bench/cluster.py starts PostgreSQL, three
`triolytics serve` nodes writing one DuckLake and nginx from deploy/nginx-cluster.conf,
all on 127.0.0.1, once for the module (about 6-15 s to start here).

- The Collector document's flow through nginx, spread over the nodes by round robin.
- The Real-time document's flow through nginx: by the shipped consistent hash of the
  analytics_id (any node accepts any shard's id: the secret is the lake's), and by the
  file's shard map (the issuing node, every time).
- kill -9 of a node under load, then its restart: every acked event stored exactly once;
  a restart while the others are under load.
- restart() when the old port is taken: nginx is reloaded with the new one.
- The shipped conf and its shard alternative pass `nginx -t`; the rendering of its node
  lines.

To reach one node directly: `cluster.send_events(path, body, node=i)`,
`cluster.request(method, path, ..., node=i)`, `cluster.ws_url(analytics_id, node=i)`.
Skipped without PostgreSQL or nginx (`make test-tools` installs both); this test installs
nothing. Rows are read back with `/admin/query` of a live node: loads run every
load_interval_ms (250 here), so reads poll, bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest
from seed_examples import CURL_BODY, DOC_PAYLOAD, load_bench_script
from websockets.sync.client import connect

cluster_mod = load_bench_script("cluster")
pytestmark = pytest.mark.skipif(cluster_mod.missing_tools() is not None,
                                reason=str(cluster_mod.missing_tools()))

NODES = 3
STORED_WITHIN_S = 15.0  # after the last ack, every acked event is in the lake by then
ENV = {"TRIOLYTICS_LOAD_INTERVAL_MS": "250", "TRIOLYTICS_MAX_QUERY_ROWS": "1000000"}
ID = re.compile(r"([1-9])\.[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = cluster_mod.Cluster(NODES, tmp_path_factory.mktemp("cluster"), env=ENV)
    c.start()
    try:
        yield c
    finally:
        running = ["nginx"] + [n.node_id for n in c.nodes if n.alive]
        codes = c.stop()
    assert {name: codes[name] for name in running} == dict.fromkeys(running, 0), codes


def listed(ids) -> str:
    return ", ".join(f"'{i}'" for i in ids)


def stored_once(c, ids: list[str]) -> dict[str, list]:
    """message_id -> [count, writer], once every one of `ids` is in the lake (or the
    time is up)."""
    sql = (f"SELECT message_id, count(*), min(writer) FROM events "
           f"WHERE message_id IN ({listed(ids)}) GROUP BY 1")
    rows = c.wait_query(sql, lambda r: len(r) == len(ids), STORED_WITHIN_S)
    return {m: [n, w] for m, n, w in rows}


def test_collector_flow_through_nginx_spreads_over_the_nodes(cluster):
    """The Collector document's curl example (201) and Segment's /v1/batch (200), one
    request per connection so that round robin takes each to the next node; every event
    is in the lake once, and every node wrote some."""
    ids = []
    for _ in range(2 * NODES):
        status, body = cluster.send_events("/v1/capture", CURL_BODY)
        assert status == 201, body
        ids.append(json.loads(body)["id"])
    for b in range(NODES):
        batch = {"batch": [{"type": "track", "event": "Batched", "userId": "u-a",
                            "messageId": f"a-batch-{b}-{i}"} for i in range(3)]}
        status, body = cluster.send_events("/v1/batch", batch)
        assert (status, json.loads(body)) == (200, {"success": True, "stored": 3})
        ids += [e["messageId"] for e in batch["batch"]]

    got = stored_once(cluster, ids)
    assert sorted(got) == sorted(ids)
    assert all(n == 1 for n, _ in got.values()), got
    assert {w for _, w in got.values()} == {f"n{i}" for i in range(1, NODES + 1)}
    access = cluster.proxy.access_log.read_text()
    assert access.count("POST /v1/capture") >= 2 * NODES


def realtime_flow(c) -> tuple[str, set[str], set[str]]:
    """The Real-time document's flow through nginx: POST /create (no headers, no body),
    then the WebSocket with the id, the document's payload verbatim (nothing comes
    back), and a batch with a seq (acked); then the same again on a second connection,
    a reconnect. (analytics_id, the writers of its rows, the nodes nginx chose.)"""
    status, _, body = c.request("POST", "/create")
    assert status == 200, body
    created = json.loads(body)
    aid = created["analytics_id"]
    assert ID.fullmatch(aid) and 1 <= int(aid.split(".")[0]) <= NODES, aid
    assert created["metadata"] == {"region": "global"}

    for seq in (1, 2):
        with connect(c.ws_url(aid), open_timeout=10) as ws:
            if seq == 1:
                ws.send(DOC_PAYLOAD)
            ws.send(json.dumps({"events": [{"type": "cluster_check", "id": f"b-{aid}-{seq}"}],
                                "seq": seq}))
            ack = json.loads(ws.recv(timeout=10))
        assert ack["type"] == "ack" and ack["seq"] == seq and ack["stored"] == 1, ack

    sql = ("SELECT type, channel, writer FROM events "
           f"WHERE anonymous_id = '{aid}' AND type <> 'session_start' ORDER BY ingest_seq")
    rows = c.wait_query(sql, lambda r: len(r) == 4, STORED_WITHIN_S)
    assert [r[0] for r in rows] == ["screen_view", "button_click", "cluster_check",
                                    "cluster_check"], rows
    assert {r[1] for r in rows} == {"ws"}
    lines = [x for x in c.proxy.access_log.read_text().splitlines()
             if f"/analytics?analytics_id={aid}" in x]
    assert len(lines) == 2, lines
    return aid, {r[2] for r in rows}, {x.split("upstream=")[1].split()[0] for x in lines}


def test_realtime_flow_through_nginx_by_hash_sticks_to_one_node(cluster):
    """The shipped routing: the WebSocket by a consistent hash of the analytics_id, so
    the reconnect lands on the node the first connection did."""
    _, writers, upstreams = realtime_flow(cluster)
    assert len(writers) == 1 and len(upstreams) == 1, (writers, upstreams)


def test_realtime_flow_through_nginx_by_shard_reaches_the_issuer(cluster):
    """The file's alternative: the WebSocket to the node whose analytics_shard the id
    carries, the node that issued it, every time."""
    cluster.set_routing("shard")
    try:
        aid, writers, upstreams = realtime_flow(cluster)
    finally:
        cluster.set_routing("hash")
    issuer = cluster.node(int(aid.split(".")[0]))
    assert writers == {issuer.node_id}
    assert upstreams == {f"127.0.0.1:{issuer.port}"}


class Load:
    """Threads posting /v1/batch through nginx, one request per connection, each batch
    with new messageIds (never retried); the ids answered 200 are acknowledged."""

    def __init__(self, c, threads: int = 4, events: int = 5) -> None:
        self.c, self.events = c, events
        self.acked: set[str] = set()
        self.answers: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True)
                        for t in range(threads)]

    def _run(self, t: int) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            ids = [f"c-{t}-{n}-{i}" for i in range(self.events)]
            body = {"batch": [{"type": "track", "event": "Under load", "userId": f"u{t}",
                               "messageId": m} for m in ids]}
            status, _ = self.c.send_events("/v1/batch", body, timeout=10)
            with self.lock:
                self.answers[status] += 1
                if status == 200:
                    self.acked.update(ids)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def acked_count(self) -> int:
        with self.lock:
            return len(self.acked)


def replayed_at_last_start(node) -> int:
    """The rows the node's latest start replayed from its journal (its log says)."""
    last = node.log_path.read_text(errors="replace").rsplit("--- start ", 1)[-1]
    found = re.search(r"replayed (\d+) journaled rows", last)
    return int(found[1]) if found else 0


def test_kill_9_of_a_node_under_load_loses_and_doubles_nothing_acked(cluster):
    """Distinct events through nginx from 4 threads; node 2 gets SIGKILL mid-load, the
    load goes on without it for a while, then node 2 starts again (its journal replays
    what the lake lacks). Every acknowledged messageId is in the lake exactly once."""
    killed = 2
    with Load(cluster) as load:
        time.sleep(1.5)
        before = load.acked_count()
        assert cluster.kill(killed) == -signal.SIGKILL
        time.sleep(1.5)
    assert before > 0 and load.acked_count() > before, (before, load.answers)
    cluster.restart(killed)
    acked = load.acked

    sql = "SELECT message_id FROM events WHERE message_id LIKE 'c-%'"
    rows = cluster.wait_query(sql, lambda r: acked <= {m for (m,) in r}, STORED_WITHIN_S)
    missing = acked - {m for (m,) in rows}
    assert not missing, (len(missing), sorted(missing)[:10], dict(load.answers))
    dupes = cluster.query("SELECT message_id, count(*) FROM events "
                          "WHERE message_id LIKE 'c-%' GROUP BY 1 HAVING count(*) > 1")
    assert dupes == []
    # The others (a 502 for a request the killed node had, say) were not acked: they
    # may or may not be stored. None is refused as a bad request.
    assert not [s for s in load.answers if 400 <= s < 500], load.answers
    replayed = replayed_at_last_start(cluster.node(killed))
    assert replayed > 0  # it was killed with acked rows the lake did not have yet
    writers = dict(cluster.query("SELECT writer, count(*) FROM events "
                                 "WHERE message_id LIKE 'c-%' GROUP BY 1"))
    print(f"acked {len(acked)}, stored {len(rows)}, answers {dict(load.answers)}, "
          f"by writer {writers}, replayed by n{killed}: {replayed}")


def test_a_node_restarts_while_the_others_are_under_load(cluster):
    """kill -9 of node 1, then its start while the load goes on through the others: it
    starts, takes requests again, and every acked event is stored once."""
    try:
        with Load(cluster) as load:
            time.sleep(1.0)
            cluster.kill(1)
            time.sleep(0.5)
            cluster.restart(1)
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:  # (it may still be loading its journal)
                status, _ = cluster.send_events("/v1/capture", {
                    "type": "track", "event": "Back", "userId": "u-e",
                    "messageId": f"e-{time.monotonic()}"}, node=1)
                if status == 201:
                    break
                time.sleep(0.2)
            assert status == 201
    finally:
        if not cluster.node(1).alive:  # (the load is over: the tests after need it)
            cluster.restart(1)
    rows = cluster.wait_query("SELECT message_id FROM events WHERE message_id LIKE 'c-%'",
                              lambda r: load.acked <= {m for (m,) in r}, STORED_WITHIN_S)
    stored = [m for (m,) in rows]
    assert load.acked <= set(stored) and len(stored) == len(set(stored))


def test_a_node_that_cannot_have_its_port_back_is_reloaded_into_nginx(cluster):
    """restart() on a taken port: the node takes another and nginx is reloaded."""
    node = cluster.node(3)
    old = node.port
    cluster.kill(3)
    with socket.socket() as squatter:  # (SO_REUSEADDR: past TIME_WAIT; no SO_REUSEPORT)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((cluster_mod.HOST, old))
        squatter.listen()
        cluster.restart(3)
    assert node.port != old and node.alive
    ids = []
    for i in range(2 * NODES):
        body = {"type": "track", "event": "After reload", "userId": "u-d",
                "messageId": f"d-{i}"}
        status, _ = cluster.send_events("/v1/capture", body, node=None)
        assert status == 201
        ids.append(f"d-{i}")
    assert f"upstream=127.0.0.1:{node.port} " in cluster.proxy.access_log.read_text()
    got = stored_once(cluster, ids)
    assert sorted(got) == sorted(ids) and all(n == 1 for n, _ in got.values())


def test_render_fills_the_node_lines_and_the_listen():
    text = cluster_mod.CONF.read_text()
    nodes = [(4, "127.0.0.1:5001"), (7, "127.0.0.1:5002")]
    for routing in ("hash", "shard"):
        out = cluster_mod.render_nginx_conf(text, nodes, "127.0.0.1:8080", routing)
        servers = re.findall(r"^\s*server (\S+) max_fails=1 fail_timeout=5s;  # @node$",
                             out, re.M)
        assert servers == ["127.0.0.1:5001", "127.0.0.1:5002"] * 2  # both upstreams
        assert re.findall(r"^\s*listen .*$", out, re.M) == ["    listen 127.0.0.1:8080;"]
        code = re.sub(r"#.*", "", out)
        assert "10.0.0." not in code
        entries = re.findall(r"^\s*(\d+)\s+(\S+);", code, re.M)
        passes = re.findall(r"proxy_pass (\S+);", code)
        if routing == "hash":
            assert entries == [] and "$shard_node" not in code
            assert passes == ["http://triolytics_by_id", "http://triolytics_nodes"]
        else:
            assert entries == [("4", "127.0.0.1:5001"), ("7", "127.0.0.1:5002")]
            assert passes == ["http://$shard_node", "http://triolytics_nodes"]


def test_the_shipped_config_and_its_shard_alternative_pass_nginx_t(tmp_path):
    """`nginx -t` on deploy/nginx-cluster.conf as shipped, and with the `#shard ` lines
    uncommented in place of the hash routing."""
    shipped = cluster_mod.CONF.read_text()
    hashed = "        proxy_pass http://triolytics_by_id;  # @hash\n"
    assert shipped.count(hashed) == 1
    by_shard = re.sub(r"^(\s*)#shard ", r"\1", shipped.replace(hashed, ""), flags=re.M)
    assert "proxy_pass http://$shard_node;" in by_shard
    user = "user root;\n" if os.geteuid() == 0 else ""
    for name, site in (("shipped", shipped), ("shard", by_shard)):
        where = tmp_path / name
        where.mkdir()
        conf = where / "nginx.conf"
        conf.write_text(f"{user}events {{}}\nhttp {{\n{site}\n}}\n")
        done = subprocess.run(
            [cluster_mod.find_nginx(), "-t", "-p", str(where), "-e", str(where / "error.log"),
             "-c", str(conf), "-g", f"pid {where}/nginx.pid; error_log {where}/error.log;"],
            capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, (name, done.stderr)
