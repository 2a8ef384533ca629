"""Fuzz the running server over real sockets for a chosen time: HTTP heads, bodies and
WebSocket frames, mutated from a seed corpus, sent in random pieces.

    .venv/bin/python bench/fuzz.py [--duration 180] [--seed N] [--concurrency 8]
        [--corpus bench/fuzz_corpus] [--findings DIR] [--max-rss-mb 600] [--url URL]

Without `--url` it starts `python -m triolytics serve` itself (as bench/crash_loop.py
does: a free port on 127.0.0.1, a temporary data directory, write key `wk_fuzz`) with a
config file that lowers the timeouts (see `SERVER_CONFIG`), so a stalled connection is
closed by the server within seconds. Every connection is checked:

- no 5xx but `503` with `Retry-After` (and `501 not_implemented`, the documented answer
  to a transfer coding other than chunked); a 500 is a finding;
- no hang: each connection gets its answers, or is closed by the server, within
  `--hang-timeout` of our last byte (the server's own head, body, keep-alive and
  WebSocket message timeouts must fire); a WebSocket still open at the end is sent a
  Close, which the server must answer;
- no crash: the process stays up, its stderr has no `Traceback` and no `ERROR` or
  `CRITICAL` line (stderr is saved beside the findings);
- bounded memory: VmRSS sampled every second, max and final reported, over
  `--max-rss-mb` a finding;
- at the end `/healthz` answers 200, a valid event is stored (201) and the server exits
  0 on SIGTERM.

Each finding is saved in `--findings` as `<n>-<what>.bin` (the exact bytes sent) and
`<n>-<what>.json` (how they were sent, what came back). One JSON document is printed at
the end; exit status 1 when there is any finding. `--write-corpus DIR` writes the seed
corpus (the committed bench/fuzz_corpus is its output) and exits.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import http.client
import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from pathlib import Path
from urllib.parse import urlsplit

HOST = "127.0.0.1"
WRITE_KEY = "wk_fuzz"
BENCH = Path(__file__).resolve().parent
DEFAULT_CORPUS = BENCH / "fuzz_corpus"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 60.0
QUIET_S = 0.3  # no byte for this long after a complete answer: the exchange is over
RST_SHARE = 0.3  # share of connections we close with a reset rather than a FIN
ABORT_SHARE = 0.04  # share of connections we close before our input is all sent
LINGER_CHECK = 0.05  # share of HTTP connections held until the server closes them
SAVED_PER_SIGNATURE = 5  # findings of one kind saved as files; the rest are counted
# The server's timeouts, lowered so that a connection the fuzzer leaves hanging is the
# server's to close within seconds (docs/configuration.md).
SERVER_CONFIG = {
    "head_timeout_s": 2,
    "request_timeout_s": 4,
    "body_rate_grace_s": 2,
    "keepalive_timeout_s": 2,
    "shutdown_grace_s": 5,
    "ws_message_timeout_s": 3,
    "ws_ping_interval_s": 4,
    "ws_pong_timeout_s": 3,
    "ws_idle_timeout_s": 10,
    "fsync": "interval",
    "session_timeout_s": 120,
}
HANG_TIMEOUT_OWN_S = 20.0  # >> the lowered timeouts, for a loaded 2-core machine
HANG_TIMEOUT_URL_S = 60.0  # the defaults: request_timeout_s 30, ws_message_timeout_s 60
PLACEHOLDER_AID = b"{{AID}}"

# ---------------------------------------------------------------- WebSocket frames

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class Frame:
    __slots__ = ("fin", "rsv", "opcode", "masked", "key", "payload", "form", "lie")

    def __init__(self, opcode: int, payload: bytes, fin: bool = True,
                 key: bytes = b"\x1f\x2e\x3d\x4c", masked: bool = True, rsv: int = 0,
                 form: str = "min", lie: int = 0) -> None:
        self.fin, self.rsv, self.opcode = fin, rsv, opcode
        self.masked, self.key, self.payload = masked, key, payload
        self.form = form  # "min", "16" or "64": the length's encoding
        self.lie = lie  # added to the length announced

    def copy(self) -> Frame:
        return Frame(self.opcode, self.payload, self.fin, self.key, self.masked, self.rsv,
                     self.form, self.lie)

    def encode(self) -> bytes:
        n = len(self.payload)
        announced = max(0, n + self.lie)
        b0 = (0x80 if self.fin else 0) | (self.rsv & 7) << 4 | (self.opcode & 0xF)
        m = 0x80 if self.masked else 0
        form = self.form
        if form == "min":
            form = "7" if announced < 126 else "16" if announced < 65536 else "64"
        if form == "7" and announced < 126:
            head = bytes((b0, m | announced))
        elif form == "16" and announced < 65536:
            head = bytes((b0, m | 126)) + announced.to_bytes(2, "big")
        else:
            head = bytes((b0, m | 127)) + min(announced, 2**64 - 1).to_bytes(8, "big")
        if not self.masked:
            return head + self.payload
        return head + self.key + mask(self.key, self.payload)


def mask(key: bytes, payload: bytes) -> bytes:
    if not payload:
        return b""
    k = (key * (len(payload) // 4 + 1))[:len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(len(payload), "big")


def parse_frames(data: bytes, masked: bool = True) -> tuple[list[Frame], bytes]:
    """Frames in `data` (client frames when `masked`) and the bytes after the last whole one."""
    frames, p = [], 0
    while len(data) - p >= 2:
        b0, b1 = data[p], data[p + 1]
        n, at = b1 & 0x7F, p + 2
        if n >= 126:
            width = 2 if n == 126 else 8
            if len(data) - at < width:
                break
            n, at = int.from_bytes(data[at:at + width], "big"), at + width
        has_key = bool(b1 & 0x80)
        key = data[at:at + 4] if has_key else b""
        at += 4 if has_key else 0
        if len(data) - at < n:
            break
        payload = data[at:at + n]
        if has_key:
            payload = mask(key, payload)
        frames.append(Frame(b0 & 0xF, payload, bool(b0 & 0x80), key or b"\0\0\0\0", has_key,
                            (b0 >> 4) & 7))
        p = at + n
    return frames, data[p:]


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


# ---------------------------------------------------------------- the seed corpus

ANON = "550e8400-e29b-41d4-a716-446655440000"


def _req(method: str, target: str, headers: list[tuple[str, str]], body: bytes = b"",
         length: bool = True) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers]
    if length and (body or method == "POST"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _chunked(body: bytes, sizes: list[int], ext: bool = False) -> bytes:
    out, p = b"", 0
    for s in sizes + [len(body)]:
        piece = body[p:p + s]
        if not piece:
            continue
        out += b"%x%s\r\n%s\r\n" % (len(piece), b";x=1" if ext else b"", piece)
        p += len(piece)
    return out + b"0\r\n\r\n"


def seed_corpus() -> dict[str, bytes]:
    """name -> bytes: HTTP requests (`http/`), WebSocket frame streams (`ws/`)."""
    j = lambda o: json.dumps(o).encode()  # noqa: E731
    wk = [("Content-Type", "application/json"), ("x-write-key", WRITE_KEY)]
    track = {"type": "track", "event": "Button Clicked", "anonymousId": ANON,
             "properties": {"button_id": "signup_hero", "color": "blue"}}
    c: dict[str, bytes] = {}
    c["http/capture.http"] = _req("POST", "/v1/capture", wk, j(track))
    c["http/capture_full.http"] = _req("POST", "/v1/capture", wk + [("User-Agent", "fuzz/1")], j({
        **track, "userId": "u1", "timestamp": "2026-01-01T10:00:00Z",
        "sentAt": "2026-01-01T10:00:05.000Z", "messageId": "m-seed-1",
        "context": {"ip": "1.2.3.4", "locale": "en"}, "integrations": {"All": True}}))
    c["http/batch.http"] = _req("POST", "/v1/batch", wk, j({
        "batch": [track, {"type": "identify", "userId": "u1", "traits": {"plan": "pro"}},
                  {"type": "page", "anonymousId": ANON, "name": "Home"}],
        "context": {"library": {"name": "fuzz"}}, "sentAt": "2026-01-01T10:00:00Z"}))
    c["http/batch_short.http"] = _req("POST", "/v1/b", wk, j({"batch": [track]}))
    events = {
        "track": {"event": "Signed Up", "userId": "u1", "properties": {"plan": "pro"}},
        "identify": {"userId": "u1", "traits": {"email": "a@example.com"}},
        "page": {"anonymousId": ANON, "name": "Home", "properties": {"path": "/"}},
        "screen": {"userId": "u1", "name": "Settings"},
        "group": {"userId": "u1", "groupId": "g1", "traits": {"name": "Acme"}},
        "alias": {"userId": "u2", "previousId": "u1"},
    }
    for kind, event in events.items():
        c[f"http/{kind}.http"] = _req("POST", f"/v1/{kind}", wk, j(event))
    c["http/short_t.http"] = _req("POST", "/v1/t", wk, j(events["track"]))
    auth = base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    c["http/basic_auth.http"] = _req("POST", "/v1/track", [
        ("Content-Type", "application/json"), ("Authorization", f"Basic {auth}")],
        j(events["track"]))
    c["http/beacon.http"] = _req("POST", "/v1/capture", [("Content-Type", "text/plain")],
                                 j({**track, "writeKey": WRITE_KEY}))
    c["http/gzip.http"] = _req("POST", "/v1/batch", wk + [("Content-Encoding", "gzip")],
                               gzip.compress(j({"batch": [track] * 5}), mtime=0))
    c["http/chunked.http"] = _req("POST", "/v1/capture", wk + [("Transfer-Encoding", "chunked")],
                                  length=False) + _chunked(j(track), [7, 30])
    c["http/chunked_ext.http"] = _req("POST", "/v1/batch", wk + [
        ("Transfer-Encoding", "chunked")], length=False) + _chunked(j({"batch": [track]}),
                                                                     [1, 2, 50], ext=True)
    c["http/expect_continue.http"] = _req("POST", "/v1/capture", wk + [
        ("Expect", "100-continue")], j(track))
    c["http/cors_origin.http"] = _req("POST", "/v1/capture", wk + [
        ("Origin", "https://www.example.com")], j(track))
    c["http/preflight.http"] = _req("OPTIONS", "/v1/capture", [
        ("Origin", "https://www.example.com"), ("Access-Control-Request-Method", "POST"),
        ("Access-Control-Request-Headers", "content-type, x-write-key")])
    c["http/create.http"] = _req("POST", "/create", [], length=False)
    c["http/admin_keys_bad_token.http"] = _req("GET", "/admin/keys", [
        ("Authorization", "Bearer not-the-token")])
    c["http/admin_query_bad_token.http"] = _req("POST", "/admin/query", [
        ("Authorization", "Bearer not-the-token"), ("Content-Type", "application/json")],
        j({"sql": "SELECT count(*) FROM events", "max_rows": 5}))
    c["http/admin_revoke_no_token.http"] = _req("POST", "/admin/keys/revoke", [
        ("Content-Type", "application/json")], j({"key": WRITE_KEY}))
    c["http/healthz.http"] = _req("GET", "/healthz", [])
    c["http/readyz.http"] = _req("GET", "/readyz", [("Connection", "close")])
    c["http/head_healthz.http"] = _req("HEAD", "/healthz", [])
    c["http/http10.http"] = _req("GET", "/healthz", []).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    c["http/pipelined.http"] = (c["http/healthz.http"] + c["http/capture.http"]
                                + c["http/batch_short.http"] + c["http/readyz.http"])
    c["http/pipelined_mixed.http"] = (c["http/preflight.http"] + c["http/healthz.http"]
                                      + _req("GET", "/nope", []) + c["http/capture.http"])
    c["http/ws_handshake.http"] = _req("GET", "/analytics?analytics_id={{AID}}", [
        ("Upgrade", "websocket"), ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="), ("Sec-WebSocket-Version", "13")])
    c["http/ws_no_upgrade.http"] = _req("GET", "/analytics?analytics_id={{AID}}", [])
    # WebSocket: frames sent after a valid handshake (added by the harness)
    batch = {"events": [{"type": "screen_view", "ts": 1706859000000,
                         "payload": {"screen_name": "Home"}},
                        {"type": "button_click", "payload": {"btn_id": "play_music"}}],
             "seq": 1}
    text = j(batch)
    f = lambda *frames: b"".join(fr.encode() for fr in frames)  # noqa: E731
    c["ws/batch_seq.frames"] = f(Frame(TEXT, text))
    c["ws/batch_no_seq.frames"] = f(Frame(TEXT, j({"events": batch["events"]})))
    c["ws/binary_batch.frames"] = f(Frame(BINARY, j({**batch, "seq": 2})))
    c["ws/batch_ids.frames"] = f(Frame(TEXT, j({"events": [
        {"type": "e", "id": "ev-1", "ts": 1706859000000}, {"type": "e", "id": "ev-2"}],
        "seq": 3})))
    c["ws/two_batches.frames"] = f(Frame(TEXT, text), Frame(TEXT, j({**batch, "seq": 2})))
    c["ws/invalid_seq.frames"] = f(Frame(TEXT, j({"events": [{"ts": 5}], "seq": 9})))
    c["ws/fragmented.frames"] = f(Frame(TEXT, text[:10], fin=False),
                                  Frame(PING, b"mid"), Frame(CONT, text[10:40], fin=False),
                                  Frame(PONG, b""), Frame(CONT, text[40:]))
    c["ws/ping_close.frames"] = f(Frame(PING, b"hello"), Frame(TEXT, text),
                                  Frame(CLOSE, close_payload(1000, b"bye")))
    c["ws/close_empty.frames"] = f(Frame(CLOSE, b""))
    big = j({"events": [{"type": "bulk", "payload": {"i": i, "pad": "x" * 40}}
                        for i in range(200)], "seq": 4})
    c["ws/big_batch.frames"] = f(Frame(TEXT, big))
    c["ws/ext16.frames"] = f(Frame(TEXT, j({"events": [{"type": "p" * 150}], "seq": 5})))
    return c


# ---------------------------------------------------------------- mutators

ODD_HEADER_VALUES = [
    b"", b" ", b"0", b"-1", b"+5", b"0x10", b"1e3", b"5, 5", b"5, 6", b"99999999999999999999",
    b"chunked", b"gzip, chunked", b"chunked, chunked", b"chunked, gzip", b"identity",
    b"gzip", b"br", b"deflate", b"application/json", b"text/plain", b"application/xml",
    b"multipart/form-data; boundary=x", b"application/json; charset=latin-1", b"close",
    b"keep-alive", b"Upgrade", b"websocket", b"100-continue", b"Basic !!!", b"Basic ",
    b"Basic " + base64.b64encode(b"wk_fuzz:"), b"Basic " + base64.b64encode(b"nope:x"),
    b"Bearer x", b"\x00", b"\xff\xfe", b"a\tb", b"x" * 9000, b"https://evil.example",
    b"null", b"*", b"wk_fuzz", b"wk_nope", b"13", b"8", b"dGhlIHNhbXBsZSBub25jZQ==",
    b"AAAA", b"1.2.3.4, 5.6.7.8", b"\xe2\x82\xac",
]
HEADER_NAMES = [
    b"Content-Length", b"Transfer-Encoding", b"Content-Type", b"Content-Encoding",
    b"x-write-key", b"Authorization", b"Origin", b"Expect", b"Connection", b"Upgrade",
    b"Host", b"User-Agent", b"X-Forwarded-For", b"Sec-WebSocket-Key",
    b"Sec-WebSocket-Version", b"Access-Control-Request-Method", b"Cookie", b"TE",
    b"Content-length", b"content-length ", b" Content-Length", b"Transfer-encoding",
]
METHODS = [b"GET", b"POST", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"PATCH", b"TRACE",
           b"CONNECT", b"PRI", b"get", b"post", b"X" * 300, b"", b"P\x00ST", b"POST ",
           b"\xff"]
TARGETS = [b"*", b"/", b"/v1/capture", b"/v1/batch", b"/v1/track", b"/v1/p", b"/create",
           b"/healthz", b"/readyz", b"/admin/stats", b"/admin/query", b"/admin/keys",
           b"http://127.0.0.1/v1/capture", b"//v1/capture", b"/v1/capture?%00",
           b"/v1/../v1/capture", b"/v1/%2e%2e/capture", b"/" + b"a" * 10000,
           b"/v1/capture#frag", b"/\xff\xfe", b"/analytics", b"/analytics?analytics_id=",
           b"/analytics?analytics_id=0.00000000-0000-0000-0000-000000000000",
           b"/analytics?analytics_id=x&analytics_id={{AID}}", b"/analytics?%zz", b"",
           b"/v1/capture?writeKey=wk_fuzz", b"/static/../../etc/passwd"]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.1 ",
            b"http/1.1", b"HTTP/1", b"HTTP/11", b"", b"HTTP/1.1\x00", b"HTTP/9.9"]
RAW_VALUES = [
    b"null", b"true", b"false", b"0", b"-0", b"1e999", b"-1e999", b"1e308", b"2.5",
    b"123456789012345678901234567890", b"-9223372036854775809", b"18446744073709551616",
    b"0.0000000000000000000001", b"1706859000000", b"99999999999999999", b"-1",
    b"253402300800000", b"-62135596800001",
    b'"\\ud800"', b'"\\udc00x"', b'"a\\ud83dz"', b'"\xff"', b'"\xc0\xaf"', b'"\xed\xa0\x80"',
    b'"\xf4\x90\x80\x80"', b'"\\u0000"', b'"\x00"', b'""', b'"' + b"a" * 40000 + b'"',
    b"[]", b"{}", b"[[[[[]]]]]", b"[" * 3000 + b"]" * 3000, b'{"a":' * 600 + b"1" + b"}" * 600,
    b"NaN", b"Infinity", b'"2024-13-45T99:99:99Z"', b'"9999-12-31T23:59:59Z"',
    b'"0001-01-01T00:00:00Z"', b'"2030-01-01T00:00:00+14:00"', b'"2026-01-01T10:00:00"',
    b'"session_start"', b'"session_end"', b'"track"', b'"alias"', b'"group"', b'"x"',
    b'"' + b"m" * 101 + b'"', b'"\\"\\\\\\/\\b\\f\\n\\r\\t"', b"1.0", b"-1.5e-10",
]
KEYS = ["type", "event", "anonymousId", "userId", "timestamp", "sentAt", "messageId",
        "properties", "context", "traits", "integrations", "name", "groupId", "previousId",
        "writeKey", "batch", "events", "seq", "ts", "payload", "id", "sql", "max_rows",
        "timestamp_adjusted"]
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
            b"\xe2\x82", b"\x80", b"\xf4\x90\x80\x80"]


class Raw:
    """JSON text spliced in as it is."""

    __slots__ = ("text",)

    def __init__(self, text: bytes) -> None:
        self.text = text


class Dup:
    """A JSON object written with repeated keys: a list of (key, value)."""

    __slots__ = ("items",)

    def __init__(self, items: list) -> None:
        self.items = items


def dump(o) -> bytes:
    if isinstance(o, Raw):
        return o.text
    if isinstance(o, Dup):
        return b"{" + b",".join(json.dumps(k).encode() + b":" + dump(v) for k, v in o.items) + b"}"
    if isinstance(o, dict):
        return b"{" + b",".join(json.dumps(k).encode() + b":" + dump(v) for k, v in o.items()) \
            + b"}"
    if isinstance(o, list):
        return b"[" + b",".join(dump(v) for v in o) + b"]"
    return json.dumps(o).encode()


def _nodes(o, out: list, depth: int = 0) -> list:
    """(container, key) of every node under `o`."""
    if depth > 8:
        return out
    if isinstance(o, dict):
        for k, v in o.items():
            out.append((o, k))
            _nodes(v, out, depth + 1)
    elif isinstance(o, list):
        for i, v in enumerate(o):
            out.append((o, i))
            _nodes(v, out, depth + 1)
    return out


def mutate_json(rng: random.Random, body: bytes, ops: list[str]) -> bytes:
    """A structural mutation of a JSON body, or a byte-level one if it is not JSON."""
    try:
        tree = json.loads(body)
    except (ValueError, RecursionError):  # (a deep nesting from an earlier mutation)
        return mutate_bytes(rng, body, ops)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.choice(("value", "value", "key", "dup", "drop", "deep", "multiply", "type",
                         "wrap"))
        ops.append("json_" + op)
        nodes = _nodes(tree, [])
        if op == "value" and nodes:
            parent, k = rng.choice(nodes)
            parent[k] = Raw(rng.choice(RAW_VALUES))
        elif op == "key":
            dicts = [n for n in [tree] + [p[k] for p, k in nodes] if isinstance(n, dict)]
            if dicts:
                rng.choice(dicts)[rng.choice(KEYS)] = Raw(rng.choice(RAW_VALUES))
        elif op == "dup":
            dicts = [(p, k) for p, k in nodes if isinstance(p[k], dict) and p[k]]
            if isinstance(tree, dict) and tree:
                dicts.append((None, None))
            if dicts:
                p, k = rng.choice(dicts)
                d = tree if p is None else p[k]
                items = list(d.items())
                key = rng.choice(items)[0]
                items.insert(rng.randrange(len(items) + 1), (key, Raw(rng.choice(RAW_VALUES))))
                if p is None:
                    tree = Dup(items)
                else:
                    p[k] = Dup(items)
        elif op == "drop" and nodes:
            parent, k = rng.choice(nodes)
            if isinstance(parent, dict):
                del parent[k]
            elif isinstance(parent, list) and k < len(parent):
                del parent[k]
        elif op == "deep":
            depth = rng.choice((50, 200, 1000, 5000))
            if nodes:
                parent, k = rng.choice(nodes)
                parent[k] = Raw(b'{"a":' * depth + b"0" + b"}" * depth if rng.random() < 0.5
                                else b"[" * depth + b"]" * depth)
            else:
                tree = Raw(b"[" * depth + dump(tree) + b"]" * depth)
        elif op == "multiply":
            lists = [p[k] for p, k in nodes if isinstance(p[k], list) and p[k]]
            if lists:
                lst = rng.choice(lists)
                n = rng.choice((2, 10, 100, 2600))
                lst[:] = (lst * (n // len(lst) + 1))[:n]
        elif op == "type":
            tree = Raw(rng.choice(RAW_VALUES))
        elif op == "wrap":
            tree = rng.choice(([tree], {"batch": tree}, {"events": tree, "seq": 1},
                               {"batch": [tree], "writeKey": WRITE_KEY}))
    try:
        text = dump(tree)
    except RecursionError:
        return mutate_bytes(rng, body, ops)
    r = rng.random()
    if r < 0.15:
        ops.append("json_truncate")
        text = text[:rng.randrange(len(text) + 1)]
    elif r < 0.3:
        ops.append("json_bad_utf8")
        p = rng.randrange(len(text) + 1)
        text = text[:p] + rng.choice(BAD_UTF8) + text[p:]
    return text


def mutate_bytes(rng: random.Random, data: bytes, ops: list[str]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 4, 8))):
        op = rng.choice(("flip", "insert", "delete", "dup", "set"))
        ops.append("bytes_" + op)
        p = rng.randrange(len(b) + 1)
        if op == "flip" and b:
            b[min(p, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == "insert":
            b[p:p] = rng.choice([bytes([rng.randrange(256)]), b"\r\n", b"\n", b"\0", b"\r",
                                 b"\r\n\r\n", b" ", b":", b",", b'"', b"{", b"]",
                                 rng.choice(BAD_UTF8)])
        elif op == "delete" and b:
            del b[p:p + rng.randrange(1, 16)]
        elif op == "dup" and b:
            q = rng.randrange(len(b))
            b[p:p] = b[q:q + rng.randrange(1, 64)]
        elif op == "set" and b:
            b[min(p, len(b) - 1)] = rng.choice(b"\x00\r\n :\xff\x7f\"\\")
    return bytes(b)


def split_http(data: bytes) -> tuple[list[bytes], bytes, bytes]:
    """(head lines, body, what follows the first request) of a corpus request."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data.split(b"\r\n"), b"", b""
    lines = data[:end].split(b"\r\n")
    rest = data[end + 4:]
    length = 0
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value)
        if name.strip().lower() == b"transfer-encoding":
            chunked = True
    if chunked:
        m = rest.find(b"0\r\n\r\n")
        cut = m + 5 if m >= 0 else len(rest)
        return lines, dechunk(rest[:cut]), rest[cut:]
    return lines, rest[:length], rest[length:]


