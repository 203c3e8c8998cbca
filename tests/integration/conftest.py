"""The real default model (SmolLM2-135M-Instruct), loaded by the real engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from inference_server.assembly import build_engine, load_runtime
from inference_server.engine import LlamaEngine
from inference_server.llama_runtime import LlamaRuntime
from inference_server.model_files import default_model_path
from inference_server.settings import ServerSettings

EngineFactory = Callable[..., Awaitable[LlamaEngine]]


@pytest.fixture
async def make_engine() -> AsyncIterator[EngineFactory]:
    """Build loaded engines with settings overrides (and optionally a subclass
    of the real runtime that observes or breaks it); all are freed afterwards."""
    engines: list[LlamaEngine] = []

    async def make(
        runtime_class: type[LlamaRuntime] = LlamaRuntime, **overrides: Any
    ) -> LlamaEngine:
        settings = ServerSettings(**{"session_db": ":memory:", **overrides})
        engine = build_engine(settings, default_model_path(), runtime_class)
        await engine.load()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.aclose()


@pytest.fixture
async def engine(make_engine: EngineFactory) -> LlamaEngine:
    return await make_engine()


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[LlamaRuntime]:
    """A separate copy of the model, to count the tokens a prompt should have."""
    runtime = load_runtime(ServerSettings(n_slots=1, n_ctx=256), default_model_path())
    yield runtime
    runtime.close()
