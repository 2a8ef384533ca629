"""sessions.py, pure: `touch`, `expire` (lazy invalidation, `limit`), `current`,
`restore`, the one-heap-entry-per-live-session invariant, and `Intake`'s dedup-first rule.

No trio, no sockets, no DuckDB: times are integers (µs) passed in.
"""

from __future__ import annotations

import json
from itertools import count

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from triolytics.core.dedup import Dedup, dedup_key
from triolytics.core.rows import Row
from triolytics.core.sessions import Intake, Session, Sessions

S = 1_000_000  # µs
T = 1800 * S  # the default timeout
T0 = 1_706_859_000_000_000  # 2024-02-02T07:30:00Z, µs
K = ("default", "ws", "0.8d6f1c2e-5b7a-4c39-9e01-3f2a7b6c5d4e")
K2 = ("default", "http", "anon-2")
ALL = 10**9  # an expire limit that never binds


def make(timeout: int = T) -> Sessions:
    ids = count(1)
    return Sessions(timeout, lambda: f"id-{next(ids)}")


def heap_entries(sessions: Sessions, s: Session) -> int:
    return sum(1 for _, _, entry in sessions._heap if entry is s)


def assert_one_entry_per_live_session(sessions: Sessions) -> None:
    for s in sessions.live.values():
        assert heap_entries(sessions, s) == 1, s.key


# --- touch


def test_first_event_opens_a_session_with_its_start_row():
    sessions, rows = make(), [Row("e0", *[None] * 18)]  # an earlier row of the request
    sid = sessions.touch(K, K[2], None, T0, rows)
    assert sid == "id-1" and len(sessions) == 1 and sessions.opened == 1
    assert len(rows) == 2  # appended, after what was there
    start = rows[1]
    assert start.type == "session_start" and start.session_id == sid
    assert (start.project, start.channel, start.anonymous_id, start.user_id) == \
        ("default", "ws", K[2], None)
    assert start.timestamp == start.received_at == T0
    assert start.message_id == "id-2" and start.properties is None


def test_session_start_comes_just_before_the_event_that_opened_it():
    sessions, rows = make(), []
    sid = sessions.touch(K2, "anon-2", "user-9", T0, rows)
    rows.append(Row("ev", "default", "http", "track", "E", None, "anon-2", "user-9", None,
                    None, sid, T0, None, None, T0, None, None, None, None))
    assert [r.type for r in rows] == ["session_start", "track"]
    assert rows[0].user_id == "user-9" and rows[1].session_id == rows[0].session_id


def test_later_events_update_last_seen_and_count_without_rows_or_heap_pushes():
    sessions, rows = make(), []
    sid = sessions.touch(K, K[2], None, T0, rows, events=2)
    heap_before = list(sessions._heap)
    for i in range(1, 6):
        assert sessions.touch(K, K[2], None, T0 + i * S, rows, events=3) == sid
    s = sessions.live[K]
    assert (s.started, s.last_seen, s.count) == (T0, T0 + 5 * S, 2 + 5 * 3)
    assert len(rows) == 1 and sessions.opened == 1
    assert sessions._heap == heap_before  # O(1): no push per event


def test_an_out_of_order_time_counts_but_never_moves_last_seen_back():
    sessions, rows = make(), []
    sessions.touch(K, K[2], None, T0 + 10 * S, rows)
    sessions.touch(K, K[2], None, T0, rows)
    s = sessions.live[K]
    assert s.last_seen == T0 + 10 * S and s.count == 2


def test_an_event_just_inside_the_timeout_keeps_the_session():
    sessions, rows = make(), []
    sid = sessions.touch(K, K[2], None, T0, rows)
    assert sessions.touch(K, K[2], None, T0 + T - 1, rows) == sid
    assert len(rows) == 1


