"""What the benchmark scripts share: the machine, CPU pinning, the server under test as a
subprocess, CPU accounting, durability checks and the JSON report.

Scripts run as `python bench/<script>.py`, so this directory is on sys.path and they
`import harness`. bench/crash_loop.py is loaded by path from the tests and stays apart.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
SERVER_CPU, LOAD_CPU = 0, 1


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --- CPUs --------------------------------------------------------------------------------


def pinned(cpu: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > max(SERVER_CPU, LOAD_CPU):
        return ["taskset", "-c", str(cpu)]
    return []


def pin_to_load_cpu() -> None:
    """Run this process (and what it starts from now on) on LOAD_CPU, when pinning is on."""
    if pinned(LOAD_CPU):
        os.sched_setaffinity(0, {LOAD_CPU})


def pinning() -> dict | None:
    """The report's `pinning` entry."""
    return {"server_cpu": SERVER_CPU, "load_cpu": LOAD_CPU} if pinned(0) else None


def prepare_main() -> None:
    """The start of every script's main: servers must see SIGINT, the script stays off
    the server's CPU."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # servers must see SIGINT
    pin_to_load_cpu()  # keep this process and its children off CPU 0


def busy_cpu_seconds() -> float:
    """CPU time all CPUs have spent busy since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]  # guest time is in user already
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


class CpuMeter:
    """CPU seconds the server and the whole machine spend from now until `stop()`."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.server0, self.busy0 = server.cpu_seconds(), busy_cpu_seconds()

    def stop(self) -> tuple[float, float]:
        """(server CPU seconds, busy CPU seconds of all CPUs) since the start."""
        return self.server.cpu_seconds() - self.server0, busy_cpu_seconds() - self.busy0


def cpu_utils(
    server_cpu: float, load_cpu: float, busy: float, elapsed: float, suffix: str = ""
) -> dict:
    """Server, load generator and everything else, in cores over `elapsed` seconds."""
    return {
        f"server_cpu_util{suffix}": round(server_cpu / elapsed, 3),
        f"load_cpu_util{suffix}": round(load_cpu / elapsed, 3),
        # CPU used by anything else on the machine meanwhile: near 0 for a clean run
        f"other_cpu_util{suffix}": round((busy - server_cpu - load_cpu) / elapsed, 3),
    }


def raise_nofile(n: int) -> int:
    """Raise this process's RLIMIT_NOFILE to n (the hard limit too, when allowed)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
            return n
        except (ValueError, OSError):  # not privileged: as far as the hard limit allows
            n = hard
    if soft == resource.RLIM_INFINITY or soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- sockets and load workers ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def recv_or_why(
    sock: socket.socket, size: int, error: str, closed: str, *, raise_blocking: bool = False
) -> tuple[bytes, str]:
    """(data, "") from one recv; (b"", why) when it failed (`error`, formatted with `exc`)
    or the peer closed (`closed`). With raise_blocking, BlockingIOError is the caller's."""
    try:
        data = sock.recv(size)
    except OSError as exc:
        if raise_blocking and isinstance(exc, BlockingIOError):
            raise
        return b"", error.format(exc=exc)
    return data, "" if data else closed


def in_workers(fn: Callable[..., dict], calls: Sequence[tuple], timeout: float) -> list[dict]:
    """fn(*call) for each call, each in its own spawned process; their results in order."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(calls), mp_context=ctx) as pool:
        futures = [pool.submit(fn, *call) for call in calls]
        return [f.result(timeout=timeout) for f in futures]


def percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def latency_ms(parts: list[dict]) -> dict:
    """p50_ms and p99_ms over the workers' `latencies` (seconds)."""
    latencies = sorted(x for p in parts for x in p["latencies"])
    return {"p50_ms": percentile(latencies, 50) * 1e3, "p99_ms": percentile(latencies, 99) * 1e3}


# --- the server under test ---------------------------------------------------------------


class StartupError(RuntimeError):
    pass


def triolytics_exe() -> str:
    exe = Path(sys.executable).parent / "triolytics"
    return str(exe) if exe.exists() else (shutil.which("triolytics") or str(exe))


