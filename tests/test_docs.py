"""The docs keep up with the code: every error code and close code the server can answer
is documented, links stay inside the project and resolve, and the API documents'
examples are in docs/ byte for byte.

Error codes are read from the source, not from a list kept here: `core/errors.py`'s
STATUS table, every `ApiError("code", ...)` and `Refusal(seq, "code", ...)` call, and
every `"code":"..."` in a literal (the 500 answer). Close codes are every `CLOSE_*`
constant. A new code that is not in the docs fails `test_every_*`.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

from seed_examples import CURL_BODY, DOC_PAYLOAD

from triolytics.core.errors import STATUS

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "triolytics"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The modules a WebSocket's refusals come from: its handshake, its ids, its messages.
WS_MODULES = ("server/ws_server.py", "core/identity.py", "core/realtime.py")


@cache
def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _name(func: ast.expr) -> str | None:
    return func.id if isinstance(func, ast.Name) else \
        func.attr if isinstance(func, ast.Attribute) else None


def _text(node: ast.expr) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) \
        else None


def refusals(node: ast.AST) -> dict[str, bool]:
    """Codes refused within `node`: code -> whether it is sent with `Retry-After`."""
    found: dict[str, bool] = {}
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        name, code = _name(call.func), None
        if name == "ApiError" and call.args:
            code = _text(call.args[0])
        elif name == "Refusal" and len(call.args) > 1:
            code = _text(call.args[1])
        if code is not None:
            retry = any(kw.arg == "headers" and "retry-after" in ast.unparse(kw.value)
                        for kw in call.keywords)
            found[code] = found.get(code, False) or retry
    return found


def imported_refusals(path: Path) -> dict[str, bool]:
    """Codes refused by the functions `path` imports from other triolytics modules."""
    found: dict[str, bool] = {}
    for node in ast.walk(tree(path)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("triolytics."):
            module = SRC.joinpath(*node.module.split(".")[1:]).with_suffix(".py")
            names = {alias.name for alias in node.names}
            for fn in ast.walk(tree(module)):
                if isinstance(fn, ast.FunctionDef) and fn.name in names:
                    found.update(refusals(fn))
    return found


def http_codes() -> dict[str, int]:
    """Every error code an HTTP answer can carry -> its status."""
    codes = dict(STATUS)
    for path in SRC.rglob("*.py"):
        for code in refusals(tree(path)):
            assert code in STATUS, f"{path}: ApiError code {code!r} has no status in STATUS"
        for status, code in re.findall(r'Response\((\d{3}), (\w+)\)', path.read_text()):
            literal = re.search(rf'^{code} = b\'{{"error":{{"code":"(\w+)"', path.read_text(),
                                re.M)
            if literal:
                codes[literal.group(1)] = int(status)
    return codes


def with_retry_after() -> set[str]:
    found: set[str] = set()
    for path in SRC.rglob("*.py"):
        found |= {code for code, retry in refusals(tree(path)).items() if retry}
    return found


def ws_codes() -> set[str]:
    """Every code of a refused handshake or an error message on the WebSocket."""
    found: set[str] = set()
    for module in WS_MODULES:
        path = SRC / module
        found |= refusals(tree(path)).keys() | imported_refusals(path).keys()
    return found


def close_codes() -> set[int]:
    """Every close code the server sends: the `CLOSE_* = 1000` constants."""
    found: set[int] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(tree(path)):
            if not isinstance(node, ast.Assign) or not isinstance(node.targets[0],
                                                                  ast.Name | ast.Tuple):
                continue
            target, value = node.targets[0], node.value
            names = [target] if isinstance(target, ast.Name) else target.elts
            values = [value] if not isinstance(value, ast.Tuple) else value.elts
            for name, v in zip(names, values, strict=False):
                if isinstance(name, ast.Name) and name.id.startswith("CLOSE_") \
                        and isinstance(v, ast.Constant) and isinstance(v.value, int) \
                        and 1000 <= v.value < 5000:
                    found.add(v.value)
    return found


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("|")]


def undocumented(codes: dict[str, int | None], text: str) -> list[str]:
    """Codes without a table row that names them (and their status, when given)."""
    rows = table_rows(text)
    return sorted(code for code, status in codes.items() if not any(
        f"`{code}`" in row and (status is None or re.search(rf"\|\s*`?{status}`?\s*\|", row))
        for row in rows))


def test_every_http_error_code_is_in_api_md_with_its_status():
    codes = http_codes()
    assert {"rate_limited", "internal", "overloaded"} <= codes.keys()  # the scan works
    assert not undocumented(codes, (ROOT / "docs/api.md").read_text())


def test_every_retry_after_is_documented():
    rows = table_rows((ROOT / "docs/api.md").read_text())
    retry = with_retry_after() | {"overloaded"}  # (errors.overloaded() adds the header)
    assert "rate_limited" in retry
    missing = [code for code in sorted(retry)
               if not any(f"`{code}`" in row and "Retry-After" in row for row in rows)]
    assert not missing, f"docs/api.md does not say these come with Retry-After: {missing}"


def test_every_websocket_error_code_is_in_websocket_md():
    codes = ws_codes()
    assert {"unknown_analytics_id", "invalid_json", "unavailable"} <= codes
    assert not undocumented(dict.fromkeys(codes), (ROOT / "docs/websocket.md").read_text())


def test_every_close_code_is_in_websocket_md():
    codes = close_codes()
    assert {1000, 1001, 1002, 1007, 1008, 1009, 1011} <= codes
    rows = table_rows((ROOT / "docs/websocket.md").read_text())
    missing = sorted(c for c in codes if not any(re.match(rf"\|\s*{c}\s*\|", r) for r in rows))
    assert not missing, f"close codes not in docs/websocket.md's table: {missing}"


def test_a_missing_code_is_caught():
    text = (ROOT / "docs/api.md").read_text()
    without = "\n".join(line for line in text.splitlines() if "`rate_limited`" not in line)
    assert undocumented(http_codes(), without) == ["rate_limited"]
    wrong_status = text.replace("| 429 | `rate_limited`", "| 503 | `rate_limited`")
    assert undocumented(http_codes(), wrong_status) == ["rate_limited"]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    fenced, found = False, set()
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(_slug(line.lstrip("#")))
    return found


def test_links_stay_in_the_project_and_resolve():
    broken = []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # (a URL: none points into another checkout)
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.is_relative_to(ROOT) or not path.exists() or \
                    (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
                broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not broken


def test_nothing_reads_or_links_outside_the_project():
    needles = ("../" + "shared", "shared" + "/seeds")  # (apart: this file must not match)
    places = [ROOT / "README.md", ROOT / "docs", ROOT / "src", ROOT / "tests", ROOT / "bench"]
    files = [p for place in places for p in ([place] if place.is_file() else place.rglob("*"))
             if p.is_file() and p.suffix in {".md", ".py", ".txt", ".toml"}]
    hits = sorted(str(p.relative_to(ROOT)) for p in files
                  if any(n in p.read_text(errors="replace") for n in needles))
    assert not hits


def test_the_api_documents_examples_are_in_docs_byte_for_byte():
    assert CURL_BODY.decode() in (ROOT / "docs/collector-api.md").read_text()
    assert DOC_PAYLOAD in (ROOT / "docs/realtime-api.md").read_text()


def test_license_is_the_mit_license_pyproject_names():
    assert 'license = { text = "MIT" }' in (ROOT / "pyproject.toml").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the triolytics authors\n")


def test_every_setting_is_in_configuration_md():
    from triolytics.core.config import FIELDS
    rows = table_rows((ROOT / "docs/configuration.md").read_text())
    missing = [name for name in FIELDS if not any(row.lstrip("| ").startswith(f"`{name}`")
                                                  for row in rows)]
    assert not missing, f"settings without a row in docs/configuration.md: {missing}"
