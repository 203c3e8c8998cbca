"""``python -m rest_gateway``: run the REST gateway alone (the core runs apart)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from llamachat_process.cli import program_name, settings_or_exit
from llamachat_process.logs import configure_logging
from llamachat_process.parent import watch_parent
from llamachat_process.tenants import KeyFileError

from .app import create_app
from .connections import server_config
from .settings import GatewaySettings

# Once the supervisor is gone: the drain's grace, then this much, then exit.
PARENT_GONE_EXTRA_S = 5.0


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
    settings = settings_or_exit(
        lambda: GatewaySettings(
            _cli_parse_args=sys.argv[1:] if argv is None else argv,
            _cli_prog_name=program_name(__package__ or "rest_gateway"),
        )
    )
    configure_logging(settings.log_level, settings.log_format)
    watch_parent(settings.shutdown_grace_s + PARENT_GONE_EXTRA_S)
    try:
        app = create_app(settings)
    except KeyFileError as error:
        logging.getLogger("rest_gateway").error("%s", error)
        sys.exit(2)
    config = server_config(app, settings)
    DrainingServer(config).run()


if __name__ == "__main__":
    main()
