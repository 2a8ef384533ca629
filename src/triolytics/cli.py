"""The `triolytics` command: `serve`, `keys create|list|revoke`, `query SQL` and `forget`.

Rules:
- Each setting a user sets often is a `serve` flag (SERVE_FLAGS) named for its setting;
  flags go to `load_config` as its top layer (flag > TRIOLYTICS_* > config file), and
  `--help` shows the defaults of `Config` itself. A value a flag cannot take is an
  argparse error (exit 2); a bad setting from any layer is one line (exit 2).
- A start-up fault (server/startup.py) is one line on stderr and exit 1; anything else
  keeps its traceback.
- `keys` and `query` talk to the running server when there is one (the server alone may
  open the DuckDB file); otherwise they open the file themselves.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import sys
import typing
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from functools import partial
from pathlib import Path

import trio

from triolytics.core.config import (
    ENV_PREFIX,
    FIELDS,
    LOG_LEVELS,
    Config,
    ConfigError,
    load_config,
)
from triolytics.core.units import parse_duration, parse_size
from triolytics.server.startup import StartupError, load_serve, startup_error

DEFAULTS = Config()
# `serve` flags: (flag, setting, metavar, what it does). Each flag's type, unit and shown
# default follow its setting (its name's suffix and its default in Config).
SERVE_FLAGS = (
    ("--host", "host", "ADDR", "address to listen on; 0.0.0.0 for every IPv4 interface"),
    ("--port", "port", "PORT", "TCP port; 0 picks a free one"),
    ("--write-key", "write_keys", "KEY", "register this write key for project 'default'; "
     "repeatable or comma-separated"),
    ("--fsync", "fsync", None, "always: sync the journal before each ack; interval: every "
     "--fsync-interval; off: never"),
    ("--fsync-interval", "fsync_interval_ms", "DURATION", "sync period with --fsync "
     "interval: plain milliseconds or with a unit (100ms, 0.5s)"),
    ("--session-timeout", "session_timeout_s", "DURATION", "a session ends after this long "
     "without an event: plain seconds (5, 1.5) or with a unit (90s, 30m, 1h)"),
    ("--max-body", "max_request_bytes", "SIZE", "largest HTTP request body as sent (413 "
     "past it): plain bytes or with a unit (512KiB, 1MiB, 500KB)"),
    ("--cors-origins", "cors_origins", "ORIGINS", "origins browsers may call from, "
     "comma-separated or repeated; * allows any"),
    ("--ws-origins", "ws_origins", "ORIGINS", "origins allowed to open the WebSocket, "
     "comma-separated or repeated; none given allows any"),
    ("--trusted-proxies", "trusted_proxies", "ADDRS", "peers (IPs or CIDRs) whose "
     "X-Forwarded-For is believed, comma-separated or repeated"),
    ("--max-connections", "max_connections", "N", "open connections at once"),
    ("--shutdown-grace", "shutdown_grace_s", "DURATION", "on SIGINT/SIGTERM, in-flight "
     "requests get this long: plain seconds or with a unit (10s, 1m)"),
    ("--log-level", "log_level", None, "log messages of this level and above (to stderr)"),
    ("--ip-mode", "ip_mode", None, "client IPs stored: full, truncate (IPv4 /24, IPv6 "
     "/48) or drop (none)"),
    ("--metrics-listen", "metrics_listen", "HOST:PORT", "serve GET /metrics on this "
     "address only (e.g. 127.0.0.1:9464; no token there unless metrics_token is set)"),
    ("--workers", "workers", "N", "server processes sharing --port, each a writer of the "
     "lake; auto: one per CPU; more than 1 needs store = \"ducklake\" with a PostgreSQL "
     "catalog (docs/scaling.md)"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triolytics", description=__doc__.splitlines()[0])
    _file_flags(p, None)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server", description=(
        "Run the server. A flag beats its TRIOLYTICS_* variable, which beats the config "
        "file, which beats the default (docs/configuration.md lists every setting)."))
    _file_flags(s, argparse.SUPPRESS)
    for flag, name, metavar, text in SERVE_FLAGS:
        _serve_flag(s, flag, name, metavar, text)
    k = sub.add_parser("keys", help="manage write keys")
    ks = k.add_subparsers(dest="action", required=True)
    kc = ks.add_parser("create", help="create a write key for a project")
    kc.add_argument("project")
    kc.add_argument("--key", help="use this key instead of a random one")
    ks.add_parser("list", help="list write keys")
    kr = ks.add_parser("revoke", help="revoke a write key")
    kr.add_argument("key")
    for sp in (kc, kr, ks.choices["list"]):
        _file_flags(sp, argparse.SUPPRESS)
    q = sub.add_parser("query", help="run one read-only SQL statement on the stored events")
    q.add_argument("sql", help="e.g. \"SELECT type, count(*) FROM events GROUP BY ALL\"")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--max-rows", type=int, help="at most this many rows (max_query_rows)")
    _file_flags(q, argparse.SUPPRESS)
    e = sub.add_parser("export", help="write the stored events to files, one per day",
                       description=(
        "Write the stored events to DIR/dt=YYYY-MM-DD/part-0.<format> and DIR/_manifest.json, "
        "atomically (DIR appears whole or not at all). Through the running server if there "
        "is one (it writes the files), else from the DuckDB file."))
    e.add_argument("--to", required=True, metavar="DIR", help="a directory not there yet")
    e.add_argument("--format", default="parquet", choices=["parquet", "csv", "json"])
    e.add_argument("--since", help="events at or after this date or ISO 8601 time")
    e.add_argument("--until", help="events before this date or ISO 8601 time")
    e.add_argument("--project", help="only this project's events")
    _file_flags(e, argparse.SUPPRESS)
    f = sub.add_parser("forget", help="delete one person's stored events (docs/privacy.md)")
    who = f.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="ID", help="the events with this userId")
    who.add_argument("--anonymous-id", metavar="ID", help="the events with this anonymousId")
    who.add_argument("--analytics-id", metavar="ID", help="a WebSocket device's events and "
                     "its analytics_id record")
    f.add_argument("--project", help="only in this project (default: every project)")
    _file_flags(f, argparse.SUPPRESS)
    return p


def _file_flags(p: argparse.ArgumentParser, default) -> None:
    """--config and --data, accepted before the command and after it (a value given after
    it wins; SUPPRESS keeps a subcommand from resetting one given before)."""
    p.add_argument("--config", default=default, metavar="FILE",
                   help=f"TOML config file (or {ENV_PREFIX}CONFIG; default: none)")
    p.add_argument("--data", dest="data_dir", default=default, metavar="DIR",
                   help=f"data directory (data_dir; default: {DEFAULTS.data_dir})")


def _serve_flag(p: argparse.ArgumentParser, flag: str, name: str, metavar: str | None,
                text: str) -> None:
    default = getattr(DEFAULTS, name)
    kwargs: dict[str, typing.Any] = {"dest": name, "metavar": metavar,
                                     "help": f"{text} ({name}; default: {_shown(name)})"}
    if isinstance(default, list):
        kwargs.update(action="extend", type=_comma_list)
    elif name == "log_level":
        kwargs.update(type=str.lower, choices=LOG_LEVELS)
    elif name in ("fsync", "ip_mode"):
        kwargs.update(choices=typing.get_args(typing.get_type_hints(Config)[name]))
    else:
        kwargs["type"] = _flag_type(name)
    p.add_argument(flag, **kwargs)


def _shown(name: str) -> str:
    """A setting's default as `--help` shows it, with its unit."""
    value = getattr(DEFAULTS, name)
    if isinstance(value, list):
        return ",".join(value) or "none"
    if name.endswith("_bytes"):
        return f"{value} bytes" + (f" = {value // 1024} KiB" if value % 1024 == 0 else "")
    if name.endswith("_ms"):
        return f"{value} ms"
    if name.endswith("_s"):
        return f"{value:g} s"
    return str(value)


