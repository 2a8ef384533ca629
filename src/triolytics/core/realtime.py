"""The real-time API's batches, sans I/O: one WebSocket message in, rows (or a refusal) out.

Rules:
- A message is `{"events": [{"type", "ts"?, "payload"?, "id"?}], "seq"?}`, decoded once
  into `WireFrame`. A batch is stored all or nothing: the first invalid event refuses it,
  with the JSON path of the field at fault.
- A refusal is a `FrameError`: its `seq` (when the message had a readable one) says the
  client asked for answers, and `close_code` is what to close with when it did not.
- Every event of a connection shares the key `analytics_id`, so its session is touched
  once per batch; ids (`id`) are deduplicated per event before that, like `messageId`.
  The session also stamps the batch's times: a `ts` before the session's start is
  stored at the start (`original_timestamp` keeps the `ts`; see sessions.py).
- Input policy (docs/websocket.md): an `id` over `max_message_id_chars` refuses the
  batch; a `ts` more than `max_future_skew_s` after receipt is stored as the receive
  time, and that event's context gets `"timestamp_adjusted": true`.
- Time comes in as `now` (µs); nothing here reads a clock.
"""

from __future__ import annotations

from itertools import repeat
from typing import Annotated

import msgspec

from triolytics.core.capture import BAD_JSON, _object, decode_error, flag_adjusted
from triolytics.core.config import Config
from triolytics.core.errors import ApiError
from triolytics.core.rows import Row, RtColumns
from triolytics.core.sessions import SESSION_TYPES, Intake

MAX_TYPE_CHARS = 200
MAX_TS_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: DuckDB's range, with room
CLOSE_INVALID, CLOSE_POLICY, CLOSE_ERROR = 1007, 1008, 1011  # (1009: trio-websocket's)


class WireRtEvent(msgspec.Struct, gc=False):
    # Lengths and ranges are checked by msgspec, in C, as it decodes.
    type: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TYPE_CHARS)]
    ts: Annotated[int, msgspec.Meta(ge=0, le=MAX_TS_MS)] | None = None  # epoch ms
    payload: msgspec.Raw = msgspec.Raw()
    id: str | None = None


class WireFrame(msgspec.Struct):
    events: list[WireRtEvent]
    seq: int | None = None


class WireSeq(msgspec.Struct):
    """What a refused message may still tell: whether it asked for an answer."""

    seq: int | None = None


FRAME_DECODER = msgspec.json.Decoder(WireFrame)
SEQ_DECODER = msgspec.json.Decoder(WireSeq)


