"""Token buckets per key (pure): `POST /create`'s rate limit per client address, and the
WebSocket's event rates per connection and per `analytics_id`.

Rules:
- A key may spend `burst` tokens at once, then `per_min` per minute.
- `take` spends one token, or says how long until one is there (the call is refused).
  `spend` spends any number, into debt if need be (what was already read is taken
  whole), and `due` says how long until a key is out of debt (what waits for it).
- Time (seconds, monotonic) is passed in.
- Memory is bounded by `max_clients`: past it, the least recently seen key is forgotten
  (it starts again with a full bucket, which only ever errs on the lenient side).
  `forget` drops a key that cannot come back (a closed connection).
"""

from __future__ import annotations

from collections.abc import Hashable

INF = float("inf")


class RateLimit:
    def __init__(self, per_min: float, burst: int, max_clients: int = 100_000) -> None:
        self.rate = per_min / 60.0  # tokens per second
        self.burst = float(burst)
        self.max_clients = max_clients
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: Hashable, now: float) -> float:
        """0.0 if `client` may go now (a token is spent), else seconds until it may."""
        tokens = self._refill(client, now)
        if tokens >= 1.0:
            self._keep(client, tokens - 1.0, now)
            return 0.0
        self._keep(client, tokens, now)
        return (1.0 - tokens) / self.rate if self.rate > 0 else INF

    def spend(self, client: Hashable, now: float, tokens: float) -> float:
        """Spend `tokens`, into debt if there are fewer; seconds until out of debt."""
        left = self._refill(client, now) - tokens
        self._keep(client, left, now)
        return self._debt_s(left)

    def due(self, client: Hashable, now: float) -> float:
        """Seconds until `client` is out of debt; 0.0 if it is not in debt."""
        got = self._buckets.get(client)
        if got is None:
            return 0.0
        tokens, at = got
        return self._debt_s(tokens + (now - at) * self.rate)

    def forget(self, client: Hashable) -> None:
        self._buckets.pop(client, None)

    def _refill(self, client: Hashable, now: float) -> float:
        """The tokens `client` has now; its entry is taken out, for `_keep` to put back
        last (dicts keep insertion order: the first entry is the stalest)."""
        tokens, at = self._buckets.pop(client, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate)

    def _keep(self, client: Hashable, tokens: float, now: float) -> None:
        buckets = self._buckets
        buckets[client] = (tokens, now)
        if len(buckets) > self.max_clients:
            del buckets[next(iter(buckets))]

    def _debt_s(self, tokens: float) -> float:
        if tokens >= 0.0:
            return 0.0
        return -tokens / self.rate if self.rate > 0 else INF


class EventRates:
    """Events per second of WebSocket connections: a bucket per connection, and one per
    `analytics_id` that all its connections spend from (either may be off: rate 0).

    A message is charged its events once read (a refused one, 1). A connection's bucket
    is forgotten when it closes; an id's outlives its connections (a reconnect must not
    refill it) and is forgotten only as the least recently seen past `max_ids`.
    """

    def __init__(self, conn_per_s: float, conn_burst: int, id_per_s: float, id_burst: int,
                 max_ids: int) -> None:
        self.conns = RateLimit(conn_per_s * 60, conn_burst, max_ids) if conn_per_s > 0 \
            else None
        self.ids = RateLimit(id_per_s * 60, id_burst, max_ids) if id_per_s > 0 else None

    def spend(self, conn: Hashable, analytics_id: str, events: int, now: float) -> None:
        if self.conns is not None:
            self.conns.spend(conn, now, events)
        if self.ids is not None:
            self.ids.spend(analytics_id, now, events)

    def due(self, conn: Hashable, analytics_id: str, now: float) -> float:
        """Seconds until both buckets are out of debt (0.0: the connection may read)."""
        wait = 0.0
        if self.conns is not None:
            wait = self.conns.due(conn, now)
        if self.ids is not None:
            wait = max(wait, self.ids.due(analytics_id, now))
        return wait

    def forget(self, conn: Hashable) -> None:
        """The connection closed."""
        if self.conns is not None:
            self.conns.forget(conn)
