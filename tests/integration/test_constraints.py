"""Grammars that would bring llama.cpp down are refused or end their own
request only, on the real model; the engine serves the next request."""

from __future__ import annotations

import json

import pytest

from inference_server.domain import CompletionRequest, Message, Role, SamplingParams
from inference_server.errors import InvalidRequest

ASK = (Message(Role.USER, "Say hello."),)


def constrained(**options) -> CompletionRequest:
    return CompletionRequest(ASK, SamplingParams(temperature=0.0, max_tokens=16, **options))


@pytest.mark.parametrize(
    "options, words",
    [
        ({"grammar": "root ::= [\\x00]"}, "allows no next token"),  # dead at the start
        ({"grammar": 'root ::= "Hel" [\\x00]'}, "allows no next token"),  # dead after a token
        (
            {"json_schema": json.dumps({"type": "string", "maxLength": 20000})},
            "maxLength may be at most 1000",
        ),
        ({"grammar": "root ::= " + "(" * 30000 + '"a"' + ")" * 30000}, "nests groups"),
        ({"grammar": "root ::= nothing"}, "cannot be used"),
        ({"json_schema": "[" * 100_000}, "not valid JSON"),
    ],
)
async def test_a_grammar_that_cannot_work_fails_its_request_only(engine, options, words):
    with pytest.raises(InvalidRequest, match=words):
        await engine.complete(constrained(**options))
    after = await engine.complete(constrained())
    assert after.text  # the engine goes on
