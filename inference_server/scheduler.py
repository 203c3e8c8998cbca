"""Continuous batching on one llama.cpp context, with per-session KV reuse.

``BatchScheduler`` owns the runtime (a ``runtime.Runtime``: ``LlamaRuntime``,
or a scripted double in the unit tests) and the one thread that calls it.
Each step of its loop:

1. settles what other threads asked for (new jobs, cancellations, sessions to
   forget);
2. admits waiting jobs, oldest first, to free sequence slots (see
   ``slots.SlotTable`` for which slot a job gets and what it reuses);
3. plans one batch: the next token of every generating job, then chunks of
   the prompts still being evaluated, up to ``n_batch`` tokens in all, so a
   long prompt never freezes the running streams for longer than one chunk;
4. decodes it; when llama.cpp finds no room in the KV cache for the whole
   batch, each job's part is decoded alone, and a job that does not fit even
   so fails alone (as llama.cpp's server shrinks its batch);
5. applies the result: samples each job that has logits with its own sampler
   chain and hands the pieces to the job's callback.

An unexpected error on the thread (one that no job can be blamed for) ends
it: every job gets ``EngineFailed`` and ``on_failure`` is called, so that the
process can say it no longer serves and exit to be restarted.

Before its first step it may evaluate a *shared start*: the tokens that
every new conversation begins with (a chat template's preamble and the system
prompt, which the engine derives from the server's settings, never from what
a user sent); ``SlotTable`` copies their cells into each new conversation's
slot, which then evaluates only the rest of its prompt.

It knows nothing of asyncio, gRPC or HTTP: jobs carry plain callbacks that the
engine points at its event loop.
"""

from __future__ import annotations

import codecs
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from .domain import DEFAULT_TENANT, FinishReason, Sampling, SessionKey, TokenLogprob
from .errors import EngineFailed, EngineNotReady, InvalidRequest, NoRoomInKvCache
from .runtime import BatchEntry, DecodeFailed, NoKvSlot, NoTokenAllowed, Runtime, TokenSampler
from .slots import Slot, SlotTable
from .stop_sequences import StopSequences

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Generation:
    """What one job produced."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int
    cached_tokens: int
    """Prompt tokens found in the KV cache, not evaluated again."""
    queue_time_s: float = 0.0
    """Time from ``submit`` until a slot was free (until the end if it never was)."""
    admitted: bool = True
    """Whether it had a slot (its prompt was looked up and evaluated)."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """Per generated token, when the job's sampling asked for them."""


@dataclass(eq=False)
class Job:
    """One generation: a prompt for a session's sequence, and where its output goes.

    ``on_piece`` gets each decoded piece of text (whole UTF-8 characters) and
    ``on_done`` the ``Generation`` or the exception that ended it; both are
    called on the scheduler's thread. ``cancelled`` may be set from any thread
    (then call ``BatchScheduler.wake``): the job ends before its next token.
    With ``stop`` sequences, the reply ends (STOP) before the first of them,
    and text that may begin one is held back until the next tokens tell.
    """

    session: SessionKey | None
    prompt: list[int]
    sampling: Sampling
    on_piece: Callable[[str], None]
    on_done: Callable[[Generation | BaseException], None]
    stop: tuple[str, ...] = ()
    tenant: str = DEFAULT_TENANT
    """Whose job it is: a job without a session shares cached cells only
    with earlier jobs of its own tenant."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = 0.0
    """``time.monotonic()`` at ``submit``."""

    def never_admitted(self) -> Generation:
        """How a job that ended before it had a slot ended."""
        waited = time.monotonic() - self.submitted_at
        return Generation("", FinishReason.CANCELLED, 0, 0, waited, admitted=False)


@dataclass(eq=False)
class _Running:
    """A job admitted to a slot, and its progress."""

    job: Job
    queue_time_s: float
    slot: Slot
    sampler: TokenSampler
    unevaluated: list[int]
    cached_tokens: int
    budget: int
    generated: int = 0
    next_token: int | None = None
    pieces: list[str] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    stops: StopSequences | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)

    def emit(self, token_bytes: bytes) -> None:
        """Hand on the text a token completes, but what may begin a stop sequence."""
        text = self.decoder.decode(token_bytes)
        self._hand_on(self.stops.feed(text) if self.stops is not None else text)

    @property
    def stopped(self) -> bool:
        """Whether the reply reached a stop sequence."""
        return self.stops is not None and self.stops.stopped

    def end(self) -> None:
        """Hand on what the decoder and the stop sequences still hold."""
        tail = self.decoder.decode(b"", final=True)
        if self.stops is None:
            self._hand_on(tail)
        elif not self.stops.stopped:
            self._hand_on(self.stops.feed(tail) + self.stops.flush())

    def _hand_on(self, text: str) -> None:
        if text:
            self.pieces.append(text)
            _notify(self.job.on_piece, text)


@dataclass
class _Plan:
    """One batch: its entries in decode order, which entries' logits each job
    samples from, and the tokens each job's slot holds once it is decoded."""

    entries: list[BatchEntry] = field(default_factory=list)
    sampled: list[tuple[_Running, int]] = field(default_factory=list)
    evaluated: list[tuple[_Running, list[int]]] = field(default_factory=list)

    def ordered(self) -> _Plan:
        """The same batch with each sequence's entries together, in increasing
        sequence order: llama.cpp computes sequences of separate KV streams
        together only so."""
        order = sorted(
            range(len(self.entries)),
            key=lambda i: (self.entries[i].sequence, self.entries[i].position),
        )
        index_of = {old: new for new, old in enumerate(order)}
        return _Plan(
            [self.entries[i] for i in order],
            [(item, index_of[index]) for item, index in self.sampled],
            self.evaluated,
        )

    def per_job(self) -> list[_Plan]:
        """One batch for each job's part of this one."""
        plans = []
        for item, tokens in self.evaluated:
            sequence = item.slot.sequence
            indexes = [i for i, entry in enumerate(self.entries) if entry.sequence == sequence]
            renumbered = {old: new for new, old in enumerate(indexes)}
            plans.append(
                _Plan(
                    [self.entries[i] for i in indexes],
                    [(job, renumbered[i]) for job, i in self.sampled if job is item],
                    [(item, tokens)],
                )
            )
        return plans


