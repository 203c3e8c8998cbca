"""Tool calling in a generic format that any chat model can follow.

Most small models' templates (the default SmolLM2's among them) say nothing
of tools, so the tools are described in a system message and the reply is
constrained by a grammar to one JSON object: ``{"tool_calls": [{"name": ...,
"arguments": {...}}]}`` to call tools, or ``{"content": "..."}`` to answer.
The grammar is built from each tool's JSON Schema, so a call always names a
known tool and its arguments always match that tool's parameters.
``tool_choice`` narrows what the grammar allows: ``required`` (some call),
a named function (that call), ``none`` (no tools at all: the request is
answered as plain text). Earlier calls and their results in the conversation
are written back as plain messages in the same format, so that the model
sees what it did.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from .domain import Message, Role, ToolCall, ToolChoice, ToolSpec
from .errors import InvalidRequest

MAX_TOOLS = 128
# As OpenAI's API allows; nothing in a name can read as a template's markup.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def tool_system_prompt(tools: tuple[ToolSpec, ...], choice: ToolChoice) -> str:
    """The instructions that describe the tools and the reply's format."""
    described = "\n".join(
        json.dumps(
            {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            }
        )
        for tool in tools
    )
    if choice.mode == "auto":
        how = (
            'To call tools, reply with {"tool_calls": [{"name": "<tool name>", "arguments": '
            '{...}}]}. To answer without a tool, reply with {"content": "<your answer>"}.'
        )
    else:
        how = (
            'Call a tool now: reply with {"tool_calls": [{"name": "<tool name>", '
            '"arguments": {...}}]}.'
        )
    return f"You can call these tools:\n{described}\n{how} Reply with JSON only."


def _call_schema(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def reply_schema(tools: tuple[ToolSpec, ...], choice: ToolChoice, parallel: bool) -> dict[str, Any]:
    """The JSON Schema of a reply: the grammar that enforces it comes from it."""
    allowed = [tool for tool in tools if choice.mode != "function" or tool.name == choice.name]
    calls: dict[str, Any] = {
        "type": "array",
        "items": {"oneOf": [_call_schema(tool) for tool in allowed]},
        "minItems": 1,
    }
    if not parallel or choice.mode == "function":
        calls["maxItems"] = 1
    call_reply = {
        "type": "object",
        "properties": {"tool_calls": calls},
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if choice.mode != "auto":
        return call_reply
    answer = {
        "type": "object",
        "properties": {"content": {"type": "string"}},
        "required": ["content"],
        "additionalProperties": False,
    }
    return {"oneOf": [call_reply, answer]}


def check_tools(tools: tuple[ToolSpec, ...], choice: ToolChoice) -> None:
    """A 400 naming the parameter for tools this format cannot serve."""
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools: at most {MAX_TOOLS} tools, got {len(tools)}", param="tools")
    names = [tool.name for tool in tools]
    for name in names:
        if not TOOL_NAME.fullmatch(name):
            raise InvalidRequest(
                f"tools: {name!r} is not a tool name (1 to 64 letters, digits, '_' or '-')",
                param="tools",
            )
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: two tools have the same name", param="tools")
    for tool in tools:
        if not isinstance(tool.parameters, dict):
            raise InvalidRequest(
                f"tools: the parameters of {tool.name!r} must be a JSON Schema object",
                param="tools",
            )
    if choice.mode in ("required", "function") and not tools:
        raise InvalidRequest("tool_choice needs tools", param="tool_choice")
    if choice.mode == "function" and choice.name not in names:
        raise InvalidRequest(
            f"tool_choice names {choice.name!r}, which is not among the tools",
            param="tool_choice",
        )


def plain_messages(messages: tuple[Message, ...]) -> tuple[Message, ...]:
    """A conversation with its tool calls and results written as plain
    messages in the generic format (any template renders those)."""
    plain = []
    for message in messages:
        if message.role is Role.ASSISTANT and message.tool_calls:
            calls = [
                {"name": c.name, "arguments": json.loads(c.arguments)} for c in message.tool_calls
            ]
            plain.append(Message(Role.ASSISTANT, json.dumps({"tool_calls": calls})))
        elif message.role is Role.TOOL:
            text = f"Result of the tool call {message.tool_call_id or ''}:\n{message.content}"
            plain.append(Message(Role.USER, text))
        else:
            plain.append(message)
    return tuple(plain)


def parse_reply(text: str) -> tuple[str, tuple[ToolCall, ...]]:
    """The answer, or the tool calls, of a reply the grammar made (a reply
    cut short by max_tokens is no JSON: its text is the answer)."""
    try:
        reply = json.loads(text)
    except ValueError:
        return text, ()
    if not isinstance(reply, dict):
        return text, ()
    if isinstance(reply.get("content"), str):
        return reply["content"], ()
    calls = tuple(
        ToolCall(
            id=f"call_{uuid.uuid4().hex[:24]}",
            name=str(call["name"]),
            arguments=json.dumps(call.get("arguments", {})),
        )
        for call in reply.get("tool_calls", [])
        if isinstance(call, dict) and "name" in call
    )
    return ("", calls) if calls else (text, ())


def tool_plan(
    messages: tuple[Message, ...],
    tools: tuple[ToolSpec, ...],
    choice: ToolChoice,
    parallel: bool,
) -> tuple[tuple[Message, ...], dict[str, Any] | None]:
    """The conversation to render (tool calls and results as plain messages,
    the tools described in the system message) and the JSON Schema the reply
    must match (``None``: no tools in play, a plain reply)."""
    check_tools(tools, choice)
    plain = plain_messages(messages)
    if not tools or choice.mode == "none":
        return plain, None
    instructions = tool_system_prompt(tools, choice)
    if plain and plain[0].role is Role.SYSTEM:
        first = Message(Role.SYSTEM, f"{plain[0].content}\n\n{instructions}")
        plain = (first, *plain[1:])
    else:
        plain = (Message(Role.SYSTEM, instructions), *plain)
    return plain, reply_schema(tools, choice, parallel)
