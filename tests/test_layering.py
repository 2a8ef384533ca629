"""The package tree is the architecture, and imports keep to it:

- `core/`: the sans-I/O core imports no event loop, HTTP machinery or database, and
  nothing of the server's edges or storage;
- `storage/`: the writer and the store know nothing of HTTP or WebSockets (`server/`);
- `client.py`: the Python client needs neither DuckDB nor pyarrow nor the server, and
  installs without them (the `server` extra).

Each probe imports in a fresh interpreter and reports what got loaded."""

from __future__ import annotations

import ast
import os
import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import triolytics

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(triolytics.__file__).parent
EDGE = ("trio", "h11", "duckdb", "pyarrow", "trio_websocket", "wsproto",
        "triolytics.server", "triolytics.storage")
SERVER_ONLY = ("duckdb", "pyarrow", "triolytics.server", "triolytics.storage")


def modules_of(package: str) -> list[str]:
    return sorted(f"triolytics.{package}.{m.name}"
                  for m in pkgutil.iter_modules([str(PACKAGE / package)]))


def loaded(modules: list[str], watch: tuple[str, ...]) -> list[str]:
    """Which of `watch` a fresh interpreter has loaded after importing `modules`."""
    code = ("import sys; " + "; ".join(f"import {m}" for m in modules)
            + f"; print(sorted(w for w in {watch!r} if w in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    return ast.literal_eval(out.stdout)


def test_the_tree_is_grouped_by_role():
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == {
        "core", "server", "storage"}
    assert len(modules_of("core")) >= 13


def test_core_imports_no_edge_module():
    assert loaded(modules_of("core"), EDGE) == []


@pytest.mark.parametrize("module", modules_of("core"))
def test_each_core_module_alone(module):
    assert loaded([module], EDGE) == []


def test_storage_knows_nothing_of_the_server():
    assert loaded(modules_of("storage"), ("triolytics.server", "h11")) == []


def test_client_needs_no_server_side_module():
    assert loaded(["triolytics.client"], SERVER_ONLY) == []


def test_check_can_fail():
    # The probes see an edge import when there is one.
    assert loaded(["triolytics.storage.store"], EDGE) == ["duckdb", "pyarrow",
                                                         "triolytics.storage"]
    assert loaded(["triolytics.server.app"], SERVER_ONLY) == list(SERVER_ONLY)


def test_base_install_leaves_storage_to_the_server_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("<")[0].split("=")[0].strip()
             for d in project["dependencies"]]
    assert "duckdb" not in names and "pyarrow" not in names
    server = " ".join(project["optional-dependencies"]["server"])
    assert "duckdb" in server and "pyarrow" in server


def _uv() -> str | None:
    tool = ROOT / ".tools" / "bin" / "uv"
    return str(tool) if tool.exists() else shutil.which("uv")


@pytest.mark.skipif(_uv() is None, reason="uv is not installed (make test installs it)")
def test_client_installs_and_runs_without_duckdb_or_pyarrow(tmp_path):
    # The locked base install (no `server` extra, no dev tools) in a venv of its own.
    env = {**os.environ, "UV_PROJECT_ENVIRONMENT": str(tmp_path / "venv"),
           "UV_PYTHON_DOWNLOADS": "never"}
    subprocess.run([_uv(), "sync", "--locked", "--no-dev", "--quiet", "--python",
                    sys.executable, "--project", str(ROOT)],
                   env=env, check=True, timeout=300, capture_output=True)
    python = tmp_path / "venv" / "bin" / "python"
    code = ("import importlib.util as u; "
            "from triolytics.client import create_analytics_id, open_client; "
            "print([m for m in ('duckdb', 'pyarrow') if u.find_spec(m)])")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                         check=True, timeout=60, cwd=tmp_path)
    assert out.stdout.strip() == "[]"
