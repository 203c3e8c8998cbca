"""From OpenAI's chat completion request to the core's ``CompleteRequest``:
the conversation, the sampling settings, and what the reply must look like.

A parameter this server cannot honour is refused with a 400 that names it;
nothing known is silently ignored.
"""

from __future__ import annotations

import json
from typing import Any

from llamachat.v1 import chat_pb2

from . import openai_schemas as oa
from .errors import ApiError
from .schemas import token_biases

ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "developer": chat_pb2.ROLE_SYSTEM,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
    "tool": chat_pb2.ROLE_TOOL,
}

FINISH_REASONS = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}

TOOL_CHOICES = {
    "auto": chat_pb2.TOOL_CHOICE_AUTO,
    "none": chat_pb2.TOOL_CHOICE_NONE,
    "required": chat_pb2.TOOL_CHOICE_REQUIRED,
}

# A generation the core stopped before its end (it is shutting down) is no
# reply at all: OpenAI's finish reasons have no word for it.
STOPPED_EARLY = "Generation was stopped before the reply ended (the server is shutting down); retry"


def refuse_unsupported(body: oa.ChatCompletionRequest) -> None:
    """A 400 naming the first parameter that asks for what this server cannot do."""
    checks: list[tuple[str, bool, str]] = [
        ("n", body.n not in (None, 1), "only n=1 is supported"),
        (
            "stream_options",
            body.stream_options is not None and not body.stream,
            "stream_options is only allowed when stream is true",
        ),
        ("functions", bool(body.functions), "functions are replaced by tools: send tools"),
        (
            "top_logprobs",
            body.top_logprobs is not None and not body.logprobs,
            "top_logprobs needs logprobs: true",
        ),
    ]
    for param, unsupported, reason in checks:
        if unsupported:
            raise ApiError(400, f"{param}: {reason}", param=param, code="unsupported_parameter")


def response_format_options(body: oa.SamplingRequest) -> dict[str, Any]:
    """``response_format`` (or llama.cpp's ``json_schema`` and ``grammar``) as
    the core's options."""
    options: dict[str, Any] = {}
    if body.json_schema is not None:
        options["json_schema"] = json.dumps(body.json_schema)
    if body.grammar is not None:
        options["grammar"] = body.grammar
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return options
    if options:
        raise ApiError(
            400,
            "response_format cannot be combined with json_schema or grammar",
            param="response_format",
        )
    if fmt.type == "json_object":
        return {"json_object": True}
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ApiError(
            400,
            "response_format: a json_schema response format needs json_schema.schema",
            param="response_format",
        )
    return {"json_schema": json.dumps(fmt.json_schema.schema_)}


def sampling_options(body: oa.SamplingRequest, top_logprobs: int | None = None) -> dict[str, Any]:
    """The fields of the core's ``SamplingOptions`` (``top_logprobs``: report
    log probabilities, with that many alternatives)."""
    options: dict[str, Any] = {
        name: getattr(body, name)
        for name in ("top_k", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty")
        if getattr(body, name) is not None
    }
    if body.logit_bias:
        try:
            options["logit_bias"] = token_biases(body.logit_bias)
        except ValueError as error:
            raise ApiError(400, str(error), param="logit_bias") from error
    if top_logprobs is not None:
        options["logprobs"] = True
        options["top_logprobs"] = top_logprobs
    return {**options, **response_format_options(body)}


def completion_fields(body: oa.ChatCompletionRequest) -> dict[str, Any]:
    """The fields of a ``CompleteRequest``/``CompleteStreamRequest``."""
    refuse_unsupported(body)
    messages = []
    for index, message in enumerate(body.messages):
        role = ROLES.get(message.role)
        if role is None:
            raise ApiError(
                400,
                f"messages[{index}].role: {message.role!r} is not one of "
                "system, developer, user, assistant, tool",
                param=f"messages[{index}].role",
            )
        # A dict: the message is built (and its text checked) by to_grpc_message.
        messages.append(
            {
                "role": role,
                "content": message.text(),
                "tool_calls": [
                    {
                        "id": call.id,
                        "name": call.function.name,
                        "arguments_json": call.function.arguments,
                    }
                    for call in message.tool_calls or ()
                ],
                "tool_call_id": message.tool_call_id or "",
            }
        )
    fields: dict[str, Any] = {
        "messages": messages,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        ),
        "seed": None if body.seed == -1 else body.seed,  # -1: random, as llama.cpp
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop,
        "options": sampling_options(body, (body.top_logprobs or 0) if body.logprobs else None),
        **tool_fields(body),
    }
    return {name: value for name, value in fields.items() if value is not None}


def tool_fields(body: oa.ChatCompletionRequest) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as the core's fields."""
    fields: dict[str, Any] = {
        "tools": [
            {
                "name": tool.function.name,
                "description": tool.function.description or "",
                "parameters_json": json.dumps(tool.function.parameters or {"type": "object"}),
            }
            for tool in body.tools or ()
        ]
    }
    choice = body.tool_choice
    if isinstance(choice, str):
        fields["tool_choice"] = TOOL_CHOICES[choice]
    elif choice is not None:
        fields["tool_choice"] = chat_pb2.TOOL_CHOICE_FUNCTION
        fields["tool_choice_function"] = choice.function.name
    if body.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = body.parallel_tool_calls
    return fields