def dechunk(data: bytes) -> bytes:
    out, p = b"", 0
    while True:
        nl = data.find(b"\r\n", p)
        if nl < 0:
            return out
        try:
            n = int(data[p:nl].split(b";")[0], 16)
        except ValueError:
            return out
        if n == 0:
            return out
        out += data[nl + 2:nl + 2 + n]
        p = nl + 4 + n


def set_header(lines: list[bytes], name: bytes, value: bytes | None) -> None:
    lines[1:] = [ln for ln in lines[1:] if ln.split(b":")[0].strip().lower() != name.lower()]
    if value is not None:
        lines.append(name + b": " + value)


def get_header(lines: list[bytes], name: bytes) -> bytes | None:
    for ln in lines[1:]:
        k, _, v = ln.partition(b":")
        if k.strip().lower() == name.lower():
            return v.strip()
    return None


def mutate_head(rng: random.Random, lines: list[bytes], ops: list[str]) -> tuple[bytes, bool]:
    """Mutate head lines in place; returns (line ending, whether framing is left alone)."""
    eol, keep_framing = b"\r\n", True
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.choice(("header", "header", "remove", "dup_cl", "te_cl", "te", "huge", "many",
                         "bare_lf", "obs_fold", "method", "target", "version", "no_colon",
                         "ctl", "case", "space_colon", "flip", "request_line"))
        ops.append("head_" + op)
        rl = lines[0].split(b" ")
        if op == "header":
            lines.append(rng.choice(HEADER_NAMES) + b": " + rng.choice(ODD_HEADER_VALUES))
            keep_framing = False
        elif op == "remove" and len(lines) > 1:
            del lines[rng.randrange(1, len(lines))]
            keep_framing = False
        elif op == "dup_cl":
            v = get_header(lines, b"content-length") or b"0"
            lines.append(b"Content-Length: " + rng.choice((v, v + b"0", b"0", v + b", " + v,
                                                           b" " + v + b" ", b"0" + v)))
            keep_framing = False
        elif op == "te_cl":
            lines.append(rng.choice((b"Transfer-Encoding: chunked",
                                     b"Content-Length: 5", b"Transfer-Encoding: identity")))
            keep_framing = False
        elif op == "te":
            set_header(lines, rng.choice((b"Transfer-Encoding", b"transfer-encoding")),
                       rng.choice((b"chunked", b"gzip, chunked", b"chunked, chunked",
                                   b"chunked, identity", b" chunked", b"CHUNKED",
                                   b"x-custom, chunked", b"chunked\x0b")))
            keep_framing = False
        elif op == "huge":
            n = rng.choice((1000, 8000, 16500, 70000))
            lines.insert(rng.randrange(1, len(lines) + 1), b"X-Huge: " + b"h" * n)
        elif op == "many":
            n = rng.choice((50, 99, 101, 150, 400))
            at = rng.randrange(1, len(lines) + 1)
            lines[at:at] = [b"X-%d: %d" % (i, i) for i in range(n)]
        elif op == "bare_lf":
            eol = rng.choice((b"\n", b"\r\n", b"\r", b"\n\r"))
        elif op == "obs_fold" and len(lines) > 1:
            lines.insert(rng.randrange(2, len(lines) + 1), rng.choice((b" folded", b"\tx: y",
                                                                       b" ")))
        elif op == "method":
            rl[0] = rng.choice(METHODS)
        elif op == "target" and len(rl) > 1:
            rl[1] = rng.choice(TARGETS)
        elif op == "version" and len(rl) > 2:
            rl[-1] = rng.choice(VERSIONS)
        elif op == "no_colon":
            lines.insert(rng.randrange(1, len(lines) + 1), rng.choice((b"NoColon", b":x",
                                                                       b"a b: c", b"\x00: 1")))
        elif op == "ctl" and len(lines) > 1:
            i = rng.randrange(1, len(lines))
            p = rng.randrange(len(lines[i]) + 1)
            lines[i] = lines[i][:p] + rng.choice((b"\x00", b"\r", b"\x7f", b"\xff", b"\x01")) \
                + lines[i][p:]
        elif op == "case" and len(lines) > 1:
            i = rng.randrange(1, len(lines))
            lines[i] = lines[i].swapcase() if rng.random() < 0.5 else lines[i].upper()
            keep_framing = False
        elif op == "space_colon" and len(lines) > 1:
            i = rng.randrange(1, len(lines))
            lines[i] = lines[i].replace(b":", rng.choice((b" :", b"\t:", b"::", b": \t")), 1)
            keep_framing = False
        elif op == "flip":
            lines[:] = mutate_bytes(rng, b"\r\n".join(lines), ops).split(b"\r\n")
            keep_framing = False
        elif op == "request_line":
            lines[0] = rng.choice((b"", b"GET", b"GET /", b"GET  /healthz HTTP/1.1",
                                   b"GET /healthz HTTP/1.1 extra", b"\r", b"\x16\x03\x01\x02",
                                   b"PRI * HTTP/2.0"))
            continue
        if op in ("method", "target", "version"):
            lines[0] = b" ".join(rl)
    return eol, keep_framing


