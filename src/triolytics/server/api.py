"""The HTTP API's route table: the Collector API, Segment's endpoints, health, admin.

Rules:
- Handlers are thin: decode with `Collector` (pure), store with `Writer`, answer.
- The admin endpoints (write keys) need the bearer token in `<data_dir>/admin.token`,
  which only the server's owner can read; `triolytics keys` uses them while the server
  runs, since the server alone may open the DuckDB file for writing.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Callable
from functools import partial
from time import time_ns
from typing import Literal

import duckdb
import msgspec
import trio

from triolytics.core.capture import TYPES, RequestMeta
from triolytics.core.collector import Accepted, Collector
from triolytics.core.errors import ApiError
from triolytics.core.identity import Identities
from triolytics.core.privacy import anonymize_ip, do_not_track
from triolytics.core.ratelimit import RateLimit
from triolytics.core.web import Handler, Request, Response, Routes
from triolytics.storage.archive import forget_archived
from triolytics.storage.export import ExportError, export, to_json
from triolytics.storage.query import QueryError, QueryResult
from triolytics.storage.store import FORGET_COLUMNS
from triolytics.storage.writer import Writer

# Paths whose POST has no body by definition: one without framing is empty, not a 411
# (`POST /create` is documented with "Headers: None, Body: None").
BODILESS = frozenset({b"/create"})
SHORT_NAMES = {"t": "track", "p": "page", "i": "identify", "s": "screen", "g": "group",
               "a": "alias"}  # analytics.js posts to /v1/t, /v1/p, ...


log = logging.getLogger("triolytics")


class KeyCreate(msgspec.Struct, forbid_unknown_fields=True):
    project: str
    key: str | None = None


class KeyRevoke(msgspec.Struct, forbid_unknown_fields=True):
    key: str


class QueryBody(msgspec.Struct, forbid_unknown_fields=True):
    sql: str
    max_rows: int | None = None


class ExportBody(msgspec.Struct, forbid_unknown_fields=True):
    to: str  # a directory on the server's machine, not there yet (or empty)
    format: str = "parquet"
    since: str | None = None
    until: str | None = None
    project: str | None = None


class ForgetBody(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["user", "anonymous_id", "analytics_id"]
    id: str
    project: str | None = None


class Created(msgspec.Struct):
    analytics_id: str
    metadata: dict[str, str]


class Api:
    def __init__(self, collector: Collector, writer: Writer, admin_token: str,
                 identities: Identities, clock: Callable[[], int] = time_ns) -> None:
        config = collector.config
        self.max_query_rows = config.max_query_rows
        self.query_timeout_s = config.query_timeout_s
        self.collector = collector
        self.writer = writer
        self.admin_token = admin_token.encode()
        self.identities = identities
        self.region = config.analytics_region
        self.create_limit = RateLimit(config.create_rate_per_min, config.create_burst)
        self.clock = clock  # wall clock, ns since epoch
        # GET /metrics: its token (unless `metrics_token` is set: the admin token, or none
        # on the private `metrics_listen` address), and what renders the text (set by
        # app.py: server/metrics.py)
        self.metrics_token = config.metrics_token.encode() or \
            (b"" if config.metrics_listen else self.admin_token)
        self.render_metrics: Callable[[], tuple[bytes, bytes]] | None = None
        # Counted per request, read at scrape time (server/metrics.py): events answered
        # as stored, and refusals by error code (a batch's events refused one by one; a
        # request refused whole counts once).
        self.events_received = 0
        self.refused: dict[str, int] = {}
        self.ip_mode = config.ip_mode  # (privacy.py)
        self.archive_dir = config.archive_dir  # (forget rewrites its partitions too)
        self.archive_lock = trio.Lock()  # (forget and the archive task, one at a time)
        self.respect_dnt = config.respect_dnt

    def routes(self) -> Routes:
        routes: Routes = {
            b"/v1/capture": {b"POST": self.capture},
            b"/v1/batch": {b"POST": self.batch},
            b"/v1/b": {b"POST": self.batch},
            b"/create": {b"POST": self.create},
            b"/analytics": {b"GET": self.upgrade_required},
            b"/healthz": {b"GET": self.healthz, b"HEAD": self.healthz},
            b"/readyz": {b"GET": self.readyz, b"HEAD": self.readyz},
            b"/admin/keys": {b"GET": self.list_keys, b"POST": self.create_key},
            b"/admin/keys/revoke": {b"POST": self.revoke_key},
            b"/admin/stats": {b"GET": self.stats},
            b"/admin/query": {b"POST": self.query},
            b"/metrics": {b"GET": self.metrics},
            b"/admin/export": {b"POST": self.export},
            b"/admin/forget": {b"POST": self.forget},
        }
        for kind in TYPES:
            routes[b"/v1/" + kind.encode()] = {b"POST": self._typed(kind)}
        for short, kind in SHORT_NAMES.items():
            routes[b"/v1/" + short.encode()] = {b"POST": self._typed(kind)}
        return routes

    def _meta(self, req: Request) -> RequestMeta:
        ua = req.headers.get(b"user-agent")
        ip = req.client_ip if self.ip_mode == "full" else anonymize_ip(req.client_ip,
                                                                      self.ip_mode)
        return RequestMeta(self.clock() // 1000, ip, ua.decode("latin-1") if ua else None,
                           self.ip_mode)

    async def _store(self, build: Callable[..., Accepted], *args) -> Response:
        """Wait for room in the writer *before* building the rows (sessions and dedup
        are touched then), submit them with no await in between, answer once durable.
        Events received and refusals by code are counted here (for GET /metrics)."""
        writer = self.writer
        try:
            if writer.closing or not writer.has_room(1):
                await writer.wait_room()
            accepted = build(*args)
            try:
                await writer.wait_durable(writer.submit(accepted.rows, accepted.keys,
                                                        accepted.columns))
            except ApiError:  # not journaled (a full disk): the sessions it opened go too
                self.collector.sessions.forget_started(accepted.rows)
                raise
        except ApiError as exc:  # (BatchRejected: each of its events)
            self._count_refused(getattr(exc, "rejected", None) or (exc,))
            raise
        self.events_received += accepted.received
        if accepted.refused:
            self._count_refused(accepted.refused)
        return Response(accepted.status, accepted.body)

    def _count_refused(self, refusals) -> None:
        refused = self.refused
        for r in refusals:
            refused[r.code] = refused.get(r.code, 0) + 1

    def _untracked(self, req: Request) -> bool:
        """`respect_dnt` and the request asks not to be tracked: answer, store nothing."""
        if self.respect_dnt and do_not_track(req.headers):
            self.writer.stats.dnt_skipped += 1
            return True
        return False

    def _unstored(self, name: str, *args) -> Response:
        """The answer `Collector.<name>` would give, from a collector with sessions and
        dedup memory of its own: the same status and refusals, and nothing stored."""
        accepted = getattr(Collector(self.collector.config, self.collector.keys), name)(*args)
        return Response(accepted.status, accepted.body)

    async def capture(self, req: Request) -> Response:  # (the hot path)
        if self._untracked(req):
            return self._unstored("capture", None, req.headers, req.body, self._meta(req))
        return await self._store(self.collector.capture, None, req.headers, req.body,
                                 self._meta(req))

    async def batch(self, req: Request) -> Response:
        if self._untracked(req):
            return self._unstored("batch", req.headers, req.body, self._meta(req))
        return await self._store(self.collector.batch, req.headers, req.body,
                                 self._meta(req))

    def _typed(self, kind: str) -> Handler:
        async def handler(req: Request) -> Response:
            if self._untracked(req):
                return self._unstored("capture", kind, req.headers, req.body,
                                      self._meta(req))
            return await self._store(self.collector.capture, kind, req.headers, req.body,
                                     self._meta(req))
        return handler

    # --- the real-time API's identities (the WebSocket itself is ws_server.py)
    async def create(self, req: Request) -> Response:
        """`POST /create`: a new analytics_id, recorded in DuckDB."""
        wait = self.create_limit.take(req.client_ip, trio.current_time())
        if wait > 0:
            raise ApiError("rate_limited", "too many POST /create calls from this address",
                           headers=((b"retry-after", b"%d" % max(1, math.ceil(wait))),))
        analytics_id = self.identities.issue()
        if self._untracked(req):  # (ids check themselves: it works unrecorded)
            return Response(200, msgspec.json.encode(Created(analytics_id,
                                                             {"region": self.region})))
        try:
            await self.writer.run_store(self.writer.store.record_analytics_ids,
                                        [(analytics_id, self.clock() // 1000,
                                          anonymize_ip(req.client_ip, self.ip_mode))])
        except duckdb.Error as exc:  # a full disk, say: not stored, so not handed out
            raise ApiError("unavailable", f"could not record the analytics_id: {exc}",
                           headers=((b"retry-after",
                                     str(self.writer.config.retry_after_s).encode()),)
                           ) from None
        return Response(200, msgspec.json.encode(Created(analytics_id,
                                                         {"region": self.region})))

    async def upgrade_required(self, req: Request) -> Response:
        raise ApiError("upgrade_required", "/analytics is a WebSocket: connect with "
                       "ws://host:port/analytics?analytics_id=...",
                       headers=((b"upgrade", b"websocket"),))

    # --- health
    async def healthz(self, req: Request) -> Response:
        return Response(200, b'{"ok":true}')

    async def readyz(self, req: Request) -> Response:
        """200 while events can be stored; else 503 with why (the writer's fault, e.g.
        `journal write failed: [Errno 28] No space left on device`). Damage set aside at
        start is listed as `warnings` (ready all the same)."""
        writer = self.writer
        if writer.closing:
            return not_ready("shutting down")
        if writer.fault is not None:
            return not_ready(writer.fault)
        warnings = writer.warnings()
        if warnings:
            return Response(200, msgspec.json.encode({"ready": True, "warnings": warnings}))
        return Response(200, b'{"ready":true}')

    # --- admin
    def _admin(self, req: Request) -> None:
        if not _bearer(req, self.admin_token):
            raise ApiError("unauthorized", "admin endpoints need the bearer token from "
                                           "<data_dir>/admin.token")

    async def metrics(self, req: Request) -> Response:
        """`GET /metrics`: Prometheus text (docs/metrics.md), for `metrics_token` or,
        when that is not set, the admin token (on `metrics_listen`: no token)."""
        if self.metrics_token and not _bearer(req, self.metrics_token):
            raise ApiError("unauthorized", "GET /metrics needs the bearer token "
                           "`metrics_token` (or, when unset, <data_dir>/admin.token)")
        if self.render_metrics is None:
            raise ApiError("not_found", "metrics are not served here")
        content_type, body = self.render_metrics()
        return Response(200, body, content_type=content_type)

    async def list_keys(self, req: Request) -> Response:
        self._admin(req)
        keys = await self.writer.run_store(self.writer.store.list_keys)
        return Response(200, msgspec.json.encode({"keys": keys}))

    async def create_key(self, req: Request) -> Response:
        self._admin(req)
        body = _decode(req.body, KeyCreate)
        try:
            key = await self.writer.run_store(self.writer.store.create_key, body.project,
                                              body.key)
        except KeyError as exc:
            raise ApiError("bad_request", str(exc.args[0]), field="$.key") from None
        self.collector.keys[key] = body.project
        return Response(201, msgspec.json.encode({"project": body.project, "key": key}))

    async def revoke_key(self, req: Request) -> Response:
        self._admin(req)
        body = _decode(req.body, KeyRevoke)
        if not await self.writer.run_store(self.writer.store.revoke_key, body.key):
            raise ApiError("not_found", "no such active write key", field="$.key")
        self.collector.keys.pop(body.key, None)
        return Response(200, msgspec.json.encode({"revoked": body.key}))

    async def query(self, req: Request) -> Response:
        """One read-only SQL statement against the events (the server alone may open the
        DuckDB file while it runs). Runs on its own cursor, beside loads, for at most
        `query_timeout_s` (query.py interrupts it); every refusal has its own code."""
        self._admin(req)
        body = _decode(req.body, QueryBody)
        limit = min(body.max_rows or self.max_query_rows, self.max_query_rows)
        store = self.writer.store
        cursor = await self.writer.run_store(store.cursor)
        try:
            result = await trio.to_thread.run_sync(partial(
                store.query, body.sql, limit, timeout_s=self.query_timeout_s, cursor=cursor))
        except QueryError as exc:
            raise ApiError(exc.code, exc.message, field="$.sql") from None
        return Response(200, encode_result(result))

    async def export(self, req: Request) -> Response:
        """Write the events to files on the server's machine (export.py), from a cursor
        of its own beside loads; answers the manifest once the directory is in place."""
        self._admin(req)
        body = _decode(req.body, ExportBody)
        if not body.to.startswith("/"):
            raise ApiError("bad_request", "to must be an absolute path", field="$.to")
        await self.writer.wait_loaded()  # what was acknowledged before is in it
        cursor = await self.writer.run_store(self.writer.store.cursor)
        try:
            manifest = await trio.to_thread.run_sync(partial(
                export, cursor, body.to, fmt=body.format, since=body.since,
                until=body.until, project=body.project))
        except ExportError as exc:
            raise ApiError("bad_request", str(exc)) from None
        except OSError as exc:
            raise ApiError("unavailable", f"cannot write the export: {exc}") from None
        finally:
            cursor.close()
        return Response(200, msgspec.json.encode(to_json(manifest)))

    async def forget(self, req: Request) -> Response:
        """Delete one person's rows (docs/privacy.md): first everything journaled so far
        is loaded, then one transaction deletes; their live sessions are dropped too."""
        self._admin(req)
        body = _decode(req.body, ForgetBody)
        if not body.id:
            raise ApiError("bad_request", "id must not be empty", field="$.id")
        writer = self.writer
        with trio.move_on_after(self.query_timeout_s) as waited:
            await writer.wait_loaded()
        if waited.cancelled_caught:
            raise ApiError("unavailable", "could not load the journal into DuckDB in time; "
                           "nothing was deleted; retry", headers=(
                               (b"retry-after", str(writer.config.retry_after_s).encode()),))
        self.collector.sessions.forget_person(body.kind, body.id, body.project)
        archived = 0
        async with self.archive_lock:  # (apart from the archive and the rollups' refresh)
            events, ids = await writer.run_store(writer.store.forget, body.kind, body.id,
                                                 body.project)
            if self.archive_dir:
                cursor = await writer.run_store(writer.store.cursor)
                try:
                    archived = await trio.to_thread.run_sync(
                        forget_archived, cursor, self.archive_dir,
                        FORGET_COLUMNS[body.kind], body.id, body.project,
                        writer.config.archive_max_file_bytes)
                finally:
                    cursor.close()
                log.info("forget --%s: removed %d rows from the archive",
                         body.kind.replace("_", "-"), archived)
        return Response(200, msgspec.json.encode({"events": events, "analytics_ids": ids,
                                                  "archived_rows": archived}))

    async def stats(self, req: Request) -> Response:
        self._admin(req)
        return Response(200, msgspec.json.encode({**self.writer.statistics(),
                                                  "fault": self.writer.fault}))


def _bearer(req: Request, token: bytes) -> bool:
    auth = req.headers.get(b"authorization", b"")
    return auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), token)


def not_ready(reason: str) -> Response:
    """`/readyz`'s 503: `{"ready":false,"reason":...}`."""
    return Response(503, msgspec.json.encode({"ready": False, "reason": reason}))


def _decode(body: bytes, type_: type):
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise ApiError("bad_request", str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ApiError("invalid_json", str(exc)) from None


def encode_result(result: QueryResult) -> bytes:
    """JSON for a query result; values JSON has no type for (Decimal, UUID, ...) as text."""
    return msgspec.json.encode(result, enc_hook=str)
