"""Privacy controls, sans I/O: IP truncation (`ip_mode`) and the do-not-track headers."""

from __future__ import annotations

import msgspec
import pytest

from triolytics.core.capture import RequestMeta, enricher_for
from triolytics.core.config import ConfigError, load_config
from triolytics.core.privacy import anonymize_ip, do_not_track


@pytest.mark.parametrize(("ip", "truncated"), [
    ("203.0.113.77", "203.0.113.0"),
    ("10.1.2.3", "10.1.2.0"),
    ("2001:db8:abcd:1234:5678::1", "2001:db8:abcd::"),
    ("2001:DB8:ABCD:FFFF::", "2001:db8:abcd::"),
    ("::ffff:198.51.100.9", "198.51.100.0"),  # v4-mapped: truncated as the IPv4 it is
    ("fe80::1%eth0", "fe80::"),  # a scope id is dropped with the host part
    ("::1", "::"),
])
def test_truncate_keeps_the_network_part(ip, truncated):
    assert anonymize_ip(ip, "truncate") == truncated


@pytest.mark.parametrize("garbage", ["", "not-an-ip", "300.1.1.1", "1.2.3", "unix:/x", "::g"])
def test_truncate_drops_what_is_not_an_address(garbage):
    assert anonymize_ip(garbage, "truncate") is None


@pytest.mark.parametrize("ip", ["203.0.113.77", "2001:db8::1", "junk"])
def test_full_keeps_and_drop_drops(ip):
    assert anonymize_ip(ip, "full") == ip
    assert anonymize_ip(ip, "drop") is None


def test_ip_mode_setting():
    assert load_config().ip_mode == "full"  # today's behaviour unless asked
    assert load_config(environ={"TRIOLYTICS_IP_MODE": "truncate"}).ip_mode == "truncate"
    with pytest.raises(ConfigError):
        load_config(overrides={"ip_mode": "hash"})
    assert load_config().respect_dnt is False
    assert load_config(environ={"TRIOLYTICS_RESPECT_DNT": "true"}).respect_dnt is True


def _context(meta: RequestMeta, raw: bytes | None, batch: bytes | None = None) -> dict:
    enrich = enricher_for(meta, msgspec.Raw(batch) if batch else msgspec.Raw())
    return msgspec.json.decode(enrich(msgspec.Raw(raw) if raw else msgspec.Raw(), "$.context"))


def test_enricher_without_an_ip_adds_none():
    meta = RequestMeta(0, None, "ua")
    assert _context(meta, None) == {"userAgent": "ua"}
    assert _context(meta, b'{"a":1}') == {"userAgent": "ua", "a": 1}
    assert _context(meta, None, b'{"b":2}') == {"userAgent": "ua", "b": 2}


@pytest.mark.parametrize(("mode", "expected"), [
    ("full", "198.51.100.9"), ("truncate", "198.51.100.0"), ("drop", None)])
def test_an_ip_the_client_put_in_its_context_follows_ip_mode(mode, expected):
    meta = RequestMeta(0, anonymize_ip("203.0.113.77", mode), None, ip_mode=mode)
    got = _context(meta, b'{"ip":"198.51.100.9","x":1}')
    assert got.get("ip") == expected and got["x"] == 1
    got = _context(meta, None, b'{"ip":"198.51.100.9"}')  # a batch's context too
    assert got.get("ip") == expected


@pytest.mark.parametrize(("headers", "expected"), [
    ({}, False),
    ({b"dnt": b"1"}, True),
    ({b"sec-gpc": b"1"}, True),
    ({b"dnt": b" 1 "}, True),
    ({b"dnt": b"0"}, False),
    ({b"sec-gpc": b"0", b"dnt": b"null"}, False),
])
def test_do_not_track(headers, expected):
    assert do_not_track(headers) is expected


def test_ip_mode_flag():
    from triolytics import cli
    args = cli._parser().parse_args(["serve", "--ip-mode", "truncate"])
    assert cli.config_of(args, {}).ip_mode == "truncate"
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["serve", "--ip-mode", "hash"])


def test_forget_person_drops_live_sessions_so_no_session_end_follows():
    from triolytics.core.sessions import Sessions
    sessions = Sessions(1_000_000, iter(map(str, range(100))).__next__)
    rows = []
    sessions.touch(("default", "http", "a1"), "a1", "u1", 0, rows)
    sessions.touch(("other", "http", "a1"), "a1", "u1", 0, rows)
    sessions.touch(("default", "ws", "0.x"), "0.x", None, 0, rows)
    assert sessions.forget_person("user", "u1", "other") == 1
    assert sessions.forget_person("analytics_id", "0.x", None) == 1
    assert sessions.forget_person("anonymous_id", "nobody", None) == 0
    ended = sessions.expire(10_000_000, 100)
    assert [(r.project, r.anonymous_id) for r in ended] == [("default", "a1")]
