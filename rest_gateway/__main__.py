"""``python -m rest_gateway``: run the REST gateway alone (the core runs apart)."""

from __future__ import annotations

import sys

import uvicorn

from .app import create_app
from .settings import GatewaySettings


def main(argv: list[str] | None = None) -> None:
    settings = GatewaySettings(
        _cli_parse_args=sys.argv[1:] if argv is None else argv,
        _cli_prog_name="python -m rest_gateway",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )


if __name__ == "__main__":
    main()
