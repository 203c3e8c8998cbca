"""The chat engine: sessions, prompts and generation, on llama.cpp.

It knows nothing of gRPC or HTTP. ``LlamaEngine`` implements
``engine_api.Engine``, what the servicer depends on.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from functools import partial
from typing import ParamSpec, TypeVar, cast

from .constraints import constrained
from .domain import (
    DEFAULT_TENANT,
    ChatEvent,
    ChatRequest,
    ChatResult,
    CompletionRequest,
    Exchange,
    FinishReason,
    ModelInfo,
    Sampling,
    SessionKey,
    TextDelta,
)
from .engine_api import MAX_PAGE, collect
from .errors import (
    ContextOverflow,
    EngineFailed,
    EngineNotReady,
    HistoryChanged,
    InvalidRequest,
    ModelLoadError,
    Overloaded,
    SessionNotFound,
)
from .llama_runtime import LlamaRuntime
from .loop_poster import LoopPoster
from .metrics import EngineMetrics
from .runtime import Runtime
from .scheduler import BatchScheduler, Generation, Job
from .session_prompts import SessionPrompts
from .session_turns import SessionTurns
from .sessions import RequestRecord, SessionPage, SessionStore, StoredReply
from .settings import ServerSettings
from .store_access import StoreAccess
from .tool_formats import ToolPlan, plan, with_tool_calls
from .validation import resolve_completion_sampling, resolve_sampling

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# Longest wait between two looks for sessions past their TTL.
EXPIRY_INTERVAL_S = 60.0


class LlamaEngine:
    """``Engine`` on one llama.cpp model, with continuous batching.

    Requests of different sessions are generated together by a
    ``BatchScheduler`` (``N_SLOTS`` at a time, more wait in arrival order, up
    to ``MAX_QUEUE``; past that, ``Overloaded``). Requests of one session take
    turns, since each turn's prompt holds the previous one's reply. Nothing of
    llama.cpp runs on the event loop.

    The session store is used from one thread of its own, in the order of the
    calls (``store_access.StoreAccess``). A turn's exchange is committed (and
    for a durable store, on disk) before its ``ChatResult`` is yielded, and
    only if the session's history is still the one its prompt was built from
    (a clear or another replica's turn in between: ``HistoryChanged``,
    nothing kept). A turn with a request id
    that its session keeps already is answered the kept reply, not generated.

    Health: ``unavailable_reason()`` says why a chat cannot succeed now (the
    model is loading, the scheduler failed, the store cannot be written), and
    ``health_changed()`` wakes when that may have changed. A failed write (or
    a failed read of a turn) marks the store unavailable until a write
    succeeds again; clears and reads go on meanwhile, so that space can be
    freed. A scheduler that dies resolves ``failed``: nothing
    more can be generated, and the process should exit to be restarted.
    """

    def __init__(
        self,
        settings: ServerSettings,
        store: SessionStore,
        load_runtime: Callable[[], LlamaRuntime],
        *,
        model_name: str = "model",
    ) -> None:
        self._settings = settings
        self._prompts = SessionPrompts(settings.system_prompt)
        self._model_name = model_name
        self._store = store
        self._stores = StoreAccess(store, self._health_changes)
        self._expiry: asyncio.Task[None] | None = None
        self._closed = False
        self._scheduler = BatchScheduler(
            load_runtime,
            saved_state_bytes=settings.kv_cache_ram_mib * 1024 * 1024,
            on_failure=self._scheduler_failed,
            shared_start=self._conversation_start,
        )
        self._runtime: LlamaRuntime | None = None
        """The model while it serves (``None`` while loading, once failed or closing)."""
        self._loaded: LlamaRuntime | None = None
        # Tokenizations running on worker threads: the model is freed only after them.
        self._tokenizing = 0
        self._tokenized = asyncio.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._poster: LoopPoster | None = None
        """How the scheduler's thread hands pieces and results to the loop."""
        self.failed: asyncio.Future[EngineFailed] | None = None
        """Resolved when the scheduler stops on an unexpected error (after ``load``)."""
        self._health_event = asyncio.Event()
        self.metrics = EngineMetrics(model_name, restarts=settings.supervisor_restarts)
        self._session_turn = SessionTurns()
        self.metrics.track_load(
            running=lambda: self._scheduler.running,
            waiting=lambda: self._scheduler.waiting,
            waiting_for_session=lambda: self._session_turn.waiting,
        )
        self._capacity = settings.n_slots + settings.max_queue
        self._in_flight = 0

    async def load(self) -> None:
        """Load the model on the scheduler's thread; the engine is ready afterwards.

        Raises ``ModelLoadError`` if llama.cpp cannot load the file.
        """
        self._loop = asyncio.get_running_loop()
        self.failed = self._loop.create_future()
        self._poster = LoopPoster(self._loop)
        try:
            runtime = await asyncio.wrap_future(self._scheduler.start())
        except (ValueError, RuntimeError, OSError) as error:
            raise ModelLoadError(f"Could not load the model: {error}") from error
        self._runtime = self._loaded = cast(LlamaRuntime, runtime)
        self._health_changes()
        if self._settings.session_ttl_s:
            self._expiry = asyncio.create_task(self._expire_sessions())

    @property
    def shared_start_tokens(self) -> int:
        """How many prompt tokens every new conversation finds cached (the chat
        template's preamble and the system prompt), once loaded."""
        return self._scheduler.shared_start_tokens

    def _scheduler_failed(self, failure: EngineFailed) -> None:
        """On the scheduler's thread, as it ends on an unexpected error."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._note_failure, failure)

    def _note_failure(self, failure: EngineFailed) -> None:
        self._runtime = None
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(failure)
        self._health_changes()

    def _health_changes(self) -> None:
        self._health_event.set()
        self._health_event = asyncio.Event()

    def health_changed(self) -> Awaitable[bool]:
        """Resolves once ``unavailable_reason()`` may have changed since this call."""
        return self._health_event.wait()

    def unavailable_reason(self) -> str | None:
        """Why a chat cannot succeed now; ``None`` when it can."""
        if self.failed is not None and self.failed.done():
            return str(self.failed.result())
        if self._runtime is None:
            return str(EngineNotReady())
        return self._stores.problem

    async def aclose(self) -> None:
        """End what still runs (as cancelled), free the model, stop the threads,
        close the session store. Closing again does nothing."""
        if self._closed:
            return
        self._closed = True
        self._runtime = None
        if self._expiry is not None:
            self._expiry.cancel()
        self._stores.refuse()
        async with self._tokenized:
            await self._tokenized.wait_for(lambda: self._tokenizing == 0)
        await asyncio.to_thread(self._scheduler.stop)
        if self._poster is not None:
            await asyncio.to_thread(self._poster.close)  # the jobs' last callbacks
        if self._scheduler.failure is not None and self._loaded is not None:
            self._loaded.close()  # a scheduler that failed left the model to us
        await self._stores.close()  # after the calls already queued

    async def _with_model(self, call: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run something that reads the model (tokenizing, checking a grammar)
        on a worker thread; ``aclose`` frees the model only once none runs."""
        self._tokenizing += 1
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        finally:
            self._tokenizing -= 1
            async with self._tokenized:
                self._tokenized.notify_all()

    def _forget_kv(self, sessions: list[SessionKey]) -> None:
        for session in sessions:
            self._scheduler.forget_session(session)

    async def _expire_sessions(self) -> None:
        interval = min(EXPIRY_INTERVAL_S, self._settings.session_ttl_s / 2)
        while True:
            await asyncio.sleep(interval)
            try:
                expired = await self._stores.write(self._store.expire)
            except Exception:  # a failing disk must not end the expiry for good
                log.exception("removing expired sessions failed")
                continue
            if expired:
                log.info(
                    "removed %d sessions unused for over %gs",
                    len(expired),
                    self._settings.session_ttl_s,
                )
                self._forget_kv(expired)

    def _require_runtime(self) -> LlamaRuntime:
        if self.failed is not None and self.failed.done():
            raise self.failed.result()
        if self._runtime is None:
            raise EngineNotReady()
        return self._runtime

    def _conversation_start(self, runtime: Runtime) -> list[int]:
        """The tokens every new conversation's prompt begins with (from the
        settings, never from a user): the scheduler's shared start."""
        return self._prompts.start(cast(LlamaRuntime, runtime))

    @staticmethod
    def _tokenize_conversation(
        runtime: LlamaRuntime, tools: ToolPlan, request: CompletionRequest
    ) -> list[int]:
        """A whole conversation's prompt (as the tool plan renders it), or a
        raw prompt's (with a suffix, in the model's fill-in-the-middle form);
        it must leave room for one token."""
        if request.prompt is not None:
            prompt = runtime.tokenize_raw(request.prompt, request.suffix)
        else:
            prompt = runtime.tokenize_chat(tools.messages, tools.tools)
        if len(prompt) >= runtime.n_ctx:
            param = "prompt" if request.prompt is not None else "messages"
            raise ContextOverflow(len(prompt), runtime.n_ctx, param=param)
        return prompt

    @asynccontextmanager
    async def _admitted(self) -> AsyncIterator[None]:
        """Count a request in flight; ``Overloaded`` past ``N_SLOTS + MAX_QUEUE``."""
        if self._in_flight >= self._capacity:
            raise Overloaded(self._capacity)
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def chat_stream(self, request: ChatRequest) -> AsyncGenerator[ChatEvent, None]:
        arrived = time.monotonic()
        runtime = self._require_runtime()
        sampling = resolve_sampling(request, self._settings, runtime.n_ctx)
        session = (request.tenant, request.session_id or str(uuid.uuid4()))
        # The session's turn first: a turn waiting for it takes no capacity.
        async with (
            self._session_turn.hold(session),
            self._admitted(),
            aclosing(self._chat_turn(runtime, request, sampling, session, arrived)) as events,
        ):
            async for event in events:
                yield event

    async def _chat_turn(
        self,
        runtime: LlamaRuntime,
        request: ChatRequest,
        sampling: Sampling,
        session: SessionKey,
        arrived: float,
    ) -> AsyncGenerator[ChatEvent, None]:
        # The history and its version: the exchange is kept only if the session
        # is still at this version when it is committed (a clear, or another
        # replica's turn, in between: HistoryChanged, and nothing is kept).
        history = await self._stores.read(self._store.read, *session, request.request_id)
        if history.replay is not None:  # a retry of a turn already kept: no second one
            if history.replay.message != request.message:
                raise InvalidRequest(
                    "request_id was used already in this session, for another message: "
                    "a retry sends the same message, a new turn needs a new id",
                    param="request_id",
                )
            if history.replay.text:
                yield TextDelta(history.replay.text)
            yield _replayed(session[1], history.replay)
            return
        prompt = await self._with_model(
            self._prompts.fit, runtime, history.exchanges, request.message
        )
        sampling = await self._with_model(constrained, sampling, request.sampling, runtime)
        generation = self._generate(prompt, sampling, session, session[0], arrived)
        async with aclosing(generation) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    yield event
                    continue
                if event.finish_reason is not FinishReason.CANCELLED:
                    record = (
                        RequestRecord(
                            request.request_id,
                            event.finish_reason.value,
                            event.completion_tokens,
                        )
                        if request.request_id
                        else None
                    )
                    exchange = Exchange(request.message, event.text)
                    kept = self._stores.write(
                        self._commit, session, exchange, history.version, record
                    )
                    try:
                        self._forget_kv(await kept)
                    except HistoryChanged:
                        if (earlier := await self._kept_reply(session, request)) is None:
                            raise
                        # Another attempt of this very turn (a retry on another
                        # replica) was kept first: its reply is the answer.
                        yield _replayed(session[1], earlier)
                        return
                yield _result(session[1], prompt, event)

    async def _kept_reply(self, session: SessionKey, request: ChatRequest) -> StoredReply | None:
        """The reply the session keeps for this request's id and message, if any."""
        if not request.request_id:
            return None
        kept = await self._stores.read(self._store.read, *session, request.request_id)
        replay = kept.replay
        return replay if replay is not None and replay.message == request.message else None

    async def complete_stream(self, request: CompletionRequest) -> AsyncGenerator[ChatEvent, None]:
        arrived = time.monotonic()
        runtime = self._require_runtime()
        sampling = resolve_completion_sampling(request, self._settings, runtime.n_ctx)
        tools = await asyncio.to_thread(  # a schema's grammar can take a while
            plan,
            runtime.tool_format,
            request.messages,
            request.tools,
            request.tool_choice,
            request.parallel_tool_calls,
        )
        if tools.reads_calls and request.stop:
            raise InvalidRequest(
                "stop cannot be combined with tools: it could cut a call short", param="stop"
            )
        async with self._admitted():
            prompt = await self._with_model(self._tokenize_conversation, runtime, tools, request)
            sampling = await self._with_model(
                constrained, sampling, request.sampling, runtime, tools.grammar
            )
            generation = self._generate(
                prompt, sampling, None, request.tenant, arrived, request.stop
            )
            async with aclosing(generation) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        if not tools.reads_calls:  # else told whole at the end
                            yield event
                        continue
                    result = _result(None, prompt, event)
                    if tools.reads_calls:
                        result = with_tool_calls(
                            result, runtime.tool_format, tools.grammar is not None
                        )
                        if result.text:
                            yield TextDelta(result.text)
                    yield result

    async def complete(self, request: CompletionRequest) -> ChatResult:
        return await collect(self.complete_stream(request))

    async def _generate(
        self,
        prompt: list[int],
        sampling: Sampling,
        session: SessionKey | None,
        tenant: str,
        arrived: float,
        stop: tuple[str, ...] = (),
    ) -> AsyncGenerator[TextDelta | Generation, None]:
        """Run one job on the scheduler: its pieces as ``TextDelta``s, then its
        ``Generation``. Closing early cancels it within one token. The reply
        ends before the first of the ``stop`` sequences (see ``Job``)."""
        loop = asyncio.get_running_loop()
        poster = self._poster
        assert poster is not None  # made by load(), before any runtime
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        outcome: asyncio.Future[Generation] = loop.create_future()
        timing = _Timing(arrived)
        # Measured and logged when it ends, also if the stream was closed before that.
        session_id = session[1] if session is not None else None
        outcome.add_done_callback(partial(self._finished, session_id, len(prompt), timing))

        def on_piece(piece: str) -> None:  # on the scheduler's thread, as each token comes
            timing.token(time.monotonic(), self.metrics)
            poster.post(pieces.put_nowait, piece)

        def on_done(result: Generation | BaseException) -> None:
            poster.post(_settle, outcome, result)
            poster.post(pieces.put_nowait, None)

        job = Job(
            session=session,
            prompt=prompt,
            sampling=sampling,
            on_piece=on_piece,
            on_done=on_done,
            stop=stop,
            tenant=tenant,
        )
        self._scheduler.submit(job)
        try:
            ended = False
            while not ended and (piece := await pieces.get()) is not None:
                # Pieces that came while the last one was being sent go out as
                # one (a loop that fell behind catches up); none is waited for.
                parts = [piece]
                while not pieces.empty():
                    if (more := pieces.get_nowait()) is None:
                        ended = True
                        break
                    parts.append(more)
                yield TextDelta(parts[0] if len(parts) == 1 else "".join(parts))
        finally:
            # Closed early (client gone): stop generating within one token.
            job.cancelled.set()
            self._scheduler.wake()
        yield await outcome

    def _finished(
        self,
        session_id: str | None,
        prompt_tokens: int,
        timing: _Timing,
        outcome: asyncio.Future[Generation],
    ) -> None:
        """Metrics and one log line per generation (a failure is logged where
        it is reported)."""
        if outcome.cancelled() or outcome.exception() is not None:
            return
        generation = outcome.result()
        duration = time.monotonic() - timing.arrived
        self.metrics.observe_finished(generation, prompt_tokens, duration)
        fields = {
            "session": session_id or "-",
            "finish": generation.finish_reason.value,
            "prompt_tokens": prompt_tokens,
            "cached_tokens": generation.cached_tokens,
            "completion_tokens": generation.completion_tokens,
            "queue_s": round(generation.queue_time_s, 4),
            "ttft_s": None if timing.first is None else round(timing.first - timing.arrived, 4),
            "duration_s": round(duration, 4),
        }
        log.info(
            "generation %s",
            " ".join(f"{key}={value}" for key, value in fields.items()),
            extra=fields,
        )

    async def chat(self, request: ChatRequest) -> ChatResult:
        return await collect(self.chat_stream(request))

    def _commit(
        self,
        session: SessionKey,
        exchange: Exchange,
        version: int,
        request: RequestRecord | None,
    ) -> list[SessionKey]:
        """On the store's thread: keep a finished turn if its session is still
        at ``version`` (else ``HistoryChanged``, and the KV cells built on the
        old history go); returns the sessions evicted to make room."""
        try:
            return self._store.append(*session, exchange, expected_version=version, request=request)
        except HistoryChanged:
            self._scheduler.forget_session(session)
            raise

    async def clear(self, session_id: str, tenant: str = DEFAULT_TENANT) -> None:
        await self._stores.call(self._store.delete, tenant, session_id)
        self._scheduler.forget_session((tenant, session_id))

    async def history(self, session_id: str, tenant: str = DEFAULT_TENANT) -> list[Exchange]:
        history = await self._stores.call(self._store.history, tenant, session_id)
        if history is None:
            raise SessionNotFound(session_id)
        return history

    async def list_sessions(
        self, tenant: str = DEFAULT_TENANT, limit: int = MAX_PAGE, cursor: str | None = None
    ) -> SessionPage:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        return await self._stores.call(self._store.list_sessions, tenant, limit, cursor)

    def model_info(self) -> ModelInfo:
        runtime = self._runtime
        return ModelInfo(
            id=self._model_name,
            context_size=runtime.n_ctx if runtime is not None else self._settings.n_ctx,
            loaded=runtime is not None,
            unavailable_reason=self.unavailable_reason(),
            details=runtime.details() if runtime is not None else None,
        )

    async def metrics_text(self) -> str:
        sessions = await self._stores.call(self._store.count) if not self._closed else 0
        return self.metrics.exposition(sessions)


