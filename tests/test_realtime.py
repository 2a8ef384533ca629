"""realtime.py, pure: WebSocket messages in, rows or a `FrameError` out.

The document's payload verbatim; all-or-nothing refusals with their JSON path, `seq`
and close code; dedup by `id` before the session; one session touch per batch.
No trio, no sockets, no DuckDB.
"""

from __future__ import annotations

import json
from itertools import count
from pathlib import Path

import msgspec
import pytest
from seed_examples import DOC_PAYLOAD

from triolytics.core.config import Config
from triolytics.core.dedup import Dedup, dedup_key
from triolytics.core.realtime import (
    CLOSE_INVALID,
    CLOSE_POLICY,
    MAX_TS_MS,
    FrameError,
    Realtime,
    decode_frame,
)
from triolytics.core.sessions import Intake, Sessions

S = 1_000_000  # µs
NOW = 1_706_859_100_000_000  # receive time, µs
AID = "0.8d6f1c2e-5b7a-4c39-9e01-3f2a7b6c5d4e"
CONTEXT = '{"ip":"203.0.113.7","userAgent":"AwaazFM/3.1"}'
KEY = ("default", "ws", AID)
# The real-time API document, restated in our docs with its payload byte for byte.
DOC = Path(__file__).resolve().parents[1] / "docs" / "realtime-api.md"


class Env:
    """One connection's `Realtime` with the server's dedup and sessions."""

    def __init__(self, max_events: int = 2500, **config) -> None:
        ids = count(1)
        self.dedup = Dedup(86_400 * S, 10_000)
        self.sessions = Sessions(1800 * S, lambda: f"sid-{next(ids)}")
        self.touches: list[int] = []
        touch = self.sessions.touch_session

        def counting_touch(key, anonymous_id, user_id, now, rows, events=1, first=None):
            self.touches.append(events)
            return touch(key, anonymous_id, user_id, now, rows, events, first)
        self.sessions.touch_session = counting_touch
        self.rt = Realtime(Config(ws_max_batch_events=max_events, **config), "default", AID,
                           CONTEXT)

    def batch(self, data, now: int = NOW):
        return self.rt.batch(data, Intake(self.dedup, self.sessions, now))

    def refusal(self, data) -> FrameError:
        with pytest.raises(FrameError) as info:
            self.batch(data)
        return info.value


def frame(*events: dict, seq: int | None = None) -> bytes:
    body: dict = {"events": list(events)}
    if seq is not None:
        body["seq"] = seq
    return json.dumps(body).encode()


def ev(kind: str = "screen_view", **fields) -> dict:
    return {"type": kind, **fields}


def test_doc_payload_is_the_documents_text():
    assert DOC_PAYLOAD in DOC.read_text()


@pytest.mark.parametrize("data", [DOC_PAYLOAD, DOC_PAYLOAD.encode()], ids=["text", "binary"])
def test_the_documents_payload_is_stored_with_a_session(data):
    env = Env()
    b = env.batch(data)
    assert (b.seq, b.events, b.session_id) == (None, 2, "sid-1")
    start, view, click = b.rows
    assert start.type == "session_start" and start.session_id == "sid-1"
    assert start.anonymous_id == AID and start.channel == "ws"
    assert view == (None, "default", "ws", "screen_view", None, None, AID, None, None, None,
                    "sid-1", 1706859000000 * 1000, 1706859000000 * 1000, None, NOW,
                    '{ "screen_name": "Home" }', None, CONTEXT, None)
    assert click.type == "button_click" and click.timestamp == 1706859005000 * 1000
    assert json.loads(click.properties) == {"btn_id": "play_music"}
    assert b.keys == []  # no ids: nothing to deduplicate
    assert env.touches == [2]  # one touch for the batch, with its event count
    assert env.sessions.live[KEY].count == 2


def test_properties_are_owned_text_not_views_of_the_message():
    data = bytearray(DOC_PAYLOAD.encode())
    b = Env().batch(data)
    data[:] = b" " * len(data)
    assert b.rows[1].properties == '{ "screen_name": "Home" }'


