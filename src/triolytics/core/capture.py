"""Segment-shaped events in, `Row`s out: decoding, validation and enrichment (pure).

Rules:
- Untrusted bytes are decoded once, into the lenient wire type `WireEvent`; every check
  after that is on typed values. Unknown top-level fields are ignored (as Segment does).
- Every refusal is an `ApiError` whose `field` is the JSON path of the offending value.
- `properties`, `traits`, `integrations` stay raw JSON bytes; `context` is edited by
  splicing bytes unless a batch-level context has to be merged in.
- Time comes in as `RequestMeta.received_at`; nothing here reads a clock.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
import secrets
from datetime import UTC, datetime, timedelta

import msgspec

from triolytics.core.config import Config
from triolytics.core.errors import ApiError
from triolytics.core.privacy import anonymize_ip
from triolytics.core.rows import Columns, Row
from triolytics.core.sessions import Intake

TYPES = frozenset({"track", "page", "identify", "screen", "group", "alias"})
Id = str | int  # Segment SDKs send numeric user ids too; stored as text


class WireEvent(msgspec.Struct, gc=False):  # holds no containers: no cycles to collect
    type: str | None = None
    event: str | None = None
    name: str | None = None
    anonymousId: Id | None = None
    userId: Id | None = None
    groupId: Id | None = None
    previousId: Id | None = None
    messageId: str | None = None
    timestamp: datetime | None = None
    originalTimestamp: datetime | None = None
    sentAt: datetime | None = None
    context: msgspec.Raw = msgspec.Raw()
    properties: msgspec.Raw = msgspec.Raw()
    traits: msgspec.Raw = msgspec.Raw()
    integrations: msgspec.Raw = msgspec.Raw()
    writeKey: str | None = None


class WireBatch(msgspec.Struct):
    batch: list[msgspec.Raw]
    context: msgspec.Raw = msgspec.Raw()
    integrations: msgspec.Raw = msgspec.Raw()
    sentAt: datetime | None = None
    writeKey: str | None = None


class WireBatchEvents(msgspec.Struct):
    """`WireBatch` decoded in one pass: the fast path, when every event is valid JSON of
    the right shape and the body is too small for any event to exceed the size limit."""

    batch: list[WireEvent]
    context: msgspec.Raw = msgspec.Raw()
    integrations: msgspec.Raw = msgspec.Raw()
    sentAt: datetime | None = None
    writeKey: str | None = None


class RequestMeta(msgspec.Struct, gc=False):
    """What the I/O layer knows about the request, beyond its body."""

    received_at: int  # µs since epoch
    ip: str | None  # as `ip_mode` stores it (privacy.py): None stores no IP
    user_agent: str | None = None
    ip_mode: str = "full"  # an `ip` a client puts in its context is stored this way too


EVENT_DECODER = msgspec.json.Decoder(WireEvent)
BATCH_DECODER = msgspec.json.Decoder(WireBatch)
BATCH_EVENTS_DECODER = msgspec.json.Decoder(WireBatchEvents)
EVENTS_DECODER = msgspec.json.Decoder(list[WireEvent])
_JSON = msgspec.json.Encoder()
NO_JSON = msgspec.Raw()  # an absent JSON value
_PATH = re.compile(r" - at `\$(.*)`$")
_new_row = tuple.__new__  # Row(*values) without NamedTuple's Python-level __new__
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EPOCH_NAIVE = datetime(1970, 1, 1)
_US = timedelta(microseconds=1)
# The input policy (docs/api.md): Config's defaults for max_future_skew_s (23 h,
# PostHog's rule) and max_message_id_chars (Segment's limit), and the latest time stored
# as an event's `timestamp`.
_DEFAULTS = Config()
MAX_FUTURE_SKEW_US = _DEFAULTS.max_future_skew_s * 1_000_000
MAX_MESSAGE_ID_CHARS = _DEFAULTS.max_message_id_chars
MAX_TIME_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
ADJUSTED = "timestamp_adjusted"  # the context key that flags a replaced timestamp
_FLAG = '{"' + ADJUSTED + '":true'


def _id_prefix() -> str:
    h = f"{random.SystemRandom().getrandbits(80):020x}"
    return f"{h[:8]}-{h[8:12]}-4{h[12:15]}-{8 | int(h[15], 16) & 3:x}{h[16:19]}-"


_ID_PREFIX = _id_prefix()
_ID_COUNTER = itertools.count(random.SystemRandom().getrandbits(40))  # < 2**48 for years


def new_id() -> str:
    """A UUID-shaped (version 4 layout) id, unique per process: 74 random bits chosen at
    start-up, then a 48-bit counter. ~5x cheaper than `str(uuid.uuid4())` per event."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


