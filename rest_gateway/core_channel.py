"""The gateway's channel to its inference core, or to many replicas of it.

``GRPC_ADDRESS`` names one core (``HOST:PORT``, ``unix:PATH``) or many: a
comma-separated list (``10.0.0.1:50051,10.0.0.2:50051``, or gRPC's own
``ipv4:``/``ipv6:`` list targets) or a DNS name that resolves to every
replica (``dns:///core.example:50051``). A list's host names are resolved
once, when the gateway starts (to their IPv4 addresses, or IPv6 ones when a
name has none: one list cannot mix them); a ``dns:///`` name is resolved again by gRPC
(when a connection ends, and at least every ``MAX_CONNECTION_AGE_S`` of the
core), so replicas may come and go.

With many replicas the channel balances with gRPC's own ``ring_hash`` policy,
keyed on the ``x-session-id`` metadata of each call (gRFC A76's
``requestHashHeader``): every turn of a session goes to the replica that holds
its KV cache while the replicas stay the same. gRPC checks each replica's
health (``healthCheckConfig``: a replica NOT_SERVING gets no calls, and its
sessions go to the next replica on the ring) and retries a call that failed
with UNAVAILABLE before any reply came (``retryPolicy``). Keepalive pings find
a replica that stopped answering (frozen, or its machine gone) within
``GRPC_KEEPALIVE_S + GRPC_KEEPALIVE_TIMEOUT_S`` seconds.

``GRPC_LB_POLICY=round_robin`` spreads the calls over the replicas in turn
instead, a session's turns included: every turn then rebuilds its KV cache
where it lands. It is there to measure what affinity is worth
(``make bench-cluster``), not for serving.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from llamachat.v1 import chat_pb2

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name
# The metadata key whose value places a call on the ring.
SESSION_KEY = "x-session-id"
# grpcio (C-core) reads ring_hash's requestHashHeader only with this set
# (gRFC A76 is still experimental there); without it, ring_hash would find no
# hash to route by and fail every call.
RING_HASH_HEADER_ENV = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
RING_HASH_POLICY = "ring_hash_experimental"
# GRPC_LB_POLICY: how a gateway spreads calls over many replicas.
LbPolicy = Literal["ring_hash", "round_robin"]

# Reconnect quickly once a core is back, so the gateway recovers by itself.
# (C-core also takes the minimum backoff as the connection attempt's timeout:
# a frozen replica fails its attempt within about a second, not 20 s.)
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


class AddressError(ValueError):
    """``GRPC_ADDRESS`` names no core, or a list gRPC cannot take."""


@dataclass(frozen=True)
class CoreAddress:
    """What ``GRPC_ADDRESS`` names: ``target`` for the gRPC channel, whether
    it names many replicas (``balanced``), and how to find each replica:
    ``replicas`` (fixed targets) or ``dns_name`` (host, port) to resolve."""

    target: str
    balanced: bool
    replicas: tuple[str, ...] = ()
    dns_name: tuple[str, int] | None = None

    def replica_options(self) -> list[tuple[str, Any]]:
        """Options of a channel to one of a DNS name's replicas: the name as
        its authority, which a TLS certificate names."""
        if self.dns_name is None:
            return []
        host, port = self.dns_name
        return [("grpc.default_authority", f"{host}:{port}")]


def split_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` as (host, port)."""
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"{text!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def ip_target(host: str, port: int) -> str:
    """gRPC's target of one IP address."""
    if ipaddress.ip_address(host).version == 6:
        return f"ipv6:[{host}]:{port}"
    return f"ipv4:{host}:{port}"


def list_target(addresses: list[tuple[str, int]]) -> str:
    """One ``ipv4:`` or ``ipv6:`` target of many IP addresses."""
    versions = {ipaddress.ip_address(host).version for host, _ in addresses}
    if len(versions) > 1:
        raise AddressError("a list of cores takes IPv4 or IPv6 addresses, not both")
    if versions == {6}:
        return "ipv6:" + ",".join(f"[{host}]:{port}" for host, port in addresses)
    return "ipv4:" + ",".join(f"{host}:{port}" for host, port in addresses)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def resolve(host: str, port: int) -> list[tuple[str, int]]:
    """The IPv4 addresses of ``host`` (its IPv6 ones if it has none; an IP
    address stands for itself), in a stable order."""
    if is_ip(host):
        return [(host, port)]
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            found = socket.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        if found:
            return sorted({(str(info[4][0]), port) for info in found})
    raise AddressError(f"cannot resolve {host!r}")