class BatchScheduler:
    """Runs every job on one llama.cpp context, many sequences per batch."""

    def __init__(
        self,
        load_runtime: Callable[[], Runtime],
        *,
        saved_state_bytes: int,
        on_failure: Callable[[EngineFailed], None] | None = None,
        shared_start: Callable[[Runtime], list[int]] | None = None,
    ) -> None:
        self._load_runtime = load_runtime
        self._shared_start = shared_start
        self._saved_state_bytes = saved_state_bytes
        self._on_failure = on_failure
        self.failure: BaseException | None = None
        """The error that ended the thread, if one did."""
        self._wakeup = threading.Condition()
        self._inbox: deque[Job] = deque()
        self._forget: deque[SessionKey] = deque()
        self._stopping = False
        self._loaded: Future[Runtime] = Future()
        self.running = 0
        """Jobs in a slot, as of the last step (read from any thread)."""
        self.waiting = 0
        """Jobs waiting for a slot, as of the last step (read from any thread)."""
        self.shared_start_tokens = 0
        """How many tokens the shared start kept (0: none), once loaded."""
        self._thread = threading.Thread(target=self._run, name="llama-scheduler", daemon=True)

    # --- any thread ------------------------------------------------------------

    def start(self) -> Future[Runtime]:
        """Start the thread; the future resolves once the model is loaded (or failed)."""
        self._thread.start()
        return self._loaded

    def submit(self, job: Job) -> None:
        """Queue a job; ``EngineNotReady`` once the scheduler is stopping."""
        with self._wakeup:
            if self._stopping:
                raise EngineNotReady()
            job.submitted_at = time.monotonic()
            self._inbox.append(job)
            self._wakeup.notify()

    def wake(self) -> None:
        """Have the loop look at its jobs again (after a ``cancelled.set()``)."""
        with self._wakeup:
            self._wakeup.notify()

    def forget_session(self, session: SessionKey) -> None:
        """Free a session's slot and saved state (it was cleared)."""
        with self._wakeup:
            self._forget.append(session)
            self._wakeup.notify()

    def stop(self) -> None:
        """End every job (as cancelled), free the model, and join the thread."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        if self._thread.is_alive():
            self._thread.join()

    # --- the scheduler's thread --------------------------------------------------

    def _run(self) -> None:
        try:
            runtime = self._load_runtime()
        except BaseException as error:  # handed to the waiting engine
            self._loaded.set_exception(error)
            return
        slots = SlotTable(runtime, saved_state_bytes=self._saved_state_bytes)
        if self._shared_start is not None:
            try:
                tokens = self._shared_start(runtime)
            except Exception:  # a template that cannot render it: serve without
                log.warning("no shared start of conversations: its tokens", exc_info=True)
                tokens = []
            try:
                if tokens:
                    self._evaluate_shared_start(runtime, slots, tokens)
            except BaseException as error:  # as a model that does not load
                runtime.close()
                self._loaded.set_exception(error)
                return
        self._loaded.set_result(runtime)
        waiting: deque[Job] = deque()
        running: list[_Running] = []
        failure: EngineFailed | None = None
        try:
            while True:
                with self._wakeup:
                    # Waiting jobs count too: when every running job ended in
                    # the last step, the next ones are admitted without a wakeup.
                    while not (self._stopping or self._inbox or self._forget or running or waiting):
                        self._wakeup.wait()
                    if self._stopping:
                        break
                    waiting.extend(self._inbox)
                    self._inbox.clear()
                    forget = list(self._forget)
                    self._forget.clear()
                for session in forget:
                    slots.forget(session)
                self._settle_cancelled(waiting, running)
                self._admit(runtime, slots, waiting, running)
                self.running, self.waiting = len(running), len(waiting)
                if running:
                    self._step(runtime, slots, running)
                    # Also before the loop sleeps, once the last job ended.
                    self.running = len(running)
        except Exception as error:  # the thread ends; each job and the process are told
            log.exception("the scheduler stopped on an unexpected error")
            self.failure = error
            failure = EngineFailed(error)
        finally:
            with self._wakeup:
                self._stopping = True  # submit() refuses from now on
                waiting.extend(self._inbox)
                self._inbox.clear()
            # The process hears of a failure before any job does.
            if failure is not None and self._on_failure is not None:
                _notify(self._on_failure, failure)
            for item in list(running):
                if failure is None:
                    self._finish(running, item, FinishReason.CANCELLED)
                else:
                    self._fail(running, item, failure)
            for job in waiting:
                _notify(job.on_done, job.never_admitted() if failure is None else failure)
            self.running = self.waiting = 0
            if failure is None:
                runtime.close()
            # Else the engine frees it once no other thread tokenizes with it.

    def _evaluate_shared_start(self, runtime: Runtime, slots: SlotTable, tokens: list[int]) -> None:
        """Evaluate the tokens every new conversation begins with once, before
        any job, for ``SlotTable`` to copy into the slot of each new one.

        Nothing is lost when llama.cpp refuses: each prompt is then evaluated
        in full, as it would be without a shared start.
        """
        slot = slots.slots[0]
        try:
            for start in range(0, len(tokens), runtime.n_batch):
                chunk = tokens[start : start + runtime.n_batch]
                runtime.decode(
                    [BatchEntry(t, start + i, slot.sequence, False) for i, t in enumerate(chunk)]
                )
        except (NoKvSlot, DecodeFailed) as error:
            log.warning("the shared start of conversations is not kept: %s", error)
            slots.invalidate(slot)
            return
        slot.tokens = list(tokens)
        slots.keep_shared_start(slot)
        self.shared_start_tokens = len(tokens)
        log.info("%d tokens that every new conversation begins with are kept", len(tokens))

    def _settle_cancelled(self, waiting: deque[Job], running: list[_Running]) -> None:
        for job in [job for job in waiting if job.cancelled.is_set()]:
            waiting.remove(job)
            _notify(job.on_done, job.never_admitted())
        for item in [item for item in running if item.job.cancelled.is_set()]:
            self._finish(running, item, FinishReason.CANCELLED)

    def _admit(
        self,
        runtime: Runtime,
        slots: SlotTable,
        waiting: deque[Job],
        running: list[_Running],
    ) -> None:
        while waiting:
            job = waiting[0]
            slot = slots.acquire(job.session, job.prompt, job.tenant)
            if slot is None:
                return  # every slot is busy; the oldest job waits for the first to free
            try:
                sampler = runtime.sampler(job.sampling)
            except ValueError as refused:  # checked before submit: not expected here
                waiting.popleft()
                slot.busy = False
                _notify(job.on_done, InvalidRequest(str(refused), param="grammar"))
                continue
            cached = slots.reuse_prefix(slot, job.prompt)
            # Taken off the queue only once admitted: if anything above raises,
            # the failure path still finds it there and tells it.
            admitted = _Running(
                job=job,
                queue_time_s=time.monotonic() - job.submitted_at,
                slot=slot,
                sampler=sampler,
                unevaluated=job.prompt[cached:],
                cached_tokens=cached,
                budget=min(job.sampling.max_tokens, runtime.n_ctx - len(job.prompt)),
                stops=StopSequences(job.stop) if job.stop else None,
            )
            waiting.popleft()
            running.append(admitted)

    def _step(self, runtime: Runtime, slots: SlotTable, running: list[_Running]) -> None:
        plan = self._plan(runtime, running).ordered()
        try:
            runtime.decode(plan.entries)
        except NoKvSlot as error:
            if len(plan.evaluated) == 1:
                self._fail_batch(slots, running, plan, NoRoomInKvCache(), error)
                return
            log.warning("%s; decoding each of its %d jobs alone", error, len(plan.evaluated))
            for alone in plan.per_job():
                self._execute_alone(runtime, slots, running, alone)
            return
        except DecodeFailed as error:
            self._fail_batch(slots, running, plan, error, error)
            return
        self._apply(runtime, running, plan)

    def _execute_alone(
        self, runtime: Runtime, slots: SlotTable, running: list[_Running], plan: _Plan
    ) -> None:
        try:
            runtime.decode(plan.entries)
        except NoKvSlot as error:
            self._fail_batch(slots, running, plan, NoRoomInKvCache(), error)
        except DecodeFailed as error:
            self._fail_batch(slots, running, plan, error, error)
        else:
            self._apply(runtime, running, plan)

    @staticmethod
    def _plan(runtime: Runtime, running: list[_Running]) -> _Plan:
        """The next token of every generating job, then prompt chunks, up to
        ``n_batch`` tokens; a prompt's last token asks for logits."""
        plan = _Plan()
        generating = [item for item in running if item.next_token is not None]
        prefilling = [item for item in running if item.next_token is None]
        for item in generating:
            token = item.next_token
            assert token is not None  # what makes it generating
            plan.sampled.append((item, len(plan.entries)))
            plan.entries.append(BatchEntry(token, len(item.slot.tokens), item.slot.sequence, True))
            plan.evaluated.append((item, [token]))
        for item in prefilling:
            room = runtime.n_batch - len(plan.entries)
            if room <= 0:
                break
            chunk, item.unevaluated = item.unevaluated[:room], item.unevaluated[room:]
            start = len(item.slot.tokens)
            for offset, token in enumerate(chunk):
                last = not item.unevaluated and offset == len(chunk) - 1
                if last:
                    plan.sampled.append((item, len(plan.entries)))
                plan.entries.append(BatchEntry(token, start + offset, item.slot.sequence, last))
            plan.evaluated.append((item, chunk))
        return plan

    def _fail_batch(
        self,
        slots: SlotTable,
        running: list[_Running],
        plan: _Plan,
        error: BaseException,
        cause: BaseException,
    ) -> None:
        """Each job of a batch that was not decoded ends with ``error``; their
        cells' content is unknown, so the slots are emptied."""
        log.error("llama_decode failed for %d jobs: %r", len(plan.evaluated), cause)
        for item, _ in plan.evaluated:
            slots.invalidate(item.slot)
            self._fail(running, item, error)

    def _apply(self, runtime: Runtime, running: list[_Running], plan: _Plan) -> None:
        """Record what the slots now hold, then sample every job that has logits."""
        for item, tokens in plan.evaluated:
            item.slot.tokens.extend(tokens)
        for item, index in plan.sampled:
            try:
                token = runtime.sample(item.sampler, index)
            except NoTokenAllowed as dead_end:
                self._fail(running, item, InvalidRequest(f"grammar: {dead_end}", param="grammar"))
                continue
            if runtime.is_end_of_generation(token):
                self._finish(running, item, FinishReason.STOP)
                continue
            if item.job.sampling.logprobs is not None:
                item.logprobs.append(runtime.logprobs(index, token, item.job.sampling.logprobs))
            item.generated += 1
            item.emit(runtime.piece(token))
            item.next_token = token
            if item.stopped:
                self._finish(running, item, FinishReason.STOP)
            elif item.generated >= item.budget:
                self._finish(running, item, FinishReason.LENGTH)

    def _release(self, running: list[_Running], item: _Running) -> None:
        running.remove(item)
        item.sampler.close()
        item.slot.busy = False

    def _finish(self, running: list[_Running], item: _Running, reason: FinishReason) -> None:
        self._release(running, item)
        item.end()
        generation = Generation(
            "".join(item.pieces),
            reason,
            item.generated,
            item.cached_tokens,
            item.queue_time_s,
            logprobs=tuple(item.logprobs),
        )
        _notify(item.job.on_done, generation)

    def _fail(self, running: list[_Running], item: _Running, error: BaseException) -> None:
        self._release(running, item)
        _notify(item.job.on_done, error)


def _notify(callback: Callable[[T], None], value: T) -> None:
    """Call a job's callback; one that raises must not stop the loop."""
    try:
        callback(value)
    except Exception:
        log.exception("a job's callback failed")
