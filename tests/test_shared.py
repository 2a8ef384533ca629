"""Sessions and dedup shared by many writers: core/shared.py (pure: what a group did, and
the group rewritten as decided) and storage/shared_state.py against a real PostgreSQL
(the `postgres` fixture): one session per key whichever writer sees it first, a repeated
id through another writer stored once, a claimed session never continued, concurrent
groups of one new key decided one after the other, ends claimed once, and a writer that
died between its journal sync and its commit decided again at its next start."""

from __future__ import annotations

import itertools
import json
import threading
import time

import pytest

from triolytics.core.rows import Columns, Row, RtColumns
from triolytics.core.sessions import Sessions
from triolytics.core.shared import end_row, rewrite, summarize

T0 = 1_714_564_800_000_000
TIMEOUT = 1_800_000_000
_names = itertools.count()


def row(mid, sid, kind="track", anon="a", recv=T0, ts=None, project="p", channel="http"):
    return Row(mid, project, channel, kind, "E", None, anon, None, None, None, sid,
               recv if ts is None else ts, None, None, recv, None, None, None, None)


# --- pure
def test_summarize_rows_counts_events_not_session_rows():
    s = summarize([[row("s0", "L1", "session_start", ts=T0 - 5), row("m1", "L1", recv=T0 + 1),
                    row("m2", "L1", recv=T0 + 3, ts=T0 + 9), row("e", "X", "session_end")]])
    t = s.sessions["L1"]
    assert (t.project, t.channel, t.key, t.opened, t.events) == ("p", "http", "a", True, 2)
    assert (t.first_received, t.last_received, t.first_ts, t.latest_ts) == \
        (T0, T0 + 3, T0 - 5, T0 + 9)
    assert "X" not in s.sessions
    assert s.ids == ["p\x1fm1", "p\x1fm2"]


def test_summarize_batches_by_column():
    rt = RtColumns("p", "aid", "L2", T0, "{}", ["w1", None], ["click", "view"], [T0 - 1, T0 + 4],
                   [None, None], [None, None])
    wide = Row._fields.index
    values = [["c1", "c2"], "p", "http", "track", None, None, ["u", "v"], None, None, None,
              ["L3", "L4"], T0, None, None, T0, None, None, None, None]
    s = summarize([rt, Columns(2, values)])
    assert s.sessions["L2"].events == 2 and s.sessions["L2"].key == "aid"
    assert (s.sessions["L2"].first_ts, s.sessions["L2"].latest_ts) == (T0 - 1, T0 + 4)
    assert s.sessions["L3"].key == "u" and s.sessions["L4"].key == "v"
    assert s.ids == ["p\x1fw1", "p\x1fc1", "p\x1fc2"]
    assert wide("session_id") == 10


def test_rewrite_moves_ids_drops_foreign_starts_and_repeats():
    rt = RtColumns("p", "aid", "L2", T0, "{}", ["w1", "w2"], ["a", "b"], [T0, T0],
                   [None, None], [None, None])
    parts = [[row("s", "L1", "session_start"), row("m1", "L1")], rt,
             [row("m9", "K")]]
    out = rewrite(parts, {"L1": "S1", "L2": "S2", "K": "K"}, {"p\x1fw2"})
    assert [(r.message_id, r.session_id) for r in out[0]] == [("m1", "S1")]
    assert [(r.message_id, r.session_id) for r in out[1]] == [("w1", "S2")]
    assert out[2] is parts[2]  # untouched parts are kept as they are
    assert rewrite(parts, {"L1": "L1"}, set()) is parts


def test_end_row_is_stamped_as_sessions_stamps_it():
    r = end_row(("S", "p", "ws", "aid", None, T0, T0 + 5_000_000, 3, T0, T0 + 1), TIMEOUT,
                T0 + TIMEOUT + 9, "id")
    assert (r.type, r.session_id, r.timestamp, r.received_at) == \
        ("session_end", "S", T0 + 5_000_000 + TIMEOUT, T0 + TIMEOUT + 9)
    assert json.loads(r.properties) == {"duration_ms": 5000, "event_count": 3}


def test_local_sessions_make_no_ends_with_many_writers():
    ids = (f"L{i}" for i in itertools.count())
    s = Sessions(10, lambda: next(ids), ends=False)
    rows: list = []
    s.touch(("p", "http", "a"), "a", None, 0, rows)
    assert [r.type for r in rows] == ["session_start"]
    s.adopt(("p", "http", "a"), rows[0].session_id, "SHARED")
    assert s.current(("p", "http", "a")) == "SHARED"
    assert s.expire(100, 10) == [] and len(s) == 0
    s.touch(("p", "http", "a"), "a", None, 200, rows)
    assert [r.type for r in rows] == ["session_start", "session_start"]


