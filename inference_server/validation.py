"""Checks of a chat request's values, and the defaults of unset sampling fields.

One place for these rules, so that every engine (and every protocol in front
of it) accepts and refuses exactly the same requests.
"""

from __future__ import annotations

from dataclasses import replace

from .domain import ChatRequest, CompletionRequest, Sampling, SamplingParams
from .errors import InvalidRequest
from .settings import ServerSettings

# Ids are UUIDs unless a client picks its own; this bounds what one may pick
# (so that a page of 1000 ids stays far below any message limit).
MAX_SESSION_ID_BYTES = 256
# As OpenAI's API allows.
MAX_STOP_SEQUENCES = 4
# They are looked for after every token, on the scheduler's thread.
MAX_STOP_CHARS = 128
# As OpenAI's API allows.
MAX_LOGIT_BIAS = 300
MAX_TOP_K = 1_000_000
MAX_REPEAT_PENALTY = 10.0
# As OpenAI's API allows.
MAX_TOP_LOGPROBS = 20


def resolve_sampling(request: ChatRequest, settings: ServerSettings, n_ctx: int) -> Sampling:
    """The request's sampling settings with defaults filled in.

    Raises ``InvalidRequest`` for a blank message, an over-long session id or
    a value out of range (NaN included).
    The seed stays unset when the request sets none: a fresh random seed.
    """
    if not request.message.strip():
        raise InvalidRequest("Message cannot be empty", param="message")
    check_length("message", request.message, settings.max_message_chars)
    if request.session_id is not None:
        size = len(request.session_id.encode("utf-8", "surrogatepass"))
        if size > MAX_SESSION_ID_BYTES:
            raise InvalidRequest(
                f"session_id must be at most {MAX_SESSION_ID_BYTES} bytes in UTF-8, got {size}"
            )
    if request.request_id is not None:
        size = len(request.request_id.encode("utf-8", "surrogatepass"))
        if size > MAX_SESSION_ID_BYTES:
            raise InvalidRequest(
                f"request_id must be at most {MAX_SESSION_ID_BYTES} bytes in UTF-8, got {size}",
                param="request_id",
            )
    return _with_defaults(request.sampling, settings, n_ctx)


def resolve_completion_sampling(
    request: CompletionRequest, settings: ServerSettings, n_ctx: int
) -> Sampling:
    """As ``resolve_sampling``, for a whole conversation: it needs at least one
    message, and some message must say something; or for a raw prompt."""
    if request.suffix is not None and request.prompt is None:
        raise InvalidRequest("suffix needs a prompt", param="suffix")
    if request.prompt is not None:
        if request.messages:
            raise InvalidRequest("give either messages or a prompt, not both", param="prompt")
        if request.tools:
            raise InvalidRequest("tools need messages, not a raw prompt", param="tools")
        if not request.prompt:
            raise InvalidRequest("prompt cannot be empty", param="prompt")
        check_length("prompt", request.prompt, settings.max_message_chars)
        check_length("suffix", request.suffix or "", settings.max_message_chars)
    elif not request.messages:
        raise InvalidRequest("messages must hold at least one message", param="messages")
    elif not any(message.content.strip() for message in request.messages):
        raise InvalidRequest("every message is empty", param="messages")
    for index, message in enumerate(request.messages):
        check_length(f"messages[{index}].content", message.content, settings.max_message_chars)
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(request.stop)}"
        )
    if not all(request.stop):
        raise InvalidRequest("stop sequences must not be empty", param="stop")
    if any(len(stop) > MAX_STOP_CHARS for stop in request.stop):
        raise InvalidRequest(
            f"stop sequences must be at most {MAX_STOP_CHARS} characters", param="stop"
        )
    return _with_defaults(request.sampling, settings, n_ctx)


def check_length(name: str, text: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise InvalidRequest(
            f"{name} must be at most {max_chars} characters, got {len(text)}", param=name
        )


def _with_defaults(given: SamplingParams, settings: ServerSettings, n_ctx: int) -> Sampling:
    temperature = settings.default_temperature if given.temperature is None else given.temperature
    top_p = settings.default_top_p if given.top_p is None else given.top_p
    # The default never exceeds the context; a value the client sets must fit.
    max_tokens = (
        min(settings.default_max_tokens, n_ctx) if given.max_tokens is None else given.max_tokens
    )
    _check_range("temperature", temperature, 0.0, 2.0)
    _check_range("top_p", top_p, 0.0, 1.0)
    if not 1 <= max_tokens <= n_ctx:
        raise InvalidRequest(
            f"max_tokens must be between 1 and the context size {n_ctx}, got {max_tokens}",
            param="max_tokens",
        )
    base = Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=given.seed)
    top_k = base.top_k if given.top_k is None else given.top_k
    min_p = base.min_p if given.min_p is None else given.min_p
    repeat = base.repeat_penalty if given.repeat_penalty is None else given.repeat_penalty
    frequency = (
        base.frequency_penalty if given.frequency_penalty is None else given.frequency_penalty
    )
    presence = base.presence_penalty if given.presence_penalty is None else given.presence_penalty
    _check_range("top_k", top_k, 0, MAX_TOP_K)
    _check_range("min_p", min_p, 0.0, 1.0)
    if not 0.0 < repeat <= MAX_REPEAT_PENALTY:
        raise InvalidRequest(
            f"repeat_penalty must be above 0 and at most {MAX_REPEAT_PENALTY:g}, got {repeat}",
            param="repeat_penalty",
        )
    _check_range("frequency_penalty", frequency, -2.0, 2.0)
    _check_range("presence_penalty", presence, -2.0, 2.0)
    if len(given.logit_bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"logit_bias takes at most {MAX_LOGIT_BIAS} tokens, got {len(given.logit_bias)}",
            param="logit_bias",
        )
    for token, bias in given.logit_bias:
        if token < 0:
            raise InvalidRequest(f"logit_bias: {token} is not a token id", param="logit_bias")
        _check_range(f"logit_bias[{token}]", bias, -100.0, 100.0, param="logit_bias")
    constraints = [
        name
        for name, given_one in (
            ("json_schema", given.json_schema),
            ("grammar", given.grammar),
            ("json_object", given.json_object),
        )
        if given_one
    ]
    if len(constraints) > 1:
        raise InvalidRequest(
            f"{' and '.join(constraints)} cannot be combined: give one", param=constraints[1]
        )
    if given.logprobs is not None:
        _check_range("top_logprobs", given.logprobs, 0, MAX_TOP_LOGPROBS)
    return replace(
        base,
        logprobs=given.logprobs,
        top_k=top_k,
        min_p=min_p,
        repeat_penalty=repeat,
        frequency_penalty=frequency,
        presence_penalty=presence,
        logit_bias=given.logit_bias,
    )


def _check_range(
    name: str, value: float, low: float, high: float, *, param: str | None = None
) -> None:
    # Written so that NaN fails too.
    if not low <= value <= high:
        raise InvalidRequest(
            f"{name} must be between {low:g} and {high:g}, got {value}", param=param or name
        )
