"""The web chat page at ``/ui``: one static HTML file, no build step.

The page calls the documented REST API from the browser (``/chat/stream``
over ``fetch``, ``/sessions/{id}``, ``/chat/clear``), like any other client.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()

PAGE = files(__package__).joinpath("static", "ui.html")


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
async def chat_page() -> HTMLResponse:
    """The chat page."""
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))
