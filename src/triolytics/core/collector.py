"""The Collector API's request logic, sans I/O: request bytes in, `Accepted` or `ApiError` out.

Rules:
- `/v1/capture` answers 201 (the Collector document); Segment's `/v1/batch` and
  `/v1/<type>` answer 200 with `{"success": true, ...}`, since Segment SDKs check for it.
- A batch is validated per event. A 2xx answer lists every event it did not store under
  `rejected` (index, code, message, field); a non-2xx answer means nothing was stored.
- Write keys come from `x-write-key`, HTTP Basic (key as user name) or the body's
  `writeKey`, in that order. `keys` maps key -> project and may change at run time.
"""

from __future__ import annotations

import binascii
import zlib
from base64 import b64decode

import msgspec

from triolytics.core.capture import (
    RequestMeta,
    WireBatchEvents,
    WireEvent,
    batch_columns,
    decode_batch,
    decode_event,
    enricher_for,
    new_id,
    to_row,
)
from triolytics.core.config import Config
from triolytics.core.dedup import Dedup
from triolytics.core.errors import ApiError, ErrorBody
from triolytics.core.rows import Columns, Row
from triolytics.core.sessions import SESSION_TYPES, Intake, Sessions

JSON_TYPES = frozenset({b"", b"application/json", b"text/plain"})
_ENCODE = msgspec.json.Encoder()


class Accepted(msgspec.Struct):
    """Rows to store (session starts included); send `status`/`body` once durable."""

    rows: list[Row]
    keys: list[str]  # dedup keys admitted for them (forgotten if the journal fails)
    status: int
    body: bytes
    columns: Columns | None = None  # a batch's events by column, stored after `rows`
    received: int = 1  # the request's events answered as stored (repeats included)
    refused: list[Rejected] | None = None  # a batch's events refused alone

    def events(self) -> list[Row]:
        """The request's own events, without the sessions' rows."""
        rows = [r for r in self.rows if r.type not in SESSION_TYPES]
        return rows + self.columns.rows() if self.columns is not None else rows


class Rejected(msgspec.Struct):
    index: int
    code: str
    message: str
    field: str | None = None


class SegmentReply(msgspec.Struct, omit_defaults=True):
    success: bool
    stored: int | None = None
    rejected: list[Rejected] | None = None


class BatchFailure(msgspec.Struct):
    error: ErrorBody
    rejected: list[Rejected]


def header_write_key(headers: dict[bytes, bytes]) -> str | None:
    key = headers.get(b"x-write-key")
    if key:
        return key.decode("latin-1")
    auth = headers.get(b"authorization")
    if auth and auth[:6].lower() == b"basic ":
        try:
            user = b64decode(auth[6:].strip(), validate=True).split(b":", 1)[0]
        except (binascii.Error, ValueError):
            raise ApiError("unauthorized", "malformed Basic credentials") from None
        return user.decode("utf-8", "replace") or None
    return None


def decode_body(headers: dict[bytes, bytes], body: bytes, config: Config) -> bytes:
    """Undo Content-Encoding (identity or gzip, capped) and check the media type."""
    media = headers.get(b"content-type", b"")
    if media != b"application/json":  # else the common case, decided in one comparison
        media = media.split(b";", 1)[0].strip().lower()
    if media not in JSON_TYPES:
        raise ApiError("unsupported_media_type",
                       f"Content-Type {media.decode('latin-1')!r} is not JSON; "
                       "send application/json or text/plain")
    encoding = headers.get(b"content-encoding")
    if encoding is None:
        return body
    encoding = encoding.strip().lower()
    if encoding == b"identity":
        return body
    if encoding not in (b"gzip", b"x-gzip"):
        raise ApiError("unsupported_encoding",
                       f"Content-Encoding {encoding.decode('latin-1')!r} is not supported; "
                       "send gzip or identity")
    return _gunzip(body, config.max_decompressed_bytes)


def _gunzip(body: bytes, limit: int) -> bytes:
    """Every gzip member of `body` (RFC 1952 allows several), at most `limit` bytes out."""
    out: list[bytes] = []
    size = 0
    rest = body
    while rest:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            chunk = inflater.decompress(rest, limit - size + 1)
        except zlib.error as exc:
            raise ApiError("bad_request", f"invalid gzip body: {exc}") from None
        size += len(chunk)
        if size > limit or inflater.unconsumed_tail:
            raise ApiError("payload_too_large",
                           f"decompressed body exceeds {limit} bytes (max_decompressed_bytes)")
        if not inflater.eof:
            raise ApiError("bad_request", "truncated gzip body")
        out.append(chunk)
        rest = inflater.unused_data
    return b"".join(out)