def test_ts_is_optional_and_defaults_to_receive_time():
    b = Env().batch(frame(ev(), ev(ts=0)))
    assert (b.rows[1].timestamp, b.rows[1].original_timestamp) == (NOW, None)
    assert (b.rows[2].timestamp, b.rows[2].original_timestamp) == (0, 0)


def test_payload_may_be_absent_or_null():
    b = Env().batch(frame(ev(), ev(payload=None), ev(payload={})))
    assert [r.properties for r in b.rows[1:]] == [None, None, "{}"]


def test_unknown_fields_are_ignored():
    b = Env().batch(frame(ev(extra=[1, 2], context={"x": 1})) [:-1] + b',"v":2}')
    assert b.events == 1 and b.rows[1].type == "screen_view"


def test_seq_is_returned_for_the_ack():
    b = Env().batch(frame(ev(), seq=7))
    assert b.seq == 7
    assert Env().batch(frame(ev(), seq=0)).seq == 0


def test_session_rows_come_only_with_the_first_batch():
    env = Env()
    first = env.batch(frame(ev(), ev()))
    second = env.batch(frame(ev(), ev(), ev()), NOW + 60 * S)
    assert [r.type for r in second.rows] == ["screen_view"] * 3
    assert {r.session_id for r in second.rows} == {first.session_id}
    assert env.touches == [2, 3]
    s = env.sessions.live[KEY]
    assert s.count == 5 and s.last_seen == NOW + 60 * S


# --- refusals: all or nothing, with the path of the field at fault


def assert_refused(env: Env, data, code: str, field: str, seq, close: int) -> FrameError:
    exc = env.refusal(data)
    assert (exc.error.code, exc.error.field, exc.seq, exc.close_code) == \
        (code, field, seq, close), exc.error
    assert exc.error.status in (400, 413)
    assert len(env.sessions) == 0 and env.touches == [] and len(env.dedup) == 0
    return exc


@pytest.mark.parametrize("bad, field", [
    ({"type": 7}, "$.events[1].type"),
    ({"ts": 1}, "$.events[1]"),  # type missing
    ({"type": "x", "ts": "1706859000000"}, "$.events[1].ts"),
    ({"type": "x", "ts": 1706859000000.5}, "$.events[1].ts"),
    ({"type": "x", "id": 12}, "$.events[1].id"),
])
def test_a_badly_typed_event_refuses_the_whole_batch(bad, field):
    env = Env()
    data = frame(ev(id="ok-1"), bad, ev(id="ok-2"), seq=3)
    exc = assert_refused(env, data, "invalid_event", field, 3, CLOSE_INVALID)
    assert exc.error.field == field


@pytest.mark.parametrize("kind, reason", [
    ("session_start", "reserved"), ("session_end", "reserved"), ("", "length >= 1"),
    ("x" * 201, "length <= 200"),
])
def test_reserved_or_badly_sized_types_are_refused(kind, reason):
    env = Env()
    exc = assert_refused(env, frame(ev(id="a"), ev(kind, id="b"), seq=4), "invalid_event",
                         "$.events[1].type", 4, CLOSE_INVALID)
    assert reason in exc.error.message


def test_type_length_is_counted_in_characters():
    b = Env().batch(frame(ev("é" * 200)))
    assert b.rows[1].type == "é" * 200


@pytest.mark.parametrize("ts", [-1, MAX_TS_MS + 1, 10**25])
def test_ts_out_of_range_is_refused(ts):
    assert_refused(Env(), frame(ev(), ev(ts=ts), seq=5), "invalid_event", "$.events[1].ts",
                   5, CLOSE_INVALID)


def test_ts_at_the_ends_of_the_range_is_accepted():
    b = Env().batch(frame(ev(ts=0), ev(ts=MAX_TS_MS)))
    assert [r.original_timestamp for r in b.rows[1:]] == [0, MAX_TS_MS * 1000]
    assert [r.timestamp for r in b.rows[1:]] == [0, NOW]  # the year 9999: in the future


