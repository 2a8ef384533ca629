"""Disk full, for real: a small tmpfs as the data directory, flooded until it is full.

Root only (it mounts a tmpfs; it says so and exits 2 otherwise). Steps:

1. mount a tmpfs of `--size-mib` as the data directory; start `python -m triolytics
   serve` on it (its log goes outside the tmpfs);
2. fill the tmpfs with a filler file, leaving `--headroom-mib`, then flood the server
   with `/v1/batch` requests from `--clients` threads for `--flood-s` seconds: every answer
   must be 201/200 or 503 (never 500); ERROR log lines per second and the server's RSS
   are sampled;
3. SIGTERM the server while the disk is still full (its exit status is reported), start
   it again: it must listen and answer 503 (never exit 1);
4. delete the filler: the server must become ready by itself (`/readyz` 200) and store
   new events (201); SIGTERM it (exit 0);
5. open DuckDB read-only: every acknowledged event must be stored, exactly once.

    python bench/disk_full.py [--size-mib 64] [--headroom-mib 8] [--clients 8]
                              [--flood-s 20] [--src DIR]

`--src` runs another tree's `src` (to measure a version before a change). Prints one
JSON document; exit status 0 when every check holds. The tmpfs is unmounted in a
`finally`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

HOST = "127.0.0.1"
WRITE_KEY = "wk_diskfull"
BATCH = 100  # events per request
POLL_S = 0.1
START_TIMEOUT_S = 60.0
RECOVER_TIMEOUT_S = 60.0
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def request(port: int, method: str, path: str, body: bytes | None = None,
            timeout: float = 10.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        headers = {"content-type": "application/json", "x-write-key": WRITE_KEY}
        conn.request(method, path, body=body, headers=headers)
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


class Server:
    def __init__(self, data: Path, log_path: Path, src: Path, port: int) -> None:
        self.port = port
        self.log_path = log_path
        self.log = open(log_path, "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOLYTICS_")}
        env.update(PYTHONPATH=str(src), PYTHONUNBUFFERED="1")
        if "startup_retry_s" in (src / "triolytics/core/config.py").read_text():
            env["TRIOLYTICS_STARTUP_RETRY_S"] = "1"  # (a version before it lacks it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "triolytics", "serve", "--host", HOST, "--port", str(port),
             "--data", str(data), "--write-key", WRITE_KEY],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_listening(self) -> bool:
        """True once /healthz answers; False if the process exited first."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if request(self.port, "GET", "/healthz", timeout=1)[0] == 200:
                    return True
            except OSError:
                pass
            time.sleep(POLL_S)  # bounded polling of a real subprocess
        return False

    def wait_ready(self, timeout: float = RECOVER_TIMEOUT_S) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            try:
                if request(self.port, "GET", "/readyz", timeout=2)[0] == 200:
                    return time.monotonic() - start
            except OSError:
                pass
            time.sleep(POLL_S)  # bounded polling of a real subprocess
        return None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def fill(mount: Path, headroom: int) -> Path:
    """A filler file taking all but `headroom` bytes of the tmpfs."""
    filler = mount / "filler"
    block = b"\0" * (1 << 20)
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - headroom))
    return filler


USERS = 1000  # distinct anonymousIds (each opens a session); --users


def event(mid: str) -> dict:
    return {"type": "track", "event": "Flood", "anonymousId": f"u{int(mid[:8], 16) % USERS}",
            "messageId": mid, "properties": {"pad": "x" * 200}}


