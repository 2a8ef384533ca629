"""Server settings: defaults, then a TOML file, then `TRIOLYTICS_*` variables, then flags.

Rules:
- `Config` is the single list of settings; docs/configuration.md documents each one.
  A name's suffix says its unit (`_bytes`, `_rows`, `_ms`, `_s`).
- Unknown keys are errors (a typo must not silently fall back to a default).
- Loading is pure: `load_config(file_text, environ, overrides)` takes its inputs.
- Flags may give a duration or a size with a unit (`30m`, `1MiB`); units.py turns it
  into the number, in the setting's own unit, that a layer holds.
"""

from __future__ import annotations

import math
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

ENV_PREFIX = "TRIOLYTICS_"
KiB = 1024
MiB = 1024 * KiB


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


class ConfigError(Exception):
    pass


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # --- the process
    log_level: str = "info"  # debug, info, warning, error or critical (any case)
    # --- listening
    host: str = "127.0.0.1"
    port: int = 3000
    max_connections: int = 10_000  # open at once (WebSockets too); bounds fds and memory
    max_connections_per_ip: int = 256  # open at once from one client address (IPv6: /64)
    workers: int | Literal["auto"] = 1  # processes serving `port` together (server/workers.py);
    # "auto": one per CPU
    reuse_port: bool = False  # listen with SO_REUSEPORT (each of those workers does)
    # --- storage
    data_dir: str = "./data"
    write_keys: list[str] = []  # registered for project `default` at start
    fsync: Literal["always", "interval", "off"] = "always"
    fsync_interval_ms: int = 50  # with fsync = "interval"
    journal_segment_bytes: int = 64 * MiB  # a journal file is rotated past this size
    load_batch_rows: int = 122_880  # DuckDB load once this many rows are journaled
    # (one DuckDB row group: a load this big skips DuckDB's WAL)...
    load_interval_ms: int = 1000  # ...or once the oldest unloaded row is this old
    duckdb_threads: int = 1  # DuckDB worker threads; bulk appends gain nothing from more
    # --- many writers: a DuckLake (docs/scaling.md)
    store: Literal["duckdb", "ducklake"] = "duckdb"  # one DuckDB file, or a DuckLake
    ducklake_catalog: str = ""  # postgresql://... (many writers); a path (one); empty:
    # <data_dir>/lake/catalog.ducklake
    ducklake_data_path: str = ""  # the lake's Parquet files; empty: <data_dir>/lake/data
    ducklake_max_retry_count: int = 100  # DuckLake's retries of a commit racing another
    ducklake_snapshot_keep_s: float = 3600.0  # older snapshots are expired by maintenance
    ducklake_maintenance_interval_s: float = 600.0  # merge files, flush, expire this often
    node_id: str = ""  # this writer's name in the lake; empty: the host name
    shared_state: str = ""  # PostgreSQL for sessions and dedup of many writers; empty:
    # the lake catalog's database when that is PostgreSQL; "off": each writer its own
    shared_reap_interval_s: float = 5.0  # idle sessions are claimed and ended this often
    max_pending_rows: int = 100_000  # rows accepted, not yet journaled (memory)
    max_unloaded_rows: int = 500_000  # rows journaled, not yet in DuckDB (memory)
    max_unloaded_bytes: int = 1024 * MiB  # journal bytes not yet in DuckDB (disk)
    backpressure_wait_ms: int = 1000  # a request waits this long for room, then gets 503
    retry_after_s: int = 1  # the Retry-After of a 503
    # --- storage faults (a full disk, say)
    fault_log_interval_s: float = 10.0  # a repeated fault is logged at most once per this
    startup_retry_s: float = 5.0  # start-up on a full disk: retried this often, 503 meanwhile
    # --- HTTP limits (defaults as Segment's)
    max_event_bytes: int = 32 * KiB
    max_request_bytes: int = 500 * KiB  # body as sent
    max_decompressed_bytes: int = 2 * MiB  # body after gzip
    max_batch_events: int = 2_500
    max_header_bytes: int = 16 * KiB  # request line + headers
    max_header_count: int = 100  # header lines in one request head
    head_timeout_s: float = 10.0  # to receive a request head (the first: from accept)
    request_timeout_s: float = 30.0  # to receive a body once its head is in; to send
    min_body_rate_bytes_s: int = 1024  # a body slower than this on average...
    body_rate_grace_s: float = 5.0  # ...once this long has passed is cut with a 408
    keepalive_timeout_s: float = 75.0  # idle keep-alive connection is closed after this
    shutdown_grace_s: float = 10.0  # in-flight requests get this long on SIGINT/SIGTERM
    # --- client-facing behaviour
    cors_origins: list[str] = msgspec.field(default_factory=lambda: ["*"])  # "*" echoes any Origin
    trusted_proxies: list[str] = []  # peers whose X-Forwarded-For is believed (IPs or CIDRs)
    dedup_window_s: int = 86_400  # a repeated messageId within this window is not stored again
    dedup_max_ids: int = 1_000_000  # remembered ids (memory); the oldest are forgotten first
    max_query_rows: int = 10_000  # rows one /admin/query (or `triolytics query`) returns
    query_timeout_s: float = 30.0  # a query still running after this is interrupted
    max_future_skew_s: int = 82_800  # an event time later than receipt + this is replaced
    max_message_id_chars: int = 100  # a longer messageId (WebSocket: id) is refused
    # --- the real-time API: POST /create and the WebSocket at /analytics
    analytics_shard: int = 0  # the <shard> of issued analytics_ids
    analytics_region: str = "global"  # metadata.region in POST /create's answer
    realtime_project: str = "default"  # the project WebSocket events are stored under
    create_rate_per_min: float = 60.0  # POST /create calls per client IP per minute...
    create_burst: int = 20  # ...after a burst of this many (429 + Retry-After past it)
    ws_origins: list[str] = []  # Origins allowed to open the WebSocket; empty: any
    ws_max_message_bytes: int = 1 * MiB  # one message (batch); larger closes with 1009
    ws_max_batch_events: int = 2_500  # events in one message
    ws_max_in_flight: int = 32  # batches per connection waiting for the journal (memory)
    ws_receive_buffer_bytes: int = 64 * KiB  # bytes per socket read
    ws_ping_interval_s: float = 30.0  # the server pings a connection this often...
    ws_pong_timeout_s: float = 15.0  # ...and drops it without a pong within this
    ws_idle_timeout_s: float = 600.0  # a connection without a message for this is closed
    ws_max_fragments: int = 256  # frames of one message (1 MiB in 4 KiB frames); 1009 past it
    ws_message_timeout_s: float = 60.0  # a message's first byte to its last; 1008 past it
    ws_max_events_per_s: float = 0.0  # events per connection per second; 0: no limit...
    ws_burst_events: int = 2_500  # ...after a burst of this many
    ws_id_max_events_per_s: float = 0.0  # events per analytics_id (its connections together)
    ws_id_burst_events: int = 2_500  # ...after a burst of this many
    ws_rate_limit_action: Literal["wait", "close"] = "wait"  # over a rate: stop reading, or 1008
    # --- privacy (docs/privacy.md)
    ip_mode: Literal["full", "truncate", "drop"] = "full"  # client IPs: kept, /24 (/48), none
    respect_dnt: bool = False  # DNT: 1 / Sec-GPC: 1 requests are answered, not stored
    # --- sessions (both APIs)
    session_timeout_s: float = 1800.0  # a session ends after this long without an event
    session_end_chunk_rows: int = 500  # session_end rows per reaper step (loop latency)
    # --- archive and retention (docs/archive.md)
    archive_dir: str = ""  # closed UTC days go here as Parquet partitions; empty: off
    archive_interval_s: float = 300.0  # the archive (and retention) step runs this often
    archive_grace_s: float = 3600.0  # a day is closed this long after the midnight ending it
    archive_min_bytes: int = 100 << 20  # a smaller day waits for its month (one partition)
    archive_max_file_bytes: int = 1 << 30  # a partition's file ends past this size
    retention_days: int = 0  # rows older than this many days leave DuckDB; 0: kept forever
    retention_without_archive: bool = False  # delete them even if not archived (verified)
    compact_free_ratio: float = 0.5  # after retention, rewrite the file once this share
    # of its blocks is free...; 0: never
    compact_min_bytes: int = 64 * MiB  # ...and it is at least this big
    # --- monitoring: GET /metrics (docs/metrics.md)
    metrics_token: str = ""  # bearer token for GET /metrics; empty: the admin token
    metrics_listen: str = ""  # host:port serving only GET /metrics (then not on `port`); empty: off

    # --- the dashboard at / (docs/dashboard.md)
    dashboard_session_s: float = 7 * 86_400.0  # a login lasts this long
    dashboard_secure_cookie: bool = False  # mark its cookie Secure (set it behind TLS)
    dashboard_queries: int = 2  # dashboard reads running at once (each a thread)...
    dashboard_nice: int = 19  # ...at this CPU priority (0-19; 19: only idle CPU)
    dashboard_cache_s: float = 10.0  # the same figures are computed once per this; 0: always
    dashboard_warm_s: float = 60.0  # figures asked for within this are kept computed; 0: off
    dashboard_live_s: float = 1.0  # the live feed's message interval
    dashboard_max_watchers: int = 16  # live feeds open at once (503 past it)
    dashboard_max_range_days: int = 366  # the longest custom range
    rollup_interval_s: float = 2.0  # new rows are folded into the rollups this often

    def __post_init__(self) -> None:
        positive = ("max_connections", "journal_segment_bytes", "load_batch_rows",
                    "load_interval_ms", "duckdb_threads", "max_pending_rows", "max_unloaded_rows",
                    "max_unloaded_bytes", "max_event_bytes", "max_request_bytes",
                    "max_decompressed_bytes", "max_batch_events", "max_header_bytes",
                    "max_connections_per_ip", "max_header_count", "head_timeout_s",
                    "min_body_rate_bytes_s", "body_rate_grace_s",
                    "fsync_interval_ms", "dedup_max_ids", "max_query_rows", "query_timeout_s",
                    "session_timeout_s",
                    "session_end_chunk_rows", "ws_max_message_bytes", "ws_max_batch_events",
                    "ws_max_in_flight", "ws_receive_buffer_bytes",
                    "ws_ping_interval_s", "ws_pong_timeout_s", "ws_idle_timeout_s",
                    "ws_max_fragments", "ws_message_timeout_s", "ws_burst_events",
                    "ws_id_burst_events", "create_burst", "max_future_skew_s",
                    "max_message_id_chars", "fault_log_interval_s", "startup_retry_s",
                    "archive_interval_s", "archive_max_file_bytes", "dashboard_session_s",
                    "dashboard_queries", "dashboard_live_s", "dashboard_max_watchers",
                    "dashboard_max_range_days", "rollup_interval_s",
                    "ducklake_max_retry_count", "ducklake_snapshot_keep_s",
                    "ducklake_maintenance_interval_s", "shared_reap_interval_s")
        for name in positive:
            if not getattr(self, name) > 0:  # (NaN too)
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("ws_max_events_per_s", "ws_id_max_events_per_s"):  # 0: no limit
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be 0 (no limit) or a positive number of "
                                  f"events per second, got {getattr(self, name)}")
        if not 0 < self.ws_message_timeout_s < math.inf:
            raise ConfigError(f"ws_message_timeout_s must be a finite number of seconds, "
                              f"got {self.ws_message_timeout_s}")
        if not 0 <= self.compact_free_ratio <= 1 or not self.compact_min_bytes >= 0:
            raise ConfigError(f"compact_free_ratio must be 0 (off) to 1 and compact_min_bytes "
                              f"0 or positive, got {self.compact_free_ratio} and "
                              f"{self.compact_min_bytes}")
        if not 0 <= self.archive_grace_s < math.inf or not self.retention_days >= 0 \
                or not self.archive_min_bytes >= 0:
            raise ConfigError("archive_grace_s, archive_min_bytes and retention_days must "
                              "be 0 or positive")
        if not 0 <= self.dashboard_nice <= 19:
            raise ConfigError(f"dashboard_nice must be 0 to 19, got {self.dashboard_nice}")
        for name in ("dashboard_cache_s", "dashboard_warm_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be 0 (off) or a number of seconds, "
                                  f"got {getattr(self, name)}")
        if self.workers != "auto" and not self.workers >= 1:
            raise ConfigError(f"workers must be a positive number or \"auto\", got "
                              f"{self.workers}")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"port out of range: {self.port}")
        if not self.create_rate_per_min > 0:
            raise ConfigError(f"create_rate_per_min must be positive, got "
                              f"{self.create_rate_per_min}")
        if not 0 <= self.analytics_shard <= 999_999_999:  # an id's <shard> has 1-9 digits
            raise ConfigError(f"analytics_shard must be 0 to 999999999, got "
                              f"{self.analytics_shard}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got "
                              f"{self.log_level!r}")
        self.log_level = self.log_level.lower()
        if self.metrics_listen:
            split_address(self.metrics_listen, "metrics_listen")
        if self.node_id and not _NODE_ID.fullmatch(self.node_id):
            raise ConfigError("node_id must be 1-64 letters, digits, '.', '_' or '-', got "
                              f"{self.node_id!r}")

    def lake_catalog(self) -> str:
        return self.ducklake_catalog or str(Path(self.data_dir) / "lake" / "catalog.ducklake")

    def lake_data_path(self) -> str:
        return self.ducklake_data_path or str(Path(self.data_dir) / "lake" / "data")

    def worker_count(self) -> int:
        """`workers` as a number: "auto" is one per CPU."""
        return (os.cpu_count() or 1) if self.workers == "auto" else self.workers

    def shared_state_dsn(self) -> str | None:
        """The PostgreSQL (libpq string or URL) holding sessions and dedup shared by many
        writers, or None (one writer: both in memory)."""
        if self.shared_state == "off":
            return None
        if self.shared_state:
            return self.shared_state.removeprefix("postgres:")
        if self.store != "ducklake":
            return None
        return postgres_dsn(self.ducklake_catalog)

    def writer_name(self) -> str:
        """This writer's name in a lake: `node_id`, else the host name."""
        return self.node_id or socket.gethostname()


