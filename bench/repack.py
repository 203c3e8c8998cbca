"""The core's weight-repacking rule, for the bench's direct llama.cpp runs:
the same ``CPU_REPACK`` setting and the same ``auto`` (off where the CPU
reports AMX, whose repacked matmul crashes: ``inference_server/cpu_features.py``),
so that ``make bench`` runs wherever the service does."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import llama_cpp

from inference_server.cpu_features import extra_buffer_types, read_cpuinfo
from inference_server.llama_runtime import llama_system_info
from inference_server.settings import ServerSettings


def use_extra_buffer_types() -> bool:
    """Whether llama.cpp may repack weights here (``CPU_REPACK`` from the environment)."""
    mode = ServerSettings().cpu_repack
    return extra_buffer_types(mode, read_cpuinfo(), llama_system_info())[0]


@contextmanager
def high_level_model_params(extra: bool) -> Iterator[None]:
    """While it lasts, llama-cpp-python's high-level ``Llama`` loads models with
    ``use_extra_bufts = extra``: it takes the defaults of
    ``llama_model_default_params`` and has no argument of its own for it."""
    original = llama_cpp.llama_model_default_params

    def default_params() -> Any:
        params = original()
        params.use_extra_bufts = extra
        return params

    llama_cpp.llama_model_default_params = default_params
    try:
        yield
    finally:
        llama_cpp.llama_model_default_params = original
