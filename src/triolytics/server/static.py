"""Files of `triolytics/static/` served as they are: the SDK (`/sdk.js`, `/sdk.mjs`).

Rules:
- Read once, at start-up, from the installed package; each one's `ETag` is a digest of
  its bytes, so a new release is fetched again and an unchanged file answers `304`.
- `Cache-Control: public, max-age=300`: a browser revalidates every five minutes (the
  URL carries no version, so a long lifetime would pin an old SDK for days).
- CORS as for every route (`cors_origins`): a page that may send events may also
  `import()` the module.
- `/sdk.mjs` is sdk.js with the one footer line its header names (no build step).
"""

from __future__ import annotations

import hashlib
from importlib.resources import files

from triolytics.core.web import Request, Response, Routes

JS = b"text/javascript; charset=utf-8"
MODULE_FOOTER = b"export default triolytics; export const init = triolytics.init;"


class Static:
    def __init__(self, body: bytes, content_type: bytes,
                 cache_control: bytes = b"public, max-age=300") -> None:
        self.body, self.content_type = body, content_type
        self.etag = b'"%s"' % hashlib.sha256(body).hexdigest()[:20].encode()
        self.headers = [(b"etag", self.etag), (b"cache-control", cache_control),
                        (b"x-content-type-options", b"nosniff")]

    async def __call__(self, req: Request) -> Response:
        tags = req.headers.get(b"if-none-match", b"")
        if self.etag in tags.split(b", ") or tags == b"*":
            return Response(304, b"", self.headers, content_type=b"")
        return Response(200, self.body, self.headers, content_type=self.content_type)


def sdk_routes() -> Routes:
    sdk = files("triolytics").joinpath("static/sdk.js").read_bytes()
    routes: Routes = {}
    for path, body in ((b"/sdk.js", sdk), (b"/sdk.mjs", sdk + b"\n" + MODULE_FOOTER + b"\n")):
        handler = Static(body, JS)
        routes[path] = {b"GET": handler, b"HEAD": handler}
    return routes
