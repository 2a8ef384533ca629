"""No client input makes the collector fail with anything but an `ApiError` (a 4xx).

Hypothesis builds event-shaped JSON with wrong types, odd values and raw bytes, and
sends it to `/v1/capture` and `/v1/batch` logic: each must be accepted (every stored row
well-formed) or refused with an `ApiError` carrying a 4xx status.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from triolytics.capture import RequestMeta
from triolytics.collector import Collector
from triolytics.config import Config
from triolytics.errors import ApiError

KEY = "wk_fuzz"
HEADERS = {b"content-type": b"application/json", b"x-write-key": KEY.encode()}
META = RequestMeta(1_714_564_800_000_000, "203.0.113.9", "fuzz/1.0")
COLLECTOR = Collector(Config(), {KEY: "default"})

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
FIELDS = ["type", "event", "name", "anonymousId", "userId", "groupId", "previousId",
          "messageId", "timestamp", "originalTimestamp", "sentAt", "context", "properties",
          "traits", "integrations", "writeKey"]
good = {"type": st.sampled_from(["track", "page", "identify", "screen", "group", "alias",
                                 "nope"]),
        "timestamp": st.sampled_from(["2024-05-01T12:00:00", "2024-05-01T12:00:00+02:00",
                                      "not a date", "2024-13-45T99:99:99Z"])}
objects = st.dictionaries(st.text(max_size=5), values, max_size=3)
plausible = {**good, "event": st.text(max_size=8), "anonymousId": st.text(max_size=8),
             "userId": st.text(max_size=8) | st.integers(), "context": objects,
             "properties": objects, "traits": objects, "messageId": st.text(max_size=8)}
# A valid event with some fields replaced: plausible values mostly, anything sometimes.
events = st.builds(
    lambda base, changes: {**base, **changes},
    st.just({"type": "track", "event": "E", "anonymousId": "a"}),
    st.fixed_dictionaries({}, optional={
        f: (plausible[f] if f in plausible else values) | values for f in FIELDS}))


def outcome(fn, *args) -> str:
    try:
        accepted = fn(*args)
    except ApiError as exc:
        assert 400 <= exc.status < 500, exc
        json.loads(exc.as_body())
        return "refused"
    for row in accepted.events():
        assert row.project == "default" and row.type in {
            "track", "page", "identify", "screen", "group", "alias"}
        assert row.anonymous_id or row.user_id
        for text in (row.properties, row.traits, row.context, row.integrations):
            assert text is None or isinstance(json.loads(text), dict)
    return "stored"


@settings(max_examples=300, deadline=None)
@given(event=events)
def test_capture_accepts_or_refuses_cleanly(event):
    outcome(COLLECTOR.capture, None, HEADERS, json.dumps(event).encode(), META)


def test_the_generator_reaches_both_outcomes():
    seen = set()

    @settings(max_examples=200, deadline=None, database=None)
    @given(event=events)
    def run(event):
        seen.add(outcome(COLLECTOR.capture, None, HEADERS, json.dumps(event).encode(), META))
    run()
    assert seen == {"stored", "refused"}


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(events | values, max_size=6), context=st.none() | values)
def test_batch_accepts_or_refuses_cleanly(batch, context):
    body = {"batch": batch, **({"context": context} if context is not None else {})}
    outcome(COLLECTOR.batch, HEADERS, json.dumps(body).encode(), META)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_are_refused_cleanly(raw):
    outcome(COLLECTOR.capture, None, HEADERS, raw, META)
    outcome(COLLECTOR.batch, HEADERS, raw, META)
