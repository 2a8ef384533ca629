"""A cluster on one machine: PostgreSQL, N `triolytics serve` nodes writing one DuckLake,
and nginx in front of them (deploy/nginx-cluster.conf), all on 127.0.0.1, all in one
temporary directory, all stopped at the end (also when a start fails).

    with Cluster(nodes=3) as c:                        # start() ... stop()
        c.send_events("/v1/capture", {"type": "track", ...})       # through nginx
        c.send_events("/v1/batch", {"batch": [...]}, node=2)       # node 2 directly
        c.request("POST", "/create")                   # any request: (status, headers, body)
        c.ws_url(analytics_id)                         # ws:// through nginx (node=i: direct)
        c.query("SELECT writer, count(*) FROM events GROUP BY 1")  # rows, via a live node
        c.wait_query(sql, lambda rows: ..., timeout)   # polled until true (loads are periodic)
        c.kill(2)                                      # SIGKILL by default; any signal
        c.restart(2)                                   # same data dir, same port if it can
        c.set_routing("shard")                         # the WebSocket by shard, not by hash

Nodes are numbered 1..N (`c.node(i)`, `c.node_url(i)`). Node i is `python -m triolytics
serve --host 127.0.0.1 --port 0 --data <root>/n<i>/data` (its log: <root>/n<i>/node.log)
with `node_id` n<i>, `analytics_shard` i, the common write key `WRITE_KEY`,
`trusted_proxies` 127.0.0.1/32 (nginx), `store = "ducklake"` with its catalog in a
database `lake` of the cluster's own PostgreSQL (bench/pgserver.py; or one passed in:
then a new database per cluster) and its Parquet files in <root>/lake. The settings go in
as TRIOLYTICS_* variables (the caller's own are not passed on); `env` adds more, to every
node. A node's port is read from the `server.json` it writes (as crash_loop.bound_port
does); it is ready when `/healthz` answers 200. Node 1 starts first and makes the lake,
then the others start at once (see `stagger`).

nginx runs as this process's child (`daemon off`; its prefix, pid, logs and temp paths in
<root>/nginx; `user root` when run as root, as in tests/test_nginx.py) from
deploy/nginx-cluster.conf rendered by `render_nginx_conf`: the node lines become this
cluster's nodes and it listens on a free loopback port (`c.proxy_url`). Its access log
(`c.proxy.access_log`, the file's `triolytics_cluster` format) names the node(s) each
request went to. `restart(i)` asks for the node's old port; if the node cannot have it,
it takes a new one and nginx is reloaded with the conf rendered again.

`query` goes to a live node's `/admin/query` directly (nginx refuses /admin/), with the
admin token every node shares through the lake (`c.admin_token`).

By hand: `python bench/cluster.py --nodes 3 --dir D` starts a cluster under D, prints
one JSON line (the proxy's URL, the nodes' URLs, the admin token, the write key, ...)
and stays in the foreground until Ctrl-C or SIGTERM, then stops it all.

Bench scripts `import cluster` (bench/ is on their sys.path); tests load it with
`seed_examples.load_bench_script("cluster")`.
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _bench_module(name: str):
    """bench/<name>.py, imported once (bench scripts and tests share it)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


pgserver = _bench_module("pgserver")
HOST = "127.0.0.1"
WRITE_KEY = "wk_cluster"
LAKE_DB = "lake"
CONF = HERE.parent / "deploy" / "nginx-cluster.conf"
START_TIMEOUT_S = 60.0  # a node (store opened, journal replayed) or nginx must be up by then
STOP_TIMEOUT_S = 30.0  # SIGTERM (nodes) or SIGQUIT (nginx) to exit
POLL_S = 0.05  # how often a starting subprocess is looked at
# deploy/nginx-cluster.conf's marks (its head says what they mean)
_NODE_SERVER = re.compile(r"^(\s*server\s+)([^\s;]+)([\s;].*#\s*@node\s*)$")
_NODE_MAP = re.compile(r"^(\s*)(\d+)(\s+)([^\s;]+)(;.*#\s*@node\s*)$")
_HASH_LINE = re.compile(r"#\s*@hash\s*$")
_SHARD_PREFIX = re.compile(r"^(\s*)#shard ")
_LISTEN = re.compile(r"^\s*listen\s[^;]*;.*$")
_PORT_TAKEN = "choose another port"  # startup.open_listeners' fix for EADDRINUSE


