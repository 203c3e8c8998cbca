"""A hand-written fake ``Engine`` for the servicer and gateway tests.

It yields scripted pieces, and can fail or wait for cancellation mid-stream.
It validates requests with the real rules (``resolve_sampling``) and keeps
sessions in the real ``InMemorySessionStore``, so only the model is faked.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, AsyncIterator

from inference_server.domain import (
    DEFAULT_TENANT,
    ChatEvent,
    ChatRequest,
    ChatResult,
    CompletionRequest,
    Exchange,
    FinishReason,
    ModelInfo,
    TextDelta,
)
from inference_server.engine_api import MAX_PAGE, collect
from inference_server.errors import (
    ContextOverflow,
    EngineNotReady,
    InvalidRequest,
    Overloaded,
    SessionNotFound,
)
from inference_server.metrics import EngineMetrics
from inference_server.sessions import InMemorySessionStore, Retention, SessionPage
from inference_server.settings import ServerSettings
from inference_server.validation import resolve_completion_sampling, resolve_sampling

FAKE_N_CTX = 256


class FakeEngine:
    """Replies with ``script`` (one piece per token); one character of the
    message counts as one prompt token, so a message over ``FAKE_N_CTX``
    characters does not fit."""

    def __init__(self, script: list[str] | None = None) -> None:
        self.script = script or ["Hello", ",", " world", "!"]
        self.ready = True
        self.unavailable_reason: str | None = None  # reported by model_info, as a store problem
        self.overloaded = False  # refuse every chat as the real engine does past MAX_QUEUE
        self.fail_after: int | None = None  # raise after this many pieces
        self.hang_after: int | None = None  # wait for cancellation after this many pieces
        self.stopped_early = False  # end completions as the core does when shutting down
        self.pieces_sent = 0
        self.cancelled = asyncio.Event()
        self.requests: list[ChatRequest | CompletionRequest] = []
        self.metrics = EngineMetrics("fake-model")
        self.store = InMemorySessionStore(Retention(window=5, max_sessions=100, ttl_s=0))
        self.settings = ServerSettings()

    def _check_available(self) -> None:
        """As the real engine: not while loading, not past its capacity."""
        if not self.ready:
            raise EngineNotReady()
        if self.overloaded:
            raise Overloaded(limit=36)

    async def chat_stream(self, request: ChatRequest) -> AsyncGenerator[ChatEvent, None]:
        self._check_available()
        sampling = resolve_sampling(request, self.settings, FAKE_N_CTX)
        if len(request.message) >= FAKE_N_CTX:
            raise ContextOverflow(len(request.message), FAKE_N_CTX)
        self.requests.append(request)
        session_id = request.session_id or str(uuid.uuid4())
        pieces = self.script[: sampling.max_tokens]
        async for piece in self._scripted(pieces):
            yield piece
        finish = FinishReason.STOP if len(pieces) == len(self.script) else FinishReason.LENGTH
        text = "".join(pieces)
        self.store.append(request.tenant, session_id, Exchange(request.message, text))
        yield ChatResult(session_id, text, finish, len(request.message), len(pieces))

    async def complete_stream(self, request: CompletionRequest) -> AsyncGenerator[ChatEvent, None]:
        """One character of the conversation's contents counts as one prompt token."""
        self._check_available()
        sampling = resolve_completion_sampling(request, self.settings, FAKE_N_CTX)
        prompt_tokens = sum(len(message.content) for message in request.messages)
        if prompt_tokens >= FAKE_N_CTX:
            raise ContextOverflow(prompt_tokens, FAKE_N_CTX)
        self.requests.append(request)
        pieces = self.script[: sampling.max_tokens]
        async for piece in self._scripted(pieces):
            yield piece
        finish = FinishReason.STOP if len(pieces) == len(self.script) else FinishReason.LENGTH
        if self.stopped_early:
            finish = FinishReason.CANCELLED
        yield ChatResult(None, "".join(pieces), finish, prompt_tokens, len(pieces))

    async def complete(self, request: CompletionRequest) -> ChatResult:
        return await collect(self.complete_stream(request))

    def model_info(self) -> ModelInfo:
        return ModelInfo(
            id="fake-model",
            context_size=FAKE_N_CTX,
            loaded=self.ready,
            unavailable_reason=self.unavailable_reason
            or (None if self.ready else "Model not loaded"),
        )

    async def metrics_text(self) -> str:
        return self.metrics.exposition(self.store.count())

    async def _scripted(self, pieces: list[str]) -> AsyncIterator[TextDelta]:
        try:
            for index, piece in enumerate(pieces):
                if index == self.fail_after:
                    raise RuntimeError("the model fell over")
                if index == self.hang_after:
                    await asyncio.Event().wait()  # until cancelled
                self.pieces_sent += 1
                yield TextDelta(piece)
                await asyncio.sleep(0)
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled.set()
            raise

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await collect(self.chat_stream(request))

    async def clear(self, session_id: str, tenant: str = DEFAULT_TENANT) -> None:
        self.store.delete(tenant, session_id)

    async def history(self, session_id: str, tenant: str = DEFAULT_TENANT) -> list[Exchange]:
        history = self.store.history(tenant, session_id)
        if history is None:
            raise SessionNotFound(session_id)
        return history

    async def list_sessions(
        self, tenant: str = DEFAULT_TENANT, limit: int = MAX_PAGE, cursor: str | None = None
    ) -> SessionPage:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        return self.store.list_sessions(tenant, limit, cursor)
