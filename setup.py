"""The one thing pyproject.toml cannot say: generate the gRPC stubs while building.

The stubs (``llamachat/v1/chat_pb2*.py``) are generated from ``proto/`` and never
committed, so a wheel built from a fresh clone must make them itself. setuptools'
``build_py`` step (the one that copies the packages into the build directory) is
extended to run ``grpc_tools.protoc`` with the same ``-I proto`` root as
``make proto``, writing into the build directory: the wheel gets the importable
package ``llamachat.v1`` (a namespace package, as in a checkout, with
``chat.proto`` beside the stubs for other languages) and the checkout is left as
it is. grpcio-tools is a build requirement in pyproject.toml, pinned as in
requirements.txt. Everything else about the package is declared in pyproject.toml.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.errors import SetupError

PROTO_ROOT = Path(__file__).resolve().parent / "proto"


class BuildPyWithStubs(build_py):
    """``build_py`` that also writes the stubs of every ``proto/**/*.proto``."""

    def run(self) -> None:
        super().run()
        if not self.dry_run:
            generate_stubs(Path(self.build_lib))


def generate_stubs(out: Path) -> None:
    from grpc_tools import protoc  # a build requirement, absent at run time

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise SetupError(f"no .proto files under {PROTO_ROOT}")
    out.mkdir(parents=True, exist_ok=True)
    # As `python -m grpc_tools.protoc` does: the well-known types (google/protobuf/*.proto)
    # come from grpc_tools' own copy.
    well_known = files("grpc_tools") / "_proto"
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            *map(str, protos),
        ]
    )
    if status != 0:
        raise SetupError(f"grpc_tools.protoc failed with status {status}")
    for proto in protos:
        shutil.copyfile(proto, out / proto.relative_to(PROTO_ROOT))


setup(cmdclass={"build_py": BuildPyWithStubs})
