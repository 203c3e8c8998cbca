"""The proto follows buf's STANDARD lint rules (buf.yaml at the repository root).

buf comes from the root package.json (``npm ci``; ``make test`` does it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"


def test_buf_lint_passes():
    assert BUF.exists(), "buf is missing: run `npm ci` at the repository root"
    done = subprocess.run([str(BUF), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0 and output == "", f"buf lint (exit {done.returncode}):\n{output}"
