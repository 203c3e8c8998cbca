"""The gRPC server: the chat service, standard health and server reflection."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection as grpc_reflection

from llamachat.v1 import chat_pb2, chat_pb2_grpc
from llamachat_process.tenants import KeyRing

from .engine_api import Engine
from .interceptors import MalformedRequestInterceptor, TenantInterceptor
from .reflection import enable_server_reflection
from .servicer import ChatServicer

CHAT_SERVICE = chat_pb2.DESCRIPTOR.services_by_name["ChatService"].full_name


@dataclass
class CoreServer:
    """A created (not yet started) gRPC server and what controls it."""

    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING (model loaded) or NOT_SERVING for the server and the service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", CHAT_SERVICE):
            await self.health.set(service, status)


DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
# Clients may ping this often (the gateway's keepalive pings find a frozen core
# within seconds), also between calls; faster pings get the connection closed.
MIN_PING_INTERVAL_MS = 1000


class AddressInUse(OSError):
    """The gRPC address cannot be listened on."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of the server's certificate (chain) and private key."""

    certificate: Path
    private_key: Path

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key.read_bytes(), self.certificate.read_bytes())]
        )


async def create_server(
    address: str,
    engine: Engine,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keys: KeyRing | None = None,
    rate_limit_per_minute: int = 0,
    max_concurrent_rpcs: int | None = None,
    tls: TlsFiles | None = None,
    replica_name: str | None = None,
    max_connection_age_s: float = 0.0,
) -> CoreServer:
    """Build the server on ``address`` (a host:port, port 0 picking a free one,
    or ``unix:PATH``). Health says NOT_SERVING until ``set_serving(True)``.
    With ``keys``, calls other than health checks, GetModel and GetMetrics
    need one, which names the caller's tenant; ``rate_limit_per_minute`` limits
    each tenant's calls; past ``max_concurrent_rpcs`` calls at once (streams
    included) a call gets RESOURCE_EXHAUSTED; with ``tls``, the port speaks
    TLS only. ``replica_name`` (default HOSTNAME:PORT) is sent with every
    reply as ``x-core-replica`` metadata; past ``max_connection_age_s`` (0:
    never) a connection is asked to go away, so that its client reconnects and
    resolves the core's name again."""
    keys = keys or KeyRing()
    interceptors: list[grpc.aio.ServerInterceptor] = [
        TenantInterceptor(keys, rate_limit_per_minute),
        MalformedRequestInterceptor(),
    ]
    server = grpc.aio.server(
        interceptors=interceptors,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            # A second server on a busy port must fail, not share the port.
            ("grpc.so_reuseport", 0),
            *connection_options(max_connection_age_s),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_server_reflection(
        (
            CHAT_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            grpc_reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.credentials())
    except RuntimeError as error:
        raise AddressInUse(f"Cannot listen on {address}: {error}") from error
    where = address if address.startswith("unix:") else port
    replica = replica_name or f"{socket.gethostname()}:{where}"
    chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(engine, keys, replica), server)
    core = CoreServer(server=server, health=health_servicer, port=port)
    await core.set_serving(False)
    return core


def connection_options(max_connection_age_s: float) -> list[tuple[str, int]]:
    """Keepalive pings allowed (also with no call open), and the connections'
    maximum age when there is one."""
    options = [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ]
    if max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", round(max_connection_age_s * 1000)))
    return options
