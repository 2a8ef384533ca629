"""bench/fuzz.py keeps working: a few seconds against a server it starts itself.

This checks the harness, not the server: its JSON document is complete, it sent every
kind of input and read answers, the server's end checks ran (health 200, an event stored
with 201, exit 0 on SIGTERM), and every finding it counted was saved as files. Whether
the server had findings is the long run's business (bench/README.md), not this test's;
there are no timing assertions (the machine may be loaded).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "bench" / "fuzz.py"


def test_the_fuzz_harness_runs_and_reports(tmp_path):
    findings = tmp_path / "findings"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIOLYTICS_")}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(FUZZ), "--duration", "5", "--seed", "7", "--concurrency", "4",
         "--findings", str(findings)],
        capture_output=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode in (0, 1), proc.stderr.decode(errors="replace")[-3000:]
    report = json.loads(proc.stdout)
    assert report["seed"] == 7
    assert report["connections"] > 0
    assert report["inputs"]["total"] == report["connections"]
    assert report["answers"]["http_status"], report["answers"]
    assert report["findings"].get("by_kind", {}).get("harness_error", 0) == 0, \
        proc.stderr.decode(errors="replace")[-3000:]
    assert report["final_checks"] == {"healthz": 200, "capture": 201, "exit_code": 0}
    assert report["rss_mb"]["max"] is not None
    # exit status and `ok` agree with the findings, and each finding kind left its files
    assert (proc.returncode == 0) == report["ok"] == (report["findings"]["total"] == 0)
    for base in report["findings"]["saved"]:
        assert Path(base + ".bin").exists() and Path(base + ".json").exists()
    assert (findings / "server.log").exists()


def test_the_seed_corpus_is_what_the_harness_writes(tmp_path):
    """bench/fuzz_corpus is `fuzz.py --write-corpus`'s output, and stays small."""
    subprocess.run([sys.executable, str(FUZZ), "--write-corpus", str(tmp_path)], check=True,
                   timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    corpus = ROOT / "bench" / "fuzz_corpus"
    written = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed = {p.relative_to(corpus): p.read_bytes() for p in corpus.rglob("*") if p.is_file()}
    assert written == committed
    assert sum(len(b) for b in committed.values()) < 1_000_000
    assert any(str(p).endswith(".frames") for p in committed)
