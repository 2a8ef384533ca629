"""faults.py: the first occurrence at once, then one line per interval, and one when clear."""

from __future__ import annotations

import logging

from triolytics.core.faults import Faults

log = logging.getLogger("test.faults")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "test.faults"]


def test_first_failure_at_once_then_one_line_per_interval_then_one_when_clear(caplog):
    clock = Clock()
    faults = Faults(log, 10.0, clock)
    caplog.set_level(logging.INFO)
    faults.failed("journal write", "journal write failed: [Errno 28] No space left on device")
    assert lines(caplog) == [(logging.ERROR,
                              "journal write failed: [Errno 28] No space left on device")]
    assert faults.cause == "journal write failed: [Errno 28] No space left on device"
    for i in range(1000):  # 1000 more within the interval: nothing logged
        clock.now += 0.009
        faults.failed("journal write", f"journal write failed: attempt {i}")
    assert len(lines(caplog)) == 1
    clock.now = 110.5
    faults.failed("journal write", "journal write failed: the latest")
    assert lines(caplog)[1] == (logging.ERROR, "journal write: 1001 more failures in the "
                                "last 10 s; latest: journal write failed: the latest")
    clock.now = 111
    faults.failed("journal write", "again")
    assert len(lines(caplog)) == 2
    clock.now = 130
    faults.cleared("journal write")
    assert lines(caplog)[2] == (logging.WARNING, "journal writes succeed again after 1003 "
                                "failures over 30 s")
    assert faults.cause is None
    faults.cleared("journal write")  # nothing to say: already clear
    assert len(lines(caplog)) == 3


def test_faults_of_two_kinds_are_counted_apart_and_the_latest_is_the_cause(caplog):
    clock = Clock()
    faults = Faults(log, 10.0, clock)
    faults.failed("DuckDB load", "DuckDB load failed: disk full")
    faults.failed("journal write", "journal write failed: disk full")
    assert faults.cause == "journal write failed: disk full"
    assert faults.active == {"DuckDB load", "journal write"}
    faults.cleared("journal write")
    assert faults.cause == "DuckDB load failed: disk full"
    faults.cleared("DuckDB load")
    assert faults.cause is None and not faults.active
    assert [m for _, m in lines(caplog)] == [
        "DuckDB load failed: disk full", "journal write failed: disk full",
        "journal writes succeed again after 1 failure over 0 s",
        "DuckDB loads succeed again after 1 failure over 0 s"]


def test_a_fault_that_comes_back_after_an_interval_is_logged_at_once(caplog):
    clock = Clock()
    faults = Faults(log, 10.0, clock)
    faults.failed("journal write", "one")
    faults.cleared("journal write")
    clock.now += 10
    faults.failed("journal write", "two")
    assert [m for _, m in lines(caplog)][-1] == "two"


def test_flapping_makes_no_more_than_a_line_per_interval(caplog):
    clock = Clock()
    faults = Faults(log, 10.0, clock)
    for _ in range(40):  # fail, pass, fail, pass, ... for 20 s
        faults.failed("journal write", "full")
        assert faults.cause == "full"
        clock.now += 0.25
        faults.cleared("journal write")
        assert faults.cause is None
        clock.now += 0.25
    assert [m for _, m in lines(caplog)] == [
        "full", "journal writes succeed again after 1 failure over 0 s",
        "full (and 20 more failures since the last line, 10 s ago)",
        "journal writes succeed again after 1 failure over 0 s"]
