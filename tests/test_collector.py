"""collector.py: the Collector document's examples, Segment endpoints, keys, bodies, batches."""

from __future__ import annotations

import base64
import gzip
import json
from datetime import UTC, datetime

import pytest
from seed_examples import CURL_BODY

from triolytics.core.capture import RequestMeta
from triolytics.core.collector import BatchRejected, Collector
from triolytics.core.config import Config
from triolytics.core.errors import ApiError

KEY = "wk_123456789"
RECEIVED = int(datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()) * 1_000_000
META = RequestMeta(RECEIVED, "198.51.100.4", "curl/8.5.0")
JSON_HEADERS = {b"content-type": b"application/json", b"x-write-key": KEY.encode()}

# The Collector document's three examples, as the bytes each client puts on the wire.
# JSON.stringify(payload) in a browser (navigator.userAgent / navigator.language filled in).
UA = "Mozilla/5.0 (X11; Linux x86_64; rv:126.0) Gecko/20100101 Firefox/126.0"
FETCH_BODY = ('{"type":"track","event":"Added to Cart","anonymousId":"user-session-id-123",'
              '"context":{"userAgent":"' + UA + '","locale":"en-US"},'
              '"properties":{"productId":"p_99","price":29.99}}').encode()
# requests.post(url, json=payload): json.dumps with its default separators.
PY_BODY = (b'{"type": "track", "event": "Order Completed", "userId": "u_8823", '
           b'"timestamp": "2024-05-01T11:59:58.123456", '
           b'"properties": {"orderId": "ord_555", "total": 120.5, "currency": "USD"}}')


def collector(**config) -> Collector:
    return Collector(Config(**config), {KEY: "default", "wk_shop": "shop"})


def capture(body: bytes, headers=None, kind=None, **config):
    return collector(**config).capture(kind, JSON_HEADERS if headers is None else headers,
                                       body, META)


def batch(body: bytes | dict, headers=None, **config):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return collector(**config).batch(JSON_HEADERS if headers is None else headers, raw, META)


def refusal(fn, *args, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args, **kw)
    return info.value


EVENT = {"type": "track", "event": "E", "anonymousId": "a"}


# --- the document's examples -----------------------------------------------------------

def test_curl_example():
    got = capture(CURL_BODY)
    (row,) = got.events()
    assert got.status == 201
    assert json.loads(got.body) == {"ok": True, "id": row.message_id}
    assert (row.project, row.type, row.event, row.anonymous_id) == \
        ("default", "track", "Button Clicked", "550e8400-e29b-41d4-a716-446655440000")
    assert json.loads(row.properties) == {"button_id": "signup_hero", "color": "blue"}
    assert json.loads(row.context) == {"ip": "198.51.100.4", "userAgent": "curl/8.5.0"}
    assert row.timestamp == row.received_at == RECEIVED
    assert got.keys == []  # a server-made id needs no dedup
    start = got.rows[0]  # the session it opened, just before it
    assert (start.type, start.session_id, start.anonymous_id) == \
        ("session_start", row.session_id, row.anonymous_id)
    assert row.session_id is not None


def test_fetch_example():
    headers = {b"content-type": b"application/json", b"x-write-key": KEY.encode()}
    got = capture(FETCH_BODY, headers)
    (row,) = got.events()
    assert got.status == 201
    assert json.loads(got.body) == {"ok": True, "id": row.message_id}
    assert (row.event, row.anonymous_id) == ("Added to Cart", "user-session-id-123")
    assert json.loads(row.properties) == {"productId": "p_99", "price": 29.99}
    assert json.loads(row.context) == {"ip": "198.51.100.4", "userAgent": UA, "locale": "en-US"}


