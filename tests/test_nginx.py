"""deploy/nginx.conf for real: nginx in front of a triolytics server, on loopback.

What ships is what runs: the test takes the `map` and the `upstream` of
deploy/nginx.conf (the upstream's port set to the server's) and includes
deploy/nginx-locations.conf itself — the file nginx.conf's TLS server block includes —
in a plain-HTTP server on a free loopback port instead of 443 with TLS. nginx runs as
this test's own process (`daemon off`, its pid, logs and temp files in a tmp dir) in
front of `python -m triolytics serve --trusted-proxies 127.0.0.1/32`, then both stop.

The test installs nothing: without nginx it is skipped (`make test` installs it, see
the Makefile's `test-tools`). The whole shipped nginx.conf (TLS included) is checked
with `nginx -t` against a throwaway self-signed certificate when openssl is present.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
WRITE_KEY = "wk_123456789"
START_TIMEOUT_S = 30.0
STORED_WITHIN_S = 5.0  # loads run every second (load_interval_ms)
# The client addresses the test connects from (all of 127/8 is loopback on Linux).
# nginx itself reaches the server from 127.0.0.1, the one trusted proxy.
CLIENT = "127.0.0.2"
PROXY = "127.0.0.1"
FORGED = "203.0.113.7"


def find_nginx() -> str | None:
    """nginx on PATH, or where Debian puts it (/usr/sbin is not on a user's PATH)."""
    return shutil.which("nginx") or shutil.which(
        "nginx", path=os.pathsep.join(["/usr/sbin", "/usr/local/sbin"]))


NGINX = find_nginx()
pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (`make test` installs it: "
                          "apt-get install nginx); this test installs nothing")


def top_level_block(conf: str, head: str) -> str:
    """The block of `conf` that starts with `head` (say `upstream triolytics`), braces
    matched, as written."""
    start = conf.index(head)
    depth, i = 0, conf.index("{", start)
    while True:
        depth += {"{": 1, "}": -1}.get(conf[i], 0)
        if depth == 0:
            return conf[start:i + 1]
        i += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, what: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n"
                               + log.read_text(errors="replace"))
        if predicate():
            return
        time.sleep(0.05)  # bounded polling of a real subprocess
    raise RuntimeError(f"{what} did not start:\n" + log.read_text(errors="replace"))


def stop(proc: subprocess.Popen, sig: int) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


class Server:
    """`python -m triolytics serve` on 127.0.0.1, port 0, trusting 127.0.0.1 as a proxy."""

    def __init__(self, data: Path, log: Path) -> None:
        self.data, self.log_path, self.port = data, log, 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOLYTICS_")}
        env["PYTHONUNBUFFERED"] = "1"
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "triolytics", "serve", "--host", "127.0.0.1",
                 "--port", "0", "--data", str(data), "--write-key", WRITE_KEY,
                 "--trusted-proxies", f"{PROXY}/32"],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        wait_for(self._ready, "triolytics", self.proc, log)

    def _ready(self) -> bool:
        try:
            info = json.loads((self.data / "server.json").read_text())
        except (OSError, ValueError):
            return False
        if info.get("pid") != self.proc.pid:
            return False
        self.port = info["port"]
        status, _ = request(PROXY, self.port, "GET", "/healthz")
        return status == 200

    def query(self, sql: str) -> list:
        token = (self.data / "admin.token").read_text().strip()
        status, body = request(PROXY, self.port, "POST", "/admin/query",
                               json.dumps({"sql": sql}).encode(),
                               {"Authorization": f"Bearer {token}"})
        assert status == 200, body
        return json.loads(body)["rows"]


class Nginx:
    """nginx as this test's own process: the shipped map, upstream and locations, served
    on plain HTTP at 127.0.0.1:<free port>."""

    def __init__(self, where: Path, upstream_port: int) -> None:
        self.where, self.port = where, free_port()
        shipped = (DEPLOY / "nginx.conf").read_text()
        upstream = top_level_block(shipped, "upstream triolytics")
        assert "server 127.0.0.1:3000;" in upstream
        upstream = upstream.replace("server 127.0.0.1:3000;",
                                    f"server 127.0.0.1:{upstream_port};")
        # As root nginx would run its workers as `nobody`, who cannot use the test's
        # tmp dir: run them as root here (a real install keeps nginx's own user).
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf = where / "nginx.conf"
        self.conf.write_text(
            f"{user}worker_processes 1;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"    access_log {where}/access.log;\n"
            f"{top_level_block(shipped, 'map $http_upgrade $connection_upgrade')}\n"
            f"{upstream}\n"
            "server {\n"
            f"    listen 127.0.0.1:{self.port};\n"
            f"    include {DEPLOY / 'nginx-locations.conf'};\n"
            "}\n"
            "}\n")
        self.error_log = where / "error.log"
        self.error_log.touch()
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(where), "-e", str(self.error_log), "-c", str(self.conf),
             "-g", f"daemon off; pid {where}/nginx.pid; error_log {self.error_log};"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for(self._listening, "nginx", self.proc, self.error_log)

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False


