"""`serve --workers N`: a supervisor process and N servers (workers) on one port.

    supervise(config)
    ├─ <data_dir>/server.lock   held for the supervisor's life (startup.lock_data_dir)
    ├─ the port                 bound with SO_REUSEPORT, never listening (reserve_port):
    │                           port 0 is resolved once, and the port stays ours while
    │                           a worker is started again
    └─ worker i (0 .. N-1)      python -m triolytics serve --config
                                <data_dir>/workers/<i>/worker.toml --workers 1

Rules:
- Only with store = "ducklake" and a PostgreSQL catalog (startup.check_workers): each
  worker is a writer of that lake with its own journal and mark in `<data_dir>/workers/<i>`
  and its own name `<node_id or host name>-w<i>`, so what a worker acknowledged reaches the
  lake once, also when it was killed (the writer's recovery at its next start).
- A worker's settings are the supervisor's, written whole into its worker.toml (0600: it
  may hold tokens) with its own data_dir and node_id, the resolved port, `reuse_port =
  true`, `workers = 1`, the lake's data path made absolute (the default one is the top
  data dir's, shared) and `metrics_listen` at its port + i. TRIOLYTICS_* variables are not
  passed on: the file holds them already, and they would beat it.
- Every worker listens on the port with SO_REUSEPORT and the kernel spreads connections
  among them (those still in a killed worker's backlog are reset).
- Worker 0 starts alone, the others once it serves: it makes the lake's tables, the shared
  secrets and the default write key once. Then the secrets (admin.token, ...) are copied
  into the top data dir, and once every worker serves, `<data_dir>/server.json` names the
  supervisor's pid and the port, where the CLI and bench/crash_loop.py look.
- SIGINT/SIGTERM are forwarded to every worker (a second one too: they then cancel
  in-flight requests), which drain as one server does; exit status 0 once every worker
  exited 0. Workers have their own process group (a terminal's Ctrl-C reaches the
  supervisor alone, which forwards it once) and get SIGTERM when the thread that started
  them ends (Linux's PR_SET_PDEATHSIG): no worker outlives a supervisor killed -9.
- A worker that exits while not stopping is started again after a backoff (1 s, doubled up
  to 30 s, 1 s again after a worker ran 60 s), logged as a WARNING with its exit status.
  A worker exiting 1 before it serves (a StartupError) stops the supervisor with that
  error: at once while the workers first start (as one server would stop), else after
  more than 3 such exits in a row.
- The workers' stderr passes through the supervisor, line by line; its last
  "triolytics: ..." line is a worker's start-up error. Their stdout is the supervisor's.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from triolytics.core.config import ENV_PREFIX, Config, split_address
from triolytics.server.startup import StartupError, check_workers, lock_data_dir, reserve_port

log = logging.getLogger("triolytics")
TICK_S = 0.05  # the loop's wait: how late a signal, an exit or a worker's server.json is seen
START_FAILURES = 3  # a worker's start-up errors in a row that are tried again
SECRETS = ("admin.token", "viewer.token", "analytics.secret")  # shared; for the CLI
LINE_BYTES = 64 * 1024  # of a worker's stderr line held back; a longer one is passed in parts
_PR_SET_PDEATHSIG = 1  # prctl(2)
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None


def supervise(config: Config) -> int:
    """Run `config.worker_count()` workers until SIGINT/SIGTERM; the exit status."""
    check_workers(config)
    lock = lock_data_dir(Path(config.data_dir))
    try:
        with reserve_port(config.host, config.port) as reserved:
            supervisor = Supervisor(config, reserved.getsockname()[1])
            previous = {s: signal.signal(s, lambda signum, _: supervisor.stop(signum))
                        for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                return supervisor.run()
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
    finally:
        os.close(lock)


def worker_config(config: Config, index: int, port: int) -> Config:
    """Worker `index`'s settings: `config`'s, with its own data dir, writer name and
    metrics port (metrics_listen's + index; 0 stays 0), the shared port with SO_REUSEPORT,
    and the lake's data path absolute."""
    suffix = f"-w{index}"
    lake_data = config.lake_data_path()
    changes: dict[str, Any] = {
        "data_dir": str(Path(config.data_dir).absolute() / "workers" / str(index)),
        "node_id": config.writer_name()[:64 - len(suffix)] + suffix,
        "port": port, "reuse_port": True, "workers": 1,
        "ducklake_data_path": lake_data if "://" in lake_data else
        str(Path(lake_data).absolute())}
    if config.metrics_listen:
        host, first = split_address(config.metrics_listen, "metrics_listen")
        metrics_port = first + index if first else 0
        if metrics_port > 65535:
            raise StartupError(f"metrics_listen {config.metrics_listen}: worker {index} "
                               f"would listen on port {metrics_port}; choose a lower port")
        changes["metrics_listen"] = f"[{host}]:{metrics_port}" if ":" in host else \
            f"{host}:{metrics_port}"
    return msgspec.structs.replace(config, **changes)


def worker_toml(config: Config) -> str:
    """Every setting of `config` as TOML that `load_config` reads back as `config`."""
    return "".join(f"{name} = {_toml(value)}\n"
                   for name, value in msgspec.structs.asdict(config).items())


_ESCAPES = {'"': '\\"', "\\": "\\\\", **{chr(c): f"\\u{c:04x}" for c in [*range(32), 127]}}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # (a float's repr is TOML too: 1800.0, 1e-05, inf)
    if isinstance(value, list):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return '"' + "".join(_ESCAPES.get(ch, ch) for ch in value) + '"'


class Backoff:
    """The wait before a worker is started again: `first`, doubled up to `most`; `first`
    again after a worker ran `reset_after_s`."""

    def __init__(self, first: float = 1.0, most: float = 30.0,
                 reset_after_s: float = 60.0) -> None:
        self.first, self.most, self.reset_after_s = first, most, reset_after_s
        self.next = first

    def after(self, ran_s: float) -> float:
        """The wait after a worker that ran `ran_s` exited."""
        if ran_s >= self.reset_after_s:
            self.next = self.first
        wait, self.next = self.next, min(self.next * 2, self.most)
        return wait


class Worker:
    """One worker's slot: its settings, its process while it runs, its restarts."""

    def __init__(self, index: int, config: Config, backoff: Backoff) -> None:
        self.index, self.config, self.backoff = index, config, backoff
        self.data = Path(config.data_dir)
        self.proc: subprocess.Popen | None = None
        self.started = 0.0  # time.monotonic() of its start
        self.due: float | None = None  # when it is to be started (again)
        self.serving: dict | None = None  # its server.json, once written
        self.failures = 0  # start-up errors in a row
        self.error = ""  # its last "triolytics: ..." line
        self.partial = b""  # of its stderr: the line begun


class Supervisor:
    """The loop: start, watch, restart and stop the workers (`supervise` runs it)."""

    def __init__(self, config: Config, port: int, *,
                 backoff: Callable[[], Backoff] = Backoff) -> None:
        self.data = Path(config.data_dir).absolute()
        self.port = port
        self.workers = [Worker(i, worker_config(config, i, port), backoff())
                        for i in range(config.worker_count())]
        self.workers[0].due = 0.0  # (the others once it serves)
        self.signals: list[int] = []  # received, not yet forwarded
        self.stopping = False
        self.serving = False  # every worker has served; server.json written
        self.statuses: dict[int, int] = {}  # exit statuses while stopping
        self.selector = selectors.DefaultSelector()  # the workers' stderr

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Forward `signum` to the workers and stop (a signal handler calls it)."""
        self.signals.append(signum)

    def command(self, worker: Worker) -> list[str]:
        return [sys.executable, "-m", "triolytics", "serve", "--config",
                str(worker.data / "worker.toml"), "--workers", "1"]

    def run(self) -> int:
        """Until stopped and every worker exited: 0 when each exited 0, else 1."""
        try:
            try:
                while not (self.stopping and all(w.proc is None for w in self.workers)):
                    self._step()
            except BaseException:
                if not self.stopping:  # (a start-up error, or a bug)
                    self.stopping = True
                    self._signal_all(signal.SIGTERM)
                while any(w.proc is not None for w in self.workers):
                    self._step()  # (their output still passed on)
                raise
        finally:
            self.selector.close()
            _remove_server_json(self.data)
        failed = {i: s for i, s in self.statuses.items() if s != 0}
        if failed:
            log.error("stopped; workers that did not exit 0: %s", ", ".join(
                f"{i} ({_status(s)})" for i, s in sorted(failed.items())))
        return 1 if failed else 0

    def _step(self) -> None:
        for key, _ in self.selector.select(TICK_S):
            self._read(key.data)
        self._forward_signals()
        now = time.monotonic()
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is not None:
                self._exited(w, now)
            elif w.proc is None and w.due is not None and now >= w.due and not self.stopping:
                self._start(w, now)
            elif w.proc is not None and w.serving is None:
                self._check_serving(w)
        if not self.serving and not self.stopping and all(w.serving for w in self.workers):
            self._announce()

    def _forward_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if self.stopping:
                log.warning("second signal: the workers cancel their in-flight requests")
            else:
                log.info("received %s: stopping %d workers", signal.Signals(signum).name,
                         len(self.workers))
            self.stopping = True
            self._signal_all(signum)

    def _signal_all(self, signum: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(signum)

    def _start(self, w: Worker, now: float) -> None:
        w.data.mkdir(parents=True, exist_ok=True)
        _write_private(w.data / "worker.toml", worker_toml(w.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        parent = os.getpid()
        w.proc = subprocess.Popen(self.command(w), env=env, stdin=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, process_group=0,
                                  preexec_fn=lambda: _die_with(parent))
        os.set_blocking(w.proc.stderr.fileno(), False)
        self.selector.register(w.proc.stderr, selectors.EVENT_READ, w)
        w.started, w.due, w.serving, w.error, w.partial = now, None, None, "", b""
        log.info("started worker %d (pid %d, data %s)", w.index, w.proc.pid, w.data)

    def _check_serving(self, w: Worker) -> None:
        try:
            info = json.loads((w.data / "server.json").read_text())
        except (OSError, ValueError):
            return
        if info.get("pid") != w.proc.pid:
            return  # (the one its previous run left)
        w.serving, w.failures = info, 0
        if self.serving:
            log.info("worker %d (pid %d) serves again", w.index, w.proc.pid)
        elif w.index == 0:  # the lake and its secrets are made: the others may start
            for path in SECRETS:
                if (w.data / path).exists():
                    _write_private(self.data / path, (w.data / path).read_text())
            for other in self.workers[1:]:
                if other.proc is None and other.due is None:
                    other.due = 0.0

    def _announce(self) -> None:
        host = self.workers[0].serving["host"]
        _write_private(self.data / "server.json", json.dumps(
            {"host": host, "port": self.port, "pid": os.getpid()}))
        self.serving = True
        log.info("%d workers listening on http://%s:%d (pids %s)", len(self.workers), host,
                 self.port, ", ".join(str(w.proc.pid) for w in self.workers))

    def _exited(self, w: Worker, now: float) -> None:
        self._read(w, until_eof=True)
        code, pid, served = w.proc.returncode, w.proc.pid, w.serving is not None
        w.proc, w.serving = None, None
        if self.stopping:
            self.statuses[w.index] = code
            return
        if code == 1 and not served:
            w.failures += 1
            if not self.serving:
                raise StartupError(f"worker {w.index}: {w.error or 'exit status 1'}")
            if w.failures > START_FAILURES:
                raise StartupError(f"worker {w.index} could not start {w.failures} times "
                                   f"in a row: {w.error or 'exit status 1'}")
        wait = w.backoff.after(now - w.started)
        w.due = now + wait
        log.warning("worker %d (pid %d) %s after %.1f s; starting it again in %g s",
                    w.index, pid, _status(code), now - w.started, wait)

    def _read(self, w: Worker, until_eof: bool = False) -> None:
        """Pass on the complete lines of `w`'s stderr that have arrived (all of them, up to
        its end, when it has exited)."""
        stream = w.proc.stderr
        while not stream.closed:
            try:
                chunk = os.read(stream.fileno(), 65536)
            except BlockingIOError:
                if not until_eof:
                    return
                chunk = b""  # (a process it left holds the pipe: stop there)
            if not chunk:
                if w.partial:
                    self._line(w, w.partial)
                self.selector.unregister(stream)
                stream.close()
                return
            *lines, w.partial = (w.partial + chunk).split(b"\n")
            for line in lines:
                self._line(w, line)
            if len(w.partial) > LINE_BYTES:
                self._line(w, w.partial)
                w.partial = b""
            if not until_eof:
                return

    def _line(self, w: Worker, line: bytes) -> None:
        text = line.decode(errors="replace")
        if text.startswith("triolytics: "):
            w.error = text.removeprefix("triolytics: ")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()


def _status(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _die_with(parent: int) -> None:
    """In a worker before exec: SIGTERM when the supervisor dies (Linux), so that no
    worker is left serving; it exits at once when the supervisor is gone already."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)


def _write_private(path: Path, text: str) -> None:
    """Write `path` whole (a reader never sees half of it), readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _remove_server_json(data: Path) -> None:
    """`<data_dir>/server.json`, when it is ours."""
    try:
        if json.loads((data / "server.json").read_text()).get("pid") == os.getpid():
            (data / "server.json").unlink()
    except (OSError, ValueError):
        pass
