"""Start the whole service: the gRPC inference core and the REST gateway.

    llamachat-serve [model_path]          (installed with pip)
    python api_service.py [model_path]    (from a checkout)

The model is ``model_path``, else ``MODEL_PATH``, else the default model. Both
processes read their other settings from the environment (see the README).
Ctrl-C or SIGTERM is passed to both, which stop taking requests, let those in
flight finish (SHUTDOWN_GRACE_S) and exit; this command exits 0 when both did.
If either exits on its own, the other is stopped too and this command exits 1.

It lives beside the gateway, not in the core, because it reads the gateway's
settings (to print the URL it serves): the core never imports the gateway.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .settings import GatewaySettings

# Where this package was imported from: a checkout's root, or site-packages.
PACKAGES_ROOT = Path(__file__).resolve().parents[1]
STOP_TIMEOUT_S = 30.0


def start(module: str, *args: str) -> subprocess.Popen[bytes]:
    """Run ``python -m module`` in the caller's working directory (so relative
    model paths mean what the user meant), importing the very packages this one
    came from, whether a checkout or an installed copy. An installed copy is on
    the interpreter's own path already; a checkout's root is put on PYTHONPATH
    (never site-packages, which would come before the standard library)."""
    env = dict(os.environ)
    if not installed():
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGES_ROOT), os.environ.get("PYTHONPATH")) if p
        )
    return subprocess.Popen([sys.executable, "-m", module, *args], env=env)


def installed() -> bool:
    """Whether this package is an installed copy (a checkout has api_service.py
    beside it), which the interpreter finds by itself."""
    return not (PACKAGES_ROOT / "api_service.py").is_file()


def stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    model = [args.model_path] if args.model_path else []
    processes = [start("inference_server", *model), start("rest_gateway")]
    gateway = GatewaySettings()
    url = f"http://{gateway.host}:{gateway.port}"
    print(f"LLaMA Chat API starting on {url} (Ctrl-C stops it)", flush=True)
    try:
        while not stopping and all(p.poll() is None for p in processes):
            time.sleep(0.2)
    finally:
        stop_all(processes)
    # Both drained and exited 0 on SIGTERM; anything else is a failure.
    return 0 if all(p.returncode == 0 for p in processes) else 1


if __name__ == "__main__":
    sys.exit(main())