def test_an_event_after_the_timeout_ends_the_old_session_and_opens_a_new_one():
    sessions, rows = make(), []
    old = sessions.touch(K, K[2], None, T0, rows)
    sessions.touch(K, K[2], None, T0 + 60 * S, rows, events=4)
    del rows[:]
    now = T0 + 60 * S + T  # exactly the timeout later: not reaped yet
    new = sessions.touch(K, K[2], None, now, rows)
    assert new != old and sessions.current(K) == new
    assert [r.type for r in rows] == ["session_end", "session_start"]
    end, start = rows
    assert end.session_id == old and start.session_id == new
    assert end.timestamp == T0 + 60 * S + T and end.received_at == now
    assert json.loads(end.properties) == {"duration_ms": 60_000, "event_count": 5}
    assert (sessions.opened, sessions.ended, len(sessions)) == (2, 1, 1)
    assert_one_entry_per_live_session(sessions)
    # The replaced session's stale entry is due now, so the next expire drops it silently.
    assert sessions.expire(now, ALL) == []
    assert len(sessions._heap) == len(sessions.live) == 1


def test_current_touches_nothing():
    sessions, rows = make(), []
    assert sessions.current(K) is None
    sid = sessions.touch(K, K[2], None, T0, rows)
    assert sessions.current(K) == sid and sessions.current(K2) is None
    assert sessions.live[K].count == 1 and sessions.live[K].last_seen == T0 and len(rows) == 1


def test_keys_are_independent():
    sessions, rows = make(), []
    a = sessions.touch(K, K[2], None, T0, rows)
    b = sessions.touch(K2, "anon-2", None, T0, rows)
    c = sessions.touch(("other", "ws", K[2]), K[2], None, T0, rows)
    assert len({a, b, c}) == 3 and len(sessions) == 3


# --- expire


def test_expire_ends_an_idle_session_at_last_seen_plus_timeout():
    sessions, rows = make(), []
    sid = sessions.touch(K, K[2], None, T0, rows)
    sessions.touch(K, K[2], None, T0 + 90 * S, rows, events=2)
    assert sessions.next_deadline() == T0 + T  # the entry pushed at open: not moved
    now = T0 + 90 * S + T + 7 * S  # the reaper woke up late
    [end] = sessions.expire(now, ALL)
    assert end.type == "session_end" and end.session_id == sid
    assert (end.project, end.channel, end.anonymous_id, end.user_id) == \
        ("default", "ws", K[2], None)
    assert end.timestamp == T0 + 90 * S + T
    assert end.received_at == now
    assert json.loads(end.properties) == {"duration_ms": 90_000, "event_count": 3}
    assert end.message_id == "id-3"  # ids 1 and 2: the session and its start row
    assert len(sessions) == 0 and sessions.current(K) is None and sessions.ended == 1
    assert sessions.next_deadline() is None


def test_expire_before_the_deadline_ends_nothing():
    sessions, rows = make(), []
    sessions.touch(K, K[2], None, T0, rows)
    assert sessions.expire(T0 + T - 1, ALL) == []
    assert len(sessions) == 1 and sessions.next_deadline() == T0 + T
    assert len(sessions.expire(T0 + T, ALL)) == 1  # due exactly at the deadline


def test_an_active_sessions_stale_entry_is_repushed_not_ended():
    sessions, rows = make(), []
    sid = sessions.touch(K, K[2], None, T0, rows)
    sessions.touch(K, K[2], None, T0 + 100 * S, rows)  # deadline moved, entry did not
    assert sessions.expire(T0 + T, ALL) == []
    assert sessions.current(K) == sid and sessions.ended == 0
    assert sessions.next_deadline() == T0 + 100 * S + T  # re-pushed with the real deadline
    assert len(sessions._heap) == 1
    [end] = sessions.expire(T0 + 100 * S + T, ALL)
    assert end.session_id == sid


def test_limit_bounds_the_heap_pops_per_call():
    sessions, rows = make(), []
    for i in range(10):
        sessions.touch(("p", "ws", f"a{i}"), f"a{i}", None, T0 + i, rows)
    now = T0 + T + 100
    first = sessions.expire(now, 3)
    assert len(first) == 3 and len(sessions) == 7
    assert sessions.next_deadline() <= now  # more are due: the caller calls again
    assert len(sessions.expire(now, 0)) == 0 and len(sessions) == 7
    rest = sessions.expire(now, 100)
    assert len(rest) == 7 and sessions.next_deadline() is None
    # Oldest deadline first.
    assert [r.anonymous_id for r in first + rest] == [f"a{i}" for i in range(10)]


