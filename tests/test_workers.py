"""`serve --workers N` (server/workers.py): pure parts first (a worker's settings, its
TOML, `auto`, the refusal, the backoff), then SO_REUSEPORT listeners on loopback, then the
supervisor's loop with stand-in workers (small scripts that write a server.json), then the
whole thing: `triolytics serve --workers 2` on a real PostgreSQL catalog, events from many
connections, a worker killed -9 and started again, SIGTERM."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio
from seed_examples import load_bench_script

from triolytics import cli
from triolytics.core.config import Config, ConfigError, load_config
from triolytics.server.startup import (
    StartupError,
    check_workers,
    open_listeners,
    reserve_port,
)
from triolytics.server.workers import Backoff, Supervisor, worker_config, worker_toml

REFUSAL = '--workers 2 needs store = "ducklake" with a PostgreSQL catalog (docs/scaling.md)'
LAKE = {"store": "ducklake", "ducklake_catalog": "host=127.0.0.1 port=5432 dbname=lake"}


def wait_for(check, timeout: float = 20.0, every: float = 0.05):
    """`check()`'s first truthy value, polled until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {check}"
        time.sleep(every)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").exists() and \
        Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


# --- pure: a worker's settings, `auto`, the refusal, the backoff


def test_a_worker_keeps_the_settings_but_its_own_dir_name_and_ports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = Config(**LAKE, data_dir="data", node_id="n1", port=3000, workers=3,
                    metrics_listen="127.0.0.1:9464", fsync="interval",
                    cors_origins=["https://a.example"], session_timeout_s=60.0)
    w = worker_config(config, 2, 4321)
    assert w.data_dir == str(tmp_path / "data" / "workers" / "2")
    assert (w.node_id, w.port, w.reuse_port, w.workers) == ("n1-w2", 4321, True, 1)
    assert w.ducklake_data_path == str(tmp_path / "data" / "lake" / "data")  # (shared)
    assert w.metrics_listen == "127.0.0.1:9466"  # metrics_listen's port + 2
    changed = {"data_dir", "node_id", "port", "reuse_port", "workers",
               "ducklake_data_path", "metrics_listen"}
    assert {name: getattr(w, name) for name in Config.__struct_fields__ if name not in
            changed} == {name: getattr(config, name) for name in Config.__struct_fields__
                         if name not in changed}
    assert worker_config(config, 0, 4321).metrics_listen == "127.0.0.1:9464"


def test_a_workers_metrics_port_and_lake_data_path_edge_cases(monkeypatch):
    config = Config(**LAKE, metrics_listen="[::1]:0", ducklake_data_path="s3://b/lake")
    assert worker_config(config, 3, 1).metrics_listen == "[::1]:0"  # (each picks one)
    assert worker_config(config, 3, 1).ducklake_data_path == "s3://b/lake"
    assert worker_config(Config(**LAKE, metrics_listen="[::1]:9000"), 1,
                         1).metrics_listen == "[::1]:9001"
    with pytest.raises(StartupError, match="worker 1 would listen on port 65536"):
        worker_config(Config(**LAKE, metrics_listen="127.0.0.1:65535"), 1, 1)
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 64)
    name = worker_config(Config(**LAKE), 12, 1).node_id  # (node_id is 64 characters at most)
    assert name == "h" * 60 + "-w12"


def test_a_workers_toml_reads_back_as_its_settings():
    config = Config(**LAKE, write_keys=['wk_"q"', "wk_\\b"], metrics_token="t\u00e9\x01\x7f\n",
                    cors_origins=[], node_id="n.1", session_timeout_s=1.5e-05,
                    respect_dnt=True, dashboard_cache_s=0.0, workers=1, reuse_port=True)
    assert load_config(worker_toml(config)) == config
    assert load_config(worker_toml(Config())) == Config()


def serve_config(*flags: str, environ: dict[str, str] | None = None) -> Config:
    return cli.config_of(cli._parser().parse_args(["serve", *flags]), environ or {})


