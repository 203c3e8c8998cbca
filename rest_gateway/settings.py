"""Settings of the REST gateway: one object, built once in ``main()``.

Every field is an environment variable (its name in upper case) and a
command-line flag (``--field-name``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from llamachat_process.logs import LogFormat


class GatewaySettings(BaseSettings):
    """Configuration of the REST gateway."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", cli_kebab_case=True
    )

    host: str = Field(default="127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(default=8002, ge=0, le=65535, description="HTTP port.")
    grpc_address: str = Field(
        default="127.0.0.1:50051",
        description="Address of the gRPC inference core: HOST:PORT, or unix:PATH.",
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="When set, every endpoint but /, /health, the docs, /ui and /metrics needs "
        "'Authorization: Bearer <API_KEY>' or 'X-API-Key: <API_KEY>' (401 otherwise); "
        "the gateway sends the same key to the core.",
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
    grpc_deadline_s: float = Field(
        default=600.0,
        gt=0,
        description="Deadline of each call to the core, in seconds (504 past it).",
    )
    health_timeout_s: float = Field(
        default=2.0, gt=0, description="Deadline of the health check of the core."
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

    @field_validator("cors_origins", mode="before")
    @classmethod
    def split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value
