"""The package as pip installs it: a wheel built from the files of a fresh clone
(no generated stubs), installed into new virtual environments, and its console
commands run from a directory outside the repository, so that nothing imports
from the checkout.

Two installs, both offline (``pip --isolated --no-index``: no index, no
find-links, no pip configuration of this machine) and both resolved by pip
itself, with dependencies (not ``--no-deps``), so that pip checks what the
wheel declares:

- ``light``: ``pip install llamachat-*.whl``, no extras, as a user of the client
  only. Its venv sees, through a ``.pth`` file, a folder holding only the
  distributions that the wheel's plain requirements need (those and their own
  requirements, walked in this venv's metadata and linked from it). pip
  installs the wheel only if every plain requirement is met from that folder;
  that llama-cpp-python, fastapi and grpcio-tools are not in it is asserted.
- ``server``: ``pip install llamachat-*.whl[server]``. Its venv sees this
  venv's site-packages, which ``make setup`` filled from requirements.txt, so
  pip installs it only if the lock satisfies every range of the extras (and
  llama-cpp-python, which compiles for minutes, is not built again).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.parser import HeaderParser
from importlib.metadata import Distribution, distribution
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.e2e.conftest import ROOT, service_env, stop, wait_healthy
from tests.helpers import free_port

# The folders of a checkout that pip installs under ``llamachat``.
RENAMED = ("inference_server", "rest_gateway", "clients")
COMMANDS = ("llamachat-core", "llamachat-gateway", "llamachat-serve", "llamachat")
STUBS = ("chat_pb2.py", "chat_pb2.pyi", "chat_pb2_grpc.py", "chat.proto")
CLIENT_ONLY = {"grpcio", "protobuf", "httpx"}
# What a client-only install must not bring: llama.cpp, the web server stack,
# the settings of the server processes, the stub generator.
SERVER_MODULES = ("llama_cpp", "fastapi", "uvicorn", "pydantic", "pydantic_settings", "grpc_tools")
PIP = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check"]


@dataclass
class Installed:
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


@dataclass
class Built:
    wheel: Path
    metadata: str
    light: Installed
    server: Installed


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


def requirements_of(metadata: str) -> list[Requirement]:
    lines = HeaderParser().parsestr(metadata).get_all("Requires-Dist") or []
    return [Requirement(line) for line in lines]


def chosen(requirements: Iterable[Requirement], extra: str | None) -> list[Requirement]:
    """The requirements of ``extra``, or of a plain install (``None``)."""
    if extra is None:
        return [r for r in requirements if r.marker is None]
    return [r for r in requirements if r.marker and r.marker.evaluate({"extra": extra})]


def needed(requirements: Iterable[Requirement]) -> dict[str, Distribution]:
    """The distributions of this venv that ``requirements`` need, with the
    ones they need in turn."""
    found: dict[str, Distribution] = {}
    pending = list(requirements)
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found[name] = dist = distribution(name)
        for line in dist.requires or []:
            own = Requirement(line)
            extras = requirement.extras or {""}
            if own.marker is None or any(own.marker.evaluate({"extra": e}) for e in extras):
                pending.append(own)
    return found


def link_distributions(dists: Iterable[Distribution], folder: Path) -> None:
    """A folder for sys.path holding just ``dists``: links to their top-level
    files and folders (their .dist-info included) in this venv."""
    folder.mkdir()
    for dist in dists:
        assert dist.files is not None, dist.metadata["Name"]
        for top in {file.parts[0] for file in dist.files if file.parts[0] != ".."}:
            if not (folder / top).exists():
                (folder / top).symlink_to(str(dist.locate_file(top)))


def new_venv(venv: Path, outside: Path, sees: Path, install: str) -> Installed:
    """A venv that sees the folder ``sees`` after its own site-packages, with
    ``install`` installed by pip from nothing but that folder and the wheel."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = subprocess.run(
        [venv / "bin" / "python", "-c", where], check=True, capture_output=True, text=True
    ).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text(f"{sees}\n")
    pip: list[str | Path] = [*PIP, "--python", venv / "bin" / "python", "install", "--no-index"]
    pip.append(install)
    installed = subprocess.run(pip, capture_output=True, text=True)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return Installed(venv, outside, env)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    base = tmp_path_factory.mktemp("packaging")
    clone, wheels, outside = (base / name for name in ("clone", "wheels", "outside"))
    outside.mkdir()
    copy_as_cloned(clone)
    assert not (clone / "llamachat").exists()
    # Offline and quick: this venv already has the build requirements.
    subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, clone],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("llamachat-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read("llamachat-1.0.0.dist-info/METADATA").decode()
    plain = chosen(requirements_of(metadata), None)
    link_distributions(needed(plain).values(), base / "client-deps")
    light = new_venv(base / "light", outside, base / "client-deps", str(wheel))
    # The default model, which the server needs, comes from this venv too.
    everything = Path(sysconfig.get_path("purelib"))
    server = new_venv(base / "server", outside, everything, f"{wheel}[server]")
    yield Built(wheel, metadata, light, server)


def test_the_wheel_holds_only_llamachat_names_the_stubs_the_page_and_the_commands(built: Built):
    with zipfile.ZipFile(built.wheel) as wheel:
        names = set(wheel.namelist())
        entry_points = wheel.read("llamachat-1.0.0.dist-info/entry_points.txt").decode()
    tops = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert tops == {"llamachat", "llamachat_process"}
    assert "llamachat/__init__.py" not in names  # a namespace, shared with the stubs
    assert {f"llamachat/v1/{stub}" for stub in STUBS} <= names
    assert "llamachat/rest_gateway/static/ui.html" in names
    for package in RENAMED:
        assert f"llamachat/{package}/__main__.py" in names
    assert not [name for name in names if "/tests/" in name or "/node/" in name]
    for command in COMMANDS:
        assert re.search(rf"^{command} = llamachat(\.|_process\.commands:)", entry_points, re.M)


def absolute_imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) of each absolute import in the file at ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_the_installed_packages_import_their_own_modules_relatively():
    """A checkout imports ``inference_server``, an install ``llamachat.inference_server``:
    an absolute import of either package by name works in only one of them."""
    absolute = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for package in RENAMED
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, module in absolute_imports(path)
        if module.split(".")[0] in RENAMED
    ]
    assert absolute == []


