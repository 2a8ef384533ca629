"""HTTP request/response values and the pure helpers around them (no I/O).

Rules:
- `Request` is what a route handler sees: method, path, query, lower-cased header dict,
  the whole body, and the client address (already resolved through trusted proxies).
- `Response` is what it returns. CORS headers are added in one place (`Cors`).
- Routes are a table: path -> {method: handler}; 404 and 405 (with Allow) come from it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable
from email.utils import formatdate
from time import time

import msgspec

from triolytics.core.errors import ApiError

JSON = b"application/json"


class Request(msgspec.Struct):
    method: bytes
    path: bytes
    query: bytes
    headers: dict[bytes, bytes]
    body: bytes
    client_ip: str


class Response(msgspec.Struct):
    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = []
    content_type: bytes = JSON
    # A body of unknown length instead (server-sent events): sent chunk by chunk as it
    # yields them, then the connection closes.
    stream: AsyncIterator[bytes] | None = None


Handler = Callable[[Request], Awaitable[Response]]
Routes = dict[bytes, dict[bytes, Handler]]


def error_response(exc: ApiError) -> Response:
    return Response(exc.status, exc.as_body(), list(exc.headers))


def allowed_methods(methods) -> bytes:
    """The `Allow` (and preflight) value for a path's methods; OPTIONS always works."""
    return b", ".join(sorted({*methods, b"OPTIONS"}))


def route(routes: Routes, method: bytes, path: bytes) -> Handler:
    methods = routes.get(path)
    if methods is None:
        raise ApiError("not_found", f"no such endpoint: {path.decode('latin-1')}")
    handler = methods.get(method)
    if handler is None:
        allow = allowed_methods(methods)
        raise ApiError("method_not_allowed",
                       f"{method.decode('latin-1')} not allowed here; allowed: {allow.decode()}",
                       headers=((b"allow", allow),))
    return handler


class Cors:
    """Cross-origin rules: which Origins may call us, and the headers that say so."""

    ALLOW_HEADERS = b"content-type, content-encoding, x-write-key, authorization"

    def __init__(self, origins: list[str]) -> None:
        self.any = "*" in origins
        self.origins = frozenset(o.rstrip("/").encode() for o in origins if o != "*")

    def allowed(self, origin: bytes | None) -> bool:
        return origin is None or self.any or origin.rstrip(b"/") in self.origins

    def headers(self, origin: bytes | None) -> list[tuple[bytes, bytes]]:
        if origin is None or not self.allowed(origin):
            return []
        return [(b"access-control-allow-origin", origin), (b"vary", b"Origin"),
                (b"access-control-expose-headers", b"retry-after")]  # (for the SDK)

    def preflight(self, req: Request, methods: list[bytes]) -> Response:
        origin = req.headers.get(b"origin")
        if not self.allowed(origin):
            raise ApiError("forbidden_origin", "origin not allowed")
        asked = req.headers.get(b"access-control-request-headers")
        headers = [  # the origin headers are added to every response by the server
            (b"access-control-allow-methods", allowed_methods(methods)),
            (b"access-control-allow-headers", asked or self.ALLOW_HEADERS),
            (b"access-control-max-age", b"86400"),
        ]
        return Response(204, b"", headers, content_type=b"")


def client_ip(peer: str, forwarded_for: bytes | None, trusted: list) -> str:
    """The client address: the peer, or, when the peer is a trusted proxy, the right-most
    address in X-Forwarded-For that is not itself a trusted proxy."""
    if not trusted or not forwarded_for or not in_networks(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        if not in_networks(hop, trusted):
            return hop
    return hops[0] if hops else peer


def parse_networks(items: list[str]) -> list:
    return [ipaddress.ip_network(item, strict=False) for item in items]


def in_networks(address: str, networks: list) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


class DateHeader:
    """The `Date` header value, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value
