"""Start the whole service: the gRPC inference core and the REST gateway.

    llamachat-serve [model_path]          (installed with pip)
    python api_service.py [model_path]    (from a checkout)

The model is ``model_path``, else ``MODEL_PATH``, else the default model. Both
processes read their other settings from the environment (see the README).

Both run under a supervisor (``llamachat_process.supervisor``): one that
exits unexpectedly is started again with backoff, while the other keeps
serving (the gateway answers 503 until the core is back); after a crash loop
this command gives up, says why in one line and exits 1. Ctrl-C or SIGTERM is
passed to both, which stop taking requests, let those in flight finish
(SHUTDOWN_GRACE_S) and exit; this command then exits 0 when both did. If this
command dies, even by ``kill -9``, both notice and exit within seconds.

It lives beside the gateway, not in the core, because it reads the gateway's
settings (to print the URL it serves): the core never imports the gateway.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from llamachat_process.cli import settings_or_exit
from llamachat_process.logs import configure_logging
from llamachat_process.supervisor import STOP_MARGIN_S, RestartPolicy, Supervisor

from .settings import GatewaySettings

# Where this package was imported from: a checkout's root, or site-packages/llamachat.
PACKAGES_ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("llamachat.serve")


def child_env() -> dict[str, str]:
    """The environment of ``python -m module`` run in the caller's working
    directory (so relative model paths mean what the user meant), importing
    the very packages this one came from, whether a checkout or an installed
    copy. An installed copy is on the interpreter's own path already; a
    checkout's root is put on PYTHONPATH (never site-packages, which would
    come before the standard library)."""
    env = dict(os.environ)
    if not installed():
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGES_ROOT), os.environ.get("PYTHONPATH")) if p
        )
    return env


def module_name(package: str) -> str:
    """The sibling package ``package`` under the name this one was imported as:
    ``inference_server`` from a checkout, ``llamachat.inference_server`` from
    an installed copy (pip installs the packages under ``llamachat``)."""
    namespace = (__package__ or "").rpartition(".")[0]
    return f"{namespace}.{package}" if namespace else package


def installed() -> bool:
    """Whether this package is an installed copy (a checkout has api_service.py
    beside it), which the interpreter finds by itself."""
    return not (PACKAGES_ROOT / "api_service.py").is_file()


def parse_args(argv: list[str]) -> argparse.Namespace:
    # prog defaults to the command's own name: llamachat-serve or api_service.py.
    parser = argparse.ArgumentParser(
        description="Start the inference core and the REST gateway together.",
        epilog="Every other setting is an environment variable: see the README.",
    )
    parser.add_argument(
        "model_path", nargs="?", help="GGUF model file (default: MODEL_PATH, else the default one)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    gateway = settings_or_exit(GatewaySettings)
    configure_logging(gateway.log_level, gateway.log_format)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    model = [args.model_path] if args.model_path else []
    env = child_env()
    # Both processes read SHUTDOWN_GRACE_S: they get that long to drain, and more to exit.
    policy = settings_or_exit(RestartPolicy)
    supervisor = Supervisor(policy, gateway.shutdown_grace_s + STOP_MARGIN_S)
    try:
        core = [sys.executable, "-m", module_name("inference_server"), *model]
        supervisor.add("core", core, env)
        supervisor.add("gateway", [sys.executable, "-m", module_name("rest_gateway")], env)
        url = f"http://{gateway.host}:{gateway.port}"
        print(f"LLaMA Chat API starting on {url} (Ctrl-C stops it)", flush=True)
        gave_up = supervisor.run(lambda: stopping)
    finally:
        codes = supervisor.stop_all()
    if gave_up is not None:
        log.error("llamachat-serve gives up: %s", gave_up)
        return 1
    # Both drained and exited 0 on SIGTERM; anything else is a failure.
    return 0 if all(code == 0 for code in codes) else 1


if __name__ == "__main__":
    sys.exit(main())