def to_micros(dt: datetime) -> int:
    """Epoch microseconds; a naive datetime means UTC."""
    return (dt - (_EPOCH if dt.tzinfo is not None else _EPOCH_NAIVE)) // _US


def _absent(raw: msgspec.Raw) -> bool:
    """An omitted field or an explicit JSON null."""
    return not raw or (len(raw) == 4 and bytes(raw) == b"null")


# What decoding untrusted JSON may raise: msgspec's errors, invalid UTF-8 in a string
# field, and nesting deeper than the interpreter's recursion limit.
BAD_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def decode_error(exc: Exception, prefix: str, data: bytes | str | None = None) -> ApiError:
    """Map a decoding error to `invalid_json`/`invalid_event` with a JSON path. Given the
    decoded `data`, invalid UTF-8 is located by its byte offset in it: msgspec before 0.23
    raised UnicodeDecodeError with the offset inside one string value, 0.23 raises a
    DecodeError with no offset at all, so the offset is found again here either way."""
    if isinstance(exc, UnicodeDecodeError) or "UTF-8" in str(exc):
        where = "in a string"
        if isinstance(data, (bytes, bytearray, memoryview)):
            try:
                bytes(data).decode("utf-8")
            except UnicodeDecodeError as located:
                where = f"at byte {located.start}"
        return ApiError("invalid_json", f"invalid UTF-8 {where}", field=prefix or "$")
    if isinstance(exc, RecursionError):
        return ApiError("invalid_json", "JSON nested too deeply", field=prefix or "$")
    message = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return ApiError("invalid_json", f"malformed JSON: {message}", field=prefix or "$")
    m = _PATH.search(message)
    field = (prefix or "$") + (m.group(1) if m else "")
    return ApiError("invalid_event", _PATH.sub("", message), field=field)


def decode_event(body: bytes | msgspec.Raw, prefix: str = "") -> WireEvent:
    try:
        return EVENT_DECODER.decode(body)
    except BAD_JSON as exc:
        raise decode_error(exc, prefix, body) from None


def decode_batch(body: bytes, max_event_bytes: int) -> WireBatch | WireBatchEvents:
    """Every event decoded at once (`WireBatchEvents`) when no event can be over the
    size limit and all are valid, else events kept raw (`WireBatch`) so each is sized
    and validated on its own."""
    if len(body) <= max_event_bytes:
        try:
            return BATCH_EVENTS_DECODER.decode(body)
        except BAD_JSON:
            pass  # find out which event is at fault, below
    try:
        envelope = BATCH_DECODER.decode(body)
    except BAD_JSON as exc:
        envelope = _without_lone_surrogates(body)
        if envelope is None:
            raise decode_error(exc, "", body) from None
    items = envelope.batch
    if items and max(map(len, items)) <= max_event_bytes:  # a larger body, sized events:
        try:  # all of them in one decode, as one array
            events = EVENTS_DECODER.decode(b"[%b]" % b",".join(items))
        except BAD_JSON:
            return envelope
        return WireBatchEvents(events, envelope.context, envelope.integrations,
                               envelope.sentAt, envelope.writeKey)
    return envelope


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][0-9a-fA-F]{2}")
_LOW_ESCAPE = re.compile(rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}")
MAX_SURROGATE_ESCAPES = 10_000  # past this many, a batch that fails to decode is not split


def _lone_surrogates(body: bytes) -> list[int]:
    """Offsets of the `\\uD800`-`\\uDFFF` escapes not in a high-low pair (msgspec refuses
    them); an escape after an odd run of backslashes is text (`\\\\ud800`), not one."""
    lone: list[int] = []
    paired = -1  # the offset of the low half of the last pair seen
    for m in _SURROGATE_ESCAPE.finditer(body):
        at = m.start()
        j = at
        while j and body[j - 1] == 92:  # (a backslash)
            j -= 1
        if (at - j) % 2 or at == paired:
            continue
        if body[at + 3] in b"89abAB" and _LOW_ESCAPE.match(body, at + 6):  # a pair
            paired = at + 6
            continue
        lone.append(at)
    return lone


