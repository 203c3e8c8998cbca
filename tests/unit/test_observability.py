"""Gateway /metrics (its own and the core's, parsed as Prometheus would) and
the one structured log line per request, against the fake engine."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from llamachat_process.logs import configure_logging
from rest_gateway.metrics import GatewayMetrics
from rest_gateway.observe import RequestObserver, note
from tests.unit.conftest import gateway_for


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def scrape(http) -> dict[tuple[str, tuple], float]:
    reply = await http.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    return samples(reply.text)


async def test_metrics_count_requests_by_endpoint_and_status_and_include_the_core(http):
    await http.post("/chat", json={"message": "Hi"})
    await http.post("/chat", json={"message": " "})
    await http.get("/sessions/nobody")
    found = await scrape(http)

    def requests(endpoint: str, status: str) -> float:
        labels = (("endpoint", endpoint), ("method", "POST" if "chat" in endpoint else "GET"))
        return found.get(("llamachat:http_requests_total", (*labels, ("status", status))), 0)

    assert requests("/chat", "200") == 1
    assert requests("/chat", "400") == 1
    # The route's template, not the path, so ids do not make new series.
    assert requests("/sessions/{session_id}", "404") == 1
    assert found[("llamachat:core_up", ())] == 1
    model = (("model_name", "fake-model"),)
    assert found[("llamachat:sessions", model)] == 1
    assert ("llamachat:num_requests_running", model) in found


async def test_metrics_without_the_core_still_serve_the_gateways(core):
    async with gateway_for(grpc_address="127.0.0.1:1") as http:
        found = await scrape(http)
    assert found[("llamachat:core_up", ())] == 0
    assert not any(name.startswith("llamachat:time_to") for name, _ in found)


async def test_metrics_need_no_api_key(core):
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}", api_key="k") as http:
        found = await scrape(http)
    assert found[("llamachat:core_up", ())] == 1


def request_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rest_gateway.requests"]


def fields(record: logging.LogRecord, *names: str) -> tuple[Any, ...]:
    """The record's ``extra`` fields, which ``LogRecord``'s type does not declare."""
    return tuple(getattr(record, name) for name in names)


async def test_one_log_line_per_request_with_session_tokens_and_time(http, caplog):
    caplog.set_level(logging.INFO, logger="rest_gateway.requests")
    chat = (await http.post("/chat", json={"message": "Hi", "session_id": "s1"})).json()
    stream = await http.post("/chat/stream", json={"message": "Hey", "session_id": "s2"})
    assert stream.status_code == 200
    await http.post("/chat", json={"message": ""})
    first, second, third = request_lines(caplog)
    assert fields(first, "method", "path", "status", "session") == ("POST", "/chat", 200, "s1")
    assert fields(first, "completion_tokens", "prompt_tokens") == (chat["tokens_used"], 2)
    ttft_s, duration_s = fields(first, "ttft_s", "duration_s")
    assert ttft_s is None and duration_s >= 0
    assert "session=s1" in first.getMessage() and "status=200" in first.getMessage()
    assert fields(second, "path", "status", "session") == ("/chat/stream", 200, "s2")
    tokens, ttft_s, duration_s = fields(second, "completion_tokens", "ttft_s", "duration_s")
    assert tokens == 4 and 0 <= ttft_s <= duration_s
    assert fields(third, "status", "session", "completion_tokens") == (400, None, None)


def test_json_log_format_puts_the_fields_in_the_object(capsys):
    try:
        configure_logging("INFO", "json")
        logging.getLogger("rest_gateway.requests").info(
            "request status=200", extra={"status": 200, "session": "s1", "ttft_s": 0.25}
        )
        line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    finally:
        configure_logging("WARNING", "text")
    assert line["message"] == "request status=200"
    assert (line["status"], line["session"], line["ttft_s"]) == (200, "s1", 0.25)
    assert (line["level"], line["logger"]) == ("INFO", "rest_gateway.requests")
    assert "time" in line


def stream_app(*, delivered: bool):
    """An app whose stream stops before its last body message (its client left),
    after its last event was (or was not) sent."""

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        if delivered:
            note(Request(scope), delivered=True)

    return app


@pytest.mark.parametrize(("delivered", "status"), [(False, 499), (True, 200)])
async def test_a_stream_cut_short_is_499_unless_its_last_event_was_sent(caplog, delivered, status):
    caplog.set_level(logging.INFO, logger="rest_gateway.requests")
    metrics = GatewayMetrics()
    observer = RequestObserver(stream_app(delivered=delivered), metrics)
    scope = {"type": "http", "method": "POST", "path": "/chat/stream", "headers": []}

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    await observer(scope, receive, send)
    (line,) = request_lines(caplog)
    assert fields(line, "status") == (status,)
    found = samples(metrics.exposition(None))
    labels = (("endpoint", "unmatched"), ("method", "POST"), ("status", str(status)))
    assert found[("llamachat:http_requests_total", labels)] == 1


async def test_a_stream_that_fails_after_its_200_began_is_counted_500(caplog):
    caplog.set_level(logging.INFO, logger="rest_gateway.requests")

    async def failing(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
        raise RuntimeError("broken")

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    observer = RequestObserver(failing, GatewayMetrics())
    scope = {"type": "http", "method": "POST", "path": "/chat/stream", "headers": []}
    with pytest.raises(RuntimeError):
        await observer(scope, receive, send)
    (line,) = request_lines(caplog)
    assert fields(line, "status") == (500,)
