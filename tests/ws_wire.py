"""WebSocket frames by hand, for tests that need the bytes a client sends (valid or not)
and to read the server's frames back."""

from __future__ import annotations

from triolytics.core.ws_frames import unmask

MASK = b"\x11\x22\x33\x44"


def masked(first: int, payload: bytes, length: bytes | None = None) -> bytes:
    """A client frame: the first byte as given (FIN, RSV, opcode), the MASK bit, the
    length (or `length` as given, to break the rule of its shortest form), key, payload."""
    n = len(payload)
    if length is None:
        length = bytes([n]) if n < 126 else bytes([126]) + n.to_bytes(2, "big")
    return bytes([first, 0x80 | length[0]]) + length[1:] + MASK + unmask(MASK, payload)


def server_frames(buf: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each unmasked server frame in buf (complete frames only)."""
    out, pos = [], 0
    while len(buf) - pos >= 2:
        n, at = buf[pos + 1] & 0x7F, pos + 2
        if n == 126:
            n, at = int.from_bytes(buf[at:at + 2], "big"), at + 2
        if len(buf) - at < n:
            break
        out.append((buf[pos] & 0x0F, buf[at:at + n]))
        pos = at + n
    return out
