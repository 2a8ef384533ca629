"""static/sdk.js: its own unit tests (Node's test runner, tests/js/) and its size budget.

The JavaScript tests run under `node --test`; without Node they are skipped, saying so.
The size is the file minified, then gzip -9: at most 5 KB (static/README.md). Minified
with `rjsmin` when it is installed, else with `strip`, a conservative stripper that
only removes whole-line comments, the block comments that open a line, indentation and
empty lines — it never breaks code (checked with `node --check` when Node is there),
so it overstates the size a real minifier would reach.

End to end, tests/js/live.mjs drives the module variant against a live server (both
transports, and a resend of the same events that must be stored once).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from seed_examples import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SDK = ROOT / "src" / "triolytics" / "static" / "sdk.js"
JS_TESTS = sorted((ROOT / "tests" / "js").glob("*.test.js"))
BUDGET_BYTES = 5 * 1024
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="node is not installed: the SDK's "
                                "JavaScript tests (tests/js/) need Node >= 20")


def strip(source: str) -> str:
    """Remove comments that stand on their own lines, indentation and empty lines."""
    source = re.sub(r"^[ \t]*/\*.*?\*/[ \t]*$", "", source, flags=re.S | re.M)
    lines = (line.strip() for line in source.splitlines())
    return "\n".join(line for line in lines if line and not line.startswith("//"))


def minify(source: str) -> tuple[str, str]:
    try:
        import rjsmin  # type: ignore[import-not-found]
    except ImportError:
        return strip(source), "strip (rjsmin is not installed)"
    return rjsmin.jsmin(source), f"rjsmin {rjsmin.__version__}"


@needs_node
def test_the_javascript_unit_tests_pass():
    assert JS_TESTS
    done = subprocess.run([NODE, "--test", *map(str, JS_TESTS)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    counts = dict(re.findall(r"^# (tests|pass|fail|cancelled|skipped) (\d+)$", done.stdout, re.M))
    print("node --test:", counts)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert counts.get("pass") == counts.get("tests") and int(counts["tests"]) > 0


def test_the_sdk_is_within_its_size_budget(tmp_path):
    small, how = minify(SDK.read_text())
    size = len(gzip.compress(small.encode(), compresslevel=9, mtime=0))
    print(f"sdk.js: {SDK.stat().st_size} bytes, minified by {how}: {len(small.encode())}, "
          f"gzip -9: {size} (budget {BUDGET_BYTES})")
    assert size <= BUDGET_BYTES
    if NODE is not None:  # the minified file must still be JavaScript
        out = tmp_path / "sdk.min.js"
        out.write_text(small)
        subprocess.run([NODE, "--check", str(out)], check=True, timeout=60)


def test_the_stripper_keeps_code():
    source = 'const a = "//x"; // note\n  /* block\n  comment */\n  f(a); /* kept */\n'
    assert strip(source) == 'const a = "//x"; // note\nf(a); /* kept */'


def _node_major() -> int:
    if NODE is None:
        return 0
    version = subprocess.run([NODE, "--version"], capture_output=True, text=True).stdout
    return int(version.strip().lstrip("v").split(".")[0])


@needs_node
def test_the_sdk_against_a_live_server(tmp_path):
    crash_loop = load_bench_script("crash_loop")
    server = crash_loop.Server(tmp_path / "data", tmp_path / "server.log", port=0)
    try:
        server.wait_healthy()
        host = f"http://{crash_loop.HOST}:{server.port}"
        flags = [] if _node_major() >= 22 else ["--experimental-websocket"]
        done = subprocess.run([NODE, *flags, str(ROOT / "tests/js/live.mjs"), host,
                               crash_loop.WRITE_KEY], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        sent = json.loads(done.stdout)
        assert sent["errors"] == []
        ids = sent["http"]["ids"] + sent["realtime"]["ids"]
        token = (tmp_path / "data" / "admin.token").read_text().strip()
        sql = ("SELECT channel, type, event, message_id, anonymous_id FROM events "
               "WHERE type NOT IN ('session_start', 'session_end') ORDER BY ingest_seq")
        deadline = time.monotonic() + 10
        while True:  # loads into DuckDB run every second
            rows = _query(host, token, sql)
            if len(rows) >= len(ids) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        server.terminate()
    assert sorted(r[3] for r in rows) == sorted(ids), "each event stored once, by its id"
    assert [(r[0], r[1], r[2]) for r in rows] == [
        ("http", "track", "sdk_http"), ("http", "page", None), ("http", "screen", None),
        ("http", "identify", None), ("ws", "sdk_realtime", None), ("ws", "page", None),
        ("ws", "screen", None), ("ws", "identify", None)]
    assert {r[4] for r in rows if r[0] == "ws"} == {sent["realtime"]["analyticsId"]}


def _query(host: str, token: str, sql: str) -> list[list]:
    import urllib.request

    req = urllib.request.Request(f"{host}/admin/query", json.dumps({"sql": sql}).encode(),
                                 {"Authorization": f"Bearer {token}",
                                  "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as answer:
        return json.load(answer)["rows"]
