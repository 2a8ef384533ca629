"""config.py: defaults < TOML < environment < overrides; unknown keys and bad values refused."""

from __future__ import annotations

import pytest

from triolytics.core.config import Config, ConfigError, load_config


def test_defaults():
    c = load_config()
    assert (c.host, c.port, c.fsync, c.max_event_bytes, c.max_batch_events) == \
        ("127.0.0.1", 3000, "always", 32 * 1024, 2500)
    assert c.cors_origins == ["*"]
    assert c.write_keys == [] and c.trusted_proxies == []


def test_layers_later_wins():
    toml = 'port = 4000\nhost = "0.0.0.0"\nfsync = "interval"\nmax_batch_events = 10\n'
    env = {"TRIOLYTICS_PORT": "5000", "TRIOLYTICS_FSYNC": "off"}
    c = load_config(toml, env, {"port": 6000})
    assert c.port == 6000  # override beats env beats file
    assert c.fsync == "off"  # env beats file
    assert c.host == "0.0.0.0"  # file beats default
    assert c.max_batch_events == 10
    assert c.max_event_bytes == 32 * 1024  # default where no layer says otherwise


def test_env_beats_file_and_none_override_is_ignored():
    c = load_config("port = 4000\n", {"TRIOLYTICS_PORT": "5000"}, {"port": None, "host": None})
    assert (c.port, c.host) == (5000, "127.0.0.1")


def test_env_values_converted():
    c = load_config(environ={"TRIOLYTICS_REQUEST_TIMEOUT_S": "2.5",
                             "TRIOLYTICS_MAX_EVENT_BYTES": "1024",
                             "TRIOLYTICS_DATA_DIR": "/var/lib/x"})
    assert (c.request_timeout_s, c.max_event_bytes, c.data_dir) == (2.5, 1024, "/var/lib/x")


def test_log_level_any_case_and_checked():
    assert load_config(environ={"TRIOLYTICS_LOG_LEVEL": "WARNING"}).log_level == "warning"
    with pytest.raises(ConfigError, match="log_level must be one of"):
        load_config('log_level = "loud"\n')


def test_session_timeout_may_be_fractional():
    assert load_config(environ={"TRIOLYTICS_SESSION_TIMEOUT_S": "1.5"}).session_timeout_s == 1.5
    assert load_config("session_timeout_s = 60\n").session_timeout_s == 60.0


def test_other_environment_ignored():
    c = load_config(environ={"PATH": "/bin", "TRIOLYTICSPORT": "1", "TRIOLYTICS_CONFIG": "x.toml"})
    assert c.port == 3000


def test_list_env_vars_comma_separated():
    c = load_config(environ={"TRIOLYTICS_WRITE_KEYS": "wk_a, wk_b,,wk_c ",
                             "TRIOLYTICS_CORS_ORIGINS": "https://a.example,https://b.example",
                             "TRIOLYTICS_TRUSTED_PROXIES": "10.0.0.0/8"})
    assert c.write_keys == ["wk_a", "wk_b", "wk_c"]
    assert c.cors_origins == ["https://a.example", "https://b.example"]
    assert c.trusted_proxies == ["10.0.0.0/8"]
    assert load_config(environ={"TRIOLYTICS_WRITE_KEYS": ""}).write_keys == []


def test_lists_from_toml():
    c = load_config('write_keys = ["wk_1", "wk_2"]\ntrusted_proxies = ["127.0.0.1"]\n')
    assert (c.write_keys, c.trusted_proxies) == (["wk_1", "wk_2"], ["127.0.0.1"])


def test_unknown_toml_key_named():
    with pytest.raises(ConfigError, match="prot"):
        load_config("prot = 4000\n")
    with pytest.raises(ConfigError, match="server"):
        load_config("[server]\nport = 4000\n")


def test_unknown_env_key_named():
    with pytest.raises(ConfigError, match="TRIOLYTICS_MAX_EVENTS_BYTES"):
        load_config(environ={"TRIOLYTICS_MAX_EVENTS_BYTES": "10"})