@pytest.mark.parametrize("payload", [[1, 2], "text", 3, True])
def test_payload_must_be_an_object(payload):
    assert_refused(Env(), frame(ev(), ev(), ev(payload=payload), seq=6), "invalid_event",
                   "$.events[2].payload", 6, CLOSE_INVALID)


def test_invalid_utf8_in_a_payload_is_refused():
    data = b'{"events":[{"type":"a","payload":{"k":"\xff"}}],"seq":8}'
    assert_refused(Env(), data, "invalid_json", "$.events[0].payload", 8, CLOSE_INVALID)


def test_a_refusal_without_seq_closes_with_1007():
    assert_refused(Env(), frame(ev(), ev("session_end")), "invalid_event", "$.events[1].type",
                   None, CLOSE_INVALID)


@pytest.mark.parametrize("data, code, field, seq", [
    (b'{"events": [{"type": "a"}], "seq": 9', "invalid_json", "$", None),  # truncated
    (b"[1, 2]", "invalid_event", "$", None),
    (b'"events"', "invalid_event", "$", None),
    (b'{"seq": 11}', "invalid_event", "$", 11),  # events missing: seq still read
    (b'{"events": {"type": "a"}, "seq": 12}', "invalid_event", "$.events", 12),
    (b'{"events": [{"type": "a\xff"}], "seq": 13}', "invalid_json", "$", 13),
    (b'{"events": [{"type": "a"}], "seq": -1}', "bad_request", "$.seq", None),
    (b'{"events": [{"type": "a"}], "seq": "7"}', "invalid_event", "$.seq", None),
    (b'{"events": [{"type": "a"}], "seq": 7.5}', "invalid_event", "$.seq", None),
])
def test_seq_is_read_from_a_message_that_is_refused_when_it_can_be(data, code, field, seq):
    exc = assert_refused(Env(), data, code, field, seq, CLOSE_INVALID)
    assert exc.error.message


def test_empty_events_are_refused():
    assert_refused(Env(), frame(seq=1), "invalid_event", "$.events", 1, CLOSE_INVALID)
    assert_refused(Env(), frame(), "invalid_event", "$.events", None, CLOSE_INVALID)


def test_too_many_events_refused_with_413_or_closed_with_1008():
    env = Env(max_events=3)
    assert len(env.batch(frame(ev(), ev(), ev())).rows) == 4
    env = Env(max_events=3)
    exc = assert_refused(env, frame(ev(), ev(), ev(), ev(), seq=2), "payload_too_large",
                         "$.events", 2, CLOSE_POLICY)
    assert exc.error.status == 413 and "ws_max_batch_events" in exc.error.message
    assert_refused(env, frame(ev(), ev(), ev(), ev()), "payload_too_large", "$.events", None,
                   CLOSE_POLICY)


def test_decode_frame_alone():
    f = decode_frame(DOC_PAYLOAD, 2)
    assert [e.type for e in f.events] == ["screen_view", "button_click"] and f.seq is None
    assert bytes(f.events[0].payload) == b'{ "screen_name": "Home" }'
    with pytest.raises(FrameError) as info:
        decode_frame(DOC_PAYLOAD, 1)
    assert info.value.close_code == CLOSE_POLICY


# --- dedup by id, before the session


def test_ids_are_message_ids_and_dedup_keys():
    env = Env()
    b = env.batch(frame(ev(id="e-1"), ev(id="e-2"), ev(), seq=1))
    assert [r.message_id for r in b.rows[1:]] == ["e-1", "e-2", None]
    assert b.keys == [dedup_key("default", "e-1"), dedup_key("default", "e-2")]


def test_a_resent_batch_is_answered_as_stored_and_touches_nothing():
    env = Env()
    first = env.batch(frame(ev(id="e-1"), ev(id="e-2"), seq=1))
    again = env.batch(frame(ev(id="e-1"), ev(id="e-2"), seq=1), NOW + 30 * S)
    assert (again.rows, again.keys, again.events, again.session_id) == \
        ([], [], 2, first.session_id)
    assert env.touches == [2]
    s = env.sessions.live[KEY]
    assert s.count == 2 and s.last_seen == NOW


