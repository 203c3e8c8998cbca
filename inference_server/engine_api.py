"""What the gRPC servicer needs from an engine, apart from any engine.

``Engine`` is implemented by ``engine.LlamaEngine`` on llama.cpp and by the
tests' fake engine. Importing this module loads nothing of llama.cpp, so the
gRPC edge (servicer, server) and the fake-engine tests never do either.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Protocol

from .domain import (
    DEFAULT_TENANT,
    ChatEvent,
    ChatRequest,
    ChatResult,
    CompletionRequest,
    Exchange,
    ModelInfo,
)
from .sessions import SessionPage

# The most session ids one listing returns.
MAX_PAGE = 1000


class Engine(Protocol):
    """What the gRPC servicer needs from an engine."""

    def chat_stream(self, request: ChatRequest) -> AsyncGenerator[ChatEvent, None]:
        """Yield the reply as ``TextDelta``s, then one ``ChatResult``.

        The exchange is added to the session's history before the result is
        yielded. Closing the iterator early cancels generation and leaves the
        history unchanged.
        """
        ...

    async def chat(self, request: ChatRequest) -> ChatResult:
        """The whole reply at once; same rules as ``chat_stream``."""
        ...

    async def clear(self, session_id: str, tenant: str = DEFAULT_TENANT) -> None:
        """Forget a session of ``tenant``; raises ``SessionNotFound`` if it has none."""
        ...

    async def history(self, session_id: str, tenant: str = DEFAULT_TENANT) -> list[Exchange]:
        """The session's kept exchanges, oldest first; raises ``SessionNotFound``."""
        ...

    async def list_sessions(
        self, tenant: str = DEFAULT_TENANT, limit: int = MAX_PAGE, cursor: str | None = None
    ) -> SessionPage:
        """A page of the tenant's session ids, least recently used first;
        ``InvalidRequest`` for a bad limit or cursor."""
        ...

    def complete_stream(self, request: CompletionRequest) -> AsyncGenerator[ChatEvent, None]:
        """Reply to a whole conversation, as ``chat_stream`` does, keeping
        nothing; the result's ``session_id`` is ``None``."""
        ...

    async def complete(self, request: CompletionRequest) -> ChatResult:
        """The whole reply at once; same rules as ``complete_stream``."""
        ...

    def model_info(self) -> ModelInfo:
        """The model served, whether it is loaded, and whether a chat can succeed."""
        ...

    async def metrics_text(self) -> str:
        """The engine's metrics in the Prometheus text format."""
        ...


async def collect(events: AsyncGenerator[ChatEvent, None]) -> ChatResult:
    """Run a ``chat_stream`` to its end and return its result."""
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, ChatResult):
                return event
    raise RuntimeError("chat stream ended without a result")
