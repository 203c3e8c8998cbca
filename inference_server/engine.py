"""The chat engine: sessions, prompts and generation, behind a small interface.

It knows nothing of gRPC or HTTP. ``Engine`` is what the servicer depends on;
``LlamaEngine`` implements it on llama.cpp, and tests implement it with a fake.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from functools import partial
from typing import Protocol, TypeVar

from .domain import ChatEvent, ChatRequest, ChatResult, Exchange, FinishReason, TextDelta
from .errors import ContextOverflow, EngineNotReady, ModelLoadError
from .llama_model import Generation, LlamaModel
from .sessions import SessionStore
from .settings import ServerSettings
from .validation import resolve_sampling

log = logging.getLogger(__name__)
T = TypeVar("T")


class Engine(Protocol):
    """What the gRPC servicer needs from an engine."""

    def chat_stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        """Yield the reply as ``TextDelta``s, then one ``ChatResult``.

        The exchange is added to the session's history before the result is
        yielded. Closing the iterator early cancels generation and leaves the
        history unchanged.
        """
        ...

    async def chat(self, request: ChatRequest) -> ChatResult:
        """The whole reply at once; same rules as ``chat_stream``."""
        ...

    async def clear(self, session_id: str) -> None:
        """Forget a session; raises ``SessionNotFound`` if there is none."""
        ...

    async def list_sessions(self) -> list[str]:
        """Ids of all sessions, least recently used first."""
        ...


async def collect(events: AsyncIterator[ChatEvent]) -> ChatResult:
    """Run a ``chat_stream`` to its end and return its result."""
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, ChatResult):
                return event
    raise RuntimeError("chat stream ended without a result")


def _log_outcome(session_id: str, prompt_tokens: int, future: asyncio.Future[Generation]) -> None:
    """One log line per generation, also for those whose stream was closed early."""
    if future.cancelled():
        return
    if (error := future.exception()) is not None:
        log.error("session=%s generation failed: %r", session_id, error)
        return
    outcome = future.result()
    log.info(
        "session=%s finish=%s prompt_tokens=%d completion_tokens=%d",
        session_id,
        outcome.finish_reason.value,
        prompt_tokens,
        outcome.completion_tokens,
    )


class LlamaEngine:
    """``Engine`` on one llama.cpp model.

    Every call into llama.cpp runs on one dedicated worker thread, off the
    event loop. Requests take turns in arrival order (an ``asyncio.Lock`` is
    fair): one that arrives while another generates waits, it is never cut off.
    """

    def __init__(
        self,
        settings: ServerSettings,
        store: SessionStore,
        load_model: Callable[[], LlamaModel],
    ) -> None:
        self._settings = settings
        self._store = store
        self._load_model = load_model
        self._model: LlamaModel | None = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._turn = asyncio.Lock()
        # The session whose reply is being generated, and whether it was cleared
        # meanwhile (then the finished exchange must not bring it back).
        self._generating_for: str | None = None
        self._cleared_while_generating = False

    async def _on_worker(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    async def load(self) -> None:
        """Load the model on the worker thread; the engine is ready afterwards.

        Raises ``ModelLoadError`` if llama.cpp cannot load the file.
        """
        try:
            self._model = await self._on_worker(self._load_model)
        except (ValueError, RuntimeError, OSError) as error:
            raise ModelLoadError(f"Could not load the model: {error}") from error

    async def aclose(self) -> None:
        """Free the model and stop the worker thread, after the work queued on it."""
        model, self._model = self._model, None
        if model is not None:
            await self._on_worker(model.close)
        await asyncio.to_thread(self._worker.shutdown, wait=True)

    def _require_model(self) -> LlamaModel:
        if self._model is None:
            raise EngineNotReady()
        return self._model

    def _messages(self, history: list[Exchange], message: str) -> list[dict[str, str]]:
        messages = []
        if self._settings.system_prompt:
            messages.append({"role": "system", "content": self._settings.system_prompt})
        for exchange in history:
            messages.append({"role": "user", "content": exchange.user})
            messages.append({"role": "assistant", "content": exchange.assistant})
        messages.append({"role": "user", "content": message})
        return messages

    def _fit_prompt(self, model: LlamaModel, history: list[Exchange], message: str) -> list[int]:
        """Tokenize the conversation, dropping the oldest exchanges until the
        prompt leaves room for at least one generated token."""
        for start in range(len(history) + 1):
            prompt = model.tokenize_chat(self._messages(history[start:], message))
            if len(prompt) < model.n_ctx:
                return prompt
        raise ContextOverflow(len(prompt), model.n_ctx)

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[ChatEvent]:
        model = self._require_model()
        sampling = resolve_sampling(request, self._settings, model.n_ctx)
        session_id = request.session_id or str(uuid.uuid4())
        async with self._turn:
            self._generating_for, self._cleared_while_generating = session_id, False
            history = self._store.history(session_id)
            prompt = await self._on_worker(self._fit_prompt, model, history, request.message)
            loop = asyncio.get_running_loop()
            pieces: asyncio.Queue[str | None] = asyncio.Queue()
            cancelled = threading.Event()

            def emit(piece: str) -> None:
                loop.call_soon_threadsafe(pieces.put_nowait, piece)

            generation = loop.run_in_executor(
                self._worker, model.generate, prompt, sampling, cancelled, emit
            )
            # Runs on the loop after every piece emitted before the thread returned.
            generation.add_done_callback(lambda _: pieces.put_nowait(None))
            generation.add_done_callback(partial(_log_outcome, session_id, len(prompt)))
            try:
                while (piece := await pieces.get()) is not None:
                    yield TextDelta(piece)
            finally:
                # Closed early (client gone): stop generating within one token.
                cancelled.set()
                self._generating_for = None
            outcome: Generation = await generation
            keep = outcome.finish_reason is not FinishReason.CANCELLED
            if keep and not self._cleared_while_generating:
                self._store.append(session_id, Exchange(request.message, outcome.text))
        yield ChatResult(
            session_id=session_id,
            text=outcome.text,
            finish_reason=outcome.finish_reason,
            prompt_tokens=len(prompt),
            completion_tokens=outcome.completion_tokens,
        )

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await collect(self.chat_stream(request))

    async def clear(self, session_id: str) -> None:
        self._store.delete(session_id)
        if session_id == self._generating_for:
            self._cleared_while_generating = True

    async def list_sessions(self) -> list[str]:
        return self._store.session_ids()
