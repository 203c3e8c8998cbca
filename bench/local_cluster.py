"""``python -m bench.local_cluster`` (``make cluster``): the many-replica
topology on one machine, for a demo and for ``make bench-cluster``.

A PostgreSQL server of its own (``initdb`` into ``.cluster/postgres`` on the
first run, kept after; as the ``postgres`` user when run as root: the tests'
``tests/postgres_server.py`` does the work), three cores on gRPC ports
50051-50053 sharing its database, and one gateway on :8002 whose
``GRPC_ADDRESS`` lists the three. Each core is pinned with ``taskset`` to CPUs
of its own where there are enough (one CPU left to PostgreSQL and the
gateway); where there are not, the cores share every CPU, and the cluster shows
the topology and its failover, not more capacity than one core has. Ctrl-C
stops everything. Logs are in ``.cluster/logs``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

from tests.e2e.replica_cluster import wait_serving as wait_core_serving
from tests.postgres_server import PostgresServer

from .servers import REPO, stop, wait_healthy

CLUSTER_DIR = REPO / ".cluster"
DATABASE = "llamachat"
STARTUP_TIMEOUT_S = 180.0


def cpu_groups(replicas: int, cpus: list[int]) -> list[list[int]] | None:
    """The CPUs each core is pinned to: an equal share of all CPUs but the
    first (left to PostgreSQL, the gateway and clients), at least one each;
    ``None`` where there are too few CPUs for that."""
    rest = cpus[1:]
    if len(rest) < replicas:
        return None
    share = len(rest) // replicas
    return [rest[index * share : (index + 1) * share] for index in range(replicas)]


@dataclass
class Child:
    """A process of the cluster and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    port: int


class LocalCluster:
    """PostgreSQL, cores and gateways as child processes on 127.0.0.1; cores
    and gateways are added with ``start_core`` and ``start_gateway``, and
    ``close()`` stops them all, PostgreSQL last."""

    def __init__(
        self,
        root: Path,
        *,
        postgres_port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.cores: dict[str, Child] = {}
        self.gateways: list[Child] = []
        # Durable as a deployment is: fsync on.
        self.postgres = PostgresServer(fsync=True, root=root / "postgres", port=postgres_port)
        self.postgres.start()
        with psycopg.connect(self.postgres.dsn, autocommit=True) as admin:
            if not admin.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
            ).fetchone():
                admin.execute(f'CREATE DATABASE "{DATABASE}"')
        self.dsn = self.postgres.dsn_of(DATABASE)

    def _start(self, name: str, argv: list[str], env: dict[str, str], port: int) -> Child:
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                argv, cwd=REPO, env={**self._env, **env}, stdout=out, stderr=subprocess.STDOUT
            )
        return Child(name, process, log, port)

    def start_core(
        self,
        name: str,
        port: int,
        *,
        cpus: list[int] | None = None,
        threads: int = 1,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Child:
        """A core on ``port``, pinned to ``cpus`` (``taskset``) when given;
        returns once it serves (or at once, unless ``wait``)."""
        pinned = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        core_env = {
            "GRPC_ADDRESS": f"127.0.0.1:{port}",
            "REPLICA_NAME": name,
            "SESSION_DB": self.dsn,
            "N_THREADS": str(len(cpus) if cpus else threads),
            **(env or {}),
        }
        child = self._start(
            name, [*pinned, sys.executable, "-m", "inference_server"], core_env, port
        )
        self.cores[name] = child
        if wait:
            wait_serving(child)
        return child

    def start_gateway(
        self, port: int, cores: list[Child], *, policy: str = "ring_hash", name: str = "gateway"
    ) -> Child:
        """A gateway on ``port`` in front of ``cores``; returns once healthy."""
        env = {
            "GRPC_ADDRESS": ",".join(f"127.0.0.1:{core.port}" for core in cores),
            "GRPC_LB_POLICY": policy,
            "HOST": "127.0.0.1",
            "PORT": str(port),
        }
        child = self._start(name, [sys.executable, "-m", "rest_gateway"], env, port)
        self.gateways.append(child)
        wait_healthy(f"http://127.0.0.1:{port}/health", child.process, STARTUP_TIMEOUT_S)
        return child

    def stop_gateway(self, gateway: Child) -> None:
        stop(gateway.process)
        self.gateways.remove(gateway)

    def close(self) -> None:
        # A second Ctrl-C while the children stop must not leave PostgreSQL running.
        try:
            for child in [*self.gateways, *self.cores.values()]:
                if child.process.poll() is None:
                    stop(child.process)
        finally:
            self.postgres.stop()


def wait_serving(core: Child) -> None:
    """Wait until ``core`` says SERVING (its model loaded, its store writable)."""
    try:
        wait_core_serving(core.port, core.process, STARTUP_TIMEOUT_S)
    except RuntimeError as error:  # it exited
        raise RuntimeError(f"{core.name} exited; see {core.log}") from error


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def topology(gateway: int, cores: list[Child], postgres: int) -> str:
    """The picture of what runs (as in the README)."""
    names = "   ".join(f"{core.name} :{core.port}" for core in cores)
    return "\n".join(
        [
            f"  clients --HTTP :{gateway}--> gateway --ring_hash on x-session-id--> one of",
            f"      {names}",
            "  (gRPC clients may call any core directly); every core keeps its sessions in",
            f"      PostgreSQL 127.0.0.1:{postgres}/{DATABASE}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="make cluster", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=3, help="cores (default %(default)s)")
    parser.add_argument("--first-port", type=int, default=50051, help="gRPC port of core-0")
    parser.add_argument("--port", type=int, default=8002, help="HTTP port of the gateway")
    parser.add_argument("--postgres-port", type=int, default=55432, help="PostgreSQL's port")
    parser.add_argument("--root", type=Path, default=CLUSTER_DIR, help="data and logs")
    parser.add_argument("--fresh", action="store_true", help="start from an empty database")
    args = parser.parse_args(argv)
    if args.fresh:
        shutil.rmtree(args.root / "postgres", ignore_errors=True)
    cpus = usable_cpus()
    groups = cpu_groups(args.replicas, cpus)
    if groups is None:
        print(
            f"{len(cpus)} CPUs for {args.replicas} cores: not pinned; the cores share every "
            "CPU (one llama.cpp thread each), so this shows the topology and failover, not "
            "more capacity than one core."
        )
    cluster = LocalCluster(args.root, postgres_port=args.postgres_port)
    try:
        cores = []
        for index in range(args.replicas):
            cpu_set = groups[index] if groups else None
            port = args.first_port + index
            cores.append(cluster.start_core(f"core-{index}", port, cpus=cpu_set, wait=False))
            print(f"core-{index}: 127.0.0.1:{port}, CPUs {cpu_set or 'all'}")
        for core in cores:  # loading side by side
            wait_serving(core)
        cluster.start_gateway(args.port, cores)
        print(topology(args.port, cores, cluster.postgres.port))
        print(f"REST: http://127.0.0.1:{args.port}   SESSION_DB={cluster.dsn}")
        print(f"logs: {cluster.logs}   Ctrl-C stops everything")
        # Ctrl-C, also where SIGINT came ignored (started in the background).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        reported: set[str] = set()
        while True:
            for child in [*cluster.cores.values(), *cluster.gateways]:
                if child.process.poll() is not None and child.name not in reported:
                    reported.add(child.name)
                    print(f"{child.name} exited ({child.process.returncode}); see {child.log}")
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        cluster.close()


if __name__ == "__main__":
    main()
