"""The OpenAI-compatible endpoints used through the official ``openai`` SDK,
as an application would, against the real core and model."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from inference_server.model_files import default_model_path
from tests.e2e.conftest import Service

MODEL = default_model_path().name.removesuffix(".gguf")
QUESTION = [{"role": "user", "content": "Name a colour."}]


def error_body(error: openai.APIError) -> dict[str, Any]:
    """The error object the SDK decoded from the response (typed ``object``)."""
    assert isinstance(error.body, dict), error.body
    return error.body


@pytest.fixture
def client(service: Service) -> openai.OpenAI:
    # No retries: a refused request must show here, not be hidden by a retry.
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key="unused", max_retries=0)


def test_models_list_the_served_model(client):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.object == "model"
    assert client.models.retrieve(MODEL).id == MODEL


def test_a_greedy_completion_is_deterministic_and_keeps_no_session(client, service):
    completion = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24
    )
    (choice,) = completion.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage.completion_tokens > 0 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    sessions_before = httpx.get(f"{service.url}/sessions").json()["count"]
    again = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24
    )
    assert again.choices[0].message.content == choice.message.content  # greedy: deterministic
    assert httpx.get(f"{service.url}/sessions").json()["count"] == sessions_before  # stateless


def test_a_stream_arrives_in_chunks_and_equals_the_whole_reply(client):
    whole = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 2
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_the_conversation_is_the_context(client):
    # A fact given earlier in the messages is used: the model sees them all.
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "My name is Zorblax. Remember it."},
        {"role": "assistant", "content": "Nice to meet you, Zorblax!"},
        {"role": "user", "content": "What is my name?"},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=16
    )
    assert "Zorblax" in reply.choices[0].message.content


def test_errors_raise_the_sdks_exceptions_with_the_servers_message(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=5)
    assert "temperature must be between 0 and 2" in bad.value.message
    assert error_body(bad.value)["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.chat.completions.create(model=MODEL, messages=QUESTION, n=2)
    assert error_body(unsupported.value)["param"] == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")  # any name is served, but only the model is listed
    assert error_body(missing.value)["code"] == "model_not_found" and MODEL in missing.value.message
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "word " * 6000}], max_tokens=4
        )
    assert "context" in too_long.value.message


def test_stop_sequences_end_the_reply_before_them_streamed_or_not(client):
    whole = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24
    )
    text = whole.choices[0].message.content
    assert text is not None
    words = text.split()
    assert len(words) >= 3, text
    stop = f" {words[2]}"  # a sequence from the middle of the greedy reply
    expected = text[: text.index(stop)]
    cut = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stop=[stop]
    )
    assert cut.choices[0].message.content == expected
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=24, stop=stop, stream=True
    )
    chunks = list(streamed)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_the_next_turn_of_a_conversation_reuses_the_kv_cache(client):
    # OpenAI clients resend the whole conversation; its previous turn's cells
    # are found again (usage.prompt_tokens_details.cached_tokens).
    first_turn = [{"role": "user", "content": "Tell me about the moon."}]
    first = client.chat.completions.create(
        model=MODEL, messages=first_turn, temperature=0, max_tokens=16
    )
    assert first.usage is not None
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And the sun?"},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=second_turn, temperature=0, max_tokens=16
    )
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    # At least the whole first prompt (its reply may be tokenized differently).
    assert first.usage.prompt_tokens - 1 <= cached < second.usage.prompt_tokens
