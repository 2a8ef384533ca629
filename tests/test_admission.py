"""`admission`: connection caps as plain bookkeeping, and the address a client counts as."""

from __future__ import annotations

import pytest

from triolytics.core.admission import Caps, client_key


def test_a_key_is_capped_and_others_are_not():
    caps = Caps(total=10, per_key=2)
    assert [caps.admit("a"), caps.admit("a"), caps.admit("a")] == [True, True, False]
    assert caps.admit("b") and caps.admit(None)
    assert (caps.open, caps.by_key) == (4, {"a": 2, "b": 1})
    assert caps.take_refused() == (0, 1) and caps.take_refused() == (0, 0)
    assert caps.last_refused == "a"


def test_the_global_cap_counts_every_key_and_none():
    caps = Caps(total=3, per_key=5)
    assert all(caps.admit(k) for k in ("a", "b", None))
    assert not caps.admit("c") and not caps.admit(None)
    assert caps.take_refused() == (2, 0)
    caps.release(None)
    assert caps.admit("c")


def test_entries_go_at_zero_so_memory_follows_open_connections():
    caps = Caps(total=100_000, per_key=1)
    for i in range(1000):
        assert caps.admit(f"10.0.{i // 256}.{i % 256}")
    for i in range(1000):
        caps.release(f"10.0.{i // 256}.{i % 256}")
    assert (caps.open, caps.by_key) == (0, {})


@pytest.mark.parametrize("peer,key", [
    ("203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
    ("fe80::1%eth0", "fe80::/64"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("::1", "::/64"),
    ("not an address", "not an address"),
])
def test_client_key(peer, key):
    assert client_key(peer) == key