class Flood:
    def __init__(self, port: int, clients: int, seconds: float) -> None:
        self.port = port
        self.clients = clients
        self.seconds = seconds
        self.acked: list[str] = []
        self.statuses: Counter = Counter()
        self.errors: Counter = Counter()
        self.lock = threading.Lock()

    def client(self, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            ids = [uuid.uuid4().hex for _ in range(BATCH)]
            body = json.dumps({"batch": [event(m) for m in ids]}).encode()
            try:
                status, _ = request(self.port, "POST", "/v1/batch", body)
            except OSError as exc:
                with self.lock:
                    self.errors[type(exc).__name__] += 1
                time.sleep(0.05)
                continue
            with self.lock:
                self.statuses[status] += 1
                if status in (200, 201):
                    self.acked += ids
            if status == 503:
                time.sleep(0.01)  # (a real client waits Retry-After; this one floods)

    def run(self) -> None:
        stop_at = time.monotonic() + self.seconds
        threads = [threading.Thread(target=self.client, args=(stop_at,))
                   for _ in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def error_lines_per_second(log_path: Path) -> Counter:
    per_second: Counter = Counter()
    for line in log_path.read_text(errors="replace").splitlines():
        parts = line.split(" ", 3)
        if len(parts) >= 3 and parts[2] == "ERROR":
            per_second[parts[0] + " " + parts[1][:8]] += 1
    return per_second


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--headroom-mib", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--flood-s", type=float, default=20.0)
    ap.add_argument("--src", type=Path, default=REPO / "src")
    ap.add_argument("--users", type=int, default=USERS,
                    help="distinct anonymousIds (sessions) the clients send as")
    args = ap.parse_args()
    globals()["USERS"] = args.users
    if os.geteuid() != 0:
        print("bench/disk_full.py mounts a tmpfs: run it as root", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="triolytics-diskfull-"))
    mount = work / "mnt"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.size_mib}m", "tmpfs",
                    str(mount)], check=True)
    servers: list[Server] = []
    result: dict = {"size_mib": args.size_mib, "headroom_mib": args.headroom_mib,
                    "clients": args.clients, "flood_s": args.flood_s, "users": args.users,
                    "src": str(args.src)}
    try:
        data = mount / "data"
        log_path = work / "server.log"
        port = free_port()
        server = Server(data, log_path, args.src, port)
        servers.append(server)
        assert server.wait_listening(), log_path.read_text(errors="replace")
        filler = fill(mount, args.headroom_mib << 20)

        flood = Flood(port, args.clients, args.flood_s)
        rss: list[float] = []
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                rss.append(rss_mib(server.proc.pid))
                time.sleep(0.2)
        sampler = threading.Thread(target=sample)
        sampler.start()
        started = time.monotonic()
        flood.run()
        readyz_full = request(port, "GET", "/readyz")
        sampling.set()
        sampler.join()
        errors = error_lines_per_second(log_path)
        result["flood"] = {
            "requests": dict(sorted(flood.statuses.items())),
            "connection_errors": dict(flood.errors),
            "acked_events": len(flood.acked),
            "seconds": round(time.monotonic() - started, 1),
            "error_lines": sum(errors.values()),
            "max_error_lines_per_second": max(errors.values(), default=0),
            "rss_mib_start": round(rss[0], 1) if rss else None,
            "rss_mib_peak": round(max(rss), 1) if rss else None,
            "rss_mib_end": round(rss[-1], 1) if rss else None,
            "rss_mib_every_2s": [round(v) for v in rss[::10]],
            "readyz_while_full": [readyz_full[0], json.loads(readyz_full[1])],
        }

        # --- a restart while the disk is still full
        result["stop_while_full_exit"] = server.stop()
        server = Server(data, log_path, args.src, port)
        servers.append(server)
        listening = server.wait_listening()
        restart: dict = {"listening": listening, "exit": server.proc.poll()}
        if listening:
            one = uuid.uuid4().hex
            status, body = request(port, "POST", "/v1/batch", json.dumps(
                {"batch": [event(one)]}).encode())
            ready = request(port, "GET", "/readyz")
            restart.update(post=status, readyz=[ready[0], json.loads(ready[1])])
            if status in (200, 201):
                flood.acked.append(one)  # (not expected while full)
        else:
            restart["log_tail"] = log_path.read_text(errors="replace").splitlines()[-3:]
        result["restart_while_full"] = restart

        # --- space again: recovery by itself
        filler.unlink()
        if server.proc.poll() is None:
            ready_after = server.wait_ready()
        else:  # (it exited: start it by hand, as an operator would have to)
            ready_after = None
            server.stop()
            server = Server(data, log_path, args.src, port)
            servers.append(server)
            result["started_again_by_hand"] = server.wait_listening() and \
                server.wait_ready() is not None
        late = [uuid.uuid4().hex for _ in range(BATCH)]
        status, _ = request(port, "POST", "/v1/batch",
                            json.dumps({"batch": [event(m) for m in late]}).encode())
        if status in (200, 201):
            flood.acked += late
        result["after_space_freed"] = {"ready_after_s": None if ready_after is None
                                       else round(ready_after, 1), "post": status}
        result["final_exit"] = server.stop()
        errors = error_lines_per_second(log_path)
        result["error_lines_total"] = sum(errors.values())

        import duckdb  # (the server extra: the bench runs in the project's venv)
        conn = duckdb.connect(str(data / "events.duckdb"), read_only=True)
        try:
            stored = dict(conn.execute(
                "SELECT message_id, count(*) FROM events WHERE event = 'Flood' "
                "GROUP BY message_id").fetchall())
        finally:
            conn.close()
        missing = [m for m in flood.acked if m not in stored]
        doubled = [m for m, n in stored.items() if n > 1]
        result["stored"] = {"acked": len(flood.acked), "stored": len(stored),
                            "acked_missing": len(missing), "stored_twice": len(doubled)}
        f = result["flood"]
        checks = {
            "never_500": all(s in (200, 201, 503) for s in f["requests"]),
            "saw_503": f["requests"].get(503, 0) > 0,
            "few_error_lines": f["max_error_lines_per_second"] <= 5,
            "restart_listens_and_answers_503": listening and restart.get("post") == 503,
            "recovers_by_itself": ready_after is not None and status in (200, 201),
            "exit_0": result["final_exit"] == 0,
            "every_ack_stored_once": not missing and not doubled,
        }
        result["checks"] = checks
        result["ok"] = all(checks.values())
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()
        subprocess.run(["umount", str(mount)], check=False)
        result["log"] = str(work / "server.log")
    print(json.dumps(result, indent=2))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
