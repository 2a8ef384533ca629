"""Recently seen message ids, so a retried event is answered as stored, not stored twice.

Rules:
- Bounded twice: ids older than the window are forgotten, and so is the oldest id once
  `max_ids` are held. Memory is O(max_ids).
- Keys are `project + "\\x1f" + message_id`; times are µs since the epoch, passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


def dedup_key(project: str, message_id: str) -> str:
    return f"{project}\x1f{message_id}"


def dedup_keys(project: str, message_ids: list[str]) -> list[str]:
    """`dedup_key` of each id (a batch's)."""
    return [f"{project}\x1f{m}" for m in message_ids]


class Dedup:
    def __init__(self, window_us: int, max_ids: int) -> None:
        self.window_us = window_us
        self.max_ids = max_ids
        self._seen: OrderedDict[str, int] = OrderedDict()
        self.repeats = 0  # admissions refused (events answered as stored, not stored again)

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, key: str, now_us: int) -> bool:
        """True (and remember it) if `key` was not seen within the window."""
        return self.admit_all((key,), now_us)[0]

    def admit_all(self, keys: Sequence[str], now_us: int) -> list[bool]:
        """`admit` for each key in turn (a batch's ids), in one call."""
        seen, window, max_ids = self._seen, self.window_us, self.max_ids
        admitted = []
        for key in keys:
            at = seen.get(key)
            if at is not None:
                if now_us - at < window:
                    self.repeats += 1
                    admitted.append(False)
                    continue
                del seen[key]
            seen[key] = now_us
            if len(seen) > max_ids:
                seen.popitem(last=False)
            admitted.append(True)
        self._trim(now_us)  # (what this batch added is newer than the horizon)
        return admitted

    def remember(self, items: Iterable[tuple[str, int]], now_us: int) -> None:
        """Load ids known to be stored (e.g. at start-up); oldest first."""
        for key, at in items:
            self._seen[key] = at
            self._seen.move_to_end(key)
        self._trim(now_us)

    def forget(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._seen.pop(key, None)

    def _trim(self, now_us: int) -> None:
        seen = self._seen
        while len(seen) > self.max_ids:
            seen.popitem(last=False)
        horizon = now_us - self.window_us
        while seen:
            key = next(iter(seen))
            if seen[key] > horizon:
                break
            del seen[key]
