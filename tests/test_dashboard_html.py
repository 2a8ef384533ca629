"""server/dashboard_html.py and static/dashboard/: the pages escape what they show, keep
to the CSP (no inline script or style), reference their assets, and the script and
styles stay within their budget (40 KB gzip)."""

from __future__ import annotations

import gzip
import re
from html.parser import HTMLParser
from importlib.resources import files

import pytest

from triolytics.server.dashboard_html import CARDS, LISTS, RANGES, render_login, render_page

DASHBOARD = files("triolytics").joinpath("static/dashboard")
BUDGET = 40 * 1024  # bytes: the page's JS + CSS, each file gzipped (level 9)
EVIL = "<script>alert(1)</script>\"'&"
ASSETS = {"dashboard.js": "/dashboard/static/dashboard.js?v=abc",
          "dashboard.css": "/dashboard/static/dashboard.css?v=def",
          "uPlot.iife.min.js": "/dashboard/static/uPlot.iife.min.js?v=1&x=<2>",
          "uPlot.min.css": "/dashboard/static/uPlot.min.css?v=3"}


class Tags(HTMLParser):
    """Every start tag with its attributes, and the text inside <script> elements."""

    def __init__(self, page: bytes) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.script_text, self.text, self._in_script = "", "", False
        self.feed(page.decode())
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_text += data
        self.text += data

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]

    def ids(self) -> set[str]:
        return {a["id"] for _, a in self.tags if a.get("id")}


def pages() -> list[bytes]:
    return [render_login(), render_login("Wrong token."), render_page("admin", [], {}),
            render_page("viewer", ["default", "shop"], ASSETS)]


@pytest.mark.parametrize("page", pages())
def test_no_inline_script_style_or_handlers(page):
    tags = Tags(page)
    assert page.startswith(b"<!doctype html>")
    assert tags.script_text.strip() == "", "no inline script"
    assert tags.all("style") == [], "no <style> element"
    for tag, attrs in tags.tags:
        assert "style" not in attrs, f"<{tag}> has a style attribute"
        assert not [a for a in attrs if a.startswith("on")], f"<{tag}> has a handler"
        if tag == "script":
            assert attrs.get("src"), "every script is a file"
        for name in ("href", "src", "action"):
            value = attrs.get(name)
            assert value is None or value.startswith("/"), f"<{tag} {name}={value}>: same origin"
    for form in tags.all("form"):
        assert form.get("action") in (None, "/login", "/logout"), form


def test_everything_shown_is_escaped():
    page = render_page(EVIL, [EVIL, "a&b"], {"dashboard.js": EVIL})
    assert b"<script>alert" not in page
    tags = Tags(page)
    assert [o["value"] for o in tags.all("option")] == ["", EVIL, "a&b"]
    assert tags.all("body")[0]["data-role"] == EVIL
    assert any(s.get("src") == EVIL for s in tags.all("script"))
    login = render_login(EVIL)
    assert b"<script>alert" not in login and EVIL in Tags(login).text


def test_the_login_form():
    tags = Tags(render_login())
    (form,) = tags.all("form")
    assert form["method"] == "post" and form["action"] == "/login"
    (field,) = tags.all("input")
    assert field["name"] == "token" and field["type"] == "password"
    assert "alert" not in render_login().decode()
    assert "Wrong token." in Tags(render_login("Wrong token.")).text
    assert tags.all("script") == [], "the login page runs no script"


def test_the_page_references_its_assets_in_order():
    tags = Tags(render_page("admin", ["default"], ASSETS))
    assert [s["src"] for s in tags.all("script")] == [ASSETS["uPlot.iife.min.js"],
                                                     ASSETS["dashboard.js"]]
    assert all("defer" in s for s in tags.all("script"))
    assert [a["href"] for a in tags.all("link")] == [ASSETS["uPlot.min.css"],
                                                     ASSETS["dashboard.css"]]
    # Without `assets`, the files' plain URLs; every one of them exists.
    plain = Tags(render_page("admin", [], {}))
    urls = [s["src"] for s in plain.all("script")] + [a["href"] for a in plain.all("link")]
    for url in urls:
        assert url.startswith("/dashboard/static/")
        assert DASHBOARD.joinpath(url.rsplit("/", 1)[1]).is_file(), url


def test_the_shell_has_every_place_the_script_fills():
    page = render_page("viewer", ["default", "shop"], {})
    tags = Tags(page)
    script = DASHBOARD.joinpath("dashboard.js").read_text()
    # Each `#id` the script looks up is in the page.
    wanted = set(re.findall(r'\$\("#([\w-]+)', script))
    wanted |= {f"top-{key}" for key, _, _ in LISTS}
    assert wanted <= tags.ids(), wanted - tags.ids()
    assert [b["data-range"] for b in tags.all("button") if "data-range" in b] == \
        [name for name, _ in RANGES]
    assert [d["data-figure"] for d in tags.all("div") if "data-figure" in d] == \
        [f for f, _, _ in CARDS]
    assert [o["value"] for o in tags.all("option")] == ["", "default", "shop"]
    (logout,) = [f for f in tags.all("form") if f.get("action") == "/logout"]
    assert logout["method"] == "post"
    assert tags.all("dialog")[0]["id"] == "session"
    assert tags.all("body")[0]["data-role"] == "viewer"


def test_the_script_keeps_to_the_csp():
    script = DASHBOARD.joinpath("dashboard.js").read_text().split("*/", 1)[1]  # (its rules)
    for banned in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                   "new Function", "setAttribute(\"style", "setAttribute('style", "cssText"):
        assert banned not in script, banned
    assert "EventSource" in script and "setInterval" in script


def test_uplot_is_vendored_unchanged_with_its_licence():
    js = DASHBOARD.joinpath("uPlot.iife.min.js").read_text()
    version = re.match(r"/\*! https://github.com/leeoniya/uPlot \(v([\d.]+)\) \*/", js)
    assert version, "uPlot's own header comment"
    readme = DASHBOARD.joinpath("README.md").read_text()
    assert f"uplot@{version[1]}" in readme
    assert "MIT" in DASHBOARD.joinpath("uPlot.LICENSE").read_text()


def test_js_and_css_within_budget():
    sizes = {f.name: len(gzip.compress(f.read_bytes(), compresslevel=9))
             for f in DASHBOARD.iterdir() if f.name.endswith((".js", ".css"))}
    assert {"dashboard.js", "dashboard.css", "uPlot.iife.min.js", "uPlot.min.css"} <= set(sizes)
    total = sum(sizes.values())
    print(f"\ndashboard JS + CSS, gzip -9: {total} bytes ({total / 1024:.1f} KB) of "
          f"{BUDGET // 1024} KB: {sizes}")
    assert total <= BUDGET
