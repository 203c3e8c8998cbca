"""How the core meets its failures, on the real model: the CPU's weight
repacking, a scheduler that dies, a session store that cannot be written."""

from __future__ import annotations

import asyncio
import contextlib
from functools import partial

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inference_server.__main__ import serve
from inference_server.assembly import load_runtime
from inference_server.cpu_features import has_amx, read_cpuinfo
from inference_server.domain import Exchange
from inference_server.engine import LlamaEngine
from inference_server.errors import EngineFailed, SessionStoreError
from inference_server.llama_runtime import llama_system_info
from inference_server.model_files import default_model_path
from inference_server.sessions import Retention
from inference_server.settings import ServerSettings
from inference_server.sqlite_sessions import SqliteSessionStore
from llamachat.v1 import chat_pb2, chat_pb2_grpc
from tests.helpers import free_port

from .runtimes import CrashingRuntime, RepackRecordingRuntime
from .test_real_model import ask

AMX = has_amx(read_cpuinfo(), llama_system_info())


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(
            "on",
            marks=pytest.mark.skipif(
                AMX, reason="this CPU reports AMX, whose repacked weights crash llama.cpp"
            ),
        ),
        "off",
        "auto",
    ],
)
async def test_the_model_loads_and_decodes_with_each_repack_setting(make_engine, mode):
    engine = await make_engine(RepackRecordingRuntime, cpu_repack=mode)
    runtime = engine._runtime
    assert isinstance(runtime, RepackRecordingRuntime)
    assert runtime.extra_buffer_types is {"on": True, "off": False, "auto": not AMX}[mode]
    assert runtime.model_buffers  # llama.cpp said where the weights went
    if not runtime.extra_buffer_types:
        assert not any("AMX" in b or "REPACK" in b for b in runtime.model_buffers)
    result = await engine.chat(ask("What is the capital of France?", max_tokens=8))
    assert result.text.strip() and result.completion_tokens > 0


async def test_a_temperature_too_small_to_divide_by_samples_greedily(engine):
    greedy = await engine.chat(ask("Name three fruits.", max_tokens=24))
    tiny = await engine.chat(ask("Name three fruits.", max_tokens=24, temperature=1e-38))
    assert tiny.text == greedy.text


async def test_a_scheduler_that_dies_fails_its_requests_and_the_engine(make_engine):
    engine = await make_engine(CrashingRuntime)
    with pytest.raises(EngineFailed, match="an unexpected error while sampling"):
        await engine.chat(ask("Write a long poem.", "poem", max_tokens=40))
    assert engine.failed is not None and engine.failed.done()
    assert "must restart" in (engine.unavailable_reason() or "")
    assert engine.model_info().loaded is False
    with pytest.raises(EngineFailed):
        await engine.chat(ask("Hello?", max_tokens=4))
    with pytest.raises(Exception, match="Session not found"):
        await engine.history("poem")  # nothing half-kept


async def test_a_core_whose_scheduler_dies_says_not_serving_and_exits_1():
    address = f"127.0.0.1:{free_port()}"
    settings = ServerSettings(
        grpc_address=address, session_db=":memory:", model_path=str(default_model_path())
    )
    serving = asyncio.create_task(serve(settings, CrashingRuntime))
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=True)
        statuses = []
        async for reply in watch:
            statuses.append(reply.status)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
        chat = chat_pb2_grpc.ChatServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await chat.Chat(chat_pb2.ChatRequest(message="Write a long poem.", temperature=0))
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "must restart" in (failed.value.details() or "")
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for reply in watch:
                statuses.append(reply.status)
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await asyncio.wait_for(serving, 30) == 1


class CappedStore(SqliteSessionStore):
    """The real SQLite store, whose file is kept from growing when ``full``
    (``PRAGMA max_page_count``): its writes fail with SQLite's own
    "database or disk is full", as on a full disk."""

    def full(self) -> None:
        (pages,) = self._db.execute("PRAGMA page_count").fetchone()
        self._db.execute(f"PRAGMA max_page_count = {pages}")


async def test_a_store_that_cannot_be_written_makes_the_core_unhealthy_until_space_is_freed(
    tmp_path,
):
    settings = ServerSettings(session_db=str(tmp_path / "sessions.db"))
    store = CappedStore(settings.session_db, Retention(window=5, max_sessions=100, ttl_s=0))
    store.append("default", "old", Exchange("An old question.", "x" * 100_000))  # about 25 pages
    store.full()
    engine = LlamaEngine(
        settings, store, load_runtime=partial(load_runtime, settings, default_model_path())
    )
    await engine.load()
    try:
        assert engine.unavailable_reason() is None
        long = "word " * 800  # needs pages of its own
        with pytest.raises(SessionStoreError, match="full"):
            await engine.chat(ask(long, "new", max_tokens=2))
        assert "database or disk is full" in (engine.unavailable_reason() or "")
        assert "database or disk is full" in (engine.model_info().unavailable_reason or "")
        assert (await engine.list_sessions()).ids == ["old"]  # nothing half-kept
        changed = engine.health_changed()
        await engine.clear("old")  # still works: this is how space is freed
        await asyncio.wait_for(changed, 10)  # the store is tried again and found writable
        assert engine.unavailable_reason() is None
        result = await engine.chat(ask(long, "new", max_tokens=2))
        assert await engine.history("new") == [Exchange(long, result.text)]
    finally:
        await engine.aclose()
