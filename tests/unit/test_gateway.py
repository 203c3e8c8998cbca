"""The REST gateway over real HTTP, in front of a real gRPC server with the fake engine."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from rest_gateway.settings import GatewaySettings
from tests.bad_inputs import (
    BAD_REST_BODIES,
    JSON_HEADERS,
    MALFORMED_REST_BODIES,
    bad_chat_inputs,
    json_body,
)
from tests.fake_engine import FAKE_N_CTX
from tests.helpers import free_port
from tests.unit.conftest import gateway_for


def sse_events(body: str) -> list[dict]:
    return [
        json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")
    ]


async def test_info(http):
    reply = await http.get("/")
    assert reply.status_code == 200
    assert reply.json() == {
        "service": "LLaMA Chat API",
        "version": "1.0.0",
        "docs": "/docs",
        "health": "/health",
    }


async def test_health_is_200_when_the_model_is_loaded_and_503_while_loading(http, core, engine):
    reply = await http.get("/health")
    assert (reply.status_code, reply.json()) == (200, {"status": "healthy", "model_loaded": True})
    engine.ready = False
    await core.set_serving(False)
    reply = await http.get("/health")
    assert (reply.status_code, reply.json()) == (
        503,
        {"status": "unavailable", "model_loaded": False, "detail": "Model not loaded"},
    )


async def test_health_says_why_a_loaded_core_does_not_serve(http, core, engine):
    """A loaded model whose core cannot serve (its session store cannot be
    written, say) is a 503 that says so, with model_loaded true."""
    engine.unavailable_reason = "Session store unavailable: database or disk is full"
    await core.set_serving(False)
    reply = await http.get("/health")
    assert (reply.status_code, reply.json()) == (
        503,
        {
            "status": "unavailable",
            "model_loaded": True,
            "detail": "Session store unavailable: database or disk is full",
        },
    )


async def test_core_unreachable_gives_503_on_health_and_chat():
    async with gateway_for(grpc_address=f"127.0.0.1:{free_port()}") as http:
        reply = await http.get("/health")
        assert (reply.status_code, reply.json()["model_loaded"]) == (503, False)
        assert reply.json()["detail"] == "The inference core is unreachable: UNAVAILABLE"
        reply = await http.post("/chat", json={"message": "Hi"})
        assert reply.status_code == 503
        assert reply.json()["detail"]


async def test_chat_has_exactly_the_documented_shape(http):
    reply = await http.post("/chat", json={"message": "Hello, how are you?", "temperature": 0.7})
    assert reply.status_code == 200
    data = reply.json()
    assert set(data) == {"response", "session_id", "tokens_used"}
    assert data["response"] == "Hello, world!"
    assert data["tokens_used"] == 4


async def test_chat_with_a_session_continues_it(http, engine):
    first = (await http.post("/chat", json={"message": "My name is Alice"})).json()
    await http.post("/chat", json={"message": "What's my name?", "session_id": first["session_id"]})
    history = engine.store.history("default", first["session_id"])
    assert [e.user for e in history] == ["My name is Alice", "What's my name?"]
    sessions = (await http.get("/sessions")).json()
    assert sessions == {"sessions": [first["session_id"]], "count": 1}


async def test_sampling_fields_pass_through_and_unset_stays_unset(http, engine):
    await http.post("/chat", json={"message": "Hi", "temperature": 0, "max_tokens": 3, "seed": 7})
    sampling = engine.requests[-1].sampling
    assert (sampling.temperature, sampling.max_tokens, sampling.seed, sampling.top_p) == (
        0,
        3,
        7,
        None,
    )


async def test_stream_sends_token_events_then_done(http):
    reply = await http.post("/chat/stream", json={"message": "Tell me a short story"})
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = sse_events(reply.text)
    assert [e["token"] for e in events[:-1]] == ["Hello", ",", " world", "!"]
    done = events[-1]
    assert done["done"] is True and done["session_id"]
    assert done["tokens_used"] == 4 and done["finish_reason"] == "stop"


async def test_error_mid_stream_is_a_last_error_event(http, engine):
    engine.fail_after = 2
    reply = await http.post("/chat/stream", json={"message": "Hi"})
    assert reply.status_code == 200
    events = sse_events(reply.text)
    assert events == [
        {"token": "Hello"},
        {"token": ","},
        {"error": "Generation error: the model fell over"},
    ]


async def test_a_failed_generation_is_500_with_the_documented_detail(http, engine):
    engine.fail_after = 1
    reply = await http.post("/chat", json={"message": "Hi"})
    assert (reply.status_code, reply.json()) == (
        500,
        {"detail": "Generation error: the model fell over"},
    )


async def test_client_disconnect_mid_stream_cancels_generation(http, engine):
    engine.hang_after = 2
    async with http.stream("POST", "/chat/stream", json={"message": "Hi"}) as reply:
        lines = reply.aiter_lines()
        tokens: list[str] = []
        while len(tokens) < 2:
            line = await anext(lines)
            if line.startswith("data: "):
                tokens.append(json.loads(line[6:])["token"])
    # Leaving the block closed the connection mid-stream.
    await asyncio.wait_for(engine.cancelled.wait(), timeout=5)
    assert tokens == ["Hello", ","]
    assert engine.pieces_sent == 2


@pytest.mark.parametrize("path", ["/chat", "/chat/stream"])
async def test_client_leaving_before_the_first_token_cancels_generation(core, engine, path):
    engine.hang_after = 0  # the core holds the request before any text
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}") as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(path, json={"message": "Hi"}, timeout=0.5)
        await asyncio.wait_for(engine.cancelled.wait(), timeout=5)
    assert engine.pieces_sent == 0


async def test_a_call_past_the_deadline_is_504(core, engine):
    engine.hang_after = 0
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}", grpc_deadline_s=0.3) as http:
        reply = await http.post("/chat", json={"message": "Hi"})
    assert reply.status_code == 504
    assert reply.json()["detail"] == "Deadline Exceeded"


@pytest.mark.parametrize("path", ["/chat", "/chat/stream"])
@pytest.mark.parametrize(("fields", "detail"), bad_chat_inputs(FAKE_N_CTX))
async def test_bad_input_is_400_with_a_detail(http, path, fields, detail):
    reply = await http.post(path, content=json_body(fields), headers=JSON_HEADERS)
    assert reply.status_code == 400
    assert detail in reply.json()["detail"]


async def test_empty_message_is_exactly_the_documented_error(http):
    reply = await http.post("/chat", json={"message": ""})
    assert (reply.status_code, reply.json()) == (400, {"detail": "Message cannot be empty"})


@pytest.mark.parametrize("path", ["/chat", "/chat/stream"])
@pytest.mark.parametrize(("body", "detail"), MALFORMED_REST_BODIES)
async def test_malformed_body_is_422_saying_what_is_wrong(http, path, body, detail):
    reply = await http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 422
    assert isinstance(reply.json()["detail"], str)
    assert detail in reply.json()["detail"]


@pytest.mark.parametrize("path", ["/chat", "/chat/stream"])
@pytest.mark.parametrize(("body", "detail"), BAD_REST_BODIES)
async def test_json_that_parses_but_cannot_be_served_is_400(http, path, body, detail):
    reply = await http.post(path, content=body, headers=JSON_HEADERS)
    assert reply.status_code == 400
    assert detail in reply.json()["detail"]


async def test_clear_answers_cleared_then_404_for_an_unknown_session(http):
    session_id = (await http.post("/chat", json={"message": "Hi"})).json()["session_id"]
    reply = await http.post("/chat/clear", json={"session_id": session_id})
    assert (reply.status_code, reply.json()) == (
        200,
        {"status": "cleared", "session_id": session_id},
    )
    reply = await http.post("/chat/clear", json={"session_id": session_id})
    assert (reply.status_code, reply.json()) == (404, {"detail": "Session not found"})
    assert (await http.get("/sessions")).json() == {"sessions": [], "count": 0}


async def test_clear_without_a_session_id_is_422(http):
    reply = await http.post("/chat/clear", json={})
    assert reply.status_code == 422


async def test_cors_allows_every_origin_without_credentials(http):
    reply = await http.options(
        "/chat",
        headers={"Origin": "http://example.test", "Access-Control-Request-Method": "POST"},
    )
    assert reply.status_code == 200
    assert reply.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in reply.headers


async def test_cors_origins_narrows_the_allowed_origins(core, monkeypatch):
    monkeypatch.setenv("CORS_ORIGINS", "http://localhost:3000, http://app.test")
    assert GatewaySettings().cors_origins == ["http://localhost:3000", "http://app.test"]
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}") as http:
        allowed = await http.get("/", headers={"Origin": "http://app.test"})
        refused = await http.get("/", headers={"Origin": "http://evil.test"})
    assert allowed.headers["access-control-allow-origin"] == "http://app.test"
    assert "access-control-allow-origin" not in refused.headers


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
async def test_docs_pages_are_served(http, path):
    reply = await http.get(path)
    assert reply.status_code == 200
    assert "text/html" in reply.headers["content-type"]


async def test_openapi_lists_every_documented_endpoint(http):
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/", "/health", "/chat", "/chat/stream", "/chat/clear", "/sessions"} <= set(paths)


def test_settings_read_host_port_and_grpc_address_from_the_environment(monkeypatch):
    monkeypatch.setenv("HOST", "0.0.0.0")
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("GRPC_ADDRESS", "unix:///tmp/core.sock")
    settings = GatewaySettings()
    assert (settings.host, settings.port, settings.grpc_address) == (
        "0.0.0.0",
        9000,
        "unix:///tmp/core.sock",
    )


async def test_a_body_over_the_limit_is_413_whether_declared_or_streamed(core):
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}", max_body_bytes=1000) as http:
        body = json.dumps({"message": "x" * 2000}).encode()
        declared = await http.post(
            "/chat",
            content=body,
            headers={"Content-Type": "application/json", "Origin": "http://app.test"},
        )

        async def chunks():
            for start in range(0, len(body), 500):
                yield body[start : start + 500]

        streamed = await http.post(
            "/chat", content=chunks(), headers={"Content-Type": "application/json"}
        )
        within = await http.post("/chat", json={"message": "x" * 200})
    assert declared.status_code == 413
    assert declared.json() == {
        "detail": f"Request body too large: {len(body)} bytes, the limit is 1000"
    }
    assert declared.headers["access-control-allow-origin"] == "*"
    assert streamed.status_code == 413
    assert "the limit is 1000" in streamed.json()["detail"]
    assert within.status_code == 200


@pytest.mark.parametrize("path", ["/chat", "/chat/stream"])
async def test_an_overloaded_core_is_429_with_retry_after(http, engine, path):
    engine.overloaded = True
    reply = await http.post(path, json={"message": "Hi"})
    assert reply.status_code == 429
    assert reply.headers["retry-after"] == "1"
    assert reply.json() == {"detail": "Server busy: 36 requests are already running or waiting"}


async def test_the_chat_page_is_served_with_a_strict_content_security_policy(core):
    async with gateway_for(grpc_address=f"127.0.0.1:{core.port}", api_key="k") as http:
        page = await http.get("/ui")  # no key needed for the page itself
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
    assert "connect-src 'self'" in policy
    assert 'id="messages"' in page.text