def test_the_metadata_declares_ranges_the_lock_satisfies_and_extras_for_the_server(built: Built):
    requirements = requirements_of(built.metadata)
    headers = HeaderParser().parsestr(built.metadata)
    assert set(headers.get_all("Provides-Extra") or []) == {"core", "gateway", "server"}

    def names(extra: str | None) -> set[str]:
        return {canonicalize_name(r.name) for r in chosen(requirements, extra)}

    assert names(None) == CLIENT_ONLY
    assert {"llama-cpp-python", "psycopg"} <= names("core") and "fastapi" not in names("core")
    assert {"fastapi", "uvicorn"} <= names("gateway") and "llama-cpp-python" not in names("gateway")
    assert names("server") == {"llamachat"}  # itself, with both other extras
    (itself,) = [r for r in requirements if r.name == "llamachat"]
    assert itself.extras == {"core", "gateway"}
    lock: dict[str, Requirement] = {
        canonicalize_name(pin.name): pin
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
        for pin in [Requirement(line)]
    }
    for requirement in requirements:
        if requirement.name == "llamachat":
            continue
        operators = {spec.operator for spec in requirement.specifier}
        assert operators == {">=", "<"}, requirement  # a range, never a pin
        (pinned,) = lock[canonicalize_name(requirement.name)].specifier
        assert requirement.specifier.contains(pinned.version), (requirement, pinned)
    # grpcio-tools generates the stubs when the wheel is built, at the locked version.
    assert "grpcio-tools" not in {canonicalize_name(r.name) for r in requirements}
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert str(lock["grpcio-tools"]) in build
    # Nothing else is locked but what these need (psycopg[binary] needs psycopg-binary).
    declared = [r for r in requirements if r.name != "llamachat"]
    assert set(lock) - {"grpcio-tools"} <= set(needed(declared))
    assert "smollm2" not in built.metadata.split("\n\n", 1)[0]


