"""The engine on the real model with the durable stores, the retention
rules (TTL, session limit) as the engine applies them, and retried turns."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from inference_server.domain import ChatResult, Exchange, FinishReason, TextDelta
from inference_server.errors import InvalidRequest
from inference_server.postgres_sessions import PostgresSessionStore
from inference_server.sessions import Retention
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
    await engine.chat(ask("Hello!", "b", max_tokens=4))
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
