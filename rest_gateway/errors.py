"""The one table from gRPC status codes to HTTP statuses, the two error
shapes, and the handlers that answer every error in the shape of its API.

The documented API answers ``{"detail": "..."}``; the OpenAI-compatible
endpoints under ``/v1/`` answer OpenAI's ``{"error": {"message", "type",
"param", "code"}}``, which OpenAI's SDKs read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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


OPENAI_PREFIX = "/v1/"
# Ollama's API answers errors as {"error": "..."}.
OLLAMA_PREFIX = "/api/"

# OpenAI's error types by HTTP status.
OPENAI_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable",
    504: "timeout",
}


def openai_error(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """An error body in OpenAI's shape."""
    kind = OPENAI_ERROR_TYPES.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    headers: Mapping[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """An error answer in the shape of the API that ``path`` belongs to."""
    if path.startswith(OPENAI_PREFIX):
        content = openai_error(status, message, param=param, code=code)
    elif path.startswith(OLLAMA_PREFIX):
        content = {"error": message}
    else:
        content = {"detail": message}
    return AsciiJSONResponse(status_code=status, content=content, headers=headers)


class AsciiJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped, so that an error which
    quotes the request (a lone surrogate included) can always be sent."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def detail_of(error: grpc.aio.AioRpcError) -> str:
    """What the core said went wrong, for the ``detail`` (or SSE ``error``) field."""
    return error.details() or error.code().name


# Seconds a client told 429 (every slot busy, the queue full) should wait.
RETRY_AFTER_S = 1


def retry_after_of(error: grpc.aio.AioRpcError) -> str:
    """The core's ``retry-after`` (a tenant past its rate limit), else 1 s."""
    for key, value in error.trailing_metadata() or ():
        if key == "retry-after" and str(value).isdigit():
            return str(value)
    return str(RETRY_AFTER_S)


# The core names the option it was given; an OpenAI client sent response_format.
OPENAI_PARAM_OF_OPTION = {"json_schema": "response_format", "json_object": "response_format"}


def error_fields(error: grpc.aio.AioRpcError) -> tuple[str | None, str | None]:
    """The field at fault and the error code the core gave (its trailing
    ``error-param`` and ``error-code``), for OpenAI's ``param`` and ``code``."""
    found = {key: str(value) for key, value in error.trailing_metadata() or ()}
    param = found.get("error-param")
    return OPENAI_PARAM_OF_OPTION.get(param or "", param), found.get("error-code")


async def handle_rpc_error(request: Request, error: Exception) -> JSONResponse:
    """FastAPI exception handler: a failed call to the core (with ``Retry-After``
    on a 429, and OpenAI's ``param`` and ``code`` under ``/v1/``)."""
    assert isinstance(error, grpc.aio.AioRpcError)
    status = http_status_for(error.code())
    headers = {"Retry-After": retry_after_of(error)} if status == 429 else None
    param, code = error_fields(error)
    return error_response(
        request.url.path, status, detail_of(error), headers=headers, param=param, code=code
    )


def documented_errors(model: type, descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route for OpenAPI: each status, its body model
    and what it means."""
    return {code: {"model": model, "description": text} for code, text in descriptions.items()}


class ApiError(Exception):
    """An error the gateway itself finds in a request (not the core): its
    status, message and, for OpenAI's shape, the parameter and code (for
    example a string that cannot go into a gRPC message, not valid UTF-8)."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code


async def handle_api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ApiError)
    return error_response(
        request.url.path, error.status, str(error), param=error.param, code=error.code
    )


async def handle_http_exception(request: Request, error: Exception) -> Response:
    """Starlette's own errors (404 no such route, 405, 413 from the body limit)."""
    assert isinstance(error, StarletteHTTPException)
    if error.status_code < 400:
        return Response(status_code=error.status_code, headers=error.headers)
    return error_response(
        request.url.path, error.status_code, str(error.detail), headers=error.headers
    )


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
    """Wrong types or malformed JSON: 422 with ``{"detail": "..."}`` like every
    other error; under ``/v1/`` a 400, as OpenAI answers a bad parameter."""
    assert isinstance(error, RequestValidationError)
    message = describe_validation_errors(error.errors())
    if request.url.path.startswith((OPENAI_PREFIX, OLLAMA_PREFIX)):
        first = error.errors()[0]["loc"] if error.errors() else ()
        param = ".".join(str(part) for part in first if part != "body") or None
        return error_response(request.url.path, 400, message, param=param)
    return error_response(request.url.path, 422, message)


async def handle_client_disconnected(request: Request, error: Exception) -> Response:
    """Nobody reads this answer: the client left before it (499, as nginx logs it)."""
    return Response(status_code=499)
