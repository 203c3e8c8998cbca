"""The clients' exceptions, built in one place from an HTTP status or a gRPC code."""

from __future__ import annotations

import grpc


class ChatAPIError(Exception):
    """The service refused or failed a request."""

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


class BadRequestError(ChatAPIError):
    """The request was invalid (HTTP 400/422, INVALID_ARGUMENT)."""


class SessionNotFoundError(ChatAPIError):
    """The session does not exist (HTTP 404, NOT_FOUND)."""


class ServiceUnavailableError(ChatAPIError):
    """The model is not loaded or the core is unreachable (HTTP 503, UNAVAILABLE)."""


_BY_HTTP_STATUS: dict[int, type[ChatAPIError]] = {
    400: BadRequestError,
    422: BadRequestError,
    404: SessionNotFoundError,
    503: ServiceUnavailableError,
}

_BY_GRPC_CODE: dict[grpc.StatusCode, type[ChatAPIError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: BadRequestError,
    grpc.StatusCode.NOT_FOUND: SessionNotFoundError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
}


def from_http(status: int, detail: object) -> ChatAPIError:
    return _BY_HTTP_STATUS.get(status, ChatAPIError)(str(detail), status)


def from_grpc(error: grpc.RpcError) -> ChatAPIError:
    code = error.code()
    return _BY_GRPC_CODE.get(code, ChatAPIError)(error.details() or code.name)