def test_a_partly_resent_batch_stores_and_counts_only_the_new_events():
    env = Env()
    env.batch(frame(ev(id="e-1"), seq=1))
    b = env.batch(frame(ev(id="e-1"), ev(id="e-2"), ev(), seq=2), NOW + S)
    assert [r.message_id for r in b.rows] == ["e-2", None]
    assert b.events == 3 and b.keys == [dedup_key("default", "e-2")]
    assert env.touches == [1, 2] and env.sessions.live[KEY].count == 3


def test_a_repeated_id_within_one_batch_is_stored_once():
    env = Env()
    b = env.batch(frame(ev(id="same"), ev(id="same"), seq=1))
    assert [r.message_id for r in b.rows[1:]] == ["same"] and b.events == 2
    assert env.touches == [1]


def test_an_empty_id_is_no_id():
    b = Env().batch(frame(ev(id=""), ev(id="")))
    assert [r.message_id for r in b.rows[1:]] == [None, None] and b.keys == []


def test_a_refused_batch_admits_no_id():
    env = Env()
    env.refusal(frame(ev(id="e-1"), ev("session_start", id="e-2"), seq=1))
    b = env.batch(frame(ev(id="e-1"), ev(id="e-2"), seq=2))
    assert len(b.rows) == 3 and len(b.keys) == 2


def test_a_resend_after_the_session_ended_names_no_session():
    env = Env()
    env.batch(frame(ev(id="e-1"), seq=1))
    assert len(env.sessions.expire(NOW + 1800 * S, 100)) == 1
    b = env.batch(frame(ev(id="e-1"), seq=1), NOW + 1801 * S)
    assert b.rows == [] and b.session_id is None and b.events == 1


def test_batch_after_the_timeout_ends_and_opens_in_the_same_rows():
    env = Env()
    first = env.batch(frame(ev()))
    b = env.batch(frame(ev()), NOW + 1800 * S)
    assert [r.type for r in b.rows] == ["session_end", "session_start", "screen_view"]
    assert b.rows[0].session_id == first.session_id != b.session_id
    assert b.rows[2].session_id == b.session_id


def test_rows_are_journal_encodable():
    from triolytics.core.rows import decode_rows, encode_rows
    b = Env().batch(DOC_PAYLOAD)
    assert decode_rows(encode_rows(b.rows)) == b.rows
    assert msgspec.json.decode(b.rows[1].properties) == {"screen_name": "Home"}


def test_invalid_utf8_in_a_type_names_where_it_is():
    data = b'{"events": [{"type": "ok"}, {"type": "a\xff"}], "seq": 13}'
    at = data.index(b"\xff")
    exc = Env().refusal(data)
    # The byte offset in the frame, whatever msgspec version decodes it (0.23 stopped
    # reporting one); a field path only where the decoder still names one.
    assert exc.error.code == "invalid_json"
    assert f"invalid UTF-8 at byte {at}" == exc.error.message, exc.error
    assert exc.error.field in ("$", "$.events[1].type")


# --- a session's rows sort as a session, whatever the clients' clocks say

NOW_2026 = 1_780_000_000_000_000  # 2026-05-28, µs: the document's ts (2024) is 2 years old
DOC_TS = [1706859000000 * 1000, 1706859005000 * 1000]  # its two events' ts, µs


def by_timestamp(rows: list) -> list:
    """`ORDER BY timestamp, ingest_seq` of rows listed in arrival order."""
    return [r for _, r in sorted(enumerate(rows), key=lambda p: (p[1].timestamp, p[0]))]