_NODE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_LIBPQ = re.compile(r"\s*(host|hostaddr|port|dbname|user|service)\s*=")  # a libpq string


def postgres_dsn(catalog: str) -> str | None:
    """The PostgreSQL (URL or libpq string) a `ducklake_catalog` names, or None when it
    names a local file (or nothing)."""
    if catalog.startswith(("postgresql://", "postgres://")) or _LIBPQ.match(catalog):
        return catalog
    if catalog.startswith("postgres:"):
        return catalog.removeprefix("postgres:")
    return None


def split_address(text: str, name: str) -> tuple[str, int]:
    """`host:port` (IPv6: `[::1]:port`) -> (host, port), or a ConfigError naming `name`."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"{name} must be host:port (e.g. 127.0.0.1:9464, [::1]:9464), "
                          f"got {text!r}")
    return host, int(port)


FIELDS = Config.__struct_fields__
_LIST_FIELDS = {"write_keys", "cors_origins", "trusted_proxies", "ws_origins"}


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in FIELDS:
            raise ConfigError(f"unknown setting in environment: {key}")
        out[name] = [v.strip() for v in value.split(",") if v.strip()] \
            if name in _LIST_FIELDS else value
    return out


def load_config(file_text: str | None = None, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> Config:
    """Merge the layers; later layers win. Raises ConfigError with the offending key."""
    merged: dict[str, Any] = {}
    if file_text:
        try:
            merged.update(tomllib.loads(file_text))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file: {exc}") from None
    merged.update(_from_env(environ or {}))
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return msgspec.convert(merged, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None
