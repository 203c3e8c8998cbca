"""llamachat-serve (api_service.py) keeps the service up by itself, on real
processes: a core killed mid-stream comes back with every session; the
children never outlive it; a crash loop ends in one clear line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.e2e.conftest import ROOT, service_env, start, stop, wait_healthy
from tests.helpers import free_port

GREEDY = {"temperature": 0.0}
RECOVERY_TIMEOUT_S = 90.0


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is ``pid``, with their command lines."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # The parent's pid is the second field after the command's closing ")".
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def port_open(port: int) -> bool:
    probe = subprocess.run(
        ["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"], capture_output=True
    )
    return probe.returncode == 0


def pid_of(service: subprocess.Popen[bytes], module: str) -> int:
    (pid,) = [pid for pid, command in children(service.pid).items() if f"-m {module}" in command]
    return pid


@contextmanager
def serving(tmp_path: Path, log_name: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    env = service_env(free_port(), free_port(), tmp_path)
    env["RESTART_BACKOFF_S"] = "0.2"
    service = start(["api_service.py"], env, tmp_path / log_name)
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_healthy(url, [service])
        yield service, url
    finally:
        code = stop(service, signal.SIGINT)
        assert code == 0, (tmp_path / log_name).read_text()


def test_a_core_killed_mid_stream_comes_back_by_itself_with_every_session(tmp_path):
    with serving(tmp_path, "serve.log") as (service, url):
        first = httpx.post(
            f"{url}/chat",
            json={"message": "My name is Ada.", "max_tokens": 8, **GREEDY},
            timeout=60,
        ).json()
        session = first["session_id"]
        core = pid_of(service, "inference_server")
        body = {"message": "Tell me a long story.", "session_id": session, "max_tokens": 400}
        with httpx.stream("POST", f"{url}/chat/stream", json=body, timeout=60) as reply:
            lines = (line for line in reply.iter_lines() if line.startswith("data: "))
            assert "token" in json.loads(next(lines)[6:])
            os.kill(core, signal.SIGKILL)
            rest = [json.loads(line[6:]) for line in lines]
        assert "error" in rest[-1] and not any(event.get("done") for event in rest)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 503
        wait_healthy(url, [service], timeout=RECOVERY_TIMEOUT_S)  # no restart by hand
        assert pid_of(service, "inference_server") != core
        history = httpx.get(f"{url}/sessions/{session}", timeout=10).json()["exchanges"]
        assert history == [{"user": "My name is Ada.", "assistant": first["response"]}]
        follow_up = httpx.post(
            f"{url}/chat",
            json={"message": "What is my name?", "session_id": session, "max_tokens": 8},
            timeout=60,
        )
        assert follow_up.status_code == 200
        exchanges = httpx.get(f"{url}/sessions/{session}", timeout=10).json()["exchanges"]
        assert [e["user"] for e in exchanges] == ["My name is Ada.", "What is my name?"]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert "llamachat:core_restarts 1.0" in metrics
    log = (tmp_path / "serve.log").read_text()
    assert "the core killed by SIGKILL; restarting it" in log


def test_kill_9_of_the_supervisor_leaves_no_child_and_the_ports_free(tmp_path):
    env = service_env(free_port(), free_port(), tmp_path)
    url = f"http://127.0.0.1:{env['PORT']}"
    service = start(["api_service.py"], env, tmp_path / "first.log")
    try:
        wait_healthy(url, [service])
        orphans = list(children(service.pid))
        assert len(orphans) == 2
    finally:
        service.kill()
        service.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in orphans) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in orphans), "children outlived their supervisor"
    assert not port_open(int(env["PORT"]))
    again = start(["api_service.py"], env, tmp_path / "second.log")
    try:
        wait_healthy(url, [again])  # the same ports bind again
    finally:
        assert stop(again, signal.SIGINT) == 0


def test_a_core_that_crashes_at_every_start_is_given_up_on_in_one_line(tmp_path):
    # A core that aborts as it starts (SIGABRT), every time; the gateway is untouched.
    crash = tmp_path / "crash"
    crash.mkdir()
    (crash / "sitecustomize.py").write_text(
        "import os, sys\nif 'inference_server' in sys.orig_argv: os.abort()\n"
    )
    env = service_env(free_port(), free_port(), tmp_path)
    env.update(
        PYTHONPATH=str(crash),
        RESTART_BACKOFF_S="0.1",
        RESTART_MAX_CRASHES="3",
        LOG_FORMAT="text",
    )
    done = subprocess.run(
        [sys.executable, "api_service.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    gave_up = [line for line in done.stderr.splitlines() if "gives up" in line]
    assert len(gave_up) == 1, done.stderr
    assert "the core crashed 3 times in 60 s (last: killed by SIGABRT)" in gave_up[0]
    assert not port_open(int(env["PORT"]))  # the gateway was stopped too
