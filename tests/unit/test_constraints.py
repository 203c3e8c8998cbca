"""What a reply must look like, turned into the grammar the sampler enforces."""

from __future__ import annotations

import json

import pytest

from inference_server.constraints import LOOSE_CHAR_RULE, grammar_of, schema_grammar
from inference_server.domain import SamplingParams, ToolChoice, ToolSpec
from inference_server.errors import InvalidRequest
from inference_server.tool_calls import parse_reply, reply_schema


def test_json_strings_may_not_hold_raw_control_characters():
    grammar = schema_grammar({"type": "object", "properties": {"a": {"type": "string"}}}, "x")
    assert LOOSE_CHAR_RULE not in grammar
    assert "\\x00-\\x1F" in grammar


@pytest.mark.parametrize(
    "params, param",
    [
        (SamplingParams(json_schema="{not json"), "json_schema"),
        (SamplingParams(json_schema="[1, 2]"), "json_schema"),
    ],
)
def test_a_schema_that_cannot_be_used_is_refused_naming_it(params, param):
    with pytest.raises(InvalidRequest) as refused:
        grammar_of(params)
    assert refused.value.param == param


def test_a_named_tool_choice_allows_only_that_tool_once():
    tools = (
        ToolSpec("a", "", {"type": "object"}),
        ToolSpec("b", "", {"type": "object", "properties": {"x": {"type": "integer"}}}),
    )
    schema = reply_schema(tools, ToolChoice("function", "b"), parallel=True)
    calls = schema["properties"]["tool_calls"]
    assert calls["maxItems"] == 1
    assert [item["properties"]["name"] for item in calls["items"]["oneOf"]] == [{"const": "b"}]
    auto = reply_schema(tools, ToolChoice("auto"), parallel=True)
    assert len(auto["oneOf"]) == 2  # calls, or an answer


def test_a_reply_is_read_as_calls_or_as_an_answer():
    text, calls = parse_reply(json.dumps({"tool_calls": [{"name": "a", "arguments": {"x": 1}}]}))
    assert text == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1})]
    assert calls[0].id.startswith("call_")
    assert parse_reply(json.dumps({"content": "hi"})) == ("hi", ())
    assert parse_reply('{"tool_calls": [{"na') == ('{"tool_calls": [{"na', ())  # cut short
