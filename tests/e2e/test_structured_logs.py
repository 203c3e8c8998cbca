"""Structured logs of the running processes: with LOG_FORMAT=json each line is
a JSON object, and each request ends in one line with its session, status,
tokens, time to first token and duration; LOG_LEVEL silences them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.e2e.conftest import service_env, start_both, stop
from tests.helpers import free_port


def json_lines(log: Path) -> list[dict]:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # every line is JSON, or this fails


def run_requests(env: dict[str, str], logs: Path) -> tuple[dict, tuple[int, int]]:
    running = start_both(env, logs)
    try:
        chat = httpx.post(
            f"{running.url}/chat",
            json={"message": "Hi", "session_id": "logged", "max_tokens": 6},
            timeout=60,
        ).json()
        streamed = httpx.post(
            f"{running.url}/chat/stream",
            json={"message": "Hello", "session_id": "logged-stream", "max_tokens": 6},
            timeout=60,
        )
        bad = httpx.post(f"{running.url}/chat", json={"message": ""}, timeout=60)
        assert streamed.status_code == 200 and bad.status_code == 400
    finally:
        codes = (stop(running.gateway), stop(running.core))
    return chat, codes


def test_json_logs_have_one_line_per_request_with_its_fields(tmp_path):
    env = {**service_env(free_port(), free_port(), tmp_path), "LOG_FORMAT": "json"}
    chat, codes = run_requests(env, tmp_path)
    assert codes == (0, 0)
    gateway = json_lines(tmp_path / "gateway.log")
    requests = [line for line in gateway if line["logger"] == "rest_gateway.requests"]
    by_path = {(line["method"], line["path"], line["status"]): line for line in requests}
    plain = by_path[("POST", "/chat", 200)]
    assert plain["session"] == "logged"
    assert plain["completion_tokens"] == chat["tokens_used"] and plain["prompt_tokens"] > 0
    assert plain["ttft_s"] is None and plain["duration_s"] > 0
    stream = by_path[("POST", "/chat/stream", 200)]
    assert stream["session"] == "logged-stream" and stream["completion_tokens"] > 0
    assert 0 < stream["ttft_s"] <= stream["duration_s"]
    refused = by_path[("POST", "/chat", 400)]
    assert refused["session"] is None and refused["completion_tokens"] is None
    # The core: one line per generation, with the same counts.
    core = json_lines(tmp_path / "core.log")
    generations = {line["session"]: line for line in core if "finish" in line}
    turn = generations["logged"]
    assert turn["completion_tokens"] == chat["tokens_used"]
    assert turn["prompt_tokens"] == plain["prompt_tokens"]
    assert 0 < turn["ttft_s"] <= turn["duration_s"] and turn["queue_s"] >= 0
    assert {line["level"] for line in core} <= {"INFO", "WARNING"}


def test_log_level_warning_leaves_out_the_request_lines(tmp_path):
    env = {**service_env(free_port(), free_port(), tmp_path), "LOG_LEVEL": "WARNING"}
    _, codes = run_requests(env, tmp_path)
    assert codes == (0, 0)
    for log in ("gateway.log", "core.log"):
        text = (tmp_path / log).read_text()
        assert "status=200" not in text and "completion_tokens=" not in text, text
