"""The console commands of the server parts, as installed from the wheel.

A plain ``pip install llamachat`` is the client; ``llamachat-core``,
``llamachat-gateway`` and ``llamachat-serve`` are installed with it all the
same (a wheel's commands do not depend on its extras). Run without their
extra, they say which one to install, instead of a ``ModuleNotFoundError``.
Only the standard library is imported here: a plain install has no more.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

# Status 2, as for bad settings: a supervisor does not retry it.
MISSING_EXTRA_STATUS = 2


def _main_of(module: str, extra: str, command: str) -> Callable[[], Any]:
    try:
        return importlib.import_module(module).main
    except ModuleNotFoundError as missing:
        if (missing.name or "").split(".")[0] == "llamachat":
            raise  # the project itself is broken: not a missing extra
        print(
            f"{command}: needs the '{extra}' extra ({missing.name} is not installed): "
            f"pip install 'llamachat[{extra}]'",
            file=sys.stderr,
        )
        sys.exit(MISSING_EXTRA_STATUS)


def core() -> Any:
    """``llamachat-core``: the gRPC inference core."""
    return _main_of("llamachat.inference_server.__main__", "core", "llamachat-core")()


def gateway() -> Any:
    """``llamachat-gateway``: the REST gateway."""
    return _main_of("llamachat.rest_gateway.__main__", "gateway", "llamachat-gateway")()


def serve() -> Any:
    """``llamachat-serve``: the core and the gateway, supervised."""
    return _main_of("llamachat.rest_gateway.launcher", "server", "llamachat-serve")()
