"""The batch scheduler on the real model, driven directly with jobs."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import Future
from functools import partial

import pytest

from inference_server.assembly import load_runtime
from inference_server.domain import FinishReason, Sampling
from inference_server.model_files import default_model_path
from inference_server.scheduler import BatchScheduler, Generation, Job
from inference_server.settings import ServerSettings
from tests.helpers import settle

from .runtimes import RecordingRuntime

GREEDY = Sampling(temperature=0.0, top_p=1.0, max_tokens=200, seed=None)


@pytest.fixture
def scheduler() -> Iterator[BatchScheduler]:
    settings = ServerSettings(n_slots=2, n_batch=16)
    scheduler = BatchScheduler(
        partial(load_runtime, settings, default_model_path(), RecordingRuntime), saved_state_bytes=0
    )
    scheduler.start().result()
    yield scheduler
    scheduler.stop()


def run(scheduler: BatchScheduler, prompt: list[int], cancel_after_pieces: int) -> Generation:
    done: Future[Generation] = Future()
    pieces: list[str] = []

    def on_piece(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == cancel_after_pieces:
            job.cancelled.set()

    job = Job(None, prompt, GREEDY, on_piece, settle(done))
    scheduler.submit(job)
    generation = done.result(timeout=120)
    assert generation.text == "".join(pieces)
    return generation


def test_generation_stops_at_the_token_it_was_cancelled_at(scheduler):
    runtime = scheduler._loaded.result()
    prompt = runtime.tokenize_chat([{"role": "user", "content": "Write a long poem."}])
    generation = run(scheduler, prompt, cancel_after_pieces=3)
    assert generation.finish_reason is FinishReason.CANCELLED
    assert generation.completion_tokens == 3


def test_a_prompt_being_evaluated_stops_at_the_next_chunk(scheduler):
    runtime = scheduler._loaded.result()
    prompt = runtime.tokenize_chat([{"role": "user", "content": "word " * 300}])
    evaluated = threading.Event()
    original = runtime.decode

    def decode_then_cancel(entries):
        original(entries)
        evaluated.set()
        job.cancelled.set()  # after the first chunk of 16 tokens
        scheduler.wake()

    runtime.decode = decode_then_cancel
    done: Future[Generation] = Future()
    job = Job(None, prompt, GREEDY, lambda piece: None, settle(done))
    scheduler.submit(job)
    generation = done.result(timeout=120)
    runtime.decode = original
    assert evaluated.is_set()
    assert generation.finish_reason is FinishReason.CANCELLED
    assert generation.completion_tokens == 0
    assert len(runtime.batches) == 1  # one chunk of a prompt of 300+ tokens
    assert len(prompt) > 300


def test_jobs_waiting_when_every_running_job_ends_in_one_step_are_served():
    # 2 slots, 8 one-token jobs whose prompts fit in one batch: the running
    # pair ends in the same step while others wait, and those must be admitted
    # without any further submit or wakeup.
    settings = ServerSettings(n_slots=2, n_batch=512)
    scheduler = BatchScheduler(
        partial(load_runtime, settings, default_model_path(), RecordingRuntime), saved_state_bytes=0
    )
    runtime = scheduler.start().result()
    assert isinstance(runtime, RecordingRuntime)
    try:
        prompt = runtime.tokenize_chat([{"role": "user", "content": "Hi"}])
        one_token = Sampling(temperature=0.0, top_p=1.0, max_tokens=1, seed=None)
        done: list[Future[Generation]] = [Future() for _ in range(8)]
        for future in done:
            scheduler.submit(Job(None, prompt, one_token, lambda piece: None, settle(future)))
        generations = [future.result(timeout=60) for future in done]
    finally:
        scheduler.stop()
    assert [g.completion_tokens for g in generations] == [1] * 8
    assert max(len(batch) for batch in runtime.batches) == 2 * len(prompt)  # ended together
