"""Ollama's API with the official ``ollama`` Python client as the user, on
the running service (the real model)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import ollama
import pytest
from pydantic import BaseModel

from tests.e2e.conftest import Service, run_readme_example

MODEL = "smollm2"  # any name is served by the one model, as for /v1
GREEDY = {"temperature": 0, "num_predict": 24}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[ollama.Client]:
    yield ollama.Client(host=service.url)


def test_version_tags_show_and_ps(client: ollama.Client, service: Service):
    assert httpx.get(f"{service.url}/api/version").json()["version"]
    (listed,) = client.list().models
    assert listed.model and listed.size and listed.details is not None
    assert listed.details.format == "gguf" and listed.details.quantization_level == "Q4_1"
    shown = client.show(MODEL)
    assert shown.template and "im_start" in shown.template
    assert shown.capabilities is not None and "tools" in shown.capabilities
    assert [model.model for model in client.ps().models] == [listed.model]


def test_chat_streamed_equals_chat_whole_at_temperature_zero(client: ollama.Client):
    whole = client.chat(model=MODEL, messages=QUESTION, options=GREEDY, stream=False)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.message.role == "assistant" and whole.message.content
    assert whole.prompt_eval_count and whole.eval_count
    assert whole.total_duration and whole.total_duration >= (whole.eval_duration or 0)
    parts = list(client.chat(model=MODEL, messages=QUESTION, options=GREEDY, stream=True))
    assert parts[-1].done and not any(part.done for part in parts[:-1])
    assert "".join(part.message.content or "" for part in parts) == whole.message.content


def test_generate_streaming_and_not(client: ollama.Client):
    whole = client.generate(model=MODEL, prompt="Name a colour.", options=GREEDY)
    assert whole.done and whole.response
    parts = list(client.generate(model=MODEL, prompt="Name a colour.", options=GREEDY, stream=True))
    assert "".join(part.response or "" for part in parts) == whole.response
    raw = client.generate(model=MODEL, prompt="Once upon a time", raw=True, options=GREEDY)
    assert raw.response


def test_options_are_applied(client: ollama.Client):
    short = client.chat(
        model=MODEL, messages=QUESTION, options={"num_predict": 3, "temperature": 0}
    )
    assert short.eval_count == 3 and short.done_reason == "length"
    stopped = client.chat(model=MODEL, messages=QUESTION, options={**GREEDY, "stop": ["Paris"]})
    assert "Paris" not in (stopped.message.content or "")


class City(BaseModel):
    city: str
    country: str


def test_format_json_and_a_schema(client: ollama.Client):
    asked = [{"role": "user", "content": 'Reply in JSON: {"city": ..., "country": ...}'}]
    as_json = client.chat(
        model=MODEL, messages=asked, format="json", options={"temperature": 0, "num_predict": 200}
    )
    assert as_json.done_reason == "stop"
    assert isinstance(json.loads(as_json.message.content or ""), dict)
    schema = City.model_json_schema()
    structured = client.chat(
        model=MODEL, messages=QUESTION, format=schema, options={"temperature": 0, "num_predict": 64}
    )
    City.model_validate_json(structured.message.content or "")


def get_weather(city: str) -> str:
    """The current weather in a city.

    Args:
        city: The city's name.
    """
    return f"Sunny in {city}"


def test_tools_reach_the_model_and_come_back_as_tool_calls(client: ollama.Client):
    asked = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    options = {"temperature": 0, "num_predict": 64}
    plain = client.chat(model=MODEL, messages=asked, options=options)
    reply = client.chat(model=MODEL, messages=asked, tools=[get_weather], options=options)
    assert (reply.prompt_eval_count or 0) > (plain.prompt_eval_count or 0) + 40  # described
    (call,) = reply.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments["city"], str)
    assert reply.message.content == "" and reply.done_reason == "stop"


def test_errors_come_in_ollama_shape(client: ollama.Client, service: Service):
    with pytest.raises(ollama.ResponseError) as refused:
        client.pull(MODEL)
    assert "serves the one model" in refused.value.error
    bad = httpx.post(f"{service.url}/api/chat", json={"model": MODEL, "messages": "x"})
    assert bad.status_code == 400 and "error" in bad.json()
    loaded = httpx.post(f"{service.url}/api/chat", json={"model": MODEL, "messages": []}).json()
    assert loaded["done"] is True and loaded["done_reason"] == "load"


def test_the_readme_example_works_as_printed(service: Service, tmp_path):
    done = run_readme_example("Ollama-compatible API", service.url, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


def test_bodies_are_json_whatever_their_content_type(service: Service):
    # As Ollama's documentation shows it: curl -d '{...}', which says form data.
    reply = httpx.post(
        f"{service.url}/api/generate",
        content=json.dumps({"model": MODEL, "prompt": "Hi", "stream": False, "options": GREEDY}),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert reply.status_code == 200 and reply.json()["done"] is True
