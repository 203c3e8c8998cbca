"""The engine on the real model with the durable stores, the retention
rules (TTL, session limit) as the engine applies them, and retried turns."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import replace

import pytest

from inference_server.domain import ChatResult, Exchange, FinishReason, TextDelta
from inference_server.errors import InvalidRequest, SessionStoreError
from inference_server.postgres_sessions import PostgresSessionStore
from inference_server.sessions import RequestRecord, Retention
from inference_server.sqlite_sessions import SqliteSessionStore

from .test_real_model import ask


async def test_a_reply_is_on_disk_before_the_engine_returns_it(make_engine, tmp_path):
    path = tmp_path / "sessions.db"
    engine = await make_engine(session_db=str(path))
    result = await engine.chat(ask("Hello!", "durable", max_tokens=6))
    # A second connection, as a restarted process would open it.
    reader = SqliteSessionStore(path, Retention(window=5, max_sessions=10, ttl_s=0))
    assert reader.history("default", "durable") == [Exchange("Hello!", result.text)]
    assert await engine.history("durable") == [Exchange("Hello!", result.text)]


async def test_a_restarted_engine_continues_a_session_from_its_file(make_engine, tmp_path):
    path = str(tmp_path / "sessions.db")
    first = await make_engine(session_db=path)
    reply = await first.chat(ask("My name is Ada.", "ada", max_tokens=6))
    await first.aclose()
    second = await make_engine(session_db=path)
    follow_up = await second.chat(ask("What is my name?", "ada", max_tokens=6))
    assert await second.history("ada") == [
        Exchange("My name is Ada.", reply.text),
        Exchange("What is my name?", follow_up.text),
    ]
    # The history went into the prompt: more tokens than the message alone gives.
    alone = await second.chat(ask("What is my name?", "fresh", max_tokens=6))
    assert follow_up.prompt_tokens > alone.prompt_tokens


async def test_sessions_unused_past_the_ttl_are_removed(make_engine):
    engine = await make_engine(session_ttl_s=0.4)
    await engine.chat(ask("Hello!", "short-lived", max_tokens=3))
    assert (await engine.list_sessions()).ids == ["short-lived"]
    for _ in range(50):
        await asyncio.sleep(0.1)
        if not (await engine.list_sessions()).ids:
            break
    assert (await engine.list_sessions()).ids == []


async def test_past_max_sessions_the_evicted_session_loses_its_kv_cache_too(make_engine):
    engine = await make_engine(max_sessions=1)
    first = await engine.chat(ask("Hello!", "a", max_tokens=4))
    # (Another first message: a prompt that begins as "b"'s would start from its cells.)
    await engine.chat(ask("Good morning!", "b", max_tokens=4))
    assert (await engine.list_sessions()).ids == ["b"]
    again = await engine.chat(ask("Hello!", "a", max_tokens=4))
    # "a" starts over: the same prompt as its first turn, none of it from a stale cache.
    assert again.prompt_tokens == first.prompt_tokens
    assert again.cached_prompt_tokens == engine.shared_start_tokens


async def test_postgres_has_the_reply_before_the_engine_returns_it(make_engine, postgres):
    dsn = postgres.new_schema()
    engine = await make_engine(session_db=dsn)
    result = await engine.chat(ask("Hello!", "shared", max_tokens=6))
    other_replica = PostgresSessionStore(dsn, Retention(window=5, max_sessions=10, ttl_s=0))
    assert other_replica.history("default", "shared") == [Exchange("Hello!", result.text)]
    other_replica.close()


async def test_a_retried_turn_is_answered_its_kept_reply_not_generated_again(make_engine):
    engine = await make_engine()
    request = replace(ask("Hello!", "retry", max_tokens=8), request_id="turn-1")
    first = await engine.chat(request)
    again = await engine.chat(request)
    streamed = [event async for event in engine.chat_stream(request)]
    assert await engine.history("retry") == [Exchange("Hello!", first.text)]  # one exchange
    assert (again.text, again.finish_reason) == (first.text, first.finish_reason)
    assert again.completion_tokens == first.completion_tokens == 8
    assert again.finish_reason is FinishReason.LENGTH
    assert streamed == [TextDelta(first.text), again]  # one chunk, then the end
    assert isinstance(again, ChatResult) and again.prompt_tokens == 0  # nothing evaluated
    with pytest.raises(InvalidRequest, match="request_id was used already"):
        await engine.chat(replace(request, message="Something else"))
    await engine.chat(replace(request, request_id="turn-2"))
    assert len(await engine.history("retry")) == 2


async def test_a_turn_kept_first_by_another_attempt_answers_that_reply(make_engine, postgres):
    # The same turn (one request id) generated on two replicas at once: the
    # one that commits second is told the reply that was kept, not an error.
    dsn = postgres.new_schema()
    engine = await make_engine(session_db=dsn)
    other_replica = PostgresSessionStore(dsn, Retention(window=5, max_sessions=10, ttl_s=0))
    request = replace(ask("Write a long poem.", "raced", max_tokens=12), request_id="turn-1")
    async with aclosing(engine.chat_stream(request)) as events:
        assert isinstance(await anext(events), TextDelta)  # read and generating
        version = other_replica.read("default", "raced").version
        record = RequestRecord("turn-1", FinishReason.STOP.value, 3)
        kept = Exchange("Write a long poem.", "Kept elsewhere.")
        other_replica.append("default", "raced", kept, expected_version=version, request=record)
        rest = [event async for event in events]
    other_replica.close()
    result = rest[-1]
    assert isinstance(result, ChatResult)
    assert (result.text, result.completion_tokens) == ("Kept elsewhere.", 3)
    assert await engine.history("raced") == [kept]  # one exchange


async def test_a_store_that_cannot_be_read_makes_the_core_unhealthy_until_it_is_back(
    make_engine, postgres
):
    engine = await make_engine(session_db=postgres.new_schema())
    await engine.chat(ask("Hello!", "s", max_tokens=2))
    assert engine.unavailable_reason() is None
    postgres.kill9()
    try:
        with pytest.raises(SessionStoreError):
            await engine.chat(ask("Again!", "s", max_tokens=2))
        assert engine.unavailable_reason() is not None  # health: NOT_SERVING
    finally:
        postgres.start()
    for _ in range(100):  # the store is tried again every 2 s
        if engine.unavailable_reason() is None:
            break
        await asyncio.sleep(0.1)
    assert engine.unavailable_reason() is None
    assert len(await engine.history("s")) == 1
