"""Starting and stopping: api_service.py, a gateway that outlives its core,
and the README's grpcurl commands against the running core."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from inference_server.model_files import default_model_path
from tests.e2e.conftest import ROOT, Service, service_env, start, stop, wait_healthy
from tests.helpers import free_port

README_ADDRESS = "127.0.0.1:50051"


def readme_grpcurl_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    return [line for block in blocks for line in block.splitlines() if line.startswith("grpcurl ")]


def test_readme_grpcurl_commands_work_as_printed(service: Service):
    commands = readme_grpcurl_commands()
    assert len(commands) >= 10
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    outputs = {}
    for command in commands:
        done = subprocess.run(
            shlex.split(command.replace(README_ADDRESS, service.grpc_address)),
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        outputs[command.split()[-1]] = done.stdout
    listed = outputs["list"].split()
    assert {"llamachat.v1.ChatService", "grpc.health.v1.Health"} <= set(listed)
    assert "rpc ChatStream" in outputs["llamachat.v1.ChatService"]
    method = outputs["llamachat.v1.ChatService.ChatStream"]
    assert "is a method" in method and "rpc ChatStream" in method and "Chat" in method
    assert json.loads(outputs["grpc.health.v1.Health/Check"]) == {"status": "SERVING"}
    chat = json.loads(outputs["llamachat.v1.ChatService/Chat"])
    assert chat["session_id"] == "demo" and chat["text"] and chat["usage"]["completion_tokens"] > 0
    stream = [
        json.loads(m)
        for m in re.split(r"(?<=})\n(?={)", outputs["llamachat.v1.ChatService/ChatStream"].strip())
    ]
    assert len(stream) > 2 and stream[-1]["finish_reason"] in (
        "FINISH_REASON_STOP",
        "FINISH_REASON_LENGTH",
    )
    assert "demo" in json.loads(outputs["llamachat.v1.ChatService/ListSessions"])["session_ids"]
    assert json.loads(outputs["llamachat.v1.ChatService/Clear"]) == {"session_id": "demo"}
    completed = json.loads(outputs["llamachat.v1.ChatService/Complete"])
    assert completed["text"] and completed["usage"]["completion_tokens"] > 0
    assert "session_id" not in completed
    model = json.loads(outputs["llamachat.v1.ChatService/GetModel"])
    assert model["loaded"] is True and model["id"] == default_model_path().name.removesuffix(
        ".gguf"
    )


def test_gateway_answers_503_while_the_core_is_down_and_recovers_by_itself(tmp_path):
    env = service_env(free_port(), free_port(), tmp_path)
    url = f"http://127.0.0.1:{env['PORT']}"
    gateway = start(["-m", "rest_gateway"], env, tmp_path / "gateway.log")
    core = None
    try:
        wait_healthy(url, [gateway], expected_status=503)
        down = httpx.post(f"{url}/chat", json={"message": "Hi"})
        assert down.status_code == 503 and down.json()["detail"]
        # The core finds its model through MODEL_PATH here.
        env["MODEL_PATH"] = str(default_model_path())
        core = start(["-m", "inference_server"], env, tmp_path / "core.log")
        wait_healthy(url, [gateway, core])
        up = httpx.post(f"{url}/chat", json={"message": "Hi", "max_tokens": 3}, timeout=30)
        assert up.status_code == 200
    finally:
        stop(gateway)
        if core is not None:
            assert stop(core) == 0


def test_api_service_starts_both_and_stops_both_on_ctrl_c(tmp_path):
    env = service_env(free_port(), free_port(), tmp_path)
    url = f"http://127.0.0.1:{env['PORT']}"
    model = str(default_model_path())
    service = start(["api_service.py", model], env, tmp_path / "api_service.log")
    try:
        wait_healthy(url, [service])
        reply = httpx.post(f"{url}/chat", json={"message": "Hello!", "max_tokens": 5}, timeout=30)
        assert reply.status_code == 200 and reply.json()["response"]
    finally:
        code = stop(service, signal.SIGINT)
    assert code == 0, (tmp_path / "api_service.log").read_text()
    for port in (env["PORT"], env["GRPC_ADDRESS"].rsplit(":", 1)[1]):
        probe = subprocess.run(
            ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True
        )
        assert probe.returncode != 0, f"port {port} still open"


def run_core(tmp_path: Path, *args: str, **settings: str) -> subprocess.CompletedProcess[str]:
    """``python -m inference_server ARGS`` to its end, its session store in
    ``tmp_path``, with ``settings`` as environment variables."""
    return subprocess.run(
        [sys.executable, "-m", "inference_server", *args],
        cwd=ROOT,
        env={**service_env(free_port(), free_port(), tmp_path), **settings},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_core_refuses_a_model_file_that_does_not_exist(tmp_path):
    done = run_core(tmp_path, str(tmp_path / "missing.gguf"))
    assert done.returncode == 2
    assert "Model file not found" in done.stderr


def test_a_corrupt_session_store_stops_the_core_with_one_line_and_status_2(tmp_path):
    (tmp_path / "sessions.db").write_bytes(b"not a database" * 100)
    done = run_core(tmp_path)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "sessions.db: file is not a database" in errors[0], done.stderr


def test_settings_the_core_refuses_stop_it_with_one_line_and_status_2(tmp_path):
    done = run_core(tmp_path, N_SLOTS="8", N_BATCH="4", CPU_REPACK="sometimes")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "invalid settings" in line and "cpu_repack" in line