def test_the_documents_payload_received_years_later_sorts_start_first_and_end_last():
    env = Env(max_future_skew_s=2 * 365 * 86_400)  # (a clock a year ahead is kept)
    first = env.batch(DOC_PAYLOAD, NOW_2026)
    start, view, click = first.rows
    assert start.type == "session_start" and start.received_at == NOW_2026
    assert start.timestamp == DOC_TS[0]  # its opening events' earliest ts, not receipt
    assert [view.timestamp, click.timestamp] == [view.original_timestamp,
                                                 click.original_timestamp] == DOC_TS
    # A buffered batch sent later carries earlier times; one more comes a year ahead.
    late = env.batch(frame(ev("offline", ts=1_600_000_000_000), ev("now")), NOW_2026 + 60 * S)
    ahead = env.batch(frame(ev("ahead", ts=1_811_536_000_000)), NOW_2026 + 70 * S)
    offline, now = late.rows
    assert (offline.timestamp, offline.original_timestamp) == (DOC_TS[0],
                                                               1_600_000_000_000_000)
    assert (now.timestamp, now.original_timestamp) == (NOW_2026 + 60 * S, None)
    [end] = env.sessions.expire(NOW_2026 + 70 * S + 1800 * S, 10)
    assert end.timestamp == 1_811_536_000_000_000  # the latest event time it stored
    assert json.loads(end.properties) == {"duration_ms": 70_000, "event_count": 5}
    rows = first.rows + late.rows + ahead.rows + [end]
    assert {r.session_id for r in rows} == {first.session_id}
    assert [r.type for r in by_timestamp(rows)] == [
        "session_start", "screen_view", "offline", "button_click", "now", "ahead",
        "session_end"]


def test_a_batch_of_times_out_of_order_starts_its_session_at_the_earliest():
    b = Env().batch(frame(ev("b", ts=1_700_000_002_000), ev("a", ts=1_700_000_001_000)),
                    NOW_2026)
    assert [r.timestamp for r in b.rows] == [1_700_000_001_000_000, 1_700_000_002_000_000,
                                             1_700_000_001_000_000]
    assert [r.type for r in by_timestamp(b.rows)] == ["session_start", "a", "b"]


def test_a_clock_ahead_starts_the_session_at_receipt_and_ends_it_after_its_events():
    env = Env(max_future_skew_s=10**12)  # (else the year 9999 is in the future: replaced)
    b = env.batch(frame(ev(ts=MAX_TS_MS)), NOW)
    assert b.rows[0].timestamp == NOW and b.rows[1].timestamp == MAX_TS_MS * 1000
    [end] = env.sessions.expire(NOW + 1800 * S, 10)
    assert end.timestamp == MAX_TS_MS * 1000


# --- the input policy: a ts more than max_future_skew_s ahead is stored as the receive
# time, flagged in that event's context; an id has at most max_message_id_chars.

def test_a_ts_more_than_23_hours_ahead_is_stored_as_the_receive_time_and_flagged():
    limit_ms = (NOW + 82_800 * S) // 1000
    b = Env().batch(frame(ev("ok", ts=limit_ms), ev("ahead", ts=limit_ms + 1), ev("none")))
    start, ok, ahead, none = b.rows
    assert (ok.timestamp, ok.original_timestamp) == (limit_ms * 1000, limit_ms * 1000)
    assert (ahead.timestamp, ahead.original_timestamp) == (NOW, (limit_ms + 1) * 1000)
    assert json.loads(ahead.context) == {"timestamp_adjusted": True, **json.loads(CONTEXT)}
    assert ok.context == none.context == CONTEXT
    assert start.timestamp == NOW
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(b.columns),
                                  type=type(b.columns)) == b.columns  # (journaled as is)


def test_max_future_skew_s_is_the_websocket_limit_too():
    b = Env(max_future_skew_s=60).batch(frame(ev(ts=(NOW + 61 * S) // 1000)))
    assert b.rows[1].timestamp == NOW


def test_an_id_over_max_message_id_chars_refuses_the_batch():
    env = Env()
    assert_refused(env, frame(ev(id="a" * 100), ev(id="b" * 101), seq=3), "invalid_event",
                   "$.events[1].id", 3, CLOSE_INVALID)
    assert env.batch(frame(ev(id="a" * 100))).rows[1].message_id == "a" * 100
    assert_refused(Env(max_message_id_chars=5), frame(ev(id="abcdef")), "invalid_event",
                   "$.events[0].id", None, CLOSE_INVALID)
