"""A real, throwaway PostgreSQL on loopback, for tests and benchmarks (standard library only).

    server = PostgresServer(Path("/tmp/somewhere"), fast=True)
    with server:                      # start() ... stop()
        dsn = server.create_database("lake")   # "host=127.0.0.1 port=N user=postgres dbname=lake"
        print(server.psql("select 1"))

What runs:

- `initdb -U postgres --auth=trust -E UTF8 --locale=C --no-sync` into `<dir>/data`, then
  the settings below appended to its postgresql.conf, then `pg_ctl start -w` (30 s).
  initdb runs once per process (about 1 s): into a template directory in the system temp
  directory, removed at exit; every server copies that never-started cluster.
- `listen_addresses = '127.0.0.1'` (nothing listens anywhere else), `port` = the given one
  or a free one (a port-0 bind; picked again, at most 3 tries, if another process takes
  it first), `unix_socket_directories` = `<dir>` (none when that path is too long for a
  socket address), `lc_messages = 'C'`: server messages are in English, which DuckLake
  needs (it tells retryable errors by their text). `fsync = on` by default; `fast=True`
  sets fsync, synchronous_commit and full_page_writes off (tests: no crash safety).
  Authentication is `trust`: any local user may connect as the superuser `postgres`, which
  is what a throwaway server on loopback is for, and all it is for.
- `stop()`: `pg_ctl stop -m fast`, then `-m immediate`, then SIGKILL; idempotent. A start
  that fails stops what it started and removes `<dir>`; servers still running when the
  interpreter exits are stopped (atexit).

Directories. `root` is a parent: each server gets its own `<dir>` =
`root/triolytics-pg-XXXXXXXX` (`tempfile.mkdtemp`), which holds `data/`, the socket and
`postgres.log`. `stop()` removes `<dir>` unless `keep=True`.

Running as root. PostgreSQL refuses to run as root, so when `os.geteuid() == 0` initdb,
pg_ctl and postgres run as `nobody:nogroup` (uid/gid 65534 when those names are missing)
through `setpriv --reuid=U --regid=G --clear-groups`, and `<dir>` is chowned to that user.
`<dir>`'s parent must be enterable by that user: when `root` is not (say pytest's
`tmp_path`, under a 0700 root-owned /tmp/pytest-of-root), `<dir>` is made in the system
temp directory instead (`server.dir` says where). psql runs as the caller, over TCP.

Binaries: `find_bin()` — the directory of the `initdb` on PATH (symlinks resolved), else
the newest `/usr/lib/postgresql/*/bin`; None without PostgreSQL (`make test-tools`
installs Debian's `postgresql`). psql is taken from that directory, else from PATH.

By hand (docs/scaling.md): `python bench/pgserver.py --dir D [--port P] [--fast] [--keep]`
starts one, prints `{"dsn": ..., "url": ..., ...}` as one JSON line, and stays in the
foreground until Ctrl-C or SIGTERM, then stops it.

Bench scripts `import pgserver` (bench/ is on their sys.path); tests load it by path with
`seed_examples.load_bench_script("pgserver")`, or take tests/conftest.py's session-scoped
`postgres` fixture (a started `fast=True` server).
"""

from __future__ import annotations

import argparse
import atexit
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HOST = "127.0.0.1"
USER = "postgres"
START_TIMEOUT_S = 30
STOP_TIMEOUT_S = 30
PORT_TRIES = 3  # a picked port another process bound before postgres did: pick again
SOCKET_PATH_MAX = 107  # sun_path is 108 bytes, NUL included
_TOOLS = ("initdb", "pg_ctl", "postgres")