def test_python_example():
    payload = {"type": "track", "event": "Order Completed", "userId": "u_8823",
               "timestamp": datetime(2024, 5, 1, 11, 59, 58, 123456).isoformat(),
               "properties": {"orderId": "ord_555", "total": 120.50, "currency": "USD"}}
    assert json.dumps(payload).encode() == PY_BODY  # what requests' json= sends
    got = capture(PY_BODY)
    (row,) = got.events()
    assert got.status == 201
    assert json.loads(got.body) == {"ok": True, "id": row.message_id}
    assert (row.user_id, row.anonymous_id, row.event) == ("u_8823", None, "Order Completed")
    expected = int(datetime(2024, 5, 1, 11, 59, 58, tzinfo=UTC).timestamp()) * 1_000_000 + 123456
    assert row.timestamp == row.original_timestamp == expected
    assert json.loads(row.properties) == {"orderId": "ord_555", "total": 120.5, "currency": "USD"}


# --- Segment's /v1/<type> ---------------------------------------------------------------

@pytest.mark.parametrize("kind,extra", [
    ("track", {"event": "E"}), ("page", {"name": "Home"}), ("identify", {"traits": {"a": 1}}),
    ("screen", {"name": "S"}), ("group", {"groupId": "g"}), ("alias", {"previousId": "p"})])
def test_typed_endpoints_answer_segment_style(kind, extra):
    got = capture(json.dumps({"userId": "u", **extra}).encode(), kind=kind)
    (row,) = got.events()
    assert got.status == 200
    assert json.loads(got.body) == {"success": True, "id": row.message_id}
    assert row.type == kind


# --- write keys ------------------------------------------------------------------------

def basic(user: str, password: str = "") -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.mark.parametrize("headers,body_key,project", [
    ({b"x-write-key": b"wk_shop"}, None, "shop"),
    ({b"authorization": basic("wk_shop")}, None, "shop"),
    ({b"authorization": basic(KEY)}, None, "default"),
    ({}, "wk_shop", "shop"),
    ({b"x-write-key": b"wk_shop"}, "nope", "shop"),  # header first
    ({b"x-write-key": b"wk_shop", b"authorization": basic(KEY)}, None, "shop"),
])
def test_write_key_sources(headers, body_key, project):
    event = {**EVENT, "writeKey": body_key} if body_key else EVENT
    got = capture(json.dumps(event).encode(), {b"content-type": b"application/json", **headers})
    assert got.events()[0].project == project


def test_batch_level_write_key():
    got = batch({"writeKey": "wk_shop", "batch": [EVENT]}, {b"content-type": b"application/json"})
    assert got.events()[0].project == "shop"
    got = batch({"batch": [{**EVENT, "writeKey": "wk_shop"}]}, {})
    assert got.events()[0].project == "shop"


@pytest.mark.parametrize("headers,body,code", [
    ({}, EVENT, "missing_write_key"),
    ({b"x-write-key": b""}, EVENT, "missing_write_key"),
    ({b"authorization": basic("")}, EVENT, "missing_write_key"),
    ({b"x-write-key": b"wk_nope"}, EVENT, "unknown_write_key"),
    ({b"authorization": basic("wk_nope")}, EVENT, "unknown_write_key"),
    ({}, {**EVENT, "writeKey": "wk_nope"}, "unknown_write_key"),
    ({b"authorization": b"Basic !!!"}, EVENT, "unauthorized"),
])
def test_write_key_refusals(headers, body, code):
    err = refusal(capture, json.dumps(body).encode(), headers)
    assert (err.code, err.status) == (code, 401)
    err = refusal(batch, {"batch": [body]}, headers)
    assert (err.code, err.status) == (code, 401)


# --- body decoding ---------------------------------------------------------------------

@pytest.mark.parametrize("media", [b"text/plain", b"text/plain;charset=UTF-8",
                                   b"application/json; charset=utf-8"])
def test_json_and_beacon_media_types(media):
    got = capture(json.dumps(EVENT).encode(), {b"content-type": media, b"x-write-key": b"wk_shop"})
    assert got.events()[0].event == "E"


def test_form_encoding_refused():
    headers = {b"content-type": b"application/x-www-form-urlencoded", b"x-write-key": b"wk_shop"}
    err = refusal(capture, json.dumps(EVENT).encode(), headers)
    assert (err.code, err.status) == ("unsupported_media_type", 415)


