"""server/static.py: the SDK served by the server itself, with ETag, caching and CORS."""

from __future__ import annotations

from importlib.resources import files

from test_e2e_collector import running

from triolytics.server.static import MODULE_FOOTER

SDK = files("triolytics").joinpath("static/sdk.js").read_bytes()


async def test_sdk_js_and_its_module(tmp_path):
    async with running(tmp_path / "data") as server:
        js = await server.request("GET", "/sdk.js")
        assert js.status_code == 200 and js.content == SDK
        assert js.headers["content-type"] == "text/javascript; charset=utf-8"
        assert js.headers["cache-control"] == "public, max-age=300"
        etag = js.headers["etag"]
        again = await server.request("GET", "/sdk.js", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        assert again.headers["etag"] == etag
        other = await server.request("GET", "/sdk.js", headers={"If-None-Match": '"old"'})
        assert other.status_code == 200
        head = await server.request("HEAD", "/sdk.js")
        assert head.status_code == 200 and head.headers["content-length"] == str(len(SDK))
        mjs = await server.request("GET", "/sdk.mjs", headers={"Origin": "https://a.test"})
        assert mjs.content == SDK + b"\n" + MODULE_FOOTER + b"\n"
        assert mjs.headers["etag"] != etag
        assert mjs.headers["access-control-allow-origin"] == "https://a.test"
        assert mjs.headers["access-control-expose-headers"] == "retry-after"


async def test_a_page_elsewhere_can_read_retry_after(tmp_path):
    async with running(tmp_path / "data") as server:
        reply = await server.post("/v1/capture", headers={"Origin": "https://a.test"},
                                  json={})
        assert reply.status_code == 401
        assert reply.headers["access-control-expose-headers"] == "retry-after"