# --- PostgreSQL
@pytest.fixture
def dsn(postgres):
    return postgres.create_database(f"shared{next(_names)}")


def state(dsn, writer, timeout=TIMEOUT, window=86_400_000_000):
    from triolytics.storage.shared_state import SharedState
    return SharedState(dsn, writer, timeout, window)


def decide(st, parts, now=T0, commit=True, recovering=False):
    from triolytics.core.journal import Position
    parts, d, touched = st.begin(parts, now, recovering)
    if commit:
        st.commit(Position(1, now % 1000))
    return parts, d


def test_a_key_has_one_session_whichever_writer_sees_it(dsn):
    a, b = state(dsn, "w1"), state(dsn, "w2")
    _, d = decide(a, [[row("s1", "A1", "session_start"), row("m1", "A1")]])
    assert d.shared == {"A1": "A1"} and not d.fresh
    parts, d = decide(b, [[row("s2", "B1", "session_start", recv=T0 + 5),
                           row("m2", "B1", recv=T0 + 5)]], now=T0 + 5)
    assert d.shared == {"B1": "A1"}
    assert [(r.type, r.session_id) for r in rewrite(parts, d.shared, set())[0]] == \
        [("track", "A1")]
    # idle past the timeout: the next event opens a new session
    _, d = decide(b, [[row("s3", "B2", "session_start", recv=T0 + 5 + TIMEOUT),
                       row("m3", "B2", recv=T0 + 5 + TIMEOUT)]], now=T0 + TIMEOUT + 5)
    assert d.shared == {"B2": "B2"}
    for st in (a, b):
        st.close()


def test_a_repeated_id_through_another_writer_is_dropped_and_not_counted(dsn):
    a, b = state(dsn, "w1"), state(dsn, "w2")
    decide(a, [[row("s", "A1", "session_start"), row("m1", "A1")]])
    parts, d = decide(b, [[row("m1", "A1"), row("m2", "A1")]])
    assert d.repeated == {"p\x1fm1"}
    assert [r.message_id for r in parts[0]] == ["m2"]
    claimed = a.claim_expired(T0 + TIMEOUT + 10, 10)
    assert [(c[0], c[7]) for c in claimed] == [("A1", 2)]  # m1 once, m2
    # past the window the id may be stored again
    w = state(dsn, "w3", window=1000)
    _, d = decide(w, [[row("m1", "Z")]], now=T0 + 5000)
    assert not d.repeated
    for st in (a, b, w):
        st.close()


def test_a_claimed_session_is_never_continued_and_ends_once(dsn):
    a, b = state(dsn, "w1"), state(dsn, "w2")
    decide(a, [[row("s", "A1", "session_start"), row("m1", "A1")]])
    late = T0 + TIMEOUT + 1
    claims = b.claim_expired(late, 10)
    assert [c[0] for c in claims] == ["A1"] and a.claim_expired(late, 10) == []
    # an event of the key now (its local session still says A1) gets a new session
    parts, d = decide(a, [[row("m2", "A1", recv=T0 + 10)]], now=late)
    assert d.shared["A1"] != "A1" and d.fresh == {d.shared["A1"]: "A1"}
    b.finish(["A1"])
    assert b.own_claims() == [] and a.claim_expired(late, 10) == []
    # a claim whose end was never stored is released for another reaper
    decide(a, [[row("m3", "C1", anon="c")]], now=T0)
    assert [c[0] for c in b.claim_expired(late, 10)] == ["C1"]
    b.release(["C1"])
    assert [c[0] for c in a.claim_expired(late, 10)] == ["C1"]
    for st in (a, b):
        st.close()


def test_groups_of_one_new_key_are_decided_one_after_the_other(dsn):
    """Two writers' groups open the same new key at once: the second waits for the
    first's commit (the key's advisory lock), then takes its session."""
    a, b = state(dsn, "w1"), state(dsn, "w2")
    a.begin([[row("s1", "A1", "session_start"), row("m1", "A1")]], T0)
    got = {}

    def second():
        got["parts"], got["d"], _ = b.begin([[row("s2", "B1", "session_start"),
                                              row("m2", "B1")]], T0)
    t = threading.Thread(target=second)
    t.start()
    time.sleep(0.3)
    assert t.is_alive()  # held by the first group's open transaction
    from triolytics.core.journal import Position
    a.commit(Position(1, 1))
    t.join(10)
    assert got["d"].shared == {"B1": "A1"}
    b.rollback()
    for st in (a, b):
        st.close()