def gz_headers(encoding: bytes = b"gzip") -> dict:
    return {**JSON_HEADERS, b"content-encoding": encoding}


def test_gzip_body():
    got = capture(gzip.compress(CURL_BODY), gz_headers())
    assert got.events()[0].event == "Button Clicked"
    got = batch(gzip.compress(json.dumps({"batch": [EVENT, EVENT]}).encode()), gz_headers())
    assert len(got.events()) == 2


def test_multi_member_gzip_decoded_whole():
    # RFC 1952 2.2: a gzip stream is a series of members (as `cat a.gz b.gz` or a flushing
    # compressor produces); gzip.decompress() and curl/zcat read them all.
    body = gzip.compress(b'{"batch":[{"type":"page","userId":"u"},') + \
        gzip.compress(b'{"type":"page","userId":"v"}]}')
    got = batch(body, gz_headers())
    assert [r.user_id for r in got.events()] == ["u", "v"]


def test_gzip_bomb_refused():
    bomb = gzip.compress(b" " * (4 << 20))  # 4 MiB of whitespace, ~4 KiB compressed
    err = refusal(capture, bomb, gz_headers(), max_decompressed_bytes=64 * 1024)
    assert (err.code, err.status) == ("payload_too_large", 413)
    err = refusal(batch, bomb, gz_headers(), max_decompressed_bytes=64 * 1024)
    assert (err.code, err.status) == ("payload_too_large", 413)


def test_brotli_refused():
    err = refusal(capture, b"\x1b\x00", gz_headers(b"br"))
    assert (err.code, err.status) == ("unsupported_encoding", 415)


@pytest.mark.parametrize("cut", [10, 4, 0.5])
def test_truncated_gzip_is_bad_request(cut):
    whole = gzip.compress(CURL_BODY)
    body = whole[:int(len(whole) * cut)] if isinstance(cut, float) else whole[:-cut]
    err = refusal(capture, body, gz_headers())
    assert (err.code, err.status) == ("bad_request", 400)


def test_not_gzip_is_bad_request():
    err = refusal(capture, CURL_BODY, gz_headers())
    assert (err.code, err.status) == ("bad_request", 400)


def test_event_over_max_event_bytes():
    big = json.dumps({**EVENT, "properties": {"pad": "x" * 33_000}}).encode()
    err = refusal(capture, big)
    assert (err.code, err.status) == ("payload_too_large", 413)
    err = refusal(capture, gzip.compress(big), gz_headers())  # size after gzip counts
    assert (err.code, err.status) == ("payload_too_large", 413)


# --- batches ---------------------------------------------------------------------------

def test_batch_mixed_valid_and_invalid():
    items = [EVENT, {"type": "track", "userId": "u"}, {**EVENT, "userId": [1]}, EVENT, [1],
             {**EVENT, "properties": {"pad": "x" * 33_000}}]
    got = batch({"batch": items})
    assert got.status == 200
    assert len(got.events()) == 2
    reply = json.loads(got.body)
    assert (reply["success"], reply["stored"]) == (True, 2)
    assert [(r["index"], r["code"], r["field"]) for r in reply["rejected"]] == [
        (1, "invalid_event", "$.batch[1].event"),
        (2, "invalid_event", "$.batch[2].userId"),
        (4, "invalid_event", "$.batch[4]"),
        (5, "payload_too_large", "$.batch[5]"),
    ]
    assert all(r["message"] for r in reply["rejected"])


def test_batch_all_valid_has_no_rejected():
    got = batch({"batch": [EVENT] * 3})
    assert json.loads(got.body) == {"success": True, "stored": 3}


def test_batch_all_invalid_lists_every_index():
    items = [{"type": "track", "userId": "u"}, {"type": "nope", "userId": "u"}, {"type": "page"}]
    with pytest.raises(BatchRejected) as info:
        batch({"batch": items})
    err = info.value
    assert (err.status, err.code) == (400, "invalid_event")
    reply = json.loads(err.as_body())
    assert reply["error"]["code"] == "invalid_event"
    assert [(r["index"], r["field"]) for r in reply["rejected"]] == [
        (0, "$.batch[0].event"), (1, "$.batch[1].type"), (2, "$.batch[2].anonymousId")]


