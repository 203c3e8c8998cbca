"""The engine's vocabulary: plain dataclasses, no protobuf, no HTTP."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from llamachat_process.tenants import DEFAULT_TENANT

SessionKey = tuple[str, str]
"""A session's tenant and id: the same id in two tenants is two sessions."""


class FinishReason(enum.Enum):
    """Why generation stopped."""

    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request; ``None`` means the server's default."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Sampling:
    """Sampling settings after defaults are applied; ``seed=None`` means random."""

    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None


@dataclass(frozen=True)
class ChatRequest:
    """One user message to a session (``None``: a new session)."""

    message: str
    session_id: str | None = None
    sampling: SamplingParams = SamplingParams()
    tenant: str = DEFAULT_TENANT
    """Whose session it is: a session id means a session of this tenant only."""


class Role(enum.Enum):
    """Who wrote a message of a conversation."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class Message:
    """One message of a conversation given in full."""

    role: Role
    content: str


@dataclass(frozen=True)
class CompletionRequest:
    """A whole conversation to reply to; no session is read or kept."""

    messages: tuple[Message, ...]
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    """The reply ends before the first of these appears in it."""
    tenant: str = DEFAULT_TENANT
    """Whose request it is: a cached prompt is shared within a tenant only."""


@dataclass(frozen=True)
class ModelInfo:
    """The model being served."""

    id: str
    context_size: int
    loaded: bool
    unavailable_reason: str | None = None
    """Why a chat cannot succeed now (model not loaded, engine failed, session
    store not writable); ``None`` when it can."""


@dataclass(frozen=True)
class TextDelta:
    """A piece of the reply, as soon as it is decoded (whole UTF-8 characters)."""

    text: str


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


ChatEvent = TextDelta | ChatResult
"""What ``Engine.chat_stream`` yields: deltas, then exactly one result."""


@dataclass(frozen=True)
class Exchange:
    """One user message and the reply to it, as kept in a session's history."""

    user: str
    assistant: str
