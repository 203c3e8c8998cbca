"""``GrpcChatClient``: the chat service over gRPC, on one channel."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from llamachat.v1 import chat_pb2, chat_pb2_grpc

from .errors import from_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


class GrpcChatClient:
    """A conversation over gRPC; remembers its session id between calls."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        session_id: str | None = None,
        timeout: float | None = 600.0,
    ) -> None:
        self.session_id = session_id
        self._timeout = timeout
        self._channel = grpc.insecure_channel(address)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)

    def __enter__(self) -> GrpcChatClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _fields(self, message: str, sampling: dict[str, Any]) -> dict[str, Any]:
        fields = {k: v for k, v in sampling.items() if v is not None}
        return {"message": message, "session_id": self.session_id or "", **fields}

    def chat(self, message: str, **sampling: Any) -> chat_pb2.ChatResponse:
        """Send a message; the whole reply (``.text``, ``.usage``, ...)."""
        try:
            reply = self._stub.Chat(
                chat_pb2.ChatRequest(**self._fields(message, sampling)), timeout=self._timeout
            )
        except grpc.RpcError as error:
            raise from_grpc(error) from None
        self.session_id = reply.session_id
        return reply

    def stream(self, message: str, **sampling: Any) -> Iterator[str]:
        """Send a message and yield the reply's pieces as they are generated.
        Leaving the loop early cancels the call (and generation on the server)."""
        call = self._stub.ChatStream(
            chat_pb2.ChatStreamRequest(**self._fields(message, sampling)), timeout=self._timeout
        )
        try:
            for piece in call:
                if piece.session_id:
                    self.session_id = piece.session_id
                elif piece.text:
                    yield piece.text
        except grpc.RpcError as error:
            raise from_grpc(error) from None
        finally:
            call.cancel()

    def clear(self) -> None:
        """Forget this conversation on the server and start a new one."""
        if self.session_id:
            try:
                self._stub.Clear(
                    chat_pb2.ClearRequest(session_id=self.session_id), timeout=self._timeout
                )
            except grpc.RpcError as error:
                raise from_grpc(error) from None
            self.session_id = None

    def sessions(self) -> list[str]:
        """Ids of all the caller's sessions on the server, page after page."""
        ids: list[str] = []
        cursor = ""
        while True:
            try:
                reply = self._stub.ListSessions(
                    chat_pb2.ListSessionsRequest(cursor=cursor), timeout=self._timeout
                )
            except grpc.RpcError as error:
                raise from_grpc(error) from None
            ids += reply.session_ids
            if not reply.next_cursor:
                return ids
            cursor = reply.next_cursor