def test_empty_batch():
    err = refusal(batch, {"batch": []})
    assert (err.code, err.status, err.field) == ("invalid_event", 400, "$.batch")


def test_batch_over_max_events():
    err = refusal(batch, {"batch": [EVENT] * 4}, max_batch_events=3)
    assert (err.code, err.status) == ("payload_too_large", 413)
    assert len(batch({"batch": [EVENT] * 3}, max_batch_events=3).events()) == 3


def test_batch_envelope_applies_to_events():
    got = batch({"sentAt": "2024-05-01T10:00:10Z", "context": {"library": {"name": "py"}},
                 "batch": [{**EVENT, "timestamp": "2024-05-01T10:00:00Z"},
                           {**EVENT, "context": {"library": {"name": "own"}}}]})
    first, second = got.events()
    assert first.timestamp == RECEIVED - 10_000_000
    assert json.loads(first.context) == {"ip": "198.51.100.4", "userAgent": "curl/8.5.0",
                                         "library": {"name": "py"}}
    assert json.loads(second.context)["library"] == {"name": "own"}


def test_batch_context_error_path():
    got = batch({"batch": [EVENT, {**EVENT, "context": [1]}]})
    assert [(r["index"], r["field"]) for r in json.loads(got.body)["rejected"]] == \
        [(1, "$.batch[1].context")]


def test_client_ids_are_dedup_keys():
    items = [{**EVENT, "messageId": "m0"}, EVENT, {"type": "track", "userId": "u"},
             {**EVENT, "messageId": "m3"}, {**EVENT, "messageId": ""}]
    got = batch({"batch": items})
    assert got.keys == ["default\x1fm0", "default\x1fm3"]
    assert [r.message_id for r in got.events()][0::2] == ["m0", "m3"]
    assert got.events()[1].message_id is None  # DuckDB makes it at load (see test_store)
    assert capture(json.dumps({**EVENT, "messageId": "x"}).encode()).keys == ["default\x1fx"]
    assert capture(json.dumps(EVENT).encode()).events()[0].message_id != "x"


def test_batch_event_with_invalid_utf8_rejected_alone():
    body = (b'{"batch":[{"type":"track","event":"ok","userId":"u"},'
            b'{"type":"track","event":"\xff","userId":"u"}]}')
    got = batch(body)
    assert [r.event for r in got.events()] == ["ok"]
    assert [(r["index"], r["code"]) for r in json.loads(got.body)["rejected"]] == \
        [(1, "invalid_json")]


def test_batch_nested_beyond_parser_limit_is_refused_whole():
    # JSON nested deeper than the parser's recursion limit cannot even be split into
    # events, so the request as a whole is malformed: 400, nothing stored.
    deep = b"[" * 5000 + b"]" * 5000
    body = (b'{"batch":[{"type":"page","userId":"u","properties":{"a":' + deep + b'}},'
            b'{"type":"page","userId":"u"}]}')
    err = refusal(batch, body)
    assert (err.code, err.status) == ("invalid_json", 400)


def test_batch_event_deep_but_parseable_rejected_alone():
    # Nesting within the limit but an invalid type deep inside: only that event fails.
    body = (b'{"batch":[{"type":"page","userId":"u","properties":' + b"[" * 50 + b"]" * 50
            + b'},{"type":"page","userId":"u"}]}')
    got = batch(body)
    assert len(got.events()) == 1
    assert [r["index"] for r in json.loads(got.body)["rejected"]] == [0]


def test_capture_invalid_utf8_is_400():
    err = refusal(capture, b'{"type":"track","event":"\xff","userId":"u"}')
    assert (err.code, err.status) == ("invalid_json", 400)


# --- a session's rows sort as a session, whatever the clients' clocks say ---------------

