"""The name a process was started as, for its ``--help``."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pydantic import ValidationError

S = TypeVar("S")


def program_name(module: str) -> str:
    """``python -m MODULE``, or the console command's name (``llamachat-core``)."""
    started_as = Path(sys.argv[0]).name
    return f"python -m {module}" if started_as == "__main__.py" else started_as


def settings_or_exit(build: Callable[[], S]) -> S:
    """The settings ``build`` makes; settings it refuses (an environment
    variable of the wrong type, values that contradict each other) end the
    process with one line and status 2, which a supervisor does not retry."""
    try:
        return build()
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or 'settings'}: {problem['msg']}"
            for problem in error.errors()
        )
        print(f"{Path(sys.argv[0]).name}: invalid settings: {problems}", file=sys.stderr)
        sys.exit(2)
