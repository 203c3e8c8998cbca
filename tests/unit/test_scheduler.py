"""The batch scheduler on a scripted runtime (no model): llama.cpp's failure
returns, and the scheduler's own failure. (On the real model:
tests/integration/test_scheduler.py.)"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

import pytest

from inference_server.domain import FinishReason, Sampling
from inference_server.errors import EngineFailed, EngineNotReady, InvalidRequest, NoRoomInKvCache
from inference_server.runtime import NoTokenAllowed
from inference_server.scheduler import BatchScheduler, Generation, Job
from tests.helpers import settle
from tests.runtime_double import ScriptedRuntime, ScriptedSampler

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=20, seed=None)
TIMEOUT_S = 10


class Run:
    """A scheduler started on ``runtime``, and what its failure callback got."""

    def __init__(self, runtime: ScriptedRuntime, shared_start: list[int] | None = None) -> None:
        self.runtime = runtime
        self.failures: list[EngineFailed] = []
        self.scheduler = BatchScheduler(
            lambda: runtime,
            saved_state_bytes=1024,
            on_failure=self.failures.append,
            shared_start=None if shared_start is None else lambda loaded: list(shared_start),
        )
        self.scheduler.start().result(timeout=TIMEOUT_S)

    def submit(
        self,
        prompt: list[int],
        session: str | None = None,
        stop: tuple[str, ...] = (),
        on_piece: Callable[[str], None] = lambda piece: None,
        tenant: str = "tenant",
    ) -> Future[Generation]:
        done: Future[Generation] = Future()
        key = (tenant, session) if session is not None else None
        self.scheduler.submit(Job(key, prompt, GREEDY, on_piece, settle(done), stop=stop))
        return done


@pytest.fixture
def run() -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(runtime: ScriptedRuntime, shared_start: list[int] | None = None) -> Run:
        runs.append(Run(runtime, shared_start))
        return runs[-1]

    yield start
    for started in runs:
        started.scheduler.stop()


def test_jobs_of_a_batch_with_no_room_are_decoded_each_alone(run):
    runtime = ScriptedRuntime()
    # llama_decode returns 1 for any batch of two sequences.
    runtime.no_room = lambda entries: len({e.sequence for e in entries}) > 1
    started = run(runtime)
    first, second = started.submit([1, 2, 3]), started.submit([4, 5])
    for job in (first, second):
        generation = job.result(timeout=TIMEOUT_S)
        assert (generation.text, generation.finish_reason) == ("<10><11><12>", FinishReason.STOP)
    assert all(len({e.sequence for e in batch}) == 1 for batch in runtime.batches)
    assert started.failures == []


def test_a_job_with_no_room_even_alone_fails_alone_and_the_others_go_on(run):
    runtime = ScriptedRuntime()
    # Sequence 1 never fits (as a sequence whose cells are full).
    runtime.no_room = lambda entries: any(e.sequence == 1 for e in entries)
    started = run(runtime)
    first, second = started.submit([1, 2, 3]), started.submit([4, 5])
    assert first.result(timeout=TIMEOUT_S).text == "<10><11><12>"
    with pytest.raises(NoRoomInKvCache):
        second.result(timeout=TIMEOUT_S)
    assert started.failures == []
    runtime.no_room = lambda entries: False
    assert started.submit([6]).result(timeout=TIMEOUT_S).text == "<10><11><12>"


def test_a_token_piece_longer_than_256_bytes_arrives_whole(run):
    long_piece = "é" * 200  # 400 bytes in UTF-8
    runtime = ScriptedRuntime(reply=[10, 11], pieces={10: long_piece.encode()})
    generation = run(runtime).submit([1, 2]).result(timeout=TIMEOUT_S)
    assert generation.text == long_piece + "<11>"


def test_a_model_that_cannot_cut_a_sequence_evaluates_the_next_turn_in_full(run):
    runtime = ScriptedRuntime(n_sequences=1, reply=[10])
    runtime.cuts = False
    started = run(runtime)
    started.submit([1, 2, 3], session="a").result(timeout=TIMEOUT_S)
    turns = len(runtime.batches)
    # The next turn shares [1, 2] but not 3: the cells cannot be cut after 2.
    generation = started.submit([1, 2, 7, 8], session="a").result(timeout=TIMEOUT_S)
    assert generation.cached_tokens == 0
    prompt_batch = runtime.batches[turns]
    assert [(e.token, e.position) for e in prompt_batch] == [(1, 0), (2, 1), (7, 2), (8, 3)]
    assert generation.text == "<10>"


def test_an_unexpected_error_fails_every_job_and_stops_the_scheduler(run):
    runtime = ScriptedRuntime(n_sequences=1)
    runtime.sample_error = ValueError("a bug on the scheduler's thread")
    started = run(runtime)
    running, waiting = started.submit([1, 2]), started.submit([3, 4])
    for job in (running, waiting):
        with pytest.raises(EngineFailed, match="a bug on the scheduler's thread"):
            job.result(timeout=TIMEOUT_S)
    assert [type(f) for f in started.failures] == [EngineFailed]
    assert isinstance(started.scheduler.failure, ValueError)
    # Left open: the engine frees it once no other thread tokenizes with it.
    assert not runtime.closed
    with pytest.raises(EngineNotReady):
        started.submit([5])


def test_a_job_whose_admission_fails_unexpectedly_is_told_too(run):
    runtime = ScriptedRuntime(n_sequences=1)

    def broken_sampler(sampling: Sampling) -> ScriptedSampler:
        raise RuntimeError("no sampler today")

    runtime.sampler = broken_sampler  # type: ignore[method-assign]
    started = run(runtime)
    with pytest.raises(EngineFailed, match="no sampler today"):
        started.submit([1, 2]).result(timeout=TIMEOUT_S)


def test_a_refused_sampler_or_a_grammar_dead_end_fails_that_job_alone(run):
    runtime = ScriptedRuntime(n_sequences=1)
    make = runtime.sampler
    refusals = iter([True, False, False])

    def sometimes(sampling: Sampling) -> ScriptedSampler:
        if next(refusals):
            raise ValueError("the grammar does not compile")
        return make(sampling)

    runtime.sampler = sometimes  # type: ignore[method-assign]
    started = run(runtime)
    with pytest.raises(InvalidRequest, match="does not compile"):
        started.submit([1, 2]).result(timeout=TIMEOUT_S)
    runtime.sample_error = NoTokenAllowed("the grammar allows no next token")
    with pytest.raises(InvalidRequest, match="allows no next token"):
        started.submit([3, 4]).result(timeout=TIMEOUT_S)
    runtime.sample_error = None
    assert started.submit([5]).result(timeout=TIMEOUT_S).text == "<10><11><12>"
    assert started.failures == [] and started.scheduler.failure is None


def test_a_cancelled_job_ends_as_cancelled_and_frees_its_sampler(run):
    runtime = ScriptedRuntime(n_sequences=1, reply=list(range(10, 30)))
    started = run(runtime)
    done: Future[Generation] = Future()
    pieces: list[str] = []

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 2:
            job.cancelled.set()

    job = Job(None, [1, 2], GREEDY, on_piece, settle(done))
    started.scheduler.submit(job)
    generation = done.result(timeout=TIMEOUT_S)
    assert (generation.finish_reason, generation.completion_tokens) == (FinishReason.CANCELLED, 2)
    assert runtime.samplers[0].closed


def prompt_entries(runtime: ScriptedRuntime, sequence: int) -> list[tuple[int, int]]:
    """(token, position) of every entry of ``sequence`` that did not ask for logits."""
    return [
        (e.token, e.position)
        for batch in runtime.batches
        for e in batch
        if e.sequence == sequence and not e.wants_logits
    ]


def test_jobs_wait_for_a_free_slot_and_are_admitted_oldest_first(run):
    runtime = ScriptedRuntime(n_sequences=1, reply=[10])
    started = run(runtime)
    finished: list[str] = []
    jobs = []
    for name, prompt in (("a", [1, 2]), ("b", [3, 4]), ("c", [5, 6])):
        job = started.submit(prompt)
        job.add_done_callback(lambda _, name=name: finished.append(name))
        jobs.append(job)
    for job in jobs:
        assert job.result(timeout=TIMEOUT_S).text == "<10>"
    assert finished == ["a", "b", "c"]
    # One sequence: no batch ever held two jobs' tokens.
    assert all(len({e.sequence for e in batch}) == 1 for batch in runtime.batches)


def test_a_long_prompt_is_evaluated_in_chunks_while_other_jobs_go_on_generating(run):
    runtime = ScriptedRuntime(n_sequences=2, n_batch=4, reply=list(range(10, 20)))
    started = run(runtime)
    long_prompt = list(range(30, 41))  # 11 tokens: chunks of 3 beside one generated token
    submitted = threading.Event()
    # Its pieces wait (on the scheduler's thread) until the long prompt is queued.
    generating = started.submit([1, 2], on_piece=lambda piece: submitted.wait(TIMEOUT_S))
    long_job = started.submit(long_prompt)
    submitted.set()
    assert generating.result(timeout=TIMEOUT_S).completion_tokens == 10
    assert long_job.result(timeout=TIMEOUT_S).completion_tokens == 10
    assert all(len(batch) <= 4 for batch in runtime.batches)
    chunked = [b for b in runtime.batches if any(e.token in long_prompt for e in b)]
    assert len(chunked) >= 3
    # While the long prompt was being evaluated, the other job kept its one
    # token in every batch, and each batch lists its sequences in order.
    for batch in chunked[:-1]:
        assert {e.sequence for e in batch} == {0, 1}
        assert [e.sequence for e in batch] == sorted(e.sequence for e in batch)
    assert [t for t, _ in prompt_entries(runtime, 1)] == long_prompt[:-1]


def test_a_stop_sequence_ends_the_reply_before_it_and_is_never_handed_on(run):
    runtime = ScriptedRuntime(
        n_sequences=1, reply=[10, 11, 12, 13], pieces={10: b"Hel", 11: b"lo E", 12: b"ND", 13: b"!"}
    )
    started = run(runtime)
    pieces: list[str] = []
    generation = started.submit([1], stop=("o END",), on_piece=pieces.append).result(
        timeout=TIMEOUT_S
    )
    assert generation.finish_reason is FinishReason.STOP
    assert generation.text == "".join(pieces) == "Hell"
    assert generation.completion_tokens == 3  # the last token was never generated


def test_the_shared_start_is_evaluated_once_and_each_new_conversation_begins_from_it(run):
    runtime = ScriptedRuntime(n_sequences=2, reply=[10])
    started = run(runtime, shared_start=[1, 2, 3, 4])
    assert prompt_entries(runtime, 0) == [(1, 0), (2, 1), (3, 2), (4, 3)]
    before = len(runtime.batches)
    first = started.submit([1, 2, 3, 4, 5, 6], session="a").result(timeout=TIMEOUT_S)
    second = started.submit([1, 2, 3, 4, 7, 8], session="b").result(timeout=TIMEOUT_S)
    assert (first.cached_tokens, second.cached_tokens) == (4, 4)
    prompts = [
        [(e.token, e.position) for e in batch]
        for batch in runtime.batches[before:]
        if not batch[-1].token == 10
    ]
    # Only what follows the shared start, at the positions after it.
    assert [(5, 4), (6, 5)] in prompts and [(7, 4), (8, 5)] in prompts
    # A prompt that begins otherwise (another system prompt) evaluates in full.
    other = started.submit([9, 2, 3], session="c").result(timeout=TIMEOUT_S)
    assert other.cached_tokens == 0
    assert [(e.token, e.position) for e in runtime.batches[-2]] == [(9, 0), (2, 1), (3, 2)]


def test_a_new_conversation_starts_from_the_longest_start_another_one_of_its_tenant_holds(run):
    runtime = ScriptedRuntime(n_sequences=3, reply=[10])
    started = run(runtime, shared_start=[1, 2])
    started.submit([1, 2, 3, 4, 5, 6], session="a").result(timeout=TIMEOUT_S)
    before = len(runtime.batches)
    # "a" keeps its slot: the cells of its first four tokens are copied.
    second = started.submit([1, 2, 3, 4, 7, 8], session="b").result(timeout=TIMEOUT_S)
    assert second.cached_tokens == 4
    assert [(e.token, e.position) for e in runtime.batches[before]] == [(7, 4), (8, 5)]
    # Another tenant gets the shared start only.
    other = started.submit([1, 2, 3, 4, 7, 8], session="c", tenant="other").result(
        timeout=TIMEOUT_S
    )
    assert other.cached_tokens == 2
    # "a" is unchanged: its next turn finds all its cells.
    again = started.submit([1, 2, 3, 4, 5, 6, 10, 11], session="a").result(timeout=TIMEOUT_S)
    assert again.cached_tokens == 7


def test_without_the_shared_start_nothing_is_lost_but_time(run):
    refused = ScriptedRuntime(n_sequences=1, reply=[10])
    refused.restores = False
    generation = run(refused, shared_start=[1, 2, 3]).submit([1, 2, 3, 4]).result(timeout=TIMEOUT_S)
    assert generation.cached_tokens == 0 and generation.text == "<10>"

    no_room = ScriptedRuntime(n_sequences=1, reply=[10])
    no_room.no_room = lambda entries: not entries[-1].wants_logits  # only the shared start
    started = run(no_room, shared_start=[1, 2, 3])
    generation = started.submit([1, 2, 3, 4]).result(timeout=TIMEOUT_S)
    assert generation.cached_tokens == 0 and generation.text == "<10>"
    assert started.failures == []


def test_a_shared_start_that_cannot_be_made_leaves_the_model_serving():
    def cannot(loaded: object) -> list[int]:
        raise ValueError("this template raises on a system message")

    runtime = ScriptedRuntime(n_sequences=1, reply=[10])
    scheduler = BatchScheduler(lambda: runtime, saved_state_bytes=0, shared_start=cannot)
    try:
        scheduler.start().result(timeout=TIMEOUT_S)
        done: Future[Generation] = Future()
        scheduler.submit(Job(None, [1, 2], GREEDY, lambda piece: None, settle(done)))
        generation = done.result(timeout=TIMEOUT_S)
        assert (generation.text, generation.cached_tokens) == ("<10>", 0)
        assert scheduler.shared_start_tokens == 0
    finally:
        scheduler.stop()