def reframe(rng: random.Random, lines: list[bytes], body: bytes, ops: list[str]) -> bytes:
    """The body after the head: Content-Length fixed to it (mostly), or chunked."""
    r = rng.random()
    if r < 0.12:
        ops.append("frame_chunked")
        set_header(lines, b"Content-Length", None)
        set_header(lines, b"Transfer-Encoding", b"chunked")
        sizes = [rng.randrange(1, 64) for _ in range(rng.randrange(0, 6))]
        out = _chunked(body, sizes, ext=rng.random() < 0.3)
        if rng.random() < 0.3:
            ops.append("frame_chunked_bad")
            out = rng.choice((out[:-5] + b"0\r\nX-Trailer: 1\r\n\r\n", out[:-2],
                              b"fffffffffffffffff\r\n" + out, b"-1\r\n" + out,
                              out.replace(b"\r\n", b"\n", 1), b"1 \r\nx\r\n" + out,
                              b"0x5\r\n" + out, out + out))
        return out
    if r < 0.2:
        ops.append("frame_length_kept")
        return body
    if r < 0.25:
        ops.append("frame_length_short")
        set_header(lines, b"Content-Length", b"%d" % max(0, len(body) - rng.randrange(1, 20)))
        return body
    if r < 0.3:
        ops.append("frame_length_long")
        set_header(lines, b"Content-Length", b"%d" % (len(body) + rng.choice((1, 100, 10**6))))
        return body
    if get_header(lines, b"transfer-encoding") is not None:
        return _chunked(body, [rng.randrange(1, 128)])
    if body or get_header(lines, b"content-length") is not None:
        set_header(lines, b"Content-Length", b"%d" % len(body))
    return body


