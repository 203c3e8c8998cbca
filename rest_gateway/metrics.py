"""``GET /metrics``: the gateway's request metrics and the core's, in the
Prometheus text format.

The core's metrics (latencies, tokens, KV-cache reuse, running and waiting
requests, sessions: see ``inference_server/metrics.py``) come from its
``GetMetrics`` RPC at each scrape. ``llamachat:core_up`` says whether that
call worked; when it did not, the gateway's own metrics are still served.
With many replicas, each one is asked, and each of its series (``core_up``
too) has a ``replica`` label: the name the replica gives itself.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from .replicas import labelled

PREFIX = "llamachat:"
# The classic text format, which every Prometheus version scrapes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HTTP_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

router = APIRouter()


class GatewayMetrics:
    """The gateway's metrics, in a registry of its own (one per app)."""

    def __init__(self, *, restarts: int = 0, replicated: bool = False) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            PREFIX + "http_requests_total",
            "HTTP requests answered, by method, endpoint (route template) and status.",
            ["method", "endpoint", "status"],
            registry=self.registry,
        )
        self._duration = Histogram(
            PREFIX + "http_request_duration_seconds",
            "Time from an HTTP request's arrival to the end of its response.",
            ["method", "endpoint"],
            buckets=HTTP_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._core_up = Gauge(
            PREFIX + "core_up",
            "1 if the inference core answered the last metrics scrape, else 0.",
            ["replica"] if replicated else [],
            registry=self.registry,
        )
        Gauge(
            PREFIX + "gateway_restarts",
            "Times llamachat-serve has restarted the gateway after it exited unexpectedly.",
            registry=self.registry,
        ).set(restarts)

    def observe_request(
        self, method: str, endpoint: str, status: int | str, duration_s: float
    ) -> None:
        self._requests.labels(method, endpoint, str(status)).inc()
        self._duration.labels(method, endpoint).observe(duration_s)

    def exposition(self, core_text: str | None) -> str:
        """Our metrics, then the core's (``None``: it did not answer)."""
        self._core_up.set(0 if core_text is None else 1)
        own = generate_latest(self.registry).decode("utf-8")
        return own + (core_text or "")

    def replicas_exposition(self, core_texts: list[tuple[str, str | None]]) -> str:
        """Our metrics, then those of every replica (name, text or ``None``)."""
        self._core_up.clear()
        for name, text in core_texts:
            self._core_up.labels(name).set(0 if text is None else 1)
        own = generate_latest(self.registry).decode("utf-8")
        return own + labelled([(name, text) for name, text in core_texts if text is not None])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of the gateway and of the core."""
    state = request.app.state
    scraped = await state.replicas.metrics(state.settings.health_timeout_s)
    if state.replicas.balanced:
        text = state.metrics.replicas_exposition([(r.name, text) for r, text in scraped])
    else:
        text = state.metrics.exposition(scraped[0][1])
    return Response(text, media_type=CONTENT_TYPE)
