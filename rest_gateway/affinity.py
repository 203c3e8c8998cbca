"""Session affinity: which key places a call on the ring of replicas, and
which replica answered (the ``X-Core-Replica`` header of the REST answer).

Every call the routes make goes through ``session_affinity()``, interceptors
of the core channel that give each call ``x-session-id`` metadata:

* a session's calls (Chat, ChatStream, Clear, GetSession) its session id; a
  new session gets its id here, made by the gateway, before the call is
  routed, so that its first turn already lands where its next ones will;
* a stateless completion (Complete, CompleteStream) the key the route gave
  (``X-Session-Id`` header, else OpenAI's ``user`` field), else a hash of its
  conversation's first messages: up to and including the first user message
  (or a raw prompt's first characters), which every later turn repeats;
* the rest (GetModel, ListSessions, ...) none, so any replica answers.

``ReplicaHeader`` (ASGI middleware) adds ``X-Core-Replica`` to the answer: the
name in the ``x-core-replica`` metadata of the last keyed call the request
made, read when the answer starts (a stream's first message has come by then,
and the core sends that name with it).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import grpc
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llamachat.v1 import chat_pb2

from .core_channel import SESSION_KEY

REPLICA_KEY = "x-core-replica"
REPLICA_HEADER = b"x-core-replica"
# Of a raw prompt, the characters that key it (later turns repeat them).
PROMPT_KEY_CHARS = 256
# A longer key goes as its hash.
MAX_KEY_CHARS = 256

SESSION_REQUESTS = (
    chat_pb2.ChatRequest,
    chat_pb2.ChatStreamRequest,
    chat_pb2.ClearRequest,
    chat_pb2.GetSessionRequest,
)
NEW_SESSION_REQUESTS = (chat_pb2.ChatRequest, chat_pb2.ChatStreamRequest)
COMPLETION_REQUESTS = (chat_pb2.CompleteRequest, chat_pb2.CompleteStreamRequest)


def new_session_id() -> str:
    return str(uuid.uuid4())


def conversation_key(request: chat_pb2.CompleteRequest | chat_pb2.CompleteStreamRequest) -> str:
    """A hash of what every turn of a conversation starts with."""
    digest = hashlib.sha256()
    if request.messages:
        for message in request.messages:
            digest.update(f"{message.role}\0{message.content}\0".encode("utf-8", "replace"))
            if message.role == chat_pb2.ROLE_USER:
                break
    else:
        digest.update(request.prompt[:PROMPT_KEY_CHARS].encode("utf-8", "replace"))
    return digest.hexdigest()[:32]


def metadata_value(key: str) -> str:
    """``key`` as it may go in metadata: printable ASCII, else its hash."""
    if key.isascii() and key.isprintable() and len(key) <= MAX_KEY_CHARS:
        return key
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def with_session_key(options: dict[str, Any], key: str | None) -> dict[str, Any]:
    """Call options with ``key`` as the routing key, unless they have one."""
    metadata = tuple(options.get("metadata", ()))
    if not key or any(name == SESSION_KEY for name, _ in metadata):
        return options
    return {**options, "metadata": (*metadata, (SESSION_KEY, metadata_value(key)))}


def keyed(request: Any, metadata: tuple[tuple[str, Any], ...]) -> tuple[Any, str | None]:
    """The request to send (a new session gets its id) and its routing key."""
    if isinstance(request, SESSION_REQUESTS):
        if not request.session_id and isinstance(request, NEW_SESSION_REQUESTS):
            sent: Any = type(request)()
            sent.CopyFrom(request)
            sent.session_id = new_session_id()
            request = sent
        return request, request.session_id or None
    given = next((str(value) for name, value in metadata if name == SESSION_KEY), None)
    if given:
        return request, given
    if isinstance(request, COMPLETION_REQUESTS):
        return request, conversation_key(request)
    return request, None


class Answered:
    """The keyed calls of one HTTP request, newest last."""

    def __init__(self) -> None:
        self.calls: list[grpc.aio.Call] = []

    async def replica(self) -> str | None:
        """The name the replica of the newest call gave, if it has come."""
        if not self.calls:
            return None
        call = self.calls[-1]
        # A finished call has it in its trailers; a stream in its headers.
        metadata = await (call.trailing_metadata() if call.done() else call.initial_metadata())
        for name, value in metadata or ():
            if name == REPLICA_KEY:
                return str(value)
        return None


# The calls of the HTTP request being served (set by ReplicaHeader).
ANSWERED: ContextVar[Answered | None] = ContextVar("answered", default=None)


def route(details: grpc.aio.ClientCallDetails, request: Any) -> tuple[Any, Any, bool]:
    """A call's details with its routing key, its request (a new session's
    with its id), and whether it has a key."""
    metadata = tuple(details.metadata or ())
    request, key = keyed(request, metadata)
    if key is None:
        return details, request, False
    others = tuple((name, value) for name, value in metadata if name != SESSION_KEY)
    details = grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*others, (SESSION_KEY, metadata_value(key))),
        details.credentials,
        details.wait_for_ready,
    )
    return details, request, True


def note_call(call: grpc.aio.Call) -> None:
    """Remember a keyed call for the answer's ``X-Core-Replica``."""
    answered = ANSWERED.get()
    if answered is not None:
        answered.calls.append(call)


async def routed_call(continuation: Any, details: Any, request: Any) -> Any:
    """Make the call with its routing key, remembering it when it has one."""
    details, request, routed = route(details, request)
    call = await continuation(details, request)
    if routed:
        note_call(call)
    return call


class UnaryAffinity(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await routed_call(continuation, details, request)


class StreamAffinity(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await routed_call(continuation, details, request)


def session_affinity() -> list[grpc.aio.ClientInterceptor]:
    """The interceptors that give each call its routing key (a grpc.aio
    channel takes one kind of call from each interceptor)."""
    return [UnaryAffinity(), StreamAffinity()]


class ReplicaHeader:
    """ASGI middleware: ``X-Core-Replica`` on every answer a replica gave."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered = Answered()
        token = ANSWERED.set(answered)

        async def send_with_replica(message: Message) -> None:
            if message["type"] == "http.response.start":
                name = await answered.replica()
                if name:
                    headers = [*message.get("headers", []), (REPLICA_HEADER, name.encode())]
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_replica)
        finally:
            ANSWERED.reset(token)


def session_header(headers: Mapping[str, str]) -> str | None:
    """The ``X-Session-Id`` a client sent, if any."""
    return headers.get("x-session-id") or None
