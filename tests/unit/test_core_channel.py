"""The gateway's channel to many cores: GRPC_ADDRESS parsing, the service
config, the routing keys, and ring_hash with health checking over three real
gRPC servers (fake engines) in this process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from pydantic import ValidationError

from inference_server.server import CoreServer, create_server
from llamachat.v1 import chat_pb2, chat_pb2_grpc
from rest_gateway.affinity import conversation_key, keyed, session_affinity, with_session_key
from rest_gateway.core_channel import (
    AddressError,
    channel_options,
    open_core_channel,
    parse_address,
    service_config,
)
from rest_gateway.settings import GatewaySettings
from tests.fake_engine import FakeEngine
from tests.unit.conftest import gateway_for


def test_one_host_port_or_unix_socket_is_one_core_as_before():
    for text in ("127.0.0.1:50051", "localhost:50051", "unix:/tmp/core.sock"):
        address = parse_address(text)
        assert (address.target, address.balanced, address.replicas) == (text, False, (text,))


def test_a_list_of_ip_addresses_is_one_ipv4_or_ipv6_target_of_many_replicas():
    address = parse_address("10.0.0.1:50051, 10.0.0.2:50052")
    assert address.balanced
    assert address.target == "ipv4:10.0.0.1:50051,10.0.0.2:50052"
    assert address.replicas == ("ipv4:10.0.0.1:50051", "ipv4:10.0.0.2:50052")
    six = parse_address("[::1]:1,[::2]:2")
    assert six.target == "ipv6:[::1]:1,[::2]:2"
    assert parse_address("ipv4:10.0.0.1:1,10.0.0.2:2").target == "ipv4:10.0.0.1:1,10.0.0.2:2"


def test_host_names_in_a_list_are_resolved_once_to_ip_addresses():
    address = parse_address("localhost:7001,127.0.0.1:7002")
    assert address.target == "ipv4:127.0.0.1:7001,127.0.0.1:7002"


def test_a_dns_name_is_left_to_grpcs_resolver_and_balanced():
    address = parse_address("dns:///core.example:50051")
    assert (address.target, address.balanced) == ("dns:///core.example:50051", True)
    assert address.dns_name == ("core.example", 50051)
    assert parse_address("dns://8.8.8.8/core.example:1").dns_name == ("core.example", 1)


@pytest.mark.parametrize(
    "text", ["", "10.0.0.1:1,10.0.0.2", "10.0.0.1:1,[::1]:2", "dns:///core", "a:99999,b:1"]
)
def test_an_address_grpc_cannot_take_is_refused_at_start(text):
    with pytest.raises(AddressError):
        parse_address(text)
    with pytest.raises(ValidationError):
        GatewaySettings(grpc_address=text)


def test_many_replicas_are_balanced_by_ring_hash_on_the_session_over_healthy_ones():
    config = service_config(balanced=True)
    assert config["loadBalancingConfig"] == [
        {"ring_hash_experimental": {"requestHashHeader": "x-session-id"}}
    ]
    assert config["healthCheckConfig"] == {"serviceName": "llamachat.v1.ChatService"}
    (method,) = config["methodConfig"]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "loadBalancingConfig" not in service_config(balanced=False)
    json.dumps(config)  # a service config is JSON


def test_a_new_session_gets_its_id_from_the_gateway_before_it_is_routed():
    sent, key = keyed(chat_pb2.ChatRequest(message="Hi"), ())
    assert key and sent.session_id == key and sent.message == "Hi"
    again, same = keyed(chat_pb2.ChatStreamRequest(message="Hi", session_id="s1"), ())
    assert (again.session_id, same) == ("s1", "s1")
    assert keyed(chat_pb2.GetModelRequest(), ()) == (chat_pb2.GetModelRequest(), None)


def test_a_conversation_is_keyed_by_its_first_messages_so_every_turn_has_one_key():
    def turn(*texts: str) -> chat_pb2.CompleteRequest:
        roles = [chat_pb2.ROLE_SYSTEM] + [chat_pb2.ROLE_USER, chat_pb2.ROLE_ASSISTANT] * 3
        return chat_pb2.CompleteRequest(
            messages=[
                chat_pb2.Message(role=r, content=t) for r, t in zip(roles, texts, strict=False)
            ]
        )

    first = conversation_key(turn("Be brief.", "Hi"))
    assert conversation_key(turn("Be brief.", "Hi", "Hello!", "Bye")) == first
    assert conversation_key(turn("Be brief.", "Hello")) != first
    # The client's X-Session-Id (or OpenAI's user) wins over the hash.
    options = with_session_key({"metadata": ()}, "header-key")
    assert with_session_key(options, "user") == options
    assert keyed(turn("Be brief.", "Hi"), options["metadata"])[1] == "header-key"


@pytest.fixture
async def three_cores() -> AsyncIterator[list[CoreServer]]:
    cores = []
    for index in range(3):
        core = await create_server("127.0.0.1:0", FakeEngine(), replica_name=f"core-{index}")
        await core.server.start()
        await core.set_serving(True)
        cores.append(core)
    yield cores
    for core in cores:
        await core.server.stop(None)


async def replica_of(stub: chat_pb2_grpc.ChatServiceStub, session: str) -> str:
    call = stub.Chat(chat_pb2.ChatRequest(message="Hi", session_id=session), timeout=10)
    await call
    return dict(await call.trailing_metadata())["x-core-replica"]


async def test_sessions_stay_on_one_replica_and_leave_one_that_stops_serving(three_cores):
    address = parse_address(",".join(f"127.0.0.1:{core.port}" for core in three_cores))
    options = channel_options(max_receive_bytes=1 << 20, keepalive_s=2, keepalive_timeout_s=3)
    channel = open_core_channel(address, options, interceptors=session_affinity())
    async with channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        sessions = [f"session-{n}" for n in range(12)]
        placed = {session: await replica_of(stub, session) for session in sessions}
        for session in sessions:  # every later turn lands where the first did
            assert await replica_of(stub, session) == placed[session]
        assert len(set(placed.values())) >= 2

        leaving = placed[sessions[0]]
        await three_cores[int(leaving[-1])].set_serving(False)
        # gRPC hears NOT_SERVING on its health watch; the sessions move then.
        moved = {session: await replica_of(stub, session) for session in sessions}
        while leaving in moved.values():
            moved = {session: await replica_of(stub, session) for session in sessions}
        for session in sessions:
            if placed[session] != leaving:
                assert moved[session] == placed[session]


async def test_round_robin_spreads_a_sessions_turns_over_every_replica(three_cores):
    """GRPC_LB_POLICY=round_robin, the comparison for what affinity is worth."""
    config = service_config(balanced=True, policy="round_robin")
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": "llamachat.v1.ChatService"}
    with pytest.raises(ValidationError):
        GatewaySettings(grpc_lb_policy="random")
    addresses = ",".join(f"127.0.0.1:{core.port}" for core in three_cores)
    address = parse_address(addresses)
    options = channel_options(max_receive_bytes=1 << 20, keepalive_s=2, keepalive_timeout_s=3)
    channel = open_core_channel(
        address, options, policy="round_robin", interceptors=session_affinity()
    )
    async with channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        answered = {await replica_of(stub, "one-session")}
        while len(answered) < len(three_cores):  # as each replica's connection is ready
            answered.add(await replica_of(stub, "one-session"))
    async with gateway_for(grpc_address=addresses, grpc_lb_policy="round_robin") as http:
        replicas: set[str] = set()
        while len(replicas) < len(three_cores):
            reply = await http.post("/chat", json={"message": "Hi", "session_id": "one"})
            replicas.add(reply.headers["x-core-replica"])


async def test_a_gateway_reply_names_the_replica_that_answered(core):
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}") as http:
        reply = await http.post("/chat", json={"message": "Hi"})
        streamed = await http.post("/chat/stream", json={"message": "Hi"})
        missing = await http.get("/sessions/nobody")
    name = reply.headers["x-core-replica"]
    assert name.endswith(f":{core.port}")
    assert streamed.headers["x-core-replica"] == name
    assert missing.status_code == 404 and missing.headers["x-core-replica"] == name


async def test_stateless_conversations_keep_their_replica_by_header_user_or_first_messages(
    three_cores,
):
    addresses = ",".join(f"127.0.0.1:{core.port}" for core in three_cores)
    system = {"role": "system", "content": "Be brief."}

    async def openai(turns: int, first: str, headers: dict | None = None, **extra) -> set[str]:
        """The replicas that answered ``turns`` turns of one conversation."""
        replicas = set()
        messages = [system, {"role": "user", "content": first}]
        for _ in range(turns):
            body = {"model": "any", "messages": messages, **extra}
            reply = await http.post("/v1/chat/completions", json=body, headers=headers)
            assert reply.status_code == 200, reply.text
            replicas.add(reply.headers["x-core-replica"])
            messages = [*messages, {"role": "assistant", "content": "Hello"}]
            messages = [*messages, {"role": "user", "content": "More"}]
        return replicas

    async def ollama(conversation: int) -> set[str]:
        replicas = set()
        messages = [{"role": "user", "content": f"Conversation {conversation}"}]
        for _ in range(3):
            body = {"model": "any", "messages": messages, "stream": False}
            reply = await http.post("/api/chat", json=body)
            assert reply.status_code == 200, reply.text
            replicas.add(reply.headers["x-core-replica"])
            messages = [*messages, {"role": "assistant", "content": "Yes"}, messages[0]]
        return replicas

    async with gateway_for(grpc_address=addresses) as http:
        by_hash = [await openai(3, f"Hi {n}") for n in range(12)]
        # The same first messages, different users: placed by the user.
        by_user = [await openai(2, "Hi", user=f"user-{n}") for n in range(12)]
        by_ollama = [await ollama(n) for n in range(12)]
        for placed in (by_hash, by_user, by_ollama):
            assert all(len(replicas) == 1 for replicas in placed)
            assert len(set.union(*placed)) >= 2  # spread over the replicas
        # X-Session-Id wins over user: one header, one replica, whatever the user.
        headed = set()
        for n in range(6):
            headed |= await openai(1, f"Hi {n}", {"X-Session-Id": "one"}, user=f"user-{n}")
        assert len(headed) == 1
