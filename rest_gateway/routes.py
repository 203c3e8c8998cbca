"""The documented REST endpoints: pydantic in, gRPC call, JSON or SSE out."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from grpc_health.v1 import health_pb2_grpc

from llamachat.v1 import chat_pb2, chat_pb2_grpc

from . import schemas
from .affinity import session_header, with_session_key
from .auth import key_of
from .disconnect import unless_disconnected
from .errors import ApiError, documented_errors
from .observe import note
from .settings import GatewaySettings
from .sse import event_stream, relay

SERVICE_NAME = "LLaMA Chat API"
VERSION = "1.0.0"

ERRORS = documented_errors(
    schemas.ErrorResponse,
    {
        400: "Bad request: blank message, value out of range, message too long",
        404: "Session not found",
        409: "The session is busy, or its history changed while the reply was generated "
        "(not kept: send it again)",
        413: "Request body over MAX_BODY_BYTES",
        422: "Wrong types or malformed JSON",
        500: "Generation error",
        503: "Model not loaded, or the inference core is unreachable",
        504: "The inference core did not answer in time",
    },
)

router = APIRouter()


# The dependencies are coroutines although they never wait: FastAPI runs a
# plain function dependency in its thread pool, a hop per request for nothing.


async def settings_of(request: Request) -> GatewaySettings:
    return request.app.state.settings


async def chat_stub(request: Request) -> chat_pb2_grpc.ChatServiceStub:
    return request.app.state.chat_stub


async def health_stub(request: Request) -> health_pb2_grpc.HealthStub:
    return request.app.state.health_stub


async def call_options(request: Request) -> dict[str, Any]:
    """Deadline and metadata (the caller's API key, which names its tenant) of
    a call to the core; the client's ``X-Session-Id`` keys its replica."""
    key = key_of(request.scope)
    settings: GatewaySettings = request.app.state.settings
    options = {
        "timeout": settings.grpc_deadline_s,
        "metadata": (("authorization", f"Bearer {key}"),) if key else (),
    }
    return with_session_key(options, session_header(request.headers))


Settings = Annotated[GatewaySettings, Depends(settings_of)]
# A client's id of one turn, sent again with a retry: the core answers the reply
# it kept for that id instead of generating a second one (its request_id).
# Without one the gateway makes one, so that its own retries (gRPC's, on
# UNAVAILABLE, to another core) cannot keep a turn twice either.
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Makes a retried POST /chat or /chat/stream safe: an id of the turn "
        "(at most 256 bytes, unique within the session, a UUID say); a session that "
        "already kept a turn with this id answers that reply again, generating nothing.",
    ),
]
CallOptions = Annotated[dict[str, Any], Depends(call_options)]
ChatStub = Annotated[chat_pb2_grpc.ChatServiceStub, Depends(chat_stub)]
HealthStub = Annotated[health_pb2_grpc.HealthStub, Depends(health_stub)]


def to_grpc(message_type: type, body: schemas.BaseModel) -> Any:
    """The gRPC request for a REST body; fields left out stay unset, and the
    sampling extensions go into its ``options``."""
    fields = body.model_dump(exclude_none=True, exclude=set(schemas.OPTION_FIELDS))
    if isinstance(body, schemas.SamplingExtensions):
        try:
            fields["options"] = body.options_fields()
        except ValueError as error:
            raise ApiError(400, str(error), param="logit_bias") from error
    return to_grpc_message(message_type, fields)


def to_grpc_message(message_type: type, fields: dict[str, Any]) -> Any:
    """A gRPC request from its fields; a 400 ``ApiError`` if they do not fit it."""
    try:
        message = message_type(**fields)
        message.SerializeToString()  # fails here, not in the channel, on bad UTF-8
    except (ValueError, TypeError) as error:
        raise ApiError(400, f"Invalid request: {error}") from error
    return message


@router.get("/", response_model=schemas.InfoResponse)
async def info() -> schemas.InfoResponse:
    """Basic service information."""
    return schemas.InfoResponse(
        service=SERVICE_NAME, version=VERSION, docs="/docs", health="/health"
    )


