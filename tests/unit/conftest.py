"""A real gRPC server on a free port around the fake engine, and clients of it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from inference_server.server import CoreServer, create_server
from llamachat.v1 import chat_pb2_grpc
from rest_gateway.app import create_app
from rest_gateway.connections import server_config
from rest_gateway.settings import GatewaySettings
from tests.fake_engine import FakeEngine


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def core(engine: FakeEngine) -> AsyncIterator[CoreServer]:
    server = await create_server("127.0.0.1:0", engine)
    await server.server.start()
    await server.set_serving(True)
    yield server
    await server.server.stop(None)


@pytest.fixture
async def channel(core: CoreServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> chat_pb2_grpc.ChatServiceStub:
    return chat_pb2_grpc.ChatServiceStub(channel)


@asynccontextmanager
async def serve_app(app: FastAPI, settings: GatewaySettings) -> AsyncIterator[str]:
    """Serve ``app`` as the gateway's ``main`` does (uvicorn, its connection
    limits) on a free port of 127.0.0.1; yields its base URL."""
    config = server_config(app, settings, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def gateway_for(**settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of a gateway started with ``settings``."""
    gateway = GatewaySettings(**settings)
    async with serve_app(create_app(gateway), gateway) as url:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            yield client


@pytest.fixture
async def http(core: CoreServer) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of a gateway in front of the core with the fake engine."""
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}") as client:
        yield client
