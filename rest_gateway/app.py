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

from .auth import ApiKeyAuth
from .body_limit import BodySizeLimit
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
from .routes import SERVICE_NAME, VERSION, router
from .settings import GatewaySettings
from .ui import router as ui_router

# Reconnect quickly once the core is back, so the gateway recovers by itself.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]

DESCRIPTION = """REST and Server-Sent Events API of a local llama.cpp chat model.

The gateway calls the gRPC inference core (`llamachat.v1.ChatService`) for every request."""


def open_channel(settings: GatewaySettings) -> grpc.aio.Channel:
    """The channel to the core: TLS when ``GRPC_TLS_CA`` names what to trust."""
    options = [
        *RECONNECT_OPTIONS,
        ("grpc.max_receive_message_length", settings.grpc_max_receive_bytes),
    ]
    if settings.grpc_tls_ca is None:
        return grpc.aio.insecure_channel(settings.grpc_address, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=settings.grpc_tls_ca.read_bytes())
    return grpc.aio.secure_channel(settings.grpc_address, credentials, options=options)


def create_app(settings: GatewaySettings) -> FastAPI:
    """The gateway app; its lifespan owns one gRPC channel to the core."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with open_channel(settings) as channel:
            app.state.chat_stub = chat_pb2_grpc.ChatServiceStub(channel)
            app.state.health_stub = health_pb2_grpc.HealthStub(channel)
            yield

    app = FastAPI(
        title=SERVICE_NAME,
        version=VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = GatewayMetrics(restarts=settings.supervisor_restarts)
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
