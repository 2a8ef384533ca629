"""capture.py: decoding with JSON paths, validation, timestamps, context enrichment, ids."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from triolytics.core.capture import ContextEnricher, RequestMeta, decode_event, new_id, to_row
from triolytics.core.errors import ApiError


def us(*args: int, tz=UTC) -> int:
    """Epoch microseconds of a UTC wall-clock time, computed without the code under test."""
    dt = datetime(*args, tzinfo=tz)
    return int(dt.timestamp()) * 1_000_000 + dt.microsecond


RECEIVED = us(2024, 5, 1, 12, 0, 0)
META = RequestMeta(RECEIVED, "203.0.113.7", "test-agent/1.0")


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def row(data: bytes | dict, meta: RequestMeta = META, **kw):
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return to_row(decode_event(raw), "proj", meta, ContextEnricher(meta.ip, meta.user_agent), **kw)


def refused(data, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        row(data, **kw)
    return info.value


TRACK = {"type": "track", "event": "Signed Up", "anonymousId": "a1"}


# --- decoding: JSON paths --------------------------------------------------------------

def test_wrong_type_names_field_path():
    with pytest.raises(ApiError) as info:
        decode_event(body(type="track", userId=[1, 2]))
    assert (info.value.code, info.value.field, info.value.status) == \
        ("invalid_event", "$.userId", 400)


@pytest.mark.parametrize("raw,field", [
    (body(type="track", timestamp="yesterday"), "$.batch[3].timestamp"),
    (b"[1]", "$.batch[3]"),  # the item itself is at fault
])
def test_prefix_builds_batch_path(raw, field):
    with pytest.raises(ApiError) as info:
        decode_event(raw, "$.batch[3]")
    assert (info.value.code, info.value.field) == ("invalid_event", field)


@pytest.mark.parametrize("prefix,field", [("", "$"), ("$.batch[5]", "$.batch[5]")])
def test_malformed_json_is_invalid_json(prefix, field):
    with pytest.raises(ApiError) as info:
        decode_event(b'{"type": "track", ', prefix)
    assert (info.value.code, info.value.field, info.value.status) == ("invalid_json", field, 400)


# --- validation -------------------------------------------------------------------------

def test_type_required_and_known():
    err = refused({"event": "x", "userId": "u"})
    assert (err.code, err.field) == ("invalid_event", "$.type")
    err = refused({"type": "click", "event": "x", "userId": "u"})
    assert (err.code, err.field) == ("invalid_event", "$.type")
    assert "'click'" in err.message


@pytest.mark.parametrize("event", [None, ""])
def test_track_needs_event(event):
    err = refused({"type": "track", "event": event, "userId": "u"})
    assert (err.code, err.field) == ("invalid_event", "$.event")


@pytest.mark.parametrize("kind,field", [("group", "groupId"), ("alias", "previousId")])
@pytest.mark.parametrize("value", [None, ""])
def test_group_and_alias_need_their_id(kind, field, value):
    err = refused({"type": kind, "userId": "u", field: value})
    assert (err.code, err.field) == ("invalid_event", f"$.{field}")


def test_error_path_is_relative_to_the_event():
    # A batch prefixes it with `$.batch[i]` (see test_collector).
    err = refused({"type": "track", "userId": "u"})
    assert err.field == "$.event"


@pytest.mark.parametrize("ids", [{}, {"anonymousId": "", "userId": ""},
                                 {"anonymousId": None, "userId": None}])
def test_anonymous_or_user_id_required(ids):
    err = refused({"type": "page", **ids})
    assert (err.code, err.field) == ("invalid_event", "$.anonymousId")


def test_either_id_is_enough():
    assert row({"type": "page", "userId": "u1"}).user_id == "u1"
    r = row({"type": "page", "anonymousId": "a1", "userId": ""})
    assert (r.anonymous_id, r.user_id) == ("a1", None)


def test_numeric_ids_become_text():
    r = row({"type": "group", "userId": 8823, "anonymousId": 7, "groupId": 0})
    assert (r.user_id, r.anonymous_id, r.group_id) == ("8823", "7", "0")
    assert row({"type": "alias", "userId": "u", "previousId": 12}).previous_id == "12"


def test_row_fields():
    r = row({**TRACK, "messageId": "m-1", "name": "n", "userId": "u"})
    assert (r.message_id, r.project, r.channel, r.type, r.event, r.name) == \
        ("m-1", "proj", "http", "track", "Signed Up", "n")
    assert (r.received_at, r.session_id) == (RECEIVED, None)


def test_kind_from_path_overrides_body():
    r = row({"anonymousId": "a"}, kind="identify")
    assert r.type == "identify"


def test_properties_kept_as_sent_and_must_be_object():
    raw = b'{"type":"track","event":"e","userId":"u","properties":{"a": [1, 2.5, "x"]}}'
    assert row(raw).properties == '{"a": [1, 2.5, "x"]}'
    err = refused({**TRACK, "properties": [1]})
    assert (err.code, err.field) == ("invalid_event", "$.properties")


@pytest.mark.parametrize("field", ["properties", "traits", "context"])
def test_invalid_utf8_inside_json_is_invalid_json(field):
    raw = b'{"type":"track","event":"e","userId":"u","%s":{"a":"\xff\xfe"}}' % field.encode()
    err = refused(raw)
    assert (err.code, err.field) == ("invalid_json", f"$.{field}")


@pytest.mark.parametrize("field", ["type", "event", "userId"])
def test_invalid_utf8_in_string_field_is_invalid_json(field):
    # JSON text must be UTF-8 (RFC 8259): a client fault, answered 400, never a crash.
    raw = b'{"type":"track","event":"e","userId":"u","%s":"\xff"}' % field.encode()
    with pytest.raises(ApiError) as info:
        decode_event(raw, "$.batch[4]")
    assert (info.value.code, info.value.status) == ("invalid_json", 400)
    assert info.value.field.startswith("$.batch[4]")


def test_deeply_nested_json_is_refused_not_crashing():
    deep = b"[" * 5000 + b"]" * 5000  # 10 kB: well under max_event_bytes
    with pytest.raises(ApiError) as info:
        decode_event(b'{"type":"page","userId":"u","properties":{"a":' + deep + b"}}")
    assert info.value.status == 400


# --- timestamps ------------------------------------------------------------------------

@pytest.mark.parametrize("stamp,expected", [
    ("2024-05-01T11:59:30.250000", us(2024, 5, 1, 11, 59, 30, 250000)),  # naive = UTC
    ("2024-05-01T11:59:30", us(2024, 5, 1, 11, 59, 30)),  # utcnow() with 0 µs
    ("2024-05-01T11:59:30.250Z", us(2024, 5, 1, 11, 59, 30, 250000)),
    ("2024-05-01T13:59:30.25+02:00", us(2024, 5, 1, 11, 59, 30, 250000)),
    ("2024-05-01T06:29:30-05:30", us(2024, 5, 1, 11, 59, 30)),
])
def test_client_timestamp(stamp, expected):
    r = row({**TRACK, "timestamp": stamp})
    assert (r.timestamp, r.original_timestamp, r.sent_at, r.received_at) == \
        (expected, expected, None, RECEIVED)


def test_utcnow_isoformat_is_utc():
    now = datetime(2024, 5, 1, 11, 58, 1, 654321)  # what datetime.utcnow() returns
    assert row({**TRACK, "timestamp": now.isoformat()}).timestamp == \
        us(2024, 5, 1, 11, 58, 1, 654321)


def test_no_timestamp_means_received():
    r = row(TRACK)
    assert (r.timestamp, r.original_timestamp) == (RECEIVED, None)
    r = row({**TRACK, "sentAt": "2024-05-01T11:00:00Z"})
    assert (r.timestamp, r.sent_at) == (RECEIVED, us(2024, 5, 1, 11, 0, 0))


def test_sent_at_skew_correction():
    # The device clock is 2 h slow: it stamped the event 5 s before sending.
    r = row({**TRACK, "timestamp": "2024-05-01T10:00:00Z", "sentAt": "2024-05-01T10:00:05Z"})
    assert r.timestamp == us(2024, 5, 1, 11, 59, 55)
    assert r.original_timestamp == us(2024, 5, 1, 10, 0, 0)
    assert r.sent_at == us(2024, 5, 1, 10, 0, 5)


def test_skew_correction_with_original_timestamp_and_naive_sent_at():
    r = row({**TRACK, "originalTimestamp": "2024-05-01T14:00:00+02:00",
             "sentAt": "2024-05-01T12:00:10"})
    assert r.timestamp == us(2024, 5, 1, 11, 59, 50)
    assert r.original_timestamp == us(2024, 5, 1, 12, 0, 0)


def test_batch_level_sent_at_and_event_sent_at_wins():
    batch_sent = datetime(2024, 5, 1, 10, 0, 30, tzinfo=UTC)
    r = row({**TRACK, "timestamp": "2024-05-01T10:00:00Z"}, sent_at=batch_sent)
    assert (r.timestamp, r.sent_at) == (us(2024, 5, 1, 11, 59, 30), us(2024, 5, 1, 10, 0, 30))
    r = row({**TRACK, "timestamp": "2024-05-01T10:00:00Z", "sentAt": "2024-05-01T10:00:01Z"},
            sent_at=batch_sent)
    assert r.timestamp == us(2024, 5, 1, 11, 59, 59)


# --- context enrichment ----------------------------------------------------------------

def ctx(raw: bytes | None, meta: RequestMeta = META, batch: bytes | None = None,
        field: str = "$.context") -> dict:
    enrich = ContextEnricher(meta.ip, meta.user_agent,
                             msgspec.Raw(batch) if batch else msgspec.Raw())
    text = enrich(msgspec.Raw(raw) if raw is not None else msgspec.Raw(), field)
    return json.loads(text)


FRESH = {"ip": "203.0.113.7", "userAgent": "test-agent/1.0"}


@pytest.mark.parametrize("raw", [None, b"{}", b"{ }", b"{\n}", b"null"])
def test_empty_context_gets_ip_and_user_agent(raw):
    assert ctx(raw) == FRESH


def test_client_context_kept_and_enriched():
    assert ctx(b'{"locale":"en-US","library":{"name":"x"}}') == \
        {**FRESH, "locale": "en-US", "library": {"name": "x"}}
    assert ctx(b"{}", RequestMeta(RECEIVED, "::1")) == {"ip": "::1"}  # no User-Agent


def test_client_ip_and_user_agent_win():
    assert ctx(b'{"ip":"10.0.0.1"}') == {"ip": "10.0.0.1", "userAgent": "test-agent/1.0"}
    assert ctx(b'{"userAgent":"Mozilla/5.0"}') == {"ip": "203.0.113.7", "userAgent": "Mozilla/5.0"}


def test_context_through_to_row():
    r = row({**TRACK, "context": {"locale": "de"}})
    assert json.loads(r.context) == {**FRESH, "locale": "de"}


def test_null_json_fields_are_absent():
    # `"context": null` etc. as decoded from a real body: the same as leaving them out.
    r = row({**TRACK, "context": None, "properties": None, "traits": None,
             "integrations": None})
    assert json.loads(r.context) == FRESH
    assert (r.properties, r.traits, r.integrations) == (None, None, None)


@pytest.mark.parametrize("raw", [b"[1]", b'"ctx"', b"5", b"true"])
def test_non_object_context_refused_with_path(raw):
    with pytest.raises(ApiError) as info:
        ctx(raw, field="$.batch[1].context")
    assert (info.value.code, info.value.field, info.value.status) == \
        ("invalid_event", "$.batch[1].context", 400)
    with pytest.raises(ApiError) as info:  # also when merging with a batch context
        ctx(raw, batch=b'{"locale":"fr"}', field="$.batch[1].context")
    assert info.value.field == "$.batch[1].context"


def test_batch_context_merged_event_keys_win():
    batch = b'{"locale":"fr","library":{"name":"analytics-python"}}'
    assert ctx(b'{"locale":"en"}', batch=batch) == \
        {**FRESH, "locale": "en", "library": {"name": "analytics-python"}}
    assert ctx(None, batch=batch) == {**FRESH, "locale": "fr",
                                      "library": {"name": "analytics-python"}}
    assert ctx(b"null", batch=b'{"ip":"10.1.1.1"}') == {**FRESH, "ip": "10.1.1.1"}


def test_invalid_utf8_in_batch_context_is_invalid_json():
    with pytest.raises(ApiError) as info:
        ContextEnricher(META.ip, META.user_agent, msgspec.Raw(b'{"a":"\xff"}'), "$.context")
    assert (info.value.code, info.value.field) == ("invalid_json", "$.context")


@pytest.mark.parametrize("raw", [b'{"x":"\xff"}', b'{"ip":"\xff"}'])
@pytest.mark.parametrize("batch", [None, b'{"a":1}'])
def test_invalid_utf8_in_event_context_is_invalid_json(raw, batch):
    with pytest.raises(ApiError) as info:
        ctx(raw, batch=batch, field="$.batch[2].context")
    assert (info.value.code, info.value.field) == ("invalid_json", "$.batch[2].context")


@pytest.mark.parametrize("batch", [b"[]", b'"x"', b"1"])
def test_non_object_batch_context_refused(batch):
    with pytest.raises(ApiError) as info:
        ContextEnricher(META.ip, META.user_agent, msgspec.Raw(batch), "$.context")
    assert (info.value.code, info.value.field) == ("invalid_event", "$.context")


def test_null_batch_context_is_absent():
    enrich = ContextEnricher(META.ip, META.user_agent, msgspec.Raw(b"null"))
    assert json.loads(enrich(msgspec.Raw(b'{"a":1}'), "$.context")) == {**FRESH, "a": 1}


# --- ids -------------------------------------------------------------------------------

def test_new_id_is_v4_uuid_and_distinct():
    ids = [new_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for s in ids[:200]:
        u = uuid.UUID(s)
        assert (u.version, u.variant) == (4, uuid.RFC_4122)
        assert str(u) == s  # canonical lowercase 8-4-4-4-12


@pytest.mark.parametrize("given_id", [None, ""])
def test_missing_message_id_gets_one(given_id):
    r = row({**TRACK, "messageId": given_id})
    assert uuid.UUID(r.message_id).version == 4


# --- property: stored JSON round-trips -------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=20)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@settings(max_examples=150, deadline=None)
@given(props=json_objects, context=st.none() | json_objects, ascii_only=st.booleans())
def test_properties_and_context_round_trip(props, context, ascii_only):
    event = {**TRACK, "properties": props}
    if context is not None:
        event["context"] = context
    r = row(json.dumps(event, ensure_ascii=ascii_only).encode())
    assert json.loads(r.properties) == props
    stored = json.loads(r.context)
    assert isinstance(stored, dict)
    expected = {**FRESH, **(context or {})}
    assert stored == expected
    assert "ip" in stored


@pytest.mark.parametrize("raws", [
    [b"", b"{}", b"{ }", b'{ "a": 1}', b"null", b'{"\xc3\xa9":"\xe2\x98\x83"}'],
    [b'{"ip":"10.0.0.1"}', b"{}"],  # the client's ip wins: each by itself
    [b'{"a":{"ip":1}}'],
    [b"[1]"], [b'{"a":"\xff"}'], [b"", b""],
])
@pytest.mark.parametrize("user_agent", ["curl/8.5.0", None])
def test_a_batchs_contexts_at_once_are_each_as_by_itself(raws, user_agent):
    enrich = ContextEnricher("203.0.113.9", user_agent)
    raws = tuple(msgspec.Raw(r) for r in raws)
    many = enrich.many(raws)
    try:
        each = [enrich(r, "$.context") for r in raws]
    except ApiError:
        assert many is None  # a fault: left to `__call__`, which names it
        return
    assert many is None or (many if type(many) is list else [many] * len(raws)) == each
    assert many is not None or any(b'"ip"' in bytes(r) for r in raws)
