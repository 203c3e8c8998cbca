"""OpenAI's chat completion request and response bodies, as pydantic models.

Only what this server does is accepted: a request asking for something it
cannot do (several choices, tools, log probabilities, a JSON response format,
penalties) is refused with a 400 that names the parameter, rather than
silently answered without it. Fields OpenAI's SDKs send that change nothing
here (``user``, ``metadata``, zero penalties) are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import INT32_MAX, UINT32_MAX


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: str = Field(description="system, developer (as system), user or assistant.")
    content: str | list[TextPart] | None = Field(
        default=None, description="The text, or a list of text parts."
    )
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The model's id, as GET /v1/models lists it.")
    messages: list[ChatMessage] = Field(description="The conversation, oldest first.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, strict=True)
    top_p: float | None = Field(default=None, strict=True)
    max_tokens: int | None = Field(default=None, strict=True, ge=-INT32_MAX - 1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(
        default=None, strict=True, ge=-INT32_MAX - 1, le=INT32_MAX
    )
    seed: int | None = Field(default=None, strict=True, ge=0, le=UINT32_MAX)
    n: int | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamachat"
    context_length: int = Field(description="Context size in tokens (an extension).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens found in the KV cache.")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    system_fingerprint: None = None


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody
