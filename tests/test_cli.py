"""cli.py: `serve` flags (units, defaults in --help, flag > env > file). Pure."""

from __future__ import annotations

import pytest

from triolytics import cli
from triolytics.core.config import FIELDS, Config

DEFAULTS = Config()


def serve_config(*flags: str, environ: dict[str, str] | None = None) -> Config:
    return cli.config_of(cli._parser().parse_args(["serve", *flags]), environ or {})


# --- flags: units, --config after `serve`, precedence, --help


@pytest.mark.parametrize(("text", "seconds"), [
    ("30m", 1800.0), ("90s", 90.0), ("1h", 3600.0), ("5", 5.0), ("1.5", 1.5),
    ("250ms", 0.25), ("1d", 86_400.0), (" 2M ", 120.0)])
def test_session_timeout_takes_units(text, seconds):
    assert serve_config("--session-timeout", text).session_timeout_s == seconds


@pytest.mark.parametrize(("text", "count"), [
    ("1MiB", 1024 * 1024), ("512KiB", 512 * 1024), ("500KB", 500_000), ("65536", 65_536),
    ("2mb", 2_000_000), ("1.5KiB", 1536), ("100B", 100)])
def test_max_body_takes_units(text, count):
    assert serve_config("--max-body", text).max_request_bytes == count


def test_other_flags_reach_their_settings():
    c = serve_config("--fsync", "interval", "--fsync-interval", "0.2s", "--log-level", "DEBUG",
                     "--cors-origins", "https://a.example,https://b.example",
                     "--cors-origins", "https://c.example", "--ws-origins", "https://a.example",
                     "--trusted-proxies", "10.0.0.0/8", "--max-connections", "50",
                     "--shutdown-grace", "1m", "--write-key", "wk_a", "--write-key", "wk_b",
                     "--host", "0.0.0.0", "--port", "0", "--data", "/srv/t")
    assert (c.fsync, c.fsync_interval_ms, c.log_level) == ("interval", 200, "debug")
    assert c.cors_origins == ["https://a.example", "https://b.example", "https://c.example"]
    assert (c.ws_origins, c.trusted_proxies) == (["https://a.example"], ["10.0.0.0/8"])
    assert (c.max_connections, c.shutdown_grace_s) == (50, 60.0)
    assert (c.write_keys, c.host, c.port, c.data_dir) == (["wk_a", "wk_b"], "0.0.0.0", 0,
                                                          "/srv/t")


def test_no_flag_leaves_every_setting_alone():
    assert serve_config() == DEFAULTS


def test_every_flag_is_a_setting():
    assert {name for _, name, _, _ in cli.SERVE_FLAGS} <= set(FIELDS)


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--session-timeout", "soon", "not a duration"),
    ("--session-timeout", "0", "must be more than 0"),
    ("--session-timeout", "-5", "not a duration"),
    ("--session-timeout", "5 fortnights", "not a duration"),
    ("--max-body", "1.5B", "not a whole number of bytes"),
    ("--max-body", "lots", "not a size"),
    ("--max-body", "0", "must be more than 0"),
    ("--fsync-interval", "0.1ms", "not a whole number of ms"),
    ("--port", "70000", "not a port"),
    ("--max-connections", "many", "not a number"),
    ("--log-level", "loud", "invalid choice"),
    ("--fsync", "sometimes", "invalid choice")])
def test_a_bad_flag_value_is_an_argparse_error(capsys, flag, value, says):
    with pytest.raises(SystemExit) as exit_:
        cli._parser().parse_args(["serve", flag, value])  # (never serves, whatever it says)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"triolytics serve: error: argument {flag}: "), err
    assert says in err and "Traceback" not in err


def test_config_is_accepted_after_serve_too(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text("port = 4000\nsession_timeout_s = 60\n")
    after = serve_config("--config", str(path))
    assert (after.port, after.session_timeout_s) == (4000, 60.0)
    before = cli.config_of(cli._parser().parse_args(["--config", str(path), "serve"]), {})
    assert before == after
    other = tmp_path / "g.toml"
    other.write_text("port = 5000\n")
    both = cli._parser().parse_args(["--config", str(other), "serve", "--config", str(path)])
    assert cli.config_of(both, {}).port == 4000  # the one after `serve` wins


def test_flag_beats_env_beats_file(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('session_timeout_s = 60\nmax_request_bytes = 1000\nfsync = "off"\n'
                    'log_level = "warning"\n')
    env = {"TRIOLYTICS_SESSION_TIMEOUT_S": "120", "TRIOLYTICS_FSYNC": "interval",
           "TRIOLYTICS_CONFIG": str(path)}  # the file named by the environment
    c = serve_config("--session-timeout", "3m", environ=env)
    assert c.session_timeout_s == 180.0  # flag over env over file
    assert c.fsync == "interval"  # env over file
    assert (c.max_request_bytes, c.log_level) == (1000, "warning")  # file over default
    assert serve_config(environ=env).session_timeout_s == 120.0


def test_help_lists_every_flag_with_its_default_and_unit(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for flag, name, _, _ in cli.SERVE_FLAGS:
        assert flag in text
        assert f"({name}; default: " in text, name
    for shown in (f"(session_timeout_s; default: {DEFAULTS.session_timeout_s:g} s)",
                  f"(max_request_bytes; default: {DEFAULTS.max_request_bytes} bytes",
                  f"(fsync_interval_ms; default: {DEFAULTS.fsync_interval_ms} ms)",
                  f"(port; default: {DEFAULTS.port})", f"(fsync; default: {DEFAULTS.fsync})",
                  f"(data_dir; default: {DEFAULTS.data_dir})", "--config FILE"):
        assert shown in text, shown
