"""Tools of the replica tests (``test_replicas.py``) to make faults happen at
a chosen moment, and to tell what a fault cost:

- ``HoldingProxy``: a TCP proxy in front of one core that, once told to hold,
  passes the client's bytes on to the core but none of the core's back. A
  turn sent then is generated and committed by the core, and its reply never
  reaches the client: killing the core after the commit is "a replica that
  committed and died before replying", with no hook in the core.
- ``Load``: clients that each send turns in a loop (one session per turn, the
  same request id again after a refusal, until it is answered), and log every
  status and every acknowledged exchange; ``lost()`` checks that log against
  what the store keeps.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass

# Between two tries of a turn that was refused (the store or the replicas down).
RETRY_PAUSE_S = 0.05
WAIT_TIMEOUT_S = 60.0


class HoldingProxy:
    """A TCP proxy on a free port of 127.0.0.1 to a core's port. ``hold()``
    stops passing what the core sends (it is dropped); what the client sends
    still goes through. A connection ends on both sides when either ends."""

    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._holding = threading.Event()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self) -> None:
        self._holding.set()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            core = socket.create_connection(("127.0.0.1", self._upstream_port))
            self._sockets += [client, core]
            threading.Thread(target=self._pump, args=(client, core, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(core, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_core: bool) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                if not (from_core and self._holding.is_set()):
                    target.sendall(data)
        for end in (source, target):
            with suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._listener.close()
        for end in self._sockets:
            end.close()

    def __enter__(self) -> HoldingProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class Acknowledged:
    """An exchange the service answered as kept (200 / OK)."""

    session: str
    message: str
    reply: str


# One try of a turn: (session, request id, message) -> (HTTP status, reply).
Turn = Callable[[str, str, str], tuple[int, str]]
# What the store keeps of a session: its (user, assistant) pairs, [] if none.
Kept = Callable[[str], list[tuple[str, str]]]


class Load:
    """``clients`` threads, each sending turns through ``turns[i % len(turns)]``
    until ``stop()``: a new session per turn (so that no window trims what is
    checked), tried again with the same request id after any refusal until it
    is answered, as a client that must not lose or repeat a turn does."""

    def __init__(self, turns: list[Turn], clients: int, prefix: str) -> None:
        self.statuses: list[int] = []
        """Every answer's status, in the order they came."""
        self.acknowledged: list[Acknowledged] = []
        self._changed = threading.Condition()
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._client, args=(turns[index % len(turns)], f"{prefix}-{index}")
            )
            for index in range(clients)
        ]
        for thread in self._threads:
            thread.start()

    def _client(self, turn: Turn, name: str) -> None:
        number = 0
        while not self._stopping.is_set():
            number += 1
            session, request_id = f"{name}-{number}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
            message = f"Say the number {number}."
            while not self._stopping.is_set():
                status, reply = turn(session, request_id, message)
                with self._changed:
                    self.statuses.append(status)
                    if status == 200:
                        self.acknowledged.append(Acknowledged(session, message, reply))
                    self._changed.notify_all()
                if status == 200:
                    break
                time.sleep(RETRY_PAUSE_S)

    def wait_until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait until ``condition()`` holds (checked as each answer comes)."""
        with self._changed:
            assert self._changed.wait_for(condition, WAIT_TIMEOUT_S), f"never: {what}"

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join()

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def lost(acknowledged: list[Acknowledged], kept: Kept) -> list[Acknowledged]:
    """The acknowledged exchanges the store does not keep."""
    return [
        exchange
        for exchange in acknowledged
        if (exchange.message, exchange.reply) not in kept(exchange.session)
    ]


def sse_events(lines: Iterator[str]) -> Iterator[dict[str, object]]:
    """The JSON payloads of a Server-Sent Events stream's ``data:`` lines."""
    for line in lines:
        if line.startswith("data: "):
            yield json.loads(line.removeprefix("data: "))
