"""The Node.js client (``clients/node/chat.js``) against the running service,
run as a user runs it: ``node clients/node/chat.js ...`` in a subprocess.

Its packages come from ``cd clients/node && npm ci`` (``make test`` does it)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import ROOT, Service
from tests.helpers import free_port

CHAT_JS = ROOT / "clients" / "node" / "chat.js"
TIMEOUT_S = 120


@pytest.fixture(scope="module", autouse=True)
def _node_packages_installed() -> None:
    if not (ROOT / "clients" / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail("the Node client's packages are missing: run `cd clients/node && npm ci`")


def run_node_client(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["node", str(CHAT_JS), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def rest_session(service: Service, session_id: str) -> dict[str, Any]:
    reply = httpx.get(f"{service.url}/sessions/{session_id}", timeout=30)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_json_output_is_one_object_per_stream_message_and_equals_greedy_rest(service: Service):
    message = "Name three animals."
    done = run_node_client(
        "--address", service.grpc_address, "--json", "--temperature", "0", "--max-tokens", "24",
        message,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    *pieces, last = [json.loads(line) for line in done.stdout.splitlines()]

    assert len(pieces) > 1  # the reply streamed as several messages
    for piece in pieces:
        assert piece["text"]
        assert piece["finish_reason"] == "FINISH_REASON_UNSPECIFIED"
        assert piece["session_id"] == "" and piece["usage"] is None
    assert last["text"] == ""
    assert last["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert 0 < last["usage"]["completion_tokens"] <= 24
    streamed = "".join(piece["text"] for piece in pieces)

    # Greedy decoding is deterministic: a fresh REST session gives the same reply.
    rest = httpx.post(
        f"{service.url}/chat",
        json={"message": message, "temperature": 0, "max_tokens": 24},
        timeout=TIMEOUT_S,
    )
    assert rest.status_code == 200, rest.text
    assert rest.json()["response"] == streamed
    assert rest.json()["tokens_used"] == last["usage"]["completion_tokens"]
    assert rest.json()["session_id"] != last["session_id"]
    assert rest_session(service, last["session_id"])["exchanges"] == [
        {"user": message, "assistant": streamed}
    ]


def test_plain_output_streams_text_and_session_continues(service: Service):
    # No --address: the client takes GRPC_ADDRESS from the environment.
    first = run_node_client("--max-tokens", "12", "Hello!", env=service.env)
    assert first.returncode == 0, first.stderr
    summary = dict(field.split("=", 1) for field in first.stderr.split())
    session = summary["session_id"]
    assert summary["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert 0 < int(summary["completion_tokens"]) <= 12

    again = run_node_client(
        "--session", session, "--max-tokens", "8", "--temperature", "0", "Tell", "me", "more.",
        env=service.env,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"session_id={session} " in again.stderr

    exchanges = rest_session(service, session)["exchanges"]
    assert [exchange["user"] for exchange in exchanges] == ["Hello!", "Tell me more."]
    # stdout is the reply's text, then one newline.
    assert [exchange["assistant"] + "\n" for exchange in exchanges] == [first.stdout, again.stdout]


def test_empty_message_is_invalid_argument(service: Service):
    done = run_node_client("--address", service.grpc_address, "")
    assert done.returncode == 1
    assert "INVALID_ARGUMENT" in done.stderr
    assert done.stdout == ""


def test_nothing_listening_is_unavailable():
    done = run_node_client("--address", f"127.0.0.1:{free_port()}", "Hello!")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr


def test_bad_command_line_is_exit_status_2():
    done = run_node_client("--max-tokens", "many", "Hello!")
    assert done.returncode == 2
    assert "--max-tokens" in done.stderr


def test_ctrl_c_cancels_the_call_and_stops_generation(service: Service):
    session = "node-ctrl-c"
    client = subprocess.Popen(
        ["node", str(CHAT_JS), "--address", service.grpc_address, "--json",
         "--session", session, "--max-tokens", "400", "Write a long poem."],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None
        for _ in range(3):  # three pieces arrived: generation is under way
            assert json.loads(client.stdout.readline())["text"]
        client.send_signal(signal.SIGINT)
        _, stderr = client.communicate(timeout=TIMEOUT_S)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 130, stderr
    assert "cancelled" in stderr

    deadline = time.monotonic() + 30
    while not (logs := service.generation_logs(session)) and time.monotonic() < deadline:
        time.sleep(0.1)
    (log_line,) = logs
    assert "finish=cancelled" in log_line
    produced = re.search(r"\bcompletion_tokens=(\d+)", log_line)
    assert produced and int(produced[1]) < 400, log_line
    # A cancelled generation leaves no half exchange behind.
    assert httpx.get(f"{service.url}/sessions/{session}", timeout=30).status_code == 404
