"""Quantities with units, as a user types them in a flag: durations and sizes.

Rules:
- A plain number is in the unit of the setting it is for (the suffix of the setting's
  name: `_s`, `_ms`, `_bytes`); a suffix converts (`30m`, `250ms`, `1MiB`, `500KB`).
- Exact: the result is a Decimal, so `0.1s` is 100 ms, and the caller decides whether a
  fraction is allowed. Negative numbers and unknown suffixes are ValueErrors.
"""

from __future__ import annotations

import re
from decimal import Decimal

_SECONDS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600),
            "d": Decimal(86_400)}
_BYTES = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2, "gb": 1000**3,
          "gib": 1024**3}
_QUANTITY = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)


def _quantity(text: str, units: dict, plain: str, what: str) -> Decimal:
    """`text` as a non-negative number of `plain` units; a suffix of `units` converts."""
    match = _QUANTITY.fullmatch(text.strip())
    unit = match and (match[2].lower() or plain)
    if not match or unit not in units:
        raise ValueError(f"not a {what}: {text!r}")
    return Decimal(match[1]) * units[unit] / units[plain]


def parse_duration(text: str, unit: str = "s") -> Decimal:
    """'30m', '90s', '1h', '250ms', '1d', or a plain number of `unit` ('s' or 'ms'):
    that duration in `unit`. Raises ValueError naming the text."""
    return _quantity(text, _SECONDS, unit, "duration (e.g. 30m, 90s, 1h, 250ms)")


def parse_size(text: str) -> Decimal:
    """'1MiB', '512KiB', '500KB', '2GB', or a plain number of bytes: that many bytes (1
    KiB = 1024 bytes, 1 KB = 1000). Raises ValueError naming the text."""
    return _quantity(text, _BYTES, "b", "size (e.g. 1MiB, 512KiB, 500KB, 65536)")
