"""dedup.py: the window, the max_ids bound (oldest first), forget() and remember()."""

from __future__ import annotations

from triolytics.core.dedup import Dedup, dedup_key

S = 1_000_000  # µs


def test_key_format():
    assert dedup_key("proj", "m-1") == "proj\x1fm-1"
    assert dedup_key("p1", "m") != dedup_key("p2", "m")


def test_repeat_within_window_refused():
    d = Dedup(window_us=60 * S, max_ids=100)
    assert d.admit("k", 0) is True
    assert d.admit("k", 59 * S) is False
    assert d.admit("other", 59 * S) is True
    assert len(d) == 2


def test_expires_after_window():
    d = Dedup(window_us=60 * S, max_ids=100)
    d.admit("k", 0)
    assert d.admit("k", 60 * S) is True  # exactly one window later: a new event
    assert d.admit("k", 61 * S) is False  # ...and remembered from then on


def test_refused_repeat_does_not_extend_window():
    d = Dedup(window_us=60 * S, max_ids=100)
    d.admit("k", 0)
    assert d.admit("k", 50 * S) is False
    assert d.admit("k", 60 * S) is True


def test_old_ids_trimmed_from_memory():
    d = Dedup(window_us=10 * S, max_ids=100)
    for i in range(5):
        d.admit(f"k{i}", i * S)
    d.admit("late", 12 * S)  # horizon 2 s: k0, k1, k2 are forgotten
    assert len(d) == 3
    assert d.admit("k3", 12 * S) is False


def test_max_ids_evicts_oldest_first():
    d = Dedup(window_us=3600 * S, max_ids=3)
    for i, key in enumerate("abcd"):
        assert d.admit(key, i * S)
    assert len(d) == 3
    assert d.admit("b", 5 * S) is False
    assert d.admit("c", 5 * S) is False
    assert d.admit("d", 5 * S) is False
    assert d.admit("a", 5 * S) is True  # "a" was the oldest: forgotten


def test_readmitted_key_becomes_newest():
    d = Dedup(window_us=10 * S, max_ids=2)
    d.admit("a", 0)
    d.admit("b", 5 * S)
    assert d.admit("a", 11 * S) is True  # expired, admitted again at 11 s
    d.admit("c", 12 * S)  # evicts the oldest, which is now "b"
    assert d.admit("a", 12 * S) is False
    assert d.admit("c", 12 * S) is False


def test_forget():
    d = Dedup(window_us=60 * S, max_ids=10)
    d.admit("a", 0)
    d.admit("b", 0)
    d.forget(["a", "never-seen"])
    assert len(d) == 1
    assert d.admit("a", S) is True
    assert d.admit("b", S) is False


def test_remember():
    d = Dedup(window_us=60 * S, max_ids=10)
    now = 1000 * S
    d.remember([("old", now - 120 * S), ("x", now - 30 * S), ("y", now - S)], now)
    assert len(d) == 2  # "old" is outside the window
    assert d.admit("x", now) is False
    assert d.admit("y", now) is False
    assert d.admit("old", now) is True


def test_remember_respects_max_ids_keeping_newest():
    d = Dedup(window_us=60 * S, max_ids=2)
    d.remember([("a", 1 * S), ("b", 2 * S), ("c", 3 * S)], 4 * S)
    assert len(d) == 2
    assert d.admit("a", 4 * S) is True
    assert d.admit("c", 4 * S) is False


def test_repeats_are_counted():
    """/admin/stats reports these as `duplicates` (Writer.statistics)."""
    d = Dedup(window_us=100, max_ids=10)
    assert d.admit("k", 0) and not d.admit("k", 50) and not d.admit("k", 60)
    assert d.admit("k", 200)  # past the window: a new event
    assert d.repeats == 2