def test_workers_from_flag_environment_and_file(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert serve_config().worker_count() == 1
    assert serve_config("--workers", "auto").worker_count() == 6
    assert serve_config("--workers", "AUTO").workers == "auto"
    assert serve_config("--workers", "4").workers == 4
    assert serve_config(environ={"TRIOLYTICS_WORKERS": "auto"}).worker_count() == 6
    assert serve_config("--workers", "2", environ={"TRIOLYTICS_WORKERS": "3"}).workers == 2
    assert load_config('workers = "auto"').worker_count() == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert load_config('workers = "auto"').worker_count() == 1
    with pytest.raises(ConfigError, match='workers must be a positive number or "auto"'):
        load_config(None, {"TRIOLYTICS_WORKERS": "0"})


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5"])
def test_a_bad_workers_flag_is_an_argparse_error(capsys, value):
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["serve", "--workers", value])
    assert exit_.value.code == 2
    assert "argument --workers: not a number of workers" in capsys.readouterr().err


@pytest.mark.parametrize("settings", [
    {}, {"store": "ducklake"}, {"store": "ducklake", "ducklake_catalog": "/srv/c.ducklake"},
    {"store": "duckdb", "ducklake_catalog": "postgresql://u@h/db"}])
def test_more_than_one_worker_needs_a_postgresql_catalog(settings):
    with pytest.raises(StartupError) as refused:
        check_workers(Config(workers=2, **settings))
    assert str(refused.value) == REFUSAL
    with pytest.raises(StartupError, match="--workers auto needs"):
        check_workers(Config(workers="auto", **settings))


@pytest.mark.parametrize("catalog", ["postgresql://u@h:5432/db", "postgres:dbname=x host=h",
                                     "host=h dbname=x"])
def test_a_postgresql_catalog_is_accepted(catalog):
    check_workers(Config(workers=2, store="ducklake", ducklake_catalog=catalog))


def test_the_refusal_is_one_line_and_exit_1(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOLYTICS_")}
    done = subprocess.run([sys.executable, "-m", "triolytics", "serve", "--workers", "2",
                           "--data", str(tmp_path / "data")], capture_output=True, text=True,
                          timeout=60, env={**env, "TRIOLYTICS_STORE": "ducklake"})
    assert (done.returncode, done.stderr) == (1, f"triolytics: {REFUSAL}\n")
    assert not (tmp_path / "data" / "server.json").exists()


def test_the_backoff_doubles_to_its_ceiling_and_resets_after_a_long_run():
    backoff = Backoff()
    assert [backoff.after(0.5) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.after(60.0) == 1  # it ran 60 s: the next wait is the first again
    assert backoff.after(59.0) == 2


# --- loopback: listeners that share a port


async def test_listeners_with_reuse_port_share_a_reserved_port():
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        with pytest.raises(StartupError, match="Address already in use; choose another"):
            reserve_port("127.0.0.1", plain.getsockname()[1])  # (a port taken already)
    with reserve_port("127.0.0.1", 0) as reserved:
        port = reserved.getsockname()[1]
        first = await open_listeners(port, "127.0.0.1", reuse_port=True)
        second = await open_listeners(port, "127.0.0.1", reuse_port=True)
        with pytest.raises(StartupError, match=f"127.0.0.1:{port}: Address already in use; "
                                               "choose another port with --port"):
            await open_listeners(port, "127.0.0.1")  # (without SO_REUSEPORT: refused)
        accepted = {0: 0, 1: 0}

        async def accept(i: int, listener: trio.SocketListener) -> None:
            while True:
                stream = await listener.accept()
                accepted[i] += 1
                await stream.aclose()

        async with trio.open_nursery() as nursery:
            for i, listeners in enumerate((first, second)):
                nursery.start_soon(accept, i, listeners[0])
            for _ in range(40):  # (the kernel hashes each connection's ports)
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.aclose()
            with trio.fail_after(5):
                while sum(accepted.values()) < 40:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        assert accepted[0] and accepted[1], accepted
        for listener in first + second:
            await listener.aclose()
        # the reserved socket alone gets no connection, and keeps the port
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))


# --- the supervisor's loop, with stand-in workers

FAKE = """
import json, os, signal, sys, time
from pathlib import Path
data = Path(sys.argv[1])
mode = (data / "mode").read_text().strip() if (data / "mode").exists() else "serve"
if mode == "fail":
    print("triolytics: cannot open the lake: boom", file=sys.stderr, flush=True)
    sys.exit(1)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(3 if mode == "bad-exit" else 0))
print(f"stand-in {data.name} up", file=sys.stderr, flush=True)
(data / "admin.token").write_text("shared-token\\n")
(data / "server.json").write_text(json.dumps({"host": "127.0.0.1", "port": 1,
                                              "pid": os.getpid()}))
while True:
    time.sleep(1)
"""