class FrameError(Exception):
    """A refused batch: answer `{"type": "error", "seq": ...}` if `seq` is not None,
    else close the connection with `close_code`."""

    def __init__(self, error: ApiError, seq: int | None, close_code: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.seq = seq
        self.close_code = close_code


class Batch(msgspec.Struct):
    system_rows: list[Row]  # the session rows it caused (stored before its events)
    keys: list[str]  # dedup keys admitted
    seq: int | None
    events: int  # events of the batch (stored now, or earlier under the same id)
    session_id: str | None  # None: every event was a repeat, and its session ended
    columns: RtColumns | None  # the events to store; None if all were repeats

    @property
    def rows(self) -> list[Row]:
        """Every row the batch stores, in order, as `Row`s (for inspection)."""
        return self.system_rows + (self.columns.rows() if self.columns is not None else [])


def _seq_of(data: bytes | str) -> int | None:
    try:
        seq = SEQ_DECODER.decode(data).seq
    except (*BAD_JSON, msgspec.ValidationError):
        return None
    return seq if seq is not None and seq >= 0 else None


def decode_frame(data: bytes | str, max_events: int) -> WireFrame:
    try:
        frame = FRAME_DECODER.decode(data)
    except BAD_JSON as exc:
        raise FrameError(decode_error(exc, "", data), _seq_of(data), CLOSE_INVALID) from None
    if frame.seq is not None and frame.seq < 0:
        raise FrameError(ApiError("bad_request", "seq must be >= 0", field="$.seq"), None,
                         CLOSE_INVALID)
    n = len(frame.events)
    if n == 0:
        raise FrameError(ApiError("invalid_event", "events is empty", field="$.events"),
                         frame.seq, CLOSE_INVALID)
    if n > max_events:
        raise FrameError(ApiError("payload_too_large", f"{n} events in one message; at most "
                                  f"{max_events} (ws_max_batch_events)", field="$.events"),
                         frame.seq, CLOSE_POLICY)
    return frame


class Realtime:
    """Turns one connection's messages into rows: `batch(data, intake)`."""

    def __init__(self, config: Config, project: str, analytics_id: str, context: str) -> None:
        self.max_events = config.ws_max_batch_events
        self.project = project
        self.analytics_id = analytics_id
        self.context = context  # {"ip": ..., "userAgent": ...} of the connection
        self.untracked = False  # do not track (respect_dnt): batches are answered, not stored
        self.key = (project, "ws", analytics_id)
        self.max_skew_us = config.max_future_skew_s * 1_000_000
        self.max_id_chars = config.max_message_id_chars

    def batch(self, data: bytes | str, intake: Intake) -> Batch:
        """The batch's rows, admitted to `intake`; FrameError if any event is invalid.
        Checks run over the whole batch at once; only a refused batch is walked event
        by event (`_payloads`) to name the field at fault."""
        frame = decode_frame(data, self.max_events)
        events = frame.events
        types = [e.type for e in events]
        try:
            payloads = [str(e.payload, "utf-8") if e.payload else None for e in events]
        except UnicodeDecodeError:
            payloads = None
        # (C-speed checks: no reserved type, every payload null or an object)
        if payloads is None or not SESSION_TYPES.isdisjoint(types) or not all(
                map(str.startswith, filter(None, payloads), repeat("{"))):
            payloads = self._payloads(frame)  # raises, or all payloads were null
        project, aid, now = self.project, self.analytics_id, intake.now
        ids = [e.id for e in events]
        if ids.count(None) != len(ids):  # (opt-in ids: the common batch has none)
            if max(map(len, filter(None, ids)), default=0) > self.max_id_chars:
                i = next(i for i, v in enumerate(ids) if v and len(v) > self.max_id_chars)
                raise FrameError(ApiError(
                    "invalid_event", f"id is longer than {self.max_id_chars} characters "
                    "(max_message_id_chars)", field=f"$.events[{i}].id"), frame.seq,
                    CLOSE_INVALID)
            ids = [i or None for i in ids]
            admitted = intake.fresh_all(project, ids)
            if False in admitted:
                kept = [i for i, ok in enumerate(admitted) if ok]
                events = [events[i] for i in kept]
                types = [types[i] for i in kept]
                payloads = [payloads[i] for i in kept]
                ids = [ids[i] for i in kept]
        if not events:  # a batch stored before (a resend) touches nothing
            return Batch(intake.rows, intake.keys, frame.seq, len(frame.events),
                         intake.sessions.current(self.key), None)  # (the live session)
        originals = [e.ts for e in events]
        if None in originals:
            stamps = [now if ts is None else ts * 1000 for ts in originals]
            originals = [None if ts is None else ts * 1000 for ts in originals]
        else:  # (one list for both columns: nothing changes it once built)
            stamps = originals = [ts * 1000 for ts in originals]
        context: str | list[str] = self.context
        latest = now + self.max_skew_us
        if max(stamps) > latest:  # in the future: the receive time, flagged
            flagged = flag_adjusted(context)  # one context for the batch: flag it once
            context = [flagged if t > latest else context for t in stamps]
            stamps = [now if t > latest else t for t in stamps]
        sid, stamps = intake.session(self.key, aid, None, stamps, len(events))
        columns = RtColumns(project, aid, sid, now, context, ids, types, stamps,
                            originals, payloads)
        return Batch(intake.rows, intake.keys, frame.seq, len(frame.events), sid, columns)

    @staticmethod
    def _payloads(frame: WireFrame) -> list[str | None]:
        """Each event checked on its own: the first fault raises with its JSON path."""
        out = []
        for i, ev in enumerate(frame.events):
            if ev.type in SESSION_TYPES:
                raise FrameError(ApiError("invalid_event", f"type {ev.type!r} is reserved "
                                          "for the server", field=f"$.events[{i}].type"),
                                 frame.seq, CLOSE_INVALID)
            try:
                out.append(_object(ev.payload, f"$.events[{i}].payload") if ev.payload
                           else None)
            except ApiError as exc:
                raise FrameError(exc, frame.seq, CLOSE_INVALID) from None
        return out
