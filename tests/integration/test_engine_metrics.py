"""The engine's load gauges and counters on the real model: what a scrape
reads while requests run and wait, and after they end."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

from prometheus_client.parser import text_string_to_metric_families

from inference_server.domain import (
    ChatRequest,
    CompletionRequest,
    FinishReason,
    Message,
    Role,
    SamplingParams,
)
from inference_server.engine import LlamaEngine


def ask(message: str, session_id: str) -> ChatRequest:
    sampling = SamplingParams(temperature=0.0, max_tokens=300)
    return ChatRequest(message=message, session_id=session_id, sampling=sampling)


async def read(engine: LlamaEngine) -> dict[str, float]:
    """Each sample of the engine's metrics by name, labels other than the model's joined in."""
    found = {}
    for family in text_string_to_metric_families(await engine.metrics_text()):
        for sample in family.samples:
            labels = ",".join(
                f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name"
            )
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def until(engine: LlamaEngine, **expected: float) -> dict[str, float]:
    """Scrape until the samples read ``expected`` (the gauges follow the
    scheduler's steps, the counters the engine's callbacks)."""
    for _ in range(200):
        found = await read(engine)
        if all(found.get(f"llamachat:{name}") == value for name, value in expected.items()):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {expected}: {found}")


async def test_running_and_waiting_gauges_follow_the_slots(make_engine):
    engine = await make_engine(n_slots=1)
    first = engine.chat_stream(ask("Write a long poem.", "running"))
    second = engine.chat_stream(ask("Write another long poem.", "waiting"))
    async with aclosing(first) as running, aclosing(second) as waiting:
        await anext(running)  # the one slot is taken
        queued = asyncio.ensure_future(anext(waiting))
        await until(engine, num_requests_running=1, num_requests_waiting=1)
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
    await until(engine, num_requests_running=0, num_requests_waiting=0)
    # Both ended cancelled (counted once the engine has seen them end).
    found = await until(engine, **{"request_success_total{finished_reason=abort}": 2})
    assert found["llamachat:generation_tokens_total"] >= 1
    assert found["llamachat:prompt_tokens_total"] == found["llamachat:prefix_cache_queries_total"]
    assert found["llamachat:sessions"] == 0  # nothing finished, nothing kept


async def test_prompt_tokens_count_only_prompts_that_were_evaluated(make_engine):
    engine = await make_engine(n_slots=1)
    done = await engine.chat(ask("Hi", "one"))
    first = engine.chat_stream(ask("Write a long poem.", "long"))
    async with aclosing(first) as running:
        await anext(running)
        never = engine.chat_stream(ask("A question never asked.", "never"))
        async with aclosing(never) as waiting:
            queued = asyncio.ensure_future(anext(waiting))
            await until(engine, num_requests_waiting=1)
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
        running_prompt = (await read(engine))["llamachat:prompt_tokens_total"]
    # Counted once the engine has seen both end (after the scheduler's gauges).
    found = await until(engine, **{"request_success_total{finished_reason=abort}": 2})
    # "one" finished, "never" never had a slot: only "one" (and "long", once it
    # ends) are counted.
    assert running_prompt == done.prompt_tokens
    assert found["llamachat:prompt_tokens_total"] > done.prompt_tokens
    assert found["llamachat:sessions"] == 1


async def test_a_stop_sequence_ends_the_reply_as_stop_in_result_usage_and_metrics(make_engine):
    engine = await make_engine()
    conversation = (Message(Role.USER, "Name a colour."),)
    sampling = SamplingParams(temperature=0.0, max_tokens=24)
    whole = await engine.complete(CompletionRequest(conversation, sampling))
    words = whole.text.split()
    assert len(words) >= 3, whole.text
    stop = f" {words[2]}"
    request = CompletionRequest(conversation, sampling, stop=(stop,))
    cut = await engine.complete(request)
    again = await engine.complete(request)
    assert cut.text == whole.text[: whole.text.index(stop)]
    assert cut.finish_reason is FinishReason.STOP
    # Nothing is generated past the token that completed the stop sequence.
    assert cut.completion_tokens == again.completion_tokens < whole.completion_tokens
    found = await read(engine)
    assert found["llamachat:request_success_total{finished_reason=stop}"] >= 2
    assert "llamachat:request_success_total{finished_reason=abort}" not in found