def mutate_http(rng: random.Random, data: bytes, other: bytes, ops: list[str]) -> bytes:
    lines, body, rest = split_http(data)
    what = rng.random()
    eol = b"\r\n"
    keep = True
    if what < 0.4:
        eol, keep = mutate_head(rng, lines, ops)
    elif what < 0.8:
        if get_header(lines, b"content-encoding") == b"gzip" and rng.random() < 0.7:
            try:
                plain = gzip.decompress(body)
            except (OSError, EOFError):
                plain = body
            ops.append("gzip_inner")
            body = gzip.compress(mutate_json(rng, plain, ops), mtime=0)
        else:
            body = mutate_json(rng, body, ops)
        if rng.random() < 0.1:
            ops.append("gzip_wrap")
            set_header(lines, b"Content-Encoding", b"gzip")
            body = rng.choice((gzip.compress(body, mtime=0), gzip.compress(body)[:-4],
                               gzip.compress(b" " * 3_000_000 + body, mtime=0), body))
    elif what < 0.9:
        eol, keep = mutate_head(rng, lines, ops)
        body = mutate_json(rng, body, ops)
    else:
        ops.append("splice")
        if rng.random() < 0.5:
            return data + other  # pipelined
        return data[:rng.randrange(len(data) + 1)] + other[rng.randrange(len(other) + 1):]
    tail = reframe(rng, lines, body, ops) if keep or rng.random() < 0.5 else body
    out = eol.join(lines) + eol + eol + tail
    if rest and rng.random() < 0.7:
        out += rest  # keep what was pipelined after it
    if rng.random() < 0.1:
        ops.append("pipelined")
        out += other
    return out


CLOSE_CODES = [0, 1, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010,
               1011, 1012, 1013, 1014, 1015, 1016, 2999, 3000, 4999, 5000, 65535]


