"""Start the whole service: the gRPC inference core and the REST gateway.

    python api_service.py [model_path]

The model is ``model_path``, else ``MODEL_PATH``, else the default model. Both
processes read their other settings from the environment (see the README).
Ctrl-C or SIGTERM is passed to both, which stop taking requests, let those in
flight finish (SHUTDOWN_GRACE_S) and exit; this script exits 0 when both did.
If either exits on its own, the other is stopped too and this script exits 1.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from rest_gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parent
STOP_TIMEOUT_S = 30.0


def start(module: str, *args: str) -> subprocess.Popen[bytes]:
    """Run ``python -m module`` in the caller's working directory (so relative
    model paths mean what the user meant), with this repository importable."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], env={**os.environ, "PYTHONPATH": path}
    )


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


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    processes = [start("inference_server", *argv[:1]), start("rest_gateway")]
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
    sys.exit(main(sys.argv[1:]))
