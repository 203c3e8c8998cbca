"""The gRPC server: the chat service, standard health and server reflection."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llamachat.v1 import chat_pb2, chat_pb2_grpc

from .engine import Engine
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


class AddressInUse(OSError):
    """The gRPC address cannot be listened on."""


async def create_server(
    address: str, engine: Engine, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> CoreServer:
    """Build the server on ``address`` (port 0 picks a free port). Health says
    NOT_SERVING until ``set_serving(True)``."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            # A second server on a busy port must fail, not share the port.
            ("grpc.so_reuseport", 0),
        ]
    )
    chat_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(engine), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            CHAT_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise AddressInUse(f"Cannot listen on {address}: {error}") from error
    core = CoreServer(server=server, health=health_servicer, port=port)
    await core.set_serving(False)
    return core
