"""A Prometheus scrape of the running service after real requests, parsed
with prometheus_client's parser: the gateway's request counts and the core's
latencies, tokens, KV-cache reuse, load and sessions."""

from __future__ import annotations

import grpc
import httpx
from prometheus_client.parser import text_string_to_metric_families

from inference_server.model_files import default_model_path
from llamachat.v1 import chat_pb2, chat_pb2_grpc
from tests.e2e.conftest import Service

MODEL = (("model_name", default_model_path().name.removesuffix(".gguf")),)


def scrape(service: Service) -> dict[tuple[str, tuple], float]:
    reply = httpx.get(f"{service.url}/metrics", timeout=10)
    assert reply.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def core(found: dict, name: str, **labels: str) -> float:
    return found.get((f"llamachat:{name}", tuple(sorted({**dict(MODEL), **labels}.items()))), 0.0)


def http_requests(found: dict, method: str, endpoint: str, status: str) -> float:
    labels = (("endpoint", endpoint), ("method", method), ("status", status))
    return found.get(("llamachat:http_requests_total", labels), 0.0)


def test_a_scrape_after_real_requests_counts_them(service: Service):
    before = scrape(service)
    with grpc.insecure_channel(service.grpc_address) as channel:
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        first = stub.Chat(
            chat_pb2.ChatRequest(message="Hi!", session_id="metrics", max_tokens=8, temperature=0),
            timeout=60,
        )
        second = stub.Chat(
            chat_pb2.ChatRequest(
                message="And again?", session_id="metrics", max_tokens=8, temperature=0
            ),
            timeout=60,
        )
    streamed = httpx.post(
        f"{service.url}/chat/stream",
        json={"message": "Count to five", "max_tokens": 12, "temperature": 0},
    )
    refused = httpx.post(f"{service.url}/chat", json={"message": "Hi", "temperature": 9})
    assert streamed.status_code == 200 and refused.status_code == 400
    after = scrape(service)

    def grew(name: str, **labels: str) -> float:
        return core(after, name, **labels) - core(before, name, **labels)

    # Three generations: two gRPC turns, one stream (the 400 never reached the model).
    assert grew("e2e_request_latency_seconds_count") == 3
    assert grew("request_queue_time_seconds_count") == 3
    assert grew("time_to_first_token_seconds_count") == 3
    assert grew("inter_token_latency_seconds_count") >= 2
    assert grew("time_to_first_token_seconds_sum") > 0
    prompt = first.usage.prompt_tokens + second.usage.prompt_tokens
    generated = first.usage.completion_tokens + second.usage.completion_tokens
    assert grew("prompt_tokens_total") > prompt
    assert grew("generation_tokens_total") > generated
    # KV-cache reuse: the second turn found the first one's tokens.
    assert second.usage.cached_prompt_tokens > 0
    assert grew("prefix_cache_hits_total") >= second.usage.cached_prompt_tokens
    assert grew("prefix_cache_queries_total") == grew("prompt_tokens_total")
    finished = sum(
        grew("request_success_total", finished_reason=reason) for reason in ("stop", "length")
    )
    assert finished == 3
    # The load gauges are present (nothing runs between two requests).
    assert core(after, "num_requests_running") == 0
    assert core(after, "num_requests_waiting") == 0
    sessions = httpx.get(f"{service.url}/sessions").json()["count"]
    assert core(after, "sessions") == sessions
    # The gateway's own counts, by route template and status.
    assert (
        http_requests(after, "POST", "/chat/stream", "200")
        - http_requests(before, "POST", "/chat/stream", "200")
        == 1
    )
    assert (
        http_requests(after, "POST", "/chat", "400") - http_requests(before, "POST", "/chat", "400")
        == 1
    )
    assert after[("llamachat:core_up", ())] == 1
