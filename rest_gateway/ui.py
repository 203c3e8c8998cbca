"""The web chat page at ``/ui`` and its assets under ``/ui/static/``.

The page calls the documented REST API from the browser (``/chat/stream``
over ``fetch``, ``/sessions``, ``/sessions/{id}``, ``/chat/clear``), like any
other client. Its script, style and the two libraries it renders replies with
(marked and DOMPurify, vendored in ``static/vendor/`` by ``make vendor-ui``)
are files of this package, served from a fixed list: no build step, nothing
from another origin. The Content-Security-Policy lets the page run only those
files (no inline script, no inline style), so even markup that got past the
sanitizer cannot run script, and lets it talk only to its own origin.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse

from .errors import ApiError

router = APIRouter()

STATIC = files(__package__).joinpath("static")

# Served under /ui/static/; nothing else is (no directory listing, no paths
# built from the request).
ASSETS = {
    "ui.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
    "vendor/marked.umd.js": "text/javascript; charset=utf-8",
    "vendor/purify.min.js": "text/javascript; charset=utf-8",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def page() -> str:
    return STATIC.joinpath("ui.html").read_text(encoding="utf-8")


@cache
def asset(name: str) -> Asset:
    body = STATIC.joinpath(name).read_bytes()
    return Asset(body, ASSETS[name], f'"{hashlib.sha256(body).hexdigest()[:32]}"')


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
async def chat_page() -> HTMLResponse:
    """The chat page."""
    return HTMLResponse(page(), headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


@router.get("/ui/static/{name:path}", include_in_schema=False)
async def static_asset(name: str, request: Request) -> Response:
    """One of the page's files; revalidated on each load (ETag), so a new
    version of the package is picked up at once."""
    if name not in ASSETS:
        raise ApiError(404, "Not Found")
    found = asset(name)
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "ETag": found.etag}
    if found.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(found.body, media_type=found.media_type, headers=headers)