@router.get(
    "/health",
    response_model=schemas.HealthResponse,
    response_model_exclude_none=True,
    responses={503: {"model": schemas.HealthResponse, "description": "A chat cannot succeed now"}},
)
async def health(request: Request, settings: Settings) -> Any:
    """Whether a chat can succeed now: the core (with many replicas: any one)
    is reachable, its model loaded and its session store writable (503
    otherwise, with the reason)."""
    checked = await request.app.state.replicas.health(settings.health_timeout_s)
    if any(core.serving for core in checked):
        return schemas.HealthResponse(status="healthy", model_loaded=True)
    details = [core.detail for core in checked]
    if len(checked) > 1:
        details = [f"{core.replica.name}: {core.detail}" for core in checked]
    unhealthy = schemas.HealthResponse(
        status="unavailable",
        model_loaded=any(core.model_loaded for core in checked),
        detail="; ".join(detail for detail in details if detail) or "No core found",
    )
    return JSONResponse(status_code=503, content=unhealthy.model_dump(exclude_none=True))


@router.post("/chat", response_model=schemas.ChatResponse, responses=ERRORS)
async def chat(
    request: Request,
    body: schemas.ChatRequest,
    stub: ChatStub,
    options: CallOptions,
    idempotency_key: IdempotencyKey = None,
) -> schemas.ChatResponse:
    """Send a message and receive the complete response."""
    message = to_grpc(chat_pb2.ChatRequest, body)
    message.request_id = idempotency_key or str(uuid.uuid4())
    call = stub.Chat(message, **options)
    reply = await unless_disconnected(request, call, call)
    note(request, session=reply.session_id, usage=reply.usage)
    return schemas.ChatResponse(
        response=reply.text, session_id=reply.session_id, tokens_used=reply.usage.completion_tokens
    )


@router.post(
    "/chat/stream",
    responses={200: {"content": {"text/event-stream": {}}}, **ERRORS},
    response_class=StreamingResponse,
)
async def chat_stream(
    request: Request,
    body: schemas.ChatRequest,
    stub: ChatStub,
    options: CallOptions,
    idempotency_key: IdempotencyKey = None,
) -> StreamingResponse:
    """Send a message and receive the response as Server-Sent Events."""
    message = to_grpc(chat_pb2.ChatStreamRequest, body)
    message.request_id = idempotency_key or str(uuid.uuid4())
    call = stub.ChatStream(message, **options)
    messages = aiter(call)
    # Errors found before the first piece of text (bad input, model not loaded)
    # still get their own HTTP status, not a 200 stream.
    first = await unless_disconnected(request, call, anext(messages))
    return event_stream(
        relay(
            first,
            messages,
            call,
            on_done=lambda done: note(
                request, session=done.session_id, usage=done.usage, delivered=True
            ),
            on_error=lambda: note(request, stream_error=True),
        )
    )


@router.post("/chat/clear", response_model=schemas.ClearResponse, responses=ERRORS)
async def clear(
    body: schemas.ClearRequest,
    stub: ChatStub,
    options: CallOptions,
) -> schemas.ClearResponse:
    """Forget a session and its history (404 if there is none)."""
    reply = await stub.Clear(to_grpc(chat_pb2.ClearRequest, body), **options)
    return schemas.ClearResponse(status="cleared", session_id=reply.session_id)


@router.get(
    "/sessions",
    response_model=schemas.SessionsResponse,
    response_model_exclude_none=True,
    responses=ERRORS,
)
async def sessions(
    stub: ChatStub,
    options: CallOptions,
    limit: Annotated[
        int, Query(ge=1, le=1000, description="The most ids to return (an extension).")
    ] = 1000,
    cursor: Annotated[
        str | None,
        Query(max_length=64, description="next_cursor of the page before (an extension)."),
    ] = None,
) -> schemas.SessionsResponse:
    """The caller's sessions, least recently used first, a page at a time
    (``limit`` and ``cursor`` are extensions; without them, the first 1000)."""
    reply = await stub.ListSessions(
        chat_pb2.ListSessionsRequest(limit=limit, cursor=cursor or ""), **options
    )
    return schemas.SessionsResponse(
        sessions=list(reply.session_ids),
        count=len(reply.session_ids),
        next_cursor=reply.next_cursor or None,
    )


@router.get("/sessions/{session_id}", response_model=schemas.SessionResponse, responses=ERRORS)
async def session(
    session_id: str,
    stub: ChatStub,
    options: CallOptions,
) -> schemas.SessionResponse:
    """The history a session keeps (404 if there is none). An extension to the
    documented API."""
    reply = await stub.GetSession(chat_pb2.GetSessionRequest(session_id=session_id), **options)
    return schemas.SessionResponse(
        session_id=reply.session_id,
        exchanges=[
            schemas.ExchangeItem(user=e.user, assistant=e.assistant) for e in reply.exchanges
        ],
    )
