"""web.py: the route table (404/405 + Allow), CORS, and the client address behind proxies."""

from __future__ import annotations

import json

import pytest

from triolytics.core.errors import ApiError
from triolytics.core.web import Cors, Request, client_ip, error_response, parse_networks, route


async def _get(req):  # pragma: no cover - never awaited here
    raise AssertionError


async def _post(req):  # pragma: no cover
    raise AssertionError


ROUTES = {b"/v1/capture": {b"POST": _post}, b"/healthz": {b"GET": _get, b"HEAD": _get}}


# --- routing ---------------------------------------------------------------------------

def test_route_finds_handler():
    assert route(ROUTES, b"POST", b"/v1/capture") is _post
    assert route(ROUTES, b"HEAD", b"/healthz") is _get


def test_unknown_path_is_404():
    with pytest.raises(ApiError) as info:
        route(ROUTES, b"POST", b"/v1/nope")
    assert (info.value.code, info.value.status) == ("not_found", 404)


def test_wrong_method_is_405_with_allow():
    with pytest.raises(ApiError) as info:
        route(ROUTES, b"GET", b"/v1/capture")
    err = info.value
    assert (err.code, err.status) == ("method_not_allowed", 405)
    assert dict(err.headers)[b"allow"] == b"OPTIONS, POST"
    with pytest.raises(ApiError) as info:
        route(ROUTES, b"DELETE", b"/healthz")
    assert dict(info.value.headers)[b"allow"] == b"GET, HEAD, OPTIONS"


def test_error_response_carries_status_headers_body():
    with pytest.raises(ApiError) as info:
        route(ROUTES, b"PUT", b"/v1/capture")
    resp = error_response(info.value)
    assert resp.status == 405
    assert (b"allow", b"OPTIONS, POST") in resp.headers
    assert json.loads(resp.body)["error"]["code"] == "method_not_allowed"


# --- CORS ------------------------------------------------------------------------------

A = b"https://app.example.com"


def req(headers: dict) -> Request:
    return Request(b"OPTIONS", b"/v1/capture", b"", headers, b"", "127.0.0.1")


def test_cors_any_origin_echoes_it():
    cors = Cors(["*"])
    assert cors.allowed(b"https://anything.test")
    assert cors.headers(b"https://anything.test") == \
        [(b"access-control-allow-origin", b"https://anything.test"), (b"vary", b"Origin"),
         (b"access-control-expose-headers", b"retry-after")]


def test_cors_allowlist():
    cors = Cors(["https://app.example.com/", "http://localhost:8080"])
    assert cors.allowed(A)
    assert cors.allowed(A + b"/")
    assert cors.allowed(b"http://localhost:8080")
    assert not cors.allowed(b"https://evil.example.com")
    assert not cors.allowed(b"http://app.example.com")  # scheme matters
    assert cors.headers(A)[:2] == [(b"access-control-allow-origin", A), (b"vary", b"Origin")]
    assert cors.headers(b"https://evil.example.com") == []


def test_cors_no_origin():
    cors = Cors(["https://app.example.com"])
    assert cors.allowed(None)  # not a browser cross-origin request
    assert cors.headers(None) == []


def test_preflight_allowed():
    cors = Cors(["https://app.example.com"])
    resp = cors.preflight(req({b"origin": A}), [b"POST"])
    assert resp.status == 204
    h = dict(resp.headers)
    assert h[b"access-control-allow-methods"] == b"OPTIONS, POST"
    allowed = {x.strip() for x in h[b"access-control-allow-headers"].split(b",")}
    assert {b"content-type", b"x-write-key", b"content-encoding", b"authorization"} <= allowed
    assert int(h[b"access-control-max-age"]) > 0


def test_preflight_echoes_requested_headers():
    cors = Cors(["*"])
    asked = b"content-type, x-write-key"
    resp = cors.preflight(req({b"origin": A, b"access-control-request-headers": asked}),
                          [b"POST"])
    assert dict(resp.headers)[b"access-control-allow-headers"] == asked


def test_preflight_forbidden_origin():
    cors = Cors(["https://app.example.com"])
    with pytest.raises(ApiError) as info:
        cors.preflight(req({b"origin": b"https://evil.example.com"}), [b"POST"])
    assert (info.value.code, info.value.status) == ("forbidden_origin", 403)


# --- client address --------------------------------------------------------------------

PROXIES = parse_networks(["10.0.0.0/8", "192.168.1.1", "fd00::/8"])


def test_no_trusted_proxies_means_peer():
    assert client_ip("10.1.2.3", b"1.2.3.4", []) == "10.1.2.3"


def test_untrusted_peer_ignores_forwarded_for():
    assert client_ip("203.0.113.9", b"1.2.3.4", PROXIES) == "203.0.113.9"


def test_trusted_peer_without_header():
    assert client_ip("10.1.2.3", None, PROXIES) == "10.1.2.3"


def test_trusted_peer_uses_forwarded_for():
    assert client_ip("10.1.2.3", b"198.51.100.7", PROXIES) == "198.51.100.7"
    assert client_ip("192.168.1.1", b"198.51.100.7", PROXIES) == "198.51.100.7"
    assert client_ip("fd12::1", b"2001:db8::5", PROXIES) == "2001:db8::5"


def test_right_most_untrusted_hop_chosen():
    # The client forged the left-most entry; our proxies appended the rest.
    xff = b"6.6.6.6, 198.51.100.7, 10.9.9.9, 192.168.1.1"
    assert client_ip("10.0.0.2", xff, PROXIES) == "198.51.100.7"
    assert client_ip("10.0.0.2", b"6.6.6.6,198.51.100.7", PROXIES) == "198.51.100.7"


def test_not_in_cidr_is_untrusted():
    assert client_ip("11.0.0.1", b"1.2.3.4", PROXIES) == "11.0.0.1"
    assert client_ip("192.168.1.2", b"1.2.3.4", PROXIES) == "192.168.1.2"