def test_limit_counts_repushed_entries_too():
    sessions, rows = make(), []
    for i in range(4):
        sessions.touch(("p", "ws", f"a{i}"), f"a{i}", None, T0, rows)
    for i in range(4):
        sessions.touch(("p", "ws", f"a{i}"), f"a{i}", None, T0 + 10 * S, rows)  # active
    assert sessions.expire(T0 + T, 2) == []
    # Two pops were spent re-pushing; two entries are still due.
    assert sum(1 for d, _, _ in sessions._heap if d <= T0 + T) == 2
    assert sessions.expire(T0 + T, 2) == []
    assert sessions.next_deadline() == T0 + 10 * S + T
    assert_one_entry_per_live_session(sessions)


def test_many_sessions_ending_at_one_instant_all_end_in_chunks():
    sessions, rows = make(), []
    n = 5000
    for i in range(n):
        sessions.touch(("p", "ws", f"a{i}"), f"a{i}", None, T0, rows)
    now, ended = T0 + T, []
    while sessions.next_deadline() is not None and sessions.next_deadline() <= now:
        chunk = sessions.expire(now, 500)
        assert len(chunk) <= 500
        ended += chunk
    assert len(ended) == n and len({r.session_id for r in ended}) == n
    assert len(sessions) == 0 and sessions._heap == []


# --- restore


def restored(key, sid, started, last_seen, events, anonymous_id="a", user_id=None):
    return Session(key, sid, started, anonymous_id, user_id, last_seen, events)


def test_restored_sessions_resume_with_their_id_count_and_deadline():
    sessions, rows = make(), []
    sessions.restore([restored(K, "old-1", T0, T0 + 30 * S, 7)])
    assert sessions.current(K) == "old-1" and sessions.next_deadline() == T0 + 30 * S + T
    assert sessions.touch(K, K[2], None, T0 + 60 * S, rows) == "old-1"
    assert rows == [] and sessions.live[K].count == 8


def test_restored_sessions_that_expired_while_down_end_at_the_next_expire():
    sessions = make()
    sessions.restore([restored(K, "gone", T0, T0 + 5 * S, 3),
                      restored(K2, "live", T0, T0 + 10 * T, 1)])
    now = T0 + 9 * T  # start-up, long after "gone" went idle
    [end] = sessions.expire(now, ALL)
    assert end.session_id == "gone" and end.timestamp == T0 + 5 * S + T
    assert end.received_at == now
    assert json.loads(end.properties) == {"duration_ms": 5000, "event_count": 3}
    assert sessions.current(K) is None and sessions.current(K2) == "live"


def test_a_restored_session_without_last_seen_counts_from_its_start():
    s = Session(K, "s", T0, K[2], None)
    assert s.last_seen == T0 and s.count == 0


def test_two_open_sessions_with_one_key_both_end():
    sessions = make()
    sessions.restore([restored(K, "older", T0, T0 + 10 * S, 2),
                      restored(K, "newer", T0 + T + 20 * S, T0 + T + 30 * S, 1)])
    ended = []
    now = T0 + 5 * T
    while sessions.next_deadline() is not None and sessions.next_deadline() <= now:
        ended += sessions.expire(now, ALL)
    assert sorted(r.session_id for r in ended) == ["newer", "older"]


def test_of_open_sessions_of_one_key_the_newest_resumes_and_the_older_end_first():
    sessions, rows = make(), []
    now = T0 + T + 40 * S  # start-up: "newer" is still live
    sessions.restore([restored(K, "newer", T0 + T + 20 * S, T0 + T + 30 * S, 1),
                      restored(K, "oldest", T0, T0 + 5 * S, 4),
                      restored(K, "older", T0 + 6 * S, T0 + 8 * S, 2),
                      restored(K2, "other", T0, T0 + T + 35 * S, 1)])
    assert sessions.current(K) == "newer" and len(sessions) == 2
    assert sessions.next_deadline() <= now  # the superseded ones are due at once
    first = sessions.expire(now, 1)  # `limit` counts them too
    assert len(first) == 1
    ended = first + sessions.expire(now, ALL)
    assert sorted(r.session_id for r in ended) == ["older", "oldest"]
    by_id = {r.session_id: r for r in ended}
    assert by_id["oldest"].timestamp == T0 + 5 * S + T and by_id["oldest"].received_at == now
    assert json.loads(by_id["older"].properties) == {"duration_ms": 2000, "event_count": 2}
    assert sessions.current(K) == "newer" and sessions.ended == 2
    assert sessions.touch(K, K[2], None, now, rows) == "newer" and rows == []
    assert sessions.expire(now, ALL) == [] and len(sessions._heap) == len(sessions.live) == 2
    assert_one_entry_per_live_session(sessions)


