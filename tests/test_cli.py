"""cli.py: `serve` flags (units, defaults in --help, flag > env > file) and start-up faults
as one line on stderr with a non-zero exit, no traceback.

Parser tests are pure. Fault tests run `python -m triolytics serve` as a user would and
read its stderr; a second server is refused while one of ours holds the data directory.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from functools import partial

import pytest
import trio
from test_e2e_collector import running

from triolytics import cli
from triolytics.core.config import FIELDS, Config
from triolytics.server.startup import StartupError, startup_error

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


# --- start-up faults: one line on stderr, a non-zero exit, no traceback


def run_serve(*args: str) -> subprocess.CompletedProcess:
    """`triolytics serve ARGS` in a subprocess, as from a shell without TRIOLYTICS_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOLYTICS_")}
    return subprocess.run([sys.executable, "-m", "triolytics", "serve", *args],
                          capture_output=True, text=True, timeout=60, env=env)


def one_line(done: subprocess.CompletedProcess, status: int = 1) -> str:
    assert done.returncode == status, done
    assert "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("triolytics: ")
    return line


def test_port_in_use_is_one_line_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_serve("--port", str(port), "--data", str(tmp_path / "data"))
    line = one_line(done)
    assert f"127.0.0.1:{port}" in line and "in use" in line and "--port" in line, line


def test_a_key_created_by_a_failed_start_is_listed_later(tmp_path, capsys):
    data = tmp_path / "data"
    with socket.socket() as taken:  # startup fails after the key is made
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = run_serve("--port", str(taken.getsockname()[1]), "--data", str(data))
    one_line(done)
    [said] = [line for line in done.stdout.splitlines() if "write key" in line]
    assert f"`triolytics keys list --data {data}` shows it again" in said, said
    key = said.split("write key ")[1].split()[0]
    assert key.startswith("wk_")
    assert cli.main(["keys", "list", "--data", str(data)]) == 0
    [listed] = capsys.readouterr().out.splitlines()
    assert listed.split("\t")[:2] == [key, "default"]


async def test_a_second_server_on_the_same_data_dir_is_told_it_is_locked(tmp_path):
    data = tmp_path / "data"
    async with running(data):  # this process holds events.duckdb
        done = await trio.to_thread.run_sync(partial(
            run_serve, "--port", "0", "--data", str(data)))
    line = one_line(done)
    assert f"data directory {data} is locked" in line, line
    assert f"(PID {os.getpid()}" in line and "--data" in line, line


def test_an_unwritable_data_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory\n")
    data = tmp_path / "file" / "sub"  # (chmod does not stop root; a file in the path does)
    line = one_line(run_serve("--port", "0", "--data", str(data)))
    assert f"data directory {data} is not writable" in line and "--data" in line, line
    assert not data.exists()


def test_a_data_file_of_a_newer_schema_is_one_line(tmp_path):
    from triolytics.storage.store import Store
    store = Store(tmp_path / "events.duckdb")
    store.conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    store.close()
    line = one_line(run_serve("--port", "0", "--data", str(tmp_path)))
    assert "has schema version 99" in line and "upgrade triolytics" in line, line


def test_a_bad_config_value_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("session_timeout_s = -5\n")
    line = one_line(run_serve("--config", str(path), "--port", "0"), status=2)
    assert "session_timeout_s must be positive" in line, line
    line = one_line(run_serve("--config", str(tmp_path / "missing.toml")), status=2)
    assert "missing.toml" in line, line


def test_a_bad_environment_value_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("TRIOLYTICS_MAX_REQUEST_BYTES", "lots")
    assert cli.main(["serve"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "max_request_bytes" in line


def test_serve_without_the_server_extra_is_one_line(tmp_path):
    code = ("import sys; sys.modules['duckdb'] = None  # as if not installed\n"
            "from triolytics.cli import main\n"
            f"raise SystemExit(main(['serve', '--port', '0', '--data', {str(tmp_path)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    line = one_line(done)
    assert "pip install 'triolytics[server]'" in line and "duckdb" in line, line


# --- only start-up faults are shortened: anything else keeps its traceback


def test_startup_error_unwraps_groups_of_startup_errors_only():
    fault = StartupError("port taken")
    assert startup_error(fault) is fault
    nested = ExceptionGroup("root", [ExceptionGroup("service", [fault])])
    assert startup_error(nested) is fault
    assert startup_error(ExceptionGroup("root", [fault, ValueError("bug")])) is None
    assert startup_error(ExceptionGroup("root", [ValueError("bug")])) is None
    assert startup_error(ValueError("bug")) is None


def _serve_raising(error: Exception):
    async def serve(config, **_) -> None:
        async with trio.open_nursery() as root:  # as in app.serve: nested nurseries
            async with trio.open_nursery():
                raise error
            root.cancel_scope.cancel()
    return serve


def test_main_prints_a_nested_startup_error_as_one_line(capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_serve", lambda: _serve_raising(StartupError("it broke")))
    assert cli.main(["serve", "--port", "0"]) == 1
    assert capsys.readouterr().err == "triolytics: it broke\n"


def test_main_lets_any_other_error_through_with_its_traceback(monkeypatch):
    monkeypatch.setattr(cli, "load_serve", lambda: _serve_raising(RuntimeError("a bug")))
    with pytest.raises(ExceptionGroup) as raised:
        cli.main(["serve", "--port", "0"])
    assert raised.group_contains(RuntimeError, match="a bug")


def test_the_data_dir_is_made_when_missing(tmp_path):
    from triolytics.server.startup import open_data_dir
    data = tmp_path / "a" / "b"
    open_data_dir(data)
    assert data.is_dir() and list(data.iterdir()) == []  # the probe leaves nothing
