"""The documented request and response bodies, as pydantic models.

They check shapes and types only (wrong types get 422; numbers are strict, so
``true`` or ``"0.7"`` is not a number). Values are checked
once, by the inference core, so REST and gRPC users get the same rules and
messages (a blank message or an out-of-range value gets 400). The integer
bounds below are the gRPC wire types' ranges.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

__all__ = ["BaseModel"]

INT32_MAX = 2**31 - 1
UINT32_MAX = 2**32 - 1


class SamplingExtensions(BaseModel):
    """Sampling settings and output constraints beyond the documented API
    (extensions, as llama.cpp's server and Ollama name them); the core's
    ``SamplingOptions``."""

    top_k: int | None = Field(
        default=None, strict=True, ge=0, le=INT32_MAX, description="Top-k cut; 0: off (default 40)."
    )
    min_p: float | None = Field(default=None, strict=True, description="Min-p, 0-1 (default 0.05).")
    repeat_penalty: float | None = Field(
        default=None, strict=True, description="Repetition penalty, above 0 to 10; 1: off."
    )
    frequency_penalty: float | None = Field(
        default=None, strict=True, description="Frequency penalty, -2 to 2 (default 0)."
    )
    presence_penalty: float | None = Field(
        default=None, strict=True, description="Presence penalty, -2 to 2 (default 0)."
    )
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id -> bias, -100 to 100 (-100 bans the token)."
    )
    json_schema: dict[str, Any] | None = Field(
        default=None, description="The reply is JSON that matches this JSON Schema."
    )
    grammar: str | None = Field(
        default=None, description="The reply matches this GBNF grammar (llama.cpp's format)."
    )

    def options_fields(self) -> dict[str, Any]:
        """The fields of the core's ``SamplingOptions``; ``ApiError``-free
        except for a ``logit_bias`` key that is no token id (ValueError)."""
        fields: dict[str, Any] = {
            name: getattr(self, name)
            for name in ("top_k", "min_p", "repeat_penalty", "frequency_penalty",
                         "presence_penalty", "grammar")
            if getattr(self, name) is not None
        }  # fmt: skip
        if self.logit_bias:
            fields["logit_bias"] = token_biases(self.logit_bias)
        if self.json_schema is not None:
            fields["json_schema"] = json.dumps(self.json_schema)
        return fields


OPTION_FIELDS = frozenset(SamplingExtensions.model_fields)


def token_biases(biases: dict[str, float]) -> dict[int, float]:
    """OpenAI's ``logit_bias`` (token ids as JSON object keys) as ints."""
    parsed = {}
    for key, bias in biases.items():
        if not key.lstrip("-").isdigit() or abs(int(key)) > INT32_MAX:
            raise ValueError(f"logit_bias: {key!r} is not a token id")
        parsed[int(key)] = bias
    return parsed


class ChatRequest(SamplingExtensions):
    message: str = Field(description="Your message to the AI.", examples=["Hello, how are you?"])
    session_id: str | None = Field(
        default=None,
        description="Session to continue. Omitted: a new session is created and returned. "
        "An id that does not exist yet creates that session.",
    )
    temperature: float | None = Field(
        default=None, strict=True, description="Sampling temperature, 0.0-2.0 (default 0.7)."
    )
    max_tokens: int | None = Field(
        default=None,
        strict=True,
        ge=-INT32_MAX - 1,
        le=INT32_MAX,
        description="Maximum number of tokens in the response, 1 to the context size "
        "(default 512).",
    )
    top_p: float | None = Field(
        default=None, strict=True, description="Nucleus sampling parameter, 0.0-1.0 (default 0.9)."
    )
    seed: int | None = Field(
        default=None,
        strict=True,
        ge=0,
        le=UINT32_MAX,
        description="Seed of the sampler, for reproducible sampling (default random). "
        "An extension to the documented API.",
    )


class ChatResponse(BaseModel):
    response: str
    session_id: str
    tokens_used: int = Field(description="Number of tokens generated for the response.")


class ClearRequest(BaseModel):
    session_id: str


class ClearResponse(BaseModel):
    status: str = "cleared"
    session_id: str


class SessionsResponse(BaseModel):
    sessions: list[str]
    count: int = Field(description="How many ids this page holds.")
    next_cursor: str | None = Field(
        default=None,
        description="Pass as ?cursor= for the next page; absent on the last (an extension).",
    )


class ExchangeItem(BaseModel):
    user: str = Field(description="The user's message.")
    assistant: str = Field(description="The reply to it.")


class SessionResponse(BaseModel):
    session_id: str
    exchanges: list[ExchangeItem] = Field(
        description="The exchanges the session keeps as its history, oldest first."
    )


class HealthResponse(BaseModel):
    status: str
    model_loaded: bool
    detail: str | None = Field(
        default=None,
        description="Why a chat cannot succeed now (503 only; an extension to the documented "
        "API): the core is unreachable, the model is loading, the core failed, or the session "
        "store cannot be written.",
    )


class InfoResponse(BaseModel):
    service: str
    version: str
    docs: str
    health: str


class ErrorResponse(BaseModel):
    detail: str
