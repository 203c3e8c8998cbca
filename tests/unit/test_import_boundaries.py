"""The layers' import boundaries, each checked in a fresh interpreter: the gRPC
edge of the core never loads llama.cpp (so it can be tested with a fake
engine, and a client or tool that imports it does not pay for the model),
the gateway imports nothing of the core, and the client library nothing of
either server."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.e2e.conftest import ROOT


def loaded_by(*modules: str) -> set[str]:
    """The top-level packages loaded by importing ``modules`` in a new interpreter."""
    script = (
        "import importlib, json, sys\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(json.loads(done.stdout.splitlines()[-1]))


GRPC_EDGE = (
    "inference_server.servicer",
    "inference_server.server",
    "inference_server.interceptors",
    "inference_server.engine_api",
    "inference_server.reflection",
)
GATEWAY = ("rest_gateway.app", "rest_gateway.__main__", "rest_gateway.launcher")
CLIENTS = ("clients.grpc_client", "clients.rest_client", "clients.__main__")


def test_the_check_sees_llama_cpp_where_it_is_loaded():
    assert "llama_cpp" in loaded_by("inference_server.llama_runtime")


def test_the_grpc_edge_of_the_core_does_not_load_llama_cpp():
    assert "llama_cpp" not in loaded_by(*GRPC_EDGE)


def test_the_gateway_imports_nothing_of_the_core():
    assert not loaded_by(*GATEWAY) & {"inference_server", "llama_cpp"}


def test_the_client_library_imports_no_server():
    servers = {"inference_server", "rest_gateway", "llama_cpp", "fastapi", "uvicorn"}
    assert not loaded_by(*CLIENTS) & servers
