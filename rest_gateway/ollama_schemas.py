"""Ollama's API request bodies, as pydantic models (its responses are built
as plain dicts in ``ollama_routes``, field for field as Ollama sends them)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class OllamaFunctionCall(BaseModel):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class OllamaToolCall(BaseModel):
    function: OllamaFunctionCall


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = Field(default=None, description="For a tool message: the tool.")


class OllamaRequest(BaseModel):
    """What ``/api/chat`` and ``/api/generate`` share."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    format: str | dict[str, Any] | None = Field(
        default=None, description='"json", or a JSON Schema the reply must match.'
    )
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: str | int | float | None = Field(
        default=None, description="Accepted; the model stays loaded for the server's life."
    )
    think: bool | str | None = None


class ChatBody(OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateBody(OllamaRequest):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    raw: bool = False
    images: list[str] | None = None
    context: list[int] | None = None


class ModelBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = ""
    name: str = Field(default="", description="The older spelling of model.")
