"""Python clients of the LLaMA Chat service: REST (``LLMChatClient``) and gRPC
(``GrpcChatClient``), each holding one long-lived connection."""

from .errors import BadRequestError, ChatAPIError, ServiceUnavailableError, SessionNotFoundError
from .grpc_client import GrpcChatClient
from .rest_client import LLMChatClient

__all__ = [
    "BadRequestError",
    "ChatAPIError",
    "GrpcChatClient",
    "LLMChatClient",
    "ServiceUnavailableError",
    "SessionNotFoundError",
]