LATER = RECEIVED + 2 * 365 * 86_400_000_000  # received two years after the events' times


def stored_order(accepted: list) -> list:
    """`ORDER BY timestamp, ingest_seq` of what the requests stored, in arrival order."""
    rows = [r for a in accepted for r in a.rows + (a.columns.rows() if a.columns else [])]
    return [r for _, r in sorted(enumerate(rows), key=lambda p: (p[1].timestamp, p[0]))]


HOUR, YEAR = 3600_000_000, 365 * 86_400_000_000


@pytest.mark.parametrize("by_column", [True, False], ids=["by_column", "by_event"])
def test_http_sessions_sort_start_first_and_end_last_whatever_the_clocks(by_column):
    c = collector()
    meta = RequestMeta(LATER, "198.51.100.4", "curl/8.5.0")
    one = json.dumps({**EVENT, "event": "one", "timestamp": "2024-05-01T12:00:05Z",
                      "sentAt": "2024-05-01T12:00:10Z"}).encode()  # a clock 2 years slow
    first = c.capture(None, JSON_HEADERS, one, meta)
    start, event = first.rows
    assert start.timestamp == event.timestamp == LATER - 5_000_000  # skew-corrected
    assert start.received_at == LATER
    # Sent a minute later, with sentAt: after skew correction one event predates the
    # session's start, one is 20 h ahead (under max_future_skew_s). Taken by column,
    # or event by event.
    later = RequestMeta(LATER + 60_000_000, "198.51.100.4", "curl/8.5.0")
    events = [{**EVENT, "event": "before", "timestamp": "2024-05-01T11:00:00Z"},
              {**EVENT, "event": "ahead", "timestamp": "2024-05-02T09:00:00Z"}]
    if not by_column:
        events.append({"type": "group", "groupId": 7, "anonymousId": "a"})  # (by event)
    body = json.dumps({"sentAt": "2024-05-01T13:00:00Z", "batch": events}).encode()
    second = c.batch(JSON_HEADERS, body, later)
    assert (second.columns is not None) == by_column
    before, ahead = second.events()[:2]
    assert before.original_timestamp == RECEIVED - HOUR  # the client's own time, kept
    assert before.timestamp == start.timestamp  # (corrected: LATER - 2 h, also before)
    assert ahead.timestamp == LATER + 60_000_000 + 20 * HOUR
    [end] = c.sessions.expire(LATER + 2 * YEAR, 10)
    assert end.timestamp == ahead.timestamp  # after its latest event, not before
    assert json.loads(end.properties) == {"duration_ms": 60_000,
                                          "event_count": 3 + (not by_column)}
    types = [r.event or r.type for r in stored_order([first, second]) + [end]]
    assert types[0] == "session_start" and types[-1] == "session_end"
    assert types.index("one") < types.index("before")  # a tie, broken by arrival
    assert {r.session_id for r in first.rows + second.events() + [end]} == {start.session_id}


def test_a_capture_without_sent_at_years_before_receipt_starts_its_session_then():
    c = collector()
    got = c.capture(None, JSON_HEADERS, PY_BODY, RequestMeta(LATER, "198.51.100.4", None))
    start, row = got.rows
    assert start.timestamp == row.timestamp == row.original_timestamp < LATER


def test_a_batch_for_many_users_starts_each_session_at_its_own_earliest_time():
    body = {"batch": [{**EVENT, "anonymousId": a, "timestamp": t} for a, t in [
        ("a", "2024-05-01T11:00:00Z"), ("b", "2024-05-01T11:30:00Z"),
        ("a", "2024-05-01T10:00:00Z"), ("b", "2024-05-01T13:00:00Z")]]}
    got = batch(body)
    assert got.columns is not None
    starts = {r.anonymous_id: r.timestamp for r in got.rows}
    assert starts == {"a": RECEIVED - 7200_000_000, "b": RECEIVED - 1800_000_000}
    assert [r.timestamp for r in got.events()] == [
        RECEIVED - 3600_000_000, RECEIVED - 1800_000_000, RECEIVED - 7200_000_000,
        RECEIVED + 3600_000_000]  # none moved: their sessions start here


