"""The gRPC servicer over a real channel, against the fake engine."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from inference_server.server import create_server
from llamachat.v1 import chat_pb2
from tests.bad_inputs import bad_chat_inputs
from tests.fake_engine import FAKE_N_CTX, FakeEngine


async def test_chat_returns_the_reply_session_and_counts(stub, engine):
    reply = await stub.Chat(chat_pb2.ChatRequest(message="Hi there", temperature=0))
    assert reply.text == "Hello, world!"
    assert reply.session_id in engine.store.list_sessions("default", 1000).ids
    assert reply.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert reply.usage.prompt_tokens == len("Hi there")
    assert reply.usage.completion_tokens == 4


async def test_unset_sampling_fields_reach_the_engine_as_unset(stub, engine):
    await stub.Chat(chat_pb2.ChatRequest(message="Hi", top_p=0.5))
    sampling = engine.requests[-1].sampling
    assert sampling.top_p == 0.5
    assert sampling.temperature is None and sampling.max_tokens is None and sampling.seed is None


async def test_temperature_zero_is_sent_as_set_not_as_default(stub, engine):
    await stub.Chat(chat_pb2.ChatRequest(message="Hi", temperature=0.0))
    assert engine.requests[-1].sampling.temperature == 0.0


async def test_stream_sends_pieces_in_order_then_a_final_message(stub):
    messages = [m async for m in stub.ChatStream(chat_pb2.ChatStreamRequest(message="Hi"))]
    assert [m.text for m in messages[:-1]] == ["Hello", ",", " world", "!"]
    assert all(m.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    last = messages[-1]
    assert last.text == ""
    assert last.session_id
    assert last.finish_reason == chat_pb2.FINISH_REASON_STOP
    assert last.usage.completion_tokens == 4


async def test_max_tokens_bounds_the_reply_and_says_length(stub):
    reply = await stub.Chat(chat_pb2.ChatRequest(message="Hi", max_tokens=2))
    assert reply.text == "Hello,"
    assert reply.finish_reason == chat_pb2.FINISH_REASON_LENGTH
    assert reply.usage.completion_tokens == 2


async def test_a_given_session_id_creates_then_continues_that_session(stub, engine):
    await stub.Chat(chat_pb2.ChatRequest(message="one", session_id="my-session"))
    await stub.Chat(chat_pb2.ChatRequest(message="two", session_id="my-session"))
    assert [e.user for e in engine.store.history("default", "my-session")] == ["one", "two"]
    listed = await stub.ListSessions(chat_pb2.ListSessionsRequest())
    assert list(listed.session_ids) == ["my-session"]


async def test_clear_forgets_the_session_and_unknown_is_not_found(stub, engine):
    await stub.Chat(chat_pb2.ChatRequest(message="one", session_id="s1"))
    reply = await stub.Clear(chat_pb2.ClearRequest(session_id="s1"))
    assert reply.session_id == "s1"
    assert engine.store.list_sessions("default", 1000).ids == []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Clear(chat_pb2.ClearRequest(session_id="s1"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "Session not found"


async def test_error_mid_stream_ends_the_stream_with_internal(stub, engine):
    engine.fail_after = 2
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for message in stub.ChatStream(chat_pb2.ChatStreamRequest(message="Hi")):
            received.append(message.text)
    assert received == ["Hello", ","]
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert "Generation error: the model fell over" in (caught.value.details() or "")
    assert engine.store.list_sessions("default", 1000).ids == []  # no half exchange kept


async def test_cancelling_mid_stream_closes_the_engine_stream(stub, engine):
    engine.hang_after = 2
    call = stub.ChatStream(chat_pb2.ChatStreamRequest(message="Hi"))
    assert (await call.read()).text == "Hello"
    assert (await call.read()).text == ","
    call.cancel()
    await asyncio.wait_for(engine.cancelled.wait(), timeout=5)
    assert engine.pieces_sent == 2
    assert engine.store.list_sessions("default", 1000).ids == []


@pytest.mark.parametrize("rpc", ["Chat", "ChatStream"])
@pytest.mark.parametrize(("fields", "detail"), bad_chat_inputs(FAKE_N_CTX))
async def test_bad_input_is_invalid_argument_with_a_clear_detail(stub, rpc, fields, detail):
    request_type = chat_pb2.ChatRequest if rpc == "Chat" else chat_pb2.ChatStreamRequest
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call = getattr(stub, rpc)(request_type(**fields))
        if rpc == "Chat":
            await call
        else:
            [m async for m in call]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert detail in (caught.value.details() or "")


async def test_requests_before_the_model_is_loaded_are_unavailable(stub, engine):
    engine.ready = False
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Chat(chat_pb2.ChatRequest(message="Hi"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "Model not loaded"


async def test_health_is_not_serving_until_set_serving():
    core = await create_server("127.0.0.1:0", FakeEngine())
    await core.server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{core.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "llamachat.v1.ChatService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            await core.set_serving(True)
            for service in ("", "llamachat.v1.ChatService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await core.server.stop(None)


async def test_reflection_describes_the_service_without_a_proto_file(channel):
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="llamachat.v1.ChatService"),
    ]
    listed, described = [r async for r in stub.ServerReflectionInfo(iter(requests))]
    services = {s.name for s in listed.list_services_response.service}
    assert {"llamachat.v1.ChatService", "grpc.health.v1.Health"} <= services
    proto = descriptor_pb2.FileDescriptorProto.FromString(
        described.file_descriptor_response.file_descriptor_proto[0]
    )
    assert {m.name for m in proto.service[0].method} == {
        "Chat",
        "ChatStream",
        "Clear",
        "ListSessions",
        "GetSession",
        "Complete",
        "CompleteStream",
        "GetModel",
        "GetMetrics",
    }


async def test_a_request_over_the_message_limit_is_resource_exhausted(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Chat(chat_pb2.ChatRequest(message="x" * (1024 * 1024 + 1)))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("method", ["Chat", "ChatStream"])
async def test_an_overloaded_engine_is_resource_exhausted_at_once(stub, engine, method):
    engine.overloaded = True
    request = getattr(chat_pb2, f"{method}Request")(message="Hi")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        call = getattr(stub, method)(request)
        if method == "ChatStream":
            async for _ in call:
                pass
        else:
            await call
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == "Server busy: 36 requests are already running or waiting"