def mutate_frames(rng: random.Random, frames: list[Frame], other: list[Frame],
                  ops: list[str]) -> list[Frame]:
    frames = [f.copy() for f in frames] or [Frame(TEXT, b"{}")]
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.choice(("payload", "payload", "payload", "opcode", "rsv", "unmasked", "zero_mask",
                         "form", "lie", "fragment", "fragment", "control_mid", "cont_alone",
                         "nested", "big_control", "close", "bad_utf8", "drop", "dup",
                         "shuffle", "huge_len", "many_fragments", "splice", "ping"))
        ops.append("ws_" + op)
        if not frames:  # (a splice may leave none)
            frames = [Frame(TEXT, b"{}")]
        i = rng.randrange(len(frames))
        f = frames[i]
        if op == "payload":
            data = [k for k, fr in enumerate(frames) if fr.opcode in (TEXT, BINARY)]
            if data:
                g = frames[rng.choice(data)]
                g.payload = mutate_json(rng, g.payload, ops)
        elif op == "opcode":
            f.opcode = rng.randrange(16)
        elif op == "rsv":
            f.rsv = rng.randrange(1, 8)
        elif op == "unmasked":
            f.masked = False
        elif op == "zero_mask":
            f.key = rng.choice((b"\0\0\0\0", bytes(rng.randrange(256) for _ in range(4))))
        elif op == "form":
            f.form = rng.choice(("16", "64"))
        elif op == "lie":
            f.lie = rng.choice((-3, -1, 1, 5, 1000))
        elif op == "fragment" and f.opcode in (TEXT, BINARY) and len(f.payload) > 1:
            cuts = sorted(rng.sample(range(1, len(f.payload)), min(len(f.payload) - 1,
                                                                   rng.randrange(1, 5))))
            bounds = zip([0, *cuts], [*cuts, len(f.payload)], strict=True)
            pieces = [f.payload[a:b] for a, b in bounds]
            new = [Frame(f.opcode if k == 0 else CONT, p, fin=k == len(pieces) - 1)
                   for k, p in enumerate(pieces)]
            frames[i:i + 1] = new
        elif op == "control_mid":
            frames.insert(rng.randrange(len(frames) + 1), rng.choice((
                Frame(PING, b"p"), Frame(PONG, b"q"), Frame(CLOSE, close_payload(1000)),
                Frame(PING, b""))))
        elif op == "cont_alone":
            frames.insert(rng.randrange(len(frames) + 1),
                          Frame(CONT, b"{}", fin=rng.random() < 0.5))
        elif op == "nested":
            frames.insert(rng.randrange(len(frames) + 1), Frame(TEXT, b'{"events":', fin=False))
        elif op == "big_control":
            frames.insert(i, Frame(rng.choice((PING, PONG, CLOSE)), b"\x03\xe8" + b"x" * 130,
                                   fin=rng.random() < 0.5))
        elif op == "close":
            code = rng.choice(CLOSE_CODES)
            frames.insert(rng.randrange(len(frames) + 1), Frame(CLOSE, rng.choice((
                close_payload(code), close_payload(code, b"why"), code.to_bytes(2, "big")[:1],
                close_payload(1000, rng.choice(BAD_UTF8)), close_payload(1000, b"r" * 123)))))
        elif op == "bad_utf8" and f.opcode in (TEXT, CONT, CLOSE):
            p = rng.randrange(len(f.payload) + 1)
            f.payload = f.payload[:p] + rng.choice(BAD_UTF8) + f.payload[p:]
        elif op == "drop" and len(frames) > 1:
            del frames[i]
        elif op == "dup":
            frames.insert(i, f.copy())
        elif op == "shuffle":
            rng.shuffle(frames)
        elif op == "huge_len":
            frames.insert(rng.randrange(len(frames) + 1), Frame(
                rng.choice((TEXT, BINARY, CONT)), b"{}", lie=rng.choice((
                    1 << 20, (1 << 20) - 1, 2**63 - 3, 2**64 - 3, 70000))))
        elif op == "many_fragments":
            n = rng.choice((100, 255, 256, 257, 400))
            frames.insert(rng.randrange(len(frames) + 1), Frame(TEXT, b"[", fin=False))
            at = frames.index(next(fr for fr in frames if fr.payload == b"[" and not fr.fin))
            frames[at + 1:at + 1] = [Frame(CONT, b" ", fin=False) for _ in range(n)] + \
                [Frame(CONT, b"]")]
        elif op == "splice" and other:
            a, b = rng.randrange(len(frames) + 1), rng.randrange(len(other) + 1)
            frames = frames[:a] + [g.copy() for g in other[b:]]
        elif op == "ping":
            frames.insert(rng.randrange(len(frames) + 1), Frame(PING, bytes(
                rng.randrange(256) for _ in range(rng.randrange(126)))))
    return frames or [Frame(TEXT, b"{}")]


# ---------------------------------------------------------------- parsing answers

_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})")


class HttpAnswers:
    """Responses parsed from the bytes the server sent (heads and Content-Length bodies)."""

    def __init__(self, heads_asked: bool = False) -> None:
        self.heads_asked = heads_asked  # a HEAD request was sent: its answer has no body
        self.buf = b""
        self.statuses: list[int] = []
        self.complete = 0
        self.partial = False  # a head or body under way
        self.upgraded = False
        self.close_said = False
        self.bad: list[str] = []  # 5xx answers that are findings, and malformed answers
        self.heads: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if self.upgraded:
            return
        self.buf += data
        while self.buf:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                self.partial = True
                if len(self.buf) > 65536:
                    self.bad.append("response head over 64 KiB")
                    self.buf = b""
                return
            head = self.buf[:end]
            m = _STATUS.match(head)
            if m is None:
                self.bad.append(f"malformed response head: {head[:80]!r}")
                self.buf = b""
                self.partial = False
                return
            status = int(m.group(1))
            fields = {}
            for line in head.split(b"\r\n")[1:]:
                k, _, v = line.partition(b":")
                fields[k.strip().lower()] = v.strip()
            length = int(fields.get(b"content-length", b"0")) if status >= 200 else 0
            if self.heads_asked and _STATUS.match(self.buf, end + 4):
                length = 0  # the answer to a HEAD: the next answer follows the head
            elif self.heads_asked and length and len(self.buf) == end + 4:
                self.partial = True  # a HEAD's answer, or a body still to come
                return
            if status == 101:
                self.statuses.append(status)
                self.heads.append(head)
                self.complete += 1
                self.upgraded = True
                self.partial = False
                self.buf = b""
                return
            if len(self.buf) < end + 4 + length:
                self.partial = True
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.partial = False
            if status == 100:
                continue
            self.statuses.append(status)
            self.heads.append(head)
            self.complete += 1
            if fields.get(b"connection", b"").lower() == b"close":
                self.close_said = True
            self.bad.extend(judge_status(status, fields, body))

    def finish(self) -> None:
        """The connection ended: a head left without its body was a HEAD's answer."""
        end = self.buf.find(b"\r\n\r\n")
        if self.heads_asked and end >= 0 and len(self.buf) == end + 4:
            m = _STATUS.match(self.buf)
            if m:
                self.statuses.append(int(m.group(1)))
                self.complete += 1
                self.partial = False
                self.bad.extend(judge_status(int(m.group(1)), {}, b""))


def judge_status(status: int, fields: dict, body: bytes) -> list[str]:
    if status < 500:
        return []
    if status == 503 and b"retry-after" in fields:
        return []
    if status == 501 and b"not_implemented" in body:
        return []  # docs/api.md: a transfer coding other than chunked alone
    return [f"{status} answer: {body[:300]!r}"]


def expected_requests(data: bytes) -> int:
    return max(1, len(re.findall(rb"(?:^|\n)[A-Za-z]+ \S* HTTP/1\.[01]\r?\n", data)))


# ---------------------------------------------------------------- the exchange

class Outcome:
    __slots__ = ("kind", "ops", "data", "pieces", "events", "problem", "statuses", "received",
                 "ws_closes", "ws_messages", "ended")

    def __init__(self, kind: str, ops: list[str], data: bytes) -> None:
        self.kind, self.ops, self.data = kind, ops, data
        self.pieces: list[tuple[int, float]] = []  # (bytes, delay before) as sent
        self.events: list[str] = []
        self.problem: str | None = None  # a finding
        self.statuses: list[int] = []
        self.received = b""
        self.ws_closes: list[int] = []
        self.ws_messages: list[str] = []
        self.ended = ""  # how the connection ended: eof, reset, quiet, closed_by_us