def log(msg: str) -> None:
    print(f"[cluster] {msg}", file=sys.stderr, flush=True)


def find_nginx() -> str | None:
    """nginx on PATH, or where Debian puts it (/usr/sbin is not on a user's PATH)."""
    return shutil.which("nginx") or shutil.which(
        "nginx", path=os.pathsep.join(["/usr/sbin", "/usr/local/sbin"]))


def missing_tools() -> str | None:
    """Why a cluster cannot start here (no PostgreSQL, no nginx), or None."""
    if pgserver.find_bin() is None:
        return "PostgreSQL is not installed (no initdb; `make test-tools` installs it)"
    if find_nginx() is None:
        return "nginx is not installed (`make test-tools` installs it)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def render_nginx_conf(text: str, nodes: list[tuple[int, str]], listen: str,
                      routing: str = "hash") -> str:
    """deploy/nginx-cluster.conf for these (shard, host:port) nodes: each run of lines
    tagged `# @node` becomes one line per node (the run's first line, with the node's
    address, and in the shard map its shard), and the first `listen` becomes `listen
    <listen>;` (the others are dropped). routing="shard" first takes the file's
    alternative: the `#shard ` prefixes removed, the line tagged `# @hash` dropped."""
    if routing not in ("hash", "shard"):
        raise ValueError(f"routing is hash or shard, not {routing!r}")
    out: list[str] = []
    in_run = listened = False
    for line in text.splitlines():
        if routing == "shard":
            if _HASH_LINE.search(line):
                continue
            line = _SHARD_PREFIX.sub(r"\1", line)
        server, entry = _NODE_SERVER.match(line), _NODE_MAP.match(line)
        if server or entry:
            if not in_run:
                for shard, addr in nodes:
                    out.append(f"{server[1]}{addr}{server[3]}" if server else
                               f"{entry[1]}{shard}{entry[3]}{addr}{entry[5]}")
            in_run = True
            continue
        in_run = False
        if _LISTEN.match(line):
            if not listened:
                out.append(f"    listen {listen};")
            listened = True
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads); 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def child_pids(pid: int) -> list[int]:
    """The live children of `pid` (from /proc/<pid>/task/*/children)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None


def http_request(port: int, method: str, path: str, body: bytes | None = None,
                 headers: Mapping[str, str] | None = None, *, timeout: float = 10.0,
                 close: bool = True) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection to 127.0.0.1:`port`: (status, headers with
    lower-case names, body). `close` sends `Connection: close`, so that nginx's round
    robin sees each request on its own. (0, {}, b"") when the connection failed."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    sent = {"Connection": "close"} if close else {}
    sent.update(headers or {})
    if body is not None and not any(k.lower() == "content-type" for k in sent):
        sent["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=body, headers=sent)
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    except OSError:
        return 0, {}, b""
    finally:
        conn.close()


class ClusterError(RuntimeError):
    pass


class Node:
    """One `triolytics serve` of the cluster (see the module docstring)."""

    def __init__(self, number: int, root: Path, env: dict[str, str],
                 cpu: int | None = None) -> None:
        self.number = number
        self.node_id = f"n{number}"
        self.shard = number
        self.dir = root / self.node_id
        self.data = self.dir / "data"
        self.log_path = self.dir / "node.log"
        self.env = {**env, "TRIOLYTICS_NODE_ID": self.node_id,
                    "TRIOLYTICS_ANALYTICS_SHARD": str(number)}
        self.cpu = cpu
        self.port = 0  # the port bound by its latest start that got ready
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.failed_starts = 0  # starts that ended before the node was ready

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, port: int = 0) -> None:
        """Start the process (asking for `port`, 0: any); `wait_ready` waits for it."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        argv = [sys.executable, "-m", "triolytics", "serve", "--host", HOST,
                "--port", str(port), "--data", str(self.data)]
        if self.cpu is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(self.cpu), *argv]
        with open(self.log_path, "ab") as out:
            out.write(f"--- start {self.starts}: {' '.join(argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, env=self.env)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClusterError(f"{self.node_id} exited with {self.proc.returncode}:\n"
                                   f"{self.log_tail()}")
            if self._ready():
                return
            time.sleep(POLL_S)  # bounded polling of a real subprocess
        raise ClusterError(f"{self.node_id}: no 200 from /healthz in {timeout}s\n"
                           f"{self.log_tail()}")

    def _ready(self) -> bool:
        try:
            info = json.loads((self.data / "server.json").read_text())
        except (OSError, ValueError):
            return False
        if info.get("pid") != self.proc.pid:
            return False
        status = http_request(info["port"], "GET", "/healthz", timeout=2)[0]
        if status == 200:
            self.port = info["port"]
        return status == 200

    def signal(self, sig: int, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Send `sig`; for SIGKILL, SIGTERM, SIGINT and SIGQUIT wait for the exit and
        return its code (None: it had to be killed after `timeout`)."""
        if not self.alive:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        if sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            return _wait_exit(self.proc, timeout)
        return None

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)  # (a node stopped with SIGSTOP)
            except ProcessLookupError:
                pass
        return self.signal(signal.SIGTERM, timeout)

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid) if self.alive else 0.0

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class Proxy:
    """nginx in front of the nodes, from deploy/nginx-cluster.conf (module docstring)."""

    def __init__(self, where: Path, port: int | None = None, workers: int = 1,
                 conf: Path = CONF, routing: str = "hash") -> None:
        self.where = where
        self.routing = routing
        self.port = port or free_port()
        self.workers = workers
        self.template = conf
        self.conf = where / "nginx.conf"
        self.error_log = where / "error.log"
        self.access_log = where / "access.log"
        self.proc: subprocess.Popen | None = None
        self.nginx = find_nginx()

    def render(self, nodes: list[tuple[int, str]]) -> None:
        """Write nginx.conf for these (shard, host:port) nodes."""
        site = render_nginx_conf(self.template.read_text(), nodes, f"{HOST}:{self.port}",
                                 self.routing)
        tmp = self.where / "tmp"
        # As root nginx would run its workers as `nobody`, who cannot use our directory.
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp_paths = "".join(f"    {kind}_temp_path {tmp}/{kind};\n" for kind in
                             ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.conf.write_text(
            f"{user}worker_processes {self.workers};\n"
            "worker_rlimit_nofile 16384;\n"
            "events { worker_connections 8192; }\n"
            "http {\n"
            f"{temp_paths}"
            f"{site}\n"
            f"    access_log {self.access_log} triolytics_cluster;\n"
            "}\n")

    def start(self, nodes: list[tuple[int, str]], timeout: float = START_TIMEOUT_S) -> None:
        if self.nginx is None:
            raise ClusterError("nginx is not installed")
        (self.where / "tmp").mkdir(parents=True, exist_ok=True)
        self.render(nodes)
        self.error_log.touch()
        self.proc = subprocess.Popen(
            [self.nginx, "-p", str(self.where), "-e", str(self.error_log), "-c",
             str(self.conf), "-g",
             f"daemon off; pid {self.where}/nginx.pid; error_log {self.error_log} notice;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ClusterError(f"nginx exited with {self.proc.returncode}:\n"
                                   + self.error_log.read_text(errors="replace")[-4000:])
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(POLL_S)  # bounded polling of a real subprocess
        raise ClusterError("nginx did not listen:\n" + self.error_log.read_text()[-4000:])

    def reload(self, nodes: list[tuple[int, str]], timeout: float = 10.0) -> None:
        """Render for `nodes` and reload (SIGHUP). Back once the new workers have started
        and the old ones have exited (an old worker still accepts connections for a
        moment, with the old conf); one that still holds a WebSocket after `timeout`
        is left to finish it (it no longer accepts)."""
        before, old = self._workers_started(), set(child_pids(self.proc.pid))
        self.render(nodes)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while self._workers_started() < before + self.workers:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise ClusterError("nginx did not reload:\n"
                                   + self.error_log.read_text(errors="replace")[-4000:])
            time.sleep(POLL_S)  # bounded polling of a real subprocess
        while old & set(child_pids(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(POLL_S)  # bounded polling of a real subprocess

    def _workers_started(self) -> int:
        return self.error_log.read_text(errors="replace").count("start worker process")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGQUIT)  # graceful: workers finish their requests
        return _wait_exit(self.proc, timeout)

    def cpu_seconds(self) -> float:
        """The master's and its live workers' CPU seconds."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        pids = [self.proc.pid, *child_pids(self.proc.pid)]
        return sum(proc_cpu_seconds(p) for p in pids)


_running: set[Cluster] = set()


@atexit.register
def _stop_all() -> None:
    for cluster in list(_running):
        try:
            cluster.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


class Cluster:
    """PostgreSQL, `nodes` nodes and nginx (see the module docstring).

    root: a parent directory; the cluster's own is a new directory in it (the system
    temp directory by default), removed by stop() unless `keep`. postgres: a started
    pgserver.PostgresServer to use (a new database in it; left running), else the
    cluster starts its own (`pg_fast`: fsync off). cpus: node i runs on cpus[i-1]
    (taskset), None: anywhere. env: more TRIOLYTICS_* (or other) variables for every node.
    stagger: node 1 starts alone, and makes the lake, before the others start at once
    (nodes that start at once on an empty PostgreSQL catalog race to create DuckLake's
    tables, and all but one exit: "duplicate key value violates unique constraint
    pg_type_typname_nsp_index"); False starts them all at once. routing: how nginx
    sends the WebSocket to a node, `hash` or `shard` (see render_nginx_conf).
    """

    def __init__(self, nodes: int = 3, root: Path | None = None, *,
                 env: Mapping[str, str] | None = None, postgres=None, pg_fast: bool = True,
                 cpus: list[int | None] | None = None, nginx_workers: int = 1,
                 keep: bool = False, stagger: bool = True, routing: str = "hash") -> None:
        if nodes < 1:
            raise ValueError("a cluster has at least one node")
        self.n = nodes
        self.parent = Path(root) if root is not None else Path(tempfile.gettempdir())
        self.extra_env = dict(env or {})
        self.pg_fast = pg_fast
        self.cpus = cpus
        self.nginx_workers = nginx_workers
        self.keep = keep
        self.stagger = stagger
        self.routing = routing
        self.pg = postgres
        self._own_pg = postgres is None
        self.root: Path | None = None
        self.nodes: list[Node] = []
        self.proxy: Proxy | None = None
        self.catalog = ""
        self.lake_path: Path | None = None

    # -- life ---------------------------------------------------------------------
    def start(self) -> Cluster:
        _running.add(self)
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self.root = Path(tempfile.mkdtemp(prefix="triolytics-cluster-", dir=self.parent))
            self._start_postgres()
            self.lake_path = self.root / "lake"
            self.lake_path.mkdir()
            env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOLYTICS_")}
            env.update({
                "PYTHONUNBUFFERED": "1",
                "TRIOLYTICS_STORE": "ducklake",
                "TRIOLYTICS_DUCKLAKE_CATALOG": self.catalog,
                "TRIOLYTICS_DUCKLAKE_DATA_PATH": str(self.lake_path),
                "TRIOLYTICS_WRITE_KEYS": WRITE_KEY,
                "TRIOLYTICS_TRUSTED_PROXIES": f"{HOST}/32",
            })
            env.update(self.extra_env)
            cpus = self.cpus or [None] * self.n
            self.nodes = [Node(i, self.root, env, cpus[i - 1]) for i in range(1, self.n + 1)]
            began = time.monotonic()
            first, rest = self.nodes[:1], self.nodes[1:]
            for group in ([first, rest] if self.stagger else [self.nodes]):
                for node in group:
                    node.spawn()
                for node in group:
                    node.wait_ready()
            log(f"{self.n} node(s) ready in {time.monotonic() - began:.1f}s: "
                + ", ".join(f"{n.node_id}={n.port}" for n in self.nodes))
            self.proxy = Proxy(self.root / "nginx", workers=self.nginx_workers,
                               routing=self.routing)
            self.proxy.start(self.upstreams())
        except BaseException:
            self.stop()
            raise
        return self

    def _start_postgres(self) -> None:
        if self._own_pg:
            self.pg = pgserver.PostgresServer(self.root / "pg", fast=self.pg_fast)
            self.pg.start()
            self.catalog = self.pg.create_database(LAKE_DB)
        else:
            self.catalog = self.pg.create_database(f"{LAKE_DB}_{self.root.name[-8:]}".lower())

    def stop(self) -> dict:
        """nginx, then the nodes (SIGTERM: each loads what its journal holds), then
        PostgreSQL, then the directory. Every step runs whatever failed before; returns
        the exit codes ({"nginx": c, "n1": c, ...}). Idempotent."""
        codes: dict[str, int | None] = {}
        try:
            if self.proxy is not None:
                codes["nginx"] = self.proxy.stop()
        finally:
            try:
                for node in self.nodes:
                    try:
                        codes[node.node_id] = node.stop()
                    except Exception as exc:  # noqa: BLE001 - the others still stop
                        log(f"{node.node_id} did not stop: {exc}")
            finally:
                try:
                    if self._own_pg and self.pg is not None:
                        self.pg.stop()
                finally:
                    if self.root is not None and not self.keep:
                        shutil.rmtree(self.root, ignore_errors=True)
                    _running.discard(self)
        return codes

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- nodes --------------------------------------------------------------------
    def node(self, number: int) -> Node:
        if not 1 <= number <= self.n:
            raise IndexError(f"nodes are numbered 1..{self.n}, not {number}")
        return self.nodes[number - 1]

    def upstreams(self) -> list[tuple[int, str]]:
        """(analytics_shard, host:port) of every node, for nginx."""
        return [(node.shard, f"{HOST}:{node.port}") for node in self.nodes]

    def node_url(self, number: int) -> str:
        return self.node(number).url

    @property
    def proxy_url(self) -> str:
        return f"http://{HOST}:{self.proxy.port}"

    def ws_url(self, analytics_id: str, node: int | None = None) -> str:
        """The WebSocket's URL through nginx, or at node `node` directly."""
        port = self.proxy.port if node is None else self.node(node).port
        return f"ws://{HOST}:{port}/analytics?analytics_id={analytics_id}"

    def kill(self, number: int, sig: int = signal.SIGKILL) -> int | None:
        """Send `sig` to node `number` (see Node.signal); nginx keeps it listed."""
        return self.node(number).signal(sig)

    def restart(self, number: int, timeout: float = START_TIMEOUT_S, *, attempts: int = 1,
                pause_s: float = 2.0) -> None:
        """Stop node `number` if it runs (SIGTERM), start it again on the same data
        directory, asking for its old port; if it cannot have it, on any port, and
        nginx is reloaded with the new one. A start that fails otherwise is tried again
        after `pause_s`, up to `attempts` starts in all (as systemd's Restart=on-failure
        would; `node.failed_starts` counts them)."""
        node = self.node(number)
        node.stop()
        old = port = node.port
        failures = 0
        while True:
            node.spawn(port)
            try:
                node.wait_ready(timeout)
                break
            except ClusterError as exc:
                node.stop()
                node.failed_starts += 1
                if port and _PORT_TAKEN in node.log_tail(600):
                    log(f"{node.node_id}: port {port} is taken; starting it on another")
                    port = 0
                    continue
                failures += 1
                if failures >= attempts:
                    raise
                log(f"{node.node_id}: start {node.starts} failed; again in {pause_s}s: "
                    f"{str(exc).splitlines()[-1][:300]}")
                time.sleep(pause_s)
        if node.port != old:
            self.proxy.reload(self.upstreams())

    def set_routing(self, routing: str) -> None:
        """Route the WebSocket by `hash` (the shipped default) or by `shard` (the
        file's alternative): nginx.conf rendered again and reloaded."""
        self.routing = self.proxy.routing = routing
        self.proxy.reload(self.upstreams())

    # -- requests -----------------------------------------------------------------
    @property
    def admin_token(self) -> str:
        """The admin token every node shares (each data dir holds a copy)."""
        for node in self.nodes:
            try:
                return (node.data / "admin.token").read_text().strip()
            except OSError:
                continue
        raise ClusterError("no node has written admin.token")

    @property
    def write_key(self) -> str:
        return WRITE_KEY

    def request(self, method: str, path: str, body: bytes | dict | list | None = None,
                headers: Mapping[str, str] | None = None, *, node: int | None = None,
                timeout: float = 10.0, close: bool = True) -> tuple[int, dict, bytes]:
        """One request through nginx, or to node `node` directly (see http_request);
        a dict or list body is sent as JSON."""
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
        port = self.proxy.port if node is None else self.node(node).port
        return http_request(port, method, path, body, headers, timeout=timeout, close=close)

    def send_events(self, path: str, body: bytes | dict, *, node: int | None = None,
                    timeout: float = 10.0) -> tuple[int, bytes]:
        """POST an event body (bytes as they are, a dict as JSON) with the write key,
        through nginx or to node `node`: (status, body)."""
        status, _, reply = self.request("POST", path, body, {"x-write-key": WRITE_KEY},
                                        node=node, timeout=timeout)
        return status, reply

    def query(self, sql: str, max_rows: int | None = None, timeout: float = 30.0) -> list:
        """The rows of `sql` from `/admin/query` of the first live node."""
        body: dict = {"sql": sql}
        if max_rows is not None:
            body["max_rows"] = max_rows
        for node in self.nodes:
            if not node.alive or not node.port:
                continue
            status, _, reply = self.request(
                "POST", "/admin/query", body, {"Authorization": f"Bearer {self.admin_token}"},
                node=node.number, timeout=timeout)
            if status == 200:
                return json.loads(reply)["rows"]
            if status != 0:
                raise ClusterError(f"{node.node_id}: /admin/query answered {status}: "
                                   f"{reply[:500]!r}")
        raise ClusterError("no live node answered /admin/query")

    def wait_query(self, sql: str, done: Callable[[list], bool], timeout: float = 15.0,
                   max_rows: int | None = None) -> list:
        """Run `sql` until `done(rows)` (loads run every load_interval_ms) or `timeout`
        has passed; the last rows either way."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.query(sql, max_rows)
            if done(rows) or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)  # bounded polling: loads run every second

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of each live node, of nginx and of PostgreSQL (the
        postmaster and its children), by name."""
        out = {node.node_id: node.cpu_seconds() for node in self.nodes}
        out["nginx"] = self.proxy.cpu_seconds() if self.proxy else 0.0
        pg_pid = getattr(self.pg, "pid", None)
        out["postgres"] = (proc_cpu_seconds(pg_pid) + sum(
            proc_cpu_seconds(p) for p in child_pids(pg_pid))) if pg_pid else 0.0
        return out

    def info(self) -> dict:
        return {
            "proxy_url": self.proxy_url,
            "nodes": [{"node_id": n.node_id, "url": n.url, "shard": n.shard,
                       "pid": n.proc.pid, "data": str(n.data), "log": str(n.log_path)}
                      for n in self.nodes],
            "admin_token": self.admin_token,
            "write_key": self.write_key,
            "ducklake_catalog": self.catalog,
            "ducklake_data_path": str(self.lake_path),
            "routing": self.routing,
            "nginx_conf": str(self.proxy.conf),
            "nginx_access_log": str(self.proxy.access_log),
            "root": str(self.root),
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Start PostgreSQL, N triolytics nodes on one DuckLake and nginx in "
                    "front, on 127.0.0.1; print them as JSON; stop on Ctrl-C or SIGTERM.")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None,
                   help="parent of the cluster's directory (default: the temp directory)")
    p.add_argument("--keep", action="store_true", help="keep the directory afterwards")
    p.add_argument("--pg-fsync", action="store_true",
                   help="PostgreSQL with fsync on (default off: a throwaway lake)")
    p.add_argument("--nginx-workers", type=int, default=1)
    p.add_argument("--routing", choices=("hash", "shard"), default="hash",
                   help="the WebSocket by a hash of the analytics_id (the shipped "
                        "default) or by its shard (the file's alternative)")
    args = p.parse_args(argv)

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    cluster = Cluster(args.nodes, args.dir, pg_fast=not args.pg_fsync, keep=args.keep,
                      nginx_workers=args.nginx_workers, routing=args.routing)
    try:
        cluster.start()
        print(json.dumps(cluster.info()), flush=True)
        log("running; Ctrl-C stops it")
        while all(n.alive for n in cluster.nodes) and cluster.proxy.proc.poll() is None:
            time.sleep(1)
        log("a node or nginx exited on its own")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        log(f"stopped: {cluster.stop()}")


if __name__ == "__main__":
    sys.exit(main())
