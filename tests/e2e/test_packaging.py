"""The package as pip installs it: a wheel built from the files of a fresh clone
(no generated stubs), installed into a new virtual environment, and its console
commands run from a directory outside the repository, so that nothing imports
from the checkout."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import ROOT, service_env, stop, wait_healthy
from tests.helpers import free_port

COMMANDS = ("llamachat-core", "llamachat-gateway", "llamachat-serve", "llamachat")
STUBS = ("chat_pb2.py", "chat_pb2.pyi", "chat_pb2_grpc.py", "chat.proto")


@dataclass
class Installed:
    wheel: Path
    venv: Path
    outside: Path  # a working directory outside the repository
    env: dict[str, str]  # the environment without PYTHONPATH

    def command(self, name: str) -> Path:
        return self.venv / "bin" / name

    def run(self, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(arg) for arg in args],
            cwd=self.outside,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def copy_as_cloned(destination: Path) -> None:
    """The files a clone would have, with this working tree's changes: what git
    tracks or would track, so neither the generated stubs nor .venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if "node_modules" in Path(name).parts or not source.is_file():
            continue
        (destination / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("packaging")
    clone, wheels, venv, outside = (base / name for name in ("clone", "wheels", "venv", "outside"))
    outside.mkdir()
    copy_as_cloned(clone)
    assert not (clone / "llamachat").exists()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    # Offline and quick: this venv already has the build requirements.
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, clone],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("llamachat-*.whl")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    subprocess.run(
        [*pip, "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", wheel],
        check=True,
        capture_output=True,
    )
    # The dependencies (llama-cpp-python compiles for minutes) and the default
    # model come from this venv, after the new venv's own site-packages.
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", where], check=True, capture_output=True, text=True
        ).stdout.strip()
    )
    (purelib / "dependencies.pth").write_text(f"{sysconfig.get_path('purelib')}\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    yield Installed(wheel, venv, outside, env)


def test_the_wheel_holds_the_generated_stubs_the_page_and_the_commands(installed: Installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read("llamachat-1.0.0.dist-info/METADATA").decode()
        entry_points = wheel.read("llamachat-1.0.0.dist-info/entry_points.txt").decode()
    assert {f"llamachat/v1/{stub}" for stub in STUBS} <= names
    assert "rest_gateway/static/ui.html" in names
    for package in ("inference_server", "rest_gateway", "clients"):
        assert f"{package}/__main__.py" in names
    assert not [name for name in names if name.startswith(("tests/", "clients/node/", "bench/"))]
    for command in COMMANDS:
        assert re.search(rf"^{command} = ", entry_points, re.MULTILINE)
    # The runtime pins are requirements.txt's, and the model is not among them.
    pins = [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert re.findall(r"^Requires-Dist: (.*)$", metadata, re.MULTILINE) == pins
    assert "smollm2" not in metadata.split("\n\n", 1)[0]


def test_the_installed_packages_and_commands_run_outside_the_repository(installed: Installed):
    found = installed.run(
        installed.venv / "bin" / "python",
        "-c",
        "import clients, inference_server, rest_gateway, llamachat.v1.chat_pb2_grpc as stubs\n"
        "for module in (clients, inference_server, rest_gateway, stubs): print(module.__file__)",
    )
    assert found.returncode == 0, found.stderr
    for path in found.stdout.split():
        assert Path(path).is_relative_to(installed.venv), path
    for command in COMMANDS:
        helped = installed.run(installed.command(command), "--help")
        assert helped.returncode == 0, f"{command}: {helped.stderr}"
        assert "usage: " in helped.stdout, helped.stdout
    for command in ("llamachat-serve", "llamachat"):
        helped = installed.run(installed.command(command), "--help")
        assert helped.stdout.startswith(f"usage: {command} "), helped.stdout


def test_llamachat_serve_and_the_llamachat_client_installed(installed: Installed, tmp_path: Path):
    env = service_env(free_port(), free_port(), tmp_path)
    env.pop("PYTHONPATH", None)
    url = f"http://127.0.0.1:{env['PORT']}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [installed.command("llamachat-serve")],
            cwd=installed.outside,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client: list[str | Path] = [installed.command("llamachat"), "--url", url]
    try:
        wait_healthy(url, [serve])
        said = installed.run(*client, "chat", "--max-tokens", "8", "Say hi")
        assert said.returncode == 0 and said.stdout.strip(), said.stderr
        session = re.fullmatch(r"\(session (\S+)\)", said.stderr.strip().splitlines()[-1])
        assert session, said.stderr
        session_id = session[1]
        again = installed.run(
            *client, "chat", "--session", session_id, "--max-tokens", "8", "And again?"
        )
        assert again.returncode == 0 and again.stdout.strip(), again.stderr
        assert len(httpx.get(f"{url}/sessions/{session_id}").json()["exchanges"]) == 2
        listed = installed.run(*client, "sessions")
        assert listed.returncode == 0 and session_id in listed.stdout.split(), listed.stderr
        cleared = installed.run(*client, "clear", session_id)
        assert cleared.returncode == 0 and cleared.stdout.strip() == f"cleared {session_id}"
        assert session_id not in installed.run(*client, "sessions").stdout.split()
    finally:
        code = stop(serve, signal.SIGTERM)
    assert code == 0, log.read_text()