def plan_pieces(rng: random.Random, n: int) -> list[tuple[int, float]]:
    """Cut `n` bytes into pieces with small delays: (size, delay before)."""
    if n == 0:
        return []
    if rng.random() < 0.5:
        return [(n, 0.0)]
    small = rng.random() < 0.5
    plan, left = [], n
    min_size = max(1, n // 200)
    delays = rng.random() < 0.3
    while left:
        size = max(min_size, rng.randrange(1, 17 if small else 4097))
        size = min(size, left)
        plan.append((size, rng.uniform(0, 0.02) if delays else 0.0))
        left -= size
    return plan


def abandoned(sock, data: bytes, rng, out, where: str) -> bool:
    """Now and then (ABORT_SHARE) be a client that gives up part-way: send a prefix of
    `data` and stop. True when it did."""
    if rng.random() >= ABORT_SHARE:
        return False
    send_pieces(sock, data, plan_pieces(rng, rng.randrange(len(data) + 1)), out)
    out.events.append(f"aborted by us {where}")
    out.ended = "aborted_by_us"
    return True


def send_pieces(sock: socket.socket, data: bytes, plan: list[tuple[int, float]],
                out: Outcome) -> bool:
    """Send as planned; False if the server closed or reset meanwhile."""
    p = 0
    for size, delay in plan:
        if delay:
            time.sleep(delay)
        try:
            sock.sendall(data[p:p + size])
        except (BrokenPipeError, ConnectionResetError):
            out.events.append(f"send failed at byte {p}: closed by server")
            return False
        except TimeoutError:
            out.events.append(f"send stalled at byte {p}")
            return False
        out.pieces.append((size, delay))
        p += size
    return True


def recv(sock: socket.socket, timeout: float) -> bytes | None:
    """Bytes, b"" at EOF (or reset), None if nothing came within `timeout`."""
    r, _, _ = select.select([sock], [], [], max(0.0, timeout))
    if not r:
        return None
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


class Fuzzer:
    def __init__(self, args, port: int, write_key: str, analytics_ids: list[str],
                 server_proc: subprocess.Popen | None, findings_dir: Path) -> None:
        self.args = args
        self.port = port
        self.write_key = write_key.encode()
        self.ids = [a.encode() for a in analytics_ids]
        self.proc = server_proc
        self.findings_dir = findings_dir
        self.lock = threading.Lock()
        self.inputs: Counter[str] = Counter()
        self.mutators: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.ws_closes: Counter[str] = Counter()
        self.ws_messages: Counter[str] = Counter()
        self.endings: Counter[str] = Counter()
        self.findings: Counter[str] = Counter()
        self.saved: list[str] = []
        self.finding_serial = 0
        self._sig: dict[str, int] = {}  # finding signature -> files saved
        self.responses = 0
        self.connections = 0
        self.stop = threading.Event()
        self.recent: deque = deque(maxlen=64)  # the last inputs sent, for a crash
        self.http, self.ws = self._load(Path(args.corpus))

    def _load(self, corpus: Path) -> tuple[list[bytes], list[list[Frame]]]:
        http_inputs, ws_inputs = [], []
        for path in sorted(corpus.rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            if path.suffix == ".frames":
                ws_inputs.append(parse_frames(data)[0])
            elif path.suffix == ".http":
                if self.write_key != WRITE_KEY.encode():
                    data = data.replace(WRITE_KEY.encode(), self.write_key)
                    data = data.replace(base64.b64encode(b"wk_fuzz:"),
                                        base64.b64encode(self.write_key + b":"))
                http_inputs.append(data)
        if not http_inputs or not ws_inputs:
            raise SystemExit(f"corpus {corpus} needs *.http and *.frames files "
                             "(bench/fuzz.py --write-corpus DIR writes them)")
        return http_inputs, ws_inputs

    # --- one connection
    def one(self, rng: random.Random) -> None:
        if rng.random() < 0.6:
            out = self._http(rng)
        else:
            out = self._ws(rng)
        with self.lock:
            self.connections += 1
            self.inputs[out.kind] += 1
            self.mutators.update(set(out.ops))
            self.endings[out.ended] += 1
            for s in out.statuses:
                self.statuses[str(s)] += 1
            self.responses += len(out.statuses) + len(out.ws_messages)
            for c in out.ws_closes:
                self.ws_closes[str(c)] += 1
            for m in out.ws_messages:
                self.ws_messages[m] += 1
        if out.problem is not None:
            self.finding(out.problem.split(":")[0], out)

    def _aid(self, data: bytes, rng: random.Random) -> bytes:
        return data.replace(PLACEHOLDER_AID, rng.choice(self.ids))

    def _http(self, rng: random.Random) -> Outcome:
        ops: list[str] = []
        seed = rng.choice(self.http)
        if rng.random() < 0.1:
            kind, data = "http_seed", seed
        else:
            data = mutate_http(rng, seed, rng.choice(self.http), ops)
            kind = "http_splice" if "splice" in ops else \
                "http_head+body" if any(o.startswith("head_") for o in ops) and \
                any(o.startswith(("json_", "bytes_")) for o in ops if o != "bytes_flip") else \
                "http_head" if any(o.startswith("head_") for o in ops) else "http_body"
        data = self._aid(data, rng)
        out = Outcome(kind, ops, data)
        linger = rng.random() < LINGER_CHECK
        patient = kind == "http_seed"  # well-formed: wait for every answer, not a quiet spell
        half_close = rng.random() < 0.05
        with self._connect(out, rng) as sock:
            if sock is None:
                return out
            self.recent.append(data)
            answers = HttpAnswers(heads_asked=re.search(rb"(?:^|\n)HEAD ", data) is not None)
            if abandoned(sock, data, rng, out, "mid-request"):
                return out
            sent = send_pieces(sock, data, plan_pieces(rng, len(data)), out)
            if sent and half_close:
                out.events.append("half-closed after sending")
                sock.shutdown(socket.SHUT_WR)
            expect = expected_requests(data)
            most = max(expect, len(data) // 16) + 10  # a request takes 16 bytes or more
            deadline = time.monotonic() + self.args.hang_timeout
            while True:
                now = time.monotonic()
                settled = answers.complete and not answers.partial and not linger
                if now >= deadline:
                    if settled and not patient:
                        out.ended = "quiet"
                    else:
                        what = "keep-alive connection not closed" if answers.complete and \
                            not answers.partial else "partial answer" if answers.partial \
                            else "no answer"
                        out.problem = (f"hang: {what} within {self.args.hang_timeout:g}s "
                                       f"of the last byte sent")
                        out.ended = "hang"
                    break
                wait = deadline - now
                if settled and not patient:
                    wait = min(wait, QUIET_S)
                got = recv(sock, wait)
                if got is None:
                    if settled and not patient:
                        out.ended = "quiet"
                        break
                    continue
                if not got:
                    out.ended = "eof"
                    break
                out.received += got
                answers.feed(got)
                if answers.upgraded:
                    out.ended = "upgraded"
                    break
                if answers.complete > most:  # more answers than the bytes can hold requests
                    out.problem = (f"endless answers: {answers.complete} answers to an input "
                                   f"of {len(data)} bytes (at most {most} requests), "
                                   f"statuses {dict(Counter(answers.statuses).most_common(5))}")
                    out.ended = "endless"
                    break
                if answers.complete >= expect and not answers.partial and not linger \
                        and not answers.close_said:
                    out.ended = "answered"
                    break
            answers.finish()
            out.statuses = answers.statuses
            if patient and out.ended == "eof" and not half_close and \
                    answers.complete < expect and not answers.close_said and \
                    out.problem is None:  # a seed is well-formed: each request is answered
                out.problem = (f"unanswered requests: {answers.complete} answers to "
                               f"{expect} pipelined requests, then the server closed")
            if answers.bad and out.problem is None:
                out.problem = "5xx: " + "; ".join(answers.bad[:3]) \
                    if any(b[:1] == "5" for b in answers.bad) else "bad answer: " + answers.bad[0]
        return out

    def _connect(self, out: Outcome, rng: random.Random):
        """A connection; closed at the end with a FIN, or (RST_SHARE) a reset."""
        fuzzer = self
        reset = rng.random() < RST_SHARE

        class _C:
            def __enter__(self_inner):
                try:
                    self_inner.sock = socket.create_connection((HOST, fuzzer.port), timeout=10)
                    self_inner.sock.settimeout(10)
                except OSError as exc:
                    out.ended = "connect_failed"
                    out.events.append(f"connect failed: {exc}")
                    self_inner.sock = None
                return self_inner.sock

            def __exit__(self_inner, *exc):
                if self_inner.sock is not None:
                    if reset:
                        out.events.append("closed by us with a reset (SO_LINGER 0)")
                        try:
                            self_inner.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                       b"\1\0\0\0\0\0\0\0")
                        except OSError:
                            pass
                    self_inner.sock.close()
                return False

        return _C()

    def _ws(self, rng: random.Random) -> Outcome:
        ops: list[str] = []
        frames = rng.choice(self.ws)
        if rng.random() < 0.1:
            kind = "ws_seed"
        else:
            frames = mutate_frames(rng, frames, rng.choice(self.ws), ops)
            kind = "ws_splice" if "ws_splice" in ops else \
                "ws_payload" if all(o == "ws_payload" or o.startswith(("json_", "bytes_"))
                                    for o in ops) else "ws_frames"
        data = b"".join(f.encode() for f in frames)
        key = base64.b64encode(rng.randbytes(16))
        aid = rng.choice(self.ids)
        hs = (b"GET /analytics?analytics_id=%s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
              b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
              b"Sec-WebSocket-Version: 13\r\nUser-Agent: fuzz\r\n\r\n" % (aid, key))
        out = Outcome(kind, ops, hs + data)
        with self._connect(out, rng) as sock:
            if sock is None:
                return out
            self.recent.append(hs + data)
            sock.sendall(hs)
            head = b""
            deadline = time.monotonic() + self.args.hang_timeout
            while b"\r\n\r\n" not in head:
                got = recv(sock, deadline - time.monotonic())
                if got is None:
                    out.problem = "hang: no answer to a valid WebSocket handshake"
                    out.ended = "hang"
                    return out
                if not got:
                    out.problem = "ws handshake: connection closed without an answer"
                    out.ended = "eof"
                    return out
                head += got
            end = head.find(b"\r\n\r\n")
            m = _STATUS.match(head)
            status = int(m.group(1)) if m else 0
            out.statuses = [status]
            if status != 101:
                fields = {ln.partition(b":")[0].strip().lower(): ln.partition(b":")[2].strip()
                          for ln in head[:end].split(b"\r\n")[1:]}
                bad = judge_status(status, fields, head[end + 4:])
                if bad:
                    out.problem = "5xx: " + bad[0]
                elif status != 503:
                    out.problem = f"ws handshake refused: {head[:200]!r}"
                out.ended = "refused"
                return out
            expect = accept_key(key)
            if expect not in head[:end]:
                out.problem = f"ws handshake: wrong Sec-WebSocket-Accept: {head[:end]!r}"
            rest = head[end + 4:]
            if abandoned(sock, data, rng, out, "mid-stream"):
                return out
            sent = send_pieces(sock, data, plan_pieces(rng, len(data)), out)
            self._ws_finish(sock, rest, out, sent)
        return out

    def _ws_finish(self, sock: socket.socket, buf: bytes, out: Outcome, sent: bool) -> None:
        """Read the server's frames until it closes; once it is quiet, send a Close, which
        it must answer (or close) within the hang timeout."""
        we_closed = False
        deadline = time.monotonic() + self.args.hang_timeout
        got_close = False
        while True:
            frames, buf = parse_frames(buf, masked=False)
            for f in frames:
                if f.opcode == CLOSE:
                    code = int.from_bytes(f.payload[:2], "big") if len(f.payload) >= 2 else 1005
                    out.ws_closes.append(code)
                    got_close = True
                    if code == 1011 and f.payload[2:]:  # (without a reason: our 1011 echoed)
                        out.problem = f"ws close 1011: {f.payload[2:]!r}"
                elif f.opcode == TEXT:
                    try:
                        msg = json.loads(f.payload)
                        label = msg.get("type", "?")
                        if label == "error":
                            label += ":" + str(msg.get("code"))
                            if msg.get("code") == "unavailable":
                                out.problem = f"ws error unavailable: {f.payload[:200]!r}"
                    except ValueError:
                        label = "non-json"
                        out.problem = f"ws bad message: {f.payload[:200]!r}"
                    out.ws_messages.append(label)
                elif f.opcode == PING:
                    out.ws_messages.append("ping")
                elif f.opcode == PONG:
                    out.ws_messages.append("pong")
                else:
                    out.ws_messages.append(f"opcode {f.opcode}")
            if got_close and not we_closed:
                try:  # the closing handshake: echo, then the server closes the socket
                    sock.sendall(Frame(CLOSE, b"").encode())
                except OSError:
                    pass
                we_closed = True
                deadline = min(deadline, time.monotonic() + self.args.hang_timeout)
            now = time.monotonic()
            if now >= deadline:
                out.problem = out.problem or (
                    f"hang: WebSocket not closed within {self.args.hang_timeout:g}s " +
                    ("of our Close" if we_closed else "of the last byte sent"))
                out.ended = "hang"
                return
            got = recv(sock, min(deadline - now, QUIET_S) if not we_closed else deadline - now)
            if got is None:
                if not we_closed:  # quiet: close it ourselves; the server must answer
                    try:
                        sock.sendall(Frame(CLOSE, close_payload(1000)).encode())
                    except OSError:
                        out.ended = "eof"
                        return
                    we_closed = True
                    deadline = time.monotonic() + self.args.hang_timeout
                continue
            if not got:
                out.ended = "eof" if not we_closed or got_close else "eof_after_our_close"
                return
            out.received += got
            buf += got

    # --- findings
    def finding(self, what: str, out: Outcome | None, extra: dict | None = None,
                data: bytes | None = None) -> None:
        signature = what if out is None else f"{what}|{(out.problem or '')[:60]}"
        with self.lock:
            self.findings[what] += 1
            if self.findings_saved(signature) >= SAVED_PER_SIGNATURE:
                return
            self.finding_serial += 1
            n = self.finding_serial
            self._sig[signature] = self._sig.get(signature, 0) + 1
        slug = re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-")[:40]
        base = self.findings_dir / f"{n:04d}-{slug}"
        record = {"finding": what, **(extra or {})}
        if out is not None:
            record.update({
                "problem": out.problem, "kind": out.kind, "mutators": out.ops,
                "sent_pieces": [[s, round(d, 4)] for s, d in out.pieces],
                "events": out.events, "statuses": out.statuses[:50],
                "status_counts": dict(Counter(out.statuses)),
                "ws_closes": out.ws_closes, "ws_messages": out.ws_messages[:50],
                "ended": out.ended, "received_head": out.received[:2000].decode("latin-1"),
                "port": self.port,
            })
            data = out.data
        base.with_suffix(".bin").write_bytes(data or b"")
        base.with_suffix(".json").write_text(json.dumps(record, indent=2))
        with self.lock:
            self.saved.append(str(base))

    def findings_saved(self, signature: str) -> int:
        return self._sig.get(signature, 0)

    def worker(self, n: int) -> None:
        rng = random.Random(f"{self.args.seed}-{n}")
        while not self.stop.is_set():
            try:
                self.one(rng)
            except Exception as exc:  # a harness bug: count it, keep going
                with self.lock:
                    self.findings["harness_error"] += 1
                    if self.findings["harness_error"] <= 3:
                        import traceback
                        traceback.print_exc()
                        print(f"harness error: {exc!r}", file=sys.stderr)


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())


# ---------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def vmrss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 15) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request(method, path, body, headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def start_server(data: Path, log_path: Path, config_path: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    argv = [sys.executable, "-m", "triolytics", "serve", "--config", str(config_path),
            "--host", HOST, "--port", str(port), "--data", str(data / "data"),
            "--write-key", WRITE_KEY]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOLYTICS_")}
    env["PYTHONUNBUFFERED"] = "1"
    log = open(log_path, "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    start = time.monotonic()
    while time.monotonic() - start < START_TIMEOUT_S:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n"
                             + log_path.read_text(errors="replace"))
        try:
            if request(port, "GET", "/healthz", timeout=1)[0] == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("server did not become healthy:\n" + log_path.read_text(errors="replace"))


