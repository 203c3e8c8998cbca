"""``python -m rest_gateway``: run the REST gateway alone (the core runs apart)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from .app import create_app
from .settings import GatewaySettings


class DrainingServer(uvicorn.Server):
    """uvicorn, except that a SIGTERM or SIGINT after which every request
    finished in the grace period ends the process with status 0.

    uvicorn itself raises the signal again once it has shut down, so that the
    process ends "killed by SIGTERM" even after an orderly drain.
    """

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()  # uvicorn==0.54.0: the signals to raise again


def main(argv: list[str] | None = None) -> None:
    settings = GatewaySettings(
        _cli_parse_args=sys.argv[1:] if argv is None else argv,
        _cli_prog_name="python -m rest_gateway",
    )
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
    DrainingServer(config).run()


if __name__ == "__main__":
    main()
