"""The cluster of ``test_replicas.py`` as real processes: three cores (small
N_CTX and N_SLOTS) sharing one PostgreSQL database, and two gateways in front
of all three (their GRPC_ADDRESS is the list of the three). The cores are
reached through the gateways, or directly over gRPC where a test needs a turn
on one chosen replica."""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llamachat.v1 import chat_pb2, chat_pb2_grpc
from tests.e2e.conftest import STARTUP_TIMEOUT_S, start, stop, wait_healthy
from tests.helpers import free_port
from tests.postgres_server import PostgresServer

REPLICAS = 3
GATEWAYS = 2
# A store that cannot be read right now (PostgreSQL restarting) is tried again.
READ_TRIES = 50
READ_PAUSE_S = 0.1


@dataclass
class Core:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    def generations(self, session: str) -> list[int]:
        """The cached prompt tokens of each of ``session``'s turns it generated."""
        return [
            int(found.group(1))
            for line in self.log.read_text().splitlines()
            if (found := re.search(rf"generation session={session} .*cached_tokens=(\d+)", line))
        ]


@dataclass
class Cluster:
    cores: list[Core]
    gateways: list[str]
    gateway_processes: list[subprocess.Popen[bytes]]
    postgres: PostgresServer
    database: str
    logs: Path

    def core(self, name: str) -> Core:
        return next(core for core in self.cores if core.name == name)

    def live(self) -> list[Core]:
        return [core for core in self.cores if core.process.poll() is None]

    def start_core(self, name: str, port: int, module: str = "inference_server") -> Core:
        """A core of this cluster's database (``module``: what it runs as);
        returns once it serves."""
        log = self.logs / f"{name}-{time.monotonic_ns()}.log"
        process = start(["-m", module], core_env(port, name, self.database), log)
        wait_serving(port, process)
        return Core(name, port, process, log)

    def restart(self, core: Core) -> None:
        """Start a killed core again, on its address (as its supervisor would)."""
        assert core.process.poll() is not None
        again = self.start_core(core.name, core.port)
        core.process, core.log = again.process, again.log


def core_env(port: int, name: str, database: str) -> dict[str, str]:
    return {
        **os.environ,
        "GRPC_ADDRESS": f"127.0.0.1:{port}",
        "REPLICA_NAME": name,
        "SESSION_DB": database,
        "N_CTX": "512",
        "N_SLOTS": "4",
        "PYTHONUNBUFFERED": "1",
    }


def wait_serving(
    port: int,
    process: subprocess.Popen[bytes] | None = None,
    timeout_s: float = STARTUP_TIMEOUT_S,
) -> None:
    """Wait until the core on ``port`` says SERVING (its model loaded, its
    store writable)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=timeout_s, wait_for_ready=True
        )
        try:
            for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    watch.cancel()
                    return
        except grpc.RpcError as error:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the core on {port} exited: {process.returncode}") from error
            raise


def start_cluster(postgres: PostgresServer, logs: Path) -> Iterator[Cluster]:
    """The cluster on a new database of ``postgres``, until the generator is
    closed; then every process still running must exit with status 0."""
    database = postgres.new_database()
    cores = []
    for index in range(REPLICAS):
        port, name, log = free_port(), f"core-{index}", logs / f"core-{index}.log"
        env = core_env(port, name, database)
        cores.append(Core(name, port, start(["-m", "inference_server"], env, log), log))
    addresses = ",".join(f"127.0.0.1:{core.port}" for core in cores)
    gateways, processes = [], []
    for index in range(GATEWAYS):
        port = free_port()
        env = {
            **os.environ,
            "GRPC_ADDRESS": addresses,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "GRPC_KEEPALIVE_S": "1",
            "GRPC_KEEPALIVE_TIMEOUT_S": "2",
            "PYTHONUNBUFFERED": "1",
        }
        processes.append(start(["-m", "rest_gateway"], env, logs / f"gateway-{index}.log"))
        gateways.append(f"http://127.0.0.1:{port}")
    running = [core.process for core in cores] + processes
    try:
        for core in cores:
            wait_serving(core.port, core.process)
        for url in gateways:
            wait_healthy(url, running)
        yield Cluster(cores, gateways, processes, postgres, database, logs)
    finally:
        codes = [stop(process) for process in processes]
        codes += [stop(core.process) for core in cores if core.process.poll() is None]
    assert set(codes) == {0}, f"exit codes {codes}; logs in {logs}"


def chat(url: str, message: str, session: str | None = None, max_tokens: int = 8) -> httpx.Response:
    body: dict[str, object] = {"message": message, "temperature": 0, "max_tokens": max_tokens}
    if session is not None:
        body["session_id"] = session
    reply = httpx.post(f"{url}/chat", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply


@contextmanager
def stub_of(core: Core) -> Iterator[chat_pb2_grpc.ChatServiceStub]:
    """A gRPC stub of one core, not through a gateway."""
    with grpc.insecure_channel(f"127.0.0.1:{core.port}") as channel:
        yield chat_pb2_grpc.ChatServiceStub(channel)


def kept(stub: chat_pb2_grpc.ChatServiceStub, session: str) -> list[tuple[str, str]]:
    """The (user, assistant) exchanges the store keeps of ``session`` ([] if
    none), read through ``stub``'s core."""
    for _ in range(READ_TRIES):
        try:
            reply = stub.GetSession(chat_pb2.GetSessionRequest(session_id=session), timeout=30)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return []
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(READ_PAUSE_S)
            continue
        return [(exchange.user, exchange.assistant) for exchange in reply.exchanges]
    raise AssertionError(f"the store could not be read for {session}")