def test_a_rolled_back_group_leaves_nothing(dsn):
    a, b = state(dsn, "w1"), state(dsn, "w2")
    a.begin([[row("s1", "A1", "session_start"), row("m1", "A1")]], T0)
    a.rollback()
    _, d = decide(b, [[row("s2", "B1", "session_start"), row("m1", "B1")]])
    assert d.shared == {"B1": "B1"} and not d.repeated
    for st in (a, b):
        st.close()


def test_recovering_keeps_this_writers_own_claims(dsn):
    a = state(dsn, "w1")
    decide(a, [[row("m1", "A1")]])
    _, d = decide(a, [[row("m1", "A1")]], recovering=True)
    assert not d.repeated
    _, d = decide(a, [[row("m1", "A1")]])
    assert d.repeated == {"p\x1fm1"}
    a.close()


def test_a_writer_that_died_before_its_commit_is_decided_again_at_start(dsn, postgres,
                                                                        tmp_path):
    """A group journaled (synced) whose transaction never committed: meanwhile another
    writer opened the key's session. At start the record is decided again: its rows
    join that session, its own start row is dropped, and its id is claimed."""
    from triolytics.core.config import Config
    from triolytics.core.dedup import Dedup
    from triolytics.core.journal import Journal
    from triolytics.core.rows import encode_part
    from triolytics.storage.lake import LakeStore
    from triolytics.storage.writer import Writer

    catalog = postgres.create_database(f"lake{next(_names)}")
    journal = Journal(tmp_path / "journal", 1 << 20)
    journal.open()
    journal.append([encode_part([row("s1", "L1", "session_start"), row("m1", "L1")])])
    journal.sync()
    journal.close()
    other = state(dsn, "w2")
    decide(other, [[row("s2", "B1", "session_start"), row("m2", "B1")]])
    store = LakeStore(catalog, str(tmp_path / "data"), "w1")
    writer = Writer(Config(), Journal(tmp_path / "journal", 1 << 20), store, Dedup(10**12, 10))
    writer.shared = state(dsn, "w1")
    writer.new_id = lambda: "new"
    assert writer.recover() == 1
    assert store.conn.execute("SELECT type, session_id, message_id FROM events "
                              "WHERE writer = 'w1'").fetchall() == [("track", "B1", "m1")]
    assert writer.shared.applied_position() == store.loaded_position()
    _, d = decide(other, [[row("m1", "B1")]])
    assert d.repeated == {"p\x1fm1"}
    claims = other.claim_expired(T0 + TIMEOUT + 1, 10)
    assert [(c[0], c[7]) for c in claims] == [("B1", 2)]
    writer.journal.close()
    for st in (other, writer.shared):
        st.close()
    store.close()


def test_a_writer_that_died_holding_claims_settles_them_at_start(dsn, postgres, tmp_path):
    """Claims on session ends by a writer that died: at its start, those whose
    session_end it had stored are finished, the others released for any reaper."""
    from triolytics.core.config import Config
    from triolytics.core.dedup import Dedup
    from triolytics.core.journal import Journal, Position
    from triolytics.storage.lake import LakeStore
    from triolytics.storage.writer import Writer

    other = state(dsn, "w2")
    decide(other, [[row("s1", "A", "session_start", anon="a"), row("m1", "A", anon="a")]])
    decide(other, [[row("s2", "B", "session_start", anon="b"), row("m2", "B", anon="b")]])
    dead = state(dsn, "w1")
    claims = dead.claim_expired(T0 + TIMEOUT + 1, 10)
    assert sorted(c[0] for c in claims) == ["A", "B"]
    dead.close()  # (it died after storing A's end, before finishing; B's end was lost)
    store = LakeStore(postgres.create_database(f"lake{next(_names)}"),
                      str(tmp_path / "data"), "w1")
    store.load([end_row(next(c for c in claims if c[0] == "A"), TIMEOUT,
                        T0 + TIMEOUT + 1, "e1")], Position(0, 0))
    writer = Writer(Config(), Journal(tmp_path / "journal", 1 << 20), store, Dedup(10, 10))
    writer.shared = state(dsn, "w1")
    writer.new_id = lambda: "new"
    writer.recover()
    assert writer.shared.own_claims() == []
    assert [c[0] for c in other.claim_expired(T0 + TIMEOUT + 2, 10)] == ["B"]
    writer.journal.close()
    for st in (other, writer.shared):
        st.close()
    store.close()
