"""The web chat page at ``/ui``: one static HTML file, no build step.

The page calls the documented REST API from the browser (``/chat/stream``
over ``fetch``, ``/sessions/{id}``, ``/chat/clear``), like any other client.
Its inline script and style are all it runs: the Content-Security-Policy
allows nothing else (no other origin, no framing by other sites).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE = files(__package__).joinpath("static", "ui.html")

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


@cache
def page() -> str:
    return PAGE.read_text(encoding="utf-8")


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
async def chat_page() -> HTMLResponse:
    """The chat page."""
    return HTMLResponse(page(), headers=SECURITY_HEADERS)