def test_a_plain_install_is_the_client_without_the_server_stack(built: Built):
    light = built.light
    found = light.run(
        light.venv / "bin" / "python",
        "-c",
        "import importlib.util, llamachat.clients as clients, llamachat.v1.chat_pb2_grpc as stubs\n"
        f"for name in {SERVER_MODULES!r}: print(name, importlib.util.find_spec(name) is None)\n"
        "print(clients.__file__); print(stubs.__file__)",
    )
    assert found.returncode == 0, found.stderr
    *absent, client_file, stubs_file = found.stdout.splitlines()
    assert absent == [f"{name} True" for name in SERVER_MODULES]
    for path in (client_file, stubs_file):
        assert Path(path).is_relative_to(light.venv), path
    helped = light.run(light.command("llamachat"), "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: llamachat "), helped.stderr
    # The server's commands are there too (a wheel's commands do not depend on
    # its extras): they say which extra to install, with no traceback.
    for command, extra in [
        ("llamachat-core", "core"),
        ("llamachat-gateway", "gateway"),
        ("llamachat-serve", "server"),
    ]:
        refused = light.run(light.command(command), "--help")
        assert refused.returncode == 2, (command, refused.stdout, refused.stderr)
        assert f"pip install 'llamachat[{extra}]'" in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr, refused.stderr


def test_the_server_install_runs_its_packages_and_commands_outside_the_repository(built: Built):
    server = built.server
    found = server.run(
        server.venv / "bin" / "python",
        "-c",
        "import llamachat.clients as c, llamachat.inference_server as i, "
        "llamachat.rest_gateway as r, llamachat.v1.chat_pb2_grpc as stubs\n"
        "for module in (c, i, r, stubs): print(module.__file__)",
    )
    assert found.returncode == 0, found.stderr
    for path in found.stdout.split():
        assert Path(path).is_relative_to(server.venv), path
    for command in COMMANDS:
        helped = server.run(server.command(command), "--help")
        assert helped.returncode == 0, f"{command}: {helped.stderr}"
        assert helped.stdout.startswith(f"usage: {command} "), helped.stdout


def test_llamachat_serve_installed_with_extras_serves_the_light_client(
    built: Built, tmp_path: Path
):
    env = service_env(free_port(), free_port(), tmp_path)
    env.pop("PYTHONPATH", None)
    url = f"http://127.0.0.1:{env['PORT']}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [built.server.command("llamachat-serve")],
            cwd=built.server.outside,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    light = built.light
    client: list[str | Path] = [light.command("llamachat"), "--url", url]
    try:
        wait_healthy(url, [serve])
        said = light.run(*client, "chat", "--max-tokens", "8", "Say hi")
        assert said.returncode == 0 and said.stdout.strip(), said.stderr
        session = re.fullmatch(r"\(session (\S+)\)", said.stderr.strip().splitlines()[-1])
        assert session, said.stderr
        session_id = session[1]
        again = light.run(
            *client, "chat", "--session", session_id, "--max-tokens", "8", "And again?"
        )
        assert again.returncode == 0 and again.stdout.strip(), again.stderr
        assert len(httpx.get(f"{url}/sessions/{session_id}").json()["exchanges"]) == 2
        listed = built.server.run(built.server.command("llamachat"), "--url", url, "sessions")
        assert listed.returncode == 0 and session_id in listed.stdout.split(), listed.stderr
        cleared = light.run(*client, "clear", session_id)
        assert cleared.returncode == 0 and cleared.stdout.strip() == f"cleared {session_id}"
        assert session_id not in light.run(*client, "sessions").stdout.split()
    finally:
        code = stop(serve, signal.SIGTERM)
    assert code == 0, log.read_text()
