"""The name a process was started as, for its ``--help``."""

from __future__ import annotations

import sys
from pathlib import Path


def program_name(module: str) -> str:
    """``python -m MODULE``, or the console command's name (``llamachat-core``)."""
    started_as = Path(sys.argv[0]).name
    return f"python -m {module}" if started_as == "__main__.py" else started_as