# --- the heap: one entry per live session, whatever happens


class SessionsMachine(RuleBasedStateMachine):
    """Random touches, expires (with small limits) and restores against a plain model."""

    TIMEOUT = 100

    def __init__(self) -> None:
        super().__init__()
        self.sessions = make(self.TIMEOUT)
        self.now = 0
        self.model: dict[tuple, list] = {}  # key -> [session id, started, last_seen, count]
        self.restored = count()

    @rule(key=st.integers(0, 5), dt=st.integers(0, 150), events=st.integers(1, 3))
    def touch(self, key, dt, events):
        self.now += dt
        k = ("p", "ws", str(key))
        rows: list[Row] = []
        sid = self.sessions.touch(k, str(key), None, self.now, rows, events)
        m = self.model.get(k)
        if m is not None and self.now - m[2] < self.TIMEOUT:
            assert sid == m[0] and rows == []
            m[2], m[3] = self.now, m[3] + events
            return
        types = [r.type for r in rows]
        if m is not None:
            assert types == ["session_end", "session_start"]
            assert rows[0].session_id == m[0] and rows[0].timestamp == m[2] + self.TIMEOUT
        else:
            assert types == ["session_start"]
        self.model[k] = [sid, self.now, self.now, events]

    @rule(dt=st.integers(0, 150), limit=st.sampled_from([0, 1, 2, 3, ALL]))
    def expire(self, dt, limit):
        self.now += dt
        ended = self.sessions.expire(self.now, limit)
        for row in ended:
            k = (row.project, row.channel, row.anonymous_id)
            sid, started, last_seen, events = self.model.pop(k)
            assert row.session_id == sid and last_seen + self.TIMEOUT <= self.now
            assert row.timestamp == last_seen + self.TIMEOUT
            assert json.loads(row.properties) == {"duration_ms": (last_seen - started) // 1000,
                                                  "event_count": events}
        if limit == ALL:
            assert all(m[2] + self.TIMEOUT > self.now for m in self.model.values())
            assert len(self.sessions._heap) == len(self.sessions.live)

    @rule(key=st.integers(6, 8), ago=st.integers(0, 300))
    def restore(self, key, ago):
        k = ("p", "ws", str(key))
        if k in self.model:
            return  # start-up restores keys that are not live
        sid = f"r{next(self.restored)}"
        last_seen = self.now - ago
        self.sessions.restore([restored(k, sid, last_seen - 5, last_seen, 2, str(key))])
        self.model[k] = [sid, last_seen - 5, last_seen, 2]

    @invariant()
    def one_entry_per_live_session(self):
        assert {k: s.id for k, s in self.sessions.live.items()} == \
            {k: m[0] for k, m in self.model.items()}
        assert_one_entry_per_live_session(self.sessions)
        live = set(map(id, self.sessions.live.values()))
        for deadline, _, s in self.sessions._heap:
            if id(s) not in live:
                assert deadline <= self.now  # a dead entry is due: the next expire drops it

    @invariant()
    def deadlines_never_early(self):
        for deadline, _, s in self.sessions._heap:
            if self.sessions.live.get(s.key) is s:
                assert deadline <= s.last_seen + self.TIMEOUT


TestSessionsMachine = SessionsMachine.TestCase
TestSessionsMachine.settings = settings(max_examples=60, stateful_step_count=40,
                                        deadline=None)


# --- Intake: dedup before sessions


def test_intake_a_repeated_id_touches_no_session_and_is_not_in_keys():
    dedup, sessions = Dedup(60 * S, 100), make()
    first = Intake(dedup, sessions, T0)
    assert first.fresh("default", "m-1") is True
    sid, _ = first.session(K, K[2], None, T0)
    assert first.keys == [dedup_key("default", "m-1")] and first.duplicates == 0
    assert [r.type for r in first.rows] == ["session_start"]

    again = Intake(dedup, sessions, T0 + 10 * S)
    assert again.fresh("default", "m-1") is False
    assert again.keys == [] and again.duplicates == 1 and again.rows == []
    s = sessions.live[K]
    assert s.count == 1 and s.last_seen == T0 and sessions.current(K) == sid
    assert again.fresh("other-project", "m-1") is True  # ids are per project


