"""OpenAI's chat completion request and response bodies, as pydantic models.

Only what this server does is accepted: a request asking for something it
cannot do (several choices) is refused with a 400 that names the parameter,
rather than silently answered without it. Fields OpenAI's SDKs send that
change nothing here (``user``, ``metadata``, ``store``) are accepted and
ignored. llama.cpp's server's extensions (``top_k``, ``min_p``,
``repeat_penalty``, ``json_schema``, ``grammar``) are accepted too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schemas import INT32_MAX, UINT32_MAX


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments, a JSON object as text.")


class ToolCallItem(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    class Function(BaseModel):
        name: str

    type: Literal["function"]
    function: Function


class ChatMessage(BaseModel):
    role: str = Field(description="system, developer (as system), user, assistant or tool.")
    content: str | list[TextPart] | None = Field(
        default=None, description="The text, or a list of text parts."
    )
    name: str | None = None
    tool_calls: list[ToolCallItem] | None = Field(
        default=None, description="The tools an assistant message called."
    )
    tool_call_id: str | None = Field(
        default=None, description="For a tool message: the call it is the result of."
    )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class SamplingRequest(BaseModel):
    """What both OpenAI completion requests share: the model, streaming,
    sampling, stop sequences, and the reply's format (with llama.cpp's
    server's extensions)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(description="The model's name (any serves, unless STRICT_MODEL_NAMES).")
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, strict=True)
    top_p: float | None = Field(default=None, strict=True)
    seed: int | None = Field(
        default=None, strict=True, ge=-1, le=UINT32_MAX, description="-1: a random seed."
    )
    n: int | None = None
    stop: str | list[str] | None = None
    response_format: ResponseFormat | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # llama.cpp's server's extensions.
    top_k: int | None = Field(default=None, strict=True, ge=0, le=INT32_MAX)
    min_p: float | None = None
    repeat_penalty: float | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(description="The conversation, oldest first.")
    max_tokens: int | None = Field(default=None, strict=True, ge=-INT32_MAX - 1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(
        default=None, strict=True, ge=-INT32_MAX - 1, le=INT32_MAX
    )
    tools: list[ToolDef] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, strict=True, ge=0, le=20)


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
    content: str | None
    tool_calls: list[ToolCallItem] | None = Field(default=None, exclude_if=lambda v: v is None)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


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


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: a raw prompt to continue (no chat template)."""

    prompt: str | list[str] = Field(description="The text to continue (a list of one).")
    suffix: str | None = Field(
        default=None, description="Text after the completion (fill-in-the-middle models only)."
    )
    max_tokens: int | None = Field(
        default=16,
        strict=True,
        ge=-INT32_MAX - 1,
        le=INT32_MAX,
        description="Tokens to generate; OpenAI's default for this endpoint is 16.",
    )
    best_of: int | None = None
    echo: bool | None = None
    logprobs: int | None = Field(default=None, strict=True, ge=0, le=20)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: CompletionLogprobs | None = None
    finish_reason: str


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage
    system_fingerprint: None = None