class StandIns(Supervisor):
    def command(self, worker):
        return [sys.executable, "-c", FAKE, str(worker.data)]


class Running:
    """A StandIns supervisor's `run()` in a thread (no signal handlers there)."""

    def __init__(self, data: Path, workers: int = 2) -> None:
        self.data = data
        self.supervisor = StandIns(Config(data_dir=str(data), workers=workers), 4321,
                                   backoff=lambda: Backoff(0.05, 0.2, 60.0))
        self.result: int | BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.supervisor.run()
        except BaseException as exc:
            self.result = exc

    def pid(self, i: int) -> int | None:
        info = read_json(self.data / "workers" / str(i) / "server.json")
        return info and info["pid"]

    def finished(self, timeout: float = 10.0) -> int | BaseException | None:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self.result


def test_stand_ins_serve_are_started_again_when_killed_and_stop_on_sigterm(tmp_path,
                                                                          caplog):
    caplog.set_level(logging.INFO, "triolytics")
    running = Running(tmp_path)
    info = wait_for(lambda: read_json(tmp_path / "server.json"))
    assert info == {"host": "127.0.0.1", "port": 4321, "pid": os.getpid()}
    assert (tmp_path / "admin.token").read_text() == "shared-token\n"  # (for the CLI)
    assert (tmp_path / "admin.token").stat().st_mode & 0o777 == 0o600
    first = [running.pid(0), running.pid(1)]
    os.kill(first[1], signal.SIGKILL)
    again = wait_for(lambda: running.pid(1) not in (None, first[1]) and running.pid(1))
    assert f"worker 1 (pid {first[1]}) was killed by SIGKILL" in caplog.text
    assert [r.levelno for r in caplog.records if "was killed" in r.message] == \
        [logging.WARNING]
    wait_for(lambda: f"worker 1 (pid {again}) serves again" in caplog.text)
    assert running.pid(0) == first[0]
    running.supervisor.stop(signal.SIGTERM)
    assert running.finished() == 0
    assert all(gone(pid) for pid in (first[0], again))
    assert not (tmp_path / "server.json").exists()


def test_a_worker_that_exits_badly_on_sigterm_makes_the_exit_status_1(tmp_path, caplog):
    caplog.set_level(logging.INFO, "triolytics")
    running = Running(tmp_path)
    wait_for(lambda: read_json(tmp_path / "server.json"))
    (tmp_path / "workers" / "1" / "mode").write_text("bad-exit")  # (read at its next start)
    os.kill(running.pid(1), signal.SIGKILL)
    wait_for(lambda: "serves again" in caplog.text)
    running.supervisor.stop()
    assert running.finished() == 1
    assert "workers that did not exit 0: 1 (exited with status 3)" in caplog.text


def test_a_worker_failing_at_the_first_start_stops_everything_at_once(tmp_path):
    (tmp_path / "workers" / "0").mkdir(parents=True)
    (tmp_path / "workers" / "0" / "mode").write_text("fail")
    running = Running(tmp_path)
    error = running.finished()
    assert isinstance(error, StartupError)
    assert str(error) == "worker 0: cannot open the lake: boom"
    assert not (tmp_path / "workers" / "1").exists()  # (never started)


def test_a_worker_failing_to_start_again_4_times_stops_everything(tmp_path, capfd):
    running = Running(tmp_path)
    wait_for(lambda: read_json(tmp_path / "server.json"))
    other = running.pid(0)
    (tmp_path / "workers" / "1" / "mode").write_text("fail")
    os.kill(running.pid(1), signal.SIGKILL)
    error = running.finished()
    assert isinstance(error, StartupError)
    assert str(error) == "worker 1 could not start 4 times in a row: cannot open the lake: boom"
    assert gone(other)
    err = capfd.readouterr().err
    assert err.count("triolytics: cannot open the lake: boom\n") == 4  # (passed on)
    assert "stand-in 0 up\n" in err
    assert not (tmp_path / "server.json").exists()