def test_unknown_override_rejected():
    with pytest.raises(ConfigError, match="colour"):
        load_config(overrides={"colour": "blue"})


def test_malformed_toml():
    with pytest.raises(ConfigError):
        load_config("port = = 1\n")


@pytest.mark.parametrize("toml,env,name", [
    ('port = "http"\n', {}, "port"),
    ("", {"TRIOLYTICS_PORT": "abc"}, "port"),
    ('fsync = "sometimes"\n', {}, "fsync"),
    ("", {"TRIOLYTICS_FSYNC": "never"}, "fsync"),
    ("max_event_bytes = 0\n", {}, "max_event_bytes"),
    ("", {"TRIOLYTICS_MAX_BATCH_EVENTS": "-5"}, "max_batch_events"),
    ("port = 70000\n", {}, "port"),
    ("write_keys = 5\n", {}, "write_keys"),
    ("query_timeout_s = 0\n", {}, "query_timeout_s"),
    ("", {"TRIOLYTICS_QUERY_TIMEOUT_S": "-0.5"}, "query_timeout_s"),
    ("ws_max_fragments = 0\n", {}, "ws_max_fragments"),
    ("ws_message_timeout_s = 0\n", {}, "ws_message_timeout_s"),
    ("ws_message_timeout_s = inf\n", {}, "ws_message_timeout_s"),
    ("ws_max_events_per_s = -1\n", {}, "ws_max_events_per_s"),
    ("", {"TRIOLYTICS_WS_ID_MAX_EVENTS_PER_S": "nan"}, "ws_id_max_events_per_s"),
    ("ws_burst_events = 0\n", {}, "ws_burst_events"),
    ("ws_id_burst_events = 0\n", {}, "ws_id_burst_events"),
    ('ws_rate_limit_action = "drop"\n', {}, "ws_rate_limit_action"),
    ("max_future_skew_s = 0\n", {}, "max_future_skew_s"),
    ("", {"TRIOLYTICS_MAX_FUTURE_SKEW_S": "-1"}, "max_future_skew_s"),
    ("max_message_id_chars = 0\n", {}, "max_message_id_chars"),
])
def test_bad_values_rejected_with_name(toml, env, name):
    with pytest.raises(ConfigError, match=name):
        load_config(toml, env)


def test_websocket_limits_from_the_environment():
    config = load_config("", {"TRIOLYTICS_WS_MAX_EVENTS_PER_S": "12.5",
                              "TRIOLYTICS_WS_RATE_LIMIT_ACTION": "close",
                              "TRIOLYTICS_WS_MAX_FRAGMENTS": "64"})
    assert (config.ws_max_events_per_s, config.ws_rate_limit_action,
            config.ws_max_fragments) == (12.5, "close", 64)
    assert Config().ws_max_events_per_s == 0 and Config().ws_id_max_events_per_s == 0  # off


def test_port_zero_allowed():
    # Port 0 asks the OS for a free port (tests, `serve` reports the bound port); the
    # range check in Config.__post_init__ explicitly allows it.
    assert load_config(overrides={"port": 0}).port == 0
    assert Config(port=0).port == 0


@pytest.mark.parametrize("name", ["max_connections", "max_connections_per_ip",
                                  "max_header_count", "head_timeout_s",
                                  "min_body_rate_bytes_s", "body_rate_grace_s"])
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_connection_and_request_limits_must_be_positive(name, value):
    if value == "nan" and not name.endswith("_s"):
        value = "1.5"  # (an integer setting refuses a fraction by its type)
    with pytest.raises(ConfigError, match=name):
        load_config("", {f"TRIOLYTICS_{name.upper()}": value})


def test_input_policy_defaults_and_overrides():
    assert (Config().max_future_skew_s, Config().max_message_id_chars) == (82_800, 100)
    config = load_config("max_message_id_chars = 36\n", {"TRIOLYTICS_MAX_FUTURE_SKEW_S": "60"})
    assert (config.max_future_skew_s, config.max_message_id_chars) == (60, 36)