def _settle(future: asyncio.Future[Generation], result: Generation | BaseException) -> None:
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


class _Timing:
    """When a request arrived and its tokens came (``time.monotonic()``)."""

    def __init__(self, arrived: float) -> None:
        self.arrived = arrived
        self.first: float | None = None
        self.last: float | None = None

    def token(self, now: float, metrics: EngineMetrics) -> None:
        if self.last is None:
            self.first = now
            metrics.time_to_first_token.observe(now - self.arrived)
        else:
            metrics.inter_token_latency.observe(now - self.last)
        self.last = now


def _replayed(session_id: str, reply: StoredReply) -> ChatResult:
    """The result of a retried turn: the reply kept for its request id."""
    return ChatResult(
        session_id=session_id,
        text=reply.text,
        finish_reason=FinishReason(reply.finish_reason),
        prompt_tokens=0,
        completion_tokens=reply.completion_tokens,
    )


def _result(session_id: str | None, prompt: list[int], generation: Generation) -> ChatResult:
    return ChatResult(
        session_id=session_id,
        text=generation.text,
        finish_reason=generation.finish_reason,
        prompt_tokens=len(prompt),
        completion_tokens=generation.completion_tokens,
        cached_prompt_tokens=generation.cached_tokens,
        logprobs=generation.logprobs,
    )
