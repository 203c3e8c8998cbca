"""Continuous batching and KV reuse on the real model.

What llama.cpp guarantees, and so what these tests compare (measured with
llama.cpp alone by ``bench/llama_alone.py``, ``make bench``):

- A sequence's logits do not depend on the other sequences in its batch
  (each sequence has its own KV stream): outputs alone and beside others are
  compared for equality.
- They do depend on how the sequence's own tokens were split into batches: a
  reply's tokens, evaluated one at a time as they were generated, leave KV
  cells that differ in the last bits from the same tokens evaluated in one
  batch, and that can change a greedy choice several tokens later. So a turn
  served from the cache is compared with llama.cpp evaluating the same tokens
  in the same shapes from scratch, not with a cold evaluation in one batch.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import replace

import pytest

from inference_server.domain import (
    ChatRequest,
    CompletionRequest,
    FinishReason,
    Message,
    Role,
    Sampling,
    SamplingParams,
    TextDelta,
)
from inference_server.errors import EngineNotReady, Overloaded
from inference_server.llama_runtime import BatchEntry, LlamaRuntime, Sampler
from inference_server.sessions import Retention
from inference_server.sqlite_sessions import SqliteSessionStore

from .runtimes import NoRestoreRuntime, RecordingRuntime

QUESTIONS = [
    "Name a planet.",
    "Write a haiku about the sea.",
    "What is 2+2?",
    "Name three colors.",
    "Tell me a joke.",
    "What is Python?",
    "Say hello in French.",
    "List two fruits.",
]


# Greedy SmolLM2 answers this with more than 400 tokens.
LONG_REPLY = "Write a long poem."


def ask(message: str, session_id: str | None = None, **sampling) -> ChatRequest:
    params = {"temperature": 0.0, "max_tokens": 24, **sampling}
    return ChatRequest(message=message, session_id=session_id, sampling=SamplingParams(**params))


async def test_greedy_output_is_the_same_alone_and_beside_seven_others(make_engine):
    engine = await make_engine(RecordingRuntime, n_slots=8)
    alone = [(await engine.chat(ask(q))).text for q in QUESTIONS]
    engine._runtime.batches.clear()
    together = await asyncio.gather(*(engine.chat(ask(q)) for q in QUESTIONS))
    assert [r.text for r in together] == alone
    assert engine._runtime.widest_batch() == 8  # they really shared batches


def replay(runtime: LlamaRuntime, chunks: list[list[int]], n_tokens: int) -> str:
    """llama.cpp alone: evaluate ``chunks`` one after another on a fresh
    sequence, then generate ``n_tokens`` greedily; the text."""
    runtime.forget(0)
    position = 0
    for chunk in chunks:
        runtime.decode(
            [
                BatchEntry(token, position + i, 0, i == len(chunk) - 1)
                for i, token in enumerate(chunk)
            ]
        )
        position += len(chunk)
    sampler = Sampler(Sampling(temperature=0.0, top_p=1.0, max_tokens=n_tokens, seed=None))
    text = b""
    try:
        for _ in range(n_tokens):
            token = runtime.sample(sampler, -1)
            text += runtime.piece(token)
            runtime.decode([BatchEntry(token, position, 0, True)])
            position += 1
    finally:
        sampler.close()
    return text.decode("utf-8", errors="replace")


async def test_a_new_conversation_begins_from_the_shared_start_and_answers_as_before(
    make_engine,
):
    # The default template's preamble (SmolLM2 adds its own system prompt),
    # and an operator's SYSTEM_PROMPT.
    for settings in ({}, {"system_prompt": "You are a terse assistant."}):
        shared = await make_engine(**settings)
        every_token = await make_engine(NoRestoreRuntime, **settings)
        for question in QUESTIONS[:3]:
            reply = await shared.chat(ask(question))
            cold = await every_token.chat(ask(question))
            assert cold.cached_prompt_tokens == 0
            assert 0 < reply.cached_prompt_tokens < reply.prompt_tokens
            assert reply.text == cold.text
            if settings:
                continue  # SYSTEM_PROMPT is for sessions: OpenAI clients send their own
            # The stateless path too (no slot of its tenant shares its prompt).
            stateless = await shared.complete(
                CompletionRequest(
                    messages=(Message(Role.USER, question),),
                    sampling=SamplingParams(temperature=0.0, max_tokens=24),
                    tenant=f"tenant of {question}",
                )
            )
            assert stateless.cached_prompt_tokens == reply.cached_prompt_tokens
            assert stateless.text == cold.text


async def test_a_new_conversation_starts_from_another_ones_cells_and_answers_as_before(
    make_engine,
):
    """A new session's first turn copies the cells of the longest start its
    prompt shares with another conversation of its tenant (beside it, or in
    the slot it takes), and answers exactly as from the shared start alone."""
    first, *others = [
        ask(f"Hi! My name is {name} and I like {hobby}.", name)
        for name, hobby in [("Sam", "hiking"), ("Ana", "painting"), ("Li", "chess")]
    ]
    # Each in a tenant of its own finds nothing of the others: the shared start only.
    apart = await make_engine()
    alone = [await apart.chat(replace(r, tenant=f"apart: {r.session_id}")) for r in others]
    assert {a.cached_prompt_tokens for a in alone} == {apart.shared_start_tokens}
    for n_slots in (2, 1):  # 1: each takes the previous one's slot and cuts its cells
        engine = await make_engine(n_slots=n_slots)
        await engine.chat(first)
        for request, cold in zip(others, alone, strict=True):
            reply = await engine.chat(request)
            assert reply.cached_prompt_tokens > engine.shared_start_tokens  # "Hi! My name is"
            assert reply.text == cold.text


async def test_a_turn_from_the_cached_prefix_evaluates_only_what_is_new(make_engine, tokenizer):
    engine = await make_engine(RecordingRuntime)
    first = await engine.chat(ask("My name is Alice and I love astronomy.", "s"))
    before = engine._runtime.evaluated(0)
    second = await engine.chat(ask("What do I love?", "s"))
    start = engine.shared_start_tokens
    assert 0 < first.cached_prompt_tokens == start  # the template's preamble
    assert start < second.cached_prompt_tokens < second.prompt_tokens
    # The cache holds the first prompt and the reply as generated: all but the
    # template's end-of-turn tokens and the new message are reused.
    assert second.cached_prompt_tokens >= first.prompt_tokens + first.completion_tokens - 1
    # Each generated token is evaluated in turn, but a last one that hit max_tokens.
    unevaluated_last = 1 if second.finish_reason is FinishReason.LENGTH else 0
    assert engine._runtime.evaluated(0) - before == (
        second.prompt_tokens
        - second.cached_prompt_tokens
        + second.completion_tokens
        - unevaluated_last
    )

    # llama.cpp alone, from scratch, in the same shapes (the shared start and
    # the rest of the first prompt in one batch each, the reply a token at a
    # time as generated, then the rest in one batch) gives the same reply: the
    # reused cells are exactly right.
    history = engine._store.history("default", "s")
    prompt = tokenizer.tokenize_chat(
        [
            {"role": "user", "content": history[0].user},
            {"role": "assistant", "content": history[0].assistant},
            {"role": "user", "content": "What do I love?"},
        ]
    )
    cached = second.cached_prompt_tokens
    shapes = [
        prompt[:start],
        prompt[start : first.prompt_tokens],
        *([token] for token in prompt[first.prompt_tokens : cached]),
        prompt[cached:],
    ]
    assert replay(tokenizer, shapes, second.completion_tokens) == second.text


async def test_a_cold_turn_equals_any_other_cold_evaluation_of_the_same_history(make_engine):
    # A session whose slot was taken and whose saved state was dropped
    # (KV_CACHE_RAM_MIB=0) is evaluated again from its history.
    engine = await make_engine(n_slots=1, kv_cache_ram_mib=0)
    await engine.chat(ask("My favourite colour is green.", "a"))
    await engine.chat(ask("I live in Paris.", "b"))  # takes a's slot
    back = await engine.chat(ask("What is my favourite colour?", "a"))
    assert back.cached_prompt_tokens == engine.shared_start_tokens

    cold = await make_engine()
    cold._store.append(
        "default", "a", engine._store.history("default", "a")[0]
    )  # the same history, no KV
    again = await cold.chat(ask("What is my favourite colour?", "a"))
    assert again.cached_prompt_tokens == cold.shared_start_tokens
    assert again.text == back.text


async def test_an_evicted_session_restored_from_ram_answers_as_if_it_never_left(make_engine):
    engine = await make_engine(n_slots=1, kv_cache_ram_mib=64)
    await engine.chat(ask("My favourite colour is green.", "a"))
    await engine.chat(ask("I live in Paris.", "b"))  # takes a's slot; a's cells go to RAM
    back = await engine.chat(ask("What is my favourite colour?", "a"))

    roomy = await make_engine(n_slots=2)  # a never leaves its slot
    await roomy.chat(ask("My favourite colour is green.", "a"))
    await roomy.chat(ask("I live in Paris.", "b"))
    stayed = await roomy.chat(ask("What is my favourite colour?", "a"))

    assert stayed.cached_prompt_tokens > 0
    assert back.cached_prompt_tokens == stayed.cached_prompt_tokens
    assert back.text == stayed.text


async def test_cancelling_one_request_leaves_the_others_unchanged(make_engine):
    engine = await make_engine(RecordingRuntime, n_slots=4)
    questions = QUESTIONS[:4]
    alone = [(await engine.chat(ask(q))).text for q in questions]

    async def cut_after_two_pieces() -> None:
        async with aclosing(engine.chat_stream(ask(LONG_REPLY, max_tokens=200))) as s:
            for _ in range(2):
                assert isinstance(await anext(s), TextDelta)

    engine._runtime.batches.clear()
    *together, _ = await asyncio.gather(
        *(engine.chat(ask(q)) for q in questions), cut_after_two_pieces()
    )
    assert [r.text for r in together] == alone
    assert engine._runtime.widest_batch() == 4


async def test_a_cancelled_request_frees_its_slot_for_a_waiting_one(make_engine):
    engine = await make_engine(n_slots=1)
    async with aclosing(engine.chat_stream(ask(LONG_REPLY, max_tokens=400))) as poem:
        await anext(poem)
        waiting = asyncio.ensure_future(engine.chat(ask("Name a planet.")))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # the one slot is taken
    result = await asyncio.wait_for(waiting, timeout=60)
    assert result.completion_tokens > 0


async def test_past_the_queue_a_request_is_refused_at_once(make_engine):
    engine = await make_engine(n_slots=1, max_queue=1)
    running = engine.chat_stream(ask(LONG_REPLY, max_tokens=400))
    async with aclosing(running):
        await anext(running)
        queued = asyncio.ensure_future(engine.chat(ask("Name a planet.")))
        await asyncio.sleep(0)  # it is admitted into the queue
        with pytest.raises(Overloaded):
            await engine.chat(ask("Name an ocean."))
    assert (await queued).completion_tokens > 0
    # Capacity is back once they are done.
    assert (await engine.chat(ask("Name an ocean."))).completion_tokens > 0


async def test_a_long_prompt_is_evaluated_in_chunks_beside_running_streams(make_engine):
    engine = await make_engine(RecordingRuntime, n_slots=2, n_batch=16)
    runtime = engine._runtime
    async with aclosing(engine.chat_stream(ask(LONG_REPLY, max_tokens=300))) as s:
        await anext(s)
        runtime.batches.clear()
        long = await engine.chat(ask("Summarise: " + "the cat sat on the mat. " * 20))
        batches = list(runtime.batches)
    assert long.prompt_tokens > 100
    prompt_batches = [b for b in batches if any(e.sequence == 1 and not e.wants_logits for e in b)]
    assert len(prompt_batches) >= long.prompt_tokens // 16
    assert all(len(batch) <= 16 for batch in batches)
    # The running stream got a token in every batch that carried a chunk.
    assert all(any(e.sequence == 0 for e in batch) for batch in prompt_batches)


async def test_sampling_is_per_request_in_a_shared_batch(make_engine):
    engine = await make_engine(n_slots=2)
    seeded = ask("Tell me a story.", temperature=1.0, seed=7, max_tokens=20)
    alone = await engine.chat(seeded)
    together = await asyncio.gather(
        engine.chat(seeded), engine.chat(ask("Tell me a story.", max_tokens=20))
    )
    assert together[0].text == alone.text
    assert together[1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)


async def test_closing_the_engine_ends_streams_in_flight_and_waiting_as_cancelled(
    make_engine, tmp_path
):
    engine = await make_engine(n_slots=1, session_db=str(tmp_path / "sessions.db"))
    running = engine.chat_stream(ask(LONG_REPLY, "running", max_tokens=400))
    async with aclosing(running):
        assert isinstance(await anext(running), TextDelta)
        waiting = asyncio.ensure_future(engine.chat(ask("Name a planet.", "waiting")))
        await asyncio.sleep(0.2)
        await engine.aclose()
        *_, last = [event async for event in running]
    assert last.finish_reason is FinishReason.CANCELLED
    assert (await waiting).finish_reason is FinishReason.CANCELLED
    with pytest.raises(EngineNotReady):
        await engine.list_sessions()  # closed
    reopened = SqliteSessionStore(tmp_path / "sessions.db", Retention(5, 10, 0))
    assert reopened.list_sessions("default", 10).ids == []  # no half exchange
