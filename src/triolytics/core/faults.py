"""Repeated faults, logged without a flood: the first at once, then a count per interval.

Rules:
- A fault has a key naming what failed ("journal write", "DuckDB load"). `failed(key,
  message)` logs the first occurrence at once (ERROR, the message as it is), then at most
  one line per `interval_s`: how many more happened and the latest message. `cleared(key)`
  logs one line (WARNING) if the fault was active: "<key>s succeed again after N
  failures over S s".
- Flapping (a fault back within `interval_s` of its last line, as at the edge of a full
  disk where small writes pass and large ones fail) makes no line at once: its failures
  are counted into the next periodic line, and an episode that had no line of its own
  ends without one.
- `cause` is the latest message of an active fault (None when all are clear): what
  `/readyz` says.
- Pure: the clock (seconds, monotonic) is injected; no trio, no I/O beyond the logger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable


class _Fault:
    __slots__ = ("active", "since", "count", "unlogged", "logged_at", "message", "announced")

    def __init__(self, now: float, message: str) -> None:
        self.active = True
        self.since = now  # this episode's first failure
        self.count = 1  # failures in this episode
        self.unlogged = 0  # failures since the last line
        self.logged_at = now  # the last line about this key
        self.message = message
        self.announced = True  # this episode has had a line (so its end gets one)


class Faults:
    def __init__(self, log: logging.Logger, interval_s: float,
                 clock: Callable[[], float]) -> None:
        self.log = log
        self.interval_s = interval_s
        self.clock = clock
        self._faults: dict[str, _Fault] = {}  # by key, the latest failure last
        self.cause: str | None = None

    @property
    def active(self) -> set[str]:
        return {key for key, f in self._faults.items() if f.active}

    def failed(self, key: str, message: str) -> None:
        now = self.clock()
        fault = self._faults.pop(key, None)
        if fault is None or (not fault.active and now - fault.logged_at >= self.interval_s):
            if fault is not None and fault.unlogged:  # (flapping since its last line)
                self.log.error("%s (and %d more failure%s since the last line, %.0f s ago)",
                               message, fault.unlogged, _s(fault.unlogged),
                               now - fault.logged_at)
            else:
                self.log.error("%s", message)
            fault = _Fault(now, message)
        elif not fault.active:  # back within an interval of its last line (flapping):
            fault.active = True  # counted, and said in the next line
            fault.announced = False
            fault.since = now
            fault.count = 1
            fault.unlogged += 1
            fault.message = message
        else:
            fault.count += 1
            fault.unlogged += 1
            fault.message = message
            if now - fault.logged_at >= self.interval_s:
                self.log.error("%s: %d more failure%s in the last %.0f s; latest: %s", key,
                               fault.unlogged, _s(fault.unlogged), now - fault.logged_at,
                               message)
                fault.unlogged = 0
                fault.logged_at = now
                fault.announced = True
        self._faults[key] = fault
        self.cause = message

    def cleared(self, key: str) -> None:
        fault = self._faults.get(key)
        if fault is None or not fault.active:
            return
        fault.active = False
        now = self.clock()
        if fault.announced:
            self.log.warning("%ss succeed again after %d failure%s over %.0f s", key,
                             fault.count, _s(fault.count), now - fault.since)
            fault.logged_at = now
            fault.unlogged = 0
        self.cause = next((f.message for f in reversed(self._faults.values()) if f.active),
                          None)


def _s(n: int) -> str:
    return "" if n == 1 else "s"
