"""What the benchmark talks to, all behind one method: ``turn``.

Each target answers one user turn of a session as a stream and reports when
each piece of text arrived. Our service keeps the history itself; for the
stateless ones (llama.cpp's server, llama-cpp-python's high-level call) the
target keeps it, with the same window of exchanges, so every target sees the
same prompts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc
import httpx

from llamachat.v1 import chat_pb2, chat_pb2_grpc

if TYPE_CHECKING:  # llama_cpp itself is imported only by the target that uses it
    from llama_cpp.llama_types import (
        ChatCompletionRequestMessage,
        CreateChatCompletionStreamResponse,
    )

HISTORY_EXCHANGES = 5


@dataclass
class Timing:
    """One streamed reply: when it was asked, and when each piece arrived."""

    start: float
    arrivals: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]

    @property
    def decode_rate(self) -> float:
        """Pieces per second after the first (the prompt is not in it)."""
        return (len(self.arrivals) - 1) / (self.arrivals[-1] - self.arrivals[0])


class Target:
    name: str

    def turn(self, session: str, message: str, max_tokens: int) -> Timing:
        raise NotImplementedError

    def close(self) -> None:
        pass


class OurRest(Target):
    """The documented REST/SSE API of the gateway."""

    name = "service, REST/SSE"

    def __init__(self, url: str) -> None:
        self._http = httpx.Client(base_url=url, timeout=600)

    def turn(self, session: str, message: str, max_tokens: int) -> Timing:
        body = {
            "message": message,
            "session_id": session,
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        timing = Timing(time.perf_counter())
        with self._http.stream("POST", "/chat/stream", json=body) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"])
                if event.get("token"):
                    timing.arrivals.append(time.perf_counter())
        return timing

    def close(self) -> None:
        self._http.close()


class OurGrpc(Target):
    """``ChatStream`` on the gRPC core."""

    name = "service, gRPC"

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = chat_pb2_grpc.ChatServiceStub(self._channel)

    def turn(self, session: str, message: str, max_tokens: int) -> Timing:
        request = chat_pb2.ChatStreamRequest(
            message=message, session_id=session, max_tokens=max_tokens, temperature=0.0
        )
        timing = Timing(time.perf_counter())
        for response in self._stub.ChatStream(request, timeout=600):
            if response.text:
                timing.arrivals.append(time.perf_counter())
        return timing

    def close(self) -> None:
        self._channel.close()


class _ClientHistory(Target):
    """Keeps each session's last exchanges, as our service does."""

    def __init__(self) -> None:
        self._history: dict[str, list[dict[str, str]]] = {}

    def _messages(self, session: str, message: str) -> list[dict[str, str]]:
        kept = self._history.get(session, [])[-2 * HISTORY_EXCHANGES :]
        return [*kept, {"role": "user", "content": message}]

    def _remember(self, session: str, message: str, reply: str) -> None:
        self._history.setdefault(session, []).extend(
            [{"role": "user", "content": message}, {"role": "assistant", "content": reply}]
        )


class LlamaServer(_ClientHistory):
    """llama.cpp's own server, through its OpenAI-compatible streaming endpoint."""

    name = "llama.cpp server"

    def __init__(self, url: str) -> None:
        super().__init__()
        # It closes a connection after a stream; a new one per request (localhost).
        self._http = httpx.Client(base_url=url, timeout=600, headers={"Connection": "close"})

    def turn(self, session: str, message: str, max_tokens: int) -> Timing:
        body = {
            "messages": self._messages(session, message),
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "stream": True,
            "cache_prompt": True,
        }
        timing = Timing(time.perf_counter())
        pieces = []
        with self._http.stream("POST", "/v1/chat/completions", json=body) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:]).get("choices") or [{}]
                if text := choices[0].get("delta", {}).get("content"):
                    timing.arrivals.append(time.perf_counter())
                    pieces.append(text)
        self._remember(session, message, "".join(pieces))
        return timing

    def close(self) -> None:
        self._http.close()


class HighLevelLlama(_ClientHistory):
    """llama-cpp-python's high-level ``Llama.create_chat_completion``, in process."""

    name = "llama-cpp-python, high-level"

    def __init__(self, model: Path, *, threads: int, n_ctx: int) -> None:
        super().__init__()
        from llama_cpp import Llama

        from .repack import high_level_model_params, use_extra_buffer_types

        with high_level_model_params(extra=use_extra_buffer_types()):
            self._llm = Llama(
                model_path=str(model),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_batch=512,
                n_gpu_layers=-1,  # as the service: every layer on a GPU when built for one
                verbose=False,
            )

    def turn(self, session: str, message: str, max_tokens: int) -> Timing:
        timing = Timing(time.perf_counter())
        pieces = []
        # Role/content dicts: the shape of llama_cpp's message TypedDicts.
        messages = cast("list[ChatCompletionRequestMessage]", self._messages(session, message))
        chunks = self._llm.create_chat_completion(
            messages, max_tokens=max_tokens, temperature=0.0, stream=True
        )
        # Its return type is not overloaded on ``stream``: with True, the chunks.
        for chunk in cast("Iterator[CreateChatCompletionStreamResponse]", chunks):
            text = chunk["choices"][0]["delta"].get("content")
            if isinstance(text, str) and text:  # an empty delta has no content
                timing.arrivals.append(time.perf_counter())
                pieces.append(text)
        self._remember(session, message, "".join(pieces))
        return timing

    def close(self) -> None:
        self._llm.close()
