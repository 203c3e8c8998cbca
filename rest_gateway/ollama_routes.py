"""Ollama's API, for the tools that speak it (Open WebUI's Ollama connection,
the ``ollama`` libraries, editors, Home Assistant, n8n): ``/api/version``,
``/api/tags``, ``/api/show``, ``/api/ps``, ``/api/chat`` and ``/api/generate``.

A translation onto the core's ``Complete``/``CompleteStream`` (stateless, as
Ollama's API is): replies stream as NDJSON unless ``"stream": false``, with
Ollama's timing fields in nanoseconds. ``options`` map onto the sampling
settings (``num_predict`` is ``max_tokens``); Ollama's server-side options
(``num_ctx``, ``num_gpu``, ``num_thread`` and the like) are this server's
settings and are ignored, as Ollama ignores options a model does not use.
``format`` is ``"json"`` or a JSON Schema; ``tools`` and tool calls use the
core's tool support. ``/api/pull``, ``/api/create``, ``/api/delete`` and
``/api/copy`` answer that this server serves the one model it started with.
Errors are ``{"error": "..."}``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llamachat.v1 import chat_pb2

from . import ollama_schemas as ol
from .disconnect import unless_disconnected
from .errors import ApiError, detail_of
from .observe import note
from .openai_routes import require_model, served_model
from .routes import CallOptions, ChatStub, to_grpc_message
from .sse import chain

router = APIRouter(prefix="/api", tags=["Ollama-compatible"])

# The Ollama version whose API this follows (clients check it for features).
OLLAMA_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"
ROLES = {
    "system": chat_pb2.ROLE_SYSTEM,
    "user": chat_pb2.ROLE_USER,
    "assistant": chat_pb2.ROLE_ASSISTANT,
    "tool": chat_pb2.ROLE_TOOL,
}
DONE_REASONS = {
    chat_pb2.FINISH_REASON_STOP: "stop",
    chat_pb2.FINISH_REASON_LENGTH: "length",
    chat_pb2.FINISH_REASON_TOOL_CALLS: "stop",
}
# Ollama's option -> the core's field (top level, or in options).
TOP_LEVEL_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed"}
SAMPLING_OPTIONS = ("top_k", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty")


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def model_entry(request: Request, model: Any) -> dict[str, Any]:
    """How ``/api/tags`` and ``/api/ps`` describe the served model."""
    details = model.details
    return {
        "name": model.id,
        "model": model.id,
        "modified_at": datetime.fromtimestamp(request.app.state.started, UTC).isoformat(),
        "size": details.size_bytes,
        "digest": hashlib.sha256(model.id.encode()).hexdigest(),
        "details": details_of(model),
    }


def details_of(model: Any) -> dict[str, Any]:
    details = model.details
    parts = details.description.split()
    return {
        "parent_model": "",
        "format": "gguf",
        "family": details.architecture,
        "families": [details.architecture] if details.architecture else None,
        "parameter_size": f"{details.parameters / 1e6:.0f}M"
        if details.parameters < 1e9
        else f"{details.parameters / 1e9:.1f}B",
        "quantization_level": parts[-1] if parts else "",
    }


@router.get("/version")
async def version() -> dict[str, str]:
    """The Ollama API version this server follows."""
    return {"version": OLLAMA_VERSION}


@router.get("/tags")
async def tags(request: Request, stub: ChatStub, options: CallOptions) -> dict[str, Any]:
    """The one model this server serves."""
    return {"models": [model_entry(request, await served_model(stub, options))]}


@router.get("/ps")
async def running(request: Request, stub: ChatStub, options: CallOptions) -> dict[str, Any]:
    """The loaded model (loaded for as long as the server runs)."""
    model = await served_model(stub, options)
    entry = {**model_entry(request, model), "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0}
    return {"models": [entry] if model.loaded else []}


@router.post("/show")
async def show(
    request: Request, body: ol.ModelBody, stub: ChatStub, options: CallOptions
) -> dict[str, Any]:
    """The model's details, template and capabilities."""
    model = await served_model(stub, options)
    require_model(request, body.model or body.name, model.id)
    return {
        "modelfile": f"FROM {model.id}\n",
        "parameters": "",
        "template": model.details.chat_template,
        "details": details_of(model),
        "model_info": {
            "general.architecture": model.details.architecture,
            "general.parameter_count": model.details.parameters,
            f"{model.details.architecture}.context_length": model.context_size,
        },
        "capabilities": ["completion", "tools"],
        "modified_at": model_entry(request, model)["modified_at"],
    }