def parse_address(text: str) -> CoreAddress:
    """Read ``GRPC_ADDRESS``; host names in a list are resolved here, once."""
    text = text.strip()
    if not text:
        raise AddressError("GRPC_ADDRESS is empty")
    if text.startswith("unix:"):
        return CoreAddress(target=text, balanced=False, replicas=(text,))
    if text.startswith("dns:"):
        # dns:///host:port, or dns://resolver/host:port (gRPC's own resolver)
        name = text.removeprefix("dns:").lstrip("/")
        if text.startswith("dns://") and not text.startswith("dns:///"):
            name = name.partition("/")[2]
        return CoreAddress(target=text, balanced=True, dns_name=split_host_port(name))
    scheme = next((s for s in ("ipv4:", "ipv6:") if text.startswith(s)), None)
    entries = [entry for entry in text.removeprefix(scheme or "").split(",") if entry.strip()]
    if scheme is None and len(entries) == 1:
        return CoreAddress(target=text, balanced=False, replicas=(text,))
    addresses = [address for entry in entries for address in resolve(*split_host_port(entry))]
    if not addresses:
        raise AddressError(f"{text!r} names no core")
    unique = list(dict.fromkeys(addresses))
    return CoreAddress(
        target=list_target(unique),
        balanced=True,
        replicas=tuple(ip_target(host, port) for host, port in unique),
    )


def service_config(balanced: bool, policy: LbPolicy = "ring_hash") -> dict[str, Any]:
    """The channel's service config: retries on UNAVAILABLE for every call
    (gRPC retries only while no reply has come: a stream that has sent text
    is not repeated); with many replicas, ring_hash on ``x-session-id`` (or
    ``round_robin``, as ``policy`` says) over the replicas whose health
    service says SERVING."""
    config: dict[str, Any] = {
        "methodConfig": [{"name": [{"service": CHAT_SERVICE}], "retryPolicy": RETRY_POLICY}],
    }
    if balanced:
        if policy == "ring_hash":
            balancer = {RING_HASH_POLICY: {"requestHashHeader": SESSION_KEY}}
        else:
            balancer = {"round_robin": {}}
        config["loadBalancingConfig"] = [balancer]
        config["healthCheckConfig"] = {"serviceName": CHAT_SERVICE}
    return config


def channel_options(
    *, max_receive_bytes: int, keepalive_s: float, keepalive_timeout_s: float
) -> list[tuple[str, Any]]:
    """Options of every channel to a core: quick reconnects, keepalive pings
    (also between calls; the core allows one a second), the largest reply."""
    return [
        *RECONNECT_OPTIONS,
        ("grpc.max_receive_message_length", max_receive_bytes),
        ("grpc.keepalive_time_ms", round(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive_timeout_s * 1000)),
        # grpcio 1.85 also waits out its ping timeout (default 60 s) for an
        # unanswered keepalive ping: without this, a frozen core held its
        # calls for a minute, not seconds.
        ("grpc.http2.ping_timeout_ms", round(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def open_channel(
    target: str,
    options: list[tuple[str, Any]],
    *,
    tls_ca: bytes | None = None,
    interceptors: list[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A channel to ``target``: TLS when ``tls_ca`` says what to trust."""
    if tls_ca is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)


def open_core_channel(
    address: CoreAddress,
    options: list[tuple[str, Any]],
    *,
    policy: LbPolicy = "ring_hash",
    tls_ca: bytes | None = None,
    interceptors: list[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """The channel the routes call the core(s) on."""
    if address.balanced and policy == "ring_hash":
        os.environ[RING_HASH_HEADER_ENV] = "true"
    config = ("grpc.service_config", json.dumps(service_config(address.balanced, policy)))
    return open_channel(
        address.target, [*options, config], tls_ca=tls_ca, interceptors=interceptors
    )