def _without_lone_surrogates(body: bytes) -> WireBatch | None:
    """A batch that failed to decode, decoded again with its lone surrogate escapes
    (which msgspec refuses) swapped for a marker, so that each event can be sized and
    refused on its own: the events keep their own bytes, lone surrogates and all. None
    when that does not help (no such escape, another fault, or one outside the events).
    Runs only for a body that failed to decode: the common path never comes here."""
    if not 0 < body.count(b"\\ud") + body.count(b"\\uD") <= MAX_SURROGATE_ESCAPES:
        return None
    lone = _lone_surrogates(body)
    if not lone:
        return None
    marker = b"~lone-surrogate-" + secrets.token_hex(8).encode() + b"-"
    pieces, last = [], 0
    for at in lone:  # `\\ud800` -> marker + `d800`
        pieces += (body[last:at], marker)
        last = at + 2
    pieces.append(body[last:])
    fixed, n = b"".join(pieces), len(lone)
    try:
        envelope = BATCH_DECODER.decode(fixed)
    except BAD_JSON:
        return None
    items = [bytes(raw) for raw in envelope.batch]
    if sum(item.count(marker) for item in items) != n:
        return None  # (one in the envelope: the request as a whole is at fault)
    envelope.batch = [msgspec.Raw(item.replace(marker, b"\\u")) if marker in item else raw
                      for item, raw in zip(items, envelope.batch, strict=True)]
    return envelope


def _text_of(raw: msgspec.Raw | bytes, field: str) -> str:
    """Owned, UTF-8-checked text of raw JSON (msgspec does not check inside strings)."""
    try:
        return str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError("invalid_json", f"invalid UTF-8 at byte {exc.start}", field=field) from None


def _object(raw: msgspec.Raw, field: str) -> str | None:
    """Raw JSON that must be an object (or null), as owned text. Callers skip the call
    for an absent (empty) value, the common case."""
    text = _text_of(raw, field)
    if text[:1] == "{":
        return text
    if text == "null":
        return None
    raise ApiError("invalid_event", "expected an object", field=field)


def _text(value: Id | None) -> str | None:
    if value is None or value == "":
        return None
    return value if type(value) is str else str(value)


def _decode_any(raw: msgspec.Raw, field: str) -> object:
    try:
        return msgspec.json.decode(raw)
    except BAD_JSON as exc:
        raise decode_error(exc, field) from None


def enricher_for(meta: RequestMeta, batch_context: msgspec.Raw = NO_JSON) -> ContextEnricher:
    """The enricher for one request: shared per (ip, user agent) unless the request
    brings a batch-level context to merge."""
    if _absent(batch_context):
        return _plain_enricher(meta.ip, meta.user_agent, meta.ip_mode)
    return ContextEnricher(meta.ip, meta.user_agent, batch_context, ip_mode=meta.ip_mode)


@functools.lru_cache(maxsize=4096)  # (ip, user agent) pairs: most requests repeat one
def _plain_enricher(ip: str | None, user_agent: str | None, ip_mode: str) -> ContextEnricher:
    return ContextEnricher(ip, user_agent, ip_mode=ip_mode)


