"""What frameworks do beyond plain chat, with their own client libraries
against the running service (the real model), only the base URL changed:
structured output, tools, sampling options, and the errors they act on."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from typing import Literal

import openai
import pytest
from openai.types.chat import (
    ChatCompletionMessage,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionTokenLogprob,
    ChatCompletionToolParam,
)
from openai.types.chat.chat_completion import Choice
from pydantic import BaseModel, Field, ValidationError

from tests.e2e.conftest import Service, run_readme_example

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network: its bundled map

ANY_NAME = "gpt-4o-mini"  # what clients send by default; the one model serves it


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused") as client:
        yield client


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int


class Weather(BaseModel):
    city: str = Field(max_length=20)
    sky: Literal["sunny", "cloudy", "rainy"]
    celsius: int


class Verdict(BaseModel):
    ok: bool
    reasons: list[str] = Field(max_length=2)


class Order(BaseModel):
    item: Literal["apple", "pear", "plum"]
    quantity: int
    gift: bool


SCHEMAS: list[tuple[type[BaseModel], str]] = [
    (Person, "Invent a person."),
    (Weather, "Describe the weather in a city."),
    (Verdict, "Is Python a good first language?"),
    (Order, "Order some fruit."),
]


def test_parse_with_a_pydantic_model_returns_a_parsed_object(client: openai.OpenAI):
    completion = client.chat.completions.parse(
        model=ANY_NAME,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format=Person,
        temperature=0,
        max_tokens=64,
    )
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Person) and parsed.name


def test_many_json_schema_replies_all_parse_and_validate(service: Service):
    # 32 replies, 8 per schema, half greedy and half sampled with their own seeds
    # (100 took 50 s of the suite; the grammar decides validity, not the count).
    async def one(client: openai.AsyncOpenAI, index: int) -> tuple[type[BaseModel], str, str]:
        async with within_capacity:
            return await ask(client, index)

    async def ask(client: openai.AsyncOpenAI, index: int) -> tuple[type[BaseModel], str, str]:
        model, prompt = SCHEMAS[index % len(SCHEMAS)]
        sampled = {"temperature": 1.0, "seed": index} if index % 2 else {"temperature": 0}
        reply = await client.chat.completions.create(
            model=ANY_NAME,
            messages=[{"role": "user", "content": prompt}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": model.__name__, "schema": model.model_json_schema()},
            },
            max_tokens=96,
            **sampled,
        )
        choice = reply.choices[0]
        return model, choice.finish_reason, choice.message.content or ""

    within_capacity = asyncio.Semaphore(16)  # the service's N_SLOTS + MAX_QUEUE is 36

    async def all_replies() -> list[tuple[type[BaseModel], str, str]]:
        async with openai.AsyncOpenAI(base_url=f"{service.url}/v1", api_key="x") as client:
            return await asyncio.gather(*(one(client, index) for index in range(32)))

    replies = asyncio.run(all_replies())
    invalid = []
    for model, finish, text in replies:
        try:
            model.model_validate_json(text)
        except ValidationError as error:
            invalid.append((model.__name__, finish, text, str(error)[:200]))
    assert invalid == []


WEATHER_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 30},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 30}},
            "required": ["zone"],
        },
    },
}
ASK: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris?"}
]
NAMED: ChatCompletionNamedToolChoiceParam = {
    "type": "function",
    "function": {"name": "get_weather"},
}


def function_calls(message: ChatCompletionMessage) -> list[ChatCompletionMessageFunctionToolCall]:
    calls = message.tool_calls or []
    assert all(isinstance(call, ChatCompletionMessageFunctionToolCall) for call in calls)
    return calls  # type: ignore[return-value]


class WeatherArguments(BaseModel):
    city: str
    unit: Literal["celsius", "fahrenheit"]


def test_a_named_tool_choice_returns_a_call_whose_arguments_validate(client: openai.OpenAI):
    reply = client.chat.completions.create(
        model=ANY_NAME, messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=NAMED,
        temperature=0, max_tokens=64,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = function_calls(choice.message)
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    WeatherArguments.model_validate_json(call.function.arguments)


def test_required_tool_choice_calls_one_of_the_tools(client: openai.OpenAI):
    reply = client.chat.completions.create(
        model=ANY_NAME, messages=ASK, tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required",
        parallel_tool_calls=False, temperature=0, max_tokens=128,
    )  # fmt: skip
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = function_calls(reply.choices[0].message)
    assert call.function.name in ("get_weather", "get_time")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_a_tool_round_trip_ends_in_an_answer(client: openai.OpenAI):
    first = client.chat.completions.create(
        model=ANY_NAME, messages=ASK, tools=[WEATHER_TOOL], tool_choice=NAMED,
        temperature=0, max_tokens=64,
    )  # fmt: skip
    (call,) = function_calls(first.choices[0].message)
    conversation: list[ChatCompletionMessageParam] = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    final = client.chat.completions.create(
        model=ANY_NAME, messages=conversation, tools=[WEATHER_TOOL], tool_choice="none",
        temperature=0, max_tokens=48,
    )  # fmt: skip
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and answer.message.content
    assert not answer.message.tool_calls


def test_streamed_tool_calls_reassemble_to_the_same_call(client: openai.OpenAI):
    whole = (
        client.chat.completions.create(
            model=ANY_NAME, messages=ASK, tools=[WEATHER_TOOL], tool_choice=NAMED,
            temperature=0, max_tokens=64,
        ).choices[0].message
    )  # fmt: skip
    calls: dict[int, dict[str, str]] = {}
    finish = None
    stream = client.chat.completions.create(
        model=ANY_NAME, messages=ASK, tools=[WEATHER_TOOL], tool_choice=NAMED,
        temperature=0, max_tokens=64, stream=True,
    )  # fmt: skip
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                if delta.function is not None:
                    call["name"] += delta.function.name or ""
                    call["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (call.function.name, json.loads(call.function.arguments)) for call in function_calls(whole)
    ]


def greedy(
    client: openai.OpenAI, prompt: str, **options: object
) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(  # type: ignore[call-overload]
        model=ANY_NAME,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=60,
        **options,
    )


def tokens_of(choice: Choice) -> list[ChatCompletionTokenLogprob]:
    return (choice.logprobs.content if choice.logprobs else None) or []


def test_a_strong_frequency_penalty_removes_repetition(client: openai.OpenAI):
    prompt = "Write the word apple 20 times."
    plain = greedy(client, prompt).choices[0].message.content or ""
    penalized = greedy(client, prompt, frequency_penalty=2.0).choices[0].message.content or ""
    assert plain.lower().count("apple") >= 8
    assert penalized.lower().count("apple") <= plain.lower().count("apple") // 2


def test_a_banned_token_never_appears(client: openai.OpenAI, service: Service):
    from inference_server.llama_runtime import LlamaRuntime
    from inference_server.model_files import default_model_path

    prompt = "Say hello."
    first = greedy(client, prompt, logprobs=True).choices[0]
    tokens = [entry.token for entry in tokens_of(first)]
    runtime = LlamaRuntime(
        str(default_model_path()), n_ctx=64, n_sequences=1, n_gpu_layers=0, n_threads=1, n_batch=32
    )
    try:
        (banned,) = runtime.tokenize(tokens[0], add_bos=False, special=False)
    finally:
        runtime.close()
    again = greedy(client, prompt, logprobs=True, logit_bias={str(banned): -100}).choices[0]
    generated = [entry.token for entry in tokens_of(again)]
    assert generated and tokens[0] not in generated
    assert generated != tokens


def test_logprobs_come_with_the_top_alternatives(client: openai.OpenAI):
    choice = greedy(client, "Say hello.", logprobs=True, top_logprobs=3).choices[0]
    content = tokens_of(choice)
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the likeliest one.
        assert entry.top_logprobs[0].token == entry.token


def test_langchain_structured_output_in_all_three_methods(service: Service):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=ANY_NAME, base_url=f"{service.url}/v1", api_key="unused", temperature=0, max_tokens=64
    )
    for method in ("json_schema", "function_calling", "json_mode"):
        structured = llm.with_structured_output(Person, method=method)
        prompt = "Invent a person."
        if method == "json_mode":
            prompt += ' Reply with JSON: {"name": "...", "age": ...}'
        result = structured.invoke(prompt)
        assert isinstance(result, Person), method


def test_langchain_bind_tools_agent_loop_of_two_steps(service: Service):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def multiply(a: int, b: int) -> int:
        """Multiply two integers."""
        return a * b

    llm = ChatOpenAI(
        model=ANY_NAME, base_url=f"{service.url}/v1", api_key="unused", temperature=0, max_tokens=64
    )
    messages: list = [HumanMessage("What is 6 times 7? Use the tool.")]
    step = llm.bind_tools([multiply], tool_choice="multiply").invoke(messages)
    (call,) = step.tool_calls
    assert call["name"] == "multiply" and set(call["args"]) == {"a", "b"}
    messages += [step, ToolMessage(str(multiply.invoke(call["args"])), tool_call_id=call["id"])]
    answer = llm.bind_tools([multiply], tool_choice="none").invoke(messages)
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls


def test_litellm_raises_context_window_exceeded(service: Service):
    import litellm

    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(
            model="openai/any",
            api_base=f"{service.url}/v1",
            api_key="unused",
            messages=[{"role": "user", "content": "word " * 6000}],
            max_tokens=4,
        )


def test_completions_create_continues_a_raw_prompt_streaming_and_not(client: openai.OpenAI):
    prompt = "The capital of France is"
    whole = client.completions.create(model=ANY_NAME, prompt=prompt, max_tokens=12, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and choice.text
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage is not None and whole.usage.completion_tokens > 0
    pieces = client.completions.create(
        model=ANY_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in pieces if chunk.choices) == choice.text


def test_completions_refuse_what_they_cannot_do_naming_it(client: openai.OpenAI):
    with pytest.raises(openai.BadRequestError) as no_fim:
        client.completions.create(model=ANY_NAME, prompt="Hi", max_tokens=4, suffix="end")
    with pytest.raises(openai.BadRequestError) as no_echo:
        client.completions.create(model=ANY_NAME, prompt="Hi", max_tokens=4, echo=True)
    for refused, param in ((no_fim, "suffix"), (no_echo, "echo")):
        body = refused.value.body
        assert isinstance(body, dict) and body["param"] == param


def test_llama_index_openai_like_completes_with_its_defaults(service: Service):
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(model=ANY_NAME, api_base=f"{service.url}/v1", api_key="unused", max_tokens=12)
    assert llm.metadata.is_chat_model is False  # so it calls /v1/completions
    assert llm.complete("The capital of France is").text.strip()


def test_the_readme_example_works_as_printed(service: Service, tmp_path):
    done = run_readme_example("OpenAI-compatible API", service.url, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "name=" in done.stdout and "get_weather" in done.stdout
