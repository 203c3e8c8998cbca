"""The engine on the real default model: no fakes on this path."""

from __future__ import annotations

from contextlib import aclosing

import pytest

from inference_server.domain import (
    ChatRequest,
    ChatResult,
    FinishReason,
    SamplingParams,
    TextDelta,
)
from inference_server.errors import ContextOverflow, HistoryChanged
from inference_server.llama_runtime import LlamaRuntime

from .runtimes import FailingRuntime, RecordingRuntime


def ask(message: str, session_id: str | None = None, **sampling) -> ChatRequest:
    params = {"temperature": 0.0, "max_tokens": 40, **sampling}
    return ChatRequest(message=message, session_id=session_id, sampling=SamplingParams(**params))


def messages_of(exchanges: list[tuple[str, str]], message: str) -> list[dict[str, str]]:
    messages = []
    for user, assistant in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return [*messages, {"role": "user", "content": message}]


async def test_greedy_decoding_is_deterministic(engine, make_engine):
    first = await engine.chat(ask("What is the capital of France?"))
    second = await engine.chat(ask("What is the capital of France?"))
    other_engine = await make_engine()
    third = await other_engine.chat(ask("What is the capital of France?"))
    assert first.text  # the model said something
    assert first.text == second.text == third.text
    assert first.session_id != second.session_id


async def test_history_changes_the_answer(engine):
    opener = await engine.chat(ask("My name is Alice and I love astronomy."))
    follow_up = await engine.chat(ask("What is my name?", opener.session_id))
    fresh = await engine.chat(ask("What is my name?"))
    assert follow_up.prompt_tokens > fresh.prompt_tokens
    assert follow_up.text != fresh.text


async def test_the_window_keeps_exactly_the_last_five_exchanges(engine, tokenizer: LlamaRuntime):
    session = "window"
    said = []
    for turn in range(1, 8):
        result = await engine.chat(ask(f"Remember the number {turn}.", session, max_tokens=6))
        said.append((f"Remember the number {turn}.", result.text))
    kept = [(e.user, e.assistant) for e in engine._store.history("default", session)]
    assert kept == said[2:]  # exchanges 3 to 7
    last = await engine.chat(ask("Which numbers did I give you?", session, max_tokens=6))
    expected_prompt = tokenizer.tokenize_chat(
        messages_of(said[2:], "Which numbers did I give you?")
    )
    assert last.prompt_tokens == len(expected_prompt)


async def test_the_window_is_a_setting(make_engine):
    engine = await make_engine(history_exchanges=2)
    for turn in range(4):
        await engine.chat(ask(f"Message {turn}", "s", max_tokens=3))
    assert [e.user for e in engine._store.history("default", "s")] == ["Message 2", "Message 3"]


async def test_stream_and_non_stream_give_the_same_text_at_temperature_zero(engine):
    whole = await engine.chat(ask("Tell me a fact about the moon.", max_tokens=60))
    pieces, result = [], None
    async with aclosing(
        engine.chat_stream(ask("Tell me a fact about the moon.", max_tokens=60))
    ) as events:
        async for event in events:
            if isinstance(event, TextDelta):
                pieces.append(event.text)
            else:
                result = event
    assert len(pieces) > 1  # it really streamed
    assert result is not None
    assert "".join(pieces) == result.text == whole.text
    assert result.completion_tokens == whole.completion_tokens


async def test_max_tokens_bounds_the_reply(engine):
    result = await engine.chat(ask("Write a long story about a dragon.", max_tokens=5))
    assert result.completion_tokens == 5
    assert result.finish_reason is FinishReason.LENGTH
    longer = await engine.chat(ask("Write a long story about a dragon.", max_tokens=20))
    assert longer.text.startswith(result.text)
    assert len(longer.text) > len(result.text)


async def test_a_reply_that_ends_by_itself_says_stop(engine):
    result = await engine.chat(ask("Say hello.", max_tokens=300))
    assert result.finish_reason is FinishReason.STOP
    assert result.completion_tokens < 300


async def test_closing_a_stream_stops_generation_and_keeps_no_half_exchange(make_engine):
    engine = await make_engine(RecordingRuntime, n_slots=1)
    stream = engine.chat_stream(ask("Write a long poem.", "cut", max_tokens=200))
    async with aclosing(stream) as events:
        received = [await anext(events) for _ in range(3)]
    assert all(isinstance(event, TextDelta) for event in received)
    after = await engine.chat(ask("What is the capital of France?"))  # needs the one slot
    assert after.completion_tokens > 0
    # Batches: the shared start, the poem's prompt, one per generated token,
    # then the next prompt.
    sizes = [len(batch) for batch in engine._runtime.batches[1:]]
    prompts = [i for i, size in enumerate(sizes) if size > 1]
    assert len(prompts) == 2
    # The 3 pieces read took the prompt's batch and at least 2 one-token batches
    # (the first token comes from the prompt's logits). The scheduler runs ahead
    # of the reader (tokens go out as they are made), so it may have made a few
    # more, but it stopped long before max_tokens. (Exactly at the cancelled
    # token: test_scheduler's cancellation test.)
    assert 2 <= prompts[1] - prompts[0] - 1 < 60
    assert (await engine.list_sessions()).ids == [after.session_id]


async def test_a_failure_mid_stream_keeps_no_half_exchange_and_the_engine_goes_on(make_engine):
    engine = await make_engine(FailingRuntime)
    received = []
    with pytest.raises(RuntimeError, match="decode failed"):
        async for event in engine.chat_stream(ask("Write a long poem.", "broken", max_tokens=50)):
            received.append(event)
    assert [type(event) for event in received] == [TextDelta, TextDelta]
    assert (await engine.list_sessions()).ids == []
    after = await engine.chat(ask("Write a long poem.", "broken", max_tokens=5))
    assert after.completion_tokens == 5
    # The failed batch's cells were dropped: only the shared start is cached.
    assert after.cached_prompt_tokens == engine.shared_start_tokens > 0


async def test_clearing_a_session_while_it_generates_is_not_undone(make_engine):
    engine = await make_engine()
    await engine.chat(ask("Hello!", "busy", max_tokens=5))
    async with aclosing(engine.chat_stream(ask("Tell me more.", "busy", max_tokens=20))) as events:
        first = await anext(events)
        await engine.clear("busy")
        with pytest.raises(HistoryChanged):  # the reply is told it was not kept
            [event async for event in events]
    assert isinstance(first, TextDelta)
    assert "busy" not in (await engine.list_sessions()).ids


async def test_a_message_too_long_for_the_context_is_refused(make_engine):
    engine = await make_engine(n_ctx=256)
    with pytest.raises(ContextOverflow) as caught:
        await engine.chat(ask("word " * 400))
    assert caught.value.n_ctx == 256
    assert caught.value.prompt_tokens > 256


async def test_oldest_exchanges_leave_the_prompt_when_the_context_is_full(make_engine):
    engine = await make_engine(n_ctx=256)
    for turn in range(4):
        result: ChatResult = await engine.chat(
            ask(f"Turn {turn}: " + "tell me more " * 15, "long", max_tokens=8)
        )
        assert result.prompt_tokens < 256
    assert len(engine._store.history("default", "long")) == 4
