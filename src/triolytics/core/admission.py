"""Connection caps: how many connections all clients together, and one client address,
may hold open at once (pure bookkeeping, no I/O).

Rules:
- `admit(key)` says whether a new connection may be served and, if so, takes its slot;
  `release(key)` gives the slot back when the connection closes, whatever it became (an
  upgraded WebSocket counts until it closes). The caller answers a refusal.
- A key is a client address (`client_key`): IPv4 as it is, IPv6 by its /64 (one
  subscriber's prefix, as a host can use any address in it). `None` counts only
  against the global cap (a trusted proxy speaks for many clients).
- Memory is bounded by the open connections: a key's entry is removed at zero.
- Refusals are counted, not reported one by one: `take_refused()` hands over the counts
  since its last call, for the caller to log at most one line per period.
"""

from __future__ import annotations

import ipaddress


def client_key(peer: str) -> str:
    """The address a per-client cap counts: an IPv4 address as it is (the common case,
    no parsing), an IPv6 one as its /64 prefix, an IPv4-mapped one as its IPv4."""
    if ":" not in peer:
        return peer
    try:
        ip = ipaddress.IPv6Address(peer.partition("%")[0])
    except ValueError:
        return peer
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))


class Caps:
    """Open connections, in all and per key, against `total` and `per_key`."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total = total
        self.per_key = per_key
        self.open = 0
        self.by_key: dict[str, int] = {}  # key -> open connections; no entry at zero
        self.refused_total = 0  # refused at the global cap, since `take_refused`
        self.refused_per_key = 0  # refused at a key's cap, since `take_refused`
        self.last_refused: str | None = None  # the key of the latest refusal

    def admit(self, key: str | None) -> bool:
        """Take a slot for a new connection of `key`; False (nothing taken): refuse it."""
        if self.open >= self.total:
            self.refused_total += 1
            self.last_refused = key
            return False
        if key is not None:
            held = self.by_key.get(key, 0)
            if held >= self.per_key:
                self.refused_per_key += 1
                self.last_refused = key
                return False
            self.by_key[key] = held + 1
        self.open += 1
        return True

    def release(self, key: str | None) -> None:
        """Give back the slot `admit(key)` took."""
        self.open -= 1
        if key is not None:
            held = self.by_key[key] - 1
            if held:
                self.by_key[key] = held
            else:
                del self.by_key[key]

    def take_refused(self) -> tuple[int, int]:
        """(at the global cap, at a per-key cap) since the last call; the counts restart."""
        counts = (self.refused_total, self.refused_per_key)
        self.refused_total = self.refused_per_key = 0
        return counts
