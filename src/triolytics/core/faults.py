"""Repeated faults, logged without a flood: the first at once, then a count per interval.

Rules:
- A fault has a key naming what failed ("journal write", "DuckDB load"). `failed(key,
  message)` logs the first occurrence at once (ERROR, the message as it is), then at most
  one line per `interval_s`: how many more happened and the latest message. `cleared(key)`
  logs one line (WARNING) if the fault was active: "<key>s succeed again after N
  failures over S s".
- `cause` is the latest message of an active fault (None when all are clear): what
  `/readyz` says.
- Pure: the clock (seconds, monotonic) is injected; no trio, no I/O beyond the logger.
"""

from __future__ import annotations

import logging
from collections.abc import Callable


class _Fault:
    __slots__ = ("since", "count", "unlogged", "logged_at", "message")

    def __init__(self, now: float, message: str) -> None:
        self.since = now
        self.count = 1
        self.unlogged = 0  # failures since the last line
        self.logged_at = now
        self.message = message


class Faults:
    def __init__(self, log: logging.Logger, interval_s: float,
                 clock: Callable[[], float]) -> None:
        self.log = log
        self.interval_s = interval_s
        self.clock = clock
        self._faults: dict[str, _Fault] = {}  # active, in the order they (re)started
        self.cause: str | None = None

    @property
    def active(self) -> set[str]:
        return set(self._faults)

    def failed(self, key: str, message: str) -> None:
        now = self.clock()
        fault = self._faults.get(key)
        if fault is None:
            self._faults[key] = _Fault(now, message)
            self.log.error("%s", message)
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
            self._faults[key] = self._faults.pop(key)  # the latest last
        self.cause = message

    def cleared(self, key: str) -> None:
        fault = self._faults.pop(key, None)
        if fault is None:
            return
        self.log.warning("%ss succeed again after %d failure%s over %.0f s", key,
                         fault.count, _s(fault.count), self.clock() - fault.since)
        self.cause = next(reversed(self._faults.values())).message if self._faults else None


def _s(n: int) -> str:
    return "" if n == 1 else "s"