class ContextEnricher:
    """Adds `ip` and `userAgent` to each event's context unless the client set them.
    An `ip` the client set is stored as `ip_mode` says (privacy.py); an `ip` of None
    adds none.

    Without a batch-level context it splices text (the common, cheap case); with one, it
    merges objects (the batch's keys lose to the event's). Immutable once built.
    """

    def __init__(self, ip: str | None, user_agent: str | None,
                 batch_context: msgspec.Raw = NO_JSON, field: str = "$.context",
                 ip_mode: str = "full") -> None:
        self.ip = ip
        self.ua = user_agent
        self.ip_mode = ip_mode
        items = [b'"ip":' + _JSON.encode(ip)] if ip is not None else []
        if user_agent:
            items.append(b'"userAgent":' + _JSON.encode(user_agent))
        joined = b",".join(items).decode()
        self.fresh = "{" + joined + "}"  # the context of an event that sent none
        # spliced before the rest of the event's own
        self.prefix = "{" + joined + "," if joined else "{"
        self.base: dict | None = None
        if not _absent(batch_context):
            base = _decode_any(batch_context, field)
            if not isinstance(base, dict):
                raise ApiError("invalid_event", "expected an object", field=field)
            self.base = base

    def __call__(self, raw: msgspec.Raw, field: str) -> str:
        if self.base is None:
            data = _object(raw, field) if raw else None
            if data is None:
                return self.fresh
            rest = data[1:]
            if rest.lstrip()[:1] == "}":
                return self.fresh
            if '"ip"' not in data and '"userAgent"' not in data:
                return self.prefix + rest
        return self._merge(raw, field)

    def many(self, raws: tuple[msgspec.Raw, ...]) -> list[str] | str | None:
        """`__call__` for a batch's contexts at once, spliced with C-speed string
        operations: one shared text when no event sent a context, else a list. None
        when an event needs `__call__` itself (a merge, or a fault to name)."""
        if self.base is not None:
            return None
        if not any(raws):
            return self.fresh
        joined = b"".join(raws)
        if b'"ip"' in joined or b'"userAgent"' in joined:
            return None
        texts = _objects(raws)
        if texts is _BAD:
            return None
        fresh, prefix = self.fresh, self.prefix
        return [prefix + t[1:] if t is not None and t[1:2] == '"' else  # {"key"...
                fresh if t is None or t[1:].lstrip()[:1] == "}" else prefix + t[1:]
                for t in texts]

    def _merge(self, raw: msgspec.Raw, field: str) -> str:
        ctx = dict(self.base or {})
        if not _absent(raw):
            own = _decode_any(raw, field)
            if not isinstance(own, dict):
                raise ApiError("invalid_event", "expected an object", field=field)
            ctx.update(own)
        if self.ip_mode != "full" and "ip" in ctx:  # the client's own: as ip_mode says
            ip = ctx["ip"]
            ip = anonymize_ip(ip, self.ip_mode) if isinstance(ip, str) else None
            if ip is None:
                del ctx["ip"]
            else:
                ctx["ip"] = ip
        if self.ip is not None:
            ctx.setdefault("ip", self.ip)
        if self.ua:
            ctx.setdefault("userAgent", self.ua)
        return _JSON.encode(ctx).decode()


def flag_adjusted(context: str) -> str:
    """`context` (an object's text) with `"timestamp_adjusted": true` in it: the event's
    `timestamp` is its receive time, not the (future or out-of-range) time it sent."""
    if f'"{ADJUSTED}"' in context:  # (the client's own key: replaced, not doubled)
        data = msgspec.json.decode(context)
        data[ADJUSTED] = True
        return _JSON.encode(data).decode()
    rest = context[1:]
    return _FLAG + ("}" if rest.lstrip()[:1] == "}" else "," + rest)


def _need(value: object, kind: str, field: str) -> None:
    if value is None or value == "":
        raise ApiError("invalid_event", f"{field} is required for {kind}", field=f"$.{field}")


