"""Tools in a model's own format, on the real model served with a
Hermes-style template (CHAT_TEMPLATE_FILE), and the grammars of the other
native formats against its vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_server.domain import (
    CompletionRequest,
    FinishReason,
    Message,
    Role,
    SamplingParams,
    ToolCall,
    ToolChoice,
    ToolSpec,
)
from inference_server.llama_runtime import LlamaRuntime
from inference_server.tool_formats import detect_format, native_grammar, parse_native

HERMES = Path(__file__).resolve().parents[1] / "templates" / "hermes.jinja"
WEATHER = ToolSpec(
    "get_weather",
    "The current weather in a city.",
    {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}},
        "required": ["city"],
    },
)
ASK = (Message(Role.USER, "What is the weather in Paris?"),)
GREEDY = SamplingParams(temperature=0.0, max_tokens=96)


def test_formats_are_found_from_the_template_text():
    assert detect_format(HERMES.read_text()) == "hermes"
    assert detect_format("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_format("{{ '<|python_tag|>' }}") == "llama3"
    assert detect_format("{{ messages }}") == "generic"


@pytest.mark.parametrize("tool_format", ["hermes", "mistral", "llama3"])
def test_each_native_grammar_compiles_for_the_model(tokenizer: LlamaRuntime, tool_format):
    grammar = native_grammar(tool_format, (WEATHER,), ToolChoice("required"), parallel=True)
    assert tokenizer.check_grammar(grammar) is None


@pytest.mark.parametrize(
    "tool_format, text, content",
    [
        (
            "hermes",
            'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
            "Sure.",
        ),
        ("mistral", '[{"name": "f", "arguments": {"x": 1}}]', ""),
        ("llama3", '{"name": "f", "parameters": {"x": 1}}', ""),
    ],
)
def test_each_native_format_is_read_back(tool_format, text, content):
    answer, calls = parse_native(tool_format, text)
    assert answer == content
    assert [(call.name, json.loads(call.arguments)) for call in calls] == [("f", {"x": 1})]


async def test_a_hermes_model_gets_the_tools_in_its_template_and_calls_in_its_format(
    make_engine,
):
    engine = await make_engine(chat_template_file=str(HERMES))
    assert engine._runtime.tool_format == "hermes"
    plain = await engine.complete(CompletionRequest(ASK, GREEDY))
    called = await engine.complete(
        CompletionRequest(
            ASK,
            GREEDY,
            tools=(WEATHER,),
            tool_choice=ToolChoice("required"),
            parallel_tool_calls=False,
        )
    )
    assert called.prompt_tokens > plain.prompt_tokens + 40  # the tools are in the prompt
    assert called.finish_reason is FinishReason.TOOL_CALLS
    (call,) = called.tool_calls
    assert call.name == "get_weather" and isinstance(json.loads(call.arguments)["city"], str)
    # The call and its result go back through the template; the answer is text.
    answered = await engine.complete(
        CompletionRequest(
            (
                *ASK,
                Message(Role.ASSISTANT, "", (ToolCall(call.id, call.name, call.arguments),)),
                Message(Role.TOOL, '{"sky": "sunny"}', tool_call_id=call.id),
            ),
            GREEDY,
            tools=(WEATHER,),
            tool_choice=ToolChoice("none"),
        )
    )
    assert answered.finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert answered.text and not answered.tool_calls