# --- duplicate JSON keys: msgspec keeps the last value of a field; nested objects are
# stored as sent (DuckDB's JSON functions then read the first). docs/api.md says so.

def test_a_duplicate_top_level_key_resolves_to_the_last_value():
    body = (b'{"type":"track","event":"first","event":"last","userId":"u1","userId":"u2",'
            b'"properties":{"k":1,"k":2}}')
    row = capture(body).rows[-1]
    assert (row.event, row.user_id) == ("last", "u2")
    assert row.properties == '{"k":1,"k":2}'  # kept as sent, duplicates and all


def test_a_duplicate_key_in_a_batch_envelope_resolves_to_the_last_value():
    body = (b'{"batch":[{"type":"track","event":"a","userId":"u"}],'
            b'"batch":[{"type":"track","event":"b","userId":"u"},'
            b'{"type":"track","event":"c","userId":"u"}]}')
    accepted = batch(body)
    assert [r.event for r in accepted.events()] == ["b", "c"]


# --- the input policy: event times in the future or outside 1970-9999 are replaced by
# the receive time and flagged in context; messageId has at most 100 characters.

HOUR_S = 3600


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat().replace("+00:00", "Z")


def test_a_time_more_than_23_hours_ahead_is_stored_as_the_receive_time_and_flagged():
    ahead, ok = RECEIVED + 23 * HOUR_S * 10**6 + 1, RECEIVED + 23 * HOUR_S * 10**6
    events = [{**EVENT, "event": "ahead", "timestamp": _iso(ahead)},
              {**EVENT, "event": "ok", "timestamp": _iso(ok)}]
    got = batch({"batch": events})
    assert got.columns is None  # (a time to replace: the batch goes event by event)
    row, kept = got.events()[:2]
    assert (row.timestamp, row.original_timestamp) == (RECEIVED, ahead)
    assert json.loads(row.context) == {"timestamp_adjusted": True, "ip": "198.51.100.4",
                                       "userAgent": "curl/8.5.0"}
    assert (kept.timestamp, kept.original_timestamp) == (ok, ok)
    assert "timestamp_adjusted" not in json.loads(kept.context)
    start = got.rows[0]
    assert start.type == "session_start" and start.timestamp == RECEIVED


def test_a_skewed_sent_at_cannot_make_the_year_12025():
    # sentAt 10,000 years before the event's own time: the corrected time is year 12025.
    body = json.dumps({**EVENT, "timestamp": "2025-01-01T00:00:00Z",
                       "sentAt": "0024-05-01T12:00:00Z"}).encode()
    row = capture(body).rows[-1]
    assert row.timestamp == RECEIVED
    assert row.original_timestamp == int(datetime(2025, 1, 1, tzinfo=UTC).timestamp()) * 10**6
    assert json.loads(row.context)["timestamp_adjusted"] is True


def test_a_time_before_1970_is_stored_as_the_receive_time_and_flagged():
    body = json.dumps({**EVENT, "timestamp": "1969-12-31T23:59:59Z"}).encode()
    row = capture(body).rows[-1]
    assert (row.timestamp, row.original_timestamp) == (RECEIVED, -1_000_000)
    assert json.loads(row.context)["timestamp_adjusted"] is True


def test_the_flag_replaces_a_timestamp_adjusted_key_the_client_sent():
    body = json.dumps({**EVENT, "timestamp": "2030-01-01T00:00:00Z",
                       "context": {"timestamp_adjusted": False, "app": 1}}).encode()
    ctx = json.loads(capture(body).rows[-1].context)
    assert ctx == {"timestamp_adjusted": True, "app": 1, "ip": "198.51.100.4",
                   "userAgent": "curl/8.5.0"}