def test_intake_session_uses_its_receive_time_and_collects_rows_in_order():
    dedup, sessions = Dedup(60 * S, 100), make()
    intake = Intake(dedup, sessions, T0 + 5 * S)
    sid, times = intake.session(K, K[2], None, T0 + 5 * S, events=3)
    assert times == T0 + 5 * S
    assert sessions.live[K].last_seen == T0 + 5 * S and sessions.live[K].count == 3
    assert intake.rows[0].received_at == T0 + 5 * S and intake.rows[0].session_id == sid


def test_an_intake_reuses_the_previous_events_session_only_for_the_same_key():
    sessions = make()
    intake = Intake(Dedup(3600 * S, 100), sessions, T0)
    got = [intake.session(k, k[2], None, T0)[0] for k in (K, K, K2, K, K)]
    assert got[0] == got[1] == got[3] == got[4] != got[2]
    assert sessions.live[K].count == 4 and sessions.live[K2].count == 1
    assert [r.type for r in intake.rows] == ["session_start", "session_start"]


# --- a session's rows sort as a session, whatever the clients' clocks say
YEAR = 365 * 86_400 * S


def by_timestamp(rows: list[Row]) -> list[Row]:
    """`ORDER BY timestamp, ingest_seq` of rows listed in arrival order."""
    return [r for _, r in sorted(enumerate(rows), key=lambda p: (p[1].timestamp, p[0]))]


def assert_sorts_as_sessions(rows: list[Row]) -> None:
    """Every session among `rows` (in arrival order) sorts start first, end last."""
    for sid in {r.session_id for r in rows}:
        types = [r.type for r in by_timestamp([r for r in rows if r.session_id == sid])]
        assert types[0] == "session_start", types
        assert "session_start" not in types[1:] and "session_end" not in types[:-1], types


def test_a_session_starts_at_its_opening_events_time_unless_that_is_later_than_receipt():
    sessions, rows = make(), []
    sessions.touch(K, K[2], None, T0, rows, first=T0 - 2 * YEAR)  # a clock years behind
    sessions.touch(K2, "anon-2", None, T0, rows, first=T0 + YEAR)  # one a year ahead
    assert [(r.timestamp, r.received_at) for r in rows] == [(T0 - 2 * YEAR, T0), (T0, T0)]
    assert sessions.live[K].first == T0 - 2 * YEAR and sessions.live[K2].first == T0
    assert sessions.live[K].started == T0  # activity is receive time


def test_an_intake_restamps_the_start_it_made_when_a_later_event_is_earlier():
    sessions = make()
    intake = Intake(Dedup(60 * S, 100), sessions, T0)
    sid, t = intake.session(K, K[2], None, T0 - 10 * S)
    assert t == T0 - 10 * S and intake.rows[0].timestamp == T0 - 10 * S
    intake.rows.append("event 1")  # (the caller's rows follow the start)
    assert intake.session(K, K[2], None, [T0 - 5 * S, T0 - 30 * S], 2) == \
        (sid, [T0 - 5 * S, T0 - 30 * S])  # not moved: the start moves instead
    assert intake.rows[0].timestamp == T0 - 30 * S and intake.rows[1] == "event 1"
    s = sessions.live[K]
    assert (s.first, s.latest, s.count) == (T0 - 30 * S, T0 - 5 * S, 3)


def test_a_later_request_with_earlier_times_is_stored_at_the_sessions_start():
    sessions = make()
    first = Intake(Dedup(60 * S, 100), sessions, T0)
    sid, _ = first.session(K, K[2], None, [T0 - 10 * S, T0 - 9 * S], 2)
    later = Intake(Dedup(60 * S, 100), sessions, T0 + 60 * S)  # a buffered batch, sent late
    assert later.session(K, K[2], None, [T0 - 3600 * S, T0 + 50 * S], 2) == \
        (sid, [T0 - 10 * S, T0 + 50 * S])
    assert later.session(K, K[2], None, T0 - YEAR) == (sid, T0 - 10 * S)  # one for all
    assert later.rows == [] and first.rows[0].timestamp == T0 - 10 * S


