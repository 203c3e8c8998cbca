"""How tools reach a model and how its calls are read back, per template.

A model whose chat template renders tools itself was trained on that
template's format, and is served in it:

- ``hermes`` (Hermes, Qwen 2.5/3 and kin; the template mentions
  ``<tool_call>``): calls are ``<tool_call>{"name": ..., "arguments": ...}
  </tool_call>`` blocks;
- ``llama3`` (the template mentions ``<|python_tag|>`` or ``ipython``): a
  call is the JSON ``{"name": ..., "parameters": ...}``;
- ``mistral`` (the template mentions ``[TOOL_CALLS]``): calls are a JSON list
  of ``{"name": ..., "arguments": ...}`` after that control token.

For these the template gets ``tools`` and the conversation's ``tool_calls``
and ``role: "tool"`` messages as OpenAI shapes them; a required or named
``tool_choice`` constrains the reply to the format with a grammar built from
the tools' schemas, while ``auto`` lets the model choose and its reply is
read for calls afterwards. Every other template gets the ``generic`` format
of ``tool_calls.py``, which any model follows.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, replace
from typing import Any

from .constraints import schema_grammar
from .domain import ChatResult, FinishReason, Message, Role, ToolCall, ToolChoice, ToolSpec
from .tool_calls import check_tools, parse_reply, tool_plan

CALL_RULE = "llamachat-call"


@dataclass(frozen=True)
class ToolPlan:
    """What a completion renders and how its reply is constrained and read."""

    messages: list[dict[str, Any]]
    """Messages for the chat template (role, content, and tool fields)."""
    tools: list[dict[str, Any]] | None
    """Tools for the template, in OpenAI's shape (``None``: it gets none)."""
    grammar: str | None
    """GBNF the reply must match (``None``: free)."""
    reads_calls: bool
    """Whether the reply is to be read for tool calls."""


def detect_format(template: str) -> str:
    """The tool format a chat template was made for."""
    if "<tool_call>" in template:
        return "hermes"
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return "generic"


def plan(
    tool_format: str,
    messages: tuple[Message, ...],
    tools: tuple[ToolSpec, ...],
    choice: ToolChoice,
    parallel: bool,
) -> ToolPlan:
    """The plan of a completion in ``tool_format``."""
    if tool_format == "generic":
        plain, schema = tool_plan(messages, tools, choice, parallel)
        return ToolPlan(
            [{"role": m.role.value, "content": m.content} for m in plain],
            None,
            schema_grammar(schema, "tools") if schema else None,
            schema is not None,
        )
    check_tools(tools, choice)
    active = bool(tools) and choice.mode != "none"
    rendered = [template_message(message, tool_format) for message in messages]
    template_tools = [openai_tool(tool) for tool in tools] if active else None
    forced = active and choice.mode in ("required", "function")
    grammar = native_grammar(tool_format, tools, choice, parallel) if forced else None
    return ToolPlan(rendered, template_tools, grammar, active)


def openai_tool(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


def template_message(message: Message, tool_format: str) -> dict[str, Any]:
    """A message as templates of tool-calling models expect it."""
    rendered: dict[str, Any] = {"role": message.role.value, "content": message.content}
    if message.tool_calls:
        key = "parameters" if tool_format == "llama3" else "arguments"
        rendered["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, key: json.loads(call.arguments)},
                # Some templates read the call's fields at its top level.
                "name": call.name,
                key: json.loads(call.arguments),
            }
            for call in message.tool_calls
        ]
    if message.role is Role.TOOL:
        rendered["tool_call_id"] = message.tool_call_id or ""
    return rendered


def native_grammar(
    tool_format: str, tools: tuple[ToolSpec, ...], choice: ToolChoice, parallel: bool
) -> str:
    """GBNF of a reply that is calls in ``tool_format`` only."""
    arguments = "parameters" if tool_format == "llama3" else "arguments"
    allowed = [tool for tool in tools if choice.mode != "function" or tool.name == choice.name]
    call_schema = {
        "oneOf": [
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, arguments: tool.parameters},
                "required": ["name", arguments],
            }
            for tool in allowed
        ]
    }
    calls = re.sub(
        r"^root ::=",
        f"{CALL_RULE} ::=",
        schema_grammar(call_schema, "tools"),
        count=1,
        flags=re.MULTILINE,
    )
    several = parallel and choice.mode != "function" and tool_format != "llama3"
    if tool_format == "hermes":
        block = f'"<tool_call>\\n" {CALL_RULE} "\\n</tool_call>"'
        root = f'{block} ("\\n" {block})*' if several else block
    elif tool_format == "mistral":
        root = f'"[" {CALL_RULE} ("," " "? {CALL_RULE})* "]"' if several else f'"[" {CALL_RULE} "]"'
    else:
        root = CALL_RULE
    return f"root ::= {root}\n{calls}"


HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_native(tool_format: str, text: str) -> tuple[str, tuple[ToolCall, ...]]:
    """The answer and the tool calls of a reply in ``tool_format``."""
    if tool_format == "generic":
        return parse_reply(text)
    if tool_format == "hermes":
        found = [_load(block) for block in HERMES_BLOCK.findall(text)]
        content = HERMES_BLOCK.sub("", text).strip()
    elif tool_format == "mistral":
        parsed = _load(text.strip())
        found = parsed if isinstance(parsed, list) else []
        content = "" if found else text
    else:
        parsed = _load(text.strip())
        found = [parsed] if isinstance(parsed, dict) and "name" in parsed else []
        content = "" if found else text
    calls = tuple(_call(entry) for entry in found if isinstance(entry, dict) and "name" in entry)
    return (content if not calls else content.strip()), calls


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call(entry: dict[str, Any]) -> ToolCall:
    arguments = entry.get("arguments", entry.get("parameters", {}))
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        name=str(entry["name"]),
        arguments=json.dumps(arguments if isinstance(arguments, dict) else {}),
    )


def with_tool_calls(result: ChatResult, tool_format: str, constrained: bool) -> ChatResult:
    """A finished reply that may hold tool calls, as its answer or its calls.
    A reply a grammar held to the tools' format but that was cut short
    (``max_tokens``) is no answer: its text is left empty."""
    if result.finish_reason is not FinishReason.STOP:
        return replace(result, text="") if constrained else result
    text, calls = parse_native(tool_format, result.text)
    if calls:
        return replace(result, text=text, tool_calls=calls, finish_reason=FinishReason.TOOL_CALLS)
    return replace(result, text=text)
