"""Helpers shared by the test tiers."""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settle(future: Future[T]) -> Callable[[T | BaseException], None]:
    """A scheduler job's ``on_done`` that resolves ``future`` with its outcome or error."""

    def on_done(outcome: T | BaseException) -> None:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    return on_done