def to_row(ev: WireEvent, project: str, meta: RequestMeta, enrich: ContextEnricher,
           intake: Intake | None = None, *, kind: str | None = None,
           sent_at: datetime | None = None, integrations: msgspec.Raw = NO_JSON,
           make_id: bool = True, max_skew_us: int = MAX_FUTURE_SKEW_US,
           max_id_chars: int = MAX_MESSAGE_ID_CHARS) -> Row | None:
    """Validate one decoded event and normalize it into a stored row.

    With an `intake`, the valid event is admitted there: None if its `messageId` is a
    repeat, else the row gets its session (and a `timestamp` no earlier than the
    session's start, see sessions.py) and is appended to `intake.rows` (after the
    session's start row, if it opens one). Field paths in errors are relative to the
    event (`$.userId`); a batch prefixes them. Without `make_id`, an event the client gave
    no `messageId` keeps `None` and DuckDB makes its UUID at load (for batches, whose
    answer names no ids: far cheaper there). A `timestamp` more than `max_skew_us` after
    the receive time, or outside 1970-9999, is stored as the receive time, flagged in
    `context` (`flag_adjusted`); a `messageId` over `max_id_chars` is refused.
    This runs once per stored event: keep it free of needless calls and formatting.
    """
    kind = kind or ev.type
    if kind not in TYPES:
        message = "type is required" if kind is None else \
            f"unknown type {kind!r}; expected one of {', '.join(sorted(TYPES))}"
        raise ApiError("invalid_event", message, field="$.type")
    anonymous_id = ev.anonymousId
    if type(anonymous_id) is not str or not anonymous_id:
        anonymous_id = _text(anonymous_id)
    user_id = ev.userId
    if type(user_id) is not str or not user_id:
        user_id = _text(user_id)
    if anonymous_id is None and user_id is None:
        raise ApiError("invalid_event", "anonymousId or userId is required",
                       field="$.anonymousId")
    group_id, previous_id = ev.groupId, ev.previousId
    if group_id is not None or previous_id is not None:
        group_id, previous_id = _text(group_id), _text(previous_id)
    if kind == "track":
        if not ev.event:
            _need(ev.event, kind, "event")
    elif kind == "group":
        _need(group_id, kind, "groupId")
    elif kind == "alias":
        _need(previous_id, kind, "previousId")
    integrations = ev.integrations or integrations
    received = meta.received_at
    client_time = ev.timestamp or ev.originalTimestamp
    sent = ev.sentAt or sent_at
    sent_us = to_micros(sent) if sent is not None else None
    adjusted = False
    if client_time is None:
        original = None
        timestamp = received
    else:
        original = to_micros(client_time)
        # Segment's skew correction: the device clock's error is sentAt - receivedAt.
        timestamp = original if sent_us is None else received - (sent_us - original)
        if not 0 <= timestamp <= received + max_skew_us or timestamp > MAX_TIME_US:
            adjusted = True
            timestamp = received
    message_id = ev.messageId
    if message_id is not None and len(message_id) > max_id_chars:
        raise ApiError("invalid_event", f"messageId is longer than {max_id_chars} characters "
                       "(max_message_id_chars)", field="$.messageId")
    # Every check is done before the intake: an admitted event is always stored.
    properties = _object(ev.properties, "$.properties") if ev.properties else None
    traits = _object(ev.traits, "$.traits") if ev.traits else None
    context = enrich(ev.context, "$.context")
    if adjusted:
        context = flag_adjusted(context)
    integrations = _object(integrations, "$.integrations") if integrations else None
    session_id = None
    if intake is not None:
        if message_id and not intake.fresh(project, message_id):
            return None
        session_id, timestamp = intake.session(
            (project, "http", anonymous_id if anonymous_id is not None else user_id),
            anonymous_id, user_id, timestamp)
    row = _new_row(Row, (
        message_id or (new_id() if make_id else None), project, "http", kind, ev.event,
        ev.name, anonymous_id, user_id, group_id, previous_id, session_id,
        timestamp, original, sent_us, received, properties, traits, context, integrations,
    ))
    if intake is not None:
        intake.rows.append(row)
    return row


_FAST_TYPES = frozenset({"track", "page", "identify", "screen"})  # no id beyond the user's
_ID_TYPES = frozenset({str, type(None)})
_astuple = msgspec.structs.astuple
_BAD = object()  # a value `to_row` would refuse


