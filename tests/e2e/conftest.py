"""Real processes: the inference core and the REST gateway, each started as
``python -m ...`` on free ports, exactly as a user starts them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 90.0


@dataclass
class Service:
    url: str
    grpc_address: str
    env: dict[str, str]
    core_log: Path

    def generation_logs(self, session_id: str) -> list[str]:
        """The core's log lines about the generations for ``session_id``."""
        return [
            line
            for line in self.core_log.read_text().splitlines()
            if f"session={session_id} " in line
        ]


def service_env(grpc_port: int, http_port: int, data: Path) -> dict[str, str]:
    """The environment of a core and a gateway on these ports, with the session
    database in ``data``."""
    return {
        **os.environ,
        "GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "HOST": "127.0.0.1",
        "PORT": str(http_port),
        "SESSION_DB": str(data / "sessions.db"),
        "PYTHONUNBUFFERED": "1",
    }


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def wait_healthy(
    url: str,
    processes: list[subprocess.Popen[bytes]],
    timeout: float = STARTUP_TIMEOUT_S,
    expected_status: int = 200,
) -> None:
    """Wait until ``/health`` answers ``expected_status`` (503: the gateway is up
    but its core is not) while every process still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == expected_status:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout}s")


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


@dataclass
class Running:
    """A core and a gateway started by ``start_both``."""

    url: str
    grpc_address: str
    core: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]


def start_both(env: dict[str, str], logs: Path, prefix: str = "") -> Running:
    """Start the core and the gateway with ``env`` (logs in ``logs``, their
    names after ``prefix``) and wait until both serve; both are stopped if not."""
    core = start(["-m", "inference_server"], env, logs / f"{prefix}core.log")
    gateway = start(["-m", "rest_gateway"], env, logs / f"{prefix}gateway.log")
    running = Running(f"http://127.0.0.1:{env['PORT']}", env["GRPC_ADDRESS"], core, gateway)
    try:
        wait_healthy(running.url, [core, gateway])
    except BaseException:
        stop(gateway)
        stop(core)
        raise
    return running


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("logs")
    env = service_env(free_port(), free_port(), logs)
    running = start_both(env, logs)
    try:
        yield Service(
            url=running.url, grpc_address=running.grpc_address, env=env, core_log=logs / "core.log"
        )
    finally:
        codes = (stop(running.gateway), stop(running.core))
    assert codes == (0, 0), f"exit codes {codes}; logs in {logs}"


def run_readme_example(section: str, url: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the Python example of a README section as printed, with only its
    URL (``http://localhost:8002``) pointed at ``url``."""
    text = (ROOT / "README.md").read_text().split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    (example,) = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    script = tmp_path / "example.py"
    script.write_text(example.replace("http://localhost:8002", url))
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
