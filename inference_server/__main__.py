"""``python -m inference_server [model_path]``: run the gRPC inference core alone."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from llamachat_process.cli import program_name
from llamachat_process.logs import configure_logging

from .assembly import build_engine
from .errors import ModelLoadError, SessionStoreError
from .model_files import resolve_model_path
from .server import AddressInUse, TlsFiles, create_server
from .settings import ServerSettings

log = logging.getLogger("inference_server")


def parse_settings(argv: list[str]) -> ServerSettings:
    """Settings from the environment and the command line; a first argument that
    is not a flag is the model path, as in ``api_service.py [model_path]``."""
    if argv and not argv[0].startswith("-"):
        argv = ["--model-path", argv[0], *argv[1:]]
    return ServerSettings(_cli_parse_args=argv, _cli_prog_name=program_name("inference_server"))


async def serve(settings: ServerSettings) -> None:
    """Start serving at once (health NOT_SERVING), load the model, then SERVING
    until SIGINT or SIGTERM; then drain streams in flight and free the model."""
    model_path = resolve_model_path(settings.model_path)
    engine = build_engine(settings, model_path)
    core = await create_server(
        settings.grpc_address,
        engine,
        max_message_bytes=settings.max_message_bytes,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        tls=(
            TlsFiles(settings.grpc_tls_cert, settings.grpc_tls_key)
            if settings.grpc_tls_cert and settings.grpc_tls_key
            else None
        ),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await core.server.start()
    log.info(
        "gRPC server on %s (port %d); loading %s", settings.grpc_address, core.port, model_path
    )
    loading = asyncio.ensure_future(engine.load())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # raises ModelLoadError if the model failed to load
            await core.set_serving(True)
            log.info("model loaded; serving")
            await stopping
        log.info("shutting down")
        await core.set_serving(False)
    finally:
        await core.server.stop(settings.shutdown_grace_s)
        stopping.cancel()
        # A load still running finishes first, so that its model is freed too.
        await asyncio.gather(loading, return_exceptions=True)
        await engine.aclose()


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(sys.argv[1:] if argv is None else argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (FileNotFoundError, ModelLoadError, AddressInUse, SessionStoreError) as error:
        log.error("%s", error)
        sys.exit(2)


if __name__ == "__main__":
    main()
