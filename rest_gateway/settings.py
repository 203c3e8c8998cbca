"""Settings of the REST gateway: one object, built once in ``main()``.

Every field is an environment variable (its name in upper case) and a
command-line flag (``--field-name``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from llamachat_process.logs import LogFormat
from llamachat_process.tenants import KeySettings

from .core_channel import LbPolicy, parse_address


class GatewaySettings(KeySettings):
    """Configuration of the REST gateway."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", cli_kebab_case=True
    )

    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(default=8002, ge=0, le=65535, description="HTTP port.")
    grpc_address: str = Field(
        default="127.0.0.1:50051",
        description="Address of the gRPC inference core: HOST:PORT, or unix:PATH; or of "
        "many replicas of it: HOST:PORT,HOST:PORT,... (host names resolved once, at "
        "start) or dns:///NAME:PORT (a name that resolves to every replica, resolved "
        "again as replicas come and go). Many replicas: each session stays on one.",
    )
    grpc_lb_policy: LbPolicy = Field(
        default="ring_hash",
        description="How calls are spread over many replicas: ring_hash keeps each "
        "session on one replica (where its KV cache is); round_robin spreads every call "
        "over the replicas in turn, so a session's turns rebuild their KV cache wherever "
        "they land (to measure what affinity is worth: make bench-cluster).",
    )
    grpc_keepalive_s: float = Field(
        default=2.0,
        ge=1.0,
        description="Seconds between keepalive pings to each core (the core allows one a "
        "second at most).",
    )
    grpc_keepalive_timeout_s: float = Field(
        default=3.0,
        gt=0,
        description="Seconds a core may take to answer a keepalive ping; past it its "
        "connection is closed, calls on it fail over (UNAVAILABLE is retried) and a "
        "session's next turns go to another replica.",
    )
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="Host header values served, comma-separated, any port; '*' serves every "
        "host. Default: localhost, 127.0.0.1, [::1] and HOST (400 for any other host, "
        "which stops DNS rebinding).",
    )
    grpc_tls_ca: Path | None = Field(
        default=None,
        description="PEM certificate(s) to trust for a core that speaks TLS "
        "(its GRPC_TLS_CERT when self-signed); unset: plaintext.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default=["*"],
        description="Origins allowed by CORS, comma-separated; '*' allows every "
        "origin (without credentials).",
    )
    model_aliases: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="More names of the served model, comma-separated, that /v1/models lists.",
    )
    strict_model_names: bool = Field(
        default=False,
        description="Refuse /v1 requests whose model is not the served model's id or an "
        "alias (404). Default: any name is served by the one model, as llama.cpp's server "
        "does, so clients that send their own default name work unmodified.",
    )
    grpc_deadline_s: float = Field(
        default=600.0,
        gt=0,
        description="Deadline of each call to the core, in seconds (504 past it).",
    )
    health_timeout_s: float = Field(
        default=2.0, gt=0, description="Deadline of the health check of the core."
    )
    grpc_max_receive_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest reply accepted from the core, in bytes; keep it above the "
        "core's MAX_SESSION_BYTES.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a connection may take to send a request's headers (also when "
        "idle before its first request); past it the connection is closed.",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a request may take to send its body; past it the connection is "
        "closed.",
    )
    keep_alive_s: int = Field(
        default=5, ge=1, description="Seconds an idle keep-alive connection stays open."
    )
    max_connections: int = Field(
        default=1000,
        ge=1,
        description="Connections served at once; past it a request gets 503 and its "
        "connection is closed.",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        description="Largest request body accepted, in bytes (413 past it). Keep it at "
        "or below the core's MAX_MESSAGE_BYTES.",
    )
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="Seconds open requests get to finish on shutdown."
    )
    supervisor_restarts: int = Field(
        default=0,
        ge=0,
        description="Set by llamachat-serve: how often it has restarted this process "
        "(shown in /metrics).",
    )
    log_level: str = Field(default="info", description="Logging level.")
    log_format: LogFormat = Field(
        default="text",
        description="Log lines as text, or as JSON objects (json) for log collectors.",
    )

    @field_validator("grpc_address")
    @classmethod
    def readable_address(cls, value: str) -> str:
        parse_address(value)  # raises AddressError, a ValueError, with the reason
        return value

    @field_validator("cors_origins", "allowed_hosts", "model_aliases", mode="before")
    @classmethod
    def split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value