def test_no_worker_outlives_a_supervisor_killed_9(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "import test_workers as t; from triolytics.core.config import Config; "
            f"t.StandIns(Config(data_dir={str(tmp_path)!r}, workers=2), 4321).run()")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (read_json(tmp_path / "server.json") or {}).get("pid") == proc.pid)
        pids = [read_json(tmp_path / "workers" / str(i) / "server.json")["pid"] for i in (0, 1)]
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=5)  # (SIGTERM: PDEATHSIG)


# --- the whole thing: two workers on a real PostgreSQL catalog

WRITE_KEY = "wk_workers_e2e"
NODE = "wk"


def call(port: int, method: str, path: str, body: dict, headers: dict) -> tuple[int, dict]:
    """One request on its own connection (`Connection: close`), so that the kernel
    chooses a worker for each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, json.dumps(body), {
            "Content-Type": "application/json", "Connection": "close", **headers})
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        conn.close()


def capture(port: int, ids: list[str]) -> set[str]:
    """POST each id to /v1/capture from 16 threads; the ids acknowledged."""
    def one(message_id: str) -> str | None:
        try:
            status, reply = call(port, "POST", "/v1/capture", {
                "type": "track", "event": "e", "userId": f"u-{message_id}",
                "messageId": message_id}, {"x-write-key": WRITE_KEY})
        except OSError:
            return None
        return message_id if status in (200, 201) and reply.get("ok") else None
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return {m for m in pool.map(one, ids) if m is not None}


def stored(port: int, data: Path) -> list[tuple[str, str]]:
    """(message_id, writer) of every stored track event, asked of any worker."""
    token = (data / "admin.token").read_text().strip()
    for _ in range(3):  # (a connection in a killed worker's backlog is reset)
        try:
            status, reply = call(port, "POST", "/admin/query", {
                "sql": "SELECT message_id, writer FROM events WHERE type = 'track'"},
                {"Authorization": f"Bearer {token}"})
        except OSError:
            continue
        assert status == 200, reply
        return [tuple(row) for row in reply["rows"]]
    raise AssertionError("no answer from /admin/query")


def test_two_workers_share_a_port_and_a_lake_and_survive_a_kill(tmp_path, postgres):
    crash_loop = load_bench_script("crash_loop")
    data = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOLYTICS_")}
    env.update(TRIOLYTICS_STORE="ducklake", TRIOLYTICS_NODE_ID=NODE,
               TRIOLYTICS_DUCKLAKE_CATALOG=postgres.create_database("wk1"),
               TRIOLYTICS_WRITE_KEYS=WRITE_KEY, TRIOLYTICS_SHUTDOWN_GRACE_S="2")
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "triolytics", "serve", "--workers",
                                 "2", "--port", "0", "--data", str(data)], env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        port = wait_for(lambda: proc.poll() is None and crash_loop.bound_port(data, proc.pid),
                        timeout=30)
        pids = [read_json(data / "workers" / str(i) / "server.json")["pid"] for i in (0, 1)]

        def all_stored(acked: set[str]) -> list[tuple[str, str]]:
            return wait_for(lambda: (rows := stored(port, data)) and
                            acked <= {m for m, _ in rows} and rows, every=0.2)

        acked = capture(port, [f"a{i}" for i in range(200)])
        assert len(acked) == 200
        rows = all_stored(acked)
        assert {w for _, w in rows} == {f"{NODE}-w0", f"{NODE}-w1"}  # the kernel spread them

        # Worker 1 is killed right after its acks, most of them journaled, not yet loaded
        # (load_interval_ms is 1 s): it is started again and replays its journal.
        acked |= capture(port, [f"b{i}" for i in range(100)])
        os.kill(pids[1], signal.SIGKILL)
        restarted = wait_for(lambda: (pid := (read_json(
            data / "workers" / "1" / "server.json") or {}).get("pid")) != pids[1] and pid)
        rows = all_stored(acked)
        assert len(acked) == 300
        assert sorted(m for m, _ in rows) == sorted(acked)  # each once, nothing else
        assert any(w == f"{NODE}-w1" for m, w in rows if m.startswith("b"))

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "serve.log").read_text()
    assert f"worker 1 (pid {pids[1]}) was killed by SIGKILL" in text, text
    assert all(gone(pid) for pid in (pids[0], restarted))
    assert not (data / "server.json").exists()
