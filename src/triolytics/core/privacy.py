"""Privacy controls, sans I/O: what becomes of a client's IP (`ip_mode`), and whether a
request asked not to be tracked (`respect_dnt`). docs/privacy.md explains both.

Rules:
- IPs are anonymized before anything is journaled, once per request or connection
  (cached: most requests repeat an address), never per event. Rate limits and the
  per-address connection cap keep using the full address, in memory only.
- `truncate` keeps an IPv4 address's /24 and an IPv6 address's /48; an IPv4-mapped IPv6
  address is truncated as the IPv4 address it is. Text that is not an address is
  dropped, not kept: it cannot be truncated.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Mapping
from typing import Literal

IpMode = Literal["full", "truncate", "drop"]
IP_MODES: tuple[str, ...] = ("full", "truncate", "drop")


@functools.lru_cache(maxsize=4096)
def anonymize_ip(ip: str, mode: str) -> str | None:
    """`ip` as `mode` stores it: itself (full), its network part (truncate), or None."""
    if mode == "full":
        return ip
    if mode != "truncate" or not isinstance(ip, str):
        return None
    try:
        address = ipaddress.ip_address(ip.strip().partition("%")[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.version == 4:
        return str(ipaddress.IPv4Address(int(address) & 0xFFFFFF00))
    return str(ipaddress.IPv6Address(int(address) >> 80 << 80))


def do_not_track(headers: Mapping[bytes, bytes]) -> bool:
    """True if the request carries `DNT: 1` or `Sec-GPC: 1` (Global Privacy Control)."""
    return headers.get(b"dnt", b"").strip() == b"1" or \
        headers.get(b"sec-gpc", b"").strip() == b"1"
