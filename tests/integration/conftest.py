"""The real default model (SmolLM2-135M-Instruct), loaded by the real engine."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import pytest

from inference_server.engine import LlamaEngine
from inference_server.llama_model import LlamaModel
from inference_server.model_files import default_model_path
from inference_server.sessions import InMemorySessionStore
from inference_server.settings import ServerSettings

EngineFactory = Callable[..., Awaitable[LlamaEngine]]


def load_model(settings: ServerSettings, model_class: type[LlamaModel] = LlamaModel) -> LlamaModel:
    return model_class(
        str(default_model_path()),
        n_ctx=settings.n_ctx,
        n_gpu_layers=settings.n_gpu_layers,
        n_threads=settings.n_threads,
        n_batch=settings.n_batch,
    )


@pytest.fixture
async def make_engine() -> AsyncIterator[EngineFactory]:
    """Build loaded engines with settings overrides (and optionally a subclass
    of the real model that observes or breaks it); all are freed afterwards."""
    engines: list[LlamaEngine] = []

    async def make(model_class: type[LlamaModel] = LlamaModel, **overrides: Any) -> LlamaEngine:
        settings = ServerSettings(**overrides)
        engine = LlamaEngine(
            settings,
            InMemorySessionStore(settings.history_exchanges),
            load_model=partial(load_model, settings, model_class),
        )
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
def tokenizer() -> LlamaModel:
    """A separate copy of the model, to count the tokens a prompt should have."""
    return load_model(ServerSettings())