def batch_columns(events: list[WireEvent], project: str, meta: RequestMeta,
                  enrich: ContextEnricher, intake: Intake, *, sent_at: datetime | None = None,
                  integrations: msgspec.Raw = NO_JSON, max_skew_us: int = MAX_FUTURE_SKEW_US,
                  max_id_chars: int = MAX_MESSAGE_ID_CHARS) -> Columns | None:
    """The rows of a batch whose events are all plainly valid, by column, checked with
    C-speed list and set operations instead of `to_row` per event. None, with nothing
    touched, when any event needs a closer look: `to_row` then goes event by event,
    names each fault, and makes the same rows (tests/test_collector_fuzz.py checks that
    both give the same rows). Dedup and sessions are touched only once every event has
    passed, in event order, as `to_row` would. A batch of repeats has `count` 0.
    (µs per event at 100-event batches: see docs/performance.md.)"""
    n = len(events)
    (types, names_of_events, names, anon, users, groups, previous, mids, stamps, originals,
     sents, contexts, props, traits, integs, _) = zip(*map(_astuple, events), strict=True)
    kinds = set(types)
    if not kinds <= _FAST_TYPES or groups.count(None) != n or previous.count(None) != n:
        return None
    if not (_ID_TYPES.issuperset(map(type, anon)) and _ID_TYPES.issuperset(map(type, users))) \
            or "" in anon or "" in users:
        return None  # numbers and empty strings: `to_row` turns them into text or None
    if None in anon and any(a is None and u is None for a, u in zip(anon, users, strict=True)):
        return None
    if "track" in kinds and (None in names_of_events or "" in names_of_events) and (
            len(kinds) == 1 or any(t == "track" and not e
                                   for t, e in zip(types, names_of_events, strict=True))):
        return None
    properties, trait_texts = _objects(props), _objects(traits)
    if any(integs):
        integration_texts = _objects([i or integrations for i in integs])
    else:
        integration_texts = _objects([integrations])
        integration_texts = integration_texts[0] if type(integration_texts) is list else \
            integration_texts
    if _BAD in (properties, trait_texts, integration_texts):
        return None
    context = enrich.many(contexts)
    if context is None:
        try:
            context = [enrich(c, "$.context") for c in contexts] if any(contexts) else \
                enrich(NO_JSON, "$.context")
        except ApiError:
            return None
    received = meta.received_at
    sent_default = to_micros(sent_at) if sent_at is not None else None
    sent: list | int | None = sent_default if sents.count(None) == n else \
        [to_micros(s) if s is not None else sent_default for s in sents]
    if stamps.count(None) == n and originals.count(None) == n:
        timestamp: list | int = received
        original: list | None = None
    else:
        timestamp, original = _skew_corrected(stamps, originals, sent, received)
        if max(timestamp) > min(received + max_skew_us, MAX_TIME_US) or min(timestamp) < 0:
            return None  # a time to replace and flag: `to_row` does it
    if mids.count(None) != n and max(map(len, filter(None, mids)), default=0) > max_id_chars:
        return None  # an id too long: `to_row` names it
    # Every check is done: from here the events are admitted (as to_row does per event).
    ids: tuple | list | None = None
    keep = None
    if mids.count(None) != n:
        ids = [m or None for m in mids] if "" in mids else list(mids)
        admitted = intake.fresh_all(project, ids)
        if False in admitted:
            keep = admitted
    columns = [ids, project, "http", types, names_of_events, names, anon, users, None, None,
               None, timestamp, original, sent, received, properties, trait_texts, context,
               integration_texts]
    if keep is not None:  # repeats are answered as stored, and not stored again
        columns = [[v for v, k in zip(c, keep, strict=True) if k]
                   if type(c) in (list, tuple) else c for c in columns]
        n = keep.count(True)
        anon, users = columns[6], columns[7]
    if not n:
        return Columns(0, [])
    keys = anon if None not in anon else \
        [a if a is not None else u for a, u in zip(anon, users, strict=True)]
    if keys.count(keys[0]) == n:  # one client's batch: one session, one lookup
        columns[10], columns[11] = intake.session((project, "http", keys[0]), anon[0],
                                                  users[0], columns[11], n)
    else:  # each event on its own, as `to_row` goes (the same start and event stamps)
        session = intake.session
        times = columns[11] if type(columns[11]) is list else [columns[11]] * n
        stamped = [session((project, "http", k), a, u, t)
                   for k, a, u, t in zip(keys, anon, users, times, strict=True)]
        columns[10] = [sid for sid, _ in stamped]
        columns[11] = [t for _, t in stamped]
    return Columns(n, [_shared_or_list(c, n) if type(c) in (list, tuple) else c
                       for c in columns])


def _objects(raws) -> list[str | None] | object | None:
    """Raw JSON values that must each be an object or null, as texts (None for an absent
    or null one); None when all are absent; `_BAD` when one is not an object or not
    UTF-8. One decode and one split for all: valid JSON holds no NUL byte."""
    if not any(raws):
        return None
    data = b"\0".join(raws)
    try:
        texts = str(data, "utf-8").split("\0")
    except UnicodeDecodeError:
        return _BAD
    if len(texts) != len(raws):
        return _BAD
    if (data[:1] == b"{") + data.count(b"\0{") == len(texts):
        return texts
    texts = [t if t[:1] == "{" else None if t in ("", "null") else _BAD for t in texts]
    return _BAD if _BAD in texts else texts


def _skew_corrected(stamps: tuple, originals: tuple, sent: list | int | None,
                    received: int) -> tuple[list[int], list[int | None]]:
    """Per event: (timestamp, original timestamp), by Segment's rule as `to_row` has it."""
    timestamps: list[int] = []
    client: list[int | None] = []
    sents = sent if type(sent) is list else [sent] * len(stamps)
    for stamp, original, sent_us in zip(stamps, originals, sents, strict=True):
        t = stamp or original
        if t is None:
            timestamps.append(received)
            client.append(None)
            continue
        us = to_micros(t)
        client.append(us)
        timestamps.append(us if sent_us is None else received - (sent_us - us))
    return timestamps, client


def _shared_or_list(values: tuple | list, n: int):
    """The one value all `n` events share, else the values as a list."""
    first = values[0]
    return first if values.count(first) == n else list(values)
