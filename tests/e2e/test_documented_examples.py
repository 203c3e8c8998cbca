"""Every Python and curl example of the API documentation, run unchanged but
for the base URL against the real processes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.e2e.conftest import Service

EXAMPLES = Path(__file__).parent / "documented_examples"
DOCUMENTED_URL = "http://localhost:8002"
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def run_example(name: str, service: Service) -> str:
    source = (EXAMPLES / name).read_text()
    assert DOCUMENTED_URL in source
    source = source.replace(DOCUMENTED_URL, service.url)
    command = [sys.executable, "-c", source] if name.endswith(".py") else ["bash", "-c", source]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_chat_example(service):
    output = run_example("chat.py", service)
    match = re.fullmatch(rf"Response: (.+)\nSession ID: ({UUID})\n", output, re.DOTALL)
    assert match, output
    assert match.group(1).strip()


def sessions(service: Service) -> set[str]:
    return set(httpx.get(f"{service.url}/sessions").json()["sessions"])


def test_chat_with_session_example(service):
    before = sessions(service)
    output = run_example("chat_with_session.py", service)
    assert output.strip()
    (new_session,) = sessions(service) - before  # both messages went to one session
    assert len(service.generation_logs(new_session)) == 2


def test_stream_example(service):
    output = run_example("chat_stream.py", service)
    story, marker = output.rsplit("\n", 2)[0], output.rsplit("\n", 2)[1]
    assert marker == "[Stream complete]"
    assert story.strip()


def test_llm_chat_client_example(service):
    before = sessions(service)
    output = run_example("llm_chat_client.py", service)
    assert len(output.strip().splitlines()) >= 2  # two replies printed
    assert sessions(service) == before  # clear() removed the session it made


def test_curl_examples(service):
    outputs = [json.loads(line) for line in run_example("curl_examples.sh", service).splitlines()]
    chat, clear, quantum, haiku = outputs
    assert chat["response"] and re.fullmatch(UUID, chat["session_id"])
    assert isinstance(chat["tokens_used"], int) and chat["tokens_used"] > 0
    assert clear == {"detail": "Session not found"}  # "your-session-id" does not exist
    assert quantum["response"]
    assert 0 < haiku["tokens_used"] <= 100