def test_session_end_sorts_after_events_stamped_in_the_future():
    sessions = make()
    intake = Intake(Dedup(60 * S, 100), sessions, T0)
    intake.session(K, K[2], None, [T0, T0 + YEAR], 2)  # a clock a year ahead
    intake.session(K2, "anon-2", None, T0 + 5 * S)  # a clock a little ahead
    ends = {r.anonymous_id: r for r in sessions.expire(T0 + T, ALL)}
    assert ends[K[2]].timestamp == T0 + YEAR  # after its latest event, not before
    assert ends["anon-2"].timestamp == T0 + T  # last activity + timeout, as before
    assert json.loads(ends[K[2]].properties) == {"duration_ms": 0, "event_count": 2}


def test_restored_sessions_keep_their_start_and_latest_stamps():
    sessions = make()
    sessions.restore([Session(K, "old", T0, K[2], None, T0 + 5 * S, 3,
                              first=T0 - YEAR, latest=T0 + YEAR)])
    intake = Intake(Dedup(60 * S, 100), sessions, T0 + 10 * S)
    assert intake.session(K, K[2], None, T0 - 2 * YEAR) == ("old", T0 - YEAR)
    [end] = sessions.expire(T0 + 10 * S + T, ALL)
    assert end.timestamp == T0 + YEAR


def test_a_restored_session_without_stamps_starts_at_its_start():
    s = Session(K, "s", T0, K[2], None, T0 + 5 * S, 2)
    assert s.first == s.latest == T0


times_of_a_request = st.lists(st.integers(-3 * YEAR, 3 * YEAR), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(st.tuples(st.integers(0, 2000 * S), st.sampled_from([K, K2]),
                                   times_of_a_request, st.booleans()),
                         min_size=1, max_size=12))
def test_any_clocks_sort_every_session_start_first_and_end_last(requests):
    """Requests at any receive times (gaps past the timeout too), with event times years
    off either way, given as a list or as one shared value: ended or not, each session's
    rows sort by (timestamp, arrival) with its start first and its end last."""
    sessions, now, stored = make(), T0, []
    for gap, key, offsets, shared in requests:
        now += gap
        stored += sessions.expire(now, ALL)  # (the reaper, when it is due)
        intake = Intake(Dedup(60 * S, 100), sessions, now)
        times = now + offsets[0] if shared else [now + o for o in offsets]
        sid, stamped = intake.session(key, key[2], None, times, len(offsets))
        stamped = [stamped] * len(offsets) if shared else stamped
        if not shared:
            assert len(stamped) == len(offsets)
        events = [Row(None, *key[:2], "e", *[None] * 6, sid, t, None, None, now,
                      *[None] * 4) for t in stamped]
        stored += intake.rows + events
    stored += sessions.expire(now + 10 * T, ALL)
    assert_sorts_as_sessions(stored)


def test_sessions_opened_by_rows_that_were_never_stored_are_forgotten():
    """A journal write that fails (a full disk) stores nothing: the sessions its rows
    opened must not stay live (nor in the timer heap) with no start row stored."""
    s = make()
    kept_rows: list[Row] = []
    kept = s.touch(("p", "http", "kept"), "kept", None, 0, kept_rows)
    for i in range(5000):  # refused requests, each from a new client
        rows: list[Row] = []
        s.touch(("p", "http", f"a{i}"), f"a{i}", None, i, rows)
        rows.append(rows[0]._replace(type="track", session_id=None))  # (its event)
        s.forget_started(rows)
    assert len(s) == 1 and s.current(("p", "http", "kept")) == kept
    assert len(s._heap) < 2500  # compacted as it goes
    s.forget_started(kept_rows[:0])
    # a session touched since by a stored request is not the one forgotten
    rows = []
    s.touch(("p", "http", "kept"), "kept", None, 1, rows)
    assert rows == []
    s.forget_started([kept_rows[0]._replace(session_id="another")])
    assert s.current(("p", "http", "kept")) == kept
    assert [r.type for r in s.expire(T + 10, 100)] == ["session_end"]
