"""The sans-I/O core imports no event loop, HTTP machinery or database."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

CORE = ("rows", "errors", "config", "capture", "collector", "dedup", "journal", "web",
        "sessions", "realtime", "identity", "ratelimit", "ws_frames")
EDGE = ("trio", "h11", "duckdb", "trio_websocket", "wsproto")


def imported_edges(modules: list[str]) -> list[str]:
    code = ("import sys; " + "; ".join(f"import triolytics.{m}" for m in modules)
            + f"; print(sorted(m for m in {EDGE!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    return ast.literal_eval(out.stdout)


def test_core_imports_no_edge_module():
    assert imported_edges([f"core.{m}" for m in CORE]) == []


@pytest.mark.parametrize("module", ["journal", "collector", "web", "sessions", "realtime",
                                    "ws_frames"])
def test_each_core_module_alone(module):
    assert imported_edges([f"core.{module}"]) == []


def test_check_can_fail():
    # The probe itself sees an edge import when there is one.
    assert imported_edges(["storage.store"]) == ["duckdb"]
