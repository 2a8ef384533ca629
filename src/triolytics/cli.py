"""The `triolytics` command: `serve`, `keys create|list|revoke`, and `query SQL`.

`keys` and `query` talk to the running server when there is one (the server alone may
open the DuckDB file); otherwise they open the file themselves.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import sys
from pathlib import Path

import trio

from triolytics.core.config import ENV_PREFIX, Config, ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="triolytics", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="TOML config file (or TRIOLYTICS_CONFIG)")
    p.add_argument("--data", dest="data_dir", help="data directory (default ./data)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the server")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--data", dest="data_dir", default=argparse.SUPPRESS,
                   help="data directory (default ./data)")
    s.add_argument("--write-key", dest="write_keys", action="append",
                   help="register this write key for project 'default' (repeatable)")
    s.add_argument("--fsync", choices=["always", "interval", "off"])
    s.add_argument("--log-level", default="INFO")
    k = sub.add_parser("keys", help="manage write keys")
    ks = k.add_subparsers(dest="action", required=True)
    kc = ks.add_parser("create", help="create a write key for a project")
    kc.add_argument("project")
    kc.add_argument("--key", help="use this key instead of a random one")
    ks.add_parser("list", help="list write keys")
    kr = ks.add_parser("revoke", help="revoke a write key")
    kr.add_argument("key")
    for sp in (kc, kr, ks.choices["list"]):
        sp.add_argument("--data", dest="data_dir", default=argparse.SUPPRESS)
    q = sub.add_parser("query", help="run one read-only SQL statement on the stored events")
    q.add_argument("sql", help="e.g. \"SELECT type, count(*) FROM events GROUP BY ALL\"")
    q.add_argument("--json", action="store_true", help="print JSON instead of a table")
    q.add_argument("--max-rows", type=int, help="at most this many rows (max_query_rows)")
    q.add_argument("--data", dest="data_dir", default=argparse.SUPPRESS)
    return p


def _config(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get(ENV_PREFIX + "CONFIG")
    text = Path(path).read_text() if path else None
    names = ("host", "port", "data_dir", "write_keys", "fsync")
    return load_config(text, os.environ, {n: getattr(args, n, None) for n in names})


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = _config(args)
    except (ConfigError, OSError) as exc:
        print(f"triolytics: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from triolytics.server.app import serve
        trio.run(lambda: serve(config, handle_signals=True))
        return 0
    if args.command == "query":
        return _query(args, config)
    return _keys(args, config)


def _query(args: argparse.Namespace, config: Config) -> int:
    """Print the answer, or one line on stderr and exit 1 for a query that was refused,
    failed or timed out (its error code in brackets); nothing on stdout then."""
    data = Path(config.data_dir)
    limit = min(args.max_rows or config.max_query_rows, config.max_query_rows)
    server = _running_server(data)
    if server is not None:
        token = (data / "admin.token").read_text().strip()
        try:  # the server's own query_timeout_s applies; wait a little longer for it
            status, reply = _call(server, token, "POST", "/admin/query",
                                  {"sql": args.sql, "max_rows": limit},
                                  timeout=config.query_timeout_s + 10)
        except OSError as exc:
            print(f"triolytics: no answer from the server on port {server['port']}: "
                  f"{exc or type(exc).__name__}", file=sys.stderr)
            return 1
        if status != 200:
            error = reply.get("error", {})
            print(f"triolytics: {error.get('message', f'HTTP {status}')} "
                  f"[{error.get('code', status)}]", file=sys.stderr)
            return 1
    else:
        from triolytics.server.api import encode_result
        from triolytics.storage.query import QueryError
        from triolytics.storage.store import Store
        if not (data / "events.duckdb").exists():
            print(f"triolytics: no events.duckdb in {data}", file=sys.stderr)
            return 1
        store = Store(data / "events.duckdb", read_only=True)
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


def _keys(args: argparse.Namespace, config: Config) -> int:
    data = Path(config.data_dir)
    server = _running_server(data)
    try:
        if server is not None:
            result = _keys_via_server(server, data, args)
        else:
            result = _keys_via_file(data, args)
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


def _keys_via_file(data: Path, args: argparse.Namespace):
    from triolytics.storage.store import Store
    data.mkdir(parents=True, exist_ok=True)
    store = Store(data / "events.duckdb")
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


def _call(server: dict, token: str, method: str, path: str, body: dict | None,
          timeout: float = 10):
    host = server["host"] if server["host"] not in ("0.0.0.0", "::") else "127.0.0.1"
    conn = http.client.HTTPConnection(host, server["port"], timeout=timeout)
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={
        "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}")
