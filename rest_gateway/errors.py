"""The one table from gRPC status codes to HTTP statuses, and its handler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

# After google/rpc/code.proto.
HTTP_STATUS_FOR_GRPC: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def http_status_for(code: grpc.StatusCode) -> int:
    """The HTTP status of a gRPC status code; anything unlisted is a 500."""
    return HTTP_STATUS_FOR_GRPC.get(code, 500)


def detail_of(error: grpc.aio.AioRpcError) -> str:
    """What the core said went wrong, for the ``detail`` (or SSE ``error``) field."""
    return error.details() or error.code().name


# Seconds a client told 429 (every slot busy, the queue full) should wait.
RETRY_AFTER_S = 1


async def handle_rpc_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI exception handler: a failed call to the core as ``{"detail": ...}``
    (with ``Retry-After`` on a 429)."""
    assert isinstance(error, grpc.aio.AioRpcError)
    status = http_status_for(error.code())
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    return JSONResponse(status_code=status, content={"detail": detail_of(error)}, headers=headers)


class BadRequestForCore(ValueError):
    """The request could not be put into a gRPC message (for example a string
    that is not valid UTF-8)."""


async def handle_bad_request(request: Request, error: Exception) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": str(error)})


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """One readable line from pydantic's errors: where, and what is wrong."""
    parts = []
    for error in errors:
        if error["type"] == "json_invalid":
            reason = error.get("ctx", {}).get("error", "")
            parts.append(f"JSON decode error at character {error['loc'][-1]}: {reason}")
            continue
        where = ".".join(str(part) for part in error["loc"] if part != "body")
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    return "Invalid request body: " + "; ".join(parts)


async def handle_validation_error(request: Request, error: Exception) -> JSONResponse:
    """Wrong types or malformed JSON: 422 with ``{"detail": "..."}`` like every other error."""
    assert isinstance(error, RequestValidationError)
    return JSONResponse(
        status_code=422, content={"detail": describe_validation_errors(error.errors())}
    )


async def handle_client_disconnected(request: Request, error: Exception) -> Response:
    """Nobody reads this answer: the client left before it (499, as nginx logs it)."""
    return Response(status_code=499)
