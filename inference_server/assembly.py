"""Builds the engine from the settings: the one place that wires the model,
the session store and the engine together (``__main__`` and the tests use it)."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

from .cpu_features import extra_buffer_types, llama_features, read_cpuinfo
from .engine import LlamaEngine
from .llama_runtime import LlamaRuntime, llama_system_info
from .sessions import Retention, SessionStore, open_session_store
from .settings import ServerSettings

log = logging.getLogger(__name__)


def load_runtime(
    settings: ServerSettings, model_path: Path, runtime_class: type[LlamaRuntime] = LlamaRuntime
) -> LlamaRuntime:
    """Load the model into one context with a sequence per slot (slow: seconds),
    with weight repacking as ``CPU_REPACK`` and the CPU allow; says in the log
    what llama.cpp sees of the CPU and where the weights went."""
    system_info = llama_system_info()
    repack, why = extra_buffer_types(settings.cpu_repack, read_cpuinfo(), system_info)
    log.info("llama.cpp sees CPU features: %s", " ".join(sorted(llama_features(system_info))))
    log.info("weight repacking (extra buffer types) %s: %s", "on" if repack else "off", why)
    runtime = runtime_class(
        str(model_path),
        n_ctx=settings.n_ctx,
        n_sequences=settings.n_slots,
        n_gpu_layers=settings.n_gpu_layers,
        n_threads=settings.n_threads,
        n_batch=settings.n_batch,
        extra_buffer_types=repack,
        chat_template=(
            settings.chat_template_file.read_text() if settings.chat_template_file else None
        ),
    )
    log.info("chat template's tool format: %s", runtime.tool_format)
    log.info("model buffers: %s", ", ".join(runtime.model_buffers) or "none reported")
    if runtime.offloaded_layers is not None:
        log.info("layers offloaded to the GPU: %s", runtime.offloaded_layers)
    return runtime


def open_store(settings: ServerSettings) -> SessionStore:
    """The session store ``SESSION_DB`` names, with the retention settings."""
    retention = Retention(
        window=settings.history_exchanges,
        max_sessions=settings.max_sessions,
        ttl_s=settings.session_ttl_s,
        max_bytes=settings.max_session_bytes,
    )
    return open_session_store(settings.session_db, retention)


def build_engine(
    settings: ServerSettings,
    model_path: Path,
    runtime_class: type[LlamaRuntime] = LlamaRuntime,
) -> LlamaEngine:
    """An engine whose ``load()`` loads ``model_path`` (the store opens at once)."""
    return LlamaEngine(
        settings,
        open_store(settings),
        load_runtime=partial(load_runtime, settings, model_path, runtime_class),
        model_name=model_name(model_path),
    )


def model_name(model_path: Path) -> str:
    """The name the model is served as: its file name without ``.gguf``."""
    return model_path.name.removesuffix(".gguf")
