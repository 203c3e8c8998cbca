"""Checks of a chat request's values, and the defaults of unset sampling fields.

One place for these rules, so that every engine (and every protocol in front
of it) accepts and refuses exactly the same requests.
"""

from __future__ import annotations

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


def resolve_sampling(request: ChatRequest, settings: ServerSettings, n_ctx: int) -> Sampling:
    """The request's sampling settings with defaults filled in.

    Raises ``InvalidRequest`` for a blank message, an over-long session id or
    a value out of range (NaN included).
    The seed stays unset when the request sets none: a fresh random seed.
    """
    if not request.message.strip():
        raise InvalidRequest("Message cannot be empty")
    check_length("message", request.message, settings.max_message_chars)
    if request.session_id is not None:
        size = len(request.session_id.encode("utf-8", "surrogatepass"))
        if size > MAX_SESSION_ID_BYTES:
            raise InvalidRequest(
                f"session_id must be at most {MAX_SESSION_ID_BYTES} bytes in UTF-8, got {size}"
            )
    return _with_defaults(request.sampling, settings, n_ctx)


def resolve_completion_sampling(
    request: CompletionRequest, settings: ServerSettings, n_ctx: int
) -> Sampling:
    """As ``resolve_sampling``, for a whole conversation: it needs at least one
    message, and some message must say something."""
    if not request.messages:
        raise InvalidRequest("messages must hold at least one message")
    if not any(message.content.strip() for message in request.messages):
        raise InvalidRequest("every message is empty")
    for index, message in enumerate(request.messages):
        check_length(f"messages[{index}].content", message.content, settings.max_message_chars)
    if len(request.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(request.stop)}"
        )
    if not all(request.stop):
        raise InvalidRequest("stop sequences must not be empty")
    if any(len(stop) > MAX_STOP_CHARS for stop in request.stop):
        raise InvalidRequest(f"stop sequences must be at most {MAX_STOP_CHARS} characters")
    return _with_defaults(request.sampling, settings, n_ctx)


def check_length(name: str, text: str, max_chars: int) -> None:
    if len(text) > max_chars:
        raise InvalidRequest(f"{name} must be at most {max_chars} characters, got {len(text)}")


def _with_defaults(given: SamplingParams, settings: ServerSettings, n_ctx: int) -> Sampling:
    temperature = settings.default_temperature if given.temperature is None else given.temperature
    top_p = settings.default_top_p if given.top_p is None else given.top_p
    # The default never exceeds the context; a value the client sets must fit.
    max_tokens = (
        min(settings.default_max_tokens, n_ctx) if given.max_tokens is None else given.max_tokens
    )
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequest(f"temperature must be between 0 and 2, got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise InvalidRequest(f"top_p must be between 0 and 1, got {top_p}")
    if not 1 <= max_tokens <= n_ctx:
        raise InvalidRequest(
            f"max_tokens must be between 1 and the context size {n_ctx}, got {max_tokens}"
        )
    return Sampling(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=given.seed)
