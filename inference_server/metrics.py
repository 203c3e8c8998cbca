"""The core's Prometheus metrics, named and bucketed as vLLM's.

The names are vLLM's with our prefix (``vllm:time_to_first_token_seconds``
is ``llamachat:time_to_first_token_seconds`` here), with the same buckets, so
dashboards and alerts written for vLLM need only the prefix changed. Each
engine has its own registry (no process-wide state); the gateway fetches its
text through the ``GetMetrics`` RPC and serves it with its own at ``/metrics``.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .domain import FinishReason
from .scheduler import Generation

PREFIX = "llamachat:"

# vLLM's buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class EngineMetrics:
    """What the engine measures, in a registry of its own.

    ``model_name`` labels every series, as vLLM's do. The running and waiting
    gauges read the scheduler when scraped (``track_load``); the sessions
    gauge is set by the engine just before a scrape.
    """

    def __init__(self, model_name: str, *, restarts: int = 0) -> None:
        self.registry = CollectorRegistry()
        self._model = model_name
        labels = ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)
            return metric.labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            metric = Counter(PREFIX + name, doc, labels, registry=self.registry)
            return metric.labels(model_name)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds",
            "Time between two successive generated tokens of a request.",
            INTER_TOKEN_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.request_queue_time = histogram(
            "request_queue_time_seconds",
            "Time a request waited for a free slot.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("generation_tokens_total", "Tokens generated.")
        self.prefix_cache_queries = counter(
            "prefix_cache_queries_total",
            "Prompt tokens looked up in the KV cache (every prompt token).",
        )
        self.prefix_cache_hits = counter(
            "prefix_cache_hits_total",
            "Prompt tokens found in the KV cache and not evaluated again (KV-cache reuse).",
        )
        self._finished = Counter(
            PREFIX + "request_success_total",
            "Requests finished, by why they ended (stop, length, abort).",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._running = Gauge(
            PREFIX + "num_requests_running",
            "Requests generating in a slot now.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self._waiting = Gauge(
            PREFIX + "num_requests_waiting",
            "Requests waiting for a free slot.",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self._waiting_for_session = Gauge(
            PREFIX + "num_requests_waiting_session",
            "Requests waiting for their session's previous turn (they hold no slot "
            "and no place in the queue).",
            labels,
            registry=self.registry,
        ).labels(model_name)
        self._sessions = Gauge(
            PREFIX + "sessions", "Sessions kept.", labels, registry=self.registry
        ).labels(model_name)
        Gauge(
            PREFIX + "core_restarts",
            "Times llamachat-serve has restarted the core after it exited unexpectedly.",
            registry=self.registry,
        ).set(restarts)

    def track_load(
        self,
        running: Callable[[], int],
        waiting: Callable[[], int],
        waiting_for_session: Callable[[], int] = lambda: 0,
    ) -> None:
        """Read the running and waiting requests from these at each scrape."""
        self._running.set_function(running)
        self._waiting.set_function(waiting)
        self._waiting_for_session.set_function(waiting_for_session)

    def observe_finished(
        self, generation: Generation, prompt_tokens: int, latency_s: float
    ) -> None:
        """Count a request that ended (one cancelled too: ``abort``, as vLLM)."""
        cancelled = generation.finish_reason is FinishReason.CANCELLED
        reason = "abort" if cancelled else generation.finish_reason.value
        self._finished.labels(self._model, reason).inc()
        if generation.admitted:  # a prompt never evaluated is not counted (as vLLM)
            self.prompt_tokens.inc(prompt_tokens)
            self.prefix_cache_queries.inc(prompt_tokens)
            self.prefix_cache_hits.inc(generation.cached_tokens)
        self.generation_tokens.inc(generation.completion_tokens)
        self.request_queue_time.observe(generation.queue_time_s)
        self.e2e_request_latency.observe(latency_s)

    def exposition(self, sessions: int) -> str:
        """Every metric in the Prometheus text format."""
        self._sessions.set(sessions)
        return generate_latest(self.registry).decode("utf-8")
