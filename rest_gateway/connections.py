"""Connection limits of the HTTP server: no client may hold a connection
open by sending nothing, or by sending slowly.

uvicorn times out only idle keep-alive connections, and only until a byte
arrives, so a client that sends its headers (or its body) a byte at a time,
or nothing at all, would hold its connection forever. ``GuardedH11Protocol``
adds two deadlines: the request's headers must be complete within
``HEADER_TIMEOUT_S`` of the connection's start (or of the last response),
and its body within ``BODY_TIMEOUT_S`` of the headers; past either the
connection is closed. ``MAX_CONNECTIONS`` (uvicorn's ``limit_concurrency``)
caps connections served at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import GatewaySettings

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with header and body deadlines."""

    header_timeout_s = 10.0
    body_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_for: Any = None

    def _expect(self, state: Any, timeout_s: float) -> None:
        """Close the connection unless the client leaves ``state`` within ``timeout_s``."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._waiting_for = state
        self._deadline = self.loop.call_later(timeout_s, self._too_slow)

    def _settle_deadline(self) -> None:
        state = self.conn.their_state
        if state == self._waiting_for:
            return
        if state is h11.SEND_BODY:
            self._expect(h11.SEND_BODY, self.body_timeout_s)
        elif self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
            self._waiting_for = None

    def _too_slow(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            phase = "headers" if self._waiting_for is h11.IDLE else "body"
            log.info("closing a connection whose request %s came too slowly", phase)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect(h11.IDLE, self.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._settle_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.conn.their_state is h11.IDLE:  # waiting for the next request
            self._expect(h11.IDLE, self.header_timeout_s)
        else:  # a pipelined request already under way
            self._settle_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)


def guarded_protocol(settings: GatewaySettings) -> type[GuardedH11Protocol]:
    """The protocol class with the deadlines of ``settings``."""
    return type(
        "GuardedH11Protocol",
        (GuardedH11Protocol,),
        {"header_timeout_s": settings.header_timeout_s, "body_timeout_s": settings.body_timeout_s},
    )


def server_config(app: Any, settings: GatewaySettings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration of the gateway: address, connection limits, logs."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": guarded_protocol(settings),
        "timeout_keep_alive": settings.keep_alive_s,
        "limit_concurrency": settings.max_connections,
        # uvicorn's loggers go to the root handler; its access log is replaced
        # by the one line per request of rest_gateway.observe.
        "log_config": None,
        "access_log": False,
        "log_level": settings.log_level.lower(),
        "timeout_graceful_shutdown": int(settings.shutdown_grace_s),
    }
    return uvicorn.Config(app, **{**options, **overrides})