def sampling_fields(request: ol.OllamaRequest) -> dict[str, Any]:
    """Ollama's ``options`` and ``format`` as the core's request fields."""
    given = request.options or {}
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    try:
        for option, field in TOP_LEVEL_OPTIONS.items():
            if given.get(option) is not None:
                fields[field] = given[option]
        if given.get("num_predict") is not None and int(given["num_predict"]) > 0:
            fields["max_tokens"] = int(given["num_predict"])
        if given.get("stop") is not None:
            stop = given["stop"]
            fields["stop"] = [stop] if isinstance(stop, str) else list(stop)
        for option in SAMPLING_OPTIONS:
            if given.get(option) is not None:
                extra[option] = given[option]
    except (TypeError, ValueError) as error:
        raise ApiError(400, f"options: {error}") from error
    if request.format == "json":
        extra["json_object"] = True
    elif isinstance(request.format, dict):
        extra["json_schema"] = json.dumps(request.format)
    elif request.format not in (None, ""):
        raise ApiError(400, 'format must be "json" or a JSON Schema object')
    if request.think:
        raise ApiError(400, "think is not supported: this model does not think out loud")
    return {**fields, "options": extra}


def tool_fields(body: ol.ChatBody) -> dict[str, Any]:
    tools = []
    for tool in body.tools or ():
        function = tool.get("function") or {}
        if not isinstance(function, dict) or not function.get("name"):
            raise ApiError(400, "tools: each tool needs a function with a name")
        tools.append(
            {
                "name": str(function["name"]),
                "description": str(function.get("description") or ""),
                "parameters_json": json.dumps(function.get("parameters") or {"type": "object"}),
            }
        )
    return {"tools": tools}


def chat_messages(body: ol.ChatBody) -> list[dict[str, Any]]:
    messages = []
    for index, message in enumerate(body.messages):
        if message.images:
            raise ApiError(400, f"messages[{index}].images: this model reads no images")
        role = ROLES.get(message.role)
        if role is None:
            raise ApiError(
                400,
                f"messages[{index}].role: {message.role!r} is not system, user, assistant or tool",
            )
        messages.append(
            {
                "role": role,
                "content": message.content,
                "tool_calls": [
                    {
                        "id": f"call_{index}_{number}",
                        "name": call.function.name,
                        "arguments_json": json.dumps(call.function.arguments),
                    }
                    for number, call in enumerate(message.tool_calls or ())
                ],
            }
        )
    return messages


@router.post("/chat")
async def chat(request: Request, body: ol.ChatBody, stub: ChatStub, options: CallOptions) -> Any:
    """A reply to ``messages``, streamed as NDJSON unless ``"stream": false``."""
    model = await served_model(stub, options)
    require_model(request, body.model or model.id, model.id)
    if not body.messages:  # Ollama's way to load a model: it is loaded
        return loaded(model.id, {"message": {"role": "assistant", "content": ""}})
    fields = {"messages": chat_messages(body), **sampling_fields(body), **tool_fields(body)}
    return await reply(request, stub, options, model.id, fields, body.stream, "message")


@router.post("/generate")
async def generate(
    request: Request, body: ol.GenerateBody, stub: ChatStub, options: CallOptions
) -> Any:
    """The continuation of ``prompt`` (through the chat template unless
    ``raw``), streamed as NDJSON unless ``"stream": false``."""
    model = await served_model(stub, options)
    require_model(request, body.model or model.id, model.id)
    for name, unsupported in (
        ("images", bool(body.images)),
        ("template", bool(body.template)),
        ("context", bool(body.context)),
    ):
        if unsupported:
            raise ApiError(400, f"{name} is not supported by this server")
    if not body.prompt:
        return loaded(model.id, {"response": ""})
    fields: dict[str, Any] = sampling_fields(body)
    if body.raw or body.suffix:
        fields.update(prompt=body.prompt, suffix=body.suffix)
    else:
        system = [{"role": chat_pb2.ROLE_SYSTEM, "content": body.system}] if body.system else []
        fields["messages"] = [*system, {"role": chat_pb2.ROLE_USER, "content": body.prompt}]
    fields = {name: value for name, value in fields.items() if value is not None}
    return await reply(request, stub, options, model.id, fields, body.stream, "response")