def server_argv(
    port: int,
    data: Path,
    fsync: str,
    target_cmd: str | None,
    *,
    probe: list[str] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The pinned command line of one server: a probe (`[script, args...]` in bench/),
    else `--target-cmd` filled in, else `triolytics serve` (with `extra` options)."""
    if probe is not None:
        argv = [sys.executable, str(HERE / probe[0]), *probe[1:]]
        argv += ["--host", HOST, "--port", str(port)]
    elif target_cmd:
        fields = {"python": sys.executable, "host": HOST, "port": port, "data": data}
        argv = shlex.split(target_cmd.format(fsync=fsync, **fields))
    else:
        argv = [triolytics_exe(), "serve", "--host", HOST, "--port", str(port)]
        argv += ["--data", str(data), *extra, "--fsync", fsync]
    return pinned(SERVER_CPU) + argv


class Server:
    """One server process: started pinned, waited for, stopped with SIGINT.

    Ready means `GET /healthz` answers 200 (triolytics), or for the probes, which have no
    such route, that `listening` was printed and the port accepts a TCP connection.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        workdir: Path,
        *,
        healthz: bool = True,
        env: dict[str, str] | None = None,
        nofile: int | None = None,
    ) -> None:
        self.name, self.argv, self.port, self.workdir = name, argv, port, workdir
        self.healthz, self.env, self.nofile = healthz, env, nofile
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = None if self.env is None else {**os.environ, **self.env}
        with open(self.workdir / "stdout", "wb") as out, open(self.workdir / "stderr", "wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                preexec_fn=None if self.nofile is None else self._raise_nofile,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StartupError(
                    f"{self.name} exited with {self.proc.returncode}\n{self.stderr()}"
                )
            if self.ready():
                return
            time.sleep(0.05)
        waited = "no 200 from /healthz" if self.healthz else "not ready"
        raise StartupError(f"{self.name}: {waited} in {timeout}s\n{self.stderr()}")

    def _raise_nofile(self) -> None:  # runs in the child between fork and exec
        raise_nofile(self.nofile)

    def ready(self) -> bool:
        if self.healthz:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=1)
            try:
                conn.request("GET", "/healthz")
                return conn.getresponse().status == 200
            except OSError:
                return False
            finally:
                conn.close()
        if b"listening" not in (self.workdir / "stdout").read_bytes():
            return False
        try:
            socket.create_connection((HOST, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stderr(self) -> str:
        text = (self.workdir / "stderr").read_text(errors="replace")
        return text[-4000:] or "(stderr empty)"

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status_kib(self, field: str) -> int | None:
        """A `kB` field of /proc/PID/status (VmRSS, VmHWM, …), in KiB."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self, timeout: float) -> int | None:
        """SIGINT, wait up to `timeout`; returns the exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not exit {timeout}s after SIGINT; killing it")
            self.kill()
            return None

    def shut_down(self, timeout: float) -> dict:
        """stop(timeout), kill if still running; the report's exit code and stop time (which
        includes any final load into DuckDB)."""
        began = time.monotonic()
        exit_code = self.stop(timeout)
        stop_s = time.monotonic() - began
        self.kill()
        return {"server_exit_code": exit_code, "server_stop_s": round(stop_s, 3)}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def record_failure(
    result: dict, label: str, exc: Exception, server: Server, with_traceback: bool = False
) -> None:
    """A measurement that failed is reported in its result, not fatal to the run."""
    log(f"{label} FAILED: {exc}")
    result["error"] = f"{type(exc).__name__}: {exc}"
    if with_traceback:
        result["traceback"] = traceback.format_exc()[-2000:]
    if server.proc is not None:
        result["server_stderr_tail"] = server.stderr()[-1500:]


# --- stored events -----------------------------------------------------------------------


def durability(counts: dict, acked: int, in_flight: int) -> dict:
    """Stored (counts["stored_events"]) vs acknowledged events; what was cut off in flight
    at the stop may be stored unacknowledged."""
    stored = counts["stored_events"]
    out = {"acked_events": acked, **counts}
    if stored is not None:
        out["stored_equals_acked"] = stored == acked
        out["stored_minus_acked"] = stored - acked
        out["durability_ok"] = 0 <= stored - acked <= in_flight  # nothing acked was lost
        out["unacked_in_flight_max"] = in_flight
    return out


# --- the report --------------------------------------------------------------------------


def versions(*packages: str) -> dict:
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def machine(*packages: str) -> dict:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions(*packages),
    }


def report_head(bench: str, *packages: str) -> dict:
    """The report's first entries: bench, when, machine (with these packages' versions)."""
    return {
        "bench": bench,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(*packages),
    }


def run_grid(args: argparse.Namespace, targets: Sequence[str], loads: Sequence[str],
             measure: Callable[..., dict], prefix: str) -> dict:
    """results[target][load] = measure(target, load, args, tmp) for the targets and loads
    that `--targets` and `--loads` select (in the given order), each load across every
    target before the next, in one temporary directory."""
    chosen = [t for t in targets if t in args.targets.split(",")]
    results: dict = {t: {} for t in chosen}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for load in [x for x in loads if x in args.loads.split(",")]:
            for target in chosen:
                results[target][load] = measure(target, load, args, Path(tmp))
    return results


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def load_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the doc's first line, with --duration and --quick."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per load (default 10)")
    p.add_argument("--quick", action="store_true", help="3 s per load")
    return p


def parse_load_args(p: argparse.ArgumentParser) -> argparse.Namespace:
    """p's arguments, with --quick made 3 s per load."""
    args = p.parse_args()
    if args.quick:
        args.duration = 3.0
    return args


def add_server_args(p: argparse.ArgumentParser) -> None:
    """--target-cmd, --startup-timeout, --stop-timeout and --out."""
    p.add_argument(
        "--target-cmd",
        help="command template replacing `triolytics serve`; "
        "fields {python} {host} {port} {data} {fsync}",
    )
    p.add_argument("--startup-timeout", type=float, default=30.0)
    p.add_argument("--stop-timeout", type=float, default=60.0)
    p.add_argument("--out", type=Path, help="also write the JSON here")


def emit(report: dict, out: Path | None) -> None:
    """The report as JSON on stdout, and in `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