def find_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres: that of the initdb on PATH
    (resolved through symlinks, so psql of the same version sits next to it), else the
    newest /usr/lib/postgresql/<version>/bin; None when there is none."""
    candidates: list[Path] = []
    found = shutil.which("initdb")
    if found:
        candidates += [Path(os.path.realpath(found)).parent, Path(found).parent]

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for directory in candidates:
        if all(os.access(directory / tool, os.X_OK) for tool in _TOOLS):
            return directory
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def conninfo_value(value: str) -> str:
    """`value` as a libpq keyword/value connection string writes it."""
    if value and not re.search(r"[\s'\\]", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _conf_value(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def _unprivileged_ids() -> tuple[int, int]:
    """nobody:nogroup (nobody's group where there is no nogroup), else 65534:65534."""
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        uid = 65534
    for group in ("nogroup", "nobody"):
        try:
            return uid, grp.getgrnam(group).gr_gid
        except KeyError:
            pass
    return uid, 65534


def _enterable(path: Path, uid: int, gid: int) -> bool:
    """Whether a process with only `uid` and `gid` (no supplementary groups) can reach
    entries of `path`: search permission on it and on every directory above it."""
    path = path.resolve()
    for directory in (path, *path.parents):
        st = directory.stat()
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


_running: set[PostgresServer] = set()
# (bin dir, uid, gid) -> a directory whose data/ is a cluster initdb made and no server
# ever ran; servers copy it (one initdb per process, not one per server).
_templates: dict[tuple[Path, int, int], Path] = {}
_templates_lock = threading.Lock()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
    for template in _templates.values():
        shutil.rmtree(template, ignore_errors=True)


class PostgresServer:
    """One PostgreSQL server on 127.0.0.1 in its own directory under `root` (see the
    module docstring). A context manager: `with PostgresServer(root) as pg: ...`."""

    def __init__(self, root: Path, port: int | None = None, *, fast: bool = False,
                 keep: bool = False, bin_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.requested_port = port
        self.port: int | None = port
        self.fast = fast
        self.keep = keep
        self.bin_dir = Path(bin_dir) if bin_dir else find_bin()
        self.dir: Path | None = None  # root/triolytics-pg-XXXXXXXX, made by start()
        self.pid: int | None = None
        self._as_root = os.geteuid() == 0
        self._ids = _unprivileged_ids() if self._as_root else (os.geteuid(), os.getegid())

    # -- paths and connection strings ------------------------------------------------
    @property
    def data_dir(self) -> Path:
        if self.dir is None:
            raise RuntimeError("the server has not been started")
        return self.dir / "data"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / "postgres.log"

    def dsn_for(self, dbname: str) -> str:
        return (f"host={HOST} port={self.port} user={USER} "
                f"dbname={conninfo_value(dbname)}")

    @property
    def dsn(self) -> str:
        """`host=127.0.0.1 port=N user=postgres dbname=postgres` (libpq keyword/value)."""
        return self.dsn_for("postgres")

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@{HOST}:{self.port}/postgres"

    # -- processes ------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        # No PG* variable of the caller's (PGHOST, PGDATA, PGOPTIONS...) reaches our
        # tools; messages in English.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _server_cmd(self, tool: str, *args: str) -> list[str]:
        cmd = [str(self.bin_dir / tool), *args]
        if self._as_root:
            uid, gid = self._ids
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                raise RuntimeError("running as root, PostgreSQL must run as another user: "
                                   "setpriv (util-linux) is not installed")
            cmd = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *cmd]
        return cmd

    def _run(self, cmd: list[str], timeout: float, check: bool = True,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(cmd, cwd=cwd or self.dir, env=self._env(), capture_output=True,
                                text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {result.returncode}:\n"
                               f"{result.stdout}{result.stderr}{self._log_tail()}")
        return result

    def _log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, RuntimeError):
            return ""
        return "\n--- postgres.log ---\n" + "\n".join(text.splitlines()[-lines:])

    def psql_bin(self) -> str:
        local = self.bin_dir / "psql" if self.bin_dir else None
        if local and os.access(local, os.X_OK):
            return str(local)
        found = shutil.which("psql")
        if found is None:
            raise RuntimeError("psql not found (next to initdb or on PATH)")
        return found

    def psql(self, sql: str, dbname: str = "postgres", timeout: float = 30) -> str:
        """Run `sql` with psql (`-v ON_ERROR_STOP=1`, unaligned, tuples only) as the
        caller, over TCP; its stdout."""
        if self.pid is None:
            raise RuntimeError("the server is not running")
        cmd = [self.psql_bin(), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
               "-h", HOST, "-p", str(self.port), "-U", USER, "-d", dbname, "-c", sql]
        result = subprocess.run(cmd, env=self._env(), capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"psql exited with {result.returncode}: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; its dsn."""
        self.psql(f"CREATE DATABASE {quote_ident(name)}")
        return self.dsn_for(name)

    # -- life -------------------------------------------------------------------------
    def _make_dir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        uid, gid = self._ids
        parent = self.root
        if self._as_root and not _enterable(parent, uid, gid):
            parent = Path(tempfile.gettempdir())
        made = Path(tempfile.mkdtemp(prefix="triolytics-pg-", dir=parent))
        if self._as_root:
            os.chown(made, uid, gid)
        return made

    def _template(self) -> Path:
        """The data directory of this process's initdb'd cluster (made on first use)."""
        key = (self.bin_dir, *self._ids)
        with _templates_lock:
            if key not in _templates:
                made = Path(tempfile.mkdtemp(prefix="triolytics-pg-template-"))
                try:
                    if self._as_root:
                        os.chown(made, *self._ids)
                    self._run(self._server_cmd(
                        "initdb", "-D", str(made / "data"), "-U", USER, "--auth=trust",
                        "-E", "UTF8", "--locale=C", "--no-sync"), timeout=120, cwd=made)
                except BaseException:
                    shutil.rmtree(made, ignore_errors=True)
                    raise
                _templates[key] = made
            return _templates[key] / "data"

    def _copy_template(self) -> None:
        shutil.copytree(self._template(), self.data_dir, symlinks=True)
        if self._as_root:  # copies are the copier's: give them to the server's user
            uid, gid = self._ids
            for top, dirs, files in os.walk(self.data_dir):
                os.chown(top, uid, gid)
                for name in files + dirs:
                    os.lchown(os.path.join(top, name), uid, gid)

    def _settings(self, port: int) -> dict[str, str | int]:
        socket_dir = str(self.dir)
        if len(f"{socket_dir}/.s.PGSQL.{port}") > SOCKET_PATH_MAX:
            socket_dir = ""  # too long for a socket address: TCP only
        settings: dict[str, str | int] = {
            "listen_addresses": HOST,
            "port": port,
            "unix_socket_directories": socket_dir,
            "lc_messages": "C",
            "fsync": "on",
        }
        if self.fast:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        return settings

    def start(self) -> PostgresServer:
        if self.pid is not None:
            return self
        if self.bin_dir is None:
            raise RuntimeError("PostgreSQL not found (initdb on PATH or "
                               "/usr/lib/postgresql/*/bin); `make test-tools` installs it")
        _running.add(self)
        try:
            self.dir = self._make_dir()
            self._copy_template()
            conf = self.data_dir / "postgresql.conf"
            base = conf.read_text()
            for attempt in range(1, PORT_TRIES + 1):
                port = self.requested_port or free_port()
                lines = [f"{k} = {_conf_value(v)}" for k, v in self._settings(port).items()]
                conf.write_text(base + "\n# bench/pgserver.py\n" + "\n".join(lines) + "\n")
                result = self._run(self._server_cmd(
                    "pg_ctl", "start", "-D", str(self.data_dir), "-l", str(self.log_path),
                    "-w", "-t", str(START_TIMEOUT_S)), timeout=START_TIMEOUT_S + 10,
                    check=False)
                if result.returncode == 0:
                    self.port = port
                    break
                tail = self._log_tail()
                if (self.requested_port is None and attempt < PORT_TRIES
                        and "Address already in use" in tail and not self._postmaster_pid()):
                    self.log_path.unlink(missing_ok=True)
                    continue
                raise RuntimeError(f"pg_ctl start exited with {result.returncode}:\n"
                                   f"{result.stdout}{result.stderr}{tail}")
            self.pid = self._postmaster_pid()
            if self.pid is None:
                raise RuntimeError("postgres started but wrote no postmaster.pid"
                                   + self._log_tail())
        except BaseException:
            self.port = self.requested_port
            self._force_stop()
            raise
        return self

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError, RuntimeError):
            return None

    def running(self) -> bool:
        return self.pid is not None and _pid_alive(self.pid)

    def stop(self) -> None:
        """Stop the server (fast shutdown; immediate, then SIGKILL, if that fails) and,
        unless `keep`, remove its directory. Idempotent."""
        self._force_stop()

    def _force_stop(self) -> None:
        try:
            if self.dir is not None and self.data_dir.exists():
                pid = self.pid or self._postmaster_pid()
                if pid is not None and _pid_alive(pid):
                    for mode in ("fast", "immediate"):
                        result = self._run(self._server_cmd(
                            "pg_ctl", "stop", "-D", str(self.data_dir), "-m", mode,
                            "-w", "-t", str(STOP_TIMEOUT_S)), timeout=STOP_TIMEOUT_S + 10,
                            check=False)
                        if result.returncode == 0 or not _pid_alive(pid):
                            break
                    if _pid_alive(pid):
                        os.kill(pid, signal.SIGKILL)
                        deadline = time.monotonic() + STOP_TIMEOUT_S
                        while _pid_alive(pid) and time.monotonic() < deadline:
                            time.sleep(0.05)
            self.pid = None
            if self.dir is not None and not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)
        finally:
            _running.discard(self)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def info(self) -> dict[str, object]:
        return {"dsn": self.dsn, "url": self.url, "port": self.port, "pid": self.pid,
                "dir": str(self.dir), "data": str(self.data_dir), "log": str(self.log_path),
                "bin": str(self.bin_dir), "fsync": not self.fast}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start a throwaway PostgreSQL on 127.0.0.1; print its dsn as JSON; "
                    "stop it on Ctrl-C or SIGTERM.")
    parser.add_argument("--dir", type=Path, required=True,
                        help="parent of the server's own directory (triolytics-pg-*)")
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--fast", action="store_true",
                        help="fsync, synchronous_commit and full_page_writes off")
    parser.add_argument("--keep", action="store_true",
                        help="keep the server's directory after it stops")
    args = parser.parse_args(argv)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    server = PostgresServer(args.dir, args.port, fast=args.fast, keep=args.keep)
    try:
        server.start()
        print(json.dumps(server.info()), flush=True)
        print("running; Ctrl-C stops it", file=sys.stderr, flush=True)
        while server.running():
            time.sleep(1)
        print("postgres exited on its own" + server._log_tail(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
