"""A turn's request id on its way (REST ``Idempotency-Key`` -> gRPC
``request_id`` -> engine), and a history that changed during a turn
(``HistoryChanged``) as each edge answers it: ABORTED, HTTP 409."""

from __future__ import annotations

from collections.abc import AsyncGenerator

import grpc
import httpx
import pytest

from inference_server.domain import ChatEvent, ChatRequest, TextDelta
from inference_server.errors import HistoryChanged
from llamachat.v1 import chat_pb2, chat_pb2_grpc
from tests.fake_engine import FakeEngine


class MayFindItCleared(FakeEngine):
    """With ``cleared_meanwhile``: generates a piece, then finds the session
    cleared, as the real engine does when its commit meets another version."""

    cleared_meanwhile = False

    async def chat_stream(self, request: ChatRequest) -> AsyncGenerator[ChatEvent, None]:
        if not self.cleared_meanwhile:
            async for event in super().chat_stream(request):
                yield event
            return
        yield TextDelta("Hel")
        raise HistoryChanged(request.session_id or "")


@pytest.fixture
def engine() -> MayFindItCleared:
    return MayFindItCleared()


async def test_the_idempotency_key_reaches_the_engine_as_the_request_id(
    http: httpx.AsyncClient, engine: FakeEngine
):
    body = {"message": "Hi", "session_id": "s"}
    reply = await http.post("/chat", json=body, headers={"Idempotency-Key": "k-1"})
    assert reply.status_code == 200
    async with http.stream(
        "POST", "/chat/stream", json=body, headers={"Idempotency-Key": "k-2"}
    ) as reply:
        await reply.aread()
    await http.post("/chat", json=body)
    await http.post("/chat", json=body)
    ids = [r.request_id for r in engine.requests]  # type: ignore[union-attr]
    assert ids[:2] == ["k-1", "k-2"]
    # Without a key the gateway makes one per turn (its own retries reuse it).
    assert ids[2] and ids[3] and len({*ids}) == 4


async def test_an_over_long_request_id_is_a_400_naming_it(http: httpx.AsyncClient):
    reply = await http.post("/chat", json={"message": "Hi"}, headers={"Idempotency-Key": "k" * 300})
    assert reply.status_code == 400
    assert "request_id must be at most 256 bytes" in reply.json()["detail"]


async def test_a_history_that_changed_is_aborted_over_grpc(
    stub: chat_pb2_grpc.ChatServiceStub, engine: MayFindItCleared
):
    engine.cleared_meanwhile = True
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Chat(chat_pb2.ChatRequest(message="Hi", session_id="s"))
    assert caught.value.code() is grpc.StatusCode.ABORTED
    assert "history changed" in (caught.value.details() or "")


async def test_a_history_that_changed_is_a_409_that_says_so(
    http: httpx.AsyncClient, engine: MayFindItCleared
):
    engine.cleared_meanwhile = True
    reply = await http.post("/chat", json={"message": "Hi", "session_id": "s"})
    assert reply.status_code == 409
    assert "this reply was not kept" in reply.json()["detail"]
