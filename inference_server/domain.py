"""The engine's vocabulary: plain dataclasses, no protobuf, no HTTP."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Literal

from llamachat_process.tenants import DEFAULT_TENANT

SessionKey = tuple[str, str]
"""A session's tenant and id: the same id in two tenants is two sessions."""


class FinishReason(enum.Enum):
    """Why generation stopped."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    TOOL_CALLS = "tool_calls"
    """The reply is tool calls (``ChatResult.tool_calls``)."""


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request; ``None`` means the server's default."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs; -100 bans a token."""
    json_schema: str | None = None
    """The reply must be JSON matching this JSON Schema (JSON text)."""
    grammar: str | None = None
    """The reply must match this GBNF grammar."""
    json_object: bool = False
    """The reply must be a JSON object."""
    logprobs: int | None = None
    """Report each generated token's log probability and this many most
    likely alternatives (0 to 20); ``None``: none."""


@dataclass(frozen=True)
class Sampling:
    """Sampling settings after defaults are applied; ``seed=None`` means random."""

    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    grammar: str | None = None
    """GBNF the reply must match (from a JSON Schema, a JSON object or a grammar)."""
    logprobs: int | None = None
    """As ``SamplingParams.logprobs``."""

    @property
    def penalized(self) -> bool:
        return (self.repeat_penalty, self.frequency_penalty, self.presence_penalty) != (1, 0, 0)


@dataclass(frozen=True)
class ChatRequest:
    """One user message to a session (``None``: a new session)."""

    message: str
    session_id: str | None = None
    sampling: SamplingParams = SamplingParams()
    tenant: str = DEFAULT_TENANT
    """Whose session it is: a session id means a session of this tenant only."""
    request_id: str | None = None
    """Makes a retry idempotent: a turn whose session keeps this id already is
    answered the kept reply, and no second exchange is made."""


class Role(enum.Enum):
    """Who wrote a message of a conversation."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@dataclass(frozen=True)
class ToolCall:
    """A call of a tool: its id, the tool's name, its arguments as JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ToolSpec:
    """A tool the model may call, with the JSON Schema of its arguments."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class ToolChoice:
    """Whether the model may (``auto``), must (``required``, ``function``: the
    tool ``name``) or must not (``none``) call tools."""

    mode: Literal["auto", "none", "required", "function"] = "auto"
    name: str | None = None


@dataclass(frozen=True)
class Message:
    """One message of a conversation given in full: an assistant's may carry
    the tool calls it made, a tool's the id of the call it answers."""

    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclass(frozen=True)
class CompletionRequest:
    """A whole conversation to reply to; no session is read or kept."""

    messages: tuple[Message, ...]
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    """The reply ends before the first of these appears in it."""
    tenant: str = DEFAULT_TENANT
    """Whose request it is: a cached prompt is shared within a tenant only."""
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool = True
    prompt: str | None = None
    """A raw prompt to continue, instead of ``messages`` (no chat template)."""
    suffix: str | None = None
    """With ``prompt``: the text after the completion (fill-in-the-middle)."""


@dataclass(frozen=True)
class ModelInfo:
    """The model being served."""

    id: str
    context_size: int
    loaded: bool
    unavailable_reason: str | None = None
    """Why a chat cannot succeed now (model not loaded, engine failed, session
    store not writable); ``None`` when it can."""
    details: ModelDetails | None = None
    """What the loaded model is (``None`` while loading)."""


@dataclass(frozen=True)
class ModelDetails:
    """A loaded model file: architecture, description, size, template."""

    architecture: str
    description: str
    parameters: int
    size_bytes: int
    chat_template: str
    tool_format: str


@dataclass(frozen=True)
class TextDelta:
    """A piece of the reply, as soon as it is decoded (whole UTF-8 characters)."""

    text: str


@dataclass(frozen=True)
class TopLogprob:
    """A token that was likely at a position, and its log probability."""

    token: str
    token_bytes: bytes
    logprob: float


@dataclass(frozen=True)
class TokenLogprob(TopLogprob):
    """A generated token, its log probability under the model (before any
    sampler changed the distribution), and the most likely tokens there."""

    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ChatResult:
    """The end of a reply: the whole text, why it ended, and token counts.
    ``session_id`` is ``None`` for a ``CompletionRequest``, which keeps none."""

    session_id: str | None
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0
    """Prompt tokens reused from the KV cache rather than evaluated again."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """Per generated token, when the request asked for them."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The tools the model called (``finish_reason`` is ``TOOL_CALLS``)."""


ChatEvent = TextDelta | ChatResult
"""What ``Engine.chat_stream`` yields: deltas, then exactly one result."""


@dataclass(frozen=True)
class Exchange:
    """One user message and the reply to it, as kept in a session's history."""

    user: str
    assistant: str