class Collector:
    def __init__(self, config: Config, keys: dict[str, str], sessions: Sessions | None = None,
                 dedup: Dedup | None = None) -> None:
        self.config = config
        self.keys = keys
        if sessions is None:  # (both are shared with the rest of the server when given)
            sessions = Sessions(round(config.session_timeout_s * 1_000_000), new_id)
        if dedup is None:
            dedup = Dedup(config.dedup_window_s * 1_000_000, config.dedup_max_ids)
        self.sessions = sessions
        self.dedup = dedup
        self.max_skew_us = config.max_future_skew_s * 1_000_000  # the input policy
        self.max_id_chars = config.max_message_id_chars

    def project(self, key: str | None) -> str:
        if not key:
            raise ApiError("missing_write_key",
                           "send the write key in x-write-key (or Basic auth user, or writeKey)")
        project = self.keys.get(key)
        if project is None:
            raise ApiError("unknown_write_key", "unknown or revoked write key")
        return project

    def _open(self, headers: dict[bytes, bytes], body: bytes) -> tuple[str | None, str, bytes]:
        """(header key, its project, decoded body). Without a header key the project is
        "" until the body's `writeKey` names one (the caller checks)."""
        key = header_write_key(headers)
        project = self.project(key) if key else ""
        return key, project, decode_body(headers, body, self.config)

    def capture(self, kind: str | None, headers: dict[bytes, bytes], body: bytes,
                meta: RequestMeta) -> Accepted:
        """`POST /v1/capture` (kind None: type from the body) and `POST /v1/<kind>`."""
        key, project, body = self._open(headers, body)
        if len(body) > self.config.max_event_bytes:
            raise ApiError("payload_too_large",
                           f"event exceeds {self.config.max_event_bytes} bytes (max_event_bytes)")
        ev = decode_event(body)
        if not key:
            project = self.project(ev.writeKey)
        intake = Intake(self.dedup, self.sessions, meta.received_at)
        row = to_row(ev, project, meta, enricher_for(meta), intake, kind=kind,
                     max_skew_us=self.max_skew_us, max_id_chars=self.max_id_chars)
        quoted = _ENCODE.encode(row.message_id if row is not None else ev.messageId)
        if kind is None:  # {"ok":true,"id":"..."}
            return Accepted(intake.rows, intake.keys, 201, b'{"ok":true,"id":%b}' % quoted)
        return Accepted(intake.rows, intake.keys, 200, b'{"success":true,"id":%b}' % quoted)

    def batch(self, headers: dict[bytes, bytes], body: bytes, meta: RequestMeta) -> Accepted:
        """`POST /v1/batch`: `{"batch": [...], "context"?, "sentAt"?, "writeKey"?}`."""
        key, project, body = self._open(headers, body)
        envelope = decode_batch(body, self.config.max_event_bytes)
        items = envelope.batch
        if not items:
            raise ApiError("invalid_event", "batch is empty", field="$.batch")
        if len(items) > self.config.max_batch_events:
            raise ApiError("payload_too_large", f"batch has {len(items)} events; at most "
                           f"{self.config.max_batch_events} (max_batch_events)", field="$.batch")
        rejected: list[Rejected] = []
        one_pass = isinstance(envelope, WireBatchEvents)  # every event decoded, none bad
        if one_pass:
            events = enumerate(items)  # no (index, event) tuples to allocate and collect
            decoded = items
        else:
            events = self._decode_each(items, rejected)
            decoded = [e for _, e in events]
        if not key:
            key = envelope.writeKey or next((e.writeKey for e in decoded if e.writeKey), None)
            project = self.project(key)
        enrich = enricher_for(meta, envelope.context)
        intake = Intake(self.dedup, self.sessions, meta.received_at)
        sent_at, integrations = envelope.sentAt, envelope.integrations
        skew_us, id_chars = self.max_skew_us, self.max_id_chars
        if one_pass:  # try the whole batch by column
            columns = batch_columns(items, project, meta, enrich, intake, sent_at=sent_at,
                                    integrations=integrations, max_skew_us=skew_us,
                                    max_id_chars=id_chars)
            if columns is not None:
                reply = _ENCODE.encode(SegmentReply(True, stored=len(items)))
                return Accepted(intake.rows, intake.keys, 200, reply,
                                columns if columns.count else None, len(items))
        for i, ev in events:
            try:
                to_row(ev, project, meta, enrich, intake, sent_at=sent_at,
                       integrations=integrations, make_id=False, max_skew_us=skew_us,
                       max_id_chars=id_chars)
            except ApiError as exc:  # its field path is relative to the event
                field = f"$.batch[{i}]" + (exc.field or "$")[1:]
                rejected.append(Rejected(i, exc.code, exc.message, field))
        if len(rejected) == len(items):
            error = ApiError("invalid_event", "no event in the batch is valid", field="$.batch")
            raise BatchRejected(error, sorted(rejected, key=lambda r: r.index))
        rejected.sort(key=lambda r: r.index)
        reply = SegmentReply(True, stored=len(items) - len(rejected), rejected=rejected or None)
        return Accepted(intake.rows, intake.keys, 200, _ENCODE.encode(reply),
                        received=len(items) - len(rejected), refused=rejected or None)

    def _decode_each(self, items: list[msgspec.Raw],
                     rejected: list[Rejected]) -> list[tuple[int, WireEvent]]:
        events: list[tuple[int, WireEvent]] = []
        max_event = self.config.max_event_bytes
        for i, raw in enumerate(items):
            if len(raw) > max_event:
                rejected.append(Rejected(i, "payload_too_large",
                                         f"event exceeds {max_event} bytes", f"$.batch[{i}]"))
                continue
            try:
                events.append((i, decode_event(raw, f"$.batch[{i}]")))
            except ApiError as exc:
                rejected.append(Rejected(i, exc.code, exc.message, exc.field))
        return events


class BatchRejected(ApiError):
    """A batch of which no event is valid: 400, with every event's reason."""

    def __init__(self, error: ApiError, rejected: list[Rejected]) -> None:
        super().__init__(error.code, error.message, field=error.field)
        self.rejected = rejected

    def as_body(self) -> bytes:
        return _ENCODE.encode(BatchFailure(self.detail(), self.rejected))
