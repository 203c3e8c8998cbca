"""One channel to each replica of the core, for what the gateway asks every
replica rather than one: ``/health`` (healthy while any replica serves) and
``/metrics`` (every replica's metrics, each series with a ``replica`` label).

The replicas are the addresses of ``GRPC_ADDRESS``; a ``dns:///`` name is
resolved again at each use, so that replicas which come and go are found.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from llamachat.v1 import chat_pb2, chat_pb2_grpc

from .affinity import REPLICA_KEY
from .core_channel import CoreAddress, ip_target

log = logging.getLogger(__name__)


@dataclass
class Replica:
    """One replica: its target, channel and stubs, and the name it gave."""

    target: str
    channel: grpc.aio.Channel
    chat: chat_pb2_grpc.ChatServiceStub = field(init=False)
    health: health_pb2_grpc.HealthStub = field(init=False)
    name: str = ""

    def __post_init__(self) -> None:
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.name = self.name or self.target.removeprefix("ipv4:").removeprefix("ipv6:")

    def heard(self, call_metadata: grpc.aio.Metadata | None) -> None:
        """Take the name the replica gives itself in a reply's metadata."""
        for key, value in call_metadata or ():
            if key == REPLICA_KEY:
                self.name = str(value)


@dataclass
class CoreHealth:
    """One replica's answer to a health check."""

    replica: Replica
    serving: bool
    model_loaded: bool
    detail: str | None = None


class Replicas:
    """The channels to each replica (``open_one`` opens one)."""

    def __init__(self, address: CoreAddress, open_one: Callable[[str], grpc.aio.Channel]) -> None:
        self._address = address
        self._open_one = open_one
        self._replicas: dict[str, Replica] = {}
        # Health checks and scrapes may overlap: one updates the table at a time.
        self._updating = asyncio.Lock()

    @property
    def balanced(self) -> bool:
        return self._address.balanced

    async def current(self) -> list[Replica]:
        """Every replica now (a DNS name is looked up again)."""
        targets = list(self._address.replicas)
        if self._address.dns_name is not None:
            host, port = self._address.dns_name
            try:
                found = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
                targets = sorted({ip_target(str(info[4][0]), port) for info in found})
            except OSError as error:
                log.warning("cannot resolve %s: %s", host, error)
                targets = list(self._replicas)  # the last ones known
        async with self._updating:
            for gone in set(self._replicas) - set(targets):
                await self._replicas.pop(gone).channel.close()
            for target in targets:
                if target not in self._replicas:
                    self._replicas[target] = Replica(target, self._open_one(target))
            return [self._replicas[target] for target in targets]

    async def close(self) -> None:
        for replica in self._replicas.values():
            await replica.channel.close()
        self._replicas.clear()

    async def health(self, deadline_s: float) -> list[CoreHealth]:
        """Every replica's health; for one not serving, why (its GetModel)."""
        return list(
            await asyncio.gather(*(check(replica, deadline_s) for replica in await self.current()))
        )

    async def metrics(self, deadline_s: float) -> list[tuple[Replica, str | None]]:
        """Every replica's metrics text (``None``: it did not answer)."""
        replicas = await self.current()
        texts = await asyncio.gather(*(scrape(replica, deadline_s) for replica in replicas))
        return list(zip(replicas, texts, strict=True))


async def check(replica: Replica, deadline_s: float) -> CoreHealth:
    try:
        reply = await replica.health.Check(
            health_pb2.HealthCheckRequest(service=""), timeout=deadline_s
        )
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return CoreHealth(replica, serving=True, model_loaded=True)
        model = await replica.chat.GetModel(chat_pb2.GetModelRequest(), timeout=deadline_s)
        return CoreHealth(
            replica,
            serving=False,
            model_loaded=model.loaded,
            detail=model.unavailable_reason or "The core is not serving",
        )
    except grpc.aio.AioRpcError as error:
        return CoreHealth(
            replica,
            serving=False,
            model_loaded=False,
            detail=f"The inference core is unreachable: {error.code().name}",
        )


async def scrape(replica: Replica, deadline_s: float) -> str | None:
    call = replica.chat.GetMetrics(chat_pb2.GetMetricsRequest(), timeout=deadline_s)
    try:
        reply = await call
    except grpc.aio.AioRpcError:
        return None
    replica.heard(await call.trailing_metadata())
    return reply.text


class Families:
    """Parsed metric families, as a collector ``generate_latest`` writes out."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def labelled(texts: list[tuple[str, str]]) -> str:
    """Many replicas' metrics (name, text) as one exposition: each family
    once, each sample with a ``replica`` label."""
    families: dict[str, Metric] = {}
    for name, text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            samples = [
                Sample(s.name, {**s.labels, "replica": name}, s.value, s.timestamp, s.exemplar)
                for s in family.samples
            ]
            if merged is family:
                family.samples = samples
            else:
                merged.samples.extend(samples)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families(list(families.values())))
    return generate_latest(registry).decode("utf-8")