def request(source: str, port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
    """One request from `source` to 127.0.0.1:`port`: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                      source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    except OSError:
        return 0, b""
    finally:
        conn.close()


def capture(nginx: Nginx, source: str, message_id: str, headers: dict | None = None):
    event = {"type": "track", "event": "Through nginx", "anonymousId": "nginx-test",
             "messageId": message_id}
    return request(source, nginx.port, "POST", "/v1/capture", json.dumps(event).encode(),
                   {"Content-Type": "application/json", "x-write-key": WRITE_KEY,
                    **(headers or {})})


def stored_ips(server: Server, ids: list[str]) -> dict[str, str]:
    """message_id -> context.ip, once every one of `ids` is in DuckDB."""
    listed = ", ".join(f"'{i}'" for i in ids)
    sql = f"SELECT message_id, context->>'ip' FROM events WHERE message_id IN ({listed})"
    deadline = time.monotonic() + STORED_WITHIN_S
    while True:
        rows = dict(server.query(sql))
        if len(rows) == len(ids) or time.monotonic() > deadline:
            return rows
        time.sleep(0.1)  # bounded polling: loads run every second


@pytest.fixture
def stack(tmp_path):
    server = Server(tmp_path / "data", tmp_path / "server.log")
    (tmp_path / "nginx").mkdir()
    try:
        nginx = Nginx(tmp_path / "nginx", server.port)
    except BaseException:
        stop(server.proc, signal.SIGTERM)
        raise
    try:
        yield server, nginx
    finally:
        nginx_code = stop(nginx.proc, signal.SIGQUIT)  # graceful: workers finish first
        server_code = stop(server.proc, signal.SIGTERM)
    errors = nginx.error_log.read_text(errors="replace")
    assert nginx_code == 0, errors
    assert server_code == 0, server.log_path.read_text(errors="replace")
    assert "[emerg]" not in errors and "[crit]" not in errors, errors


def test_http_event_through_nginx_carries_the_client_ip_nginx_forwarded(stack):
    server, nginx = stack
    assert capture(nginx, CLIENT, "nginx-plain")[0] == 201
    # A client cannot choose its address: nginx replaces X-Forwarded-For ...
    assert capture(nginx, CLIENT, "nginx-forged", {"X-Forwarded-For": FORGED})[0] == 201
    # ... also when the client's own address is a trusted proxy's. Appended
    # ($proxy_add_x_forwarded_for) this would reach the server as "203.0.113.7,
    # 127.0.0.1", whose right-most untrusted address is the forged one.
    assert capture(nginx, PROXY, "nginx-forged-local",
                   {"X-Forwarded-For": f"{FORGED}, {FORGED}"})[0] == 201
    # Directly, not through nginx, the peer is the client (127.0.0.2 is not trusted).
    assert capture(server, CLIENT, "direct", {"X-Forwarded-For": FORGED})[0] == 201

    ips = stored_ips(server, ["nginx-plain", "nginx-forged", "nginx-forged-local", "direct"])
    assert ips == {"nginx-plain": CLIENT, "nginx-forged": CLIENT,
                   "nginx-forged-local": PROXY, "direct": CLIENT}
    access = (nginx.where / "access.log").read_text()
    assert access.count("POST /v1/capture") == 3 and access.startswith(CLIENT)


def test_websocket_batch_through_nginx_is_acked_and_stored(stack):
    server, nginx = stack
    status, body = request(CLIENT, nginx.port, "POST", "/create")
    assert status == 200, body
    analytics_id = json.loads(body)["analytics_id"]

    sock = socket.socket()
    sock.bind((CLIENT, 0))
    sock.connect(("127.0.0.1", nginx.port))
    url = f"ws://127.0.0.1:{nginx.port}/analytics?analytics_id={analytics_id}"
    with connect(url, sock=sock, open_timeout=10) as ws:
        ws.send(json.dumps({"events": [
            {"type": "screen_view", "id": "nginx-ws-1", "payload": {"screen_name": "Home"}},
            {"type": "button_click", "id": "nginx-ws-2", "payload": {"btn_id": "play"}},
        ], "seq": 1}))
        ack = json.loads(ws.recv(timeout=10))
    assert ack["type"] == "ack" and ack["seq"] == 1 and ack["stored"] == 2, ack

    assert stored_ips(server, ["nginx-ws-1", "nginx-ws-2"]) == {
        "nginx-ws-1": CLIENT, "nginx-ws-2": CLIENT}


def test_nginx_refuses_what_it_should(stack):
    server, nginx = stack
    # The admin endpoints stay on the server's own host.
    token = (server.data / "admin.token").read_text().strip()
    status, _ = request(CLIENT, nginx.port, "POST", "/admin/query",
                        b'{"sql": "SELECT 1"}', {"Authorization": f"Bearer {token}"})
    assert status == 404
    # client_max_body_size is max_request_bytes: one byte over is nginx's 413.
    status, _ = request(CLIENT, nginx.port, "POST", "/v1/batch", b" " * 512001,
                        {"Content-Type": "application/json", "x-write-key": WRITE_KEY})
    assert status == 413
    status, body = request(CLIENT, nginx.port, "GET", "/readyz")
    assert status == 200, body


def test_the_shipped_tls_config_is_valid(tmp_path):
    """`nginx -t` on deploy/nginx.conf as shipped, inside an http block, with the
    snippet's and the certificate's paths pointed at this checkout and a throwaway
    self-signed certificate."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: no certificate for the TLS server block")
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=analytics.example.com", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    shipped = (DEPLOY / "nginx.conf").read_text()
    assert "include /etc/nginx/snippets/triolytics-locations.conf;" in shipped
    site = (shipped
            .replace("/etc/nginx/snippets/triolytics-locations.conf",
                     str(DEPLOY / "nginx-locations.conf"))
            .replace("/etc/letsencrypt/live/analytics.example.com/fullchain.pem", str(cert))
            .replace("/etc/letsencrypt/live/analytics.example.com/privkey.pem", str(key)))
    assert "/etc/" not in re.sub(r"#.*", "", site)
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf = tmp_path / "nginx.conf"
    conf.write_text(f"{user}events {{}}\nhttp {{\n{site}\n}}\n")
    done = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", str(conf),
         "-g", f"pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;"],
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "test is successful" in done.stderr
