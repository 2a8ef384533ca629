"""A token bucket per client address (pure): `POST /create`'s rate limit.

Rules:
- Each client may make `burst` calls at once, then `per_min` per minute.
- Time (seconds, monotonic) is passed in.
- Memory is bounded by `max_clients`: past it, the least recently seen client is
  forgotten (it starts again with a full bucket, which only ever errs on the lenient side).
"""

from __future__ import annotations


class RateLimit:
    def __init__(self, per_min: float, burst: int, max_clients: int = 100_000) -> None:
        self.rate = per_min / 60.0  # tokens per second
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str, now: float) -> float:
        """0.0 if `client` may go now (a token is spent), else seconds until it may."""
        buckets = self._buckets
        tokens, at = buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            buckets[client] = (tokens - 1.0, now)
            wait = 0.0
        else:
            buckets[client] = (tokens, now)
            wait = (1.0 - tokens) / self.rate if self.rate > 0 else float("inf")
        if len(buckets) > self.max_clients:
            del buckets[next(iter(buckets))]  # dicts keep insertion order: the stalest
        return wait
