"""``python -m inference_server [model_path]``: run the gRPC inference core alone."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from llamachat_process.cli import program_name, settings_or_exit
from llamachat_process.logs import configure_logging
from llamachat_process.parent import watch_parent
from llamachat_process.tenants import KeyFileError

from .assembly import build_engine
from .engine import LlamaEngine
from .errors import ModelLoadError, SessionStoreError
from .llama_runtime import LlamaRuntime
from .model_files import resolve_model_path
from .server import AddressInUse, CoreServer, TlsFiles, create_server
from .settings import ServerSettings

log = logging.getLogger("inference_server")
# Once the supervisor is gone: the drain's grace, then this much, then exit.
PARENT_GONE_EXTRA_S = 5.0
# Once the engine failed: time for health watchers to hear NOT_SERVING.
FAILED_GRACE_S = 1.0


def parse_settings(argv: list[str]) -> ServerSettings:
    """Settings from the environment and the command line; a first argument that
    is not a flag is the model path, as in ``api_service.py [model_path]``."""
    if argv and not argv[0].startswith("-"):
        argv = ["--model-path", argv[0], *argv[1:]]
    prog = program_name(__package__ or "inference_server")
    return ServerSettings(_cli_parse_args=argv, _cli_prog_name=prog)


async def follow_health(core: CoreServer, engine: LlamaEngine) -> None:
    """Keep the standard health service saying whether a chat can succeed."""
    while True:
        changed = engine.health_changed()
        reason = engine.unavailable_reason()
        await core.set_serving(reason is None)
        if reason is not None:
            log.warning("not serving: %s", reason)
        await changed


async def serve(settings: ServerSettings, runtime_class: type[LlamaRuntime] = LlamaRuntime) -> int:
    """Start serving at once (health NOT_SERVING), load the model, then SERVING
    until SIGINT or SIGTERM; then drain streams in flight and free the model.

    Returns the exit status: 0 after a signal; 1 when the engine failed (its
    scheduler died), so that whatever runs the core (``llamachat-serve``,
    systemd, Kubernetes) starts it again."""
    model_path = resolve_model_path(settings.model_path)
    keys = settings.key_ring()
    engine = build_engine(settings, model_path, runtime_class)
    core = await create_server(
        settings.grpc_address,
        engine,
        max_message_bytes=settings.max_message_bytes,
        keys=keys,
        rate_limit_per_minute=settings.rate_limit_rpm,
        max_concurrent_rpcs=settings.max_concurrent_rpcs,
        tls=(
            TlsFiles(settings.grpc_tls_cert, settings.grpc_tls_key)
            if settings.grpc_tls_cert and settings.grpc_tls_key
            else None
        ),
        replica_name=settings.replica_name,
        max_connection_age_s=settings.max_connection_age_s,
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
    health: asyncio.Task[None] | None = None
    status = 0
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # raises ModelLoadError if the model failed to load
            assert engine.failed is not None  # set by load()
            health = asyncio.create_task(follow_health(core, engine))
            log.info("model loaded; serving")
            engine.failed.add_done_callback(lambda _: stop.set())
            await stopping
            if engine.failed.done():
                log.error("%s; exiting with status 1 to be restarted", engine.failed.result())
                status = 1
        log.info("shutting down")
        if health is not None:
            health.cancel()
        await core.set_serving(False)
    finally:
        # After a failure, in-flight calls have their errors already.
        await core.server.stop(FAILED_GRACE_S if status else settings.shutdown_grace_s)
        stopping.cancel()
        # A load still running finishes first, so that its model is freed too.
        await asyncio.gather(loading, return_exceptions=True)
        await engine.aclose()
    return status


def main(argv: list[str] | None = None) -> None:
    settings = settings_or_exit(lambda: parse_settings(sys.argv[1:] if argv is None else argv))
    configure_logging(settings.log_level, settings.log_format)
    watch_parent(settings.shutdown_grace_s + PARENT_GONE_EXTRA_S)
    try:
        status = asyncio.run(serve(settings))
    except (
        FileNotFoundError,
        ModelLoadError,
        AddressInUse,
        SessionStoreError,
        KeyFileError,
    ) as error:
        log.error("%s", error)
        sys.exit(2)
    sys.exit(status)


if __name__ == "__main__":
    main()