def loaded(model: str, empty: dict[str, Any]) -> dict[str, Any]:
    return {"model": model, "created_at": now(), **empty, "done": True, "done_reason": "load"}


def piece(kind: str, text: str) -> dict[str, Any]:
    if kind == "message":
        return {"message": {"role": "assistant", "content": text}}
    return {"response": text}


def final(
    kind: str, model: str, last: Any, started: float, first: float | None, text: str
) -> dict[str, Any]:
    """The last object: done, why, and Ollama's counts and durations (ns)."""
    ended = time.monotonic()
    first = first or ended
    body = piece(kind, text)
    if kind == "message" and last.tool_calls:
        body["message"]["tool_calls"] = [
            {"function": {"name": call.name, "arguments": json.loads(call.arguments_json)}}
            for call in last.tool_calls
        ]
    return {
        "model": model,
        "created_at": now(),
        **body,
        "done": True,
        "done_reason": DONE_REASONS.get(last.finish_reason, "stop"),
        "total_duration": int((ended - started) * 1e9),
        "load_duration": 0,
        "prompt_eval_count": last.usage.prompt_tokens,
        "prompt_eval_duration": int((first - started) * 1e9),
        "eval_count": last.usage.completion_tokens,
        "eval_duration": int((ended - first) * 1e9),
    }


async def reply(
    request: Request,
    stub: ChatStub,
    options: dict[str, Any],
    model: str,
    fields: dict[str, Any],
    stream: bool,
    kind: str,
) -> Any:
    started = time.monotonic()
    if not stream:
        call = stub.Complete(to_grpc_message(chat_pb2.CompleteRequest, fields), **options)
        last = await unless_disconnected(request, call, call)
        note(request, usage=last.usage)
        stopped_early(last)
        return final(kind, model, last, started, None, last.text)
    stream_call = stub.CompleteStream(
        to_grpc_message(chat_pb2.CompleteStreamRequest, fields), **options
    )
    messages = aiter(stream_call)
    first = await unless_disconnected(request, stream_call, anext(messages))
    return StreamingResponse(
        ndjson(request, kind, model, first, messages, stream_call, started),
        media_type=NDJSON,
    )


def stopped_early(last: Any) -> None:
    if last.finish_reason not in DONE_REASONS:
        raise ApiError(503, "Generation was stopped before the reply ended; retry")


async def ndjson(
    request: Request,
    kind: str,
    model: str,
    first_message: chat_pb2.CompleteStreamResponse,
    rest: AsyncIterator[chat_pb2.CompleteStreamResponse],
    call: grpc.aio.UnaryStreamCall,
    started: float,
) -> AsyncIterator[str]:
    """One JSON object a line: a piece each, then the final object; an error
    after the start is a last ``{"error": ...}`` line, as Ollama sends it."""
    first_token: float | None = None
    try:
        async for message in chain(first_message, rest):
            if message.finish_reason == chat_pb2.FINISH_REASON_UNSPECIFIED:
                first_token = first_token or time.monotonic()
                line = {"model": model, "created_at": now(), **piece(kind, message.text)}
                yield json.dumps({**line, "done": False}) + "\n"
                continue
            note(request, usage=message.usage, delivered=True)
            try:
                stopped_early(message)
            except ApiError as error:
                note(request, stream_error=True)
                yield json.dumps({"error": str(error)}) + "\n"
                break
            yield json.dumps(final(kind, model, message, started, first_token, "")) + "\n"
            break
    except grpc.aio.AioRpcError as error:
        note(request, stream_error=True)
        yield json.dumps({"error": detail_of(error)}) + "\n"
    finally:
        call.cancel()


# Last, so that the routes above are matched first.
@router.api_route("/{action}", methods=["POST", "DELETE"], include_in_schema=False)
async def managing(action: str) -> JSONResponse:
    """Model management: this server serves the model it was started with."""
    if action in ("pull", "push", "create", "delete", "copy", "blobs"):
        raise ApiError(
            400,
            f"/api/{action} is not supported: this server serves the one model it was "
            "started with (set MODEL_PATH and restart it to serve another)",
        )
    raise ApiError(404, f"/api/{action} does not exist")


class JsonBodies:
    """ASGI middleware: Ollama reads every ``/api/`` body as JSON whatever its
    Content-Type, and its documentation's ``curl -d '{...}'`` examples send
    none (curl then says form data); here too."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/"):
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)
