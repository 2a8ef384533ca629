"""deploy/triolytics.service: systemd accepts it, and its limits fit the server's defaults."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from triolytics.core.config import Config

UNIT = Path(__file__).resolve().parents[1] / "deploy" / "triolytics.service"
VENV = "/opt/triolytics/venv"


def setting(name: str) -> str:
    found = re.findall(rf"^{name}=(.*)$", UNIT.read_text(), re.MULTILINE)
    assert len(found) == 1, (name, found)
    return found[0]


def test_limits_fit_the_servers_defaults():
    config = Config()
    assert int(setting("LimitNOFILE")) > config.max_connections
    stop_s = int(setting("TimeoutStopSec"))
    assert stop_s > config.shutdown_grace_s + 30  # the grace, then the final load
    assert setting("KillSignal") == "SIGTERM"
    for hardening in ("DynamicUser", "ProtectHome", "PrivateTmp", "NoNewPrivileges"):
        assert setting(hardening) == "yes"
    assert setting("ProtectSystem") == "strict"
    assert setting("StateDirectory") == "triolytics"
    assert "--data /var/lib/triolytics" in UNIT.read_text()
    assert "--trusted-proxies 127.0.0.1/32" in UNIT.read_text()


def test_systemd_analyze_verify(tmp_path):
    """`systemd-analyze verify`, with ExecStart pointed at this environment's triolytics
    (the documented /opt/triolytics/venv does not exist here)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "triolytics.service"
    unit.write_text(UNIT.read_text().replace(VENV, sys.prefix))
    assert Path(sys.prefix, "bin", "triolytics").exists()
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert str(unit) not in done.stderr, done.stderr  # warnings name the file and line