def test_max_future_skew_s_is_the_limit():
    body = json.dumps({**EVENT, "timestamp": _iso(RECEIVED + 61_000_000)}).encode()
    assert capture(body, max_future_skew_s=60).rows[-1].timestamp == RECEIVED
    assert capture(body, max_future_skew_s=61).rows[-1].timestamp == RECEIVED + 61_000_000


@pytest.mark.parametrize("plain", [True, False], ids=["plain", "mixed"])
def test_a_message_id_over_100_characters_rejects_that_event_only(plain):
    events = [{**EVENT, "messageId": "m" * 100}, {**EVENT, "messageId": "é" * 101},
              {**EVENT, "messageId": "x"}]
    if not plain:
        events.append({"type": "group", "groupId": 7, "anonymousId": "a"})  # (by event)
    got = batch({"batch": events})
    reply = json.loads(got.body)
    assert reply["stored"] == len(events) - 1
    assert reply["rejected"] == [{
        "index": 1, "code": "invalid_event", "field": "$.batch[1].messageId",
        "message": "messageId is longer than 100 characters (max_message_id_chars)"}]
    assert [r.message_id for r in got.events()[:2]] == ["m" * 100, "x"]


def test_a_long_message_id_is_refused_on_capture_and_the_limit_is_configurable():
    body = json.dumps({**EVENT, "messageId": "m" * 37}).encode()
    err = refusal(capture, body, max_message_id_chars=36)
    assert (err.status, err.code, err.field) == (400, "invalid_event", "$.messageId")
    assert capture(body).rows[-1].message_id == "m" * 37


# --- a bad string in one event of a batch rejects that event only

GOOD = b'{"type":"track","event":"ok","anonymousId":"a"}'


@pytest.mark.parametrize("bad", [
    rb'{"type":"track","event":"\ud800","anonymousId":"a"}',  # a lone high surrogate
    rb'{"type":"track","event":"x\udc00","anonymousId":"a"}',  # a lone low one
    rb'{"type":"track","event":"E","anonymousId":"a","properties":{"k":"\uD83D\uD83D"}}',
    b'{"type":"track","event":"\xff","anonymousId":"a"}',  # invalid UTF-8 (as before)
    b'{"type":"track","event":"E","anonymousId":"a","properties":{"k":"\xc3"}}',
])
@pytest.mark.parametrize("size", ["small", "large"])  # one decode, or sized event by event
def test_a_bad_string_in_one_event_rejects_that_event_only(bad, size):
    pad = {"small": b"", "large": b" " * 40_000}[size]
    body = b'{"batch":[' + GOOD + b"," + bad + b"," + pad + GOOD + b"]}"
    got = batch(body)
    reply = json.loads(got.body)
    assert reply["stored"] == 2
    [rejected] = reply["rejected"]
    assert (rejected["index"], rejected["code"]) == (1, "invalid_json"), rejected
    assert rejected["field"] in ("$.batch[1]", "$.batch[1].properties"), rejected
    assert [r.event for r in got.events()] == ["ok", "ok"]


def test_a_surrogate_pair_and_escaped_backslashes_are_stored():
    events = b'{"type":"track","event":"\\ud83d\\ude00 \\\\ud800","anonymousId":"a"}'
    got = batch(b'{"batch":[' + events + b"," + GOOD + b"]}")
    assert [r.event for r in got.events()] == ["\U0001F600 \\ud800", "ok"]


@pytest.mark.parametrize("body", [
    rb'{"batch":[{"type":"track","event":"\ud800","anonymousId":"a"}]}',  # its only event
    rb'{"context":{"k":"\ud800"},"batch":[{"type":"track","event":"E","anonymousId":"a"}]}',
    rb'{"batch":[{"type":"track","event":"\ud800","anonymousId":"a"},{]}',  # and broken
])
def test_a_lone_surrogate_outside_a_valid_event_still_refuses_the_request(body):
    err = refusal(batch, body)
    assert err.status == 400 and err.code in ("invalid_json", "invalid_event")
    if b"{]" not in body and b"context" not in body:
        assert isinstance(err, BatchRejected) and err.rejected[0].field == "$.batch[0]"