def _flag_type(name: str) -> Callable[[str], typing.Any]:
    """The parser of a flag's text: a duration or size in the setting's unit, a count, or
    the text itself."""
    whole = isinstance(getattr(DEFAULTS, name), int)
    if name.endswith("_bytes"):
        return partial(_quantity, parse_size, "bytes", whole)
    if name.endswith(("_s", "_ms")):
        unit = "ms" if name.endswith("_ms") else "s"
        return partial(_quantity, partial(parse_duration, unit=unit), unit, whole)
    if name == "port":
        return _port
    if name == "workers":
        return _workers
    if whole:
        return partial(_quantity, _plain_number, "", whole)
    return str


def _quantity(parse: Callable, unit: str, whole: bool, text: str) -> int | float:
    try:
        value = parse(text)
    except (ValueError, ArithmeticError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text!r}")
    if whole and value != value.to_integral_value():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number{' of ' + unit if unit else ''}")
    return int(value) if whole else float(value)


def _plain_number(text: str) -> Decimal:
    try:
        return Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None


def _port(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port (0 to 65535): {text!r}")
    return int(text)


def _workers(text: str) -> int | str:
    if text.strip().lower() == "auto":
        return "auto"
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a number of workers (1 or more, or auto): "
                                         f"{text!r}")
    return int(text)


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def config_of(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Config:
    """Defaults < config file < `TRIOLYTICS_*` variables < the flags given."""
    path = args.config or environ.get(ENV_PREFIX + "CONFIG")
    try:
        text = Path(path).read_text() if path else None
    except OSError as exc:
        raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
    flags = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None)
             is not None}
    return load_config(text, environ, flags)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = config_of(args)
    except ConfigError as exc:
        print(f"triolytics: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return _serve(config)
    if args.command == "query":
        return _query(args, config)
    if args.command == "export":
        return _export(args, config)
    if args.command == "forget":
        return _forget(args, config)
    return _keys(args, config)


def _serve(config: Config) -> int:
    """Run until stopped (more than one worker: their supervisor); a start-up fault is one
    line on stderr and exit status 1."""
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if config.worker_count() > 1:  # (a supervisor: server/workers.py)
            from triolytics.server.workers import supervise
            return supervise(config)
        serve = load_serve()
        trio.run(partial(serve, config, handle_signals=True))
    except (StartupError, BaseExceptionGroup) as exc:
        fault = startup_error(exc)
        if fault is None:
            raise  # a bug, not a fault of the setup: keep its traceback
        print(f"triolytics: {fault}", file=sys.stderr)
        return 1
    return 0


def _query(args: argparse.Namespace, config: Config) -> int:
    """Print the answer, or one line on stderr and exit 1 for a query that was refused,
    failed or timed out (its error code in brackets); nothing on stdout then."""
    data = Path(config.data_dir)
    limit = min(args.max_rows or config.max_query_rows, config.max_query_rows)
    server = _running_server(data)
    if server is not None:  # (its own query_timeout_s applies; we wait a little longer)
        reply = _ask(server, data, "/admin/query", {"sql": args.sql, "max_rows": limit},
                     timeout=config.query_timeout_s + 10)
        if reply is None:
            return 1
    else:
        from triolytics.server.api import encode_result
        from triolytics.storage.query import QueryError
        store = _read_only_store(data, config)
        if store is None:
            return 1
        try:
            reply = json.loads(encode_result(store.query(
                args.sql, limit, timeout_s=config.query_timeout_s)))
        except QueryError as exc:
            print(f"triolytics: {exc.message} [{exc.code}]", file=sys.stderr)
            return 1
        finally:
            store.close()
    if args.json:
        print(json.dumps(reply))
        return 0
    print("\t".join(reply["columns"]))
    for row in reply["rows"]:
        print("\t".join("" if v is None else v if isinstance(v, str) else json.dumps(v)
                        for v in row))
    if reply["truncated"]:
        print(f"(first {limit} rows)", file=sys.stderr)
    return 0


def _export(args: argparse.Namespace, config: Config) -> int:
    """Print where the export went and its size; one line on stderr and exit 1 when it
    cannot be made (nothing is left behind then)."""
    data = Path(config.data_dir)
    to = str(Path(args.to).absolute())
    filters = {"format": args.format, "since": args.since, "until": args.until,
               "project": args.project}
    server = _running_server(data)
    if server is not None:
        reply = _ask(server, data, "/admin/export", {"to": to, **filters}, timeout=24 * 3600)
        if reply is None:
            return 1
    else:
        from triolytics.storage.export import ExportError, export, to_json
        store = _read_only_store(data, config)
        if store is None:
            return 1
        shown = sys.stderr.isatty()
        try:
            reply = to_json(export(store.cursor(), to, fmt=filters["format"],
                                   since=args.since, until=args.until, project=args.project,
                                   progress=_progress if shown else None))
        except ExportError as exc:
            print(f"triolytics: {exc}", file=sys.stderr)
            return 1
        finally:
            store.close()
            if shown:
                print(file=sys.stderr)
    size = sum(f["bytes"] for f in reply["files"])
    print(f"exported {reply['rows']} events in {len(reply['files'])} files "
          f"({size} bytes) to {to}")
    return 0


def _progress(done: int, days: int, day: str, rows: int) -> None:
    width = 30
    bar = "#" * (width * done // days) + "-" * (width - width * done // days)
    print(f"\r[{bar}] {done}/{days} days ({day}: {rows} events)", end="",
          file=sys.stderr, flush=True)


def _forget(args: argparse.Namespace, config: Config) -> int:
    """Delete one person's events, through the running server (which first loads what it
    has journaled) or, stopped, in the file itself once the journal is replayed into it."""
    kind = next(k for k in ("user", "anonymous_id", "analytics_id")
                if getattr(args, k) is not None)
    value = getattr(args, kind)
    if not value.strip():
        print(f"triolytics: --{kind.replace('_', '-')} needs a non-empty id", file=sys.stderr)
        return 1
    data = Path(config.data_dir)
    server = _running_server(data)
    if server is not None:
        reply = _ask(server, data, "/admin/forget",
                     {"kind": kind, "id": value, "project": args.project},
                     timeout=config.query_timeout_s + 10)
        if reply is None:
            return 1
        events, ids, archived = reply["events"], reply["analytics_ids"], reply["archived_rows"]
    else:
        if config.store != "ducklake" and not (data / "events.duckdb").exists():
            print(f"triolytics: no events.duckdb in {data}", file=sys.stderr)
            return 1
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        events, ids, archived = _forget_in_file(data, config, kind, value, args.project)
    print(f"deleted {events} events" + (f" and {ids} analytics_id" if ids else "")
          + (f"; {archived} rows from the archive" if archived else ""))
    return 0


def _forget_in_file(data: Path, config: Config, kind: str, value: str,
                    project: str | None) -> tuple[int, int, int]:
    """The stopped server's file: the journal's unloaded records first (as a start
    would load them), then the DELETE, then the archive's partitions."""
    from triolytics.core.dedup import Dedup
    from triolytics.core.journal import Journal
    from triolytics.storage.writer import Writer
    store = _store(data, config)
    journal = Journal(data / "journal", config.journal_segment_bytes,
                      sync_on_rotate=config.fsync != "off")
    writer = Writer(config, journal, store, Dedup(1, 1))
    dsn = config.shared_state_dsn()
    if dsn is not None:  # (a writer of a shared lake: its replay is decided with the others)
        from triolytics.core.capture import new_id
        from triolytics.storage.shared_state import SharedState
        writer.shared = SharedState(dsn, config.writer_name(),
                                    round(config.session_timeout_s * 1_000_000),
                                    config.dedup_window_s * 1_000_000)
        writer.new_id = new_id
    try:
        writer.recover()
        events, ids = store.forget(kind, value, project)
        archived = 0
        if config.archive_dir:
            from triolytics.storage.archive import forget_archived
            from triolytics.storage.store import FORGET_COLUMNS
            archived = forget_archived(store.cursor(), config.archive_dir,
                                       FORGET_COLUMNS[kind], value, project,
                                       config.archive_max_file_bytes)
        return events, ids, archived
    finally:
        journal.close()
        store.close()
        if writer.shared is not None:
            writer.shared.close()


def _keys(args: argparse.Namespace, config: Config) -> int:
    data = Path(config.data_dir)
    server = _running_server(data)
    try:
        if server is not None:
            result = _keys_via_server(server, data, args)
        else:
            result = _keys_via_file(data, args, config)
    except KeyError as exc:
        print(f"triolytics: {exc.args[0]}", file=sys.stderr)
        return 1
    if isinstance(result, list):
        for item in result:
            state = f"revoked {item['revoked_at']}" if item.get("revoked_at") else "active"
            print(f"{item['key']}\t{item['project']}\t{item['created_at']}\t{state}")
    else:
        print(result)
    return 0


def _running_server(data: Path) -> dict | None:
    try:
        info = json.loads((data / "server.json").read_text())
        os.kill(info["pid"], 0)
    except (OSError, ValueError, KeyError):
        return None
    return info


def _keys_via_file(data: Path, args: argparse.Namespace, config: Config):
    data.mkdir(parents=True, exist_ok=True)
    store = _store(data, config)
    try:
        if args.action == "create":
            return store.create_key(args.project, args.key)
        if args.action == "revoke":
            if not store.revoke_key(args.key):
                raise KeyError(f"no such active write key: {args.key}")
            return f"revoked {args.key}"
        return [{"key": k.key, "project": k.project, "created_at": k.created_at,
                 "revoked_at": k.revoked_at} for k in store.list_keys()]
    finally:
        store.close()


def _keys_via_server(server: dict, data: Path, args: argparse.Namespace):
    token = (data / "admin.token").read_text().strip()
    if args.action == "create":
        body = {"project": args.project, **({"key": args.key} if args.key else {})}
        status, reply = _call(server, token, "POST", "/admin/keys", body)
        if status != 201:
            raise KeyError(reply["error"]["message"])
        return reply["key"]
    if args.action == "revoke":
        status, reply = _call(server, token, "POST", "/admin/keys/revoke", {"key": args.key})
        if status != 200:
            raise KeyError(f"{reply['error']['message']}: {args.key}")
        return f"revoked {args.key}"
    return _call(server, token, "GET", "/admin/keys", None)[1]["keys"]


def _read_only_store(data: Path, config: Config):
    """The stopped server's store, read-only (its DuckDB file, or the lake); None once
    one line says it is not there."""
    if config.store == "ducklake":
        return _store(data, config, read_only=True)
    if not (data / "events.duckdb").exists():
        print(f"triolytics: no events.duckdb in {data}", file=sys.stderr)
        return None
    return _store(data, config, read_only=True)


def _store(data: Path, config: Config, read_only: bool = False):
    """The configured store: `<data>/events.duckdb`, or the lake (store = "ducklake")."""
    if config.store == "ducklake":
        from triolytics.storage.lake import LakeStore
        return LakeStore(config.lake_catalog(), config.lake_data_path(), config.writer_name(),
                         read_only=read_only, threads=config.duckdb_threads)
    from triolytics.storage.store import Store
    return Store(data / "events.duckdb", read_only=read_only,
                 threads=config.duckdb_threads)


def _ask(server: dict, data: Path, path: str, body: dict, timeout: float) -> dict | None:
    """The running server's 200 answer to an admin POST, or None once one line on stderr
    says why not (`triolytics: <message> [<code>]`)."""
    token = (data / "admin.token").read_text().strip()
    try:
        status, reply = _call(server, token, "POST", path, body, timeout=timeout)
    except OSError as exc:
        print(f"triolytics: no answer from the server on port {server['port']}: "
              f"{exc or type(exc).__name__}", file=sys.stderr)
        return None
    if status != 200:
        error = reply.get("error", {})
        print(f"triolytics: {error.get('message', f'HTTP {status}')} "
              f"[{error.get('code', status)}]", file=sys.stderr)
        return None
    return reply


def _call(server: dict, token: str, method: str, path: str, body: dict | None,
          timeout: float = 10):
    host = server["host"] if server["host"] not in ("0.0.0.0", "::") else "127.0.0.1"
    conn = http.client.HTTPConnection(host, server["port"], timeout=timeout)
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")
