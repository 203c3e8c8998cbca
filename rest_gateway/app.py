"""``create_app(settings)``: the FastAPI application of the gateway."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from grpc_health.v1 import health_pb2_grpc
from starlette.exceptions import HTTPException as StarletteHTTPException

from llamachat.v1 import chat_pb2_grpc

from .affinity import ReplicaHeader, session_affinity
from .auth import ApiKeyAuth
from .body_limit import BodySizeLimit
from .core_channel import channel_options, open_channel, open_core_channel, parse_address
from .disconnect import ClientDisconnected
from .errors import (
    ApiError,
    handle_api_error,
    handle_client_disconnected,
    handle_http_exception,
    handle_rpc_error,
    handle_validation_error,
)
from .hosts import TrustedHosts, allowed_names
from .metrics import GatewayMetrics
from .metrics import router as metrics_router
from .observe import RequestObserver
from .ollama_routes import JsonBodies
from .ollama_routes import router as ollama_router
from .openai_completions import router as completions_router
from .openai_routes import router as openai_router
from .replicas import Replicas
from .routes import SERVICE_NAME, VERSION, router
from .settings import GatewaySettings
from .ui import router as ui_router

DESCRIPTION = """REST and Server-Sent Events API of a local llama.cpp chat model.

The gateway calls the gRPC inference core (`llamachat.v1.ChatService`) for every request."""


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway app; its lifespan owns the gRPC channel the routes call the
    core (or its replicas) on, and one channel to each replica for /health
    and /metrics (see ``core_channel`` and ``replicas``)."""
    address = parse_address(settings.grpc_address)
    options = channel_options(
        max_receive_bytes=settings.grpc_max_receive_bytes,
        keepalive_s=settings.grpc_keepalive_s,
        keepalive_timeout_s=settings.grpc_keepalive_timeout_s,
    )
    tls_ca = settings.grpc_tls_ca.read_bytes() if settings.grpc_tls_ca else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        channel = open_core_channel(
            address,
            options,
            policy=settings.grpc_lb_policy,
            tls_ca=tls_ca,
            interceptors=session_affinity(),
        )
        replica_options = [*options, *address.replica_options()]
        replicas = Replicas(
            address, lambda target: open_channel(target, replica_options, tls_ca=tls_ca)
        )
        async with channel:
            app.state.chat_stub = chat_pb2_grpc.ChatServiceStub(channel)
            app.state.health_stub = health_pb2_grpc.HealthStub(channel)
            app.state.replicas = replicas
            try:
                yield
            finally:
                await replicas.close()

    app = FastAPI(
        title=SERVICE_NAME,
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics(
        restarts=settings.supervisor_restarts, replicated=address.balanced
    )
    app.state.started = int(time.time())
    keys = settings.key_ring()
    # The last added runs first: the observer (which sees every answer), the
    # Host check, CORS, then the key, then the body limit, so a 401 or a 413
    # carries the CORS headers too, and no body is read unauthorized.
    app.add_middleware(JsonBodies)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if keys.required:
        app.add_middleware(ApiKeyAuth, keys=keys)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_credentials=False,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    app.add_middleware(TrustedHosts, names=allowed_names(settings.allowed_hosts, settings.host))
    app.add_middleware(RequestObserver, metrics=app.state.metrics)
    app.add_middleware(ReplicaHeader)
    app.add_exception_handler(grpc.aio.AioRpcError, handle_rpc_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(ClientDisconnected, handle_client_disconnected)
    app.add_exception_handler(ApiError, handle_api_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.include_router(router)
    app.include_router(openai_router)
    app.include_router(completions_router)
    app.include_router(ollama_router)
    app.include_router(metrics_router)
    app.include_router(ui_router)
    return app
