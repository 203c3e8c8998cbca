"""The OpenAI-compatible endpoints over real HTTP, in front of a real gRPC
server with the fake engine: shapes, streaming, and errors in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from inference_server.domain import Role
from tests.fake_engine import FAKE_N_CTX
from tests.unit.conftest import gateway_for

COMPLETIONS = "/v1/chat/completions"


def body(**fields):
    return {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}], **fields}


def sse_data(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


async def test_models_lists_the_served_model(http):
    reply = await http.get("/v1/models")
    assert reply.status_code == 200
    listed = reply.json()
    assert listed["object"] == "list"
    (card,) = listed["data"]
    assert card["id"] == "fake-model" and card["object"] == "model"
    assert card["context_length"] == FAKE_N_CTX and isinstance(card["created"], int)
    one = await http.get("/v1/models/fake-model")
    assert one.status_code == 200 and one.json() == card


async def test_completion_has_openai_shape_usage_and_finish_reason(http, engine):
    reply = await http.post(COMPLETIONS, json=body(max_tokens=2, temperature=0, seed=3))
    assert reply.status_code == 200
    completion = reply.json()
    assert completion["object"] == "chat.completion"
    assert completion["id"].startswith("chatcmpl-")
    assert completion["model"] == "fake-model"
    assert completion["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello,"},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    assert completion["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "total_tokens": 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    (request,) = engine.requests
    assert request.sampling.max_tokens == 2 and request.sampling.temperature == 0
    assert request.sampling.seed == 3 and request.sampling.top_p is None


async def test_roles_and_text_parts_reach_the_engine_and_no_session_is_kept(http, engine):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "!"}],
        },
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Again"},
    ]
    reply = await http.post(COMPLETIONS, json=body(messages=messages))
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["finish_reason"] == "stop"
    (request,) = engine.requests
    assert [(m.role, m.content) for m in request.messages] == [
        (Role.SYSTEM, "Be brief."),
        (Role.USER, "Hi !"),
        (Role.ASSISTANT, ""),
        (Role.USER, "Again"),
    ]
    assert (await http.get("/sessions")).json()["count"] == 0


@pytest.mark.parametrize(("stop", "passed"), [("\n", ("\n",)), (["a", "b"], ("a", "b"))])
async def test_stop_sequences_reach_the_engine(http, engine, stop, passed):
    assert (await http.post(COMPLETIONS, json=body(stop=stop))).status_code == 200
    assert engine.requests[0].stop == passed


async def test_more_than_four_or_empty_stop_sequences_are_400(http):
    too_many = await http.post(COMPLETIONS, json=body(stop=list("abcde")))
    assert_openai_error(too_many, 400, "invalid_request_error", "at most 4")
    empty = await http.post(COMPLETIONS, json=body(stop=[""]))
    assert_openai_error(empty, 400, "invalid_request_error", "must not be empty")
    too_long = await http.post(COMPLETIONS, json=body(stop=["x" * 129]))
    assert_openai_error(too_long, 400, "invalid_request_error", "at most 128 characters")


async def test_max_completion_tokens_wins_over_max_tokens(http, engine):
    await http.post(COMPLETIONS, json=body(max_tokens=3, max_completion_tokens=1))
    assert engine.requests[0].sampling.max_tokens == 1


async def test_stream_sends_chunks_then_finish_then_usage_then_done(http):
    reply = await http.post(
        COMPLETIONS, json=body(stream=True, stream_options={"include_usage": True})
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_data(reply.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    contents = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
    assert contents == ["Hello", ",", " world", "!"]
    finish = chunks[-2]["choices"][0]
    assert finish["delta"] == {} and finish["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 4,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_stream_without_include_usage_sends_no_usage_chunk(http):
    reply = await http.post(COMPLETIONS, json=body(stream=True))
    chunks = [json.loads(event) for event in sse_data(reply.text)[:-1]]
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_error_mid_stream_is_an_openai_error_event_then_done(http, engine):
    engine.fail_after = 2
    reply = await http.post(COMPLETIONS, json=body(stream=True))
    events = sse_data(reply.text)
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "the model fell over" in error["message"]


def assert_openai_error(reply, status: int, kind: str, *words: str, param=None, code=None):
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == kind
    assert all(word in error["message"] for word in words), error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"n": 2}, "n", ["n=1"]),
        ({"functions": [{"name": "f"}]}, "functions", ["send tools"]),
        ({"top_logprobs": 3}, "top_logprobs", ["needs logprobs: true"]),
        ({"stream_options": {"include_usage": True}}, "stream_options", ["stream is true"]),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            ["json_schema.schema"],
        ),
        ({"logit_bias": {"abc": 5}}, "logit_bias", ["'abc' is not a token id"]),
    ],
)
async def test_unsupported_parameters_are_400_naming_them(http, engine, fields, param, words):
    reply = await http.post(COMPLETIONS, json=body(**fields))
    assert_openai_error(reply, 400, "invalid_request_error", *words, param=param)
    assert engine.requests == []


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"temperature": 3}, ["temperature must be between 0 and 2, got 3"]),
        ({"frequency_penalty": 2.5}, ["frequency_penalty must be between -2 and 2"]),
        ({"presence_penalty": -3}, ["presence_penalty must be between -2 and 2"]),
        ({"top_k": 5, "min_p": 1.5}, ["min_p must be between 0 and 1"]),
        ({"repeat_penalty": 0}, ["repeat_penalty must be above 0"]),
        ({"logit_bias": {"5": 101}}, ["logit_bias[5] must be between -100 and 100"]),
        ({"max_tokens": 0}, ["max_tokens must be between 1"]),
        ({"messages": []}, ["at least one message"]),
        ({"messages": [{"role": "user", "content": "  "}]}, ["every message is empty"]),
        ({"messages": [{"role": "robot", "content": "x"}]}, ["messages[0].role", "'robot'"]),
        ({"messages": [{"role": "user", "content": "x" * FAKE_N_CTX}]}, ["context"]),
    ],
)
async def test_bad_values_are_400_in_openai_shape(http, fields, words):
    reply = await http.post(COMPLETIONS, json=body(**fields))
    assert_openai_error(reply, 400, "invalid_request_error", *words)
    if len(fields) == 1 and "messages" not in fields:
        assert reply.json()["error"]["param"] == next(iter(fields))  # the field at fault


async def test_a_context_overflow_has_the_code_clients_act_on(http):
    long = [{"role": "user", "content": "x" * FAKE_N_CTX}]
    reply = await http.post(COMPLETIONS, json=body(messages=long))
    assert_openai_error(
        reply, 400, "invalid_request_error", "maximum context length", param="messages",
        code="context_length_exceeded",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", ["JSON decode error"]),
        (json.dumps({"messages": []}).encode(), ["model", "Field required"]),
        (json.dumps(body(temperature="hot")).encode(), ["temperature"]),
    ],
)
async def test_malformed_bodies_are_400_in_openai_shape(http, content, words):
    reply = await http.post(
        COMPLETIONS, content=content, headers={"Content-Type": "application/json"}
    )
    assert_openai_error(reply, 400, "invalid_request_error", *words)


async def test_any_model_name_is_served_by_the_one_model(http, engine):
    reply = await http.post(COMPLETIONS, json=body(model="gpt-3.5-turbo"))
    assert reply.status_code == 200 and reply.json()["model"] == "fake-model"
    assert (await http.get("/v1/models/gpt-3.5-turbo")).status_code == 404  # not listed


async def test_with_strict_names_an_unknown_model_is_404_and_aliases_are_listed(core, engine):
    settings = {"strict_model_names": True, "model_aliases": "smol,tiny"}
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}", **settings) as http:
        reply = await http.post(COMPLETIONS, json=body(model="gpt-4o"))
        assert_openai_error(
            reply, 404, "not_found_error", "'gpt-4o'", "'fake-model'", param="model",
            code="model_not_found",
        )  # fmt: skip
        assert engine.requests == []
        listed = [card["id"] for card in (await http.get("/v1/models")).json()["data"]]
        assert listed == ["fake-model", "smol", "tiny"]
        assert (await http.post(COMPLETIONS, json=body(model="tiny"))).status_code == 200
        assert (await http.get("/v1/models/smol")).json()["id"] == "smol"
        raw = '{"model": "\\ud800", "messages": [{"role": "user", "content": "x"}]}'
        headers = {"Content-Type": "application/json"}
        surrogate = await http.post(COMPLETIONS, content=raw, headers=headers)
        assert surrogate.status_code == 404 and "does not exist" in surrogate.text


async def test_overload_is_429_rate_limit_error_with_retry_after(http, engine):
    engine.overloaded = True
    reply = await http.post(COMPLETIONS, json=body())
    assert_openai_error(reply, 429, "rate_limit_error")
    assert reply.headers["retry-after"] == "1"


async def test_model_loading_is_503_in_openai_shape(http, engine):
    engine.ready = False
    reply = await http.post(COMPLETIONS, json=body(model="fake-model"))
    assert_openai_error(reply, 503, "service_unavailable")


async def test_unknown_v1_paths_are_404_in_openai_shape_and_others_keep_detail(http):
    assert_openai_error(await http.get("/v1/nothing"), 404, "not_found_error")
    assert (await http.get("/nothing")).json() == {"detail": "Not Found"}


async def test_a_missing_api_key_is_401_in_openai_shape_on_v1_only(core):
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}", api_key="k") as http:
        reply = await http.post(COMPLETIONS, json=body())
        assert_openai_error(reply, 401, "authentication_error", code="invalid_api_key")
        assert "detail" in (await http.get("/sessions")).json()
        authorized = await http.post(
            COMPLETIONS, json=body(), headers={"Authorization": "Bearer k"}
        )
        assert authorized.status_code == 200


async def test_client_disconnect_mid_stream_cancels_generation_and_is_counted_499(http, engine):
    engine.hang_after = 2
    async with http.stream("POST", COMPLETIONS, json=body(stream=True)) as reply:
        lines = reply.aiter_lines()
        contents: list[str] = []
        while len(contents) < 3:  # the role chunk, then two pieces
            line = await anext(lines)
            if line.startswith("data: "):
                contents.append(json.loads(line[6:])["choices"][0]["delta"]["content"])
    await asyncio.wait_for(engine.cancelled.wait(), timeout=5)
    assert contents == ["", "Hello", ","] and engine.pieces_sent == 2
    scraped = (await http.get("/metrics")).text
    assert (
        'llamachat:http_requests_total{endpoint="/v1/chat/completions",method="POST",'
        'status="499"} 1.0' in scraped
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_client_leaving_before_the_first_token_cancels_generation(core, engine, stream):
    engine.hang_after = 0
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}") as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(COMPLETIONS, json=body(stream=stream), timeout=0.5)
        await asyncio.wait_for(engine.cancelled.wait(), timeout=5)
    assert engine.pieces_sent == 0


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (
            '{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}',
            ["surrogates not allowed"],
        ),
        ('{"model": "fake-model", "messages": [{"role": "\\ud800", "content": "x"}]}', ["role"]),
    ],
)
async def test_lone_surrogates_are_a_400_or_404_never_a_500(http, engine, raw, words):
    reply = await http.post(COMPLETIONS, content=raw, headers={"Content-Type": "application/json"})
    assert reply.status_code in (400, 404), reply.text
    assert all(word in reply.json()["error"]["message"] for word in words)
    assert engine.requests == []


async def test_a_reply_the_core_stopped_early_is_503_not_a_finished_reply(http, engine):
    engine.stopped_early = True
    assert_openai_error(await http.post(COMPLETIONS, json=body()), 503, "service_unavailable")
    streamed = sse_data((await http.post(COMPLETIONS, json=body(stream=True))).text)
    assert streamed[-1] == "[DONE]"
    assert json.loads(streamed[-2])["error"]["type"] == "service_unavailable"
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in streamed[:-2]]
    assert set(finishes) == {None}


async def test_sampling_options_and_formats_reach_the_engine(http, engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    reply = await http.post(
        COMPLETIONS,
        json=body(
            top_k=5, min_p=0.1, repeat_penalty=1.1, frequency_penalty=0.5, presence_penalty=-0.5,
            logit_bias={"7": -100, "9": 2.5}, seed=-1, logprobs=True, top_logprobs=2,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        ),
    )  # fmt: skip
    assert reply.status_code == 200, reply.text
    sampling = engine.requests[-1].sampling
    assert (sampling.top_k, sampling.min_p, sampling.repeat_penalty) == (5, 0.1, 1.1)
    assert (sampling.frequency_penalty, sampling.presence_penalty) == (0.5, -0.5)
    assert sampling.logit_bias == ((7, -100.0), (9, 2.5)) and sampling.seed is None
    assert json.loads(sampling.json_schema) == schema and sampling.logprobs == 2


async def test_tools_and_tool_messages_reach_the_engine(http, engine):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    conversation = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]  # fmt: skip
    named = {"type": "function", "function": {"name": "f"}}
    reply = await http.post(
        COMPLETIONS,
        json=body(
            messages=conversation, tools=[tool], tool_choice=named, parallel_tool_calls=False
        ),
    )
    assert reply.status_code == 200, reply.text
    request = engine.requests[-1]
    assert [(t.name, t.parameters) for t in request.tools] == [("f", {"type": "object"})]
    assert (request.tool_choice.mode, request.tool_choice.name) == ("function", "f")
    assert request.parallel_tool_calls is False
    assert request.messages[1].tool_calls[0].id == "call_1"
    assert (request.messages[2].role, request.messages[2].tool_call_id) == (Role.TOOL, "call_1")


async def test_a_tool_call_with_arguments_that_are_not_json_is_400(http, engine):
    conversation = [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}},
        ]},
        {"role": "user", "content": "go"},
    ]  # fmt: skip
    reply = await http.post(COMPLETIONS, json=body(messages=conversation))
    assert_openai_error(reply, 400, "invalid_request_error", "not valid JSON", param="tool_calls")


async def test_chat_takes_the_sampling_extensions_too(http, engine):
    schema = {"type": "object"}
    reply = await http.post(
        "/chat",
        json={"message": "hi", "top_k": 3, "logit_bias": {"11": -100}, "json_schema": schema},
    )
    assert reply.status_code == 200, reply.text
    sampling = engine.requests[-1].sampling
    assert sampling.top_k == 3 and sampling.logit_bias == ((11, -100.0),)
    assert json.loads(sampling.json_schema) == schema
    bad = await http.post("/chat", json={"message": "hi", "logit_bias": {"x": 1}})
    assert bad.status_code == 400 and "not a token id" in bad.json()["detail"]


async def test_text_completions_take_a_raw_prompt(http, engine):
    reply = await http.post(
        "/v1/completions", json={"model": "any", "prompt": "Once upon", "max_tokens": 3}
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["object"] == "text_completion"
    request = engine.requests[-1]
    assert request.prompt == "Once upon" and request.messages == ()
    assert request.sampling.max_tokens == 3