def write_config(path: Path) -> None:
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in SERVER_CONFIG.items()))


_RECORD = re.compile(rb"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ", re.M)


def scan_log(path: Path, offset: int, final: bool = False) -> tuple[list[tuple[str, str]], int]:
    """The log records after `offset` that signal a bug, as (signature, text), and the
    offset to go on from. A record is a timestamped line and the lines under it (a
    traceback); it signals a bug when it is ERROR or CRITICAL, or holds a Traceback.
    The signature is its first line without the time, plus the traceback's last line.
    The last record is left for the next scan (its traceback may be incomplete)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    starts = [m.start() for m in _RECORD.finditer(data)]
    if not data:
        return [], offset
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    if not final:
        if len(starts) < 2:
            return [], offset
        cut = starts[-1]
        starts = starts[:-1]
    else:
        cut = len(data)
    found = []
    for a, b in zip(starts, starts[1:] + [cut], strict=True):
        record = data[a:b].decode("utf-8", "replace").rstrip("\n")
        first = record.split("\n", 1)[0]
        m = _RECORD.match(data, a)
        level = m.group(1).decode() if m else ""
        if level in ("ERROR", "CRITICAL") or "Traceback" in record:
            last = record.rsplit("\n", 1)[-1] if "\n" in record else ""
            signature = (first[m.end() - a:] if m else first)[:120]
            if last:
                signature += " | " + last[:120]
            found.append((signature, record))
    return found, offset + cut


# ---------------------------------------------------------------- main

def run(args) -> dict:
    started_wall = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="triolytics-fuzz-"))
    findings_dir = Path(args.findings) if args.findings else tmp / "findings"
    findings_dir.mkdir(parents=True, exist_ok=True)
    log_path = findings_dir / "server.log"
    proc, pid = None, args.pid
    if args.url:
        u = urlsplit(args.url)
        if u.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise SystemExit("--url must be on this machine (127.0.0.1)")
        port = u.port or 80
        write_key = args.write_key or WRITE_KEY
    else:
        config_path = tmp / "fuzz.toml"
        write_config(config_path)
        proc, port = start_server(tmp, log_path, config_path)
        pid = proc.pid
        write_key = WRITE_KEY
    print(f"fuzzing 127.0.0.1:{port} for {args.duration:g}s, seed {args.seed}, "
          f"findings in {findings_dir}", file=sys.stderr)
    ids = []
    for _ in range(4):
        status, body = request(port, "POST", "/create")
        if status == 200:
            ids.append(json.loads(body)["analytics_id"])
    if not ids:
        raise SystemExit("POST /create gave no analytics_id")
    fz = Fuzzer(args, port, write_key, ids, proc, findings_dir)
    rss: list[float] = []
    log_offset = 0
    crashed = None
    threads = [threading.Thread(target=fz.worker, args=(n,), daemon=True)
               for n in range(args.concurrency)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    next_report = t0 + 30
    while time.monotonic() - t0 < args.duration:
        time.sleep(1.0)
        if pid:
            r = vmrss_mb(pid)
            if r is not None:
                rss.append(r)
                if r > args.max_rss_mb and fz.findings["rss"] == 0:
                    fz.finding("rss", None, {"rss_mb": r, "limit_mb": args.max_rss_mb})
        if proc is not None and proc.poll() is not None:
            crashed = proc.returncode
            fz.finding("crash", None, {"exit_code": crashed,
                                       "last_inputs": len(fz.recent)},
                       b"\n----- next input -----\n".join(fz.recent))
            break
        if not args.url:
            records, log_offset = scan_log(log_path, log_offset)
            for signature, record in records:  # (with the inputs sent just before it)
                fz.finding("server_log: " + signature, None,
                           {"record": record[:20000], "bin": "the last inputs sent before "
                            "the record was seen, each after a separator line"},
                           b"".join(b"\n----- input -----\n" + d for d in list(fz.recent)[-16:]))
        if time.monotonic() >= next_report:
            next_report += 30
            with fz.lock:
                print(f"[{time.monotonic() - t0:6.0f}s] connections {fz.connections} "
                      f"findings {sum(fz.findings.values())} rss {rss[-1] if rss else 0:.0f} MB",
                      file=sys.stderr)
    fz.stop.set()
    for t in threads:
        t.join(timeout=args.hang_timeout * 3 + 30)
    elapsed = time.monotonic() - t0
    final: dict = {}
    if crashed is None:
        try:
            final["healthz"] = request(port, "GET", "/healthz")[0]
        except OSError as exc:
            final["healthz"] = repr(exc)
        event = json.dumps({"type": "track", "event": "Fuzz Done", "anonymousId": "fuzz",
                            "properties": {"seed": args.seed}}).encode()
        try:
            final["capture"] = request(port, "POST", "/v1/capture", event,
                                       {"Content-Type": "application/json",
                                        "x-write-key": write_key})[0]
        except OSError as exc:
            final["capture"] = repr(exc)
        if final["healthz"] != 200:
            fz.finding("final_healthz", None, {"got": final["healthz"]})
        if final["capture"] != 201:
            fz.finding("final_capture", None, {"got": final["capture"]})
    if pid:
        r = vmrss_mb(pid)
        if r is not None:
            rss.append(r)
    if proc is not None and crashed is None:
        proc.send_signal(signal.SIGTERM)
        try:
            final["exit_code"] = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            final["exit_code"] = f"did not exit within {STOP_TIMEOUT_S:g}s of SIGTERM"
        if final["exit_code"] != 0:
            fz.finding("exit_code", None, {"got": final["exit_code"]})
        records, log_offset = scan_log(log_path, log_offset, final=True)
        for signature, record in records:
            fz.finding("server_log: " + signature, None, {"record": record[:20000]},
                       record.encode())
    elif crashed is not None:
        final["exit_code"] = crashed
    warnings = 0
    if log_path.exists():
        warnings = sum(1 for ln in log_path.read_bytes().split(b"\n") if b" WARNING " in ln)
    total_findings = sum(fz.findings.values())
    return {
        "seed": args.seed,
        "duration_s": round(elapsed, 1),
        "target": args.url or f"triolytics serve on 127.0.0.1:{port} (started by the harness)",
        "server_config": None if args.url else SERVER_CONFIG,
        "concurrency": args.concurrency,
        "hang_timeout_s": args.hang_timeout,
        "connections": fz.connections,
        "connections_per_s": round(fz.connections / elapsed, 1) if elapsed else 0,
        "requests_per_s": round(fz.responses / elapsed, 1) if elapsed else 0,
        "inputs": {"total": sum(fz.inputs.values()), "by_kind": dict(fz.inputs.most_common())},
        "mutators": dict(fz.mutators.most_common()),
        "answers": {
            "http_status": dict(sorted(fz.statuses.items())),
            "ws_close_codes": dict(sorted(fz.ws_closes.items())),
            "ws_messages": dict(fz.ws_messages.most_common()),
            "connection_endings": dict(fz.endings.most_common()),
        },
        "findings": {"total": total_findings, "by_kind": dict(fz.findings),
                     "saved": fz.saved[:50], "dir": str(findings_dir)},
        "rss_mb": {"max": round(max(rss), 1) if rss else None,
                   "final": round(rss[-1], 1) if rss else None,
                   "first": round(rss[0], 1) if rss else None,
                   "limit": args.max_rss_mb},
        "final_checks": final,
        "server_log": None if args.url else str(log_path),
        "server_log_warnings": warnings,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started_wall)),
        "ok": total_findings == 0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=180.0, help="seconds of fuzzing")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=8, help="connections at once")
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--findings", help="directory for findings (default: a temp dir)")
    p.add_argument("--max-rss-mb", type=float, default=600.0)
    p.add_argument("--url", help="fuzz this running server instead (http://127.0.0.1:PORT)")
    p.add_argument("--write-key", help="with --url: a write key of that server")
    p.add_argument("--pid", type=int, help="with --url: the server's pid, to sample its RSS")
    p.add_argument("--hang-timeout", type=float, default=None,
                   help="seconds a connection may stay unanswered and open after our last "
                   f"byte (default {HANG_TIMEOUT_OWN_S:g}; with --url {HANG_TIMEOUT_URL_S:g})")
    p.add_argument("--write-corpus", metavar="DIR", help="write the seed corpus and exit")
    args = p.parse_args(argv)
    if args.write_corpus:
        root = Path(args.write_corpus)
        for name, data in seed_corpus().items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        return 0
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    if args.hang_timeout is None:
        args.hang_timeout = HANG_TIMEOUT_URL_S if args.url else HANG_TIMEOUT_OWN_S
    summary = run(args)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
